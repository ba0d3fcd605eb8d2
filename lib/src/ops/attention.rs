//! Scaled dot-product attention, `softmax(q kᵀ · scale + mask) v`.
//!
//! Two paths compute the same function. The composed one materializes the scores and lets
//! autograd record every step; it is the reference, and it runs whenever the mask itself needs
//! a gradient. The memory-efficient one runs when only queries, keys and values are
//! differentiated (always, in DiffExplainer): the forward goes through blocks of query rows with
//! no graph, so at most one block of scores exists at a time, and the backward recomputes each
//! block's probabilities to form `dq`, `dk`, `dv` (the recomputation trick of FlashAttention,
//! here with ordinary tensor ops). The graph keeps only q, k, v and the output: at 64² latents
//! that is megabytes per layer instead of gigabytes of stored scores.
//!
//! On CUDA, `DIFFEXPLAINER_ATTENTION=fused` replaces the memory-efficient path (no mask or
//! causal only; f16/bf16/f32; head dim <= 160) with the fused kernels of
//! [`super::attention_fused`]. Opt-in until a GPU has run them; the CPU never uses them.

use candle_core::{DType, Device, Result, Tensor};

use super::attention_fused::{fused_attention, fused_supported, AttentionImpl};
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
    let mask_tracked = match mask {
        AttentionMask::Additive(m) | AttentionMask::CausalAndAdditive(m) => m.track_op(),
        _ => false,
    };
    let inputs_tracked = q.track_op() || k.track_op() || v.track_op();
    if inputs_tracked && !mask_tracked {
        // Opt-in fused kernels on CUDA (DIFFEXPLAINER_ATTENTION=fused); never on the CPU, never
        // with an additive mask.
        let causal = match mask {
            AttentionMask::None => Some(false),
            AttentionMask::Causal => Some(true),
            _ => None,
        };
        if let Some(causal) = causal {
            if q.device().is_cuda()
                && AttentionImpl::from_env()? == AttentionImpl::Fused
                && fused_supported(q, k, v)
            {
                return fused_attention(q, k, v, causal, scale);
            }
        }
        // Blocks of about 64M score elements (256 MB in f32) at a time.
        let (b, h, _, _) = q.dims4()?;
        let k_len = k.dim(2)?;
        let rows = ((1usize << 26) / (b * h * k_len).max(1)).max(1);
        return memory_efficient_attention(q, k, v, mask, scale, rows);
    }
    composed_attention(q, k, v, mask, scale)
}

/// The composed reference: every step recorded by autograd.
pub fn composed_attention(
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

/// The full additive mask (causal and/or given) as a `[.., .., q_len, k_len]` tensor, if any.
fn full_mask(
    mask: AttentionMask<'_>,
    q_len: usize,
    k_len: usize,
    dtype: DType,
    device: &Device,
) -> Result<Option<Tensor>> {
    let causal = || causal_mask(q_len, k_len, dtype, device)?.reshape((1, 1, q_len, k_len));
    // Bring a user mask to rank 4 so its query axis is axis 2.
    let rank4 = |m: &Tensor| -> Result<Tensor> {
        let mut dims = m.dims().to_vec();
        if dims.len() > 4 {
            candle_core::bail!("attention mask of shape {dims:?} has more than 4 dimensions")
        }
        while dims.len() < 4 {
            dims.insert(0, 1);
        }
        m.to_dtype(dtype)?.reshape(dims)
    };
    Ok(match mask {
        AttentionMask::None => None,
        AttentionMask::Causal => Some(causal()?),
        AttentionMask::Additive(m) => Some(rank4(m)?),
        AttentionMask::CausalAndAdditive(m) => Some(causal()?.broadcast_add(&rank4(m)?)?),
    })
}

/// Attention through blocks of `rows` query rows; see the module documentation. Public so tests
/// can force small blocks.
pub fn memory_efficient_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: AttentionMask<'_>,
    scale: Option<f64>,
    rows: usize,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (q_len, k_len, head_dim) = (q.dim(2)?, k.dim(2)?, q.dim(3)?);
    let scale = scale.unwrap_or(1.0 / (head_dim as f64).sqrt());
    let mask = full_mask(mask, q_len, k_len, q.dtype(), q.device())?;
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let blocks: Vec<(usize, usize)> = (0..q_len)
        .step_by(rows.max(1))
        .map(|s| (s, rows.min(q_len - s)))
        .collect();

    // Probabilities of one block of query rows, `[b, h, len, k_len]`.
    let probabilities = {
        let (kd, mask) = (kd.clone(), mask.clone());
        move |q_block: &Tensor, start: usize, len: usize| -> Result<Tensor> {
            let scores = (q_block.matmul(&kd.t()?)? * scale)?;
            let scores = match &mask {
                None => scores,
                Some(m) if m.dim(2)? == 1 => scores.broadcast_add(m)?,
                Some(m) => scores.broadcast_add(&m.narrow(2, start, len)?)?,
            };
            softmax_last_dim(&scores)
        }
    };

    let mut outputs = Vec::with_capacity(blocks.len());
    for &(start, len) in &blocks {
        let p = probabilities(&qd.narrow(2, start, len)?, start, len)?;
        outputs.push(p.matmul(&vd)?);
    }
    let y = Tensor::cat(&outputs, 2)?;
    drop(outputs);

    super::frozen::attach3(&q, &k, &v, y, move |grad| {
        let grad = grad.contiguous()?;
        let mut dq_blocks = Vec::with_capacity(blocks.len());
        let mut dk = kd.zeros_like()?;
        let mut dv = vd.zeros_like()?;
        for &(start, len) in &blocks {
            let q_block = qd.narrow(2, start, len)?;
            let g = grad.narrow(2, start, len)?;
            let p = probabilities(&q_block, start, len)?;
            dv = (dv + p.t()?.matmul(&g)?)?;
            // Softmax backward, in f32 for half-precision inputs: ds = p ∘ (dp − Σ_j dp·p).
            let dp = g.matmul(&vd.t()?)?;
            let wide = match p.dtype() {
                DType::F16 | DType::BF16 => DType::F32,
                other => other,
            };
            let (p32, dp32) = (p.to_dtype(wide)?, dp.to_dtype(wide)?);
            let row_dot = (&dp32 * &p32)?.sum_keepdim(candle_core::D::Minus1)?;
            let ds = (p32 * dp32.broadcast_sub(&row_dot)?)?.to_dtype(p.dtype())?;
            dq_blocks.push((ds.matmul(&kd)? * scale)?);
            dk = (dk + (ds.t()?.matmul(&q_block)? * scale)?)?;
        }
        Ok((Tensor::cat(&dq_blocks, 2)?, dk, dv))
    })
}
