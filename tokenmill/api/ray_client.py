"""The engine-client interface over a Ray Serve deployment of engine replicas.

The ingress holds one ReplicaEngineClient per model. It checks and tokenizes requests as every client
does (engine/core/engine_client.py), then sends each as an AddRequest (the engine core's own message) through
the deployment's handle; the handle's request router (api/ray_router.py) picks a replica by the request's
prompt tokens. The replica (EngineReplica, api/ray_serve.py) answers with a stream: Accepted or Refused
first, then the request's output deltas, ending with the finished one or Failed. A replica that dies
before it accepted a call is retried on another; one that dies mid-request fails that request alone.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from tokenmill.engine.config import EngineConfig, ModelConfig
from tokenmill.engine.core.engine_client import (
    EngineClient,
    EngineDeadError,
    EngineOverloadedError,
    EngineStoppedError,
    RequestFailedError,
    RequestStream,
)
from tokenmill.engine.core.engine_core import AddRequest
from tokenmill.engine.core.llm_engine import EngineStats, IterationTokens
from tokenmill.engine.limits import InvalidRequestError
from tokenmill.engine.sampling.sampling_params import SamplingParams
from tokenmill.engine.spec_decode.speculator import SpecDecodeStats

from .metrics import PREFIX

logger = logging.getLogger("tokenmill.api")

# Tries of one call when its replica dies before accepting it (Serve then routes around the dead one).
ADD_ATTEMPTS = 3


@dataclass
class EngineInfo:
    """What the ingress needs of a model to check and tokenize its requests: one replica's answer."""

    config: EngineConfig
    model_config: ModelConfig
    tokenizer: Any
    max_model_len: int


@dataclass
class Accepted:
    """The replica's engine holds the request; its latest stats come along."""

    replica: str
    stats: EngineStats


@dataclass
class Refused:
    """The replica's engine refused the request (the error's type and what it carries)."""

    kind: str  # invalid | overloaded | stopped
    message: str
    param: str | None = None
    retry_after: int = 1

    @classmethod
    def of(cls, error: Exception) -> Refused:
        if isinstance(error, InvalidRequestError):
            return cls("invalid", str(error), error.param)
        if isinstance(error, EngineOverloadedError):
            return cls("overloaded", str(error), retry_after=error.retry_after)
        return cls("stopped", str(error))

    def error(self) -> Exception:
        if self.kind == "invalid":
            return InvalidRequestError(self.message, self.param)
        if self.kind == "overloaded":
            return EngineOverloadedError(self.message, self.retry_after)
        return EngineStoppedError(self.message)


@dataclass
class Failed:
    """The request failed on its replica after it was accepted (the message says why)."""

    message: str


class _ReplicaGone(Exception):
    """The replica an add was routed to died, or was stopping, before it accepted the call."""


@dataclass
class ReplicaLoad:
    """What the ingress saw of one replica: requests it was sent, and its engine's stats at the latest."""

    requests: int = 0
    stats: EngineStats | None = None


class ReplicaEngineClient(EngineClient):
    """An EngineClient whose engine is a Ray Serve deployment of EngineReplicas (see the module docstring).

    It never dies as a whole: Serve replaces a replica that fails its health check. `stats` sums the
    replicas' latest snapshots; `replicas` keeps them one by one, for /metrics."""

    def __init__(self, handle: Any, info: EngineInfo):
        super().__init__(info.config, info.model_config, info.tokenizer, info.max_model_len)
        self._generate = handle.options(stream=True, method_name="generate")
        self._running = False
        self._tasks: dict[str, asyncio.Task] = {}
        self.replicas: dict[str, ReplicaLoad] = {}

    def start(self) -> None:
        self._running = True

    def shutdown(self) -> None:
        self._running = False
        for task in list(self._tasks.values()):
            task.cancel()
        for stream in list(self._live.values()):
            stream.put(EngineStoppedError("the server is shutting down"))
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def is_running(self) -> bool:
        return self._running

    @property
    def dead_error(self) -> EngineDeadError | None:
        return None

    @property
    def capacity(self) -> int | None:
        return None  # each replica bounds its own engine's queue, and Serve the handle's (max_queued_requests)

    @property
    def stats(self) -> EngineStats:
        snapshots = [load.stats for load in self.replicas.values() if load.stats is not None]
        summed = [f.name for f in fields(EngineStats)
                  if f.name not in ("finished_reasons", "spec_decode", "iteration_tokens")]
        total = EngineStats(**{name: 0 for name in summed})
        reasons: Counter[str] = Counter()
        for s in snapshots:
            for name in summed:
                if name != "kv_cache_usage":
                    setattr(total, name, getattr(total, name) + getattr(s, name))
            reasons.update(s.finished_reasons)
        total.kv_cache_usage = sum(s.kv_cache_usage for s in snapshots) / max(1, len(snapshots))
        total.finished_reasons = dict(reasons)
        total.spec_decode = SpecDecodeStats.total([s.spec_decode for s in snapshots if s.spec_decode is not None])
        total.iteration_tokens = IterationTokens.total([s.iteration_tokens for s in snapshots])
        return total

    def _submit_add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float, stream: RequestStream, lora_name: str | None) -> concurrent.futures.Future:
        added: concurrent.futures.Future = concurrent.futures.Future()
        call = AddRequest(request_id, prompt_token_ids, params, arrival_time, lora_name)
        task = asyncio.get_running_loop().create_task(self._serve(call, stream, added))
        self._tasks[request_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(request_id, None) if self._tasks.get(request_id) is task
                               else None)
        return added

    def _submit_abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:  # cancelling the call cancels the replica's generator, which aborts there
            task = self._tasks.get(rid)
            if task is not None:
                task.cancel()

    def _submit_add_lora(self, name: str, path: str) -> concurrent.futures.Future:
        return self._refuse_lora()

    def _submit_remove_lora(self, name: str) -> concurrent.futures.Future:
        return self._refuse_lora()

    @staticmethod
    def _refuse_lora() -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_exception(ValueError("LoRA adapters are not supported on Ray Serve replicas yet"))
        return future

    async def _serve(self, call: AddRequest, stream: RequestStream, added: concurrent.futures.Future) -> None:
        """Add the call on a replica (retrying one that died first), then pass its deltas to the stream."""
        replica, responses = None, None
        try:
            for attempt in range(ADD_ATTEMPTS):
                try:
                    replica, responses = await self._add(call)
                    break
                except _ReplicaGone as e:
                    if attempt == ADD_ATTEMPTS - 1:
                        raise EngineOverloadedError(f"no replica could take the request: {e}") from None
                    logger.warning("request %s: %s; trying another replica", call.request_id, e)
            added.set_result(None)
        except asyncio.CancelledError:
            added.cancel()
            raise
        except Exception as e:
            added.set_exception(e)
            return
        try:
            async for message in responses:
                if isinstance(message, Failed):
                    stream.put(RequestFailedError(message.message))
                    return
                message.prompt_token_ids = stream.prompt_token_ids
                stream.put(message)
        except RayActorError as e:
            self.replicas.pop(replica, None)
            stream.put(RequestFailedError(f"the replica serving request {call.request_id} died: {e}"))
        finally:
            responses.cancel()  # a no-op once the replica's generator ended

    async def _add(self, call: AddRequest) -> tuple[str, Any]:
        """Send the call; (the replica that accepted it, the rest of its responses)."""
        responses = self._generate.remote(call)
        try:
            first = await responses.__anext__()
        except BackPressureError as e:
            raise EngineOverloadedError(f"the server is overloaded: {e}") from None
        except RayActorError as e:
            raise _ReplicaGone(f"its replica died ({type(e).__name__})") from None
        except BaseException:
            responses.cancel()
            raise
        if isinstance(first, Refused):
            if first.kind == "stopped":
                raise _ReplicaGone(f"its replica is stopping: {first.message}")
            raise first.error()
        load = self.replicas.setdefault(first.replica, ReplicaLoad())
        load.requests += 1
        load.stats = first.stats
        return first.replica, responses


async def serve_call(engine: EngineClient, call: AddRequest, replica: str) -> Any:
    """The replica's side of a call: add it to the replica's engine and yield Accepted or Refused, then
    the request's deltas (without the prompt's ids: the ingress has them), or Failed."""
    try:
        stream = await engine.add_request(call.request_id, {"prompt_token_ids": call.prompt_token_ids}, call.params,
                                          call.arrival_time, lora_name=call.lora_name)
    except (InvalidRequestError, EngineOverloadedError, EngineStoppedError, EngineDeadError) as e:
        yield Refused.of(e)
        return
    yield Accepted(replica, engine.stats)
    try:
        async for delta in stream:
            delta.prompt_token_ids = []
            yield delta
    except (RequestFailedError, EngineStoppedError, EngineDeadError) as e:
        yield Failed(str(e))


class ReplicaCollector(Collector):
    """Per replica, for each model served through Ray Serve: requests routed to it and its engine's load."""

    def __init__(self, clients: dict[tuple[str, str], ReplicaEngineClient]):
        self.clients = clients  # (model name, version) -> its client

    def collect(self) -> Iterator:
        labels = ["model_name", "version", "replica"]
        requests = CounterMetricFamily(PREFIX + "replica_requests_total", "Requests routed to each replica.",
                                       labels=labels)
        running = GaugeMetricFamily(PREFIX + "replica_num_requests_running",
                                    "Sequences in each replica's running batch, as it last reported.", labels=labels)
        for (name, version), client in self.clients.items():
            for replica, load in list(client.replicas.items()):
                requests.add_metric([name, version, replica], load.requests)
                running.add_metric([name, version, replica], load.stats.num_running if load.stats else 0)
        yield requests
        yield running

