"""Latency of one all-reduce between CPU tensor-parallel ranks: gloo against the shared-memory collectives
(engine/executor/shm_collectives.py), for tensors of a step's hidden-state shape.

    python benchmarks/collectives.py [--world-size 2] [--hidden 576] [--rows 1,4,64,512] [--iters 300]

Each rank runs one thread, as TP ranks on a CPU do; the ranks are idle between collectives, so this is
the collective's own cost, not the wait for a slower rank.
"""
from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tokenmill.engine.executor.shm_collectives import ShmCollectives  # noqa: E402


def _rank(rank: int, args: argparse.Namespace, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world_size)
    rows = [int(r) for r in args.rows.split(",")]
    shm = ShmCollectives(max(rows) * args.hidden * 4)
    for n in rows:
        x = torch.randn(n, args.hidden)
        times = {}
        for name, reduce in [("gloo", dist.all_reduce), ("shared memory", shm.all_reduce)]:
            for _ in range(20):
                reduce(x)
            start = time.perf_counter()
            for _ in range(args.iters):
                reduce(x)
            times[name] = (time.perf_counter() - start) / args.iters * 1e6
        if rank == 0:
            print(f"{n:5d} x {args.hidden} float32: " + ", ".join(f"{k} {v:7.1f} us" for k, v in times.items()))
    dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--hidden", type=int, default=576)  # SmolLM2-135M's
    p.add_argument("--rows", default="1,4,64,512")
    p.add_argument("--iters", type=int, default=300)
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"all-reduce between {args.world_size} ranks of 1 thread, mean of {args.iters}")
    mp.spawn(_rank, args=(args, port), nprocs=args.world_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
