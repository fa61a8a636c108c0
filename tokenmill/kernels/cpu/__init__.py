"""C++ CPU ops for the engine's hot path, registered with torch.library under the namespace `tokenmill`.

`load()` builds them on first use (or `python -m tokenmill.kernels.cpu` at install time) and says whether they are
available; `kernels.cpu.ops` is then the ops module the model calls, with kernels.reference's interface.
"""
from .build import load

__all__ = ["load"]
