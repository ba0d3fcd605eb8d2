//! Sweeps: many explanation jobs (classes, or (class, feature) pairs) run with one set of loaded
//! models, one run record per job, resumable after a kill and split across machines with no
//! coordination.
//!
//! - **Jobs** come from a list file ([`read_job_list`]: one `CLASS` or `CLASS,FEATURE` per
//!   line) or from Salient ImageNet's annotation CSV ([`jobs_from_salient_imagenet`]). A class
//!   job maximizes the class (its logit or log-probability, plus the sum of its features when it
//!   carries some); a pair job maximizes the feature, with the class as the target the
//!   activation score counts.
//! - **Records**: job `j` writes `OUT/<j.name()>/` (a normal run record) and, last, the empty
//!   file `FINISHED`, atomically. A folder with the marker is skipped on the next start; one
//!   without it (the job was killed) is removed and redone.
//! - **Shards** ([`Shard`]): `K/N` takes the jobs at positions `i` with `i % N == K` of the
//!   list, so `N` machines given `0/N`..`N-1/N` cover every job once.
//! - **Merge** ([`merge`]): the finished records of one or more sweep folders as one table,
//!   sorted by job name (CSV, JSON, HTML).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::objective::Objective;
use super::optimize::{CancelToken, EarlyStop, OptimizeConfig};
use super::pipeline::DiffusionPipeline;
use super::recipe::ClassObjective;
use super::record::{run_recorded, RunConfig, RunRecord};
use super::soft_prompt::SoftPromptInit;
use crate::spurious::salient_imagenet::SalientImagenet;

/// The marker a finished job's folder holds.
pub const FINISHED_FILE: &str = "FINISHED";

/// One explanation to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub class: usize,
    /// A pair job's feature (the objective); `None` for a class job.
    pub feature: Option<usize>,
    /// A class job's features whose sum is added to the class term (e.g. its top-5 features
    /// from Salient ImageNet); empty: the class term alone.
    pub class_features: Vec<usize>,
}

impl Job {
    pub fn class(class: usize) -> Self {
        Self {
            class,
            feature: None,
            class_features: vec![],
        }
    }
    pub fn pair(class: usize, feature: usize) -> Self {
        Self {
            class,
            feature: Some(feature),
            class_features: vec![],
        }
    }

    /// The record folder's name: `class-00207` or `class-00207-feature-01234`.
    pub fn name(&self) -> String {
        match self.feature {
            None => format!("class-{:05}", self.class),
            Some(f) => format!("class-{:05}-feature-{f:05}", self.class),
        }
    }

    /// The job's objective.
    pub fn objective(&self, class_objective: ClassObjective) -> Objective {
        let ce = class_objective == ClassObjective::CrossEntropy;
        match self.feature {
            Some(f) => Objective::neuron(f),
            None if !self.class_features.is_empty() => {
                Objective::class_with_features(self.class, ce, self.class_features.clone())
            }
            None if ce => Objective::log_probability(self.class),
            None => Objective::logit(self.class),
        }
    }
}

/// Reads a job list: one job per line, `CLASS` or `CLASS,FEATURE` (decimal indices); blank
/// lines and lines starting with `#` are skipped. Errors name the file and line.
pub fn read_job_list(path: &Path) -> anyhow::Result<Vec<Job>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("job list {}: cannot read", path.display()))?;
    parse_job_list(&text).with_context(|| format!("job list {}", path.display()))
}

/// [`read_job_list`] on text.
pub fn parse_job_list(text: &str) -> anyhow::Result<Vec<Job>> {
    let mut jobs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let index = |s: &str, what: &str| {
            s.parse::<usize>().map_err(|_| {
                anyhow::anyhow!(
                    "line {}: {what} `{s}` is not a non-negative integer (a line is CLASS or \
                     CLASS,FEATURE): {line:?}",
                    i + 1
                )
            })
        };
        jobs.push(match fields.as_slice() {
            [c] => Job::class(index(c, "class")?),
            [c, f] => Job::pair(index(c, "class")?, index(f, "feature")?),
            _ => anyhow::bail!(
                "line {}: expected CLASS or CLASS,FEATURE, got {} fields: {line:?}",
                i + 1,
                fields.len()
            ),
        });
    }
    if jobs.is_empty() {
        anyhow::bail!("no jobs (every line is blank or a comment)")
    }
    check_unique(&jobs)?;
    Ok(jobs)
}

/// Salient ImageNet's jobs: each annotated class (with its annotated features, by rank, added
/// to the class term when `with_features`), or each annotated (class, feature) pair.
pub fn jobs_from_salient_imagenet(
    annotations: &SalientImagenet,
    pairs: bool,
    with_features: bool,
) -> Vec<Job> {
    if pairs {
        annotations
            .pairs
            .iter()
            .map(|p| Job::pair(p.class_index, p.feature_index))
            .collect()
    } else {
        annotations
            .classes()
            .into_iter()
            .map(|(class, features)| Job {
                class,
                feature: None,
                class_features: if with_features {
                    features.iter().map(|p| p.feature_index).collect()
                } else {
                    vec![]
                },
            })
            .collect()
    }
}

fn check_unique(jobs: &[Job]) -> anyhow::Result<()> {
    let mut seen = BTreeSet::new();
    for j in jobs {
        if !seen.insert(j.name()) {
            anyhow::bail!("job {} is listed twice", j.name())
        }
    }
    Ok(())
}

/// A deterministic share of a job list: `index` of `count` (`K/N` on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let bad = || {
            anyhow::anyhow!(
                "shard `{s}` is not K/N with 0 <= K < N (e.g. 0/4 .. 3/4 for four machines)"
            )
        };
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            k.trim().parse::<usize>().map_err(|_| bad())?,
            n.trim().parse::<usize>().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

impl Shard {
    /// The jobs at positions `i` of the list with `i % count == index`.
    pub fn select(&self, jobs: &[Job]) -> Vec<Job> {
        jobs.iter()
            .enumerate()
            .filter(|(i, _)| i % self.count == self.index)
            .map(|(_, j)| j.clone())
            .collect()
    }
}

/// Everything of a job's run that is not the job: shared by every job of a sweep.
#[derive(Debug, Clone)]
pub struct SweepSettings {
    pub template: String,
    pub num_vectors: usize,
    pub init: SoftPromptInit,
    /// The loop's settings; `early_stop` is ignored (see `early_stop`).
    pub optimize: OptimizeConfig,
    /// For class jobs: stop after this many consecutive iterations with every image classified
    /// as the class (pair jobs maximize a feature and run every iteration).
    pub early_stop: Option<usize>,
    pub class_objective: ClassObjective,
    pub activation_samples: usize,
    pub save_every: usize,
    pub top_k: usize,
    pub recipe: Option<String>,
}

impl SweepSettings {
    /// The run config of `job` with `pipeline`.
    pub fn job_config(&self, pipeline: &DiffusionPipeline, job: &Job) -> RunConfig {
        let b = pipeline.bundle();
        let init = match &self.init {
            SoftPromptInit::Word(w) => format!("word:{w}"),
            SoftPromptInit::Random { seed } => format!("random:{seed}"),
        };
        let optimize = OptimizeConfig {
            early_stop: match (self.early_stop, job.feature) {
                (Some(n), None) => Some(EarlyStop {
                    class: job.class,
                    consecutive: n,
                }),
                _ => None,
            },
            ..self.optimize.clone()
        };
        let mut config = RunConfig::new(
            b.spec.clone(),
            &b.device,
            pipeline.options().clone(),
            &self.template,
            self.num_vectors,
            init,
            job.objective(self.class_objective),
            Some(job.class),
            optimize,
            self.save_every,
        );
        config.activation_samples = self.activation_samples;
        config.recipe = self.recipe.clone();
        config
    }
}

/// Checks every job against the classifier (class ids, feature indices) before anything is
/// written, naming the first bad job.
pub fn check_jobs(
    pipeline: &DiffusionPipeline,
    settings: &SweepSettings,
    jobs: &[Job],
) -> anyhow::Result<()> {
    check_unique(jobs)?;
    let b = pipeline.bundle();
    let side = b.spec.resolution;
    let gray = candle_core::Tensor::full(0.5f32, (1, 3, side, side), &b.device)?;
    let output = pipeline.classify(&gray)?;
    for job in jobs {
        b.classifier
            .check_class(job.class)
            .with_context(|| format!("job {}", job.name()))?;
        job.objective(settings.class_objective)
            .validate(&output)
            .with_context(|| format!("job {}", job.name()))?;
    }
    Ok(())
}

/// What happened to each job of a sweep run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Jobs run to the end now.
    pub ran: Vec<String>,
    /// Jobs found finished (skipped).
    pub skipped: Vec<String>,
    /// Unfinished folders removed and redone.
    pub redone: Vec<String>,
    /// The job a cancel stopped midway: left without its marker, so the next start redoes it.
    pub interrupted: Option<String>,
}

/// Runs `jobs` into `out` (skipping finished ones, redoing unfinished ones), at most
/// `max_jobs` of them when given (a hook for tests and for time-boxed runs: the sweep stops
/// there as if killed between jobs). `on_job` is told each job's name before it starts.
pub fn run_sweep(
    pipeline: &DiffusionPipeline,
    settings: &SweepSettings,
    jobs: &[Job],
    out: &Path,
    max_jobs: Option<usize>,
    cancel: &CancelToken,
    mut on_job: impl FnMut(&Job, usize),
) -> anyhow::Result<SweepReport> {
    check_jobs(pipeline, settings, jobs)?;
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the sweep folder {}", out.display()))?;
    let mut report = SweepReport::default();
    for (i, job) in jobs.iter().enumerate() {
        let dir = out.join(job.name());
        if dir.join(FINISHED_FILE).is_file() {
            check_same_settings(&dir, &settings.job_config(pipeline, job))?;
            report.skipped.push(job.name());
            continue;
        }
        if max_jobs.is_some_and(|m| report.ran.len() >= m) || cancel.is_cancelled() {
            break;
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| {
                format!("cannot remove the unfinished record {}", dir.display())
            })?;
            report.redone.push(job.name());
        }
        on_job(job, i);
        let config = settings.job_config(pipeline, job);
        let mut prompt =
            pipeline.new_prompt(&settings.template, settings.num_vectors, &settings.init)?;
        let result = run_recorded(
            &dir,
            pipeline,
            &mut prompt,
            &config,
            cancel,
            settings.top_k,
            |_| {},
        );
        // A cancelled job's record is complete but cut short: it must not count as finished,
        // or a resumed sweep would skip it and the table would hold the partial result.
        if cancel.is_cancelled() {
            report.interrupted = Some(job.name());
            break;
        }
        result.with_context(|| format!("job {}", job.name()))?;
        crate::io::write_bytes_atomically(&dir.join(FINISHED_FILE), b"")?;
        report.ran.push(job.name());
    }
    Ok(report)
}

/// A finished record is only skipped when it ran what this sweep would run: resuming with other
/// models or settings into the same folder would mix two experiments in one table.
fn check_same_settings(dir: &Path, expected: &RunConfig) -> anyhow::Result<()> {
    let found = RunRecord::open(dir)?.config;
    let comparable = |c: &RunConfig| -> anyhow::Result<serde_json::Value> {
        let mut v = serde_json::to_value(c)?;
        v.as_object_mut().map(|o| o.remove("started_at"));
        Ok(v)
    };
    let (a, b) = (comparable(&found)?, comparable(expected)?);
    if a != b {
        let differing: Vec<&String> = match (a.as_object(), b.as_object()) {
            (Some(a), Some(b)) => a.keys().filter(|k| a.get(*k) != b.get(*k)).collect(),
            _ => vec![],
        };
        anyhow::bail!(
            "{} is a finished record of other settings (differing: {}): resume with the same \
             options, or use another --out folder",
            dir.display(),
            differing
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
    Ok(())
}

/// One finished job in a merged table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRow {
    pub job: String,
    pub class: Option<usize>,
    /// The objective as written (`logit[207]`, `feature[1234]`).
    pub objective: String,
    pub stop: String,
    pub iterations: usize,
    pub best_iteration: usize,
    pub first_objective: f64,
    pub best_objective: f64,
    /// The nearest-token prompt.
    pub prompt: Option<String>,
    pub activation_samples: Option<usize>,
    pub soft_share: Option<f64>,
    pub soft_ci_low: Option<f64>,
    pub soft_ci_high: Option<f64>,
    pub text_share: Option<f64>,
    pub text_ci_low: Option<f64>,
    pub text_ci_high: Option<f64>,
    pub seconds: f64,
}

/// The finished records under each of `dirs` (sweep output folders) as rows sorted by job
/// name, and the folders skipped as unfinished. A job found in two folders is an error.
pub fn merge<P: AsRef<Path>>(dirs: &[P]) -> anyhow::Result<(Vec<SweepRow>, Vec<PathBuf>)> {
    let mut rows: Vec<SweepRow> = Vec::new();
    let mut unfinished = Vec::new();
    let mut seen = std::collections::BTreeMap::new();
    for dir in dirs {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            anyhow::bail!(
                "sweep folder {} {}",
                dir.display(),
                crate::io::why_unusable(dir, true)
            )
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        entries.sort();
        for path in entries {
            if !path.join(FINISHED_FILE).is_file() {
                unfinished.push(path);
                continue;
            }
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            if let Some(other) = seen.insert(name.clone(), path.clone()) {
                anyhow::bail!(
                    "job {name} is in two sweep folders: {} and {}",
                    other.display(),
                    path.display()
                )
            }
            let record = RunRecord::open(&path)?;
            let Some(s) = record.summary else {
                anyhow::bail!(
                    "{}: marked finished but has no summary.json",
                    path.display()
                )
            };
            let a = s.activation.as_ref();
            rows.push(SweepRow {
                job: name,
                class: record.config.target_class,
                objective: record.config.objective_text.clone(),
                stop: s.stop.clone(),
                iterations: s.iterations,
                best_iteration: s.best_iteration,
                first_objective: s.first_objective,
                best_objective: s.best_objective,
                prompt: s.explanation.as_ref().map(|e| e.prompt.clone()),
                activation_samples: a.map(|a| a.soft.samples),
                soft_share: a.map(|a| a.soft.share),
                soft_ci_low: a.map(|a| a.soft.ci_low),
                soft_ci_high: a.map(|a| a.soft.ci_high),
                text_share: a.map(|a| a.text.share),
                text_ci_low: a.map(|a| a.text.ci_low),
                text_ci_high: a.map(|a| a.text.ci_high),
                seconds: s.seconds,
            });
        }
    }
    rows.sort_by(|a, b| a.job.cmp(&b.job));
    Ok((rows, unfinished))
}

/// The rows as CSV (a header, then one line per row; empty cells for absent values).
pub fn to_csv(rows: &[SweepRow]) -> anyhow::Result<String> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for row in rows {
        writer.serialize(row)?;
    }
    if rows.is_empty() {
        return Ok(String::new());
    }
    Ok(String::from_utf8(writer.into_inner()?)?)
}

/// The rows as a JSON array.
pub fn to_json(rows: &[SweepRow]) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(rows)?)
}

/// The rows as a self-contained HTML page with one table (the CSV's columns).
pub fn to_html(rows: &[SweepRow]) -> anyhow::Result<String> {
    let csv = to_csv(rows)?;
    let mut reader = csv::ReaderBuilder::new().from_reader(csv.as_bytes());
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let mut html = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>DiffExplainer sweep</title>\n\
         <style>table{border-collapse:collapse;font:13px sans-serif}td,th{border:1px solid #ccc;\
         padding:2px 6px}</style></head><body>\n<table>\n<tr>",
    );
    let header: Vec<String> = if rows.is_empty() {
        vec![]
    } else {
        reader.headers()?.iter().map(String::from).collect()
    };
    for h in &header {
        html.push_str(&format!("<th>{}</th>", escape(h)));
    }
    html.push_str("</tr>\n");
    for record in reader.records() {
        html.push_str("<tr>");
        for cell in record?.iter() {
            html.push_str(&format!("<td>{}</td>", escape(cell)));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n</body></html>\n");
    Ok(html)
}
