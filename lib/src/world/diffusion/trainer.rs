//! Training the UNet: the denoising objective on cached latents and text states, through
//! the shared trainer [`super::super::train`] (batches, AdamW, checkpoints, resume).

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::super::train::{self, Checkpointing, TrainReport};
use super::config::{TimestepSampling, UnetTrainConfig};
use super::data::TrainingSet;
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::rng::SeededRng;
use crate::sampling::{DdimScheduler, Scheduler};

/// A `UNet2DConditionModel` whose parameters are trainable variables (diffusers' names).
pub struct TrainableUnet {
    pub varmap: VarMap,
    pub unet: UNet2DConditionModel,
}

impl TrainableUnet {
    /// Fresh weights from `seed`: PyTorch's default initialization of each layer (uniform
    /// `±1/√fan_in` for conv and linear weights and their biases; norms the identity), drawn
    /// from [`SeededRng`] over the sorted parameter names (as the autoencoder's).
    pub fn new(config: &UNet2DConditionConfig, seed: u64) -> anyhow::Result<Self> {
        let varmap = VarMap::new();
        let unet = UNet2DConditionModel::new(
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
            config,
        )?;
        train::init_pytorch_default(&varmap, seed)?;
        Ok(Self { varmap, unet })
    }

    pub fn vars(&self) -> anyhow::Result<Vec<(String, Var)>> {
        train::sorted_vars(&self.varmap)
    }

    /// Every tensor by its diffusers name (copies).
    pub fn tensors(&self) -> anyhow::Result<std::collections::HashMap<String, Tensor>> {
        train::var_tensors(&self.varmap)
    }

    pub fn parameters(&self) -> anyhow::Result<usize> {
        Ok(train::sorted_vars(&self.varmap)?
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum())
    }
}

/// The noise schedule the objective uses: `alphas_cumprod` per training timestep, and the
/// timesteps the sampler visits.
pub struct NoiseSchedule {
    pub alphas_cumprod: Vec<f64>,
    pub inference_timesteps: Vec<usize>,
    pub v_prediction: bool,
    pub sampling: TimestepSampling,
}

impl NoiseSchedule {
    pub fn of(config: &UnetTrainConfig) -> anyhow::Result<Self> {
        let mut ddim = DdimScheduler::new(&config.scheduler_config())?;
        ddim.set_timesteps(config.inference_steps)?;
        Ok(Self {
            alphas_cumprod: ddim.config().alphas_cumprod.clone(),
            inference_timesteps: ddim.timesteps().iter().map(|&t| t as usize).collect(),
            v_prediction: config.prediction_type == "v_prediction",
            sampling: config.timestep_sampling,
        })
    }

    /// A training timestep drawn from `rng`.
    pub fn draw(&self, rng: &mut SeededRng) -> usize {
        match self.sampling {
            TimestepSampling::Uniform => {
                (rng.next_u64() % self.alphas_cumprod.len() as u64) as usize
            }
            TimestepSampling::Inference => {
                self.inference_timesteps
                    [(rng.next_u64() % self.inference_timesteps.len() as u64) as usize]
            }
        }
    }
}

/// The denoising loss of clean latents `x0` `[b, c, h, w]` under text states `cond`, with
/// `noise` (the latents' shape) at `timesteps` (one per example): `x_t = √ᾱ x0 + √(1−ᾱ) ε`,
/// and the mean squared error of the UNet's output against `ε` (epsilon) or
/// `v = √ᾱ ε − √(1−ᾱ) x0` (v-prediction, Salimans & Ho 2022), as diffusers' training scripts.
pub fn loss(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    x0: &Tensor,
    cond: &Tensor,
    noise: &Tensor,
    timesteps: &[usize],
) -> candle_core::Result<Tensor> {
    let b = x0.dim(0)?;
    let dev = x0.device();
    let per_example = |f: &dyn Fn(f64) -> f64| {
        let v: Vec<f32> = timesteps
            .iter()
            .map(|&t| f(schedule.alphas_cumprod[t]) as f32)
            .collect();
        Tensor::from_vec(v, (b, 1, 1, 1), dev)
    };
    let sqrt_a = per_example(&|a| a.sqrt())?;
    let sqrt_1ma = per_example(&|a| (1.0 - a).sqrt())?;
    let noisy = (x0.broadcast_mul(&sqrt_a)? + noise.broadcast_mul(&sqrt_1ma)?)?;
    let target = if schedule.v_prediction {
        (noise.broadcast_mul(&sqrt_a)? - x0.broadcast_mul(&sqrt_1ma)?)?
    } else {
        noise.clone()
    };
    let t = Tensor::from_vec(
        timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
        b,
        dev,
    )?;
    let pred = unet.forward_with_timesteps(&noisy, &t, cond)?;
    (pred - target)?.sqr()?.mean_all()
}

/// The noise and timesteps of a batch: a function of the seed and the batch's example indices
/// (in order), so a resumed run draws what the uninterrupted one did.
pub fn batch_noise(
    seed: u64,
    indices: &[usize],
    latent_dims: &[usize],
    schedule: &NoiseSchedule,
) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let mut h = seed ^ 0x5851_F42D_4C95_7F2D;
    for &i in indices {
        h = (h ^ i as u64).wrapping_mul(0x100_0000_01B3).rotate_left(17);
    }
    let mut rng = SeededRng::new(h);
    let timesteps: Vec<usize> = indices.iter().map(|_| schedule.draw(&mut rng)).collect();
    let mut dims = vec![indices.len()];
    dims.extend_from_slice(latent_dims);
    let n: usize = dims.iter().product();
    let noise = Tensor::from_vec(rng.normal_vec(n), dims, &Device::Cpu)?;
    Ok((noise, timesteps))
}

/// Trains `model` on `set`. Every `every` steps (after the first), `on_eval(step, unet)` runs
/// before the step (snapshots, measurements); `resumed_at` is the step a checkpoint resumes
/// from. An error from `on_eval` stops training (the last checkpoint stays resumable).
#[allow(clippy::too_many_arguments)]
pub fn train_on(
    model: &TrainableUnet,
    set: &TrainingSet,
    config: &UnetTrainConfig,
    checkpoint: Option<&Checkpointing>,
    progress: bool,
    resumed_at: usize,
    every: usize,
    mut on_eval: impl FnMut(usize, &UNet2DConditionModel) -> anyhow::Result<()>,
) -> anyhow::Result<TrainReport> {
    let schedule = NoiseSchedule::of(config)?;
    let latent_dims = set.latents.dims()[1..].to_vec();
    let mut step = resumed_at;
    train::train(
        model.vars()?,
        Vec::new(), // group and layer norms keep no running statistics
        set.len(),
        &config.train_config(),
        checkpoint,
        "unet",
        progress,
        |indices| {
            if every > 0 && step > resumed_at && step.is_multiple_of(every) {
                on_eval(step, &model.unet)
                    .map_err(|e| candle_core::Error::Msg(format!("at step {step}: {e:#}")))?;
            }
            step += 1;
            let (x0, cond) = set.batch(indices)?;
            let (noise, timesteps) = batch_noise(config.seed, indices, &latent_dims, &schedule)?;
            loss(&model.unet, &schedule, &x0, &cond, &noise, &timesteps)
        },
    )
}
