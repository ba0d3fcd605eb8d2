//! The CLIP vision tower: the gradient with respect to the pixels against central finite
//! differences in f64 (at the model's size and with interpolated positions), the hidden-state
//! taps, loading without the `vision_model.` prefix, and input errors. Weights: the
//! `clip_vision_*` parity cases' (transformers-initialized then randomized, 3 layers, width 32,
//! 16 px images of 4 px patches).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use diffexplainer::models::clip_vision::{
    ClipVisionConfig, ClipVisionModel, ClipVisionModelWithProjection, ClipVisionOptions,
    ClipVisionOutput,
};
use diffexplainer::testing::{check_gradient, pseudo_random_tensor};
use diffexplainer::weights::Checkpoint;

const QUICK: &str = "clip_vision_quickgelu";
const GELU: &str = "clip_vision_gelu_interpolated";

fn case_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/parity/cases")
        .join(name)
}

fn load(name: &str, dtype: DType) -> ClipVisionModelWithProjection {
    let dir = case_dir(name);
    let cfg = ClipVisionConfig::from_file(dir.join("config.json")).unwrap();
    let vb = Checkpoint::open_safetensors(&[dir.join("weights.safetensors")])
        .unwrap()
        .into_var_builder(dtype, &Device::Cpu);
    ClipVisionModelWithProjection::new(vb, &cfg).unwrap()
}

/// Every output in one vector, so the finite-difference cotangent weighs each.
fn all_outputs(model: &ClipVisionModelWithProjection, out: &ClipVisionOutput) -> Result<Tensor> {
    let mut parts = vec![
        out.last_hidden_state.flatten_all()?,
        out.pooler_output.flatten_all()?,
        model.image_embeds(&out.pooler_output)?.flatten_all()?,
    ];
    for h in out.hidden_states.values() {
        parts.push(h.flatten_all()?);
    }
    Tensor::cat(&parts, 0)
}

#[test]
fn pixel_gradient_matches_finite_differences() {
    for (case, (h, w), interpolate) in [(QUICK, (16, 16), false), (GELU, (24, 20), true)] {
        let model = load(case, DType::F64);
        let options = ClipVisionOptions {
            hidden_states: vec![0, 2],
            interpolate_pos_encoding: interpolate,
        };
        let pixels = pseudo_random_tensor(&[1, 3, h, w], 1.0, 3, &Device::Cpu).unwrap();
        let check = check_gradient(
            |x| all_outputs(&model, &model.vision_model.forward_with(x, &options)?),
            &pixels,
            1e-6,
            48,
        )
        .unwrap();
        assert_eq!(check.checked, 48);
        assert!(
            check.scale > 1e-3,
            "{case}: pixel gradient ~0 ({:.3e})",
            check.scale
        );
        assert!(
            check.max_rel_error < 1e-6,
            "{case}: pixel gradient vs finite differences: rel error {:.3e}",
            check.max_rel_error
        );
    }
}

#[test]
fn hidden_states_match_the_full_forward_and_stop_early() {
    let model = load(QUICK, DType::F32);
    let pixels = pseudo_random_tensor(&[2, 3, 16, 16], 1.0, 4, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let options = ClipVisionOptions {
        hidden_states: vec![0, 1, 2, 3],
        interpolate_pos_encoding: false,
    };
    let full = model.vision_model.forward_with(&pixels, &options).unwrap();
    // The last hidden state is the last layer's output.
    let diff = common::max_abs_diff(&full.hidden_states[&3], &full.last_hidden_state);
    assert_eq!(diff, 0.0);
    let taps = model
        .vision_model
        .hidden_states(&pixels, &[2, 1], false)
        .unwrap();
    for (tap, i) in taps.iter().zip([2, 1]) {
        let d = common::max_abs_diff(tap, &full.hidden_states[&i]);
        assert_eq!(d, 0.0, "hidden state {i}");
        assert_eq!(tap.dims(), &[2, 17, 32]);
    }
}

#[test]
fn loads_without_the_vision_model_prefix() {
    let dir = case_dir(QUICK);
    let cfg = ClipVisionConfig::from_file(dir.join("config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("weights.safetensors"), &Device::Cpu).unwrap();
    let bare: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("vision_model.").map(|k| (k.to_string(), v)))
        .collect();
    let vb = candle_nn::VarBuilder::from_tensors(bare, DType::F32, &Device::Cpu);
    let ours = ClipVisionModel::new(vb, &cfg).unwrap();
    let reference = load(QUICK, DType::F32);
    let pixels = pseudo_random_tensor(&[1, 3, 16, 16], 1.0, 5, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let a = ours.forward(&pixels).unwrap().pooler_output;
    let b = reference
        .vision_model
        .forward(&pixels)
        .unwrap()
        .pooler_output;
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn bad_inputs_are_errors_naming_the_problem() {
    let model = load(QUICK, DType::F32);
    let vision = &model.vision_model;
    let wrong_size = Tensor::zeros((1, 3, 20, 16), DType::F32, &Device::Cpu).unwrap();
    let err = vision.forward(&wrong_size).unwrap_err().to_string();
    assert!(err.contains("20x16") && err.contains("16x16"), "{err}");
    let wrong_channels = Tensor::zeros((1, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let err = vision.forward(&wrong_channels).unwrap_err().to_string();
    assert!(err.contains("1 channels"), "{err}");
    let ok = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let err = vision
        .hidden_states(&ok, &[4], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("hidden state 4"), "{err}");
}
