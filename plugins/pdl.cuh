// Programmatic dependent launch (sm_90) and L2 prefetch, shared by every kernel of the decode and prompt steps.
//
// The runtime may launch a kernel with the programmatic-stream-serialization attribute (toolchain/cuda_runtime.py,
// Kernel.launch(pdl=True)): it is then scheduled while the kernel before it on the stream is still running, as soon
// as that kernel has called pdl_launch_dependents() in every block and SM resources are free. Such a kernel may do
// only work that depends on nothing an earlier kernel wrote (issuing its weight copies) before pdl_wait(), which
// returns once the previous grid has completed and its memory is visible. Every block of every kernel calls
// pdl_wait() before its first dependent read and before any write, and before it exits; so "kernel N complete"
// still implies "every kernel before N complete", the order the graph had without the attribute. Launched without
// the attribute, both instructions return at once. The first kernel of a step (a captured graph, or a plan) is
// launched without the attribute, so what was written before the step (the host's inputs, decode_advance and the
// KV-cache rows of earlier steps) may also be read before pdl_wait() (rope_kv_attention does, for one token).
//
// Earlier kernels' outputs must never be read with ld.global.nc (__ldg, or loads through `const T* __restrict__`):
// .nc promises the data is read-only for the kernel's whole lifetime, and ptxas does hoist such loads above
// griddepcontrol.wait (seen on the H100: a qmv1 build read x before its producer had written it: wrong logits from
// the second step on, different on every run). Kernels here read them with ld_produced() (coherent ld.global in a
// volatile asm: kept after the wait by the compiler and by ptxas) or plain loads through pointers without
// __restrict__ (which neither the compiler nor ptxas moves above the wait's memory clobber).
#pragma once
#include <stdint.h>

__device__ __forceinline__ float4 ld_produced(const float4* p) {
    float4 v;
    asm volatile("ld.global.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ float ld_produced(const float* p) {
    float v;
    asm volatile("ld.global.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ int ld_produced(const int* p) {
    int v;
    asm volatile("ld.global.s32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ long long ld_produced(const long long* p) {
    long long v;
    asm volatile("ld.global.s64 %0, [%1];" : "=l"(v) : "l"(p));
    return v;
}

// A kernel sized for `bytes` of dynamic shared memory but launched with less (a launcher bug) stops here rather than
// write past its allocation into a neighbour's.
__device__ __forceinline__ void trap_if_dynamic_smem_below(uint32_t bytes) {
    uint32_t have;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < bytes) __trap();
}

__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

// Asynchronous L2 prefetch of [p, p + bytes): a hint, nothing waits for it. Only whole 16-byte units inside the range
// are asked for (the bulk prefetch needs 16-aligned addresses and sizes), in pieces of at most 32 KB.
__device__ __forceinline__ void l2_prefetch_range(const void* p, size_t bytes) {
    const uintptr_t g = (uintptr_t)__cvta_generic_to_global(p);
    uintptr_t lo = (g + 15) & ~uintptr_t(15);
    const uintptr_t hi = (g + bytes) & ~uintptr_t(15);
    for (; lo < hi; lo += 32768) {
        const uint32_t n = (uint32_t)(hi - lo < 32768 ? hi - lo : 32768);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(lo), "r"(n) : "memory");
    }
}
