"""Kernel tests run compiled on a GPU, else under the Triton interpreter (set in tests/conftest.py)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
