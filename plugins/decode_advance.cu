// Runtime-only helper (not an ONNX node): lets a captured CUDA graph advance itself to the next decode step.
//     decode_advance(const long long* next_token, int m, int* token_ids, int* positions)
// token_ids[i] = next_token[i] (the argmax output); positions[i] += 1. block (256), grid (cdiv(m, 256)).
#include "pdl.cuh"

extern "C" __global__ void __launch_bounds__(256) decode_advance(const long long* next_token, int m,
                                                                 int* __restrict__ token_ids, int* __restrict__ positions) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    pdl_launch_dependents();
    pdl_wait();
    if (i < m) {
        token_ids[i] = (int)ld_produced(next_token + i);
        positions[i] += 1;
    }
}
