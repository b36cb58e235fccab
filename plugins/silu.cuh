// SwiGLU's product, one definition for the kernels whose results must agree bit for bit: the swiglu op
// (elementwise.cu) and the prefill GEMM that fuses it (quant_gemm.cu q4k_gemm_swiglu / q6k_gemm_swiglu).
#pragma once

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }
