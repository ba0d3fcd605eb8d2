//! Softmax along the last dimension, composed so that autograd sees every step.

use candle_core::{Result, Tensor, D};

use super::in_f32;

/// `softmax(x)` over the last dimension. The max subtracted for stability is detached: it cancels
/// exactly in the result, so its gradient is zero anyway.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    in_f32(x, |x| {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let exp = x.broadcast_sub(&max)?.exp()?;
        exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
    })
}

/// `log(softmax(x))` over the last dimension, computed as `x - max - log(sum(exp(x - max)))`.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    in_f32(x, |x| {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let shifted = x.broadcast_sub(&max)?;
        let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        shifted.broadcast_sub(&log_sum)
    })
}
