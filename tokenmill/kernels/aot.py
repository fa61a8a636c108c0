"""Compile every Triton kernel variant the engine can launch, for each GPU generation, with no GPU.

    python -m tokenmill.kernels.aot [--arch 80,90] [--jobs N] [--only SUBSTRING]

For each model shape below and each dtype, it calls the real launchers (kernels.attention and the others)
on small CPU tensors laid out as the model's layers lay them out, with every tile and split-KV choice the
launchers can pick (kernels.attention.block_m_choices, NUM_SPLITS_CHOICES). The launches are caught before
they run and specialised by Triton's own binder, as a launch on the GPU would be (ints equal to 1 become
constants, ints and pointers divisible by 16 are marked so), then compiled to a cubin with the ptxas in
Triton's wheel. One line per variant: kernel, arch, specialization, registers, spills, shared memory; then
`N variants, S spills, F failures`. Exits non-zero on a failed compile, a spill, or more shared memory or
registers than a block of the arch may have.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

if __name__ == "__main__":
    # The interpreter would hand back kernels that cannot be compiled: off before anything imports triton.
    os.environ.pop("TRITON_INTERPRET", None)
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

import torch  # noqa: E402
import triton  # noqa: E402

from . import activation, attention, kv_cache, lora, norm, rotary  # noqa: E402
from .reference import LoRAPlan  # noqa: E402

BLOCK_SIZE = 16
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Shared memory a block may opt in to, and registers per SM, by compute capability.
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}
REGS_PER_SM = 65536
# max_lora_rank values whose LoRA tiles are compiled (the engine's default is 16).
LORA_RANKS = (8, 16, 32, 64)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    qk_norm: bool


MODELS = (
    ModelShape("SmolLM2-135M", 576, 9, 3, 64, 1536, False),
    ModelShape("Qwen3-0.6B", 1024, 16, 8, 128, 3072, True),
    ModelShape("Llama-3-8B", 4096, 32, 8, 128, 14336, False),
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compile: what Triton's launcher would hand to triton.compile."""
    module: str
    kernel: str
    arch: int
    label: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    def key(self):
        return (self.kernel, self.arch, repr(sorted(self.signature.items())),
                repr(sorted(self.constexprs.items())), repr(sorted(self.attrs.items())),
                self.options["num_warps"], self.options["num_stages"])


_KERNELS = {
    "attention": (attention, ("_paged_attention_kernel", "_merge_splits_kernel")),
    "kv_cache": (kv_cache, ("_write_kv_cache_kernel",)),
    "rotary": (rotary, ("_rotary_kernel",)),
    "norm": (norm, ("_rms_norm_kernel",)),
    "activation": (activation, ("_silu_and_mul_kernel",)),
    "lora": (lora, ("_lora_shrink_kernel", "_lora_expand_kernel")),
}


@contextlib.contextmanager
def _catch_launches(calls: list):
    """Record (kernel, args, kwargs) for every launch of the engine's kernels instead of running it."""
    patched = []
    for module, names in _KERNELS.values():
        for name in names:
            fn = getattr(module, name)

            def run(*args, grid, warmup, _fn=fn, **kwargs):
                calls.append((_fn, args, kwargs))

            fn.run = run  # the instance attribute shadows JITFunction.run, which fn[grid](...) calls
            patched.append(fn)
    try:
        yield
    finally:
        for fn in patched:
            del fn.run


def _launches(model: ModelShape, dtype: torch.dtype) -> list:
    """Every launch one forward step of `model` can make, caught: (kernel, args, kwargs)."""
    m = model
    # On the meta device: no memory, data_ptr() is the offset from an aligned base (as a CUDA allocation's
    # is), and a launcher that asks whether it runs on the CPU (the interpreter) hears no.
    torch.set_default_device("meta")
    try:
        return _launches_on_meta(m, dtype)
    finally:
        torch.set_default_device(None)


def _launches_on_meta(m: ModelShape, dtype: torch.dtype) -> list:
    tokens = 4  # the batch's sizes are not specialised on (do_not_specialize), so any will do
    q_size, kv_size = m.heads * m.head_dim, m.kv_heads * m.head_dim
    x = torch.zeros(tokens, m.hidden, dtype=dtype)
    weight = torch.ones(m.hidden, dtype=dtype)
    # As engine/models/layers.py: q, k, v are views of one fused projection, q and k rotated in place as
    # they are (or normalised into new tensors first).
    qkv = torch.zeros(tokens, q_size + 2 * kv_size, dtype=dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = (t.reshape(tokens, -1, m.head_dim) for t in (q, k))
    v = v.reshape(tokens, m.kv_heads, m.head_dim)
    head_weight = torch.ones(m.head_dim, dtype=dtype)
    num_blocks = 8
    k_cache = torch.zeros(2, num_blocks, BLOCK_SIZE, m.kv_heads, m.head_dim, dtype=dtype)
    cos = torch.zeros(64, m.head_dim // 2)  # float32 whatever the model's dtype, as RotaryEmbedding's
    positions = torch.arange(tokens)
    slots = torch.arange(tokens, dtype=torch.int64)
    calls: list = []
    with _catch_launches(calls):
        norm.rms_norm(x, weight, 1e-6)
        norm.rms_norm(x, weight, 1e-6, x)
        if m.qk_norm:
            q, k = norm.rms_norm(q, head_weight, 1e-6), norm.rms_norm(k, head_weight, 1e-6)
        rotary.rotary_and_cache(positions, q, k, v, cos, cos, k_cache[0], k_cache[1], slots)
        activation.silu_and_mul(torch.zeros(tokens, 2 * m.intermediate, dtype=dtype))
        attention.launch_every_variant(m.heads, k_cache[0], k_cache[1], m.head_dim ** -0.5)
        _lora_launches(m, x, dtype)
    return calls


def _lora_launches(m: ModelShape, x: torch.Tensor, dtype: torch.dtype) -> None:
    """add_lora on each linear an adapter can target, as engine/weights/lora.py stacks them: a packed linear's
    slices side by side in the rank dimension."""
    tokens = x.shape[0]
    plan = LoRAPlan(torch.arange(tokens), torch.tensor([0, tokens], dtype=torch.int32),
                    torch.zeros(1, dtype=torch.int32), [0, tokens], [0])
    q_size, kv_size = m.heads * m.head_dim, m.kv_heads * m.head_dim
    linears = [(m.hidden, q_size + 2 * kv_size, 3), (q_size, m.hidden, 1), (m.hidden, 2 * m.intermediate, 2),
               (m.intermediate, m.hidden, 1)]  # (inputs, outputs, slices): qkv, o, gate_up, down
    for rank in LORA_RANKS:
        for k, n, slices in linears:
            a = torch.zeros(2, slices * rank, k, dtype=dtype)
            b = torch.zeros(2, n, slices * rank, dtype=dtype)
            lora.add_lora(torch.zeros(tokens, n, dtype=dtype), torch.zeros(tokens, k, dtype=dtype), a, b, plan)


def _specialize(fn, args, kwargs, arch: int) -> tuple[dict, dict, dict, dict]:
    """Signature, constexprs, attrs and options as JITFunction.run would build them for this launch."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, dict(options.__dict__)


def _label(model: ModelShape, dtype: torch.dtype, fn, signature: dict, constexprs: dict, attrs: dict,
           options: dict) -> str:
    names = fn.arg_names
    consts = " ".join(f"{names[i[0]]}={v}" for i, v in sorted(constexprs.items()))
    # Runtime ints Triton specialised: "==1" became constants above; "%16" counts those known divisible
    # by 16, naming the others.
    ints = [names[i[0]] for i, _ in sorted(attrs.items()) if signature[names[i[0]]].startswith("i")]
    odd = [n for n in ints if ["tt.divisibility", 16] not in attrs[(names.index(n),)]]
    ints = f" %16={len(ints) - len(odd)}/{len(ints)}" + (f"(not {','.join(odd)})" if odd else "")
    return f"{model.name} {str(dtype).removeprefix('torch.')} {consts}{ints} warps={options['num_warps']}"


def variants(archs=(80, 90)) -> list[Variant]:
    """Every (kernel, arch, specialization) the engine can launch, without duplicates."""
    seen, out = set(), []
    for model in MODELS:
        for dtype in DTYPES:
            for fn, args, kwargs in _launches(model, dtype):
                for arch in archs:
                    sig, consts, attrs, opts = _specialize(fn, args, kwargs, arch)
                    v = Variant(fn.fn.__module__, fn.fn.__name__, arch,
                                _label(model, dtype, fn, sig, consts, attrs, opts), sig, consts, attrs, opts)
                    if v.key() not in seen:
                        seen.add(v.key())
                        out.append(v)
    return out


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_variant(v: Variant) -> dict:
    """Compile one variant to a cubin; registers and spills from ptxas's report, shared memory from Triton's."""
    import importlib

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(v.module), v.kernel)
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's report to stdout
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, v.signature, v.constexprs, v.attrs),
                                      target=GPUTarget("cuda", v.arch, 32), options=v.options)
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return {"error": f"{type(e).__name__}: {msg}"[:300], "seconds": time.perf_counter() - start}
    text = log.getvalue()
    regs = [int(r) for r in _PTXAS_REGS.findall(text)]
    spills = [int(s) + int(lo) for s, lo in _PTXAS_SPILLS.findall(text)]
    return {"regs": max(regs) if regs else -1, "spills": sum(spills), "shared": compiled.metadata.shared,
            "seconds": time.perf_counter() - start, "error": None}


def check(v: Variant, r: dict) -> list[str]:
    """The problems with one compiled variant: failure, spills, or more than the arch allows."""
    if r["error"]:
        return [r["error"]]
    problems = []
    if r["regs"] < 0:
        problems.append("no register count in the ptxas report")
    if r["spills"]:
        problems.append(f"{r['spills']} bytes spilled")
    if r["shared"] > MAX_SHARED[v.arch]:
        problems.append(f"shared {r['shared']} > {MAX_SHARED[v.arch]}")
    if r["regs"] * v.options["num_warps"] * 32 > REGS_PER_SM:
        problems.append(f"{r['regs']} registers x {v.options['num_warps']} warps exceed an SM's {REGS_PER_SM}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--only", default="", help="only the variants whose line contains this text")
    parser.add_argument("--list", action="store_true", help="list the variants, compile nothing")
    args = parser.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(","))
    unknown = [a for a in archs if a not in MAX_SHARED]
    if unknown:
        parser.error(f"unsupported arch {unknown}; known: {sorted(MAX_SHARED)}")

    start = time.perf_counter()
    todo = [v for v in variants(archs) if args.only in f"{v.kernel} sm_{v.arch} {v.label}"]
    if args.list:
        for v in todo:
            print(f"{v.kernel} sm_{v.arch} {v.label}")
        print(f"{len(todo)} variants")
        return 0
    # A fresh cache, so that ptxas runs (and reports) for every variant.
    cache = tempfile.mkdtemp(prefix="tokenmill-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache
    # The big kernels first, so that the pool's last tasks are short.
    order = sorted(range(len(todo)), key=lambda i: todo[i].kernel != "_paged_attention_kernel")
    spills = failures = 0
    try:
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = dict(zip(order, pool.map(compile_variant, [todo[i] for i in order]), strict=True))
        for i, v in enumerate(todo):
            r = results[i]
            problems = check(v, r)
            spills += bool(r.get("spills"))
            failures += bool(problems)
            res = "" if r["error"] else f"regs={r['regs']} spills={r['spills']} shared={r['shared']}"
            flag = f"  FAIL: {'; '.join(problems)}" if problems else ""
            print(f"{v.kernel} sm_{v.arch} {v.label} {res}{flag}".rstrip())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"{len(todo)} variants, {spills} spills, {failures} failures ({time.perf_counter() - start:.0f} s)")
    return 1 if failures or not todo else 0


if __name__ == "__main__":
    sys.exit(main())
