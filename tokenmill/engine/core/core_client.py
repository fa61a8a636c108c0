"""The client half of an EngineCore (engine_core.py), and its process transport, MPEngineClient.

CoreClient holds everything that does not depend on where the core runs: it sends AddRequest,
AbortRequests, AddLoRA and RemoveLoRA, answers each add (and each LoRA command) when the core's round
names it, routes the round's deltas to their
streams, keeps the latest stats snapshot, and dies loudly. A subclass supplies the transport: how a
command reaches the core (_send), and a thread that hands each CoreOutputs to _on_outputs, or calls
_die when the core is gone. MPEngineClient runs the core in a process of its own; AsyncLLMEngine
(async_engine.py) on a thread of this one.

Threads: the event loop(s) add and abort; the receiving thread alone routes (_routes), so a request's
deltas reach its stream in the order the core applied its commands. _pending is shared, under _lock.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

from tokenmill.engine.config import EngineConfig, ModelConfig
from tokenmill.engine.core.engine_client import EngineClient, EngineDeadError, EngineStoppedError, RequestStream
from tokenmill.engine.core.engine_core import (
    AbortRequests,
    AddLoRA,
    AddRequest,
    Command,
    CoreFailed,
    CoreOutputs,
    CoreReady,
    RemoveLoRA,
    Shutdown,
    run_engine_core_process,
)
from tokenmill.engine.core.llm_engine import EngineStats
from tokenmill.engine.limits import InvalidRequestError
from tokenmill.engine.log_setup import LogSettings
from tokenmill.engine.sampling.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class CoreClient(EngineClient):
    """An EngineClient over an EngineCore; subclasses supply the transport (see the module docstring)."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, tokenizer: Any, max_model_len: int,
                 stats: EngineStats):
        super().__init__(config, model_config, tokenizer, max_model_len)
        self._lock = threading.Lock()
        self._started = False
        self._stopping = False
        self._dead: EngineDeadError | None = None
        self._stats = stats
        # Adds the core has not answered yet; then requests it holds, by id (receiving thread only).
        self._pending: dict[str, tuple[concurrent.futures.Future, RequestStream]] = {}
        self._routes: dict[str, RequestStream] = {}
        self._lora_pending: dict[int, concurrent.futures.Future] = {}  # LoRA commands by op id, under _lock
        self._op_ids = itertools.count()

    # ---- the transport ---------------------------------------------------------------------

    @abstractmethod
    def _start_transport(self) -> None:
        """Start delivering the core's messages."""

    @abstractmethod
    def _send(self, command: Command) -> None:
        """Hand a command to the core; never blocks for long, and never raises (a dead core is reported
        by the receiving side)."""

    @abstractmethod
    def _stop_transport(self, timeout: float | None) -> None:
        """After Shutdown was sent: wait for the core and the receiving thread to end."""

    # ---- EngineClient ----------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._started and not self._stopping and self._dead is None

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead

    @property
    def stats(self) -> EngineStats:
        return self._stats

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._start_transport()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the core; requests still in flight end with EngineStoppedError."""
        with self._lock:
            stopping, self._stopping = self._stopping, True
        if stopping:
            return
        self._send(Shutdown())
        self._stop_transport(timeout)
        self._fail_all(self._dead or EngineStoppedError("the server is shutting down"))
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _in_use(self, request_id: str) -> bool:
        # An aborted request keeps its id until the core confirms the abort, so that its late deltas
        # cannot reach a new request of the same id.
        return super()._in_use(request_id) or request_id in self._pending or request_id in self._routes

    def _submit_add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float, stream: RequestStream, lora_name: str | None) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._stopping or self._dead is not None:  # nobody would answer: answer here
                future.set_exception(self._dead or EngineStoppedError("the server is shutting down"))
                return future
            self._pending[request_id] = (future, stream)
        self._send(AddRequest(request_id, prompt_token_ids, params, arrival_time, lora_name))
        return future

    def _submit_add_lora(self, name: str, path: str) -> concurrent.futures.Future:
        return self._submit_lora(lambda op_id: AddLoRA(op_id, name, path))

    def _submit_remove_lora(self, name: str) -> concurrent.futures.Future:
        return self._submit_lora(lambda op_id: RemoveLoRA(op_id, name))

    def _submit_lora(self, command: Callable[[int], AddLoRA | RemoveLoRA]) -> concurrent.futures.Future:
        """Send command(op id); the core's round that applies it answers the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._stopping or self._dead is not None:
                future.set_exception(self._dead or EngineStoppedError("the server is shutting down"))
                return future
            op_id = next(self._op_ids)
            self._lora_pending[op_id] = future
        self._send(command(op_id))
        return future

    def _submit_abort(self, request_ids: list[str]) -> None:
        if not (self._stopping or self._dead is not None):
            self._send(AbortRequests(request_ids))

    # ---- the receiving thread --------------------------------------------------------------

    def _on_outputs(self, out: CoreOutputs) -> None:
        self._stats = out.stats
        for request_id, refusal in out.added:
            with self._lock:
                entry = self._pending.pop(request_id, None)
            if entry is None:  # failed already (the engine died or stopped)
                continue
            future, stream = entry
            if refusal is None:
                self._routes[request_id] = stream
            if future.set_running_or_notify_cancel():  # else the caller gave up; its abort follows
                if refusal is None:
                    future.set_result(None)
                else:
                    future.set_exception(InvalidRequestError(refusal))
        for op_id, info, refusal in out.lora_ops:
            with self._lock:
                future = self._lora_pending.pop(op_id, None)
            if future is not None and future.set_running_or_notify_cancel():
                if refusal is None:
                    future.set_result(info)
                else:
                    future.set_exception(ValueError(refusal))
        for request_id in out.aborted:
            self._routes.pop(request_id, None)
        for delta in out.outputs:
            stream = self._routes.get(delta.request_id)
            if stream is None:
                continue
            if delta.finished:
                del self._routes[delta.request_id]
            delta.prompt_token_ids = stream.prompt_token_ids
            stream.put(delta)

    def _die(self, cause: str, traceback: str = "") -> None:
        """The core is gone: every pending and open request gets EngineDeadError, then on_dead runs."""
        dead = EngineDeadError(f"the engine died ({cause}); the server must restart")
        with self._lock:
            if self._dead is not None:
                return
            self._dead = dead
        logger.critical("the engine died: %s%s", cause, "\n" + traceback if traceback else "")
        self._fail_all(dead)
        for callback in self._on_dead:
            try:
                callback(dead)
            except Exception:
                logger.exception("an on_dead callback failed")

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            lora_pending, self._lora_pending = self._lora_pending, {}
        for future in lora_pending.values():
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        for future, stream in pending.values():
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
            stream.put(error)
        routes, self._routes = self._routes, {}
        for stream in list(routes.values()):  # a core thread that outlived shutdown's timeout may still route
            stream.put(error)


class EngineStartupError(RuntimeError):
    """The engine process could not load the model; the message says why."""


class MPEngineClient(CoreClient):
    """EngineCore in a process of its own (spawned, not forked: torch and threads): the model lives only
    there, and its steps never compete with this process's HTTP work for one GIL.

    The constructor returns once the model is loaded (raising EngineStartupError with the engine's own
    message if it fails), with the engine's tokenizer, which runs here. One pipe carries commands and
    CoreOutputs; a thread here reads it. The engine process dies with this one: the kernel kills it
    (PR_SET_PDEATHSIG, tied to the creating thread: create the client on one that lives as long as the
    server), and it also stops when its end of the pipe reads EOF. If it dies (a fault, a kill), the pipe
    reads EOF here: the engine is dead, loudly.
    """

    def __init__(self, config: EngineConfig):
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=run_engine_core_process, name="tokenmill-engine", daemon=True,
            args=(config, child_conn, os.getpid(), LogSettings.current()))
        began = time.monotonic()
        self.process.start()
        child_conn.close()  # else our own copy would keep the pipe open when the engine dies
        logger.info("engine process %d started; loading %s", self.process.pid, config.resolved_model())
        ready = self._wait_ready()
        super().__init__(config, ready.model_config, ready.tokenizer, ready.max_model_len, ready.stats)
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        logger.info("engine ready in %.1f s", time.monotonic() - began)

    def _wait_ready(self) -> CoreReady:
        try:
            message = self._conn.recv()
        except EOFError:
            self._kill()
            raise EngineStartupError(f"the engine process {self._exit_status()} while loading the model "
                                     "(see the log above)") from None
        if isinstance(message, CoreFailed):
            logger.error("the engine failed to start:\n%s", message.traceback)
            self._kill()
            raise EngineStartupError(message.reason)
        return message

    def _start_transport(self) -> None:
        self._reader = threading.Thread(target=self._receive, name="tokenmill-engine-outputs", daemon=True)
        self._reader.start()

    def _send(self, command: Command) -> None:
        with self._send_lock:  # one message at a time on the pipe, from whichever event loop
            try:
                self._conn.send(command)
            except OSError:
                pass  # the process is gone: the reader reports it

    def _stop_transport(self, timeout: float | None) -> None:
        self.process.join(timeout)
        self._kill()
        if self._reader is not None:
            self._reader.join(5)
        self._conn.close()

    def _receive(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                if isinstance(message, CoreFailed):
                    self._die(message.reason, message.traceback)
                    return
                self._on_outputs(message)
        except (EOFError, OSError):
            if not self._stopping:
                self.process.join(5)
                self._die(f"its process {self._exit_status()}")
        except BaseException as e:  # noqa: B036 - a bug on this side: the streams must still hear of it
            self._die(f"{type(e).__name__}: {e} (in the server's reader of engine outputs)")

    def _kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)

    def _exit_status(self) -> str:
        code = self.process.exitcode
        if code is None:
            return "closed its pipe"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"
