//! The committed default classifier (lib/assets/world/classifier) belongs to the default world
//! and really has the planted shortcuts, by measurement.

use std::path::Path;

use diffexplainer::models::classifiers::ClassifierFolderConfig;
use diffexplainer::world::classifier;
use diffexplainer::world::spec::WorldSpec;
use diffexplainer::world::truth::{self, TruthConfig};

#[test]
fn the_committed_classifier_has_the_planted_shortcuts() {
    let spec = WorldSpec::default_world();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/world/classifier");
    let folder = ClassifierFolderConfig::read(&dir).unwrap();
    assert_eq!(
        folder.metadata["spec_fingerprint"].as_str(),
        Some(spec.fingerprint().as_str()),
        "the committed classifier was trained on another spec: retrain it with \
         `diffexplainer world train-classifier --out lib/assets/world/classifier`"
    );
    let (c, pre) = classifier::load_for(&spec, &dir).unwrap();
    let config = TruthConfig {
        images_per_class: 10,
        accuracy: false,
        ..TruthConfig::default()
    };
    let t = truth::measure(&spec, &c, &pre, &config).unwrap();
    for p in &spec.correlations {
        let row = t
            .reliance
            .iter()
            .find(|r| r.class == p.class && r.attribute == p.attribute && r.value == p.value)
            .unwrap();
        assert!(row.planted);
        assert!(
            row.learned_shortcut,
            "planted {} <- {} = {} not learned: {row:?}",
            p.class, p.attribute, p.value
        );
    }
    // The structure the spurious-feature scoring reads.
    assert_eq!(t.features.len(), spec.classes.len());
    for f in &t.features {
        assert_eq!(f.features.len(), config.top_k);
        assert!(f.mean_object_area > 0.05 && f.mean_object_area < 0.6);
        for r in &f.features {
            let expected = truth::density_ratio(r.object_share, f.mean_object_area);
            assert!((r.object_density_ratio - expected).abs() < 1e-9);
            let core = r.object_density_ratio >= config.core_density_ratio;
            assert_eq!(r.label, if core { "core" } else { "spurious" }, "{r:?}");
        }
    }
}

#[test]
fn the_object_density_ratio_is_one_for_a_uniform_map_whatever_the_area() {
    for area in [0.05, 0.14, 0.26, 0.5, 0.9] {
        // A uniform map's share is the area.
        assert!((truth::density_ratio(area, area) - 1.0).abs() < 1e-12);
        // Twice as dense on the object: share / area = 2 (1 − share) / (1 − area).
        let share = 2.0 * area / (1.0 + area);
        assert!((truth::density_ratio(share, area) - 2.0).abs() < 1e-12);
        assert!(truth::density_ratio(area / 2.0, area) < 1.0);
    }
    assert!(truth::density_ratio(1.0, 0.2).is_infinite());
}
