// What a kernel boundary of the decode step costs, against a grid barrier inside one persistent kernel (issue 17).
// Built and timed by scripts/boundary_bench.py; not a kernel of the product.
//
// Every "phase" does what a decode projection does at its edges: read the whole vector x that the previous phase
// wrote (1,536 floats, from L2), reduce it in the block, write this block's slice of the next x; and, when
// `wbytes` > 0, stream its share of `wbytes` bytes of weights (loads of the first round issued before the wait, as
// the real kernels do before griddepcontrol.wait). A phase is either one kernel (`phase`: waiting for its
// predecessor by griddepcontrol.wait, or by a counter that the predecessor's blocks release) or one pass of the
// persistent kernel's loop (`persistent`: a counter per phase, i.e. a grid barrier).
#include <stdint.h>

#define KX 1536
#define UNROLL 8

__device__ __forceinline__ uint4 ldw(const uint8_t* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
__device__ __forceinline__ float ldx(const float* p) {  // a vector another block wrote: from L2
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void red_release(unsigned* p) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(p) : "memory");
}
__device__ __forceinline__ void wait_count(const unsigned* c, unsigned target) {
    if (threadIdx.x == 0)
        while (ld_acquire(c) < target) __nanosleep(20);
    __syncthreads();
}
__device__ __forceinline__ void arrive(unsigned* c) {
    __syncthreads();  // every thread's stores of this block issued
    if (threadIdx.x == 0) {
        __threadfence();
        red_release(c);
    }
}

// the xor of this block's share of a phase's weights (the first `nstream` blocks share them; the others none): round
// 0 already loaded (`early`), the rest streamed now
__device__ __forceinline__ uint32_t stream_rest(const uint8_t* w, size_t wbytes, int nstream, const uint4 (&early)[UNROLL]) {
    uint32_t acc = 0;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) acc ^= early[u].x ^ early[u].y ^ early[u].z ^ early[u].w;
    if (wbytes && (int)blockIdx.x < nstream) {
        const size_t per = wbytes / nstream & ~size_t(15), n16 = per / 16;
        const uint8_t* b = w + per * blockIdx.x;
        for (size_t i = threadIdx.x + (size_t)UNROLL * blockDim.x; i < n16; i += (size_t)UNROLL * blockDim.x) {
            uint4 v[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) v[u] = i + u * blockDim.x < n16 ? ldw(b + 16 * (i + u * blockDim.x)) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
        }
    }
    return acc;
}

// element e of the next x from this x's sum and its element e + 1 (so that a stale or half-written x shows in the
// result: boundary_bench.py checks every variant against a float64 simulation); acc, the weights' xor, is never
// the magic value (it keeps the loads alive)
__device__ __forceinline__ float next_x(float tot, float xn, uint32_t acc) {
    return tot * (1.f / KX) + 0.5f * xn + (acc == 0x12345678u ? 1.f : 0.f);
}

// every thread's s summed (the same order in every block); red is free again when it returns
__device__ __forceinline__ float block_sum(float s) {
    __shared__ float red[32];
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
    __syncthreads();
    float tot = 0.f;
    for (int i = 0; i < (int)(blockDim.x >> 5); ++i) tot += red[i];
    __syncthreads();
    return tot;
}

// one phase's body after its dependency is met; w: this phase's weights, early: their first round, loaded
__device__ __forceinline__ void body(const float* x, float* y, const uint8_t* w, size_t wbytes, int nstream,
                                     uint4 (&early)[UNROLL]) {
    float s = 0.f;
    for (int i = threadIdx.x; i < KX; i += blockDim.x) s += ldx(x + i);
    const float tot = block_sum(s);
    const uint32_t acc = stream_rest(w, wbytes, nstream, early);
    // this block's slice of the next x (deterministic: tot is the same in every block)
    const int per_blk = (KX + gridDim.x - 1) / gridDim.x;
    for (int i = threadIdx.x; i < per_blk; i += blockDim.x) {
        const int e = blockIdx.x * per_blk + i;
        if (e < KX) y[e] = next_x(tot, ldx(x + (e + 1) % KX), acc);
    }
}

__device__ __forceinline__ void early_loads(const uint8_t* w, size_t wbytes, int nstream, uint4 (&early)[UNROLL]) {
    const size_t per = wbytes / nstream & ~size_t(15), n16 = per / 16;
    const uint8_t* b = w + per * blockIdx.x;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const size_t i = threadIdx.x + (size_t)u * blockDim.x;
        early[u] = wbytes && (int)blockIdx.x < nstream && i < n16 ? ldw(b + 16 * i) : make_uint4(0, 0, 0, 0);
    }
}

// Later phases' bytes asked into L2 (cp.async.bulk.prefetch, sm_90): pf holds PF_PIECES (address, bytes) pairs,
// bytes 0 where unused; each block takes its 16-aligned share of every piece, in 16 KB requests spread over warp 0's
// lanes. Issued after the phase's own first loads, before its dependency: the weights depend on nothing.
#define PF_PIECES 4
#define PF_CHUNK 16384
__device__ __forceinline__ void prefetch_l2(const unsigned long long* pf) {
    if (!pf || threadIdx.x >= 32) return;
    for (int i = 0; i < PF_PIECES; ++i) {
        const unsigned long long base = pf[2 * i], bytes = pf[2 * i + 1];
        if (!bytes) continue;
        const unsigned long long per = (bytes + 16ull * gridDim.x - 1) / (16ull * gridDim.x) * 16ull;
        const unsigned long long lo = per * blockIdx.x, hi = lo + per < bytes ? lo + per : bytes;
        for (unsigned long long o = lo + (unsigned long long)threadIdx.x * PF_CHUNK; o < hi; o += 32ull * PF_CHUNK) {
            const unsigned n = (unsigned)(hi - o < PF_CHUNK ? hi - o : PF_CHUNK);
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(base + o), "r"(n) : "memory");
        }
    }
}

// mode 0: griddepcontrol.wait (PDL boundary); mode 1: the previous kernel's counter (ctr[p - 1]) reaches gridDim.x.
// nstream: the blocks that stream the weights (the first ones; 0: all), as a fused phase run by few clusters would.
// pf: later phases' bytes to ask into L2 (prefetch_l2; null: none)
extern "C" __global__ void __launch_bounds__(384) phase(const float* x, float* y, const uint8_t* w, unsigned long long wbytes,
                                                       unsigned* ctr, int p, int mode, int nstream,
                                                       const unsigned long long* pf) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    if (nstream <= 0 || nstream > (int)gridDim.x) nstream = gridDim.x;
    uint4 early[UNROLL];
    early_loads(w, wbytes, nstream, early);
    prefetch_l2(pf);
    if (mode == 0 || p == 0) asm volatile("griddepcontrol.wait;" ::: "memory");
    else wait_count(ctr + p - 1, gridDim.x);
    body(x, y, w, wbytes, nstream, early);
    if (mode == 1) arrive(ctr + p);
}

// A chain's own prefetch kernel (no x, no weights of its own): asks pf's pieces into L2 and, as a link of a PDL chain
// (wait = 1), completes only after its predecessor, so the next phase's griddepcontrol.wait still means "x is
// written"; on a stream of its own beside the chain (wait = 0) it just asks and leaves.
extern "C" __global__ void __launch_bounds__(32) prefetch_node(const unsigned long long* pf, int wait) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    prefetch_l2(pf);
    if (wait) asm volatile("griddepcontrol.wait;" ::: "memory");
}

// nphases phases in one launch, x ping-ponging between xa and xb, phase p's weights at w + woff[p], wsize[p] bytes
extern "C" __global__ void __launch_bounds__(384) persistent(float* xa, float* xb, const uint8_t* w,
                                                            const unsigned long long* woff,
                                                            const unsigned long long* wsize, unsigned* ctr, int nphases) {
    for (int p = 0; p < nphases; ++p) {
        const uint8_t* wp = w + woff[p];
        const size_t wbytes = wsize[p];
        uint4 early[UNROLL];
        early_loads(wp, wbytes, gridDim.x, early);
        if (p > 0) wait_count(ctr + p - 1, gridDim.x);
        body(p & 1 ? xb : xa, p & 1 ? xa : xb, wp, wbytes, gridDim.x, early);
        arrive(ctr + p);
    }
}

// The megakernel's shape: one block per SM, a producer warp streaming every phase's weights into a ring of
// shared-memory stages (cp.async.bulk, mbarriers) as far ahead as the ring allows, whatever the phase the consumers
// are in; the consumer warps wait on the grid counter, read x, then take their phase's stages from the ring. The
// weight stream no longer stops at the dependency chain's barriers.
#define NCW 8
#define CH (32 * 1024)
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    uint32_t done = 0;
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(bar);
    while (!done)
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(a), "r"(parity) : "memory");
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(NCW * 32) : "memory"); }

// The ring of the streaming kernels: `nstages` stages of CH bytes in dynamic shared memory, then a full and an empty
// mbarrier per stage. Phase p's share of this block is wsize[p] / gridDim.x bytes (16-aligned) from w + woff[p],
// in pieces of at most CH bytes, one stage each, in order; producer and consumers walk the same sequence.
struct Ring {
    uint8_t* stage;
    uint64_t *full, *empty;
    int n, s = 0;
    uint32_t ph = 0;
    __device__ Ring(uint8_t* smem, int nstages)
        : stage(smem), full(reinterpret_cast<uint64_t*>(smem + (size_t)nstages * CH)), empty(full + nstages), n(nstages) {}
    __device__ void init() {  // one thread, before a __syncthreads()
        for (int i = 0; i < n; ++i) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"((uint32_t)__cvta_generic_to_shared(full + i)) : "memory");
            asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"((uint32_t)__cvta_generic_to_shared(empty + i)), "r"(NCW) : "memory");
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __device__ void next() {
        if (++s == n) { s = 0; ph ^= 1; }
    }
    // the producer (one thread): every phase's pieces, each into the next stage once its consumers released it
    __device__ void produce(const uint8_t* w, const unsigned long long* woff, const unsigned long long* wsize, int nphases) {
        for (int p = 0; p < nphases; ++p) {
            const size_t per = wsize[p] / gridDim.x & ~size_t(15);
            const uint8_t* base = w + woff[p] + per * blockIdx.x;
            for (size_t off = 0; off < per; off += CH, next()) {
                const uint32_t len = (uint32_t)(per - off < CH ? per - off : CH);
                mbar_wait(empty + s, ph ^ 1);
                const uint32_t fb = (uint32_t)__cvta_generic_to_shared(full + s);
                asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(fb), "r"(len) : "memory");
                asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                             ::"r"((uint32_t)__cvta_generic_to_shared(stage + (size_t)s * CH)), "l"(base + off),
                               "r"(len), "r"(fb) : "memory");
            }
        }
    }
    // the consumer warps: phase p's pieces as they land (xor of their words), each stage released after it
    __device__ uint32_t consume(const unsigned long long* wsize, int p, int tid, int nt) {
        uint32_t acc = 0;
        const size_t per = wsize[p] / gridDim.x & ~size_t(15);
        for (size_t off = 0; off < per; off += CH, next()) {
            const uint32_t len = (uint32_t)(per - off < CH ? per - off : CH);
            mbar_wait(full + s, ph);
            const uint4* st = reinterpret_cast<const uint4*>(stage + (size_t)s * CH);
            for (uint32_t i = tid; i < len / 16; i += nt) {
                const uint4 q = st[i];
                acc ^= q.x ^ q.y ^ q.z ^ q.w;
            }
            __syncwarp();
            if ((tid & 31) == 0)
                asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"((uint32_t)__cvta_generic_to_shared(empty + s)) : "memory");
        }
        return acc;
    }
};

extern "C" __global__ void __launch_bounds__(32 * (NCW + 1), 1)
stream_persistent(float* xa, float* xb, const uint8_t* w, const unsigned long long* woff,
                  const unsigned long long* wsize, unsigned* ctr, int nphases, int nstages) {
    extern __shared__ __align__(128) uint8_t smem[];
    Ring ring(smem, nstages);
    __shared__ float red[NCW];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (threadIdx.x == 0) ring.init();
    __syncthreads();
    if (warp == NCW) {  // producer
        if (lane == 0) ring.produce(w, woff, wsize, nphases);
        return;
    }
    const int tid = threadIdx.x, nt = NCW * 32;
    for (int p = 0; p < nphases; ++p) {
        float* x = p & 1 ? xb : xa;
        float* y = p & 1 ? xa : xb;
        if (p > 0) {
            if (tid == 0)
                while (ld_acquire(ctr + p - 1) < gridDim.x) __nanosleep(20);
            consumers_sync();
        }
        float v = 0.f;
        for (int i = tid; i < KX; i += nt) v += ldx(x + i);
        for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) red[warp] = v;
        consumers_sync();
        float tot = 0.f;
        for (int i = 0; i < NCW; ++i) tot += red[i];
        const uint32_t acc = ring.consume(wsize, p, tid, nt);
        const int per_blk = (KX + gridDim.x - 1) / gridDim.x;
        for (int i = tid; i < per_blk; i += nt) {
            const int e = blockIdx.x * per_blk + i;
            if (e < KX) y[e] = next_x(tot, ldx(x + (e + 1) % KX), acc);
        }
        consumers_sync();  // every consumer's stores issued, red read
        if (tid == 0) {
            __threadfence();
            red_release(ctr + p);
        }
    }
}

// ---- x exchanged as (value, flag) pairs (NCCL's LL protocol): a reader spins on the flags of the words it reads,
// so a phase's dependency costs one store and one load through L2, no fence and no counter. flag = phase + 1.
#define LLPT 8  // x words per thread at most (KX / threads)
__device__ __forceinline__ unsigned long long globaltimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ uint2 ld_ll(const uint2* p) {
    uint2 v;
    asm volatile("ld.volatile.global.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void st_ll(uint2* p, float v, uint32_t flag) {
    asm volatile("st.volatile.global.v2.u32 [%0], {%1,%2};" ::"l"(p), "r"(__float_as_uint(v)), "r"(flag) : "memory");
}
// this thread's sum of x (elements tid, tid + nt, ...), once every word read carries `flag`
// nowait: take the words as they are (a test of the weight stream alone: wrong x); sleep_ns: backoff between polls
__device__ __forceinline__ float ll_sum(const uint2* x, uint32_t flag, int tid, int nt, int nowait = 0, int sleep_ns = 0) {
    uint2 v[LLPT];
#pragma unroll
    for (int j = 0; j < LLPT; ++j) v[j] = tid + j * nt < KX ? ld_ll(x + tid + j * nt) : make_uint2(0, flag);
    bool ok = nowait;
    while (!ok) {
        ok = true;
#pragma unroll
        for (int j = 0; j < LLPT; ++j)
            if (v[j].y != flag) { ok = false; v[j] = ld_ll(x + tid + j * nt); }
        if (!ok && sleep_ns) __nanosleep(sleep_ns);
    }
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < LLPT; ++j) s += __uint_as_float(v[j].x);
    return s;
}
// (after a barrier behind ll_sum: every word of x carries its flag, each seen by the thread that summed it)
__device__ __forceinline__ void ll_write(const uint2* x, uint2* y, float tot, uint32_t acc, uint32_t flag, int tid,
                                         int nt) {
    const int per_blk = (KX + gridDim.x - 1) / gridDim.x;
    for (int i = tid; i < per_blk; i += nt) {
        const int e = blockIdx.x * per_blk + i;
        if (e < KX) st_ll(y + e, next_x(tot, __uint_as_float(ld_ll(x + (e + 1) % KX).x), acc), flag);
    }
}

// chain of kernels, no griddepcontrol.wait at all: the LL flags are the dependency (launched with PDL so that the
// next kernel's blocks are resident early; every block of the previous one is, so the spin cannot deadlock)
extern "C" __global__ void __launch_bounds__(384) phase_ll(const uint2* x, uint2* y, const uint8_t* w,
                                                          unsigned long long wbytes, int p) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    uint4 early[UNROLL];
    early_loads(w, wbytes, gridDim.x, early);
    const float tot = block_sum(ll_sum(x, (uint32_t)p, threadIdx.x, blockDim.x));  // phase p - 1 wrote flag p
    const uint32_t acc = stream_rest(w, wbytes, gridDim.x, early);
    ll_write(x, y, tot, acc, (uint32_t)p + 1, threadIdx.x, blockDim.x);
}

// the streaming persistent kernel with LL x instead of counters
extern "C" __global__ void __launch_bounds__(32 * (NCW + 1), 1)
stream_ll(uint2* xa, uint2* xb, const uint8_t* w, const unsigned long long* woff, const unsigned long long* wsize,
          int nphases, int nstages, int nowait, int sleep_ns, unsigned long long* stamps) {
    extern __shared__ __align__(128) uint8_t smem[];
    Ring ring(smem, nstages);
    __shared__ float red[2][NCW];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (threadIdx.x == 0) ring.init();
    __syncthreads();
    if (warp == NCW) {  // producer: as in stream_persistent
        if (lane == 0) ring.produce(w, woff, wsize, nphases);
        return;
    }
    const int tid = threadIdx.x, nt = NCW * 32;
    for (int p = 0; p < nphases; ++p) {
        const uint2* x = p & 1 ? xb : xa;
        uint2* y = p & 1 ? xa : xb;
        float v = ll_sum(x, (uint32_t)p, tid, nt, nowait, sleep_ns);
        for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) red[p & 1][warp] = v;  // two copies: the next phase's writes cannot race this phase's reads
        consumers_sync();
        float tot = 0.f;
        for (int i = 0; i < NCW; ++i) tot += red[p & 1][i];
        if (stamps && tid == 0) stamps[((size_t)blockIdx.x * nphases + p) * 3] = globaltimer();
        const uint32_t acc = ring.consume(wsize, p, tid, nt);
        if (stamps && tid == 0) stamps[((size_t)blockIdx.x * nphases + p) * 3 + 1] = globaltimer();
        ll_write(x, y, tot, acc, (uint32_t)p + 1, tid, nt);
        if (stamps && tid == 0) stamps[((size_t)blockIdx.x * nphases + p) * 3 + 2] = globaltimer();
    }
}
