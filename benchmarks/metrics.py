"""Serving-benchmark arithmetic: pure functions over per-request timings.

Every time here is in seconds; reports convert to milliseconds at the edge
(`summarize`) because that is the unit people read latencies in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# SLO names accepted by `--goodput`, each bounding one per-request metric in ms.
SLO_METRICS = ("ttft", "tpot", "e2e")
PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class RequestResult:
    """What one request measured. Times are seconds relative to its own send."""

    success: bool
    error: str = ""
    ttft: float = 0.0  # send -> first content chunk
    itl: list[float] = field(default_factory=list)  # gaps between content chunks
    e2e: float = 0.0  # send -> end of stream
    prompt_tokens: int = 0
    output_tokens: int = 0
    start: float = 0.0  # send time relative to the benchmark start
    token_source: str = ""  # "usage" (server-reported) or "tokenizer"

    @property
    def tpot(self) -> float | None:
        return tpot(self.e2e, self.ttft, self.output_tokens)


def tpot(e2e: float, ttft: float, output_tokens: int) -> float | None:
    """Time per output token after the first: (e2e - ttft) / (n - 1).

    Undefined (None) for fewer than two tokens: there is no decode interval.
    """
    if output_tokens < 2:
        return None
    return (e2e - ttft) / (output_tokens - 1)


def inter_token_latencies(chunk_times: Sequence[float]) -> list[float]:
    """Gaps between consecutive content-chunk arrival times."""
    return [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)]


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between order statistics.

    Same definition as numpy's default ("linear"), written out so the report does not
    depend on numpy and the tests pin the definition. NaN for no values.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def distribution(values_s: Sequence[float]) -> dict[str, float]:
    """mean / median / p90 / p99 of seconds, reported in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    out = {"mean": mean(ms), "median": percentile(ms, 50.0)}
    for q in PERCENTILES[1:]:
        out[f"p{q:g}"] = percentile(ms, q)
    return out


def parse_slos(specs: Sequence[str]) -> dict[str, float]:
    """Parse `["ttft:500", "tpot:50"]` into `{"ttft": 500.0, "tpot": 50.0}` (ms)."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad SLO {spec!r}: expected NAME:MS with NAME in {SLO_METRICS}")
        ms = float(value)
        if not ms > 0:
            raise ValueError(f"bad SLO {spec!r}: the bound must be a positive number of ms")
        slos[name] = ms
    return slos


def meets_slos(result: RequestResult, slos: Mapping[str, float]) -> bool:
    """True when a successful request is within every SLO (ms).

    A request with a single output token has no TPOT, so a TPOT bound cannot fail it.
    """
    if not result.success:
        return False
    measured = {"ttft": result.ttft, "tpot": result.tpot, "e2e": result.e2e}
    for name, bound_ms in slos.items():
        value = measured[name]
        if value is not None and value * 1000.0 > bound_ms:
            return False
    return True


def goodput(results: Sequence[RequestResult], slos: Mapping[str, float], duration: float) -> float:
    """Requests per second that completed within all SLOs."""
    if duration <= 0:
        return math.nan
    return sum(meets_slos(r, slos) for r in results) / duration


def summarize(
    results: Sequence[RequestResult], duration: float, slos: Mapping[str, float] | None = None
) -> dict:
    """The report's numbers: counts, throughputs, and latency distributions (ms)."""
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            errors[r.error] = errors.get(r.error, 0) + 1
    summary: dict = {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(in_tokens + out_tokens),
        "ttft_ms": distribution([r.ttft for r in ok]),
        "tpot_ms": distribution([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": distribution([gap for r in ok for gap in r.itl]),
        "e2e_ms": distribution([r.e2e for r in ok]),
    }
    if slos:
        summary["slos_ms"] = dict(slos)
        summary["goodput"] = goodput(results, slos, duration)
    return summary
