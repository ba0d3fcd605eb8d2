//! Activation functions. candle's own `gelu`, `gelu_erf` and `silu` unary ops record a backward;
//! `quick_gelu` is composed with `candle_nn::ops::sigmoid`, whose custom op has one.

use candle_core::{Result, Tensor};
use serde::Deserialize;

/// GELU with the exact erf form, `x * Φ(x)` (PyTorch `F.gelu`, transformers `"gelu"`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// GELU with the tanh approximation (PyTorch `F.gelu(approximate="tanh")`, `"gelu_new"`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// OpenAI CLIP's `x * sigmoid(1.702 x)` (SD 1.x text encoder).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?)
}

/// `x * sigmoid(x)`, a.k.a. swish (diffusers' UNet and VAE).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// `max(x, 0)` with PyTorch's gradient: 1 where `x > 0`, 0 elsewhere, `x = 0` included
/// (candle's `relu` passes the gradient at 0, so a dead unit at exactly 0 would still learn).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    let zeros = x.zeros_like()?;
    x.gt(&zeros)?.where_cond(x, &zeros)
}

/// `x.clamp(lo, hi)` with PyTorch's gradient: 1 where `lo <= x <= hi`, bounds included, 0
/// elsewhere (candle's `clamp`, built from `maximum`/`minimum`, halves it at a bound).
pub fn clamp(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let low = Tensor::full(lo, x.shape(), x.device())?.to_dtype(x.dtype())?;
    let high = Tensor::full(hi, x.shape(), x.device())?.to_dtype(x.dtype())?;
    let inside = x.ge(&low)?.mul(&x.le(&high)?)?;
    let outside = x.lt(&low)?.where_cond(&low, &high)?;
    inside.where_cond(x, &outside)
}

/// An activation named the way checkpoint configs name it (`hidden_act`, `act_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    #[serde(alias = "gelu_python")]
    Gelu,
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_tanh")]
    GeluNew,
    QuickGelu,
    #[serde(alias = "swish")]
    Silu,
    Relu,
}

impl candle_core::Module for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => gelu_erf(x),
            Activation::GeluNew => gelu_tanh(x),
            Activation::QuickGelu => quick_gelu(x),
            Activation::Silu => silu(x),
            Activation::Relu => relu(x),
        }
    }
}
