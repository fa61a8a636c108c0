"""AsyncLLMEngine: the server's async front over LLMEngine.

LLMEngine is not thread-safe, so it lives on one background thread that owns it outright: the event
loop never touches it. Callers hand it commands (add, abort) through a queue that the thread drains
between steps; an add answers through a future, so a bad request raises ValueError in the caller
before the response starts. Outputs travel back through one asyncio.Queue per request. While no
request is unfinished, the thread sleeps on a condition variable.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .config import EngineConfig
from .llm_engine import EngineStats, LLMEngine, PromptType
from .outputs import RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """Too many requests wait for a batch slot; the caller should retry later."""


class EngineStoppedError(RuntimeError):
    """The engine shut down (or its thread died) before the request finished."""


@dataclass
class _Add:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    arrival_time: float
    stream: RequestStream
    result: concurrent.futures.Future


@dataclass
class _Abort:
    request_ids: list[str]


class RequestStream:
    """The outputs of one request as they arrive; iterate it with `async for`.

    Outputs are cumulative, so when several are queued only the newest matters. Leaving the
    iteration early (break, cancellation, client disconnect) aborts the request and frees its blocks.
    """

    def __init__(self, request_id: str, engine: AsyncLLMEngine):
        self.request_id = request_id
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._queue.get()
                while not self._queue.empty() and not isinstance(item, BaseException):
                    item = self._queue.get_nowait()
                if isinstance(item, BaseException):
                    self.finished = True  # the engine already dropped this request
                    raise item
                self.finished = item.finished
                yield item
        finally:
            if not self.finished:
                self._engine.abort(self.request_id)


class AsyncLLMEngine:
    """Runs LLMEngine's step loop on a background thread and streams each request's outputs."""

    def __init__(self, engine: LLMEngine, max_queue_len: int | None = None):
        self.engine = engine
        self.max_queue_len = max_queue_len
        self._commands: list[_Add | _Abort] = []
        self._wakeup = threading.Condition()
        self._stopping = False
        self._streams: dict[str, RequestStream] = {}  # touched only by the engine thread
        self._thread: threading.Thread | None = None
        self.stats: EngineStats = engine.stats()  # a snapshot, refreshed by the engine thread

    @classmethod
    def from_config(cls, config: EngineConfig, max_queue_len: int | None = None) -> AsyncLLMEngine:
        return cls(LLMEngine(config), max_queue_len)

    # ---- the caller's side (event loop) ----------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

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

    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                          arrival_time: float | None = None) -> RequestStream:
        """Queue a request; raises ValueError for a bad one, EngineOverloadedError over the queue limit."""
        stream = RequestStream(request_id, self)
        result: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(_Add(request_id, prompt, params, arrival_time or time.time(), stream, result))
        try:
            await asyncio.wrap_future(result)
        except asyncio.CancelledError:
            self.abort(request_id)  # queued after the add, so it cannot miss it
            raise
        return stream

    async def generate(self, request_id: str, prompt: PromptType, params: SamplingParams,
                       arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its cumulative outputs until it finishes."""
        stream = await self.add_request(request_id, prompt, params, arrival_time)
        async for out in stream:
            yield out

    def abort(self, request_id: str | list[str]) -> None:
        self._submit(_Abort([request_id] if isinstance(request_id, str) else list(request_id)))

    def _submit(self, command: _Add | _Abort) -> None:
        with self._wakeup:
            if self._stopping:  # the thread may be gone: answer here, or the caller would wait forever
                if isinstance(command, _Add):
                    command.result.set_exception(EngineStoppedError("the server is shutting down"))
                return
            self._commands.append(command)
            self._wakeup.notify()

    # ---- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not (self._commands or self._stopping or self.engine.has_unfinished_requests()):
                    self._wakeup.wait()
                commands, self._commands = self._commands, []
                stopping = self._stopping
            for command in commands:
                self._apply(command)
            if stopping:
                self._fail_all(EngineStoppedError("the server is shutting down"))
                self.stats = self.engine.stats()
                return
            if self.engine.has_unfinished_requests():
                self._step()
            self.stats = self.engine.stats()

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self.engine.abort_request(command.request_ids)
            for rid in command.request_ids:
                self._streams.pop(rid, None)
            return
        limit = self.max_queue_len
        # Requests beyond the batch's slots wait; the limit bounds that wait.
        if limit is not None and self.engine.get_num_unfinished_requests() >= self.engine.config.max_num_seqs + limit:
            command.result.set_exception(EngineOverloadedError(
                f"the server is overloaded: {limit} requests already wait for a batch slot "
                f"(--max-queue-len {limit}); retry later"))
            return
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params, command.arrival_time)
        except Exception as e:  # ValueError is the caller's mistake; anything else, a bug to report
            command.result.set_exception(e)
            return
        self._streams[command.request_id] = command.stream
        command.result.set_result(None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug: fail the batch it hit, keep serving the next requests
            logger.exception("engine step failed; aborting %d requests", len(self._streams))
            self._fail_all(e)
            return
        # Refresh the snapshot first, so a client that has seen a token sees it in the metrics too.
        self.stats = self.engine.stats()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted since it was scheduled
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_all(self, error: BaseException) -> None:
        self.engine.abort_request(list(self._streams))
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()
