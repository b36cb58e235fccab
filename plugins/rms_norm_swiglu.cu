// Fused RMSNorm + gate / up projections + SwiGLU (toolchain/fusion.py):
//     h = x / sqrt(mean(x^2) + RMS_EPS) * norm_w;  y = silu(h @ Wg.T) * (h @ Wu.T)
//     rms_norm_swiglu(const float* x, const float* norm_w, const uint8_t* w_gate, const uint8_t* w_up, int m,
//                     int hidden, int ffn, float* y)
// Defines: RMS_EPS, GATE_TYPE, UP_TYPE (Q4K, Q6K, Q50, Q80; may differ). A block's warps 0-3 compute 4 pairs of
// gate rows, warps 4-7 the same 4 pairs of up rows; the gate values meet the up values in shared memory.
// Block and grid: kernels.py. Core: qmv.cuh (-DQMV1: the batch-1 decode core, qmv1.cuh).
#include "qmv1.cuh"

#if !defined(GATE_TYPE) || !defined(UP_TYPE)
#error "rms_norm_swiglu needs -DGATE_TYPE= -DUP_TYPE= (Q4K|Q6K|Q50|Q80)"
#endif

QMV_KERNEL rms_norm_swiglu(const float* __restrict__ x, const float* __restrict__ norm_w,
                           const uint8_t* __restrict__ w_gate, const uint8_t* __restrict__ w_up, int m, int hidden,
                           int ffn, float* __restrict__ y) {
    qmv::Args a{};
    a.x = x; a.norm_w = norm_w; a.m = m; a.k = hidden;
    a.w[0] = w_gate; a.n[0] = ffn; a.y[0] = y;
    a.w[1] = w_up; a.n[1] = ffn;
#if QMV1
    qmv1::run<qmv::SWIGLU, ggml::GATE_TYPE, ggml::UP_TYPE, ggml::UP_TYPE>(a);
#else
    qmv::entry<qmv::SWIGLU, ggml::GATE_TYPE, ggml::UP_TYPE, ggml::UP_TYPE, 1>(a);
#endif
}
