"""Structured outputs: generation constrained to a JSON schema, a regex, a choice of strings or a grammar.

A request's constraint (SamplingParams.structured_outputs, vLLM's names) is compiled once by xgrammar
against the model's tokenizer, on worker threads so that the step loop goes on meanwhile, within a bound
(RequestLimits.max_constraint_compile_s), and cached by the constraint's canonical form. Each constrained sequence
keeps a matcher: before a step the matcher writes the bitmask of the tokens its grammar allows next, the
sampler masks only the constrained rows of the batch, and the chosen token advances the matcher. The
matcher's state follows the sequence's output tokens, which survive preemption (recompute), so it needs
no rebuilding. Free whitespace in JSON is bounded so that a small model cannot loop on it.
"""
from __future__ import annotations

import json
import queue
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
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
    disable_any_whitespace: JSON without any whitespace between tokens. prefix_grammar: EBNF of text that
    comes first, free of the constraint (a reasoning section: the constraint is the answer's)."""

    json: dict | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False
    prefix_grammar: str | None = None

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
        for name in ("regex", "grammar", "prefix_grammar"):
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
        # Not sort_keys: xgrammar writes an object's properties in the schema's order.
        return json.dumps({"json": schema, "json_object": self.json_object, "regex": self.regex,
                           "choice": self.choice, "grammar": self.grammar, "ws": self.disable_any_whitespace,
                           "prefix": self.prefix_grammar})


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocab size on a few worker threads (xgrammar releases the
    GIL while it compiles), so a long compile never holds up the step loop. Compiles are cached by key, the
    ones in progress too: equal constraints share one compile."""

    def __init__(self, tokenizer: Any, vocab_size: int, cache_size: int = 256, num_workers: int = 2):
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._cache: OrderedDict[str, Future] = OrderedDict()  # least recently used first
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[str, Future]] = queue.SimpleQueue()
        # Daemon threads rather than a ThreadPoolExecutor, whose workers the interpreter joins at exit: a
        # compile past its bound runs on (xgrammar cannot stop one) but must not keep the process alive.
        for i in range(num_workers):
            threading.Thread(target=self._work, name=f"tokenmill-grammar-{i}", daemon=True).start()

    def compile_async(self, params: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar, or of the ValueError naming what is wrong with the constraint."""
        key = params.key()
        with self._lock:
            future = self._cache.get(key)
            if future is None:
                future = self._cache[key] = Future()
                self._jobs.put((key, future))
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        return future

    def compile(self, params: StructuredOutputsParams, timeout: float) -> Any:
        """The compiled grammar, waiting at most `timeout` seconds; ValueError if it is invalid or takes longer."""
        try:
            return self.compile_async(params).result(timeout)
        except TimeoutError:
            raise compile_timeout_error(timeout) from None

    def _work(self) -> None:
        while True:
            key, future = self._jobs.get()
            try:
                future.set_result(self._compile_key(key))
            except ValueError as e:
                future.set_exception(e)
            except Exception as e:  # whatever else a compile raises is this request's problem, not the engine's
                future.set_exception(ValueError(f"invalid structured_outputs: {type(e).__name__}: {e}"))

    def _compile_key(self, key: str) -> Any:
        spec = json.loads(key)
        whitespace = {"any_whitespace": not spec["ws"], "max_whitespace_cnt": MAX_JSON_WHITESPACE}
        grammar = self._xgr.Grammar
        # The field an error names: the one given ({} is a JSON schema too: any JSON value).
        kind = next(k for k in ("json", "json_object", "regex", "choice", "grammar") if spec[k] not in (None, False))
        try:
            if spec["json"] is not None or spec["json_object"]:
                schema = spec["json"] if spec["json"] is not None else {"type": "object"}
                answer = grammar.from_json_schema(json.dumps(schema), **whitespace)
            elif spec["regex"] is not None:
                answer = grammar.from_regex(spec["regex"])
            else:
                answer = grammar.from_ebnf(_choice_grammar(spec["choice"]) if spec["choice"] else spec["grammar"])
            if spec["prefix"] is not None:
                kind = "prefix_grammar"
                answer = grammar.concat(grammar.from_ebnf(spec["prefix"]), answer)
            compiled = self._compiler.compile_grammar(answer)
            # A constraint no token can begin (xgrammar finds none for some characters) would fail the
            # request at its first step: it is the request's error, told before it starts.
            first = self._xgr.allocate_token_bitmask(1, self.vocab_size)
            self._xgr.GrammarMatcher(compiled).fill_next_token_bitmask(first, 0)
            if not first.any():
                raise ValueError("no token of the model's vocabulary can begin it")
            return compiled
        except (RuntimeError, ValueError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            first = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", first)  # xgrammar's log prefix: time, source file
            raise ValueError(f"invalid structured_outputs.{kind}: {first}") from None

    def matcher(self, compiled: Any) -> Any:
        """A fresh matcher of a compiled grammar, for one sequence."""
        return self._xgr.GrammarMatcher(compiled)

    def bitmask(self, batch: int, rows: list[int], matchers: list[Any]) -> torch.Tensor:
        """[batch, vocab / 32] int32 bits of the tokens allowed next: row rows[i] from matchers[i], the
        other rows all allowed."""
        mask = self._xgr.allocate_token_bitmask(batch, self.vocab_size)
        for row, m in zip(rows, matchers, strict=True):
            m.fill_next_token_bitmask(mask, row)
        return mask


def compile_timeout_error(seconds: float) -> ValueError:
    return ValueError(f"structured_outputs: the constraint did not compile within {seconds:g} s (the server's "
                      "max_constraint_compile_s); make it smaller or simpler")


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
