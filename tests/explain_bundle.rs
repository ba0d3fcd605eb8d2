//! Model bundles from files: a diffusers folder (the tiny default written to disk) gives the
//! same images as the in-code tiny models; a Hub id resolves in a local Hugging Face cache and
//! the record keeps the commit; a LoRA is fused into the UNet at load time.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use diffexplainer::explain::bundle::{
    write_tiny_diffusers_folder, ClassifierSpec, DiffusionSource, FileSource, LoraSpec,
};
use diffexplainer::explain::{
    DiffusionPipeline, ModelBundle, ModelSpec, PipelineOptions, SoftPromptInit,
};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dx-bundle-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn images(spec: &ModelSpec) -> Vec<f32> {
    let bundle = ModelBundle::load(spec, &Device::Cpu).unwrap();
    let pipeline = DiffusionPipeline::new(bundle, PipelineOptions::default()).unwrap();
    let prompt = pipeline
        .new_prompt("A texture of {}", 1, &SoftPromptInit::Word("moss".into()))
        .unwrap();
    pipeline
        .generate(prompt.template(), prompt.vectors())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn folder_spec(path: PathBuf) -> ModelSpec {
    ModelSpec {
        preset: None,
        diffusion: DiffusionSource::Dir { path },
        scheduler: None, // the folder's own (LCMScheduler)
        ..ModelSpec::tiny(0)
    }
}

#[test]
fn folders_hub_cache_and_lora() {
    let dir = temp_dir("folder");
    write_tiny_diffusers_folder(0, &dir).unwrap();
    let in_code = images(&ModelSpec::tiny(0));
    assert_eq!(images(&folder_spec(dir.clone())), in_code);

    // The same folder as a snapshot in a Hugging Face cache.
    let hf_home = temp_dir("hf");
    let repo = hf_home.join("hub/models--someone--tiny-sd");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    std::fs::rename(&dir, repo.join("snapshots/0123abcd")).unwrap();
    std::env::set_var("HF_HOME", &hf_home);
    let spec = ModelSpec {
        diffusion: DiffusionSource::Hub {
            repo: "someone/tiny-sd".into(),
            revision: None,
        },
        ..folder_spec(PathBuf::new())
    };
    let bundle = ModelBundle::load(&spec, &Device::Cpu).unwrap();
    assert_eq!(
        bundle.spec.diffusion,
        DiffusionSource::Hub {
            repo: "someone/tiny-sd".into(),
            revision: Some("0123abcd".into())
        },
        "the loaded spec records the commit found"
    );
    assert_eq!(images(&spec), in_code);
    // A revision given as a commit hash finds its snapshot directly.
    let by_commit = ModelSpec {
        diffusion: DiffusionSource::Hub {
            repo: "someone/tiny-sd".into(),
            revision: Some("0123abcd".into()),
        },
        ..spec.clone()
    };
    assert_eq!(images(&by_commit), in_code);
    let snapshot = repo.join("snapshots/0123abcd");

    // A LoRA (diffusers/PEFT keys) on the time embedding's first linear (16 -> 64), rank 2.
    let lora_path = hf_home.join("lora.safetensors");
    let t = |shape: &[usize], seed: u64| {
        diffexplainer::testing::pseudo_random_tensor(shape, 0.5, seed, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let lora: HashMap<String, Tensor> = [
        (
            "unet.time_embedding.linear_1.lora_A.weight".to_string(),
            t(&[2, 16], 1),
        ),
        (
            "unet.time_embedding.linear_1.lora_B.weight".to_string(),
            t(&[64, 2], 2),
        ),
    ]
    .into();
    candle_core::safetensors::save(&lora, &lora_path).unwrap();
    let with_lora = |scale: f64| ModelSpec {
        lora: Some(LoraSpec {
            source: FileSource::Path {
                path: lora_path.clone(),
            },
            scale,
        }),
        ..folder_spec(snapshot.clone())
    };
    assert_eq!(images(&with_lora(0.0)), in_code, "scale 0 changes nothing");
    assert_ne!(images(&with_lora(1.0)), in_code, "scale 1 changes the UNet");

    // A LoRA for another model adapts nothing here: refused, not silently ignored.
    let other: HashMap<String, Tensor> = [
        (
            "unet.no_such_block.lora_A.weight".to_string(),
            t(&[2, 16], 1),
        ),
        (
            "unet.no_such_block.lora_B.weight".to_string(),
            t(&[64, 2], 2),
        ),
    ]
    .into();
    candle_core::safetensors::save(&other, &lora_path).unwrap();
    let err = format!(
        "{:#}",
        ModelBundle::load(&with_lora(1.0), &Device::Cpu).unwrap_err()
    );
    assert!(
        err.contains("no_such_block") || err.contains("adapts none"),
        "{err}"
    );

    // Only the text encoder, for the textual explanation.
    let (tok, clip) = folder_spec(snapshot.clone())
        .load_text_encoder(&Device::Cpu)
        .unwrap();
    let (_, tiny_clip) = ModelSpec::tiny(0).load_text_encoder(&Device::Cpu).unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(
        flat(&clip.token_embedding),
        flat(&tiny_clip.token_embedding)
    );

    // A folder missing a part names it.
    std::fs::remove_dir_all(snapshot.join("vae")).unwrap();
    let err = format!(
        "{:#}",
        ModelBundle::load(&folder_spec(snapshot.clone()), &Device::Cpu).unwrap_err()
    );
    assert!(
        err.contains("`vae/`") && err.contains("AutoencoderKL"),
        "{err}"
    );
}

#[test]
fn classifier_presets_name_their_architecture_and_input_size() {
    // The committed tiny robust ResNet fixture stands in for a checkpoint of the preset's
    // architecture family; its own normalization comes from the file.
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/robust_resnet_tiny.pt");
    let spec = ClassifierSpec::preset("robust-resnet50", Some(fixture.clone())).unwrap();
    assert_eq!(spec.arch, "resnet50");
    assert_eq!(spec.input_size, 256);
    assert_eq!(spec.checkpoint, Some(fixture));
}

/// A kohya LoRA's text-encoder half is fused into the text encoder (the tiny folder's CLIP is
/// saved without transformers' `text_model.` prefix; the LoRA names it with the prefix, as
/// kohya LoRAs do); a LoRA for SDXL's second text encoder is refused, naming a module.
#[test]
fn lora_text_encoder_half_is_fused_and_sdxl_refused() {
    let dir = temp_dir("te-lora");
    write_tiny_diffusers_folder(0, &dir).unwrap();
    let in_code = images(&ModelSpec::tiny(0));
    let lora_path = dir.join("te_lora.safetensors");
    let module = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
    let lora: HashMap<String, Tensor> = [
        (
            format!("{module}.lora_down.weight"),
            Tensor::ones((2, 32), DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            format!("{module}.lora_up.weight"),
            Tensor::full(0.5f32, (32, 2), &Device::Cpu).unwrap(),
        ),
    ]
    .into();
    candle_core::safetensors::save(&lora, &lora_path).unwrap();
    let with_lora = |scale: f64| ModelSpec {
        lora: Some(LoraSpec {
            source: FileSource::Path {
                path: lora_path.clone(),
            },
            scale,
        }),
        ..folder_spec(dir.clone())
    };
    assert_eq!(images(&with_lora(0.0)), in_code, "scale 0 changes nothing");
    assert_ne!(images(&with_lora(1.0)), in_code, "the text encoder changed");
    // The text encoder alone (what `tokens` loads) has it too.
    let (_, plain) = folder_spec(dir.clone())
        .load_text_encoder(&Device::Cpu)
        .unwrap();
    let (_, fused) = with_lora(1.0).load_text_encoder(&Device::Cpu).unwrap();
    let ids = Tensor::new(&[[49406u32, 320, 49407]], &Device::Cpu).unwrap();
    let a = plain.forward(&ids).unwrap().last_hidden_state;
    let b = fused.forward(&ids).unwrap().last_hidden_state;
    let diff = common::max_abs_diff(&a, &b);
    assert!(diff > 1e-3, "{diff}");

    let sdxl: HashMap<String, Tensor> = lora
        .iter()
        .map(|(k, v)| (k.replace("lora_te_", "lora_te2_"), v.clone()))
        .collect();
    candle_core::safetensors::save(&sdxl, &lora_path).unwrap();
    let e = format!(
        "{:#}",
        ModelBundle::load(&with_lora(1.0), &Device::Cpu).unwrap_err()
    );
    assert!(
        e.contains("second text encoder") && e.contains("lora_te2_text_model_encoder_layers_0"),
        "{e}"
    );
}

/// Every scheduler runs on every bundle that ships: the tiny default in code and as a folder.
#[test]
fn every_scheduler_runs_on_the_tiny_default() {
    let dir = temp_dir("schedulers");
    write_tiny_diffusers_folder(0, &dir).unwrap();
    for scheduler in ["lcm", "euler_ancestral", "ddim"] {
        for spec in [ModelSpec::tiny(0), folder_spec(dir.clone())] {
            let spec = ModelSpec {
                scheduler: Some(scheduler.to_string()),
                ..spec
            };
            let v = images(&spec);
            assert!(v.iter().all(|x| x.is_finite()), "{scheduler}");
        }
    }
    // A folder whose config leaves DDIM's `clip_sample` at its default (true): the error names
    // the file to change and the other schedulers.
    let config = dir.join("scheduler/scheduler_config.json");
    std::fs::write(&config, r#"{"_class_name": "PNDMScheduler"}"#).unwrap();
    let spec = ModelSpec {
        scheduler: Some("ddim".to_string()),
        ..folder_spec(dir.clone())
    };
    let e = format!("{:#}", ModelBundle::load(&spec, &Device::Cpu).unwrap_err());
    assert!(
        e.contains(config.to_str().unwrap())
            && e.contains("clip_sample")
            && e.contains("euler_ancestral"),
        "{e}"
    );
}
