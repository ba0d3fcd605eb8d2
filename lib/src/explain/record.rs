//! Run records: every run writes a folder that says what ran and what it found, readable even
//! when the run was killed halfway.
//!
//! | file | written |
//! |---|---|
//! | `config.json` | at the start (atomically): models (with resolved revisions), seed, dtype, device, objective, template, loop settings, crate versions |
//! | `metrics.csv` | one row per iteration, appended and flushed as it goes |
//! | `images/iter_NNNNN.png` | every `save_every` iterations: that iteration's images side by side |
//! | `prompt.safetensors` | the best soft prompt so far, at every save point and at the end (atomically) |
//! | `best.png`, `best_images.safetensors` | at the end: the best prompt's images (PNG, and the raw f32 tensor) |
//! | `summary.json` | at the end: why it stopped, the best objective, the textual explanation |
//!
//! Every file but `metrics.csv` is written to a temporary sibling and renamed into place
//! ([`crate::io`]), so a killed run leaves only whole files. [`RunRecord::open`] reads a record
//! back (an incomplete one too: no `summary.json` means the run did not finish), and
//! [`RunRecord::reproduce`] regenerates the best images from the saved prompt and config, for a
//! bit-for-bit comparison on the same device and dtype.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::activation::{activation_scores, ActivationScores};
use super::bundle::{ModelBundle, ModelSpec};
use super::objective::Objective;
use super::optimize::{IterationMetrics, OptimizeConfig, Optimized};
use super::pipeline::{images_f32_cpu, DiffusionPipeline, PipelineOptions};
use super::soft_prompt::SoftPrompt;
use super::tokens::TextualExplanation;

pub const CONFIG_FILE: &str = "config.json";
pub const METRICS_FILE: &str = "metrics.csv";
pub const PROMPT_FILE: &str = "prompt.safetensors";
pub const SUMMARY_FILE: &str = "summary.json";
pub const BEST_PNG: &str = "best.png";
pub const BEST_IMAGES_FILE: &str = "best_images.safetensors";
pub const IMAGES_DIR: &str = "images";

/// The record format's version.
pub const FORMAT: u32 = 1;

/// candle's version, as pinned (`=0.11.1`) in the workspace's Cargo.toml (a test checks they
/// agree; cargo exposes no dependency's version to the code).
pub const CANDLE_VERSION: &str = "0.11.1";

/// What a run was: enough to rebuild its pipeline and prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub format: u32,
    pub diffexplainer_version: String,
    pub candle_version: String,
    pub model: ModelSpec,
    /// `cpu`, `cuda:0`, ...
    pub device: String,
    pub pipeline: PipelineOptions,
    pub template: String,
    pub num_vectors: usize,
    /// How the vectors started: `random:SEED` or `word:WORD`.
    pub init: String,
    pub objective: Objective,
    /// The objective as written (`logit[207]`).
    pub objective_text: String,
    pub target_class: Option<usize>,
    pub optimize: OptimizeConfig,
    /// Images are saved every this many iterations (0: never, only at the end).
    pub save_every: usize,
    /// Seconds since the Unix epoch at the start.
    pub started_at: u64,
    /// Images per prompt for the activation score at the end (0: not scored; what records
    /// older than the score hold).
    #[serde(default)]
    pub activation_samples: usize,
    /// The recipe the run's settings came from (`paper`), if any (informative: the settings
    /// themselves are the fields above).
    #[serde(default)]
    pub recipe: Option<String>,
}

impl RunConfig {
    /// A config with this build's versions and the current time filled in.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: ModelSpec,
        device: &Device,
        pipeline: PipelineOptions,
        template: &str,
        num_vectors: usize,
        init: String,
        objective: Objective,
        target_class: Option<usize>,
        optimize: OptimizeConfig,
        save_every: usize,
    ) -> Self {
        Self {
            format: FORMAT,
            diffexplainer_version: env!("CARGO_PKG_VERSION").to_string(),
            candle_version: CANDLE_VERSION.to_string(),
            model,
            device: device_name(device),
            pipeline,
            template: template.to_string(),
            num_vectors,
            init,
            objective_text: objective.to_string(),
            objective,
            target_class,
            optimize,
            save_every,
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            activation_samples: 0,
            recipe: None,
        }
    }
}

/// `cpu`, `cuda:N`, `metal:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The device [`device_name`] names (`cuda` alone means `cuda:0`).
pub fn parse_device(name: &str) -> anyhow::Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::new_cuda(i)?,
            _ => anyhow::bail!("unknown device `{other}` (use cpu, cuda or cuda:N)"),
        },
    })
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// `Finished`, `EarlyStop` or `Cancelled`.
    pub stop: String,
    pub iterations: usize,
    pub best_iteration: usize,
    pub best_objective: f64,
    pub first_objective: f64,
    pub last_objective: f64,
    pub seconds: f64,
    pub explanation: Option<TextualExplanation>,
    /// The best prompt's activation score on fresh seeds (absent when not scored).
    #[serde(default)]
    pub activation: Option<ActivationScores>,
}

/// Writes a record as a run goes: [`RunWriter::create`] before the loop,
/// [`RunWriter::on_iteration`] from its callback, [`RunWriter::finish`] after it.
pub struct RunWriter {
    dir: PathBuf,
    metrics: File,
    save_every: usize,
    template: String,
    /// Shares storage with the optimized prompt: read in the callback, it holds the vectors
    /// that produced that iteration's images.
    vectors: Var,
    best: Option<(f64, Tensor)>,
    best_saved: bool,
}

impl RunWriter {
    /// Creates `dir` (which must not hold a record already) and writes `config.json` and the
    /// metrics header.
    pub fn create(dir: &Path, config: &RunConfig, prompt: &SoftPrompt) -> anyhow::Result<Self> {
        if dir.join(CONFIG_FILE).exists() {
            anyhow::bail!(
                "{} already holds a run record; choose another output folder",
                dir.display()
            )
        }
        std::fs::create_dir_all(dir.join(IMAGES_DIR))
            .with_context(|| format!("cannot create the record folder {}", dir.display()))?;
        let json = serde_json::to_vec_pretty(config)?;
        crate::io::write_bytes_atomically(&dir.join(CONFIG_FILE), &json)?;
        let path = dir.join(METRICS_FILE);
        let mut metrics =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut header = vec![
            "iteration",
            "objective",
            "loss",
            "target_logit",
            "target_probability",
            "top1_class",
            "top1_probability",
            "grad_norm",
            "lr",
            "seconds",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        header.extend(
            config
                .objective
                .terms
                .iter()
                .map(|(_, t)| csv_field(&t.to_string())),
        );
        writeln!(metrics, "{}", header.join(","))?;
        metrics.flush()?;
        Ok(Self {
            dir: dir.to_path_buf(),
            metrics,
            save_every: config.save_every,
            template: prompt.template().to_string(),
            vectors: prompt.vectors().clone(),
            best: None,
            best_saved: false,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends the iteration's metrics row (flushed) and, at save points, writes its images and
    /// the best prompt so far.
    pub fn on_iteration(&mut self, m: &IterationMetrics, images: &Tensor) -> anyhow::Result<()> {
        let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        let (top1_class, top1_p) = m
            .top5
            .first()
            .map(|(c, p)| (c.to_string(), p.to_string()))
            .unwrap_or_default();
        let mut row = vec![
            m.iteration.to_string(),
            m.objective.to_string(),
            m.loss.to_string(),
            opt(m.target_logit),
            opt(m.target_probability),
            top1_class,
            top1_p,
            m.grad_norm.to_string(),
            m.lr.to_string(),
            format!("{:.3}", m.seconds),
        ];
        row.extend(m.terms.iter().map(|(_, v)| v.to_string()));
        writeln!(self.metrics, "{}", row.join(","))?;
        self.metrics.flush()?;

        if self.best.as_ref().is_none_or(|(b, _)| m.objective > *b) {
            self.best = Some((m.objective, self.vectors.as_tensor().copy()?));
            self.best_saved = false;
        }
        if self.save_every > 0 && m.iteration % self.save_every == 0 {
            let path = self
                .dir
                .join(IMAGES_DIR)
                .join(format!("iter_{:05}.png", m.iteration));
            save_png(&path, images)?;
            if !self.best_saved {
                if let Some((_, vectors)) = &self.best {
                    SoftPrompt::from_vectors(&self.template, vectors)?
                        .save(self.dir.join(PROMPT_FILE))?;
                    self.best_saved = true;
                }
            }
        }
        Ok(())
    }

    /// Writes the best prompt and images, the last iteration's PNG and `summary.json`.
    pub fn finish(
        self,
        result: &Optimized,
        explanation: Option<TextualExplanation>,
    ) -> anyhow::Result<RunSummary> {
        self.finish_with(result, explanation, None)
    }

    /// [`Self::finish`] with the activation score.
    pub fn finish_with(
        self,
        result: &Optimized,
        explanation: Option<TextualExplanation>,
        activation: Option<ActivationScores>,
    ) -> anyhow::Result<RunSummary> {
        SoftPrompt::from_vectors(&self.template, &result.best_vectors)?
            .save(self.dir.join(PROMPT_FILE))?;
        let best = images_f32_cpu(&result.best_images)?;
        save_png(&self.dir.join(BEST_PNG), &best)?;
        save_tensor(&self.dir.join(BEST_IMAGES_FILE), "images", &best)?;
        if let Some(last) = result.metrics.last() {
            let path = self
                .dir
                .join(IMAGES_DIR)
                .join(format!("iter_{:05}.png", last.iteration));
            save_png(&path, &result.last_images)?;
        }
        let objective_at = |i: Option<&IterationMetrics>| i.map_or(f64::NAN, |m| m.objective);
        let summary = RunSummary {
            stop: format!("{:?}", result.stop),
            iterations: result.metrics.len(),
            best_iteration: result.best_iteration,
            best_objective: result.best_objective,
            first_objective: objective_at(result.metrics.first()),
            last_objective: objective_at(result.metrics.last()),
            seconds: result.metrics.last().map_or(0.0, |m| m.seconds),
            explanation,
            activation,
        };
        crate::io::write_bytes_atomically(
            &self.dir.join(SUMMARY_FILE),
            &serde_json::to_vec_pretty(&summary)?,
        )?;
        Ok(summary)
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Images `[n, 3, h, w]` in [0, 1] as 8-bit RGB, side by side.
pub fn to_rgb8(images: &Tensor) -> anyhow::Result<(u32, u32, Vec<u8>)> {
    let images = images_f32_cpu(images)?;
    let (n, c, h, w) = images.dims4()?;
    if c != 3 {
        anyhow::bail!("expected RGB images [n, 3, h, w], got {:?}", images.dims())
    }
    // [h, n, w, 3]: row-major over the strip.
    let data: Vec<f32> = images.permute((2, 0, 3, 1))?.flatten_all()?.to_vec1()?;
    let bytes = data
        .iter()
        .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    Ok(((n * w) as u32, h as u32, bytes))
}

/// Saves images side by side as one PNG, atomically.
pub fn save_png(path: &Path, images: &Tensor) -> anyhow::Result<()> {
    let (width, height, bytes) = to_rgb8(images)?;
    crate::io::write_atomically(path, |tmp| {
        image::save_buffer_with_format(
            tmp,
            &bytes,
            width,
            height,
            image::ExtendedColorType::Rgb8,
            image::ImageFormat::Png,
        )?;
        Ok(())
    })
}

fn save_tensor(path: &Path, name: &str, t: &Tensor) -> anyhow::Result<()> {
    let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.dims().to_vec(), &bytes)?;
    crate::io::write_atomically(path, |tmp| {
        safetensors::serialize_to_file([(name, view)], None, tmp).map_err(Into::into)
    })
}

/// A record read back.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub dir: PathBuf,
    pub config: RunConfig,
    /// `None`: the run did not finish (killed, or still running).
    pub summary: Option<RunSummary>,
    /// Complete rows of `metrics.csv` (a row cut off by a kill is left out).
    pub iterations_recorded: usize,
    /// The objective of each complete row.
    pub objectives: Vec<f64>,
}

/// The result of regenerating a record's best images.
#[derive(Debug, Clone, PartialEq)]
pub struct Reproduction {
    /// Largest absolute difference from `best_images.safetensors`.
    pub max_abs_diff: f64,
    /// Every value equal, bit for bit.
    pub identical: bool,
    /// The regenerated images quantize to exactly the bytes of `best.png`.
    pub png_identical: bool,
}

impl RunRecord {
    /// Reads `dir`'s config, summary (if any) and metrics. Errors name the file at fault.
    pub fn open(dir: impl AsRef<Path>) -> anyhow::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            anyhow::bail!("{}: no such run record folder", dir.display())
        }
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).with_context(|| {
            format!(
                "{}: cannot read the run's config (is this a run record folder?)",
                config_path.display()
            )
        })?;
        let config: RunConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: corrupted run config", config_path.display()))?;
        if config.format != FORMAT {
            anyhow::bail!(
                "{}: record format {} (this build reads format {FORMAT})",
                config_path.display(),
                config.format
            )
        }
        let summary_path = dir.join(SUMMARY_FILE);
        let summary =
            if summary_path.exists() {
                let text = std::fs::read_to_string(&summary_path)
                    .with_context(|| format!("{}: cannot read", summary_path.display()))?;
                Some(serde_json::from_str(&text).with_context(|| {
                    format!("{}: corrupted run summary", summary_path.display())
                })?)
            } else {
                None
            };
        let metrics_path = dir.join(METRICS_FILE);
        let mut objectives = Vec::new();
        if metrics_path.exists() {
            let text = std::fs::read_to_string(&metrics_path)
                .with_context(|| format!("{}: cannot read", metrics_path.display()))?;
            // Rows end with a newline; a last row without one was cut off by a kill.
            let rows = text.split_inclusive('\n').filter(|l| l.ends_with('\n'));
            for (i, line) in rows.enumerate().skip(1) {
                let value = line
                    .split(',')
                    .nth(1)
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .with_context(|| {
                        format!(
                            "{}: line {} has no objective value: {:?}",
                            metrics_path.display(),
                            i + 1,
                            line.trim_end()
                        )
                    })?;
                objectives.push(value);
            }
        }
        Ok(Self {
            dir,
            iterations_recorded: objectives.len(),
            objectives,
            config,
            summary,
        })
    }

    /// The saved (best) soft prompt.
    pub fn prompt(&self, device: &Device) -> anyhow::Result<SoftPrompt> {
        let path = self.dir.join(PROMPT_FILE);
        if !path.exists() {
            anyhow::bail!(
                "{}: missing (the run saved no prompt yet: it stopped before its first save point)",
                path.display()
            )
        }
        SoftPrompt::load(&path, device)
    }

    /// The best images as saved, f32 `[n, 3, h, w]`.
    pub fn best_images(&self) -> anyhow::Result<Tensor> {
        let path = self.dir.join(BEST_IMAGES_FILE);
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
            .with_context(|| format!("{}: cannot read the saved images", path.display()))?;
        tensors
            .get("images")
            .cloned()
            .with_context(|| format!("{}: no tensor `images`", path.display()))
    }

    /// Rebuilds the run's pipeline (its models and fixed noises) on `device`.
    pub fn pipeline(&self, device: &Device) -> anyhow::Result<DiffusionPipeline> {
        let bundle = ModelBundle::load(&self.config.model, device)?;
        DiffusionPipeline::new(bundle, self.config.pipeline.clone())
    }

    /// Regenerates the best images from the saved prompt with `pipeline` (see
    /// [`Self::pipeline`]) and compares them with the saved ones.
    pub fn reproduce_with(&self, pipeline: &DiffusionPipeline) -> anyhow::Result<Reproduction> {
        let prompt = self.prompt(&pipeline.bundle().device)?;
        // Under fresh step noise the best images came from their own iteration's noise.
        let iteration = self.summary.as_ref().map_or(0, |s| s.best_iteration);
        let images = images_f32_cpu(&pipeline.generate_at(
            prompt.template(),
            prompt.vectors(),
            iteration,
        )?)?;
        let saved = self.best_images()?;
        if images.dims() != saved.dims() {
            anyhow::bail!(
                "regenerated images have shape {:?} but {} holds {:?}",
                images.dims(),
                self.dir.join(BEST_IMAGES_FILE).display(),
                saved.dims()
            )
        }
        let a: Vec<f32> = images.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = saved.flatten_all()?.to_vec1()?;
        let identical = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        let max_abs_diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() as f64)
            .fold(0.0, f64::max);
        let png_path = self.dir.join(BEST_PNG);
        let png = image::open(&png_path)
            .with_context(|| format!("{}: cannot read", png_path.display()))?
            .to_rgb8();
        let (_, _, bytes) = to_rgb8(&images)?;
        Ok(Reproduction {
            max_abs_diff,
            identical,
            png_identical: png.as_raw() == &bytes,
        })
    }

    /// [`Self::reproduce_with`] on a freshly built pipeline.
    pub fn reproduce(&self, device: &Device) -> anyhow::Result<Reproduction> {
        self.reproduce_with(&self.pipeline(device)?)
    }
}

/// Creates a new, empty folder `parent/stem` (or `stem-2`, `stem-3`, ... when taken) and
/// returns it. `create_dir` fails when the name exists, so two runs started in the same second
/// (the default stem is `explain-<unix seconds>`) never share a folder, even in parallel.
pub fn create_free_dir(parent: &Path, stem: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create the folder {}", parent.display()))?;
    for n in 1..10_000 {
        let dir = if n == 1 {
            parent.join(stem)
        } else {
            parent.join(format!("{stem}-{n}"))
        };
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    anyhow::bail!("{}: no free name {stem}-N", parent.display())
}

/// A whole recorded run: creates the record in `dir`, runs [`super::optimize()`] writing every
/// iteration as it goes (then calling `on_iteration`, e.g. for a progress bar), and finishes
/// the record with the best prompt's nearest tokens (`top_k` per vector). A cancelled run is
/// finished and recorded like any other (its summary says `Cancelled`). With
/// `config.activation_samples > 0` the best prompt and its nearest-token text are then scored
/// on that many fresh seeds each ([`super::activation`]).
#[allow(clippy::too_many_arguments)]
pub fn run_recorded(
    dir: &Path,
    pipeline: &DiffusionPipeline,
    prompt: &mut SoftPrompt,
    config: &RunConfig,
    cancel: &super::optimize::CancelToken,
    top_k: usize,
    mut on_iteration: impl FnMut(&IterationMetrics),
) -> anyhow::Result<(Optimized, RunSummary)> {
    if config.activation_samples > 0 && config.target_class.is_none() {
        anyhow::bail!(
            "the activation score counts images classified as the target class; this run has \
             none (set activation_samples to 0)"
        )
    }
    let mut writer = RunWriter::create(dir, config, prompt)?;
    let result = super::optimize::optimize(
        pipeline,
        prompt,
        &config.objective,
        config.target_class,
        &config.optimize,
        cancel,
        |m, images| {
            writer.on_iteration(m, images)?;
            on_iteration(m);
            Ok(())
        },
    )?;
    let bundle = pipeline.bundle();
    let explanation = super::tokens::nearest_tokens(
        prompt.template(),
        &result.best_vectors,
        &bundle.text_encoder,
        &bundle.tokenizer,
        top_k,
    )?;
    let activation = match config.target_class {
        Some(class) if config.activation_samples > 0 => Some(activation_scores(
            pipeline,
            prompt.template(),
            &result.best_vectors,
            &explanation.prompt,
            class,
            config.activation_samples,
            config.pipeline.seed,
        )?),
        _ => None,
    };
    let summary = writer.finish_with(&result, Some(explanation), activation)?;
    Ok((result, summary))
}
