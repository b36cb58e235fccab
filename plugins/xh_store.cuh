// The fp16 input of the prefill GEMMs' GEMM_XH build (plugins/quant_gemm_wgmma.cuh), written by the kernel that
// produces the GEMM's input instead of by a conversion launch of its own.
//
// Layout (the one plugins/quant_gemm.cu gemm_x_f16 makes from float32): [m][k] fp16, each 16-element chunk of a row in
// the MMA fragments' k order, word c = (x[4c], x[4c + 2]), word 4 + c = (x[4c + 1], x[4c + 3]) (low half first).
// Producers built with XH_OUT=1 (rms_norm, swiglu, prefill_attention; the cuda backend's prefill plans only, never
// TensorRT's plugins) take one more output, `xh`, and write it beside their float32 output, rounded by the same
// cvt.rn as gemm_x_f16: the GEMMs read the same bits either way (tests/test_kernels_gpu.py checks it). The
// gate/up/SwiGLU GEMMs (quant_gemm.cu q4k_gemm_swiglu) write it in place of their float32 output, with their own
// stores of whole 16-element chunks.
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

// elements e, e + 1 (e % 2 == 0) from each of two lanes (lane and lane ^ 1) that hold e0 .. e0 + 3 between them
// (e0 % 4 == 0, the even lane e0 and e0 + 1): the pair swaps its values and each lane stores one whole word (word c
// from the even lane, word 4 + c from the odd one) instead of two scattered halves. mask: the lanes calling it, both
// lanes of every pair.
__device__ __forceinline__ void xh_store2_paired(__half* xh, size_t e, float a, float b, unsigned mask) {
    const float pa = __shfl_xor_sync(mask, a, 1), pb = __shfl_xor_sync(mask, b, 1);
    __half* const chunk = xh + (e & ~(size_t)15);
    const int c = (int)(e >> 2) & 3;
    if ((e & 2) == 0)
        *reinterpret_cast<__half2*>(chunk + 2 * c) = __floats2half2_rn(a, pa);
    else
        *reinterpret_cast<__half2*>(chunk + 8 + 2 * c) = __floats2half2_rn(pb, b);
}
