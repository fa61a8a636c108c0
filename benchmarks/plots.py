"""PNG plots of a sweep: throughput, TTFT and TPOT against request rate or concurrency."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_sweep(labels: Sequence[str], summaries: Sequence[dict], x_name: str, out_dir: Path,
               stem: str) -> list[Path]:
    """Three PNGs (throughput, TTFT p50/p99, TPOT p50/p99) with one point per sweep value.

    Points sit at evenly spaced positions labelled with the sweep values, because a
    sweep usually ends at an infinite rate, which has no place on a numeric axis.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    xs = list(range(len(labels)))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    def new_axes(title: str, ylabel: str):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ax.set_title(title)
        ax.set_xlabel(x_name)
        ax.set_ylabel(ylabel)
        ax.set_xticks(xs, labels)
        ax.grid(True, alpha=0.3)
        return fig, ax

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out_dir / f"{stem}-{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)

    fig, ax = new_axes(f"Throughput vs {x_name}", "tokens/s")
    ax.plot(xs, [s["output_throughput"] for s in summaries], "o-", label="output tok/s")
    ax.plot(xs, [s["total_token_throughput"] for s in summaries], "s--", label="total tok/s")
    ax2 = ax.twinx()
    ax2.plot(xs, [s["request_throughput"] for s in summaries], "^:", color="tab:green", label="requests/s")
    ax2.set_ylabel("requests/s")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="best")
    save(fig, "throughput")

    for key, title in (("ttft_ms", "Time to first token"), ("tpot_ms", "Time per output token")):
        fig, ax = new_axes(f"{title} vs {x_name}", "ms")
        ax.plot(xs, [s[key]["median"] for s in summaries], "o-", label="p50")
        ax.plot(xs, [s[key]["p99"] for s in summaries], "s--", label="p99")
        ax.legend(loc="best")
        save(fig, key.removesuffix("_ms"))
    return paths
