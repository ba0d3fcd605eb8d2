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
//!
//! Two options follow the authors' code where it differs (`docs/recipe.md`):
//! [`StepNoise::Fresh`] redraws the per-step noises at every iteration, from the seed stream
//! [`fresh_noise_seed`]`(seed, iteration)` (so a record still reproduces any iteration), and
//! [`GradientPath::Truncated`] detaches the UNet's input latents at every step.

use candle_core::{DType, Tensor};

use super::bundle::ModelBundle;
use super::optimize::Pipeline;
use super::soft_prompt::{encode_vectors, SoftPrompt, SoftPromptInit};
use crate::models::classifiers::ClassifierOutput;
use crate::rng::SeededRng;
use crate::sampling::{sample, SamplerOptions};

/// Which way the gradient flows back through the sampling steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GradientPath {
    /// Through every UNet call and every scheduler update (the exact gradient of the images
    /// with respect to the prompt).
    #[default]
    Full,
    /// The UNet's input latents are detached at each step (the authors' code): each step's
    /// UNet call contributes its gradient through the conditioning only, and the scheduler's
    /// update carries it along; nothing flows back through an earlier UNet call.
    Truncated,
}

/// Which per-step noises the re-noising schedulers (LCM, Euler ancestral) add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepNoise {
    /// Drawn once from the seed: every iteration optimizes the same function.
    #[default]
    Fixed,
    /// Redrawn at every iteration `i` from the seed [`fresh_noise_seed`]`(seed, i)` (the
    /// authors' code draws new noise at every call); the initial latent noise stays fixed.
    Fresh,
}

impl std::str::FromStr for GradientPath {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "full" => Ok(Self::Full),
            "truncated" => Ok(Self::Truncated),
            other => anyhow::bail!("unknown gradient path `{other}` (full or truncated)"),
        }
    }
}

impl std::str::FromStr for StepNoise {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "fixed" => Ok(Self::Fixed),
            "fresh" => Ok(Self::Fresh),
            other => anyhow::bail!("unknown step noise `{other}` (fixed or fresh)"),
        }
    }
}

/// Derives the `index`-th seed of a named stream from a run's seed (SplitMix64's finalizer on
/// the mixed inputs): streams with different `salt`s never reuse the run's own noise seed.
pub fn derive_seed(seed: u64, salt: u64, index: u64) -> u64 {
    let mut rng = SeededRng::new(seed ^ salt.rotate_left(17));
    let a = rng.next_u64();
    let mut rng = SeededRng::new(a ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    rng.next_u64()
}

/// The seed of iteration `iteration`'s per-step noises under [`StepNoise::Fresh`].
pub fn fresh_noise_seed(seed: u64, iteration: usize) -> u64 {
    derive_seed(seed, 0x6672_6573_685f_6e6f, iteration as u64) // "fresh_no"
}

fn yes() -> bool {
    true
}

/// How the pipeline samples. Kept in run records (fields added later default, when an older
/// record lacks them, to what that record's run did).
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
    #[serde(default)]
    pub gradient_path: GradientPath,
    #[serde(default)]
    pub step_noise: StepNoise,
    /// Antialias the bilinear resize to the classifier's input size (torchvision's
    /// `antialias=True`); the authors' code resizes without. Acts only when the images are
    /// larger than the classifier's input.
    #[serde(default = "yes")]
    pub resize_antialias: bool,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            batch: 1,
            seed: 0,
            guidance_scale: None,
            gradient_checkpointing: false,
            gradient_path: GradientPath::Full,
            step_noise: StepNoise::Fixed,
            resize_antialias: true,
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
        check_options_act(&bundle, &options)?;
        bundle
            .unet
            .set_gradient_checkpointing(options.gradient_checkpointing);
        bundle.preprocess.antialias = options.resize_antialias;
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
    /// `template`, differentiable with respect to `vectors`, with iteration 0's noises.
    pub fn generate(&self, template: &str, vectors: &Tensor) -> anyhow::Result<Tensor> {
        self.generate_at(template, vectors, 0)
    }

    /// [`Self::generate`] with the per-step noises of optimization iteration `iteration` (the
    /// same for every iteration under [`StepNoise::Fixed`]).
    pub fn generate_at(
        &self,
        template: &str,
        vectors: &Tensor,
        iteration: usize,
    ) -> anyhow::Result<Tensor> {
        let b = &self.bundle;
        let cond = encode_vectors(template, vectors, &b.tokenizer, &b.text_encoder)?
            .last_hidden_state
            .to_dtype(b.dtype)?;
        let (initial_noise, step_noises) = self.noises_at(iteration)?;
        self.sample_images(&cond, &initial_noise, step_noises)
    }

    /// The pipeline's noises for iteration `iteration`: `(initial, per-step)`.
    pub fn noises_at(&self, iteration: usize) -> anyhow::Result<(Tensor, Vec<Tensor>)> {
        let b = &self.bundle;
        Ok(match self.options.step_noise {
            StepNoise::Fixed => (self.initial_noise.clone(), self.step_noises.clone()),
            StepNoise::Fresh => {
                let shape = self.initial_noise.dims().to_vec();
                let mut rng = SeededRng::new(fresh_noise_seed(self.options.seed, iteration));
                let steps = (0..b.spec.steps)
                    .map(|_| rng.normal(shape.as_slice(), b.dtype, &b.device))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                (self.initial_noise.clone(), steps)
            }
        })
    }

    /// Samples and decodes images from a text conditioning `[1 or n, 77, d]` (broadcast to the
    /// noise's batch `n`) with the given initial noise `[n, 4, h, w]` and per-step noises, with
    /// this pipeline's guidance and gradient path.
    pub fn sample_images(
        &self,
        cond: &Tensor,
        initial_noise: &Tensor,
        step_noises: Vec<Tensor>,
    ) -> anyhow::Result<Tensor> {
        let b = &self.bundle;
        let n = initial_noise.dim(0)?;
        let (_, s, d) = cond.dims3()?;
        let cond = cond.broadcast_as((n, s, d))?.contiguous()?;
        let mut options = SamplerOptions::new(b.spec.steps)
            .with_step_noises(step_noises)
            .with_detached_model_input(self.options.gradient_path == GradientPath::Truncated);
        if let (Some(scale), Some(uncond)) = (self.options.guidance_scale, &self.uncond) {
            options = options.with_guidance(scale, uncond.clone());
        }
        let mut scheduler = b.scheduler_kind.build(&b.scheduler_config)?;
        let latents = sample(
            &mut scheduler,
            |x, t, c| b.unet.forward(x, t, c),
            initial_noise,
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
        self.run_vectors_at(template, vectors, 0)
    }

    /// [`Self::run_vectors`] with iteration `iteration`'s noises.
    pub fn run_vectors_at(
        &self,
        template: &str,
        vectors: &Tensor,
        iteration: usize,
    ) -> anyhow::Result<(Tensor, ClassifierOutput)> {
        let images = self.generate_at(template, vectors, iteration)?;
        let output = self.classify(&images)?;
        Ok((images, output))
    }
}

impl Pipeline for DiffusionPipeline {
    fn run(&self, prompt: &SoftPrompt) -> anyhow::Result<(Tensor, ClassifierOutput)> {
        self.run_vectors(prompt.template(), prompt.vectors().as_tensor())
    }
    fn run_at(
        &self,
        prompt: &SoftPrompt,
        iteration: usize,
    ) -> anyhow::Result<(Tensor, ClassifierOutput)> {
        self.run_vectors_at(prompt.template(), prompt.vectors().as_tensor(), iteration)
    }
}

/// Which of the pipeline's optional behaviours would change anything with a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionEffects {
    /// The schedule adds noise between steps (so [`StepNoise::Fresh`] differs from `Fixed`).
    pub step_noise: bool,
    /// There are at least 2 steps (so [`GradientPath::Truncated`] differs from `Full`).
    pub gradient_path: bool,
    /// The images are shrunk to the classifier's input (so the antialias setting matters).
    pub resize_antialias: bool,
}

impl OptionEffects {
    pub fn of(bundle: &ModelBundle) -> anyhow::Result<Self> {
        let steps = bundle.spec.steps;
        let mut scheduler = bundle.scheduler_kind.build(&bundle.scheduler_config)?;
        scheduler.set_timesteps(steps)?;
        Ok(Self {
            step_noise: (0..steps).any(|i| scheduler.needs_noise(i)),
            gradient_path: steps >= 2,
            resize_antialias: bundle
                .preprocess
                .size
                .is_some_and(|s| s < bundle.spec.resolution),
        })
    }
}

/// Refuses options that would have no effect with this bundle (every option acts or is
/// refused): fresh step noise with a schedule that adds none, a truncated gradient with one
/// step (the only UNet input is the initial noise, a constant anyway), and resizing without
/// antialias when the images are not shrunk to the classifier's input.
fn check_options_act(bundle: &ModelBundle, options: &PipelineOptions) -> anyhow::Result<()> {
    let acts = OptionEffects::of(bundle)?;
    let steps = bundle.spec.steps;
    if options.step_noise == StepNoise::Fresh && !acts.step_noise {
        anyhow::bail!(
            "step noise `fresh` has no effect here: the {:?} scheduler with {steps} step(s) adds \
             no noise between steps (use lcm or euler_ancestral with at least 2 steps, or step \
             noise `fixed`)",
            bundle.scheduler_kind
        )
    }
    if options.gradient_path == GradientPath::Truncated && !acts.gradient_path {
        anyhow::bail!(
            "gradient path `truncated` has no effect with {steps} sampling step: the UNet's only \
             input is the initial noise, which is a constant anyway (use gradient path `full`)"
        )
    }
    if !options.resize_antialias && !acts.resize_antialias {
        anyhow::bail!(
            "resizing without antialias has no effect here: the {}px images are not shrunk for \
             the classifier (input size {}); antialiasing acts only when downsampling",
            bundle.spec.resolution,
            bundle
                .preprocess
                .size
                .map_or("unchanged".to_string(), |s| format!("{s}px"))
        )
    }
    Ok(())
}

/// Images as f32 on the CPU (for saving and comparing).
pub fn images_f32_cpu(images: &Tensor) -> anyhow::Result<Tensor> {
    Ok(images
        .detach()
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?)
}
