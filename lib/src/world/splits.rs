//! The splits: image `index` of a split is drawn from its own random stream seeded by
//! (spec seed, split, index), so any image can be made alone, in any order, on any machine.
//!
//! Classes cycle (`index % number of classes`), so every split is class-balanced. In the biased
//! splits the other attributes follow the spec's per-class [`Distributions`]; in the balanced
//! split each is uniform and independent of the class.

use candle_core::{Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::render::{self, size_radius, Scene};
use super::spec::{WorldSpec, ATTRIBUTES};
use crate::rng::SeededRng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Validation,
    Balanced,
}

impl Split {
    fn code(self) -> u64 {
        match self {
            Split::Train => 1,
            Split::Validation => 2,
            Split::Balanced => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Balanced => "balanced",
        }
    }

    pub fn len(self, spec: &WorldSpec) -> usize {
        match self {
            Split::Train => spec.splits.train,
            Split::Validation => spec.splits.validation,
            Split::Balanced => spec.splits.balanced,
        }
    }

    pub fn is_biased(self) -> bool {
        self != Split::Balanced
    }
}

/// One image's record: class id, scene (attributes and geometry) and caption.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub split: Split,
    pub index: usize,
    pub class: usize,
    pub scene: Scene,
    pub caption: String,
}

impl Sample {
    /// The value of `color`, `texture`, `background`, `size` or `shape`.
    pub fn attribute(&self, name: &str) -> &str {
        let s = &self.scene;
        match name {
            "shape" => &s.shape,
            "color" => &s.color,
            "texture" => &s.texture,
            "background" => &s.background,
            "size" => &s.size,
            other => panic!("unknown attribute `{other}`"),
        }
    }
}

fn stream(spec: &WorldSpec, split: Split, index: usize) -> SeededRng {
    let mut rng = SeededRng::new(
        spec.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ split.code().wrapping_mul(0xD1B5_4A32_D192_ED03)
            ^ (index as u64).wrapping_mul(0xABC9_8388_FB8F_AC03),
    );
    rng.next_u64();
    rng
}

fn pick(rng: &mut SeededRng, probs: &[f64]) -> usize {
    let total: f64 = probs.iter().sum();
    let mut u = rng.uniform() * total;
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return i;
        }
        u -= p;
    }
    // Rounding: the last value with positive probability.
    probs.iter().rposition(|p| *p > 0.0).unwrap_or(0)
}

/// Draws image `index` of `split` (the spec must be valid).
pub fn sample(spec: &WorldSpec, split: Split, index: usize) -> Sample {
    let mut rng = stream(spec, split, index);
    let class = index % spec.classes.len();
    let dists = spec.distributions();
    let mut values = Vec::new();
    for (a, attribute) in ATTRIBUTES.iter().enumerate() {
        let vocab = spec.values(attribute).expect("a known attribute");
        let v = if split.is_biased() {
            pick(&mut rng, &dists.biased[a][class])
        } else {
            pick(&mut rng, &vec![1.0; vocab.len()])
        };
        values.push(vocab[v].clone());
    }
    let [color, texture, background, size]: [String; 4] =
        values.try_into().expect("four attributes");
    let side = spec.image_size as f32;
    let g = &spec.geometry;
    let jitter = 1.0 + g.scale_jitter * (2.0 * rng.uniform() as f32 - 1.0);
    let radius = size_radius(&size) * side * jitter;
    // Keep the whole object (circumradius) inside the image.
    let free = (side - 2.0 * radius).max(0.0);
    let center = [
        radius + free * rng.uniform() as f32,
        radius + free * rng.uniform() as f32,
    ];
    let rotation = g.max_rotation_degrees.to_radians() * (2.0 * rng.uniform() as f32 - 1.0);
    let background_seed = rng.next_u64();
    let template =
        &spec.captions.templates[(rng.next_u64() % spec.captions.templates.len() as u64) as usize];
    let scene = Scene {
        shape: spec.classes[class].clone(),
        color,
        texture,
        background,
        size,
        center,
        radius,
        rotation,
        background_seed,
    };
    let caption = render::caption(template, &scene);
    Sample {
        split,
        index,
        class,
        scene,
        caption,
    }
}

/// Images `[n, 3, s, s]` in [0, 1] (f32, CPU) from rendered scenes.
pub fn images_tensor(rendered: &[render::Rendered]) -> Result<Tensor> {
    let s = rendered.first().map_or(0, |r| r.size);
    let mut data = Vec::with_capacity(rendered.len() * 3 * s * s);
    for r in rendered {
        for k in 0..3 {
            data.extend(r.rgb.iter().skip(k).step_by(3).map(|&v| v as f32 / 255.0));
        }
    }
    Tensor::from_vec(data, (rendered.len(), 3, s, s), &Device::Cpu)
}

/// Masks `[n, 1, s, s]` (coverage in [0, 1]).
pub fn masks_tensor(rendered: &[render::Rendered]) -> Result<Tensor> {
    let s = rendered.first().map_or(0, |r| r.size);
    let data: Vec<f32> = rendered
        .iter()
        .flat_map(|r| r.mask.iter().copied())
        .collect();
    Tensor::from_vec(data, (rendered.len(), 1, s, s), &Device::Cpu)
}

/// A whole split, drawn and rendered.
pub struct Dataset {
    pub samples: Vec<Sample>,
    pub rendered: Vec<render::Rendered>,
}

impl Dataset {
    /// The first `n` images of `split` (all of it when `n` is `None`).
    pub fn new(spec: &WorldSpec, split: Split, n: Option<usize>) -> Self {
        let n = n.unwrap_or(split.len(spec)).min(split.len(spec));
        let samples: Vec<Sample> = (0..n).map(|i| sample(spec, split, i)).collect();
        let rendered = samples
            .iter()
            .map(|s| render::render(&s.scene, spec.image_size))
            .collect();
        Self { samples, rendered }
    }

    pub fn images(&self) -> Result<Tensor> {
        images_tensor(&self.rendered)
    }

    pub fn labels(&self) -> Result<Tensor> {
        let l: Vec<u32> = self.samples.iter().map(|s| s.class as u32).collect();
        Tensor::new(l, &Device::Cpu)
    }
}
