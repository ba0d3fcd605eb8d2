//! Loading from a model folder in the Hugging Face diffusers layout. The test writes a tiny
//! folder from the parity cases' random models (fp32 files, an fp16 variant saved by candle in
//! F16, a sharded UNet) and checks that the models load from it as from their files, and that a
//! missing piece is reported by name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use diffexplainer::models::clip_text::{ClipTextConfig, ClipTextModel};
use diffexplainer::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use diffexplainer::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use diffexplainer::pretrained;
use diffexplainer::sampling::{scheduler_from_pretrained, SchedulerKind};
use diffexplainer::weights::Checkpoint;

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/parity/cases")
        .join(name)
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

/// A fresh, empty folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "diffexplainer_from_pretrained_{tag}_{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy(from: PathBuf, to: PathBuf) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(&from, &to).unwrap();
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Saves every tensor of `from` in F16 at `to` (as a `.fp16.safetensors` variant is stored).
fn save_f16(from: &Path, to: &Path) {
    let half: HashMap<String, Tensor> = load(from)
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(&half, to).unwrap();
}

/// unet/ (fp32 + fp16), vae/ (fp32 only), text_encoder/ (fp32), scheduler/ (SD 1.5's PNDM
/// config), model_index.json.
fn write_folder(root: &Path) {
    let unet = case("unet2d_condition_sd1");
    copy(unet.join("config.json"), root.join("unet/config.json"));
    copy(
        unet.join("weights.safetensors"),
        root.join("unet/diffusion_pytorch_model.safetensors"),
    );
    save_f16(
        &unet.join("weights.safetensors"),
        &root.join("unet/diffusion_pytorch_model.fp16.safetensors"),
    );
    let vae = case("vae_decoder");
    copy(vae.join("config.json"), root.join("vae/config.json"));
    copy(
        vae.join("weights.safetensors"),
        root.join("vae/diffusion_pytorch_model.safetensors"),
    );
    let clip = case("clip_text_gelu");
    copy(
        clip.join("config.json"),
        root.join("text_encoder/config.json"),
    );
    copy(
        clip.join("weights.safetensors"),
        root.join("text_encoder/model.safetensors"),
    );
    copy(
        fixture("schedulers/configs/sd15.json"),
        root.join("scheduler/scheduler_config.json"),
    );
    std::fs::write(
        root.join("model_index.json"),
        r#"{"_class_name": "StableDiffusionPipeline"}"#,
    )
    .unwrap();
}

fn unet_direct() -> UNet2DConditionModel {
    let dir = case("unet2d_condition_sd1");
    let cfg = UNet2DConditionConfig::from_file(dir.join("config.json")).unwrap();
    let vb = Checkpoint::open(dir.join("weights.safetensors"))
        .unwrap()
        .into_var_builder(DType::F32, &Device::Cpu);
    UNet2DConditionModel::new(vb, &cfg).unwrap()
}

fn unet_output(unet: &UNet2DConditionModel) -> Tensor {
    let x = load(&case("unet2d_condition_sd1").join("inputs.safetensors"));
    unet.forward_with_timesteps(&x["sample"], &x["timestep"], &x["encoder_hidden_states"])
        .unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b.abs().unwrap().max_all().unwrap();
    (d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap()) as f64
}

fn err(r: candle_core::Result<impl Sized>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn models_load_from_a_diffusers_folder() {
    let tmp = TempDir::new("load");
    let root = &tmp.0;
    write_folder(root);
    let cpu = &Device::Cpu;

    let unet = UNet2DConditionModel::from_pretrained(root, None, DType::F32, cpu).unwrap();
    assert_eq!(
        max_rel(&unet_output(&unet), &unet_output(&unet_direct())),
        0.0
    );

    let vae = AutoencoderKL::from_pretrained(root, None, DType::F32, cpu).unwrap();
    assert!(vae.encoder.is_some());
    let decoder = AutoencoderKL::decoder_only_from_pretrained(root, None, DType::F32, cpu).unwrap();
    assert!(decoder.encoder.is_none());
    let cfg = AutoencoderKLConfig::from_file(case("vae_decoder").join("config.json")).unwrap();
    let direct = AutoencoderKL::decoder_only(
        Checkpoint::open(case("vae_decoder").join("weights.safetensors"))
            .unwrap()
            .into_var_builder(DType::F32, cpu),
        &cfg,
    )
    .unwrap();
    let z = load(&case("vae_decoder").join("inputs.safetensors"))["latents"].clone();
    assert_eq!(
        max_rel(&decoder.decode(&z).unwrap(), &direct.decode(&z).unwrap()),
        0.0
    );

    let clip = ClipTextModel::from_pretrained(root, None, DType::F32, cpu).unwrap();
    let cfg = ClipTextConfig::from_file(case("clip_text_gelu").join("config.json")).unwrap();
    let direct = ClipTextModel::new(
        Checkpoint::open(case("clip_text_gelu").join("weights.safetensors"))
            .unwrap()
            .into_var_builder(DType::F32, cpu),
        &cfg,
    )
    .unwrap();
    let ids = load(&case("clip_text_gelu").join("inputs.safetensors"))["input_ids"].clone();
    assert_eq!(
        max_rel(
            &clip.forward(&ids).unwrap().last_hidden_state,
            &direct.forward(&ids).unwrap().last_hidden_state
        ),
        0.0
    );
}

#[test]
fn fp16_variant_is_read_when_asked() {
    let tmp = TempDir::new("fp16");
    let root = &tmp.0;
    write_folder(root);
    let files = pretrained::weight_files(root, &pretrained::UNET, Some("fp16")).unwrap();
    assert_eq!(
        files,
        vec![root.join("unet/diffusion_pytorch_model.fp16.safetensors")]
    );
    let stored = Checkpoint::open(&files[0])
        .unwrap()
        .tensor("conv_in.weight")
        .unwrap();
    assert_eq!(stored.dtype(), DType::F16);

    // Loaded as f32 from half-precision weights: close to the f32 model, not equal to it.
    let unet = UNet2DConditionModel::from_pretrained(root, Some("fp16"), DType::F32, &Device::Cpu)
        .unwrap();
    let rel = max_rel(&unet_output(&unet), &unet_output(&unet_direct()));
    assert!(rel > 0.0 && rel < 1e-2, "fp16 variant vs f32: rel {rel}");
}

#[test]
fn sharded_weights_load() {
    let tmp = TempDir::new("sharded");
    let root = &tmp.0;
    write_folder(root);
    let unet_dir = root.join("unet");
    std::fs::remove_file(unet_dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let all = load(&case("unet2d_condition_sd1").join("weights.safetensors"));
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        let part: HashMap<String, Tensor> = chunk
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&part, unet_dir.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        unet_dir.join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let unet = UNet2DConditionModel::from_pretrained(root, None, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        max_rel(&unet_output(&unet), &unet_output(&unet_direct())),
        0.0
    );
}

/// transformers writes and reads `pytorch_model.bin` for the text encoder (not diffusers'
/// `diffusion_pytorch_model.bin`): a folder holding only that file loads, to the same model.
#[test]
fn text_encoder_from_transformers_pytorch_model_bin() {
    let tmp = TempDir::new("bin");
    let root = &tmp.0;
    write_folder(root);
    let cpu = &Device::Cpu;
    let from_st = ClipTextModel::from_pretrained(root, None, DType::F32, cpu).unwrap();
    std::fs::remove_file(root.join("text_encoder/model.safetensors")).unwrap();
    copy(
        fixture("clip_text_gelu_pytorch_model.bin"),
        root.join("text_encoder/pytorch_model.bin"),
    );
    let from_bin = ClipTextModel::from_pretrained(root, None, DType::F32, cpu).unwrap();
    let a = from_st.token_embedding.clone();
    let b = from_bin.token_embedding.clone();
    assert_eq!(max_rel(&a, &b), 0.0);
    let files = pretrained::weight_files(root, &pretrained::TEXT_ENCODER, None).unwrap();
    assert_eq!(files, vec![root.join("text_encoder/pytorch_model.bin")]);
}

/// Shards of torch.save files (`*.bin.index.json`) are read into one checkpoint.
#[test]
fn torch_save_shards_open_together() {
    let c = Checkpoint::open_all(&[
        fixture("torch_views_legacy.pt"),
        fixture("resnet_tiny_plain.pth"),
    ])
    .unwrap();
    let n = Checkpoint::open(fixture("resnet_tiny_plain.pth"))
        .unwrap()
        .names()
        .len();
    assert_eq!(c.names().len(), n + 7);
    assert!(c.origin().contains("torch_views_legacy.pt"));
}

#[test]
fn missing_pieces_are_named() {
    let tmp = TempDir::new("missing");
    let root = &tmp.0;
    write_folder(root);
    let cpu = &Device::Cpu;

    // The VAE has no fp16 variant: the error names the file tried and what is there.
    let e = err(AutoencoderKL::from_pretrained(
        root,
        Some("fp16"),
        DType::F32,
        cpu,
    ));
    assert!(
        e.contains("diffusion_pytorch_model.fp16.safetensors")
            && e.contains("the folder holds config.json, diffusion_pytorch_model.safetensors")
            && e.contains("only the `fp16` variant"),
        "{e}"
    );

    // Nothing matches: every name tried, and every file there.
    std::fs::remove_file(root.join("text_encoder/model.safetensors")).unwrap();
    std::fs::write(root.join("text_encoder/tf_model.h5"), b"not read").unwrap();
    let e = err(ClipTextModel::from_pretrained(root, None, DType::F32, cpu));
    assert!(
        e.contains("text_encoder")
            && e.contains(
                "model.safetensors, model.safetensors.index.json, pytorch_model.bin, \
                           pytorch_model.bin.index.json"
            )
            && e.contains("the folder holds config.json, tf_model.h5")
            && e.contains("TensorFlow"),
        "{e}"
    );

    std::fs::remove_file(root.join("vae/config.json")).unwrap();
    let e = err(AutoencoderKL::from_pretrained(root, None, DType::F32, cpu));
    assert!(
        e.contains("vae/config.json") && e.contains("AutoencoderKL"),
        "{e}"
    );

    std::fs::remove_dir_all(root.join("unet")).unwrap();
    let e = err(UNet2DConditionModel::from_pretrained(
        root,
        None,
        DType::F32,
        cpu,
    ));
    assert!(e.contains("no `unet/` folder"), "{e}");

    let e = err(UNet2DConditionModel::from_pretrained(
        root.join("nowhere"),
        None,
        DType::F32,
        cpu,
    ));
    assert!(e.contains("model folder not found"), "{e}");
}

#[test]
fn scheduler_from_a_diffusers_folder() {
    let tmp = TempDir::new("scheduler");
    let root = &tmp.0;
    write_folder(root);
    // SD 1.5 ships a PNDM config: building "its" class is refused, naming it.
    let e = err(scheduler_from_pretrained(root, None));
    assert!(
        e.contains("PNDMScheduler") && e.contains("scheduler_config.json"),
        "{e}"
    );
    // LCMScheduler.from_config(SD 1.5's config), as for LCM-LoRA.
    let mut lcm = scheduler_from_pretrained(root, Some(SchedulerKind::Lcm)).unwrap();
    lcm.set_timesteps(4).unwrap();
    assert_eq!(lcm.timesteps(), &[999.0, 759.0, 499.0, 259.0]);
    // A config naming an implemented class builds it without a kind.
    let path = root.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("PNDMScheduler", "DDIMScheduler");
    std::fs::write(&path, text).unwrap();
    let mut ddim = scheduler_from_pretrained(root, None).unwrap();
    ddim.set_timesteps(4).unwrap();
    assert_eq!(ddim.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
}
