"""Replicas on Ray Serve: a local Ray cluster on loopback serving the default model through
api/ray_serve.py, driven with the OpenAI SDK through Serve's HTTP proxy.

One application for the module, autoscaling between 1 and 2 engine replicas; the tests run in order:
it scales from 1 to 2 under load, spreads requests over both, sends a repeated prefix to one, survives
a replica killed under load, and leaves no engine process behind when Serve shuts down.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import socket
import threading
import time
from collections import Counter

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from tokenmill.api.model_spec import ModelSpec  # noqa: E402
from tokenmill.api.ray_serve import APP_NAME, ReplicaSettings, build_ray_app  # noqa: E402
from tokenmill.engine.config import EngineConfig, default_model_path  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = ModelSpec.parse(default_model_path()).name
ENGINE = "engine-" + MODEL
_others: set[int] = set()  # engine processes of other tests, alive before the cluster started


def engine_processes() -> set[int]:
    """Live tokenmill engine processes on this machine (named by engine/core/lifetime.py), but other tests'."""
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name, state = re.match(r"\d+ \((.*)\) (\S)", stat).groups()
        if name == "tokenmill-engin" and state not in "ZX":
            pids.add(int(pid))
    return pids - _others


def running_replicas() -> int:
    deployments = serve.status().applications[APP_NAME].deployments
    return deployments[ENGINE].replica_states.get("RUNNING", 0)


def replica_actors() -> set[str]:
    prefix = f"SERVE_REPLICA::{APP_NAME}#{ENGINE}#"
    return {a["name"].removeprefix(prefix) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _others.update(engine_processes())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = EngineConfig(dtype="float32", kv_cache_memory=64 << 20, max_num_seqs=16)
        # Quick to scale up, slow to scale down: the later tests need both replicas.
        replicas = ReplicaSettings(num_replicas=1, max_replicas=2, target_ongoing_requests=2,
                                   autoscaling={"upscale_delay_s": 1, "downscale_delay_s": 600,
                                                "look_back_period_s": 2, "metrics_interval_s": 0.5})
        serve.run(build_ray_app(config, [ModelSpec.parse(default_model_path())], replicas), name=APP_NAME,
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def routed(url: str) -> Counter:
    """Requests the ingress has routed to each replica, from its /metrics."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return Counter({m.group(1): float(m.group(2))
                    for m in re.finditer(r'^tokenmill:replica_requests_total\{.*replica="([^"]+)".*\} (\S+)$', text,
                                         re.M)})


def stream_text(client: openai.OpenAI, prompt: str, max_tokens: int) -> tuple[str, str]:
    """A streamed completion: (its text, its finish_reason)."""
    text, reason = "", None
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            text += choice.text
            reason = choice.finish_reason or reason
    return text, reason


def test_load_scales_one_replica_to_two(client):
    assert running_replicas() == 1
    stop = threading.Event()
    errors: list[Exception] = []

    def keep_busy(i: int) -> None:
        while not stop.is_set():
            try:
                assert stream_text(client, f"Load {i}: once upon a time", 32)[1] == "length"
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)
                return

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for i in range(8):
            pool.submit(keep_busy, i)
        try:
            wait_for(lambda: running_replicas() == 2, 180, "a second replica")
        finally:
            stop.set()
    assert not errors


def test_requests_spread_over_both_replicas(url, client):
    before = routed(url)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: stream_text(client, f"Request {i} says", 24), range(8)))
    assert all(reason == "length" for _, reason in results)
    delta = routed(url) - before
    assert sum(delta.values()) == 8
    assert len(delta) == 2, f"all requests went to one replica: {dict(delta)}"


def test_repeated_prefix_lands_on_one_replica(url, client):
    prefix = " ".join(f"Rule {i}: answer politely and keep the reply short." for i in range(30))
    before = routed(url)
    for i in range(6):
        assert stream_text(client, f"{prefix}\nQuestion {i}: what is {i} plus {i}?", 8)[1] == "length"
    delta = routed(url) - before
    assert list(delta.values()) == [6], f"the prefix's requests went to several replicas: {dict(delta)}"


def test_killed_replica_under_load(url, client):
    assert running_replicas() == 2 and len(engine_processes()) == 2
    before = routed(url)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(stream_text, client, f"Story {i}: the ship left the harbour", 400) for i in range(6)]
        wait_for(lambda: len(routed(url) - before) == 2, 60, "requests on both replicas")
        victim = next(iter(routed(url) - before))
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{ENGINE}#{victim}", namespace="serve"), no_restart=True)
        finished, failed = 0, 0
        for s in streams:
            try:
                text, reason = s.result(timeout=120)
                assert reason == "length" and text
                finished += 1
            except openai.APIError:
                failed += 1
    assert finished >= 1, "the requests on the surviving replica did not finish"
    assert failed >= 1, "no request was on the killed replica"
    # New requests are served at once, by the surviving replica until the new one is up.
    for i in range(4):
        assert stream_text(client, f"After the kill {i}:", 8)[1] == "length"
    wait_for(lambda: running_replicas() == 2 and victim not in replica_actors() and len(replica_actors()) == 2,
             180, "the killed replica's replacement")
    wait_for(lambda: len(engine_processes()) == 2, 30, "one engine process per replica, none orphaned")


def test_shutdown_leaves_no_engine_process(url):
    serve.shutdown()
    wait_for(lambda: not engine_processes(), 60, "the engine processes to exit")
