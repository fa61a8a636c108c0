"""What a speculative verify step costs against a decode step: the target's forward and LM head for one
sequence and a query of q tokens (its last token and q-1 draft tokens), after a 200-token prompt.

    python benchmarks/verify_cost.py gguf      # or int8, int4, float32
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.engine.core.scheduler import SchedulerOutput  # noqa: E402


def main(mode: str = "gguf", runs: int = 20) -> dict[int, float]:
    """Mean milliseconds of one verify forward per query length, after 3 warm-ups."""
    llm = LLM(quantization=None if mode == "float32" else mode, dtype="float32" if mode == "float32" else "auto")
    engine = llm.engine
    engine.add_request("r", list(range(1000, 1200)), SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    engine.step()  # the prefill
    seq = engine.requests["r"].seqs[0]
    ms = {}
    for q in (1, 2, 3, 5, 8):
        engine.block_manager.allocate(seq, 1, num_lookahead_tokens=q - 1)
        seq.spec_token_ids = [7] * (q - 1)
        sched = SchedulerOutput([seq], [1])
        for _ in range(3):
            engine.runner.execute(sched)
        start = time.perf_counter()
        for _ in range(runs):
            engine.runner.execute(sched)
        ms[q] = (time.perf_counter() - start) / runs * 1000
        seq.spec_token_ids = []
        engine.block_manager.trim(seq)
    return ms


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "gguf"
    print(mode, {q: f"{t:.1f} ms" for q, t in main(mode).items()})
