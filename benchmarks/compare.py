"""Side-by-side view of serving-benchmark results from several backends (e.g. tokenmill and llama.cpp).

    python benchmarks/compare.py benchmarks/results/*-conc*.json --out benchmarks/results/compare

Groups the JSON records that benchmarks/serving.py saved by backend, prints one Markdown table per
sweep kind (concurrency, request rate) with output tok/s and median/p99 TTFT and TPOT, and draws one
PNG per sweep kind with every backend's output throughput and median TPOT.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path


def load(paths: Sequence[Path]) -> dict[str, dict[str, dict[float, dict]]]:
    """{sweep kind: {backend: {sweep value: summary}}}; sweep kind is "concurrency" or "request rate"."""
    out: dict[str, dict[str, dict[float, dict]]] = defaultdict(lambda: defaultdict(dict))
    for path in paths:
        record = json.loads(Path(path).read_text())
        cfg, summary = record["config"], record["summary"]
        if cfg.get("max_concurrency"):
            kind, value = "concurrency", float(cfg["max_concurrency"])
        else:
            rate = cfg["request_rate"]
            kind, value = "request rate", math.inf if rate in (None, "inf") else float(rate)
        out[kind][cfg["backend"]][value] = summary
    return out


def _label(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:g}"


def table(kind: str, by_backend: dict[str, dict[float, dict]]) -> str:
    rows = [f"| backend | {kind} | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) |",
            "|---|---|---|---|---|"]
    for backend in sorted(by_backend):
        for value, s in sorted(by_backend[backend].items()):
            rows.append(f"| {backend} | {_label(value)} | {s['output_throughput']:.1f} | "
                        f"{s['ttft_ms']['median']:.0f} / {s['ttft_ms']['p99']:.0f} | "
                        f"{s['tpot_ms']['median']:.0f} / {s['tpot_ms']['p99']:.0f} |")
    return "\n".join(rows)


def plot(kind: str, by_backend: dict[str, dict[float, dict]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = sorted({v for points in by_backend.values() for v in points})
    xs = {v: i for i, v in enumerate(values)}  # evenly spaced: an infinite rate has no numeric place
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for backend in sorted(by_backend):
        points = sorted(by_backend[backend].items())
        ax1.plot([xs[v] for v, _ in points], [s["output_throughput"] for _, s in points], "o-", label=backend)
        ax2.plot([xs[v] for v, _ in points], [s["tpot_ms"]["median"] for _, s in points], "o-", label=backend)
    for ax, title, ylabel in ((ax1, "Output throughput", "tokens/s"), (ax2, "Median time per output token", "ms")):
        ax.set_title(f"{title} vs {kind}")
        ax.set_xlabel(kind)
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(len(values)), [_label(v) for v in values])
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compare-{kind.replace(' ', '-')}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="JSON files saved by benchmarks/serving.py")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the PNGs")
    args = p.parse_args(argv)
    for kind, by_backend in sorted(load(args.results).items()):
        print(f"\n### By {kind}\n\n{table(kind, by_backend)}\n")
        print(f"plot: {plot(kind, by_backend, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
