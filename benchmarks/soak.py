"""Soak test: drive a running server for a while with a seeded mix of good, odd, aborted and bad
requests, and check that it stays correct, returns to idle and does not leak memory.

    python benchmarks/soak.py --url http://127.0.0.1:8000 --duration 60 --concurrency 8 --seed 0 \
        [--pid PID] [--api-key KEY] [--json out.json] [--exclude bad/huge_n,abort]

Each of --concurrency workers draws requests from its own seeded stream until --duration is over:

- good: completions and chat, streamed and not, n 1..3, max_tokens 1..24, mostly with ignore_eos so
  the length is exact; odd but valid parameters (temperature 0 and 2, top_p 0.01, top_k 1, seeds,
  stop strings and token ids, logprobs, logit_bias, penalties, min_tokens, echo, usage options,
  unicode, token-id and batch prompts, unknown fields);
- disconnect: a good streamed request closed by the client after a few events;
- abort: a good non-streamed request cancelled by the client after a short delay;
- bad: malformed or out-of-range requests that must get their 4xx and OpenAI's error object.

Violations (exit status 1, each recorded with the request's kind and body):
- a 5xx other than a deliberate overload (503 or 429, which must carry Retry-After);
- a bad request answered with anything but its 4xx and {"error": {message, type, param, code}};
- a transport error or timeout we did not cause; a malformed SSE stream (a `data:` line that is
  not JSON, no final `data: [DONE]`), or an error event in it other than an overload;
- a wrong length: with ignore_eos (and nothing else that stops early) every choice ends with
  "length" after exactly max_tokens tokens; otherwise with "stop" or "length", between min_tokens and
  max_tokens; usage adds up;
- after the run, KV-cache usage and running and waiting requests not all 0 within 30 s;
- the server's resident memory growing 5% or more between the run's midpoint and its end.

Only loopback servers: the memory check reads the server process's /proc entry.
`main(argv)` is the CLI; `run_soak(SoakConfig)` returns the report for callers.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

if __package__ in (None, ""):
    # Run as a script: make `benchmarks.*` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.client import list_models
from benchmarks.report import save_json

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
OVERLOAD_STATUSES = (503, 429)
ERROR_FIELDS = ("message", "type", "param", "code")
MAX_GOOD_TOKENS = 24
BAD_TIMEOUT_S = 15.0  # a validation answer needs no model step; waiting longer would stall a worker
IDLE_TIMEOUT_S = 30.0
RSS_GROWTH_LIMIT = 0.05
MAX_VIOLATIONS = 500  # past this the server is plainly broken: stop rather than pile up more
SHOWN_VIOLATIONS = 20

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🚀🔥👩‍💻, عربى, Ελληνικά",
    "  leading spaces,\ttabs\tand\n\nblank lines\n",
    "1, 2, 3, 4,",
    "\u200b zero-width space and combining e\u0301",
]


@dataclass
class Case:
    """One request and what a correct answer to it looks like."""

    kind: str  # good/..., disconnect/..., abort/..., bad/<name>; --exclude matches its prefix
    path: str
    body: dict | None = None
    raw: bytes | None = None  # sent as is instead of body (invalid JSON)
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    expect_status: int = 200
    # Good requests only:
    choices: int = 1  # prompts x n
    max_tokens: int = 0
    min_tokens: int = 0
    exact: bool = False  # every choice must run to exactly max_tokens, finish_reason "length"
    logprobs: bool = False  # the per-choice token count can be read from the logprobs
    # abort: cancel after this many seconds; disconnect: close after this many data events.
    cut_after: float | None = None

    @property
    def stream(self) -> bool:
        return bool(self.body and self.body.get("stream"))

    def summary(self) -> str:
        text = self.raw.decode(errors="replace") if self.raw is not None else json.dumps(self.body, ensure_ascii=False)
        return text if len(text) <= 300 else text[:300] + f"... ({len(text)} chars)"


# ---- the request mix ---------------------------------------------------------------------------

def _token_ids(rng: random.Random) -> list[int]:
    return [rng.randrange(1, 1000) for _ in range(rng.randint(1, 20))]


def _completion_prompt(rng: random.Random) -> tuple[Any, int]:
    """(prompt, number of prompts): a string, token ids, or a batch of either."""
    shape = rng.choice(["text", "text", "ids", "batch_text", "batch_ids"])
    if shape == "text":
        return rng.choice(PROMPTS), 1
    if shape == "ids":
        return _token_ids(rng), 1
    size = rng.randint(1, 3)
    if shape == "batch_text":
        return [rng.choice(PROMPTS) for _ in range(size)], size
    return [_token_ids(rng) for _ in range(size)], size


def _messages(rng: random.Random) -> list[dict]:
    user = rng.choice(PROMPTS)
    shape = rng.choice(["user", "system", "developer", "turns", "parts"])
    if shape == "user":
        return [{"role": "user", "content": user}]
    if shape in ("system", "developer"):
        return [{"role": shape, "content": "You answer briefly. 简短回答。"}, {"role": "user", "content": user}]
    if shape == "turns":
        return [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello 👋"},
                {"role": "user", "content": user}]
    return [{"role": "user", "content": [{"type": "text", "text": user}, {"type": "text", "text": "Go on."}]}]


def good_case(rng: random.Random, model: str) -> Case:
    """A valid request with a random endpoint, shape and one to three odd parameters."""
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    n = rng.randint(1, 3)
    max_tokens = rng.randint(1, MAX_GOOD_TOKENS)
    ignore_eos = rng.random() < 0.8
    body: dict[str, Any] = {"model": model, "n": n, "stream": stream}
    if chat:
        body["messages"] = _messages(rng)
        body["max_completion_tokens" if rng.random() < 0.3 else "max_tokens"] = max_tokens
        prompts = 1
    else:
        body["prompt"], prompts = _completion_prompt(rng)
        body["max_tokens"] = max_tokens
    if ignore_eos:
        body["ignore_eos"] = True
    if stream and rng.random() < 0.85:  # else the length is checked from logprobs, if any
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": rng.random() < 0.2}
    case = Case(kind=f"good/{'chat' if chat else 'completions'}{'/stream' if stream else ''}",
                path=CHAT if chat else COMPLETIONS, body=body, choices=prompts * n, max_tokens=max_tokens)
    stops_early = False
    for name in rng.sample(sorted(ODD_PARAMS), rng.randint(0, 3)):
        stops_early |= ODD_PARAMS[name](rng, body, case)
    case.exact = ignore_eos and not stops_early
    return case


def _odd_sampling(rng: random.Random, body: dict, case: Case) -> bool:
    body.update(rng.choice([{"temperature": 0.0}, {"temperature": 2.0}, {"top_p": 0.01}, {"top_k": 1},
                            {"min_p": 0.2}, {"temperature": 2.0, "top_k": 50, "top_p": 0.9}]))
    return False


def _odd_seed(rng: random.Random, body: dict, case: Case) -> bool:
    body["seed"] = rng.choice([0, rng.randrange(2**63), -1])
    return False


def _odd_stop(rng: random.Random, body: dict, case: Case) -> bool:
    body["stop"] = rng.choice(["\n", [".", ","], ["the", " a"], "zzzq", ["é", "🚀"]])
    body["include_stop_str_in_output"] = rng.random() < 0.5
    return True


def _odd_stop_token_ids(rng: random.Random, body: dict, case: Case) -> bool:
    body["stop_token_ids"] = [rng.randrange(1000) for _ in range(rng.randint(1, 3))]
    return True


def _odd_logprobs(rng: random.Random, body: dict, case: Case) -> bool:
    if case.path == CHAT:
        body.update(logprobs=True, top_logprobs=rng.randint(0, 5))
    else:
        body["logprobs"] = rng.randint(0, 5)
        body.pop("echo", None)  # echo with logprobs is a 400
    case.logprobs = True
    return False


def _odd_logit_bias(rng: random.Random, body: dict, case: Case) -> bool:
    body["logit_bias"] = {str(rng.randrange(1000)): rng.choice([-100.0, 100.0, rng.uniform(-5, 5)])
                          for _ in range(rng.randint(1, 3))}
    return False


def _odd_penalties(rng: random.Random, body: dict, case: Case) -> bool:
    body.update(presence_penalty=rng.uniform(-2, 2), frequency_penalty=rng.uniform(-2, 2),
                repetition_penalty=rng.choice([0.5, 1.0, 1.3, 2.0]))
    return False


def _odd_min_tokens(rng: random.Random, body: dict, case: Case) -> bool:
    case.min_tokens = body["min_tokens"] = rng.randint(0, case.max_tokens)
    return False


def _odd_echo(rng: random.Random, body: dict, case: Case) -> bool:
    if case.path == COMPLETIONS and "logprobs" not in body:
        body["echo"] = True
    return False


def _odd_extras(rng: random.Random, body: dict, case: Case) -> bool:
    # Fields a client may send that change nothing here; unknown ones are ignored, not rejected.
    body.update(user="soak", skip_special_tokens=rng.random() < 0.5, soak_unknown_field={"x": [1]})
    return False


ODD_PARAMS: dict[str, Callable[[random.Random, dict, Case], bool]] = {
    "sampling": _odd_sampling, "seed": _odd_seed, "stop": _odd_stop, "stop_token_ids": _odd_stop_token_ids,
    "logprobs": _odd_logprobs, "logit_bias": _odd_logit_bias, "penalties": _odd_penalties,
    "min_tokens": _odd_min_tokens, "echo": _odd_echo, "extras": _odd_extras,
}


def bad_cases(model: str, max_model_len: int, api_key: str | None) -> list[Case]:
    """Requests the server must turn down with a 4xx and OpenAI's error object."""
    def c(name: str, path: str = COMPLETIONS, status: int = 400, **fields: Any) -> Case:
        return Case(kind=f"bad/{name}", path=path, body={"model": model, "max_tokens": 4, **fields},
                    expect_status=status)

    def chat(name: str, status: int = 400, **fields: Any) -> Case:
        return c(name, CHAT, status, **{"messages": [{"role": "user", "content": "Hi"}], **fields})

    cases = [
        Case(kind="bad/invalid_json", path=COMPLETIONS, raw=b'{"prompt": "Hi", "max_tokens": 4,', expect_status=400),
        Case(kind="bad/nan", path=COMPLETIONS, raw=b'{"prompt": "Hi", "temperature": NaN}', expect_status=400),
        Case(kind="bad/not_an_object", path=CHAT, raw=b'[{"role": "user", "content": "Hi"}]', expect_status=400),
        c("missing_prompt"),
        c("prompt_wrong_type", prompt=123),
        c("prompt_empty_ids", prompt=[]),
        c("prompt_id_out_of_vocab", prompt=[1, 10**7]),
        c("prompt_too_long", prompt=[100] * (max_model_len + 1)),
        c("max_tokens_wrong_type", prompt="Hi", max_tokens="four"),
        c("max_tokens_zero", prompt="Hi", max_tokens=0),
        c("max_tokens_beyond_context", prompt="Hi", max_tokens=max_model_len),
        c("temperature_negative", prompt="Hi", temperature=-1),
        c("top_p_zero", prompt="Hi", top_p=0),
        c("top_k_negative", prompt="Hi", top_k=-5),
        c("presence_penalty_3", prompt="Hi", presence_penalty=3),
        c("n_zero", prompt="Hi", n=0),
        c("huge_n", prompt="Hi", n=100000),
        c("logprobs_21", prompt="Hi", logprobs=21),
        c("logit_bias_key", prompt="Hi", logit_bias={"abc": 1}),
        c("logit_bias_value", prompt="Hi", logit_bias={"1": 1000}),
        c("min_tokens_over_max", prompt="Hi", max_tokens=2, min_tokens=5),
        c("seed_too_big", prompt="Hi", seed=2**70),
        c("empty_stop_string", prompt="Hi", stop=[""]),
        c("too_many_stop_strings", prompt="Hi", stop=[f"stop{i}" for i in range(10000)]),
        c("stream_options_without_stream", prompt="Hi", stream_options={"include_usage": True}),
        c("suffix", prompt="Hi", suffix="!"),
        c("unknown_model", status=404, prompt="Hi", model="no-such-model"),
        chat("empty_messages", messages=[]),
        chat("messages_wrong_type", messages="Hi"),
        chat("empty_role", messages=[{"role": "", "content": "Hi"}]),
        chat("image_part", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        chat("top_logprobs_without_logprobs", top_logprobs=3),
        chat("tool_choice_not_in_tools", tools=[{"type": "function", "function": {"name": "f"}}],
             tool_choice={"type": "function", "function": {"name": "g"}}),
        chat("unknown_model_chat", status=404, model="no-such-model"),
        Case(kind="bad/unknown_path", path="/v1/no-such-endpoint", body={}, expect_status=404),
        Case(kind="bad/wrong_method", path=COMPLETIONS, method="GET", expect_status=405),
    ]
    if api_key:
        cases.append(Case(kind="bad/wrong_api_key", path=COMPLETIONS, body={"model": model, "prompt": "Hi"},
                          headers={"Authorization": "Bearer not-the-key"}, expect_status=401))
    return cases


class BadDeck:
    """The bad cases in a seeded order, each sent once before any is sent again: a short run (where
    slow good requests leave time for few bad ones) still covers them all."""

    def __init__(self, cases: list[Case], seed: int):
        self.cases, self.rng, self.next = list(cases), random.Random(seed), len(cases)

    def draw(self) -> Case | None:
        if not self.cases:
            return None
        if self.next == len(self.cases):
            self.rng.shuffle(self.cases)
            self.next = 0
        self.next += 1
        return self.cases[self.next - 1]


def draw_case(rng: random.Random, model: str, bad: BadDeck, exclude: tuple[str, ...] = ()) -> Case:
    """40% good, 10% disconnect, 10% abort, 40% bad (cheap: many cost the server little).
    Kinds starting with an `exclude` entry are drawn again."""
    for _ in range(1000):
        case = _draw(rng, model, bad)
        if not case.kind.startswith(exclude):
            return case
    raise ValueError(f"--exclude {','.join(exclude)} leaves (almost) nothing to send")


def _draw(rng: random.Random, model: str, bad: BadDeck) -> Case:
    roll = rng.random()
    if roll < 0.4 and (case := bad.draw()):
        return case
    case = good_case(rng, model)
    if roll < 0.5:
        case.body["stream"] = True
        case.kind = "disconnect/" + case.kind.split("/")[1] + "/stream"
        case.cut_after = rng.randint(0, 4)
    elif roll < 0.6:
        case.body["stream"] = False
        case.body.pop("stream_options", None)
        case.kind = "abort/" + case.kind.split("/")[1]
        case.cut_after = rng.uniform(0.02, 1.5)
    return case


# ---- checking answers --------------------------------------------------------------------------

@dataclass
class Stats:
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome) -> requests
    prompt_tokens: int = 0
    completion_tokens: int = 0
    overloads: int = 0
    violations: list[dict] = field(default_factory=list)

    def record(self, case: Case, outcome: str) -> None:
        self.outcomes[(case.kind, outcome)] += 1

    def violation(self, case: Case | None, problem: str) -> None:
        """A problem with one request's answer, or (case None) with the server as a whole."""
        self.violations.append({"kind": case.kind if case else "server", "problem": problem,
                                "request": case.summary() if case else None})


def error_body_problem(resp: httpx.Response) -> str | None:
    """What is wrong with an error answer's body, if anything: it must be OpenAI's error object."""
    try:
        err = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"body is not OpenAI's error object: {resp.text[:200]!r}"
    if not isinstance(err, dict) or any(k not in err for k in ERROR_FIELDS):
        return f"error object lacks some of {ERROR_FIELDS}: {json.dumps(err)[:200]}"
    if not (isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)):
        return f"error message/type not non-empty strings: {json.dumps(err)[:200]}"
    return None


def is_overload_error(err: Any) -> bool:
    return isinstance(err, dict) and err.get("code") in ("overloaded", "rate_limit_exceeded")


def check_status(case: Case, resp: httpx.Response, stats: Stats) -> bool:
    """Record the status; True when a body worth checking for a good answer follows."""
    status = resp.status_code
    stats.record(case, str(status))
    if status in OVERLOAD_STATUSES:
        stats.overloads += 1
        if "retry-after" not in resp.headers:
            stats.violation(case, f"overload answer {status} without a Retry-After header")
        elif problem := error_body_problem(resp):
            stats.violation(case, f"overload answer {status}: {problem}")
        return False
    if status != case.expect_status:
        stats.violation(case, f"expected HTTP {case.expect_status}, got {status}: {resp.text[:200]!r}")
        return False
    if status != 200:
        if problem := error_body_problem(resp):
            stats.violation(case, f"HTTP {status}: {problem}")
        return False
    return True


@dataclass
class ChoiceResult:
    finish_reason: str | None = None
    tokens: int = 0  # counted from logprobs, when asked for


def _choice_logprob_tokens(choice: dict) -> int:
    lp = choice.get("logprobs") or {}
    return len(lp.get("content") or []) if "content" in lp else len(lp.get("tokens") or [])


def check_length(case: Case, results: dict[int, ChoiceResult], usage: dict | None, stats: Stats) -> None:
    """Every choice is there and finished, with the expected number of tokens."""
    problems = []
    if sorted(results) != list(range(case.choices)):
        problems.append(f"choice indexes {sorted(results)}, expected 0..{case.choices - 1}")
    allowed = ("length",) if case.exact else ("stop", "length")
    for i, r in sorted(results.items()):
        if r.finish_reason not in allowed:
            problems.append(f"choice {i} finish_reason {r.finish_reason!r}, expected one of {allowed}")
        if case.logprobs:
            low = case.max_tokens if case.exact or r.finish_reason == "length" else case.min_tokens
            if not low <= r.tokens <= case.max_tokens:
                problems.append(f"choice {i} has {r.tokens} logprob entries, expected {low}..{case.max_tokens}")
    if usage is not None:
        got, most = usage.get("completion_tokens"), case.choices * case.max_tokens
        least = most if case.exact else case.choices * case.min_tokens
        if not isinstance(got, int) or not least <= got <= most:
            problems.append(f"usage.completion_tokens {got}, expected {least}..{most}")
        elif usage.get("total_tokens") != usage.get("prompt_tokens", 0) + got or not usage.get("prompt_tokens"):
            problems.append(f"usage does not add up: {usage}")
        else:
            stats.prompt_tokens += usage["prompt_tokens"]
            stats.completion_tokens += got
    for p in problems:
        stats.violation(case, p)


def check_whole(case: Case, resp: httpx.Response, stats: Stats) -> None:
    try:
        data = resp.json()
        choices = {c["index"]: ChoiceResult(c.get("finish_reason"), _choice_logprob_tokens(c))
                   for c in data["choices"]}
        usage = data["usage"]
    except (ValueError, KeyError, TypeError) as e:
        stats.violation(case, f"malformed response ({type(e).__name__}: {e}): {resp.text[:200]!r}")
        return
    check_length(case, choices, usage, stats)


async def read_stream(case: Case, resp: httpx.Response, stats: Stats) -> bool:
    """Check an SSE stream. False when we closed it early on purpose (a disconnect case)."""
    if not resp.headers.get("content-type", "").startswith("text/event-stream"):
        stats.violation(case, f"stream with content-type {resp.headers.get('content-type')!r}")
        return True
    if case.cut_after == 0:
        return False  # hang up as soon as the headers are in
    results: dict[int, ChoiceResult] = {}
    usage: dict | None = None
    events, done = 0, False
    async for line in resp.aiter_lines():
        if not line or line.startswith(":"):
            continue  # event separators and comments (keep-alive pings)
        if done:
            stats.violation(case, f"SSE line after [DONE]: {line[:200]!r}")
            return True
        if not line.startswith("data:"):
            if line.split(":", 1)[0] in ("event", "id", "retry"):
                continue
            stats.violation(case, f"malformed SSE line: {line[:200]!r}")
            return True
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        try:
            chunk = json.loads(data)
            if "error" in chunk:
                if is_overload_error(chunk["error"]):
                    stats.overloads += 1
                    stats.record(case, "overload-event")
                else:
                    stats.violation(case, f"error event in the stream: {json.dumps(chunk['error'])[:200]}")
                return True
            for choice in chunk["choices"]:
                r = results.setdefault(choice["index"], ChoiceResult())
                if r.finish_reason is not None:
                    stats.violation(case, f"choice {choice['index']} got a chunk after its finish_reason")
                r.tokens += _choice_logprob_tokens(choice)
                r.finish_reason = choice.get("finish_reason")
            usage = chunk.get("usage") or usage
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            stats.violation(case, f"malformed SSE event ({type(e).__name__}: {e}): {data[:200]!r}")
            return True
        events += 1
        if case.cut_after is not None and events >= case.cut_after:
            return False
    if not done:
        stats.violation(case, "stream ended without data: [DONE]")
        return True
    wants_usage = bool((case.body.get("stream_options") or {}).get("include_usage"))
    if wants_usage and usage is None:
        stats.violation(case, "stream_options.include_usage but no usage chunk")
    elif not wants_usage and usage is not None:
        stats.violation(case, "a usage chunk nobody asked for")
    check_length(case, results, usage, stats)
    return True


async def run_case(client: httpx.AsyncClient, case: Case, timeout_s: float, stats: Stats) -> None:
    """Send one case and check its answer. Never raises (but for cancellation of the soak)."""
    kwargs: dict[str, Any] = {"headers": case.headers,
                              "timeout": BAD_TIMEOUT_S if case.expect_status != 200 else timeout_s}
    if case.raw is not None:
        kwargs["content"], kwargs["headers"] = case.raw, {**case.headers, "Content-Type": "application/json"}
    elif case.body is not None and case.method == "POST":
        kwargs["json"] = case.body
    try:
        if case.stream:
            async with client.stream(case.method, case.path, **kwargs) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                if check_status(case, resp, stats) and not await read_stream(case, resp, stats):
                    stats.record(case, "disconnected")
            return
        request = client.request(case.method, case.path, **kwargs)
        if case.cut_after is not None:
            try:
                resp = await asyncio.wait_for(request, case.cut_after)
            except TimeoutError:  # our own abort: the server should drop the request
                stats.record(case, "cancelled")
                return
        else:
            resp = await request
        if check_status(case, resp, stats):
            check_whole(case, resp, stats)
    except httpx.TimeoutException as e:
        stats.record(case, "timeout")
        stats.violation(case, f"expected HTTP {case.expect_status}, got no answer within {kwargs['timeout']} s "
                              f"({type(e).__name__})")
    except httpx.HTTPError as e:
        stats.record(case, "transport-error")
        stats.violation(case, f"{type(e).__name__}: {e}")


# ---- the server's state: metrics and memory ----------------------------------------------------

IDLE_METRICS = ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting")


def parse_metrics(text: str) -> dict[str, float]:
    """tokenmill:<name> samples, summed over label sets."""
    values: dict[str, float] = {}
    for m in re.finditer(r"^tokenmill:(\w+)(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE):
        values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(2))
    return values


async def wait_idle(client: httpx.AsyncClient, timeout_s: float) -> tuple[bool, dict[str, float | None]]:
    """Poll /metrics until nothing runs, waits or holds KV blocks. (idle, the last values)."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, float | None] = dict.fromkeys(IDLE_METRICS)
    while True:
        try:
            values = parse_metrics((await client.get("/metrics", timeout=10)).text)
            last = {name: values.get(name) for name in IDLE_METRICS}
            if all(v == 0 for v in last.values()):
                return True, last
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            return False, last
        await asyncio.sleep(0.5)


def read_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def listening_pid(port: int) -> int | None:
    """The process with a socket listening on `port`, found through /proc (Linux, same user)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:
            continue  # gone, or not ours to look at
    return None


@dataclass
class RssSampler:
    """The server's VmRSS about once a second, as (seconds since start, KiB)."""

    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)

    async def run(self, t0: float, interval_s: float = 1.0) -> None:
        while (rss := read_rss_kib(self.pid)) is not None:
            self.samples.append((time.monotonic() - t0, rss))
            await asyncio.sleep(interval_s)

    def at(self, t: float) -> int | None:
        later = [rss for ts, rss in self.samples if ts >= t]
        return later[0] if later else None


# ---- the run -----------------------------------------------------------------------------------

@dataclass
class SoakConfig:
    url: str = "http://127.0.0.1:8000"
    duration_s: float = 60.0
    concurrency: int = 8
    seed: int = 0
    pid: int | None = None
    api_key: str | None = None
    request_timeout_s: float = 120.0
    exclude: tuple[str, ...] = ()


@dataclass
class SoakReport:
    config: dict
    model: str
    elapsed_s: float
    outcomes: dict[str, dict[str, int]]
    prompt_tokens: int
    completion_tokens: int
    overloads: int
    idle: bool
    idle_metrics: dict[str, float | None]
    rss_kib: dict[str, int | None]  # start, mid, end
    rss_growth: float | None  # end over mid, second half of the run
    memory_note: str | None
    violations: list[dict]

    @property
    def ok(self) -> bool:
        return not self.violations


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def run_soak(cfg: SoakConfig) -> SoakReport:
    parts = urlsplit(cfg.url)
    if not (parts.hostname and _is_loopback(parts.hostname)):
        raise ValueError(f"--url must be a loopback server (its memory is read from /proc), got {cfg.url}")
    base = cfg.url.rstrip("/")
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    card = (await list_models(base, cfg.api_key))[0]
    model, max_model_len = card["id"], int(card.get("max_model_len") or 1024)
    bad = BadDeck([c for c in bad_cases(model, max_model_len, cfg.api_key) if not c.kind.startswith(cfg.exclude)],
                  cfg.seed)

    pid, memory_note = cfg.pid, None
    if pid is None:
        pid = listening_pid(parts.port or 80)
        if pid is None:
            memory_note = f"no process found listening on port {parts.port}: memory not checked (pass --pid)"
    sampler = RssSampler(pid) if pid is not None else None

    stats = Stats()
    # Keep-alive connections expire before uvicorn's 5 s idle timeout, so a pooled connection the
    # server is closing is never reused (that race would look like a server fault).
    limits = httpx.Limits(max_connections=cfg.concurrency + 1, max_keepalive_connections=cfg.concurrency,
                          keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits) as client:
        t0 = time.monotonic()
        deadline = t0 + cfg.duration_s
        sampling = asyncio.ensure_future(sampler.run(t0)) if sampler else None

        async def worker(index: int) -> None:
            rng = random.Random(cfg.seed * 1_000_003 + index)  # per worker: timing does not change the draws
            while time.monotonic() < deadline and len(stats.violations) < MAX_VIOLATIONS:
                case = draw_case(rng, model, bad, cfg.exclude)
                await run_case(client, case, cfg.request_timeout_s, stats)

        await asyncio.gather(*(worker(i) for i in range(cfg.concurrency)))  # in-flight requests end here
        idle, idle_metrics = await wait_idle(client, IDLE_TIMEOUT_S)
        if sampling:
            sampling.cancel()
        elapsed = time.monotonic() - t0

    if len(stats.violations) >= MAX_VIOLATIONS:
        stats.violation(None, f"stopped early after {MAX_VIOLATIONS} violations")
    if not idle:
        stats.violation(None, f"server not idle {IDLE_TIMEOUT_S:.0f} s after the run: {idle_metrics}")

    rss: dict[str, int | None] = {"start": None, "mid": None, "end": None}
    growth = None
    if sampler:
        end = read_rss_kib(sampler.pid)
        rss = {"start": sampler.samples[0][1] if sampler.samples else None,
               "mid": sampler.at(cfg.duration_s / 2), "end": end}
        if end is None:
            stats.violation(None, f"server process {sampler.pid} is gone")
        elif rss["mid"] is None:
            memory_note = "no memory sample at the midpoint: memory not checked"
        else:
            growth = end / rss["mid"] - 1
            if growth >= RSS_GROWTH_LIMIT:
                stats.violation(None, f"resident memory grew {growth:.1%} over the second half "
                                      f"({rss['mid']} -> {end} KiB), limit {RSS_GROWTH_LIMIT:.0%}")

    outcomes: dict[str, dict[str, int]] = {}
    for (kind, outcome), count in sorted(stats.outcomes.items()):
        outcomes.setdefault(kind, {})[outcome] = count
    config = {**asdict(cfg), "api_key": "<set>" if cfg.api_key else None}  # no secrets in reports
    return SoakReport(config=config, model=model, elapsed_s=elapsed, outcomes=outcomes,
                      prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                      overloads=stats.overloads, idle=idle, idle_metrics=idle_metrics, rss_kib=rss,
                      rss_growth=growth, memory_note=memory_note, violations=stats.violations)


def format_report(report: SoakReport) -> str:
    lines = [(f"soak: {report.elapsed_s:.0f} s against {report.config['url']} ({report.model}), "
              f"concurrency {report.config['concurrency']}, seed {report.config['seed']}"), ""]
    width = max([len(k) for k in report.outcomes] + [4])
    total: Counter = Counter()
    for kind, outcomes in report.outcomes.items():
        total.update(outcomes)
        lines.append(f"  {kind:<{width}}  " + "  ".join(f"{o}: {n}" for o, n in outcomes.items()))
    lines.append(f"  {'all':<{width}}  " + "  ".join(f"{o}: {n}" for o, n in sorted(total.items())))
    lines += ["", (f"tokens: {report.prompt_tokens} prompt, {report.completion_tokens} generated (in checked "
                   f"answers); overload answers: {report.overloads}"),
              f"idle after the run: {report.idle} {report.idle_metrics}"]
    r = report.rss_kib
    growth = "n/a" if report.rss_growth is None else f"{report.rss_growth:+.2%}"
    lines.append(f"server RSS (KiB): start {r['start']}, mid {r['mid']}, end {r['end']}; second-half growth {growth}")
    if report.memory_note:
        lines.append(f"note: {report.memory_note}")
    lines.append("")
    if report.ok:
        lines.append("no violations")
    else:
        by_problem = Counter(v["kind"] for v in report.violations)
        kinds = ", ".join(f"{k} {n}" for k, n in by_problem.most_common())
        lines.append(f"{len(report.violations)} violations by kind: {kinds}")
        for v in report.violations[:SHOWN_VIOLATIONS]:
            lines.append(f"  [{v['kind']}] {v['problem']}\n      request: {v['request']}")
        if len(report.violations) > SHOWN_VIOLATIONS:
            lines.append(f"  ... and {len(report.violations) - SHOWN_VIOLATIONS} more (see --json)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=SoakConfig.url, help="server base URL, loopback only (default: %(default)s)")
    p.add_argument("--duration", type=float, default=SoakConfig.duration_s,
                   help="seconds of traffic (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=SoakConfig.concurrency, help="workers (default: %(default)s)")
    p.add_argument("--seed", type=int, default=SoakConfig.seed, help="seed of the request mix (default: %(default)s)")
    p.add_argument("--pid", type=int, default=None,
                   help="server process whose memory to watch (default: the one listening on the URL's port)")
    p.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    p.add_argument("--request-timeout", type=float, default=SoakConfig.request_timeout_s,
                   help="seconds a good request may take (default: %(default)s)")
    p.add_argument("--exclude", default="", help="comma-separated case kinds (prefixes) to leave out, "
                                                 "e.g. bad/huge_n,abort")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    """0 when every check holds, 1 on a violation."""
    args = build_parser().parse_args(argv)
    cfg = SoakConfig(url=args.url, duration_s=args.duration, concurrency=args.concurrency, seed=args.seed,
                     pid=args.pid, api_key=args.api_key, request_timeout_s=args.request_timeout,
                     exclude=tuple(k for k in args.exclude.split(",") if k))
    try:
        report = asyncio.run(run_soak(cfg))
    except (ValueError, httpx.HTTPError) as e:
        print(f"soak: cannot run: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json:
        save_json(args.json, {**asdict(report), "ok": report.ok})
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
