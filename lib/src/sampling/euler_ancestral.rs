//! Euler ancestral sampling in the sigma (variance-exploding) parameterization, as diffusers'
//! `EulerAncestralDiscreteScheduler` (SD-Turbo: 1 step from timestep 999, trailing spacing).
//!
//! The sample lives at scale `sigma`: the initial noise is multiplied by `init_noise_sigma` and
//! the denoiser sees `x / sqrt(sigma^2 + 1)` ([`Scheduler::scale_model_input`]). Each step is an
//! Euler step of the probability-flow ODE down to `sigma_down`, plus `sigma_up * z` with a given
//! noise `z`; at the last step `sigma_up = 0`, so a 1-step run needs no noise.

use candle_core::{bail, Result, Tensor};

use super::config::{
    check_step, lin, required_noise, spaced_timesteps, Defaults, PredictionType, Resolved,
    SchedulerConfig, TimestepSpacing,
};
use super::Scheduler;

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// `EulerAncestralDiscreteScheduler.__init__`'s defaults (note `linspace` spacing).
pub const EULER_ANCESTRAL_DEFAULTS: Defaults = Defaults {
    class: CLASS,
    num_train_timesteps: 1000,
    beta_start: 0.0001,
    beta_end: 0.02,
    beta_schedule: "linear",
    prediction_type: "epsilon",
    timestep_spacing: "linspace",
    steps_offset: 0,
    set_alpha_to_one: false,
    clip_sample: false,
    original_inference_steps: 50,
    timestep_scaling: 10.0,
};

/// The scalars of one Euler ancestral step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EulerAncestralCoefficients {
    pub timestep: f64,
    pub sigma: f64,
    /// The next sigma of the schedule (0 after the last step).
    pub sigma_next: f64,
    /// `sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)`: the noise added.
    pub sigma_up: f64,
    /// `sqrt(sigma_next^2 - sigma_up^2)`: where the deterministic Euler step lands.
    pub sigma_down: f64,
}

/// diffusers' `EulerAncestralDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct EulerAncestralScheduler {
    cfg: Resolved,
    timesteps: Vec<f64>,
    /// One per step, then 0 (f32-rounded like diffusers').
    sigmas: Vec<f64>,
}

impl EulerAncestralScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let cfg = config.resolve(&EULER_ANCESTRAL_DEFAULTS)?;
        if cfg.prediction_type == PredictionType::Sample {
            bail!("{CLASS}: prediction_type \"sample\" is not implemented (nor is it in diffusers)")
        }
        Ok(Self {
            cfg,
            timesteps: vec![],
            sigmas: vec![],
        })
    }

    pub fn config(&self) -> &Resolved {
        &self.cfg
    }

    /// `sqrt((1 - a) / a)` for every training timestep, in f32 like diffusers.
    fn train_sigmas(&self) -> Vec<f64> {
        self.cfg
            .alphas_cumprod
            .iter()
            .map(|&a| {
                let a = a as f32;
                ((1.0f32 - a) / a).sqrt() as f64
            })
            .collect()
    }

    /// The sigmas of the schedule: one per step, then 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The scalars used at step `step_index`.
    pub fn coefficients(&self, step_index: usize) -> Result<EulerAncestralCoefficients> {
        let n = self.timesteps.len();
        if step_index >= n {
            bail!("{CLASS}: step index {step_index} is out of range: set_timesteps gave {n} steps")
        }
        let sigma = self.sigmas[step_index];
        let sigma_next = self.sigmas[step_index + 1];
        let sigma_up = (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next)
            / (sigma * sigma))
            .max(0.0)
            .sqrt();
        let sigma_down = (sigma_next * sigma_next - sigma_up * sigma_up)
            .max(0.0)
            .sqrt();
        Ok(EulerAncestralCoefficients {
            timestep: self.timesteps[step_index],
            sigma,
            sigma_next,
            sigma_up,
            sigma_down,
        })
    }
}

/// `np.interp(x, arange(len(fp)), fp)`.
fn interp(x: f64, fp: &[f64]) -> f64 {
    if x <= 0.0 {
        return fp[0];
    }
    let last = fp.len() - 1;
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    let frac = x - j as f64;
    if frac == 0.0 {
        fp[j]
    } else {
        fp[j] + (fp[j + 1] - fp[j]) * frac
    }
}

impl Scheduler for EulerAncestralScheduler {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let t = self.cfg.num_train_timesteps;
        if steps == 0 || steps > t {
            bail!("{CLASS}: steps must be in 1..={t}, got {steps}")
        }
        // diffusers stores these timesteps as f32.
        let timesteps: Vec<f64> =
            spaced_timesteps(self.cfg.timestep_spacing, t, steps, self.cfg.steps_offset)
                .into_iter()
                .map(|x| x as f32 as f64)
                .collect();
        let train = self.train_sigmas();
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&x| interp(x, &train) as f32 as f64)
            .collect();
        sigmas.push(0.0);
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The largest sigma (`linspace`, `trailing`), or `sqrt(max^2 + 1)` (`leading`).
    fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().cloned().fold(0.0, f64::max);
        match self.cfg.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        }
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = self.coefficients(step_index)?.sigma;
        sample.affine(1.0 / (sigma * sigma + 1.0).sqrt(), 0.0)
    }

    /// Every step with `sigma_up > 0`, i.e. all but the last.
    fn needs_noise(&self, step_index: usize) -> bool {
        self.coefficients(step_index)
            .map(|c| c.sigma_up > 0.0)
            .unwrap_or(false)
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
        let sigma = c.sigma;
        // The ODE derivative (x - x0) / sigma, written directly in the model output.
        let derivative = match self.cfg.prediction_type {
            // x0 = x - sigma * eps
            PredictionType::Epsilon => model_output.clone(),
            // x0 = -sigma / sqrt(sigma^2 + 1) * v + x / (sigma^2 + 1)
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                lin(
                    (1.0 - 1.0 / s2) / sigma,
                    sample,
                    1.0 / s2.sqrt(),
                    model_output,
                )?
            }
            PredictionType::Sample => unreachable!("rejected in new"),
        };
        let prev = lin(1.0, sample, c.sigma_down - sigma, &derivative)?;
        if c.sigma_up > 0.0 {
            let z = required_noise(CLASS, step_index, noise)?;
            lin(1.0, &prev, c.sigma_up, z)
        } else {
            Ok(prev)
        }
    }
}
