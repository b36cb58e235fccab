// Thread-block-cluster exchange without cluster.sync(): senders push values into a receiver's shared memory with
// st.async, and the receiver's mbarrier counts the bytes (sm_90). cluster.sync() as cooperative_groups emits it is
// a barrier with a GPU-wide memory fence (MEMBAR.ALL.GPU) and an L1 invalidation on both sides of it, which made it
// the slowest step of the attention's merge (docs/perf-notes.md v8). Protocol, per launch:
//   receiver, one thread:  push_bar_init(bar, bytes)   (the bytes every sender together will push)
//   every thread:          cluster_arrive_relaxed()    (as early as possible), later cluster_wait() before a push
//   senders:               push(...) / push4(...)      (into the receiver's variable, counted by its bar)
//   receiver:              push_bar_wait(bar)          (then reads its own shared memory)
// A receiver leaves only after its wait, so no block's shared memory goes while a push into it is in flight.
#pragma once
#include <stdint.h>

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ uint32_t cluster_addr(uint32_t a, uint32_t rank) {  // the same variable in block `rank`
    uint32_t r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    return r;
}

// the calling block's receiving mbarrier: one arrival (this call) and `bytes` of pushes complete its phase 0
__device__ __forceinline__ void push_bar_init(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(bar)) : "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                 :: "r"(smem_addr(bar)), "r"(bytes) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
// every thread of every block: after push_bar_init (the relaxed arrive carries no data; the fence above orders
// the initialization), and cluster_wait() before the first push, once all receivers are initialized
__device__ __forceinline__ void cluster_arrive_relaxed() {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); }

// value(s) into `dst` of block `rank` (a local shared-memory variable's address there), counted by that block's bar
__device__ __forceinline__ void push(const void* dst, uint32_t v, const uint64_t* bar, uint32_t rank) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];"
                 :: "r"(cluster_addr(smem_addr(dst), rank)), "r"(v), "r"(cluster_addr(smem_addr(bar), rank))
                 : "memory");
}
__device__ __forceinline__ void push4(const void* dst, uint4 v, const uint64_t* bar, uint32_t rank) {  // 16-aligned
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];"
                 :: "r"(cluster_addr(smem_addr(dst), rank)), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w),
                    "r"(cluster_addr(smem_addr(bar), rank)) : "memory");
}

// until every push into this block has landed (phase 0 of bar complete); acquire at cluster scope
__device__ __forceinline__ void push_bar_wait(uint64_t* bar) {
    uint32_t done = 0;
    while (!done)
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], 0; "
                     "selp.u32 %0, 1, 0, p; }" : "=r"(done) : "r"(smem_addr(bar)) : "memory");
}
