"""Helpers for the API tests: a uvicorn server thread, /metrics scraping, the engine as oracle."""
from __future__ import annotations

import asyncio
import re
import socket
import threading
import time

import httpx
import uvicorn

from engine.async_engine import AsyncLLMEngine

API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn in a background thread (it installs no signal handlers off the main thread)."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def scrape(http: httpx.Client, name: str, labels: str = "", default: float | None = None) -> float:
    """One sample of a tokenmill metric from /metrics (summed over label sets that contain `labels`)."""
    text = http.get("/metrics").text
    total, found = 0.0, False
    for m in re.finditer(rf"^tokenmill:{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        if labels in (m.group(1) or ""):
            total, found = total + float(m.group(2)), True
    if not found and default is not None:
        return default
    assert found, f"tokenmill:{name}{{{labels}}} not in /metrics"
    return total


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def engine_generate(engine: AsyncLLMEngine, prompt, **params):
    """The oracle for the HTTP layer: the same engine driven directly, without HTTP."""
    from engine.sampling_params import SamplingParams

    async def go():
        final = None
        async for out in engine.generate(f"oracle-{time.time_ns()}", prompt, SamplingParams(**params)):
            final = out
        return final

    return asyncio.run(go())
