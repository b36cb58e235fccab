// Quantized matrix-vector core shared by every projection kernel: the unfused q4k/q6k/q5_0/q8_0_matmul
// (quant_matmul.cu), matmul_add (matmul_add.cu), rms_norm_qkv (rms_norm_qkv.cu) and rms_norm_swiglu
// (rms_norm_swiglu.cu). docs/perf-notes.md has the measurements behind each choice.
//
// Batch-1 decode streams every weight byte once from HBM (~1 GB per token for the 1.5B model):
// - x in int16. Each block quantizes its k-range of x (fused ops: RMSNorm first) once into shared memory: int16
//   values, one float scale per 32 and the float sum of every 16 int16 values. Relative error of a dot product
//   ~2e-5 (int8, as llama.cpp's mmvq, would be ~5e-3: over the 1e-3 budget). Weights stay integer bytes and meet x
//   in dp2a (two int16 x int8 products per instruction, int32 accumulation); block scales, Q4_K mins and Q6_K /
//   Q5_0 offsets are applied once per 16 or 32 elements in fp32 (sums of x precomputed).
// - Weights go HBM -> shared memory with cp.async, in slices of up to SB ggml blocks of a warp's 2 rows, NS stages
//   per warp (NS-1 slices in flight while one is decoded). The aligned-down byte range of each row is copied, so
//   any 2-aligned weight base works (Q4_K: 16-aligned). A slice decodes as passes of one unit per lane.
// - Work: a warp owns a group of 2 weight rows per round (rms_norm_swiglu: warps 0..NW/2-1 take row pairs of gate,
//   the others the same rows of up, meeting in shared memory; QMV_PAIR=1: gate row r and up row r in one warp);
//   a block does NW groups per round, rounds stride over the grid (launch_config balances them over one resident
//   wave, 4 blocks of 6 warps per SM). Long rows (ffn_down) split k over a compile-time thread-block cluster of
//   KSPLIT blocks whose partial sums meet in distributed shared memory; each block quantizes only its k share.
// - m > 1: a block handles TM tokens (grid.y = cdiv(m, TM)); decoded weights are reused for every token.
// Every kernel accepts any grid (launch_config's is the balanced one) and any m.
#pragma once
#include <cooperative_groups.h>
#include <stdint.h>

#include <type_traits>

#include "ggml_blocks.cuh"
#include "pdl.cuh"
#include "proj_args.cuh"

namespace qmv {
using namespace ggml;
namespace cg = cooperative_groups;

// Tuning knobs (defaults = toolchain/kernels.py's QMV_*; scripts/device_kernels.sh times variants):
//   QMV_NW warps per block, QMV_MINB blocks per SM the registers are budgeted for, QMV_NS pipeline stages (0: as
//   many as shared memory allows, 2 or 3), QMV_SB4 / QMV_SB6 Q4_K / Q6_K blocks per slice at most,
//   QMV_L2PF L2 prefetch size of the weight copies (0, 64, 128, 256 bytes), QMV_PAIR gate/up row pairs per warp.
#ifndef QMV_NW
#define QMV_NW 6
#endif
#ifndef QMV_NS
#define QMV_NS 0
#endif
#ifndef QMV_SB4
#define QMV_SB4 6
#endif
#ifndef QMV_SB6
#define QMV_SB6 6
#endif
#ifndef QMV_L2PF
#define QMV_L2PF 0
#endif
#ifndef QMV_PAIR
#define QMV_PAIR 0  // 1: rms_norm_swiglu with equal gate / up types pairs gate row r and up row r in one warp
#endif
#ifndef QMV_M1
#define QMV_M1 0  // 1: decode build, the batch-1 body only (any m still works, one token at a time): less code
#endif

constexpr int NW = QMV_NW;        // warps per block
constexpr int THREADS = NW * 32;  // toolchain/kernels.py: QMV_THREADS
constexpr int TM = 4;             // tokens per block when m > 1 (grid.y = cdiv(m, TM))
constexpr int SMEM_LIMIT = 48 * 1024;  // static shared memory per block

enum Kind { PLAIN, ADD, QKV, SWIGLU };

// ---------------------------------------------------------------------------------------------------------------
// primitives

__device__ __forceinline__ void cp_async16(uint32_t smem_addr, const void* gmem) {
#if QMV_L2PF == 256
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n" ::"r"(smem_addr), "l"(gmem) : "memory");
#elif QMV_L2PF == 128
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(smem_addr), "l"(gmem) : "memory");
#elif QMV_L2PF == 64
    asm volatile("cp.async.cg.shared.global.L2::64B [%0], [%1], 16;\n" ::"r"(smem_addr), "l"(gmem) : "memory");
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr), "l"(gmem) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// d = c + a.h0 * b.byte(0|2) + a.h1 * b.byte(1|3): a holds two int16 of x, b four weight bytes (unsigned / signed)
#define QMV_DP2A(NAME, PTX)                                                                                       \
    __device__ __forceinline__ int NAME(uint32_t a, uint32_t b, int c) {                                          \
        int d;                                                                                                    \
        asm(PTX " %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));                                          \
        return d;                                                                                                 \
    }
QMV_DP2A(dp2a_lo_u, "dp2a.lo.s32.u32")
QMV_DP2A(dp2a_hi_u, "dp2a.hi.s32.u32")
QMV_DP2A(dp2a_lo_s, "dp2a.lo.s32.s32")
QMV_DP2A(dp2a_hi_s, "dp2a.hi.s32.s32")
#undef QMV_DP2A

// Sum over 16 elements: weight bytes w[i] are elements 4i..4i+3, x words xa (elements 0-7) and xb (8-15).
template <bool SIGNED>
__device__ __forceinline__ int dot16(const uint32_t (&w)[4], uint4 xa, uint4 xb, int c) {
    if (SIGNED) {
        c = dp2a_lo_s(xa.x, w[0], c); c = dp2a_hi_s(xa.y, w[0], c);
        c = dp2a_lo_s(xa.z, w[1], c); c = dp2a_hi_s(xa.w, w[1], c);
        c = dp2a_lo_s(xb.x, w[2], c); c = dp2a_hi_s(xb.y, w[2], c);
        c = dp2a_lo_s(xb.z, w[3], c); c = dp2a_hi_s(xb.w, w[3], c);
    } else {
        c = dp2a_lo_u(xa.x, w[0], c); c = dp2a_hi_u(xa.y, w[0], c);
        c = dp2a_lo_u(xa.z, w[1], c); c = dp2a_hi_u(xa.w, w[1], c);
        c = dp2a_lo_u(xb.x, w[2], c); c = dp2a_hi_u(xb.y, w[2], c);
        c = dp2a_lo_u(xb.z, w[3], c); c = dp2a_hi_u(xb.w, w[3], c);
    }
    return c;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// Exact float of a small unsigned int (< 2^23) without an I2F: PRMT-free OR into the mantissa of 2^23.
__device__ __forceinline__ float small_u2f(uint32_t v) { return __uint_as_float(0x4B000000u | v) - 8388608.0f; }

// 4 / 8 / 16 bytes at a 2-aligned shared-memory address (aligned words + funnel shifts). Reads up to 4 bytes past.
__device__ __forceinline__ uint32_t lds32_any(const uint8_t* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uint32_t* w = reinterpret_cast<const uint32_t*>(a & ~uintptr_t(3));
    return __funnelshift_r(w[0], w[1], (uint32_t)(a & 3) * 8u);
}
__device__ __forceinline__ uint2 lds64_any(const uint8_t* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uint32_t* w = reinterpret_cast<const uint32_t*>(a & ~uintptr_t(3));
    const uint32_t sh = (uint32_t)(a & 3) * 8u, w1 = w[1];
    return make_uint2(__funnelshift_r(w[0], w1, sh), __funnelshift_r(w1, w[2], sh));
}
__device__ __forceinline__ uint4 lds128_any(const uint8_t* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uint32_t* w = reinterpret_cast<const uint32_t*>(a & ~uintptr_t(3));
    const uint32_t sh = (uint32_t)(a & 3) * 8u, w1 = w[1], w2 = w[2], w3 = w[3];
    return make_uint4(__funnelshift_r(w[0], w1, sh), __funnelshift_r(w1, w2, sh), __funnelshift_r(w2, w3, sh),
                      __funnelshift_r(w3, w[4], sh));
}

// bit i of h (i < 4) -> bit 4 of byte i
__device__ __forceinline__ uint32_t spread4(uint32_t h) { return ((h * 0x00204081u) & 0x01010101u) << 4; }

// Q4_K (scale, min) of sub-blocks 2p and 2p+1 from the 12-byte field (words s0, s1, s2), branch-free (p differs
// between lanes): both sub-blocks take the same byte pair (2(p&1), +1) of each word; p < 2 keeps the low 6 bits of
// s0 / s1, p >= 2 combines the nibbles of s2 with the top 2 bits of s0 / s1. Returns sc0 | sc1 << 8, mn0 | mn1 << 8.
__device__ __forceinline__ void q4k_scale_min2(uint32_t s0, uint32_t s1, uint32_t s2, int p, uint32_t& sc, uint32_t& mn) {
    const uint32_t sh = 16u * (uint32_t)(p & 1);
    const uint32_t b0 = (s0 >> sh) & 0xFFFFu, b1 = (s1 >> sh) & 0xFFFFu, b2 = (s2 >> sh) & 0xFFFFu;
    const bool lo = p < 2;
    sc = lo ? (b0 & 0x3F3Fu) : ((b2 & 0x0F0Fu) | ((b0 >> 2) & 0x3030u));
    mn = lo ? (b1 & 0x3F3Fu) : (((b2 >> 4) & 0x0F0Fu) | ((b1 >> 2) & 0x3030u));
}

// ---------------------------------------------------------------------------------------------------------------
// quantized x in shared memory: per token, int16 q (padded by 8 values every 64, so that the 16-byte reads of the
// lanes of a quarter-warp hit distinct banks), float d per 32 (x ~= q * d) and float s per 16 (sum of q).

__device__ __forceinline__ int xphys(int e) { return e + ((e >> 6) << 3); }

struct XTile {
    const int16_t* q;
    const float* d;
    const float* s;
    int qstride, dstride, sstride;  // per token
    __device__ __forceinline__ uint4 ld8(int t, int e) const {  // 8 int16 from element e (multiple of 8)
        return *reinterpret_cast<const uint4*>(q + t * qstride + xphys(e));
    }
    __device__ __forceinline__ float dx(int t, int e) const { return d[t * dstride + (e >> 5)]; }
    __device__ __forceinline__ float sx(int t, int e) const { return s[t * sstride + (e >> 4)]; }
};

// ---------------------------------------------------------------------------------------------------------------
// Per-format unit: the piece of one block that one lane decodes for the 2 rows of its group. task(lane) gives the
// block j of the slice and the unit u; run() adds the unit's dot products with every token to acc[row][token].
// `le` is the block's first element relative to the x chunk in shared memory.

template <class F> struct Unit;

// Q4_K: half d, half dmin, 12 bytes of 6-bit (scale, min) pairs, 128 bytes qs. Unit u (8 per block) = qs bytes
// [16u, 16u+16): low nibbles are elements 64p+16h+i of sub-block 2p, high nibbles 64p+32+16h+i of sub-block 2p+1
// (p = u/2, h = u%2). The high nibbles are used in place (16q: no shift), their scale carries the 1/16.
// Lane order p + 4 j0 + 8 h + 16 j1 keeps the 16-byte smem reads of a quarter-warp on distinct banks.
template <> struct Unit<Q4K> {
    static constexpr int SB = QMV_SB4, UPB = 8;  // SB: blocks per slice at most (k = 1536: one slice)
    static __device__ __forceinline__ void task(int lane, int& j, int& u) {
        j = ((lane >> 2) & 1) | ((lane >> 4) << 1);
        u = 2 * (lane & 3) + ((lane >> 3) & 1);
    }
    template <int NT>
    static __device__ __forceinline__ void run(const uint8_t* b0, const uint8_t* b1, int u, int le, const XTile& xt,
                                               float (&acc)[2][NT]) {
        const int p = u >> 1, h = u & 1;
        uint32_t lo[2][4], hi[2][4];
        float c0[2], m0[2], c1[2], m1[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // Q4_K blocks are 16-aligned in the stage (weights 16-aligned: contract)
            const uint8_t* b = r ? b1 : b0;
            const uint4 hd = *reinterpret_cast<const uint4*>(b);
            const uint4 qv = *reinterpret_cast<const uint4*>(b + 16 + 16 * u);
            const float d = half_bits_to_float(hd.x), dm = half_bits_to_float(hd.x >> 16);
            uint32_t sc, mn;
            q4k_scale_min2(hd.y, hd.z, hd.w, p, sc, mn);
            c0[r] = d * small_u2f(sc & 0xFFu);
            m0[r] = dm * small_u2f(mn & 0xFFu);
            c1[r] = d * small_u2f(sc >> 8) * 0.0625f;
            m1[r] = dm * small_u2f(mn >> 8);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                lo[r][i] = word(qv, i) & 0x0F0F0F0Fu;
                hi[r][i] = word(qv, i) & 0xF0F0F0F0u;
            }
        }
        const int el = le + 64 * p + 16 * h, eh = el + 32;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            const uint4 xa = xt.ld8(t, el), xb = xt.ld8(t, el + 8), ya = xt.ld8(t, eh), yb = xt.ld8(t, eh + 8);
            const float sl = xt.sx(t, el), sh = xt.sx(t, eh), dl = xt.dx(t, el), dh = xt.dx(t, eh);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float fl = (float)dot16<false>(lo[r], xa, xb, 0), fh = (float)dot16<false>(hi[r], ya, yb, 0);
                acc[r][t] = fmaf(dl, fmaf(c0[r], fl, -m0[r] * sl), acc[r][t]);
                acc[r][t] = fmaf(dh, fmaf(c1[r], fh, -m1[r] * sh), acc[r][t]);
            }
        }
    }
};

// Q6_K: ql[128], qh[64], int8 scales[16], half d; x = d * sc * (q - 32) per 16 elements. Unit u = (hf, jj, a)
// (u = 4 hf + 2 jj + a): ql bytes [64hf + 32jj + 16a, +16) and qh bytes [32hf + 16a, +16). Low nibbles with qh bits
// 2jj.. are elements 128hf + 32jj + 16a + i (sub-block 8hf + 2jj + a), high nibbles with qh bits 2jj+4.. are
// elements 64 further (sub-block + 4): two whole 16-element sub-blocks per unit. Blocks are 2-aligned: lds*_any.
template <> struct Unit<Q6K> {
    static constexpr int SB = QMV_SB6, UPB = 8;
    static __device__ __forceinline__ void task(int lane, int& j, int& u) {
        j = lane >> 3;
        u = lane & 7;
    }
    template <int NT>
    static __device__ __forceinline__ void run(const uint8_t* b0, const uint8_t* b1, int u, int le, const XTile& xt,
                                               float (&acc)[2][NT]) {
        const int hf = u >> 2, jj = (u >> 1) & 1, a = u & 1;
        const int el = le + 128 * hf + 32 * jj + 16 * a, eh = el + 64;
        const uint32_t shl = 4u - 2u * (uint32_t)jj, shr = 2u * (uint32_t)jj;
        uint32_t lo[2][4], hi[2][4];
        float cl[2], ch[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const uint8_t* b = r ? b1 : b0;
            const uint4 QL = lds128_any(b + 64 * hf + 32 * jj + 16 * a);
            const uint4 QH = lds128_any(b + 128 + 32 * hf + 16 * a);
            const uint2 S = lds64_any(b + 192 + 8 * hf + 2 * jj + a);  // bytes 0 and 4: the two scales
            const float d = half_bits_to_float(lds32_any(b + 208));
            cl[r] = d * (float)(int)(int8_t)(S.x & 0xFFu);
            ch[r] = d * (float)(int)(int8_t)(S.y & 0xFFu);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const uint32_t ql = word(QL, i), qh = word(QH, i);
                lo[r][i] = (ql & 0x0F0F0F0Fu) | ((qh << shl) & 0x30303030u);
                hi[r][i] = ((ql >> 4) & 0x0F0F0F0Fu) | ((qh >> shr) & 0x30303030u);
            }
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            const uint4 xa = xt.ld8(t, el), xb = xt.ld8(t, el + 8), ya = xt.ld8(t, eh), yb = xt.ld8(t, eh + 8);
            const float sl = 32.f * xt.sx(t, el), sh = 32.f * xt.sx(t, eh), dl = xt.dx(t, el), dh = xt.dx(t, eh);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float fl = (float)dot16<false>(lo[r], xa, xb, 0) - sl;
                const float fh = (float)dot16<false>(hi[r], ya, yb, 0) - sh;
                acc[r][t] = fmaf(dl * cl[r], fl, acc[r][t]);
                acc[r][t] = fmaf(dh * ch[r], fh, acc[r][t]);
            }
        }
    }
};

// Q5_0: half d, u32 qh, qs[16]; x = d * (q - 16), q = nibble | (bit e of qh) << 4; elements 0-15 are the low
// nibbles, 16-31 the high ones. One unit = one block.
template <> struct Unit<Q50> {
    static constexpr int SB = 32, UPB = 1;
    static __device__ __forceinline__ void task(int lane, int& j, int& u) {
        j = lane;
        u = 0;
    }
    template <int NT>
    static __device__ __forceinline__ void run(const uint8_t* b0, const uint8_t* b1, int, int le, const XTile& xt,
                                               float (&acc)[2][NT]) {
        uint32_t lo[2][4], hi[2][4];
        float dw[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const uint8_t* b = r ? b1 : b0;
            dw[r] = half_bits_to_float(lds32_any(b));
            const uint32_t qh = lds32_any(b + 2);
            const uint4 Q = lds128_any(b + 6);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const uint32_t q = word(Q, i);
                lo[r][i] = (q & 0x0F0F0F0Fu) | spread4((qh >> (4 * i)) & 15u);
                hi[r][i] = ((q >> 4) & 0x0F0F0F0Fu) | spread4((qh >> (16 + 4 * i)) & 15u);
            }
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            const uint4 xa = xt.ld8(t, le), xb = xt.ld8(t, le + 8), ya = xt.ld8(t, le + 16), yb = xt.ld8(t, le + 24);
            const float s16 = 16.f * (xt.sx(t, le) + xt.sx(t, le + 16)), dx = xt.dx(t, le);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int dot = dot16<false>(hi[r], ya, yb, dot16<false>(lo[r], xa, xb, 0));
                acc[r][t] = fmaf(dx * dw[r], (float)dot - s16, acc[r][t]);
            }
        }
    }
};

// Q8_0: half d, int8 q[32]; x = d * q. Unit u (2 per block) = elements 16u..16u+15, signed bytes straight into dp2a.
template <> struct Unit<Q80> {
    static constexpr int SB = 32, UPB = 2;
    static __device__ __forceinline__ void task(int lane, int& j, int& u) {
        j = lane >> 1;
        u = lane & 1;
    }
    template <int NT>
    static __device__ __forceinline__ void run(const uint8_t* b0, const uint8_t* b1, int u, int le, const XTile& xt,
                                               float (&acc)[2][NT]) {
        uint32_t q[2][4];
        float dw[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const uint8_t* b = r ? b1 : b0;
            dw[r] = half_bits_to_float(lds32_any(b));
            const uint4 Q = lds128_any(b + 2 + 16 * u);
#pragma unroll
            for (int i = 0; i < 4; ++i) q[r][i] = word(Q, i);
        }
        const int e = le + 16 * u;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            const uint4 xa = xt.ld8(t, e), xb = xt.ld8(t, e + 8);
            const float dx = xt.dx(t, e);
#pragma unroll
            for (int r = 0; r < 2; ++r) acc[r][t] = fmaf(dx * dw[r], (float)dot16<true>(q[r], xa, xb, 0), acc[r][t]);
        }
    }
};

// ---------------------------------------------------------------------------------------------------------------
// shared memory of one block

template <class F>
struct Rowbuf {  // bytes of one row's slice in a stage: aligned-down range + 16 bytes that lds*_any may read past
    static constexpr int V16 = (Unit<F>::SB * F::BB + 30) / 16;
    static constexpr int BYTES = (V16 + 1) * 16;
};
constexpr int cmax(int a, int b) { return a > b ? a : b; }

template <class F0, class F1, class F2>
struct Layout {
    static constexpr int ROWBUF = cmax(Rowbuf<F0>::BYTES, cmax(Rowbuf<F1>::BYTES, Rowbuf<F2>::BYTES));
    static constexpr int STAGE = 2 * ROWBUF;
    static constexpr int MISC = 4 * (2 * NW * 2 * TM + NW * TM + TM) + 64;
    // pipeline depth: 3 stages when they leave room for 2560 x values, else 2 (big Q6_K / Q8_0 slices)
    static constexpr int NS = QMV_NS ? QMV_NS : NW * 3 * STAGE + 2560 * 21 / 8 + MISC <= SMEM_LIMIT ? 3 : 2;
    static constexpr int XFREE = SMEM_LIMIT - NW * NS * STAGE - MISC;
    static constexpr int XCAP0 = XFREE * 8 / 21 / 256 * 256;  // 2.625 bytes per element of capacity
    static constexpr int XCAP = XCAP0 > 9216 ? 9216 : XCAP0;
    static_assert(XCAP >= 1024, "x staging too small");
};

template <class L>
struct __align__(16) Smem {
    uint8_t stage[NW][L::NS][L::STAGE];
    int16_t xq[L::XCAP * 9 / 8];
    float xd[L::XCAP / 32];
    float xs[L::XCAP / 16];
    float part[2][NW][2][TM];  // per round parity: partial sums (k-split) or gate values (swiglu)
    float red[NW][TM];
    float rs[TM];
};

template <class T>
__device__ __forceinline__ T sel(int i, T a, T b, T c) { return i == 0 ? a : i == 1 ? b : c; }  // no local memory

using Args = ProjArgs;  // plugins/proj_args.cuh

#ifndef RMS_EPS
#define RMS_EPS 1e-6
#endif

// A warp's position in its work: round rd (one group of 2 rows), chunk ch of x, slice sl of the chunk.
template <class D>  // D: int, or long long when the second row is in another matrix (QMV_PAIR)
struct Cursor {
    const uint8_t* p0;  // the group's first row at the block's first k element
    D d1;               // bytes from the first row to the second (0: odd n, the last row twice; QMV_PAIR: up row)
    int rd, ch, sl;     // round < 0: no more work
    int nsl, sz;        // slices of the chunk; blocks per slice (the last may be shorter)
    int mat;
    __device__ __forceinline__ bool ok() const { return rd >= 0; }
    __device__ __forceinline__ const uint8_t* p1() const { return p0 + d1; }
};

// ---------------------------------------------------------------------------------------------------------------
// the kernel body

template <Kind K, class F0, class F1, class F2, int C, int NT>
__device__ __forceinline__ void body(const Args& a, Smem<Layout<F0, F1, F2>>& sm, int t0, int mt) {
    using L = Layout<F0, F1, F2>;
    constexpr int NS = L::NS, ROWBUF = L::ROWBUF;
    constexpr int KC = (L::XCAP / NT) / 256 * 256;  // x chunk (elements) per token
    constexpr bool NORM = K == QKV || K == SWIGLU;
    // swiglu with equal gate / up formats pairs gate row r and up row r in one warp (silu(g) * u in the warp);
    // otherwise warps 0..NW/2-1 take row pairs of gate, the others the same row pairs of up
    constexpr bool PAIR = QMV_PAIR && K == SWIGLU && std::is_same<F0, F1>::value;
    constexpr bool SPLIT = K == SWIGLU && !PAIR;
    constexpr int GPB = SPLIT ? NW / 2 : NW;  // groups per block and round
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int rank = C > 1 ? (int)(blockIdx.x % C) : 0, cl = blockIdx.x / C, ncl = gridDim.x / C;
    const int k = a.k;

    const int ng0 = PAIR ? a.n[0] : (a.n[0] + 1) >> 1;  // pairs: one group per output row
    const int ng1 = K == QKV ? (a.n[1] + 1) >> 1 : 0, ng2 = K == QKV ? (a.n[2] + 1) >> 1 : 0;
    const int units = K == QKV ? ng0 + ng1 + ng2 : ng0;  // groups (swiglu: row pairs of gate and of up)
    auto round_ok = [&](int rd) { return (rd * ncl + cl) * GPB < units; };
    auto assign = [&](int rd, int ww, int& mat, int& g) -> bool {
        if (SPLIT) {
            g = (rd * ncl + cl) * GPB + ww % GPB;
            mat = ww / GPB;
            return g < units;
        }
        const int G = (rd * ncl + cl) * NW + ww;
        mat = 0;
        g = G;
        if (K == QKV && G >= ng0) {
            if (G < ng0 + ng1) { mat = 1; g = G - ng0; }
            else { mat = 2; g = G - ng0 - ng1; }
        }
        return G < units;
    };
    auto BE = [](int mat) { return mat == 0 ? F0::BE : mat == 1 ? F1::BE : F2::BE; };
    auto BB = [](int mat) { return mat == 0 ? F0::BB : mat == 1 ? F1::BB : F2::BB; };
    auto SB = [](int mat) { return mat == 0 ? Unit<F0>::SB : mat == 1 ? Unit<F1>::SB : Unit<F2>::SB; };

    // this block's k-range (elements) and its chunks of x
    int e_lo = 0, e_hi = k;
    if (C > 1) {
        const int nbk = k / F0::BE;
        e_lo = rank * nbk / C * F0::BE;
        e_hi = (rank + 1) * nbk / C * F0::BE;
    }
    using Cursor = qmv::Cursor<typename std::conditional<PAIR, long long, int>::type>;
    const bool has_k = e_hi > e_lo;  // (kernels.matmul_split keeps every rank's range non-empty)
    const int nch = has_k ? (e_hi - e_lo + KC - 1) / KC : 1;

    // slicing of a chunk (blocks nbc): slices of at most SB blocks, as few as possible, equal but for the last;
    // per matrix, for a full chunk and for the last one (computed once: no divisions per slice)
    struct Slicing { int nbc, nsl, sz; };
    auto slicing = [&](int mat, int last) {
        const int ce0 = e_lo + (last ? nch - 1 : 0) * KC, be = BE(mat), sb = SB(mat);
        Slicing r;
        r.nbc = (min(e_hi, ce0 + KC) - ce0) / be;
        r.nsl = (r.nbc + sb - 1) / sb;
        r.sz = r.nsl ? (r.nbc + r.nsl - 1) / r.nsl : 0;
        return r;
    };
    const Slicing sf0 = slicing(0, 0), sl0 = slicing(0, 1);
    const Slicing sf1 = K == QKV || K == SWIGLU ? slicing(1, 0) : sf0, sl1 = K == QKV || K == SWIGLU ? slicing(1, 1) : sl0;
    const Slicing sf2 = K == QKV ? slicing(2, 0) : sf0, sl2 = K == QKV ? slicing(2, 1) : sl0;
    auto chunk_slicing = [&](int mat, int ch) {
        return ch == nch - 1 ? sel(mat, sl0, sl1, sl2) : sel(mat, sf0, sf1, sf2);
    };
    auto chunk_slices = [&](Cursor& c) {
        const Slicing r = chunk_slicing(c.mat, c.ch);
        c.nsl = r.nsl;
        c.sz = r.sz;
        c.sl = 0;
    };
    auto start_round = [&](Cursor& c, int rd) {
        int g;
        if (!(has_k && round_ok(rd) && assign(rd, w, c.mat, g))) {
            c.rd = -1;
            return;
        }
        c.rd = rd;
        const int be = BE(c.mat), bb = BB(c.mat), n = sel(c.mat, a.n[0], a.n[1], a.n[2]);
        const int rb = (k / be) * bb;
        if (PAIR) {  // gate row g, up row g
            c.p0 = a.w[0] + (size_t)(e_lo / be) * bb + (size_t)g * rb;
            c.d1 = (decltype(c.d1))(a.w[1] - a.w[0]);
        } else {
            c.p0 = sel(c.mat, a.w[0], a.w[1], a.w[2]) + (size_t)(e_lo / be) * bb + (size_t)(2 * g) * rb;
            c.d1 = 2 * g + 1 < n ? rb : 0;  // odd n: the last row twice, its result dropped
        }
        c.ch = 0;
        chunk_slices(c);
    };
    auto advance = [&](Cursor& c) {
        if (++c.sl < c.nsl) return;
        if (++c.ch < nch) { chunk_slices(c); return; }
        start_round(c, c.rd + 1);
    };
    // the current slice: first block relative to the block's k start, block count
    auto slice = [&](const Cursor& c, int& b0, int& nbl) {
        const int s0 = c.sl * c.sz;
        b0 = c.ch * (KC / BE(c.mat)) + s0;
        nbl = min(c.sz, chunk_slicing(c.mat, c.ch).nbc - s0);
    };

    uint8_t* const mystage = &sm.stage[w][0][0];
    const uint32_t mystage_s = (uint32_t)__cvta_generic_to_shared(mystage);
    auto issue = [&](const Cursor& c, int s) {
        int b0, nbl;
        slice(c, b0, nbl);
        const int bb = BB(c.mat), bytes = nbl * bb;
        const uint32_t dst = mystage_s + s * L::STAGE;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const uintptr_t src = reinterpret_cast<uintptr_t>(r ? c.p1() : c.p0) + (uintptr_t)(b0 * bb);
            const uintptr_t lo = src & ~uintptr_t(15);
            const int nv = (int)((src + bytes - lo + 15) >> 4);
#pragma unroll
            for (int v = 0; v < (ROWBUF / 16 + 31) / 32; ++v) {
                const int i = lane + 32 * v;
                if (i < nv) cp_async16(dst + r * ROWBUF + 16 * i, reinterpret_cast<const void*>(lo + 16 * (uintptr_t)i));
            }
        }
    };

    // weights first: the first NS-1 slices are in flight while x is prepared
    Cursor ah;
    start_round(ah, 0);
    Cursor cu = ah;
#pragma unroll
    for (int s = 0; s < NS - 1; ++s) {
        if (ah.ok()) {
            issue(ah, s);
            advance(ah);
        }
        cp_async_commit();
    }
    int istage = NS - 1, cstage = 0;
    pdl_wait();  // x and the residual come from earlier kernels: read after it, with ld_produced (pdl.cuh)

    // x: RMSNorm scale (fused ops), then int16 quantization of a chunk
    if (NORM) {
        float ss[NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            ss[t] = 0.f;
            if (t < mt) {
                const float4* xr = reinterpret_cast<const float4*>(a.x + (size_t)(t0 + t) * k);
                for (int i = threadIdx.x; i < (k >> 2); i += THREADS) {
                    const float4 v = ld_produced(xr + i);
                    ss[t] += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss[t] += __shfl_xor_sync(0xffffffffu, ss[t], o);
            if (lane == 0) sm.red[w][t] = ss[t];
        }
        __syncthreads();
        if (threadIdx.x < NT) {
            float tot = 0.f;
            for (int ww = 0; ww < NW; ++ww) tot += sm.red[ww][threadIdx.x];
            sm.rs[threadIdx.x] = sqrtf(tot / (float)k + (float)(RMS_EPS));
        }
        __syncthreads();
    }
    auto quantize = [&](int ch) {
        const int ce0 = e_lo + ch * KC, ce1 = min(e_hi, ce0 + KC);
        const int nvec = (ce1 - ce0) >> 2;  // float4s; a multiple of 8 (32-element groups)
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            int16_t* q = sm.xq + t * (KC * 9 / 8);
            float* d = sm.xd + t * (KC / 32);
            float* s = sm.xs + t * (KC / 16);
            const float* xr = a.x + (size_t)(t0 + min(t, mt - 1)) * k + ce0;
            const float rs = NORM ? sm.rs[t] : 1.f;
            for (int base = 0; base < nvec; base += THREADS) {  // uniform trip count: shuffles below are safe
                const int i = base + threadIdx.x;
                float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
                if (i < nvec && t < mt) {
                    v = ld_produced(reinterpret_cast<const float4*>(xr) + i);
                    if (NORM) {
                        const float4 g = __ldg(reinterpret_cast<const float4*>(a.norm_w + ce0) + i);
                        v = make_float4(v.x / rs * g.x, v.y / rs * g.y, v.z / rs * g.z, v.w / rs * g.w);
                    }
                }
                float am = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
                am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 1));
                am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 2));
                am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 4));
                const float inv = am > 0.f ? 32767.f / am : 0.f;
                const int q0 = max(-32767, min(32767, __float2int_rn(v.x * inv)));
                const int q1 = max(-32767, min(32767, __float2int_rn(v.y * inv)));
                const int q2 = max(-32767, min(32767, __float2int_rn(v.z * inv)));
                const int q3 = max(-32767, min(32767, __float2int_rn(v.w * inv)));
                int s4 = q0 + q1 + q2 + q3;
                s4 += __shfl_xor_sync(0xffffffffu, s4, 1);
                s4 += __shfl_xor_sync(0xffffffffu, s4, 2);
                if (i < nvec) {
                    const int le = 4 * i;
                    *reinterpret_cast<uint2*>(q + xphys(le)) =
                        make_uint2(((uint32_t)q0 & 0xFFFFu) | ((uint32_t)q1 << 16), ((uint32_t)q2 & 0xFFFFu) | ((uint32_t)q3 << 16));
                    if ((i & 3) == 0) s[le >> 4] = (float)s4;
                    if ((i & 7) == 0) d[le >> 5] = am * (1.f / 32767.f);
                }
            }
        }
    };
    const XTile xt{sm.xq, sm.xd, sm.xs, KC * 9 / 8, KC / 32, KC / 16};
    if (nch == 1) {
        quantize(0);
        __syncthreads();
    }

    // decode the current slice from stage s: one unit per lane and pass (passes: slice blocks x units / 32)
    auto decode = [&](const Cursor& c, int s, float (&acc)[2][NT]) {
        int b0, nbl;
        slice(c, b0, nbl);
        const int bb = BB(c.mat);
        const uint8_t* st = mystage + s * L::STAGE;
        const uint8_t* s0 = st + ((reinterpret_cast<uintptr_t>(c.p0) + (uintptr_t)(b0 * bb)) & 15);
        const uint8_t* s1 = st + ROWBUF + ((reinterpret_cast<uintptr_t>(c.p1()) + (uintptr_t)(b0 * bb)) & 15);
        const int le0 = b0 * BE(c.mat) - c.ch * KC;
        auto go = [&](auto fmt) {
            using F = decltype(fmt);
            constexpr int JP = 32 / Unit<F>::UPB;  // blocks per pass
            int j0, u;
            Unit<F>::task(lane, j0, u);
            for (int j = j0; j - j0 < nbl; j += JP)  // warp-uniform trip count: cdiv(nbl, JP)
                if (j < nbl) Unit<F>::template run<NT>(s0 + j * F::BB, s1 + j * F::BB, u, le0 + j * F::BE, xt, acc);
        };
        if (K == PLAIN || K == ADD || PAIR) go(F0{});
        else if (c.mat == 0) go(F0{});
        else if (c.mat == 1) go(F1{});
        else go(F2{});
    };

    auto pick = [](const float (&acc)[2][NT], int r, int t) {
        float v = 0.f;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
#pragma unroll
            for (int tt = 0; tt < NT; ++tt)
                if (rr == r && tt == t) v = acc[rr][tt];
        return v;
    };
    auto store = [&](int mat, int row, int t, float v) {  // y = acc + bias (+ residual): numpy's order
        const size_t idx = (size_t)(t0 + t) * sel(mat, a.n[0], a.n[1], a.n[2]) + row;
        const float* bias = sel(mat, a.bias[0], a.bias[1], a.bias[2]);
        float val = v + (bias ? __ldg(bias + row) : 0.f);
        if (K == ADD) val = ld_produced(a.residual + idx) + val;
        sel(mat, a.y[0], a.y[1], a.y[2])[idx] = val;
    };

    for (int rd = 0; round_ok(rd); ++rd) {
        int mat = 0, g = 0;
        const bool wv = assign(rd, w, mat, g);
        float acc[2][NT];
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int t = 0; t < NT; ++t) acc[r][t] = 0.f;
        for (int ch = 0; ch < nch; ++ch) {
            if (nch > 1) {
                __syncthreads();  // everyone is done with the previous chunk of x
                quantize(ch);
                __syncthreads();
            }
            while (cu.rd == rd && cu.ch == ch) {  // this warp's slices of the chunk (warp-uniform)
                __syncwarp();  // every lane is done reading the stage about to be refilled
                if (ah.ok()) {
                    issue(ah, istage);
                    advance(ah);
                }
                cp_async_commit();
                istage = istage + 1 == NS ? 0 : istage + 1;
                cp_async_wait<NS - 1>();  // this slice's group has landed (this lane's copies)
                __syncwarp();             // ... and every lane's
                decode(cu, cstage, acc);
                cstage = cstage + 1 == NS ? 0 : cstage + 1;
                advance(cu);
            }
        }
        // round done: reduce over lanes, then write (directly, or via the partner warp / the cluster)
        if (wv) {
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    float v = acc[r][t];
#pragma unroll
                    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                    acc[r][t] = v;
                }
        }
        const int r = lane / NT, t = lane % NT;  // the output this lane writes, if lane < 2 NT
        float* pp = &sm.part[rd & 1][0][0][0];
        if (PAIR) {  // acc[0]: gate row g, acc[1]: up row g
            if (wv && lane < NT && lane < mt) {
                const float gv = pick(acc, 0, lane), uv = pick(acc, 1, lane);
                a.y[0][(size_t)(t0 + lane) * a.n[0] + g] = gv / (1.f + expf(-gv)) * uv;
            }
        } else if (SPLIT) {
            if (wv && w < GPB && lane < 2 * NT) pp[(w * 2 + r) * TM + t] = pick(acc, r, t);
            __syncthreads();
            if (wv && w >= GPB && lane < 2 * NT) {
                const int row = 2 * g + r;
                if (row < a.n[0] && t < mt) {
                    const float gv = pp[((w - GPB) * 2 + r) * TM + t], uv = pick(acc, r, t);
                    a.y[0][(size_t)(t0 + t) * a.n[0] + row] = gv / (1.f + expf(-gv)) * uv;
                }
            }
        } else if (C == 1) {
            if (wv && lane < 2 * NT) {
                const int row = 2 * g + r;
                if (row < sel(mat, a.n[0], a.n[1], a.n[2]) && t < mt) store(mat, row, t, pick(acc, r, t));
            }
        } else {
            if (wv && lane < 2 * NT) pp[(w * 2 + r) * TM + t] = pick(acc, r, t);
            cg::this_cluster().sync();  // every block's partials are visible cluster-wide
            if (rank == 0 && threadIdx.x < NW * 2 * NT) {
                const int ww = threadIdx.x / (2 * NT), rr = (threadIdx.x / NT) & 1, tt = threadIdx.x % NT;
                int mat2, g2;
                if (assign(rd, ww, mat2, g2)) {
                    const int row = 2 * g2 + rr;
                    if (row < a.n[0] && tt < mt) {
                        float sum = 0.f;
                        for (int c = 0; c < C; ++c)
                            sum += *cg::this_cluster().map_shared_rank(&pp[(ww * 2 + rr) * TM + tt], c);
                        store(0, row, tt, sum);
                    }
                }
            }
            // no second barrier: the next round writes the other parity; a block reaches the round after that
            // only through the next round's cluster barrier, which rank 0 passes after reading this one
        }
    }
    if (C > 1) cg::this_cluster().sync();  // keep shared memory alive until rank 0 has read it
}

template <Kind K, class F0, class F1, class F2, int C>
__device__ __forceinline__ void entry(const Args& a) {
    __shared__ Smem<Layout<F0, F1, F2>> sm;
    pdl_launch_dependents();
    const int t0 = blockIdx.y * TM, mt = min(TM, a.m - t0);
#if QMV_M1
    for (int t = 0; t < mt; ++t) {  // one token at a time through the batch-1 body
        if (t) __syncthreads();
        body<K, F0, F1, F2, C, 1>(a, sm, t0 + t, 1);
    }
#else
    if (mt == 1)
        body<K, F0, F1, F2, C, 1>(a, sm, t0, 1);  // batch-1 decode: no token loop
    else
        body<K, F0, F1, F2, C, TM>(a, sm, t0, mt);
#endif
}

}  // namespace qmv

#ifndef KSPLIT
#define KSPLIT 1
#endif
#if KSPLIT > 1
#define QMV_CLUSTER __cluster_dims__(KSPLIT, 1, 1)
#else
#define QMV_CLUSTER
#endif
#ifndef QMV_MINB
#define QMV_MINB 4  // blocks per SM the registers are budgeted for (kernels.py QMV_BLOCKS_PER_SM): 80 registers
#endif
#define QMV_KERNEL extern "C" __global__ void QMV_CLUSTER __launch_bounds__(qmv::THREADS, QMV_MINB)
