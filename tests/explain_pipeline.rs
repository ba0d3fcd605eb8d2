//! The real DiffusionPipeline on the embedded tiny random models (CLIP with the real vocabulary,
//! SD-shaped UNet and VAE, LCM sampling, a ViT classifier): the objective climbs with a fixed
//! seed, the gradient reaches the soft prompt through the whole chain (finite differences in
//! f64), the fixed noises make every run the same function, and the pieces report bad input.

use candle_core::{DType, Device, Tensor};
use diffexplainer::explain::bundle::ModelSpec;
use diffexplainer::explain::{
    nearest_tokens, optimize, CancelToken, DiffusionPipeline, ModelBundle, Objective,
    OptimizeConfig, Pipeline, PipelineOptions, SoftPromptInit, StopReason,
};
use diffexplainer::testing::check_gradient;

fn tiny_pipeline(options: PipelineOptions) -> DiffusionPipeline {
    DiffusionPipeline::new(ModelBundle::tiny_random(0).unwrap(), options).unwrap()
}

#[test]
fn the_objective_climbs_through_the_real_pipeline() {
    let pipeline = tiny_pipeline(PipelineOptions::default());
    let mut prompt = pipeline
        .new_prompt("A texture of {}", 2, &SoftPromptInit::Random { seed: 3 })
        .unwrap();
    let config = OptimizeConfig {
        iterations: 10,
        ..OptimizeConfig::default()
    };
    let start = std::time::Instant::now();
    let run = optimize(
        &pipeline,
        &mut prompt,
        &Objective::logit(3),
        Some(3),
        &config,
        &CancelToken::new(),
        |_, _| Ok(()),
    )
    .unwrap();
    let values: Vec<f64> = run.metrics.iter().map(|m| m.objective).collect();
    eprintln!(
        "10 iterations in {:.2}s: {values:?}",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(run.stop, StopReason::Finished);
    let climbs = values.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(
        climbs >= 7 && values[9] > values[0] + 0.1,
        "objective did not climb: {values:?}"
    );
    assert_eq!(run.best_images.dims(), &[1, 3, 32, 32]);
}

#[test]
fn the_gradient_reaches_the_soft_prompt_through_the_whole_chain() {
    // f64 everywhere: CLIP -> 2 LCM steps over the UNet -> VAE decoder -> resize/normalize -> ViT.
    let spec = ModelSpec {
        dtype: "f64".to_string(),
        ..ModelSpec::tiny(0)
    };
    let bundle = ModelBundle::load(&spec, &Device::Cpu).unwrap();
    let pipeline = DiffusionPipeline::new(bundle, PipelineOptions::default()).unwrap();
    let prompt = pipeline
        .new_prompt("A texture of {}", 2, &SoftPromptInit::Random { seed: 5 })
        .unwrap();
    let objective = Objective::logit(3) - 0.5 * Objective::logit(7);
    let f = |x: &Tensor| -> candle_core::Result<Tensor> {
        let (_, output) = pipeline
            .run_vectors("A texture of {}", x)
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        Ok(objective.evaluate(&output)?.0)
    };
    let x = prompt.vectors().as_tensor().to_dtype(DType::F64).unwrap();
    let check = check_gradient(f, &x, 1e-6, 24).unwrap();
    eprintln!("{check:?}");
    assert!(check.scale > 1e-4, "gradient ~0: {check:?}");
    assert!(check.max_rel_error < 1e-5, "{check:?}");
}

#[test]
fn fixed_noises_make_every_run_the_same_function_and_batches_differ() {
    let options = PipelineOptions {
        batch: 3,
        seed: 11,
        ..PipelineOptions::default()
    };
    let a = tiny_pipeline(options.clone());
    let b = tiny_pipeline(options.clone());
    let prompt = a
        .new_prompt("{}", 1, &SoftPromptInit::Word("dog".into()))
        .unwrap();
    let (images_a, out_a) = a.run(&prompt).unwrap();
    let (images_b, _) = b.run(&prompt).unwrap();
    assert_eq!(images_a.dims(), &[3, 3, 32, 32]);
    assert_eq!(out_a.logits.dims(), &[3, 10]);
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(flat(&images_a), flat(&images_b), "same seed, same images");
    // The images are not saturated: gradients need pixels inside (0, 1).
    let v = flat(&images_a);
    let inside = v.iter().filter(|&&p| p > 0.0 && p < 1.0).count();
    assert!(
        inside * 2 > v.len(),
        "{inside} of {} pixels inside (0, 1)",
        v.len()
    );
    // Each image has its own noise.
    let first = flat(&images_a.get(0).unwrap());
    let second = flat(&images_a.get(1).unwrap());
    assert_ne!(first, second);
    // Another seed, other images.
    let c = tiny_pipeline(PipelineOptions {
        seed: 12,
        ..options
    });
    assert_ne!(flat(&c.run(&prompt).unwrap().0), flat(&images_a));
}

#[test]
fn the_diversity_objective_runs_on_a_batch() {
    let pipeline = tiny_pipeline(PipelineOptions {
        batch: 2,
        ..PipelineOptions::default()
    });
    let mut prompt = pipeline
        .new_prompt("{}", 1, &SoftPromptInit::Random { seed: 1 })
        .unwrap();
    let run = optimize(
        &pipeline,
        &mut prompt,
        &(Objective::logit(2) + 0.1 * Objective::diversity("block_0")),
        Some(2),
        &OptimizeConfig {
            iterations: 2,
            ..OptimizeConfig::default()
        },
        &CancelToken::new(),
        |m, _| {
            assert_eq!(m.terms.len(), 2);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(run.best_images.dims(), &[2, 3, 32, 32]);
}

#[test]
fn nearest_tokens_find_the_words_a_prompt_was_made_of() {
    let bundle = ModelBundle::tiny_random(0).unwrap();
    let table = &bundle.text_encoder.token_embedding;
    let tok = &bundle.tokenizer;
    let ids: Vec<u32> = ["dog", "sled"]
        .iter()
        .map(|w| tok.token_id(&format!("{w}</w>")).unwrap())
        .collect();
    let vectors = table
        .index_select(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap(), 0)
        .unwrap();
    let e = nearest_tokens("A photo of {}", &vectors, &bundle.text_encoder, tok, 3).unwrap();
    assert_eq!(e.nearest.len(), 2);
    assert_eq!(e.nearest[0][0].text, "dog");
    assert_eq!(e.nearest[1][0].text, "sled");
    assert!((e.nearest[0][0].cosine - 1.0).abs() < 1e-5);
    assert!(e.nearest[0][1].cosine <= e.nearest[0][0].cosine);
    assert_eq!(e.prompt, "A photo of dog sled");
    // A vector of another width is refused with both widths named.
    let wrong = Tensor::zeros((1, 8), DType::F32, &Device::Cpu).unwrap();
    let err = nearest_tokens("{}", &wrong, &bundle.text_encoder, tok, 3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("width 8") && err.contains("width 32"), "{err}");
}

#[test]
fn presets_and_missing_models_give_clear_errors() {
    use diffexplainer::explain::bundle::ClassifierSpec;
    let err = ModelSpec::preset("sd3", None, ClassifierSpec::tiny())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sd3") && err.contains("sd15-lcm") && err.contains("sd-turbo"),
        "{err}"
    );
    let err = ClassifierSpec::preset("resnet51", None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("resnet51") && err.contains("robust-resnet50"),
        "{err}"
    );
    let err = ClassifierSpec::preset("robust-resnet50", None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--classifier-checkpoint"), "{err}");

    // A Hub id not in the cache: the error names the repo, the cache folder and the files.
    let empty = std::env::temp_dir().join(format!("dx-empty-hf-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    std::env::set_var("HF_HOME", &empty);
    let spec = ModelSpec::preset("sd-turbo", None, ClassifierSpec::tiny()).unwrap();
    let err = format!("{:#}", ModelBundle::load(&spec, &Device::Cpu).unwrap_err());
    assert!(
        err.contains("stabilityai/sd-turbo")
            && err.contains("models--stabilityai--sd-turbo")
            && err.contains("unet/diffusion_pytorch_model.safetensors")
            && err.contains("--model-dir"),
        "{err}"
    );
    // A folder that is not a diffusers layout: the missing part is named.
    let spec = ModelSpec::preset("sd-turbo", Some(empty.clone()), ClassifierSpec::tiny()).unwrap();
    let err = format!("{:#}", ModelBundle::load(&spec, &Device::Cpu).unwrap_err());
    assert!(
        err.contains("tokenizer") && err.contains(&empty.display().to_string()),
        "{err}"
    );
}
