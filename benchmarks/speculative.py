"""Speculative decoding, side by side in one sitting: tokenmill with each proposer and k, tokenmill without
speculation, and llama-server with and without its own speculation, on input-grounded, open-ended chat
and greedy-to-the-cap workloads (benchmarks/spec_workloads.py), each point on a fresh server.

    python benchmarks/speculative.py                          # the default sweep (configs x points)
    python benchmarks/speculative.py --configs tm-gguf,llama --workloads chat --concurrency 1
    python benchmarks/speculative.py --list                   # the configs and their flags
    python benchmarks/speculative.py --render results.json    # the table again from a saved sweep

A point is (workload, requests in flight). Points run one after the other, and within a point every
config in turn, so the configs compared in one row group ran minutes apart. Per point: output tok/s,
TPOT p50/p99 and the acceptance rate (tokenmill: /metrics counter deltas; llama-server: the
`timings` draft_n / draft_n_accepted of its responses). Writes one JSON for the sweep and a markdown
table under --out. The default sweep (8 configs x 6 points, 48 servers) is sized for about 20 minutes
on the project's 2-core VM when nothing else runs; a busy machine stretches it many times over.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.client import _sse_events, chunk_text
from benchmarks.metrics import RequestResult, inter_token_latencies, summarize
from benchmarks.report import REPO_ROOT, environment, save_json
from benchmarks.spec_configs import CONFIGS, DEFAULT_CONFIGS, ServerConfig, pick, server_command
from benchmarks.spec_report import (
    GENERATION_COUNTER,
    counter_deltas,
    llama_deltas,
    markdown_table,
    parse_prometheus,
    point_row,
    targets,
)
from benchmarks.spec_workloads import GREEDY_MAX_TOKENS, WORKLOADS, SpecRequest, make_requests

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
LLAMA_CACHE = Path(os.environ.get("TOKENMILL_LLAMA_CACHE", Path.home() / ".cache" / "tokenmill" / "llama.cpp"))
DRAFT_CACHE = Path.home() / ".cache" / "tokenmill" / "self-draft"
# Where each workload is measured by default (chat: at the extremes; greedy: one long stream).
DEFAULT_POINTS = {"grounded": (1, 4, 32), "chat": (1, 32), "greedy": (1,)}
# Requests per point by requests in flight: enough for a few per slot at 1, one full wave at 32.
DEFAULT_REQUESTS = {1: 4, 4: 8, 32: 32}
# A greedy request runs 4x longer than a grounded one: fewer of them keep the sweep near 20 minutes.
GREEDY_REQUESTS = 2


@dataclass(frozen=True)
class Point:
    workload: str
    concurrency: int
    num_requests: int


# ---- one request ------------------------------------------------------------------------------

def chat_payload(req: SpecRequest, model: str) -> dict:
    """Greedy, streamed, EOS honoured: a speculative server must produce the same reply, and a request
    ends where the model ends it (or at its cap; no max_tokens: the server's default)."""
    body: dict = {"model": model, "messages": [{"role": "user", "content": req.prompt}], "temperature": 0.0,
                  "stream": True, "stream_options": {"include_usage": True}}
    if req.max_tokens is not None:
        body["max_tokens"] = req.max_tokens
    return body


async def send_chat(client: httpx.AsyncClient, base_url: str, model: str,
                    req: SpecRequest) -> tuple[RequestResult, dict | None]:
    """One streamed chat request, timed; also the last `timings` object llama-server sent. Never raises."""
    chunk_times: list[float] = []
    usage = timings = None
    st = time.perf_counter()
    try:
        async with client.stream("POST", base_url + "/v1/chat/completions", json=chat_payload(req, model)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                return RequestResult(False, f"HTTP {resp.status_code}: {body[:300]}"), None
            async for chunk in _sse_events(resp):
                if "error" in chunk:
                    return RequestResult(False, f"stream error: {json.dumps(chunk['error'])[:300]}"), None
                if chunk_text(chunk):
                    chunk_times.append(time.perf_counter())
                usage = chunk.get("usage") or usage
                timings = chunk.get("timings") or timings
        end = time.perf_counter()
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        return RequestResult(False, f"{type(e).__name__}: {e}"[:300]), None
    if not chunk_times:
        return RequestResult(False, "no content received"), timings
    out_tokens = (usage or {}).get("completion_tokens") or (timings or {}).get("predicted_n")
    if not out_tokens:
        return RequestResult(False, "the server reported no token count (usage or timings)"), timings
    return RequestResult(True, ttft=chunk_times[0] - st, itl=inter_token_latencies(chunk_times), e2e=end - st,
                         prompt_tokens=(usage or {}).get("prompt_tokens", 0), output_tokens=out_tokens,
                         token_source="usage" if usage else "timings"), timings


async def run_point(base_url: str, model: str, requests: Sequence[SpecRequest],
                    concurrency: int) -> tuple[list[RequestResult], list[dict | None], float]:
    """All requests sent at once, at most `concurrency` in flight; results in request order."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(3600.0, pool=None)) as client:
        async def one(req: SpecRequest) -> tuple[RequestResult, dict | None]:
            async with sem:
                return await send_chat(client, base_url, model, req)

        t0 = time.perf_counter()
        pairs = await asyncio.gather(*(one(r) for r in requests))
        duration = time.perf_counter() - t0
    return [p[0] for p in pairs], [p[1] for p in pairs], duration


# ---- servers ----------------------------------------------------------------------------------

class Server:
    """A server process for one point; its output goes to `log`."""

    def __init__(self, argv: list[str], port: int, log: Path):
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = log
        self._file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._file, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                     env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})

    def wait_ready(self, timeout_s: float = 600.0) -> str | None:
        """None once /health answers 200, else why not (the process died, or the timeout passed)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
                return f"server exited ({self.proc.returncode}): " + " | ".join(tail)[-400:]
            try:
                if httpx.get(self.base_url + "/health", timeout=5.0).status_code == 200:
                    return None
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        return f"server not ready after {timeout_s:.0f} s"

    def model_id(self) -> str:
        resp = httpx.get(self.base_url + "/v1/models", timeout=30.0)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]

    def metrics(self) -> dict[str, float]:
        try:
            resp = httpx.get(self.base_url + "/metrics", timeout=30.0)
        except httpx.HTTPError:
            return {}
        return parse_prometheus(resp.text) if resp.status_code == 200 else {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._file.close()


def settled_metrics(server: Server, before: dict[str, float], output_tokens: int) -> dict[str, float]:
    """/metrics once its counters include the run: tokenmill's are a snapshot the engine refreshes as it
    steps, so a scrape right after the last response may miss the last step."""
    after = server.metrics()
    deadline = time.monotonic() + 5.0
    while (GENERATION_COUNTER in after and time.monotonic() < deadline
           and after[GENERATION_COUNTER] - before.get(GENERATION_COUNTER, 0.0) < output_tokens):
        time.sleep(0.2)
        after = server.metrics()
    return after


# ---- the sweep --------------------------------------------------------------------------------

def plan(workloads: Sequence[str], concurrencies: Sequence[int] | None, requests: dict[int, int],
         points: dict[str, tuple[int, ...]] = DEFAULT_POINTS, greedy_requests: int = GREEDY_REQUESTS) -> list[Point]:
    """The points to run: each workload at its concurrencies in `points`, kept if in `concurrencies`."""
    out = []
    for w in workloads:
        for c in points.get(w, ()):
            if concurrencies is None or c in concurrencies:
                n = requests.get(c, c if c >= 32 else max(4, 2 * c))
                out.append(Point(w, c, max(c, greedy_requests) if w == "greedy" else n))
    return out


def ensure_drafts(configs: Sequence[ServerConfig], model: str, layers: int, folder: Path) -> dict[str, str]:
    """Write the self-drafts the configs need (once; kept in `folder` between sittings)."""
    from benchmarks.self_draft import write_gguf, write_hf

    paths = {"draft_hf": str(folder / f"L{layers}"), "draft_gguf": str(folder / f"L{layers}.gguf")}
    if any(c.needs_hf_draft for c in configs) and not (folder / f"L{layers}" / "config.json").exists():
        print(f"writing the {layers}-layer self-draft to {paths['draft_hf']}", flush=True)
        write_hf(model, Path(paths["draft_hf"]), layers)
    if any(c.needs_gguf_draft for c in configs) and not Path(paths["draft_gguf"]).exists():
        print(f"writing the {layers}-layer self-draft to {paths['draft_gguf']}", flush=True)
        write_gguf(model, Path(paths["draft_gguf"]), layers)
    return paths


def run_one(cfg: ServerConfig, point: Point, argv: list[str], port: int, out: Path, seed: int,
            greedy_max_tokens: int | None) -> dict:
    """Start cfg's server, warm it up, run the point, stop it. Returns the point's record."""
    requests = make_requests(point.workload, point.num_requests, seed, greedy_max_tokens)
    # The warm-up request comes from another seed: same kind of work, but no prompt of the run.
    warmup = make_requests(point.workload, 1, seed + 1000, greedy_max_tokens)[0]
    warmup = SpecRequest(warmup.prompt, 16, warmup.task)
    log = out / f"{cfg.name}-{point.workload}-c{point.concurrency}.log"
    server = Server(argv, port, log)
    record: dict = {"config": cfg.name, "backend": cfg.backend, "workload": point.workload,
                    "concurrency": point.concurrency, "num_requests": point.num_requests, "argv": argv}
    try:
        error = server.wait_ready()
        if error is None:
            model = server.model_id()
            warm = asyncio.run(run_point(server.base_url, model, [warmup], 1))[0][0]
            error = None if warm.success else f"warm-up failed: {warm.error}"
        if error is not None:
            print(f"  {cfg.name}: {error}", flush=True)
            record.update(error=error, summary=summarize([RequestResult(False, error)] * point.num_requests, 0.0))
            return record
        before = server.metrics()
        results, timings, duration = asyncio.run(run_point(server.base_url, model, requests, point.concurrency))
        summary = summarize(results, duration)
        after = settled_metrics(server, before, summary["total_output_tokens"])
        deltas = counter_deltas(before, after) if cfg.backend == "tokenmill" else llama_deltas(timings)
        record.update(summary=summary, spec=deltas, model=model,
                      tasks=[r.task for r in requests], output_tokens=[r.output_tokens for r in results])
        return record
    finally:
        server.stop()


def rows_of(records: Sequence[dict]) -> list[dict]:
    return [point_row(r["config"], r["workload"], r["concurrency"], r["summary"], r.get("spec")) for r in records]


def report(records: Sequence[dict]) -> str:
    """The markdown table and the target lines of a sweep's records."""
    rows = rows_of(records)
    known = {c.name: c for c in CONFIGS}
    baselines = {r["config"]: known[r["config"]].baseline if r["config"] in known else None for r in records}
    backends = {r["config"]: r.get("backend") or known[r["config"]].backend for r in records}
    lines = [markdown_table(rows, baselines)]
    goal = targets(rows, backends, baselines)
    if goal:
        lines += ["", *[f"- {g}" for g in goal]]
    return "\n".join(lines)


def _ints(s: str) -> list[int]:
    values = [int(x) for x in s.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {s!r}")
    return values


def _requests(s: str) -> dict[int, int]:
    """"1:4,4:8,32:32" -> {1: 4, 4: 8, 32: 32}."""
    try:
        return {int(c): int(n) for c, n in (item.split(":") for item in s.split(",") if item.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C:N pairs like 1:4,32:32, got {s!r}") from None


def _points(s: str) -> dict[str, tuple[int, ...]]:
    """"grounded:1,4,32/chat:1" -> {"grounded": (1, 4, 32), "chat": (1,)}."""
    out = {}
    for item in s.split("/"):
        workload, _, cs = item.partition(":")
        if workload.strip() not in WORKLOADS or not cs:
            raise argparse.ArgumentTypeError(f"expected WORKLOAD:C1,C2/... with workloads {WORKLOADS}, got {s!r}")
        out[workload.strip()] = tuple(_ints(cs))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="default",
                   help=f"comma list of config names, 'default' ({','.join(DEFAULT_CONFIGS)}) or 'all'")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of " + ", ".join(WORKLOADS))
    p.add_argument("--concurrency", type=_ints, default=None,
                   help="keep only the points at these requests in flight (comma list)")
    p.add_argument("--points", type=_points, default=DEFAULT_POINTS,
                   help="where each workload runs, e.g. grounded:1,4,32/chat:1,32/greedy:1 (the default)")
    p.add_argument("--requests", type=_requests, default=DEFAULT_REQUESTS,
                   help="requests per point by requests in flight, e.g. 1:4,4:8,32:32")
    p.add_argument("--greedy-requests", type=int, default=GREEDY_REQUESTS,
                   help="requests per greedy point (at least its requests in flight)")
    p.add_argument("--greedy-max-tokens", type=int, default=GREEDY_MAX_TOKENS,
                   help="the greedy workload's cap; 0 sends no max_tokens (the server's default)")
    p.add_argument("--model", help="target GGUF (default: tokenmill's default model)")
    p.add_argument("--draft-layers", type=int, default=6, help="decoder layers of the self-draft")
    p.add_argument("--draft-dir", type=Path, default=DRAFT_CACHE, help="where self-drafts are written and kept")
    p.add_argument("--llama-server", type=Path, default=LLAMA_CACHE / "build" / "bin" / "llama-server",
                   help="llama-server binary (benchmarks/build_llama_server.sh builds it)")
    p.add_argument("--port", type=int, default=8111)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--list", action="store_true", help="print the configs and exit")
    p.add_argument("--dry-run", action="store_true", help="print the points and server commands, run nothing")
    p.add_argument("--render", type=Path, metavar="SWEEP.json", help="print a saved sweep's table and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        print(report(json.loads(args.render.read_text())["points"]))
        return 0
    if args.list:
        for c in CONFIGS:
            print(f"{c.name:18} {c.backend:10} {' '.join(c.args)}")
        return 0
    configs = pick(args.configs)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if unknown := set(workloads) - set(WORKLOADS):
        raise SystemExit(f"unknown workloads {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
    points = plan(workloads, args.concurrency, args.requests, args.points, args.greedy_requests)
    if not points:
        raise SystemExit("no point to run: --concurrency leaves none of the chosen workloads")
    from tokenmill.engine.config import default_model_path

    model = args.model or default_model_path()
    if any(c.backend == "llama.cpp" for c in configs) and not args.llama_server.exists() and not args.dry_run:
        raise SystemExit(f"no llama-server at {args.llama_server}: run benchmarks/build_llama_server.sh, "
                         "pass --llama-server, or leave the llama configs out")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out / f"speculative-{stamp}"
    drafts = ({"draft_hf": str(args.draft_dir / f"L{args.draft_layers}"),
               "draft_gguf": str(args.draft_dir / f"L{args.draft_layers}.gguf")} if args.dry_run
              else ensure_drafts(configs, model, args.draft_layers, args.draft_dir))
    greedy_cap = args.greedy_max_tokens or None

    def argv_of(cfg: ServerConfig, point: Point) -> list[str]:
        return server_command(cfg, model=model, port=args.port, concurrency=point.concurrency,
                              llama_server=str(args.llama_server), **drafts)

    if args.dry_run:
        for point in points:
            for cfg in configs:
                print(f"{point.workload} c={point.concurrency} n={point.num_requests} {cfg.name}: "
                      + shlex.join(argv_of(cfg, point)))
        return 0

    out.mkdir(parents=True, exist_ok=True)
    env = environment(metadata={"model": model, "draft_layers": str(args.draft_layers), "device": "cpu"})
    records: list[dict] = []
    sweep = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
             "environment": env, "points": records}
    t0 = time.perf_counter()
    for point in points:
        print(f"[{time.perf_counter() - t0:6.0f} s] {point.workload}, {point.concurrency} in flight, "
              f"{point.num_requests} requests", flush=True)
        for cfg in configs:
            record = run_one(cfg, point, argv_of(cfg, point), args.port, out, args.seed, greedy_cap)
            records.append(record)
            s = record["summary"]
            print(f"  {cfg.name:18} {s['output_throughput']:7.1f} tok/s  {s['completed']} ok {s['failed']} failed",
                  flush=True)
            save_json(out / "sweep.json", sweep)  # after every point: an interrupted sweep keeps what it ran
    table = report(records)
    (out / "table.md").write_text(table + "\n")
    print(f"\n{table}\n\nsaved {out / 'sweep.json'} and table.md ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
