//! Checkpoint loading with errors that name the file, the key and both shapes.
//!
//! A [`Checkpoint`] is a set of named tensors read from `.safetensors` (memory-mapped, loaded
//! lazily) or a PyTorch pickle (`.pt`, `.pth`, `.bin`, `.ckpt`; optionally one entry of a dict,
//! e.g. the `model` of a training checkpoint). It becomes a `VarBuilder`, so model constructors
//! spell the checkpoint's own parameter names (`vb.pp("layer1").pp(0)`) with no renaming table.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// Where tensors come from: memory-mapped safetensors files, or tensors already in memory.
enum Store {
    Mmap(MmapedSafetensors),
    Memory(HashMap<String, Tensor>),
}

/// Named tensors from one or more files, with a key prefix that can be stripped.
pub struct Checkpoint {
    /// The files read, for error messages.
    files: Vec<PathBuf>,
    store: Store,
    /// Prepended to every requested name (e.g. `module.model.` for robustness checkpoints).
    prefix: String,
    /// Tensors that replace (or add to) the stored ones, by requested name (prefix not
    /// included): e.g. UNet weights with a LoRA fused in (`crate::lora`).
    overlay: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Opens a checkpoint, choosing the reader by extension.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => Self::open_safetensors(&[path]),
            Some("pt" | "pth" | "bin" | "ckpt") => Self::open_pickle(path, None),
            _ => candle_core::bail!(
                "{}: unknown checkpoint format (expected .safetensors, .pt, .pth, .bin or .ckpt)",
                path.display()
            ),
        }
    }

    /// Memory-maps one or more safetensors files (sharded checkpoints are several).
    pub fn open_safetensors(paths: &[impl AsRef<Path>]) -> Result<Self> {
        let files: Vec<PathBuf> = paths.iter().map(|p| p.as_ref().to_path_buf()).collect();
        for f in &files {
            if !f.exists() {
                candle_core::bail!("{}: checkpoint file not found", f.display())
            }
        }
        // SAFETY: the mapped files are treated as read-only for the checkpoint's lifetime.
        let mmap = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| {
            candle_core::Error::Msg(format!(
                "{}: not a readable safetensors file: {e}",
                display(&files)
            ))
        })?;
        Ok(Self {
            files,
            store: Store::Mmap(mmap),
            prefix: String::new(),
            overlay: HashMap::new(),
        })
    }

    /// Reads a PyTorch pickle checkpoint. `key` selects one entry of a top-level dict (e.g.
    /// `Some("model")` or `Some("state_dict")`); `None` reads a bare state dict.
    pub fn open_pickle(path: impl AsRef<Path>, key: Option<&str>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            candle_core::bail!("{}: checkpoint file not found", path.display())
        }
        let tensors = candle_core::pickle::read_all_with_key(path, key).map_err(|e| {
            candle_core::Error::Msg(format!(
                "{}: cannot read as a PyTorch checkpoint{}: {e}",
                path.display(),
                key.map(|k| format!(" (entry `{k}`)")).unwrap_or_default()
            ))
        })?;
        if tensors.is_empty() {
            candle_core::bail!(
                "{}: no tensors found{}",
                path.display(),
                key.map(|k| format!(" under entry `{k}`"))
                    .unwrap_or_default()
            )
        }
        Ok(Self::from_tensors(path, tensors.into_iter().collect()))
    }

    /// Wraps tensors already in memory; `origin` names them in error messages.
    pub fn from_tensors(origin: impl AsRef<Path>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            files: vec![origin.as_ref().to_path_buf()],
            store: Store::Memory(tensors),
            prefix: String::new(),
            overlay: HashMap::new(),
        }
    }

    /// Reads every name as `prefix + name` (e.g. `module.model.` for the Salient ImageNet
    /// robust ResNet-50, whose weights sit under that prefix beside attacker copies).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The prefix prepended to every requested name.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The file(s) read, for messages.
    pub fn origin(&self) -> String {
        display(&self.files)
    }

    /// Replaces (or adds) tensors by requested name (the prefix is not part of the names):
    /// later reads, including through a `VarBuilder`, see these instead of the stored ones.
    pub fn with_overlay(mut self, tensors: HashMap<String, Tensor>) -> Self {
        self.overlay.extend(tensors);
        self
    }

    /// All tensor names in the file(s) and the overlay, prefix included, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = match &self.store {
            Store::Mmap(m) => m.tensors().into_iter().map(|(n, _)| n).collect(),
            Store::Memory(t) => t.keys().cloned().collect(),
        };
        names.extend(self.overlay.keys().map(|n| format!("{}{n}", self.prefix)));
        names.sort();
        names.dedup();
        names
    }

    /// Loads one tensor by its name (the prefix is applied), as stored (or as overlaid).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        if let Some(t) = self.overlay.get(name) {
            return Ok(t.clone());
        }
        let key = format!("{}{name}", self.prefix);
        let found = match &self.store {
            Store::Mmap(m) => match m.get(&key) {
                Ok(_) => Some(m.load(&key, &Device::Cpu)?),
                Err(_) => None,
            },
            Store::Memory(t) => t.get(&key).cloned(),
        };
        found.ok_or_else(|| self.missing(&key))
    }

    fn stored_shape(&self, key: &str) -> Option<Vec<usize>> {
        match &self.store {
            Store::Mmap(m) => m.get(key).ok().map(|v| v.shape().to_vec()),
            Store::Memory(t) => t.get(key).map(|t| t.dims().to_vec()),
        }
    }

    fn missing(&self, key: &str) -> candle_core::Error {
        // Suggest stored names that share the requested name's last two components.
        let tail: Vec<&str> = key.rsplit('.').take(2).collect();
        let similar: Vec<String> = self
            .names()
            .into_iter()
            .filter(|n| tail.iter().all(|t| n.contains(t)))
            .take(3)
            .collect();
        candle_core::Error::Msg(format!(
            "{}: no tensor `{key}`{}",
            display(&self.files),
            if similar.is_empty() {
                String::new()
            } else {
                format!(" (similar names: {})", similar.join(", "))
            }
        ))
    }

    /// A `VarBuilder` over this checkpoint that converts to `dtype` on `device`.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

fn display(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl SimpleBackend for Checkpoint {
    fn get(
        &self,
        expected: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let key = format!("{}{name}", self.prefix);
        let shape = match self.overlay.get(name) {
            Some(t) => Some(t.dims().to_vec()),
            None => self.stored_shape(&key),
        };
        match shape {
            None => Err(self.missing(&key)),
            Some(found) if found != expected.dims() => candle_core::bail!(
                "{}: tensor `{key}` has shape {found:?} but the model config expects {:?}",
                display(&self.files),
                expected.dims()
            ),
            Some(_) => self.tensor(name)?.to_dtype(dtype)?.to_device(dev),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.tensor(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.overlay.contains_key(name)
            || self
                .stored_shape(&format!("{}{name}", self.prefix))
                .is_some()
    }
}

/// A weight source that invents every tensor it is asked for: seeded random values of the
/// requested shape, drawn on the device. For benchmarks and embedded tiny models, where the
/// architecture matters and the values do not (timing does not depend on them), but zeros
/// would make attention uniform and gradients vanish.
///
/// Values: matrices and kernels `N(0, 1/fan_in)`; 1-D `weight`s (norm scales) near 1;
/// `running_var` near 1 (positive); other 1-D tensors (biases, means) small.
pub struct RandomWeights {
    seed: u64,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// A `VarBuilder` whose every `get` returns a fresh random tensor (the same name always
    /// gives the same values).
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn make(&self, shape: &Shape, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        // Name-derived seed: deterministic whatever order the model asks in.
        let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = crate::rng::SeededRng::new(self.seed ^ name_hash);
        let dims = shape.dims();
        let noise = Tensor::from_vec(
            rng.normal_vec(shape.elem_count()),
            shape.clone(),
            &Device::Cpu,
        )?;
        let t = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            (noise / (fan_in as f64).sqrt())?
        } else if name.ends_with("running_var") || name.ends_with("weight") {
            ((noise * 0.1)? + 1.0)?.abs()?
        } else {
            (noise * 0.1)?
        };
        t.to_dtype(dtype)?.to_device(dev)
    }
}

impl SimpleBackend for RandomWeights {
    fn get(&self, shape: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.make(&shape, name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("RandomWeights cannot invent `{name}` without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}
