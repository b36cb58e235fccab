// y[m, n] = x[m, k] @ dequantize(w).T + bias, w the raw GGUF rows (uint8 [n, row_bytes]) of a Q4_K / Q6_K / Q5_0 /
// Q8_0 tensor. One kernel per format: q4k_matmul, q6k_matmul, q5_0_matmul, q8_0_matmul, all
//     (const float* x, const uint8_t* w, const float* bias /* [n] or null */, int m, int n, int k, float* y)
// block (128), grid (blocks_x(n, k), cdiv(m, TM)) with blocks_x from toolchain/kernels.py (matmul_grid_x).
//
// Batch-1 decode is a matrix-vector product bound by streaming the weights once from HBM, so the design is about
// bytes in flight and instructions per weight:
// - A warp owns R = 2 consecutive rows (a "row group") at a time and walks them in k-slices of ~1-2 KB. A slice
//   is copied global -> shared with 16-byte loads of the *aligned-down* byte range (coalesced, L1 bypassed; any
//   block alignment works, Q6_K/Q5_0/Q8_0 blocks are only 2-aligned), and the next slice - of this row group or
//   of the warp's next one - is loaded into registers before the current one is decoded, so loads stay in flight.
// - The grid is persistent (at most one wave): warps stride over row groups.
// - Long rows (more than one slice) are split over the 4 warps of a block (WPG = 4), which then reduce through
//   shared memory: short-n, long-k matrices (ffn_down) still fill the GPU.
// - Decoding reads shared memory; x is read as float4 through L1 and reused for the R rows. Integers become
//   floats with one PRMT (ggml_blocks.cuh: 0.5 + q/256, corrected with the per-group sum of x that the R rows
//   share), scales multiply partial sums rather than elements. fp32 accumulation, warp-shuffle reduction.
// - m > 1: a block handles TM tokens and every decoded weight group is used for all of them (tiles past m are
//   clamped and dropped). Correct for any m; a tensor-core path for large m is later work.
#include "ggml_blocks.cuh"

using namespace ggml;

constexpr int WARPS = 4;                      // warps per block (blockDim.x = 128)
constexpr int R = 2;                          // rows per warp: each x value loaded is used for R rows
constexpr int TM = 4;                         // tokens per block when m > 1 (grid.y = cdiv(m, TM))

// 16-byte streaming load: read-only path, no L1 allocation (each weight byte is used once; L1 keeps x).
__device__ __forceinline__ uint4 ldg_stream(const uint8_t* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
__device__ __forceinline__ float dot4(const float (&a)[4], float4 b, float acc) {
    return fmaf(a[3], b.w, fmaf(a[2], b.z, fmaf(a[1], b.y, fmaf(a[0], b.x, acc))));
}
__device__ __forceinline__ float sum4(float4 v) { return (v.x + v.y) + (v.z + v.w); }
__device__ __forceinline__ float4 ldx(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }

// ---------------------------------------------------------------------------------------------------------------
// Per-format "unit": the piece of a block one lane decodes at a time. unit<NT>(blk, u, xb, k, mt, acc) adds to
// acc[r][t] the dot product of unit u of the R blocks blk[r] (in shared memory) with tokens t of x, xb pointing at
// the block's first element of the tile's first token (token stride k; tokens >= mt are clamped to mt-1).
// SB = blocks per slice, chosen so the real rows split into whole slices (k = 8960: 35 blocks = 4 warps x 9).

template <class F> struct Fmt;

// Q4_K: 16-byte header (half d, half dmin, 12 bytes of 6-bit scales/mins) + 128 bytes of nibbles. Unit u (8 per
// block) = qs bytes [16u, 16u+16): low nibbles are elements 64p+16h+i of sub-block 2p, high nibbles elements
// 64p+32+16h+i of sub-block 2p+1 (p = u/2, h = u%2). x = (d*sc)*q - dmin*mn, so per sub-block
// d*sc*sum(q*x) - dmin*mn*sum(x) = 256*d*sc*sum(f*x) - (128*d*sc + dmin*mn)*sum(x) with f = 0.5 + q/256.
// (64-element units, amortizing the header over more elements, measured slower: 24 or 36 units per 32 lanes.)
template <> struct Fmt<Q4K> {
    static constexpr int SB = 9, UPB = 8;     // 1296 B per slice
    template <int NT>
    static __device__ __forceinline__ void unit(const uint8_t* const (&blk)[R], int u, const float* xb, int k, int mt,
                                                float (&acc)[R][NT]) {
        const int p = u >> 1, h = u & 1;
        float ca[R][2], cb[R][2];
        uint4 qv[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {  // Q4_K blocks stay 16-aligned in the staging buffer (kernel contract)
            const uint4 hd = *reinterpret_cast<const uint4*>(blk[r]);
            qv[r] = *reinterpret_cast<const uint4*>(blk[r] + 16 + 16 * u);
            const float d = half_bits_to_float(hd.x), dmin = half_bits_to_float(hd.x >> 16);
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                uint32_t sc, mn;
                q4k_scale_min(hd.y, hd.z, hd.w, 2 * p + s, sc, mn);
                const float dsc = d * (float)sc;
                ca[r][s] = 256.f * dsc;
                cb[r][s] = fmaf(128.f, dsc, dmin * (float)mn);
            }
        }
#pragma unroll
        for (int s = 0; s < 2; ++s) {  // s = 0: low nibbles (sub-block 2p), 1: high nibbles (2p+1)
            float sq[R][NT], sx[NT];
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                sx[t] = 0.f;
#pragma unroll
                for (int r = 0; r < R; ++r) sq[r][t] = 0.f;
            }
#pragma unroll
            for (int g = 0; g < 4; ++g) {
                float wq[R][4];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const uint32_t q = (word(qv[r], g) >> (4 * s)) & 0x0F0F0F0Fu;
#pragma unroll
                    for (int i = 0; i < 4; ++i) wq[r][i] = byte_to_half_plus(q, i);
                }
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const float4 xv = ldx(xb + (size_t)min(t, mt - 1) * k + 64 * p + 32 * s + 16 * h + 4 * g);
                    sx[t] += sum4(xv);
#pragma unroll
                    for (int r = 0; r < R; ++r) sq[r][t] = dot4(wq[r], xv, sq[r][t]);
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int t = 0; t < NT; ++t) acc[r][t] = fmaf(-cb[r][s], sx[t], fmaf(ca[r][s], sq[r][t], acc[r][t]));
        }
    }
};

// Q6_K: ql[128], qh[64], int8 scales[16], half d; x = (d*sc)*(q-32) per 16-element sub-block. Unit u (8 per
// block) = half hf = u/4, lanes l in [8a, 8a+8) (a = u%4) of the four runs k = 0..3 of 32: element 128hf+32k+l
// takes its low nibble from ql[64hf + l + 32(k&1)] (high nibble for k >= 2) and bits 2k..2k+1 of qh[32hf + l].
// sum((q-32)*x) = 256*sum(f*x) - 160*sum(x), f = 0.5 + q/256. Q6_K blocks are only 2-aligned: 8-byte runs are
// read as 3 aligned words and 2 funnel shifts (ld64_any).
__device__ __forceinline__ uint2 ld64_any(const uint8_t* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uint32_t* w = reinterpret_cast<const uint32_t*>(a & ~uintptr_t(3));
    const uint32_t sh = (uint32_t)(a & 3) * 8u;
    const uint32_t w1 = w[1];
    return make_uint2(__funnelshift_r(w[0], w1, sh), __funnelshift_r(w1, w[2], sh));
}
template <> struct Fmt<Q6K> {
    static constexpr int SB = 9, UPB = 8;     // 1890 B per slice
    template <int NT>
    static __device__ __forceinline__ void unit(const uint8_t* const (&blk)[R], int u, const float* xb, int k, int mt,
                                                float (&acc)[R][NT]) {
        const int hf = u >> 2, a = u & 3;
        uint2 A[R], B[R], Q[R];
        float ds[R][4];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const uint8_t* b = blk[r];
            A[r] = ld64_any(b + 64 * hf + 8 * a);
            B[r] = ld64_any(b + 64 * hf + 32 + 8 * a);
            Q[r] = ld64_any(b + 128 + 32 * hf + 8 * a);
            const uint2 sv = ld64_any(b + 192 + 8 * hf);
            const float d = half_bits_to_float(ld32_any(b + 208));
            const uint32_t sh = 8u * (uint32_t)(a >> 1);  // sub-block 8hf + 2k + a/2
            ds[r][0] = d * (float)(int8_t)(sv.x >> sh);
            ds[r][1] = d * (float)(int8_t)(sv.x >> (sh + 16));
            ds[r][2] = d * (float)(int8_t)(sv.y >> sh);
            ds[r][3] = d * (float)(int8_t)(sv.y >> (sh + 16));
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
            for (int hw = 0; hw < 2; ++hw) {  // 4 elements 128hf + 32kk + 8a + 4hw + i
                float wq[R][4];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const uint32_t av = hw ? A[r].y : A[r].x, bv = hw ? B[r].y : B[r].x, qv = hw ? Q[r].y : Q[r].x;
                    const uint32_t lo = ((kk & 1 ? bv : av) >> (4 * (kk >> 1))) & 0x0F0F0F0Fu;
                    const uint32_t hi = (kk == 0 ? qv << 4 : kk == 1 ? qv << 2 : kk == 2 ? qv : qv >> 2) & 0x30303030u;
#pragma unroll
                    for (int i = 0; i < 4; ++i) wq[r][i] = byte_to_half_plus(lo | hi, i);
                }
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const float4 xv = ldx(xb + (size_t)min(t, mt - 1) * k + 128 * hf + 32 * kk + 8 * a + 4 * hw);
                    const float sx = 160.f * sum4(xv);
#pragma unroll
                    for (int r = 0; r < R; ++r)
                        acc[r][t] = fmaf(ds[r][kk], fmaf(256.f, dot4(wq[r], xv, 0.f), -sx), acc[r][t]);
                }
            }
    }
};

// Q5_0: half d, u32 qh, qs[16]; x = d*(q-16), q = nibble | (bit j of qh) << 4. Unit u (4 per block) = qs bytes
// [4u, 4u+4): low nibbles are elements 4u+i, high nibbles elements 16+4u+i. sum((q-16)*x) = 256*sum(f*x) - 144*sum(x).
__device__ __forceinline__ uint32_t spread4(uint32_t h) {  // bit i of h (i < 4) -> bit 4 of byte i
    return ((h * 0x00204081u) & 0x01010101u) << 4;
}
template <> struct Fmt<Q50> {
    static constexpr int SB = 48, UPB = 4;    // 1056 B per slice
    template <int NT>
    static __device__ __forceinline__ void unit(const uint8_t* const (&blk)[R], int u, const float* xb, int k, int mt,
                                                float (&acc)[R][NT]) {
        float d[R], wq[R][2][4];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const uint8_t* b = blk[r];
            d[r] = half_bits_to_float(ld32_any(b));
            const uint32_t qh = ld32_any(b + 2), qs = ld32_any(b + 6 + 4 * u);
            const uint32_t lo = (qs & 0x0F0F0F0Fu) | spread4((qh >> (4 * u)) & 15);
            const uint32_t hi = ((qs >> 4) & 0x0F0F0F0Fu) | spread4((qh >> (16 + 4 * u)) & 15);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                wq[r][0][i] = byte_to_half_plus(lo, i);
                wq[r][1][i] = byte_to_half_plus(hi, i);
            }
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            const float* xt = xb + (size_t)min(t, mt - 1) * k + 4 * u;
            const float4 x0 = ldx(xt), x1 = ldx(xt + 16);
            const float sx = 144.f * (sum4(x0) + sum4(x1));
#pragma unroll
            for (int r = 0; r < R; ++r)
                acc[r][t] = fmaf(d[r], fmaf(256.f, dot4(wq[r][1], x1, dot4(wq[r][0], x0, 0.f)), -sx), acc[r][t]);
        }
    }
};

// Q8_0: half d, int8 q[32]; x = q*d. Unit u (4 per block) = elements 8u..8u+7. A full byte does not fit the
// one-PRMT form, so int8 + 128 (XOR) goes through the 2^23 trick: PRMT + FADD.
template <> struct Fmt<Q80> {
    static constexpr int SB = 40, UPB = 4;    // 1360 B per slice
    template <int NT>
    static __device__ __forceinline__ void unit(const uint8_t* const (&blk)[R], int u, const float* xb, int k, int mt,
                                                float (&acc)[R][NT]) {
        float d[R], wq[R][2][4];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const uint8_t* b = blk[r];
            d[r] = half_bits_to_float(ld32_any(b));
            const uint32_t q0 = ld32_any(b + 2 + 8 * u) ^ 0x80808080u, q1 = ld32_any(b + 6 + 8 * u) ^ 0x80808080u;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                wq[r][0][i] = byte_to_float<128>(q0, i);
                wq[r][1][i] = byte_to_float<128>(q1, i);
            }
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            const float* xt = xb + (size_t)min(t, mt - 1) * k + 8 * u;
            const float4 x0 = ldx(xt), x1 = ldx(xt + 4);
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r][t] = fmaf(d[r], dot4(wq[r][1], x1, dot4(wq[r][0], x0, 0.f)), acc[r][t]);
        }
    }
};

// ---------------------------------------------------------------------------------------------------------------
// Staging of one k-slice of the warp's R rows: the 16-byte-aligned byte range around it, lane-strided.

template <class F>
struct Slice {
    static constexpr int BYTES = Fmt<F>::SB * F::BB;
    static constexpr int V16 = (BYTES + 15) / 16 + 1;     // 16-byte vectors of an aligned-down slice, at most
    static constexpr int PER_LANE = (V16 + 31) / 32;
    static constexpr int ROWBUF = (V16 + 1) * 16;         // + one vector so ld32/64_any may read past the end
    uint4 v[R][PER_LANE];
    int cnt[R];

    __device__ __forceinline__ void load(const uint8_t* const (&row)[R], int b0, int b1, int lane) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const uintptr_t lo = reinterpret_cast<uintptr_t>(row[r]) + (uintptr_t)b0 * F::BB;
            const uintptr_t hi = reinterpret_cast<uintptr_t>(row[r]) + (uintptr_t)b1 * F::BB;
            const uint8_t* a = reinterpret_cast<const uint8_t*>(lo & ~uintptr_t(15));
            cnt[r] = (int)((hi - (lo & ~uintptr_t(15)) + 15) >> 4);
            // The aligned-up tail stays inside the 16-byte granule of the last byte: never crosses a page.
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) {
                const int idx = lane + 32 * i;
                if (idx < cnt[r]) v[r][i] = ldg_stream(a + 16 * idx);
            }
        }
    }
    __device__ __forceinline__ void store(uint8_t* buf, int lane) const {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) {
                const int idx = lane + 32 * i;
                if (idx < cnt[r]) reinterpret_cast<uint4*>(buf + r * ROWBUF)[idx] = v[r][i];
            }
    }
};

template <class F, int NT>
__device__ __forceinline__ void matmul_tile(const float* __restrict__ x, const uint8_t* __restrict__ w,
                                            const float* __restrict__ bias, int n, int k, float* __restrict__ y,
                                            int t0, int mt, uint8_t* wbuf, float* red) {
    using S = Slice<F>;
    constexpr int SB = Fmt<F>::SB, UPB = Fmt<F>::UPB;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nb = k / F::BE;
    const int wpg = nb > SB ? WARPS : 1;        // warps per row group (toolchain/kernels.py mirrors this rule)
    const int part = warp % wpg;                // this warp's share of the row: blocks [r0, r1)
    const int r0 = part * nb / wpg, r1 = (part + 1) * nb / wpg;
    const int ngroups = (n + R - 1) / R;
    const int gstride = gridDim.x * (WARPS / wpg);
    int g = blockIdx.x * (WARPS / wpg) + warp / wpg;
    if (g >= ngroups) return;                   // uniform over the warps of a row group
    const size_t row_bytes = (size_t)nb * F::BB;
    const float* xt = x + (size_t)t0 * k;

    const uint8_t* row[R];
#pragma unroll
    for (int r = 0; r < R; ++r) row[r] = w + (size_t)min(g * R + r, n - 1) * row_bytes;  // tail: recompute n-1
    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[r][t] = 0.f;

    S st;
    int b0 = r0, b1 = min(r1, r0 + SB);
    st.load(row, b0, b1, lane);
    while (true) {
        __syncwarp();                 // everyone is done reading the previous slice
        st.store(wbuf, lane);
        __syncwarp();
        int off[R];
#pragma unroll
        for (int r = 0; r < R; ++r) off[r] = (int)((reinterpret_cast<uintptr_t>(row[r]) + (uintptr_t)b0 * F::BB) & 15);
        // the next slice: of this row group, or the first of the warp's next row group
        int ng = g, nb0 = b1;
        if (nb0 >= r1) {
            ng = g + gstride;
            nb0 = r0;
        }
        const int nb1 = min(r1, nb0 + SB);
        const bool more = ng < ngroups;
        const uint8_t* nrow[R];
#pragma unroll
        for (int r = 0; r < R; ++r) nrow[r] = ng == g ? row[r] : w + (size_t)min(ng * R + r, n - 1) * row_bytes;
        if (more) st.load(nrow, nb0, nb1, lane);  // in flight while this slice is decoded

        const int nunits = (b1 - b0) * UPB;
        for (int u = lane; u < nunits; u += 32) {
            const int b = u / UPB;
            const uint8_t* blk[R];
#pragma unroll
            for (int r = 0; r < R; ++r) blk[r] = wbuf + r * S::ROWBUF + off[r] + b * F::BB;
            Fmt<F>::template unit<NT>(blk, u % UPB, xt + (size_t)(b0 + b) * F::BE, k, mt, acc);
        }

        if (ng != g) {                // row group g is complete: reduce over lanes (and warps), store
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    float v = acc[r][t];
#pragma unroll
                    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                    acc[r][t] = v;
                }
            if (wpg > 1) {            // wpg == WARPS: the whole block works on g
                if (lane == 0)
#pragma unroll
                    for (int r = 0; r < R; ++r)
#pragma unroll
                        for (int t = 0; t < NT; ++t) red[(warp * R + r) * TM + t] = acc[r][t];
                __syncthreads();
                if (warp == 0 && lane == 0)
#pragma unroll
                    for (int r = 0; r < R; ++r)
#pragma unroll
                        for (int t = 0; t < NT; ++t) {
                            float v = 0.f;
                            for (int ww = 0; ww < WARPS; ++ww) v += red[(ww * R + r) * TM + t];
                            acc[r][t] = v;
                        }
                __syncthreads();
            }
            if (lane == 0 && part == 0) {
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const int rr = g * R + r;
                    if (rr < n) {
                        const float bv = bias ? bias[rr] : 0.f;
#pragma unroll
                        for (int t = 0; t < NT; ++t)
                            if (t < mt) y[(size_t)(t0 + t) * n + rr] = acc[r][t] + bv;
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int t = 0; t < NT; ++t) acc[r][t] = 0.f;
        }
        if (!more) break;
        g = ng;
        b0 = nb0;
        b1 = nb1;
#pragma unroll
        for (int r = 0; r < R; ++r) row[r] = nrow[r];
    }
}

template <class F>
__device__ __forceinline__ void matmul_entry(const float* x, const uint8_t* w, const float* bias, int m, int n, int k,
                                             float* y) {
    __shared__ __align__(16) uint8_t smem[WARPS * R * Slice<F>::ROWBUF];
    __shared__ float red[WARPS * R * TM];
    uint8_t* wbuf = smem + (threadIdx.x >> 5) * R * Slice<F>::ROWBUF;
    const int t0 = blockIdx.y * TM, mt = min(TM, m - t0);
    if (mt == 1)
        matmul_tile<F, 1>(x, w, bias, n, k, y, t0, 1, wbuf, red);  // batch-1 decode: no token loop at all
    else
        matmul_tile<F, TM>(x, w, bias, n, k, y, t0, mt, wbuf, red);
}

// Q4_K requires w 16-byte aligned (every CUDA / TensorRT allocation is 256-aligned): its blocks are then read
// from shared memory with 16-byte loads. The other formats accept any alignment.
#define QTRT_MATMUL(NAME, F)                                                                                      \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 4) NAME(const float* __restrict__ x,                 \
        const uint8_t* __restrict__ w, const float* __restrict__ bias, int m, int n, int k, float* __restrict__ y) \
    { matmul_entry<F>(x, w, bias, m, n, k, y); }

QTRT_MATMUL(q4k_matmul, Q4K)
QTRT_MATMUL(q6k_matmul, Q6K)
QTRT_MATMUL(q5_0_matmul, Q50)
QTRT_MATMUL(q8_0_matmul, Q80)
