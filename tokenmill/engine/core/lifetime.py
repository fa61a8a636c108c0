"""A child process that dies with its parent: the engine process with the server, tensor-parallel
workers with the engine."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies, even by SIGKILL (Linux). The signal
    follows the parent's thread that started us, so the parent must start us on a thread that lives as
    long as it does. Elsewhere, the caller's pipe reading EOF ends us."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); relying on the pipe's EOF",
                           ctypes.get_errno())
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)


def set_process_name(name: str) -> None:
    """Name this process as `ps`, `top` and /proc/PID/comm show it (Linux; the kernel keeps 15 bytes)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
