"""Prometheus metrics with vLLM's names under the `tokenmill:` prefix.

Gauges and counters are read from the engine's latest stats snapshot at scrape time (a custom
collector), so the engine thread does no metrics work beyond counting (tokens per step among them);
latency histograms are observed as each request's outputs reach the server, the phases of a request
(queue, prefill, decode, inference) and its token counts when it finishes, from the timestamps the
engine stamped on it; HTTP requests are counted by route and status as they end.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from tokenmill.engine.core.llm_engine import ITERATION_TOKEN_BUCKETS, EngineStats
from tokenmill.engine.outputs import RequestOutput

from .observe import RequestRecord, current_record

PREFIX = "tokenmill:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
# Tokens per request, as vLLM buckets them (1, 2, 5 per decade).
_TOKEN_BUCKETS = tuple(m * 10 ** e for e in range(6) for m in (1, 2, 5))


# (kind, name, help, EngineStats field) of the engine's gauges and counters.
_ENGINE_METRICS = [
    (GaugeMetricFamily, "num_requests_running", "Sequences in the running batch.", "num_running"),
    (GaugeMetricFamily, "num_requests_waiting", "Sequences waiting to be scheduled.", "num_waiting"),
    (GaugeMetricFamily, "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", "kv_cache_usage"),
    (CounterMetricFamily, "prompt_tokens_total", "Prompt tokens received.", "prompt_tokens"),
    (CounterMetricFamily, "generation_tokens_total", "Tokens generated.", "generation_tokens"),
    (CounterMetricFamily, "num_preemptions_total", "Sequences preempted for lack of KV blocks.", "num_preemptions"),
    (CounterMetricFamily, "prefix_cache_queries_total", "Blocks looked up in the prefix cache.",
     "prefix_cache_queries"),
    (CounterMetricFamily, "prefix_cache_hits_total", "Blocks found in the prefix cache.", "prefix_cache_hits"),
]


# Each served model's (name, version) labels and its engine's latest EngineStats, read at scrape time.
EngineStatsSource = Callable[[], list[tuple[list[str], EngineStats]]]


class _EngineStatsCollector(Collector):
    """Every served model's engine stats, labelled with its name and version."""

    def __init__(self, engine_stats: EngineStatsSource):
        self.engine_stats = engine_stats

    def collect(self) -> Iterator:
        models = self.engine_stats()
        label_names = ["model_name", "version"]

        for kind, name, doc, field in _ENGINE_METRICS:
            family = kind(PREFIX + name, doc, labels=label_names)
            for labels, stats in models:
                family.add_metric(labels, getattr(stats, field))
            yield family
        success = CounterMetricFamily(PREFIX + "request_success_total", "Finished sequences by reason.",
                                      labels=[*label_names, "finished_reason"])
        for labels, stats in models:
            for reason, count in sorted(stats.finished_reasons.items()):
                success.add_metric([*labels, reason], count)
        yield success
        iteration = HistogramMetricFamily(PREFIX + "iteration_tokens_total",
                                          "Tokens per engine step: prompts whose prefill ended in it, and tokens "
                                          "generated.", labels=label_names)
        for labels, stats in models:
            h, cumulative, buckets = stats.iteration_tokens, 0, []
            for bound, count in zip([*map(float, ITERATION_TOKEN_BUCKETS), float("inf")], h.counts, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            iteration.add_metric(labels, buckets, h.tokens)
        yield iteration
        yield from _spec_decode_metrics(models, label_names)


def _spec_decode_metrics(models: list[tuple[list[str], EngineStats]], label_names: list[str]) -> Iterator:
    """vLLM's speculative-decoding counters, and the acceptance rate and mean accepted length derived from
    them since start (rate() of the counters gives them over a window), for engines that speculate."""
    spec = [(labels, stats.spec_decode) for labels, stats in models if stats.spec_decode is not None]
    if not spec:
        return
    for name, doc, field in (("num_drafts", "Proposals verified (a sequence's drafts in one step).", "num_drafts"),
                             ("num_draft_tokens", "Draft tokens proposed and verified.", "num_draft_tokens"),
                             ("num_accepted_tokens", "Draft tokens accepted.", "num_accepted_tokens")):
        family = CounterMetricFamily(PREFIX + "spec_decode_" + name + "_total", doc, labels=label_names)
        for labels, s in spec:
            family.add_metric(labels, getattr(s, field))
        yield family
    per_pos = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos_total",
                                  "Draft tokens accepted, by position in the proposal (0: first).",
                                  labels=[*label_names, "position"])
    rate = GaugeMetricFamily(PREFIX + "spec_decode_draft_acceptance_rate",
                             "Accepted over proposed draft tokens since start.", labels=label_names)
    length = GaugeMetricFamily(PREFIX + "spec_decode_mean_acceptance_length",
                               "Tokens emitted per verified proposal since start (1 + accepted drafts).",
                               labels=label_names)
    for labels, s in spec:
        for pos, count in enumerate(s.accepted_per_pos):
            per_pos.add_metric([*labels, str(pos)], count)
        rate.add_metric(labels, s.num_accepted_tokens / s.num_draft_tokens if s.num_draft_tokens else 0.0)
        length.add_metric(labels, 1 + s.num_accepted_tokens / s.num_drafts if s.num_drafts else 0.0)
    yield from (per_pos, rate, length)


class ServerMetrics:
    """One CollectorRegistry per app, so two apps in one process (as in the tests) do not collide."""

    def __init__(self, engine_stats: EngineStatsSource):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(engine_stats))

        def histogram(name: str, doc: str, buckets: tuple = _LATENCY_BUCKETS) -> Histogram:
            return Histogram(PREFIX + name, doc, ["model_name", "version"], registry=self.registry, buckets=buckets)

        self.time_to_first_token = histogram("time_to_first_token_seconds", "Time to first token.")
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between output tokens.")
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "Arrival to finish.")
        # A finished request's phases, from the engine's timestamps, as vLLM splits them.
        self.request_queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled (waiting).")
        self.request_prefill_time = histogram("request_prefill_time_seconds", "First scheduled to first token.")
        self.request_decode_time = histogram("request_decode_time_seconds", "First token to finish.")
        self.request_inference_time = histogram("request_inference_time_seconds",
                                                "First scheduled to finish (running).")
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens of a finished request.",
                                               _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Tokens a finished request generated (all its samples).",
                                                   _TOKEN_BUCKETS)
        self.request_max_num_generation_tokens = histogram(
            "request_max_num_generation_tokens", "Tokens the longest sample of a finished request generated.",
            _TOKEN_BUCKETS)
        self.http_requests = Counter(PREFIX + "http_requests_total",
                                     "HTTP requests by route template and status code (and model, once known).",
                                     ["model_name", "version", "method", "route", "status"], registry=self.registry)

    def count_http_request(self, r: RequestRecord) -> None:
        # The route's template, not the path: a client's made-up paths must not grow the label set.
        self.http_requests.labels(r.model or "", r.version or "", r.method, r.route or "unmatched",
                                  str(r.status or 0)).inc()

    def for_model(self, name: str, version: str | None) -> ModelMetrics:
        return ModelMetrics(self, name, version or "")


class ModelMetrics:
    """One model's request histograms."""

    def __init__(self, metrics: ServerMetrics, name: str, version: str):
        self.time_to_first_token = metrics.time_to_first_token.labels(name, version)
        self.inter_token_latency = metrics.inter_token_latency.labels(name, version)
        self.e2e_request_latency = metrics.e2e_request_latency.labels(name, version)
        self.request_queue_time = metrics.request_queue_time.labels(name, version)
        self.request_prefill_time = metrics.request_prefill_time.labels(name, version)
        self.request_decode_time = metrics.request_decode_time.labels(name, version)
        self.request_inference_time = metrics.request_inference_time.labels(name, version)
        self.request_prompt_tokens = metrics.request_prompt_tokens.labels(name, version)
        self.request_generation_tokens = metrics.request_generation_tokens.labels(name, version)
        self.request_max_num_generation_tokens = metrics.request_max_num_generation_tokens.labels(name, version)

    def observe_finished(self, delta: RequestOutput, num_tokens: list[int]) -> None:
        """A finished request's phases, from the engine's timestamps (a phase it never reached is left out),
        and its token counts; num_tokens: each sample's generated tokens."""
        m = delta.metrics
        for histogram, seconds in ((self.request_queue_time, m.queue_time), (self.request_prefill_time, m.prefill_time),
                                   (self.request_decode_time, m.decode_time),
                                   (self.request_inference_time, m.inference_time)):
            if seconds is not None:
                histogram.observe(seconds)
        self.request_prompt_tokens.observe(len(delta.prompt_token_ids))
        self.request_generation_tokens.observe(sum(num_tokens))
        self.request_max_num_generation_tokens.observe(max(num_tokens, default=0))

    def tracker(self, request_id: str) -> RequestTracker:
        return RequestTracker(self, request_id)


class RequestTracker:
    """Follows one engine request's output deltas: the latency histograms, and the HTTP request's record when
    it ends."""

    def __init__(self, metrics: ModelMetrics, request_id: str):
        self.metrics = metrics
        self.request_id = request_id
        self.record = current_record()
        self.last: RequestOutput | None = None
        self._last_time = 0.0
        self._num_tokens: dict[int, int] = {}  # per sample
        self._reasons: dict[int, str] = {}
        self._texts: dict[int, str] = {}  # per sample, kept only for --log-prompts

    def update(self, delta: RequestOutput) -> None:
        now = time.time()
        before = max(self._num_tokens.values(), default=0)
        keep_text = self.record is not None and self.record.keep_text
        for o in delta.outputs:
            self._num_tokens[o.index] = self._num_tokens.get(o.index, 0) + len(o.token_ids)
            if o.finish_reason:
                self._reasons[o.index] = o.finish_reason
            if keep_text:
                self._texts[o.index] = self._texts.get(o.index, "") + o.text
        length = max(self._num_tokens.values(), default=0)
        if self.last is None:
            self.metrics.time_to_first_token.observe(now - delta.metrics.arrival_time)
        elif length > before:  # several tokens may arrive together when the reader lags
            gap = (now - self._last_time) / (length - before)
            for _ in range(length - before):
                self.metrics.inter_token_latency.observe(gap)
        self.last, self._last_time = delta, now
        if delta.finished:
            self.metrics.e2e_request_latency.observe(now - delta.metrics.arrival_time)
            self.metrics.observe_finished(delta, list(self._num_tokens.values()))
            self._record("error" if delta.error else None)

    def close(self) -> None:
        """The stream ended; if the request had not finished, the client left and it was aborted."""
        if self.last is None or not self.last.finished:
            self._record("abort")

    def _record(self, reason: str | None) -> None:
        """Fold the request, as it ended, into the HTTP request's record; reason: why, where the samples'
        own finish reasons do not say (an abort, an error)."""
        if self.record is None or self.last is None:
            return
        reasons = [self._reasons[i] for i in sorted(self._reasons)]
        if reason and reason not in reasons:
            reasons.append(reason)
        self.record.add_engine_request(self.last, sum(self._num_tokens.values()), reasons,
                                       [self._texts[i] for i in sorted(self._texts)])
