"""Plain-PyTorch references of every kernel.

They are the engine's CPU path and the oracle the Triton kernels are tested against, so they favour
clarity over speed, except where the CPU path needs batching to be usable (decode attention).
Shapes follow the paged layout: caches are [num_blocks, block_size, num_kv_heads, head_dim].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter k, v [num_tokens, num_kv_heads, head_dim] into the caches at slot_mapping (-1: skip)."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` cached positions: [length, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:length]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of packed queries over each sequence's paged keys and values.

    q: [num_tokens, num_heads, head_dim]; sequence i owns q[query_start_loc[i]:query_start_loc[i+1]],
    whose j-th query sits at position seq_lens[i] - q_len + j and sees positions up to its own.
    """
    if out is None:
        out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    decodes = [i for i, n in enumerate(q_lens) if n == 1]
    if decodes:
        _decode_attention(q, k_cache, v_cache, block_tables, starts, lens, decodes, scale, out)
    for i, q_len in enumerate(q_lens):
        if q_len <= 1:
            continue
        a, seq_len = starts[i], lens[i]
        k = _gather(k_cache, block_tables[i], seq_len).transpose(0, 1)
        v = _gather(v_cache, block_tables[i], seq_len).transpose(0, 1)
        qi = q[a:a + q_len].transpose(0, 1)
        # Query j may see keys 0 .. seq_len - q_len + j.
        mask = None
        if q_len != seq_len:
            mask = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - q_len)
        # 4-D inputs: torch's CPU flash kernel takes those; 3-D ones fall back to the slower math path.
        o = F.scaled_dot_product_attention(qi[None], k[None].to(q.dtype), v[None].to(q.dtype), attn_mask=mask,
                                           is_causal=mask is None, scale=scale, enable_gqa=True)
        out[a:a + q_len] = o[0].transpose(0, 1)
    return out


def _decode_attention(q, k_cache, v_cache, block_tables, starts, lens, decodes, scale, out) -> None:
    """Single-query sequences in a few batched calls: each call gathers its sequences' blocks padded to
    its longest, so sequences of similar length are grouped to keep the padding (copied, then masked
    away) small."""
    block_size = k_cache.shape[1]
    decodes = sorted(decodes, key=lambda i: lens[i])
    group: list[int] = []
    for i in decodes:
        # Start a new group when padding the group's shortest sequence to this one would waste half.
        if group and lens[i] > 2 * lens[group[0]] + block_size:
            _decode_group(q, k_cache, v_cache, block_tables, starts, lens, group, scale, out, block_size)
            group = []
        group.append(i)
    _decode_group(q, k_cache, v_cache, block_tables, starts, lens, group, scale, out, block_size)


def _decode_group(q, k_cache, v_cache, block_tables, starts, lens, group, scale, out, block_size) -> None:
    rows = torch.tensor(group, device=q.device)
    group_lens = [lens[i] for i in group]
    max_len = max(group_lens)
    tables = block_tables[rows, : -(-max_len // block_size)].long()
    # In float32 whatever the dtype: torch's CPU SDPA is several times slower in bfloat16 at one query
    # per sequence than the upcast costs. [B, kv_heads, L, D]
    k = k_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2).float()
    v = v_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2).float()
    mask = None
    if min(group_lens) != max_len:
        seq_lens = torch.tensor(group_lens, device=q.device)
        mask = (torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None])[:, None, None, :]
    q_rows = torch.tensor([starts[i] for i in group], device=q.device)
    o = F.scaled_dot_product_attention(q[q_rows].unsqueeze(2).float(), k, v, attn_mask=mask, scale=scale,
                                       enable_gqa=True)
    out[q_rows] = o.squeeze(2).to(out.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """RMSNorm in float32, as Llama does; with residual, adds it first and returns (normed, x + residual)."""
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    normed = weight * h.to(x.dtype)
    return normed if residual is None else (normed, residual)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_cache: torch.Tensor, sin_cache: torch.Tensor) -> None:
    """Llama's (NeoX-style, rotate-half) rotary embedding, in place on q [T, H, D] and k [T, KVH, D].

    cos_cache, sin_cache: [max_position, D // 2].
    """
    cos = cos_cache[positions].unsqueeze(1)
    sin = sin_cache[positions].unsqueeze(1)
    for x in (q, k):
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        r1 = x1 * c - x2 * s
        r2 = x2 * c + x1 * s
        x[..., :half] = r1
        x[..., half:] = r2


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a gated MLP whose input is [..., 2 * d] = cat(gate, up)."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]
