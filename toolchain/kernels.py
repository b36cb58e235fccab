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
shared memory are constants (static shared memory, but for the GEMMs and the batched decode-core builds; the
attention, argmax and k-split matmul kernels carry a compile-time cluster shape, so a plain cuLaunchKernel launches
them).

The projections (q4k/q6k/q5_0/q8_0_matmul and the fused matmul_add, rms_norm_qkv, rms_norm_swiglu) share one
matrix-vector core, plugins/qmv.cuh; `matmul_split` and `qmv_grid_x` below are its work decomposition.
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
FUSED_OPS = ("rms_norm_qkv", "matmul_add", "rms_norm_swiglu")  # toolchain/fusion.py
# Tensor-core prefill GEMMs (plugins/quant_gemm.cu): block 256, tile 128 tokens x 96 rows, k split over a
# compile-time cluster of 2 (grid z), dynamic shared memory per format (above 48 KB: the runtime raises the limit).
GEMM_OPS = ("q4k_gemm", "q6k_gemm")
# The gate and up projections of a prefill step and their SwiGLU in one wgmma GEMM (quant_gemm.cu; runtime-only, the
# cuda backend's tuning gemm_swiglu): each CTA 64 rows of each matrix, so grid x = cdiv(ffn, 64).
GEMM_SWIGLU_OF = {"q4k_gemm": "q4k_gemm_swiglu", "q6k_gemm": "q6k_gemm_swiglu"}
GEMM_SWIGLU_OPS = tuple(GEMM_SWIGLU_OF.values())
GEMM_SWIGLU_BASE = {v: k for k, v in GEMM_SWIGLU_OF.items()}  # the GEMM of the same format
GEMM_SWIGLU_ROWS = 64
PREFILL_ATTENTION_OPS = ("rope_kv_append", "prefill_attention")
PREFILL_ROWS_PER_BLOCK = 64  # prefill_attention: (token, q head) rows per block, 16 per warp (PA_WARPS)
# prefill_attention's key splits (the cuda backend's grid z; plugins/prefill_attention.cu "Split keys"): at most
# PREFILL_KV_SPLITS blocks share a row block's keys, one per PA_SPLIT_TILES (16) tiles of 32 keys it has: a row block
# of up to 16 tiles uses one (no scratch, the unsplit bits), of 17 two (9 + 8 tiles), of 60 or more four.
PREFILL_KV_SPLITS = 4
GEMM_ROWS, GEMM_TOKENS, GEMM_THREADS = 96, 128, 256
GEMM_SMEM = {"q4k_gemm": 70656, "q6k_gemm": 89088}
# The same ops built with GEMM_WGMMA=1 (sm_90a: plugins/quant_gemm_wgmma.cuh): 128 weight rows per CTA (two
# warpgroups), 3 swizzled x buffers. The cuda backend's tuning "gemm_wgmma" picks it on compute capability 9.0.
GEMM_WGMMA_ROWS = 128
GEMM_WGMMA_SMEM = {"q4k_gemm": 95232, "q6k_gemm": 119808}
# ... and with GEMM_XH=1 (x as the fp16 copy gemm_x_f16 makes, copied two substeps ahead: 4 x buffers)
GEMM_XH_SMEM = {"q4k_gemm": 111616, "q6k_gemm": 136192}
# Tensor-core GEMMs for few tokens (batched decode; plugins/quant_gemm_skinny.cu): block 256, tile 16 tokens x 128
# rows (swiglu: 64 gate + 64 up rows), k split over a compile-time cluster of SK_SPLIT CTAs (grid z, skinny_split), a
# ring of 2 stages (two CTAs per SM), x made fp16 fragments once per stage. One per matvec op of Q4_K / Q6_K weights,
# with its ABI (skinny_of).
SKINNY_OF = {"q4k_matmul": "q4k_gemm_skinny", "q6k_matmul": "q6k_gemm_skinny", "matmul_add": "matmul_add_skinny",
             "rms_norm_qkv": "rms_norm_qkv_skinny", "rms_norm_swiglu": "rms_norm_swiglu_skinny"}
SKINNY_OPS = tuple(SKINNY_OF.values())
SKINNY_BASE = {v: k for k, v in SKINNY_OF.items()}  # the op each one replaces
# the fused ones, which can take their RMSNorm's sums of x^2 from the matmul_add_skinny before them (SK_SSQ_IN; the
# cuda backend's ssq_by_producer, CudaBackend._link_ssq)
SSQ_CONSUMERS = ("rms_norm_qkv_skinny", "rms_norm_swiglu_skinny")
SKINNY_TYPES = ("Q4_K", "Q6_K")
SKINNY_ROWS, SKINNY_TOKENS, SKINNY_MAX_SPLIT = 128, 16, 8
# plugins/quant_gemm_skinny.cu's defaults of SK_STAGES, SK_XF16, SK_WARPS, SK_WARPRING (each warp its own rows'
# ring) and SK_XSB (superblocks of x fragments made at once) (tests/test_kernels_compile.py checks them)
SKINNY_STAGES, SKINNY_XF16, SKINNY_WARPS = 2, 1, 8
SKINNY_WARPRING, SKINNY_XSB = 1, 4
SKINNY_THREADS = 32 * SKINNY_WARPS
SKINNY_CTA_COST = 2  # skinny_split's cost model
SKINNY_CTAS_PER_SM = 2  # resident CTAs of SKINNY_SMEM (228 KB per SM, 1 KB reserved per CTA: checked below)
_FAMILY = {
    **{op: "quant_matmul" for op in MATMUL_OPS},
    **{op: "quant_gather" for op in GATHER_OPS},
    "rms_norm": "rms_norm",
    "add_rms_norm": "rms_norm",  # runtime-only: a prompt step's residual Add and the RMSNorm of its sum at once
    "add": "elementwise",
    "swiglu": "elementwise",
    "argmax": "argmax",
    "rope_kv_attention": "rope_kv_attention",
    # the TensorRT export's attention: the same kernel with the layer's KV cache passed by address (an int64 [2]
    # input of device addresses, ATTN_ADDR) instead of as cache tensors; written in place, never an output
    "rope_kv_attention_addr": "rope_kv_attention",
    "decode_advance": "decode_advance",  # runtime-only: lets a captured CUDA graph advance tokens and positions
    # runtime-only: device-side sampling in the decode step (penalties before the argmax, the draw after it, the
    # log-probabilities after the draw where a request asks)
    "apply_penalties": "sampling",
    "sample_tokens": "sampling",
    "token_logprobs": "sampling",
    **{op: op for op in FUSED_OPS},
    **{op: "quant_gemm" for op in GEMM_OPS},  # prompt prefill: tensor cores, same ABI as the matmuls
    **{op: "quant_gemm" for op in GEMM_SWIGLU_OPS},  # runtime-only: gate, up and SwiGLU of a prefill step at once
    "gemm_x_f16": "quant_gemm",  # runtime-only: a GEMM input as fp16 in the fragments' order (the GEMM_XH build's x)
    **{op: "quant_gemm_skinny" for op in SKINNY_OPS},  # batched decode: tensor cores, the ABI of the op replaced
    # prompt prefill of one slot: the attention node as RoPE+append then tiled causal attention (runtime-only pair)
    **{op: "prefill_attention" for op in PREFILL_ATTENTION_OPS},
}
KERNEL_OPS: tuple[str, ...] = tuple(_FAMILY)
TENSORRT_ONLY_OPS = ("rope_kv_attention_addr",)  # not in the cuda backend's default plans (tensorrt_builds)
ATTENTION_OPS = ("rope_kv_attention", "rope_kv_attention_addr")

# ggml type name -> (block elements, block bytes, the C++ type name of plugins/ggml_blocks.cuh used in -D defines)
GGML_TYPES = {"Q4_K": (256, 144, "Q4K"), "Q6_K": (256, 210, "Q6K"), "Q5_0": (32, 22, "Q50"), "Q8_0": (32, 34, "Q80")}
MATMUL_TYPE = {"q4k_matmul": "Q4_K", "q6k_matmul": "Q6_K", "q5_0_matmul": "Q5_0", "q8_0_matmul": "Q8_0"}

# Constants plugins/qmv.cuh is written for (its header states them).
QMV_THREADS, QMV_WARPS, QMV_TOKENS_PER_BLOCK = 192, 6, 4
QMV_SMS, QMV_BLOCKS_PER_SM = 132, 4  # H100 / H200 SXM; 4 blocks of 192 threads x 80 registers (qmv.cuh QMV_MINB)
MATMUL_TOKENS_PER_BLOCK = QMV_TOKENS_PER_BLOCK
MATMUL_MAX_BLOCKS = QMV_SMS * QMV_BLOCKS_PER_SM  # one resident wave; rounds stride over the rest
# cluster k-split: at most 3 blocks (clusters of 4 did not all fit in one wave: 92 active of 96, run 4), each
# with >= 512 elements of k
QMV_MAX_SPLIT, QMV_MIN_SPLIT_ELEMS = 3, 512
ATTN_SPLITS, ATTN_THREADS = 8, 256
ATTN_MSCR = 16  # plugins/rope_kv_attention.cu MSCR: steps of more tokens run each token's attention as one cluster
ATTN_CLUSTER_KEYS = 2048  # plugins/rope_kv_attention.cu, cluster build: one more cluster per this many keys
# steps of more than ATTN_MSCR tokens within this many keys: the attention as one block per (token, kv head)
# (the cuda backend's attn_one_block_keys). H100, m = 32, against one cluster: +13 / +12 / +12 / +4% at context
# 128 / 512 / 1024 / 4096 (docs/perf-notes.md); beyond 4096 not timed, so the cluster there
ATTN_ONE_BLOCK_KEYS = 4096
ARGMAX_SPLITS, ARGMAX_THREADS = 8, 512
# plugins/sampling.cu: a row's logits over a cluster of SAMPLE_SPLITS blocks, SAMPLE_PER per thread in registers
SAMPLE_SPLITS, SAMPLE_THREADS, SAMPLE_PER, PENALTY_THREADS = 8, 1024, 20, 64
SAMPLE_MAX_VOCAB = SAMPLE_SPLITS * SAMPLE_THREADS * SAMPLE_PER
LOGPROB_TOP = 20  # token_logprobs: the most likely tokens listed per row (sampling.MAX_LOGPROBS)
LOGPROB_WORDS = 2 + 2 * LOGPROB_TOP  # int32 words per row: token's logprob, count, (id, logprob) pairs


@dataclass(frozen=True)
class LaunchConfig:
    grid: tuple  # (gx, gy, gz): ints, or symbolic expressions built by `ops`
    block: tuple[int, int, int]
    shared_mem: int  # dynamic shared memory bytes (0 but for the prefill GEMMs and batched decode-core builds)
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


def _type_name(t) -> str:
    t = t.decode() if isinstance(t, bytes) else str(t)
    if t not in GGML_TYPES:
        raise UserError(f"unsupported ggml weight type {t!r}; supported: {', '.join(GGML_TYPES)}")
    return t


def _type_define(t) -> str:
    return GGML_TYPES[_type_name(t)][2]


def matmul_split(n: int, k: int, ggml_type: str) -> int:
    """Cluster size C that splits k of an [n, k] projection (plugins/qmv.cuh, define KSPLIT): the largest C <= 3 that
    keeps one group (2 rows) per resident warp (n/2 * C <= warps resident on the GPU) and >= 512 elements of k per
    block, so that short-n long-k matrices (ffn_down: 1536 x 8960) still fill every SM while each block quantizes
    only its share of x. n and k are static ints (weight shapes)."""
    elems = GGML_TYPES[_type_name(ggml_type)][0]
    n, k = int(n), int(k)
    groups, resident = -(-n // 2), QMV_SMS * QMV_BLOCKS_PER_SM * QMV_WARPS
    best = 1
    for c in range(2, QMV_MAX_SPLIT + 1):
        if groups * c <= resident and k // c >= QMV_MIN_SPLIT_ELEMS and k // elems >= c:
            best = c
    return best


def skinny_of(op: str, attrs: dict) -> str | None:
    """The GEMM for few tokens that replaces op (same ABI), or None where op has a weight type it lacks (Q5_0,
    Q8_0: the 0.5B's) or is no projection."""
    if op not in SKINNY_OF or (op in FUSED_OPS and any(t not in SKINNY_TYPES for t in _weight_types(op, attrs))):
        return None
    return SKINNY_OF[op]


def _skinny_shape(op: str, dims: dict) -> tuple[int, int]:
    """(tiles along grid x, k) of a GEMM for few tokens: 128 rows per tile (swiglu: 64 output rows)."""
    if op == "rms_norm_qkv_skinny":
        q, kv = int(_dim(dims, "q_dim")), int(_dim(dims, "kv_dim"))
        return -(-q // SKINNY_ROWS) + 2 * -(-kv // SKINNY_ROWS), int(_dim(dims, "hidden"))
    if op == "rms_norm_swiglu_skinny":
        return -(-int(_dim(dims, "ffn")) // (SKINNY_ROWS // 2)), int(_dim(dims, "hidden"))
    return -(-int(_dim(dims, "n", "out_features")) // SKINNY_ROWS), int(_dim(dims, "k", "in_features"))


def skinny_smem_bytes(stages: int = SKINNY_STAGES, xf16: int = SKINNY_XF16, warpring: int = SKINNY_WARPRING,
                      xsb: int = SKINNY_XSB) -> int:
    """plugins/quant_gemm_skinny.cu SMEM_BYTES: per stage x (16 rows of 272 floats), the norm weight (256 floats) and
    the weights (128 rows of the widest format's 240 bytes); the warps' scales (128 rows x 64 bytes); two [16] float
    arrays; with SK_XF16 the stage's x fragments (16 chunks x 32 lanes x 16 bytes). SK_WARPRING: no x or norm stages,
    the x fragments of xsb superblocks."""
    if warpring:
        return stages * 128 * 240 + 128 * 64 + 2 * 64 + xsb * 16 * 32 * 16
    return stages * (16 * 272 * 4 + 256 * 4 + 128 * 240) + 128 * 64 + 2 * 64 + (16 * 32 * 16 if xf16 else 0)


SKINNY_SMEM = skinny_smem_bytes()
assert SKINNY_CTAS_PER_SM * (SKINNY_SMEM + 1024) <= 228 * 1024 < (SKINNY_CTAS_PER_SM + 1) * (SKINNY_SMEM + 1024)


def skinny_dims(defines: dict) -> dict:
    """The launch-relevant defines of a GEMM-for-few-tokens build (its stages, SK_XF16, SK_WARPS, SK_WARPRING and
    SK_XSB, its cluster size SK_SPLIT: defines_for's by the shape, or a tuning's), as launch_config's dims."""
    return {"sk_stages": int(defines.get("SK_STAGES", SKINNY_STAGES)),
            "sk_xf16": int(defines.get("SK_XF16", SKINNY_XF16)), "sk_warps": int(defines.get("SK_WARPS", SKINNY_WARPS)),
            "sk_split": int(defines.get("SK_SPLIT", 1)), "sk_warpring": int(defines.get("SK_WARPRING", SKINNY_WARPRING)),
            "sk_xsb": int(defines.get("SK_XSB", SKINNY_XSB))}


def skinny_split(tiles: int, k: int) -> int:
    """Cluster size S that splits k over S CTAs in plugins/quant_gemm_skinny.cu (define SK_SPLIT, grid z), for a
    projection of `tiles` CTA tiles along grid x. SKINNY_CTAS_PER_SM CTAs fit an SM (their rings of stages fill the
    shared memory), so the time is about waves x (superblocks per CTA + SKINNY_CTA_COST, a CTA's prologue, norm pass
    and reduction, guessed as 2 superblocks): S minimizes cdiv(tiles S, SMs x CTAs per SM) * (cdiv(nb, S) +
    SKINNY_CTA_COST), the smallest S on ties. tiles and k are static ints. (Counted with one CTA per SM, the rule
    gave the SwiGLU's 140 tiles S = 2: 280 CTAs in 264 places; S = 1 was 0.3-5.6% faster at m = 8-32 on the H100.)"""
    tiles, nb = int(tiles), int(k) // 256
    cost = {s: -(-tiles * s // (QMV_SMS * SKINNY_CTAS_PER_SM)) * (-(-nb // s) + SKINNY_CTA_COST)
            for s in range(1, min(SKINNY_MAX_SPLIT, max(nb, 1)) + 1)}
    return min(cost, key=lambda s: (cost[s], s))


def qmv_grid_x(units: int, per_block: int, cluster: int = 1, max_blocks: int = MATMUL_MAX_BLOCKS) -> int:
    """Blocks along x for `units` work groups, `per_block` of them per block and round: as many rounds as one
    resident wave (`max_blocks`) needs, then as few blocks as give every block the same number of rounds.
    A multiple of `cluster`. (The kernel accepts any grid; this one balances it.)"""
    need = -(-int(units) // per_block)  # cluster-rounds of one pass over the work
    rounds = -(-need // max(1, max_blocks // cluster))
    return -(-need // rounds) * cluster


QMV1_NBW, QMV1_BLOCKS_PER_SM, QMV1_WARPS = 6, 2, 8  # plugins/qmv1.cuh: superblocks per warp, blocks per SM
QMV1_PD_MAX = 2  # groups in flight per warp (register buffers; docs/perf-notes.md)
# Layouts measured on the H100 (docs/perf-notes.md v7, whole step against a control in the same run):
# - k beyond one warp's 6 superblocks (ffn_down, k = 8960) splits k over warps of QMV1_KSPLIT_NBW superblocks, in one
#   block of QMV1_KSPLIT_WARPS per SM (each block quantizes all of x: few, large blocks): 9 warps of 4 per row pair,
#   2 row pairs per block, +1.4% over 6 warps of 6 (12-warp blocks); 18 warps of 2 lost 0.4%.
# - the fused QKV (k <= 1536) runs 3 warps of QMV1_QKV_NBW superblocks per row pair, 4 row pairs per 12-warp block,
#   2 blocks per SM: one group per warp, its chain a third as long (+0.8% with 6-warp blocks, +0.5% more with 12);
#   the same split lost for o_proj (-2.4%) and gate/up (-4.9%).
# - gate/up (rms_norm_swiglu) in 10-warp blocks, 2 per SM: 4 rounds of groups for the 1.5B's 8960 rows instead of 5
#   with 8 warps (the buffers of Q4_K-only builds fit 96 registers): +1.3% at context 4096, level at 128 and 1024
#   (v8, runs 4 and 5; 12 warps: +1.2% at 128, level at 4096, with spills).
QMV1_KSPLIT_NBW, QMV1_KSPLIT_WARPS = 4, 18
QMV1_QKV_NBW, QMV1_QKV_WARPS, QMV1_QKV_BLOCKS_PER_SM = 2, 12, 2
QMV1_SWIGLU_WARPS = 10
# Batched decode (1 < m < the GEMM's threshold) on the same core: a block computes QMV1_MT tokens, each weight decoded
# once for all of them (plugins/qmv1.cuh); m is rounded up to a power of two, larger m take grid.y blocks of the most.
QMV1_MT_MAX = 8
_WEIGHT_TYPE_ATTRS = {"matmul_add": ("w_type",), "rms_norm_qkv": ("q_type", "k_type", "v_type"),
                      "rms_norm_swiglu": ("gate_type", "up_type")}


def _weight_types(op: str, attrs: dict) -> list[str]:
    return [MATMUL_TYPE[op]] if op in MATMUL_OPS else [_type_name(attrs[a]) for a in _WEIGHT_TYPE_ATTRS[op]]


def decode_tokens(m: int) -> int:
    """Tokens per block of the decode core for a step of m tokens (QMV1_MT): 1 for m = 1, else m rounded up to a
    power of two, at most QMV1_MT_MAX."""
    return 1 if m <= 1 else min(QMV1_MT_MAX, 1 << (int(m) - 1).bit_length())


def qmv1_smem_bytes(kw: int, nbw: int, g: int, mt: int) -> int:
    """Dynamic shared memory of a decode-core build with QMV1_MT = mt > 1: plugins/qmv1.cuh's Smem, field by field
    (x in int16 with 8 pad elements per 64, a scale and a sum per 16 elements, the k parts' sums, the norm's sums),
    padded to 16 bytes. The kernel traps if it is launched with less."""
    kmax = 256 * nbw * kw
    size = mt * (kmax * 9 // 8) * 2 + 2 * mt * (kmax // 16) * 4 + 2 * g * kw * 2 * mt * 4 + mt * kw * g * 4
    return -(-size // 16) * 16


def decode_core(op: str, attrs: dict, k: int, mt: int = 1) -> dict:
    """Extra defines of the decode build of a projection (plugins/qmv1.cuh: QMV1, QMV1_KW = warps sharing a row
    pair's k, QMV1_NBW = superblocks of k per warp, QMV1_PD = groups each warp has in flight, QMV1_K: k as a
    constant, QMV1_G groups per block, QMV1_MINB blocks per SM, QMV1_MT tokens per block where mt > 1), or {} where
    it does not apply (other ops, formats other than Q4_K / Q6_K, k not whole superblocks or beyond 8 warps x 1536).
    mt = 1 is the batch-1 step's build (row 0 of x alone); mt > 1 (decode_tokens) computes tokens blockIdx.y * mt
    onwards. PD is the number of groups a warp has, at most QMV1_PD_MAX (whole step on the H100: PD 2 933 tok/s, 3
    913, 4 776; a shared-memory ring of 4 instead of registers was slower: docs/perf-notes.md v6). The layouts are
    the constants above."""
    if op not in (*_WEIGHT_TYPE_ATTRS, *MATMUL_OPS) or k % 256 or k > 256 * QMV1_NBW * QMV1_WARPS:
        return {}
    if any(t not in ("Q4_K", "Q6_K") for t in _weight_types(op, attrs)):
        return {}
    nb = k // 256
    if op == "rms_norm_qkv" and nb <= QMV1_NBW:  # superblocks per warp, warps per block, blocks per SM
        nbw, warps, minb = QMV1_QKV_NBW, QMV1_QKV_WARPS, QMV1_QKV_BLOCKS_PER_SM
    elif op == "rms_norm_swiglu" and nb <= QMV1_NBW and set(_weight_types(op, attrs)) == {"Q4_K"}:
        nbw, warps, minb = QMV1_NBW, QMV1_SWIGLU_WARPS, QMV1_BLOCKS_PER_SM
    elif nb <= QMV1_NBW:
        nbw, warps, minb = QMV1_NBW, QMV1_WARPS, QMV1_BLOCKS_PER_SM
    else:
        nbw, warps, minb = QMV1_KSPLIT_NBW, QMV1_KSPLIT_WARPS, 1
    if mt >= 4 and op in ("rms_norm_qkv", "rms_norm_swiglu"):  # 4+ tokens: one block per SM, no register cap of
        minb = 1  # 2 (spills); measured on the H100: gate/up at m = 8 1,383 -> 1,011 us per step (docs/perf-notes.md)
    kw = -(-nb // nbw)
    g = max(1, warps // kw)
    dims = dict(attrs, m=1, k=k, hidden=k, n=attrs.get("out_features"), qmv1_kw=kw, qmv1_g=g, qmv1_minb=minb)
    cfg = launch_config(op, dims)
    iters = -(-_qmv1_groups(op, dims) // (cfg.grid[0] * g))
    return {"QMV1": 1, "QMV1_K": k, "QMV1_NBW": nbw, "QMV1_KW": kw, "QMV1_G": g, "QMV1_MINB": minb,
            "QMV1_PD": max(1, min(QMV1_PD_MAX, iters))} | ({"QMV1_MT": int(mt)} if mt > 1 else {})


def qmv1_dims(defines: dict) -> dict:
    """What launch_config needs of a decode-core build's defines (grid, block, shared memory)."""
    return {"qmv1_kw": int(defines["QMV1_KW"]), "qmv1_g": int(defines["QMV1_G"]),
            "qmv1_minb": int(defines["QMV1_MINB"]), "qmv1_nbw": int(defines["QMV1_NBW"]),
            "qmv1_mt": int(defines.get("QMV1_MT", 1))}


def decode_build(op: str, attrs: dict, k: int, core: bool = True, m1: bool = True, plain: bool = True,
                 clusters: bool = True, mt: int = 1) -> dict:
    """Defines of the decode build of a projection for a step of up to `mt` tokens per block (decode_tokens): the
    decode core where it applies (decode_core), else the general core, for mt = 1 without its multi-token body
    (QMV_M1). The flags switch either off, plain=False keeps the plain matmuls (lm_head) on the general core
    (scripts/decode_tuning.py); clusters as in defines_for."""
    d = defines_for(op, attrs, clusters)
    extra = decode_core(op, attrs, k, mt) if core and (plain or op not in MATMUL_OPS) else {}
    if extra:
        return {key: v for key, v in d.items() if key != "KSPLIT"} | extra
    return d | ({"QMV_M1": 1} if m1 and mt == 1 and op in MATMUL_OPS + FUSED_OPS else {})


XMERGE_CLUSTER_KEYS = 1024  # keys per attention cluster in the xmerge pair (+0.8% at 4096 over 2048, run 1 of v8)


def xmerge_defines(attn_attrs: dict, cluster_keys: int = XMERGE_CLUSTER_KEYS) -> tuple[dict, dict]:
    """Extra defines of the paired batch-1 builds (cuda backend tuning "xmerge"): the attention writes its cluster
    partials to G slots when a kv head has more than one cluster (ATTN_XMERGE), and its o projection's decode build
    merges them as it reads x (QMV1_XMERGE = G slots, QMV1_XM_D = head dim, QMV1_XM_CK = the attention's keys per
    cluster, from which it finds the number of clusters). With the cross-cluster merge off the attention's path,
    more clusters pay: the pair runs cluster_keys per cluster."""
    g = int(attn_attrs["n_heads"]) // int(attn_attrs["n_kv_heads"])
    return ({"ATTN_XMERGE": 1, "ATTN_CLUSTER_KEYS": int(cluster_keys)},
            {"QMV1_XMERGE": g, "QMV1_XM_D": int(attn_attrs["head_dim"]), "QMV1_XM_CK": int(cluster_keys)})


def xmerge_slot_floats(n_heads: int, head_dim: int) -> int:
    """Floats per partial slot: the numerators of all heads, a (max, sum) pair per head, padded to 16 bytes
    (plugins/rope_kv_attention.cu XSTR, plugins/qmv1.cuh xmerge4)."""
    return -(-(n_heads * head_dim + 2 * n_heads) // 4) * 4


def prefill_attention_scratch(m: int, n_heads: int, n_kv_heads: int, head_dim: int,
                              splits: int = PREFILL_KV_SPLITS) -> tuple[int, int]:
    """(floats of `part`, ints of `count`) that prefill_attention's split keys need for a step of up to m tokens:
    per row block (the launch's grid x * y) one slot per split of ROWS x head_dim numerators and ROWS (max, sum)
    pairs, and one counter."""
    grid = launch_config("prefill_attention", dict(m=m, n_heads=n_heads, n_kv_heads=n_kv_heads, n_slots=1,
                                                   max_seq=1)).grid
    blocks = grid[0] * grid[1]
    return blocks * splits * PREFILL_ROWS_PER_BLOCK * (head_dim + 2), blocks


def _qmv1_groups(op: str, dims: dict) -> int:
    if op == "matmul_add" or op in MATMUL_OPS:
        return -(-int(_dim(dims, "n", "out_features")) // 2)
    if op == "rms_norm_qkv":
        return -(-int(dims["q_dim"]) // 2) + 2 * -(-int(dims["kv_dim"]) // 2)
    return int(dims["ffn"])


def resident_blocks(regs: int, threads: int, sms: int, smem: int = 0) -> int:
    """Blocks of a kernel (registers per thread, threads per block, static shared memory) resident at once on `sms`
    SMs of compute capability 9.0 (64 K registers allocated per warp in multiples of 256, 2,048 threads, 227 KB of
    shared memory per SM)."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = 65536 // (per_warp * -(-threads // 32))
    by_smem = 227 * 1024 // smem if smem else 32
    return sms * min(by_regs, 2048 // threads, by_smem, 32)


def defines_for(op: str, attrs: dict, clusters: bool = True) -> dict:
    """Compile-time defines of the op's specialization from its ONNX attributes (TensorRT does not serialize them).
    clusters=False: a build that needs no thread-block cluster launch (issue 16, risk 1: TensorRT's AOT launcher
    takes grid, block and shared memory only): the matmuls without their cluster k-split, the attention with one
    block per key range (ATTN_CLUSTER=0, merged across blocks through global memory)."""
    _check_op(op)
    if op in ATTENTION_OPS + PREFILL_ATTENTION_OPS:
        d = {"N_HEADS": int(attrs["n_heads"]), "N_KV_HEADS": int(attrs["n_kv_heads"]),
             "HEAD_DIM": int(attrs["head_dim"]), "ROPE_THETA": float(attrs["rope_theta"])}
        if op == "rope_kv_attention_addr":
            d["ATTN_ADDR"] = 1
        if not clusters and op in ATTENTION_OPS:
            d["ATTN_CLUSTER"] = 0
        return d
    if op in ("rms_norm", "add_rms_norm"):
        return {"RMS_EPS": float(attrs.get("epsilon", 1e-6))}
    if op in SKINNY_OPS:  # the replaced op's type and norm defines (not its matvec k split), and the cluster the
        # shape decides (the fused ones need the model's hidden size in attrs)
        d = {k: v for k, v in defines_for(SKINNY_BASE[op], attrs).items() if k != "KSPLIT"}
        split = skinny_split(*_skinny_shape(op, attrs))
        return d | ({"SK_SPLIT": split} if split > 1 else {})
    if op in MATMUL_OPS or op == "matmul_add":
        t = MATMUL_TYPE[op] if op in MATMUL_OPS else _type_name(attrs["w_type"])
        d = {} if op in MATMUL_OPS else {"W_TYPE": _type_define(t)}
        if clusters and "in_features" in attrs and "out_features" in attrs:
            c = matmul_split(attrs["out_features"], attrs["in_features"], t)
            if c > 1:
                d["KSPLIT"] = c
        return d
    if op == "rms_norm_qkv":
        return {"RMS_EPS": float(attrs["epsilon"]), "Q_TYPE": _type_define(attrs["q_type"]),
                "K_TYPE": _type_define(attrs["k_type"]), "V_TYPE": _type_define(attrs["v_type"])}
    if op == "rms_norm_swiglu":
        return {"RMS_EPS": float(attrs["epsilon"]), "GATE_TYPE": _type_define(attrs["gate_type"]),
                "UP_TYPE": _type_define(attrs["up_type"])}
    return {}


def _dim(dims: dict, *names):
    for n in names:
        if n in dims:
            return dims[n]
    raise KeyError(f"launch_config needs one of {names} in dims, got {sorted(dims)}")


def _projection_scalars(op: str, dims: dict) -> tuple:
    """The int32 scalars of a projection op's ABI (docs/ops.md): (m, n, k) for the matmuls and matmul_add,
    (m, hidden, q_dim, kv_dim) for rms_norm_qkv, (m, hidden, ffn) for rms_norm_swiglu."""
    m = dims.get("m")
    if op == "rms_norm_qkv":
        return m, dims["hidden"], dims["q_dim"], dims["kv_dim"]
    if op == "rms_norm_swiglu":
        return m, dims["hidden"], dims["ffn"]
    return m, _dim(dims, "n", "out_features"), _dim(dims, "k", "in_features")


def launch_config(op: str, dims: dict, ops=INT_OPS, clusters: bool = True) -> LaunchConfig:
    """Grid, block, shared memory and scalar arguments of one launch. `dims`: the node's int dims (m, n, k, hidden,
    vocab, numel, n_slots, max_seq) and attributes (n_heads, ...); only m may be symbolic (with a symbolic `ops`):
    weight shapes (n, k, hidden, q_dim, kv_dim, ffn) are static ints. clusters=False: the grid of the build
    defines_for(..., clusters=False) (no k-split cluster in a matmul's grid; the attention's grid is the same but
    for an ATTN_KVGRID build, one block per (token, kv head))."""
    _check_op(op)
    m = dims.get("m")
    if "qmv1_kw" in dims:  # batch-1 build of a fused projection (decode_core, qmv1_dims): groups of 2 rows, G per
        # block. Every resident block (qmv1_minb per SM) unless fewer hold all groups: with 2 blocks per SM, equal
        # rounds per block (qmv_grid_x) would leave SMs with one block while others carry 2 x the rounds.
        kw, g, minb = int(dims["qmv1_kw"]), int(dims["qmv1_g"]), int(dims["qmv1_minb"])
        scalars = _projection_scalars(op, dims)
        blocks = min(-(-_qmv1_groups(op, dims) // g), QMV_SMS * minb)
        mt = int(dims.get("qmv1_mt", 1))
        if mt == 1:
            return LaunchConfig((blocks, 1, 1), (32 * kw * g, 1, 1), 0, scalars)
        return LaunchConfig((blocks, ops.cdiv(m, mt), 1), (32 * kw * g, 1, 1),
                            qmv1_smem_bytes(kw, int(dims["qmv1_nbw"]), g, mt), scalars)
    if op in MATMUL_OPS or op == "matmul_add":
        n, k = int(_dim(dims, "n", "out_features")), int(_dim(dims, "k", "in_features"))
        t = MATMUL_TYPE[op] if op in MATMUL_OPS else _type_name(dims["w_type"])
        c = matmul_split(n, k, t) if clusters else 1  # the kernel's KSPLIT (defines_for); a kernel built without it
        # accepts any grid
        return LaunchConfig((qmv_grid_x(-(-n // 2), QMV_WARPS, c), ops.cdiv(m, QMV_TOKENS_PER_BLOCK), 1),
                            (QMV_THREADS, 1, 1), 0, (m, n, k))
    if op == "rope_kv_append":
        return LaunchConfig((m, 1, 1), (128, 1, 1), 0, (m, _dim(dims, "n_slots"), _dim(dims, "max_seq", "max_seq_len")))
    if op == "prefill_attention":
        group = int(_dim(dims, "n_heads")) // int(_dim(dims, "n_kv_heads"))  # rows = (token, q head of a kv head)
        return LaunchConfig((ops.cdiv(m * group, PREFILL_ROWS_PER_BLOCK), _dim(dims, "n_kv_heads"),
                             int(dims.get("pa_splits", 1))),  # more splits need their scratch: the caller's choice
                            (PREFILL_ROWS_PER_BLOCK * 2, 1, 1), 0,
                            (m, _dim(dims, "n_slots"), _dim(dims, "max_seq", "max_seq_len")))
    if op in GEMM_OPS + GEMM_SWIGLU_OPS:  # the gate/up/SwiGLU ones: wgmma builds only, their format's GEMM's memory
        n, k = int(_dim(dims, "n", "out_features")), int(_dim(dims, "k", "in_features"))
        if dims.get("gemm_wgmma") or op in GEMM_SWIGLU_OPS:
            swiglu = op in GEMM_SWIGLU_OPS
            smem = (GEMM_XH_SMEM if dims.get("gemm_xh") else GEMM_WGMMA_SMEM)[GEMM_SWIGLU_BASE[op] if swiglu else op]
            rows = GEMM_SWIGLU_ROWS if swiglu else GEMM_WGMMA_ROWS
            return LaunchConfig((-(-n // rows), ops.cdiv(m, GEMM_TOKENS), int(dims.get("gemm_split", 2))),
                                (GEMM_THREADS, 1, 1), smem, (m, n, k))
        return LaunchConfig((-(-n // GEMM_ROWS), ops.cdiv(m, GEMM_TOKENS), 2), (GEMM_THREADS, 1, 1), GEMM_SMEM[op],
                            (m, n, k))
    if op in SKINNY_OPS:
        tiles, k = _skinny_shape(op, dims)
        smem = skinny_smem_bytes(int(dims.get("sk_stages", SKINNY_STAGES)), int(dims.get("sk_xf16", SKINNY_XF16)),
                                 int(dims.get("sk_warpring", SKINNY_WARPRING)), int(dims.get("sk_xsb", SKINNY_XSB)))
        threads = 32 * int(dims.get("sk_warps", SKINNY_WARPS))
        split = int(dims["sk_split"]) if "sk_split" in dims else skinny_split(tiles, k)  # grid z: the build's cluster
        return LaunchConfig((tiles, ops.cdiv(m, SKINNY_TOKENS), split), (threads, 1, 1),
                            smem, _projection_scalars(SKINNY_BASE[op], dims))
    if op == "rms_norm_qkv":
        hidden, q_dim, kv_dim = int(_dim(dims, "hidden")), int(_dim(dims, "q_dim")), int(_dim(dims, "kv_dim"))
        groups = -(-q_dim // 2) + 2 * -(-kv_dim // 2)
        return LaunchConfig((qmv_grid_x(groups, QMV_WARPS), ops.cdiv(m, QMV_TOKENS_PER_BLOCK), 1),
                            (QMV_THREADS, 1, 1), 0, (m, hidden, q_dim, kv_dim))
    if op == "rms_norm_swiglu":
        hidden, ffn = int(_dim(dims, "hidden")), int(_dim(dims, "ffn"))
        return LaunchConfig((qmv_grid_x(-(-ffn // 2), QMV_WARPS // 2), ops.cdiv(m, QMV_TOKENS_PER_BLOCK), 1),
                            (QMV_THREADS, 1, 1), 0, (m, hidden, ffn))
    if op in GATHER_OPS:
        hidden = _dim(dims, "hidden")
        return LaunchConfig((ops.cdiv(hidden, 256), m, 1), (256, 1, 1), 0, (m, hidden, _dim(dims, "vocab")))
    if op in ("rms_norm", "add_rms_norm"):
        return LaunchConfig((m, 1, 1), (256, 1, 1), 0, (m, _dim(dims, "hidden")))
    if op in ("add", "swiglu"):
        numel = _dim(dims, "numel")
        return LaunchConfig((ops.cdiv(numel, 1024), 1, 1), (256, 1, 1), 0, (numel,))
    if op == "argmax":
        return LaunchConfig((ARGMAX_SPLITS, m, 1), (ARGMAX_THREADS, 1, 1), 0, (m, _dim(dims, "vocab")))
    if op in ATTENTION_OPS:  # grid y: (kv head, cluster) pairs, or kv heads for an ATTN_KVGRID build
        kv_grid = bool(dims.get("attn_kv_grid"))
        rows = _dim(dims, "n_kv_heads") if kv_grid else _dim(dims, "n_heads")
        # grid x: a cluster's blocks, or (ATTN_KVGRID without clusters) the one block of each (token, kv head)
        # (attn_gx: the ATTN_GX=4 build's clusters of 4)
        gx = 1 if kv_grid and not clusters else int(dims.get("attn_gx", ATTN_SPLITS))
        return LaunchConfig((gx, rows, m), (ATTN_THREADS, 1, 1), 0,
                            (m, _dim(dims, "n_slots"), _dim(dims, "max_seq", "max_seq_len")))
    if op == "decode_advance":
        return LaunchConfig((ops.cdiv(m, 256), 1, 1), (256, 1, 1), 0, (m,))
    if op == "gemm_x_f16":  # one thread per 16 elements
        k = int(_dim(dims, "k", "in_features"))
        return LaunchConfig((ops.cdiv(m * k, 16 * 256), 1, 1), (256, 1, 1), 0, (m, k))
    if op == "apply_penalties":
        return LaunchConfig((m, 1, 1), (PENALTY_THREADS, 1, 1), 0, (m, _dim(dims, "vocab")))
    if op in ("sample_tokens", "token_logprobs"):
        return LaunchConfig((SAMPLE_SPLITS, m, 1), (SAMPLE_THREADS, 1, 1), 0, (m, _dim(dims, "vocab")))

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


PREBUILT = Path(__file__).resolve().parent / "prebuilt"  # cubins of both real models' builds (`make prebuilt`)


def _source_key(src: Path, defs: dict, fmt: str, arch: str) -> str:
    """Hash of what a build is made of: the source, every plugin header, the defines, the format and the arch."""
    h = hashlib.sha256()
    h.update(src.read_bytes())
    for hdr in sorted(PLUGINS.glob("*.cuh")):
        h.update(hdr.name.encode() + b"\0" + hdr.read_bytes())
    h.update(repr(sorted(defs.items())).encode())
    h.update(f"{fmt}|{arch}".encode())
    return f"{src.stem}-{h.hexdigest()[:20]}"


def _defines_text(defines: dict | None) -> dict:
    return {str(k): _define_text(v) for k, v in (defines or {}).items()}


def gemm_wgmma_defines(xh: bool) -> dict:
    """Defines of the prefill GEMMs' wgmma build (plugins/quant_gemm_wgmma.cuh), with x as the fp16 copy gemm_x_f16
    makes (xh) or as float32; gemm_x_f16 itself is loaded from the xh build's module."""
    return {"GEMM_WGMMA": 1, **({"GEMM_XH": 1} if xh else {})}


def build_arch(defines: dict | None, arch: str = "sm_90") -> str:
    """The target a build needs: sm_90a (Hopper's arch-specific instructions, here wgmma) for the prefill GEMM's
    GEMM_WGMMA build, `arch` otherwise. Such a cubin loads only on compute capability 9.0."""
    return "sm_90a" if arch == "sm_90" and (defines or {}).get("GEMM_WGMMA") else arch


def prebuilt_path(op: str, defines: dict | None = None, fmt: str = "cubin", arch: str = "sm_90") -> Path:
    """Where the shipped build of (op, defines) lives; it exists for every build of the two real models."""
    arch = build_arch(defines, arch)
    return PREBUILT / f"{_source_key(source_file(op), _defines_text(defines), fmt, arch)}.{fmt}"


def compile_kernel(op: str, defines: dict | None = None, fmt: str = "ptx", arch: str = "sm_90",
                   prebuilt: bool = True) -> bytes:
    """PTX (fmt='ptx') or cubin (fmt='cubin') of the file holding `op`, for `arch`, with -D `defines`.

    A cubin shipped under toolchain/prebuilt/ for exactly these sources and defines is used as it is (no compiler
    needed: a machine with only the NVIDIA driver runs the real models, and the first run compiles nothing).
    Anything else is built with nvcc and cached under build/kernels/ by the same hash plus the nvcc version, so the
    4 ops of one family share one compilation."""
    if fmt not in ("ptx", "cubin"):
        raise UserError(f"fmt must be 'ptx' or 'cubin', got {fmt!r}")
    arch = build_arch(defines, arch)
    src, defs = source_file(op), _defines_text(defines)
    shipped = prebuilt_path(op, defines, fmt, arch)
    if prebuilt and shipped.is_file():
        return shipped.read_bytes()
    nvcc = nvcc_path()
    if nvcc is None:
        raise UserError(f"no prebuilt kernel for {op} with {defs or 'no defines'} (a model layout other than the two "
                        "real Qwen2.5-Coder files, or changed kernel sources) and nvcc was not found: install the CUDA "
                        "toolkit, or set NVCC / CUDA_HOME")
    key = f"{shipped.stem}-{hashlib.sha256(_nvcc_version(nvcc).encode()).hexdigest()[:8]}"
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


def real_model_builds() -> list[tuple[str, dict]]:
    """(op, defines) of every kernel build the two real models use: the general and the decode builds."""
    out = {}
    for model in MODEL_ATTRS:
        for op, d in [(op, defines_for(op, attrs)) for op, attrs in specializations(model)] + decode_specializations(model):
            out[(op, tuple(sorted(d.items())))] = (op, d)
    return list(out.values())


# Attribute sets of the two real models (toolchain/layouts.json): every specialization `make kernels` (and CI)
# compiles. Per model: the attention / norm attributes, the shapes, and the distinct per-layer weight types
# (q, k, v, o, gate, up, down), from which `specializations` derives the matmul and fused-op attribute sets.
_PROJ = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _model_attrs() -> tuple:
    import json

    layouts = json.loads((Path(__file__).with_name("layouts.json")).read_text())
    out = []
    for name in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"):
        c, types = layouts[name]["config"], layouts[name]["types"]
        layer_types = sorted({tuple(types[f"blk.{i}.{p}.weight"] for p in _PROJ) for i in range(c["n_layers"])})
        out.append({"model": name, "n_heads": c["n_heads"], "n_kv_heads": c["n_kv_heads"],
                    "head_dim": c["hidden"] // c["n_heads"], "rope_theta": c["rope_theta"], "epsilon": c["rms_eps"],
                    "hidden": c["hidden"], "ffn": c["ffn"], "vocab": c["vocab"], "layer_types": layer_types,
                    "output_type": types["output.weight"], "embd_type": types["token_embd.weight"]})
    return tuple(out)


MODEL_ATTRS = _model_attrs()  # 1.5B, 0.5B


def specializations(model: dict, build=None) -> list[tuple[str, dict]]:
    """(op, ONNX attributes) of every kernel specialization the model's decode graphs use, unfused and fused: one
    per distinct build(op, attrs) (default: defines_for)."""
    build = build or defines_for
    hidden, ffn = model["hidden"], model["ffn"]
    q_dim, kv_dim = model["n_heads"] * model["head_dim"], model["n_kv_heads"] * model["head_dim"]
    eps = model["epsilon"]
    specs = {}

    def add(op, **attrs):
        specs[(op, tuple(sorted(build(op, attrs).items())))] = (op, attrs)

    for op in KERNEL_OPS:  # (the gate/up/SwiGLU GEMMs exist in the wgmma builds only: decode_specializations)
        if op not in MATMUL_OPS + FUSED_OPS + TENSORRT_ONLY_OPS + SKINNY_OPS + GEMM_SWIGLU_OPS:
            add(op, **{k: model[k] for k in ("n_heads", "n_kv_heads", "head_dim", "rope_theta", "epsilon")})
    mm = {v: k for k, v in MATMUL_TYPE.items()}
    for q, k, v, o, gate, up, down in model["layer_types"]:
        for t, n, kk in ((q, q_dim, hidden), (k, kv_dim, hidden), (v, kv_dim, hidden), (o, hidden, q_dim),
                         (gate, ffn, hidden), (up, ffn, hidden), (down, hidden, ffn)):
            add(mm[t], in_features=kk, out_features=n)
            if skinny_of(mm[t], {}):  # batched decode of the same projection (its build depends on the shape)
                add(SKINNY_OF[mm[t]], in_features=kk, out_features=n)
        for op, attrs in (("rms_norm_qkv", dict(epsilon=eps, q_type=q, k_type=k, v_type=v, q_dim=q_dim,
                                                kv_dim=kv_dim)),
                          ("matmul_add", dict(w_type=o, in_features=q_dim, out_features=hidden)),
                          ("matmul_add", dict(w_type=down, in_features=ffn, out_features=hidden)),
                          ("rms_norm_swiglu", dict(epsilon=eps, gate_type=gate, up_type=up, ffn=ffn))):
            add(op, **attrs)
            if skinny_of(op, attrs):  # its batched-decode twin: the cluster size needs the hidden size
                add(SKINNY_OF[op], **attrs, hidden=hidden)
    add(mm[model["output_type"]], in_features=hidden, out_features=model["vocab"])
    if skinny_of(mm[model["output_type"]], {}):
        add(SKINNY_OF[mm[model["output_type"]]], in_features=hidden, out_features=model["vocab"])
    return list(specs.values())


def decode_specializations(model: dict) -> list[tuple[str, dict]]:
    """(op, defines) of the decode builds the cuda backend compiles for the model's projections (decode_build, for
    every decode_tokens bucket: 1, 2, 4, 8 tokens per block), of the xmerge pair (xmerge_defines), of the
    attention on one cluster or one block per (token, kv head) (ATTN_KVGRID), the prefill GEMMs' wgmma build and the
    XH_OUT builds of their inputs' producers, and the few-token GEMMs' SK_SSQ_OUT / SK_SSQ_IN builds."""
    def build(op, attrs, mt=1):
        return decode_build(op, attrs, attrs.get("in_features", model["hidden"]), mt=mt)

    out = [(op, build(op, attrs)) for op, attrs in specializations(model, build) if op in MATMUL_OPS + FUSED_OPS]
    buckets = sorted({decode_tokens(m) for m in range(2, QMV1_MT_MAX + 1)})
    batched = {(op, tuple(sorted(d.items()))): (op, d) for op, attrs in specializations(model, build)
               if op in MATMUL_OPS + FUSED_OPS for d in [build(op, attrs, mt) for mt in buckets] if "QMV1_MT" in d}
    # the xmerge pair: the attention, and the o projections (k = q_dim) that run on the decode core
    attn, o_proj = xmerge_defines(model)
    q_dim = model["n_heads"] * model["head_dim"]
    pairs = [("matmul_add", d | o_proj) for op, d in out if op == "matmul_add" and d.get("QMV1_K") == q_dim]
    if pairs:
        pairs.append(("rope_kv_attention", defines_for("rope_kv_attention", model) | attn))
    # the attention as one cluster per (token, kv head), and as one block (the cuda backend's tunings attn_kv_grid,
    # attn_one_block_keys)
    kv_grid = [("rope_kv_attention", defines_for("rope_kv_attention", model, clusters=c) | {"ATTN_KVGRID": 1})
               for c in (True, False)]
    kv_grid.append(("rope_kv_attention", kv_grid[0][1] | {"ATTN_GX": 4}))  # clusters of 4 (tuning attn_narrow)
    # the prefill GEMMs on Hopper's warpgroup MMA (the cuda backend's tuning gemm_wgmma; sm_90a cubins)
    wgmma = [(op, gemm_wgmma_defines(xh)) for op in GEMM_OPS + GEMM_SWIGLU_OPS for xh in (False, True)]
    wgmma.append(("gemm_x_f16", gemm_wgmma_defines(True)))
    # the producers of those GEMMs' inputs, writing the fp16 copy themselves (the cuda backend's xh_by_producer)
    wgmma += [(op, defines_for(op, model) | {"XH_OUT": 1})
              for op in ("rms_norm", "add_rms_norm", "swiglu", "prefill_attention")]
    wgmma += [(op, gemm_wgmma_defines(True) | {"XH_OUT": 1}) for op in GEMM_SWIGLU_OPS]
    # ... and without the k split (the cuda backend's tuning gemm_swiglu_split = 1)
    wgmma += [(op, d | {"GEMM_SPLIT": 1}) for op, d in wgmma if op in GEMM_SWIGLU_OPS and d.get("GEMM_XH")]
    # the GEMMs for few tokens that pass the RMSNorm's sums of x^2 from a matmul_add to the fused GEMM after it (the
    # cuda backend's ssq_by_producer): the o and down projections (out_features = hidden) write them, QKV and SwiGLU
    # read them
    ssq = [(op, defines_for(op, attrs) | ({"SK_SSQ_OUT": 1} if op == "matmul_add_skinny" else {"SK_SSQ_IN": 1}))
           for op, attrs in specializations(model) if op in SSQ_CONSUMERS
           or op == "matmul_add_skinny" and attrs.get("out_features") == model["hidden"]]
    return out + pairs + kv_grid + wgmma + list(batched.values()) + ssq


TENSORRT_PLUGIN_OPS = (*MATMUL_OPS, *GATHER_OPS, "rope_kv_attention_addr", "swiglu")


def tensorrt_specializations(model: dict) -> list[tuple[str, dict]]:
    """(op, ONNX attributes) of every plugin the TensorRT export of a real model holds: the unfused graph's custom
    ops, the attention by address (as engine.prepare_onnx rewrites it), one per distinct clusters=False build."""
    out = {}
    for op, attrs in specializations(model):
        if op == "rope_kv_attention":
            op, attrs = "rope_kv_attention_addr", dict(attrs, n_slots=1, max_seq_len=4096)
        if op in TENSORRT_PLUGIN_OPS:
            out[(op, tuple(sorted(defines_for(op, attrs, clusters=False).items())))] = (op, attrs)
    return list(out.values())


def tensorrt_builds(model: dict) -> list[tuple[str, dict]]:
    """(op, defines) of every PTX the TensorRT plugins of a real model get (toolchain/trt/plugins.py ptx_for)."""
    return [(op, defines_for(op, attrs, clusters=False)) for op, attrs in tensorrt_specializations(model)]


def _main():
    """`make kernels` / `python -m toolchain.kernels`: compile every op (cubin for sm_90, and PTX) for both real
    models' specializations and print nvcc's resource usage (registers, spills, shared memory) per file.
    `--prebuilt` (`make prebuilt`): write their cubins to toolchain/prebuilt/ instead, the set the package ships."""
    import re
    import sys

    failed = 0
    ship = "--prebuilt" in sys.argv[1:]
    if ship:
        for old in PREBUILT.glob("*.cubin"):
            old.unlink()
        PREBUILT.mkdir(exist_ok=True)
    trt = [] if ship else [(op, d, ("ptx",)) for model in MODEL_ATTRS for op, d in tensorrt_builds(model)]
    for op, defines, fmts in [(op, d, ("cubin",) if ship else ("cubin", "ptx")) for op, d in real_model_builds()] + trt:
        for fmt in fmts:
            try:
                image = compile_kernel(op, defines, fmt=fmt, prebuilt=False)
            except UserError as e:
                print(f"FAILED {op} {defines}: {e}", file=sys.stderr)
                failed += 1
                continue
            if ship:
                prebuilt_path(op, defines, fmt).write_bytes(image)
    if ship:
        (PREBUILT / "NVCC_VERSION").write_text(_nvcc_version(nvcc_path()).splitlines()[-1] + "\n")
    for log in sorted(CACHE.glob("*.log")):
        usage = re.findall(r"Used \d+ registers[^\n]*", log.read_text())
        if usage:
            print(f"{log.stem}: " + "; ".join(sorted(set(usage))))
    print("all kernels compiled" if not failed else f"{failed} compilations failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(_main())
