// The fp16 input of the prefill GEMMs' GEMM_XH build (plugins/quant_gemm_wgmma.cuh), written by the kernel that
// produces the GEMM's input instead of by a conversion launch of its own.
//
// Layout (the one plugins/quant_gemm.cu gemm_x_f16 makes from float32): [m][k] fp16, each 16-element chunk of a row in
// the MMA fragments' k order, word c = (x[4c], x[4c + 2]), word 4 + c = (x[4c + 1], x[4c + 3]) (low half first).
// Producers built with XH_OUT=1 (rms_norm, swiglu, prefill_attention; the cuda backend's prefill plans only, never
// TensorRT's plugins) take one more output, `xh`, and write it beside their float32 output, rounded by the same
// cvt.rn as gemm_x_f16: the GEMMs read the same bits either way (tests/test_kernels_gpu.py checks it).
// Indices are flat element indices e of the [m][k] tensor; k % 16 == 0, so a chunk never straddles two rows.
#pragma once
#include <cuda_fp16.h>
#include <stddef.h>

// elements e .. e + 3 (e % 4 == 0)
__device__ __forceinline__ void xh_store4(__half* xh, size_t e, float4 v) {
    __half* const chunk = xh + (e & ~(size_t)15);
    const int c = (int)(e >> 2) & 3;
    *reinterpret_cast<__half2*>(chunk + 2 * c) = __floats2half2_rn(v.x, v.z);
    *reinterpret_cast<__half2*>(chunk + 8 + 2 * c) = __floats2half2_rn(v.y, v.w);
}

// elements e, e + 1 (e % 2 == 0): halves of words c and 4 + c, the low ones for e % 4 == 0, the high ones for 2
__device__ __forceinline__ void xh_store2(__half* xh, size_t e, float a, float b) {
    __half* const chunk = xh + (e & ~(size_t)15);
    const int c = (int)(e >> 2) & 3, j = (int)(e >> 1) & 1;
    chunk[2 * c + j] = __float2half_rn(a);
    chunk[8 + 2 * c + j] = __float2half_rn(b);
}
