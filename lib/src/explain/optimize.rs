//! The optimization loop: AdamW on the soft prompt to maximize an objective of the classifier's
//! response to the generated images.
//!
//! Each iteration: soft prompt → pipeline (text encoder → sampler over the UNet → VAE decoder →
//! resize/normalize → classifier) → objective → backward to the soft vectors → clip → AdamW.
//! Metrics of every iteration go to the callback; a [`CancelToken`] checked once per iteration
//! stops the loop early with everything computed so far (the best prompt included).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use super::objective::Objective;
use super::soft_prompt::SoftPrompt;
use crate::models::classifiers::ClassifierOutput;

/// Anything that turns a soft prompt into images and the classifier's response to them,
/// differentiably. The real pipeline composes the diffusion model and the classifier; tests use
/// small stand-ins.
pub trait Pipeline {
    /// Images `[b, 3, h, w]` in [0, 1] and the classifier's output on them.
    fn run(&self, prompt: &SoftPrompt) -> anyhow::Result<(Tensor, ClassifierOutput)>;

    /// [`Self::run`] at optimization iteration `iteration` (a pipeline that redraws its noise
    /// per iteration uses it; the default ignores it).
    fn run_at(
        &self,
        prompt: &SoftPrompt,
        _iteration: usize,
    ) -> anyhow::Result<(Tensor, ClassifierOutput)> {
        self.run(prompt)
    }
}

/// Settings of the loop. Defaults follow the authors' code: AdamW, lr 0.1, eps 1e-4.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimizeConfig {
    pub iterations: usize,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the soft prompt's gradient to this L2 norm (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Stop once every image is classified as `class` this many iterations in a row.
    pub early_stop: Option<EarlyStop>,
    /// How often a non-finite loss or gradient may halve the learning rate (restoring the last
    /// finite prompt) before the run fails.
    pub max_lr_backoffs: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EarlyStop {
    pub class: usize,
    pub consecutive: usize,
}

impl Default for OptimizeConfig {
    fn default() -> Self {
        Self {
            iterations: 100,
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-4,
            weight_decay: 0.01,
            max_grad_norm: None,
            early_stop: None,
            max_lr_backoffs: 3,
        }
    }
}

/// What one iteration measured (before its update).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct IterationMetrics {
    pub iteration: usize,
    /// The minimized loss, `-objective`.
    pub loss: f64,
    pub objective: f64,
    /// Each objective term's unweighted value, named like the term (`logit[207]`).
    pub terms: Vec<(String, f64)>,
    /// Batch-mean logit and probability of the target class, where the run has one.
    pub target_logit: Option<f64>,
    pub target_probability: Option<f64>,
    /// Top-5 (class, probability) of the first image.
    pub top5: Vec<(usize, f64)>,
    pub grad_norm: f64,
    pub lr: f64,
    pub seconds: f64,
}

/// Shared flag a notebook interrupt, a signal handler or another thread sets to stop the loop
/// at its next iteration.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    /// Set by [`Self::cancel`], or by the notebook's interrupt button when running in our
    /// Jupyter kernel ([`crate::display::interrupted`]).
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst) || crate::display::interrupted()
    }
}

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum StopReason {
    Finished,
    EarlyStop,
    Cancelled,
}

/// The result: the final and the best prompt vectors, their images, every iteration's metrics.
#[derive(Debug)]
pub struct Optimized {
    pub metrics: Vec<IterationMetrics>,
    pub stop: StopReason,
    /// Highest objective seen and the prompt vectors and images that reached it.
    pub best_objective: f64,
    pub best_iteration: usize,
    pub best_vectors: Tensor,
    pub best_images: Tensor,
    /// Images of the last evaluated iteration.
    pub last_images: Tensor,
}

/// Runs the loop. `on_iteration` sees each iteration's metrics and images (for progress
/// displays and run records); returning an error aborts the run.
pub fn optimize(
    pipeline: &dyn Pipeline,
    prompt: &mut SoftPrompt,
    objective: &Objective,
    target_class: Option<usize>,
    config: &OptimizeConfig,
    cancel: &CancelToken,
    mut on_iteration: impl FnMut(&IterationMetrics, &Tensor) -> anyhow::Result<()>,
) -> anyhow::Result<Optimized> {
    let params = |lr| ParamsAdamW {
        lr,
        beta1: config.beta1,
        beta2: config.beta2,
        eps: config.eps,
        weight_decay: config.weight_decay,
    };
    let mut lr = config.lr;
    let mut optimizer = AdamW::new(vec![prompt.vectors().clone()], params(lr))?;
    let mut metrics = Vec::with_capacity(config.iterations);
    let mut best: Option<(f64, usize, Tensor, Tensor)> = None;
    let mut last_images = None;
    let mut last_finite = prompt.vectors().as_tensor().copy()?;
    let (mut backoffs, mut streak) = (0, 0);
    let mut stop = StopReason::Finished;
    let start = Instant::now();

    let mut iteration = 0;
    while iteration < config.iterations {
        if cancel.is_cancelled() {
            stop = StopReason::Cancelled;
            break;
        }
        let (images, output) = pipeline.run_at(prompt, iteration)?;
        if iteration == 0 {
            objective.validate(&output)?;
        }
        let (value, term_values) = objective.evaluate(&output)?;
        let loss = value.neg()?;
        let objective_value = value.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let mut grads = loss.backward()?;
        let grad = grads
            .remove(prompt.vectors().as_tensor())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "the objective does not depend on the soft prompt: no gradient reached it"
                )
            })?
            .to_dtype(DType::F32)?;
        let grad_norm = grad.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;

        if !objective_value.is_finite() || !grad_norm.is_finite() {
            if backoffs == config.max_lr_backoffs {
                anyhow::bail!(
                    "iteration {iteration}: the loss or its gradient is not finite (objective {objective_value}, \
                     gradient norm {grad_norm}) after {backoffs} learning-rate back-offs (lr now {lr})"
                )
            }
            backoffs += 1;
            lr /= 2.0;
            prompt.vectors().set(&last_finite)?;
            optimizer = AdamW::new(vec![prompt.vectors().clone()], params(lr))?;
            continue;
        }
        last_finite = prompt.vectors().as_tensor().copy()?;

        let m = iteration_metrics(
            iteration,
            objective,
            objective_value,
            &term_values,
            &output,
            target_class,
            grad_norm,
            lr,
            start,
        )?;
        on_iteration(&m, &images)?;
        if best.as_ref().is_none_or(|(b, ..)| objective_value > *b) {
            best = Some((
                objective_value,
                iteration,
                last_finite.clone(),
                images.detach(),
            ));
        }
        last_images = Some(images.detach());

        let predicted_all = match config.early_stop {
            Some(es) => output
                .logits
                .argmax(1)?
                .to_vec1::<u32>()?
                .iter()
                .all(|&c| c as usize == es.class),
            None => false,
        };
        metrics.push(m);
        streak = if predicted_all { streak + 1 } else { 0 };
        if let Some(es) = config.early_stop {
            if streak >= es.consecutive {
                stop = StopReason::EarlyStop;
                break;
            }
        }

        let grad = match config.max_grad_norm {
            Some(max) if grad_norm > max => (grad * (max / grad_norm))?,
            _ => grad,
        };
        grads.insert(prompt.vectors().as_tensor(), grad);
        optimizer.step(&grads)?;
        iteration += 1;
    }

    let (best_objective, best_iteration, best_vectors, best_images) = match best {
        Some(b) => b,
        None => {
            anyhow::bail!("the run ended before its first iteration (cancelled before it started)")
        }
    };
    Ok(Optimized {
        metrics,
        stop,
        best_objective,
        best_iteration,
        best_vectors,
        best_images,
        last_images: last_images.expect("set with best"),
    })
}

#[allow(clippy::too_many_arguments)]
fn iteration_metrics(
    iteration: usize,
    objective: &Objective,
    objective_value: f64,
    term_values: &[Tensor],
    output: &ClassifierOutput,
    target_class: Option<usize>,
    grad_norm: f64,
    lr: f64,
    start: Instant,
) -> anyhow::Result<IterationMetrics> {
    let scalar =
        |t: &Tensor| -> anyhow::Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let terms = objective
        .terms
        .iter()
        .zip(term_values)
        .map(|((_, term), v)| Ok((term.to_string(), scalar(v)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let logits = output.logits.to_dtype(DType::F64)?.detach();
    let probs = crate::ops::softmax_last_dim(&logits)?;
    let (target_logit, target_probability) = match target_class {
        Some(c) => (
            Some(scalar(&output.logit(c)?.mean_all()?)?),
            Some(scalar(&probs.narrow(1, c, 1)?.mean_all()?)?),
        ),
        None => (None, None),
    };
    let first: Vec<f64> = probs.get(0)?.to_vec1()?;
    let mut order: Vec<usize> = (0..first.len()).collect();
    order.sort_by(|&a, &b| first[b].total_cmp(&first[a]));
    let top5 = order.into_iter().take(5).map(|c| (c, first[c])).collect();
    Ok(IterationMetrics {
        iteration,
        loss: -objective_value,
        objective: objective_value,
        terms,
        target_logit,
        target_probability,
        top5,
        grad_norm,
        lr,
        seconds: start.elapsed().as_secs_f64(),
    })
}
