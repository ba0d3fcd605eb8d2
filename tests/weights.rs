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
    // An ONNX file (protobuf): refused by content, naming the file and its first bytes.
    let onnx = dir.join("model.onnx");
    std::fs::write(&onnx, b"\x08\x07\x12\x07pytorch\x1a\x052.1.0").unwrap();
    let err = Checkpoint::open(&onnx).err().unwrap().to_string();
    assert!(
        err.contains("model.onnx")
            && err.contains("not a checkpoint format")
            && err.contains("08 07 12 07"),
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

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn all_tensors(c: &Checkpoint) -> Vec<(String, Vec<usize>, DType, Vec<f64>)> {
    c.names()
        .into_iter()
        .map(|n| {
            let t = c.tensor(&n).unwrap();
            let v = t
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            (n, t.dims().to_vec(), t.dtype(), v)
        })
        .collect()
}

/// The 2019-era robustness layout saved by torch's legacy serialization
/// (`_use_new_zipfile_serialization=False`) under the name such checkpoints carry
/// (`.pth.tar`): the same tensors, bit for bit, as the zip-format copy.
#[test]
fn legacy_torch_save_loads_exactly_what_the_zip_copy_gives() {
    use diffexplainer::weights::Format;
    let legacy = fixture("robust_resnet_tiny_legacy.pth.tar");
    let zip = fixture("robust_resnet_tiny.pt");
    assert_eq!(Format::detect(&legacy).unwrap(), Format::TorchLegacy);
    assert_eq!(Format::detect(&zip).unwrap(), Format::TorchZip);
    let a = all_tensors(&Checkpoint::open_pickle(&legacy, Some("model")).unwrap());
    let b = all_tensors(&Checkpoint::open_pickle(&zip, Some("model")).unwrap());
    assert!(a.len() > 100, "{} tensors", a.len());
    assert_eq!(a, b);
    // A missing entry names the entries there are.
    let err = Checkpoint::open_pickle(&legacy, Some("state_dict"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("state_dict") && err.contains("model") && err.contains("epoch"),
        "{err}"
    );
}

/// Views: a transposed tensor, a slice at an offset, a row sharing its base's storage, f16,
/// f64 and i64, in both formats, against the values torch wrote (`contiguous()` copies).
#[test]
fn tensor_views_are_rebuilt_in_both_torch_formats() {
    let expected = Checkpoint::open(fixture("torch_views_expected.safetensors")).unwrap();
    let want = all_tensors(&expected);
    assert_eq!(want.len(), 7);
    for file in ["torch_views_legacy.pt", "torch_views_zip.pt"] {
        let got = all_tensors(&Checkpoint::open(fixture(file)).unwrap());
        assert_eq!(got, want, "{file}");
    }
}

/// The format comes from the content: the same bytes load under any name, and a file that is
/// no checkpoint is refused naming the file and what it holds.
#[test]
fn format_is_chosen_by_content_not_name() {
    let dir = std::env::temp_dir().join(format!("dx-weights-names-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let want = all_tensors(&Checkpoint::open(fixture("resnet_tiny_plain.pth")).unwrap());
    for (src, name) in [
        ("resnet_tiny_plain.pth", "model_best.pth.tar"),
        ("resnet_tiny_plain.pth", "weights"),
        ("torch_views_legacy.pt", "old.ckpt"),
    ] {
        let path = dir.join(name);
        std::fs::copy(fixture(src), &path).unwrap();
        let c = Checkpoint::open(&path).unwrap();
        if src == "resnet_tiny_plain.pth" {
            assert_eq!(all_tensors(&c), want, "{name}");
        } else {
            assert_eq!(c.names().len(), 7, "{name}");
        }
    }
    let st = dir.join("model.bin");
    std::fs::copy(fixture("torch_views_expected.safetensors"), &st).unwrap();
    assert_eq!(Checkpoint::open(&st).unwrap().names().len(), 7);

    for (name, bytes, says) in [
        (
            "page.pth",
            b"<!DOCTYPE html><html>".to_vec(),
            "<!DOCTYPE html>",
        ),
        (
            "lfs.safetensors",
            b"version https://git-lfs.github.com/spec/v1\n".to_vec(),
            "Git LFS pointer",
        ),
        ("empty.pt", vec![], "empty"),
        (
            "plain.pkl",
            vec![0x80, 0x04, 0x95, 0, 0, 0, 0, 0, 0, 0, 0, b'.'],
            "pickle",
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();
        let err = Checkpoint::open(&path).err().unwrap().to_string();
        assert!(err.contains(name) && err.contains(says), "{name}: {err}");
    }
}

/// The classifier loader (entry and prefix probing) reads the legacy copy as the zip one.
#[test]
fn classifier_checkpoint_from_a_legacy_pth_tar() {
    use diffexplainer::models::classifiers::open_checkpoint;
    let (legacy, norm_a) =
        open_checkpoint(&fixture("robust_resnet_tiny_legacy.pth.tar"), "fc.weight").unwrap();
    let (zip, norm_b) = open_checkpoint(&fixture("robust_resnet_tiny.pt"), "fc.weight").unwrap();
    assert_eq!(legacy.prefix(), "module.model.");
    assert_eq!(format!("{norm_a:?}"), format!("{norm_b:?}"));
    assert!(norm_a.is_some());
    assert_eq!(
        values(&legacy.tensor("fc.weight").unwrap()),
        values(&zip.tensor("fc.weight").unwrap())
    );
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// An interrupted download: the file ends inside its tensor data, or inside its header. Both are
/// named as a file cut short, with the byte counts, wherever the cut falls.
#[test]
fn a_truncated_safetensors_file_is_named_as_cut_short() {
    let t = Tensor::arange(0f32, 64., &Device::Cpu)
        .unwrap()
        .reshape((8, 8))
        .unwrap();
    let whole = std::fs::read(temp_safetensors("whole.safetensors", &[("w", t)])).unwrap();
    let header = u64::from_le_bytes(whole[..8].try_into().unwrap()) as usize + 8;
    let dir = std::env::temp_dir().join(format!("diffexplainer-weights-{}", std::process::id()));
    for (name, keep, expected) in [
        (
            "in-data.safetensors",
            header + 100,
            "describes 256 bytes of tensor data but the file holds 100",
        ),
        ("in-header.safetensors", header - 5, "header alone needs"),
    ] {
        let cut = dir.join(name);
        std::fs::write(&cut, &whole[..keep]).unwrap();
        let err = Checkpoint::open(&cut).err().unwrap().to_string();
        assert!(
            err.contains(name) && err.contains("cut short") && err.contains(expected),
            "{err}"
        );
    }
}
