//! `diffexplainer world ...`: render writes a grid PNG, masks and records; train-classifier and
//! truth run end to end on a tiny world and give finite numbers with the right structure; bad
//! arguments fail before anything is written.

use std::path::PathBuf;
use std::process::{Command, Output};

use diffexplainer::world::spec::DEFAULT_SPEC;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffexplainer"))
        .args(args)
        .output()
        .unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dx-world-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn render_writes_a_grid_masks_and_records() {
    let out = temp_dir("render");
    let o = run(&[
        "world",
        "render",
        "--n",
        "9",
        "--split",
        "balanced",
        "--zoom",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    ok(&o);
    let grid = image::open(out.join("grid.png")).unwrap().to_rgb8();
    // 3 × 3 tiles of 64 px with 2-px gaps.
    assert_eq!(grid.dimensions(), (3 * 66 + 2, 3 * 66 + 2));
    let masks = image::open(out.join("masks.png")).unwrap().to_rgb8();
    assert_eq!(masks.dimensions(), grid.dimensions());
    assert_eq!(std::fs::read_dir(out.join("images")).unwrap().count(), 9);
    assert_eq!(std::fs::read_dir(out.join("masks")).unwrap().count(), 9);
    let records = std::fs::read_to_string(out.join("records.jsonl")).unwrap();
    assert_eq!(records.lines().count(), 9);
    let first: serde_json::Value = serde_json::from_str(records.lines().next().unwrap()).unwrap();
    for key in ["class", "scene", "caption", "index"] {
        assert!(first.get(key).is_some(), "record lacks {key}: {first}");
    }
    // A mask PNG is white on the object, black elsewhere.
    let m = image::open(out.join("masks").join("balanced_00000.png"))
        .unwrap()
        .to_luma8();
    assert!(m.pixels().any(|p| p.0[0] == 255) && m.pixels().any(|p| p.0[0] == 0));
    // Rendering again into the same folder is refused and leaves the first rendering alone.
    let before = std::fs::read(out.join("records.jsonl")).unwrap();
    let o = run(&[
        "world",
        "render",
        "--n",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("already holds a rendering"), "{err}");
    assert_eq!(std::fs::read(out.join("records.jsonl")).unwrap(), before);
    assert_eq!(std::fs::read_dir(out.join("images")).unwrap().count(), 9);
    // Any size on request.
    let big = temp_dir("render-big");
    ok(&run(&[
        "world",
        "render",
        "--n",
        "1",
        "--size",
        "64",
        "--zoom",
        "1",
        "--out",
        big.to_str().unwrap(),
    ]));
    assert_eq!(
        image::open(big.join("images").join("train_00000.png"))
            .unwrap()
            .width(),
        64
    );
    // Bad arguments: nothing written.
    let bad = temp_dir("render-bad");
    let o = run(&[
        "world",
        "render",
        "--n",
        "5000",
        "--out",
        bad.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--n 5000"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!bad.exists());
    // --start + --n past usize::MAX, and a grid too large to hold: errors, nothing written.
    for (args, says) in [
        (
            &["--start", "18446744073709551615", "--n", "2"][..],
            "--start",
        ),
        (
            &["--n", "3", "--size", "1024", "--zoom", "64"][..],
            "grid would be",
        ),
    ] {
        let mut all = vec!["world", "render", "--out", bad.to_str().unwrap()];
        all.extend_from_slice(args);
        let o = run(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{args:?}: {err}");
        assert!(!bad.exists(), "{args:?} wrote {}", bad.display());
    }
    let spec = bad.with_extension("toml");
    std::fs::write(
        &spec,
        DEFAULT_SPEC.replace("probability = 0.95", "probability = 2"),
    )
    .unwrap();
    let o = run(&[
        "world",
        "render",
        "--spec",
        spec.to_str().unwrap(),
        "--out",
        bad.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("correlations[0].probability = 2"));
    assert!(!bad.exists());
    for d in [out, big] {
        let _ = std::fs::remove_dir_all(d);
    }
    let _ = std::fs::remove_file(spec);
}

#[test]
fn train_classifier_then_truth_on_a_tiny_world() {
    let dir = temp_dir("truth");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = dir.join("tiny.toml");
    let mut text = DEFAULT_SPEC.to_string();
    for (from, to) in [
        ("train = 3600", "train = 120"),
        ("validation = 1200", "validation = 36"),
        ("balanced = 1200", "balanced = 36"),
        ("epochs = 12", "epochs = 1"),
        ("widths = [8, 16, 32, 32]", "widths = [4, 8, 8, 8]"),
        ("stem_width = 8", "stem_width = 4"),
    ] {
        assert!(text.contains(from), "the default spec has no `{from}`");
        text = text.replacen(from, to, 1);
    }
    std::fs::write(&spec, text).unwrap();
    let model = dir.join("classifier");
    let (spec_s, model_s) = (spec.to_str().unwrap(), model.to_str().unwrap());
    let o = run(&[
        "world",
        "train-classifier",
        "--spec",
        spec_s,
        "--out",
        model_s,
        "--quiet",
    ]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("bias-conflicting"));
    for f in ["config.json", "model.safetensors", "report.json"] {
        assert!(model.join(f).is_file(), "{f} missing");
    }
    assert!(
        !model.join("checkpoint").exists(),
        "the checkpoint is left behind"
    );
    // Training into the finished folder again is refused, the folder untouched.
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    let o = run(&[
        "world",
        "train-classifier",
        "--spec",
        spec_s,
        "--out",
        model_s,
        "--quiet",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("already holds a trained model"), "{err}");
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        before
    );
    let o = run(&[
        "world",
        "truth",
        "--spec",
        spec_s,
        "--classifier",
        model_s,
        "--images-per-class",
        "3",
        "--top-k",
        "2",
    ]);
    ok(&o);
    let truth: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("truth.json")).unwrap()).unwrap();
    let md = std::fs::read_to_string(model.join("truth.md")).unwrap();
    assert!(md.contains("| class |"), "{md}");
    // 6 classes × (6 colours + 3 textures + 8 backgrounds + 3 sizes) reliance rows.
    let rows = truth["reliance"].as_array().unwrap();
    assert_eq!(rows.len(), 6 * 20);
    for r in rows {
        for key in ["p_with", "p_without", "reliance", "induction"] {
            let v = r[key].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v.abs() <= 1.0, "{key} = {v} in {r}");
        }
    }
    assert_eq!(rows.iter().filter(|r| r["planted"] == true).count(), 3);
    assert_eq!(truth["removal"].as_array().unwrap().len(), 6);
    let features = truth["features"].as_array().unwrap();
    assert_eq!(features.len(), 6);
    for f in features {
        let list = f["features"].as_array().unwrap();
        assert_eq!(list.len(), 2);
        for row in list {
            assert!(row["feature"].as_u64().unwrap() < 8);
            assert!(row["score"].as_f64().unwrap().is_finite());
            let label = row["label"].as_str().unwrap();
            assert!(label == "core" || label == "spurious");
            // A share is in [0, 1] (null in JSON when the channel never fired).
            if let Some(s) = row["object_share"].as_f64() {
                assert!((0.0..=1.0).contains(&s), "{row}");
            }
        }
    }
    let acc = truth["accuracy"].as_array().unwrap();
    assert_eq!(acc.len(), 2);
    assert_eq!(acc[1]["overall"]["total"], 36);
    // A classifier for another world is refused.
    let other = dir.join("other.toml");
    std::fs::write(
        &other,
        std::fs::read_to_string(&spec).unwrap().replace(
            r#"classes = ["circle", "square""#,
            r#"classes = ["square", "circle""#,
        ),
    )
    .unwrap();
    let o = run(&[
        "world",
        "truth",
        "--spec",
        other.to_str().unwrap(),
        "--classifier",
        model_s,
    ]);
    assert!(!o.status.success());
    // Same classes, another world (a rotation range the classifier never saw): refused, naming
    // both spec fingerprints, instead of a truth that describes neither.
    let rotated = dir.join("rotated.toml");
    std::fs::write(
        &rotated,
        std::fs::read_to_string(&spec).unwrap().replace(
            "max_rotation_degrees = 45.0",
            "max_rotation_degrees = 180.0",
        ),
    )
    .unwrap();
    let out = dir.join("rotated-truth");
    let o = run(&[
        "world",
        "truth",
        "--spec",
        rotated.to_str().unwrap(),
        "--classifier",
        model_s,
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("spec fingerprint"),
        "{err}"
    );
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `check-vae` measures on held-out images only: a count reaching into the images the checker
/// and the autoencoder train on is refused before any model is read.
#[test]
fn check_vae_refuses_images_beyond_the_held_out_range() {
    let o = run(&[
        "world",
        "check-vae",
        "--model",
        "/nonexistent-model",
        "--checker",
        "/nonexistent-checker",
        "--images",
        "1300",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--images 1300: at most 1200"), "{err}");
}
