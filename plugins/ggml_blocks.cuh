// ggml block layouts, decoded straight from raw GGUF bytes (docs/ops.md), shared by the matmul and gather kernels.
//
// Block structs are NOT naturally aligned in a row: Q4_K blocks are 144 bytes (16-aligned when the tensor is),
// Q6_K 210 (2-aligned), Q5_0 22 and Q8_0 34 (2-aligned). So nothing here casts a block to a struct: the element
// decoders read bytes, and the matmul reads 32-bit words through ld32_any(), which copes with any alignment.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

namespace ggml {

// block elements / block bytes of each format
struct Q4K { static constexpr int BE = 256, BB = 144; };
struct Q6K { static constexpr int BE = 256, BB = 210; };
struct Q50 { static constexpr int BE = 32, BB = 22; };
struct Q80 { static constexpr int BE = 32, BB = 34; };

__device__ __forceinline__ float half_bits_to_float(uint32_t h) {
    return __half2float(__ushort_as_half((unsigned short)(h & 0xFFFFu)));
}

// 32-bit little-endian word at any byte address (shared or global): two aligned loads and a funnel shift.
// May read up to 7 bytes past p+3 (inside the same 8-byte window), so callers pad their buffers.
__device__ __forceinline__ uint32_t ld32_any(const uint8_t* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uint32_t* w = reinterpret_cast<const uint32_t*>(a & ~uintptr_t(3));
    return __funnelshift_r(w[0], w[1], (uint32_t)(a & 3) * 8u);  // shift 0 returns w[0]
}

// Exact small-integer -> float without an I2F (conversions run at 1/8 of the FMA rate on sm_90, too slow for a
// matvec at memory speed): byte `i` of w is put in the mantissa of 2^23 (0x4B0000bb), so the float is 2^23 + b and
// subtracting (2^23 + bias) gives b - bias exactly. PRMT + FADD per element.
template <int BIAS>
__device__ __forceinline__ float byte_to_float(uint32_t w, int i) {
    return __int_as_float(__byte_perm(w, 0x4B00u, 0x5440u | (uint32_t)i)) - (8388608.0f + (float)BIAS);
}

// One PRMT per element: byte `i` of w (value b < 128) becomes mantissa bits 16..22 under exponent 2^-1, i.e. the
// float 0.5 + b/256 (exact). A dot product of such floats with x gives sum(b*x) = 256*sum(f*x) - 128*sum(x), and
// sum(x) is shared by every row of a warp, so the per-element cost is PRMT + FFMA. The cancellation costs a few
// bits (|128*sum(x)| vs |sum(b*x)|: ~1e-6 relative on random data, far inside the matmul tolerance of 1e-4).
__device__ __forceinline__ float byte_to_half_plus(uint32_t w, int i) {
    return __int_as_float(__byte_perm(w, 0x3F00u, 0x5044u | ((uint32_t)i << 8)));
}

// Q4_K 6-bit (scale, min) pair j of the 12-byte field in words s0 (bytes 0-3), s1 (4-7), s2 (8-11).
// Sub-blocks 0-3 keep them in the low 6 bits of bytes j and j+4; sub-blocks 4-7 keep their low 4 bits in the
// nibbles of byte j+4 (of s2) and their top 2 bits in the spare top bits of bytes j-4 and j.
__device__ __forceinline__ void q4k_scale_min(uint32_t s0, uint32_t s1, uint32_t s2, int j, uint32_t& sc, uint32_t& mn) {
    const uint32_t sh = 8u * (uint32_t)(j & 3);
    const uint32_t by = (s0 >> sh) & 0xFF, bz = (s1 >> sh) & 0xFF, bw = (s2 >> sh) & 0xFF;
    if (j < 4) {
        sc = by & 63;
        mn = bz & 63;
    } else {
        sc = (bw & 15) | ((by >> 6) << 4);
        mn = (bw >> 4) | ((bz >> 6) << 4);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// One element e (0 <= e < BE) of a block at byte pointer b, in ggml's float32 order (so a gather is bit-exact
// against toolchain/quants.py). Byte loads only: used where speed does not matter (embedding rows).

__device__ __forceinline__ float deq_elem(Q4K, const uint8_t* b, int e) {
    const int j = e >> 5, l = e & 31;                       // sub-block of 32, index in it
    const uint32_t q = (b[16 + 32 * (j >> 1) + l] >> (4 * (j & 1))) & 15;
    uint32_t sc, mn;
    const uint32_t s0 = b[4] | b[5] << 8 | b[6] << 16 | (uint32_t)b[7] << 24;
    const uint32_t s1 = b[8] | b[9] << 8 | b[10] << 16 | (uint32_t)b[11] << 24;
    const uint32_t s2 = b[12] | b[13] << 8 | b[14] << 16 | (uint32_t)b[15] << 24;
    q4k_scale_min(s0, s1, s2, j, sc, mn);
    const float d = half_bits_to_float(b[0] | b[1] << 8), dmin = half_bits_to_float(b[2] | b[3] << 8);
    return __fsub_rn(__fmul_rn(__fmul_rn(d, (float)sc), (float)q), __fmul_rn(dmin, (float)mn));
}

__device__ __forceinline__ float deq_elem(Q6K, const uint8_t* b, int e) {
    const int h = e >> 7, k = (e >> 5) & 3, l = e & 31;    // half, run of 32 in the half, index in the run
    const uint32_t lo = (b[64 * h + l + 32 * (k & 1)] >> (4 * (k >> 1))) & 15;
    const uint32_t hi = (b[128 + 32 * h + l] >> (2 * k)) & 3;
    const int q = (int)(lo | hi << 4) - 32;
    const float d = half_bits_to_float(b[208] | b[209] << 8);
    return __fmul_rn(__fmul_rn(d, (float)(int8_t)b[192 + (e >> 4)]), (float)q);
}

__device__ __forceinline__ float deq_elem(Q50, const uint8_t* b, int e) {
    const uint32_t nib = (b[6 + (e & 15)] >> (4 * (e >> 4))) & 15;
    const uint32_t hb = (b[2 + (e >> 3)] >> (e & 7)) & 1;  // bit e of the little-endian qh
    const float d = half_bits_to_float(b[0] | b[1] << 8);
    return __fmul_rn((float)((int)(nib | hb << 4) - 16), d);
}

__device__ __forceinline__ float deq_elem(Q80, const uint8_t* b, int e) {
    const float d = half_bits_to_float(b[0] | b[1] << 8);
    return __fmul_rn((float)(int8_t)b[2 + e], d);
}

}  // namespace ggml
