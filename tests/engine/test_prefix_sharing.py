"""Prefix sharing within one step: a request's n samples and equal prompts admitted together compute
their common full blocks once, and sample exactly what they sample without prefix caching."""
import pytest

from tokenmill.engine import LLM, SamplingParams
from tokenmill.engine.core.block_manager import BlockManager
from tokenmill.engine.core.request import Sequence
from tokenmill.engine.core.scheduler import Scheduler

TEXT = ("The history of the Roman Empire spans many centuries, beginning with the founding of the city and "
        "ending with the fall of Constantinople. Historians divide it into periods such as the Principate, "
        "the Crisis of the Third Century and the Dominate, each with its own emperors, wars, reforms and "
        "rebellions. Trade routes carried grain, wine and olive oil across the Mediterranean, while roads "
        "and aqueducts bound the provinces to Rome.")


def make_seqs(request_id: str, prompt: list[int], n: int) -> list[Sequence]:
    return [Sequence(f"{request_id}#{i}", request_id, i, prompt, SamplingParams(n=n), None, None, 0.0)
            for i in range(n)]


@pytest.mark.parametrize("prompt_len, tail", [(100, 4), (96, 16)])
def test_n_samples_admitted_in_one_step_compute_the_prompt_once(prompt_len, tail):
    bm = BlockManager(64, 16)
    sched = Scheduler(bm, 8, 1024)
    seqs = make_seqs("r", list(range(prompt_len)), 4)
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    assert out.seqs == seqs
    # The first sample computes the prompt; the others only what follows its last full cached block
    # (at least one token, whose logits they sample).
    assert out.num_tokens == [prompt_len] + [tail] * 3
    shared = (prompt_len - tail) // 16
    assert all(s.block_ids[:shared] == seqs[0].block_ids[:shared] for s in seqs)
    assert len({s.block_ids[shared] for s in seqs}) == 4
    assert bm.ref_counts[seqs[0].block_ids[0]] == 4
    assert bm.prefix_queries == 4 * prompt_len and bm.prefix_hits == 3 * shared * 16


def test_equal_prompts_added_together_share_their_blocks():
    bm = BlockManager(64, 16)
    sched = Scheduler(bm, 8, 1024)
    a, b = make_seqs("a", list(range(40)), 1) + make_seqs("b", list(range(40)), 1)
    sched.add(a)
    sched.add(b)
    assert sched.schedule().num_tokens == [40, 8]
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert b.num_cached_tokens == 32


@pytest.fixture(scope="module")
def llms():
    return LLM(dtype="float32"), LLM(dtype="float32", enable_prefix_caching=False)


@pytest.mark.parametrize("params", [SamplingParams(n=4, temperature=0, max_tokens=12),
                                    SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=12)],
                         ids=["greedy", "seeded"])
def test_n_samples_sharing_the_prompt_sample_what_unshared_samples_do(llms, params):
    shared, plain = llms
    ids = shared.get_tokenizer().encode(TEXT + " " + TEXT)[:100]
    assert len(ids) == 100
    prompt = {"prompt_token_ids": ids}
    engine = shared.engine
    scheduled = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        scheduled.append(out.total_tokens)
        return out

    engine.scheduler.schedule = recording_schedule
    try:
        hits_before = engine.block_manager.prefix_hits
        got = shared.generate(prompt, params, use_tqdm=False)[0]
    finally:
        del engine.scheduler.schedule
    # The first step computes the 96 tokens of full blocks once, and 4 tokens for each sample (or only
    # the 4 each, if the other parametrization left the full blocks cached).
    assert scheduled[0] in (100 + 3 * 4, 4 * 4)
    assert engine.block_manager.prefix_hits - hits_before >= 3 * 96
    expected = plain.generate(prompt, params, use_tqdm=False)[0]
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in expected.outputs]
    if params.temperature:
        assert len({tuple(c.token_ids) for c in got.outputs}) > 1
