//! The UNet's training data, encoded once by the frozen models: the autoencoder's scaled
//! latents of balanced world images (their combinations not held out), and the frozen text
//! encoder's last hidden state of each distinct caption.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use super::super::heldout;
use super::super::render;
use super::super::splits::{sample, Sample, Split};
use super::super::WorldSpec;
use crate::models::clip_text::ClipTextModel;
use crate::models::vae::AutoencoderKL;
use crate::tokenizer::ClipTokenizer;

/// The frozen conditioning: the tokenizer and text encoder of a diffusers folder.
pub struct TextConditioning {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
}

impl TextConditioning {
    /// Loads `dir/tokenizer/` and `dir/text_encoder/`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let tokenizer = ClipTokenizer::from_pretrained_dir(dir.join("tokenizer"))
            .with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
        let text_encoder = ClipTextModel::from_pretrained(dir, None, DType::F32, &Device::Cpu)
            .with_context(|| format!("loading the text encoder of {}", dir.display()))?;
        Ok(Self {
            tokenizer,
            text_encoder,
        })
    }

    /// The width of the hidden states (the UNet's `cross_attention_dim`).
    pub fn width(&self) -> usize {
        self.text_encoder.config().hidden_size
    }

    /// The last hidden states `[n, max_position_embeddings, width]` of `captions`, each padded
    /// to the encoder's length as the pipeline pads prompts (detached).
    pub fn encode(&self, captions: &[String]) -> anyhow::Result<Tensor> {
        let len = self.text_encoder.config().max_position_embeddings;
        let mut out = Vec::new();
        for chunk in captions.chunks(64) {
            let mut ids = Vec::with_capacity(chunk.len() * len);
            for c in chunk {
                ids.extend(
                    self.tokenizer
                        .encode_padded(c, len)
                        .with_context(|| format!("tokenizing {c:?}"))?,
                );
            }
            let ids = Tensor::from_vec(ids, (chunk.len(), len), &Device::Cpu)?;
            out.push(self.text_encoder.forward(&ids)?.last_hidden_state.detach());
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}

/// A diffusers folder holding `component/` (`vae`, `text_encoder`): `dir` itself or
/// `dir/diffusion/` (a `world train` output).
pub fn component_root(dir: &Path, component: &str) -> anyhow::Result<PathBuf> {
    for root in [dir.to_path_buf(), dir.join("diffusion")] {
        if root.join(component).join("config.json").is_file() {
            return Ok(root);
        }
    }
    anyhow::bail!(
        "{}: no {component}/config.json in it or in its diffusion/ folder",
        dir.display()
    )
}

/// Loads a trained autoencoder (with its encoder) from a folder holding `vae/`.
pub fn load_vae(dir: &Path) -> anyhow::Result<AutoencoderKL> {
    let vae = AutoencoderKL::from_pretrained(dir, None, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading the autoencoder of {}", dir.display()))?;
    if vae.encoder.is_none() {
        anyhow::bail!(
            "{}: the autoencoder has no encoder weights",
            dir.join("vae").display()
        )
    }
    Ok(vae)
}

/// The training set: latents, and for each one the index of its caption's hidden state.
pub struct TrainingSet {
    /// Scaled latents `[n, c, h, w]` (`posterior mean × scaling_factor`).
    pub latents: Tensor,
    /// Caption index of each latent (into `captions` and `hidden_states`).
    pub caption_ids: Vec<u32>,
    pub captions: Vec<String>,
    /// `[captions, tokens, width]`.
    pub hidden_states: Tensor,
    /// The balanced-split index of each latent.
    pub indices: Vec<usize>,
    /// How many balanced images were skipped because their combination is held out.
    pub skipped_heldout: usize,
}

/// The first `n` balanced samples from `start` on whose combination is not held out, with
/// how many were skipped.
pub fn training_samples(spec: &WorldSpec, start: usize, n: usize) -> (Vec<Sample>, usize) {
    let mut out = Vec::with_capacity(n);
    let mut skipped = 0;
    let mut i = start;
    while out.len() < n {
        let s = sample(spec, Split::Balanced, i);
        if heldout::scene_is_heldout(spec, &s.scene) {
            skipped += 1;
        } else {
            out.push(s);
        }
        i += 1;
    }
    (out, skipped)
}

/// Renders the samples on two threads: images `[n, 3, s, s]` in `[0, 1]`.
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
    Ok(super::super::splits::images_tensor(&rendered)?)
}

/// Scaled latents (`posterior mean × scaling_factor`) of images `[n, 3, s, s]` in `[0, 1]`.
pub fn encode_latents(vae: &AutoencoderKL, images: &Tensor) -> anyhow::Result<Tensor> {
    let n = images.dim(0)?;
    let mut out = Vec::new();
    for start in (0..n).step_by(128) {
        let x = images
            .narrow(0, start, 128.min(n - start))?
            .affine(2.0, -1.0)?;
        out.push(vae.scale_latents(&vae.encode(&x)?)?.detach());
    }
    Ok(Tensor::cat(&out, 0)?)
}

impl TrainingSet {
    /// Encodes the first `n` non-held-out balanced images from `start` on with the frozen
    /// `vae`, and each distinct caption once with the frozen `text`.
    pub fn build(
        spec: &WorldSpec,
        start: usize,
        n: usize,
        vae: &AutoencoderKL,
        text: &TextConditioning,
    ) -> anyhow::Result<Self> {
        let (samples, skipped_heldout) = training_samples(spec, start, n);
        let mut captions: Vec<String> = Vec::new();
        let mut by_caption: HashMap<String, u32> = HashMap::new();
        let caption_ids = samples
            .iter()
            .map(|s| {
                *by_caption.entry(s.caption.clone()).or_insert_with(|| {
                    captions.push(s.caption.clone());
                    (captions.len() - 1) as u32
                })
            })
            .collect();
        let mut latents = Vec::new();
        for chunk in samples.chunks(1024) {
            let images = render_samples(spec, chunk)?;
            latents.push(encode_latents(vae, &images)?);
        }
        Ok(Self {
            latents: Tensor::cat(&latents, 0)?,
            caption_ids,
            hidden_states: text.encode(&captions)?,
            captions,
            indices: samples.iter().map(|s| s.index).collect(),
            skipped_heldout,
        })
    }

    pub fn len(&self) -> usize {
        self.caption_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.caption_ids.is_empty()
    }

    /// The latents `[b, c, h, w]` and hidden states `[b, tokens, width]` of examples `batch`.
    pub fn batch(&self, batch: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
        let idx = Tensor::new(
            batch.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            &Device::Cpu,
        )?;
        let cap = Tensor::new(
            batch
                .iter()
                .map(|&i| self.caption_ids[i])
                .collect::<Vec<_>>(),
            &Device::Cpu,
        )?;
        Ok((
            self.latents.index_select(&idx, 0)?,
            self.hidden_states.index_select(&cap, 0)?,
        ))
    }
}
