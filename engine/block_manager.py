"""The KV block pool: free list, reference counts, and automatic prefix caching.

A full block is named by a chained hash of (parent block's hash, its token ids), so equal prefixes map
to equal hash chains. Blocks whose reference count drops to zero go to the back of the free queue but
keep their hash: a later request with the same prefix takes them back (a prefix hit) until they are
evicted, front first (least recently freed), to serve new allocations.
"""
from __future__ import annotations

from collections import OrderedDict

from .request import Sequence


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class BlockManager:
    """Bookkeeping only: no tensors. Block i of the pool backs slots [i * block_size, (i+1) * block_size)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _full_block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Extend seq.block_hashes to cover its first num_blocks full blocks."""
        bs, hashes = self.block_size, seq.block_hashes
        for i in range(len(hashes), num_blocks):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
        return hashes[:num_blocks]

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of seq, leaving at least one token to compute
        (the last token's logits are needed to sample)."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in self._full_block_hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        cached_blocks = cached_blocks or ()
        needed = self._blocks_needed(seq, num_new_tokens, len(cached_blocks))
        # Cached blocks nobody holds sit in the free queue: taking them uses up free blocks too.
        reclaimed = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        return needed + reclaimed <= self.num_free_blocks

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int, num_cached: int) -> int:
        total = seq.num_computed_tokens + num_cached * self.block_size + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_ids) - num_cached)

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Give seq the blocks for num_new_tokens more tokens. On admission, cached_blocks (maybe
        empty) is its prefix found in the cache. Returns False, changing nothing, if the pool is short."""
        if not self.can_allocate(seq, num_new_tokens, cached_blocks):
            return False
        if cached_blocks is not None and self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += len(cached_blocks) * self.block_size
        if cached_blocks:
            assert not seq.block_ids and seq.num_computed_tokens == 0
            for b in cached_blocks:
                if self.ref_counts[b] == 0:
                    del self.free_queue[b]
                self.ref_counts[b] += 1
            seq.block_ids = list(cached_blocks)
            seq.num_computed_tokens = seq.num_cached_tokens = len(cached_blocks) * self.block_size
            seq.num_registered_blocks = len(cached_blocks)
        for _ in range(self._blocks_needed(seq, num_new_tokens, 0)):
            seq.block_ids.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        h = self.block_hash[block_id]
        if h is not None:  # evict: its content is about to be overwritten
            if self.cached.get(h) == block_id:
                del self.cached[h]
            self.block_hash[block_id] = None
        assert self.ref_counts[block_id] == 0
        self.ref_counts[block_id] = 1
        return block_id

    def register_full_blocks(self, seq: Sequence) -> None:
        """Make seq's newly computed full blocks findable by later requests."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        hashes = self._full_block_hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block_id, h = seq.block_ids[i], hashes[i]
            if h not in self.cached:  # an equal block computed by another sequence keeps its place
                self.cached[h] = block_id
                self.block_hash[block_id] = h
        seq.num_registered_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; the tail goes first so shared prefixes outlive their suffixes."""
        for block_id in reversed(seq.block_ids):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, "block freed twice"
            if self.ref_counts[block_id] == 0:
                self.free_queue[block_id] = None
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        for h, block_id in self.cached.items():
            self.block_hash[block_id] = None
        self.cached.clear()
