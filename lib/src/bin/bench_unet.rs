//! Times the UNet's forward and forward+backward (gradient w.r.t. the text conditioning, as
//! DiffExplainer needs), with and without gradient checkpointing, and optionally the VAE
//! decoder's (gradient w.r.t. the latents), on random weights:
//!
//! ```text
//! bench_unet [tiny|small|sd15] [--latent N] [--iters N] [--warmup N]
//!            [--checkpoint off|on|both] [--no-unet] [--vae] [--cuda]
//! bench_unet [tiny|small|sd15] --lcm [--latent N] [--steps 4] [--checkpoint off|on]
//! ```
//!
//! `--lcm` measures what DiffExplainer does once per optimization step: a `--steps`-step LCM
//! sample (SD 1.5's scheduler config) from fixed noise, the VAE decode of the result, and the
//! backward pass to the text conditioning, with checkpointing of the UNet and the VAE decoder
//! off or on. It prints the forward and backward times and the process's peak resident memory
//! (VmHWM) beside the resident memory of the models alone; run it once per setting, each in a
//! fresh process, since the peak is per process.
//!
//! - `tiny`: the parity-case shapes (8x8 latents, a 2-block UNet of 8/16 channels, a 2-block
//!   VAE of 8/16 channels).
//! - `small`: the SD 1.5 layout at a tenth of the width (32..128 channels, 77 tokens of width
//!   768), 32x32 latents.
//! - `sd15`: Stable Diffusion 1.5 itself (UNet 320/640/1280/1280, 2 layers per block, 8 heads,
//!   cross-attention 768, 77 tokens: 860 M parameters; VAE decoder 512/512/256/128), 64x64
//!   latents, i.e. 512x512 images.
//!
//! Weights come from [`random_var_builder`]: made on request, no checkpoint file (speed does
//! not depend on their values). Each measurement runs `--warmup` untimed iterations, then
//! `--iters` timed ones, and reports the mean. The process's peak resident memory (VmHWM) and
//! the load average are printed at the end: other processes sharing the CPU slow every number.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use diffexplainer::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use diffexplainer::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use diffexplainer::rng::SeededRng;
use diffexplainer::sampling::{sample, LcmScheduler, SamplerOptions, SchedulerConfig};
use diffexplainer::testing::random_var_builder;

struct Size {
    unet: &'static str,
    vae: &'static str,
    latent: usize,
    tokens: usize,
    width: usize,
}

fn size(name: &str) -> anyhow::Result<Size> {
    Ok(match name {
        "tiny" => Size {
            unet: r#"{"block_out_channels": [8, 16], "layers_per_block": 1,
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "cross_attention_dim": 12, "attention_head_dim": 2, "norm_num_groups": 4}"#,
            vae: r#"{"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
            latent: 8,
            tokens: 5,
            width: 12,
        },
        "small" => Size {
            unet: r#"{"block_out_channels": [32, 64, 128, 128], "layers_per_block": 2,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                     "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                   "CrossAttnUpBlock2D"],
                "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32}"#,
            vae: r#"{"block_out_channels": [32, 64, 128, 128], "layers_per_block": 2,
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D",
                                     "DownEncoderBlock2D", "DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D",
                                   "UpDecoderBlock2D"]}"#,
            latent: 32,
            tokens: 77,
            width: 768,
        },
        "sd15" => Size {
            unet: SD15_UNET,
            vae: SD15_VAE,
            latent: 64,
            tokens: 77,
            width: 768,
        },
        other => anyhow::bail!("unknown size `{other}` (tiny, small or sd15)"),
    })
}

/// runwayml/stable-diffusion-v1-5 `unet/config.json` (the fields that shape the network).
const SD15_UNET: &str = r#"{"sample_size": 64, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
    "norm_eps": 1e-5, "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0}"#;

/// runwayml/stable-diffusion-v1-5 `vae/config.json`.
const SD15_VAE: &str = r#"{"in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D",
                         "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D",
                       "UpDecoderBlock2D"],
    "scaling_factor": 0.18215, "sample_size": 512}"#;

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> anyhow::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => {
            let v = args
                .get(i + 1)
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?;
            v.parse()
                .map(Some)
                .map_err(|e| anyhow::anyhow!("{name} {v}: {e}"))
        }
    }
}

/// A line of `/proc/self/status` (`VmHWM`, `VmRSS`) in GiB; `None` off Linux.
pub fn proc_status_gib(key: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

/// Seconds as `12.3 ms` or `4.56 s`.
fn secs(t: f64) -> String {
    if t < 1.0 {
        format!("{:.1} ms", t * 1000.0)
    } else {
        format!("{t:.2} s")
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

struct Timer<'a> {
    device: &'a Device,
    warmup: usize,
    iters: usize,
}

impl Timer<'_> {
    /// Mean seconds per call of `f` over `iters` calls after `warmup` untimed ones.
    fn time(&self, f: &dyn Fn() -> anyhow::Result<()>) -> anyhow::Result<f64> {
        for _ in 0..self.warmup {
            f()?;
        }
        self.device.synchronize()?;
        let start = Instant::now();
        for _ in 0..self.iters {
            f()?;
        }
        self.device.synchronize()?;
        Ok(start.elapsed().as_secs_f64() / self.iters as f64)
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args
        .first()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .unwrap_or("tiny");
    let s = size(name)?;
    let latent = arg(&args, "--latent")?.unwrap_or(s.latent);
    let iters: usize = arg(&args, "--iters")?.unwrap_or(5);
    let warmup: usize = arg(&args, "--warmup")?.unwrap_or(1);
    let ckpts: &[bool] = match arg::<String>(&args, "--checkpoint")?.as_deref() {
        None | Some("both") => &[false, true],
        Some("off") => &[false],
        Some("on") => &[true],
        Some(o) => anyhow::bail!("--checkpoint {o}: off, on or both"),
    };
    let run_unet = !args.iter().any(|a| a == "--no-unet");
    let run_vae = args.iter().any(|a| a == "--vae");
    let device = if args.iter().any(|a| a == "--cuda") {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    if args.iter().any(|a| a == "--lcm") {
        let ckpt = match ckpts {
            [one] => *one,
            _ => anyhow::bail!("--lcm measures one setting per process: --checkpoint off or on"),
        };
        let steps = arg(&args, "--steps")?.unwrap_or(4);
        return lcm_backprop(name, &s, latent, steps, ckpt, &device);
    }
    let timer = Timer {
        device: &device,
        warmup,
        iters,
    };
    println!(
        "bench_unet {name}: latents {latent}x{latent}, {} tokens of {}, f32 on {device:?}, \
         {warmup} warm-up + {iters} timed iteration(s); load average at start {}",
        s.tokens,
        s.width,
        loadavg()
    );

    if run_unet {
        let cfg: UNet2DConditionConfig = serde_json::from_str(s.unet)?;
        let built = Instant::now();
        let mut unet = UNet2DConditionModel::new(random_var_builder(DType::F32, &device), &cfg)?;
        println!(
            "  UNet {:?}: built in {:.1} s, RSS {:.2} GiB",
            cfg.block_out_channels,
            built.elapsed().as_secs_f64(),
            proc_status_gib("VmRSS:").unwrap_or(f64::NAN)
        );
        let sample = Tensor::randn(0f32, 1.0, (1, 4, latent, latent), &device)?;
        let ehs = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, s.tokens, s.width), &device)?)?;
        for &ckpt in ckpts {
            unet.set_gradient_checkpointing(ckpt);
            let fwd = timer.time(&|| {
                unet.forward(&sample, 500.0, &ehs.detach())?;
                Ok(())
            })?;
            let fwd_bwd = timer.time(&|| {
                let y = unet.forward(&sample, 500.0, ehs.as_tensor())?;
                let grads = y.sqr()?.sum_all()?.backward()?;
                grads
                    .get(ehs.as_tensor())
                    .ok_or_else(|| anyhow::anyhow!("no gradient reached encoder_hidden_states"))?;
                Ok(())
            })?;
            println!(
                "  UNet  checkpointing {ckpt:<5}  forward {:>9}   forward+backward \
                 {:>9}   (peak RSS so far {:.2} GiB, load {})",
                secs(fwd),
                secs(fwd_bwd),
                proc_status_gib("VmHWM:").unwrap_or(f64::NAN),
                loadavg()
            );
        }
    }

    if run_vae {
        let cfg: AutoencoderKLConfig = serde_json::from_str(s.vae)?;
        let mut vae = AutoencoderKL::decoder_only(random_var_builder(DType::F32, &device), &cfg)?;
        let z = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 4, latent, latent), &device)?)?;
        let out = 1 << (cfg.block_out_channels.len() - 1);
        println!(
            "  VAE decoder {:?}: {latent}x{latent} latents -> {}x{} image",
            cfg.block_out_channels,
            latent * out,
            latent * out
        );
        for &ckpt in ckpts {
            vae.set_gradient_checkpointing(ckpt);
            let fwd = timer.time(&|| {
                vae.decode(&z.detach())?;
                Ok(())
            })?;
            let fwd_bwd = timer.time(&|| {
                let y = vae.decode(z.as_tensor())?;
                let grads = y.sqr()?.sum_all()?.backward()?;
                grads
                    .get(z.as_tensor())
                    .ok_or_else(|| anyhow::anyhow!("no gradient reached the latents"))?;
                Ok(())
            })?;
            println!(
                "  VAE   checkpointing {ckpt:<5}  forward {:>9}   forward+backward \
                 {:>9}   (peak RSS so far {:.2} GiB, load {})",
                secs(fwd),
                secs(fwd_bwd),
                proc_status_gib("VmHWM:").unwrap_or(f64::NAN),
                loadavg()
            );
        }
    }
    println!(
        "  peak RSS {:.2} GiB; load average at end {}",
        proc_status_gib("VmHWM:").unwrap_or(f64::NAN),
        loadavg()
    );
    Ok(())
}

/// runwayml/stable-diffusion-v1-5 `scheduler/scheduler_config.json`, read by LCMScheduler.
const SD15_SCHEDULER: &str = r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "clip_sample": false}"#;

/// One DiffExplainer forward (LCM sample + decode) and backward to the conditioning.
fn lcm_backprop(
    name: &str,
    s: &Size,
    latent: usize,
    steps: usize,
    ckpt: bool,
    device: &Device,
) -> anyhow::Result<()> {
    let mut unet = UNet2DConditionModel::new(
        random_var_builder(DType::F32, device),
        &serde_json::from_str(s.unet)?,
    )?;
    let mut vae = AutoencoderKL::decoder_only(
        random_var_builder(DType::F32, device),
        &serde_json::from_str(s.vae)?,
    )?;
    unet.set_gradient_checkpointing(ckpt);
    vae.set_gradient_checkpointing(ckpt);
    let models_gib = proc_status_gib("VmRSS:").unwrap_or(f64::NAN);
    let mut scheduler = LcmScheduler::new(&SchedulerConfig::from_json(SD15_SCHEDULER)?)?;
    let mut rng = SeededRng::new(1);
    let shape = (1, 4, latent, latent);
    let noise = rng.normal(shape, DType::F32, device)?;
    let step_noises = (0..steps)
        .map(|_| rng.normal(shape, DType::F32, device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let ehs = Var::from_tensor(&rng.normal((1, s.tokens, s.width), DType::F32, device)?)?;
    println!(
        "bench_unet {name} --lcm: {steps} LCM steps at {latent}x{latent} latents + VAE decode, \
         backward to the conditioning, checkpointing {ckpt}, f32 on {device:?}; load average at \
         start {}",
        loadavg()
    );

    let start = Instant::now();
    let out = sample(
        &mut scheduler,
        |x, t, c| unet.forward(x, t, c),
        &noise,
        ehs.as_tensor(),
        &SamplerOptions::new(steps).with_step_noises(step_noises),
    )?;
    let image = vae.decode(&vae.unscale_latents(&out.latents)?)?;
    let cotangent = rng.normal(image.dims(), DType::F32, device)?;
    let objective = image.mul(&cotangent)?.sum_all()?;
    device.synchronize()?;
    let forward = start.elapsed().as_secs_f64();
    let forward_peak = proc_status_gib("VmHWM:").unwrap_or(f64::NAN);
    let start = Instant::now();
    let grads = objective.backward()?;
    let grad = grads
        .get(ehs.as_tensor())
        .ok_or_else(|| anyhow::anyhow!("no gradient reached encoder_hidden_states"))?;
    let grad_norm = grad.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let backward = start.elapsed().as_secs_f64();
    let peak = proc_status_gib("VmHWM:").unwrap_or(f64::NAN);
    println!(
        "  image {:?}; forward {}, backward {}; |grad| {grad_norm:.4e}",
        image.dims(),
        secs(forward),
        secs(backward)
    );
    println!(
        "  resident: models {models_gib:.2} GiB; peak after forward {forward_peak:.2} GiB; \
         peak {peak:.2} GiB (activations and gradients: {:.2} GiB); load average at end {}",
        peak - models_gib,
        loadavg()
    );
    Ok(())
}
