//! `diffexplainer` command line: `explain` (optimize a soft prompt and record the run),
//! `tokens` (the nearest vocabulary tokens of a saved prompt), `show` (summarize a record),
//! `parity` (check modules against their reference libraries), `world` (ShapesWorld), `spurious`
//! (core / spurious labels of a class's features, agreement with Salient ImageNet).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use diffexplainer::explain::bundle::{
    ClassifierSpec, DiffusionSource, FileSource, LoraSpec, ModelSpec, CLASSIFIER_PRESETS,
    DIFFUSION_PRESETS,
};
use diffexplainer::explain::optimize::EarlyStop;
use diffexplainer::explain::pipeline::OptionEffects;
use diffexplainer::explain::record::{parse_device, run_recorded, RunConfig, RunRecord};
#[path = "cli/spurious.rs"]
mod spurious_cli;

use diffexplainer::explain::{
    nearest_tokens, CancelToken, ClassObjective, DiffusionPipeline, ModelBundle, Objective,
    OptimizeConfig, PipelineOptions, RunChoices, RunSettings, SoftPrompt, SoftPromptInit,
};

#[derive(Parser)]
#[command(
    name = "diffexplainer",
    version,
    about = "Global explanations of image classifiers with differentiable diffusion"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// One value per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Optimize a soft prompt so that the generated images maximize a class logit or hidden
    /// neuron, and write a run record (config, metrics, images, prompt, summary). With no model
    /// arguments it runs the embedded tiny random models (no downloads, seconds on a CPU).
    Explain(Box<ExplainArgs>),
    /// The nearest vocabulary tokens of a saved soft prompt (a run record folder, or a
    /// prompt .safetensors with the model it was optimized for).
    Tokens {
        /// A run record folder, or a soft prompt .safetensors file.
        path: PathBuf,
        /// The text encoder the prompt was optimized for (with a prompt file; a record names its
        /// own models).
        #[command(flatten)]
        model: DiffusionArgs,
        /// Tokens shown per vector.
        #[arg(long, default_value_t = 5)]
        top: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Summarize a run record: what ran, how far it got, what it found.
    Show {
        /// The run record folder.
        dir: PathBuf,
        /// Also regenerate the best images from the saved prompt and compare them with the saved
        /// ones (bit for bit on the same device and dtype).
        #[arg(long)]
        reproduce: bool,
        /// Where to regenerate (default: the record's own device).
        #[arg(long, requires = "reproduce")]
        device: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run many explanations (classes, or (class, feature) pairs) with the models loaded once:
    /// one run record per job in --out, resumable after a kill, split across machines with
    /// --shard K/N. `sweep merge DIR...` makes one table of finished records (docs/sweep.md).
    Sweep(Box<SweepArgs>),
    /// ShapesWorld: render the world, train the classifier under audit, measure its ground truth.
    World(diffexplainer::world::cli::WorldArgs),
    /// Spurious-feature discovery: label a class's features core or spurious from generated
    /// images and text-prompted segmentation; score labels against Salient ImageNet's.
    Spurious {
        #[command(subcommand)]
        command: spurious_cli::SpuriousCommand,
    },
    /// Run parity cases (folders holding case.json, or folders of such folders) and print
    /// the max abs/rel error of every output and input gradient.
    Parity {
        /// Case folders, or folders containing case folders.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Where to run: `cpu` or `cuda` (needs a build with `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print one Markdown table (module kind, reference, worst errors) instead.
        #[arg(long)]
        markdown: bool,
    },
}

/// Which diffusion model: the embedded tiny default, a preset, a local folder or a cached Hub
/// id, with an optional LoRA. Every option acts or is refused with the reason.
#[derive(Args, Debug, Clone)]
struct DiffusionArgs {
    /// Diffusion preset: sd15-lcm (SD 1.5 + LCM-LoRA, 4 steps), sd14-lcm (SD 1.4 + LCM-LoRA, the
    /// authors' base), sd-turbo (1 step), tiny
    /// (embedded random models; the default when no model is given).
    #[arg(long)]
    preset: Option<String>,
    /// A local diffusers folder (tokenizer/, text_encoder/, unet/, vae/, scheduler/); with
    /// --preset it replaces the preset's Hub id.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// A Hub model id, resolved in the local Hugging Face cache (never downloaded).
    #[arg(long, conflicts_with = "model_dir")]
    hub: Option<String>,
    /// Use the embedded tiny random models (the default with no model arguments).
    #[arg(long, conflicts_with_all = ["preset", "model_dir", "hub"])]
    tiny: bool,
    /// Seed of the tiny random models' weights (default 0).
    #[arg(long)]
    tiny_seed: Option<u64>,
    /// A LoRA to fuse into the UNet and, for its text-encoder modules, the text encoder (e.g.
    /// LCM-LoRA's pytorch_lora_weights.safetensors; kohya or diffusers/PEFT keys). With
    /// --preset sd15-lcm it replaces the preset's LCM-LoRA.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// The LoRA's scale (default 1; with a preset, scales the preset's LoRA).
    #[arg(long)]
    lora_scale: Option<f64>,
    /// f32, f16, bf16 or f64 for the diffusion models (default f32).
    #[arg(long)]
    dtype: Option<String>,
    /// cpu, cuda or cuda:N (needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// The models of an explanation: the diffusion model, sampling and the classifier.
#[derive(Args, Debug, Clone)]
struct ModelArgs {
    #[command(flatten)]
    diffusion: DiffusionArgs,
    /// Scheduler: lcm, euler_ancestral or ddim (default: the preset's, or the folder's class).
    #[arg(long)]
    scheduler: Option<String>,
    /// Sampling steps (default: the preset's; 4 for a folder).
    #[arg(long)]
    steps: Option<usize>,
    /// Image side in pixels (default: the preset's; 512 for a folder).
    #[arg(long)]
    resolution: Option<usize>,
    /// Classifier: resnet18, resnet50, vgg16, vit-b16, robust-resnet50 (default: the tiny
    /// random ViT with the tiny models; required otherwise).
    #[arg(long)]
    classifier: Option<String>,
    /// The classifier's checkpoint (safetensors or torch.save, zip or legacy format, whatever
    /// its name). Without it torchvision's file is looked up in the torch hub cache.
    #[arg(long, requires = "classifier")]
    classifier_checkpoint: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ExplainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Maximize this class (its logit, or its log-probability: --class-objective).
    #[arg(long, conflicts_with_all = ["neuron", "features"])]
    class: Option<usize>,
    /// Maximize this penultimate-layer neuron (pooled feature index).
    #[arg(long, conflicts_with = "features")]
    neuron: Option<usize>,
    /// Maximize the mean of these penultimate features (comma-separated indices).
    #[arg(long, value_delimiter = ',')]
    features: Option<Vec<usize>>,
    /// With --class: add the SUM of these penultimate features to the class term (the authors'
    /// "class + its top-5 features" objective; Salient ImageNet ranks a class's features).
    #[arg(long, value_delimiter = ',')]
    class_features: Option<Vec<usize>>,
    #[command(flatten)]
    run: RunArgs,
    /// The run record folder (default: a new runs/explain-<unix time>[-N]).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the summary as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct SweepArgs {
    #[command(subcommand)]
    action: Option<SweepAction>,
    #[command(flatten)]
    run: SweepRunArgs,
}

#[derive(Subcommand, Debug)]
enum SweepAction {
    /// One table of the finished records of sweep folders (e.g. one per shard), sorted by job;
    /// CSV on stdout unless --csv/--json/--html name files.
    Merge {
        /// Sweep folders (the --out of each sweep or shard).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Write the table as CSV here.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Write the rows as a JSON array here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the table as an HTML page here.
        #[arg(long)]
        html: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct SweepRunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A job list: one `CLASS` or `CLASS,FEATURE` per line (`#` comments).
    #[arg(long, conflicts_with = "salient_imagenet")]
    list: Option<PathBuf>,
    /// Salient ImageNet's annotation CSV (discover_spurious_features.csv): its classes, or its
    /// (class, feature) pairs with --salient-jobs pairs.
    #[arg(long)]
    salient_imagenet: Option<PathBuf>,
    /// classes (default) or pairs.
    #[arg(long, requires = "salient_imagenet")]
    salient_jobs: Option<String>,
    /// With --salient-imagenet classes: add the sum of each class's annotated (top-5) features
    /// to its class term.
    #[arg(long, requires = "salient_imagenet")]
    with_class_features: bool,
    /// The sweep folder: one record per job (`class-NNNNN[-feature-NNNNN]/`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run only this share of the jobs: K/N takes list positions i with i % N == K.
    #[arg(long)]
    shard: Option<String>,
    /// Stop after running this many jobs (finished ones skipped do not count).
    #[arg(long)]
    max_jobs: Option<usize>,
    #[command(flatten)]
    run: RunArgs,
}

/// The optimization's settings, shared by `explain` and `sweep`.
#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Take the authors' settings (DEXTER) where ours differ: truncated gradient, fresh step
    /// noise, cross-entropy class objective, resize without antialias, early stop after 3,
    /// 1000 iterations at most. Explicit options win; see docs/recipe.md.
    #[arg(long)]
    recipe: Option<String>,
    /// Class objective: logit (default) or cross-entropy (maximize the log-probability; the
    /// authors' choice).
    #[arg(long)]
    class_objective: Option<String>,
    /// Same as --class-objective cross-entropy.
    #[arg(long, conflicts_with = "class_objective")]
    log_probability: bool,
    /// Gradient through the sampling steps: full (every UNet step, default) or truncated (the
    /// UNet input latents detached at each step, as the authors' code).
    #[arg(long)]
    gradient_path: Option<String>,
    /// The re-noise of LCM / Euler ancestral steps: fixed (drawn once, default) or fresh
    /// (redrawn every iteration from a seed stream, as the authors' code; still reproducible).
    #[arg(long)]
    step_noise: Option<String>,
    /// Antialias the resize to the classifier's input (default true; the authors' code: false).
    /// Only acts when the images are larger than the classifier's input.
    #[arg(long)]
    resize_antialias: Option<bool>,
    /// The prompt around the soft tokens; `{}` marks where they go.
    #[arg(long, default_value = "A texture of {}")]
    template: String,
    /// Number of soft tokens (learnable vectors).
    #[arg(long, default_value_t = 1)]
    tokens: usize,
    /// Start the vectors at this word's token embeddings (default: random, from --seed).
    #[arg(long)]
    init_word: Option<String>,
    /// Iterations (the cap with --early-stop); default 30, 1000 with --recipe paper.
    #[arg(long)]
    iterations: Option<usize>,
    /// Seed of the noises and of the random initialization.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// Images per iteration (each from its own fixed noise).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Classifier-free guidance scale (default: off).
    #[arg(long)]
    guidance: Option<f64>,
    /// Stop once every image is classified as the target class this many iterations in a row.
    #[arg(long)]
    early_stop: Option<usize>,
    /// Clip the gradient to this L2 norm.
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Recompute UNet activations in backward (less memory).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Activation score: sample the best soft prompt, and its nearest-token text, from this many
    /// fresh seeds each and report the share classified as the target class with a 95% Wilson
    /// interval (default with a class: 16 on a CPU, 100 on a GPU; 0: skip).
    #[arg(long)]
    activation_samples: Option<usize>,
    /// Save the images every this many iterations (0: only at the end).
    #[arg(long, default_value_t = 10)]
    save_every: usize,
    /// Nearest tokens shown per vector.
    #[arg(long, default_value_t = 5)]
    top: usize,
}

fn main() {
    // A user mistake prints the error chain only, also with RUST_BACKTRACE=1 (common among Rust
    // users): library errors (candle's, anyhow's) capture backtraces under RUST_LIB_BACKTRACE,
    // which falls back to RUST_BACKTRACE. Panics (bugs) still print theirs.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Explain(args) => explain(&args),
        Command::Tokens {
            path,
            model,
            top,
            json,
        } => tokens(&path, &model, top, json),
        Command::Show {
            dir,
            reproduce,
            device,
            json,
        } => show(&dir, reproduce, device.as_deref(), json),
        Command::Parity {
            dirs,
            markdown,
            device,
        } => parity(&dirs, markdown, &device),
        Command::World(args) => diffexplainer::world::cli::run(&args),
        Command::Spurious { command } => spurious_cli::run(&command),
        Command::Sweep(args) => match &args.action {
            Some(SweepAction::Merge {
                dirs,
                csv,
                json,
                html,
            }) => sweep_merge(dirs, csv.as_deref(), json.as_deref(), html.as_deref()),
            None => sweep(&args.run),
        },
    }
}

fn parity(dirs: &[PathBuf], markdown: bool, device: &str) -> anyhow::Result<()> {
    let device = match device {
        "cpu" => candle_core::Device::Cpu,
        "cuda" => candle_core::Device::new_cuda(0)?,
        other => anyhow::bail!("unknown device `{other}` (use cpu or cuda)"),
    };
    let mut cases = Vec::new();
    for dir in dirs {
        if dir.join("case.json").is_file() {
            cases.push(dir.clone());
        } else {
            let found = diffexplainer::parity::find_cases(dir)?;
            if found.is_empty() {
                anyhow::bail!("{}: no case.json here or in its subfolders", dir.display())
            }
            cases.extend(found);
        }
    }
    let (mut passed, mut failed) = (0, 0);
    if markdown {
        println!("| case | kind | reference | worst forward rel. error | worst input-gradient rel. error | result |");
        println!("|---|---|---|---|---|---|");
    }
    for case in &cases {
        match diffexplainer::parity::run_case_on(case, &device) {
            Ok(report) if markdown => {
                println!("{}", markdown_row(&report));
                if report.passed() {
                    passed += 1
                } else {
                    failed += 1
                }
            }
            Ok(report) => {
                print!("{report}");
                if report.passed() {
                    passed += 1
                } else {
                    failed += 1
                }
            }
            Err(e) if markdown => {
                println!("{}", markdown_error_row(case, &format!("{e:#}")));
                eprintln!("{} ERROR: {e:#}", case.display());
                failed += 1;
            }
            Err(e) => {
                println!("{} ERROR: {e:#}", case.display());
                failed += 1;
            }
        }
    }
    if markdown {
        // A blank line ends the table: a line right after it would be read as one more row.
        println!();
    }
    println!("parity: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// A table row for a case that could not run: the error in the result column, one line, with
/// the characters that would break the table escaped.
fn markdown_error_row(case: &Path, error: &str) -> String {
    let name = case
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let error = error
        .replace('|', "\\|")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    format!("| {name} | - | - | - | - | ERROR: {error} |")
}

fn markdown_row(report: &diffexplainer::parity::CaseReport) -> String {
    let worst = |grad: bool| {
        report
            .comparisons
            .iter()
            .filter(|c| c.name.starts_with("grad.") == grad)
            .map(|c| c.rel)
            .fold(None, |acc: Option<f64>, r| {
                Some(acc.map_or(r, |a| a.max(r)))
            })
            .map_or("-".to_string(), |r| format!("{r:.1e}"))
    };
    let name = report
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    format!(
        "| {name} | `{}` | {} | {} | {} | {} |",
        report.kind,
        // The version suffix is the same for every case; the table's header states it once.
        report
            .reference
            .split(" (torch ")
            .next()
            .unwrap_or_default(),
        worst(false),
        worst(true),
        if report.passed() { "pass" } else { "FAIL" }
    )
}

impl DiffusionArgs {
    fn is_tiny(&self) -> bool {
        self.tiny
            || (self.preset.is_none() && self.model_dir.is_none() && self.hub.is_none())
            || self.preset.as_deref() == Some("tiny")
    }

    /// Whether any model option was given (beyond --device).
    fn any_given(&self) -> bool {
        self.preset.is_some()
            || self.model_dir.is_some()
            || self.hub.is_some()
            || self.tiny
            || self.tiny_seed.is_some()
            || self.lora.is_some()
            || self.lora_scale.is_some()
            || self.dtype.is_some()
    }

    /// The diffusion part of a spec (sampling defaults of the preset or folder), with
    /// `classifier`. Options that would have no effect are refused here, before anything loads.
    fn spec(&self, classifier: ClassifierSpec) -> anyhow::Result<ModelSpec> {
        if let Some(scale) = self.lora_scale {
            anyhow::ensure!(
                scale.is_finite(),
                "--lora-scale {scale}: the scale must be a finite number"
            );
        }
        if let Some(preset) = &self.preset {
            if !DIFFUSION_PRESETS.contains(&preset.as_str()) {
                anyhow::bail!(
                    "unknown model preset `{preset}` (known: {})",
                    DIFFUSION_PRESETS.join(", ")
                )
            }
        }
        if self.is_tiny() {
            if let Some(dir) = &self.model_dir {
                anyhow::bail!(
                    "--model-dir {} has no effect with --preset tiny (the embedded random models \
                     use no files); drop one of them",
                    dir.display()
                )
            }
            if let Some(repo) = &self.hub {
                anyhow::bail!(
                    "--hub {repo} has no effect with --preset tiny (the embedded random models \
                     use no files); drop one of them"
                )
            }
            if let Some(lora) = &self.lora {
                anyhow::bail!(
                    "--lora {} has no effect on the embedded tiny random models (a LoRA is \
                     trained for one checkpoint's weights); use it with --model-dir, --hub or \
                     a preset",
                    lora.display()
                )
            }
        } else if self.tiny_seed.is_some() {
            anyhow::bail!(
                "--tiny-seed only seeds the embedded tiny random models; it has no effect with \
                 --preset, --model-dir or --hub"
            )
        }
        // The model folder is checked (and named) first.
        if let Some(dir) = &self.model_dir {
            if !dir.is_dir() {
                anyhow::bail!(
                    "model folder {} {} (a diffusers folder: model_index.json, tokenizer/, \
                     text_encoder/, unet/, vae/, scheduler/)",
                    dir.display(),
                    diffexplainer::io::why_unusable(dir, true)
                )
            }
        }
        if let Some(path) = &self.lora {
            if !path.is_file() {
                anyhow::bail!(
                    "LoRA file {} {}",
                    path.display(),
                    diffexplainer::io::why_unusable(path, false)
                )
            }
        }
        let dtype = self.dtype.clone().unwrap_or_else(|| "f32".to_string());
        diffexplainer::explain::bundle::parse_dtype(&dtype)?;

        let mut spec = if self.is_tiny() {
            ModelSpec {
                classifier,
                ..ModelSpec::tiny(self.tiny_seed.unwrap_or(0))
            }
        } else if let Some(preset) = &self.preset {
            let mut spec = ModelSpec::preset(preset, self.model_dir.clone(), classifier)?;
            if let Some(repo) = &self.hub {
                spec.diffusion = DiffusionSource::Hub {
                    repo: repo.clone(),
                    revision: None,
                };
            }
            spec
        } else {
            let diffusion = match (&self.model_dir, &self.hub) {
                (Some(path), _) => DiffusionSource::Dir { path: path.clone() },
                (None, Some(repo)) => DiffusionSource::Hub {
                    repo: repo.clone(),
                    revision: None,
                },
                (None, None) => unreachable!("is_tiny covers it"),
            };
            ModelSpec {
                preset: None,
                diffusion,
                lora: None,
                scheduler: None,
                timestep_spacing: None,
                steps: 4,
                resolution: 512,
                classifier,
                dtype: "f32".to_string(),
            }
        };
        if let Some(path) = &self.lora {
            spec.lora = Some(LoraSpec {
                source: FileSource::Path { path: path.clone() },
                scale: 1.0,
            });
        }
        if let Some(scale) = self.lora_scale {
            match &mut spec.lora {
                Some(lora) => lora.scale = scale,
                None => anyhow::bail!(
                    "--lora-scale has no effect without a LoRA (give --lora FILE, or a preset \
                     that has one: sd15-lcm)"
                ),
            }
        }
        spec.dtype = dtype;
        Ok(spec)
    }
}

impl ModelArgs {
    fn is_tiny(&self) -> bool {
        self.diffusion.is_tiny()
    }

    fn classifier_spec(&self) -> anyhow::Result<ClassifierSpec> {
        match &self.classifier {
            Some(name) => ClassifierSpec::preset(name, self.classifier_checkpoint.clone()),
            None if self.is_tiny() => Ok(ClassifierSpec::tiny()),
            None => anyhow::bail!(
                "--classifier is required with a real diffusion model (one of: {})",
                CLASSIFIER_PRESETS
                    .iter()
                    .map(|p| p.0)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    fn spec(&self) -> anyhow::Result<ModelSpec> {
        // The diffusion options first (the model folder is named before the classifier).
        self.diffusion.spec(ClassifierSpec::tiny())?;
        let mut spec = self.diffusion.spec(self.classifier_spec()?)?;
        if let Some(s) = &self.scheduler {
            spec.scheduler = Some(s.clone());
        }
        if let Some(n) = self.steps {
            spec.steps = n;
        }
        if let Some(r) = self.resolution {
            spec.resolution = r;
        }
        Ok(spec)
    }
}

/// The tiny default's objective when none is given (its classes are arbitrary anyway).
const TINY_DEFAULT_CLASS: usize = 3;

/// What an explain run maximizes, before the class objective is chosen.
enum Target {
    Class {
        class: usize,
        features: Option<Vec<usize>>,
    },
    Neuron(usize),
    Features(Vec<usize>),
}

fn target_of(args: &ExplainArgs) -> anyhow::Result<Target> {
    if args.class_features.is_some() && args.class.is_none() {
        anyhow::bail!("--class-features adds features to a --class objective: give --class too")
    }
    Ok(match (args.class, args.neuron, &args.features) {
        (None, None, None) if args.model.is_tiny() => {
            eprintln!(
                "no objective given: maximizing class {TINY_DEFAULT_CLASS} (the default with the \
                 embedded models; choose with --class, --neuron or --features)"
            );
            Target::Class {
                class: TINY_DEFAULT_CLASS,
                features: None,
            }
        }
        (Some(c), None, None) => match &args.class_features {
            Some(f) if f.is_empty() => anyhow::bail!("--class-features needs at least one index"),
            f => Target::Class {
                class: c,
                features: f.clone(),
            },
        },
        (None, Some(n), None) => Target::Neuron(n),
        (None, None, Some(f)) if !f.is_empty() => Target::Features(f.clone()),
        (None, None, None) => {
            anyhow::bail!("say what to maximize: --class ID, --neuron INDEX or --features I,J,...")
        }
        _ => anyhow::bail!("give one of --class, --neuron, --features"),
    })
}

impl Target {
    fn class(&self) -> Option<usize> {
        match self {
            Target::Class { class, .. } => Some(*class),
            _ => None,
        }
    }
    fn objective(&self, class_objective: ClassObjective) -> Objective {
        let ce = class_objective == ClassObjective::CrossEntropy;
        match self {
            Target::Class {
                class,
                features: Some(f),
            } => Objective::class_with_features(*class, ce, f.clone()),
            Target::Class { class, .. } if ce => Objective::log_probability(*class),
            Target::Class { class, .. } => Objective::logit(*class),
            Target::Neuron(n) => Objective::neuron(*n),
            Target::Features(f) => Objective::features(f.clone()),
        }
    }
}

impl RunArgs {
    /// The options' own ranges and meanings, checked before anything loads or is written.
    fn check(&self, has_class: bool) -> anyhow::Result<RunChoices> {
        let at_least_one = [
            ("--tokens", self.tokens),
            ("--iterations", self.iterations.unwrap_or(1)),
            ("--batch", self.batch),
            ("--top", self.top),
            ("--early-stop", self.early_stop.unwrap_or(1)),
        ];
        if let Some((name, _)) = at_least_one.iter().find(|(_, v)| *v == 0) {
            anyhow::bail!("{name} must be at least 1")
        }
        if !has_class {
            if self.early_stop.is_some() {
                anyhow::bail!(
                    "--early-stop counts iterations in which every image is classified as \
                     --class; it has no meaning with --neuron/--features"
                )
            }
            if self.log_probability {
                anyhow::bail!("--log-probability applies to --class, not to --neuron/--features")
            }
            if self.class_objective.is_some() {
                anyhow::bail!("--class-objective applies to --class, not to --neuron/--features")
            }
            if self.activation_samples.is_some_and(|n| n > 0) {
                anyhow::bail!(
                    "--activation-samples counts images classified as --class; it has no \
                     meaning with --neuron/--features"
                )
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            anyhow::bail!("--lr must be a positive number, got {}", self.lr)
        }
        if let Some(n) = self.max_grad_norm.filter(|n| !(n.is_finite() && *n > 0.0)) {
            anyhow::bail!("--max-grad-norm must be a positive number, got {n}")
        }
        if let Some(g) = self.guidance.filter(|g| !(g.is_finite() && *g > 1.0)) {
            anyhow::bail!(
                "--guidance {g}: classifier-free guidance acts only above 1 (as in diffusers; at 1 \
                 the prediction is the conditional one alone, below it the prompt's effect \
                 shrinks, at 0 it has none); omit --guidance for no guidance"
            )
        }
        let class_objective = match (&self.class_objective, self.log_probability) {
            (Some(s), _) => Some(s.parse::<ClassObjective>()?),
            (None, true) => Some(ClassObjective::CrossEntropy),
            (None, false) => None,
        };
        Ok(RunChoices {
            recipe: self.recipe.as_deref().map(str::parse).transpose()?,
            iterations: self.iterations,
            early_stop: self.early_stop,
            class_objective,
            gradient_path: self.gradient_path.as_deref().map(str::parse).transpose()?,
            step_noise: self.step_noise.as_deref().map(str::parse).transpose()?,
            resize_antialias: self.resize_antialias,
        })
    }

    /// The settings for a loaded bundle (recipe notes go to stderr).
    fn settings(
        &self,
        choices: &RunChoices,
        has_class: bool,
        bundle: &ModelBundle,
    ) -> anyhow::Result<RunSettings> {
        let settings = choices.resolve(has_class, OptionEffects::of(bundle)?)?;
        for note in &settings.notes {
            eprintln!("{note}");
        }
        Ok(settings)
    }

    fn pipeline_options(&self, s: &RunSettings) -> PipelineOptions {
        PipelineOptions {
            batch: self.batch,
            seed: self.seed,
            guidance_scale: self.guidance,
            gradient_checkpointing: self.gradient_checkpointing,
            gradient_path: s.gradient_path,
            step_noise: s.step_noise,
            resize_antialias: s.resize_antialias,
        }
    }

    fn optimize_config(&self, s: &RunSettings, target_class: Option<usize>) -> OptimizeConfig {
        OptimizeConfig {
            iterations: s.iterations,
            lr: self.lr,
            max_grad_norm: self.max_grad_norm,
            early_stop: match (s.early_stop, target_class) {
                (Some(n), Some(class)) => Some(EarlyStop {
                    class,
                    consecutive: n,
                }),
                _ => None,
            },
            ..OptimizeConfig::default()
        }
    }

    fn init(&self) -> (SoftPromptInit, String) {
        match &self.init_word {
            Some(w) => (SoftPromptInit::Word(w.clone()), format!("word:{w}")),
            None => (
                SoftPromptInit::Random { seed: self.seed },
                format!("random:{}", self.seed),
            ),
        }
    }

    fn activation_samples(&self, has_class: bool, device: &candle_core::Device) -> usize {
        match self.activation_samples {
            Some(n) => n,
            None if has_class => diffexplainer::explain::activation::default_samples(device),
            None => 0,
        }
    }
}

fn explain(args: &ExplainArgs) -> anyhow::Result<()> {
    // The model options first: the model folder is named before anything else.
    let spec = args.model.spec()?;
    let target = target_of(args)?;
    let target_class = target.class();
    let device = parse_device(&args.model.diffusion.device)?;
    let choices = args.run.check(target_class.is_some())?;
    let bundle = ModelBundle::load(&spec, &device)?;
    let settings = args
        .run
        .settings(&choices, target_class.is_some(), &bundle)?;
    let objective = target.objective(settings.class_objective);
    let options = args.run.pipeline_options(&settings);
    let pipeline = DiffusionPipeline::new(bundle, options.clone())?;
    // Check the objective against the classifier before writing anything (a cheap classifier
    // pass on a gray image; the loop would only find out after the first diffusion run).
    let side = spec.resolution;
    let gray = candle_core::Tensor::full(0.5f32, (1, 3, side, side), &device)?;
    objective
        .validate(&pipeline.classify(&gray)?)
        .with_context(|| format!("objective {objective}"))?;
    let (init, init_text) = args.run.init();
    let mut prompt = pipeline.new_prompt(&args.run.template, args.run.tokens, &init)?;
    let optimize = args.run.optimize_config(&settings, target_class);
    let mut config = RunConfig::new(
        pipeline.bundle().spec.clone(),
        &device,
        options,
        &args.run.template,
        args.run.tokens,
        init_text,
        objective,
        target_class,
        optimize,
        args.run.save_every,
    );
    config.activation_samples = args.run.activation_samples(target_class.is_some(), &device);
    config.recipe = choices.recipe.map(|r| r.to_string());
    let (out, created) = match &args.out {
        Some(dir) => (dir.clone(), !dir.exists()),
        None => (
            diffexplainer::explain::record::create_free_dir(
                Path::new("runs"),
                &format!("explain-{}", config.started_at),
            )?,
            true,
        ),
    };

    let cancel = CancelToken::new();
    {
        let cancel = cancel.clone();
        ctrlc::set_handler(move || {
            if cancel.is_cancelled() {
                eprintln!("\ninterrupted again: exiting without finishing the record");
                std::process::exit(130);
            }
            eprintln!("\ncancelling after this iteration (Ctrl-C again to quit now)...");
            cancel.cancel();
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let bar = indicatif::ProgressBar::new(config.optimize.iterations as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )?
        .progress_chars("=> "),
    );
    let mut best = f64::NEG_INFINITY;
    let mut recorded = 0usize;
    let run = run_recorded(
        &out,
        &pipeline,
        &mut prompt,
        &config,
        &cancel,
        args.run.top,
        |m| {
            recorded += 1;
            best = best.max(m.objective);
            bar.set_message(format!("objective {:.4} (best {best:.4})", m.objective));
            bar.inc(1);
        },
    );
    let (result, summary) = match run {
        Ok(done) => done,
        Err(e) => {
            // No orphan records: a folder this run made that holds no iteration is removed.
            if created && recorded == 0 {
                let _ = std::fs::remove_dir_all(&out);
            }
            return Err(e);
        }
    };
    bar.finish_and_clear();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "record": out,
                "summary": summary,
            }))?
        );
    } else {
        println!(
            "{} after {} iteration(s): objective {} {:.4} -> best {:.4} (iteration {})",
            summary.stop,
            result.metrics.len(),
            config.objective_text,
            summary.first_objective,
            summary.best_objective,
            summary.best_iteration
        );
        if let Some(e) = &summary.explanation {
            print!("{e}");
        }
        if let Some(a) = &summary.activation {
            print!("{a}");
        }
        println!("record: {}", out.display());
    }
    if cancel.is_cancelled() {
        // The record is complete, but the run was interrupted: exit as an interrupted process
        // does (128 + SIGINT), so `explain ... && next` in a script stops here.
        std::process::exit(130);
    }
    Ok(())
}

fn tokens(path: &Path, model: &DiffusionArgs, top: usize, json: bool) -> anyhow::Result<()> {
    let device = parse_device(&model.device)?;
    let (prompt_path, spec) = if path.is_dir() {
        if model.any_given() {
            anyhow::bail!(
                "{} is a run record, which names its own models: drop --preset, --model-dir, \
                 --hub, --tiny, --tiny-seed, --lora, --lora-scale and --dtype (they would have \
                 no effect)",
                path.display()
            )
        }
        let record = RunRecord::open(path)?;
        (
            path.join(diffexplainer::explain::record::PROMPT_FILE),
            record.config.model,
        )
    } else {
        if !path.is_file() {
            anyhow::bail!(
                "soft prompt {} {}",
                path.display(),
                diffexplainer::io::why_unusable(path, false)
            )
        }
        // A prompt file stores its vectors and template, not the text encoder they live in;
        // nearest tokens in another model's vocabulary space would be a silent wrong answer.
        let names_a_model = model.preset.is_some()
            || model.model_dir.is_some()
            || model.hub.is_some()
            || model.tiny
            || model.tiny_seed.is_some();
        if !names_a_model {
            anyhow::bail!(
                "{}: a soft prompt file does not record the model it was optimized for: name it \
                 with --model-dir, --hub or --preset (or --tiny for the embedded models), or pass \
                 the run record folder, which names its own",
                path.display()
            )
        }
        // Only the tokenizer and text encoder are loaded: no classifier is needed.
        (path.to_path_buf(), model.spec(ClassifierSpec::tiny())?)
    };
    let prompt = SoftPrompt::load(&prompt_path, &device)?;
    let (tokenizer, text_encoder) = spec.load_text_encoder(&device)?;
    let e = nearest_tokens(
        prompt.template(),
        prompt.vectors().as_tensor(),
        &text_encoder,
        &tokenizer,
        top,
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        print!("{e}");
    }
    Ok(())
}

fn show(dir: &Path, reproduce: bool, device: Option<&str>, json: bool) -> anyhow::Result<()> {
    let record = RunRecord::open(dir)?;
    let reproduction = if reproduce {
        let device = parse_device(device.unwrap_or(&record.config.device))?;
        Some(record.reproduce(&device)?)
    } else {
        None
    };
    let c = &record.config;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "record": dir,
                "config": c,
                "summary": record.summary,
                "iterations_recorded": record.iterations_recorded,
                "reproduction": reproduction.as_ref().map(|r| serde_json::json!({
                    "identical": r.identical,
                    "png_identical": r.png_identical,
                    "max_abs_diff": r.max_abs_diff,
                })),
            }))?
        );
        return Ok(());
    }
    let model = match &c.model.diffusion {
        DiffusionSource::Tiny { seed } => format!("tiny random models (seed {seed})"),
        DiffusionSource::Dir { path } => format!("diffusers folder {}", path.display()),
        DiffusionSource::Hub { repo, revision } => format!(
            "{repo} (revision {})",
            revision.as_deref().unwrap_or("unknown")
        ),
    };
    println!("record     {}", dir.display());
    println!(
        "model      {model}{}, {} {} step(s), {}px, {} on {}",
        c.model
            .preset
            .as_ref()
            .map(|p| format!(" [preset {p}]"))
            .unwrap_or_default(),
        c.model.scheduler.as_deref().unwrap_or("folder's scheduler"),
        c.model.steps,
        c.model.resolution,
        c.model.dtype,
        c.device
    );
    println!(
        "classifier {}{}",
        c.model.classifier.arch,
        c.model
            .classifier
            .checkpoint
            .as_ref()
            .map(|p| format!(" from {}", p.display()))
            .unwrap_or_default()
    );
    println!(
        "objective  {} | template {:?}, {} soft token(s), init {} | seed {}, batch {}, lr {}",
        c.objective_text,
        c.template,
        c.num_vectors,
        c.init,
        c.pipeline.seed,
        c.pipeline.batch,
        c.optimize.lr
    );
    println!(
        "settings   gradient {:?}, step noise {:?}, resize antialias {}, early stop {}, \
         recipe {}",
        c.pipeline.gradient_path,
        c.pipeline.step_noise,
        c.pipeline.resize_antialias,
        c.optimize
            .early_stop
            .map_or("off".to_string(), |e| format!("after {}", e.consecutive)),
        c.recipe.as_deref().unwrap_or("none")
    );
    println!(
        "versions   diffexplainer {}, candle {}",
        c.diffexplainer_version, c.candle_version
    );
    match &record.summary {
        Some(s) => {
            println!(
                "result     {} after {} of {} iteration(s): objective {:.4} -> best {:.4} \
                 (iteration {}), {:.1}s",
                s.stop,
                s.iterations,
                c.optimize.iterations,
                s.first_objective,
                s.best_objective,
                s.best_iteration,
                s.seconds
            );
            if let Some(e) = &s.explanation {
                print!("{e}");
            }
            if let Some(a) = &s.activation {
                print!("{a}");
            }
        }
        None => {
            let best = record
                .objectives
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max);
            println!(
                "result     INCOMPLETE (no summary.json: killed or still running): {} of {} \
                 iteration(s) recorded, best objective so far {best:.4}",
                record.iterations_recorded, c.optimize.iterations
            );
        }
    }
    if let Some(r) = reproduction {
        println!(
            "reproduce  {} (max abs difference {:.3e}; best.png {})",
            if r.identical {
                "bit for bit identical"
            } else {
                "DIFFERENT"
            },
            r.max_abs_diff,
            if r.png_identical {
                "identical"
            } else {
                "differs"
            }
        );
    }
    Ok(())
}

fn sweep(args: &SweepRunArgs) -> anyhow::Result<()> {
    use diffexplainer::explain::sweep::{
        jobs_from_salient_imagenet, read_job_list, run_sweep, Shard, SweepSettings,
    };
    let spec = args.model.spec()?;
    let device = parse_device(&args.model.diffusion.device)?;
    let Some(out) = &args.out else {
        anyhow::bail!("--out DIR is required: the sweep folder that holds one record per job")
    };
    if args.with_class_features && args.salient_jobs.as_deref() == Some("pairs") {
        anyhow::bail!("--with-class-features adds features to class jobs; pair jobs have none")
    }
    if args.list.is_some() && (args.with_class_features || args.salient_jobs.is_some()) {
        anyhow::bail!(
            "--with-class-features and --salient-jobs apply to --salient-imagenet jobs; a --list \
             says each job itself (CLASS or CLASS,FEATURE lines)"
        )
    }
    let jobs = match (&args.list, &args.salient_imagenet) {
        (Some(list), None) => read_job_list(list)?,
        (None, Some(csv)) => {
            let pairs = match args.salient_jobs.as_deref() {
                None | Some("classes") => false,
                Some("pairs") => true,
                Some(other) => {
                    anyhow::bail!("--salient-jobs {other}: expected classes or pairs")
                }
            };
            let annotations =
                diffexplainer::spurious::salient_imagenet::SalientImagenet::from_path(csv)?;
            jobs_from_salient_imagenet(&annotations, pairs, args.with_class_features)
        }
        _ => anyhow::bail!("give the jobs: --list FILE or --salient-imagenet CSV"),
    };
    let jobs = match &args.shard {
        Some(s) => s.parse::<Shard>()?.select(&jobs),
        None => jobs,
    };
    if args.run.early_stop.is_some() && jobs.iter().all(|j| j.feature.is_some()) {
        anyhow::bail!(
            "--early-stop applies to class jobs; every job here is a (class, feature) pair, \
             which maximizes its feature for every iteration"
        )
    }
    if args.max_jobs == Some(0) {
        anyhow::bail!("--max-jobs must be at least 1")
    }
    let choices = args.run.check(true)?;
    let bundle = ModelBundle::load(&spec, &device)?;
    let settings = args.run.settings(&choices, true, &bundle)?;
    let options = args.run.pipeline_options(&settings);
    let pipeline = DiffusionPipeline::new(bundle, options)?;
    let (init, _) = args.run.init();
    let sweep_settings = SweepSettings {
        template: args.run.template.clone(),
        num_vectors: args.run.tokens,
        init,
        optimize: args.run.optimize_config(&settings, None),
        early_stop: settings.early_stop,
        class_objective: settings.class_objective,
        activation_samples: args.run.activation_samples(true, &device),
        save_every: args.run.save_every,
        top_k: args.run.top,
        recipe: choices.recipe.map(|r| r.to_string()),
    };
    let cancel = CancelToken::new();
    {
        let cancel = cancel.clone();
        ctrlc::set_handler(move || {
            if cancel.is_cancelled() {
                std::process::exit(130);
            }
            eprintln!("\ncancelling: the current job stops at its next iteration and is redone on the next start");
            cancel.cancel();
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let total = jobs.len();
    let report = run_sweep(
        &pipeline,
        &sweep_settings,
        &jobs,
        out,
        args.max_jobs,
        &cancel,
        |job, i| eprintln!("[{}/{total}] {}", i + 1, job.name()),
    )?;
    println!(
        "sweep {}: {} job(s) in this share, {} run now, {} already finished, {} unfinished redone, {} left",
        out.display(),
        total,
        report.ran.len(),
        report.skipped.len(),
        report.redone.len(),
        total - report.ran.len() - report.skipped.len()
    );
    if let Some(job) = &report.interrupted {
        eprintln!("{job}: interrupted; it has no FINISHED marker and is redone on the next start");
        // As `explain`: an interrupted run exits 128 + SIGINT, so scripts stop here.
        std::process::exit(130);
    }
    Ok(())
}

fn sweep_merge(
    dirs: &[PathBuf],
    csv: Option<&Path>,
    json: Option<&Path>,
    html: Option<&Path>,
) -> anyhow::Result<()> {
    use diffexplainer::explain::sweep::{merge, to_csv, to_html, to_json};
    let (rows, unfinished) = merge(dirs)?;
    for dir in &unfinished {
        eprintln!("{}: unfinished, left out", dir.display());
    }
    let write = |path: &Path, text: String| -> anyhow::Result<()> {
        diffexplainer::io::write_bytes_atomically(path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))
    };
    if csv.is_none() && json.is_none() && html.is_none() {
        print!("{}", to_csv(&rows)?);
    }
    if let Some(p) = csv {
        write(p, to_csv(&rows)?)?;
    }
    if let Some(p) = json {
        write(p, to_json(&rows)?)?;
    }
    if let Some(p) = html {
        write(p, to_html(&rows)?)?;
    }
    eprintln!(
        "{} finished job(s), {} unfinished",
        rows.len(),
        unfinished.len()
    );
    Ok(())
}
