"""Shape functions (fake kernels) of the tokenmill ops, for torch.compile and FakeTensor tracing."""
from __future__ import annotations

import torch

from .isa import vector_floats


@torch.library.register_fake("tokenmill::paged_attention")
def _paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    return q.new_empty(q.shape)


@torch.library.register_fake("tokenmill::rms_norm")
def _rms_norm(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.register_fake("tokenmill::fused_add_rms_norm")
def _fused_add_rms_norm(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.register_fake("tokenmill::silu_and_mul")
def _silu_and_mul(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.register_fake("tokenmill::write_kv_cache")
def _write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    return None


@torch.library.register_fake("tokenmill::rotary_embedding")
def _rotary_embedding(positions, q, k, cos, sin):
    return None


@torch.library.register_fake("tokenmill::rotary_and_cache")
def _rotary_and_cache(positions, q, k, v, cos, sin, k_cache, v_cache, slot_mapping):
    return None


@torch.library.register_fake("tokenmill::apply_token_bitmask")
def _apply_token_bitmask(logits, bitmask, indices):
    return None


@torch.library.register_fake("tokenmill::int4_linear")
def _int4_linear(x, qweight, scales, zeros):
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.register_fake("tokenmill::int8_linear")
def _int8_linear(x, qweight, scales):
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.register_fake("tokenmill::pack_linear_weight")
def _pack_linear_weight(weight):
    panel = 2 * vector_floats()  # the kernel's panel: two vectors
    return weight.new_empty((-(-weight.shape[0] // panel), weight.shape[1], panel))


@torch.library.register_fake("tokenmill::packed_linear")
def _packed_linear(x, packed, n):
    return x.new_empty((x.shape[0], n))
