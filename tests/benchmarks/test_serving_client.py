"""How the client reads OpenAI-style SSE streams: token counts and failures.

Canned byte streams in the OpenAI wire format exercise the parsing paths a real server
may or may not take (no usage chunk, HTTP errors, in-stream errors); the end-to-end
behaviour against a real server is in test_serving_e2e.py.
"""

import asyncio
import json

import httpx

from benchmarks.client import Target, send_request
from benchmarks.datasets import BenchRequest

TARGET = Target("http://server", "/v1/completions", "m")
REQ = BenchRequest("one two three", 3)


def _sse(*chunks: dict) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def _send(status: int, body: bytes, count_tokens=None):
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))

    async def go():
        async with httpx.AsyncClient(transport=transport) as client:
            return await send_request(client, TARGET, REQ, count_tokens)

    return asyncio.run(go())


def _count_words(text: str) -> int:  # a stand-in tokenizer
    return len(text.split())


TEXT = [{"choices": [{"text": t}]} for t in ("a", "b", "", "c")]


def test_usage_chunk_gives_the_token_counts():
    r = _send(200, _sse(*TEXT, {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}))
    assert r.success and (r.prompt_tokens, r.output_tokens, r.token_source) == (5, 3, "usage")
    assert len(r.itl) == 2  # three content chunks; the empty one is not a token
    assert 0 <= r.ttft <= r.e2e


def test_without_usage_the_tokenizer_counts_and_without_it_the_request_fails():
    r = _send(200, _sse({"choices": [{"text": "x y"}]}, {"choices": [{"text": " z"}]}), _count_words)
    assert r.success and (r.prompt_tokens, r.output_tokens, r.token_source) == (3, 3, "tokenizer")
    r = _send(200, _sse(*TEXT))
    assert not r.success and "no usage" in r.error


def test_failures_are_results_with_their_errors():
    r = _send(503, b'{"error": "loading"}')
    assert not r.success and r.error.startswith("HTTP 503") and "loading" in r.error
    r = _send(200, _sse({"error": {"message": "context too long"}}))
    assert not r.success and "context too long" in r.error
    r = _send(200, _sse({"choices": [{"text": ""}]}))
    assert not r.success and r.error == "no content received"
