//! torchvision `VisionTransformer` (Dosovitskiy et al. 2021), e.g. ViT-B/16.
//!
//! Parameter names are torchvision's: `conv_proj`, `class_token`, `encoder.pos_embedding`,
//! `encoder.layers.encoder_layer_{i}.{ln_1, self_attention, ln_2, mlp.0, mlp.3}`, `encoder.ln`,
//! `heads.head`. Attention is `nn.MultiheadAttention`, which packs the query, key and value
//! projections into one `in_proj_weight` `[3·d, d]` (rows: q, then k, then v).

use crate::ops::{Conv2d, Conv2dConfig, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::ops::{self, AttentionMask, LayerNorm};

/// torchvision builds its LayerNorms with `partial(nn.LayerNorm, eps=1e-6)`.
const LN_EPS: f64 = 1e-6;

/// torchvision's `VisionTransformer` constructor arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub hidden_dim: usize,
    pub mlp_dim: usize,
    pub num_classes: usize,
}

impl VitConfig {
    pub fn vit_b_16() -> Self {
        Self {
            image_size: 224,
            patch_size: 16,
            num_layers: 12,
            num_heads: 12,
            hidden_dim: 768,
            mlp_dim: 3072,
            num_classes: 1000,
        }
    }

    /// Tokens per image: the patches plus the class token.
    pub fn seq_len(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

#[derive(Debug, Clone)]
pub struct VitOutput {
    /// `[b, num_classes]`.
    pub logits: Tensor,
    /// The class token after the encoder's final LayerNorm, `heads.head`'s input: `[b, d]`.
    pub cls_feature: Tensor,
    /// Each encoder block's output tokens (before the final LayerNorm): `[b, seq_len, d]`.
    pub blocks: Vec<Tensor>,
}

/// `nn.MultiheadAttention` with packed input projections, self-attention only.
#[derive(Debug, Clone)]
struct SelfAttention {
    in_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, dim: usize, num_heads: usize) -> Result<Self> {
        let w = vb.get((3 * dim, dim), "in_proj_weight")?;
        let b = vb.get(3 * dim, "in_proj_bias")?;
        Ok(Self {
            in_proj: Linear::new(w, Some(b)),
            out_proj: crate::ops::linear(dim, dim, vb.pp("out_proj"))?,
            num_heads,
        })
    }
}

impl Module for SelfAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        let head_dim = d / self.num_heads;
        // [b, s, 3d] -> [3, b, heads, s, head_dim]
        let qkv = self
            .in_proj
            .forward(x)?
            .reshape((b, s, 3, self.num_heads, head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let y = ops::scaled_dot_product_attention(&q, &k, &v, AttentionMask::None, None)?;
        let y = y.transpose(1, 2)?.reshape((b, s, d))?;
        self.out_proj.forward(&y)
    }
}

/// torchvision's `EncoderBlock`: pre-norm attention and MLP, each with a residual.
#[derive(Debug, Clone)]
struct EncoderBlock {
    ln_1: LayerNorm,
    self_attention: SelfAttention,
    ln_2: LayerNorm,
    /// `mlp.0` and `mlp.3` (1 is the GELU, 2 and 4 dropouts).
    fc1: Linear,
    fc2: Linear,
}

impl EncoderBlock {
    fn new(vb: VarBuilder, cfg: &VitConfig) -> Result<Self> {
        let d = cfg.hidden_dim;
        Ok(Self {
            ln_1: LayerNorm::new(vb.pp("ln_1"), d, LN_EPS)?,
            self_attention: SelfAttention::new(vb.pp("self_attention"), d, cfg.num_heads)?,
            ln_2: LayerNorm::new(vb.pp("ln_2"), d, LN_EPS)?,
            fc1: crate::ops::linear(d, cfg.mlp_dim, vb.pp("mlp.0"))?,
            fc2: crate::ops::linear(cfg.mlp_dim, d, vb.pp("mlp.3"))?,
        })
    }
}

impl Module for EncoderBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.self_attention.forward(&self.ln_1.forward(x)?)?)?;
        let y = ops::gelu_erf(&self.fc1.forward(&self.ln_2.forward(&x)?)?)?;
        x + self.fc2.forward(&y)?
    }
}

#[derive(Debug, Clone)]
pub struct VisionTransformer {
    conv_proj: Conv2d,
    class_token: Tensor,
    pos_embedding: Tensor,
    layers: Vec<EncoderBlock>,
    ln: LayerNorm,
    head: Linear,
    config: VitConfig,
}

impl VisionTransformer {
    pub fn new(vb: VarBuilder, cfg: &VitConfig) -> Result<Self> {
        if cfg.num_heads == 0 || cfg.hidden_dim % cfg.num_heads != 0 {
            candle_core::bail!(
                "vit config: hidden_dim {} is not divisible by num_heads {}",
                cfg.hidden_dim,
                cfg.num_heads
            )
        }
        if cfg.patch_size == 0 || cfg.image_size % cfg.patch_size != 0 {
            candle_core::bail!(
                "vit config: image_size {} is not divisible by patch_size {}",
                cfg.image_size,
                cfg.patch_size
            )
        }
        let d = cfg.hidden_dim;
        let patchify = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let conv_proj = crate::ops::conv2d(3, d, cfg.patch_size, patchify, vb.pp("conv_proj"))?;
        let class_token = vb.get((1, 1, d), "class_token")?;
        let enc = vb.pp("encoder");
        let pos_embedding = enc.get((1, cfg.seq_len(), d), "pos_embedding")?;
        let layers = (0..cfg.num_layers)
            .map(|i| EncoderBlock::new(enc.pp(format!("layers.encoder_layer_{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_proj,
            class_token,
            pos_embedding,
            layers,
            ln: LayerNorm::new(enc.pp("ln"), d, LN_EPS)?,
            head: crate::ops::linear(d, cfg.num_classes, vb.pp("heads.head"))?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// `x`: normalized images `[b, 3, image_size, image_size]` (the position embedding is
    /// learned for that size only).
    pub fn forward_all(&self, x: &Tensor) -> Result<VitOutput> {
        let (b, _, h, w) = x.dims4()?;
        let size = self.config.image_size;
        if (h, w) != (size, size) {
            candle_core::bail!(
                "vit: expected images of {size}×{size} (config image_size), got {h}×{w}"
            )
        }
        // [b, d, h/p, w/p] -> [b, patches, d]
        let patches = self
            .conv_proj
            .forward(x)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self
            .class_token
            .broadcast_as((b, 1, self.config.hidden_dim))?;
        let mut tokens = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.pos_embedding)?;
        let mut blocks = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            tokens = layer.forward(&tokens)?;
            blocks.push(tokens.clone());
        }
        let cls_feature = self.ln.forward(&tokens)?.narrow(1, 0, 1)?.squeeze(1)?;
        let logits = self.head.forward(&cls_feature)?;
        Ok(VitOutput {
            logits,
            cls_feature,
            blocks,
        })
    }
}

impl Module for VisionTransformer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_all(x)?.logits)
    }
}
