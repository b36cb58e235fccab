// RoPE + KV-cache append + causal grouped-query attention, one launch (docs/ops.md, `rope_kv_attention`):
//     rope_kv_attention(const float* q [m, H*D], const float* k [m, KVH*D], const float* v [m, KVH*D],
//                       const __half* k_cache_in, const __half* v_cache_in,   // [n_slots, KVH, max_seq, D]
//                       const int* positions [m], const int* slots [m], int m, int n_slots, int max_seq,
//                       float* out [m, H*D], __half* k_cache_out, __half* v_cache_out)
// The *_in and *_out caches are the same memory (updated in place). A token whose slot is outside [0, n_slots) or whose
// position is outside [0, max_seq) (every backend refuses it before any kernel runs) is skipped: its clusters read
// and write nothing, its out row is left as it was (a guard against memory corruption, not a result).
// Compile-time: N_HEADS, N_KV_HEADS, HEAD_DIM (64 or 128), ROPE_THETA; N_HEADS / N_KV_HEADS <= 8.
// Builds for TensorRT (issue 16; toolchain/kernels.py defines_for(..., clusters=False), the `rope_kv_attention_addr`
// op): ATTN_CLUSTER=0 needs no cluster launch: each block of the same grid is a "cluster" of one (cluster index
// (y % G) * 8 + blockIdx.x, up to 16 per kv head, ATTN_CLUSTER_KEYS 256 keys each), its block partial is the
// cluster's, and clusters merge through the global scratch as below. ATTN_ADDR=1 names the kernel
// rope_kv_attention_addr and takes the layer's caches by address: `const unsigned long long* cache_addr` [2] (device
// addresses of the k and v cache) in place of the four cache pointers, so the cache is never a TensorRT network
// input or output:
//     rope_kv_attention_addr(q, k, v, cache_addr, positions, slots, m, n_slots, max_seq, out)
// Launch (toolchain/kernels.py): grid (8 (ATTN_KVGRID without clusters: 1; ATTN_GX=4: 4), N_HEADS (ATTN_KVGRID:
// N_KV_HEADS), m),
// block (ATTN_THREADS = 256),
// cluster (8, 1, 1) (ATTN_GX) compiled in. Tuning knobs (-D, defaults below): ATTN_CLUSTER_KEYS, ATTN_NBUF,
// ATTN_PF_KEYS, ATTN_LDMODE, ATTN_EARLY, ATTN_KVGRID, ATTN_GX.
// ATTN_XMERGE=1 (the cuda backend's batch-1 plan only) appends a parameter `float* xpart` [G][XSTR] and, for m = 1
// with more than one cluster per kv head, writes cluster partials there instead of `out`: see "Merge".
//
// Work split. One block computes ALL G = H / KVH query heads of one kv head over a range of positions, so each
// K/V byte is read once per token. Grid row y = kvh * G + c: the G clusters of (token, kvh) are numbered c, the 8
// blocks of a cluster r (blockIdx.x); positions 0..p are cut into C_act * 8 ranges (C_act = ceil(T /
// ATTN_CLUSTER_KEYS) clusters, at most G, and 1 when m > MSCR; the other clusters leave at once). Inside a block
// each warp takes steps of 8 keys (steps warp, warp + NW, ...): K and V rows go from global memory straight into
// registers (16-byte loads, ATTN_NBUF steps in flight per warp) and are multiplied on the tensor cores
// (mma.sync f16 -> f32) in a layout that needs no shared memory:
//   QK: A = q (rows 0..G-1: fp16 hi part, rows 8..8+G-1: fp16 lo part of q * log2(e)/sqrt(D), so hi + lo carries
//       ~22 bits of q), B = K rows (n = 8 keys), fp32 accumulation over D: a score = row g + row g+8.
//   PV: A = P (rows g: fp16 hi part of 4096 * p, rows g+8: lo part), B = V rows (k = 8 keys), C = O rows g, g+8.
// Dims are permuted consistently (each lane's K/V slice is whole 16-byte pieces, so loads are 16 bytes wide and
// coalesced); O is un-permuted when written. Online softmax in fp32 (base 2); a warp rescales O only when a
// running max grows.
// Merge: warps -> block (shared memory) -> cluster (distributed shared memory, each rank merges 1/8 of the
// elements: every rank pushes each rank its share with st.async, counted by that rank's mbarrier, so no cluster
// barrier with its GPU-wide memory fence (MEMBAR.ALL.GPU, twice per launch with cluster.sync) sits on the path;
// ATTN_PUSH=0 is the cluster.sync + remote-load merge) -> clusters (only when C_act > 1: rank partials to a
// module-global scratch; the last cluster to arrive, found by an atomic counter that it resets, merges them and
// writes out). The scratch belongs to the module:
// launches of one module must not overlap in time (both runtimes order them on one stream).
// With ATTN_XMERGE, m = 1 and C_act > 1 there is no cross-cluster step here: cluster c writes its partial to slot c
// of xpart (numerators in `out`'s order, then a (max, sum) pair per head) and the consumer, the o projection's
// decode build (plugins/qmv1.cuh QMV1_XMERGE, built with the same ATTN_CLUSTER_KEYS), finds C_act from the position
// as here and merges the C_act slots while it reads x, in the order and with the arithmetic of the last-arriver
// merge: the same bits, without the fence, the atomic and the last cluster's L2 round trip at the end of every
// long-context launch. With C_act = 1 `out` is written as always.
//
// Appends (all appends of the step precede all attention reads). A block writes, into the cache, the step's entries
// (tokens j with slots[j] == slot) whose positions fall in its own range; several blocks may write the same entry,
// always with the same bytes. With at most E_MAX such entries (decode: the token's own, one) the block also keeps
// them in shared memory and substitutes them for what it loaded from the cache, so nothing waits on the writes.
// With more (long prefills) it writes them, then __threadfence + __syncthreads, then reads its range (the steps
// before the first entry are loaded before the writes).
#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "cluster_push.cuh"
#include "pdl.cuh"
#include "softmax_merge.cuh"

#if !defined(N_HEADS) || !defined(N_KV_HEADS) || !defined(HEAD_DIM) || !defined(ROPE_THETA)
#error "rope_kv_attention needs -DN_HEADS=.. -DN_KV_HEADS=.. -DHEAD_DIM=.. -DROPE_THETA=.."
#endif
#ifndef ATTN_CLUSTER
#define ATTN_CLUSTER 1          // 0: no thread-block cluster (TensorRT's launcher): clusters of one block
#endif
#ifndef ATTN_ADDR
#define ATTN_ADDR 0             // 1: the caches by address (rope_kv_attention_addr)
#endif
#ifndef ATTN_CLUSTER_KEYS
#if ATTN_CLUSTER
#define ATTN_CLUSTER_KEYS 2048  // one more cluster (8 blocks) per this many keys of context, up to G
#else
#define ATTN_CLUSTER_KEYS 256   // one more block per this many keys, up to CMAX (a cluster's block had 2048 / 8)
#endif
#endif
#ifndef ATTN_NBUF
#define ATTN_NBUF 2             // key steps in flight per warp (registers)
#endif
#ifndef ATTN_PF_KEYS
#define ATTN_PF_KEYS 0          // L2 bulk prefetch distance in keys (0: none)
#endif
#ifndef ATTN_LDMODE
#define ATTN_LDMODE 0           // K/V loads: 0 ld.global, 1 ld.global.L1::no_allocate, 2 ld.global.cg
#endif
#ifndef ATTN_EARLY
#define ATTN_EARLY 1            // one-token steps: position, slot and first K/V loads before pdl_wait()
#endif
#ifndef ATTN_THREADS
#define ATTN_THREADS 256        // must match toolchain/kernels.py ATTN_THREADS
#endif
#ifndef ATTN_XMERGE
#define ATTN_XMERGE 0           // 1: m = 1 writes cluster partials to xpart, merged by the consumer
#endif
#ifndef ATTN_KVGRID
#define ATTN_KVGRID 0           // 1: grid y = N_KV_HEADS, one cluster per (token, kv head): C_act = 1 (see below)
#endif
#ifndef ATTN_PUSH
#define ATTN_PUSH 1             // cluster merge: 1 ranks push partials (st.async + mbarrier), 0 cluster.sync + loads
#endif
#if !ATTN_CLUSTER && ATTN_XMERGE
#error "ATTN_XMERGE pairs the cluster build with its consumer: not with ATTN_CLUSTER=0"
#endif

namespace cg = cooperative_groups;

constexpr int D = HEAD_DIM, H = N_HEADS, KVH = N_KV_HEADS, G = H / KVH;
constexpr int THREADS = ATTN_THREADS, NW = THREADS / 32;
constexpr int KSTEP = 8;               // keys per warp step (mma n for QK, k for PV)
constexpr int NKC = D / 32;            // 16-byte K pieces per lane per step (one K row per lane quad)
constexpr int NVC = D / 64;            // 16-byte V pieces per lane per V row (two V rows per lane)
constexpr int NKK = D / 16;            // QK mma k-steps
constexpr int NNT = D / 8;             // PV mma n-tiles
constexpr int SLOTS = 2 * NNT;         // O values per lane (head g, 2 columns of each n-tile)
constexpr int PF_PIECE = 64;           // keys per L2 prefetch request
constexpr float PSCALE = 4096.f;       // p scaled before the hi/lo split (keeps lo out of fp16 subnormals)
static_assert(H % KVH == 0, "N_HEADS must be a multiple of N_KV_HEADS");
static_assert(G <= 8, "at most 8 query heads per kv head (mma rows 0..7 hi, 8..15 lo)");
static_assert(D == 64 || D == 128, "HEAD_DIM must be 64 or 128");
static_assert(PF_PIECE % KSTEP == 0 && THREADS % 32 == 0 && THREADS <= 1024, "shapes");
constexpr int QPT = (G * D + THREADS - 1) / THREADS;   // q values loaded per thread
constexpr int XSTR = xmerge_slot_floats(H, D);         // floats per xpart slot


// inv_freq[j] = theta^(-2j/D), the float32 exponent as numpy forms it, evaluated at compile time in double and
// rounded once to float32: the correctly rounded value (numpy's float32 pow can be an ulp off; an ulp of angle
// grows with the position). Checked equal to (float)pow(double(theta), double(exponent)) for D 64/128.
constexpr double CX_LN2_HI = 6.93147180369123816490e-01, CX_LN2_LO = 1.90821492927058770002e-10;
constexpr double cx_ln(double x) {     // x > 0: 2 atanh((x-1)/(x+1)) after scaling x into [1/sqrt2, sqrt2]
    int k = 0;
    while (x > 1.4142135623730951) { x *= 0.5; ++k; }
    while (x < 0.7071067811865476) { x *= 2.0; --k; }
    const double z = (x - 1.0) / (x + 1.0), z2 = z * z;
    double term = z, sum = 0.0;
    for (int n = 1; n < 60; n += 2) { sum += term / n; term *= z2; }
    return 2.0 * sum + k * CX_LN2_LO + k * CX_LN2_HI;
}
constexpr double cx_exp(double y) {    // 2^k * exp(r), |r| <= ln2 / 2
    const double kf = y / (CX_LN2_HI + CX_LN2_LO);
    const int k = (int)(kf < 0 ? kf - 0.5 : kf + 0.5);
    const double r = (y - k * CX_LN2_HI) - k * CX_LN2_LO;
    double term = 1.0, sum = 1.0;
    for (int n = 1; n < 40; ++n) { term *= r / n; sum += term; }
    for (int i = 0; i < k; ++i) sum *= 2.0;
    for (int i = 0; i > k; --i) sum *= 0.5;
    return sum;
}
struct InvFreq { float v[D / 2]; };
constexpr InvFreq make_inv_freq() {
    InvFreq t{};
    for (int j = 0; j < D / 2; ++j)
        t.v[j] = (float)cx_exp((double)(-(float)j * (2.0f / (float)D)) * cx_ln((double)(float)(ROPE_THETA)));
    return t;
}
__device__ const InvFreq g_inv = make_inv_freq();

// Rotate-half RoPE of the pair (x[j], x[j + D/2]) with (cos, sin) of the angle, products rounded as numpy's.
__device__ __forceinline__ void rope_rot(float x1, float x2, float c, float s, float& y1, float& y2) {
    y1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
    y2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}
__device__ __forceinline__ void rope_angle(int pos, float inv, float& c, float& s) {
    sincosf(__fmul_rn((float)pos, inv), &s, &c);
}

__device__ __forceinline__ uint4 ld_kv(const __half* p) {
#if ATTN_LDMODE == 2
    return __ldcg(reinterpret_cast<const uint4*>(p));
#elif ATTN_LDMODE == 1
    uint4 r;
    asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
#else
    return *reinterpret_cast<const uint4*>(p);
#endif
}


__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    const __half2 h = __halves2half2(__float2half_rn(lo), __float2half_rn(hi));
    return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ uint32_t u4get(const uint4& u, int c) {
    return c == 0 ? u.x : c == 1 ? u.y : c == 2 ? u.z : u.w;
}

// D[16x8] += A[16x16] * B[16x8], f16 inputs, f32 accumulate
__device__ __forceinline__ void mma16816(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

// D[16x8] += A[16x8] * B[8x8]
__device__ __forceinline__ void mma1688(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(b));
}

// output dim of a lane's O slot: lane quad t, slot s = 2 * n-tile + column; n-tile nt covers dims 64(nt/8) + 8 col
// + nt%8 for its 8 columns, and the lane holds columns 2t, 2t+1
__device__ __forceinline__ int slot_dim(int t, int s) {
    const int nt = s >> 1;
    return 64 * (nt >> 3) + 16 * t + 8 * (s & 1) + (nt & 7);
}

struct StepBuf {
    uint4 k[NKC];        // K row (key g of the step): 16-byte pieces 4j + t, i.e. dims 32j + 8t .. +8
    uint4 v[2][NVC];     // V rows 2t, 2t+1 of the step: dims 64p + 8g .. +8
};

// K row kb + g and V rows kb + 2t, kb + 2t + 1 of the step starting at key kb (rows >= t1 are not loaded; their
// scores are masked and their V rows zero)
__device__ __forceinline__ void load_step(StepBuf& b, const __half* kc_in, const __half* vc_in, int kb, int t1,
                                          int g, int t) {
    const int kr = kb + g;
    if (kr < t1) {
#pragma unroll
        for (int jj = 0; jj < NKC; ++jj) b.k[jj] = ld_kv(kc_in + (size_t)kr * D + (4 * jj + t) * 8);
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int vr = kb + 2 * t + rr;
#pragma unroll
        for (int p = 0; p < NVC; ++p)
            b.v[rr][p] = vr < t1 ? ld_kv(vc_in + (size_t)vr * D + 64 * p + 8 * g) : make_uint4(0, 0, 0, 0);
    }
}

// One step of 8 keys (kb ..) for the warp: scores on the tensor cores, online softmax (base 2), O += P V.
__device__ __forceinline__ void attend_step(const StepBuf& b, int kb, int t1, const uint4 (&qa)[NKK],
                                            float (&o)[NNT][4], float& m_run, float& l_run, int t) {
    float sa[4] = {0.f, 0.f, 0.f, 0.f}, sb[4] = {0.f, 0.f, 0.f, 0.f};   // two chains: half the latency
#pragma unroll
    for (int kk = 0; kk < NKK; kk += 2) {
        const uint4& kq = b.k[kk >> 1];
        mma16816(sa, qa[kk], kq.x, kq.y);
        mma16816(sb, qa[kk + 1], kq.z, kq.w);
    }
    float s0 = (sa[0] + sb[0]) + (sa[2] + sb[2]);       // head g, key kb + 2t (log2 units)
    float s1 = (sa[1] + sb[1]) + (sa[3] + sb[3]);       // key kb + 2t + 1
    if (kb + 2 * t >= t1) s0 = -INFINITY;
    if (kb + 2 * t + 1 >= t1) s1 = -INFINITY;
    float mx = fmaxf(s0, s1);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    if (__any_sync(0xffffffffu, mx > m_run)) {
        const float mn = fmaxf(m_run, mx);
        const float alpha = ex2(m_run - mn);             // 0 on the first step (m_run = -inf)
#pragma unroll
        for (int nt = 0; nt < NNT; ++nt) {
            o[nt][0] *= alpha;
            o[nt][1] *= alpha;
            o[nt][2] *= alpha;
            o[nt][3] *= alpha;
        }
        l_run *= alpha;
        m_run = mn;
    }
    const float p0 = ex2(s0 - m_run), p1 = ex2(s1 - m_run);
    l_run += p0 + p1;
    const float q0 = p0 * PSCALE, q1 = p1 * PSCALE;
    const __half h0 = __float2half_rn(q0), h1 = __float2half_rn(q1);
    const uint32_t ahi = pack_half2(__half2float(h0), __half2float(h1));
    const uint32_t alo = pack_half2(q0 - __half2float(h0), q1 - __half2float(h1));
#pragma unroll
    for (int nt = 0; nt < NNT; ++nt) {
        const int p = nt >> 3, e = nt & 7;
        const uint32_t w0 = u4get(b.v[0][p], e >> 1), w1 = u4get(b.v[1][p], e >> 1);
        mma1688(o[nt], ahi, alo, __byte_perm(w0, w1, (e & 1) ? 0x7632 : 0x5410));
    }
}

// q rows (before RoPE) -> RoPE, * log2(e)/sqrt(D), hi/lo fp16 split, into each lane's A fragments: element (g, d)
// goes to lane 4g + (d%32)/8, k-step 2(d/32) + (d%8)/4, halves 4((d%4)/2) + d%2 (hi) and + 2 (lo)
__device__ __forceinline__ void build_q_fragments(const float (&qraw)[G][D], const float2 (&cs)[D / 2],
                                                  uint4 (&qfrag)[32][NKK + 1], int tid) {
    const float qscale = 1.4426950408889634f / sqrtf((float)D);
    __half* qf = reinterpret_cast<__half*>(&qfrag[0][0]);
    for (int e = tid; e < G * D / 2; e += THREADS) {
        const int gg = e / (D / 2), jp = e % (D / 2);
        const float2 a = cs[jp];
        float y1, y2;
        rope_rot(qraw[gg][jp], qraw[gg][jp + D / 2], a.x, a.y, y1, y2);
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int d = jp + hh * (D / 2);
            const float val = (hh ? y2 : y1) * qscale;
            const __half hi = __float2half_rn(val);
            const __half lo = __float2half_rn(val - __half2float(hi));
            const int ln = 4 * gg + (d % 32) / 8, kk = 2 * (d / 32) + (d % 8) / 4;
            const int hx = 4 * ((d % 4) / 2) + d % 2;
            __half* dst = qf + ((size_t)ln * (NKK + 1) + kk) * 8;
            dst[hx] = hi;
            dst[hx + 2] = lo;
        }
    }
}

// Warp partials -> one block partial: bO[f] (f = g * D + lane quad t * SLOTS + slot: the lane-slot layout) is the
// numerator relative to the block's max bm[g], bl[g] the denominator. Ends with the block's partial visible.
struct BlockMerge {
    float wO[NW][G][4][SLOTS + 1], wm[NW][G], wl[NW][G];   // per-warp partials (lane-slot layout, conflict-free)
    float bO[G * D], bm[G], bl[G];
};
__device__ __forceinline__ void merge_block(BlockMerge& s, const float (&o)[NNT][4], float m_run, float l_run,
                                            int tid) {
    const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    // slot 2nt + col = rows g (hi) + g+8 (lo) of n-tile nt, column 2t + col
    l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
    l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
    if (g < G) {
#pragma unroll
        for (int nt = 0; nt < NNT; ++nt) {
            s.wO[warp][g][t][2 * nt] = (o[nt][0] + o[nt][2]) * (1.f / PSCALE);
            s.wO[warp][g][t][2 * nt + 1] = (o[nt][1] + o[nt][3]) * (1.f / PSCALE);
        }
        if (t == 0) {
            s.wm[warp][g] = m_run;
            s.wl[warp][g] = l_run;
        }
    }
    __syncthreads();
    for (int f = tid; f < G * D; f += THREADS) {
        const int gg = f / D, u = f % D, tt = u / SLOTS, sl = u % SLOTS;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < NW; ++w) M = fmaxf(M, s.wm[w][gg]);
        float num = 0.f, den = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float mw = s.wm[w][gg];
            const float wt = merge_weight(mw, M);
            num = fmaf(wt, s.wO[w][gg][tt][sl], num);
            den = fmaf(wt, s.wl[w][gg], den);
        }
        s.bO[f] = num;
        if (u == 0) {
            s.bm[gg] = M;
            s.bl[gg] = den;
        }
    }
    __syncthreads();
}

#ifndef ATTN_GX
#define ATTN_GX 8                      // blocks per (token, kv head) cluster; 4: ATTN_KVGRID builds only (see below)
#endif
constexpr int GX = ATTN_GX;            // grid x (toolchain/kernels.py ATTN_SPLITS, or dims attn_gx)
constexpr int NS = ATTN_CLUSTER ? GX : 1;   // blocks per cluster (8: the portable maximum)
// clusters per (token, kv head); without clusters at most 16 blocks (4,096 keys at 256 each, more keys per block
// beyond), which keeps the merge scratch below (per module) at 4.7 MB for the 1.5B instead of 14
constexpr int CMAX = ATTN_CLUSTER ? G : (G * GX < 16 ? G * GX : 16);
constexpr int MSCR = 16;               // steps of at most this many tokens may spread a token over clusters
constexpr int DS = D / NS;             // elements per head merged by one cluster rank
constexpr int ME = G * DS;             // elements merged by one cluster rank
constexpr int EPT = (ME + THREADS - 1) / THREADS;   // of them per thread (1 with clusters)
constexpr int E_MAX = 8;               // step entries per block range kept in shared memory
static_assert(!ATTN_CLUSTER || ME <= THREADS, "one merged element per thread");
// ATTN_KVGRID: the cuda backend's build for steps of more than MSCR tokens (toolchain/kernels.py ATTN_MSCR), whose
// C_act is 1 anyway, and for steps within one cluster's keys: the default grid's other G - 1 clusters per (token, kv
// head) would only leave at once. Any m gives correct results (each token's positions over one cluster); the same
// bits as the default build wherever its C_act is 1. Without clusters (ATTN_CLUSTER=0) it is one block per (token,
// kv head) over all of the token's keys, launched with grid x = 1: for steps whose tokens fill the GPU by themselves
// (the cuda backend: more than MSCR tokens, up to kernels.ATTN_ONE_BLOCK_KEYS keys), where a cluster's 8 blocks
// would each get a few key steps and a merge.
// ATTN_GX=4 (ATTN_KVGRID with clusters): clusters of 4 blocks, for batched steps whose clusters of 8 would not all
// be resident at once (the 1.5B's build takes one 256-thread block per SM at ~210 registers: 16 tokens x 2 kv heads
// x 8 blocks = 256 blocks are two waves on 132 SMs; 128 blocks of 4-block clusters are one). Each rank merges 1/4 of
// the elements; the rest is as with 8.
static_assert(!ATTN_KVGRID || !ATTN_XMERGE, "ATTN_KVGRID: without xmerge");
static_assert(GX == 8 || (GX == 4 && ATTN_KVGRID && ATTN_CLUSTER), "ATTN_GX=4: ATTN_KVGRID cluster builds only");
static_assert(ME % 4 == 0, "16-byte pushes");
struct PushIn {                        // what a rank receives from each rank q (ATTN_PUSH)
    float o[NS][ME];                   // q's block numerators of this rank's elements
    float m[NS][G], l[NS][G];          // q's block max and sum of every head
};
#if ATTN_CLUSTER && ATTN_PUSH
constexpr unsigned PUSH_BYTES = sizeof(PushIn);
#endif
__device__ float g_part[MSCR][KVH][CMAX][NS][3][ME];  // cross-cluster partials (m <= MSCR): O, max, sum
__device__ unsigned int g_count[MSCR][KVH][NS];    // arrivals per (token, kv head, rank); reset by the last

#if ATTN_CLUSTER
#define ATTN_CLUSTER_DIMS __cluster_dims__(NS, 1, 1)
#else
#define ATTN_CLUSTER_DIMS
#endif
#if ATTN_ADDR
#define ATTN_KERNEL rope_kv_attention_addr
#define ATTN_CACHE_IN const unsigned long long* __restrict__ cache_addr
#define ATTN_CACHE_OUT
#else
#define ATTN_KERNEL rope_kv_attention
#define ATTN_CACHE_IN const __half* k_cache_in, const __half* v_cache_in
#define ATTN_CACHE_OUT , __half* k_cache, __half* v_cache
#endif

extern "C" __global__ void ATTN_CLUSTER_DIMS __launch_bounds__(THREADS, 1)
ATTN_KERNEL(const float* q, const float* k, const float* v,  // earlier kernels' outputs: no .nc loads
            ATTN_CACHE_IN, const int* positions, const int* slots, int m, int n_slots, int max_seq,
            float* __restrict__ out ATTN_CACHE_OUT
#if ATTN_XMERGE
            , float* __restrict__ xpart
#endif
            ) {
#if !ATTN_XMERGE
    float* const xpart = nullptr;
#endif
#if ATTN_ADDR  // written by the host before the step (like positions): readable before pdl_wait()
    __half* const k_cache = reinterpret_cast<__half*>(cache_addr[0]);
    __half* const v_cache = reinterpret_cast<__half*>(cache_addr[1]);
    const __half* const k_cache_in = k_cache;
    const __half* const v_cache_in = v_cache;
#endif
    __shared__ float2 cs[D / 2];                  // (cos, sin) of this token's position, pair j
    __shared__ float qraw[G][D];                  // the group's q rows before RoPE
    __shared__ uint4 qfrag[32][NKK + 1];          // QK A fragments of each lane (padded: conflict-free)
    __shared__ __align__(16) __half kst[E_MAX][D];   // entries of this range: half(RoPE(k)), half(v)
    __shared__ __align__(16) __half vst[E_MAX][D];
    __shared__ int list_pos[THREADS], list_j[THREADS], list_n, e_lo, e_hi, last_flag;
    __shared__ __align__(16) BlockMerge mb;       // this block's partial (read by the cluster; 16-byte pushes of bO)
#if ATTN_CLUSTER && ATTN_PUSH
    __shared__ __align__(16) PushIn pin;          // the cluster's partials of this rank's elements
    __shared__ __align__(8) uint64_t pin_bar;     // counts their bytes
#endif

    const int y = blockIdx.y, i = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int kvh = ATTN_KVGRID ? y : y / G;
    const int r = ATTN_CLUSTER ? blockIdx.x : 0;                          // rank in the cluster
    const int c = ATTN_KVGRID ? 0 : ATTN_CLUSTER ? y % G : (y % G) * GX + blockIdx.x;   // the cluster
    pdl_launch_dependents();
    // q, k and v come from the kernel just before: read after pdl_wait() (plain loads: pdl.cuh). A one-token step
    // (ATTN_EARLY) reads its position, slot and first K/V steps before the wait: they were written before this
    // step's first kernel (the host's inputs, decode_advance and the attention of earlier steps), which both
    // runtimes launch without PDL, i.e. after everything before it; row pos itself is patched from shared memory.
    const bool one = m == 1, early = ATTN_EARLY && one;
    if (!early) pdl_wait();

    const int pos = positions[i], slot = slots[i], T = pos + 1;
    if (slot < 0 || slot >= n_slots || pos < 0 || pos >= max_seq     // no backend lets such a row through: the
        || (ATTN_ADDR && (k_cache == nullptr || v_cache == nullptr))) {  // cluster reads and writes nothing of it
        if (early) pdl_wait();               // (nor of null cache addresses: a TensorRT builder's dummy inputs)
        return;
    }
    const int C_act = m <= MSCR && !ATTN_KVGRID ? min(CMAX, max(1, (T + ATTN_CLUSTER_KEYS - 1) / ATTN_CLUSTER_KEYS))
                                                : 1;
    if (c >= C_act) {                             // the whole cluster leaves (c is uniform over it)
        if (early) pdl_wait();
        return;
    }

#if ATTN_CLUSTER && ATTN_PUSH
    if (tid == 0) push_bar_init(&pin_bar, PUSH_BYTES);   // plugins/cluster_push.cuh
    cluster_arrive_relaxed();                     // waited for before the pushes
#endif
    const int nparts = C_act * NS;
    int per = (T + nparts - 1) / nparts;
    per = (per + KSTEP - 1) / KSTEP * KSTEP;
    const int t0 = min(T, (c * NS + r) * per), t1 = min(T, t0 + per);
    const int nsteps = (t1 - t0 + KSTEP - 1) / KSTEP;
    const size_t cache_off = ((size_t)slot * KVH + kvh) * max_seq * D;   // rows (slot, kvh, t, :)
    const __half* kc_in = k_cache_in + cache_off;
    const __half* vc_in = v_cache_in + cache_off;
    __half* kc = k_cache + cache_off;
    __half* vc = v_cache + cache_off;

    if (ATTN_PF_KEYS > 0 && lane == 0)            // L2 prefetch of the first ATTN_PF_KEYS keys (K and V)
        for (int p0 = t0 + warp * PF_PIECE; p0 < min(t1, t0 + ATTN_PF_KEYS); p0 += NW * PF_PIECE) {
            const unsigned bytes = (unsigned)(min(PF_PIECE, t1 - p0) * D * 2);
            l2_prefetch_range(kc_in + (size_t)p0 * D, bytes);
            l2_prefetch_range(vc_in + (size_t)p0 * D, bytes);
        }

    StepBuf buf[ATTN_NBUF];
#pragma unroll
    for (int b = 0; b < ATTN_NBUF; ++b) {
#pragma unroll
        for (int jj = 0; jj < NKC; ++jj) buf[b].k[jj] = make_uint4(0, 0, 0, 0);
    }
    unsigned loaded = 0;
    auto load_first = [&](int clean_end) {        // this warp's first steps that end by clean_end
#pragma unroll
        for (int b = 0; b < ATTN_NBUF; ++b) {
            const int s = warp + b * NW;
            if (s < nsteps && !(loaded & (1u << b)) && t0 + (s + 1) * KSTEP <= clean_end) {
                load_step(buf[b], kc_in, vc_in, t0 + s * KSTEP, t1, g, t);
                loaded |= 1u << b;
            }
        }
    };
    const bool many = m > THREADS;
    const bool own_here = pos >= t0 && pos < t1;
    if (one) load_first(INT_MAX);                 // decode: the only entry (its own) is patched in
    if (early) pdl_wait();

    float qv[QPT];                                // the group's q rows, this lane's inverse frequency
#pragma unroll
    for (int u = 0; u < QPT; ++u) {
        const int e = tid + u * THREADS;
        qv[u] = e < G * D ? q[((size_t)i * H + kvh * G) * D + e] : 0.f;
    }
    const float invf = tid < D / 2 ? g_inv.v[tid] : 0.f;
    // a one-token step's own entry: the k and v pair this thread writes (write_entries below), loaded with q
    const int own_jd = (tid + THREADS / 2) % THREADS;
    const bool own_pair = one && own_here && own_jd < D / 2;
    float own_kv[4] = {0.f, 0.f, 0.f, 0.f};
    if (own_pair) {
        const float* kr = k + (size_t)kvh * D;
        const float* vr = v + (size_t)kvh * D;
        own_kv[0] = kr[own_jd];
        own_kv[1] = kr[own_jd + D / 2];
        own_kv[2] = vr[own_jd];
        own_kv[3] = vr[own_jd + D / 2];
    }

    if (tid == 0) {
        list_n = one && own_here ? 1 : 0;
        list_pos[0] = pos;
        list_j[0] = 0;
        e_lo = one && own_here ? pos : INT_MAX;
        e_hi = one && own_here ? pos : -1;
        last_flag = 0;
    }
#pragma unroll
    for (int u = 0; u < QPT; ++u) {
        const int e = tid + u * THREADS;
        if (e < G * D) (&qraw[0][0])[e] = qv[u];
    }
    if (tid < D / 2) {                            // RoPE angles of this token's position
        float cc, ss;
        rope_angle(pos, invf, cc, ss);
        cs[tid] = make_float2(cc, ss);
    }
    __syncthreads();

    if (!one && tid < m && slots[tid] == slot) {  // the step's entries in [t0, t1), first round (j < THREADS)
        const int pj = positions[tid];
        if (pj >= t0 && pj < t1) {
            const int e = atomicAdd(&list_n, 1);
            list_pos[e] = pj;
            list_j[e] = tid;
            atomicMin(&e_lo, pj);
            atomicMax(&e_hi, pj);
        }
    }
    build_q_fragments(qraw, cs, qfrag, tid);
    if (!one) __syncthreads();                    // the entry list is complete
    const int n_ent = list_n, lo_ent = e_lo, hi_ent = e_hi;
    const bool patch = !many && n_ent <= E_MAX;
    if (!one) load_first(patch ? INT_MAX : many ? t0 : lo_ent);

    // the step's entries of this range into the cache (and, when patching, into kst / vst)
    const int kvrow_stride = KVH * D;             // between tokens j in k, v
    bool wrote = false;
    auto write_entries = [&](int first_idx) {
        const int n = list_n;
        for (int idx = first_idx; idx < n * (D / 2); idx += THREADS) {
            const int e = idx / (D / 2), jd = idx % (D / 2), pj = list_pos[e];
            const size_t row = (size_t)list_j[e] * kvrow_stride + kvh * D;
            float cc, ss, y1, y2;
            if (pj == pos) {
                cc = cs[jd].x;
                ss = cs[jd].y;
            } else {
                rope_angle(pj, g_inv.v[jd], cc, ss);
            }
            const bool pre = one && idx == own_jd;   // loaded above (own_pair)
            rope_rot(pre ? own_kv[0] : k[row + jd], pre ? own_kv[1] : k[row + jd + D / 2], cc, ss, y1, y2);
            const __half k1 = __float2half_rn(y1), k2 = __float2half_rn(y2);
            const __half v1 = __float2half_rn(pre ? own_kv[2] : v[row + jd]);
            const __half v2 = __float2half_rn(pre ? own_kv[3] : v[row + jd + D / 2]);
            kc[(size_t)pj * D + jd] = k1;
            kc[(size_t)pj * D + jd + D / 2] = k2;
            vc[(size_t)pj * D + jd] = v1;
            vc[(size_t)pj * D + jd + D / 2] = v2;
            if (patch) {
                kst[e][jd] = k1;
                kst[e][jd + D / 2] = k2;
                vst[e][jd] = v1;
                vst[e][jd + D / 2] = v2;
            }
            wrote = true;
        }
    };
    write_entries((tid + THREADS / 2) % THREADS);
    if (many) {                                   // long prefill: further rounds of THREADS tokens
        for (int base = THREADS; base < m; base += THREADS) {
            __syncthreads();                      // the list of the previous round is consumed
            if (tid == 0) list_n = 0;
            __syncthreads();
            const int j = base + tid;
            if (j < m && slots[j] == slot) {
                const int pj = positions[j];
                if (pj >= t0 && pj < t1) {
                    const int e = atomicAdd(&list_n, 1);
                    list_pos[e] = pj;
                    list_j[e] = j;
                }
            }
            __syncthreads();
            write_entries(tid);
        }
    }
    if (!patch && wrote) __threadfence();
    __syncthreads();                              // entries staged (or in the cache), q fragments ready
    if (!patch) load_first(INT_MAX);              // the rest of this warp's first steps
    const int n_patch = patch ? n_ent : 0;

    uint4 qa[NKK];
#pragma unroll
    for (int kk = 0; kk < NKK; ++kk) qa[kk] = g < G ? qfrag[lane][kk] : make_uint4(0, 0, 0, 0);

    float o[NNT][4];
#pragma unroll
    for (int nt = 0; nt < NNT; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
    float m_run = -INFINITY, l_run = 0.f;

    auto compute_step = [&](StepBuf& b, int s) {
        const int kb = t0 + s * KSTEP;
        if (ATTN_PF_KEYS > 0 && lane == 0 && s % (PF_PIECE / KSTEP) == 0) {   // keep the L2 prefetch ahead
            const int p0 = kb + ATTN_PF_KEYS;
            if (p0 < t1) {
                const unsigned bytes = (unsigned)(min(PF_PIECE, t1 - p0) * D * 2);
                l2_prefetch_range(kc_in + (size_t)p0 * D, bytes);
                l2_prefetch_range(vc_in + (size_t)p0 * D, bytes);
            }
        }
        if (n_patch > 0 && kb <= hi_ent && kb + KSTEP > lo_ent) {   // entries of this step: from shared memory
            for (int e = 0; e < n_patch; ++e) {
                const int pe = list_pos[e];
                if (pe == kb + g) {
#pragma unroll
                    for (int jj = 0; jj < NKC; ++jj) b.k[jj] = *reinterpret_cast<const uint4*>(&kst[e][(4 * jj + t) * 8]);
                }
#pragma unroll
                for (int rr = 0; rr < 2; ++rr)
                    if (pe == kb + 2 * t + rr) {
#pragma unroll
                        for (int p = 0; p < NVC; ++p) b.v[rr][p] = *reinterpret_cast<const uint4*>(&vst[e][64 * p + 8 * g]);
                    }
            }
        }
        attend_step(b, kb, t1, qa, o, m_run, l_run, t);
    };

    for (int s0 = warp; s0 < nsteps; s0 += ATTN_NBUF * NW) {
#pragma unroll
        for (int b = 0; b < ATTN_NBUF; ++b) {
            const int s = s0 + b * NW;
            if (s < nsteps) {
                compute_step(buf[b], s);
                if (s + ATTN_NBUF * NW < nsteps) load_step(buf[b], kc_in, vc_in, t0 + (s + ATTN_NBUF * NW) * KSTEP, t1, g, t);
            }
        }
    }

    merge_block(mb, o, m_run, l_run, tid);

    // This rank's merged elements e = tid + j THREADS (j < EPT, e < ME), the cluster's numerator, max and sum of
    // each: element f = r ME + e of the head-major lane-slot layout (head gg = f / D, u = f % D).
    float num[EPT], den[EPT], M[EPT];
#if ATTN_CLUSTER
    const int f = r * ME + tid, gg = f / D;
#if ATTN_PUSH
    cluster_wait();                               // every rank's mbarrier is initialized
    for (int e = tid; e < NS * (ME / 4); e += THREADS) {          // rank q2's share of this block's numerators
        const int q2 = e / (ME / 4), j = 4 * (e % (ME / 4));
        push4(&pin.o[r][j], *reinterpret_cast<const uint4*>(&mb.bO[q2 * ME + j]), &pin_bar, q2);
    }
    if (tid < NS * G) {                                           // the block's max and sum of each head
        const int q2 = tid / G, h = tid % G;
        push(&pin.m[r][h], __float_as_uint(mb.bm[h]), &pin_bar, q2);
        push(&pin.l[r][h], __float_as_uint(mb.bl[h]), &pin_bar, q2);
    }
#else
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();                               // all block partials visible cluster-wide
#endif
    num[0] = 0.f, den[0] = 0.f, M[0] = -INFINITY;
    if (tid < ME) {
        float mq[NS], lq[NS], oq[NS];
#if ATTN_PUSH
        push_bar_wait(&pin_bar);                  // every rank's pushes have landed
#pragma unroll
        for (int q2 = 0; q2 < NS; ++q2) {
            mq[q2] = pin.m[q2][gg];
            lq[q2] = pin.l[q2][gg];
            oq[q2] = pin.o[q2][tid];
        }
#else
#pragma unroll
        for (int q2 = 0; q2 < NS; ++q2) {         // every remote load first, then the arithmetic
            mq[q2] = *cluster.map_shared_rank(&mb.bm[gg], q2);
            lq[q2] = *cluster.map_shared_rank(&mb.bl[gg], q2);
            oq[q2] = *cluster.map_shared_rank(&mb.bO[f], q2);
        }
#endif
#pragma unroll
        for (int q2 = 0; q2 < NS; ++q2) M[0] = fmaxf(M[0], mq[q2]);
#pragma unroll
        for (int q2 = 0; q2 < NS; ++q2) {
            const float wt = merge_weight(mq[q2], M[0]);
            num[0] = fmaf(wt, oq[q2], num[0]);
            den[0] = fmaf(wt, lq[q2], den[0]);
        }
    }
#if !ATTN_PUSH
    cluster.sync();                               // remote reads done: shared memory may go
#endif
#else  // a cluster of one block: its partial is the cluster's
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
        const int e = tid + j * THREADS;
        num[j] = e < ME ? mb.bO[e] : 0.f;
        M[j] = e < ME ? mb.bm[e / D] : -INFINITY;
        den[j] = e < ME ? mb.bl[e / D] : 0.f;
    }
#endif
    float* orow = out + ((size_t)i * H + kvh * G) * D;
    if (ATTN_XMERGE && one && C_act > 1) {        // the consumer merges the slots (see "Merge")
        const int e = r * ME + tid, hh = e / D, u = e % D;
        if (tid < ME) {
            xpart[(size_t)c * XSTR + (kvh * G + hh) * D + slot_dim(u / SLOTS, u % SLOTS)] = num[0];
            if (u == 0) {                         // the head's (max, sum) pair
                xpart[(size_t)c * XSTR + H * D + 2 * (kvh * G + hh)] = M[0];
                xpart[(size_t)c * XSTR + H * D + 2 * (kvh * G + hh) + 1] = den[0];
            }
        }
        return;
    }
    if (C_act == 1) {
#pragma unroll
        for (int j = 0; j < EPT; ++j) {
            const int e = tid + j * THREADS, fe = r * ME + e, u = fe % D;
            if (e < ME) orow[(fe / D) * D + slot_dim(u / SLOTS, u % SLOTS)] = num[j] / den[j];
        }
        return;
    }
    float* part = &g_part[i][kvh][c][r][0][0];
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
        const int e = tid + j * THREADS;
        if (e < ME) {
            part[e] = num[j];
            part[ME + e] = M[j];
            part[2 * ME + e] = den[j];
        }
    }
    __syncthreads();
    if (tid == 0) {
        __threadfence();                          // release: the block's partial before the count
        const unsigned old = atomicAdd(&g_count[i][kvh][r], 1u);
        if (old == (unsigned)C_act - 1) {
            __threadfence();                      // acquire: the other clusters' partials
            g_count[i][kvh][r] = 0;               // every cluster has arrived: ready for the next launch
            last_flag = 1;
        }
    }
    __syncthreads();
    if (!last_flag) return;
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
        const int e = tid + j * THREADS, fe = r * ME + e, u = fe % D;
        if (e >= ME) break;
        float Mx = -INFINITY;
        for (int cc = 0; cc < C_act; ++cc) Mx = fmaxf(Mx, __ldcg(&g_part[i][kvh][cc][r][1][e]));
        float nn = 0.f, dd = 0.f;
        for (int cc = 0; cc < C_act; ++cc) {
            const float* pc = &g_part[i][kvh][cc][r][0][0];
            const float mc = __ldcg(pc + ME + e);
            const float wt = merge_weight(mc, Mx);
            nn = fmaf(wt, __ldcg(pc + e), nn);
            dd = fmaf(wt, __ldcg(pc + 2 * ME + e), dd);
        }
        orow[(fe / D) * D + slot_dim(u / SLOTS, u % SLOTS)] = nn / dd;
    }
}
