"""plugins/quant_gemm.cu (tensor-core prefill GEMM: q4k_gemm, q6k_gemm) and plugins/quant_gemm_skinny.cu (the GEMM
for few tokens: q4k_gemm_skinny, q6k_gemm_skinny, built and launched as the cuda backend does, through
toolchain/kernels.py) against float64 numpy at the Qwen2.5-1.5B shapes. Fresh random weights per run (seed in every message), outputs poisoned with NaN before each launch.
fp16 operands with fp32 accumulation: tolerance 3e-3 relative (measured 3-4e-4; 7e-4 for quantize()d Q4_K weights). Needs cuda-python, nvcc and a
GPU (scripts/device_gemm.sh runs it there); the conftest skips it elsewhere.

The prefill GEMM is compiled here with nvcc directly, in each of its builds (mma.sync; wgmma with x float32; wgmma
with x made fp16 by gemm_x_f16 first: the cuda backend's default on H100 / H200), so that variants can be timed
(scripts/device_gemm.sh); `gemm_kernel`, `gemm_launch` and `random_weights` are shared with the timing script."""
from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest

from toolchain import cuda_runtime as cr
from toolchain.quants import dequantize, quantize

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "plugins" / "quant_gemm.cu"
BLOCK = {"Q4_K": (256, 144), "Q6_K": (256, 210)}
F16_FIELDS = {"Q4_K": [0, 2], "Q6_K": [208]}
NAME = {"Q4_K": "q4k_gemm", "Q6_K": "q6k_gemm"}
THREADS, BM = 256, 128
NAN = 0x7FC00000
TOL = 3e-3
# Variants as "NT8:SPLIT" (the mma.sync body: -DGEMM_NT8, -DGEMM_SPLIT), "wg:SPLIT" (the wgmma body, -DGEMM_WGMMA=1,
# sm_90a: plugins/quant_gemm_wgmma.cuh) or "wgx:SPLIT" (the wgmma body with x as fp16 from gemm_x_f16, -DGEMM_XH=1).
# The shipped builds are tested; GEMM_TEST_VARIANTS="3:2 4:2 wgx:2" picks others (scripts/device_gemm.sh does, before
# timing them).
WG_KINDS = {"wg": 1, "wgx": 2}


def parse_variant(v: str) -> tuple[int, int, int]:
    """'3:2' -> (3, 2, 0); 'wg:2' -> (0, 2, 1); 'wgx:2' -> (0, 2, 2): (GEMM_NT8, GEMM_SPLIT, wgmma kind)"""
    a, split = v.split(":")
    return (0, int(split), WG_KINDS[a]) if a in WG_KINDS else (int(a), int(split), 0)


def variant_name(v: tuple[int, int, int]) -> str:
    return f"{'wg' if v[2] == 1 else 'wgx'}:{v[1]}" if v[2] else f"{v[0]}:{v[1]}"


def variant_kw(v: tuple[int, int, int]) -> dict:
    return dict(nt8=v[0], split=v[1], wgmma=v[2])


DEFAULT, WGMMA, WGMMA_XH = (3, 2, 0), (0, 2, 1), (0, 2, 2)
VARIANTS = [parse_variant(v) for v in os.environ.get("GEMM_TEST_VARIANTS", "").split()] or [DEFAULT, WGMMA, WGMMA_XH]
VIDS = [variant_name(v) for v in VARIANTS]


def variant_params(nt8: int = 3, split: int = 2, wgmma: int = 0) -> dict:
    """Launch constants of a compiled variant; see quant_gemm.cu's and quant_gemm_wgmma.cuh's headers."""
    if wgmma:  # the launch toolchain/kernels.py gives the backend (checked against the header there)
        from toolchain import kernels as K
        smem = K.GEMM_XH_SMEM if wgmma == 2 else K.GEMM_WGMMA_SMEM
        return {"nt8": 0, "split": split, "bn": K.GEMM_WGMMA_ROWS, "smem": {t: smem[NAME[t]] for t in NAME}}
    bn = 32 * nt8
    x_bytes = BM * 72 * 2
    return {"nt8": nt8, "split": split, "bn": bn,
            "smem": {"Q4_K": 2 * x_bytes + 2 * bn * 144 + bn * 64, "Q6_K": 2 * x_bytes + 2 * bn * 240 + bn * 64}}


@functools.lru_cache(maxsize=None)
def compile_gemm(nt8: int = 3, split: int = 2, wgmma: int = 0) -> tuple[bytes, str]:
    """cubin bytes and nvcc's resource report of one variant."""
    from toolchain.kernels import nvcc_path
    nvcc = nvcc_path() or "nvcc"
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "quant_gemm.cubin")
        body = (["-arch=sm_90a", "-DGEMM_WGMMA=1", *(["-DGEMM_XH=1"] if wgmma == 2 else [])] if wgmma
                else ["-arch=sm_90", f"-DGEMM_NT8={nt8}"])
        cmd = [nvcc, "-cubin", *body, "-O3", "-std=c++17", "--resource-usage", f"-I{ROOT / 'plugins'}",
               f"-DGEMM_SPLIT={split}", str(SRC), "-o", out]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed:\n{res.stdout}{res.stderr}")
        return Path(out).read_bytes(), res.stdout + res.stderr


@functools.lru_cache(maxsize=None)
def gemm_kernel(t: str, nt8: int = 3, split: int = 2, wgmma: int = 0):
    """Loaded kernel of format t with its dynamic shared memory limit raised."""
    image, _ = compile_gemm(nt8, split, wgmma)
    mod = cr.Module(image)
    kern = mod.kernel(NAME[t])
    d = cr.driver()
    smem = variant_params(nt8, split, wgmma)["smem"][t]
    cr.check(d.cuFuncSetAttribute(kern.handle, d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                  smem), "cuFuncSetAttribute")
    kern._keep_module = mod  # the module must outlive the kernel handle
    return kern


def gemm_config(t: str, m: int, n: int, k: int, nt8: int = 3, split: int = 2, wgmma: int = 0):
    """The launch formula of quant_gemm.cu: grid (cdiv(n, BN), cdiv(m, 128), SPLIT), block 256, dynamic smem."""
    p = variant_params(nt8, split, wgmma)
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    return types.SimpleNamespace(grid=(cdiv(n, p["bn"]), cdiv(m, BM), split), block=(THREADS, 1, 1),
                                 shared_mem=p["smem"][t], scalars=(m, n, k))


_XH: dict[int, cr.DeviceBuffer] = {}  # fp16 copies of x for the wgx variant, by size (kept: graphs capture them)


def gemm_launch(t, x, w, bias, y, m, n, k, stream=None, nt8=3, split=2, wgmma=0):
    """One GEMM launch of the variant; for wgx, x made fp16 by gemm_x_f16 first (one conversion per launch here; the
    backend makes one per activation, for all the GEMMs that read it)."""
    kern = gemm_kernel(t, nt8, split, wgmma)
    if wgmma == 2:
        xh = _XH.get(m * k) or _XH.setdefault(m * k, cr.DeviceBuffer(m * k * 2))
        from toolchain.kernels import launch_config
        kern._keep_module.kernel("gemm_x_f16").launch_op(launch_config("gemm_x_f16", {"m": m, "k": k}), [x], [xh],
                                                         stream)
        x = xh
    kern.launch_op(gemm_config(t, m, n, k, nt8, split, wgmma), [x, w, bias], [y], stream)


def _rng():
    seed = int(np.random.SeedSequence().entropy % (1 << 63))
    return np.random.default_rng(seed), f"seed={seed}"


def random_weights(rng, t, n, k):
    """Random raw bytes are valid blocks except the half scales, set to finite small values of either sign."""
    elems, bb = BLOCK[t]
    nb = n * (k // elems)
    raw = rng.integers(0, 256, (nb, bb), dtype=np.uint8)
    for off in F16_FIELDS[t]:
        d = rng.uniform(0.5, 1.5, nb) * rng.choice([-1, 1], nb) * 1e-3
        raw[:, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    return raw.reshape(n, k // elems * bb)


def matmul_ref(x, w, bias, t, n, k):
    y = x.astype(np.float64) @ dequantize(w, t, (n, k)).astype(np.float64).T
    return y if bias is None else y + bias


def run_gemm(t, x, w, bias, m, n, k, w_offset=0, launch=None, **variant):
    """Upload, poison y with NaN, launch once (`launch`, default the prefill GEMM's gemm_launch), download."""
    if w_offset:
        wb = cr.DeviceBuffer(w.nbytes + 16 + w_offset)
        wb.upload(np.concatenate([np.zeros(w_offset, np.uint8), w.reshape(-1)]))
        wp = cr.Ptr(wb.ptr + w_offset)
    else:
        wb = cr.DeviceBuffer.from_numpy(w)
        wp = wb
    xb = cr.DeviceBuffer.from_numpy(x)
    bb = cr.DeviceBuffer.from_numpy(bias) if bias is not None else None
    yb = cr.DeviceBuffer(m * n * 4)
    yb.fill_u32(NAN)
    (launch or gemm_launch)(t, xb, wp, bb, yb, m, n, k, **variant)
    cr.synchronize()
    y = yb.download((m, n), np.float32)
    for b in (wb, xb, bb, yb):
        if b is not None:
            b.free()
    return y


def rel_err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))




def check(t, n, k, m, has_bias, rng, seed, w=None, w_offset=0, launch=None, **variant):
    w = random_weights(rng, t, n, k) if w is None else w
    x = rng.standard_normal((m, k), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32) if has_bias else None
    y = run_gemm(t, x, w, bias, m, n, k, w_offset=w_offset, launch=launch, **variant)
    ref = matmul_ref(x, w, bias, t, n, k)
    bad = ~np.isfinite(y)
    rel = rel_err(np.where(bad, 0, y), ref)
    name = getattr(launch, "name", NAME[t])
    print(f"{name} {variant or ''} m={m} n={n} k={k} bias={has_bias} off={w_offset}: rel {rel:.2e} ({seed})")
    assert not bad.any(), f"{bad.sum()} unwritten or non-finite outputs, first at {np.argwhere(bad)[0]} ({seed})"
    assert rel < TOL, f"rel err {rel} ({seed})"
    return rel


# (n, k, bias) of the 1.5B projections: q/o, k/v, gate/up, down
SHAPES_15B = [(1536, 1536, True), (256, 1536, True), (8960, 1536, False), (1536, 8960, False)]


@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("t", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("n,k,has_bias", SHAPES_15B)
@pytest.mark.parametrize("m", [32, 100, 512])
def test_gemm_15b_shapes(t, n, k, has_bias, m, v):
    rng, seed = _rng()
    check(t, n, k, m, has_bias, rng, seed, **variant_kw(v))


@pytest.mark.parametrize("t", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("n,k,m", [(37, 512, 5),      # odd n (scalar stores), partial tiles in both dims
                                   (200, 256, 130),   # one superblock: the split-K peer has no work
                                   (1000, 768, 1),    # m = 1, odd superblock count
                                   (136, 2304, 257)]) # n tail of 8, 3 token tiles
@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_gemm_awkward(t, n, k, m, v):
    rng, seed = _rng()
    check(t, n, k, m, True, rng, seed, **variant_kw(v))


@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
def test_gemm_q6k_misaligned_weights(v):
    """Q6_K works from any 2-aligned base (aligned-down spans + funnel shifts)."""
    rng, seed = _rng()
    for off in (2, 6, 14):
        check("Q6_K", 300, 1536, 40, False, rng, seed, w_offset=off, **variant_kw(v))


def check_quantized_normals(t, m, name, **launch):
    """Weights as a real quantizer makes them (Q4_K mins near the block minimum), x with a few large outliers."""
    rng, seed = _rng()
    n, k = 1536, 1536
    w = quantize((rng.standard_normal((n, k)) * 0.02).astype(np.float32), t)
    x = rng.standard_normal((m, k), dtype=np.float32)
    x[:, rng.integers(0, k, 8)] *= 50.0
    bias = rng.standard_normal(n, dtype=np.float32) * 0.1
    y = run_gemm(t, x, w, bias, m, n, k, **launch)
    rel = rel_err(y, matmul_ref(x, w, bias, t, n, k))
    print(f"{name} quantized normals m={m}: rel {rel:.2e} ({seed})")
    assert np.isfinite(y).all() and rel < TOL, f"rel err {rel} ({seed})"


@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("t", ["Q4_K", "Q6_K"])
def test_gemm_quantized_normals(t, v):
    check_quantized_normals(t, 64, NAME[t], **variant_kw(v))


@pytest.mark.parametrize("v", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("t", ["Q4_K", "Q6_K"])
def test_gemm_deterministic(t, v):
    """Same inputs, same bits (no races between the split-K halves or in the pipelines)."""
    rng, seed = _rng()
    n, k, m = 1536, 8960, 200
    w = random_weights(rng, t, n, k)
    x = rng.standard_normal((m, k), dtype=np.float32)
    a = run_gemm(t, x, w, None, m, n, k, **variant_kw(v))
    b = run_gemm(t, x, w, None, m, n, k, **variant_kw(v))
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), seed


# --- the GEMM for few tokens (batched decode): the registered ops, their defines and launch formula -----------------

SKINNY = {"Q4_K": "q4k_gemm_skinny", "Q6_K": "q6k_gemm_skinny"}


def skinny_launcher(split: int | None = None):
    """A launch function for run_gemm: the op built with kernels.defines_for (SK_SPLIT by the shape), or with a
    forced cluster size `split` (grid z to match), launched with kernels.launch_config."""
    from toolchain import kernels

    def launch(t, x, w, bias, y, m, n, k):
        op = SKINNY[t]
        defines = kernels.defines_for(op, {"in_features": k, "out_features": n})
        cfg = kernels.launch_config(op, {"m": m, "n": n, "k": k})
        if split is not None:
            defines = {"SK_SPLIT": split} if split > 1 else {}
            cfg = kernels.LaunchConfig(cfg.grid[:2] + (split,), cfg.block, cfg.shared_mem, cfg.scalars)
        cr.load_op(op, defines).launch_op(cfg, [x, w, bias], [y])
    launch.name = f"skinny(split={split or 'by shape'})"
    return launch


@pytest.mark.parametrize("t", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("n,k,has_bias", SHAPES_15B)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16, 17, 31, 33])
def test_skinny_15b_shapes(t, n, k, has_bias, m):
    """Every m bucket and odd m; the shapes give the cluster sizes 6 (q/o, k/v), 3 (gate/up), 7 (down)."""
    rng, seed = _rng()
    check(t, n, k, m, has_bias, rng, seed, launch=skinny_launcher())


@pytest.mark.parametrize("t", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("n,k,m", [(37, 512, 5),       # odd n (scalar stores), a partial row tile
                                   (200, 256, 16),     # one superblock: no split
                                   (1000, 768, 3),     # odd superblock count
                                   (136, 2304, 20),    # n tail of 8, two token tiles
                                   (151936 // 8, 1536, 4)])  # many row tiles (a slice of the lm_head's)
def test_skinny_awkward(t, n, k, m):
    rng, seed = _rng()
    check(t, n, k, m, True, rng, seed, launch=skinny_launcher())


@pytest.mark.parametrize("t", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("split", [1, 2, 8])
def test_skinny_forced_splits(t, split):
    """The cluster sizes the shape rule does not pick for this shape (ffn_down: 7), incl. the portable maximum."""
    rng, seed = _rng()
    check(t, 1536, 8960, 9, False, rng, seed, launch=skinny_launcher(split))


def test_skinny_q6k_misaligned_weights():
    rng, seed = _rng()
    for off in (2, 6, 14):
        check("Q6_K", 300, 1536, 7, False, rng, seed, w_offset=off, launch=skinny_launcher())


@pytest.mark.parametrize("t", ["Q4_K", "Q6_K"])
def test_skinny_quantized_normals(t):
    check_quantized_normals(t, 12, SKINNY[t], launch=skinny_launcher())


@pytest.mark.parametrize("t", ["Q4_K", "Q6_K"])
def test_skinny_deterministic(t):
    """Same inputs, same bits: the cluster's reduction adds the ranks in a fixed order."""
    rng, seed = _rng()
    n, k, m = 1536, 8960, 16
    w = random_weights(rng, t, n, k)
    x = rng.standard_normal((m, k), dtype=np.float32)
    a = run_gemm(t, x, w, None, m, n, k, launch=skinny_launcher())
    b = run_gemm(t, x, w, None, m, n, k, launch=skinny_launcher())
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), seed
