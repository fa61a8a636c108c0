"""Build the C++ CPU ops against the installed torch and load them into torch.ops.tokenmill.

The library is compiled once per (sources, torch version, CPU) with torch.utils.cpp_extension and kept in
~/.cache/tokenmill/cpu_ops/<key>/, so later processes only load it. A failed build (no compiler, no ninja)
logs one warning and leaves the engine on kernels.reference.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

import torch

from .isa import compile_flags, cpu_flags

logger = logging.getLogger(__name__)

NAME = "tokenmill_cpu_ops"
CSRC = Path(__file__).resolve().parent / "csrc"
CACHE_ROOT = Path.home() / ".cache" / "tokenmill" / "cpu_ops"


def build_dir() -> Path:
    """This build's folder: keyed by the sources, the torch version and the CPU the code is tuned for."""
    flags = cpu_flags()
    key = hashlib.sha256()
    for src in sorted(CSRC.iterdir()):
        key.update(src.name.encode() + src.read_bytes())
    key.update(f"{torch.__version__} {platform.machine()} {' '.join(sorted(flags))}".encode())
    return CACHE_ROOT / key.hexdigest()[:16]


@functools.cache
def load() -> bool:
    """Load the ops, building them first if this machine has no build yet. False if that failed."""
    try:
        library = build_dir() / f"{NAME}.so"
        if library.exists():
            torch.ops.load_library(str(library))
        else:
            _build(library)  # which loads it too (loading a library twice would abort the process)
    except Exception as e:  # no compiler, a failed compile, a library that does not load: run without
        logger.warning("C++ CPU ops unavailable, using the PyTorch references: %s", e)
        return False
    from . import fake  # noqa: F401  (registers the ops' shape functions once the ops exist)

    return True


def _build(library: Path) -> None:
    """Compile and load the library, then publish it where later processes look for it."""
    from torch.utils.cpp_extension import load as cpp_load

    work = library.parent / "build"
    work.mkdir(parents=True, exist_ok=True)
    cflags = compile_flags(cpu_flags())
    logger.info("building the C++ CPU ops in %s (once per torch version and CPU)", work)
    cpp_load(NAME, sources=[str(p) for p in sorted(CSRC.glob("*.cpp"))], extra_cflags=cflags,
             extra_ldflags=["-fopenmp"], build_directory=str(work), is_python_module=False)
    # Published by an atomic rename, so a concurrent process never loads a half-written library.
    tmp = library.with_suffix(f".{os.getpid()}.tmp")
    shutil.copyfile(work / f"{NAME}.so", tmp)
    os.replace(tmp, library)
