"""Where an engine run's time goes: linear layers, attention, the rest of the forward pass, sampling,
and the engine's own Python (scheduling, input building, detokenizing).

    python benchmarks/profile_step.py --dtype float32 --num-requests 32 [--quantization gguf]
    python benchmarks/profile_step.py --tensor-parallel-size 2   # and the collectives' share, per step
    python benchmarks/profile_step.py --quantization gguf --single-stream   # one request's decode steps

Runs the seeded mixed workload of throughput.py through LLM.generate under torch.profiler. Attention
(rotary + KV write + paged attention), the forward pass and the sampler are timed inclusively by wrapping them
in record_function; linear layers are the self time of the matmul ops (MATMUL_OPS). Shares are of the
whole run's wall time. The LM head is timed apart; where the C++ layer loop runs the layers
(engine/models/cpu_decoder.py) their linears, attention and norms are one op, timed as such (its linears are
not among the matmul ops then). --single-stream runs one chat request (benchmarks/decode_speed.py's) of
--max-tokens greedy tokens instead: mostly batch-1 decode steps, after a warm-up of the same request. With
tensor parallelism the profile is rank 0's, and the collectives (torch.distributed's
all-reduces and all-gathers, waits for the other ranks included) are split out of the forward pass.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.datasets import synthetic_requests  # noqa: E402
from benchmarks.decode_speed import chat_prompt  # noqa: E402
from tokenmill.engine import LLM, SamplingParams  # noqa: E402
from tokenmill.engine.config import QUANTIZATIONS  # noqa: E402
from tokenmill.engine.models.cpu_decoder import CpuDecoder  # noqa: E402
from tokenmill.engine.models.layers import TensorParallel  # noqa: E402

# torch's matmuls and tokenmill's linears (packed float32, int4 and int8 groups)
MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm",
              "tokenmill::packed_linear", "tokenmill::int4_linear", "tokenmill::int8_linear")


def label(obj: object, attr: str, name: str) -> None:
    """Wrap obj.attr in record_function(name), so the profile times it inclusively."""
    fn = getattr(obj, attr)

    def wrapped(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    setattr(obj, attr, wrapped)


def matmul_under(events, name: str) -> float:
    """Seconds of MATMUL_OPS' self time inside the record_function regions called name."""
    total, stack = 0.0, [c for e in events if e.name == name for c in e.cpu_children]
    while stack:
        e = stack.pop()
        total += e.self_cpu_time_total / 1e6 if e.name in MATMUL_OPS else 0.0
        stack += e.cpu_children
    return total


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--single-stream", action="store_true", help="one request's decode (see the module doc)")
    p.add_argument("--max-tokens", type=int, default=160, help="--single-stream's output tokens")
    args = p.parse_args(argv)

    llm = LLM(args.model, dtype=args.dtype, load_format=args.load_format, max_num_seqs=args.max_num_seqs,
              quantization=args.quantization, tensor_parallel_size=args.tensor_parallel_size)
    tok = llm.get_tokenizer()
    if args.single_stream:
        prompts = [{"prompt_token_ids": chat_prompt(llm, 120)}]
        params = [SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)]
    else:
        requests = synthetic_requests(args.num_requests, seed=args.seed)
        prompts = [{"prompt_token_ids": tok.encode(r.prompt)} for r in requests]
        params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm-up
    llm.engine.block_manager.reset_prefix_cache()

    engine = llm.engine
    label(engine.runner, "execute", "forward")
    label(engine, "sampler", "sampling")
    ops = engine.runner.ops  # the layers look the ops up on every call
    label(ops, "paged_attention", "attention")
    label(ops, "rotary_and_cache", "attention")
    label(engine.runner.model, "compute_logits", "lm head")
    label(CpuDecoder, "__call__", "layers (C++ loop)")
    # Labelled where the model calls them: the profiler's c10d ops only enqueue, and the wait is outside them.
    if args.tensor_parallel_size > 1:
        label(TensorParallel, "all_reduce", "collectives")
        label(TensorParallel, "gather_last_dim", "collectives")

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)

    times = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()}
    matmul = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS) / 1e6
    forward, attention, sampling = times.get("forward", 0.0), times.get("attention", 0.0), times.get("sampling", 0.0)
    lm_head, loop = times.get("lm head", 0.0), times.get("layers (C++ loop)", 0.0)
    matmul -= matmul_under(prof.events(), "lm head")  # counted in the LM head's share
    steps = next(e.count for e in prof.key_averages() if e.key == "forward")
    collectives = times.get("collectives", 0.0)
    calls = sum(e.count for e in prof.key_averages() if e.key == "collectives")
    shares = {
        "linear layers (matmul)": matmul,
        "attention (rotary + KV write + paged attention)": attention,
        "layers in the C++ loop (linears, attention, norms)": loop,
        "LM head": lm_head,
        "collectives (all-reduce, all-gather; rank 0, waits included)": collectives,
        "rest of the forward (norms, SiLU, embedding, inputs)":
            forward - matmul - attention - loop - lm_head - collectives,
        "sampling": sampling,
        "engine Python outside forward and sampling": wall - forward - sampling,
    }
    print(f"{len(prompts)} requests, {generated} output tokens in {wall:.1f} s "
          f"({generated / wall:.1f} output tok/s), {engine.runner.dtype}, {torch.get_num_threads()} threads")
    for name, t in shares.items():
        print(f"  {name:<62} {t:7.2f} s  {100 * t / wall:5.1f}%")
    print(f"{steps} steps: {1e3 * forward / steps:.2f} ms of forward each, of which {1e3 * collectives / steps:.2f} ms "
          f"in {calls / steps:.0f} collectives")
    return 0


if __name__ == "__main__":
    sys.exit(main())
