//! ShapesWorld specs: the default is valid and plants what its comments say; malformed specs
//! are errors naming the field and the value.

use diffexplainer::world::spec::{WorldSpec, ATTRIBUTES, DEFAULT_SPEC};

/// The default spec with `edit` applied to its text.
fn edited(from: &str, to: &str) -> String {
    assert!(
        DEFAULT_SPEC.contains(from),
        "the default spec has no `{from}`"
    );
    DEFAULT_SPEC.replacen(from, to, 1)
}

fn error_of(text: &str) -> String {
    match WorldSpec::from_toml(text, "test.toml") {
        Ok(_) => panic!("the spec was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error `{msg}` does not name `{p}`");
    }
}

#[test]
fn the_default_spec_is_valid_with_two_kinds_of_plants_and_clean_classes() {
    let spec = WorldSpec::default_world();
    let kinds: std::collections::BTreeSet<_> = spec
        .correlations
        .iter()
        .map(|c| c.attribute.as_str())
        .collect();
    assert!(
        kinds.contains("background"),
        "no background plant: {kinds:?}"
    );
    assert!(
        kinds.contains("color") || kinds.contains("texture"),
        "{kinds:?}"
    );
    let planted: Vec<_> = spec.correlations.iter().map(|c| c.class.as_str()).collect();
    let clean = spec
        .classes
        .iter()
        .filter(|c| !planted.contains(&c.as_str()))
        .count();
    assert!(clean >= 2, "only {clean} clean classes");
    // Every class's per-attribute distribution sums to 1 and plants show their probability.
    let d = spec.distributions();
    for (a, per_class) in d.biased.iter().enumerate() {
        for (c, probs) in per_class.iter().enumerate() {
            let s: f64 = probs.iter().sum();
            assert!(
                (s - 1.0).abs() < 1e-9,
                "{} of class {c} sums to {s}",
                ATTRIBUTES[a]
            );
        }
    }
    for p in &spec.correlations {
        let a = ATTRIBUTES.iter().position(|x| *x == p.attribute).unwrap();
        let c = spec.classes.iter().position(|x| *x == p.class).unwrap();
        let v = spec
            .values(&p.attribute)
            .unwrap()
            .iter()
            .position(|x| *x == p.value)
            .unwrap();
        assert_eq!(d.biased[a][c][v], p.probability);
    }
}

#[test]
fn an_unknown_attribute_value_names_the_field_and_value() {
    let msg = error_of(&edited(r#""gray", "beige""#, r#""gray", "lava""#));
    assert_names(
        &msg,
        &[
            "attributes.backgrounds[1]",
            "`lava`",
            "unknown attribute value",
        ],
    );
}

#[test]
fn an_unknown_attribute_in_a_correlation_names_the_field_and_value() {
    let msg = error_of(&edited(r#"attribute = "color""#, r#"attribute = "colour""#));
    assert_names(
        &msg,
        &["correlations[1].attribute", "`colour`", "unknown attribute"],
    );
}

#[test]
fn a_probability_outside_0_1_names_the_field_and_value() {
    let msg = error_of(&edited("probability = 0.95", "probability = 1.5"));
    assert_names(&msg, &["correlations[0].probability", "1.5", "[0, 1]"]);
    let msg = error_of(&edited("elsewhere = 0.01", "elsewhere = -0.2"));
    assert_names(&msg, &["correlations[0].elsewhere", "-0.2", "[0, 1]"]);
}

#[test]
fn a_class_that_can_have_no_images_names_the_class_and_the_fields() {
    // One texture only, and the cross may never have it.
    let text = edited(
        r#"textures = ["plain", "stripes", "dots"]"#,
        r#"textures = ["stripes"]"#,
    )
    .replacen(
        "value = \"stripes\"\nprobability = 0.95",
        "value = \"stripes\"\nprobability = 0.0",
        1,
    );
    let msg = error_of(&text);
    assert_names(
        &msg,
        &[
            "class `cross`",
            "correlations[2].probability = 0",
            "can have no images",
        ],
    );
}

#[test]
fn a_correlation_naming_an_unknown_class_names_the_field_and_value() {
    let msg = error_of(&edited(r#"class = "star""#, r#"class = "hexagon""#));
    assert_names(
        &msg,
        &[
            "correlations[0].class",
            "`hexagon`",
            "not one of the classes",
        ],
    );
}

#[test]
fn other_malformed_specs_are_refused() {
    // Unknown fields (serde's deny_unknown_fields) name the key.
    let msg = error_of(&edited(
        "seed = 0\nimage_size",
        "seed = 0\nimage_sise = 3\nimage_size",
    ));
    assert_names(&msg, &["image_sise"]);
    // A class that is not a shape of the vocabulary.
    let msg = error_of(&edited(
        r#""heart", "cross"]
"#,
        r#""heart", "moon"]
"#,
    ));
    assert_names(&msg, &["classes[5]", "`moon`"]);
    // A value not in the attribute's vocabulary.
    let msg = error_of(&edited(r#"value = "grass""#, r#"value = "red""#));
    assert_names(&msg, &["correlations[0].value", "`red`", "background"]);
    // Probabilities for one class's attribute summing over 1: sky is 90% of every other
    // class's backgrounds, grass 95% of the stars'.
    let msg = error_of(&format!(
        "{DEFAULT_SPEC}\n[[correlations]]\nclass = \"circle\"\nattribute = \"background\"\n\
         value = \"sky\"\nprobability = 0.5\nelsewhere = 0.9\n"
    ));
    assert_names(&msg, &["class `star`", "background", "sum to"]);
    // An empty split.
    let msg = error_of(&edited("balanced = 1200", "balanced = 0"));
    assert_names(&msg, &["splits.balanced", "0"]);
}
