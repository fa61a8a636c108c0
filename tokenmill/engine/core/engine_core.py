"""EngineCore: LLMEngine's step loop, fed by a queue of commands, answering with one message per round.

A round applies every command that came in (add, abort, load or unload a LoRA adapter, shutdown), runs
one step if any request is unfinished, and emits one CoreOutputs: the adds it took or refused, the
aborts it applied, the adapters it loaded, unloaded or refused, the step's output deltas and a stats
snapshot. The same loop runs on a thread of the server (AsyncLLMEngine) or in a process of its own
(run_engine_core_process, driven by MPEngineClient: the server's default), so a client sees the same
messages in the same order either way; only the transport differs.

Deltas travel without their prompt's token ids (the client has them), so a message costs O(batch), not
O(context).
"""
from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from tokenmill.engine.config import EngineConfig, ModelConfig
from tokenmill.engine.core.lifetime import die_with_parent, set_process_name
from tokenmill.engine.core.llm_engine import EngineStats, LLMEngine
from tokenmill.engine.log_setup import LogSettings
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.sampling.sampling_params import SamplingParams
from tokenmill.engine.sampling.structured_output import compile_timeout_error
from tokenmill.engine.weights.lora import LoRAInfo

logger = logging.getLogger(__name__)


# ---- client -> core --------------------------------------------------------------------------

@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    lora_name: str | None = None


@dataclass
class AbortRequests:
    request_ids: list[str]


@dataclass
class AddLoRA:
    op_id: int  # names the answer in CoreOutputs.lora_ops
    name: str
    path: str


@dataclass
class RemoveLoRA:
    op_id: int
    name: str


@dataclass
class Shutdown:
    """Stop after the commands before this one; requests still in flight are left to the client to fail."""


Command = AddRequest | AbortRequests | AddLoRA | RemoveLoRA | Shutdown


# ---- core -> client --------------------------------------------------------------------------

@dataclass
class CoreOutputs:
    """One round's results, in command order within each list (an add that waited for its constraint to
    compile is answered in the round its compile ended)."""

    stats: EngineStats
    added: list[tuple[str, str | None]] = field(default_factory=list)  # (request id, why refused or None)
    aborted: list[str] = field(default_factory=list)
    outputs: list[RequestOutput] = field(default_factory=list)  # deltas, prompt_token_ids left empty
    # (op id, the LoRAInfo an AddLoRA loaded or None for a RemoveLoRA, why it was refused or None)
    lora_ops: list[tuple[int, LoRAInfo | None, str | None]] = field(default_factory=list)


@dataclass
class CoreReady:
    """The engine process loaded its model: what the client needs to check and tokenize requests on its
    side. The tokenizer travels pickled (a second build from a GGUF file would take seconds of CPU)."""

    model_config: ModelConfig
    tokenizer: Any
    max_model_len: int
    stats: EngineStats


@dataclass
class CoreFailed:
    """The engine process cannot go on (or could not start); it exits after sending this."""

    reason: str  # "TypeName: message"
    traceback: str

    @classmethod
    def of(cls, error: BaseException) -> CoreFailed:
        return cls(f"{type(error).__name__}: {error}", "".join(traceback.format_exception(error)))


class _GrammarCompiled:
    """Wakes an idle core when a constraint it waits for has compiled (put by the compile's callback)."""


class EngineCore:
    """Runs rounds until a Shutdown command (see the module docstring). Anything that raises out of run()
    is a fault of the engine itself; one request's failure is handled inside LLMEngine.

    An add with a structured-output constraint waits, out of the engine, while its constraint compiles on the
    compiler's threads; the round after it compiled adds it (or refuses it: invalid, or not compiled within
    limits.max_constraint_compile_s). Other requests step on meanwhile."""

    def __init__(self, engine: LLMEngine, commands: queue.SimpleQueue, emit: Callable[[CoreOutputs], None]):
        self.engine = engine
        self.commands = commands
        self.emit = emit
        # Adds whose constraint is compiling, by request id: (the command, its compile, its deadline).
        self.compiling: dict[str, tuple[AddRequest, Future, float]] = {}

    def run(self) -> None:
        engine = self.engine
        while True:
            # Idle, wait for a command (or a compile); busy, take whatever came in during the last step.
            commands = [] if engine.has_unfinished_requests() else self._wait()
            while not self.commands.empty():
                commands.append(self.commands.get_nowait())
            added: list[tuple[str, str | None]] = []
            aborted: list[str] = []
            lora_ops: list[tuple[int, LoRAInfo | None, str | None]] = []
            for command in commands:
                if isinstance(command, Shutdown):
                    return
                if isinstance(command, AbortRequests):
                    engine.abort_request(command.request_ids)
                    aborted += command.request_ids
                    added += [(rid, f"request {rid} was aborted while its constraint compiled")
                              for rid in command.request_ids if self.compiling.pop(rid, None)]
                elif isinstance(command, (AddLoRA, RemoveLoRA)):
                    lora_ops.append(self._lora_op(command))
                elif isinstance(command, AddRequest):
                    if command.params.structured_outputs is None or not self._compile(command):
                        added.append((command.request_id, self._add(command)))
            added += self._compiled()
            outputs = engine.step() if engine.has_unfinished_requests() else []
            for delta in outputs:
                delta.prompt_token_ids = []
            # Stats after the step, so a client that has seen a token sees it counted in the metrics too.
            self.emit(CoreOutputs(engine.stats(), added, aborted, outputs, lora_ops))

    def _wait(self) -> list[Command]:
        """Block for the next command; while constraints compile, no longer than the first one's deadline."""
        if not self.compiling:
            return [self.commands.get()]
        deadline = min(d for _, _, d in self.compiling.values())
        try:
            return [self.commands.get(timeout=max(0.0, deadline - time.monotonic()))]
        except queue.Empty:
            return []

    def _compile(self, command: AddRequest) -> bool:
        """Start compiling the add's constraint; False if nothing is left to wait for (compiled already, or
        refused at once): the add then goes ahead in command order."""
        try:
            future = self.engine.compile_grammar(command.params)
        except ValueError:
            return False
        if future.done():
            return False
        bound = self.engine.config.limits.max_constraint_compile_s
        self.compiling[command.request_id] = (command, future, time.monotonic() + bound)
        future.add_done_callback(lambda _: self.commands.put(_GrammarCompiled()))
        return True

    def _compiled(self) -> list[tuple[str, str | None]]:
        """Add the requests whose constraint compiled, refuse those past their deadline; (id, refusal)."""
        now, added = time.monotonic(), []
        for rid, (command, future, deadline) in list(self.compiling.items()):
            if future.done():
                added.append((rid, self._add(command)))  # compiled: add_request takes it from the cache
            elif now >= deadline:
                added.append((rid, str(compile_timeout_error(self.engine.config.limits.max_constraint_compile_s))))
            else:
                continue
            del self.compiling[rid]
        return added

    def _add(self, command: AddRequest) -> str | None:
        """Add the request; None, or why it was refused (its own problem: the client checked it already)."""
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params,
                                    command.arrival_time, command.lora_name)
        except ValueError as e:
            return str(e)
        return None

    def _lora_op(self, command: AddLoRA | RemoveLoRA) -> tuple[int, LoRAInfo | None, str | None]:
        """Load or unload an adapter between steps; a bad adapter is refused (ValueError), not a fault."""
        try:
            if isinstance(command, RemoveLoRA):
                self.engine.remove_lora(command.name)
                return command.op_id, None, None
            lora_id = self.engine.add_lora(command.name, command.path)
        except ValueError as e:
            return command.op_id, None, str(e)
        info = next(i for i in self.engine.list_loras() if i.id == lora_id)
        return command.op_id, info, None


# ---- the engine process ----------------------------------------------------------------------

def run_engine_core_process(config: EngineConfig, conn: Connection, parent_pid: int, log: LogSettings) -> None:
    """The engine process's main: load the model, send CoreReady (or CoreFailed and exit 1), then serve
    rounds over `conn` until Shutdown, the server's death, or a fault (CoreFailed, exit 1)."""
    die_with_parent(parent_pid)
    set_process_name("tokenmill-engine")
    # Ctrl-C and a supervisor's SIGTERM reach the whole process group: the server decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log.configure("engine")
    try:
        engine = LLMEngine(config)  # sets torch's threads: config.num_threads, else torch's default (all cores)
    except Exception as e:
        conn.send(CoreFailed.of(e))
        sys.exit(1)
    conn.send(CoreReady(engine.model_config, engine.get_tokenizer(), engine.max_model_len, engine.stats()))
    commands: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_receive_commands, args=(conn, commands), name="tokenmill-commands", daemon=True).start()
    try:
        EngineCore(engine, commands, conn.send).run()
    except BaseException as e:  # noqa: B036 - whatever ends the loop, the server must hear why
        try:
            conn.send(CoreFailed.of(e))
        except OSError:
            pass  # the server is gone too
        sys.exit(1)


def _receive_commands(conn: Connection, commands: queue.SimpleQueue) -> None:
    """Read commands as they come, even during a step, so the server's sends never wait on one; EOF
    means the server's process is gone, and then so are we (after the step in progress)."""
    try:
        while True:
            commands.put(conn.recv())
    except (EOFError, OSError):
        commands.put(Shutdown())
