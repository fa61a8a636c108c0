"""Llama's rotary position embedding (NeoX / rotate-half layout), in place on q and k."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kv_cache import write_kv_cache


@triton.jit
def _rotate(x_ptr, token, stride_t, stride_h, num_heads, cos, sin,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate every head of one token: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < num_heads) & (d < HALF)
    p1 = x_ptr + token * stride_t + h * stride_h + d
    x1 = tl.load(p1, mask=mask).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, num_heads, num_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    # cos/sin are read once per token and shared by q and k.
    cos = tl.load(cos_ptr + pos * stride_cos + d, mask=d < HALF).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + d, mask=d < HALF).to(tl.float32)
    _rotate(q_ptr, token, stride_qt, stride_qh, num_heads, cos, sin, HALF, BLOCK_H, BLOCK_HALF)
    _rotate(k_ptr, token, stride_kt, stride_kh, num_kv_heads, cos, sin, HALF, BLOCK_KV_H, BLOCK_HALF)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_cache: torch.Tensor, sin_cache: torch.Tensor) -> None:
    """Rotate q [T, H, D] and k [T, KVH, D] in place by cos/sin_cache [max_position, D // 2] at positions."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    assert q.stride(-1) == k.stride(-1) == cos_cache.stride(-1) == sin_cache.stride(-1) == 1
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_cache, sin_cache, num_heads, num_kv_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_cache.stride(0), sin_cache.stride(0),
        HALF=half, BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_KV_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
    )


def rotary_and_cache(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cos_cache: torch.Tensor, sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    """rotary_embedding on q and k (in place), then write_kv_cache of k and v."""
    rotary_embedding(positions, q, k, cos_cache, sin_cache)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
