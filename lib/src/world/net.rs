//! The classifier under audit in training mode: the same torchvision ResNet (basic blocks, the
//! small-image stem) as `models/classifiers/resnet.rs`, over the same `Var`s, built once per
//! run, with train-mode batch norm and a convolution whose weight and input gradients are GEMMs.
//!
//! Layout: activations are kept as rows of channels, `[n·h·w, c]` (NHWC flattened), so a
//! convolution is one im2col copy and one matmul (`cols [n·h_o·w_o, k·k·c_in] × Wᵀ`), batch norm
//! reduces over rows, and nothing is permuted between layers. The convolution's backward is
//! candle's matmul backward (both operands' gradients are GEMMs) and the im2col's own backward
//! (col2im, a scatter-add); candle's CPU conv2d backward instead runs a naive direct
//! `conv_transpose2d` for the input gradient.
//!
//! Batch norm in training (PyTorch's `BatchNorm2d.train()`): each channel is normalized with
//! the batch's mean and biased variance over (n, h, w), through differentiable candle ops, so
//! the gradient flows through the statistics; the running statistics are updated as
//! `running = (1 − momentum)·running + momentum·batch` with the batch's *unbiased* variance and
//! torchvision's momentum 0.1. They are the `running_mean` / `running_var` the inference ResNet
//! folds into its affine, so the saved folder loads there unchanged.

use std::collections::HashMap;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, Var};

use crate::models::classifiers::{BlockKind, ResNetConfig};

/// PyTorch's `BatchNorm2d` defaults.
pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

/// An activation `[n·h·w, c]` with its spatial shape.
#[derive(Debug, Clone)]
pub struct Rows {
    pub t: Tensor,
    pub n: usize,
    pub h: usize,
    pub w: usize,
}

impl Rows {
    /// `x` `[n, c, h, w]` (NCHW, as the classifier's input) as rows.
    pub fn from_nchw(x: &Tensor) -> Result<Self> {
        let (n, c, h, w) = x.dims4()?;
        let t = x
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .reshape((n * h * w, c))?;
        Ok(Self { t, n, h, w })
    }

    pub fn channels(&self) -> Result<usize> {
        self.t.dim(1)
    }

    /// Back to `[n, c, h, w]`.
    pub fn to_nchw(&self) -> Result<Tensor> {
        let c = self.channels()?;
        self.t
            .reshape((self.n, self.h, self.w, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }
}

/// The patches of a `[n, h, w, c]` (contiguous f32) input under a k×k kernel: `[n·h_o·w_o,
/// k·k·c]`, column `(a·k + b)·c + channel` for kernel tap (a, b), zeros where the tap falls in
/// the padding. Its backward is [`Col2Im`].
#[derive(Debug, Clone, Copy)]
struct Im2Col {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl Im2Col {
    fn out_hw(&self) -> (usize, usize) {
        let o = |x: usize| (x + 2 * self.pad - self.k) / self.stride + 1;
        (o(self.h), o(self.w))
    }

    /// Calls `f(row, column offset, input offset)` for every (output pixel, tap) inside the
    /// input; each copies or adds `c` values.
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (ho, wo) = self.out_hw();
        let (k, c) = (self.k, self.c);
        for ni in 0..self.n {
            for oy in 0..ho {
                for ox in 0..wo {
                    let row = (ni * ho + oy) * wo + ox;
                    for a in 0..k {
                        let iy = (oy * self.stride + a) as isize - self.pad as isize;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        for b in 0..k {
                            let ix = (ox * self.stride + b) as isize - self.pad as isize;
                            if ix < 0 || ix >= self.w as isize {
                                continue;
                            }
                            let src = ((ni * self.h + iy as usize) * self.w + ix as usize) * c;
                            f(row, (a * k + b) * c, src);
                        }
                    }
                }
            }
        }
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: f32 only, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "world-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "im2col")?;
        let (ho, wo) = self.out_hw();
        let cols = self.k * self.k * self.c;
        let mut out = vec![0f32; self.n * ho * wo * cols];
        let c = self.c;
        self.for_each_tap(|row, col, src| {
            let dst = row * cols + col;
            out[dst..dst + c].copy_from_slice(&x[src..src + c]);
        });
        Ok((CpuStorage::F32(out), Shape::from((self.n * ho * wo, cols))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2Im(*self))?))
    }
}

/// The adjoint of [`Im2Col`]: sums each patch column back onto the input pixel it came from,
/// giving `[n·h·w, c]`. Serial and in a fixed order, so bit-reproducible.
struct Col2Im(Im2Col);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "world-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s, l, "col2im")?;
        let p = &self.0;
        let cols = p.k * p.k * p.c;
        let mut out = vec![0f32; p.n * p.h * p.w * p.c];
        let c = p.c;
        p.for_each_tap(|row, col, dst| {
            let src = row * cols + col;
            for (o, v) in out[dst..dst + c].iter_mut().zip(&g[src..src + c]) {
                *o += v;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((p.n * p.h * p.w, p.c))))
    }
}

/// 2-D convolution of rows `x` with a PyTorch weight `[c_out, c_in, k, k]` (no bias), stride
/// and zero padding: `[n·h_o·w_o, c_out]`. Differentiable in `x` and `weight`.
pub fn conv2d(x: &Rows, weight: &Tensor, stride: usize, pad: usize) -> Result<Rows> {
    let (c_out, c_in, k, k2) = weight.dims4()?;
    if k != k2 || x.channels()? != c_in || stride == 0 {
        candle_core::bail!(
            "conv2d: weight {:?} (square kernel, c_in) for input rows {:?}, stride {stride}",
            weight.dims(),
            x.t.dims()
        )
    }
    let op = Im2Col {
        n: x.n,
        h: x.h,
        w: x.w,
        c: c_in,
        k,
        stride,
        pad,
    };
    let (ho, wo) = op.out_hw();
    let cols = x.t.contiguous()?.apply_op1(op)?;
    // Columns are (tap, channel): the weight's [c_out, k, k, c_in] view.
    let w = weight
        .permute((0, 2, 3, 1))?
        .reshape((c_out, k * k * c_in))?;
    Ok(Rows {
        t: cols.matmul(&w.t()?)?,
        n: x.n,
        h: ho,
        w: wo,
    })
}

/// Train-mode batch norm over rows `x` `[r, c]`: `(x − mean) / sqrt(var + eps) · weight + bias`
/// with the batch's per-channel mean and biased variance (differentiable). Returns the output,
/// the mean and the biased variance (both `[c]`).
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    // Column sums as [1, r] × [r, c] matmuls and per-channel values spread over the rows as
    // [r, 1] × [1, c] outer products, never broadcasts: candle reduces over a leading dimension
    // (a mean over rows, or a broadcast's backward) element by element, which took a quarter of
    // a training step here, while these are GEMMs.
    let r = x.dim(0)?;
    let (dtype, device) = (x.dtype(), x.device());
    let ones_row = Tensor::ones((1, r), dtype, device)?;
    let ones_col = Tensor::ones((r, 1), dtype, device)?;
    let spread = |v: &Tensor| ones_col.matmul(v);
    let mean = (ones_row.matmul(x)? / r as f64)?;
    let centered = (x - spread(&mean)?)?;
    let var = (ones_row.matmul(&centered.sqr()?)? / r as f64)?;
    let scale = (var.clone() + eps)?
        .sqrt()?
        .recip()?
        .mul(&weight.unsqueeze(0)?)?;
    let y = ((centered * spread(&scale)?)? + spread(&bias.unsqueeze(0)?)?)?;
    Ok((y, mean.squeeze(0)?, var.squeeze(0)?))
}

/// One `BatchNorm2d`'s parameters and running statistics.
struct Norm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
}

impl Norm {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            let scale = (self.running_var.as_tensor() + BN_EPS)?
                .sqrt()?
                .recip()?
                .mul(&self.weight)?;
            let shift = self.bias.sub(&self.running_mean.as_tensor().mul(&scale)?)?;
            return x
                .broadcast_mul(&scale.unsqueeze(0)?)?
                .broadcast_add(&shift.unsqueeze(0)?);
        }
        let (y, mean, var) = batch_norm_train(x, &self.weight, &self.bias, BN_EPS)?;
        let r = x.dim(0)? as f64;
        let unbiased = (var.detach() * (r / (r - 1.0).max(1.0)))?;
        let ema = |running: &Var, batch: &Tensor| -> Result<()> {
            running.set(&((running.as_tensor() * (1.0 - BN_MOMENTUM))? + (batch * BN_MOMENTUM)?)?)
        };
        ema(&self.running_mean, &mean.detach())?;
        ema(&self.running_var, &unbiased)?;
        Ok(y)
    }
}

struct ConvNorm {
    weight: Tensor,
    stride: usize,
    pad: usize,
    norm: Norm,
}

impl ConvNorm {
    fn forward(&self, x: &Rows, train: bool) -> Result<Rows> {
        let y = conv2d(x, &self.weight, self.stride, self.pad)?;
        Ok(Rows {
            t: self.norm.forward(&y.t, train)?,
            ..y
        })
    }
}

struct Block {
    conv1: ConvNorm,
    conv2: ConvNorm,
    downsample: Option<ConvNorm>,
}

/// The ResNet over the variables of a `VarMap` (torchvision names), built once: the variables
/// are updated in place by the optimizer and by the running statistics.
pub struct TrainNet {
    stem: ConvNorm,
    blocks: Vec<Block>,
    fc_weight: Tensor,
    fc_bias: Tensor,
}

impl TrainNet {
    /// `vars`: every variable by its torchvision name (as `Classifier::new` creates them).
    pub fn new(config: &ResNetConfig, vars: &HashMap<String, Var>) -> Result<Self> {
        if config.block != BlockKind::Basic {
            candle_core::bail!("the world trainer builds basic-block ResNets only")
        }
        let get = |name: String| -> Result<Var> {
            vars.get(&name)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("no variable `{name}`")))
        };
        let conv_norm = |conv: String, norm: String, stride, pad| -> Result<ConvNorm> {
            Ok(ConvNorm {
                weight: get(format!("{conv}.weight"))?.as_tensor().clone(),
                stride,
                pad,
                norm: Norm {
                    weight: get(format!("{norm}.weight"))?.as_tensor().clone(),
                    bias: get(format!("{norm}.bias"))?.as_tensor().clone(),
                    running_mean: get(format!("{norm}.running_mean"))?,
                    running_var: get(format!("{norm}.running_var"))?,
                },
            })
        };
        let stem = conv_norm("conv1".into(), "bn1".into(), 1, 1)?;
        let mut blocks = Vec::new();
        let mut c_in = config.stem_width;
        for s in 0..4 {
            for i in 0..config.layers[s] {
                let p = format!("layer{}.{i}", s + 1);
                let stride = if i == 0 { config.strides[s] } else { 1 };
                let downsample = if stride != 1 || c_in != config.widths[s] {
                    Some(conv_norm(
                        format!("{p}.downsample.0"),
                        format!("{p}.downsample.1"),
                        stride,
                        0,
                    )?)
                } else {
                    None
                };
                blocks.push(Block {
                    conv1: conv_norm(format!("{p}.conv1"), format!("{p}.bn1"), stride, 1)?,
                    conv2: conv_norm(format!("{p}.conv2"), format!("{p}.bn2"), 1, 1)?,
                    downsample,
                });
                c_in = config.widths[s];
            }
        }
        Ok(Self {
            stem,
            blocks,
            fc_weight: get("fc.weight".into())?.as_tensor().clone(),
            fc_bias: get("fc.bias".into())?.as_tensor().clone(),
        })
    }

    /// Logits `[n, classes]` of normalized input rows (`Rows::from_nchw` of the preprocessed
    /// images). `train`: batch statistics, and the running statistics updated; otherwise the
    /// running statistics (the inference ResNet's output).
    pub fn forward(&self, x: &Rows, train: bool) -> Result<Tensor> {
        let relu = |r: Rows| -> Result<Rows> {
            Ok(Rows {
                t: r.t.relu()?,
                ..r
            })
        };
        let mut x = relu(self.stem.forward(x, train)?)?;
        for b in &self.blocks {
            let y = relu(b.conv1.forward(&x, train)?)?;
            let y = b.conv2.forward(&y, train)?;
            let shortcut = match &b.downsample {
                Some(d) => d.forward(&x, train)?.t,
                None => x.t.clone(),
            };
            x = Rows {
                t: (y.t + shortcut)?.relu()?,
                ..y
            };
        }
        let c = x.channels()?;
        let features = x.t.reshape((x.n, x.h * x.w, c))?.mean(1)?;
        features
            .matmul(&self.fc_weight.t()?)?
            .broadcast_add(&self.fc_bias)
    }
}
