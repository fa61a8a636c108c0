"""Offline throughput: tokenmill's LLM.generate against transformers' generate, same model, same dtype,
same seeded workload, in one run.

    python benchmarks/throughput.py                        # default model, float32, CPU
    python benchmarks/throughput.py --model benchmarks/configs/qwen3-0.6b.json --load-format dummy

The workload: --num-requests seeded requests of 12-300 words of real text, each asking for 16-160
tokens with EOS ignored; or, with --random-ids 100,1024, nano-vllm's: random token ids, input and output
lengths uniform in 100..1024, no tokenizer loaded (dummy weights need none). transformers runs
left-padded static batches (best of --hf-batch-sizes); only the tokens each request asked for count
towards its throughput.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.datasets import random_token_prompts, synthetic_requests  # noqa: E402
from benchmarks.report import environment, save_json  # noqa: E402
from tokenmill.engine import LLM, SamplingParams  # noqa: E402
from tokenmill.engine.config import default_model_path  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF dir, .gguf, or config.json with --load-format dummy")
    p.add_argument("--load-format", default="auto", choices=["auto", "gguf", "safetensors", "dummy"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--quantization", default=None, choices=["gguf", "int8", "int4"],
                   help="tokenmill's weights kept quantized (transformers runs the dequantized model)")
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--random-ids", type=_len_range, default=None, metavar="MIN,MAX",
                   help="prompts of random token ids; input and output lengths uniform in [MIN, MAX]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="tokenmill's ranks (transformers runs on one); with dummy weights, skip transformers")
    p.add_argument("--hf-batch-sizes", default="8,16", help="comma list; empty to skip transformers")
    p.add_argument("--single-decode-tokens", type=int, default=128,
                   help="tokens for the single-request decode comparison (0 to skip)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON record")
    return p


def _len_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    try:
        r = int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (two integers), got {text!r}") from None
    if not 1 <= r[0] <= r[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return r


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_tokenmill(llm: LLM, prompts: list[list[int]], max_tokens: list[int]) -> dict:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    llm.generate([{"prompt_token_ids": prompts[0]}], params[0], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert generated == sum(max_tokens)
    return _rates(elapsed, sum(map(len, prompts)), generated)


def _rates(elapsed: float, prompt_tokens: int, output_tokens: int) -> dict:
    return {"elapsed_s": elapsed, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "output_tokens_per_s": output_tokens / elapsed,
            "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed}


def load_hf_model(args: argparse.Namespace, llm: LLM, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = args.model or default_model_path()
    if args.load_format == "dummy":  # the same random weights tokenmill runs
        config = AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(path)) if path.endswith(".json")
                                            else path)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        ours = llm.engine.runner.model
        model.load_state_dict(_hf_state_dict(ours), strict=False)
    elif path.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def _hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our fused parameters split back into Hugging Face names."""
    out = {}
    for name, t in model.state_dict().items():
        prefix = "" if name.startswith("lm_head") else "model."
        parts = name.split(".")
        if len(parts) > 2 and parts[-2] in ("qkv_proj", "gate_up_proj"):
            fused = parts[-2]
            names = ["q_proj", "k_proj", "v_proj"] if fused == "qkv_proj" else ["gate_proj", "up_proj"]
            for sub, chunk in zip(names, t.split(model._shard_sizes(fused)), strict=False):
                out[prefix + ".".join(parts[:-2] + [sub, parts[-1]])] = chunk
        else:
            out[prefix + name] = t
    return out


@torch.inference_mode()
def run_transformers(model, prompts: list[list[int]], max_tokens: list[int], batch_size: int,
                     pad_id: int, device: torch.device) -> dict:
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch, wants = prompts[i:i + batch_size], max_tokens[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        new = max(wants)  # a static batch runs until its longest request is done
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=pad_id)
    _sync(device)
    return _rates(time.perf_counter() - start, sum(map(len, prompts)), sum(max_tokens))


def single_decode(llm: LLM, hf, prompt: list[int], n: int, device: torch.device) -> dict:
    """Decode speed of one request alone (prompt time included in neither: both are timed end to end
    and the prompt is short)."""
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                 use_tqdm=False)
    ours = n / (time.perf_counter() - start)
    result = {"tokens": n, "tokenmill_tokens_per_s": ours}
    if hf is not None:
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            start = time.perf_counter()
            hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                        min_new_tokens=n, do_sample=False, pad_token_id=0)
            _sync(device)
            result["transformers_tokens_per_s"] = n / (time.perf_counter() - start)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tensor_parallel_size > 1 and args.load_format == "dummy" and args.hf_batch_sizes:
        parser.error("dummy weights are drawn per rank's shard: transformers cannot run the same model; "
                     "pass --hf-batch-sizes ''")
    llm = LLM(args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
              quantization=args.quantization,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              seed=args.seed, skip_tokenizer_init=args.random_ids is not None,
              tensor_parallel_size=args.tensor_parallel_size)
    runner = llm.engine.runner
    tok = llm.get_tokenizer()
    if args.random_ids:
        prompts, max_tokens = random_token_prompts(args.num_requests, args.seed, args.random_ids)
    else:
        requests = synthetic_requests(args.num_requests, seed=args.seed)
        prompts = [tok.encode(r.prompt) for r in requests]
        max_tokens = [r.max_tokens for r in requests]
    print(f"{len(prompts)} requests, {sum(map(len, prompts))} prompt tokens, {sum(max_tokens)} output "
          f"tokens; {llm.engine.model_config.name}, {runner.dtype}, {runner.device}, "
          f"{torch.get_num_threads()} threads")

    record = {"tokenmill": run_tokenmill(llm, prompts, max_tokens)}
    print(f"tokenmill:    {record['tokenmill']['output_tokens_per_s']:8.1f} output tok/s, "
          f"{record['tokenmill']['total_tokens_per_s']:8.1f} total tok/s")
    hf = None
    sizes = [int(b) for b in args.hf_batch_sizes.split(",") if b]
    if sizes:
        hf = load_hf_model(args, llm, runner.dtype, runner.device)
        pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        record["transformers"] = {}
        for b in sizes:
            r = run_transformers(hf, prompts, max_tokens, b, pad, runner.device)
            record["transformers"][f"batch_{b}"] = r
            print(f"transformers (batch {b:3d}): {r['output_tokens_per_s']:8.1f} output tok/s, "
                  f"{r['total_tokens_per_s']:8.1f} total tok/s")
            gc.collect()
        best = max(record["transformers"].values(), key=lambda r: r["output_tokens_per_s"])
        record["ratio_vs_best_transformers"] = (record["tokenmill"]["output_tokens_per_s"]
                                                / best["output_tokens_per_s"])
        print(f"ratio (tokenmill / best transformers): {record['ratio_vs_best_transformers']:.2f}x")
    if args.single_decode_tokens:
        record["single_request_decode"] = single_decode(llm, hf, prompts[0][:32], args.single_decode_tokens,
                                                        runner.device)
        print("single-request decode:", {k: round(v, 1) for k, v in record["single_request_decode"].items()})
    record["config"] = vars(args)
    record["environment"] = environment(
        {"id": llm.engine.model_config.name},
        {"dtype": str(runner.dtype), "device": str(runner.device), "threads": str(torch.get_num_threads())})
    path = save_json(Path(args.out) / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json", record)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
