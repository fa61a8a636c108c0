"""A 60-second soak of a real `tokenmill serve`: mixed, aborted and bad requests must leave no violation
(no stray 5xx, right lengths, KV cache back to 0, resident memory flat over the second half). First, the
soak's own checks against canned answers, for behaviour today's server may not show (pings, overload)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.soak import COMPLETIONS, Case, Stats, main, run_case

REPO = Path(__file__).resolve().parents[2]
KEY = "soak-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _sse(*events: dict | str) -> bytes:
    lines = [": ping - 2026-01-01 00:00:00", ""]  # sse-starlette's keep-alive comment
    for e in events:
        lines += [f"data: {e if isinstance(e, str) else json.dumps(e)}", ""]
    return "\n".join(lines).encode()


def _chunk(finish: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if usage else [{"index": 0, "text": "x", "finish_reason": finish}]
    return {"choices": choices, "usage": usage}


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
GOOD_STREAM = _sse(_chunk(), _chunk("length"), _chunk(usage=USAGE), "[DONE]")
OVERLOAD = {"error": {"message": "busy", "type": "server_error", "param": None, "code": "overloaded"}}


@pytest.mark.parametrize("status, headers, body, violations, overloads", [
    (200, {}, GOOD_STREAM, 0, 0),
    (200, {}, _sse(_chunk(), _chunk("length"), _chunk(usage=USAGE)), 1, 0),  # no [DONE]
    (200, {}, _sse(_chunk(), _chunk("stop"), _chunk(usage=USAGE), "[DONE]"), 1, 0),  # stopped early
    (200, {}, _sse(_chunk(), "not json", "[DONE]"), 1, 0),
    (200, {}, _sse(_chunk(), OVERLOAD, "[DONE]"), 0, 1),
    (200, {}, _sse(_chunk(), {"error": {**OVERLOAD["error"], "code": None}}, "[DONE]"), 1, 0),
    (503, {"Retry-After": "1"}, json.dumps(OVERLOAD).encode(), 0, 1),
    (503, {}, json.dumps(OVERLOAD).encode(), 1, 1),  # an overload answer must say when to retry
    (500, {}, json.dumps({"error": {**OVERLOAD["error"], "code": None}}).encode(), 1, 0),
])
def test_checks_of_a_streamed_answer(status, headers, body, violations, overloads):
    case = Case(kind="good/completions/stream", path=COMPLETIONS, choices=1, max_tokens=2, exact=True,
                body={"prompt": "Hi", "max_tokens": 2, "ignore_eos": True, "stream": True,
                      "stream_options": {"include_usage": True}})
    content_type = "text/event-stream" if status == 200 else "application/json"
    transport = httpx.MockTransport(
        lambda request: httpx.Response(status, headers={"content-type": content_type, **headers}, content=body))
    stats = Stats()

    async def go() -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            await run_case(client, case, 10, stats)

    asyncio.run(go())
    assert (len(stats.violations), stats.overloads) == (violations, overloads), stats.violations


def test_soak_60s_leaves_no_violation(tmp_path):
    port = _free_port()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TOKENMILL_API_KEY", None)  # the key comes from the flag
    with open(log_path, "w") as log:  # a file: a full pipe would block the server
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenmill.api.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--dtype", "float32", "--kv-cache-memory", "128MiB", "--max-num-seqs", "16", "--max-model-len", "1024",
             "--max-queue-len", "4",  # small, so that overload answers (503 + Retry-After) occur
             "--api-key", KEY],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # model load; slower on a busy machine
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{_tail(log_path)}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server not healthy within 180 s:\n{_tail(log_path)}"
            time.sleep(0.3)

        out = tmp_path / "soak.json"
        rc = main(["--url", url, "--duration", "60", "--concurrency", "8", "--seed", "0", "--pid", str(proc.pid),
                   "--api-key", KEY, "--json", str(out)])
        report = json.loads(out.read_text())
        assert rc == 0, json.dumps(report["violations"][:20], indent=1) + "\n" + _tail(log_path)
        assert report["completion_tokens"] > 0 and report["rss_growth"] is not None
        # Every sequence's room in the queue bound came back: a request for all of it (16 + 4) is served.
        full = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                          json={"prompt": "Hi", "n": 20, "max_tokens": 1})
        assert full.status_code == 200, full.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
