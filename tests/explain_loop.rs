//! The optimization loop on a small stand-in pipeline (tiny CLIP → a fixed random linear
//! "generator" → tiny ViT): the objective improves, cancellation keeps the result so far,
//! early stopping and non-finite values behave as documented.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{random_model, tiny_clip};
use diffexplainer::explain::optimize::EarlyStop;
use diffexplainer::explain::{
    optimize, CancelToken, Objective, OptimizeConfig, Pipeline, SoftPrompt, SoftPromptInit,
    StopReason,
};
use diffexplainer::models::classifiers::vit::VitConfig;
use diffexplainer::models::classifiers::{Classifier, ClassifierConfig, ClassifierOutput};
use diffexplainer::models::clip_text::ClipTextModel;
use diffexplainer::testing::pseudo_random_tensor;
use diffexplainer::tokenizer::ClipTokenizer;

struct Toy {
    tokenizer: ClipTokenizer,
    clip: ClipTextModel,
    /// `[16, 3·24·24]`: pooled conditioning → image logits.
    generator: Tensor,
    classifier: Classifier,
    poison: bool,
}

impl Toy {
    fn new() -> Self {
        // A ViT: smooth (GELU) everywhere, so a random one has no dead units.
        let cfg = ClassifierConfig::Vit(VitConfig {
            image_size: 24,
            patch_size: 8,
            num_layers: 1,
            num_heads: 2,
            hidden_dim: 16,
            mlp_dim: 24,
            num_classes: 5,
        });
        Self {
            tokenizer: ClipTokenizer::embedded().unwrap(),
            clip: tiny_clip(),
            generator: pseudo_random_tensor(&[16, 3 * 24 * 24], 1.0, 42, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
            classifier: random_model(|vb| Classifier::new(vb, &cfg), 0.3),
            poison: false,
        }
    }
}

impl Pipeline for Toy {
    fn run(&self, prompt: &SoftPrompt) -> anyhow::Result<(Tensor, ClassifierOutput)> {
        // The end-of-text state sees the soft prompt through causal attention.
        let pooled = prompt.encode(&self.tokenizer, &self.clip)?.pooled; // [1, 16]
        let mut image =
            candle_nn::ops::sigmoid(&pooled.matmul(&self.generator)?)?.reshape((1, 3, 24, 24))?;
        if self.poison {
            image = (image * f64::NAN)?;
        }
        let output = self.classifier.forward(&image)?;
        Ok((image, output))
    }
}

fn prompt(toy: &Toy) -> SoftPrompt {
    SoftPrompt::new(
        "A texture of {}",
        1,
        &SoftPromptInit::Random { seed: 7 },
        &toy.tokenizer,
        &toy.clip,
    )
    .unwrap()
}

#[test]
fn the_objective_improves_and_the_run_is_deterministic() {
    let toy = Toy::new();
    let config = OptimizeConfig {
        iterations: 12,
        ..OptimizeConfig::default()
    };
    let run = |toy: &Toy| {
        let mut p = prompt(toy);
        optimize(
            toy,
            &mut p,
            &Objective::logit(3),
            Some(3),
            &config,
            &CancelToken::new(),
            |_, _| Ok(()),
        )
        .unwrap()
    };
    let a = run(&toy);
    assert_eq!(a.stop, StopReason::Finished);
    assert_eq!(a.metrics.len(), 12);
    // The stand-in is weakly sensitive to one prompt vector, so the gains are small; what must
    // hold is that AdamW climbs: nearly every step improves and the end beats the start.
    let values: Vec<f64> = a.metrics.iter().map(|m| m.objective).collect();
    let climbs = values.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(
        climbs >= 10 && values[11] > values[0],
        "objective did not climb: {values:?}"
    );
    assert_eq!(a.best_iteration, 11);
    assert!(a.metrics[0].target_probability.unwrap() > 0.0 && a.metrics[0].top5.len() == 5);
    let b = run(&toy);
    let objectives = |r: &diffexplainer::explain::Optimized| {
        r.metrics.iter().map(|m| m.objective).collect::<Vec<_>>()
    };
    assert_eq!(objectives(&a), objectives(&b), "same seed, same run");
}

#[test]
fn cancelling_returns_everything_computed_so_far() {
    let toy = Toy::new();
    let cancel = CancelToken::new();
    let mut p = prompt(&toy);
    let config = OptimizeConfig {
        iterations: 50,
        ..OptimizeConfig::default()
    };
    let run = optimize(
        &toy,
        &mut p,
        &Objective::logit(1),
        Some(1),
        &config,
        &cancel,
        |m, _| {
            if m.iteration == 3 {
                cancel.cancel();
            }
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(run.stop, StopReason::Cancelled);
    assert_eq!(run.metrics.len(), 4);
    assert!(run.best_iteration <= 3);
    let best = run
        .metrics
        .iter()
        .map(|m| m.objective)
        .fold(f64::MIN, f64::max);
    assert_eq!(run.best_objective, best);
    assert_eq!(run.best_images.dims(), &[1, 3, 24, 24]);
}

#[test]
fn early_stop_when_the_target_is_predicted_k_times_in_a_row() {
    let toy = Toy::new();
    let mut p = prompt(&toy);
    // Whatever class the first image gets, ask to stop once it is predicted twice in a row.
    let first = toy
        .run(&p)
        .unwrap()
        .1
        .logits
        .argmax(1)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()[0] as usize;
    let config = OptimizeConfig {
        iterations: 40,
        lr: 1e-6,
        early_stop: Some(EarlyStop {
            class: first,
            consecutive: 2,
        }),
        ..OptimizeConfig::default()
    };
    let run = optimize(
        &toy,
        &mut p,
        &Objective::logit(first),
        Some(first),
        &config,
        &CancelToken::new(),
        |_, _| Ok(()),
    )
    .unwrap();
    assert_eq!(run.stop, StopReason::EarlyStop);
    assert_eq!(run.metrics.len(), 2);
}

#[test]
fn non_finite_values_are_an_error_not_a_silent_run() {
    let mut toy = Toy::new();
    toy.poison = true;
    let mut p = prompt(&toy);
    let err = optimize(
        &toy,
        &mut p,
        &Objective::logit(0),
        Some(0),
        &OptimizeConfig::default(),
        &CancelToken::new(),
        |_, _| Ok(()),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("not finite") && err.contains("back-offs"),
        "{err}"
    );
}

#[test]
fn a_bad_class_id_fails_before_optimizing() {
    let toy = Toy::new();
    let mut p = prompt(&toy);
    let err = optimize(
        &toy,
        &mut p,
        &Objective::logit(9),
        Some(9),
        &OptimizeConfig::default(),
        &CancelToken::new(),
        |_, _| Ok(()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("class id 9") && err.contains("0..=4"), "{err}");
}
