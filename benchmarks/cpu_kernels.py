"""Benchmark the C++ CPU ops (kernels/cpu) against kernels.reference, side by side in one run.

SmolLM2-135M shapes (9 query heads, 3 KV heads, head_dim 64, block size 16) over shuffled cache pages:
decode at batch 1, 8 and 32 over a few context lengths, one 512-token prompt, and a 256-token chunk after a
cached 512-token prefix; float32 and bfloat16. Each op is checked against the reference first; times are
medians of wall time at torch's thread count (set it with --threads).

    python benchmarks/cpu_kernels.py [--threads 2] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in a checkout

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16
HIDDEN, INTERMEDIATE = 576, 1536
# (name, query tokens per sequence, sequence lengths)
ATTENTION_CASES = [
    *[(f"decode b{b} ctx {n}", [1] * b, [n] * b) for b in (1, 8, 32) for n in (300, 1000)],
    ("prefill 512", [512], [512]),
    ("chunk 256 after 512 cached", [256], [768]),
]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def paged_batch(q_lens: list[int], seq_lens: list[int], dtype: torch.dtype) -> tuple:
    blocks = [-(-n // BLOCK_SIZE) for n in seq_lens]
    pool = torch.randperm(sum(blocks))
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = pool[used:used + n]
        used += n
    shape = (len(pool), BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    starts = torch.tensor([0] + q_lens).cumsum(0).int()
    q = torch.randn(int(starts[-1]), NUM_HEADS, HEAD_DIM, dtype=dtype)
    return (q, torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype), tables,
            torch.tensor(seq_lens, dtype=torch.int32), starts, HEAD_DIM ** -0.5)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def small_op_cases(tokens: int, dtype: torch.dtype) -> dict[str, tuple[Callable, Callable]]:
    """name -> (call(ops module), the result to compare) for the per-layer ops around attention and the MLP."""
    x, res = torch.randn(tokens, HIDDEN, dtype=dtype), torch.randn(tokens, HIDDEN, dtype=dtype)
    w = torch.rand(HIDDEN, dtype=dtype)
    gate_up = torch.randn(tokens, 2 * INTERMEDIATE, dtype=dtype)
    q = torch.randn(tokens, NUM_HEADS, HEAD_DIM, dtype=dtype)
    k, v = (torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, dtype=dtype) for _ in range(2))
    cos, sin = torch.rand(4096, HEAD_DIM // 2), torch.rand(4096, HEAD_DIM // 2)
    caches = [torch.zeros(tokens // BLOCK_SIZE + 1, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=dtype) for _ in range(2)]
    positions, slots = torch.arange(tokens) + 100, torch.arange(tokens)
    return {
        "rms_norm + residual": (lambda m: m.rms_norm(x, w, 1e-5, res), lambda r: r[0]),
        "silu_and_mul": (lambda m: m.silu_and_mul(gate_up), lambda r: r),
        # On clones: the op rotates q and k in place.
        "rotary_and_cache": (lambda m: m.rotary_and_cache(positions, q.clone(), k.clone(), v, cos, sin, *caches, slots),
                             lambda r: caches[0].clone()),
    }


def rows(cpp, reference, dtype: torch.dtype, repeats: int) -> list[tuple[str, float, float, float]]:
    """(case, reference ms, C++ ms, relative error) for attention and the small per-layer ops."""
    out = []
    for name, q_lens, seq_lens in ATTENTION_CASES:
        args = paged_batch(q_lens, seq_lens, dtype)
        err = rel_err(cpp.paged_attention(*args), reference.paged_attention(*args))
        out.append((f"attention {name}", median_ms(lambda a=args: reference.paged_attention(*a), repeats),
                    median_ms(lambda a=args: cpp.paged_attention(*a), repeats), err))
    for tokens in (1, 512):
        for name, (call, result) in small_op_cases(tokens, dtype).items():
            err = rel_err(result(call(cpp)), result(call(reference)))
            out.append((f"{name} {tokens} tok", median_ms(lambda c=call: c(reference), repeats),
                        median_ms(lambda c=call: c(cpp), repeats), err))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from tokenmill.kernels import cpu, reference
    if not cpu.load():
        sys.exit("the C++ CPU ops did not build; nothing to compare")
    from tokenmill.kernels.cpu import ops

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SmolLM2-135M shapes")
    print(f"{'case':<40} {'dtype':<9} {'reference ms':>12} {'C++ ms':>9} {'speedup':>8} {'rel err':>9}")
    for dtype in (torch.float32, torch.bfloat16):
        for name, ref_ms, cpp_ms, err in rows(ops, reference, dtype, args.repeats):
            print(f"{name:<40} {str(dtype).removeprefix('torch.'):<9} {ref_ms:>12.3f} {cpp_ms:>9.3f} "
                  f"{ref_ms / cpp_ms:>7.1f}x {err:>9.1e}")


if __name__ == "__main__":
    main()
