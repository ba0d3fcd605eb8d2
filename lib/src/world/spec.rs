//! The world spec: a TOML file naming the attribute vocabularies, the classes (shapes), the
//! planted correlations, split sizes and a seed. [`WorldSpec::from_toml`] parses and validates
//! it; every error names the field and the value (`correlations[1].probability = 1.5: ...`).
//!
//! A planted correlation `{ class, attribute, value, probability, elsewhere }` means: in the
//! *biased* splits (train, validation) an image of `class` has `attribute = value` with
//! `probability`, and an image of any other class has it with `elsewhere` (default: the
//! uniform share `1 / number of values`). Values no correlation fixes for a class share what
//! is left uniformly. The *balanced* split ignores correlations: every attribute is uniform and
//! independent of the class. See `docs/shapesworld.md`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::render::{BACKGROUNDS, COLORS, SHAPES, SIZES, TEXTURES};

/// The attributes an image has besides its shape (the class), as named in correlations.
pub const ATTRIBUTES: &[&str] = &["color", "texture", "background", "size"];

/// Caption templates used when the spec gives none. Placeholders: `{shape}`, `{color}`,
/// `{texture}` (an adjective: "striped", "dotted"; empty for plain), `{background}` (a phrase:
/// "on grass", "in the snow").
pub const DEFAULT_TEMPLATES: &[&str] = &[
    "a {color} {shape} {background}",
    "a {shape}",
    "{background_noun}",
    "a {color} {texture} {shape} {background}",
    "a photo of a {texture} {shape}",
];

/// The placeholders a caption template may use.
pub const PLACEHOLDERS: &[&str] = &["shape", "color", "texture", "background", "background_noun"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldSpec {
    /// Seed of every random draw (attributes, geometry, captions); an image is a function of
    /// (spec, split, index).
    pub seed: u64,
    /// Side of the square RGB images in pixels.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// The classes, each a shape of `attributes.shapes`; class id = position in this list.
    pub classes: Vec<String>,
    pub attributes: Attributes,
    #[serde(default)]
    pub geometry: Geometry,
    pub splits: Splits,
    #[serde(default)]
    pub correlations: Vec<Correlation>,
    #[serde(default)]
    pub captions: Captions,
    /// The classifier under audit: its tiny ResNet and how it is trained.
    #[serde(default)]
    pub classifier: ClassifierSection,
    /// ShapesWorld II's attribute checker (`world train`, `world train-checker`). Left out of
    /// the serialized spec (and so of its fingerprint) when default, so adding the table did
    /// not change the fingerprints recorded with earlier models.
    #[serde(default, skip_serializing_if = "is_default")]
    pub checker: super::checker::CheckerConfig,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The classifier under audit (`world train-classifier`): a ResNet with torchvision's blocks
/// and names at a tiny config, with the small-image stem (3×3/1 conv, no pool), trained on the
/// biased train split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierSection {
    /// Seed of the initial weights and of the batch order.
    pub seed: u64,
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak AdamW learning rate (cosine decay to 0).
    pub lr: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Output channels of the stem conv.
    pub stem_width: usize,
    /// Stage widths (`layer1`..`layer4`).
    pub widths: [usize; 4],
    /// Basic blocks per stage.
    pub layers: [usize; 4],
    /// Stride of each stage's first block; the product is the image side over the side of the
    /// last feature map (whose spatial maps the ground truth reads).
    pub strides: [usize; 4],
}

impl Default for ClassifierSection {
    fn default() -> Self {
        Self {
            seed: 0,
            epochs: 12,
            batch_size: 128,
            lr: 5e-3,
            weight_decay: 1e-2,
            stem_width: 8,
            widths: [8, 16, 32, 32],
            layers: [1, 1, 1, 1],
            strides: [2, 2, 1, 1],
        }
    }
}

fn default_image_size() -> usize {
    32
}

/// The vocabularies: every name must be one the renderer draws (see `render::SHAPES` etc.).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attributes {
    pub shapes: Vec<String>,
    pub colors: Vec<String>,
    pub textures: Vec<String>,
    pub backgrounds: Vec<String>,
    pub sizes: Vec<String>,
}

/// Random placement: the object's centre keeps it inside the image; rotation is uniform in
/// `[-max_rotation_degrees, max_rotation_degrees]`; the radius is the size's nominal radius times
/// a factor uniform in `[1 - scale_jitter, 1 + scale_jitter]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Geometry {
    pub max_rotation_degrees: f32,
    pub scale_jitter: f32,
}

impl Default for Geometry {
    fn default() -> Self {
        Self {
            max_rotation_degrees: 45.0,
            scale_jitter: 0.1,
        }
    }
}

/// Number of images in each split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Splits {
    /// Biased (correlations applied): the classifier trains on it.
    pub train: usize,
    /// Biased, held out.
    pub validation: usize,
    /// Every attribute independent of the class.
    pub balanced: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Correlation {
    pub class: String,
    /// `color`, `texture`, `background` or `size`.
    pub attribute: String,
    pub value: String,
    /// P(attribute = value | class) in the biased splits.
    pub probability: f64,
    /// P(attribute = value | another class) in the biased splits (default: 1 / number of
    /// values).
    pub elsewhere: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Captions {
    pub templates: Vec<String>,
}

impl Default for Captions {
    fn default() -> Self {
        Self {
            templates: DEFAULT_TEMPLATES.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// A malformed spec: the field (TOML path) and what is wrong with its value.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {field} = {value}: {problem}")]
pub struct SpecError {
    pub origin: String,
    pub field: String,
    pub value: String,
    pub problem: String,
}

/// The per-class probability of each value of each attribute in the biased splits, derived
/// from the correlations (the balanced split is uniform).
#[derive(Debug, Clone, PartialEq)]
pub struct Distributions {
    /// `[attribute][class][value]`, attributes in [`ATTRIBUTES`] order.
    pub biased: Vec<Vec<Vec<f64>>>,
}

impl WorldSpec {
    /// Reads and validates a spec file.
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read the world spec: {e}", path.display()))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates TOML; `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, anyhow::Error> {
        let spec: Self = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{origin}: malformed world spec: {e}"))?;
        spec.validate(origin)?;
        Ok(spec)
    }

    /// The default world, committed at `lib/assets/world/default.toml` and compiled in.
    pub fn default_world() -> Self {
        Self::from_toml(DEFAULT_SPEC, "default.toml").expect("the committed default spec is valid")
    }

    /// The values of an attribute by its name in [`ATTRIBUTES`] (or `shape`).
    pub fn values(&self, attribute: &str) -> Option<&[String]> {
        let a = &self.attributes;
        Some(match attribute {
            "shape" => &a.shapes,
            "color" => &a.colors,
            "texture" => &a.textures,
            "background" => &a.backgrounds,
            "size" => &a.sizes,
            _ => return None,
        })
    }

    /// Checks everything a renderer or sampler relies on.
    pub fn validate(&self, origin: &str) -> Result<(), SpecError> {
        let err = |field: String, value: String, problem: String| SpecError {
            origin: origin.to_string(),
            field,
            value,
            problem,
        };
        if !(8..=1024).contains(&self.image_size) {
            return Err(err(
                "image_size".into(),
                self.image_size.to_string(),
                "must be between 8 and 1024 pixels".into(),
            ));
        }
        let vocabularies: [(&str, &[String], &[&str]); 5] = [
            ("shapes", &self.attributes.shapes, SHAPES),
            ("colors", &self.attributes.colors, COLORS),
            ("textures", &self.attributes.textures, TEXTURES),
            ("backgrounds", &self.attributes.backgrounds, BACKGROUNDS),
            ("sizes", &self.attributes.sizes, SIZES),
        ];
        for (name, values, known) in vocabularies {
            if values.is_empty() {
                return Err(err(
                    format!("attributes.{name}"),
                    "[]".into(),
                    "needs at least one value".into(),
                ));
            }
            for (i, v) in values.iter().enumerate() {
                if !known.contains(&v.as_str()) {
                    return Err(err(
                        format!("attributes.{name}[{i}]"),
                        format!("`{v}`"),
                        format!(
                            "unknown attribute value (the renderer knows: {})",
                            known.join(", ")
                        ),
                    ));
                }
                if values[..i].contains(v) {
                    return Err(err(
                        format!("attributes.{name}[{i}]"),
                        format!("`{v}`"),
                        "listed twice".into(),
                    ));
                }
            }
        }
        if self.classes.len() < 2 {
            return Err(err(
                "classes".into(),
                format!("{:?}", self.classes),
                "a classifier needs at least two classes".into(),
            ));
        }
        for (i, c) in self.classes.iter().enumerate() {
            if !self.attributes.shapes.contains(c) {
                return Err(err(
                    format!("classes[{i}]"),
                    format!("`{c}`"),
                    format!(
                        "a class is a shape of attributes.shapes ({})",
                        self.attributes.shapes.join(", ")
                    ),
                ));
            }
            if self.classes[..i].contains(c) {
                return Err(err(
                    format!("classes[{i}]"),
                    format!("`{c}`"),
                    "listed twice".into(),
                ));
            }
        }
        let g = &self.geometry;
        if !(0.0..=180.0).contains(&g.max_rotation_degrees) {
            return Err(err(
                "geometry.max_rotation_degrees".into(),
                g.max_rotation_degrees.to_string(),
                "must be in [0, 180]".into(),
            ));
        }
        if !(0.0..0.5).contains(&g.scale_jitter) {
            return Err(err(
                "geometry.scale_jitter".into(),
                g.scale_jitter.to_string(),
                "must be in [0, 0.5)".into(),
            ));
        }
        for (name, n) in [
            ("train", self.splits.train),
            ("validation", self.splits.validation),
            ("balanced", self.splits.balanced),
        ] {
            if n == 0 {
                return Err(err(
                    format!("splits.{name}"),
                    "0".into(),
                    "every split needs at least one image".into(),
                ));
            }
        }
        for (i, c) in self.correlations.iter().enumerate() {
            let field = |f: &str| format!("correlations[{i}].{f}");
            if !self.classes.contains(&c.class) {
                return Err(err(
                    field("class"),
                    format!("`{}`", c.class),
                    format!("not one of the classes ({})", self.classes.join(", ")),
                ));
            }
            let Some(values) = self.values(&c.attribute).filter(|_| c.attribute != "shape") else {
                return Err(err(
                    field("attribute"),
                    format!("`{}`", c.attribute),
                    format!("unknown attribute (known: {})", ATTRIBUTES.join(", ")),
                ));
            };
            if !values.contains(&c.value) {
                return Err(err(
                    field("value"),
                    format!("`{}`", c.value),
                    format!(
                        "not a value of attribute `{}` (the spec lists: {})",
                        c.attribute,
                        values.join(", ")
                    ),
                ));
            }
            for (name, p) in [
                ("probability", Some(c.probability)),
                ("elsewhere", c.elsewhere),
            ] {
                if let Some(p) = p {
                    if !(0.0..=1.0).contains(&p) {
                        return Err(err(
                            field(name),
                            p.to_string(),
                            "a probability must be in [0, 1]".into(),
                        ));
                    }
                }
            }
            if let Some(j) = self.correlations[..i]
                .iter()
                .position(|o| o.class == c.class && o.attribute == c.attribute)
            {
                return Err(err(
                    field("class"),
                    format!("`{}`", c.class),
                    format!(
                        "correlations[{j}] already plants attribute `{}` for this class",
                        c.attribute
                    ),
                ));
            }
            if let Some(j) = self.correlations[..i]
                .iter()
                .position(|o| o.attribute == c.attribute && o.value == c.value)
            {
                return Err(err(
                    field("value"),
                    format!("`{}`", c.value),
                    format!(
                        "correlations[{j}] already plants {} = `{}` for class `{}`; one value \
                         can be planted for one class only",
                        c.attribute, c.value, self.correlations[j].class
                    ),
                ));
            }
        }
        self.distributions_checked(origin).map(|_| ())?;
        let c = &self.classifier;
        const POSITIVE: &str = "must be positive";
        for (field, value, ok, rule) in [
            ("epochs", c.epochs.to_string(), c.epochs > 0, POSITIVE),
            (
                "batch_size",
                c.batch_size.to_string(),
                c.batch_size > 0,
                POSITIVE,
            ),
            (
                "lr",
                c.lr.to_string(),
                c.lr > 0.0 && c.lr.is_finite(),
                "must be a positive number",
            ),
            (
                "weight_decay",
                c.weight_decay.to_string(),
                c.weight_decay >= 0.0 && c.weight_decay.is_finite(),
                "must be a number ≥ 0",
            ),
            (
                "stem_width",
                c.stem_width.to_string(),
                c.stem_width > 0,
                POSITIVE,
            ),
            (
                "widths",
                format!("{:?}", c.widths),
                c.widths.iter().all(|w| *w > 0),
                "must all be positive",
            ),
            (
                "layers",
                format!("{:?}", c.layers),
                c.layers.iter().all(|l| *l > 0),
                "must all be positive",
            ),
            (
                "strides",
                format!("{:?}", c.strides),
                c.strides.iter().all(|s| (1..=2).contains(s))
                    && self.image_size % c.strides.iter().product::<usize>() == 0,
                "must each be 1 or 2, with their product dividing image_size",
            ),
        ] {
            if !ok {
                return Err(err(format!("classifier.{field}"), value, rule.into()));
            }
        }
        for (i, t) in self.captions.templates.iter().enumerate() {
            let mut rest = t.as_str();
            while let Some(start) = rest.find('{') {
                let Some(len) = rest[start..].find('}') else {
                    return Err(err(
                        format!("captions.templates[{i}]"),
                        format!("`{t}`"),
                        "an unclosed `{`".into(),
                    ));
                };
                let name = &rest[start + 1..start + len];
                if !PLACEHOLDERS.contains(&name) {
                    return Err(err(
                        format!("captions.templates[{i}]"),
                        format!("`{t}`"),
                        format!(
                            "unknown placeholder `{{{name}}}` (known: {})",
                            PLACEHOLDERS
                                .iter()
                                .map(|p| format!("{{{p}}}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
                rest = &rest[start + len + 1..];
            }
        }
        if self.captions.templates.is_empty() {
            return Err(err(
                "captions.templates".into(),
                "[]".into(),
                "needs at least one template".into(),
            ));
        }
        if let Err(e) = self.checker.check() {
            return Err(err("[checker]".into(), "table".into(), e.to_string()));
        }
        Ok(())
    }

    /// The biased splits' per-class value probabilities (the spec must be valid).
    pub fn distributions(&self) -> Distributions {
        self.distributions_checked("spec")
            .expect("distributions of a validated spec")
    }

    fn distributions_checked(&self, origin: &str) -> Result<Distributions, SpecError> {
        let mut biased = Vec::new();
        for attribute in ATTRIBUTES {
            let values = self.values(attribute).expect("a known attribute");
            let mut per_class = Vec::new();
            for class in &self.classes {
                // value index -> (probability, the correlation fixing it)
                let mut fixed: BTreeMap<usize, (f64, usize, &str)> = BTreeMap::new();
                for (i, c) in self.correlations.iter().enumerate() {
                    if c.attribute != *attribute {
                        continue;
                    }
                    let v = values
                        .iter()
                        .position(|x| *x == c.value)
                        .expect("validated");
                    let (p, field) = if c.class == *class {
                        (c.probability, "probability")
                    } else {
                        (
                            c.elsewhere.unwrap_or(1.0 / values.len() as f64),
                            "elsewhere",
                        )
                    };
                    fixed.insert(v, (p, i, field));
                }
                let total: f64 = fixed.values().map(|f| f.0).sum();
                let fields = || {
                    fixed
                        .values()
                        .map(|(p, i, f)| format!("correlations[{i}].{f} = {p}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let err = |problem: String| SpecError {
                    origin: origin.to_string(),
                    field: format!("class `{class}`, attribute `{attribute}`"),
                    value: fields(),
                    problem,
                };
                if total > 1.0 + 1e-9 {
                    return Err(err(format!(
                        "the probabilities of `{attribute}` values for class `{class}` sum to \
                         {total} > 1"
                    )));
                }
                let free = values.len() - fixed.len();
                let probs: Vec<f64> = if free == 0 {
                    if total <= 0.0 {
                        return Err(err(format!(
                            "class `{class}` can have no images: every `{attribute}` value has \
                             probability 0 for it"
                        )));
                    }
                    (0..values.len()).map(|v| fixed[&v].0 / total).collect()
                } else {
                    let share = (1.0 - total).max(0.0) / free as f64;
                    if share <= 0.0 && total <= 0.0 {
                        return Err(err(format!(
                            "class `{class}` can have no images: every `{attribute}` value has \
                             probability 0 for it"
                        )));
                    }
                    (0..values.len())
                        .map(|v| fixed.get(&v).map_or(share, |f| f.0))
                        .collect()
                };
                per_class.push(probs);
            }
            biased.push(per_class);
        }
        Ok(Distributions { biased })
    }

    /// A short stable fingerprint of the spec (FNV-1a of its canonical JSON), recorded with
    /// trained models so a model can be checked against the world it was trained on.
    /// ShapesWorld II's model tables (`[checker]`, ...) are left out: each model's report
    /// records its own config, so changing one model's table leaves the others' folders valid.
    pub fn fingerprint(&self) -> String {
        let world = WorldSpec {
            checker: Default::default(),
            ..self.clone()
        };
        let json = serde_json::to_string(&world).expect("a spec serializes");
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in json.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

/// The committed default spec.
pub const DEFAULT_SPEC: &str = include_str!("../../assets/world/default.toml");
