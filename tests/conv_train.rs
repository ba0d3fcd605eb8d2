//! Training-mode ops: the conv with trainable weights (`ops::conv_train`, GEMM backward) and the
//! group norm with trainable affine parameters. Each gradient is checked against candle's own
//! autograd (a different code path) and by central finite differences in f64.

use candle_core::{Device, Module, Result, Tensor, Var};
use candle_nn::Conv2dConfig;
use diffexplainer::ops::{self, conv_train, Conv2d};
use diffexplainer::testing::{check_gradient, pseudo_random_tensor};

fn input(shape: &[usize], scale: f64, seed: u64) -> Tensor {
    pseudo_random_tensor(shape, scale, seed, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn config(padding: usize, stride: usize) -> Conv2dConfig {
    Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    }
}

/// (x, weight, bias) gradients of `sum(conv(x) · cot)` through `conv2d_trainable` and through
/// candle's `Tensor::conv2d`.
fn both_gradients(x_shape: &[usize], w_shape: &[usize], cfg: Conv2dConfig) {
    let x = Var::from_tensor(&input(x_shape, 1.0, 1)).unwrap();
    let w = Var::from_tensor(&input(w_shape, 0.5, 2)).unwrap();
    let b = Var::from_tensor(&input(&[w_shape[0]], 0.5, 3)).unwrap();
    let ours =
        conv_train::conv2d_trainable(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), &cfg)
            .unwrap();
    let theirs = x
        .as_tensor()
        .conv2d(w.as_tensor(), cfg.padding, cfg.stride, 1, 1)
        .unwrap()
        .broadcast_add(&b.as_tensor().reshape((1, w_shape[0], 1, 1)).unwrap())
        .unwrap();
    assert!(max_diff(&ours, &theirs) < 1e-12, "forward differs");
    let cot = input(ours.dims(), 1.0, 4);
    let g1 = (ours * &cot)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g2 = (theirs * &cot)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, v) in [("input", &x), ("weight", &w), ("bias", &b)] {
        let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
        let scale = b
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(scale > 1e-3, "{name}: zero reference gradient");
        let d = max_diff(a, b);
        assert!(
            d < 1e-10 * (1.0 + scale),
            "{name} gradient differs by {d:e} ({x_shape:?}, {w_shape:?}, {cfg:?})"
        );
    }
}

#[test]
fn conv_trainable_matches_candles_backward() {
    // Padding 1 stride 1 (a 3×3 ResNet conv), stride 2 with and without padding (downsamplers),
    // a non-square input, a 1×1 conv.
    both_gradients(&[2, 3, 6, 6], &[4, 3, 3, 3], config(1, 1));
    both_gradients(&[2, 4, 7, 7], &[5, 4, 3, 3], config(0, 2));
    both_gradients(&[2, 4, 8, 6], &[3, 4, 3, 3], config(1, 2));
    both_gradients(&[1, 3, 5, 9], &[2, 3, 3, 3], config(1, 1));
    both_gradients(&[2, 6, 4, 4], &[6, 6, 1, 1], config(0, 1));
    // A ViT's patch embedding: kernel = stride, no padding.
    both_gradients(&[2, 3, 8, 8], &[5, 3, 4, 4], config(0, 4));
}

#[test]
fn conv_trainable_weight_gradient_by_finite_differences() {
    let x = input(&[2, 3, 6, 5], 1.0, 5);
    let b = input(&[4], 0.5, 6);
    for cfg in [config(1, 1), config(0, 2)] {
        let check = check_gradient(
            |w| conv_train::conv2d_trainable(&x, w, Some(&b), &cfg),
            &input(&[4, 3, 3, 3], 0.5, 7),
            1e-6,
            64,
        )
        .unwrap();
        assert!(check.scale > 1e-3);
        assert!(
            check.max_rel_error < 1e-6,
            "{cfg:?}: {:e}",
            check.max_rel_error
        );
        let w = input(&[4, 3, 3, 3], 0.5, 7);
        let check = check_gradient(
            |x| conv_train::conv2d_trainable(x, &w, Some(&b), &cfg),
            &x,
            1e-6,
            64,
        )
        .unwrap();
        assert!(
            check.max_rel_error < 1e-6,
            "{cfg:?} input: {:e}",
            check.max_rel_error
        );
    }
}

#[test]
fn conv_module_with_var_weights_takes_the_trainable_path_and_trains_without_bias() {
    // ops::Conv2d with a Var weight and no bias (the ResNet's convs): gradients equal candle's.
    let x = Var::from_tensor(&input(&[2, 3, 5, 5], 1.0, 8)).unwrap();
    let w = Var::from_tensor(&input(&[4, 3, 3, 3], 0.5, 9)).unwrap();
    let conv = Conv2d::new(w.as_tensor().clone(), None, config(1, 1));
    let y = conv.forward(x.as_tensor()).unwrap();
    let r = x.as_tensor().conv2d(w.as_tensor(), 1, 1, 1, 1).unwrap();
    let cot = input(y.dims(), 1.0, 10);
    let g1 = (y * &cot).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (r * &cot).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_diff(g1.get(&w).unwrap(), g2.get(&w).unwrap()) < 1e-10);
    assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-10);
}

#[test]
fn group_norm_with_trainable_affine_matches_the_composed_path() {
    let x = Var::from_tensor(&input(&[2, 8, 3, 5], 2.0, 11)).unwrap();
    let w = Var::from_tensor(&input(&[8], 1.0, 12)).unwrap();
    let b = Var::from_tensor(&input(&[8], 1.0, 13)).unwrap();
    let f = |composed: bool| -> Result<(Tensor, candle_core::backprop::GradStore)> {
        let y = if composed {
            ops::group_norm_composed(
                x.as_tensor(),
                4,
                Some(w.as_tensor()),
                Some(b.as_tensor()),
                1e-6,
            )?
        } else {
            ops::group_norm(
                x.as_tensor(),
                4,
                Some(w.as_tensor()),
                Some(b.as_tensor()),
                1e-6,
            )?
        };
        let cot = input(y.dims(), 1.0, 14);
        let g = (&y * &cot)?.sum_all()?.backward()?;
        Ok((y, g))
    };
    let (y1, g1) = f(false).unwrap();
    let (y2, g2) = f(true).unwrap();
    assert!(max_diff(&y1, &y2) < 1e-10);
    for v in [&x, &w, &b] {
        let d = max_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
        assert!(d < 1e-9, "gradient differs by {d:e}");
    }
    // And the weight's gradient by finite differences.
    let bias = input(&[8], 1.0, 13);
    let check = check_gradient(
        |w| ops::group_norm(x.as_tensor(), 4, Some(w), Some(&bias), 1e-6),
        &input(&[8], 1.0, 12),
        1e-6,
        8,
    )
    .unwrap();
    assert!(
        check.scale > 1e-3 && check.max_rel_error < 1e-6,
        "{:e}",
        check.max_rel_error
    );
}
