//! The CLIP vision tower (transformers' `CLIPVisionModel` and `CLIPVisionModelWithProjection`),
//! differentiable with respect to its pixels, with taps on chosen layers' hidden states (CLIPSeg
//! reads layers 3, 6, 9).
//!
//! Forward, for `pixel_values` `[b, num_channels, h, w]` (already normalized, f32/f64/f16):
//! a `patch_size`-strided convolution without bias gives `[b, d, h/p, w/p]` patches, flattened
//! row-major to `[b, n, d]`; the learned `class_embedding` `[d]` is prepended (`[b, 1 + n, d]`),
//! `position_embedding` `[1 + (image_size/p)², d]` added, `pre_layrnorm` applied, then the
//! encoder's pre-LN layers without a mask. `pooler_output` is `post_layernorm` of the class token
//! of the last layer; `last_hidden_state` has no final norm (as in transformers).
//!
//! **Hidden states** are numbered as transformers' `output_hidden_states=True` numbers them:
//! index 0 is the embeddings after `pre_layrnorm`, index `i >= 1` the output of encoder layer
//! `i - 1`. CLIPSeg's `extract_layers = [3, 6, 9]` reads indices 4, 7, 10.
//!
//! **Image size**: by default the input must be `image_size` square, else an error (as
//! transformers' `CLIPVisionModel`). With `interpolate_pos_encoding` (CLIPSeg's default) the patch
//! position embeddings are resized bicubically to the input's grid (`F.interpolate(mode="bicubic",
//! align_corners=False)` on the `[d, g, g]` grid), unless the grid already matches and is square.
//!
//! Parameter names are transformers': `vision_model.embeddings.class_embedding`,
//! `vision_model.embeddings.patch_embedding.weight`, `vision_model.pre_layrnorm.weight`,
//! `vision_model.encoder.layers.{i}.self_attn.q_proj.weight`, ..., `visual_projection.weight`. A
//! checkpoint with or without the leading `vision_model.` loads (transformers 5 saves a bare
//! `CLIPVisionModel` without it; `CLIPModel` and `CLIPVisionModelWithProjection` checkpoints have
//! it). Parity: `tests/parity/cases/clip_vision_*` (kind `clip_vision`).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::clip_encoder::{ClipEncoderLayer, LayerDims};
use crate::ops::{
    self, linear_no_bias, Activation, AttentionMask, Conv2d, Conv2dConfig, LayerNorm, Linear,
};

/// transformers' `CLIPVisionConfig`, with its defaults for absent fields (ViT-B/32). Unknown
/// fields are ignored. Public fields, so a tiny configuration can be written in code.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    /// Width of `visual_projection` (`CLIPVisionModelWithProjection` only).
    #[serde(default = "defaults::projection_dim")]
    pub projection_dim: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::num_channels")]
    pub num_channels: usize,
    #[serde(default = "defaults::image_size")]
    pub image_size: usize,
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    #[serde(
        default = "defaults::hidden_act",
        deserialize_with = "super::clip_text::deserialize_hidden_act"
    )]
    pub hidden_act: Activation,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
}

mod defaults {
    use crate::ops::Activation;
    pub fn hidden_size() -> usize {
        768
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn projection_dim() -> usize {
        512
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn num_channels() -> usize {
        3
    }
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        32
    }
    pub fn hidden_act() -> Activation {
        Activation::QuickGelu
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
}

impl ClipVisionConfig {
    /// Parses a `CLIPVisionConfig` JSON value, or a full `CLIPConfig` / `CLIPSegConfig` whose
    /// `vision_config` holds it.
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        let value = match value.get("vision_config") {
            Some(v @ serde_json::Value::Object(_)) => v.clone(),
            _ => value,
        };
        let cfg: Self = serde_json::from_value(value)
            .map_err(|e| candle_core::Error::Msg(format!("CLIP vision config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a `config.json` (a `CLIPVisionModel`'s, or a `CLIPModel`'s).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        crate::pretrained::read_config(path, Self::from_value)
    }

    /// Patches per side at `image_size`.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn layer_dims(&self) -> LayerDims {
        LayerDims {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            hidden_act: self.hidden_act,
            layer_norm_eps: self.layer_norm_eps,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            bail!(
                "CLIP vision config: hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            )
        }
        if self.patch_size == 0 || self.image_size < self.patch_size {
            bail!(
                "CLIP vision config: image_size {} must hold at least one patch of patch_size {}",
                self.image_size,
                self.patch_size
            )
        }
        Ok(())
    }
}

/// What to run: which hidden states to keep, and whether other image sizes are allowed.
#[derive(Debug, Clone, Default)]
pub struct ClipVisionOptions {
    /// transformers' hidden-state indices to return (0 = embeddings, i = layer i-1's output).
    pub hidden_states: Vec<usize>,
    /// Resize the position embeddings to the input's patch grid (CLIPSeg does by default).
    pub interpolate_pos_encoding: bool,
}

/// The tower's outputs.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// The last layer's tokens, `[b, 1 + n, d]` (class token first; no final norm).
    pub last_hidden_state: Tensor,
    /// `post_layernorm` of the last layer's class token, `[b, d]`.
    pub pooler_output: Tensor,
    /// The requested hidden states by transformers' index, each `[b, 1 + n, d]`.
    pub hidden_states: BTreeMap<usize, Tensor>,
}

/// transformers' `CLIPVisionModel` (no projection head).
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    /// `[d]`.
    pub class_embedding: Tensor,
    patch_embedding: Conv2d,
    /// `[1 + grid², d]`.
    pub position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    post_layernorm: LayerNorm,
    cfg: ClipVisionConfig,
}

impl ClipVisionModel {
    /// Loads from a VarBuilder over transformers' names, with or without `vision_model.`.
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        cfg.validate()?;
        let vb = if vb.contains_tensor("vision_model.embeddings.class_embedding") {
            vb.pp("vision_model")
        } else {
            vb
        };
        let (d, p, eps) = (cfg.hidden_size, cfg.patch_size, cfg.layer_norm_eps);
        let emb = vb.pp("embeddings");
        let patch_config = Conv2dConfig {
            stride: p,
            ..Default::default()
        };
        let dims = cfg.layer_dims();
        Ok(Self {
            class_embedding: emb.get(d, "class_embedding")?,
            patch_embedding: ops::conv2d_no_bias(
                cfg.num_channels,
                d,
                p,
                patch_config,
                emb.pp("patch_embedding"),
            )?,
            position_embedding: emb
                .pp("position_embedding")
                .get((cfg.grid() * cfg.grid() + 1, d), "weight")?,
            pre_layrnorm: LayerNorm::new(vb.pp("pre_layrnorm"), d, eps)?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| ClipEncoderLayer::new(vb.pp("encoder").pp("layers").pp(i), &dims))
                .collect::<Result<Vec<_>>>()?,
            post_layernorm: LayerNorm::new(vb.pp("post_layernorm"), d, eps)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    /// The embeddings after `pre_layrnorm`, `[b, 1 + n, d]` (hidden state 0).
    pub fn embed(&self, pixel_values: &Tensor, interpolate_pos_encoding: bool) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4().map_err(|_| {
            candle_core::Error::Msg(format!(
                "CLIP vision tower: pixel_values must be [batch, channels, height, width], got {:?}",
                pixel_values.dims()
            ))
        })?;
        let (p, d) = (self.cfg.patch_size, self.cfg.hidden_size);
        if c != self.cfg.num_channels {
            bail!(
                "CLIP vision tower: pixel_values have {c} channels, the model takes {}",
                self.cfg.num_channels
            )
        }
        let size = self.cfg.image_size;
        if !interpolate_pos_encoding && (h != size || w != size) {
            bail!(
                "CLIP vision tower: input image size {h}x{w} does not match the model's \
                 {size}x{size} (CLIPSeg-style position interpolation is off)"
            )
        }
        if h < p || w < p {
            bail!("CLIP vision tower: input image size {h}x{w} is smaller than one {p}x{p} patch")
        }
        let dtype = pixel_values.dtype();
        let patches = self.patch_embedding.forward(pixel_values)?; // [b, d, gh, gw]
        let (gh, gw) = (patches.dim(2)?, patches.dim(3)?);
        let patches = patches.flatten_from(2)?.transpose(1, 2)?; // [b, n, d]
        let class = self
            .class_embedding
            .to_dtype(dtype)?
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&class, &patches], 1)?;
        let positions = self.positions(gh, gw)?.to_dtype(dtype)?;
        self.pre_layrnorm.forward(&x.broadcast_add(&positions)?)
    }

    /// Position embeddings for a `gh x gw` patch grid, `[1 + gh·gw, d]`: as stored when the
    /// grid is the model's own and square (transformers' condition), else the patch part
    /// resized bicubically.
    fn positions(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let g = self.cfg.grid();
        if gh * gw == g * g && gh == gw {
            return Ok(self.position_embedding.clone());
        }
        let d = self.cfg.hidden_size;
        let class = self.position_embedding.narrow(0, 0, 1)?;
        let grid = self
            .position_embedding
            .narrow(0, 1, g * g)?
            .reshape((1, g, g, d))?
            .permute((0, 3, 1, 2))?;
        let grid = ops::resize_bicubic(&grid, (gh, gw))?
            .permute((0, 2, 3, 1))?
            .reshape((gh * gw, d))?;
        Tensor::cat(&[&class, &grid], 0)
    }

    /// Runs the tower, keeping the hidden states `options.hidden_states` names.
    pub fn forward_with(
        &self,
        pixel_values: &Tensor,
        options: &ClipVisionOptions,
    ) -> Result<ClipVisionOutput> {
        self.check_indices(&options.hidden_states)?;
        let mut hidden_states = BTreeMap::new();
        let mut x = self.embed(pixel_values, options.interpolate_pos_encoding)?;
        if options.hidden_states.contains(&0) {
            hidden_states.insert(0, x.clone());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, AttentionMask::None)?;
            if options.hidden_states.contains(&(i + 1)) {
                hidden_states.insert(i + 1, x.clone());
            }
        }
        let pooler_output = self
            .post_layernorm
            .forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok(ClipVisionOutput {
            last_hidden_state: x,
            pooler_output,
            hidden_states,
        })
    }

    /// The model's own size, no hidden states.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        self.forward_with(pixel_values, &ClipVisionOptions::default())
    }

    /// Only the hidden states at `indices` (running the layers up to the deepest one, not
    /// further), in the order asked. What CLIPSeg needs from the tower.
    pub fn hidden_states(
        &self,
        pixel_values: &Tensor,
        indices: &[usize],
        interpolate_pos_encoding: bool,
    ) -> Result<Vec<Tensor>> {
        self.check_indices(indices)?;
        let deepest = indices.iter().copied().max().unwrap_or(0);
        let mut states = vec![self.embed(pixel_values, interpolate_pos_encoding)?];
        for layer in &self.layers[..deepest] {
            let x = layer.forward(states.last().expect("embeddings"), AttentionMask::None)?;
            states.push(x);
        }
        Ok(indices.iter().map(|&i| states[i].clone()).collect())
    }

    fn check_indices(&self, indices: &[usize]) -> Result<()> {
        let n = self.cfg.num_hidden_layers;
        if let Some(&bad) = indices.iter().find(|&&i| i > n) {
            bail!(
                "CLIP vision tower: hidden state {bad} does not exist (0 = embeddings, 1..={n} = \
                 the outputs of the {n} layers)"
            )
        }
        Ok(())
    }
}

/// transformers' `CLIPVisionModelWithProjection`: the tower plus `visual_projection` (no bias)
/// on the pooled output, giving CLIP's image embedding `[b, projection_dim]`.
#[derive(Debug, Clone)]
pub struct ClipVisionModelWithProjection {
    pub vision_model: ClipVisionModel,
    visual_projection: Linear,
}

impl ClipVisionModelWithProjection {
    /// Loads `vision_model.*` and `visual_projection.weight`.
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        Ok(Self {
            vision_model: ClipVisionModel::new(vb.pp("vision_model"), cfg)?,
            visual_projection: linear_no_bias(
                cfg.hidden_size,
                cfg.projection_dim,
                vb.pp("visual_projection"),
            )?,
        })
    }

    /// Loads `<dir>/image_encoder/config.json` and its `model[.<variant>].safetensors` (a
    /// diffusers folder's `image_encoder/`, see [`crate::pretrained`]), converting the weights
    /// to `dtype` on `device`.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        variant: Option<&str>,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        use crate::pretrained::{config_path, open_weights, IMAGE_ENCODER};
        let dir = dir.as_ref();
        let cfg = ClipVisionConfig::from_file(config_path(dir, &IMAGE_ENCODER)?)?;
        let weights = open_weights(dir, &IMAGE_ENCODER, variant)?;
        Self::new(weights.into_var_builder(dtype, device), &cfg)
    }

    /// CLIP's image embedding of `pixel_values` (normalized as the model's image processor
    /// says): `visual_projection(pooler_output)`, `[b, projection_dim]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.image_embeds(&self.vision_model.forward(pixel_values)?.pooler_output)
    }

    /// `visual_projection(pooler_output)`, `[b, projection_dim]`.
    pub fn image_embeds(&self, pooler_output: &Tensor) -> Result<Tensor> {
        self.visual_projection.forward(pooler_output)
    }
}
