// Fused RMSNorm + Q, K, V projections (toolchain/fusion.py):
//     h = x / sqrt(mean(x^2) + RMS_EPS) * norm_w;  q = h @ Wq.T + bq;  k = h @ Wk.T + bk;  v = h @ Wv.T + bv
//     rms_norm_qkv(const float* x, const float* norm_w, const uint8_t* wq, const float* bq, const uint8_t* wk,
//                  const float* bk, const uint8_t* wv, const float* bv, int m, int hidden, int q_dim, int kv_dim,
//                  float* q, float* k, float* v)
// Defines: RMS_EPS, Q_TYPE, K_TYPE, V_TYPE (Q4K, Q6K, Q50, Q80; may differ). Every block computes the normalized
// row(s) itself (hidden is ~1-2 K floats) while its first weight slices are in flight; the q, k and v row pairs
// are one list of groups, each warp dispatching on the matrix of its group. Block and grid: kernels.py (-DQMV1:
// the batch-1 decode core, qmv1.cuh).
#include "qmv1.cuh"

#if !defined(Q_TYPE) || !defined(K_TYPE) || !defined(V_TYPE)
#error "rms_norm_qkv needs -DQ_TYPE= -DK_TYPE= -DV_TYPE= (Q4K|Q6K|Q50|Q80)"
#endif

QMV_KERNEL rms_norm_qkv(const float* __restrict__ x, const float* __restrict__ norm_w, const uint8_t* __restrict__ wq,
                        const float* __restrict__ bq, const uint8_t* __restrict__ wk, const float* __restrict__ bk,
                        const uint8_t* __restrict__ wv, const float* __restrict__ bv, int m, int hidden, int q_dim,
                        int kv_dim, float* __restrict__ q, float* __restrict__ k, float* __restrict__ v) {
    qmv::Args a{};
    a.x = x; a.norm_w = norm_w; a.m = m; a.k = hidden;
    a.w[0] = wq; a.bias[0] = bq; a.y[0] = q; a.n[0] = q_dim;
    a.w[1] = wk; a.bias[1] = bk; a.y[1] = k; a.n[1] = kv_dim;
    a.w[2] = wv; a.bias[2] = bv; a.y[2] = v; a.n[2] = kv_dim;
#if QMV1
    qmv1::run<qmv::QKV, ggml::Q_TYPE, ggml::K_TYPE, ggml::V_TYPE>(a);
#else
    qmv::entry<qmv::QKV, ggml::Q_TYPE, ggml::K_TYPE, ggml::V_TYPE, 1>(a);
#endif
}
