// Device-side sampling inside the captured decode step (runtime-only, not ONNX nodes). The definition is
// toolchain/sampling.py's (penalties -> temperature -> top-k -> top-p -> min-p -> one draw); each slot's parameters
// are PARAM_WORDS int32 words of `params` (sampling.device_params), its penalty window a ring of HIST token ids
// (entry p % HIST holds the token at position p), so one captured graph serves a batch of requests with different
// settings. Only the step's rows rows[0..n) are sampled (the others are prompt tokens whose logits nobody needs):
// row r samples from logits row r, for slot slots[r], at position positions[r].
//
//     apply_penalties(const int* rows, const int* slots, const int* params, const int* history, int n, int vocab,
//                     float* logits)
//         grid (n), block (HIST): before the argmax; rows whose slot has no penalty return at once.
//     sample_tokens(const float* logits, const int* rows, const int* slots, const int* positions, const int* params,
//                   int n, int vocab, long long* next_token, int* history)
//         grid (SPLITS, n), block (THREADS), a compile-time cluster of SPLITS along x: after the argmax, whose
//         result (next_token) gives the row's maximum. Greedy rows (temperature 0) keep it. Sampled rows replace
//         it with a draw; every row writes its token into its slot's ring at position + 1.
//
// sample_tokens holds a row's logits in registers (PER per thread, vocab <= SPLITS * THREADS * PER) as
// x = exp((z - zmax) / T), the probability relative to the most likely token, and:
// - without top-k and top-p (temperature and min-p): an inverse-CDF draw over the kept tokens in a fixed order
//   (rank, thread, element): the exact distribution, no sort. Sums in a fixed tree: the same bits on every run.
// - with top-k or top-p: a histogram of counts of x over NB bins (64 per factor of 2, by the float's bits: exactly
//   monotone), merged over the cluster, gives the bin where the top-k count or a lower bound of the top-p mass
//   (count x the bin's lower edge, against top_p x the exact sum of x: both make a superset) is reached. Then:
//   SORTED: the tokens up to that bin, at most CAP, are gathered in rank 0, sorted by (logit descending, id
//   ascending) as the reference orders them, and the reference's cuts and draw run on them in double (the same
//   token as the reference for the same uniform).
//   EDGE (more than CAP tokens up to the bin, at most CAP in it, top-k or top-p alone): only the cut bin's tokens
//   are sorted, to find the last kept one exactly (top-p: from the exact mass before the bin); the draw is then in
//   the fixed order over the exact kept set.
//   COARSE (more than CAP tokens in the cut bin itself: a flat distribution, or top-k and top-p together over
//   thousands of tokens): the draw is over every token up to and including the bin, the edge resolved to 1/64 of
//   a factor of 2 (documented approximation).
// The draw's uniform is Philox4x64-10(key = seed, counter = (position + 1, 0, 0, 0)), word 0 >> 11, times 2^-53:
// numpy's Generator(Philox(key=seed, counter=position)).random() (toolchain/sampling.py).
#include <cooperative_groups.h>
#include <stdint.h>

#include "cluster_push.cuh"
#include "pdl.cuh"

namespace cg = cooperative_groups;

constexpr int SPLITS = 8, THREADS = 1024, PER = 20, NB = 2048, CAP = 2048, HIST = 64, WORDS = 12;
// how the kept set is found: all candidates sorted in rank 0 / only the cut bin's tokens sorted (one of top-k, top-p,
// more than CAP tokens before it) / the whole cut bin kept (the coarse edge)
constexpr int MODE_SORTED = 0, MODE_EDGE = 1, MODE_COARSE = 2;

// x = exp((z - zmax) / T) in [0, 1]; NaN (a NaN logit or maximum) gives 0: never drawn (fminf alone would make it 1)
__device__ __forceinline__ float rel_prob(float z, float zmax, float invT) {
    const float x = __expf((z - zmax) * invT);
    return x > 0.f ? fminf(x, 1.f) : 0.f;
}
constexpr float MASS_SCALE = 1099511627776.0f;  // 2^40: the fixed-point masses of the edge refinement

__device__ __forceinline__ float word_f(const int* p, int i) { return __int_as_float(p[i]); }

__device__ double philox_uniform(uint64_t seed, uint64_t position) {
    uint64_t c0 = position + 1, c1 = 0, c2 = 0, c3 = 0, k0 = seed, k1 = 0;
    for (int r = 0; r < 10; ++r) {
        if (r) { k0 += 0x9E3779B97F4A7C15ull; k1 += 0xBB67AE8584CAA73Bull; }
        const uint64_t hi0 = __umul64hi(0xD2E7470EE14C6C93ull, c0), lo0 = 0xD2E7470EE14C6C93ull * c0;
        const uint64_t hi1 = __umul64hi(0xCA5A826395121157ull, c2), lo1 = 0xCA5A826395121157ull * c2;
        const uint64_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    }
    return (double)(c0 >> 11) * (1.0 / 9007199254740992.0);
}

// bin of a relative probability 0 < x <= 1: 64 bins per factor of 2 below 1, the last bin for everything smaller
__device__ __forceinline__ int bin_of(float x) {
    const unsigned key = 0x3F800000u - __float_as_uint(x);
    return min((int)(key >> 17), NB - 1);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// block-wide sum in a fixed order (every thread gets it); scratch holds 32 values
template <typename T>
__device__ T block_sum(T v, T* scratch) {
    v = warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    T s = 0;
    for (int w = 0; w < THREADS / 32; ++w) s += scratch[w];
    return s;
}

// exclusive prefix of v over the block's threads in thread order (every thread gets its own); scratch: 32 values
__device__ float block_exclusive_scan(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float incl = v;
    for (int o = 1; o < 32; o <<= 1) {
        const float n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = incl;
    __syncthreads();
    float before = 0.f;
    for (int w = 0; w < warp; ++w) before += scratch[w];
    return before + incl - v;
}

struct Found {
    int index;     // the first a < n whose inclusive prefix sum of xs passes the threshold (n if none)
    double total;  // the sum of xs[0, n)
};

// One warp (lanes 0-31 all call it): lane l sums its contiguous share of xs[0, n), the shares' prefixes by a warp
// scan, then each lane walks its share. Passing: sum >= thr, or sum > thr with strict (numpy searchsorted right).
__device__ Found warp_prefix_find(const double* xs, int n, double thr, bool strict) {
    const int lane = threadIdx.x & 31, seg = (n + 31) / 32;
    const int a0 = min(n, lane * seg), a1 = min(n, a0 + seg);
    double s = 0.0;
    for (int a = a0; a < a1; ++a) s += xs[a];
    double incl = s;
    for (int o = 1; o < 32; o <<= 1) {
        const double v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
    }
    const double total = __shfl_sync(0xffffffffu, incl, 31);
    double c = incl - s;
    unsigned found = (unsigned)n;
    for (int a = a0; a < a1; ++a) {
        c += xs[a];
        if (strict ? c > thr : c >= thr) { found = (unsigned)a; break; }
    }
    return {(int)__reduce_min_sync(0xffffffffu, found), total};
}

extern "C" __global__ void __launch_bounds__(HIST)
apply_penalties(const int* rows, const int* slots, const int* params, const int* history, int n, int vocab,
                float* logits) {
    __shared__ int ring[HIST];
    pdl_launch_dependents();
    pdl_wait();
    const int row = rows[blockIdx.x], slot = slots[row];
    const int* P = params + (size_t)slot * WORDS;
    if (!(P[7] & 1)) return;
    const int t = history[(size_t)slot * HIST + threadIdx.x];
    ring[threadIdx.x] = t;
    __syncthreads();
    if (t < 0 || t >= vocab) return;  // an empty entry, or an id no kernel may follow
    int count = 0;
    bool first = true;
    for (int j = 0; j < HIST; ++j)
        if (ring[j] == t) { ++count; first = first && j >= (int)threadIdx.x; }
    if (!first) return;  // one thread per distinct token
    float* z = logits + (size_t)row * vocab + t;
    float v = *z;
    const float rp = word_f(P, 4);
    if (rp != 1.f) v = v > 0.f ? v / rp : v * rp;
    *z = v - ((float)count * word_f(P, 6) + word_f(P, 5));
}

struct SampleShared {
    unsigned cnt[NB];         // the histogram of counts (rank 0: merged over the cluster)
    float cand_z[CAP];        // rank 0: the candidates (logit, id), sorted in place
    int cand_i[CAP];
    double xs[CAP];           // rank 0: the sorted candidates' relative probabilities
    float part[SPLITS];       // rank 0: every rank's sum (exact masses, in rank order); draw_in_order: all-gathered
    float fscratch[32];
    unsigned uscratch[32];
    float total;              // rank 0: the whole vocabulary's mass (sum of x)
    int cut, n_cand, mode;    // the histogram's decision (written by rank 0 into every rank): MODE_*
    int n_before;             // rank 0: tokens in the bins before the cut bin
    unsigned long long w_before, pthr;  // rank 0, edge refinement: their fixed-point mass; top_p x the total's
    unsigned long long uscratch64[32];
    float z_last;             // mode EDGE: the last kept token of the cut bin (logit, id), in every rank
    int id_last;
};

// The pure draw: token of the inverse CDF of u over e[] in (rank, thread, element) order; every rank calls it after
// its e[] is final. Only the chosen thread returns a token (others -1); every thread returns -2 when nothing is
// kept (NaN logits).
__device__ int draw_in_order(const float (&e)[PER], double u, int lo, SampleShared& sh, cg::cluster_group& cluster,
                             unsigned rank) {
    float tsum = 0.f;
#pragma unroll
    for (int j = 0; j < PER; ++j) tsum += e[j];
    const float bsum = block_sum(tsum, sh.fscratch);
    if (threadIdx.x < SPLITS) cluster.map_shared_rank(sh.part, threadIdx.x)[rank] = bsum;
    cluster.sync();
    float total = 0.f;
    int last = -1;
    for (int r = 0; r < SPLITS; ++r) {
        total += sh.part[r];
        if (sh.part[r] > 0.f) last = r;
    }
    if (last < 0) return -2;
    const float target = (float)(u * (double)total);
    int b = last;
    float acc = 0.f;
    for (int r = 0; r < SPLITS; ++r) {
        if (sh.part[r] > 0.f && target < acc + sh.part[r]) { b = r; break; }
        acc += sh.part[r];
    }
    if ((int)rank != b) return -1;
    float before = 0.f;  // the chosen block's start, summed in the same order
    for (int r = 0; r < b; ++r) before += sh.part[r];
    const float tl = target - before;
    const float excl = block_exclusive_scan(tsum, sh.fscratch);
    // exactly one owner, whatever the scan's rounding: the last thread with mass whose range starts at or below the
    // target (else the first thread with mass)
    __shared__ int owner, first;
    if (threadIdx.x == 0) { owner = -1; first = THREADS; }
    __syncthreads();
    if (tsum > 0.f && tl >= excl) atomicMax(&owner, (int)threadIdx.x);
    if (tsum > 0.f) atomicMin(&first, (int)threadIdx.x);
    __syncthreads();
    if ((int)threadIdx.x != (owner >= 0 ? owner : first)) return -1;
    float c = excl;
    int pick = -1;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        if (e[j] > 0.f && pick < 0) {
            c += e[j];
            if (tl < c) pick = j;
        }
    }
    if (pick < 0)
        for (int j = PER - 1; j >= 0 && pick < 0; --j)
            if (e[j] > 0.f) pick = j;
    return lo + threadIdx.x + pick * THREADS;
}

// Rank 0, every thread (after a __syncthreads that makes sh.cut and the counts final): the cut bin and `mode` into
// every rank's shared memory, then rank 0's candidate counter zeroed for the gather that follows.
__device__ void broadcast_decision(int mode, SampleShared& sh, cg::cluster_group& cluster) {
    __syncthreads();  // every thread has read the counts that chose `mode`
    if (threadIdx.x < SPLITS) {
        SampleShared* dst = cluster.map_shared_rank(&sh, threadIdx.x);
        dst->cut = sh.cut;
        dst->mode = mode;
    }
    __syncthreads();
    if (threadIdx.x == 0) sh.n_cand = 0;  // from here on: the gather's counter
}

// Edge mode with top-p: the lower-bound masses put the cut bin at or after the true one. Recount the masses exactly
// (fixed point, 2^-40 per unit of x: order-independent sums), and find the true cut bin, the tokens and the mass
// before it (rank 0), and whether its own tokens fit the sort (else the coarse edge). Rare: a nucleus of more than
// CAP tokens; its 64-bit shared atomics are the price.
__device__ void refine_edge(const float (&e)[PER], float topp, SampleShared& sh, cg::cluster_group& cluster,
                            unsigned rank) {
    unsigned long long* mass = reinterpret_cast<unsigned long long*>(sh.xs);  // NB of them (xs: CAP doubles)
    for (int b = threadIdx.x; b < NB; b += THREADS) mass[b] = 0;
    __syncthreads();
    unsigned long long ovm = 0;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        if (e[j] > 0.f) {
            const int b = bin_of(e[j]);
            const unsigned long long w = (unsigned long long)__float2ull_rn(e[j] * MASS_SCALE);
            if (b == NB - 1) ovm += w;
            else atomicAdd(&mass[b], w);
        }
    }
    ovm = block_sum(ovm, sh.uscratch64);
    if (threadIdx.x == 0) mass[NB - 1] += ovm;
    cluster.sync();  // every rank's masses are complete
    if (rank == 0) {
        constexpr int BPT = NB / THREADS;
        unsigned c[BPT];
        unsigned long long w[BPT];
        unsigned tc = 0;
        unsigned long long tw = 0;
        for (int q = 0; q < BPT; ++q) {
            const int b = threadIdx.x * BPT + q;
            c[q] = 0;
            w[q] = 0;
            for (int r = 0; r < SPLITS; ++r) {
                c[q] += cluster.map_shared_rank(sh.cnt, r)[b];
                w[q] += cluster.map_shared_rank(mass, r)[b];
            }
            tc += c[q];
            tw += w[q];
        }
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        unsigned ic = tc;
        unsigned long long iw = tw;
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned nc = __shfl_up_sync(0xffffffffu, ic, o);
            const unsigned long long nw = __shfl_up_sync(0xffffffffu, iw, o);
            if (lane >= o) { ic += nc; iw += nw; }
        }
        __shared__ unsigned wc[32];
        __shared__ unsigned long long ww[32];
        if (lane == 31) { wc[warp] = ic; ww[warp] = iw; }
        const int old_cut = sh.cut;
        __syncthreads();
        unsigned bc = 0;
        unsigned long long bw = 0, total = 0;
        for (int q = 0; q < THREADS / 32; ++q) {
            total += ww[q];
            if (q < warp) { bc += wc[q]; bw += ww[q]; }
        }
        const unsigned long long pthr = (unsigned long long)((double)topp * (double)total);
        unsigned ec = bc + ic - tc;
        unsigned long long ew = bw + iw - tw;
        for (int q = 0; q < BPT; ++q) {
            const int b = threadIdx.x * BPT + q;
            if (b <= old_cut && ew < pthr && ew + w[q] >= pthr) atomicMin(&sh.cut, b);
            ec += c[q];
            ew += w[q];
        }
        __syncthreads();
        ec = bc + ic - tc;
        ew = bw + iw - tw;
        for (int q = 0; q < BPT; ++q) {
            const int b = threadIdx.x * BPT + q;
            if (b == sh.cut) {
                sh.n_before = (int)ec;
                sh.w_before = ew;
                sh.pthr = pthr;
                sh.n_cand = (int)(ec + c[q]);
            }
            ec += c[q];
            ew += w[q];
        }
        __syncthreads();
        broadcast_decision(sh.n_cand - sh.n_before <= CAP ? MODE_EDGE : MODE_COARSE, sh, cluster);
    }
    cluster.sync();  // the refined decision is everywhere
}

// bitonic sort of rank 0's n candidates: first the larger logit, then the smaller id (the reference's order)
__device__ void sort_candidates(SampleShared& sh, int n) {
    int P2 = 2;
    while (P2 < n) P2 <<= 1;
    for (int a = n + threadIdx.x; a < P2; a += THREADS) { sh.cand_z[a] = -INFINITY; sh.cand_i[a] = 0x7fffffff; }
    __syncthreads();
    for (int size = 2; size <= P2; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int a = threadIdx.x; a < P2; a += THREADS) {
                const int b = a ^ stride;
                if (b > a) {
                    const float za = sh.cand_z[a], zb = sh.cand_z[b];
                    const int ia = sh.cand_i[a], ib = sh.cand_i[b];
                    const bool a_first = za > zb || (za == zb && ia < ib);
                    const bool up = (a & size) == 0;
                    if (up != a_first) {
                        sh.cand_z[a] = zb; sh.cand_z[b] = za;
                        sh.cand_i[a] = ib; sh.cand_i[b] = ia;
                    }
                }
            }
            __syncthreads();
        }
    }
}

extern "C" __global__ void __cluster_dims__(SPLITS, 1, 1) __launch_bounds__(THREADS, 1)
sample_tokens(const float* logits, const int* rows, const int* slots, const int* positions, const int* params, int n,
              int vocab, long long* next_token, int* history) {
    __shared__ SampleShared sh;
    cg::cluster_group cluster = cg::this_cluster();
    const unsigned rank = cluster.block_rank();
    pdl_launch_dependents();
    pdl_wait();
    const int row = rows[blockIdx.y], slot = slots[row], pos = positions[row];
    const int* P = params + (size_t)slot * WORDS;
    const float T = word_f(P, 0);
    const long long amax = ld_produced(next_token + row);
    int* ring = history + (size_t)slot * HIST;
    if (!(T > 0.f)) {  // greedy: the argmax (of the penalized logits) stands
        if (rank == 0 && threadIdx.x == 0) ring[(pos + 1) % HIST] = (int)amax;
        return;
    }
    cluster_arrive_relaxed();  // (waited for before the first access to another block's shared memory)
    const int topk = P[1];
    const float topp = word_f(P, 2), minp = word_f(P, 3), invT = 1.f / T;
    const uint64_t seed = (uint64_t)(unsigned)P[8] | ((uint64_t)(unsigned)P[9] << 32);
    const double u = philox_uniform(seed, (uint64_t)pos);
    const float* z = logits + (size_t)row * vocab;
    const float zmax = z[amax];
    const int chunk = (vocab + SPLITS - 1) / SPLITS;
    const int lo = rank * chunk, hi = min(vocab, lo + chunk);
    const bool filter = topk > 0 || topp < 1.f;
    float e[PER];
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        const int i = lo + threadIdx.x + j * THREADS;
        float x = 0.f;
        if (i < hi) {
            x = rel_prob(z[i], zmax, invT);
            if (!filter && x < minp) x = 0.f;
        }
        e[j] = x;
    }
    int tok = -1;
    cluster_wait();  // every block of the cluster has started
    if (filter) {
        for (int b = threadIdx.x; b < NB; b += THREADS) sh.cnt[b] = 0;
        __syncthreads();
        unsigned ovc = 0;
        float tsum = 0.f;
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            tsum += e[j];
            if (e[j] > 0.f) {
                const int b = bin_of(e[j]);
                if (b == NB - 1) ++ovc;  // the crowded tail bin: no atomics
                else atomicAdd(&sh.cnt[b], 1u);
            }
        }
        ovc = block_sum(ovc, sh.uscratch);
        const float bsum = block_sum(tsum, sh.fscratch);
        if (threadIdx.x == 0) {
            sh.cnt[NB - 1] += ovc;
            cluster.map_shared_rank(sh.part, 0)[rank] = bsum;
        }
        cluster.sync();  // every rank's histogram is complete, rank 0 has every rank's mass
        if (rank == 0) {
            // merge: BPT bins per thread, ranks in order; then prefixes over the bins of counts (exact) and of mass
            // lower bounds (count x the bin's lower edge; doubles in a fixed order)
            constexpr int BPT = NB / THREADS;
            unsigned c[BPT];
            double w[BPT];
            unsigned tc = 0;
            double tw = 0.0;
            for (int q = 0; q < BPT; ++q) {
                const int b = threadIdx.x * BPT + q;
                c[q] = 0;
                for (int r = 0; r < SPLITS; ++r) c[q] += cluster.map_shared_rank(sh.cnt, r)[b];
                const float lower = b == NB - 1 ? 0.f : __uint_as_float(0x3F800000u - ((unsigned)(b + 1) << 17));
                w[q] = (double)c[q] * (double)lower;
                tc += c[q];
                tw += w[q];
            }
            const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
            unsigned ic = tc;
            double iw = tw;
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned nc = __shfl_up_sync(0xffffffffu, ic, o);
                const double nw = __shfl_up_sync(0xffffffffu, iw, o);
                if (lane >= o) { ic += nc; iw += nw; }
            }
            __shared__ unsigned wc[32];
            __shared__ double ww[32];
            if (lane == 31) { wc[warp] = ic; ww[warp] = iw; }
            if (threadIdx.x == 0) {
                // min-p keeps no token past its bin: a bound too, unless top-k's set (whose mass normalizes top-p)
                // reaches past it
                sh.cut = minp > 0.f && topk == 0 ? bin_of(minp) : NB - 1;
                float total = 0.f;
                for (int r = 0; r < SPLITS; ++r) total += sh.part[r];
                sh.total = total;
            }
            __syncthreads();
            unsigned bc = 0;
            double bw = 0.0;
            for (int q = 0; q < warp; ++q) { bc += wc[q]; bw += ww[q]; }
            const double pthr = topp < 1.f ? (double)topp * (double)sh.total : INFINITY;
            unsigned ec = bc + ic - tc;  // count and mass bound before this thread's first bin
            double ew = bw + iw - tw;
            for (int q = 0; q < BPT; ++q) {
                const int b = threadIdx.x * BPT + q;
                const bool k_here = topk > 0 && ec < (unsigned)topk && ec + c[q] >= (unsigned)topk;
                const bool p_here = ew < pthr && ew + w[q] >= pthr;
                if (k_here || p_here) atomicMin(&sh.cut, b);
                ec += c[q];
                ew += w[q];
            }
            __syncthreads();
            ec = bc + ic - tc;
            for (int q = 0; q < BPT; ++q) {
                const int b = threadIdx.x * BPT + q;
                if (b == sh.cut) { sh.n_before = (int)ec; sh.n_cand = (int)(ec + c[q]); }
                ec += c[q];
            }
            __syncthreads();
            broadcast_decision(sh.n_cand <= CAP ? MODE_SORTED
                               : sh.n_cand - sh.n_before <= CAP && ((topk > 0) != (topp < 1.f)) ? MODE_EDGE
                                                                                               : MODE_COARSE,
                               sh, cluster);
        }
        cluster.sync();  // the decision is everywhere; rank 0's counter is zero
        if (sh.mode == MODE_EDGE && topk == 0) refine_edge(e, topp, sh, cluster, rank);
        const int cut = sh.cut, mode = sh.mode;
        if (mode == MODE_COARSE) {
#pragma unroll
            for (int j = 0; j < PER; ++j)
                if (e[j] > 0.f && (bin_of(e[j]) > cut || e[j] < minp)) e[j] = 0.f;
            tok = draw_in_order(e, u, lo, sh, cluster, rank);
        } else {
            SampleShared* root = cluster.map_shared_rank(&sh, 0);
#pragma unroll
            for (int j = 0; j < PER; ++j) {
                const int b = e[j] > 0.f ? bin_of(e[j]) : NB;
                if (mode == MODE_SORTED ? b <= cut : b == cut) {
                    const int i = lo + threadIdx.x + j * THREADS;
                    const int at = atomicAdd(&root->n_cand, 1);
                    root->cand_z[at] = z[i];
                    root->cand_i[at] = i;
                }
            }
            cluster.sync();  // the candidates are in rank 0
            if (rank == 0) sort_candidates(sh, sh.n_cand);
            if (mode == MODE_EDGE) {
                if (rank == 0 && threadIdx.x == 0) {  // how many of the cut bin's tokens the cut keeps, in order
                    const int n = sh.n_cand;
                    int keep = n;
                    if (topk > 0) {
                        keep = max(1, min(n, topk - sh.n_before));
                    } else {  // refine_edge's fixed-point masses: the bin's own tokens in order
                        unsigned long long cum = sh.w_before;
                        for (int a = 0; a < n; ++a) {
                            cum += (unsigned long long)__float2ull_rn(rel_prob(sh.cand_z[a], zmax, invT) * MASS_SCALE);
                            if (cum >= sh.pthr) { keep = a + 1; break; }
                        }
                    }
                    for (int r = 0; r < SPLITS; ++r) {  // an empty cut bin keeps none of its (no) tokens
                        SampleShared* dst = cluster.map_shared_rank(&sh, r);
                        dst->z_last = n > 0 ? sh.cand_z[keep - 1] : INFINITY;
                        dst->id_last = n > 0 ? sh.cand_i[keep - 1] : -1;
                    }
                }
                cluster.sync();  // every rank knows the last kept token of the cut bin
                const float zl = sh.z_last;
                const int il = sh.id_last;
#pragma unroll
                for (int j = 0; j < PER; ++j) {
                    if (e[j] > 0.f) {
                        const int b = bin_of(e[j]), i = lo + threadIdx.x + j * THREADS;
                        bool drop = b > cut || e[j] < minp;
                        if (b == cut && !drop) {
                            const float zi = z[i];
                            drop = zi < zl || (zi == zl && i > il);
                        }
                        if (drop) e[j] = 0.f;
                    }
                }
                tok = draw_in_order(e, u, lo, sh, cluster, rank);
            } else if (rank == 0) {
                const int n = sh.n_cand;
                if (n == 0) {  // nothing kept (NaN logits): the argmax stands
                    if (threadIdx.x == 0) tok = (int)amax;
                } else {
                    double* xs = sh.xs;
                    const double zt = (double)sh.cand_z[0];
                    for (int a = threadIdx.x; a < n; a += THREADS)
                        xs[a] = exp(((double)sh.cand_z[a] - zt) / (double)T);
                    __syncthreads();
                    if (threadIdx.x < 32) {  // the reference's cuts and draw, one warp over the sorted candidates
                        int keep = topk > 0 ? min(n, topk) : n;
                        const double norm = topk > 0 ? warp_prefix_find(xs, keep, 0.0, false).total : (double)sh.total;
                        if (topp < 1.f) {
                            const Found f = warp_prefix_find(xs, keep, (double)topp * norm, false);
                            if (f.index < keep) keep = f.index + 1;
                        }
                        if (minp > 0.f) {
                            int nm = 0;
                            for (int a = threadIdx.x; a < keep; a += 32) nm += xs[a] >= (double)minp;
                            keep = max(1, min(keep, (int)warp_sum(nm)));
                        }
                        const double kept = warp_prefix_find(xs, keep, 0.0, false).total;
                        const Found f = warp_prefix_find(xs, keep, u * kept, true);
                        if (threadIdx.x == 0) tok = sh.cand_i[min(f.index, keep - 1)];
                    }
                }
            }
        }
    } else {
        tok = draw_in_order(e, u, lo, sh, cluster, rank);
    }
    if (tok == -2) tok = rank == 0 && threadIdx.x == 0 ? (int)amax : -1;  // nothing kept: the argmax stands
    if (tok >= 0) {
        next_token[row] = tok;
        ring[(pos + 1) % HIST] = tok;
    }
}
