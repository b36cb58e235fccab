// numpy's argmax order, shared by plugins/argmax.cu and the device sampler (which takes the argmax of a sampled step
// itself: greedy rows must get the same bits either way): the larger value wins, the smaller index on ties, and a NaN
// counts above everything (the first NaN wins).
#pragma once

__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
    const bool vn = isnan(v), bn = isnan(bv);
    if (vn || bn) return vn && (!bn || i < bi);
    return v > bv || (v == bv && i < bi);
}

__device__ __forceinline__ void take(float v, int i, float& bv, int& bi) {
    if (better(v, i, bv, bi)) { bv = v; bi = i; }
}
