"""Bounds on what a client may ask (400s naming the field and the limit), tokenization off the engine
thread, and SSE streams that survive proxies: keep-alive pings and prompt disconnect detection."""
from __future__ import annotations

import json
import threading

import httpx
import pytest
from api_helpers import ServerThread, scrape, wait_until

from tokenmill.api.server import build_app

CHAT = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "Hello", "max_tokens": 2}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "n": 100000}, "n"),
    ("/v1/completions", {**COMPLETION, "stop": [f"s{i}" for i in range(17)]}, "stop"),
    ("/v1/completions", {**COMPLETION, "stop": ["x" * 300]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {str(i): 1 for i in range(2000)}}, "logit_bias"),
    ("/v1/completions", {**COMPLETION, "stop_token_ids": list(range(300))}, "stop_token_ids"),
    ("/v1/completions", {**COMPLETION, "prompt": ["a"] * 300}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [1] * 2048}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": "word " * 300000}, "prompt"),
], ids=["n", "stop-count", "stop-length", "logit-bias", "stop-token-ids", "prompts", "context", "prompt-chars"])
def test_over_a_limit_is_a_400_naming_the_field_and_the_limit(http, path, body, param):
    resp = http.post(path, json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert "limit" in error["message"] or "context" in error["message"]


def test_the_engine_thread_never_tokenizes_or_renders_templates(http, engine, monkeypatch):
    tok = engine.tokenizer
    threads: list[str] = []

    def recording(fn):
        def wrapper(*args, **kwargs):
            threads.append(threading.current_thread().name)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(tok, "encode", recording(tok.encode))
    monkeypatch.setattr(tok, "apply_chat_template", recording(tok.apply_chat_template))
    assert http.post("/v1/completions", json=COMPLETION).status_code == 200
    assert http.post("/v1/completions", json={**COMPLETION, "prompt": ["one", "two"]}).status_code == 200
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert http.post("/tokenize", json={"prompt": "x"}).status_code == 200
    assert len(threads) >= 5
    assert all(name.startswith("tokenmill-tokenize") for name in threads), threads


@pytest.fixture(scope="module")
def pinging_server(engine, server):
    """A second app over the session's engine that pings idle streams every 50 ms."""
    with ServerThread(build_app(engine, owns_engine=False, sse_ping_s=0.05)) as s:
        yield s


def test_streams_carry_keep_alive_pings_and_stay_well_formed(pinging_server):
    body = {"prompt": "Count to ten:", "max_tokens": 24, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=pinging_server.url, timeout=120) as http, \
            http.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert any(line.startswith(": ping") for line in lines)
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_client_that_hangs_up_mid_stream_is_aborted_promptly(pinging_server, http):
    body = {"prompt": "Count to a thousand:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=pinging_server.url, timeout=120) as c, \
            c.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    assert wait_until(lambda: scrape(http, "num_requests_running") == 0 and scrape(http, "kv_cache_usage_perc") == 0,
                      timeout=20)
    assert scrape(http, "request_success_total", 'finished_reason="abort"') >= 1


def test_a_request_that_fails_in_the_engine_is_a_500_naming_it_and_harms_no_other(http, engine, monkeypatch):
    from tokenmill.engine.faults import FaultInjector

    good = {"prompt": "The weather today", "temperature": 0, "max_tokens": 16, "ignore_eos": True}
    want = http.post("/v1/completions", json=good).json()["choices"][0]["text"]
    monkeypatch.setattr(engine.engine, "faults", FaultInjector(request_marker="FAULTY"))
    result = {}
    worker = threading.Thread(target=lambda: result.update(good=http.post("/v1/completions", json=good)))
    worker.start()
    bad = http.post("/v1/completions", json={"prompt": "FAULTY input", "max_tokens": 16})
    with http.stream("POST", "/v1/chat/completions",
                     json={"messages": [{"role": "user", "content": "FAULTY"}], "stream": True}) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    worker.join()
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["type"] == "server_error" and "request cmpl-" in error["message"] and "failed" in error["message"]
    assert events[-1] == "[DONE]" and "request chatcmpl-" in json.loads(events[-2])["error"]["message"]
    assert result["good"].status_code == 200 and result["good"].json()["choices"][0]["text"] == want
    assert wait_until(lambda: scrape(http, "num_requests_running") == 0 and scrape(http, "kv_cache_usage_perc") == 0)
    assert http.get("/health").status_code == 200


def test_sse_data_is_one_line_for_every_line_reader():
    # Found by the 30-minute soak: generated text with U+2028 split an event for httpx's iter_lines.
    from tokenmill.api.protocol import CompletionChoice
    from tokenmill.api.serving import sse_json

    text = "a\u2028b\x85c\u2029d\ne\rf"
    data = sse_json(CompletionChoice(index=0, text=text))
    assert len(data.splitlines()) == 1 and json.loads(data)["text"] == text
