"""Structured outputs: generation constrained to a JSON schema, a regex, a choice of strings or a grammar.

A request's constraint (SamplingParams.structured_outputs, vLLM's names) is compiled once by xgrammar
against the model's tokenizer, and cached by the constraint's canonical form. Each constrained sequence
keeps a matcher: before a step the matcher writes the bitmask of the tokens its grammar allows next, the
sampler masks only the constrained rows of the batch, and the chosen token advances the matcher. The
matcher's state follows the sequence's output tokens, which survive preemption (recompute), so it needs
no rebuilding. Free whitespace in JSON is bounded so that a small model cannot loop on it.
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

# Whitespace characters a JSON constraint allows between tokens (xgrammar's max_whitespace_cnt).
MAX_JSON_WHITESPACE = 4


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint: `json` (a JSON schema, as a dict or its text), `json_object` (any JSON
    object), `regex`, `choice` (one of these strings) or `grammar` (EBNF, as xgrammar and vLLM take it).
    disable_any_whitespace: JSON without any whitespace between tokens."""

    json: dict | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "json_object", "regex", "choice", "grammar")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of json, json_object, regex, choice and "
                             f"grammar; got {given or 'none'}")
        if self.choice is not None:
            if (not isinstance(self.choice, list | tuple) or not self.choice
                    or not all(isinstance(c, str) for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json is not None and not isinstance(self.json, dict | str):
            raise ValueError("structured_outputs.json must be a JSON schema (an object or its text)")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")

    def key(self) -> str:
        """Canonical text of the constraint: equal constraints share one compiled grammar."""
        schema = self.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        return json.dumps({"json": schema, "json_object": self.json_object, "regex": self.regex,
                           "choice": self.choice, "grammar": self.grammar,
                           "ws": self.disable_any_whitespace}, sort_keys=True)


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocab size; compiled grammars are cached by key."""

    def __init__(self, tokenizer: Any, vocab_size: int, cache_size: int = 256):
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._compile = functools.lru_cache(maxsize=cache_size)(self._compile_key)

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar; ValueError naming what is wrong with an invalid schema, regex or grammar."""
        return self._compile(params.key())

    def _compile_key(self, key: str) -> Any:
        spec = json.loads(key)
        whitespace = {"any_whitespace": not spec["ws"], "max_whitespace_cnt": MAX_JSON_WHITESPACE}
        try:
            if spec["json"] is not None:
                return self._compiler.compile_json_schema(json.dumps(spec["json"]), **whitespace)
            if spec["json_object"]:
                return self._compiler.compile_json_schema(json.dumps({"type": "object"}), **whitespace)
            if spec["regex"] is not None:
                return self._compiler.compile_regex(spec["regex"])
            if spec["choice"] is not None:
                return self._compiler.compile_grammar(_choice_grammar(spec["choice"]))
            return self._compiler.compile_grammar(spec["grammar"])
        except (RuntimeError, ValueError, TypeError) as e:
            kind = next(k for k in ("json", "json_object", "regex", "choice", "grammar") if spec[k])
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            first = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", first)  # xgrammar's log prefix: time, source file
            raise ValueError(f"invalid structured_outputs.{kind}: {first}") from None

    def matcher(self, params: StructuredOutputsParams) -> Any:
        return self._xgr.GrammarMatcher(self.compile(params))

    def bitmask(self, batch: int, rows: list[int], matchers: list[Any]) -> torch.Tensor:
        """[batch, vocab / 32] int32 bits of the tokens allowed next: row rows[i] from matchers[i], the
        other rows all allowed."""
        mask = self._xgr.allocate_token_bitmask(batch, self.vocab_size)
        for row, m in zip(rows, matchers, strict=True):
            m.fill_next_token_bitmask(mask, row)
        return mask


def token_bitmask_op(device: torch.device, ops: ModuleType) -> Callable[[torch.Tensor, torch.Tensor, list[int]], None]:
    """How the sampler masks its constrained rows, in place: xgrammar's kernel on CUDA; on CPU the kernel ops'
    apply_token_bitmask (tokenmill's C++ op, over ten times faster than xgrammar's CPU one; else the reference)."""
    if device.type == "cuda":
        import xgrammar as xgr

        return lambda logits, bitmask, rows: xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
    return ops.apply_token_bitmask


def _choice_grammar(choices: list[str]) -> str:
    """EBNF for exactly one of the strings."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)
