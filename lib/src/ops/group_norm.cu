// Fused group normalization for `ops::group_norm` (see group_norm.rs): forward statistics,
// forward affine output, backward per-group reduction, backward input gradient.
//
// x is contiguous [B, C, S] (S = product of the trailing dims); group (b, g) is the contiguous
// run of `group_len = (C / G) * S` elements starting at (b*G + g) * group_len. Statistics and
// all arithmetic are in A = float for half/bfloat16/float inputs, double for double inputs.
//
// The committed PTX (group_norm.ptx, loaded by CudaDevice::get_or_load_custom_func) is made
// from this file with
//   nvcc -ptx -arch=sm_80 -o lib/src/ops/group_norm.ptx lib/src/ops/group_norm.cu
// (CUDA 13.0: /opt/cuda13/nvidia/cu13/bin/nvcc); sm_80 PTX is JIT-compiled by the driver for
// sm_90 (H100/H200) as well. tests/group_norm.rs regenerates it when nvcc is available and
// fails if the committed file is stale, and assembles it for sm_90 with ptxas.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float load(__half v) { return __half2float(v); }
__device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float load(float v) { return v; }
__device__ __forceinline__ double load(double v) { return v; }

__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `shared` holds 32 entries; consecutive calls are safe (the leading barrier).
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        v = lane < warps ? shared[lane] : A(0);
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    return shared[0];
}

// One block per (b, g): stats[2*bg] = mean, stats[2*bg+1] = 1/sqrt(var + eps) (two passes:
// the mean, then the sum of squared deviations; biased variance as in PyTorch).
template <typename T, typename A>
__device__ void stats_kernel(const T* x, A* stats, int64_t group_len, double eps) {
    __shared__ A shared[32];
    const int64_t bg = blockIdx.x;
    const T* xg = x + bg * group_len;
    A s = 0;
    for (int64_t i = threadIdx.x; i < group_len; i += blockDim.x) s += load(xg[i]);
    const A mean = block_sum(s, shared) / A(group_len);
    A q = 0;
    for (int64_t i = threadIdx.x; i < group_len; i += blockDim.x) {
        const A d = load(xg[i]) - mean;
        q += d * d;
    }
    const A var = block_sum(q, shared) / A(group_len);
    if (threadIdx.x == 0) {
        stats[2 * bg] = mean;
        stats[2 * bg + 1] = A(1) / sqrt(var + A(eps));
    }
}

// Grid (B*C rows, spatial chunks): y = (x - mean) * rstd * w[c] + b[c]; w, b may be null.
template <typename T, typename A>
__device__ void apply_kernel(const T* x, const A* stats, const T* w, const T* b, T* y,
                             int64_t channels, int64_t per_group, int64_t spatial) {
    const int64_t row = blockIdx.x;  // b * C + c
    const int64_t c = row % channels;
    const int64_t bg = row / per_group;
    const A rstd = stats[2 * bg + 1];
    const A scale = w ? rstd * load(w[c]) : rstd;
    const A shift = (b ? load(b[c]) : A(0)) - stats[2 * bg] * scale;
    const T* xr = x + row * spatial;
    T* yr = y + row * spatial;
    for (int64_t i = (int64_t)blockIdx.y * blockDim.x + threadIdx.x; i < spatial;
         i += (int64_t)gridDim.y * blockDim.x)
        store(yr + i, load(xr[i]) * scale + shift);
}

// One block per (b, g): with dy' = dy * w[c] and xhat = (x - mean) * rstd,
// red[2*bg] = mean(dy'), red[2*bg+1] = mean(dy' * xhat) over the group.
template <typename T, typename A>
__device__ void backward_reduce_kernel(const T* dy, const T* x, const A* stats, const T* w,
                                       A* red, int64_t channels, int64_t per_group,
                                       int64_t spatial) {
    __shared__ A shared[32];
    const int64_t bg = blockIdx.x;
    const int64_t group_len = per_group * spatial;
    const int64_t c0 = (bg * per_group) % channels;  // the group's first channel
    const T* xg = x + bg * group_len;
    const T* dyg = dy + bg * group_len;
    const A mean = stats[2 * bg], rstd = stats[2 * bg + 1];
    A s1 = 0, s2 = 0;
    for (int64_t i = threadIdx.x; i < group_len; i += blockDim.x) {
        A d = load(dyg[i]);
        if (w) d *= load(w[c0 + i / spatial]);
        s1 += d;
        s2 += d * ((load(xg[i]) - mean) * rstd);
    }
    s1 = block_sum(s1, shared);
    s2 = block_sum(s2, shared);
    if (threadIdx.x == 0) {
        red[2 * bg] = s1 / A(group_len);
        red[2 * bg + 1] = s2 / A(group_len);
    }
}

// Grid (B*C rows, spatial chunks): dx = rstd * (dy * w[c] - red[0] - xhat * red[1]).
template <typename T, typename A>
__device__ void backward_apply_kernel(const T* dy, const T* x, const A* stats, const T* w,
                                      const A* red, T* dx, int64_t channels, int64_t per_group,
                                      int64_t spatial) {
    const int64_t row = blockIdx.x;
    const int64_t c = row % channels;
    const int64_t bg = row / per_group;
    const A mean = stats[2 * bg], rstd = stats[2 * bg + 1];
    const A wc = w ? load(w[c]) : A(1);
    const A m1 = red[2 * bg], m2 = red[2 * bg + 1];
    const T* xr = x + row * spatial;
    const T* dyr = dy + row * spatial;
    T* dxr = dx + row * spatial;
    for (int64_t i = (int64_t)blockIdx.y * blockDim.x + threadIdx.x; i < spatial;
         i += (int64_t)gridDim.y * blockDim.x) {
        const A xhat = (load(xr[i]) - mean) * rstd;
        store(dxr + i, rstd * (load(dyr[i]) * wc - m1 - xhat * m2));
    }
}

#define GN_KERNELS(SUFFIX, T, A)                                                              \
    extern "C" __global__ void gn_stats_##SUFFIX(const T* x, A* stats, int64_t group_len,     \
                                                 double eps) {                                \
        stats_kernel<T, A>(x, stats, group_len, eps);                                         \
    }                                                                                         \
    extern "C" __global__ void gn_apply_##SUFFIX(const T* x, const A* stats, const T* w,      \
                                                 const T* b, T* y, int64_t channels,          \
                                                 int64_t per_group, int64_t spatial) {        \
        apply_kernel<T, A>(x, stats, w, b, y, channels, per_group, spatial);                  \
    }                                                                                         \
    extern "C" __global__ void gn_backward_reduce_##SUFFIX(                                   \
        const T* dy, const T* x, const A* stats, const T* w, A* red, int64_t channels,        \
        int64_t per_group, int64_t spatial) {                                                 \
        backward_reduce_kernel<T, A>(dy, x, stats, w, red, channels, per_group, spatial);     \
    }                                                                                         \
    extern "C" __global__ void gn_backward_apply_##SUFFIX(                                    \
        const T* dy, const T* x, const A* stats, const T* w, const A* red, T* dx,             \
        int64_t channels, int64_t per_group, int64_t spatial) {                               \
        backward_apply_kernel<T, A>(dy, x, stats, w, red, dx, channels, per_group, spatial);  \
    }

GN_KERNELS(f16, __half, float)
GN_KERNELS(bf16, __nv_bfloat16, float)
GN_KERNELS(f32, float, float)
GN_KERNELS(f64, double, double)
