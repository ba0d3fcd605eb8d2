//! The world's CLIP (ShapesWorld II): the contrastive loss is CLIP's with distinct captions, a
//! few steps lower it, a resumed run ends with the uninterrupted run's weights, no held-out
//! combination reaches a training batch, the written folders load through the project's
//! loaders (nearest tokens restricted to the trained ones), and bad configs are refused by name.

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor};
use diffexplainer::explain::{nearest_tokens, nearest_tokens_among};
use diffexplainer::models::clip_text::ClipTextModel;
use diffexplainer::tokenizer::ClipTokenizer;
use diffexplainer::world::clip::{self, ClipTrainConfig, TrainableClip, TrainingData};
use diffexplainer::world::heldout;
use diffexplainer::world::spec::WorldSpec;
use diffexplainer::world::train::Checkpointing;

fn tiny() -> ClipTrainConfig {
    ClipTrainConfig {
        train_images: 48,
        eval_images: 12,
        epochs: 4,
        batch_size: 16,
        lr: 3e-3,
        text_hidden_size: 16,
        text_intermediate_size: 32,
        text_layers: 1,
        text_heads: 2,
        vision_hidden_size: 16,
        vision_intermediate_size: 32,
        vision_layers: 1,
        vision_heads: 2,
        patch_size: 8,
        projection_dim: 16,
        ..ClipTrainConfig::default()
    }
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dx-clip-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn data(config: &ClipTrainConfig) -> (WorldSpec, TrainingData) {
    let spec = WorldSpec::default_world();
    let data = clip::training_data(&spec, config).unwrap();
    (spec, data)
}

fn bits(model: &TrainableClip) -> Vec<(String, Vec<u32>)> {
    let mut t: Vec<_> = model
        .tensors()
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (n, v.iter().map(|x| x.to_bits()).collect())
        })
        .collect();
    t.sort();
    t
}

#[test]
fn with_distinct_captions_the_loss_is_clips() {
    let dev = Device::Cpu;
    let image = Tensor::new(&[[1f32, 0.5, 0.0], [0.2, 1.0, 0.3], [0.0, 0.1, 2.0]], &dev).unwrap();
    let text = Tensor::new(
        &[[0.9f32, 0.1, 0.2], [0.3, 0.8, 0.0], [0.1, 0.4, 1.0]],
        &dev,
    )
    .unwrap();
    let scale = Tensor::new(10f32, &dev).unwrap();
    let eye: Vec<Vec<bool>> = (0..3).map(|i| (0..3).map(|j| i == j).collect()).collect();
    let loss = clip::contrastive_loss(&image, &text, &scale, &eye)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    // CLIP's pseudocode: logits = s * norm(I) norm(T)^T; (CE(logits, arange) + CE(logits^T,
    // arange)) / 2.
    let unit = |rows: &Tensor| -> Vec<Vec<f64>> {
        rows.to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|r| {
                let n = r.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                r.iter().map(|x| *x as f64 / n).collect()
            })
            .collect()
    };
    let (i, t) = (unit(&image), unit(&text));
    let logits: Vec<Vec<f64>> = (0..3)
        .map(|a| {
            (0..3)
                .map(|b| 10.0 * (0..3).map(|k| i[a][k] * t[b][k]).sum::<f64>())
                .collect()
        })
        .collect();
    let ce = |row: &[f64], target: usize| {
        let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
        lse - row[target]
    };
    let i2t: f64 = (0..3).map(|a| ce(&logits[a], a)).sum::<f64>() / 3.0;
    let col = |b: usize| (0..3).map(|a| logits[a][b]).collect::<Vec<_>>();
    let t2i: f64 = (0..3).map(|b| ce(&col(b), b)).sum::<f64>() / 3.0;
    assert!(
        (loss - (i2t + t2i) / 2.0).abs() < 1e-4,
        "{loss} vs {}",
        (i2t + t2i) / 2.0
    );
    // A shared caption: text 1 also describes image 0, so row 0's target splits over both.
    let mut shared = eye.clone();
    shared[0][1] = true;
    let l2 = clip::contrastive_loss(&image, &text, &scale, &shared)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let i2t2 =
        (0.5 * ce(&logits[0], 0) + 0.5 * ce(&logits[0], 1) + ce(&logits[1], 1) + ce(&logits[2], 2))
            / 3.0;
    let t2i2 =
        (ce(&col(0), 0) + 0.5 * ce(&col(1), 0) + 0.5 * ce(&col(1), 1) + ce(&col(2), 2)) / 3.0;
    assert!((l2 - (i2t2 + t2i2) / 2.0).abs() < 1e-4);
    // The diagonal must be positive.
    let mut bad = eye;
    bad[2][2] = false;
    assert!(clip::contrastive_loss(&image, &text, &scale, &bad).is_err());
}

#[test]
fn a_few_steps_lower_the_loss_and_no_heldout_combination_is_trained_on() {
    let config = ClipTrainConfig {
        epochs: 8,
        ..tiny()
    };
    let (spec, data) = data(&config);
    // The training images skip the held-out combinations (and some were skipped).
    let start = config.train_start(&spec);
    let last = data.samples.last().unwrap().index;
    assert!(last >= start + config.train_images, "nothing was skipped");
    let mut seen = Vec::new();
    let model = TrainableClip::new(&config, spec.image_size, config.seed).unwrap();
    let report = clip::train_on(
        &model,
        &spec,
        &data,
        &config,
        None,
        false,
        0,
        0,
        |_, _| Ok(()),
        |indices, captions| seen.push((indices.to_vec(), captions.to_vec())),
    )
    .unwrap();
    let losses = report.epoch_losses;
    assert!(
        losses[losses.len() - 1] < 0.9 * losses[0],
        "the loss did not fall: {losses:?}"
    );
    assert_eq!(seen.len(), report.total_steps);
    let mut templates_used = BTreeSet::new();
    for (indices, captions) in &seen {
        for (&i, c) in indices.iter().zip(captions) {
            let s = diffexplainer::world::sample(&spec, diffexplainer::world::Split::Balanced, i);
            assert!(
                i >= start,
                "balanced image {i} is one of the held-out images"
            );
            assert!(
                !heldout::scene_is_heldout(&spec, &s.scene),
                "image {i} of a held-out combination reached a batch"
            );
            assert!(clip::captions_of(&spec, &s.scene).contains(c));
            templates_used.insert(c.split_whitespace().count());
        }
    }
    // Images are paired with several templates' captions.
    assert!(templates_used.len() >= 3, "{templates_used:?}");
}

#[test]
fn resumed_training_ends_with_the_uninterrupted_weights() {
    let full = ClipTrainConfig {
        checkpoint_every: 4,
        epochs: 2,
        ..tiny()
    };
    let (spec, data) = data(&full);
    let run = |ckpt: Option<&Checkpointing>, resumed_at: usize, stop_at: Option<usize>| {
        let model = TrainableClip::new(&full, spec.image_size, full.seed).unwrap();
        let r = clip::train_on(
            &model,
            &spec,
            &data,
            &full,
            ckpt,
            false,
            resumed_at,
            1,
            |step, _| match stop_at {
                Some(s) if step == s => anyhow::bail!("interrupted"),
                _ => Ok(()),
            },
            |_, _| {},
        );
        (model, r)
    };
    let (a, r) = run(None, 0, None);
    r.unwrap();
    // Interrupted at step 5 (after the step-4 checkpoint), then resumed: the epoch boundary
    // (3 steps per epoch) lies before the checkpoint, so the resumed run must pick the second
    // epoch's captions.
    let dir = scratch("resume");
    let ckpt = Checkpointing { dir: dir.clone() };
    let (_, r) = run(Some(&ckpt), 0, Some(5));
    assert!(r.unwrap_err().to_string().contains("interrupted"));
    let (b, r) = run(Some(&ckpt), 4, None);
    assert_eq!(r.unwrap().resumed_at, 4);
    assert_eq!(bits(&a), bits(&b));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_folders_load_and_nearest_tokens_keep_to_the_trained_ones() {
    let spec = WorldSpec::default_world();
    let dir = scratch("folder");
    let config = ClipTrainConfig {
        epochs: 1,
        ..tiny()
    };
    let record = clip::train_and_save(&spec, &config, &dir, false).unwrap();
    let d = clip::diffusion_dir(&dir);
    for f in [
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/trained_tokens.json",
        "image_encoder/config.json",
        "image_encoder/model.safetensors",
        "feature_extractor/preprocessor_config.json",
    ] {
        assert!(d.join(f).is_file(), "{f} missing");
    }
    assert!(dir.join("clip/report.json").is_file());
    assert!(!dir.join("clip/checkpoint").exists());
    assert_eq!(record.final_scores.attributes.len(), 4);
    assert!((record.logit_scale - 1.0 / 0.07).abs() < 1.0);
    // transformers' class names and the short context.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("text_encoder/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architectures"][0], "CLIPTextModelWithProjection");
    assert_eq!(cfg["max_position_embeddings"], 32);
    let tok_cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("tokenizer/tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tok_cfg["model_max_length"], 32);

    let tokenizer = ClipTokenizer::from_pretrained_dir(d.join("tokenizer")).unwrap();
    assert_eq!(tokenizer.vocab_size(), 49408);
    let (text, _projection, vision) = clip::load_towers(&d).unwrap();
    assert_eq!(text.config().max_position_embeddings, 32);
    assert_eq!(vision.vision_model.config().patch_size, 8);
    let text2 = ClipTextModel::from_pretrained(&d, None, DType::F32, &Device::Cpu).unwrap();
    let trained = text2
        .trained_tokens()
        .expect("the folder lists its trained tokens");
    assert_eq!(trained.len(), record.trained_tokens);
    // Exactly the tokens of the captions: every word of the world, and no other.
    let circle = tokenizer.token_id("circle</w>").unwrap();
    let dog = tokenizer.token_id("dog</w>").unwrap();
    assert!(trained.contains(&circle) && !trained.contains(&dog));

    // An untrained token's own embedding: unrestricted, it is its own nearest token; with the
    // trained list, only trained tokens are offered.
    let table = &text2.token_embedding;
    let v = table
        .index_select(&Tensor::new(&[dog], &Device::Cpu).unwrap(), 0)
        .unwrap();
    let free = nearest_tokens_among("a {}", &v, table, None, &tokenizer, 3).unwrap();
    assert_eq!(free.nearest[0][0].id, dog);
    let e = nearest_tokens("a {}", &v, &text2, &tokenizer, 3).unwrap();
    assert!(e.nearest[0].iter().all(|t| trained.contains(&t.id)), "{e}");
    assert_ne!(e.nearest[0][0].id, dog);
    // A trained token is still found.
    let c = table
        .index_select(&Tensor::new(&[circle], &Device::Cpu).unwrap(), 0)
        .unwrap();
    let e = nearest_tokens("a {}", &c, &text2, &tokenizer, 1).unwrap();
    assert_eq!(e.prompt, "a circle");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_configs_and_trained_token_files_are_named() {
    let spec = WorldSpec::default_world();
    let e = ClipTrainConfig {
        patch_size: 5,
        ..tiny()
    }
    .check(&spec)
    .unwrap_err()
    .to_string();
    assert!(e.contains("patch_size = 5"), "{e}");
    let e = ClipTrainConfig {
        text_heads: 3,
        ..tiny()
    }
    .check(&spec)
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("text_hidden_size = 16") && e.contains("text_heads = 3"),
        "{e}"
    );
    let e = ClipTrainConfig {
        batch_size: 1,
        ..tiny()
    }
    .check(&spec)
    .unwrap_err()
    .to_string();
    assert!(e.contains("batch_size = 1"), "{e}");
    // A context too short for the world's captions names the longest caption.
    let dir = scratch("bad");
    let e = clip::train_and_save(
        &spec,
        &ClipTrainConfig {
            max_position_embeddings: 6,
            ..tiny()
        },
        &dir,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("max_position_embeddings = 6") && e.contains("needs"),
        "{e}"
    );
    assert!(!clip::diffusion_dir(&dir).exists(), "wrote before refusing");
    // Unknown keys in a config file are refused.
    let e = toml::from_str::<ClipTrainConfig>("epochs = 2\nhiden_size = 8\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("hiden_size"), "{e}");
    // A trained-token list with an id outside the vocabulary is refused with the file.
    let te = dir.join("text_encoder");
    std::fs::create_dir_all(&te).unwrap();
    std::fs::write(
        te.join("trained_tokens.json"),
        r#"{"token_ids": [1, 60000]}"#,
    )
    .unwrap();
    let e = diffexplainer::models::clip_text::read_trained_tokens(&te, 49408)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("trained_tokens.json") && e.contains("60000"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
