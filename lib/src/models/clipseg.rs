//! CLIPSeg (Lüddecke & Ecker, *Image Segmentation Using Text and Image Prompts*, CVPR 2022):
//! transformers' `CLIPSegForImageSegmentation`, with the architecture and parameter names of
//! `CIDAS/clipseg-rd64-refined`, and [`Segmenter`], which takes images in `[0, 1]` and text
//! queries and returns mask logits and probabilities at the images' size.
//!
//! Forward (`config` is transformers' `CLIPSegConfig`):
//! 1. the CLIP vision tower ([`ClipVisionModel`], positions interpolated to the input's patch
//!    grid as transformers does by default) gives the hidden states after layers
//!    `extract_layers` (transformers' `hidden_states[i + 1]`), each `[b, 1 + n, d_vision]`;
//! 2. the conditional embedding `[b, projection_dim]` is `text_projection` of the CLIP text
//!    tower's pooled output for the query's token ids (or given directly);
//! 3. the decoder walks the activations deepest first: `x = reduces[k](act) (+ x)`; after the
//!    `conditional_layer`-th reduce, FiLM: `x = film_mul(cond) * x + film_add(cond)` (broadcast
//!    over tokens); then a post-LN transformer layer (`reduce_dim` wide,
//!    `decoder_num_attention_heads` heads, `decoder_intermediate_size`, ReLU: transformers
//!    hard-codes ReLU and ignores `decoder_hidden_act`);
//! 4. the class token is dropped and the `[b, reduce_dim, g, g]` grid goes through the
//!    transposed-convolution head: one `ConvTranspose2d(reduce_dim, 1, patch, stride patch)`, or
//!    with `use_complex_transposed_convolution` (the refined model) `Conv2d(3x3, pad 1)`, ReLU,
//!    `ConvTranspose2d(reduce_dim, reduce_dim/2, patch/4, stride patch/4)`, ReLU,
//!    `ConvTranspose2d(reduce_dim/2, 1, patch/4, stride patch/4)`. Logits `[b, g·u, g·u]` with
//!    `u = patch` (plain head) or `(patch/4)²` (complex head; 16 = patch for the real model).
//!
//! The input must give a square patch grid (transformers reshapes the tokens to `sqrt(n)` per
//! side). Every step is differentiable in the pixels (our ops; the transposed convolutions, whose
//! stride equals their kernel, are one matmul each).
//!
//! Parameter names: `clip.vision_model.*`, `clip.text_model.*`, `clip.visual_projection.weight`,
//! `clip.text_projection.weight`, `decoder.film_mul.*`, `decoder.film_add.*`,
//! `decoder.reduces.{k}.*`, `decoder.layers.{k}.*`, `decoder.transposed_convolution[.{0,2,4}].*`.
//! Parity: `tests/parity/cases/clipseg_*` (kind `clipseg`). Shapes, preprocessing and sources:
//! `docs/clipseg.md`.

use std::path::Path;

use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::clip_encoder::{ClipEncoderLayer, LayerDims};
use super::clip_text::{ClipTextConfig, ClipTextModel};
use super::clip_vision::{ClipVisionConfig, ClipVisionModel};
use crate::ops::{self, linear, linear_no_bias, Activation, Conv2d, Conv2dConfig, Linear};
use crate::tokenizer::ClipTokenizer;

/// transformers' `CLIPSegConfig` (defaults as there; `CIDAS/clipseg-rd64-refined` sets
/// `patch_size: 16` and `use_complex_transposed_convolution: true`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipSegConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    pub projection_dim: usize,
    /// Vision layers whose outputs feed the decoder (0-based layer numbers: `[3, 6, 9]`).
    pub extract_layers: Vec<usize>,
    pub reduce_dim: usize,
    pub decoder_num_attention_heads: usize,
    pub decoder_intermediate_size: usize,
    /// After which decoder step (0 = the first, deepest) FiLM conditioning is applied.
    pub conditional_layer: usize,
    pub use_complex_transposed_convolution: bool,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default = "default_projection_dim")]
    projection_dim: usize,
    #[serde(default = "default_extract_layers")]
    extract_layers: Vec<usize>,
    #[serde(default = "default_reduce_dim")]
    reduce_dim: usize,
    #[serde(default = "default_decoder_heads")]
    decoder_num_attention_heads: usize,
    #[serde(default = "default_decoder_intermediate")]
    decoder_intermediate_size: usize,
    #[serde(default)]
    conditional_layer: usize,
    #[serde(default)]
    use_complex_transposed_convolution: bool,
}

fn default_projection_dim() -> usize {
    512
}
fn default_extract_layers() -> Vec<usize> {
    vec![3, 6, 9]
}
fn default_reduce_dim() -> usize {
    64
}
fn default_decoder_heads() -> usize {
    4
}
fn default_decoder_intermediate() -> usize {
    2048
}

impl ClipSegConfig {
    /// Parses a `CLIPSegConfig` JSON value (`config.json` of a CLIPSeg checkpoint).
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        let sub = |key: &str| value.get(key).cloned().unwrap_or(serde_json::json!({}));
        let raw: RawConfig = serde_json::from_value(value.clone())
            .map_err(|e| candle_core::Error::Msg(format!("CLIPSeg config: {e}")))?;
        let cfg = Self {
            text_config: ClipTextConfig::from_value(sub("text_config"))?,
            vision_config: ClipVisionConfig::from_value(sub("vision_config"))?,
            projection_dim: raw.projection_dim,
            extract_layers: raw.extract_layers,
            reduce_dim: raw.reduce_dim,
            decoder_num_attention_heads: raw.decoder_num_attention_heads,
            decoder_intermediate_size: raw.decoder_intermediate_size,
            conditional_layer: raw.conditional_layer,
            use_complex_transposed_convolution: raw.use_complex_transposed_convolution,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        crate::pretrained::read_config(path, Self::from_value)
    }

    fn decoder_dims(&self) -> LayerDims {
        LayerDims {
            hidden_size: self.reduce_dim,
            intermediate_size: self.decoder_intermediate_size,
            num_attention_heads: self.decoder_num_attention_heads,
            hidden_act: Activation::Relu,
            layer_norm_eps: self.vision_config.layer_norm_eps,
        }
    }

    fn validate(&self) -> Result<()> {
        let layers = self.vision_config.num_hidden_layers;
        if self.extract_layers.is_empty() {
            bail!("CLIPSeg config: extract_layers is empty")
        }
        if let Some(&bad) = self.extract_layers.iter().find(|&&l| l >= layers) {
            bail!("CLIPSeg config: extract_layers holds {bad}, but the vision tower has {layers} layers (0..{layers})")
        }
        if self.conditional_layer >= self.extract_layers.len() {
            bail!(
                "CLIPSeg config: conditional_layer {} must be below the {} decoder layers",
                self.conditional_layer,
                self.extract_layers.len()
            )
        }
        if self.use_complex_transposed_convolution
            && (!self.vision_config.patch_size.is_multiple_of(4) || self.reduce_dim < 2)
        {
            bail!(
                "CLIPSeg config: the complex transposed convolution needs patch_size divisible by 4 \
                 (got {}) and reduce_dim >= 2 (got {})",
                self.vision_config.patch_size,
                self.reduce_dim
            )
        }
        Ok(())
    }
}

/// `nn.ConvTranspose2d(c_in, c_out, k, stride=k)` (no padding): the blocks do not overlap, so
/// each input pixel maps to its own `k x k` output block by one `[c_in] -> [c_out·k·k]` linear
/// map. PyTorch's weight is `[c_in, c_out, k, k]`.
#[derive(Debug, Clone)]
struct BlockTransposedConv {
    /// `[c_in, c_out·k·k]`.
    weight: Tensor,
    /// `[c_out]`.
    bias: Tensor,
    c_out: usize,
    k: usize,
}

impl BlockTransposedConv {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize, k: usize) -> Result<Self> {
        let weight = vb.get((c_in, c_out, k, k), "weight")?;
        Ok(Self {
            weight: weight.reshape((c_in, c_out * k * k))?,
            bias: vb.get(c_out, "bias")?,
            c_out,
            k,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (o, k) = (self.c_out, self.k);
        let y = x
            .permute((0, 2, 3, 1))?
            .reshape((b * h * w, c))?
            .matmul(&self.weight.to_dtype(x.dtype())?)?
            .reshape((b, h, w, o, k, k))?
            .permute((0, 3, 1, 4, 2, 5))? // [b, o, h, k, w, k]
            .reshape((b, o, h * k, w * k))?;
        y.broadcast_add(&self.bias.to_dtype(x.dtype())?.reshape((1, o, 1, 1))?)
    }
}

#[derive(Debug, Clone)]
enum Head {
    Simple(BlockTransposedConv),
    /// Conv 3x3, ReLU, transposed conv, ReLU, transposed conv (`transposed_convolution.{0,2,4}`).
    Complex(Conv2d, BlockTransposedConv, BlockTransposedConv),
}

impl Head {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Head::Simple(t) => t.forward(x),
            Head::Complex(conv, t1, t2) => {
                let x = ops::relu(&conv.forward(x)?)?;
                let x = ops::relu(&t1.forward(&x)?)?;
                t2.forward(&x)
            }
        }
    }
}

/// transformers' `CLIPSegDecoder`.
#[derive(Debug, Clone)]
pub struct ClipSegDecoder {
    film_mul: Linear,
    film_add: Linear,
    reduces: Vec<Linear>,
    layers: Vec<ClipEncoderLayer>,
    head: Head,
    conditional_layer: usize,
}

impl ClipSegDecoder {
    pub fn new(vb: VarBuilder, cfg: &ClipSegConfig) -> Result<Self> {
        let (r, p) = (cfg.reduce_dim, cfg.vision_config.patch_size);
        let depth = cfg.extract_layers.len();
        let tc = vb.pp("transposed_convolution");
        let head = if cfg.use_complex_transposed_convolution {
            let conv_config = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            Head::Complex(
                ops::conv2d(r, r, 3, conv_config, tc.pp(0))?,
                BlockTransposedConv::new(tc.pp(2), r, r / 2, p / 4)?,
                BlockTransposedConv::new(tc.pp(4), r / 2, 1, p / 4)?,
            )
        } else {
            Head::Simple(BlockTransposedConv::new(tc, r, 1, p)?)
        };
        let dims = cfg.decoder_dims();
        Ok(Self {
            film_mul: linear(cfg.projection_dim, r, vb.pp("film_mul"))?,
            film_add: linear(cfg.projection_dim, r, vb.pp("film_add"))?,
            reduces: (0..depth)
                .map(|k| linear(cfg.vision_config.hidden_size, r, vb.pp("reduces").pp(k)))
                .collect::<Result<_>>()?,
            layers: (0..depth)
                .map(|k| ClipEncoderLayer::new(vb.pp("layers").pp(k), &dims))
                .collect::<Result<_>>()?,
            head,
            conditional_layer: cfg.conditional_layer,
        })
    }

    /// `activations`: the extracted hidden states in `extract_layers` order (shallowest first),
    /// each `[b, 1 + g², d_vision]`; `conditional_embeddings`: `[b, projection_dim]`. Returns
    /// the logits `[b, g·u, g·u]` (see the module doc).
    pub fn forward(
        &self,
        activations: &[Tensor],
        conditional_embeddings: &Tensor,
    ) -> Result<Tensor> {
        if activations.len() != self.layers.len() {
            bail!(
                "CLIPSeg decoder: {} activations for {} decoder layers",
                activations.len(),
                self.layers.len()
            )
        }
        let mut x: Option<Tensor> = None;
        for (k, ((act, layer), reduce)) in activations
            .iter()
            .rev()
            .zip(&self.layers)
            .zip(&self.reduces)
            .enumerate()
        {
            let reduced = reduce.forward(act)?;
            let mut y = match x {
                Some(prev) => (reduced + prev)?,
                None => reduced,
            };
            if k == self.conditional_layer {
                let mul = self
                    .film_mul
                    .forward(conditional_embeddings)?
                    .unsqueeze(1)?;
                let add = self
                    .film_add
                    .forward(conditional_embeddings)?
                    .unsqueeze(1)?;
                y = y.broadcast_mul(&mul)?.broadcast_add(&add)?;
            }
            x = Some(layer.forward_post_norm(&y)?);
        }
        let x = x.expect("at least one decoder layer");
        let (b, s, r) = x.dims3()?;
        let n = s - 1;
        let g = (n as f64).sqrt().round() as usize;
        if g * g != n {
            bail!("CLIPSeg decoder: {n} patch tokens do not form a square grid (transformers reshapes to sqrt(n) per side)")
        }
        let grid = x
            .narrow(1, 1, n)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, r, g, g))?;
        self.head.forward(&grid)?.squeeze(1)
    }
}

/// transformers' `CLIPSegForImageSegmentation` (text-conditioned use).
#[derive(Debug, Clone)]
pub struct ClipSegForImageSegmentation {
    pub vision_model: ClipVisionModel,
    pub text_model: ClipTextModel,
    text_projection: Linear,
    pub decoder: ClipSegDecoder,
    cfg: ClipSegConfig,
}

impl ClipSegForImageSegmentation {
    pub fn new(vb: VarBuilder, cfg: &ClipSegConfig) -> Result<Self> {
        cfg.validate()?;
        let clip = vb.pp("clip");
        Ok(Self {
            vision_model: ClipVisionModel::new(clip.pp("vision_model"), &cfg.vision_config)?,
            text_model: ClipTextModel::new(clip.pp("text_model"), &cfg.text_config)?,
            text_projection: linear_no_bias(
                cfg.text_config.hidden_size,
                cfg.projection_dim,
                clip.pp("text_projection"),
            )?,
            decoder: ClipSegDecoder::new(vb.pp("decoder"), cfg)?,
            cfg: cfg.clone(),
        })
    }

    /// Loads `config.json` and `model.safetensors` of a CLIPSeg model folder (a Hub snapshot
    /// of `CIDAS/clipseg-rd64-refined`, or `save_pretrained`'s output).
    pub fn from_dir(
        dir: impl AsRef<Path>,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = ClipSegConfig::from_file(dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            bail!(
                "CLIPSeg: {} not found (a CLIPSeg folder holds config.json and model.safetensors)",
                weights.display()
            )
        }
        let vb = crate::weights::Checkpoint::open_safetensors(&[weights])?
            .into_var_builder(dtype, device);
        Self::new(vb, &cfg)
    }

    pub fn config(&self) -> &ClipSegConfig {
        &self.cfg
    }

    /// `text_projection` of the text tower's pooled output for `input_ids` `[b, s]`:
    /// `[b, projection_dim]` (transformers' `get_conditional_embeddings`).
    pub fn conditional_embeddings(&self, input_ids: &Tensor) -> Result<Tensor> {
        let pooled = self.text_model.forward(input_ids)?.pooled;
        self.text_projection.forward(&pooled)
    }

    /// Mask logits `[b, g·u, g·u]` (see the module doc) for normalized `pixel_values` `[b, 3, h, w]` (a square patch
    /// grid) and `conditional_embeddings` `[b, projection_dim]`.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        conditional_embeddings: &Tensor,
    ) -> Result<Tensor> {
        let b = pixel_values.dim(0)?;
        let (cb, cd) = conditional_embeddings.dims2()?;
        if cb != b || cd != self.cfg.projection_dim {
            bail!(
                "CLIPSeg: conditional embeddings {:?} must be [{b}, {}] (one per image)",
                conditional_embeddings.dims(),
                self.cfg.projection_dim
            )
        }
        let indices: Vec<usize> = self.cfg.extract_layers.iter().map(|l| l + 1).collect();
        let activations = self
            .vision_model
            .hidden_states(pixel_values, &indices, true)?;
        self.decoder.forward(&activations, conditional_embeddings)
    }
}

/// CLIPSeg's image preprocessing (`CIDAS/clipseg-rd64-refined`'s `preprocessor_config.json`, a
/// `ViTImageProcessor`): resize to 352x352 (bilinear; antialiased here as PIL filters when
/// downscaling), rescale to `[0, 1]` (our input already is), normalize with ImageNet's mean and
/// std. No center crop.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipSegProcessor {
    pub size: (usize, usize),
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    pub antialias: bool,
}

impl Default for ClipSegProcessor {
    fn default() -> Self {
        Self {
            size: (352, 352),
            image_mean: [0.485, 0.456, 0.406],
            image_std: [0.229, 0.224, 0.225],
            antialias: true,
        }
    }
}

impl ClipSegProcessor {
    /// `[b, 3, h, w]` in `[0, 1]` -> `pixel_values` `[b, 3, size.0, size.1]`, differentiable.
    pub fn preprocess(&self, images: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = images.dims4().map_err(|_| {
            candle_core::Error::Msg(format!(
                "CLIPSeg: images must be [batch, 3, height, width], got {:?}",
                images.dims()
            ))
        })?;
        if c != 3 {
            bail!("CLIPSeg: images must have 3 channels (RGB), got {c}")
        }
        let x = ops::resize_bilinear(images, self.size, self.antialias)?;
        let (dev, dt) = (x.device(), x.dtype());
        let mean = Tensor::new(&self.image_mean, dev)?
            .to_dtype(dt)?
            .reshape((1, 3, 1, 1))?;
        let std = Tensor::new(&self.image_std, dev)?
            .to_dtype(dt)?
            .reshape((1, 3, 1, 1))?;
        x.broadcast_sub(&mean)?.broadcast_div(&std)
    }
}

/// What [`Segmenter::segment`] returns.
#[derive(Debug, Clone)]
pub struct Segmentation {
    /// CLIPSeg's logits at its own resolution, `[b, h', w']` (352x352 for the refined model).
    pub logits: Tensor,
    /// `sigmoid(logits)` resized (bilinear, no antialias) to the input images' `[b, h, w]`.
    pub probabilities: Tensor,
}

/// Text-prompted segmentation: images in `[0, 1]` and one query per image -> masks.
#[derive(Debug, Clone)]
pub struct Segmenter {
    pub model: ClipSegForImageSegmentation,
    pub processor: ClipSegProcessor,
    tokenizer: ClipTokenizer,
}

impl Segmenter {
    /// The tokenizer must match the text tower's vocabulary (CLIP's 49408 tokens).
    pub fn new(
        model: ClipSegForImageSegmentation,
        processor: ClipSegProcessor,
        tokenizer: ClipTokenizer,
    ) -> Result<Self> {
        let (vocab, model_vocab) = (
            tokenizer.vocab_size(),
            model.config().text_config.vocab_size,
        );
        if vocab != model_vocab {
            bail!("Segmenter: the tokenizer has {vocab} tokens but CLIPSeg's text tower has {model_vocab}")
        }
        Ok(Self {
            model,
            processor,
            tokenizer,
        })
    }

    /// The tokenizer of the queries.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// Token ids `[b, s]` (u32) of the queries, padded to the longest with the end-of-text id
    /// (CLIPSeg's tokenizer pads with `<|endoftext|>`; the text tower is causal and pools the
    /// first end-of-text, so padding never changes the embedding).
    pub fn tokenize(&self, queries: &[&str]) -> Result<Tensor> {
        let max_len = self.model.config().text_config.max_position_embeddings;
        let mut rows = Vec::with_capacity(queries.len());
        for (i, q) in queries.iter().enumerate() {
            let ids = self
                .tokenizer
                .encode(q)
                .map_err(|e| candle_core::Error::Msg(format!("Segmenter: query {i} {q:?}: {e}")))?;
            if ids.len() > max_len {
                bail!(
                    "Segmenter: query {i} {q:?} is {} tokens long; the text tower takes at most {max_len}",
                    ids.len()
                )
            }
            rows.push(ids);
        }
        let s = rows.iter().map(Vec::len).max().unwrap_or(0);
        let eos = self.tokenizer.eos_id();
        let flat: Vec<u32> = rows
            .into_iter()
            .flat_map(|mut r| {
                r.resize(s, eos);
                r
            })
            .collect();
        Tensor::from_vec(
            flat,
            (queries.len(), s),
            self.model.text_model.token_embedding.device(),
        )
    }

    /// `images` `[b, 3, h, w]` in `[0, 1]` (any float dtype; computed in the model's dtype, which
    /// the outputs have), `queries` one per image.
    pub fn segment(&self, images: &Tensor, queries: &[&str]) -> Result<Segmentation> {
        let (b, _, h, w) = images.dims4().map_err(|_| {
            candle_core::Error::Msg(format!(
                "Segmenter: images must be [batch, 3, height, width], got {:?}",
                images.dims()
            ))
        })?;
        if queries.len() != b {
            bail!(
                "Segmenter: {} queries for {b} images (one query per image)",
                queries.len()
            )
        }
        let ids = self.tokenize(queries)?;
        let cond = self.model.conditional_embeddings(&ids)?;
        let pixel_values = self.processor.preprocess(images)?.to_dtype(cond.dtype())?;
        let logits = self.model.forward(&pixel_values, &cond)?;
        let probs = candle_nn::ops::sigmoid(&logits)?.unsqueeze(1)?;
        let probabilities = ops::resize_bilinear(&probs, (h, w), false)?.squeeze(1)?;
        Ok(Segmentation {
            logits,
            probabilities,
        })
    }
}
