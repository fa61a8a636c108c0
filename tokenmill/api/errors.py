"""Every error as OpenAI's error object, with OpenAI's status codes.

400 bad values, types and JSON (FastAPI's 422 included) and requests over a limit; 401 bad API key;
404 unknown model or path; 503 with Retry-After when the queue is full; 503 while shutting down or
once the engine is dead; 500 for a request that failed inside the engine (its message names it) and
for bugs, logged with the request id. The Anthropic Messages routes render the same errors in
Anthropic's shape (api/errors_anthropic.py). A body over --max-request-bytes (413) or slower than
--request-body-timeout (408) is answered before the app runs, by api/body_limit.py, with these same objects.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.core.engine_client import (
    EngineDeadError,
    EngineOverloadedError,
    EngineStoppedError,
    RequestFailedError,
)
from tokenmill.engine.limits import InvalidRequestError

from .protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("tokenmill.api")


class APIError(Exception):
    """An error the client caused or can act on, rendered as OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


# Errors with their own handler below; anything else reaching a handler is a bug.
EXPECTED_ERRORS = (APIError, RequestValidationError, StarletteHTTPException, InvalidRequestError,
                   EngineOverloadedError, EngineStoppedError, EngineDeadError)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def _field_path(loc: tuple) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0]
    kind, path = err.get("type", ""), _field_path(tuple(err.get("loc", ())))
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return bad_request(f"the request body is not valid JSON: {detail}".rstrip(": "))
    if kind == "missing" and path == "":
        return bad_request("the request body is missing: send a JSON object")
    if kind == "model_attributes_type" and path == "":
        return bad_request("the request body must be a JSON object (with Content-Type: application/json)")
    message = err.get("msg", "invalid value").removeprefix("Value error, ")
    return bad_request(f"{path}: {message}" if path else message, param=path or None)


def api_error(exc: Exception, request_id: str) -> APIError:
    """The APIError an exception answers with, whatever API renders it; anything unexpected is a bug:
    a 500 whose details go to the log under the request id, not to the client."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return validation_error(exc)
    if isinstance(exc, InvalidRequestError):
        return bad_request(str(exc), exc.param)
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, str(exc), type="server_error", code="overloaded",
                        headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, EngineStoppedError | EngineDeadError):
        return APIError(503, str(exc), type="server_error", code="unavailable")
    if isinstance(exc, RequestFailedError):  # this request alone failed in the engine; its message names it
        return APIError(500, str(exc), type="server_error")
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, exc.detail, code=code)
    return _bug(request_id)


def internal_error(request: Request) -> APIError:
    """A 500 for a bug: the details go to the log under the request id, not to the client."""
    return _bug(getattr(request.state, "request_id", "-"))


def _bug(request_id: str) -> APIError:
    logger.exception("internal error in request %s", request_id)
    return APIError(500, f"internal server error (request id {request_id}); the server log has the details",
                    type="server_error")


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        error = api_error(exc, getattr(request.state, "request_id", "-"))
        if isinstance(exc, StarletteHTTPException):  # which path was not found, or had no such method
            error.message = f"{error.message}: {request.method} {request.url.path}"
        return error.response()

    for kind in (*EXPECTED_ERRORS, Exception):
        app.add_exception_handler(kind, handle)
