// Tensor-core GEMM for prompt prefill (m >= GEMM_MIN_M tokens, toolchain/cuda_backend.py): y[m, n] = x[m, k] @
// dequantize(w).T + bias, w the raw GGUF rows (uint8 [n, row_bytes]) of a Q4_K / Q6_K tensor. Same ABI as the matvec
// ops (plugins/quant_matmul.cu), so the runtime can swap kernels by m. One kernel per format: q4k_gemm, q6k_gemm, both
//     (const float* x, const uint8_t* w, const float* bias /* [n] or null */, int m, int n, int k, float* y)
//
// LAUNCH (defaults GEMM_NT8 = 3, GEMM_SPLIT = 2):
//     block (256, 1, 1)
//     grid  (cdiv(n, 96), cdiv(m, 128), 2)                     [BN = 32 * GEMM_NT8 = 96; z = GEMM_SPLIT]
//     dynamic shared memory (> 48 KB: the launcher must first raise CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES to
//     it, once per loaded function): 2*18432 + 2*BN*RS + 64*BN bytes, RS = 144 (Q4_K) / 240 (Q6_K):
//         q4k_gemm 70656 B, q6k_gemm 89088 B            (GEMM_NT8 = 4: 81920 / 106496)
//     cluster (1, 1, 2) at compile time (__cluster_dims__, GEMM_SPLIT = 2), so a plain cuLaunchKernel launches it.
//     Registers (nvcc 13.0, sm_90): q4k_gemm 192, q6k_gemm 185 per thread, no spills: one 256-thread CTA per SM.
// Requirements: k % 256 == 0; x 16-byte aligned (k % 4 == 0 follows); Q4_K: w 16-byte aligned (Q6_K: 2-aligned is
// enough); m, n >= 1 (any value: tails are clamped on load and dropped on store).
// Other builds: -DGEMM_WGMMA=1 (sm_90a, the cuda backend's default on H100 / H200) runs the body of
// plugins/quant_gemm_wgmma.cuh (its header has its launch); with -DGEMM_XH=1 its x is the fp16 copy gemm_x_f16 (at
// the end of this file) makes. The wgmma builds also hold q4k_gemm_swiglu / q6k_gemm_swiglu: a layer's gate and up
// projections and their SwiGLU in one GEMM (each CTA 64 rows of each matrix; gemm_swiglu_epilogue). The wgmma body
// issues its first superblock's weight copies before pdl_wait() (weights only: plugins/pdl.cuh), so under a
// programmatic dependent launch they are in flight while the previous kernel finishes. -DGEMM_SPLIT=1 builds have no
// k split (grid z = 1, no cluster): each CTA all of k.
//
// Design
// - CTA tile 128 tokens x BN weight rows, 8 warps as 2 (tokens) x 4 (rows), warp tile 64 x (8 * NT8): 4 x NT8
//   mma.sync.m16n8k16 (fp16 operands, fp32 accumulators) per 16 k. Operands: A = x (tokens x k), B = W^T.
// - Split-K over a cluster of 2 CTAs (blockIdx.z = rank): each CTA takes half the 256-element superblocks; at the
//   end each CTA sends the half tile it does not store to its peer's shared memory (DSMEM) and stores the other half.
//   Without it ffn_down (n = 1536, k = 8960) would have 48 tiles for 132 SMs.
// - Raw weight bytes of one superblock (BN rows) are copied global -> shared with cp.async (16-byte chunks; Q6_K
//   rows are only 2-aligned, so the aligned-down 16-byte span of each row is copied and read with funnel shifts),
//   double-buffered: superblock s+1 is in flight while s is computed. A per-superblock pass turns the block scales
//   into fp16 (scale, -min) pairs in shared memory.
// - x (float32, L2-resident) is read as float4 into registers one 64-k "substep" ahead, converted to fp16 and stored
//   in a double-buffered shared tile, read with ldmatrix.x4. (A cp.async ring two substeps ahead measured 1.8x
//   slower: docs/perf-notes.md.)
// - Weights are dequantized straight into B-fragment registers from the raw bytes (no fp16 weight tile): within
//   each 16-k chunk the k order is permuted (the same permutation for x), so that the 4 values a lane needs are the
//   4 consecutive bytes of one 32-bit word: physical 4c+i (c = lane % 4) is logical k {2c, 2c+8, 2c+1, 2c+9}[i].
//   A nibble pair becomes a half2 with one LOP3 (0x6400 | q: 1024 + q, exact), then (v - 1024) * scale - min
//   (Q4_K) or (v - 1056) * scale (Q6_K) in f16x2 arithmetic.
// - Which 64 k-positions form a substep is the format's choice (the x loader gathers them): Q4_K 64 contiguous
//   elements (one 32-byte run of nibbles, sub-blocks 2p and 2p+1); Q6_K the elements 128h + 32kk + 16v + [0,16)
//   (kk = 0..3), so one ql/ql/qh word triple serves all 4 chunks.
// Accuracy: fp16 operands, fp32 accumulation: relative error ~3e-4 against float64. x must fit fp16 (|x| < 65504).
#include <cooperative_groups.h>

#include "pdl.cuh"
#include "quant_mma.cuh"
#include "silu.cuh"
#ifndef XH_OUT
#define XH_OUT 0  // q4k_gemm_swiglu / q6k_gemm_swiglu: write the fp16 copy for the next GEMM instead of float32
#endif
#ifndef GEMM_WGMMA
#define GEMM_WGMMA 0  // 1: the body on Hopper's warpgroup MMA (plugins/quant_gemm_wgmma.cuh; build with -arch=sm_90a)
#endif
#if GEMM_WGMMA
#include "quant_gemm_wgmma.cuh"
#endif

namespace cg = cooperative_groups;
using namespace qmma;

#ifndef GEMM_NT8
#define GEMM_NT8 3  // n8 tiles per warp: BN = 96 (4: BN = 128, 8% slower over the 1.5B layer stack on H100)
#endif
#ifndef GEMM_SPLIT
#define GEMM_SPLIT 2
#endif
#ifndef GEMM_PDL_LATE
#define GEMM_PDL_LATE 0  // 1 (wgmma body): pdl_launch_dependents() after the main loop instead of at the kernel's start
#endif

namespace {

constexpr int NT8 = GEMM_NT8;            // n8 tiles per warp
constexpr int BM = 128, BN = 32 * NT8;   // CTA tile
constexpr int THREADS = 256;
constexpr int XS = 72;                   // x tile row stride in halves (64 + 8: ldmatrix rows hit distinct banks)
constexpr int X_BYTES = BM * XS * 2;     // one x buffer

template <class F> constexpr int smem_bytes() { return 2 * X_BYTES + 2 * BN * G<F>::RS + BN * 64; }
static_assert(NT8 != 3 || (smem_bytes<Q4K>() == 70656 && smem_bytes<Q6K>() == 89088), "shared memory (header)");
static_assert(NT8 != 4 || (smem_bytes<Q4K>() == 81920 && smem_bytes<Q6K>() == 106496), "shared memory (header)");
static_assert(smem_bytes<Q6K>() <= 227 * 1024, "fits one SM");
static_assert(4 * 4 * NT8 * 32 * 16 <= 2 * X_BYTES + 2 * BN * 144, "reduction buffer fits");

// x: 128 rows x 64 k (the 4 chunks of one substep) as 8 float4 per thread: item it (0..3) = row id>>3,
// chunk (id>>1)&3, half u = id&1 (8 floats: physical 8u..8u+7 of the chunk), id = 256 it + tid.
struct XRegs {
    float4 v[8];
};

template <class F>
__device__ __forceinline__ void load_x(XRegs& r, const float* x, int m0, int m, int k, int kb, int sub,
                                       int tid) {
#pragma unroll
    for (int it = 0; it < 4; ++it) {
        const int id = THREADS * it + tid, row = id >> 3, kk = (id >> 1) & 3, u = id & 1;
        const float* p = x + (size_t)min(m0 + row, m - 1) * k + kb + Fmt<F>::chunk_base(sub, kk) + 8 * u;
        r.v[2 * it] = ld_produced(reinterpret_cast<const float4*>(p));  // not __ldg: an earlier kernel wrote x, and
        r.v[2 * it + 1] = ld_produced(reinterpret_cast<const float4*>(p + 4));  // .nc loads move above pdl_wait
    }
}

// fp16, k permuted inside each chunk: word c (c = 0..3) of the chunk's first 8 halves = (x[4c], x[4c+2]), word
// 4+c = (x[4c+1], x[4c+3]).
[[maybe_unused]] __device__ __forceinline__ void store_x(const XRegs& r, uint8_t* Xs, int tid) {
#pragma unroll
    for (int it = 0; it < 4; ++it) {
        const int id = THREADS * it + tid, row = id >> 3, kk = (id >> 1) & 3, u = id & 1;
        const float4 a = r.v[2 * it], b = r.v[2 * it + 1];  // c = 2u and 2u+1
        uint32_t* dst = reinterpret_cast<uint32_t*>(Xs) + row * (XS / 2) + 8 * kk + 2 * u;
        *reinterpret_cast<uint2*>(dst) = make_uint2(pack_h2(a.x, a.z), pack_h2(b.x, b.z));
        *reinterpret_cast<uint2*>(dst + 4) = make_uint2(pack_h2(a.y, a.w), pack_h2(b.y, b.w));
    }
}

template <class F>
__device__ __forceinline__ void compute(float (&acc)[4][NT8][4], const uint8_t* Xs, const uint8_t* R,
                                        const uint8_t* S, const uint32_t (&off)[NT8], int sub, int lane, int wm,
                                        int wn) {
    const int g = lane >> 2, c = lane & 3;
    uint32_t bf[NT8][4][2];
#pragma unroll
    for (int j = 0; j < NT8; ++j) {
        const int row = wn * 8 * NT8 + 8 * j + g;
        Fmt<F>::dequant(bf[j], R + row * G<F>::RS, S + row * 64, off[j], sub, c);
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
            ldmatrix_x4(a[i], Xs + 2 * ((wm * 64 + 16 * i + (lane & 15)) * XS + 16 * kk + 8 * (lane >> 4)));
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < NT8; ++j) mma16816(acc[i][j], a[i], bf[j][kk][0], bf[j][kk][1]);
    }
}

extern __shared__ __align__(16) uint8_t gemm_smem[];

// The superblocks [sb0, sb1) of the nb along k that this CTA takes, for both bodies: all of them, or with the cluster
// split (GEMM_SPLIT = 2) the half of rank = blockIdx.z, which also picks the half of the tile it stores at the end.
struct KRange {
    int rank, sb0, sb1;
};
__device__ __forceinline__ KRange k_range(int nb) {
#if GEMM_SPLIT == 2
    const int rank = blockIdx.z;
    return {rank, nb * rank / 2, nb * (rank + 1) / 2};
#else
    return {0, 0, nb};
#endif
}

template <class F>
__device__ __forceinline__ void gemm(const float* __restrict__ x, const uint8_t* __restrict__ w,
                                     const float* __restrict__ bias, int m, int n, int k, float* __restrict__ y) {
    uint8_t* const X0 = gemm_smem;                    // x buffers: X0 + b * X_BYTES
    uint8_t* const R0 = gemm_smem + 2 * X_BYTES;      // raw weight stages: R0 + b * BN * RS
    uint8_t* S = gemm_smem + 2 * X_BYTES + 2 * BN * G<F>::RS;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> 2, wn = warp & 3;
    const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
    const int nb = k / 256;
    const size_t row_bytes = (size_t)nb * F::BB;
    const uint32_t wlo = (uint32_t)reinterpret_cast<uintptr_t>(w);
    const auto [rank, sb0, sb1] = k_range(nb);
    const int nsb = sb1 - sb0, T = 4 * nsb;

    float acc[4][NT8][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < NT8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    if (nsb > 0) {
        XRegs xr;
        Fmt<F>::template issue_raw<BN, THREADS>(R0, w, row_bytes, n0, n, sb0, tid);
        cp_async_commit();
        load_x<F>(xr, x, m0, m, k, 256 * sb0, 0, tid);
        store_x(xr, X0, tid);
        load_x<F>(xr, x, m0, m, k, 256 * sb0, 1, tid);
        cp_async_wait_all();
        __syncthreads();
        Fmt<F>::template scales<BN, THREADS>(S, R0, wlo, row_bytes, n0, n, sb0, tid);
        __syncthreads();
        for (int s = 0; s < nsb; ++s) {
            const int sb = sb0 + s;
            const uint8_t* R = R0 + (s & 1) * BN * G<F>::RS;
            if (s + 1 < nsb) Fmt<F>::template issue_raw<BN, THREADS>(R0 + ((s + 1) & 1) * BN * G<F>::RS, w, row_bytes, n0, n, sb + 1, tid);
            cp_async_commit();
            uint32_t off[NT8];
#pragma unroll
            for (int j = 0; j < NT8; ++j) {
                if constexpr (F::BB == 210)
                    off[j] = Fmt<Q6K>::row_off(wlo, row_bytes, min(n0 + wn * 8 * NT8 + 8 * j + (lane >> 2), n - 1), sb);
                else
                    off[j] = 0;
            }
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                const int t = 4 * s + p;
                if (t + 1 < T) store_x(xr, X0 + ((p + 1) & 1) * X_BYTES, tid);               // substep t+1 -> other buffer
                if (t + 2 < T) load_x<F>(xr, x, m0, m, k, 256 * (sb + ((p + 2) >> 2)), (p + 2) & 3, tid);
                compute<F>(acc, X0 + (p & 1) * X_BYTES, R, S, off, p, lane, wm, wn);
                if (p == 3) cp_async_wait_all();
                __syncthreads();
            }
            if (s + 1 < nsb) {
                Fmt<F>::template scales<BN, THREADS>(S, R0 + ((s + 1) & 1) * BN * G<F>::RS, wlo, row_bytes, n0, n, sb + 1, tid);
                __syncthreads();
            }
        }
    }

    bool store = true;
#if GEMM_SPLIT == 2
    {
        // each CTA stores the token half wm == rank; the other half goes to the peer (same warp position there)
        cg::cluster_group cluster = cg::this_cluster();
        cluster.sync();  // both CTAs are done with their shared memory
        float4* red = reinterpret_cast<float4*>(gemm_smem);
        constexpr int NV = 4 * NT8;
        if (wm != rank) {
            float4* dst = cluster.map_shared_rank(red, rank ^ 1);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < NT8; ++j)
                    dst[(wn * NV + i * NT8 + j) * 32 + lane] =
                        make_float4(acc[i][j][0], acc[i][j][1], acc[i][j][2], acc[i][j][3]);
        }
        cluster.sync();
        if (wm == rank) {
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < NT8; ++j) {
                    const float4 v = red[(wn * NV + i * NT8 + j) * 32 + lane];
                    acc[i][j][0] += v.x;
                    acc[i][j][1] += v.y;
                    acc[i][j][2] += v.z;
                    acc[i][j][3] += v.w;
                }
        } else {
            store = false;
        }
    }
#endif
    if (!store) return;
    const int g = lane >> 2, c = lane & 3;
    const bool even = (n & 1) == 0;
#pragma unroll
    for (int j = 0; j < NT8; ++j) {
        const int col = n0 + wn * 8 * NT8 + 8 * j + 2 * c;
        if (col >= n) continue;
        const bool two = col + 1 < n;
        const float b0 = bias ? bias[col] : 0.f, b1 = (bias && two) ? bias[col + 1] : 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int row = m0 + wm * 64 + 16 * i + 8 * hh + g;
                if (row >= m) continue;
                float* yp = y + (size_t)row * n + col;
                const float v0 = acc[i][j][2 * hh] + b0, v1 = acc[i][j][2 * hh + 1] + b1;
                if (two && even) {
                    *reinterpret_cast<float2*>(yp) = make_float2(v0, v1);
                } else {
                    yp[0] = v0;
                    if (two) yp[1] = v1;
                }
            }
    }
}

#if GEMM_WGMMA
// Q6_K: the byte offset of global row gr's block inside its staged span (Fmt<Q6K>::row_off); 0 for Q4_K
template <class F>
__device__ __forceinline__ uint32_t q6k_off(uint32_t wlo, size_t row_bytes, int gr, int n, int sb) {
    if constexpr (F::BB == 210) return Fmt<Q6K>::row_off(wlo, row_bytes, min(gr, n - 1), sb);
    return 0;
}

// One substep of a warpgroup: the A fragments of this thread's rows row0 and row0 + 8 (substep p of the staged
// superblock R, scales S) into af, then the four k16 steps' wgmma over the x buffer at shared address xs, committed
// as one group
template <class F>
__device__ __forceinline__ void wgmma_substep(float (&acc)[64], uint32_t (&af)[4][4], const uint8_t* R,
                                              const uint8_t* S, int row0, uint32_t off0, uint32_t off1, int p, int c,
                                              uint32_t xs) {
    using namespace qwg;
    uint32_t b0[4][2], b1[4][2];
    Fmt<F>::dequant(b0, R + row0 * G<F>::RS, S + row0 * 64, off0, p, c);
    Fmt<F>::dequant(b1, R + (row0 + 8) * G<F>::RS, S + (row0 + 8) * 64, off1, p, c);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        af[kk][0] = b0[kk][0];
        af[kk][1] = b1[kk][0];
        af[kk][2] = b0[kk][1];
        af[kk][3] = b1[kk][1];
    }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_m64n128k16(acc, af[kk], kmajor_sw128(xs + 32 * kk));
    wgmma_commit();
}

// The raw blocks of superblock sb of the tile's 128 weight rows into R: rows n0.. of w, or (SW, the gate/up pair)
// rows 0-63 from w (gate) and 64-127 from w2 (up), both from row n0, each half staged by one warpgroup
template <class F, bool SW>
__device__ __forceinline__ void stage_raw(uint8_t* R, const uint8_t* w, const uint8_t* w2, size_t row_bytes, int n0,
                                          int n, int sb, int tid) {
    if constexpr (SW) {
        const int h = tid >> 7;
        Fmt<F>::template issue_raw<64, 128>(R + h * 64 * G<F>::RS, h ? w2 : w, row_bytes, n0, n, sb, tid & 127);
    } else {
        Fmt<F>::template issue_raw<qwg::BN, qwg::THREADS>(R, w, row_bytes, n0, n, sb, tid);
    }
}
// ... and their scales into S (the same split of rows; wlo: the plain GEMM's w as an integer)
template <class F, bool SW>
__device__ __forceinline__ void stage_scales(uint8_t* S, const uint8_t* R, uint32_t wlo, const uint8_t* w,
                                             const uint8_t* w2, size_t row_bytes, int n0, int n, int sb, int tid) {
    if constexpr (SW) {
        const int h = tid >> 7;
        const uint32_t lo = (uint32_t)reinterpret_cast<uintptr_t>(h ? w2 : w);
        Fmt<F>::template scales<64, 128>(S + h * 64 * 64, R + h * 64 * G<F>::RS, lo, row_bytes, n0, n, sb, tid & 127);
    } else {
        Fmt<F>::template scales<qwg::BN, qwg::THREADS>(S, R, wlo, row_bytes, n0, n, sb, tid);
    }
}

// gemm_swiglu_epilogue's staging: accumulator column groups J0..J0+7 (64 tokens) of this thread's two rows, as
// [warpgroup][token][row] tiles at X0 + 32 KB (row stride TS floats), + 0.f as the plain GEMM adds the graph's zero bias
constexpr int SWIGLU_TS = 68;  // staged tile row stride: the accumulator stores hit 32 distinct banks
template <int J0>
__device__ __forceinline__ void swiglu_stage(const float (&acc)[64], uint8_t* X0, int rl, int wg, int tid) {
    constexpr int TS = SWIGLU_TS;
    const int c = tid & 3;
    float* tile = reinterpret_cast<float*>(X0 + 8 * 256 * 16) + wg * 64 * TS;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        const int j = J0 + q;
#pragma unroll
        for (int e = 0; e < 4; ++e) tile[(8 * q + 2 * c + (e & 1)) * TS + rl + 8 * (e >> 1)] = acc[4 * j + e] + 0.f;
    }
}

#if GEMM_SPLIT == 2
// the k-split pair's exchange before the staging: accumulator column groups KEPT..KEPT+7 (tokens 8j..8j+7) stay and
// get the peer's partial sums added (own + peer's: the plain GEMM's sum, so the same bits), the other 8 go to the peer
template <int KEPT>
__device__ __forceinline__ void swiglu_reduce(float (&acc)[64], uint8_t* X0, cg::cluster_group& cluster, int rl,
                                              int wg, int tid) {
    constexpr int GONE = 8 - KEPT;
    float4* red = reinterpret_cast<float4*>(X0);
    float4* dst = cluster.map_shared_rank(red, KEPT ? 0 : 1);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        const int j = GONE + q;
        dst[q * 256 + tid] = make_float4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]);
    }
    cluster.sync();
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        const int j = KEPT + q;
        const float4 v = red[q * 256 + tid];
        acc[4 * j] += v.x;
        acc[4 * j + 1] += v.y;
        acc[4 * j + 2] += v.z;
        acc[4 * j + 3] += v.w;
    }
    swiglu_stage<KEPT>(acc, X0, rl, wg, tid);
}
#endif

// silu(gate) * up of 64 staged tokens (swiglu_stage) from token t0: every thread 16 consecutive rows of one token
// (elementwise.cu's silu_mul), written as float32 y[token][n0 + ...] or, with XH_OUT=1, only as the fp16 copy the
// down projection's GEMM_XH build reads (xh_store.cuh's layout, gemm_x_f16's rounding)
__device__ __forceinline__ void swiglu_store(const uint8_t* X0, int m, int n, int t0, int n0, int tid,
                                             float* __restrict__ y, __half* __restrict__ xh) {
    constexpr int TS = SWIGLU_TS;
    const int tok = tid >> 2, q = tid & 3, token = t0 + tok, col = n0 + 16 * q;
    if (token >= m || col >= n) return;
    const float4* gp = reinterpret_cast<const float4*>(X0 + 8 * 256 * 16 + 4 * (tok * TS + 16 * q));
    const float4* up = gp + 16 * TS;  // 64 rows of TS floats further
    float s[16];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float4 a = gp[i], b = up[i];
        s[4 * i] = silu_mul(a.x, b.x);
        s[4 * i + 1] = silu_mul(a.y, b.y);
        s[4 * i + 2] = silu_mul(a.z, b.z);
        s[4 * i + 3] = silu_mul(a.w, b.w);
    }
#if XH_OUT
    (void)y;
    uint4* dst = reinterpret_cast<uint4*>(xh + (size_t)token * n + col);
    dst[0] = make_uint4(pack_h2(s[0], s[2]), pack_h2(s[4], s[6]), pack_h2(s[8], s[10]), pack_h2(s[12], s[14]));
    dst[1] = make_uint4(pack_h2(s[1], s[3]), pack_h2(s[5], s[7]), pack_h2(s[9], s[11]), pack_h2(s[13], s[15]));
#else
    (void)xh;
    float4* yp = reinterpret_cast<float4*>(y + (size_t)token * n + col);
#pragma unroll
    for (int i = 0; i < 4; ++i) yp[i] = make_float4(s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]);
#endif
}

// The epilogue of the gate/up/SwiGLU kernels (SW): gate (warpgroup 0) and up (warpgroup 1) staged as [token][row]
// tiles in shared memory, 64 tokens at a time, then silu(gate) * up (swiglu_store). With the k split (GEMM_SPLIT = 2)
// each CTA of the pair finishes one half of the tile's 128 tokens (rank 0 the first 64; swiglu_reduce); without it
// (GEMM_SPLIT = 1: one chain over k, other bits than the split's) the CTA stages and stores both halves in turn.
// rl: this thread's first row within its warpgroup's 64.
__device__ __forceinline__ void gemm_swiglu_epilogue(float (&acc)[64], uint8_t* X0, int m, int n, int m0, int n0,
                                                     int rank, int rl, int wg, int tid, float* __restrict__ y,
                                                     __half* __restrict__ xh) {
    static_assert(8 * 256 * 16 + 2 * 64 * SWIGLU_TS * 4 <= qwg::NXB * qwg::XT + 2 * qwg::BN * G<Q4K>::RS,
                  "the exchange and the staged tiles fit the x and raw-weight buffers");
#if GEMM_SPLIT == 2
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // both CTAs are done with their shared memory
    if (rank == 0)  // the accumulators' token groups as constants: indexed by a variable they would go to memory
        swiglu_reduce<0>(acc, X0, cluster, rl, wg, tid);
    else
        swiglu_reduce<8>(acc, X0, cluster, rl, wg, tid);
    __syncthreads();
    swiglu_store(X0, m, n, m0 + 64 * rank, n0, tid, y, xh);
#else
    (void)rank;
    __syncthreads();  // every warpgroup is done with the x buffers
    swiglu_stage<0>(acc, X0, rl, wg, tid);
    __syncthreads();
    swiglu_store(X0, m, n, m0, n0, tid, y, xh);
    __syncthreads();  // the first half read before the second overwrites it
    swiglu_stage<8>(acc, X0, rl, wg, tid);
    __syncthreads();
    swiglu_store(X0, m, n, m0 + 64, n0, tid, y, xh);
#endif
}

// The wgmma build's body (plugins/quant_gemm_wgmma.cuh has the design): the same staging, scales, x loads and split
// as gemm<F> above, the weights as the warpgroup MMA's A operand, x as its shared-memory B operand. SW (the
// gate/up/SwiGLU kernels, q4k_gemm_swiglu / q6k_gemm_swiglu): warpgroup 0's 64 rows are gate rows n0.., warpgroup
// 1's the same rows of up (w2), and gemm_swiglu_epilogue writes silu(gate) * up for the tile's 64 rows.
template <class F, bool SW = false>
__device__ __forceinline__ void gemm_wgmma(const float* __restrict__ x, const uint8_t* __restrict__ w,
                                           const float* __restrict__ bias, int m, int n, int k, float* __restrict__ y,
                                           const uint8_t* __restrict__ w2 = nullptr,
                                           __half* __restrict__ xh_out = nullptr) {
    using namespace qwg;
    uint8_t* const X0 = gemm_smem + ((1024 - (smem_u32(gemm_smem) & 1023)) & 1023);  // 1024-aligned swizzle atoms
    uint8_t* const R0 = X0 + NXB * XT;
    uint8_t* const S = R0 + 2 * qwg::BN * G<F>::RS;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
    const int n0 = blockIdx.x * (SW ? 64 : qwg::BN), m0 = blockIdx.y * qwg::BM;
    const int nb = k / 256;
    const size_t row_bytes = (size_t)nb * F::BB;
    const uint32_t wlo = (uint32_t)reinterpret_cast<uintptr_t>(SW && wg ? w2 : w);  // this warpgroup's matrix
    const auto [rank, sb0, sb1] = k_range(nb);
    const int nsb = sb1 - sb0, T = 4 * nsb;
    const int g = lane >> 2, c = lane & 3;
    const int row0 = 64 * wg + 16 * (warp & 3) + g;  // this thread's A rows in the tile: row0 and row0 + 8

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;

    // x from float32 (GEMM_XH=0): read into registers one substep ahead, stored as fp16 into 3 buffers after the
    // substep's MMAs are issued. x from fp16 (GEMM_XH=1: the copy gemm_x_f16 makes in the fragments' k order): 4
    // buffers filled by cp.async two substeps ahead, one commit group per substep (with the next superblock's raw
    // weights at its first substep). Either way the buffer written at substep t was last read by group t - 2, done in
    // every warpgroup before the barrier that ended substep t - 1.
#if GEMM_XH
    const uint16_t* xh = reinterpret_cast<const uint16_t*>(x);
#endif
    if (nsb > 0) {
        uint32_t af[2][4][4];  // A fragments of two substeps: [parity][k16 step][register]
        stage_raw<F, SW>(R0, w, w2, row_bytes, n0, n, sb0, tid);
        pdl_wait();  // the first weights are in flight (nothing an earlier kernel wrote: plugins/pdl.cuh); x after it
#if GEMM_XH
        issue_xh<F>(X0, xh, m0, m, k, 256 * sb0, 0, tid);
        cp_async_commit();
        issue_xh<F>(X0 + XT, xh, m0, m, k, 256 * sb0, 1, tid);
        cp_async_commit();
        cp_async_wait1();
        fence_proxy_async();
#else
        XRegs xr;
        cp_async_commit();
        load_x<F>(xr, x, m0, m, k, 256 * sb0, 0, tid);
        store_x_sw(xr, X0, tid);
        fence_proxy_async();
        load_x<F>(xr, x, m0, m, k, 256 * sb0, 1, tid);
        cp_async_wait_all();
#endif
        __syncthreads();
        stage_scales<F, SW>(S, R0, wlo, w, w2, row_bytes, n0, n, sb0, tid);
        __syncthreads();
        for (int s = 0; s < nsb; ++s) {
            const int sb = sb0 + s;
            const uint8_t* R = R0 + (s & 1) * qwg::BN * G<F>::RS;
#if !GEMM_XH
            if (s + 1 < nsb)
                stage_raw<F, SW>(R0 + ((s + 1) & 1) * qwg::BN * G<F>::RS, w, w2, row_bytes, n0, n, sb + 1, tid);
            cp_async_commit();
#endif
            uint32_t off0, off1;
            if constexpr (SW) {  // the rows in their own matrix (up's for warpgroup 1)
                off0 = q6k_off<F>(wlo, row_bytes, n0 + row0 - 64 * wg, n, sb);
                off1 = q6k_off<F>(wlo, row_bytes, n0 + row0 - 64 * wg + 8, n, sb);
            } else {
                off0 = q6k_off<F>(wlo, row_bytes, n0 + row0, n, sb);
                off1 = q6k_off<F>(wlo, row_bytes, n0 + row0 + 8, n, sb);
            }
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                const int t = 4 * s + p;
#if GEMM_XH
                if (p == 0 && s + 1 < nsb)
                    stage_raw<F, SW>(R0 + ((s + 1) & 1) * qwg::BN * G<F>::RS, w, w2, row_bytes, n0, n, sb + 1, tid);
                if (t + 2 < T)
                    issue_xh<F>(X0 + ((t + 2) % NXB) * XT, xh, m0, m, k, 256 * (sb + ((p + 2) >> 2)), (p + 2) & 3, tid);
                cp_async_commit();
#endif
                wgmma_substep<F>(acc, af[p & 1], R, S, row0, off0, off1, p, c, smem_u32(X0 + (t % NXB) * XT));
                wgmma_wait<1>();  // group t - 1 done: its A registers and (with the barrier) its x buffer are free
#if GEMM_XH
                cp_async_wait1();  // every copy but this substep's: substep t + 1's x, the weights issued before
                fence_proxy_async();  // the copies, read next by the async proxy (wgmma)
#else
                if (t + 1 < T) {
                    store_x_sw(xr, X0 + ((t + 1) % NXB) * XT, tid);
                    fence_proxy_async();  // generic-proxy stores, read next by the async proxy (wgmma)
                }
                if (t + 2 < T) load_x<F>(xr, x, m0, m, k, 256 * (sb + ((p + 2) >> 2)), (p + 2) & 3, tid);
                if (p == 3) cp_async_wait_all();
#endif
                __syncthreads();
            }
            if (s + 1 < nsb) {
                stage_scales<F, SW>(S, R0 + ((s + 1) & 1) * qwg::BN * G<F>::RS, wlo, w, w2, row_bytes, n0, n, sb + 1,
                                    tid);
                __syncthreads();
            }
        }
        wgmma_wait<0>();
    } else {
        pdl_wait();
    }
#if GEMM_PDL_LATE
    pdl_launch_dependents();  // the next kernel's blocks may take this SM's room only from here (the epilogue) on
#endif
    if constexpr (SW) {
        gemm_swiglu_epilogue(acc, X0, m, n, m0, n0, rank, row0 - 64 * wg, wg, tid, y, xh_out);
        return;
    }

    bool store = true;
#if GEMM_SPLIT == 2
    {
        // warpgroup `rank` of each CTA stores its 64 rows; the other sends its partial sums to the peer's same
        // warpgroup (the same rows and tokens, the other half of k)
        cg::cluster_group cluster = cg::this_cluster();
        cluster.sync();  // both CTAs are done with their shared memory
        float4* red = reinterpret_cast<float4*>(X0);
        const int i = tid & 127;
        if (wg != rank) {
            float4* dst = cluster.map_shared_rank(red, rank ^ 1);
#pragma unroll
            for (int q = 0; q < 16; ++q)
                dst[q * 128 + i] = make_float4(acc[4 * q], acc[4 * q + 1], acc[4 * q + 2], acc[4 * q + 3]);
        }
        cluster.sync();
        if (wg == rank) {
#pragma unroll
            for (int q = 0; q < 16; ++q) {
                const float4 v = red[q * 128 + i];
                acc[4 * q] += v.x;
                acc[4 * q + 1] += v.y;
                acc[4 * q + 2] += v.z;
                acc[4 * q + 3] += v.w;
            }
        } else {
            store = false;
        }
    }
#endif
    if (!store) return;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = n0 + row0 + 8 * h;
        if (row >= n) continue;
        const float b = bias ? bias[row] : 0.f;
#pragma unroll
        for (int j = 0; j < 16; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int tok = m0 + 8 * j + 2 * c + e;
                if (tok < m) y[(size_t)tok * n + row] = acc[4 * j + 2 * h + e] + b;
            }
    }
}
#define GEMM_BODY gemm_wgmma
#define GEMM_ENTRY_WAIT()  // gemm_wgmma waits itself, once its first weight copies are issued
#if GEMM_PDL_LATE
#define GEMM_ENTRY_TRIGGER()  // gemm_wgmma triggers its dependents after its main loop
#endif
#else
#define GEMM_BODY gemm
#define GEMM_ENTRY_WAIT() pdl_wait()
#endif

}  // namespace

#ifndef GEMM_ENTRY_TRIGGER
#define GEMM_ENTRY_TRIGGER() pdl_launch_dependents()
#endif

#if GEMM_SPLIT == 2
#define GEMM_ATTRS __cluster_dims__(1, 1, 2) __launch_bounds__(THREADS, 1)
#else
#define GEMM_ATTRS __launch_bounds__(THREADS, 1)
#endif

#define QTRT_GEMM(NAME, F)                                                                                        \
    extern "C" __global__ void GEMM_ATTRS NAME(const float* x, const uint8_t* __restrict__ w,                      \
                                               const float* __restrict__ bias, int m, int n, int k,                \
                                               float* __restrict__ y) {                                            \
        GEMM_ENTRY_TRIGGER();                                                                                      \
        GEMM_ENTRY_WAIT();                                                                                         \
        GEMM_BODY<F>(x, w, bias, m, n, k, y);                                                                      \
    }

QTRT_GEMM(q4k_gemm, Q4K)
QTRT_GEMM(q6k_gemm, Q6K)

#if GEMM_WGMMA
// The gate and up projections and SwiGLU of a prefill step in one kernel (wgmma builds only; the cuda backend's plans
// on compute capability 9.0): y[m, n] = silu(x wg^T) * (x wu^T), wg and wu the raw rows of two matrices of the same
// format and shape [n, k] (no bias). With XH_OUT=1 the result goes only to xh (the fp16 copy the down projection's
// GEMM_XH build reads, in its layout), y is not written. n % 16 == 0 besides the GEMM's requirements.
// LAUNCH: the wgmma GEMM's (quant_gemm_wgmma.cuh) with grid x = cdiv(n, 64): each CTA 64 rows of each matrix.
#if XH_OUT
#define SWIGLU_XH , __half* __restrict__ xh
#define SWIGLU_XH_ARG xh
#else
#define SWIGLU_XH
#define SWIGLU_XH_ARG nullptr
#endif
#define QTRT_GEMM_SWIGLU(NAME, F)                                                                                 \
    extern "C" __global__ void GEMM_ATTRS NAME(const float* x, const uint8_t* __restrict__ wg,                     \
                                               const uint8_t* __restrict__ wu, int m, int n, int k,                \
                                               float* __restrict__ y SWIGLU_XH) {                                  \
        if (n % 16) __trap(); /* 16 rows per thread in the epilogue; the runtime never launches such an n */     \
        GEMM_ENTRY_TRIGGER(); /* gemm_wgmma waits (pdl_wait) after its first weight copies */                     \
        gemm_wgmma<F, true>(x, wg, nullptr, m, n, k, y, wu, SWIGLU_XH_ARG);                                        \
    }

QTRT_GEMM_SWIGLU(q4k_gemm_swiglu, Q4K)
QTRT_GEMM_SWIGLU(q6k_gemm_swiglu, Q6K)
#endif

// x (float32 [m][k]) -> xh (fp16 [m][k], each 16-element chunk in the fragments' k order: word c = (x[4c], x[4c+2]),
// word 4 + c = (x[4c+1], x[4c+3]), as store_x writes it to shared memory): the input of the GEMM_XH build, made once
// per activation and read by every GEMM of it (q, k, v; gate, up). One thread per chunk; k % 16 == 0, x 16-aligned.
// LAUNCH: block (256, 1, 1), grid (cdiv(m * k, 16 * 256), 1, 1).
extern "C" __global__ void __launch_bounds__(256) gemm_x_f16(const float* x, int m, int k,  // x: no __restrict__
                                                             uint4* __restrict__ xh) {
    pdl_launch_dependents();
    pdl_wait();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;  // chunk
    if (i >= (size_t)m * k / 16) return;
    const float4* p = reinterpret_cast<const float4*>(x) + 4 * i;
    const float4 a = p[0], b = p[1], c = p[2], d = p[3];
    xh[2 * i] = make_uint4(pack_h2(a.x, a.z), pack_h2(b.x, b.z), pack_h2(c.x, c.z), pack_h2(d.x, d.z));
    xh[2 * i + 1] = make_uint4(pack_h2(a.y, a.w), pack_h2(b.y, b.w), pack_h2(c.y, c.w), pack_h2(d.y, d.w));
}
