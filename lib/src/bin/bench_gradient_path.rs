//! A/B of the gradient path (issue 15): `full` (through every UNet step) against `truncated`
//! (the UNet input detached at each step, the authors' code), on the same jobs: for each class
//! and seed, the best objective reached, the iterations run until early stop (or the cap), and
//! the time per iteration. Runs the embedded tiny random models (untrained: the numbers show
//! the mechanics and the cost, not what happens on a trained model; see docs/recipe.md).
//!
//! `bench_gradient_path [--classes 0,1,...] [--seeds N] [--iterations CAP] [--early-stop K]
//!                      [--objective logit|cross-entropy] [--step-noise fixed|fresh] [--lr X]`
//!
//! Prints one JSON line per run, then one summary line per gradient path.

#[allow(dead_code)] // the shared helpers this bench does not use
mod common;

use std::time::Instant;

use diffexplainer::explain::optimize::EarlyStop;
use diffexplainer::explain::{
    optimize, CancelToken, ClassObjective, DiffusionPipeline, GradientPath, ModelBundle, Objective,
    OptimizeConfig, PipelineOptions, SoftPromptInit, StepNoise, StopReason,
};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |name| common::arg(&args, name);
    let classes: Vec<usize> = match get("--classes") {
        Some(s) => s.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => (0..10).collect(),
    };
    let seeds: u64 = get("--seeds").map_or(Ok(3), str::parse)?;
    let cap: usize = get("--iterations").map_or(Ok(100), str::parse)?;
    let early: usize = get("--early-stop").map_or(Ok(3), str::parse)?;
    let lr: f64 = get("--lr").map_or(Ok(0.1), str::parse)?;
    let objective: ClassObjective = get("--objective").unwrap_or("cross-entropy").parse()?;
    let step_noise: StepNoise = get("--step-noise").unwrap_or("fixed").parse()?;

    let mut summary = Vec::new();
    for path in [GradientPath::Full, GradientPath::Truncated] {
        let (mut best_sum, mut iters_sum, mut stops, mut runs) = (0.0, 0usize, 0usize, 0usize);
        let (mut seconds, mut iterations) = (0.0, 0usize);
        for seed in 0..seeds {
            let pipeline = DiffusionPipeline::new(
                ModelBundle::tiny_random(0)?,
                PipelineOptions {
                    seed,
                    gradient_path: path,
                    step_noise,
                    ..PipelineOptions::default()
                },
            )?;
            for &class in &classes {
                let mut prompt =
                    pipeline.new_prompt("A texture of {}", 1, &SoftPromptInit::Random { seed })?;
                let goal = match objective {
                    ClassObjective::Logit => Objective::logit(class),
                    ClassObjective::CrossEntropy => Objective::log_probability(class),
                };
                let config = OptimizeConfig {
                    iterations: cap,
                    lr,
                    early_stop: Some(EarlyStop {
                        class,
                        consecutive: early,
                    }),
                    ..OptimizeConfig::default()
                };
                let start = Instant::now();
                let run = optimize(
                    &pipeline,
                    &mut prompt,
                    &goal,
                    Some(class),
                    &config,
                    &CancelToken::new(),
                    |_, _| Ok(()),
                )?;
                let elapsed = start.elapsed().as_secs_f64();
                let n = run.metrics.len();
                let early_stopped = run.stop == StopReason::EarlyStop;
                println!(
                    "{}",
                    serde_json::json!({
                        "gradient_path": path, "seed": seed, "class": class,
                        "first_objective": run.metrics[0].objective,
                        "best_objective": run.best_objective, "iterations": n,
                        "early_stop": early_stopped,
                        "ms_per_iteration": 1e3 * elapsed / n as f64,
                    })
                );
                best_sum += run.best_objective;
                iters_sum += n;
                stops += early_stopped as usize;
                runs += 1;
                seconds += elapsed;
                iterations += n;
            }
        }
        summary.push(serde_json::json!({
            "gradient_path": path, "runs": runs,
            "mean_best_objective": best_sum / runs as f64,
            "mean_iterations": iters_sum as f64 / runs as f64,
            "early_stopped": stops,
            "ms_per_iteration": 1e3 * seconds / iterations as f64,
        }));
    }
    for s in summary {
        println!("{s}");
    }
    Ok(())
}
