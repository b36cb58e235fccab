"""Every CUDA kernel compiles with nvcc for sm_90 (PTX and cubin) with the real models' specializations, exports its
extern "C" symbol, and has a launch configuration that works with ints and with symbolic (dynamic-m) shapes.
CPU only: skipped with a reason when nvcc is absent."""
import os
import re
import shutil
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from toolchain import kernels as K
from toolchain.errors import UserError
from toolchain.sampling import PARAM_WORDS

ATTRS = {  # the two Qwen2.5 models: heads / kv heads / head dim / rope theta, and the RMSNorm epsilon
    "1.5B": dict(n_heads=12, n_kv_heads=2, head_dim=128, rope_theta=1e6, epsilon=1e-6),
    "0.5B": dict(n_heads=14, n_kv_heads=2, head_dim=64, rope_theta=1e6, epsilon=1e-6),
}
DIMS = dict(m=3, n=8960, k=1536, hidden=1536, vocab=151936, numel=3 * 8960, n_slots=4, max_seq=4096, n_heads=12,
            n_kv_heads=2, q_dim=1536, kv_dim=256, ffn=8960, w_type="Q4_K")

needs_nvcc = pytest.mark.skipif(K.nvcc_path() is None, reason="nvcc not found (needed to compile the CUDA kernels)")


# every specialization of both real models (kernels.specializations: attention per model; the matmuls per k-split;
# the fused ops per weight-type combination) and their batch-1 decode builds, each distinct define set once
def _cases():
    seen, out = set(), []
    for model in K.MODEL_ATTRS:
        builds = [(op, K.defines_for(op, attrs)) for op, attrs in K.specializations(model)]
        for op, d in builds + K.decode_specializations(model) + K.tensorrt_builds(model):
            key = (op, tuple(sorted(d.items())))
            if key not in seen:
                seen.add(key)
                out.append(pytest.param(op, d, id=f"{op}-{'-'.join(f'{k}={v}' for k, v in sorted(d.items()))}"))
    return out


CASES = _cases()


def test_specializations_cover_every_op():
    ops = {c.values[0] for c in CASES}
    assert ops == set(K.KERNEL_OPS), set(K.KERNEL_OPS) - ops
    names = {(c.values[0], c.values[1].get("W_TYPE"), c.values[1].get("V_TYPE")) for c in CASES}
    assert ("matmul_add", "Q6K", None) in names and ("rms_norm_qkv", None, "Q6K") in names  # 1.5B mixed layers
    assert ("rms_norm_qkv", None, "Q80") in names  # 0.5B
    decode = [c.values[1] for c in CASES if "QMV1" in c.values[1] or "QMV_M1" in c.values[1]]
    assert any(d.get("QMV1_KW", 1) > 1 for d in decode) and any(d.get("QMV_M1") for d in decode)  # down; 0.5B


@needs_nvcc
@pytest.mark.parametrize("fmt", ["ptx", "cubin"])
@pytest.mark.parametrize("op,defines", CASES)
def test_compiles(op, defines, fmt):
    image = K.compile_kernel(op, defines, fmt=fmt)
    assert image
    if fmt == "ptx":
        assert re.search(rb"\.entry\s+" + K.kernel_name(op).encode() + rb"\s*\(", image), op
    else:
        assert image.startswith(b"\x7fELF") and K.kernel_name(op).encode() in image


# what PTX may not hold for TensorRT's launcher (grid, block and shared memory only: issue 16, risk 1): a required or
# explicit cluster shape, cluster special registers, cluster barriers, or distributed shared memory
CLUSTER_PTX = re.compile(rb"\.reqnctapercluster|\.explicitcluster|\.maxclusterrank|%cluster|barrier\.cluster|"
                         rb"\bmapa\b|::cluster")


@needs_nvcc
@pytest.mark.parametrize("model", K.MODEL_ATTRS, ids=lambda m: m["model"])
def test_every_ptx_handed_to_tensorrt_needs_no_cluster(model):
    """The PTX of every plugin of the TensorRT export (toolchain/trt/plugins.py ptx_for) launches without a cluster;
    the same check finds the clusters of the cuda backend's own builds (so it can fail)."""
    from toolchain.trt import plugins

    ops = K.tensorrt_specializations(model)
    assert {op for op, _ in ops} >= {"rope_kv_attention_addr", "swiglu"} and len(ops) >= 5
    for op, attrs in ops:
        ptx = plugins.ptx_for(op, attrs)
        assert re.search(rb"\.entry\s+" + K.kernel_name(op).encode() + rb"\s*\(", ptx), op
        assert not CLUSTER_PTX.findall(ptx), (op, sorted(set(CLUSTER_PTX.findall(ptx))))
    attn = K.compile_kernel("rope_kv_attention", K.defines_for("rope_kv_attention", model), fmt="ptx")
    split = K.compile_kernel("q4k_matmul", {"KSPLIT": 3}, fmt="ptx")
    assert CLUSTER_PTX.findall(attn) and CLUSTER_PTX.findall(split)


@needs_nvcc
def test_compile_error_is_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(K, "CACHE", tmp_path)
    with pytest.raises(UserError, match="log:"):
        K.compile_kernel("rope_kv_attention", {})  # no head-count defines: #error


def test_source_files_exist():
    for op in K.KERNEL_OPS:
        assert K.source_file(op).is_file(), op
        assert K.kernel_name(op) in K.source_file(op).read_text()
    with pytest.raises(UserError):
        K.source_file("no_such_op")


def test_defines_for():
    d = K.defines_for("rope_kv_attention", ATTRS["1.5B"])
    assert d == {"N_HEADS": 12, "N_KV_HEADS": 2, "HEAD_DIM": 128, "ROPE_THETA": 1e6}
    assert K.defines_for("rms_norm", {"epsilon": 1e-5}) == {"RMS_EPS": 1e-5}
    assert K.defines_for("add", {}) == {}
    assert K.defines_for("q4k_matmul", {}) == {}  # generic build: any k, any grid
    assert K.defines_for("q6k_matmul", {"in_features": 1536, "out_features": 151936}) == {}
    assert K.defines_for("q4k_matmul", {"in_features": 8960, "out_features": 1536}) == {"KSPLIT": 3}
    assert K.defines_for("matmul_add", {"w_type": "Q6_K", "in_features": 8960, "out_features": 1536}) == \
        {"W_TYPE": "Q6K", "KSPLIT": 3}
    assert K.defines_for("matmul_add", {"w_type": b"Q5_0", "in_features": 896, "out_features": 896}) == \
        {"W_TYPE": "Q50"}
    assert K.defines_for("rms_norm_qkv", dict(epsilon=1e-6, q_type="Q4_K", k_type="Q4_K", v_type="Q6_K", q_dim=1536,
                                              kv_dim=256)) == \
        {"RMS_EPS": 1e-6, "Q_TYPE": "Q4K", "K_TYPE": "Q4K", "V_TYPE": "Q6K"}
    assert K.defines_for("rms_norm_swiglu", dict(epsilon=1e-6, gate_type="Q5_0", up_type="Q8_0", ffn=4864)) == \
        {"RMS_EPS": 1e-6, "GATE_TYPE": "Q50", "UP_TYPE": "Q80"}
    with pytest.raises(UserError):
        K.defines_for("matmul_add", {"w_type": "F16"})


class Sym:
    """A symbolic int: supports only what TensorRT shape expressions support (+, * and the ops below)."""

    def __init__(self, fn, text):
        self.fn, self.text = fn, text

    def eval(self, env):
        return self.fn(env)

    def __add__(self, o):
        return Sym(lambda e: self.eval(e) + ev(o, e), f"({self.text}+{txt(o)})")

    def __mul__(self, o):
        return Sym(lambda e: self.eval(e) * ev(o, e), f"({self.text}*{txt(o)})")

    __radd__ = __add__
    __rmul__ = __mul__


def ev(x, env):
    return x.eval(env) if isinstance(x, Sym) else x


def txt(x):
    return x.text if isinstance(x, Sym) else str(x)


SYM_OPS = types.SimpleNamespace(
    cdiv=lambda a, b: Sym(lambda e: -(-ev(a, e) // ev(b, e)), f"cdiv({txt(a)},{txt(b)})"),
    max=lambda a, b: Sym(lambda e: max(ev(a, e), ev(b, e)), f"max({txt(a)},{txt(b)})"),
    min=lambda a, b: Sym(lambda e: min(ev(a, e), ev(b, e)), f"min({txt(a)},{txt(b)})"),
)


@pytest.mark.parametrize("op", K.KERNEL_OPS)
def test_launch_config_ints_and_symbolic(op):
    cfg = K.launch_config(op, DIMS)
    assert all(isinstance(g, int) and g >= 1 for g in cfg.grid), cfg
    assert all(isinstance(b, int) for b in cfg.block) and cfg.block[0] * cfg.block[1] * cfg.block[2] <= 1024
    assert all(isinstance(s, int) for s in cfg.scalars)

    m = Sym(lambda e: e["m"], "m")
    sdims = dict(DIMS, m=m, numel=m * DIMS["hidden"] if op in ("add", "swiglu") else DIMS["numel"])
    scfg = K.launch_config(op, sdims, ops=SYM_OPS)  # fails if it uses //, int(), comparisons or max() on m
    assert scfg.block == cfg.block and scfg.shared_mem == cfg.shared_mem
    for mv in (1, 3, 17, 64, 1000):
        idims = dict(DIMS, m=mv, numel=mv * DIMS["hidden"] if op in ("add", "swiglu") else DIMS["numel"])
        icfg = K.launch_config(op, idims)
        env = {"m": mv}
        assert tuple(ev(g, env) for g in scfg.grid) == icfg.grid
        assert tuple(ev(s, env) for s in scfg.scalars) == icfg.scalars


def cdiv(a, b):
    return -(-a // b)


def test_launch_config_covers_work():
    cfg = K.launch_config("q4k_matmul", dict(m=17, n=1537, k=1536))
    c = K.matmul_split(1537, 1536, "Q4_K")
    assert c == 3 and cfg.grid == (cdiv(cdiv(1537, 2), K.QMV_WARPS) * c, 5, 1)
    assert cfg.grid[1] * K.MATMUL_TOKENS_PER_BLOCK >= 17 and cfg.block == (K.QMV_THREADS, 1, 1)
    # ffn_down: 768 row pairs x a 3-way cluster split of k fill the GPU in one wave
    assert K.launch_config("q4k_matmul", dict(m=1, n=1536, k=8960)).grid == (384, 1, 1)
    # lm_head: 18 rounds of one resident wave
    assert K.launch_config("q6k_matmul", dict(m=1, n=151936, k=1536)).grid == (K.MATMUL_MAX_BLOCKS, 1, 1)
    for units, per, cl in ((75968, 6, 1), (4480, 3, 1), (768, 6, 3), (19, 6, 3), (1, 3, 1), (4480, 4, 2)):
        g = K.qmv_grid_x(units, per, cl)
        assert g % cl == 0 and g <= max(K.MATMUL_MAX_BLOCKS, cl)
        rounds = cdiv(cdiv(units, per), g // cl)
        assert rounds * (g // cl) * per >= units and (rounds - 1) * (g // cl) * per < units
    cfg = K.launch_config("rms_norm_qkv", dict(m=1, hidden=1536, q_dim=1536, kv_dim=256))
    assert cfg.grid == (cdiv(1024, K.QMV_WARPS), 1, 1) and cfg.scalars == (1, 1536, 1536, 256)
    cfg = K.launch_config("rms_norm_swiglu", dict(m=3, hidden=1536, ffn=8960))
    assert cfg.grid == (K.qmv_grid_x(4480, K.QMV_WARPS // 2), 1, 1) and cfg.scalars == (3, 1536, 8960)
    cfg = K.launch_config("matmul_add", dict(m=2, n=1536, k=8960, w_type="Q6_K"))
    assert cfg.grid == (384, 1, 1) and cfg.scalars == (2, 1536, 8960)
    cfg = K.launch_config("rope_kv_attention", dict(m=5, n_heads=14, n_slots=2, max_seq=128))
    assert cfg.grid == (K.ATTN_SPLITS, 14, 5) and cfg.scalars == (5, 2, 128)


def test_batched_decode_launch():
    """Batched decode builds (QMV1_MT): m rounded up to a power of two, at most 8 tokens per block, grid.y blocks of
    tokens, dynamic shared memory (qmv1_smem_bytes) only there."""
    assert [K.decode_tokens(m) for m in (1, 2, 3, 4, 5, 8, 9, 31)] == [1, 2, 4, 4, 8, 8, 8, 8]
    attrs = dict(in_features=8960, out_features=1536, w_type="Q4_K")
    one = K.decode_build("matmul_add", attrs, 8960)
    for m in (2, 3, 8, 17):
        d = K.decode_build("matmul_add", attrs, 8960, mt=K.decode_tokens(m))
        assert d["QMV1_MT"] == K.decode_tokens(m) and {k: v for k, v in d.items() if k != "QMV1_MT"} == one
        cfg = K.launch_config("matmul_add", dict(attrs, m=m, n=1536, k=8960, **K.qmv1_dims(d)))
        c1 = K.launch_config("matmul_add", dict(attrs, m=1, n=1536, k=8960, **K.qmv1_dims(one)))
        assert cfg.grid == (c1.grid[0], cdiv(m, d["QMV1_MT"]), 1) and cfg.block == c1.block
        assert cfg.shared_mem == K.qmv1_smem_bytes(d["QMV1_KW"], d["QMV1_NBW"], d["QMV1_G"], d["QMV1_MT"]) > 0
    assert c1.shared_mem == 0 and "QMV1_MT" not in one
    # no decode core (Q5_0): the general core, without the batch-1 body for m > 1
    q5 = dict(in_features=896, out_features=896, w_type="Q5_0")
    assert "QMV_M1" in K.decode_build("matmul_add", q5, 896) and "QMV_M1" not in K.decode_build("matmul_add", q5, 896,
                                                                                                  mt=4)


def test_skinny_gemm_launch():
    """The GEMMs for few tokens (plugins/quant_gemm_skinny.cu): the grid covers the rows and m, grid z is the
    compile-time cluster size of the build (SK_SPLIT, at most 8 and at most the superblocks of k), the .cu's defaults
    are kernels.SKINNY_* (the dynamic shared memory and block launch_config gives: the kernel traps if launched with
    less shared memory), the scalars are the ABI's of the op each one replaces."""
    src = (K.PLUGINS / "quant_gemm_skinny.cu").read_text()
    for define, default in (("SK_STAGES", K.SKINNY_STAGES), ("SK_XF16", K.SKINNY_XF16), ("SK_WARPS", K.SKINNY_WARPS),
                            ("SK_WARPRING", K.SKINNY_WARPRING), ("SK_XSB", K.SKINNY_XSB)):
        assert int(re.search(rf"#define {define} (\d+)", src).group(1)) == default, define
    # the split rule's stated property at the 1.5B's shapes: the smallest S of least waves x (superblocks per CTA +
    # SKINNY_CTA_COST), with the SM count of the H100 / H200 (132) and two CTAs per SM (two of the build's shared
    # memory fit 228 KB, three do not), S <= 8 and S <= k's superblocks
    assert K.SKINNY_CTAS_PER_SM == 2 and 2 * (K.SKINNY_SMEM + 1024) <= 228 * 1024 < 3 * (K.SKINNY_SMEM + 1024)
    for tiles, k in ((12, 1536), (2, 1536), (70, 1536), (140, 1536), (12, 8960), (1187, 1536), (3, 2048)):
        nb = k // 256
        cost = {s: -(-tiles * s // 264) * (-(-nb // s) + K.SKINNY_CTA_COST) for s in range(1, min(8, nb) + 1)}
        best = min(cost.values())
        assert K.skinny_split(tiles, k) == min(s for s, c in cost.items() if c == best), (tiles, k)
    cases = [(op, dict(m=m, n=n, k=k), n, k) for op in ("q4k_gemm_skinny", "q6k_gemm_skinny", "matmul_add_skinny")
             for n, k, m in ((1536, 8960, 16), (37, 512, 5), (200, 256, 17), (151936, 1536, 31))]
    cases += [("rms_norm_qkv_skinny", dict(m=m, hidden=h, q_dim=q, kv_dim=kv), q + 2 * kv, h)
              for h, q, kv, m in ((1536, 1536, 256, 4), (512, 70, 18, 3), (2048, 128, 32, 31))]
    cases += [("rms_norm_swiglu_skinny", dict(m=m, hidden=h, ffn=f), f, h) for h, f, m in ((1536, 8960, 16),
                                                                                          (512, 70, 3))]
    for op, dims, rows, k in cases:
        attrs = dict(dims, in_features=dims.get("k"), out_features=dims.get("n"), w_type="Q4_K", q_type="Q4_K",
                     k_type="Q4_K", v_type="Q6_K", gate_type="Q4_K", up_type="Q6_K", epsilon=1e-6)
        cfg, d = K.launch_config(op, dims), K.defines_for(op, attrs)
        assert cfg.grid[2] == d.get("SK_SPLIT", 1) <= min(K.SKINNY_MAX_SPLIT, k // 256), (op, dims, d)
        assert K.launch_config(op, dims | K.skinny_dims(d)) == cfg  # the build's own defines give the same launch
        # a tuning's cluster size (decode_tuning's skinny_swiglu_s*): grid z follows the build, not the rule
        forced = 1 + d.get("SK_SPLIT", 1) % min(K.SKINNY_MAX_SPLIT, k // 256)
        assert K.launch_config(op, dims | K.skinny_dims(d | {"SK_SPLIT": forced})).grid[2] == forced
        per_tile = K.SKINNY_ROWS // 2 if op == "rms_norm_swiglu_skinny" else K.SKINNY_ROWS
        assert cfg.grid[0] * per_tile >= rows and cfg.grid[1] * K.SKINNY_TOKENS >= dims["m"]
        assert cfg.block == (K.SKINNY_THREADS, 1, 1) and cfg.shared_mem == K.SKINNY_SMEM
        assert cfg.scalars == {"rms_norm_qkv_skinny": (dims["m"], k, dims.get("q_dim"), dims.get("kv_dim")),
                               "rms_norm_swiglu_skinny": (dims["m"], k, dims.get("ffn"))}.get(op, (dims["m"], rows, k))


@needs_nvcc
def test_skinny_shared_memory_is_the_kernels(tmp_path):
    """kernels.skinny_smem_bytes is plugins/quant_gemm_skinny.cu's SMEM_BYTES for its stage counts, SK_XF16,
    SK_WARPRING and SK_XSB, and launch_config's block is its THREADS for SK_WARPS: a host program compiled with the
    same defines prints them (the kernel traps if launched with less shared memory)."""
    src = tmp_path / "smem.cu"
    src.write_text('#include <cstdio>\n#include "quant_gemm_skinny.cu"\n'
                   'int main() { printf("%d %d", SMEM_BYTES, THREADS); }\n')

    def size_of(variant):
        stages, xf16, warps, ring, xsb = variant
        exe = tmp_path / f"smem{stages}{xf16}{warps}{ring}{xsb}"
        subprocess.run([K.nvcc_path(), "-std=c++17", "-arch=sm_90", f"-I{K.PLUGINS}", f"-DSK_STAGES={stages}",
                        f"-DSK_XF16={xf16}", f"-DSK_WARPS={warps}", f"-DSK_WARPRING={ring}", f"-DSK_XSB={xsb}",
                        str(src), "-o", str(exe)], check=True, capture_output=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
        return variant, tuple(int(v) for v in out.split())

    variants = [(2, 0, 8, 0, 4), (3, 0, 8, 0, 4), (4, 0, 8, 0, 4), (2, 1, 8, 0, 4), (4, 1, 8, 0, 4), (4, 1, 16, 0, 4),
                (2, 1, 8, 1, 4), (2, 1, 8, 1, 3), (3, 1, 8, 1, 4), (4, 1, 8, 1, 6)]  # the last 4: SK_WARPRING builds
    with ThreadPoolExecutor(2) as pool:
        for (stages, xf16, warps, ring, xsb), (size, threads) in pool.map(size_of, variants):
            defines = {"SK_STAGES": stages, "SK_XF16": xf16, "SK_WARPS": warps, "SK_WARPRING": ring, "SK_XSB": xsb}
            cfg = K.launch_config("q4k_gemm_skinny", dict(m=5, n=256, k=512, **K.skinny_dims(defines)))
            assert size == K.skinny_smem_bytes(stages, xf16, ring, xsb) == cfg.shared_mem, defines
            assert cfg.block == (threads, 1, 1), defines


@needs_nvcc
def test_batched_decode_shared_memory_is_the_kernels(tmp_path):
    """qmv1_smem_bytes is plugins/qmv1.cuh's sizeof(Smem) for every batched build of both real models: a host program
    compiled with the build's defines prints it (the kernel traps if launched with less)."""
    shape = ("QMV1_KW", "QMV1_NBW", "QMV1_G", "QMV1_MT")  # all the size depends on: one program per distinct shape
    builds = {tuple(d[k] for k in shape): (op, d)
              for model in K.MODEL_ATTRS for op, d in K.decode_specializations(model) if "QMV1_MT" in d}
    assert builds and {d["QMV1_MT"] for _, d in builds.values()} == {2, 4, 8}
    src = tmp_path / "smem.cu"
    src.write_text('#include <cstdio>\n#include "qmv1.cuh"\nint main() { printf("%zu", sizeof(qmv1::Smem)); }\n')
    def size_of(i_build):
        i, (op, d) = i_build
        exe = tmp_path / f"smem{i}"
        defs = [f"-D{k}={v}" for k, v in K._defines_text(d).items()]
        subprocess.run([K.nvcc_path(), "-std=c++17", f"-I{K.PLUGINS}", *defs, str(src), "-o", str(exe)], check=True,
                       capture_output=True)
        return op, d, int(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)

    with ThreadPoolExecutor(4) as pool:
        for op, d, size in pool.map(size_of, enumerate(builds.values())):
            assert size == K.qmv1_smem_bytes(d["QMV1_KW"], d["QMV1_NBW"], d["QMV1_G"], d["QMV1_MT"]), (op, d)


def _cuobjdump():
    """cuobjdump next to nvdisasm (which it runs), from PATH or from the nvidia-cuda-* wheels (dev extra), or None."""
    dirs = [Path(p).parent for p in (shutil.which("cuobjdump"),) if p]
    dirs += [c.parent for base in map(Path, sys.path) for c in base.glob("nvidia/cu*/bin/cuobjdump")]
    return next((str(d / "cuobjdump") for d in dirs if (d / "nvdisasm").is_file()), None)


def _sass_instructions(op, defines, prebuilt=True):
    """The SASS instructions (opcode and operands, in code order) of kernel `op` built with `defines`."""
    tool = _cuobjdump()
    path = K.CACHE / f"sass-check-{K.kernel_name(op)}-{os.getpid()}.cubin"
    path.write_bytes(K.compile_kernel(op, defines, fmt="cubin", prebuilt=prebuilt))
    env = dict(os.environ, PATH=f"{Path(tool).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        sass = subprocess.run([tool, "-sass", "-fun", K.kernel_name(op), str(path)], capture_output=True, text=True,
                              check=True, env=env).stdout
    finally:
        path.unlink()
    return [line.split("*/", 1)[1].split(";")[0].strip() for line in sass.splitlines()
            if re.match(r"\s+/\*[0-9a-f]+\*/", line)]


WEIGHT_OPS = set(K.MATMUL_OPS + K.FUSED_OPS + K.GATHER_OPS + K.SKINNY_OPS + K.GEMM_OPS + K.GEMM_SWIGLU_OPS)


@needs_nvcc
@pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
@pytest.mark.parametrize("op,defines", CASES)
def test_nothing_but_weights_before_griddepcontrol_wait(op, defines):
    """Every kernel may be a programmatic dependent launch (plugins/pdl.cuh): in the SASS, before the wait (ACQBULK)
    a kernel may only start copying weights: the general core's cp.async (LDGSTS), the decode core's weight loads
    (marked .L2::128B, SASS LTC128B); kernels without weights load nothing there. (ptxas once moved __ldg loads of x
    above the wait, where they read x before its producer had written it.) rope_kv_attention's one-token path has a
    second wait after its position and first K/V loads (data of earlier steps, plugins/pdl.cuh); the first wait in
    the code is the other path's. The xmerge o projection reads the step's position there too (one 32-bit load).
    The sampler's kernels read the host's inputs there (rows, slots, a slot's parameter words: written before the
    step's first kernel and by no kernel), plain 32-bit loads, at most 2 + PARAM_WORDS of them. The by-address
    attention (TensorRT's) reads its two cache addresses there, also the host's input (two 64-bit loads). The
    prefill GEMMs' wgmma builds issue their first weight copies (cp.async) before the wait; their x copies are cp.async
    too, alike in SASS, so for them every wait in the code (one per path: no superblocks, or some) is checked: before
    it nothing but cp.async, no plain load at all."""
    ins = _sass_instructions(op, defines)
    waits = [i for i, x in enumerate(ins) if x.startswith("ACQBULK")]
    assert waits, f"{op}: no griddepcontrol.wait"
    before = [x for x in ins[:waits[0]] if re.search(r"\b(LDG|LDGSTS|LD)\.", x)]  # global loads and cp.async
    if op in ("sample_tokens", "token_logprobs"):
        assert len(before) <= 2 + PARAM_WORDS and all(re.match(r"LDG\.E R", x) for x in before), before
        before = []
    if op == "rope_kv_attention_addr":  # the two cache addresses: the host's input, like the position
        addr = [x for x in before if re.match(r"LDG\.E\.64(\.CONSTANT)? R", x)]
        assert len(addr) <= 2, addr
        before = [x for x in before if x not in addr]
    if op not in WEIGHT_OPS or op.endswith("_gather"):
        assert not before, f"{op}: loads before the wait: {before}"
    if defines.get("QMV1_XMERGE"):  # the o projection of the xmerge pair reads the step's position (qmv1.cuh)
        position = [x for x in before if not ("LDGSTS" in x or "LTC128B" in x)]
        assert len(position) == 1 and re.match(r"LDG\.E(\.STRONG\.\w+)? R", position[0]), position
        before.remove(position[0])
    for x in before:
        assert "LDGSTS" in x or "LTC128B" in x, f"{op} {defines}: a load of something else than weights: {x}"
    if op in K.GEMM_OPS + K.GEMM_SWIGLU_OPS:
        for w in waits:
            loads = [x for x in ins[:w] if re.search(r"\b(LDG|LD)\.", x)]
            assert not loads, f"{op} {defines}: loads before a wait: {loads}"
    # and no kernel writes global memory before the wait: a kernel's writes then follow every earlier kernel's
    # reads, which lets activations share bytes (the cuda backend's share_activations, toolchain/buffer_plan.py)
    writes = [x for x in ins[:waits[0]] if re.search(r"\b(STG|ST|RED|ATOM|ATOMG)\.", x)]
    assert not writes, f"{op} {defines}: global writes before the wait: {writes}"


@needs_nvcc
@pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
def test_half2_scales_reach_the_few_token_gemms():
    """QMMA_SCALES_H2 is on in the few-token GEMMs' default build and reaches the compiler: the Q4_K GEMM's SASS
    differs from the build with it off, and has more half2 multiplies (the scales' HMUL2 beside the Q6_K
    dequantization's). (Its GPU test compares the two builds' answers bit for bit; this one fails if they are the
    same build.)"""
    on, off = (_sass_instructions("q4k_gemm_skinny", d, prebuilt=False) for d in ({}, {"QMMA_SCALES_H2": 0}))
    assert on != off
    assert sum("HMUL2" in x for x in on) > sum("HMUL2" in x for x in off)


@needs_nvcc
@pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
@pytest.mark.parametrize("op,defines", [c for c in CASES if c.values[0] in K.SKINNY_OPS])
def test_cta_ring_builds_load_nothing_but_weights_before_the_wait(op, defines):
    """The CTA-ring builds (SK_WARPRING=0, decode_tuning's skinny_cta_ring: one ring of x and weight stages for the
    CTA) keep the same rule: x, the norm weight and the residual only after the wait."""
    test_nothing_but_weights_before_griddepcontrol_wait(op, {**defines, "SK_WARPRING": 0})


def test_attention_kv_grid_launch():
    """ATTN_KVGRID (one cluster per (token, kv head), or without clusters one block: the cuda backend's tunings
    attn_kv_grid and attn_one_block_keys): kernels.ATTN_MSCR and ATTN_CLUSTER_KEYS are the .cu's, the launch puts the
    kv heads on grid y (and, without clusters, one block on grid x), the build refuses xmerge (a static_assert), and
    both builds are among the real-model builds."""
    src = (K.PLUGINS / "rope_kv_attention.cu").read_text()
    assert int(re.search(r"constexpr int MSCR = (\d+);", src).group(1)) == K.ATTN_MSCR
    dims = dict(m=K.ATTN_MSCR + 1, n_heads=12, n_kv_heads=2, n_slots=4, max_seq=4096)
    assert K.launch_config("rope_kv_attention", dims).grid == (K.ATTN_SPLITS, 12, K.ATTN_MSCR + 1)
    assert K.launch_config("rope_kv_attention", dims | {"attn_kv_grid": 1}).grid == (K.ATTN_SPLITS, 2,
                                                                                      K.ATTN_MSCR + 1)
    # without clusters: one block per (token, kv head) (a grid x of 8 would run each 8 times over)
    assert K.launch_config("rope_kv_attention", dims | {"attn_kv_grid": 1}, clusters=False).grid == (
        1, 2, K.ATTN_MSCR + 1)
    assert "static_assert(!ATTN_KVGRID || !ATTN_XMERGE" in src
    # the cuda backend's short-context rule counts the cluster build's keys per cluster
    assert int(re.search(r"#if ATTN_CLUSTER\n#define ATTN_CLUSTER_KEYS (\d+)", src).group(1)) == K.ATTN_CLUSTER_KEYS
    # the backend uses them by default: the builds (with and without clusters) are among those `make kernels`
    # compiles and prebuilt ships
    for model in K.MODEL_ATTRS:
        for clusters in (True, False):
            kv = K.defines_for("rope_kv_attention", model, clusters=clusters) | {"ATTN_KVGRID": 1}
            assert ("rope_kv_attention", kv) in K.real_model_builds(), model["model"]
        narrow = K.defines_for("rope_kv_attention", model) | {"ATTN_KVGRID": 1, "ATTN_GX": 4}  # (attn_narrow)
        assert ("rope_kv_attention", narrow) in K.real_model_builds(), model["model"]
    # ... and its clusters of 4 (ATTN_GX=4, tuning attn_narrow) on grid x; the .cu refuses them elsewhere
    assert K.launch_config("rope_kv_attention", dims | {"attn_kv_grid": 1, "attn_gx": 4}).grid == (
        4, 2, K.ATTN_MSCR + 1)
    assert "static_assert(GX == 8 || (GX == 4 && ATTN_KVGRID && ATTN_CLUSTER)" in src


def test_resident_blocks():
    """kernels.resident_blocks (no GPU), which decides where the batched attention takes clusters of 4 (cuda backend
    _narrow_attention): the 1.5B attention build's ~210 registers x 256 threads fit one block per SM (two waves for
    16 tokens x 2 kv heads x 8 blocks on 132 SMs), the 0.5B's 128 two; threads and shared memory limit it too."""
    assert K.resident_blocks(206, 256, 132) == 132 and K.resident_blocks(212, 256, 132, 46664) == 132
    assert K.resident_blocks(128, 256, 132, 28280) == 264 and K.resident_blocks(129, 256, 1) == 1
    assert K.resident_blocks(32, 1024, 10) == 20 and K.resident_blocks(16, 128, 1) == 16
    assert K.resident_blocks(32, 128, 2, 100 * 1024) == 4


def test_long_context_plans():
    """Which plan a step takes by its furthest row (CudaBackend.long_context): with attn_kv_grid, steps of up to
    ATTN_MSCR tokens within one cluster's keys launch one cluster per (token, kv head) and beyond them the full grid;
    one-token steps beyond the xmerge pair's keys take the pair; steps of more tokens within attn_one_block_keys one
    block per (token, kv head), beyond them one cluster; without the tunings (or without clusters, the TensorRT
    builds) one plan everywhere."""
    from toolchain.cuda_backend import TENSORRT_BUILDS, TUNING, CudaBackend

    be = object.__new__(CudaBackend)  # long_context reads only the tuning
    be.tuning = dict(TUNING, attn_kv_grid=True, xmerge=True)
    keys, xkeys = K.ATTN_CLUSTER_KEYS, K.XMERGE_CLUSTER_KEYS
    assert xkeys < keys
    for m in (1, 2, K.ATTN_MSCR):
        edge = xkeys if m == 1 else keys  # the xmerge pair's clusters are shorter
        assert not be.long_context(edge - 1, m) and be.long_context(edge, m), m
    ob = be.tuning["attn_one_block_keys"]
    assert ob == K.ATTN_ONE_BLOCK_KEYS > 0
    for m in (K.ATTN_MSCR + 1, 32):
        assert not be.long_context(ob - 1, m) and be.long_context(ob, m), m
    be.tuning = dict(TUNING, attn_one_block_keys=0)
    assert not any(be.long_context(p, K.ATTN_MSCR + 1) for p in (0, keys, 10 * keys))
    be.tuning = dict(TUNING, attn_kv_grid=True, xmerge=False)
    assert not be.long_context(keys - 1, 1) and be.long_context(keys, 1)
    be.tuning = dict(TUNING, attn_kv_grid=True, xmerge=True, defines={"rope_kv_attention": {"ATTN_CLUSTER_KEYS": 512}})
    assert not be.long_context(511, 1) and be.long_context(512, 1) and be.long_context(512, 4)
    be.tuning = dict(TUNING, attn_kv_grid=False, xmerge=False, attn_one_block_keys=0)
    assert not any(be.long_context(p, m) for p in (0, keys, 10 * keys) for m in (1, 4, 32))
    be.tuning = dict(TUNING, **TENSORRT_BUILDS, attn_kv_grid=True)
    assert not any(be.long_context(p, m) for p in (0, keys, 10 * keys) for m in (1, 4, 32))


@needs_nvcc
def test_attention_kv_grid_builds(tmp_path, monkeypatch):
    monkeypatch.setattr(K, "CACHE", tmp_path)  # compile here, not from the prebuilt or shared cache
    a = dict(n_heads=12, n_kv_heads=2, head_dim=128, rope_theta=1e6)
    base = K.defines_for("rope_kv_attention", a) | {"ATTN_KVGRID": 1}
    assert K.compile_kernel("rope_kv_attention", base, fmt="cubin", prebuilt=False)
    one_block = K.defines_for("rope_kv_attention", a, clusters=False) | {"ATTN_KVGRID": 1}
    assert K.compile_kernel("rope_kv_attention", one_block, fmt="cubin", prebuilt=False)
    with pytest.raises(UserError, match="nvcc failed"):
        K.compile_kernel("rope_kv_attention", base | {"ATTN_XMERGE": 1, "ATTN_CLUSTER_KEYS": 1024}, fmt="cubin",
                         prebuilt=False)


def test_sibling_projections():
    """Which launches of a prefill plan run side by side (CudaBackend._launch_side_by_side): consecutive prefill GEMMs
    reading the same input, nothing else (not the matvec ops); a GEMM reading another input starts a new group."""
    from toolchain.cuda_backend import Launch, sibling_projections

    def ln(op, x, name):  # the GEMMs read one scratch pointer (their fp16 copies, GEMM_XH): grouped by their source
        return Launch(name, op, None, None, [777 if op.endswith("_gemm") else x, 0, 0, 1, 2, 3, 99], x)

    plan = [ln("rms_norm", 1, "norm"), ln("q4k_gemm", 2, "q"), ln("q4k_gemm", 2, "k"), ln("q6k_gemm", 2, "v"),
            ln("rope_kv_append", 3, "append"), ln("q4k_gemm", 4, "o"), ln("add", 5, "add"),
            ln("q4k_gemm", 6, "gate"), ln("q4k_gemm", 6, "up"), ln("q4k_gemm", 7, "other input"),
            ln("swiglu", 6, "swiglu"), ln("q5_0_matmul", 8, "a"), ln("q8_0_matmul", 8, "b")]
    groups = [[x.node for x in g] for g in sibling_projections(plan)]
    assert groups == [["norm"], ["q", "k", "v"], ["append"], ["o"], ["add"], ["gate", "up"], ["other input"],
                      ["swiglu"], ["a"], ["b"]]
    assert [x.node for g in sibling_projections(plan) for x in g] == [x.node for x in plan]  # order kept


def test_which_launches_are_programmatic_dependent_launches():
    """CudaBackend.run_plan on stand-in launches: a decode step (below GEMM_MIN_M) and, with tuning prefill_pdl, a
    prompt step launch everything after their first launch as programmatic dependent launches, except the launch
    right after a side-by-side group (it waits on the side streams' events, not on one kernel) and pdl_skip's ops; the
    members of a group (q, k, v) run side by side with only the first on the step's stream, PDL-launched. Without
    prefill_pdl or pdl, no prompt launch is."""
    import toolchain.cuda_backend as cb

    be = object.__new__(cb.CudaBackend)
    calls = []
    be._launch_side_by_side = lambda group, pdl=False: calls.append(([x.node for x in group], pdl))
    be._skipped = lambda launch: False

    def ln(name, op, source=0):
        return cb.Launch(name, op, None, None, [], source=source)

    prompt = [ln("embed", "q4k_gather"), ln("norm", "rms_norm"), ln("q", "q4k_gemm", 7), ln("k", "q4k_gemm", 7),
              ln("v", "q6k_gemm", 7), ln("append", "rope_kv_append"), ln("attn", "prefill_attention"),
              ln("o", "q4k_gemm", 8), ln("add", "add"), ln("gate_up", "q4k_gemm_swiglu", 9),
              ln("down", "q4k_gemm", 10), ln("head", "q6k_matmul"), ln("argmax", "argmax")]
    be.plan = lambda m, *a: prompt
    be._below_gemm = lambda m: m < 64

    def run(m=512, **tuning):
        be.tuning = {**cb.TUNING, "prefill_pdl": True, **tuning}  # (off by default: measured slower)
        calls.clear()
        be.run_plan(m)
        return list(calls)

    assert run() == [(["embed"], False), (["norm"], True), (["q", "k", "v"], True), (["append"], False),
                     (["attn"], True), (["o"], True), (["add"], True), (["gate_up"], True), (["down"], True),
                     (["head"], True), (["argmax"], True)]
    assert run(pdl_skip=("add",))[6] == (["add"], False)
    assert all(not pdl for _, pdl in run(prefill_pdl=False)) and all(not pdl for _, pdl in run(pdl=False))
    sequential = run(concurrent_projections=False)  # one launch at a time: none waits on a join
    assert [g for g, _ in sequential] == [[x.node] for x in prompt]
    assert [pdl for _, pdl in sequential] == [False] + [True] * (len(prompt) - 1)
    decode = run(m=1, prefill_pdl=False)  # decode steps: one launch at a time, tuning pdl alone decides
    assert [g for g, _ in decode] == [[x.node] for x in prompt] and [p for _, p in decode] == [False] + [True] * 12


def test_a_group_side_by_side_takes_pdl_only_on_the_steps_stream(monkeypatch):
    """CudaBackend._launch_side_by_side with stand-in streams, events and kernels: the group's first launch goes to
    the step's stream, with the PDL flag it was given; the others to side streams forked from it by an event and
    never as PDL launches (they start from the event, not from one kernel); the step's stream then waits on each side
    stream's event. A group of one is one launch on the step's stream."""
    import toolchain.cuda_backend as cb

    log = []

    class Stream:
        def __init__(self):
            self.name = f"side{sum(x[0] == 'stream' for x in log)}"
            log.append(("stream", self.name))

        def wait(self, event):
            log.append(("wait", self.name, event.name))

    class Event:
        def __init__(self):
            self.name = f"event{sum(x[0] == 'event' for x in log)}"
            log.append(("event", self.name))

        def record(self, stream):
            log.append(("record", self.name, stream.name))

    class Kernel:
        def __init__(self, name):
            self.name = name

        def launch(self, cfg, args, stream, pdl=False):
            log.append(("launch", self.name, stream.name, pdl))

    monkeypatch.setattr(cb.cr, "Stream", Stream)
    monkeypatch.setattr(cb.cr, "Event", Event)
    be = object.__new__(cb.CudaBackend)
    main = Stream()
    main.name = "main"
    be.stream, be._fork, be._side = main, Event(), []
    group = [cb.Launch(n, "q4k_gemm", Kernel(n), None, []) for n in ("q", "k", "v")]
    log.clear()
    be._launch_side_by_side(group, pdl=True)
    launches = [x for x in log if x[0] == "launch"]
    assert launches == [("launch", "k", "side0", False), ("launch", "v", "side1", False), ("launch", "q", "main", True)]
    fork = be._fork.name
    assert ("record", fork, "main") in log and ("wait", "side0", fork) in log and ("wait", "side1", fork) in log
    assert log.index(("record", fork, "main")) < log.index(("launch", "k", "side0", False))
    joins = [x for x in log if x[0] == "wait" and x[1] == "main"]  # the step's stream waits on both side streams
    assert len(joins) == 2 and log.index(joins[0]) > log.index(("launch", "q", "main", True))
    log.clear()
    be._launch_side_by_side(group[:1], pdl=True)
    assert log == [("launch", "q", "main", True)]


def test_fold_x_f16():
    """CudaBackend._fold_x_f16 on a plan of stand-in launches: a gemm_x_f16 right after the producer of the tensor it
    converts (XH_PRODUCERS, found at that op's output index) goes into that launch as its XH_OUT build (same defines
    plus XH_OUT=1, the fp16 buffer as one more argument); a conversion after another producer of another tensor, or
    after a launch whose build is not known, stays."""
    import toolchain.cuda_backend as cb

    be = object.__new__(cb.CudaBackend)
    be.tuning = dict(cb.TUNING)
    be._kernel = lambda op, defines: (op, tuple(sorted(defines.items())))  # the build a launch would get

    def ln(op, args, defines=None):
        return cb.Launch(op, op, be._kernel(op, defines or {}), None, args, defines=defines)

    conv = [ln("gemm_x_f16", [10, 64, 1536, 99], {"GEMM_XH": 1}), ln("gemm_x_f16", [20, 64, 1536, 99]),
            ln("gemm_x_f16", [30, 64, 1536, 99]), ln("gemm_x_f16", [40, 64, 8960, 99])]
    plan = [ln("rms_norm", [1, 2, 64, 10], {"RMS_EPS": 1e-6}), conv[0], ln("q4k_gemm", [99]),
            ln("prefill_attention", [3, 4, 5, 6, 7, 64, 20, 8, 9], {"HD": 128}), conv[1], ln("q4k_gemm", [99]),
            ln("add", [1, 2, 64, 30], {}), conv[2], ln("q4k_gemm", [99]),
            cb.Launch("swiglu", "swiglu", object(), None, [5, 6, 64, 40]), conv[3], ln("q4k_gemm", [99])]
    out = be._fold_x_f16(plan)
    assert [x.op for x in out] == ["rms_norm", "q4k_gemm", "prefill_attention", "q4k_gemm", "add", "gemm_x_f16",
                                   "q4k_gemm", "swiglu", "gemm_x_f16", "q4k_gemm"]
    norm, attn = out[0], out[2]
    assert norm.defines == {"RMS_EPS": 1e-6, "XH_OUT": 1} and norm.args == [1, 2, 64, 10, 99]
    assert norm.kernel == be._kernel("rms_norm", {"RMS_EPS": 1e-6, "XH_OUT": 1})
    assert attn.defines == {"HD": 128, "XH_OUT": 1} and attn.args == [3, 4, 5, 6, 7, 64, 20, 8, 9, 99]
    assert out[5] is conv[2] and out[8] is conv[3]  # add is no producer; swiglu's build is not known
    assert plan[0].defines == {"RMS_EPS": 1e-6}  # the plan given is left as it was
    wrong = [ln("rms_norm", [1, 2, 64, 11], {"RMS_EPS": 1e-6}), conv[0]]  # it wrote another tensor
    assert be._fold_x_f16(wrong) == wrong
    # the gate/up/SwiGLU GEMM's output (its last argument) converted for the down projection's GEMM
    wg = K.gemm_wgmma_defines(True)
    fused = [ln("q4k_gemm_swiglu", [20, 5, 6, 64, 8960, 1536, 40], wg), conv[3], ln("q4k_gemm", [99])]
    out = be._fold_x_f16(fused)
    assert [x.op for x in out] == ["q4k_gemm_swiglu", "q4k_gemm"]
    assert out[0].defines == wg | {"XH_OUT": 1} and out[0].args == [20, 5, 6, 64, 8960, 1536, 40, 99]
    # the Add + RMSNorm launch: its norm output (the last argument, after the sum) converted for gate/up
    addnorm = [ln("add_rms_norm", [1, 2, 3, 64, 1536, 30, 31], {"RMS_EPS": 1e-6}), ln("gemm_x_f16", [31, 64, 1536, 99])]
    out = be._fold_x_f16(addnorm)
    assert [x.op for x in out] == ["add_rms_norm"] and out[0].args == [1, 2, 3, 64, 1536, 30, 31, 99]
    assert be._fold_x_f16([addnorm[0], ln("gemm_x_f16", [30, 64, 1536, 99])])[1].op == "gemm_x_f16"  # the sum: no


def test_link_ssq():
    """CudaBackend._link_ssq on a plan of stand-in launches: a fused GEMM for few tokens (rms_norm_qkv_skinny,
    rms_norm_swiglu_skinny) right after the matmul_add_skinny that wrote its x takes its RMSNorm's sums from it: the
    producer's build gets SK_SSQ_OUT=1 and the consumer's SK_SSQ_IN=1 (same defines otherwise), both one more
    argument, the same buffer, the two buffers in turn. Not linked: a consumer after another launch (layer 0's QKV
    after the embedding), after a matmul_add_skinny that wrote another tensor, whose build is not known, has 16-warp
    tiles or another width than the hidden size, a step of more rows than the buffers hold, a hidden size that is not
    a multiple of 16, or a pair a tuning's `skip` leaves a launch of."""
    import types

    import toolchain.cuda_backend as cb

    be = object.__new__(cb.CudaBackend)
    be.tuning = dict(cb.TUNING)
    be.cfg = types.SimpleNamespace(hidden=1536)
    be._kernel = lambda op, defines: (op, tuple(sorted(defines.items())))  # the build a launch would get
    be.buffers = {"skinny.ssq": types.SimpleNamespace(ptr=500, shape=(64, 96)),
                  "skinny.ssq.b": types.SimpleNamespace(ptr=600, shape=(64, 96))}
    be._skipped = lambda launch: launch.node in be.tuning["skip"]
    split = {"W_TYPE": "Q4K", "SK_SPLIT": 6}

    def ln(op, args, defines=None, m=16, n=1536):  # scalars: (m, n, k) of matmul_add, (m, hidden, ...) of the others
        cfg = K.LaunchConfig((1, 1, 1), (256, 1, 1), 0, (m, n, 1536))
        return cb.Launch(op, op, be._kernel(op, defines or {}), cfg, args, defines=defines)

    plan = [ln("q4k_gather", [1, 2, 10], {}), ln("rms_norm_qkv_skinny", [10, 3, 4, 5], {"Q_TYPE": "Q4K"}),
            ln("rope_kv_attention", [6, 20], {}), ln("matmul_add_skinny", [20, 7, 8, 10, 30], split),
            ln("rms_norm_swiglu_skinny", [30, 9, 40], {"GATE_TYPE": "Q4K"}),
            ln("matmul_add_skinny", [40, 11, 12, 30, 50], split),
            ln("rms_norm_qkv_skinny", [50, 13, 14, 15], {"Q_TYPE": "Q4K"}),
            ln("matmul_add_skinny", [60, 11, 12, 30, 70], split),  # the next consumer reads another tensor
            ln("rms_norm_swiglu_skinny", [71, 9, 80], {"GATE_TYPE": "Q4K"})]
    out = be._link_ssq(plan)
    assert [x.op for x in out] == [x.op for x in plan]
    assert out[0] is plan[0] and out[1] is plan[1] and out[7] is plan[7] and out[8] is plan[8]
    assert out[3].defines == split | {"SK_SSQ_OUT": 1} and out[3].args == [20, 7, 8, 10, 30, 500]
    assert out[3].kernel == be._kernel("matmul_add_skinny", split | {"SK_SSQ_OUT": 1})
    assert out[4].defines == {"GATE_TYPE": "Q4K", "SK_SSQ_IN": 1} and out[4].args == [30, 9, 40, 500]
    assert out[5].args[-1] == 600 and out[6].args == [50, 13, 14, 15, 600]  # the other buffer
    assert out[6].kernel == be._kernel("rms_norm_qkv_skinny", {"Q_TYPE": "Q4K", "SK_SSQ_IN": 1})
    assert plan[3].defines == split and plan[3].args == [20, 7, 8, 10, 30]  # the plan given is left as it was
    unknown = [cb.Launch("o", "matmul_add_skinny", object(), plan[3].cfg, [20, 7, 8, 10, 30]), plan[4]]
    assert be._link_ssq(unknown) == unknown
    pair = [plan[3], plan[4]]
    assert be._link_ssq([ln("matmul_add_skinny", [20, 7, 8, 10, 30], split, m=65),
                         ln("rms_norm_swiglu_skinny", [30, 9, 40], {"GATE_TYPE": "Q4K"}, m=65)])[1].args == [30, 9, 40]
    be.tuning["skip"] = (pair[0].node,)
    assert be._link_ssq(pair) == pair
    be.tuning["skip"] = ()
    w16 = [ln("matmul_add_skinny", [20, 7, 8, 10, 30], split | {"SK_WARPS": 16}), plan[4]]
    assert be._link_ssq(w16) == w16
    other = [ln("matmul_add_skinny", [20, 7, 8, 10, 30], split, n=896), plan[4]]
    assert be._link_ssq(other) == other
    be.cfg.hidden = 1544
    assert be._link_ssq(pair) == pair


def test_fuse_gate_up_swiglu(synth_gguf):
    """The prefill graph the cuda backend runs where the wgmma GEMMs do (tuning gemm_swiglu): each layer's gate and up
    projections and SwiGLU become one q4k_gemm_swiglu node at the swiglu's place (x, w_gate, w_up -> the swiglu's
    output), the rest kept in order, the graph given left as it was; not where a projection has a bias, the two
    differ in format, another node or none reads the SwiGLU's output, or the format has no prefill GEMM (the 0.5B's
    Q5_0)."""
    import onnx

    from conftest import SMALL_1_5B
    from toolchain.cuda_backend import GATE_UP_SWIGLU
    from toolchain.fusion import fuse_gate_up_swiglu
    from toolchain.gguf_model import load_gguf
    from toolchain.graph import build_model_graph

    g, _ = build_model_graph(load_gguf(synth_gguf(**SMALL_1_5B)))
    before = g.SerializeToString()
    f = fuse_gate_up_swiglu(g, GATE_UP_SWIGLU)
    assert g.SerializeToString() == before
    n_layers = SMALL_1_5B["n_layers"]
    gone = {f"L{i}.{p}" for i in range(n_layers) for p in ("gate_proj", "up_proj")}
    assert [n.name for n in f.graph.node] == [n.name for n in g.graph.node if n.name not in gone]
    for i in range(n_layers):
        node = next(n for n in f.graph.node if n.name == f"L{i}.swiglu")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.op_type == "q4k_gemm_swiglu" and attrs == {"in_features": 1536, "out_features": 8960}
        assert list(node.input) == [f"L{i}.ffn_in", f"blk.{i}.ffn_gate.weight", f"blk.{i}.ffn_up.weight"]
        assert list(node.output) == [f"L{i}.act"]

    def variant(edit):
        m = onnx.ModelProto()
        m.CopyFrom(g)
        edit({n.name: n for n in m.graph.node})
        return [n.op_type for n in fuse_gate_up_swiglu(m, GATE_UP_SWIGLU).graph.node if n.name == "L0.swiglu"]

    assert variant(lambda n: None) == ["q4k_gemm_swiglu"]
    assert variant(lambda n: n["L0.gate_proj"].input.__setitem__(2, "blk.0.attn_q.bias")) == ["swiglu"]
    assert variant(lambda n: setattr(n["L0.up_proj"], "op_type", "q6k_matmul")) == ["swiglu"]
    assert variant(lambda n: n["L0.resid2_add"].input.__setitem__(1, "L0.act")) == ["swiglu"]
    assert variant(lambda n: n["L0.down_proj"].input.__setitem__(0, "L0.ffn_in")) == ["swiglu"]  # no reader
    small = load_gguf(synth_gguf("qwen2.5-coder-0.5b", n_layers=2, vocab=1024))
    g5, _ = build_model_graph(small)
    assert ([n.op_type for n in fuse_gate_up_swiglu(g5, GATE_UP_SWIGLU).graph.node]
            == [n.op_type for n in g5.graph.node])


def test_fuse_add_rms_norm(synth_gguf):
    """The prefill graphs' Add + RMSNorm (tuning add_rms_norm): each residual Add whose sum a norm reads becomes one
    add_rms_norm node at the Add's place (a, b, the norm's weight -> the sum, the norm's output; the norm's epsilon),
    named after the norm, which goes; the first layer's norm (it reads the embedding) and the final norm (kept by
    name) stay; the sum's other reader (the next residual Add) still reads it; the graph given is left as it was."""
    import onnx

    from conftest import SMALL_1_5B
    from toolchain.cuda_backend import HEAD_NODES, prefill_graphs
    from toolchain.fusion import fuse_add_rms_norm
    from toolchain.gguf_model import load_gguf
    from toolchain.graph import build_model_graph

    g, _ = build_model_graph(load_gguf(synth_gguf(**SMALL_1_5B)))
    before = g.SerializeToString()
    f = fuse_add_rms_norm(g, "add_rms_norm", keep=HEAD_NODES[:1])
    assert g.SerializeToString() == before
    nodes = {n.name: n for n in g.graph.node}
    fused = [n for n in f.graph.node if n.op_type == "add_rms_norm"]
    norms = [n for n in g.graph.node if n.op_type == "RMSNormalization"]
    adds = {n.output[0]: n for n in g.graph.node if n.op_type == "Add"}
    want = [n for n in norms if n.input[0] in adds and n.name != HEAD_NODES[0]]
    assert len(fused) == len(want) == 2 * SMALL_1_5B["n_layers"] - 1  # all but the first layer's input norm
    for node, norm in zip(fused, want):
        add = adds[norm.input[0]]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.name == norm.name and attrs == {"epsilon": pytest.approx(1e-6)}
        assert list(node.input) == [*add.input, norm.input[1]] and list(node.output) == [add.output[0], norm.output[0]]
    order = [n.name for n in f.graph.node]  # at the Add's place, the Add and the norm gone
    assert order == [nodes[n].name if nodes[n].op_type != "Add" or nodes[n].output[0] not in [w.input[0] for w in want]
                     else next(w.name for w in want if w.input[0] == nodes[n].output[0])
                     for n in nodes if n not in {w.name for w in want}]
    assert sum(n.op_type == "RMSNormalization" for n in f.graph.node) == 2  # layer 0's input norm, the final norm
    m = onnx.ModelProto()  # an Add of a weight (broadcast) is not fused
    m.CopyFrom(g)
    add = next(n for n in m.graph.node if n.output[0] == want[0].input[0])
    add.input[1] = next(w for w in (n.input[1] for n in m.graph.node if n.op_type == "RMSNormalization"))
    fused_m = fuse_add_rms_norm(m, "add_rms_norm", keep=HEAD_NODES[:1])
    assert [n.op_type for n in fused_m.graph.node].count("add_rms_norm") == len(want) - 1
    graphs = prefill_graphs(g)
    assert list(graphs) == [(False, False), (True, False), (False, True), (True, True)] and graphs[False, False] is g
    both = [n.op_type for n in graphs[True, True].graph.node]
    assert both.count("add_rms_norm") == len(want) and both.count("q4k_gemm_swiglu") == SMALL_1_5B["n_layers"]


def test_gemm_wgmma_build_wiring():
    """The prefill GEMMs' wgmma builds: compiled for sm_90a (its instructions exist nowhere else), launched with 128
    weight rows per CTA and their own shared memory (the numbers plugins/quant_gemm_wgmma.cuh asserts), shipped for
    both real models with the x conversion of the GEMM_XH build, and chosen by the cuda backend only with clusters
    (the TensorRT builds have none)."""
    from toolchain.cuda_backend import TENSORRT_BUILDS, TUNING

    src = (Path(K.PLUGINS) / "quant_gemm_wgmma.cuh").read_text()
    xh, wg = K.GEMM_XH_SMEM, K.GEMM_WGMMA_SMEM
    assert (f"GEMM_XH ? smem_bytes<Q4K>() == {xh['q4k_gemm']} && smem_bytes<Q6K>() == {xh['q6k_gemm']}\n"
            f"                      : smem_bytes<Q4K>() == {wg['q4k_gemm']} && smem_bytes<Q6K>() == {wg['q6k_gemm']}"
            ) in src
    for xh, smem in ((True, K.GEMM_XH_SMEM), (False, K.GEMM_WGMMA_SMEM)):
        d = K.gemm_wgmma_defines(xh)
        key = K._source_key(K.source_file("q4k_gemm"), K._defines_text(d), "cubin", "sm_90a")
        assert K.build_arch(d) == "sm_90a" and K.prebuilt_path("q4k_gemm", d).name == f"{key}.cubin"
        for op in K.GEMM_OPS:
            cfg = K.launch_config(op, {"m": 300, "n": 8960, "k": 1536, "gemm_wgmma": 1, "gemm_xh": int(xh)})
            assert cfg.grid == (70, 3, 2) and cfg.block == (256, 1, 1) and cfg.shared_mem == smem[op]
            assert (op, d) in K.real_model_builds()
    for xh, smem in ((True, K.GEMM_XH_SMEM), (False, K.GEMM_WGMMA_SMEM)):  # gate, up and SwiGLU in one GEMM
        for gemm, op in K.GEMM_SWIGLU_OF.items():
            cfg = K.launch_config(op, {"m": 300, "n": 8960, "k": 1536, "gemm_wgmma": 1, "gemm_xh": int(xh)})
            assert cfg.grid == (140, 3, 2) and cfg.block == (256, 1, 1) and cfg.shared_mem == smem[gemm]
            assert cfg.scalars == (300, 8960, 1536) and K.source_file(op) == K.source_file(gemm)
            builds = [K.gemm_wgmma_defines(xh)] + [K.gemm_wgmma_defines(True) | {"XH_OUT": 1}] * xh
            assert all((op, d) in K.real_model_builds() for d in builds)
    assert K.build_arch({}) == "sm_90"
    assert ("gemm_x_f16", K.gemm_wgmma_defines(True)) in K.real_model_builds()
    cfg = K.launch_config("gemm_x_f16", {"m": 300, "k": 1536})
    assert cfg.grid[0] * cfg.block[0] * 16 >= 300 * 1536 > (cfg.grid[0] - 1) * cfg.block[0] * 16
    assert TUNING["gemm_wgmma"] and TUNING["gemm_xh"] and TUNING["clusters"] and not TENSORRT_BUILDS["clusters"]


def test_which_steps_are_prompt_pieces():
    """CudaBackend._prompt_piece (no GPU): a step runs as forward's prompt pieces (prefill attention over one slot's
    cache, the head on the last row) only when its rows are consecutive positions of one slot and no row but the
    last wants logits; and a piece on the prefill GEMMs has one plan at any depth (_prompt_long_context)."""
    import toolchain.cuda_backend as cb

    def piece(positions, slots, rows):
        return cb.CudaBackend._prompt_piece(cb.CudaBackend._piece_from(positions, slots), rows, len(positions))

    assert piece([10, 11, 12], [2, 2, 2], [2]) and piece([10, 11, 12], [2, 2, 2], [])
    assert not piece([10, 11, 12], [2, 2, 2], None)  # every row's logits
    assert not piece([10, 11, 12], [2, 2, 2], [1, 2])  # another row's too
    assert not piece([10, 11, 12], [2, 2, 1], [2])  # two slots
    assert not piece([10, 12, 12], [2, 2, 2], [2]) and not piece([12, 11, 12], [2, 2, 2], [2])  # not consecutive
    assert not piece([10, 11, 13], [2, 2, 2], [2])
    assert not piece([7], [0], [0])  # one token: a decode step
    start = cb.CudaBackend._piece_from  # decode rows, then one slot's consecutive positions
    assert start([10, 11, 12], [2, 2, 2]) == 0 and start([40, 9, 10, 11], [0, 2, 2, 2]) == 1
    assert start([40, 51, 9, 10, 11], [0, 1, 2, 2, 2]) == 2 and start([40, 8, 10, 11], [0, 2, 2, 2]) is None
    assert start([40, 10, 11], [2, 2, 2]) is None  # an earlier row of the piece's slot
    assert start([40, 51, 11], [0, 1, 2]) is None and start([11], [2]) is None  # a piece has 2+ rows
    assert start([10, 11, 5, 6], [1, 1, 2, 2]) == 2  # two pieces: the last one
    assert start([9, 10, 11], [1, 2, 2]) == 1  # consecutive positions of another slot before it

    def walk(positions, slots):  # the definition, row by row from the end
        d = len(positions) - 1
        while d > 0 and slots[d - 1] == slots[-1] and positions[d - 1] == positions[d] - 1:
            d -= 1
        return d if len(positions) - d >= 2 and slots[-1] not in slots[:d] else None

    rng = np.random.default_rng()
    for _ in range(3000):
        m, k = int(rng.integers(1, 12)), int(rng.integers(0, 6))
        slots = rng.integers(0, 3, m).tolist()
        positions = rng.integers(0, 8, m).tolist()
        if 0 < k <= m:  # a trailing piece of k rows, often
            slots[m - k:] = [slots[-1]] * k
            positions[m - k:] = range(positions[m - k], positions[m - k] + k)
        assert start(positions, slots) == walk(positions, slots), (positions, slots)
    be = object.__new__(cb.CudaBackend)
    be.tuning = dict(cb.TUNING)
    assert not be._prompt_long_context(cb.GEMM_MIN_M, True) and be._prompt_long_context(cb.GEMM_MIN_M - 1, True)
    assert not be._prompt_long_context(cb.GEMM_MIN_M - 1, False)
    be.tuning["clusters"] = False  # no prefill GEMMs, no prefill attention: the decode attention's grids stay
    assert be._prompt_long_context(cb.GEMM_MIN_M, True)


def test_the_head_runs_on_the_wanted_rows():
    """CudaBackend._head (no GPU): the head (final norm, lm_head, argmax or draw) of a step runs on rows 0 .. the
    last wanted one (head_rows; 0 = all rows), and where the step's last row is wanted beside earlier ones, on rows 0
    .. the last other wanted one plus the last row, gathered (head_last): the engine's decode rows beside a prompt
    chunk take a head of their own count (plus the chunk's last row where its prompt wants its first token), not
    one over the chunk's rows."""
    head = __import__("toolchain.cuda_backend", fromlist=["CudaBackend"]).CudaBackend._head
    assert head(None, 300) == (0, False, None) and head([0, 1], 2) == (0, False, None)  # every row
    assert head([0, 1, 2, 3], 511) == (4, False, None) and head([1], 300) == (2, False, None)
    assert head([2, 0], 9) == (3, False, None) and head([], 300) == (1, False, None)  # nothing wanted: one row
    assert head([0, 1, 2, 3, 510], 511) == (5, True, [0, 1, 2, 3, 510])
    assert head([299], 300) == (1, True, [299]) and head([1, 299], 300) == (3, True, [0, 1, 299])
    assert head([0, 1, 2], 3) == (0, False, None) and head([0], 1) == (0, False, None)
    rng = np.random.default_rng()
    for _ in range(300):
        m = int(rng.integers(1, 600))
        rows = sorted(set(rng.integers(0, m, int(rng.integers(1, 6))).tolist()))
        h, last, gathered = head(rows, m)
        where = list(range(m)) if h == 0 else gathered if last else list(range(h))
        assert set(rows) <= set(where) and (h == 0 or h == len(where) < m), (rows, m, h, last)
        assert where == sorted(where) and (not last or where[-1] == m - 1), (rows, m, where)



def test_launch_arguments_are_packed_once_per_value_list():
    """Kernel._packed_args (no GPU): the parameter block a launch passes is _pack's, byte for byte; a list of plain
    ints (a plan's addresses and sizes) is packed once and reused, a list holding any other object (a buffer, a
    Ptr: an address that may not outlive it) is packed afresh each time; the store is bounded."""
    import ctypes

    from toolchain import cuda_runtime as cr

    k = object.__new__(cr.Kernel)
    k.name, k.param_sizes, k._packed = "stand_in", [8, 8, 4, 4], {}
    rng = np.random.default_rng()

    def block(packed):  # the bytes each parameter address points at
        vals, ptrs = packed
        return [ctypes.string_at(int(p), 8 if i < 2 else 4) for i, p in enumerate(ptrs)]

    args = [int(rng.integers(1 << 33, 1 << 40)), int(rng.integers(1 << 33, 1 << 40)), int(rng.integers(0, 1 << 30)),
            np.int32(rng.integers(0, 1 << 30))]
    first = k._packed_args(args)
    assert block(first) == block(k._pack(args))
    assert k._packed_args(list(args)) is first  # the same values: the kept block
    other = k._packed_args(args[:2] + [args[2] + 1, args[3]])
    assert other is not first and block(other) != block(first)
    ptr = [cr.Ptr(args[0])] + args[1:]
    assert k._packed_args(ptr) is not k._packed_args(ptr) and block(k._packed_args(ptr)) == block(first)
    for j in range(cr.PACKED_KEPT + 5):
        k._packed_args([args[0], args[1], j, 0])
    assert len(k._packed) <= cr.PACKED_KEPT
    with pytest.raises(TypeError):
        k._packed_args(args[:3] + [True])
