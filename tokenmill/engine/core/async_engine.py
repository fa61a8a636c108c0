"""AsyncLLMEngine: the EngineCore on a background thread of this process, behind EngineClient.

The thread transport of CoreClient (core_client.py): commands go into a queue the core thread drains
between steps, and each round's CoreOutputs is handed to the client on that same thread. LLMEngine is
not thread-safe, so the core thread owns it outright. `tokenmill serve --engine-in-process` uses it,
and so do tests that look inside the engine; the server's default runs the core in a process of its
own (MPEngineClient), where its steps do not compete with HTTP work for the GIL.
"""
from __future__ import annotations

import queue
import threading
import traceback

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.core.core_client import CoreClient
from tokenmill.engine.core.engine_core import Command, EngineCore
from tokenmill.engine.core.llm_engine import LLMEngine


class AsyncLLMEngine(CoreClient):
    """Runs LLMEngine's step loop (an EngineCore) on a background thread; `engine` is the LLMEngine."""

    def __init__(self, engine: LLMEngine):
        super().__init__(engine.config, engine.model_config, engine.get_tokenizer(), engine.max_model_len,
                         engine.stats())
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._core = EngineCore(engine, self._commands, self._on_outputs)
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLMEngine:
        return cls(LLMEngine(config))

    def _start_transport(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()

    def _send(self, command: Command) -> None:
        self._commands.put(command)

    def _stop_transport(self, timeout: float | None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self.engine.shutdown()  # its tensor-parallel workers, if any: now, not when it is collected

    def _run(self) -> None:
        try:
            self._core.run()
        except BaseException as e:  # noqa: B036 - whatever ends the loop, the engine must die loudly
            self._die(f"{type(e).__name__}: {e}", "".join(traceback.format_exception(e)))
