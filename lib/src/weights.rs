//! Checkpoint loading with errors that name the file, the key and both shapes.
//!
//! A [`Checkpoint`] is a set of named tensors read from safetensors (memory-mapped, loaded
//! lazily) or a PyTorch `torch.save` file (the zip format of torch >= 1.6, or the legacy
//! format before it, see [`torch_save`]; optionally one entry of a dict, e.g. the `model` of
//! a training checkpoint). The format is chosen by the file's first bytes ([`Format::detect`]),
//! never by its name: `model_best.pth.tar`, `x.pth`, `pytorch_model.bin` and `x.ckpt` are all
//! `torch.save` files. It becomes a `VarBuilder`, so model constructors spell the checkpoint's
//! own parameter names (`vb.pp("layer1").pp(0)`) with no renaming table.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::rng::SeededRng;

pub mod torch_save;

/// A checkpoint file's format, recognized by content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// safetensors: an 8-byte little-endian header length, then a JSON header (`{`).
    Safetensors,
    /// `torch.save` since torch 1.6: a zip archive (`PK\x03\x04`) holding `data.pkl`.
    TorchZip,
    /// `torch.save` before 1.6 (or `_use_new_zipfile_serialization=False`): pickles starting
    /// with torch's magic number (see [`torch_save`]).
    TorchLegacy,
}

impl Format {
    /// Reads the first bytes of `path`; an error names the file and what was found there.
    pub fn detect(path: &Path) -> Result<Self> {
        use std::io::Read;
        let mut file = std::fs::File::open(path).map_err(|e| {
            candle_core::Error::Msg(format!("{}: cannot open: {e}", path.display()))
        })?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut head = Vec::with_capacity(512);
        file.by_ref()
            .take(512)
            .read_to_end(&mut head)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        if head.starts_with(b"PK\x03\x04") {
            return Ok(Self::TorchZip);
        }
        if torch_save::has_magic(&head) {
            return Ok(Self::TorchLegacy);
        }
        if head.len() > 8 && head[8] == b'{' {
            let header = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
            if header.saturating_add(8) <= len {
                return Ok(Self::Safetensors);
            }
            // A plausible header length that runs past the end: a safetensors file cut short.
            if header < 100 << 20 {
                candle_core::bail!(
                    "{}: a safetensors file cut short (an interrupted download or copy?): its \
                     header alone needs {} bytes but the file has {len}",
                    path.display(),
                    header + 8
                )
            }
        }
        let found = if head.is_empty() {
            "the file is empty".to_string()
        } else if head.starts_with(b"version https://git-lfs") {
            "a Git LFS pointer, not the weights (fetch them with `git lfs pull`)".to_string()
        } else if head.len() > 262 && &head[257..262] == b"ustar" {
            "a tar archive (torch.save's oldest format is not supported; load and re-save it \
             with a recent torch)"
                .to_string()
        } else if head[0] == 0x80 {
            "a Python pickle without torch's magic number (not a torch.save file)".to_string()
        } else if head.starts_with(b"\x1f\x8b") {
            "gzip-compressed data (decompress it first)".to_string()
        } else {
            let shown: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
            let text: String = head
                .iter()
                .take(16)
                .map(|&b| {
                    if b.is_ascii_graphic() || b == b' ' {
                        b as char
                    } else {
                        '.'
                    }
                })
                .collect();
            format!("it starts with bytes {} (\"{text}\")", shown.join(" "))
        };
        candle_core::bail!(
            "{}: not a checkpoint format this program reads (safetensors, or a torch.save file \
             in the zip or legacy format): {found}",
            path.display()
        )
    }
}

/// `Some(message)` when `path` is a safetensors file whose header describes more tensor bytes
/// than the file holds (the usual result of an interrupted download): the safetensors crate only
/// says "incomplete metadata, file not fully covered".
fn safetensors_cut_short(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n).ok()?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || n + 8 > len {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).ok()?;
    let needed = header
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()?;
    let have = len - 8 - n;
    (needed > have).then(|| {
        format!(
            "{}: a safetensors file cut short (an interrupted download or copy?): its header \
             describes {needed} bytes of tensor data but the file holds {have}",
            path.display()
        )
    })
}

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
    /// Opens a checkpoint, choosing the reader by the file's content ([`Format::detect`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            candle_core::bail!("{}: checkpoint file not found", path.display())
        }
        match Format::detect(path)? {
            Format::Safetensors => Self::open_safetensors(&[path]),
            Format::TorchZip | Format::TorchLegacy => Self::open_pickle(path, None),
        }
    }

    /// Opens one file ([`Checkpoint::open`]) or the shards of one checkpoint: safetensors
    /// shards are memory-mapped together, `torch.save` shards are read into memory.
    pub fn open_all(paths: &[impl AsRef<Path>]) -> Result<Self> {
        match paths {
            [] => candle_core::bail!("no checkpoint files given"),
            [one] => Self::open(one),
            many => {
                let formats = many
                    .iter()
                    .map(|p| Format::detect(p.as_ref()))
                    .collect::<Result<Vec<_>>>()?;
                if formats.iter().all(|f| *f == Format::Safetensors) {
                    return Self::open_safetensors(many);
                }
                let mut tensors = HashMap::new();
                for p in many {
                    let shard = Self::open(p)?;
                    for n in shard.names() {
                        tensors.insert(n.clone(), shard.tensor(&n)?);
                    }
                }
                let files: Vec<PathBuf> = many.iter().map(|p| p.as_ref().to_path_buf()).collect();
                Ok(Self {
                    files,
                    store: Store::Memory(tensors),
                    prefix: String::new(),
                    overlay: HashMap::new(),
                })
            }
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
            if let Some(why) = files.iter().find_map(|f| safetensors_cut_short(f)) {
                return candle_core::Error::Msg(why);
            }
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

    /// Reads a `torch.save` checkpoint (zip or legacy format, by content). `key` selects one
    /// entry of a top-level dict (e.g. `Some("model")` or `Some("state_dict")`); `None` reads a
    /// bare state dict.
    pub fn open_pickle(path: impl AsRef<Path>, key: Option<&str>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            candle_core::bail!("{}: checkpoint file not found", path.display())
        }
        let read = match Format::detect(path)? {
            Format::TorchZip => torch_save::read_zip(path, key),
            Format::TorchLegacy => std::fs::read(path)
                .map_err(candle_core::Error::wrap)
                .and_then(|bytes| torch_save::read_legacy(&bytes, key)),
            Format::Safetensors => candle_core::bail!(
                "{}: a safetensors file, not a torch.save file",
                path.display()
            ),
        };
        let tensors = read.map_err(|e| {
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

/// A weight source that makes up every tensor from its name and a seed: the same name and seed
/// give the same values on every machine (drawn on the CPU with [`crate::rng::SeededRng`], then
/// moved to the device). For benchmarks (timing does not depend on the values) and the embedded
/// tiny models; zeros would make attention uniform and gradients vanish. Scales keep activations moderate: matrices and
/// kernels `N(0, 1/fan_in)`, norm scales `1 + N(0, 0.1²)`, biases `N(0, 0.05²)`, BatchNorm
/// statistics 0 / 1. The tensors are plain (not `Var`s), so backward computes no weight
/// gradients.
pub struct RandomWeights {
    seed: u64,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// A `VarBuilder` whose every `get` makes the tensor up (the same name and seed always
    /// give the same values). Nothing is reported as stored, so constructors that probe for
    /// legacy names take the current ones.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn values(&self, name: &str, dims: &[usize]) -> Vec<f32> {
        let n: usize = dims.iter().product();
        // FNV-1a of the name, mixed with the seed.
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        let mut rng = SeededRng::new(hash ^ self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (mean, std) = if name.ends_with("running_var") {
            (1.0, 0.0)
        } else if name.ends_with("running_mean") || name.ends_with("num_batches_tracked") {
            (0.0, 0.0)
        } else if name.ends_with("bias") {
            (0.0, 0.05)
        } else if name.ends_with("weight") && dims.len() == 1 {
            (1.0, 0.1)
        } else if name.ends_with("weight") {
            let fan_in: usize = dims[1..].iter().product();
            (0.0, 1.0 / (fan_in.max(1) as f32).sqrt())
        } else {
            (0.0, 0.1)
        };
        if std == 0.0 {
            return vec![mean; n];
        }
        rng.normal_vec(n)
            .into_iter()
            .map(|v| mean + std * v)
            .collect()
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let values = self.values(name, shape.dims());
        Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("seeded weights: `{name}` has no shape to make it up from")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        // Report nothing stored, so the models take their default (modern) naming.
        false
    }
}
