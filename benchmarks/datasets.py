"""Request sets for the serving benchmark: synthetic (default, offline), random, ShareGPT; and random
token ids for the offline throughput benchmark (nano-vllm's workload, no tokenizer needed).

Prompts are built from real English words so that a tokenizer splits them the way it
splits ordinary text (roughly 1.3 tokens per word); lengths given in words below are
therefore only approximate token counts. The benchmark measures the real prompt token
counts from the server's usage (or `--tokenizer`).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Original prose used as the word source: varied, ordinary English.
_CORPUS = """
The old harbour town wakes slowly in winter. Before the sun clears the hills, the
fishing boats are already out past the breakwater, and the bakery on the corner has
been running its ovens for hours. By eight o'clock the streets fill with children
walking to school, shopkeepers lifting their shutters, and delivery vans that park
wherever they can find a gap. Nobody seems to be in a hurry, yet everything gets done.
A good engineer learns to distrust numbers that look too clean. When a measurement
comes back perfectly round, it usually means that something upstream was rounded,
cached, or skipped. The habit worth building is simple: ask how the number was
produced, repeat the experiment, and change one thing at a time. Most surprises turn
out to be ordinary mistakes, but the few that are not are where the real lessons live.
Gardening teaches patience in a way that few other hobbies do. Seeds planted in spring
may not show anything for weeks, and a tomato plant that looks healthy in June can be
ruined by a single week of heavy rain in August. Experienced gardeners keep notes about
what they planted, where, and when, because memory is unreliable across seasons and
the soil in one corner of a yard can behave very differently from the soil in another.
The library closed early on Friday because the heating had failed again. A small
group of students gathered outside, holding their laptops and arguing about whether
the café across the road would let them stay until midnight. In the end they split
up: some went home, some went to the café, and two of them decided that the exam could
wait until Monday and went to see a film instead.
Learning a new language as an adult is mostly a matter of showing up every day. The
first few months are full of small victories, like ordering coffee or understanding a
joke on the radio, followed by long stretches where nothing seems to improve. Then one
afternoon you realise that you have been reading a newspaper article for ten minutes
without reaching for the dictionary, and the effort suddenly feels worth it.
Trains are a wonderful way to see a country. From the window you watch cities thin out
into suburbs, then farmland, then forest, and the changes happen slowly enough that
you notice each one. Unlike flying, there is no security queue and no need to arrive
two hours early. The food is often disappointing, but the conversations with strangers
sharing your table can make up for it.
When the storm finally passed, the village counted the damage. Several roofs had lost
tiles, a large oak had fallen across the main road, and the river had risen almost to
the bridge. Neighbours who rarely spoke to each other spent the whole weekend clearing
branches and carrying sandbags, and by Sunday evening the road was open again and the
pub was full of people telling slightly exaggerated stories about the wind.
A well written recipe anticipates the cook's questions. It says how large the onion
should be, how long the butter should take to brown, and what the sauce should look
like when it is ready. It warns about the step that usually goes wrong and explains
how to rescue the dish if it does. Above all, it lists the ingredients in the order
they are used, so that nobody discovers halfway through that the oven should have been
heating for the last twenty minutes.
"""
WORDS: tuple[str, ...] = tuple(_CORPUS.split())
VOCABULARY: tuple[str, ...] = tuple(sorted({re.sub(r"[^\w']", "", w).lower() for w in WORDS} - {""}))

# Chat-style instructions wrapped around a passage of the corpus for the synthetic set.
_TASKS = (
    "Summarize the following text in a few sentences.",
    "Rewrite the following passage in a more formal tone.",
    "What is the main idea of this passage? Explain your answer.",
    "List three questions a curious reader might ask after reading this.",
    "Translate the following text into simple English for a young reader.",
    "Continue the story below for another paragraph.",
    "Give a short critique of the writing style of this passage.",
    "Explain what the author probably wants the reader to feel here.",
)


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: the user text and how many tokens to ask for."""

    prompt: str
    max_tokens: int


def _passage(rng: random.Random, n_words: int) -> str:
    """n_words consecutive words of the corpus starting anywhere, wrapping around."""
    start = rng.randrange(len(WORDS))
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n_words))


def synthetic_requests(
    num: int,
    seed: int = 0,
    prompt_words: tuple[int, int] = (12, 300),
    output_tokens: tuple[int, int] = (16, 160),
) -> list[BenchRequest]:
    """Seeded chat-like requests: an instruction plus a passage, `prompt_words` words in
    total (inclusive range), each asking for an output length drawn from `output_tokens`."""
    _check_range("prompt_words", prompt_words)
    _check_range("output_tokens", output_tokens)
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        task = rng.choice(_TASKS)
        total = rng.randint(*prompt_words)
        n_task = len(task.split())
        # Short prompts cannot hold a whole instruction; they are a bare passage.
        text = f"{task}\n\n{_passage(rng, total - n_task)}" if total > n_task + 4 else _passage(rng, total)
        out.append(BenchRequest(text, rng.randint(*output_tokens)))
    return out


def random_requests(
    num: int,
    seed: int = 0,
    input_len: int = 256,
    output_len: int = 128,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
) -> list[BenchRequest]:
    """Seeded bags of random vocabulary words.

    Input (words) and output (tokens) lengths are drawn uniformly from
    [len * (1 - range_ratio), len * (1 + range_ratio)]. `prefix_len` words are shared by
    every prompt (same words, same order) to exercise prefix caching; they are counted
    on top of the drawn input length.
    """
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    if input_len < 1 or output_len < 1 or prefix_len < 0:
        raise ValueError("input_len and output_len must be >= 1, prefix_len >= 0")
    rng = random.Random(seed)
    prefix = " ".join(rng.choices(VOCABULARY, k=prefix_len))
    out = []
    for _ in range(num):
        n_in = rng.randint(*_around(input_len, range_ratio))
        n_out = rng.randint(*_around(output_len, range_ratio))
        body = " ".join(rng.choices(VOCABULARY, k=n_in))
        out.append(BenchRequest(f"{prefix} {body}" if prefix else body, n_out))
    return out


def sharegpt_requests(
    path: str | Path,
    num: int,
    seed: int = 0,
    count_tokens: Callable[[str], int] | None = None,
    output_len: int | None = None,
    max_output_len: int = 1024,
) -> list[BenchRequest]:
    """First human turn and its gpt reply from each conversation of a ShareGPT JSON file
    (`[{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}]`),
    shuffled with `seed`, `num` of them.

    max_tokens is `output_len` if given, else the reply's token count by `count_tokens`,
    else an estimate of 4 tokens per 3 words (no tokenizer: the request still asks for a
    plausible length; measured counts come from the server). Capped at `max_output_len`.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    pairs = []
    for item in data:
        turns = item.get("conversations") or []
        for a, b in zip(turns, turns[1:], strict=False):
            if a.get("from") == "human" and b.get("from") == "gpt" and a.get("value") and b.get("value"):
                pairs.append((a["value"], b["value"]))
                break
    random.Random(seed).shuffle(pairs)
    out = []
    for prompt, reply in pairs[:num]:
        if output_len is not None:
            n = output_len
        elif count_tokens is not None:
            n = count_tokens(reply)
        else:
            n = -(-4 * len(reply.split()) // 3)
        out.append(BenchRequest(prompt, max(1, min(n, max_output_len))))
    if len(out) < num:
        raise ValueError(f"{path} has {len(out)} usable conversations, {num} requested")
    return out


def random_token_prompts(
    num: int, seed: int = 0, lens: tuple[int, int] = (100, 1024), vocab: int = 10000,
) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's bench.py workload: `num` prompts of random token ids below `vocab`, each prompt
    length and each output length drawn uniformly from `lens` (inclusive). Returns (prompts, max_tokens)."""
    _check_range("lens", lens)
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(*lens))] for _ in range(num)]
    return prompts, [rng.randint(*lens) for _ in range(num)]


def _around(n: int, ratio: float) -> tuple[int, int]:
    return max(1, int(n * (1 - ratio))), max(1, int(n * (1 + ratio)))


def _check_range(name: str, r: tuple[int, int]) -> None:
    if not 1 <= r[0] <= r[1]:
        raise ValueError(f"{name} must be an inclusive range 1 <= lo <= hi, got {r}")
