//! LoRA fusion at load time: `W' = W + scale * (alpha / rank) * up @ down` for every weight a
//! LoRA adapts, handed to the model as a [`Checkpoint`] overlay, so model constructors load the
//! fused weights through their usual `VarBuilder` with no LoRA code in the model.
//!
//! Two key formats are read:
//! - kohya (e.g. latent-consistency/lcm-lora-sdv1-5):
//!   `lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`, `.lora_up.weight`, `.alpha`.
//!   The module path's dots became underscores, which is ambiguous (`time_embedding_linear_1`), so
//!   it is resolved by lookup among the base checkpoint's actual weight names, never by guessing.
//! - diffusers / PEFT: `unet.down_blocks.0.attentions.0.proj_in.lora_A.weight`, `.lora_B.weight`
//!   (also diffusers' older `.lora.down.weight` / `.lora.up.weight`), optional `.alpha`; the
//!   component prefix (`unet.`) is optional.
//!
//! The alpha of a module is, first found: its `.alpha` tensor; the safetensors header's
//! `lora_adapter_metadata` (what diffusers' `save_lora_weights` writes from the PEFT
//! `LoraConfig`: a JSON object whose keys carry the component, `unet.lora_alpha`, `unet.r`,
//! `unet.alpha_pattern`, `unet.rank_pattern`, `unet.use_rslora`, ...; see [`AdapterConfig`]);
//! else `alpha = rank` (factor 1). PEFT's `use_rslora` scales by `alpha / sqrt(rank)`.
//!
//! Components: kohya `lora_unet_` / diffusers `unet.` (and unprefixed dotted names, diffusers'
//! oldest UNet-only format) are the UNet; kohya `lora_te_` / `text_encoder.` the CLIP text
//! encoder, matched with or without its `text_model.` prefix. SDXL's second text encoder
//! (`lora_te1_`, `lora_te2_`, `text_encoder_2.`) is refused: this program runs one text
//! encoder. [`Lora::components`] counts the modules of each, so a caller can make sure every
//! module is fused somewhere: nothing in a LoRA is skipped silently.
//!
//! A missing alpha means `alpha = rank` (factor 1). Shapes: linear `up [out, r] @ down [r, in]`;
//! 1x1 conv `[out, r, 1, 1]`, `[r, in, 1, 1]`; kxk conv `up [out, r, 1, 1] ∘ down [r, in, k, k]`;
//! all are `up.flatten(1) @ down.flatten(1)` reshaped to the weight's shape (a linear LoRA on a
//! 1x1 conv weight fits too). Fusion runs in f32 (f64 for f64 weights) and the fused weights are
//! kept in that precision; the `VarBuilder` casts them to the model's dtype.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{bail, DType, Result, Tensor};

use crate::weights::Checkpoint;

/// Which model of a pipeline a LoRA's keys are fused into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraTarget {
    /// For messages.
    pub name: &'static str,
    /// kohya's prefix for this component (`lora_unet_`).
    pub kohya_prefix: &'static str,
    /// diffusers' prefix for this component (`unet.`).
    pub dotted_prefix: &'static str,
}

impl LoraTarget {
    pub const UNET: Self = Self {
        name: "unet",
        kohya_prefix: "lora_unet_",
        dotted_prefix: "unet.",
    };
    pub const TEXT_ENCODER: Self = Self {
        name: "text_encoder",
        kohya_prefix: "lora_te_",
        dotted_prefix: "text_encoder.",
    };
}

/// Prefixes of components a LoRA file may also hold; keys under another target's prefix are
/// skipped by [`Lora::fused_weights`] (counted in the report), not errors.
const KOHYA_COMPONENTS: [&str; 4] = ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"];
const DOTTED_COMPONENTS: [&str; 3] = ["unet.", "text_encoder.", "text_encoder_2."];

/// The component a LoRA module name belongs to: `"unet"`, `"text_encoder"`, or another
/// (`"text_encoder_2"` for SDXL's `lora_te1_`/`lora_te2_`/`text_encoder_2.`).
fn component_of(module: &str) -> &'static str {
    if module.starts_with("lora_unet_") || module.starts_with("unet.") {
        "unet"
    } else if module.starts_with("lora_te_") || module.starts_with("text_encoder.") {
        "text_encoder"
    } else if module.starts_with("lora_te1_")
        || module.starts_with("lora_te2_")
        || module.starts_with("text_encoder_2.")
    {
        "text_encoder_2"
    } else {
        // diffusers' oldest format: UNet module paths with no component prefix.
        "unet"
    }
}

/// The PEFT `LoraConfig` fields that change the fused weights, for one component, as
/// diffusers stores them in the safetensors header (`lora_adapter_metadata`).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct AdapterConfig {
    /// The default rank.
    pub r: Option<usize>,
    /// The default alpha.
    pub lora_alpha: Option<f64>,
    /// Per-module alphas, by PEFT pattern (a module path or its dotted suffix).
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Per-module ranks, by pattern (checked against the tensors' ranks).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// rsLoRA: scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (a magnitude vector per module): not supported, refused.
    #[serde(default)]
    pub use_dora: bool,
}

impl AdapterConfig {
    /// The value of the most specific pattern that matches `module` (PEFT matches a pattern
    /// as the whole path or a `.`-separated suffix of it; the longest match wins here).
    fn lookup<T: Copy>(patterns: &BTreeMap<String, T>, module: &str) -> Option<T> {
        patterns
            .iter()
            .filter(|(p, _)| module == p.as_str() || module.ends_with(&format!(".{p}")))
            .max_by_key(|(p, _)| p.len())
            .map(|(_, v)| *v)
    }
}

/// Reads `lora_adapter_metadata` from a safetensors header: component -> config. Keys are
/// `<component>.<field>` (diffusers' `_pack_dict_with_prefix`); unprefixed keys are taken as
/// the UNet's.
fn adapter_configs(origin: &Path, bytes: &[u8]) -> Result<BTreeMap<String, AdapterConfig>> {
    let Ok((_, metadata)) = safetensors::SafeTensors::read_metadata(bytes) else {
        return Ok(BTreeMap::new());
    };
    let Some(text) = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("lora_adapter_metadata"))
    else {
        return Ok(BTreeMap::new());
    };
    let at = |e: &dyn std::fmt::Display| {
        candle_core::Error::Msg(format!(
            "{}: lora_adapter_metadata in the safetensors header: {e}",
            origin.display()
        ))
    };
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| at(&e))?;
    let serde_json::Value::Object(fields) = value else {
        return Err(at(&"not a JSON object"));
    };
    let mut grouped: BTreeMap<String, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
    for (key, v) in fields {
        let (component, field) = match key.split_once('.') {
            Some((c, f)) => (c.to_string(), f.to_string()),
            None => ("unet".to_string(), key),
        };
        grouped.entry(component).or_default().insert(field, v);
    }
    let mut configs = BTreeMap::new();
    for (component, fields) in grouped {
        let config: AdapterConfig =
            serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| at(&e))?;
        if config.use_dora {
            return Err(at(&format!(
                "`{component}.use_dora` is true: DoRA adapters are not supported"
            )));
        }
        if let Some(p) = config
            .alpha_pattern
            .keys()
            .chain(config.rank_pattern.keys())
            .find(|p| p.chars().any(|c| "*?[]()|^$\\+{}".contains(c)))
        {
            return Err(at(&format!(
                "`{component}` pattern `{p}` is a regular expression; only module paths are \
                 supported"
            )));
        }
        configs.insert(component, config);
    }
    Ok(configs)
}

/// (suffix, role) for the key formats read.
const SUFFIXES: [(&str, Role); 7] = [
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".lora.down.weight", Role::Down),
    (".lora.up.weight", Role::Up),
    (".alpha", Role::Alpha),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Down,
    Up,
    Alpha,
}

#[derive(Default)]
struct Module {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

/// How many LoRA modules each component has (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoraComponents {
    pub unet: usize,
    pub text_encoder: usize,
    /// Modules for components this program does not run (SDXL's second text encoder), by name.
    pub other: Vec<String>,
}

/// What a fusion did.
#[derive(Debug, Clone, Default)]
pub struct LoraReport {
    /// Base weight names that were fused, sorted.
    pub fused: Vec<String>,
    /// LoRA modules that belong to another component (e.g. the text encoder) and were skipped.
    pub other_components: usize,
}

/// A LoRA's tensors, as stored, and its adapter configs (from a safetensors header).
pub struct Lora {
    origin: PathBuf,
    tensors: HashMap<String, Tensor>,
    adapters: BTreeMap<String, AdapterConfig>,
}

impl Lora {
    /// Reads a LoRA file (`.safetensors`, or a PyTorch pickle).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let ckpt = Checkpoint::open(path)?;
        let tensors = ckpt
            .names()
            .into_iter()
            .map(|n| Ok((n.clone(), ckpt.tensor(&n)?)))
            .collect::<Result<_>>()?;
        let adapters =
            if crate::weights::Format::detect(path)? == crate::weights::Format::Safetensors {
                let bytes = std::fs::read(path)
                    .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
                adapter_configs(path, &bytes)?
            } else {
                BTreeMap::new()
            };
        Ok(Self::from_tensors(path, tensors).with_adapter_configs(adapters))
    }

    /// Sets the adapter configs by component (`"unet"`, `"text_encoder"`).
    pub fn with_adapter_configs(mut self, adapters: BTreeMap<String, AdapterConfig>) -> Self {
        self.adapters = adapters;
        self
    }

    /// The adapter configs read from the file, by component.
    pub fn adapter_configs(&self) -> &BTreeMap<String, AdapterConfig> {
        &self.adapters
    }

    /// How many modules each component has.
    pub fn components(&self) -> Result<LoraComponents> {
        let mut c = LoraComponents::default();
        for name in self.modules()?.keys() {
            match component_of(name) {
                "unet" => c.unet += 1,
                "text_encoder" => c.text_encoder += 1,
                _ => c.other.push(name.clone()),
            }
        }
        Ok(c)
    }

    /// Wraps tensors already in memory; `origin` names them in messages.
    pub fn from_tensors(origin: impl AsRef<Path>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            origin: origin.as_ref().to_path_buf(),
            tensors,
            adapters: BTreeMap::new(),
        }
    }

    /// Groups the keys into modules (by the key less its suffix).
    fn modules(&self) -> Result<BTreeMap<String, Module>> {
        let mut modules: BTreeMap<String, Module> = BTreeMap::new();
        let mut unknown = vec![];
        for (key, t) in &self.tensors {
            let Some((module, role)) = SUFFIXES
                .iter()
                .find_map(|(suffix, role)| key.strip_suffix(suffix).map(|m| (m, *role)))
            else {
                unknown.push(key.clone());
                continue;
            };
            let m = modules.entry(module.to_string()).or_default();
            match role {
                Role::Down => m.down = Some(t.clone()),
                Role::Up => m.up = Some(t.clone()),
                Role::Alpha => {
                    m.alpha = Some(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0])
                }
            }
        }
        if !unknown.is_empty() {
            unknown.sort();
            bail!(
                "{}: {} key(s) are not LoRA weights in a known format (expected *.lora_down.weight / \
                 *.lora_up.weight / *.alpha, or *.lora_A.weight / *.lora_B.weight): {}",
                self.origin.display(),
                unknown.len(),
                sample_list(&unknown)
            )
        }
        for (name, m) in &modules {
            if m.down.is_none() || m.up.is_none() {
                bail!(
                    "{}: LoRA module `{name}` lacks its {} matrix",
                    self.origin.display(),
                    if m.down.is_none() {
                        "down (A)"
                    } else {
                        "up (B)"
                    }
                )
            }
        }
        Ok(modules)
    }

    /// The fused weights for `target`, by the base checkpoint's weight names (prefix not
    /// included): `W + scale * (alpha / rank) * up @ down`. Every LoRA module for `target` must
    /// match exactly one weight of `base`.
    pub fn fused_weights(
        &self,
        base: &Checkpoint,
        target: LoraTarget,
        scale: f64,
    ) -> Result<(HashMap<String, Tensor>, LoraReport)> {
        if !scale.is_finite() {
            bail!("LoRA scale {scale}: the scale must be a finite number")
        }
        let modules = self.modules()?;
        if modules.is_empty() {
            bail!("{}: no LoRA weights found", self.origin.display())
        }
        // The base's module paths (weight names less `.weight`), and kohya's spelling of each.
        let prefix = base.prefix().to_string();
        let paths: Vec<String> = base
            .names()
            .into_iter()
            .filter_map(|n| {
                n.strip_prefix(&prefix)
                    .and_then(|n| n.strip_suffix(".weight"))
                    .map(str::to_string)
            })
            .collect();
        let mut by_underscores: HashMap<String, Vec<&str>> = HashMap::new();
        for p in &paths {
            by_underscores
                .entry(p.replace('.', "_"))
                .or_default()
                .push(p.as_str());
        }
        let known: std::collections::HashSet<&str> = paths.iter().map(String::as_str).collect();

        let mut resolved: BTreeMap<String, (&str, &Module)> = BTreeMap::new();
        let mut unmatched = vec![];
        let mut ambiguous = vec![];
        let mut other_components = 0;
        let mut ours = 0;
        // The text encoder's LoRA names its modules `text_model.encoder...`; a checkpoint may
        // lack that prefix (the model loads either way), so it is also tried without it.
        let optional = (target == LoraTarget::TEXT_ENCODER).then_some("text_model");
        for (name, module) in &modules {
            let path: Option<String> = if let Some(rest) = name.strip_prefix(target.kohya_prefix) {
                ours += 1;
                let found = by_underscores.get(rest).or_else(|| {
                    optional
                        .and_then(|o| rest.strip_prefix(&format!("{o}_")))
                        .and_then(|r| by_underscores.get(r))
                });
                match found.map(Vec::as_slice) {
                    Some([one]) => Some(one.to_string()),
                    Some(many) => {
                        ambiguous.push(format!("{name} -> {}", many.join(" | ")));
                        continue;
                    }
                    None => None,
                }
            } else if KOHYA_COMPONENTS.iter().any(|p| name.starts_with(p))
                || (DOTTED_COMPONENTS.iter().any(|p| name.starts_with(p))
                    && !name.starts_with(target.dotted_prefix))
                || component_of(name) != target.name
            {
                other_components += 1;
                continue;
            } else {
                ours += 1;
                let p = name.strip_prefix(target.dotted_prefix).unwrap_or(name);
                let without = optional.and_then(|o| p.strip_prefix(&format!("{o}.")));
                if known.contains(p) {
                    Some(p.to_string())
                } else {
                    without.filter(|w| known.contains(w)).map(str::to_string)
                }
            };
            match path {
                Some(p) => {
                    if let Some((other, _)) = resolved.get(&p) {
                        bail!(
                            "{}: LoRA modules `{other}` and `{name}` both adapt `{p}`",
                            self.origin.display()
                        )
                    }
                    resolved.insert(p, (name.as_str(), module));
                }
                None => unmatched.push(name.clone()),
            }
        }
        if !ambiguous.is_empty() {
            bail!(
                "{}: {} kohya LoRA module(s) match several weights of {} once dots become \
                 underscores: {}",
                self.origin.display(),
                ambiguous.len(),
                base.origin(),
                sample_list(&ambiguous)
            )
        }
        if ours == 0 {
            bail!(
                "{}: no LoRA module is for the {} (all {} belong to other components)",
                self.origin.display(),
                target.name,
                other_components
            )
        }
        if !unmatched.is_empty() {
            bail!(
                "{}: {} of {} LoRA module(s) for the {} match no weight of {}: {}",
                self.origin.display(),
                unmatched.len(),
                ours,
                target.name,
                base.origin(),
                sample_list(&unmatched)
            )
        }

        let adapter = self.adapters.get(target.name);
        let mut fused = HashMap::new();
        for (path, (name, module)) in &resolved {
            let key = format!("{path}.weight");
            let w = base.tensor(&key)?;
            // PEFT patterns name the module path inside the component, with the
            // `text_model.` prefix for the text encoder (transformers' names).
            let peft_path = name
                .strip_prefix(target.dotted_prefix)
                .map(str::to_string)
                .unwrap_or_else(|| match optional {
                    Some(o) if !path.starts_with(&format!("{o}.")) => format!("{o}.{path}"),
                    _ => path.clone(),
                });
            let w_new = fuse_one(&w, module, scale, adapter, &peft_path).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "{}: LoRA module `{name}` on `{key}`: {e}",
                    self.origin.display()
                ))
            })?;
            fused.insert(key, w_new);
        }
        let mut names: Vec<String> = fused.keys().cloned().collect();
        names.sort();
        Ok((
            fused,
            LoraReport {
                fused: names,
                other_components,
            },
        ))
    }

    /// `base` with this LoRA fused into the `target`'s weights (see [`Lora::fused_weights`]).
    pub fn fuse_into(
        &self,
        base: Checkpoint,
        target: LoraTarget,
        scale: f64,
    ) -> Result<(Checkpoint, LoraReport)> {
        let (fused, report) = self.fused_weights(&base, target, scale)?;
        Ok((base.with_overlay(fused), report))
    }
}

/// `W + scale * alpha / rank * up.flatten(1) @ down.flatten(1)`, reshaped to `W`'s shape
/// (`alpha / sqrt(rank)` with rsLoRA). `module` is the PEFT module path, for the patterns.
fn fuse_one(
    w: &Tensor,
    m: &Module,
    scale: f64,
    adapter: Option<&AdapterConfig>,
    module: &str,
) -> Result<Tensor> {
    let dtype = if w.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let (down, up) = (m.down.as_ref().unwrap(), m.up.as_ref().unwrap());
    let rank = down.dim(0)?;
    let out = up.dim(0)?;
    if up.elem_count() != out * rank {
        bail!(
            "up has shape {:?} but down has shape {:?} (rank {rank}); up must be [out, rank(, 1, 1)]",
            up.dims(),
            down.dims()
        )
    }
    let inner = down.elem_count() / rank;
    if w.dims().first() != Some(&out) || w.elem_count() != out * inner {
        bail!(
            "up {:?} @ down {:?} does not fit the weight's shape {:?}",
            up.dims(),
            down.dims(),
            w.dims()
        )
    }
    if let Some(a) = adapter {
        let want = AdapterConfig::lookup(&a.rank_pattern, module).or(a.r);
        if let Some(want) = want.filter(|&r| r != rank) {
            bail!("its rank is {rank} but the adapter metadata says {want}")
        }
    }
    let alpha = m
        .alpha
        .or_else(|| adapter.and_then(|a| AdapterConfig::lookup(&a.alpha_pattern, module)))
        .or_else(|| adapter.and_then(|a| a.lora_alpha))
        .unwrap_or(rank as f64);
    if !alpha.is_finite() {
        bail!("its alpha is {alpha} (an alpha must be a finite number)")
    }
    let denominator = if adapter.is_some_and(|a| a.use_rslora) {
        (rank as f64).sqrt()
    } else {
        rank as f64
    };
    let up = up.to_dtype(dtype)?.reshape((out, rank))?;
    let down = down.to_dtype(dtype)?.reshape((rank, inner))?;
    let delta = up
        .matmul(&down)?
        .affine(scale * alpha / denominator, 0.0)?
        .reshape(w.dims())?;
    w.to_dtype(dtype)?.add(&delta)
}

/// Up to five items, then a count of the rest.
fn sample_list(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(5).map(String::as_str).collect();
    let more = items.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} (and {more} more)", shown.join(", "))
    } else {
        shown.join(", ")
    }
}
