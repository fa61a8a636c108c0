"""Benchmark the Triton kernels on a CUDA GPU (compiled, not the interpreter).

Checks every kernel against kernels.reference first, then times them with triton.testing.do_bench
(median) and rates them against this card's measured copy bandwidth and bf16 matmul rate.
paged_attention runs side by side with torch's scaled_dot_product_attention on the same data laid
out contiguously: decode at batch 64-256 over 512-8k contexts, prefill of 1-8 sequences of 512-4k tokens.

    python benchmarks/triton_kernels.py --out kernels.json [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in a checkout

# A Llama-3-8B-like attention layer.
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
DECODE = [(b, n) for b in (64, 128, 256) for n in (512, 2048, 8192)]  # (batch, context)
PREFILL = [(1, 512), (1, 4096), (4, 1024), (8, 512), (8, 2048), (8, 4096)]  # (sequences, tokens each)
QUICK_DECODE = [(64, 512), (256, 8192)]
QUICK_PREFILL = [(1, 512), (8, 4096)]


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def measure_peaks() -> dict[str, float]:
    """What this card really does: device-to-device copy GB/s (read + write) and bf16 matmul TFLOP/s."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    mm_ms = bench(lambda: a @ b)
    return {"copy_gb_s": 2 * src.numel() / copy_ms / 1e6, "bf16_matmul_tflop_s": 2 * n ** 3 / mm_ms / 1e9}


def paged_batch(num_seqs: int, q_len: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Equal-length sequences in a paged cache with shuffled blocks, plus the same keys and values
    contiguous [num_seqs, kv_heads, seq_len, head_dim] for SDPA."""
    blocks_per_seq = -(-seq_len // BLOCK_SIZE)
    num_blocks = num_seqs * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    v_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    tables = torch.randperm(num_blocks, device="cuda").view(num_seqs, blocks_per_seq).int()

    def contiguous(cache: torch.Tensor) -> torch.Tensor:
        return cache[tables.long()].flatten(1, 2)[:, :seq_len].transpose(1, 2).contiguous()

    return {
        "q": torch.randn(num_seqs * q_len, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda"),
        "k_cache": k_cache, "v_cache": v_cache, "block_tables": tables,
        "seq_lens": torch.full((num_seqs,), seq_len, dtype=torch.int32, device="cuda"),
        "query_start_loc": torch.arange(0, num_seqs * q_len + 1, q_len, dtype=torch.int32, device="cuda"),
        "k": contiguous(k_cache), "v": contiguous(v_cache),
    }


def check_correctness() -> None:
    """Every kernel against kernels.reference on a small mixed batch; stops the run on a mismatch."""
    from tokenmill import kernels
    from tokenmill.kernels import reference

    errors = {}
    # Prefill, decode, chunked prefill and a 1-token sequence in one batch, on shuffled blocks.
    specs = [(300, 300), (1, 1000), (40, 700), (1, 1)]
    q_lens = [q for q, _ in specs]
    seq_lens = torch.tensor([n for _, n in specs], dtype=torch.int32, device="cuda")
    width = max(-(-n // BLOCK_SIZE) for _, n in specs)
    num_blocks = len(specs) * width
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device="cuda").view(len(specs), width).int()
    q = torch.randn(sum(q_lens), NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    start_loc = torch.tensor([0] + q_lens, device="cuda").cumsum(0).int()
    args = (q, k_cache, v_cache, tables, seq_lens, start_loc, HEAD_DIM ** -0.5)
    ref = reference.paged_attention(*args)
    for splits in (1, 4):
        errors[f"paged_attention splits={splits}"] = rel_err(kernels.paged_attention(*args, num_splits=splits), ref)

    x = torch.randn(37, 4096, dtype=DTYPE, device="cuda")
    w = torch.randn(4096, dtype=DTYPE, device="cuda")
    res = torch.randn_like(x)
    errors["rms_norm"] = rel_err(kernels.rms_norm(x, w, 1e-5, res)[0], reference.rms_norm(x, w, 1e-5, res)[0])
    errors["silu_and_mul"] = rel_err(kernels.silu_and_mul(x), reference.silu_and_mul(x))

    pos = torch.randint(0, 4096, (37,), device="cuda")
    cos, sin = torch.randn(4096, HEAD_DIM // 2, device="cuda"), torch.randn(4096, HEAD_DIM // 2, device="cuda")
    qr = torch.randn(37, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    kr = torch.randn(37, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    qr2, kr2 = qr.clone(), kr.clone()
    kernels.rotary_embedding(pos, qr, kr, cos, sin)
    reference.rotary_embedding(pos, qr2, kr2, cos, sin)
    errors["rotary_embedding"] = max(rel_err(qr, qr2), rel_err(kr, kr2))

    slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:37]
    slots[5] = -1
    caches = [k_cache.clone(), v_cache.clone()]
    kernels.write_kv_cache(kr, kr, *caches, slots)
    reference.write_kv_cache(kr, kr, k_cache, v_cache, slots)
    errors["write_kv_cache"] = max(rel_err(caches[0], k_cache), rel_err(caches[1], v_cache))

    for name, err in errors.items():
        print(f"check {name:32s} rel err {err:.2e}")
    bad = [name for name, err in errors.items() if not err < 1e-2]
    if bad:
        raise SystemExit(f"kernels disagree with kernels.reference: {', '.join(bad)}")


def attention_rows(decode: list[tuple[int, int]], prefill: list[tuple[int, int]]) -> list[dict]:
    """paged_attention vs SDPA; bytes count K/V/Q/out once, FLOPs count QK^T and PV over visible keys."""
    from tokenmill import kernels

    scale = HEAD_DIM ** -0.5
    elem = torch.finfo(DTYPE).bits // 8
    cases = [("decode", b, 1, n) for b, n in decode] + [("prefill", s, n, n) for s, n in prefill]
    rows = []
    for kind, num_seqs, q_len, seq_len in cases:
        d = paged_batch(num_seqs, q_len, seq_len)
        paged_args = (d["q"], d["k_cache"], d["v_cache"], d["block_tables"], d["seq_lens"], d["query_start_loc"], scale)
        hints = {"max_q_len": q_len, "max_seq_len": seq_len}
        q4 = d["q"].view(num_seqs, q_len, NUM_HEADS, HEAD_DIM).transpose(1, 2)  # [B, H, q_len, D]

        def sdpa(q4=q4, d=d, kind=kind) -> torch.Tensor:
            # Decode: the one query sees every key; prefill: q_len == seq_len, plain causal.
            return F.scaled_dot_product_attention(q4, d["k"], d["v"], is_causal=kind == "prefill", scale=scale,
                                                  enable_gqa=True)

        out = kernels.paged_attention(*paged_args, **hints)
        err = rel_err(out.view(num_seqs, q_len, NUM_HEADS, HEAD_DIM).transpose(1, 2), sdpa())
        if not err < 1e-2:
            raise SystemExit(f"paged_attention disagrees with SDPA on {kind} {num_seqs}x{seq_len}: {err:.2e}")
        t_paged = bench(lambda args=paged_args, out=out, hints=hints: kernels.paged_attention(*args, out=out, **hints))
        t_sdpa = bench(sdpa)
        visible = q_len * seq_len - q_len * (q_len - 1) // 2  # keys seen, summed over one sequence's queries
        flops = 4 * num_seqs * visible * NUM_HEADS * HEAD_DIM
        nbytes = elem * num_seqs * (2 * seq_len * NUM_KV_HEADS + 2 * q_len * NUM_HEADS) * HEAD_DIM
        rows.append({"kernel": "paged_attention", "case": f"{kind} seqs={num_seqs} len={seq_len}", "ms": t_paged,
                     "sdpa_ms": t_sdpa, "bytes": nbytes, "flops": flops, "rel_err_vs_sdpa": err})
        del d, out
        torch.cuda.empty_cache()
    return rows


def elementwise_rows() -> list[dict]:
    """The memory-bound kernels at a Llama-8B-like prefill of 8k tokens, next to their references."""
    from tokenmill import kernels
    from tokenmill.kernels import reference

    tokens, hidden, inter = 8192, 4096, 14336
    elem = torch.finfo(DTYPE).bits // 8
    x = torch.randn(tokens, hidden, dtype=DTYPE, device="cuda")
    res, w = torch.randn_like(x), torch.randn(hidden, dtype=DTYPE, device="cuda")
    gate_up = torch.randn(tokens, 2 * inter, dtype=DTYPE, device="cuda")
    q = torch.randn(tokens, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    k = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    pos = torch.arange(tokens, device="cuda")
    cos, sin = torch.randn(tokens, HEAD_DIM // 2, device="cuda"), torch.randn(tokens, HEAD_DIM // 2, device="cuda")
    k_cache = torch.empty(tokens // BLOCK_SIZE, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(tokens, device="cuda")
    cases = [
        ("rms_norm+residual", 4 * tokens * hidden * elem, lambda m: m.rms_norm(x, w, 1e-5, res)),
        ("silu_and_mul", 3 * tokens * inter * elem, lambda m: m.silu_and_mul(gate_up)),
        ("rotary_embedding", 2 * (q.numel() + k.numel()) * elem, lambda m: m.rotary_embedding(pos, q, k, cos, sin)),
        ("write_kv_cache", 4 * k.numel() * elem, lambda m: m.write_kv_cache(k, k, k_cache, v_cache, slots)),
    ]
    return [{"kernel": name, "case": f"tokens={tokens}", "ms": bench(lambda fn=fn: fn(kernels)),
             "reference_ms": bench(lambda fn=fn: fn(reference)), "bytes": nbytes, "flops": 0}
            for name, nbytes, fn in cases]


def print_table(rows: list[dict], peaks: dict[str, float]) -> None:
    print(f"\ncopy bandwidth {peaks['copy_gb_s']:.0f} GB/s, bf16 matmul {peaks['bf16_matmul_tflop_s']:.0f} TFLOP/s")
    print(f"{'kernel':18s} {'case':28s} {'ms':>9s} {'torch ms':>9s} {'speedup':>8s} "
          f"{'GB/s':>7s} {'%copy':>6s} {'TFLOP/s':>8s} {'%mm':>5s}")
    for r in rows:
        other = r.get("sdpa_ms", r.get("reference_ms"))
        gbs, tfs = r["bytes"] / r["ms"] / 1e6, r["flops"] / r["ms"] / 1e9
        r.update(gb_s=gbs, tflop_s=tfs, pct_copy_bw=100 * gbs / peaks["copy_gb_s"],
                 pct_matmul=100 * tfs / peaks["bf16_matmul_tflop_s"])
        print(f"{r['kernel']:18s} {r['case']:28s} {r['ms']:9.4f} {other:9.4f} {other / r['ms']:7.2f}x "
              f"{gbs:7.0f} {r['pct_copy_bw']:5.1f}% {tfs:8.1f} {r['pct_matmul']:4.1f}%")
    print("torch ms: scaled_dot_product_attention for paged_attention, kernels.reference for the others")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="two decode and two prefill cases only")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        raise SystemExit("benchmarks/triton_kernels.py needs a CUDA GPU and compiled Triton (TRITON_INTERPRET unset); "
                         "on CPU, run the kernel tests instead: pytest tests/kernels")
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    print(f"device: {device}, torch {torch.__version__}, dtype {DTYPE}, heads {NUM_HEADS}/{NUM_KV_HEADS}, "
          f"head_dim {HEAD_DIM}, block_size {BLOCK_SIZE}")
    check_correctness()
    peaks = measure_peaks()
    rows = attention_rows(QUICK_DECODE if args.quick else DECODE, QUICK_PREFILL if args.quick else PREFILL)
    rows += elementwise_rows()
    print_table(rows, peaks)
    if args.out:
        report = {"device": device, "torch": torch.__version__, "dtype": str(DTYPE), "peaks": peaks, "rows": rows,
                  "config": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                             "block_size": BLOCK_SIZE}}
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
