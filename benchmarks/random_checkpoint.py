"""A small random-weight Hugging Face Llama checkpoint, written offline: no hub, no tokenizer. Both
tokenmill and transformers load it, so greedy tokens can be compared on a machine that holds no model.

    python benchmarks/random_checkpoint.py DIR [--size tiny|small] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

# GQA (4 query heads per KV head), head_dim 32, prompts past several KV blocks.
SIZES = {
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}


def write_random_llama(path: str | Path, size: str = "small", seed: int = 0) -> Path:
    """Seeded float32 LlamaForCausalLM saved as safetensors + config.json under path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    # A wide initializer makes the logits peaked, so greedy picks are not near-ties that rounding flips.
    config = LlamaConfig(**SIZES[size], rms_norm_eps=1e-6, initializer_range=0.25, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(path)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir")
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"wrote {write_random_llama(args.dir, args.size, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
