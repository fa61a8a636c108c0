"""SpeculativeConfig: how proposals are made, parsed from vLLM's `speculative_config` JSON."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """num_speculative_tokens (k) tokens are proposed per sequence and step, and verified by the target in
    one forward. method "ngram": proposals copied from the sequence's own prompt and output after the
    latest earlier occurrence of its last n tokens (prompt_lookup_max >= n >= prompt_lookup_min, longest
    first). method "draft_model": a smaller model with the target's vocabulary (`model`, loaded with
    `load_format`) runs k steps ahead.

    Proposals pause when they do not pay: for a step whose running batch holds more than
    disable_by_batch_size sequences (vLLM's name), and for a sequence whose recent drafts were accepted at
    less than min_acceptance_rate (a moving average), for `pause_steps` steps."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    model: str | None = None
    load_format: str = "auto"
    disable_by_batch_size: int = 8
    min_acceptance_rate: float = 0.2
    pause_steps: int = 16

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | str | None) -> SpeculativeConfig | None:
        """From a dict or its JSON text (the CLI's --speculative-config); None stays None. As vLLM: a
        "model" without "method" means a draft model, and one lookup bound given sets the other."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object, e.g. "
                             '{"method": "ngram", "num_speculative_tokens": 4}')
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown key(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        value = dict(value)
        if "method" not in value:
            value["method"] = "draft_model" if value.get("model") else "ngram"
        if "prompt_lookup_min" in value and "prompt_lookup_max" not in value:
            value["prompt_lookup_max"] = max(value["prompt_lookup_min"], cls.prompt_lookup_max)
        elif "prompt_lookup_max" in value and "prompt_lookup_min" not in value:
            value["prompt_lookup_min"] = min(value["prompt_lookup_max"], cls.prompt_lookup_min)
        return cls(**value)

    def __post_init__(self) -> None:
        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not is_int(self.num_speculative_tokens) or not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError("speculative_config.num_speculative_tokens must be an integer in [1, 16]; "
                             f"got {self.num_speculative_tokens!r}")
        if self.method == "ngram":
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            if not (is_int(lo) and is_int(hi) and 1 <= lo <= hi <= 32):
                raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max <= 32; "
                                 f"got {lo!r} and {hi!r}")
            if self.model is not None:
                raise ValueError('speculative_config: "model" is for method "draft_model", not "ngram"')
        else:
            if not isinstance(self.model, str) or not self.model:
                raise ValueError('speculative_config: method "draft_model" needs "model", the draft\'s path')
            if self.load_format != "dummy" and not os.path.exists(self.model):
                raise ValueError(f"speculative_config.model {self.model!r} does not exist")
        if self.load_format not in ("auto", "gguf", "safetensors", "dummy"):
            raise ValueError("speculative_config.load_format must be auto, gguf, safetensors or dummy; "
                             f"got {self.load_format!r}")
        if not is_int(self.disable_by_batch_size) or self.disable_by_batch_size < 1:
            raise ValueError("speculative_config.disable_by_batch_size must be an integer >= 1; "
                             f"got {self.disable_by_batch_size!r}")
        if not isinstance(self.min_acceptance_rate, int | float) or not 0 <= self.min_acceptance_rate <= 1:
            raise ValueError("speculative_config.min_acceptance_rate must be in [0, 1]; "
                             f"got {self.min_acceptance_rate!r}")
        if not is_int(self.pause_steps) or self.pause_steps < 0:
            raise ValueError(f"speculative_config.pause_steps must be an integer >= 0; got {self.pause_steps!r}")
