//! The UNet's spatial transformer (diffusers' `Transformer2DModel` with `BasicTransformerBlock`s):
//! self-attention over the pixels (`attn1`), cross-attention from the pixels to the text
//! conditioning (`attn2`, whose keys and values carry the gradient back to the prompt), and a
//! GEGLU feed-forward.

use crate::ops::{Conv2d, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops::{self, AttentionMask, GroupNorm, LayerNorm};

/// Multi-head attention with diffusers' names: `to_q`, `to_k`, `to_v`, `to_out.0`.
#[derive(Debug, Clone)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
}

/// The shape of one [`Attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionConfig {
    pub query_dim: usize,
    /// Width of the keys' and values' source; `None` for self-attention.
    pub context_dim: Option<usize>,
    pub heads: usize,
    pub head_dim: usize,
    /// Whether `to_q`/`to_k`/`to_v` have biases (the UNet's do not, the VAE's do).
    pub qkv_bias: bool,
}

impl Attention {
    pub fn new(vb: VarBuilder, cfg: &AttentionConfig) -> Result<Self> {
        let inner = cfg.heads * cfg.head_dim;
        let context_dim = cfg.context_dim.unwrap_or(cfg.query_dim);
        let proj = |i, o, name| {
            if cfg.qkv_bias {
                crate::ops::linear(i, o, vb.pp(name))
            } else {
                crate::ops::linear_no_bias(i, o, vb.pp(name))
            }
        };
        Ok(Self {
            to_q: proj(cfg.query_dim, inner, "to_q")?,
            to_k: proj(context_dim, inner, "to_k")?,
            to_v: proj(context_dim, inner, "to_v")?,
            to_out: crate::ops::linear(inner, cfg.query_dim, vb.pp("to_out").pp(0))?,
            heads: cfg.heads,
        })
    }

    /// `x`: `[b, s, query_dim]`; `context`: `[b, s_ctx, context_dim]` (`None`: attend to `x`).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let y = ops::scaled_dot_product_attention(&q, &k, &v, AttentionMask::None, None)?;
        let (b, h, s, d) = y.dims4()?;
        let y = y.transpose(1, 2)?.reshape((b, s, h * d))?;
        self.to_out.forward(&y)
    }

    /// `[b, s, h·d]` -> `[b, h, s, d]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, inner) = x.dims3()?;
        x.reshape((b, s, self.heads, inner / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }
}

/// `ff`: `net.0` is GEGLU (`proj` to twice the hidden width; `hidden · gelu(gate)`), `net.2` the
/// output projection (`net.1` is dropout).
#[derive(Debug, Clone)]
pub struct FeedForward {
    pub geglu_proj: Linear,
    pub out: Linear,
    hidden: usize,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let hidden = 4 * dim;
        Ok(Self {
            geglu_proj: crate::ops::linear(dim, 2 * hidden, vb.pp("net.0.proj"))?,
            out: crate::ops::linear(hidden, dim, vb.pp("net.2"))?,
            hidden,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.geglu_proj.forward(x)?;
        let last = h.rank() - 1;
        let value = h.narrow(last, 0, self.hidden)?;
        let gate = h.narrow(last, self.hidden, self.hidden)?;
        self.out.forward(&value.mul(&ops::gelu_erf(&gate)?)?)
    }
}

/// `BasicTransformerBlock`: pre-LayerNorm self-attention, cross-attention and feed-forward,
/// each with a residual connection.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        cross_attention_dim: usize,
    ) -> Result<Self> {
        let eps = 1e-5;
        let attention = |context_dim| AttentionConfig {
            query_dim: dim,
            context_dim,
            heads,
            head_dim: dim / heads,
            qkv_bias: false,
        };
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, eps)?,
            attn1: Attention::new(vb.pp("attn1"), &attention(None))?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, eps)?,
            attn2: Attention::new(vb.pp("attn2"), &attention(Some(cross_attention_dim)))?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, eps)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    pub fn forward(&self, x: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(encoder_hidden_states))?
            + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// `proj_in` / `proj_out`: a 1x1 convolution (SD 1.x) or, with `use_linear_projection`, a linear
/// layer on the flattened pixels (SD 2.x). Same numbers, different weight shapes.
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Self::Linear(crate::ops::linear(in_dim, out_dim, vb)?)
        } else {
            Self::Conv(crate::ops::conv2d(
                in_dim,
                out_dim,
                1,
                Default::default(),
                vb,
            )?)
        })
    }
}

/// The shape of one [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DConfig {
    pub channels: usize,
    pub heads: usize,
    pub num_layers: usize,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub use_linear_projection: bool,
}

/// `Transformer2DModel` on continuous inputs: GroupNorm, `proj_in`, the transformer blocks over
/// the `h·w` pixel tokens, `proj_out`, plus the input (residual).
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, cfg: &Transformer2DConfig) -> Result<Self> {
        let c = cfg.channels;
        if cfg.heads == 0 || !c.is_multiple_of(cfg.heads) {
            candle_core::bail!(
                "Transformer2DModel at `{}`: {c} channels are not divisible by {} heads",
                vb.prefix(),
                cfg.heads
            )
        }
        let linear = cfg.use_linear_projection;
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    c,
                    cfg.heads,
                    cfg.cross_attention_dim,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            // diffusers hard-codes eps 1e-6 here (the ResNets use the config's norm_eps).
            norm: GroupNorm::new(vb.pp("norm"), cfg.norm_num_groups, c, 1e-6)?,
            proj_in: Projection::new(vb.pp("proj_in"), c, c, linear)?,
            transformer_blocks,
            proj_out: Projection::new(vb.pp("proj_out"), c, c, linear)?,
        })
    }

    /// `x`: `[b, c, h, w]`; `encoder_hidden_states`: `[b, tokens, cross_attention_dim]`.
    pub fn forward(&self, x: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let y = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&y)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&y)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, encoder_hidden_states)?;
        }
        let to_image = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2));
        let y = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&tokens)?.contiguous()?)?,
            Projection::Linear(lin) => to_image(&lin.forward(&tokens)?)?,
        };
        y + x
    }
}
