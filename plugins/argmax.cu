// out[i] = argmax(logits[i, :]) as int64, numpy semantics: the first maximum wins ties, and a NaN counts as the
// maximum (the first NaN wins).
//     argmax(const float* logits, int m, int vocab, long long* out)
// grid (8, m), block (512), compile-time thread-block cluster of 8 along x: one row (151936 logits) is split over
// 8 SMs, and the 8 partial (value, index) pairs are combined through distributed shared memory: no global
// scratch, one launch. Each block pushes its pair into rank 0 (plugins/cluster_push.cuh: no cluster.sync).
#include <stdint.h>

#include "argmax_order.cuh"
#include "cluster_push.cuh"
#include "pdl.cuh"

constexpr int SPLITS = 8, THREADS = 512;  // 1024 measured slower (5.8 vs 5.3 us)


extern "C" __global__ void __cluster_dims__(SPLITS, 1, 1) __launch_bounds__(THREADS)
argmax(const float* logits, int m, int vocab, long long* __restrict__ out) {
    __shared__ float wv[THREADS / 32];
    __shared__ int wi[THREADS / 32];
    __shared__ float rank_v[SPLITS];              // rank 0: every block's pair, pushed
    __shared__ int rank_i[SPLITS];
    __shared__ __align__(8) uint64_t bar;
    unsigned rank;
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    if (rank == 0 && threadIdx.x == 0) push_bar_init(&bar, SPLITS * 8);
    cluster_arrive_relaxed();
    pdl_launch_dependents();
    pdl_wait();
    const float* row = logits + (size_t)blockIdx.y * vocab;
    const int chunk = ((vocab + SPLITS - 1) / SPLITS + 3) & ~3;  // multiple of 4: float4 loads stay aligned
    const int lo = blockIdx.x * chunk, hi = min(vocab, lo + chunk);
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    if ((vocab & 3) == 0) {
#pragma unroll 4
        for (int e = lo + 4 * threadIdx.x; e < hi; e += 4 * THREADS) {  // hi - e >= 4 since both are multiples of 4
            const float4 v = ld_produced(reinterpret_cast<const float4*>(row + e));
            take(v.x, e, bv, bi);
            take(v.y, e + 1, bv, bi);
            take(v.z, e + 2, bv, bi);
            take(v.w, e + 3, bv, bi);
        }
    } else {
        for (int e = lo + threadIdx.x; e < hi; e += THREADS) take(row[e], e, bv, bi);
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        take(ov, oi, bv, bi);
    }
    if ((threadIdx.x & 31) == 0) { wv[threadIdx.x >> 5] = bv; wi[threadIdx.x >> 5] = bi; }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < THREADS / 32; ++w) take(wv[w], wi[w], bv, bi);
    cluster_wait();  // rank 0's mbarrier is initialized
    if (threadIdx.x == 0) {
        push(&rank_v[rank], __float_as_uint(bv), &bar, 0);
        push(&rank_i[rank], (uint32_t)bi, &bar, 0);
    }
    if (rank == 0 && threadIdx.x == 0) {  // the pairs in rank order, as the blocks' ranges go
        push_bar_wait(&bar);
        bv = rank_v[0];
        bi = rank_i[0];
        for (int r = 1; r < SPLITS; ++r) take(rank_v[r], rank_i[r], bv, bi);
        out[blockIdx.y] = (long long)bi;
    }
}
