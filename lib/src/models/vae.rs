//! Stable Diffusion's autoencoder, diffusers' `AutoencoderKL`, differentiable from latents to
//! pixels (the decoder is the last link between the classifier's gradient and the prompt).
//! Parameter names are diffusers' (`decoder.up_blocks.0.resnets.0.conv1.weight`, ...), so a
//! `vae/diffusion_pytorch_model.safetensors` loads as is.
//!
//! # Latent scaling: who divides by `scaling_factor`
//!
//! The diffusion model works on *scaled* latents, `z · scaling_factor` (0.18215 for SD 1.x/2.x).
//! As in diffusers:
//! - [`AutoencoderKL::decode`] and [`AutoencoderKL::encode`] do **not** scale: `decode` takes the
//!   autoencoder's own latents `z`, `encode` returns the posterior mean of `z`
//!   (diffusers' `vae.decode(z).sample`, `vae.encode(x).latent_dist.mean`).
//! - [`AutoencoderKL::decode_to_image`] takes the **sampler's (scaled) latents** and does what
//!   the pipelines do: `z = latents / scaling_factor (+ shift_factor)`, decode, then map
//!   `[-1, 1]` to `[0, 1]` with `(x / 2 + 0.5).clamp(0, 1)`.
//! - [`AutoencoderKL::unscale_latents`] / [`AutoencoderKL::scale_latents`] convert between them.
//!
//! The final clamp, like the pipelines', has zero gradient for pixels outside `[0, 1]`:
//! saturated pixels pass no gradient back to the latents. Use [`AutoencoderKL::decode`] and
//! `x / 2 + 0.5` yourself for an unclamped image.
//!
//! Supported: `DownEncoderBlock2D` / `UpDecoderBlock2D` VAEs with the mid-block attention
//! (every SD 1.x / 2.x / SDXL / Turbo VAE). Older checkpoints that name the attention
//! `query` / `key` / `value` / `proj_attn` load too (mapped to `to_q` / `to_k` / `to_v` /
//! `to_out.0`).

use std::path::Path;
use std::sync::Arc;

use crate::ops::Conv2d;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::unet::attention::{Attention, AttentionConfig};
use super::unet::blocks::{conv3x3, Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::unet::checkpoint::checkpoint;
use crate::ops::{self, GroupNorm};

/// The VAE's GroupNorm epsilon (hard-coded in diffusers' Encoder / Decoder).
const EPS: f64 = 1e-6;

/// diffusers' `vae/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "default_image_channels")]
    pub in_channels: usize,
    #[serde(default = "default_image_channels")]
    pub out_channels: usize,
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: usize,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// SD3 / Flux: latents are `(z - shift) · scale`; `None` (SD 1.x / 2.x) means 0.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn default_image_channels() -> usize {
    3
}
fn default_down_block_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up_block_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_layers_per_block() -> usize {
    1
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_latent_channels() -> usize {
    4
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

impl AutoencoderKLConfig {
    /// Reads and checks `vae/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        crate::pretrained::read_config(path, |value| {
            let cfg: Self = serde_json::from_value(value).map_err(|e| {
                candle_core::Error::Msg(format!("not an AutoencoderKL config: {e}"))
            })?;
            cfg.check()?;
            Ok(cfg)
        })
    }

    /// Refuses block types and options this implementation does not have.
    pub fn check(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            candle_core::bail!(
                "AutoencoderKL config: {} down and {} up block types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )
        }
        for t in &self.down_block_types {
            if t != "DownEncoderBlock2D" {
                candle_core::bail!("unsupported AutoencoderKL config: down block type `{t}` (only DownEncoderBlock2D)")
            }
        }
        for t in &self.up_block_types {
            if t != "UpDecoderBlock2D" {
                candle_core::bail!(
                    "unsupported AutoencoderKL config: up block type `{t}` (only UpDecoderBlock2D)"
                )
            }
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            candle_core::bail!(
                "unsupported AutoencoderKL config: `act_fn` = {:?} (only \"silu\")",
                self.act_fn
            )
        }
        Ok(())
    }
}

/// The mid block's single-head self-attention over pixels (diffusers' `Attention` with
/// `group_norm`, `residual_connection=True`, biased projections).
#[derive(Debug, Clone)]
pub struct SpatialSelfAttention {
    pub group_norm: GroupNorm,
    pub attention: Attention,
}

impl SpatialSelfAttention {
    pub fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        let group_norm = GroupNorm::new(vb.pp("group_norm"), groups, channels, EPS)?;
        let attention = if vb.contains_tensor("query.weight") {
            // Checkpoints saved before diffusers 0.14 (`AttentionBlock`).
            let lin = |name| crate::ops::linear(channels, channels, vb.pp(name));
            Attention {
                to_q: lin("query")?,
                to_k: lin("key")?,
                to_v: lin("value")?,
                to_out: lin("proj_attn")?,
                heads: 1,
            }
        } else {
            let cfg = AttentionConfig {
                query_dim: channels,
                context_dim: None,
                heads: 1,
                head_dim: channels,
                qkv_bias: true,
            };
            Attention::new(vb, &cfg)?
        };
        Ok(Self {
            group_norm,
            attention,
        })
    }
}

impl Module for SpatialSelfAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let y = self.attention.forward(&tokens, None)?;
        y.transpose(1, 2)?.reshape((b, c, h, w))? + x
    }
}

/// `UNetMidBlock2D` without time embedding: ResNet, attention, ResNet.
#[derive(Debug, Clone)]
pub struct VaeMidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attention: Option<SpatialSelfAttention>,
}

impl VaeMidBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize, add_attention: bool) -> Result<Self> {
        let cfg = resnet_cfg(channels, channels, groups);
        Ok(Self {
            resnets: vec![
                ResnetBlock2D::new(vb.pp("resnets").pp(0), &cfg)?,
                ResnetBlock2D::new(vb.pp("resnets").pp(1), &cfg)?,
            ],
            attention: add_attention
                .then(|| SpatialSelfAttention::new(vb.pp("attentions").pp(0), channels, groups))
                .transpose()?,
        })
    }
}

impl VaeMidBlock {
    /// The forward, each ResNet and the attention checkpointed if `ckpt`.
    fn forward_ckpt(&self, x: &Tensor, ckpt: bool) -> Result<Tensor> {
        let mut x = run_resnet(&self.resnets[0], x, ckpt)?;
        if let Some(attn) = &self.attention {
            let attn = attn.clone();
            x = maybe_checkpoint(ckpt, &x, move |x| attn.forward(x))?;
        }
        run_resnet(&self.resnets[1], &x, ckpt)
    }
}

impl Module for VaeMidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_ckpt(x, false)
    }
}

/// `f(x)`, checkpointed if `on` (backward recomputes it instead of keeping its activations; see
/// [`checkpoint`]); only the gradient with respect to `x` flows through.
fn maybe_checkpoint(
    on: bool,
    x: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !on {
        return f(x);
    }
    // No second input: an untracked scalar stands in for the context.
    let none = Tensor::zeros((), x.dtype(), x.device())?;
    checkpoint(Arc::new(move |x, _| f(x)), x, &none)
}

fn run_resnet(r: &ResnetBlock2D, x: &Tensor, ckpt: bool) -> Result<Tensor> {
    let r = r.clone();
    maybe_checkpoint(ckpt, x, move |x| r.forward(x, None))
}

fn resnet_cfg(in_channels: usize, out_channels: usize, groups: usize) -> ResnetConfig {
    ResnetConfig {
        in_channels,
        out_channels,
        temb_channels: None,
        groups,
        eps: EPS,
        output_scale_factor: 1.0,
    }
}

/// A `DownEncoderBlock2D` or `UpDecoderBlock2D`: ResNets, then an optional resampler.
#[derive(Debug, Clone)]
pub struct VaeBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsampler: Option<Downsample2D>,
    pub upsampler: Option<Upsample2D>,
}

impl VaeBlock {
    fn resnets(
        vb: &VarBuilder,
        n: usize,
        in_c: usize,
        out_c: usize,
        groups: usize,
    ) -> Result<Vec<ResnetBlock2D>> {
        (0..n)
            .map(|i| {
                let i_c = if i == 0 { in_c } else { out_c };
                ResnetBlock2D::new(vb.pp("resnets").pp(i), &resnet_cfg(i_c, out_c, groups))
            })
            .collect()
    }
}

impl VaeBlock {
    /// The forward, each ResNet and the resampler checkpointed if `ckpt`.
    fn forward_ckpt(&self, x: &Tensor, ckpt: bool) -> Result<Tensor> {
        let mut x = x.clone();
        for resnet in &self.resnets {
            x = run_resnet(resnet, &x, ckpt)?;
        }
        if let Some(down) = &self.downsampler {
            let down = down.clone();
            x = maybe_checkpoint(ckpt, &x, move |x| down.forward(x))?;
        }
        if let Some(up) = &self.upsampler {
            let up = up.clone();
            x = maybe_checkpoint(ckpt, &x, move |x| up.forward(x))?;
        }
        Ok(x)
    }
}

impl Module for VaeBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_ckpt(x, false)
    }
}

/// `Decoder`: `conv_in`, mid block, up blocks (widest first), `conv_norm_out`, SiLU, `conv_out`.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: VaeMidBlock,
    pub up_blocks: Vec<VaeBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    /// Recompute each ResNet, the attention, each upsampler and the output head during backward
    /// (see [`AutoencoderKL::set_gradient_checkpointing`]).
    pub checkpoint: bool,
}

impl Decoder {
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let g = cfg.norm_num_groups;
        let mut prev = boc[n - 1];
        let mut up_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let out = boc[n - 1 - i];
            let vbi = vb.pp("up_blocks").pp(i);
            up_blocks.push(VaeBlock {
                resnets: VaeBlock::resnets(&vbi, cfg.layers_per_block + 1, prev, out, g)?,
                downsampler: None,
                upsampler: (i + 1 < n)
                    .then(|| Upsample2D::new(vbi.pp("upsamplers").pp(0), out))
                    .transpose()?,
            });
            prev = out;
        }
        Ok(Self {
            conv_in: conv3x3(vb.pp("conv_in"), cfg.latent_channels, boc[n - 1])?,
            mid_block: VaeMidBlock::new(
                vb.pp("mid_block"),
                boc[n - 1],
                g,
                cfg.mid_block_add_attention,
            )?,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, boc[0], EPS)?,
            conv_out: conv3x3(vb.pp("conv_out"), boc[0], cfg.out_channels)?,
            checkpoint: false,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let ckpt = self.checkpoint;
        let mut x = self
            .mid_block
            .forward_ckpt(&self.conv_in.forward(z)?, ckpt)?;
        for block in &self.up_blocks {
            x = block.forward_ckpt(&x, ckpt)?;
        }
        let (norm, conv) = (self.conv_norm_out.clone(), self.conv_out.clone());
        maybe_checkpoint(ckpt, &x, move |x| {
            conv.forward(&ops::silu(&norm.forward(x)?)?)
        })
    }
}

/// `Encoder`: `conv_in`, down blocks, mid block, `conv_norm_out`, SiLU, `conv_out` to the
/// posterior's mean and log-variance (`2 · latent_channels`).
#[derive(Debug, Clone)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<VaeBlock>,
    pub mid_block: VaeMidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Encoder {
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let g = cfg.norm_num_groups;
        let mut prev = boc[0];
        let mut down_blocks = Vec::with_capacity(n);
        for (i, &out) in boc.iter().enumerate() {
            let vbi = vb.pp("down_blocks").pp(i);
            down_blocks.push(VaeBlock {
                resnets: VaeBlock::resnets(&vbi, cfg.layers_per_block, prev, out, g)?,
                downsampler: (i + 1 < n)
                    .then(|| Downsample2D::new(vbi.pp("downsamplers").pp(0), out, 0))
                    .transpose()?,
                upsampler: None,
            });
            prev = out;
        }
        Ok(Self {
            conv_in: conv3x3(vb.pp("conv_in"), cfg.in_channels, boc[0])?,
            down_blocks,
            mid_block: VaeMidBlock::new(
                vb.pp("mid_block"),
                boc[n - 1],
                g,
                cfg.mid_block_add_attention,
            )?,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, boc[n - 1], EPS)?,
            conv_out: conv3x3(vb.pp("conv_out"), boc[n - 1], 2 * cfg.latent_channels)?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            x = block.forward(&x)?;
        }
        let x = self.mid_block.forward(&x)?;
        self.conv_out
            .forward(&ops::silu(&self.conv_norm_out.forward(&x)?)?)
    }
}

/// `AutoencoderKL`. See the module docs for the latent-scaling convention.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    pub config: AutoencoderKLConfig,
    pub encoder: Option<Encoder>,
    pub quant_conv: Option<Conv2d>,
    pub decoder: Decoder,
    pub post_quant_conv: Option<Conv2d>,
}

fn conv1x1(vb: VarBuilder, c: usize) -> Result<Conv2d> {
    crate::ops::conv2d(c, c, 1, Default::default(), vb)
}

impl AutoencoderKL {
    /// Encoder and decoder; `vb` is rooted at the VAE's weights.
    pub fn new(vb: VarBuilder, config: &AutoencoderKLConfig) -> Result<Self> {
        let mut vae = Self::decoder_only(vb.clone(), config)?;
        vae.encoder = Some(Encoder::new(vb.pp("encoder"), config)?);
        vae.quant_conv = config
            .use_quant_conv
            .then(|| conv1x1(vb.pp("quant_conv"), 2 * config.latent_channels))
            .transpose()?;
        Ok(vae)
    }

    /// The decoder half only (all DiffExplainer needs; the encoder's weights are not read).
    pub fn decoder_only(vb: VarBuilder, config: &AutoencoderKLConfig) -> Result<Self> {
        config.check()?;
        Ok(Self {
            config: config.clone(),
            encoder: None,
            quant_conv: None,
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| conv1x1(vb.pp("post_quant_conv"), config.latent_channels))
                .transpose()?,
        })
    }

    /// Loads encoder and decoder from `<dir>/vae/config.json` and
    /// `<dir>/vae/diffusion_pytorch_model[.<variant>].safetensors` of a diffusers model folder
    /// (see [`crate::pretrained`]), converting the weights to `dtype` on `device`.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (vb, cfg) = Self::pretrained_parts(dir.as_ref(), variant, dtype, device)?;
        Self::new(vb, &cfg)
    }

    /// As [`Self::from_pretrained`], the decoder half only (the encoder's weights are not read).
    pub fn decoder_only_from_pretrained(
        dir: impl AsRef<Path>,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (vb, cfg) = Self::pretrained_parts(dir.as_ref(), variant, dtype, device)?;
        Self::decoder_only(vb, &cfg)
    }

    fn pretrained_parts(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<(VarBuilder<'static>, AutoencoderKLConfig)> {
        use crate::pretrained::{config_path, open_weights, VAE};
        let cfg = AutoencoderKLConfig::from_file(config_path(dir, &VAE)?)?;
        let vb = open_weights(dir, &VAE, variant)?.into_var_builder(dtype, device);
        Ok((vb, cfg))
    }

    /// Turns gradient checkpointing of the decoder on or off (off by default). On: backward
    /// recomputes each ResNet, the mid-block attention, each upsampler and the output head
    /// instead of keeping their activations (at 512x512 the decoder's activations dominate the
    /// memory of a backward pass); values and the gradient with respect to the latents are
    /// unchanged, parameter gradients are not computed.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.decoder.checkpoint = on;
    }

    /// diffusers' `vae.decode(z).sample`: unscaled latents `[b, latent_channels, h, w]` to an
    /// image `[b, out_channels, 8h, 8w]` (for SD's four blocks) in roughly `[-1, 1]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// diffusers' `vae.encode(x).latent_dist.mean`: an image in `[-1, 1]` to the posterior mean
    /// of the unscaled latents. Errors if the model was built with [`Self::decoder_only`].
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let encoder = self.encoder.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("AutoencoderKL: built decoder-only, cannot encode".into())
        })?;
        let moments = encoder.forward(x)?;
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&moments)?,
            None => moments,
        };
        moments.narrow(1, 0, self.config.latent_channels)
    }

    /// Sampler (scaled) latents to the autoencoder's: `latents / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        latents.affine(
            1.0 / self.config.scaling_factor,
            self.config.shift_factor.unwrap_or(0.0),
        )
    }

    /// The autoencoder's latents to the sampler's: `(z - shift_factor) · scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        z.affine(
            self.config.scaling_factor,
            -shift * self.config.scaling_factor,
        )
    }

    /// The pipelines' last step: sampler (scaled) latents to an image in `[0, 1]`,
    /// `(decode(unscale(latents)) / 2 + 0.5).clamp(0, 1)`. The clamp has zero gradient outside
    /// `[0, 1]` (see the module docs).
    pub fn decode_to_image(&self, latents: &Tensor) -> Result<Tensor> {
        crate::ops::clamp(
            &self
                .decode(&self.unscale_latents(latents)?)?
                .affine(0.5, 0.5)?,
            0.0,
            1.0,
        )
    }
}
