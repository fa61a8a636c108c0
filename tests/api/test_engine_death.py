"""A dead engine says so: pending and new requests get 503 in OpenAI's error format, open streams get an
error event, /health answers 503, and `tokenmill serve` exits non-zero so a supervisor restarts it."""
from __future__ import annotations

import json

import httpx
from api_helpers import ScriptedEngine, ServeProcess, ServerThread, wait_until

from tokenmill.api.server import build_app
from tokenmill.engine.core.async_engine import AsyncLLMEngine


def test_serve_exits_non_zero_after_its_engine_dies_and_streams_hear_why(tmp_path):
    args = ["--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-model-len", "512",
            "--fault-injection", "step:3"]  # steps 1 and 2 run, then every step fails (a lost device)
    with ServeProcess(args, tmp_path / "server.log") as server:
        body = {"prompt": "Count:", "max_tokens": 50, "ignore_eos": True, "stream": True}
        with server.client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and error["code"] == "unavailable" and "engine died" in error["message"]
        assert any("choices" in json.loads(e) for e in events[:-2])  # the first tokens did arrive
        assert server.proc.wait(60) == 1, server.log()
        assert "the engine died" in server.log()


def test_a_dead_engine_answers_503_everywhere(tmp_path):
    """In process, so that the dead server can be asked before it exits."""
    engine = ScriptedEngine()
    client_engine = AsyncLLMEngine(engine)
    with ServerThread(build_app(client_engine)) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        ok = http.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
        assert ok.status_code == 200
        engine.fail_step.set()
        dying = http.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 5})
        assert dying.status_code == 503 and dying.json()["error"]["code"] == "unavailable"
        assert wait_until(lambda: http.get("/health").status_code == 503)
        later = http.post("/v1/completions", json={"prompt": [3], "max_tokens": 1, "stream": True})
        later_ids = http.post("/v1/completions", json={"prompt": [1], "max_tokens": 1})
        assert later_ids.status_code == 503 and "engine died" in later_ids.json()["error"]["message"]
        assert later.status_code == 503
