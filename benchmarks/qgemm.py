"""Per-call time of the quantized linears at decode sizes, SmolLM2-135M shapes: tokenmill's int4_linear /
int8_linear (float32 and bfloat16 x) against torch's _weight_int4pack_mm_for_cpu (bfloat16 x, the LM head as
two int4 planes) and a float32 F.linear of the dequantized weight. Medians of wall time, torch's thread count.

    python benchmarks/qgemm.py [--threads 2] [--repeats 50]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in a checkout

from tokenmill.engine.weights.quantization import GROUP_SIZE, Int4Linear, Int4Planes, Int8GroupLinear, Int8Groups  # noqa: E402
from tokenmill.kernels import cpu  # noqa: E402

SHAPES = [("576->1536 (int4)", 576, 1536), ("LM head 576->49152 (Q8_0)", 576, 49152)]


def median_ms(f, args: tuple, repeats: int) -> float:
    for _ in range(3):
        f(*args)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert cpu.load(), "the C++ CPU ops did not build"
    print(f"{'shape':28} {'M':>3} {'ours fp32':>10} {'ours bf16':>10} {'torch int4 bf16':>16} {'F.linear fp32':>14}")
    for name, k, n in SHAPES:
        groups = k // GROUP_SIZE
        if "Q8_0" in name:
            weight = Int8Groups(torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n, groups) * 0.01)
            ours, planes = Int8GroupLinear(weight), weight.int4_planes()
        else:
            planes = Int4Planes([(torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.rand(n, groups) * 0.1,
                                  torch.randn(n, groups) * 0.1)])
            ours, weight = Int4Linear(planes, native=True), planes
        theirs, dense = Int4Linear(planes), weight.dequantize()
        for m in (1, 8):
            x = torch.randn(m, k)
            xb = x.bfloat16()
            calls = [(ours.packed_mm, (x,)), (ours.packed_mm, (xb,)), (theirs.packed_mm, (xb,)), (F.linear, (x, dense))]
            times = [median_ms(f, f_args, args.repeats) for f, f_args in calls]
            print(f"{name:28} {m:>3} {times[0]:>10.3f} {times[1]:>10.3f} {times[2]:>16.3f} {times[3]:>14.3f}")


if __name__ == "__main__":
    main()
