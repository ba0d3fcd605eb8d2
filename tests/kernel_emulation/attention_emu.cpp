// Runs the fused attention kernels of lib/src/ops/attention.cu, unchanged, under the CPU
// emulation of emulate.hpp (launch geometry as in attention_fused.rs's CUDA launches), and checks
// o, the base-2 log-sum-exp, dq, dk and dv against a plain f64 attention on the same (rounded)
// inputs. Built and run by tests/attention_fused.rs (`kernels_under_cpu_emulation`, ignored:
// needs g++ >= 12):
//   g++ -std=c++20 -O2 -pthread -I tests/kernel_emulation/include \
//       tests/kernel_emulation/attention_emu.cpp -o /tmp/attention_emu && /tmp/attention_emu
// Prints one line per case and exits non-zero if any error is above its bar.
#include "emulate.hpp"
#include "../../lib/src/ops/attention.cu"

#include <cmath>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>

static float to_f(float v) { return v; }
static float to_f(__half v) { return __half2float(v); }
static float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T from_f(float v);
template <> float from_f<float>(float v) { return v; }
template <> __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

using FwdFn = void (*)(const void*, const void*, const void*, void*, float*, int, int, int, int,
                       float);
using DqFn = void (*)(const void*, const void*, const void*, const void*, const float*,
                      const float*, void*, int, int, int, int, float, float);
using DkdvFn = void (*)(const void*, const void*, const void*, const void*, const float*,
                        const float*, void*, void*, int, int, int, int, float, float);
using DotFn = void (*)(const void*, const void*, float*, long, int);

struct Kernels {
    FwdFn fwd;
    DqFn dq;
    DkdvFn dkdv;
    DotFn dot;
};

#define KSET(SUF, DSUF)                                                                      \
    Kernels{(FwdFn)fa_fwd_##SUF##_##DSUF, (DqFn)fa_bwd_dq_##SUF##_##DSUF,                   \
            (DkdvFn)fa_bwd_dkdv_##SUF##_##DSUF, (DotFn)fa_row_dot_##SUF}
#define KPICK(SUF, d)                                                                        \
    ((d) <= 40 ? KSET(SUF, d40) : (d) <= 64 ? KSET(SUF, d64) : (d) <= 80 ? KSET(SUF, d80)     \
                                                                        : KSET(SUF, d160))

template <typename T> Kernels kernels(int d);
template <> Kernels kernels<float>(int d) { return KPICK(f32, d); }
template <> Kernels kernels<__half>(int d) { return KPICK(f16, d); }
template <> Kernels kernels<__nv_bfloat16>(int d) { return KPICK(bf16, d); }

static double rel(const std::vector<double>& a, const std::vector<double>& b) {
    double diff = 0, scale = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        diff = std::max(diff, std::fabs(a[i] - b[i]));
        scale = std::max(scale, std::fabs(b[i]));
    }
    // Relative to the largest reference value; absolute where the reference is zero up to
    // rounding (k_len = 1: the softmax has no gradient, dq and dk are exactly 0).
    return scale < 1e-9 ? diff : diff / scale;
}

template <typename T>
static bool run_case(const char* name, int bh, int q_len, int k_len, int d, bool causal,
                     double bar, unsigned seed, float perturb = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto make = [&](size_t n) {
        std::vector<T> v(n);
        for (auto& e : v) e = from_f<T>(normal(rng));
        return v;
    };
    const size_t nq = (size_t)bh * q_len * d, nk = (size_t)bh * k_len * d;
    const size_t rows = (size_t)bh * q_len;
    auto q = make(nq), k = make(nk), v = make(nk), dout = make(nq);
    const double scale = 1.0 / std::sqrt((double)d);
    const float scale_log2 = (float)(scale * M_LOG2E);
    const int causal_i = causal ? 1 : 0;

    // The kernels, launched as attention_fused.rs launches them.
    const Kernels kr = kernels<T>(d);
    std::vector<T> o(nq), dq(nq), dk(nk), dv(nk);
    std::vector<float> lse2(rows), dvec(rows);
    const unsigned BQ_ = 64, BKB_ = 64, TPR_ = 4;
    emu_launch((q_len + BQ_ - 1) / BQ_, bh, BQ_ * TPR_, [&] {
        kr.fwd(q.data(), k.data(), v.data(), o.data(), lse2.data(), q_len, k_len, d, causal_i,
               scale_log2 * perturb);
    });
    emu_launch((rows + 255) / 256, 1, 256,
               [&] { kr.dot(dout.data(), o.data(), dvec.data(), (long)rows, d); });
    emu_launch((k_len + BKB_ - 1) / BKB_, bh, BKB_ * TPR_, [&] {
        kr.dkdv(q.data(), k.data(), v.data(), dout.data(), lse2.data(), dvec.data(), dk.data(),
                dv.data(), q_len, k_len, d, causal_i, scale_log2, (float)scale);
    });
    emu_launch((q_len + BQ_ - 1) / BQ_, bh, BQ_ * TPR_, [&] {
        kr.dq(q.data(), k.data(), v.data(), dout.data(), lse2.data(), dvec.data(), dq.data(),
              q_len, k_len, d, causal_i, scale_log2, (float)scale);
    });

    // Plain f64 attention and its gradients on the same values.
    auto at = [&](const std::vector<T>& x, size_t i) { return (double)to_f(x[i]); };
    std::vector<double> ro(nq, 0), rl(rows), rdq(nq, 0), rdk(nk, 0), rdv(nk, 0);
    for (int b = 0; b < bh; ++b)
        for (int i = 0; i < q_len; ++i) {
            const size_t qi = ((size_t)b * q_len + i) * d;
            std::vector<double> s(k_len), p(k_len), dp(k_len);
            double m = -INFINITY;
            for (int j = 0; j < k_len; ++j) {
                const size_t kj = ((size_t)b * k_len + j) * d;
                double acc = 0;
                for (int c = 0; c < d; ++c) acc += at(q, qi + c) * at(k, kj + c);
                s[j] = causal && j > i ? -INFINITY : acc * scale;
                m = std::max(m, s[j]);
            }
            double l = 0;
            for (int j = 0; j < k_len; ++j) l += std::exp(s[j] - m);
            rl[(size_t)b * q_len + i] = (m + std::log(l)) * M_LOG2E;
            double dsum = 0;
            for (int j = 0; j < k_len; ++j) {
                const size_t kj = ((size_t)b * k_len + j) * d;
                p[j] = std::exp(s[j] - m) / l;
                double a = 0;
                for (int c = 0; c < d; ++c) {
                    ro[qi + c] += p[j] * at(v, kj + c);
                    a += at(dout, qi + c) * at(v, kj + c);
                }
                dp[j] = a;
                dsum += p[j] * a;
            }
            for (int j = 0; j < k_len; ++j) {
                const size_t kj = ((size_t)b * k_len + j) * d;
                const double ds = p[j] * (dp[j] - dsum) * scale;
                for (int c = 0; c < d; ++c) {
                    rdq[qi + c] += ds * at(k, kj + c);
                    rdk[kj + c] += ds * at(q, qi + c);
                    rdv[kj + c] += p[j] * at(dout, qi + c);
                }
            }
        }
    auto dbl = [](const auto& x) {
        std::vector<double> r(x.size());
        for (size_t i = 0; i < x.size(); ++i) r[i] = (double)to_f(x[i]);
        return r;
    };
    const double e[5] = {rel(dbl(o), ro), rel(dbl(lse2), rl), rel(dbl(dq), rdq),
                         rel(dbl(dk), rdk), rel(dbl(dv), rdv)};
    bool ok = true;
    for (double x : e) ok = ok && x <= bar && std::isfinite(x);
    std::printf("%-5s bh%d q%d k%d d%d causal=%d: o %.1e lse2 %.1e dq %.1e dk %.1e dv %.1e %s\n",
                name, bh, q_len, k_len, d, (int)causal, e[0], e[1], e[2], e[3], e[4],
                ok ? "ok" : "FAIL");
    return ok;
}

int main() {
    bool ok = true;
    unsigned seed = 1;
    // (bh, q_len, k_len, d): partial query and key tiles, k_len 77 (cross-attention), k_len 1,
    // q_len above and below k_len, every head-dim variant and dims below each variant's width.
    const int shapes[][4] = {{2, 70, 77, 40}, {1, 130, 130, 64}, {2, 65, 33, 80},
                             {1, 45, 100, 160}, {1, 9, 1, 8},   {1, 3, 69, 100}};
    for (const auto& s : shapes)
        for (int causal = 0; causal < 2; ++causal) {
            ok &= run_case<float>("f32", s[0], s[1], s[2], s[3], causal, 2e-5, seed++);
            ok &= run_case<__half>("f16", s[0], s[1], s[2], s[3], causal, 3e-3, seed++);
            ok &= run_case<__nv_bfloat16>("bf16", s[0], s[1], s[2], s[3], causal, 2e-2, seed++);
        }
    // Negative control: a forward with a 1% wrong scale must fail the same bars.
    const bool caught = !run_case<float>("ctrl", 1, 70, 77, 40, false, 2e-5, 99, 1.01f);
    std::printf("negative control (forward scale +1%%) %s\n", caught ? "caught" : "NOT CAUGHT");
    ok = ok && caught;
    std::printf(ok ? "all cases ok\n" : "FAILED\n");
    return ok ? 0 : 1;
}
