"""benchmarks/gpu.sh, the GPU check, on a CPU: its arguments, its dry run, the checkpoint it compares on,
the workload it measures, and the report it writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_report, throughput
from benchmarks.datasets import random_token_prompts
from benchmarks.exactness import tokenmill_greedy, transformers_greedy
from benchmarks.random_checkpoint import write_random_llama
from tokenmill.engine import LLM, SamplingParams

REPO = Path(__file__).resolve().parents[2]


def gpu_sh(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PY": sys.executable}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument: --bogus"),
    (["--only", "tests"], "unknown part 'tests'"),
    (["--only", "kernels,nope"], "unknown part 'nope'"),
    (["--only"], "--only needs a part"),
    (["--out"], "--out needs a directory"),
])
def test_bad_arguments_exit_non_zero_with_a_message(args, message):
    r = gpu_sh(*args, "--dry-run")
    assert r.returncode == 2
    assert message in r.stderr and "usage:" in r.stderr


def test_without_a_gpu_a_real_run_stops_and_points_to_dry_run(tmp_path):
    r = gpu_sh("--only", "kernels", "--out", str(tmp_path))
    assert r.returncode == 2 and "--dry-run" in r.stderr


def test_dry_run_prints_every_part_and_writes_only_the_checkpoint(tmp_path):
    r = gpu_sh("--dry-run", "--quick", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    commands = [line for line in r.stdout.splitlines() if line.startswith("+ ")]
    expected = ["-m pytest", "tests/kernels/test_triton_attention.py", "random_checkpoint.py", "exactness.py",
                "triton_kernels.py --out", "configs/qwen3-0.6b.json", "configs/llama-3-8b.json", "gpu_report.py"]
    for part in expected:
        assert any(part in c for c in commands), f"no command with {part!r} in {commands}"
    runs = [c for c in commands if "throughput.py" in c]
    assert len(runs) == 2 and all("--random-ids 100\\,1024" in c and "--hf-batch-sizes ''" in c
                                  and "--num-requests 64" in c and "--load-format dummy" in c for c in runs)
    assert all("--quick" in c for c in commands if "exactness.py" in c or "triton_kernels.py" in c)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # nothing else ran
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()


def test_dry_run_of_one_part_prints_that_part_and_the_report(tmp_path):
    r = gpu_sh("--dry-run", "--only", "kernels", "--out", str(tmp_path))
    commands = [line for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert r.returncode == 0 and len(commands) == 2
    assert "benchmarks/triton_kernels.py" in commands[0] and "gpu_report.py" in commands[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(write_random_llama(tmp_path_factory.mktemp("ckpt"), size="tiny"))


def test_random_checkpoint_loads_in_tokenmill_and_transformers_with_the_same_greedy_tokens(checkpoint):
    prompts = [[5, 17, 300], list(range(1, 40))]
    ours = tokenmill_greedy(checkpoint, prompts, 4, "float32", "cpu")
    assert ours == transformers_greedy(checkpoint, prompts, 4, "float32", "cpu")
    assert all(len(t) == 4 for t in ours)


def test_without_a_tokenizer_a_text_prompt_is_refused_with_a_message(checkpoint):
    llm = LLM(checkpoint, dtype="float32", device="cpu", skip_tokenizer_init=True, kv_cache_memory=8 << 20)
    assert llm.get_tokenizer() is None
    with pytest.raises(ValueError, match="give prompt_token_ids"):
        llm.generate("Once upon a time", use_tqdm=False)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(stop=["."]), use_tqdm=False)


def test_workload_is_nano_vllms_256_requests_of_100_to_1024_tokens():
    prompts, max_tokens = random_token_prompts(256, seed=0, lens=(100, 1024))
    assert len(prompts) == len(max_tokens) == 256
    assert all(100 <= len(p) <= 1024 for p in prompts) and all(100 <= m <= 1024 for m in max_tokens)
    assert all(0 <= t < 10000 for p in prompts for t in p)
    assert len({len(p) for p in prompts}) > 100  # spread over the range, not one length
    assert random_token_prompts(256, seed=0, lens=(100, 1024)) == (prompts, max_tokens)
    assert throughput.build_parser().parse_args(["--random-ids", "100,1024"]).random_ids == (100, 1024)
    assert throughput.build_parser().parse_args([]).random_ids is None  # default: the text workload
    with pytest.raises(SystemExit):
        throughput.build_parser().parse_args(["--random-ids", "1024,100"])


def test_gpu_sh_modules_import_without_server_or_gguf_packages():
    blocked = ["fastapi", "uvicorn", "sse_starlette", "gguf", "tokenmill.api"]
    code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
            + "import benchmarks.throughput, benchmarks.exactness, benchmarks.triton_kernels, benchmarks.gpu_report, "
              "benchmarks.random_checkpoint, tokenmill.kernels.attention\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr


def _write_sample_records(out: Path) -> None:
    (out / "kernel-tests.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1" '
        'skipped="2" tests="40" time="61.5"/></testsuites>')
    (out / "exactness.json").write_text(json.dumps({"dtypes": {
        "float32": {"sequences": 8, "identical_sequences": 8, "matching_prefix_tokens": 256, "total_tokens": 256},
        "bfloat16": {"sequences": 8, "identical_sequences": 6, "matching_prefix_tokens": 230, "total_tokens": 256},
    }}))
    (out / "kernels.json").write_text(json.dumps({"device": "NVIDIA H200", "rows": [
        {"kernel": "paged_attention", "case": "decode seqs=64 len=512", "ms": 0.05, "sdpa_ms": 0.1},
        {"kernel": "paged_attention", "case": "prefill seqs=8 len=4096", "ms": 2.0, "sdpa_ms": 1.0},
        {"kernel": "silu_and_mul", "case": "tokens=8192", "ms": 0.1, "reference_ms": 0.3},
    ]}))
    (out / "throughput-20260101-000000.json").write_text(json.dumps({
        "tokenmill": {"elapsed_s": 20.0, "prompt_tokens": 140000, "output_tokens": 141000,
                      "output_tokens_per_s": 7050.0, "total_tokens_per_s": 14050.0},
        "config": {"model": "benchmarks/configs/qwen3-0.6b.json", "num_requests": 256},
        "environment": {"dtype": "torch.bfloat16"}}))


def test_report_turns_the_records_into_the_markdown_tables(tmp_path):
    _write_sample_records(tmp_path)
    assert gpu_report.main([str(tmp_path)]) == 0
    assert (tmp_path / "summary.md").read_text() == """\
# GPU check

| part | verdict | result |
|---|---|---|
| kernel tests, compiled | FAIL | 37 passed, 1 failed, 0 errors, 2 skipped in 62 s |
| greedy vs transformers, float32 | PASS | 8/8 sequences identical, 256/256 tokens before the first divergence |
| greedy vs transformers, bfloat16 | report | 6/8 sequences identical, 230/256 tokens before the first divergence |
| kernels vs torch | report | paged_attention at 1.00x SDPA's speed (geometric mean of 2 cases) on NVIDIA H200 |
| throughput, qwen3-0.6b | report | 7050 output tok/s, 14050 total tok/s |

## Kernels vs torch (bf16)

| kernel | case | ms | torch ms | speedup |
|---|---|---|---|---|
| paged_attention | decode seqs=64 len=512 | 0.0500 | 0.1000 | 2.00x |
| paged_attention | prefill seqs=8 len=4096 | 2.0000 | 1.0000 | 0.50x |
| silu_and_mul | tokens=8192 | 0.1000 | 0.3000 | 3.00x |

## Throughput, dummy weights

| model | dtype | requests | prompt tokens | output tokens | seconds | output tok/s | total tok/s |
|---|---|---|---|---|---|---|---|
| qwen3-0.6b | torch.bfloat16 | 256 | 140000 | 141000 | 20.0 | 7050 | 14050 |
"""
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kernel_tests"] == {"tests": 40, "failures": 1, "errors": 0, "skipped": 2, "time": 61.5}


def test_report_marks_parts_that_did_not_run(tmp_path):
    assert gpu_report.main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    for part in ("kernel tests, compiled", "greedy vs transformers", "kernels vs torch", "throughput"):
        assert f"| {part} | not run |  |" in text
    assert gpu_report.main([str(tmp_path / "missing")]) == 2
