//! diffusers' `scheduler/scheduler_config.json`, and the noise schedule it defines.
//!
//! One config file serves every scheduler class: a Stable Diffusion 1.5 folder ships a PNDM
//! config, and `LCMScheduler.from_config(that)` reads the fields it knows and takes its own
//! defaults for the rest. [`SchedulerConfig`] keeps every field optional for that reason; each
//! scheduler resolves it against its class's defaults ([`Defaults`]), exactly as diffusers does.
//!
//! The betas and `alphas_cumprod` are computed the way torch does on CPU (f32 `linspace`, f32
//! square, cumulative product accumulated in f64 and stored as f32), so they match diffusers to
//! the last bit; the scheduler arithmetic after that runs in f64.

use std::path::Path;

use candle_core::{bail, Result, Tensor};
use serde::Deserialize;

/// The fields of a diffusers scheduler config that these schedulers read. Unknown fields (e.g.
/// PNDM's `skip_prk_steps`) are ignored, as `from_config` ignores them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchedulerConfig {
    /// The class the file was written for (`"PNDMScheduler"`); informative only.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    /// `"linear"` or `"scaled_linear"`.
    pub beta_schedule: Option<String>,
    /// Explicit betas, overriding `beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    /// `"epsilon"`, `"v_prediction"` or `"sample"`.
    pub prediction_type: Option<String>,
    /// `"leading"`, `"trailing"` or `"linspace"` (LCM ignores it).
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    /// DDIM/LCM: whether the step past timestep 0 uses `alphas_cumprod = 1`.
    pub set_alpha_to_one: Option<bool>,
    /// Must be false: clamping the predicted sample cuts its gradient.
    pub clip_sample: Option<bool>,
    /// Must be false (dynamic thresholding is not implemented).
    pub thresholding: Option<bool>,
    /// Must be false (not implemented).
    pub rescale_betas_zero_snr: Option<bool>,
    /// LCM: the distillation schedule's number of steps (50 for LCM-LoRA).
    pub original_inference_steps: Option<usize>,
    /// LCM: multiplies the timestep in the boundary-condition scalings (10 by default).
    pub timestep_scaling: Option<f64>,
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        crate::pretrained::read_config(path, |value| {
            serde_json::from_value(value)
                .map_err(|e| candle_core::Error::Msg(format!("invalid scheduler config: {e}")))
        })
    }

    /// Parses the JSON text of a `scheduler_config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text)
            .map_err(|e| candle_core::Error::Msg(format!("invalid scheduler config: {e}")))
    }
}

/// What the denoiser predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise (SD 1.5, SD-Turbo, LCM-LoRA).
    Epsilon,
    /// `v = sqrt(alpha) * noise - sqrt(1 - alpha) * x0` (SD 2.1 768).
    VPrediction,
    /// The clean sample itself.
    Sample,
}

/// How inference timesteps are spread over the training timesteps (Table 2 of "Common Diffusion
/// Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// A scheduler class's constructor defaults (what applies when the config omits a field).
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub class: &'static str,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: &'static str,
    pub prediction_type: &'static str,
    pub timestep_spacing: &'static str,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    pub clip_sample: bool,
    pub original_inference_steps: usize,
    pub timestep_scaling: f64,
}

/// A config resolved against a class's defaults, with the noise schedule computed.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub num_train_timesteps: usize,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    pub original_inference_steps: usize,
    pub timestep_scaling: f64,
    /// `prod_{s <= t} (1 - beta_s)`, f32-exact like torch's, one per training timestep.
    pub alphas_cumprod: Vec<f64>,
}

impl SchedulerConfig {
    /// Resolves every field against `d`, rejecting settings that are not implemented or that
    /// would cut gradients.
    pub fn resolve(&self, d: &Defaults) -> Result<Resolved> {
        let class = d.class;
        let num_train_timesteps = self.num_train_timesteps.unwrap_or(d.num_train_timesteps);
        if num_train_timesteps < 2 {
            bail!("{class}: num_train_timesteps must be at least 2, got {num_train_timesteps}")
        }
        if self.clip_sample.unwrap_or(d.clip_sample) {
            bail!(
                "{class}: clip_sample = true clamps the predicted sample, which cuts its gradient; \
                 set \"clip_sample\": false in the scheduler config (all Stable Diffusion configs do)"
            )
        }
        if self.thresholding == Some(true) {
            bail!("{class}: thresholding = true is not implemented (it also cuts gradients)")
        }
        if self.rescale_betas_zero_snr == Some(true) {
            bail!("{class}: rescale_betas_zero_snr = true is not implemented")
        }
        let betas = match &self.trained_betas {
            Some(b) => {
                if b.len() != num_train_timesteps {
                    bail!(
                        "{class}: trained_betas has {} entries but num_train_timesteps is {num_train_timesteps}",
                        b.len()
                    )
                }
                b.iter().map(|&x| x as f32).collect()
            }
            None => {
                let start = self.beta_start.unwrap_or(d.beta_start);
                let end = self.beta_end.unwrap_or(d.beta_end);
                match self.beta_schedule.as_deref().unwrap_or(d.beta_schedule) {
                    "linear" => torch_linspace_f32(start, end, num_train_timesteps),
                    "scaled_linear" => {
                        torch_linspace_f32(start.sqrt(), end.sqrt(), num_train_timesteps)
                            .into_iter()
                            .map(|b| b * b)
                            .collect()
                    }
                    other => bail!(
                        "{class}: beta_schedule \"{other}\" is not implemented (use \"linear\" or \"scaled_linear\")"
                    ),
                }
            }
        };
        let prediction_type = match self.prediction_type.as_deref().unwrap_or(d.prediction_type) {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            "sample" => PredictionType::Sample,
            other => bail!(
                "{class}: prediction_type \"{other}\" is unknown (expected \"epsilon\", \"v_prediction\" or \"sample\")"
            ),
        };
        let timestep_spacing = match self.timestep_spacing.as_deref().unwrap_or(d.timestep_spacing)
        {
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            "linspace" => TimestepSpacing::Linspace,
            other => bail!(
                "{class}: timestep_spacing \"{other}\" is unknown (expected \"leading\", \"trailing\" or \"linspace\")"
            ),
        };
        Ok(Resolved {
            num_train_timesteps,
            prediction_type,
            timestep_spacing,
            steps_offset: self.steps_offset.unwrap_or(d.steps_offset),
            set_alpha_to_one: self.set_alpha_to_one.unwrap_or(d.set_alpha_to_one),
            original_inference_steps: self
                .original_inference_steps
                .unwrap_or(d.original_inference_steps),
            timestep_scaling: self.timestep_scaling.unwrap_or(d.timestep_scaling),
            alphas_cumprod: cumprod_f32(&betas),
        })
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` on CPU, bit for bit: the step is computed in
/// f32, the first half counts up from `start`, the second half down from `end`.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// `torch.cumprod(1 - betas)` in f32 (torch accumulates in f64 on CPU and stores f32).
fn cumprod_f32(betas: &[f32]) -> Vec<f64> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32 as f64
        })
        .collect()
}

/// The unrounded, descending inference timesteps for a spacing, as diffusers computes them with
/// numpy (`leading` and `trailing` are whole numbers; `linspace` is not rounded here).
pub(crate) fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    steps: usize,
    steps_offset: usize,
) -> Vec<f64> {
    let t = num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => {
            // np.linspace(0, T - 1, n)[::-1]: i * step, with the endpoint exact.
            let stop = (t - 1) as f64;
            let mut v: Vec<f64> = if steps == 1 {
                vec![0.0]
            } else {
                let step = stop / (steps - 1) as f64;
                let mut v: Vec<f64> = (0..steps).map(|i| i as f64 * step).collect();
                v[steps - 1] = stop;
                v
            };
            v.reverse();
            v
        }
        TimestepSpacing::Leading => {
            // (np.arange(n) * (T // n)).round()[::-1] + steps_offset
            let ratio = t / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            // np.round(np.arange(T, 0, -T / n)) - 1
            let step = -(t as f64 / steps as f64);
            let len = ((0.0 - t as f64) / step).ceil().max(0.0) as usize;
            (0..len)
                .map(|i| (t as f64 + i as f64 * step).round_ties_even() - 1.0)
                .collect()
        }
    }
}

/// `a * x + b * y`, differentiable in both tensors.
pub(crate) fn lin(a: f64, x: &Tensor, b: f64, y: &Tensor) -> Result<Tensor> {
    x.affine(a, 0.0)?.add(&y.affine(b, 0.0)?)
}

/// Checks a step's inputs: the step index is in range and the shapes agree.
pub(crate) fn check_step(
    class: &str,
    steps: usize,
    step_index: usize,
    model_output: &Tensor,
    sample: &Tensor,
    noise: Option<&Tensor>,
) -> Result<()> {
    if steps == 0 {
        bail!("{class}: call set_timesteps before step")
    }
    if step_index >= steps {
        bail!("{class}: step index {step_index} is out of range: set_timesteps gave {steps} steps")
    }
    if model_output.dims() != sample.dims() {
        bail!(
            "{class}: model output has shape {:?} but the sample has shape {:?}",
            model_output.dims(),
            sample.dims()
        )
    }
    if let Some(n) = noise {
        if n.dims() != sample.dims() {
            bail!(
                "{class}: noise for step {step_index} has shape {:?} but the sample has shape {:?}",
                n.dims(),
                sample.dims()
            )
        }
    }
    Ok(())
}

/// The noise a step needs, or an error saying that the step needs one.
pub(crate) fn required_noise<'a>(
    class: &str,
    step_index: usize,
    noise: Option<&'a Tensor>,
) -> Result<&'a Tensor> {
    noise.ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{class}: step {step_index} adds noise; pass a fixed noise tensor (the sampler takes \
             them up front in SamplerOptions::step_noises so the path stays deterministic)"
        ))
    })
}

/// The predicted clean sample `x0` and noise `eps` from a model output, given `alpha_prod_t`.
pub(crate) fn predict_x0_eps(
    prediction: PredictionType,
    alpha_prod_t: f64,
    model_output: &Tensor,
    sample: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let sa = alpha_prod_t.sqrt();
    let sb = (1.0 - alpha_prod_t).sqrt();
    Ok(match prediction {
        PredictionType::Epsilon => (
            lin(1.0 / sa, sample, -sb / sa, model_output)?,
            model_output.clone(),
        ),
        PredictionType::Sample => (
            model_output.clone(),
            lin(1.0 / sb, sample, -sa / sb, model_output)?,
        ),
        PredictionType::VPrediction => (
            lin(sa, sample, -sb, model_output)?,
            lin(sb, sample, sa, model_output)?,
        ),
    })
}
