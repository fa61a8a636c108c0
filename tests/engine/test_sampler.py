"""Sampler tests: each checks one promised behaviour against a float64 oracle or statistics."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.engine.sampling.sampler import Sampler, SamplerOutput, SamplingMetadata, process_logits
from tokenmill.engine.sampling.sampling_params import SamplingParams

CPU = torch.device("cpu")


def build(params: list[SamplingParams], vocab: int, prompts: list[list[int]] | None = None,
          outputs: list[list[int]] | None = None,
          generators: list[torch.Generator | None] | None = None) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata.build(params, prompts or [[] for _ in range(n)],
                                  outputs or [[] for _ in range(n)],
                                  generators or [None] * n, vocab, CPU)


def sample(logits: torch.Tensor, params: list[SamplingParams], **kw) -> SamplerOutput:
    return Sampler()(logits, build(params, logits.shape[1], **kw))


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def oracle_distribution(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """float64 probabilities after temperature, min_p, top_k, top_p (vLLM's order)."""
    probs = torch.softmax(row.double() / p.temperature, dim=-1)
    keep = probs >= p.min_p * probs.max()
    if p.top_k != -1:
        keep &= probs >= probs.topk(min(p.top_k, len(row))).values[-1]
    probs = torch.where(keep, probs, 0.0)
    probs /= probs.sum()
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        probs[order[mass_before >= p.top_p]] = 0.0
        probs /= probs.sum()
    return probs


def chi_square(tokens: list[int], expected_probs: torch.Tensor) -> float:
    """Pearson statistic; a draw where the oracle gives zero mass fails outright."""
    observed = torch.bincount(torch.tensor(tokens), minlength=len(expected_probs)).double()
    expected = expected_probs * len(tokens)
    assert observed[expected == 0].sum() == 0, "sampled a token outside the support"
    live = expected > 0
    return float(((observed[live] - expected[live]) ** 2 / expected[live]).sum())


# Chi-square 99.9999th percentile is ~40 for <= 7 degrees of freedom; the draws are seeded,
# so this bound tolerates honest noise without ever flaking.
CHI2_LIMIT = 40.0


# --- seeds ------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [SamplingParams(temperature=0.8),
                                    SamplingParams(top_p=0.9, temperature=1.3)])
def test_seeded_row_gives_same_tokens_whatever_else_is_in_the_batch(
        target: SamplingParams) -> None:
    vocab, steps = 50, 20
    target_logits = [random_logits(1, vocab, seed=s, scale=1.0) for s in range(steps)]

    def run(seed: int, crowded: bool) -> list[int]:
        torch.manual_seed(seed + 1000 * crowded)  # the default RNG state must not matter
        generator = torch.Generator().manual_seed(seed)
        tokens = []
        for step in range(steps):
            if crowded:  # other rows push the batch through every code path
                params = [SamplingParams(temperature=0.0), SamplingParams(top_k=5),
                          target, SamplingParams(min_p=0.1, temperature=0.5),
                          SamplingParams(repetition_penalty=1.2, logit_bias={1: 3.0})]
                gens = [None, torch.Generator().manual_seed(step), generator, None, None]
                logits = random_logits(5, vocab, seed=100 + step)
                logits[2] = target_logits[step][0]
                out = sample(logits, params, generators=gens,
                             outputs=[[], [], [], [3, 4], [5]])
                tokens.append(out.token_ids[2])
            else:
                out = sample(target_logits[step], [target], generators=[generator])
                tokens.append(out.token_ids[0])
        return tokens

    assert run(seed=7, crowded=False) == run(seed=7, crowded=True)
    assert run(seed=7, crowded=False) != run(seed=8, crowded=False)


# --- greedy and temperature -------------------------------------------------------------------

def test_greedy_rows_take_the_argmax_even_beside_random_rows() -> None:
    logits = random_logits(8, 100, seed=0)
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.2, seed=1) if i % 2 == 0
              else SamplingParams(temperature=1.0) for i in range(8)]
    argmax = logits.argmax(dim=-1).tolist()
    for seed in range(5):  # the random rows' draws must never leak into the greedy ones
        torch.manual_seed(seed)
        assert sample(logits, params).token_ids[0::2] == argmax[0::2]


def test_temperature_sharpens_or_flattens_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = 20000
    top_share = {}
    for temperature in (0.5, 2.0):
        torch.manual_seed(0)
        p = SamplingParams(temperature=temperature)
        tokens = sample(logits.expand(draws, -1), [p] * draws).token_ids
        assert chi_square(tokens, oracle_distribution(logits[0], p)) < CHI2_LIMIT
        top_share[temperature] = tokens.count(0) / draws
    # softmax(logits / 0.5)[0] ~ 0.87, softmax(logits / 2)[0] ~ 0.43
    assert top_share[0.5] > 0.8 and top_share[2.0] < 0.5


# --- top-k / top-p / min-p --------------------------------------------------------------------

filter_params = st.builds(
    SamplingParams,
    temperature=st.floats(0.3, 2.0),
    top_k=st.one_of(st.just(-1), st.integers(1, 40)),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 1.0),
)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(2, 32),
       params=st.lists(filter_params, min_size=1, max_size=4))
def test_top_k_top_p_min_p_never_sample_outside_their_support(
        seed: int, vocab: int, params: list[SamplingParams]) -> None:
    repeats = 64  # many draws of each row in one vectorized call
    logits = random_logits(len(params), vocab, seed)
    assert logits.abs().sum() > 0
    torch.manual_seed(seed)
    out = sample(logits.repeat_interleave(repeats, dim=0),
                 [p for p in params for _ in range(repeats)])
    for i, p in enumerate(params):
        support = oracle_distribution(logits[i], p) > 0
        # float32 vs float64 may disagree on a token sitting exactly at a cut-off; random
        # logits make that measure-zero, so demand exact agreement.
        drawn = out.token_ids[i * repeats:(i + 1) * repeats]
        assert all(support[t] for t in drawn), (p, drawn, support)


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(top_k=3),
    SamplingParams(top_p=0.7),
    SamplingParams(min_p=0.2),
    SamplingParams(top_k=5, top_p=0.8, min_p=0.05, temperature=0.7),
], ids=["plain", "top_k", "top_p", "min_p", "all"])
def test_sampling_frequencies_match_the_filtered_softmax(params: SamplingParams) -> None:
    logits = torch.tensor([[1.5, 1.0, 0.8, 0.2, 0.0, -0.5, -1.0, -2.0]])
    draws = 20000
    torch.manual_seed(1)
    tokens = sample(logits.expand(draws, -1), [params] * draws).token_ids
    assert chi_square(tokens, oracle_distribution(logits[0], params)) < CHI2_LIMIT


def test_degenerate_filters_keep_exactly_the_top_token() -> None:
    logits = random_logits(3, 64, seed=5)
    params = [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0)]
    for _ in range(20):
        assert sample(logits, params).token_ids == logits.argmax(dim=-1).tolist()


# --- penalties, bias, min_tokens --------------------------------------------------------------

def oracle_processed(raw: list[float], p: SamplingParams, prompt: list[int],
                     output: list[int]) -> list[float]:
    """Hand-written float64 min_tokens -> logit_bias -> repetition -> frequency/presence."""
    x = [float(v) for v in raw]
    if len(output) < p.min_tokens:
        for t in p.all_stop_token_ids | set(p.stop_token_ids):
            x[t] = -math.inf
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return x


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    p = SamplingParams(repetition_penalty=2.0)
    got = process_logits(logits.clone(), build([p], 5, prompts=[[0]], outputs=[[1, 1]]))
    # 0 seen in the prompt, 1 in the output, 2 and 3 never seen, 4 unseen too
    assert got.tolist() == [[1.0, -4.0, 2.0, -2.0, 1.0]]


def test_frequency_and_presence_penalties_count_output_tokens_only() -> None:
    logits = torch.zeros(1, 4) + 1.0
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    got = process_logits(logits.clone(), build([p], 4, prompts=[[3, 3]], outputs=[[0, 0, 0, 1]]))
    assert got.tolist() == [[1.0 - 1.5 - 0.25, 1.0 - 0.5 - 0.25, 1.0, 1.0]]


penalty_params = st.builds(
    SamplingParams,
    repetition_penalty=st.sampled_from([1.0, 0.7, 1.3, 2.0]),
    frequency_penalty=st.floats(-2.0, 2.0),
    presence_penalty=st.floats(-2.0, 2.0),
    logit_bias=st.one_of(st.none(), st.dictionaries(st.integers(0, 15), st.floats(-100, 100),
                                                    max_size=3)),
    min_tokens=st.integers(0, 3),
    stop_token_ids=st.lists(st.integers(0, 15), max_size=2),
)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), data=st.data(),
       params=st.lists(penalty_params, min_size=1, max_size=4))
def test_penalties_bias_and_min_tokens_match_a_float64_oracle(
        seed: int, data: st.DataObject, params: list[SamplingParams]) -> None:
    vocab = 16
    tokens = st.lists(st.integers(0, vocab - 1), max_size=6)
    prompts = [data.draw(tokens) for _ in params]
    outputs = [data.draw(tokens) for _ in params]
    for p in params:
        p.all_stop_token_ids = {vocab - 1}  # the engine fills in the model's EOS
    logits = random_logits(len(params), vocab, seed)
    got = process_logits(logits.clone(), build(params, vocab, prompts, outputs))
    want = torch.tensor([oracle_processed(logits[i].tolist(), p, prompts[i], outputs[i])
                         for i, p in enumerate(params)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_repetition_penalty_steers_greedy_away_from_a_repeated_token() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    plain = sample(logits, [SamplingParams(temperature=0.0)], outputs=[[0]])
    penalized = sample(logits, [SamplingParams(temperature=0.0, repetition_penalty=2.0)],
                       outputs=[[0]])
    assert (plain.token_ids, penalized.token_ids) == ([0], [1])


def test_logit_bias_adds_to_the_logits_and_ignores_ids_outside_the_vocab() -> None:
    logits = random_logits(2, 10, seed=3)
    params = [SamplingParams(temperature=0.0, logit_bias={4: 100.0, 10: 5.0, -1: 5.0}),
              SamplingParams(temperature=0.0)]
    meta = build(params, 10)
    want = logits.clone()
    want[0, 4] += 100.0
    assert torch.equal(process_logits(logits.clone(), meta), want)
    assert Sampler()(logits, meta).token_ids == [4, int(logits[1].argmax())]


def test_min_tokens_blocks_eos_and_stop_ids_until_reached() -> None:
    eos, stop = 7, 5
    logits = torch.zeros(1, 8)
    logits[0, eos], logits[0, stop], logits[0, 2] = 10.0, 9.0, 8.0
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop],
                       all_stop_token_ids={eos})
    early = sample(logits, [p], outputs=[[1, 1]])
    assert early.token_ids == [2]
    assert sample(logits, [p], outputs=[[1, 1, 1]]).token_ids == [eos]
    # and a random row can never draw them either
    q = p.clone(temperature=1.0)
    assert eos not in sample(logits.expand(500, -1), [q] * 500,
                             outputs=[[1]] * 500).token_ids


# --- logprobs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_are_log_softmax_of_the_raw_logits(dtype: torch.dtype) -> None:
    vocab = 32
    logits = random_logits(6, vocab, seed=11).to(dtype)
    original = logits.clone()
    # processing that changes the distribution must not change the reported logprobs
    params = [SamplingParams(logprobs=None, repetition_penalty=1.5),
              SamplingParams(logprobs=0, temperature=0.0, logit_bias={3: 50.0}),
              SamplingParams(logprobs=1, temperature=0.5, top_k=4),
              SamplingParams(logprobs=5, top_p=0.5, frequency_penalty=1.0),
              SamplingParams(logprobs=20, min_p=0.3),
              SamplingParams(logprobs=20, temperature=0.0)]
    out = sample(logits, params, outputs=[[0, 1]] * 6)
    assert torch.equal(logits, original), "the caller's logits were modified"

    oracle = torch.log_softmax(logits.double(), dim=-1)
    for i, p in enumerate(params):
        assert out.logprobs[i] == pytest.approx(float(oracle[i, out.token_ids[i]]), abs=1e-5)
        if p.logprobs is None:
            assert out.top_logprobs[i] is None
            continue
        top = out.top_logprobs[i]
        assert len(top) == p.logprobs
        want = oracle[i].topk(p.logprobs)
        assert [t for t, _ in top] == want.indices.tolist()
        assert [lp for _, lp in top] == pytest.approx(want.values.tolist(), abs=1e-5)
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)


def test_top_logprobs_are_capped_at_the_vocab_size() -> None:
    out = sample(random_logits(1, 4, seed=0), [SamplingParams(logprobs=10)])
    assert len(out.top_logprobs[0]) == 4


def test_penalty_and_filter_tensors_are_skipped_when_no_row_uses_them() -> None:
    meta = build([SamplingParams(), SamplingParams(temperature=0.0, top_k=2,
                                                   repetition_penalty=1.0)], 10,
                 prompts=[[1], [2]], outputs=[[3], [4]])
    skipped = [meta.temperature, meta.top_k, meta.top_p, meta.min_p, meta.min_tokens_mask,
               meta.logit_bias, meta.repetition_penalty, meta.repetition_mask,
               meta.frequency_penalty, meta.presence_penalty, meta.output_counts]
    assert all(field is None for field in skipped)
