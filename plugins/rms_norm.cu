// y[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + RMS_EPS) * weight   (ONNX RMSNormalization, axis -1, fp32 stash)
//     rms_norm(const float* x, const float* weight, int m, int hidden, float* y)
// block (256), grid (m): one block per row (hidden is a few thousand floats: one pass to reduce, one to scale,
// the second served from L1/L2). RMS_EPS is a compile-time define (the model file's epsilon).
// XH_OUT=1 (prefill plans of the cuda backend only): one more output, xh, y as fp16 in the GEMM_XH build's order
// (plugins/xh_store.cuh) for the prefill GEMMs that read y; hidden % 16 == 0.
#include "pdl.cuh"
#include "xh_store.cuh"
#ifndef XH_OUT
#define XH_OUT 0
#endif

#ifndef RMS_EPS
#define RMS_EPS 1e-6
#endif

extern "C" __global__ void __launch_bounds__(256) rms_norm(const float* x, const float* __restrict__ weight,
                                                           int m, int hidden, float* __restrict__ y
#if XH_OUT
                                                           , __half* __restrict__ xh
#endif
) {
    __shared__ float part[8];
#if XH_OUT
    if (hidden % 16) __trap();  // fp16 chunks would straddle rows (the runtime never builds this for such a model)
#endif
    pdl_launch_dependents();
    pdl_wait();
    const float* xr = x + (size_t)blockIdx.x * hidden;
    float* yr = y + (size_t)blockIdx.x * hidden;
    const bool vec = (hidden & 3) == 0;  // float4 path (rows stay 16-aligned)
    float ss = 0.f;
    if (vec) {
        for (int i = threadIdx.x; i < hidden / 4; i += blockDim.x) {
            const float4 v = reinterpret_cast<const float4*>(xr)[i];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += xr[i] * xr[i];
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    float tot = 0.f;
    for (int i = 0; i < (int)(blockDim.x >> 5); ++i) tot += part[i];
    const float rs = sqrtf(tot / (float)hidden + (float)(RMS_EPS));
    if (vec) {
        for (int i = threadIdx.x; i < hidden / 4; i += blockDim.x) {
            const float4 v = reinterpret_cast<const float4*>(xr)[i], g = reinterpret_cast<const float4*>(weight)[i];
            const float4 out = make_float4(v.x / rs * g.x, v.y / rs * g.y, v.z / rs * g.z, v.w / rs * g.w);
            reinterpret_cast<float4*>(yr)[i] = out;
#if XH_OUT
            xh_store4(xh, (size_t)blockIdx.x * hidden + 4 * i, out);
#endif
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) yr[i] = xr[i] / rs * weight[i];
    }
}
