"""Serving-benchmark arithmetic on synthetic timings (no server)."""

import math
import statistics

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.client import Target, arrival_delays, build_payload, chunk_text
from benchmarks.datasets import BenchRequest
from benchmarks.metrics import (
    RequestResult,
    goodput,
    inter_token_latencies,
    meets_slos,
    parse_slos,
    percentile,
    summarize,
    tpot,
)
from benchmarks.report import _json_safe, format_table


def ok(ttft: float, e2e: float, n_out: int, n_in: int = 10, itl: list[float] | None = None) -> RequestResult:
    return RequestResult(True, ttft=ttft, e2e=e2e, output_tokens=n_out, prompt_tokens=n_in, itl=itl or [])


def test_percentile_known_values():
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 90) == pytest.approx(3.7)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(xs, 101)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), st.floats(0, 100))
def test_percentile_matches_numpy_linear(xs, q):
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-9, abs=1e-6)


def test_tpot_excludes_first_token():
    # 1 s to the first token, then 9 more tokens over 0.9 s: 100 ms each.
    assert tpot(e2e=1.9, ttft=1.0, output_tokens=10) == pytest.approx(0.1)
    assert tpot(e2e=1.0, ttft=1.0, output_tokens=1) is None
    assert tpot(e2e=1.0, ttft=1.0, output_tokens=0) is None


def test_inter_token_latencies_are_chunk_gaps():
    assert inter_token_latencies([0.5, 0.6, 0.8, 1.1]) == pytest.approx([0.1, 0.2, 0.3])
    assert inter_token_latencies([0.5]) == []


def test_parse_slos():
    assert parse_slos(["ttft:500", "TPOT:50", "e2e:2000"]) == {"ttft": 500.0, "tpot": 50.0, "e2e": 2000.0}
    for bad in ("ttft", "itl:5", "ttft:0", "ttft:-3"):
        with pytest.raises(ValueError):
            parse_slos([bad])


def test_goodput_counts_requests_within_all_slos():
    results = [
        ok(ttft=0.1, e2e=1.0, n_out=10),  # tpot 100 ms
        ok(ttft=0.6, e2e=1.0, n_out=10),  # ttft too slow
        ok(ttft=0.1, e2e=3.1, n_out=11),  # tpot 300 ms: too slow
        ok(ttft=0.2, e2e=0.2, n_out=1),  # no tpot: cannot violate it
        RequestResult(False, error="boom"),
    ]
    slos = {"ttft": 500.0, "tpot": 150.0}
    assert [meets_slos(r, slos) for r in results] == [True, False, False, True, False]
    assert goodput(results, slos, duration=4.0) == pytest.approx(0.5)
    assert goodput(results, {"e2e": 1500.0}, duration=2.0) == pytest.approx(1.5)


def test_summarize_throughputs_and_distributions():
    results = [
        ok(ttft=0.1, e2e=1.0, n_out=10, n_in=20, itl=[0.1] * 9),
        ok(ttft=0.3, e2e=2.1, n_out=10, n_in=30, itl=[0.2] * 9),
        RequestResult(False, error="HTTP 500: x"),
        RequestResult(False, error="HTTP 500: x"),
    ]
    s = summarize(results, duration=2.0, slos={"ttft": 200.0})
    assert (s["completed"], s["failed"]) == (2, 2)
    assert s["errors"] == {"HTTP 500: x": 2}
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(10.0)
    assert s["total_token_throughput"] == pytest.approx(35.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["ttft_ms"]["median"] == pytest.approx(200.0)
    assert s["ttft_ms"]["p99"] == pytest.approx(298.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(150.0)
    assert s["itl_ms"]["median"] == pytest.approx(150.0)
    assert s["e2e_ms"]["p90"] == pytest.approx(1990.0)
    assert s["goodput"] == pytest.approx(0.5)
    table = format_table(s)
    assert "Goodput" in table and "Time to First Token" in table and "error x2: HTTP 500: x" in table


def test_summarize_all_failed_is_nan_not_crash():
    s = summarize([RequestResult(False, error="e")], duration=1.0)
    assert s["completed"] == 0 and math.isnan(s["ttft_ms"]["p99"])
    assert "n/a" in format_table(s)
    assert _json_safe(s)["ttft_ms"]["p99"] is None
    assert _json_safe({"rate": math.inf}) == {"rate": "inf"}


def test_poisson_arrivals_seeded_with_mean_gap():
    a = arrival_delays(4000, 4.0, seed=1)
    assert a == arrival_delays(4000, 4.0, seed=1)
    assert a[0] == 0.0 and all(d >= 0 for d in a)
    assert statistics.mean(a[1:]) == pytest.approx(0.25, rel=0.05)
    assert arrival_delays(5, math.inf, seed=1) == [0.0] * 5
    with pytest.raises(ValueError):
        arrival_delays(3, 0.0, seed=1)


def test_payload_and_chunk_text_per_endpoint():
    req = BenchRequest("hello there", 7)
    comp = build_payload(Target("http://x", "/v1/completions", "m"), req)
    chat = build_payload(Target("http://x", "/v1/chat/completions", "m"), req)
    assert comp["prompt"] == "hello there" and "messages" not in comp
    assert chat["messages"] == [{"role": "user", "content": "hello there"}]
    for body in (comp, chat):
        assert body["max_tokens"] == 7 and body["ignore_eos"] and body["stream"]
        assert body["stream_options"] == {"include_usage": True}
    assert chunk_text({"choices": [{"text": "ab"}]}) == "ab"
    assert chunk_text({"choices": [{"delta": {"content": "c"}}]}) == "c"
    assert chunk_text({"choices": [{"delta": {"role": "assistant", "content": None}}]}) == ""
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""
