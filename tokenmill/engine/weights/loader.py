"""Weights and tokenizer from a Hugging Face directory, a GGUF file, or random (dummy) weights.

Every path yields (ModelConfig, tokenizer, iterator of Hugging Face-named tensors); the model maps the
names onto its fused parameters.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from tokenmill.engine.config import ModelConfig, default_model_path
from tokenmill.engine.weights.gguf_tokenizer import load_gguf_tokenizer

WeightIter = Iterator[tuple[str, torch.Tensor]]


def load_model_files(path: str, load_format: str = "auto", load_tokenizer: bool = True):
    """Returns (ModelConfig, tokenizer or None, weights iterator or None for dummy). Without
    load_tokenizer the tokenizer is None: a checkpoint need not ship one."""
    if load_format == "dummy":
        return _dummy_config(path), _load_tokenizer_for_dummy(path) if load_tokenizer else None, None
    if path.endswith(".gguf") or load_format == "gguf":
        return _load_gguf(path, load_tokenizer)
    return _load_hf_dir(path, load_tokenizer)


# ---- Hugging Face directory -------------------------------------------------------------------

def _read_config(path: str) -> dict:
    config_file = path if path.endswith(".json") else os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"no config.json at {path!r}")
    with open(config_file) as f:
        return json.load(f)


def _load_hf_dir(path: str, load_tokenizer: bool = True):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    cfg = ModelConfig.from_hf(_read_config(path), name=os.path.basename(os.path.normpath(path)))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):  # sharded: the index names the files that hold weights
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    if not files:
        raise ValueError(f"no *.safetensors weights in {path!r}")

    def weights() -> WeightIter:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    return cfg, AutoTokenizer.from_pretrained(path) if load_tokenizer else None, weights()


# ---- GGUF ------------------------------------------------------------------------------------

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _gguf_hf_name(name: str) -> str:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    _, layer, kind, suffix = name.split(".")  # blk.N.kind.weight
    return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[kind]}.{suffix}"


def _undo_rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores Llama's q/k rows interleaved for its rope; restore Hugging Face's order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_rope_scaling(field: Callable[..., Any], arch: str, head_dim: int,
                       rope_freqs: np.ndarray | None) -> dict | None:
    """GGUF's rope scaling as a rope_scaling dict (None: plain rope), or ValueError if we cannot run it."""
    rope_dim = field(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"GGUF rotates {rope_dim} of {head_dim} head dimensions ({arch}.rope.dimension_count); "
                         "partial rotary embedding is not supported")
    kind = field(f"{arch}.rope.scaling.type", "linear")  # llama.cpp's default when only a factor is given
    if kind not in ("none", "linear"):
        raise ValueError(f"GGUF rope scaling type {kind!r} ({arch}.rope.scaling.type) is not supported; "
                         "supported: none, linear")
    factor = field(f"{arch}.rope.scaling.factor", 1.0) if kind == "linear" else 1.0
    if rope_freqs is not None:
        # llama.cpp's converter bakes Llama 3's scaling into one divisor per frequency; as llama.cpp
        # does, a linear factor divides on top of it.
        if rope_freqs.shape != (head_dim // 2,):
            raise ValueError(f"GGUF rope_freqs.weight has shape {rope_freqs.shape}; expected ({head_dim // 2},)")
        return {"rope_type": "freq_factors", "freq_factors": [float(f) * factor for f in rope_freqs]}
    return {"rope_type": "linear", "factor": factor} if factor != 1.0 else None


def _load_gguf(path: str, load_tokenizer: bool = True):
    from tokenmill.engine.weights.gguf_reader import GGUFReader, dequantize

    reader = GGUFReader(path)

    def field(key, default=None):
        return reader.fields.get(key, default)

    arch = field("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(_GGUF_ARCHS)}")
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = tensors.pop("rope_freqs.weight", None)  # rope parameters, not a module's weight
    heads = field(f"{arch}.attention.head_count")
    head_dim = field(f"{arch}.attention.key_length") or field(f"{arch}.embedding_length") // heads
    eos = field("tokenizer.ggml.eos_token_id")
    cfg = ModelConfig(
        architecture=_GGUF_ARCHS[arch],
        vocab_size=field(f"{arch}.vocab_size") or int(tensors["token_embd.weight"].shape[1]),
        hidden_size=field(f"{arch}.embedding_length"),
        intermediate_size=field(f"{arch}.feed_forward_length"),
        num_hidden_layers=field(f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=field(f"{arch}.attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=field(f"{arch}.context_length", 2048),
        rms_norm_eps=field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=field(f"{arch}.rope.freq_base", 10000.0),
        rope_scaling=_gguf_rope_scaling(field, arch, head_dim,
                                        None if rope_freqs is None else dequantize(rope_freqs)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=any(n.endswith("attn_q.bias") for n in tensors),
        qk_norm=any("attn_q_norm" in n for n in tensors),
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=[] if eos is None else [eos],
        name=field("general.name") or os.path.basename(path),
    )

    def rows(name: str, w: np.ndarray) -> np.ndarray:  # rows of a float weight or of quantized blocks
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            return _undo_rope_permute(w, cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads)
        return w

    def weights() -> WeightIter:
        for name, t in tensors.items():
            yield _gguf_hf_name(name), torch.from_numpy(np.ascontiguousarray(rows(name, dequantize(t))))

    # Views into the memory-mapped file: they cost nothing until a quantized model reads them.
    blocks = {_gguf_hf_name(name): (t.tensor_type.name, rows(name, t.data))
              for name, t in tensors.items() if len(t.shape) == 2}
    return cfg, load_gguf_tokenizer(path) if load_tokenizer else None, GGUFWeights(weights(), blocks)


class GGUFWeights:
    """A GGUF file's tensors dequantized to float32 by Hugging Face name (iterate it), and its own quantized
    blocks for --quantization gguf: `blocks` maps each 2-D weight's Hugging Face name to (GGML type name,
    its rows as stored, uint8 [rows, bytes per row] for quantized types) in Hugging Face's row order."""

    def __init__(self, weights: WeightIter, blocks: dict[str, tuple[str, np.ndarray]]):
        self._weights = weights
        self.blocks = blocks

    def __iter__(self) -> WeightIter:
        return self._weights


# ---- dummy weights ---------------------------------------------------------------------------

def _dummy_config(path: str) -> ModelConfig:
    return ModelConfig.from_hf(_read_config(path), name=os.path.basename(os.path.normpath(path)))


def _load_tokenizer_for_dummy(path: str):
    """The directory's own tokenizer if it has one, else the default model's (ids < 49,152 are
    valid in any vocabulary at least that large)."""
    from transformers import AutoTokenizer

    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if glob.glob(os.path.join(folder, "tokenizer*")):
        return AutoTokenizer.from_pretrained(folder)
    return load_gguf_tokenizer(default_model_path())


def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Small random weights (norm weights stay 1) so every kernel sees realistic, non-zero data."""
    for name, p in model.named_parameters():
        if "norm" not in name:
            g = torch.Generator(p.device).manual_seed(seed)
            p.data.uniform_(-0.05, 0.05, generator=g)
            seed += 1
