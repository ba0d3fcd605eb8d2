//! The held-out combinations of ShapesWorld II (lib/src/world/heldout.rs).

use diffexplainer::world::heldout::{heldout_combinations, is_heldout, HOLD_OUT_ONE_IN};
use diffexplainer::world::WorldSpec;

#[test]
fn about_one_in_eight_held_out_and_every_value_still_trained() {
    let spec = WorldSpec::default_world();
    let held = heldout_combinations(&spec).unwrap();
    let total = spec.classes.len()
        * spec.values("color").unwrap().len()
        * spec.values("background").unwrap().len();
    let expected = total as f64 / HOLD_OUT_ONE_IN as f64;
    assert!(
        (held.len() as f64 - expected).abs() < 0.5 * expected,
        "{} of {total} held out",
        held.len()
    );
    assert!(held.iter().all(|c| is_heldout(&spec, c)));
    // Another seed holds out other combinations: the set follows the spec, not a list.
    let mut other = spec.clone();
    other.seed += 1;
    let held_other = heldout_combinations(&other).unwrap();
    assert_ne!(held, held_other);
}

#[test]
fn a_spec_whose_values_would_all_be_held_out_is_refused() {
    let mut spec = WorldSpec::default_world();
    // One colour and one background: six combinations; some seed holds out all of a shape's.
    spec.attributes.colors.truncate(1);
    spec.attributes.backgrounds.truncate(1);
    let mut refused = 0;
    for seed in 0..64 {
        spec.seed = seed;
        if let Err(e) = heldout_combinations(&spec) {
            let msg = e.to_string();
            assert!(msg.contains("held out"), "{msg}");
            refused += 1;
        }
    }
    assert!(refused > 0, "no seed refused a 6-combination world");
}
