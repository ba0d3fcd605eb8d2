//! `diffexplainer` command line: `explain` (optimize a soft prompt and record the run),
//! `tokens` (the nearest vocabulary tokens of a saved prompt), `show` (summarize a record),
//! `parity` (check modules against their reference libraries).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use diffexplainer::explain::bundle::{
    ClassifierSpec, DiffusionSource, FileSource, LoraSpec, ModelSpec, CLASSIFIER_PRESETS,
    DIFFUSION_PRESETS,
};
use diffexplainer::explain::optimize::EarlyStop;
use diffexplainer::explain::record::{parse_device, run_recorded, RunConfig, RunRecord};
use diffexplainer::explain::{
    nearest_tokens, CancelToken, DiffusionPipeline, ModelBundle, Objective, OptimizeConfig,
    PipelineOptions, SoftPrompt, SoftPromptInit,
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
        #[command(flatten)]
        model: ModelArgs,
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
        #[arg(long)]
        device: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// ShapesWorld: render the world, train the classifier under audit, measure its ground truth.
    World(diffexplainer::world::cli::WorldArgs),
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

/// Which models: the embedded tiny default, a preset, a local folder or a cached Hub id.
#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// Diffusion preset: sd15-lcm (SD 1.5 + LCM-LoRA, 4 steps), sd-turbo (1 step), tiny
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
    /// Seed of the tiny random models' weights.
    #[arg(long, default_value_t = 0)]
    tiny_seed: u64,
    /// A LoRA to fuse into the UNet (e.g. LCM-LoRA's pytorch_lora_weights.safetensors).
    #[arg(long)]
    lora: Option<PathBuf>,
    #[arg(long, default_value_t = 1.0)]
    lora_scale: f64,
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
    /// The classifier's checkpoint (.pth/.pt/.safetensors). Without it torchvision's file is
    /// looked up in the torch hub cache.
    #[arg(long)]
    classifier_checkpoint: Option<PathBuf>,
    /// f32, f16, bf16 or f64 for the diffusion models.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or cuda:N (needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args, Debug)]
struct ExplainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Maximize this class's logit.
    #[arg(long, conflicts_with_all = ["neuron", "features"])]
    class: Option<usize>,
    /// Maximize this penultimate-layer neuron (pooled feature index).
    #[arg(long, conflicts_with = "features")]
    neuron: Option<usize>,
    /// Maximize the mean of these penultimate features (comma-separated indices).
    #[arg(long, value_delimiter = ',')]
    features: Option<Vec<usize>>,
    /// Maximize the log-probability of --class instead of its logit.
    #[arg(long, requires = "class")]
    log_probability: bool,
    /// The prompt around the soft tokens; `{}` marks where they go.
    #[arg(long, default_value = "A texture of {}")]
    template: String,
    /// Number of soft tokens (learnable vectors).
    #[arg(long, default_value_t = 1)]
    tokens: usize,
    /// Start the vectors at this word's token embeddings (default: random, from --seed).
    #[arg(long)]
    init_word: Option<String>,
    #[arg(long, default_value_t = 30)]
    iterations: usize,
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
    /// Stop once every image is classified as --class this many iterations in a row.
    #[arg(long, requires = "class")]
    early_stop: Option<usize>,
    /// Clip the gradient to this L2 norm.
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Recompute UNet activations in backward (less memory).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// The run record folder (default: runs/explain-<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Save the images every this many iterations (0: only at the end).
    #[arg(long, default_value_t = 10)]
    save_every: usize,
    /// Nearest tokens shown per vector.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print the summary as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
}

fn main() {
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
            Err(e) => {
                println!("{} ERROR: {e:#}", case.display());
                failed += 1;
            }
        }
    }
    println!("parity: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
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

impl ModelArgs {
    fn is_tiny(&self) -> bool {
        self.tiny
            || (self.preset.is_none() && self.model_dir.is_none() && self.hub.is_none())
            || self.preset.as_deref() == Some("tiny")
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
        if let Some(preset) = &self.preset {
            if !DIFFUSION_PRESETS.contains(&preset.as_str()) {
                anyhow::bail!(
                    "unknown model preset `{preset}` (known: {})",
                    DIFFUSION_PRESETS.join(", ")
                )
            }
        }
        let classifier = self.classifier_spec()?;
        let mut spec = if self.is_tiny() {
            ModelSpec {
                classifier,
                ..ModelSpec::tiny(self.tiny_seed)
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
                scale: self.lora_scale,
            });
        }
        if let Some(s) = &self.scheduler {
            spec.scheduler = Some(s.clone());
        }
        if let Some(n) = self.steps {
            spec.steps = n;
        }
        if let Some(r) = self.resolution {
            spec.resolution = r;
        }
        diffexplainer::explain::bundle::parse_dtype(&self.dtype)?;
        spec.dtype = self.dtype.clone();
        Ok(spec)
    }
}

/// The tiny default's objective when none is given (its classes are arbitrary anyway).
const TINY_DEFAULT_CLASS: usize = 3;

fn objective_of(args: &ExplainArgs) -> anyhow::Result<(Objective, Option<usize>)> {
    Ok(match (args.class, args.neuron, &args.features) {
        (None, None, None) if args.model.is_tiny() => {
            eprintln!(
                "no objective given: maximizing class {TINY_DEFAULT_CLASS}'s logit of the tiny \
                 random classifier (choose with --class, --neuron or --features)"
            );
            (
                Objective::logit(TINY_DEFAULT_CLASS),
                Some(TINY_DEFAULT_CLASS),
            )
        }
        (Some(c), None, None) if args.log_probability => (Objective::log_probability(c), Some(c)),
        (Some(c), None, None) => (Objective::logit(c), Some(c)),
        (None, Some(n), None) => (Objective::neuron(n), None),
        (None, None, Some(f)) if !f.is_empty() => (Objective::features(f.clone()), None),
        (None, None, None) => {
            anyhow::bail!("say what to maximize: --class ID, --neuron INDEX or --features I,J,...")
        }
        _ => anyhow::bail!("give one of --class, --neuron, --features"),
    })
}

fn explain(args: &ExplainArgs) -> anyhow::Result<()> {
    let (objective, target_class) = objective_of(args)?;
    let spec = args.model.spec()?;
    let device = parse_device(&args.model.device)?;
    if args.tokens == 0 {
        anyhow::bail!("--tokens must be at least 1")
    }
    let bundle = ModelBundle::load(&spec, &device)?;
    let options = PipelineOptions {
        batch: args.batch,
        seed: args.seed,
        guidance_scale: args.guidance,
        gradient_checkpointing: args.gradient_checkpointing,
    };
    let pipeline = DiffusionPipeline::new(bundle, options.clone())?;
    // Check the objective against the classifier before writing anything (a cheap classifier
    // pass on a gray image; the loop would only find out after the first diffusion run).
    let side = spec.resolution;
    let gray = candle_core::Tensor::full(0.5f32, (1, 3, side, side), &device)?;
    objective
        .validate(&pipeline.classify(&gray)?)
        .with_context(|| format!("objective {objective}"))?;
    let init = match &args.init_word {
        Some(w) => SoftPromptInit::Word(w.clone()),
        None => SoftPromptInit::Random { seed: args.seed },
    };
    let init_text = match &init {
        SoftPromptInit::Word(w) => format!("word:{w}"),
        SoftPromptInit::Random { seed } => format!("random:{seed}"),
    };
    let mut prompt = pipeline.new_prompt(&args.template, args.tokens, &init)?;
    let optimize = OptimizeConfig {
        iterations: args.iterations,
        lr: args.lr,
        max_grad_norm: args.max_grad_norm,
        early_stop: match (args.early_stop, target_class) {
            (Some(n), Some(class)) => Some(EarlyStop {
                class,
                consecutive: n,
            }),
            _ => None,
        },
        ..OptimizeConfig::default()
    };
    let config = RunConfig::new(
        pipeline.bundle().spec.clone(),
        &device,
        options,
        &args.template,
        args.tokens,
        init_text,
        objective,
        target_class,
        optimize,
        args.save_every,
    );
    let out = match &args.out {
        Some(dir) => dir.clone(),
        None => PathBuf::from("runs").join(format!("explain-{}", config.started_at)),
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
    let bar = indicatif::ProgressBar::new(args.iterations as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )?
        .progress_chars("=> "),
    );
    let mut best = f64::NEG_INFINITY;
    let (result, summary) = run_recorded(
        &out,
        &pipeline,
        &mut prompt,
        &config,
        &cancel,
        args.top,
        |m| {
            best = best.max(m.objective);
            bar.set_message(format!("objective {:.4} (best {best:.4})", m.objective));
            bar.inc(1);
        },
    )?;
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
        println!("record: {}", out.display());
    }
    Ok(())
}

fn tokens(path: &Path, model: &ModelArgs, top: usize, json: bool) -> anyhow::Result<()> {
    let device = parse_device(&model.device)?;
    let (prompt_path, spec) = if path.is_dir() {
        let record = RunRecord::open(path)?;
        (
            path.join(diffexplainer::explain::record::PROMPT_FILE),
            record.config.model,
        )
    } else {
        (path.to_path_buf(), model.spec()?)
    };
    let prompt = SoftPrompt::load(&prompt_path, &device)?;
    let (tokenizer, text_encoder) = spec.load_text_encoder(&device)?;
    let e = nearest_tokens(
        prompt.template(),
        prompt.vectors().as_tensor(),
        &text_encoder.token_embedding,
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
