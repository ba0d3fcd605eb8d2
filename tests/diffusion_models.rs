//! The diffusion models without any reference library: finite differences (f64) of the UNet
//! with respect to the text conditioning and the latents, and of the VAE decoder with respect to
//! the latents; config refusals; the VAE's latent-scaling convention. Weights are the parity
//! cases' tiny random models (tests/parity/cases/unet2d_condition_*, vae_*).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use diffexplainer::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use diffexplainer::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use diffexplainer::testing::check_gradient;
use diffexplainer::weights::Checkpoint;

const STEP: f64 = 1e-6;
const BAR: f64 = 1e-6;

fn case_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/parity/cases")
        .join(name)
}

fn inputs_f64(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(case_dir(case).join("inputs.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F64).unwrap()))
        .collect()
}

fn unet(case: &str) -> UNet2DConditionModel {
    let dir = case_dir(case);
    let cfg = UNet2DConditionConfig::from_file(dir.join("config.json")).unwrap();
    let vb = Checkpoint::open(dir.join("weights.safetensors"))
        .unwrap()
        .into_var_builder(DType::F64, &Device::Cpu);
    UNet2DConditionModel::new(vb, &cfg).unwrap()
}

fn vae(case: &str, checkpoint: Checkpoint) -> AutoencoderKL {
    let cfg = AutoencoderKLConfig::from_file(case_dir(case).join("config.json")).unwrap();
    AutoencoderKL::new(checkpoint.into_var_builder(DType::F64, &Device::Cpu), &cfg).unwrap()
}

fn vae_weights(case: &str) -> Checkpoint {
    Checkpoint::open(case_dir(case).join("weights.safetensors")).unwrap()
}

fn assert_gradient(name: &str, f: impl Fn(&Tensor) -> Result<Tensor>, x: &Tensor, coords: usize) {
    let check = check_gradient(f, x, STEP, coords).unwrap();
    assert!(
        check.scale > 1e-3,
        "{name}: the gradient is ~0 (scale {}), the check proves nothing",
        check.scale
    );
    assert!(
        check.max_rel_error < BAR,
        "{name}: analytic vs finite-difference gradient differ by {:.3e} (relative) over {} coords",
        check.max_rel_error,
        check.checked
    );
}

#[test]
fn unet_gradient_wrt_encoder_hidden_states() {
    for case in ["unet2d_condition_sd1", "unet2d_condition_sd2"] {
        let model = unet(case);
        let x = inputs_f64(case);
        let t = x["timestep"].to_vec1::<f64>().unwrap()[0];
        assert_gradient(
            &format!("{case} d/d encoder_hidden_states"),
            |ehs| model.forward(&x["sample"], t, ehs),
            &x["encoder_hidden_states"],
            60,
        );
    }
}

#[test]
fn unet_gradient_wrt_sample() {
    let case = "unet2d_condition_sd1";
    let model = unet(case);
    let x = inputs_f64(case);
    assert_gradient(
        "unet d/d sample",
        |s| model.forward(s, 421.0, &x["encoder_hidden_states"]),
        &x["sample"],
        48,
    );
}

#[test]
fn vae_decoder_gradient_wrt_latents() {
    let model = vae("vae_decoder", vae_weights("vae_decoder"));
    let x = inputs_f64("vae_decoder");
    assert_gradient(
        "vae decode d/d latents",
        |z| model.decode(z),
        &x["latents"],
        64,
    );
}

/// A batch of two with one shared timestep gives each element's own result (the
/// classifier-free-guidance batch), and per-element timesteps work.
#[test]
fn unet_batches_and_timesteps() {
    let case = "unet2d_condition_sd2";
    let model = unet(case);
    let x = inputs_f64(case);
    let (s, ehs) = (&x["sample"], &x["encoder_hidden_states"]);
    let s2 = Tensor::cat(&[s, &(s * 0.5).unwrap()], 0).unwrap();
    let e2 = Tensor::cat(&[ehs, &ehs.flip_last()], 0).unwrap();
    let batched = model.forward(&s2, 37.5, &e2).unwrap();
    let single = model
        .forward(&(s * 0.5).unwrap(), 37.5, &ehs.flip_last())
        .unwrap();
    assert_close(&batched.narrow(0, 1, 1).unwrap(), &single, 1e-12);

    let ts = Tensor::new(&[37.5f64, 600.0], &Device::Cpu).unwrap();
    let per_element = model.forward_with_timesteps(&s2, &ts, &e2).unwrap();
    let late = model
        .forward(&(s * 0.5).unwrap(), 600.0, &ehs.flip_last())
        .unwrap();
    assert_close(&per_element.narrow(0, 1, 1).unwrap(), &late, 1e-12);
    assert_close(
        &per_element.narrow(0, 0, 1).unwrap(),
        &batched.narrow(0, 0, 1).unwrap(),
        1e-12,
    );
}

trait FlipLast {
    fn flip_last(&self) -> Tensor;
}

impl FlipLast for Tensor {
    /// A different but same-shaped conditioning: the tokens in reverse order.
    fn flip_last(&self) -> Tensor {
        let n = self.dim(1).unwrap();
        let idx: Vec<u32> = (0..n as u32).rev().collect();
        self.index_select(&Tensor::new(idx.as_slice(), self.device()).unwrap(), 1)
            .unwrap()
    }
}

fn assert_close(a: &Tensor, b: &Tensor, tol: f64) {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(d < tol, "max abs difference {d:.3e} >= {tol:.0e}");
}

/// `decode_to_image` = the pipelines' `(vae.decode(latents / scaling_factor) / 2 + 0.5).clamp(0, 1)`.
#[test]
fn decode_to_image_unscales_and_clamps() {
    let model = vae("vae_decoder", vae_weights("vae_decoder"));
    let z = &inputs_f64("vae_decoder")["latents"];
    let latents = (z * model.config.scaling_factor).unwrap();
    let image = model.decode_to_image(&latents).unwrap();
    let want = model
        .decode(z)
        .unwrap()
        .affine(0.5, 0.5)
        .unwrap()
        .clamp(0.0, 1.0)
        .unwrap();
    assert_close(&image, &want, 1e-12);
    let (lo, hi) = (
        image.min_all().unwrap().to_scalar::<f64>().unwrap(),
        image.max_all().unwrap().to_scalar::<f64>().unwrap(),
    );
    assert!((0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi));
    assert_close(&model.unscale_latents(&latents).unwrap(), z, 1e-12);
    assert_close(&model.scale_latents(z).unwrap(), &latents, 1e-12);
}

/// Checkpoints saved before diffusers 0.14 name the VAE's attention `query` / `key` / `value` /
/// `proj_attn`; they load to the same model.
#[test]
fn vae_loads_legacy_attention_names() {
    let dir = case_dir("vae_decoder");
    let tensors =
        candle_core::safetensors::load(dir.join("weights.safetensors"), &Device::Cpu).unwrap();
    let legacy: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| {
            let k = k
                .replace("attentions.0.to_q.", "attentions.0.query.")
                .replace("attentions.0.to_k.", "attentions.0.key.")
                .replace("attentions.0.to_v.", "attentions.0.value.")
                .replace("attentions.0.to_out.0.", "attentions.0.proj_attn.");
            (k, v.clone())
        })
        .collect();
    assert!(legacy.keys().any(|k| k.contains("proj_attn")));
    let current = vae("vae_decoder", vae_weights("vae_decoder"));
    let old = vae("vae_decoder", Checkpoint::from_tensors("legacy", legacy));
    let z = &inputs_f64("vae_decoder")["latents"];
    assert_close(&old.decode(z).unwrap(), &current.decode(z).unwrap(), 1e-12);
}

fn unet_config_error(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let text =
        std::fs::read_to_string(case_dir("unet2d_condition_sd1").join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut json);
    let cfg: UNet2DConditionConfig = serde_json::from_value(json).unwrap();
    cfg.check().unwrap_err().to_string()
}

/// SDXL's UNet config (abridged to its distinguishing keys) is refused, naming the feature.
#[test]
fn refuses_sdxl_unet_config() {
    let sdxl = r#"{
        "_class_name": "UNet2DConditionModel",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "projection_class_embeddings_input_dim": 2816,
        "transformer_layers_per_block": [1, 2, 10],
        "use_linear_projection": true
    }"#;
    let path = std::env::temp_dir().join(format!("sdxl-unet-{}.json", std::process::id()));
    std::fs::write(&path, sdxl).unwrap();
    let err = UNet2DConditionConfig::from_file(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("addition_embed_type") && err.contains("text_time"),
        "{err}"
    );
    assert!(err.contains(&path.display().to_string()), "{err}");
    // And the model constructor checks too.
    let cfg: UNet2DConditionConfig = serde_json::from_str(sdxl).unwrap();
    let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
    let err = UNet2DConditionModel::new(vb, &cfg).unwrap_err().to_string();
    assert!(err.contains("addition_embed_type"), "{err}");
}

#[test]
fn refuses_other_unet_features_by_name() {
    let err = unet_config_error(|c| c["class_embed_type"] = "timestep".into());
    assert!(err.contains("class_embed_type"), "{err}");
    let err = unet_config_error(|c| {
        c["down_block_types"][1] = "SimpleCrossAttnDownBlock2D".into();
    });
    assert!(err.contains("SimpleCrossAttnDownBlock2D"), "{err}");
    let err = unet_config_error(|c| c["up_block_types"][0] = "AttnUpBlock2D".into());
    assert!(err.contains("AttnUpBlock2D"), "{err}");
    let err = unet_config_error(|c| c["mid_block_type"] = "UNetMidBlock2DSimpleCrossAttn".into());
    assert!(err.contains("UNetMidBlock2DSimpleCrossAttn"), "{err}");
    let err = unet_config_error(|c| c["dual_cross_attention"] = true.into());
    assert!(err.contains("dual_cross_attention"), "{err}");
    let err = unet_config_error(|c| c["time_cond_proj_dim"] = 256.into());
    assert!(err.contains("time_cond_proj_dim"), "{err}");
    let err = unet_config_error(|c| c["time_embedding_type"] = "fourier".into());
    assert!(err.contains("time_embedding_type"), "{err}");
    let err = unet_config_error(|c| c["resnet_time_scale_shift"] = "scale_shift".into());
    assert!(err.contains("resnet_time_scale_shift"), "{err}");
    let err = unet_config_error(|c| c["only_cross_attention"] = true.into());
    assert!(err.contains("only_cross_attention"), "{err}");
    let err = unet_config_error(|c| c["attention_head_dim"] = serde_json::json!([2, 4, 8]));
    assert!(err.contains("attention_head_dim"), "{err}");
}

#[test]
fn accepts_sd_configs() {
    for case in ["unet2d_condition_sd1", "unet2d_condition_sd2"] {
        UNet2DConditionConfig::from_file(case_dir(case).join("config.json")).unwrap();
    }
    AutoencoderKLConfig::from_file(case_dir("vae_decoder").join("config.json")).unwrap();
}

#[test]
fn refuses_other_vae_block_types() {
    let text = std::fs::read_to_string(case_dir("vae_decoder").join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["up_block_types"][0] = "AttnUpDecoderBlock2D".into();
    let cfg: AutoencoderKLConfig = serde_json::from_value(json).unwrap();
    let err = cfg.check().unwrap_err().to_string();
    assert!(err.contains("AttnUpDecoderBlock2D"), "{err}");
}

/// Gradient checkpointing changes neither the output nor the input gradients, and its gradient
/// passes the finite-difference check on its own.
#[test]
fn gradient_checkpointing_matches() {
    use candle_core::Var;
    let case = "unet2d_condition_sd1";
    let plain = unet(case);
    let mut ckpt = unet(case);
    ckpt.set_gradient_checkpointing(true);
    let x = inputs_f64(case);
    let grads = |m: &UNet2DConditionModel| {
        let s = Var::from_tensor(&x["sample"]).unwrap();
        let e = Var::from_tensor(&x["encoder_hidden_states"]).unwrap();
        let y = m.forward(s.as_tensor(), 421.0, e.as_tensor()).unwrap();
        let cot =
            diffexplainer::testing::pseudo_random_tensor(y.dims(), 1.0, 3, &Device::Cpu).unwrap();
        let g = y.mul(&cot).unwrap().sum_all().unwrap().backward().unwrap();
        (
            y,
            g.get(s.as_tensor()).unwrap().clone(),
            g.get(e.as_tensor()).unwrap().clone(),
        )
    };
    let (y0, gs0, ge0) = grads(&plain);
    let (y1, gs1, ge1) = grads(&ckpt);
    assert_close(&y0, &y1, 1e-12);
    assert_close(&gs0, &gs1, 1e-10);
    assert_close(&ge0, &ge1, 1e-10);
    assert_gradient(
        "checkpointed unet d/d encoder_hidden_states",
        |ehs| ckpt.forward(&x["sample"], 421.0, ehs),
        &x["encoder_hidden_states"],
        24,
    );
}

/// VAE decoder checkpointing changes neither the image nor its gradient w.r.t. the latents.
#[test]
fn vae_decoder_checkpointing_matches() {
    use candle_core::Var;
    let plain = vae("vae_decoder", vae_weights("vae_decoder"));
    let mut ckpt = plain.clone();
    ckpt.set_gradient_checkpointing(true);
    let z = inputs_f64("vae_decoder")["latents"].clone();
    let run = |m: &AutoencoderKL| {
        let v = Var::from_tensor(&z).unwrap();
        let y = m.decode(v.as_tensor()).unwrap();
        let cot =
            diffexplainer::testing::pseudo_random_tensor(y.dims(), 1.0, 5, &Device::Cpu).unwrap();
        let g = y.mul(&cot).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(v.as_tensor()).unwrap().clone())
    };
    let (y0, g0) = run(&plain);
    let (y1, g1) = run(&ckpt);
    assert_close(&y0, &y1, 1e-12);
    assert_close(&g0, &g1, 1e-10);
}
