//! The soft prompt: placement in a template, initialization, gradients, persistence.

mod common;

use candle_core::{Device, Tensor};
use common::tiny_clip;
use diffexplainer::explain::{SoftPrompt, SoftPromptInit};
use diffexplainer::tokenizer::ClipTokenizer;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    a.sub(b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn a_word_initialized_prompt_encodes_exactly_like_the_plain_text() {
    let (tok, clip) = (ClipTokenizer::embedded().unwrap(), tiny_clip());
    let soft = SoftPrompt::new(
        "A texture of {}",
        1,
        &SoftPromptInit::Word("dog".into()),
        &tok,
        &clip,
    )
    .unwrap();
    let ours = soft.encode(&tok, &clip).unwrap();
    let ids = tok.encode_padded("A texture of dog", 77).unwrap();
    let plain = clip
        .forward(&Tensor::from_vec(ids, (1, 77), &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(
        max_diff(&ours.last_hidden_state, &plain.last_hidden_state),
        0.0
    );
    assert_eq!(max_diff(&ours.pooled, &plain.pooled), 0.0);
}

#[test]
fn placeholders_stand_where_the_template_says() {
    let (tok, clip) = (ClipTokenizer::embedded().unwrap(), tiny_clip());
    let soft = SoftPrompt::new(
        "A shape of {}",
        3,
        &SoftPromptInit::Random { seed: 1 },
        &tok,
        &clip,
    )
    .unwrap();
    let prompt = soft.prompt_ids(&tok, 77, &Device::Cpu).unwrap();
    let ids = prompt.ids.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    let text = tok.encode("A shape of").unwrap(); // bos, a, shape, of, eos
    assert_eq!(&ids[..4], &text[..4]);
    assert_eq!(&ids[4..7], &[prompt.placeholder_id; 3]);
    assert_eq!(ids[7], tok.eos_id());
    assert_eq!(
        ids.iter().filter(|&&i| i == prompt.placeholder_id).count(),
        3
    );
}

#[test]
fn the_gradient_reaches_every_soft_vector() {
    let (tok, clip) = (ClipTokenizer::embedded().unwrap(), tiny_clip());
    let soft = SoftPrompt::new("{}", 2, &SoftPromptInit::Random { seed: 3 }, &tok, &clip).unwrap();
    let out = soft.encode(&tok, &clip).unwrap();
    let grads = out
        .last_hidden_state
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = grads
        .get(soft.vectors().as_tensor())
        .expect("no gradient for the soft prompt");
    for row in 0..2 {
        let norm = g
            .get(row)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "soft vector {row} got a zero gradient");
    }
}

#[test]
fn random_init_is_seeded_and_has_the_vocabularys_norm() {
    let (tok, clip) = (ClipTokenizer::embedded().unwrap(), tiny_clip());
    let a = SoftPrompt::new("{}", 2, &SoftPromptInit::Random { seed: 5 }, &tok, &clip).unwrap();
    let b = SoftPrompt::new("{}", 2, &SoftPromptInit::Random { seed: 5 }, &tok, &clip).unwrap();
    let c = SoftPrompt::new("{}", 2, &SoftPromptInit::Random { seed: 6 }, &tok, &clip).unwrap();
    assert_eq!(
        max_diff(a.vectors().as_tensor(), b.vectors().as_tensor()),
        0.0
    );
    assert!(max_diff(a.vectors().as_tensor(), c.vectors().as_tensor()) > 0.0);
    let vocab_norm = clip
        .token_embedding
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .sqrt()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let norms = a
        .vectors()
        .as_tensor()
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .sqrt()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        norms
            .iter()
            .all(|n| (n - vocab_norm).abs() < 1e-4 * vocab_norm),
        "{norms:?} vs {vocab_norm}"
    );
}

#[test]
fn save_and_load_round_trip_and_bad_files_are_named() {
    let (tok, clip) = (ClipTokenizer::embedded().unwrap(), tiny_clip());
    let soft = SoftPrompt::new(
        "A texture of {}",
        2,
        &SoftPromptInit::Random { seed: 9 },
        &tok,
        &clip,
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("diffexplainer-soft-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("prompt.safetensors");
    soft.save(&path).unwrap();
    let back = SoftPrompt::load(&path, &Device::Cpu).unwrap();
    assert_eq!(back.template(), "A texture of {}");
    assert_eq!(
        max_diff(back.vectors().as_tensor(), soft.vectors().as_tensor()),
        0.0
    );

    let corrupt = dir.join("corrupt.safetensors");
    std::fs::write(&corrupt, b"nope").unwrap();
    let err = format!(
        "{:#}",
        SoftPrompt::load(&corrupt, &Device::Cpu).err().unwrap()
    );
    assert!(err.contains("corrupt.safetensors"), "{err}");
    let err = format!(
        "{:#}",
        SoftPrompt::load(dir.join("absent.safetensors"), &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(err.contains("absent.safetensors"), "{err}");
}

#[test]
fn bad_templates_and_sizes_are_errors() {
    let (tok, clip) = (ClipTokenizer::embedded().unwrap(), tiny_clip());
    let err = |t: &str, k: usize| {
        format!(
            "{:#}",
            SoftPrompt::new(t, k, &SoftPromptInit::Random { seed: 0 }, &tok, &clip)
                .err()
                .unwrap()
        )
    };
    assert!(err("no placeholder", 1).contains("{}"));
    assert!(err("{}", 0).contains("k = 0"));
    assert!(
        err("{}", 80).contains("77") || err("{}", 80).contains("fit"),
        "{}",
        err("{}", 80)
    );
}
