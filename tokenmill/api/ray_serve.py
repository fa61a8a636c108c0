"""Replicas on Ray Serve: `tokenmill serve --ray`, or
`serve run tokenmill.api.ray_serve:app_builder model=PATH ...`.

One Serve application per server: for each model an engine deployment (EngineReplica: one tokenmill
engine, in a process of its own, per replica), and one ingress deployment (OpenAIIngress: the same
FastAPI app as `tokenmill serve`, whose engines are ReplicaEngineClients). Ray Serve's HTTP proxy
forwards each HTTP request unread to the ingress; the ingress parses and tokenizes it and calls an
engine replica through a handle whose request router (api/ray_router.py) sees the prompt's tokens and
prefers the replica that holds its prefix. The engine deployment autoscales on requests in flight
between --num-replicas and --max-replicas; Serve replaces a replica whose actor dies or whose engine
fails its health check, and the engine process dies with its replica (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import signal
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.core.core_client import MPEngineClient
from tokenmill.engine.core.engine_core import AddRequest

from .args import build_parser, engine_config, http_limits, model_specs
from .http_limits import HTTPLimits
from .model_spec import ModelSpec, model_config, model_id
from .models import ModelRegistry
from .ray_client import EngineInfo, ReplicaCollector, ReplicaEngineClient, serve_call
from .ray_router import PrefixAwareRouter
from .server import build_app

logger = logging.getLogger("tokenmill.api")

APP_NAME = "tokenmill"


@dataclasses.dataclass
class ReplicaSettings:
    """How many engine replicas each model runs, and when Serve adds or removes one."""

    num_replicas: int = 1  # at start, and the fewest while autoscaling
    max_replicas: int | None = None  # more than num_replicas: autoscale between them; None: num_replicas
    target_ongoing_requests: float | None = None  # per replica, what autoscaling aims at; None: max_num_seqs
    cpus_per_replica: float = 1.0  # Ray CPUs each engine replica reserves; its engine's threads by default
    autoscaling: dict[str, Any] = dataclasses.field(default_factory=dict)  # more of Serve's autoscaling_config

    @property
    def most(self) -> int:
        """The most replicas each model may run."""
        return self.max_replicas or self.num_replicas

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"--num-replicas must be >= 1; got {self.num_replicas}")
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ValueError(f"--max-replicas ({self.max_replicas}) must be >= --num-replicas ({self.num_replicas})")
        if self.cpus_per_replica <= 0:
            raise ValueError(f"--cpus-per-replica must be > 0; got {self.cpus_per_replica}")


class EngineReplica:
    """One engine replica: a tokenmill engine in a process of its own (MPEngineClient)."""

    def __init__(self, config: EngineConfig):
        # Serve runs constructors on the replica's lasting user-code thread, which the engine process's
        # PR_SET_PDEATHSIG follows: the engine dies with this actor, however it dies.
        self.engine = MPEngineClient(config)
        self.engine.start()
        self.replica = serve.get_replica_context().replica_id.unique_id

    def info(self) -> EngineInfo:
        e = self.engine
        return EngineInfo(e.config, e.model_config, e.tokenizer, e.max_model_len)

    async def generate(self, call: AddRequest) -> AsyncIterator[Any]:
        async for message in serve_call(self.engine, call, self.replica):
            yield message

    def check_health(self) -> None:
        """Serve replaces a replica whose engine died."""
        if self.engine.dead_error is not None:
            raise RuntimeError(str(self.engine.dead_error))

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=10)


@serve.ingress()
class OpenAIIngress:
    """The OpenAI API (api/server.py's app) over the models' engine deployments."""

    async def __init__(self, engines: list[tuple[ModelSpec, DeploymentHandle]], api_key: str | None = None,
                       sse_ping_s: float = 15.0, tool_call_parser: str | None = None,
                       reasoning_parser: str | None = None, limits: HTTPLimits | None = None,
                       webui: bool = True):
        self.models = ModelRegistry(sse_ping_s=sse_ping_s, tool_call_parser=tool_call_parser,
                                    reasoning_parser=reasoning_parser)
        clients = {}
        for spec, handle in engines:
            client = ReplicaEngineClient(handle, await handle.info.remote())
            self.models.add(client, spec.name, spec.version, spec.path)
            clients[(spec.name, spec.version or "")] = client
        self.models.metrics.registry.register(ReplicaCollector(clients))
        self.api_key, self.limits, self.webui = api_key, limits, webui

    def __serve_build_asgi_app__(self) -> Any:
        # Serve's proxy holds the connections: of the HTTP limits, the body's apply here (the keep-alive timeout is
        # the proxy's, from --timeout-keep-alive; the header bounds are Serve's own).
        return build_app(self.models, api_key=self.api_key, http_limits=self.limits, webui=self.webui)


def _deployment_name(spec: ModelSpec) -> str:
    return "engine-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model_id(spec.name, spec.version))


def engine_options(config: EngineConfig, replicas: ReplicaSettings, name: str) -> dict[str, Any]:
    """Serve's options for one model's engine deployment."""
    # A CUDA replica reserves a GPU per rank, so Ray places it where they are free and makes them visible.
    gpus = config.tensor_parallel_size if config.torch_device().type == "cuda" else 0
    options: dict[str, Any] = dict(
        name=name, ray_actor_options={"num_cpus": replicas.cpus_per_replica, "num_gpus": gpus},
        max_ongoing_requests=config.max_num_seqs + config.limits.max_waiting_seqs,
        max_queued_requests=config.limits.max_waiting_seqs,
        request_router_config=RequestRouterConfig(request_router_class=PrefixAwareRouter,
                                                  request_router_kwargs={"block_size": config.block_size}))
    if replicas.most > replicas.num_replicas:
        options["autoscaling_config"] = {
            "min_replicas": replicas.num_replicas, "initial_replicas": replicas.num_replicas,
            "max_replicas": replicas.most,
            "target_ongoing_requests": replicas.target_ongoing_requests or config.max_num_seqs,
            **replicas.autoscaling}
    else:
        options["num_replicas"] = replicas.num_replicas
    return options


def build_ray_app(base: EngineConfig, specs: list[ModelSpec], replicas: ReplicaSettings,
                  api_key: str | None = None, sse_ping_s: float = 15.0,
                  tool_call_parser: str | None = None, reasoning_parser: str | None = None,
                  limits: HTTPLimits | None = None, webui: bool = True) -> Application:
    """The Serve application: an engine deployment per model, and the ingress over them."""
    engines, capacity = [], 0
    for spec in specs:
        config = model_config(base, spec.path, spec.settings)
        if config.num_threads is None:
            config = dataclasses.replace(config, num_threads=max(1, int(replicas.cpus_per_replica)))
        options = engine_options(config, replicas, _deployment_name(spec))
        engines.append((spec, serve.deployment(EngineReplica).options(**options).bind(config)))
        capacity += options["max_ongoing_requests"] * replicas.most
    ingress = serve.deployment(OpenAIIngress).options(
        name="openai", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=capacity)
    return ingress.bind(engines, api_key, sse_ping_s, tool_call_parser, reasoning_parser, limits, webui)


def replica_settings(args: argparse.Namespace) -> ReplicaSettings:
    return ReplicaSettings(args.num_replicas, args.max_replicas, args.target_ongoing_requests, args.cpus_per_replica)


def app_from_args(args: argparse.Namespace) -> Application:
    """The Serve application `tokenmill serve --ray` runs, from its parsed command line."""
    return build_ray_app(engine_config(args), model_specs(args), replica_settings(args), args.api_key,
                         args.sse_ping_interval, args.tool_call_parser, args.reasoning_parser, http_limits(args),
                         args.webui)


def app_builder(args: dict[str, Any]) -> Application:
    """For `serve run tokenmill.api.ray_serve:app_builder model=PATH max_replicas=2 ...`: each key=value is the
    `tokenmill serve` option --key value (a value of true: a flag; model: MODELs, comma-separated)."""
    argv = ["serve", "--ray"]
    for key, value in args.items():
        if key == "model":
            argv += [m for m in str(value).split(",") if m]
        elif str(value).lower() == "true":
            argv.append("--" + key.replace("_", "-"))
        else:
            argv += ["--" + key.replace("_", "-"), str(value)]
    return app_from_args(build_parser().parse_args(argv))


def run_ray(args: argparse.Namespace) -> int:
    """`tokenmill serve --ray`: run the application on the Ray cluster at --ray-address (default: $RAY_ADDRESS,
    else a local cluster started here) with Serve's HTTP proxy on --host:--port, until SIGINT or SIGTERM.
    Returns the exit status: 0 after a clean stop, 1 if the application failed to start."""
    import ray

    app = app_from_args(args)
    ray.init(address=args.ray_address, include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port,
                                  "keep_alive_timeout_s": math.ceil(args.timeout_keep_alive)})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except Exception as e:  # an engine that cannot load its model fails its deployment
            print(f"tokenmill serve: the application failed to start: {e}", file=sys.stderr)
            return 1
        logger.info("serving on http://%s:%d through Ray Serve", args.host, args.port)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.delete(APP_NAME)  # in-flight requests drain (graceful_shutdown_timeout_s) first
    finally:
        ray.shutdown()
    return 0
