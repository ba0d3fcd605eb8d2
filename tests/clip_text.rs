//! The CLIP text encoder on the soft-prompt path: the gradient with respect to the soft prompt
//! (through `splice` and the whole encoder) against central finite differences in f64,
//! causality, loading variants and input errors. Weights: the `clip_text_*` parity cases'
//! (transformers-initialized, 3 layers, width 32, vocab 99, 16 positions).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor, Var};
use diffexplainer::models::clip_text::{ClipTextConfig, ClipTextModel, ClipTextOutput};
use diffexplainer::ops::Activation;
use diffexplainer::testing::{check_gradient, pseudo_random_tensor};
use diffexplainer::weights::Checkpoint;

/// quick_gelu case: legacy `eos_token_id` 2 (pool at the argmax id), padding with 98.
const QUICK: &str = "clip_text_quickgelu";
/// gelu case: `eos_token_id` 97 (pool at the first 97), padding with 0.
const GELU: &str = "clip_text_gelu";
const PLACEHOLDER: u32 = 50;

fn case_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/parity/cases")
        .join(name)
}

fn load(name: &str, dtype: DType) -> ClipTextModel {
    let dir = case_dir(name);
    let cfg = ClipTextConfig::from_file(dir.join("config.json")).unwrap();
    let vb = Checkpoint::open_safetensors(&[dir.join("weights.safetensors")])
        .unwrap()
        .into_var_builder(dtype, &Device::Cpu);
    ClipTextModel::new(vb, &cfg).unwrap()
}

fn ids(rows: &[&[i64]]) -> Tensor {
    let s = rows[0].len();
    let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), s), &Device::Cpu).unwrap()
}

/// Two prompts with two placeholders each (row 0 consecutive, row 1 not), ended the way each
/// case's config pools: quick_gelu by the highest id 98, gelu by eos 97.
fn prompt(case: &str) -> Tensor {
    let p = PLACEHOLDER as i64;
    if case == QUICK {
        ids(&[
            &[97, 5, p, p, 12, 98, 98, 98],
            &[97, p, 7, p, 33, 21, 98, 98],
        ])
    } else {
        ids(&[&[96, 5, p, p, 12, 97, 0, 0], &[96, p, 7, p, 33, 21, 97, 0]])
    }
}

fn run_soft(model: &ClipTextModel, input_ids: &Tensor, soft: &Tensor) -> Result<ClipTextOutput> {
    let tokens = model.embed_tokens(input_ids)?;
    let embeds = model.splice(&tokens, input_ids, PLACEHOLDER, soft)?;
    model.forward_embeds(&embeds, input_ids)
}

/// All three outputs, flattened into one vector, so the finite-difference cotangent weighs each.
fn all_outputs(out: &ClipTextOutput) -> Result<Tensor> {
    Tensor::cat(
        &[
            out.last_hidden_state.flatten_all()?,
            out.penultimate_hidden_state.flatten_all()?,
            out.pooled.flatten_all()?,
        ],
        0,
    )
}

#[test]
fn soft_prompt_gradient_matches_finite_differences() {
    for case in [QUICK, GELU] {
        let model = load(case, DType::F64);
        let input_ids = prompt(case);
        // Soft vectors at the scale of the token embeddings (transformers' init, std 0.02)
        // would be fine too; larger ones exercise the LayerNorms harder.
        let soft = pseudo_random_tensor(&[2, 32], 0.5, 3, &Device::Cpu).unwrap();
        let check = check_gradient(
            |s| all_outputs(&run_soft(&model, &input_ids, s)?),
            &soft,
            1e-6,
            64,
        )
        .unwrap();
        assert_eq!(check.checked, 64);
        assert!(
            check.scale > 1e-3,
            "{case}: soft-prompt gradient ~0 (scale {:.3e})",
            check.scale
        );
        assert!(
            check.max_rel_error < 1e-6,
            "{case}: soft-prompt gradient vs finite differences: rel error {:.3e}",
            check.max_rel_error
        );
    }
}

#[test]
fn soft_prompt_gradient_is_nonzero_in_f32_for_every_output() {
    let model = load(QUICK, DType::F32);
    let input_ids = prompt(QUICK);
    let soft = Var::from_tensor(
        &pseudo_random_tensor(&[2, 32], 0.02, 5, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    )
    .unwrap();
    let out = run_soft(&model, &input_ids, soft.as_tensor()).unwrap();
    for (name, t) in [
        ("last_hidden_state", &out.last_hidden_state),
        ("penultimate_hidden_state", &out.penultimate_hidden_state),
        ("pooled", &out.pooled),
    ] {
        let cot = pseudo_random_tensor(t.dims(), 1.0, 9, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let grads = t.mul(&cot).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(soft.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient reaches the soft prompt"));
        // Both soft vectors get gradient (row 1's second placeholder is at position 3).
        let per_vector = g.abs().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            per_vector.iter().all(|&v| v > 1e-6),
            "{name}: soft-prompt gradient per vector {per_vector:?}"
        );
    }
}

#[test]
fn changing_the_soft_prompt_changes_only_its_positions_and_after() {
    let model = load(GELU, DType::F64);
    let p = PLACEHOLDER as i64;
    // Placeholders at positions 3 and 4.
    let input_ids = ids(&[&[96, 5, 8, p, p, 12, 97, 0]]);
    let a = pseudo_random_tensor(&[2, 32], 0.5, 1, &Device::Cpu).unwrap();
    let b = pseudo_random_tensor(&[2, 32], 0.5, 2, &Device::Cpu).unwrap();
    let oa = run_soft(&model, &input_ids, &a).unwrap();
    let ob = run_soft(&model, &input_ids, &b).unwrap();
    for (name, ta, tb) in [
        ("last", &oa.last_hidden_state, &ob.last_hidden_state),
        (
            "penultimate",
            &oa.penultimate_hidden_state,
            &ob.penultimate_hidden_state,
        ),
    ] {
        let diff = (ta - tb)
            .unwrap()
            .abs()
            .unwrap()
            .max(2)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (pos, d) in diff.iter().enumerate() {
            if pos < 3 {
                assert_eq!(
                    *d, 0.0,
                    "{name}: position {pos} before the soft prompt changed"
                );
            } else {
                assert!(*d > 1e-6, "{name}: position {pos} did not change ({d:e})");
            }
        }
    }
    let pooled_diff = (&oa.pooled - &ob.pooled)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(
        pooled_diff > 1e-6,
        "the pooled (EOS) state ignores the soft prompt"
    );
}

#[test]
fn splicing_token_embeddings_reproduces_the_tokens() {
    // A soft prompt equal to the embeddings of ids 5 and 7 must encode exactly like those ids.
    let model = load(GELU, DType::F64);
    let p = PLACEHOLDER as i64;
    let with_placeholders = ids(&[&[96, p, 8, p, 97, 0]]);
    let with_tokens = ids(&[&[96, 5, 8, 7, 97, 0]]);
    let soft = model
        .embed_tokens(&ids(&[&[5, 7]]))
        .unwrap()
        .squeeze(0)
        .unwrap();
    let spliced = run_soft(&model, &with_placeholders, &soft).unwrap();
    let plain = model.forward(&with_tokens).unwrap();
    let diff = (&spliced.last_hidden_state - &plain.last_hidden_state)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn pooling_follows_transformers() {
    // Legacy eos 2: the first highest id (98 at position 5; the 2 at position 2 is ignored).
    let model = load(QUICK, DType::F64);
    let input_ids = ids(&[&[97, 12, 2, 45, 7, 98, 98, 98]]);
    let out = model.forward(&input_ids).unwrap();
    let at5 = out.last_hidden_state.get(0).unwrap().get(5).unwrap();
    let diff = (out.pooled.get(0).unwrap() - at5)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert_eq!(diff, 0.0);
    // eos 97: the first 97 (position 3), not the later ones.
    let model = load(GELU, DType::F64);
    let input_ids = ids(&[&[96, 12, 45, 97, 97, 0]]);
    let out = model.forward(&input_ids).unwrap();
    let at3 = out.last_hidden_state.get(0).unwrap().get(3).unwrap();
    let diff = (out.pooled.get(0).unwrap() - at3)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn loads_with_or_without_the_text_model_prefix() {
    let dir = case_dir(GELU);
    let ckpt = Checkpoint::open_safetensors(&[dir.join("weights.safetensors")]).unwrap();
    assert!(ckpt.names().iter().all(|n| n.starts_with("text_model.")));
    let stripped: HashMap<String, Tensor> = ckpt
        .names()
        .iter()
        .map(|n| {
            (
                n.trim_start_matches("text_model.").to_string(),
                ckpt.tensor(n).unwrap(),
            )
        })
        .collect();
    let cfg = ClipTextConfig::from_file(dir.join("config.json")).unwrap();
    let bare = ClipTextModel::new(
        Checkpoint::from_tensors("stripped", stripped).into_var_builder(DType::F64, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let input_ids = ids(&[&[96, 5, 8, 97]]);
    let a = bare.forward(&input_ids).unwrap().pooled;
    let b = load(GELU, DType::F64).forward(&input_ids).unwrap().pooled;
    assert_eq!(
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );
}

#[test]
fn config_parses_text_and_full_clip_configs_and_builds_in_code() {
    let dir = case_dir(QUICK);
    let text: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let from_text = ClipTextConfig::from_value(text.clone()).unwrap();
    let full =
        serde_json::json!({ "model_type": "clip", "text_config": text, "vision_config": {} });
    assert_eq!(ClipTextConfig::from_value(full).unwrap(), from_text);
    let in_code = ClipTextConfig {
        vocab_size: 99,
        hidden_size: 32,
        intermediate_size: 37,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        max_position_embeddings: 16,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
        pad_token_id: Some(1),
        bos_token_id: Some(0),
        eos_token_id: Some(2),
        projection_dim: Some(512),
    };
    assert_eq!(in_code, from_text);
    // transformers' defaults (openai/clip-vit-base-patch32's text tower) for absent fields.
    let defaults = ClipTextConfig::from_value(serde_json::json!({})).unwrap();
    assert_eq!(defaults.vocab_size, 49408);
    assert_eq!(defaults.eos_token_id, Some(49407));
    assert_eq!(defaults.hidden_act, Activation::QuickGelu);
    let gelu = ClipTextConfig::from_value(serde_json::json!({ "hidden_act": "gelu" })).unwrap();
    assert_eq!(gelu.hidden_act, Activation::Gelu);
}

fn err_text<T>(r: Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_inputs_are_named() {
    let model = load(GELU, DType::F32);

    let long: Vec<i64> = (0..17).map(|i| 10 + i).collect();
    let e = err_text(model.forward(&ids(&[&long])));
    assert!(
        e.contains("17") && e.contains("max_position_embeddings 16"),
        "{e}"
    );

    let e = err_text(model.forward(&ids(&[&[96, 99, 97]])));
    assert!(
        e.contains("token id 99") && e.contains("vocabulary of size 99"),
        "{e}"
    );

    let e = err_text(model.forward(&ids(&[&[96, -1, 97]])));
    assert!(e.contains("token id -1"), "{e}");

    let e = err_text(model.forward(&ids(&[&[96, 5, 8]])));
    assert!(e.contains("no end-of-text id 97"), "{e}");

    let e = err_text(ClipTextConfig::from_value(
        serde_json::json!({ "hidden_act": "swiglu" }),
    ));
    assert!(e.contains("unknown hidden_act `swiglu`"), "{e}");

    let e = err_text(ClipTextConfig::from_value(
        serde_json::json!({ "hidden_size": 30, "num_attention_heads": 4 }),
    ));
    assert!(e.contains("not a multiple"), "{e}");

    // Placeholder count != soft-prompt length.
    let p = PLACEHOLDER as i64;
    let input_ids = ids(&[&[96, p, p, 97], &[96, p, 5, 97]]);
    let tokens = model.embed_tokens(&input_ids).unwrap();
    let soft = Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
    let e = err_text(model.splice(&tokens, &input_ids, PLACEHOLDER, &soft));
    assert!(
        e.contains("row 1") && e.contains("1 times") && e.contains("has 2 vectors"),
        "{e}"
    );
    let wide = Tensor::zeros((2, 31), DType::F32, &Device::Cpu).unwrap();
    let e = err_text(model.splice(&tokens, &input_ids, PLACEHOLDER, &wide));
    assert!(e.contains("width 31"), "{e}");

    // inputs_embeds of the wrong width.
    let e = err_text(model.forward_embeds(
        &Tensor::zeros((2, 4, 31), DType::F32, &Device::Cpu).unwrap(),
        &input_ids,
    ));
    assert!(e.contains("[b, s, 32]"), "{e}");

    // A missing tensor names the checkpoint key.
    let cfg = ClipTextConfig {
        num_hidden_layers: 4,
        ..model.config().clone()
    };
    let dir = case_dir(GELU);
    let vb = Checkpoint::open_safetensors(&[dir.join("weights.safetensors")])
        .unwrap()
        .into_var_builder(DType::F32, &Device::Cpu);
    let e = err_text(ClipTextModel::new(vb, &cfg));
    assert!(e.contains("text_model.encoder.layers.3."), "{e}");
}
