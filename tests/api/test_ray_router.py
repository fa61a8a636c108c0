"""The Ray Serve pieces that need no cluster: prefix hashing and the prefix index, the request router's
choice among replicas, and how `tokenmill serve --ray` and `serve run ...:app_builder` read their options."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")
from ray.serve._private.common import DeploymentHandleSource, DeploymentID  # noqa: E402
from ray.serve.request_router import ReplicaID  # noqa: E402

from tokenmill.api import ray_serve  # noqa: E402
from tokenmill.api.cli import main  # noqa: E402
from tokenmill.api.ray_router import PrefixAwareRouter, PrefixIndex, block_hashes  # noqa: E402
from tokenmill.engine.config import EngineConfig  # noqa: E402
from tokenmill.engine.core.engine_core import AddRequest  # noqa: E402
from tokenmill.engine.sampling.sampling_params import SamplingParams  # noqa: E402

DEPLOYMENT = DeploymentID(name="engine-test", app_name="tokenmill")


def test_block_hashes_chain_full_blocks_only():
    a = block_hashes(list(range(10)), 4)
    assert len(a) == 2  # the last 2 tokens fill no block
    assert block_hashes(list(range(8)) + [99, 98, 97], 4) == a  # same whole blocks, different tail
    changed_first = block_hashes([7] + list(range(1, 10)), 4)
    assert changed_first[0] != a[0] and changed_first[1] != a[1]  # each hash covers every block before it
    assert block_hashes([1, 2, 3], 4) == []


def test_prefix_index_matches_leading_blocks_and_forgets():
    index = PrefixIndex(max_blocks=4)
    index.insert([1, 2, 3], "a")
    index.insert([1, 2], "b")
    assert index.match([1, 2, 3, 4], ["a", "b", "c"]) == {"a": 3, "b": 2, "c": 0}
    assert index.match([9, 2, 3], ["a", "b"]) == {"a": 0, "b": 0}  # a prefix must match from the first block
    index.drop("a")
    assert index.match([1, 2, 3], ["a", "b"]) == {"a": 0, "b": 2} and len(index) == 2
    index.insert([5, 6, 7], "c")  # 5 blocks > 4: the least recently sent (1) goes
    assert len(index) == 4 and index.match([1, 2], ["b"]) == {"b": 0}


def _replica(uid: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=ReplicaID(unique_id=uid, deployment_id=DEPLOYMENT))


def _request(ids: list[int]) -> SimpleNamespace:
    call = AddRequest("r", ids, SamplingParams(), 0.0)
    return SimpleNamespace(args=[call], routing_context=SimpleNamespace(should_backoff=False))


@pytest.fixture
def router() -> PrefixAwareRouter:
    router = PrefixAwareRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN)
    router.initialize_state(block_size=4, max_imbalance=2)
    return router


def _choose(router: PrefixAwareRouter, replicas: list, ids: list[int]) -> list[list[str]]:
    ranks = asyncio.run(router.choose_replicas(replicas, _request(ids)))
    return [sorted(r.replica_id.unique_id for r in rank) for rank in ranks]


def test_router_prefers_the_replica_holding_the_prefix(router):
    a, b, c = _replica("a"), _replica("b"), _replica("c")
    prompt = list(range(16))
    assert _choose(router, [a, b, c], prompt) == [["a", "b", "c"]]  # nothing held: any, least busy first
    router.on_request_routed(_request(prompt), b.replica_id, None)
    assert _choose(router, [a, b, c], prompt + [100, 101, 102, 103]) == [["b"], ["a", "c"]]  # 4 of 5 blocks
    assert _choose(router, [a, b, c], prompt[:4] + [0] * 12) == [["a", "b", "c"]]  # 1 of 4 blocks: too little
    assert _choose(router, [a, b, c], [1, 2]) == [["a", "b", "c"]]  # no full block
    router.replica_queue_len_cache.update(b.replica_id, 5)  # 5 queued against 0: past max_imbalance
    assert _choose(router, [a, b, c], prompt) == [["a", "b", "c"]]
    router.replica_queue_len_cache.update(b.replica_id, 2)
    assert _choose(router, [a, b, c], prompt) == [["b"], ["a", "c"]]
    router.on_replica_actor_died(b.replica_id)  # its cache went with it
    assert _choose(router, [a, c], prompt) == [["a", "c"]]


def test_serve_run_arguments_become_serve_options(monkeypatch):
    seen = {}
    monkeypatch.setattr(ray_serve, "app_from_args", lambda args: seen.setdefault("args", args))
    ray_serve.app_builder({"model": "m1,m2", "max_replicas": "3", "enforce_eager": "true", "port": "9000"})
    args = seen["args"]
    assert args.ray and args.model == ["m1", "m2"] and args.max_replicas == 3 and args.enforce_eager
    assert ray_serve.replica_settings(args) == ray_serve.ReplicaSettings(1, 3, None, 1.0)


@pytest.mark.parametrize("argv, error", [
    (["--num-replicas", "2"], "--num-replicas: only with --ray"),
    (["--ray", "--num-replicas", "3", "--max-replicas", "2"], "--max-replicas (2) must be >= --num-replicas (3)"),
    (["--ray", "--num-replicas", "0"], "--num-replicas must be >= 1"),
    (["--ray", "--cpus-per-replica", "0"], "--cpus-per-replica must be > 0"),
    (["--ray", "--enable-lora", "--engine-in-process"], "--engine-in-process, --enable-lora: not supported with --ray"),
])
def test_bad_replica_options_exit_2_before_anything_starts(argv, error, capsys):
    assert main(["serve", *argv]) == 2
    assert error in capsys.readouterr().err


@pytest.mark.parametrize("device, tp, gpus", [("cpu", 2, 0), ("cuda", 1, 1), ("cuda", 2, 2)])
def test_engine_replicas_reserve_a_gpu_per_rank_on_cuda(device, tp, gpus):
    config = EngineConfig(model=None, device=device, tensor_parallel_size=tp, max_num_seqs=8)
    fixed = ray_serve.engine_options(config, ray_serve.ReplicaSettings(2, None, None, 4.0), "engine-m")
    assert fixed["ray_actor_options"] == {"num_cpus": 4.0, "num_gpus": gpus}
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    scaled = ray_serve.engine_options(config, ray_serve.ReplicaSettings(1, 3, None, 4.0), "engine-m")
    assert scaled["autoscaling_config"]["max_replicas"] == 3
    assert scaled["autoscaling_config"]["target_ongoing_requests"] == 8  # max_num_seqs by default
