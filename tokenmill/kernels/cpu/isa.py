"""What this CPU's vector units are, as the C++ ops' build and their shape functions both need to know."""
from __future__ import annotations

from pathlib import Path

# at::vec picks its vector width from these macros, as torch's own per-capability kernels do.
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
_AVX2 = {"avx2", "fma"}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def compile_flags(flags: frozenset[str]) -> list[str]:
    """g++ flags that build the ops for these CPU features."""
    cflags = ["-O3", "-fopenmp", "-march=native"]
    if _AVX512 <= flags:
        cflags += ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    elif _AVX2 <= flags:
        cflags += ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return cflags


def vector_floats() -> int:
    """Float32 lanes of the at::vec vectors this machine's build uses (as compile_flags chooses)."""
    return 16 if _AVX512 <= cpu_flags() else 8
