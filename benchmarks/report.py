"""Benchmark reports: the printed table, the environment record, and the JSON file."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import socket
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """HEAD of the repo, suffixed "-dirty" when the tree has local changes."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def environment(model_info: dict | None = None, metadata: dict[str, str] | None = None) -> dict:
    """Where and when the benchmark ran, and what the server says about its model.

    dtype and device come from `--metadata dtype=... device=...`, else from the
    server's /v1/models entry when it reports them (llama-server: meta.ftype).
    """
    info = model_info or {}
    meta = metadata or {}
    return {
        "model": info.get("id"),
        "dtype": meta.get("dtype") or info.get("dtype") or (info.get("meta") or {}).get("ftype"),
        "device": meta.get("device") or info.get("device"),
        "server_model_info": info,
        "metadata": meta,
        "git_commit": git_commit(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(v: float, nd: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def format_table(summary: dict, title: str = "Serving Benchmark Result") -> str:
    """Human-readable report of one run's `metrics.summarize` output."""
    w = 50
    rows = [
        ("Successful requests", str(summary["completed"])),
        ("Failed requests", str(summary["failed"])),
        ("Benchmark duration (s)", _fmt(summary["duration_s"])),
        ("Total input tokens", str(summary["total_input_tokens"])),
        ("Total generated tokens", str(summary["total_output_tokens"])),
        ("Request throughput (req/s)", _fmt(summary["request_throughput"])),
        ("Output token throughput (tok/s)", _fmt(summary["output_throughput"])),
        ("Total token throughput (tok/s)", _fmt(summary["total_token_throughput"])),
    ]
    if "goodput" in summary:
        slos = " ".join(f"{k}:{v:g}" for k, v in summary["slos_ms"].items())
        rows.append((f"Goodput (req/s) [{slos} ms]", _fmt(summary["goodput"])))
    lines = [f" {title} ".center(w, "=")]
    lines += [f"{k:<{w - 14}}{v:>14}" for k, v in rows]
    for key, label in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st)"),
                       ("itl_ms", "Inter-token Latency"), ("e2e_ms", "End-to-end Latency")):
        lines.append(f" {label} ".center(w, "-"))
        for stat, value in summary[key].items():
            name = "Median" if stat == "median" else stat.capitalize() if stat == "mean" else stat.upper()
            lines.append(f"{name + ' (ms)':<{w - 14}}{_fmt(value):>14}")
    for err, n in summary["errors"].items():
        lines.append(f"error x{n}: {err}")
    lines.append("=" * w)
    return "\n".join(lines)


def _json_safe(obj):
    """NaN/inf are not JSON; write them as null (inf rates are written as "inf")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj == math.inf else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def save_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(payload), indent=2) + "\n", encoding="utf-8")
    return path
