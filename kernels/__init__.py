"""Kernels for the engine's hot ops. `kernels.reference` holds the plain-PyTorch versions.

The Triton kernels are exported when triton imports (it does without a GPU; the interpreter,
TRITON_INTERPRET=1, runs them on CPU tensors). HAS_TRITON tells the engine whether they are here.
"""
__all__ = ["HAS_TRITON"]

try:
    import triton  # noqa: F401
except ImportError:  # e.g. macOS or Windows: the engine falls back to kernels.reference
    HAS_TRITON = False
else:
    HAS_TRITON = True
    from kernels.activation import silu_and_mul
    from kernels.attention import paged_attention
    from kernels.kv_cache import write_kv_cache
    from kernels.norm import rms_norm
    from kernels.rotary import rotary_embedding

    __all__ += ["paged_attention", "write_kv_cache", "rms_norm", "rotary_embedding", "silu_and_mul"]
