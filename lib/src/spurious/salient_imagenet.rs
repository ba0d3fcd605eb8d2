//! Salient ImageNet's crowd annotations (Singla & Feizi, *Salient ImageNet: How to discover
//! spurious features in deep learning?*, ICLR 2022) read from the user's copy of
//! `mturk_results/discover_spurious_features.csv` in <https://github.com/singlasahil14/salient_imagenet>
//! (its licence forbids redistributing it, so it is never committed here).
//!
//! **Format**: a CSV with the header
//! `WorkerId,Input.wordnet_id,Input.class_index,Input.feature_index,Input.feature_rank,Answer.main,Answer.confidence,Answer.reasons`
//! (extra columns are ignored), one row per worker answer. Each (class, feature) pair — a class
//! index of a robust ResNet-50 and one of its 2048 penultimate features, ranked 1..5 for the
//! class — has 5 answers. `Answer.main` is `main_object` (the feature's visualization is on the
//! class object), `separate_object` or `background`. A pair is **spurious** when at least 3 of
//! its 5 answers are `separate_object` or `background` (the paper's majority vote), else core.
//! The published file holds 5000 pairs, 630 of them spurious (12.6%).
//!
//! **Bad input**: missing columns are an error naming them; a row whose class index, feature
//! index, rank or confidence is not a number, or whose `Answer.main` is not one of the three
//! values, is an error naming its line; a pair with other than 5 answers is skipped and reported
//! in [`SalientImagenet::skipped`] (lines and count), never used; rows of one pair that disagree
//! on its WordNet id or rank are an error naming the lines.
//!
//! **Agreement** ([`agreement`]): spurious is the positive class. Because "always core" scores
//! 87.4% raw accuracy on the published file, the report is the confusion matrix, balanced
//! accuracy, and spurious precision, recall and F1, never raw accuracy alone.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

/// One row of a pair while reading: WordNet id, rank, the answer.
type PairRow = (String, usize, WorkerAnswer);

/// The columns the reader needs, in the published order.
pub const COLUMNS: [&str; 8] = [
    "WorkerId",
    "Input.wordnet_id",
    "Input.class_index",
    "Input.feature_index",
    "Input.feature_rank",
    "Answer.main",
    "Answer.confidence",
    "Answer.reasons",
];

/// Answers per pair in the published protocol, and the spurious votes that make a majority.
pub const ANSWERS_PER_PAIR: usize = 5;
pub const SPURIOUS_MAJORITY: usize = 3;

/// A worker's answer to "where is the feature's focus?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    MainObject,
    SeparateObject,
    Background,
}

impl Answer {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "main_object" => Some(Answer::MainObject),
            "separate_object" => Some(Answer::SeparateObject),
            "background" => Some(Answer::Background),
            _ => None,
        }
    }

    pub fn is_spurious(self) -> bool {
        self != Answer::MainObject
    }
}

/// Core (on the class object) or spurious.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Label {
    Core,
    Spurious,
}

/// One worker's row.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerAnswer {
    pub worker_id: String,
    pub answer: Answer,
    /// 1..5 in the published file.
    pub confidence: f64,
    pub reasons: String,
    /// The row's line in the file (the header is line 1).
    pub line: u64,
}

/// A (class, feature) pair with its 5 answers and the majority label.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureAnnotation {
    pub wordnet_id: String,
    pub class_index: usize,
    pub feature_index: usize,
    /// 1 = the class's most important feature.
    pub feature_rank: usize,
    pub answers: Vec<WorkerAnswer>,
    /// Answers that are `separate_object` or `background`.
    pub spurious_votes: usize,
    pub label: Label,
}

/// A pair left out, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct SkippedPair {
    pub class_index: usize,
    pub feature_index: usize,
    pub lines: Vec<u64>,
    pub reason: String,
}

/// The whole file: annotated pairs (by class, then rank) and the pairs skipped.
#[derive(Debug, Clone, Default)]
pub struct SalientImagenet {
    pub pairs: Vec<FeatureAnnotation>,
    pub skipped: Vec<SkippedPair>,
}

impl SalientImagenet {
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path)
            .with_context(|| format!("Salient ImageNet CSV {}", path.display()))?;
        Self::from_reader(file).with_context(|| format!("Salient ImageNet CSV {}", path.display()))
    }

    pub fn from_reader(reader: impl std::io::Read) -> Result<Self> {
        let mut csv = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_reader(reader);
        let header = csv.headers().context("reading the header")?.clone();
        let missing: Vec<&str> = COLUMNS
            .iter()
            .copied()
            .filter(|c| !header.iter().any(|h| h.trim() == *c))
            .collect();
        if !missing.is_empty() {
            bail!(
                "missing column(s) {} (the header has: {})",
                missing.join(", "),
                header.iter().collect::<Vec<_>>().join(",")
            )
        }
        let col = |name: &str| {
            header
                .iter()
                .position(|h| h.trim() == name)
                .expect("checked")
        };
        let idx: Vec<usize> = COLUMNS.iter().map(|c| col(c)).collect();

        // (class, feature) -> (wordnet id, rank, answers), in file order.
        let mut groups: BTreeMap<(usize, usize), Vec<PairRow>> = BTreeMap::new();
        for record in csv.records() {
            let record = record.context("malformed CSV")?;
            let line = record.position().map(|p| p.line()).unwrap_or(0);
            let field = |k: usize| record.get(idx[k]).unwrap_or("").trim();
            let number = |k: usize| -> Result<usize> {
                field(k).parse::<usize>().map_err(|_| {
                    anyhow!(
                        "line {line}: {} `{}` is not a non-negative integer",
                        COLUMNS[k],
                        field(k)
                    )
                })
            };
            let class_index = number(2)?;
            let feature_index = number(3)?;
            let feature_rank = number(4)?;
            let answer = Answer::parse(field(5)).ok_or_else(|| {
                anyhow!(
                    "line {line}: Answer.main `{}` is not main_object, separate_object or background",
                    field(5)
                )
            })?;
            let confidence = field(6).parse::<f64>().map_err(|_| {
                anyhow!(
                    "line {line}: Answer.confidence `{}` is not a number",
                    field(6)
                )
            })?;
            groups
                .entry((class_index, feature_index))
                .or_default()
                .push((
                    field(1).to_string(),
                    feature_rank,
                    WorkerAnswer {
                        worker_id: field(0).to_string(),
                        answer,
                        confidence,
                        reasons: record.get(idx[7]).unwrap_or("").to_string(),
                        line,
                    },
                ));
        }

        let mut out = SalientImagenet::default();
        for ((class_index, feature_index), rows) in groups {
            let lines: Vec<u64> = rows.iter().map(|r| r.2.line).collect();
            let (wordnet_id, feature_rank) = (rows[0].0.clone(), rows[0].1);
            if let Some(r) = rows
                .iter()
                .find(|r| r.0 != wordnet_id || r.1 != feature_rank)
            {
                bail!(
                    "class {class_index}, feature {feature_index}: line {} says wordnet id {} rank {}, \
                     line {} says {} rank {} (lines of the pair: {lines:?})",
                    rows[0].2.line,
                    wordnet_id,
                    feature_rank,
                    r.2.line,
                    r.0,
                    r.1
                )
            }
            if rows.len() != ANSWERS_PER_PAIR {
                out.skipped.push(SkippedPair {
                    class_index,
                    feature_index,
                    reason: format!(
                        "{} answers instead of {ANSWERS_PER_PAIR} (lines {lines:?})",
                        rows.len()
                    ),
                    lines,
                });
                continue;
            }
            let answers: Vec<WorkerAnswer> = rows.into_iter().map(|r| r.2).collect();
            let spurious_votes = answers.iter().filter(|a| a.answer.is_spurious()).count();
            out.pairs.push(FeatureAnnotation {
                wordnet_id,
                class_index,
                feature_index,
                feature_rank,
                answers,
                spurious_votes,
                label: if spurious_votes >= SPURIOUS_MAJORITY {
                    Label::Spurious
                } else {
                    Label::Core
                },
            });
        }
        out.pairs
            .sort_by_key(|p| (p.class_index, p.feature_rank, p.feature_index));
        Ok(out)
    }

    /// Each class's annotated features, by rank.
    pub fn classes(&self) -> BTreeMap<usize, Vec<&FeatureAnnotation>> {
        let mut classes: BTreeMap<usize, Vec<&FeatureAnnotation>> = BTreeMap::new();
        for p in &self.pairs {
            classes.entry(p.class_index).or_default().push(p);
        }
        classes
    }

    /// A class's feature indices, by rank (empty if the class has no annotated pair).
    pub fn class_features(&self, class_index: usize) -> Vec<usize> {
        self.pairs
            .iter()
            .filter(|p| p.class_index == class_index)
            .map(|p| p.feature_index)
            .collect()
    }

    /// The reference label of a pair, if annotated.
    pub fn label(&self, class_index: usize, feature_index: usize) -> Option<Label> {
        self.pairs
            .iter()
            .find(|p| p.class_index == class_index && p.feature_index == feature_index)
            .map(|p| p.label)
    }
}

/// Counts with spurious as the positive class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfusionMatrix {
    /// Reference spurious, ours spurious (true positives).
    pub spurious_as_spurious: usize,
    /// Reference spurious, ours core (false negatives).
    pub spurious_as_core: usize,
    /// Reference core, ours spurious (false positives).
    pub core_as_spurious: usize,
    /// Reference core, ours core (true negatives).
    pub core_as_core: usize,
}

/// How our labels agree with the reference's. Ratios are `None` when undefined (no reference
/// pair of a class, or no pair we call spurious).
#[derive(Debug, Clone, PartialEq)]
pub struct Agreement {
    pub confusion: ConfusionMatrix,
    /// Mean of the recall on spurious pairs and the recall on core pairs.
    pub balanced_accuracy: Option<f64>,
    pub spurious_precision: Option<f64>,
    pub spurious_recall: Option<f64>,
    pub spurious_f1: Option<f64>,
    /// Our labelled pairs the reference does not annotate (skipped or absent): not counted.
    pub not_in_reference: Vec<(usize, usize)>,
    /// Reference pairs we did not label: not counted.
    pub unlabelled: usize,
}

fn ratio(num: usize, den: usize) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// Compares `ours` ((class, feature) -> label) with the reference's labels on the pairs both
/// have. A pair labelled twice in `ours` is an error naming it.
pub fn agreement(
    reference: &SalientImagenet,
    ours: &[((usize, usize), Label)],
) -> Result<Agreement> {
    let mut labels: HashMap<(usize, usize), Label> = HashMap::new();
    for &(pair, label) in ours {
        if labels.insert(pair, label).is_some() {
            bail!("class {}, feature {} is labelled twice", pair.0, pair.1)
        }
    }
    let mut c = ConfusionMatrix::default();
    let mut matched = 0;
    for p in &reference.pairs {
        let Some(&ours) = labels.get(&(p.class_index, p.feature_index)) else {
            continue;
        };
        matched += 1;
        match (p.label, ours) {
            (Label::Spurious, Label::Spurious) => c.spurious_as_spurious += 1,
            (Label::Spurious, Label::Core) => c.spurious_as_core += 1,
            (Label::Core, Label::Spurious) => c.core_as_spurious += 1,
            (Label::Core, Label::Core) => c.core_as_core += 1,
        }
    }
    let mut not_in_reference: Vec<(usize, usize)> = labels
        .keys()
        .copied()
        .filter(|&(class, feature)| reference.label(class, feature).is_none())
        .collect();
    not_in_reference.sort();
    let tp = c.spurious_as_spurious;
    let recall = ratio(tp, tp + c.spurious_as_core);
    let precision = ratio(tp, tp + c.core_as_spurious);
    let specificity = ratio(c.core_as_core, c.core_as_core + c.core_as_spurious);
    let f1 = match (precision, recall) {
        (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
        (Some(_), Some(_)) => Some(0.0),
        _ => None,
    };
    Ok(Agreement {
        confusion: c,
        balanced_accuracy: match (recall, specificity) {
            (Some(r), Some(s)) => Some((r + s) / 2.0),
            _ => None,
        },
        spurious_precision: precision,
        spurious_recall: recall,
        spurious_f1: f1,
        not_in_reference,
        unlabelled: reference.pairs.len() - matched,
    })
}
