//! The sweep runner on the embedded tiny models (a few iterations per job, seconds in all): a
//! sweep stopped after k jobs, with a killed job's folder left behind, and resumed equals an
//! uninterrupted one; shards 0/2 and 1/2 merged equal the unsharded run; bad input (shard spec,
//! class out of range, malformed list line) is refused before anything is written.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use diffexplainer::explain::sweep::{
    merge, parse_job_list, run_sweep, to_csv, to_html, to_json, Job, Shard, SweepRow,
    SweepSettings, FINISHED_FILE,
};
use diffexplainer::explain::{
    CancelToken, ClassObjective, DiffusionPipeline, ModelBundle, OptimizeConfig, PipelineOptions,
    SoftPromptInit,
};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dx-sweep-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn pipeline() -> DiffusionPipeline {
    DiffusionPipeline::new(
        ModelBundle::tiny_random(0).unwrap(),
        PipelineOptions::default(),
    )
    .unwrap()
}

fn settings() -> SweepSettings {
    SweepSettings {
        template: "A texture of {}".to_string(),
        num_vectors: 1,
        init: SoftPromptInit::Random { seed: 1 },
        optimize: OptimizeConfig {
            iterations: 3,
            ..OptimizeConfig::default()
        },
        early_stop: Some(3),
        class_objective: ClassObjective::CrossEntropy,
        activation_samples: 2,
        save_every: 0,
        top_k: 2,
        recipe: None,
    }
}

fn jobs() -> Vec<Job> {
    vec![
        Job::class(1),
        Job::pair(2, 5),
        Job {
            class: 3,
            feature: None,
            class_features: vec![0, 4],
        },
        Job::class(4),
        Job::pair(6, 1),
    ]
}

/// Rows without their timings (the only thing that differs between equal runs).
fn untimed(rows: Vec<SweepRow>) -> Vec<SweepRow> {
    rows.into_iter()
        .map(|r| SweepRow { seconds: 0.0, ..r })
        .collect()
}

/// Each job's saved prompt, bytes.
fn prompts(dirs: &[&Path]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in dirs {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            out.push((name, std::fs::read(p.join("prompt.safetensors")).unwrap()));
        }
    }
    out.sort();
    out
}

/// The uninterrupted, unsharded sweep (run once, shared by the tests).
fn uninterrupted() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = temp_dir("whole");
        let report = run_sweep(
            &pipeline(),
            &settings(),
            &jobs(),
            &dir,
            None,
            &CancelToken::new(),
            |_, _| {},
        )
        .unwrap();
        assert_eq!(report.ran.len(), 5);
        dir
    })
}

#[test]
fn a_sweep_killed_midway_and_resumed_equals_an_uninterrupted_one() {
    let whole = uninterrupted();
    let dir = temp_dir("resumed");
    let pipeline = pipeline();
    // Stopped after 2 jobs...
    let first = run_sweep(
        &pipeline,
        &settings(),
        &jobs(),
        &dir,
        Some(2),
        &CancelToken::new(),
        |_, _| {},
    )
    .unwrap();
    assert_eq!(first.ran, ["class-00001", "class-00002-feature-00005"]);
    // ...and the third killed halfway: its folder holds a partial record, no marker.
    let killed = dir.join(jobs()[2].name());
    std::fs::create_dir_all(&killed).unwrap();
    std::fs::copy(
        whole.join(jobs()[2].name()).join("config.json"),
        killed.join("config.json"),
    )
    .unwrap();
    std::fs::write(killed.join("metrics.csv"), "iteration,objective\n0,0.5").unwrap();
    let (_, unfinished) = merge(&[&dir]).unwrap();
    assert_eq!(unfinished, vec![killed]);

    // ...and a cancel (Ctrl-C) during the fourth: its record is cut short, so it gets no marker
    // and the sweep stops there.
    let cancel = CancelToken::new();
    let cancelled = run_sweep(
        &pipeline,
        &settings(),
        &jobs(),
        &dir,
        None,
        &cancel,
        |_, i| {
            if i == 3 {
                cancel.cancel()
            }
        },
    )
    .unwrap();
    assert_eq!(cancelled.redone, [jobs()[2].name()]);
    assert_eq!(cancelled.ran, [jobs()[2].name()]);
    assert_eq!(cancelled.interrupted, Some(jobs()[3].name()));
    assert!(!dir.join(jobs()[3].name()).join(FINISHED_FILE).exists());
    assert!(!dir.join(jobs()[4].name()).exists());
    // Back to the state of a kill during the third job.
    std::fs::remove_file(dir.join(jobs()[2].name()).join(FINISHED_FILE)).unwrap();

    let resumed = run_sweep(
        &pipeline,
        &settings(),
        &jobs(),
        &dir,
        None,
        &CancelToken::new(),
        |_, _| {},
    )
    .unwrap();
    assert_eq!(resumed.skipped, first.ran);
    assert_eq!(resumed.redone, [jobs()[2].name(), jobs()[3].name()]);
    assert_eq!(resumed.ran.len(), 3);
    for job in jobs() {
        assert!(dir.join(job.name()).join(FINISHED_FILE).is_file());
    }

    let (a, _) = merge(&[whole]).unwrap();
    let (b, unfinished) = merge(&[&dir]).unwrap();
    assert!(unfinished.is_empty());
    assert_eq!(a.len(), 5);
    assert_eq!(untimed(a), untimed(b));
    assert_eq!(prompts(&[whole]), prompts(&[&dir]));
    // Resuming with other settings into the same folder is refused, naming what differs.
    let other = SweepSettings {
        optimize: OptimizeConfig {
            iterations: 4,
            ..OptimizeConfig::default()
        },
        ..settings()
    };
    let e = run_sweep(
        &pipeline,
        &other,
        &jobs(),
        &dir,
        None,
        &CancelToken::new(),
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("finished record of other settings (differing: optimize)"),
        "{e}"
    );
    // A third start with the same settings runs nothing.
    let again = run_sweep(
        &pipeline,
        &settings(),
        &jobs(),
        &dir,
        None,
        &CancelToken::new(),
        |_, _| {},
    )
    .unwrap();
    assert!(again.ran.is_empty() && again.skipped.len() == 5);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shards_merged_equal_the_unsharded_run() {
    let whole = uninterrupted();
    let pipeline = pipeline();
    let mut dirs = Vec::new();
    for k in 0..2 {
        let shard: Shard = format!("{k}/2").parse().unwrap();
        let dir = temp_dir(&format!("shard{k}"));
        run_sweep(
            &pipeline,
            &settings(),
            &shard.select(&jobs()),
            &dir,
            None,
            &CancelToken::new(),
            |_, _| {},
        )
        .unwrap();
        dirs.push(dir);
    }
    let (sharded, _) = merge(&dirs).unwrap();
    let (unsharded, _) = merge(&[whole]).unwrap();
    assert_eq!(untimed(sharded.clone()), untimed(unsharded));
    assert_eq!(prompts(&[&dirs[0], &dirs[1]]), prompts(&[whole]));
    // A folder given twice (the same job in two places) is refused.
    let e = merge(&[dirs[0].clone(), dirs[0].clone()]).unwrap_err();
    assert!(e.to_string().contains("in two sweep folders"), "{e}");

    // The three table formats hold the same rows.
    let csv = to_csv(&sharded).unwrap();
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let read: Vec<SweepRow> = reader.deserialize().map(Result::unwrap).collect();
    assert_eq!(read, sharded);
    let json: Vec<SweepRow> = serde_json::from_str(&to_json(&sharded).unwrap()).unwrap();
    assert_eq!(json, sharded);
    let html = to_html(&sharded).unwrap();
    assert_eq!(html.matches("<tr>").count(), sharded.len() + 1);
    assert!(html.contains("<td>class-00003</td>"));
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn shards_partition_the_jobs() {
    let jobs: Vec<Job> = (0..10).map(Job::class).collect();
    let mut all: Vec<String> = Vec::new();
    for k in 0..3 {
        let shard = Shard { index: k, count: 3 };
        all.extend(shard.select(&jobs).iter().map(Job::name));
    }
    all.sort();
    assert_eq!(all, jobs.iter().map(Job::name).collect::<Vec<_>>());
    for bad in ["2/2", "0/0", "3", "a/2", "1/b", "-1/2"] {
        let e = bad.parse::<Shard>().unwrap_err().to_string();
        assert!(e.contains(&format!("shard `{bad}`")), "{bad}: {e}");
    }
}

#[test]
fn job_lists_name_their_bad_lines() {
    let jobs = parse_job_list("# classes\n1\n\n2, 5\n").unwrap();
    assert_eq!(jobs, [Job::class(1), Job::pair(2, 5)]);
    for (text, needle) in [
        ("1\n1,x\n", "line 2: feature `x`"),
        ("cat\n", "line 1: class `cat`"),
        (
            "1,2,3\n",
            "line 1: expected CLASS or CLASS,FEATURE, got 3 fields",
        ),
        ("1\n1\n", "job class-00001 is listed twice"),
        ("# nothing\n", "no jobs"),
    ] {
        let e = format!("{:#}", parse_job_list(text).unwrap_err());
        assert!(e.contains(needle), "{text:?}: {e}");
    }
}

#[test]
fn a_class_out_of_range_is_refused_before_anything_is_written() {
    let dir = temp_dir("range");
    for (jobs, needle) in [
        (
            vec![Job::class(1), Job::class(12)],
            "class id 12 is out of range",
        ),
        (vec![Job::pair(1, 999)], "feature index 999 is out of range"),
    ] {
        let e = run_sweep(
            &pipeline(),
            &settings(),
            &jobs,
            &dir,
            None,
            &CancelToken::new(),
            |_, _| {},
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains(needle), "{e:#}");
        assert!(!dir.exists(), "the sweep folder was created");
    }
}

#[test]
fn the_cli_refuses_bad_input_before_writing_and_merges() {
    let bin = env!("CARGO_BIN_EXE_diffexplainer");
    let dir = temp_dir("cli");
    std::fs::create_dir_all(&dir).unwrap();
    let list = dir.join("jobs.txt");
    std::fs::write(&list, "1\n2,5\n").unwrap();
    let out = dir.join("out");
    let run = |args: &[&str]| Command::new(bin).arg("sweep").args(args).output().unwrap();
    let l = list.to_str().unwrap();
    let o = out.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["--list", l, "--out", o, "--shard", "2/2"],
            "shard `2/2`",
        ),
        (
            vec!["--list", l, "--out", o, "--shard", "0/0"],
            "shard `0/0`",
        ),
        (
            vec!["--list", l, "--out", o, "--step-noise", "sometimes"],
            "unknown step noise",
        ),
        (vec!["--list", l], "--out DIR is required"),
        (
            vec!["--list", l, "--out", o, "--with-class-features"],
            "apply to --salient-imagenet jobs",
        ),
        (
            vec!["--list", l, "--out", o, "--salient-jobs", "pairs"],
            "apply to --salient-imagenet jobs",
        ),
    ] {
        let r = run(&args);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(
            !r.status.success() && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    let r = run(&[
        "--list",
        l,
        "--out",
        o,
        "--iterations",
        "2",
        "--activation-samples",
        "2",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let csv_path = dir.join("table.csv");
    let r = Command::new(bin)
        .args(["sweep", "merge", o, "--csv", csv_path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let text = std::fs::read_to_string(&csv_path).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text
        .lines()
        .nth(2)
        .unwrap()
        .starts_with("class-00002-feature-00005,2,feature[5],"));
    let _ = std::fs::remove_dir_all(&dir);
}
