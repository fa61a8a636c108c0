"""paged_attention against kernels.reference and a float64 oracle, under varied batch layouts."""
import math

import pytest
import torch
from kernel_utils import DEVICE, rel_err, tolerance

from tokenmill import kernels
from tokenmill.kernels import attention, reference

NUM_KV_HEADS = 2
# (q_len, seq_len) per sequence: full prefill, decode, prefill after a cached prefix / chunked prefill,
# decode of a 1-token sequence, decode one past a block boundary.
MIXED = [(37, 37), (1, 50), (19, 70), (1, 1), (1, 33)]
# Long enough that each split gets tiles, short enough for the interpreter.
LONG = [(1, 300), (20, 200), (5, 5), (1, 129)]
GARBAGE = 1e3  # fills cache slots no query may see: reading one shows up as a large error


def make_batch(specs, group: int, head_dim: int, block_size: int, dtype: torch.dtype):
    """Packed queries and a paged cache whose blocks are handed out in random order."""
    q_lens = [a for a, _ in specs]
    seq_lens = [b for _, b in specs]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(blocks_per_seq) + 1  # a spare column: tables are wider than any sequence needs
    num_blocks = sum(blocks_per_seq) + 1  # the last block is never owned: table padding points at it
    shape = (num_blocks, block_size, NUM_KV_HEADS, head_dim)
    k_cache = torch.full(shape, GARBAGE, dtype=dtype)
    v_cache = torch.full(shape, GARBAGE, dtype=dtype)
    order = torch.randperm(num_blocks - 1)
    tables = torch.full((len(specs), max_blocks), num_blocks - 1, dtype=torch.int32)
    used = 0
    for i, (n, seq_len) in enumerate(zip(blocks_per_seq, seq_lens, strict=False)):
        own = order[used:used + n]
        used += n
        tables[i, :n] = own.int()
        slots = (own[:, None] * block_size + torch.arange(block_size)).flatten()[:seq_len]
        k_cache.view(-1, NUM_KV_HEADS, head_dim)[slots] = torch.randn(seq_len, NUM_KV_HEADS, head_dim).to(dtype)
        v_cache.view(-1, NUM_KV_HEADS, head_dim)[slots] = torch.randn(seq_len, NUM_KV_HEADS, head_dim).to(dtype)
    q = torch.randn(sum(q_lens), NUM_KV_HEADS * group, head_dim).to(dtype)
    start_loc = torch.tensor([0] + q_lens).cumsum(0).int()
    args = (q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32), start_loc)
    return tuple(t.to(DEVICE) for t in args)


def oracle(q, k_cache, v_cache, tables, seq_lens, start_loc, scale) -> torch.Tensor:
    """Float64, one query at a time, straight from the definition."""
    block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, seq_len in enumerate(seq_lens.tolist()):
        a, b = start_loc[i].item(), start_loc[i + 1].item()
        slots = (tables[i].long().cpu()[:, None] * block_size + torch.arange(block_size)).flatten()[:seq_len]
        k = k_cache.cpu().view(-1, k_cache.shape[2], head_dim)[slots].double().repeat_interleave(group, 1)
        v = v_cache.cpu().view(-1, v_cache.shape[2], head_dim)[slots].double().repeat_interleave(group, 1)
        for j in range(b - a):
            visible = seq_len - (b - a) + j + 1
            s = torch.einsum("hd,khd->hk", q[a + j].cpu().double(), k[:visible]) * scale
            out[a + j] = torch.einsum("hk,khd->hd", s.softmax(-1), v[:visible])
    return out


def check(specs, dtype, group, head_dim, block_size, **kwargs) -> None:
    batch = make_batch(specs, group, head_dim, block_size, dtype)
    scale = 1 / math.sqrt(head_dim)
    out = kernels.paged_attention(*batch, scale, **kwargs)
    ref = reference.paged_attention(*batch, scale)
    assert out.dtype == dtype and out.shape == batch[0].shape
    assert rel_err(out, ref) < tolerance(dtype)
    assert rel_err(out, oracle(*batch, scale)) < tolerance(dtype)


@pytest.mark.parametrize("dtype, group, head_dim, block_size, num_splits", [
    (torch.float32, 1, 64, 16, None),
    (torch.float16, 4, 128, 32, None),
    (torch.bfloat16, 8, 64, 16, None),
    (torch.float32, 3, 128, 32, None),
    (torch.float16, 3, 80, 16, None),  # head_dim that is not a power of two
    (torch.float32, 8, 128, 16, 3),
    (torch.bfloat16, 4, 64, 32, 4),
])
def test_mixed_batch(dtype, group, head_dim, block_size, num_splits):
    check(MIXED, dtype, group, head_dim, block_size, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_kv_long(num_splits):
    """Splits that hold several tiles, others that hold none (short sequences), in one batch."""
    check(LONG, torch.float32, 4, 64, 16, num_splits=num_splits)


@pytest.mark.parametrize("group", [1, 3, 8])
def test_decode_only(group):
    check([(1, n) for n in (1, 17, 64, 90)], torch.float16, group, 128, 16)


def test_chooses_split_kv_for_small_long_batch(monkeypatch):
    """Two long decodes can't fill the GPU: the default launch must split the keys, and stay correct."""
    chosen = []
    real = attention.choose_num_splits

    def spy(*args):
        chosen.append(real(*args))
        return chosen[-1]

    monkeypatch.setattr(attention, "choose_num_splits", spy)
    check([(1, 600), (1, 450)], torch.float32, 4, 64, 32)
    assert chosen[0] > 1


def test_hints_do_not_change_results():
    batch = make_batch(MIXED, 4, 64, 16, torch.float32)
    base = kernels.paged_attention(*batch, 0.125)
    hinted = kernels.paged_attention(*batch, 0.125, max_q_len=37, max_seq_len=70)
    assert rel_err(hinted, base) < 1e-6


def test_writes_into_out():
    batch = make_batch(MIXED, 1, 64, 16, torch.float32)
    out = torch.zeros_like(batch[0])
    assert kernels.paged_attention(*batch, 0.125, out=out) is out
    assert rel_err(out, reference.paged_attention(*batch, 0.125)) < 1e-4
