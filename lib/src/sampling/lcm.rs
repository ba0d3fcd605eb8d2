//! Latent Consistency Model multi-step sampling, as diffusers' `LCMScheduler` (what DiffExplainer
//! runs with LCM-LoRA on SD 1.5, 4 steps: timesteps 999, 759, 499, 259).
//!
//! Each step maps the sample to the consistency function's estimate of the clean sample,
//! `denoised = c_out(t) * x0 + c_skip(t) * x_t`, then (except at the last step) re-noises it to
//! the next timestep: `x_prev = sqrt(a_prev) * denoised + sqrt(1 - a_prev) * z`. Here `z` is
//! given, not drawn: with a fixed noise sequence the whole path is a deterministic,
//! differentiable function of the model outputs.

use candle_core::{bail, Result, Tensor};

use super::config::{
    check_step, lin, predict_x0_eps, required_noise, Defaults, Resolved, SchedulerConfig,
};
use super::Scheduler;

const CLASS: &str = "LCMScheduler";

/// `LCMScheduler.__init__`'s defaults.
pub const LCM_DEFAULTS: Defaults = Defaults {
    class: CLASS,
    num_train_timesteps: 1000,
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: "scaled_linear",
    prediction_type: "epsilon",
    timestep_spacing: "leading",
    steps_offset: 0,
    set_alpha_to_one: true,
    clip_sample: false,
    original_inference_steps: 50,
    timestep_scaling: 10.0,
};

/// The consistency model's `sigma_data`.
const SIGMA_DATA: f64 = 0.5;

/// The scalars of one LCM step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LcmCoefficients {
    pub timestep: usize,
    /// The next timestep of the schedule; the current one at the last step.
    pub prev_timestep: usize,
    pub alpha_prod_t: f64,
    pub alpha_prod_t_prev: f64,
    /// `sigma_data^2 / ((t * timestep_scaling)^2 + sigma_data^2)`.
    pub c_skip: f64,
    /// `t * timestep_scaling / sqrt((t * timestep_scaling)^2 + sigma_data^2)`.
    pub c_out: f64,
}

/// diffusers' `LCMScheduler` with `strength = 1` and no custom timesteps.
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    cfg: Resolved,
    timesteps: Vec<usize>,
    timesteps_f64: Vec<f64>,
}

impl LcmScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            cfg: config.resolve(&LCM_DEFAULTS)?,
            timesteps: vec![],
            timesteps_f64: vec![],
        })
    }

    pub fn config(&self) -> &Resolved {
        &self.cfg
    }

    /// The scalars used at step `step_index`.
    pub fn coefficients(&self, step_index: usize) -> Result<LcmCoefficients> {
        let n = self.timesteps.len();
        if step_index >= n {
            bail!("{CLASS}: step index {step_index} is out of range: set_timesteps gave {n} steps")
        }
        let t = self.timesteps[step_index];
        let prev = self.timesteps.get(step_index + 1).copied().unwrap_or(t);
        let scaled = t as f64 * self.cfg.timestep_scaling;
        let denom = scaled * scaled + SIGMA_DATA * SIGMA_DATA;
        Ok(LcmCoefficients {
            timestep: t,
            prev_timestep: prev,
            alpha_prod_t: self.cfg.alphas_cumprod[t],
            alpha_prod_t_prev: self.cfg.alphas_cumprod[prev],
            c_skip: SIGMA_DATA * SIGMA_DATA / denom,
            c_out: scaled / denom.sqrt(),
        })
    }

    /// The step's consistency estimate of the clean sample (diffusers' `denoised`).
    pub fn denoised(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        check_step(
            CLASS,
            self.timesteps.len(),
            step_index,
            model_output,
            sample,
            None,
        )?;
        let c = self.coefficients(step_index)?;
        let (x0, _) = predict_x0_eps(
            self.cfg.prediction_type,
            c.alpha_prod_t,
            model_output,
            sample,
        )?;
        lin(c.c_out, &x0, c.c_skip, sample)
    }
}

impl Scheduler for LcmScheduler {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let t = self.cfg.num_train_timesteps;
        let original = self.cfg.original_inference_steps;
        if original == 0 || original > t {
            bail!("{CLASS}: original_inference_steps must be in 1..={t}, got {original}")
        }
        if steps == 0 || steps > original {
            bail!(
                "{CLASS}: steps must be in 1..={original} (original_inference_steps), got {steps}"
            )
        }
        // The distillation schedule: k - 1, 2k - 1, ..., original * k - 1, read backwards.
        let k = t / original;
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        // np.floor(np.linspace(0, len, steps, endpoint=False)) picks evenly spaced indices.
        let spacing = origin.len() as f64 / steps as f64;
        self.timesteps = (0..steps)
            .map(|i| origin[(i as f64 * spacing).floor() as usize])
            .collect();
        self.timesteps_f64 = self.timesteps.iter().map(|&x| x as f64).collect();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f64
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Every step but the last re-noises.
    fn needs_noise(&self, step_index: usize) -> bool {
        step_index + 1 < self.timesteps.len()
    }

    fn step(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        check_step(
            CLASS,
            self.timesteps.len(),
            step_index,
            model_output,
            sample,
            noise,
        )?;
        let denoised = self.denoised(model_output, step_index, sample)?;
        if !self.needs_noise(step_index) {
            return Ok(denoised);
        }
        let z = required_noise(CLASS, step_index, noise)?;
        let a_prev = self.coefficients(step_index)?.alpha_prod_t_prev;
        lin(a_prev.sqrt(), &denoised, (1.0 - a_prev).sqrt(), z)
    }
}
