"""Collectives between tensor-parallel ranks on one host through shared memory, for CPU ranks.

gloo's all-reduce costs about 2 ms on this project's VMs (RESULTS.md section 9), while a step
makes two all-reduces per layer of a few kilobytes each; a shared-memory exchange costs microseconds.
vLLM's CPU backend replaces gloo the same way.

One file in /dev/shm, mapped by every rank and unlinked once all have it: a counter per rank (a cache
line each), then two banks of one slot per rank. Collective number g uses bank g % 2: each rank copies its
tensor into its slot, publishes g in its counter, and waits until every counter reaches g; then every rank
reads all the slots in rank order, so all get bitwise the same sum. A rank that starts collective g + 2,
and so writes that bank again, has seen every counter reach g + 1, which a rank publishes only after it has
read bank g % 2: double buffering alone keeps writers off slots still being read. The order of a copy
before its counter's store, and of a counter's load before the slots' loads, is x86's (TSO), so this
runs only there; elsewhere, and for tensors larger than a slot, the layers use torch.distributed.
"""
from __future__ import annotations

import logging
import os
import platform
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Ranks run in lockstep, so no collective waits long for a live peer; this bounds the wait for a hung one
# (and for workers to join at start-up).
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
SHM_DIR = "/dev/shm"
MAX_SLOT_BYTES = 64 << 20
COUNTER_STRIDE = 8  # int64s: one cache line per rank's counter, so ranks do not write the same line
# How often a waiting rank asks whether its peers are alive.
LIVENESS_CHECK_S = 0.2


def supported_shm_device(device: torch.device) -> bool:
    """Whether ranks on this device and machine exchange through shared memory."""
    return device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(SHM_DIR)


class ShmCollectives:
    """All-reduce (sum) and all-gather among the ranks of torch.distributed's default group, which must all
    run on this host. Constructing it is itself collective: every rank constructs one at the same point."""

    def __init__(self, slot_bytes: int, check_peers: Callable[[], None] | None = None,
                 timeout: timedelta = COLLECTIVE_TIMEOUT):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.slot_bytes = -(-min(slot_bytes, MAX_SLOT_BYTES) // 64) * 64  # slots start on cache lines
        self.timeout_s = timeout.total_seconds()
        self.check_peers = check_peers  # raises if a peer is gone; called now and then while waiting
        header = self.world_size * COUNTER_STRIDE * 8
        size = header + 2 * self.world_size * self.slot_bytes
        path = [self._create(size) if self.rank == 0 else None]
        try:
            dist.broadcast_object_list(path, src=0)
            if path[0]:
                self._memory = torch.from_file(path[0], shared=True, size=size, dtype=torch.uint8)
                dist.barrier()  # every rank has mapped it: the name can go, the mapping stays
        finally:
            if self.rank == 0 and path[0]:
                os.unlink(path[0])
        if not path[0]:  # no room in /dev/shm: every collective goes through torch.distributed
            self.slot_bytes, size = 0, header
            self._memory = torch.zeros(size, dtype=torch.uint8)
        # Waits poll through numpy: a torch op per poll would also flood a profiler's trace.
        self._counters = self._memory[:header].view(torch.int64)[::COUNTER_STRIDE].numpy()
        self._slots = self._memory[header:].view(2, self.world_size, self.slot_bytes)
        self._generation = 0
        self._view_cache: dict[tuple[int, torch.dtype, torch.Size], list[torch.Tensor]] = {}

    @staticmethod
    def _create(size: int) -> str:
        """The shared file, its pages reserved now (a tmpfs that fills up later would SIGBUS a write into
        a sparse one); "" where /dev/shm has no room for it."""
        path = os.path.join(SHM_DIR, f"tokenmill-tp-{uuid.uuid4().hex}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            logger.warning("tensor parallel: cannot create %s (%s); collectives use gloo", path, e)
            return ""
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            os.unlink(path)
            logger.warning("tensor parallel: no room for %d bytes in %s (%s); collectives use gloo", size,
                           SHM_DIR, e)
            return ""
        finally:
            os.close(fd)
        return path

    def fits(self, x: torch.Tensor) -> bool:
        return 0 < self.slot_bytes and x.numel() * x.element_size() <= self.slot_bytes

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x (same shape and dtype on all), as views valid until the next exchange but one."""
        self._generation += 1
        g = self._generation
        parts = self._views(g % 2, x.dtype, x.shape)
        parts[self.rank].copy_(x)
        self._counters[self.rank] = g
        self._wait_for(g)
        return parts

    def _views(self, bank: int, dtype: torch.dtype, shape: torch.Size) -> list[torch.Tensor]:
        """Each rank's slot in bank as a tensor of dtype and shape. A step's collectives repeat one shape
        layer after layer, so the views of the last shape are kept: making them costs more than the copy."""
        key = (bank, dtype, shape)
        if key not in self._view_cache:
            if len(self._view_cache) >= 8:
                self._view_cache.clear()
            nbytes = shape.numel() * dtype.itemsize
            self._view_cache[key] = [self._slots[bank, r, :nbytes].view(dtype).view(shape)
                                     for r in range(self.world_size)]
        return self._view_cache[key]

    def _wait_for(self, g: int) -> None:
        counters = self._counters
        if (counters >= g).all():
            return
        start = last_check = time.monotonic()
        while not (counters >= g).all():
            os.sched_yield()  # the peer we wait for may share this core
            now = time.monotonic()
            if now - last_check >= LIVENESS_CHECK_S:
                last_check = now
                if self.check_peers is not None:
                    self.check_peers()
                if now - start >= self.timeout_s:
                    behind = [r for r in range(self.world_size) if int(counters[r]) < g]
                    raise RuntimeError(f"shared-memory collective {g}: ranks {behind} did not arrive within "
                                       f"{self.timeout_s:.0f} s")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place; the sum is taken in rank order, the same on every rank."""
        parts = self._exchange(x.contiguous())
        torch.add(parts[0], parts[1], out=x)
        for part in parts[2:]:
            x += part
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x, copied out of the shared slots."""
        return [part.clone() for part in self._exchange(x.contiguous())]
