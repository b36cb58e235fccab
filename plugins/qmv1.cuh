// Decode core of the projections (matmul_add, rms_norm_qkv, rms_norm_swiglu and the plain Q4_K / Q6_K matmuls such
// as the lm_head) for Q4_K / Q6_K weights: built with -DQMV1=1 -DQMV1_K=<k> -DQMV1_KW=<warps per row pair>
// -DQMV1_G=<groups per block> -DQMV1_MINB=<blocks per SM> -DQMV1_PD=<groups in flight per warp>
// [-DQMV1_NBW=<superblocks per warp>] [-DQMV1_MT=<tokens per block>] (toolchain/kernels.py decode_core), launched by
// the cuda backend for every step below the GEMM's threshold (m = 1: the batch-1 build; QMV1_MT: batched steps).
// docs/perf-notes.md "v5" to "v8" have the measurements that led here (k as a constant, one butterfly for both
// rows: +6% on the whole step; a shared-memory ring instead of register buffers: -9%; shorter k parts for
// ffn_down and the fused QKV: +1.4% and +1.3%; gate/up in 10-warp blocks: +1.2-1.7%).
//
// - A group is 2 weight rows that meet the same x (2 consecutive rows; rms_norm_swiglu: gate row r and up row r).
//   KW warps share a group, each owning <= NBW superblocks of k (default 6: 1536 elements); G groups run side by
//   side in a block. The layouts are toolchain/kernels.py's (decode_core): one warp of 6 per group and 8 warps per
//   block for k <= 1536 (Q4_K gate/up: 10); ffn_down 9 warps of 4 and 2 groups, one 18-warp block per SM; the fused
//   QKV 3 warps of 2 and 4 groups. A warp's 2 x 8 x NBW units (16 qs bytes of one row each) are NBW / 2 tasks per
//   lane, fixed for the whole kernel, so each lane's addresses and x offsets are computed once.
// - Weights go straight from HBM into registers (16-byte loads; Q6_K's 2-aligned blocks through aligned words and
//   funnel shifts; 8 words per task, 10 where the build has Q6_K rows), the next group's while the current one is
//   decoded. The first group's loads are issued before
//   pdl_wait(): with programmatic dependent launch they overlap the previous kernel's tail.
// - x is quantized once per block into shared memory (int16, a scale and a sum per 16 elements, RMSNorm first for
//   the fused norms), as in qmv.cuh; dot products in dp2a.
// - QMV1_MT=<tokens> (batched decode, 1 < m < the GEMM's threshold): a block computes its rows for MT tokens at
//   once (grid.y = cdiv(m, MT)): each weight is loaded and decoded once and meets the MT tokens' x, quantized side by
//   side in shared memory (dynamic: MT x ~2.25 bytes per element of k, plus the scales; toolchain/kernels.py
//   qmv1_smem_bytes mirrors Smem and the kernel traps if it is given less). The x loads of all MT tokens are in
//   flight together. Not with QMV1_XMERGE.
// - QMV1_XMERGE=<slots> (the o projection after rope_kv_attention's ATTN_XMERGE build; QMV1_XM_D = head dim,
//   QMV1_XM_CK = the attention's ATTN_CLUSTER_KEYS): the attention's clusters per kv head, C = ceil(T / CK) at most
//   <slots>, follow from the step's position, read before pdl_wait() like the attention does (an input of the step,
//   written before its first kernel). C = 1: x as always; else x is the merge of the C partials in a.xpart (k
//   numerators and a (max, sum) pair per head each), with the attention's own merge arithmetic.
#pragma once
#include "qmv.cuh"
#include "softmax_merge.cuh"

namespace qmv1 {
using namespace ggml;
using qmv::Kind;

#ifndef QMV1_KW
#define QMV1_KW 1
#endif
#ifndef QMV1_PD
#define QMV1_PD 2  // groups per warp in flight (register buffers): the one being decoded and PD - 1 loading
#endif
#ifndef QMV1_MINB
#define QMV1_MINB 2  // blocks per SM the build is made for (registers); toolchain/kernels.py sizes the grid with it
#endif
#ifndef QMV1_XMERGE
#define QMV1_XMERGE 0  // attention partial slots merged into x (0: x is read as it is)
#endif
#ifndef QMV1_MT
#define QMV1_MT 1  // tokens per block (see above)
#endif
#ifndef QMV1_NBW
#define QMV1_NBW 6  // superblocks of k per warp at most (even: 2 rows x 8 units x NBW = 32 x U tasks per lane)
#endif
constexpr int NBW = QMV1_NBW;
static_assert(NBW % 2 == 0, "QMV1_NBW must be even");
constexpr int U = NBW / 2;             // tasks per lane: 2 rows x 8 units x NBW / 32
constexpr int KW = QMV1_KW;            // warps per group (k split)
#ifndef QMV1_G
#define QMV1_G (QMV1_KW >= 8 ? 1 : 8 / QMV1_KW)
#endif
constexpr int G = QMV1_G;              // groups per block side by side (toolchain/kernels.py decode_core)
constexpr int NWARP = KW * G, THREADS = 32 * NWARP;
constexpr int KMAX = 256 * NBW * KW;   // largest k this build takes
constexpr int MT = QMV1_MT;            // tokens per block
constexpr int XQS = KMAX * 9 / 8, D16S = KMAX / 16;  // per token in shared memory: int16 x (qmv::xphys), scales
static_assert(MT >= 1 && (MT == 1 || !QMV1_XMERGE), "QMV1_MT > 1 does not take QMV1_XMERGE");
template <class F> struct Words { static constexpr int value = std::is_same<F, Q6K>::value ? 10 : 8; };  // per task

// Weight loads are volatile asm so that the compiler issues them where they are written (a group ahead), never next to
// their first use, whatever the register pressure. They ask L2 for 128-byte lines (.L2::128B: neighbouring lanes read
// the rest), which also marks them in SASS (LTC128B): tests/test_kernels_compile.py checks that nothing else is
// loaded before griddepcontrol.wait.
__device__ __forceinline__ uint4 ldg16(const uint8_t* p) {  // 16-aligned, read once: no L1 allocation
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
__device__ __forceinline__ uint4 ldg16_l1(const uint8_t* p) {  // 16-aligned, shared by neighbouring lanes: via L1
    uint4 r;
    asm volatile("ld.global.nc.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
__device__ __forceinline__ uint32_t ldg32(const uint8_t* p) {
    uint32_t r;
    asm volatile("ld.global.nc.L2::128B.u32 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ uint32_t ldg8(const uint8_t* p) {
    uint32_t r;
    asm volatile("ld.global.nc.L2::128B.u8 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ uint32_t ldg16bits(const uint8_t* p) {
    uint16_t r;
    asm volatile("ld.global.nc.L2::128B.u16 %0, [%1];" : "=h"(r) : "l"(p));
    return r;
}

// Token t's int16 x over a unit's two 16-element runs at elements el and eh (xq: token 0's, XQS apart)
struct UnitX { uint4 xa, xb, ya, yb; };
__device__ __forceinline__ UnitX unit_x(const int16_t* xq, int t, int el, int eh) {
    const int16_t* xt = xq + t * XQS;
    auto at = [&](int e) { return *reinterpret_cast<const uint4*>(xt + qmv::xphys(e)); };
    return {at(el), at(el + 8), at(eh), at(eh + 8)};
}

// One task: row r of the group, superblock jb of the warp's k range, unit u. Raw words of the unit in w[0..words).
// A build's register buffers hold as many words as its widest format needs (N).
template <class F> struct Task;

template <> struct Task<Q4K> {  // w: header (d, dmin, 12 scale bytes) then the unit's 16 qs bytes
    template <int N> static __device__ __forceinline__ void load(const uint8_t* blk, int u, uint32_t (&w)[N]) {
        static_assert(N >= 8, "Q4_K: 8 words");
        const uint4 h = ldg16_l1(blk);  // shared by the 8 lanes of the block
        const uint4 q = ldg16(blk + 16 + 16 * u);
        w[0] = h.x; w[1] = h.y; w[2] = h.z; w[3] = h.w; w[4] = q.x; w[5] = q.y; w[6] = q.z; w[7] = q.w;
    }
    // sum over the unit's 32 elements of weight * x (x = xq * d16 per 16 elements, s16 = sum of xq), for each of
    // the MT tokens (x of token t at xq + t * XQS, its scales at d16 / s16 + t * D16S): the weights decoded once
    template <int N>
    static __device__ __forceinline__ void dot(const uint32_t (&w)[N], int u, int e0, const int16_t* xq,
                                               const float* d16, const float* s16, float (&out)[MT]) {
        const int p = u >> 1, h = u & 1, el = e0 + 64 * p + 16 * h, eh = el + 32;
        uint32_t sc, mn;
        qmv::q4k_scale_min2(w[1], w[2], w[3], p, sc, mn);
        const float d = half_bits_to_float(w[0]), dm = half_bits_to_float(w[0] >> 16);
        const uint32_t lo[4] = {w[4] & 0x0F0F0F0Fu, w[5] & 0x0F0F0F0Fu, w[6] & 0x0F0F0F0Fu, w[7] & 0x0F0F0F0Fu};
        const uint32_t hi[4] = {w[4] & 0xF0F0F0F0u, w[5] & 0xF0F0F0F0u, w[6] & 0xF0F0F0F0u, w[7] & 0xF0F0F0F0u};
        const float c0 = d * qmv::small_u2f(sc & 0xFFu), c1 = d * qmv::small_u2f(sc >> 8) * 0.0625f;
        const float m0 = dm * qmv::small_u2f(mn & 0xFFu), m1 = dm * qmv::small_u2f(mn >> 8);
#pragma unroll
        for (int t = 0; t < MT; ++t) {
            const float *dt = d16 + t * D16S, *st = s16 + t * D16S;
            const UnitX x = unit_x(xq, t, el, eh);
            const float fl = (float)qmv::dot16<false>(lo, x.xa, x.xb, 0);
            const float fh = (float)qmv::dot16<false>(hi, x.ya, x.yb, 0);
            out[t] = dt[el >> 4] * fmaf(c0, fl, -m0 * st[el >> 4]) + dt[eh >> 4] * fmaf(c1, fh, -m1 * st[eh >> 4]);
        }
    }
};

// 16 bytes at a 2-aligned global address through aligned words (reads up to 4 bytes past: inside the block here)
__device__ __forceinline__ void ldg16_any(const uint8_t* p, uint32_t* w) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uint8_t* b = reinterpret_cast<const uint8_t*>(a & ~uintptr_t(3));
    const uint32_t sh = (uint32_t)(a & 3) * 8u;
    const uint32_t w0 = ldg32(b), w1 = ldg32(b + 4), w2 = ldg32(b + 8), w3 = ldg32(b + 12), w4 = ldg32(b + 16);
    w[0] = __funnelshift_r(w0, w1, sh); w[1] = __funnelshift_r(w1, w2, sh);
    w[2] = __funnelshift_r(w2, w3, sh); w[3] = __funnelshift_r(w3, w4, sh);
}

template <> struct Task<Q6K> {  // unit u = (hf, jj, a) as qmv.cuh's Unit<Q6K>; w: ql[16], qh[16], 2 scales, d
    template <int N> static __device__ __forceinline__ void load(const uint8_t* blk, int u, uint32_t (&w)[N]) {
        static_assert(N >= 10, "Q6_K: 10 words");
        const int hf = u >> 2, jj = (u >> 1) & 1, a = u & 1;
        ldg16_any(blk + 64 * hf + 32 * jj + 16 * a, w);
        ldg16_any(blk + 128 + 32 * hf + 16 * a, w + 4);
        const int s = 192 + 8 * hf + 2 * jj + a;
        w[8] = ldg8(blk + s) | (ldg8(blk + s + 4) << 8);
        w[9] = ldg16bits(blk + 208);
    }
    template <int N>
    static __device__ __forceinline__ void dot(const uint32_t (&w)[N], int u, int e0, const int16_t* xq,
                                               const float* d16, const float* s16, float (&out)[MT]) {
        const int hf = u >> 2, jj = (u >> 1) & 1, a = u & 1;
        const int el = e0 + 128 * hf + 32 * jj + 16 * a, eh = el + 64;
        const uint32_t shl = 4u - 2u * (uint32_t)jj, shr = 2u * (uint32_t)jj;
        uint32_t lo[4], hi[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            lo[i] = (w[i] & 0x0F0F0F0Fu) | ((w[4 + i] << shl) & 0x30303030u);
            hi[i] = ((w[i] >> 4) & 0x0F0F0F0Fu) | ((w[4 + i] >> shr) & 0x30303030u);
        }
        const float d = half_bits_to_float(w[9]);
        const float sl = (float)(int8_t)(w[8] & 0xFFu), sh = (float)(int8_t)(w[8] >> 8);
#pragma unroll
        for (int t = 0; t < MT; ++t) {
            const float *dt = d16 + t * D16S, *st = s16 + t * D16S;
            const UnitX x = unit_x(xq, t, el, eh);
            const float fl = (float)qmv::dot16<false>(lo, x.xa, x.xb, 0) - 32.f * st[el >> 4];
            const float fh = (float)qmv::dot16<false>(hi, x.ya, x.yb, 0) - 32.f * st[eh >> 4];
            out[t] = d * (sl * dt[el >> 4] * fl + sh * dt[eh >> 4] * fh);
        }
    }
};

struct __align__(16) Smem {  // toolchain/kernels.py qmv1_smem_bytes: the same sizes
    int16_t xq[MT][XQS];
    float d16[MT][D16S], s16[MT][D16S];
    float part[2][G][KW][2][MT];  // per iteration parity: each k part's sums of the group's 2 rows, per token
    float red[MT][NWARP];
};

// x[4i .. 4i + 3] from the attention's first n partial slots (QMV1_XMERGE): numerators weighted by 2^(max - overall
// max), summed in slot order, over the same-weighted sums (rope_kv_attention.cu's last-arriver merge, term for term)
template <int S, int HD>
__device__ __forceinline__ float4 xmerge4(const float* xpart, int k, int i, int n) {
    const int e = 4 * i, h = e / HD, str = xmerge_slot_floats(k / HD, HD);
    float mc[S], dc[S];
    float4 nc[S];
#pragma unroll
    for (int c = 0; c < S; ++c) {  // every load first: one L2 round trip
        const float* p = xpart + (size_t)c * str;
        mc[c] = -INFINITY;
        if (c < n) {
            mc[c] = ld_produced(p + k + 2 * h);
            dc[c] = ld_produced(p + k + 2 * h + 1);
            nc[c] = ld_produced(reinterpret_cast<const float4*>(p + e));
        }
    }
    float mx = -INFINITY;
#pragma unroll
    for (int c = 0; c < S; ++c) mx = fmaxf(mx, mc[c]);
    float4 nn = make_float4(0.f, 0.f, 0.f, 0.f);
    float dd = 0.f;
#pragma unroll
    for (int c = 0; c < S; ++c) {
        if (c >= n) continue;  // no partial there (nothing was loaded)
        const float wt = merge_weight(mc[c], mx);
        nn.x = fmaf(wt, nc[c].x, nn.x);
        nn.y = fmaf(wt, nc[c].y, nn.y);
        nn.z = fmaf(wt, nc[c].z, nn.z);
        nn.w = fmaf(wt, nc[c].w, nn.w);
        dd = fmaf(wt, dc[c], dd);
    }
    return make_float4(nn.x / dd, nn.y / dd, nn.z / dd, nn.w / dd);
}

template <class F> struct KQuant { static constexpr bool value = std::is_same<F, Q4K>::value || std::is_same<F, Q6K>::value; };

// tokens blockIdx.y * MT .. + MT - 1 (those < m); any grid.x works, kernels.py's balances it.
template <Kind K, class F0, class F1, class F2>
__device__ __forceinline__ void run(const qmv::Args& a) {
    static_assert(KQuant<F0>::value && KQuant<F1>::value && KQuant<F2>::value, "qmv1: Q4_K / Q6_K weights only");
#if QMV1_MT > 1  // MT tokens of x: dynamic shared memory (beyond 48 KB for long k), its size checked
    extern __shared__ __align__(16) uint8_t qmv1_dyn[];
    Smem& sm = *reinterpret_cast<Smem*>(qmv1_dyn);
    trap_if_dynamic_smem_below(sizeof(Smem));
#else
    __shared__ Smem sm;
#endif
    constexpr bool NORM = K == qmv::QKV || K == qmv::SWIGLU;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, kw = warp % KW, gw = warp / KW;
#ifdef QMV1_K
    constexpr int k = QMV1_K, nb = k / 256;  // the build's k (kernels.decode_core): index math folds to constants
#else
    const int k = a.k, nb = k / 256;
#endif
    pdl_launch_dependents();
    const int t0 = blockIdx.y * MT;  // this block's first token

    // groups: QKV lists q, k, v row pairs; SWIGLU pairs gate row r with up row r; ADD / PLAIN row pairs
    const int ng0 = K == qmv::SWIGLU ? a.n[0] : (a.n[0] + 1) >> 1;
    const int ng1 = K == qmv::QKV ? (a.n[1] + 1) >> 1 : 0;
    const int ng = ng0 + (K == qmv::QKV ? 2 * ng1 : 0);  // k and v have the same rows (kv_dim)
    const int stride = gridDim.x * G, iters = (ng + stride - 1) / stride;

    // this warp's k range (superblocks [j0, j0 + nbw)) and its lanes' fixed tasks
    const int j0 = kw * NBW, nbw = max(0, min(NBW, nb - j0));
    int t_row[U], t_off[U], t_u[U], t_e[U];
    bool t_ok[U];
#pragma unroll
    for (int i = 0; i < U; ++i) {
        const int t = lane + 32 * i, per_row = 8 * nbw;
        t_ok[i] = t < 2 * per_row;
        const int r = t_ok[i] && t >= per_row ? 1 : 0, rem = t_ok[i] ? t - r * per_row : 0;
        t_row[i] = r;
        // tasks 16q .. 16q + 15 are units 0-7 of superblocks 2q and 2q + 1, ordered so that each 8 lanes (one
        // phase of a 16-byte shared-memory load) read x at 8 distinct bank groups: units 0-3 of both superblocks,
        // then units 4-7 (unit u's x starts 9p + 2h groups in, p = u / 2, h = u % 2, and a superblock is 36 groups:
        // 8 units of one superblock would hit 4 groups twice). A lone last superblock keeps the plain order.
        int u = rem & 7, sb = rem >> 3;
        if (2 * (rem >> 4) + 1 < nbw) {
            u = (rem & 3) | ((rem >> 1) & 4);
            sb = 2 * (rem >> 4) + ((rem >> 2) & 1);
        }
        t_u[i] = u;
        t_off[i] = j0 + sb;           // superblock index in the row
        t_e[i] = 256 * t_off[i];      // its first element
    }

    // where a group's rows are: matrix, its two row indices, format
    auto locate = [&](int g, int& mat, int& r0, int& r1) {
        mat = 0;
        if (K == qmv::QKV && g >= ng0) { g -= ng0; mat = 1 + (g >= ng1); if (g >= ng1) g -= ng1; }
        if (K == qmv::SWIGLU) { r0 = r1 = g; return; }
        const int n = mat == 0 ? a.n[0] : mat == 1 ? a.n[1] : a.n[2];
        r0 = 2 * g;
        r1 = min(2 * g + 1, n - 1);
    };
    auto bb_of = [&](int mat, int which) {  // which: 0 = first row, 1 = second
        return K == qmv::SWIGLU ? (which ? F1::BB : F0::BB) : (mat == 0 ? F0::BB : mat == 1 ? F1::BB : F2::BB);
    };
    auto row_ptr = [&](int mat, int rr, int which) -> const uint8_t* {
        const uint8_t* base = K == qmv::SWIGLU ? (which ? a.w[1] : a.w[0]) : (mat == 0 ? a.w[0] : mat == 1 ? a.w[1] : a.w[2]);
        return base + (size_t)rr * (size_t)(nb * bb_of(mat, which));
    };
    auto fmt_of = [&](int mat, int which) -> int {  // 4: Q4_K, 6: Q6_K
        using std::is_same;
        const bool q6 = K == qmv::SWIGLU ? (which ? is_same<F1, Q6K>::value : is_same<F0, Q6K>::value)
                                         : (mat == 0 ? is_same<F0, Q6K>::value : mat == 1 ? is_same<F1, Q6K>::value
                                                                                         : is_same<F2, Q6K>::value);
        return q6 ? 6 : 4;
    };
    constexpr int W = Words<F0>::value > Words<F1>::value ? Words<F0>::value
                    : Words<F1>::value > Words<F2>::value ? Words<F1>::value : Words<F2>::value;
    auto load = [&](int g, uint32_t (&w)[U][W]) {
        if (g >= ng) return;
        int mat, r0, r1;
        locate(g, mat, r0, r1);
#pragma unroll
        for (int i = 0; i < U; ++i) {
            if (!t_ok[i]) continue;
            const uint8_t* row = row_ptr(mat, t_row[i] ? r1 : r0, t_row[i]);
            if constexpr (W >= Words<Q6K>::value) {
                if (fmt_of(mat, t_row[i]) == 6) {
                    Task<Q6K>::load(row + (size_t)t_off[i] * Q6K::BB, t_u[i], w[i]);
                    continue;
                }
            }
            Task<Q4K>::load(row + (size_t)t_off[i] * Q4K::BB, t_u[i], w[i]);
        }
    };

    constexpr int PD = QMV1_PD;
    const int g = blockIdx.x * G + gw;
    uint32_t wb[PD][U][W];  // wb[p]: the group of iteration p, in flight from the start
#pragma unroll
    for (int p = 0; p < PD; ++p) load(g + p * stride, wb[p]);
#if QMV1_XMERGE  // the attention's clusters per kv head at this step's position (read before the wait: see above)
    const int xm_n = min(QMV1_XMERGE, max(1, (ld_produced(a.positions) + QMV1_XM_CK) / QMV1_XM_CK));
#else
    constexpr int xm_n = 1;
#endif
    pdl_wait();  // x and the residual come from earlier kernels: read after it, with ld_produced (pdl.cuh)

    // x -> int16 in shared memory, a scale and a sum per 16 elements (after the RMSNorm for the fused norms). The
    // fused norms keep their few float4s of x (and of the norm weight) in registers from the sum of squares on:
    // one round trip to L2 instead of two.
    auto quantize4 = [&](int t, int i, float4 v) {  // float4 i of token t's x; all threads together (shuffles)
        float am = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
        am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 1));
        am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 2));
        const float inv = am > 0.f ? __fdividef(32767.f, am) : 0.f;  // |x * inv| <= 32767 + 0.01: no overflow
        const int q0 = __float2int_rn(v.x * inv), q1 = __float2int_rn(v.y * inv);
        const int q2 = __float2int_rn(v.z * inv), q3 = __float2int_rn(v.w * inv);
        int s4 = q0 + q1 + q2 + q3;
        s4 += __shfl_xor_sync(0xffffffffu, s4, 1);
        s4 += __shfl_xor_sync(0xffffffffu, s4, 2);
        if (t < MT && i < (k >> 2)) {
            const int e = 4 * i;
            *reinterpret_cast<uint2*>(sm.xq[t] + qmv::xphys(e)) =
                make_uint2(((uint32_t)q0 & 0xFFFFu) | ((uint32_t)q1 << 16), ((uint32_t)q2 & 0xFFFFu) | ((uint32_t)q3 << 16));
            if ((i & 3) == 0) {
                sm.s16[t][e >> 4] = (float)s4;
                sm.d16[t][e >> 4] = am * (1.f / 32767.f);
            }
        }
    };
    const int kq = k >> 2;  // float4s of one token's x
    const float4* x4 = reinterpret_cast<const float4*>(a.x) + (size_t)t0 * kq;
    if (NORM) {  // every token's x loads in flight at once, one barrier for all the sums of squares
        constexpr int NV = (KMAX / 4 + THREADS - 1) / THREADS;  // float4s per thread and token (hidden <= KMAX)
        float4 xv[MT][NV], nv[NV];
        float ss[MT];
#pragma unroll
        for (int j = 0; j < NV; ++j) {
            const int i = threadIdx.x + j * THREADS;
            nv[j] = i < kq ? __ldg(reinterpret_cast<const float4*>(a.norm_w) + i) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int t = 0; t < MT; ++t) {
            ss[t] = 0.f;
#pragma unroll
            for (int j = 0; j < NV; ++j) {
                const int i = threadIdx.x + j * THREADS;
                xv[t][j] = i < kq && t0 + t < a.m ? ld_produced(x4 + t * kq + i) : make_float4(0.f, 0.f, 0.f, 0.f);
                ss[t] += xv[t][j].x * xv[t][j].x + xv[t][j].y * xv[t][j].y + xv[t][j].z * xv[t][j].z +
                         xv[t][j].w * xv[t][j].w;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss[t] += __shfl_xor_sync(0xffffffffu, ss[t], o);
            if (lane == 0) sm.red[t][warp] = ss[t];
        }
        __syncthreads();
#pragma unroll
        for (int t = 0; t < MT; ++t) {
            float tot = 0.f;
#pragma unroll
            for (int i = 0; i < NWARP; ++i) tot += sm.red[t][i];
            const float ir = 1.f / sqrtf(tot / (float)k + (float)(RMS_EPS));  // x * (1/rs): within an ulp of x / rs
#pragma unroll
            for (int j = 0; j < NV; ++j) {
                const float4 v = xv[t][j], g = nv[j];
                quantize4(t, threadIdx.x + j * THREADS,
                          make_float4(v.x * ir * g.x, v.y * ir * g.y, v.z * ir * g.z, v.w * ir * g.w));
            }
        }
    } else if (xm_n > 1) {  // x merged from the attention's partials (k <= KMAX: every float4's loads at once)
#if QMV1_XMERGE
        constexpr int NV = (KMAX / 4 + THREADS - 1) / THREADS;
        float4 xv[NV];
#pragma unroll
        for (int j = 0; j < NV; ++j) {
            const int i = threadIdx.x + j * THREADS;
            xv[j] = i < (k >> 2) ? xmerge4<QMV1_XMERGE, QMV1_XM_D>(a.xpart, k, i, xm_n)
                                 : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int j = 0; j < NV; ++j) quantize4(0, threadIdx.x + j * THREADS, xv[j]);
#endif
    } else {  // long x (ffn_down), or MT tokens one after the other: XB float4s per thread in flight at a time
        constexpr int XB = 6;
        for (int base = 0; base < MT * kq; base += XB * THREADS) {  // uniform trip count: the shuffles are safe
            float4 v[XB];  // flat index f = t * kq + i: the 4 lanes of a 16-element group share t (k % 16 == 0)
#pragma unroll
            for (int j = 0; j < XB; ++j) {
                const int f = base + j * THREADS + threadIdx.x, t = f / kq;
                v[j] = f < MT * kq && t0 + t < a.m ? ld_produced(x4 + f) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int j = 0; j < XB; ++j) {
                const int f = base + j * THREADS + threadIdx.x, t = f / kq;
                quantize4(t, f - t * kq, v[j]);
            }
        }
    }
    __syncthreads();

    // decode group g from the buffer w (iteration it picks the parity of the k-split partials) and write its rows
    auto step = [&](int it, int g, const uint32_t (&w)[U][W]) {
        int mat = 0, r0 = 0, r1 = 0;
        if (g < ng) locate(g, mat, r0, r1);
        const int upper = lane >> 4, row = r0 + upper;  // lanes 0 and 16 write rows r0 and r1
        const bool writer = kw == 0 && g < ng && (lane & 15) == 0 && (lane == 0 || r1 != r0);
        const int nm = mat == 0 ? a.n[0] : mat == 1 ? a.n[1] : a.n[2];  // the output's row stride (per token)
        float pre[MT];  // bias + residual of the writer's row: loaded first, their latency hides behind the dots
#pragma unroll
        for (int t = 0; t < MT; ++t) pre[t] = 0.f;
        if (K != qmv::SWIGLU && writer) {
            const float* bias = mat == 0 ? a.bias[0] : mat == 1 ? a.bias[1] : a.bias[2];
            const float b = bias ? __ldg(bias + row) : 0.f;
#pragma unroll
            for (int t = 0; t < MT; ++t) {
                pre[t] = b;
                if (K == qmv::ADD && t0 + t < a.m) pre[t] += ld_produced(a.residual + (size_t)(t0 + t) * nm + row);
            }
        }
        float acc[2][MT];
#pragma unroll
        for (int t = 0; t < MT; ++t) acc[0][t] = acc[1][t] = 0.f;
        if (g < ng) {
#pragma unroll
            for (int i = 0; i < U; ++i) {
                if (!t_ok[i]) continue;
                float v[MT];
                if constexpr (W >= Words<Q6K>::value) {
                    if (fmt_of(mat, t_row[i]) == 6)
                        Task<Q6K>::dot(w[i], t_u[i], t_e[i], sm.xq[0], sm.d16[0], sm.s16[0], v);
                    else
                        Task<Q4K>::dot(w[i], t_u[i], t_e[i], sm.xq[0], sm.d16[0], sm.s16[0], v);
                } else {
                    Task<Q4K>::dot(w[i], t_u[i], t_e[i], sm.xq[0], sm.d16[0], sm.s16[0], v);
                }
#pragma unroll
                for (int t = 0; t < MT; ++t) {
                    if (t_row[i]) acc[1][t] += v[t]; else acc[0][t] += v[t];
                }
            }
        }
        // the two rows' sums over the warp, the same butterfly as two separate ones: after the exchange across the
        // halves, lanes 0-15 reduce row 0 and lanes 16-31 row 1 (half the shuffles); per token
        float s[MT];
#pragma unroll
        for (int t = 0; t < MT; ++t) {
            s[t] = upper ? acc[1][t] : acc[0][t];
            s[t] += __shfl_xor_sync(0xffffffffu, upper ? acc[0][t] : acc[1][t], 16);
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) s[t] += __shfl_xor_sync(0xffffffffu, s[t], o);
        }
        if (KW > 1) {
            if ((lane & 15) == 0) {
#pragma unroll
                for (int t = 0; t < MT; ++t) sm.part[it & 1][gw][kw][upper][t] = s[t];
            }
            __syncthreads();
            if (kw == 0) {
#pragma unroll
                for (int t = 0; t < MT; ++t) {
                    s[t] = 0.f;
#pragma unroll
                    for (int p = 0; p < KW; ++p) s[t] += sm.part[it & 1][gw][p][upper][t];
                }
            }
        }
#pragma unroll
        for (int t = 0; t < MT; ++t) {
            const float up = K == qmv::SWIGLU ? __shfl_sync(0xffffffffu, s[t], 16) : 0.f;
            if (writer && t0 + t < a.m) {
                const size_t ro = (size_t)(t0 + t) * nm;
                if (K == qmv::SWIGLU) {
                    if (lane == 0) a.y[0][ro + r0] = s[t] / (1.f + expf(-s[t])) * up;
                } else {
                    (mat == 0 ? a.y[0] : mat == 1 ? a.y[1] : a.y[2])[ro + row] = s[t] + pre[t];
                }
            }
        }
    };
    // a ring of PD register buffers with compile-time indices (no copies): buffer p holds the group of iteration
    // it = p (mod PD); once decoded it is refilled with the group PD iterations further
    for (int it0 = 0; it0 < iters; it0 += PD) {
#pragma unroll
        for (int p = 0; p < PD; ++p) {
            const int it = it0 + p;
            if (it >= iters) break;  // block-uniform
            step(it, g + it * stride, wb[p]);
            load(g + (it + PD) * stride, wb[p]);
        }
    }
}

}  // namespace qmv1

#if QMV1  // decode builds: 8 warps (or KW x G) per block, two blocks per SM, no cluster
#undef QMV_KERNEL
#define QMV_KERNEL extern "C" __global__ void __launch_bounds__(qmv1::THREADS, QMV1_MINB)
#endif
