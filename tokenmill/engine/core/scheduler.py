"""Continuous batching: which sequences run this step and how many tokens each.

Every step is one forward pass over a packed batch within max_num_batched_tokens and max_num_seqs.
Running sequences go first (a decode is one token; an unfinished prefill continues in chunks), then
waiting ones are admitted in arrival order, their prompts chunked to fit the remaining budget.
A sequence's blocks become findable in the prefix cache as they are allocated, so a waiting sequence
admitted later in the same step (another of a request's n samples, an equal prompt) shares the prefix
that an earlier one computes in this very step.
When the pool runs out of blocks, the newest running sequence is preempted: its blocks are released
and it goes back to the front of the waiting queue, to be recomputed later (its prefix blocks are
often still cached).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tokenmill.engine.core.block_manager import BlockManager
from tokenmill.engine.core.request import Sequence, Status


@dataclass
class SchedulerOutput:
    """This step's work: each scheduled sequence with its number of new tokens, in batch order."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            # Draft tokens to verify (speculative decoding) only ride on a decode, and only with budget and
            # blocks to spare: they are dropped before anything is preempted for them.
            lookahead = min(seq.num_lookahead_tokens, budget - n) if n == 1 else 0
            if lookahead and not self.block_manager.allocate(seq, n, num_lookahead_tokens=lookahead):
                lookahead = 0
            seq.num_lookahead_tokens = lookahead
            while not lookahead and not self.block_manager.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                out.seqs.append(seq)
                out.num_tokens.append(n)
                budget -= n + lookahead
                i += 1
        # Admitting new work right after a preemption would only thrash the pool. Preemption happens
        # only above, before any admission, and only to sequences not yet given blocks this step, so
        # every block registered for this step is computed by it (see BlockManager._register_full_blocks).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            cached = self.block_manager.find_cached_prefix(seq) if seq.reads_prefix_cache else []
            n = min(seq.num_tokens - len(cached) * self.block_manager.block_size, budget)
            if not self.block_manager.allocate(seq, n, cached):
                break
            self.waiting.popleft()
            seq.num_lookahead_tokens = 0
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_tokens.append(n)
            budget -= n
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and return its blocks."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self.block_manager.free(seq)
