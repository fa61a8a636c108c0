"""A GGUF file's metadata and tensor table, read with struct from a memory map, and its tensors dequantized.

gguf's own GGUFReader makes a numpy view per metadata item (twice per token of a vocabulary: about 250,000
views for SmolLM2), 2.8 s per file here, and every engine start, tensor-parallel worker, draft model and
memory estimate reads the file. This reads the same header in 0.08 s. Tensors are views into the mapping,
read only when used; the format's constants (quantization types and block sizes) are gguf's.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
VERSIONS = (2, 3)
_STRING, _ARRAY = 8, 9
# GGUF value type -> struct format (little-endian), for the scalar types.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
# Tensor types stored as plain numbers; every other type is blocks of bytes.
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
          GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF's order: the innermost (contiguous) dimension first
    data: np.ndarray  # PyTorch's order; quantized types: uint8 [..., bytes per row]


class GGUFReader:
    """fields: key -> value (str, int, float, bool, or a list of them); tensors in the file's order."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # tensors hold it open
        if self._buf[:4] != MAGIC:
            raise ValueError(f"{path} is not a GGUF file (magic {bytes(self._buf[:4])!r})")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", self._buf, 4)
        if version not in VERSIONS:  # a big-endian file reads as version 2 << 16 or 3 << 16
            raise ValueError(f"GGUF version {version} of {path} is not supported; supported: 2, 3 (little-endian)")
        self._offset = 24
        self.fields: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string()
            if key in self.fields:
                raise ValueError(f"GGUF key {key!r} appears twice in {path}")
            self.fields[key] = self._value(self._unpack("<I"))
        infos = [(self._string(), [self._unpack("<Q") for _ in range(self._unpack("<I"))],
                  GGMLQuantizationType(self._unpack("<I")), self._unpack("<Q")) for _ in range(tensor_count)]
        alignment = self.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"GGUF alignment {alignment} of {path} is not a power of two")
        self.data_offset = -(-self._offset // alignment) * alignment
        self.tensors = [self._tensor(*info) for info in infos]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError(f"a tensor name appears twice in {path}")

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._buf, self._offset)
        self._offset += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        # Lossless for a vocabulary that is not UTF-8: only the keys and values the loader asks for matter here.
        s = self._buf[self._offset:self._offset + n].decode("utf-8", errors="surrogateescape")
        self._offset += n
        return s

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, count = self._unpack("<I"), self._unpack("<Q")
        if item in _NUMPY:  # one read for the whole array
            values = np.frombuffer(self._buf, _NUMPY[item], count, self._offset)
            self._offset += values.nbytes
            return values.tolist()
        return [self._value(item) for _ in range(count)]

    def _tensor(self, name: str, dims: list[int], kind: GGMLQuantizationType, offset: int) -> GGUFTensor:
        shape = tuple(reversed(dims))
        start = self.data_offset + offset
        if kind in _PLAIN:
            data = np.frombuffer(self._buf, _PLAIN[kind], int(np.prod(shape)), start).reshape(shape)
        else:
            block, size = GGML_QUANT_SIZES[kind]
            if shape[-1] % block:
                raise ValueError(f"tensor {name}: rows of {shape[-1]} values do not fill {kind.name} blocks of {block}")
            shape = (*shape[:-1], shape[-1] // block * size)
            data = np.frombuffer(self._buf, np.uint8, int(np.prod(shape)), start).reshape(shape)
        return GGUFTensor(name, kind, tuple(dims), data)


def dequantize(t: GGUFTensor) -> np.ndarray:
    """The tensor as a writable float32 array in PyTorch's dimension order, bit for bit what gguf's numpy
    arithmetic (the one transformers uses) gives. Q4_0, Q4_1 and Q8_0 run as whole-tensor torch operations
    (gguf's numpy takes 2.9 s for SmolLM2's blocks here, 16 rows at a time); the same float32 products and
    sums, one rounding each, so the same bits. Other types are gguf's."""
    kind = t.tensor_type
    if kind not in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0):
        return np.array(gguf.quants.dequantize(t.data, kind), dtype=np.float32)
    block, size = GGML_QUANT_SIZES[kind]
    blocks = torch.from_numpy(np.array(t.data)).reshape(-1, size)  # a copy: torch wants writable memory
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    # One float32 buffer, changed in place (about 5 bytes per value at the peak, not 10); q * d and d * q
    # are the same product, and each step rounds once, as numpy's do.
    if kind == GGMLQuantizationType.Q8_0:
        values = blocks[:, 2:].contiguous().view(torch.int8).float().mul_(d)
    else:
        qs = blocks[:, 4 if kind == GGMLQuantizationType.Q4_1 else 2:]
        values = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()  # low nibbles are the block's first half
        if kind == GGMLQuantizationType.Q4_1:
            values.mul_(d).add_(blocks[:, 2:4].contiguous().view(torch.float16).float())
        else:
            values.sub_(8).mul_(d)
    return values.reshape(*t.data.shape[:-1], t.data.shape[-1] // size * block).numpy()
