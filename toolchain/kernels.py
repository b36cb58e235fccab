"""Build and describe the CUDA kernels of plugins/ (one extern "C" kernel per op, docs/ops.md "Kernel ABI").

Shared by the cuda-python runtime (toolchain/cuda_runtime.py) and the TensorRT plugin layer:

    KERNEL_OPS                                  every op with a kernel
    source_file(op) -> Path                     plugins/<family>.cu holding the op's kernel
    kernel_name(op) -> str                      its extern "C" symbol
    defines_for(op, attrs) -> dict              ONNX attributes -> -D defines of a specialization
    compile_kernel(op, defines, fmt, arch)      nvcc -ptx / -cubin, cached under build/kernels/
    launch_config(op, dims, ops) -> LaunchConfig

launch_config computes grid dims and scalar arguments only with +, *, integer literals and ops.cdiv / ops.max /
ops.min, so the TensorRT layer can pass symbolic shape expressions (m is dynamic) instead of ints. Block sizes and
shared memory are constants (kernels use static shared memory only; the attention and argmax kernels carry a
compile-time cluster shape, so a plain cuLaunchKernel launches them).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import types
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import UserError

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "plugins"
CACHE = Path(os.environ.get("QTRT_KERNEL_CACHE", ROOT / "build" / "kernels"))

MATMUL_OPS = ("q4k_matmul", "q6k_matmul", "q5_0_matmul", "q8_0_matmul")
GATHER_OPS = ("q4k_gather", "q6k_gather", "q5_0_gather", "q8_0_gather")
_FAMILY = {
    **{op: "quant_matmul" for op in MATMUL_OPS},
    **{op: "quant_gather" for op in GATHER_OPS},
    "rms_norm": "rms_norm",
    "add": "elementwise",
    "swiglu": "elementwise",
    "argmax": "argmax",
    "rope_kv_attention": "rope_kv_attention",
    "decode_advance": "decode_advance",  # runtime-only: lets a captured CUDA graph advance tokens and positions
}
KERNEL_OPS: tuple[str, ...] = tuple(_FAMILY)

# Constants the .cu files are written for (each file states them in its header comment).
MATMUL_THREADS, MATMUL_WARPS, MATMUL_ROWS_PER_WARP, MATMUL_TOKENS_PER_BLOCK = 128, 4, 2, 4
MATMUL_MAX_BLOCKS = 528  # persistent grid: one wave of 4 blocks (128 registers x 128 threads) on 132 SMs
# (block elements, blocks per k-slice) of each matmul: plugins/quant_matmul.cu Fmt<>::SB
MATMUL_BLOCKING = {"q4k_matmul": (256, 9), "q6k_matmul": (256, 9), "q5_0_matmul": (32, 48), "q8_0_matmul": (32, 40)}
ATTN_SPLITS, ATTN_THREADS = 8, 256
ARGMAX_SPLITS, ARGMAX_THREADS = 8, 512


@dataclass(frozen=True)
class LaunchConfig:
    grid: tuple  # (gx, gy, gz): ints, or symbolic expressions built by `ops`
    block: tuple[int, int, int]
    shared_mem: int  # dynamic shared memory bytes (always 0: kernels use static shared memory)
    scalars: tuple  # the int32 scalar arguments, in kernel order (between the input and output pointers)


INT_OPS = types.SimpleNamespace(cdiv=lambda a, b: -(-a // b), max=max, min=min)


def _check_op(op: str) -> str:
    if op not in _FAMILY:
        raise UserError(f"no CUDA kernel for op {op!r}; kernels exist for: {', '.join(KERNEL_OPS)}")
    return op


def source_file(op: str) -> Path:
    return PLUGINS / f"{_FAMILY[_check_op(op)]}.cu"


def kernel_name(op: str) -> str:
    return _check_op(op)


def defines_for(op: str, attrs: dict) -> dict:
    """Compile-time defines of the op's specialization from its ONNX attributes (TensorRT does not serialize them)."""
    _check_op(op)
    if op == "rope_kv_attention":
        return {"N_HEADS": int(attrs["n_heads"]), "N_KV_HEADS": int(attrs["n_kv_heads"]),
                "HEAD_DIM": int(attrs["head_dim"]), "ROPE_THETA": float(attrs["rope_theta"])}
    if op == "rms_norm":
        return {"RMS_EPS": float(attrs.get("epsilon", 1e-6))}
    return {}


def _dim(dims: dict, *names):
    for n in names:
        if n in dims:
            return dims[n]
    raise KeyError(f"launch_config needs one of {names} in dims, got {sorted(dims)}")


def matmul_grid_x(op: str, n, k: int, ops=INT_OPS):
    """Blocks along n: a warp owns 2 rows; rows longer than one k-slice are split over the 4 warps of a block,
    else each warp has its own rows. Capped at one wave: the kernel's warps stride over the rest. k must be an int
    (it is the weight's static shape); n may be symbolic."""
    elems, sb = MATMUL_BLOCKING[op]
    groups_per_block = 1 if int(k) // elems > sb else MATMUL_WARPS  # same rule as the kernel's `wpg`
    return ops.min(ops.cdiv(ops.cdiv(n, MATMUL_ROWS_PER_WARP), groups_per_block), MATMUL_MAX_BLOCKS)


def launch_config(op: str, dims: dict, ops=INT_OPS) -> LaunchConfig:
    """Grid, block, shared memory and scalar arguments of one launch. `dims`: the node's int dims (m, n, k, hidden,
    vocab, numel, n_slots, max_seq) and attributes (n_heads, ...); any of them may be symbolic if `ops` is."""
    _check_op(op)
    m = dims.get("m")
    if op in MATMUL_OPS:
        n, k = _dim(dims, "n", "out_features"), _dim(dims, "k", "in_features")
        return LaunchConfig((matmul_grid_x(op, n, k, ops), ops.cdiv(m, MATMUL_TOKENS_PER_BLOCK), 1),
                            (MATMUL_THREADS, 1, 1), 0, (m, n, k))
    if op in GATHER_OPS:
        hidden = _dim(dims, "hidden")
        return LaunchConfig((ops.cdiv(hidden, 256), m, 1), (256, 1, 1), 0, (m, hidden))
    if op == "rms_norm":
        return LaunchConfig((m, 1, 1), (256, 1, 1), 0, (m, _dim(dims, "hidden")))
    if op in ("add", "swiglu"):
        numel = _dim(dims, "numel")
        return LaunchConfig((ops.cdiv(numel, 1024), 1, 1), (256, 1, 1), 0, (numel,))
    if op == "argmax":
        return LaunchConfig((ARGMAX_SPLITS, m, 1), (ARGMAX_THREADS, 1, 1), 0, (m, _dim(dims, "vocab")))
    if op == "rope_kv_attention":
        return LaunchConfig((ATTN_SPLITS, _dim(dims, "n_heads"), m), (ATTN_THREADS, 1, 1), 0,
                            (m, _dim(dims, "n_slots"), _dim(dims, "max_seq", "max_seq_len")))
    if op == "decode_advance":
        return LaunchConfig((ops.cdiv(m, 256), 1, 1), (256, 1, 1), 0, (m,))
    raise AssertionError(op)


# --------------------------------------------------------------------------------------------------------------
# compilation

def nvcc_path() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


@lru_cache(maxsize=None)
def _nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout.strip()


def _define_text(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)  # round-trips exactly; '1e-06' and '1000000.0' are valid C literals
    return str(value)


def compile_kernel(op: str, defines: dict | None = None, fmt: str = "ptx", arch: str = "sm_90") -> bytes:
    """PTX (fmt='ptx') or cubin (fmt='cubin') of the file holding `op`, for `arch`, with -D `defines`.

    Cached under build/kernels/ by a hash of the source, the plugin headers, the defines, fmt, arch and the nvcc
    version, so the 4 ops of one family share one compilation."""
    if fmt not in ("ptx", "cubin"):
        raise UserError(f"fmt must be 'ptx' or 'cubin', got {fmt!r}")
    src = source_file(op)
    nvcc = nvcc_path()
    if nvcc is None:
        raise UserError("nvcc not found (set NVCC or CUDA_HOME, or put it on PATH); it is needed to build the CUDA kernels")
    defs = {str(k): _define_text(v) for k, v in (defines or {}).items()}
    h = hashlib.sha256()
    h.update(src.read_bytes())
    for hdr in sorted(PLUGINS.glob("*.cuh")):
        h.update(hdr.name.encode() + b"\0" + hdr.read_bytes())
    h.update(repr(sorted(defs.items())).encode())
    h.update(f"{fmt}|{arch}|{_nvcc_version(nvcc)}".encode())
    key = f"{src.stem}-{h.hexdigest()[:20]}"
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"{key}.{fmt}"
    if out.exists():
        return out.read_bytes()
    log = CACHE / f"{key}.log"
    tmp = CACHE / f"{key}.{os.getpid()}.tmp"
    cmd = [nvcc, f"-{fmt}", f"-arch={arch}", "-O3", "-std=c++17", *(["--resource-usage"] if fmt == "cubin" else []),
           f"-I{PLUGINS}",
           *[f"-D{k}={v}" for k, v in sorted(defs.items())], str(src), "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log.write_text(" ".join(cmd) + "\n" + res.stdout + res.stderr)
    if res.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise UserError(f"nvcc failed to compile {src.name} for {op} (exit {res.returncode}); log: {log}")
    os.replace(tmp, out)  # atomic: concurrent builders never see a partial file
    return out.read_bytes()


# Attribute sets of the two real models: every specialization `make kernels` (and CI) compiles.
MODEL_ATTRS = (
    {"n_heads": 12, "n_kv_heads": 2, "head_dim": 128, "rope_theta": 1e6, "epsilon": 1e-6},  # 1.5B
    {"n_heads": 14, "n_kv_heads": 2, "head_dim": 64, "rope_theta": 1e6, "epsilon": 1e-6},  # 0.5B
)


def _main():
    """`make kernels` / `python -m toolchain.kernels`: compile every op (cubin for sm_90, and PTX) for both real
    models' specializations and print nvcc's resource usage (registers, spills, shared memory) per file."""
    import re
    import sys

    failed = 0
    for op in KERNEL_OPS:
        for attrs in MODEL_ATTRS:
            for fmt in ("cubin", "ptx"):
                try:
                    compile_kernel(op, defines_for(op, attrs), fmt=fmt)
                except UserError as e:
                    print(f"FAILED {op}: {e}", file=sys.stderr)
                    failed += 1
    for log in sorted(CACHE.glob("*.log")):
        usage = re.findall(r"Used \d+ registers[^\n]*", log.read_text())
        if usage:
            print(f"{log.stem}: " + "; ".join(sorted(set(usage))))
    print("all kernels compiled" if not failed else f"{failed} compilations failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(_main())
