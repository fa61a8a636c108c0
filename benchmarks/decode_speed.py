"""Single-stream decode speed: one request at a time, greedy, a fixed number of output tokens.

    python benchmarks/decode_speed.py --quantization gguf --runs 5
    python benchmarks/decode_speed.py --dtype float32

Drives LLMEngine.step() directly and times every step: the first step of a request is its prefill, the rest
are batch-1 decode steps (schedule, forward, LM head, sample, detokenize). Reports the median over runs of
decode tok/s (decode steps / their wall time), the median step's wall time and its CPU time (all threads): on a
machine shared with other work, CPU time at --threads 1 is the steadier measure of a step's work, since wall
time then counts the time the process waited for a core. The prompt is a chat request to copy a passage with
small edits, the workload llama-server was measured on.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.datasets import WORDS  # noqa: E402
from tokenmill.engine import LLM, SamplingParams  # noqa: E402
from tokenmill.engine.config import QUANTIZATIONS  # noqa: E402


def chat_prompt(llm: LLM, words: int) -> list[int]:
    """Token ids of a chat request that asks the model to copy a passage of `words` corpus words, edited."""
    passage = " ".join(WORDS[:words])
    messages = [{"role": "user", "content": "Copy the following passage, replacing every 'the' with 'a':\n\n"
                 + passage}]
    return list(llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False))


def run_once(llm: LLM, prompt: list[int], params: SamplingParams,
             request_id: str) -> tuple[float, list[float], list[float]]:
    """(prefill seconds, each decode step's wall seconds, and its CPU seconds) of one request run alone."""
    engine = llm.engine
    engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    wall, cpu = [], []
    while engine.has_unfinished_requests():
        start, start_cpu = time.perf_counter(), time.process_time()
        engine.step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall[0], wall[1:], cpu[1:]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--prompt-words", type=int, default=120)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the core count)")
    args = p.parse_args(argv)

    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, enable_prefix_caching=False,
              num_threads=args.threads)
    prompt = chat_prompt(llm, args.prompt_words)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    run_once(llm, prompt, params, "warm-up")
    rates, steps, cpu_steps, prefills = [], [], [], []
    for i in range(args.runs):
        prefill, decode, cpu = run_once(llm, prompt, params, f"run-{i}")
        rates.append(len(decode) / sum(decode))
        steps.append(statistics.median(decode))
        cpu_steps.append(statistics.median(cpu))
        prefills.append(prefill)
    mode = args.quantization or llm.engine.runner.dtype
    print(f"{mode}, {torch.get_num_threads()} threads: {len(prompt)} prompt tokens, {args.max_tokens} output tokens, "
          f"{args.runs} runs: decode {statistics.median(rates):.1f} tok/s "
          f"(runs: {', '.join(f'{r:.1f}' for r in rates)}), "
          f"median step {1e3 * statistics.median(steps):.2f} ms wall, {1e3 * statistics.median(cpu_steps):.2f} ms CPU, "
          f"prefill {1e3 * statistics.median(prefills):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
