"""A "self-draft" for draft-model speculative decoding: the target model cut to its first N decoder layers,
keeping its embedding, final norm and LM head (so the draft shares the tokenizer and the vocabulary).

No smaller model with SmolLM2's tokenizer is at hand, and a truncated copy is the cheapest draft that
speaks the same vocabulary. It is a poor guesser: teacher-forced on the target's greedy replies to the
grounded workload, its top-1 token agrees with the target's 2% of the time at 6 of SmolLM2-135M's 30 layers,
15% at 20, 41% at 24 and 63% at 28 (chat: 2%, 15%, 34%, 49%), while the embedding and LM head alone are a
fifth of the model's weights. So it measures what the draft-model path costs, not the speed-up a trained
small draft would bring. Two formats:

- `hf` (default): a Hugging Face-style directory (config.json, model.safetensors in float32, the
  tokenizer files), for `tokenmill serve --speculative-config '{"model": DIR, ...}'`. The weights come
  through tokenmill's own GGUF loader, so they are dequantized and un-permuted exactly as tokenmill
  reads the target.
- `gguf`: a GGUF file holding the target's own (quantized) tensors for the kept layers and its metadata
  with block_count = N, for llama-server's `--model-draft`.

    python benchmarks/self_draft.py OUT --layers 6 [--model TARGET.gguf] [--format hf|gguf]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.")


def keeps(name: str, layers: int, pattern: re.Pattern[str] = _HF_LAYER) -> bool:
    """Whether a tensor survives the cut: every non-layer tensor, and layers below `layers`."""
    m = pattern.match(name)
    return m is None or int(m.group(1)) < layers


def hf_config(cfg, layers: int) -> dict:
    """config.json for tokenmill's ModelConfig.from_hf (and transformers) from a loaded ModelConfig."""
    eos = cfg.eos_token_id
    out = {
        "architectures": [cfg.architecture],
        "model_type": cfg.architecture.removesuffix("ForCausalLM").lower(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": "float32",
    }
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = cfg.rope_scaling
    return out


def write_hf(model: str, out: Path, layers: int) -> Path:
    import torch
    from safetensors.torch import save_file

    from tokenmill.engine.weights.loader import load_model_files

    cfg, tokenizer, weights = load_model_files(model)
    if not 1 <= layers <= cfg.num_hidden_layers:
        raise SystemExit(f"--layers must be within 1..{cfg.num_hidden_layers}, got {layers}")
    tensors = {name: t.to(torch.float32).contiguous() for name, t in weights if keeps(name, layers)}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, layers), indent=2) + "\n")
    tokenizer.save_pretrained(str(out))  # carries the chat template: the draft formats prompts the same way
    return out


def write_gguf(model: str, out: Path, layers: int) -> Path:
    import gguf

    reader = gguf.GGUFReader(model)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    block_count = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    total = reader.get_field(block_count).contents()
    if not 1 <= layers <= total:
        raise SystemExit(f"--layers must be within 1..{total}, got {layers}")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        # The writer adds the architecture itself; GGUF.* are the file's own header fields.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = layers if field.name == block_count else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    kept = [t for t in reader.tensors if keeps(t.name, layers, _GGUF_LAYER)]
    for t in kept:  # quantized blocks copied as they are: raw shape and dtype, with the GGML type
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="directory (hf) or .gguf file (gguf) to write")
    p.add_argument("--layers", type=int, required=True, help="decoder layers to keep (the first N)")
    p.add_argument("--model", help="target GGUF (default: tokenmill's default model)")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf")
    args = p.parse_args(argv)
    from tokenmill.engine.config import default_model_path

    model = args.model or default_model_path()
    write = write_hf if args.format == "hf" else write_gguf
    print(write(model, args.out, args.layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
