//! The world's autoencoder (ShapesWorld II): a few steps lower the loss, the written `vae/`
//! folder loads through the diffusers-layout loader with the same outputs, a resumed run ends
//! with the weights of an uninterrupted one, and bad configs are refused by name.

use candle_core::{DType, Device, Tensor};
use diffexplainer::models::vae::AutoencoderKL;
use diffexplainer::world::autoencoder::{self, TrainableVae, VaeTrainConfig};
use diffexplainer::world::checker;
use diffexplainer::world::spec::WorldSpec;
use diffexplainer::world::train::Checkpointing;

fn tiny() -> VaeTrainConfig {
    VaeTrainConfig {
        train_images: 32,
        eval_images: 8,
        epochs: 6,
        batch_size: 16,
        lr: 3e-3,
        block_out_channels: vec![8, 8],
        norm_num_groups: 4,
        eval_every: 0,
        ..VaeTrainConfig::default()
    }
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dx-vae-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn train_tiny(config: &VaeTrainConfig, ckpt: Option<&Checkpointing>) -> (TrainableVae, Vec<f32>) {
    let spec = WorldSpec::default_world();
    let (images, _) = checker::balanced_images(&spec, 2000, config.train_images).unwrap();
    let model =
        TrainableVae::new(&config.model_config(spec.image_size).unwrap(), config.seed).unwrap();
    let report =
        autoencoder::train_on(&model, &images, config, ckpt, false, 0, 0, |_, _| Ok(())).unwrap();
    (model, report.step_losses)
}

fn bits(model: &TrainableVae) -> Vec<(String, Vec<u32>)> {
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

#[test]
fn a_few_steps_lower_the_loss() {
    // The default architecture (no mid-block attention), 24 steps of 16 images.
    let config = VaeTrainConfig {
        epochs: 12,
        ..tiny()
    };
    let (_, losses) = train_tiny(&config, None);
    let last4 = losses[losses.len() - 4..].iter().sum::<f32>() / 4.0;
    assert!(last4 < 0.8 * losses[0], "the loss did not fall: {losses:?}");
}

#[test]
fn every_parameter_gets_a_gradient() {
    for attention in [false, true] {
        every_parameter_gets_a_gradient_with(attention);
    }
}

fn every_parameter_gets_a_gradient_with(mid_block_add_attention: bool) {
    let spec = WorldSpec::default_world();
    let config = VaeTrainConfig {
        mid_block_add_attention,
        ..tiny()
    };
    let model = TrainableVae::new(&config.model_config(spec.image_size).unwrap(), 0).unwrap();
    let names: Vec<String> = model.vars().unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names.iter().any(|n| n.contains("mid_block.attentions")),
        mid_block_add_attention,
        "{names:?}"
    );
    let (x, _) = checker::balanced_images(&spec, 0, 4).unwrap();
    let eps = Tensor::zeros((4, 4, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let (loss, _, _) =
        autoencoder::loss(&model.vae, &x, &eps, config.reconstruction, 1e-2).unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in model.vars().unwrap() {
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
    let full = VaeTrainConfig {
        checkpoint_every: 4,
        ..tiny()
    };
    let (a, _) = train_tiny(&full, None);
    // Interrupted before step 6 (a failing measurement stops training), after the step-4
    // checkpoint; then rerun to the end from it.
    let dir = scratch("resume");
    let ckpt = Checkpointing { dir: dir.clone() };
    let spec = WorldSpec::default_world();
    let (images, _) = checker::balanced_images(&spec, 2000, full.train_images).unwrap();
    let model = TrainableVae::new(&full.model_config(spec.image_size).unwrap(), full.seed).unwrap();
    let r = autoencoder::train_on(
        &model,
        &images,
        &full,
        Some(&ckpt),
        false,
        0,
        1,
        |step, _| {
            if step == 6 {
                anyhow::bail!("interrupted")
            }
            Ok(())
        },
    );
    assert!(r.unwrap_err().to_string().contains("interrupted"));
    let model = TrainableVae::new(&full.model_config(spec.image_size).unwrap(), full.seed).unwrap();
    let report = autoencoder::train_on(&model, &images, &full, Some(&ckpt), false, 4, 0, |_, _| {
        Ok(())
    })
    .unwrap();
    assert_eq!(report.resumed_at, 4);
    assert_eq!(bits(&a), bits(&model));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_vae_folder_loads_through_the_diffusers_loader() {
    let spec = WorldSpec::default_world();
    let dir = scratch("folder");
    let config = VaeTrainConfig {
        epochs: 1,
        ..tiny()
    };
    let record = autoencoder::train_and_save(&spec, &config, &dir, false).unwrap();
    assert_eq!(record.latent_size, 16);
    assert!(record.scaling_factor.is_finite() && record.scaling_factor > 0.0);
    assert!(dir.join("vae/config.json").is_file());
    assert!(dir
        .join("vae/diffusion_pytorch_model.safetensors")
        .is_file());
    assert!(!dir.join("vae/checkpoint").exists());
    let vae = AutoencoderKL::from_pretrained(&dir, None, DType::F32, &Device::Cpu).unwrap();
    assert!((vae.config.scaling_factor - record.scaling_factor).abs() < 1e-12);
    let (x, _) = checker::balanced_images(&spec, 0, 2).unwrap();
    let y = autoencoder::round_trip(&vae, &x).unwrap();
    assert_eq!(y.dims(), &[2, 3, 32, 32]);
    let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|p| (0.0..=1.0).contains(p)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_configs_are_named() {
    let c = VaeTrainConfig {
        norm_num_groups: 5,
        ..tiny()
    };
    let e = c.check(32).unwrap_err().to_string();
    assert!(e.contains("norm_num_groups = 5"), "{e}");
    let c = VaeTrainConfig {
        block_out_channels: vec![8, 8, 8, 8, 8, 8, 8],
        norm_num_groups: 4,
        ..tiny()
    };
    let e = c.check(32).unwrap_err().to_string();
    assert!(e.contains("not divisible by 64"), "{e}");
    let c = VaeTrainConfig {
        kl_weight: -1.0,
        ..tiny()
    };
    assert!(c.check(32).unwrap_err().to_string().contains("kl_weight"));
    let spec = WorldSpec::default_world();
    let dir = scratch("bad");
    let c = VaeTrainConfig {
        train_images: 0,
        ..tiny()
    };
    let e = autoencoder::train_and_save(&spec, &c, &dir, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("train_images = 0"), "{e}");
    assert!(
        !dir.join("vae").exists(),
        "nothing is written for a bad config"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_files_take_defaults_and_refuse_unknown_keys() {
    let c: VaeTrainConfig = serde_json::from_str(r#"{"epochs": 2}"#).unwrap();
    assert_eq!(
        c,
        VaeTrainConfig {
            epochs: 2,
            ..VaeTrainConfig::default()
        }
    );
    let e = serde_json::from_str::<VaeTrainConfig>(r#"{"mid_block_attention": false}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `mid_block_attention`"), "{e}");
    let c = VaeTrainConfig {
        curve_images: 0,
        ..tiny()
    };
    assert!(c.check(32).is_ok(), "no curve without eval_every");
    let c = VaeTrainConfig {
        curve_images: 0,
        eval_every: 5,
        ..tiny()
    };
    let e = c.check(32).unwrap_err().to_string();
    assert!(e.contains("curve_images = 0"), "{e}");
}
