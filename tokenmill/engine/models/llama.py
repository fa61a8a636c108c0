"""The Llama-family decoder: Llama (SmolLM2, TinyLlama, Llama 2/3), Mistral, Qwen2, Qwen3.

The families differ only in switches on ModelConfig: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3),
tied embeddings, rope theta and scaling. Fusion and weight-name mapping live in layers and loader.
Under tensor parallelism each rank builds the model for its own shard (TensorParallel) and loads its
slice of every checkpoint tensor.
"""
from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType

import torch
import torch.nn as nn

from tokenmill.engine.config import ModelConfig
from tokenmill.engine.models import cpu_decoder
from tokenmill.engine.models.layers import (
    SINGLE_RANK,
    Attention,
    AttentionMetadata,
    GatedMLP,
    RMSNorm,
    RotaryEmbedding,
    TensorParallel,
    VocabParallelEmbedding,
    empty_linear,
    split_heads,
)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ModuleType, tp: TensorParallel):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, ops, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = GatedMLP(cfg.hidden_size, len(tp.split(cfg.intermediate_size)), ops, tp)

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
    def __init__(self, cfg: ModelConfig, ops: ModuleType, tp: TensorParallel = SINGLE_RANK):
        super().__init__()
        if cfg.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {cfg.architecture!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        self.cfg = cfg
        self.tp = tp
        self.ops = ops
        # The C++ layer loop for these KV caches, built on the first forward over them (after packing and
        # LoRA have set the linears); None where it does not apply.
        self._cpu_decoder: tuple[list[torch.Tensor], cpu_decoder.CpuDecoder | None] | None = None
        self.heads = split_heads(cfg.num_attention_heads, cfg.num_key_value_heads, tp)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops, tp) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                      cfg.rope_scaling, ops)
        # Vocab-parallel like the embedding (the same shard when tied); compute_logits gathers the slices.
        self.lm_head = empty_linear(cfg.hidden_size, len(self.embed_tokens.vocab), bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states of every token of the packed batch: [num_tokens, hidden_size]."""
        h, residual = self.embed_tokens(input_ids), None
        fast = self._decoder_for(kv_caches)
        if fast is not None and len(input_ids) < fast.max_rows:
            return fast(h, positions, meta)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=False):
            h, residual = layer(positions, h, residual, kv_cache, meta, self.rotary)
        h, _ = self.norm(h, residual)
        return h

    def _decoder_for(self, kv_caches: list[torch.Tensor]) -> cpu_decoder.CpuDecoder | None:
        if self._cpu_decoder is None or self._cpu_decoder[0] is not kv_caches:
            self._cpu_decoder = kv_caches, cpu_decoder.build(self, kv_caches, self.ops)
        return self._cpu_decoder[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary, on every rank."""
        return self.tp.gather_last_dim(self.lm_head(hidden), self.cfg.vocab_size)

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
            tensor = self._shard(parts[-2] if len(parts) >= 2 else "", parts[-1], tensor)
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

    def _shard(self, module: str, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a checkpoint tensor: rows of the column-parallel linears and of the
        vocabulary, columns of the row-parallel ones; a row-parallel bias is added once, on rank 0."""
        tp, c = self.tp, self.cfg
        if tp.world_size == 1:
            return tensor
        d = c.head_dim
        q_rows = range(self.heads.q_heads.start * d, self.heads.q_heads.stop * d)
        kv_rows = range(self.heads.kv_heads.start * d, self.heads.kv_heads.stop * d)
        ffn = tp.split(c.intermediate_size)
        vocab = self.embed_tokens.vocab
        rows = {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows, "gate_proj": ffn, "up_proj": ffn,
                "embed_tokens": vocab, "lm_head": vocab}
        columns = {"o_proj": q_rows, "down_proj": ffn}
        if module in rows:
            return tensor[rows[module].start:rows[module].stop]
        if module in columns and kind == "bias":
            return tensor if tp.rank == 0 else torch.zeros_like(tensor)
        if module in columns:
            return tensor[:, columns[module].start:columns[module].stop]
        return tensor  # norms: replicated

    def _shard_sizes(self, fused: str) -> list[int]:
        c = self.cfg
        if fused == "qkv_proj":
            return [len(self.heads.q_heads) * c.head_dim] + [len(self.heads.kv_heads) * c.head_dim] * 2
        return [len(self.tp.split(c.intermediate_size))] * 2

    def _expected_keys(self) -> list[str]:
        keys = []
        for name, _ in self.named_parameters():
            fused = name.split(".")[-2]
            if fused in ("qkv_proj", "gate_up_proj"):
                keys += [f"{name}#{i}" for i in range(len(self._shard_sizes(fused)))]
            elif not (name == "lm_head.weight" and self.cfg.tie_word_embeddings):
                keys.append(name)
        return keys
