//! The world's text-to-image model (ShapesWorld II, issue 13): diffusers'
//! `UNet2DConditionModel` ([`crate::models::unet`], parity-proven against diffusers) at a tiny
//! config, trained on the frozen autoencoder's latents of balanced world images and conditioned
//! on the frozen CLIP text tower's last hidden state, as Stable Diffusion is.
//!
//! - [`config`]: [`UnetTrainConfig`] (architecture, objective, shipped sampler, training) and
//!   the diffusers `unet/config.json` and `scheduler/scheduler_config.json` it writes;
//! - [`data`]: the training set, encoded once: scaled latents (`posterior mean ×
//!   scaling_factor`) of the first `train_images` balanced images past the spec's balanced split
//!   whose (shape, colour, background) is not held out ([`super::heldout`]), and one hidden state
//!   per distinct caption;
//! - [`trainer`]: the denoising loss (v-prediction or epsilon, MSE) through the shared trainer
//!   [`super::train`] (resumable checkpoints);
//! - [`quality`]: held-out captions per template, DDIM sampling, the attribute checker's
//!   reading, sample grids.
//!
//! [`train_and_save`] writes, under `out/diffusion/`: `unet/` (`config.json`,
//! `diffusion_pytorch_model.safetensors`, `report.json`, `samples/`), `scheduler/
//! scheduler_config.json` (a `DDIMScheduler`) and `model_index.json` as diffusers'
//! `StableDiffusionPipeline.save_pretrained` writes it, so with the autoencoder's `vae/` and
//! CLIP's `tokenizer/` and `text_encoder/` beside them the folder loads through `--model-dir`.

pub mod config;
pub mod data;
pub mod quality;
pub mod trainer;

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub use config::{TimestepSampling, UnetTrainConfig};
pub use data::{TextConditioning, TrainingSet};
pub use quality::{Judge, Quality};
pub use trainer::TrainableUnet;

use super::checker::{self, Checker};
use super::train::{self, Checkpointing};
use super::WorldSpec;

/// Where the frozen models and the judge come from.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// A diffusers folder holding `vae/` (or a `world train` output holding `diffusion/vae/`).
    pub vae: PathBuf,
    /// A diffusers folder holding `tokenizer/` and `text_encoder/` (or its `diffusion/`).
    pub text: PathBuf,
    /// An attribute checker folder; `None`: no quality measurement.
    pub checker: Option<PathBuf>,
}

impl Inputs {
    /// The components of a `world train` output `out`: `out/diffusion/{vae,text_encoder,
    /// tokenizer}` and the checker `out/checker` when it exists.
    pub fn of_world_folder(out: &Path) -> Self {
        let checker = out.join("checker");
        Self {
            vae: out.join("diffusion"),
            text: out.join("diffusion"),
            checker: checker.is_dir().then_some(checker),
        }
    }
}

/// How to judge along and after training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalOptions {
    /// Snapshot (and, with a checker, measure at `config.inference_steps`) every this many
    /// steps; 0: only at the end.
    pub eval_every: usize,
    /// Images sampled per held-out caption.
    pub samples_per_prompt: usize,
    /// The step counts measured at the end (the curve against steps).
    pub steps: Vec<usize>,
    /// Seed of the sampling noise.
    pub seed: u64,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            eval_every: 0,
            samples_per_prompt: 4,
            steps: vec![1, 2, 4, 8],
            seed: 1,
        }
    }
}

/// What `world train-unet` writes to `unet/report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnetRecord {
    pub spec_fingerprint: String,
    pub config: UnetTrainConfig,
    pub eval: EvalOptions,
    pub latent_size: usize,
    pub latent_channels: usize,
    pub cross_attention_dim: usize,
    pub parameters: usize,
    pub train_images: usize,
    pub skipped_heldout: usize,
    pub distinct_captions: usize,
    /// Standard deviation of the scaled training latents (about 1 when the autoencoder's
    /// `scaling_factor` is set as SD's).
    pub latent_std: f64,
    pub threads: usize,
    pub encode_seconds: f64,
    pub epoch_losses: Vec<f32>,
    pub seconds: f64,
    /// The quality along training at `inference_steps` (with `eval_every`).
    pub curve: Vec<Quality>,
    /// The quality of the final weights, one per measured step count.
    pub final_quality: Vec<Quality>,
}

/// The loaded inputs, checked.
struct Loaded {
    vae: crate::models::vae::AutoencoderKL,
    vae_root: PathBuf,
    text: TextConditioning,
    text_root: PathBuf,
    checker: Option<Checker>,
    latent_size: usize,
}

fn load_inputs(
    spec: &WorldSpec,
    config: &UnetTrainConfig,
    inputs: &Inputs,
) -> anyhow::Result<Loaded> {
    let vae_root = data::component_root(&inputs.vae, "vae")?;
    let text_root = data::component_root(&inputs.text, "text_encoder")?;
    let vae = data::load_vae(&vae_root)?;
    let text = TextConditioning::load(&text_root)?;
    let f = 1usize << (vae.config.block_out_channels.len() - 1);
    if !spec.image_size.is_multiple_of(f) {
        anyhow::bail!(
            "{}: the autoencoder halves images {} times; the spec's {}-pixel side is not \
             divisible by {f}",
            vae_root.join("vae").display(),
            vae.config.block_out_channels.len() - 1,
            spec.image_size
        )
    }
    let latent_size = spec.image_size / f;
    config.check(latent_size, text.width())?;
    let checker = match &inputs.checker {
        Some(dir) => {
            let c = checker::load_checker(dir)?;
            c.check_fits(spec)
                .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
            Some(c)
        }
        None => None,
    };
    Ok(Loaded {
        vae,
        vae_root,
        text,
        text_root,
        checker,
        latent_size,
    })
}

/// The step a checkpoint in `dir` was saved at (0 when there is none).
fn checkpoint_step(dir: &Path) -> usize {
    std::fs::read(dir.join("checkpoint.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
        .unwrap_or(0) as usize
}

/// Trains the UNet of the `world train` output `out` (its `diffusion/vae`, `diffusion/
/// text_encoder`, `diffusion/tokenizer` and `checker/`) and writes it there: see
/// [`train_and_save_with`].
pub fn train_and_save(
    spec: &WorldSpec,
    config: &UnetTrainConfig,
    out: &Path,
    progress: bool,
) -> anyhow::Result<UnetRecord> {
    train_and_save_with(
        spec,
        config,
        &Inputs::of_world_folder(out),
        &EvalOptions::default(),
        out,
        progress,
    )
}

/// Trains the UNet on the frozen `inputs` and writes `out/diffusion/unet/` (weights, config,
/// `report.json`, sample grids per caption template with a checker), `out/diffusion/scheduler/`
/// and `out/diffusion/model_index.json`; components that come from another folder (`vae/`,
/// `text_encoder/`, `tokenizer/`) are copied beside them so `out/diffusion` loads as a whole.
/// Resumes from `out/diffusion/unet/checkpoint/` (removed at the end). Everything is loaded
/// and checked before anything is written.
pub fn train_and_save_with(
    spec: &WorldSpec,
    config: &UnetTrainConfig,
    inputs: &Inputs,
    eval: &EvalOptions,
    out: &Path,
    progress: bool,
) -> anyhow::Result<UnetRecord> {
    if eval.samples_per_prompt == 0 || eval.steps.contains(&0) {
        anyhow::bail!(
            "unet evaluation: samples_per_prompt = {}, steps = {:?}: must be positive",
            eval.samples_per_prompt,
            eval.steps
        )
    }
    let loaded = load_inputs(spec, config, inputs)?;
    // The held-out set must be usable before any training.
    quality::heldout_prompts(spec)?;
    let diffusion = out.join("diffusion");
    let dir = diffusion.join("unet");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let t0 = std::time::Instant::now();
    if progress {
        eprintln!(
            "encoding {} training images and their captions",
            config.train_images
        );
    }
    let set = TrainingSet::build(
        spec,
        config.train_start(spec),
        config.train_images,
        &loaded.vae,
        &loaded.text,
    )?;
    let encode_seconds = t0.elapsed().as_secs_f64();
    if progress {
        eprintln!(
            "{} latents ({} held-out images skipped), {} distinct captions, in {encode_seconds:.1} s",
            set.len(),
            set.skipped_heldout,
            set.captions.len()
        );
    }
    let latent_channels = set.latents.dim(1)?;
    let width = loaded.text.width();
    let model_config = config.model_config_for(loaded.latent_size, latent_channels, width)?;
    let model = TrainableUnet::new(&model_config, config.seed)?;
    let ckpt_dir = train::checkpoint_dir(&dir);
    let resumed_at = checkpoint_step(&ckpt_dir);
    let checkpoint = Checkpointing { dir: ckpt_dir };
    let judge = loaded.checker.as_ref().map(|c| Judge {
        spec,
        vae: &loaded.vae,
        text: &loaded.text,
        checker: c,
        scheduler: config.scheduler_config(),
        latent_size: loaded.latent_size,
    });
    let unet_json = config.diffusers_config(loaded.latent_size, latent_channels, width);
    if eval.eval_every > 0 {
        std::fs::create_dir_all(dir.join("snapshots"))?;
        crate::io::write_bytes_atomically(
            &dir.join("snapshots").join("config.json"),
            &serde_json::to_vec_pretty(&unet_json)?,
        )?;
    }
    let mut curve = Vec::new();
    let report = trainer::train_on(
        &model,
        &set,
        config,
        Some(&checkpoint),
        progress,
        resumed_at,
        eval.eval_every,
        |step, unet| {
            let tensors = model.tensors()?;
            let snap = dir
                .join("snapshots")
                .join(format!("step-{step:06}.safetensors"));
            crate::io::write_atomically(&snap, |tmp| {
                candle_core::safetensors::save(&tensors, tmp).map_err(Into::into)
            })?;
            if let Some(j) = &judge {
                let (q, _) = j.measure(
                    unet,
                    config.inference_steps,
                    eval.samples_per_prompt,
                    eval.seed,
                    step,
                )?;
                if progress {
                    eprintln!("{}", q.line());
                }
                curve.push(q);
            }
            Ok(())
        },
    )?;
    let total = report.total_steps;

    let mut final_quality = Vec::new();
    if let Some(j) = &judge {
        for &steps in &eval.steps {
            let (q, grids) = j.measure(
                &model.unet,
                steps,
                eval.samples_per_prompt,
                eval.seed,
                total,
            )?;
            if progress {
                eprintln!("{}", q.line());
            }
            if steps == config.inference_steps {
                for (t, images) in q.templates.iter().zip(&grids) {
                    quality::save_template_grid(
                        &dir.join("samples"),
                        &t.template,
                        &t.captions,
                        images,
                        eval.samples_per_prompt,
                    )?;
                }
            }
            final_quality.push(q);
        }
    }

    let tensors = model.tensors()?;
    let record = UnetRecord {
        spec_fingerprint: spec.fingerprint(),
        config: config.clone(),
        eval: eval.clone(),
        latent_size: loaded.latent_size,
        latent_channels,
        cross_attention_dim: width,
        parameters: model.parameters()?,
        train_images: set.len(),
        skipped_heldout: set.skipped_heldout,
        distinct_captions: set.captions.len(),
        latent_std: set
            .latents
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .var(0)?
            .to_scalar::<f64>()?
            .sqrt(),
        threads: candle_core::utils::get_num_threads(),
        encode_seconds,
        epoch_losses: report.epoch_losses,
        seconds: report.seconds,
        curve,
        final_quality,
    };
    crate::io::write_atomically(&dir.join("diffusion_pytorch_model.safetensors"), |tmp| {
        candle_core::safetensors::save(&tensors, tmp).map_err(Into::into)
    })?;
    crate::io::write_bytes_atomically(
        &dir.join("config.json"),
        &serde_json::to_vec_pretty(&unet_json)?,
    )?;
    crate::io::write_bytes_atomically(
        &dir.join("report.json"),
        &serde_json::to_vec_pretty(&record)?,
    )?;
    write_scheduler_and_index(config, &diffusion)?;
    copy_component(&loaded.vae_root, &diffusion, "vae")?;
    copy_component(&loaded.text_root, &diffusion, "text_encoder")?;
    copy_component(&loaded.text_root, &diffusion, "tokenizer")?;
    let _ = std::fs::remove_dir_all(train::checkpoint_dir(&dir));
    Ok(record)
}

/// Writes `scheduler/scheduler_config.json` and `model_index.json` (the image encoder is listed
/// when the folder has one, as CLIP's trainer writes it).
pub fn write_scheduler_and_index(config: &UnetTrainConfig, diffusion: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(diffusion.join("scheduler"))?;
    crate::io::write_bytes_atomically(
        &diffusion.join("scheduler").join("scheduler_config.json"),
        &serde_json::to_vec_pretty(&config.scheduler_json())?,
    )?;
    crate::io::write_bytes_atomically(
        &diffusion.join("model_index.json"),
        &serde_json::to_vec_pretty(&model_index(
            diffusion
                .join("image_encoder")
                .join("config.json")
                .is_file(),
        ))?,
    )
}

/// `model_index.json` as diffusers' `StableDiffusionPipeline.save_pretrained` writes it.
pub fn model_index(with_image_encoder: bool) -> serde_json::Value {
    let image_encoder = if with_image_encoder {
        serde_json::json!(["transformers", "CLIPVisionModelWithProjection"])
    } else {
        serde_json::json!([null, null])
    };
    serde_json::json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "feature_extractor": [null, null],
        "image_encoder": image_encoder,
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

/// Copies `from/name/` to `to/name/` (plain files) unless they are the same folder.
fn copy_component(from: &Path, to: &Path, name: &str) -> anyhow::Result<()> {
    let (src, dst) = (from.join(name), to.join(name));
    if let (Ok(a), Ok(b)) = (src.canonicalize(), dst.canonicalize()) {
        if a == b {
            return Ok(());
        }
    }
    std::fs::create_dir_all(&dst).with_context(|| format!("creating {}", dst.display()))?;
    for entry in std::fs::read_dir(&src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dst.join(entry.file_name())).with_context(|| {
                format!("copying {} to {}", entry.path().display(), dst.display())
            })?;
        }
    }
    Ok(())
}

/// Loads a trained UNet from a folder holding `unet/` (or its `diffusion/`).
pub fn load_unet(dir: &Path) -> anyhow::Result<crate::models::unet::UNet2DConditionModel> {
    let root = data::component_root(dir, "unet")?;
    crate::models::unet::UNet2DConditionModel::from_pretrained(
        &root,
        None,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .with_context(|| format!("loading the UNet of {}", root.display()))
}
