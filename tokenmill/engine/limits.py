"""Bounds on everything a client controls, checked before a request costs the engine anything.

A request over a limit is refused with InvalidRequestError naming the field and the limit (a 400 in
the server). The defaults follow OpenAI where it documents one (n <= 128) and are generous elsewhere;
every one is a field of RequestLimits, which EngineConfig holds and `tokenmill serve` sets by flag.
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.engine.sampling.beam_search import num_candidates
from tokenmill.engine.sampling.sampling_params import MAX_LOGPROBS, SamplingParams


class InvalidRequestError(ValueError):
    """A request the engine cannot serve; `param` names the field at fault, if one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RequestLimits:
    """Per-request bounds (see the module docstring). `max_waiting_seqs` bounds the queue instead: the
    sequences that may wait for a batch slot beyond max_num_seqs, summed over all requests."""

    max_n: int = 128
    max_prompts: int = 256  # prompts in one /v1/completions batch
    max_stop: int = 16  # stop strings
    max_stop_len: int = 256  # characters in one stop string
    max_stop_token_ids: int = 256
    max_logit_bias: int = 1024  # entries
    max_prompt_chars: int = 1 << 20  # text given to the tokenizer (1 Mi characters)
    # A structured-output constraint's text (schema, regex, choices or grammar): compile time grows with it.
    max_constraint_chars: int = 64 << 10
    # Seconds a constraint may take to compile (it compiles off the step loop); a request waiting longer fails.
    max_constraint_compile_s: float = 10.0
    max_waiting_seqs: int = 512

    def __post_init__(self) -> None:
        seconds = self.max_constraint_compile_s
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
            raise ValueError(f"limit max_constraint_compile_s must be a number of seconds > 0; got {seconds!r}")
        for name, value in vars(self).items():
            if name != "max_constraint_compile_s" and (not isinstance(value, int) or value < 1):
                raise ValueError(f"limit {name} must be an integer >= 1; got {value!r}")

    def check_params(self, params: SamplingParams) -> None:
        """The SamplingParams fields a client sets freely, against their limits."""
        _bound("n", params.n, self.max_n, "samples")
        _bound("stop", len(params.stop), self.max_stop, "stop strings")
        longest = max(map(len, params.stop), default=0)
        _bound("stop", longest, self.max_stop_len, "characters in a stop string")
        _bound("stop_token_ids", len(params.stop_token_ids), self.max_stop_token_ids, "token ids")
        _bound("logit_bias", len(params.logit_bias or ()), self.max_logit_bias, "entries")
        if params.structured_outputs is not None:
            _bound("structured_outputs", len(params.structured_outputs.key()), self.max_constraint_chars,
                   "characters of constraint")

    def check_beam_width(self, beam_width: int, num_eos: int, param: str = "beam_width") -> None:
        """A beam search's width against max_n, and against what its rounds may ask of the engine: each beam's top
        num_candidates(beam_width, num_eos) next tokens, of at most MAX_LOGPROBS logprobs a request returns."""
        _bound(param, beam_width, self.max_n, "beams")
        widest = MAX_LOGPROBS // num_candidates(1, num_eos)
        if beam_width > widest:
            raise InvalidRequestError(
                f"{param}: {beam_width} beams given, the limit is {widest}: each round takes the top "
                f"{num_candidates(1, num_eos)} x {param} next tokens of every beam, and the engine returns at most "
                f"{MAX_LOGPROBS}", param)

    def check_prompt_text(self, text: str, param: str = "prompt") -> None:
        if len(text) > self.max_prompt_chars:
            raise InvalidRequestError(f"{param}: {len(text)} characters given, the limit is "
                                      f"{self.max_prompt_chars}", param)


def _bound(name: str, count: int, limit: int, what: str) -> None:
    if count > limit:
        raise InvalidRequestError(f"{name}: {count} {what} given, the limit is {limit}", name)


def truncate_prompt(ids: list[int], params: SamplingParams, max_model_len: int) -> list[int]:
    """The prompt cut to truncate_prompt_tokens tokens (-1: max_model_len) before the length checks, as vLLM
    cuts it: its last tokens, or with truncation_side "right" its first."""
    k = params.truncate_prompt_tokens
    if k is None:
        return ids
    k = max_model_len if k == -1 else k
    return ids[:k] if params.truncation_side == "right" else ids[-k:]


def check_prompt(ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int,
                 param: str = "prompt") -> None:
    """A tokenized prompt against the vocabulary and the context; params' ids against the vocabulary."""
    if not ids:
        raise InvalidRequestError(f"{param}: the prompt is empty; give at least one token", param)
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab_size:
        raise InvalidRequestError(f"{param}: token ids must be in [0, {vocab_size}); got {lo}..{hi}", param)
    max_tokens = params.max_tokens or 1
    if len(ids) + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"{param}: the prompt has {len(ids)} tokens and max_tokens is {max_tokens}, together "
            f"{len(ids) + max_tokens}, but the model's context is {max_model_len} tokens", param)
    for name in ("logit_bias", "stop_token_ids"):
        bad = [t for t in getattr(params, name) or () if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                                      name)
