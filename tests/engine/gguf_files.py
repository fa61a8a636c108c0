"""Small GGUF files written as llama.cpp's converter writes them: a transformers Llama's weights (q/k rows
interleaved for llama.cpp's rope) beside the tokenizer metadata a test gives."""
from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves Llama's q/k rows for its rope."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: str, model, add_vocab: Callable[[gguf.GGUFWriter], None],
                     rope_freqs: np.ndarray | None = None, **metadata) -> str:
    """Writes model (a transformers LlamaForCausalLM) as an F32 llama GGUF at path. add_vocab writes the
    tokenizer's keys; metadata names further GGUFWriter.add_* calls; rope_freqs is written as a tensor."""
    c = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    add_vocab(w)
    for key, value in metadata.items():
        getattr(w, f"add_{key}")(value)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = t.numpy()
        if name.endswith("q_proj.weight"):
            t = _permute(t, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = _permute(t, c.num_key_value_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(t))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
