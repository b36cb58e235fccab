// Fused projection + residual (toolchain/fusion.py): y = residual + (x @ dequantize(w).T + bias), numpy's order.
//     matmul_add(const float* x, const uint8_t* w, const float* bias /* [n] or null */, const float* residual,
//                int m, int n, int k, float* y)          y and residual are distinct [m, n] buffers
// Defines: W_TYPE (Q4K, Q6K, Q50, Q80: the weight's ggml type), optional KSPLIT (cluster size splitting k).
// The batch-1 build of the o projection may take x as rope_kv_attention's cluster partials (QMV1_XMERGE,
// plugins/qmv1.cuh): two more parameters after y, `const float* xpart` and `const int* positions` (the step's).
// Block and grid: toolchain/kernels.py launch_config (192 threads for the general core, qmv.cuh; the batch-1 build
// with -DQMV1 runs the decode core, qmv1.cuh, with its own launch configuration).
#include "qmv1.cuh"

#ifndef W_TYPE
#error "matmul_add needs -DW_TYPE=Q4K|Q6K|Q50|Q80"
#endif

QMV_KERNEL matmul_add(const float* __restrict__ x, const uint8_t* __restrict__ w, const float* __restrict__ bias,
                      const float* __restrict__ residual, int m, int n, int k, float* __restrict__ y
#if QMV1_XMERGE
                      , const float* xpart, const int* positions  // xpart: the kernel before's (pdl.cuh)
#endif
                      ) {
    qmv::Args a{};
#if QMV1_XMERGE
    a.xpart = xpart;
    a.positions = positions;
#endif
    a.x = x; a.w[0] = w; a.bias[0] = bias; a.residual = residual; a.y[0] = y; a.n[0] = n; a.m = m; a.k = k;
#if QMV1
    qmv1::run<qmv::ADD, ggml::W_TYPE, ggml::W_TYPE, ggml::W_TYPE>(a);
#else
    qmv::entry<qmv::ADD, ggml::W_TYPE, ggml::W_TYPE, ggml::W_TYPE, KSPLIT>(a);
#endif
}
