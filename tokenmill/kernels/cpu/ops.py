"""The ops module the model calls on CPU when the C++ ops load: kernels.reference's interface, backed by
torch.ops.tokenmill. Importing it builds or loads the library; use it only after `kernels.cpu.load()`."""
from __future__ import annotations

import torch

from ..reference import add_lora  # noqa: F401 - no C++ version: a segment's two matmuls are BLAS already
from .build import load

if not load():
    raise ImportError("the C++ CPU ops are unavailable (see the warning above); use kernels.reference")

_ops = torch.ops.tokenmill
write_kv_cache = _ops.write_kv_cache
rotary_embedding = _ops.rotary_embedding
rotary_and_cache = _ops.rotary_and_cache
silu_and_mul = _ops.silu_and_mul


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None) -> None:
    """Structured outputs' mask on `rows`, in place; same contract as kernels.reference."""
    _ops.apply_token_bitmask(logits, bitmask, None if rows is None else torch.tensor(rows, dtype=torch.long))


def plan_attention(block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                   block_size: int) -> None:
    """No per-step plan: the C++ kernel lays out its work from the tensors in microseconds."""
    return None


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    plan: None = None) -> torch.Tensor:
    """Causal attention of packed queries over paged KV; same contract as kernels.reference."""
    return _ops.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm in float32; with residual, adds it first and returns (normed, x + residual)."""
    if residual is None:
        return _ops.rms_norm(x, weight, eps)
    return _ops.fused_add_rms_norm(x, residual, weight, eps)
