"""ggml block formats in plain numpy: dequantize (bit-identical to ggml / gguf-py) and simple quantizers.

A ggml tensor row of k elements is k/elems blocks laid end to end; every block is self-contained
(its own scales), so a whole tensor is just an array of blocks [n_blocks, bytes] and every format
below is a function of one such array, vectorised over blocks. Tensors are processed a chunk of
blocks at a time so that temporaries stay small (cache-sized) however large the tensor is.

Arithmetic is float32 in ggml's order (e.g. Q4_K: (d*sc)*q - (dmin*m)). The formats are built so
this is exact: an f16 scale has an 11-bit mantissa and the integer factors need at most 13 bits, so
every product fits float32's 24 bits; the only rounding anywhere is Q4_K's final subtraction, done
once, correctly rounded. Hence results equal ggml's bit for bit.
"""
import numpy as np

BLOCK = {"F32": (1, 4), "F16": (1, 2), "Q4_K": (256, 144), "Q6_K": (256, 210), "Q5_0": (32, 22), "Q8_0": (32, 34)}
SUPPORTED = tuple(BLOCK)
CHUNK = 4096  # blocks per step: ~1M elements, keeps each temporary a few MiB


def _check(ggml_type):
    if ggml_type not in BLOCK:
        raise ValueError(f"unsupported ggml type {ggml_type!r}; supported: {', '.join(SUPPORTED)}")
    return BLOCK[ggml_type]


def row_bytes(ggml_type: str, k: int) -> int:
    elems, nbytes = _check(ggml_type)
    if k % elems:
        raise ValueError(f"{ggml_type} rows must be a multiple of {elems} elements, got {k}")
    return k // elems * nbytes


def _f16(b):
    """Bytes [n, 2] holding a little-endian half -> float32 [n, 1] (exact)."""
    return b.view(np.float16).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# dequantizers: b is uint8 [n, block bytes], out is float32 [n, block elems]

def _deq_q8_0(b, out):
    """Q8_0 = f16 d, int8 q[32]; x = q*d. The simplest format: one scale per 32 values."""
    np.multiply(b[:, 2:].view(np.int8), _f16(b[:, :2]), out=out)


def _deq_q5_0(b, out):
    """Q5_0 = f16 d, u32 qh, u8 qs[16]; x = d*(q-16) with q 5 bits.
    The low 4 bits are nibbles: qs[j] holds element j (low) and j+16 (high), so each half of the
    block is one contiguous run of nibbles. The 5th bit of element j is bit j of the little-endian
    qh, which lets a CPU spread it with one shift per element."""
    n = len(b)
    qs = b[:, 6:22]
    q = np.empty((n, 2, 16), np.uint8)
    np.bitwise_and(qs, 0x0F, out=q[:, 0])
    np.right_shift(qs, 4, out=q[:, 1])
    q = q.reshape(n, 32)
    hi = np.unpackbits(b[:, 2:6], axis=1, bitorder="little")  # bit j of qh -> element j
    q |= hi << 4
    qi = q.view(np.int8)
    qi -= 16
    np.multiply(qi, _f16(b[:, :2]), out=out)


def _q4_k_scales(s):
    """Unpack the 12-byte Q4_K/Q5_K scale field into 8 six-bit scales and 8 six-bit mins.
    Sub-blocks 0-3 keep scale and min in the low 6 bits of bytes 0-3 and 4-7; sub-blocks 4-7 keep
    their low 4 bits in the nibbles of bytes 8-11 and their top 2 bits in the spare top bits of
    bytes 0-7 (16 six-bit numbers in 12 bytes)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _deq_q4_k(b, out):
    """Q4_K = f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) x 8, u8 qs[128]; 8 sub-blocks of 32.
    x = (d*sc)*q - (dmin*m): an affine map per 32 values whose two parameters are themselves
    quantized against block-wide d/dmin (the "k" in k-quants: a second level of scales).
    qs[32p + l] holds element l of sub-block 2p (low nibble) and of sub-block 2p+1 (high nibble)."""
    n = len(b)
    sc, mn = _q4_k_scales(b[:, 4:16])
    dl = (_f16(b[:, 0:2]) * sc).reshape(n, 8, 1)
    ml = (_f16(b[:, 2:4]) * mn).reshape(n, 8, 1)
    qs = b[:, 16:].reshape(n, 4, 1, 32)
    q = np.empty((n, 4, 2, 32), np.uint8)
    np.bitwise_and(qs, 0x0F, out=q[:, :, :1])
    np.right_shift(qs, 4, out=q[:, :, 1:])
    o = out.reshape(n, 8, 32)
    np.multiply(dl, q.reshape(n, 8, 32), out=o)
    o -= ml


def _deq_q6_k(b, out):
    """Q6_K = u8 ql[128], u8 qh[64], int8 scales[16], f16 d; 16 sub-blocks of 16; x = (d*sc)*(q-32).
    Each 128-element half uses ql[64h:64h+64] and qh[32h:32h+32]: element 32k+l (k=0..3, l<32)
    takes its low 4 bits from ql[l + 32*(k&1)] (low nibble for k<2, high for k>=2) and its top
    2 bits from bits 2k..2k+1 of qh[l], so a SIMD lane of 32 bytes decodes 4 runs of 32 at once."""
    n = len(b)
    ql = b[:, :128].reshape(n, 2, 2, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    q = np.empty((n, 2, 4, 32), np.uint8)
    np.bitwise_and(ql, 0x0F, out=q[:, :, :2])
    np.right_shift(ql, 4, out=q[:, :, 2:])
    h = qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    h &= 3
    h <<= 4
    q |= h
    qi = q.view(np.int8)
    qi -= 32
    dl = (_f16(b[:, 208:210]) * b[:, 192:208].view(np.int8)).reshape(n, 16, 1)
    np.multiply(dl, qi.reshape(n, 16, 16), out=out.reshape(n, 16, 16))


_DEQ = {"Q8_0": _deq_q8_0, "Q5_0": _deq_q5_0, "Q4_K": _deq_q4_k, "Q6_K": _deq_q6_k}


def dequantize(raw: np.ndarray, ggml_type: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw ggml bytes of a tensor (any shape/dtype, C-contiguous) -> float32 array of `shape`,
    numpy order, last dim = the contiguous row."""
    elems, nbytes = _check(ggml_type)
    shape = tuple(int(s) for s in shape)
    n_el = int(np.prod(shape))
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    expect = n_el // shape[-1] * row_bytes(ggml_type, shape[-1])
    if raw.size != expect:
        raise ValueError(f"{ggml_type} tensor of shape {shape} needs {expect} bytes, got {raw.size}")
    if ggml_type == "F32":
        return raw.view(np.float32).reshape(shape).copy()
    if ggml_type == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    blocks = raw.reshape(-1, nbytes)
    out = np.empty((len(blocks), elems), np.float32)
    fn = _DEQ[ggml_type]
    for s in range(0, len(blocks), CHUNK):
        fn(blocks[s:s + CHUNK], out[s:s + CHUNK])
    return out.reshape(shape)


# ----------------------------------------------------------------------------------------------
# quantizers: x is float32 [n, block elems] -> uint8 [n, block bytes]. Round-to-nearest with the
# scale fitted to each (sub-)block's range: not llama.cpp's error-minimising search, but valid
# blocks with bounded error.

def _inv(d):
    """1/d, with 0 where d == 0 (an all-zero block quantizes to q = 0)."""
    return np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)


def _to_f16_bytes(d):
    return d.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _q_q8_0(x):
    """Symmetric: d = amax/127 so the largest |x| lands on +-127."""
    d = (np.abs(x).max(1, keepdims=True) / 127).astype(np.float16)
    q = np.clip(np.rint(x * _inv(d.astype(np.float32))), -127, 127).astype(np.int8)  # tiny d is subnormal, inexact
    return np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=1)


def _q_q5_0(x):
    """As ggml: d = -max/16 with max the signed value of largest magnitude, so it maps to q=0
    (value -16) and the asymmetric 5-bit range [-16, 15] is used fully on that side."""
    mx = np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1)
    d = (mx / -16).astype(np.float16)
    q = np.clip(np.rint(x * _inv(d.astype(np.float32))) + 16, 0, 31).astype(np.uint8)
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    qh = np.packbits(q >> 4, axis=1, bitorder="little")  # bit j <- element j
    return np.concatenate([d.view(np.uint8), qh, qs], axis=1)


def _q_q4_k(x):
    """Per 32-sub-block affine fit: offset = min(x, 0) (ggml stores a non-negative min that is
    subtracted), step = range/15; then the 8 steps and 8 offsets get 6-bit codes against the
    block-wide d = max step/63, dmin = max offset/63, and q is rounded against the *coded* scales
    so the error of the 6-bit scale is absorbed by q where possible."""
    n = len(x)
    xs = x.reshape(n, 8, 32)
    lo = np.minimum(xs.min(2), 0)
    step = (xs.max(2) - lo) / 15
    d = (step.max(1) / 63).astype(np.float16)
    dmin = ((-lo).max(1) / 63).astype(np.float16)
    sc = np.clip(np.rint(step * _inv(d.astype(np.float32))[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(-lo * _inv(dmin.astype(np.float32))[:, None]), 0, 63).astype(np.uint8)
    dl = d.astype(np.float32)[:, None] * sc
    ml = dmin.astype(np.float32)[:, None] * mn
    q = np.clip(np.rint((xs + ml[..., None]) * _inv(dl)[..., None]), 0, 15).astype(np.uint8)
    q = q.reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    scales = np.concatenate([
        (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6),
        (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], axis=1)
    return np.concatenate([_to_f16_bytes(d), _to_f16_bytes(dmin), scales, qs], axis=1)


def _q_q6_k(x):
    """Per 16-sub-block symmetric scale = -max/32 (largest-magnitude value lands on -32, the long
    side of [-32, 31]); the 16 scales are coded as int8 against d = -max scale/128 likewise."""
    n = len(x)
    xs = x.reshape(n, 16, 16)
    mx = np.take_along_axis(xs, np.abs(xs).argmax(2)[..., None], 2)[..., 0]
    scale = mx / -32
    smax = np.take_along_axis(scale, np.abs(scale).argmax(1)[:, None], 1)[:, 0]
    d = (smax / -128).astype(np.float16)
    sc = np.clip(np.rint(scale * _inv(d.astype(np.float32))[:, None]), -128, 127).astype(np.int8)
    dl = d.astype(np.float32)[:, None] * sc
    q = (np.clip(np.rint(xs * _inv(dl)[..., None]), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(n, 2, 4, 32)  # half, k, l: element 32k+l of each half (see _deq_q6_k)
    lo = q & 0x0F
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), _to_f16_bytes(d)], axis=1)


_QUANT = {"Q8_0": _q_q8_0, "Q5_0": _q_q5_0, "Q4_K": _q_q4_k, "Q6_K": _q_q6_k}


def quantize(x: np.ndarray, ggml_type: str) -> np.ndarray:
    """float32 [..., k] -> uint8 [..., row_bytes(k)] in exact ggml block layout."""
    elems, nbytes = _check(ggml_type)
    x = np.ascontiguousarray(x, dtype=np.float32)
    rb = row_bytes(ggml_type, x.shape[-1])
    if ggml_type == "F32":
        return x.view(np.uint8).reshape(*x.shape[:-1], rb).copy()
    if ggml_type == "F16":
        return x.astype(np.float16).view(np.uint8).reshape(*x.shape[:-1], rb)
    blocks = x.reshape(-1, elems)
    out = np.empty((len(blocks), nbytes), np.uint8)
    for s in range(0, len(blocks), CHUNK):
        out[s:s + CHUNK] = _QUANT[ggml_type](blocks[s:s + CHUNK])
    return out.reshape(*x.shape[:-1], rb)
