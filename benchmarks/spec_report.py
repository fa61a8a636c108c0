"""The speculative benchmark's arithmetic: acceptance from /metrics deltas or llama-server's `timings`, the
per-point row, the markdown table and the issue's targets. Pure functions, tested on canned input."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

SPEC_COUNTERS = {
    "drafts": "tokenmill:spec_decode_num_drafts_total",
    "draft_tokens": "tokenmill:spec_decode_num_draft_tokens_total",
    "accepted": "tokenmill:spec_decode_num_accepted_tokens_total",
}
GENERATION_COUNTER = "tokenmill:generation_tokens_total"


_SAMPLE = re.compile(r"^([^\s{#]+)(?:\{.*\})?\s+(\S+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Sample name -> value summed over label sets, from Prometheus' text format. Enough for counters:
    comments and unparsable lines are skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m:
            continue
        try:
            value = float(m.group(2))
        except ValueError:
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + value
    return out


def counter_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float] | None:
    """The speculation counters' growth over a run (drafts, draft_tokens, accepted); None when the server
    exports none of them (speculation off, or a build without it)."""
    if not any(name in after for name in SPEC_COUNTERS.values()):
        return None
    return {key: after.get(name, 0.0) - before.get(name, 0.0) for key, name in SPEC_COUNTERS.items()}


def llama_deltas(timings: Iterable[Mapping | None]) -> dict[str, float] | None:
    """The same counts from llama-server's per-response `timings` (draft_n, draft_n_accepted); None when no
    response drafted anything (it omits the fields then). llama.cpp reports no count of drafts."""
    seen = [t for t in timings if t and "draft_n" in t]
    if not seen:
        return None
    return {"drafts": math.nan, "draft_tokens": float(sum(t["draft_n"] for t in seen)),
            "accepted": float(sum(t.get("draft_n_accepted", 0) for t in seen))}


def acceptance_rate(deltas: Mapping[str, float] | None) -> float:
    """accepted / draft tokens; NaN without speculation or without any draft token."""
    if not deltas or not deltas.get("draft_tokens"):
        return math.nan
    return deltas["accepted"] / deltas["draft_tokens"]


def point_row(config: str, workload: str, concurrency: int, summary: Mapping,
              deltas: Mapping[str, float] | None) -> dict:
    """One table row from metrics.summarize's output and the speculation counts."""
    completed = summary["completed"]
    return {
        "config": config, "workload": workload, "concurrency": concurrency,
        "completed": completed, "failed": summary["failed"],
        "output_tok_s": summary["output_throughput"],
        "tpot_p50_ms": summary["tpot_ms"]["median"], "tpot_p99_ms": summary["tpot_ms"]["p99"],
        "mean_output_tokens": summary["total_output_tokens"] / completed if completed else math.nan,
        "acceptance": acceptance_rate(deltas),
        "spec": dict(deltas) if deltas else None,
    }


def _num(v: float | None, fmt: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def ratio(row: Mapping, rows: Sequence[Mapping], baselines: Mapping[str, str | None]) -> float:
    """row's output tok/s over its baseline config's at the same workload and concurrency (NaN if none)."""
    base = baselines.get(row["config"])
    for other in rows:
        if (other["config"] == base and other["workload"] == row["workload"]
                and other["concurrency"] == row["concurrency"] and other["completed"]):
            return row["output_tok_s"] / other["output_tok_s"]
    return math.nan


def markdown_table(rows: Sequence[Mapping], baselines: Mapping[str, str | None]) -> str:
    """Rows grouped by workload and concurrency, in the order given within a group."""
    lines = ["| workload | in flight | config | output tok/s | x off | TPOT p50 / p99 (ms) | acceptance "
             "| mean output tokens | failed |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = sorted(range(len(rows)), key=lambda i: (_WORKLOAD_ORDER.get(rows[i]["workload"], 9),
                                                    rows[i]["concurrency"], i))
    for i in order:
        r = rows[i]
        if not r["completed"]:
            lines.append(f"| {r['workload']} | {r['concurrency']} | {r['config']} | failed | – | – | – | – "
                         f"| {r['failed']} |")
            continue
        lines.append(
            f"| {r['workload']} | {r['concurrency']} | {r['config']} | {_num(r['output_tok_s'], '.1f')} "
            f"| {_num(ratio(r, rows, baselines), '.2f')} | {_num(r['tpot_p50_ms'], '.0f')} / "
            f"{_num(r['tpot_p99_ms'], '.0f')} | {_num(r['acceptance'], '.2f')} "
            f"| {_num(r['mean_output_tokens'], '.0f')} | {r['failed']} |")
    return "\n".join(lines)


_WORKLOAD_ORDER = {"grounded": 0, "chat": 1, "greedy": 2}


def _best(rows: Sequence[Mapping], workload: str, concurrency: int, pred) -> Mapping | None:
    fit = [r for r in rows if r["workload"] == workload and r["concurrency"] == concurrency
           and r["completed"] and pred(r)]
    return max(fit, key=lambda r: r["output_tok_s"], default=None)


def targets(rows: Sequence[Mapping], backends: Mapping[str, str], baselines: Mapping[str, str | None]) -> list[str]:
    """The issue's targets, one line each with the numbers behind it (only those the rows can answer):
    grounded at 1 in flight >= 2x tokenmill off and >= 1.5x llama-server's best; every tokenmill
    speculation config within 5% of off on chat at 1 in flight and within 3% at 32 in flight."""
    out = []

    def is_tm_spec(r: Mapping) -> bool:
        return backends.get(r["config"]) == "tokenmill" and baselines.get(r["config"]) is not None

    spec = _best(rows, "grounded", 1, is_tm_spec)
    if spec:
        x = ratio(spec, rows, baselines)
        out.append(f"grounded, 1 in flight: best tokenmill speculation {spec['config']} "
                   f"{spec['output_tok_s']:.1f} tok/s = {x:.2f}x its off (target 2x): {_verdict(x >= 2.0)}")
        llama = _best(rows, "grounded", 1, lambda r: backends.get(r["config"]) == "llama.cpp")
        if llama:
            y = spec["output_tok_s"] / llama["output_tok_s"]
            out.append(f"grounded, 1 in flight: {y:.2f}x llama-server's best ({llama['config']}, "
                       f"{llama['output_tok_s']:.1f} tok/s; target 1.5x): {_verdict(y >= 1.5)}")
    for workload in ("chat", "grounded"):
        for conc, floor in ((1, 0.95), (32, 0.97)):
            if workload == "grounded" and conc == 1:
                continue  # the speed-up target above covers it
            for r in rows:
                if r["workload"] == workload and r["concurrency"] == conc and r["completed"] and is_tm_spec(r):
                    x = ratio(r, rows, baselines)
                    if not math.isnan(x):
                        out.append(f"{workload}, {conc} in flight: {r['config']} {x:.3f}x its off "
                                   f"(floor {floor:g}x): {_verdict(x >= floor)}")
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"
