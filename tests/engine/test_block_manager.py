"""Block pool bookkeeping: prefix hits, LRU eviction, reference counts."""
from engine.block_manager import BlockManager
from engine.request import Sequence
from engine.sampling_params import SamplingParams


def make_seq(ids, name="s"):
    return Sequence(name, name, 0, list(ids), SamplingParams(), None, None, 0.0)


def run_prefill(bm, seq):
    cached = bm.find_cached_prefix(seq)
    n = seq.num_tokens - len(cached) * bm.block_size
    assert bm.allocate(seq, n, cached)
    seq.num_computed_tokens += n
    bm.register_full_blocks(seq)
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
