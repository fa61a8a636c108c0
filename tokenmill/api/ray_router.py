"""Prefix-aware routing over Ray Serve replicas: a request goes to the replica that already holds its
prompt's prefix in its KV cache, unless that replica is much busier than another.

The ingress tokenizes, so the router sees token ids and hashes them as the engines' prefix caches do: a
chain of hashes over full blocks of block_size tokens, each covering its block and every block before
it. PrefixIndex remembers which replica was sent which blocks (an approximation of its cache: the
engine may have evicted them since), bounded by max_blocks with the least recently sent going first.
Each ingress process keeps its own index, as SGLang's and Ray Serve LLM's routers keep theirs.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the prompt's full blocks: equal prefixes of whole blocks give equal lists."""
    hashes, h = [], 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hash((h, tuple(token_ids[start:start + block_size])))
        hashes.append(h)
    return hashes


class PrefixIndex:
    """Which replica was sent which prompt blocks (see the module docstring)."""

    def __init__(self, max_blocks: int = 1 << 20):
        self.max_blocks = max_blocks
        self._owners: OrderedDict[int, set[str]] = OrderedDict()  # block hash -> replicas, least recent first

    def __len__(self) -> int:
        return len(self._owners)

    def match(self, hashes: list[int], replicas: Sequence[str]) -> dict[str, int]:
        """How many leading blocks of the prompt each replica holds."""
        matched = dict.fromkeys(replicas, 0)
        alive = set(replicas)
        for i, h in enumerate(hashes):
            alive &= self._owners.get(h, set())
            if not alive:
                break
            for r in alive:
                matched[r] = i + 1
        return matched

    def insert(self, hashes: list[int], replica: str) -> None:
        for h in hashes:
            self._owners.setdefault(h, set()).add(replica)
            self._owners.move_to_end(h)
        while len(self._owners) > self.max_blocks:
            self._owners.popitem(last=False)

    def drop(self, replica: str) -> None:
        """Forget a replica that is gone (its cache went with it)."""
        for h in [h for h, owners in self._owners.items() if replica in owners]:
            owners = self._owners[h]
            owners.discard(replica)
            if not owners:
                del self._owners[h]


def prompt_token_ids(pending_request: PendingRequest | None) -> list[int] | None:
    """The token ids of the AddRequest a pending request carries (engine/core/engine_core.py)."""
    if pending_request is None:
        return None
    return next((arg.prompt_token_ids for arg in pending_request.args if hasattr(arg, "prompt_token_ids")), None)


class PrefixAwareRouter(RequestRouter):
    """Ray Serve's RequestRouter for the engine deployment (see the module docstring).

    Among the candidates, the replica holding the longest prefix of the prompt comes first when it holds at
    least min_match_rate of the prompt's blocks and its queue is at most max_imbalance requests longer
    than the shortest; the rest follow in random order, of which Serve takes the one with the shortest
    queue. A prompt that matches nowhere thus goes to the least busy replica, and similar prompts follow it.
    """

    def initialize_state(self, block_size: int = 16, min_match_rate: float = 0.5, max_imbalance: int = 8,
                         max_blocks: int = 1 << 20) -> None:
        self.block_size = block_size
        self.min_match_rate = min_match_rate
        self.max_imbalance = max_imbalance
        self.index = PrefixIndex(max_blocks)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # retried rounds wait, not spin
        others = random.sample(candidate_replicas, len(candidate_replicas))
        ids = prompt_token_ids(pending_request)
        hashes = block_hashes(ids, self.block_size) if ids else []
        if not hashes or len(candidate_replicas) < 2:
            return [others]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        matched = self.index.match(hashes, list(by_id))
        best = max(matched, key=matched.get)
        if matched[best] < self.min_match_rate * len(hashes):
            return [others]
        queue = {r: self.replica_queue_len_cache.get(by_id[r].replica_id) or 0 for r in by_id}
        if queue[best] - min(queue.values()) > self.max_imbalance:
            return [others]
        return [[by_id[best]], [r for r in others if r is not by_id[best]]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        ids = prompt_token_ids(pending_request)
        if ids:
            self.index.insert(block_hashes(ids, self.block_size), replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.drop(replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = set(self.curr_replicas) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for replica_id in gone:
            self.index.drop(replica_id.unique_id)
