"""Our GGUF parser (toolchain/gguf_file.py) against gguf-py's GGUFReader: every metadata value and every tensor's
name, type, shape, offset and bytes, on both real files and on a synthetic one; malformed headers fail clearly."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from toolchain.gguf_file import GGUFFile, GGUFFormatError

from conftest import REAL, TINY, require_real


def _same_as_gguf_py(path):
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert list(ours.fields) == [k for k in ref.fields if not k.startswith("GGUF.")]  # gguf-py's header fields
    assert ours.version == ref.fields["GGUF.version"].contents()
    for key, f in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        assert ours.fields[key].contents() == f.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.tensor_type.name == b.tensor_type.name and a.tensor_type.value == int(b.tensor_type)
        assert a.shape == tuple(int(x) for x in b.shape), a.name
        assert (a.data_offset, a.n_bytes) == (b.data_offset, b.n_bytes), a.name
        assert np.array_equal(a.data, np.asarray(b.data).reshape(-1).view(np.uint8)), a.name


@pytest.mark.real_model
@pytest.mark.parametrize("key", REAL)
def test_real_files_match_gguf_py(key):
    _same_as_gguf_py(require_real(key))


def test_synthetic_file_matches_gguf_py(synth_gguf):
    _same_as_gguf_py(synth_gguf(**TINY))


def test_malformed_headers_fail_clearly(synth_gguf, tmp_path):
    good = open(synth_gguf(**TINY), "rb").read()
    cases = {"empty": b"", "magic": b"GGUX" + good[4:], "truncated": good[:200],
             "version": good[:4] + (9).to_bytes(4, "little") + good[8:]}
    for name, data in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(data)
        with pytest.raises(GGUFFormatError):
            GGUFFile(p)


def test_header_cache_is_only_an_accelerator(synth_gguf, tmp_path, monkeypatch):
    """A cached header gives what a fresh parse gives; a changed file, a corrupt or an unwritable cache means a
    fresh parse, never a wrong answer or an error."""
    import shutil

    monkeypatch.setenv("QTRT_GGUF_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "m.gguf"
    shutil.copy(synth_gguf(**TINY), src)

    def summary(f):
        return ([(k, v.contents()) for k, v in f.fields.items()],
                [(t.name, t.tensor_type.value, t.shape, t.data_offset, t.n_bytes, t.data.tobytes()) for t in f.tensors])

    fresh = summary(GGUFFile(src, cache=False))
    assert summary(GGUFFile(src)) == fresh  # writes the cache
    (entry,) = (tmp_path / "cache").iterdir()
    assert summary(GGUFFile(src)) == fresh  # reads it
    data = bytearray(src.read_bytes())  # the file changes (another vocabulary token): the entry is stale
    pos = data.index(b"<|im_end|>")
    data[pos + 2:pos + 4] = b"IM"
    src.write_bytes(bytes(data))
    assert summary(GGUFFile(src)) == summary(GGUFFile(src, cache=False)) != fresh
    entry.write_bytes(b"not marshal data")
    assert summary(GGUFFile(src)) == summary(GGUFFile(src, cache=False))
    monkeypatch.setenv("QTRT_GGUF_CACHE", "/proc/qtrt-no-such-dir")
    assert summary(GGUFFile(src)) == summary(GGUFFile(src, cache=False))


def test_tensor_data_is_every_tensor_in_one_region(synth_gguf):
    """GGUFModel.tensor_data(), what the cuda backend copies to the GPU in one call: one view of the file holding
    every tensor at its offset from the first (as gguf-py reads them), and nothing the tensors do not span."""
    from toolchain.gguf_model import load_gguf

    path = synth_gguf(**TINY)
    model, ref = load_gguf(path), gguf.GGUFReader(path)
    region = model.tensor_data()
    first = min(int(t.data_offset) for t in ref.tensors)
    assert region.nbytes == max(int(t.data_offset) + int(t.n_bytes) for t in ref.tensors) - first
    raw = np.fromfile(path, np.uint8)
    assert np.array_equal(region, raw[first:first + region.nbytes])
    for t in ref.tensors:
        off = int(t.data_offset) - first
        assert np.array_equal(region[off:off + int(t.n_bytes)], np.asarray(t.data).reshape(-1).view(np.uint8)), t.name
        assert model.tensors[t.name].data.ctypes.data - region.ctypes.data == off, t.name
