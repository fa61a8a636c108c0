"""The building blocks of a Llama-family decoder. They call the kernel ops chosen for the device:
Triton kernels on CUDA; on CPU the C++ ops where they build, else the plain-PyTorch references."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tokenmill.kernels import reference
from tokenmill.kernels.reference import LoRAPlan

if TYPE_CHECKING:
    from tokenmill.engine.executor.shm_collectives import ShmCollectives


def kernel_ops(device: torch.device, cpu_kernels: bool = True) -> ModuleType:
    """The module whose functions implement the hot ops on this device (cpu_kernels: EngineConfig's)."""
    if device.type == "cuda":
        from tokenmill import kernels

        return kernels
    if cpu_kernels:
        from tokenmill.kernels import cpu

        if cpu.load():  # else it warned once, and the references serve
            from tokenmill.kernels.cpu import ops

            return ops
    return reference


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV cache (built once per step by the model runner)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: tokens in the cache after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    # The ops module's plan_attention of the above: host-side layout shared by every layer (None: none needed)
    plan: object | None = None


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among the tensor-parallel ranks (Megatron style), and the collectives the
    layers need over torch.distributed's default group.

    The column- and row-parallel linears are plain linears holding a rank's shard: q/k/v and gate/up
    keep the rows of their heads or intermediate slice (column-parallel, no communication), o and down the
    matching columns (row-parallel: each rank's output is a partial sum, all-reduced by the layer that
    owns it). Keeping them nn.Linear keeps their names and types, so packing (engine/weights/quantization.py)
    treats them as any other linear."""

    rank: int = 0
    world_size: int = 1
    shm: ShmCollectives | None = field(default=None, compare=False)  # CPU ranks: used where a tensor fits

    def split(self, n: int) -> range:
        """This rank's part of n things split as evenly as possible (the first n % world_size get one more)."""
        size, extra = divmod(n, self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return range(start, start + size + (self.rank < extra))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        if self.shm is not None and self.shm.fits(x):
            return self.shm.all_reduce(x)
        dist.all_reduce(x)
        return x

    def gather_last_dim(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Every rank's split() slice of the last dimension, concatenated: [..., total]. The slices may
        differ by one, so each is padded to the largest for the all-gather and trimmed after."""
        if self.world_size == 1:
            return x
        width = -(-total // self.world_size)
        padded = F.pad(x, (0, width - x.shape[-1])).contiguous()
        if self.shm is not None and self.shm.fits(padded):
            parts = self.shm.all_gather(padded)
        else:
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded)
        sizes = [len(TensorParallel(r, self.world_size).split(total)) for r in range(self.world_size)]
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes, strict=True)], dim=-1)


SINGLE_RANK = TensorParallel()


@dataclass(frozen=True)
class HeadSplit:
    """The query and KV heads a rank holds: ranges into the model's heads."""

    q_heads: range
    kv_heads: range


def split_heads(num_heads: int, num_kv_heads: int, tp: TensorParallel) -> HeadSplit:
    """Split attention by KV group, so that a rank's query heads always attend over KV heads it holds.
    With at least as many KV heads as ranks, each rank takes whole groups, as evenly as possible (9 query
    heads in 3 groups at TP=2: groups 0-1 on rank 0, group 2 on rank 1; vLLM asks for even division).
    With fewer, each KV head is replicated on the ranks that share its group's query heads."""
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp.world_size:
        kv = tp.split(num_kv_heads)
        return HeadSplit(range(kv.start * group, kv.stop * group), kv)
    kv_head = tp.rank * num_kv_heads // tp.world_size
    sharing = [r for r in range(tp.world_size) if r * num_kv_heads // tp.world_size == kv_head]
    if group < len(sharing):
        raise ValueError(f"cannot split {num_heads} query heads in {num_kv_heads} KV groups over "
                         f"{tp.world_size} tensor-parallel ranks: a rank would hold no query head")
    q = TensorParallel(sharing.index(tp.rank), len(sharing)).split(group)
    return HeadSplit(range(kv_head * group + q.start, kv_head * group + q.stop), range(kv_head, kv_head + 1))


def empty_linear(in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None = None) -> nn.Linear:
    """An nn.Linear on the default device whose weights are left unset (as the embedding's are): the
    checkpoint or init_dummy_weights sets every parameter, and nn.Linear's own random init of a 135M model
    costs about a second per start."""
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, dtype=dtype,
                              device=torch.get_default_device())


class VocabParallelEmbedding(nn.Module):
    """The embedding table split by vocabulary rows: each rank looks up the ids in its slice, zeros for
    the others, and the all-reduce sums the one non-zero row per token."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel):
        super().__init__()
        self.vocab = tp.split(vocab_size)
        self.weight = nn.Parameter(torch.empty(len(self.vocab), hidden_size))
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab.start) & (input_ids < self.vocab.stop)
        h = F.embedding((input_ids - self.vocab.start) * mine, self.weight) * mine[:, None]
        return self.tp.all_reduce(h)


@dataclass
class LoRAContext:
    """This step's LoRA plan, shared by every LoRALinear (set by the model runner; None: no adapter runs)."""

    plan: LoRAPlan | None = None


class LoRALinear(nn.Module):
    """A base linear of any kind (plain, prepacked, quantized) plus each token's LoRA delta:
    y = base(x) + (x @ A[s].T) @ B[s].T, s the slot of the token's adapter, the scaling folded into B.

    A packed linear's slices (q|k|v, gate|up) sit side by side in the rank dimension: A stacks their A's,
    and B is block-diagonal (each slice's B in its own rows and rank columns), so one shrink and one expand
    give the concatenation of the slices' deltas. The zeros cost (slices - 1) x rank x out multiply-adds
    per token in the expand; one kernel per linear instead of one per slice pays for them."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, num_slices: int, max_loras: int,
                 max_rank: int, context: LoRAContext, ops: ModuleType):
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", torch.zeros(max_loras, num_slices * max_rank, in_features), persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, out_features, num_slices * max_rank),
                             persistent=False)
        self.context = context
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.context.plan is not None:
            self.ops.add_lora(y, x, self.lora_a, self.lora_b, self.context.plan)
        return y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: ModuleType):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Rotary inverse frequencies, rescaled as configured: Llama 3's long-context scaling, linear
    (position interpolation), or freq_factors (one divisor per frequency, as a GGUF's rope_freqs)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "freq_factors":
        inv_freq = inv_freq / torch.tensor(scaling["freq_factors"], dtype=torch.float32)
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: llama3, linear, freq_factors)")
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once in float32 as transformers does."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None,
                 ops: ModuleType):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.ops = ops

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Rotate q and k in place and write k and v into the caches at slot_mapping, in one op."""
        self.ops.rotary_and_cache(positions, q, k, v, self.cos, self.sin, k_cache, v_cache, slot_mapping)


class Attention(nn.Module):
    """Grouped-query self-attention over the paged KV cache. q, k, v come from one fused projection."""

    def __init__(self, cfg, ops: ModuleType, tp: TensorParallel = SINGLE_RANK):
        super().__init__()
        heads = split_heads(cfg.num_attention_heads, cfg.num_key_value_heads, tp)
        self.num_heads, self.num_kv_heads = len(heads.q_heads), len(heads.kv_heads)
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = empty_linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        o_bias = cfg.attention_bias and cfg.architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM")
        self.o_proj = empty_linear(self.q_size, cfg.hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.ops = ops
        self.tp = tp

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, rotary: RotaryEmbedding) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # Rotary works in place, here on strided views of the projection's output (which nothing else reads):
        # every implementation takes q and k by their strides, so no copy.
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        rotary(positions, q, k, v, k_cache, v_cache, meta.slot_mapping)
        o = self.ops.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                     meta.query_start_loc, self.scale, plan=meta.plan)
        return self.tp.all_reduce(self.o_proj(o.reshape(-1, self.q_size)))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one projection. Under tensor parallelism
    intermediate_size is this rank's slice, and down's partial sums are all-reduced."""

    def __init__(self, hidden_size: int, intermediate_size: int, ops: ModuleType,
                 tp: TensorParallel = SINGLE_RANK):
        super().__init__()
        self.gate_up_proj = empty_linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = empty_linear(intermediate_size, hidden_size, bias=False)
        self.ops = ops
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x))))
