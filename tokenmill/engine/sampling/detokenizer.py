"""Incremental detokenization: output token ids -> text, streamed safely, with stop strings.

Decoding works like vLLM/TGI: each step decodes only a small window of ids
(prefix_offset..end) and emits the part of its text beyond the already-emitted
window prefix (prefix_offset..read_offset). Byte-level and byte-fallback tokenizers split
one character across tokens, so while the window's text ends in U+FFFD (an incomplete
UTF-8 sequence) nothing is emitted and the window just grows. Stop strings are matched
on the emitted text by stop_strings.StopMatcher, which sees each character once.

The streamed text is what the output adds to the decode of the whole sequence, with one exception: where a
run of sentencepiece <0xNN> pieces holds bytes that form no character (random weights, or max_tokens
cutting a character), transformers' decode turns the whole run into U+FFFD, characters released before
included; a stream cannot take those back.
"""
from __future__ import annotations

from tokenmill.engine.sampling.sampling_params import SamplingParams
from tokenmill.engine.sampling.stop_strings import StopMatcher

# Prompt ids used as initial context, so the first output token decodes as it would
# mid-text (e.g. a sentencepiece "▁Hello" keeps its leading space).
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text, incrementally, UTF-8 safe, with stop strings."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.skip_special = params.skip_special_tokens
        # Dropping special ids up front (rather than only at decode) keeps a run of them from
        # growing the decode window, and decode() of the rest gives the same text.
        self._special_ids: frozenset[int] = frozenset(
            [*tokenizer.all_special_ids,
             *(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)]
        ) if self.skip_special else frozenset()
        self._stops = StopMatcher(params.stop or [], params.include_stop_str_in_output)

        prompt = [i for i in prompt_token_ids if i not in self._special_ids]
        ids = prompt[-PROMPT_CONTEXT_TOKENS:]
        # Context starting inside a character decodes as U+FFFD (byte fallback: every byte of its run), and
        # context that is all U+FFFD is dropped below, losing the output's leading space: start it on the
        # character's first byte, at most 3 ids back.
        for extra in range(1, 4):
            if not self._decode(ids).startswith(REPLACEMENT_CHAR) or len(ids) == len(prompt):
                break
            ids = prompt[-PROMPT_CONTEXT_TOKENS - extra:]
        # A prompt cut mid-character would merge with the first output bytes and corrupt the
        # prefix/new split; decode the output on its own then.
        if self._decode(ids).endswith(REPLACEMENT_CHAR):
            ids = []
        self._ids: list[int] = ids  # context ids followed by the (non-skipped) output ids
        self._prefix_offset = 0
        self._read_offset = len(ids)

        self._out: list[str] = []  # released text, in chunks
        self._num_taken = 0  # chunks already handed out by take_text()
        self._done = False

    def append(self, token_ids: list[int], check_stops: bool = True) -> str | None:
        """Add newly sampled ids; returns the stop string that matched (generation must end), else None.

        With check_stops False (fewer than min_tokens out), a stop string ending here does not count."""
        if self._done:
            raise RuntimeError("append() after the detokenizer finished")
        self._ids.extend(i for i in token_ids if i not in self._special_ids)
        return self._add_text(self._decode_new(flush=False), check_stops)

    def take_text(self) -> str:
        """The text released since the last call: the engine's per-step delta."""
        new = "".join(self._out[self._num_taken:])
        self._num_taken = len(self._out)
        return new

    @property
    def output_text(self) -> str:
        """Text safe to show now: excludes any held-back tail."""
        return "".join(self._out)

    def finish(self) -> str | None:
        """Generation ended for another reason (EOS, length, abort): release held-back text.

        Returns the stop string if the flushed last bytes (see below) completed one, else None.
        """
        if self._done:
            return None
        # Text still waiting for more bytes will get none; emit it as decode() would.
        stop = self._add_text(self._decode_new(flush=True))
        if stop is None:
            self._release(self._stops.flush())
            self._done = True
        return stop

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def _decode_new(self, flush: bool) -> str:
        """Text of the ids after read_offset; advances the window only past complete text."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or (full_text.endswith(REPLACEMENT_CHAR) and not flush):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full_text[len(prefix_text):]

    def _add_text(self, new: str, check_stops: bool = True) -> str | None:
        released, stop = self._stops.feed(new, check_stops)
        self._release(released)
        if stop is not None:
            self._done = True
        return stop

    def _release(self, text: str) -> None:
        if text:
            self._out.append(text)
