"""AsyncLLMEngine: the engine on a background thread of the server's process, behind EngineClient.

LLMEngine is not thread-safe, so one thread owns it outright and only runs steps: the event loop never
touches it, and tokenization happens on the client's pool before a request reaches it. Callers hand
it commands (add, abort) through a list that the thread drains between steps; output deltas travel
back through each request's RequestStream. While nothing is unfinished, the thread sleeps.

If anything on that thread fails outside the engine's per-request guards (a step, an abort), the
engine is dead: every pending and later request gets EngineDeadError, is_running turns False, and the
on_dead callbacks run (the server uses one to exit non-zero, so a supervisor restarts it).
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import dataclass

from .config import EngineConfig
from .engine_client import EngineClient, EngineDeadError, EngineStoppedError, RequestStream
from .llm_engine import EngineStats, LLMEngine
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    stream: RequestStream
    result: concurrent.futures.Future


@dataclass
class _Abort:
    request_ids: list[str]


class AsyncLLMEngine(EngineClient):
    """Runs LLMEngine's step loop on a background thread and streams each request's output deltas."""

    def __init__(self, engine: LLMEngine):
        super().__init__(engine.config, engine.model_config, engine.get_tokenizer(), engine.max_model_len)
        self.engine = engine
        self._commands: list[_Add | _Abort] = []
        self._wakeup = threading.Condition()
        self._stopping = False
        self._dead: EngineDeadError | None = None
        self._streams: dict[str, RequestStream] = {}  # touched only by the engine thread
        self._thread: threading.Thread | None = None
        self._stats: EngineStats = engine.stats()  # a snapshot, refreshed by the engine thread

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLMEngine:
        return cls(LLMEngine(config))

    # ---- the caller's side -----------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead

    @property
    def stats(self) -> EngineStats:
        return self._stats

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Abort whatever is still in flight and stop the thread."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _submit_add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float, stream: RequestStream) -> concurrent.futures.Future:
        result: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(_Add(request_id, prompt_token_ids, params, arrival_time, stream, result))
        return result

    def _submit_abort(self, request_ids: list[str]) -> None:
        self._submit(_Abort(request_ids))

    def _submit(self, command: _Add | _Abort) -> None:
        with self._wakeup:
            if self._stopping:  # the thread may be gone: answer here, or the caller would wait forever
                if isinstance(command, _Add):
                    command.result.set_exception(self._dead or EngineStoppedError("the server is shutting down"))
                return
            self._commands.append(command)
            self._wakeup.notify()

    # ---- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: B036 - whatever ends the loop, the engine must die loudly
            self._die(e)

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not (self._commands or self._stopping or self.engine.has_unfinished_requests()):
                    self._wakeup.wait()
                commands, self._commands = self._commands, []
                stopping = self._stopping
            for i, command in enumerate(commands):
                try:
                    self._apply(command)
                except BaseException:
                    with self._wakeup:  # the engine dies: the commands not yet applied must hear of it
                        self._commands[:0] = commands[i + 1:]
                    raise
            if stopping:
                self._fail_all(EngineStoppedError("the server is shutting down"))
                self._stats = self.engine.stats()
                return
            if self.engine.has_unfinished_requests():
                self._step()
            self._stats = self.engine.stats()

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self.engine.abort_request(command.request_ids)
            for rid in command.request_ids:
                self._streams.pop(rid, None)
            return
        if not command.result.set_running_or_notify_cancel():
            return  # the caller gave up waiting; its abort is queued behind this add
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params,
                                    command.arrival_time)
        except Exception as e:  # this request's own problem (the client checked it already)
            command.result.set_exception(e)
            return
        self._streams[command.request_id] = command.stream
        command.result.set_result(None)

    def _step(self) -> None:
        outputs = self.engine.step()
        # Refresh the snapshot first, so a client that has seen a token sees it in the metrics too.
        self._stats = self.engine.stats()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted since it was scheduled
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _die(self, cause: BaseException) -> None:
        logger.critical("the engine died: %s: %s", type(cause).__name__, cause, exc_info=cause)
        dead = EngineDeadError(f"the engine died ({type(cause).__name__}: {cause}); the server must restart")
        with self._wakeup:
            self._dead, self._stopping = dead, True
            commands, self._commands = self._commands, []
        for command in commands:
            if isinstance(command, _Add):
                if command.result.set_running_or_notify_cancel():
                    command.result.set_exception(dead)
                command.stream.put(dead)
        for stream in self._streams.values():
            stream.put(dead)
        self._streams.clear()
        for callback in self._on_dead:
            try:
                callback(dead)
            except Exception:
                logger.exception("an on_dead callback failed")

    def _fail_all(self, error: BaseException) -> None:
        self.engine.abort_request(list(self._streams))
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()
