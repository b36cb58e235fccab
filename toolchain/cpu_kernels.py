"""The `cpu` backend's quantized matmul: toolchain/cpu_kernels.c, built with the system C compiler on first use and
loaded with ctypes (like the CUDA kernels, cached by a hash of the source, the compiler and the CPU).

    available() -> bool               a C compiler built (or had built) the library
    matmul(x, tensor) -> y            y[m, n] = x[m, k] . W[n, k]^T with W the tensor's raw ggml blocks
    dequantize(tensor) -> W           float32 [n, k] (the numpy dequantizers' bits)

Few tokens (decode) run the fused kernel: each weight row is decoded in cache and dotted, so the weights stay in
their 1.1 GB file format instead of 6.2 GB of float32. Many tokens (a prompt) decode one matrix at a time into a
temporary and use BLAS, which is what makes prefill fast. Without a compiler, available() is False and the cpu backend
keeps the dense float32 weights (toolchain/reference.py).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("cpu_kernels.c")
TYPES = {"Q4_K": 0, "Q6_K": 1, "Q5_0": 2, "Q8_0": 3}
FUSED_MAX_TOKENS = 8  # above this many tokens a matmul dequantizes the matrix and calls BLAS (at most 16: MAXT)
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def _cache_dir() -> Path:
    from .kernels import CACHE

    return Path(os.environ.get("QTRT_CPU_KERNEL_CACHE", CACHE.parent / "cpu"))


def _cpu_id() -> str:
    """-march=native code runs on this CPU model only: its flags are part of the cache key."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


@lru_cache(maxsize=None)
def _library():
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc or os.environ.get("QTRT_CPU_KERNELS") == "0":
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()
                         + _cpu_id().encode()).hexdigest()[:20]
    cache = _cache_dir()
    lib = cache / f"cpu_kernels-{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"{lib.name}.{os.getpid()}.tmp"
        res = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
        if res.returncode != 0 or not tmp.exists():
            tmp.unlink(missing_ok=True)
            (cache / f"cpu_kernels-{key}.log").write_text(res.stdout + res.stderr)
            return None
        os.replace(tmp, lib)  # atomic: a concurrent build never loads a partial file
    # idle OpenMP threads sleep instead of spinning: they share the cores with numpy's BLAS threads between calls
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    so = ctypes.CDLL(str(lib))
    so.qt_dequant.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    so.qt_dequant.restype = None
    so.qt_matmul.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_long,
                             ctypes.c_int, ctypes.c_void_p]
    so.qt_matmul.restype = ctypes.c_int
    return so


def available() -> bool:
    return _library() is not None


def _raw(t) -> tuple[np.ndarray, int, int]:
    if t.ggml_type not in TYPES:
        raise ValueError(f"no CPU kernel for {t.ggml_type}")
    n, k = int(np.prod(t.shape[:-1])), int(t.shape[-1])
    raw = np.ascontiguousarray(t.data)
    return raw, n, k


def dequantize(t) -> np.ndarray:
    raw, n, k = _raw(t)
    out = np.empty((n, k), np.float32)
    _library().qt_dequant(raw.ctypes.data, n, k, TYPES[t.ggml_type], out.ctypes.data)
    return out


def matmul(x: np.ndarray, t) -> np.ndarray:
    """x [m, k] float32 times the tensor's rows: [m, n]."""
    raw, n, k = _raw(t)
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x of shape {x.shape} does not match {t.name} {t.shape}")
    if len(x) > FUSED_MAX_TOKENS:
        return x @ dequantize(t).T
    y = np.full((len(x), n), np.nan, np.float32)  # poisoned: a row the kernel missed cannot pass as a number
    if _library().qt_matmul(x.ctypes.data, len(x), k, raw.ctypes.data, n, TYPES[t.ggml_type], y.ctypes.data):
        raise MemoryError("cpu_kernels.qt_matmul: no memory for a row buffer")
    return y
