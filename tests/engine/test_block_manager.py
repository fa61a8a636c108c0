"""Block pool bookkeeping: prefix hits, LRU eviction, reference counts, collision-proof block keys."""
import hashlib

import tokenmill.engine.core.block_manager as block_manager
from tokenmill.engine.core.block_manager import BlockManager, hash_block
from tokenmill.engine.core.request import Sequence
from tokenmill.engine.sampling.sampling_params import SamplingParams


def make_seq(ids, name="s"):
    return Sequence(name, name, 0, list(ids), SamplingParams(), None, None, 0.0)


def run_prefill(bm, seq):
    cached = bm.find_cached_prefix(seq)
    n = seq.num_tokens - len(cached) * bm.block_size
    assert bm.allocate(seq, n, cached)
    seq.num_computed_tokens += n
    return cached


def test_shared_prefix_reuses_cached_blocks_and_leaves_last_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(range(10), "a")
    run_prefill(bm, a)
    b = make_seq(list(range(8)) + [99, 98], "b")
    cached = run_prefill(bm, b)
    assert cached == a.block_ids[:2]
    assert b.num_cached_tokens == 8
    assert bm.ref_counts[a.block_ids[0]] == 2
    # A prompt that is exactly two cached blocks still computes its last token itself.
    c = make_seq(range(8), "c")
    assert bm.find_cached_prefix(c) == a.block_ids[:1]


def test_freed_blocks_stay_cached_until_evicted_in_lru_order():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(range(9), "a")  # 3 blocks: two full (cached), one partial
    run_prefill(bm, a)
    full = a.block_ids[:2]
    bm.free(a)
    assert bm.num_free_blocks == 4
    again = make_seq(range(9), "again")
    assert bm.find_cached_prefix(again) == full
    # Filling the pool with other content evicts them.
    other = make_seq(range(100, 116), "other")
    run_prefill(bm, other)
    assert bm.find_cached_prefix(make_seq(range(9), "x")) == []


def test_shared_block_is_never_handed_out_while_referenced():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = make_seq(range(12), "a")
    run_prefill(bm, a)
    b = make_seq(list(range(8)) + [7, 7, 7, 7], "b")
    run_prefill(bm, b)
    bm.free(a)
    held = set(b.block_ids)
    c = make_seq(range(200, 208), "c")
    run_prefill(bm, c)
    assert held.isdisjoint(c.block_ids)


def test_allocation_fails_without_side_effects_when_pool_is_short():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = make_seq(range(12))
    assert not bm.allocate(s, 12, [])
    assert s.block_ids == [] and bm.num_free_blocks == 2


def test_block_digest_is_sha256_of_parent_tokens_and_extra_keys():
    d = hash_block(None, (1, 2, 3))
    assert len(d) == 32 and d == hash_block(None, (1, 2, 3))
    assert d != hash_block(None, (1, 2, 4)) and d != hash_block(bytes(range(32)), (1, 2, 3))
    assert d != hash_block(None, (1, 2, 3), ("lora-7",)) != hash_block(None, (1, 2, 3), (b"lora-7",))
    # Tokens are fixed-width and length-prefixed: (1, 2) + (3,) and (1,) + (2, 3) name different chains.
    assert hash_block(hash_block(None, (1, 2)), (3,)) != hash_block(hash_block(None, (1,)), (2, 3))


def test_tokens_whose_builtin_hashes_collide_do_not_share_a_block():
    # The old key, Python's hash() of (parent hash, token ids), is equal for these two blocks.
    assert hash((None, (5, -1))) == hash((None, (5, -2)))
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq([5, -1, 7], "a")
    run_prefill(bm, a)
    b = make_seq([5, -2, 7], "b")
    assert run_prefill(bm, b) == []
    assert b.block_ids[0] != a.block_ids[0] and b.num_cached_tokens == 0


def test_forced_digest_collision_is_refused_by_the_token_check(monkeypatch):
    monkeypatch.setattr(block_manager, "hash_block", lambda parent, token_ids, extra_keys=(): bytes(32))
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq([1, 2, 3, 4, 9], "a")
    run_prefill(bm, a)
    assert run_prefill(bm, make_seq([5, 6, 7, 8, 9], "b")) == []
    # The check refuses only what differs: the same tokens still hit.
    assert run_prefill(bm, make_seq([1, 2, 3, 4, 0], "c")) == a.block_ids[:1]


def test_block_after_a_different_prefix_is_not_shared_even_if_its_digest_matches(monkeypatch):
    # A digest blind to the parent: block [5, 6, 7, 8] gets one digest whatever precedes it.
    def hash_tokens_only(parent, token_ids, extra_keys=()):
        return hashlib.sha256(str(token_ids).encode()).digest()

    monkeypatch.setattr(block_manager, "hash_block", hash_tokens_only)
    bm = BlockManager(num_blocks=16, block_size=4)
    run_prefill(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0], "a"))
    b = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 0], "b")
    run_prefill(bm, b)
    # c's second block has a's digest and tokens, but a computed its KV after [1, 2, 3, 4], not [9, 9, 9, 9].
    assert run_prefill(bm, make_seq([9, 9, 9, 9, 5, 6, 7, 8, 1], "c")) == b.block_ids[:1]


def test_blocks_are_findable_from_allocation_and_decode_grown_ones_too():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(range(5), "a")
    assert bm.allocate(a, 5, [])
    assert bm.find_cached_prefix(make_seq(range(6), "x")) == a.block_ids[:1]  # before a's step runs
    a.num_computed_tokens = 5
    for t in (5, 6, 7):  # decodes; the one computing token 7 fills block 1
        a.append_token(t)
        assert bm.allocate(a, 1)
        a.num_computed_tokens += 1
    assert bm.find_cached_prefix(make_seq(range(9), "y")) == a.block_ids[:2]


def test_blocks_registered_for_a_step_that_never_ran_are_forgotten_when_freed():
    bm = BlockManager(num_blocks=8, block_size=4)
    done = make_seq(range(5), "done")
    run_prefill(bm, done)
    a = make_seq(range(13), "a")
    cached = bm.find_cached_prefix(a)
    assert bm.allocate(a, a.num_tokens - 4, cached)  # registers blocks 1 and 2; then the step fails
    bm.free(a)  # the failed step's requests are aborted
    assert bm.find_cached_prefix(make_seq(range(13), "b")) == done.block_ids[:1]
