"""`tokenmill serve --log-format json --otlp-traces-endpoint URL`, as a user runs it: every line it logs, from
the API and the engine process, is one JSON object; each request has one access line with its fields and
one span whose engine timings came from the engine process; prompts and outputs appear in neither unless
--log-prompts is given (tested on an app in this process)."""
from __future__ import annotations

import json
import logging
import signal

import httpx
import pytest
from api_helpers import ServeProcess, ServerThread, wait_until

from benchmarks.otlp_sink import OTLPSink
from tokenmill.api.access_log import AccessLog
from tokenmill.api.server import build_app

SECRET = "zebra-umbrella-quasar"  # a prompt word that must not reach the log


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Requests against a JSON-logging, traced server, then SIGTERM; the parsed log lines, the spans, and
    the replies."""
    with OTLPSink() as sink:
        args = ["--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-model-len", "512", "--served-model-name",
                "tm-json", "--log-format", "json", "--otlp-traces-endpoint", sink.endpoint]
        with ServeProcess(args, tmp_path_factory.mktemp("json-log") / "server.log") as server:
            c = server.client
            chat = c.post("/v1/chat/completions", headers={"x-forwarded-for": "10.0.0.9"},
                          json={"messages": [{"role": "user", "content": f"Say {SECRET}"}], "max_tokens": 5}).json()
            with c.stream("POST", "/v1/completions", json={"prompt": SECRET, "max_tokens": 3, "stream": True}) as r:
                streamed = [line for line in r.iter_lines() if line.startswith("data: {")]
            bad = c.post("/v1/completions", json={"prompt": "x", "temperature": -3})
            missing = c.get("/v1/nothing-here")
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(60) == 0
            text = server.log()
        spans = sink.spans()
    yield {"text": text, "spans": spans, "chat": chat, "stream_id": json.loads(streamed[0][6:])["id"],
           "bad": bad, "missing": missing}


def lines(run) -> list[dict]:
    out = []
    for raw in run["text"].splitlines():
        if raw.strip():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                raise AssertionError(f"not a JSON log line: {raw!r}") from None
    return out


def access(run, request_id: str) -> dict:
    found = [line for line in lines(run) if line["logger"] == "tokenmill.access" and line["request_id"] == request_id]
    assert len(found) == 1, f"{len(found)} access lines for {request_id}"
    return found[0]


def test_every_line_of_every_process_is_json(run):
    parsed = lines(run)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in parsed)
    assert any(line.get("process") == "engine" for line in parsed), "no line from the engine process"
    assert any(line["logger"].startswith("uvicorn") for line in parsed), "uvicorn's own lines are missing"


def test_a_request_has_one_access_line_with_its_fields(run):
    chat = run["chat"]
    line = access(run, chat["id"])
    assert (line["model"], line["method"], line["route"], line["status"]) == ("tm-json", "POST",
                                                                               "/v1/chat/completions", 200)
    assert line["prompt_tokens"] == chat["usage"]["prompt_tokens"]
    assert line["output_tokens"] == chat["usage"]["completion_tokens"]
    assert line["finish_reason"] == chat["choices"][0]["finish_reason"]
    # uvicorn takes the client from X-Forwarded-For when the peer is a trusted proxy (loopback by default)
    assert line["client"] == "10.0.0.9" and line["level"] == "INFO"
    assert 0 <= line["queue_time"] <= line["ttft"] <= line["duration"]
    streamed = access(run, run["stream_id"])
    assert streamed["output_tokens"] == 3 and streamed["finish_reason"] == "length"
    assert streamed["route"] == "/v1/completions"


def test_rejected_and_unknown_requests_are_logged_with_their_status(run):
    assert run["bad"].status_code == 400 and run["missing"].status_code == 404
    statuses = {(line["route"], line["status"]) for line in lines(run)
                if line["logger"] == "tokenmill.access" and "route" in line}
    assert ("/v1/completions", 400) in statuses
    unknown = [line for line in lines(run) if line.get("path") == "/v1/nothing-here"]
    assert len(unknown) == 1 and unknown[0]["status"] == 404 and "route" not in unknown[0]


def test_prompts_and_outputs_are_not_logged_by_default(run):
    assert SECRET not in run["text"]
    assert not any("prompt" in line or "output" in line for line in lines(run))


def test_the_span_carries_the_engine_processs_timings_and_the_log_its_trace_id(run):
    chat = run["chat"]
    spans = [s for s in run["spans"] if s.attributes.get("tokenmill.request_id") == chat["id"]]
    assert len(spans) == 1
    a = spans[0].attributes
    assert a["gen_ai.usage.input_tokens"] == chat["usage"]["prompt_tokens"]
    assert a["gen_ai.latency.time_in_model_prefill"] > 0 and a["gen_ai.latency.time_in_model_decode"] > 0
    assert access(run, chat["id"])["trace_id"] == spans[0].trace_id


def test_log_prompts_puts_the_prompt_and_output_in_the_access_line(engine, server, caplog):
    caplog.set_level(logging.INFO, logger="tokenmill.access")
    with ServerThread(build_app(engine, served_model_name="tm-prompts", owns_engine=False,
                                access_log=AccessLog(log_prompts=True))) as s:
        reply = httpx.post(s.url + "/v1/completions", timeout=60,
                           json={"prompt": f"Repeat {SECRET}", "max_tokens": 4, "n": 2, "seed": 3}).json()
        assert wait_until(lambda: any(getattr(r, "request_id", None) == reply["id"] for r in caplog.records), 5)
    record = next(r for r in caplog.records if getattr(r, "request_id", None) == reply["id"])
    assert record.prompt == [f"Repeat {SECRET}"]
    assert sorted(record.output) == sorted(choice["text"] for choice in reply["choices"])
    assert SECRET in record.getMessage()
