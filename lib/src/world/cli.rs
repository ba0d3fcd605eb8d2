//! `diffexplainer world ...`: the command-line face of ShapesWorld.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};

use super::classifier;
use super::render::{render, Rendered};
use super::spec::WorldSpec;
use super::splits::{sample, Split};
use super::truth::{self, TruthConfig};

#[derive(Args, Debug)]
pub struct WorldArgs {
    #[command(subcommand)]
    pub command: WorldCommand,
}

#[derive(Subcommand, Debug)]
pub enum WorldCommand {
    /// Train every model of a world in order (the attribute checker, the classifier under
    /// audit): one folder per model under OUT, finished models skipped, an unfinished one
    /// resumed from its checkpoint.
    Train(TrainWorldArgs),
    /// Render images of a split: a grid PNG of images, one of masks, each image and mask, and
    /// the attribute records (records.jsonl).
    Render(RenderArgs),
    /// Train the classifier under audit on the biased train split and write its folder
    /// (config.json, model.safetensors, report.json); report accuracy per group.
    TrainClassifier(TrainArgs),
    /// Measure the ground truth of a trained classifier in the world: truth.json and truth.md.
    Truth(TruthArgs),
    /// Train the attribute checker (shape, colour, texture, background) on balanced images and
    /// write its folder; report its held-out accuracy per attribute.
    TrainChecker(super::cli_models::TrainCheckerArgs),
    /// Train the autoencoder (diffusers' AutoencoderKL) on balanced images and write a
    /// diffusers `vae/` folder; report the checker's round-trip agreement.
    TrainVae(super::cli_models::TrainVaeArgs),
    /// Measure a trained autoencoder's round trip (and its snapshots') with the checker.
    CheckVae(super::cli_models::CheckVaeArgs),
    /// Train the text-to-image UNet (diffusers' UNet2DConditionModel) on the trained
    /// autoencoder's latents, conditioned on the trained CLIP text tower; write the diffusers
    /// unet/, scheduler/ and model_index.json; report the checker's reading of samples of
    /// held-out captions.
    TrainUnet(super::cli_unet::TrainUnetArgs),
    /// Measure a trained UNet (and its snapshots) on held-out captions with the checker;
    /// write sample grids.
    CheckUnet(super::cli_unet::CheckUnetArgs),
    /// Train CLIP's text and vision towers contrastively on (image, caption) pairs and write
    /// the tokenizer/, text_encoder/ and image_encoder/ folders; report zero-shot scores.
    TrainClip(super::cli_models::TrainClipArgs),
}

#[derive(Args, Debug)]
pub struct SpecArg {
    /// The world spec (TOML); default: the built-in default world (lib/assets/world/default.toml).
    #[arg(long)]
    pub spec: Option<PathBuf>,
}

impl SpecArg {
    pub fn load(&self) -> anyhow::Result<WorldSpec> {
        match &self.spec {
            Some(path) => WorldSpec::from_file(path),
            None => Ok(WorldSpec::default_world()),
        }
    }
}

#[derive(Args, Debug)]
pub struct RenderArgs {
    #[command(flatten)]
    pub spec: SpecArg,
    /// Number of images.
    #[arg(long, default_value_t = 16)]
    pub n: usize,
    /// Which split.
    #[arg(long, value_enum, default_value_t = Split::Train)]
    pub split: Split,
    /// Index of the first image.
    #[arg(long, default_value_t = 0)]
    pub start: usize,
    /// Image side in pixels (default: the spec's image_size).
    #[arg(long)]
    pub size: Option<usize>,
    /// Scale the grids up by this factor (nearest neighbour) to look at them.
    #[arg(long, default_value_t = 4)]
    pub zoom: usize,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub spec: SpecArg,
    /// Output folder for the classifier (a rerun resumes from its checkpoint/).
    #[arg(long)]
    pub out: PathBuf,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct TrainWorldArgs {
    #[command(flatten)]
    pub spec: SpecArg,
    /// The world folder: OUT/spec.toml, then one folder per model (OUT/checker, OUT/classifier).
    #[arg(long)]
    pub out: PathBuf,
    /// Train only these models (comma-separated; default: all, in order).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<super::train_all::WorldModel>,
    /// Hide the progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct TruthArgs {
    #[command(flatten)]
    pub spec: SpecArg,
    /// The classifier folder (from `world train-classifier`).
    #[arg(long)]
    pub classifier: PathBuf,
    /// Output folder for truth.json and truth.md (default: the classifier folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Balanced images per class.
    #[arg(long, default_value_t = TruthConfig::default().images_per_class)]
    pub images_per_class: usize,
    /// Predictive features per class (default: 5, or all of them when the classifier has
    /// fewer).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Skip the accuracy measurement on the full validation and balanced splits.
    #[arg(long)]
    pub no_accuracy: bool,
}

pub fn run(args: &WorldArgs) -> anyhow::Result<()> {
    match &args.command {
        WorldCommand::Train(a) => run_train_world(a),
        WorldCommand::Render(a) => run_render(a),
        WorldCommand::TrainClassifier(a) => run_train(a),
        WorldCommand::Truth(a) => run_truth(a),
        WorldCommand::TrainChecker(a) => super::cli_models::run_train_checker(a),
        WorldCommand::TrainVae(a) => super::cli_models::run_train_vae(a),
        WorldCommand::CheckVae(a) => super::cli_models::run_check_vae(a),
        WorldCommand::TrainUnet(a) => super::cli_unet::run_train_unet(a),
        WorldCommand::CheckUnet(a) => super::cli_unet::run_check_unet(a),
        WorldCommand::TrainClip(a) => super::cli_models::run_train_clip(a),
    }
}

/// Largest side of `grid.png` / `masks.png` (16384² RGB is 768 MiB in memory).
const MAX_GRID_SIDE: usize = 16384;

fn run_render(a: &RenderArgs) -> anyhow::Result<()> {
    let spec = a.spec.load()?;
    let len = a.split.len(&spec);
    if a.n == 0 {
        anyhow::bail!("--n 0: nothing to render")
    }
    if a.start.checked_add(a.n).is_none_or(|end| end > len) {
        anyhow::bail!(
            "--start {} --n {}: the {} split has {len} images (indices 0..{len})",
            a.start,
            a.n,
            a.split.name()
        )
    }
    if a.zoom == 0 || a.zoom > 64 {
        anyhow::bail!("--zoom {}: must be between 1 and 64", a.zoom)
    }
    let size = a.size.unwrap_or(spec.image_size);
    if !(8..=1024).contains(&size) {
        anyhow::bail!("--size {size}: must be between 8 and 1024 pixels")
    }
    // The grid is a square of `cols` tiles of size × zoom pixels, held in memory as RGB.
    let cols = (a.n as f64).sqrt().ceil() as usize;
    let side = cols * size * a.zoom;
    if side > MAX_GRID_SIDE {
        anyhow::bail!(
            "--n {} --size {size} --zoom {}: the grid would be {side}×{side} pixels; \
             at most {MAX_GRID_SIDE} per side (fewer images, a smaller --size or --zoom)",
            a.n,
            a.zoom
        )
    }
    // Writing into an earlier rendering would leave its other images beside these and make
    // records.jsonl disagree with images/.
    for name in ["records.jsonl", "images", "masks", "grid.png", "masks.png"] {
        let p = a.out.join(name);
        if p.exists() {
            anyhow::bail!(
                "{} already holds a rendering ({} exists): choose a new --out folder or remove it",
                a.out.display(),
                p.display()
            )
        }
    }
    let samples: Vec<_> = (a.start..a.start + a.n)
        .map(|i| {
            let mut s = sample(&spec, a.split, i);
            // Another size scales the geometry with the image.
            let f = size as f32 / spec.image_size as f32;
            s.scene.center = [s.scene.center[0] * f, s.scene.center[1] * f];
            s.scene.radius *= f;
            s
        })
        .collect();
    let rendered: Vec<Rendered> = samples.iter().map(|s| render(&s.scene, size)).collect();
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(a.out.join(sub))
            .with_context(|| format!("creating {}", a.out.join(sub).display()))?;
    }
    let mut records = Vec::new();
    for (s, r) in samples.iter().zip(&rendered) {
        let name = format!("{}_{:05}.png", a.split.name(), s.index);
        save_png(&a.out.join("images").join(&name), &rgb_image(r, 1))?;
        save_png(&a.out.join("masks").join(&name), &mask_image(r, 1))?;
        records.push(serde_json::to_string(s)?);
    }
    save_png(
        &a.out.join("grid.png"),
        &grid(&rendered, cols, a.zoom, false),
    )?;
    save_png(
        &a.out.join("masks.png"),
        &grid(&rendered, cols, a.zoom, true),
    )?;
    crate::io::write_bytes_atomically(
        &a.out.join("records.jsonl"),
        (records.join("\n") + "\n").as_bytes(),
    )?;
    println!(
        "rendered {} {} images ({size}×{size}) to {}: grid.png, masks.png, images/, masks/, records.jsonl",
        a.n,
        a.split.name(),
        a.out.display()
    );
    for s in samples.iter().take(8) {
        println!("  {:5}  {}", s.index, s.caption);
    }
    Ok(())
}

fn rgb_image(r: &Rendered, zoom: usize) -> image::RgbImage {
    let s = r.size;
    image::RgbImage::from_fn((s * zoom) as u32, (s * zoom) as u32, |x, y| {
        let i = (y as usize / zoom) * s + x as usize / zoom;
        image::Rgb([r.rgb[3 * i], r.rgb[3 * i + 1], r.rgb[3 * i + 2]])
    })
}

fn mask_image(r: &Rendered, zoom: usize) -> image::RgbImage {
    let s = r.size;
    image::RgbImage::from_fn((s * zoom) as u32, (s * zoom) as u32, |x, y| {
        let i = (y as usize / zoom) * s + x as usize / zoom;
        let v = (r.mask[i] * 255.0).round() as u8;
        image::Rgb([v, v, v])
    })
}

/// Tiles images (or masks) `cols` across with a 2-pixel gap.
fn grid(rendered: &[Rendered], cols: usize, zoom: usize, masks: bool) -> image::RgbImage {
    let s = rendered[0].size * zoom;
    let gap = 2;
    let rows = rendered.len().div_ceil(cols);
    let mut out = image::RgbImage::from_pixel(
        (cols * (s + gap) + gap) as u32,
        (rows * (s + gap) + gap) as u32,
        image::Rgb([255, 255, 255]),
    );
    for (i, r) in rendered.iter().enumerate() {
        let tile = if masks {
            mask_image(r, zoom)
        } else {
            rgb_image(r, zoom)
        };
        let (x0, y0) = (gap + (i % cols) * (s + gap), gap + (i / cols) * (s + gap));
        image::imageops::replace(&mut out, &tile, x0 as i64, y0 as i64);
    }
    out
}

fn save_png(path: &Path, img: &image::RgbImage) -> anyhow::Result<()> {
    crate::io::write_atomically(path, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png)
            .map_err(Into::into)
    })
}

fn run_train(a: &TrainArgs) -> anyhow::Result<()> {
    let spec = a.spec.load()?;
    super::train_all::refuse_finished(&a.out)?;
    eprintln!(
        "training the classifier under audit on {} biased images ({} threads)",
        spec.splits.train,
        candle_core::utils::get_num_threads()
    );
    let record = classifier::train_and_save(&spec, &a.out, !a.quiet)?;
    println!(
        "trained in {:.1} s; epoch losses {:?}\nwrote {}",
        record.seconds,
        record
            .epoch_losses
            .iter()
            .map(|l| (l * 1e4).round() / 1e4)
            .collect::<Vec<_>>(),
        a.out.display()
    );
    println!("{}", truth::accuracy_markdown(&record.accuracy));
    std::io::stdout().flush()?;
    Ok(())
}

fn run_truth(a: &TruthArgs) -> anyhow::Result<()> {
    let spec = a.spec.load()?;
    let (classifier, pre) = classifier::load_for(&spec, &a.classifier)?;
    let config = TruthConfig {
        images_per_class: a.images_per_class,
        top_k: a.top_k.unwrap_or(TruthConfig::default().top_k),
        accuracy: !a.no_accuracy,
        ..TruthConfig::default()
    };
    let max_per_class = spec.splits.balanced / spec.classes.len();
    if config.images_per_class == 0 || config.images_per_class > max_per_class {
        anyhow::bail!(
            "--images-per-class {}: must be between 1 and the balanced split's {max_per_class} \
             images per class",
            config.images_per_class
        )
    }
    let feature_dim = match classifier.config() {
        crate::models::classifiers::ClassifierConfig::ResNet(c) => c.feature_dim(),
        _ => anyhow::bail!(
            "{}: the ground truth's feature measurement needs a ResNet classifier",
            a.classifier.display()
        ),
    };
    let config = TruthConfig {
        top_k: a.top_k.unwrap_or(config.top_k.min(feature_dim)),
        ..config
    };
    if config.top_k == 0 || config.top_k > feature_dim {
        anyhow::bail!(
            "--top-k {}: must be between 1 and the classifier's {feature_dim} penultimate features",
            config.top_k
        )
    }
    let t = truth::measure(&spec, &classifier, &pre, &config)?;
    let out = a.out.clone().unwrap_or_else(|| a.classifier.clone());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let md = truth::markdown(&t, &spec);
    crate::io::write_bytes_atomically(&out.join("truth.json"), &serde_json::to_vec_pretty(&t)?)?;
    crate::io::write_bytes_atomically(&out.join("truth.md"), md.as_bytes())?;
    println!(
        "{md}\nwrote {} and {}",
        out.join("truth.json").display(),
        out.join("truth.md").display()
    );
    Ok(())
}

fn run_train_world(a: &TrainWorldArgs) -> anyhow::Result<()> {
    let spec = a.spec.load()?;
    let outcomes = super::train_all::train_world(&spec, &a.out, &a.only, !a.quiet, |o| {
        if o.skipped {
            eprintln!(
                "{}: already trained ({}); {}",
                o.model.name(),
                o.dir.display(),
                o.summary
            )
        } else {
            eprintln!(
                "{}: trained in {:.0} s -> {}; {}",
                o.model.name(),
                o.seconds,
                o.dir.display(),
                o.summary
            )
        }
    })?;
    let trained = outcomes.iter().filter(|o| !o.skipped).count();
    println!(
        "world {} in {}: {} model(s) trained now, {} already finished",
        spec.fingerprint(),
        a.out.display(),
        trained,
        outcomes.len() - trained
    );
    Ok(())
}
