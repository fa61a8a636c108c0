"""OpenTelemetry traces (`--otlp-traces-endpoint`): one server span per HTTP request, exported over OTLP/HTTP
(protobuf), a child of the caller's W3C `traceparent` when it sends one. A generation request's span carries
the GenAI semantic conventions' attributes, and the engine's timings under vLLM's gen_ai.latency.* names.
The OpenTelemetry SDK is an optional extra: `pip install 'tokenmill[otel]'`."""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from .observe import RequestRecord

OTEL_MISSING = "--otlp-traces-endpoint needs the OpenTelemetry SDK and its OTLP/HTTP exporter: " \
               "pip install 'tokenmill[otel]'"


def traces_url(endpoint: str) -> str:
    """The URL spans are POSTed to: a bare collector address (http://host:4318) gets OTLP's /v1/traces path,
    as OTEL_EXPORTER_OTLP_ENDPOINT does; a URL with a path is used as it is."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--otlp-traces-endpoint: {endpoint!r} is not an http(s) URL, e.g. http://127.0.0.1:4318")
    return endpoint if parts.path.strip("/") else endpoint.rstrip("/") + "/v1/traces"


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class RequestTracer:
    """Starts and ends the request spans; sampling_ratio of new traces are kept (ParentBased: a caller's
    decision, in its traceparent's flags, is followed)."""

    def __init__(self, endpoint: str, sampling_ratio: float = 1.0, service_name: str = "tokenmill"):
        if not 0.0 <= sampling_ratio <= 1.0:
            raise ValueError(f"--otlp-traces-sampling-ratio must be between 0 and 1, not {sampling_ratio}")
        url = traces_url(endpoint)
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace import SpanKind, Status, StatusCode
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as e:
            raise ValueError(f"{OTEL_MISSING} ({e})") from None
        # A provider of our own rather than the global one: two apps in one process (tests) stay apart.
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}),
                                       sampler=ParentBased(TraceIdRatioBased(sampling_ratio)))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        self.tracer = self.provider.get_tracer("tokenmill")
        self.propagator = TraceContextTextMapPropagator()
        self._server, self._status = SpanKind.SERVER, (Status, StatusCode)

    def start(self, record: RequestRecord, headers: dict[str, str]) -> Any:
        """The request's span, begun at its arrival; its trace id goes on the record (and so in the log)."""
        parent = self.propagator.extract(headers)
        span = self.tracer.start_span(f"{record.method} {record.path}", context=parent, kind=self._server,
                                      start_time=_ns(record.start))
        ctx = span.get_span_context()
        if ctx.trace_flags.sampled:
            record.trace_id = format(ctx.trace_id, "032x")
        return span

    def end(self, span: Any, r: RequestRecord) -> None:
        if not span.is_recording():
            return
        attributes: dict[str, Any] = {"http.request.method": r.method, "url.path": r.path,
                                      "http.response.status_code": r.status or 0, "tokenmill.request_id": r.request_id}
        if r.route:
            attributes["http.route"] = r.route
            span.update_name(f"{r.method} {r.route}")
        if r.client:
            attributes["client.address"] = r.client
        if r.model:
            attributes["gen_ai.request.model"] = r.model
            attributes["gen_ai.response.model"] = r.model
            if r.version:
                attributes["tokenmill.model_version"] = r.version
        if r.num_engine_requests:
            operation = r.operation or "chat"
            span.update_name(f"{operation} {r.model}")
            attributes.update({"gen_ai.operation.name": operation, "gen_ai.response.id": r.request_id,
                               "gen_ai.usage.input_tokens": r.prompt_tokens,
                               "gen_ai.usage.output_tokens": r.output_tokens,
                               "gen_ai.response.finish_reasons": r.finish_reasons})
            for key, name in (("max_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                              ("n", "choice.count")):
                if r.params.get(key) is not None:
                    attributes[f"gen_ai.request.{name}"] = r.params[key]
            t = r.times
            for name, value in (("time_in_queue", t.queue_time), ("time_to_first_token", t.time_to_first_token),
                                ("time_in_model_prefill", t.prefill_time), ("time_in_model_decode", t.decode_time),
                                ("time_in_model_inference", t.inference_time), ("e2e", t.e2e_time)):
                if value is not None:
                    attributes[f"gen_ai.latency.{name}"] = value
        span.set_attributes(attributes)
        if r.status is None or r.status >= 500:
            status, code = self._status
            span.set_status(status(code.ERROR, f"HTTP {r.status}" if r.status else "no response"))
        span.end(end_time=_ns(r.end or r.start))

    def shutdown(self) -> None:
        """Export the spans still queued, then stop."""
        self.provider.shutdown()
