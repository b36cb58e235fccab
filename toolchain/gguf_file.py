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
import hashlib
import marshal
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

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
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

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
        return self.take(n).decode("utf-8", errors="surrogateescape")

    def strings(self, count: int) -> list[str]:
        buf, pos, end, unpack = self.buf, self.pos, len(self.buf), struct.unpack_from
        out = []
        append = out.append
        for _ in range(count):
            if pos + 8 > end:
                break
            (n,) = unpack("<Q", buf, pos)
            if pos + 8 + n > end:
                break
            append(buf[pos + 8:pos + 8 + n].decode("utf-8", "surrogateescape"))
            pos += 8 + n
        if len(out) != count:
            raise GGUFFormatError(f"header ends early at byte {pos} inside an array of {count} strings: truncated file")
        self.pos = pos
        return out

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
        if etype in _NUMPY:
            dt = np.dtype(_NUMPY[_ValueType(etype)])
            return np.frombuffer(self.take(count * dt.itemsize), dt).tolist()
        if etype == _ValueType.STRING:  # the vocabulary and merges: 300k strings, so one tight loop
            return self.strings(count)
        return [self.value(etype) for _ in range(count)]


def _cache_dir() -> Path:
    """Where parsed headers are kept: $QTRT_GGUF_CACHE, else build/gguf in a checkout, else ~/.cache/qtrt/gguf."""
    if os.environ.get("QTRT_GGUF_CACHE"):
        return Path(os.environ["QTRT_GGUF_CACHE"])
    repo = Path(__file__).resolve().parents[1]
    return repo / "build" / "gguf" if (repo / "pyproject.toml").exists() else Path.home() / ".cache" / "qtrt" / "gguf"


_CACHE_FORMAT = 1


class GGUFFile:
    """A parsed GGUF. The parsed header (metadata and tensor table) is cached beside our other build products, keyed
    by the file's path, size and modification time: a second start reads it in ~30 ms instead of parsing the 300k
    vocabulary strings again (~0.3 s). The cache is only an accelerator: any problem with it means a fresh parse.
    (The key includes the inode, so a file replaced by a rename is parsed anew.)"""

    def __init__(self, path: str | os.PathLike, cache: bool = True):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size == 0:
                raise GGUFFormatError("the file is empty")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = st.st_size
        stamp = (os.path.abspath(self.path), st.st_size, st.st_mtime_ns, st.st_ino)
        cached = self._load_cache(stamp) if cache else None
        if cached is None:
            self.version, fields, infos, start = self._parse()
            if cache:
                self._save_cache(stamp, (self.version, fields, infos, start))
        else:
            self.version, fields, infos, start = cached
        self.fields: dict[str, Field] = {k: Field(k, v) for k, v in fields}
        whole = np.frombuffer(self._map, np.uint8)
        self.tensors: list[TensorInfo] = []
        for name, dims, ttype, offset in infos:
            n = int(np.prod(dims, dtype=np.int64)) if dims else 1
            elems, nbytes = GGML_TYPES.get(ttype, ("", 1, 0))[1:]
            n_bytes = n // elems * nbytes
            begin = start + offset
            self.tensors.append(TensorInfo(name, _TensorType(ttype), tuple(dims), begin, n_bytes,
                                           whole[begin:begin + n_bytes]))

    @staticmethod
    def _cache_file(stamp) -> Path:
        return _cache_dir() / (hashlib.sha256(stamp[0].encode()).hexdigest()[:24] + ".marshal")

    def _load_cache(self, stamp):
        try:
            data = marshal.loads(self._cache_file(stamp).read_bytes())
            if data[0] == _CACHE_FORMAT and tuple(data[1]) == stamp:
                return data[2]
        except Exception:  # noqa: BLE001 - absent, unreadable, foreign or corrupt: parse the file instead
            pass
        return None

    def _save_cache(self, stamp, parsed):
        try:
            out = self._cache_file(stamp)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
            tmp.write_bytes(marshal.dumps((_CACHE_FORMAT, stamp, parsed)))
            os.replace(tmp, out)  # atomic: a concurrent reader sees the old entry or the new one
        except (OSError, ValueError):  # a read-only home or checkout: no cache, same result
            pass

    def _parse(self):
        cur = _Cursor(self._map)  # mmap slices are bytes
        if cur.take(4) != GGUF_MAGIC:
            raise GGUFFormatError("no GGUF magic at the start of the file")
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise GGUFFormatError(f"implausible header counts ({n_tensors} tensors, {n_kv} metadata keys)")
        fields = []
        for _ in range(n_kv):
            key = cur.string()
            fields.append((key, cur.value(cur.unpack("<I"))))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if n_dims > 8:
                raise GGUFFormatError(f"tensor {name} has {n_dims} dimensions")
            dims = tuple(cur.unpack("<Q") for _ in range(n_dims))
            infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
        align = dict(fields).get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFFormatError(f"general.alignment {align} is not a power of two")
        return version, fields, infos, -(-cur.pos // align) * align
