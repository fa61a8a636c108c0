"""Kernels for the engine's hot ops. `kernels.reference` holds the plain-PyTorch versions.

The Triton kernels load on first use, so importing this package needs neither triton nor a GPU;
where triton is missing, using one raises ImportError and the engine stays on `kernels.reference`.
Without a GPU they run on CPU tensors under the interpreter (TRITON_INTERPRET=1 before triton imports).
"""
_MODULES = {
    "paged_attention": "kernels.attention",
    "plan_attention": "kernels.attention",
    "launch_every_variant": "kernels.attention",
    "write_kv_cache": "kernels.kv_cache",
    "rms_norm": "kernels.norm",
    "rotary_embedding": "kernels.rotary",
    "rotary_and_cache": "kernels.rotary",
    "silu_and_mul": "kernels.activation",
    "add_lora": "kernels.lora",
}
__all__ = list(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    kernel = getattr(__import__(_MODULES[name], fromlist=[name]), name)
    globals()[name] = kernel  # later lookups skip this hook
    return kernel
