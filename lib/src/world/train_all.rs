//! `diffexplainer world train`: every model of a world from one spec, in order, resumable
//! (issue 13 item 3).
//!
//! ```text
//! OUT/spec.toml      the spec the folder was trained from (a rerun must name the same world)
//! OUT/checker/       the attribute checker (the spec's [checker] table)
//! OUT/classifier/    the classifier under audit (ShapesWorld I, the spec's [classifier] table)
//! ```
//!
//! A model is finished when its folder holds `report.json` (each trainer writes it last): a rerun
//! skips finished models and resumes an unfinished one from its `checkpoint/`, so a killed run
//! loses at most one checkpoint interval. A finished folder trained from another spec or config
//! is refused, never silently reused.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use super::spec::WorldSpec;
use super::{checker, classifier};

/// A model of the world, in training order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum WorldModel {
    /// The attribute checker (judges every generative model after it).
    Checker,
    /// The classifier under audit.
    Classifier,
}

impl WorldModel {
    pub const ALL: &'static [WorldModel] = &[WorldModel::Checker, WorldModel::Classifier];

    pub fn name(self) -> &'static str {
        match self {
            WorldModel::Checker => "checker",
            WorldModel::Classifier => "classifier",
        }
    }

    /// Its folder under `out`.
    pub fn dir(self, out: &Path) -> PathBuf {
        out.join(self.name())
    }
}

/// What one model's step did.
#[derive(Debug, Clone, Serialize)]
pub struct StepOutcome {
    pub model: WorldModel,
    pub dir: PathBuf,
    /// Already finished by an earlier run (nothing trained now).
    pub skipped: bool,
    /// One line: the model's measured quality.
    pub summary: String,
    /// Training seconds in this run (0 when skipped).
    pub seconds: f64,
}

/// `OUT/spec.toml`.
pub fn spec_path(out: &Path) -> PathBuf {
    out.join("spec.toml")
}

/// Refuses an `out` that holds another world; writes `OUT/spec.toml` when new.
pub fn claim_folder(spec: &WorldSpec, out: &Path) -> anyhow::Result<()> {
    let path = spec_path(out);
    if path.exists() {
        let held = WorldSpec::from_file(&path)?;
        // The world, not the model tables: each finished model's report is checked against
        // its own table, so a changed `[checker]` only retrains the checker.
        if held.fingerprint() != spec.fingerprint() {
            anyhow::bail!(
                "{}: this folder holds a world trained from another spec (fingerprint {} here, \
                 {} asked); use another --out",
                out.display(),
                held.fingerprint(),
                spec.fingerprint()
            );
        }
        if held != *spec {
            let text = toml::to_string(spec).context("serializing the spec")?;
            crate::io::write_bytes_atomically(&path, text.as_bytes())?;
        }
        return Ok(());
    }
    if out.exists()
        && std::fs::read_dir(out)
            .with_context(|| format!("reading {}", out.display()))?
            .next()
            .is_some()
    {
        anyhow::bail!(
            "{}: the folder exists and is not a world folder (no spec.toml); give an empty or \
             new folder",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let text = toml::to_string(spec).context("serializing the spec")?;
    crate::io::write_bytes_atomically(&path, text.as_bytes())
}

/// Refuses to train into a folder holding a finished model (`report.json`): retraining would
/// leave files measured on the old weights beside the new ones.
pub fn refuse_finished(dir: &Path) -> anyhow::Result<()> {
    if dir.join("report.json").exists() {
        anyhow::bail!(
            "{}: already holds a trained model (report.json); remove the folder or give another \
             --out",
            dir.display()
        );
    }
    Ok(())
}

fn read_report(dir: &Path) -> anyhow::Result<Option<serde_json::Value>> {
    let path = dir.join("report.json");
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| {
        format!("{}: not a training report", path.display())
    })?))
}

/// Refuses a finished folder whose report names another spec or config.
fn check_finished(
    dir: &Path,
    report: &serde_json::Value,
    spec: &WorldSpec,
    config_key: &str,
    config: serde_json::Value,
) -> anyhow::Result<()> {
    let fingerprint = report.get("spec_fingerprint").and_then(|v| v.as_str());
    if fingerprint != Some(spec.fingerprint().as_str()) {
        anyhow::bail!(
            "{}: finished with spec fingerprint {:?}, not this world's {}; remove the folder to \
             retrain it",
            dir.display(),
            fingerprint,
            spec.fingerprint()
        );
    }
    if report.get(config_key) != Some(&config) {
        anyhow::bail!(
            "{}: finished with another `{config_key}` than the spec asks ({} there, {} asked); \
             remove the folder to retrain it",
            dir.display(),
            report.get(config_key).unwrap_or(&serde_json::Value::Null),
            config
        );
    }
    Ok(())
}

/// Trains `models` (all when empty) of `spec` into `out`, in [`WorldModel::ALL`] order.
/// `on_step` sees each outcome as it happens.
pub fn train_world(
    spec: &WorldSpec,
    out: &Path,
    models: &[WorldModel],
    progress: bool,
    mut on_step: impl FnMut(&StepOutcome),
) -> anyhow::Result<Vec<StepOutcome>> {
    claim_folder(spec, out)?;
    let mut outcomes = Vec::new();
    for &model in WorldModel::ALL {
        if !models.is_empty() && !models.contains(&model) {
            continue;
        }
        let dir = model.dir(out);
        let outcome = match model {
            WorldModel::Checker => {
                let config = &spec.checker;
                match read_report(&dir)? {
                    Some(report) => {
                        check_finished(
                            &dir,
                            &report,
                            spec,
                            "config",
                            serde_json::to_value(config)?,
                        )?;
                        StepOutcome {
                            model,
                            dir,
                            skipped: true,
                            summary: checker_summary_json(&report),
                            seconds: 0.0,
                        }
                    }
                    None => {
                        let r = checker::train_and_save(spec, config, &dir, progress)?;
                        StepOutcome {
                            model,
                            dir,
                            skipped: false,
                            summary: checker_summary_json(&serde_json::to_value(&r)?),
                            seconds: r.seconds,
                        }
                    }
                }
            }
            WorldModel::Classifier => {
                let config = classifier::train_config(spec);
                match read_report(&dir)? {
                    Some(report) => {
                        check_finished(
                            &dir,
                            &report,
                            spec,
                            "train",
                            serde_json::to_value(&config)?,
                        )?;
                        StepOutcome {
                            model,
                            dir,
                            skipped: true,
                            summary: classifier_summary_json(&report),
                            seconds: 0.0,
                        }
                    }
                    None => {
                        let r = classifier::train_and_save(spec, &dir, progress)?;
                        StepOutcome {
                            model,
                            dir,
                            skipped: false,
                            summary: classifier_summary_json(&serde_json::to_value(&r)?),
                            seconds: r.seconds,
                        }
                    }
                }
            }
        };
        on_step(&outcome);
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// "held-out shape 97.1%, color 100.0%, ..." from a checker report.
fn checker_summary_json(report: &serde_json::Value) -> String {
    let parts: Vec<String> = report
        .get("heldout_accuracy")
        .and_then(|v| v.as_array())
        .map(|rows| {
            rows.iter()
                .filter_map(|row| {
                    let name = row.get(0)?.as_str()?;
                    let acc = row.get(1)?;
                    let (c, t) = (acc.get("correct")?.as_f64()?, acc.get("total")?.as_f64()?);
                    Some(format!("{name} {:.1}%", 100.0 * c / t.max(1.0)))
                })
                .collect()
        })
        .unwrap_or_default();
    format!("held-out accuracy: {}", parts.join(", "))
}

/// "validation 80.1%, balanced 61.0%" from a classifier report.
fn classifier_summary_json(report: &serde_json::Value) -> String {
    let parts: Vec<String> = report
        .get("accuracy")
        .and_then(|v| v.as_array())
        .map(|rows| {
            rows.iter()
                .filter_map(|row| {
                    let split = row.get("split")?.as_str()?;
                    let acc = row.get("overall")?;
                    let (c, t) = (acc.get("correct")?.as_f64()?, acc.get("total")?.as_f64()?);
                    Some(format!("{split} {:.1}%", 100.0 * c / t.max(1.0)))
                })
                .collect()
        })
        .unwrap_or_default();
    format!("accuracy: {}", parts.join(", "))
}
