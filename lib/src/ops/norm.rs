//! Normalization layers, composed from reductions so that autograd is exact (candle's fused
//! `layer_norm` records no backward).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::group_norm::{group_norm_fused, GroupNormImpl};
use super::in_f32;

/// Normalizes over the last dimension, then applies the optional affine `weight`, `bias`.
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let y = in_f32(x, |x| {
        let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        centered.broadcast_div(&(var + eps)?.sqrt()?)
    })?;
    affine(y, weight, bias)
}

/// Group normalization of `[batch, channels, ...]`: statistics over each group of
/// `channels / num_groups` channels and all spatial positions; per-channel affine.
///
/// Runs the fused custom ops of [`super::group_norm`] (the graph keeps only the input and the
/// per-group statistics), unless `DIFFEXPLAINER_GROUP_NORM=composed` (see
/// [`GroupNormImpl::from_env`]). The fused backward computes only the input's gradient, so a
/// tracked weight or bias (a `Var` or derived from one) is applied after the fused
/// normalization in candle ops, whose autograd gives the parameters' gradients.
pub fn group_norm(
    x: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    check_groups(x, num_groups)?;
    let tracked_params = weight.is_some_and(Tensor::track_op) || bias.is_some_and(Tensor::track_op);
    let fused_dtype = matches!(
        x.dtype(),
        DType::F16 | DType::BF16 | DType::F32 | DType::F64
    );
    let fused =
        GroupNormImpl::from_env()? == GroupNormImpl::Fused && fused_dtype && x.elem_count() > 0;
    if fused && !tracked_params {
        group_norm_fused(x, num_groups, weight, bias, eps)
    } else if fused {
        // Trainable affine: the fused normalization, then the per-channel affine in candle ops
        // (whose autograd gives the parameters' gradients).
        let y = group_norm_fused(x, num_groups, None, None, eps)?;
        let shape: Vec<usize> = (0..x.rank())
            .map(|d| if d == 1 { x.dim(1) } else { Ok(1) })
            .collect::<Result<_>>()?;
        if let (Some(w), Some(b)) = (weight, bias) {
            return channel_affine(&y, w, b, &shape);
        }
        let y = match weight {
            Some(w) => y.broadcast_mul(&w.reshape(shape.as_slice())?)?,
            None => y,
        };
        match bias {
            Some(b) => y.broadcast_add(&b.reshape(shape.as_slice())?),
            None => Ok(y),
        }
    } else {
        group_norm_composed(x, num_groups, weight, bias, eps)
    }
}

/// `y · weight + bias` per channel (dim 1) for `weight`, `bias` `[C]` (`shape`: `[1, C, 1, ...]`),
/// with its own backward: candle's backward of a broadcast sums the gradient over the broadcast
/// dimensions with a strided per-element reduction, which took a tenth of a training step of
/// the world's autoencoder; here each parameter's gradient is two contiguous sums (over space,
/// then over the batch).
fn channel_affine(y: &Tensor, weight: &Tensor, bias: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let (n, c) = (y.dim(0)?, y.dim(1)?);
    let (yd, w) = (y.detach(), weight.detach().reshape(shape)?);
    let out = yd
        .broadcast_mul(&w)?
        .broadcast_add(&bias.detach().reshape(shape)?)?;
    super::frozen::attach3(y, weight, bias, out, move |grad| {
        let per_channel = |t: &Tensor| t.contiguous()?.reshape((n, c, ()))?.sum(2)?.sum(0);
        Ok((
            grad.broadcast_mul(&w)?,
            per_channel(&(grad * &yd)?)?,
            per_channel(grad)?,
        ))
    })
}

fn check_groups(x: &Tensor, num_groups: usize) -> Result<()> {
    let dims = x.dims();
    if dims.len() < 2 || num_groups == 0 || dims[1] % num_groups != 0 {
        candle_core::bail!("group_norm: input shape {dims:?} has channels (dim 1) not divisible by {num_groups} groups")
    }
    Ok(())
}

/// [`group_norm`] composed from candle tensor ops in f32 (the original implementation): the
/// reference for the fused ops' tests and the `DIFFEXPLAINER_GROUP_NORM=composed` path.
pub fn group_norm_composed(
    x: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    check_groups(x, num_groups)?;
    let dims = x.dims().to_vec();
    let y = in_f32(x, |x| {
        let grouped = x.reshape((dims[0], num_groups, ()))?;
        let centered = grouped.broadcast_sub(&grouped.mean_keepdim(D::Minus1)?)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        centered
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .reshape(dims.as_slice())
    })?;
    // Per-channel parameters broadcast as [C, 1, 1, ...].
    let channel_shape: Vec<usize> = std::iter::once(dims[1])
        .chain(std::iter::repeat_n(1, dims.len() - 2))
        .collect();
    let weight = weight
        .map(|w| w.reshape(channel_shape.as_slice()))
        .transpose()?;
    let bias = bias
        .map(|b| b.reshape(channel_shape.as_slice()))
        .transpose()?;
    affine(y, weight.as_ref(), bias.as_ref())
}

fn affine(y: Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = match weight {
        Some(w) => y.broadcast_mul(w)?,
        None => y,
    };
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `LayerNorm` with PyTorch's parameter names (`weight`, `bias`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: Some(vb.get(dim, "bias")?),
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, Some(&self.weight), self.bias.as_ref(), self.eps)
    }
}

/// `GroupNorm` with PyTorch's parameter names (`weight`, `bias`).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    pub num_groups: usize,
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, num_groups: usize, num_channels: usize, eps: f64) -> Result<Self> {
        if num_channels % num_groups != 0 {
            candle_core::bail!("GroupNorm at `{}`: {num_channels} channels are not divisible by {num_groups} groups", vb.prefix())
        }
        Ok(Self {
            num_groups,
            weight: vb.get(num_channels, "weight")?,
            bias: vb.get(num_channels, "bias")?,
            eps,
        })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        group_norm(
            x,
            self.num_groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
        )
    }
}

/// Inference-mode `BatchNorm2d` (running statistics), loaded from PyTorch's `weight`, `bias`,
/// `running_mean`, `running_var` and folded into one per-channel scale and shift.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    scale: Tensor,
    shift: Tensor,
}

impl BatchNorm2d {
    pub fn new(vb: VarBuilder, channels: usize, eps: f64) -> Result<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        let mean = vb.get(channels, "running_mean")?;
        let var = vb.get(channels, "running_var")?;
        // A negative variance makes sqrt NaN, which ReLU and max-pool can hide in the forward
        // pass while the backward turns NaN: refuse the checkpoint instead.
        if var
            .to_dtype(candle_core::DType::F32)?
            .min_all()?
            .to_scalar::<f32>()?
            < 0.0
        {
            candle_core::bail!(
                "`{}.running_var` has negative entries: the checkpoint is corrupt",
                vb.prefix()
            )
        }
        let scale = weight.div(&(var + eps)?.sqrt()?)?;
        let shift = bias.sub(&mean.mul(&scale)?)?;
        Ok(Self {
            scale: scale.reshape((channels, 1, 1))?,
            shift: shift.reshape((channels, 1, 1))?,
        })
    }
}

impl Module for BatchNorm2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&self.scale)?.broadcast_add(&self.shift)
    }
}
