//! The conv input gradient through `conv2d` (GEMM: polyphase and zero-insertion) against
//! candle's `conv_transpose2d` (the original path) and against finite differences, over kernel
//! sizes, strides, paddings, dilations and odd, non-square inputs whose last rows/columns the
//! forward's floor division drops; f16/bf16 against f32; and a negative control.

use candle_core::{DType, Device, Module, Tensor};
use diffexplainer::ops::{conv2d_input_grad, Conv2d, Conv2dConfig, ConvInputGrad};
use diffexplainer::testing::{check_gradient, pseudo_random_tensor};

const GEMM_METHODS: [ConvInputGrad; 2] = [ConvInputGrad::Polyphase, ConvInputGrad::ZeroInsertion];

fn input(shape: &[usize], scale: f64, seed: u64) -> Tensor {
    pseudo_random_tensor(shape, scale, seed, &Device::Cpu).unwrap()
}

/// `max |a - b| / max |b|`.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    assert_eq!(a.dims(), b.dims());
    let max = |t: Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    max(a.sub(&b).unwrap()) / max(b).max(1e-300)
}

fn config(padding: usize, stride: usize, dilation: usize) -> Conv2dConfig {
    Conv2dConfig {
        padding,
        stride,
        dilation,
        ..Default::default()
    }
}

/// Forward output size along one axis, or None when the kernel does not fit.
fn out_size(n: usize, k: usize, c: &Conv2dConfig) -> Option<usize> {
    (n + 2 * c.padding)
        .checked_sub(c.dilation * (k - 1) + 1)
        .map(|r| r / c.stride + 1)
}

/// Every (kernel, stride, padding, dilation, input size) of the matrix whose kernel fits.
fn matrix() -> Vec<(usize, Conv2dConfig, (usize, usize))> {
    let mut cases = vec![];
    for k in [1, 3, 4, 7] {
        for stride in [1, 2, 3] {
            for padding in [0, 1, 2, 3] {
                for dilation in [1, 2] {
                    // Odd and non-square, with different floor-division remainders per axis.
                    for hw in [(9, 14), (16, 11)] {
                        let c = config(padding, stride, dilation);
                        if out_size(hw.0, k, &c).is_some() && out_size(hw.1, k, &c).is_some() {
                            cases.push((k, c, hw));
                        }
                    }
                }
            }
        }
    }
    cases
}

#[test]
fn gemm_input_gradient_equals_conv_transpose2d_over_the_matrix() {
    let cases = matrix();
    assert!(cases.len() > 150, "only {} cases", cases.len());
    let mut dropped = 0;
    for (i, (k, c, (h, w))) in cases.iter().copied().enumerate() {
        // Batch 2, 3 input channels, 5 output channels.
        let weight = input(&[5, 3, k, k], 0.5, 100 + i as u64);
        let (oh, ow) = (out_size(h, k, &c).unwrap(), out_size(w, k, &c).unwrap());
        let natural = |o: usize| (o - 1) * c.stride + c.dilation * (k - 1) + 1 - 2 * c.padding;
        dropped += usize::from(natural(oh) < h || natural(ow) < w);
        let grad = input(&[2, 5, oh, ow], 1.0, 500 + i as u64);
        let reference =
            conv2d_input_grad(&grad, &weight, (h, w), &c, ConvInputGrad::Transpose).unwrap();
        assert_eq!(reference.dims(), &[2, 3, h, w]);
        for method in GEMM_METHODS {
            let g = conv2d_input_grad(&grad, &weight, (h, w), &c, method).unwrap();
            let err = rel_diff(&g, &reference);
            assert!(
                err < 1e-12,
                "{method:?} k{k} {c:?} {h}x{w}: differs from conv_transpose2d by {err:.3e}"
            );
        }
    }
    // The matrix must exercise the rows/columns the forward's floor division drops.
    assert!(
        dropped > 40,
        "only {dropped} cases drop input rows or columns"
    );
}

#[test]
fn gemm_input_gradient_matches_finite_differences() {
    // FD of <conv2d(x), cot> in f64 against each method's gradient of it (cot = the output
    // gradient), independent of candle's conv_transpose2d and of the environment variable.
    for (i, (k, c, (h, w))) in matrix().into_iter().enumerate() {
        let weight = input(&[5, 3, k, k], 0.5, 100 + i as u64);
        let x = input(&[2, 3, h, w], 1.0, 900 + i as u64);
        let forward = |x: &Tensor| x.conv2d(&weight, c.padding, c.stride, c.dilation, 1);
        let cot = input(forward(&x).unwrap().dims(), 1.0, 7);
        let objective = |x: &Tensor| {
            forward(x)
                .unwrap()
                .mul(&cot)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let flat = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // 48 coordinates spread over the tensor, plus the last row and column of each image
        // (what floor division drops, when it does).
        let n = flat.len();
        let mut coords: Vec<usize> = (0..48).map(|j| (j * n / 48 + j * 7) % n).collect();
        for b in 0..2 {
            for ch in 0..3 {
                let base = (b * 3 + ch) * h * w;
                coords.push(base + (h - 1) * w + (i % w));
                coords.push(base + (i % h) * w + w - 1);
            }
        }
        let numeric: Vec<f64> = coords
            .iter()
            .map(|&j| {
                let step = 1e-6;
                let (mut plus, mut minus) = (flat.clone(), flat.clone());
                plus[j] += step;
                minus[j] -= step;
                let t = |v: Vec<f64>| Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap();
                (objective(&t(plus)) - objective(&t(minus))) / (2.0 * step)
            })
            .collect();
        let scale = numeric.iter().fold(0f64, |m, d| m.max(d.abs()));
        assert!(
            scale > 1e-3,
            "k{k} {c:?}: gradient ~0, the check proves nothing"
        );
        for method in GEMM_METHODS {
            let g = conv2d_input_grad(&cot, &weight, (h, w), &c, method)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let err = coords
                .iter()
                .zip(&numeric)
                .fold(0f64, |m, (&j, d)| m.max((g[j] - d).abs()))
                / scale;
            assert!(
                err < 1e-6,
                "{method:?} k{k} {c:?} {h}x{w}: analytic vs finite differences {err:.3e}"
            );
        }
    }
}

#[test]
fn conv2d_module_backward_uses_a_correct_input_gradient() {
    // The whole Conv2d layer (bias, custom backward, the method from the environment), through
    // candle's autograd, including a non-square kernel and channels in != out.
    for ((kh, kw), c, hw) in [
        ((3, 3), config(1, 1, 1), (8, 11)),
        ((3, 3), config(1, 2, 1), (9, 12)),
        ((7, 7), config(3, 2, 1), (15, 12)),
        ((1, 1), config(0, 2, 1), (9, 10)),
        ((2, 5), config(2, 3, 2), (13, 10)),
    ] {
        let conv = Conv2d::new(
            input(&[6, 4, kh, kw], 0.5, 40),
            Some(input(&[6], 1.0, 41)),
            c,
        );
        let check = check_gradient(
            |x| conv.forward(x),
            &input(&[2, 4, hw.0, hw.1], 1.0, 42),
            1e-6,
            128,
        )
        .unwrap();
        assert!(check.scale > 1e-3);
        assert!(
            check.max_rel_error < 1e-6,
            "{kh}x{kw} {c:?} {hw:?}: {:.3e} (method {:?})",
            check.max_rel_error,
            ConvInputGrad::from_env()
        );
    }
}

#[test]
fn half_precision_input_gradients_track_f32() {
    // Real-ish channel counts so the GEMM's reductions are long (up to 64*49 terms).
    // Bar: 3e-3 relative to the gradient's largest magnitude (measured 4e-4 to 6.5e-4; f16 unit
    // roundoff 4.9e-4, inputs and weights rounded too). bf16 cannot run here: candle's CPU matmul has no bf16, so
    // neither conv2d's forward nor this backward runs in bf16 on the CPU (CUDA has both; the
    // device script's bench_iteration --dtype bf16 exercises it).
    for (k, c, hw) in [
        (3, config(1, 1, 1), (16, 13)),
        (3, config(1, 2, 1), (17, 16)),
        (7, config(3, 2, 1), (23, 20)),
        (1, config(0, 2, 1), (15, 16)),
    ] {
        let weight = input(&[64, 32, k, k], 0.1, 60);
        let (oh, ow) = (
            out_size(hw.0, k, &c).unwrap(),
            out_size(hw.1, k, &c).unwrap(),
        );
        let grad = input(&[2, 64, oh, ow], 1.0, 61);
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        for method in GEMM_METHODS {
            let want = conv2d_input_grad(&f32(&grad), &f32(&weight), hw, &c, method).unwrap();
            for (dtype, bar) in [(DType::F16, 3e-3)] {
                let g = conv2d_input_grad(
                    &grad.to_dtype(dtype).unwrap(),
                    &weight.to_dtype(dtype).unwrap(),
                    hw,
                    &c,
                    method,
                )
                .unwrap();
                assert_eq!(g.dtype(), dtype);
                let err = rel_diff(&g, &want);
                eprintln!("{method:?} {dtype:?} k{k} {c:?}: {err:.2e} from f32");
                assert!(
                    err < bar,
                    "{method:?} {dtype:?} k{k} {c:?}: {err:.3e} from f32 (bar {bar})"
                );
            }
        }
    }
}

#[test]
fn negative_control_an_unflipped_kernel_is_caught() {
    // Pre-flipping the weight spatially cancels the GEMM path's flip: the comparison above must
    // see it (3x3 s1 and the 3x3/s2 downsampler).
    let flip = |w: &Tensor| {
        let rev = Tensor::new(&[2u32, 1, 0], &Device::Cpu).unwrap();
        w.index_select(&rev, 2)
            .unwrap()
            .index_select(&rev, 3)
            .unwrap()
    };
    for c in [config(1, 1, 1), config(1, 2, 1)] {
        let weight = input(&[5, 3, 3, 3], 0.5, 70);
        let (h, w) = (9, 12);
        let (oh, ow) = (out_size(h, 3, &c).unwrap(), out_size(w, 3, &c).unwrap());
        let grad = input(&[2, 5, oh, ow], 1.0, 71);
        let reference =
            conv2d_input_grad(&grad, &weight, (h, w), &c, ConvInputGrad::Transpose).unwrap();
        for method in GEMM_METHODS {
            let wrong = conv2d_input_grad(&grad, &flip(&weight), (h, w), &c, method).unwrap();
            let err = rel_diff(&wrong, &reference);
            assert!(
                err > 0.1,
                "{method:?} {c:?}: an unflipped kernel passes ({err:.3e})"
            );
        }
    }
}

#[test]
fn grouped_convolutions_are_refused() {
    let groups = Conv2dConfig {
        groups: 2,
        ..Default::default()
    };
    let r = conv2d_input_grad(
        &input(&[1, 4, 3, 3], 1.0, 1),
        &input(&[4, 2, 1, 1], 1.0, 2),
        (3, 3),
        &groups,
        ConvInputGrad::Polyphase,
    );
    assert!(
        r.is_err(),
        "groups != 1 must be refused, not computed wrongly"
    );
}
