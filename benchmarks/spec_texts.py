"""Source texts for the speculative-decoding workloads (benchmarks/spec_workloads.py): prose paragraphs,
Python functions and chat questions, written for this repository so that nothing is downloaded.

The paragraphs are plain, concrete English that a 135M-parameter model can copy; each one holds a
word that a rewrite task can replace (`EDITS`). The functions are about 40 lines each, and every one
names the local variables that a refactor task may rename (`RENAMES`).
"""

from __future__ import annotations

# (title, text): each about 75 words. The titles head the sections of the quote-from-a-document task.
PARAGRAPHS: tuple[tuple[str, str], ...] = (
    ("The harbour", (
        "Every morning the fishing boats leave the harbour before the sun rises over the hills. The "
        "fishermen check their nets, load ice into the holds and wave to the baker, who is already "
        "carrying trays of bread to the shop on the corner. By noon the boats return with their catch, "
        "and the market near the harbour fills with people who want to buy fresh fish for dinner.")),
    ("The garden", (
        "The garden behind the house is small, but it gives the family vegetables for most of the year. "
        "In spring they plant beans, carrots and tomatoes in neat rows, and in summer they water the "
        "plants every evening when the air is cool. The children pull weeds on Saturday mornings, and "
        "in autumn everyone helps to pick the last tomatoes before the first frost arrives.")),
    ("The library", (
        "The library in the centre of the town opens at nine o'clock and closes at six. Students come "
        "to study at the long wooden tables, and older readers sit by the window with the newspapers. "
        "The librarian knows where every book is kept, and she is always happy to help a visitor find "
        "a map, a novel or an old record of the town and its families.")),
    ("The train", (
        "The train to the city leaves the station every hour and takes about forty minutes. From the "
        "window you can see fields, small villages and a long river that follows the railway for many "
        "miles. Most passengers read, sleep or look at their phones, but a few always talk to the "
        "people sitting next to them, and by the end of the journey they have made a new friend.")),
    ("The storm", (
        "The storm arrived late in the evening and lasted until the next morning. Strong winds broke "
        "branches from the trees, heavy rain flooded the roads, and the river rose higher than anyone "
        "could remember. When the storm was over, the neighbours came out of their houses, cleared the "
        "streets together and shared hot soup with the families whose homes had been damaged.")),
    ("The kitchen", (
        "The kitchen is the warmest room in the house, especially in winter. A large pot of soup is "
        "often cooking on the stove, and the smell of fresh bread comes from the oven. The family eats "
        "dinner at the old kitchen table, where they talk about their day, plan the weekend and laugh "
        "at the jokes that the youngest child brings home from school.")),
    ("The market", (
        "On Saturday the market fills the main square with stalls selling fruit, cheese, flowers and "
        "old books. Farmers arrive early to set up their tables, and by eight o'clock the square is "
        "busy with shoppers carrying baskets. Musicians play near the fountain, children buy sweets "
        "with their pocket money, and the market stays open until the last apples are sold.")),
    ("The school", (
        "The school stands at the top of the hill, and the children walk there together every morning. "
        "Their first lesson is mathematics, followed by reading, science and music. At lunch they play "
        "football in the yard or sit under the big tree to eat their sandwiches. In the afternoon the "
        "school is quiet again, and the teachers prepare the lessons for the next day.")),
)

# Whole-word replacements for the rewrite task: (word, replacement); every paragraph holds at least one.
EDITS: tuple[tuple[str, str], ...] = (
    ("harbour", "port"), ("garden", "yard"), ("library", "archive"), ("train", "bus"),
    ("storm", "hurricane"), ("kitchen", "dining room"), ("market", "fair"), ("school", "academy"),
    ("morning", "dawn"), ("children", "kids"), ("river", "stream"), ("family", "household"),
)

# Functions to refactor (about 40 lines each) and, per function, the local names a task may rename.
FUNCTIONS: tuple[str, ...] = (
    '''def summarize_orders(orders, tax_rate=0.2):
    """Totals, averages and the largest order per customer."""
    totals = {}
    counts = {}
    largest = {}
    for order in orders:
        customer = order["customer"]
        amount = order["amount"]
        if amount <= 0:
            continue
        taxed = amount * (1 + tax_rate)
        if customer not in totals:
            totals[customer] = 0.0
            counts[customer] = 0
            largest[customer] = taxed
        totals[customer] += taxed
        counts[customer] += 1
        if taxed > largest[customer]:
            largest[customer] = taxed
    report = []
    for customer in sorted(totals):
        average = totals[customer] / counts[customer]
        report.append({
            "customer": customer,
            "total": round(totals[customer], 2),
            "orders": counts[customer],
            "average": round(average, 2),
            "largest": round(largest[customer], 2),
        })
    grand_total = 0.0
    for row in report:
        grand_total += row["total"]
    return {
        "rows": report,
        "grand_total": round(grand_total, 2),
        "customers": len(report),
    }
''',
    '''def parse_config(lines):
    """Parse INI-style lines into a dict of sections, each a dict of keys."""
    sections = {}
    current = "default"
    sections[current] = {}
    errors = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
            if not current:
                errors.append(f"line {number}: empty section name")
                current = "default"
            sections.setdefault(current, {})
            continue
        if "=" not in line:
            errors.append(f"line {number}: expected key = value")
            continue
        key, value = line.split("=", 1)
        key = key.strip()
        value = value.strip()
        if value.lower() in ("true", "yes", "on"):
            value = True
        elif value.lower() in ("false", "no", "off"):
            value = False
        elif value.isdigit():
            value = int(value)
        if key in sections[current]:
            errors.append(f"line {number}: duplicate key {key}")
        sections[current][key] = value
    empty = [name for name, keys in sections.items() if not keys]
    for name in empty:
        if name != "default":
            errors.append(f"section {name} has no keys")
    if not sections["default"]:
        del sections["default"]
    return sections, errors
''',
    '''def moving_average(values, window=3):
    """Moving averages of a list of numbers, skipping missing values."""
    if window < 1:
        raise ValueError("window must be at least 1")
    result = []
    buffer = []
    total = 0.0
    missing = 0
    for index, value in enumerate(values):
        if value is None:
            missing += 1
            result.append(None)
            continue
        buffer.append(value)
        total += value
        if len(buffer) > window:
            oldest = buffer.pop(0)
            total -= oldest
        if len(buffer) < window:
            result.append(None)
        else:
            result.append(total / window)
    smallest = None
    largest = None
    for average in result:
        if average is None:
            continue
        if smallest is None or average < smallest:
            smallest = average
        if largest is None or average > largest:
            largest = average
    spread = None
    if smallest is not None and largest is not None:
        spread = largest - smallest
    return {
        "averages": result,
        "missing": missing,
        "smallest": smallest,
        "largest": largest,
        "spread": spread,
    }
''',
    '''def schedule_tasks(tasks, workers=2):
    """Assign tasks (name, hours) to workers, longest task first, least busy worker first."""
    if workers < 1:
        raise ValueError("need at least one worker")
    loads = [0.0] * workers
    plan = [[] for _ in range(workers)]
    ordered = sorted(tasks, key=lambda task: task[1], reverse=True)
    skipped = []
    for name, hours in ordered:
        if hours <= 0:
            skipped.append(name)
            continue
        best = 0
        for worker in range(1, workers):
            if loads[worker] < loads[best]:
                best = worker
        plan[best].append(name)
        loads[best] += hours
    finish = max(loads)
    idle = []
    for worker in range(workers):
        idle.append(finish - loads[worker])
    balanced = True
    for gap in idle:
        if gap > 1.0:
            balanced = False
    summary = []
    for worker in range(workers):
        summary.append({
            "worker": worker,
            "tasks": plan[worker],
            "hours": loads[worker],
            "idle": idle[worker],
        })
    return {
        "workers": summary,
        "finish": finish,
        "balanced": balanced,
        "skipped": skipped,
    }
''',
)

RENAMES: tuple[tuple[tuple[str, str], ...], ...] = (
    (("totals", "customer_totals"), ("report", "rows_out"), ("taxed", "gross"), ("largest", "biggest")),
    (("sections", "parsed"), ("current", "section_name"), ("errors", "problems"), ("line", "text")),
    (("result", "averages_out"), ("buffer", "recent"), ("total", "running_sum"), ("missing", "gaps")),
    (("loads", "busy_hours"), ("plan", "assignment"), ("ordered", "by_length"), ("idle", "slack")),
)

# Open-ended questions: nothing in the prompt to copy from.
QUESTIONS: tuple[str, ...] = (
    "What are some good ways to stay focused while studying?",
    "Why do leaves change colour in autumn?",
    "How can I make my mornings less stressful?",
    "What should I pack for a weekend camping trip?",
    "Why is it important to drink enough water?",
    "How do I start learning to play the guitar?",
    "What makes a good friend?",
    "How can a small town attract more visitors?",
    "What are the benefits of reading every day?",
    "How do bees make honey?",
    "What is a healthy breakfast for a busy person?",
    "How can I save money on groceries?",
    "Why do people enjoy watching sports?",
    "What are some tips for a first job interview?",
    "How does a rainbow form?",
    "What can I do on a rainy afternoon at home?",
    "How do I take care of a houseplant?",
    "Why is sleep important for children?",
    "What are the advantages of riding a bicycle to work?",
    "How can I become better at public speaking?",
    "What should I think about before adopting a dog?",
    "How do clouds form?",
    "What are some easy ways to reduce waste at home?",
    "Why do we have seasons?",
    "How can I help a friend who feels lonely?",
    "What makes a city pleasant to live in?",
    "How do I plan a simple birthday party?",
    "What are the benefits of learning a second language?",
    "How can I keep my desk organised?",
    "Why do birds migrate?",
    "What is a good way to start writing a diary?",
    "How can families spend more time together?",
    "What should a beginner know about cooking rice?",
    "Why do people keep pets?",
    "How can I stay active during the winter?",
    "What are some polite ways to say no to a request?",
)

# Prompts whose greedy reply runs long (the model keeps going until the token cap or loops).
LONG_PROMPTS: tuple[str, ...] = (
    "Write a long story about a young sailor who leaves home to explore the sea.",
    "List one hundred different animals, one per line, each with a short fact.",
    "Write a detailed guide to growing vegetables in a small garden, step by step.",
    "Describe, in as much detail as you can, a day in the life of a village baker.",
    "Write a long letter to a friend describing your travels through five different countries.",
    "Explain the history of trains, from the first steam engines to modern high-speed rail, in detail.",
    "Write a numbered list of fifty tips for living a healthier life.",
    "Tell a long fairy tale about a king, a dragon and a clever girl.",
)
