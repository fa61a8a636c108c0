"""SamplingParams: how one request picks its tokens and when it stops.

Validated at construction: a bad value raises ValueError naming the field and the rule, so the
API layer can turn it into a 400 without knowing the rules itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from tokenmill.engine.sampling.structured_output import StructuredOutputsParams

MAX_LOGPROBS = 20  # the most top-N logprobs (of a generated or a prompt token) a request may ask for


@dataclass
class SamplingParams:
    """Sampling and stopping parameters, with vLLM's names and defaults."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) disables
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs alongside the chosen token
    # Per prompt token after the first: its logprob given the tokens before it, and the top-N. A request
    # that asks computes its whole prompt (no prefix-cache reads) and pays for an LM-head row per token.
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens; -1: max_model_len
    truncation_side: str = "left"  # where truncate_prompt_tokens cuts: "right" keeps the first k tokens
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Output constrained to a JSON schema, regex, choice or grammar (a StructuredOutputsParams or its fields).
    structured_outputs: StructuredOutputsParams | dict | None = None
    # Token ids that end generation besides stop_token_ids (the model's EOS); set by the engine.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if isinstance(self.structured_outputs, dict):
            unknown = sorted(set(self.structured_outputs) - {f.name for f in fields(StructuredOutputsParams)})
            if unknown:
                raise ValueError(f"structured_outputs has unknown fields {unknown}")
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

        check(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1")
        check(self.temperature >= 0.0, "temperature", "must be >= 0")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1),
              "top_k", "must be -1 (disabled) or >= 1")
        check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        check(self.repetition_penalty > 0.0, "repetition_penalty", "must be > 0")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              "max_tokens", "must be an integer >= 1")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "must be >= 0")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              "min_tokens", "must be <= max_tokens")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
              "logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")
        check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                               and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
              "prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")
        check(self.truncate_prompt_tokens is None or (isinstance(self.truncate_prompt_tokens, int)
                                                      and (self.truncate_prompt_tokens >= 1
                                                           or self.truncate_prompt_tokens == -1)),
              "truncate_prompt_tokens", "must be an integer >= 1, or -1 (the model's context)")
        check(self.truncation_side in ("left", "right"), "truncation_side", 'must be "left" or "right"')
        # torch generators take 64-bit seeds; vLLM bounds seed to int64 too.
        check(self.seed is None or (isinstance(self.seed, int) and -2**63 <= self.seed < 2**63),
              "seed", "must be an integer in [-2**63, 2**63)")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids", "must be non-negative integers")
        if self.logit_bias:
            check(all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()),
                  "logit_bias", "values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def clone(self, **changes) -> SamplingParams:
        """A copy with some fields changed (used to fan out n > 1 into n sequences)."""
        return replace(self, **changes)
