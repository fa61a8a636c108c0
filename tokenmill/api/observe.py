"""Each HTTP request followed from arrival to its last byte. The middleware opens a RequestRecord, which the
handler fills in as it learns things (the model, the sampling settings, the engine's tokens and timings); when
the response has ended, the record is counted in /metrics, written as the access-log line and closed as
the request's trace span."""
from __future__ import annotations

import contextvars
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenmill.engine.outputs import RequestMetrics, RequestOutput

if TYPE_CHECKING:
    from .access_log import AccessLog
    from .metrics import ServerMetrics
    from .tracing import RequestTracer

# Polled by monitoring, not served to users: no span for them (the access log still has them, at debug level).
UNTRACED_PATHS = frozenset({"/metrics", "/health"})


@dataclass
class RequestRecord:
    """What one HTTP request was and how it went. The engine's timestamps (time.time() in the engine's
    process) span every engine request the HTTP request made (several prompts, several samples)."""

    request_id: str
    method: str
    path: str
    client: str | None
    start: float
    keep_text: bool = False  # --log-prompts: the prompt and output are kept for the log
    route: str | None = None  # the matched route's template, e.g. /v1/models/{model:path}
    status: int | None = None
    end: float | None = None
    trace_id: str | None = None  # hex, when the request is traced
    model: str | None = None
    version: str | None = None
    operation: str | None = None  # GenAI's operation name: chat, text_completion
    params: dict[str, Any] = field(default_factory=dict)  # max_tokens, temperature, top_p, n as the engine got them
    num_engine_requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    times: RequestMetrics | None = None  # the engine requests' phases, spanned (RequestMetrics.span)
    prompts: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def add_engine_request(self, final: RequestOutput, output_tokens: int, finish_reasons: list[str],
                           texts: list[str]) -> None:
        """Fold in one engine request that ended (finished, failed or aborted), as last seen."""
        self.num_engine_requests += 1
        self.prompt_tokens += len(final.prompt_token_ids)
        self.output_tokens += output_tokens
        self.finish_reasons += finish_reasons
        self.times = final.metrics if self.times is None else self.times.span(final.metrics)
        if self.keep_text:
            self.outputs += texts

    @property
    def duration(self) -> float | None:
        """Seconds from the request's first byte to its response's last."""
        return None if self.end is None else self.end - self.start


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("tokenmill_request", default=None)


def current_record() -> RequestRecord | None:
    """The record of the HTTP request this code runs for; None outside one (offline use, Ray replicas)."""
    return _current.get()


class RequestObserver:
    """Pure ASGI middleware, so a streamed body passes through untouched; the request's id (X-Request-ID,
    else a new one) is set here, in the request's state, for handlers and error messages."""

    def __init__(self, app: Any, metrics: ServerMetrics, access_log: AccessLog, tracer: RequestTracer | None = None):
        self.app, self.metrics, self.access_log, self.tracer = app, metrics, access_log, tracer

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        request_id = headers.get("x-request-id") or f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        client = scope.get("client")
        record = RequestRecord(request_id, scope["method"], scope["path"], client[0] if client else None,
                               time.time(), keep_text=self.access_log.log_prompts)
        span = None if self.tracer is None or record.path in UNTRACED_PATHS else self.tracer.start(record, headers)
        token = _current.set(record)

        async def observed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except Exception:
            record.status = record.status or 500
            raise
        finally:
            _current.reset(token)
            record.end = time.time()
            record.request_id = scope["state"].get("request_id", request_id)  # a handler names its own (chatcmpl-...)
            route = scope.get("route")
            record.route = getattr(route, "path", None)
            self.metrics.count_http_request(record)
            self.access_log.write(record)
            if span is not None:
                self.tracer.end(span, record)
