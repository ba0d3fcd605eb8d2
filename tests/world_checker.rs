//! The attribute checker (ShapesWorld II): its loss falls in a few steps, its folder loads back
//! with the same readings, and bad folders and mismatched worlds give clear errors.

use candle_core::{Device, Tensor};
use diffexplainer::world::checker::{self, CheckerConfig};
use diffexplainer::world::classifier::Trainable;
use diffexplainer::world::spec::WorldSpec;

fn tiny_config() -> CheckerConfig {
    CheckerConfig {
        train_images: 64,
        eval_images: 32,
        epochs: 1,
        batch_size: 32,
        stem_width: 4,
        widths: [4, 8, 8, 8],
        strides: [2, 2, 2, 1],
        ..CheckerConfig::default()
    }
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dx-checker-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn heads_follow_the_spec_vocabularies() {
    let spec = WorldSpec::default_world();
    let heads = checker::heads(&spec);
    let names: Vec<&str> = heads.iter().map(|h| h.attribute.as_str()).collect();
    assert_eq!(names, ["shape", "color", "texture", "background"]);
    assert_eq!(heads[0].values, spec.classes);
    assert_eq!(heads[3].values, spec.attributes.backgrounds);
}

#[test]
fn multi_head_loss_is_the_mean_of_the_heads_cross_entropies() {
    let spec = WorldSpec::default_world();
    let heads = checker::heads(&spec);
    let total: usize = heads.iter().map(|h| h.values.len()).sum();
    let logits = diffexplainer::testing::pseudo_random_tensor(&[3, total], 2.0, 1, &Device::Cpu)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let labels = Tensor::new(&[[0u32, 1, 2, 3], [5, 0, 0, 7], [2, 5, 1, 0]], &Device::Cpu).unwrap();
    let loss = checker::multi_head_loss(&heads, &logits, &labels)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // By hand: -log softmax over each head's slice.
    let l = logits.to_vec2::<f32>().unwrap();
    let lab = labels.to_vec2::<u32>().unwrap();
    let mut want = 0.0f64;
    for (row, y) in l.iter().zip(&lab) {
        let mut off = 0;
        for (k, h) in heads.iter().enumerate() {
            let s = &row[off..off + h.values.len()];
            let m = s.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = m + s.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            want += lse - s[y[k] as usize] as f64;
            off += h.values.len();
        }
    }
    want /= (3 * heads.len()) as f64;
    assert!((loss as f64 - want).abs() < 1e-5, "{loss} vs {want}");
}

#[test]
fn a_few_steps_lower_the_loss() {
    let spec = WorldSpec::default_world();
    let heads = checker::heads(&spec);
    let config = tiny_config();
    let (images, samples) = checker::balanced_images(&spec, config.train_start(&spec), 64).unwrap();
    let labels: Vec<u32> = checker::labels_of(&heads, &samples)
        .unwrap()
        .into_iter()
        .flatten()
        .map(|v| v as u32)
        .collect();
    let labels = Tensor::from_vec(labels, (64, heads.len()), &Device::Cpu).unwrap();
    let model = Trainable::new(&config.resnet_config(&heads), 0).unwrap();
    let train = diffexplainer::world::train::TrainConfig {
        epochs: 20,
        batch_size: 64,
        lr: 1e-2,
        weight_decay: 0.0,
        seed: 0,
        checkpoint_every: 0,
    };
    let report = checker::train_on(
        &model,
        &heads,
        &images,
        &labels,
        &checker::preprocess(&spec),
        &train,
        None,
        false,
    )
    .unwrap();
    let l = &report.step_losses;
    assert!(l[l.len() - 1] < 0.9 * l[0], "the loss did not fall: {l:?}");
}

#[test]
fn the_saved_folder_loads_with_the_same_readings_and_refuses_other_worlds() {
    let spec = WorldSpec::default_world();
    let dir = scratch("folder");
    let record = checker::train_and_save(&spec, &tiny_config(), &dir, false).unwrap();
    assert_eq!(record.heldout_accuracy.len(), 4);
    assert_eq!(record.heldout_accuracy[0].1.total, 32);
    assert!(
        !dir.join("checkpoint").exists(),
        "the checkpoint is removed at the end"
    );
    let c = checker::load_checker(&dir).unwrap();
    c.check_fits(&spec).unwrap();
    let (images, samples) = checker::balanced_images(&spec, 0, 32).unwrap();
    let acc = c
        .accuracy(&images, &checker::labels_of(&c.heads, &samples).unwrap())
        .unwrap();
    let recorded: Vec<_> = record.heldout_accuracy.iter().map(|(_, a)| *a).collect();
    assert_eq!(
        acc, recorded,
        "the loaded checker reads the held-out images as when trained"
    );

    // Another world (one background fewer) is refused, naming the heads.
    let mut other = spec.clone();
    other.attributes.backgrounds.pop();
    let err = c.check_fits(&other).unwrap_err().to_string();
    assert!(err.contains("heads"), "{err}");
    // Wrong image size.
    let err = c
        .read(&Tensor::zeros((1, 3, 16, 16), candle_core::DType::F32, &Device::Cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("[n, 3, 32, 32]"), "{err}");
}

#[test]
fn bad_folders_and_configs_are_named() {
    let dir = scratch("bad");
    let err = checker::load_checker(&dir.join("nope"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a checker folder"), "{err}");
    // The classifier under audit's folder is a classifier, not a checker.
    let classifier =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/world/classifier");
    if classifier.join("config.json").is_file() {
        let err = checker::load_checker(&classifier)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no `metadata.heads`"), "{err}");
    }
    let bad = CheckerConfig {
        train_images: 0,
        ..CheckerConfig::default()
    };
    assert!(bad
        .check()
        .unwrap_err()
        .to_string()
        .contains("train_images = 0"));
    let spec = WorldSpec::default_world();
    let err = checker::train_and_save(&spec, &bad, &dir, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("train_images"), "{err}");
    assert!(
        !dir.join("config.json").exists(),
        "nothing is written for a bad config"
    );
}
