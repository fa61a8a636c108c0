"""The registry of served models and versions: routing by the request's `model`, loading, default
versions, draining and unloading.

A served model is NAME or NAME:VERSION with an engine of its own (its own process, KV pool and batch).
A request's `model` names a version exactly, or a NAME, which goes to that name's default version; a
request without one goes to the first model served. Switching a default is one assignment on the event
loop, so every request is routed either wholly before or wholly after it. An unloaded model stops
taking requests at once; those in flight finish, and then its engine (and its memory) goes.

Each model counts the requests routed to it that have not yet reached its engine (`pending`); with its
engine's live requests, that is what a drain waits for.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.core.engine_client import EngineClient
from tokenmill.engine.core.llm_engine import EngineStats
from tokenmill.engine.weights.loader import load_model_files

from .errors import APIError
from .metrics import ServerMetrics
from .model_spec import ModelSpec, model_config, model_id
from .observe import current_record
from .serving import OpenAIServing
from .serving_chat import ServingChat
from .serving_completions import ServingCompletions

logger = logging.getLogger("tokenmill.api")

_BYTES_PER_PARAM = {"int8": 1.0, "int4": 0.5, "gguf": 0.6}  # gguf: about Q4_1/Q8_0's, in our packing


def estimate_memory(config: EngineConfig) -> int:
    """Bytes a model will hold once loaded: its weights at the dtype or quantization it runs in, and
    its KV cache. Reads only the checkpoint's header; ValueError if it cannot be read."""
    try:
        cfg, _, _ = load_model_files(config.resolved_model(), config.load_format, load_tokenizer=False)
    except Exception as e:
        raise ValueError(f"cannot read the model at {config.resolved_model()!r}: {e}") from None
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    attention = h * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    params = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + layers * (attention + 3 * h * i)
    per_param = _BYTES_PER_PARAM.get(config.quantization or "", config.torch_dtype().itemsize)
    return int(params * per_param) + (config.kv_cache_memory or 0)


def process_memory(pid: int) -> int | None:
    """Resident bytes of a process (Linux), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return None


@dataclass(eq=False)
class ServedModel:
    """One model version: its engine and endpoints, and where it is in its life."""

    name: str
    version: str | None
    path: str
    engine: EngineClient
    serving: OpenAIServing
    chat: ServingChat
    completions: ServingCompletions
    owns_engine: bool
    budget_bytes: int  # what it counts against --memory-budget: the estimate of its weights and KV cache
    on_demand: bool = False  # loaded from --model-dir as it was asked for; unloaded when idle and room is short
    base: ServedModel | None = None  # for a LoRA adapter: the model whose engine runs it
    state: str = "serving"  # serving | draining | failed
    pending: int = 0  # requests routed here that have not reached the engine yet
    created: int = field(default_factory=lambda: int(time.time()))
    last_used: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> str:
        return model_id(self.name, self.version)

    @property
    def in_flight(self) -> int:
        return self.pending + self.serving.num_in_flight

    @property
    def engine_pid(self) -> int | None:
        """The engine's own process, if it has one."""
        process = getattr(self.engine, "process", None)
        return process.pid if process is not None and self.base is None else None

    @property
    def memory_bytes(self) -> int:
        """Resident memory of the engine's process, where it has one; else the estimate."""
        measured = process_memory(self.engine_pid) if self.engine_pid else None
        return measured or self.budget_bytes


class ModelRegistry:
    """Every served model, by id and by name's default version. Loads and unloads run one at a time."""

    def __init__(self, engine_factory: Callable[[EngineConfig], EngineClient] | None = None,
                 sse_ping_s: float = 15.0, tool_call_parser: str | None = None, memory_budget: int | None = None,
                 model_dir: str | None = None, base_config: EngineConfig | None = None,
                 reasoning_parser: str | None = None):
        self.engine_factory = engine_factory
        self.sse_ping_s = sse_ping_s
        self.tool_call_parser = tool_call_parser
        self.reasoning_parser = reasoning_parser
        self.memory_budget = memory_budget
        self.model_dir = model_dir
        self.base_config = base_config or EngineConfig()
        self.models: dict[str, ServedModel] = {}
        self.defaults: dict[str, str | None] = {}  # name -> its default version
        self.first: str | None = None  # the name a request without `model` goes to
        self.metrics = ServerMetrics(self._engine_stats)
        self.on_all_failed: Callable[[Exception], None] | None = None
        self.startup_loras: list[tuple[str, str]] = []  # --lora-modules: (name, path), loaded as the app starts
        self.loading: set[str] = set()
        self._changes = asyncio.Lock()
        # Engine processes die with the thread that made them (PR_SET_PDEATHSIG): one that lives as long
        # as the server makes them all.
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenmill-loader")

    def _engine_stats(self) -> list[tuple[list[str], EngineStats]]:
        """Each model's metric labels and its engine's latest stats (what /metrics reports)."""
        return [([m.name, m.version or ""], m.engine.stats) for m in list(self.models.values())]

    # ---- routing ---------------------------------------------------------------------------

    def lookup(self, model: str | None) -> ServedModel | None:
        """The model a request's `model` names (exactly, or a name's default version), serving or not."""
        if model is None:
            model = self.first
        if model in self.models:
            return self.models[model]
        if model in self.defaults:
            return self.models[model_id(model, self.defaults[model])]
        return None

    async def route(self, model: str | None) -> ServedModel:
        """The serving model for a request, counted as pending until the caller releases it; loads it from
        --model-dir first if need be. 404 model_not_found for an unknown or draining model, 503 for a
        failed one."""
        served = self.lookup(model)
        if served is None and model is not None and self.model_dir is not None:
            served = await self._load_on_demand(model)
        if served is None or served.state == "draining":
            known = ", ".join(sorted(m.id for m in self.models.values() if m.state == "serving")) or "none"
            raise APIError(404, f"The model `{model}` does not exist; served models: {known}",
                           param="model", code="model_not_found")
        if served.state == "failed":
            raise APIError(503, f"The model `{served.id}` failed: {served.engine.dead_error}; the other models "
                           "still serve", type="server_error", code="unavailable")
        served.pending += 1
        served.last_used = time.monotonic()
        record = current_record()
        if record is not None:
            record.model, record.version = served.name, served.version
        return served

    @contextlib.asynccontextmanager
    async def using(self, model: str | None) -> AsyncIterator[ServedModel]:
        """route(), released when the handler returns: by then its requests are the engine's to count."""
        served = await self.route(model)
        try:
            yield served
        finally:
            served.pending -= 1

    # ---- adding and removing ---------------------------------------------------------------

    def add(self, engine: EngineClient, name: str, version: str | None = None, path: str = "",
            owns_engine: bool = True, budget_bytes: int = 0, on_demand: bool = False,
            base: ServedModel | None = None) -> ServedModel:
        """Serve a running (or about to start) engine as NAME[:VERSION], or with base, base's engine's LoRA
        adapter NAME; the first version of a name is its default."""
        mid = model_id(name, version)
        if mid in self.models:
            raise ValueError(f"model {mid} is already served")
        serving = OpenAIServing(engine, mid, self.metrics.for_model(name, version), self.sse_ping_s,
                                self.tool_call_parser, lora_name=name if base else None,
                                reasoning_parser=self.reasoning_parser)
        served = ServedModel(name, version, path, engine, serving, ServingChat(serving), ServingCompletions(serving),
                             owns_engine, budget_bytes, on_demand, base)
        self.models[mid] = served
        self.defaults.setdefault(name, version)
        self.first = self.first or name
        engine.on_dead(lambda error: self._failed(served, error))
        return served

    async def add_lora(self, name: str, path: str, base_model: str | None = None) -> ServedModel:
        """Load a PEFT LoRA adapter into a model's engine (the first model's by default) and serve it as the
        model NAME, as vLLM does. 400 if the engine refuses it (LoRA off, a bad folder, no slot free)."""
        if name in self.models or name in self.defaults:
            raise APIError(400, f"a model named {name} already exists", param="lora_name")
        base = self.lookup(base_model)
        if base is None or base.base is not None or base.state != "serving":
            raise APIError(404, f"base model {base_model} is not served", param="base_model_name",
                           code="model_not_found")
        try:
            await base.engine.add_lora(name, path)
        except ValueError as e:
            raise APIError(400, str(e), param="lora_path") from None
        return self.add(base.engine, name, path=path, owns_engine=False, base=base)

    def _failed(self, served: ServedModel, error: Exception) -> None:
        """On the engine's side: a plain flag. The server stops only when no model is left serving."""
        logger.error("model %s failed: %s", served.id, error)
        served.state = "failed"
        if self.on_all_failed and not any(m.state == "serving" for m in self.models.values()):
            self.on_all_failed(error)

    def _prepare(self, spec: ModelSpec) -> tuple[EngineConfig, int]:
        """(the model's engine config, its memory estimate, 0 without a budget to count it against);
        ValueError for a bad path or setting. Without a budget, a checkpoint that cannot load is the
        engine's to report."""
        config = model_config(self.base_config, spec.path, spec.settings)
        if not os.path.exists(config.resolved_model()):
            raise ValueError(f"path: {spec.path!r} does not exist")
        return config, estimate_memory(config) if self.memory_budget is not None else 0

    def load_at_start(self, spec: ModelSpec) -> ServedModel:
        """load(), before the server runs: blocking, and a budget overrun is a ValueError."""
        config, estimate = self._prepare(spec)
        if self.memory_budget is not None and self.memory_in_use() + estimate > self.memory_budget:
            raise ValueError(f"model {model_id(spec.name, spec.version)} needs about {estimate / 2**20:.0f} MiB, "
                             f"over the --memory-budget ({self.memory_budget / 2**20:.0f} MiB, "
                             f"{self.memory_in_use() / 2**20:.0f} in use)")
        engine = self._loader.submit(self.engine_factory, config).result()
        return self.add(engine, spec.name, spec.version, spec.path, budget_bytes=estimate)

    async def load(self, spec: ModelSpec, on_demand: bool = False) -> ServedModel:
        """Start an engine for the model and serve it, answering once it serves; other models keep serving
        meanwhile. 409 if the id is taken, 400 for a bad path or setting, 507 over the memory budget."""
        mid = model_id(spec.name, spec.version)
        if mid in self.models or mid in self.loading:
            raise APIError(409, f"model {mid} already exists", param="model", code="model_exists")
        if self.engine_factory is None:
            raise APIError(400, "this server cannot load models")
        self.loading.add(mid)
        try:
            async with self._changes:
                try:
                    config, estimate = await asyncio.to_thread(self._prepare, spec)
                except (TypeError, ValueError) as e:
                    raise APIError(400, str(e), param="path" if str(e).startswith("path") else None) from None
                await self._make_room(estimate, mid)
                loop = asyncio.get_running_loop()
                try:
                    engine = await loop.run_in_executor(self._loader, self._start_engine, config)
                except RuntimeError as e:  # EngineStartupError: the engine's own message
                    raise APIError(400, f"model {mid} failed to load: {e}", param="path") from None
                served = self.add(engine, spec.name, spec.version, spec.path, budget_bytes=estimate,
                                  on_demand=on_demand)
        finally:
            self.loading.discard(mid)
        logger.info("model %s serves (%s, %.0f MiB)", mid, spec.path, served.memory_bytes / 2**20)
        return served

    def _start_engine(self, config: EngineConfig) -> EngineClient:
        engine = self.engine_factory(config)
        engine.start()
        return engine

    def memory_in_use(self) -> int:
        return sum(m.budget_bytes for m in self.models.values())

    async def _make_room(self, needed: int, for_model: str) -> None:
        """Within --memory-budget, unloading the least recently used idle models loaded on demand if that
        makes enough room; else 507, unloading nothing."""
        if self.memory_budget is None:
            return
        idle = sorted((m for m in self.models.values() if m.on_demand and m.state == "serving" and not m.in_flight),
                      key=lambda m: m.last_used)
        if self.memory_in_use() - sum(m.budget_bytes for m in idle) + needed > self.memory_budget:
            raise APIError(507, f"model {for_model} needs about {needed / 2**20:.0f} MiB; "
                           f"{self.memory_in_use() / 2**20:.0f} MiB of the --memory-budget "
                           f"{self.memory_budget / 2**20:.0f} MiB are in use", code="insufficient_storage")
        while self.memory_in_use() + needed > self.memory_budget:
            victim = idle.pop(0)
            logger.info("unloading idle model %s to make room for %s", victim.id, for_model)
            await self._drain_and_stop(self._withdraw(victim))

    async def _load_on_demand(self, model: str) -> ServedModel | None:
        """A model named after a file or folder in --model-dir, loaded as it is asked for."""
        if "/" in model or model.startswith("."):  # a name in the directory, never a path out of it
            return None
        path = next((p for p in (Path(self.model_dir) / model, Path(self.model_dir) / f"{model}.gguf") if p.exists()),
                    None)
        if path is None:
            return None
        try:
            return await self.load(ModelSpec(model, None, str(path)), on_demand=True)
        except APIError as e:
            if e.status == 409:  # another request is loading it: wait for it
                while model in self.loading:
                    await asyncio.sleep(0.1)
                return self.lookup(model)
            raise

    def unload(self, model: str) -> ServedModel:
        """Stop routing to the model now; it drains and stops in the background. 404 if unknown; 409 for a
        name's default version while the name has others."""
        served = self.models.get(model)
        if served is None or served.state == "draining":
            raise APIError(404, f"model {model} is not served", param="model", code="model_not_found")
        if self.defaults.get(served.name) == served.version and any(
                m.name == served.name and m is not served for m in self.models.values()):
            raise APIError(409, f"{served.id} is the default version of {served.name}; make another version the "
                           f"default first (PUT /admin/models/{served.name}/default)", param="model")
        adapters = [m.id for m in self.models.values() if m.base is served and m.state != "draining"]
        if adapters:
            raise APIError(409, f"{served.id} runs the LoRA adapters {', '.join(adapters)}; unload them first",
                           param="model")
        self._withdraw(served)
        task = asyncio.ensure_future(self._drain_and_stop(served))
        task.add_done_callback(lambda t: t.exception() and logger.error("unloading %s: %s", served.id, t.exception()))
        return served

    def _withdraw(self, served: ServedModel) -> ServedModel:
        served.state = "draining"
        if not any(m.name == served.name and m.state != "draining" for m in self.models.values()):
            self.defaults.pop(served.name, None)
            if self.first == served.name:
                self.first = next((m.name for m in self.models.values() if m.state != "draining"), None)
        return served

    async def _drain_and_stop(self, served: ServedModel) -> None:
        while served.in_flight:
            await asyncio.sleep(0.05)
        if served.base is not None and served.engine.is_running:
            await served.engine.remove_lora(served.name)
        elif served.owns_engine:
            await asyncio.to_thread(served.engine.shutdown)
        self.models.pop(served.id, None)
        logger.info("model %s unloaded", served.id)

    def set_default(self, name: str, version: str | None) -> None:
        """Route NAME to NAME:VERSION from now on (an atomic switch; requests in flight stay where they are)."""
        target = self.models.get(model_id(name, version))
        if name not in self.defaults or target is None or target.state != "serving":
            raise APIError(404, f"model {model_id(name, version)} is not served", param="version",
                           code="model_not_found")
        self.defaults[name] = version

    def is_default(self, served: ServedModel) -> bool:
        return self.defaults.get(served.name, "-") == served.version

    def shutdown(self) -> None:
        for m in list(self.models.values()):
            if m.owns_engine:
                m.engine.shutdown()
        self._loader.shutdown(wait=False)
