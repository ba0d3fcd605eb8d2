//! `diffexplainer spurious label|agreement`: label a class's features core / spurious and score
//! labels against Salient ImageNet's annotations (`docs/spurious.md`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use diffexplainer::explain::bundle::{ModelBundle, FOLDER_ARCH};
use diffexplainer::explain::record::parse_device;
use diffexplainer::explain::{
    CancelToken, DiffusionPipeline, OptimizeConfig, PipelineOptions, SoftPromptInit,
};
use diffexplainer::models::classifiers::ClassifierFolderConfig;
use diffexplainer::models::clipseg::{ClipSegForImageSegmentation, ClipSegProcessor, Segmenter};
use diffexplainer::spurious::labeller::{check_job, DEFAULT_QUERY_TEMPLATE};
use diffexplainer::spurious::labelling::tiny_random_segmenter;
use diffexplainer::spurious::salient_imagenet::{agreement, Label, SalientImagenet};
use diffexplainer::spurious::table::{check_output_dir, find_tables};
use diffexplainer::spurious::{
    label_class, ClassTarget, CoreCriterion, LabelConfig, LabelRule, Verdict,
};

use super::ModelArgs;

#[derive(Subcommand)]
pub enum SpuriousCommand {
    /// Label a class's features core or spurious: per feature, generate images that maximize
    /// it, segment the class object with a text query, and measure the share of the feature's
    /// activation on the object. Writes labels.json, labels.csv, table.html and the images,
    /// masks and heatmaps to --out.
    Label(Box<LabelArgs>),
    /// Agreement of our labels with Salient ImageNet's MTurk annotations: confusion matrix,
    /// balanced accuracy, spurious precision / recall / F1 (uncertain labels left out and
    /// counted).
    Agreement(AgreementArgs),
}

#[derive(Args)]
pub struct LabelArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The class (classifier output index).
    #[arg(long)]
    class: usize,
    /// The class's name in the segmentation query (default: the classifier folder's class
    /// name, or the ShapesWorld class with --top-k).
    #[arg(long)]
    class_name: Option<String>,
    /// The features to label, in rank order (comma-separated penultimate indices).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["salient_csv", "top_k"])]
    features: Option<Vec<usize>>,
    /// Label the features Salient ImageNet's MTurk CSV annotates for --class (by rank).
    #[arg(long, conflicts_with = "top_k")]
    salient_csv: Option<PathBuf>,
    /// Label the class's K most predictive features (mean activation × class weight) measured
    /// on ShapesWorld's balanced images of the class.
    #[arg(long)]
    top_k: Option<usize>,
    /// The ShapesWorld spec whose images --top-k measures on (default: the embedded default
    /// world).
    #[arg(long, requires = "top_k")]
    world: Option<PathBuf>,
    /// Balanced world images of the class --top-k measures on (default 50).
    #[arg(long)]
    images_per_class: Option<usize>,
    /// The segmenter: a CLIPSeg folder (config.json + model.safetensors, e.g. a snapshot of
    /// CIDAS/clipseg-rd64-refined), or `tiny` (random weights: for trying the command only,
    /// its masks mean nothing).
    #[arg(long)]
    segmenter: String,
    /// The query naming the class object; `{}` is replaced by the class name.
    #[arg(long, default_value = DEFAULT_QUERY_TEMPLATE)]
    query_template: String,
    /// Images generated per feature (the explainer's batch).
    #[arg(long, default_value_t = 4)]
    images: usize,
    /// Explainer iterations per feature.
    #[arg(long, default_value_t = 30)]
    iterations: usize,
    /// The soft prompt's template; `{}` marks the soft tokens.
    #[arg(long, default_value = "A texture of {}")]
    template: String,
    #[arg(long, default_value_t = 1)]
    tokens: usize,
    /// Seed of the noises and of the soft prompt's random start.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// Also maximize the class logit with this weight (default: the feature alone).
    #[arg(long)]
    class_weight: Option<f64>,
    /// Core when the feature's object density ratio (share/area over (1-share)/(1-area)) of
    /// score - margin reaches this: ShapesWorld's ground truth's criterion [default: 2]
    #[arg(long, conflicts_with = "core_share")]
    core_density_ratio: Option<f64>,
    /// Core when the object share of score - margin reaches this instead (e.g. 0.5)
    #[arg(long)]
    core_share: Option<f64>,
    /// Confidence of the t interval around the mean share.
    #[arg(long, default_value_t = 0.95)]
    confidence: f64,
    /// The output folder (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Print the table as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct AgreementArgs {
    /// Salient ImageNet's MTurk results CSV (discover_spurious_features.csv).
    #[arg(long)]
    salient_csv: PathBuf,
    /// Label folders written by `spurious label`, or folders holding them.
    #[arg(long, required = true, num_args = 1..)]
    labels: Vec<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(command: &SpuriousCommand) -> anyhow::Result<()> {
    match command {
        SpuriousCommand::Label(args) => label(args),
        SpuriousCommand::Agreement(args) => agreement_cmd(args),
    }
}

fn label(args: &LabelArgs) -> anyhow::Result<()> {
    // Everything checkable before loading or writing: the output folder, the options' ranges.
    check_output_dir(&args.out)?;
    let spec = args.model.spec()?;
    let device = parse_device(&args.model.diffusion.device)?;
    for (name, v) in [
        ("--images", args.images),
        ("--iterations", args.iterations),
        ("--tokens", args.tokens),
    ] {
        if v == 0 {
            anyhow::bail!("{name} must be at least 1")
        }
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        anyhow::bail!("--lr must be a positive number, got {}", args.lr)
    }
    let rule = LabelRule {
        core: match (args.core_share, args.core_density_ratio) {
            (Some(share), _) => CoreCriterion::Share(share),
            (None, Some(ratio)) => CoreCriterion::DensityRatio(ratio),
            (None, None) => LabelRule::default().core,
        },
        confidence: args.confidence,
    };
    rule.validate()?;
    if args.features.is_none() && args.salient_csv.is_none() && args.top_k.is_none() {
        anyhow::bail!(
            "say which features to label: --features I,J,..., --salient-csv FILE or --top-k K"
        )
    }
    // clap's `requires` is not checked for an argument with a default, so this one is checked
    // here: without --top-k no world images are measured and the value would do nothing.
    if args.images_per_class.is_some() && args.top_k.is_none() {
        anyhow::bail!("--images-per-class has no effect without --top-k (it sets how many world images measure the top-k features)")
    }
    let salient = match &args.salient_csv {
        Some(path) => Some(SalientImagenet::from_path(path)?),
        None => None,
    };
    let world = match (&args.top_k, &args.world) {
        (Some(_), Some(path)) => Some(diffexplainer::world::spec::WorldSpec::from_file(path)?),
        (Some(_), None) => Some(diffexplainer::world::spec::WorldSpec::default_world()),
        _ => None,
    };
    let folder_names = if spec.classifier.arch == FOLDER_ARCH {
        let dir = spec.classifier.checkpoint.as_ref().expect("a folder");
        ClassifierFolderConfig::read(dir)?.class_names
    } else {
        Vec::new()
    };
    // The world's images are labelled by the world's class order: another order (or other
    // names) would measure class c's features on another class's images.
    if let Some(w) = &world {
        if !folder_names.is_empty() && folder_names != w.classes {
            anyhow::bail!(
                "--top-k: the classifier's classes {:?} are not the world's {:?}: give the spec \
                 the classifier was trained on (--world)",
                folder_names,
                w.classes
            )
        }
    }

    let segmenter = load_segmenter(&args.segmenter, &device)?;
    let bundle = ModelBundle::load(&spec, &device)?;
    let classes = bundle.classifier.num_classes();
    bundle.classifier.check_class(args.class)?;
    let class_name = match (&args.class_name, &world) {
        (Some(name), _) => name.clone(),
        (None, Some(w)) if w.classes.len() == classes => w.classes[args.class].clone(),
        (None, _) if folder_names.len() == classes => folder_names[args.class].clone(),
        _ => anyhow::bail!(
            "the classifier does not name class {}: give --class-name NAME for the \
             segmentation query",
            args.class
        ),
    };
    let target = ClassTarget {
        index: args.class,
        name: class_name,
    };

    let features: Vec<usize> = if let Some(f) = &args.features {
        f.clone()
    } else if let Some(s) = &salient {
        for skip in s.skipped.iter().filter(|p| p.class_index == args.class) {
            eprintln!(
                "skipped: class {}, feature {}: {}",
                skip.class_index, skip.feature_index, skip.reason
            );
        }
        let f = s.class_features(args.class);
        if f.is_empty() {
            anyhow::bail!(
                "{}: no annotated (class, feature) pair for class {} ({} pairs read, {} skipped)",
                args.salient_csv.as_ref().expect("salient").display(),
                args.class,
                s.pairs.len(),
                s.skipped.len()
            )
        }
        f
    } else {
        let k = args.top_k.expect("one source is given");
        let world = world.as_ref().expect("read with --top-k");
        top_k_on_world(
            &bundle,
            world,
            args.class,
            k,
            args.images_per_class.unwrap_or(50),
        )?
    };

    let pipeline = DiffusionPipeline::new(
        bundle,
        PipelineOptions {
            batch: args.images,
            seed: args.seed,
            ..PipelineOptions::default()
        },
    )?;
    let config = LabelConfig {
        template: args.template.clone(),
        tokens: args.tokens,
        init: SoftPromptInit::Random { seed: args.seed },
        optimize: OptimizeConfig {
            iterations: args.iterations,
            lr: args.lr,
            ..OptimizeConfig::default()
        },
        class_weight: args.class_weight,
        query_template: args.query_template.clone(),
        rule,
        nearest_top: 5,
    };
    let query = check_job(&pipeline, &segmenter, &target, &features, &config)?;
    eprintln!(
        "labelling {} feature(s) of class {} ({:?}), query {query:?}, {} images each",
        features.len(),
        target.index,
        target.name,
        args.images
    );
    let cancel = CancelToken::new();
    {
        let cancel = cancel.clone();
        ctrlc::set_handler(move || {
            eprintln!("\ncancelling (nothing is written)...");
            cancel.cancel();
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    // The CSV's own ranks (a skipped pair leaves a gap); otherwise the position in the list.
    let rank_of = |feature: usize, position: usize| -> usize {
        salient
            .as_ref()
            .and_then(|s| {
                s.pairs
                    .iter()
                    .find(|p| p.class_index == args.class && p.feature_index == feature)
            })
            .map_or(position, |p| p.feature_rank)
    };
    let mut table = label_class(
        &pipeline,
        &segmenter,
        &target,
        &features,
        &config,
        &cancel,
        |row| {
            eprintln!(
                "  feature {} (rank {}): {} score {} margin {} core if >= {} ({}/{} images active)",
                row.feature,
                rank_of(row.feature, row.rank),
                row.label,
                row.score.map_or("-".into(), |v| format!("{v:.3}")),
                row.margin.map_or("-".into(), |v| format!("{v:.3}")),
                row.share_threshold
                    .map_or("-".into(), |v| format!("{v:.3}")),
                row.active_images,
                row.images
            )
        },
    )?;
    for row in &mut table.rows {
        row.rank = rank_of(row.feature, row.rank);
    }
    table.save(&args.out)?;
    if args.json {
        println!("{}", table.to_json()?);
    } else {
        println!("{}", table.to_text());
        println!("written to {}", args.out.display());
    }
    Ok(())
}

fn load_segmenter(name: &str, device: &candle_core::Device) -> anyhow::Result<Segmenter> {
    if name == "tiny" {
        return tiny_random_segmenter(0);
    }
    let dir = PathBuf::from(name);
    if !dir.is_dir() {
        anyhow::bail!(
            "segmenter {} {} (a CLIPSeg folder: config.json and model.safetensors, or `tiny`)",
            dir.display(),
            diffexplainer::io::why_unusable(&dir, true)
        )
    }
    let model = ClipSegForImageSegmentation::from_dir(&dir, candle_core::DType::F32, device)
        .with_context(|| format!("loading CLIPSeg from {}", dir.display()))?;
    let tokenizer = diffexplainer::tokenizer::ClipTokenizer::embedded()?;
    Ok(Segmenter::new(
        model,
        ClipSegProcessor::default(),
        tokenizer,
    )?)
}

/// The class's top-k predictive features on the world's balanced images of the class.
fn top_k_on_world(
    bundle: &ModelBundle,
    world: &diffexplainer::world::spec::WorldSpec,
    class: usize,
    k: usize,
    per_class: usize,
) -> anyhow::Result<Vec<usize>> {
    use diffexplainer::world::splits::{images_tensor, Dataset, Split};
    let classes = bundle.classifier.num_classes();
    if world.classes.len() != classes {
        anyhow::bail!(
            "--top-k: the world has {} classes but the classifier has {classes}: give the spec \
             the classifier was trained on (--world)",
            world.classes.len()
        )
    }
    if per_class == 0 {
        anyhow::bail!("--images-per-class must be at least 1")
    }
    let data = Dataset::new(world, Split::Balanced, Some(per_class * classes));
    let rendered: Vec<_> = data
        .samples
        .iter()
        .zip(&data.rendered)
        .filter(|(s, _)| s.class == class)
        .map(|(_, r)| r.clone())
        .collect();
    let images = images_tensor(&rendered)?.to_device(&bundle.device)?;
    let images = images.to_dtype(bundle.classifier_dtype)?;
    let top = diffexplainer::spurious::predictive::top_features(
        &bundle.classifier,
        &bundle.preprocess,
        &images,
        class,
        k,
    )?;
    eprintln!(
        "top-{k} features of class {class} on {} balanced world images: {}",
        rendered.len(),
        top.iter()
            .map(|(j, s)| format!("{j} ({s:.3})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(top.into_iter().map(|(j, _)| j).collect())
}

fn agreement_cmd(args: &AgreementArgs) -> anyhow::Result<()> {
    let reference = SalientImagenet::from_path(&args.salient_csv)?;
    let tables = find_tables(&args.labels)?;
    let mut ours = Vec::new();
    let mut uncertain = Vec::new();
    for (_, table) in &tables {
        for row in &table.rows {
            match row.label {
                Verdict::Core => ours.push(((row.class_index, row.feature), Label::Core)),
                Verdict::Spurious => ours.push(((row.class_index, row.feature), Label::Spurious)),
                Verdict::Uncertain => uncertain.push((row.class_index, row.feature)),
            }
        }
    }
    let a = agreement(&reference, &ours)?;
    let c = a.confusion;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "pairs_compared": c.spurious_as_spurious + c.spurious_as_core + c.core_as_spurious + c.core_as_core,
                "confusion": {
                    "spurious_as_spurious": c.spurious_as_spurious,
                    "spurious_as_core": c.spurious_as_core,
                    "core_as_spurious": c.core_as_spurious,
                    "core_as_core": c.core_as_core,
                },
                "balanced_accuracy": a.balanced_accuracy,
                "spurious_precision": a.spurious_precision,
                "spurious_recall": a.spurious_recall,
                "spurious_f1": a.spurious_f1,
                "uncertain_left_out": uncertain,
                "not_in_reference": a.not_in_reference,
                "reference_pairs_unlabelled": a.unlabelled,
                "reference_pairs_skipped": reference.skipped.iter().map(|p| serde_json::json!({
                    "class_index": p.class_index,
                    "feature_index": p.feature_index,
                    "lines": p.lines,
                    "reason": p.reason,
                })).collect::<Vec<_>>(),
            }))?
        );
        return Ok(());
    }
    let f = |v: Option<f64>| v.map_or("undefined".to_string(), |v| format!("{v:.3}"));
    println!(
        "{} label table(s), {} pairs compared with {} ({} annotated pairs, {} skipped)",
        tables.len(),
        c.spurious_as_spurious + c.spurious_as_core + c.core_as_spurious + c.core_as_core,
        args.salient_csv.display(),
        reference.pairs.len(),
        reference.skipped.len()
    );
    println!("confusion (rows: Salient ImageNet, columns: ours)");
    println!("              ours spurious  ours core");
    println!(
        "  spurious    {:>13}  {:>9}",
        c.spurious_as_spurious, c.spurious_as_core
    );
    println!(
        "  core        {:>13}  {:>9}",
        c.core_as_spurious, c.core_as_core
    );
    println!("balanced accuracy   {}", f(a.balanced_accuracy));
    println!("spurious precision  {}", f(a.spurious_precision));
    println!("spurious recall     {}", f(a.spurious_recall));
    println!("spurious F1         {}", f(a.spurious_f1));
    if !uncertain.is_empty() {
        println!(
            "left out as uncertain: {} pair(s): {uncertain:?}",
            uncertain.len()
        );
    }
    if !a.not_in_reference.is_empty() {
        println!(
            "not in the reference: {} pair(s): {:?}",
            a.not_in_reference.len(),
            a.not_in_reference
        );
    }
    println!("reference pairs we did not label: {}", a.unlabelled);
    for skip in &reference.skipped {
        println!(
            "skipped by the reader: class {}, feature {}: {}",
            skip.class_index, skip.feature_index, skip.reason
        );
    }
    Ok(())
}
