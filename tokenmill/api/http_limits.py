"""What one HTTP connection may hold: a request's body and headers, and how long each may take to arrive.

- the body: at most max_request_bytes (a 413, api/body_limit.py), arriving within request_body_timeout
  seconds (a 408); both close the connection.
- the headers (request line included): at most max_header_bytes, arriving within request_header_timeout
  seconds of the request's first byte (or of the connection's opening). uvicorn picks httptools when it is
  installed (it comes with uvicorn[standard], and with Ray Serve), and httptools bounds neither: a client may
  send headers without end and the server keeps them all. So with httptools the server runs
  BoundedHttpToolsProtocol below, which answers headers over the bound with a 431 and closes a connection
  whose headers are late. Without httptools uvicorn runs h11, whose own bound (h11_max_incomplete_event_size,
  set to max_header_bytes) answers with a 400; the header timeout then does not apply.
- between requests: a keep-alive connection idle for timeout_keep_alive seconds is closed (uvicorn's).
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from tokenmill.engine.limits import RequestLimits

# Bytes of JSON one prompt character may take: a character outside the BMP is one character to the prompt
# limit (len() counts code points) but, escaped as ASCII-only JSON encoders do, a 12-byte surrogate pair
# ("\ud83d\ude00"); a BMP character takes at most 6 ("\u00e9").
JSON_BYTES_PER_CHAR = 12
# Room for the rest of a request: messages' framing, tools, a structured-output constraint (64 Ki characters
# by default), stop strings, logit_bias.
REQUEST_OVERHEAD_BYTES = 1 << 20


def default_max_request_bytes(max_prompt_chars: int) -> int:
    """The body limit that lets through any prompt the prompt limit lets through, however it is escaped:
    13 MiB for the default 1 Mi characters."""
    return JSON_BYTES_PER_CHAR * max_prompt_chars + REQUEST_OVERHEAD_BYTES


@dataclasses.dataclass(frozen=True)
class HTTPLimits:
    """The bounds of the module docstring; `tokenmill serve` sets each by the flag of its name."""

    max_request_bytes: int = default_max_request_bytes(RequestLimits().max_prompt_chars)
    request_body_timeout: float | None = 60.0  # as nginx's client_body_timeout; None: none
    max_header_bytes: int = 16 << 10  # as h11's and Node's default
    request_header_timeout: float | None = 30.0
    timeout_keep_alive: float = 5.0  # uvicorn's default

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1 byte; got {getattr(self, name)}")
        for name in ("request_body_timeout", "request_header_timeout", "timeout_keep_alive"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0 seconds; got {value}")

    def uvicorn_options(self) -> dict[str, Any]:
        """uvicorn.Config's settings for these bounds."""
        return {"http": http_protocol(self.max_header_bytes, self.request_header_timeout),
                "h11_max_incomplete_event_size": self.max_header_bytes, "timeout_keep_alive": self.timeout_keep_alive}


def http_protocol(max_header_bytes: int, header_timeout: float | None) -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol with the headers bounded (see the module docstring), or "h11" without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "h11"

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        """Counts the bytes received while a request's headers are incomplete (over the bound by at most one
        read), and times them from the request's first byte."""

        _reading_headers = True
        _header_bytes = 0
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._reading_headers:
                self._header_bytes += len(data)
            super().data_received(data)
            if self._reading_headers and self._header_bytes > max_header_bytes and not self.transport.is_closing():
                message = f"Request header fields too large: over {max_header_bytes} bytes (--max-header-bytes)"
                self.logger.warning(message)
                self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; "
                                     b"charset=utf-8\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                                     % (len(message), message.encode()))
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._await_headers()

        def on_headers_complete(self) -> None:
            self._reading_headers = False
            self._stop_header_timer()
            super().on_headers_complete()

        def _await_headers(self) -> None:
            self._reading_headers, self._header_bytes = True, 0
            self._stop_header_timer()
            if header_timeout is not None:
                self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self._reading_headers and not self.transport.is_closing():
                self.logger.warning("Request headers not received within %gs (--request-header-timeout); "
                                    "closing the connection", header_timeout)
                self.transport.close()

    return BoundedHttpToolsProtocol
