// The arguments of every projection kernel, gathered from its extern "C" parameters (docs/ops.md's ABIs): the
// matvec cores (plugins/qmv.cuh, plugins/qmv1.cuh) and the GEMMs for few tokens (plugins/quant_gemm_skinny.cu).
// Up to three weight matrices (rms_norm_qkv: q, k, v; rms_norm_swiglu: gate, up), one x and one output each.
#pragma once
#include <stdint.h>

struct ProjArgs {
    const float* x;
    const float* norm_w;
    const float* residual;
    const uint8_t* w[3];
    const float* bias[3];
    float* y[3];
    int n[3];
    int m, k;
    const float* xpart;   // qmv1 QMV1_XMERGE builds: the attention's cluster partials, merged into x
    const int* positions;  // and the step's position (how many partials)
};
