"""The `tokenmill` command: `tokenmill serve [MODEL]`, `tokenmill bench serve|throughput ...`."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

from tokenmill.engine.log_setup import LogSettings

from .access_log import AccessLog
from .args import build_parser, engine_config, http_limits, model_specs
from .model_spec import model_config

_NOT_ON_RAY = [("engine_in_process", "--engine-in-process"), ("admin_key", "--admin-key"),
               ("otlp_traces_endpoint", "--otlp-traces-endpoint"), ("log_prompts", "--log-prompts"),
               ("memory_budget", "--memory-budget"), ("model_dir", "--model-dir"), ("enable_lora", "--enable-lora"),
               ("lora_modules", "--lora-modules")]


def check_ray_args(args: argparse.Namespace) -> None:
    """ValueError for a replica setting without --ray, or a setting --ray does not support yet."""
    if not args.ray:
        given = [flag for flag, default in [("--num-replicas", 1), ("--max-replicas", None),
                                            ("--target-ongoing-requests", None), ("--cpus-per-replica", 1.0),
                                            ("--ray-address", None)]
                 if getattr(args, flag[2:].replace("-", "_")) != default]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --ray")
        return
    refused = [flag for field, flag in _NOT_ON_RAY if getattr(args, field)]
    if refused:
        raise ValueError(f"{', '.join(refused)}: not supported with --ray")
    try:
        from .ray_serve import ReplicaSettings
    except ImportError as e:
        raise ValueError(f"--ray needs Ray Serve: pip install 'tokenmill[ray]' ({e})") from None
    ReplicaSettings(args.num_replicas, args.max_replicas, args.target_ongoing_requests, args.cpus_per_replica)


_BENCHMARKS = {"serve": "serving.py", "throughput": "throughput.py"}


def run_benchmark(name: str, argv: list[str]) -> int:
    """Load benchmarks/<file> by path (benchmarks/ is not an installed package) and call its main(argv)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / _BENCHMARKS[name]
    if not path.is_file():
        print(f"tokenmill bench {name}: {path} not found; the benchmarks ship with a source checkout "
              "of tokenmill (run from the repository)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location(f"tokenmill_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return run_benchmark(args.benchmark, args.args)
    from .response_store import ResponseStore

    try:
        config = engine_config(args)
        specs = model_specs(args)
        for spec in specs:
            model_config(config, spec.path, spec.settings)
        loras = [tuple(m.split("=", 1)) for m in args.lora_modules]
        if any(len(m) != 2 or not all(m) for m in loras):
            raise ValueError("--lora-modules: give NAME=PATH")
        check_ray_args(args)
        limits = http_limits(args)
        store = ResponseStore(args.responses_store_max_entries, args.responses_store_max_bytes,
                              args.responses_store_ttl)
        tracer = None
        if args.otlp_traces_endpoint:
            from .tracing import RequestTracer

            tracer = RequestTracer(args.otlp_traces_endpoint, args.otlp_traces_sampling_ratio)
    except (TypeError, ValueError) as e:
        print(f"tokenmill serve: {e}", file=sys.stderr)
        return 2
    # Once the flags are good: this takes over the process's logging (its root handlers, warnings, excepthooks).
    LogSettings(logging.INFO, json=args.log_format == "json").configure()
    if args.ray:
        from .ray_serve import run_ray  # Ray loads only for --ray

        return run_ray(args)
    from tokenmill.engine.core.core_client import EngineStartupError

    from .server import run_server  # the web stack loads only for `serve`

    try:
        return run_server(config, args.host, args.port, specs, args.api_key, args.sse_ping_interval,
                          args.engine_in_process, args.tool_call_parser, args.admin_key, args.memory_budget,
                          args.model_dir, loras, args.reasoning_parser, store, limits, AccessLog(args.log_prompts),
                          tracer, args.webui)
    except EngineStartupError as e:
        print(f"tokenmill serve: the engine failed to start: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"tokenmill serve: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
