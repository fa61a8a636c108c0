"""`python -m tokenmill.kernels.cpu`: build the C++ CPU ops now (install time) rather than on first use."""
import logging
import sys

from .build import build_dir, load

logging.basicConfig(level=logging.INFO, format="%(message)s")
if not load():
    sys.exit(1)
print(f"tokenmill C++ CPU ops ready in {build_dir()}")
