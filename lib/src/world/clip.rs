//! The world's CLIP (ShapesWorld II, issue 13 item 1): transformers' `CLIPTextModel`
//! ([`crate::models::clip_text`], with the real CLIP BPE tokenizer and its 49408-token
//! vocabulary) and `CLIPVisionModelWithProjection` ([`crate::models::clip_vision`]), each with
//! its projection, trained contrastively on the world's (image, caption) pairs with
//! [`super::train`], and written as the `tokenizer/`, `text_encoder/` and `image_encoder/`
//! folders of a diffusers model folder.
//!
//! **Data.** Balanced images from `train_start` on, skipping every image whose (shape, colour,
//! background) combination is held out ([`super::heldout`]): the UNet is judged on captions of
//! those combinations, so neither tower may see them. Image `i` in epoch `e` is paired with the
//! caption of one of the spec's templates, picked by a hash of (seed, `i`, `e`), so every image
//! is seen with several captions over the run (a resumed run picks what an uninterrupted one
//! did). Pixels in `[0, 1]` are normalized with OpenAI CLIP's mean and standard deviation (as
//! `CLIPImageProcessor`, written to `feature_extractor/`).
//!
//! **Loss.** CLIP's symmetric cross-entropy over the batch's image-text cosine similarities
//! times `exp(logit_scale)` (Radford et al. 2021: `logit_scale` learnable, initialized to
//! `ln(1/0.07)`, clamped at `ln 100`), with one change: a world caption often describes several
//! images of a batch ("a circle", "snow"), so every pair where the text is a caption of the
//! image (the caption one of the spec's templates gives for that image's scene) is a positive,
//! and each row's target is uniform over its positives (UniCL, Yang et al. 2022). With distinct
//! captions this is CLIP's loss exactly.
//!
//! **Text length.** The text tower's `max_position_embeddings` may be shorter than CLIP's 77
//! (the world's captions are short); the tokenizer folder's `model_max_length` says the same, and
//! the explainer pads prompts to `max_position_embeddings`. A batch is padded to its longest
//! caption only: with the causal mask the pooled end-of-text state does not depend on what
//! follows it, so this is the same function as padding to the full length.
//!
//! **Untrained tokens.** Only the ids of the training captions get gradients; the others keep
//! their initialization (N(0, 0.02) as transformers'). Their ids are saved in
//! `text_encoder/trained_tokens.json` ([`crate::models::clip_text::TRAINED_TOKENS_FILE`]), and
//! nearest-token explanations search only them.
//!
//! Initialization is transformers' `CLIPPreTrainedModel._init_weights` (factor 1), drawn from
//! [`SeededRng`] over sorted parameter names.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

pub use super::clip_eval::{measure, scores_line, AttributeScores, ClipScores};
use super::heldout;
use super::render;
use super::spec::WorldSpec;
use super::splits::{sample, Sample, Split};
use super::train::{self, Checkpointing, TrainConfig, TrainReport};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel, TRAINED_TOKENS_FILE};
use crate::models::clip_vision::{ClipVisionConfig, ClipVisionModelWithProjection};
use crate::ops::{linear_no_bias, Linear};
use crate::rng::SeededRng;
use crate::tokenizer::ClipTokenizer;

/// OpenAI CLIP's pixel mean and standard deviation (transformers' `OPENAI_CLIP_MEAN`/`_STD`).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// The towers' architecture and the training (recorded in `report.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClipTrainConfig {
    /// Seed of the initial weights, the batch order and the caption templates.
    pub seed: u64,
    /// Balanced images to train on (from `train_start`, held-out combinations skipped).
    pub train_images: usize,
    /// Held-out balanced images to measure on (indices `0..eval_images`).
    pub eval_images: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Text tower (`CLIPTextConfig`).
    pub text_hidden_size: usize,
    pub text_intermediate_size: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    /// The longest prompt in tokens, start and end included (CLIP: 77).
    pub max_position_embeddings: usize,
    /// Vision tower (`CLIPVisionConfig`).
    pub vision_hidden_size: usize,
    pub vision_intermediate_size: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub patch_size: usize,
    /// Width of both projections (the joint embedding).
    pub projection_dim: usize,
    /// Write a resumable checkpoint every this many steps (and at the end).
    pub checkpoint_every: usize,
    /// Every this many steps, write the model folders from the current weights (a usable
    /// snapshot) and measure the zero-shot scores on the first `curve_images` held-out images
    /// (0: only at the end).
    pub eval_every: usize,
    pub curve_images: usize,
}

impl Default for ClipTrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            train_images: 16000,
            eval_images: 600,
            // Run `clip-b` (docs/shapesworld-ii.md): batches of 128 at lr 2e-3 for 8 epochs
            // learned colour and background only; more, smaller steps broke out.
            epochs: 10,
            batch_size: 64,
            lr: 1e-3,
            weight_decay: 0.01,
            text_hidden_size: 64,
            text_intermediate_size: 256,
            text_layers: 3,
            text_heads: 4,
            max_position_embeddings: 32,
            vision_hidden_size: 64,
            vision_intermediate_size: 256,
            vision_layers: 3,
            vision_heads: 4,
            patch_size: 4,
            projection_dim: 64,
            checkpoint_every: 100,
            eval_every: 0,
            curve_images: 300,
        }
    }
}

impl ClipTrainConfig {
    /// First balanced index trained on (past the held-out images and the spec's balanced split).
    pub fn train_start(&self, spec: &WorldSpec) -> usize {
        self.eval_images.max(spec.splits.balanced)
    }

    /// Refuses configs that cannot train, naming the field.
    pub fn check(&self, spec: &WorldSpec) -> anyhow::Result<()> {
        let positive = [
            ("train_images", self.train_images),
            ("eval_images", self.eval_images),
            ("epochs", self.epochs),
            ("batch_size", self.batch_size),
            ("text_hidden_size", self.text_hidden_size),
            ("text_intermediate_size", self.text_intermediate_size),
            ("text_layers", self.text_layers),
            ("text_heads", self.text_heads),
            ("vision_hidden_size", self.vision_hidden_size),
            ("vision_intermediate_size", self.vision_intermediate_size),
            ("vision_layers", self.vision_layers),
            ("vision_heads", self.vision_heads),
            ("patch_size", self.patch_size),
            ("projection_dim", self.projection_dim),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            anyhow::bail!("clip config: {name} = 0: must be positive")
        }
        for (hidden, heads, tower) in [
            (self.text_hidden_size, self.text_heads, "text"),
            (self.vision_hidden_size, self.vision_heads, "vision"),
        ] {
            if !hidden.is_multiple_of(heads) {
                anyhow::bail!(
                    "clip config: {tower}_hidden_size = {hidden} is not a multiple of \
                     {tower}_heads = {heads}"
                )
            }
        }
        if !spec.image_size.is_multiple_of(self.patch_size) {
            anyhow::bail!(
                "clip config: patch_size = {}: must divide the world's image side {}",
                self.patch_size,
                spec.image_size
            )
        }
        if self.batch_size < 2 {
            anyhow::bail!(
                "clip config: batch_size = {}: a contrastive loss needs at least 2 pairs",
                self.batch_size
            )
        }
        if self.max_position_embeddings < 3 {
            anyhow::bail!(
                "clip config: max_position_embeddings = {}: needs room for start, a token and end",
                self.max_position_embeddings
            )
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            anyhow::bail!("clip config: lr = {}: must be a positive number", self.lr)
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            anyhow::bail!(
                "clip config: weight_decay = {}: must be >= 0",
                self.weight_decay
            )
        }
        Ok(())
    }

    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            weight_decay: self.weight_decay,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
        }
    }

    /// transformers' `text_encoder/config.json` (`CLIPTextModelWithProjection`: the weights
    /// hold `text_projection`; `CLIPTextModel` loads them too, without it).
    pub fn text_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["CLIPTextModelWithProjection"],
            "model_type": "clip_text_model",
            "vocab_size": 49408,
            "hidden_size": self.text_hidden_size,
            "intermediate_size": self.text_intermediate_size,
            "projection_dim": self.projection_dim,
            "num_hidden_layers": self.text_layers,
            "num_attention_heads": self.text_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 1.0,
            "pad_token_id": 1,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "torch_dtype": "float16",
            "transformers_version": "4.46.0",
        })
    }

    /// transformers' `image_encoder/config.json` (`CLIPVisionModelWithProjection`).
    pub fn vision_json(&self, image_size: usize) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["CLIPVisionModelWithProjection"],
            "model_type": "clip_vision_model",
            "hidden_size": self.vision_hidden_size,
            "intermediate_size": self.vision_intermediate_size,
            "projection_dim": self.projection_dim,
            "num_hidden_layers": self.vision_layers,
            "num_attention_heads": self.vision_heads,
            "num_channels": 3,
            "image_size": image_size,
            "patch_size": self.patch_size,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 1.0,
            "torch_dtype": "float16",
            "transformers_version": "4.46.0",
        })
    }

    pub fn text_config(&self) -> anyhow::Result<ClipTextConfig> {
        Ok(ClipTextConfig::from_value(self.text_json())?)
    }

    pub fn vision_config(&self, image_size: usize) -> anyhow::Result<ClipVisionConfig> {
        Ok(ClipVisionConfig::from_value(self.vision_json(image_size))?)
    }
}

/// Both towers with trainable parameters, named as transformers' `CLIPModel` names them
/// (`text_model.*`, `text_projection.weight`, `vision_model.*`, `visual_projection.weight`,
/// `logit_scale`).
pub struct TrainableClip {
    pub varmap: VarMap,
    pub text: ClipTextModel,
    pub text_projection: Linear,
    pub vision: ClipVisionModelWithProjection,
    pub logit_scale: Tensor,
}

/// `ln(1 / 0.07)`, CLIP's initial logit scale.
pub fn initial_logit_scale() -> f64 {
    (1.0f64 / 0.07).ln()
}

impl TrainableClip {
    /// Fresh weights from `seed` (transformers' CLIP initialization; see the module docs).
    pub fn new(config: &ClipTrainConfig, image_size: usize, seed: u64) -> anyhow::Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let text_cfg = config.text_config()?;
        let text = ClipTextModel::new(vb.pp("text_model"), &text_cfg)?;
        let text_projection = linear_no_bias(
            config.text_hidden_size,
            config.projection_dim,
            vb.pp("text_projection"),
        )?;
        let vision =
            ClipVisionModelWithProjection::new(vb.clone(), &config.vision_config(image_size)?)?;
        let logit_scale = vb.get((), "logit_scale")?;
        let model = Self {
            varmap,
            text,
            text_projection,
            vision,
            logit_scale,
        };
        model.initialize(config, seed)?;
        Ok(model)
    }

    fn initialize(&self, config: &ClipTrainConfig, seed: u64) -> anyhow::Result<()> {
        let mut rng = SeededRng::new(seed);
        for (name, var) in self.vars()? {
            let tower_layers = |text: bool| {
                if text {
                    config.text_layers
                } else {
                    config.vision_layers
                }
            };
            let text = name.starts_with("text");
            let d = if text {
                config.text_hidden_size
            } else {
                config.vision_hidden_size
            } as f64;
            let l = tower_layers(text) as f64;
            let in_proj_std = d.powf(-0.5) * (2.0 * l).powf(-0.5);
            let std = if name == "logit_scale" {
                var.set(&Tensor::new(initial_logit_scale() as f32, &Device::Cpu)?)?;
                continue;
            } else if name.ends_with(".bias") {
                Some(0.0)
            } else if ["layer_norm", "layernorm", "layrnorm"]
                .iter()
                .any(|n| name.contains(n))
            {
                None // weight 1
            } else if name.ends_with("class_embedding") {
                Some(d.powf(-0.5))
            } else if name.ends_with("token_embedding.weight")
                || name.ends_with("position_embedding.weight")
                || name.ends_with("patch_embedding.weight")
            {
                Some(0.02)
            } else if name.contains("q_proj") || name.contains("k_proj") || name.contains("v_proj")
            {
                Some(in_proj_std)
            } else if name.contains("out_proj") {
                Some(d.powf(-0.5))
            } else if name.contains("fc1") {
                Some((2.0 * d).powf(-0.5))
            } else if name.contains("fc2") {
                Some(in_proj_std)
            } else if name == "text_projection.weight" || name == "visual_projection.weight" {
                Some(d.powf(-0.5))
            } else {
                anyhow::bail!("clip: no initialization rule for parameter `{name}`")
            };
            let dims = var.dims().to_vec();
            let n: usize = dims.iter().product();
            let values = match std {
                None => vec![1f32; n],
                Some(0.0) => vec![0f32; n],
                Some(s) => rng
                    .normal_vec(n)
                    .into_iter()
                    .map(|v| v * s as f32)
                    .collect(),
            };
            var.set(&Tensor::from_vec(values, dims, &Device::Cpu)?)?;
        }
        Ok(())
    }

    /// Every parameter by its transformers `CLIPModel` name, sorted.
    pub fn vars(&self) -> anyhow::Result<Vec<(String, Var)>> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned variable map"))?;
        let mut named: Vec<(String, Var)> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(named)
    }

    /// Every tensor by name (copies).
    pub fn tensors(&self) -> anyhow::Result<HashMap<String, Tensor>> {
        Ok(self
            .vars()?
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().copy().expect("a CPU copy")))
            .collect())
    }

    /// CLIP's text embeddings `[b, projection_dim]` of padded ids `[b, s]`.
    pub fn text_embeds(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        text_embeds(&self.text, &self.text_projection, ids)
    }

    /// CLIP's image embeddings `[b, projection_dim]` of images `[b, 3, s, s]` in `[0, 1]`.
    pub fn image_embeds(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        self.vision.forward(&normalize_pixels(images)?)
    }

    /// `exp(min(logit_scale, ln 100))`, a scalar tensor.
    pub fn scale(&self) -> candle_core::Result<Tensor> {
        crate::ops::clamp(&self.logit_scale, 0.0, 100f64.ln())?.exp()
    }
}

/// The pooled end-of-text state through the projection, `[b, projection_dim]`.
pub fn text_embeds(
    text: &ClipTextModel,
    projection: &Linear,
    ids: &Tensor,
) -> candle_core::Result<Tensor> {
    projection.forward(&text.forward(ids)?.pooled)
}

/// `[0, 1]` pixels to CLIP's normalized pixel values.
pub fn normalize_pixels(images: &Tensor) -> candle_core::Result<Tensor> {
    let dev = images.device();
    let mean = Tensor::new(&CLIP_MEAN, dev)?.reshape((1, 3, 1, 1))?;
    let std = Tensor::new(&CLIP_STD, dev)?.reshape((1, 3, 1, 1))?;
    images.broadcast_sub(&mean)?.broadcast_div(&std)
}

/// Rows scaled to unit length.
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(1)?.sqrt()?)
}

/// The contrastive loss (see the module docs) of image embeddings `[b, p]`, text embeddings
/// `[b, p]` and `positive[i][j]` (text `j` is a caption of image `i`; the diagonal must hold):
/// the mean of the image-to-text and text-to-image cross-entropies, each row's target uniform
/// over its positives.
pub fn contrastive_loss(
    image: &Tensor,
    text: &Tensor,
    scale: &Tensor,
    positive: &[Vec<bool>],
) -> candle_core::Result<Tensor> {
    let b = image.dim(0)?;
    if positive.len() != b || positive.iter().any(|r| r.len() != b) {
        candle_core::bail!("contrastive loss: the positives must be {b} x {b}")
    }
    if (0..b).any(|i| !positive[i][i]) {
        candle_core::bail!("contrastive loss: every image must be a positive of its own caption")
    }
    let logits = l2_normalize(image)?
        .matmul(&l2_normalize(text)?.t()?)?
        .broadcast_mul(scale)?;
    // Row-normalized targets for images -> texts, and for texts -> images.
    let targets = |by_row: bool| -> candle_core::Result<Tensor> {
        let mut t = vec![0f32; b * b];
        for r in 0..b {
            let n = (0..b)
                .filter(|&c| {
                    if by_row {
                        positive[r][c]
                    } else {
                        positive[c][r]
                    }
                })
                .count() as f32;
            for c in 0..b {
                let p = if by_row {
                    positive[r][c]
                } else {
                    positive[c][r]
                };
                if p {
                    t[r * b + c] = 1.0 / n;
                }
            }
        }
        Tensor::from_vec(t, (b, b), image.device())
    };
    let ce = |logits: &Tensor, t: Tensor| -> candle_core::Result<Tensor> {
        let log_p = crate::ops::log_softmax_last_dim(logits)?;
        (log_p * t)?.sum_all()?.affine(-1.0 / b as f64, 0.0)
    };
    let i2t = ce(&logits, targets(true)?)?;
    let t2i = ce(&logits.t()?.contiguous()?, targets(false)?)?;
    (i2t + t2i)?.affine(0.5, 0.0)
}

/// The training pairs: images `[n, 3, s, s]` in `[0, 1]` and their samples, balanced indices from
/// `train_start` on with held-out combinations skipped.
pub struct TrainingData {
    pub images: Tensor,
    pub samples: Vec<Sample>,
}

/// Renders the first `config.train_images` balanced images from `train_start` whose
/// combination is not held out.
pub fn training_data(spec: &WorldSpec, config: &ClipTrainConfig) -> anyhow::Result<TrainingData> {
    let mut samples = Vec::with_capacity(config.train_images);
    let mut i = config.train_start(spec);
    while samples.len() < config.train_images {
        let s = sample(spec, Split::Balanced, i);
        if !heldout::scene_is_heldout(spec, &s.scene) {
            samples.push(s);
        }
        i += 1;
    }
    let images = render_samples(spec, &samples)?;
    Ok(TrainingData { images, samples })
}

/// Renders samples on two threads, `[n, 3, s, s]` in `[0, 1]`.
pub fn render_samples(spec: &WorldSpec, samples: &[Sample]) -> anyhow::Result<Tensor> {
    let half = samples.len().div_ceil(2).max(1);
    let rendered: Vec<render::Rendered> = std::thread::scope(|s| {
        let parts: Vec<_> = samples
            .chunks(half)
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|x| render::render(&x.scene, spec.image_size))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().expect("a rendering thread"))
            .collect()
    });
    Ok(super::splits::images_tensor(&rendered)?)
}

/// The caption image `sample` gets in `epoch`: one of the spec's templates, picked by a hash of
/// (seed, the image's balanced index, epoch).
pub fn caption_for(spec: &WorldSpec, seed: u64, sample: &Sample, epoch: usize) -> String {
    let templates = &spec.captions.templates;
    let mut h = SeededRng::new(
        seed ^ (sample.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (epoch as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03),
    );
    let t = (h.next_u64() % templates.len() as u64) as usize;
    render::caption(&templates[t], &sample.scene)
}

/// Every caption the spec's templates give for the scene (the texts that are positives of it).
pub fn captions_of(spec: &WorldSpec, scene: &render::Scene) -> HashSet<String> {
    spec.captions
        .templates
        .iter()
        .map(|t| render::caption(t, scene))
        .collect()
}

/// Token ids padded with the tokenizer's pad id to the longest row, `[b, s]`; an error naming a
/// caption longer than `max_len`.
pub fn tokenize_batch(
    tokenizer: &ClipTokenizer,
    captions: &[String],
    max_len: usize,
) -> anyhow::Result<Tensor> {
    let rows = captions
        .iter()
        .map(|c| {
            let ids = tokenizer.encode(c)?;
            if ids.len() > max_len {
                anyhow::bail!(
                    "caption {c:?} is {} tokens, more than max_position_embeddings = {max_len}",
                    ids.len()
                )
            }
            Ok(ids)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let s = rows.iter().map(|r| r.len()).max().unwrap_or(2);
    let mut flat = Vec::with_capacity(rows.len() * s);
    for mut r in rows {
        r.resize(s, tokenizer.pad_id());
        flat.extend(r);
    }
    Ok(Tensor::from_vec(flat, (captions.len(), s), &Device::Cpu)?)
}

/// Every distinct caption the spec's templates give over every combination of shape, colour,
/// texture and background (sizes do not appear in captions), with the scene's values.
pub(crate) fn all_captions(spec: &WorldSpec) -> Vec<(String, render::Scene, usize)> {
    let mut out = Vec::new();
    let colors = spec.values("color").expect("a known attribute");
    let textures = spec.values("texture").expect("a known attribute");
    let backgrounds = spec.values("background").expect("a known attribute");
    for shape in &spec.classes {
        for color in colors {
            for texture in textures {
                for background in backgrounds {
                    let scene = render::Scene {
                        shape: shape.clone(),
                        color: color.clone(),
                        texture: texture.clone(),
                        background: background.clone(),
                        size: String::new(),
                        center: [0.0, 0.0],
                        radius: 0.0,
                        rotation: 0.0,
                        background_seed: 0,
                    };
                    for (t, template) in spec.captions.templates.iter().enumerate() {
                        out.push((render::caption(template, &scene), scene.clone(), t));
                    }
                }
            }
        }
    }
    out
}

/// Refuses a spec whose longest caption does not fit `max_position_embeddings`; else the
/// longest caption's length in tokens (start and end included).
pub fn check_caption_lengths(
    spec: &WorldSpec,
    tokenizer: &ClipTokenizer,
    config: &ClipTrainConfig,
) -> anyhow::Result<usize> {
    let mut longest = (0, String::new());
    for (caption, _, _) in all_captions(spec) {
        let n = tokenizer.encode(&caption)?.len();
        if n > longest.0 {
            longest = (n, caption);
        }
    }
    if longest.0 > config.max_position_embeddings {
        anyhow::bail!(
            "clip config: max_position_embeddings = {}: the world's caption {:?} needs {} \
             tokens (start and end included)",
            config.max_position_embeddings,
            longest.1,
            longest.0
        )
    }
    Ok(longest.0)
}

/// The sorted token ids of `captions` (start and end included).
pub fn token_ids_of<'a>(
    tokenizer: &ClipTokenizer,
    captions: impl IntoIterator<Item = &'a String>,
) -> anyhow::Result<Vec<u32>> {
    let mut ids = BTreeSet::new();
    for c in captions {
        ids.extend(tokenizer.encode(c)?);
    }
    Ok(ids.into_iter().collect())
}

/// Trains `model` on `data`. `resumed_at` is the step the checkpoint resumes from (so the
/// epoch of each caption is known); `observe(indices, captions)` sees every batch (the balanced
/// indices and captions), before its step. Every `every` steps `on_eval(step)` runs (snapshots).
#[allow(clippy::too_many_arguments)]
pub fn train_on(
    model: &TrainableClip,
    spec: &WorldSpec,
    data: &TrainingData,
    config: &ClipTrainConfig,
    checkpoint: Option<&Checkpointing>,
    progress: bool,
    resumed_at: usize,
    every: usize,
    mut on_eval: impl FnMut(usize, &TrainableClip) -> anyhow::Result<()>,
    mut observe: impl FnMut(&[usize], &[String]),
) -> anyhow::Result<TrainReport> {
    let tokenizer = ClipTokenizer::embedded()?;
    let per_epoch = config.train_config().steps_per_epoch(data.samples.len());
    let admits: Vec<HashSet<String>> = data
        .samples
        .iter()
        .map(|s| captions_of(spec, &s.scene))
        .collect();
    let mut step = resumed_at;
    train::train(
        model.vars()?,
        Vec::new(),
        data.samples.len(),
        &config.train_config(),
        checkpoint,
        "clip",
        progress,
        |indices| {
            if every > 0 && step > resumed_at && step.is_multiple_of(every) {
                on_eval(step, model)
                    .map_err(|e| candle_core::Error::Msg(format!("at step {step}: {e:#}")))?;
            }
            let epoch = step / per_epoch;
            step += 1;
            let captions: Vec<String> = indices
                .iter()
                .map(|&i| caption_for(spec, config.seed, &data.samples[i], epoch))
                .collect();
            let balanced: Vec<usize> = indices.iter().map(|&i| data.samples[i].index).collect();
            observe(&balanced, &captions);
            let positive: Vec<Vec<bool>> = indices
                .iter()
                .map(|&i| captions.iter().map(|c| admits[i].contains(c)).collect())
                .collect();
            let ids = tokenize_batch(&tokenizer, &captions, config.max_position_embeddings)
                .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
            let idx = Tensor::new(
                indices.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                &Device::Cpu,
            )?;
            let images = data.images.index_select(&idx, 0)?;
            let image = model.image_embeds(&images)?;
            let text = model.text_embeds(&ids)?;
            contrastive_loss(&image, &text, &model.scale()?, &positive)
        },
    )
}

/// What `world train-clip` writes to `clip/report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClipRecord {
    pub spec_fingerprint: String,
    pub config: ClipTrainConfig,
    pub text_parameters: usize,
    pub vision_parameters: usize,
    /// The learned `exp(logit_scale)` (CLIPModel's `logit_scale`, not saved with either tower).
    pub logit_scale: f64,
    pub threads: usize,
    pub epoch_losses: Vec<f32>,
    pub seconds: f64,
    /// Distinct captions trained on, and their token ids (also `text_encoder/trained_tokens.json`).
    pub trained_captions: usize,
    pub trained_tokens: usize,
    /// The world's longest caption in tokens, start and end included.
    pub longest_caption_tokens: usize,
    /// Zero-shot measurements along training and at the end (of the saved f16 weights).
    pub curve: Vec<ClipScores>,
    pub final_scores: ClipScores,
}

/// The folders `train_and_save` writes under `out`.
pub fn diffusion_dir(out: &Path) -> PathBuf {
    out.join("diffusion")
}

/// `out/clip/`: `report.json` and, while training, `checkpoint/`.
pub fn record_dir(out: &Path) -> PathBuf {
    out.join("clip")
}

/// The step a checkpoint in `dir` was saved at (0 when there is none).
fn checkpoint_step(dir: &Path) -> usize {
    std::fs::read(dir.join("checkpoint.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
        .unwrap_or(0) as usize
}

/// The distinct captions a training run pairs its images with (every epoch's).
pub fn trained_captions(
    spec: &WorldSpec,
    config: &ClipTrainConfig,
    data: &TrainingData,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for epoch in 0..config.epochs {
        for s in &data.samples {
            out.insert(caption_for(spec, config.seed, s, epoch));
        }
    }
    out
}

/// Writes `diffusion/tokenizer/`, `diffusion/text_encoder/` (with `trained_tokens.json`),
/// `diffusion/image_encoder/` and `diffusion/feature_extractor/` under `out` from `model`,
/// weights in f16.
pub fn save_folders(
    out: &Path,
    spec: &WorldSpec,
    config: &ClipTrainConfig,
    model: &TrainableClip,
    trained_tokens: &[u32],
) -> anyhow::Result<()> {
    let dir = diffusion_dir(out);
    let tokenizer = ClipTokenizer::embedded()?;
    let tok_dir = dir.join("tokenizer");
    tokenizer.save_pretrained(&tok_dir)?;
    crate::io::write_bytes_atomically(
        &tok_dir.join("tokenizer_config.json"),
        &serde_json::to_vec_pretty(&serde_json::json!({
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": config.max_position_embeddings,
            "do_lower_case": true,
            "bos_token": crate::tokenizer::BOS_TOKEN,
            "eos_token": crate::tokenizer::EOS_TOKEN,
            "pad_token": tokenizer.token(tokenizer.pad_id()).unwrap_or_default(),
            "unk_token": crate::tokenizer::EOS_TOKEN,
        }))?,
    )?;
    let tensors = model.tensors()?;
    let pick = |keep: &dyn Fn(&str) -> bool| -> anyhow::Result<HashMap<String, Tensor>> {
        tensors
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F16)?)))
            .collect()
    };
    let text = pick(&|k| k.starts_with("text_"))?;
    let vision = pick(&|k| k.starts_with("vision_model.") || k.starts_with("visual_"))?;
    for (sub, json, weights) in [
        ("text_encoder", config.text_json(), &text),
        (
            "image_encoder",
            config.vision_json(spec.image_size),
            &vision,
        ),
    ] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        crate::io::write_atomically(&d.join("model.safetensors"), |tmp| {
            candle_core::safetensors::save(weights, tmp).map_err(Into::into)
        })?;
        crate::io::write_bytes_atomically(
            &d.join("config.json"),
            &serde_json::to_vec_pretty(&json)?,
        )?;
    }
    let tokens: Vec<String> = trained_tokens
        .iter()
        .map(|&id| tokenizer.token(id).unwrap_or_default())
        .collect();
    crate::io::write_bytes_atomically(
        &dir.join("text_encoder").join(TRAINED_TOKENS_FILE),
        &serde_json::to_vec_pretty(&serde_json::json!({
            "description": "The token ids of every caption this text encoder was trained on \
                            (start and end of text included); the other ids' embeddings are \
                            untrained. Nearest-token explanations search only these.",
            "token_ids": trained_tokens,
            "tokens": tokens,
        }))?,
    )?;
    let fe = dir.join("feature_extractor");
    std::fs::create_dir_all(&fe)?;
    let s = spec.image_size;
    crate::io::write_bytes_atomically(
        &fe.join("preprocessor_config.json"),
        &serde_json::to_vec_pretty(&serde_json::json!({
            "image_processor_type": "CLIPImageProcessor",
            "crop_size": {"height": s, "width": s},
            "size": {"shortest_edge": s},
            "do_center_crop": true,
            "do_convert_rgb": true,
            "do_normalize": true,
            "do_rescale": true,
            "do_resize": true,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "resample": 3,
            "rescale_factor": 1.0 / 255.0,
        }))?,
    )?;
    Ok(())
}

/// The towers of a written folder (`dir/diffusion/` or a diffusers folder), through the
/// project's loaders, in f32: the text model (with its trained tokens), its projection, the
/// vision tower.
pub fn load_towers(
    dir: &Path,
) -> anyhow::Result<(ClipTextModel, Linear, ClipVisionModelWithProjection)> {
    let text = ClipTextModel::from_pretrained(dir, None, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading the text encoder of {}", dir.display()))?;
    let weights = crate::pretrained::open_weights(dir, &crate::pretrained::TEXT_ENCODER, None)?
        .into_var_builder(DType::F32, &Device::Cpu);
    let projection = linear_no_bias(
        text.config().hidden_size,
        text.config().projection_dim.with_context(|| {
            format!(
                "{}: text_encoder/config.json has no projection_dim (not a \
                 CLIPTextModelWithProjection)",
                dir.display()
            )
        })?,
        weights.pp("text_projection"),
    )
    .with_context(|| format!("{}: text_encoder has no text_projection", dir.display()))?;
    let vision =
        ClipVisionModelWithProjection::from_pretrained(dir, None, DType::F32, &Device::Cpu)
            .with_context(|| format!("loading the image encoder of {}", dir.display()))?;
    Ok((text, projection, vision))
}

/// Trains CLIP for `spec` and writes `out/diffusion/{tokenizer, text_encoder, image_encoder,
/// feature_extractor}/` and `out/clip/report.json`. The checkpoint lives in `out/clip/checkpoint/`
/// while training (a rerun with the same config resumes) and is removed at the end. Every
/// `config.eval_every` steps (0: never) the folders are written from the current weights
/// (usable snapshots) and the zero-shot scores measured on the first `config.curve_images`
/// held-out images.
pub fn train_and_save(
    spec: &WorldSpec,
    config: &ClipTrainConfig,
    out: &Path,
    progress: bool,
) -> anyhow::Result<ClipRecord> {
    let (eval_every, curve_images) = (config.eval_every, config.curve_images);
    config.check(spec)?;
    heldout::heldout_combinations(spec)?;
    let tokenizer = ClipTokenizer::embedded()?;
    let longest_caption_tokens = check_caption_lengths(spec, &tokenizer, config)?;
    let rec_dir = record_dir(out);
    std::fs::create_dir_all(&rec_dir).with_context(|| format!("creating {}", rec_dir.display()))?;
    let eval_samples: Vec<Sample> = (0..config.eval_images)
        .map(|i| sample(spec, Split::Balanced, i))
        .collect();
    let eval_images = render_samples(spec, &eval_samples)?;
    let data = training_data(spec, config)?;
    let captions = trained_captions(spec, config, &data);
    let trained_tokens = token_ids_of(&tokenizer, &captions)?;
    let model = TrainableClip::new(config, spec.image_size, config.seed)?;
    let ckpt_dir = train::checkpoint_dir(&rec_dir);
    let resumed_at = checkpoint_step(&ckpt_dir);
    let checkpoint = Checkpointing { dir: ckpt_dir };
    let curve_n = curve_images.min(config.eval_images);
    let curve_images_t = eval_images.narrow(0, 0, curve_n)?;
    let mut curve = Vec::new();
    let report = train_on(
        &model,
        spec,
        &data,
        config,
        Some(&checkpoint),
        progress,
        resumed_at,
        eval_every,
        |step, m| {
            save_folders(out, spec, config, m, &trained_tokens)?;
            let scores = measure(
                spec,
                &tokenizer,
                &m.text,
                &m.text_projection,
                &m.vision,
                &curve_images_t,
                &eval_samples[..curve_n],
                step,
            )?;
            if progress {
                eprintln!("{}", scores_line(&scores));
            }
            curve.push(scores);
            Ok(())
        },
        |_, _| {},
    )?;
    save_folders(out, spec, config, &model, &trained_tokens)?;
    // The final scores are those of the saved (f16) weights, loaded back through the loaders.
    let (text, projection, vision) = load_towers(&diffusion_dir(out))?;
    let final_scores = measure(
        spec,
        &tokenizer,
        &text,
        &projection,
        &vision,
        &eval_images,
        &eval_samples,
        report.total_steps,
    )?;
    let count = |prefix: &[&str]| -> anyhow::Result<usize> {
        Ok(model
            .vars()?
            .iter()
            .filter(|(n, _)| prefix.iter().any(|p| n.starts_with(p)))
            .map(|(_, v)| v.elem_count())
            .sum())
    };
    let record = ClipRecord {
        spec_fingerprint: spec.fingerprint(),
        config: config.clone(),
        text_parameters: count(&["text_"])?,
        vision_parameters: count(&["vision_model.", "visual_"])?,
        logit_scale: model.scale()?.to_scalar::<f32>()? as f64,
        threads: candle_core::utils::get_num_threads(),
        epoch_losses: report.epoch_losses,
        seconds: report.seconds,
        trained_captions: captions.len(),
        trained_tokens: trained_tokens.len(),
        longest_caption_tokens,
        curve,
        final_scores,
    };
    crate::io::write_bytes_atomically(
        &rec_dir.join("report.json"),
        &serde_json::to_vec_pretty(&record)?,
    )?;
    let _ = std::fs::remove_dir_all(train::checkpoint_dir(&rec_dir));
    Ok(record)
}
