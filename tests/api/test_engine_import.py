"""The engine imports and runs with no web framework installed (imports go api -> engine only)."""
import subprocess
import sys
from pathlib import Path

BLOCK_WEB = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        web = name.split(".")[0] in ("fastapi", "uvicorn", "starlette", "sse_starlette", "prometheus_client")
        if web or name == "tokenmill.api" or name.startswith("tokenmill.api."):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
import importlib, pkgutil
import tokenmill.engine
for module in pkgutil.walk_packages(tokenmill.engine.__path__, "tokenmill.engine."):
    importlib.import_module(module.name)
from tokenmill import LLM, SamplingParams
print("ok")
"""


def test_engine_imports_without_fastapi():
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", BLOCK_WEB], cwd=repo, capture_output=True, text=True,
                         env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
