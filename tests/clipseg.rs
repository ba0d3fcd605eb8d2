//! CLIPSeg: the pixel gradient against finite differences in f64 (weights of the
//! `clipseg_refined` parity case), the real model's config, `Segmenter` end to end on a tiny
//! random model over CLIP's real vocabulary, and input errors.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use diffexplainer::models::clipseg::{
    ClipSegConfig, ClipSegForImageSegmentation, ClipSegProcessor, Segmenter,
};
use diffexplainer::testing::{check_gradient, pseudo_random_tensor, random_var_builder};
use diffexplainer::tokenizer::ClipTokenizer;
use diffexplainer::weights::Checkpoint;

fn case_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/parity/cases")
        .join(name)
}

fn load(name: &str, dtype: DType) -> ClipSegForImageSegmentation {
    let dir = case_dir(name);
    let cfg = ClipSegConfig::from_file(dir.join("config.json")).unwrap();
    let vb = Checkpoint::open_safetensors(&[dir.join("weights.safetensors")])
        .unwrap()
        .into_var_builder(dtype, &Device::Cpu);
    ClipSegForImageSegmentation::new(vb, &cfg).unwrap()
}

#[test]
fn pixel_gradient_matches_finite_differences() {
    let model = load("clipseg_refined", DType::F64);
    let ids = Tensor::new(&[[97i64, 12, 2, 45, 98]], &Device::Cpu).unwrap();
    let cond = model.conditional_embeddings(&ids).unwrap();
    let pixels = pseudo_random_tensor(&[1, 3, 48, 48], 1.0, 3, &Device::Cpu).unwrap();
    let check = check_gradient(|x| model.forward(x, &cond), &pixels, 1e-6, 32).unwrap();
    assert_eq!(check.checked, 32);
    assert!(
        check.scale > 1e-4,
        "pixel gradient ~0 ({:.3e})",
        check.scale
    );
    assert!(
        check.max_rel_error < 1e-6,
        "pixel gradient vs finite differences: rel error {:.3e}",
        check.max_rel_error
    );
}

#[test]
fn reads_the_refined_models_config() {
    // The values of CIDAS/clipseg-rd64-refined's config.json (everything else at defaults).
    let cfg = ClipSegConfig::from_value(serde_json::json!({
        "architectures": ["CLIPSegForImageSegmentation"],
        "conditional_layer": 0,
        "decoder_attention_dropout": 0.0,
        "decoder_hidden_act": "quick_gelu",
        "decoder_intermediate_size": 2048,
        "decoder_num_attention_heads": 4,
        "extract_layers": [3, 6, 9],
        "model_type": "clipseg",
        "projection_dim": 512,
        "reduce_dim": 64,
        "text_config": {"bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "model_type": "clipseg_text_model"},
        "use_complex_transposed_convolution": true,
        "vision_config": {"dropout": 0.0, "model_type": "clipseg_vision_model", "patch_size": 16}
    }))
    .unwrap();
    assert_eq!(cfg.extract_layers, vec![3, 6, 9]);
    assert!(cfg.use_complex_transposed_convolution);
    assert_eq!(
        (cfg.vision_config.patch_size, cfg.vision_config.hidden_size),
        (16, 768)
    );
    assert_eq!(
        (
            cfg.vision_config.image_size,
            cfg.vision_config.num_hidden_layers
        ),
        (224, 12)
    );
    assert_eq!(
        (cfg.text_config.hidden_size, cfg.text_config.vocab_size),
        (512, 49408)
    );
    assert_eq!(cfg.text_config.eos_token_id, Some(2));
    assert_eq!((cfg.reduce_dim, cfg.projection_dim), (64, 512));

    let err = ClipSegConfig::from_value(serde_json::json!({"extract_layers": [3, 12]}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("12") && err.contains("12 layers"), "{err}");
}

fn tiny_segmenter() -> Segmenter {
    let cfg = ClipSegConfig::from_value(serde_json::json!({
        "text_config": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "max_position_embeddings": 16,
                        "bos_token_id": 0, "eos_token_id": 2},
        "vision_config": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3,
                          "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        "projection_dim": 24, "extract_layers": [0, 1, 2], "reduce_dim": 16,
        "decoder_num_attention_heads": 2, "decoder_intermediate_size": 20,
        "use_complex_transposed_convolution": true
    }))
    .unwrap();
    let model =
        ClipSegForImageSegmentation::new(random_var_builder(DType::F32, &Device::Cpu), &cfg)
            .unwrap();
    let processor = ClipSegProcessor {
        size: (32, 32),
        ..ClipSegProcessor::default()
    };
    Segmenter::new(model, processor, ClipTokenizer::embedded().unwrap()).unwrap()
}

#[test]
fn segmenter_gives_masks_at_the_image_size_independent_of_padding() {
    let seg = tiny_segmenter();
    let images = pseudo_random_tensor(&[2, 3, 40, 36], 0.5, 2, &Device::Cpu)
        .unwrap()
        .affine(1.0, 0.5)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let queries = ["a photo of a red square", "a circle"];
    let out = seg.segment(&images, &queries).unwrap();
    // f64 images run through the f32 model too.
    let out64 = seg
        .segment(&images.to_dtype(DType::F64).unwrap(), &queries)
        .unwrap();
    assert_eq!(out64.probabilities.dtype(), DType::F32);
    // The complex head upsamples by (patch/4)² = 4 per patch here (16 = patch at real size).
    assert_eq!(out.logits.dims(), &[2, 16, 16]);
    assert_eq!(out.probabilities.dims(), &[2, 40, 36]);
    let p = out
        .probabilities
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(p.iter().all(|v| (0.0..=1.0).contains(v)));
    assert!(
        p.iter().any(|&v| (v - p[0]).abs() > 1e-6),
        "a constant mask"
    );

    // Query 1 is padded to query 0's length in the batch; alone it is not: same logits.
    let alone = seg
        .segment(&images.narrow(0, 1, 1).unwrap(), &queries[1..])
        .unwrap();
    let diff = common::max_abs_diff(&alone.logits, &out.logits.narrow(0, 1, 1).unwrap());
    assert!(diff < 1e-5, "padding changed the logits by {diff}");
    // Different queries give different masks.
    let other = seg.segment(&images, &["a circle", "a circle"]).unwrap();
    let diff = common::max_abs_diff(
        &other.logits.narrow(0, 0, 1).unwrap(),
        &out.logits.narrow(0, 0, 1).unwrap(),
    );
    assert!(diff > 1e-4, "the query does not condition the mask");
}

#[test]
fn loads_a_saved_folder_and_names_a_missing_file() {
    let src = case_dir("clipseg_simple");
    let dir = std::env::temp_dir().join(format!("clipseg_from_dir_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let err = ClipSegForImageSegmentation::from_dir(&dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::copy(
        src.join("weights.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let model = ClipSegForImageSegmentation::from_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let reference = load("clipseg_simple", DType::F32);
    let ids = Tensor::new(&[[97i64, 40, 98]], &Device::Cpu).unwrap();
    let pixels = pseudo_random_tensor(&[1, 3, 32, 32], 1.0, 6, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let a = model
        .forward(&pixels, &model.conditional_embeddings(&ids).unwrap())
        .unwrap();
    let b = reference
        .forward(&pixels, &reference.conditional_embeddings(&ids).unwrap())
        .unwrap();
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn bad_inputs_are_errors_naming_the_problem() {
    let seg = tiny_segmenter();
    let images = Tensor::full(0.5f32, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let err = seg
        .segment(&images, &["one query"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 queries for 2 images"), "{err}");
    let gray = Tensor::full(0.5f32, (1, 1, 32, 32), &Device::Cpu).unwrap();
    let err = seg.segment(&gray, &["x"]).unwrap_err().to_string();
    assert!(err.contains("3 channels"), "{err}");
    let long = "word ".repeat(20);
    let err = seg
        .segment(&images.narrow(0, 0, 1).unwrap(), &[long.as_str()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("query 0") && err.contains("at most 16"),
        "{err}"
    );

    let model = load("clipseg_simple", DType::F32);
    let cond = Tensor::zeros((1, 24), DType::F32, &Device::Cpu).unwrap();
    let wide = Tensor::zeros((1, 3, 32, 40), DType::F32, &Device::Cpu).unwrap();
    let err = model.forward(&wide, &cond).unwrap_err().to_string();
    assert!(err.contains("square"), "{err}");
    let square = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let err = model
        .forward(
            &square,
            &Tensor::zeros((1, 7), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("[1, 24]"), "{err}");
}
