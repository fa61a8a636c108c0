"""The summary of one `bash benchmarks/gpu.sh` run: reads the records its parts left in DIR and writes
DIR/summary.md (Markdown tables) and DIR/summary.json (every record, the kernel tests' JUnit XML parsed).

    python benchmarks/gpu_report.py DIR

A part that did not run (or wrote nothing) shows as "not run".
"""
from __future__ import annotations

import json
import math
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path


def junit_record(path: Path) -> dict:
    """Counts and seconds of pytest's --junitxml file."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: (float if k == "time" else int)(suite.get(k, 0))
            for k in ("tests", "failures", "errors", "skipped", "time")}


def load_records(out: Path) -> dict:
    """The records gpu.sh's parts write in out; a missing part is None (throughput: no entry)."""
    def read(name: str) -> dict | None:
        return json.loads((out / name).read_text()) if (out / name).is_file() else None

    junit = out / "kernel-tests.xml"
    return {"kernel_tests": junit_record(junit) if junit.is_file() else None,
            "exactness": read("exactness.json"), "kernels": read("kernels.json"),
            "throughput": [json.loads(p.read_text()) for p in sorted(out.glob("throughput-*.json"))]}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _model_name(record: dict) -> str:
    return Path(record["config"]["model"] or "default").name.removesuffix(".json")


def _summary_rows(records: dict) -> list[list[str]]:
    """[part, verdict, result]: PASS/FAIL for the checks, "report" for measurements, "not run"."""
    rows = []
    t = records["kernel_tests"]
    if t is None:
        rows.append(["kernel tests, compiled", "not run", ""])
    else:
        bad = t["failures"] + t["errors"]
        passed = t["tests"] - bad - t["skipped"]
        rows.append(["kernel tests, compiled", "PASS" if passed and not bad else "FAIL",
                     f"{passed} passed, {t['failures']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped in {t['time']:.0f} s"])
    e = records["exactness"]
    if e is None:
        rows.append(["greedy vs transformers", "not run", ""])
    for dtype, r in (e or {}).get("dtypes", {}).items():
        exact = r["identical_sequences"] == r["sequences"]
        rows.append([f"greedy vs transformers, {dtype}",
                     ("PASS" if exact else "FAIL") if dtype == "float32" else "report",
                     f"{r['identical_sequences']}/{r['sequences']} sequences identical, "
                     f"{r['matching_prefix_tokens']}/{r['total_tokens']} tokens before the first divergence"])
    k = records["kernels"]
    if k is None:
        rows.append(["kernels vs torch", "not run", ""])
    else:
        speedups = [r["sdpa_ms"] / r["ms"] for r in k["rows"] if "sdpa_ms" in r]
        geo = math.exp(sum(map(math.log, speedups)) / len(speedups)) if speedups else float("nan")
        rows.append(["kernels vs torch", "report", f"paged_attention at {geo:.2f}x SDPA's speed "
                     f"(geometric mean of {len(speedups)} cases) on {k['device']}"])
    if not records["throughput"]:
        rows.append(["throughput", "not run", ""])
    for r in records["throughput"]:
        tm = r["tokenmill"]
        rows.append([f"throughput, {_model_name(r)}", "report",
                     f"{tm['output_tokens_per_s']:.0f} output tok/s, {tm['total_tokens_per_s']:.0f} total tok/s"])
    return rows


def markdown(records: dict) -> str:
    """The summary table, then one table per benchmark that ran."""
    lines = ["# GPU check", ""] + _table(["part", "verdict", "result"], _summary_rows(records))
    if records["kernels"]:
        lines += ["", "## Kernels vs torch (bf16)", ""]
        lines += _table(["kernel", "case", "ms", "torch ms", "speedup"], [
            [r["kernel"], r["case"], f"{r['ms']:.4f}", f"{r.get('sdpa_ms', r.get('reference_ms')):.4f}",
             f"{r.get('sdpa_ms', r.get('reference_ms')) / r['ms']:.2f}x"] for r in records["kernels"]["rows"]])
    if records["throughput"]:
        lines += ["", "## Throughput, dummy weights", ""]
        lines += _table(["model", "dtype", "requests", "prompt tokens", "output tokens", "seconds",
                         "output tok/s", "total tok/s"], [
            [_model_name(r), r["environment"]["dtype"], str(r["config"]["num_requests"]),
             str(r["tokenmill"]["prompt_tokens"]), str(r["tokenmill"]["output_tokens"]),
             f"{r['tokenmill']['elapsed_s']:.1f}", f"{r['tokenmill']['output_tokens_per_s']:.0f}",
             f"{r['tokenmill']['total_tokens_per_s']:.0f}"] for r in records["throughput"]])
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python benchmarks/gpu_report.py DIR (the folder gpu.sh wrote)", file=sys.stderr)
        return 2
    out = Path(args[0])
    records = load_records(out)
    (out / "summary.json").write_text(json.dumps(records, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(records))
    print(markdown(records), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
