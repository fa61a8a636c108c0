"""Request bodies bounded at the HTTP layer, before they cost their size in memory.

BodyLimit is a pure ASGI middleware (it sees the body as uvicorn delivers it, unlike Starlette's
BaseHTTPMiddleware). A request whose Content-Length is over the limit is answered 413 at once: the app
never runs and the body is never read (uvicorn stops reading a connection once 64 KiB of unread body
wait, and closes it after the 413's `Connection: close`). A body without Content-Length (chunked) is
counted as the app reads it; past the limit the app reads no more, the client gets the 413, and the app
sees a disconnected client. A body that takes longer than the timeout to arrive is a 408, the same way.
The errors are OpenAI's error object, or Anthropic's on /v1/messages.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .errors import APIError
from .errors_anthropic import anthropic_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """Bounds each HTTP request's body to max_bytes (413) and the time it takes to arrive to timeout_s
    seconds from the start of the request (408; None: no bound). Either answer closes the connection."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _answer(scope, send, self._too_large(declared))
            return

        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        received, body_done, started, answered = 0, False, False, False

        async def bounded_receive() -> Message:
            nonlocal received, body_done, answered
            if answered:
                return {"type": "http.disconnect"}
            if body_done:  # e.g. a streaming response listening for the client to hang up
                return await receive()
            try:
                if deadline is None:
                    message = await receive()
                else:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                error = APIError(408, f"the request body did not arrive within {self.timeout_s:g} seconds "
                                      "(--request-body-timeout)", code="request_timeout")
            else:
                if message["type"] != "http.request":
                    return message
                received += len(message.get("body", b""))
                if received <= self.max_bytes:
                    body_done = not message.get("more_body", False)
                    return message
                error = self._too_large(None)
            if not started:  # the app is still reading: the answer is ours, and the app's is dropped
                answered = True
                await _answer(scope, send, error)
            return {"type": "http.disconnect"}

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, bounded_receive, guarded_send)

    def _too_large(self, size: int | None) -> APIError:
        body = "the request body" if size is None else f"the request body ({size} bytes)"
        return APIError(413, f"{body} is larger than the server's limit of {self.max_bytes} bytes "
                             "(--max-request-bytes)", code="request_too_large")


def _content_length(scope: Scope) -> int | None:
    """The declared body size; None if there is none, or none that parses (uvicorn refuses those itself,
    and the body is counted as it is read anyway)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            return int(value) if value.strip().isdigit() else None
    return None


async def _answer(scope: Scope, send: Send, error: APIError) -> None:
    """The error in the API's format of the request's path, and uvicorn closes the connection after it
    (the rest of the body is never read)."""
    error.headers = {**(error.headers or {}), "Connection": "close"}
    if scope.get("path", "").startswith("/v1/messages"):
        request_id = scope.get("state", {}).get("request_id") or f"req-{uuid.uuid4().hex}"  # RequestObserver's
        response = anthropic_response(error, request_id)
    else:
        response = error.response()

    async def no_body() -> Message:
        return {"type": "http.disconnect"}

    await response(scope, no_body, send)
