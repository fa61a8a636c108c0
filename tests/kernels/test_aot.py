"""kernels.aot: its variant list covers what the launchers pick, and a variant compiles for sm_90 with no GPU."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from tokenmill.kernels import aot, attention  # noqa: E402


def _attention_picks(launches) -> set:
    """The constexprs of the attention launches: what decides which compiled variant runs."""
    keys = set()
    for fn, _args, kwargs, *_ in launches:
        if fn in (attention._paged_attention_kernel, attention._merge_splits_kernel):
            keys.add((fn.__name__, tuple(sorted(kwargs.items()))))
    return keys


@pytest.mark.parametrize("dtype", aot.DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8, 16])
def test_block_m_and_splits_come_from_the_lists(group, dtype):
    for max_q_len in [*range(1, 80), 127, 128, 129, 1000, 8192]:
        block_m = attention.choose_block_m(max_q_len, group, dtype)
        assert block_m in attention.block_m_choices(dtype) and block_m >= group
    for programs in [1, 2, 3, 5, 8, 13, 40, 100, 131, 132, 1000]:
        for max_seq_len in [1, 16, 255, 256, 257, 1000, 4096, 32768, 131072]:
            splits = attention.choose_num_splits(programs, max_seq_len, torch.device("cpu"))
            assert splits in attention.NUM_SPLITS_CHOICES


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("model", aot.MODELS, ids=lambda m: m.name)
def test_variants_cover_the_launchers_picks(model, dtype):
    """Batches of many shapes through the real launcher: every attention launch is among aot's variants."""
    listed = _attention_picks(aot._launches(model, dtype))
    calls: list = []
    torch.set_default_device("meta")
    try:
        with aot._catch_launches(calls):
            for num_seqs, q_len, seq_len in [(1, 1, 1), (1, 1, 17), (1, 1, 5000), (2, 1, 600), (7, 1, 90),
                                             (64, 1, 300), (300, 1, 40), (1, 5, 100), (1, 37, 37), (3, 64, 2000),
                                             (1, 512, 512), (16, 100, 4096), (1, 3, 100000)]:
                blocks = -(-seq_len // aot.BLOCK_SIZE)
                q = torch.zeros(num_seqs * q_len, model.heads, model.head_dim, dtype=dtype)
                cache = torch.zeros(num_seqs * blocks, aot.BLOCK_SIZE, model.kv_heads, model.head_dim, dtype=dtype)
                tables = torch.zeros(num_seqs, blocks, dtype=torch.int32)
                lens = torch.full((num_seqs,), seq_len, dtype=torch.int32)
                starts = torch.arange(num_seqs + 1, dtype=torch.int32) * q_len
                attention.paged_attention(q, cache, cache, tables, lens, starts, 0.1)
    finally:
        torch.set_default_device(None)
    picked = _attention_picks((fn, args, kwargs) for fn, args, kwargs in calls)
    assert picked and picked <= listed, picked - listed


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's ptxas is a Linux binary")
def test_compiles_one_variant_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-m", "tokenmill.kernels.aot", "--arch", "90", "--jobs", "1",
                          "--only", "_merge_splits_kernel sm_90 SmolLM2-135M float16 NUM_SPLITS=2 "],
                         capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[-1].startswith("1 variants, 0 spills, 0 failures"), run.stdout
    assert "regs=" in run.stdout


_BATCH_OF_ONE = """
import torch
from tokenmill.kernels import aot, attention
model, keys = aot.MODELS[0], []
torch.set_default_device("meta")
for num_seqs in (1, 5):
    calls = []
    q = torch.zeros(num_seqs, model.heads, model.head_dim, dtype=torch.float16)
    cache = torch.zeros(4, aot.BLOCK_SIZE, model.kv_heads, model.head_dim, dtype=torch.float16)
    tables = torch.zeros(num_seqs, 4, dtype=torch.int32)
    lens = torch.full((num_seqs,), 40, dtype=torch.int32)
    starts = torch.arange(num_seqs + 1, dtype=torch.int32)
    with aot._catch_launches(calls):
        attention.paged_attention(q, cache, cache, tables, lens, starts, 0.1, num_splits=2)
    keys.append([repr(aot._specialize(fn, args, kwargs, 90)[:3]) for fn, args, kwargs in calls])
assert len(keys[0]) == 2, keys  # the attention kernel and the merge of its splits
assert keys[0] == keys[1], keys
"""


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's GPU backend")
def test_a_batch_of_one_compiles_the_same_variant_as_any_batch():
    """num_seqs == 1 (one request, the batch-1 graph) and num_tokens == 1 must not become compile-time
    constants: a one-sequence decode launches the variant of a larger batch (Triton specialised, compiled,
    not the interpreter: in a process of its own)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", _BATCH_OF_ONE], capture_output=True, text=True, env=env,
                         cwd=root, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
