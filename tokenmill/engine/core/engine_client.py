"""The engine-client interface: what the server (or any front end) may ask of an engine.

Five things: add a request and get a stream of its output deltas, abort requests, load and unload LoRA
adapters, ask whether the engine is dead, and read its stats. Everything a client controls is checked on
the client's side (limits, prompt length, queue space) before the engine spends anything on it, and
tokenization and chat templates run on the client's worker pool, never on the engine's step loop.
CoreClient (core_client.py) implements it over an EngineCore: in a process of its own (MPEngineClient,
the server's default) or on a thread of this one (AsyncLLMEngine); only the transport differs.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Any

from tokenmill.engine.config import EngineConfig, ModelConfig
from tokenmill.engine.core.llm_engine import EngineStats, PromptType
from tokenmill.engine.limits import InvalidRequestError, RequestLimits, check_prompt, truncate_prompt
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.sampling.sampling_params import SamplingParams
from tokenmill.engine.weights.lora import LoRAInfo


class EngineDeadError(RuntimeError):
    """The engine cannot go on (its step failed, or its loop ended): every request gets this."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down; the request was not, or will not be, finished."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class RequestFailedError(RuntimeError):
    """This request alone failed inside the engine (its message names it); other requests went on."""


class RequestStream:
    """The output deltas of one request; iterate it with `async for`.

    Deltas that queue up while the reader is busy are merged into one. Leaving the iteration early
    (break, cancellation, client disconnect) aborts the request and frees its blocks.
    """

    def __init__(self, request_id: str, num_seqs: int, client: EngineClient, prompt_token_ids: list[int]):
        self.request_id = request_id
        self.num_seqs = num_seqs
        self.prompt_token_ids = prompt_token_ids  # the engine's deltas leave them out
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False  # no more items will come (the final one may still be queued)

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called from any thread: hand the next delta, or the error that ends the request."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _deliver(self, item: RequestOutput | BaseException) -> None:
        if self.finished:
            return
        self._queue.put_nowait(item)
        if isinstance(item, BaseException) or item.finished:
            self._end()

    def _end(self) -> None:
        if not self.finished:
            self.finished = True
            self._client._release(self)

    def abort(self) -> None:
        """Stop the request (no-op once it ended); a reader still iterating gets RequestFailedError."""
        if not self.finished:
            self._client.abort(self.request_id)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        done = False
        try:
            while not done:
                item = await self._queue.get()
                while not self._queue.empty() and not isinstance(item, BaseException):
                    later = self._queue.get_nowait()
                    if isinstance(later, BaseException):
                        self._queue.put_nowait(later)  # the error comes after this delta
                        break
                    item.add(later)
                if isinstance(item, BaseException):
                    raise item.with_traceback(None)  # one error may reach many streams: keep no frames
                done = item.finished
                if item.error is not None:
                    raise RequestFailedError(item.error)
                yield item
        finally:
            if not done:
                self.abort()


class EngineClient(ABC):
    """A front end's handle on one engine (see the module docstring)."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, tokenizer: Any, max_model_len: int):
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.limits: RequestLimits = config.limits
        # Sequences added and not yet finished, as seen by the client: what the queue bound counts.
        self._num_seqs = 0
        self._live: dict[str, RequestStream] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenmill-tokenize")
        self._on_dead: list[Callable[[EngineDeadError], None]] = []
        self._loras: dict[str, LoRAInfo] = {}  # the engine's adapters, as its answers to add_lora told

    # ---- what a front end calls ------------------------------------------------------------

    @abstractmethod
    def start(self) -> None:
        """Start serving (the engine loop, wherever it runs)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop: requests still in flight end with EngineStoppedError."""

    @property
    @abstractmethod
    def is_running(self) -> bool:
        """Accepting and serving requests (False once shut down or dead)."""

    @property
    @abstractmethod
    def dead_error(self) -> EngineDeadError | None:
        """Why the engine died, or None while it lives."""

    @property
    @abstractmethod
    def stats(self) -> EngineStats:
        """The latest snapshot, for /metrics."""

    @abstractmethod
    def _submit_add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float, stream: RequestStream, lora_name: str | None) -> concurrent.futures.Future:
        """Hand the request to the engine; the future resolves once the engine holds it."""

    @abstractmethod
    def _submit_add_lora(self, name: str, path: str) -> concurrent.futures.Future:
        """Have the engine load an adapter; the future resolves to its LoRAInfo, or ValueError."""

    @abstractmethod
    def _submit_remove_lora(self, name: str) -> concurrent.futures.Future:
        """Have the engine unload an adapter; the future resolves to None, or ValueError."""

    @abstractmethod
    def _submit_abort(self, request_ids: list[str]) -> None:
        """Tell the engine to drop these requests and free their blocks."""

    def on_dead(self, callback: Callable[[EngineDeadError], None]) -> None:
        """Call callback (from the engine's side) if the engine dies."""
        self._on_dead.append(callback)

    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                          arrival_time: float | None = None, param: str = "prompt",
                          lora_name: str | None = None) -> RequestStream:
        """Check and queue a request, run with the loaded LoRA adapter lora_name (None: the base model).
        Raises InvalidRequestError (a ValueError) for a bad one, naming `param` when the prompt is at fault
        and "lora_name" for an adapter not loaded; EngineOverloadedError over the queue bound;
        EngineDeadError or EngineStoppedError when the engine is gone."""
        self._check_alive()
        if self._in_use(request_id):
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        if lora_name is not None and lora_name not in self._loras:
            raise InvalidRequestError(f"unknown LoRA adapter {lora_name!r}; loaded: "
                                      f"{', '.join(sorted(self._loras)) or 'none'}", "lora_name")
        arrival_time = arrival_time or time.time()
        self.limits.check_params(params)
        ids = truncate_prompt(await self.prompt_token_ids(prompt, param), params, self.max_model_len)
        check_prompt(ids, params, self.model_config.vocab_size, self.max_model_len, param)
        capacity = self.capacity
        if capacity is not None and self._num_seqs + params.n > capacity:
            raise EngineOverloadedError(
                f"the server is overloaded: {self._num_seqs} sequences are in flight and at most {capacity} "
                f"may be (--max-num-seqs {self.config.max_num_seqs} + --max-queue-len "
                f"{self.limits.max_waiting_seqs}); retry later", retry_after=1)
        self._check_alive()
        if self._in_use(request_id):  # taken while this one was tokenized
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        stream = RequestStream(request_id, params.n, self, ids)
        self._num_seqs += params.n
        self._live[request_id] = stream
        added = self._submit_add(request_id, ids, params, arrival_time, stream, lora_name)
        try:
            await asyncio.wrap_future(added)
        except BaseException:
            self.abort(request_id)  # queued after the add, so the engine cannot miss it
            raise
        return stream

    async def generate(self, request_id: str, prompt: PromptType, params: SamplingParams,
                       arrival_time: float | None = None, lora_name: str | None = None) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its output deltas until it finishes."""
        stream = await self.add_request(request_id, prompt, params, arrival_time, lora_name=lora_name)
        async for out in stream:
            yield out

    async def add_lora(self, name: str, path: str) -> int:
        """Load the PEFT LoRA adapter folder at path (read by the engine, wherever it runs) under name, for
        requests to name; returns its id. ValueError if the engine refuses it (LoRA off, name taken, no
        free slot, not an adapter of this model: the message says which)."""
        self._check_alive()
        info = await asyncio.wrap_future(self._submit_add_lora(name, path))
        self._loras[name] = info
        return info.id

    async def remove_lora(self, name: str) -> None:
        """Unload an adapter. ValueError if it is not loaded, or while requests that run it are in flight:
        stop sending it requests, wait for (or abort) those in flight, then remove it."""
        self._check_alive()
        await asyncio.wrap_future(self._submit_remove_lora(name))
        self._loras.pop(name, None)

    def list_loras(self) -> list[LoRAInfo]:
        """The loaded adapters, oldest first."""
        return sorted(self._loras.values(), key=lambda info: info.id)

    def abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            stream = self._live.get(rid)
            if stream is not None:
                stream._deliver(RequestFailedError(f"request {rid} was aborted"))
        self._submit_abort(ids)

    @property
    def capacity(self) -> int | None:
        """Most sequences this client lets be in flight at once; None where the engines behind it bound
        their own queues (replicas on Ray Serve)."""
        return self.config.max_num_seqs + self.limits.max_waiting_seqs

    @property
    def num_requests(self) -> int:
        """Requests added whose streams have not ended."""
        return len(self._live)

    def _in_use(self, request_id: str) -> bool:
        """The id belongs to a request that has not ended (for the engine too, where a client knows more)."""
        return request_id in self._live

    def _release(self, stream: RequestStream) -> None:
        if self._live.get(stream.request_id) is stream:
            del self._live[stream.request_id]
            self._num_seqs -= stream.num_seqs

    def _check_alive(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(str(self.dead_error))
        if not self.is_running:
            raise EngineStoppedError("the server is shutting down")

    # ---- tokenization, on the worker pool --------------------------------------------------

    async def _in_pool(self, fn: Callable, *args, **kwargs) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        self.limits.check_prompt_text(text, param)
        return await self._in_pool(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def prompt_token_ids(self, prompt: PromptType, param: str = "prompt") -> list[int]:
        """Token ids of a string, a list of ids, or a vLLM-style dict prompt."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            return await self.encode(prompt, param=param)
        return list(prompt)

    async def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = True,
                                  tools: list[dict] | None = None) -> list[int]:
        """The conversation (and the tools offered, for a template that renders them) through the model's
        chat template, as token ids. Raises InvalidRequestError if the model has no template or the
        template rejects the conversation."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use /v1/completions", "messages")
        text = "".join(m.get("content") or "" for m in conversation)
        self.limits.check_prompt_text(text + (json.dumps(tools, ensure_ascii=False) if tools else ""), "messages")
        try:
            return list(await self._in_pool(self.tokenizer.apply_chat_template, conversation, tools=tools,
                                            add_generation_prompt=add_generation_prompt, tokenize=True,
                                            return_dict=False))
        except Exception as e:  # the template itself rejects the conversation (jinja2 raise_exception)
            raise InvalidRequestError(f"messages: the chat template rejected them: {e}", "messages") from None

    async def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return await self._in_pool(self.tokenizer.decode, token_ids, skip_special_tokens=skip_special_tokens)
