"""The KV block pool: free list, reference counts, and automatic prefix caching.

A full block is named by a chained sha256 digest of (parent block's digest, its token ids, and the id of
the LoRA adapter that computes it, if any), so equal prefixes of the same adapter map to equal digest
chains, and an adapter's blocks never serve the base model or another adapter. A digest only finds a
candidate: a prefix hit also needs the cached block to hold the same tokens after the same parent block,
so even a digest collision never shares KV between different prefixes. Blocks become findable when they
are allocated for the step that fills them, so sequences admitted later in that step (the n samples of
one request, equal prompts) share them. Blocks whose reference count drops to zero go to the back of the
free queue but stay findable: a later request with the same prefix takes them back (a prefix hit) until
they are evicted, front first (least recently freed), to serve new allocations.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

from tokenmill.engine.core.request import Sequence

_ROOT = bytes(32)  # the parent digest of a sequence's first block
_NO_PARENT = -1


def hash_block(parent: bytes | None, token_ids: tuple[int, ...],
               extra_keys: tuple[bytes | str, ...] = ()) -> bytes:
    """The sha256 digest naming a full block: its parent block's digest (None for a sequence's first
    block), its token ids, and extra_keys.

    extra_keys holds whatever besides the tokens decides the block's KV: a LoRA adapter's id (see
    _extra_keys), later maybe an image's hash or a per-tenant cache salt. Every part is fixed-width or
    length-prefixed, so two different inputs never give the same bytes.
    """
    h = hashlib.sha256(_ROOT if parent is None else parent)
    h.update(struct.pack(f"<{len(token_ids) + 1}q", len(token_ids), *token_ids))
    for key in extra_keys:
        data = key.encode() if isinstance(key, str) else key
        h.update(struct.pack("<?q", isinstance(key, str), len(data)) + data)
    return h.digest()


class BlockManager:
    """Bookkeeping only: no tensors. Block i of the pool backs slots [i * block_size, (i+1) * block_size)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        # What a cached block's KV was computed from: its parent block (or _NO_PARENT), its LoRA adapter's id
        # (0: none) and its own tokens.
        self.block_key: list[tuple[int, int, tuple[int, ...]] | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block digest -> block id
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _block_tokens(self, seq: Sequence, i: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])

    def _full_block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Extend seq.block_hashes to cover its first num_blocks full blocks."""
        hashes = seq.block_hashes
        extra_keys = (f"lora:{seq.lora_id}",) if seq.lora_id else ()  # the base model's digests stay as they were
        for i in range(len(hashes), num_blocks):
            hashes.append(hash_block(hashes[i - 1] if i else None, self._block_tokens(seq, i), extra_keys))
        return hashes[:num_blocks]

    def _block_key(self, seq: Sequence, i: int, parent: int) -> tuple[int, int, tuple[int, ...]]:
        return parent, seq.lora_id, self._block_tokens(seq, i)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of seq, leaving at least one token to compute
        (the last token's logits are needed to sample)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for i, h in enumerate(self._full_block_hashes(seq, (seq.num_tokens - 1) // self.block_size)):
            block_id = self.cached.get(h)
            parent = hits[-1] if hits else _NO_PARENT
            # The digest only finds a candidate: its KV is ours only with our tokens after our parent, under our
            # adapter.
            if block_id is None or self.block_key[block_id] != self._block_key(seq, i, parent):
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

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] | None = None,
                 num_lookahead_tokens: int = 0) -> bool:
        """Give seq the blocks for num_new_tokens more tokens, computed in the coming step, and make the
        blocks those tokens fill findable. On admission, cached_blocks (maybe empty) is its prefix found
        in the cache. num_lookahead_tokens more slots hold draft tokens to verify: their blocks are never
        registered (the drafts may be rejected), and trim() gives back those left unused. Returns False,
        changing nothing, if the pool is short."""
        if not self.can_allocate(seq, num_new_tokens + num_lookahead_tokens, cached_blocks):
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
            seq.num_draft_computed = seq.num_computed_tokens  # a draft model computed them too, if there is one
            seq.num_registered_blocks = len(cached_blocks)
        for _ in range(self._blocks_needed(seq, num_new_tokens + num_lookahead_tokens, 0)):
            seq.block_ids.append(self._take_free_block())
        self._register_full_blocks(seq, seq.num_computed_tokens + num_new_tokens)
        return True

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Make the blocks that seq's first num_tokens fill findable by later requests.

        This runs at allocation, before the step computes their KV: a sequence admitted later in the same
        step may take them, since attention writes a step's KV before any of it is read. It relies on
        schedule() being followed by that step: should the step fail instead, its requests are aborted,
        and free() makes these blocks unfindable again.
        """
        if not self.enable_prefix_caching:
            return
        num_full = num_tokens // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        hashes = self._full_block_hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block_id, h = seq.block_ids[i], hashes[i]
            if h not in self.cached:  # an equal block of another sequence keeps its place
                self.cached[h] = block_id
                self.block_hash[block_id] = h
                parent = seq.block_ids[i - 1] if i else _NO_PARENT
                self.block_key[block_id] = self._block_key(seq, i, parent)
        seq.num_registered_blocks = num_full

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        self._uncache(block_id)  # evict: its content is about to be overwritten
        assert self.ref_counts[block_id] == 0
        self.ref_counts[block_id] = 1
        return block_id

    def _uncache(self, block_id: int) -> None:
        h = self.block_hash[block_id]
        if h is not None:
            if self.cached.get(h) == block_id:
                del self.cached[h]
            self.block_hash[block_id] = None
            self.block_key[block_id] = None

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; the tail goes first so shared prefixes outlive their suffixes.

        A cached block is only ever held together with the parent it was computed after, so it is freed,
        and evicted, before that parent: a block's recorded parent is never reused while it is cached.
        """
        # Blocks registered for a step that never ran (it failed, and its requests are being aborted)
        # hold no KV. After any step that ran, num_computed_tokens covers every registered block.
        for block_id in seq.block_ids[seq.num_computed_tokens // self.block_size:seq.num_registered_blocks]:
            self._uncache(block_id)
        for block_id in reversed(seq.block_ids):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, "block freed twice"
            if self.ref_counts[block_id] == 0:
                self.free_queue[block_id] = None
        seq.block_ids = []
        seq.num_computed_tokens = seq.num_draft_computed = 0
        seq.num_registered_blocks = 0

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past seq's tokens: those that held only rejected draft tokens. Never
        registered, and held by seq alone, they go straight back to the free queue."""
        keep = -(-seq.num_tokens // self.block_size)
        for block_id in reversed(seq.block_ids[keep:]):
            assert self.ref_counts[block_id] == 1 and self.block_hash[block_id] is None
            self.ref_counts[block_id] = 0
            self.free_queue[block_id] = None
        del seq.block_ids[keep:]

    def reset_prefix_cache(self) -> None:
        for block_id in self.cached.values():
            self.block_hash[block_id] = None
            self.block_key[block_id] = None
        self.cached.clear()
