// Tensor-core GEMMs for few tokens (batched decode, short prompt pieces: SKINNY_MIN_M <= m < GEMM_MIN_M,
// toolchain/cuda_backend.py), each with the ABI of the op it replaces:
//     q4k_gemm_skinny, q6k_gemm_skinny     (x, w, bias, m, n, k, y)                      as q4k_matmul / q6k_matmul
//     matmul_add_skinny       [W_TYPE]     (x, w, bias, residual, m, n, k, y [, ssq])    as matmul_add
//     rms_norm_qkv_skinny     [Q/K/V_TYPE] (x, norm_w, wq, bq, wk, bk, wv, bv, m, hidden, q_dim, kv_dim, q, k, v
//                                           [, ssq])
//     rms_norm_swiglu_skinny  [GATE/UP_TYPE] (x, norm_w, w_gate, w_up, m, hidden, ffn, y [, ssq])
// (docs/ops.md; the fused ones exist where their type defines are given, Q4K or Q6K each, and RMS_EPS; ssq only in
// the SK_SSQ_OUT / SK_SSQ_IN builds, below.)
//
// Why: a decode step streams every weight once, whatever m is, so its time is the weights' bytes over the bandwidth
// as long as the arithmetic per byte stays off the critical path. The matvec core (qmv1.cuh) pays CUDA-core work per
// token and weight (step 2x the m = 1 step at m = 4, 6.7x at 16); the prefill GEMM wastes 128-token tiles and has one
// CTA per 96 rows (at m = 32 it reads the weights at ~0.2 TB/s). Here the arithmetic per weight is one mma per 16
// tokens, and the grid is made to keep HBM busy:
// - CTA tile 16 tokens x 128 weight rows, 8 warps side by side on the rows (warp tile 16 x 16: 2 n8 tiles), the same
//   fragment code as the prefill GEMM (plugins/quant_mma.cuh: raw weight bytes in shared memory, dequantized straight
//   into B fragments). m > 16 takes grid.y tiles of 16 tokens (their weight reads after the first hit L2).
//   rms_norm_qkv: the q, k and v tiles are one list along grid x. rms_norm_swiglu: 64 rows of gate (warps 0-3) and
//   the same 64 rows of up (warps 4-7) per CTA, meeting in shared memory.
// - Split-K over a thread-block cluster of SK_SPLIT CTAs (grid z, compile-time cluster dims: a plain cuLaunchKernel
//   launches it): rank r takes superblocks [nb r / S, nb (r+1) / S). Small-n projections (q, k, v, o; ffn_down's
//   k = 8960) would otherwise leave most SMs idle. The ranks reduce through distributed shared memory: the warps of
//   one rank (owner below) sum the partial tiles of their warp positions from every rank and store them.
// - SK_WARPRING (on, 2026-12-07): each warp streams its own 16 rows' raw superblocks through its own ring of SK_STAGES
//   (2) stages in shared memory (cp.async; the warp waits for its own copies: cp.async.wait_group + __syncwarp, no CTA
//   barrier a superblock), so the warps drift apart and one's wait hides under another's dequantization. x is made
//   the fp16 A fragments (the norm applied) straight from global memory for a window of SK_XSB (4) superblocks at a
//   time, the CTA's one barrier pair a window. ~100 KB of shared memory: two CTAs per SM (4 warps per scheduler; the
//   next kernel's CTAs start under programmatic dependent launch). Each warp turns its own rows' scales into fp16
//   pairs (QMMA_SCALES_H2, on: in half2 arithmetic, plugins/quant_mma.cuh). SK_WARPRING=0 is the build before it:
//   one ring of stages for the CTA (raw weights, x of 16 tokens x 256 as fp32, the norm weight), one
//   __syncthreads per superblock, and with SK_XF16 the stage's x made fragments once by the CTA.
// - RMSNorm (the fused ones): each CTA sums x^2 over its k share (a pass over x from L2 while the first stages are in
//   flight), the ranks add their partials through distributed shared memory (rank order: the same bits everywhere),
//   and x * (1 / rms) * norm_w is what becomes the fp16 operand (x alone may exceed fp16's range).
// - The sums of x^2 from the producer (SK_SSQ_OUT / SK_SSQ_IN, the cuda backend's tuning ssq_by_producer): a
//   matmul_add_skinny built with SK_SSQ_OUT=1 takes one more output, ssq [m][n / 16] (n % 16 == 0): each 16-column
//   group's sum of its stored y^2 (y = residual + x W^T + b, as stored), summed in a fixed order by the warp that
//   stores the group. A fused one built with SK_SSQ_IN=1 takes ssq as one more input and reads its tokens' sums (each
//   token's k / 16 groups added in a fixed order by one warp) instead of its pass over x and the cluster's exchange of
//   partials: at m = 16 every SwiGLU CTA read its tokens' x from L2 twice, once for this (~14 MB a launch each pass,
//   against 15.5 MB of weights). Not the same bits as the pass (another order of the same sum); deterministic.
//   8-warp tiles only (SK_WARPS=8: a warp stores 16 columns).
// - Programmatic dependent launch: the first stages' weights are in flight before pdl_wait() (plugins/pdl.cuh);
//   x, the residual and every write come after it.
// Defines timed against each other (defaults in kernels.py SKINNY_*, docs/perf-notes.md has the H100 timings):
// SK_WARPRING 0/1, SK_XSB, QMMA_SCALES_H2 0/1, SK_STAGES 2-4, SK_XF16 0/1 (SK_WARPRING=0), and two that did not
// help (SK_WARPRING=0 builds): SK_WARPS 16 (16 warps of one n8 tile each),
// SK_SUB_UNROLL 1 (a loop over the superblock's substeps: less code to fetch for qkv's and o's one-superblock CTAs).
//
// LAUNCH (toolchain/kernels.py launch_config): block 32 SK_WARPS; grid (tiles, cdiv(m, 16), SK_SPLIT) with tiles =
// cdiv(n, 128) (q: + cdiv(kv_dim, 128) twice; swiglu: cdiv(ffn, 64)); dynamic shared memory SMEM_BYTES (above 48 KB:
// the launcher raises the function's limit first; the kernel traps if launched with less).
// Requirements: k % 256 == 0; x, residual 16-byte aligned; Q4_K: w 16-byte aligned (Q6_K: 2-aligned);
// 1 <= SK_SPLIT <= 8.
// Accuracy: fp16 operands, fp32 accumulation (as quant_gemm.cu): relative error ~3e-4; |x| < 65504 (after the norm).
#include <cooperative_groups.h>

#ifndef QMMA_SCALES_H2
#define QMMA_SCALES_H2 1  // 1: the scales' fp16 pairs in half2 arithmetic (plugins/quant_mma.cuh; the same bits)
#endif
#include "pdl.cuh"
#include "proj_args.cuh"
#include "quant_mma.cuh"

namespace cg = cooperative_groups;
using namespace qmma;

#ifndef SK_SPLIT
#define SK_SPLIT 1
#endif
#ifndef SK_STAGES
#define SK_STAGES 2
#endif
#ifndef SK_XF16
#define SK_XF16 1  // 1: the CTA makes each stage's x fp16 A fragments once (norm applied); warps load them
#endif
#ifndef SK_WARPS
#define SK_WARPS 8  // 16: 16 warps of one n8 tile each on the same 128-row tile (slower on the H100)
#endif
#ifndef SK_WARPRING
#define SK_WARPRING 1  // 1: each warp streams its own rows through its own ring; x fragments made per window (below)
#endif
#ifndef SK_XSB
#define SK_XSB 4  // SK_WARPRING: superblocks of x fragments made at once (a window)
#endif
#ifndef SK_SUB_UNROLL
#define SK_SUB_UNROLL 4  // 1: the superblock's 4 substeps as a loop (less code; no gain on the H100)
#endif
#ifndef RMS_EPS
#define RMS_EPS 1e-6
#endif
#ifndef SK_SSQ_OUT
#define SK_SSQ_OUT 0  // matmul_add_skinny: one more output, ssq (below)
#endif
#ifndef SK_SSQ_IN
#define SK_SSQ_IN 0  // rms_norm_qkv_skinny / rms_norm_swiglu_skinny: one more input, ssq (below)
#endif
#if SK_SSQ_OUT && SK_SSQ_IN
#error "SK_SSQ_OUT (matmul_add_skinny's) and SK_SSQ_IN (the fused ones') are builds of their own"
#endif
#if SK_SSQ_OUT
#define SK_SSQ_PARAM , float* __restrict__ ssq
#define SK_SSQ_SET a.ssq = ssq;
#elif SK_SSQ_IN
#define SK_SSQ_PARAM , const float* ssq
#define SK_SSQ_SET a.ssq = const_cast<float*>(ssq);
#else
#define SK_SSQ_PARAM
#define SK_SSQ_SET
#endif

namespace {

enum Kind { PLAIN, ADD, QKV, SWIGLU };

constexpr int WARPS = SK_WARPS, NT8 = 16 / WARPS, THREADS = 32 * WARPS, WROWS = 8 * NT8;  // WROWS: a warp's rows
constexpr int BM = 16, BN = 8 * NT8 * WARPS;  // CTA tile: 16 tokens x 128 rows (swiglu: 64 gate + 64 up rows)
constexpr int STAGES = SK_STAGES, SPLIT = SK_SPLIT;
constexpr int XR = 256 + 16;                  // x stage row stride in floats: lanes (g, c) read 16 B at 64g + 16c
constexpr bool WRING = SK_WARPRING, XFRAG = SK_XF16 || WRING;
constexpr int XSB = WRING ? SK_XSB : 1;       // superblocks of x fragments in shared memory
constexpr int X_BYTES = WRING ? 0 : BM * XR * 4;  // one stage of x (SK_WARPRING: none, x goes straight to fragments)
constexpr int N_BYTES = WRING ? 0 : 256 * 4;      // one stage of the norm weight
constexpr int W_BYTES = BN * 240;             // one stage of weights: 128 rows of the widest format (Q6_K)
constexpr int S_BYTES = BN * 64;              // the warps' rows' scales
// the x fragments of XSB superblocks (16 chunks x 32 lanes x 16 bytes each): SK_XF16's stage, SK_WARPRING's window
constexpr int XF_BYTES = XFRAG ? XSB * 16 * 32 * 16 : 0;
// x stages | norm stages | weight stages | scales | x^2 partials [16] | 1 / rms [16] | x fragments
constexpr int SMEM_BYTES = STAGES * (X_BYTES + N_BYTES + W_BYTES) + S_BYTES + 2 * 64 + XF_BYTES;
static_assert(WRING || STAGES != 4 || SK_XF16 || SMEM_BYTES == 204928, "shared memory (kernels.py skinny_smem_bytes)");
static_assert(SMEM_BYTES <= 227 * 1024, "fits one SM");
static_assert(SPLIT >= 1 && SPLIT <= 8, "a portable cluster has at most 8 CTAs");
static_assert(STAGES >= 2, "a ring");
static_assert(WARPS == 8 || WARPS == 16, "8 warps of 2 n8 tiles or 16 of 1 (kernels.skinny_dims)");
static_assert(WARPS * NT8 * 32 * 16 <= STAGES * (WRING ? W_BYTES : X_BYTES),
              "the partial tiles fit the x ring (SK_WARPRING: the weight ring)");
static_assert(!WRING || (XSB >= 1 && WARPS == 8), "SK_WARPRING: 8-warp tiles, XSB >= 1");
static_assert(WARPS * NT8 * 32 * 16 <= STAGES * W_BYTES, "the up tiles fit the weight ring");
static_assert(!SK_SSQ_OUT || WROWS == 16, "SK_SSQ_OUT: each warp stores whole 16-column groups (8-warp tiles)");

struct Args : ProjArgs {  // plugins/proj_args.cuh, and
    float* ssq;  // SK_SSQ_OUT / SK_SSQ_IN: the sums of y^2 per 16 columns (written / read)
};

__device__ __forceinline__ void cp_async_wait_ring() {  // all but the STAGES-2 most recent groups have landed
    asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2) : "memory");
}

extern __shared__ __align__(16) uint8_t skinny_smem[];

// The A fragment (x, 16 tokens x 16 k, quant_mma.cuh's permuted k) of lane (g, c) for the 16 elements from e - 4c:
// rows g and g + 8 of the x stage X at elements e .. e + 3, with the norm (NWs: the stage's norm weight; il, ih: the
// two rows' 1 / rms) where NORM.
// (u: row g's 4 elements, v: row g + 8's, nw: the norm weight's, il / ih: the rows' 1 / rms, where NORM)
template <bool NORM>
__device__ __forceinline__ uint4 pack_fragment(float4 u, float4 v, float4 nw, float il, float ih) {
    if constexpr (NORM) {
        u = make_float4(u.x * il * nw.x, u.y * il * nw.y, u.z * il * nw.z, u.w * il * nw.w);
        v = make_float4(v.x * ih * nw.x, v.y * ih * nw.y, v.z * ih * nw.z, v.w * ih * nw.w);
    }
    return make_uint4(pack_h2(u.x, u.z), pack_h2(v.x, v.z), pack_h2(u.y, u.w), pack_h2(v.y, v.w));
}
template <bool NORM>
__device__ __forceinline__ uint4 a_fragment(const float* X, const float* NWs, int e, int g, float il, float ih) {
    const float4 nw = NORM ? *reinterpret_cast<const float4*>(NWs + e) : make_float4(1.f, 1.f, 1.f, 1.f);
    return pack_fragment<NORM>(*reinterpret_cast<const float4*>(X + g * XR + e),
                               *reinterpret_cast<const float4*>(X + (g + 8) * XR + e), nw, il, ih);
}

// SK_XF16: a stage's x (X, its norm weight NWs, the tokens' 1 / rms inv where NORM) as the A fragments of all warps,
// made once by the CTA's threads: chunk ch (elements 16ch..), lane (g, c): rows g and g + 8, elements 16ch + 4c.. +3
// (quant_mma.cuh's permuted k)
template <bool NORM>
__device__ __forceinline__ void stage_fragments(uint4* XF, const uint8_t* Xs, const uint8_t* Ns, const float* inv,
                                                int tid) {
    const float* X = reinterpret_cast<const float*>(Xs);
    const float* NWs = reinterpret_cast<const float*>(Ns);
    for (int q = tid; q < 16 * 32; q += THREADS) {
        const int ch = q >> 5, ln = q & 31, fg = ln >> 2;
        XF[q] = a_fragment<NORM>(X, NWs, 16 * ch + 4 * (ln & 3), fg, NORM ? inv[fg] : 1.f, NORM ? inv[fg + 8] : 1.f);
    }
}

// SK_WARPRING: the A fragments of superblocks sb .. sb + nsbw - 1 of the token tile's x (rows m0 .. m0 + rows - 1 of
// a.x, the rest zero), read from global memory, as stage_fragments lays out one stage: window chunk ch (16 elements
// from 256 sb + 16 ch), lane (g, c).
template <bool NORM>
__device__ __forceinline__ void window_fragments(uint4* XF, const Args& a, int m0, int rows, int sb, int nsbw,
                                                 const float* inv, int tid) {
    const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int q = tid; q < nsbw * 16 * 32; q += THREADS) {
        const int ch = q >> 5, ln = q & 31, fg = ln >> 2;
        const size_t e = (size_t)256 * sb + 16 * ch + 4 * (ln & 3);
        const float4 u =
            fg < rows ? ld_produced(reinterpret_cast<const float4*>(a.x + (size_t)(m0 + fg) * a.k + e)) : zero;
        const float4 v =
            fg + 8 < rows ? ld_produced(reinterpret_cast<const float4*>(a.x + (size_t)(m0 + fg + 8) * a.k + e)) : zero;
        const float4 nw = NORM ? *reinterpret_cast<const float4*>(a.norm_w + e) : make_float4(1.f, 1.f, 1.f, 1.f);
        XF[q] = pack_fragment<NORM>(u, v, nw, NORM ? inv[fg] : 1.f, NORM ? inv[fg + 8] : 1.f);
    }
}

// The rank whose warp stores warp position `warp` after the split-K reduction (swiglu: gate warp w and up warp w + 4
// in the same rank, which pairs them in its shared memory).
template <Kind K> __device__ __forceinline__ int owner(int warp) {
    return (K == SWIGLU ? warp & (WARPS / 2 - 1) : warp) % SPLIT;
}

// A tile's results (acc: this warp's, summed over all of k) to y[mat]: the bias, the residual (ADD), SwiGLU (the up
// warps' values reach the gate warps through `xch`, shared memory of WARPS / 2 x NT8 x 32 float4 that no warp reads
// meanwhile), written by the warps that `store`. Every thread of the CTA calls it (SwiGLU has a barrier).
template <Kind K>
__device__ __forceinline__ void store_tile(const Args& a, int mat, int n0, float (&acc)[NT8][4], bool store, int part,
                                           int warp, int lane, float4* xch) {
    constexpr bool TWO = K == SWIGLU;
    constexpr int PWARPS = TWO ? WARPS / 2 : WARPS;
    const int g = lane >> 2, c = lane & 3;
    const int wr0 = (warp % PWARPS) * WROWS;
    if constexpr (TWO) {  // up values to the gate warps of the same CTA
        if (store && part == 1) {
#pragma unroll
            for (int j = 0; j < NT8; ++j)
                xch[((warp - PWARPS) * NT8 + j) * 32 + lane] = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
        }
        __syncthreads();
        if (!store || part == 1) return;
#pragma unroll
        for (int j = 0; j < NT8; ++j) {
            const float4 u = xch[(warp * NT8 + j) * 32 + lane];
            acc[j][0] = acc[j][0] / (1.f + __expf(-acc[j][0])) * u.x;
            acc[j][1] = acc[j][1] / (1.f + __expf(-acc[j][1])) * u.y;
            acc[j][2] = acc[j][2] / (1.f + __expf(-acc[j][2])) * u.z;
            acc[j][3] = acc[j][3] / (1.f + __expf(-acc[j][3])) * u.w;
        }
    }
    if (!store) return;
    const int n = a.n[mat];
    const int m0 = blockIdx.y * BM;
    float* const y = a.y[mat];
    const float* const bias = K == SWIGLU ? nullptr : a.bias[mat];
    const bool even = (n & 1) == 0;
    float sq[2] = {0.f, 0.f};  // SK_SSQ_OUT: this lane's share of y^2 in tokens g and g + 8 (columns in j order)
#pragma unroll
    for (int j = 0; j < NT8; ++j) {
        const int col = n0 + wr0 + 8 * j + 2 * c;
        if (col >= n) continue;
        const bool two = col + 1 < n;
        const float b0 = bias ? bias[col] : 0.f, b1 = (bias && two) ? bias[col + 1] : 0.f;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int row = m0 + 8 * hh + g;
            if (row >= a.m) continue;
            const size_t idx = (size_t)row * n + col;
            float v0 = acc[j][2 * hh] + b0, v1 = acc[j][2 * hh + 1] + b1;
            if constexpr (K == ADD) {  // residual + (x W^T + b), the reference's order
                v0 = ld_produced(a.residual + idx) + v0;
                if (two) v1 = ld_produced(a.residual + idx + 1) + v1;
            }
            if (two && even) {
                *reinterpret_cast<float2*>(y + idx) = make_float2(v0, v1);
            } else {
                y[idx] = v0;
                if (two) y[idx + 1] = v1;
            }
            if constexpr (K == ADD && SK_SSQ_OUT) sq[hh] += v0 * v0 + (two ? v1 * v1 : 0.f);
        }
    }
    if constexpr (K == ADD && SK_SSQ_OUT) {  // the warp's 16 columns: the quad's lanes c = 0..3 summed in a tree
        const int col0 = n0 + wr0;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float v = sq[hh];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            const int row = m0 + 8 * hh + g;
            if (c == 0 && row < a.m && col0 < n) a.ssq[(size_t)row * (n / 16) + col0 / 16] = v;
        }
    }
}

// One CTA's tile. Part 0: weight rows n0.. of matrix `mat` (format F0), by every warp, or (swiglu) gate rows by warps
// 0-3; part 1 (swiglu only): the same rows of up (format F1) by warps 4-7.
template <Kind K, class F0, class F1>
__device__ __forceinline__ void tile(const Args& a, int mat, int n0) {
    constexpr bool NORM = K == QKV || K == SWIGLU, TWO = K == SWIGLU;
    constexpr int PROWS = TWO ? BN / 2 : BN, PTHREADS = TWO ? THREADS / 2 : THREADS, PWARPS = PTHREADS / 32;
    uint8_t* const X0 = skinny_smem;
    uint8_t* const N0 = X0 + STAGES * X_BYTES;
    uint8_t* const W0 = N0 + STAGES * N_BYTES;
    float* const ss = reinterpret_cast<float*>(W0 + STAGES * W_BYTES + S_BYTES);  // [16] this rank's sums of x^2
    float* const inv = ss + 16;                                                     // [16] 1 / rms per token
    uint4* const XF = reinterpret_cast<uint4*>(inv + 16);  // SK_XF16: [16 chunks][32]; SK_WARPRING: [16 XSB][32]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
    const int part = TWO ? warp / PWARPS : 0, ptid = tid - part * PTHREADS;
    uint8_t* const S = W0 + STAGES * W_BYTES + warp * WROWS * 64;  // this warp's rows' scales
    const int m0 = blockIdx.y * BM, rows = min(BM, a.m - m0), k = a.k, nb = k / 256;
    const int rank = SPLIT > 1 ? (int)blockIdx.z : 0;
    const int sb0 = nb * rank / SPLIT, nsb = nb * (rank + 1) / SPLIT - sb0;
    const int wr0 = (warp % PWARPS) * WROWS;  // this warp's first row in its part
    const int n = a.n[mat];
    const uint8_t* const w0 = a.w[mat];
    const uint8_t* const w1 = TWO ? a.w[1] : w0;
    const size_t rb0 = (size_t)nb * F0::BB, rb1 = (size_t)nb * F1::BB;
    const uint32_t wlo = (uint32_t)reinterpret_cast<uintptr_t>(part ? w1 : w0);
    const size_t row_bytes = part ? rb1 : rb0;

    auto issue_w = [&](int st, int sb) {  // this stage's weights (part 1 right after part 0's PROWS rows)
        uint8_t* dst = W0 + st * W_BYTES;
        if constexpr (WRING) {  // this warp's rows only, by its lanes
            if (!TWO || part == 0)
                Fmt<F0>::template issue_raw<WROWS, 32>(dst + wr0 * G<F0>::RS, w0, rb0, n0 + wr0, n, sb, lane);
            else
                Fmt<F1>::template issue_raw<WROWS, 32>(dst + PROWS * G<F0>::RS + wr0 * G<F1>::RS, w1, rb1, n0 + wr0,
                                                       n, sb, lane);
            return;
        }
        if (!TWO || part == 0)
            Fmt<F0>::template issue_raw<PROWS, PTHREADS>(dst, w0, rb0, n0, n, sb, ptid);
        else
            Fmt<F1>::template issue_raw<PROWS, PTHREADS>(dst + PROWS * G<F0>::RS, w1, rb1, n0, n, sb, ptid);
        if (NORM && tid < 64) cp_async16(N0 + st * N_BYTES + 16 * tid, a.norm_w + 256 * sb + 4 * tid);
    };
    auto issue_x = [&](int st, int sb) {
        for (int id = tid; id < rows * 64; id += THREADS) {
            const int r = id >> 6, ch = id & 63;
            cp_async16(X0 + st * X_BYTES + (r * XR + 4 * ch) * 4, a.x + (size_t)(m0 + r) * k + 256 * sb + 4 * ch);
        }
    };

    // x rows past m are never copied: zero them once, so the mma reads finite values (their outputs are dropped;
    // SK_WARPRING has no x stages: its fragments of those rows are made zero)
    if constexpr (!WRING) {
        for (int i = tid; i < STAGES * (BM - rows) * XR; i += THREADS) {
            const int s = i / ((BM - rows) * XR), r = i - s * (BM - rows) * XR;
            reinterpret_cast<float*>(X0 + s * X_BYTES)[rows * XR + r] = 0.f;
        }
    }
    // prologue: the first STAGES-1 stages' weights before pdl_wait (they depend on no kernel), then their x
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < nsb) issue_w(st, sb0 + st);
        if (WRING) cp_async_commit();
    }
    pdl_wait();
    if constexpr (!WRING) {
        for (int st = 0; st < STAGES - 1; ++st) {
            if (st < nsb) issue_x(st, sb0 + st);
            cp_async_commit();
        }
    }
    float ir_lo = 1.f, ir_hi = 1.f;  // 1 / rms of tokens g and g + 8
    if constexpr (NORM) {  // 1 / rms of the tile's tokens into inv
        if constexpr (SK_SSQ_IN) {  // the producer's sums of x^2: warp w adds tokens TPW w ..'s groups
            constexpr int TPW = BM / WARPS;  // (their loads issued together: one L2 round trip)
            const int ng = k / 16, t0 = TPW * warp;
            float acc[TPW];
#pragma unroll
            for (int u = 0; u < TPW; ++u) acc[u] = 0.f;
#pragma unroll 4
            for (int i = lane; i < ng; i += 32) {
#pragma unroll
                for (int u = 0; u < TPW; ++u)
                    if (t0 + u < rows) acc[u] += ld_produced(a.ssq + (size_t)(m0 + t0 + u) * ng + i);
            }
#pragma unroll
            for (int u = 0; u < TPW; ++u) {
#pragma unroll
                for (int o = 16; o; o >>= 1) acc[u] += __shfl_xor_sync(0xffffffffu, acc[u], o);
                if (lane == 0) inv[t0 + u] = 1.f / sqrtf(acc[u] / (float)k + (float)(RMS_EPS));
            }
        } else {
            // sums of x^2 over this rank's k share: warp w takes tokens BM / WARPS w .. (16 tokens)
            for (int t = BM / WARPS * warp; t < BM / WARPS * (warp + 1); ++t) {
                float acc = 0.f;
                if (t < rows) {
                    const float4* xr = reinterpret_cast<const float4*>(a.x + (size_t)(m0 + t) * k + 256 * sb0);
                    for (int i = lane; i < nsb * 64; i += 32) {
                        const float4 v = ld_produced(xr + i);
                        acc += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
                    }
                }
#pragma unroll
                for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
                if (lane == 0) ss[t] = acc;
            }
            if constexpr (SPLIT > 1) {
                cg::cluster_group cluster = cg::this_cluster();
                cluster.sync();  // every rank's partials are written
                if (tid < BM) {
                    float tot = 0.f;
                    for (int r = 0; r < SPLIT; ++r) tot += cluster.map_shared_rank(ss, r)[tid];
                    inv[tid] = 1.f / sqrtf(tot / (float)k + (float)(RMS_EPS));
                }
            } else {
                __syncthreads();
                if (tid < BM) inv[tid] = 1.f / sqrtf(ss[tid] / (float)k + (float)(RMS_EPS));
            }
        }
        __syncthreads();
        ir_lo = inv[g];
        ir_hi = inv[g + 8];
    }
    if constexpr (WRING) {  // the first window's x fragments
        window_fragments<NORM>(XF, a, m0, rows, sb0, min(XSB, nsb), inv, tid);
        __syncthreads();
    }

    float acc[NT8][4];
#pragma unroll
    for (int j = 0; j < NT8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;

    auto compute = [&](auto fmt, const uint8_t* R, const uint8_t* X, const uint8_t* NWs, int sb) {
        using F = decltype(fmt);
        Fmt<F>::template scales<WROWS, 32>(S, R + wr0 * G<F>::RS, wlo, row_bytes, n0 + wr0, n, sb, lane);
        __syncwarp();
        uint32_t off[NT8];
#pragma unroll
        for (int j = 0; j < NT8; ++j) {
            if constexpr (F::BB == 210)
                off[j] = Fmt<Q6K>::row_off(wlo, row_bytes, min(n0 + wr0 + 8 * j + g, n - 1), sb);
            else
                off[j] = 0;
        }
#if SK_SUB_UNROLL == 1
#pragma unroll 1
#else
#pragma unroll
#endif
        for (int sub = 0; sub < 4; ++sub) {
            uint32_t bf[NT8][4][2];
#pragma unroll
            for (int j = 0; j < NT8; ++j) {
                const int row = wr0 + 8 * j + g;
                Fmt<F>::dequant(bf[j], R + row * G<F>::RS, S + (8 * j + g) * 64, off[j], sub, c);
            }
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const int cb = Fmt<F>::chunk_base(sub, kk);  // SK_XF16: the CTA made the fragment for this stage
                const uint4 f = XFRAG ? XF[((WRING ? (sb - sb0) % XSB * 16 : 0) + (cb >> 4)) * 32 + lane]
                                        : a_fragment<NORM>(reinterpret_cast<const float*>(X),
                                                           reinterpret_cast<const float*>(NWs), cb + 4 * c, g, ir_lo,
                                                           ir_hi);
                const uint32_t af[4] = {f.x, f.y, f.z, f.w};
#pragma unroll
                for (int j = 0; j < NT8; ++j) mma16816(acc[j], af, bf[j][kk][0], bf[j][kk][1]);
            }
        }
    };

    if constexpr (WRING) {
        for (int s = 0; s < nsb; ++s) {  // SK_WARPRING: each warp on its own; the CTA meets once a window
            const int sb = sb0 + s, st = s % STAGES;
            if (s > 0 && s % XSB == 0) {
                __syncthreads();  // every warp is done with the last window
                window_fragments<NORM>(XF, a, m0, rows, sb, min(XSB, nsb - s), inv, tid);
                __syncthreads();
            }
            cp_async_wait_ring();  // this warp's stage s has landed (this lane's copies) ...
            __syncwarp();          // ... and its other lanes'; they are also done with stage s - 1, refilled now
            {
                const int t = s + STAGES - 1;
                if (t < nsb) issue_w(t % STAGES, sb0 + t);
                cp_async_commit();
            }
            const uint8_t* R = W0 + st * W_BYTES;
            if (!TWO || part == 0)
                compute(F0{}, R, nullptr, nullptr, sb);
            else
                compute(F1{}, R + PROWS * G<F0>::RS, nullptr, nullptr, sb);
        }
    } else {
        for (int s = 0; s < nsb; ++s) {
            const int sb = sb0 + s, st = s % STAGES;
            cp_async_wait_ring();  // stage s has landed (this thread's copies) ...
            __syncthreads();       // ... and everyone's; everyone is also done with stage s - 1, which is refilled now
            {
                const int t = s + STAGES - 1, tst = t % STAGES;
                if (t < nsb) {
                    issue_w(tst, sb0 + t);
                    issue_x(tst, sb0 + t);
                }
                cp_async_commit();
            }
            if constexpr (SK_XF16) {
                stage_fragments<NORM>(XF, X0 + st * X_BYTES, N0 + st * N_BYTES, inv, tid);
                __syncthreads();  // (the next stage's pass waits behind the loop's first barrier: no warp reads XF)
            }
            const uint8_t* R = W0 + st * W_BYTES;
            if (!TWO || part == 0)
                compute(F0{}, R, X0 + st * X_BYTES, N0 + st * N_BYTES, sb);
            else
                compute(F1{}, R + PROWS * G<F0>::RS, X0 + st * X_BYTES, N0 + st * N_BYTES, sb);
        }
    }

    // split-K: the ranks' partial tiles meet in the owner's registers
    bool store = owner<K>(warp) == rank;
    if constexpr (SPLIT > 1) {
        cg::cluster_group cluster = cg::this_cluster();
        cp_async_wait_all();
        __syncthreads();  // the ring is free: the partial tiles go to the x stages (SK_WARPRING: the weight ring)
        float4* red = reinterpret_cast<float4*>(X0);
#pragma unroll
        for (int j = 0; j < NT8; ++j)
            red[(warp * NT8 + j) * 32 + lane] = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
        cluster.sync();  // every rank's partials are written
        if (store) {
#pragma unroll
            for (int r = 0; r < SPLIT; ++r) {
                if (r == rank) continue;
                const float4* src = cluster.map_shared_rank(red, r);
#pragma unroll
                for (int j = 0; j < NT8; ++j) {
                    const float4 p = src[(warp * NT8 + j) * 32 + lane];
                    acc[j][0] += p.x;
                    acc[j][1] += p.y;
                    acc[j][2] += p.z;
                    acc[j][3] += p.w;
                }
            }
        }
        cluster.sync();  // no rank leaves (freeing its shared memory) while another still reads it
    }
    if constexpr (TWO) {
        if (SPLIT == 1) {
            cp_async_wait_all();
            __syncthreads();  // the weight ring is free: the up values meet the gate warps there
        }
    }
    store_tile<K>(a, mat, n0, acc, store, part, warp, lane, reinterpret_cast<float4*>(W0));
}

}  // namespace

#if SK_SPLIT > 1
#define SKINNY_ATTRS __cluster_dims__(1, 1, SK_SPLIT) __launch_bounds__(THREADS, 1)
#else
#define SKINNY_ATTRS __launch_bounds__(THREADS, 1)
#endif
#define SKINNY_KERNEL extern "C" __global__ void SKINNY_ATTRS

#define QTRT_SKINNY(NAME, F)                                                                                      \
    SKINNY_KERNEL NAME(const float* x, const uint8_t* __restrict__ w, const float* __restrict__ bias, int m, int n, \
                       int k, float* __restrict__ y) {                                                             \
        pdl_launch_dependents();                                                                                   \
        trap_if_dynamic_smem_below(SMEM_BYTES);                                                                                              \
        Args a{};                                                                                                  \
        a.x = x; a.w[0] = w; a.bias[0] = bias; a.y[0] = y; a.n[0] = n; a.m = m; a.k = k;                            \
        tile<PLAIN, ggml::F, ggml::F>(a, 0, blockIdx.x * BN);                                                      \
    }

QTRT_SKINNY(q4k_gemm_skinny, Q4K)
QTRT_SKINNY(q6k_gemm_skinny, Q6K)

#ifdef W_TYPE
SKINNY_KERNEL matmul_add_skinny(const float* x, const uint8_t* __restrict__ w, const float* __restrict__ bias,
                                const float* residual, int m, int n, int k, float* __restrict__ y SK_SSQ_PARAM) {
    pdl_launch_dependents();
    trap_if_dynamic_smem_below(SMEM_BYTES);
    Args a{};
    a.x = x; a.w[0] = w; a.bias[0] = bias; a.residual = residual; a.y[0] = y; a.n[0] = n; a.m = m; a.k = k;
    SK_SSQ_SET
    tile<ADD, ggml::W_TYPE, ggml::W_TYPE>(a, 0, blockIdx.x * BN);
}
#endif

#if defined(Q_TYPE) && defined(K_TYPE) && defined(V_TYPE)
SKINNY_KERNEL rms_norm_qkv_skinny(const float* x, const float* __restrict__ norm_w, const uint8_t* __restrict__ wq,
                                  const float* __restrict__ bq, const uint8_t* __restrict__ wk,
                                  const float* __restrict__ bk, const uint8_t* __restrict__ wv,
                                  const float* __restrict__ bv, int m, int hidden, int q_dim, int kv_dim,
                                  float* __restrict__ q, float* __restrict__ k, float* __restrict__ v SK_SSQ_PARAM) {
    pdl_launch_dependents();
    trap_if_dynamic_smem_below(SMEM_BYTES);
    Args a{};
    a.x = x; a.norm_w = norm_w; a.m = m; a.k = hidden;
    SK_SSQ_SET
    a.w[0] = wq; a.bias[0] = bq; a.y[0] = q; a.n[0] = q_dim;
    a.w[1] = wk; a.bias[1] = bk; a.y[1] = k; a.n[1] = kv_dim;
    a.w[2] = wv; a.bias[2] = bv; a.y[2] = v; a.n[2] = kv_dim;
    const int tq = (q_dim + BN - 1) / BN, tk = (kv_dim + BN - 1) / BN;
    const int t = blockIdx.x;  // the q tiles, then k's, then v's (uniform per CTA)
    if (t < tq)
        tile<QKV, ggml::Q_TYPE, ggml::Q_TYPE>(a, 0, t * BN);
    else if (t < tq + tk)
        tile<QKV, ggml::K_TYPE, ggml::K_TYPE>(a, 1, (t - tq) * BN);
    else
        tile<QKV, ggml::V_TYPE, ggml::V_TYPE>(a, 2, (t - tq - tk) * BN);
}
#endif

#if defined(GATE_TYPE) && defined(UP_TYPE)
SKINNY_KERNEL rms_norm_swiglu_skinny(const float* x, const float* __restrict__ norm_w,
                                     const uint8_t* __restrict__ w_gate, const uint8_t* __restrict__ w_up, int m,
                                     int hidden, int ffn, float* __restrict__ y SK_SSQ_PARAM) {
    pdl_launch_dependents();
    trap_if_dynamic_smem_below(SMEM_BYTES);
    Args a{};
    a.x = x; a.norm_w = norm_w; a.m = m; a.k = hidden;
    SK_SSQ_SET
    a.w[0] = w_gate; a.n[0] = ffn; a.y[0] = y;
    a.w[1] = w_up; a.n[1] = ffn;
    tile<SWIGLU, ggml::GATE_TYPE, ggml::UP_TYPE>(a, 0, blockIdx.x * (BN / 2));
}
#endif
