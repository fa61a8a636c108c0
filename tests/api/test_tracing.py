"""OpenTelemetry request spans, received by a real OTLP/HTTP receiver that decodes the protobuf exports.

The apps here serve the session's engine; tests/api/test_observability_cli.py follows a request across the
API and engine processes of `tokenmill serve`.
"""
from __future__ import annotations

import sys

import httpx
import openai
import pytest
from api_helpers import ServerThread, wait_until

from benchmarks.otlp_sink import OTLPSink, Span
from tokenmill.api.cli import main
from tokenmill.api.server import build_app
from tokenmill.api.tracing import RequestTracer, traces_url

PARENT_TRACE, PARENT_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def sink():
    with OTLPSink() as s:
        yield s


def _traced_app(engine, tracer: RequestTracer) -> ServerThread:
    return ServerThread(build_app(engine, served_model_name="tm-traced", owns_engine=False, tracer=tracer))


@pytest.fixture(scope="module")
def traced(engine, server, sink):
    """An app that exports every request's span; the first app owns the engine."""
    tracer = RequestTracer(sink.endpoint)
    with _traced_app(engine, tracer) as s:
        yield s, tracer


def span_of(sink: OTLPSink, tracer: RequestTracer, request_id: str) -> Span:
    """The request's one span (a streamed response's span ends just after the client has read the end)."""
    def found() -> list[Span]:
        tracer.provider.force_flush()
        return [s for s in sink.spans() if s.attributes.get("tokenmill.request_id") == request_id]

    wait_until(found, timeout=5)
    assert len(found()) == 1, f"{len(found())} spans for {request_id}"
    return found()[0]


def test_a_chat_request_is_one_server_span_with_the_genai_attributes_and_engine_timings(traced, sink):
    server, tracer = traced
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="tm-traced", messages=[{"role": "user", "content": "Hi there"}],
                                           max_tokens=6, temperature=0.7, top_p=0.9, seed=1)
    span = span_of(sink, tracer, reply.id)
    a = span.attributes
    assert span.name == "chat tm-traced" and span.kind == 2  # SPAN_KIND_SERVER
    assert span.service_name == "tokenmill" and span.parent_span_id == ""
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == "tm-traced"
    assert (a["gen_ai.request.max_tokens"], a["gen_ai.request.temperature"], a["gen_ai.request.top_p"]) == (6, 0.7, 0.9)
    assert a["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens
    assert a["gen_ai.response.finish_reasons"] == [reply.choices[0].finish_reason]
    assert a["http.route"] == "/v1/chat/completions" and a["http.response.status_code"] == 200
    # The engine's timings add up: queue + prefill = time to first token, that + decode = engine e2e, within
    # the span (which also holds the HTTP work around the engine).
    queue, prefill, ttft = (a[f"gen_ai.latency.{k}"] for k in ("time_in_queue", "time_in_model_prefill",
                                                                 "time_to_first_token"))
    decode, e2e = a["gen_ai.latency.time_in_model_decode"], a["gen_ai.latency.e2e"]
    assert queue + prefill == pytest.approx(ttft, abs=1e-6) and ttft + decode == pytest.approx(e2e, abs=1e-6)
    assert 0 < e2e <= (span.end_ns - span.start_ns) / 1e9 + 1e-3


def test_a_callers_traceparent_makes_the_span_its_child_and_streams_are_traced(traced, sink):
    server, tracer = traced
    headers = {"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"}
    with httpx.stream("POST", server.url + "/v1/completions", headers=headers, timeout=60,
                      json={"model": "tm-traced", "prompt": "One, two,", "max_tokens": 4, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    request_id = httpx.Response(200, content=lines[0][6:]).json()["id"]
    span = span_of(sink, tracer, request_id)
    assert (span.trace_id, span.parent_span_id) == (PARENT_TRACE, PARENT_SPAN)
    assert span.name == "text_completion tm-traced"
    assert span.attributes["gen_ai.usage.output_tokens"] == 4
    assert span.attributes["gen_ai.response.finish_reasons"] == ["length"]


def test_a_rejected_request_has_a_span_with_its_status_and_polling_has_none(traced, sink):
    server, tracer = traced
    r = httpx.post(server.url + "/v1/completions", json={"model": "tm-traced", "prompt": "x", "max_tokens": -1},
                   headers={"x-request-id": "bad-one"})
    assert r.status_code == 400
    span = span_of(sink, tracer, "bad-one")
    assert span.attributes["http.response.status_code"] == 400 and span.name == "POST /v1/completions"
    assert "gen_ai.usage.input_tokens" not in span.attributes
    before = len(sink.spans())
    httpx.get(server.url + "/metrics")
    httpx.get(server.url + "/health")
    tracer.provider.force_flush()
    assert len(sink.spans()) == before


def test_the_sampling_ratio_applies_to_new_traces_and_a_callers_decision_is_followed(engine, server, sink):
    tracer = RequestTracer(sink.endpoint, sampling_ratio=0.0)
    with _traced_app(engine, tracer) as s:
        body = {"model": "tm-traced", "prompt": "x", "max_tokens": 1}
        unsampled = httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()["id"]
        kept = httpx.post(s.url + "/v1/completions", json=body, timeout=60,
                          headers={"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"}).json()["id"]
        dropped = httpx.post(s.url + "/v1/completions", json=body, timeout=60,
                             headers={"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-00"}).json()["id"]
        span_of(sink, tracer, kept)  # the others are never recorded: no wait could make them appear
    ids = {sp.attributes.get("tokenmill.request_id") for sp in sink.spans()}
    assert unsampled not in ids and dropped not in ids


def test_spans_still_queued_are_exported_when_the_server_stops(engine, server, sink):
    tracer = RequestTracer(sink.endpoint)
    with _traced_app(engine, tracer) as s:
        rid = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=60).json()["id"]
    assert wait_until(lambda: any(sp.attributes.get("tokenmill.request_id") == rid for sp in sink.spans()), 10)


def test_bad_endpoints_and_a_missing_sdk_are_clear_errors(monkeypatch, capsys):
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("https://collector/otlp/v1/traces") == "https://collector/otlp/v1/traces"
    assert main(["serve", "--otlp-traces-endpoint", "collector:4318"]) == 2
    assert "not an http(s) URL" in capsys.readouterr().err
    assert main(["serve", "--otlp-traces-endpoint", "http://x:4318", "--otlp-traces-sampling-ratio", "2"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    assert main(["serve", "--otlp-traces-endpoint", "http://127.0.0.1:4318"]) == 2
    assert "pip install 'tokenmill[otel]'" in capsys.readouterr().err
