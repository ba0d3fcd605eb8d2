//! A classifier as a folder, for models with a non-torchvision configuration (the ShapesWorld
//! classifier): `config.json` ([`ClassifierFolderConfig`]: architecture, its config, input size,
//! normalization, class names) beside `model.safetensors` (torchvision parameter names).

use std::path::Path;

use candle_core::{DType, Device, Result};
use serde::{Deserialize, Serialize};

use super::{Classifier, ClassifierConfig, Normalization};
use crate::weights::Checkpoint;

/// The weights' file name in a classifier folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The config's file name in a classifier folder.
pub const CONFIG_FILE: &str = "config.json";

/// `config.json` of a classifier folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierFolderConfig {
    /// `resnet`, `vgg` or `vit`.
    pub architecture: String,
    /// The architecture's config (`ResNetConfig`, `VggConfig` or `VitConfig` fields).
    pub config: serde_json::Value,
    /// The square side the classifier takes (images of another size are resized to it).
    pub input_size: usize,
    /// Per-channel normalization of images in [0, 1].
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Class names by class id, if known.
    #[serde(default)]
    pub class_names: Vec<String>,
    /// Anything else the writer records (how it was trained, on what).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub metadata: serde_json::Value,
}

impl ClassifierFolderConfig {
    pub fn classifier_config(&self) -> Result<ClassifierConfig> {
        let parse_err = |e: serde_json::Error| {
            candle_core::Error::Msg(format!(
                "classifier config.json: `config` is not a valid {} config: {e}",
                self.architecture
            ))
        };
        let c = self.config.clone();
        Ok(match self.architecture.as_str() {
            "resnet" => ClassifierConfig::ResNet(serde_json::from_value(c).map_err(parse_err)?),
            "vgg" => ClassifierConfig::Vgg(serde_json::from_value(c).map_err(parse_err)?),
            "vit" => ClassifierConfig::Vit(serde_json::from_value(c).map_err(parse_err)?),
            other => candle_core::bail!(
                "classifier config.json: unknown architecture `{other}` (use resnet, vgg or vit)"
            ),
        })
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            candle_core::Error::Msg(format!("{}: cannot read: {e}", path.display()))
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|e| {
            candle_core::Error::Msg(format!("{}: not a classifier config: {e}", path.display()))
        })?;
        config
            .validate()
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    /// Values a classifier cannot run with: an input size of 0, a non-finite mean, a standard
    /// deviation that is not a positive finite number (normalization divides by it).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.input_size == 0 {
            return Err("input_size = 0: the input size must be at least 1 pixel".into());
        }
        for (i, (&m, &s)) in self.mean.iter().zip(&self.std).enumerate() {
            if !m.is_finite() {
                return Err(format!("mean[{i}] = {m}: must be a finite number"));
            }
            if !(s.is_finite() && s > 0.0) {
                return Err(format!(
                    "std[{i}] = {s}: must be a positive finite number (images are divided by it)"
                ));
            }
        }
        Ok(())
    }
}

impl ClassifierFolderConfig {
    /// Writes a classifier folder (the inverse of [`Classifier::from_dir`]): `tensors` as
    /// `model.safetensors` (torchvision names), then this `config.json`, each atomically.
    pub fn save(
        &self,
        dir: &Path,
        tensors: &std::collections::HashMap<String, candle_core::Tensor>,
    ) -> anyhow::Result<()> {
        crate::io::write_atomically(&dir.join(WEIGHTS_FILE), |tmp| {
            candle_core::safetensors::save(tensors, tmp).map_err(Into::into)
        })?;
        crate::io::write_bytes_atomically(&dir.join(CONFIG_FILE), &serde_json::to_vec_pretty(self)?)
    }
}

/// Whether `dir` looks like a classifier folder (has a `config.json`).
pub fn is_classifier_folder(dir: &Path) -> bool {
    dir.is_dir() && dir.join(CONFIG_FILE).is_file()
}

impl Classifier {
    /// Loads a classifier folder in `dtype` (see the module docs); returns its config too.
    pub fn from_dir(
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, ClassifierFolderConfig)> {
        let folder = ClassifierFolderConfig::read(dir)?;
        let config = folder.classifier_config()?;
        if !folder.class_names.is_empty() && folder.class_names.len() != config.num_classes() {
            candle_core::bail!(
                "{}: {} class names for a classifier with {} classes",
                dir.join(CONFIG_FILE).display(),
                folder.class_names.len(),
                config.num_classes()
            )
        }
        let ckpt = Checkpoint::open(dir.join(WEIGHTS_FILE))?;
        let mut classifier = Classifier::new(ckpt.into_var_builder(dtype, device), &config)?;
        classifier.normalization = Normalization {
            mean: folder.mean,
            std: folder.std,
        };
        Ok((classifier, folder))
    }
}
