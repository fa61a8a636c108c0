"""The `tokenmill serve` command line: its arguments, and the models and engine settings they give.

Shared by the CLI and the Ray Serve entry point (`serve run tokenmill.api.ray_serve:app_builder`), which
parses the same arguments.
"""
from __future__ import annotations

import argparse
import os
import re

from tokenmill.engine.config import EngineConfig, default_model_path
from tokenmill.engine.limits import RequestLimits

from .http_limits import HTTPLimits, default_max_request_bytes
from .model_spec import ModelSpec, default_name, model_id
from .reasoning_parsers import REASONING_PARSERS
from .tool_parsers import TOOL_FORMATS

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """'256MiB', '1G', '268435456' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 268435456, 256MiB, 1GiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="A small LLM serving engine.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                                description="Serve a model over an OpenAI-compatible HTTP API.")
    serve.add_argument("model", nargs="*", default=[],
                       help="models to serve, each PATH, NAME=PATH or NAME:VERSION=PATH (PATH: an HF model "
                            "directory or a .gguf file; a bare PATH is named after its file or folder; the first "
                            "version of a name is its default). Default: the packaged SmolLM2-135M-Instruct")
    serve.add_argument("--config", default=None, metavar="FILE",
                       help="a YAML or JSON file: {models: [{model: NAME[:VERSION], path: PATH, <engine settings: "
                            "dtype, quantization, max_num_seqs, kv_cache_memory, ...>}]}, served after the MODELs")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="activations and KV-cache dtype; auto: bfloat16 on GPU, and with --quantization on a "
                            "CPU with native bfloat16 (AVX-512); float32 otherwise")
    serve.add_argument("--quantization", default=None, choices=["gguf", "int8", "int4"],
                       help="keep weights quantized at run time: gguf keeps a GGUF's own Q4_0/Q4_1/Q8_0 blocks, "
                            "int8/int4 quantize any checkpoint at load (default: full precision)")
    serve.add_argument("--load-format", default="auto", choices=["auto", "gguf", "safetensors", "dummy"],
                       help="how to read MODEL; dummy: random weights for the architecture in MODEL's config.json "
                            "(for testing and profiling) (default: %(default)s)")
    serve.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="context length in tokens (default: the model's, capped by the KV cache)")
    serve.add_argument("--max-num-seqs", type=int, default=64,
                       help="most sequences in one batch (default: %(default)s)")
    serve.add_argument("--max-num-batched-tokens", type=int, default=1024,
                       help="most tokens in one forward pass; longer prompts are prefilled in chunks "
                            "(default: %(default)s)")
    serve.add_argument("--kv-cache-memory", type=parse_size, default=None,
                       help="KV-cache size, e.g. 512MiB or 2GiB (default: a share of free memory)")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="share of GPU memory for weights, activations and KV cache (default: %(default)s)")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)")
    serve.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                       help="turn off automatic prefix caching")
    serve.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    serve.add_argument("--num-threads", type=int, default=None,
                       help="torch CPU threads of the engine, of each rank with --tensor-parallel-size "
                            "(default: torch's, one per core; with N ranks, the cores / N each)")
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                       help="split the model over N ranks, one process each (Megatron style): N GPUs on CUDA, "
                            "or the cores on CPU (default: %(default)s)")
    serve.add_argument("--seed", type=int, default=0, help="seed of unseeded sampling (default: %(default)s)")
    serve.add_argument("--served-model-name", default=None,
                       help="with one model: the name clients use and /v1/models lists (default: its file's)")
    serve.add_argument("--admin-key", default=None,
                       help="enable the management API under /admin/ (load, unload, set-default), with "
                            "`Authorization: Bearer KEY`; without it there is no /admin/")
    serve.add_argument("--memory-budget", type=parse_size, default=None,
                       help="most memory all models may hold (weights and KV cache), e.g. 8GiB; a load past it "
                            "is a 507, or with --model-dir unloads the least recently used idle model")
    serve.add_argument("--enable-lora", action="store_true", help="let the engines run LoRA adapters")
    serve.add_argument("--max-loras", type=int, default=4,
                       help="LoRA adapters resident per engine (default: %(default)s)")
    serve.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank (default: %(default)s)")
    serve.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                       help="PEFT LoRA adapters served as models of their own on the first model (implies "
                            "--enable-lora); more load through POST /v1/load_lora_adapter with --admin-key")
    serve.add_argument("--speculative-config", default=None, metavar="JSON",
                       help='speculative decoding, as vLLM takes it: {"method": "ngram", "num_speculative_tokens": 4, '
                            '"prompt_lookup_min": 2, "prompt_lookup_max": 5} or {"model": DRAFT_PATH, '
                            '"num_speculative_tokens": 3}; see the README for when it pays (default: off)')
    serve.add_argument("--model-dir", default=None,
                       help="a folder of models (.gguf files, HF folders) loaded when first requested by name")
    limits = RequestLimits()
    serve.add_argument("--max-queue-len", type=int, default=limits.max_waiting_seqs,
                       help="most sequences (a request with n samples counts n) that may wait for a batch "
                            "slot beyond --max-num-seqs; more get 503 with Retry-After (default: %(default)s)")
    for flag, field, what in [("--max-n", "max_n", "samples (n) in one request"),
                              ("--max-prompts", "max_prompts", "prompts in one /v1/completions request"),
                              ("--max-stop", "max_stop", "stop strings in one request"),
                              ("--max-stop-len", "max_stop_len", "characters in one stop string"),
                              ("--max-stop-token-ids", "max_stop_token_ids", "stop_token_ids in one request"),
                              ("--max-logit-bias", "max_logit_bias", "logit_bias entries in one request"),
                              ("--max-prompt-chars", "max_prompt_chars", "characters of prompt text in one request"),
                              ("--max-constraint-chars", "max_constraint_chars",
                               "characters of a structured-output constraint (schema, regex, choices, grammar)")]:
        serve.add_argument(flag, dest=field, type=int, default=getattr(limits, field),
                           help=f"most {what}; more is a 400 (default: %(default)s)")
    serve.add_argument("--max-constraint-compile-s", dest="max_constraint_compile_s", type=float,
                       default=limits.max_constraint_compile_s,
                       help="seconds a structured-output constraint may take to compile; a request whose constraint "
                            "takes longer is a 400 (default: %(default)s)")
    http = HTTPLimits()
    serve.add_argument("--max-request-bytes", type=parse_size, default=None,
                       help="most bytes in a request's body, e.g. 16MiB: a Content-Length over it is refused before "
                            "the body is read, a chunked body once it passes it; a 413, and the connection is "
                            "closed (default: 12 bytes, the most a character takes JSON-escaped, per "
                            "--max-prompt-chars character, plus 1MiB: "
                            f"{default_max_request_bytes(limits.max_prompt_chars) >> 20}MiB by default)")
    serve.add_argument("--request-body-timeout", type=float, default=http.request_body_timeout,
                       help="seconds a request's body may take to arrive in full; a slower one is a 408, and the "
                            "connection is closed (default: %(default)s)")
    serve.add_argument("--max-header-bytes", type=parse_size, default=http.max_header_bytes,
                       help="most bytes in a request's line and headers; more is a 431 (a 400 where uvicorn runs "
                            "h11, without httptools), and the connection is closed (default: 16KiB)")
    serve.add_argument("--request-header-timeout", type=float, default=http.request_header_timeout,
                       help="seconds a request's line and headers may take to arrive, from its first byte or the "
                            "connection's opening; a connection that is late is closed (with httptools, which "
                            "uvicorn runs when installed) (default: %(default)s)")
    serve.add_argument("--timeout-keep-alive", type=float, default=http.timeout_keep_alive,
                       help="seconds an idle keep-alive connection stays open between requests (default: %(default)s)")
    serve.add_argument("--sse-ping-interval", type=float, default=15.0,
                       help="seconds between keep-alive comments on an idle stream (default: %(default)s)")
    serve.add_argument("--responses-store-max-entries", type=int, default=1000,
                       help="most responses the Responses API keeps for GET /v1/responses/{id} and "
                            "previous_response_id; the oldest go first (default: %(default)s)")
    serve.add_argument("--responses-store-max-bytes", type=parse_size, default=64 << 20,
                       help="most memory the stored responses take, as JSON, e.g. 256MiB (default: 64MiB)")
    serve.add_argument("--responses-store-ttl", type=float, default=3600.0,
                       help="seconds a stored response is kept (default: %(default)s)")
    serve.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_FORMATS),
                       help="the format of tool calls in the model's replies (tool_choice auto): hermes "
                            "(<tool_call> JSON: Qwen2.5/3, Hermes, SmolLM3) or llama3_json (Llama 3.1's JSON); "
                            "default: the one the chat template implies, hermes for templates without tools")
    serve.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                       help="split the reasoning between <think> and </think> off replies (reasoning_content): "
                            "deepseek_r1 (replies start inside the reasoning; one without </think> is all "
                            "reasoning) or qwen3 (only a reply that starts with <think> reasons); structured "
                            "outputs and forced tool calls then constrain the answer only (default: none)")
    observe = serve.add_argument_group("logs and traces")
    observe.add_argument("--log-format", default="text", choices=["text", "json"],
                         help="json: every log line of every process as one JSON object, and the access log's "
                              "fields (request id, model, route, status, tokens, queue time, TTFT, duration, "
                              "finish reason, client) as its keys (default: %(default)s)")
    observe.add_argument("--log-prompts", action="store_true",
                         help="put each request's prompt and output text in its access-log line (default: never)")
    observe.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                         help="export a span per request over OTLP/HTTP (protobuf) to this collector, e.g. "
                              "http://127.0.0.1:4318 (/v1/traces is added to a bare address); needs "
                              "pip install 'tokenmill[otel]' (default: no tracing)")
    observe.add_argument("--otlp-traces-sampling-ratio", type=float, default=1.0,
                         help="share of new traces kept; a caller's traceparent decides for its own "
                              "(default: %(default)s)")
    serve.add_argument("--fault-injection", default=None,
                       help="testing only: make chosen requests or steps fail (request:MARKER, "
                            "sampler:MARKER, step:N; see engine/faults.py)")
    serve.add_argument("--engine-in-process", action="store_true",
                       help="run the engine on a thread of the server's process rather than in a process of its "
                            "own (slower under load: HTTP work and the step loop then share one GIL)")
    serve.add_argument("--api-key", default=os.environ.get("TOKENMILL_API_KEY"),
                       help="require `Authorization: Bearer KEY` on /v1, /tokenize and /detokenize "
                            "(default: $TOKENMILL_API_KEY; none: open)")
    serve.add_argument("--no-webui", dest="webui", action="store_false",
                       help="no chat page at / (by default the server opens one there, which talks to it "
                            "through /v1 like any client)")

    ray = serve.add_argument_group("replicas on Ray Serve (--ray)")
    ray.add_argument("--ray", action="store_true",
                     help="serve through Ray Serve: each model runs as engine replicas (one engine process each) "
                          "behind Serve's HTTP proxy, with requests that share a prompt prefix sent to the same "
                          "replica (see api/ray_serve.py)")
    ray.add_argument("--ray-address", default=None,
                     help="the Ray cluster to run on (default: $RAY_ADDRESS, else a local cluster started here)")
    ray.add_argument("--num-replicas", type=int, default=1,
                     help="engine replicas per model at start, and the fewest while autoscaling (default: %(default)s)")
    ray.add_argument("--max-replicas", type=int, default=None,
                     help="autoscale each model between --num-replicas and this many replicas on requests in "
                          "flight (default: no autoscaling)")
    ray.add_argument("--target-ongoing-requests", type=float, default=None,
                     help="requests in flight per replica that autoscaling aims at (default: --max-num-seqs)")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0,
                     help="Ray CPUs each engine replica reserves; also its engine's threads unless --num-threads "
                          "is given (default: %(default)s)")

    bench = commands.add_parser("bench", help="run a benchmark from benchmarks/")
    bench.add_argument("benchmark", choices=["serve", "throughput"],
                       help="serve: benchmarks/serving.py against a running server; "
                            "throughput: benchmarks/throughput.py offline")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the benchmark")
    return parser


def model_specs(args: argparse.Namespace) -> list[ModelSpec]:
    """The models to serve: the MODEL arguments, then --config's; the packaged model if none is given."""
    specs = [ModelSpec.parse(m) for m in args.model]
    if args.config:
        specs += _config_file_specs(args.config)
    if not specs and not args.model_dir:
        specs = [ModelSpec.parse(default_model_path())]
    if args.served_model_name:
        if len(specs) != 1:
            raise ValueError("--served-model-name names one model; name several as NAME=PATH")
        specs[0].name, specs[0].version = args.served_model_name, None
    ids = [model_id(s.name, s.version) for s in specs]
    if len(set(ids)) < len(ids):
        raise ValueError(f"two models share a name: {', '.join(sorted({i for i in ids if ids.count(i) > 1}))}")
    return specs


def _config_file_specs(path: str) -> list[ModelSpec]:
    import yaml  # JSON is YAML too

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--config {path}: {e}") from None
    entries = data.get("models") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "path" in e for e in entries):
        raise ValueError(f"--config {path}: expected {{models: [{{model: NAME[:VERSION], path: PATH, ...}}]}}")
    specs = []
    for entry in entries:
        settings = {k: parse_size(v) if k == "kv_cache_memory" and isinstance(v, str) else v
                    for k, v in entry.items() if k not in ("model", "path")}
        path_ = str(entry["path"])
        specs.append(ModelSpec.named(str(entry.get("model") or default_name(path_)), path_, settings))
    return specs


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The server-wide engine settings; each model's path (and its own settings) come on top."""
    return EngineConfig(dtype=args.dtype, device=args.device, load_format=args.load_format,
                        max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        kv_cache_memory=args.kv_cache_memory,
                        gpu_memory_utilization=args.gpu_memory_utilization, block_size=args.block_size,
                        enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
                        seed=args.seed, num_threads=args.num_threads, tensor_parallel_size=args.tensor_parallel_size,
                        fault_injection=args.fault_injection,
                        quantization=args.quantization, enable_lora=args.enable_lora or bool(args.lora_modules),
                        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                        speculative_config=args.speculative_config,
                        limits=RequestLimits(max_n=args.max_n, max_prompts=args.max_prompts, max_stop=args.max_stop,
                                             max_stop_len=args.max_stop_len,
                                             max_stop_token_ids=args.max_stop_token_ids,
                                             max_logit_bias=args.max_logit_bias,
                                             max_prompt_chars=args.max_prompt_chars,
                                             max_constraint_chars=args.max_constraint_chars,
                                             max_constraint_compile_s=args.max_constraint_compile_s,
                                             max_waiting_seqs=args.max_queue_len))


def http_limits(args: argparse.Namespace) -> HTTPLimits:
    """What one request and one connection may hold; the body limit follows --max-prompt-chars unless given."""
    return HTTPLimits(max_request_bytes=args.max_request_bytes or default_max_request_bytes(args.max_prompt_chars),
                      request_body_timeout=args.request_body_timeout, max_header_bytes=args.max_header_bytes,
                      request_header_timeout=args.request_header_timeout, timeout_keep_alive=args.timeout_keep_alive)
