"""`tokenmill serve` as a user runs it: a subprocess configured by flags and environment.

The server here batches one sequence at a time and lets one more wait, so the queue limit is easy
to reach. The SIGTERM test stops it, so it comes last among the tests that use it.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest
from api_helpers import ServeProcess, wait_until

from tokenmill.api.args import build_parser, engine_config, parse_size
from tokenmill.api.cli import main

REPO = Path(__file__).resolve().parents[2]
KEY = "env-key"


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory):
    args = ["--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-model-len", "512", "--max-num-seqs", "1",
            "--max-queue-len", "1", "--served-model-name", "tiny", "--responses-store-max-entries", "1"]
    with ServeProcess(args, tmp_path_factory.mktemp("cli") / "server.log", env={"TOKENMILL_API_KEY": KEY},
                      headers={"Authorization": f"Bearer {KEY}"}) as server:
        yield server.proc, server.client, server


def test_flags_and_env_configure_the_server(cli_server):
    _, client, _ = cli_server
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.post("/tokenize", json={"prompt": "x"}).json()["max_model_len"] == 512
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_over_the_queue_limit_is_a_503(cli_server):
    _, client, _ = cli_server
    body = {"prompt": "Count:", "max_tokens": 40, "ignore_eos": True}
    results = []
    threads = [threading.Thread(target=lambda: results.append(client.post("/v1/completions", json=body)))
               for _ in range(2)]
    for t in threads:  # one runs, one waits: the queue is full
        t.start()
    waiting = 'tokenmill:num_requests_waiting{model_name="tiny",version=""} 1.0'
    assert wait_until(lambda: waiting in client.get("/metrics").text)
    third = client.post("/v1/completions", json=body)
    assert third.status_code == 503 and third.json()["error"]["code"] == "overloaded"
    assert int(third.headers["retry-after"]) >= 1
    assert "--max-queue-len 1" in third.json()["error"]["message"]
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200, 200]


def test_the_response_store_keeps_as_many_responses_as_its_flag_says(cli_server):
    _, client, _ = cli_server
    body = {"input": "Hi", "max_output_tokens": 1}
    first, second = (client.post("/v1/responses", json=body).json()["id"] for _ in range(2))
    assert client.get(f"/v1/responses/{first}").status_code == 404
    assert client.get(f"/v1/responses/{second}").json()["id"] == second
    assert client.get(f"/v1/responses/{second}", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_sigterm_finishes_in_flight_requests_and_exits_0(cli_server):
    proc, client, log = cli_server
    result = {}

    def stream():
        with client.stream("POST", "/v1/completions",
                           json={"prompt": "Count:", "max_tokens": 30, "ignore_eos": True, "stream": True}) as r:
            result["events"] = [line for line in r.iter_lines() if line]

    worker = threading.Thread(target=stream)
    worker.start()
    assert wait_until(lambda: 'num_requests_running{model_name="tiny",version=""} 1.0' in client.get("/metrics").text)
    proc.send_signal(signal.SIGTERM)
    worker.join(120)
    assert proc.wait(60) == 0
    events = result["events"]
    assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-2]
    assert "request cmpl-" in log.log()  # the per-request log line


def test_serve_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ["--host", "--port", "--dtype", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
                 "--kv-cache-memory", "--served-model-name", "--max-queue-len", "--api-key",
                 "--responses-store-max-entries", "--responses-store-max-bytes", "--responses-store-ttl",
                 "--max-request-bytes", "--request-body-timeout", "--max-header-bytes", "--request-header-timeout",
                 "--timeout-keep-alive"]:
        assert flag in out


def test_sizes_and_bench_delegation(capsys, tmp_path, monkeypatch):
    assert parse_size("256MiB") == 256 << 20 and parse_size("1G") == 1 << 30 and parse_size("4096") == 4096
    args = build_parser().parse_args(["bench", "serve", "--num-prompts", "3"])
    assert (args.benchmark, args.args) == ("serve", ["--num-prompts", "3"])
    if not (REPO / "benchmarks" / "throughput.py").exists():
        assert main(["bench", "throughput"]) == 2
        assert "benchmarks/throughput.py not found" in capsys.readouterr().err



def test_engine_flags_map_onto_the_engine_config(tmp_path):
    args = build_parser().parse_args(["serve", str(tmp_path), "--block-size", "32", "--no-enable-prefix-caching",
                                      "--enforce-eager", "--seed", "7", "--gpu-memory-utilization", "0.5",
                                      "--load-format", "dummy", "--engine-in-process",
                                      "--max-constraint-compile-s", "2.5", "--tensor-parallel-size", "2"])
    config = engine_config(args)
    assert (config.block_size, config.enable_prefix_caching, config.enforce_eager, config.seed,
            config.gpu_memory_utilization, config.load_format) == (32, False, True, 7, 0.5, "dummy")
    assert config.tensor_parallel_size == 2
    assert args.engine_in_process and config.limits.max_constraint_compile_s == 2.5
    defaults = build_parser().parse_args(["serve"])
    assert engine_config(defaults).enable_prefix_caching and not defaults.engine_in_process
    assert engine_config(defaults).limits.max_constraint_compile_s == 10.0
