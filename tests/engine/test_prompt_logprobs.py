"""prompt_logprobs against transformers' one-pass forward over the prompt, whatever the scheduling (chunked
prefill, a prefix the cache holds, a preemption mid-prompt); and truncate_prompt_tokens."""
import pytest
import torch
from hf_oracle import assert_prompt_logprobs_match_transformers

from tokenmill.engine import LLM, SamplingParams
from tokenmill.engine.limits import truncate_prompt

transformers = pytest.importorskip("transformers")

PROMPT = list(range(1000, 1060))  # 60 tokens: three full blocks of 16 and a partial one
BYTES_PER_BLOCK = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 slots, 2 KV heads of 16 dims, float32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      initializer_range=0.25)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return hf, str(path)


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny[1], dtype="float32", kv_cache_memory=8 << 20)


def test_prompt_logprobs_equal_transformers_and_skip_the_prefix_cache(tiny, llm):
    hf, _ = tiny
    llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=1), use_tqdm=False)  # caches the prefix
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3),
                       use_tqdm=False)[0]
    assert out.num_cached_tokens == 0  # every prompt position's logits are needed
    assert_prompt_logprobs_match_transformers(hf, PROMPT, out.prompt_logprobs, top_n=3)
    assert out.outputs[0].logprobs is None  # prompt logprobs do not turn on sampled-token logprobs
    again = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert again.num_cached_tokens == 48 and again.prompt_logprobs is None  # the cache serves others still


def test_prompt_logprobs_zero_gives_only_the_prompt_token(tiny, llm):
    out = llm.generate({"prompt_token_ids": PROMPT[:5]}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    assert_prompt_logprobs_match_transformers(tiny[0], PROMPT[:5], out.prompt_logprobs, top_n=0)
    assert all(list(e) == [t] for t, e in zip(PROMPT[1:5], out.prompt_logprobs[1:], strict=True))


def test_prompt_logprobs_come_once_per_request_with_n_samples(llm):
    engine = llm.engine
    engine.add_request("n3", PROMPT, SamplingParams(n=3, max_tokens=3, prompt_logprobs=1))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += engine.step()
    with_logprobs = [d for d in deltas if d.prompt_logprobs is not None]
    assert len(with_logprobs) == 1 and len(with_logprobs[0].prompt_logprobs) == len(PROMPT)
    assert {o.index for o in with_logprobs[0].outputs} == {0, 1, 2}  # with every sample's first token


def test_chunked_prefill_and_preemption_mid_prompt_give_the_same_prompt_logprobs(tiny):
    # Five blocks: the long prompt, chunked 7 tokens a step beside the other request's decodes, runs out of
    # blocks mid-prompt (it is the newest, so it is the one preempted) until the other request finishes.
    small = LLM(tiny[1], dtype="float32", kv_cache_memory=5 * BYTES_PER_BLOCK, max_num_batched_tokens=7)
    other = SamplingParams(max_tokens=55, ignore_eos=True)
    outs = small.generate([{"prompt_token_ids": list(range(50, 60))}, {"prompt_token_ids": PROMPT}],
                          [other, SamplingParams(max_tokens=2, prompt_logprobs=2)], use_tqdm=False)
    engine = small.engine
    assert engine.scheduler.num_preemptions > 0
    assert_prompt_logprobs_match_transformers(tiny[0], PROMPT, outs[1].prompt_logprobs, top_n=2)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm):
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=1, truncate_prompt_tokens=5,
                                                                    prompt_logprobs=0), use_tqdm=False)[0]
    assert out.prompt_token_ids == PROMPT[-5:] and len(out.prompt_logprobs) == 5
    whole = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=1, truncate_prompt_tokens=-1),
                         use_tqdm=False)[0]
    assert whole.prompt_token_ids == PROMPT  # -1: up to the model's context, which this prompt is within


def test_truncation_side_picks_the_end_that_is_kept():
    ids = list(range(10))
    assert truncate_prompt(ids, SamplingParams(truncate_prompt_tokens=3), 8) == [7, 8, 9]
    assert truncate_prompt(ids, SamplingParams(truncate_prompt_tokens=3, truncation_side="right"), 8) == [0, 1, 2]
    assert truncate_prompt(ids, SamplingParams(truncate_prompt_tokens=-1, truncation_side="right"), 8) == ids[:8]


@pytest.mark.parametrize("field,value", [("prompt_logprobs", 21), ("prompt_logprobs", -1),
                                         ("truncate_prompt_tokens", 0), ("truncate_prompt_tokens", -2),
                                         ("truncation_side", "middle")])
def test_out_of_range_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
