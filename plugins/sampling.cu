// Device-side sampling inside the captured decode step (runtime-only, not ONNX nodes). The definition is
// toolchain/sampling.py's (penalties -> temperature -> top-k -> top-p -> min-p -> one draw); each slot's parameters
// are PARAM_WORDS int32 words of `params` (sampling.device_params), its penalty window a ring of HIST token ids
// (entry p % HIST holds the token at position p), so one captured graph serves a batch of requests with different
// settings. Only the step's rows rows[0..n) are sampled (the others are prompt tokens whose logits nobody needs):
// row r samples from logits row r, for slot slots[r], at position positions[r].
//
//     apply_penalties(const int* rows, const int* slots, const int* params, const int* history, int n, int vocab,
//                     float* logits)
//         grid (n), block (HIST): before the draw; rows whose slot has no penalty return at once.
//     sample_tokens(const float* logits, const int* rows, const int* slots, const int* positions, const int* params,
//                   int n, int vocab, long long* next_token, int* history)
//         grid (SPLITS, n), block (THREADS), a compile-time cluster of SPLITS along x: in place of the step's argmax
//         kernel, it takes each row's argmax itself (plugins/argmax.cu's order: numpy's) on its way. Greedy rows
//         (temperature 0) write it; sampled rows write a draw; every row writes its token into its slot's ring at
//         position + 1.
//     token_logprobs(...): after the draw, where a request asks (below).
//
// Measured on the H100 (scripts/sampler_phases.py, bench/results/device-2026-12-05c): the phases are latency, not
// bandwidth (a row is 600 KB): each cluster barrier ~0.7 us, each round of reads of other blocks' shared memory
// ~1 us, a cold code path's first pass too; hence one barrier before the decision and one after the gather, the
// decision made alike in every block (no broadcast) from super-bin sums, and small candidate sets sorted and drawn
// by one warp with shuffles.
//
// sample_tokens holds a row's logits in registers (PER per thread, vocab <= SPLITS * THREADS * PER) as
// x = exp((z - zmax) / T), the probability relative to the most likely token, and:
// - without top-k and top-p (temperature and min-p): an inverse-CDF draw over the kept tokens in a fixed order
//   (rank, thread, element): the exact distribution, no sort. Sums in a fixed tree: the same bits on every run.
// - with top-k or top-p: a histogram of counts of x over NB bins (64 per factor of 2, by the float's bits: exactly
//   monotone), merged over the cluster, gives the bin where the top-k count is reached (with top-k: top-p then
//   applies within that set, whose mass normalizes it, as in the reference) or a lower bound of the top-p mass
//   (top-p alone: count x the bin's lower edge, against top_p x the exact sum of x; both make a superset). Then:
//   SORTED: the tokens up to that bin, at most CAP, are gathered in rank 0, sorted by (logit descending, id
//   ascending) as the reference orders them, and the reference's cuts and draw run on them in double (the same
//   token as the reference for the same uniform).
//   EDGE (more than CAP tokens up to the bin, at most CAP in it, top-k or top-p alone): only the cut bin's tokens
//   are sorted, to find the last kept one exactly (top-p: from the exact mass before the bin); the draw is then in
//   the fixed order over the exact kept set.
//   COARSE (more than CAP tokens in the cut bin itself: a flat distribution, or top-k and top-p together over
//   thousands of tokens): the draw is over every token up to and including the bin, the edge resolved to 1/64 of
//   a factor of 2 (documented approximation).
// - before any of that, a row whose argmax alone reaches top_p (1 / sum(x) >= top_p, with a margin: the common
//   case in code) or with top-k 1 takes the argmax, decided after the first cluster barrier (no histogram).
// The draw's uniform is Philox4x64-10(key = seed, counter = (position + 1, 0, 0, 0)), word 0 >> 11, times 2^-53:
// numpy's Generator(Philox(key=seed, counter=position)).random() (toolchain/sampling.py).
#include <cooperative_groups.h>
#include <stdint.h>

#include "argmax_order.cuh"
#include "cluster_push.cuh"
#include "pdl.cuh"

namespace cg = cooperative_groups;

// -DSAMPLER_TRACE=1 (scripts/sampler_phases.py): rank 0 of row 0 stamps clock64() at each phase into sampler_trace,
// with the mode and candidate count at the end; compiled out otherwise.
#ifdef SAMPLER_TRACE
__device__ long long sampler_trace[16];
#define TRACE(i) \
    if (rank == 0 && blockIdx.y == 0 && threadIdx.x == 0) sampler_trace[i] = clock64()
#define TRACE_VALUE(i, v) \
    if (rank == 0 && blockIdx.y == 0 && threadIdx.x == 0) sampler_trace[i] = (v)
#else
#define TRACE(i)
#define TRACE_VALUE(i, v)
#endif

constexpr int SPLITS = 8, THREADS = 1024, PER = 20, NB = 2048, CAP = 2048, HIST = 64, WORDS = 12;
// how the kept set is found: all candidates sorted in rank 0 / only the cut bin's tokens sorted (one of top-k, top-p,
// more than CAP tokens before it) / the whole cut bin kept (the coarse edge)
constexpr int MODE_SORTED = 0, MODE_EDGE = 1, MODE_COARSE = 2;
constexpr int SUPER = 32, NS = NB / SUPER;  // the cut's search: super-bins of 32 bins (half a factor of 2 each)

// x = exp((z - zmax) / T) in [0, 1]; NaN (a NaN logit or maximum) gives 0: never drawn (fminf alone would make it 1)
__device__ __forceinline__ float rel_prob(float z, float zmax, float invT) {
    const float x = __expf((z - zmax) * invT);
    return x > 0.f ? fminf(x, 1.f) : 0.f;
}
constexpr float MASS_SCALE = 1099511627776.0f;  // 2^40: the fixed-point masses of the edge refinement

__device__ __forceinline__ float word_f(const int* p, int i) { return __int_as_float(p[i]); }

// A block's share of a row: [lo, hi), lo a multiple of 4; its element j (of PER) in this thread is
// lo + 4 (threadIdx.x + (j / 4) THREADS) + j % 4, so each thread reads its elements as PER / 4 float4 loads, all in
// flight at once (20 scalar loads were not: their latency came one after another, ~5 us of a draw).
static_assert(PER % 4 == 0, "float4 groups");
__device__ __forceinline__ int row_chunk(int vocab) { return ((vocab + SPLITS - 1) / SPLITS + 3) & ~3; }
__device__ __forceinline__ int elem(int lo, int j) { return lo + 4 * ((int)threadIdx.x + (j >> 2) * THREADS) + (j & 3); }

// the share's logits into e[] (-inf past hi): float4 loads where the row allows (vocab a multiple of 4: every
// group aligned), else guarded scalar loads
__device__ __forceinline__ void load_share(const float* z, int lo, int hi, int vocab, float (&e)[PER]) {
    if ((vocab & 3) == 0) {  // hi is then a multiple of 4 too: a group is all in or all out
#pragma unroll
        for (int g = 0; g < PER / 4; ++g) {
            const int i = elem(lo, 4 * g);
            const float4 v = i < hi ? *reinterpret_cast<const float4*>(z + i)
                                    : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
            e[4 * g] = v.x; e[4 * g + 1] = v.y; e[4 * g + 2] = v.z; e[4 * g + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int j = 0; j < PER; ++j) e[j] = elem(lo, j) < hi ? z[elem(lo, j)] : -INFINITY;
    }
}

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

// the first a < n whose inclusive prefix sum of xs passes the threshold (n if none), and the sum of xs[0, n)
template <typename T>
struct Found {
    int index;
    T total;
};

// One warp (lanes 0-31 all call it): lane l sums its contiguous share of xs[0, n), the shares' prefixes by a warp
// scan, then each lane walks its share. Passing: sum >= thr, or sum > thr with strict (numpy searchsorted right).
template <typename T>
__device__ __noinline__ Found<T> warp_prefix_find(const T* xs, int n, T thr, bool strict) {
    const int lane = threadIdx.x & 31, seg = (n + 31) / 32;
    const int a0 = min(n, lane * seg), a1 = min(n, a0 + seg);
    T s = 0;
    for (int a = a0; a < a1; ++a) s += xs[a];
    T incl = s;
    for (int o = 1; o < 32; o <<= 1) {
        const T v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
    }
    const T total = __shfl_sync(0xffffffffu, incl, 31);
    T c = incl - s;
    unsigned found = (unsigned)n;
    for (int a = a0; a < a1; ++a) {
        c += xs[a];
        if (strict ? c > thr : c >= thr) { found = (unsigned)a; break; }
    }
    return {(int)__reduce_min_sync(0xffffffffu, found), total};
}

// inclusive prefixes over a warp's lanes of a count and a mass, in lane order (the same bits in every rank)
template <typename M>
__device__ __forceinline__ void warp_scan2(unsigned& c, M& w) {
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned nc = __shfl_up_sync(0xffffffffu, c, o);
        const M nw = __shfl_up_sync(0xffffffffu, w, o);
        if ((int)(threadIdx.x & 31) >= o) { c += nc; w += nw; }
    }
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
    unsigned cnt[NB];         // the histogram of counts (each rank's own)
    unsigned sup_c[NS];       // its super-bins' counts and lower-bound masses (summarize_bins)
    double sup_w[NS];
    unsigned long long sup_m[NS], rest_m;  // refine_edge: its super-bins' exact masses, its mass past the old cut
    float cand_z[CAP];        // rank 0: the candidates (logit, id), gathered from every rank, sorted in place
    int cand_i[CAP];
    double xs[CAP];           // rank 0: the sorted candidates' relative probabilities (also: sort and refine scratch)
    float part[SPLITS];       // every rank's sum of x (exact masses, all-gathered in rank order)
    float dpart[SPLITS];      // draw_in_order's: every rank's kept mass
    float arg_v[SPLITS];      // sample_tokens: every rank's argmax (value, index)
    int arg_i[SPLITS];
    float mass[SPLITS];       // and, where top-p may keep the argmax alone, its sum of exp((z - that max) / T)
    float fscratch[32];
    unsigned uscratch[32];
    float sscratch[32];       // the warps' sums of exp((z - the warp's max) / T) (the peaked rows' test)
    unsigned long long uscan[32];
    int gathered;             // rank 0: the gather's counter (zeroed before the first cluster barrier)
    int gathered_cut;         // token_logprobs, rank 0: the cut bin's own tokens, placed after those before it
    int cut, n_before, n_cut; // the histogram's decision, made alike in every rank: the cut bin, tokens before it
    unsigned long long w_before, pthr;  // the edge refinement: their fixed-point mass; top_p x the total's
    float z_last;             // mode EDGE: the last kept token of the cut bin (logit, id), in every rank
    int id_last;
    int owner, first;         // draw_in_order's chosen thread
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
    if (threadIdx.x < SPLITS) cluster.map_shared_rank(sh.dpart, threadIdx.x)[rank] = bsum;
    if (threadIdx.x == 0) { sh.owner = -1; sh.first = THREADS; }
    cluster.sync();
    float total = 0.f;
    int last = -1;
    for (int r = 0; r < SPLITS; ++r) {
        total += sh.dpart[r];
        if (sh.dpart[r] > 0.f) last = r;
    }
    if (last < 0) return -2;
    const float target = (float)(u * (double)total);
    int b = last;
    float acc = 0.f;
    for (int r = 0; r < SPLITS; ++r) {
        if (sh.dpart[r] > 0.f && target < acc + sh.dpart[r]) { b = r; break; }
        acc += sh.dpart[r];
    }
    if ((int)rank != b) return -1;
    float before = 0.f;  // the chosen block's start, summed in the same order
    for (int r = 0; r < b; ++r) before += sh.dpart[r];
    const float tl = target - before;
    const float excl = block_exclusive_scan(tsum, sh.fscratch);
    // exactly one owner, whatever the scan's rounding: the last thread with mass whose range starts at or below the
    // target (else the first thread with mass)
    if (tsum > 0.f && tl >= excl) atomicMax(&sh.owner, (int)threadIdx.x);
    if (tsum > 0.f) atomicMin(&sh.first, (int)threadIdx.x);
    __syncthreads();
    if ((int)threadIdx.x != (sh.owner >= 0 ? sh.owner : sh.first)) return -1;
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
    return elem(lo, pick);
}

// A bin's lower edge of x (the tail bin's: 0)
__device__ __forceinline__ double lower_edge(int b) {
    return b == NB - 1 ? 0.0 : (double)__uint_as_float(0x3F800000u - ((unsigned)(b + 1) << 17));
}

// Every thread, once this rank's histogram is complete (after a __syncthreads): `tail` (thread THREADS - 1's, the
// tail bin's count kept out of the atomics) into the tail bin, and this rank's super-bin sums (count, lower-bound
// mass: count x the bin's lower edge) for the other ranks to read after the next cluster barrier.
__device__ void summarize_bins(SampleShared& sh, unsigned tail) {
    static_assert(NB == 2 * THREADS && SUPER == 32, "thread t holds bins 2t, 2t + 1; 16 threads a super-bin");
    const int t = threadIdx.x;
    if (t == THREADS - 1) sh.cnt[NB - 1] += tail;
    const unsigned c0 = sh.cnt[2 * t], c1 = sh.cnt[2 * t + 1];
    unsigned c = c0 + c1;
    double w = (double)c0 * lower_edge(2 * t) + (double)c1 * lower_edge(2 * t + 1);
    for (int o = 8; o > 0; o >>= 1) {
        c += __shfl_xor_sync(0xffffffffu, c, o);
        w += __shfl_xor_sync(0xffffffffu, w, o);
    }
    if ((t & 15) == 0) { sh.sup_c[t >> 4] = c; sh.sup_w[t >> 4] = w; }
}

// The cut bin, in every rank alike (the same sums of the same values in the same order, so nothing is broadcast):
// where the top-k count or a lower bound of the top-p mass (count x the bin's lower edge, against top_p x the exact
// total: both make a superset) is reached, or min-p's bin. Two levels, one warp, little traffic between the blocks:
// the super-bins' sums over the ranks pick the super-bin of the cut, then its 32 bins over the ranks the bin. Sets
// sh.cut, sh.n_before (tokens in the bins before it), sh.n_cut (in it); a __syncthreads publishes them.
__device__ void decide_cut(SampleShared& sh, cg::cluster_group& cluster, int topk, float topp, float minp,
                           float total) {
    if (threadIdx.x < 32) {
        constexpr unsigned FULL = 0xffffffffu;
        const int lane = threadIdx.x;
        const double pthr = topp < 1.f ? (double)topp * (double)total : INFINITY;
        const int cap = minp > 0.f && topk == 0 ? bin_of(minp) : NB - 1;  // min-p keeps no token past its bin
        unsigned c[2] = {0, 0};                                           // (unless top-k's set normalizes top-p)
        double w[2] = {0.0, 0.0};
        for (int r = 0; r < SPLITS; ++r) {  // super-bins 2 lane, 2 lane + 1, ranks in order
            const unsigned* rc = cluster.map_shared_rank(sh.sup_c, r);
            const double* rw = cluster.map_shared_rank(sh.sup_w, r);
            for (int q = 0; q < 2; ++q) { c[q] += rc[2 * lane + q]; w[q] += rw[2 * lane + q]; }
        }
        const unsigned tc = c[0] + c[1];
        const double tw = w[0] + w[1];
        unsigned ic = tc;
        double iw = tw;
        warp_scan2(ic, iw);
        unsigned ec = ic - tc;  // before this lane's first super-bin
        double ew = iw - tw;
        int found = NS;
        for (int q = 0; q < 2; ++q) {
            const bool k_here = topk > 0 && ec < (unsigned)topk && ec + c[q] >= (unsigned)topk;
            const bool p_here = ew < pthr && ew + w[q] >= pthr;
            if ((k_here || p_here) && found == NS) found = 2 * lane + q;
            if (found == NS) { ec += c[q]; ew += w[q]; }  // (at found: the sums before it)
        }
        const int s_kp = (int)__reduce_min_sync(FULL, (unsigned)found);
        const int S = min(s_kp, cap / SUPER);
        // the count and mass before super-bin S, from the lane that holds it
        unsigned bc = ic - tc;
        double bw = iw - tw;
        if (S == 2 * lane + 1) { bc += c[0]; bw += w[0]; }
        bc = __shfl_sync(FULL, bc, S >> 1);
        bw = __shfl_sync(FULL, bw, S >> 1);
        // its 32 bins, one a lane, over the ranks
        const int b = S * SUPER + lane;
        unsigned fc = 0;
        for (int r = 0; r < SPLITS; ++r) fc += cluster.map_shared_rank(sh.cnt, r)[b];
        const double fw = (double)fc * lower_edge(b);
        unsigned fic = fc;
        double fiw = fw;
        warp_scan2(fic, fiw);
        const unsigned fec = bc + fic - fc;
        const double few = bw + fiw - fw;
        const bool here = (topk > 0 && fec < (unsigned)topk && fec + fc >= (unsigned)topk) ||
                          (few < pthr && few + fw >= pthr);
        const unsigned hits = __ballot_sync(FULL, here);
        // none here although the super-bin reached it (another summation order): its last bin, a valid cut too
        const int fine = hits ? S * SUPER + __ffs(hits) - 1 : S == s_kp ? S * SUPER + SUPER - 1 : NB;
        const int cut = min(fine, cap);  // always in S
        if (lane == cut - S * SUPER) { sh.cut = cut; sh.n_before = (int)fec; sh.n_cut = (int)fc; }
    }
    __syncthreads();
}

// Edge mode with top-p: the lower-bound masses put the cut bin at or after the true one. Recount the masses exactly
// (fixed point, 2^-40 per unit of x: order-independent sums) and find, in every rank alike, the true cut bin, the
// tokens and mass before it; the caller then checks its own tokens fit the sort (else the coarse edge). Rare: a
// nucleus of more than CAP tokens. Only bins up to the old cut get 64-bit shared atomics (the rest only counts in
// the whole mass), and the search is decide_cut's two levels over exact masses: one warp, little traffic.
__device__ void refine_edge(const float (&e)[PER], float topp, SampleShared& sh, cg::cluster_group& cluster) {
    unsigned long long* mass = reinterpret_cast<unsigned long long*>(sh.xs);  // NB of them (xs: CAP doubles)
    const int old_cut = sh.cut;
    for (int b = threadIdx.x; b < NB; b += THREADS) mass[b] = 0;
    __syncthreads();
    unsigned long long rest = 0;  // past the old cut: the whole mass needs it, no bin does
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        if (e[j] > 0.f) {
            const int b = bin_of(e[j]);
            const unsigned long long w = (unsigned long long)__float2ull_rn(e[j] * MASS_SCALE);
            if (b > old_cut) rest += w;
            else atomicAdd(&mass[b], w);
        }
    }
    rest = block_sum(rest, sh.uscan);  // (its barriers: the atomics are complete)
    {
        const int t = threadIdx.x;  // this rank's super-bin masses, as summarize_bins' counts
        unsigned long long m = mass[2 * t] + mass[2 * t + 1];
        for (int o = 8; o > 0; o >>= 1) m += __shfl_xor_sync(0xffffffffu, m, o);
        if ((t & 15) == 0) sh.sup_m[t >> 4] = m;
        if (t == 0) sh.rest_m = rest;
    }
    cluster.sync();  // every rank's masses are complete
    if (threadIdx.x < 32) {
        constexpr unsigned FULL = 0xffffffffu;
        const int lane = threadIdx.x;
        unsigned c[2] = {0, 0};
        unsigned long long w[2] = {0, 0}, all = 0;
        for (int r = 0; r < SPLITS; ++r) {
            const unsigned* rc = cluster.map_shared_rank(sh.sup_c, r);
            const unsigned long long* rw = cluster.map_shared_rank(sh.sup_m, r);
            for (int q = 0; q < 2; ++q) { c[q] += rc[2 * lane + q]; w[q] += rw[2 * lane + q]; }
            if (lane == 0) all += cluster.map_shared_rank(&sh, r)->rest_m;
        }
        const unsigned tc = c[0] + c[1];
        const unsigned long long tw = w[0] + w[1];
        unsigned ic = tc;
        unsigned long long iw = tw;
        warp_scan2(ic, iw);
        all = __shfl_sync(FULL, all, 0) + __shfl_sync(FULL, iw, 31);
        const unsigned long long pthr = (unsigned long long)((double)topp * (double)all);
        unsigned long long ew = iw - tw;
        int found = NS;
        for (int q = 0; q < 2; ++q) {
            if (found == NS && ew < pthr && ew + w[q] >= pthr) found = 2 * lane + q;
            if (found == NS) ew += w[q];
        }
        const int S = min((int)__reduce_min_sync(FULL, (unsigned)found), old_cut / SUPER);
        unsigned bc = ic - tc;
        unsigned long long bw = iw - tw;
        if (S == 2 * lane + 1) { bc += c[0]; bw += w[0]; }
        bc = __shfl_sync(FULL, bc, S >> 1);
        bw = __shfl_sync(FULL, bw, S >> 1);
        const int b = S * SUPER + lane;
        unsigned fc = 0;
        unsigned long long fw = 0;
        for (int r = 0; r < SPLITS; ++r) {
            fc += cluster.map_shared_rank(sh.cnt, r)[b];
            fw += cluster.map_shared_rank(mass, r)[b];
        }
        unsigned fic = fc;
        unsigned long long fiw = fw;
        warp_scan2(fic, fiw);
        const unsigned fec = bc + fic - fc;
        const unsigned long long few = bw + fiw - fw;
        const unsigned hits = __ballot_sync(FULL, b <= old_cut && few < pthr && few + fw >= pthr);
        const int cut = hits ? S * SUPER + __ffs(hits) - 1 : old_cut;  // exact sums: no hit only in old_cut's super
        if (lane == cut - S * SUPER) {
            sh.cut = cut;
            sh.n_before = (int)fec;
            sh.n_cut = (int)fc;
            sh.w_before = few;
            sh.pthr = pthr;
        }
    }
    __syncthreads();
}

__device__ __forceinline__ bool comes_first(float za, int ia, float zb, int ib) {
    return za > zb || (za == zb && ia < ib);
}

__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Rank 0, every thread: sort its n gathered candidates in place, first the larger logit, then the smaller id (the
// reference's order); a __syncthreads follows in the caller. Up to THREADS candidates: a bitonic sort in registers,
// one element per thread of the first P = max(32, pow2 >= n) threads, strides under 32 by shuffles, the others
// through shared memory (double-buffered: one barrier of the P threads per stage). More: the same network over
// shared memory by the whole block.
__device__ void sort_candidates(SampleShared& sh, int n) {
    if (n <= 1) return;
    int P = 32;
    while (P < n) P <<= 1;
    if (P <= THREADS) {
        const int t = threadIdx.x;
        if (t >= P) return;
        float zk = t < n ? sh.cand_z[t] : -INFINITY;
        int ik = t < n ? sh.cand_i[t] : 0x7fffffff;
        float* const alt_z = reinterpret_cast<float*>(sh.xs);
        int* const alt_i = reinterpret_cast<int*>(sh.xs) + THREADS;
        bool buf = false;
        for (int size = 2; size <= P; size <<= 1) {
            for (int stride = size >> 1; stride > 0; stride >>= 1) {
                float zo;
                int io;
                if (stride >= 32) {
                    float* const wz = buf ? alt_z : sh.cand_z;
                    int* const wi = buf ? alt_i : sh.cand_i;
                    wz[t] = zk;
                    wi[t] = ik;
                    named_barrier(1, P);
                    zo = wz[t ^ stride];
                    io = wi[t ^ stride];
                    buf = !buf;  // the next stage writes the other buffer: this one's reads are done by the stage after
                } else {
                    zo = __shfl_xor_sync(0xffffffffu, zk, stride);
                    io = __shfl_xor_sync(0xffffffffu, ik, stride);
                }
                const bool up = (t & size) == 0, lower = (t & stride) == 0;
                const bool mine_first = comes_first(zk, ik, zo, io);
                if (mine_first != (lower == up)) { zk = zo; ik = io; }
            }
        }
        if (P > 32) named_barrier(1, P);  // every exchange read before the results overwrite buffer 0
        if (t < n) { sh.cand_z[t] = zk; sh.cand_i[t] = ik; }
        return;
    }
    for (int a = n + threadIdx.x; a < P; a += THREADS) { sh.cand_z[a] = -INFINITY; sh.cand_i[a] = 0x7fffffff; }
    __syncthreads();
    for (int size = 2; size <= P; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int a = threadIdx.x; a < P; a += THREADS) {
                const int b = a ^ stride;
                if (b > a) {
                    const float za = sh.cand_z[a], zb = sh.cand_z[b];
                    const int ia = sh.cand_i[a], ib = sh.cand_i[b];
                    if ((a & size) == 0 != comes_first(za, ia, zb, ib)) {
                        sh.cand_z[a] = zb; sh.cand_z[b] = za;
                        sh.cand_i[a] = ib; sh.cand_i[b] = ia;
                    }
                }
            }
            __syncthreads();
        }
    }
}

// Rank 0, the sorted candidates (SORTED mode): the reference's cuts and draw in double, one warp; thread 0 returns
// the token, the others -1.
__device__ int reference_draw(SampleShared& sh, int n, int topk, float topp, float minp, float T, double u,
                              float total) {
    if (n <= 32) {  // (the common case) one candidate a lane: shuffles only
        if (threadIdx.x >= 32) return -1;
        constexpr unsigned FULL = 0xffffffffu;
        const int lane = threadIdx.x;
        const double x = lane < n ? exp(((double)sh.cand_z[lane] - (double)sh.cand_z[0]) / (double)T) : 0.0;
        auto scan = [&](double v) {  // inclusive prefix over the lanes
            for (int o = 1; o < 32; o <<= 1) {
                const double t = __shfl_up_sync(FULL, v, o);
                if (lane >= o) v += t;
            }
            return v;
        };
        auto first = [&](bool pass) { const unsigned b = __ballot_sync(FULL, pass); return b ? __ffs(b) - 1 : 32; };
        int keep = topk > 0 ? min(n, topk) : n;
        const double norm = topk > 0 ? __shfl_sync(FULL, scan(lane < keep ? x : 0.0), 31) : (double)total;
        if (topp < 1.f) {
            const double c = scan(lane < keep ? x : 0.0);  // (every lane shuffles: not inside a condition)
            const int f = first(lane < keep && c >= (double)topp * norm);
            if (f < keep) keep = f + 1;
        }
        if (minp > 0.f) keep = max(1, min(keep, (int)__popc(__ballot_sync(FULL, lane < keep && x >= (double)minp))));
        const double c = scan(lane < keep ? x : 0.0);
        const double kept = __shfl_sync(FULL, c, 31);
        const int f = first(lane < keep && c > u * kept);
        return lane == 0 ? sh.cand_i[min(f, keep - 1)] : -1;
    }
    double* xs = sh.xs;
    const double zt = (double)sh.cand_z[0];
    for (int a = threadIdx.x; a < n; a += THREADS) xs[a] = exp(((double)sh.cand_z[a] - zt) / (double)T);
    __syncthreads();
    if (threadIdx.x >= 32) return -1;
    int keep = topk > 0 ? min(n, topk) : n;
    const double norm = topk > 0 ? warp_prefix_find(xs, keep, 0.0, false).total : (double)total;
    if (topp < 1.f) {
        const Found<double> f = warp_prefix_find(xs, keep, (double)topp * norm, false);
        if (f.index < keep) keep = f.index + 1;
    }
    if (minp > 0.f) {
        int nm = 0;
        for (int a = threadIdx.x; a < keep; a += 32) nm += xs[a] >= (double)minp;
        keep = max(1, min(keep, (int)warp_sum(nm)));
    }
    const double kept = warp_prefix_find(xs, keep, 0.0, false).total;
    const Found<double> f = warp_prefix_find(xs, keep, u * kept, true);
    return threadIdx.x == 0 ? sh.cand_i[min(f.index, keep - 1)] : -1;
}

// Rank 0, the cut bin's candidates sorted (EDGE mode): the last token the cut keeps, into every rank.
__device__ void edge_last_kept(SampleShared& sh, int n, int topk, float zmax, float invT, cg::cluster_group& cluster) {
    int keep = n;
    if (topk > 0) {
        keep = max(1, min(n, topk - sh.n_before));
    } else {  // refine_edge's fixed-point masses of the bin's own tokens, in order, from the mass before the bin
        unsigned long long* w = reinterpret_cast<unsigned long long*>(sh.xs);
        for (int a = threadIdx.x; a < n; a += THREADS)
            w[a] = (unsigned long long)__float2ull_rn(rel_prob(sh.cand_z[a], zmax, invT) * MASS_SCALE);
        __syncthreads();
        if (threadIdx.x < 32) {
            const unsigned long long thr = sh.pthr > sh.w_before ? sh.pthr - sh.w_before : 0ull;
            const Found<unsigned long long> f = warp_prefix_find(w, n, thr, false);
            if (f.index < n) keep = f.index + 1;
        }
    }
    if (threadIdx.x == 0)
        for (int r = 0; r < SPLITS; ++r) {  // an empty cut bin keeps none of its (no) tokens
            SampleShared* dst = cluster.map_shared_rank(&sh, r);
            dst->z_last = n > 0 ? sh.cand_z[keep - 1] : INFINITY;
            dst->id_last = n > 0 ? sh.cand_i[keep - 1] : -1;
        }
}

extern "C" __global__ void __cluster_dims__(SPLITS, 1, 1) __launch_bounds__(THREADS, 1)
sample_tokens(const float* logits, const int* rows, const int* slots, const int* positions, const int* params, int n,
              int vocab, long long* next_token, int* history) {
    __shared__ SampleShared sh;
    cg::cluster_group cluster = cg::this_cluster();
    const unsigned rank = cluster.block_rank();
    pdl_launch_dependents();
    // rows, slots and params are the host's, written before the step and by no kernel: read before the wait
    const int row = rows[blockIdx.y], slot = slots[row];
    const int* P = params + (size_t)slot * WORDS;
    const float T = word_f(P, 0);
    int* ring = history + (size_t)slot * HIST;
    cluster_arrive_relaxed();  // (waited for before the first access to another block's shared memory)
    const int topk = P[1];
    const float topp = word_f(P, 2), minp = word_f(P, 3), invT = 1.f / T;
    const uint64_t seed = (uint64_t)(unsigned)P[8] | ((uint64_t)(unsigned)P[9] << 32);
    const bool filter = topk > 0 || topp < 1.f;
    const int lo = rank * row_chunk(vocab), hi = min(vocab, lo + row_chunk(vocab));
    if (T > 0.f && filter) {  // this block's own shared memory: before the wait too
        for (int b = threadIdx.x; b < NB; b += THREADS) sh.cnt[b] = 0;
        if (threadIdx.x == 0) sh.gathered = 0;
        __syncthreads();
    }
    pdl_wait();
    TRACE(0);
    const float* z = logits + (size_t)row * vocab;
    float e[PER];
    float bv = -INFINITY;  // this thread's argmax (numpy's: the first maximum, a NaN above all)
    int bi = 0x7fffffff;
    load_share(z, lo, hi, vocab, e);
#pragma unroll
    for (int j = 0; j < PER; ++j)
        if (elem(lo, j) < hi) take(e[j], elem(lo, j), bv, bi);
    // Peaked rows (code: most tokens) keep only the argmax under top-p: when its probability 1 / sum(x) reaches
    // top_p, the reference's nucleus is that token alone, whatever else top-k and min-p say. The sum rides along
    // the argmax's reduction: each warp sums exp((z - the warp's max) / T), the block and then the cluster rescale
    // those sums to their maxima, so such a row is decided after the first cluster barrier, with no histogram.
    const bool may_peak = T > 0.f && topp < 1.f;
    const int pos = positions[row];
    // the row's argmax over the cluster: warps, the block (warp 0), then every rank's pair into every rank
    for (int o = 16; o > 0; o >>= 1)
        take(__shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o), bv, bi);
    float ws = 0.f;  // (a NaN maximum makes it NaN: never the shortcut)
    if (may_peak && bv > -INFINITY) {
#pragma unroll
        for (int j = 0; j < PER; ++j) ws += __expf((e[j] - bv) * invT);
        ws = warp_sum(ws);
    }
    if ((threadIdx.x & 31) == 0) {
        const int w = threadIdx.x >> 5;
        sh.fscratch[w] = bv; sh.uscratch[w] = bi; sh.sscratch[w] = ws;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        bv = sh.fscratch[threadIdx.x];
        bi = (int)sh.uscratch[threadIdx.x];
        const float wmax = bv;
        for (int o = 16; o > 0; o >>= 1)
            take(__shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o), bv, bi);
        if (may_peak) {
            ws = sh.sscratch[threadIdx.x];
            ws = warp_sum(ws > 0.f ? ws * __expf((wmax - bv) * invT) : ws);
        }
    }
    cluster_wait();  // every block of the cluster has started
    if (threadIdx.x < SPLITS) {
        SampleShared* dst = cluster.map_shared_rank(&sh, threadIdx.x);
        dst->arg_v[rank] = bv;
        dst->arg_i[rank] = bi;
        dst->mass[rank] = ws;
    }
    cluster.sync();  // every rank's pair everywhere
    float zmax = sh.arg_v[0];
    int amax = sh.arg_i[0];
    for (int r = 1; r < SPLITS; ++r) take(sh.arg_v[r], sh.arg_i[r], zmax, amax);  // rank order, as the ranges
    bool alone = !(T > 0.f) || topk == 1;  // greedy, or top-k 1: the argmax (of the penalized logits)
    if (may_peak && !alone) {
        float sum = 0.f;
        for (int r = 0; r < SPLITS; ++r)
            sum += sh.mass[r] > 0.f ? sh.mass[r] * __expf((sh.arg_v[r] - zmax) * invT) : sh.mass[r];
        // the full path keeps the argmax alone when 1 >= top_p x (its own float sum of x); this sum rounds
        // differently (~1e-6 relative), so only a clear margin decides here (a NaN sum never does)
        alone = (double)topp * (double)sum * (1.0 + 1e-4) <= 1.0;
    }
    if (alone) {
        if (rank == 0 && threadIdx.x == 0) {
            next_token[row] = amax;
            ring[(pos + 1) % HIST] = amax;
        }
        TRACE(1);
        TRACE_VALUE(14, 2);
        return;
    }
    const double u = philox_uniform(seed, (uint64_t)pos);
#pragma unroll
    for (int j = 0; j < PER; ++j) {  // x = exp((z - zmax) / T); -inf (past the vocabulary) and NaN give 0
        float x = rel_prob(e[j], zmax, invT);
        if (!filter && x < minp) x = 0.f;
        e[j] = x;
    }
    int tok = -1;
    bool in_order = true;  // the draw over e[] in (rank, thread, element) order, else rank 0's reference draw
    TRACE(1);
    if (filter) {
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
        ovc = warp_sum(ovc);  // both block sums behind one pair of barriers
        tsum = warp_sum(tsum);
        __syncthreads();
        if ((threadIdx.x & 31) == 0) { sh.uscratch[threadIdx.x >> 5] = ovc; sh.fscratch[threadIdx.x >> 5] = tsum; }
        __syncthreads();
        if (threadIdx.x < SPLITS) {  // every rank's mass into every rank, in rank order
            float bsum = 0.f;
            for (int w = 0; w < THREADS / 32; ++w) bsum += sh.fscratch[w];
            cluster.map_shared_rank(sh.part, threadIdx.x)[rank] = bsum;
        }
        unsigned tail = 0;
        if (threadIdx.x == THREADS - 1)
            for (int w = 0; w < THREADS / 32; ++w) tail += sh.uscratch[w];
        summarize_bins(sh, tail);
        TRACE(3);
        cluster.sync();  // every rank's histogram and mass are complete
        TRACE(4);
        float total = 0.f;
        for (int r = 0; r < SPLITS; ++r) total += sh.part[r];
        // with top-k, top-p is taken within the top-k set (its mass normalizes it: reference_draw), so the cut is
        // the k-th token's: the whole set is gathered (a cut by top_p x the whole vocabulary's mass could come
        // first and leave part of the set out, its mass then too small)
        decide_cut(sh, cluster, topk, topk > 0 ? 1.f : topp, minp, total);
        const int n_cand = sh.n_before + sh.n_cut;
        int mode = n_cand <= CAP ? MODE_SORTED
                   : sh.n_cut <= CAP && ((topk > 0) != (topp < 1.f)) ? MODE_EDGE : MODE_COARSE;
        if (mode == MODE_COARSE && topk > 0 && topp < 1.f) {  // the coarse edge: bounded by top-p over the whole
            __syncthreads();                                 // vocabulary too (the documented approximation)
            decide_cut(sh, cluster, topk, topp, minp, total);
        }
        TRACE(5);
        if (mode == MODE_EDGE && topk == 0) {
            refine_edge(e, topp, sh, cluster);
            if (sh.n_cut > CAP) mode = MODE_COARSE;
        }
        TRACE(6);
        const int cut = sh.cut;
        if (mode == MODE_COARSE) {
#pragma unroll
            for (int j = 0; j < PER; ++j)
                if (e[j] > 0.f && (bin_of(e[j]) > cut || e[j] < minp)) e[j] = 0.f;
        } else {
            SampleShared* root = cluster.map_shared_rank(&sh, 0);
#pragma unroll
            for (int j = 0; j < PER; ++j) {
                const int b = e[j] > 0.f ? bin_of(e[j]) : NB;
                if (mode == MODE_SORTED ? b <= cut : b == cut) {
                    const int i = elem(lo, j);
                    const int at = atomicAdd(&root->gathered, 1);
                    root->cand_z[at] = z[i];
                    root->cand_i[at] = i;
                }
            }
            cluster.sync();  // the candidates are in rank 0; no rank reads another's histogram any more
            TRACE(7);
            if (rank == 0) sort_candidates(sh, sh.gathered);
            __syncthreads();
            TRACE(8);
            if (mode == MODE_SORTED) {
                in_order = false;
                if (rank == 0) {
                    tok = sh.gathered == 0 ? (threadIdx.x == 0 ? (int)amax : -1)  // nothing kept (NaN logits)
                                           : reference_draw(sh, sh.gathered, topk, topp, minp, T, u, total);
                }
            } else {
                if (rank == 0) edge_last_kept(sh, sh.gathered, topk, zmax, invT, cluster);
                cluster.sync();  // every rank knows the last kept token of the cut bin
                const float zl = sh.z_last;
                const int il = sh.id_last;
#pragma unroll
                for (int j = 0; j < PER; ++j) {
                    if (e[j] > 0.f) {
                        const int b = bin_of(e[j]), i = elem(lo, j);
                        bool drop = b > cut || e[j] < minp;
                        if (b == cut && !drop) {
                            const float zi = z[i];
                            drop = zi < zl || (zi == zl && i > il);
                        }
                        if (drop) e[j] = 0.f;
                    }
                }
            }
        }
    }
    if (in_order) tok = draw_in_order(e, u, lo, sh, cluster, rank);
    TRACE(9);
    TRACE_VALUE(14, filter ? (in_order ? 1 : 0) : -1);
    TRACE_VALUE(15, filter ? sh.gathered : 0);
    if (tok == -2) tok = rank == 0 && threadIdx.x == 0 ? (int)amax : -1;  // nothing kept: the argmax stands
    if (tok >= 0) {
        next_token[row] = tok;
        ring[(pos + 1) % HIST] = tok;
    }
}

// Row r's log-probabilities after its draw, for the requests that ask (OpenAI's logprobs / top_logprobs): the
// log-softmax of its logits as the draw started from them (after the penalties, temperature 1: sampling.py's
// token_logprobs), of the drawn token next_token[rows[r]] and of the LOGPROB_TOP most likely tokens, into
// out[r * LP_WORDS ...] = {logprob of the token (float bits), how many follow, then (id, logprob bits) pairs, most
// likely first, ties by the smaller id}. Same cluster as sample_tokens: the maximum all-gathered, a count histogram
// of zmax - z (bins of 1/16 nat up to 128 nats, then one for the rest) picks the bin of the LOGPROB_TOP-th token
// (decide_cut), the tokens up to it are gathered into rank 0 and sorted. Should the tokens up to that bin be more
// than CAP (near-flat logits), some of that bin's are left out: the listed ones are then within 1/16 nat of the
// true ones (documented), and which of the bin's tokens are listed follows the gather's order (it may differ from run
// to run; the drawn token's own logprob does not).
constexpr int LOGPROB_TOP = 20, LP_WORDS = 2 + 2 * LOGPROB_TOP;

// the logprob histogram's bin of a logit (NB: none, for -inf and NaN)
__device__ __forceinline__ int lp_bin(float z, float zmax) {
    const float d = zmax - z;
    return d >= 0.f && d < 128.f ? (int)(d * 16.f) : d >= 128.f && d <= 3.0e38f ? NB - 1 : NB;
}

extern "C" __global__ void __cluster_dims__(SPLITS, 1, 1) __launch_bounds__(THREADS, 1)
token_logprobs(const float* logits, const int* rows, int n, int vocab, const long long* next_token, int* out) {
    __shared__ SampleShared sh;
    cg::cluster_group cluster = cg::this_cluster();
    const unsigned rank = cluster.block_rank();
    pdl_launch_dependents();
    const int row = rows[blockIdx.y];  // the host's, like sample_tokens' rows
    cluster_arrive_relaxed();
    for (int b = threadIdx.x; b < NB; b += THREADS) sh.cnt[b] = 0;
    if (threadIdx.x == 0) { sh.gathered = 0; sh.gathered_cut = 0; }
    __syncthreads();
    pdl_wait();
    const int lo = rank * row_chunk(vocab), hi = min(vocab, lo + row_chunk(vocab));
    const float* z = logits + (size_t)row * vocab;
    float e[PER];
    load_share(z, lo, hi, vocab, e);
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < PER; ++j) m = fmaxf(m, e[j]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) sh.fscratch[threadIdx.x >> 5] = m;
    __syncthreads();
    cluster_wait();  // every block has started: its shared memory may be written
    if (threadIdx.x < SPLITS) {
        float bm = -INFINITY;
        for (int w = 0; w < THREADS / 32; ++w) bm = fmaxf(bm, sh.fscratch[w]);
        cluster.map_shared_rank(sh.part, threadIdx.x)[rank] = bm;
    }
    cluster.sync();  // every rank's maximum everywhere
    float zmax = -INFINITY;
    for (int r = 0; r < SPLITS; ++r) zmax = fmaxf(zmax, sh.part[r]);
    float tsum = 0.f;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        tsum += rel_prob(e[j], zmax, 1.f);
        const int b = lp_bin(e[j], zmax);
        if (b < NB) atomicAdd(&sh.cnt[b], 1u);
    }
    const float bsum = block_sum(tsum, sh.fscratch);  // (its barriers: the histogram is complete)
    summarize_bins(sh, 0);
    if (threadIdx.x < SPLITS) cluster.map_shared_rank(sh.dpart, threadIdx.x)[rank] = bsum;
    cluster.sync();  // every rank's histogram and mass
    float total = 0.f;
    for (int r = 0; r < SPLITS; ++r) total += sh.dpart[r];
    decide_cut(sh, cluster, LOGPROB_TOP, 1.f, 0.f, total);
    const int cut = sh.cut, n_before = sh.n_before;  // n_before < LOGPROB_TOP: the cut is where the count reaches it
    SampleShared* root = cluster.map_shared_rank(&sh, 0);
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        const int b = lp_bin(e[j], zmax);
        if (b <= cut) {  // the tokens before the cut bin all fit; of the cut bin's, as many as CAP leaves room for
            const int i = elem(lo, j);
            const int at = b < cut ? atomicAdd(&root->gathered, 1) : n_before + atomicAdd(&root->gathered_cut, 1);
            if (at < CAP) {
                root->cand_z[at] = z[i];
                root->cand_i[at] = i;
            }
        }
    }
    cluster.sync();  // the candidates are in rank 0
    if (rank != 0) return;
    const int nc = min(n_before + sh.gathered_cut, CAP);
    sort_candidates(sh, nc);
    __syncthreads();
    const float lse = zmax + logf(total);
    int* o = out + (size_t)blockIdx.y * LP_WORDS;
    const int k = min(nc, LOGPROB_TOP);
    if (threadIdx.x == 0) {
        const long long tok = ld_produced(next_token + row);
        o[0] = __float_as_int(tok >= 0 && tok < vocab ? z[tok] - lse : -INFINITY);
        o[1] = k;
    }
    if (threadIdx.x < k) {
        o[2 + 2 * threadIdx.x] = sh.cand_i[threadIdx.x];
        o[3 + 2 * threadIdx.x] = __float_as_int(sh.cand_z[threadIdx.x] - lse);
    }
}
