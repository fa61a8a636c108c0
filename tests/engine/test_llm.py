"""The default model end to end: exact greedy output against transformers, and every scheduling path
(batching, preemption, chunked prefill, prefix caching) giving the same tokens as the plain run."""

import pytest
import torch

from tokenmill.engine import LLM, SamplingParams

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "List three colors:",
    "Translate to French: I like cheese.",
    "A",
    "The history of the Roman Empire spans many centuries, beginning with the founding of the city "
    "and ending with the fall of Constantinople. Historians divide it into periods such as",
    "Q: What is 12 times 12?\nA:",
    "Write a haiku about autumn leaves falling gently on a quiet pond in the early morning light.",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


@pytest.fixture(scope="module")
def batch_tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def hf_tokens(llm, hf_model):
    tok = llm.get_tokenizer()
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        gen = hf_model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def test_greedy_batch_matches_transformers_token_for_token(batch_tokens, hf_tokens):
    assert batch_tokens == hf_tokens


def test_each_prompt_alone_gives_the_same_tokens_as_in_the_batch(llm, batch_tokens):
    for prompt, expected in zip(PROMPTS, batch_tokens, strict=False):
        assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected


def test_tiny_kv_cache_forces_preemption_and_outputs_stay_identical(batch_tokens):
    # 14 blocks of 16 tokens cannot hold nine sequences at once.
    small = LLM(dtype="float32", kv_cache_memory=14 * 2 * 30 * 16 * 3 * 64 * 4, max_num_seqs=16)
    outs = small.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == batch_tokens
    assert small.engine.block_manager.num_free_blocks == small.engine.block_manager.num_blocks
    _assert_iteration_tokens_add_up(small)


def test_chunked_prefill_of_prompt_longer_than_token_budget_gives_same_tokens(batch_tokens):
    chunked = LLM(dtype="float32", max_num_batched_tokens=7, enable_prefix_caching=False)
    outs = chunked.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == batch_tokens
    _assert_iteration_tokens_add_up(chunked)


def _assert_iteration_tokens_add_up(llm: LLM) -> None:
    """Tokens per step, as vLLM counts them (a prompt once, in the step of its first token; each generated
    token), add up to the prompt and generated tokens of the finished one-sample requests: preemptions'
    recomputation and prefill chunks without a token are not counted again."""
    stats = llm.engine.stats()
    assert stats.iteration_tokens.tokens == stats.prompt_tokens + stats.generation_tokens
    assert 0 < sum(stats.iteration_tokens.counts) <= stats.generation_tokens


def test_prefix_cache_hits_on_shared_prefix_give_identical_outputs(llm):
    prefix = PROMPTS[6] + " " + PROMPTS[8] + " "
    prompts = [prefix + q for q in ("Summarize.", "Who wrote it?", "Continue the story.")]
    plain = LLM(dtype="float32", enable_prefix_caching=False).generate(prompts, GREEDY, use_tqdm=False)
    bm = llm.engine.block_manager
    hits_before = bm.prefix_hits
    first = llm.generate(prompts[0], GREEDY, use_tqdm=False)
    rest = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert bm.prefix_hits - hits_before >= 2 * 16 * 2
    assert rest[0].num_cached_tokens >= 32
    got = [o.outputs[0].token_ids for o in first + rest]
    assert got == [o.outputs[0].token_ids for o in plain]


def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20)
    alone = llm.generate(PROMPTS[0], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.2, max_tokens=20)
    mixed = llm.generate(PROMPTS[:4], [seeded, others, others, others], use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone


def test_n_samples_stop_strings_and_logprobs(llm):
    out = llm.generate("List three colors:", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=16,
                                                            logprobs=2), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids)
        assert all(len(e) in (2, 3) and t in e for t, e in zip(c.token_ids, c.logprobs, strict=False))
        assert c.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(c.token_ids, c.logprobs, strict=False)))
    full = llm.generate(PROMPTS[1], GREEDY, use_tqdm=False)[0].outputs[0].text
    stop = full.strip().split()[1]  # a word that occurs in the greedy text
    cut = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=24, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full[:full.index(stop)]


def test_prompt_over_context_is_rejected_before_taking_memory(llm):
    free = llm.engine.block_manager.num_free_blocks
    with pytest.raises(ValueError, match="context"):
        llm.generate({"prompt_token_ids": [1] * 8000}, SamplingParams(max_tokens=500), use_tqdm=False)
    assert llm.engine.block_manager.num_free_blocks == free
    assert not llm.engine.has_unfinished_requests()


def test_abort_returns_every_block(llm):
    engine = llm.engine
    engine.add_request("x", PROMPTS[6], SamplingParams(max_tokens=100))
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    engine.abort_request("x")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()


def test_chat_applies_the_template_and_stops_at_end_of_turn(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    assert "<|im_start|>user" in llm.get_tokenizer().decode(out.prompt_token_ids)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtypes_generate_the_same_first_tokens(dtype, batch_tokens):
    half = LLM(dtype=dtype, kv_cache_memory=64 << 20)
    assert half.engine.runner.kv_caches[0].dtype == getattr(torch, dtype)
    outs = half.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=4, logprobs=1), use_tqdm=False)
    for out, expected in zip(outs, batch_tokens, strict=False):
        assert out.outputs[0].token_ids[:2] == expected[:2]
        assert all(torch.isfinite(torch.tensor(list(e.values()))).all() for e in out.outputs[0].logprobs)


def test_greedy_with_ngram_speculation_matches_transformers_token_for_token(hf_tokens):
    llm = LLM(dtype="float32", speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                   "prompt_lookup_min": 1, "prompt_lookup_max": 3,
                                                   "disable_by_batch_size": len(PROMPTS)})
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == hf_tokens
    assert llm.engine.stats().spec_decode.num_accepted_tokens > 0
