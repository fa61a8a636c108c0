"""What each precision mode costs in quality on the default model, against its float32 run:

- greedy agreement: fixed prompts generated greedily; the index of the first token that differs from the
  float32 run (the whole length when none does), averaged, and the share of prompts identical throughout;
- perplexity of the benchmark corpus (benchmarks/datasets.py, original prose), teacher-forced through the
  model in chunks over the paged KV cache, and how often its top-1 next token matches float32's.

    python benchmarks/quality.py                       # fp32, bf16, int8, int4, gguf
    python benchmarks/quality.py --modes fp32,gguf --max-tokens 32

The text is written to --text-out so that llama.cpp's llama-perplexity can read the same tokens.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.datasets import _CORPUS  # noqa: E402
from tokenmill.engine import LLM, SamplingParams  # noqa: E402
from tokenmill.engine.config import default_model_path  # noqa: E402
from tokenmill.engine.models.layers import AttentionMetadata  # noqa: E402
from tokenmill.engine.weights.gguf_tokenizer import load_gguf_tokenizer  # noqa: E402

MODES = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("auto", "int8"),
         "int4": ("auto", "int4"), "gguf": ("auto", "gguf")}
PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about the sea.",
    "List three tips for learning a new language:",
    "Q: What is 12 times 12?\nA:",
    "Summarize the plot of a detective story in which the butler is innocent.",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES))
    p.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--chunk", type=int, default=256, help="tokens per forward pass for the perplexity")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--text-out", default="benchmarks/results/quality-text.txt")
    return p


@torch.inference_mode()
def text_logprobs(llm: LLM, ids: list[int], chunk: int) -> torch.Tensor:
    """Log-probabilities [len(ids) - 1, vocab] of each next token, the text run as one sequence in chunks."""
    runner = llm.engine.runner
    n, dev = len(ids), runner.device
    assert n <= runner.num_blocks * runner.block_size, "the text must fit the KV cache"
    tables = torch.arange(-(-n // runner.block_size), dtype=torch.int32, device=dev)[None]
    out = []
    for start in range(0, n - 1, chunk):
        end = min(start + chunk, n - 1)
        meta = AttentionMetadata(torch.arange(start, end, device=dev), tables,
                                 torch.tensor([end], dtype=torch.int32, device=dev),
                                 torch.tensor([0, end - start], dtype=torch.int32, device=dev))
        hidden = runner.model(torch.tensor(ids[start:end], device=dev), torch.arange(start, end, device=dev),
                              runner.kv_caches, meta)
        out.append(runner.model.compute_logits(hidden).float().log_softmax(-1).cpu())
    return torch.cat(out)


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def evaluate(mode: str, args: argparse.Namespace, ids: list[int]) -> dict:
    dtype, quantization = MODES[mode]
    start = time.perf_counter()
    llm = LLM(dtype=dtype, quantization=quantization, num_threads=args.num_threads)
    load_s = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    logprobs = text_logprobs(llm, ids, args.chunk)
    nll = -logprobs.gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    return {"tokens": tokens, "top1": logprobs.argmax(-1), "perplexity": math.exp(nll), "load_s": load_s,
            "dtype": str(llm.engine.runner.dtype).removeprefix("torch.")}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    if "fp32" not in modes:
        modes.insert(0, "fp32")  # the reference
    text = _CORPUS.strip() + "\n"
    Path(args.text_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.text_out).write_text(text)
    ids = load_gguf_tokenizer(default_model_path())(text)["input_ids"]
    print(f"text: {args.text_out} ({len(ids)} tokens); {len(PROMPTS)} prompts x {args.max_tokens} greedy tokens")
    results: dict[str, dict] = {}
    for mode in modes:
        results[mode] = evaluate(mode, args, ids)
        print(f"{mode}: done in {results[mode]['load_s']:.0f} s load", flush=True)
    ref = results["fp32"]
    print(f"\n| mode | activations | greedy: mean first divergence (of {args.max_tokens}) | prompts identical "
          "| perplexity | top-1 = fp32 on the text |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        div = [first_divergence(a, b) for a, b in zip(r["tokens"], ref["tokens"], strict=True)]
        same = sum(d == args.max_tokens for d in div)
        top1 = (r["top1"] == ref["top1"]).float().mean().item()
        print(f"| {mode} | {r['dtype']} | {sum(div) / len(div):.1f} | {same}/{len(div)} | {r['perplexity']:.3f} "
              f"| {top1:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
