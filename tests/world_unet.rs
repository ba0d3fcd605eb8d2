//! The world's UNet (ShapesWorld II): a few steps lower the denoising loss, a resumed run ends
//! with the uninterrupted weights, no held-out combination reaches a training batch, the
//! written folder loads through `--model-dir`'s loader and samples the same images as the
//! trainer's sampler, and bad configs and inputs are named before anything is written.
//!
//! The frozen inputs are stand-ins built here in seconds: the tiny default's random CLIP text
//! encoder (with the real tokenizer) and a random `AutoencoderKL` with an encoder.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use diffexplainer::explain::bundle::write_tiny_diffusers_folder;
use diffexplainer::explain::{
    ClassifierSpec, DiffusionPipeline, DiffusionSource, ModelBundle, ModelSpec, PipelineOptions,
};
use diffexplainer::sampling::{Scheduler, SchedulerKind};
use diffexplainer::world::autoencoder::{TrainableVae, VaeTrainConfig};
use diffexplainer::world::checker::{self, CheckerConfig};
use diffexplainer::world::diffusion::{
    self, data, quality, trainer, EvalOptions, Inputs, TextConditioning, TrainableUnet,
    TrainingSet, UnetTrainConfig,
};
use diffexplainer::world::heldout;
use diffexplainer::world::spec::WorldSpec;
use diffexplainer::world::splits::{sample, Split};
use diffexplainer::world::train::{batch_indices, Checkpointing};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dx-unet-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `dir/tokenizer`, `dir/text_encoder` (random, width 32) and `dir/vae` (random, with encoder,
/// 32×32 images to 4×16×16 latents).
fn stand_ins(dir: &Path) {
    write_tiny_diffusers_folder(0, dir).unwrap();
    for gone in ["unet", "vae", "scheduler", "model_index.json"] {
        let p = dir.join(gone);
        let _ = std::fs::remove_dir_all(&p);
        let _ = std::fs::remove_file(&p);
    }
    let vae_config = VaeTrainConfig {
        block_out_channels: vec![8, 8],
        norm_num_groups: 4,
        ..VaeTrainConfig::default()
    };
    let vae = TrainableVae::new(&vae_config.model_config(32).unwrap(), 0).unwrap();
    std::fs::create_dir_all(dir.join("vae")).unwrap();
    std::fs::write(
        dir.join("vae/config.json"),
        serde_json::to_vec(&vae_config.diffusers_config(32, 2.0)).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(
        &vae.tensors().unwrap(),
        dir.join("vae/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
}

fn tiny() -> UnetTrainConfig {
    UnetTrainConfig {
        train_images: 48,
        epochs: 4,
        batch_size: 16,
        lr: 3e-3,
        block_out_channels: vec![8, 16],
        down_block_types: vec!["DownBlock2D".into(), "CrossAttnDownBlock2D".into()],
        attention_head_dim: 2,
        norm_num_groups: 4,
        checkpoint_every: 4,
        ..UnetTrainConfig::default()
    }
}

struct Fixture {
    _dir: PathBuf,
    set: TrainingSet,
    width: usize,
}

fn fixture(name: &str, config: &UnetTrainConfig) -> Fixture {
    let dir = scratch(name);
    stand_ins(&dir);
    let spec = WorldSpec::default_world();
    let vae = data::load_vae(&dir).unwrap();
    let text = TextConditioning::load(&dir).unwrap();
    let set = TrainingSet::build(
        &spec,
        config.train_start(&spec),
        config.train_images,
        &vae,
        &text,
    )
    .unwrap();
    Fixture {
        _dir: dir,
        set,
        width: text.width(),
    }
}

fn model(config: &UnetTrainConfig, width: usize) -> TrainableUnet {
    TrainableUnet::new(&config.model_config(16, width).unwrap(), config.seed).unwrap()
}

fn bits(model: &TrainableUnet) -> Vec<(String, Vec<u32>)> {
    let mut t: Vec<_> = model
        .tensors()
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (n, v.iter().map(|x| x.to_bits()).collect())
        })
        .collect();
    t.sort();
    t
}

/// The loss on a fixed batch (examples 0..16, fixed noise and timesteps).
fn fixed_loss(m: &TrainableUnet, f: &Fixture, config: &UnetTrainConfig) -> f32 {
    let schedule = trainer::NoiseSchedule::of(config).unwrap();
    let idx: Vec<usize> = (0..16).collect();
    let (x0, cond) = f.set.batch(&idx).unwrap();
    let (noise, t) = trainer::batch_noise(99, &idx, &x0.dims()[1..], &schedule).unwrap();
    trainer::loss(&m.unet, &schedule, &x0, &cond, &noise, &t)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn a_few_steps_lower_the_loss() {
    let config = tiny();
    let f = fixture("loss", &config);
    let m = model(&config, f.width);
    let before = fixed_loss(&m, &f, &config);
    let report = trainer::train_on(&m, &f.set, &config, None, false, 0, 0, |_, _| Ok(())).unwrap();
    assert_eq!(report.total_steps, 12);
    let after = fixed_loss(&m, &f, &config);
    assert!(
        after < 0.8 * before,
        "the loss on a fixed batch did not fall: {before} -> {after} (steps {:?})",
        report.step_losses
    );
}

#[test]
fn every_parameter_gets_a_gradient() {
    let config = tiny();
    let f = fixture("grad", &config);
    let m = model(&config, f.width);
    let schedule = trainer::NoiseSchedule::of(&config).unwrap();
    let idx: Vec<usize> = (0..4).collect();
    let (x0, cond) = f.set.batch(&idx).unwrap();
    let (noise, t) = trainer::batch_noise(0, &idx, &x0.dims()[1..], &schedule).unwrap();
    let grads = trainer::loss(&m.unet, &schedule, &x0, &cond, &noise, &t)
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in m.vars().unwrap() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("`{name}` has no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm.is_finite(), "`{name}`: gradient {norm}");
    }
}

#[test]
fn resumed_training_ends_with_the_uninterrupted_weights() {
    let config = tiny();
    let f = fixture("resume", &config);
    let a = model(&config, f.width);
    trainer::train_on(&a, &f.set, &config, None, false, 0, 0, |_, _| Ok(())).unwrap();
    // Interrupted at step 6 (a failing measurement stops training), after the step-4
    // checkpoint; then rerun to the end from it.
    let dir = scratch("resume-ckpt");
    let ckpt = Checkpointing { dir: dir.clone() };
    let b = model(&config, f.width);
    let r = trainer::train_on(&b, &f.set, &config, Some(&ckpt), false, 0, 1, |step, _| {
        if step == 6 {
            anyhow::bail!("interrupted")
        }
        Ok(())
    });
    assert!(r.unwrap_err().to_string().contains("interrupted"));
    let b = model(&config, f.width);
    let report =
        trainer::train_on(&b, &f.set, &config, Some(&ckpt), false, 4, 0, |_, _| Ok(())).unwrap();
    assert_eq!(report.resumed_at, 4);
    assert_eq!(bits(&a), bits(&b));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_heldout_combination_reaches_a_training_batch() {
    let spec = WorldSpec::default_world();
    let config = UnetTrainConfig {
        train_images: 400,
        ..tiny()
    };
    let (samples, skipped) =
        data::training_samples(&spec, config.train_start(&spec), config.train_images);
    assert_eq!(samples.len(), 400);
    // About one in eight balanced images is held out: some were skipped.
    assert!(skipped > 20, "only {skipped} held-out images skipped");
    let indices: Vec<usize> = samples.iter().map(|s| s.index).collect();
    assert!(indices[0] >= spec.splits.balanced);
    // Every batch the trainer draws, over every epoch.
    let tc = config.train_config();
    for epoch in 0..tc.epochs {
        for k in 0..tc.steps_per_epoch(samples.len()) {
            for i in batch_indices(tc.seed, samples.len(), tc.batch_size, epoch, k) {
                let s = sample(&spec, Split::Balanced, indices[i]);
                assert!(
                    !heldout::scene_is_heldout(&spec, &s.scene),
                    "balanced image {} ({} {} {}) is held out but in batch {k} of epoch {epoch}",
                    s.index,
                    s.scene.color,
                    s.scene.shape,
                    s.scene.background
                );
            }
        }
    }
    // The held-out prompts are exactly the held-out combinations.
    for prompts in quality::heldout_prompts(&spec).unwrap() {
        assert!(!prompts.is_empty());
        for p in prompts {
            let c = heldout::Combination {
                shape: p.shape.clone(),
                color: p.color.clone(),
                background: p.background.clone(),
            };
            assert!(heldout::is_heldout(&spec, &c), "{p:?}");
        }
    }
}

#[test]
fn the_folder_loads_through_the_model_dir_loader_and_samples_the_same_images() {
    let spec = WorldSpec::default_world();
    let inputs_dir = scratch("inputs");
    stand_ins(&inputs_dir);
    // A checker trained for seconds: enough to exercise the measurement and the grids.
    let checker_dir = scratch("checker");
    checker::train_and_save(
        &spec,
        &CheckerConfig {
            train_images: 32,
            eval_images: 16,
            epochs: 1,
            batch_size: 32,
            stem_width: 4,
            widths: [4, 8, 8, 8],
            strides: [2, 2, 2, 1],
            ..CheckerConfig::default()
        },
        &checker_dir,
        false,
    )
    .unwrap();
    let out = scratch("out");
    let config = UnetTrainConfig {
        epochs: 1,
        ..tiny()
    };
    let eval = EvalOptions {
        samples_per_prompt: 1,
        steps: vec![4],
        ..EvalOptions::default()
    };
    let inputs = Inputs {
        vae: inputs_dir.clone(),
        text: inputs_dir.clone(),
        checker: Some(checker_dir.clone()),
    };
    let record =
        diffusion::train_and_save_with(&spec, &config, &inputs, &eval, &out, false).unwrap();
    assert_eq!(record.latent_size, 16);
    assert_eq!(record.cross_attention_dim, 32);
    assert_eq!(record.final_quality.len(), 1);
    let q = &record.final_quality[0];
    assert_eq!(q.sampling_steps, 4);
    assert_eq!(q.templates.len(), spec.captions.templates.len());
    for attribute in ["shape", "color", "background"] {
        let v = q.score(attribute).unwrap();
        assert!((0.0..=1.0).contains(&v), "{attribute}: {v}");
    }
    let d = out.join("diffusion");
    for f in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/report.json",
        "unet/samples/a_color_shape_background.png",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/vocab.json",
    ] {
        assert!(d.join(f).is_file(), "{f} is missing");
    }
    assert!(!d.join("unet/checkpoint").exists());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("model_index.json")).unwrap()).unwrap();
    assert_eq!(index["_class_name"], "StableDiffusionPipeline");
    assert_eq!(index["unet"][1], "UNet2DConditionModel");
    assert_eq!(index["scheduler"][1], "DDIMScheduler");

    // `--model-dir`'s loader, with the folder's own scheduler class.
    let model_spec = ModelSpec {
        preset: None,
        diffusion: DiffusionSource::Dir { path: d.clone() },
        lora: None,
        scheduler: None,
        timestep_spacing: None,
        steps: config.inference_steps,
        resolution: 32,
        classifier: ClassifierSpec::tiny(),
        dtype: "f32".to_string(),
    };
    let bundle = ModelBundle::load(&model_spec, &Device::Cpu).unwrap();
    assert_eq!(bundle.scheduler_kind, SchedulerKind::Ddim);
    let pipeline = DiffusionPipeline::new(bundle, PipelineOptions::default()).unwrap();

    // The same images as the trainer's sampler, from the same noise and caption.
    let unet = diffusion::load_unet(&out).unwrap();
    let vae = data::load_vae(&d).unwrap();
    let text = TextConditioning::load(&d).unwrap();
    let cond = text.encode(&["a red star on grass".to_string()]).unwrap();
    let ours = quality::generate(
        &unet,
        &vae,
        &config.scheduler_config(),
        &cond,
        16,
        config.inference_steps,
        7,
    )
    .unwrap();
    let noise = diffexplainer::rng::SeededRng::new(7)
        .normal((1, 4, 16, 16), DType::F32, &Device::Cpu)
        .unwrap();
    let theirs = pipeline.sample_images(&cond, &noise, Vec::new()).unwrap();
    let diff = (ours - theirs)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0, "the pipeline and the trainer's sampler differ");
    // The trained weights are what the folder holds.
    let saved = candle_core::safetensors::load(
        d.join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let w = &saved["conv_in.weight"];
    let loaded = unet.conv_in.weight();
    assert_eq!(
        (w - loaded)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    for dir in [inputs_dir, checker_dir, out] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn bad_configs_and_inputs_are_named_before_anything_is_written() {
    let spec = WorldSpec::default_world();
    let cases: Vec<(UnetTrainConfig, &str)> = vec![
        (
            UnetTrainConfig {
                block_out_channels: vec![],
                down_block_types: vec![],
                ..tiny()
            },
            "block_out_channels",
        ),
        (
            UnetTrainConfig {
                down_block_types: vec!["CrossAttnDownBlock2D".into()],
                ..tiny()
            },
            "down_block_types",
        ),
        (
            UnetTrainConfig {
                down_block_types: vec!["AttnDownBlock2D".into(), "DownBlock2D".into()],
                ..tiny()
            },
            "AttnDownBlock2D",
        ),
        (
            UnetTrainConfig {
                norm_num_groups: 3,
                ..tiny()
            },
            "norm_num_groups = 3",
        ),
        (
            UnetTrainConfig {
                attention_head_dim: 3,
                ..tiny()
            },
            "attention_head_dim = 3",
        ),
        (
            UnetTrainConfig {
                prediction_type: "sample".into(),
                ..tiny()
            },
            "prediction_type",
        ),
        (
            UnetTrainConfig {
                timestep_spacing: "sideways".into(),
                ..tiny()
            },
            "timestep_spacing",
        ),
        (
            UnetTrainConfig {
                inference_steps: 0,
                ..tiny()
            },
            "inference_steps = 0",
        ),
        (UnetTrainConfig { lr: -1.0, ..tiny() }, "lr = -1"),
    ];
    for (config, needle) in cases {
        let err = config.check(16, 32).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
    // Latents the blocks cannot halve.
    let three = UnetTrainConfig {
        block_out_channels: vec![8, 8, 8, 8, 8],
        down_block_types: vec!["CrossAttnDownBlock2D".into(); 5],
        ..tiny()
    };
    assert!(three
        .check(6, 32)
        .unwrap_err()
        .to_string()
        .contains("latent side 6"));
    // Unknown keys are refused; absent ones take the defaults.
    let err = serde_json::from_str::<UnetTrainConfig>(r#"{"epochs": 2, "epoch": 3}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `epoch`"), "{err}");
    let c: UnetTrainConfig = serde_json::from_str(r#"{"epochs": 2}"#).unwrap();
    assert_eq!(
        c,
        UnetTrainConfig {
            epochs: 2,
            ..UnetTrainConfig::default()
        }
    );
    // Missing inputs are named, and nothing is written.
    let out = scratch("bad");
    let missing = out.join("nowhere");
    let inputs = Inputs {
        vae: missing.clone(),
        text: missing.clone(),
        checker: None,
    };
    let err = diffusion::train_and_save_with(
        &spec,
        &tiny(),
        &inputs,
        &EvalOptions::default(),
        &out,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("nowhere") && err.contains("vae/config.json"),
        "{err}"
    );
    // A bad config with good inputs: named, nothing written.
    let good = scratch("bad-inputs");
    stand_ins(&good);
    let inputs = Inputs {
        vae: good.clone(),
        text: good.clone(),
        checker: None,
    };
    let err = diffusion::train_and_save_with(
        &spec,
        &UnetTrainConfig {
            norm_num_groups: 5,
            ..tiny()
        },
        &inputs,
        &EvalOptions::default(),
        &out,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("norm_num_groups = 5"), "{err}");
    assert!(!out.join("diffusion").exists());
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&good);
}

#[test]
fn scheduler_config_is_one_the_samplers_load() {
    // The shipped config builds every scheduler kind (as `--scheduler` may ask), and DDIM's
    // trailing 4-step schedule starts at the last training timestep.
    let config = UnetTrainConfig::default();
    let sc = config.scheduler_config();
    for kind in [
        SchedulerKind::Ddim,
        SchedulerKind::Lcm,
        SchedulerKind::EulerAncestral,
    ] {
        let mut s = kind.build(&sc).unwrap();
        s.set_timesteps(4).unwrap();
    }
    let schedule = trainer::NoiseSchedule::of(&config).unwrap();
    assert_eq!(schedule.inference_timesteps, vec![999, 749, 499, 249]);
}
