"""Linears whose weights stay packed at run time, and the packing: GGUF blocks, int8 and int4 quantization.

`pack_linears` swaps every nn.Linear of a loaded model for a packed one (CPU only). Without quantization, in
float32 with the C++ ops loaded, that is tokenmill's prepacked float32 linear (`DenseLinear`); with it:
- gguf: a GGUF's own Q4_0/Q4_1 blocks, kept losslessly as int4 groups of 32; Q8_0 blocks as int8 groups
  (or, for torch's kernels, two int4 planes: high and low nibble of q + 128, whose sum is the block exactly).
- int8: per-output-channel symmetric int8 of any checkpoint; int4: groups of 32, asymmetric min/max (the
  LM head in int8).

Every quantization group runs along the input dimension, so rows of fused projections (q|k|v, gate|up)
concatenate as they are. The packed kernels win at small steps: the C++ ops (tokenmill::int4_linear,
int8_linear) in the activations' dtype where they are loaded, else torch's packed kernels with bfloat16
activations. A step with many rows (a prefill chunk, a large decode batch) takes a plain matmul of a dense
copy (`dense_route`): the packed float32 kernel where it is float32 and the C++ ops are loaded.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.models.layers import empty_linear
from tokenmill.engine.weights.loader import GGUFWeights
from tokenmill.kernels import cpu

GROUP_SIZE = 32  # GGUF's block size, and a group size torch's int4 kernel takes


@dataclass(frozen=True)
class DenseRoute:
    """Where a step is faster as a plain matmul than through the packed kernels: the dtype of the dense copy
    and the rows (M) from which it wins, for the decoder's layers and for the LM head."""

    dtype: torch.dtype
    layer_min_rows: int
    lm_head_min_rows: int


def dense_route(native: bool) -> DenseRoute:
    """The crossovers measured on each kind of CPU (2 threads, SmolLM2-135M's shapes); `native`: with the C++
    ops (their int4/int8 linears against the packed float32 one), else torch's kernels."""
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # AVX-512 BF16: 576->1536 packed int4 0.032 ms vs bf16 0.100 at M=1, 0.34 vs 0.24 at M=32;
        # LM head 576->49152 0.78 vs 3.38 ms at M=1, 10.9 vs 7.4 at M=32.
        return DenseRoute(torch.bfloat16, 16, 16)
    # AVX2 (no native bfloat16 matmul; bf16 runs 5x slower than fp32). With the C++ ops, the 120 layer
    # linears of a token: int4_linear 33.4 ms vs packed float32 40.8 at M=8, 59.4 vs 53.8 at M=16; the LM head
    # int8_linear 15.6 vs 16.3 ms at M=24, 20.9 vs 20.2 at M=32. torch's float32 matmul wins from M ~ 32 in the
    # layers and M ~ 64 in the LM head.
    return DenseRoute(torch.float32, 16, 32) if native else DenseRoute(torch.float32, 32, 64)


class Int4Planes:
    """One or more int4 planes whose dequantized sum is the weight: w = sum_p (q_p - 8) * scale_p + zero_p,
    with q_p in 0..15 and scale_p, zero_p per row and group of GROUP_SIZE inputs."""

    def __init__(self, planes: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.planes = list(planes)  # (q uint8 [N, K], scale float32 [N, K/G], zero float32 [N, K/G])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.planes[0][0].shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K]."""
        return sum(((q.float() - 8) * s.repeat_interleave(GROUP_SIZE, 1) + z.repeat_interleave(GROUP_SIZE, 1))
                   for q, s, z in self.planes)

    @staticmethod
    def cat(parts: Sequence[Int4Planes]) -> Int4Planes:
        """Rows of several weights stacked (a fused projection); each must have the same number of planes."""
        assert len({len(p.planes) for p in parts}) == 1, "fused weights must have the same block types"
        return Int4Planes([tuple(torch.cat(ts) for ts in zip(*plane, strict=True))
                           for plane in zip(*(p.planes for p in parts), strict=True)])


class Int8Groups:
    """Int8 in groups of GROUP_SIZE inputs: w = q * scale, q int8 [N, K], scale float32 [N, K/G]."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.q, self.scale = q, scale

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.repeat_interleave(GROUP_SIZE, 1)

    def int4_planes(self) -> Int4Planes:
        """The same weight as two int4 planes, for torch's int4 kernel: q + 128 = 16 hi + lo, so
        w = q * d = 16d * (hi - 8) + [d * (lo - 8) + 8d]."""
        u = (self.q.to(torch.int16) + 128).to(torch.uint8)
        d = self.scale
        return Int4Planes([(u >> 4, 16 * d, torch.zeros_like(d)), (u & 0x0F, d, 8 * d)])

    @staticmethod
    def cat(parts: Sequence[Int8Groups]) -> Int8Groups:
        return Int8Groups(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values uint8 [N, K] as tokenmill::int4_linear reads them, uint8 [N, K/2]: in each group's 16 bytes,
    byte j holds value j in its low nibble and value j + 16 in its high one (GGUF's layout)."""
    n, k = q.shape
    halves = q.reshape(n, k // GROUP_SIZE, 2, GROUP_SIZE // 2)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


# ---- GGUF blocks -----------------------------------------------------------------------------

def _halves(raw: np.ndarray, offset: int) -> np.ndarray:
    """GGUF's 4-bit values of each block of rows [N, blocks, bytes] as uint8 [N, blocks * 32]: byte j holds
    value j in its low nibble and value j + 16 in its high one."""
    qs = raw[:, :, offset:offset + GROUP_SIZE // 2]
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(raw.shape[0], -1)


def _fp16(raw: np.ndarray, offset: int) -> np.ndarray:
    return np.ascontiguousarray(raw[:, :, offset:offset + 2]).view(np.float16)[..., 0].astype(np.float32)


def gguf_q8_0(rows: np.ndarray) -> Int8Groups:
    """A Q8_0 tensor's blocks (2-byte d, 32 int8: w = q * d) as int8 groups, as they are."""
    raw = rows.reshape(rows.shape[0], -1, 34)
    return Int8Groups(torch.from_numpy(np.ascontiguousarray(raw[:, :, 2:]).view(np.int8).reshape(rows.shape[0], -1)),
                      torch.from_numpy(_fp16(raw, 0)))


def gguf_to_int4(kind: str, rows: np.ndarray) -> Int4Planes:
    """A GGUF tensor's blocks (uint8 [N, bytes per row]) as int4 planes with the same dequantized values."""
    n = rows.shape[0]
    if kind == "Q4_0":  # 2-byte d, 16 bytes of nibbles: w = (q - 8) * d
        raw = rows.reshape(n, -1, 18)
        d = torch.from_numpy(_fp16(raw, 0))
        return Int4Planes([(torch.from_numpy(_halves(raw, 2)), d, torch.zeros_like(d))])
    if kind == "Q4_1":  # 2-byte d, 2-byte m, 16 bytes of nibbles: w = q * d + m = (q - 8) * d + (m + 8d)
        raw = rows.reshape(n, -1, 20)
        d, m = torch.from_numpy(_fp16(raw, 0)), torch.from_numpy(_fp16(raw, 2))
        return Int4Planes([(torch.from_numpy(_halves(raw, 4)), d, m + 8 * d)])
    if kind == "Q8_0":
        return gguf_q8_0(rows).int4_planes()
    raise ValueError(f"--quantization gguf keeps Q4_0, Q4_1 and Q8_0 blocks, not {kind}; "
                     "use --quantization int4 or int8 to quantize this model at load")


# ---- quantizing float weights ------------------------------------------------------------------

def _bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """Rounded to bfloat16, the dtype the kernels read scales in, so that q is rounded against them."""
    return t.clamp_min(torch.finfo(torch.bfloat16).tiny).bfloat16().float()


def quantize_int4(w: torch.Tensor) -> Int4Planes:
    """Groups of GROUP_SIZE inputs, asymmetric: each group's min..max maps onto 0..15."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = _bf16_exact((hi - lo) / 15)
    zero = (lo + 8 * scale).bfloat16().float()
    q = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.uint8)
    return Int4Planes([(q.reshape(n, k), scale, zero)])


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel, symmetric: (q int8 [N, K], scale float32 [N]) with w ~ q * scale."""
    scale = _bf16_exact(w.float().abs().amax(1) / 127)
    return torch.round(w.float() / scale[:, None]).clamp(-128, 127).to(torch.int8), scale


# ---- modules -----------------------------------------------------------------------------------

class DenseLinear(nn.Module):
    """y = x W^T + b in float32 through tokenmill::packed_linear, W packed once into the kernel's panels: on
    CPU it runs the decoder's shapes 1.5-4x faster than torch's matmul, and each row's result does not depend
    on the batch it came in. Returns x's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features = weight.shape[0]
        self.packed = torch.ops.tokenmill.pack_linear_weight(weight.detach().float())
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.tokenmill.packed_linear(x.reshape(-1, x.shape[-1]).float(), self.packed, self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def dense_linear(weight: torch.Tensor, native: bool) -> nn.Module:
    """A plain y = x W^T in weight's dtype: tokenmill's packed kernel for float32 where native (the C++ ops
    loaded), else torch's matmul."""
    if native and weight.dtype == torch.float32:
        return DenseLinear(weight)
    linear = empty_linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


class PackedLinear(nn.Module):
    """y = x W^T + b with W packed, returned in x's dtype. With a dense copy of W, a step of at least
    dense_min_rows rows takes a plain matmul in the copy's dtype instead (`dense_linear`)."""

    def __init__(self, out_features: int, bias: torch.Tensor | None, dense: torch.Tensor | None,
                 dense_min_rows: int, native: bool):
        super().__init__()
        self.out_features = out_features
        self.bias = bias
        self.dense = None if dense is None else dense_linear(dense, native)
        self.dense_dtype = None if dense is None else dense.dtype
        self.dense_min_rows = dense_min_rows

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.dense is not None and x2.shape[0] >= self.dense_min_rows:
            y = self.dense(x2.to(self.dense_dtype))
        else:
            y = self.packed_mm(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int4Linear(PackedLinear):
    """Int4 planes: native, one plane through tokenmill::int4_linear in x's dtype; else in torch's CPU packed
    format (_weight_int4pack_mm_for_cpu) with bfloat16 activations, summed."""

    def __init__(self, planes: Int4Planes, bias: torch.Tensor | None = None, dense: torch.Tensor | None = None,
                 dense_min_rows: int = 0, native: bool = False):
        n, _ = planes.shape
        super().__init__(n, bias, dense, dense_min_rows, native)
        self.native = native
        if native:
            (q, s, z), = planes.planes  # one plane: what GGUF's Q4 blocks and quantize_int4 give
            self.qweight, self.scales, self.zeros = pack_int4(q), s.contiguous(), (z - 8 * s).contiguous()
            return
        # scales_and_zeros: [K / group, N, 2] in the activations' dtype
        self.planes = [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1),
                        torch.stack([s, z], -1).transpose(0, 1).contiguous().bfloat16())
                       for q, s, z in planes.planes]

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            return torch.ops.tokenmill.int4_linear(x, self.qweight, self.scales, self.zeros)
        x, y = x.bfloat16(), None
        for packed, scales_and_zeros in self.planes:
            p = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP_SIZE, scales_and_zeros)
            y = p if y is None else y.add_(p)
        return y


class Int8Linear(PackedLinear):
    """Per-channel int8 (_weight_int8pack_mm)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 dense: torch.Tensor | None = None, dense_min_rows: int = 0, native: bool = False):
        super().__init__(q.shape[0], bias, dense, dense_min_rows, native)
        self.q, self.scale = q, scale.bfloat16()

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.bfloat16(), self.q, self.scale)


class Int8GroupLinear(PackedLinear):
    """Int8 groups (GGUF's Q8_0) through tokenmill::int8_linear, in x's dtype: the C++ ops must be loaded."""

    def __init__(self, groups: Int8Groups, bias: torch.Tensor | None = None, dense: torch.Tensor | None = None,
                 dense_min_rows: int = 0):
        super().__init__(groups.shape[0], bias, dense, dense_min_rows, native=True)
        self.q, self.scale = groups.q.contiguous(), groups.scale.contiguous()

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tokenmill.int8_linear(x, self.q, self.scale)


# ---- swapping a model's linears --------------------------------------------------------------------

def _source_names(model: nn.Module, name: str) -> list[str]:
    """Hugging Face names of the checkpoint weights whose rows make up the linear `name`, in row order."""
    if name == "lm_head" and model.cfg.tie_word_embeddings:
        return ["embed_tokens.weight"]
    prefix, _, fused = name.rpartition(".")
    shards = sorted((shard, part) for part, (f, shard) in model._stacked.items() if f == fused)
    return [f"{prefix}.{part}.weight".lstrip(".") for _, part in shards] or [f"{name}.weight"]


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def _quantized_linear(model: nn.Module, name: str, linear: nn.Linear, mode: str,
                      blocks: dict[str, tuple[str, np.ndarray]] | None, route: DenseRoute,
                      native: bool) -> PackedLinear:
    w, bias = linear.weight.detach(), _bias(linear)
    min_rows = route.lm_head_min_rows if name == "lm_head" else route.layer_min_rows
    if mode == "gguf":
        sources = [blocks[n] for n in _source_names(model, name)]
        if native and all(kind == "Q8_0" for kind, _ in sources):
            packed = Int8Groups.cat([gguf_q8_0(rows) for _, rows in sources])
        else:
            packed = Int4Planes.cat([gguf_to_int4(*source) for source in sources])
    elif mode == "int4" and name != "lm_head":
        packed = quantize_int4(w)
    else:  # int4 keeps the LM head in int8: at int4 it alone changed the top-1 token at 19% of a text's positions
        packed = quantize_int8(w)
    # The model's weight takes the values the kernels compute with, so that every route (and, when tied, the
    # input embedding) runs the same quantized model; it is the dense copy for large steps, free when the
    # dtypes match.
    w.copy_(packed[0].float() * packed[1][:, None] if isinstance(packed, tuple) else packed.dequantize())
    dense = w.to(route.dtype)
    if isinstance(packed, Int4Planes):
        return Int4Linear(packed, bias, dense, min_rows, native)
    if isinstance(packed, Int8Groups):
        return Int8GroupLinear(packed, bias, dense, min_rows)
    return Int8Linear(*packed, bias, dense, min_rows, native)


def pack_linears(model: nn.Module, config: EngineConfig, weights: object) -> None:
    """Swap the loaded model's nn.Linear modules for packed ones as config.quantization asks (see the module's
    docstring). `weights` is what the loader gave: a GGUF's own blocks come with it."""
    mode = config.quantization
    on_cpu = config.torch_device().type == "cpu"
    native = on_cpu and config.cpu_kernels and cpu.load()  # tokenmill's C++ linears, else torch's kernels
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if mode is None:
        if native and config.torch_dtype() == torch.float32:
            for name, linear in linears:
                model.set_submodule(name, DenseLinear(linear.weight, _bias(linear)))
        return
    if not on_cpu:
        raise ValueError(f"quantization {mode!r} runs on CPU only (torch's packed int4/int8 CPU kernels); "
                         "on CUDA run without quantization (bfloat16)")
    blocks = ({n.removeprefix("model."): b for n, b in weights.blocks.items()}
              if isinstance(weights, GGUFWeights) else None)
    if mode == "gguf" and blocks is None:
        raise ValueError(f"quantization 'gguf' keeps a GGUF file's own blocks, but {config.resolved_model()!r} "
                         "is not loaded from a GGUF file; use quantization 'int8' or 'int4' to quantize it at load")
    route = dense_route(native)
    for name, linear in linears:
        if linear.in_features % GROUP_SIZE and mode != "int8":
            raise ValueError(f"{name} has {linear.in_features} inputs, not a multiple of the int4 group size "
                             f"{GROUP_SIZE}; use quantization 'int8'")
        model.set_submodule(name, _quantized_linear(model, name, linear, mode, blocks, route, native))
