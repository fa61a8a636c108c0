"""Bodies and headers bounded at the HTTP layer: an oversized body is refused before it costs memory.

The server runs as a user runs it (`tokenmill serve`, engine in a process of its own), with small bounds; its
resident memory (the HTTP process's VmRSS) is read before and after each oversized request. The clients are raw
sockets, which go on sending until the server hangs up and then read what it answered, as a client that
sends 256 MiB would.
"""
from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterable, Iterator

import httpx
import pytest
from api_helpers import ServeProcess

from tokenmill.api.args import build_parser, http_limits
from tokenmill.api.cli import main
from tokenmill.api.http_limits import HTTPLimits, default_max_request_bytes
from tokenmill.engine.limits import RequestLimits

LIMIT = 1 << 20
HUGE = 256 << 20
MiB = 1 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    args = ["--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-model-len", "512",
            "--max-request-bytes", "1MiB", "--request-body-timeout", "2", "--max-header-bytes", "8KiB",
            "--request-header-timeout", "2", "--timeout-keep-alive", "1"]
    with ServeProcess(args, tmp_path_factory.mktemp("body") / "server.log") as server:
        # The first refusals of each kind load what answering takes; the measurements come after.
        for path in ("/v1/completions", "/v1/messages"):
            exchange(server.port, head("POST", path, content_length=2 * LIMIT), zeros(2 * LIMIT))
            exchange(server.port, head("POST", path, chunked=True), chunked(zeros(2 * LIMIT)))
        yield server


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


def head(method: str, path: str, content_length: int | None = None, chunked: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def zeros(size: int, chunk: int = 64 << 10) -> Iterator[bytes]:
    block = b"0" * chunk
    for start in range(0, size, chunk):
        yield block[:min(chunk, size - start)]


def chunked(chunks: Iterable[bytes]) -> Iterator[bytes]:
    for c in chunks:
        yield b"%x\r\n%s\r\n" % (len(c), c)
    yield b"0\r\n\r\n"


def exchange(port: int, request_head: bytes, body: Iterable[bytes] = (), pause_s: float = 0.0) -> dict:
    """Sends the head, then the body until the server stops taking it; then reads the answer until the
    server closes the connection. {'status', 'headers', 'body', 'sent', 'closed'}."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(request_head)
        try:
            for piece in body:
                s.sendall(piece)
                sent += len(piece)
        except OSError:  # broken pipe or reset: the server answered and hung up
            pass
        time.sleep(pause_s)
        data, closed = b"", False
        try:
            while chunk := s.recv(65536):
                data += chunk
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            pass
    if not data:
        return {"status": None, "headers": {}, "body": None, "sent": sent, "closed": closed}
    header_block, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = header_block.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    return {"status": int(status_line.split()[1]), "headers": headers, "body": payload, "sent": sent,
            "closed": closed}


def openai_error(answer: dict) -> dict:
    error = json.loads(answer["body"])["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None
    return error


def test_the_default_body_limit_fits_the_longest_prompt_however_it_is_escaped():
    chars = RequestLimits().max_prompt_chars
    assert HTTPLimits().max_request_bytes == default_max_request_bytes(chars) == 13 * MiB
    worst = json.dumps({"model": "m", "prompt": "\U0001F600" * chars, "max_tokens": 16})  # ensure_ascii: 12 bytes
    assert len(worst) <= HTTPLimits().max_request_bytes
    parse = build_parser().parse_args
    assert http_limits(parse(["serve"])).max_request_bytes == 13 * MiB
    assert http_limits(parse(["serve", "--max-prompt-chars", "4000000"])).max_request_bytes == 12 * 4000000 + MiB
    assert http_limits(parse(["serve", "--max-request-bytes", "16MiB"])).max_request_bytes == 16 * MiB
    with pytest.raises(ValueError, match="--request-body-timeout"):
        HTTPLimits(request_body_timeout=0)


def test_a_bad_bound_exits_2_before_anything_starts(capsys):
    assert main(["serve", "--max-header-bytes", "0"]) == 2
    assert "--max-header-bytes must be at least 1 byte" in capsys.readouterr().err


def test_a_256_mib_body_is_refused_before_it_is_read(served):
    before = rss_mib(served.proc.pid)
    answer = exchange(served.port, head("POST", "/v1/completions", content_length=HUGE), zeros(HUGE))
    grown = rss_mib(served.proc.pid) - before
    assert answer["status"] == 413 and answer["closed"] and answer["headers"]["connection"] == "close"
    error = openai_error(answer)
    assert error["code"] == "request_too_large"
    assert error["message"] == (f"the request body ({HUGE} bytes) is larger than the server's limit of {LIMIT} "
                                "bytes (--max-request-bytes)")
    assert answer["sent"] < 64 * MiB, "the server read the body"
    assert grown < 8, f"the server's RSS grew by {grown:.1f} MiB"


def test_a_chunked_body_is_refused_once_it_passes_the_limit(served):
    before = rss_mib(served.proc.pid)
    answer = exchange(served.port, head("POST", "/v1/chat/completions", chunked=True), chunked(zeros(HUGE)))
    grown = rss_mib(served.proc.pid) - before
    assert answer["status"] == 413 and answer["closed"] and answer["headers"]["connection"] == "close"
    assert openai_error(answer)["code"] == "request_too_large"
    assert answer["sent"] < 64 * MiB
    assert grown < 8, f"the server's RSS grew by {grown:.1f} MiB"


@pytest.mark.parametrize("chunks", [False, True], ids=["content-length", "chunked"])
def test_on_the_messages_api_the_refusal_is_anthropics(served, chunks):
    before = rss_mib(served.proc.pid)
    request_head = head("POST", "/v1/messages", content_length=None if chunks else HUGE, chunked=chunks)
    answer = exchange(served.port, request_head, chunked(zeros(HUGE)) if chunks else zeros(HUGE))
    grown = rss_mib(served.proc.pid) - before
    assert answer["status"] == 413 and answer["closed"]
    body = json.loads(answer["body"])
    assert body["type"] == "error" and body["error"]["type"] == "request_too_large"
    assert "--max-request-bytes" in body["error"]["message"] and body["request_id"]
    assert grown < 8, f"the server's RSS grew by {grown:.1f} MiB"


def test_a_body_of_exactly_the_limit_is_served(served):
    request = json.dumps({"prompt": "Hello", "max_tokens": 1}).encode()
    padded = request + b" " * (LIMIT - len(request))  # JSON allows trailing whitespace
    assert served.client.post("/v1/completions", content=padded,
                              headers={"Content-Type": "application/json"}).status_code == 200
    chunks = served.client.post("/v1/completions", content=iter([padded[:1000], padded[1000:]]),
                                headers={"Content-Type": "application/json"})
    assert chunks.status_code == 200, chunks.text  # sent chunked, counted to the byte
    over = served.client.post("/v1/completions", content=padded + b" ", headers={"Content-Type": "application/json"})
    assert over.status_code == 413


def test_a_body_that_trickles_in_is_a_408(served):
    start = time.monotonic()
    answer = exchange(served.port, head("POST", "/v1/completions", content_length=100), [b'{"prompt": '])
    assert answer["status"] == 408 and answer["closed"]
    assert openai_error(answer)["code"] == "request_timeout"
    assert 1.5 < time.monotonic() - start < 10


def test_headers_are_bounded_in_size_and_in_time(served):
    before = rss_mib(served.proc.pid)
    answer = exchange(served.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ", zeros(HUGE))
    assert answer["status"] == 431 and answer["closed"] and answer["sent"] < 64 * MiB
    assert rss_mib(served.proc.pid) - before < 8
    start = time.monotonic()  # headers that never end: the connection is closed
    assert exchange(served.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n") == {
        "status": None, "headers": {}, "body": None, "sent": 0, "closed": True}
    assert 1.5 < time.monotonic() - start < 10
    with socket.create_connection(("127.0.0.1", served.port), timeout=20) as s:  # an idle keep-alive connection
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        start = time.monotonic()
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and 0.5 < time.monotonic() - start < 10


def test_the_server_serves_on_after_the_refusals(served):
    assert httpx.post(f"http://127.0.0.1:{served.port}/v1/completions",
                      json={"prompt": "Hello", "max_tokens": 2}).status_code == 200
