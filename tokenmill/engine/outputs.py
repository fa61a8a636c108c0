"""What the engine hands back: RequestOutput with one CompletionOutput per sample (vLLM's shape).

The engine emits deltas: each RequestOutput carries only what its samples gained in that step (new
text, new token ids, new logprobs), so a step's output work is O(batch), not O(tokens generated so
far). Consumers that want the whole result fold the deltas with RequestOutput.add.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Logprob:
    """A prompt token's (or an alternative's) logprob and its rank in the vocabulary (1 = most likely)."""

    logprob: float
    rank: int


# Per prompt token: {token_id: Logprob} holding the prompt token and the top-N; None for the first token.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One generated sequence of a request (or what it gained in one step)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    # Per generated token: {token_id: logprob} holding the chosen token and the top-N; None if not asked.
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, delta: CompletionOutput) -> None:
        """Append a later delta of the same sample."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        self.cumulative_logprob = delta.cumulative_logprob
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class RequestMetrics:
    """When a request reached each phase (time.time() of the engine's process), and the phases' lengths in
    seconds as vLLM splits them; a phase the request never reached (or has not ended) is None."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        return _between(self.arrival_time, self.first_scheduled_time)

    @property
    def time_to_first_token(self) -> float | None:
        return _between(self.arrival_time, self.first_token_time)

    @property
    def prefill_time(self) -> float | None:
        return _between(self.first_scheduled_time, self.first_token_time)

    @property
    def decode_time(self) -> float | None:
        return _between(self.first_token_time, self.finished_time)

    @property
    def inference_time(self) -> float | None:
        return _between(self.first_scheduled_time, self.finished_time)

    @property
    def e2e_time(self) -> float | None:
        return _between(self.arrival_time, self.finished_time)

    def span(self, other: RequestMetrics) -> RequestMetrics:
        """Both requests' times as one: each phase begins at the first's and ends at the last's."""
        first = [min((t for t in pair if t is not None), default=None)
                 for pair in ((self.first_scheduled_time, other.first_scheduled_time),
                              (self.first_token_time, other.first_token_time))]
        finished = None if None in (self.finished_time, other.finished_time) else max(self.finished_time,
                                                                                      other.finished_time)
        return RequestMetrics(min(self.arrival_time, other.arrival_time), *first, finished)


def _between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else max(0.0, end - start)


@dataclass
class RequestOutput:
    """A request's samples after a step. From the engine: a delta holding only the samples that advanced,
    each with only its new tokens. `error` is set when processing this request failed (finish_reason
    "error"); other requests are unaffected."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(repr=False, default=None)
    num_cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # in one delta only, once the whole prompt is computed

    def add(self, delta: RequestOutput) -> None:
        """Fold a later delta of the same request into this one (which then holds the whole result)."""
        by_index = {o.index: o for o in self.outputs}
        for d in delta.outputs:
            if d.index in by_index:
                by_index[d.index].add(d)
            else:
                by_index[d.index] = CompletionOutput(d.index, d.text, list(d.token_ids), d.cumulative_logprob,
                                                     list(d.logprobs) if d.logprobs is not None else None,
                                                     d.finish_reason, d.stop_reason)
        self.outputs = sorted(by_index.values(), key=lambda o: o.index)
        self.finished, self.error = delta.finished, delta.error or self.error
        self.metrics, self.num_cached_tokens = delta.metrics, delta.num_cached_tokens
        self.prompt_logprobs = delta.prompt_logprobs or self.prompt_logprobs

    @classmethod
    def empty(cls, delta: RequestOutput) -> RequestOutput:
        """An accumulator for the request `delta` belongs to."""
        return cls(delta.request_id, delta.prompt, delta.prompt_token_ids, [], False, delta.metrics)
