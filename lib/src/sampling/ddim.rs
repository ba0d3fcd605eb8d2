//! DDIM with `eta = 0` (deterministic), as diffusers' `DDIMScheduler`.

use candle_core::{bail, Result, Tensor};

use super::config::{
    check_step, lin, predict_x0_eps, spaced_timesteps, Defaults, Resolved, SchedulerConfig,
    TimestepSpacing,
};
use super::Scheduler;

const CLASS: &str = "DDIMScheduler";

/// `DDIMScheduler.__init__`'s defaults. Note `clip_sample = true`: a config that does not set it
/// to false is refused.
pub const DDIM_DEFAULTS: Defaults = Defaults {
    class: CLASS,
    num_train_timesteps: 1000,
    beta_start: 0.0001,
    beta_end: 0.02,
    beta_schedule: "linear",
    prediction_type: "epsilon",
    timestep_spacing: "leading",
    steps_offset: 0,
    set_alpha_to_one: true,
    clip_sample: true,
    original_inference_steps: 50,
    timestep_scaling: 10.0,
};

/// The scalars of one DDIM step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdimCoefficients {
    pub timestep: usize,
    /// `timestep - T / steps` (diffusers' rule, also for `trailing` spacing); negative past 0.
    pub prev_timestep: i64,
    pub alpha_prod_t: f64,
    /// `alphas_cumprod[prev]`, or the final alpha (1 or `alphas_cumprod[0]`) when `prev < 0`.
    pub alpha_prod_t_prev: f64,
}

/// Deterministic DDIM: `x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps`.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    cfg: Resolved,
    timesteps: Vec<usize>,
    timesteps_f64: Vec<f64>,
}

impl DdimScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            cfg: config.resolve(&DDIM_DEFAULTS)?,
            timesteps: vec![],
            timesteps_f64: vec![],
        })
    }

    /// The resolved config and noise schedule.
    pub fn config(&self) -> &Resolved {
        &self.cfg
    }

    fn final_alpha_cumprod(&self) -> f64 {
        if self.cfg.set_alpha_to_one {
            1.0
        } else {
            self.cfg.alphas_cumprod[0]
        }
    }

    /// The scalars used at step `step_index`.
    pub fn coefficients(&self, step_index: usize) -> Result<DdimCoefficients> {
        let n = self.timesteps.len();
        if step_index >= n {
            bail!("{CLASS}: step index {step_index} is out of range: set_timesteps gave {n} steps")
        }
        let t = self.timesteps[step_index];
        let prev = t as i64 - (self.cfg.num_train_timesteps / n) as i64;
        let alpha_prod_t_prev = if prev >= 0 {
            self.cfg.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod()
        };
        Ok(DdimCoefficients {
            timestep: t,
            prev_timestep: prev,
            alpha_prod_t: self.cfg.alphas_cumprod[t],
            alpha_prod_t_prev,
        })
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let t = self.cfg.num_train_timesteps;
        if steps == 0 || steps > t {
            bail!("{CLASS}: steps must be in 1..={t}, got {steps}")
        }
        let raw = spaced_timesteps(self.cfg.timestep_spacing, t, steps, self.cfg.steps_offset);
        let timesteps: Vec<usize> = raw
            .iter()
            .map(|&x| match self.cfg.timestep_spacing {
                TimestepSpacing::Linspace => x.round_ties_even() as usize,
                _ => x as usize,
            })
            .collect();
        if let Some(&bad) = timesteps.iter().find(|&&x| x >= t) {
            bail!("{CLASS}: timestep {bad} is past the training schedule (steps_offset too large?)")
        }
        self.timesteps_f64 = timesteps.iter().map(|&x| x as f64).collect();
        self.timesteps = timesteps;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f64
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn needs_noise(&self, _step_index: usize) -> bool {
        false
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
        let c = self.coefficients(step_index)?;
        let (x0, eps) = predict_x0_eps(
            self.cfg.prediction_type,
            c.alpha_prod_t,
            model_output,
            sample,
        )?;
        lin(
            c.alpha_prod_t_prev.sqrt(),
            &x0,
            (1.0 - c.alpha_prod_t_prev).sqrt(),
            &eps,
        )
    }
}
