// The arithmetic that combines partial softmax results (numerators and sums relative to each part's own running max,
// base 2). rope_kv_attention.cu merges warps, blocks and clusters with it, and the o projection's decode build merges
// the attention's cluster partials with it (plugins/qmv1.cuh QMV1_XMERGE): the two must give the same bits.
#pragma once

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// weight of a part whose max is m under the overall max mx; 0 for a part that saw no keys (m = -inf)
__device__ __forceinline__ float merge_weight(float m, float mx) { return m == -INFINITY ? 0.f : ex2(m - mx); }

// floats per slot of the attention's cluster partials (xmerge): every head's numerators, then a (max, sum) pair per
// head, padded to 16 bytes (toolchain/kernels.py xmerge_slot_floats allocates them)
__host__ __device__ constexpr int xmerge_slot_floats(int heads, int head_dim) {
    return (heads * head_dim + 2 * heads + 3) / 4 * 4;
}
