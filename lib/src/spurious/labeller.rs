//! The labelling run: for each of a class's features, the explainer generates images that
//! maximize it, the class object is segmented with a text query, and the share of the
//! feature's activation on the object labels it ([`super::labelling`] states the rule).
//!
//! Everything that can be checked is checked before the first image is generated: the rule,
//! the class id and feature indices against the classifier (a ResNet), duplicate features, the
//! query template, a class name that encodes to no tokens, a query too long for the
//! segmenter's text model, the soft prompt's template.

use anyhow::Context;
use candle_core::{DType, Device};

use super::feature_maps::feature_map;
use super::labelling::{label_maps, query_for, LabelRule, ObjectSegmenter};
use super::predictive::feature_count;
use super::table::{ClassTable, Evidence, LabelRow};
use crate::explain::{
    nearest_tokens, optimize, CancelToken, DiffusionPipeline, Objective, OptimizeConfig,
    SoftPromptInit,
};

/// The class whose features are labelled: its classifier index and a name the query uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassTarget {
    pub index: usize,
    pub name: String,
}

/// How each feature's images are generated and judged. The number of images is the
/// pipeline's batch ([`crate::explain::PipelineOptions::batch`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LabelConfig {
    /// The soft prompt's template (`{}` marks the soft tokens).
    pub template: String,
    /// Soft tokens.
    pub tokens: usize,
    pub init: SoftPromptInit,
    pub optimize: OptimizeConfig,
    /// Also maximize the class logit with this weight (`None`: the feature alone).
    pub class_weight: Option<f64>,
    /// The segmentation query; `{}` is replaced by the class name.
    pub query_template: String,
    pub rule: LabelRule,
    /// Nearest tokens kept per soft vector.
    pub nearest_top: usize,
}

/// The default query template, CLIPSeg's usual phrasing.
pub const DEFAULT_QUERY_TEMPLATE: &str = "a photo of a {}";

impl Default for LabelConfig {
    fn default() -> Self {
        Self {
            template: "A texture of {}".to_string(),
            tokens: 1,
            init: SoftPromptInit::Random { seed: 0 },
            optimize: OptimizeConfig {
                iterations: 30,
                ..OptimizeConfig::default()
            },
            class_weight: None,
            query_template: DEFAULT_QUERY_TEMPLATE.to_string(),
            rule: LabelRule::default(),
            nearest_top: 5,
        }
    }
}

/// Checks a labelling job against the models without running anything; returns the query.
pub fn check_job(
    pipeline: &DiffusionPipeline,
    segmenter: &dyn ObjectSegmenter,
    class: &ClassTarget,
    features: &[usize],
    config: &LabelConfig,
) -> anyhow::Result<String> {
    config.rule.validate()?;
    let classifier = &pipeline.bundle().classifier;
    let width = feature_count(classifier)?;
    classifier.check_class(class.index)?;
    if features.is_empty() {
        anyhow::bail!("class {}: no features to label", class.index)
    }
    for (k, &f) in features.iter().enumerate() {
        if f >= width {
            anyhow::bail!(
                "class {}: feature {f} is out of range: the classifier has {width} penultimate \
                 features (0..={})",
                class.index,
                width - 1
            )
        }
        if features[..k].contains(&f) {
            anyhow::bail!("class {}: feature {f} is listed twice", class.index)
        }
    }
    if config.nearest_top == 0 {
        anyhow::bail!("nearest tokens per vector must be at least 1")
    }
    if config.optimize.iterations == 0 {
        anyhow::bail!("the explainer needs at least one iteration per feature")
    }
    let query = query_for(&config.query_template, &class.name)?;
    segmenter
        .check_query(&class.name, &query)
        .map_err(|e| anyhow::anyhow!("class {} ({:?}): {e:#}", class.index, class.name))?;
    // The soft prompt's template (the prompt itself is rebuilt per feature).
    pipeline.new_prompt(&config.template, config.tokens, &config.init)?;
    Ok(query)
}

/// Labels `features` of `class` (in the order given: rank 1 first). `on_feature` sees each row
/// as it is done (for progress). The table keeps every image, mask and activation map.
pub fn label_class(
    pipeline: &DiffusionPipeline,
    segmenter: &dyn ObjectSegmenter,
    class: &ClassTarget,
    features: &[usize],
    config: &LabelConfig,
    cancel: &CancelToken,
    mut on_feature: impl FnMut(&LabelRow),
) -> anyhow::Result<ClassTable> {
    let query = check_job(pipeline, segmenter, class, features, config)?;
    let bundle = pipeline.bundle();
    let mut rows = Vec::with_capacity(features.len());
    let mut evidence = Vec::with_capacity(features.len());
    for (k, &feature) in features.iter().enumerate() {
        let mut objective = Objective::neuron(feature);
        if let Some(w) = config.class_weight {
            objective = objective + w * Objective::logit(class.index);
        }
        let mut prompt = pipeline.new_prompt(&config.template, config.tokens, &config.init)?;
        let result = optimize(
            pipeline,
            &mut prompt,
            &objective,
            config.class_weight.map(|_| class.index),
            &config.optimize,
            cancel,
            |_, _| Ok(()),
        )
        .with_context(|| format!("class {}, feature {feature}", class.index))?;
        if result.stop == crate::explain::StopReason::Cancelled {
            anyhow::bail!(
                "cancelled while labelling feature {feature} (rank {} of class {})",
                k + 1,
                class.index
            )
        }
        let images = result.best_images.detach();
        let (_, _, h, w) = images.dims4()?;
        let output = pipeline.classify(&images)?;
        let maps = feature_map(&output, feature, (h, w))?
            .detach()
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        // Rounding can leave a ReLU output's bilinear upsampling a hair below zero.
        let maps = maps.clamp(0f32, f32::MAX)?;
        let images = images.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let masks = segmenter
            .masks(&images, &query)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .clamp(0f32, 1f32)?;
        let summary = label_maps(&maps, &masks, &config.rule)
            .map_err(|e| anyhow::anyhow!("class {}, feature {feature}: {e:#}", class.index))?;
        let explanation = nearest_tokens(
            &config.template,
            &result.best_vectors,
            &bundle.text_encoder,
            &bundle.tokenizer,
            config.nearest_top,
        )?;
        let nearest = explanation
            .nearest
            .iter()
            .enumerate()
            .map(|(j, near)| {
                let list: Vec<String> = near
                    .iter()
                    .map(|t| format!("{} ({:.2})", t.text, t.cosine))
                    .collect();
                format!("v{j}: {}", list.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ");
        let row = LabelRow {
            class_index: class.index,
            class_name: class.name.clone(),
            feature,
            rank: k + 1,
            label: summary.label,
            score: summary.score,
            margin: summary.margin,
            share_threshold: summary.share_threshold,
            images: summary.shares.len(),
            active_images: summary.active(),
            shares: summary.shares,
            objective: result.best_objective,
            prompt: explanation.prompt,
            nearest_tokens: nearest,
        };
        on_feature(&row);
        rows.push(row);
        evidence.push(Some(Evidence {
            images,
            masks,
            maps,
        }));
    }
    Ok(ClassTable {
        class_index: class.index,
        class_name: class.name.clone(),
        query,
        rule: config.rule,
        rows,
        evidence,
    })
}
