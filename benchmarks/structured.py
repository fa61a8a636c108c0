"""What structured outputs cost: offline throughput with half the requests constrained by a JSON schema
against none constrained, same prompts, same batch size, one run; and the per-step cost of the token
masks (filling each constrained row's bitmask, and applying the masks to the logits).

    python benchmarks/structured.py [--num-requests 32] [--max-tokens 128] [--dtype float32]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in a checkout

from tokenmill.engine import LLM, SamplingParams, structured_output  # noqa: E402

# A non-trivial schema: nested object, enum, bounded array, numbers and strings.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["engineer", "doctor", "teacher", "artist", "other"]},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 30},
                                   "country": {"type": "string", "maxLength": 30}},
                    "required": ["city", "country"], "additionalProperties": False},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "rating": {"type": "number"},
    },
    "required": ["name", "age", "role", "address", "skills", "rating"],
    "additionalProperties": False,
}


class MaskTimer:
    """Wall time spent filling bitmasks and applying them, and the steps that had any."""

    def __init__(self):
        self.fill = self.apply = 0.0
        self.steps = 0

    def install(self, llm: LLM) -> None:
        fill, apply = structured_output.GrammarCompiler.bitmask, llm.engine.sampler.apply_token_bitmask

        def timed_fill(compiler, *args):
            start = time.perf_counter()
            try:
                return fill(compiler, *args)
            finally:
                self.fill += time.perf_counter() - start
                self.steps += 1

        def timed_apply(*args):
            start = time.perf_counter()
            try:
                return apply(*args)
            finally:
                self.apply += time.perf_counter() - start

        structured_output.GrammarCompiler.bitmask = timed_fill
        llm.engine.sampler.apply_token_bitmask = timed_apply


def run(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> tuple[float, int]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    llm = LLM(dtype=args.dtype, max_num_seqs=args.num_requests)
    prompts = [f"Describe person number {i} of a team as JSON with their name, age, role, address, skills "
               "and rating." for i in range(args.num_requests)]
    # ignore_eos: free rows run to max_tokens, constrained ones until their JSON is complete.
    free = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True,
                                 structured_outputs={"json": SCHEMA})
    mixed = [constrained if i % 2 == 0 else free for i in range(args.num_requests)]
    run(llm, prompts[:2], [constrained, free])  # warm-up, and the schema compiled once (cached)
    timer = MaskTimer()
    timer.install(llm)
    free_s, free_tokens = run(llm, prompts, [free] * args.num_requests)
    mixed_s, mixed_tokens = run(llm, prompts, mixed)
    free_rate, mixed_rate = free_tokens / free_s, mixed_tokens / mixed_s
    print(f"{args.num_requests} requests at once, {args.dtype}, max_tokens {args.max_tokens}")
    print(f"none constrained: {free_tokens} tokens in {free_s:.1f} s = {free_rate:.1f} output tok/s")
    print(f"half constrained: {mixed_tokens} tokens in {mixed_s:.1f} s = {mixed_rate:.1f} output tok/s "
          f"({mixed_rate / free_rate:.1%} of none constrained)")
    if timer.steps:
        print(f"mask cost per step with constrained rows: fill {timer.fill / timer.steps * 1e3:.2f} ms, "
              f"apply {timer.apply / timer.steps * 1e3:.2f} ms over {timer.steps} steps")


if __name__ == "__main__":
    main()
