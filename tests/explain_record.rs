//! Run records on the tiny pipeline: a finished, a cancelled and a killed run each leave a
//! readable record; a record's best images are regenerated bit for bit from its saved prompt and
//! config; a corrupted record names the file at fault.

use std::path::{Path, PathBuf};

use candle_core::Device;
use diffexplainer::explain::record::{
    run_recorded, RunConfig, RunRecord, RunWriter, CANDLE_VERSION, CONFIG_FILE, METRICS_FILE,
    PROMPT_FILE, SUMMARY_FILE,
};
use diffexplainer::explain::{
    optimize, CancelToken, DiffusionPipeline, ModelBundle, ModelSpec, Objective, OptimizeConfig,
    PipelineOptions, SoftPromptInit,
};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dx-record-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn setup(batch: usize, iterations: usize) -> (DiffusionPipeline, RunConfig) {
    let options = PipelineOptions {
        batch,
        seed: 4,
        ..PipelineOptions::default()
    };
    let pipeline =
        DiffusionPipeline::new(ModelBundle::tiny_random(0).unwrap(), options.clone()).unwrap();
    let config = RunConfig::new(
        ModelSpec::tiny(0),
        &Device::Cpu,
        options,
        "A texture of {}",
        2,
        "random:9".to_string(),
        Objective::logit(5),
        Some(5),
        OptimizeConfig {
            iterations,
            ..OptimizeConfig::default()
        },
        2,
    );
    (pipeline, config)
}

fn recorded_run(dir: &Path, batch: usize, iterations: usize, cancel_at: Option<usize>) {
    let (pipeline, config) = setup(batch, iterations);
    let mut prompt = pipeline
        .new_prompt("A texture of {}", 2, &SoftPromptInit::Random { seed: 9 })
        .unwrap();
    let cancel = CancelToken::new();
    run_recorded(dir, &pipeline, &mut prompt, &config, &cancel, 3, |m| {
        if Some(m.iteration) == cancel_at {
            cancel.cancel()
        }
    })
    .unwrap();
}

#[test]
fn a_record_reproduces_bit_for_bit() {
    let dir = temp_dir("reproduce");
    recorded_run(&dir, 2, 5, None);
    let record = RunRecord::open(&dir).unwrap();
    let (_, config) = setup(2, 5);
    assert_eq!(record.config.model, config.model);
    assert_eq!(record.config.objective, config.objective);
    assert_eq!(record.config.candle_version, CANDLE_VERSION);
    let summary = record
        .summary
        .as_ref()
        .expect("a finished run has a summary");
    assert_eq!(summary.stop, "Finished");
    assert_eq!(summary.iterations, 5);
    assert_eq!(record.iterations_recorded, 5);
    assert_eq!(
        summary.best_objective,
        record.objectives.iter().copied().fold(f64::MIN, f64::max)
    );
    let explanation = summary.explanation.as_ref().unwrap();
    assert_eq!(explanation.nearest.len(), 2);
    assert!(explanation.prompt.starts_with("A texture of "));
    for i in [0, 2, 4] {
        assert!(dir.join(format!("images/iter_{i:05}.png")).is_file());
    }
    let best = image::open(dir.join("best.png")).unwrap();
    assert_eq!(
        (best.width(), best.height()),
        (64, 32),
        "two 32x32 images side by side"
    );

    let reproduction = record.reproduce(&Device::Cpu).unwrap();
    assert!(
        reproduction.identical && reproduction.png_identical,
        "{reproduction:?}"
    );
    // In a notebook the record renders its status, best images, curve and explanation.
    let shown = record.display().unwrap();
    let text = shown.get("text/plain").unwrap();
    assert!(text.contains("Finished after 5 iteration(s)"), "{text}");
    assert!(text.contains(&explanation.prompt), "{text}");
    let html = shown.get("text/html").unwrap();
    assert!(html.contains("data:image/svg+xml;base64,") && html.contains("<table>"));
    let png = shown.get("image/png").expect("the best images");
    assert!(png.starts_with("iVBORw0KGgo"));
    // The textual explanation is the saved prompt's.
    let prompt = record.prompt(&Device::Cpu).unwrap();
    assert_eq!(prompt.template(), "A texture of {}");
    assert_eq!(prompt.num_vectors(), 2);
}

#[test]
fn a_cancelled_run_is_recorded_and_readable() {
    let dir = temp_dir("cancel");
    recorded_run(&dir, 1, 50, Some(2));
    let record = RunRecord::open(&dir).unwrap();
    let summary = record.summary.as_ref().unwrap();
    assert_eq!(summary.stop, "Cancelled");
    assert_eq!(summary.iterations, 3);
    assert_eq!(record.iterations_recorded, 3);
    let reproduction = record.reproduce(&Device::Cpu).unwrap();
    assert!(reproduction.identical, "{reproduction:?}");
}

#[test]
fn a_killed_run_leaves_a_readable_record() {
    let dir = temp_dir("killed");
    let (pipeline, config) = setup(1, 50);
    let mut prompt = pipeline
        .new_prompt("A texture of {}", 2, &SoftPromptInit::Random { seed: 9 })
        .unwrap();
    let mut writer = RunWriter::create(&dir, &config, &prompt).unwrap();
    // The process "dies" during iteration 5: the loop stops with an error and the record is
    // never finished.
    let err = optimize(
        &pipeline,
        &mut prompt,
        &config.objective,
        config.target_class,
        &config.optimize,
        &CancelToken::new(),
        |m, images| {
            if m.iteration == 5 {
                anyhow::bail!("killed")
            }
            writer.on_iteration(m, images)
        },
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "killed");
    drop(writer);
    // A row cut off in the middle of writing.
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join(METRICS_FILE))
        .unwrap();
    write!(f, "5,-0.12").unwrap();
    drop(f);

    let record = RunRecord::open(&dir).unwrap();
    assert!(record.summary.is_none());
    assert_eq!(record.iterations_recorded, 5);
    // The prompt of the last save point (iteration 4) is whole and loads.
    let saved = record.prompt(&Device::Cpu).unwrap();
    assert_eq!(saved.num_vectors(), 2);
    assert!(dir.join("images/iter_00004.png").is_file());
    // It still renders: unfinished, with the recorded part of the curve and no best images.
    let shown = record.display().unwrap();
    assert!(shown
        .get("text/plain")
        .unwrap()
        .contains("unfinished: 5 iteration(s) recorded"));
    assert!(shown.get("image/png").is_none());
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_corrupted_record_names_the_file_at_fault() {
    let dir = temp_dir("corrupt");
    recorded_run(&dir, 1, 2, None);
    let err_of = |dir: &Path| format!("{:#}", RunRecord::open(dir).unwrap_err());

    // Truncated prompt: the record opens, loading the prompt fails naming it.
    let prompt_path = dir.join(PROMPT_FILE);
    let bytes = std::fs::read(&prompt_path).unwrap();
    std::fs::write(&prompt_path, &bytes[..bytes.len() / 2]).unwrap();
    let record = RunRecord::open(&dir).unwrap();
    let err = format!("{:#}", record.prompt(&Device::Cpu).err().unwrap());
    assert!(err.contains(PROMPT_FILE), "{err}");
    let err = format!("{:#}", record.reproduce(&Device::Cpu).unwrap_err());
    assert!(err.contains(PROMPT_FILE), "{err}");

    // Garbled summary.
    std::fs::write(dir.join(SUMMARY_FILE), "{\"stop\": ").unwrap();
    let err = err_of(&dir);
    assert!(
        err.contains(SUMMARY_FILE) && err.contains("corrupted"),
        "{err}"
    );

    // Garbled config.
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, &text[..text.len() / 3]).unwrap();
    let err = err_of(&dir);
    assert!(
        err.contains(CONFIG_FILE) && err.contains("corrupted"),
        "{err}"
    );

    // Missing config.
    std::fs::remove_file(&config_path).unwrap();
    let err = err_of(&dir);
    assert!(err.contains(CONFIG_FILE), "{err}");

    // A folder that does not exist.
    let err = err_of(&dir.join("nope"));
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn a_record_folder_is_never_overwritten() {
    let dir = temp_dir("twice");
    recorded_run(&dir, 1, 1, None);
    let (pipeline, config) = setup(1, 1);
    let prompt = pipeline
        .new_prompt("{}", 1, &SoftPromptInit::Random { seed: 1 })
        .unwrap();
    let err = RunWriter::create(&dir, &config, &prompt)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already holds a run record"), "{err}");
}

#[test]
fn the_recorded_candle_version_is_the_pinned_one() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
            .unwrap();
    assert!(
        manifest.contains(&format!("candle-core = \"={CANDLE_VERSION}\"")),
        "update CANDLE_VERSION in explain/record.rs to the workspace's candle pin"
    );
}

/// Two runs that start in the same second (the default name is `explain-<unix seconds>`) get
/// different folders: `create_dir` either makes a name or fails because it exists, also when
/// racing in parallel.
#[test]
fn free_record_folder_names_never_collide() {
    use diffexplainer::explain::record::create_free_dir;
    let parent = std::env::temp_dir().join(format!("dx-free-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&parent);
    let first = create_free_dir(&parent, "explain-100").unwrap();
    let second = create_free_dir(&parent, "explain-100").unwrap();
    assert_eq!(first, parent.join("explain-100"));
    assert_eq!(second, parent.join("explain-100-2"));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let parent = parent.clone();
            std::thread::spawn(move || create_free_dir(&parent, "explain-200").unwrap())
        })
        .collect();
    let mut dirs: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    dirs.sort();
    dirs.dedup();
    assert_eq!(dirs.len(), 8);
    assert!(dirs.iter().all(|d| d.is_dir()));
    let _ = std::fs::remove_dir_all(&parent);
}
