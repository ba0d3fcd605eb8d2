//! Ground truth, measured from the world and a trained classifier (never read from the spec's
//! correlations: they only label rows as planted or not, for comparison).
//!
//! - **Reliance by intervention** (FunnyBirds-style, Hesse et al. 2023): on balanced images,
//!   set one attribute (colour, texture, background, size) to each of its values with all else
//!   fixed (same geometry and background seed) and read the class probabilities. For class `c`
//!   and value `v` of attribute `A`:
//!   `reliance = mean over class-c images of [p_c(A := v) − mean over u ≠ v of p_c(A := u)]`
//!   (how much the class's own images need `v`), and
//!   `induction` = the same on images of the *other* classes (how much `v` alone pulls
//!   them towards `c`). A **learned shortcut** is a (class, attribute, value) whose reliance or
//!   induction exceeds [`TruthConfig::shortcut_threshold`] (0.2 of probability by default).
//! - **Object removal**: p_c with the object and with only its background.
//! - **Predictive features** (Salient ImageNet, Singla & Feizi 2022): for class `c`, feature `j`
//!   of the pooled penultimate layer scores `mean over class-c images of feature_j × W[c, j]`
//!   (`W` the final linear layer); the top-k are the class's predictive features. For each, the
//!   **object share** is the fraction of its activation map (the last stage's channel `j`,
//!   bilinearly upsampled to the image, as Salient ImageNet's neural activation maps) that lies
//!   inside the exact object mask: `Σ map·mask / Σ map`, averaged over the images where the
//!   channel is active. Objects cover a small part of the image (14-26% in the default world),
//!   so the share alone says little: a map spread evenly over the image has share = area. The
//!   label compares the map's mean activation per pixel on the object with its mean per pixel
//!   on the background, the **object density ratio**
//!   `ρ = (share / area) / ((1 − share) / (1 − area))` (1 for a uniform map, whatever the
//!   object's size; `area` the class's mean object area). A feature is **core** when
//!   `ρ ≥` [`TruthConfig::core_density_ratio`] (2: at least twice as dense on the object as off
//!   it), else **spurious**. This is Salient ImageNet's location-based criterion (is the feature
//!   on the object?) made quantitative; like it, it labels by location, so a feature for a
//!   planted colour or texture, which lies on the object, is core-by-location, and a planted
//!   background gives spurious features.

use candle_core::{Device, IndexOp};
use serde::{Deserialize, Serialize};

use super::classifier::{self, probabilities, SplitAccuracy};
use super::render::{render, render_background, Rendered};
use super::spec::{WorldSpec, ATTRIBUTES};
use super::splits::{images_tensor, masks_tensor, sample, Dataset, Sample, Split};
use crate::models::classifiers::{Classifier, Network, Preprocess};
use crate::spurious::predictive;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TruthConfig {
    /// Balanced images per class used for the measurements.
    pub images_per_class: usize,
    /// Predictive features listed per class.
    pub top_k: usize,
    /// Reliance or induction above this is a learned shortcut (probability units).
    pub shortcut_threshold: f64,
    /// An object density ratio at or above this makes a feature core.
    pub core_density_ratio: f64,
    /// Also measure the classifier's accuracy on the validation and balanced splits.
    pub accuracy: bool,
}

impl Default for TruthConfig {
    fn default() -> Self {
        Self {
            images_per_class: 50,
            top_k: 5,
            shortcut_threshold: 0.2,
            core_density_ratio: 2.0,
            accuracy: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelianceRow {
    pub class: String,
    pub attribute: String,
    pub value: String,
    /// Mean p_class over class images with the value set.
    pub p_with: f64,
    /// Mean p_class over class images with each other value set.
    pub p_without: f64,
    /// `p_with − p_without` on the class's images.
    pub reliance: f64,
    /// The same difference on the other classes' images.
    pub induction: f64,
    pub learned_shortcut: bool,
    /// Whether the spec plants this value for this class (for comparison only).
    pub planted: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemovalRow {
    pub class: String,
    pub p_with_object: f64,
    pub p_background_only: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeatureRow {
    /// Penultimate feature (channel of the last stage).
    pub feature: usize,
    /// Mean activation × the class's final weight.
    pub score: f64,
    /// Share of the activation map inside the object mask (NaN if never active).
    pub object_share: f64,
    /// `object_share` over the object's mean area: 1 for a map spread evenly over the image,
    /// above 1 for one concentrated on the object.
    pub share_over_area: f64,
    /// Mean activation per pixel on the object over that on the background:
    /// `(share / area) / ((1 − share) / (1 − area))`; the label compares it with
    /// [`TruthConfig::core_density_ratio`].
    pub object_density_ratio: f64,
    /// `core` or `spurious`.
    pub label: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassFeatures {
    pub class: String,
    /// Mean fraction of the image the object covers (the share a uniform map would have).
    pub mean_object_area: f64,
    pub features: Vec<FeatureRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Truth {
    pub spec_fingerprint: String,
    pub config: TruthConfig,
    pub accuracy: Vec<SplitAccuracy>,
    pub reliance: Vec<RelianceRow>,
    pub removal: Vec<RemovalRow>,
    pub features: Vec<ClassFeatures>,
}

impl Truth {
    pub fn learned_shortcuts(&self) -> Vec<&RelianceRow> {
        self.reliance
            .iter()
            .filter(|r| r.learned_shortcut)
            .collect()
    }
}

/// The balanced images used: the first `n` of each class.
fn balanced_samples(spec: &WorldSpec, n: usize) -> Vec<Sample> {
    let k = spec.classes.len();
    let total = (n * k).min(spec.splits.balanced);
    (0..total)
        .map(|i| sample(spec, Split::Balanced, i))
        .collect()
}

fn with_attribute(s: &Sample, attribute: &str, value: &str, side: usize) -> Sample {
    let mut s = s.clone();
    let v = value.to_string();
    match attribute {
        "color" => s.scene.color = v,
        "texture" => s.scene.texture = v,
        "background" => s.scene.background = v,
        "size" => {
            // Keep the centre and the jitter: scale the radius to the new nominal size, then
            // move the centre in if the object would leave the image.
            let factor = super::render::size_radius(&v) / super::render::size_radius(&s.scene.size);
            let r = s.scene.radius * factor;
            let side = side as f32;
            for c in s.scene.center.iter_mut() {
                *c = if 2.0 * r >= side {
                    side / 2.0
                } else {
                    c.clamp(r, side - r)
                };
            }
            s.scene.radius = r;
            s.scene.size = v;
        }
        other => panic!("unknown attribute `{other}`"),
    }
    s
}

fn probs_of(
    classifier: &Classifier,
    pre: &Preprocess,
    rendered: &[Rendered],
) -> anyhow::Result<Vec<Vec<f32>>> {
    Ok(probabilities(classifier, pre, &images_tensor(rendered)?)?.to_vec2::<f32>()?)
}

/// Measures the ground truth of `classifier` in the world `spec`.
pub fn measure(
    spec: &WorldSpec,
    classifier: &Classifier,
    pre: &Preprocess,
    config: &TruthConfig,
) -> anyhow::Result<Truth> {
    if config.images_per_class == 0 || config.top_k == 0 {
        anyhow::bail!("truth: images_per_class and top_k must be positive")
    }
    let size = spec.image_size;
    let samples = balanced_samples(spec, config.images_per_class);
    let k = spec.classes.len();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;

    // Reliance and induction.
    let mut reliance = Vec::new();
    for attribute in ATTRIBUTES {
        let values = spec.values(attribute).expect("a known attribute");
        if values.len() < 2 {
            continue;
        }
        // probs[v][image][class]
        let mut probs = Vec::new();
        for v in values {
            let rendered: Vec<Rendered> = samples
                .iter()
                .map(|s| render(&with_attribute(s, attribute, v, size).scene, size))
                .collect();
            probs.push(probs_of(classifier, pre, &rendered)?);
        }
        for (c, class) in spec.classes.iter().enumerate() {
            for (vi, v) in values.iter().enumerate() {
                let diff = |own: bool| -> (f64, f64) {
                    let (mut with, mut without) = (Vec::new(), Vec::new());
                    for (i, s) in samples.iter().enumerate() {
                        if (s.class == c) != own {
                            continue;
                        }
                        with.push(probs[vi][i][c] as f64);
                        let others: Vec<f64> = (0..values.len())
                            .filter(|&u| u != vi)
                            .map(|u| probs[u][i][c] as f64)
                            .collect();
                        without.push(mean(&others));
                    }
                    (mean(&with), mean(&without))
                };
                let (p_with, p_without) = diff(true);
                let (o_with, o_without) = diff(false);
                let (r, ind) = (p_with - p_without, o_with - o_without);
                reliance.push(RelianceRow {
                    class: class.clone(),
                    attribute: attribute.to_string(),
                    value: v.clone(),
                    p_with,
                    p_without,
                    reliance: r,
                    induction: ind,
                    learned_shortcut: r > config.shortcut_threshold
                        || ind > config.shortcut_threshold,
                    planted: spec
                        .correlations
                        .iter()
                        .any(|p| p.class == *class && p.attribute == *attribute && p.value == *v),
                });
            }
        }
    }

    // Object removal.
    let originals: Vec<Rendered> = samples.iter().map(|s| render(&s.scene, size)).collect();
    let backgrounds: Vec<Rendered> = samples
        .iter()
        .map(|s| render_background(&s.scene, size))
        .collect();
    let p_orig = probs_of(classifier, pre, &originals)?;
    let p_bg = probs_of(classifier, pre, &backgrounds)?;
    let removal = (0..k)
        .map(|c| {
            let idx: Vec<usize> = (0..samples.len())
                .filter(|&i| samples[i].class == c)
                .collect();
            RemovalRow {
                class: spec.classes[c].clone(),
                p_with_object: mean(&idx.iter().map(|&i| p_orig[i][c] as f64).collect::<Vec<_>>()),
                p_background_only: mean(
                    &idx.iter().map(|&i| p_bg[i][c] as f64).collect::<Vec<_>>(),
                ),
            }
        })
        .collect();

    // Predictive features and their object shares.
    let Network::ResNet(resnet) = &classifier.network else {
        anyhow::bail!("truth: the predictive-feature measurement needs a ResNet classifier")
    };
    let fc = resnet.fc().weight().to_device(&Device::Cpu)?; // [k, C]
    let mut features = Vec::new();
    for c in 0..k {
        let idx: Vec<usize> = (0..samples.len())
            .filter(|&i| samples[i].class == c)
            .collect();
        let rendered: Vec<Rendered> = idx.iter().map(|&i| originals[i].clone()).collect();
        let images = images_tensor(&rendered)?;
        let masks = masks_tensor(&rendered)?; // [n, 1, s, s]
        let out = classifier.forward(&pre.forward(&images)?)?;
        let pooled = out.features.to_device(&Device::Cpu)?; // [n, C]
        let maps = out.tap("layer4")?.to_device(&Device::Cpu)?; // [n, C, h, w]
        let maps = crate::ops::resize_bilinear(&maps, (size, size), false)?;
        let w_c = fc.i(c)?; // [C]
        let scores = predictive::predictive_scores(&pooled, &w_c)?;
        let order = predictive::top_k(&scores, config.top_k);
        let area: f64 = masks.mean_all()?.to_scalar::<f32>()? as f64;
        let mut rows = Vec::new();
        for &j in &order {
            let m = maps.narrow(1, j, 1)?; // [n, 1, s, s]
            let inside: Vec<f32> = (&m * &masks)?.sum((1, 2, 3))?.to_vec1()?;
            let total: Vec<f32> = m.sum((1, 2, 3))?.to_vec1()?;
            let shares: Vec<f64> = inside
                .iter()
                .zip(&total)
                .filter(|(_, t)| **t > 1e-6)
                .map(|(i, t)| (*i / *t) as f64)
                .collect();
            let share = if shares.is_empty() {
                f64::NAN
            } else {
                mean(&shares)
            };
            let ratio = density_ratio(share, area);
            rows.push(FeatureRow {
                feature: j,
                score: scores[j] as f64,
                object_share: share,
                share_over_area: share / area.max(1e-9),
                object_density_ratio: ratio,
                label: if ratio >= config.core_density_ratio {
                    "core"
                } else {
                    "spurious"
                }
                .to_string(),
            });
        }
        features.push(ClassFeatures {
            class: spec.classes[c].clone(),
            mean_object_area: area,
            features: rows,
        });
    }

    let mut accuracy = Vec::new();
    if config.accuracy {
        for split in [Split::Validation, Split::Balanced] {
            let data = Dataset::new(spec, split, None);
            let predicted = classifier::predict(classifier, pre, &data.images()?)?;
            accuracy.push(classifier::split_accuracy(spec, split, &data, &predicted));
        }
    }

    Ok(Truth {
        spec_fingerprint: spec.fingerprint(),
        config: config.clone(),
        accuracy,
        reliance,
        removal,
        features,
    })
}

fn pct(x: f64) -> String {
    if x.is_nan() {
        "–".to_string()
    } else {
        format!("{:.1}%", 100.0 * x)
    }
}

/// Accuracy tables (one row per split) in Markdown.
pub fn accuracy_markdown(accuracy: &[SplitAccuracy]) -> String {
    let mut md = String::new();
    md.push_str("| split | overall | bias-aligned | bias-conflicting | neutral | worst group | aligned − conflicting |\n|---|---|---|---|---|---|---|\n");
    for a in accuracy {
        md.push_str(&format!(
            "| {} | {} ({}) | {} ({}) | {} ({}) | {} ({}) | {} | {} |\n",
            a.split.name(),
            pct(a.overall.value()),
            a.overall.total,
            pct(a.aligned.value()),
            a.aligned.total,
            pct(a.conflicting.value()),
            a.conflicting.total,
            pct(a.neutral.value()),
            a.neutral.total,
            pct(a.worst_group()),
            // A world with no planted correlation has no aligned/conflicting groups.
            match a.aligned.value() - a.conflicting.value() {
                gap if gap.is_nan() => "–".to_string(),
                gap => format!("{:+.1} pt", 100.0 * gap),
            },
        ));
    }
    md.push_str("\nPer planted correlation (accuracy, images):\n\n| split | correlation | class with value | class without value | other classes with value |\n|---|---|---|---|---|\n");
    for a in accuracy {
        for g in &a.per_correlation {
            md.push_str(&format!(
                "| {} | {} ← {} = {} | {} ({}) | {} ({}) | {} ({}) |\n",
                a.split.name(),
                g.class,
                g.attribute,
                g.value,
                pct(g.class_with_value.value()),
                g.class_with_value.total,
                pct(g.class_without_value.value()),
                g.class_without_value.total,
                pct(g.others_with_value.value()),
                g.others_with_value.total,
            ));
        }
    }
    md
}

/// `(share / area) / ((1 − share) / (1 − area))`: how much denser a map is on the object than
/// off it (infinite when all of it is on the object).
pub fn density_ratio(share: f64, area: f64) -> f64 {
    let (area, off) = (area.max(1e-9), (1.0 - area).max(1e-9));
    (share / area) / ((1.0 - share).max(0.0) / off)
}

/// The whole ground truth as Markdown.
pub fn markdown(truth: &Truth, spec: &WorldSpec) -> String {
    let c = &truth.config;
    let mut md = format!(
        "# ShapesWorld ground truth\n\nSpec fingerprint `{}`; {} balanced images per class; \
         learned shortcut: reliance or induction > {}; core feature: object density ratio ≥ {} \
         (activation per pixel on the object over that on the background).\n\n",
        truth.spec_fingerprint, c.images_per_class, c.shortcut_threshold, c.core_density_ratio
    );
    if !truth.accuracy.is_empty() {
        md.push_str("## Accuracy\n\n");
        md.push_str(&accuracy_markdown(&truth.accuracy));
        md.push('\n');
    }
    md.push_str("## Learned shortcuts (reliance by intervention)\n\n");
    md.push_str("| class | attribute = value | p(class) with | p(class) without | reliance | induction | planted |\n|---|---|---|---|---|---|---|\n");
    let shortcuts = truth.learned_shortcuts();
    for r in &shortcuts {
        md.push_str(&format!(
            "| {} | {} = {} | {:.3} | {:.3} | {:+.3} | {:+.3} | {} |\n",
            r.class,
            r.attribute,
            r.value,
            r.p_with,
            r.p_without,
            r.reliance,
            r.induction,
            if r.planted { "yes" } else { "no" }
        ));
    }
    if shortcuts.is_empty() {
        md.push_str("| (none above the threshold) | | | | | | |\n");
    }
    let missed: Vec<&RelianceRow> = truth
        .reliance
        .iter()
        .filter(|r| r.planted && !r.learned_shortcut)
        .collect();
    for r in missed {
        md.push_str(&format!(
            "\nPlanted but not learned: {} ← {} = {} (reliance {:+.3}, induction {:+.3}).\n",
            r.class, r.attribute, r.value, r.reliance, r.induction
        ));
    }
    md.push_str("\nStrongest reliance per class and attribute:\n\n| class |");
    for a in ATTRIBUTES {
        md.push_str(&format!(" {a} |"));
    }
    md.push_str("\n|---|");
    for _ in ATTRIBUTES {
        md.push_str("---|");
    }
    md.push('\n');
    for class in &spec.classes {
        md.push_str(&format!("| {class} |"));
        for a in ATTRIBUTES {
            let best = truth
                .reliance
                .iter()
                .filter(|r| r.class == *class && r.attribute == *a)
                .max_by(|x, y| x.reliance.total_cmp(&y.reliance));
            match best {
                Some(r) => md.push_str(&format!(" {} {:+.3} |", r.value, r.reliance)),
                None => md.push_str(" – |"),
            }
        }
        md.push('\n');
    }
    md.push_str("\n## Object removal\n\n| class | p(class) with the object | p(class) background only |\n|---|---|---|\n");
    for r in &truth.removal {
        md.push_str(&format!(
            "| {} | {:.3} | {:.3} |\n",
            r.class, r.p_with_object, r.p_background_only
        ));
    }
    md.push_str(&format!(
        "\n## Top-{} predictive features (Salient ImageNet) and their object share\n\n| class | object area | features (index: score, object share, density ratio ρ, label) |\n|---|---|---|\n",
        c.top_k
    ));
    for f in &truth.features {
        let cells: Vec<String> = f
            .features
            .iter()
            .map(|r| {
                format!(
                    "#{}: {:.2}, {}, ρ {:.1}, {}",
                    r.feature,
                    r.score,
                    pct(r.object_share),
                    r.object_density_ratio,
                    r.label
                )
            })
            .collect();
        md.push_str(&format!(
            "| {} | {} | {} |\n",
            f.class,
            pct(f.mean_object_area),
            cells.join("; ")
        ));
    }
    md
}
