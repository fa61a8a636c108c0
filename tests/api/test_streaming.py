"""Streaming exactly as OpenAI frames it, checked on the raw SSE bytes and through the SDK."""
from __future__ import annotations

import json
import logging

import httpx
from api_helpers import scrape, wait_until

CHAT = {"messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 0, "max_tokens": 8}


def sse_events(http: httpx.Client, path: str, body: dict) -> tuple[httpx.Response, list]:
    """The `data:` payloads of a stream, in order; [DONE] stays a string."""
    with http.stream("POST", path, json=body) as resp:
        raw = resp.read().decode()
    assert raw.endswith("\n\n")
    events = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, f"not one data line: {block!r}"
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return resp, events


def test_chat_stream_framing(http):
    resp, events = sse_events(http, "/v1/chat/completions",
                              {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["system_fingerprint"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    body = chunks[:-1]
    assert [c["choices"][0]["finish_reason"] for c in body][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in body[:-1])
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert all(c["usage"] is None for c in body)


def test_streamed_text_equals_non_streamed(http, client, model_name):
    whole = http.post("/v1/chat/completions", json=CHAT).json()
    _, events = sse_events(http, "/v1/chat/completions", {**CHAT, "stream": True})
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1])
    assert streamed == whole["choices"][0]["message"]["content"]
    # The same through the SDK, for completions with two prompts and logprobs.
    kw = dict(model=model_name, prompt=["Once upon a time", "The sky is"], temperature=0, max_tokens=8, logprobs=2)
    want = client.completions.create(**kw)
    text, tokens = {0: "", 1: ""}, {0: [], 1: []}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text[c.index] += c.text
            tokens[c.index] += c.logprobs.tokens
    for c in want.choices:
        assert text[c.index] == c.text and tokens[c.index] == c.logprobs.tokens


def test_completion_stream_usage_and_continuous_usage(http):
    _, events = sse_events(http, "/v1/completions", {
        "prompt": "Hello", "max_tokens": 4, "stream": True, "echo": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    chunks = events[:-1]
    assert chunks[0]["object"] == "text_completion" and chunks[0]["id"].startswith("cmpl-")
    assert chunks[0]["choices"][0]["text"].startswith("Hello")  # echo comes with the first chunk
    counts = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert counts == sorted(counts) and counts[-1] == 4
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["total_tokens"] == usage["prompt_tokens"] + 4


def test_n_streams_each_choice_open_and_close(http):
    _, events = sse_events(http, "/v1/chat/completions", {**CHAT, "n": 2, "stream": True, "temperature": 1, "seed": 5})
    chunks = events[:-1]
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert mine[-1]["finish_reason"] is not None


def test_disconnected_stream_is_aborted_and_frees_its_blocks(http, server):
    aborted = scrape(http, "request_success_total", 'finished_reason="abort"', default=0)
    body = {"prompt": "Write a long essay.", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as own:
        with own.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            assert scrape(http, "kv_cache_usage_perc") > 0 and scrape(http, "num_requests_running") == 1
        # leaving the block closes the connection mid-stream
    assert wait_until(lambda: scrape(http, "num_requests_running") == 0 and scrape(http, "kv_cache_usage_perc") == 0)
    assert scrape(http, "request_success_total", 'finished_reason="abort"') == aborted + 1


def test_client_timeout_on_a_non_streamed_request_aborts_it(http, server, caplog):
    caplog.set_level(logging.INFO, logger="tokenmill")
    body = {"prompt": "Write a long essay.", "max_tokens": 1500, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=1.5) as own:
        try:
            own.post("/v1/completions", json=body)
            raise AssertionError("1500 tokens should take longer than the 1.5 s timeout")
        except httpx.TimeoutException:
            pass
    assert wait_until(lambda: scrape(http, "num_requests_running") == 0 and scrape(http, "kv_cache_usage_perc") == 0)
    assert any(r.name == "tokenmill.access" and "(abort)" in r.getMessage() for r in caplog.records)
    assert not any("internal error" in r.getMessage() for r in caplog.records)  # a hang-up is not a bug
