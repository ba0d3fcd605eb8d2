//! `diffexplainer world train-checker | train-vae | train-clip`: ShapesWorld II's models, one command each.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::autoencoder::{self, Reconstruction, VaeTrainConfig};
use super::checker::{self, CheckerConfig};
use super::cli::SpecArg;

#[derive(Args, Debug)]
pub struct TrainCheckerArgs {
    #[command(flatten)]
    pub spec: SpecArg,
    /// Output folder for the checker (a rerun with the same settings resumes from checkpoint/).
    #[arg(long)]
    pub out: PathBuf,
    /// Balanced images to train on.
    #[arg(long, default_value_t = CheckerConfig::default().train_images)]
    pub train_images: usize,
    /// Held-out balanced images to measure on.
    #[arg(long, default_value_t = CheckerConfig::default().eval_images)]
    pub eval_images: usize,
    #[arg(long, default_value_t = CheckerConfig::default().epochs)]
    pub epochs: usize,
    #[arg(long, default_value_t = CheckerConfig::default().batch_size)]
    pub batch_size: usize,
    /// Peak AdamW learning rate (cosine decay to 0).
    #[arg(long, default_value_t = CheckerConfig::default().lr)]
    pub lr: f64,
    #[arg(long, default_value_t = CheckerConfig::default().seed)]
    pub seed: u64,
    /// The ResNet's stem width.
    #[arg(long, default_value_t = CheckerConfig::default().stem_width)]
    pub stem_width: usize,
    /// The ResNet's four stage widths, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = CheckerConfig::default().widths)]
    pub widths: Vec<usize>,
    /// Each stage's first stride, comma-separated (four).
    #[arg(long, value_delimiter = ',', default_values_t = CheckerConfig::default().strides)]
    pub strides: Vec<usize>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run_train_checker(a: &TrainCheckerArgs) -> anyhow::Result<()> {
    let spec = a.spec.load()?;
    let config = CheckerConfig {
        seed: a.seed,
        train_images: a.train_images,
        eval_images: a.eval_images,
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        stem_width: a.stem_width,
        widths: four("--widths", &a.widths)?,
        strides: four("--strides", &a.strides)?,
        ..CheckerConfig::default()
    };
    config.check()?;
    super::train_all::refuse_finished(&a.out)?;
    eprintln!(
        "training the attribute checker on {} balanced images ({} threads)",
        config.train_images,
        candle_core::utils::get_num_threads()
    );
    let record = checker::train_and_save(&spec, &config, &a.out, !a.quiet)?;
    println!(
        "trained in {:.1} s; epoch losses {:?}; wrote {}",
        record.seconds,
        record.epoch_losses,
        a.out.display()
    );
    println!(
        "held-out accuracy ({} balanced images):",
        config.eval_images
    );
    for (attribute, acc) in &record.heldout_accuracy {
        println!("  {attribute:<10} {:.2}%", 100.0 * acc.value());
    }
    Ok(())
}

fn four(flag: &str, v: &[usize]) -> anyhow::Result<[usize; 4]> {
    v.try_into()
        .map_err(|_| anyhow::anyhow!("{flag} {v:?}: give four comma-separated values"))
}

#[derive(Args, Debug)]
pub struct TrainVaeArgs {
    #[command(flatten)]
    pub spec: SpecArg,
    /// Output model folder: the autoencoder goes to OUT/vae/ (diffusers' layout).
    #[arg(long)]
    pub out: PathBuf,
    /// An attribute checker folder (`world train-checker`): measure the round trip with it.
    #[arg(long)]
    pub checker: Option<PathBuf>,
    /// Balanced images to train on.
    #[arg(long, default_value_t = VaeTrainConfig::default().train_images)]
    pub train_images: usize,
    /// Held-out balanced images for the final round-trip measurement.
    #[arg(long, default_value_t = VaeTrainConfig::default().eval_images)]
    pub eval_images: usize,
    #[arg(long, default_value_t = VaeTrainConfig::default().epochs)]
    pub epochs: usize,
    #[arg(long, default_value_t = VaeTrainConfig::default().batch_size)]
    pub batch_size: usize,
    #[arg(long, default_value_t = VaeTrainConfig::default().lr)]
    pub lr: f64,
    #[arg(long, default_value_t = VaeTrainConfig::default().seed)]
    pub seed: u64,
    /// diffusers' block_out_channels, comma-separated: n blocks give latents of side
    /// image / 2^(n-1).
    #[arg(long, value_delimiter = ',', default_values_t = VaeTrainConfig::default().block_out_channels)]
    pub block_out_channels: Vec<usize>,
    #[arg(long, default_value_t = VaeTrainConfig::default().latent_channels)]
    pub latent_channels: usize,
    #[arg(long, default_value_t = VaeTrainConfig::default().norm_num_groups)]
    pub norm_num_groups: usize,
    #[arg(long, default_value_t = VaeTrainConfig::default().layers_per_block)]
    pub layers_per_block: usize,
    /// diffusers' mid_block_add_attention: the mid blocks' self-attention.
    #[arg(long, action = clap::ArgAction::Set, default_value_t = VaeTrainConfig::default().mid_block_add_attention)]
    pub mid_block_add_attention: bool,
    #[arg(long, value_enum, default_value_t = Reconstruction::L1)]
    pub reconstruction: Reconstruction,
    #[arg(long, default_value_t = VaeTrainConfig::default().kl_weight)]
    pub kl_weight: f64,
    /// Every this many steps, snapshot the weights (vae/snapshots/) and, with --checker,
    /// measure the round trip (0: only at the end).
    #[arg(long, default_value_t = VaeTrainConfig::default().eval_every)]
    pub eval_every: usize,
    /// Held-out images for the measurements along training.
    #[arg(long, default_value_t = VaeTrainConfig::default().curve_images)]
    pub curve_images: usize,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run_train_vae(a: &TrainVaeArgs) -> anyhow::Result<()> {
    let spec = a.spec.load()?;
    let config = VaeTrainConfig {
        seed: a.seed,
        train_images: a.train_images,
        eval_images: a.eval_images,
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        weight_decay: 0.0,
        block_out_channels: a.block_out_channels.clone(),
        layers_per_block: a.layers_per_block,
        latent_channels: a.latent_channels,
        norm_num_groups: a.norm_num_groups,
        mid_block_add_attention: a.mid_block_add_attention,
        eval_every: a.eval_every,
        curve_images: a.curve_images,
        reconstruction: a.reconstruction,
        kl_weight: a.kl_weight,
        ..VaeTrainConfig::default()
    };
    config.check(spec.image_size)?;
    let checker = match &a.checker {
        Some(dir) => {
            let c = checker::load_checker(dir)?;
            c.check_fits(&spec)
                .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
            Some(c)
        }
        None => None,
    };
    let s = config.latent_size(spec.image_size);
    eprintln!(
        "training the autoencoder on {} balanced images: {}×{} images to {}×{}×{} latents ({} threads)",
        config.train_images,
        spec.image_size,
        spec.image_size,
        config.latent_channels,
        s,
        s,
        candle_core::utils::get_num_threads()
    );
    let record =
        autoencoder::train_and_save_checked(&spec, &config, checker.as_ref(), &a.out, !a.quiet)?;
    println!(
        "trained in {:.1} s ({} parameters); epoch losses {:?}; scaling_factor {:.5}; wrote {}",
        record.seconds,
        record.parameters,
        record.epoch_losses,
        record.scaling_factor,
        a.out.join("vae").display()
    );
    if let Some(rt) = &record.final_round_trip {
        println!("{}", autoencoder::round_trip_line(rt));
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct CheckVaeArgs {
    #[command(flatten)]
    pub spec: SpecArg,
    /// A model folder with vae/ (from `world train-vae`).
    #[arg(long)]
    pub model: PathBuf,
    /// The attribute checker folder.
    #[arg(long)]
    pub checker: PathBuf,
    /// Held-out balanced images to measure on.
    #[arg(long, default_value_t = 600)]
    pub images: usize,
}

/// Measures the round trip of a trained autoencoder and of its snapshots (the curve).
pub fn run_check_vae(a: &CheckVaeArgs) -> anyhow::Result<()> {
    let spec = a.spec.load()?;
    if a.images == 0 {
        anyhow::bail!("--images 0: nothing to measure")
    }
    // The checker and the autoencoder train on balanced indices from at least the balanced
    // split's size on (`train_start`), so only indices below it are held out for both.
    if a.images > spec.splits.balanced {
        anyhow::bail!(
            "--images {}: at most {} (the spec's balanced split, splits.balanced): later balanced \
             images are the ones the checker and the autoencoder train on",
            a.images,
            spec.splits.balanced
        )
    }
    let checker = checker::load_checker(&a.checker)?;
    checker
        .check_fits(&spec)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.checker.display()))?;
    let report: serde_json::Value = std::fs::read(a.model.join("vae").join("report.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let total = report
        .get("config")
        .and_then(|c| {
            let n = c.get("train_images")?.as_u64()?;
            let b = c.get("batch_size")?.as_u64()?;
            let e = c.get("epochs")?.as_u64()?;
            Some((n.div_ceil(b) * e) as usize)
        })
        .unwrap_or(0);
    let curve = autoencoder::snapshot_curve(&spec, &a.model, &checker, a.images, total)?;
    for rt in &curve {
        println!("{}", autoencoder::round_trip_line(rt));
    }
    let path = a.model.join("vae").join("round_trip.json");
    crate::io::write_bytes_atomically(&path, &serde_json::to_vec_pretty(&curve)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct TrainClipArgs {
    #[command(flatten)]
    pub spec: SpecArg,
    /// Output folder: OUT/diffusion/{tokenizer, text_encoder, image_encoder, feature_extractor}/
    /// and OUT/clip/report.json (a rerun with the same settings resumes from OUT/clip/checkpoint/).
    #[arg(long)]
    pub out: PathBuf,
    /// A TOML file of `ClipTrainConfig` fields (architecture and training; unknown keys are
    /// refused); the flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Balanced images to train on (held-out combinations skipped).
    #[arg(long)]
    pub train_images: Option<usize>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak AdamW learning rate (cosine decay to 0).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Every this many steps, write the model folders from the current weights and measure the
    /// zero-shot scores (0: only at the end).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Held-out images for the measurements along training.
    #[arg(long)]
    pub curve_images: Option<usize>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run_train_clip(a: &TrainClipArgs) -> anyhow::Result<()> {
    use super::clip::{self, ClipTrainConfig};
    let spec = a.spec.load()?;
    let mut config = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<ClipTrainConfig>(&text)
                .with_context(|| format!("{}: not a CLIP training config", path.display()))?
        }
        None => ClipTrainConfig::default(),
    };
    if let Some(v) = a.train_images {
        config.train_images = v;
    }
    if let Some(v) = a.epochs {
        config.epochs = v;
    }
    if let Some(v) = a.batch_size {
        config.batch_size = v;
    }
    if let Some(v) = a.lr {
        config.lr = v;
    }
    if let Some(v) = a.seed {
        config.seed = v;
    }
    if let Some(v) = a.eval_every {
        config.eval_every = v;
    }
    if let Some(v) = a.curve_images {
        config.curve_images = v;
    }
    config.check(&spec)?;
    eprintln!(
        "training CLIP on {} balanced images (held-out combinations skipped), {} epochs of \
         batches of {} ({} threads)",
        config.train_images,
        config.epochs,
        config.batch_size,
        candle_core::utils::get_num_threads()
    );
    let record = clip::train_and_save(&spec, &config, &a.out, !a.quiet)?;
    println!(
        "trained in {:.1} s (text {} + vision {} parameters, logit scale {:.2}); epoch losses \
         {:?}; wrote {}",
        record.seconds,
        record.text_parameters,
        record.vision_parameters,
        record.logit_scale,
        record.epoch_losses,
        clip::diffusion_dir(&a.out).display()
    );
    println!("{}", clip::scores_line(&record.final_scores));
    Ok(())
}
