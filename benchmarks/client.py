"""Streaming OpenAI-compatible client that times each request, and the arrival schedule.

Works against any server speaking /v1/completions or /v1/chat/completions with SSE
streaming (tokenmill, vLLM, SGLang, llama.cpp's llama-server, ...).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from benchmarks.datasets import BenchRequest
from benchmarks.metrics import RequestResult, inter_token_latencies

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")

TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class Target:
    base_url: str  # e.g. http://127.0.0.1:8000 (without /v1)
    endpoint: str  # one of ENDPOINTS
    model: str
    api_key: str | None = None
    timeout_s: float = 3600.0

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def build_payload(target: Target, req: BenchRequest) -> dict:
    """The JSON body for one request.

    `ignore_eos` makes the server generate exactly max_tokens, so output lengths follow
    the dataset rather than the model's whims; vLLM, SGLang and llama-server all read
    it, and OpenAI-compatible servers ignore unknown fields. Greedy sampling keeps runs
    repeatable.
    """
    body: dict = {
        "model": target.model,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if target.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def chunk_text(chunk: dict) -> str:
    """Generated text carried by one streamed chunk (completions or chat delta)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice["text"] or ""
    delta = choice.get("delta") or {}
    # Reasoning models stream their thinking separately; it is output all the same.
    return (delta.get("reasoning_content") or "") + (delta.get("content") or "")


async def _sse_events(response: httpx.Response) -> AsyncIterator[dict]:
    async for line in response.aiter_lines():
        line = line.strip()
        if not line.startswith("data:"):
            continue  # blank separators, SSE comments (keep-alive pings), event: lines
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


async def send_request(
    client: httpx.AsyncClient,
    target: Target,
    req: BenchRequest,
    count_tokens: TokenCounter | None = None,
    start_offset: float = 0.0,
) -> RequestResult:
    """Send one streaming request and time it. Never raises: failures are results."""
    url = target.base_url.rstrip("/") + target.endpoint
    payload = build_payload(target, req)
    chunk_times: list[float] = []
    text_parts: list[str] = []
    usage: dict | None = None
    st = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload, headers=target.headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                return RequestResult(False, f"HTTP {resp.status_code}: {body[:300]}", start=start_offset)
            async for chunk in _sse_events(resp):
                if "error" in chunk:
                    return RequestResult(False, f"stream error: {json.dumps(chunk['error'])[:300]}",
                                         start=start_offset)
                text = chunk_text(chunk)
                if text:
                    chunk_times.append(time.perf_counter())
                    text_parts.append(text)
                # Servers may send usage (or usage: null) on several chunks; the last wins.
                if chunk.get("usage"):
                    usage = chunk["usage"]
        end = time.perf_counter()
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        return RequestResult(False, f"{type(e).__name__}: {e}"[:300], start=start_offset)

    if not chunk_times:
        return RequestResult(False, "no content received", start=start_offset)
    if usage and usage.get("completion_tokens") is not None:
        prompt_tokens, output_tokens, source = usage.get("prompt_tokens", 0), usage["completion_tokens"], "usage"
    elif count_tokens is not None:
        # Chat prompts: counts the user text only, not the template around it.
        prompt_tokens, output_tokens, source = count_tokens(req.prompt), count_tokens("".join(text_parts)), "tokenizer"
    else:
        return RequestResult(False, "server sent no usage and no --tokenizer was given to count tokens",
                             start=start_offset)
    return RequestResult(
        success=True,
        ttft=chunk_times[0] - st,
        itl=inter_token_latencies(chunk_times),
        e2e=end - st,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        start=start_offset,
        token_source=source,
    )


def arrival_delays(n: int, request_rate: float, seed: int) -> list[float]:
    """Gaps before each of n requests: exponential (a Poisson process) at request_rate
    per second, all zero for an infinite rate (everything sent at once). The first gap
    is zero so the benchmark clock starts with the first send."""
    if request_rate <= 0:
        raise ValueError(f"request rate must be positive, got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [0.0] + [rng.expovariate(request_rate) for _ in range(n - 1)] if n else []


def make_client(max_concurrency: int | None, timeout_s: float) -> httpx.AsyncClient:
    # No pool limit/timeout: the benchmark, not the HTTP pool, decides how many requests
    # are in flight; a pool timeout would turn queueing into spurious failures.
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s, pool=None))


async def run_requests(
    target: Target,
    requests: Sequence[BenchRequest],
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    seed: int = 0,
    count_tokens: TokenCounter | None = None,
    progress: bool = True,
    desc: str = "",
) -> tuple[list[RequestResult], float]:
    """Send `requests` with Poisson arrivals and at most `max_concurrency` in flight.

    Returns results in dataset order and the wall time from the first send to the last
    completion. A request's clock starts when it is sent, after waiting for a slot.
    """
    delays = arrival_delays(len(requests), request_rate, seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), desc=desc or None, disable=not progress, leave=False)

    async with make_client(max_concurrency, target.timeout_s) as client:
        t0 = time.perf_counter()

        async def one(req: BenchRequest) -> RequestResult:
            if sem is None:
                result = await send_request(client, target, req, count_tokens, time.perf_counter() - t0)
            else:
                async with sem:
                    result = await send_request(client, target, req, count_tokens, time.perf_counter() - t0)
            bar.update(1)
            return result

        tasks = []
        for req, delay in zip(requests, delays, strict=False):
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t0
    bar.close()
    return results, duration


async def list_models(base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> list[dict]:
    """The server's /v1/models entries."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        resp = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers)
        resp.raise_for_status()
        return resp.json().get("data", [])
