//! Differentiable primitives.
//!
//! candle 0.11's fused kernels (`candle_nn::ops::softmax_last_dim`, `layer_norm`, `rms_norm`,
//! `sdpa`) record no backward, so a gradient through them is silently cut; its `max_pool2d`
//! backward only handles kernel == stride, `upsample_bilinear2d` has none, and
//! `upsample_nearest2d`'s backward overwrites instead of accumulating. Every op here is composed
//! from candle primitives whose backward is correct (matmul, broadcast arithmetic, reductions,
//! narrow/reshape, conv2d), so autograd is exact; each has a finite-difference test and a parity
//! case against PyTorch (`tests/parity/cases/op_*`). Exceptions with their own backward, tested
//! against the composed versions they replace: `frozen` (input-only gradients of frozen layers),
//! `attention` (memory-efficient), `group_norm` (fused custom ops with CPU loops and CUDA kernels).
//!
//! Half-precision inputs are computed in f32 where a reduction is involved (norms, softmax) and
//! cast back, the way PyTorch's kernels accumulate.

pub mod activation;
pub mod attention;
pub mod attention_fused;
pub mod conv_train;
pub mod frozen;
pub mod group_norm;
pub mod norm;
pub mod pool;
pub mod resize;
pub mod softmax;

pub use activation::{clamp, gelu_erf, gelu_tanh, quick_gelu, relu, silu, Activation};
pub use attention::{scaled_dot_product_attention, AttentionMask};
pub use frozen::{
    conv2d, conv2d_input_grad, conv2d_no_bias, linear, linear_no_bias, Conv2d, Conv2dConfig,
    ConvInputGrad, Linear,
};
pub use group_norm::{group_norm_fused, GroupNormImpl};
pub use norm::{group_norm, group_norm_composed, layer_norm, BatchNorm2d, GroupNorm, LayerNorm};
pub use pool::{adaptive_avg_pool2d, avg_pool2d, max_pool2d};
pub use resize::{resize_bicubic, resize_bilinear, upsample_nearest2x};
pub use softmax::{log_softmax_last_dim, softmax_last_dim};

use candle_core::{DType, Result, Tensor};

/// An implementation switch read from the environment variable `name` (for A/B timing):
/// unset or empty gives the first choice, a listed name gives its value, anything else an error
/// naming the valid ones. Callers keep the result in a `OnceLock` so it is read once per process.
pub(crate) fn env_choice<T: Copy>(
    name: &str,
    choices: &[(&str, T)],
) -> std::result::Result<T, String> {
    let names = || {
        let mut list: Vec<String> = choices.iter().map(|(n, _)| n.to_string()).collect();
        list[0].push_str(" (default)");
        list.join(", ")
    };
    match std::env::var(name).as_deref() {
        Err(_) | Ok("") => Ok(choices[0].1),
        Ok(value) => choices
            .iter()
            .find(|(n, _)| *n == value)
            .map(|&(_, v)| v)
            .ok_or_else(|| format!("{name}=`{value}`: expected one of {}", names())),
    }
}

/// Runs `f` in f32 when `x` is half precision, casting the result back to `x`'s dtype.
pub(crate) fn in_f32(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => f(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype()),
        _ => f(x),
    }
}
