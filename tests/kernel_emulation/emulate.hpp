// A CPU emulation of the CUDA execution model, enough to run lib/src/ops/*.cu kernels unchanged
// on the host: every thread of a block is an OS thread, blocks run one after another, shared
// memory is a function-local static (one block at a time), __syncthreads is a std::barrier over
// the block, and __shfl_xor_sync goes through a per-block array between two barriers (so every
// thread of the block must reach it, as in the kernels here, which never shuffle divergently).
// Include this, then the .cu file (with include/ first on the include path for the fp16/bf16
// stand-ins).
#pragma once
#include <math.h>
#include <algorithm>
#include <barrier>
#include <cstdio>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
#define __launch_bounds__(x)

struct EmuDim3 {
    unsigned x = 0, y = 0, z = 0;
};
thread_local EmuDim3 threadIdx, blockIdx;
EmuDim3 blockDim;
std::barrier<>* emu_barrier = nullptr;
float emu_shuffle[1024];

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int mask) {
    const unsigned t = threadIdx.x;
    emu_shuffle[t] = v;
    __syncthreads();
    const float r = emu_shuffle[t ^ (unsigned)mask];
    __syncthreads();
    return r;
}
using std::max;
using std::min;

// Runs `kernel()` on a (gx, gy) grid of `threads`-thread blocks.
template <typename F>
void emu_launch(unsigned gx, unsigned gy, unsigned threads, F kernel) {
    blockDim = EmuDim3{threads, 1, 1};
    for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x) {
            std::barrier<> bar(threads);
            emu_barrier = &bar;
            std::vector<std::thread> ts;
            ts.reserve(threads);
            for (unsigned t = 0; t < threads; ++t)
                ts.emplace_back([=] {
                    threadIdx = EmuDim3{t, 0, 0};
                    blockIdx = EmuDim3{x, y, 0};
                    kernel();
                });
            for (auto& th : ts) th.join();
        }
}
