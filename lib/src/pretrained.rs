//! Model folders in the Hugging Face diffusers layout (what `save_pretrained` writes and the Hub
//! serves), read without Python:
//!
//! ```text
//! <dir>/model_index.json
//! <dir>/unet/config.json          + diffusion_pytorch_model[.<variant>].safetensors
//! <dir>/vae/config.json           + diffusion_pytorch_model[.<variant>].safetensors
//! <dir>/text_encoder/config.json  + model[.<variant>].safetensors
//! <dir>/scheduler/scheduler_config.json
//! ```
//!
//! Weights are looked up as diffusers does: the single file `<stem>[.<variant>].safetensors`,
//! else a sharded set named by `<stem>.safetensors.index[.<variant>].json`, else a PyTorch
//! pickle `<stem>[.<variant>].bin`. A variant is chosen explicitly (`Some("fp16")` reads only
//! `.fp16.` files, `None` only the plain ones), and a missing file is reported with the names
//! tried and the weight files the folder does hold.
//!
//! The models' own constructors sit on the models:
//! [`UNet2DConditionModel::from_pretrained`](crate::models::unet::UNet2DConditionModel::from_pretrained),
//! [`AutoencoderKL::from_pretrained`](crate::models::vae::AutoencoderKL::from_pretrained),
//! [`ClipTextModel::from_pretrained`](crate::models::clip_text::ClipTextModel::from_pretrained),
//! [`scheduler_from_pretrained`](crate::sampling::scheduler_from_pretrained). [`open_weights`]
//! stays public for callers that change the weights before building (LoRA fusion).

use std::path::{Path, PathBuf};

use candle_core::{bail, Result};
use serde::Deserialize;

use crate::weights::Checkpoint;

/// One component folder of a diffusers model folder.
#[derive(Debug, Clone, Copy)]
pub struct Component {
    /// The subfolder (`"unet"`).
    pub subfolder: &'static str,
    /// The config file in it.
    pub config: &'static str,
    /// The weight files' stem (`"diffusion_pytorch_model"`); `None` for weight-free components.
    pub weights: Option<&'static str>,
    /// What the component is, for messages (`"UNet2DConditionModel"`).
    pub what: &'static str,
}

pub const UNET: Component = Component {
    subfolder: "unet",
    config: "config.json",
    weights: Some("diffusion_pytorch_model"),
    what: "UNet2DConditionModel",
};

pub const VAE: Component = Component {
    subfolder: "vae",
    config: "config.json",
    weights: Some("diffusion_pytorch_model"),
    what: "AutoencoderKL",
};

pub const TEXT_ENCODER: Component = Component {
    subfolder: "text_encoder",
    config: "config.json",
    weights: Some("model"),
    what: "CLIPTextModel",
};

pub const SCHEDULER: Component = Component {
    subfolder: "scheduler",
    config: "scheduler_config.json",
    weights: None,
    what: "scheduler",
};

const LAYOUT: &str = "a diffusers model folder holds model_index.json, unet/, vae/, \
                      text_encoder/, tokenizer/ and scheduler/";

/// The component's subfolder, or an error naming it and the expected layout.
pub fn component_dir(dir: impl AsRef<Path>, c: &Component) -> Result<PathBuf> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        bail!("{}: model folder not found ({LAYOUT})", dir.display())
    }
    let sub = dir.join(c.subfolder);
    if !sub.is_dir() {
        bail!(
            "{}: no `{}/` folder with the {} ({LAYOUT})",
            dir.display(),
            c.subfolder,
            c.what
        )
    }
    Ok(sub)
}

/// `<dir>/<subfolder>/<config>`, or an error naming the missing file.
pub fn config_path(dir: impl AsRef<Path>, c: &Component) -> Result<PathBuf> {
    let path = component_dir(dir, c)?.join(c.config);
    if !path.is_file() {
        bail!(
            "{}: missing; it should hold the {}'s configuration (diffusers' `{}`)",
            path.display(),
            c.what,
            c.config
        )
    }
    Ok(path)
}

/// `name` with the variant inserted before its last extension, as diffusers' `_add_variant`:
/// `model.safetensors` -> `model.fp16.safetensors`,
/// `model.safetensors.index.json` -> `model.safetensors.index.fp16.json`.
fn add_variant(name: &str, variant: Option<&str>) -> String {
    match (variant, name.rsplit_once('.')) {
        (Some(v), Some((base, ext))) => format!("{base}.{v}.{ext}"),
        _ => name.to_string(),
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// The weight file(s) of a component for `variant`, in the order diffusers prefers them.
pub fn weight_files(
    dir: impl AsRef<Path>,
    c: &Component,
    variant: Option<&str>,
) -> Result<Vec<PathBuf>> {
    let sub = component_dir(dir, c)?;
    let Some(stem) = c.weights else {
        bail!("the {} has no weights", c.what)
    };
    let single = add_variant(&format!("{stem}.safetensors"), variant);
    let index = add_variant(&format!("{stem}.safetensors.index.json"), variant);
    let pickle = add_variant(&format!("{stem}.bin"), variant);
    if sub.join(&single).is_file() {
        return Ok(vec![sub.join(single)]);
    }
    if sub.join(&index).is_file() {
        let path = sub.join(&index);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        let idx: ShardIndex = serde_json::from_str(&text).map_err(|e| {
            candle_core::Error::Msg(format!(
                "{}: not a safetensors shard index: {e}",
                path.display()
            ))
        })?;
        let mut shards: Vec<PathBuf> = idx.weight_map.values().map(|f| sub.join(f)).collect();
        shards.sort();
        shards.dedup();
        if let Some(missing) = shards.iter().find(|f| !f.is_file()) {
            bail!(
                "{}: shard {} listed in {index} is missing",
                sub.display(),
                missing.display()
            )
        }
        return Ok(shards);
    }
    if sub.join(&pickle).is_file() {
        return Ok(vec![sub.join(pickle)]);
    }
    let present: Vec<String> = std::fs::read_dir(&sub)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(stem) && !n.ends_with(".json"))
                .collect()
        })
        .unwrap_or_default();
    let hint = match (variant, present.is_empty()) {
        (_, true) => "it holds no weight files".to_string(),
        (Some(v), false) => format!(
            "it holds {} (without the `{v}` variant, pass variant None)",
            present.join(", ")
        ),
        (None, false) => format!(
            "it holds {} (for a variant such as `{stem}.fp16.safetensors`, pass Some(\"fp16\"))",
            present.join(", ")
        ),
    };
    bail!(
        "{}: no {} weights: expected {single} (or a sharded {index}, or {pickle}); {hint}",
        sub.display(),
        c.what,
    )
}

/// The component's weights as a [`Checkpoint`] (memory-mapped safetensors, or a pickle).
pub fn open_weights(
    dir: impl AsRef<Path>,
    c: &Component,
    variant: Option<&str>,
) -> Result<Checkpoint> {
    let files = weight_files(dir, c, variant)?;
    if files.len() == 1 && files[0].extension().is_some_and(|e| e == "bin") {
        Checkpoint::open_pickle(&files[0], None)
    } else {
        Checkpoint::open_safetensors(&files)
    }
}

/// Reads a JSON config file and builds `T` from its value with `build` (parse, then check);
/// every error, reading included, is prefixed with the file's path.
pub fn read_config<T>(
    path: impl AsRef<Path>,
    build: impl FnOnce(serde_json::Value) -> Result<T>,
) -> Result<T> {
    let path = path.as_ref();
    let at =
        |e: &dyn std::fmt::Display| candle_core::Error::Msg(format!("{}: {e}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| at(&e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| at(&e))?;
    build(value).map_err(|e| at(&e))
}
