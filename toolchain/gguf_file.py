"""A fast, read-only GGUF parser: metadata as Python values, tensors as views of one memory map.

gguf-py's GGUFReader builds a numpy view per metadata element, which for Qwen2.5's 151,936 tokens and as many merges
takes ~10 s: most of a start-up's time before this module. Here the header is parsed with `struct` in one pass
(~0.2 s) and tensor data is never copied. The interface is the part of GGUFReader the project uses:

    f = GGUFFile(path)
    f.fields[key].contents()          str, int, float, bool, or a list of them (as gguf-py returns them)
    f.tensors                         [TensorInfo(name, tensor_type, shape, data_offset, n_bytes, data)], file order

It is checked against gguf-py's GGUFReader on both real files (tests/test_gguf_file.py). Any malformed or truncated
header raises GGUFFormatError with what was wrong and where.
"""
from __future__ import annotations

import enum
import mmap
import os
import struct
from dataclasses import dataclass, field

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml type id -> (name, block elements, block bytes): the ids of ggml.h; only these sizes are needed here.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 30: ("BF16", 1, 2),
}


class GGUFFormatError(ValueError):
    """The file is not a well-formed GGUF (bad magic, unknown value type, truncated header...)."""


class _ValueType(enum.IntEnum):
    UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)


_SCALAR = {_ValueType.UINT8: "<B", _ValueType.INT8: "<b", _ValueType.UINT16: "<H", _ValueType.INT16: "<h",
           _ValueType.UINT32: "<I", _ValueType.INT32: "<i", _ValueType.FLOAT32: "<f", _ValueType.BOOL: "<?",
           _ValueType.UINT64: "<Q", _ValueType.INT64: "<q", _ValueType.FLOAT64: "<d"}
_NUMPY = {_ValueType.UINT8: "<u1", _ValueType.INT8: "<i1", _ValueType.UINT16: "<u2", _ValueType.INT16: "<i2",
          _ValueType.UINT32: "<u4", _ValueType.INT32: "<i4", _ValueType.FLOAT32: "<f4", _ValueType.BOOL: "?",
          _ValueType.UINT64: "<u8", _ValueType.INT64: "<i8", _ValueType.FLOAT64: "<f8"}


@dataclass(frozen=True)
class Field:
    """One metadata entry; contents() as gguf-py's ReaderField.contents() returns it."""
    name: str
    value: object

    def contents(self):
        return self.value


class _TensorType:
    """What the project reads of gguf-py's GGMLQuantizationType: .name (and the id as .value)."""

    def __init__(self, value: int):
        self.value = value
        self.name = GGML_TYPES[value][0] if value in GGML_TYPES else f"type {value}"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    tensor_type: _TensorType
    shape: tuple[int, ...]  # as gguf-py's ReaderTensor.shape: ne0 (the contiguous dim) first
    data_offset: int  # absolute, from the start of the file
    n_bytes: int
    data: np.ndarray = field(repr=False)  # uint8 view of the mapping, n_bytes long (may be short if truncated)


class _Cursor:
    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise GGUFFormatError(f"header ends early at byte {self.pos} (needs {n} more bytes): truncated file")
        b = self.buf[self.pos:end]
        self.pos = end
        return b

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="surrogateescape")

    def value(self, vtype: int):
        try:
            vt = _ValueType(vtype)
        except ValueError:
            raise GGUFFormatError(f"unknown metadata value type {vtype} at byte {self.pos}") from None
        if vt == _ValueType.STRING:
            return self.string()
        if vt != _ValueType.ARRAY:
            return self.unpack(_SCALAR[vt])
        etype, count = self.unpack("<I"), self.unpack("<Q")
        if etype in _NUMPY.keys() and etype != _ValueType.ARRAY:
            dt = np.dtype(_NUMPY[_ValueType(etype)])
            return np.frombuffer(self.take(count * dt.itemsize), dt).tolist()
        if etype == _ValueType.STRING:
            return [self.string() for _ in range(count)]
        return [self.value(etype) for _ in range(count)]


class GGUFFile:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise GGUFFormatError("the file is empty")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        cur = _Cursor(self._map, self.path)  # mmap slices are bytes
        if cur.take(4) != GGUF_MAGIC:
            raise GGUFFormatError("no GGUF magic at the start of the file")
        self.version = cur.unpack("<I")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise GGUFFormatError(f"implausible header counts ({n_tensors} tensors, {n_kv} metadata keys)")
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.fields[key] = Field(key, cur.value(cur.unpack("<I")))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if n_dims > 8:
                raise GGUFFormatError(f"tensor {name} has {n_dims} dimensions")
            dims = tuple(cur.unpack("<Q") for _ in range(n_dims))
            infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
        align = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else DEFAULT_ALIGNMENT
        if align <= 0 or align & (align - 1):
            raise GGUFFormatError(f"general.alignment {align} is not a power of two")
        start = -(-cur.pos // align) * align
        whole = np.frombuffer(self._map, np.uint8)
        self.tensors: list[TensorInfo] = []
        for name, dims, ttype, offset in infos:
            n = int(np.prod(dims, dtype=np.int64)) if dims else 1
            elems, nbytes = GGML_TYPES.get(ttype, ("", 1, 0))[1:]
            n_bytes = n // elems * nbytes
            begin = start + offset
            self.tensors.append(TensorInfo(name, _TensorType(ttype), dims, begin, n_bytes,
                                           whole[begin:begin + n_bytes]))
