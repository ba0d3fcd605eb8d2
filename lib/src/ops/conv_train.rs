//! 2-D convolution with trainable (tracked) weights whose backward runs on GEMMs.
//!
//! candle's own conv2d backward always computes the input's gradient with its
//! `conv_transpose2d`, a naive direct kernel (see [`super::frozen`]), even when the input is
//! not tracked; training a conv net on the CPU spent most of its time there. Here the forward
//! is candle's `conv2d` (im2col + GEMM) on detached tensors, attached to the graph of the
//! input, weight and bias through one custom op whose backward computes:
//! - the input's gradient with [`conv2d_input_grad`] (stride-1 GEMM convolutions), only when the
//!   input is tracked;
//! - the weight's gradient as one GEMM, `grad[o, (b,y,x)] · patches[(c,i,j), (b,y,x)]ᵀ`, over the
//!   input's patches gathered with strided views (the transpose of im2col);
//! - the bias's gradient, the sum of `grad` over batch and space.
//!
//! Groups and dilation other than 1 keep candle's path. `tests/conv_train.rs` checks all three
//! gradients against candle's conv backward and by finite differences.

use candle_core::{DType, Result, Tensor};
use candle_nn::Conv2dConfig;

use super::frozen::{attach3, conv2d_input_grad, ConvInputGrad};

/// Whether [`conv2d_trainable`] handles this configuration (groups and dilation 1).
pub fn supported(config: &Conv2dConfig) -> bool {
    config.groups == 1 && config.dilation == 1
}

/// `conv2d(x, weight) + bias` (PyTorch layouts: `x` `[b, c, h, w]`, `weight` `[o, c, kh, kw]`,
/// `bias` `[o]`) with the GEMM backward of the module docs. Values equal candle's `conv2d`.
pub fn conv2d_trainable(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    config: &Conv2dConfig,
) -> Result<Tensor> {
    if !supported(config) {
        candle_core::bail!(
            "conv2d_trainable: groups {} and dilation {} (only 1 is supported)",
            config.groups,
            config.dilation
        )
    }
    let (xd, wd) = (x.detach(), weight.detach());
    let mut y = xd.conv2d(&wd, config.padding, config.stride, 1, 1)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.detach().reshape((1, b.dim(0)?, 1, 1))?)?;
    }
    // attach3 needs a third tensor: without a bias, an untracked scalar stands in.
    let third = match bias {
        Some(b) => b.clone(),
        None => Tensor::zeros((), x.dtype(), x.device())?,
    };
    let has_bias = bias.is_some();
    let x_tracked = x.track_op();
    let (h, w) = (x.dim(2)?, x.dim(3)?);
    let config = *config;
    attach3(x, weight, &third, y, move |grad| {
        let gx = if x_tracked {
            let method = ConvInputGrad::from_env()?.for_input_channels(wd.dim(1)?);
            conv2d_input_grad(grad, &wd, (h, w), &config, method)?
        } else {
            xd.zeros_like()?
        };
        let gw = conv2d_weight_grad(&xd, grad, (wd.dim(2)?, wd.dim(3)?), &config)?;
        let gb = if has_bias {
            grad.sum((0, 2, 3))?
        } else {
            Tensor::zeros((), grad.dtype(), grad.device())?
        };
        Ok((gx, gw, gb))
    })
}

/// The gradient of `conv2d(x, weight, config)` with respect to a `[o, c, kh, kw]` weight, given
/// the output's gradient `grad` `[b, o, ho, wo]` (groups and dilation 1).
pub fn conv2d_weight_grad(
    x: &Tensor,
    grad: &Tensor,
    (kh, kw): (usize, usize),
    config: &Conv2dConfig,
) -> Result<Tensor> {
    let (b, c, _, _) = x.dims4()?;
    let (_, o, ho, wo) = grad.dims4()?;
    let (p, s) = (config.padding, config.stride);
    let xp = if p > 0 {
        x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?
    } else {
        x.clone()
    };
    let (span_h, span_w) = ((ho - 1) * s + 1, (wo - 1) * s + 1);
    let every = |n: usize| Tensor::arange_step(0u32, n as u32, s as u32, x.device());
    let (rows, cols) = (every(span_h)?, every(span_w)?);
    let mut patches = Vec::with_capacity(kh * kw);
    for i in 0..kh {
        for j in 0..kw {
            let mut t = xp.narrow(2, i, span_h)?.narrow(3, j, span_w)?;
            if s > 1 {
                t = t
                    .contiguous()?
                    .index_select(&rows, 2)?
                    .index_select(&cols, 3)?;
            }
            patches.push(t);
        }
    }
    // [b, c, kh·kw, ho, wo] → [c·kh·kw, b·ho·wo]: row (c, i, j) is PyTorch's weight order.
    let n = b * ho * wo;
    let patches = Tensor::stack(&patches, 2)?
        .permute((1, 2, 0, 3, 4))?
        .reshape((c * kh * kw, n))?;
    let g = grad.permute((1, 0, 2, 3))?.reshape((o, n))?;
    let gw = match x.dtype() {
        // Accumulate half-precision products in f32.
        DType::F16 | DType::BF16 => g
            .to_dtype(DType::F32)?
            .matmul(&patches.to_dtype(DType::F32)?.t()?)?
            .to_dtype(x.dtype())?,
        _ => g.matmul(&patches.t()?)?,
    };
    gw.reshape((o, c, kh, kw))
}
