"""The C++ CPU ops (kernels/cpu) against kernels.reference: paged attention over shuffled pages for decode,
prefill and prefix-cached chunks in one batch, the small fused ops, their fake kernels, and the fallback."""
import logging

import pytest
import torch
from kernel_utils import rel_err, tolerance

from tokenmill.engine.models.layers import kernel_ops
from tokenmill.kernels import cpu, reference

if not cpu.load():
    pytest.skip("the C++ CPU ops did not build here (see the warning logged)", allow_module_level=True)

from tokenmill.kernels.cpu import ops  # noqa: E402  (only importable once the library loaded)

DTYPES = [torch.float32, torch.bfloat16]


def paged_batch(q_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
                block_size: int, dtype: torch.dtype):
    """Random q and caches; each sequence's blocks are scattered over a shuffled pool with spare blocks, whose
    (random) contents must never be read."""
    blocks = [-(-n // block_size) for n in seq_lens]
    pool = torch.randperm(sum(blocks) + 3)
    tables = torch.zeros(len(seq_lens), max(blocks) + 1, dtype=torch.int32)  # a spare column, as the runner pads
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = pool[used:used + n]
        used += n
    shape = (len(pool), block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    starts = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).int()
    q = torch.randn(int(starts[-1]), num_heads, head_dim, dtype=dtype)
    return q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32), starts


BATCHES = {
    "decode, lengths 1, at and past block ends, long": ([1] * 6, [1, 15, 16, 17, 64, 1000]),
    "one prompt": ([100], [100]),
    "chunk after a cached prefix": ([37], [300]),
    "decode, prefill and prefix-cached prefill together": ([1, 50, 1, 20, 1], [33, 50, 700, 90, 5]),
    "one long decode (split across threads)": ([1], [2000]),
    "a long chunk after a long prefix (split across threads)": ([150], [900]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(9, 3, 64), (16, 8, 128), (4, 4, 64), (8, 1, 80)], ids=str)
@pytest.mark.parametrize("batch", list(BATCHES), ids=list(BATCHES))
def test_paged_attention_matches_reference(batch, heads, dtype):
    q_lens, seq_lens = BATCHES[batch]
    args = paged_batch(q_lens, seq_lens, *heads, block_size=16, dtype=dtype)
    out = ops.paged_attention(*args, 0.1)
    q, k_cache, v_cache, *meta = args
    expected = reference.paged_attention(q.double(), k_cache.double(), v_cache.double(), *meta, 0.1)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, expected) < tolerance(dtype)


@pytest.mark.parametrize("block_size", [8, 32, 128])
def test_paged_attention_other_block_sizes(block_size):
    args = paged_batch([1, 40, 3], [200, 40, 150], 6, 2, 64, block_size, torch.float32)
    expected = reference.paged_attention(*args, 0.125)
    assert rel_err(ops.paged_attention(*args, 0.125), expected) < 1e-4


def test_paged_attention_same_with_one_thread_as_with_split_keys():
    args = paged_batch([1, 1], [1500, 900], 9, 3, 64, 16, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # no key splitting
        single = ops.paged_attention(*args, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert rel_err(ops.paged_attention(*args, 0.125), single) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_cache_matches_reference(dtype):
    num_tokens, block_size, head_dim = 20, 16, 64
    positions = torch.randint(0, 500, (num_tokens,))
    angles = torch.arange(512)[:, None] * torch.rand(head_dim // 2)[None, :]
    cos, sin = angles.cos(), angles.sin()
    slots = torch.randperm(4 * block_size)[:num_tokens]
    slots[3] = -1  # skipped token
    q, k, v = (torch.randn(num_tokens, h, head_dim, dtype=dtype) for h in (9, 3, 3))
    caches = [torch.randn(4, block_size, 3, head_dim, dtype=dtype) for _ in range(2)]
    expected = [t.clone() for t in (q, k, *caches)]
    ops.rotary_and_cache(positions, q, k, v, cos, sin, *caches, slots)
    reference.rotary_and_cache(positions, expected[0], expected[1], v, cos, sin, *expected[2:], slots)
    for got, want in zip((q, k, *caches), expected, strict=True):
        assert rel_err(got, want) < tolerance(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_embedding_and_write_kv_cache_match_reference(dtype):
    positions = torch.arange(5) * 7
    cos, sin = torch.rand(64, 16), torch.rand(64, 16)
    q, k = torch.randn(5, 4, 32, dtype=dtype), torch.randn(5, 2, 32, dtype=dtype)
    q_ref, k_ref = q.clone(), k.clone()
    ops.rotary_embedding(positions, q, k, cos, sin)
    reference.rotary_embedding(positions, q_ref, k_ref, cos, sin)
    assert rel_err(q, q_ref) < tolerance(dtype) and rel_err(k, k_ref) < tolerance(dtype)
    caches = [torch.zeros(2, 8, 2, 32, dtype=dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    slots = torch.tensor([3, -1, 8, 15, 0])
    ops.write_kv_cache(k, q[:, :2], *caches, slots)
    reference.write_kv_cache(k, q[:, :2], *expected, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 300])
def test_rms_norm_and_silu_and_mul_match_reference(dtype, rows):
    x, residual = torch.randn(rows, 576, dtype=dtype), torch.randn(rows, 576, dtype=dtype)
    weight = torch.rand(576, dtype=dtype) + 0.5
    assert rel_err(ops.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5)) < tolerance(dtype)
    normed, summed = ops.rms_norm(x, weight, 1e-5, residual)
    want_normed, want_summed = reference.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(summed, want_summed)
    assert rel_err(normed, want_normed) < tolerance(dtype)
    gate_up = torch.randn(rows, 2 * 1536, dtype=dtype)
    assert rel_err(ops.silu_and_mul(gate_up), reference.silu_and_mul(gate_up)) < tolerance(dtype)


def test_ops_pass_opcheck_with_their_fake_kernels():
    q, k_cache, v_cache, tables, lens, starts = paged_batch([1, 5], [20, 5], 4, 2, 16, 8, torch.float32)
    x = torch.randn(3, 32)
    positions, cos, sin = torch.arange(3), torch.rand(8, 8), torch.rand(8, 8)
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    cases = [
        (torch.ops.tokenmill.paged_attention, (q, k_cache, v_cache, tables, lens, starts, 0.25)),
        (torch.ops.tokenmill.rms_norm, (x, torch.rand(32), 1e-6)),
        (torch.ops.tokenmill.fused_add_rms_norm, (x, torch.randn(3, 32), torch.rand(32), 1e-6)),
        (torch.ops.tokenmill.silu_and_mul, (x,)),
        (torch.ops.tokenmill.rotary_and_cache, (positions, torch.randn(3, 4, 16), k, v, cos, sin, k_cache.clone(),
                                                v_cache.clone(), torch.tensor([0, -1, 9]))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_cpu_kernels_off_gives_the_reference_and_on_gives_the_cpp_ops():
    assert kernel_ops(torch.device("cpu"), cpu_kernels=False) is reference
    assert kernel_ops(torch.device("cpu"), cpu_kernels=True) is ops


def test_failed_build_warns_once_and_reports_unavailable(monkeypatch, tmp_path, caplog):
    from tokenmill.kernels.cpu import build

    def no_compiler(library):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(build, "CACHE_ROOT", tmp_path)
    monkeypatch.setattr(build, "_build", no_compiler)
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert build.load.__wrapped__() is False  # uncached: the real load() already succeeded in this process
    assert len(caplog.records) == 1 and "no compiler" in caplog.text
