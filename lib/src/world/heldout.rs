//! Held-out attribute combinations (ShapesWorld II, issue 13 item 2).
//!
//! The generative models (CLIP, the UNet) are judged on captions of (shape, colour, background)
//! combinations they never saw in training: about one in eight of the spec's combinations, picked
//! by a hash of the spec seed and the three value names, so the choice is a function of the spec
//! alone (a spec written later gets its own held-out set, no list to maintain). Every shape,
//! colour and background value still occurs in training: [`heldout_combinations`] refuses a spec
//! where the hash would hold out every combination of some value.

use super::render::Scene;
use super::spec::WorldSpec;

/// One in `HOLD_OUT_ONE_IN` combinations is held out.
pub const HOLD_OUT_ONE_IN: u64 = 8;

/// A (shape, colour, background) combination.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Combination {
    pub shape: String,
    pub color: String,
    pub background: String,
}

impl Combination {
    pub fn of(scene: &Scene) -> Self {
        Self {
            shape: scene.shape.clone(),
            color: scene.color.clone(),
            background: scene.background.clone(),
        }
    }
}

// FNV-1a over the names, then a 64-bit mix: stable across platforms and Rust versions (unlike
// `std::hash`).
fn hash(seed: u64, c: &Combination) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for part in [&c.shape, &c.color, &c.background] {
        for b in part.bytes().chain(std::iter::once(0xff)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Whether the combination is held out of the generative models' training.
pub fn is_heldout(spec: &WorldSpec, c: &Combination) -> bool {
    hash(spec.seed, c) % HOLD_OUT_ONE_IN == 0
}

/// Whether the scene's combination is held out.
pub fn scene_is_heldout(spec: &WorldSpec, scene: &Scene) -> bool {
    is_heldout(spec, &Combination::of(scene))
}

/// The held-out combinations of the spec, sorted; an error when some shape, colour or background
/// would never be seen in training, or when nothing is held out.
pub fn heldout_combinations(spec: &WorldSpec) -> anyhow::Result<Vec<Combination>> {
    let colors = spec.values("color").expect("a known attribute");
    let backgrounds = spec.values("background").expect("a known attribute");
    let mut all = Vec::new();
    for shape in &spec.classes {
        for color in colors {
            for background in backgrounds {
                all.push(Combination {
                    shape: shape.clone(),
                    color: color.clone(),
                    background: background.clone(),
                });
            }
        }
    }
    let held: Vec<Combination> = all
        .iter()
        .filter(|c| is_heldout(spec, c))
        .cloned()
        .collect();
    let seen = |pick: &dyn Fn(&Combination) -> &String, value: &String| {
        all.iter().any(|c| pick(c) == value && !is_heldout(spec, c))
    };
    for (attribute, values, pick) in [
        (
            "shape",
            spec.classes.as_slice(),
            (|c: &Combination| &c.shape) as fn(&Combination) -> &String,
        ),
        ("color", colors, |c: &Combination| &c.color),
        ("background", backgrounds, |c: &Combination| &c.background),
    ] {
        if let Some(v) = values.iter().find(|v| !seen(&pick, v)) {
            anyhow::bail!(
                "world spec: every combination with {attribute} = {v:?} is held out of the \
                 generative models' training; change the spec's seed"
            );
        }
    }
    if held.is_empty() {
        anyhow::bail!(
            "world spec: no (shape, colour, background) combination is held out ({} in all); \
             the generative models could not be judged on unseen combinations",
            all.len()
        );
    }
    Ok(held)
}
