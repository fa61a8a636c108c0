"""Run the Triton kernels under the interpreter on CPU where there is no GPU.

Triton reads TRITON_INTERPRET when its own modules and our kernels are decorated, so it is set here,
at import, before these tests import `kernels`. If triton was already imported in compiled mode by
tests collected earlier (other folders), these tests are skipped with the reason, not failed obscurely.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent
_TOO_LATE = False
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    _TOO_LATE = "triton" in sys.modules
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not _TOO_LATE:
        return
    skip = pytest.mark.skip(reason="triton was imported before TRITON_INTERPRET=1 could be set and there is "
                                   "no GPU: run tests/kernels on its own or with TRITON_INTERPRET=1")
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
