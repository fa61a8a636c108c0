"""Scheduler and block manager under random add / step / abort sequences (hypothesis)."""
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.engine.core.block_manager import BlockManager
from tokenmill.engine.core.request import Sequence, Status
from tokenmill.engine.core.scheduler import Scheduler
from tokenmill.engine.sampling.sampling_params import SamplingParams


def check_invariants(sched: Scheduler, live: list[Sequence]) -> None:
    bm = sched.block_manager
    refs = [0] * bm.num_blocks
    for seq in live:
        for b in seq.block_ids:
            refs[b] += 1
    assert refs == bm.ref_counts, "reference counts disagree with the block tables"
    assert set(bm.free_queue) == {b for b in range(bm.num_blocks) if refs[b] == 0}, "free list leaks"
    for h, b in bm.cached.items():
        assert bm.block_hash[b] == h and bm.block_key[b] is not None
    for seq in live:
        if seq.status == Status.WAITING:
            assert seq.block_ids == [] and seq.num_computed_tokens == 0


class KVCache:
    """An oracle of what the paged cache holds: each slot records the token prefix whose KV was written
    there. As in the model, a step writes all its tokens' KV before any sequence reads."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.slots: dict[int, tuple[int, ...]] = {}

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def run_step(self, seqs: list[Sequence], num_tokens: list[int]) -> None:
        for seq, n in zip(seqs, num_tokens, strict=False):
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                self.slots[self._slot(seq, pos)] = tuple(seq.token_ids[:pos + 1])
        for seq, n in zip(seqs, num_tokens, strict=False):
            for pos in range(seq.num_computed_tokens + n):
                assert self.slots.get(self._slot(seq, pos)) == tuple(seq.token_ids[:pos + 1]), \
                    f"{seq.seq_id} attends to another prefix's KV at position {pos}"


ops = st.lists(st.tuples(st.sampled_from(["add", "step", "step", "step", "abort"]),
                         st.integers(0, 10_000)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(8, 40), budget=st.integers(1, 64), max_seqs=st.integers(1, 6),
       block_size=st.sampled_from([2, 4, 16]), caching=st.booleans())
def test_random_traffic_never_leaks_or_overruns_and_everything_finishes(
        ops, num_blocks, budget, max_seqs, block_size, caching):
    bm = BlockManager(num_blocks, block_size, caching)
    sched = Scheduler(bm, max_seqs, budget)
    capacity = num_blocks * block_size
    live: list[Sequence] = []
    finished: list[Sequence] = []
    prefixes = [[1, 2, 3, 4, 5, 6, 7, 8] * 2, [9] * 12, []]
    kv = KVCache(block_size)

    def step():
        out = sched.schedule()
        assert out.total_tokens <= budget
        assert len(out.seqs) <= max_seqs and len(set(map(id, out.seqs))) == len(out.seqs)
        for seq, n in zip(out.seqs, out.num_tokens, strict=False):
            assert n >= 1 and seq.status == Status.RUNNING
            assert len(seq.block_ids) * block_size >= seq.num_computed_tokens + n
        kv.run_step(out.seqs, out.num_tokens)
        for seq, n in zip(out.seqs, out.num_tokens, strict=False):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(seq.num_tokens % 50)
                if len(seq.output_token_ids) >= seq.params.max_tokens:
                    sched.finish(seq)
                    live.remove(seq)
                    finished.append(seq)
        check_invariants(sched, live)
        return out

    for op, arg in ops:
        rng = random.Random(arg)
        if op == "add":
            max_tokens = rng.randint(1, 8)
            prompt = rng.choice(prefixes) + [rng.randint(0, 99) for _ in range(rng.randint(1, 20))]
            prompt = prompt[: max(1, capacity - max_tokens)]
            for i in range(rng.choice([1, 1, 2, 4])):  # n samples of one prompt, added together
                seq = Sequence(f"{arg}#{i}", str(arg), i, prompt, SamplingParams(max_tokens=max_tokens),
                               None, None, 0.0)
                sched.add(seq)
                live.append(seq)
        elif op == "abort" and live:
            seq = rng.choice(live)
            sched.finish(seq)
            live.remove(seq)
        else:
            step()
    for _ in range(10_000):
        if not sched.has_unfinished():
            break
        step()
    assert not sched.has_unfinished() and not live
    assert bm.num_free_blocks == num_blocks and all(r == 0 for r in bm.ref_counts)


def test_long_prompt_is_prefilled_in_chunks_while_decodes_keep_running():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, 8, 10)
    short = Sequence("a", "a", 0, [1, 2], SamplingParams(max_tokens=50), None, None, 0.0)
    sched.add(short)
    out = sched.schedule()
    short.num_computed_tokens += out.num_tokens[0]
    short.append_token(3)
    long = Sequence("b", "b", 0, list(range(40)), SamplingParams(), None, None, 0.0)
    sched.add(long)
    chunks = []
    while long.num_computed_tokens < long.num_tokens:
        out = sched.schedule()
        assert out.seqs[0] is short and out.num_tokens[0] == 1  # the decode goes first, every step
        chunks.append(out.num_tokens[1])
        for seq, n in zip(out.seqs, out.num_tokens, strict=False):
            seq.num_computed_tokens += n
        short.append_token(3)
    assert chunks == [9, 9, 9, 9, 4]


def test_pool_exhaustion_preempts_newest_and_requeues_it_first():
    bm = BlockManager(4, 2)
    sched = Scheduler(bm, 8, 100)
    a = Sequence("a", "a", 0, [1, 2, 3], SamplingParams(max_tokens=10), None, None, 0.0)
    b = Sequence("b", "b", 0, [4, 5, 6], SamplingParams(max_tokens=10), None, None, 0.0)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.seqs == [a, b]
    for seq, n in zip(out.seqs, out.num_tokens, strict=False):
        seq.num_computed_tokens += n
        seq.append_token(0)
    a.append_token(0)  # a now needs a third block: b must give way
    a.num_computed_tokens += 1
    out = sched.schedule()
    assert out.seqs == [a] and out.num_preempted == 1
    assert sched.waiting[0] is b and b.block_ids == [] and b.num_computed_tokens == 0
