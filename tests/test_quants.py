"""toolchain.quants against gguf-py's dequantizer (an independent numpy implementation of ggml).

Equality is checked on the float32 bit patterns, so -0.0, subnormals and rounding all count.
Random tests draw a fresh seed each run and put it in every assertion message.
"""
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as ref_dequantize  # noqa: E402

from toolchain import quants as Q  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
REAL = ["qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"]
QUANT_TYPES = ["Q4_K", "Q6_K", "Q5_0", "Q8_0"]
F16_FIELDS = {"Q8_0": [0], "Q5_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}  # byte offsets of f16 scales
# RMS(dequantize(quantize(x)) - x) / RMS(x) for x ~ N(0,1); measured ~0.0054, 0.043, 0.078, 0.019
ERR_BOUND = {"Q8_0": 0.0065, "Q5_0": 0.05, "Q4_K": 0.09, "Q6_K": 0.023}


def _rng():
    seed = np.random.SeedSequence().entropy
    return np.random.default_rng(seed), f"seed={seed}"


def _bits_equal(a, b):
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _finite_f16(rng, n):
    """Random half bit patterns over the whole finite range (subnormals, -0, 65504 included)."""
    h = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    bad = (h & 0x7C00) == 0x7C00  # inf / nan
    h[bad] &= 0xBFFF  # clear the exponent's top bit: finite, same sign
    return h.view(np.uint8).reshape(n, 2)


def _random_blocks(rng, ggml_type, n):
    """Random raw blocks: every bit pattern is a valid block except the f16 scales, made finite."""
    raw = rng.integers(0, 256, (n, Q.BLOCK[ggml_type][1]), dtype=np.uint8)
    for off in F16_FIELDS.get(ggml_type, []):
        raw[:, off:off + 2] = _finite_f16(rng, n)
    return raw


@pytest.mark.parametrize("ggml_type", QUANT_TYPES)
def test_dequantize_random_blocks_match_gguf(ggml_type):
    rng, seed = _rng()
    elems = Q.BLOCK[ggml_type][0]
    rows, per_row = 37, 3  # several chunks' worth of odd sizes
    raw = _random_blocks(rng, ggml_type, rows * per_row * 20)
    shape = (20, rows, per_row * elems)
    ours = Q.dequantize(raw, ggml_type, shape)
    ref = ref_dequantize(raw.reshape(20 * rows, -1), T[ggml_type]).reshape(shape)
    assert _bits_equal(ours, ref), f"{ggml_type} {seed}"


def test_dequantize_chunk_boundaries():
    rng, seed = _rng()
    raw = _random_blocks(rng, "Q6_K", 3 * Q.CHUNK + 5)
    ours = Q.dequantize(raw, "Q6_K", (3 * Q.CHUNK + 5, 256))
    assert _bits_equal(ours, ref_dequantize(raw, T.Q6_K)), seed


def test_float_passthrough():
    rng, seed = _rng()
    bits = rng.integers(0, 1 << 16, (8, 64), dtype=np.uint16)
    assert _bits_equal(Q.dequantize(bits, "F16", (8, 64)), ref_dequantize(bits.view(np.uint8), T.F16).reshape(8, 64)), seed
    x = rng.standard_normal((3, 4, 64)).astype(np.float32)
    for t in ("F32", "F16"):
        raw = Q.quantize(x, t)
        assert raw.dtype == np.uint8 and raw.shape == (3, 4, Q.row_bytes(t, 64))
        y = Q.dequantize(raw, t, x.shape)
        assert _bits_equal(y, x.astype(np.float16 if t == "F16" else np.float32).astype(np.float32)), f"{t} {seed}"
        assert _bits_equal(y, ref_dequantize(raw, T[t]).reshape(x.shape)), f"{t} {seed}"


@pytest.mark.parametrize("ggml_type", QUANT_TYPES)
def test_quantize_error_and_format(ggml_type):
    rng, seed = _rng()
    x = rng.standard_normal((2, 32, 2048)).astype(np.float32)
    raw = Q.quantize(x, ggml_type)
    assert raw.dtype == np.uint8 and raw.shape == (2, 32, Q.row_bytes(ggml_type, 2048))
    y = Q.dequantize(raw, ggml_type, x.shape)
    # format validity: gguf reads our bytes to the same values
    assert _bits_equal(y, ref_dequantize(raw, T[ggml_type]).reshape(x.shape)), f"{ggml_type} {seed}"
    rel = float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2)))
    assert rel < ERR_BOUND[ggml_type], f"{ggml_type} rel rms err {rel:.4f} >= {ERR_BOUND[ggml_type]} {seed}"


@pytest.mark.parametrize("ggml_type", QUANT_TYPES)
def test_quantize_edge_cases(ggml_type):
    rng, seed = _rng()
    k = Q.BLOCK[ggml_type][0] * 2
    x = np.stack([np.zeros(k), np.full(k, 0.5), np.full(k, -3.0), rng.standard_normal(k) * 1e-3,
                  rng.standard_normal(k) * 100, np.abs(rng.standard_normal(k)) + 5]).astype(np.float32)
    y = Q.dequantize(Q.quantize(x, ggml_type), ggml_type, x.shape)
    assert np.isfinite(y).all(), f"{ggml_type} {seed}"
    assert not y[0].any(), ggml_type
    rel = np.sqrt(np.mean((y - x) ** 2, axis=1) / np.maximum(np.mean(x ** 2, axis=1), 1e-30))
    assert (rel[1:] < 4 * ERR_BOUND[ggml_type]).all(), f"{ggml_type} {rel} {seed}"


def test_errors():
    with pytest.raises(ValueError, match=r"Q2_K.*Q4_K"):
        Q.dequantize(np.zeros(84, np.uint8), "Q2_K", (256,))
    with pytest.raises(ValueError, match="Q2_K"):
        Q.quantize(np.zeros(256, np.float32), "Q2_K")
    with pytest.raises(ValueError, match="multiple of 256"):
        Q.row_bytes("Q4_K", 100)
    with pytest.raises(ValueError, match="bytes"):
        Q.dequantize(np.zeros(143, np.uint8), "Q4_K", (256,))
    assert Q.row_bytes("Q6_K", 1536) == 6 * 210 and Q.row_bytes("F16", 7) == 14


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("name", REAL)
def test_real_file_every_tensor_matches_gguf(name):
    path = MODELS / name
    if not path.exists():
        pytest.skip(f"{path} not present (make model)")
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        ggml_type = t.tensor_type.name
        shape = tuple(int(s) for s in reversed(t.shape))
        k = shape[-1]
        rows = int(np.prod(shape[:-1]))
        raw = t.data.reshape(-1).view(np.uint8).reshape(rows, Q.row_bytes(ggml_type, k))
        step = max(1, (1 << 22) // k)  # ~4M elements per comparison
        for s in range(0, rows, step):
            part = raw[s:s + step]
            ours = Q.dequantize(part, ggml_type, (len(part), k))
            ref = ref_dequantize(part, t.tensor_type).reshape(len(part), k)
            assert _bits_equal(ours, ref), f"{name}: {t.name} ({ggml_type}) rows {s}..{s + len(part)}"
