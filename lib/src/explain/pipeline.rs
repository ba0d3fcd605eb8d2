//! The real DiffExplainer pipeline: soft prompt → CLIP text encoder → few-step sampling over the
//! UNet from fixed noise → VAE decoder → resize + normalize → classifier, differentiable end to
//! end, so the objective's gradient reaches the soft prompt through every UNet step.
//!
//! The randomness is drawn once, when the pipeline is built, from a seed with [`SeededRng`]
//! (the same values on every device): the initial latent noise `[n, 4, h, w]` (one noise per
//! image of the batch: `n > 1` gives `n` different images of the same prompt, what the
//! diversity objective compares), then one per-step noise of the same shape for every step
//! (used by the schedulers that re-noise: LCM, Euler ancestral). Every call of
//! [`DiffusionPipeline::run_vectors`] is then the same deterministic function of the prompt.
//! Classifier-free guidance is off by default (LCM-LoRA and SD-Turbo are distilled without it).

use candle_core::{DType, Tensor};

use super::bundle::ModelBundle;
use super::optimize::Pipeline;
use super::soft_prompt::{encode_vectors, SoftPrompt, SoftPromptInit};
use crate::models::classifiers::ClassifierOutput;
use crate::rng::SeededRng;
use crate::sampling::{sample, SamplerOptions};

/// How the pipeline samples. Kept in run records.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PipelineOptions {
    /// Images per iteration, each from its own fixed noise.
    pub batch: usize,
    /// Seed of the initial and per-step noises.
    pub seed: u64,
    /// Classifier-free guidance scale against the empty prompt; `None`: off.
    pub guidance_scale: Option<f64>,
    /// Recompute the UNet's blocks in backward instead of storing their activations (less
    /// memory, ~1.3× the time; same values).
    pub gradient_checkpointing: bool,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            batch: 1,
            seed: 0,
            guidance_scale: None,
            gradient_checkpointing: false,
        }
    }
}

/// A bundle with its fixed noises: implements [`Pipeline`] for [`super::optimize()`].
pub struct DiffusionPipeline {
    bundle: ModelBundle,
    options: PipelineOptions,
    initial_noise: Tensor,
    step_noises: Vec<Tensor>,
    /// The empty prompt's conditioning, for guidance.
    uncond: Option<Tensor>,
}

impl DiffusionPipeline {
    pub fn new(mut bundle: ModelBundle, options: PipelineOptions) -> anyhow::Result<Self> {
        if options.batch == 0 {
            anyhow::bail!("the batch must hold at least one image")
        }
        bundle
            .unet
            .set_gradient_checkpointing(options.gradient_checkpointing);
        let shape = bundle.latent_shape(options.batch);
        let mut rng = SeededRng::new(options.seed);
        let initial_noise = rng.normal(shape, bundle.dtype, &bundle.device)?;
        let step_noises = (0..bundle.spec.steps)
            .map(|_| rng.normal(shape, bundle.dtype, &bundle.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let uncond = match options.guidance_scale {
            None => None,
            Some(_) => {
                let max_len = bundle.text_encoder.config().max_position_embeddings;
                let ids = bundle.tokenizer.encode_padded("", max_len)?;
                let ids = Tensor::from_vec(ids, (1, max_len), &bundle.device)?;
                Some(
                    bundle
                        .text_encoder
                        .forward(&ids)?
                        .last_hidden_state
                        .detach(),
                )
            }
        };
        Ok(Self {
            bundle,
            options,
            initial_noise,
            step_noises,
            uncond,
        })
    }

    pub fn bundle(&self) -> &ModelBundle {
        &self.bundle
    }
    pub fn options(&self) -> &PipelineOptions {
        &self.options
    }

    /// A soft prompt of `k` vectors for `template` in this bundle's embedding space.
    pub fn new_prompt(
        &self,
        template: &str,
        k: usize,
        init: &SoftPromptInit,
    ) -> anyhow::Result<SoftPrompt> {
        SoftPrompt::new(
            template,
            k,
            init,
            &self.bundle.tokenizer,
            &self.bundle.text_encoder,
        )
    }

    /// The images `[n, 3, H, W]` in [0, 1] (model dtype) for soft vectors `[k, d]` in
    /// `template`, differentiable with respect to `vectors`.
    pub fn generate(&self, template: &str, vectors: &Tensor) -> anyhow::Result<Tensor> {
        let b = &self.bundle;
        let cond = encode_vectors(template, vectors, &b.tokenizer, &b.text_encoder)?
            .last_hidden_state
            .to_dtype(b.dtype)?;
        let (_, s, d) = cond.dims3()?;
        let cond = cond
            .broadcast_as((self.options.batch, s, d))?
            .contiguous()?;
        let mut options =
            SamplerOptions::new(b.spec.steps).with_step_noises(self.step_noises.clone());
        if let (Some(scale), Some(uncond)) = (self.options.guidance_scale, &self.uncond) {
            options = options.with_guidance(scale, uncond.clone());
        }
        let mut scheduler = b.scheduler_kind.build(&b.scheduler_config)?;
        let latents = sample(
            &mut scheduler,
            |x, t, c| b.unet.forward(x, t, c),
            &self.initial_noise,
            &cond,
            &options,
        )?
        .latents;
        Ok(b.vae.decode_to_image(&latents)?)
    }

    /// The classifier's output on images in [0, 1] (resized and normalized here).
    pub fn classify(&self, images: &Tensor) -> anyhow::Result<ClassifierOutput> {
        let b = &self.bundle;
        let x = b
            .preprocess
            .forward(&images.to_dtype(b.classifier_dtype)?)?;
        Ok(b.classifier.forward(&x)?)
    }

    /// Images and the classifier's output for any vectors (e.g. f64 ones in a finite-difference
    /// check); [`Pipeline::run`] calls this with the prompt's own vectors.
    pub fn run_vectors(
        &self,
        template: &str,
        vectors: &Tensor,
    ) -> anyhow::Result<(Tensor, ClassifierOutput)> {
        let images = self.generate(template, vectors)?;
        let output = self.classify(&images)?;
        Ok((images, output))
    }
}

impl Pipeline for DiffusionPipeline {
    fn run(&self, prompt: &SoftPrompt) -> anyhow::Result<(Tensor, ClassifierOutput)> {
        self.run_vectors(prompt.template(), prompt.vectors().as_tensor())
    }
}

/// Images as f32 on the CPU (for saving and comparing).
pub fn images_f32_cpu(images: &Tensor) -> anyhow::Result<Tensor> {
    Ok(images
        .detach()
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?)
}
