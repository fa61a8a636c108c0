"""Online serving benchmark for any OpenAI-compatible server.

    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --num-prompts 100 \
        --request-rate 4 --goodput ttft:500 tpot:50
    python benchmarks/serving.py --sweep 0.5,1,2,4,inf            # rates, with plots
    python benchmarks/serving.py --sweep-concurrency 1,8,32       # concurrency, with plots

Streams every request, records time to first token, inter-token gaps, time per
output token and end-to-end latency, prints a report and saves it as JSON (with the
configuration and environment) under --out. Every sweep point (and the warm-up) gets
its own prompts from one seeded stream, so no run hits a prefix cache warmed by another.
`main(argv)` is the CLI entry point.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx

if __package__ in (None, ""):
    # Run as a script: make `benchmarks.*` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import datasets
from benchmarks.client import ENDPOINTS, Target, TokenCounter, list_models, make_client, run_requests, send_request
from benchmarks.datasets import BenchRequest
from benchmarks.metrics import RequestResult, parse_slos, summarize
from benchmarks.report import REPO_ROOT, environment, format_table, save_json

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"


def _rate(s: str) -> float:
    value = float(s)  # accepts "inf"
    if not value > 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0, got {s}")
    return value


def _rates(s: str) -> list[float]:
    return [_rate(x) for x in s.split(",") if x.strip()]


def _concurrencies(s: str) -> list[int]:
    values = [int(x) for x in s.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrencies must be integers >= 1, got {s}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenmill bench serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    p.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS)
    p.add_argument("--model", help="model name to request (default: the first one /v1/models lists)")
    p.add_argument("--api-key", help="sent as a Bearer token")
    p.add_argument("--dataset", default="synthetic", choices=("synthetic", "random", "sharegpt"))
    p.add_argument("--dataset-path", help="ShareGPT JSON file (for --dataset sharegpt)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="seeds the dataset and the arrival times")
    p.add_argument("--request-rate", type=_rate, default=math.inf,
                   help="mean requests per second, Poisson arrivals; inf sends all at once")
    p.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    p.add_argument("--goodput", nargs="+", metavar="NAME:MS", default=[],
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 (names: ttft, tpot, e2e)")
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--sweep", type=_rates, metavar="R1,R2,...",
                       help="run each request rate in turn and plot the results")
    sweep.add_argument("--sweep-concurrency", type=_concurrencies, metavar="C1,C2,...",
                       help="run each max concurrency in turn (at --request-rate) and plot")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for JSON and PNG results")
    p.add_argument("--tokenizer", help="HF tokenizer folder or GGUF file, to count tokens when the "
                                       "server reports no usage (and ShareGPT output lengths)")
    p.add_argument("--backend", default="openai",
                   help="label for file names and the report (e.g. tokenmill, vllm, llama.cpp)")
    p.add_argument("--metadata", nargs="*", metavar="KEY=VALUE", default=[],
                   help="extra facts to record, e.g. dtype=bf16 device=cuda")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests sent first (they also check the setup)")
    p.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request")
    p.add_argument("--save-requests", action="store_true", help="also store per-request timings in the JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("random dataset")
    g.add_argument("--random-input-len", type=int, default=256, help="prompt length in words")
    g.add_argument("--random-output-len", type=int, default=128, help="max_tokens")
    g.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths vary by +-this fraction")
    g.add_argument("--random-prefix-len", type=int, default=0, help="words shared by every prompt")
    g = p.add_argument_group("sharegpt dataset")
    g.add_argument("--sharegpt-output-len", type=int, help="fixed max_tokens instead of the reply's length")
    return p


def load_dataset(args: argparse.Namespace, num: int, count_tokens: TokenCounter | None) -> list[BenchRequest]:
    if args.dataset == "random":
        return datasets.random_requests(num, args.seed, args.random_input_len,
                                        args.random_output_len, args.random_range_ratio,
                                        args.random_prefix_len)
    if args.dataset == "sharegpt":
        if not args.dataset_path:
            raise SystemExit("--dataset sharegpt needs --dataset-path FILE.json")
        return datasets.sharegpt_requests(args.dataset_path, num, args.seed, count_tokens,
                                          args.sharegpt_output_len)
    return datasets.synthetic_requests(num, args.seed)


async def _resolve_model(args: argparse.Namespace) -> dict:
    """The /v1/models entry for --model (or the first one listed), {} if unlisted."""
    try:
        models = await list_models(args.base_url, args.api_key)
    except (httpx.HTTPError, ValueError) as e:
        if args.model:
            return {"id": args.model}  # some servers have no /v1/models; --model suffices
        raise SystemExit(f"cannot list models at {args.base_url}/v1/models ({e}); pass --model") from e
    if args.model:
        return next((m for m in models if m.get("id") == args.model), {"id": args.model})
    if not models:
        raise SystemExit(f"{args.base_url}/v1/models lists no model; pass --model")
    return models[0]


def _request_record(r: RequestResult) -> dict:
    return {"success": r.success, "error": r.error, "start_s": r.start, "ttft_s": r.ttft, "e2e_s": r.e2e,
            "itl_s": r.itl, "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
            "token_source": r.token_source}


async def _run(args: argparse.Namespace) -> int:
    slos = parse_slos(args.goodput)
    metadata = dict(kv.split("=", 1) for kv in args.metadata if "=" in kv)
    count_tokens = None
    if args.tokenizer:
        from benchmarks.tokens import load_token_counter
        count_tokens = load_token_counter(args.tokenizer)
    # (rate, concurrency) per run; a sweep varies one of them.
    if args.sweep:
        runs, x_name = [(r, args.max_concurrency) for r in args.sweep], "request rate (req/s)"
    elif args.sweep_concurrency:
        runs, x_name = [(args.request_rate, c) for c in args.sweep_concurrency], "max concurrency"
    else:
        runs, x_name = [(args.request_rate, args.max_concurrency)], ""

    # Each run, and the warm-up, gets its own prompts from one seeded stream: resending
    # a prompt would hit the server's prefix cache and flatter its TTFT.
    n = args.num_prompts
    pool = load_dataset(args, n * len(runs) + args.warmup, count_tokens)
    model_info = await _resolve_model(args)
    target = Target(args.base_url, args.endpoint, model_info["id"], args.api_key, args.request_timeout)
    env = environment(model_info, metadata)

    if args.warmup > 0:
        async with make_client(None, target.timeout_s) as client:
            warm = [await send_request(client, target, req, count_tokens) for req in pool[n * len(runs):]]
        if not any(r.success for r in warm):
            print(f"warm-up failed: {warm[0].error}", file=sys.stderr)
            return 1

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    model_slug = re.sub(r"[^\w.-]+", "_", Path(target.model).name)[:60]
    stem = f"{args.backend}-{model_slug}-{stamp}"
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["model"] = target.model

    labels, summaries = [], []
    for i, (rate, conc) in enumerate(runs):
        label = f"rate {rate:g}" + (f", concurrency {conc}" if conc else "")
        requests = pool[i * n:(i + 1) * n]
        results, duration = await run_requests(target, requests, rate, conc, args.seed, count_tokens,
                                               progress=not args.no_progress, desc=label)
        summary = summarize(results, duration, slos)
        print(format_table(summary, f"{args.backend} | {label}"))
        payload = {"config": {**config, "request_rate": rate, "max_concurrency": conc},
                   "environment": env, "summary": summary}
        if args.save_requests:
            payload["requests"] = [_request_record(r) for r in results]
        path = save_json(args.out / f"{stem}-rate{rate:g}-conc{conc or 'none'}.json", payload)
        print(f"saved {path}")
        labels.append(f"{rate:g}" if args.sweep else str(conc))
        summaries.append(summary)

    if args.sweep or args.sweep_concurrency:
        from benchmarks.plots import plot_sweep
        save_json(args.out / f"{stem}-sweep.json", {
            "config": config, "environment": env, "x": x_name,
            "points": [{"value": lab, "summary": s} for lab, s in zip(labels, summaries, strict=False)]})
        for path in plot_sweep(labels, summaries, x_name, args.out, stem):
            print(f"saved {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_prompts < 1 or args.warmup < 0:
        raise SystemExit("--num-prompts must be >= 1 and --warmup >= 0")
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
