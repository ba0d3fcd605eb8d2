//! Core / spurious labelling of a (class, feature) pair from the share of the feature's
//! activation that lies on the class object, over `n` images that maximize the feature.
//!
//! **Protocol** (per pair; DiffExplainer's Sec. 4 with Salient ImageNet's activation maps):
//! 1. the explainer ([`crate::explain::optimize()`]) optimizes a soft prompt so that the `n`
//!    images of the pipeline's batch maximize the feature (the pooled penultimate unit), or the
//!    feature plus `class_weight` times the class logit; the best iteration's images are kept;
//! 2. the class object is segmented in each image with a text query, by default
//!    `"a photo of a {}"` with the class name in `{}` ([`ObjectSegmenter`], CLIPSeg's
//!    [`Segmenter`] or any other);
//! 3. per image, the **object share** `Σ map·mask / Σ map` of the feature's activation map
//!    ([`super::feature_maps`]); images where the feature does not fire (a map zero everywhere)
//!    have no share and are left out (as in ShapesWorld's ground truth);
//! 4. the **score** is the mean share over the `m` images where the feature fires, and its
//!    **margin** the half-width of Student's t interval,
//!    `t_{(1+confidence)/2, m-1} · s / √m` (`s` the sample standard deviation; 95% by default);
//! 5. the **label**: `core` when `score − margin` clears the rule's **core criterion**,
//!    `spurious` when `score + margin` does not, else `uncertain` (the interval straddles it, or
//!    fewer than 2 images fired so no margin exists). The default criterion is ShapesWorld's
//!    ground truth's ([`crate::world::truth::density_ratio`]): the **object density ratio**
//!    `ρ = (share / area) / ((1 − share) / (1 − area))` at least 2, `area` the mean mask area
//!    of those images; a map spread uniformly over the image has `ρ = 1` whatever the object's
//!    size. As a share, `ρ ≥ r` reads `share ≥ r·area / (1 − area + r·area)`, the **share
//!    threshold** recorded with each summary. [`CoreCriterion::Share`] compares the share with a
//!    fixed value instead ("most of the activation on the object": 0.5), which calls features of
//!    small objects spurious more often.

use anyhow::bail;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, StudentsT};

use super::feature_maps::share_inside;
use crate::models::clipseg::Segmenter;

/// Core, spurious, or not decidable at the rule's confidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Core,
    Spurious,
    Uncertain,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Core => "core",
            Verdict::Spurious => "spurious",
            Verdict::Uncertain => "uncertain",
        })
    }
}

/// What makes a feature core (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoreCriterion {
    /// Object density ratio `ρ ≥` this (> 1): ShapesWorld's ground truth uses 2.
    DensityRatio(f64),
    /// Object share `≥` this (in (0, 1)).
    Share(f64),
}

impl CoreCriterion {
    /// The share at or above which a pair is core, for objects covering `area` of the image.
    pub fn share_threshold(&self, area: f64) -> f64 {
        match *self {
            CoreCriterion::Share(t) => t,
            CoreCriterion::DensityRatio(r) => {
                let a = area.clamp(0.0, 1.0);
                r * a / (1.0 - a + r * a)
            }
        }
    }

    /// `"object density ratio ≥ 2"` / `"object share ≥ 0.5"`.
    pub fn describe(&self) -> String {
        match *self {
            CoreCriterion::DensityRatio(r) => format!("object density ratio ≥ {r}"),
            CoreCriterion::Share(t) => format!("object share ≥ {t}"),
        }
    }
}

/// The decision rule (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "LabelRuleRepr")]
pub struct LabelRule {
    /// What makes a pair core (object density ratio ≥ 2).
    pub core: CoreCriterion,
    /// Two-sided confidence of the t interval (0.95).
    pub confidence: f64,
}

// Tables written before the density ratio existed hold `core_threshold` (a share).
#[derive(Deserialize)]
struct LabelRuleRepr {
    #[serde(default)]
    core: Option<CoreCriterion>,
    #[serde(default)]
    core_threshold: Option<f64>,
    confidence: f64,
}

impl From<LabelRuleRepr> for LabelRule {
    fn from(r: LabelRuleRepr) -> Self {
        LabelRule {
            core: r
                .core
                .or(r.core_threshold.map(CoreCriterion::Share))
                .unwrap_or(LabelRule::default().core),
            confidence: r.confidence,
        }
    }
}

impl Default for LabelRule {
    fn default() -> Self {
        Self {
            core: CoreCriterion::DensityRatio(2.0),
            confidence: 0.95,
        }
    }
}

impl LabelRule {
    pub fn validate(&self) -> anyhow::Result<()> {
        match self.core {
            CoreCriterion::Share(t) if !(t > 0.0 && t < 1.0) => bail!(
                "the core share threshold must lie strictly between 0 and 1 (a share), got {t}"
            ),
            CoreCriterion::DensityRatio(r) if !(r > 1.0 && r.is_finite()) => bail!(
                "the core density ratio must be a number above 1 (1 is a uniform map), got {r}"
            ),
            _ => {}
        }
        if !(self.confidence > 0.0 && self.confidence < 1.0) {
            bail!(
                "the confidence must lie strictly between 0 and 1 (e.g. 0.95), got {}",
                self.confidence
            )
        }
        Ok(())
    }
}

/// The shares of one pair, summarized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShareSummary {
    /// Per image: the object share, `None` where the feature does not fire.
    pub shares: Vec<Option<f64>>,
    /// Mean share over the images where the feature fires (`None`: it fires on none).
    pub score: Option<f64>,
    /// Half-width of the t interval around `score` (`None` with fewer than 2 such images).
    pub margin: Option<f64>,
    /// Mean mask area (share of the image) over the images where the feature fires.
    #[serde(default)]
    pub area: Option<f64>,
    /// The share `score − margin` must reach to be core (the criterion at `area`).
    #[serde(default)]
    pub share_threshold: Option<f64>,
    pub label: Verdict,
}

impl ShareSummary {
    /// Images where the feature fires.
    pub fn active(&self) -> usize {
        self.shares.iter().flatten().count()
    }
}

/// Summarizes per-image shares (each in `[0, 1]`, or `None` for an image where the feature does
/// not fire) and mask areas (each image's mask mean, in `[0, 1]`) under `rule`.
pub fn summarize(
    shares: &[Option<f64>],
    areas: &[f64],
    rule: &LabelRule,
) -> anyhow::Result<ShareSummary> {
    rule.validate()?;
    if shares.len() != areas.len() {
        bail!(
            "{} object shares but {} mask areas: one of each per image",
            shares.len(),
            areas.len()
        )
    }
    if let Some((i, v)) = shares
        .iter()
        .enumerate()
        .find_map(|(i, s)| s.filter(|v| !(0.0..=1.0).contains(v)).map(|v| (i, v)))
    {
        bail!("image {i}'s object share is {v}; a share lies in [0, 1]")
    }
    if let Some((i, v)) = areas
        .iter()
        .enumerate()
        .find(|(_, a)| !(0.0..=1.0).contains(*a))
    {
        bail!("image {i}'s mask area is {v}; an area lies in [0, 1]")
    }
    let active: Vec<(f64, f64)> = shares
        .iter()
        .zip(areas)
        .filter_map(|(s, a)| s.map(|s| (s, *a)))
        .collect();
    let m = active.len();
    let score = (m > 0).then(|| active.iter().map(|(s, _)| s).sum::<f64>() / m as f64);
    let area = (m > 0).then(|| active.iter().map(|(_, a)| a).sum::<f64>() / m as f64);
    let share_threshold = area.map(|a| rule.core.share_threshold(a));
    let margin = match score {
        Some(mean) if m >= 2 => {
            let var = active.iter().map(|(v, _)| (v - mean).powi(2)).sum::<f64>() / (m - 1) as f64;
            let t = StudentsT::new(0.0, 1.0, (m - 1) as f64)
                .map_err(|e| anyhow::anyhow!("Student's t with {} degrees of freedom: {e}", m - 1))?
                .inverse_cdf((1.0 + rule.confidence) / 2.0);
            Some(t * (var / m as f64).sqrt())
        }
        _ => None,
    };
    let label = match (score, margin, share_threshold) {
        (Some(s), Some(e), Some(t)) if s - e >= t => Verdict::Core,
        (Some(s), Some(e), Some(t)) if s + e < t => Verdict::Spurious,
        _ => Verdict::Uncertain,
    };
    Ok(ShareSummary {
        shares: shares.to_vec(),
        score,
        margin,
        area,
        share_threshold,
        label,
    })
}

/// Per image, the share of `maps` (`[n, H, W]`, >= 0) inside `masks` (`[n, H, W]`, in
/// `[0, 1]`), `None` where the map is zero everywhere; then [`summarize`].
pub fn label_maps(maps: &Tensor, masks: &Tensor, rule: &LabelRule) -> anyhow::Result<ShareSummary> {
    if maps.dims() != masks.dims() || maps.rank() != 3 {
        bail!(
            "labelling: activation maps {:?} and masks {:?} must both be [images, height, width]",
            maps.dims(),
            masks.dims()
        )
    }
    let totals: Vec<f64> = maps.to_dtype(DType::F64)?.sum((1, 2))?.to_vec1()?;
    let areas: Vec<f64> = masks.to_dtype(DType::F64)?.mean((1, 2))?.to_vec1()?;
    let mut shares = Vec::with_capacity(totals.len());
    for (i, total) in totals.iter().enumerate() {
        if *total == 0.0 {
            shares.push(None);
            continue;
        }
        let share = share_inside(&maps.narrow(0, i, 1)?, &masks.narrow(0, i, 1)?)
            .map_err(|e| anyhow::anyhow!("image {i}: {e}"))?[0];
        // Rounding can push a share of a full mask a hair past 1.
        shares.push(Some(share.clamp(0.0, 1.0)));
    }
    // Soft masks can round a hair past [0, 1] too.
    let areas: Vec<f64> = areas.iter().map(|a| a.clamp(0.0, 1.0)).collect();
    summarize(&shares, &areas, rule)
}

/// Segments the class object in images by a text query. CLIPSeg's [`Segmenter`] is one; the
/// ShapesWorld segmenter (the same architecture, trained on the world's masks) will be another
/// `Segmenter`, and exact masks of rendered scenes can implement it too.
pub trait ObjectSegmenter {
    /// Checks, before anything runs, that `query` (which names `class_name`) can be used: the
    /// class name must encode to at least one token and the query must fit the text model.
    fn check_query(&self, class_name: &str, query: &str) -> anyhow::Result<()>;
    /// Masks `[n, H, W]` in `[0, 1]` (f32 or the model's dtype) for images `[n, 3, H, W]` in
    /// `[0, 1]`, the same query for every image.
    fn masks(&self, images: &Tensor, query: &str) -> anyhow::Result<Tensor>;
}

impl ObjectSegmenter for Segmenter {
    fn check_query(&self, class_name: &str, query: &str) -> anyhow::Result<()> {
        let tokenizer = self.tokenizer();
        let ids = tokenizer.encode(class_name)?;
        let text = &ids[1..ids.len() - 1];
        // The tokenizer removes whitespace: nothing may be left of the name.
        if text.is_empty() {
            bail!(
                "class name {class_name:?} encodes to no tokens of CLIPSeg's tokenizer: give a \
                 name in words (--class-name)"
            )
        }
        // `<|endoftext|>` inside the name would end the query there (the text tower pools the
        // first end token), silently segmenting something else.
        if let Some(&id) = text.iter().find(|&&id| tokenizer.is_special(id)) {
            bail!(
                "class name {class_name:?} contains CLIP's special token {:?}, which would cut \
                 the query short: remove it from the name",
                tokenizer.decode_token(id).unwrap_or_default()
            )
        }
        self.tokenize(&[query])?;
        Ok(())
    }

    fn masks(&self, images: &Tensor, query: &str) -> anyhow::Result<Tensor> {
        let n = images.dim(0)?;
        let queries = vec![query; n];
        let images = images.to_device(self.model.text_model.token_embedding.device())?;
        Ok(self.segment(&images, &queries)?.probabilities.detach())
    }
}

/// `template` with `class_name` in its `{}` (which must occur exactly once).
pub fn query_for(template: &str, class_name: &str) -> anyhow::Result<String> {
    let found = template.matches("{}").count();
    if found != 1 {
        bail!(
            "query template {template:?} must contain the class-name placeholder \"{{}}\" \
             exactly once (found {found})"
        )
    }
    if class_name.trim().is_empty() {
        bail!("the class name is empty: the query would not name the object")
    }
    Ok(template.replacen("{}", class_name.trim(), 1))
}

/// A tiny CLIPSeg with random weights from `seed` over CLIP's real vocabulary (32-wide towers,
/// 8-pixel patches, 32x32 input): for trying the labelling commands on the embedded tiny
/// models without files. Its masks mean nothing.
pub fn tiny_random_segmenter(seed: u64) -> anyhow::Result<Segmenter> {
    use crate::models::clipseg::{ClipSegConfig, ClipSegForImageSegmentation, ClipSegProcessor};
    let cfg = ClipSegConfig::from_value(serde_json::json!({
        "text_config": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "max_position_embeddings": 77,
                        "bos_token_id": 0, "eos_token_id": 2},
        "vision_config": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3,
                          "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        "projection_dim": 24, "extract_layers": [0, 1, 2], "reduce_dim": 16,
        "decoder_num_attention_heads": 2, "decoder_intermediate_size": 20,
        "use_complex_transposed_convolution": true
    }))?;
    let vb = crate::weights::RandomWeights::new(seed)
        .into_var_builder(DType::F32, &candle_core::Device::Cpu);
    let model = ClipSegForImageSegmentation::new(vb, &cfg)?;
    let processor = ClipSegProcessor {
        size: (32, 32),
        ..ClipSegProcessor::default()
    };
    Ok(Segmenter::new(
        model,
        processor,
        crate::tokenizer::ClipTokenizer::embedded()?,
    )?)
}
