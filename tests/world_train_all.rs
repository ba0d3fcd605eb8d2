//! `world train` (lib/src/world/train_all.rs): every model of a world into one folder, finished
//! models skipped on a rerun, other worlds and configs refused.

use diffexplainer::world::train_all::{spec_path, train_world, WorldModel};
use diffexplainer::world::WorldSpec;

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dx-train-all-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The default world with tiny splits and models: seconds to train.
fn tiny_spec() -> WorldSpec {
    let mut spec = WorldSpec::default_world();
    spec.splits.train = 48;
    spec.splits.validation = 24;
    spec.splits.balanced = 24;
    spec.classifier.epochs = 1;
    spec.classifier.batch_size = 16;
    spec.checker.train_images = 32;
    spec.checker.eval_images = 24;
    spec.checker.epochs = 1;
    spec.checker.batch_size = 16;
    spec.checker.widths = [8, 8, 8, 8];
    spec.checker.stem_width = 8;
    spec
}

#[test]
fn trains_every_model_then_a_rerun_skips_them() {
    let dir = scratch("rerun");
    let out = dir.join("world");
    let spec = tiny_spec();
    let mut seen = Vec::new();
    let first = train_world(&spec, &out, &[], false, |o| seen.push(o.model)).unwrap();
    assert_eq!(seen, WorldModel::ALL.to_vec());
    assert!(first.iter().all(|o| !o.skipped));
    for m in WorldModel::ALL {
        let d = m.dir(&out);
        for f in ["config.json", "model.safetensors", "report.json"] {
            assert!(d.join(f).is_file(), "{} lacks {f}", d.display());
        }
        assert!(
            !d.join("checkpoint").exists(),
            "{} kept its checkpoint",
            d.display()
        );
    }
    assert_eq!(WorldSpec::from_file(spec_path(&out)).unwrap(), spec);
    // Model files get the mode any new file gets (the safetensors crate makes them 0600).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let plain = dir.join("plain.txt");
        std::fs::write(&plain, "x").unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for m in WorldModel::ALL {
            let weights = m.dir(&out).join("model.safetensors");
            assert_eq!(mode(&weights), mode(&plain), "{}", weights.display());
        }
    }
    let checker_weights =
        std::fs::read(WorldModel::Checker.dir(&out).join("model.safetensors")).unwrap();

    let again = train_world(&spec, &out, &[], false, |_| {}).unwrap();
    assert!(again.iter().all(|o| o.skipped), "{again:?}");
    assert!(again[0].summary.contains("shape"), "{}", again[0].summary);
    assert_eq!(
        std::fs::read(WorldModel::Checker.dir(&out).join("model.safetensors")).unwrap(),
        checker_weights
    );

    // --only retrains nothing finished either, and trains only what it names.
    let only = train_world(&spec, &out, &[WorldModel::Classifier], false, |_| {}).unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].model, WorldModel::Classifier);
}

#[test]
fn other_worlds_configs_and_folders_are_refused_before_training() {
    let dir = scratch("refused");
    let spec = tiny_spec();

    // A folder with other files in it is not taken over.
    let busy = dir.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), "mine").unwrap();
    let err = train_world(&spec, &busy, &[], false, |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a world folder"), "{err}");
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);

    // A world folder of another spec is refused.
    let out = dir.join("world");
    train_world(&spec, &out, &[WorldModel::Checker], false, |_| {}).unwrap();
    let mut other = spec.clone();
    other.seed += 1;
    let err = train_world(&other, &out, &[], false, |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("another spec"), "{err}");

    // A finished model whose report names another config is refused, not reused: the spec file
    // is edited by hand under it.
    let mut edited = spec.clone();
    edited.checker.epochs = 2;
    std::fs::write(spec_path(&out), toml::to_string(&edited).unwrap()).unwrap();
    let err = train_world(&edited, &out, &[WorldModel::Checker], false, |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("finished with another `config`"), "{err}");
    // Removing the checker's folder retrains it with the new table; the classifier is kept.
    std::fs::remove_dir_all(diffexplainer::world::train_all::WorldModel::Checker.dir(&out))
        .unwrap();
    let redone = train_world(&edited, &out, &[WorldModel::Checker], false, |_| {}).unwrap();
    assert!(!redone[0].skipped);
    assert_eq!(WorldSpec::from_file(spec_path(&out)).unwrap(), edited);
    // The classifier does not depend on the checker's table: the world's fingerprint leaves
    // model tables out.
    assert_eq!(edited.fingerprint(), spec.fingerprint());

    // A bad [checker] table is named when the spec is read.
    let text = toml::to_string(&WorldSpec::default_world()).unwrap() + "\n[checker]\nlr = -1.0\n";
    let err = WorldSpec::from_toml(&text, "bad.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("[checker]") && err.contains("lr"), "{err}");
}
