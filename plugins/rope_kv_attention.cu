// RoPE + KV-cache append + causal grouped-query attention, one launch (docs/ops.md, `rope_kv_attention`):
//     rope_kv_attention(const float* q [m, H*D], const float* k [m, KVH*D], const float* v [m, KVH*D],
//                       const __half* k_cache_in, const __half* v_cache_in,   // [n_slots, KVH, max_seq, D]
//                       const int* positions [m], const int* slots [m], int m, int n_slots, int max_seq,
//                       float* out [m, H*D], __half* k_cache_out, __half* v_cache_out)
// The *_in and *_out caches are the same memory (updated in place): history is read through *_in, the step's
// appends are written through *_out.
// Compile-time: N_HEADS, N_KV_HEADS, HEAD_DIM, ROPE_THETA. grid (NS=8, N_HEADS, m), block (256).
//
// Split over the sequence (flash-decoding): the NS blocks of one (token, q head) form a thread-block cluster, each
// takes 1/NS of positions 0..p in chunks of CT keys (K/V rows copied to shared memory with cp.async, double
// buffered), keeps an online softmax (running max, sum, acc[D]) in fp32, and the NS partials are merged through
// distributed shared memory: no global scratch, no counters, no second launch.
//
// The append problem: every append of the step must precede every attention read (prompt prefill puts m tokens of
// one slot in one step), but blocks cannot wait on each other. So nothing waits: a block that meets a position
// written in this step (some token j with slots[j] == slot and positions[j] == t) takes that key/value from the
// step's inputs, half(RoPE(k[j])) and half(v[j]), instead of the cache; and the block of token j (first q head of
// each kv group, split 0) writes its own cache entries for later steps. Both compute RoPE through one non-inlined
// function, so the value used now is bit-identical to the value stored. Each block collects the step's tokens that
// fall in its range once (a short list in shared memory; a long prefill falls back to scanning per chunk).
#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <stdint.h>

#if !defined(N_HEADS) || !defined(N_KV_HEADS) || !defined(HEAD_DIM) || !defined(ROPE_THETA)
#error "rope_kv_attention needs -DN_HEADS=.. -DN_KV_HEADS=.. -DHEAD_DIM=.. -DROPE_THETA=.."
#endif

namespace cg = cooperative_groups;

constexpr int D = HEAD_DIM, H = N_HEADS, KVH = N_KV_HEADS, G = H / KVH;
constexpr int NS = 8;                    // splits per (token, head) = cluster size (portable maximum)
constexpr int THREADS = 256;
constexpr int CT = 32;                   // keys per chunk
constexpr int TPK = THREADS / CT;        // threads per key in the score phase (a quarter-warp: 128 contiguous
                                         // bytes of a K row per 16-byte load, bank-conflict free)
constexpr int KSTRIDE = 2 * D + 64;      // bytes per K row in shared memory
constexpr int VSTRIDE = 2 * D;
constexpr int PV_LANES = D / 2;          // PV phase: a thread owns 2 dims (half2) ...
constexpr int NG = THREADS / PV_LANES;   // ... of one of NG interleaved key groups
static_assert(H % KVH == 0, "N_HEADS must be a multiple of N_KV_HEADS");
constexpr int LIST = 64;                 // in-step tokens of a block's range kept in shared memory
static_assert(D % (8 * TPK) == 0 && D <= 256, "HEAD_DIM must be a multiple of 64, at most 256");

// inv_freq[j] = theta^(-2j/D): the float32 exponent as numpy forms it, the power in double and rounded once, so
// it is the correctly rounded float32 (as numpy's) - powf's last-bit error would grow into a visible angle error
// at positions in the thousands.
__device__ __forceinline__ float inv_freq(int j) {
    return (float)pow((double)(float)(ROPE_THETA), (double)__fmul_rn(-(float)j, 2.0f / (float)D));
}

// Rotate-half RoPE of the pair (x[j], x[j + D/2]) at position pos, float32 products rounded as numpy rounds them.
__device__ __forceinline__ void rope_pair(float x1, float x2, int pos, int j, float& y1, float& y2) {
    float s, c;
    sincosf(__fmul_rn((float)pos, inv_freq(j)), &s, &c);
    y1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
    y2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}

// half(RoPE(k)) for pair j of one kv head's row kr. Non-inlined: the cache writer and every reader that patches
// an in-step key run the same machine code, so they agree to the bit.
__device__ __noinline__ void rope_k_half(const float* kr, int pos, int j, __half* dst1, __half* dst2) {
    float y1, y2;
    rope_pair(kr[j], kr[j + D / 2], pos, j, y1, y2);
    *dst1 = __float2half_rn(y1);
    *dst2 = __float2half_rn(y2);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

extern "C" __global__ void __cluster_dims__(NS, 1, 1) __launch_bounds__(THREADS)
rope_kv_attention(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                  const __half* k_cache_in, const __half* v_cache_in, const int* __restrict__ positions,
                  const int* __restrict__ slots, int m, int n_slots, int max_seq, float* __restrict__ out,
                  __half* k_cache, __half* v_cache) {
    __shared__ float qs[D];
    __shared__ __align__(16) uint8_t kbuf[2][CT * KSTRIDE];
    __shared__ __align__(16) uint8_t vbuf[2][CT * VSTRIDE];
    __shared__ float S[CT];
    __shared__ int src[CT];                       // in-step token j whose k/v replaces chunk row r, or -1
    __shared__ int list_pos[LIST], list_j[LIST], list_n, chunk_has;
    __shared__ float accg[NG][D], lg[NG];
    __shared__ float part_acc[D], part_m, part_l; // this block's partial, read by cluster rank 0

    cg::cluster_group cluster = cg::this_cluster();
    const int split = blockIdx.x, h = blockIdx.y, i = blockIdx.z, tid = threadIdx.x;
    const int kvh = h / G;
    const int pos = positions[i], slot = slots[i], T = pos + 1;
    const size_t cache_off = ((size_t)slot * KVH + kvh) * max_seq * D;  // rows (slot, kvh, t, :)
    const __half* kc_in = k_cache_in + cache_off;
    const __half* vc_in = v_cache_in + cache_off;
    __half* kc = k_cache + cache_off;
    __half* vc = v_cache + cache_off;
    const float* kin = k + (size_t)kvh * D;       // + j * KVH * D for token j
    const float* vin = v + (size_t)kvh * D;

    const int per_split = (T + NS - 1) / NS;
    const int t0 = split * per_split, t1 = min(T, t0 + per_split);
    const int nchunks = t0 < t1 ? (t1 - t0 + CT - 1) / CT : 0;
    auto issue = [&](int c) {  // cp.async chunk c's valid K and V rows into buffer c % 2
        const int ct0 = t0 + c * CT, nv = min(CT, t1 - ct0);
        uint8_t* kb = kbuf[c & 1];
        uint8_t* vb = vbuf[c & 1];
        for (int idx = tid; idx < nv * (D / 8); idx += THREADS) {
            const int r = idx / (D / 8), sgi = idx % (D / 8);
            cp_async16(kb + r * KSTRIDE + sgi * 16, kc_in + (size_t)(ct0 + r) * D + sgi * 8);
            cp_async16(vb + r * VSTRIDE + sgi * 16, vc_in + (size_t)(ct0 + r) * D + sgi * 8);
        }
    };
    if (nchunks > 0) issue(0);                         // in flight during the prelude below
    cp_async_commit();

    // RoPE(q) into shared memory; the block of this token's first q head of the group appends k/v (split 0).
    if (tid < D / 2) {
        const float* qr = q + ((size_t)i * H + h) * D;
        float y1, y2;
        rope_pair(qr[tid], qr[tid + D / 2], pos, tid, y1, y2);
        qs[tid] = y1;
        qs[tid + D / 2] = y2;
        if (split == 0 && h % G == 0) {
            const size_t row = (size_t)i * KVH * D;
            rope_k_half(kin + row, pos, tid, kc + (size_t)pos * D + tid, kc + (size_t)pos * D + tid + D / 2);
            vc[(size_t)pos * D + tid] = __float2half_rn(vin[row + tid]);
            vc[(size_t)pos * D + tid + D / 2] = __float2half_rn(vin[row + tid + D / 2]);
        }
    }
    if (tid < CT) src[tid] = -1;
    if (tid == 0) list_n = chunk_has = 0;

    __syncthreads();
    for (int j = tid; j < m; j += THREADS)            // tokens of this step that write into this block's range
        if (slots[j] == slot) {
            const int pj = positions[j];
            if (pj >= t0 && pj < t1) {
                const int e = atomicAdd(&list_n, 1);
                if (e < LIST) {
                    list_pos[e] = pj;
                    list_j[e] = j;
                }
            }
        }
    const float inv_sqrt_d = 1.0f / sqrtf((float)D);

    float m_run = -INFINITY, l_run = 0.f, acc0 = 0.f, acc1 = 0.f;
    const int d2 = tid % PV_LANES, pg = tid / PV_LANES;  // PV: dims 2*d2, 2*d2+1 of key group pg
    const int sp = tid / TPK, part = tid % TPK;         // scores: key sp, 1/TPK of the dims

    for (int c = 0; c < nchunks; ++c) {
        const int ct0 = t0 + c * CT, nv = min(CT, t1 - ct0);
        __syncthreads();                               // chunk c-1 fully consumed: its buffer and S are free
        if (c + 1 < nchunks) issue(c + 1);             // in flight while chunk c is used
        cp_async_commit();
        if (list_n <= LIST) {                          // positions of this chunk written in this step
            for (int e = tid; e < list_n; e += THREADS)
                if (list_pos[e] >= ct0 && list_pos[e] < ct0 + nv) {
                    src[list_pos[e] - ct0] = list_j[e];
                    chunk_has = 1;
                }
        } else {                                       // many (long prefill): scan the step's tokens
            for (int j = tid; j < m; j += THREADS)
                if (slots[j] == slot) {
                    const int pj = positions[j];
                    if (pj >= ct0 && pj < ct0 + nv) {
                        src[pj - ct0] = j;
                        chunk_has = 1;
                    }
                }
        }
        cp_async_wait1();                              // chunk c has landed (this thread's copies)
        __syncthreads();                               // ... everyone's, and src is complete
        uint8_t* kb = kbuf[c & 1];
        uint8_t* vb = vbuf[c & 1];
        for (int idx = tid; chunk_has && idx < nv * (D / 2); idx += THREADS) {
            const int r = idx / (D / 2), jd = idx % (D / 2), j = src[r];
            if (j >= 0) {
                __half* kr = reinterpret_cast<__half*>(kb + r * KSTRIDE);
                __half* vr = reinterpret_cast<__half*>(vb + r * VSTRIDE);
                const size_t row = (size_t)j * KVH * D;
                rope_k_half(kin + row, ct0 + r, jd, kr + jd, kr + jd + D / 2);
                vr[jd] = __float2half_rn(vin[row + jd]);
                vr[jd + D / 2] = __float2half_rn(vin[row + jd + D / 2]);
            }
        }
        __syncthreads();
        {   // scores: TPK threads per key, 16-byte chunks (ci*TPK + part) of the row, reduced over the TPK lanes
            float dot = 0.f;
            if (sp < nv) {
                const uint8_t* kr = kb + sp * KSTRIDE;
#pragma unroll
                for (int ci = 0; ci < D / (8 * TPK); ++ci) {
                    const int cc = ci * TPK + part;
                    const uint4 raw = *reinterpret_cast<const uint4*>(kr + cc * 16);
                    const float4 qa = *reinterpret_cast<const float4*>(qs + cc * 8);
                    const float4 qb = *reinterpret_cast<const float4*>(qs + cc * 8 + 4);
                    const float2 k0 = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
                    const float2 k1 = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
                    const float2 k2 = __half22float2(*reinterpret_cast<const __half2*>(&raw.z));
                    const float2 k3 = __half22float2(*reinterpret_cast<const __half2*>(&raw.w));
                    dot = fmaf(qa.x, k0.x, fmaf(qa.y, k0.y, fmaf(qa.z, k1.x, fmaf(qa.w, k1.y, dot))));
                    dot = fmaf(qb.x, k2.x, fmaf(qb.y, k2.y, fmaf(qb.z, k3.x, fmaf(qb.w, k3.y, dot))));
                }
            }
#pragma unroll
            for (int o = 1; o < TPK; o <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
            if (part == 0) S[sp] = sp < nv ? dot * inv_sqrt_d : -INFINITY;
        }
        __syncthreads();
        // online softmax: every thread derives the same chunk max; a thread accumulates its key group only
        float cmax = -INFINITY;
        for (int r = 0; r < nv; ++r) cmax = fmaxf(cmax, S[r]);
        const float new_m = fmaxf(m_run, cmax);
        const float alpha = __expf(m_run - new_m);     // 0 on the first chunk (m_run = -inf)
        acc0 *= alpha;
        acc1 *= alpha;
        l_run *= alpha;
        for (int r = pg; r < nv; r += NG) {
            const float p = __expf(S[r] - new_m);
            const float2 vv = __half22float2(reinterpret_cast<const __half2*>(vb + r * VSTRIDE)[d2]);
            l_run += p;
            acc0 = fmaf(p, vv.x, acc0);
            acc1 = fmaf(p, vv.y, acc1);
        }
        m_run = new_m;
        if (tid < CT) src[tid] = -1;                   // src / chunk_has were last read before the previous barrier
        if (tid == 0) chunk_has = 0;
    }

    // this block's partial: merge the NG key groups (they share m_run)
    accg[pg][2 * d2] = acc0;
    accg[pg][2 * d2 + 1] = acc1;
    if (d2 == 0) lg[pg] = l_run;
    __syncthreads();
    for (int d = tid; d < D; d += THREADS) {
        float a = 0.f;
#pragma unroll
        for (int g = 0; g < NG; ++g) a += accg[g][d];
        part_acc[d] = a;
    }
    if (tid == 0) {
        float l = 0.f;
#pragma unroll
        for (int g = 0; g < NG; ++g) l += lg[g];
        part_l = l;
        part_m = m_run;
    }
    cluster.sync();                                    // all partials visible cluster-wide
    if (split == 0) {                                  // cluster rank 0 (cluster spans blockIdx.x) merges
        float M = -INFINITY;
        for (int r = 0; r < NS; ++r) M = fmaxf(M, *cluster.map_shared_rank(&part_m, r));
        for (int d = tid; d < D; d += THREADS) {
            float num = 0.f, den = 0.f;
            for (int r = 0; r < NS; ++r) {
                const float mr = *cluster.map_shared_rank(&part_m, r);
                if (mr == -INFINITY) continue;         // an empty split (positions < NS)
                const float wgt = __expf(mr - M);
                num = fmaf(*cluster.map_shared_rank(&part_acc[d], r), wgt, num);
                den = fmaf(*cluster.map_shared_rank(&part_l, r), wgt, den);
            }
            out[((size_t)i * H + h) * D + d] = num / den;
        }
    }
    cluster.sync();                                    // shared memory stays alive until rank 0 is done
}
