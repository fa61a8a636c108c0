"""tokenmill's packed float32 linear (pack_linear_weight + packed_linear) against a float64 matmul: odd shapes,
padded panels, batch invariance, and the modules that use it."""
import pytest
import torch
import torch.nn.functional as F
from kernel_utils import rel_err

from tokenmill.engine.weights.quantization import DenseLinear, Int4Linear, quantize_int4
from tokenmill.kernels import cpu

if not cpu.load():
    pytest.skip("the C++ CPU ops did not build here (see the warning logged)", allow_module_level=True)

SHAPES = [(1, 1, 1), (1, 77, 64), (5, 16, 576), (7, 33, 1536), (13, 100, 37), (97, 48, 130), (200, 17, 64)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_packed_linear_matches_a_float64_matmul(m, n, k):
    w, x = torch.randn(n, k), torch.randn(m, k)
    y = torch.ops.tokenmill.packed_linear(x, torch.ops.tokenmill.pack_linear_weight(w), n)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    ref = x.double() @ w.double().T
    assert rel_err(y, ref) < 1e-6
    # about as accurate as torch's own float32 matmul (the mean error: the max of a few outputs is too noisy)
    assert (y.double() - ref).abs().mean() <= 2 * (F.linear(x, w).double() - ref).abs().mean() + 1e-7


def test_each_rows_result_is_the_same_alone_and_in_any_batch():
    w, x = torch.randn(300, 576), torch.randn(40, 576)
    packed = torch.ops.tokenmill.pack_linear_weight(w)
    batch = torch.ops.tokenmill.packed_linear(x, packed, 300)
    for i in (0, 5, 17, 39):
        assert torch.equal(torch.ops.tokenmill.packed_linear(x[i:i + 1], packed, 300)[0], batch[i])
    assert torch.equal(torch.ops.tokenmill.packed_linear(x[3:11], packed, 300), batch[3:11])


def test_packed_linear_refuses_a_weight_packed_for_other_shapes():
    packed = torch.ops.tokenmill.pack_linear_weight(torch.randn(40, 64))
    with pytest.raises(RuntimeError, match="pack_linear_weight"):
        torch.ops.tokenmill.packed_linear(torch.randn(2, 64), packed, 100)
    with pytest.raises(RuntimeError, match="pack_linear_weight"):
        torch.ops.tokenmill.packed_linear(torch.randn(2, 32), packed, 40)


def test_fake_kernels_give_the_shapes_of_the_real_ones():
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = torch.randn(40, 64)
    real = torch.ops.tokenmill.pack_linear_weight(w)
    with FakeTensorMode() as mode:
        fake = torch.ops.tokenmill.pack_linear_weight(mode.from_tensor(w))
        y = torch.ops.tokenmill.packed_linear(torch.empty(3, 64), fake, 40)
    assert fake.shape == real.shape and y.shape == (3, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_linear_module_adds_the_bias_and_keeps_the_shape_and_dtype(dtype):
    w, b = torch.randn(24, 64), torch.randn(24)
    x = torch.randn(2, 3, 64, dtype=dtype)
    y = DenseLinear(w, b)(x)
    assert y.shape == (2, 3, 24) and y.dtype == dtype
    assert rel_err(y, x.double() @ w.double().T + b.double()) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_a_large_step_of_a_quantized_linear_takes_the_packed_float32_copy():
    w = torch.randn(48, 128) * 0.05
    planes = quantize_int4(w)
    dense = planes.dequantize()
    linear = Int4Linear(planes, dense=dense, dense_min_rows=8, native=True)
    assert isinstance(linear.dense, DenseLinear)
    large = torch.randn(8, 128)
    assert torch.equal(linear(large), torch.ops.tokenmill.packed_linear(large, linear.dense.packed, 48))
