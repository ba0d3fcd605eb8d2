//! The differentiable sampling loop: a scheduler composed with any denoiser.
//!
//! Every step is candle tensor ops, so the final latents are a differentiable function of the
//! conditioning (and of the denoiser's parameters). The initial noise and the per-step noises are
//! fixed up front, which makes the run deterministic: the same conditioning gives the same image,
//! and the gradient is that of a fixed function (what DiffExplainer optimizes the soft prompt
//! against).

use candle_core::{bail, Result, Tensor};

use super::Scheduler;

/// How to run the loop.
#[derive(Debug, Clone, Default)]
pub struct SamplerOptions {
    /// Number of inference steps (`set_timesteps(steps)`).
    pub steps: usize,
    /// Classifier-free guidance: `None` (the default) runs the denoiser once per step on `cond`;
    /// `Some(s)` runs it on the batch `[uncond; cond]` and uses
    /// `eps_uncond + s * (eps_cond - eps_uncond)`. (Unlike diffusers' pipelines, which switch
    /// guidance off for `s <= 1`, `Some(s)` always runs the doubled batch.)
    pub guidance_scale: Option<f64>,
    /// The unconditional embedding for guidance (batch 1 is broadcast to `cond`'s batch).
    pub uncond: Option<Tensor>,
    /// `step_noises[i]` is added at step `i` by schedulers that re-noise (LCM, Euler ancestral);
    /// each has the latents' shape. Entries for steps that add no noise are ignored, so one per
    /// step is always enough (LCM and Euler ancestral need none at the last step).
    pub step_noises: Vec<Tensor>,
    /// Keep the latents after every step in [`SampleOutput::intermediates`].
    pub keep_intermediates: bool,
    /// Detach the denoiser's input latents at every step (the authors' code does): the
    /// gradient then reaches the conditioning only through each step's denoiser call on a
    /// constant input and through the scheduler's own update, never back through an earlier
    /// denoiser call. `false` (the default) differentiates through the whole chain.
    pub detach_model_input: bool,
}

impl SamplerOptions {
    /// `steps` steps, no guidance, no step noises.
    pub fn new(steps: usize) -> Self {
        Self {
            steps,
            ..Self::default()
        }
    }

    /// Classifier-free guidance with scale `scale` against the embedding `uncond`.
    pub fn with_guidance(mut self, scale: f64, uncond: Tensor) -> Self {
        self.guidance_scale = Some(scale);
        self.uncond = Some(uncond);
        self
    }

    pub fn with_step_noises(mut self, noises: Vec<Tensor>) -> Self {
        self.step_noises = noises;
        self
    }

    /// See [`SamplerOptions::detach_model_input`].
    pub fn with_detached_model_input(mut self, detach: bool) -> Self {
        self.detach_model_input = detach;
        self
    }

    pub fn with_intermediates(mut self) -> Self {
        self.keep_intermediates = true;
        self
    }
}

/// The result of a sampling run.
#[derive(Debug, Clone)]
pub struct SampleOutput {
    /// The final latents.
    pub latents: Tensor,
    /// The latents after each step (empty unless `keep_intermediates`).
    pub intermediates: Vec<Tensor>,
}

/// Runs `options.steps` steps of `scheduler` from `initial_noise` (standard normal; scaled here
/// by the scheduler's `init_noise_sigma`), calling `denoiser(model_input, timestep, cond)` once
/// per step, and returns the final latents.
///
/// The denoiser receives the scheduler-scaled latents ([`Scheduler::scale_model_input`]), the
/// step's timestep as f64, and the conditioning (with guidance, the batch `[uncond; cond]`
/// against latents repeated twice); it returns the model output (noise, v or sample, as the
/// scheduler's `prediction_type` says) with the latents' shape.
pub fn sample<S, D>(
    scheduler: &mut S,
    denoiser: D,
    initial_noise: &Tensor,
    cond: &Tensor,
    options: &SamplerOptions,
) -> Result<SampleOutput>
where
    S: Scheduler + ?Sized,
    D: Fn(&Tensor, f64, &Tensor) -> Result<Tensor>,
{
    scheduler.set_timesteps(options.steps)?;
    let timesteps = scheduler.timesteps().to_vec();

    // Check everything the loop will need before running any (expensive) denoiser call.
    let noisy: Vec<usize> = (0..timesteps.len())
        .filter(|&i| scheduler.needs_noise(i))
        .collect();
    for &i in &noisy {
        match options.step_noises.get(i) {
            None => bail!(
                "sampler: the scheduler adds noise at steps {noisy:?} but step_noises has {} \
                 tensor(s) (give one per step, indexed by step)",
                options.step_noises.len()
            ),
            Some(n) if n.dims() != initial_noise.dims() => bail!(
                "sampler: step_noises[{i}] has shape {:?} but the latents have shape {:?}",
                n.dims(),
                initial_noise.dims()
            ),
            Some(_) => {}
        }
    }
    let guided_cond = match options.guidance_scale {
        None => None,
        Some(_) => {
            let Some(uncond) = &options.uncond else {
                bail!("sampler: guidance_scale is set but no uncond embedding was given")
            };
            let uncond = if uncond.dims() != cond.dims() && uncond.dim(0)? == 1 {
                uncond.broadcast_as(cond.dims())?.contiguous()?
            } else {
                uncond.clone()
            };
            if uncond.dims() != cond.dims() {
                bail!(
                    "sampler: uncond has shape {:?} but cond has shape {:?}",
                    uncond.dims(),
                    cond.dims()
                )
            }
            Some(Tensor::cat(&[&uncond, cond], 0)?)
        }
    };

    let mut latents = initial_noise.affine(scheduler.init_noise_sigma(), 0.0)?;
    let mut intermediates = Vec::new();
    for (i, &t) in timesteps.iter().enumerate() {
        // The scheduler's update below still uses the live `latents`; only the denoiser sees a
        // constant.
        let model_latents = if options.detach_model_input {
            latents.detach()
        } else {
            latents.clone()
        };
        let model_output = match (&guided_cond, options.guidance_scale) {
            (Some(c), Some(scale)) => {
                let x = Tensor::cat(&[&model_latents, &model_latents], 0)?;
                let x = scheduler.scale_model_input(&x, i)?;
                let out = denoiser(&x, t, c)?;
                let b = latents.dim(0)?;
                check_output(&out, &x, t)?;
                let e_u = out.narrow(0, 0, b)?;
                let e_c = out.narrow(0, b, b)?;
                // e_u + s * (e_c - e_u)
                e_u.affine(1.0 - scale, 0.0)?
                    .add(&e_c.affine(scale, 0.0)?)?
            }
            _ => {
                let x = scheduler.scale_model_input(&model_latents, i)?;
                let out = denoiser(&x, t, cond)?;
                check_output(&out, &x, t)?;
                out
            }
        };
        let noise = if scheduler.needs_noise(i) {
            options.step_noises.get(i)
        } else {
            None
        };
        latents = scheduler.step(&model_output, i, &latents, noise)?;
        if options.keep_intermediates {
            intermediates.push(latents.clone());
        }
    }
    Ok(SampleOutput {
        latents,
        intermediates,
    })
}

fn check_output(out: &Tensor, input: &Tensor, t: f64) -> Result<()> {
    if out.dims() != input.dims() {
        bail!(
            "sampler: the denoiser returned shape {:?} for latents of shape {:?} at timestep {t}",
            out.dims(),
            input.dims()
        )
    }
    Ok(())
}
