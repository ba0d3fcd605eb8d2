//! The transformer layer CLIP's towers share (transformers' `CLIPAttention`, `CLIPMLP`,
//! `CLIPEncoderLayer`; CLIPSeg's `CLIPSegDecoderLayer` has the same parameters with the
//! LayerNorms after the residual additions). One implementation for the text tower
//! ([`super::clip_text`]), the vision tower ([`super::clip_vision`]) and CLIPSeg's decoder
//! ([`super::clipseg`]). Parameter names are transformers': `self_attn.{q,k,v,out}_proj`,
//! `layer_norm1`, `mlp.fc1`, `mlp.fc2`, `layer_norm2`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops::{self, linear, Activation, AttentionMask, LayerNorm, Linear};

/// The sizes of one layer (a subset of `CLIPTextConfig` / `CLIPVisionConfig`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerDims {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

/// Multi-head self-attention with biased q/k/v/out projections, scale `head_dim^-0.5`.
#[derive(Debug, Clone)]
pub struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    pub fn new(vb: VarBuilder, dims: &LayerDims) -> Result<Self> {
        let d = dims.hidden_size;
        if dims.num_attention_heads == 0 || !d.is_multiple_of(dims.num_attention_heads) {
            candle_core::bail!(
                "CLIP attention: hidden_size {d} is not a multiple of num_attention_heads {}",
                dims.num_attention_heads
            )
        }
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            num_heads: dims.num_attention_heads,
            head_dim: d / dims.num_attention_heads,
        })
    }

    /// `x`: `[b, s, d]`; `causal` for the text tower, none for vision and the CLIPSeg decoder.
    pub fn forward(&self, x: &Tensor, mask: AttentionMask<'_>) -> Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, s, self.num_heads, self.head_dim))?
                .transpose(1, 2)
        };
        let q = heads(self.q_proj.forward(x)?)?;
        let k = heads(self.k_proj.forward(x)?)?;
        let v = heads(self.v_proj.forward(x)?)?;
        let y = ops::scaled_dot_product_attention(&q, &k, &v, mask, None)?;
        self.out_proj
            .forward(&y.transpose(1, 2)?.contiguous()?.reshape((b, s, d))?)
    }
}

/// One transformer layer: attention, then the MLP `fc2(act(fc1(x)))`, each with a residual.
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    pub fn new(vb: VarBuilder, dims: &LayerDims) -> Result<Self> {
        let (d, eps) = (dims.hidden_size, dims.layer_norm_eps);
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), dims)?,
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), d, eps)?,
            fc1: linear(d, dims.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(dims.intermediate_size, d, vb.pp("mlp").pp("fc2"))?,
            act: dims.hidden_act,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), d, eps)?,
        })
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)?)?)
    }

    /// CLIP's pre-LN layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
    pub fn forward(&self, x: &Tensor, mask: AttentionMask<'_>) -> Result<Tensor> {
        let x = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?)?;
        &x + self.mlp(&self.layer_norm2.forward(&x)?)?
    }

    /// CLIPSeg's decoder layer (post-LN, no mask): `ln1(x + attn(x))`, then `ln2(x + mlp(x))`.
    pub fn forward_post_norm(&self, x: &Tensor) -> Result<Tensor> {
        let x = self
            .layer_norm1
            .forward(&(x + self.self_attn.forward(x, AttentionMask::None)?)?)?;
        self.layer_norm2.forward(&(&x + self.mlp(&x)?)?)
    }
}
