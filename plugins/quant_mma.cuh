// Tensor-core pieces shared by the quantized GEMMs (plugins/quant_gemm.cu: prompt prefill; plugins/quant_gemm_skinny.cu:
// batched decode): PTX wrappers, and per GGUF format the copy of a superblock's raw bytes to shared memory, its scales
// as fp16 pairs, and the dequantization of a row's raw bytes straight into mma.sync.m16n8k16 fragment registers.
//
// Fragment convention (quant_gemm.cu's header has the derivation): within each 16-k chunk the k order is permuted
// so that the 4 values a lane (c = lane % 4) needs of one weight row are the 4 consecutive bytes of one 32-bit word:
// physical 4c+i is logical k {2c, 2c+8, 2c+1, 2c+9}[i]. Fmt<F>::dequant's b[kk][0] holds physical (4c, 4c+2), b[kk][1]
// physical (4c+1, 4c+3): the B fragment of a W^T operand, and equally the A fragment rows of a W operand. x must be
// permuted the same way (physical order: plain float4 x[base + 4c .. +3] -> (x0, x2), (x1, x3)).
#pragma once
#include "ggml_blocks.cuh"

#ifndef QMMA_SCALES_H2
#define QMMA_SCALES_H2 0  // 1: the scales' fp16 pairs made in half2 arithmetic, 4 sub-blocks a word (the same bits)
#endif

namespace qmma {
using namespace ggml;

constexpr uint32_t MAGIC = 0x64006400u;  // half2 (1024, 1024)

template <class F> struct G;
template <> struct G<Q4K> { static constexpr int RS = 144; };  // raw row stride in shared memory (one block)
template <> struct G<Q6K> { static constexpr int RS = 240; };  // 14 x 16-byte chunks, padded for banks

// PTX helpers

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src));
}
// 32-bit word at any (2-aligned) shared-memory byte address: two ld.shared and a funnel shift (ggml's ld32_any goes
// through a generic pointer, which the compiler cannot keep in the shared window: generic LD, long scoreboard).
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ uint32_t lds32(uint32_t a) {
    uint32_t v;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(a));
    return v;
}
__device__ __forceinline__ uint32_t lds32_any(uint32_t a) {
    const uint32_t b = a & ~3u;
    return __funnelshift_r(lds32(b), lds32(b + 4), (a & 3u) * 8u);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int LUT>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
    return d;
}
// (a & b) | c  and  a | (b & c)
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) { return lop3<0xEA>(a, b, c); }
__device__ __forceinline__ uint32_t or_and(uint32_t a, uint32_t b, uint32_t c) { return lop3<0xF8>(a, b, c); }

__device__ __forceinline__ uint32_t hsub2(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
__device__ __forceinline__ uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
// half2 (lo, hi) from two floats
__device__ __forceinline__ uint32_t pack_h2(float lo, float hi) {
    uint32_t d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
__device__ __forceinline__ uint32_t h2_splat(float v) {
    const uint32_t h = __half_as_ushort(__float2half_rn(v));
    return h | (h << 16);
}

// ----------------------------------------------------------------------------------------------------------------
// Per-format pieces. Substep `sub` (0..3) of a superblock = 4 chunks of 16 k; chunk kk starts at element
// chunk_base(sub, kk) of the superblock.

// fn(row, ch, gr) for every 16-byte chunk ch < CH of rows 0..BN-1, spread over THREADS threads; gr = the global row
// n0 + row, clamped to the last one (rows past n copy row n - 1: their results are never stored)
template <int BN, int THREADS, int CH, class Fn>
__device__ __forceinline__ void each_chunk(int n0, int n, int tid, Fn fn) {
    for (int id = tid; id < BN * CH; id += THREADS) {
        const int row = id / CH, ch = id - CH * row;
        fn(row, ch, min(n0 + row, n - 1));
    }
}

template <class F> struct Fmt;

template <> struct Fmt<Q4K> {
    static __device__ __forceinline__ int chunk_base(int sub, int kk) { return 64 * sub + 16 * kk; }

    // raw bytes of superblock sb of rows n0..n0+BN-1 -> R (row stride 144, blocks 16-aligned), by THREADS threads
    template <int BN, int THREADS>
    static __device__ __forceinline__ void issue_raw(uint8_t* R, const uint8_t* w, size_t row_bytes, int n0, int n,
                                                     int sb, int tid) {
        each_chunk<BN, THREADS, 9>(n0, n, tid, [&](int row, int ch, int gr) {
            cp_async16(R + row * 144 + 16 * ch, w + (size_t)gr * row_bytes + (size_t)sb * 144 + 16 * ch);
        });
    }
    // S[row][j] (8 bytes, j = sub-block 0..7) = {half2 d*sc_j, half2 -(dmin*mn_j)}, rows n0..n0+BN-1
    template <int BN, int THREADS>
    static __device__ __forceinline__ void scales(uint8_t* S, const uint8_t* R, uint32_t, size_t, int, int, int,
                                                  int tid) {
        for (int e = tid; e < 2 * BN; e += THREADS) {
            const int row = e >> 1, hf = e & 1;
            const uint4 hd = *reinterpret_cast<const uint4*>(R + row * 144);
            uint2* dst = reinterpret_cast<uint2*>(S + row * 64);
            if constexpr (QMMA_SCALES_H2) {
                // the 6-bit scales and mins of sub-blocks 4hf..4hf+3 as bytes of one word each (q4k_scale_min's
                // unpacking, 4 at once); each byte -> half2 (1024 + b) by a byte permute, minus 1024 (exact), times
                // d (or -dmin): the exact product rounded once, as h2_splat(d * (float)sc) rounds it
                const uint32_t sc4 = hf ? (hd.w & 0x0F0F0F0Fu) | ((hd.y >> 2) & 0x30303030u) : hd.y & 0x3F3F3F3Fu;
                const uint32_t mn4 = hf ? ((hd.w >> 4) & 0x0F0F0F0Fu) | ((hd.z >> 2) & 0x30303030u) : hd.z & 0x3F3F3F3Fu;
                const uint32_t d2 = __byte_perm(hd.x, 0, 0x1010), nm2 = __byte_perm(hd.x, 0, 0x3232) ^ 0x80008000u;
#pragma unroll
                for (int jj = 0; jj < 4; ++jj) {
                    const uint32_t sel = 0x4040u | (uint32_t)jj | ((uint32_t)jj << 8);
                    dst[4 * hf + jj] = make_uint2(hmul2(hsub2(__byte_perm(sc4, 0x64646464u, sel), MAGIC), d2),
                                                  hmul2(hsub2(__byte_perm(mn4, 0x64646464u, sel), MAGIC), nm2));
                }
            } else {
                const float d = half_bits_to_float(hd.x), dmin = half_bits_to_float(hd.x >> 16);
#pragma unroll
                for (int jj = 0; jj < 4; ++jj) {
                    uint32_t sc, mn;
                    q4k_scale_min(hd.y, hd.z, hd.w, 4 * hf + jj, sc, mn);
                    dst[4 * hf + jj] = make_uint2(h2_splat(d * (float)sc), h2_splat(-(dmin * (float)mn)));
                }
            }
        }
    }
    // B fragments of the 4 chunks of substep `sub` for one row: b[kk][0..1]
    static __device__ __forceinline__ void dequant(uint32_t (&b)[4][2], const uint8_t* rrow, const uint8_t* srow,
                                                   uint32_t, int sub, int c) {
        const uint4 sm = *reinterpret_cast<const uint4*>(srow + 16 * sub);  // sub-blocks 2sub, 2sub+1
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const uint32_t W = *reinterpret_cast<const uint32_t*>(rrow + 16 + 32 * sub + 16 * q + 4 * c);
#pragma unroll
            for (int s = 0; s < 2; ++s) {  // s = 0: low nibbles (sub-block 2sub), 1: high (2sub+1)
                const uint32_t sc = s ? sm.z : sm.x, mn = s ? sm.w : sm.y;
                const uint32_t v0 = and_or(W >> (4 * s), 0x000F000Fu, MAGIC);      // bytes 0, 2
                const uint32_t v1 = and_or(W >> (4 * s + 8), 0x000F000Fu, MAGIC);  // bytes 1, 3
                b[2 * s + q][0] = hfma2(hsub2(v0, MAGIC), sc, mn);
                b[2 * s + q][1] = hfma2(hsub2(v1, MAGIC), sc, mn);
            }
        }
    }
};

template <> struct Fmt<Q6K> {
    // sub = 2h + v: chunk kk = elements 128h + 32kk + 16v + [0, 16)
    static __device__ __forceinline__ int chunk_base(int sub, int kk) {
        return 128 * (sub >> 1) + 32 * kk + 16 * (sub & 1);
    }
    // the aligned-down 16-byte span of each row's block (13 or 14 chunks; the tail stays in the last byte's granule)
    template <int BN, int THREADS>
    static __device__ __forceinline__ void issue_raw(uint8_t* R, const uint8_t* w, size_t row_bytes, int n0, int n,
                                                     int sb, int tid) {
        each_chunk<BN, THREADS, 14>(n0, n, tid, [&](int row, int ch, int gr) {
            const uintptr_t lo = reinterpret_cast<uintptr_t>(w) + (size_t)gr * row_bytes + (size_t)sb * 210;
            const uintptr_t a = lo & ~uintptr_t(15);
            const int cnt = (int)((lo + 210 - a + 15) >> 4);
            if (ch < cnt) cp_async16(R + row * 240 + 16 * ch, reinterpret_cast<const uint8_t*>(a) + 16 * ch);
        });
    }
    // byte offset of row's block inside its staged span
    static __device__ __forceinline__ uint32_t row_off(uint32_t wlo, size_t row_bytes, int gr, int sb) {
        return (wlo + (uint32_t)gr * (uint32_t)row_bytes + (uint32_t)sb * 210u) & 15u;
    }
    // S[row][8h + 4v + kk] (4 bytes) = half2 d * scales[8h + 2kk + v]
    template <int BN, int THREADS>
    static __device__ __forceinline__ void scales(uint8_t* S, const uint8_t* R, uint32_t wlo, size_t row_bytes,
                                                  int n0, int n, int sb, int tid) {
        for (int e = tid; e < 2 * BN; e += THREADS) {
            const int row = e >> 1, h = e & 1;
            const uint32_t rb = smem_u32(R + row * 240) + row_off(wlo, row_bytes, min(n0 + row, n - 1), sb);
            const uint32_t s0 = lds32_any(rb + 192 + 8 * h), s1 = lds32_any(rb + 196 + 8 * h);
            const float d = half_bits_to_float(lds32_any(rb + 208));
            uint32_t* dst = reinterpret_cast<uint32_t*>(S + row * 64) + 8 * h;
            if constexpr (QMMA_SCALES_H2) {
                // each int8 scale + 128 (its top bit flipped) -> half2 (1024 + 128 + sc) by a byte permute, minus
                // 1152 (exact), times d: the exact product rounded once, as h2_splat(d * (float)sc) rounds it
                const uint32_t d2 = __byte_perm(lds32_any(rb + 208), 0, 0x1010);
                const uint32_t u0 = s0 ^ 0x80808080u, u1 = s1 ^ 0x80808080u;
#pragma unroll
                for (int bi = 0; bi < 8; ++bi) {  // scale byte bi = 2kk + v
                    const uint32_t sel = 0x4040u | (uint32_t)(bi & 3) | ((uint32_t)(bi & 3) << 8);
                    dst[4 * (bi & 1) + (bi >> 1)] =
                        hmul2(hsub2(__byte_perm(bi < 4 ? u0 : u1, 0x64646464u, sel), 0x64806480u), d2);
                }
            } else {
#pragma unroll
                for (int bi = 0; bi < 8; ++bi) {  // scale byte bi = 2kk + v
                    const int kk = bi >> 1, v = bi & 1;
                    const int sc = (int)(int8_t)(((bi < 4 ? s0 : s1) >> (8 * (bi & 3))) & 0xFF);
                    dst[4 * v + kk] = h2_splat(d * (float)sc);
                }
            }
        }
    }
    static __device__ __forceinline__ void dequant(uint32_t (&b)[4][2], const uint8_t* rrow, const uint8_t* srow,
                                                   uint32_t off, int sub, int c) {
        const int h = sub >> 1, v = sub & 1;
        const uint32_t rb = smem_u32(rrow) + (off & ~3u) + 4 * c, sh = (off & 3u) * 8u;  // off is even
        auto word = [&](int o) { return __funnelshift_r(lds32(rb + o), lds32(rb + o + 4), sh); };
        const uint32_t A = word(64 * h + 16 * v), B = word(64 * h + 32 + 16 * v), Q = word(128 + 32 * h + 16 * v);
        const uint4 ds = *reinterpret_cast<const uint4*>(srow + 16 * sub);
        const uint32_t BIAS = 0x64206420u;  // half2 (1056, 1056): q - 32
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const uint32_t lo = ((kk & 1 ? B : A) >> (4 * (kk >> 1))) & 0x0F0F0F0Fu;
            const uint32_t hq = kk == 0 ? Q << 4 : kk == 1 ? Q << 2 : kk == 2 ? Q : Q >> 2;  // bits 2kk.. -> 4..5
            const uint32_t q6 = or_and(lo, hq, 0x30303030u);                 // 4 six-bit values, one per byte
            const uint32_t v0 = __byte_perm(q6, 0x64646464u, 0x4240);       // half2 (1024 + byte 0, 1024 + byte 2)
            const uint32_t v1 = __byte_perm(q6, 0x64646464u, 0x4341);       // bytes 1, 3
            const uint32_t dsk = kk == 0 ? ds.x : kk == 1 ? ds.y : kk == 2 ? ds.z : ds.w;
            b[kk][0] = hmul2(hsub2(v0, BIAS), dsk);
            b[kk][1] = hmul2(hsub2(v1, BIAS), dsk);
        }
    }
};

}  // namespace qmma
