//! One DiffExplainer iteration at real sizes, timed: SD 1.5 UNet × 4 LCM steps from fixed
//! noise (64² latents, 77×768 conditioning), VAE decoder to 512², antialiased resize to 256,
//! ImageNet normalization, ResNet-50, backward of one logit to the conditioning. Random weights
//! (timing does not depend on their values). The PyTorch twin is `bench/torch_iteration.py`;
//! run both in one call on the same machine and compare.
//!
//! `bench_iteration [--device cpu|cuda] [--dtype f32|f16|bf16] [--iters N] [--warmup N]
//!                  [--latent 64] [--checkpointing]`
//!
//! Prints one JSON line: median ms per iteration and the gradient's norm (zero = cut).

use std::time::Instant;

use candle_core::{DType, Var};
use diffexplainer::models::classifiers::{Classifier, ClassifierConfig, Preprocess};
use diffexplainer::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use diffexplainer::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use diffexplainer::rng::SeededRng;
use diffexplainer::sampling::{lcm::LcmScheduler, sample, SamplerOptions, SchedulerConfig};
use diffexplainer::weights::RandomWeights;

const SD15_UNET: &str = r#"{"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "sample_size": 64}"#;
const SD_VAE: &str = r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215, "sample_size": 512}"#;
const SD15_SCHEDULER: &str = r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false,
    "original_inference_steps": 50}"#;

mod common;
use common::{arg, device_and_dtype};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (device, dtype) = device_and_dtype(&args)?;
    let iters: usize = arg(&args, "--iters").unwrap_or("3").parse()?;
    let warmup: usize = arg(&args, "--warmup").unwrap_or("1").parse()?;
    let latent: usize = arg(&args, "--latent").unwrap_or("64").parse()?;
    let checkpointing = args.iter().any(|a| a == "--checkpointing");

    let build = Instant::now();
    let mut unet = UNet2DConditionModel::new(
        RandomWeights::new(1).into_var_builder(dtype, &device),
        &serde_json::from_str::<UNet2DConditionConfig>(SD15_UNET)?,
    )?;
    unet.set_gradient_checkpointing(checkpointing);
    let vae = AutoencoderKL::decoder_only(
        RandomWeights::new(2).into_var_builder(dtype, &device),
        &serde_json::from_str::<AutoencoderKLConfig>(SD_VAE)?,
    )?;
    let classifier = Classifier::new(
        RandomWeights::new(3).into_var_builder(dtype, &device),
        &ClassifierConfig::from_arch("resnet50")?,
    )?;
    let preprocess = Preprocess::imagenet(256);
    let mut scheduler =
        LcmScheduler::new(&serde_json::from_str::<SchedulerConfig>(SD15_SCHEDULER)?)?;
    let mut rng = SeededRng::new(0);
    let shape = (1, 4, latent, latent);
    let noise = rng.normal(shape, dtype, &device)?;
    let step_noises = (0..4)
        .map(|_| rng.normal(shape, dtype, &device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let cond0 = rng.normal((1, 77, 768), dtype, &device)?;
    let options = SamplerOptions::new(4).with_step_noises(step_noises);
    device.synchronize()?;
    let build_s = build.elapsed().as_secs_f64();

    // Phase times of the last iteration (device synchronized at each boundary).
    let mut phases: Vec<(&str, f64)> = Vec::new();
    let mut iteration = || -> anyhow::Result<f64> {
        phases.clear();
        let mut mark = Instant::now();
        let mut phase = |name: &'static str, phases: &mut Vec<(&str, f64)>| -> anyhow::Result<()> {
            device.synchronize()?;
            phases.push((name, mark.elapsed().as_secs_f64() * 1e3));
            mark = Instant::now();
            Ok(())
        };
        let cond = Var::from_tensor(&cond0)?;
        let latents = sample(
            &mut scheduler,
            |x, t, c| unet.forward(x, t, c),
            &noise,
            cond.as_tensor(),
            &options,
        )?
        .latents;
        phase("unet_forward_4_steps", &mut phases)?;
        let image = vae.decode_to_image(&latents)?;
        phase("vae_decode_forward", &mut phases)?;
        let logits = classifier.forward(&preprocess.forward(&image)?)?.logits;
        phase("resize_classifier_forward", &mut phases)?;
        let grads = logits.narrow(1, 207, 1)?.sum_all()?.backward()?;
        phase("backward_all", &mut phases)?;
        let grad = grads
            .get(cond.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("no gradient reached the conditioning"))?;
        Ok(grad
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f32>()? as f64)
    };
    let mut times = Vec::new();
    let mut grad_norm = 0.0;
    for k in 0..warmup + iters {
        device.synchronize()?;
        let start = Instant::now();
        grad_norm = iteration()?;
        device.synchronize()?;
        if k >= warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    drop(iteration);
    let phase_ms: serde_json::Map<String, serde_json::Value> = phases
        .iter()
        .map(|(n, ms)| (n.to_string(), serde_json::json!((ms * 10.0).round() / 10.0)))
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "{}",
        serde_json::json!({
            "impl": "diffexplainer", "dtype": format!("{dtype:?}").to_lowercase(), "device": format!("{device:?}"),
            "latent": latent, "checkpointing": checkpointing, "ms_median": median,
            "ms_all": times.iter().map(|t| (t * 100.0).round() / 100.0).collect::<Vec<_>>(),
            "build_s": build_s, "grad_norm": grad_norm,
            "last_iteration_phases_ms": phase_ms,
        })
    );
    Ok(())
}
