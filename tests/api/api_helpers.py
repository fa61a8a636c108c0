"""Helpers for the API tests: a uvicorn server thread, /metrics scraping, the engine as oracle."""
from __future__ import annotations

import asyncio
import re
import socket
import threading
import time

import httpx
import uvicorn

from tokenmill.engine.config import EngineConfig, ModelConfig
from tokenmill.engine.core.engine_client import EngineClient
from tokenmill.engine.core.llm_engine import EngineStats
from tokenmill.engine.limits import RequestLimits
from tokenmill.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput

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


def engine_generate(engine: EngineClient, prompt, **params):
    """The oracle for the HTTP layer: the same engine driven directly, without HTTP."""
    from tokenmill.engine.outputs import RequestOutput
    from tokenmill.engine.sampling.sampling_params import SamplingParams

    async def go():
        final = None
        async for delta in engine.generate(f"oracle-{time.time_ns()}", prompt, SamplingParams(**params)):
            final = final or RequestOutput.empty(delta)
            final.add(delta)
        return final

    return asyncio.run(go())


class ServeProcess:
    """`tokenmill serve ARGS` in a subprocess on a free port, as a user runs it; its log goes to a file
    (a full pipe would block the server)."""

    def __init__(self, args: list[str], log_path, env: dict | None = None, headers: dict | None = None):
        import os
        import subprocess
        import sys
        from pathlib import Path

        repo = Path(__file__).resolve().parents[2]
        self.port = free_port()
        self.log_file = open(log_path, "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenmill.api.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             *args],
            cwd=repo, env={**os.environ, "PYTHONPATH": str(repo), **(env or {})}, stdout=self.log_file,
            stderr=subprocess.STDOUT, text=True)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers=headers, timeout=120)

    def __enter__(self) -> ServeProcess:
        def up() -> bool:
            try:
                return self.client.get("/health").status_code == 200
            except httpx.TransportError:
                return self.proc.poll() is not None
        assert wait_until(up, timeout=180, interval=0.3) and self.proc.poll() is None, self.log()
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log_file.close()

    def log(self) -> str:
        self.log_file.flush()
        self.log_file.seek(0)
        return self.log_file.read()


class ScriptedEngine:
    """Just enough of LLMEngine: each step gives every request one token; faults on demand."""

    def __init__(self, max_num_seqs: int = 4, max_waiting_seqs: int = 2):
        self.config = EngineConfig(max_num_seqs=max_num_seqs, limits=RequestLimits(max_waiting_seqs=max_waiting_seqs))
        self.model_config = ModelConfig("LlamaForCausalLM", 100, 8, 16, 1, 1, 1, 8, 64)
        self.max_model_len = 64
        self.requests: dict[str, list] = {}
        self.fail_step = threading.Event()
        self.fail_abort = threading.Event()
        self.added: list[str] = []
        self.step_s = 0.01

    def get_tokenizer(self):
        return None

    def shutdown(self) -> None:
        self.requests.clear()

    def stats(self) -> EngineStats:
        return EngineStats(0, len(self.requests), 0.0, 0, 0, 0, 0, 0)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def add_request(self, request_id, prompt, params, arrival_time=None, lora_name=None):
        self.added.append(request_id)
        self.requests[request_id] = [params.max_tokens, 0]

    def abort_request(self, request_ids):
        if self.fail_abort.is_set():
            raise AssertionError("block freed twice")
        for rid in request_ids:
            self.requests.pop(rid, None)

    def step(self):
        if self.fail_step.is_set():
            raise RuntimeError("device lost")
        outs = []
        for rid, state in list(self.requests.items()):
            state[1] += 1
            done = state[1] >= state[0]
            if done:
                del self.requests[rid]
            outs.append(RequestOutput(rid, None, [1], [CompletionOutput(0, "x", [7], None, None,
                                                                        "length" if done else None)],
                                      done, RequestMetrics(0.0)))
        threading.Event().wait(self.step_s)
        return outs
