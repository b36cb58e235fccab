"""Every CUDA kernel against a numpy reference, at the real shapes of Qwen2.5 1.5B (Q4_K / Q6_K) and 0.5B (Q5_0 /
Q8_0) and at awkward ones. Fresh random inputs per run (the seed is in every message), outputs poisoned (NaN /
0xFF) before each launch so an unwritten element fails. Needs cuda-python and a GPU (scripts/device_kernels.sh).
Errors are printed (run with -s or -v to see them).

The projections quantize x to int16 per 32 values (plugins/qmv.cuh): ~2e-5 relative error on random data, under
QMV_TOL; the fused ops are checked against their toolchain/ops.py composition."""
import functools

import numpy as np
import pytest

from toolchain import cuda_runtime as cr
from toolchain import kernels as K
from toolchain import ops
from conftest import xh_layout

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cr.available(), reason="needs cuda-python and an NVIDIA GPU")]

try:  # the project's dequantizer (bit-exact against gguf-py); the fallback below is the same math
    from toolchain.quants import dequantize
except ImportError:  # pragma: no cover
    dequantize = None

BLOCK = {"Q4_K": (256, 144), "Q6_K": (256, 210), "Q5_0": (32, 22), "Q8_0": (32, 34)}
F16_FIELDS = {"Q4_K": [0, 2], "Q6_K": [208], "Q5_0": [0], "Q8_0": [0]}
MATMUL = {"Q4_K": "q4k_matmul", "Q6_K": "q6k_matmul", "Q5_0": "q5_0_matmul", "Q8_0": "q8_0_matmul"}
GATHER = {"Q4_K": "q4k_gather", "Q6_K": "q6k_gather", "Q5_0": "q5_0_gather", "Q8_0": "q8_0_gather"}
NAN = 0x7FC00000
ATTN = {"1.5B": dict(n_heads=12, n_kv_heads=2, head_dim=128, rope_theta=1e6),
        "0.5B": dict(n_heads=14, n_kv_heads=2, head_dim=64, rope_theta=1e6)}


def _rng():
    seed = int(np.random.SeedSequence().entropy % (1 << 63))
    return np.random.default_rng(seed), f"seed={seed}"


@functools.lru_cache(maxsize=None)
def kernel(op, defines=()):
    return cr.load_op(op, dict(defines))


def run(op, inputs, outputs, dims, defines=(), clusters=True, kern=None, cfg=None, after=()):
    """Upload inputs, poison outputs ((shape, dtype) pairs), launch once (launch_config's grid for `clusters`, or
    `cfg`; a fresh module of the build, or the loaded `kern`), download outputs. `after`: inputs the ABI takes after
    the outputs (e.g. the few-token GEMMs' SK_SSQ_IN sums)."""
    bufs = [cr.DeviceBuffer.from_array(a) if isinstance(a, np.ndarray) else a for a in inputs]
    late = [cr.DeviceBuffer.from_array(a) for a in after]
    outs = []
    for shape, dtype in outputs:
        b = cr.DeviceBuffer(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        b.fill_u32(NAN) if np.dtype(dtype) == np.float32 else b.fill_u8(0xFF)
        outs.append(b)
    (kern or kernel(op, defines)).launch_op(cfg or K.launch_config(op, dims, clusters=clusters), bufs, outs + late)
    cr.synchronize()
    res = [b.download(s, d) for b, (s, d) in zip(outs, outputs)]
    for b in bufs + outs + late:
        if isinstance(b, cr.DeviceBuffer):
            b.free()
    return res


def rel_err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30)), float(np.abs(y - ref).max())


# ---------------------------------------------------------------------------------------------------------------
# quantized weights

def random_weights(rng, t, n, k):
    """Random raw bytes are valid blocks except the half scales, set to finite small values of either sign."""
    elems, bb = BLOCK[t]
    nb = n * (k // elems)
    raw = rng.integers(0, 256, (nb, bb), dtype=np.uint8)
    for off in F16_FIELDS[t]:
        d = rng.uniform(0.5, 1.5, nb) * rng.choice([-1, 1], nb) * (1e-3 if t in ("Q4_K", "Q6_K") else 1e-2)
        raw[:, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    return raw.reshape(n, k // elems * bb)


def _deq_fallback(raw, t, shape):  # same formulas as toolchain/quants.py (docs of the ggml formats)
    elems, bb = BLOCK[t]
    b = np.ascontiguousarray(raw).reshape(-1, bb)
    f16 = lambda o: b[:, o:o + 2].copy().view(np.float16).astype(np.float32)  # noqa: E731
    n = len(b)
    if t == "Q8_0":
        out = b[:, 2:].view(np.int8).astype(np.float32) * f16(0)
    elif t == "Q5_0":
        qs = b[:, 6:22]
        q = np.concatenate([qs & 15, qs >> 4], 1) | (np.unpackbits(b[:, 2:6], axis=1, bitorder="little") << 4)
        out = (q.astype(np.float32) - 16) * f16(0)
    elif t == "Q4_K":
        s = b[:, 4:16]
        d_, m_, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
        sc = np.concatenate([d_ & 63, (md & 15) | ((d_ >> 2) & 0x30)], 1).astype(np.float32)
        mn = np.concatenate([m_ & 63, (md >> 4) | ((m_ >> 2) & 0x30)], 1).astype(np.float32)
        qs = b[:, 16:].reshape(n, 4, 1, 32)
        q = np.concatenate([qs & 15, qs >> 4], 2).reshape(n, 8, 32).astype(np.float32)
        out = ((f16(0) * sc)[..., None] * q - (f16(2) * mn)[..., None]).reshape(n, 256)
    else:  # Q6_K
        ql = b[:, :128].reshape(n, 2, 2, 32)
        qh = b[:, 128:192].reshape(n, 2, 1, 32)
        q = np.concatenate([ql & 15, ql >> 4], 2) | (((qh >> np.array([0, 2, 4, 6]).reshape(1, 1, 4, 1)) & 3) << 4)
        q = q.astype(np.float32) - 32
        dl = f16(208) * b[:, 192:208].view(np.int8).astype(np.float32)
        out = (dl.reshape(n, 16, 1) * q.reshape(n, 16, 16)).reshape(n, 256)
    return out.astype(np.float32).reshape(shape)


def deq(raw, t, shape):
    return dequantize(raw, t, shape) if dequantize is not None else _deq_fallback(raw, t, shape)


def test_fallback_dequantizer_matches_quants():
    if dequantize is None:
        pytest.skip("toolchain.quants.dequantize not available")
    rng, seed = _rng()
    for t in BLOCK:
        w = random_weights(rng, t, 5, 512)
        assert np.array_equal(_deq_fallback(w, t, (5, 512)), dequantize(w, t, (5, 512))), f"{t} {seed}"


# (n, k, bias) of the real projections: 1.5B q/k/v/o, gate/up, down, lm_head (Q6_K); 0.5B likewise
SHAPES_15B = [(1536, 1536, True), (256, 1536, True), (8960, 1536, False), (1536, 8960, False)]
SHAPES_05B = [(896, 896, True), (128, 896, True), (4864, 896, False), (896, 4864, False)]
MATMUL_CASES = ([("Q4_K", n, k, b, m) for n, k, b in SHAPES_15B for m in (1, 3, 17)]
                + [("Q6_K", n, k, b, m) for n, k, b in SHAPES_15B[1:] for m in (1, 3, 17)]
                + [(t, n, k, b, m) for t in ("Q5_0", "Q8_0") for n, k, b in SHAPES_05B for m in (1, 3, 17)]
                + [(t, 1000, 512, True, 64) for t in BLOCK] + [(t, 37, 512, False, 5) for t in BLOCK]
                + [(t, 37, 4096, True, 5) for t in BLOCK]  # long rows split over 4 warps, odd n, 2 token tiles
                + [("Q6_K", 151936, 1536, False, 1)])


def matmul_ref(x, w, bias, t, n, k, rows=16384):
    """float64 x @ dequantize(w).T + bias, a slab of rows at a time (the lm_head is 233M weights)."""
    y = np.empty((x.shape[0], n), np.float64)
    x64 = x.astype(np.float64)
    for r in range(0, n, rows):
        wd = deq(w[r:r + rows], t, (min(rows, n - r), k)).astype(np.float64)
        y[:, r:r + rows] = x64 @ wd.T
    return y if bias is None else y + bias


QMV_TOL = 1e-4  # int16 x: ~2e-5 measured on random data (fp32 decode: ~2e-6)


def spec_defines(op, **attrs):
    """The -D defines the backends compile for a node with these attributes (kernels.defines_for)."""
    return tuple(sorted(K.defines_for(op, attrs).items()))


@pytest.mark.parametrize("t,n,k,has_bias,m", MATMUL_CASES)
def test_matmul(t, n, k, has_bias, m):
    """The specialization the backends build (defines_for: cluster k-split where it pays) at every case."""
    rng, seed = _rng()
    w = random_weights(rng, t, n, k)
    x = rng.standard_normal((m, k), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32) if has_bias else None
    defines = spec_defines(MATMUL[t], in_features=k, out_features=n)
    (y,) = run(MATMUL[t], [x, w, bias], [((m, n), np.float32)], dict(m=m, n=n, k=k), defines)
    ref = matmul_ref(x, w, bias, t, n, k)
    rel, mx = rel_err(y, ref)
    print(f"{MATMUL[t]} m={m} n={n} k={k} {dict(defines)}: rel {rel:.2e} max abs {mx:.2e} ({seed})")
    assert np.isfinite(y).all(), f"unwritten or non-finite outputs ({seed})"
    assert rel < QMV_TOL, f"rel err {rel} ({seed})"


@pytest.mark.parametrize("t,n,k,has_bias,m", [("Q6_K", 151936, 1536, False, 1), ("Q4_K", 1536, 1536, True, 1),
                                              ("Q6_K", 256, 1536, True, 1), ("Q4_K", 1536, 8960, False, 1),
                                              ("Q6_K", 1001, 512, True, 1),
                                              # batched decode builds (QMV1_MT): every bucket, partial last blocks
                                              ("Q6_K", 151936, 1536, False, 8), ("Q4_K", 1536, 8960, True, 3),
                                              ("Q6_K", 1001, 512, True, 2), ("Q4_K", 1536, 1536, False, 13)])
def test_matmul_decode_build(t, n, k, has_bias, m):
    """The decode build of a plain matmul (kernels.decode_build: the qmv1 core, e.g. the lm_head) with its launch,
    for m tokens (decode_tokens(m) per block)."""
    rng, seed = _rng()
    w = random_weights(rng, t, n, k)
    x = rng.standard_normal((m, k), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32) if has_bias else None
    defines = K.decode_build(MATMUL[t], dict(in_features=k, out_features=n), k, mt=K.decode_tokens(m))
    assert "QMV1" in defines and int(defines.get("QMV1_MT", 1)) == K.decode_tokens(m), defines
    dims = dict(m=m, n=n, k=k, **K.qmv1_dims(defines))
    (y,) = run(MATMUL[t], [x, w, bias], [((m, n), np.float32)], dims, tuple(sorted(defines.items())))
    rel, mx = rel_err(y, matmul_ref(x, w, bias, t, n, k))
    print(f"{MATMUL[t]} decode build n={n} k={k} m={m}: rel {rel:.2e} max abs {mx:.2e} ({seed})")
    assert np.isfinite(y).all() and rel < 2 * QMV_TOL, f"rel err {rel} ({seed})"


@pytest.mark.parametrize("t,n,k,m", [("Q4_K", 1536, 8960, 1), ("Q6_K", 256, 1536, 3), ("Q5_0", 896, 4864, 17),
                                     ("Q8_0", 128, 896, 1)])
def test_matmul_generic_build(t, n, k, m):
    """Without defines (KSPLIT = 1) the kernel takes any grid, here launch_config's k-split one."""
    rng, seed = _rng()
    w = random_weights(rng, t, n, k)
    x = rng.standard_normal((m, k), dtype=np.float32)
    (y,) = run(MATMUL[t], [x, w, None], [((m, n), np.float32)], dict(m=m, n=n, k=k))
    rel, _ = rel_err(y, matmul_ref(x, w, None, t, n, k))
    assert np.isfinite(y).all() and rel < QMV_TOL, f"rel err {rel} ({seed})"


@pytest.mark.parametrize("t,n,k,m", [("Q4_K", 1536, 8960, 1), ("Q6_K", 151936, 1536, 1), ("Q5_0", 896, 4864, 17),
                                     ("Q4_K", 8960, 1536, 64), ("Q8_0", 128, 896, 5)])
def test_matmul_tensorrt_build(t, n, k, m):
    """The build and grid TensorRT's plugins get (issue 16, risk 1: clusters=False, no k-split cluster)."""
    rng, seed = _rng()
    w = random_weights(rng, t, n, k)
    x = rng.standard_normal((m, k), dtype=np.float32)
    defines = tuple(sorted(K.defines_for(MATMUL[t], dict(in_features=k, out_features=n), clusters=False).items()))
    (y,) = run(MATMUL[t], [x, w, None], [((m, n), np.float32)], dict(m=m, n=n, k=k), defines, clusters=False)
    rel, _ = rel_err(y, matmul_ref(x, w, None, t, n, k))
    assert np.isfinite(y).all() and rel < QMV_TOL, f"rel err {rel} ({seed})"


def test_matmul_outliers():
    """int16 x with one scale per 32 values: a 100x outlier in every block costs its 31 neighbours precision, the
    result stays inside the 1e-3 budget."""
    rng, seed = _rng()
    for t, n, k in (("Q4_K", 512, 1536), ("Q6_K", 512, 8960), ("Q5_0", 256, 896), ("Q8_0", 256, 896)):
        w = random_weights(rng, t, n, k)
        x = rng.standard_normal((2, k), dtype=np.float32)
        x[:, rng.integers(0, 32, k // 32) + np.arange(0, k, 32)] *= 100
        defines = spec_defines(MATMUL[t], in_features=k, out_features=n)
        (y,) = run(MATMUL[t], [x, w, None], [((2, n), np.float32)], dict(m=2, n=n, k=k), defines)
        rel, _ = rel_err(y, matmul_ref(x, w, None, t, n, k))
        print(f"{t} outliers: rel {rel:.2e}")
        assert rel < 1e-3, f"{t}: rel err {rel} ({seed})"


def test_matmul_misaligned_weights():
    """Q6_K / Q5_0 / Q8_0 must work for any 2-aligned base (the kernel stages the aligned-down byte range)."""
    rng, seed = _rng()
    for t in ("Q6_K", "Q5_0", "Q8_0"):
        n, k, m = 21, 512, 2
        w = random_weights(rng, t, n, k)
        x = rng.standard_normal((m, k), dtype=np.float32)
        buf = cr.DeviceBuffer(w.nbytes + 16)
        buf.upload(np.concatenate([np.zeros(6, np.uint8), w.reshape(-1)]))
        (y,) = run(MATMUL[t], [x, cr.Ptr(buf.ptr + 6), None], [((m, n), np.float32)], dict(m=m, n=n, k=k))
        buf.free()
        rel, _ = rel_err(y, matmul_ref(x, w, None, t, n, k))
        assert rel < 1e-4, f"{t} at offset 6: rel err {rel} ({seed})"


@pytest.mark.parametrize("t,hidden,vocab", [("Q4_K", 1536, 1000), ("Q6_K", 1536, 151936), ("Q5_0", 896, 1000),
                                            ("Q8_0", 896, 1000)])
def test_gather(t, hidden, vocab):
    rng, seed = _rng()
    w = random_weights(rng, t, vocab, hidden)
    ids = np.array([0, vocab - 1, 7, int(rng.integers(vocab)), 7], np.int32)
    (y,) = run(GATHER[t], [w, ids], [((len(ids), hidden), np.float32)], dict(m=len(ids), hidden=hidden, vocab=vocab))
    ref = deq(np.ascontiguousarray(w[ids]), t, (len(ids), hidden))
    assert np.array_equal(y.view(np.uint32), ref.view(np.uint32)), f"{t} not bit-exact ({seed})"


@pytest.mark.parametrize("t", list(GATHER))
def test_gather_ids_outside_the_vocabulary_read_nothing(t):
    """Issue 16: an id the backends would refuse (-1, vocab, a huge one) reads nothing past the table and leaves a
    NaN row; the rows beside it are unchanged (compute-sanitizer's run of scripts/sanitize_step.py covers the
    reads)."""
    rng, seed = _rng()
    hidden, vocab = (1536, 1000) if t in ("Q4_K", "Q6_K") else (896, 1000)
    w = random_weights(rng, t, vocab, hidden)
    ids = np.array([-1, 3, vocab, 2**31 - 1, vocab - 1], np.int32)
    (y,) = run(GATHER[t], [w, ids], [((len(ids), hidden), np.float32)], dict(m=len(ids), hidden=hidden, vocab=vocab))
    good = np.array([1, 4])
    assert np.isnan(y[[0, 2, 3]]).all(), f"rows of bad ids must be NaN ({seed})"
    ref = deq(np.ascontiguousarray(w[ids[good]]), t, (len(good), hidden))
    assert np.array_equal(y[good].view(np.uint32), ref.view(np.uint32)), f"{t} good rows ({seed})"


# ---------------------------------------------------------------------------------------------------------------
# fused ops (toolchain/fusion.py) against their toolchain/ops.py composition

# (hidden, q_dim, kv_dim, ffn) of the two models
DIMS_15B, DIMS_05B = (1536, 1536, 256, 8960), (896, 896, 128, 4864)
EPS = 9.999999974752427e-07  # the models' float32 1e-6


def _check(name, y, ref, seed, tol=QMV_TOL):
    rel, mx = rel_err(y, ref)
    print(f"{name}: rel {rel:.2e} max abs {mx:.2e} ({seed})")
    assert np.isfinite(y).all(), f"{name}: unwritten or non-finite outputs ({seed})"
    assert rel < tol, f"{name}: rel err {rel} ({seed})"


def fused_case(rng, op, hidden, sizes, types, m):
    """Random inputs of a fused projection and its numpy reference (toolchain/ops.py): (attrs, inputs, outputs, dims,
    refs). sizes: rms_norm_qkv (q_dim, kv_dim); matmul_add (n,), with hidden = k; rms_norm_swiglu (ffn,)."""
    if op == "matmul_add":
        (n,), t = sizes, types[0]
        x = rng.standard_normal((m, hidden), dtype=np.float32)
        w, bias = random_weights(rng, t, n, hidden), rng.standard_normal(n, dtype=np.float32)
        res = rng.standard_normal((m, n), dtype=np.float32) * 4
        attrs = dict(w_type=t, in_features=hidden, out_features=n)
        return (attrs, [x, w, bias, res], [((m, n), np.float32)], dict(attrs, m=m, n=n, k=hidden),
                [ops.matmul_add(x, w, bias, res, w_type=t)])
    x = rng.standard_normal((m, hidden), dtype=np.float32) * 3
    g = rng.standard_normal(hidden, dtype=np.float32)
    if op == "rms_norm_qkv":
        q_dim, kv_dim = sizes
        attrs = dict(epsilon=EPS, q_type=types[0], k_type=types[1], v_type=types[2], q_dim=q_dim, kv_dim=kv_dim)
        ws = [random_weights(rng, t, n, hidden) for t, n in zip(types, (q_dim, kv_dim, kv_dim))]
        bs = [rng.standard_normal(n, dtype=np.float32) for n in (q_dim, kv_dim, kv_dim)]
        inputs = [x, g, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2]]
        return (attrs, inputs, [((m, q_dim), np.float32), ((m, kv_dim), np.float32), ((m, kv_dim), np.float32)],
                dict(attrs, m=m, hidden=hidden), list(ops.rms_norm_qkv(*inputs, epsilon=EPS, q_type=types[0],
                                                                        k_type=types[1], v_type=types[2])))
    (ffn,) = sizes
    attrs = dict(epsilon=EPS, gate_type=types[0], up_type=types[1], ffn=ffn)
    wg, wu = random_weights(rng, types[0], ffn, hidden), random_weights(rng, types[1], ffn, hidden)
    return (attrs, [x, g, wg, wu], [((m, ffn), np.float32)], dict(attrs, m=m, hidden=hidden),
            [ops.rms_norm_swiglu(x, g, wg, wu, epsilon=EPS, gate_type=types[0], up_type=types[1])])


def check_fused(name, op, inputs, outs, refs, seed, tol=QMV_TOL):
    for i, (y, ref) in enumerate(zip(outs, refs)):
        if op == "matmul_add":  # judged on the projection: the residual adds exactly (numpy's order, fp32)
            y, ref = y - inputs[3], ref - inputs[3]
        _check(f"{name} out {i}", y, ref, seed, tol)


QKV_CASES = ([(DIMS_15B, ts, m) for ts in (("Q4_K", "Q4_K", "Q6_K"), ("Q4_K", "Q4_K", "Q4_K")) for m in (1, 3, 17)]
             + [(DIMS_05B, ts, m) for ts in (("Q5_0", "Q5_0", "Q8_0"), ("Q5_0", "Q5_0", "Q5_0")) for m in (1, 3, 17)]
             + [((512, 70, 18, 0), ("Q6_K", "Q8_0", "Q4_K"), 5)]  # odd row counts, every format pairing
             + [((2048, 128, 32, 0), ("Q4_K", "Q4_K", "Q4_K"), 2)])  # hidden > 1536: the separate RMS pass


@pytest.mark.parametrize("dims,types,m", QKV_CASES)
def test_rms_norm_qkv(dims, types, m):
    rng, seed = _rng()
    attrs, inputs, outputs, d, refs = fused_case(rng, "rms_norm_qkv", dims[0], dims[1:3], types, m)
    outs = run("rms_norm_qkv", inputs, outputs, d, spec_defines("rms_norm_qkv", **attrs))
    check_fused(f"rms_norm_qkv {types} m={m}", "rms_norm_qkv", inputs, outs, refs, seed)


MATMUL_ADD_CASES = ([(t, 1536, 1536, m) for t in ("Q4_K",) for m in (1, 3, 17)]
                    + [(t, 1536, 8960, m) for t in ("Q4_K", "Q6_K") for m in (1, 3, 17)]
                    + [(t, 896, 896, m) for t in ("Q5_0",) for m in (1, 3, 17)]
                    + [(t, 896, 4864, m) for t in ("Q4_K", "Q6_K") for m in (1, 17)]
                    + [("Q8_0", 37, 1024, 5), ("Q6_K", 1000, 512, 64)])


@pytest.mark.parametrize("t,n,k,m", MATMUL_ADD_CASES)
def test_matmul_add(t, n, k, m):
    rng, seed = _rng()
    attrs, inputs, outputs, d, refs = fused_case(rng, "matmul_add", k, (n,), (t,), m)
    outs = run("matmul_add", inputs, outputs, d, spec_defines("matmul_add", **attrs))
    check_fused(f"matmul_add {t} m={m} {n}x{k} {K.defines_for('matmul_add', attrs)}", "matmul_add", inputs, outs,
                refs, seed)


PAIRS = {"QMV_PAIR": 1}  # plugins/qmv.cuh: gate row r and up row r in one warp, silu(g) * u written there
SWIGLU_CASES = ([(DIMS_15B, ("Q4_K", "Q4_K"), m, {}) for m in (1, 3, 17)]
                + [(DIMS_05B, ("Q5_0", "Q5_0"), m, {}) for m in (1, 3, 17)]
                + [((1536, 0, 0, 1002), ("Q4_K", "Q6_K"), 1, {}), ((512, 0, 0, 70), ("Q8_0", "Q5_0"), 6, {})]  # split
                + [((512, 0, 0, 71), ("Q8_0", "Q8_0"), 3, {}), ((2048, 0, 0, 64), ("Q6_K", "Q6_K"), 1, {})]  # odd, 2048
                + [(DIMS_15B, ("Q4_K", "Q4_K"), 1, PAIRS), (DIMS_05B, ("Q5_0", "Q5_0"), 17, PAIRS),
                   ((512, 0, 0, 71), ("Q8_0", "Q8_0"), 3, PAIRS)])


@pytest.mark.parametrize("dims,types,m,extra", SWIGLU_CASES)
def test_rms_norm_swiglu(dims, types, m, extra):
    rng, seed = _rng()
    attrs, inputs, outputs, d, refs = fused_case(rng, "rms_norm_swiglu", dims[0], (dims[3],), types, m)
    defines = tuple(sorted(dict(K.defines_for("rms_norm_swiglu", attrs), **extra).items()))
    outs = run("rms_norm_swiglu", inputs, outputs, d, defines)
    check_fused(f"rms_norm_swiglu {types} {extra} m={m} {dims[3]}x{dims[0]}", "rms_norm_swiglu", inputs, outs, refs,
                seed, tol=2 * QMV_TOL)


# decode builds (kernels.decode_build): the qmv1 core (plugins/qmv1.cuh) where the formats allow, with its own launch
# configuration, for m tokens (QMV1_MT = decode_tokens(m) per block), else the general core (QMV_M1 for m = 1)
DECODE_CASES = [
    ("rms_norm_qkv", (1536, 1536, 256), ("Q4_K", "Q4_K", "Q6_K"), 1),
    ("rms_norm_qkv", (1536, 1536, 256), ("Q4_K", "Q4_K", "Q4_K"), 1),
    ("rms_norm_qkv", (512, 70, 18), ("Q6_K", "Q4_K", "Q4_K"), 1),     # odd row counts
    ("rms_norm_qkv", (2048, 128, 32), ("Q4_K", "Q4_K", "Q4_K"), 1),   # 2 warps per row pair
    ("rms_norm_qkv", (896, 896, 128), ("Q5_0", "Q5_0", "Q8_0"), 3),   # QMV_M1, m > 1
    ("matmul_add", (1536, 1536), ("Q4_K",), 1),
    ("matmul_add", (8960, 1536), ("Q4_K",), 1),                       # 6 warps per row pair
    ("matmul_add", (8960, 1536), ("Q6_K",), 1),
    ("matmul_add", (512, 1001), ("Q6_K",), 1),                        # odd n
    ("matmul_add", (3328, 37), ("Q4_K",), 1),                         # 13 superblocks: a short last k part
    ("matmul_add", (4864, 896), ("Q5_0",), 2),                        # QMV_M1
    ("rms_norm_swiglu", (1536, 8960), ("Q4_K", "Q4_K"), 1),
    ("rms_norm_swiglu", (1536, 1002), ("Q4_K", "Q6_K"), 1),
    ("rms_norm_swiglu", (2048, 64), ("Q6_K", "Q6_K"), 1),
    ("rms_norm_swiglu", (896, 4864), ("Q5_0", "Q5_0"), 1),            # QMV_M1
    # batched decode (QMV1_MT 2 / 4 / 8; m > 8: several blocks of 8 along y; odd m: a partial last block)
    ("rms_norm_qkv", (1536, 1536, 256), ("Q4_K", "Q4_K", "Q6_K"), 2),
    ("rms_norm_qkv", (1536, 1536, 256), ("Q4_K", "Q4_K", "Q6_K"), 5),
    ("rms_norm_qkv", (512, 70, 18), ("Q6_K", "Q4_K", "Q4_K"), 8),
    ("rms_norm_qkv", (2048, 128, 32), ("Q4_K", "Q4_K", "Q4_K"), 17),
    ("matmul_add", (1536, 1536), ("Q4_K",), 4),
    ("matmul_add", (8960, 1536), ("Q4_K",), 3),                       # k split over 9 warps, 100 KB of x
    ("matmul_add", (8960, 1536), ("Q6_K",), 8),
    ("matmul_add", (3328, 37), ("Q4_K",), 6),
    ("matmul_add", (512, 1001), ("Q6_K",), 31),
    ("rms_norm_swiglu", (1536, 8960), ("Q4_K", "Q4_K"), 2),
    ("rms_norm_swiglu", (1536, 1002), ("Q4_K", "Q6_K"), 7),
    ("rms_norm_swiglu", (2048, 64), ("Q6_K", "Q6_K"), 16),
    ("rms_norm_swiglu", (896, 4864), ("Q5_0", "Q5_0"), 4),            # no decode core: the general core
]  # shapes: (hidden or k, rows...)


@pytest.mark.parametrize("op,shape,types,m", DECODE_CASES)
def test_decode_builds(op, shape, types, m):
    rng, seed = _rng()
    attrs, inputs, outputs, dims, refs = fused_case(rng, op, shape[0], shape[1:], types, m)
    defines = K.decode_build(op, attrs, shape[0], mt=K.decode_tokens(m))
    assert ("QMV1" in defines) == all(t in ("Q4_K", "Q6_K") for t in types), defines
    assert ("QMV1_MT" in defines) == ("QMV1" in defines and m > 1), defines
    if "QMV1" in defines:
        dims |= K.qmv1_dims(defines)
    outs = run(op, inputs, outputs, dims, tuple(sorted(defines.items())))
    check_fused(f"{op} decode build {defines} {shape} m={m}", op, inputs, outs, refs, seed, tol=2 * QMV_TOL)


# the GEMMs for few tokens (plugins/quant_gemm_skinny.cu; kernels.skinny_of): each fused op's tensor-core twin, built
# as the cuda backend builds it (the cluster size by the shape), against the same composition. fp16 operands and
# fp32 accumulation, as the prefill GEMM: its tolerance (tests/test_gemm_gpu.py TOL)
SKINNY_TOL = 3e-3
SKINNY_CASES = [
    *[("rms_norm_qkv", (1536, 1536, 256), ("Q4_K", "Q4_K", "Q6_K"), m) for m in (2, 5, 16, 17)],
    ("rms_norm_qkv", (1536, 1536, 256), ("Q4_K", "Q4_K", "Q4_K"), 8),
    ("rms_norm_qkv", (512, 70, 18), ("Q6_K", "Q4_K", "Q4_K"), 3),       # odd row counts: partial tiles of each
    ("rms_norm_qkv", (2048, 128, 32), ("Q4_K", "Q6_K", "Q4_K"), 31),    # 3 tiles of 8 superblocks: a cluster of 8
    ("matmul_add", (1536, 1536), ("Q4_K",), 4),
    ("matmul_add", (8960, 1536), ("Q6_K",), 16),
    ("matmul_add", (8960, 1536), ("Q4_K",), 9),
    ("matmul_add", (512, 1001), ("Q6_K",), 33),                          # odd n, 3 token tiles
    ("rms_norm_swiglu", (1536, 8960), ("Q4_K", "Q4_K"), 4),
    ("rms_norm_swiglu", (1536, 8960), ("Q4_K", "Q4_K"), 16),
    ("rms_norm_swiglu", (1536, 1002), ("Q4_K", "Q6_K"), 7),             # mixed formats, a cluster of 6
    ("rms_norm_swiglu", (2048, 64), ("Q6_K", "Q6_K"), 20),
    ("rms_norm_swiglu", (512, 70), ("Q6_K", "Q4_K"), 3),
]  # shapes: (hidden or k, rows...)


@pytest.mark.parametrize("op,shape,types,m", SKINNY_CASES)
def test_skinny_fused(op, shape, types, m):
    rng, seed = _rng()
    attrs, inputs, outputs, dims, refs = fused_case(rng, op, shape[0], shape[1:], types, m)
    sop = K.skinny_of(op, attrs)
    defines = K.defines_for(sop, dict(attrs, hidden=shape[0]))
    outs = run(sop, inputs, outputs, dims, tuple(sorted(defines.items())))
    check_fused(f"{sop} {defines} {shape} m={m}", op, inputs, outs, refs, seed, tol=SKINNY_TOL)


# the builds docs/perf-notes.md timed against the default (scripts/decode_tuning.py's skinny_* variants): the same
# answers: the CTA-ring build (SK_WARPRING=0, the default before 2026-12-07) and its variants (the first: its default
# before 2026-12-06, 4 stages, per-warp A fragments). The warp rings' other sizes:
# test_skinny_warp_ring_sizes_keep_the_bits.
CTA_RING = {"SK_WARPRING": 0, "QMMA_SCALES_H2": 0}


def run_skinny(sop, inputs, outputs, dims, defines, after=()):
    """A GEMM for few tokens built with `defines`, launched as kernels.launch_config gives it for them."""
    return run(sop, inputs, outputs, dims | K.skinny_dims(defines), tuple(sorted(defines.items())), after=after)


def assert_same_bits(outs, want, what):
    for a, b in zip(outs, want):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"{what}: other bits"


SKINNY_VARIANTS = [CTA_RING | d for d in ({"SK_STAGES": 4, "SK_XF16": 0}, {"SK_STAGES": 2, "SK_XF16": 0},
                                          {"SK_STAGES": 3, "SK_XF16": 0}, {"SK_STAGES": 4, "SK_XF16": 1},
                                          {"SK_STAGES": 3}, {"SK_SUB_UNROLL": 1}, {"SK_WARPS": 16})]


@pytest.mark.parametrize("variant", SKINNY_VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
@pytest.mark.parametrize("op,shape,types,m", [SKINNY_CASES[i] for i in (1, 6, 8, 13, 15)])
def test_skinny_variants(op, shape, types, m, variant):
    rng, seed = _rng()
    attrs, inputs, outputs, dims, refs = fused_case(rng, op, shape[0], shape[1:], types, m)
    sop = K.skinny_of(op, attrs)
    defines = K.defines_for(sop, dict(attrs, hidden=shape[0])) | variant
    outs = run_skinny(sop, inputs, outputs, dims, defines)
    check_fused(f"{sop} {defines} {shape} m={m}", op, inputs, outs, refs, seed, tol=SKINNY_TOL)


@pytest.mark.parametrize("op,shape,types,m", SKINNY_CASES)
def test_skinny_cta_ring(op, shape, types, m):
    """The CTA-ring build (SK_WARPRING=0, the default before 2026-12-07: one ring of x and weight stages for the CTA,
    a barrier a superblock; the scales in fp32) at every case, against the numpy ops. The default (each warp its own
    ring, x fragments made from global memory, the scales in half2) does the same arithmetic in the same order: the
    same bits, twice (a race in either ring, such as writes into a ring while its copies are in flight, shows here
    long before it leaves the tolerance)."""
    rng, seed = _rng()
    attrs, inputs, outputs, dims, refs = fused_case(rng, op, shape[0], shape[1:], types, m)
    sop = K.skinny_of(op, attrs)
    base = K.defines_for(sop, dict(attrs, hidden=shape[0]))
    cta = base | CTA_RING
    outs = run_skinny(sop, inputs, outputs, dims, cta)
    check_fused(f"{sop} {cta} {shape} m={m}", op, inputs, outs, refs, seed, tol=SKINNY_TOL)
    for _ in range(2):
        assert_same_bits(run_skinny(sop, inputs, outputs, dims, base), outs, f"{sop} m={m} ({seed})")


# the warp rings' sizes (decode_tuning's skinny_x3, skinny_s3, skinny_s3x1, skinny_s4x6): the ring's depth and the x
# window move copies, never arithmetic
WARP_RING_SIZES = [{"SK_XSB": 3}, {"SK_XSB": 1}, {"SK_STAGES": 3}, {"SK_STAGES": 3, "SK_XSB": 1},
                   {"SK_STAGES": 4, "SK_XSB": 6}]


@pytest.mark.parametrize("size", WARP_RING_SIZES, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
@pytest.mark.parametrize("op,shape,types,m", [SKINNY_CASES[i] for i in (0, 1, 6, 8, 12, 13, 15)])
def test_skinny_warp_ring_sizes_keep_the_bits(op, shape, types, m, size):
    """Each of the warp rings' other sizes gives the default's bits, twice, and the numpy ops' answer within the
    tolerance: a ring or window size that races or drops a copy shows here long before it leaves the tolerance."""
    rng, seed = _rng()
    attrs, inputs, outputs, dims, refs = fused_case(rng, op, shape[0], shape[1:], types, m)
    sop = K.skinny_of(op, attrs)
    base = K.defines_for(sop, dict(attrs, hidden=shape[0]))
    want = run_skinny(sop, inputs, outputs, dims, base)
    var = base | size
    for _ in range(2):
        outs = run_skinny(sop, inputs, outputs, dims, var)
        assert_same_bits(outs, want, f"{sop} {var} m={m} ({seed})")
    check_fused(f"{sop} {var} {shape} m={m}", op, inputs, outs, refs, seed, tol=SKINNY_TOL)


@pytest.mark.parametrize("ring", [0, 1])
@pytest.mark.parametrize("op,shape,types,m", [SKINNY_CASES[i] for i in (0, 5, 8, 10, 12, 13)])
def test_skinny_scales_h2_keep_the_bits(op, shape, types, m, ring):
    """QMMA_SCALES_H2 (the default: the Q4_K / Q6_K scales' fp16 pairs made in half2 arithmetic, plugins/quant_mma.cuh)
    rounds the same exact products once, as the fp32 path does: the same bits as the build without it, in both
    rings, and the numpy ops' answer within the tolerance."""
    rng, seed = _rng()
    attrs, inputs, outputs, dims, refs = fused_case(rng, op, shape[0], shape[1:], types, m)
    sop = K.skinny_of(op, attrs)
    base = K.defines_for(sop, dict(attrs, hidden=shape[0])) | {"SK_WARPRING": ring, "QMMA_SCALES_H2": 0}
    outs = [run_skinny(sop, inputs, outputs, dims, d) for d in (base, base | {"QMMA_SCALES_H2": 1})]
    check_fused(f"{sop} {base} QMMA_SCALES_H2 {shape} m={m}", op, inputs, outs[1], refs, seed, tol=SKINNY_TOL)
    assert_same_bits(outs[1], outs[0], f"{sop} m={m} ({seed})")


def group_sums(y):
    """Each row's sums of y^2 per 16 columns, in float64 (the SK_SSQ_OUT / SK_SSQ_IN layout [m][n / 16])."""
    y = np.asarray(y, np.float64)
    return (y * y).reshape(y.shape[0], -1, 16).sum(axis=2)


@pytest.mark.parametrize("op,shape,types,m", [SKINNY_CASES[i] for i in (7, 8, 9)]
                         + [("matmul_add", (1536, 1536), ("Q4_K",), 33)])  # 3 token tiles: rows from m0 = 16, 32
def test_skinny_ssq_out(op, shape, types, m):
    """matmul_add_skinny built with SK_SSQ_OUT=1 (the cuda backend's ssq_by_producer): y bit for bit the default
    build's, and one more output, each row's sums of y^2 per 16 columns, against float64 sums of that y; the rows past
    m are not written (a poisoned row beyond them stays poisoned). Twice: the same bits."""
    rng, seed = _rng()
    attrs, inputs, outputs, dims, refs = fused_case(rng, op, shape[0], shape[1:], types, m)
    sop = K.skinny_of(op, attrs)
    base = K.defines_for(sop, dict(attrs, hidden=shape[0]))
    (want,) = run_skinny(sop, inputs, outputs, dims, base)
    n = shape[1]
    first = None
    for _ in range(2):
        y, ssq = run_skinny(sop, inputs, outputs + [((m + 1, n // 16), np.float32)], dims, base | {"SK_SSQ_OUT": 1})
        assert_same_bits([y], [want], f"{sop} SK_SSQ_OUT y m={m} ({seed})")
        assert np.isnan(ssq[m]).all(), f"a row past m = {m} was written ({seed})"
        _check(f"{sop} SK_SSQ_OUT sums m={m}", ssq[:m], group_sums(y), seed, tol=1e-5)
        if first is not None:
            assert_same_bits([ssq], [first], f"{sop} SK_SSQ_OUT sums m={m}, twice ({seed})")
        first = ssq
    check_fused(f"{sop} SK_SSQ_OUT {shape} m={m}", op, inputs, [y], refs, seed, tol=SKINNY_TOL)


@pytest.mark.parametrize("op,shape,types,m", [SKINNY_CASES[i] for i in (0, 1, 3, 5, 6, 11, 12, 13, 14, 15)])
def test_skinny_ssq_in(op, shape, types, m):
    """rms_norm_qkv_skinny / rms_norm_swiglu_skinny built with SK_SSQ_IN=1 read each token's sums of x^2 per 16
    columns (made here in numpy, as a matmul_add_skinny SK_SSQ_OUT would) instead of summing x^2 themselves: the numpy
    ops' answer within the tolerance, the same bits twice; and given sums 4x too large (1 / rms halved) the answer
    moves far off, so the build does use them. Each token's x is scaled by its own factor (0.3-4; RMSNorm's output,
    so the reference, stays the same): a token that took another's sums would be off by up to 13x."""
    rng, seed = _rng()
    attrs, inputs, outputs, dims, refs = fused_case(rng, op, shape[0], shape[1:], types, m)
    inputs[0] *= np.linspace(0.3, 4.0, m, dtype=np.float32)[:, None]
    sop = K.skinny_of(op, attrs)
    var = K.defines_for(sop, dict(attrs, hidden=shape[0])) | {"SK_SSQ_IN": 1}
    ssq = group_sums(inputs[0]).astype(np.float32)
    outs = run_skinny(sop, inputs, outputs, dims, var, after=[ssq])
    check_fused(f"{sop} {var} {shape} m={m}", op, inputs, outs, refs, seed, tol=SKINNY_TOL)
    assert_same_bits(run_skinny(sop, inputs, outputs, dims, var, after=[ssq]), outs, f"{sop} SK_SSQ_IN m={m} ({seed})")
    off = run_skinny(sop, inputs, outputs, dims, var, after=[4 * ssq])
    assert max(rel_err(y, ref)[0] for y, ref in zip(off, refs)) > 0.1, f"{sop} SK_SSQ_IN ignored its sums ({seed})"


def test_skinny_of_keeps_other_formats_on_the_decode_core():
    assert K.skinny_of("rms_norm_qkv", dict(q_type="Q5_0", k_type="Q5_0", v_type="Q8_0")) is None
    assert K.skinny_of("matmul_add", dict(w_type="Q6_K")) == "matmul_add_skinny"
    assert K.skinny_of("q8_0_matmul", {}) is None and K.skinny_of("rope_kv_attention", {}) is None


# ---------------------------------------------------------------------------------------------------------------
# small ops

@pytest.mark.parametrize("m,hidden", [(1, 1536), (3, 1536), (17, 896), (2, 1001)])
def test_rms_norm(m, hidden):
    rng, seed = _rng()
    x = rng.standard_normal((m, hidden), dtype=np.float32) * 3
    g = rng.standard_normal(hidden, dtype=np.float32)
    eps = 1e-6
    (y,) = run("rms_norm", [x, g], [((m, hidden), np.float32)], dict(m=m, hidden=hidden), (("RMS_EPS", eps),))
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * g
    rel, _ = rel_err(y, ref)
    assert rel < 1e-5, f"rel err {rel} ({seed})"


@pytest.mark.parametrize("m,hidden", [(1, 1536), (3, 1536), (17, 896), (2, 1001), (512, 1536)])
def test_add_rms_norm(m, hidden):
    """add_rms_norm (a prompt step's residual Add and the RMSNorm of its sum in one launch) gives the bits of add then
    rms_norm: the sum as numpy's a + b, the norm as the rms_norm kernel's of that sum; its XH_OUT build the same
    float32 outputs and the fp16 copy of the norm the GEMMs read; and the sum written over a (in place, as a
    residual stream may be) changes nothing."""
    rng, seed = _rng()
    a = rng.standard_normal((m, hidden), dtype=np.float32) * 3
    b = rng.standard_normal((m, hidden), dtype=np.float32)
    g = rng.standard_normal(hidden, dtype=np.float32)
    eps = (("RMS_EPS", 1e-6),)
    dims = dict(m=m, hidden=hidden)
    s, y = run("add_rms_norm", [a, b, g], [((m, hidden), np.float32)] * 2, dims, eps)
    assert np.array_equal(s.view(np.uint32), (a + b).view(np.uint32)), f"sum ({seed})"
    (ref,) = run("rms_norm", [a + b, g], [((m, hidden), np.float32)], dims, eps)
    assert np.array_equal(y.view(np.uint32), ref.view(np.uint32)), f"not rms_norm's bits ({seed})"
    a64 = (a + b).astype(np.float64)
    rel, _ = rel_err(y, a64 / np.sqrt((a64 * a64).mean(-1, keepdims=True) + 1e-6) * g)
    assert rel < 1e-5, f"rel err {rel} ({seed})"
    if hidden % 16 == 0:
        s2, y2, xh = run("add_rms_norm", [a, b, g], [((m, hidden), np.float32)] * 2 + [((m, hidden), np.float16)],
                         dims, eps + (("XH_OUT", 1),))
        assert np.array_equal(s2.view(np.uint32), s.view(np.uint32)) and np.array_equal(y2.view(np.uint32),
                                                                                      y.view(np.uint32)), seed
        assert np.array_equal(xh.view(np.uint16), xh_layout(y).view(np.uint16)), f"fp16 copy ({seed})"
    bufs = [cr.DeviceBuffer.from_array(v) for v in (a, b, g)] + [cr.DeviceBuffer(a.nbytes)]
    try:  # in place: the sum written over a
        bufs[3].fill_u32(NAN)
        kernel("add_rms_norm", eps).launch_op(K.launch_config("add_rms_norm", dims), bufs[:3], [bufs[0], bufs[3]])
        cr.synchronize()
        s3, y3 = bufs[0].download((m, hidden), np.float32), bufs[3].download((m, hidden), np.float32)
    finally:
        for x in bufs:
            x.free()
    assert np.array_equal(s3.view(np.uint32), s.view(np.uint32)) and np.array_equal(y3.view(np.uint32),
                                                                                  y.view(np.uint32)), seed


@pytest.mark.parametrize("numel", [1 * 1536, 3 * 8960, 4097, 3])
def test_add_swiglu(numel):
    rng, seed = _rng()
    a = rng.standard_normal(numel, dtype=np.float32) * 4
    b = rng.standard_normal(numel, dtype=np.float32)
    (y,) = run("add", [a, b], [((numel,), np.float32)], dict(numel=numel))
    assert np.array_equal(y, a + b), seed
    (y,) = run("swiglu", [a, b], [((numel,), np.float32)], dict(numel=numel))
    a64 = a.astype(np.float64)
    rel, _ = rel_err(y, a64 / (1 + np.exp(-a64)) * b)
    assert rel < 1e-6, f"rel err {rel} ({seed})"


@pytest.mark.parametrize("m", [1, 37, 512])
def test_producers_write_the_gemm_fp16_input(m):
    """rms_norm and swiglu built with XH_OUT=1 write their float32 output bit for bit as the plain build does, and
    beside it the fp16 copy the GEMM_XH build reads: numpy's rounding and chunk order, and gemm_x_f16's bits (the
    conversion launch the cuda backend folds into them)."""
    rng, seed = _rng()
    hidden, ffn = 1536, 8960
    x = rng.standard_normal((m, hidden), dtype=np.float32) * 3
    g = rng.standard_normal(hidden, dtype=np.float32)
    a = rng.standard_normal((m, ffn), dtype=np.float32) * 4
    b = rng.standard_normal((m, ffn), dtype=np.float32)
    eps = (("RMS_EPS", 1e-6),)
    cases = {"rms_norm": ([x, g], dict(m=m, hidden=hidden), eps, (m, hidden)),
             "swiglu": ([a, b], dict(numel=m * ffn), (), (m, ffn))}
    for op, (inputs, dims, defines, shape) in cases.items():
        (plain,) = run(op, inputs, [(shape, np.float32)], dims, defines)
        y, xh = run(op, inputs, [(shape, np.float32), (shape, np.float16)], dims, defines + (("XH_OUT", 1),))
        assert np.array_equal(y.view(np.uint32), plain.view(np.uint32)), f"{op}: float32 output changed ({seed})"
        assert np.array_equal(xh.view(np.uint16), xh_layout(y).view(np.uint16)), f"{op}: fp16 copy ({seed})"
        conv = cr.load_op("gemm_x_f16", K.gemm_wgmma_defines(True))
        yb, xb = cr.DeviceBuffer.from_array(y), cr.DeviceBuffer(y.size * 2)
        try:
            conv.launch_op(K.launch_config("gemm_x_f16", {"m": shape[0], "k": shape[1]}), [yb], [xb])
            cr.synchronize()
            converted = xb.download(shape, np.float16)
        finally:
            yb.free()
            xb.free()
        assert np.array_equal(converted.view(np.uint16), xh.view(np.uint16)), f"{op}: gemm_x_f16 differs ({seed})"


GEMM_SWIGLU_CASES = [("Q4_K", 8960, 1536, 512), ("Q4_K", 1040, 1536, 37), ("Q6_K", 1040, 1536, 200),
                     ("Q6_K", 8960, 1536, 1), ("Q4_K", 272, 256, 130), ("Q4_K", 1040, 768, 77)]


@pytest.mark.parametrize("split", [2, 1], ids=["k split", "no k split"])
@pytest.mark.parametrize("xh", [True, False], ids=["fp16 x", "float32 x"])
@pytest.mark.parametrize("t,n,k,m", GEMM_SWIGLU_CASES)
def test_gemm_swiglu(t, n, k, m, xh, split):
    """q4k_gemm_swiglu / q6k_gemm_swiglu (the gate and up projections of a prefill step and their SwiGLU in one wgmma
    GEMM) against float64 numpy, and bit for bit against the launches they replace in the cuda backend's plan: the
    wgmma GEMM of each matrix (with the graph's zero bias), then swiglu. Built with XH_OUT=1 they write only the fp16
    copy for the down projection's GEMM (swiglu's XH_OUT copy, bit for bit) and leave y as it was. Shapes with a
    partial 64-row tile (n = 1040, 272), one token, one superblock (k = 256: one CTA of the k-split pair has none),
    three (k = 768: the pair's shares differ);
    for Q6_K the up matrix starts 2 bytes past an aligned address, so the two matrices' blocks sit differently.
    Built without the k split (GEMM_SPLIT=1, the cuda backend's tuning gemm_swiglu_split = 1) the bits are those of
    the plain GEMM built the same way (one chain of sums over k, two halves of 64 tokens staged in turn)."""
    from toolchain.cuda_backend import GEMM_OF

    if cr.compute_capability() != (9, 0):
        pytest.skip("the wgmma build is sm_90a: compute capability 9.0 only")
    rng, seed = _rng()
    x = rng.standard_normal((m, k), dtype=np.float32)
    raw = {name: random_weights(rng, t, n, k) for name in ("gate", "up")}
    off = 2 if t == "Q6_K" else 0
    gemm = GEMM_OF[MATMUL[t]]
    op = K.GEMM_SWIGLU_OF[gemm]
    defines = K.gemm_wgmma_defines(xh) | ({"GEMM_SPLIT": 1} if split == 1 else {})
    dims = {"m": m, "n": n, "k": k, "gemm_wgmma": 1, "gemm_xh": int(xh), "gemm_split": split}
    bufs = {"x": cr.DeviceBuffer.from_array(x), "gate": cr.DeviceBuffer.from_array(raw["gate"]),
            "up": cr.DeviceBuffer.from_array(np.concatenate([np.zeros(off, np.uint8), raw["up"].ravel()])),
            "zeros": cr.DeviceBuffer.from_array(np.zeros(n, np.float32)), "xh": cr.DeviceBuffer(m * k * 2)}
    for name in ("y", "g", "u", "s"):
        bufs[name] = cr.DeviceBuffer(m * n * 4)
    bufs["act_h"], bufs["s_h"] = cr.DeviceBuffer(m * n * 2), cr.DeviceBuffer(m * n * 2)
    up = bufs["up"].ptr + off
    try:
        for name in ("y", "g", "u", "s"):
            bufs[name].fill_u32(NAN)
        bufs["act_h"].fill_u8(0xFF)
        x_in = bufs["x"]
        if xh:  # the GEMM_XH build's input: x as fp16 in the fragments' order
            kernel("gemm_x_f16", tuple(K.gemm_wgmma_defines(True).items())).launch_op(
                K.launch_config("gemm_x_f16", {"m": m, "k": k}), [bufs["x"]], [bufs["xh"]])
            x_in = bufs["xh"]
        kernel(op, tuple(defines.items())).launch_op(K.launch_config(op, dims), [x_in, bufs["gate"], up], [bufs["y"]])
        plain = kernel(gemm, tuple(defines.items()))
        cfg = K.launch_config(gemm, dims)
        plain.launch_op(cfg, [x_in, bufs["gate"], bufs["zeros"]], [bufs["g"]])
        plain.launch_op(cfg, [x_in, up, bufs["zeros"]], [bufs["u"]])
        kernel("swiglu").launch_op(K.launch_config("swiglu", {"numel": m * n}), [bufs["g"], bufs["u"]], [bufs["s"]])
        cr.synchronize()
        y, s = bufs["y"].download((m, n), np.float32), bufs["s"].download((m, n), np.float32)
        bufs["y"].fill_u32(NAN)
        if xh:
            xo = tuple((defines | {"XH_OUT": 1}).items())
            kernel(op, xo).launch_op(K.launch_config(op, dims), [x_in, bufs["gate"], up], [bufs["y"], bufs["act_h"]])
            kernel("swiglu", (("XH_OUT", 1),)).launch_op(K.launch_config("swiglu", {"numel": m * n}),
                                                         [bufs["g"], bufs["u"]], [bufs["s"], bufs["s_h"]])
        cr.synchronize()
        untouched = bufs["y"].download((m, n), np.uint32)
        act_h, s_h = bufs["act_h"].download((m, n), np.float16), bufs["s_h"].download((m, n), np.float16)
    finally:
        for b in bufs.values():
            b.free()
    g64 = matmul_ref(x, raw["gate"], None, t, n, k)
    ref = g64 / (1 + np.exp(-g64)) * matmul_ref(x, raw["up"], None, t, n, k)
    err, _ = rel_err(y, ref)
    print(f"\n{op} {'fp16' if xh else 'float32'} x, split {split}, m={m} n={n} k={k}: rel err {err:.2e}")
    assert err < 3e-3, f"{err} ({seed})"  # fp16 operands (the prefill GEMMs' tolerance, tests/test_gemm_gpu.py)
    assert np.array_equal(y.view(np.uint32), s.view(np.uint32)), f"not the bits of GEMM, GEMM, swiglu ({seed})"
    if xh:
        assert np.array_equal(act_h.view(np.uint16), s_h.view(np.uint16)), f"fp16 copy differs from swiglu's ({seed})"
        assert (untouched == NAN).all(), f"the XH_OUT build wrote y ({seed})"


@pytest.mark.parametrize("vocab", [151936, 1001])
def test_argmax(vocab):
    rng, seed = _rng()
    x = rng.standard_normal((5, vocab), dtype=np.float32)
    x[1, 10] = x[1, vocab - 3] = 100.0  # tie: the first wins
    x[2, vocab - 1] = 100.0
    x[3, :] = -np.inf
    x[4, 0] = 50.0
    x[4, vocab // 2] = np.nan  # numpy: a NaN is the maximum
    (y,) = run("argmax", [x], [((5,), np.int64)], dict(m=5, vocab=vocab))
    assert np.array_equal(y, np.argmax(x, -1)), f"{y} vs {np.argmax(x, -1)} ({seed})"


def test_decode_advance_and_graph():
    nxt = cr.DeviceBuffer.from_array(np.array([5, 9, 151935], np.int64))
    tok = cr.DeviceBuffer.from_array(np.zeros(3, np.int32))
    pos = cr.DeviceBuffer.from_array(np.array([0, 10, 4096], np.int32))
    k = kernel("decode_advance")
    cfg = K.launch_config("decode_advance", dict(m=3))
    stream = cr.Stream()
    with stream.capture() as graph:
        k.launch_op(cfg, [nxt], [tok, pos], stream)
    for _ in range(3):
        graph.launch(stream)
    stream.synchronize()
    assert tok.download(3, np.int32).tolist() == [5, 9, 151935]
    assert pos.download(3, np.int32).tolist() == [3, 13, 4099]


# ---------------------------------------------------------------------------------------------------------------
# attention: numpy reference written from docs/ops.md (fp16 cache, appends before attention, GQA)

def rope_ref(x, positions, d, theta):
    half = d // 2
    inv = (np.float32(theta) ** (-np.arange(0, half, dtype=np.float32) * np.float32(2.0 / d))).astype(np.float32)
    ang = positions.astype(np.float32)[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(np.float32)


def attention_ref(q, k, v, kc, vc, positions, slots, n_heads, n_kv_heads, head_dim, rope_theta):
    m = q.shape[0]
    qr = rope_ref(q.reshape(m, n_heads, head_dim), positions, head_dim, rope_theta)
    kr = rope_ref(k.reshape(m, n_kv_heads, head_dim), positions, head_dim, rope_theta)
    vv = v.reshape(m, n_kv_heads, head_dim)
    for i in range(m):
        kc[slots[i], :, positions[i]] = kr[i].astype(np.float16)
        vc[slots[i], :, positions[i]] = vv[i].astype(np.float16)
    g = n_heads // n_kv_heads
    out = np.empty((m, n_heads, head_dim), np.float64)
    for i in range(m):
        t = positions[i] + 1
        keys = np.repeat(kc[slots[i], :, :t].astype(np.float64), g, 0)
        vals = np.repeat(vc[slots[i], :, :t].astype(np.float64), g, 0)
        s = np.einsum("hd,htd->ht", qr[i].astype(np.float64), keys) / np.sqrt(head_dim)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[i] = np.einsum("ht,htd->hd", p / p.sum(-1, keepdims=True), vals)
    return out.reshape(m, -1)


ATTN_CASES = {  # name: (slots, positions)
    "decode_pos0": ([0], [0]),
    "decode_pos5000": ([2], [5000]),
    "mixed_slots": ([1, 0, 2], [37, 4100, 5]),
    "prefill17_at100": ([1] * 17, list(range(100, 117))),
    "prefill17_at0_plus_decode": ([0] * 17 + [2], list(range(17)) + [300]),
    "decode_pos8191": ([1], [8191]),
    "decode_pos127": ([1], [127]),      # one cluster, every block's range full
    "decode_pos2048": ([2], [2048]),    # two clusters (ATTN_CLUSTER_KEYS = 2048): the cross-cluster merge
    "prefill300_at40": ([0] * 300, list(range(40, 340))),   # m > MSCR and > the block's 256 threads
    "batch8_at2047": ([0, 1, 2, 0, 1, 2, 0, 1], [2047, 3, 900, 1500, 64, 2046, 0, 511]),  # within one cluster's keys
}


def attention_case(rng, a, slots, positions, n_slots, max_seq):
    """Random q, k, v and float16 caches for rope_kv_attention, with the reference output and caches
    (scripts/device_attention.sh uses it too)."""
    h, kvh, d = a["n_heads"], a["n_kv_heads"], a["head_dim"]
    slots, positions = np.array(slots, np.int32), np.array(positions, np.int32)
    m = len(slots)
    q = rng.standard_normal((m, h * d), dtype=np.float32)
    k = rng.standard_normal((m, kvh * d), dtype=np.float32)
    v = rng.standard_normal((m, kvh * d), dtype=np.float32)
    kc = rng.standard_normal((n_slots, kvh, max_seq, d), dtype=np.float32).astype(np.float16)
    vc = rng.standard_normal((n_slots, kvh, max_seq, d), dtype=np.float32).astype(np.float16)
    kc_ref, vc_ref = kc.copy(), vc.copy()
    ref = attention_ref(q, k, v, kc_ref, vc_ref, positions, slots, **a)
    return dict(a=a, slots=slots, positions=positions, n_slots=n_slots, max_seq=max_seq, q=q, k=k, v=v, kc=kc, vc=vc,
                ref=ref, kc_ref=kc_ref, vc_ref=vc_ref)


def run_attention(c, defines: dict, op: str = "rope_kv_attention"):
    """Launch rope_kv_attention (build `defines`) on attention_case c: (out, k cache, v cache) as numpy. With op
    rope_kv_attention_addr the caches go by address: an int64 [2] buffer of their device addresses."""
    a, slots, positions, n_slots, max_seq = (c[x] for x in ("a", "slots", "positions", "n_slots", "max_seq"))
    h, d, m = a["n_heads"], a["head_dim"], len(slots)
    kcb, vcb = cr.DeviceBuffer.from_array(c["kc"]), cr.DeviceBuffer.from_array(c["vc"])
    dims = dict(m=m, n_heads=h, n_slots=n_slots, max_seq=max_seq)
    if defines.get("ATTN_KVGRID"):  # grid y: the kv heads
        dims |= dict(attn_kv_grid=1, n_kv_heads=a["n_kv_heads"])
    if "ATTN_GX" in defines:  # grid x: the build's cluster of 4
        dims["attn_gx"] = defines["ATTN_GX"]
    # the cache outputs alias the inputs: launch by hand so the same buffers are passed twice
    ins = [cr.DeviceBuffer.from_array(c[x]) for x in ("q", "k", "v")]
    pb, sb = cr.DeviceBuffer.from_array(positions), cr.DeviceBuffer.from_array(slots)
    ob = cr.DeviceBuffer(m * h * d * 4)
    ob.fill_u32(NAN)
    cfg = K.launch_config(op, dims, clusters=defines.get("ATTN_CLUSTER", 1) != 0)
    extra = []
    if op == "rope_kv_attention_addr":
        extra = [cr.DeviceBuffer.from_array(np.array([kcb.ptr, vcb.ptr], np.uint64))]
        kernel(op, tuple(sorted(defines.items()))).launch_op(cfg, [*ins, *extra, pb, sb], [ob])
    else:
        kernel(op, tuple(sorted(defines.items()))).launch_op(cfg, [*ins, kcb, vcb, pb, sb], [ob, kcb, vcb])
    cr.synchronize()
    out = ob.download((m, h * d), np.float32)
    kc_dev = kcb.download(c["kc"].shape, np.float16)
    vc_dev = vcb.download(c["vc"].shape, np.float16)
    for b in (*ins, *extra, pb, sb, ob, kcb, vcb):
        b.free()
    return out, kc_dev, vc_dev


def attention_builds(model: str, case: str, *variants: dict):
    """attention_case `case` (fresh random inputs) run on the model's default build with each variant's defines:
    (the case, its seed, one (out, k cache, v cache) per variant); the first variant's outputs all written."""
    rng, seed = _rng()
    a = ATTN[model]
    c = attention_case(rng, a, ATTN_CASES[case][0], ATTN_CASES[case][1], 3, 8192)
    base = K.defines_for("rope_kv_attention", a)
    outs = [run_attention(c, base | v) for v in variants]
    assert np.isfinite(outs[0][0]).all(), f"unwritten outputs ({seed})"
    return c, seed, outs


@pytest.mark.parametrize("case", ["decode_pos127", "decode_pos2048", "decode_pos8191", "mixed_slots",
                                  "prefill17_at0_plus_decode"])
@pytest.mark.parametrize("model", list(ATTN))
def test_attention_push_merge_equals_cluster_sync(model, case):
    """The cluster merge by st.async pushes (ATTN_PUSH=1, the default) and by cluster.sync + remote loads (0) do
    the same arithmetic in the same order: the same bits, outputs and caches."""
    _, seed, (push, sync) = attention_builds(model, case, {"ATTN_PUSH": 1}, {"ATTN_PUSH": 0})
    for x, y, what in zip(push, sync, ("out", "k cache", "v cache")):
        assert np.array_equal(x, y), f"{what} differs ({seed})"


@pytest.mark.parametrize("case", list(ATTN_CASES))
@pytest.mark.parametrize("model", list(ATTN))
def test_attention_kv_grid(model, case):
    """ATTN_KVGRID (grid y = kv heads, one cluster per (token, kv head)): the same bits as the default build where the
    cuda backend uses it (tuning attn_kv_grid): steps of more than MSCR tokens, and steps whose every row is within
    one cluster's keys; within the reference's bound for every step (one cluster over a long context instead of
    several)."""
    c, seed, (grid, default) = attention_builds(model, case, {"ATTN_KVGRID": 1}, {"ATTN_KVGRID": 0})
    rel, _ = rel_err(grid[0], c["ref"])
    assert rel < 2e-3, f"rel err {rel} ({seed})"
    same = len(c["slots"]) > K.ATTN_MSCR or max(c["positions"]) + 1 <= K.ATTN_CLUSTER_KEYS
    for x, y, what in zip(grid, default, ("out", "k cache", "v cache")):
        assert not same or np.array_equal(x, y), f"{what} differs ({seed})"
        if what != "out":
            assert np.array_equal(x, y), f"{what} differs ({seed})"


# builds: the cuda backend's (a cluster of 8 blocks), and TensorRT's (issue 16: no cluster launch; the caches by
# address as the TensorRT export passes them), and one block per (token, kv head) without a cluster (the cuda
# backend's plan for more than 16 tokens at short contexts, attn_one_block_keys), and one cluster of 4 blocks per
# (token, kv head) (its plan for batched steps whose 8-block clusters would not all be resident, attn_narrow): (op,
# clusters, extra defines)
ATTN_BUILDS = {"cluster": ("rope_kv_attention", True, {}), "no_cluster": ("rope_kv_attention", False, {}),
               "tensorrt": ("rope_kv_attention_addr", False, {}),
               "one_block": ("rope_kv_attention", False, {"ATTN_KVGRID": 1}),
               "narrow": ("rope_kv_attention", True, {"ATTN_KVGRID": 1, "ATTN_GX": 4})}


@pytest.mark.parametrize("build", list(ATTN_BUILDS))
@pytest.mark.parametrize("case", list(ATTN_CASES))
@pytest.mark.parametrize("model", list(ATTN))
def test_rope_kv_attention(model, case, build):
    rng, seed = _rng()
    a = ATTN[model]
    c = attention_case(rng, a, ATTN_CASES[case][0], ATTN_CASES[case][1], 3, 8192)
    slots, positions = c["slots"], c["positions"]
    k, kc, vc, kc_ref, vc_ref, ref = (c[x] for x in ("k", "kc", "vc", "kc_ref", "vc_ref", "ref"))

    op, clusters, extra = ATTN_BUILDS[build]
    out, kc_dev, vc_dev = run_attention(c, K.defines_for(op, a, clusters=clusters) | extra, op)
    rel, mx = rel_err(out, ref)
    print(f"attention {model} {case} {build}: rel {rel:.2e} max abs {mx:.2e} ({seed})")
    assert np.isfinite(out).all(), f"unwritten outputs ({seed})"
    assert rel < 2e-3, f"rel err {rel} ({seed})"
    written = np.zeros(kc.shape[:3], bool)
    written[slots, :, positions] = True
    assert np.array_equal(kc_dev[~written], kc[~written]) and np.array_equal(vc_dev[~written], vc[~written]), \
        f"cache changed outside the appended positions ({seed})"
    assert np.array_equal(vc_dev[written], vc_ref[written]), f"v cache append ({seed})"
    # half(RoPE(k)): numpy's float32 pow is off by one ulp in some inv_freq (16 of 64 for theta 1e6, D 128; the
    # kernel's are correctly rounded), and the angle pos*inv_freq carries that error times pos, so a value may move
    # by |angle error| * |k| besides one fp16 rounding step. Bound: one half-ulp + 1e-7 * pos * max|k| (an
    # emulation in float32 stays under a fifth of the second term).
    kd, kr = kc_dev[written].astype(np.float32), kc_ref[written].astype(np.float32)
    ulp = np.spacing(np.maximum(np.abs(kc_ref[written]), np.abs(kc_dev[written]))).astype(np.float32)
    bound = ulp + 1e-7 * float(positions.max()) * float(np.abs(k).max())
    print(f"  k cache append: {int((kd != kr).sum())} of {kd.size} values differ, max {np.abs(kd - kr).max():.2e}")
    assert np.all(np.abs(kd - kr) <= bound), f"k cache append: max diff {np.abs(kd - kr).max()} ({seed})"
