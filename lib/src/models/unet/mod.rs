//! The Stable Diffusion denoiser, diffusers' `UNet2DConditionModel`, differentiable with respect
//! to its inputs: the noisy latents `sample` and the text conditioning `encoder_hidden_states`
//! (through every cross-attention's keys and values). Parameter names are diffusers'
//! (`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight`, ...), so a
//! `unet/diffusion_pytorch_model.safetensors` loads as is.
//!
//! Supported: the SD 1.4 / 1.5 / 2.0 / 2.1 / SD-Turbo family, i.e. `CrossAttnDownBlock2D`,
//! `DownBlock2D`, `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`, `UpBlock2D` with positional
//! timestep embeddings. Anything else (SDXL's `addition_embed_type: "text_time"`, class
//! embeddings, other block types, dual cross-attention, ...) is refused by name when the config
//! is checked, rather than run as a wrong model.
//!
//! The noise-prediction type (`epsilon` / `v_prediction`) is the scheduler's business, not the
//! model's: see the scheduler config.

pub mod attention;
pub mod blocks;
pub mod checkpoint;
pub mod embeddings;

use std::path::Path;

use crate::ops::Conv2d;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::ops::{self, GroupNorm};
use blocks::{BlockContext, BlockShape, CrossAttn, DownBlock, MidBlockCrossAttn, UpBlock};
use embeddings::{timestep_embedding, TimestepEmbedding};

/// A value given once for all blocks or once per block (`attention_head_dim: 8` or
/// `[5, 10, 20, 20]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Copy> PerBlock<T> {
    /// The value for each of `n` blocks; errors if a list has the wrong length.
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => candle_core::bail!(
                "UNet2DConditionModel config: `{field}` lists {} values for {n} blocks",
                v.len()
            ),
        }
    }
}

/// diffusers' `unet/config.json`. Fields that only select features we refuse are kept as raw
/// JSON so that [`UNet2DConditionConfig::check`] can name them.
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    #[serde(default = "default_latent_channels")]
    pub in_channels: usize,
    #[serde(default = "default_latent_channels")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid_block_type")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "default_one")]
    pub downsample_padding: usize,
    #[serde(default = "default_one_f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// An integer for SD 1.x/2.x (768 / 1024); a per-block list is refused.
    pub cross_attention_dim: serde_json::Value,
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// diffusers' naming mistake, kept for compatibility: this is the number of attention
    /// *heads* per block (each of width `channels / heads`), not their dimension.
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Upcasts attention scores to f32 in half precision; our attention already computes the
    /// softmax in f32 for half inputs, and f32 / f64 runs are unaffected.
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default = "default_conv_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "default_conv_kernel")]
    pub conv_out_kernel: usize,
    /// Features we refuse when set (see `check`): name -> raw value.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

fn default_sample_size() -> usize {
    64
}
fn default_latent_channels() -> usize {
    4
}
fn default_true() -> bool {
    true
}
fn default_mid_block_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_layers_per_block() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn default_one() -> usize {
    1
}
fn default_one_f64() -> f64 {
    1.0
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_norm_num_groups() -> Option<usize> {
    Some(32)
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_transformer_layers() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn default_attention_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_conv_kernel() -> usize {
    3
}

/// Config keys that select features of other model families, with what they are; any of them
/// set to something other than null / false / its default refuses the config.
const REFUSED_FEATURES: &[(&str, &str)] = &[
    (
        "addition_embed_type",
        "additional embeddings (SDXL's \"text_time\" micro-conditioning, Kandinsky's \"image\")",
    ),
    (
        "addition_time_embed_dim",
        "additional time embeddings (SDXL)",
    ),
    (
        "projection_class_embeddings_input_dim",
        "projected class embeddings (SDXL)",
    ),
    ("class_embed_type", "class embeddings"),
    ("num_class_embeds", "class embeddings"),
    ("class_embeddings_concat", "class embeddings"),
    ("encoder_hid_dim", "an encoder hidden-state projection"),
    ("encoder_hid_dim_type", "an encoder hidden-state projection"),
    ("dual_cross_attention", "dual cross-attention"),
    (
        "num_attention_heads",
        "`num_attention_heads` (diffusers itself refuses it)",
    ),
    (
        "reverse_transformer_layers_per_block",
        "asymmetric transformer depths",
    ),
    ("time_cond_proj_dim", "guidance-scale conditioning (LCM)"),
    (
        "timestep_post_act",
        "a post-activation on the time embedding",
    ),
    ("time_embedding_act_fn", "a time-embedding activation"),
    (
        "mid_block_only_cross_attention",
        "cross-attention-only mid blocks",
    ),
    ("cross_attention_norm", "cross-attention normalization"),
    (
        "resnet_skip_time_act",
        "ResNets that skip the time activation",
    ),
];

impl UNet2DConditionConfig {
    /// Reads and checks `unet/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        crate::pretrained::read_config(path, |value| {
            let cfg: Self = serde_json::from_value(value).map_err(|e| {
                candle_core::Error::Msg(format!("not a UNet2DConditionModel config: {e}"))
            })?;
            cfg.check()?;
            Ok(cfg)
        })
    }

    /// Refuses any configuration outside the SD 1.x / 2.x family, naming the feature.
    pub fn check(&self) -> Result<()> {
        let refuse = |what: String| -> Result<()> {
            candle_core::bail!(
                "unsupported UNet2DConditionModel config: {what}; only SD 1.x / 2.x-style UNets \
                 (CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D, \
                 UpBlock2D) are implemented"
            )
        };
        for (key, what) in REFUSED_FEATURES {
            match self.other.get(*key) {
                None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {}
                Some(v) => refuse(format!("`{key}` = {v} ({what})"))?,
            }
        }
        for (key, default) in [
            ("time_embedding_type", "positional"),
            ("resnet_time_scale_shift", "default"),
            ("attention_type", "default"),
        ] {
            match self.other.get(key) {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::String(s)) if s == default => {}
                Some(v) => refuse(format!("`{key}` = {v} (only \"{default}\")"))?,
            }
        }
        if let Some(v) = self.other.get("resnet_out_scale_factor") {
            if v.as_f64() != Some(1.0) {
                refuse(format!("`resnet_out_scale_factor` = {v}"))?
            }
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            refuse("empty `block_out_channels`".into())?
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            refuse(format!(
                "{} down blocks and {} up blocks for {n} `block_out_channels`",
                self.down_block_types.len(),
                self.up_block_types.len()
            ))?
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                refuse(format!("down block type `{t}`"))?
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                refuse(format!("up block type `{t}`"))?
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            Some(t) => refuse(format!("mid block type `{t}`"))?,
            None => refuse("no mid block (`mid_block_type` = null)".into())?,
        }
        match &self.only_cross_attention {
            serde_json::Value::Null | serde_json::Value::Bool(false) => {}
            serde_json::Value::Array(v) if v.iter().all(|b| b == false) => {}
            v => refuse(format!("`only_cross_attention` = {v}"))?,
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            refuse(format!("`act_fn` = {:?} (only \"silu\")", self.act_fn))?
        }
        if self.norm_num_groups.is_none() {
            refuse("`norm_num_groups` = null (ResNets without GroupNorm)".into())?
        }
        if self.cross_attention_dim.as_u64().is_none() {
            refuse(format!(
                "`cross_attention_dim` = {} (only one integer for all blocks)",
                self.cross_attention_dim
            ))?
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            refuse("even `conv_in_kernel` / `conv_out_kernel`".into())?
        }
        self.layers_per_block.expand(n, "layers_per_block")?;
        self.attention_head_dim.expand(n, "attention_head_dim")?;
        self.transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        Ok(())
    }

    pub fn cross_attention_dim(&self) -> usize {
        self.cross_attention_dim.as_u64().unwrap_or(0) as usize
    }

    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(4 * self.block_out_channels[0])
    }
}

/// `UNet2DConditionModel`. See the module docs.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    pub config: UNet2DConditionConfig,
    pub time_embedding: TimestepEmbedding,
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlockCrossAttn,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Builds the model from its checked config; `vb` is rooted at the UNet's weights.
    pub fn new(vb: VarBuilder, config: &UNet2DConditionConfig) -> Result<Self> {
        config.check()?;
        let cfg = config;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let layers = cfg.layers_per_block.expand(n, "layers_per_block")?;
        let heads = cfg.attention_head_dim.expand(n, "attention_head_dim")?;
        let depth = cfg
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let ctx = BlockContext {
            temb_channels: cfg.time_embed_dim(),
            groups: cfg.norm_num_groups.unwrap_or(32),
            eps: cfg.norm_eps,
            cross_attention_dim: cfg.cross_attention_dim(),
            use_linear_projection: cfg.use_linear_projection,
        };
        let cross = |kind: &str, i: usize| {
            kind.starts_with("CrossAttn").then_some(CrossAttn {
                heads: heads[i],
                transformer_layers: depth[i],
            })
        };

        let down_blocks = (0..n)
            .map(|i| {
                let shape = BlockShape {
                    in_channels: if i == 0 { boc[0] } else { boc[i - 1] },
                    out_channels: boc[i],
                    num_layers: layers[i],
                    resample: i + 1 < n,
                    cross_attn: cross(&cfg.down_block_types[i], i),
                };
                DownBlock::new(
                    vb.pp("down_blocks").pp(i),
                    &ctx,
                    &shape,
                    cfg.downsample_padding,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mid_block = MidBlockCrossAttn::new(
            vb.pp("mid_block"),
            &ctx,
            boc[n - 1],
            CrossAttn {
                heads: heads[n - 1],
                transformer_layers: depth[n - 1],
            },
            cfg.mid_block_scale_factor,
        )?;
        // Up block i mirrors down block n-1-i.
        let mut prev = boc[n - 1];
        let mut up_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let j = n - 1 - i;
            let shape = BlockShape {
                in_channels: boc[j.saturating_sub(1)],
                out_channels: boc[j],
                num_layers: layers[j] + 1,
                resample: i + 1 < n,
                cross_attn: cross(&cfg.up_block_types[i], j),
            };
            up_blocks.push(UpBlock::new(vb.pp("up_blocks").pp(i), &ctx, &shape, prev)?);
            prev = boc[j];
        }

        Ok(Self {
            config: cfg.clone(),
            time_embedding: TimestepEmbedding::new(
                vb.pp("time_embedding"),
                boc[0],
                cfg.time_embed_dim(),
            )?,
            conv_in: blocks::conv_k(
                vb.pp("conv_in"),
                cfg.in_channels,
                boc[0],
                cfg.conv_in_kernel,
            )?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                vb.pp("conv_norm_out"),
                ctx.groups,
                boc[0],
                cfg.norm_eps,
            )?,
            conv_out: blocks::conv_k(
                vb.pp("conv_out"),
                boc[0],
                cfg.out_channels,
                cfg.conv_out_kernel,
            )?,
        })
    }

    /// Loads `<dir>/unet/config.json` and `<dir>/unet/diffusion_pytorch_model[.<variant>]
    /// .safetensors` (or sharded / `.bin`, see [`crate::pretrained`]) from a diffusers model
    /// folder, converting the weights to `dtype` on `device`. To change the weights first (LoRA
    /// fusion), use [`crate::pretrained::open_weights`] and [`Self::new`].
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        use crate::pretrained::{config_path, open_weights, UNET};
        let dir = dir.as_ref();
        let cfg = UNet2DConditionConfig::from_file(config_path(dir, &UNET)?)?;
        let weights = open_weights(dir, &UNET, variant)?;
        Self::new(weights.into_var_builder(dtype, device), &cfg)
    }

    /// Turns gradient checkpointing of every ResNet and spatial transformer on or off (off by
    /// default). On: backward recomputes each block's forward instead of keeping its
    /// activations (see [`checkpoint`]); values and input gradients are unchanged.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.down_blocks.iter_mut().for_each(|b| b.checkpoint = on);
        self.mid_block.checkpoint = on;
        self.up_blocks.iter_mut().for_each(|b| b.checkpoint = on);
    }

    /// The noise (or v) prediction for `sample` `[b, in_channels, h, w]` at one `timestep` for
    /// the whole batch, conditioned on `encoder_hidden_states` `[b, tokens, cross_attention_dim]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let t = Tensor::new(&[timestep as f32], sample.device())?;
        self.forward_with_timesteps(sample, &t, encoder_hidden_states)
    }

    /// As [`Self::forward`], with `timesteps` a scalar, `[1]` or `[b]` tensor (not
    /// differentiated).
    pub fn forward_with_timesteps(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        // Any side works: a side that is not a multiple of 2^downsamplers rounds up at each
        // downsampler and each upsampler is cut back to its skip's size (diffusers'
        // `forward_upsample_size`), see `Upsample2D::forward_to`.
        let (b, _, _, _) = sample.dims4()?;
        let timesteps = timesteps.flatten_all()?;
        let timesteps = match timesteps.dim(0)? {
            1 => timesteps.broadcast_as(b)?,
            n if n == b => timesteps,
            n => candle_core::bail!("UNet2DConditionModel: {n} timesteps for a batch of {b}"),
        };
        let t_emb = timestep_embedding(
            &timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            sample.dtype(),
        )?;
        let temb = self.time_embedding.forward(&t_emb)?;
        let ehs = encoder_hidden_states;

        let sample = if self.config.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample.clone()
        };
        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (y, s) = block.forward(&x, &temb, ehs)?;
            x = y;
            skips.extend(s);
        }
        x = self.mid_block.forward(&x, &temb, ehs)?;
        for block in &self.up_blocks {
            x = block.forward(&x, &mut skips, &temb, ehs)?;
        }
        let x = ops::silu(&self.conv_norm_out.forward(&x)?)?;
        self.conv_out.forward(&x)
    }
}
