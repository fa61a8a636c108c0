"""The C++ quantized linears (tokenmill::int4_linear, int8_linear) against a float64 matmul with the
dequantized weight, their fake kernels, and the packed modules that route small steps through them."""
import pytest
import torch
from kernel_utils import rel_err, tolerance

from tokenmill.engine.weights.quantization import (
    GROUP_SIZE,
    Int4Linear,
    Int8GroupLinear,
    Int8Groups,
    pack_int4,
    quantize_int4,
)
from tokenmill.kernels import cpu

if not cpu.load():
    pytest.skip("the C++ CPU ops did not build here (see the warning logged)", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1, 77, 64), (3, 161, 576), (16, 33, 1536)]  # (M, N odd, K)


def _int4(n: int, k: int):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales, zeros = torch.rand(n, k // GROUP_SIZE) * 0.1, torch.randn(n, k // GROUP_SIZE) * 0.1
    w = q.double() * scales.double().repeat_interleave(GROUP_SIZE, 1) + zeros.double().repeat_interleave(GROUP_SIZE, 1)
    return q, scales, zeros, w


def _int8(n: int, k: int):
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scales = torch.rand(n, k // GROUP_SIZE) * 0.01
    return q, scales, q.double() * scales.double().repeat_interleave(GROUP_SIZE, 1)


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w.shape[0])
    assert rel_err(y, x.double() @ w.T) < tolerance(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int4_linear_matches_the_dequantized_matmul(m, n, k, dtype):
    q, scales, zeros, w = _int4(n, k)
    x = torch.randn(m, k, dtype=dtype)
    _check(torch.ops.tokenmill.int4_linear(x, pack_int4(q), scales, zeros), x, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_linear_matches_the_dequantized_matmul(m, n, k, dtype):
    q, scales, w = _int8(n, k)
    x = torch.randn(m, k, dtype=dtype)
    _check(torch.ops.tokenmill.int8_linear(x, q, scales), x, w)


def test_int4_packing_puts_value_j_and_j_plus_16_of_a_group_in_byte_j():
    q = torch.arange(64, dtype=torch.uint8).remainder(16).reshape(1, 64)
    packed = pack_int4(q)
    assert packed.shape == (1, 32)
    assert packed[0, 3] == q[0, 3] | (q[0, 19] << 4) and packed[0, 16 + 3] == q[0, 35] | (q[0, 51] << 4)


def test_fake_kernels_give_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 64, dtype=torch.bfloat16)
        y4 = torch.ops.tokenmill.int4_linear(x, torch.empty(7, 32, dtype=torch.uint8), torch.empty(7, 2),
                                             torch.empty(7, 2))
        y8 = torch.ops.tokenmill.int8_linear(x, torch.empty(7, 64, dtype=torch.int8), torch.empty(7, 2))
    assert y4.shape == y8.shape == (5, 7) and y4.dtype == y8.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_modules_compute_their_dequantized_weight_in_the_activations_dtype(dtype):
    w = torch.randn(96, 256) * 0.05
    planes = quantize_int4(w)
    q, scales, _ = _int8(96, 256)
    x = torch.randn(3, 256, dtype=dtype)
    for linear, dequantized in [(Int4Linear(planes, native=True), planes.dequantize()),
                                (Int8GroupLinear(Int8Groups(q, scales)), Int8Groups(q, scales).dequantize())]:
        _check(linear(x), x, dequantized.double())
