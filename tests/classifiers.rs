//! Image classifiers: input gradients by finite differences (f64), loading the checkpoint
//! layouts we meet (bare torchvision state dict, the `robustness` library's wrapped training
//! checkpoint), and the errors bad input gets.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use diffexplainer::models::classifiers::{
    Classifier, ClassifierConfig, Normalization, Preprocess, ResNetConfig, VggConfig, VitConfig,
};
use diffexplainer::testing::check_gradient;
use diffexplainer::weights::Checkpoint;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn case_dir(name: &str) -> PathBuf {
    root().join("tests/parity/cases").join(name)
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// A parity case's model with its weights in `dtype`.
fn case_model(name: &str, dtype: DType) -> Classifier {
    let dir = case_dir(name);
    let config = match name {
        n if n.starts_with("resnet") => {
            ClassifierConfig::ResNet(read_json::<ResNetConfig>(&dir.join("config.json")))
        }
        n if n.starts_with("vgg") => {
            ClassifierConfig::Vgg(read_json::<VggConfig>(&dir.join("config.json")))
        }
        _ => ClassifierConfig::Vit(read_json::<VitConfig>(&dir.join("config.json"))),
    };
    let vb = Checkpoint::open(dir.join("weights.safetensors"))
        .unwrap()
        .into_var_builder(dtype, &Device::Cpu);
    Classifier::new(vb, &config).unwrap()
}

fn rel_error(ours: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(ours.dims(), want.dims());
    let diff = (ours.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let scale = want
        .to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    diff / scale
}

/// Finite differences of `sum(c · output)` over the logits and every hidden tap at once, so a
/// gradient cut on any path shows.
fn gradcheck(case: &str, input: &str, preprocess: Option<Preprocess>) {
    let model = case_model(case, DType::F64);
    let x = load_tensors(&case_dir(case).join("inputs.safetensors"))[input]
        .to_dtype(DType::F64)
        .unwrap();
    let f = |x: &Tensor| {
        let x = match &preprocess {
            Some(p) => p.forward(x)?,
            None => x.clone(),
        };
        let out = model.forward(&x)?;
        let mut parts = vec![out.logits.flatten_all()?, out.features.flatten_all()?];
        for t in out.hidden.values() {
            parts.push(t.flatten_all()?);
        }
        Tensor::cat(&parts, 0)
    };
    let check = check_gradient(f, &x, 1e-6, 48).unwrap();
    assert!(check.scale > 0.0, "{case}: zero gradient proves nothing");
    assert!(
        check.max_rel_error < 1e-6,
        "{case}: finite-difference mismatch {check:?}"
    );
}

#[test]
fn resnet_basic_input_gradient_matches_finite_differences() {
    gradcheck("resnet18_tiny", "pixel_values", None);
}

#[test]
fn resnet_bottleneck_input_gradient_through_preprocess_matches_finite_differences() {
    let p = Preprocess {
        size: Some(36),
        ..Preprocess::imagenet(36)
    };
    gradcheck("resnet50_tiny_preprocess", "image", Some(p));
}

#[test]
fn vgg_input_gradient_matches_finite_differences() {
    gradcheck("vgg16_tiny", "pixel_values", None);
}

#[test]
fn vit_input_gradient_matches_finite_differences() {
    gradcheck("vit_tiny", "pixel_values", None);
}

fn robust_config() -> ClassifierConfig {
    ClassifierConfig::ResNet(read_json(&fixture("robust_resnet_tiny.json")))
}

/// The Salient ImageNet layout: `{"model": {"module.model.*", "module.attacker.model.*",
/// "module.normalizer.*"}, ...}`.
#[test]
fn robust_resnet_checkpoint_loads_and_matches_reference_logits() {
    let model = Classifier::load_with_config(
        &robust_config(),
        fixture("robust_resnet_tiny.pt"),
        &Device::Cpu,
    )
    .unwrap();
    let expected = load_tensors(&fixture("robust_resnet_tiny_expected.safetensors"));
    let logits = model.forward(&expected["pixel_values"]).unwrap().logits;
    let rel = rel_error(&logits, &expected["logits"]);
    assert!(rel < 1e-4, "robust resnet logits rel error {rel:e}");

    // The checkpoint's own normalizer, applied by our preprocessing, gives its pixel values.
    assert_eq!(model.normalization, Normalization::IMAGENET);
    let p = Preprocess {
        size: None,
        ..model.preprocess(32)
    };
    let pixels = p.forward(&expected["image"]).unwrap();
    let rel = rel_error(&pixels, &expected["pixel_values"]);
    assert!(rel < 1e-6, "normalized pixels rel error {rel:e}");
}

/// A bare torchvision state dict (`torch.save(model.state_dict())`), here resnet18_tiny's weights.
#[test]
fn plain_state_dict_loads() {
    let config =
        ClassifierConfig::ResNet(read_json(&case_dir("resnet18_tiny").join("config.json")));
    let model =
        Classifier::load_with_config(&config, fixture("resnet_tiny_plain.pth"), &Device::Cpu)
            .unwrap();
    let inputs = load_tensors(&case_dir("resnet18_tiny").join("inputs.safetensors"));
    let expected = load_tensors(&case_dir("resnet18_tiny").join("expected.safetensors"));
    let logits = model.forward(&inputs["pixel_values"]).unwrap().logits;
    let rel = rel_error(&logits, &expected["logits"]);
    assert!(rel < 1e-4, "plain state dict logits rel error {rel:e}");
}

#[test]
fn config_checkpoint_shape_mismatch_names_file_key_and_shapes() {
    let ClassifierConfig::ResNet(mut cfg) = robust_config() else {
        unreachable!()
    };
    cfg.num_classes += 1;
    let err = Classifier::load_with_config(
        &ClassifierConfig::ResNet(cfg.clone()),
        fixture("robust_resnet_tiny.pt"),
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("robust_resnet_tiny.pt"), "{err}");
    assert!(err.contains("module.model.fc.weight"), "{err}");
    let (n, c) = (cfg.num_classes, cfg.feature_dim());
    assert!(
        err.contains(&format!("[{}, {c}]", n - 1)) && err.contains(&format!("[{n}, {c}]")),
        "{err}"
    );
}

#[test]
fn checkpoint_of_another_architecture_is_named() {
    let err = Classifier::load("vit_b_16", fixture("resnet_tiny_plain.pth"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("resnet_tiny_plain.pth") && err.contains("heads.head.weight"),
        "{err}"
    );
}

#[test]
fn missing_checkpoint_is_named() {
    let err = Classifier::load("resnet50", fixture("no_such_file.pt"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no_such_file.pt") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn unknown_architecture_lists_known_ones() {
    let err = Classifier::load("resnet51", fixture("resnet_tiny_plain.pth"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`resnet51`"), "{err}");
    for known in ["resnet18", "resnet50", "vgg16", "vit_b_16"] {
        assert!(err.contains(known), "{err}");
    }
}

#[test]
fn class_id_out_of_range_names_it_and_the_range() {
    let model = case_model("resnet18_tiny", DType::F32);
    let inputs = load_tensors(&case_dir("resnet18_tiny").join("inputs.safetensors"));
    let out = model.forward(&inputs["pixel_values"]).unwrap();
    assert_eq!(out.logit(9).unwrap().dims(), &[2]);
    let err = out.logit(10).unwrap_err().to_string();
    assert!(err.contains("10") && err.contains("0..=9"), "{err}");
    assert!(model.check_class(10).is_err() && model.check_class(9).is_ok());
    let err = out.tap("layer5").unwrap_err().to_string();
    assert!(err.contains("layer5") && err.contains("layer4"), "{err}");
}

#[test]
fn vit_rejects_wrong_image_size() {
    let model = case_model("vit_tiny", DType::F32);
    let x = Tensor::zeros((1, 3, 48, 48), DType::F32, &Device::Cpu).unwrap();
    let err = model.forward(&x).unwrap_err().to_string();
    assert!(err.contains("32") && err.contains("48"), "{err}");
}

#[test]
fn presets_have_torchvision_shapes() {
    assert_eq!(ResNetConfig::resnet18().feature_dim(), 512);
    assert_eq!(ResNetConfig::resnet50().feature_dim(), 2048);
    assert_eq!(VggConfig::vgg16().out_channels(), 512);
    assert_eq!(VitConfig::vit_b_16().seq_len(), 197);
    let cfg: VggConfig = serde_json::from_str(
        r#"{"cfg": [4, "M"], "batch_norm": true, "hidden": 8, "num_classes": 2}"#,
    )
    .unwrap();
    assert_eq!(serde_json::to_string(&cfg.cfg).unwrap(), r#"[4,"M"]"#);
    assert!(serde_json::from_str::<VggConfig>(
        r#"{"cfg": [4, "X"], "batch_norm": true, "hidden": 8, "num_classes": 2}"#
    )
    .is_err());
}

/// A classifier folder whose config.json has values no classifier can run with is refused,
/// naming the file and the field, before any weights are read.
#[test]
fn classifier_folder_config_values_are_checked() {
    let src = root().join("lib/assets/world/classifier");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let cases: [(&str, serde_json::Value, &str); 4] = [
        ("input_size", serde_json::json!(0), "input_size = 0"),
        ("std", serde_json::json!([0.229, 0.0, 0.225]), "std[1] = 0"),
        (
            "std",
            serde_json::json!([-1.0, 0.224, 0.225]),
            "std[0] = -1",
        ),
        (
            "mean",
            serde_json::json!([0.485, 0.456, 1e39]),
            "mean[2] = inf",
        ),
    ];
    for (i, (field, value, expected)) in cases.into_iter().enumerate() {
        let dir = std::env::temp_dir().join(format!(
            "classifier_folder_check_{}_{i}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = config.clone();
        c[field] = value;
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        // No weights file: the config must be refused first.
        let err = Classifier::from_dir(&dir, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(expected), "{field}: {err}");
        assert!(err.contains("config.json"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
