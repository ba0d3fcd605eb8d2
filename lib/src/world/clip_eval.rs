//! What the world's CLIP ([`super::clip`]) reads from held-out images: zero-shot attribute
//! classification by caption prompts, text-to-image retrieval per attribute, and whole
//! (shape, colour, background) combinations, on images of held-out and of seen combinations.
//!
//! Prompts: for each value of an attribute, every distinct caption the spec's templates give
//! that names the attribute with that value (over all values of the other attributes); their
//! normalized text embeddings are averaged (CLIP's prompt ensembles, Radford et al. 2021).

use std::collections::{BTreeSet, HashMap};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::classifier::Accuracy;
use super::clip::{all_captions, l2_normalize, normalize_pixels, text_embeds, tokenize_batch};
use super::heldout;
use super::render;
use super::spec::WorldSpec;
use super::splits::Sample;
use crate::models::clip_text::ClipTextModel;
use crate::models::clip_vision::ClipVisionModelWithProjection;
use crate::ops::Linear;
use crate::tokenizer::ClipTokenizer;

/// One attribute's zero-shot reading.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttributeScores {
    pub attribute: String,
    /// Zero-shot classification of every measured image by caption prompts.
    pub accuracy: Accuracy,
    /// The same on the measured images whose combination is held out of training.
    pub heldout_accuracy: Accuracy,
    /// Text-to-image retrieval: per value, the share of the `R` images ranked highest for the
    /// value's prompts that show it (`R` = the images that show it), averaged over values.
    pub r_precision: f64,
    /// Distinct prompts per value (their normalized embeddings are averaged, as CLIP's prompt
    /// ensembles).
    pub prompts_per_value: Vec<(String, usize)>,
}

/// What the towers read from held-out images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClipScores {
    pub step: usize,
    pub images: usize,
    pub heldout_images: usize,
    pub attributes: Vec<AttributeScores>,
    /// Zero-shot classification of the whole (shape, colour, background) combination among all
    /// of them, with the first template naming all three: on images of held-out combinations
    /// (never seen in training) and on the others.
    pub combination_template: Option<String>,
    pub combination_accuracy_heldout: Option<Accuracy>,
    pub combination_accuracy_seen: Option<Accuracy>,
}

/// The placeholders of a template that name an attribute.
fn mentions(template: &str, attribute: &str) -> bool {
    match attribute {
        "background" => template.contains("{background}") || template.contains("{background_noun}"),
        a => template.contains(&format!("{{{a}}}")),
    }
}

fn value_of<'a>(scene: &'a render::Scene, attribute: &str) -> &'a str {
    match attribute {
        "shape" => &scene.shape,
        "color" => &scene.color,
        "texture" => &scene.texture,
        "background" => &scene.background,
        other => panic!("no attribute {other}"),
    }
}

/// Text embeddings of distinct captions, normalized, in batches.
fn embed_captions(
    tokenizer: &ClipTokenizer,
    text: &ClipTextModel,
    projection: &Linear,
    captions: &[String],
) -> anyhow::Result<HashMap<String, Vec<f32>>> {
    let mut out = HashMap::new();
    let max_len = text.config().max_position_embeddings;
    for chunk in captions.chunks(256) {
        let ids = tokenize_batch(tokenizer, chunk, max_len)?;
        let e = l2_normalize(&text_embeds(text, projection, &ids)?)?.detach();
        for (c, row) in chunk.iter().zip(e.to_vec2::<f32>()?) {
            out.insert(c.clone(), row);
        }
    }
    Ok(out)
}

fn unit(v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.into_iter().map(|x| x / n).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Measures zero-shot attribute classification, retrieval and combinations (see
/// [`ClipScores`]) of `images` `[n, 3, s, s]` in `[0, 1]` with their `samples`.
#[allow(clippy::too_many_arguments)]
pub fn measure(
    spec: &WorldSpec,
    tokenizer: &ClipTokenizer,
    text: &ClipTextModel,
    text_projection: &Linear,
    vision: &ClipVisionModelWithProjection,
    images: &Tensor,
    samples: &[Sample],
    step: usize,
) -> anyhow::Result<ClipScores> {
    let n = samples.len();
    let mut image_rows = Vec::with_capacity(n);
    for start in (0..n).step_by(128) {
        let x = images.narrow(0, start, 128.min(n - start))?;
        let e = l2_normalize(&vision.forward(&normalize_pixels(&x)?)?)?.detach();
        image_rows.extend(e.to_vec2::<f32>()?);
    }
    let heldout: Vec<bool> = samples
        .iter()
        .map(|s| heldout::scene_is_heldout(spec, &s.scene))
        .collect();
    let all = all_captions(spec);
    let distinct: Vec<String> = all
        .iter()
        .map(|(c, _, _)| c.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let emb = embed_captions(tokenizer, text, text_projection, &distinct)?;
    let mut attributes = Vec::new();
    for attribute in ["shape", "color", "texture", "background"] {
        let values: Vec<String> = if attribute == "shape" {
            spec.classes.clone()
        } else {
            spec.values(attribute).expect("a known attribute").to_vec()
        };
        // Each value's prompts: the captions of templates naming the attribute.
        let mut prompts_per_value = Vec::new();
        let mut centroids = Vec::new();
        for v in &values {
            let prompts: BTreeSet<&String> = all
                .iter()
                .filter(|(_, scene, t)| {
                    mentions(&spec.captions.templates[*t], attribute)
                        && value_of(scene, attribute) == v
                })
                .map(|(c, _, _)| c)
                .collect();
            if prompts.is_empty() {
                anyhow::bail!(
                    "the spec's caption templates never name the {attribute}: no zero-shot prompt"
                )
            }
            let mut mean = vec![0f32; image_rows[0].len()];
            for p in &prompts {
                for (m, x) in mean.iter_mut().zip(&emb[*p]) {
                    *m += x;
                }
            }
            centroids.push(unit(mean));
            prompts_per_value.push((v.clone(), prompts.len()));
        }
        let truth: Vec<usize> = samples
            .iter()
            .map(|s| {
                values
                    .iter()
                    .position(|v| v == value_of(&s.scene, attribute))
                    .expect("a value of the spec")
            })
            .collect();
        let sims: Vec<Vec<f32>> = image_rows
            .iter()
            .map(|r| centroids.iter().map(|c| dot(r, c)).collect())
            .collect();
        let (mut accuracy, mut heldout_accuracy) = (Accuracy::default(), Accuracy::default());
        for i in 0..n {
            let pred = (0..values.len())
                .max_by(|&a, &b| sims[i][a].total_cmp(&sims[i][b]))
                .expect("values");
            let ok = pred == truth[i];
            accuracy.correct += ok as usize;
            accuracy.total += 1;
            if heldout[i] {
                heldout_accuracy.correct += ok as usize;
                heldout_accuracy.total += 1;
            }
        }
        let mut r_sum = 0.0;
        let mut r_count = 0;
        for (v, _) in values.iter().enumerate() {
            let r = truth.iter().filter(|&&t| t == v).count();
            if r == 0 {
                continue;
            }
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| sims[b][v].total_cmp(&sims[a][v]));
            let hits = order[..r].iter().filter(|&&i| truth[i] == v).count();
            r_sum += hits as f64 / r as f64;
            r_count += 1;
        }
        attributes.push(AttributeScores {
            attribute: attribute.to_string(),
            accuracy,
            heldout_accuracy,
            r_precision: r_sum / r_count.max(1) as f64,
            prompts_per_value,
        });
    }
    // Whole combinations, with the first template naming shape, colour and background.
    let combo_template = spec.captions.templates.iter().find(|t| {
        ["shape", "color", "background"]
            .iter()
            .all(|a| mentions(t, a))
    });
    let (mut combo_heldout, mut combo_seen) = (Accuracy::default(), Accuracy::default());
    if let Some(template) = combo_template {
        let t = spec
            .captions
            .templates
            .iter()
            .position(|x| x == template)
            .expect("found above");
        // One caption per (shape, colour, background): the template at its plain texture when
        // it names texture.
        let mut combos: Vec<(heldout::Combination, String)> = all
            .iter()
            .filter(|(_, scene, tt)| *tt == t && scene.texture == all[0].1.texture)
            .map(|(c, scene, _)| (heldout::Combination::of(scene), c.clone()))
            .collect();
        combos.sort();
        combos.dedup();
        for i in 0..n {
            let best = combos
                .iter()
                .max_by(|a, b| {
                    dot(&image_rows[i], &emb[&a.1]).total_cmp(&dot(&image_rows[i], &emb[&b.1]))
                })
                .expect("combinations");
            let ok = best.0 == heldout::Combination::of(&samples[i].scene);
            let acc = if heldout[i] {
                &mut combo_heldout
            } else {
                &mut combo_seen
            };
            acc.correct += ok as usize;
            acc.total += 1;
        }
    }
    Ok(ClipScores {
        step,
        images: n,
        heldout_images: heldout.iter().filter(|&&h| h).count(),
        attributes,
        combination_template: combo_template.cloned(),
        combination_accuracy_heldout: combo_template.map(|_| combo_heldout),
        combination_accuracy_seen: combo_template.map(|_| combo_seen),
    })
}

/// One line per measurement: step and per-attribute zero-shot accuracy.
pub fn scores_line(s: &ClipScores) -> String {
    let parts: Vec<String> = s
        .attributes
        .iter()
        .map(|a| {
            format!(
                "{} {:.1}% (held-out {:.1}%, R-prec {:.2})",
                a.attribute,
                100.0 * a.accuracy.value(),
                100.0 * a.heldout_accuracy.value(),
                a.r_precision
            )
        })
        .collect();
    let combo = match (
        &s.combination_accuracy_heldout,
        &s.combination_accuracy_seen,
    ) {
        (Some(h), Some(seen)) => format!(
            "; combination {:.1}% held-out, {:.1}% seen",
            100.0 * h.value(),
            100.0 * seen.value()
        ),
        _ => String::new(),
    };
    format!(
        "step {:5}  zero-shot ({} images): {}{combo}",
        s.step,
        s.images,
        parts.join(", ")
    )
}
