"""Paged attention in Triton: one launch for prefill, chunked prefill, prefix-cached prefill and decode.

Each program owns a tile of BLOCK_M rows = BLOCK_Q consecutive queries x the GROUP query heads that
share one KV head, so every KV tile it loads is used by the whole GQA group (read once per group).
It walks the sequence's paged keys with a flash-attention online softmax in fp32. When the batch is too
small to fill the GPU (decode at small batch, long contexts), the key range is cut into NUM_SPLITS
chunks handled by separate programs, and a second kernel merges their partial results (flash-decoding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# exp2 is cheaper than exp on the GPU; scores are pre-multiplied by log2(e) to compensate.
_LOG2E = 1.4426950408889634

# Split-KV never cuts a sequence into chunks shorter than this.
_MIN_TOKENS_PER_SPLIT = 256
# The tile heights (rows = queries x GQA group) and split-KV factors the launcher picks from. It picks only
# these, and `python -m tokenmill.kernels.aot` compiles every one of them for each model, dtype and GPU generation.
BLOCK_M_CHOICES = (16, 32, 64, 128)
NUM_SPLITS_CHOICES = (1, 2, 4, 8, 16, 32)
# Stand-in SM count where there is no CUDA device (the interpreter): an H100 SXM's, so the host-side
# choices made in tests are the ones made on the target.
_DEFAULT_SM_COUNT = 132


@triton.jit
def _find_seq(query_start_loc_ptr, num_seqs, q_block, BLOCK_Q: tl.constexpr):
    """Sequence owning global q block `q_block`: sequence i owns blocks from start_loc[i] // BLOCK_Q + i on.

    That start is an upper bound on the blocks of the sequences before i, so the grid size follows from
    shapes alone (num_tokens // BLOCK_Q + num_seqs) and no host sync is needed to lay out the work.
    """
    lo = num_seqs * 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= q_block, mid, lo)
        hi = tl.where(first <= q_block, hi, mid - 1)
    return lo


# The batch's sizes change every step; specialising on them (== 1, multiple of 16) would only multiply the
# variants compiled while serving. The block table's row stride is its width, which changes with the batch too.
@triton.jit(do_not_specialize=["num_seqs", "num_tokens", "stride_bt"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale_log2e, num_seqs, num_tokens, num_heads,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SPLIT_KV: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_seq(query_start_loc_ptr, num_seqs, q_block, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block -= q_start // BLOCK_Q + seq  # now local to the sequence
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # Row r is query q_block * BLOCK_Q + r // GROUP of the sequence, head kv_head * GROUP + r % GROUP.
    rows = tl.arange(0, BLOCK_M)
    q_idx = q_block * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = context_len + q_idx
    token = q_start + q_idx
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST_DOT:  # the interpreter cannot do arithmetic in bf16
        q = q.to(tl.float32)

    # Causal: this tile's last query sees keys up to its own position, so no key past it is loaded.
    kv_len = tl.minimum(seq_len, context_len + (q_block + 1) * BLOCK_Q)
    num_tiles = tl.cdiv(kv_len, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, tl.num_programs(2))  # the grid's third dimension is the split count
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    # A finite floor keeps rows whose keys in this split are all masked free of inf - inf = nan.
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(tile_lo, tile_hi):
        n = tile * TILE_N + tl.arange(0, TILE_N)
        n_ok = n < kv_len
        page = tl.load(table + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        slot_in_page = n % BLOCK_SIZE
        k = tl.load(k_cache_ptr + (page * stride_kb + slot_in_page * stride_ks + kv_head * stride_kh)[None, :]
                    + d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * scale_log2e
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + (page * stride_vb + slot_in_page * stride_vs + kv_head * stride_vh)[:, None]
                    + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=DOT_PRECISION)
        m = m_new

    if not SPLIT_KV:
        # denom is 0 only on padding rows, which are not stored
        out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # Unnormalised partials, [split, token, head, ...]; empty splits store m = -1e30, denom = 0, acc = 0.
        part = (split * num_tokens + token) * num_heads + head
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(part_ml_ptr + part * 2, m, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, denom, mask=row_ok)


@triton.jit(do_not_specialize=["num_tokens"])
def _merge_splits_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, num_tokens, num_heads, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    part = (s * num_tokens + token) * num_heads + head
    m = tl.load(part_ml_ptr + part * 2, mask=s_ok, other=float("-inf"))
    denom = tl.load(part_ml_ptr + part * 2 + 1, mask=s_ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                  other=0.0)
    # Split 0 always holds key 0, which every query sees, so the max is finite.
    w = tl.exp2(m - tl.max(m, 0))
    out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * denom, 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def block_m_choices(dtype: torch.dtype) -> tuple[int, ...]:
    """The tile heights for q's dtype. float32 dots run on the FMA units (ieee precision, no tensor cores),
    where taller tiles only add registers: from 64 rows they spill on sm_90 (`python -m tokenmill.kernels.aot`)."""
    return BLOCK_M_CHOICES[:2] if dtype == torch.float32 else BLOCK_M_CHOICES


def _tile_n(head_dim: int, dtype: torch.dtype) -> int:
    """Keys per inner-loop tile. Pages are gathered per key, so it need not match the cache block size;
    the per-key addresses cost registers: at head_dim 128 a 64-key tile spills on sm_90, and float32 (FMA
    dots) spills from 32 keys."""
    if dtype == torch.float32:
        return 16
    return 64 if head_dim <= 64 else 32


def _num_warps(block_m: int, dtype: torch.dtype) -> int:
    # Tall tiles and float32 ones (FMA dots) spread over more threads, fewer registers each: with 4 warps
    # SmolLM2's 64-row split tile spills on sm_80, and float32 spills on sm_90.
    return 8 if block_m >= 64 or dtype == torch.float32 else 4


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_block_m(max_q_len: int, group: int, dtype: torch.dtype) -> int:
    """Rows per program: decode wants few (one query x the group), prefill tall tiles for the tensor cores."""
    rows, choices = max_q_len * group, block_m_choices(dtype)
    fits = [m for m in choices if m >= group]
    # A group larger than every choice (no model has one) gets a tile of its own: BLOCK_M holds one whole group.
    return next((m for m in fits if m >= rows), fits[-1] if fits else triton.next_power_of_2(group))


def choose_num_splits(num_programs: int, max_seq_len: int, device: torch.device) -> int:
    """Split-KV factor from NUM_SPLITS_CHOICES: the largest one up to about two waves of programs, with no
    chunk shorter than a few tiles."""
    sm_count = _sm_count(device)
    if num_programs >= sm_count:
        return 1
    bound = min(triton.cdiv(2 * sm_count, num_programs), triton.cdiv(max_seq_len, _MIN_TOKENS_PER_SPLIT))
    return max(n for n in NUM_SPLITS_CHOICES if n <= max(bound, 1))


def launch_every_variant(num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> None:
    """Launch once each variant the launcher can pick for this model (every tile height and split count), on
    one sequence of as many queries as the tile holds, reading block 0 and keeping nothing. The engine calls
    it at start-up, so Triton compiles them all (or loads them from its cache) before the first request
    instead of stalling requests mid-serve; `python -m tokenmill.kernels.aot` compiles the same set."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    dtype, device = k_cache.dtype, k_cache.device
    group = num_heads // num_kv_heads
    for block_m in block_m_choices(dtype):
        if block_m < group:
            continue
        q_len = block_m // group
        q = torch.zeros(q_len, num_heads, head_dim, dtype=dtype, device=device)
        tables = torch.zeros(1, triton.cdiv(q_len, block_size), dtype=torch.int32, device=device)
        lens = torch.tensor([q_len], dtype=torch.int32, device=device)
        starts = torch.tensor([0, q_len], dtype=torch.int32, device=device)
        for splits in NUM_SPLITS_CHOICES:
            paged_attention(q, k_cache, v_cache, tables, lens, starts, scale, num_splits=splits)


def plan_attention(block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                   block_size: int) -> None:
    """No per-step host plan: the kernel finds each program's sequence on the device."""
    return None


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float,
                    out: torch.Tensor | None = None, plan: None = None, *, max_q_len: int | None = None,
                    max_seq_len: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Causal attention of packed queries over paged KV; same contract as `kernels.reference`.

    Never syncs with the device, so it can be captured in a CUDA graph; it needs no plan (plan_attention's is
    None). The optional hints only tune the launch (results do not depend on them): max_q_len (default: 1 if
    every sequence could be a decode, else num_tokens), max_seq_len (default: the block table's capacity),
    num_splits (default: chosen from the shapes, one of NUM_SPLITS_CHOICES; any other count works but is not
    among the variants `python -m tokenmill.kernels.aot` checks). Under graph capture, pass hints that stay
    fixed for the captured shapes.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert q.stride(-1) == out.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1
    group = num_heads // num_kv_heads

    if max_q_len is None:
        max_q_len = 1 if num_tokens == num_seqs else num_tokens
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * block_size
    block_m = choose_block_m(max_q_len, group, q.dtype)
    block_q = block_m // group
    grid_q = num_tokens // block_q + num_seqs
    if num_splits is None:
        busy_blocks = min(grid_q, num_seqs * triton.cdiv(max_q_len, block_q))
        num_splits = choose_num_splits(busy_blocks * num_kv_heads, max_seq_len, q.device)

    block_d = triton.next_power_of_2(head_dim)
    if num_splits > 1:
        part_acc = torch.empty(num_splits, num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(num_splits, num_tokens, num_heads, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    _paged_attention_kernel[(grid_q, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_acc, part_ml, block_tables, seq_lens, query_start_loc,
        scale * _LOG2E, num_seqs, num_tokens, num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, TILE_N=_tile_n(head_dim, q.dtype),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size, SPLIT_KV=num_splits > 1,
        UPCAST_DOT=q.device.type == "cpu" and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=_num_warps(block_m, q.dtype),
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part_acc, part_ml, out, num_tokens, num_heads, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
            BLOCK_D=block_d,
        )
    return out
