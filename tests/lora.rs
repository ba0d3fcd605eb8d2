//! LoRA fusion on a tiny UNet-like checkpoint: kohya and diffusers/PEFT keys, linear, 1x1 and
//! 3x3 conv weights, against the formula computed here with plain loops; and the errors.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use diffexplainer::lora::{Lora, LoraTarget};
use diffexplainer::testing::pseudo_random;
use diffexplainer::weights::Checkpoint;

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = pseudo_random(n, seed)
        .into_iter()
        .map(|x| x as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A tiny base: weights whose names have underscores inside components (`time_embedding`,
/// `linear_1`, `proj_in`, `to_q`), as the SD UNet's do.
fn base_tensors() -> HashMap<String, Tensor> {
    [
        ("conv_in.weight", rand(&[5, 4, 3, 3], 1)),
        ("conv_in.bias", rand(&[5], 2)),
        ("time_embedding.linear_1.weight", rand(&[8, 5], 3)),
        ("time_embedding.linear_1.bias", rand(&[8], 4)),
        (
            "down_blocks.0.attentions.0.proj_in.weight",
            rand(&[6, 4, 1, 1], 5),
        ),
        (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            rand(&[6, 6], 6),
        ),
        ("mid_block.resnets.0.conv1.weight", rand(&[5, 5, 3, 3], 7)),
    ]
    .into_iter()
    .map(|(k, t)| (k.to_string(), t))
    .collect()
}

fn base() -> Checkpoint {
    Checkpoint::from_tensors("tiny-unet.safetensors", base_tensors())
}

/// (diffusers module path, down shape, up shape, alpha)
type Adapted = (&'static str, Vec<usize>, Vec<usize>, Option<f64>);

fn adapted() -> Vec<Adapted> {
    vec![
        ("conv_in", vec![3, 4, 3, 3], vec![5, 3, 1, 1], None),
        ("time_embedding.linear_1", vec![2, 5], vec![8, 2], Some(4.0)),
        (
            "down_blocks.0.attentions.0.proj_in",
            vec![2, 4, 1, 1],
            vec![6, 2, 1, 1],
            Some(1.0),
        ),
        (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            vec![4, 6],
            vec![6, 4],
            Some(8.0),
        ),
    ]
}

fn kohya_lora() -> HashMap<String, Tensor> {
    let mut m = HashMap::new();
    for (i, (path, down, up, alpha)) in adapted().into_iter().enumerate() {
        let k = format!("lora_unet_{}", path.replace('.', "_"));
        m.insert(format!("{k}.lora_down.weight"), rand(&down, 100 + i as u64));
        m.insert(format!("{k}.lora_up.weight"), rand(&up, 200 + i as u64));
        if let Some(a) = alpha {
            m.insert(
                format!("{k}.alpha"),
                Tensor::new(a as f32, &Device::Cpu).unwrap(),
            );
        }
    }
    m
}

fn peft_lora() -> HashMap<String, Tensor> {
    let mut m = HashMap::new();
    for (i, (path, down, up, alpha)) in adapted().into_iter().enumerate() {
        let k = format!("unet.{path}");
        m.insert(format!("{k}.lora_A.weight"), rand(&down, 100 + i as u64));
        m.insert(format!("{k}.lora_B.weight"), rand(&up, 200 + i as u64));
        if let Some(a) = alpha {
            m.insert(
                format!("{k}.alpha"),
                Tensor::new(a as f32, &Device::Cpu).unwrap(),
            );
        }
    }
    m
}

/// `W + scale * alpha / r * up @ down` with plain loops over flat buffers.
fn expected(
    path: &str,
    i: usize,
    down: &[usize],
    up: &[usize],
    alpha: Option<f64>,
    scale: f64,
) -> Vec<f64> {
    let w = values(&base_tensors()[&format!("{path}.weight")]);
    let d = values(&rand(down, 100 + i as u64));
    let u = values(&rand(up, 200 + i as u64));
    let r = down[0];
    let out = up[0];
    let inner: usize = down[1..].iter().product();
    let factor = scale * alpha.unwrap_or(r as f64) / r as f64;
    let mut res = w.clone();
    for o in 0..out {
        for j in 0..inner {
            let mut acc = 0.0;
            for k in 0..r {
                acc += u[o * r + k] * d[k * inner + j];
            }
            res[o * inner + j] += factor * acc;
        }
    }
    res
}

fn assert_fused(ckpt: &Checkpoint, scale: f64, what: &str) {
    for (i, (path, down, up, alpha)) in adapted().into_iter().enumerate() {
        let ours = values(&ckpt.tensor(&format!("{path}.weight")).unwrap());
        let exp = expected(path, i, &down, &up, alpha, scale);
        let err = ours
            .iter()
            .zip(&exp)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            err < 1e-5,
            "{what}: {path} differs from the formula by {err:.3e}"
        );
        let base = values(&base_tensors()[&format!("{path}.weight")]);
        assert!(ours != base, "{what}: {path} was not changed");
    }
}

#[test]
fn kohya_fuses_by_lookup() {
    let lora = Lora::from_tensors("kohya.safetensors", kohya_lora());
    let (ckpt, report) = lora.fuse_into(base(), LoraTarget::UNET, 1.0).unwrap();
    assert_eq!(report.fused.len(), 4);
    assert_eq!(report.other_components, 0);
    assert_fused(&ckpt, 1.0, "kohya");
    // Untouched weights stay as stored.
    assert_eq!(
        values(&ckpt.tensor("mid_block.resnets.0.conv1.weight").unwrap()),
        values(&base_tensors()["mid_block.resnets.0.conv1.weight"])
    );
}

#[test]
fn peft_fuses_and_scale_applies() {
    let lora = Lora::from_tensors("peft.safetensors", peft_lora());
    let (ckpt, _) = lora.fuse_into(base(), LoraTarget::UNET, 0.5).unwrap();
    assert_fused(&ckpt, 0.5, "peft, scale 0.5");
}

#[test]
fn fused_weights_reach_the_var_builder() {
    let lora = Lora::from_tensors("kohya.safetensors", kohya_lora());
    let (ckpt, _) = lora.fuse_into(base(), LoraTarget::UNET, 1.0).unwrap();
    let fused = values(&ckpt.tensor("conv_in.weight").unwrap());
    let vb = ckpt.into_var_builder(DType::F32, &Device::Cpu);
    let w = vb.pp("conv_in").get((5, 4, 3, 3), "weight").unwrap();
    assert_eq!(values(&w), fused);
    let err = vb
        .pp("conv_in")
        .get((5, 4, 1, 1), "weight")
        .unwrap_err()
        .to_string();
    assert!(err.contains("[5, 4, 3, 3]"), "{err}");
    let b = vb.pp("conv_in").get(5, "bias").unwrap();
    assert_eq!(values(&b), values(&base_tensors()["conv_in.bias"]));
}

#[test]
fn other_components_are_skipped_and_counted() {
    let mut t = kohya_lora();
    t.insert(
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight".into(),
        rand(&[2, 6], 9),
    );
    t.insert(
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight".into(),
        rand(&[6, 2], 10),
    );
    let (_, report) = Lora::from_tensors("mixed.safetensors", t)
        .fuse_into(base(), LoraTarget::UNET, 1.0)
        .unwrap();
    assert_eq!((report.fused.len(), report.other_components), (4, 1));
}

#[test]
fn a_lora_matching_nothing_is_an_error_listing_keys() {
    let mut t = HashMap::new();
    t.insert(
        "lora_unet_nowhere_0.lora_down.weight".to_string(),
        rand(&[2, 4], 1),
    );
    t.insert(
        "lora_unet_nowhere_0.lora_up.weight".to_string(),
        rand(&[4, 2], 2),
    );
    let err = Lora::from_tensors("stray.safetensors", t)
        .fuse_into(base(), LoraTarget::UNET, 1.0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("stray.safetensors"), "{err}");
    assert!(
        err.contains("1 of 1") && err.contains("lora_unet_nowhere_0"),
        "{err}"
    );
}

#[test]
fn partially_unmatched_is_an_error_with_counts() {
    let mut t = kohya_lora();
    t.insert(
        "unet.up_blocks.9.proj.lora_A.weight".to_string(),
        rand(&[2, 4], 1),
    );
    t.insert(
        "unet.up_blocks.9.proj.lora_B.weight".to_string(),
        rand(&[4, 2], 2),
    );
    let err = Lora::from_tensors("partial.safetensors", t)
        .fuse_into(base(), LoraTarget::UNET, 1.0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("1 of 5") && err.contains("unet.up_blocks.9.proj"),
        "{err}"
    );
}

#[test]
fn ambiguous_underscores_are_an_error_naming_both() {
    let mut b = base_tensors();
    b.insert("a_b.c.weight".into(), rand(&[4, 4], 1));
    b.insert("a.b_c.weight".into(), rand(&[4, 4], 2));
    let mut t = HashMap::new();
    t.insert(
        "lora_unet_a_b_c.lora_down.weight".to_string(),
        rand(&[2, 4], 3),
    );
    t.insert(
        "lora_unet_a_b_c.lora_up.weight".to_string(),
        rand(&[4, 2], 4),
    );
    let err = Lora::from_tensors("amb.safetensors", t)
        .fuse_into(Checkpoint::from_tensors("b", b), LoraTarget::UNET, 1.0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("a_b.c") && err.contains("a.b_c"), "{err}");
}

#[test]
fn shape_mismatch_and_unknown_keys_are_errors() {
    let mut t = HashMap::new();
    t.insert(
        "lora_unet_conv_in.lora_down.weight".to_string(),
        rand(&[2, 3, 3, 3], 1),
    );
    t.insert(
        "lora_unet_conv_in.lora_up.weight".to_string(),
        rand(&[5, 2, 1, 1], 2),
    );
    let err = Lora::from_tensors("shape.safetensors", t)
        .fuse_into(base(), LoraTarget::UNET, 1.0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("conv_in.weight") && err.contains("[5, 4, 3, 3]"),
        "{err}"
    );

    let mut t = kohya_lora();
    t.insert("lora_unet_conv_in.hada_w1_a".to_string(), rand(&[2, 2], 1));
    let err = Lora::from_tensors("loha.safetensors", t)
        .fuse_into(base(), LoraTarget::UNET, 1.0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("hada_w1_a"), "{err}");
}

#[test]
fn lora_file_round_trip() {
    let dir = std::env::temp_dir().join(format!("diffexplainer-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lora.safetensors");
    candle_core::safetensors::save(&kohya_lora(), &path).unwrap();
    let (ckpt, report) = Lora::open(&path)
        .unwrap()
        .fuse_into(base(), LoraTarget::UNET, 1.0)
        .unwrap();
    assert_eq!(report.fused.len(), 4);
    assert_fused(&ckpt, 1.0, "from file");
}

/// Against diffusers: a kohya LoRA on every attention, resnet and sampler layer of a tiny
/// `UNet2DConditionModel`, loaded and fused by diffusers 0.42.1 + peft
/// (`scripts/make_lora_fixture.py`).
#[test]
fn matches_diffusers_fuse_lora_on_a_tiny_unet() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lora");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json")).unwrap()).unwrap();
    let scale = meta["lora_scale"].as_f64().unwrap();
    let base = Checkpoint::open(dir.join("unet.safetensors")).unwrap();
    let lora = Lora::open(dir.join("lora_kohya.safetensors")).unwrap();
    let (ckpt, report) = lora.fuse_into(base, LoraTarget::UNET, scale).unwrap();
    let expected = Checkpoint::open(dir.join("fused.safetensors")).unwrap();
    let names = expected.names();
    assert_eq!(names.len() as u64, meta["adapted"].as_u64().unwrap());
    assert_eq!(
        report.fused, names,
        "fused a different set of weights than diffusers"
    );
    for name in &names {
        let ours = values(&ckpt.tensor(name).unwrap());
        let exp = values(&expected.tensor(name).unwrap());
        let scale = exp.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let err = ours
            .iter()
            .zip(&exp)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err / scale < 1e-5, "{name}: rel error {:.3e}", err / scale);
    }
    // Everything else is untouched.
    let unet = Checkpoint::open(dir.join("unet.safetensors")).unwrap();
    for name in unet.names().iter().filter(|n| !names.contains(n)) {
        assert_eq!(
            values(&ckpt.tensor(name).unwrap()),
            values(&unet.tensor(name).unwrap()),
            "{name}"
        );
    }
}

fn fixture_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lora")
}

fn fixture_meta() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("fixtures_peft_te.json")).unwrap(),
    )
    .unwrap()
}

/// Max relative error of every tensor of `expected` against `ours`.
fn assert_matches(ours: &Checkpoint, expected: &Checkpoint, rename: impl Fn(&str) -> String) {
    for name in expected.names() {
        let o = values(&ours.tensor(&rename(&name)).unwrap());
        let e = values(&expected.tensor(&name).unwrap());
        let scale = e.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let err = o
            .iter()
            .zip(&e)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err / scale < 1e-5, "{name}: rel error {:.3e}", err / scale);
    }
}

/// A PEFT LoRA saved by diffusers' `save_lora_weights`: its alpha (2 x rank, one module 3.0 by
/// `alpha_pattern`) is only in the safetensors header (`lora_adapter_metadata`). Fused as
/// diffusers fuses it (`scripts/make_lora_fixtures_peft_te.py`), not at 1x.
#[test]
fn peft_alpha_from_the_safetensors_header_matches_diffusers() {
    let meta = fixture_meta();
    let scale = meta["peft"]["lora_scale"].as_f64().unwrap();
    let lora = Lora::open(fixture_dir().join("peft_lora.safetensors")).unwrap();
    let adapter = &lora.adapter_configs()["unet"];
    assert_eq!(adapter.lora_alpha, Some(4.0));
    assert_eq!(adapter.r, Some(2));
    assert_eq!(
        adapter
            .alpha_pattern
            .get("down_blocks.0.attentions.0.proj_in"),
        Some(&3.0)
    );
    let base = Checkpoint::open(fixture_dir().join("unet.safetensors")).unwrap();
    let (ckpt, report) = lora.fuse_into(base, LoraTarget::UNET, scale).unwrap();
    let expected = Checkpoint::open(fixture_dir().join("peft_fused.safetensors")).unwrap();
    assert_eq!(report.fused, expected.names());
    assert_eq!(
        report.fused.len() as u64,
        meta["peft"]["adapted"].as_u64().unwrap()
    );
    assert_matches(&ckpt, &expected, str::to_string);

    // Without the header the same tensors fuse at alpha = rank: the delta halves. The test
    // above would catch a reader that ignores the header.
    let plain = Lora::from_tensors(
        "no-header.safetensors",
        Checkpoint::open(fixture_dir().join("peft_lora.safetensors"))
            .map(|c| {
                c.names()
                    .into_iter()
                    .map(|n| (n.clone(), c.tensor(&n).unwrap()))
                    .collect()
            })
            .unwrap(),
    );
    let base = Checkpoint::open(fixture_dir().join("unet.safetensors")).unwrap();
    let (plain_ckpt, _) = plain.fuse_into(base, LoraTarget::UNET, scale).unwrap();
    let name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight";
    let unet = Checkpoint::open(fixture_dir().join("unet.safetensors")).unwrap();
    let w0 = values(&unet.tensor(name).unwrap());
    let d_header: Vec<f64> = values(&ckpt.tensor(name).unwrap())
        .iter()
        .zip(&w0)
        .map(|(a, b)| a - b)
        .collect();
    let d_plain: Vec<f64> = values(&plain_ckpt.tensor(name).unwrap())
        .iter()
        .zip(&w0)
        .map(|(a, b)| a - b)
        .collect();
    for (h, p) in d_header.iter().zip(&d_plain) {
        assert!(
            (h - 2.0 * p).abs() <= 1e-6 && h.abs() > 1e-5,
            "{h} vs 2 x {p}"
        );
    }
}

#[test]
fn adapter_metadata_rank_must_match_the_tensors() {
    use diffexplainer::lora::AdapterConfig;
    let lora = Lora::from_tensors("ranked.safetensors", peft_lora()).with_adapter_configs(
        [(
            "unet".to_string(),
            AdapterConfig {
                r: Some(7),
                lora_alpha: Some(14.0),
                ..Default::default()
            },
        )]
        .into(),
    );
    let err = lora
        .fuse_into(base(), LoraTarget::UNET, 1.0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("rank") && err.contains('7'), "{err}");
}

/// The text-encoder half of a kohya LoRA (`lora_te_text_model_encoder_...`) on a tiny
/// transformers CLIPTextModel, against diffusers' kohya conversion + fuse. transformers 5 saves
/// the model without the `text_model.` prefix; SD 1.5's checkpoint has it: both fuse.
#[test]
fn kohya_text_encoder_lora_matches_diffusers_with_and_without_text_model_prefix() {
    let meta = fixture_meta();
    let scale = meta["text_encoder"]["lora_scale"].as_f64().unwrap();
    let lora = Lora::open(fixture_dir().join("te_lora_kohya.safetensors")).unwrap();
    let c = lora.components().unwrap();
    assert_eq!((c.unet, c.text_encoder, c.other.len()), (0, 12, 0));
    let expected = Checkpoint::open(fixture_dir().join("te_fused.safetensors")).unwrap();

    let base = Checkpoint::open(fixture_dir().join("te_base.safetensors")).unwrap();
    assert!(base.names().iter().all(|n| !n.starts_with("text_model.")));
    let (ckpt, report) = lora
        .fuse_into(base, LoraTarget::TEXT_ENCODER, scale)
        .unwrap();
    assert_eq!(report.fused, expected.names());
    assert_matches(&ckpt, &expected, str::to_string);

    let prefixed: HashMap<String, Tensor> = {
        let b = Checkpoint::open(fixture_dir().join("te_base.safetensors")).unwrap();
        b.names()
            .into_iter()
            .map(|n| (format!("text_model.{n}"), b.tensor(&n).unwrap()))
            .collect()
    };
    let (ckpt, report) = lora
        .fuse_into(
            Checkpoint::from_tensors("sd15-text-encoder.safetensors", prefixed),
            LoraTarget::TEXT_ENCODER,
            scale,
        )
        .unwrap();
    assert_eq!(report.fused.len(), 12);
    assert_matches(&ckpt, &expected, |n| format!("text_model.{n}"));
}

#[test]
fn sdxl_second_text_encoder_modules_are_counted_as_other() {
    let mut t = kohya_lora();
    t.insert(
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight".into(),
        rand(&[2, 6], 9),
    );
    t.insert(
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight".into(),
        rand(&[6, 2], 10),
    );
    let c = Lora::from_tensors("sdxl.safetensors", t)
        .components()
        .unwrap();
    assert_eq!(
        c.other,
        vec!["lora_te2_text_model_encoder_layers_0_self_attn_q_proj".to_string()]
    );
}

#[test]
fn a_non_finite_alpha_or_scale_is_an_error_naming_it() {
    let mut t = kohya_lora();
    t.insert(
        "lora_unet_conv_in.alpha".to_string(),
        Tensor::new(f32::NAN, &Device::Cpu).unwrap(),
    );
    let err = format!(
        "{:#}",
        Lora::from_tensors("nan-alpha.safetensors", t)
            .fuse_into(base(), LoraTarget::UNET, 1.0)
            .err()
            .unwrap()
    );
    assert!(err.contains("alpha is NaN"), "{err}");
    assert!(err.contains("conv_in"), "{err}");

    for scale in [f64::NAN, f64::INFINITY] {
        let err = Lora::from_tensors("ok.safetensors", kohya_lora())
            .fuse_into(base(), LoraTarget::UNET, scale)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("scale must be a finite number"), "{err}");
    }
}
