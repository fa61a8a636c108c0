"""Our GGUF header reader reads what gguf's own reader reads: every field and every tensor, of the default
model and of a file holding every value type and tensor type the engine loads; bad files are refused. Our
dequantization gives gguf's numpy results bit for bit."""
import gguf
import numpy as np
import pytest

from tokenmill.engine.config import default_model_path
from tokenmill.engine.weights.gguf_reader import GGUFReader, GGUFTensor, dequantize


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit patterns, but for NaN payloads (float16 NaN scales only arise from random bytes)."""
    nan = np.isnan(a)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(nan, np.isnan(b)) and \
        np.array_equal(a.view(np.uint32)[~nan], b.view(np.uint32)[~nan])


def assert_same(path: str) -> None:
    ours, theirs = GGUFReader(path), gguf.GGUFReader(path)
    assert list(ours.fields) == [k for k in theirs.fields if not k.startswith("GGUF.")]
    for key in ours.fields:
        assert ours.fields[key] == theirs.fields[key].contents(), key
    assert ours.data_offset == theirs.data_offset
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.tensor_type, a.shape) == (b.tensor_type, tuple(b.shape.tolist())), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data)
        assert not a.data.flags.writeable
        w = dequantize(a)
        assert w.flags.writeable and same_bits(w, gguf.quants.dequantize(b.data, b.tensor_type)), a.name


def test_the_default_model_reads_as_gguf_reads_it():
    assert_same(default_model_path())


def test_every_value_type_and_tensor_type(tmp_path):
    path = str(tmp_path / "all.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁ 世界")
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_array("t.strs", ["a", "", "ü"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.25])
    w.add_array("t.empty", [])
    w.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 32)).astype(np.float16))
    for kind in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1):
        w.add_tensor(kind.name, gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), kind),
                     raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same(path)
    assert GGUFReader(path).fields["t.strs"] == ["a", "", "ü"]


def test_a_file_that_is_not_gguf_or_of_another_version_is_refused(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(40))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFReader(str(bad))
    bad.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    with pytest.raises(ValueError, match="GGUF version 1"):
        GGUFReader(str(bad))


@pytest.mark.parametrize("kind", [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
                                  gguf.GGMLQuantizationType.Q8_0], ids=lambda kind: kind.name)
def test_dequantized_random_blocks_are_ggufs_bit_for_bit(kind):
    """Any bytes: subnormal, infinite and NaN scales, every nibble and int8 value."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = np.random.default_rng(int(kind)).integers(0, 256, (64, 8 * size), dtype=np.uint8)
    ours = dequantize(GGUFTensor("w", kind, (8 * block, 64), raw))
    assert ours.shape == (64, 8 * block)
    with np.errstate(invalid="ignore"):  # infinite scales times zero
        theirs = gguf.quants.dequantize(raw, kind)
    assert same_bits(ours, theirs)
