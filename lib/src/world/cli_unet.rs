//! `diffexplainer world train-unet | check-unet`: the text-to-image UNet of ShapesWorld II.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::checker;
use super::cli::SpecArg;
use super::diffusion::{
    self, data, quality, EvalOptions, Inputs, Judge, TextConditioning, TimestepSampling,
    UnetTrainConfig,
};

#[derive(Args, Debug)]
pub struct TrainUnetArgs {
    #[command(flatten)]
    pub spec: SpecArg,
    /// Output folder: the UNet goes to OUT/diffusion/unet/, with OUT/diffusion/scheduler/ and
    /// OUT/diffusion/model_index.json (a rerun with the same settings resumes).
    #[arg(long)]
    pub out: PathBuf,
    /// A folder holding the trained autoencoder's vae/ (or diffusion/vae/); default: OUT.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// A folder holding the trained CLIP's tokenizer/ and text_encoder/ (or under diffusion/);
    /// default: OUT.
    #[arg(long)]
    pub text_encoder: Option<PathBuf>,
    /// An attribute checker folder: measure the samples of held-out captions with it
    /// (default: OUT/checker when it exists).
    #[arg(long)]
    pub checker: Option<PathBuf>,
    /// Balanced images to train on (held-out combinations skipped).
    #[arg(long, default_value_t = UnetTrainConfig::default().train_images)]
    pub train_images: usize,
    #[arg(long, default_value_t = UnetTrainConfig::default().epochs)]
    pub epochs: usize,
    #[arg(long, default_value_t = UnetTrainConfig::default().batch_size)]
    pub batch_size: usize,
    /// Peak AdamW learning rate (cosine decay to 0).
    #[arg(long, default_value_t = UnetTrainConfig::default().lr)]
    pub lr: f64,
    #[arg(long, default_value_t = UnetTrainConfig::default().seed)]
    pub seed: u64,
    /// diffusers' block_out_channels, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = UnetTrainConfig::default().block_out_channels)]
    pub block_out_channels: Vec<usize>,
    /// diffusers' down_block_types (CrossAttnDownBlock2D or DownBlock2D), comma-separated; the
    /// up blocks mirror them.
    #[arg(long, value_delimiter = ',', default_values_t = UnetTrainConfig::default().down_block_types)]
    pub down_block_types: Vec<String>,
    #[arg(long, default_value_t = UnetTrainConfig::default().layers_per_block)]
    pub layers_per_block: usize,
    /// diffusers' attention_head_dim (the number of heads).
    #[arg(long, default_value_t = UnetTrainConfig::default().attention_head_dim)]
    pub attention_head_dim: usize,
    #[arg(long, default_value_t = UnetTrainConfig::default().norm_num_groups)]
    pub norm_num_groups: usize,
    /// v_prediction or epsilon.
    #[arg(long, default_value_t = UnetTrainConfig::default().prediction_type)]
    pub prediction_type: String,
    /// The shipped DDIM schedule's spacing (trailing, leading, linspace).
    #[arg(long, default_value_t = UnetTrainConfig::default().timestep_spacing)]
    pub timestep_spacing: String,
    /// The shipped sampler's step count.
    #[arg(long, default_value_t = UnetTrainConfig::default().inference_steps)]
    pub inference_steps: usize,
    /// Training timesteps: uniform over all, or only the sampler's.
    #[arg(long, value_enum, default_value_t = UnetTrainConfig::default().timestep_sampling)]
    pub timestep_sampling: TimestepSampling,
    /// Every this many steps: snapshot (unet/snapshots/) and, with a checker, measure.
    #[arg(long, default_value_t = EvalOptions::default().eval_every)]
    pub eval_every: usize,
    /// Images sampled per held-out caption for the measurements.
    #[arg(long, default_value_t = EvalOptions::default().samples_per_prompt)]
    pub samples_per_prompt: usize,
    /// Sampling step counts measured at the end, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = EvalOptions::default().steps)]
    pub eval_steps: Vec<usize>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run_train_unet(a: &TrainUnetArgs) -> anyhow::Result<()> {
    let spec = a.spec.load()?;
    let config = UnetTrainConfig {
        seed: a.seed,
        train_images: a.train_images,
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        block_out_channels: a.block_out_channels.clone(),
        down_block_types: a.down_block_types.clone(),
        layers_per_block: a.layers_per_block,
        attention_head_dim: a.attention_head_dim,
        norm_num_groups: a.norm_num_groups,
        prediction_type: a.prediction_type.clone(),
        timestep_spacing: a.timestep_spacing.clone(),
        inference_steps: a.inference_steps,
        timestep_sampling: a.timestep_sampling,
        ..UnetTrainConfig::default()
    };
    let mut inputs = Inputs::of_world_folder(&a.out);
    if let Some(v) = &a.vae {
        inputs.vae = v.clone();
    }
    if let Some(t) = &a.text_encoder {
        inputs.text = t.clone();
    }
    if let Some(c) = &a.checker {
        inputs.checker = Some(c.clone());
    }
    let eval = EvalOptions {
        eval_every: a.eval_every,
        samples_per_prompt: a.samples_per_prompt,
        steps: a.eval_steps.clone(),
        ..EvalOptions::default()
    };
    if inputs.checker.is_none() {
        let d = EvalOptions::default();
        if a.eval_steps != d.steps || a.samples_per_prompt != d.samples_per_prompt {
            anyhow::bail!(
                "--eval-steps and --samples-per-prompt set the checker's measurement, and there \
                 is no checker: give --checker DIR (or train one into OUT/checker)"
            )
        }
    }
    eprintln!(
        "training the UNet on {} balanced images ({} threads)",
        config.train_images,
        candle_core::utils::get_num_threads()
    );
    let record = diffusion::train_and_save_with(&spec, &config, &inputs, &eval, &a.out, !a.quiet)?;
    println!(
        "trained in {:.1} s ({} parameters, {} images, {} held-out skipped, {} captions; \
         encoding {:.1} s; latent std {:.3}); epoch losses {:?}; wrote {}",
        record.seconds,
        record.parameters,
        record.train_images,
        record.skipped_heldout,
        record.distinct_captions,
        record.encode_seconds,
        record.latent_std,
        record.epoch_losses,
        a.out.join("diffusion").display()
    );
    for q in &record.final_quality {
        println!("{}", q.line());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct CheckUnetArgs {
    #[command(flatten)]
    pub spec: SpecArg,
    /// A diffusers folder (or a `world train` output) with unet/, vae/, text_encoder/,
    /// tokenizer/ and scheduler/.
    #[arg(long)]
    pub model: PathBuf,
    /// The attribute checker folder.
    #[arg(long)]
    pub checker: PathBuf,
    /// Sampling step counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![4])]
    pub steps: Vec<usize>,
    /// Images per held-out caption.
    #[arg(long, default_value_t = EvalOptions::default().samples_per_prompt)]
    pub samples_per_prompt: usize,
    /// Also measure every snapshot in unet/snapshots/ (at the first --steps value).
    #[arg(long)]
    pub snapshots: bool,
    /// Write a sample grid per caption template here (at the first --steps value).
    #[arg(long)]
    pub grids: Option<PathBuf>,
}

/// Measures a trained UNet (and its snapshots) on held-out captions.
pub fn run_check_unet(a: &CheckUnetArgs) -> anyhow::Result<()> {
    let spec = a.spec.load()?;
    if a.steps.is_empty() || a.steps.contains(&0) || a.samples_per_prompt == 0 {
        anyhow::bail!(
            "--steps {:?}, --samples-per-prompt {}: must be positive",
            a.steps,
            a.samples_per_prompt
        )
    }
    let root = data::component_root(&a.model, "unet")?;
    let checker = checker::load_checker(&a.checker)?;
    checker
        .check_fits(&spec)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.checker.display()))?;
    let unet = diffusion::load_unet(&root)?;
    let vae = data::load_vae(&root)?;
    let text = TextConditioning::load(&root)?;
    let scheduler = crate::sampling::SchedulerConfig::from_pretrained(&root)?;
    let judge = Judge {
        spec: &spec,
        vae: &vae,
        text: &text,
        checker: &checker,
        scheduler,
        latent_size: unet.config.sample_size,
    };
    let seed = EvalOptions::default().seed;
    let mut results = Vec::new();
    if a.snapshots {
        let snap_dir = root.join("unet").join("snapshots");
        let mut snaps: Vec<(usize, PathBuf)> = std::fs::read_dir(&snap_dir)
            .with_context(|| format!("reading {}", snap_dir.display()))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let step = name
                    .strip_prefix("step-")?
                    .strip_suffix(".safetensors")?
                    .parse()
                    .ok()?;
                Some((step, e.path()))
            })
            .collect();
        snaps.sort();
        for (step, path) in snaps {
            let vb = candle_nn::VarBuilder::from_tensors(
                candle_core::safetensors::load(&path, &candle_core::Device::Cpu)?,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            );
            let snap = crate::models::unet::UNet2DConditionModel::new(vb, &unet.config)?;
            let (q, _) = judge.measure(&snap, a.steps[0], a.samples_per_prompt, seed, step)?;
            println!("snapshot {}", q.line());
            results.push(q);
        }
    }
    for (i, &steps) in a.steps.iter().enumerate() {
        let (q, grids) = judge.measure(&unet, steps, a.samples_per_prompt, seed, 0)?;
        println!("final    {}", q.line());
        for t in &q.templates {
            let parts: Vec<String> = t
                .scores
                .iter()
                .map(|(a, acc)| format!("{a} {:.1}%", 100.0 * acc.value()))
                .collect();
            println!("    {:<45} {}", t.template, parts.join(", "));
        }
        if let (0, Some(dir)) = (i, &a.grids) {
            for (t, images) in q.templates.iter().zip(&grids) {
                quality::save_template_grid(
                    dir,
                    &t.template,
                    &t.captions,
                    images,
                    a.samples_per_prompt,
                )?;
            }
            println!("wrote the sample grids to {}", dir.display());
        }
        results.push(q);
    }
    let path = root.join("unet").join("quality.json");
    crate::io::write_bytes_atomically(&path, &serde_json::to_vec_pretty(&results)?)?;
    println!("wrote {}", path.display());
    Ok(())
}
