//! CLIP tokenizer: ids identical to transformers' CLIPTokenizer on OpenAI's vocabulary
//! (tests/fixtures/clip_tokenizer_ids.json, from scripts/make_tokenizer_fixture.py), every way of
//! loading it agrees, and file errors name the file.

use std::path::{Path, PathBuf};

use diffexplainer::tokenizer::{ClipTokenizer, TokenizerError, CONTEXT_LENGTH};

struct Case {
    text: String,
    ids: Vec<u32>,
    input_ids: Vec<u32>,
    decoded: String,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture() -> (serde_json::Value, Vec<Case>) {
    let path = root().join("tests/fixtures/clip_tokenizer_ids.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let cases = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().to_string(),
            ids: ids(&c["ids"]),
            input_ids: ids(&c["input_ids"]),
            decoded: c["decoded"].as_str().unwrap().to_string(),
        })
        .collect();
    (json, cases)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "diffexplainer-tokenizer-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every fixture sentence, padded to 77, through `tok` (for comparing loaders).
fn all_padded(tok: &ClipTokenizer) -> Vec<Vec<u32>> {
    let (_, cases) = fixture();
    cases
        .iter()
        .map(|c| tok.encode_padded(&c.text, CONTEXT_LENGTH).unwrap())
        .collect()
}

#[test]
fn embedded_matches_transformers_on_every_fixture_sentence() {
    let tok = ClipTokenizer::embedded().unwrap();
    let (json, cases) = fixture();
    assert_eq!(
        tok.vocab_size() as u64,
        json["vocab_size"].as_u64().unwrap()
    );
    assert_eq!(tok.bos_id() as u64, json["bos_id"].as_u64().unwrap());
    assert_eq!(tok.eos_id() as u64, json["eos_id"].as_u64().unwrap());
    assert_eq!(tok.pad_id() as u64, json["pad_id"].as_u64().unwrap());
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let ids = tok.encode(&c.text).unwrap();
        let padded = tok.encode_padded(&c.text, CONTEXT_LENGTH).unwrap();
        let decoded = tok.decode(&ids);
        if ids != c.ids || padded != c.input_ids || decoded != c.decoded {
            failures.push(format!(
                "{:?}\n  ours:   {ids:?}\n  theirs: {:?}\n  padded equal: {}\n  decoded {decoded:?} vs {:?}",
                c.text,
                c.ids,
                padded == c.input_ids,
                c.decoded
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn long_text_is_truncated_keeping_the_end_token() {
    let tok = ClipTokenizer::embedded().unwrap();
    let text = "dog ".repeat(200);
    assert_eq!(tok.encode(&text).unwrap().len(), 202);
    let padded = tok.encode_padded(&text, CONTEXT_LENGTH).unwrap();
    assert_eq!(padded.len(), CONTEXT_LENGTH);
    assert_eq!(padded[0], tok.bos_id());
    assert_eq!(padded[CONTEXT_LENGTH - 1], tok.eos_id());
    assert!(padded[1..CONTEXT_LENGTH - 1]
        .iter()
        .all(|&id| id == tok.token_id("dog</w>").unwrap()));
    assert_eq!(
        tok.encode_padded("dog", 2).unwrap(),
        [tok.bos_id(), tok.eos_id()]
    );
    let err = tok.encode_padded("dog", 1).unwrap_err();
    assert!(
        matches!(err, TokenizerError::MaxLenTooSmall { max_len: 1 }),
        "{err}"
    );
}

#[test]
fn tokens_read_as_words() {
    let tok = ClipTokenizer::embedded().unwrap();
    let dog = tok.token_id("dog</w>").unwrap();
    assert_eq!(dog, 1929);
    assert_eq!(tok.decode_token(dog).as_deref(), Some("dog"));
    assert!(tok.is_word_end(dog));
    // A word BPE splits: its pieces read as text, only the last ends the word.
    let ids = tok.encode("goldfishes").unwrap();
    assert_eq!(ids[1..ids.len() - 1], [4999, 35470]); // "gold", "fishes</w>"
    assert_eq!(tok.decode_token(4999).as_deref(), Some("gold"));
    assert_eq!(tok.decode_token(35470).as_deref(), Some("fishes"));
    assert!(!tok.is_word_end(4999) && tok.is_word_end(35470));
    assert_eq!(
        tok.decode_token(tok.eos_id()).as_deref(),
        Some("<|endoftext|>")
    );
    assert!(tok.is_special(tok.bos_id()) && !tok.is_special(dog));
    // A byte-level token: "é" is two bytes, each its own character in the vocabulary.
    let e_acute = tok.token_id("Ã©</w>").unwrap();
    assert_eq!(tok.decode_token(e_acute).as_deref(), Some("é"));
    assert_eq!(tok.decode_token(tok.vocab_size() as u32), None);
}

#[test]
fn gz_file_and_saved_folders_give_identical_ids() {
    let embedded = ClipTokenizer::embedded().unwrap();
    let expected = all_padded(&embedded);

    let gz =
        ClipTokenizer::from_bpe_merges_gz(root().join("lib/assets/bpe_simple_vocab_16e6.txt.gz"))
            .unwrap();
    assert_eq!(all_padded(&gz), expected, "from_bpe_merges_gz");

    let saved = temp_dir("saved");
    embedded.save_pretrained(&saved).unwrap();
    for name in [
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
    ] {
        assert!(saved.join(name).is_file(), "{name} not written");
    }
    let from_json = ClipTokenizer::from_file(saved.join("tokenizer.json")).unwrap();
    assert_eq!(from_json.vocab_size(), 49408);
    assert_eq!(
        (from_json.bos_id(), from_json.eos_id(), from_json.pad_id()),
        (49406, 49407, 49407)
    );
    assert_eq!(
        all_padded(&from_json),
        expected,
        "from_file(tokenizer.json)"
    );
    let from_dir_json = ClipTokenizer::from_pretrained_dir(&saved).unwrap();
    assert_eq!(
        all_padded(&from_dir_json),
        expected,
        "dir with tokenizer.json"
    );

    // The SD 1.x Hub layout: vocab.json + merges.txt only.
    let hub = temp_dir("hub");
    std::fs::copy(saved.join("vocab.json"), hub.join("vocab.json")).unwrap();
    std::fs::copy(saved.join("merges.txt"), hub.join("merges.txt")).unwrap();
    let from_hub = ClipTokenizer::from_pretrained_dir(&hub).unwrap();
    assert_eq!(from_hub.vocab_size(), 49408);
    assert_eq!(
        all_padded(&from_hub),
        expected,
        "dir with vocab.json + merges.txt"
    );
}

#[test]
fn pad_token_comes_from_the_folder_config() {
    // SD 2.x's tokenizer folder pads with "!" (id 0).
    let embedded = ClipTokenizer::embedded().unwrap();
    let saved = temp_dir("sd2");
    embedded.save_pretrained(&saved).unwrap();
    std::fs::remove_file(saved.join("tokenizer.json")).unwrap();
    // Overwrites the saved special_tokens_map.json.
    std::fs::write(
        saved.join("special_tokens_map.json"),
        r#"{"bos_token": {"content": "<|startoftext|>", "lstrip": false},
            "eos_token": "<|endoftext|>", "pad_token": "!", "unk_token": "<|endoftext|>"}"#,
    )
    .unwrap();
    let sd2 = ClipTokenizer::from_pretrained_dir(&saved).unwrap();
    assert_eq!(sd2.pad_id(), 0);
    let ids = sd2.encode_padded("a dog", CONTEXT_LENGTH).unwrap();
    let mut expected = embedded.encode("a dog").unwrap();
    expected.resize(CONTEXT_LENGTH, 0);
    assert_eq!(ids, expected);

    // Saving keeps the pad token (special_tokens_map.json), with or without tokenizer.json.
    let resaved = temp_dir("sd2-resaved");
    sd2.save_pretrained(&resaved).unwrap();
    assert_eq!(
        ClipTokenizer::from_pretrained_dir(&resaved)
            .unwrap()
            .pad_id(),
        0
    );
    std::fs::remove_file(resaved.join("tokenizer.json")).unwrap();
    assert_eq!(
        ClipTokenizer::from_pretrained_dir(&resaved)
            .unwrap()
            .pad_id(),
        0
    );

    // tokenizer_config.json is read when special_tokens_map.json is absent.
    std::fs::remove_file(saved.join("special_tokens_map.json")).unwrap();
    std::fs::write(
        saved.join("tokenizer_config.json"),
        r#"{"pad_token": "!", "model_max_length": 77}"#,
    )
    .unwrap();
    assert_eq!(
        ClipTokenizer::from_pretrained_dir(&saved).unwrap().pad_id(),
        0
    );

    // A pad token that is not in the vocabulary is an error naming it and the folder.
    std::fs::write(
        saved.join("tokenizer_config.json"),
        r#"{"pad_token": "<pad>"}"#,
    )
    .unwrap();
    let err = ClipTokenizer::from_pretrained_dir(&saved)
        .unwrap_err()
        .to_string();
    assert!(err.contains("<pad>") && err.contains("pad"), "{err}");
    assert!(err.contains(&saved.display().to_string()), "{err}");
}

#[test]
fn templates_leave_slots_for_the_soft_prompt() {
    let tok = ClipTokenizer::embedded().unwrap();
    let t = tok
        .encode_template("A texture of {}", 3, CONTEXT_LENGTH)
        .unwrap();
    assert_eq!(t.ids.len(), CONTEXT_LENGTH);
    assert_eq!(t.slots, 4..7);
    assert_eq!(&t.ids[..4], &[49406, 320, 16505, 539]); // <start> a texture of
    assert_eq!(t.ids[7], tok.eos_id());
    // With the slots filled by a word, the ids are those of the full sentence.
    let mut filled = t.ids.clone();
    filled.splice(
        t.slots.clone(),
        tok.encode("dog sled pulled")
            .unwrap()
            .into_iter()
            .skip(1)
            .take(3),
    );
    assert_eq!(
        filled,
        tok.encode_padded("A texture of dog sled pulled", CONTEXT_LENGTH)
            .unwrap()
    );
    // Text after the placeholder.
    let t = tok
        .encode_template("a {} in the snow", 2, CONTEXT_LENGTH)
        .unwrap();
    assert_eq!(t.slots, 2..4);
    assert_eq!(&t.ids[4..8], &tok.encode("in the snow").unwrap()[1..]);

    for (template, found) in [("A texture of", 0), ("{} and {}", 2)] {
        let err = tok
            .encode_template(template, 1, CONTEXT_LENGTH)
            .unwrap_err();
        assert!(
            matches!(&err, TokenizerError::Placeholder { found: f, .. } if *f == found),
            "{err}"
        );
        assert!(err.to_string().contains("{}"), "{err}");
    }
    let err = tok
        .encode_template("A texture of {}", 74, CONTEXT_LENGTH)
        .unwrap_err();
    assert!(
        matches!(err, TokenizerError::TemplateTooLong { needed: 79, .. }),
        "{err}"
    );
    assert!(tok
        .encode_template("A texture of {}", 72, CONTEXT_LENGTH)
        .is_ok());
}

#[test]
fn missing_files_are_named_in_errors() {
    let missing = std::env::temp_dir().join("diffexplainer-no-such-dir/tokenizer.json");
    let err = ClipTokenizer::from_file(&missing).unwrap_err().to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");

    let gz = std::env::temp_dir().join("diffexplainer-no-such-dir/bpe_simple_vocab_16e6.txt.gz");
    let err = ClipTokenizer::from_bpe_merges_gz(&gz)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&gz.display().to_string()), "{err}");

    let dir = std::env::temp_dir().join("diffexplainer-no-such-dir");
    let err = ClipTokenizer::from_pretrained_dir(&dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&dir.display().to_string()), "{err}");

    // A folder without a tokenizer says what it expected.
    let empty = temp_dir("empty");
    std::fs::write(empty.join("vocab.json"), "{}").unwrap();
    let err = ClipTokenizer::from_pretrained_dir(&empty)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&empty.display().to_string()) && err.contains("merges.txt"),
        "{err}"
    );

    // Corrupt files are named too.
    let bad = temp_dir("bad");
    std::fs::write(bad.join("tokenizer.json"), "not json").unwrap();
    let err = ClipTokenizer::from_file(bad.join("tokenizer.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::write(bad.join("bpe.txt.gz"), "not gzip").unwrap();
    let err = ClipTokenizer::from_bpe_merges_gz(bad.join("bpe.txt.gz"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bpe.txt.gz"), "{err}");
}
