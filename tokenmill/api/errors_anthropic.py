"""Errors on the Anthropic Messages routes, in Anthropic's shape and with its status codes.

The errors are the same APIErrors every route raises (api/errors.py); only their rendering differs:
`{"type": "error", "error": {"type": ..., "message": ...}, "request_id": ...}`. Anthropic documents no
503, so our 503s (the queue is full, the server is shutting down, the engine died) become its 529
overloaded_error, which tells clients and the SDK to retry later; Retry-After goes with them.
"""
from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from .errors import APIError, api_error
from .protocol_anthropic import ErrorObject, ErrorResponse, ErrorType

# Anthropic's error type per status; other 4xx are invalid_request_error, other 5xx api_error.
_TYPES: dict[int, ErrorType] = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                                529: "overloaded_error"}
_STATUS = {503: 529}
# Request fields whose name here differs from the OpenAI field they map onto (the name errors carry).
_FIELD_NAMES = {"stop": "stop_sequences", "structured_outputs": "output_config.format"}


def anthropic_error(error: APIError, request_id: str) -> tuple[int, ErrorResponse]:
    """(the status, the body) that Anthropic's API would answer an error with."""
    status = _STATUS.get(error.status, error.status)
    kind = _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    message = error.message
    if error.param in _FIELD_NAMES and message.startswith(error.param):
        message = _FIELD_NAMES[error.param] + message[len(error.param):]
    return status, ErrorResponse(error=ErrorObject(type=kind, message=message), request_id=request_id)


def anthropic_response(error: APIError, request_id: str) -> JSONResponse:
    """The error as Anthropic's API would answer it, headers (Retry-After) included."""
    status, body = anthropic_error(error, request_id)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=error.headers)


def stream_error(exc: Exception, request_id: str) -> ErrorResponse:
    """The `error` event of a stream that fails after its status line."""
    return anthropic_error(api_error(exc, request_id), request_id)[1]


class MessagesRoute(APIRoute):
    """A route whose every error (validation, auth, routing, overload, bugs) is Anthropic's error object."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as e:
                # A body that is not JSON fails before the app's dependencies give the request its id.
                request_id = getattr(request.state, "request_id", None) or f"req-{uuid.uuid4().hex}"
                return anthropic_response(api_error(e, request_id), request_id)

        return route
