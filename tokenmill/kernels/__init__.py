"""Kernels for the engine's hot ops. `tokenmill.kernels.reference` holds the plain-PyTorch versions.

The Triton kernels load on first use, so importing this package needs neither triton nor a GPU;
where triton is missing, using one raises ImportError and the engine stays on `tokenmill.kernels.reference`.
Without a GPU they run on CPU tensors under the interpreter (TRITON_INTERPRET=1 before triton imports).
"""
import importlib

_MODULES = {
    "paged_attention": ".attention",
    "plan_attention": ".attention",
    "launch_every_variant": ".attention",
    "write_kv_cache": ".kv_cache",
    "rms_norm": ".norm",
    "rotary_embedding": ".rotary",
    "rotary_and_cache": ".rotary",
    "silu_and_mul": ".activation",
    "add_lora": ".lora",
}
__all__ = list(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'tokenmill.kernels' has no attribute {name!r}")
    kernel = getattr(importlib.import_module(_MODULES[name], __name__), name)
    globals()[name] = kernel  # later lookups skip this hook
    return kernel
