// Embedding lookup from raw GGUF rows: y[i, :] = dequantize(w[ids[i], :]) for i < m. One kernel per format:
//     q4k_gather, q6k_gather, q5_0_gather, q8_0_gather (const uint8_t* w, const int* ids, int m, int hidden,
//                                                        int vocab, float* y)
// launched with block (256) and grid (cdiv(hidden, 256), m). An id outside [0, vocab) (every backend refuses it
// before any kernel runs) reads nothing: its row is NaN (a guard against reading past the table, not a result). Only m rows are touched (m = tokens of the step), so
// this is a latency-sized kernel: one thread per element with byte loads, decoded in ggml's float32 order
// (ggml_blocks.cuh), which makes it bit-exact against toolchain/quants.py.
#include "ggml_blocks.cuh"
#include "pdl.cuh"

using namespace ggml;

template <class F>
__device__ __forceinline__ void gather(const uint8_t* __restrict__ w, const int* ids, int hidden, int vocab,
                                       float* __restrict__ y) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x, i = blockIdx.y;
    pdl_launch_dependents();
    pdl_wait();
    if (e >= hidden) return;
    const int id = ld_produced(ids + i);
    if (id < 0 || id >= vocab) {
        y[(size_t)i * hidden + e] = __int_as_float(0x7fc00000);
        return;
    }
    const size_t row_bytes = (size_t)(hidden / F::BE) * F::BB;
    const uint8_t* blk = w + (size_t)id * row_bytes + (size_t)(e / F::BE) * F::BB;
    y[(size_t)i * hidden + e] = deq_elem(F{}, blk, e % F::BE);
}

#define QTRT_GATHER(NAME, F)                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) NAME(const uint8_t* __restrict__ w,                          \
        const int* ids, int m, int hidden, int vocab, float* __restrict__ y) { gather<F>(w, ids, hidden, vocab, y); }

QTRT_GATHER(q4k_gather, Q4K)
QTRT_GATHER(q6k_gather, Q6K)
QTRT_GATHER(q5_0_gather, Q50)
QTRT_GATHER(q8_0_gather, Q80)
