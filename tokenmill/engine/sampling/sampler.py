"""Sampler: logits -> token ids (+ logprobs) for a whole batch in one vectorized pass.

Order, as in vLLM: on every row, min_tokens -> logit_bias -> repetition, frequency and presence
penalties; then greedy rows take the argmax and random rows go through temperature -> min_p ->
top_k -> top_p and an exponential race. Reported logprobs are those of the raw logits (vLLM's
default), so they do not depend on the sampling settings.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenmill.engine.sampling.sampling_params import SamplingParams
from tokenmill.engine.spec_decode.rejection import rejection_sample
from tokenmill.kernels import reference


class PenaltyState:
    """One sequence's token statistics for the penalties, kept across steps so that a step costs
    O(new tokens) rather than O(prompt + output): the prompt's presence mask is built once, and the
    output counts grow by the tokens sampled since the last step."""

    def __init__(self, prompt_token_ids: list[int], vocab_size: int, device: torch.device):
        self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        ids = [t for t in prompt_token_ids if 0 <= t < vocab_size]
        self.prompt_mask[torch.tensor(ids, dtype=torch.long, device=device)] = True
        self.output_counts = torch.zeros(vocab_size, device=device)
        self.num_counted = 0

    def update(self, output_token_ids: list[int]) -> None:
        new = output_token_ids[self.num_counted:]
        if new:
            ids = torch.tensor(new, dtype=torch.long, device=self.output_counts.device)
            self.output_counts.index_add_(0, ids, torch.ones(len(new), device=ids.device))
        self.num_counted = len(output_token_ids)


@dataclass
class SamplingMetadata:
    """Per-step tensors for the sampler; a field is None when no row needs it (fast path).

    Per-row tensors are shaped [batch, 1] so they broadcast over the vocab.
    """

    vocab_size: int
    all_greedy: bool
    all_random: bool
    greedy: torch.Tensor                      # [batch] bool
    temperature: torch.Tensor | None          # 1.0 on greedy rows
    top_k: torch.Tensor | None                # long; vocab_size where disabled
    top_p: torch.Tensor | None                # inf where disabled, see build
    min_p: torch.Tensor | None                # 0.0 where disabled
    generators: list[tuple[int, torch.Generator]]  # (row, generator) for seeded random rows
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) to block
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, ids, bias)
    repetition_penalty: torch.Tensor | None
    repetition_mask: torch.Tensor | None      # [batch, vocab] bool: in prompt or output
    frequency_penalty: torch.Tensor | None
    presence_penalty: torch.Tensor | None
    output_counts: torch.Tensor | None        # [batch, vocab] float32
    num_logprobs: list[int | None]            # host side: top-N per row
    max_num_logprobs: int
    # Structured outputs: ([batch, vocab / 32] int32 bits of the allowed tokens, the constrained rows)
    token_bitmask: tuple[torch.Tensor, list[int]] | None = None
    # Speculative decoding: the draft token each row verifies (-1: none), and the distributions the draft
    # model drew them from (None: certain guesses, as n-gram proposals are); see spec_decode/rejection.py.
    draft_token_ids: torch.Tensor | None = None
    draft_probs: torch.Tensor | None = None

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_token_ids: list[list[int]],
              output_token_ids: list[list[int]], generators: list[torch.Generator | None],
              vocab_size: int, device: torch.device,
              penalty_states: list[PenaltyState] | None = None,
              token_bitmask: tuple[torch.Tensor, list[int]] | None = None) -> SamplingMetadata:
        """penalty_states: one per row, kept by the caller across steps; made afresh if not given.
        token_bitmask: the structured-output rows' allowed tokens (see SamplingMetadata)."""
        batch = len(params)
        if not (len(prompt_token_ids) == len(output_token_ids) == len(generators) == batch):
            raise ValueError("params, prompt_token_ids, output_token_ids and generators "
                             "must have one entry per row")

        def column(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device).reshape(batch, 1)

        greedy = [p.greedy for p in params]
        # Random-path settings are neutral on greedy rows: their argmax ignores them anyway.
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=False)]
        ks = [vocab_size if g or p.top_k == -1 else min(p.top_k, vocab_size)
              for p, g in zip(params, greedy, strict=False)]
        # inf rather than 1.0 so that float rounding in the cumulative sum can never cut the
        # tail of a row that did not ask for top-p.
        ps = [float("inf") if g or p.top_p >= 1.0 else p.top_p for p, g in zip(params, greedy, strict=False)]
        min_ps = [0.0 if g else p.min_p for p, g in zip(params, greedy, strict=False)]

        blocked_rows: list[int] = []
        blocked_ids: list[int] = []
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_vals: list[float] = []
        # Ids outside the vocab cannot be produced, so blocking or biasing them is a no-op;
        # skipping them also keeps a negative id from wrapping around to the vocab's end.
        for i, (p, out) in enumerate(zip(params, output_token_ids, strict=False)):
            if len(out) < p.min_tokens:
                for t in sorted(p.all_stop_token_ids | set(p.stop_token_ids)):
                    if 0 <= t < vocab_size:
                        blocked_rows.append(i)
                        blocked_ids.append(t)
            for t, b in (p.logit_bias or {}).items():
                if 0 <= t < vocab_size:
                    bias_rows.append(i)
                    bias_ids.append(t)
                    bias_vals.append(b)

        def index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        reps = [p.repetition_penalty for p in params]
        freqs = [p.frequency_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        use_rep = any(r != 1.0 for r in reps)
        use_freq_pres = any(f != 0.0 for f in freqs) or any(q != 0.0 for q in pres)
        output_counts = repetition_mask = None
        if use_rep or use_freq_pres:
            states = penalty_states or [PenaltyState(ids, vocab_size, device) for ids in prompt_token_ids]
            for state, out in zip(states, output_token_ids, strict=False):
                state.update(out)
            output_counts = torch.stack([s.output_counts for s in states])
            if use_rep:
                repetition_mask = torch.stack([s.prompt_mask for s in states]) | (output_counts > 0)

        num_logprobs = [p.logprobs for p in params]
        return cls(
            vocab_size=vocab_size,
            all_greedy=all(greedy),
            all_random=not any(greedy),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            temperature=column(temps) if any(t != 1.0 for t in temps) else None,
            top_k=column(ks, torch.long) if any(k < vocab_size for k in ks) else None,
            top_p=column(ps) if any(p < 1.0 for p in ps) else None,
            min_p=column(min_ps) if any(m > 0.0 for m in min_ps) else None,
            generators=[(i, g) for i, g in enumerate(generators)
                        if g is not None and not greedy[i]],
            min_tokens_mask=(index(blocked_rows), index(blocked_ids)) if blocked_rows else None,
            logit_bias=((index(bias_rows), index(bias_ids),
                         torch.tensor(bias_vals, dtype=torch.float32, device=device))
                        if bias_rows else None),
            repetition_penalty=column(reps) if use_rep else None,
            repetition_mask=repetition_mask,
            frequency_penalty=column(freqs) if use_freq_pres else None,
            presence_penalty=column(pres) if use_freq_pres else None,
            output_counts=output_counts,
            num_logprobs=num_logprobs,
            max_num_logprobs=max((n for n in num_logprobs if n is not None), default=0),
            token_bitmask=token_bitmask,
        )


@dataclass
class SamplerOutput:
    token_ids: list[int]                                # chosen token per row
    logprobs: list[float]                               # raw logprob of the chosen token
    top_logprobs: list[list[tuple[int, float]] | None]  # top-N (id, logprob), descending


def process_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """min_tokens, logit_bias and penalties, in place on a float32 [batch, vocab] tensor."""
    if meta.min_tokens_mask is not None:
        logits[meta.min_tokens_mask] = float("-inf")
    if meta.logit_bias is not None:
        rows, ids, bias = meta.logit_bias
        logits.index_put_((rows, ids), bias, accumulate=True)
    if meta.repetition_penalty is not None:
        # HF semantics: push seen tokens toward "less likely" whatever the logit's sign.
        penalty = torch.where(meta.repetition_mask, meta.repetition_penalty, 1.0)
        logits.copy_(torch.where(logits > 0, logits / penalty, logits * penalty))
    if meta.frequency_penalty is not None:
        logits -= meta.frequency_penalty * meta.output_counts
        logits -= meta.presence_penalty * (meta.output_counts > 0)
    return logits


def random_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The distribution random rows sample from: temperature, min_p, top_k, top_p, softmax; modifies logits."""
    if meta.temperature is not None:
        logits /= meta.temperature
    if meta.min_p is not None:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed.
        threshold = logits.amax(dim=-1, keepdim=True) + meta.min_p.log()
        logits.masked_fill_(logits < threshold, float("-inf"))
    if meta.top_k is not None or meta.top_p is not None:
        # Stable, so ties are cut the same way whatever else is in the batch.
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        if meta.top_k is not None:
            ranks = torch.arange(meta.vocab_size, device=logits.device)
            sorted_logits.masked_fill_(ranks >= meta.top_k, float("-inf"))
        if meta.top_p is not None:
            probs = sorted_logits.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1).sub_(probs)  # 0 on the top token: always kept
            sorted_logits.masked_fill_(mass_before >= meta.top_p, float("-inf"))
        # Back to vocab order, so a seeded row's noise lines up with the same token ids
        # whether or not another row made the batch take this path.
        logits.scatter_(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def race(weights: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """One token per row, drawn in proportion to weights (need not sum to 1) by an exponential race:
    argmax(w_i / E_i) with E_i ~ Exp(1); seeded rows draw their noise from their own generator."""
    noise = torch.empty_like(weights).exponential_()
    for row, generator in meta.generators:
        noise[row].exponential_(generator=generator)
    # exponential_ can return exactly 0; 0/0 would be NaN, and argmax picks NaN.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return weights.div(noise).argmax(dim=-1)


def _sample_random(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    probs = random_probs(logits, meta)
    if meta.draft_token_ids is None:
        return race(probs, meta)
    return rejection_sample(probs, meta.draft_token_ids, meta.draft_probs, meta.generators,
                            lambda w: race(w, meta))


class Sampler:
    """apply_token_bitmask(logits, bitmask, rows): how structured-output masks are applied, in place
    (see structured_output.token_bitmask_op); the plain-PyTorch reference unless the engine picks a faster one."""

    def __init__(self, apply_token_bitmask: Callable[[torch.Tensor, torch.Tensor, list[int]], None]
                 = reference.apply_token_bitmask):
        self.apply_token_bitmask = apply_token_bitmask

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        x = logits.to(torch.float32, copy=True)  # the caller's logits stay untouched
        log_norm = torch.logsumexp(x, dim=-1)
        n_top = min(meta.max_num_logprobs, meta.vocab_size)
        top = x.topk(n_top, dim=-1) if n_top else None  # raw, before any processing

        if meta.token_bitmask is not None:  # before any processing: the grammar's -inf wins over any bias
            bitmask, rows = meta.token_bitmask
            self.apply_token_bitmask(x, bitmask.to(x.device, non_blocking=True), rows)
        process_logits(x, meta)
        if meta.all_greedy:
            token_ids = x.argmax(dim=-1)
        elif meta.all_random:
            token_ids = _sample_random(x, meta)
        else:
            greedy_ids = x.argmax(dim=-1)
            token_ids = torch.where(meta.greedy, greedy_ids, _sample_random(x, meta))

        chosen = logits.gather(1, token_ids[:, None]).squeeze(1).float() - log_norm
        columns = [token_ids.double()[:, None], chosen.double()[:, None]]
        if top is not None:
            columns += [top.indices.double(), (top.values - log_norm[:, None]).double()]
        # One device->host transfer for the whole step; float64 holds token ids exactly.
        rows = torch.cat(columns, dim=1).tolist()

        out = SamplerOutput(token_ids=[], logprobs=[], top_logprobs=[])
        for row, n in zip(rows, meta.num_logprobs, strict=False):
            out.token_ids.append(int(row[0]))
            out.logprobs.append(row[1])
            if n is None:
                out.top_logprobs.append(None)
            else:
                n = min(n, n_top)
                ids, lps = row[2:2 + n], row[2 + n_top:2 + n_top + n]
                out.top_logprobs.append([(int(t), lp) for t, lp in zip(ids, lps, strict=False)])
        return out


def propose_tokens(logits: torch.Tensor, meta: SamplingMetadata) -> tuple[list[int], torch.Tensor | None]:
    """A draft model's tokens: greedy rows take the argmax, random rows sample their processed distribution,
    which comes back too (the rejection sampler needs it; its greedy rows are not read); None if all greedy."""
    x = logits.to(torch.float32, copy=True)
    process_logits(x, meta)
    greedy_ids = x.argmax(dim=-1)
    if meta.all_greedy:
        return greedy_ids.tolist(), None
    probs = random_probs(x, meta)
    return torch.where(meta.greedy, greedy_ids, race(probs, meta)).tolist(), probs
