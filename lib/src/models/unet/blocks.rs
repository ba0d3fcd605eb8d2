//! The UNet's building blocks: `ResnetBlock2D`, `Downsample2D`, `Upsample2D` (shared with the
//! VAE), and the down / mid / up blocks. One struct serves a block with and without
//! cross-attention (`CrossAttnDownBlock2D` / `DownBlock2D`, ...): the plain kind has no
//! `attentions`.

use crate::ops::{Conv2d, Conv2dConfig, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use std::sync::Arc;

use super::attention::{Transformer2DConfig, Transformer2DModel};
use super::checkpoint::checkpoint;
use crate::ops::{self, GroupNorm};

/// The shape of one [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding (`time_emb_proj`); `None` in the VAE.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    /// The output is divided by this (`output_scale_factor`; 1 in SD).
    pub output_scale_factor: f64,
}

/// `ResnetBlock2D` (`time_embedding_norm="default"`): GroupNorm, SiLU, conv 3x3, plus the
/// projected time embedding; GroupNorm, SiLU, conv 3x3; plus the (1x1-projected) input.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

pub(crate) fn conv3x3(vb: VarBuilder, i: usize, o: usize) -> Result<Conv2d> {
    conv_k(vb, i, o, 3)
}

/// A stride-1 convolution with "same" padding for an odd kernel size.
pub(crate) fn conv_k(vb: VarBuilder, i: usize, o: usize, k: usize) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: k / 2,
        ..Default::default()
    };
    crate::ops::conv2d(i, o, k, cfg, vb)
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cfg: &ResnetConfig) -> Result<Self> {
        let (i, o) = (cfg.in_channels, cfg.out_channels);
        let time_emb_proj = cfg
            .temb_channels
            .map(|t| crate::ops::linear(t, o, vb.pp("time_emb_proj")))
            .transpose()?;
        let conv_shortcut = (i != o)
            .then(|| crate::ops::conv2d(i, o, 1, Default::default(), vb.pp("conv_shortcut")))
            .transpose()?;
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), cfg.groups, i, cfg.eps)?,
            conv1: conv3x3(vb.pp("conv1"), i, o)?,
            time_emb_proj,
            norm2: GroupNorm::new(vb.pp("norm2"), cfg.groups, o, cfg.eps)?,
            conv2: conv3x3(vb.pp("conv2"), o, o)?,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `x`: `[b, c, h, w]`; `temb`: `[b, temb_channels]` (required iff the block has
    /// `time_emb_proj`).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&ops::silu(&self.norm1.forward(x)?)?)?;
        match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let t = proj.forward(&ops::silu(temb)?)?;
                h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
            }
            (None, None) => {}
            (Some(_), None) => {
                candle_core::bail!("ResnetBlock2D: this block needs a time embedding")
            }
            (None, Some(_)) => {
                candle_core::bail!("ResnetBlock2D: this block takes no time embedding")
            }
        }
        let h = self.conv2.forward(&ops::silu(&self.norm2.forward(&h)?)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let y = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(y)
        } else {
            y / self.output_scale_factor
        }
    }
}

/// `Downsample2D` with a convolution (`conv`, 3x3, stride 2). `padding` 1 in the UNet; the
/// VAE encoder uses padding 0 after padding right and bottom by one (diffusers' `F.pad(0,1,0,1)`).
#[derive(Debug, Clone)]
pub struct Downsample2D {
    pub conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            conv: crate::ops::conv2d(channels, channels, 3, cfg, vb.pp("conv"))?,
            pad_right_bottom: padding == 0,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            self.conv
                .forward(&x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D`: nearest-neighbour ×2 (our op; candle's `upsample_nearest2d` backward is wrong),
/// then `conv` 3x3.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(vb.pp("conv"), channels, channels)?,
        })
    }
}

impl Upsample2D {
    /// Upsamples to `size` (diffusers' `output_size`, the UNet's next skip's spatial size)
    /// instead of twice the input: `F.interpolate(size=..., mode="nearest")` for a size of
    /// `2n` or `2n - 1` picks source `floor(i * n / size) = floor(i / 2)`, i.e. the ×2 result
    /// with its last row/column cut. A skip that is odd-sized (the downsampler rounded up)
    /// therefore lines up with the upsampled tensor, as in diffusers.
    pub fn forward_to(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut up = ops::upsample_nearest2x(x)?;
        if let Some((out_h, out_w)) = size {
            if !(2 * h - 1..=2 * h).contains(&out_h) || !(2 * w - 1..=2 * w).contains(&out_w) {
                candle_core::bail!(
                    "Upsample2D: cannot upsample {h}x{w} to {out_h}x{out_w} (expected 2x or 2x-1)"
                )
            }
            if (out_h, out_w) != (2 * h, 2 * w) {
                up = up.narrow(2, 0, out_h)?.narrow(3, 0, out_w)?;
            }
        }
        self.conv.forward(&up)
    }
}

impl Module for Upsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_to(x, None)
    }
}

/// What every block of one UNet shares.
#[derive(Debug, Clone, Copy)]
pub struct BlockContext {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
}

impl BlockContext {
    fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: 1.0,
        }
    }

    fn transformer(&self, channels: usize, attn: Option<CrossAttn>) -> Option<Transformer2DConfig> {
        attn.map(|a| Transformer2DConfig {
            channels,
            heads: a.heads,
            num_layers: a.transformer_layers,
            cross_attention_dim: self.cross_attention_dim,
            norm_num_groups: self.groups,
            use_linear_projection: self.use_linear_projection,
        })
    }
}

/// Cross-attention settings of a `CrossAttn*` block; `None` for the plain blocks.
#[derive(Debug, Clone, Copy)]
pub struct CrossAttn {
    pub heads: usize,
    pub transformer_layers: usize,
}

fn attentions(
    vb: &VarBuilder,
    n: usize,
    cfg: Option<Transformer2DConfig>,
) -> Result<Vec<Transformer2DModel>> {
    match cfg {
        None => Ok(Vec::new()),
        Some(cfg) => (0..n)
            .map(|i| Transformer2DModel::new(vb.pp("attentions").pp(i), &cfg))
            .collect(),
    }
}

/// A ResNet with the UNet's time embedding, checkpointed if asked (see `checkpoint`).
fn run_resnet(r: &ResnetBlock2D, x: &Tensor, temb: &Tensor, ckpt: bool) -> Result<Tensor> {
    if ckpt {
        let r = r.clone();
        checkpoint(Arc::new(move |x, t| r.forward(x, Some(t))), x, temb)
    } else {
        r.forward(x, Some(temb))
    }
}

/// A spatial transformer, checkpointed if asked.
fn run_attn(a: &Transformer2DModel, x: &Tensor, ehs: &Tensor, ckpt: bool) -> Result<Tensor> {
    if ckpt {
        let a = a.clone();
        checkpoint(Arc::new(move |x, c| a.forward(x, c)), x, ehs)
    } else {
        a.forward(x, ehs)
    }
}

/// `CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D` (without).
#[derive(Debug, Clone)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsampler: Option<Downsample2D>,
    /// Recompute each ResNet and transformer during backward (see `checkpoint`).
    pub checkpoint: bool,
}

/// The shape of one down or up block.
#[derive(Debug, Clone, Copy)]
pub struct BlockShape {
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_layers: usize,
    /// Down blocks: add a `Downsample2D` (all but the last); up blocks: an `Upsample2D`.
    pub resample: bool,
    pub cross_attn: Option<CrossAttn>,
}

impl DownBlock {
    pub fn new(
        vb: VarBuilder,
        ctx: &BlockContext,
        shape: &BlockShape,
        downsample_padding: usize,
    ) -> Result<Self> {
        let resnets = (0..shape.num_layers)
            .map(|i| {
                let in_c = if i == 0 {
                    shape.in_channels
                } else {
                    shape.out_channels
                };
                ResnetBlock2D::new(
                    vb.pp("resnets").pp(i),
                    &ctx.resnet(in_c, shape.out_channels),
                )
            })
            .collect::<Result<_>>()?;
        let attentions = attentions(
            &vb,
            shape.num_layers,
            ctx.transformer(shape.out_channels, shape.cross_attn),
        )?;
        let downsampler = shape
            .resample
            .then(|| {
                Downsample2D::new(
                    vb.pp("downsamplers").pp(0),
                    shape.out_channels,
                    downsample_padding,
                )
            })
            .transpose()?;
        Ok(Self {
            resnets,
            attentions,
            downsampler,
            checkpoint: false,
        })
    }

    /// Returns the block's output and the skip connections it leaves for the up path (one per
    /// ResNet, plus the downsampled output).
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = x.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = run_resnet(resnet, &x, temb, self.checkpoint)?;
            if let Some(attn) = self.attentions.get(i) {
                x = run_attn(attn, &x, encoder_hidden_states, self.checkpoint)?;
            }
            skips.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(&x)?;
            skips.push(x.clone());
        }
        Ok((x, skips))
    }
}

/// `UNetMidBlock2DCrossAttn`: ResNet, then (attention, ResNet) per transformer stage.
#[derive(Debug, Clone)]
pub struct MidBlockCrossAttn {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    /// Recompute each ResNet and transformer during backward (see `checkpoint`).
    pub checkpoint: bool,
}

impl MidBlockCrossAttn {
    pub fn new(
        vb: VarBuilder,
        ctx: &BlockContext,
        channels: usize,
        cross_attn: CrossAttn,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let resnet_cfg = ResnetConfig {
            output_scale_factor,
            ..ctx.resnet(channels, channels)
        };
        // diffusers' `num_layers` for the mid block is 1: two ResNets around one attention.
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::new(vb.pp("resnets").pp(i), &resnet_cfg))
            .collect::<Result<_>>()?;
        let attentions = attentions(&vb, 1, ctx.transformer(channels, Some(cross_attn)))?;
        Ok(Self {
            resnets,
            attentions,
            checkpoint: false,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let ckpt = self.checkpoint;
        let mut x = run_resnet(&self.resnets[0], x, temb, ckpt)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = run_attn(attn, &x, encoder_hidden_states, ckpt)?;
            x = run_resnet(resnet, &x, temb, ckpt)?;
        }
        Ok(x)
    }
}

/// `CrossAttnUpBlock2D` (with `attentions`) or `UpBlock2D` (without). Each ResNet takes the
/// previous output concatenated (channels) with one skip connection, last-in first-out.
#[derive(Debug, Clone)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsampler: Option<Upsample2D>,
    /// Recompute each ResNet and transformer during backward (see `checkpoint`).
    pub checkpoint: bool,
}

impl UpBlock {
    /// `shape.in_channels` is the width of the matching down block's input (the last skip's
    /// width); `prev_output_channels` the width coming from below.
    pub fn new(
        vb: VarBuilder,
        ctx: &BlockContext,
        shape: &BlockShape,
        prev_output_channels: usize,
    ) -> Result<Self> {
        let n = shape.num_layers;
        let out = shape.out_channels;
        let resnets = (0..n)
            .map(|i| {
                let skip = if i == n - 1 { shape.in_channels } else { out };
                let below = if i == 0 { prev_output_channels } else { out };
                ResnetBlock2D::new(vb.pp("resnets").pp(i), &ctx.resnet(below + skip, out))
            })
            .collect::<Result<_>>()?;
        let attentions = attentions(&vb, n, ctx.transformer(out, shape.cross_attn))?;
        let upsampler = shape
            .resample
            .then(|| Upsample2D::new(vb.pp("upsamplers").pp(0), out))
            .transpose()?;
        Ok(Self {
            resnets,
            attentions,
            upsampler,
            checkpoint: false,
        })
    }

    /// Pops one skip connection per ResNet from the end of `skips`.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                candle_core::Error::Msg("UpBlock: ran out of skip connections".into())
            })?;
            x = run_resnet(
                resnet,
                &Tensor::cat(&[&x, &skip], 1)?,
                temb,
                self.checkpoint,
            )?;
            if let Some(attn) = self.attentions.get(i) {
                x = run_attn(attn, &x, encoder_hidden_states, self.checkpoint)?;
            }
        }
        match &self.upsampler {
            // diffusers' `upsample_size`: the next skip's size (they differ from 2x when the
            // sample's side is not a multiple of 2^downsamplers).
            Some(up) => {
                let size = match skips.last() {
                    Some(next) => {
                        let (_, _, h, w) = next.dims4()?;
                        Some((h, w))
                    }
                    None => None,
                };
                up.forward_to(&x, size)
            }
            None => Ok(x),
        }
    }
}
