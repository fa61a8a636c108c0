"""Plain-PyTorch references of every kernel.

They are the engine's CPU path and the oracle the Triton kernels are tested against, so they favour
clarity over speed, except where the CPU path needs batching to be usable (decode attention).
Shapes follow the paged layout: caches are [num_blocks, block_size, num_kv_heads, head_dim].
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class DecodeGroup:
    """Single-query sequences attended in one batched call, gathered padded to the group's longest."""

    q_rows: torch.Tensor  # [B] the sequences' query rows
    tables: torch.Tensor  # [B, blocks] int64 block tables cut to the longest sequence's blocks
    max_len: int
    mask: torch.Tensor | None  # [B, 1, 1, max_len] keys each sequence sees; None when all are max_len long


@dataclass
class Prefill:
    """A sequence with several queries: its rows of q and what they may see."""

    start: int
    q_len: int
    seq_len: int
    block_table: torch.Tensor
    mask: torch.Tensor | None  # [q_len, seq_len]; None when the queries are the whole sequence (causal)


@dataclass
class AttentionPlan:
    """The host-side layout of one step's attention: the same for every layer, so built once per step."""

    decode_groups: list[DecodeGroup]
    prefills: list[Prefill]


def plan_attention(block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                   block_size: int) -> AttentionPlan:
    """Sort the step's sequences into batched decode groups and single prefills (see paged_attention)."""
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    prefills = []
    for i, q_len in enumerate(q_lens):
        if q_len > 1:
            seq_len = lens[i]
            # Query j may see keys 0 .. seq_len - q_len + j.
            mask = None
            if q_len != seq_len:
                mask = torch.ones(q_len, seq_len, dtype=torch.bool, device=block_tables.device).tril(seq_len - q_len)
            prefills.append(Prefill(starts[i], q_len, seq_len, block_tables[i], mask))
    decodes = sorted((i for i, n in enumerate(q_lens) if n == 1), key=lambda i: lens[i])
    groups: list[list[int]] = []
    for i in decodes:
        # Start a new group when padding the group's shortest sequence to this one would waste half.
        if not groups or lens[i] > 2 * lens[groups[-1][0]] + block_size:
            groups.append([])
        groups[-1].append(i)
    return AttentionPlan([_decode_group(g, starts, lens, block_tables, block_size) for g in groups], prefills)


def _decode_group(group: list[int], starts: list[int], lens: list[int], block_tables: torch.Tensor,
                  block_size: int) -> DecodeGroup:
    device = block_tables.device
    group_lens = [lens[i] for i in group]
    max_len = max(group_lens)
    tables = block_tables[torch.tensor(group, device=device), : -(-max_len // block_size)].long()
    mask = None
    if min(group_lens) != max_len:
        seq_lens = torch.tensor(group_lens, device=device)
        mask = (torch.arange(max_len, device=device)[None, :] < seq_lens[:, None])[:, None, None, :]
    return DecodeGroup(torch.tensor([starts[i] for i in group], device=device), tables, max_len, mask)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float,
                    out: torch.Tensor | None = None, plan: AttentionPlan | None = None) -> torch.Tensor:
    """Causal attention of packed queries over each sequence's paged keys and values.

    q: [num_tokens, num_heads, head_dim]; sequence i owns q[query_start_loc[i]:query_start_loc[i+1]],
    whose j-th query sits at position seq_lens[i] - q_len + j and sees positions up to its own.
    plan: plan_attention's layout of these tensors, when the caller built it once for many layers.
    """
    if out is None:
        out = torch.empty_like(q)
    if plan is None:
        plan = plan_attention(block_tables, seq_lens, query_start_loc, k_cache.shape[1])
    for group in plan.decode_groups:
        _decode_group_attention(q, k_cache, v_cache, group, scale, out)
    for p in plan.prefills:
        k = _gather(k_cache, p.block_table, p.seq_len).transpose(0, 1)
        v = _gather(v_cache, p.block_table, p.seq_len).transpose(0, 1)
        qi = q[p.start:p.start + p.q_len].transpose(0, 1)
        # 4-D inputs: torch's CPU flash kernel takes those; 3-D ones fall back to the slower math path.
        o = F.scaled_dot_product_attention(qi[None], k[None].to(q.dtype), v[None].to(q.dtype), attn_mask=p.mask,
                                           is_causal=p.mask is None, scale=scale, enable_gqa=True)
        out[p.start:p.start + p.q_len] = o[0].transpose(0, 1)
    return out


def _decode_group_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup,
                            scale: float, out: torch.Tensor) -> None:
    # In float32 whatever the dtype: torch's CPU SDPA is several times slower in bfloat16 at one query
    # per sequence than the upcast costs. [B, kv_heads, L, D]
    k = k_cache[group.tables].flatten(1, 2)[:, :group.max_len].transpose(1, 2).float()
    v = v_cache[group.tables].flatten(1, 2)[:, :group.max_len].transpose(1, 2).float()
    o = F.scaled_dot_product_attention(q[group.q_rows].unsqueeze(2).float(), k, v, attn_mask=group.mask, scale=scale,
                                       enable_gqa=True)
    out[group.q_rows] = o.squeeze(2).to(out.dtype)


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


def rotary_and_cache(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cos_cache: torch.Tensor, sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    """rotary_embedding on q and k (in place), then write_kv_cache of k and v: one call per layer."""
    rotary_embedding(positions, q, k, cos_cache, sin_cache)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None) -> None:
    """Structured outputs' mask, in place: bit j of word w of bitmask's int32 row [ceil(vocab / 32)] allows
    token 32 * w + j, and a forbidden token's logit becomes -inf. On `rows` of logits [batch, vocab] and of
    bitmask (all if None), over the first min(vocab, 32 * words) tokens, as xgrammar's apply_token_bitmask_inplace."""
    rows = list(range(logits.shape[0])) if rows is None else rows
    vocab = min(logits.shape[-1], 32 * bitmask.shape[-1])
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[rows, :, None] >> bits) & 1).flatten(1)[:, :vocab].bool().to(logits.device)
    logits[rows, :vocab] = logits[rows, :vocab].masked_fill(~allowed, float("-inf"))


@dataclass
class LoRAPlan:
    """Which adapter each of a step's tokens runs, grouped by adapter slot: built once per step on the host,
    shared by every layer. Segment i is token rows token_indices[starts[i]:starts[i + 1]], all of slot
    slots[i]; tokens of no adapter are in no segment."""

    token_indices: torch.Tensor  # [num_lora_tokens] int64 rows of the batch, grouped by slot
    seg_starts: torch.Tensor  # [num_segments + 1] int32, on the device (the Triton kernels read it)
    seg_slots: torch.Tensor  # [num_segments] int32, on the device
    starts: list[int]  # seg_starts on the host
    slots: list[int]  # seg_slots on the host

    @classmethod
    def build(cls, rows_by_slot: dict[int, list[int]], device: torch.device) -> LoRAPlan:
        """The plan of these token rows of each slot (slots with no rows left out)."""
        slots = [slot for slot, rows in rows_by_slot.items() if rows]
        starts = [0]
        for slot in slots:
            starts.append(starts[-1] + len(rows_by_slot[slot]))
        indices = [row for slot in slots for row in rows_by_slot[slot]]
        pin = device.type == "cuda"  # so that the copies do not wait for the device

        def to_device(values: list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, pin_memory=pin).to(device, non_blocking=True)

        return cls(to_device(indices, torch.int64), to_device(starts, torch.int32), to_device(slots, torch.int32),
                   starts, slots)

    @property
    def max_seg_len(self) -> int:
        return max(b - a for a, b in zip(self.starts, self.starts[1:], strict=False))


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             plan: LoRAPlan) -> None:
    """y[t] += (x[t] @ lora_a[s].T) @ lora_b[s].T in place, for each token t of each segment of slot s.

    x: [num_tokens, in], y: [num_tokens, out], lora_a: [num_slots, rank, in], lora_b: [num_slots, out, rank]
    (the adapter's scaling folded in). One pair of matmuls per segment: grouping tokens by adapter beats
    gathering each token's matrices for a bmm 7x at 32 decode tokens and 90x at a 512-token prefill (CPU)."""
    for i, slot in enumerate(plan.slots):
        rows = plan.token_indices[plan.starts[i]:plan.starts[i + 1]]
        xs = x[rows].to(lora_a.dtype)
        y.index_add_(0, rows, ((xs @ lora_a[slot].T) @ lora_b[slot].T).to(y.dtype))
