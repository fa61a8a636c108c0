"""Speculative decoding: greedy output is token for token what decoding without it gives, for both proposers
and every scheduling path; sampling keeps the target's distribution; the n-gram index and the block pool
stay right."""
import json
import random

import pytest
import torch

from tokenmill.engine import LLM, SamplingParams
from tokenmill.engine.sampling.structured_output import StructuredOutputsParams
from tokenmill.engine.spec_decode.config import SpeculativeConfig
from tokenmill.engine.spec_decode.ngram import NgramIndex
from tokenmill.engine.spec_decode.rejection import rejection_sample

PASSAGE = ("The old lighthouse stood on the northern cliff for two hundred years. Every night its keeper climbed "
           "the narrow stairs, lit the great lamp, and watched the ships pass safely through the dark water. ")
PROMPTS = [
    "Repeat the following text exactly, then stop.\n\n" + PASSAGE * 2,
    "Rewrite this text, replacing 'lighthouse' with 'tower':\n\n" + PASSAGE,
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "The capital of France is",
]
GREEDY = SamplingParams(temperature=0, max_tokens=32)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
TINY = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-5)


def tiny_config(tmp_path, name: str, vocab_size: int) -> str:
    """A config.json of a tiny Llama for dummy weights (the engine seeds a draft's differently)."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**TINY, "vocab_size": vocab_size}))
    return str(path)


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def plain():
    return LLM(dtype="float32")


@pytest.fixture(scope="module")
def expected(plain):
    return tokens(plain.generate(PROMPTS, GREEDY, use_tqdm=False))


@pytest.fixture(scope="module")
def ngram():
    return LLM(dtype="float32", speculative_config=NGRAM)


# ---- the n-gram index -----------------------------------------------------------------------------


def brute_force_proposal(tokens: list[int], k: int, lo: int, hi: int) -> list[int]:
    for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
        suffix = tokens[-n:]
        for e in range(len(tokens) - 2, n - 2, -1):  # latest occurrence ending before the last position
            if tokens[e - n + 1:e + 1] == suffix:
                return tokens[e + 1:e + 1 + k]
    return []


def test_ngram_index_proposes_what_followed_the_latest_earlier_occurrence_as_tokens_arrive():
    rng = random.Random(0)
    for lo, hi in ((1, 1), (1, 3), (2, 5)):
        tokens = [rng.randrange(6) for _ in range(5)]
        index = NgramIndex(lo, hi)
        for _ in range(150):
            assert index.propose(tokens, 4) == brute_force_proposal(tokens, 4, lo, hi)
            tokens += [rng.randrange(6) for _ in range(rng.choice((1, 1, 3)))]


# ---- rejection sampling ----------------------------------------------------------------------------


@pytest.mark.parametrize("certain", [True, False], ids=["ngram", "draft_model"])
def test_rejection_sampler_emits_the_target_distribution(certain):
    torch.manual_seed(0)
    vocab, rows = 8, 200_000
    p = torch.softmax(torch.randn(vocab) * 1.5, -1)
    q = torch.softmax(torch.randn(vocab) * 1.5, -1)
    drafts = torch.multinomial(q, rows, replacement=True)
    if certain:  # an n-gram guess: always the same token, whatever p says
        drafts.fill_(int(p.argmin()))
    out = rejection_sample(p.expand(rows, vocab).clone(), drafts, None if certain else q.expand(rows, vocab),
                           [], lambda w: torch.multinomial(w / w.sum(-1, keepdim=True), 1).squeeze(1))
    freq = torch.bincount(out, minlength=vocab).double() / rows
    assert torch.allclose(freq, p.double(), atol=4 * (p * (1 - p) / rows).sqrt().max().item() + 1e-4)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculative_sampling_matches_plain_sampling_statistically(tmp_path, method):
    """A tiny random model sampled with and without speculation: the first three tokens' distributions agree
    (chi-square over 3072 samples each), and drafts were both accepted and rejected along the way."""
    vocab = 24
    target = tiny_config(tmp_path, "target", vocab)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
    if method == "draft_model":
        spec = {"model": target, "load_format": "dummy", "num_speculative_tokens": 3}
    spec["disable_by_batch_size"] = 256
    prompt = {"prompt_token_ids": [1, 2, 3, 1, 2, 3, 1, 2]}
    params = SamplingParams(n=128, temperature=0.7, top_k=16, max_tokens=3, ignore_eos=True)
    samples = {}
    for name, cfg in (("plain", None), ("spec", spec)):
        llm = LLM(model=target, load_format="dummy", dtype="float32", skip_tokenizer_init=True, seed=1,
                  max_num_seqs=256, speculative_config=cfg)
        outs = llm.generate([prompt] * 24, params, use_tqdm=False)
        samples[name] = torch.tensor([o.token_ids for r in outs for o in r.outputs])
        if cfg is not None:
            stats = llm.engine.stats().spec_decode
            assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    for pos in range(3):
        a = torch.bincount(samples["plain"][:, pos], minlength=vocab).double()
        b = torch.bincount(samples["spec"][:, pos], minlength=vocab).double()
        keep = (a + b) >= 10  # chi-square needs counts; rare tokens are pooled
        a = torch.cat([a[keep], a[~keep].sum()[None]])
        b = torch.cat([b[keep], b[~keep].sum()[None]])
        expected_a = (a + b) * a.sum() / (a.sum() + b.sum())
        expected_b = (a + b) * b.sum() / (a.sum() + b.sum())
        mask = (a + b) > 0
        chi2 = (((a - expected_a) ** 2 / expected_a)[mask] + ((b - expected_b) ** 2 / expected_b)[mask]).sum()
        dof = int(mask.sum()) - 1
        # p < 1e-4 at these degrees of freedom: a wrong sampler shifts mass by far more.
        assert chi2 < dof + 6 * (2 * dof) ** 0.5 + 10, (pos, chi2.item(), dof)


# ---- greedy exactness ------------------------------------------------------------------------------


def test_greedy_with_ngram_proposals_is_token_exact_in_a_batch_and_alone(plain, ngram, expected):
    before = ngram.engine.stats()
    assert tokens(ngram.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    for prompt, want in zip(PROMPTS[:3], expected, strict=False):
        assert tokens(ngram.generate(prompt, GREEDY, use_tqdm=False))[0] == want
    after = ngram.engine.stats()
    # Tokens per step count each accepted draft token as generated, and a prompt once: they add up.
    generated = after.generation_tokens - before.generation_tokens
    assert (after.iteration_tokens.tokens - before.iteration_tokens.tokens
            == after.prompt_tokens - before.prompt_tokens + generated)
    assert sum(after.iteration_tokens.counts) - sum(before.iteration_tokens.counts) < generated  # batched steps
    stats = ngram.engine.stats().spec_decode
    assert stats.num_accepted_tokens > stats.num_draft_tokens / 3  # the copy prompts are mostly proposals
    assert ngram.engine.block_manager.num_free_blocks == ngram.engine.block_manager.num_blocks


@pytest.mark.parametrize("setting", ["chunked_prefill", "preemption", "no_prefix_caching"])
def test_greedy_with_ngram_is_exact_under_every_scheduling_path(setting, expected):
    kwargs = {"chunked_prefill": dict(max_num_batched_tokens=48),
              "preemption": dict(kv_cache_memory=14 * 16 * 2 * 30 * 3 * 64 * 4),  # 14 blocks of 16 tokens
              "no_prefix_caching": dict(enable_prefix_caching=False)}[setting]
    llm = LLM(dtype="float32", speculative_config=NGRAM, **kwargs)
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    if setting == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_stop_strings_min_tokens_logprobs_and_structured_outputs_are_unchanged_by_speculation(plain, ngram):
    cases = [
        SamplingParams(temperature=0, max_tokens=40, stop=["keeper"]),
        SamplingParams(temperature=0, max_tokens=40, stop=["keeper"], include_stop_str_in_output=True),
        SamplingParams(temperature=0, max_tokens=12, min_tokens=12, stop_token_ids=[13]),
        SamplingParams(temperature=0, max_tokens=30, logprobs=3),
        SamplingParams(temperature=0, max_tokens=30, structured_outputs=StructuredOutputsParams(
            json={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]})),
    ]
    for params in cases:
        want = plain.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
        got = ngram.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
            want.token_ids, want.text, want.finish_reason, want.stop_reason)
        if params.logprobs:
            for g, w in zip(got.logprobs, want.logprobs, strict=True):
                assert g.keys() == w.keys()
                assert [g[t] for t in w] == pytest.approx([w[t] for t in w], abs=1e-4)


def test_greedy_with_a_draft_model_is_token_exact(tmp_path, expected):
    """A random draft model (rarely right: every rejection path) and the target itself as draft (always right)."""
    from tokenmill.engine.config import default_model_path

    drafts = [{"model": tiny_config(tmp_path, "draft", 49152), "load_format": "dummy", "num_speculative_tokens": 3},
              {"model": default_model_path(), "num_speculative_tokens": 2}]
    for spec in drafts:
        llm = LLM(dtype="float32", speculative_config=spec, max_num_batched_tokens=256)
        assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
        stats = llm.engine.stats().spec_decode
        assert stats.num_draft_tokens > 0
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    assert stats.num_accepted_tokens == stats.num_draft_tokens  # the target drafting for itself


def test_penalized_sequences_get_no_proposals_and_keep_their_tokens(plain, ngram):
    penalized = SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3)
    want = plain.generate(PROMPTS[0], penalized, use_tqdm=False)[0].outputs[0].token_ids
    before = ngram.engine.stats().spec_decode.num_drafts
    assert ngram.generate(PROMPTS[0], penalized, use_tqdm=False)[0].outputs[0].token_ids == want
    assert ngram.engine.stats().spec_decode.num_drafts == before


def test_batches_larger_than_disable_by_batch_size_get_no_proposals(tmp_path):
    spec = {"method": "ngram", "prompt_lookup_min": 1, "disable_by_batch_size": 2}
    llm = LLM(model=tiny_config(tmp_path, "target", 24), load_format="dummy", skip_tokenizer_init=True,
              speculative_config=spec)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    llm.generate([[1, 2, 1, 2, 1]] * 3, params, use_tqdm=False)
    assert llm.engine.stats().spec_decode.num_drafts == 0
    llm.generate([[1, 2, 1, 2, 1]] * 2, params, use_tqdm=False)
    assert llm.engine.stats().spec_decode.num_drafts > 0


@pytest.mark.parametrize("bad, message", [
    ({"method": "eagle"}, "method must be one of"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"method": "draft_model"}, "needs \"model\""),
    ({"model": "/no/such/draft"}, "does not exist"),
    ({"colour": 1}, "unknown key"),
    ("{not json", "not valid JSON"),
])
def test_bad_speculative_config_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse(bad)


def test_a_draft_with_another_vocabulary_is_refused_at_start(tmp_path):
    spec = {"model": tiny_config(tmp_path, "draft", 32), "load_format": "dummy"}
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(model=tiny_config(tmp_path, "target", 24), load_format="dummy", skip_tokenizer_init=True,
            speculative_config=spec)


def test_a_gguf_target_runs_a_draft_from_outside_a_gguf_file_unquantized(tmp_path):
    spec = {"model": tiny_config(tmp_path, "draft", 49152), "load_format": "dummy", "num_speculative_tokens": 2}
    want = LLM(quantization="gguf").generate(PROMPTS[0], GREEDY, use_tqdm=False)
    got = LLM(quantization="gguf", speculative_config=spec).generate(PROMPTS[0], GREEDY, use_tqdm=False)
    assert tokens(got) == tokens(want)
