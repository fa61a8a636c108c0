"""Greedy exactness against transformers: both run one checkpoint on the same prompt token ids (no
tokenizer needed). In float32 every greedy token must match, else the exit status is 1; in bfloat16
the agreement is reported (rounding may flip a near-tie, after which the two runs part ways).

    python benchmarks/exactness.py --model DIR --out exactness.json [--device cuda] [--quick]

tokenmill serves all prompts in one batch (continuous batching, CUDA graphs on a GPU); transformers
generates each prompt alone, so no padding enters the oracle.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenmill.engine import LLM, SamplingParams  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fixed_prompts(num: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Seeded prompt token ids from 1 to 300 tokens long: one token, part of a block, many blocks."""
    rng = random.Random(seed)
    lengths = [1, 7, 16, 300] + [rng.randint(2, 300) for _ in range(max(0, num - 4))]
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths[:num]]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenmill_greedy(model: str, prompts: list[list[int]], num_tokens: int, dtype: str,
                     device: str) -> list[list[int]]:
    llm = LLM(model, dtype=dtype, device=device, skip_tokenizer_init=True, kv_cache_memory=256 << 20)
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    del llm  # the next dtype's engine and transformers' model need the memory
    gc.collect()
    return [o.outputs[0].token_ids for o in outs]


@torch.inference_mode()
def transformers_greedy(model: str, prompts: list[list[int]], num_tokens: int, dtype: str,
                        device: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    # .to(dtype) rather than from_pretrained's dtype argument, which older transformers ignore silently.
    hf = AutoModelForCausalLM.from_pretrained(model).to(device=device, dtype=DTYPES[dtype]).eval()
    # No EOS, as tokenmill's ignore_eos: min_new_tokens would instead forbid the EOS id (-inf), and a greedy
    # pick of that id would count as a mismatch.
    hf.generation_config.eos_token_id = None
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_tokens,
                          do_sample=False, pad_token_id=0)
        out.append(ref[0, len(p):].tolist())
    del hf
    gc.collect()
    return out


def compare(ours: list[list[int]], ref: list[list[int]]) -> dict:
    prefixes = [common_prefix(a, b) for a, b in zip(ours, ref, strict=True)]
    return {"sequences": len(ref), "identical_sequences": sum(a == b for a, b in zip(ours, ref, strict=True)),
            "matching_prefix_tokens": sum(prefixes), "total_tokens": sum(map(len, ref)),
            "first_divergence": [None if a == b else n for a, b, n in zip(ours, ref, prefixes, strict=True)]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF directory (benchmarks/random_checkpoint.py writes one)")
    p.add_argument("--out", type=Path, required=True, help="the JSON record")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="4 prompts of 16 tokens instead of 8 of 32")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16")
    args = p.parse_args(argv)
    num_prompts, num_tokens = (4, 16) if args.quick else (8, 32)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    prompts = fixed_prompts(num_prompts, vocab)
    record = {"model": args.model, "device": args.device, "tokens_per_prompt": num_tokens,
              "prompt_lengths": [len(q) for q in prompts], "dtypes": {}}
    for dtype in args.dtypes.split(","):
        r = compare(tokenmill_greedy(args.model, prompts, num_tokens, dtype, args.device),
                    transformers_greedy(args.model, prompts, num_tokens, dtype, args.device))
        record["dtypes"][dtype] = r
        print(f"{dtype}: {r['identical_sequences']}/{r['sequences']} sequences identical, "
              f"{r['matching_prefix_tokens']}/{r['total_tokens']} tokens before the first divergence")
    f32 = record["dtypes"].get("float32")
    record["passed"] = f32 is None or f32["identical_sequences"] == f32["sequences"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
