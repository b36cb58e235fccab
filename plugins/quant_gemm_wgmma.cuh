// The prefill GEMM on Hopper's warpgroup MMA (wgmma, sm_90a): plugins/quant_gemm.cu's q4k_gemm / q6k_gemm built with
// -DGEMM_WGMMA=1 (and -arch=sm_90a) run this body instead of the mma.sync one. Same split-K cluster of 2, same
// raw-weight staging, scales and dequantization (plugins/quant_mma.cuh); what changes is who feeds the tensor cores
// and how much each instruction does. With -DGEMM_XH=1 (the cuda backend's default) the x argument is not the
// float32 activation but its fp16 copy in the fragments' k order, made by gemm_x_f16 (quant_gemm.cu) once per
// activation for every GEMM that reads it.
//
// LAUNCH: block (256, 1, 1), grid (cdiv(n, 128), cdiv(m, 128), GEMM_SPLIT), cluster (1, 1, 2) at compile time (the
// default GEMM_SPLIT = 2; none with GEMM_SPLIT = 1), dynamic shared
// memory smem_bytes<F>(): q4k_gemm 95,232 B, q6k_gemm 119,808 B; GEMM_XH 111,616 / 136,192 B (toolchain/kernels.py
// GEMM_WGMMA_SMEM, GEMM_XH_SMEM).
//
// Design (docs/perf-notes.md "Prefill GEMM on Hopper's warpgroup MMA")
// - Operands swapped against the mma.sync build: the wgmma's M side is the weights (64 rows per warpgroup, 2
//   warpgroups: 128 rows per CTA), its N side the tokens (128 per CTA). A = the weights, dequantized by each warp
//   straight into A-fragment registers from the staged raw blocks (the mma.m16n8k16 A layout per warp, which is
//   Fmt<F>::dequant's B fragments of two rows g and g + 8); B = x, fp16 in shared memory, K-major rows of 64 k
//   (128 bytes) in the 128-byte swizzle, read by the tensor cores through a matrix descriptor. No ldmatrix, no
//   fp16 weight tile: one wgmma.m64n128k16 per warpgroup per 16 k does what 32 mma.sync of a warp tile did.
// - The same k permutation inside each 16-k chunk as quant_mma.cuh's fragments (x stored permuted by store_x_sw, or
//   already permuted by gemm_x_f16).
// - x from float32 (GEMM_XH=0): 3 shared buffers, one 64-k substep each; substep t's wgmmas run asynchronously while
//   the threads store substep t + 1's x (read from global one substep earlier) and dequantize the next fragments.
//   Buffer (t + 1) % 3 was last read by group t - 2, which every warpgroup waited for (wait_group 1) before the
//   barrier that ends substep t - 1; the A fragments alternate between two register sets for the same reason.
// - x from fp16 (GEMM_XH=1): 4 buffers filled by cp.async two substeps ahead (no x in registers, no conversion,
//   half the bytes from L2); the same wait_group 1 + barrier argument frees buffer (t + 2) % 4.
// - Output: accumulator row = weight row, column = token, so each thread stores y[token][row] words: a warp's
//   store covers 8 consecutive rows (32 bytes) of 4 tokens: whole sectors.
#pragma once
#include "quant_mma.cuh"

namespace qwg {
using namespace qmma;

#ifndef GEMM_XH
#define GEMM_XH 0  // 1: x arrives as fp16 in the fragments' k order (gemm_x_f16) and is copied with cp.async
#endif
constexpr int BM = 128, BN = 128, THREADS = 256;  // tokens, weight rows per CTA
constexpr int XT = BM * 128;                      // one x buffer: 128 tokens x 64 k fp16, 128-byte swizzled rows
constexpr int NXB = GEMM_XH ? 4 : 3;              // x buffers

template <class F> constexpr int smem_bytes() { return 1024 + NXB * XT + 2 * BN * G<F>::RS + BN * 64; }
static_assert(GEMM_XH ? smem_bytes<Q4K>() == 111616 && smem_bytes<Q6K>() == 136192
                      : smem_bytes<Q4K>() == 95232 && smem_bytes<Q6K>() == 119808, "shared memory (header)");
static_assert(128 * 64 * 4 <= NXB * XT, "split-K exchange fits the x buffers");

__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Matrix descriptor of a K-major operand in the 128-byte swizzle: start address, leading byte offset 16 (unused
// for this layout), stride byte offset 1024 (8 rows of 128 bytes), swizzle mode 1 (128 B). The atom must be
// 1024-aligned; a k step of 16 inside the 64-k row advances the start by 32 bytes.
__device__ __forceinline__ uint64_t kmajor_sw128(uint32_t saddr) {
    return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
           ((uint64_t)1 << 62);
}

// D[64 x 128] += A[64 x 16] (registers, this warp's 16 rows) * B[16 x 128] (shared, K-major): 64 fp32 per thread,
// d[4j + e] = (row 16 warp + g + 8 (e >> 1), token 8j + 2c + (e & 1))
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,"
        "%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,"
        "%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// x substep (quant_gemm.cu's XRegs: 128 rows x 64 k as 8 float4 per thread) -> fp16 row `row` of a swizzled buffer:
// the permuted words of quant_gemm.cu's store_x, 16-byte unit u of a row at (u ^ (row % 8)) * 16
template <class XR>
__device__ __forceinline__ void store_x_sw(const XR& r, uint8_t* Xs, int tid) {
#pragma unroll
    for (int it = 0; it < 4; ++it) {
        const int id = THREADS * it + tid, row = id >> 3, kk = (id >> 1) & 3, u = id & 1, sw = row & 7;
        const float4 a = r.v[2 * it], b = r.v[2 * it + 1];
        uint8_t* rp = Xs + row * 128 + 8 * u;
        *reinterpret_cast<uint2*>(rp + (((2 * kk) ^ sw) << 4)) = make_uint2(pack_h2(a.x, a.z), pack_h2(b.x, b.z));
        *reinterpret_cast<uint2*>(rp + (((2 * kk + 1) ^ sw) << 4)) = make_uint2(pack_h2(a.y, a.w), pack_h2(b.y, b.w));
    }
}

// GEMM_XH: x substep `sub` of the superblock at element kb, fp16 already in the fragments' k order (gemm_x_f16),
// copied global -> swizzled buffer Xs with cp.async: 128 rows x 4 chunks x 2 16-byte units, 4 per thread
template <class F>
__device__ __forceinline__ void issue_xh(uint8_t* Xs, const uint16_t* xh, int m0, int m, int k, int kb, int sub,
                                         int tid) {
#pragma unroll
    for (int it = 0; it < 4; ++it) {
        const int id = THREADS * it + tid, row = id >> 3, kk = (id >> 1) & 3, u = id & 1;
        const uint16_t* src = xh + (size_t)min(m0 + row, m - 1) * k + kb + Fmt<F>::chunk_base(sub, kk) + 8 * u;
        cp_async16(Xs + row * 128 + (((2 * kk + u) ^ (row & 7)) << 4), src);
    }
}
__device__ __forceinline__ void cp_async_wait1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

}  // namespace qwg
