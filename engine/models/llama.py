"""The Llama-family decoder: Llama (SmolLM2, TinyLlama, Llama 2/3), Mistral, Qwen2, Qwen3.

The families differ only in switches on ModelConfig: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3),
tied embeddings, rope theta and scaling. Fusion and weight-name mapping live in layers and loader.
"""
from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType

import torch
import torch.nn as nn

from ..config import ModelConfig
from .layers import Attention, AttentionMetadata, GatedMLP, RMSNorm, RotaryEmbedding

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ModuleType):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, ops)

    def forward(self, positions, h, residual, kv_cache, meta, rotary):
        # norm, attention, residual, norm, MLP, residual; each residual add is fused into the next norm.
        if residual is None:
            h, residual = self.input_layernorm(h), h
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h, kv_cache, meta, rotary)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ModuleType):
        super().__init__()
        if cfg.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {cfg.architecture!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                      cfg.rope_scaling, ops)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states of every token of the packed batch: [num_tokens, hidden_size]."""
        h, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=False):
            h, residual = layer(positions, h, residual, kv_cache, meta, self.rotary)
        h, _ = self.norm(h, residual)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # Checkpoints keep q/k/v and gate/up apart; we run them as one matmul each.
    _stacked = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the (fused) parameters; every parameter must be set."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.cfg.tie_word_embeddings):
                continue
            parts = name.split(".")
            stacked = self._stacked.get(parts[-2]) if len(parts) >= 2 else None
            if stacked is not None:
                fused, shard = stacked
                target = ".".join(parts[:-2] + [fused, parts[-1]])
                param = params[target]
                sizes = self._shard_sizes(fused)
                offset = sum(sizes[:shard])
                param.data[offset:offset + sizes[shard]].copy_(tensor)
                loaded.add(f"{target}#{shard}")
            else:
                if name not in params:
                    raise ValueError(f"unexpected weight {name!r} in checkpoint")
                params[name].data.copy_(tensor)
                loaded.add(name)
        missing = [n for n in self._expected_keys() if n not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:5])}"
                             + (" ..." if len(missing) > 5 else ""))

    def _shard_sizes(self, fused: str) -> list[int]:
        c = self.cfg
        if fused == "qkv_proj":
            return [c.num_attention_heads * c.head_dim] + [c.num_key_value_heads * c.head_dim] * 2
        return [c.intermediate_size] * 2

    def _expected_keys(self) -> list[str]:
        keys = []
        for name, _ in self.named_parameters():
            fused = name.split(".")[-2]
            if fused in ("qkv_proj", "gate_up_proj"):
                keys += [f"{name}#{i}" for i in range(len(self._shard_sizes(fused)))]
            elif not (name == "lm_head.weight" and self.cfg.tie_word_embeddings):
                keys.append(name)
        return keys
