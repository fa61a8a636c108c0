"""Seeded request sets for the speculative-decoding benchmark (benchmarks/speculative.py).

- `grounded`: the reply copies from the prompt, where prompt-lookup (n-gram) proposals shine: (a) repeat a
  ~300-word passage replacing one word, (b) refactor a ~40-line Python function by renaming a variable,
  (c) quote two sections of a document word for word. Greedy, 160 tokens each.
- `chat`: short open questions with nothing to copy; the case speculation must not slow down.
- `greedy`: prompts whose greedy reply runs long (a 135M model tends to loop), ending at EOS or at
  `greedy_max_tokens` (None: the server's default).

Every request is one user turn, sent to /v1/chat/completions, so the server applies the model's chat
template. Prompts stay well inside a 2,048-token context (llama-server's per-slot context here).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from benchmarks.spec_texts import EDITS, FUNCTIONS, LONG_PROMPTS, PARAGRAPHS, QUESTIONS, RENAMES

WORKLOADS = ("grounded", "chat", "greedy")
GROUNDED_MAX_TOKENS = 160
CHAT_MAX_TOKENS = 128
GREEDY_MAX_TOKENS = 512


@dataclass(frozen=True)
class SpecRequest:
    """One chat request: the user text, its token cap (None: the server's default) and a label of its task."""

    prompt: str
    max_tokens: int | None
    task: str


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) is not None


def rewrite_request(rng: random.Random) -> SpecRequest:
    """Four paragraphs (about 300 words), one word replaced throughout."""
    chosen = rng.sample(PARAGRAPHS, 4)
    passage = "\n\n".join(text for _, text in chosen)
    word, new = rng.choice([e for e in EDITS if _has_word(passage, e[0])])
    prompt = (f'Rewrite the following text exactly as it is, but replace every "{word}" with "{new}". '
              f"Do not change anything else.\n\n{passage}")
    return SpecRequest(prompt, GROUNDED_MAX_TOKENS, "rewrite")


def refactor_request(rng: random.Random) -> SpecRequest:
    """One function with one local variable renamed."""
    i = rng.randrange(len(FUNCTIONS))
    old, new = rng.choice(RENAMES[i])
    prompt = (f"Refactor this Python function: rename the variable `{old}` to `{new}` everywhere. "
              f"Reply with the complete function and nothing else.\n\n```python\n{FUNCTIONS[i]}```")
    return SpecRequest(prompt, GROUNDED_MAX_TOKENS, "refactor")


def quote_request(rng: random.Random) -> SpecRequest:
    """A document of five titled sections; quote two of them."""
    sections = rng.sample(PARAGRAPHS, 5)
    document = "\n\n".join(f"## {title}\n{text}" for title, text in sections)
    a, b = rng.sample([title for title, _ in sections], 2)
    prompt = (f"Here is a document.\n\n{document}\n\n"
              f'Quote the sections "{a}" and "{b}" from the document word for word.')
    return SpecRequest(prompt, GROUNDED_MAX_TOKENS, "quote")


def grounded_requests(num: int, seed: int = 0) -> list[SpecRequest]:
    """Rewrite, refactor and quote tasks in turn, so any prefix of the list mixes all three."""
    rng = random.Random(seed)
    makers = (rewrite_request, refactor_request, quote_request)
    return [makers[i % 3](rng) for i in range(num)]


def chat_requests(num: int, seed: int = 0) -> list[SpecRequest]:
    """Distinct questions while they last, in a seeded order."""
    order = list(QUESTIONS)
    random.Random(seed).shuffle(order)
    return [SpecRequest(order[i % len(order)], CHAT_MAX_TOKENS, "chat") for i in range(num)]


def greedy_requests(num: int, seed: int = 0, max_tokens: int | None = GREEDY_MAX_TOKENS) -> list[SpecRequest]:
    order = list(LONG_PROMPTS)
    random.Random(seed).shuffle(order)
    return [SpecRequest(order[i % len(order)], max_tokens, "greedy") for i in range(num)]


def make_requests(workload: str, num: int, seed: int = 0,
                  greedy_max_tokens: int | None = GREEDY_MAX_TOKENS) -> list[SpecRequest]:
    if workload == "grounded":
        return grounded_requests(num, seed)
    if workload == "chat":
        return chat_requests(num, seed)
    if workload == "greedy":
        return greedy_requests(num, seed, greedy_max_tokens)
    raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
