// Elementwise fp32 ops over numel elements, block (256), grid (cdiv(numel, 1024)): each thread one float4
// (16-byte loads/stores), the tail of a numel that is not a multiple of 4 done element by element.
//     add(const float* a, const float* b, int numel, float* y)          y = a + b
//     swiglu(const float* gate, const float* up, int numel, float* y)  y = gate * sigmoid(gate) * up
// Buffers are whole tensors (16-aligned base) so float4 access is aligned; y may alias a or b (in-place).
// XH_OUT=1 (prefill plans of the cuda backend only, swiglu): one more output, xh, y as fp16 in the GEMM_XH build's
// order (plugins/xh_store.cuh) for the down projection's GEMM. Its rows (ffn wide, a GEMM's k: a multiple of 256)
// must be a multiple of 16 long, which the kernel cannot see; it checks numel % 16.
#include "pdl.cuh"
#include "silu.cuh"
#include "xh_store.cuh"
#ifndef XH_OUT
#define XH_OUT 0
#endif


template <class Op>
__device__ __forceinline__ void elementwise(const float* a, const float* b, int numel,
                                            float* y, Op op, __half* xh = nullptr) {
    pdl_launch_dependents();
    pdl_wait();
    const int i4 = blockIdx.x * blockDim.x + threadIdx.x;
    const int e = 4 * i4;
    if (e + 3 < numel) {
        const float4 va = reinterpret_cast<const float4*>(a)[i4], vb = reinterpret_cast<const float4*>(b)[i4];
        const float4 out = make_float4(op(va.x, vb.x), op(va.y, vb.y), op(va.z, vb.z), op(va.w, vb.w));
        reinterpret_cast<float4*>(y)[i4] = out;
        if (xh) xh_store4(xh, (size_t)e, out);
    } else {
        for (int j = e; j < numel; ++j) y[j] = op(a[j], b[j]);
    }
}

struct AddOp { __device__ float operator()(float p, float q) const { return p + q; } };
struct SwigluOp { __device__ float operator()(float g, float u) const { return silu_mul(g, u); } };

extern "C" __global__ void __launch_bounds__(256) add(const float* a, const float* b,
                                                      int numel, float* y) {
    elementwise(a, b, numel, y, AddOp{});
}

extern "C" __global__ void __launch_bounds__(256) swiglu(const float* gate, const float* up,
                                                         int numel, float* y
#if XH_OUT
                                                         , __half* xh
#endif
) {
#if XH_OUT
    if (numel % 16) __trap();  // no GEMM_XH input (the runtime never builds this)
    elementwise(gate, up, numel, y, SwigluOp{}, xh);
#else
    elementwise(gate, up, numel, y, SwigluOp{});
#endif
}
