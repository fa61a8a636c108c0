"""write_kv_cache, rms_norm, rotary_embedding (alone and fused with the KV write) and silu_and_mul against
kernels.reference."""
import pytest
import torch
from kernel_utils import DEVICE, rel_err, tolerance

from tokenmill import kernels
from tokenmill.kernels import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype, cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.float32, torch.float16)])
@pytest.mark.parametrize("block_size, head_dim", [(16, 64), (32, 128)])
def test_write_kv_cache(dtype, cache_dtype, block_size, head_dim):
    num_tokens, num_kv_heads, num_blocks = 23, 3, 4
    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[[2, 11, 22]] = -1  # padding tokens
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = [torch.randn(cache_shape, device=DEVICE).to(cache_dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    kernels.write_kv_cache(k, v, *caches, slots)
    reference.write_kv_cache(k, v, *expected, slots)
    for got, want in zip(caches, expected, strict=False):
        assert torch.equal(got, want)  # a copy: exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    x = torch.randn(3, 5, 300, device=DEVICE).to(dtype)  # odd hidden size, 3-d input
    weight = (1 + 0.1 * torch.randn(300, device=DEVICE)).to(dtype)
    residual = torch.randn_like(x) if with_residual else None
    got = kernels.rms_norm(x, weight, 1e-6, residual)
    want = reference.rms_norm(x, weight, 1e-6, residual)
    if with_residual:
        assert rel_err(got[1], want[1]) < tolerance(dtype)
        got, want = got[0], want[0]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert rel_err(got, want) < tolerance(dtype)


def test_rms_norm_float32_weight_promotes():
    x = torch.randn(4, 64, device=DEVICE).to(torch.bfloat16)
    weight = torch.rand(64, device=DEVICE) + 0.5
    got, want = kernels.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5)
    assert got.dtype == want.dtype == torch.float32
    assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_embedding(dtype, head_dim):
    num_tokens, num_heads, num_kv_heads, max_pos = 7, 6, 2, 50
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_pos).float(), inv_freq)
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    positions = torch.randint(0, max_pos, (num_tokens,), device=DEVICE)
    # q and k as strided views of one fused qkv projection, as the model produces them.
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE).to(dtype)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    q_ref, k_ref = q.clone(), k.clone()
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    kernels.rotary_embedding(positions, q, k, cos, sin)
    reference.rotary_embedding(positions, q_ref, k_ref, cos, sin)
    assert rel_err(q, q_ref) < tolerance(dtype)
    assert rel_err(k, k_ref) < tolerance(dtype)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], v_before)  # v untouched


def test_rotary_and_cache_rotates_and_writes_like_the_reference():
    num_tokens, num_heads, num_kv_heads, head_dim, block_size = 5, 4, 2, 64, 16
    angles = torch.outer(torch.arange(32).float(), torch.rand(head_dim // 2))
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    positions = torch.randint(0, 32, (num_tokens,), device=DEVICE)
    q, k, v = (torch.randn(num_tokens, h, head_dim, device=DEVICE) for h in (num_heads, num_kv_heads, num_kv_heads))
    slots = torch.tensor([4, -1, 17, 0, 31], device=DEVICE)
    caches = [torch.zeros(2, block_size, num_kv_heads, head_dim, device=DEVICE) for _ in range(2)]
    expected = [t.clone() for t in (q, k, *caches)]
    kernels.rotary_and_cache(positions, q, k, v, cos, sin, *caches, slots)
    reference.rotary_and_cache(positions, expected[0], expected[1], v, cos, sin, *expected[2:], slots)
    for got, want in zip((q, k, *caches), expected, strict=True):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [11, 1500])  # 1500 spans two column blocks
def test_silu_and_mul(dtype, d):
    x = torch.randn(2, 3, 2 * d, device=DEVICE).to(dtype)
    got, want = kernels.silu_and_mul(x), reference.silu_and_mul(x)
    assert got.dtype == dtype and got.shape == want.shape
    assert rel_err(got, want) < tolerance(dtype)
