// Prompt prefill path of rope_kv_attention (docs/ops.md), for a step of m tokens of ONE slot: two kernels.
//
//   rope_kv_append   (q, k, v, positions, slots, int m, int n_slots, int max_seq, q_rot, k_cache, v_cache)
//       grid (m), block (128): RoPE on q and k, k/v appended to the float16 cache, rotated q to q_rot.
//   prefill_attention(q_rot, k_cache, v_cache, positions, slots, int m, int n_slots, int max_seq, out)
//       grid (cdiv(m, 16), N_HEADS), block (128): causal GQA attention of 16 queries x one head per block over the
//       cache (after the append, so the step's tokens see each other), float32 online softmax.
// Rows no backend lets through are guarded, not computed: the append skips a token whose slot or position is outside
// the cache, the attention reads no key past max_seq and a tile whose slot is outside [0, n_slots) does nothing.
//
// Why a second path: the decode kernel (rope_kv_attention.cu) is built for one query per token and spends its
// time on latency; with m = 512 it runs 512 x n_kv clusters and dominated prefill (21.5 of 33 ms). Here a block
// stages 32 keys of K and V in shared memory once and uses them for 16 queries; lane l of a warp scores key l for
// the warp's 4 queries (rows padded to D+1 floats: conflict-free), then each lane accumulates 4 of the D outputs.
// Precondition (the runtime guarantees it): all tokens of the step are in one slot; a tile's keys are those of its
// first token's slot. Compile-time: N_HEADS, N_KV_HEADS, HEAD_DIM, ROPE_THETA (as for rope_kv_attention).
#include <cuda_fp16.h>
#include <stdint.h>

#include "pdl.cuh"

#ifndef N_HEADS
#define N_HEADS 12
#endif
#ifndef N_KV_HEADS
#define N_KV_HEADS 2
#endif
#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef ROPE_THETA
#define ROPE_THETA 1000000.0
#endif

constexpr int D = HEAD_DIM, HALF = D / 2, QD = N_HEADS * D, KVD = N_KV_HEADS * D, GROUP = N_HEADS / N_KV_HEADS;
constexpr int QT = 16, KC = 32, WARPS = 4, QPW = QT / WARPS, DPL = D / 32;  // queries/block, keys/chunk, per warp
static_assert(D % 32 == 0 && QT % WARPS == 0, "head_dim must be a multiple of 32");

__device__ __forceinline__ float inv_freq(int j) {  // theta^(-2j/D), rounded once from double like numpy's float32 table
    return (float)pow((double)ROPE_THETA, -2.0 * (double)j / (double)D);
}

extern "C" __global__ void __launch_bounds__(128) rope_kv_append(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const int* __restrict__ positions, const int* __restrict__ slots, int m, int n_slots, int max_seq,
    float* __restrict__ q_rot, __half* __restrict__ k_cache, __half* __restrict__ v_cache) {
    const int t = blockIdx.x;
    pdl_launch_dependents();
    pdl_wait();
    if (t >= m) return;
    const int pos = positions[t], slot = slots[t];
    if (slot < 0 || slot >= n_slots || pos < 0 || pos >= max_seq) return;  // no backend lets such a row through
    for (int idx = threadIdx.x; idx < (N_HEADS + N_KV_HEADS) * HALF; idx += blockDim.x) {
        const int h = idx / HALF, j = idx % HALF;
        float s, c;
        sincosf((float)pos * inv_freq(j), &s, &c);
        if (h < N_HEADS) {
            const float* x = q + (size_t)t * QD + h * D;
            float* y = q_rot + (size_t)t * QD + h * D;
            y[j] = x[j] * c - x[j + HALF] * s;
            y[j + HALF] = x[j + HALF] * c + x[j] * s;
        } else {
            const int kh = h - N_HEADS;
            const float* x = k + (size_t)t * KVD + kh * D;
            __half* y = k_cache + (((size_t)slot * N_KV_HEADS + kh) * max_seq + pos) * D;
            y[j] = __float2half_rn(x[j] * c - x[j + HALF] * s);
            y[j + HALF] = __float2half_rn(x[j + HALF] * c + x[j] * s);
        }
    }
    for (int idx = threadIdx.x; idx < KVD; idx += blockDim.x) {
        const int kh = idx / D, d = idx % D;
        v_cache[(((size_t)slot * N_KV_HEADS + kh) * max_seq + pos) * D + d] = __float2half_rn(v[(size_t)t * KVD + idx]);
    }
}

extern "C" __global__ void __launch_bounds__(128) prefill_attention(
    const float* __restrict__ q_rot, const __half* __restrict__ k_cache, const __half* __restrict__ v_cache,
    const int* __restrict__ positions, const int* __restrict__ slots, int m, int n_slots, int max_seq,
    float* __restrict__ out) {
    __shared__ float Ks[KC][D + 1], Vs[KC][D + 1], Qs[QT][D];
    pdl_launch_dependents();
    pdl_wait();
    const int t0 = blockIdx.x * QT, h = blockIdx.y, kvh = h / GROUP;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int slot = slots[t0];
    if (slot < 0 || slot >= n_slots) return;  // no backend lets such a tile through: read nothing, write nothing
    int last = 0;  // keys needed by this tile: up to its largest position (within the cache, whatever it is given)
    for (int i = 0; i < QT && t0 + i < m; ++i) last = max(last, positions[t0 + i]);
    last = min(last, max_seq - 1);
    for (int idx = threadIdx.x; idx < QT * D; idx += blockDim.x) {
        const int i = idx / D, d = idx % D;
        Qs[i][d] = t0 + i < m ? q_rot[(size_t)(t0 + i) * QD + h * D + d] * rsqrtf((float)D) : 0.f;
    }
    int qpos[QPW];
    float mx[QPW], sum[QPW], acc[QPW][DPL];
#pragma unroll
    for (int i = 0; i < QPW; ++i) {
        const int t = t0 + warp * QPW + i;
        qpos[i] = t < m ? positions[t] : -1;  // -1: no key passes the mask, the row is never written
        mx[i] = -INFINITY;
        sum[i] = 0.f;
#pragma unroll
        for (int e = 0; e < DPL; ++e) acc[i][e] = 0.f;
    }
    const __half* kb = k_cache + ((size_t)slot * N_KV_HEADS + kvh) * max_seq * D;
    const __half* vb = v_cache + ((size_t)slot * N_KV_HEADS + kvh) * max_seq * D;
    for (int c0 = 0; c0 <= last; c0 += KC) {
        __syncthreads();  // previous chunk fully used (and Qs written, first time)
        for (int idx = threadIdx.x; idx < KC * D / 8; idx += blockDim.x) {  // 16-byte loads of 8 halves
            const int key = idx / (D / 8), d8 = (idx % (D / 8)) * 8;
            uint4 kr = make_uint4(0, 0, 0, 0), vr = make_uint4(0, 0, 0, 0);
            if (c0 + key <= last) {
                kr = *reinterpret_cast<const uint4*>(kb + (size_t)(c0 + key) * D + d8);
                vr = *reinterpret_cast<const uint4*>(vb + (size_t)(c0 + key) * D + d8);
            }
            const __half2* k2 = reinterpret_cast<const __half2*>(&kr);
            const __half2* v2 = reinterpret_cast<const __half2*>(&vr);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 kf = __half22float2(k2[e]), vf = __half22float2(v2[e]);
                Ks[key][d8 + 2 * e] = kf.x;
                Ks[key][d8 + 2 * e + 1] = kf.y;
                Vs[key][d8 + 2 * e] = vf.x;
                Vs[key][d8 + 2 * e + 1] = vf.y;
            }
        }
        __syncthreads();
        float s[QPW];
#pragma unroll
        for (int i = 0; i < QPW; ++i) s[i] = 0.f;
        const float* qw = &Qs[warp * QPW][0];
#pragma unroll 8
        for (int d = 0; d < D; ++d) {
            const float kv = Ks[lane][d];
#pragma unroll
            for (int i = 0; i < QPW; ++i) s[i] = fmaf(qw[i * D + d], kv, s[i]);
        }
        float p[QPW];
#pragma unroll
        for (int i = 0; i < QPW; ++i) {
            const bool ok = c0 + lane <= qpos[i];
            float cm = ok ? s[i] : -INFINITY;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, o));
            const float nm = fmaxf(mx[i], cm);
            const float scale = nm == -INFINITY ? 1.f : __expf(mx[i] - nm);
            p[i] = ok ? __expf(s[i] - nm) : 0.f;
            float ps = p[i];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
            sum[i] = sum[i] * scale + ps;
            mx[i] = nm;
#pragma unroll
            for (int e = 0; e < DPL; ++e) acc[i][e] *= scale;
        }
        for (int key = 0; key < KC; ++key) {
            float vv[DPL];
#pragma unroll
            for (int e = 0; e < DPL; ++e) vv[e] = Vs[key][lane + 32 * e];
#pragma unroll
            for (int i = 0; i < QPW; ++i) {
                const float pk = __shfl_sync(0xffffffffu, p[i], key);
#pragma unroll
                for (int e = 0; e < DPL; ++e) acc[i][e] = fmaf(pk, vv[e], acc[i][e]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < QPW; ++i) {
        const int t = t0 + warp * QPW + i;
        if (t >= m) continue;
        const float r = 1.f / sum[i];
#pragma unroll
        for (int e = 0; e < DPL; ++e) out[(size_t)t * QD + h * D + lane + 32 * e] = acc[i][e] * r;
    }
}
