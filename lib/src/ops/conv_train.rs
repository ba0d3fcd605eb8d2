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
//! On the CPU in f32/f64 the backward is ours ([`conv2d_gemm`]): one im2col of the NCHW input
//! into `[b, c·kh·kw, ho·wo]` (contiguous row spans, no transposes); the weight's gradient is
//! `Σ_b grad_b · patches_bᵀ` (batched GEMMs), the input's the col2im (scatter-add) of
//! `Wᵀ · grad`, the bias's two contiguous sums. candle's tiled conv2d builds its patches with a
//! strided scatter per element; the polyphase input gradient ran it s² times per conv. The
//! forward stays candle's conv2d, so values equal the frozen path's bit for bit.
//!
//! Groups and dilation other than 1 keep candle's path. `tests/conv_train.rs` checks all three
//! gradients against candle's conv backward and by finite differences.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
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
    if x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && weight.dtype() == x.dtype()
        && bias.is_none_or(|b| b.dtype() == x.dtype())
    {
        return conv2d_gemm(x, weight, bias, config);
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

/// The patch geometry of a k×k convolution (dilation 1) over `[b, c, h, w]` inputs.
#[derive(Debug, Clone, Copy)]
struct Patches {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Patches {
    fn new(
        x_dims: (usize, usize, usize, usize),
        (kh, kw): (usize, usize),
        config: &Conv2dConfig,
    ) -> Result<Self> {
        let (b, c, h, w) = x_dims;
        let (stride, pad) = (config.stride, config.padding);
        if stride == 0 || h + 2 * pad < kh || w + 2 * pad < kw {
            candle_core::bail!(
                "conv2d: a {kh}×{kw} kernel with padding {pad} and stride {stride} does not fit a {h}×{w} input"
            )
        }
        Ok(Self {
            b,
            c,
            h,
            w,
            kh,
            kw,
            stride,
            pad,
            ho: (h + 2 * pad - kh) / stride + 1,
            wo: (w + 2 * pad - kw) / stride + 1,
        })
    }

    fn rows(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// The output positions `lo..hi` along an axis of output length `out` and input length `n`
    /// whose tap `t` lands inside the input, and the input index of output position 0 (may be
    /// negative).
    fn valid(&self, t: usize, n: usize, out: usize) -> (usize, usize, isize) {
        let first = t as isize - self.pad as isize;
        let s = self.stride as isize;
        // ox·s + first >= 0  and  ox·s + first <= n − 1.
        let lo = if first >= 0 {
            0
        } else {
            ((-first + s - 1) / s) as usize
        };
        let last = n as isize - 1 - first;
        let hi = if last < 0 {
            0
        } else {
            ((last / s) as usize + 1).min(out)
        };
        (lo.min(hi), hi, first)
    }

    /// Calls `f(patch offset, input offset, count)` for every run of `count` output positions
    /// of one output row that read consecutive input positions (stride 1) or one position each
    /// (stride > 1: `count` is 1). Offsets are within one image.
    fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (hw_o, s) = (self.ho * self.wo, self.stride);
        for ci in 0..self.c {
            for i in 0..self.kh {
                let (y_lo, y_hi, y0) = self.valid(i, self.h, self.ho);
                for j in 0..self.kw {
                    let (x_lo, x_hi, x0) = self.valid(j, self.w, self.wo);
                    let row = ((ci * self.kh + i) * self.kw + j) * hw_o;
                    for oy in y_lo..y_hi {
                        let iy = (oy as isize * s as isize + y0) as usize;
                        let src = (ci * self.h + iy) * self.w;
                        let dst = row + oy * self.wo;
                        if s == 1 {
                            let ix = (x_lo as isize + x0) as usize;
                            f(dst + x_lo, src + ix, x_hi - x_lo);
                        } else {
                            for ox in x_lo..x_hi {
                                let ix = (ox as isize * s as isize + x0) as usize;
                                f(dst + ox, src + ix, 1);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// im2col: `[b, c, h, w]` (contiguous) → `[b, c·kh·kw, ho·wo]`, row `(c, i, j)` in PyTorch's
/// weight order, zeros where a tap falls in the padding.
struct Im2Col(Patches);

/// col2im, the adjoint of [`Im2Col`]: `[b, c·kh·kw, ho·wo]` → `[b, c, h, w]`, each patch value
/// added back onto the input position it came from (in a fixed order: reproducible).
struct Col2Im(Patches);

fn contiguous<'a, T>(v: &'a [T], l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

fn im2col<T: Copy + Default>(x: &[T], p: &Patches) -> Vec<T> {
    let (per_in, per_out) = (p.c * p.h * p.w, p.rows() * p.ho * p.wo);
    let mut out = vec![T::default(); p.b * per_out];
    for (xb, ob) in x.chunks_exact(per_in).zip(out.chunks_exact_mut(per_out)) {
        p.for_each_run(|dst, src, n| ob[dst..dst + n].copy_from_slice(&xb[src..src + n]));
    }
    out
}

fn col2im<T: Copy + Default + std::ops::AddAssign>(g: &[T], p: &Patches) -> Vec<T> {
    let (per_in, per_out) = (p.c * p.h * p.w, p.rows() * p.ho * p.wo);
    let mut out = vec![T::default(); p.b * per_in];
    for (gb, ob) in g.chunks_exact(per_out).zip(out.chunks_exact_mut(per_in)) {
        p.for_each_run(|src, dst, n| {
            for (o, v) in ob[dst..dst + n].iter_mut().zip(&gb[src..src + n]) {
                *o += *v;
            }
        });
    }
    out
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "conv-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = &self.0;
        let shape = Shape::from((p.b, p.rows(), p.ho * p.wo));
        match s {
            CpuStorage::F32(v) => Ok((
                CpuStorage::F32(im2col(contiguous(v, l, "im2col")?, p)),
                shape,
            )),
            CpuStorage::F64(v) => Ok((
                CpuStorage::F64(im2col(contiguous(v, l, "im2col")?, p)),
                shape,
            )),
            _ => candle_core::bail!("im2col: f32 or f64 only, got {:?}", s.dtype()),
        }
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "conv-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = &self.0;
        let shape = Shape::from((p.b, p.c, p.h, p.w));
        match s {
            CpuStorage::F32(v) => Ok((
                CpuStorage::F32(col2im(contiguous(v, l, "col2im")?, p)),
                shape,
            )),
            CpuStorage::F64(v) => Ok((
                CpuStorage::F64(col2im(contiguous(v, l, "col2im")?, p)),
                shape,
            )),
            _ => candle_core::bail!("col2im: f32 or f64 only, got {:?}", s.dtype()),
        }
    }
}

/// [`conv2d_trainable`] on the CPU in f32/f64: im2col + GEMM forward, the backward of the
/// module docs.
fn conv2d_gemm(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    config: &Conv2dConfig,
) -> Result<Tensor> {
    let (o, c, kh, kw) = weight.dims4()?;
    let p = Patches::new(x.dims4()?, (kh, kw), config)?;
    if p.c != c {
        candle_core::bail!(
            "conv2d: input {:?} has {} channels, the weight {:?} takes {c}",
            x.dims(),
            p.c,
            weight.dims()
        )
    }
    let (b, hw) = (p.b, p.ho * p.wo);
    let xd = x.detach().contiguous()?;
    let wm = weight.detach().contiguous()?.reshape((o, p.rows()))?;
    // The forward is candle's conv2d, so values equal the frozen path's bit for bit (a model
    // over `Var`s and the same model loaded from its folder give identical outputs).
    let mut y = xd.conv2d(&weight.detach(), config.padding, config.stride, 1, 1)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(&bias.detach().reshape((1, o, 1, 1))?)?;
    }
    let third = match bias {
        Some(b) => b.clone(),
        None => Tensor::zeros((), x.dtype(), x.device())?,
    };
    let has_bias = bias.is_some();
    let x_tracked = x.track_op();
    let w_shape = weight.dims().to_vec();
    super::frozen::attach3(x, weight, &third, y, move |grad| {
        let g = grad.contiguous()?.reshape((b, o, hw))?;
        let cols = xd.apply_op1_no_bwd(&Im2Col(p))?;
        let gx = if x_tracked {
            let gcols = wm.t()?.broadcast_left(b)?.matmul(&g)?.contiguous()?;
            gcols.apply_op1_no_bwd(&Col2Im(p))?
        } else {
            // Untracked: candle's backward still adds what we return to a zero of x's shape.
            Tensor::zeros((p.b, p.c, p.h, p.w), g.dtype(), g.device())?
        };
        // Σ_b g_b · cols_bᵀ: per-image GEMMs, then a sum over the (small) batch axis.
        let gw = g
            .matmul(&cols.transpose(1, 2)?)?
            .sum(0)?
            .reshape(w_shape.as_slice())?;
        let gb = if has_bias {
            g.sum(2)?.sum(0)?
        } else {
            Tensor::zeros((), g.dtype(), g.device())?
        };
        Ok((gx, gw, gb))
    })
}
