// y[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + RMS_EPS) * weight   (ONNX RMSNormalization, axis -1, fp32 stash)
//     rms_norm(const float* x, const float* weight, int m, int hidden, float* y)
// and the residual Add before it in one launch (prefill plans of the cuda backend only, fusion.fuse_add_rms_norm):
//     add_rms_norm(const float* a, const float* b, const float* weight, int m, int hidden, float* s, float* y)
//     s = a + b (the Add's output: elementwise.cu's add), y = rms_norm(s) with the same bits; s may alias a or b.
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

// One row per block: y = v / sqrt(mean(v^2) + RMS_EPS) * weight, v = x (rms_norm) or v = a + b, written to s first
// (ADD: add_rms_norm). Both read v twice (the second pass from L1/L2) in the same order, so add_rms_norm gives the
// bits of add then rms_norm; in the second pass each thread reads only the elements of s it wrote itself.
template <bool ADD>
__device__ __forceinline__ void rms_norm_row(const float* a, const float* b, float* s, const float* __restrict__ weight,
                                             int hidden, float* __restrict__ y, __half* xh) {
    __shared__ float part[8];
    const size_t row = (size_t)blockIdx.x * hidden;
    const float* xr = (ADD ? s : a) + row;  // the normalized row: the sum (once written) or x
    float* yr = y + row;
    const bool vec = (hidden & 3) == 0;  // float4 path (rows stay 16-aligned)
    float ss = 0.f;
    if (vec) {
        for (int i = threadIdx.x; i < hidden / 4; i += blockDim.x) {
            float4 v;
            if constexpr (ADD) {
                const float4 p = reinterpret_cast<const float4*>(a + row)[i], q = reinterpret_cast<const float4*>(b + row)[i];
                v = make_float4(p.x + q.x, p.y + q.y, p.z + q.z, p.w + q.w);
                reinterpret_cast<float4*>(s + row)[i] = v;
            } else {
                v = reinterpret_cast<const float4*>(xr)[i];
            }
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            float v;
            if constexpr (ADD) {
                v = a[row + i] + b[row + i];
                s[row + i] = v;
            } else {
                v = xr[i];
            }
            ss += v * v;
        }
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
            xh_store4(xh, row + 4 * i, out);
#else
            (void)xh;
#endif
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) yr[i] = xr[i] / rs * weight[i];
    }
}

#if XH_OUT
#define RMS_XH , __half* __restrict__ xh
#define RMS_XH_ARG xh
#else
#define RMS_XH
#define RMS_XH_ARG nullptr
#endif

extern "C" __global__ void __launch_bounds__(256) rms_norm(const float* x, const float* __restrict__ weight,
                                                           int m, int hidden, float* __restrict__ y RMS_XH) {
#if XH_OUT
    if (hidden % 16) __trap();  // fp16 chunks would straddle rows (the runtime never builds this for such a model)
#endif
    pdl_launch_dependents();
    pdl_wait();
    rms_norm_row<false>(x, nullptr, nullptr, weight, hidden, y, RMS_XH_ARG);
}

extern "C" __global__ void __launch_bounds__(256) add_rms_norm(const float* a, const float* b,
                                                               const float* __restrict__ weight, int m, int hidden,
                                                               float* s, float* __restrict__ y RMS_XH) {
#if XH_OUT
    if (hidden % 16) __trap();
#endif
    pdl_launch_dependents();
    pdl_wait();
    rms_norm_row<true>(a, b, s, weight, hidden, y, RMS_XH_ARG);
}
