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
//! A missing `alpha` means `alpha = rank` (factor 1). Shapes: linear `up [out, r] @ down [r, in]`;
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
/// skipped (counted in the report), not errors.
const KOHYA_COMPONENTS: [&str; 4] = ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"];
const DOTTED_COMPONENTS: [&str; 3] = ["unet.", "text_encoder.", "text_encoder_2."];

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

/// What a fusion did.
#[derive(Debug, Clone, Default)]
pub struct LoraReport {
    /// Base weight names that were fused, sorted.
    pub fused: Vec<String>,
    /// LoRA modules that belong to another component (e.g. the text encoder) and were skipped.
    pub other_components: usize,
}

/// A LoRA's tensors, as stored.
pub struct Lora {
    origin: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl Lora {
    /// Reads a LoRA file (`.safetensors`, or a PyTorch pickle).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let ckpt = Checkpoint::open(path.as_ref())?;
        let tensors = ckpt
            .names()
            .into_iter()
            .map(|n| Ok((n.clone(), ckpt.tensor(&n)?)))
            .collect::<Result<_>>()?;
        Ok(Self::from_tensors(path, tensors))
    }

    /// Wraps tensors already in memory; `origin` names them in messages.
    pub fn from_tensors(origin: impl AsRef<Path>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            origin: origin.as_ref().to_path_buf(),
            tensors,
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
        for (name, module) in &modules {
            let path: Option<String> = if let Some(rest) = name.strip_prefix(target.kohya_prefix) {
                ours += 1;
                match by_underscores.get(rest).map(Vec::as_slice) {
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
            {
                other_components += 1;
                continue;
            } else {
                ours += 1;
                let p = name.strip_prefix(target.dotted_prefix).unwrap_or(name);
                known.contains(p).then(|| p.to_string())
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

        let mut fused = HashMap::new();
        for (path, (name, module)) in &resolved {
            let key = format!("{path}.weight");
            let w = base.tensor(&key)?;
            let w_new = fuse_one(&w, module, scale).map_err(|e| {
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

/// `W + scale * alpha / rank * up.flatten(1) @ down.flatten(1)`, reshaped to `W`'s shape.
fn fuse_one(w: &Tensor, m: &Module, scale: f64) -> Result<Tensor> {
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
    let alpha = m.alpha.unwrap_or(rank as f64);
    let up = up.to_dtype(dtype)?.reshape((out, rank))?;
    let down = down.to_dtype(dtype)?.reshape((rank, inner))?;
    let delta = up
        .matmul(&down)?
        .affine(scale * alpha / rank as f64, 0.0)?
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
