"""The batched LoRA kernels (shrink + expand over segments of tokens grouped by adapter) against
kernels.reference.add_lora, and that reference against a float64 per-token loop."""
import pytest
import torch
from kernel_utils import DEVICE, rel_err, tolerance

from tokenmill import kernels
from tokenmill.kernels import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_case(num_tokens: int, k: int, n: int, rank: int, num_slots: int, dtype: torch.dtype):
    """x, y, A, B and a per-token slot (-1: no adapter) with runs of several lengths, as a batch of
    prefills and decodes gives them."""
    x = torch.randn(num_tokens, k, device=DEVICE).to(dtype)
    y = torch.randn(num_tokens, n, device=DEVICE).to(dtype)
    lora_a = (torch.randn(num_slots, rank, k, device=DEVICE) / k ** 0.5).to(dtype)
    lora_b = (torch.randn(num_slots, n, rank, device=DEVICE) / rank ** 0.5).to(dtype)
    token_slots = torch.randint(-1, num_slots, (num_tokens,)).tolist()
    token_slots[: num_tokens // 2] = [num_slots - 1] * (num_tokens // 2)  # one long segment
    rows_by_slot: dict[int, list[int]] = {}
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            rows_by_slot.setdefault(slot, []).append(t)
    return x, y, lora_a, lora_b, token_slots, reference.LoRAPlan.build(rows_by_slot, torch.device(DEVICE))


def test_reference_adds_each_tokens_own_adapter_delta():
    x, y, lora_a, lora_b, token_slots, plan = make_case(37, 48, 40, 8, 3, torch.float32)
    want = y.double().clone()
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            want[t] += lora_b[slot].double() @ (lora_a[slot].double() @ x[t].double())
    reference.add_lora(y, x, lora_a, lora_b, plan)
    assert rel_err(y, want) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens, k, n, rank, num_slots", [
    (1, 64, 64, 8, 1),  # one decode token
    (5, 96, 160, 16, 2),  # shapes off the tiles
    (70, 128, 192, 48, 3),  # a packed q|k|v of rank 16: three ranks side by side
    (33, 80, 72, 64, 4),
])
def test_kernel_matches_reference(num_tokens, k, n, rank, num_slots, dtype):
    x, y, lora_a, lora_b, _, plan = make_case(num_tokens, k, n, rank, num_slots, dtype)
    want = y.clone()
    reference.add_lora(want, x, lora_a, lora_b, plan)
    kernels.add_lora(y, x, lora_a, lora_b, plan)
    assert rel_err(y, want) < tolerance(dtype)


def test_kernel_leaves_tokens_without_adapter_alone():
    x, y, lora_a, lora_b, token_slots, plan = make_case(20, 64, 64, 16, 2, torch.float32)
    before = y.clone()
    kernels.add_lora(y, x, lora_a, lora_b, plan)
    none = torch.tensor([s < 0 for s in token_slots], device=DEVICE)
    assert none.any() and torch.equal(y[none], before[none])
