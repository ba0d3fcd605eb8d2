//! Image classifiers with hidden-feature taps (torchvision architectures and names).
//!
//! One file per architecture ([`resnet`], [`vgg`], [`vit`]); this file is the common face the
//! explainer uses: a [`Classifier`] built from an architecture name or a config, loaded from a
//! checkpoint in any of the layouts we meet, returning logits, pooled features and named hidden
//! taps. Every model takes *normalized* images (see [`Preprocess`]); the whole path from input
//! to logits is differentiable.

pub mod folder;
pub mod preprocess;
pub mod resnet;
pub mod vgg;
pub mod vit;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::weights::Checkpoint;

pub use folder::{is_classifier_folder, ClassifierFolderConfig};
pub use preprocess::Preprocess;
pub use resnet::{BlockKind, ResNet, ResNetConfig, ResNetOutput, Stem};
pub use vgg::{Vgg, VggConfig, VggLayer, VggOutput};
pub use vit::{VisionTransformer, VitConfig, VitOutput};

/// The architecture of a classifier, with its full configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum ClassifierConfig {
    ResNet(ResNetConfig),
    Vgg(VggConfig),
    Vit(VitConfig),
}

/// Architecture names [`ClassifierConfig::from_arch`] knows (torchvision's names).
pub const KNOWN_ARCHS: &[&str] = &[
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "vgg16",
    "vgg16_bn",
    "vit_b_16",
];

impl ClassifierConfig {
    /// The ImageNet configuration of a torchvision architecture name.
    pub fn from_arch(arch: &str) -> Result<Self> {
        Ok(match arch {
            "resnet18" => Self::ResNet(ResNetConfig::resnet18()),
            "resnet34" => Self::ResNet(ResNetConfig::resnet34()),
            "resnet50" => Self::ResNet(ResNetConfig::resnet50()),
            "resnet101" => Self::ResNet(ResNetConfig::resnet101()),
            "vgg16" => Self::Vgg(VggConfig::vgg16()),
            "vgg16_bn" => Self::Vgg(VggConfig::vgg16_bn()),
            "vit_b_16" => Self::Vit(VitConfig::vit_b_16()),
            _ => candle_core::bail!(
                "unknown classifier architecture `{arch}` (known: {})",
                KNOWN_ARCHS.join(", ")
            ),
        })
    }

    pub fn num_classes(&self) -> usize {
        match self {
            Self::ResNet(c) => c.num_classes,
            Self::Vgg(c) => c.num_classes,
            Self::Vit(c) => c.num_classes,
        }
    }

    /// A parameter every checkpoint of this architecture has, used to find the key prefix.
    fn probe_name(&self) -> &'static str {
        match self {
            Self::ResNet(_) => "fc.weight",
            Self::Vgg(_) => "classifier.6.weight",
            Self::Vit(_) => "heads.head.weight",
        }
    }
}

/// What every classifier returns.
#[derive(Debug, Clone)]
pub struct ClassifierOutput {
    /// `[b, num_classes]`.
    pub logits: Tensor,
    /// The pooled penultimate features, the last linear's input: `[b, c]` (ResNet: pooled
    /// `layer4`; VGG: `penultimate`; ViT: `cls_feature`).
    pub features: Tensor,
    /// Hidden taps by name: ResNet `layer1`..`layer4`; VGG `conv_features`, `penultimate`; ViT
    /// `cls_feature`, `block_0`.. (the names of the parity format).
    pub hidden: BTreeMap<String, Tensor>,
}

impl ClassifierOutput {
    /// The logit of `class_id` for each image: `[b]`.
    pub fn logit(&self, class_id: usize) -> Result<Tensor> {
        let num_classes = self.logits.dim(1)?;
        check_class(class_id, num_classes)?;
        self.logits.narrow(1, class_id, 1)?.squeeze(1)
    }

    /// A hidden tap by name; the error lists the names there are.
    pub fn tap(&self, name: &str) -> Result<&Tensor> {
        self.hidden.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "no hidden tap `{name}` (this classifier has: {})",
                self.hidden.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }
}

fn check_class(class_id: usize, num_classes: usize) -> Result<()> {
    if class_id >= num_classes {
        candle_core::bail!(
            "class id {class_id} is out of range: the classifier has {num_classes} classes \
             (0..={})",
            num_classes.saturating_sub(1)
        )
    }
    Ok(())
}

/// The network itself, one variant per architecture.
#[derive(Debug, Clone)]
pub enum Network {
    ResNet(ResNet),
    Vgg(Vgg),
    Vit(VisionTransformer),
}

/// The per-channel input normalization a classifier expects (applied to images in [0, 1]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalization {
    pub const IMAGENET: Self = Self {
        mean: preprocess::IMAGENET_MEAN,
        std: preprocess::IMAGENET_STD,
    };
}

/// A classifier and the input normalization it was trained with: ImageNet's, unless the
/// checkpoint declares its own (the `robustness` library stores it as `normalizer.new_mean`,
/// `new_std` beside the model, and applies it inside the model; we apply it in [`Preprocess`]).
#[derive(Debug, Clone)]
pub struct Classifier {
    pub network: Network,
    pub normalization: Normalization,
}

/// Key prefixes tried, in order, when loading: bare torchvision names, the Salient ImageNet /
/// MadryLab `robustness` layout (`module.model.` beside `module.attacker.model.` copies and
/// `module.normalizer.`), a `DataParallel` wrapper, a `model.` wrapper.
const PREFIXES: &[&str] = &["", "module.model.", "module.", "model."];

/// Top-level dict entries that may hold the state dict in a training checkpoint.
const STATE_DICT_KEYS: &[&str] = &["model", "state_dict"];

impl Classifier {
    /// Builds a classifier from a `VarBuilder` with torchvision's names (any dtype/device),
    /// expecting ImageNet-normalized inputs.
    pub fn new(vb: VarBuilder, config: &ClassifierConfig) -> Result<Self> {
        let network = match config {
            ClassifierConfig::ResNet(c) => Network::ResNet(ResNet::new(vb, c)?),
            ClassifierConfig::Vgg(c) => Network::Vgg(Vgg::new(vb, c)?),
            ClassifierConfig::Vit(c) => Network::Vit(VisionTransformer::new(vb, c)?),
        };
        Ok(Self {
            network,
            normalization: Normalization::IMAGENET,
        })
    }

    /// Loads a torchvision architecture by name (`resnet50`, `vgg16`, `vit_b_16`, ...; see
    /// [`KNOWN_ARCHS`]) from a checkpoint, in f32.
    pub fn load(arch: &str, checkpoint: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::load_with_config(&ClassifierConfig::from_arch(arch)?, checkpoint, device)
    }

    /// Loads any configuration from a checkpoint, in f32. The format comes from the extension
    /// (`.safetensors`, or a PyTorch pickle `.pt`/`.pth`/`.bin`/`.ckpt`); a pickle may be a bare
    /// state dict or a training checkpoint with the weights under `model` or `state_dict`; the
    /// names may carry one of the wrappers' prefixes (see [`open_checkpoint`]).
    pub fn load_with_config(
        config: &ClassifierConfig,
        checkpoint: impl AsRef<Path>,
        device: &Device,
    ) -> Result<Self> {
        let (ckpt, normalization) = open_checkpoint(checkpoint.as_ref(), config.probe_name())?;
        let mut classifier = Self::new(ckpt.into_var_builder(DType::F32, device), config)?;
        if let Some(n) = normalization {
            classifier.normalization = n;
        }
        Ok(classifier)
    }

    /// The input pipeline for this classifier: antialiased resize to `size`×`size`, then its
    /// normalization.
    pub fn preprocess(&self, size: usize) -> Preprocess {
        Preprocess {
            size: Some(size),
            antialias: true,
            mean: self.normalization.mean,
            std: self.normalization.std,
        }
    }

    pub fn config(&self) -> ClassifierConfig {
        match &self.network {
            Network::ResNet(m) => ClassifierConfig::ResNet(m.config().clone()),
            Network::Vgg(m) => ClassifierConfig::Vgg(m.config().clone()),
            Network::Vit(m) => ClassifierConfig::Vit(m.config().clone()),
        }
    }

    pub fn num_classes(&self) -> usize {
        self.config().num_classes()
    }

    /// Checks that `class_id` names one of this classifier's outputs.
    pub fn check_class(&self, class_id: usize) -> Result<()> {
        check_class(class_id, self.num_classes())
    }

    /// `x`: normalized images `[b, 3, h, w]` (see [`Classifier::preprocess`]).
    ///
    /// Backpropagate through square images only: candle 0.11's conv2d backward derives the
    /// transposed conv's output padding from the height alone, so a width with another remainder
    /// at a strided conv fails in `backward()` with a "shape mismatch in add" error. (Forward
    /// passes are exact for any size.)
    pub fn forward(&self, x: &Tensor) -> Result<ClassifierOutput> {
        Ok(match &self.network {
            Network::ResNet(m) => {
                let o = m.forward_all(x)?;
                let hidden = o
                    .stages
                    .into_iter()
                    .enumerate()
                    .map(|(i, t)| (format!("layer{}", i + 1), t))
                    .collect();
                ClassifierOutput {
                    logits: o.logits,
                    features: o.features,
                    hidden,
                }
            }
            Network::Vgg(m) => {
                let o = m.forward_all(x)?;
                ClassifierOutput {
                    logits: o.logits,
                    features: o.penultimate.clone(),
                    hidden: BTreeMap::from([
                        ("conv_features".to_string(), o.conv_features),
                        ("penultimate".to_string(), o.penultimate),
                    ]),
                }
            }
            Network::Vit(m) => {
                let o = m.forward_all(x)?;
                let mut hidden: BTreeMap<String, Tensor> = o
                    .blocks
                    .into_iter()
                    .enumerate()
                    .map(|(i, t)| (format!("block_{i}"), t))
                    .collect();
                hidden.insert("cls_feature".to_string(), o.cls_feature.clone());
                ClassifierOutput {
                    logits: o.logits,
                    features: o.cls_feature,
                    hidden,
                }
            }
        })
    }
}

/// Opens a classifier checkpoint and finds where its weights sit: which top-level entry of a
/// pickle (the file itself, `model` or `state_dict`) and which key prefix (see `PREFIXES`)
/// holds `probe` (e.g. `fc.weight`). The Salient ImageNet robust ResNet-50
/// (`imagenet_l2_3_0.pt`) resolves to entry `model`, prefix `module.model.`. Also returns the
/// input normalization the checkpoint declares beside the model, if any
/// (`module.normalizer.new_mean` / `new_std` there).
pub fn open_checkpoint(path: &Path, probe: &str) -> Result<(Checkpoint, Option<Normalization>)> {
    if !path.exists() {
        candle_core::bail!("{}: checkpoint file not found", path.display())
    }
    let is_pickle = crate::weights::Format::detect(path)? != crate::weights::Format::Safetensors;
    let candidates: Vec<Checkpoint> = if is_pickle {
        // Try the wrapped entries first: reading a training checkpoint as a bare state dict
        // makes candle's reader complain on stderr about every non-tensor entry.
        let mut found: Vec<Checkpoint> = STATE_DICT_KEYS
            .iter()
            .filter_map(|k| Checkpoint::open_pickle(path, Some(k)).ok())
            .collect();
        if found.is_empty() {
            found.push(Checkpoint::open_pickle(path, None)?);
        }
        found
    } else {
        vec![Checkpoint::open(path)?]
    };
    let mut names = Vec::new();
    for ckpt in candidates {
        let all = ckpt.names();
        if let Some(prefix) = PREFIXES
            .iter()
            .find(|p| all.iter().any(|n| *n == format!("{p}{probe}")))
        {
            let normalization = read_normalizer(&ckpt, prefix)?;
            return Ok((ckpt.with_prefix(*prefix), normalization));
        }
        names.extend(all);
    }
    names.truncate(8);
    candle_core::bail!(
        "{}: no `{probe}` found (tried prefixes {:?}); is this checkpoint for this \
         architecture? Its first names: {}",
        path.display(),
        PREFIXES,
        names.join(", ")
    )
}

/// The `robustness` library's `InputNormalize` buffers, stored beside the wrapped model:
/// `<base>normalizer.new_mean` and `new_std` (`[3, 1, 1]`) for model prefix `<base>model.`.
fn read_normalizer(ckpt: &Checkpoint, model_prefix: &str) -> Result<Option<Normalization>> {
    let Some(base) = model_prefix.strip_suffix("model.") else {
        return Ok(None);
    };
    let (mean_key, std_key) = (
        format!("{base}normalizer.new_mean"),
        format!("{base}normalizer.new_std"),
    );
    let names = ckpt.names();
    if !names.contains(&mean_key) || !names.contains(&std_key) {
        return Ok(None);
    }
    let read = |key: &str| -> Result<[f32; 3]> {
        let v = ckpt
            .tensor(key)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        v.try_into().map_err(|v: Vec<f32>| {
            candle_core::Error::Msg(format!(
                "checkpoint normalizer `{key}` has {} values, expected 3",
                v.len()
            ))
        })
    };
    Ok(Some(Normalization {
        mean: read(&mean_key)?,
        std: read(&std_key)?,
    }))
}
