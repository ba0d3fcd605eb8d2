//! Scaled dot-product attention, `softmax(q kᵀ · scale + mask) v`, with the scores materialized
//! so that autograd reaches queries, keys and values. (A memory-efficient fused kernel with its
//! own backward is GPU work for later; this is the reference it must match.)

use candle_core::{DType, Device, Result, Tensor};

use super::softmax_last_dim;

/// What to add to the attention scores before the softmax.
#[derive(Debug, Clone, Copy, Default)]
pub enum AttentionMask<'a> {
    #[default]
    None,
    /// Query `i` sees keys `0..=i` (top-left aligned, as PyTorch's `is_causal=True`).
    Causal,
    /// An additive mask broadcastable to `[batch, heads, q_len, k_len]`.
    Additive(&'a Tensor),
    /// Both: causal, then the additive mask.
    CausalAndAdditive(&'a Tensor),
}

/// `q`: `[b, h, q_len, d]`, `k`: `[b, h, k_len, d]`, `v`: `[b, h, k_len, d_v]`.
/// `scale` defaults to `1/sqrt(d)`.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: AttentionMask<'_>,
    scale: Option<f64>,
) -> Result<Tensor> {
    let head_dim = q.dim(candle_core::D::Minus1)?;
    let scale = scale.unwrap_or(1.0 / (head_dim as f64).sqrt());
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let (q_len, k_len) = (scores.dim(2)?, scores.dim(3)?);
    let scores = match mask {
        AttentionMask::None => scores,
        AttentionMask::Causal => {
            scores.broadcast_add(&causal_mask(q_len, k_len, scores.dtype(), scores.device())?)?
        }
        AttentionMask::Additive(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
        AttentionMask::CausalAndAdditive(m) => scores
            .broadcast_add(&causal_mask(q_len, k_len, scores.dtype(), scores.device())?)?
            .broadcast_add(&m.to_dtype(scores.dtype())?)?,
    };
    softmax_last_dim(&scores)?.matmul(&v.contiguous()?)
}

/// `[q_len, k_len]` with 0 where key `j <= i` and -inf elsewhere.
pub fn causal_mask(q_len: usize, k_len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..q_len)
        .flat_map(|i| (0..k_len).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(values, (q_len, k_len), device)?.to_dtype(dtype)
}
