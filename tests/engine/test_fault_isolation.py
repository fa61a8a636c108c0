"""One request's failure is its own: with faults injected into chosen requests, every other request in
the batch gives exactly the tokens it gives alone, the failing one ends with an error naming it, and
every KV block comes back. Also: the engine hands out deltas, and min_tokens with a stop string works."""
import pytest

from tokenmill.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
GOOD = ["The capital of France is", "def fibonacci(n):", "List three colors:"]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", kv_cache_memory=64 << 20, fault_injection="request:FAULTY,sampler:BADROW")


@pytest.fixture(scope="module")
def alone(llm):
    """Each good prompt's tokens when it runs by itself."""
    return [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in GOOD]


def all_blocks_free(llm) -> bool:
    bm = llm.engine.block_manager
    return bm.num_free_blocks == bm.num_blocks and not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("marker", ["FAULTY", "BADROW"], ids=["detokenize-stage", "sampler"])
def test_a_failing_request_ends_alone_and_the_others_are_unchanged(llm, alone, marker):
    prompts = [GOOD[0], f"{marker} please", GOOD[1], GOOD[2]]
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=12, n=2), GREEDY, GREEDY]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in (outs[0], outs[2], outs[3])] == alone
    assert all(o.error is None and o.outputs[0].finish_reason == "length" for o in (outs[0], outs[2], outs[3]))
    bad = outs[1]
    assert bad.finished and bad.error is not None
    assert f"request {bad.request_id} failed" in bad.error and "injected" in bad.error
    assert [c.finish_reason for c in bad.outputs] == ["error", "error"]
    assert all_blocks_free(llm)


def test_min_tokens_with_a_stop_string_that_matches_early_does_not_break(llm):
    # Issue 10, bug 1: " " matches within the first tokens; the stop must wait for min_tokens.
    out = llm.generate(["Hi"], SamplingParams(stop=[" "], min_tokens=5, max_tokens=40, temperature=0),
                       use_tqdm=False)[0]
    o = out.outputs[0]
    assert out.error is None and len(o.token_ids) >= 5
    assert o.finish_reason == "length" or (o.finish_reason == "stop" and o.stop_reason == " ")
    assert all_blocks_free(llm)


def test_stop_string_ending_after_min_tokens_still_stops(llm):
    # A stop counts from the 3rd output token on (min_tokens=3): find the first token at or after it
    # whose text adds a space, then check that the run stops exactly there.
    tok = llm.get_tokenizer()
    prompt = "The capital of France is"
    free = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), use_tqdm=False)
    ids = free[0].outputs[0].token_ids
    texts = [tok.decode(ids[:i]) for i in range(1, len(ids) + 1)]
    first_after = next(i for i in range(2, len(ids)) if texts[i].count(" ") > texts[1].count(" "))
    out = llm.generate([prompt], SamplingParams(stop=[" "], min_tokens=3, max_tokens=30, temperature=0,
                                              ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == first_after + 1


def test_step_outputs_are_deltas_holding_only_new_tokens(llm):
    engine = llm.engine
    engine.add_request("delta", "Once upon a time", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                                   logprobs=2))
    seen, text = [], ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            (o,) = out.outputs
            assert len(o.token_ids) == 1 and len(o.logprobs) == 1  # one decode step, one new token
            seen += o.token_ids
            text += o.text
    want = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert seen == want.token_ids and text == want.text


def test_penalty_statistics_are_updated_incrementally(llm):
    engine = llm.engine
    engine.add_request("pen", "Once upon a time", SamplingParams(temperature=0, max_tokens=6,
                                                                 repetition_penalty=1.2, ignore_eos=True))
    (seq,) = engine.requests["pen"].seqs
    states = set()
    while engine.has_unfinished_requests():
        engine.step()
        if seq.penalty_state is not None:
            states.add(id(seq.penalty_state))
            # counts reflect exactly the tokens sampled so far (the newest one is counted next step)
            assert seq.penalty_state.output_counts.sum().item() == seq.penalty_state.num_counted
    assert len(states) == 1  # built once, not rebuilt each step


def test_abort_does_not_detokenize_so_a_broken_detokenizer_cannot_fail_it(llm):
    engine = llm.engine
    engine.add_request("to-abort", "Once upon a time", SamplingParams(max_tokens=20, n=2, stop=["zzz"]))
    engine.step()
    for seq in engine.requests["to-abort"].seqs:
        seq.detokenizer.finish = lambda: 1 / 0
    engine.abort_request("to-abort")
    assert all_blocks_free(llm)
