//! Core / spurious labelling: the rule's arithmetic on hand-made activation maps and masks
//! (known shares, a known t-interval margin, inactive images, bad input), and a whole labelling
//! run on the embedded tiny diffusion models, the committed ShapesWorld ResNet and a tiny random
//! CLIPSeg (what it computes is checked against the kept evidence; bad input is refused before
//! anything runs).

use std::path::Path;

use candle_core::{Device, Tensor};
use diffexplainer::explain::bundle::{ClassifierSpec, ModelSpec};
use diffexplainer::explain::{
    CancelToken, DiffusionPipeline, ModelBundle, OptimizeConfig, PipelineOptions,
};
use diffexplainer::spurious::labeller::check_job;
use diffexplainer::spurious::labelling::{label_maps, query_for, summarize, tiny_random_segmenter};
use diffexplainer::spurious::{
    label_class, ClassTarget, CoreCriterion, LabelConfig, LabelRule, ObjectSegmenter, Verdict,
};

/// `n` images of 4x4: `map` and `mask` given as 16 values each, repeated per image.
fn planes(values: &[[f32; 16]]) -> Tensor {
    let flat: Vec<f32> = values.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (values.len(), 4, 4), &Device::Cpu).unwrap()
}

const TOP: [f32; 16] = [
    1., 1., 1., 1., 1., 1., 1., 1., 0., 0., 0., 0., 0., 0., 0., 0.,
];
const BOTTOM: [f32; 16] = [
    0., 0., 0., 0., 0., 0., 0., 0., 1., 1., 1., 1., 1., 1., 1., 1.,
];
const ONES: [f32; 16] = [1.; 16];
const ZEROS: [f32; 16] = [0.; 16];

/// A mask of the first `k` pixels.
fn first(k: usize) -> [f32; 16] {
    let mut m = [0.; 16];
    m[..k].iter_mut().for_each(|v| *v = 1.);
    m
}

#[test]
fn a_map_inside_the_mask_is_core_outside_is_spurious() {
    let rule = LabelRule::default();
    // Activation only in the top half, the object is the top half: share 1 in every image.
    let inside = label_maps(&planes(&[TOP; 3]), &planes(&[TOP; 3]), &rule).unwrap();
    assert_eq!(inside.shares, vec![Some(1.0); 3]);
    assert_eq!(
        (inside.score, inside.margin, inside.label),
        (Some(1.0), Some(0.0), Verdict::Core)
    );
    // The object is the bottom half: share 0.
    let outside = label_maps(&planes(&[TOP; 3]), &planes(&[BOTTOM; 3]), &rule).unwrap();
    assert_eq!(outside.shares, vec![Some(0.0); 3]);
    assert_eq!(
        (outside.score, outside.margin, outside.label),
        (Some(0.0), Some(0.0), Verdict::Spurious)
    );
}

/// The fixed-share criterion ("most of the activation on the object").
fn share_rule() -> LabelRule {
    LabelRule {
        core: CoreCriterion::Share(0.5),
        ..LabelRule::default()
    }
}

#[test]
fn the_margin_is_students_t_interval_and_a_straddling_interval_is_uncertain() {
    let rule = share_rule();
    // A uniform map over masks of 12, 14 and 16 of 16 pixels: shares 0.75, 0.875, 1.
    let s = label_maps(
        &planes(&[ONES; 3]),
        &planes(&[first(12), first(14), ONES]),
        &rule,
    )
    .unwrap();
    assert_eq!(s.shares, vec![Some(0.75), Some(0.875), Some(1.0)]);
    // mean 0.875, sd 0.125, t(0.975, 2 df) = 4.302652729749464: margin 4.3027·0.125/√3.
    let margin = 4.302652729749464 * 0.125 / 3f64.sqrt();
    assert!((s.score.unwrap() - 0.875).abs() < 1e-12);
    assert!(
        (s.margin.unwrap() - margin).abs() < 1e-9,
        "{:?} vs {margin}",
        s.margin
    );
    assert_eq!(s.label, Verdict::Core, "0.875 − 0.310 = 0.565 ≥ 0.5");

    // Shares 0.25, 0.5, 0.75: mean 0.5 ± 0.62: the interval straddles 0.5.
    let s = label_maps(
        &planes(&[ONES; 3]),
        &planes(&[first(4), first(8), first(12)]),
        &rule,
    )
    .unwrap();
    assert_eq!(s.label, Verdict::Uncertain);
    assert!((s.margin.unwrap() - 4.302652729749464 * 0.25 / 3f64.sqrt()).abs() < 1e-9);

    // The same shares at 80% confidence: t(0.9, 2 df) = 1.885618083164127; 0.5 still inside.
    let rule80 = LabelRule {
        confidence: 0.8,
        ..rule
    };
    let s = summarize(&[Some(0.25), Some(0.5), Some(0.75)], &[0.5; 3], &rule80).unwrap();
    assert!((s.margin.unwrap() - 1.885618083164127 * 0.25 / 3f64.sqrt()).abs() < 1e-9);
    assert_eq!(s.label, Verdict::Uncertain);
    // Shares well below the threshold with little spread: spurious.
    let s = summarize(
        &[Some(0.1), Some(0.2), Some(0.15), Some(0.12)],
        &[0.5; 4],
        &rule,
    )
    .unwrap();
    assert_eq!(s.label, Verdict::Spurious);
    assert!(s.score.unwrap() + s.margin.unwrap() < 0.5);
}

#[test]
fn the_default_criterion_is_the_ground_truths_density_ratio() {
    let rule = LabelRule::default();
    assert_eq!(rule.core, CoreCriterion::DensityRatio(2.0));
    // The share threshold is where ρ = (s/a)/((1−s)/(1−a)) equals 2, the ground truth's
    // `density_ratio`.
    for area in [0.05, 0.1, 0.3, 0.5, 0.8] {
        let t = rule.core.share_threshold(area);
        let rho = diffexplainer::world::truth::density_ratio(t, area);
        assert!((rho - 2.0).abs() < 1e-9, "area {area}: ρ({t}) = {rho}");
    }
    // A small object (2 of 16 pixels): a map with 0.3 of its mass on it is 3 times denser on
    // the object than off it: core by ρ, although under half the activation is on the object.
    let map: [f32; 16] = [
        3., 3., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1.,
    ];
    let s = label_maps(&planes(&[map; 4]), &planes(&[first(2); 4]), &rule).unwrap();
    assert!(
        (s.score.unwrap() - 6.0 / 20.0).abs() < 1e-6,
        "{:?}",
        s.score
    );
    assert_eq!(s.area, Some(2.0 / 16.0));
    assert_eq!(s.label, Verdict::Core);
    let s = label_maps(&planes(&[map; 4]), &planes(&[first(2); 4]), &share_rule()).unwrap();
    assert_eq!(s.label, Verdict::Spurious);
    // A uniform map has ρ = 1 whatever the object's size: spurious under ρ ≥ 2.
    for k in [2, 8, 12] {
        let s = label_maps(&planes(&[ONES; 3]), &planes(&[first(k); 3]), &rule).unwrap();
        assert_eq!(s.label, Verdict::Spurious, "mask of {k} pixels");
    }
    // A rule saved before the criterion existed (`core_threshold`, a share) still loads.
    let old: LabelRule =
        serde_json::from_str(r#"{"core_threshold": 0.5, "confidence": 0.9}"#).unwrap();
    assert_eq!(
        old,
        LabelRule {
            core: CoreCriterion::Share(0.5),
            confidence: 0.9
        }
    );
    let new: LabelRule = serde_json::from_str(&serde_json::to_string(&rule).unwrap()).unwrap();
    assert_eq!(new, rule);
}

#[test]
fn images_where_the_feature_does_not_fire_are_left_out() {
    let rule = LabelRule::default();
    let s = label_maps(
        &planes(&[TOP, ZEROS, TOP]),
        &planes(&[TOP, TOP, TOP]),
        &rule,
    )
    .unwrap();
    assert_eq!(s.shares, vec![Some(1.0), None, Some(1.0)]);
    assert_eq!((s.active(), s.label), (2, Verdict::Core));
    // One active image: a score but no margin, so no decision.
    let s = label_maps(&planes(&[TOP, ZEROS]), &planes(&[TOP, TOP]), &rule).unwrap();
    assert_eq!(
        (s.score, s.margin, s.label),
        (Some(1.0), None, Verdict::Uncertain)
    );
    // None active.
    let s = label_maps(&planes(&[ZEROS]), &planes(&[TOP]), &rule).unwrap();
    assert_eq!(
        (s.score, s.margin, s.label),
        (None, None, Verdict::Uncertain)
    );
}

#[test]
fn bad_maps_masks_and_rules_are_errors_naming_the_problem() {
    let rule = LabelRule::default();
    let mut negative = TOP;
    negative[3] = -1.0;
    let err = label_maps(&planes(&[TOP, negative]), &planes(&[TOP; 2]), &rule)
        .unwrap_err()
        .to_string();
    assert!(err.contains("image 1") && err.contains("-1"), "{err}");
    let mut big = TOP;
    big[0] = 2.0;
    let err = label_maps(&planes(&[TOP]), &planes(&[big]), &rule)
        .unwrap_err()
        .to_string();
    assert!(err.contains("mask") && err.contains('2'), "{err}");
    let err = label_maps(&planes(&[TOP; 2]), &planes(&[TOP; 3]), &rule)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[2, 4, 4]") && err.contains("[3, 4, 4]"),
        "{err}"
    );
    for bad in [
        LabelRule {
            confidence: 1.0,
            ..rule
        },
        LabelRule {
            core: CoreCriterion::Share(0.0),
            ..rule
        },
        LabelRule {
            core: CoreCriterion::DensityRatio(1.0),
            ..rule
        },
        LabelRule {
            core: CoreCriterion::DensityRatio(f64::NAN),
            ..rule
        },
    ] {
        assert!(summarize(&[Some(0.5)], &[0.5], &bad).is_err());
    }
    let err = summarize(&[Some(0.5)], &[0.5, 0.5], &rule)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 object shares but 2 mask areas"), "{err}");
    let err = summarize(&[Some(0.5)], &[1.5], &rule)
        .unwrap_err()
        .to_string();
    assert!(err.contains("mask area is 1.5"), "{err}");
    let err = summarize(&[Some(0.5), Some(1.5)], &[0.5; 2], &rule)
        .unwrap_err()
        .to_string();
    assert!(err.contains("image 1") && err.contains("1.5"), "{err}");
    assert_eq!(
        query_for("a photo of a {}", " dog ").unwrap(),
        "a photo of a dog"
    );
    assert!(query_for("a photo", "dog")
        .unwrap_err()
        .to_string()
        .contains("placeholder"));
    assert!(query_for("{} {}", "dog").is_err());
    assert!(query_for("a photo of a {}", "  ")
        .unwrap_err()
        .to_string()
        .contains("empty"));
}

fn world_classifier() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/world/classifier")
}

/// Tiny random diffusion models (32 px) with the committed ShapesWorld ResNet (32 px, 6
/// classes, 32 penultimate features), `n` images per feature.
fn pipeline(n: usize) -> DiffusionPipeline {
    let spec = ModelSpec {
        classifier: ClassifierSpec::folder(&world_classifier(), None).unwrap(),
        ..ModelSpec::tiny(0)
    };
    let bundle = ModelBundle::load(&spec, &Device::Cpu).unwrap();
    DiffusionPipeline::new(
        bundle,
        PipelineOptions {
            batch: n,
            ..PipelineOptions::default()
        },
    )
    .unwrap()
}

fn config() -> LabelConfig {
    LabelConfig {
        optimize: OptimizeConfig {
            iterations: 2,
            ..OptimizeConfig::default()
        },
        ..LabelConfig::default()
    }
}

#[test]
fn labels_a_class_on_tiny_models_and_keeps_the_evidence() {
    let pipeline = pipeline(3);
    let segmenter = tiny_random_segmenter(0).unwrap();
    let class = ClassTarget {
        index: 1,
        name: "square".into(),
    };
    let mut seen = Vec::new();
    let table = label_class(
        &pipeline,
        &segmenter,
        &class,
        &[7, 3],
        &config(),
        &CancelToken::new(),
        |row| seen.push(row.feature),
    )
    .unwrap();
    assert_eq!(seen, vec![7, 3]);
    assert_eq!(table.query, "a photo of a square");
    assert_eq!(table.rows.len(), 2);
    for (k, (row, ev)) in table.rows.iter().zip(&table.evidence).enumerate() {
        assert_eq!((row.rank, row.class_index, row.images), (k + 1, 1, 3));
        let ev = ev.as_ref().expect("evidence kept");
        assert_eq!(ev.images.dims(), &[3, 3, 32, 32]);
        assert_eq!(ev.masks.dims(), &[3, 32, 32]);
        assert_eq!(ev.maps.dims(), &[3, 32, 32]);
        // The row is what the rule gives on the kept maps and masks.
        let again = label_maps(&ev.maps, &ev.masks, &table.rule).unwrap();
        assert_eq!(again.shares, row.shares);
        assert_eq!(
            (again.score, again.margin, again.label),
            (row.score, row.margin, row.label)
        );
        // The masks are the segmenter's for the class query.
        let masks = segmenter.masks(&ev.images, &table.query).unwrap();
        let diff = (masks - &ev.masks)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "masks differ by {diff}");
        assert!(row.prompt.starts_with("A texture of "), "{}", row.prompt);
        assert!(
            row.nearest_tokens.starts_with("v0: "),
            "{}",
            row.nearest_tokens
        );
        assert!(row.objective.is_finite());
    }
    // Features are the maximized ones: different features give different images.
    let (a, b) = (
        &table.evidence[0].as_ref().unwrap().images,
        &table.evidence[1].as_ref().unwrap().images,
    );
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 0.0, "two features gave the same images");
}

#[test]
fn bad_jobs_are_refused_before_anything_runs() {
    let pipeline = pipeline(2);
    let segmenter = tiny_random_segmenter(0).unwrap();
    let square = ClassTarget {
        index: 1,
        name: "square".into(),
    };
    let check = |class: &ClassTarget, features: &[usize], config: &LabelConfig| {
        check_job(&pipeline, &segmenter, class, features, config)
            .unwrap_err()
            .to_string()
    };
    let err = check(&square, &[3, 32], &config());
    assert!(
        err.contains("feature 32") && err.contains("32 penultimate features"),
        "{err}"
    );
    let err = check(&square, &[3, 3], &config());
    assert!(err.contains("feature 3 is listed twice"), "{err}");
    let err = check(
        &ClassTarget {
            index: 6,
            name: "x".into(),
        },
        &[3],
        &config(),
    );
    assert!(
        err.contains("class id 6") && err.contains("6 classes"),
        "{err}"
    );
    assert!(check(&square, &[], &config()).contains("no features"));
    // A class name holding a special token (the text tower would stop reading there), a blank
    // one, and one too long for the text model.
    for name in ["fox <|endoftext|>", "<|startoftext|>"] {
        let class = ClassTarget {
            index: 1,
            name: name.into(),
        };
        let err = check(&class, &[3], &config());
        assert!(
            err.contains("class 1") && err.contains("special token"),
            "{err}"
        );
    }
    let blank = ClassTarget {
        index: 1,
        name: " \t".into(),
    };
    assert!(check(&blank, &[3], &config()).contains("class name is empty"));
    let long = ClassTarget {
        index: 1,
        name: "very ".repeat(80),
    };
    let err = check(&long, &[3], &config());
    assert!(
        err.contains("class 1") && err.contains("tokens long"),
        "{err}"
    );
    let err = check(
        &square,
        &[3],
        &LabelConfig {
            query_template: "a photo".into(),
            ..config()
        },
    );
    assert!(err.contains("placeholder"), "{err}");
    // The embedded default's classifier is a ViT: no activation maps.
    let vit = DiffusionPipeline::new(
        ModelBundle::tiny_random(0).unwrap(),
        PipelineOptions::default(),
    )
    .unwrap();
    let err = check_job(&vit, &segmenter, &square, &[3], &config())
        .unwrap_err()
        .to_string();
    assert!(err.contains("ResNet") && err.contains("ViT"), "{err}");
}

#[test]
fn the_class_weight_adds_the_class_logit_and_a_cancelled_run_is_an_error() {
    let pipeline = pipeline(2);
    let segmenter = tiny_random_segmenter(0).unwrap();
    let star = ClassTarget {
        index: 3,
        name: "star".into(),
    };
    let one = LabelConfig {
        optimize: OptimizeConfig {
            iterations: 1,
            ..OptimizeConfig::default()
        },
        ..LabelConfig::default()
    };
    let run = |config: &LabelConfig| {
        label_class(
            &pipeline,
            &segmenter,
            &star,
            &[6],
            config,
            &CancelToken::new(),
            |_| {},
        )
        .unwrap()
    };
    let alone = run(&one);
    let weighted = run(&LabelConfig {
        class_weight: Some(0.5),
        ..one.clone()
    });
    // One iteration: the same prompt and images; the objective gains 0.5 x the star's mean logit.
    let images = &weighted.evidence[0].as_ref().unwrap().images;
    let logit = pipeline
        .classify(images)
        .unwrap()
        .logit(3)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let gained = weighted.rows[0].objective - alone.rows[0].objective;
    assert!(
        (gained - 0.5 * logit).abs() < 1e-4,
        "objective gained {gained}, 0.5 x logit = {}",
        0.5 * logit
    );

    let cancel = CancelToken::new();
    cancel.cancel();
    let err = format!(
        "{:#}",
        label_class(&pipeline, &segmenter, &star, &[6], &one, &cancel, |_| {}).unwrap_err()
    );
    assert!(
        err.contains("feature 6") && err.contains("cancelled"),
        "{err}"
    );
}
