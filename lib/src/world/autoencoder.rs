//! The world's autoencoder (ShapesWorld II, issue 13): diffusers' `AutoencoderKL`
//! ([`crate::models::vae`], parity-proven forward and gradients) at a tiny config, trained on
//! balanced world images with [`super::train`], written as a diffusers `vae/` folder
//! (`config.json` + `diffusion_pytorch_model.safetensors`) that
//! [`AutoencoderKL::from_pretrained`] loads.
//!
//! Loss (as SD's autoencoder, Rombach et al. 2022, `LPIPSWithDiscriminator` without its
//! perceptual and adversarial terms): images are mapped to `[-1, 1]`, the encoder gives the
//! posterior's mean and log-variance (clamped to `[-30, 20]` as diffusers'
//! `DiagonalGaussianDistribution`), `z = mean + exp(logvar / 2) · ε`, and
//!
//! `loss = mean |decode(z) − x|  +  kl_weight · KL(q(z|x) ‖ N(0, I)) / (3 · s²)`
//!
//! with the KL summed over latent elements and averaged over the batch, divided by the pixel
//! values per image so both terms have the per-value scale LDM's summed terms have
//! (LDM: `kl_weight = 1e-6`). `ε` comes from [`SeededRng`] seeded by the batch's indices, so a
//! run is reproducible and resumes to the same weights.
//!
//! Initialization is PyTorch's default for each layer (uniform `±1/√fan_in` for conv and linear
//! weights and biases; norms the identity), drawn from `SeededRng` over sorted parameter names.
//!
//! `scaling_factor` is set as SD's was: 1 / the standard deviation of the posterior means over
//! (a sample of) the training images, so the diffusion model sees latents of unit variance.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::checker::{agreement, balanced_images, labels_of, Checker};
use super::classifier::Accuracy;
use super::spec::WorldSpec;
use super::train::{self, Checkpointing, TrainConfig, TrainReport};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::rng::SeededRng;

/// The reconstruction term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Reconstruction {
    /// Mean absolute error (SD's autoencoder).
    L1,
    /// Mean squared error.
    Mse,
}

/// The autoencoder's architecture and training (recorded in `report.json`). `Default` is the
/// default world's autoencoder (docs/shapesworld-ii.md has the runs that chose it); in a
/// spec or JSON, absent fields take the default and unknown ones are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaeTrainConfig {
    /// Seed of the initial weights, the batch order and the posterior noise.
    pub seed: u64,
    /// Balanced images to train on (indices from `train_start`).
    pub train_images: usize,
    /// Held-out balanced images to measure on (indices `0..eval_images`).
    pub eval_images: usize,
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate (AdamW, cosine decay to 0 over all steps).
    pub lr: f64,
    pub weight_decay: f64,
    /// diffusers' `block_out_channels`: one block per entry; the latents are the image side
    /// over `2^(blocks − 1)`.
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// diffusers' `mid_block_add_attention`: the mid blocks' single-head self-attention.
    pub mid_block_add_attention: bool,
    pub reconstruction: Reconstruction,
    pub kl_weight: f64,
    /// Write a resumable checkpoint every this many steps (and at the end).
    pub checkpoint_every: usize,
    /// Every this many steps, snapshot the weights to `vae/snapshots/` and, with a checker,
    /// measure the round trip on the first `curve_images` held-out images (0: only at the end).
    pub eval_every: usize,
    pub curve_images: usize,
}

impl Default for VaeTrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            train_images: 12000,
            eval_images: 600,
            epochs: 6,
            batch_size: 16,
            lr: 2e-3,
            weight_decay: 0.0,
            block_out_channels: vec![16, 32],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 8,
            mid_block_add_attention: false,
            reconstruction: Reconstruction::L1,
            kl_weight: 1e-6,
            checkpoint_every: 100,
            eval_every: 250,
            curve_images: 300,
        }
    }
}

impl VaeTrainConfig {
    /// First balanced index trained on (past the held-out images and the spec's balanced split).
    pub fn train_start(&self, spec: &WorldSpec) -> usize {
        self.eval_images.max(spec.splits.balanced)
    }

    /// Latent side for images of side `image_size`.
    pub fn latent_size(&self, image_size: usize) -> usize {
        image_size >> (self.block_out_channels.len().saturating_sub(1))
    }

    /// Refuses configs that cannot train, naming the field.
    pub fn check(&self, image_size: usize) -> anyhow::Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.block_out_channels.contains(&0) {
            anyhow::bail!(
                "vae config: block_out_channels = {:?}: needs at least one positive width",
                self.block_out_channels
            )
        }
        if !image_size.is_multiple_of(1 << (n - 1)) {
            anyhow::bail!(
                "vae config: block_out_channels = {:?}: {n} blocks halve the image {} times, \
                 but the image side {image_size} is not divisible by {}",
                self.block_out_channels,
                n - 1,
                1 << (n - 1)
            )
        }
        if self.norm_num_groups == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| c % self.norm_num_groups != 0)
        {
            anyhow::bail!(
                "vae config: norm_num_groups = {}: must divide every block width {:?}",
                self.norm_num_groups,
                self.block_out_channels
            )
        }
        if self.latent_channels == 0 || self.layers_per_block == 0 {
            anyhow::bail!(
                "vae config: latent_channels = {}, layers_per_block = {}: must be positive",
                self.latent_channels,
                self.layers_per_block
            )
        }
        if self.train_images == 0 || self.eval_images == 0 {
            anyhow::bail!(
                "vae config: train_images = {}, eval_images = {}: must be positive",
                self.train_images,
                self.eval_images
            )
        }
        if self.epochs == 0 || self.batch_size == 0 {
            anyhow::bail!(
                "vae config: epochs = {}, batch_size = {}: must be positive",
                self.epochs,
                self.batch_size
            )
        }
        if self.eval_every > 0 && self.curve_images == 0 {
            anyhow::bail!(
                "vae config: curve_images = 0 with eval_every = {}: nothing to measure along training",
                self.eval_every
            )
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            anyhow::bail!("vae config: lr = {}: must be a positive number", self.lr)
        }
        if !(self.kl_weight >= 0.0 && self.kl_weight.is_finite()) {
            anyhow::bail!("vae config: kl_weight = {}: must be >= 0", self.kl_weight)
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

    /// diffusers' `vae/config.json` for this architecture.
    pub fn diffusers_config(&self, image_size: usize, scaling_factor: f64) -> serde_json::Value {
        let n = self.block_out_channels.len();
        serde_json::json!({
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.30.0",
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "up_block_types": vec!["UpDecoderBlock2D"; n],
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": image_size,
            "scaling_factor": scaling_factor,
            "shift_factor": null,
            "latents_mean": null,
            "latents_std": null,
            "force_upcast": true,
            "use_quant_conv": true,
            "use_post_quant_conv": true,
            "mid_block_add_attention": self.mid_block_add_attention,
        })
    }

    pub fn model_config(&self, image_size: usize) -> anyhow::Result<AutoencoderKLConfig> {
        let cfg: AutoencoderKLConfig =
            serde_json::from_value(self.diffusers_config(image_size, 1.0))?;
        cfg.check()?;
        Ok(cfg)
    }
}

/// An `AutoencoderKL` whose parameters are trainable variables (diffusers' names).
pub struct TrainableVae {
    pub varmap: VarMap,
    pub vae: AutoencoderKL,
}

impl TrainableVae {
    /// Fresh weights from `seed` (PyTorch's default initialization; see the module docs).
    pub fn new(config: &AutoencoderKLConfig, seed: u64) -> anyhow::Result<Self> {
        let varmap = VarMap::new();
        let vae = AutoencoderKL::new(
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
            config,
        )?;
        train::init_pytorch_default(&varmap, seed)?;
        Ok(Self { varmap, vae })
    }

    pub fn vars(&self) -> anyhow::Result<Vec<(String, Var)>> {
        train::sorted_vars(&self.varmap)
    }

    /// Every tensor by its diffusers name (copies).
    pub fn tensors(&self) -> anyhow::Result<std::collections::HashMap<String, Tensor>> {
        train::var_tensors(&self.varmap)
    }
}

/// The posterior's mean and log-variance (clamped to `[-30, 20]`) for images in `[-1, 1]`.
pub fn posterior(vae: &AutoencoderKL, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let encoder = vae.encoder.as_ref().ok_or_else(|| {
        candle_core::Error::Msg("AutoencoderKL: built decoder-only, cannot encode".into())
    })?;
    let moments = encoder.forward(x)?;
    let moments = match &vae.quant_conv {
        Some(conv) => conv.forward(&moments)?,
        None => moments,
    };
    let c = vae.config.latent_channels;
    let mean = moments.narrow(1, 0, c)?;
    let logvar = crate::ops::clamp(&moments.narrow(1, c, c)?, -30.0, 20.0)?;
    Ok((mean, logvar))
}

/// The training loss of a batch `x` `[b, 3, s, s]` in `[0, 1]` (see the module docs), with
/// posterior noise `eps` `[b, latent_channels, h, w]`. Returns (loss, reconstruction term, KL
/// per image).
pub fn loss(
    vae: &AutoencoderKL,
    x: &Tensor,
    eps: &Tensor,
    reconstruction: Reconstruction,
    kl_weight: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let x = x.affine(2.0, -1.0)?;
    let (mean, logvar) = posterior(vae, &x)?;
    let z = (&mean + ((&logvar * 0.5)?.exp()? * eps)?)?;
    let diff = (vae.decode(&z)? - &x)?;
    let rec = match reconstruction {
        Reconstruction::L1 => diff.abs()?.mean_all()?,
        Reconstruction::Mse => diff.sqr()?.mean_all()?,
    };
    let b = x.dim(0)?;
    let values_per_image = x.elem_count() / b;
    // KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − 1 − log σ²), summed over latent elements.
    let kl = ((mean.sqr()? + logvar.exp()?)? - 1.0)?
        .sub(&logvar)?
        .sum_all()?
        .affine(0.5 / b as f64, 0.0)?;
    let total = (&rec + kl.affine(kl_weight / values_per_image as f64, 0.0)?)?;
    Ok((total, rec, kl))
}

/// Images `[n, 3, s, s]` in `[0, 1]` through encode (posterior mean) and decode, back in
/// `[0, 1]` (clamped), in batches.
pub fn round_trip(vae: &AutoencoderKL, images: &Tensor) -> candle_core::Result<Tensor> {
    let n = images.dim(0)?;
    let mut out = Vec::new();
    for start in (0..n).step_by(128) {
        let x = images
            .narrow(0, start, 128.min(n - start))?
            .affine(2.0, -1.0)?;
        let z = vae.encode(&x)?;
        let y = crate::ops::clamp(&vae.decode(&z)?.affine(0.5, 0.5)?, 0.0, 1.0)?;
        out.push(y.detach());
    }
    Tensor::cat(&out, 0)
}

/// How well reconstructions keep what the checker reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundTrip {
    /// Training steps done when measured.
    pub step: usize,
    pub images: usize,
    /// Mean absolute error per pixel value, in `[0, 1]` units.
    pub l1: f64,
    /// Peak signal-to-noise ratio over all values (dB, peak 1).
    pub psnr: f64,
    /// Per head: the share of images where the checker reads the reconstruction as the
    /// original.
    pub agreement: Vec<(String, Accuracy)>,
    /// Per head: the checker's accuracy on the reconstructions against the true attributes.
    pub accuracy: Vec<(String, Accuracy)>,
    /// Per head: the checker's accuracy on the originals (its own ceiling).
    pub original_accuracy: Vec<(String, Accuracy)>,
}

/// Measures the round trip of `images` with true `labels` `[n][heads]`.
pub fn measure_round_trip(
    vae: &AutoencoderKL,
    checker: &Checker,
    images: &Tensor,
    labels: &[Vec<usize>],
    step: usize,
) -> anyhow::Result<RoundTrip> {
    let rec = round_trip(vae, images)?;
    let diff = (&rec - images)?;
    let l1 = diff.abs()?.mean_all()?.to_scalar::<f32>()? as f64;
    let mse = diff.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
    let read_orig = checker.read(images)?;
    let read_rec = checker.read(&rec)?;
    let k = checker.heads.len();
    let named = |accs: Vec<Accuracy>| {
        checker
            .heads
            .iter()
            .map(|h| h.attribute.clone())
            .zip(accs)
            .collect::<Vec<_>>()
    };
    Ok(RoundTrip {
        step,
        images: images.dim(0)?,
        l1,
        psnr: -10.0 * mse.max(1e-12).log10(),
        agreement: named(agreement(&read_rec, &read_orig, k)),
        accuracy: named(agreement(&read_rec, labels, k)),
        original_accuracy: named(agreement(&read_orig, labels, k)),
    })
}

/// 1 / the standard deviation of the posterior means of `images` (SD's `scaling_factor`).
pub fn scaling_factor(vae: &AutoencoderKL, images: &Tensor) -> anyhow::Result<f64> {
    let x = images.affine(2.0, -1.0)?;
    let z = vae.encode(&x)?.flatten_all()?.to_vec1::<f32>()?;
    let n = z.len() as f64;
    let mean = z.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = z.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    // Also refuses a NaN variance.
    if var.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        anyhow::bail!("the latents have zero variance: the autoencoder has not trained")
    }
    Ok(1.0 / var.sqrt())
}

/// What `world train-vae` writes to `report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaeRecord {
    pub spec_fingerprint: String,
    pub config: VaeTrainConfig,
    pub image_size: usize,
    pub latent_size: usize,
    pub parameters: usize,
    pub threads: usize,
    pub scaling_factor: f64,
    pub epoch_losses: Vec<f32>,
    pub seconds: f64,
    /// The round trip measured along training (on the first `curve_images` held-out images)
    /// and at the end (on all `eval_images`); empty without a checker.
    pub curve: Vec<RoundTrip>,
    pub final_round_trip: Option<RoundTrip>,
}

/// Trains on `images` `[n, 3, s, s]` in `[0, 1]`. Every `every` steps, `on_eval(step, vae)`
/// runs before the step (snapshots, the round-trip curve); `resumed_at` is the step the
/// checkpoint resumes from, so `step` counts from the start of training. An error from
/// `on_eval` stops training.
#[allow(clippy::too_many_arguments)]
pub fn train_on(
    model: &TrainableVae,
    images: &Tensor,
    config: &VaeTrainConfig,
    checkpoint: Option<&Checkpointing>,
    progress: bool,
    resumed_at: usize,
    every: usize,
    mut on_eval: impl FnMut(usize, &AutoencoderKL) -> anyhow::Result<()>,
) -> anyhow::Result<TrainReport> {
    let latent = config.latent_size(images.dim(2)?);
    let c = config.latent_channels;
    let mut step = resumed_at;
    let report = train::train(
        model.vars()?,
        Vec::new(), // group norm keeps no running statistics
        images.dim(0)?,
        &config.train_config(),
        checkpoint,
        "vae",
        progress,
        |indices| {
            if every > 0 && step > resumed_at && step.is_multiple_of(every) {
                // A failed measurement stops training (the last checkpoint stays resumable).
                on_eval(step, &model.vae)
                    .map_err(|e| candle_core::Error::Msg(format!("at step {step}: {e:#}")))?;
            }
            step += 1;
            let idx = Tensor::new(
                indices.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                &Device::Cpu,
            )?;
            let x = images.index_select(&idx, 0)?;
            // The posterior noise is a function of the batch (its indices, in order) and the
            // seed, so a resumed run draws what the uninterrupted one did.
            let mut h = config.seed ^ 0xA076_1D64_78BD_642F;
            for &i in indices {
                h = (h ^ i as u64).wrapping_mul(0x100_0000_01B3).rotate_left(17);
            }
            let b = indices.len();
            let eps = Tensor::from_vec(
                SeededRng::new(h).normal_vec(b * c * latent * latent),
                (b, c, latent, latent),
                &Device::Cpu,
            )?;
            let (total, _, _) = loss(
                &model.vae,
                &x,
                &eps,
                config.reconstruction,
                config.kl_weight,
            )?;
            Ok(total)
        },
    )?;
    Ok(report)
}

/// The step a checkpoint in `dir` was saved at (0 when there is none).
fn checkpoint_step(dir: &Path) -> usize {
    std::fs::read(dir.join("checkpoint.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
        .unwrap_or(0) as usize
}

/// Trains the autoencoder for `spec` and writes the model folder `out`: `out/vae/config.json`,
/// `out/vae/diffusion_pytorch_model.safetensors` (diffusers' layout, loaded by
/// [`AutoencoderKL::from_pretrained`]) and `out/vae/report.json`. Every `config.eval_every`
/// steps it writes the weights to `out/vae/snapshots/step-NNNNNN.safetensors` (for
/// [`snapshot_curve`]). The checkpoint lives in `out/vae/checkpoint/` while training (a rerun
/// with the same config resumes) and is removed at the end. See [`train_and_save_checked`] to
/// measure the round trip along training.
pub fn train_and_save(
    spec: &WorldSpec,
    config: &VaeTrainConfig,
    out: &Path,
    progress: bool,
) -> anyhow::Result<VaeRecord> {
    train_and_save_checked(spec, config, None, out, progress)
}

/// [`train_and_save`], and with a `checker` the round trip every `config.eval_every` steps on
/// the first `config.curve_images` held-out images and at the end on all `eval_images`.
pub fn train_and_save_checked(
    spec: &WorldSpec,
    config: &VaeTrainConfig,
    checker: Option<&Checker>,
    out: &Path,
    progress: bool,
) -> anyhow::Result<VaeRecord> {
    let (eval_every, curve_images) = (config.eval_every, config.curve_images);
    config.check(spec.image_size)?;
    if let Some(c) = checker {
        c.check_fits(spec)?;
    }
    let dir = out.join("vae");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let model_config = config.model_config(spec.image_size)?;
    let (eval, eval_samples) = balanced_images(spec, 0, config.eval_images)?;
    let labels = match checker {
        Some(c) => labels_of(&c.heads, &eval_samples)?,
        None => Vec::new(),
    };
    let (images, _) = balanced_images(spec, config.train_start(spec), config.train_images)?;
    let model = TrainableVae::new(&model_config, config.seed)?;
    let ckpt_dir = train::checkpoint_dir(&dir);
    let resumed_at = checkpoint_step(&ckpt_dir);
    let checkpoint = Checkpointing { dir: ckpt_dir };
    if eval_every > 0 {
        // The snapshots' architecture, so they can be measured before training ends.
        std::fs::create_dir_all(dir.join("snapshots"))?;
        crate::io::write_bytes_atomically(
            &dir.join("snapshots").join("config.json"),
            &serde_json::to_vec_pretty(&config.diffusers_config(spec.image_size, 1.0))?,
        )?;
    }
    let mut curve = Vec::new();
    let curve_n = curve_images.min(config.eval_images);
    let curve_images_t = eval.narrow(0, 0, curve_n)?;
    let report = train_on(
        &model,
        &images,
        config,
        Some(&checkpoint),
        progress,
        resumed_at,
        eval_every,
        |step, vae| {
            // A snapshot of the weights, to measure the curve later with another checker.
            let snap = dir
                .join("snapshots")
                .join(format!("step-{step:06}.safetensors"));
            std::fs::create_dir_all(dir.join("snapshots"))?;
            let tensors = model.tensors()?;
            crate::io::write_atomically(&snap, |tmp| {
                candle_core::safetensors::save(&tensors, tmp).map_err(Into::into)
            })?;
            if let Some(c) = checker {
                let rt = measure_round_trip(vae, c, &curve_images_t, &labels[..curve_n], step)?;
                if progress {
                    eprintln!("{}", round_trip_line(&rt));
                }
                curve.push(rt);
            }
            Ok(())
        },
    )?;
    let total = report.total_steps;
    let final_round_trip = match checker {
        Some(c) => Some(measure_round_trip(&model.vae, c, &eval, &labels, total)?),
        None => None,
    };
    let sample = images.narrow(0, 0, images.dim(0)?.min(512))?;
    let scaling = scaling_factor(&model.vae, &sample)?;
    let tensors = model.tensors()?;
    let record = VaeRecord {
        spec_fingerprint: spec.fingerprint(),
        config: config.clone(),
        image_size: spec.image_size,
        latent_size: config.latent_size(spec.image_size),
        parameters: tensors.values().map(|t| t.elem_count()).sum(),
        threads: candle_core::utils::get_num_threads(),
        scaling_factor: scaling,
        epoch_losses: report.epoch_losses,
        seconds: report.seconds,
        curve,
        final_round_trip,
    };
    crate::io::write_atomically(&dir.join("diffusion_pytorch_model.safetensors"), |tmp| {
        candle_core::safetensors::save(&tensors, tmp).map_err(Into::into)
    })?;
    crate::io::write_bytes_atomically(
        &dir.join("config.json"),
        &serde_json::to_vec_pretty(&config.diffusers_config(spec.image_size, scaling))?,
    )?;
    crate::io::write_bytes_atomically(
        &dir.join("report.json"),
        &serde_json::to_vec_pretty(&record)?,
    )?;
    let _ = std::fs::remove_dir_all(train::checkpoint_dir(&dir));
    Ok(record)
}

/// One line: step, L1, PSNR and per-head agreement.
pub fn round_trip_line(rt: &RoundTrip) -> String {
    let heads: Vec<String> = rt
        .agreement
        .iter()
        .map(|(a, acc)| format!("{a} {:.1}%", 100.0 * acc.value()))
        .collect();
    format!(
        "step {:5}  L1 {:.4}  PSNR {:.2} dB  round-trip agreement ({} images): {}",
        rt.step,
        rt.l1,
        rt.psnr,
        rt.images,
        heads.join(", ")
    )
}

/// Loads a trained autoencoder model folder (`dir/vae/`), encoder included.
pub fn load_vae(dir: &Path) -> anyhow::Result<AutoencoderKL> {
    AutoencoderKL::from_pretrained(dir, None, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading the autoencoder of {}", dir.display()))
}

/// The round trip of each snapshot in `dir/vae/snapshots/` (architecture from its
/// `config.json`) and of the trained folder `dir` (once written, at `final_step`), on the first
/// `n` held-out balanced images, in step order.
pub fn snapshot_curve(
    spec: &WorldSpec,
    dir: &Path,
    checker: &Checker,
    n: usize,
    final_step: usize,
) -> anyhow::Result<Vec<RoundTrip>> {
    checker.check_fits(spec)?;
    let snap_config = dir.join("vae").join("snapshots").join("config.json");
    let config = AutoencoderKLConfig::from_file(if snap_config.is_file() {
        snap_config
    } else {
        dir.join("vae").join("config.json")
    })?;
    let (images, samples) = balanced_images(spec, 0, n)?;
    let labels = labels_of(&checker.heads, &samples)?;
    let mut snaps: Vec<(usize, std::path::PathBuf)> =
        std::fs::read_dir(dir.join("vae").join("snapshots"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().to_string();
                        let step = name
                            .strip_prefix("step-")?
                            .strip_suffix(".safetensors")?
                            .parse()
                            .ok()?;
                        Some((step, e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
    snaps.sort();
    let mut out = Vec::new();
    for (step, path) in snaps {
        let vb = VarBuilder::from_tensors(
            candle_core::safetensors::load(&path, &Device::Cpu)?,
            DType::F32,
            &Device::Cpu,
        );
        let vae = AutoencoderKL::new(vb, &config)?;
        out.push(measure_round_trip(&vae, checker, &images, &labels, step)?);
    }
    // A run still training: its last checkpoint (parameters under `param.`).
    let ckpt = train::checkpoint_dir(&dir.join("vae"));
    let ckpt_step = checkpoint_step(&ckpt);
    if ckpt_step > out.last().map_or(0, |r| r.step) {
        let path = ckpt.join("checkpoint.safetensors");
        let vb = VarBuilder::from_tensors(
            candle_core::safetensors::load(&path, &Device::Cpu)?,
            DType::F32,
            &Device::Cpu,
        );
        let vae = AutoencoderKL::new(vb.pp("param"), &config)?;
        out.push(measure_round_trip(
            &vae, checker, &images, &labels, ckpt_step,
        )?);
    }
    // The final weights, once training has written them.
    if dir
        .join("vae")
        .join("diffusion_pytorch_model.safetensors")
        .is_file()
    {
        out.push(measure_round_trip(
            &load_vae(dir)?,
            checker,
            &images,
            &labels,
            final_step,
        )?);
    }
    if out.is_empty() {
        anyhow::bail!(
            "{}: no trained weights and no snapshots to measure",
            dir.join("vae").display()
        )
    }
    Ok(out)
}
