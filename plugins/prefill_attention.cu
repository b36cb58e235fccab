// Prompt prefill path of rope_kv_attention (docs/ops.md), for a step of m tokens of ONE slot: two kernels.
//
//   rope_kv_append   (q, k, v, positions, slots, int m, int n_slots, int max_seq, q_rot, k_cache, v_cache)
//       grid (m), block (128): RoPE on q and k, k/v appended to the float16 cache, rotated q to q_rot.
//   prefill_attention(q_rot, k_cache, v_cache, positions, slots, int m, int n_slots, int max_seq, out, part, count)
//       grid (cdiv(m * GROUP, PA_ROWS), N_KV_HEADS, splits), block (32 * PA_WARPS): causal GQA attention on tensor
//       cores, the keys of a deep prompt piece split over grid.z (part, count: the splits' scratch, below).
// Rows no backend lets through are guarded, not computed: the append skips a token whose slot or position is outside
// the cache, the attention reads no key past max_seq and a tile whose slot is outside [0, n_slots) does nothing.
//
// Why a second path: the decode kernel (rope_kv_attention.cu) is built for one query per token and spends its
// time on latency; with m = 512 it runs 512 x n_kv clusters and dominated prefill (21.5 of 33 ms).
// prefill_attention is FlashAttention-2's loop on mma.sync.m16n8k16 (fp16 operands, fp32 accumulators):
// - Rows are (token, q head of the kv head) pairs, row = token * GROUP + head % GROUP: the GROUP query heads that
//   share a kv head share every K/V tile a block loads (GQA packing, as FlashInfer's prefill does). A block holds
//   PA_ROWS = 16 * PA_WARPS rows of one kv head; each warp 16 rows, its Q fragments in registers for the whole loop
//   (q_rot * log2(e) / sqrt(D) in fp16: the softmax runs in base 2).
// - Keys go in tiles of BK: K and V rows copied global -> shared with cp.async (row stride D + 8 halves: ldmatrix
//   rows on distinct banks), double-buffered (tile j + 1 in flight while j is computed); keys past the block's
//   last position are zero-filled. S = Q K^T from ldmatrix fragments of K; the causal mask per row; online softmax
//   per row (max and sum over the quad of lanes holding it); P re-packed from the S accumulators into A fragments
//   (no shared-memory round trip); O += P V from ldmatrix.trans fragments of V; O / sum at the end.
// - Split keys (flash-decoding's split-KV, for pieces deep into the cache): a grid of cdiv(m * GROUP, PA_ROWS) x
//   N_KV_HEADS blocks is 96 blocks of 4 warps for 512 tokens of the 1.5B, fewer than the H100's 132 SMs, each
//   looping over every key up to its position (16k keys deep into a long prompt). So grid.z blocks share a row
//   block's keys: a row block with ntiles key tiles uses splits = min(gridDim.z, PA_MAX_SPLITS, cdiv(ntiles,
//   PA_SPLIT_TILES)) of them (from the positions on the device: one launch serves every depth), each a contiguous
//   run of tiles; the rest return at once. With one split the block writes `out` as before (the same bits). With
//   more, each writes its unnormalized O, row max and row sum to its slot of `part`, and the last to arrive (a
//   counter per row block in `count`, threadfence-reduction order: stores, fence, atomic) merges the slots in split
//   order (the same bits whichever block is last) and puts the counter back to 0 for the next launch.
// XH_OUT=1: one more output after count, xh, `out` as fp16 in the GEMM_XH build's order (plugins/xh_store.cuh) for
// the o projection's GEMM.
// Accuracy: Q and P rounded to fp16 (the cache is fp16 already): ~5e-4 relative, like the prefill GEMMs.
// Precondition (the runtime guarantees it): all tokens of the step are in one slot; a tile's keys are those of its
// first token's slot. Compile-time: N_HEADS, N_KV_HEADS, HEAD_DIM, ROPE_THETA (as for rope_kv_attention).
#include <cuda_fp16.h>
#include <stdint.h>

#include "pdl.cuh"
#include "xh_store.cuh"
#ifndef XH_OUT
#define XH_OUT 0
#endif

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
#ifndef PA_SPLIT_TILES
#define PA_SPLIT_TILES 16  // one split per this many key tiles (of 32 keys) of a row block, up to the grid's z
#endif
#ifndef PA_MAX_SPLITS
#define PA_MAX_SPLITS 16  // most splits per row block: part holds gridDim.z slots per row block, the merge's table this many
#endif
#ifndef PA_WARPS
#define PA_WARPS 4  // warps per block of prefill_attention, 16 rows each (toolchain/kernels.py: PREFILL_ROWS_PER_BLOCK)
#endif
static_assert(D % 32 == 0, "head_dim must be a multiple of 32");

__device__ __forceinline__ float inv_freq(int j) {  // theta^(-2j/D), rounded once from double like numpy's float32 table
    return (float)pow((double)ROPE_THETA, -2.0 * (double)j / (double)D);
}

extern "C" __global__ void __launch_bounds__(128) rope_kv_append(
    const float* q, const float* k, const float* v,  // earlier kernels' outputs: no __restrict__ (plugins/pdl.cuh)
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

namespace pa {
constexpr int WARPS = PA_WARPS, ROWS = 16 * WARPS, BK = 32, KS = D + 8;  // rows per block, keys per tile, row stride

__device__ __forceinline__ void cp_async16_zfill(void* dst, const void* src, bool ok) {  // 16 bytes, zeros if !ok
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
// c += a (16 x 16, row) * b (16 x 8, col), fp16 in, fp32 accumulators
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
}
}  // namespace pa

extern "C" __global__ void __launch_bounds__(32 * PA_WARPS) prefill_attention(
    const float* q_rot, const __half* k_cache, const __half* v_cache,  // rope_kv_append's: no __restrict__ (pdl.cuh)
    const int* __restrict__ positions, const int* __restrict__ slots, int m, int n_slots, int max_seq,
    float* __restrict__ out, float* part, int* count
#if XH_OUT
    , __half* __restrict__ xh
#endif
) {
    using namespace pa;
    __shared__ __align__(16) __half Ks[2][BK][KS], Vs[2][BK][KS];
    __shared__ float merge_w[ROWS][PA_MAX_SPLITS];  // the merge's weight of each split per row, 1 / sum folded in
    __shared__ bool merge_ok[ROWS];                  // the row saw a key (a row masked everywhere is not written)
    __shared__ int is_last;
    pdl_launch_dependents();
    pdl_wait();
    const int r0 = blockIdx.x * ROWS, kvh = blockIdx.y, rows = m * GROUP;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int slot = slots[r0 / GROUP];
    if (slot < 0 || slot >= n_slots) return;  // no backend lets such a tile through: read nothing, write nothing
    int last = 0;  // keys needed by this block: up to its largest position (within the cache, whatever it is given)
    for (int t = r0 / GROUP; t < m && t * GROUP < r0 + ROWS; ++t) last = max(last, positions[t]);
    last = min(last, max_seq - 1);
    const __half* kb = k_cache + ((size_t)slot * N_KV_HEADS + kvh) * max_seq * D;
    const __half* vb = v_cache + ((size_t)slot * N_KV_HEADS + kvh) * max_seq * D;
    auto load_tile = [&](int j, int buf) {  // keys [j * BK, j * BK + BK) of K and V, zeros past `last`
        constexpr int CH = D / 8;  // 16-byte chunks per row
        for (int i = threadIdx.x; i < BK * CH; i += 32 * WARPS) {
            const int key = i / CH, d8 = (i % CH) * 8, kk = j * BK + key;
            const bool ok = kk <= last;
            const size_t off = (size_t)(ok ? kk : 0) * D + d8;
            cp_async16_zfill(&Ks[buf][key][d8], kb + off, ok);
            cp_async16_zfill(&Vs[buf][key][d8], vb + off, ok);
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    };
    const int ntiles = last / BK + 1;
    const int splits = min(min((int)gridDim.z, PA_MAX_SPLITS), (ntiles + PA_SPLIT_TILES - 1) / PA_SPLIT_TILES);
    if ((int)blockIdx.z >= splits) return;  // a shallow row block: fewer splits than the grid has
    const int chunk = (ntiles + splits - 1) / splits, j0 = blockIdx.z * chunk, j1 = min(ntiles, j0 + chunk);
    if (j0 < j1) load_tile(j0, 0);  // (a split may be empty: it still reports an empty partial)

    // this lane's two rows (g and g + 8 of the warp's 16): position (-1: masked everywhere, never written), pointers
    int qpos[2];
    size_t qoff[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = r0 + 16 * warp + g + 8 * h, t = r / GROUP, head = kvh * GROUP + r % GROUP;
        qpos[h] = r < rows ? min(positions[t], max_seq - 1) : -1;
        qoff[h] = (size_t)t * QD + (size_t)head * D;
    }
    const float qs = 1.4426950408889634f * rsqrtf((float)D);  // log2(e) / sqrt(D): scores in base 2
    uint32_t qa[D / 16][4];  // A fragments of Q: rows g / g + 8, columns 16kk + 2c (+8)
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int h = i & 1, col = 16 * kk + 2 * c + 8 * (i >> 1);
            float2 v = make_float2(0.f, 0.f);
            if (qpos[h] >= 0) v = *reinterpret_cast<const float2*>(q_rot + qoff[h] + col);
            qa[kk][i] = pack_half2(v.x * qs, v.y * qs);
        }
    }
    float o[D / 8][4];
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
    float mx[2] = {-INFINITY, -INFINITY}, sum[2] = {0.f, 0.f};  // running max (base 2) and this lane's partial sum

    for (int j = j0; j < j1; ++j) {
        const int buf = (j - j0) & 1;
        if (j + 1 < j1) {
            load_tile(j + 1, buf ^ 1);  // the buffer computed at j - 1: every warp left it at the barrier below
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        }
        __syncthreads();
        // S = Q K^T over the tile's BK keys: BK / 8 n-tiles of 8 keys
        float s[BK / 8][4];
#pragma unroll
        for (int nt = 0; nt < BK / 8; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk += 2) {  // one ldmatrix.x4: B of k-chunks kk and kk + 1
                uint32_t b[4];
                ldsm_x4(b, &Ks[buf][nt * 8 + (lane & 7)][16 * kk + 8 * (lane >> 3)]);
                mma16816(s[nt], qa[kk], b[0], b[1]);
                mma16816(s[nt], qa[kk + 1], b[2], b[3]);
            }
        }
        // causal mask and online softmax, rows g (h = 0: s[][0..1]) and g + 8 (h = 1: s[][2..3])
        float scale[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float tm = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < BK / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = j * BK + nt * 8 + 2 * c + e;
                    float& v = s[nt][2 * h + e];
                    v = key <= qpos[h] ? v : -INFINITY;
                    tm = fmaxf(tm, v);
                }
            tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 1));
            tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 2));
            const float nm = fmaxf(mx[h], tm), base = nm == -INFINITY ? 0.f : nm;
            scale[h] = exp2f(mx[h] - base);  // 0 while nothing was seen (mx = -inf), 1 while the max holds
            mx[h] = nm;
            float ps = 0.f;
#pragma unroll
            for (int nt = 0; nt < BK / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float& v = s[nt][2 * h + e];
                    v = exp2f(v - base);
                    ps += v;
                }
            sum[h] = sum[h] * scale[h] + ps;
        }
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd) {
            o[nd][0] *= scale[0]; o[nd][1] *= scale[0];
            o[nd][2] *= scale[1]; o[nd][3] *= scale[1];
        }
        // O += P V: P's A fragments straight from the S accumulators, 16 keys per k-step
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {
            const uint32_t pa[4] = {pack_half2(s[2 * ks][0], s[2 * ks][1]), pack_half2(s[2 * ks][2], s[2 * ks][3]),
                                    pack_half2(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                                    pack_half2(s[2 * ks + 1][2], s[2 * ks + 1][3])};
#pragma unroll
            for (int nd = 0; nd < D / 8; nd += 2) {  // one ldmatrix.x4.trans: B of d-tiles nd and nd + 1
                uint32_t b[4];
                ldsm_x4_t(b, &Vs[buf][16 * ks + (lane & 7) + 8 * ((lane >> 3) & 1)][8 * nd + 8 * (lane >> 4)]);
                mma16816(o[nd], pa, b[0], b[1]);
                mma16816(o[nd + 1], pa, b[2], b[3]);
            }
        }
        __syncthreads();  // every warp is done with buf before the next iteration refills it
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // row sums over the quad of lanes holding the row
        sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], 1);
        sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], 2);
    }
    if (splits == 1) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if (qpos[h] < 0) continue;
            const float r = 1.f / sum[h];
            float* y = out + qoff[h];
#pragma unroll
            for (int nd = 0; nd < D / 8; ++nd) {
                *reinterpret_cast<float2*>(y + 8 * nd + 2 * c) = make_float2(o[nd][2 * h] * r, o[nd][2 * h + 1] * r);
#if XH_OUT  // lanes c and c ^ 1 of the row's quad (all of it here or none: one row) hold one 4-element group
                xh_store2_paired(xh, qoff[h] + 8 * nd + 2 * c, o[nd][2 * h] * r, o[nd][2 * h + 1] * r,
                                 0xFu << (lane & ~3));
#endif
            }
        }
        return;
    }
    // this split's partial: O unnormalized (ROWS x D), then (row max, row sum) per row
    const int rb = blockIdx.y * gridDim.x + blockIdx.x;
    float* const slot0 = part + (size_t)rb * gridDim.z * ROWS * (D + 2);
    float* const mine = slot0 + (size_t)blockIdx.z * ROWS * (D + 2);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float l = sum[h];
        const int rr = 16 * warp + g + 8 * h;
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd)
            *reinterpret_cast<float2*>(mine + rr * D + 8 * nd + 2 * c) = make_float2(o[nd][2 * h], o[nd][2 * h + 1]);
        if (c == 0) *reinterpret_cast<float2*>(mine + ROWS * D + 2 * rr) = make_float2(mx[h], l);
    }
    __threadfence();  // this block's partial visible GPU-wide before its arrival is counted
    __syncthreads();
    if (threadIdx.x == 0) {
        is_last = atomicAdd(&count[rb], 1) == splits - 1;
        if (is_last) count[rb] = 0;  // every split has arrived: ready for the next launch
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();  // acquire side: the other splits' partials are read after their arrivals
    for (int rr = threadIdx.x; rr < ROWS; rr += blockDim.x) {  // per row: each split's weight exp2(max_z - max) / sum
        float mz = -INFINITY, l = 0.f;
        for (int z = 0; z < splits; ++z) mz = fmaxf(mz, __ldcg(slot0 + (size_t)z * ROWS * (D + 2) + ROWS * D + 2 * rr));
        for (int z = 0; z < splits; ++z) {
            const float2 ml = __ldcg(reinterpret_cast<const float2*>(slot0 + (size_t)z * ROWS * (D + 2) + ROWS * D) + rr);
            const float w = ml.x == -INFINITY ? 0.f : exp2f(ml.x - mz);  // split 0 holds key 0: mz is finite
            merge_w[rr][z] = w;
            l += w * ml.y;
        }
        merge_ok[rr] = l > 0.f;
        const float r = 1.f / l;
        for (int z = 0; z < splits; ++z) merge_w[rr][z] *= r;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < ROWS * (D / 4); i += blockDim.x) {
        const int rr = i / (D / 4), d = 4 * (i % (D / 4)), r = r0 + rr;
        if (r >= rows || !merge_ok[rr]) continue;
        const int t = r / GROUP, head = kvh * GROUP + r % GROUP;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int z = 0; z < splits; ++z) {
            const float w = merge_w[rr][z];
            const float4 v = __ldcg(reinterpret_cast<const float4*>(slot0 + (size_t)z * ROWS * (D + 2) + rr * D + d));
            acc.x += w * v.x; acc.y += w * v.y; acc.z += w * v.z; acc.w += w * v.w;
        }
        *reinterpret_cast<float4*>(out + (size_t)t * QD + (size_t)head * D + d) = acc;
#if XH_OUT
        xh_store4(xh, (size_t)t * QD + (size_t)head * D + d, acc);
#endif
    }
}
