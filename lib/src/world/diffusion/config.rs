//! [`UnetTrainConfig`]: the world UNet's architecture, objective, sampler and training, with
//! the diffusers `unet/config.json` and `scheduler/scheduler_config.json` it writes.

use serde::{Deserialize, Serialize};

use super::super::train::TrainConfig;
use crate::models::unet::UNet2DConditionConfig;
use crate::sampling::{DdimScheduler, Scheduler, SchedulerConfig};

/// Which timesteps training draws (the noise levels the model learns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSampling {
    /// Uniform over `0..num_train_timesteps` (DDPM, SD).
    Uniform,
    /// Only the `inference_steps` timesteps the sampler visits (the model is trained for the
    /// sampler it ships with; any other step count leaves its schedule).
    Inference,
}

/// The UNet's architecture and training (recorded in `unet/report.json`). Unknown keys are
/// refused and absent ones take the defaults, which are the default spec's choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnetTrainConfig {
    /// Seed of the initial weights, the batch order, the noise and the timesteps.
    pub seed: u64,
    /// Balanced images to train on: the first `train_images` from
    /// [`Self::train_start`] on whose (shape, colour, background) is not held out.
    pub train_images: usize,
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak AdamW learning rate (cosine decay to 0).
    pub lr: f64,
    pub weight_decay: f64,
    /// Write a resumable checkpoint every this many steps (and at the end).
    pub checkpoint_every: usize,

    /// diffusers' `block_out_channels`: one down and one up block each; the latents are halved
    /// `len − 1` times.
    pub block_out_channels: Vec<usize>,
    /// diffusers' `down_block_types` (`CrossAttnDownBlock2D` or `DownBlock2D`); the up blocks
    /// mirror them (`CrossAttnUpBlock2D` / `UpBlock2D`, in reverse order).
    pub down_block_types: Vec<String>,
    pub layers_per_block: usize,
    /// diffusers' `attention_head_dim`, which is the number of heads (its naming mistake).
    pub attention_head_dim: usize,
    pub norm_num_groups: usize,

    /// The objective and the noise schedule, as in diffusers' scheduler config:
    /// `"v_prediction"` or `"epsilon"`.
    pub prediction_type: String,
    pub num_train_timesteps: usize,
    /// `"scaled_linear"` (SD) or `"linear"`.
    pub beta_schedule: String,
    pub beta_start: f64,
    pub beta_end: f64,
    /// The shipped sampler: DDIM with this spacing (`"trailing"` starts at the last training
    /// timestep) and this many steps.
    pub timestep_spacing: String,
    pub inference_steps: usize,
    pub timestep_sampling: TimestepSampling,
}

impl Default for UnetTrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            train_images: 12000,
            epochs: 4,
            batch_size: 32,
            lr: 1e-3,
            weight_decay: 0.0,
            checkpoint_every: 100,
            block_out_channels: vec![32, 64, 64],
            // No attention at the latents' full resolution (16×16 for the default autoencoder):
            // it costs half the step there; shape, colour and background are read by the two
            // coarser levels and the mid block.
            down_block_types: vec![
                "DownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
            ],
            layers_per_block: 1,
            attention_head_dim: 4,
            norm_num_groups: 8,
            prediction_type: "v_prediction".into(),
            num_train_timesteps: 1000,
            beta_schedule: "scaled_linear".into(),
            beta_start: 0.00085,
            beta_end: 0.012,
            timestep_spacing: "trailing".into(),
            inference_steps: 4,
            timestep_sampling: TimestepSampling::Uniform,
        }
    }
}

impl UnetTrainConfig {
    /// First balanced index trained on: past the spec's balanced split, which `world truth`
    /// and the checker's and autoencoder's measurements use.
    pub fn train_start(&self, spec: &super::super::WorldSpec) -> usize {
        spec.splits.balanced
    }

    /// Refuses a config that cannot train, naming the field; `latent_size` is the side of the
    /// autoencoder's latents, `cross_attention_dim` the text encoder's width.
    pub fn check(&self, latent_size: usize, cross_attention_dim: usize) -> anyhow::Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.block_out_channels.contains(&0) {
            anyhow::bail!(
                "unet config: block_out_channels = {:?}: needs at least one positive width",
                self.block_out_channels
            )
        }
        if self.down_block_types.len() != n {
            anyhow::bail!(
                "unet config: down_block_types = {:?}: one per block_out_channels entry ({n})",
                self.down_block_types
            )
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "CrossAttnDownBlock2D" && *t != "DownBlock2D")
        {
            anyhow::bail!(
                "unet config: down_block_types: `{t}` is not CrossAttnDownBlock2D or DownBlock2D"
            )
        }
        if !self
            .down_block_types
            .iter()
            .any(|t| t.starts_with("CrossAttn"))
        {
            // The mid block always cross-attends, but a text-conditioned model should see the
            // prompt at more than the coarsest scale; refuse the likely mistake.
            anyhow::bail!(
                "unet config: down_block_types = {:?}: no block cross-attends to the text",
                self.down_block_types
            )
        }
        if latent_size == 0 || !latent_size.is_multiple_of(1 << (n - 1)) {
            anyhow::bail!(
                "unet config: block_out_channels = {:?}: {n} blocks halve the latents {} times, \
                 but the latent side {latent_size} is not divisible by {}",
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
                "unet config: norm_num_groups = {}: must divide every block width {:?}",
                self.norm_num_groups,
                self.block_out_channels
            )
        }
        if self.attention_head_dim == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| c % self.attention_head_dim != 0)
        {
            anyhow::bail!(
                "unet config: attention_head_dim = {} (the number of heads): must divide every \
                 block width {:?}",
                self.attention_head_dim,
                self.block_out_channels
            )
        }
        if self.layers_per_block == 0 {
            anyhow::bail!("unet config: layers_per_block = 0: must be positive")
        }
        if self.train_images == 0 || self.epochs == 0 || self.batch_size == 0 {
            anyhow::bail!(
                "unet config: train_images = {}, epochs = {}, batch_size = {}: must be positive",
                self.train_images,
                self.epochs,
                self.batch_size
            )
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            anyhow::bail!("unet config: lr = {}: must be a positive number", self.lr)
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            anyhow::bail!(
                "unet config: weight_decay = {}: must be >= 0",
                self.weight_decay
            )
        }
        if self.prediction_type != "epsilon" && self.prediction_type != "v_prediction" {
            anyhow::bail!(
                "unet config: prediction_type = {:?}: expected \"epsilon\" or \"v_prediction\"",
                self.prediction_type
            )
        }
        if self.inference_steps == 0 || self.inference_steps > self.num_train_timesteps {
            anyhow::bail!(
                "unet config: inference_steps = {}: must be in 1..={}",
                self.inference_steps,
                self.num_train_timesteps
            )
        }
        // The scheduler names its own bad fields (beta_schedule, timestep_spacing, ...).
        let mut scheduler = DdimScheduler::new(&self.scheduler_config())
            .map_err(|e| anyhow::anyhow!("unet config: {e}"))?;
        scheduler
            .set_timesteps(self.inference_steps)
            .map_err(|e| anyhow::anyhow!("unet config: {e}"))?;
        let cfg = self.model_config(latent_size, cross_attention_dim)?;
        cfg.check()
            .map_err(|e| anyhow::anyhow!("unet config: {e}"))?;
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

    /// The up blocks' types: the down blocks' mirrored.
    pub fn up_block_types(&self) -> Vec<String> {
        self.down_block_types
            .iter()
            .rev()
            .map(|t| t.replace("Down", "Up"))
            .collect()
    }

    /// diffusers' `unet/config.json` for latents of side `latent_size` with `latent_channels`
    /// channels and a text encoder of width `cross_attention_dim`.
    pub fn diffusers_config(
        &self,
        latent_size: usize,
        latent_channels: usize,
        cross_attention_dim: usize,
    ) -> serde_json::Value {
        serde_json::json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.30.0",
            "sample_size": latent_size,
            "in_channels": latent_channels,
            "out_channels": latent_channels,
            "center_input_sample": false,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "down_block_types": self.down_block_types,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": self.up_block_types(),
            "only_cross_attention": false,
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
            "act_fn": "silu",
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": 1e-5,
            "cross_attention_dim": cross_attention_dim,
            "attention_head_dim": self.attention_head_dim,
            "use_linear_projection": false,
            "upcast_attention": false,
        })
    }

    /// The model config (4 latent channels unless the autoencoder says otherwise: see
    /// [`Self::model_config_for`]).
    pub fn model_config(
        &self,
        latent_size: usize,
        cross_attention_dim: usize,
    ) -> anyhow::Result<UNet2DConditionConfig> {
        self.model_config_for(latent_size, 4, cross_attention_dim)
    }

    pub fn model_config_for(
        &self,
        latent_size: usize,
        latent_channels: usize,
        cross_attention_dim: usize,
    ) -> anyhow::Result<UNet2DConditionConfig> {
        Ok(serde_json::from_value(self.diffusers_config(
            latent_size,
            latent_channels,
            cross_attention_dim,
        ))?)
    }

    /// diffusers' `scheduler/scheduler_config.json`: a `DDIMScheduler` with the training noise
    /// schedule, the objective and the spacing; `clip_sample` false as SD's (clamping would cut
    /// DiffExplainer's gradient).
    pub fn scheduler_json(&self) -> serde_json::Value {
        serde_json::json!({
            "_class_name": "DDIMScheduler",
            "_diffusers_version": "0.30.0",
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "trained_betas": null,
            "clip_sample": false,
            "set_alpha_to_one": false,
            "steps_offset": 1,
            "prediction_type": self.prediction_type,
            "thresholding": false,
            "timestep_spacing": self.timestep_spacing,
            "rescale_betas_zero_snr": false,
        })
    }

    pub fn scheduler_config(&self) -> SchedulerConfig {
        serde_json::from_value(self.scheduler_json()).expect("a scheduler config")
    }
}
