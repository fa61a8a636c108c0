"""Beam search as Hugging Face transformers runs it (`generate(num_beams=W, do_sample=False)`), over an engine
that gives a sequence's top next-token logprobs: the search logic, shared by the offline LLM.beam_search and the
server's driver (core/beam_search_stream.py). No tensors and no engine here: a driver runs `prompts()` (each live
beam: the prompt's ids and its tokens) as greedy one-token requests with `request_params`, hands their top
logprobs to `advance()`, and repeats until `done`; `best()` holds the result.

A round, as transformers does it (its `_beam_search`):
- each live beam's top K next tokens are candidates, ranked by cumulative logprob, and the best K are kept;
  K = max(2, 1 + number of EOS ids) * W, so that at least W of them go on (a beam has only so many EOS ids).
- the first W candidates that go on are the next round's beams.
- of the first W candidates, those that end (an EOS, or the max_tokens-th token) become hypotheses, scored
  cum_logprob / generated_len ** length_penalty (the length counts the EOS); the W best are kept.
- the search ends at max_tokens, or earlier as early_stopping says: True, once W hypotheses are kept; False
  (the default), once W are kept and the best live beam, scored at its current length, does not beat the worst
  of them; "never", the same, but with length_penalty > 0 the best live beam is scored at max_tokens (the
  longest it could grow).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from tokenmill.engine.outputs import Logprob
from tokenmill.engine.sampling.sampling_params import SamplingParams

MAX_LENGTH_PENALTY = 10.0  # |length_penalty|: far beyond any useful value, and lengths ** it stay finite floats


@dataclass
class BeamSearchParams:
    """vLLM's BeamSearchParams, plus transformers' early_stopping. max_tokens None: up to the model's context.
    Only greedy search is supported: temperature must be 0. Bad values raise ValueError naming the field."""

    beam_width: int
    max_tokens: int | None
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # keep the EOS that ended a beam in its tokens (never in its text)
    early_stopping: bool | str = False  # True, False or "never", as transformers reads it (module docstring)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        check(is_int(self.beam_width) and self.beam_width >= 1, "beam_width", "must be an integer >= 1")
        check(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
              "max_tokens", "must be an integer >= 1")
        check(self.temperature == 0, "temperature",
              "must be 0: beam search keeps the likeliest beams, it samples none")
        check(isinstance(self.length_penalty, int | float) and math.isfinite(self.length_penalty)
              and abs(self.length_penalty) <= MAX_LENGTH_PENALTY,
              "length_penalty", f"must be a number in [-{MAX_LENGTH_PENALTY:g}, {MAX_LENGTH_PENALTY:g}]")
        check(self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never",
              "early_stopping", 'must be true, false or "never"')


@dataclass
class BeamSearchSequence:
    """One beam, in vLLM's shape: tokens holds the prompt's ids, then the generated ones (an EOS that ended it only
    with include_stop_str_in_output); logprobs, per generated token, the top candidates of its beam at that
    step (ranked from 1). score is what beams are ranked by: cum_logprob / generated_len ** length_penalty."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None  # the generated text, without the EOS; set on the search's result
    finish_reason: str | None = None  # "stop" (an EOS) or "length" (max_tokens)
    stop_reason: int | str | None = None  # vLLM's field; None, as for an EOS in any request
    score: float | None = None


@dataclass
class BeamSearchOutput:
    """One prompt's result: beam_width sequences, best first."""

    sequences: list[BeamSearchSequence] = field(default_factory=list)


def num_candidates(beam_width: int, num_eos: int) -> int:
    """Candidates kept per round (transformers' count), and so the top logprobs asked for per beam."""
    return max(2, 1 + num_eos) * beam_width


class BeamSearch:
    """One prompt's search (see the module docstring). eos_token_ids: the ids that end a beam (ignored with
    ignore_eos); max_model_len sets max_tokens where params leave it None."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: set[int],
                 max_model_len: int):
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        self.max_tokens = params.max_tokens or max_model_len - len(self.prompt_token_ids)
        self.num_candidates = num_candidates(params.beam_width, len(self.eos))
        self.beams = [BeamSearchSequence(list(self.prompt_token_ids), [])]  # live, best first
        self.hypotheses: list[BeamSearchSequence] = []  # ended, best first, at most beam_width
        self.num_generated = 0  # tokens in each live beam
        self.done = False

    @functools.cached_property
    def request_params(self) -> SamplingParams:
        """Each round's requests': one greedy token, with its top candidates (the raw logits' logprobs). A
        ValueError if they are more than a request may ask for: check the width first (check_beam_width)."""
        return SamplingParams(temperature=0.0, max_tokens=1, logprobs=self.num_candidates)

    def prompts(self) -> list[list[int]]:
        """This round's requests: each live beam's ids."""
        return [beam.tokens for beam in self.beams]

    def advance(self, top_logprobs: list[dict[int, float]]) -> None:
        """One round: top_logprobs holds, for each of prompts() in order, its next token's top logprobs
        ({token id: logprob}, at least num_candidates of them, or the whole vocabulary)."""
        width, length = self.params.beam_width, self.num_generated + 1
        candidates = []  # (cumulative logprob, beam, token, the beam's step entry)
        for beam, top in zip(self.beams, top_logprobs, strict=True):
            ranked = sorted(top.items(), key=lambda kv: -kv[1])[:self.num_candidates]
            step = {t: Logprob(lp, rank) for rank, (t, lp) in enumerate(ranked, 1)}
            candidates += [(beam.cum_logprob + lp, beam, t, step) for t, lp in ranked]
        # Stable: equal scores keep the earlier beam's, then its likelier token, first.
        candidates.sort(key=lambda c: -c[0])
        del candidates[self.num_candidates:]
        at_max = length >= self.max_tokens
        hypotheses, beams = list(self.hypotheses), []
        for i, (cum, beam, token, step) in enumerate(candidates):
            ends = at_max or token in self.eos
            if ends and i < width:  # only the first W may end: the others are the live beams' reserve
                reason = "stop" if token in self.eos else "length"
                hypotheses.append(BeamSearchSequence(beam.tokens + [token], beam.logprobs + [step], cum,
                                                     finish_reason=reason, score=self._score(cum, length)))
            elif not ends and len(beams) < width:
                beams.append(BeamSearchSequence(beam.tokens + [token], beam.logprobs + [step], cum))
        # Stable: an earlier hypothesis keeps its place against an equal newcomer.
        self.hypotheses = sorted(hypotheses, key=lambda h: -h.score)[:width]
        self.beams, self.num_generated = beams, length
        self.done = at_max or not beams or self._cannot_improve()

    def _score(self, cum_logprob: float, length: int) -> float:
        return cum_logprob / length ** self.params.length_penalty

    def _cannot_improve(self) -> bool:
        p = self.params
        if len(self.hypotheses) < p.beam_width:
            return False
        if p.early_stopping is True:
            return True
        length = self.max_tokens if p.early_stopping == "never" and p.length_penalty > 0 else self.num_generated
        return self._score(self.beams[0].cum_logprob, length) <= self.hypotheses[-1].score

    def best(self) -> list[BeamSearchSequence]:
        """The result, best first: the kept hypotheses, without the EOS unless include_stop_str_in_output (text
        unset: see text_token_ids)."""
        if self.params.include_stop_str_in_output:
            return self.hypotheses
        return [BeamSearchSequence(h.tokens[:-1] if h.finish_reason == "stop" else h.tokens, h.logprobs,
                                   h.cum_logprob, finish_reason=h.finish_reason, score=h.score)
                for h in self.hypotheses]

    def text_token_ids(self, seq: BeamSearchSequence) -> list[int]:
        """The generated ids of one of best() that its text decodes: never the EOS."""
        generated = seq.tokens[len(self.prompt_token_ids):]
        return generated[:-1] if seq.finish_reason == "stop" and self.params.include_stop_str_in_output else generated
