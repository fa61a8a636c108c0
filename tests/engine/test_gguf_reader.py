"""The reader over a plain array reads what gguf's own reader reads: every field and every tensor."""
import gguf
import numpy as np

from tokenmill.engine.config import default_model_path
from tokenmill.engine.weights.gguf_reader import GGUFReader


def test_fields_and_tensors_equal_ggufs_reader():
    ours, theirs = GGUFReader(default_model_path()), gguf.GGUFReader(default_model_path())
    assert type(ours.data) is np.ndarray and not ours.data.flags.writeable
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        assert ours.fields[name].types == field.types
        assert ours.fields[name].contents() == field.contents(), name
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.tensor_type, a.shape.tolist(), a.data_offset) == (b.tensor_type, b.shape.tolist(), b.data_offset)
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)
