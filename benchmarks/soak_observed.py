"""The soak (benchmarks/soak.py) against a `tokenmill serve` that logs JSON and exports a span per request to
an OTLP/HTTP receiver started here: the soak's own checks (no stray 5xx, right lengths, idle afterwards, flat
memory), and that observability keeps up: every log line of every process is JSON, every request has its
access line, every traced request its span, and the server stops cleanly on SIGTERM.

    python benchmarks/soak_observed.py --duration 600 --concurrency 8 --seed 2 --out DIR -- [serve flags]

DIR receives server.log (the server's JSON lines), soak.json (the soak's report) and observed.json/.txt
(this summary). Exit status 0 when every check holds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import httpx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.otlp_sink import OTLPSink
from benchmarks.report import save_json
from benchmarks.soak import SoakConfig, format_report, run_soak
from tokenmill.api.observe import UNTRACED_PATHS

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(serve_args: list[str], port: int, endpoint: str, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "tokenmill.api.cli", "serve", "--host", "127.0.0.1", "--port",
                             str(port), "--log-format", "json", "--otlp-traces-endpoint", endpoint, *serve_args],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not start; see {log_path}")


def check_log(log_path: Path, spans: list) -> dict:
    """What the server's log and exported spans say, and the problems found in them."""
    problems: list[str] = []
    access: list[dict] = []
    processes: Counter = Counter()
    for n, raw in enumerate(log_path.read_text(errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            problems.append(f"line {n} is not JSON: {raw[:200]!r}")
            continue
        processes[line.get("process", "api")] += 1
        if line.get("logger") == "tokenmill.access":
            access.append(line)
        elif line.get("level") in ("ERROR", "CRITICAL"):
            problems.append(f"line {n}: {line['level']} {line['message'][:200]}")
    statuses = Counter(line["status"] for line in access)
    stray_5xx = sum(n for status, n in statuses.items() if status >= 500 and status != 503)
    if stray_5xx:
        problems.append(f"{stray_5xx} access lines with a 5xx other than 503")
    traced_ids = {line["request_id"] for line in access if line["path"] not in UNTRACED_PATHS}
    span_ids = Counter(s.attributes.get("tokenmill.request_id") for s in spans)
    missing = traced_ids - span_ids.keys()
    if missing:
        problems.append(f"{len(missing)} requests without a span, e.g. {sorted(missing)[:3]}")
    doubled = [rid for rid, n in span_ids.items() if n > 1]
    if doubled:
        problems.append(f"{len(doubled)} requests with more than one span, e.g. {doubled[:3]}")
    with_usage = sum("gen_ai.usage.output_tokens" in s.attributes for s in spans)
    return {"log_lines_by_process": dict(processes), "access_lines": len(access),
            "access_by_status": {str(k): v for k, v in sorted(statuses.items())}, "spans": len(spans),
            "spans_with_usage": with_usage, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="folder for the log and the reports")
    p.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then flags for tokenmill serve")
    args = p.parse_args(argv)
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    args.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    with OTLPSink() as sink:
        proc = _start_server(serve_args, port, sink.endpoint, args.out / "server.log")
        try:
            report = asyncio.run(run_soak(SoakConfig(url=f"http://127.0.0.1:{port}", duration_s=args.duration,
                                                     concurrency=args.concurrency, seed=args.seed, pid=proc.pid)))
        finally:
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(120)
        spans = sink.spans()
    save_json(args.out / "soak.json", {**asdict(report), "ok": report.ok})
    observed = check_log(args.out / "server.log", spans)
    observed.update(exit_status=status, soak_ok=report.ok, serve_args=serve_args)
    if status != 0:
        observed["problems"].append(f"the server exited with status {status} after SIGTERM")
    ok = report.ok and not observed["problems"]
    text = format_report(report) + "\n\n" + json.dumps(observed, indent=1) + f"\n\n{'ok' if ok else 'FAILED'}\n"
    (args.out / "observed.txt").write_text(text)
    save_json(args.out / "observed.json", observed)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
