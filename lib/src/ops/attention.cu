// Fused attention for `ops::attention` (see attention_fused.rs): FlashAttention-2 style forward
// (online softmax, writes the output and the per-row log-sum-exp) and backward (D = rowsum(dO∘O),
// then dk/dv over key tiles and dq over query tiles, no atomics). Plain FP32 arithmetic on the
// CUDA cores (no tensor cores yet): simple first, correct first.
//
// Layout: q [BH, q_len, d], k and v [BH, k_len, d], o and dO like q, all contiguous; lse2 and D
// are f32 [BH, q_len]. blockIdx.y is the (batch·head) index. Scores are kept in base 2:
// s2 = (q·k) · scale · log2(e), and lse2 = log2 Σ_j 2^{s2_j} (= the natural log-sum-exp times
// log2(e)), so p = exp2(s2 − lse2). Causal: query i sees keys j <= i (top-left aligned).
//
// Thread mapping: TPR = 4 threads per row (query row in the forward and dq, key row in dk/dv);
// thread t of a row owns the columns c·4 + t (c < DC, so d <= 4·DC; variants DC = 10, 16, 20,
// 40 for d <= 40, 64, 80, 160: SD's 40/80/160 and CLIP's 64 run without padding), holds them in
// registers and gets dot products with two xor-shuffles. The other operand's tile is staged in
// shared memory as f32. All arithmetic is f32 for every input dtype.
//
// The committed PTX (attention.ptx, loaded by CudaDevice::get_or_load_custom_func) is made
// from this file with
//   nvcc -ptx -arch=sm_80 -o lib/src/ops/attention.ptx lib/src/ops/attention.cu
// (CUDA 13.0: /opt/cuda13/nvidia/cu13/bin/nvcc); sm_80 PTX is JIT-compiled by the driver for
// sm_90 (H100/H200) as well. tests/attention_fused.rs regenerates it when nvcc is available and
// fails if the committed file is stale, and assembles it for sm_90 with ptxas.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define TPR 4    // threads per row
#define BQ 64    // query rows per block (forward, dq): 256 threads
#define BK 32    // keys per shared tile (forward, dq)
#define BKB 64   // key rows per block (dk/dv): 256 threads
#define BQB 32   // query rows per shared tile (dk/dv)
#define FULL 0xffffffffu

__device__ __forceinline__ float load(__half v) { return __half2float(v); }
__device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float load(float v) { return v; }

__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }

// Sum over the TPR = 4 threads of a row (consecutive lanes).
__device__ __forceinline__ float row_sum(float v) {
    v += __shfl_xor_sync(FULL, v, 1);
    v += __shfl_xor_sync(FULL, v, 2);
    return v;
}

// Rows [row0, row0 + rows) of a [len, d] matrix into shared f32 [rows][ld], zero past `len` and
// in the padding columns d..ld (the unused register columns multiply them: no NaN from garbage).
template <typename T>
__device__ __forceinline__ void stage(float* dst, int ld, const T* src, int row0, int rows,
                                      int len, int d) {
    for (int e = threadIdx.x; e < rows * ld; e += blockDim.x) {
        const int r = e / ld, c = e - r * ld;
        dst[e] = row0 + r < len && c < d ? load(src[(size_t)(row0 + r) * d + c]) : 0.0f;
    }
}

// Forward: grid (ceil(q_len / BQ), BH), block BQ·TPR.
template <typename T, int DC>
__device__ void fa_forward(const T* __restrict__ q, const T* __restrict__ k,
                           const T* __restrict__ v, T* __restrict__ o, float* __restrict__ lse2,
                           int q_len, int k_len, int d, int causal, float scale_log2) {
    constexpr int LD = DC * TPR;
    __shared__ float ks[BK * LD];
    __shared__ float vs[BK * LD];
    const size_t bh = blockIdx.y;
    q += bh * q_len * d;
    o += bh * q_len * d;
    k += bh * k_len * d;
    v += bh * k_len * d;
    lse2 += bh * q_len;
    const int t = threadIdx.x & (TPR - 1);
    const int row = blockIdx.x * BQ + threadIdx.x / TPR;
    const bool valid = row < q_len;

    float qr[DC], acc[DC];
#pragma unroll
    for (int c = 0; c < DC; ++c) {
        const int col = c * TPR + t;
        qr[c] = valid && col < d ? load(q[(size_t)row * d + col]) * scale_log2 : 0.0f;
        acc[c] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const int k_end = causal ? min(k_len, (int)(blockIdx.x + 1) * BQ) : k_len;
    for (int j0 = 0; j0 < k_end; j0 += BK) {
        __syncthreads();
        stage(ks, LD, k, j0, BK, k_len, d);
        stage(vs, LD, v, j0, BK, k_len, d);
        __syncthreads();
        float s[BK];
        float tile_max = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < BK; ++jj) {
            float part = 0.0f;
#pragma unroll
            for (int c = 0; c < DC; ++c) part += qr[c] * ks[jj * LD + c * TPR + t];
            part = row_sum(part);
            const int j = j0 + jj;
            s[jj] = j < k_len && (!causal || j <= row) ? part : -INFINITY;
            tile_max = fmaxf(tile_max, s[jj]);
        }
        const float m_new = fmaxf(m, tile_max);
        if (m_new == -INFINITY) continue;  // nothing visible yet (only rows past q_len)
        const float alpha = exp2f(m - m_new);  // 0 on the first visible tile
        l *= alpha;
#pragma unroll
        for (int c = 0; c < DC; ++c) acc[c] *= alpha;
#pragma unroll
        for (int jj = 0; jj < BK; ++jj) {
            const float p = exp2f(s[jj] - m_new);
            l += p;
#pragma unroll
            for (int c = 0; c < DC; ++c) acc[c] += p * vs[jj * LD + c * TPR + t];
        }
        m = m_new;
    }
    if (!valid) return;
    const float inv = 1.0f / l;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
        const int col = c * TPR + t;
        if (col < d) store(&o[(size_t)row * d + col], acc[c] * inv);
    }
    if (t == 0) lse2[row] = m + log2f(l);
}

// D[r] = Σ_c dO[r, c] · O[r, c] over all BH·q_len rows: grid (ceil(rows / 256)), block 256.
template <typename T>
__device__ void fa_row_dot(const T* __restrict__ dout, const T* __restrict__ out,
                           float* __restrict__ dvec, long rows, int d) {
    const long r = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float s = 0.0f;
    for (int c = 0; c < d; ++c) s += load(dout[r * d + c]) * load(out[r * d + c]);
    dvec[r] = s;
}

// dq: grid (ceil(q_len / BQ), BH), block BQ·TPR. dq_i = scale · Σ_j p_ij (dp_ij − D_i) k_j.
template <typename T, int DC>
__device__ void fa_backward_dq(const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, const T* __restrict__ dout,
                               const float* __restrict__ lse2, const float* __restrict__ dvec,
                               T* __restrict__ dq, int q_len, int k_len, int d, int causal,
                               float scale_log2, float scale) {
    constexpr int LD = DC * TPR;
    __shared__ float ks[BK * LD];
    __shared__ float vs[BK * LD];
    const size_t bh = blockIdx.y;
    q += bh * q_len * d;
    dout += bh * q_len * d;
    dq += bh * q_len * d;
    k += bh * k_len * d;
    v += bh * k_len * d;
    lse2 += bh * q_len;
    dvec += bh * q_len;
    const int t = threadIdx.x & (TPR - 1);
    const int row = blockIdx.x * BQ + threadIdx.x / TPR;
    const bool valid = row < q_len;

    float qr[DC], dor[DC], acc[DC];
#pragma unroll
    for (int c = 0; c < DC; ++c) {
        const int col = c * TPR + t;
        const bool in = valid && col < d;
        qr[c] = in ? load(q[(size_t)row * d + col]) * scale_log2 : 0.0f;
        dor[c] = in ? load(dout[(size_t)row * d + col]) : 0.0f;
        acc[c] = 0.0f;
    }
    const float li = valid ? lse2[row] : 0.0f;
    const float di = valid ? dvec[row] : 0.0f;
    const int k_end = causal ? min(k_len, (int)(blockIdx.x + 1) * BQ) : k_len;
    for (int j0 = 0; j0 < k_end; j0 += BK) {
        __syncthreads();
        stage(ks, LD, k, j0, BK, k_len, d);
        stage(vs, LD, v, j0, BK, k_len, d);
        __syncthreads();
#pragma unroll 4
        for (int jj = 0; jj < BK; ++jj) {
            float s = 0.0f, dp = 0.0f;
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                s += qr[c] * ks[jj * LD + c * TPR + t];
                dp += dor[c] * vs[jj * LD + c * TPR + t];
            }
            s = row_sum(s);
            dp = row_sum(dp);
            const int j = j0 + jj;
            const bool ok = valid && j < k_len && (!causal || j <= row);
            const float ds = ok ? exp2f(s - li) * (dp - di) : 0.0f;
#pragma unroll
            for (int c = 0; c < DC; ++c) acc[c] += ds * ks[jj * LD + c * TPR + t];
        }
    }
    if (!valid) return;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
        const int col = c * TPR + t;
        if (col < d) store(&dq[(size_t)row * d + col], acc[c] * scale);
    }
}

// dk, dv: grid (ceil(k_len / BKB), BH), block BKB·TPR.
// dv_j = Σ_i p_ij dO_i, dk_j = scale · Σ_i p_ij (dp_ij − D_i) q_i.
template <typename T, int DC>
__device__ void fa_backward_dkdv(const T* __restrict__ q, const T* __restrict__ k,
                                 const T* __restrict__ v, const T* __restrict__ dout,
                                 const float* __restrict__ lse2, const float* __restrict__ dvec,
                                 T* __restrict__ dk, T* __restrict__ dv, int q_len, int k_len,
                                 int d, int causal, float scale_log2, float scale) {
    constexpr int LD = DC * TPR;
    __shared__ float qs[BQB * LD];
    __shared__ float dos[BQB * LD];
    __shared__ float ls[BQB];
    __shared__ float ds_[BQB];
    const size_t bh = blockIdx.y;
    q += bh * q_len * d;
    dout += bh * q_len * d;
    k += bh * k_len * d;
    v += bh * k_len * d;
    dk += bh * k_len * d;
    dv += bh * k_len * d;
    lse2 += bh * q_len;
    dvec += bh * q_len;
    const int t = threadIdx.x & (TPR - 1);
    const int key = blockIdx.x * BKB + threadIdx.x / TPR;
    const bool valid = key < k_len;

    float kr[DC], vr[DC], dka[DC], dva[DC];
#pragma unroll
    for (int c = 0; c < DC; ++c) {
        const int col = c * TPR + t;
        const bool in = valid && col < d;
        kr[c] = in ? load(k[(size_t)key * d + col]) * scale_log2 : 0.0f;
        vr[c] = in ? load(v[(size_t)key * d + col]) : 0.0f;
        dka[c] = 0.0f;
        dva[c] = 0.0f;
    }
    // Causal: query rows before this block's first key see none of its keys.
    const int i_start = causal ? (int)blockIdx.x * BKB : 0;
    for (int i0 = i_start; i0 < q_len; i0 += BQB) {
        __syncthreads();
        stage(qs, LD, q, i0, BQB, q_len, d);
        stage(dos, LD, dout, i0, BQB, q_len, d);
        if (threadIdx.x < BQB) {
            const int i = i0 + threadIdx.x;
            ls[threadIdx.x] = i < q_len ? lse2[i] : 0.0f;
            ds_[threadIdx.x] = i < q_len ? dvec[i] : 0.0f;
        }
        __syncthreads();
#pragma unroll 4
        for (int ii = 0; ii < BQB; ++ii) {
            float s = 0.0f, dp = 0.0f;
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                s += kr[c] * qs[ii * LD + c * TPR + t];
                dp += vr[c] * dos[ii * LD + c * TPR + t];
            }
            s = row_sum(s);
            dp = row_sum(dp);
            const int i = i0 + ii;
            const bool ok = valid && i < q_len && (!causal || key <= i);
            const float p = ok ? exp2f(s - ls[ii]) : 0.0f;
            const float ds = p * (dp - ds_[ii]);
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                dva[c] += p * dos[ii * LD + c * TPR + t];
                dka[c] += ds * qs[ii * LD + c * TPR + t];
            }
        }
    }
    if (!valid) return;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
        const int col = c * TPR + t;
        if (col < d) {
            store(&dk[(size_t)key * d + col], dka[c] * scale);
            store(&dv[(size_t)key * d + col], dva[c]);
        }
    }
}

#define FA_KERNELS(T, SUF, DC, DSUF)                                                              \
    extern "C" __global__ void __launch_bounds__(BQ * TPR)                                       \
        fa_fwd_##SUF##_##DSUF(const T* q, const T* k, const T* v, T* o, float* lse2, int q_len, \
                              int k_len, int d, int causal, float scale_log2) {                  \
        fa_forward<T, DC>(q, k, v, o, lse2, q_len, k_len, d, causal, scale_log2);                \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(BQ * TPR) fa_bwd_dq_##SUF##_##DSUF(            \
        const T* q, const T* k, const T* v, const T* dout, const float* lse2, const float* dvec, \
        T* dq, int q_len, int k_len, int d, int causal, float scale_log2, float scale) {         \
        fa_backward_dq<T, DC>(q, k, v, dout, lse2, dvec, dq, q_len, k_len, d, causal,            \
                              scale_log2, scale);                                                \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(BKB * TPR) fa_bwd_dkdv_##SUF##_##DSUF(         \
        const T* q, const T* k, const T* v, const T* dout, const float* lse2, const float* dvec, \
        T* dk, T* dv, int q_len, int k_len, int d, int causal, float scale_log2, float scale) {  \
        fa_backward_dkdv<T, DC>(q, k, v, dout, lse2, dvec, dk, dv, q_len, k_len, d, causal,      \
                                scale_log2, scale);                                              \
    }

#define FA_DTYPE(T, SUF)                                                                          \
    FA_KERNELS(T, SUF, 10, d40)                                                                  \
    FA_KERNELS(T, SUF, 16, d64)                                                                  \
    FA_KERNELS(T, SUF, 20, d80)                                                                  \
    FA_KERNELS(T, SUF, 40, d160)                                                                 \
    extern "C" __global__ void fa_row_dot_##SUF(const T* dout, const T* out, float* dvec,        \
                                                long rows, int d) {                              \
        fa_row_dot<T>(dout, out, dvec, rows, d);                                                 \
    }

FA_DTYPE(__half, f16)
FA_DTYPE(__nv_bfloat16, bf16)
FA_DTYPE(float, f32)
