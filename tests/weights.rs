//! Checkpoint loading: errors name the file, the key and both shapes.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use diffexplainer::weights::Checkpoint;

fn temp_safetensors(name: &str, tensors: &[(&str, Tensor)]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("diffexplainer-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

#[test]
fn shape_mismatch_names_file_key_and_both_shapes() {
    let path = temp_safetensors(
        "shape.safetensors",
        &[(
            "fc.weight",
            Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap(),
        )],
    );
    let vb = Checkpoint::open(&path)
        .unwrap()
        .into_var_builder(DType::F32, &Device::Cpu);
    let err = vb.pp("fc").get((5, 3), "weight").unwrap_err().to_string();
    assert!(err.contains("shape.safetensors"), "{err}");
    assert!(err.contains("fc.weight"), "{err}");
    assert!(err.contains("[4, 3]") && err.contains("[5, 3]"), "{err}");
}

#[test]
fn missing_tensor_names_file_and_key_and_suggests() {
    let path = temp_safetensors(
        "missing.safetensors",
        &[(
            "encoder.fc.weight",
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        )],
    );
    let vb = Checkpoint::open(&path)
        .unwrap()
        .into_var_builder(DType::F32, &Device::Cpu);
    let err = vb.pp("fc").get(2, "weight").unwrap_err().to_string();
    assert!(
        err.contains("missing.safetensors") && err.contains("`fc.weight`"),
        "{err}"
    );
    assert!(
        err.contains("encoder.fc.weight"),
        "suggestion missing: {err}"
    );
}

#[test]
fn corrupt_and_absent_files_are_errors_naming_the_path() {
    let dir = std::env::temp_dir().join(format!("diffexplainer-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corrupt = dir.join("corrupt.safetensors");
    std::fs::write(&corrupt, b"this is not a safetensors file").unwrap();
    let err = Checkpoint::open(&corrupt)
        .err()
        .expect("corrupt file must fail")
        .to_string();
    assert!(err.contains("corrupt.safetensors"), "{err}");
    let corrupt_pt = dir.join("corrupt.pt");
    std::fs::write(&corrupt_pt, b"PK\x03\x04 garbage").unwrap();
    let err = Checkpoint::open(&corrupt_pt)
        .err()
        .expect("corrupt pickle must fail")
        .to_string();
    assert!(err.contains("corrupt.pt"), "{err}");
    let err = Checkpoint::open(dir.join("absent.safetensors"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("absent.safetensors") && err.contains("not found"),
        "{err}"
    );
    let err = Checkpoint::open(dir.join("model.onnx"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.onnx") && err.contains("unknown checkpoint format"),
        "{err}"
    );
}

#[test]
fn prefix_selects_a_sub_model() {
    let path = temp_safetensors(
        "prefixed.safetensors",
        &[
            (
                "module.model.fc.bias",
                Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap(),
            ),
            (
                "module.attacker.model.fc.bias",
                Tensor::new(&[9f32, 9.0], &Device::Cpu).unwrap(),
            ),
        ],
    );
    let vb = Checkpoint::open(&path)
        .unwrap()
        .with_prefix("module.model.")
        .into_var_builder(DType::F32, &Device::Cpu);
    assert_eq!(
        vb.pp("fc")
            .get(2, "bias")
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        vec![1.0, 2.0]
    );
}
