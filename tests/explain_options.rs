//! The options that follow the authors' code (issue 15 item 1) and the activation score (item
//! 2), on the embedded tiny models: a truncated gradient is a different gradient and is the
//! exact gradient of the chain with the UNet inputs frozen (finite differences, f64); fresh step
//! noise differs per iteration and a record still reproduces; options without effect are
//! refused; records keep the options and old records load with the old defaults; the recipe
//! resolves; the activation score is deterministic, from its own seeds, with a Wilson interval.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor, Var};
use diffexplainer::explain::activation::{
    activation_scores, activation_seed, wilson_interval, Z95,
};
use diffexplainer::explain::bundle::ModelSpec;
use diffexplainer::explain::pipeline::{fresh_noise_seed, OptionEffects};
use diffexplainer::explain::record::{run_recorded, RunConfig, RunRecord, RunSummary};
use diffexplainer::explain::{
    CancelToken, ClassObjective, DiffusionPipeline, GradientPath, ModelBundle, Objective,
    OptimizeConfig, PipelineOptions, Recipe, RunChoices, SoftPromptInit, StepNoise,
};
use diffexplainer::models::classifiers::ClassifierOutput;
use diffexplainer::sampling::{sample, LcmScheduler, SamplerOptions, Scheduler};

fn tiny(options: PipelineOptions) -> DiffusionPipeline {
    DiffusionPipeline::new(ModelBundle::tiny_random(0).unwrap(), options).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The gradient of the class-3 logit with respect to the prompt's vectors, and the images.
fn prompt_gradient(pipeline: &DiffusionPipeline) -> (Tensor, Tensor) {
    let prompt = pipeline
        .new_prompt("A texture of {}", 1, &SoftPromptInit::Random { seed: 1 })
        .unwrap();
    let (images, output) = pipeline
        .run_vectors("A texture of {}", prompt.vectors().as_tensor())
        .unwrap();
    let grads = output
        .logit(3)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = grads.get(prompt.vectors().as_tensor()).unwrap().clone();
    (g, images.detach())
}

#[test]
fn truncated_gradient_differs_from_full_with_the_same_images() {
    let (full, images_full) = prompt_gradient(&tiny(PipelineOptions::default()));
    let (truncated, images_truncated) = prompt_gradient(&tiny(PipelineOptions {
        gradient_path: GradientPath::Truncated,
        ..PipelineOptions::default()
    }));
    // Detaching changes no value, only the gradient.
    assert_eq!(max_abs_diff(&images_full, &images_truncated), 0.0);
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let (nf, nt) = (norm(&full), norm(&truncated));
    let diff = max_abs_diff(&full, &truncated);
    eprintln!("gradient norms: full {nf:.3e}, truncated {nt:.3e}; max abs diff {diff:.3e}");
    assert!(nf > 0.0 && nt > 0.0, "a gradient is zero");
    assert!(
        diff > 1e-3 * nf,
        "truncated equals full: {diff} vs norm {nf}"
    );
}

/// A toy denoiser, nonlinear in both the latents and the conditioning.
fn toy_denoiser(x: &Tensor, cond: &Tensor) -> candle_core::Result<Tensor> {
    ((x * 0.8)? + cond)?.tanh()? * 0.9
}

fn lcm(steps: usize) -> LcmScheduler {
    let mut s =
        LcmScheduler::new(&diffexplainer::explain::bundle::tiny::scheduler_config()).unwrap();
    s.set_timesteps(steps).unwrap();
    s
}

#[test]
fn truncated_gradient_is_the_gradient_with_frozen_unet_inputs() {
    // f64 throughout: latents [1, 4, 2, 2], conditioning of the same shape.
    let dev = Device::Cpu;
    let shape = (1, 4, 2, 2);
    let noise = |seed| {
        Tensor::from_vec(diffexplainer::testing::pseudo_random(16, seed), shape, &dev).unwrap()
    };
    let (init, steps_noise) = (noise(1), vec![noise(2), noise(3), noise(4)]);
    let weights = noise(5);
    let cond0: Vec<f64> = diffexplainer::testing::pseudo_random(16, 6);
    let options = |detach| {
        SamplerOptions::new(3)
            .with_step_noises(steps_noise.clone())
            .with_detached_model_input(detach)
    };
    let objective = |latents: &Tensor| (latents * &weights).unwrap().sum_all().unwrap();

    // The truncated gradient, recording the denoiser's inputs.
    let inputs = RefCell::new(Vec::new());
    let cond = Var::from_tensor(&Tensor::from_vec(cond0.clone(), shape, &dev).unwrap()).unwrap();
    let latents = sample(
        &mut lcm(3),
        |x, _, c| {
            inputs.borrow_mut().push(x.detach());
            toy_denoiser(x, c)
        },
        &init,
        cond.as_tensor(),
        &options(true),
    )
    .unwrap()
    .latents;
    let truncated: Vec<f64> = objective(&latents)
        .backward()
        .unwrap()
        .get(cond.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let inputs = inputs.into_inner();
    assert_eq!(inputs.len(), 3);

    // The reference: the same chain with each denoiser call fed its recorded (constant) input,
    // the scheduler updates live, differentiated by central differences.
    let frozen = |c: &[f64]| -> f64 {
        let calls = RefCell::new(0);
        let cond = Tensor::from_vec(c.to_vec(), shape, &dev).unwrap();
        let latents = sample(
            &mut lcm(3),
            |_, _, c| {
                let i = *calls.borrow();
                *calls.borrow_mut() += 1;
                toy_denoiser(&inputs[i], c)
            },
            &init,
            &cond,
            &options(false),
        )
        .unwrap()
        .latents;
        objective(&latents).to_scalar::<f64>().unwrap()
    };
    let h = 1e-6;
    for (k, &g) in truncated.iter().enumerate() {
        let (mut plus, mut minus) = (cond0.clone(), cond0.clone());
        plus[k] += h;
        minus[k] -= h;
        let fd = (frozen(&plus) - frozen(&minus)) / (2.0 * h);
        assert!(
            (fd - g).abs() <= 1e-6 * (1.0 + fd.abs()),
            "element {k}: truncated gradient {g}, finite differences {fd}"
        );
    }

    // And the full gradient is another one.
    let cond = Var::from_tensor(&Tensor::from_vec(cond0, shape, &dev).unwrap()).unwrap();
    let latents = sample(
        &mut lcm(3),
        |x, _, c| toy_denoiser(x, c),
        &init,
        cond.as_tensor(),
        &options(false),
    )
    .unwrap()
    .latents;
    let full: Vec<f64> = objective(&latents)
        .backward()
        .unwrap()
        .get(cond.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let gap = full
        .iter()
        .zip(&truncated)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(gap > 1e-4, "full and truncated gradients agree: {gap}");
}

#[test]
fn fresh_step_noise_differs_per_iteration_and_fixed_does_not() {
    let fresh = tiny(PipelineOptions {
        step_noise: StepNoise::Fresh,
        ..PipelineOptions::default()
    });
    let fixed = tiny(PipelineOptions::default());
    let v = fresh
        .new_prompt("A texture of {}", 1, &SoftPromptInit::Random { seed: 1 })
        .unwrap()
        .vectors()
        .as_tensor()
        .detach();
    let at = |p: &DiffusionPipeline, i| p.generate_at("A texture of {}", &v, i).unwrap();
    assert!(max_abs_diff(&at(&fresh, 0), &at(&fresh, 1)) > 1e-4);
    assert!(max_abs_diff(&at(&fresh, 1), &at(&fresh, 2)) > 1e-4);
    assert_eq!(max_abs_diff(&at(&fresh, 1), &at(&fresh, 1)), 0.0);
    assert_eq!(max_abs_diff(&at(&fixed, 0), &at(&fixed, 5)), 0.0);
    // The stream never reuses a seed in its first iterations, nor the run's own.
    let seeds: std::collections::BTreeSet<u64> =
        (0..1000).map(|i| fresh_noise_seed(0, i)).collect();
    assert_eq!(seeds.len(), 1000);
    assert!(!seeds.contains(&0));
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dx-options-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn recorded(
    dir: &std::path::Path,
    options: PipelineOptions,
    iterations: usize,
    samples: usize,
) -> RunRecord {
    let pipeline = tiny(options.clone());
    let mut config = RunConfig::new(
        ModelSpec::tiny(0),
        &Device::Cpu,
        options,
        "A texture of {}",
        1,
        "random:2".to_string(),
        Objective::log_probability(3),
        Some(3),
        OptimizeConfig {
            iterations,
            lr: 0.3,
            ..OptimizeConfig::default()
        },
        0,
    );
    config.activation_samples = samples;
    config.recipe = Some("paper".to_string());
    let mut prompt = pipeline
        .new_prompt("A texture of {}", 1, &SoftPromptInit::Random { seed: 2 })
        .unwrap();
    run_recorded(
        dir,
        &pipeline,
        &mut prompt,
        &config,
        &CancelToken::new(),
        3,
        |_| {},
    )
    .unwrap();
    RunRecord::open(dir).unwrap()
}

#[test]
fn a_fresh_noise_record_reproduces_its_best_iteration_and_keeps_its_options() {
    let dir = temp_dir("fresh");
    let options = PipelineOptions {
        step_noise: StepNoise::Fresh,
        gradient_path: GradientPath::Truncated,
        ..PipelineOptions::default()
    };
    let record = recorded(&dir, options.clone(), 6, 3);
    assert_eq!(record.config.pipeline, options);
    assert_eq!(record.config.recipe.as_deref(), Some("paper"));
    assert_eq!(record.config.activation_samples, 3);
    let summary = record.summary.clone().unwrap();
    let activation = summary.activation.clone().expect("scored");
    assert_eq!(activation.soft.samples, 3);
    let r = record.reproduce(&Device::Cpu).unwrap();
    assert!(
        r.identical && r.png_identical,
        "{r:?} (best iteration {})",
        summary.best_iteration
    );
    eprintln!("best iteration {}", summary.best_iteration);
    // Under fresh noise another iteration's noise gives other images.
    let pipeline = record.pipeline(&Device::Cpu).unwrap();
    let prompt = record.prompt(&Device::Cpu).unwrap();
    let other = pipeline
        .generate_at(
            prompt.template(),
            prompt.vectors(),
            summary.best_iteration + 1,
        )
        .unwrap();
    let saved = record.best_images().unwrap();
    assert!(max_abs_diff(&other, &saved) > 1e-4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn records_without_the_new_fields_load_with_the_old_defaults() {
    let dir = temp_dir("old");
    let record = recorded(&dir, PipelineOptions::default(), 2, 0);
    // Strip what older builds did not write.
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for key in ["gradient_path", "step_noise", "resize_antialias"] {
        config["pipeline"]
            .as_object_mut()
            .unwrap()
            .remove(key)
            .unwrap();
    }
    config
        .as_object_mut()
        .unwrap()
        .remove("activation_samples")
        .unwrap();
    config.as_object_mut().unwrap().remove("recipe").unwrap();
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    let path = dir.join("summary.json");
    let mut summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    summary
        .as_object_mut()
        .unwrap()
        .remove("activation")
        .unwrap();
    std::fs::write(&path, serde_json::to_vec(&summary).unwrap()).unwrap();

    let old = RunRecord::open(&dir).unwrap();
    // Everything else reads back as written; the stripped fields take the old defaults.
    let mut expected = record.config.clone();
    expected.recipe = None;
    assert_eq!(old.config, expected);
    assert_eq!(old.config.pipeline.gradient_path, GradientPath::Full);
    assert_eq!(old.config.pipeline.step_noise, StepNoise::Fixed);
    assert!(old.config.pipeline.resize_antialias);
    assert_eq!(old.config.activation_samples, 0);
    let s: &RunSummary = old.summary.as_ref().unwrap();
    assert!(s.activation.is_none());
    assert!(old.reproduce(&Device::Cpu).unwrap().identical);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn options_without_effect_are_refused() {
    let bundle = |scheduler: &str, steps: usize| {
        ModelBundle::load(
            &ModelSpec {
                scheduler: Some(scheduler.to_string()),
                steps,
                ..ModelSpec::tiny(0)
            },
            &Device::Cpu,
        )
        .unwrap()
    };
    let err = |b, o| {
        DiffusionPipeline::new(b, o)
            .err()
            .expect("refused")
            .to_string()
    };
    let e = err(
        bundle("ddim", 2),
        PipelineOptions {
            step_noise: StepNoise::Fresh,
            ..PipelineOptions::default()
        },
    );
    assert!(e.contains("`fresh` has no effect"), "{e}");
    let e = err(
        bundle("lcm", 1),
        PipelineOptions {
            gradient_path: GradientPath::Truncated,
            ..PipelineOptions::default()
        },
    );
    assert!(e.contains("`truncated` has no effect"), "{e}");
    // The tiny images are already the classifier's 32 px.
    let e = err(
        bundle("lcm", 2),
        PipelineOptions {
            resize_antialias: false,
            ..PipelineOptions::default()
        },
    );
    assert!(e.contains("without antialias has no effect"), "{e}");
    // At 48 px the resize shrinks, and antialiasing changes the classifier's view.
    let big = || {
        ModelBundle::load(
            &ModelSpec {
                resolution: 48,
                ..ModelSpec::tiny(0)
            },
            &Device::Cpu,
        )
        .unwrap()
    };
    let effects = OptionEffects::of(&big()).unwrap();
    assert!(effects.resize_antialias && effects.step_noise && effects.gradient_path);
    let images = Tensor::rand(0f32, 1f32, (1, 3, 48, 48), &Device::Cpu).unwrap();
    let on = DiffusionPipeline::new(big(), PipelineOptions::default()).unwrap();
    let off = DiffusionPipeline::new(
        big(),
        PipelineOptions {
            resize_antialias: false,
            ..PipelineOptions::default()
        },
    )
    .unwrap();
    let d = max_abs_diff(
        &on.classify(&images).unwrap().logits,
        &off.classify(&images).unwrap().logits,
    );
    assert!(d > 1e-6, "antialias made no difference: {d}");
}

#[test]
fn the_paper_recipe_resolves_and_explicit_choices_win() {
    let all = OptionEffects {
        step_noise: true,
        gradient_path: true,
        resize_antialias: true,
    };
    let paper = RunChoices {
        recipe: Some(Recipe::Paper),
        ..RunChoices::default()
    };
    let s = paper.resolve(true, all).unwrap();
    assert_eq!(
        (
            s.iterations,
            s.early_stop,
            s.class_objective,
            s.gradient_path,
            s.step_noise,
            s.resize_antialias
        ),
        (
            1000,
            Some(3),
            ClassObjective::CrossEntropy,
            GradientPath::Truncated,
            StepNoise::Fresh,
            false
        )
    );
    assert!(s.notes.is_empty());
    // Where a recipe setting would have no effect it is left out, with a note.
    let none = OptionEffects {
        step_noise: false,
        gradient_path: false,
        resize_antialias: false,
    };
    let s = paper.resolve(false, none).unwrap();
    assert_eq!(
        (
            s.early_stop,
            s.class_objective,
            s.gradient_path,
            s.step_noise,
            s.resize_antialias
        ),
        (
            None,
            ClassObjective::Logit,
            GradientPath::Full,
            StepNoise::Fixed,
            true
        )
    );
    assert_eq!(s.notes.len(), 5, "{:?}", s.notes);
    // Explicit choices win.
    let s = RunChoices {
        gradient_path: Some(GradientPath::Full),
        iterations: Some(7),
        ..paper.clone()
    }
    .resolve(true, all)
    .unwrap();
    assert_eq!(
        (s.gradient_path, s.iterations, s.step_noise),
        (GradientPath::Full, 7, StepNoise::Fresh)
    );
    // Without a recipe: our defaults.
    let s = RunChoices::default().resolve(true, all).unwrap();
    assert_eq!(
        (
            s.iterations,
            s.early_stop,
            s.gradient_path,
            s.step_noise,
            s.resize_antialias
        ),
        (30, None, GradientPath::Full, StepNoise::Fixed, true)
    );
    // An explicit choice that cannot act is refused, whatever value it names.
    for choices in [
        RunChoices {
            resize_antialias: Some(true),
            ..RunChoices::default()
        },
        RunChoices {
            step_noise: Some(StepNoise::Fixed),
            ..RunChoices::default()
        },
        RunChoices {
            gradient_path: Some(GradientPath::Full),
            ..RunChoices::default()
        },
    ] {
        let e = choices.resolve(true, none).unwrap_err().to_string();
        assert!(e.contains("has no effect"), "{choices:?}: {e}");
    }
    // Class-only choices without a class are refused.
    let e = RunChoices {
        early_stop: Some(3),
        ..RunChoices::default()
    }
    .resolve(false, all)
    .unwrap_err();
    assert!(e.to_string().contains("--early-stop"), "{e}");
}

#[test]
fn class_with_features_adds_the_sum_of_the_features() {
    let dev = Device::Cpu;
    let output = ClassifierOutput {
        logits: Tensor::new(&[[0.5f32, 2.0, -1.0]], &dev).unwrap(),
        features: Tensor::new(&[[1.0f32, 2.0, 3.0, 4.0]], &dev).unwrap(),
        hidden: Default::default(),
    };
    let value = |o: Objective| {
        o.evaluate(&output)
            .unwrap()
            .0
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let logit = value(Objective::class_with_features(1, false, vec![0, 2, 3]));
    assert!((logit - (2.0 + 1.0 + 3.0 + 4.0)).abs() < 1e-6, "{logit}");
    let ce = value(Objective::class_with_features(1, true, vec![1]));
    let log_p1 = 2.0 - (0.5f64.exp() + 2.0f64.exp() + (-1.0f64).exp()).ln();
    assert!((ce - (log_p1 + 2.0)).abs() < 1e-5, "{ce}");
}

#[test]
fn wilson_interval_matches_known_values() {
    // Wilson (1927); the 95% values as tabulated by e.g. Newcombe (1998), Stat. Med. 17:857.
    let (lo, hi) = wilson_interval(5, 10, Z95);
    assert!(
        (lo - 0.2366).abs() < 1e-4 && (hi - 0.7634).abs() < 1e-4,
        "{lo} {hi}"
    );
    let (lo, hi) = wilson_interval(0, 16, Z95);
    assert!(lo == 0.0 && (hi - 0.1936).abs() < 1e-3, "{lo} {hi}");
    let (lo, hi) = wilson_interval(16, 16, Z95);
    assert!(hi == 1.0 && (lo - 0.8064).abs() < 1e-3, "{lo} {hi}");
    assert_eq!(wilson_interval(0, 0, Z95), (0.0, 1.0));
}

#[test]
fn activation_score_is_deterministic_from_its_own_seeds() {
    let pipeline = tiny(PipelineOptions {
        seed: 7,
        ..PipelineOptions::default()
    });
    let v = pipeline
        .new_prompt("A texture of {}", 1, &SoftPromptInit::Random { seed: 1 })
        .unwrap()
        .vectors()
        .as_tensor()
        .detach();
    let n = 10;
    let score = || {
        activation_scores(
            &pipeline,
            "A texture of {}",
            &v,
            "A texture of dog",
            3,
            n,
            7,
        )
        .unwrap()
    };
    let a = score();
    assert_eq!(a, score(), "not deterministic");
    for s in [&a.soft, &a.text] {
        assert_eq!(s.samples, n);
        assert_eq!(s.seeds.len(), n);
        assert!(s.hits <= n);
        assert!(s.ci_low <= s.share && s.share <= s.ci_high, "{s:?}");
        assert_eq!((s.ci_low, s.ci_high), wilson_interval(s.hits, n, Z95));
        let distinct: std::collections::BTreeSet<u64> = s.seeds.iter().copied().collect();
        assert_eq!(distinct.len(), n, "repeated seeds");
        // Never the optimization's noise: not its seed, not its fresh-noise stream.
        assert!(!distinct.contains(&7));
        assert!((0..10_000).all(|i| !distinct.contains(&fresh_noise_seed(7, i))));
        assert_eq!(s.seeds[0], activation_seed(7, 0));
    }
    assert_eq!(a.text.prompt, "A texture of dog");
    eprintln!("soft {} | text {}", a.soft, a.text);
    // Other seeds give another sample of images (the score itself may coincide).
    let images_first = {
        let b = pipeline.bundle();
        let mut rng = diffexplainer::rng::SeededRng::new(a.soft.seeds[0]);
        rng.normal(b.latent_shape(1), b.dtype, &b.device).unwrap()
    };
    let (optimization_noise, _) = pipeline.noises_at(0).unwrap();
    assert!(max_abs_diff(&images_first, &optimization_noise) > 1e-3);
}

#[test]
fn the_cli_takes_the_recipe_reproduces_fresh_noise_and_refuses_options_without_effect() {
    let bin = env!("CARGO_BIN_EXE_diffexplainer");
    let dir = temp_dir("cli");
    let run = |args: &[&str]| std::process::Command::new(bin).args(args).output().unwrap();
    let out = dir.join("rec");
    let o = out.to_str().unwrap();
    for (args, needle) in [
        (
            vec![
                "explain",
                "--scheduler",
                "ddim",
                "--step-noise",
                "fresh",
                "--out",
                o,
            ],
            "--step-noise has no effect",
        ),
        (
            vec![
                "explain",
                "--steps",
                "1",
                "--gradient-path",
                "truncated",
                "--out",
                o,
            ],
            "--gradient-path has no effect",
        ),
        (
            vec!["explain", "--resize-antialias", "false", "--out", o],
            "--resize-antialias has no effect",
        ),
        (
            vec![
                "explain",
                "--neuron",
                "2",
                "--activation-samples",
                "4",
                "--out",
                o,
            ],
            "--activation-samples counts images",
        ),
        (
            vec![
                "explain",
                "--neuron",
                "2",
                "--class-features",
                "1",
                "--out",
                o,
            ],
            "--class-features adds features",
        ),
        (
            vec!["explain", "--recipe", "dexter", "--out", o],
            "unknown recipe `dexter`",
        ),
        (
            vec!["explain", "--class-objective", "hinge", "--out", o],
            "unknown class objective `hinge`",
        ),
    ] {
        let r = run(&args);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(
            !r.status.success() && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
        assert!(!out.exists(), "{args:?} wrote a record");
    }
    let r = run(&[
        "explain",
        "--recipe",
        "paper",
        "--iterations",
        "4",
        "--activation-samples",
        "3",
        "--class",
        "2",
        "--class-features",
        "0,1",
        "--out",
        o,
    ]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(
        stderr.contains("recipe paper: resize without antialias left out"),
        "{stderr}"
    );
    let r = run(&["show", o, "--reproduce"]);
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    for needle in [
        "log_p[2] + 2·features[0, 1]",
        "gradient Truncated, step noise Fresh, resize antialias true, early stop after 3, recipe paper",
        "soft prompt: ",
        "/3 = ",
        "bit for bit identical",
    ] {
        assert!(stdout.contains(needle), "{needle:?} not in:\n{stdout}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_sd14_lcm_preset_names_the_missing_weights() {
    let bin = env!("CARGO_BIN_EXE_diffexplainer");
    let dir = temp_dir("sd14");
    std::fs::create_dir_all(dir.join("hf")).unwrap();
    let classifier = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/world/classifier");
    let out = dir.join("rec");
    let r = std::process::Command::new(bin)
        .env("HF_HOME", dir.join("hf"))
        .args([
            "explain",
            "--preset",
            "sd14-lcm",
            "--classifier",
            classifier,
            "--class",
            "1",
        ])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Everything missing at once: the SD 1.4 model and the LCM-LoRA file, each with its
    // download command and where it must land.
    assert!(
        stderr.contains("weights not available: 2 item(s) to download"),
        "{stderr}"
    );
    assert!(
        stderr.contains("model `CompVis/stable-diffusion-v1-4` (revision main) is not in the local Hugging Face cache"),
        "{stderr}"
    );
    assert!(
        stderr.contains("huggingface-cli download latent-consistency/lcm-lora-sdv1-5 pytorch_lora_weights.safetensors"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("into: {}", dir.join("hf").join("hub").display())), "{stderr}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_real_model_set_names_every_missing_download_at_once() {
    let bin = env!("CARGO_BIN_EXE_diffexplainer");
    let dir = temp_dir("sd15-resnet50");
    std::fs::create_dir_all(dir.join("hf")).unwrap();
    let out = dir.join("rec");
    let r = std::process::Command::new(bin)
        .env("HF_HOME", dir.join("hf"))
        .env("TORCH_HOME", dir.join("torch"))
        .args(["explain", "--preset", "sd15-lcm", "--classifier", "resnet50"])
        .args(["--class", "1", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("weights not available: 3 item(s) to download"),
        "{stderr}"
    );
    for needle in [
        "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 model_index.json",
        "huggingface-cli download latent-consistency/lcm-lora-sdv1-5 pytorch_lora_weights.safetensors",
        "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    ] {
        assert!(stderr.contains(needle), "no `{needle}` in {stderr}");
    }
    let torch_file = dir.join("torch/hub/checkpoints/resnet50-0676ba61.pth");
    assert!(
        stderr.contains(&format!("into: {}", torch_file.display())),
        "{stderr}"
    );
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
