"""Run the Triton kernels under the interpreter on CPU where there is no GPU.

The interpreter is chosen when a kernel is decorated, so the variable is set at import, before any
test here imports `kernels`; if another folder's tests imported `kernels` first, those compiled-mode
modules are dropped so that the imports here re-create them interpreted.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
        if name != "kernels.reference":
            del sys.modules[name]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
