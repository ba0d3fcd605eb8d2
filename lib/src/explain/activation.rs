//! The activation score: does an optimized prompt make the classifier see its target on noise
//! it was never optimized on?
//!
//! The best soft prompt, and separately the plain-text prompt its nearest tokens spell
//! ([`super::tokens::TextualExplanation::prompt`]), are each sampled from `n` fresh seeds (one
//! image per seed: its initial latent noise and per-step noises drawn from
//! [`activation_seed`]`(seed, j)`, a stream that never reuses the optimization's noise); the
//! score is the share of images whose top-1 class is the target, with a Wilson score interval
//! (E. B. Wilson, "Probable inference, the law of succession, and statistical inference",
//! *JASA* 22(158):209-212, 1927), which stays inside [0, 1] and is sound at shares near 0 or 1
//! and small `n`, where the normal approximation is not.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::pipeline::{derive_seed, DiffusionPipeline};
use super::soft_prompt::encode_vectors;
use crate::rng::SeededRng;

/// The normal quantile of a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// Images sampled per prompt when none is asked for: 100 on a GPU, 16 on a CPU (where each
/// image of a real model takes seconds).
pub fn default_samples(device: &Device) -> usize {
    if device.is_cpu() {
        16
    } else {
        100
    }
}

/// The seed of the `j`-th activation-score image of a run seeded `seed`.
pub fn activation_seed(seed: u64, j: usize) -> u64 {
    derive_seed(seed, 0x6163_7469_7661_7465, j as u64) // "activate"
}

/// Wilson's score interval `(low, high)` for `hits` successes in `n` trials at normal quantile
/// `z` (1.96 for 95%). `n = 0` gives the uninformative `(0, 1)`.
pub fn wilson_interval(hits: usize, n: usize, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let p = hits as f64 / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = z / denom * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// The score of one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivationScore {
    /// What was sampled: `soft prompt` or the plain text.
    pub prompt: String,
    /// Images generated (one per seed).
    pub samples: usize,
    /// Images whose top-1 class is the target.
    pub hits: usize,
    /// `hits / samples`.
    pub share: f64,
    /// Wilson score interval at `confidence`.
    pub ci_low: f64,
    pub ci_high: f64,
    pub confidence: f64,
    /// Each image's noise seed ([`activation_seed`]), in order.
    pub seeds: Vec<u64>,
}

impl std::fmt::Display for ActivationScore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} = {:.1}% (95% CI {:.1}-{:.1}%)",
            self.hits,
            self.samples,
            100.0 * self.share,
            100.0 * self.ci_low,
            100.0 * self.ci_high
        )
    }
}

/// The scores of the soft prompt and of its nearest-token text, for one target class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivationScores {
    pub class: usize,
    pub soft: ActivationScore,
    pub text: ActivationScore,
}

impl std::fmt::Display for ActivationScores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "activation score (class {}, fresh seeds):", self.class)?;
        writeln!(f, "  soft prompt: {}", self.soft)?;
        writeln!(f, "  text {:?}: {}", self.text.prompt, self.text)
    }
}

/// Images per sampling call (bounds memory; the result does not depend on it).
const CHUNK: usize = 8;

/// Samples `n` images of the conditioning `cond` (`[1, 77, d]`) from fresh seeds and counts
/// those classified as `class`. Nothing is differentiated.
pub fn score_conditioning(
    pipeline: &DiffusionPipeline,
    cond: &Tensor,
    label: &str,
    class: usize,
    n: usize,
    seed: u64,
) -> anyhow::Result<ActivationScore> {
    if n == 0 {
        anyhow::bail!("the activation score needs at least one sample")
    }
    let b = pipeline.bundle();
    b.classifier.check_class(class)?;
    let cond = cond.detach();
    let shape = b.latent_shape(1);
    let seeds: Vec<u64> = (0..n).map(|j| activation_seed(seed, j)).collect();
    let mut hits = 0;
    for chunk in seeds.chunks(CHUNK) {
        let mut initial = Vec::with_capacity(chunk.len());
        let mut steps: Vec<Vec<Tensor>> = vec![Vec::new(); b.spec.steps];
        for &s in chunk {
            let mut rng = SeededRng::new(s);
            initial.push(rng.normal(shape, b.dtype, &b.device)?);
            for step in steps.iter_mut() {
                step.push(rng.normal(shape, b.dtype, &b.device)?);
            }
        }
        let initial = Tensor::cat(&initial, 0)?;
        let steps = steps
            .iter()
            .map(|s| Tensor::cat(s, 0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let images = pipeline.sample_images(&cond, &initial, steps)?.detach();
        let predicted: Vec<u32> = pipeline.classify(&images)?.logits.argmax(1)?.to_vec1()?;
        hits += predicted.iter().filter(|&&c| c as usize == class).count();
    }
    let (ci_low, ci_high) = wilson_interval(hits, n, Z95);
    Ok(ActivationScore {
        prompt: label.to_string(),
        samples: n,
        hits,
        share: hits as f64 / n as f64,
        ci_low,
        ci_high,
        confidence: 0.95,
        seeds,
    })
}

/// Scores the soft prompt (`vectors` `[k, d]` in `template`) and the plain `text` prompt.
pub fn activation_scores(
    pipeline: &DiffusionPipeline,
    template: &str,
    vectors: &Tensor,
    text: &str,
    class: usize,
    n: usize,
    seed: u64,
) -> anyhow::Result<ActivationScores> {
    let b = pipeline.bundle();
    let soft = encode_vectors(template, &vectors.detach(), &b.tokenizer, &b.text_encoder)?
        .last_hidden_state
        .to_dtype(b.dtype)?;
    let max_len = b.text_encoder.config().max_position_embeddings;
    let ids = b.tokenizer.encode_padded(text, max_len)?;
    let ids = Tensor::from_vec(ids, (1, max_len), &b.device)?;
    let plain = b
        .text_encoder
        .forward(&ids)?
        .last_hidden_state
        .to_dtype(b.dtype)?;
    Ok(ActivationScores {
        class,
        soft: score_conditioning(pipeline, &soft, "soft prompt", class, n, seed)?,
        text: score_conditioning(pipeline, &plain, text, class, n, seed)?,
    })
}
