# `benchmarks` is a top-level folder, not an installed package: import it from the repo root.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
