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
//! Weight files are looked up under the names the writing library uses (diffusers'
//! `utils/constants.py` for the UNet and VAE, transformers' `utils/__init__.py` for the text
//! encoder), in the order they prefer them:
//!
//! | component | safetensors | sharded safetensors | pickle | sharded pickle |
//! |---|---|---|---|---|
//! | `unet/`, `vae/` | `diffusion_pytorch_model.safetensors` | `diffusion_pytorch_model.safetensors.index.json` | `diffusion_pytorch_model.bin` | `diffusion_pytorch_model.bin.index.json` |
//! | `text_encoder/` | `model.safetensors` | `model.safetensors.index.json` | `pytorch_model.bin` | `pytorch_model.bin.index.json` |
//!
//! A variant goes before the last extension, as both libraries' `_add_variant`
//! (`model.fp16.safetensors`, `model.safetensors.index.fp16.json`). A variant is chosen
//! explicitly (`Some("fp16")` reads only `.fp16.` files, `None` only the plain ones). A file's
//! format is then recognized by content ([`crate::weights::Format`]). When nothing matches,
//! the error names the files tried and lists the files the folder holds.
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
    /// The weight files' stems: (safetensors, pickle), e.g. `("model", "pytorch_model")` for
    /// transformers; `None` for weight-free components.
    pub weights: Option<(&'static str, &'static str)>,
    /// What the component is, for messages (`"UNet2DConditionModel"`).
    pub what: &'static str,
}

pub const UNET: Component = Component {
    subfolder: "unet",
    config: "config.json",
    weights: Some(("diffusion_pytorch_model", "diffusion_pytorch_model")),
    what: "UNet2DConditionModel",
};

pub const VAE: Component = Component {
    subfolder: "vae",
    config: "config.json",
    weights: Some(("diffusion_pytorch_model", "diffusion_pytorch_model")),
    what: "AutoencoderKL",
};

pub const TEXT_ENCODER: Component = Component {
    subfolder: "text_encoder",
    config: "config.json",
    weights: Some(("model", "pytorch_model")),
    what: "CLIPTextModel",
};

/// transformers' `CLIPVisionModelWithProjection` (diffusers' IP-Adapter `image_encoder/`).
pub const IMAGE_ENCODER: Component = Component {
    subfolder: "image_encoder",
    config: "config.json",
    weights: Some(("model", "pytorch_model")),
    what: "CLIPVisionModelWithProjection",
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

/// The weight file(s) of a component for `variant`, in the order diffusers and transformers
/// prefer them (see the module docs).
pub fn weight_files(
    dir: impl AsRef<Path>,
    c: &Component,
    variant: Option<&str>,
) -> Result<Vec<PathBuf>> {
    let sub = component_dir(dir, c)?;
    let Some((st_stem, bin_stem)) = c.weights else {
        bail!("the {} has no weights", c.what)
    };
    let candidates = [
        (format!("{st_stem}.safetensors"), false),
        (format!("{st_stem}.safetensors.index.json"), true),
        (format!("{bin_stem}.bin"), false),
        (format!("{bin_stem}.bin.index.json"), true),
    ]
    .map(|(name, sharded)| (add_variant(&name, variant), sharded));
    for (name, sharded) in &candidates {
        let path = sub.join(name);
        if !path.is_file() {
            continue;
        }
        if !sharded {
            return Ok(vec![path]);
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        let idx: ShardIndex = serde_json::from_str(&text).map_err(|e| {
            candle_core::Error::Msg(format!("{}: not a shard index: {e}", path.display()))
        })?;
        let mut shards: Vec<PathBuf> = idx.weight_map.values().map(|f| sub.join(f)).collect();
        shards.sort();
        shards.dedup();
        if let Some(missing) = shards.iter().find(|f| !f.is_file()) {
            bail!(
                "{}: shard {} listed in {name} is missing",
                sub.display(),
                missing.display()
            )
        }
        return Ok(shards);
    }
    let mut present: Vec<String> = std::fs::read_dir(&sub)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    present.sort();
    let holds = if present.is_empty() {
        "the folder is empty".to_string()
    } else {
        format!("the folder holds {}", present.join(", "))
    };
    let variant_hint = match variant {
        Some(v) => format!(" (only the `{v}` variant was looked for)"),
        None if present.iter().any(|n| n.contains(".fp16.")) => {
            " (only plain files were looked for; the `fp16` variant is there)".to_string()
        }
        None => String::new(),
    };
    let other = if present
        .iter()
        .any(|n| n.ends_with(".msgpack") || n.ends_with(".h5") || n.ends_with(".onnx"))
    {
        "; Flax (.msgpack), TensorFlow (.h5) and ONNX weights are not read: convert them to \
         safetensors with the reference library"
    } else {
        ""
    };
    bail!(
        "{}: no {} weights: looked for {}{variant_hint}; {holds}{other}",
        sub.display(),
        c.what,
        candidates
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// The component's weights as a [`Checkpoint`] (each file's format recognized by content).
pub fn open_weights(
    dir: impl AsRef<Path>,
    c: &Component,
    variant: Option<&str>,
) -> Result<Checkpoint> {
    Checkpoint::open_all(&weight_files(dir, c, variant)?)
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
