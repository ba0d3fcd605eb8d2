//! Central finite differences (f64) against candle's autograd for every differentiable op.
//! A cut gradient (zero) or a wrong backward fails here without any reference library.

use candle_core::{Device, Module, Result, Tensor};
use diffexplainer::ops::{self, AttentionMask};
use diffexplainer::testing::{check_gradient, pseudo_random_tensor};

const STEP: f64 = 1e-6;
const BAR: f64 = 1e-6;

fn input(shape: &[usize], scale: f64, seed: u64) -> Tensor {
    pseudo_random_tensor(shape, scale, seed, &Device::Cpu).unwrap()
}

fn assert_gradient(name: &str, f: impl Fn(&Tensor) -> Result<Tensor>, x: &Tensor) {
    let check = check_gradient(f, x, STEP, 64).unwrap();
    assert!(
        check.scale > 1e-3,
        "{name}: the gradient is ~0 (scale {}), the check proves nothing",
        check.scale
    );
    assert!(
        check.max_rel_error < BAR,
        "{name}: analytic vs finite-difference gradient differ by {:.3e} (relative) over {} coords",
        check.max_rel_error,
        check.checked
    );
}

#[test]
fn layer_norm() {
    let w = input(&[16], 1.0, 1);
    let b = input(&[16], 1.0, 2);
    assert_gradient(
        "layer_norm",
        |x| ops::layer_norm(x, Some(&w), Some(&b), 1e-5),
        &input(&[3, 4, 16], 2.0, 3),
    );
}

#[test]
fn group_norm() {
    let w = input(&[8], 1.0, 1);
    let b = input(&[8], 1.0, 2);
    assert_gradient(
        "group_norm",
        |x| ops::group_norm(x, 4, Some(&w), Some(&b), 1e-6),
        &input(&[2, 8, 3, 5], 2.0, 4),
    );
}

#[test]
fn batch_norm_eval() {
    use candle_nn::VarBuilder;
    use std::collections::HashMap;
    let tensors = HashMap::from([
        ("weight".to_string(), input(&[4], 1.0, 1)),
        ("bias".to_string(), input(&[4], 1.0, 2)),
        ("running_mean".to_string(), input(&[4], 1.0, 3)),
        (
            "running_var".to_string(),
            (input(&[4], 0.5, 4) + 1.0).unwrap(),
        ),
    ]);
    let vb = VarBuilder::from_tensors(tensors, candle_core::DType::F64, &Device::Cpu);
    let bn = ops::BatchNorm2d::new(vb, 4, 1e-5).unwrap();
    assert_gradient(
        "batch_norm2d",
        |x| bn.forward(x),
        &input(&[2, 4, 3, 3], 2.0, 5),
    );
}

#[test]
fn softmax_and_log_softmax() {
    assert_gradient("softmax", ops::softmax_last_dim, &input(&[3, 5, 7], 3.0, 6));
    assert_gradient(
        "log_softmax",
        ops::log_softmax_last_dim,
        &input(&[3, 5, 7], 3.0, 7),
    );
}

#[test]
fn attention_gradients_reach_queries_keys_and_values() {
    let q = input(&[2, 2, 5, 4], 1.0, 8);
    let k = input(&[2, 2, 6, 4], 1.0, 9);
    let v = input(&[2, 2, 6, 3], 1.0, 10);
    let mask = input(&[2, 1, 5, 6], 2.0, 11);
    assert_gradient(
        "attention d/dq (additive mask)",
        |q| ops::scaled_dot_product_attention(q, &k, &v, AttentionMask::Additive(&mask), None),
        &q,
    );
    assert_gradient(
        "attention d/dk",
        |k| ops::scaled_dot_product_attention(&q, k, &v, AttentionMask::None, None),
        &k,
    );
    assert_gradient(
        "attention d/dv",
        |v| ops::scaled_dot_product_attention(&q, &k, v, AttentionMask::None, Some(0.3)),
        &v,
    );
    let kc = input(&[2, 2, 5, 4], 1.0, 12);
    let vc = input(&[2, 2, 5, 3], 1.0, 13);
    assert_gradient(
        "attention causal d/dk",
        |k| ops::scaled_dot_product_attention(&q, k, &vc, AttentionMask::Causal, None),
        &kc,
    );
}

#[test]
fn activations() {
    let x = input(&[4, 9], 4.0, 14);
    assert_gradient("gelu_erf", ops::gelu_erf, &x);
    // candle's tanh-GELU backward uses 6-digit constants: its error is ~1e-6 relative.
    let check = check_gradient(ops::gelu_tanh, &x, STEP, 64).unwrap();
    assert!(
        check.max_rel_error < 1e-5,
        "gelu_tanh: {:.3e}",
        check.max_rel_error
    );
    assert_gradient("quick_gelu", ops::quick_gelu, &x);
    assert_gradient("silu", ops::silu, &x);
}

#[test]
fn max_pool_resnet_stem_overlapping_windows() {
    // Distinct values so the max of each window is unique (the derivative exists).
    let x = input(&[1, 2, 9, 9], 5.0, 15);
    assert_gradient("max_pool2d 3x3/s2/p1", |x| ops::max_pool2d(x, 3, 2, 1), &x);
    assert_gradient("max_pool2d 2x2/s2", |x| ops::max_pool2d(x, 2, 2, 0), &x);
}

#[test]
fn average_pools() {
    let x = input(&[1, 2, 9, 8], 1.0, 16);
    assert_gradient("avg_pool2d 3x3/s2/p1", |x| ops::avg_pool2d(x, 3, 2, 1), &x);
    assert_gradient(
        "adaptive_avg_pool2d 9x8->7x7",
        |x| ops::adaptive_avg_pool2d(x, (7, 7)),
        &x,
    );
    assert_gradient(
        "adaptive_avg_pool2d 9x8->1x1",
        |x| ops::adaptive_avg_pool2d(x, (1, 1)),
        &x,
    );
}

#[test]
fn nearest_upsample_accumulates() {
    let x = input(&[1, 2, 3, 4], 1.0, 17);
    assert_gradient("upsample_nearest2x", ops::upsample_nearest2x, &x);
    // All-ones cotangent: each input pixel feeds four outputs, so its gradient is exactly 4
    // (candle's own upsample backward overwrites and would give 1).
    let var = candle_core::Var::from_tensor(&x).unwrap();
    let grads = ops::upsample_nearest2x(var.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = grads
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!(g.iter().all(|v| (v - 4.0).abs() < 1e-12), "{g:?}");
}

#[test]
fn bilinear_resize() {
    let x = input(&[1, 2, 13, 11], 1.0, 18);
    assert_gradient(
        "resize 13x11->5x4 antialias",
        |x| ops::resize_bilinear(x, (5, 4), true),
        &x,
    );
    assert_gradient(
        "resize 13x11->5x4",
        |x| ops::resize_bilinear(x, (5, 4), false),
        &x,
    );
    assert_gradient(
        "resize 13x11->20x17",
        |x| ops::resize_bilinear(x, (20, 17), false),
        &x,
    );
}

#[test]
fn bicubic_resize() {
    let x = input(&[1, 2, 6, 5], 1.0, 19);
    assert_gradient(
        "bicubic 6x5->13x11",
        |x| ops::resize_bicubic(x, (13, 11)),
        &x,
    );
    assert_gradient("bicubic 6x5->4x3", |x| ops::resize_bicubic(x, (4, 3)), &x);
}

#[test]
fn resize_weights_preserve_constants() {
    // Each interpolation row sums to one: a constant image stays constant, any scale factor.
    for (from, to, aa) in [
        (512, 224, true),
        (512, 256, true),
        (7, 19, false),
        (37, 16, false),
        (37, 16, true),
    ] {
        let m = ops::resize::bilinear_matrix(from, to, aa, candle_core::DType::F64, &Device::Cpu)
            .unwrap();
        let sums = m.sum(1).unwrap().to_vec1::<f64>().unwrap();
        assert!(
            sums.iter().all(|s| (s - 1.0).abs() < 1e-12),
            "{from}->{to} aa={aa}: {sums:?}"
        );
    }
}

/// Negative controls: the checker must catch the stock fused kernels whose gradient is cut.
/// If candle ever records a backward for them, these fail and tell us to revisit `ops`.
#[test]
fn checker_catches_candles_cut_gradients() {
    let x = input(&[3, 7], 3.0, 19);
    let check = check_gradient(|x| candle_nn::ops::softmax_last_dim(x), &x, STEP, 64).unwrap();
    assert!(
        check.max_rel_error > 0.5,
        "stock softmax_last_dim now differentiates correctly? {:.3e}",
        check.max_rel_error
    );
    let w = input(&[7], 1.0, 20);
    let b = input(&[7], 1.0, 21);
    // The fused layer norm has no f64 kernel: run it in f32 (the finite differences are coarser,
    // but a cut gradient is off by 100%, not by 1e-3).
    let f32 = candle_core::DType::F32;
    let (w, b) = (w.to_dtype(f32).unwrap(), b.to_dtype(f32).unwrap());
    let fused = |x: &Tensor| {
        candle_nn::ops::layer_norm(&x.to_dtype(f32)?, &w, &b, 1e-5)?
            .to_dtype(candle_core::DType::F64)
    };
    let check = check_gradient(fused, &x, 1e-3, 64).unwrap();
    assert!(
        check.max_rel_error > 0.5,
        "stock layer_norm now differentiates correctly? {:.3e}",
        check.max_rel_error
    );
}

#[test]
fn frozen_linear_and_conv_input_gradients() {
    use diffexplainer::ops::{Conv2d, Conv2dConfig, Linear};
    let w = input(&[5, 7], 1.0, 30);
    let b = input(&[5], 1.0, 31);
    let lin = Linear::new(w, Some(b));
    assert_gradient("linear", |x| lin.forward(x), &input(&[2, 3, 7], 1.0, 32));
    for (stride, padding, hw) in [
        (1, 1, (6, 6)),
        (2, 1, (9, 8)),
        (2, 3, (11, 10)),
        (16, 0, (32, 32)),
    ] {
        let k = if stride == 16 { 16 } else { 3 };
        let conv = Conv2d::new(
            input(&[4, 3, k, k], 0.5, 33),
            Some(input(&[4], 1.0, 34)),
            Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            },
        );
        // Non-square inputs with different remainders per axis: candle's own conv2d backward
        // fails on these (it takes the output padding from the height).
        assert_gradient(
            &format!("conv2d s{stride} p{padding} {hw:?}"),
            |x| conv.forward(x),
            &input(&[2, 3, hw.0, hw.1], 1.0, 35),
        );
    }
}

#[test]
fn frozen_layers_keep_no_weight_gradients_but_trainable_weights_get_theirs() {
    use diffexplainer::ops::Linear;
    let x = candle_core::Var::from_tensor(&input(&[4, 6], 1.0, 36)).unwrap();
    // A frozen (plain tensor) weight: the gradient store holds the input's gradient only.
    let frozen = Linear::new(input(&[3, 6], 1.0, 37), None);
    let grads = frozen
        .forward(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert_eq!(
        grads.get_ids().count(),
        1,
        "frozen weights must not accumulate gradients"
    );
    // A trainable weight (a Var) takes the ordinary path and gets its gradient.
    let wv = candle_core::Var::from_tensor(&input(&[3, 6], 1.0, 38)).unwrap();
    let trainable = Linear::new(wv.as_tensor().clone(), None);
    let grads = trainable
        .forward(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(wv.as_tensor()).is_some() && grads.get(x.as_tensor()).is_some());
}

#[test]
fn memory_efficient_attention_matches_the_composed_reference() {
    use diffexplainer::ops::attention::{composed_attention, memory_efficient_attention};
    let q = input(&[2, 2, 7, 4], 1.0, 40);
    let k = input(&[2, 2, 9, 4], 1.0, 41);
    let v = input(&[2, 2, 9, 3], 1.0, 42);
    let kc = input(&[2, 2, 7, 4], 1.0, 43);
    let vc = input(&[2, 2, 7, 3], 1.0, 44);
    let mask4 = input(&[2, 1, 7, 9], 2.0, 45);
    let mask2 = input(&[1, 9], 2.0, 46); // broadcast over batch, heads and queries
    let cases: Vec<(&str, &Tensor, &Tensor, AttentionMask)> = vec![
        ("none", &k, &v, AttentionMask::None),
        (
            "additive [b,1,q,k]",
            &k,
            &v,
            AttentionMask::Additive(&mask4),
        ),
        ("additive [1,k]", &k, &v, AttentionMask::Additive(&mask2)),
        ("causal", &kc, &vc, AttentionMask::Causal),
    ];
    for (name, k, v, mask) in cases {
        // Blocks of 3 query rows (7 = 3 + 3 + 1) exercise the block edges.
        let cot = input(&[2, 2, 7, 3], 1.0, 47);
        let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>| {
            let (qv, kv, vv) = (
                candle_core::Var::from_tensor(&q).unwrap(),
                candle_core::Var::from_tensor(k).unwrap(),
                candle_core::Var::from_tensor(v).unwrap(),
            );
            let y = f(qv.as_tensor(), kv.as_tensor(), vv.as_tensor()).unwrap();
            let g = y.mul(&cot).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Tensor> = [&qv, &kv, &vv]
                .iter()
                .map(|x| g.get(x.as_tensor()).unwrap().clone())
                .collect();
            (y, grads)
        };
        let (y_ref, g_ref) = run(&|q, k, v| composed_attention(q, k, v, mask, None));
        let (y, g) = run(&|q, k, v| memory_efficient_attention(q, k, v, mask, None, 3));
        let diff = |a: &Tensor, b: &Tensor| {
            a.sub(b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!(
            diff(&y, &y_ref) < 1e-12,
            "{name}: forward differs by {}",
            diff(&y, &y_ref)
        );
        for (i, (a, b)) in g.iter().zip(&g_ref).enumerate() {
            assert!(
                diff(a, b) < 1e-12,
                "{name}: gradient {i} differs by {}",
                diff(a, b)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Ties: max-like ops are not differentiable there, so finite differences cannot check them;
// the values below are PyTorch's (its autograd's choice at a tie).

fn grad_of(
    f: impl Fn(&Tensor) -> Result<Tensor>,
    x: &[f64],
    shape: &[usize],
    cot: f64,
) -> Vec<f64> {
    let x =
        candle_core::Var::from_tensor(&Tensor::from_vec(x.to_vec(), shape, &Device::Cpu).unwrap())
            .unwrap();
    let y = f(x.as_tensor()).unwrap();
    let grads = (y * cot).unwrap().sum_all().unwrap().backward().unwrap();
    grads
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

#[test]
fn max_pool2d_tie_gives_the_gradient_to_the_first_maximum() {
    // torch: x = [[1, 1], [0, 0]], max_pool2d(k=2, s=2), backward of 2.5 * y -> [2.5, 0, 0, 0].
    let g = grad_of(
        |x| ops::max_pool2d(x, 2, 2, 0),
        &[1.0, 1.0, 0.0, 0.0],
        &[1, 1, 2, 2],
        2.5,
    );
    assert_eq!(g, vec![2.5, 0.0, 0.0, 0.0]);
    // All four tied: still only the first.
    let g = grad_of(
        |x| ops::max_pool2d(x, 2, 2, 0),
        &[3.0; 4],
        &[1, 1, 2, 2],
        1.0,
    );
    assert_eq!(g, vec![1.0, 0.0, 0.0, 0.0]);
    // The tie in the second row: the first in row-major order is (1, 0).
    let g = grad_of(
        |x| ops::max_pool2d(x, 2, 2, 0),
        &[0.0, 0.0, 1.0, 1.0],
        &[1, 1, 2, 2],
        1.0,
    );
    assert_eq!(g, vec![0.0, 0.0, 1.0, 0.0]);
}

#[test]
fn max_pool2d_value_is_still_the_max_with_padding() {
    // -inf padding must not leak into the output (0 * -inf would be NaN).
    let x = Tensor::new(&[[[[-1.0f64, -2.0], [-3.0, -4.0]]]], &Device::Cpu).unwrap();
    let y = ops::max_pool2d(&x, 3, 2, 1).unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        vec![-1.0]
    );
}

#[test]
fn relu_gradient_at_zero_is_zero() {
    // torch.relu backward (threshold_backward): 1 where x > 0 only.
    let g = grad_of(ops::relu, &[-1.0, 0.0, 2.0], &[3], 1.0);
    assert_eq!(g, vec![0.0, 0.0, 1.0]);
}

#[test]
fn clamp_gradient_includes_the_bounds() {
    // torch.clamp backward: 1 where min <= x <= max, bounds included.
    let g = grad_of(
        |x| ops::clamp(x, 0.0, 1.0),
        &[-0.5, 0.0, 0.5, 1.0, 1.5],
        &[5],
        1.0,
    );
    assert_eq!(g, vec![0.0, 1.0, 1.0, 1.0, 0.0]);
    let y = ops::clamp(
        &Tensor::new(&[-0.5f64, 0.25, 1.5], &Device::Cpu).unwrap(),
        0.0,
        1.0,
    )
    .unwrap();
    assert_eq!(y.to_vec1::<f64>().unwrap(), vec![0.0, 0.25, 1.0]);
}
