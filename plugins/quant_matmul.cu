// y[m, n] = x[m, k] @ dequantize(w).T + bias, w the raw GGUF rows (uint8 [n, row_bytes]) of a Q4_K / Q6_K / Q5_0 /
// Q8_0 tensor. One kernel per format: q4k_matmul, q6k_matmul, q5_0_matmul, q8_0_matmul, all
//     (const float* x, const uint8_t* w, const float* bias /* [n] or null */, int m, int n, int k, float* y)
// block (192), grid (toolchain/kernels.py launch_config: a multiple of KSPLIT, cdiv(m, 4)).
// The matrix-vector core is qmv.cuh (shared with the fused matmul_add / rms_norm_qkv / rms_norm_swiglu).
// Optional define KSPLIT (kernels.defines_for, from in_features/out_features): the thread-block cluster size that
// splits k; without it (KSPLIT = 1) the kernel is correct for any k and any grid.
// Q4_K requires w 16-byte aligned (every CUDA / TensorRT allocation is 256-aligned); the other formats accept any
// 2-aligned base. With -DQMV1 (the batch-1 build, kernels.decode_core: lm_head) the Q4_K / Q6_K kernels run the
// decode core, qmv1.cuh, with its launch configuration; the other formats keep the general core.
#include "qmv1.cuh"

template <class F>
__device__ __forceinline__ void matmul(const qmv::Args& a) {
#if QMV1
    if constexpr (qmv1::KQuant<F>::value) {
        qmv1::run<qmv::PLAIN, F, F, F>(a);
        return;
    }
#endif
    qmv::entry<qmv::PLAIN, F, F, F, KSPLIT>(a);
}

#define QTRT_MATMUL(NAME, F)                                                                                      \
    QMV_KERNEL NAME(const float* __restrict__ x, const uint8_t* __restrict__ w, const float* __restrict__ bias,   \
                    int m, int n, int k, float* __restrict__ y) {                                                 \
        qmv::Args a{};                                                                                            \
        a.x = x; a.w[0] = w; a.bias[0] = bias; a.y[0] = y; a.n[0] = n; a.m = m; a.k = k;                          \
        matmul<ggml::F>(a);                                                                                       \
    }

QTRT_MATMUL(q4k_matmul, Q4K)
QTRT_MATMUL(q6k_matmul, Q6K)
QTRT_MATMUL(q5_0_matmul, Q50)
QTRT_MATMUL(q8_0_matmul, Q80)
