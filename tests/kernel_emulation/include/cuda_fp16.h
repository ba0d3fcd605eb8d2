// Host stand-in for CUDA's cuda_fp16.h, for the CPU emulation of the kernels (see emulate.hpp).
#pragma once
#include <cstdint>
struct __half {
    _Float16 v;
};
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
