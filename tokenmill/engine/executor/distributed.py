"""Tensor parallelism's processes: a worker per rank beyond the first, the process group, and each step's
inputs sent to every rank.

Rank 0 is the engine's own ModelRunner: the scheduler, the block manager and the sampler stay there.
Each step it sends the packed inputs (StepInputs) to the other ranks, and every rank runs the same
forward, meeting in the collectives of the layers (the all-reduces after o, down and the embedding, the
logits' all-gather): NCCL on CUDA; on CPU through shared memory (engine/executor/shm_collectives.py), with
torch.distributed's gloo group for start-up and for tensors too large for its slots. Only rank 0 samples.

The inputs go down one pipe per worker rather than through a broadcast: a worker waits for the next step
for as long as the engine is idle, where a collective would time out, and a pipe reads EOF the moment the
engine's process is gone. A worker dies with the engine (PR_SET_PDEATHSIG, and that EOF). A dead worker is
an error on rank 0: before a step by its exit status; within one because a shared-memory collective
checks its peers while it waits, gloo sees the peer's connection close, or the wait times out after
COLLECTIVE_TIMEOUT.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import weakref
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.core.lifetime import die_with_parent
from tokenmill.engine.executor.model_runner import ModelRunner, StepInputs
from tokenmill.engine.executor.shm_collectives import COLLECTIVE_TIMEOUT
from tokenmill.engine.log_setup import LogSettings
from tokenmill.engine.weights.loader import load_model_files

logger = logging.getLogger(__name__)


class RankDiedError(RuntimeError):
    """A tensor-parallel worker process is gone: the engine cannot run another step."""


def _init_process_group(config: EngineConfig, rank: int, store: dist.Store) -> None:
    if dist.is_initialized():
        raise RuntimeError("a tensor-parallel engine is already running in this process; torch.distributed "
                           "holds one process group per process (serve each model in its own engine process)")
    backend = "nccl" if config.torch_device().type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=config.tensor_parallel_size,
                            timeout=COLLECTIVE_TIMEOUT)


class Workers:
    """Ranks 1 .. N-1 of a tensor-parallel engine, as rank 0 sees them. Constructing it starts them and
    joins the process group; they then load their shards while rank 0 loads its own."""

    def __init__(self, config: EngineConfig, max_model_len: int):
        n = config.tensor_parallel_size
        if config.torch_device().type == "cuda" and torch.cuda.device_count() < n:
            raise ValueError(f"tensor_parallel_size {n} needs {n} GPUs; {torch.cuda.device_count()} visible")
        # The store's port is the kernel's choice of a free one, handed to the workers: no race for it.
        store = dist.TCPStore("127.0.0.1", 0, n, is_master=True, timeout=COLLECTIVE_TIMEOUT,
                              wait_for_workers=False)
        context = multiprocessing.get_context("spawn")
        self.processes: list[multiprocessing.Process] = []
        self.conns: list[Connection] = []
        # multiprocessing refuses children to a daemon (the server's engine process is one), lest they outlive
        # it when it is terminated; ours cannot (die_with_parent), so the flag is lifted while they start.
        me = multiprocessing.current_process()
        was_daemon, me.daemon = me.daemon, False
        try:
            for rank in range(1, n):
                reader, writer = context.Pipe(duplex=False)
                process = context.Process(
                    target=run_worker, name=f"tokenmill-tp{rank}", daemon=True,
                    args=(config, rank, store.port, reader, os.getpid(), max_model_len,
                          LogSettings.current()))
                process.start()
                reader.close()
                self.processes.append(process)
                self.conns.append(writer)
        finally:
            me.daemon = was_daemon
        # Deleting the engine (or the interpreter exiting) ends the workers; shutdown() does it now.
        self._finalizer = weakref.finalize(self, _stop, self.processes, self.conns)
        logger.info("tensor parallel: %d ranks, worker pids %s", n, [p.pid for p in self.processes])
        try:
            _init_process_group(config, 0, store)
        except Exception as e:
            try:
                self.raise_if_dead(e)
            finally:
                self.shutdown()
            raise

    def send(self, inputs: StepInputs) -> None:
        """Hand this step's inputs to every worker (rank 0 runs them itself)."""
        self.raise_if_dead()
        data = pickle.dumps(inputs, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self.conns:
                conn.send_bytes(data)
        except OSError as e:
            self.raise_if_dead(e)
            raise

    def raise_if_dead(self, cause: BaseException | None = None) -> None:
        """RankDiedError naming the first worker that is gone. After a failed collective or send (cause),
        a worker that is dying is given a moment to be reaped."""
        if cause is not None:
            multiprocessing.connection.wait([p.sentinel for p in self.processes], timeout=2)
        for rank, process in enumerate(self.processes, 1):
            if process.exitcode is not None:
                code = process.exitcode
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
                raise RankDiedError(f"tensor-parallel rank {rank} (pid {process.pid}) {how}; the engine cannot "
                                    "step without it" + (f" ({type(cause).__name__}: {cause})" if cause else ""))

    def shutdown(self) -> None:
        self._finalizer()


def _stop(processes: list[multiprocessing.Process], conns: list[Connection]) -> None:
    for conn in conns:
        conn.close()  # the worker's loop reads EOF and returns
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_worker(config: EngineConfig, rank: int, port: int, conn: Connection, parent_pid: int, max_model_len: int,
               log: LogSettings) -> None:
    """A worker's main: join the group, build and load this rank's shard of the model, then run each step's
    inputs from rank 0 until the pipe closes."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the engine decides
    log.configure(f"tp{rank}")
    threads = config.num_threads_per_rank()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    store = dist.TCPStore("127.0.0.1", port, config.tensor_parallel_size, is_master=False,
                          timeout=COLLECTIVE_TIMEOUT)
    _init_process_group(config, rank, store)
    model_config, _, weights = load_model_files(config.resolved_model(), config.load_format, load_tokenizer=False)
    runner = ModelRunner(config, model_config, weights, max_model_len, rank=rank)
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            break
        runner.run(pickle.loads(data))
    dist.destroy_process_group()
