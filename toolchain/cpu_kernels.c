// CPU kernels of the `cpu` backend over raw ggml blocks (toolchain/cpu_kernels.py builds and loads this file).
//
//   qt_dequant(w, n, k, type, out)        rows [n] of raw blocks -> float32 [n, k]
//   qt_matmul(x, m, k, w, n, type, y)     y[m, n] = x[m, k] . dequant(w[n, :]) for few tokens (m <= 16)
//
// The decoded values are those of toolchain/quants.py (ggml's arithmetic in float32, e.g. Q4_K (d*sc)*q - (dmin*m),
// and the file is compiled with -ffp-contract=off so no multiply-add is fused): dequant gives the same bits as the
// numpy dequantizers, and a matmul differs from the dense reference only by the order of its float32 sums.
// Weights stay in their file format (1.1 GB for the 1.5B instead of 6.2 GB as float32).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { T_Q4_K = 0, T_Q6_K = 1, T_Q5_0 = 2, T_Q8_0 = 3 };
// Below this many weights a matrix is done on the calling thread: waking the team costs more than it saves.
#define PAR_MIN (1L << 20)

static float f16(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal half: normalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static int block_elems(int type) { return type == T_Q4_K || type == T_Q6_K ? 256 : 32; }
static int block_bytes(int type) {
    switch (type) {
        case T_Q4_K: return 144;
        case T_Q6_K: return 210;
        case T_Q5_0: return 22;
        default: return 34;
    }
}

static void deq_q4_k(const uint8_t *b, float *o) {
    const float d = f16(b), dmin = f16(b + 2);
    const uint8_t *s = b + 4, *qs = b + 16;
    for (int j = 0; j < 8; j++) {
        int sc, mn;
        if (j < 4) { sc = s[j] & 63; mn = s[j + 4] & 63; }
        else { sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4); mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4); }
        const float dl = d * (float)sc, ml = dmin * (float)mn;
        const uint8_t *q = qs + 32 * (j / 2);
        const int shift = (j & 1) * 4;
        for (int l = 0; l < 32; l++) o[32 * j + l] = dl * (float)((q[l] >> shift) & 0x0F) - ml;
    }
}

// One run of 32 elements of a Q6_K half: low 4 bits from `lo` (shifted by LS), top 2 from `hi` (shifted by HS), two
// sub-blocks of 16 with their own scales. Constant shifts (inlined per run) let the compiler vectorise the loop.
static inline void q6_run(const uint8_t *lo, const uint8_t *hi, int ls, int hs, float d0, float d1, float *o) {
    for (int l = 0; l < 32; l++) {
        const int q = (((lo[l] >> ls) & 0x0F) | (((hi[l] >> hs) & 3) << 4)) - 32;
        o[l] = (l < 16 ? d0 : d1) * (float)q;
    }
}

static void deq_q6_k(const uint8_t *b, float *o) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = f16(b + 208);
    for (int h = 0; h < 2; h++) {
        const uint8_t *l0 = ql + 64 * h, *hi = qh + 32 * h;
        const int8_t *s = sc + 8 * h;
        float *oh = o + 128 * h;
        q6_run(l0, hi, 0, 0, d * (float)s[0], d * (float)s[1], oh);
        q6_run(l0 + 32, hi, 0, 2, d * (float)s[2], d * (float)s[3], oh + 32);
        q6_run(l0, hi, 4, 4, d * (float)s[4], d * (float)s[5], oh + 64);
        q6_run(l0 + 32, hi, 4, 6, d * (float)s[6], d * (float)s[7], oh + 96);
    }
}

static void deq_q5_0(const uint8_t *b, float *o) {
    const float d = f16(b);
    const uint32_t qh = (uint32_t)b[2] | ((uint32_t)b[3] << 8) | ((uint32_t)b[4] << 16) | ((uint32_t)b[5] << 24);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 32; j++) {
        const int lo = j < 16 ? (qs[j] & 0x0F) : (qs[j - 16] >> 4);
        const int q = (lo | (int)(((qh >> j) & 1u) << 4)) - 16;
        o[j] = (float)q * d;
    }
}

static void deq_q8_0(const uint8_t *b, float *o) {
    const float d = f16(b);
    const int8_t *q = (const int8_t *)(b + 2);
    for (int j = 0; j < 32; j++) o[j] = (float)q[j] * d;
}

static void deq_row(const uint8_t *w, int k, int type, float *o) {
    const int e = block_elems(type), nb = block_bytes(type);
    for (int i = 0; i < k / e; i++) {
        const uint8_t *b = w + (size_t)i * nb;
        switch (type) {
            case T_Q4_K: deq_q4_k(b, o + (size_t)i * e); break;
            case T_Q6_K: deq_q6_k(b, o + (size_t)i * e); break;
            case T_Q5_0: deq_q5_0(b, o + (size_t)i * e); break;
            default: deq_q8_0(b, o + (size_t)i * e); break;
        }
    }
}

void qt_dequant(const uint8_t *w, long n, int k, int type, float *out) {
    const size_t rb = (size_t)k / block_elems(type) * block_bytes(type);
#pragma omp parallel for schedule(static) if (n * (long)k >= PAR_MIN)
    for (long r = 0; r < n; r++) deq_row(w + (size_t)r * rb, k, type, out + (size_t)r * k);
}

// qt_matmul decodes each weight row once into a thread's scratch (qt_dequant's exact values) and dots it with every
// token: the weights are never materialised beyond one row. Measured on 2 cores here: the 1.5B's ffn_gate (Q4_K,
// 8960 x 1536) in 3.3 ms, ffn_down (Q6_K) in ~4 ms; decoding the integer quants once per block and applying the
// scales to per-sub-block sums was slower for Q4_K (5.0 ms: a horizontal sum per 32 elements).
#define MAXT 16

static float dot(const float *a, const float *b, int k) {
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= k; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0;
    for (int j = 0; j < 16; j++) s += acc[j];
    for (; i < k; i++) s += a[i] * b[i];
    return s;
}

int qt_matmul(const float *x, int m, int k, const uint8_t *w, long n, int type, float *y) {
    if (m > MAXT) return 2;
    const size_t rb = (size_t)k / block_elems(type) * block_bytes(type);
    int failed = 0;
#pragma omp parallel if (n * (long)k >= PAR_MIN)
    {
        float *row = (float *)malloc(sizeof(float) * (size_t)k);
        if (!row) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long r = 0; r < n; r++) {
            if (!row) continue;
            deq_row(w + (size_t)r * rb, k, type, row);
            for (int t = 0; t < m; t++) y[(size_t)t * n + r] = dot(x + (size_t)t * k, row, k);
        }
        free(row);
    }
    return failed;
}
