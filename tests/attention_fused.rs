//! The fused attention ops (`ops::attention_fused`) against the composed reference: the CPU
//! implementation runs the CUDA kernels' tiled algorithm (online softmax over key tiles, base-2
//! log-sum-exp, the D = rowsum(dO∘O) backward), so these tests check the algorithm the kernels
//! implement; the kernels themselves are checked on a GPU (CUDA parity with
//! DIFFEXPLAINER_ATTENTION=fused and `bench_group_norm --attention`, bench/run_on_device.sh).

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use diffexplainer::ops::attention::{composed_attention, AttentionMask};
use diffexplainer::ops::attention_fused::{fused_attention, fused_attention_forward, BK};

fn randn(shape: (usize, usize, usize, usize), seed: u64, dtype: DType) -> Tensor {
    // Deterministic values in about [-1.7, 1.7] (a simple LCG; no RNG dependency needed).
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f64> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 3.4
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// max |a − b| / max |b|, in f64.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let scale = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    diff / scale.max(1e-300)
}

type AttnFn<'a> = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + 'a;

/// Output and the gradients of Σ y∘w for q, k, v.
fn run(
    f: &AttnFn<'_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    w: &Tensor,
) -> (Tensor, Tensor, Tensor, Tensor) {
    let (qv, kv, vv) = (
        Var::from_tensor(q).unwrap(),
        Var::from_tensor(k).unwrap(),
        Var::from_tensor(v).unwrap(),
    );
    let y = f(qv.as_tensor(), kv.as_tensor(), vv.as_tensor()).unwrap();
    let loss = (y.to_dtype(DType::F64).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    (
        y,
        g.get(qv.as_tensor()).unwrap().clone(),
        g.get(kv.as_tensor()).unwrap().clone(),
        g.get(vv.as_tensor()).unwrap().clone(),
    )
}

struct Case {
    b: usize,
    h: usize,
    q_len: usize,
    k_len: usize,
    d: usize,
    causal: bool,
}

/// (b, h, q_len, k_len, d, causal): several key tiles with a partial last one, k_len above and
/// below q_len (cross-attention's 77), a single key, the SD/CLIP head dims.
fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for &(b, h, q_len, k_len, d) in &[
        (1, 2, 37, 77, 40),
        (2, 1, 70, 70, 64),
        (1, 2, 45, 20, 160),
        (1, 1, 9, 1, 8),
        (1, 1, 3, 2 * BK + 5, 80),
    ] {
        for causal in [false, true] {
            out.push(Case {
                b,
                h,
                q_len,
                k_len,
                d,
                causal,
            });
        }
    }
    out
}

fn compare(dtype: DType, bar_y: f64, bar_g: f64) -> f64 {
    let mut worst: f64 = 0.0;
    for (n, c) in cases().iter().enumerate() {
        let seed = 17 * n as u64;
        let q64 = randn((c.b, c.h, c.q_len, c.d), seed + 1, DType::F64);
        let k64 = randn((c.b, c.h, c.k_len, c.d), seed + 2, DType::F64);
        let v64 = randn((c.b, c.h, c.k_len, c.d), seed + 3, DType::F64);
        let w = randn((c.b, c.h, c.q_len, c.d), seed + 4, DType::F64);
        let mask = if c.causal {
            AttentionMask::Causal
        } else {
            AttentionMask::None
        };
        // Reference: the composed path in f64 on the inputs rounded to `dtype`.
        let round = |t: &Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
        let (q64, k64, v64) = (round(&q64), round(&k64), round(&v64));
        let reference = run(
            &|q, k, v| composed_attention(q, k, v, mask, None),
            &q64,
            &k64,
            &v64,
            &w,
        );
        let causal = c.causal;
        let fused = run(
            &|q, k, v| fused_attention(q, k, v, causal, None),
            &q64.to_dtype(dtype).unwrap(),
            &k64.to_dtype(dtype).unwrap(),
            &v64.to_dtype(dtype).unwrap(),
            &w,
        );
        let errs = [
            rel(&fused.0, &reference.0),
            rel(&fused.1, &reference.1),
            rel(&fused.2, &reference.2),
            rel(&fused.3, &reference.3),
        ];
        let shape = format!(
            "{dtype:?} b{} h{} q{} k{} d{} causal={}",
            c.b, c.h, c.q_len, c.k_len, c.d, c.causal
        );
        println!(
            "{shape}: y {:.1e} dq {:.1e} dk {:.1e} dv {:.1e}",
            errs[0], errs[1], errs[2], errs[3]
        );
        assert!(errs[0] <= bar_y, "{shape}: output off by {:.3e}", errs[0]);
        for (name, e) in ["dq", "dk", "dv"].iter().zip(&errs[1..]) {
            assert!(*e <= bar_g, "{shape}: {name} off by {e:.3e}");
        }
        worst = errs.iter().fold(worst, |a, &b| a.max(b));
    }
    worst
}

#[test]
fn fused_matches_composed_f64() {
    println!("worst {:.1e}", compare(DType::F64, 1e-12, 1e-11));
}

#[test]
fn fused_matches_composed_f32() {
    println!("worst {:.1e}", compare(DType::F32, 2e-6, 1e-5));
}

#[test]
fn fused_matches_composed_f16() {
    // Inputs rounded to f16 for both; the fused path rounds y and the gradients to f16 once.
    println!("worst {:.1e}", compare(DType::F16, 2e-3, 2e-3));
}

#[test]
fn fused_matches_composed_bf16() {
    println!("worst {:.1e}", compare(DType::BF16, 1e-2, 1e-2));
}

/// The stored base-2 log-sum-exp is log2 Σ_j exp(scale·q·k_j) over the visible keys.
#[test]
fn log_sum_exp_is_base_2_over_visible_keys() {
    for causal in [false, true] {
        let (q, k, v) = (
            randn((1, 2, 23, 16), 1, DType::F64),
            randn((1, 2, 50, 16), 2, DType::F64),
            randn((1, 2, 50, 16), 3, DType::F64),
        );
        let (_, lse2) = fused_attention_forward(&q, &k, &v, causal, Some(0.3)).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * 0.3).unwrap();
        let scores = if causal {
            let m = diffexplainer::ops::attention::causal_mask(23, 50, DType::F64, &Device::Cpu)
                .unwrap();
            scores.broadcast_add(&m).unwrap()
        } else {
            scores
        };
        let expected = (scores.exp().unwrap().sum(3).unwrap().log().unwrap()
            * std::f64::consts::LOG2_E)
            .unwrap();
        let e = rel(&lse2, &expected);
        assert!(e < 1e-13, "causal={causal}: lse2 off by {e:.3e}");
    }
}

/// A wrong scale is caught by the same comparison (the test is not vacuous).
#[test]
fn negative_control_wrong_scale_is_caught() {
    let (q, k, v) = (
        randn((1, 1, 20, 8), 5, DType::F64),
        randn((1, 1, 40, 8), 6, DType::F64),
        randn((1, 1, 40, 8), 7, DType::F64),
    );
    let y = composed_attention(&q, &k, &v, AttentionMask::None, None).unwrap();
    let wrong = fused_attention(&q, &k, &v, false, Some(1.01 / 8f64.sqrt())).unwrap();
    assert!(rel(&wrong, &y) > 1e-4);
    let causal_wrong = fused_attention(&q, &k, &v, true, None).unwrap();
    assert!(rel(&causal_wrong, &y) > 1e-2);
}

/// The scaled_dot_product_attention entry point never takes the fused path on the CPU.
#[test]
fn cpu_dispatch_keeps_the_blockwise_path() {
    let (q, k, v) = (
        Var::from_tensor(&randn((1, 1, 5, 8), 8, DType::F32)).unwrap(),
        randn((1, 1, 6, 8), 9, DType::F32),
        randn((1, 1, 6, 8), 10, DType::F32),
    );
    let y = diffexplainer::ops::scaled_dot_product_attention(
        q.as_tensor(),
        &k,
        &v,
        AttentionMask::None,
        None,
    )
    .unwrap();
    // Bit-identical to the block-wise path (the fused one rounds differently).
    let rows = 1 << 26; // what scaled_dot_product_attention picks for these sizes
    let blockwise = diffexplainer::ops::attention::memory_efficient_attention(
        q.as_tensor(),
        &k,
        &v,
        AttentionMask::None,
        None,
        rows,
    )
    .unwrap();
    assert_eq!(rel(&y, &blockwise), 0.0);
}

/// The CUDA kernels themselves (attention.cu, unchanged) under a CPU emulation of the CUDA
/// execution model (tests/kernel_emulation: a thread per CUDA thread, barriers for
/// __syncthreads and the shuffles, the launch geometry of the Rust launches), against a plain f64
/// attention: o, the log-sum-exp, dq, dk, dv for f32/f16/bf16, every head-dim variant, causal
/// and not, partial tiles, k_len 77 and 1. Needs g++ >= 12 (C++20, _Float16) and takes about a
/// minute and a half on 2 cores: `cargo test --release --test attention_fused -- --ignored`.
#[test]
#[ignore = "needs g++ >= 12; slow (about 90 s)"]
fn kernels_under_cpu_emulation() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let exe = std::env::temp_dir().join(format!("dx_attention_emu_{}", std::process::id()));
    let status = std::process::Command::new(std::env::var("CXX").unwrap_or_else(|_| "g++".into()))
        .current_dir(&root)
        .args([
            "-std=c++20",
            "-O2",
            "-pthread",
            "-I",
            "tests/kernel_emulation/include",
        ])
        .arg("tests/kernel_emulation/attention_emu.cpp")
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap();
    assert!(status.success(), "g++ failed on attention_emu.cpp");
    let out = std::process::Command::new(&exe).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    let _ = std::fs::remove_file(&exe);
    assert!(
        out.status.success() && text.contains("all cases ok"),
        "{text}"
    );
}

/// The committed PTX is nvcc's output for attention.cu and ptxas assembles it for sm_90. Needs
/// nvcc (`/opt/cuda13/nvidia/cu13/bin/nvcc`, or set NVCC), which CI does not install:
/// `cargo test --release --test attention_fused -- --ignored`.
#[test]
#[ignore = "needs nvcc (CUDA toolchain)"]
fn committed_ptx_is_up_to_date() {
    common::assert_committed_ptx_is_up_to_date("attention");
}
