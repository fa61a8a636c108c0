"""The engine in a process of its own (MPEngineClient, the server's default): it serves what the engine on
a thread serves, token for token; an abort frees the request in the engine process; its death, however
it comes, fails every open stream loudly and makes `tokenmill serve` exit 1; it never outlives the
server; and a model that cannot load gives the user the loader's message instead of a hang.

A tiny Llama with seeded random weights and the default model's tokenizer keeps start-ups short; both
transports load the same weights, so their greedy tokens must match exactly."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from api_helpers import ServeProcess, ServerThread, free_port, wait_until

from tokenmill.api.server import build_app
from tokenmill.engine.config import EngineConfig, default_model_path
from tokenmill.engine.core.async_engine import AsyncLLMEngine
from tokenmill.engine.core.core_client import MPEngineClient
from tokenmill.engine.weights.gguf_tokenizer import load_gguf_tokenizer

REPO = Path(__file__).resolve().parents[2]
TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    load_gguf_tokenizer(default_model_path()).save_pretrained(path)  # loads in under a second from here
    return str(path)


def tiny_config(model: str) -> EngineConfig:
    return EngineConfig(model=model, load_format="dummy", dtype="float32", kv_cache_memory=16 << 20)


def serve_args(model: str) -> list[str]:
    return [model, "--load-format", "dummy", "--dtype", "float32", "--kv-cache-memory", "16MiB"]


@pytest.fixture(scope="module")
def mp_engine(tiny_model):
    engine = MPEngineClient(tiny_config(tiny_model))
    yield engine
    engine.shutdown()


def serve(engine):
    with ServerThread(build_app(engine)) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


@pytest.fixture(scope="module")
def mp_http(mp_engine):
    yield from serve(mp_engine)


@pytest.fixture(scope="module")
def thread_http(tiny_model):
    yield from serve(AsyncLLMEngine.from_config(tiny_config(tiny_model)))


def stream_events(http: httpx.Client, path: str, body: dict, hang_up_after: int | None = None) -> list:
    """The `data:` payloads of a stream ([DONE] stays a string); with hang_up_after, leave after that many."""
    events = []
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                events.append(payload if payload == "[DONE]" else json.loads(payload))
                if len(events) == hang_up_after:
                    break
    return events


def test_the_process_engine_gives_the_tokens_the_thread_engine_gives(mp_http, thread_http):
    completion = {"prompt": "The capital of France is", "temperature": 0, "max_tokens": 12, "logprobs": 2,
                  "ignore_eos": True}
    got, want = (h.post("/v1/completions", json=completion).json() for h in (mp_http, thread_http))
    assert got["choices"][0]["text"] == want["choices"][0]["text"] and got["usage"] == want["usage"]
    assert got["choices"][0]["logprobs"]["tokens"] == want["choices"][0]["logprobs"]["tokens"]
    assert got["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
        want["choices"][0]["logprobs"]["token_logprobs"], abs=1e-4)
    chat = {"messages": [{"role": "user", "content": "Name two colors."}], "temperature": 0, "max_tokens": 10,
            "n": 2, "stream_options": {"include_usage": True}}
    got, want = (stream_events(h, "/v1/chat/completions", chat) for h in (mp_http, thread_http))

    def texts(events):
        return ["".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-2]
                        if c["choices"] and c["choices"][0]["index"] == i) for i in range(2)]

    assert texts(got) == texts(want) and got[-2]["usage"] == want[-2]["usage"] and got[-1] == "[DONE]"


def test_constrained_requests_compile_in_the_process_engine_as_on_the_thread(mp_http, thread_http):
    constrained = {"prompt": "Answer:", "temperature": 0, "max_tokens": 20, "guided_regex": r"[a-z]{3}-\d{2}"}
    got, want = (h.post("/v1/completions", json=constrained).json() for h in (mp_http, thread_http))
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    assert re.fullmatch(r"[a-z]{3}-\d{2}", got["choices"][0]["text"])
    bad = mp_http.post("/v1/completions", json={**constrained, "guided_regex": "(("})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_regex"

def test_a_client_that_hangs_up_frees_its_request_in_the_engine_process(mp_http, mp_engine):
    body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}
    assert len(stream_events(mp_http, "/v1/completions", body, hang_up_after=2)) == 2
    assert wait_until(lambda: (mp_engine.stats.num_running, mp_engine.stats.kv_cache_usage) == (0, 0.0))
    assert mp_engine.stats.finished_reasons.get("abort", 0) >= 1
    assert not mp_engine._routes and not mp_engine._pending and mp_engine._num_seqs == 0


def test_a_killed_engine_process_fails_open_streams_and_health(mp_http, mp_engine):
    """Last among the tests of mp_engine: it kills it."""
    deaths = []
    mp_engine.on_dead(deaths.append)
    events = []
    with mp_http.stream("POST", "/v1/completions",
                        json={"prompt": "Count:", "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if len(events) == 1:
                    os.kill(mp_engine.process.pid, signal.SIGKILL)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "unavailable" and "engine died" in error["message"] and "SIGKILL" in error["message"]
    assert mp_http.get("/health").status_code == 503
    later = mp_http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert later.status_code == 503 and "engine died" in later.json()["error"]["message"]
    assert len(deaths) == 1 and not mp_engine.is_running


def engine_pid(server: ServeProcess) -> int:
    """The server's child that multiprocessing spawned (read from /proc)."""
    (pid,) = [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
              if _stat(stat.parent.name)[1:2] == [str(server.proc.pid)]
              and b"spawn_main" in (stat.parent / "cmdline").read_bytes()]
    return pid


def _stat(pid: str) -> list[str]:
    """[state, parent pid, ...] of a process; [] once it is gone."""
    try:
        return (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def is_alive(pid: int) -> bool:
    return _stat(str(pid))[:1] not in ([], ["Z"], ["X"])  # a zombie is dead, just not yet reaped


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG")


@linux_only
def test_serve_exits_1_when_its_engine_process_is_killed(tmp_path, tiny_model):
    with ServeProcess(serve_args(tiny_model), tmp_path / "server.log") as server:
        os.kill(engine_pid(server), signal.SIGKILL)
        assert server.proc.wait(60) == 1, server.log()
        assert "the engine died (its process was killed by SIGKILL)" in server.log()


@linux_only
def test_the_engine_process_dies_with_the_server_even_by_sigkill(tmp_path, tiny_model):
    with ServeProcess(serve_args(tiny_model), tmp_path / "server.log") as server:
        engine = engine_pid(server)
        server.proc.kill()
        server.proc.wait(10)
        assert wait_until(lambda: not is_alive(engine), timeout=5)


def test_a_model_that_cannot_load_gives_the_loaders_message(tmp_path):
    model = tmp_path / "not-a-model"  # exists (the CLI checks that itself), but holds no model
    model.mkdir()
    out = subprocess.run([sys.executable, "-m", "tokenmill.api.cli", "serve", str(model), "--port", str(free_port())],
                         cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"tokenmill serve: the engine failed to start: ValueError: no config.json at {str(model)!r}"), out.stderr
