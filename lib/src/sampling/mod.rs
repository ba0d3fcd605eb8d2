//! Schedulers and the differentiable sampling loop.
//!
//! A scheduler is a small config-driven object, knowing nothing of models: `set_timesteps(n)`
//! fixes the schedule, `step` maps (model output, sample) to the previous sample with candle
//! tensor ops, so gradients flow through it to both. Randomness is never drawn inside: the noise
//! a step adds (LCM, Euler ancestral) is passed in, so a sampling run from fixed initial noise and
//! a fixed noise sequence is a deterministic, differentiable function of the conditioning.
//! Each scheduler matches diffusers 0.42.1 step by step (`tests/schedulers.rs`).
//!
//! - [`DdimScheduler`]: DDIM, eta = 0.
//! - [`LcmScheduler`]: LCM multi-step (LCM-LoRA, 4 steps).
//! - [`EulerAncestralScheduler`]: Euler ancestral (SD-Turbo, 1 step).
//! - [`sample`]: the loop that composes a scheduler with any denoiser closure.

pub mod config;
pub mod ddim;
pub mod euler_ancestral;
pub mod lcm;
pub mod sampler;

pub use config::{PredictionType, SchedulerConfig, TimestepSpacing};
pub use ddim::{DdimCoefficients, DdimScheduler};
pub use euler_ancestral::{EulerAncestralCoefficients, EulerAncestralScheduler};
pub use lcm::{LcmCoefficients, LcmScheduler};
pub use sampler::{sample, SampleOutput, SamplerOptions};

use std::path::Path;

use candle_core::{bail, Result, Tensor};

/// A diffusion scheduler: the schedule of timesteps and the update between them.
///
/// Steps are addressed by their index in [`Scheduler::timesteps`] (not by timestep value, which
/// diffusers uses to look the index up), so a step is a pure function of its arguments.
pub trait Scheduler {
    /// Computes the schedule for `steps` inference steps.
    fn set_timesteps(&mut self, steps: usize) -> Result<()>;

    /// The timesteps the denoiser is given, one per step (empty before `set_timesteps`).
    fn timesteps(&self) -> &[f64];

    /// The standard deviation the initial noise is scaled to.
    fn init_noise_sigma(&self) -> f64;

    /// What the denoiser sees at step `step_index` for the current `sample` (identity for
    /// DDIM and LCM).
    fn scale_model_input(&self, sample: &Tensor, _step_index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    /// Whether step `step_index` adds noise (and so needs a `noise` tensor).
    fn needs_noise(&self, step_index: usize) -> bool;

    /// The sample at the next (less noisy) timestep. `noise` is required where
    /// [`Scheduler::needs_noise`] says so and ignored elsewhere; it has the sample's shape.
    fn step(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor>;
}

/// The schedulers implemented, by diffusers class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Lcm,
    EulerAncestral,
}

impl SchedulerKind {
    /// The kind for a diffusers class name (`"LCMScheduler"`, ...).
    pub fn from_class_name(name: &str) -> Result<Self> {
        Ok(match name {
            "DDIMScheduler" => Self::Ddim,
            "LCMScheduler" => Self::Lcm,
            "EulerAncestralDiscreteScheduler" => Self::EulerAncestral,
            other => bail!(
                "scheduler class `{other}` is not implemented (DDIMScheduler, LCMScheduler, \
                 EulerAncestralDiscreteScheduler are)"
            ),
        })
    }

    /// Builds this kind of scheduler from any scheduler config, as diffusers'
    /// `Kind.from_config(config)` (e.g. LCM from an SD 1.5 PNDM config).
    pub fn build(self, config: &SchedulerConfig) -> Result<Box<dyn Scheduler + Send + Sync>> {
        Ok(match self {
            Self::Ddim => Box::new(DdimScheduler::new(config)?),
            Self::Lcm => Box::new(LcmScheduler::new(config)?),
            Self::EulerAncestral => Box::new(EulerAncestralScheduler::new(config)?),
        })
    }
}

impl<S: Scheduler + ?Sized> Scheduler for Box<S> {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        (**self).set_timesteps(steps)
    }
    fn timesteps(&self) -> &[f64] {
        (**self).timesteps()
    }
    fn init_noise_sigma(&self) -> f64 {
        (**self).init_noise_sigma()
    }
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        (**self).scale_model_input(sample, step_index)
    }
    fn needs_noise(&self, step_index: usize) -> bool {
        (**self).needs_noise(step_index)
    }
    fn step(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        (**self).step(model_output, step_index, sample, noise)
    }
}

impl SchedulerConfig {
    /// Reads `<dir>/scheduler/scheduler_config.json` of a diffusers model folder.
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(crate::pretrained::config_path(
            dir,
            &crate::pretrained::SCHEDULER,
        )?)
    }
}

/// The scheduler of a diffusers model folder: `kind` built from
/// `<dir>/scheduler/scheduler_config.json` (as diffusers' `Kind.from_config(config)`), or, with
/// `kind = None`, the class the file names (`_class_name`). SD 1.5 ships a `PNDMScheduler`
/// config, which is not implemented: pass the kind to run (e.g. [`SchedulerKind::Lcm`] for
/// LCM-LoRA).
pub fn scheduler_from_pretrained(
    dir: impl AsRef<Path>,
    kind: Option<SchedulerKind>,
) -> Result<Box<dyn Scheduler + Send + Sync>> {
    let dir = dir.as_ref();
    let config = SchedulerConfig::from_pretrained(dir)?;
    let kind = match kind {
        Some(k) => k,
        None => {
            let path = dir.join("scheduler/scheduler_config.json");
            let Some(class) = config.class_name.as_deref() else {
                bail!(
                    "{}: no `_class_name`; name the scheduler kind to build",
                    path.display()
                )
            };
            SchedulerKind::from_class_name(class).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "{}: {e}; name the scheduler kind to build instead (any of them reads \
                     this config)",
                    path.display()
                ))
            })?
        }
    };
    kind.build(&config)
}
