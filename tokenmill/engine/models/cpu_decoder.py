"""The decoder's layer loop in one C++ call on CPU (tokenmill.Decoder, kernels/cpu/csrc/decoder.cpp).

At batch 1 a SmolLM2 decode step runs some 750 small ops; from Python each costs microseconds of module,
interpreter and dispatcher time, several milliseconds a token in all. The C++ loop makes the same kernel calls
in the same order, so its output is bit-identical to the Python layers'; LlamaForCausalLM takes it wherever
build() accepts the model and every linear would take its packed kernel at the step's size.
"""
from __future__ import annotations

from types import ModuleType

import torch
import torch.nn as nn

from tokenmill.engine.weights.quantization import DenseLinear, Int4Linear, Int8GroupLinear, Int8Linear, PackedLinear

# tokenmill.Decoder's linear kinds (decoder.cpp: LinearKind)
INT4, INT8_GROUPS, INT8_CHANNEL, PACKED_FLOAT, TORCH = range(5)


class CpuDecoder:
    """The model's layers and final norm as one tokenmill.Decoder; max_rows: steps of fewer tokens run in it
    (from there some linear takes its dense copy, which the C++ loop does not hold)."""

    def __init__(self, decoder: torch.ScriptObject, max_rows: float):
        self.decoder = decoder
        self.max_rows = max_rows

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        return self.decoder.forward(h, positions, meta.slot_mapping, meta.block_tables, meta.seq_lens,
                                    meta.query_start_loc)


def _linear(module: nn.Module) -> tuple[int, list[torch.Tensor | None], int] | None:
    """(kind, [a, b, c, bias], out_features) of a linear the C++ loop computes as the module does; None if it
    cannot (a LoRA wrapper, torch's int4 planes)."""
    if isinstance(module, Int4Linear) and module.native:
        return INT4, [module.qweight, module.scales, module.zeros, module.bias], module.out_features
    if isinstance(module, Int8GroupLinear):
        return INT8_GROUPS, [module.q, module.scale, None, module.bias], module.out_features
    if isinstance(module, Int8Linear):
        return INT8_CHANNEL, [module.q, module.scale, None, module.bias], module.out_features
    if isinstance(module, DenseLinear):
        return PACKED_FLOAT, [module.packed, None, None, module.bias], module.out_features
    if type(module) is nn.Linear:
        return TORCH, [module.weight, None, None, module.bias], module.out_features
    return None


def build(model: nn.Module, kv_caches: list[torch.Tensor], ops: ModuleType) -> CpuDecoder | None:
    """The C++ loop of a LlamaForCausalLM on CPU with the C++ ops loaded and one rank, or None where it does
    not apply (then the Python layers run)."""
    if ops.__name__ != "tokenmill.kernels.cpu.ops" or model.tp.world_size != 1:
        return None
    first = model.layers[0].self_attn
    decoder = torch.classes.tokenmill.Decoder(first.num_heads, first.num_kv_heads, first.head_dim, model.norm.eps,
                                              first.scale, model.rotary.cos, model.rotary.sin, model.norm.weight)
    max_rows = float("inf")
    for layer, kv_cache in zip(model.layers, kv_caches, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        linears = [_linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(linear is None for linear in linears):
            return None
        for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            if isinstance(m, PackedLinear) and m.dense is not None:
                max_rows = min(max_rows, m.dense_min_rows)
        decoder.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                          None if attn.q_norm is None else attn.q_norm.weight,
                          None if attn.k_norm is None else attn.k_norm.weight, kv_cache[0], kv_cache[1],
                          [kind for kind, _, _ in linears], [t for _, ts, _ in linears for t in ts],
                          [n for _, _, n in linears])
    return CpuDecoder(decoder, max_rows)
