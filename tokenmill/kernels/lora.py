"""Batched LoRA: y += (x @ A[s].T) @ B[s].T for each token, s its adapter's slot, in the style of punica's
SGMV (vLLM's multi-LoRA kernels). Tokens come grouped by slot (kernels.reference.LoRAPlan): a program
takes BLOCK_M tokens of one segment, so each loads its adapter's matrices once for all of them.

Two kernels, as a LoRA has two skinny matmuls: shrink (x [M, K] -> s [M, R], R = rank, small) and expand
(s -> y [M, N], added in place). s stays in float32 between them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import LoRAPlan

BLOCK_M = 16  # tokens per program: decode segments are often a few tokens, and tl.dot needs 16
BLOCK_N = 64
# The shrink holds a token's whole rank (its output) and narrows its hidden-size tile BLOCK_K as the rank
# grows, so that an A tile stays at 4,096 elements, with 8 warps for the wide ranks of fused q|k|v and
# gate|up adapters; the expand walks the rank in tiles of at most EXPAND_R. Wider, float32 spills registers
# on sm_80 (`python -m tokenmill.kernels.aot`).
TILE_ELEMENTS = 4096
EXPAND_R = 32


def shrink_k(block_r: int) -> int:
    return max(16, min(64, TILE_ELEMENTS // block_r))


@triton.jit
def _segment_rows(token_ptr, seg_start_ptr, seg_slot_ptr, BLOCK_M: tl.constexpr):
    """This program's rows of the plan (those of its segment, masked), their tokens, and their slot."""
    seg = tl.program_id(0)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    rows = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    tokens = tl.load(token_ptr + rows, mask=row_mask, other=0)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    return start + tl.program_id(1) * BLOCK_M >= end, rows, row_mask, tokens, slot


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, s_ptr, token_ptr, seg_start_ptr, seg_slot_ptr,
    K, R, stride_x, stride_a_slot, stride_a_r, stride_s,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid: (segment, tile of BLOCK_M of its rows)
    empty, rows, row_mask, tokens, slot = _segment_rows(token_ptr, seg_start_ptr, seg_slot_ptr, BLOCK_M)
    if empty:  # the grid covers the longest segment; shorter ones leave programs idle
        return
    r = tl.arange(0, BLOCK_R)
    r_mask = r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        x = tl.load(x_ptr + tokens[:, None].to(tl.int64) * stride_x + k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_ptr + slot * stride_a_slot + r[None, :] * stride_a_r + k[:, None],
                    mask=r_mask[None, :] & k_mask[:, None], other=0.0)  # A^T tile [BLOCK_K, BLOCK_R]
        if UPCAST_DOT:  # the interpreter's bfloat16 dot is unsupported
            acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x.to(a.dtype), a, acc, input_precision=DOT_PRECISION)
    tl.store(s_ptr + rows[:, None] * stride_s + r[None, :], acc, mask=row_mask[:, None] & r_mask[None, :])


@triton.jit
def _lora_expand_kernel(
    s_ptr, b_ptr, y_ptr, token_ptr, seg_start_ptr, seg_slot_ptr,
    N, R, stride_s, stride_b_slot, stride_b_n, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid: (segment, tile of BLOCK_M of its rows, tile of BLOCK_N outputs); the rank in tiles of BLOCK_R
    empty, rows, row_mask, tokens, slot = _segment_rows(token_ptr, seg_start_ptr, seg_slot_ptr, BLOCK_M)
    if empty:
        return
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    delta = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = r < R
        s = tl.load(s_ptr + rows[:, None] * stride_s + r[None, :], mask=row_mask[:, None] & r_mask[None, :],
                    other=0.0)
        b = tl.load(b_ptr + slot * stride_b_slot + n[None, :] * stride_b_n + r[:, None],
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # B^T tile [BLOCK_R, BLOCK_N]
        if UPCAST_DOT:
            delta = tl.dot(s, b.to(tl.float32), delta, input_precision=DOT_PRECISION)
        else:
            delta = tl.dot(s.to(b.dtype), b, delta, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + tokens[:, None].to(tl.int64) * stride_y + n[None, :]
    mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)


def block_r(rank: int) -> int:
    """The tile that holds a rank (tl.dot needs at least 16)."""
    return max(16, triton.next_power_of_2(rank))


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             plan: LoRAPlan) -> None:
    """y[t] += (x[t] @ lora_a[s].T) @ lora_b[s].T in place for the tokens of each of plan's segments (slot s);
    same contract as kernels.reference.add_lora."""
    if not plan.slots:
        return
    k, n, rank = x.shape[-1], y.shape[-1], lora_a.shape[1]
    x2, y2 = x.reshape(-1, k), y.view(-1, n)
    assert x2.stride(-1) == 1 and y2.stride(-1) == 1 and lora_a.stride(-1) == 1 and lora_b.stride(-1) == 1
    s = torch.empty(plan.token_indices.shape[0], rank, dtype=torch.float32, device=x.device)
    m_tiles = triton.cdiv(plan.max_seg_len, BLOCK_M)
    tile_r = block_r(rank)
    common = dict(BLOCK_M=BLOCK_M,
                  UPCAST_DOT=x.device.type == "cpu" and lora_a.dtype == torch.bfloat16,
                  DOT_PRECISION="ieee" if lora_a.dtype == torch.float32 else "tf32")
    args = (plan.token_indices, plan.seg_starts, plan.seg_slots)
    _lora_shrink_kernel[(len(plan.slots), m_tiles)](
        x2, lora_a, s, *args, k, rank, x2.stride(0), lora_a.stride(0), lora_a.stride(1), s.stride(0),
        BLOCK_R=tile_r, BLOCK_K=shrink_k(tile_r), num_warps=8 if tile_r >= 128 else 4, **common)
    _lora_expand_kernel[(len(plan.slots), m_tiles, triton.cdiv(n, BLOCK_N))](
        s, lora_b, y2, *args, n, rank, s.stride(0), lora_b.stride(0), lora_b.stride(1), y2.stride(0),
        BLOCK_R=min(tile_r, EXPAND_R), BLOCK_N=BLOCK_N, **common)
