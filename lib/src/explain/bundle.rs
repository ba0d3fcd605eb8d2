//! Model bundles: every model a [`DiffusionPipeline`](super::pipeline::DiffusionPipeline) runs
//! (tokenizer, CLIP text encoder, UNet, VAE decoder, scheduler, classifier and its input
//! preprocessing), described by a serializable [`ModelSpec`] (what a run record keeps) and
//! loaded by [`ModelBundle::load`].
//!
//! Where the diffusion model comes from ([`DiffusionSource`]):
//! - `Tiny`: tiny random models built in code from a seed ([`ModelBundle::tiny_random`]): no
//!   files, so the CLI and the tests run on a fresh machine. The CLIP text encoder keeps the real
//!   49408-token vocabulary, so the embedded tokenizer's ids are valid and the textual
//!   explanation reads real words (of a random embedding table).
//! - `Dir`: a local folder in the Hugging Face diffusers layout (`tokenizer/`, `text_encoder/`,
//!   `unet/`, `vae/`, `scheduler/`).
//! - `Hub`: a model id resolved in the local Hugging Face cache
//!   (`$HF_HOME/hub/models--ORG--NAME/snapshots/REV/`, via `hf-hub`'s cache code; nothing is
//!   downloaded). When it is not there, the error says which files to download and where.
//!
//! Presets ([`ModelSpec::preset`]) fix the paper's settings: `sd15-lcm` (SD 1.5 with the LCM
//! LoRA, LCM scheduler, 4 steps), `sd14-lcm` (the same on SD 1.4, `CompVis/stable-diffusion-v1-4`,
//! the authors' base) and `sd-turbo` (1 step, Euler ancestral, trailing spacing).
//! Classifier presets ([`ClassifierSpec::preset`]): `resnet18`, `resnet50`, `vgg16`, `vit-b16`,
//! `robust-resnet50`, each loaded from a user-supplied checkpoint (or torchvision's file name in
//! the torch hub cache).
//!
//! Folders are read through [`crate::pretrained`] (configs, single or sharded weights, `.bin`),
//! taking the plain weights or else the `fp16` variant; the UNet's weights are opened before the
//! model is built so that a LoRA can be fused into them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::lora::{Lora, LoraTarget};
use crate::models::classifiers::vit::VitConfig;
use crate::models::classifiers::{Classifier, ClassifierConfig, Preprocess};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::sampling::{SchedulerConfig, SchedulerKind};
use crate::tokenizer::ClipTokenizer;

/// Where the diffusion model (tokenizer, text encoder, UNet, VAE, scheduler config) comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DiffusionSource {
    /// Tiny random models built in code from `seed` (no files).
    Tiny { seed: u64 },
    /// A local folder in the diffusers layout.
    Dir { path: PathBuf },
    /// A Hub model id, resolved in the local Hugging Face cache. `revision` is the branch or
    /// commit asked for (`main` when `None`); a loaded bundle records the commit it found.
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

/// A file from a path or from a Hub repository in the local cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum FileSource {
    Path { path: PathBuf },
    Hub { repo: String, file: String },
}

/// A LoRA fused into the UNet at load time (e.g. LCM-LoRA), with its scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub source: FileSource,
    pub scale: f64,
}

/// Which classifier and how its inputs are prepared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierSpec {
    /// A torchvision architecture name (`resnet50`, `vit_b_16`, ...), `tiny` (the tiny random
    /// ViT of the embedded default) or `folder` (a classifier folder, see
    /// [`crate::models::classifiers::folder`]).
    pub arch: String,
    /// The checkpoint (`None` for `tiny`; the folder for `folder`).
    pub checkpoint: Option<PathBuf>,
    /// The square side images are resized to (antialiased) before the classifier: 256 for the
    /// CNNs, 224 for ViT-B/16.
    pub input_size: usize,
}

/// Classifier presets: (name, torchvision architecture, input size, torchvision's file name).
pub const CLASSIFIER_PRESETS: &[(&str, &str, usize, Option<&str>)] = &[
    ("resnet18", "resnet18", 256, Some("resnet18-f37072fd.pth")),
    ("resnet50", "resnet50", 256, Some("resnet50-0676ba61.pth")),
    ("vgg16", "vgg16", 256, Some("vgg16-397923af.pth")),
    ("vit-b16", "vit_b_16", 224, Some("vit_b_16-c867db91.pth")),
    // Salient ImageNet's robust ResNet-50 (`imagenet_l2_3_0.pt`, MadryLab robustness layout,
    // its own input normalization): never in torchvision's cache.
    ("robust-resnet50", "resnet50", 256, None),
];

/// [`ClassifierSpec::arch`] of a classifier folder.
pub const FOLDER_ARCH: &str = "folder";

/// Diffusion presets, by name.
pub const DIFFUSION_PRESETS: &[&str] = &["sd15-lcm", "sd14-lcm", "sd-turbo", "tiny"];

impl ClassifierSpec {
    /// A classifier preset with a checkpoint. Without one, torchvision's file is looked up in
    /// the torch hub cache (`$TORCH_HOME/hub/checkpoints/`, default `~/.cache/torch`).
    pub fn preset(name: &str, checkpoint: Option<PathBuf>) -> anyhow::Result<Self> {
        if crate::models::classifiers::is_classifier_folder(Path::new(name)) {
            return Self::folder(Path::new(name), checkpoint);
        }
        let Some(&(_, arch, input_size, file)) =
            CLASSIFIER_PRESETS.iter().find(|(n, ..)| *n == name)
        else {
            anyhow::bail!(
                "unknown classifier `{name}` (known: {})",
                CLASSIFIER_PRESETS
                    .iter()
                    .map(|p| p.0)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let checkpoint = match (checkpoint, file) {
            (Some(path), _) => path,
            // Where torchvision keeps it; when absent, loading reports it with everything else
            // the spec lacks ([`ModelSpec::missing_weights`]).
            (None, Some(file)) => {
                return Ok(Self {
                    arch: arch.to_string(),
                    checkpoint: Some(torch_hub_dir().join(file)),
                    input_size,
                })
            }
            (None, None) => anyhow::bail!(
                "classifier `{name}` needs its checkpoint: pass --classifier-checkpoint PATH \
                 (for robust-resnet50, Salient ImageNet's imagenet_l2_3_0.pt)"
            ),
        };
        // A path that does not exist yet is reported when loading, with everything else missing
        // ([`ModelSpec::missing_weights`]); one that exists but is no file is refused now.
        if checkpoint.exists() && !checkpoint.is_file() {
            anyhow::bail!(
                "classifier `{name}`: checkpoint {} {}",
                checkpoint.display(),
                crate::io::why_unusable(&checkpoint, false)
            )
        }
        Ok(Self {
            arch: arch.to_string(),
            checkpoint: Some(checkpoint),
            input_size,
        })
    }

    /// A classifier folder (`config.json` + `model.safetensors`, e.g. a ShapesWorld
    /// classifier); its input size comes from its config.
    pub fn folder(dir: &Path, checkpoint: Option<PathBuf>) -> anyhow::Result<Self> {
        if checkpoint.is_some() {
            anyhow::bail!(
                "classifier {} is a folder with its own weights: --classifier-checkpoint would \
                 have no effect",
                dir.display()
            )
        }
        let config = crate::models::classifiers::ClassifierFolderConfig::read(dir)?;
        Ok(Self {
            arch: FOLDER_ARCH.to_string(),
            checkpoint: Some(dir.to_path_buf()),
            input_size: config.input_size,
        })
    }

    /// The tiny random classifier of the embedded default.
    pub fn tiny() -> Self {
        Self {
            arch: "tiny".to_string(),
            checkpoint: None,
            input_size: TINY_RESOLUTION,
        }
    }
}

fn torch_hub_dir() -> PathBuf {
    let home = std::env::var_os("TORCH_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_default()
                .join("torch")
        });
    home.join("hub").join("checkpoints")
}

/// Everything needed to rebuild a bundle: kept in every run record's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The preset this was made from, if any (informative).
    pub preset: Option<String>,
    pub diffusion: DiffusionSource,
    pub lora: Option<LoraSpec>,
    /// `lcm`, `euler_ancestral` or `ddim`; `None` takes the folder's scheduler class.
    pub scheduler: Option<String>,
    /// Overrides the scheduler config's `timestep_spacing` (`trailing` for SD-Turbo).
    pub timestep_spacing: Option<String>,
    pub steps: usize,
    /// Side of the generated images in pixels (latents are `resolution / 8` for SD).
    pub resolution: usize,
    pub classifier: ClassifierSpec,
    /// `f32`, `f16`, `bf16` or `f64`, for the diffusion models (the classifier runs in f32, or
    /// f64 in an f64 bundle).
    pub dtype: String,
}

/// Side of the tiny default's images.
pub const TINY_RESOLUTION: usize = 32;

impl ModelSpec {
    /// The embedded default: tiny random models from `seed`, LCM with 2 steps, 32×32 images,
    /// a tiny random ViT with 10 classes.
    pub fn tiny(seed: u64) -> Self {
        Self {
            preset: Some("tiny".to_string()),
            diffusion: DiffusionSource::Tiny { seed },
            lora: None,
            scheduler: Some("lcm".to_string()),
            timestep_spacing: None,
            steps: 2,
            resolution: TINY_RESOLUTION,
            classifier: ClassifierSpec::tiny(),
            dtype: "f32".to_string(),
        }
    }

    /// A diffusion preset (see [`DIFFUSION_PRESETS`]) with a classifier. `model_dir`, when
    /// given, replaces the preset's Hub id by a local diffusers folder.
    pub fn preset(
        name: &str,
        model_dir: Option<PathBuf>,
        classifier: ClassifierSpec,
    ) -> anyhow::Result<Self> {
        let hub_or_dir = |repo: &str| match &model_dir {
            Some(path) => DiffusionSource::Dir { path: path.clone() },
            None => DiffusionSource::Hub {
                repo: repo.to_string(),
                revision: None,
            },
        };
        Ok(match name {
            "sd15-lcm" => Self {
                preset: Some(name.to_string()),
                diffusion: hub_or_dir("stable-diffusion-v1-5/stable-diffusion-v1-5"),
                lora: Some(LoraSpec {
                    source: FileSource::Hub {
                        repo: "latent-consistency/lcm-lora-sdv1-5".to_string(),
                        file: "pytorch_lora_weights.safetensors".to_string(),
                    },
                    scale: 1.0,
                }),
                scheduler: Some("lcm".to_string()),
                timestep_spacing: None,
                steps: 4,
                resolution: 512,
                classifier,
                dtype: "f32".to_string(),
            },
            // The authors' base (DEXTER): SD 1.4 with the SD 1.5 LCM-LoRA (the two share the
            // UNet architecture), LCM, 4 steps.
            "sd14-lcm" => Self {
                preset: Some(name.to_string()),
                diffusion: hub_or_dir("CompVis/stable-diffusion-v1-4"),
                lora: Some(LoraSpec {
                    source: FileSource::Hub {
                        repo: "latent-consistency/lcm-lora-sdv1-5".to_string(),
                        file: "pytorch_lora_weights.safetensors".to_string(),
                    },
                    scale: 1.0,
                }),
                scheduler: Some("lcm".to_string()),
                timestep_spacing: None,
                steps: 4,
                resolution: 512,
                classifier,
                dtype: "f32".to_string(),
            },
            "sd-turbo" => Self {
                preset: Some(name.to_string()),
                diffusion: hub_or_dir("stabilityai/sd-turbo"),
                lora: None,
                scheduler: Some("euler_ancestral".to_string()),
                timestep_spacing: Some("trailing".to_string()),
                steps: 1,
                resolution: 512,
                classifier,
                dtype: "f32".to_string(),
            },
            "tiny" => Self {
                classifier,
                ..Self::tiny(0)
            },
            other => anyhow::bail!(
                "unknown model preset `{other}` (known: {})",
                DIFFUSION_PRESETS.join(", ")
            ),
        })
    }

    pub fn dtype(&self) -> anyhow::Result<DType> {
        parse_dtype(&self.dtype)
    }

    /// Only the tokenizer and text encoder (all the textual explanation needs).
    pub fn load_text_encoder(
        &self,
        device: &Device,
    ) -> anyhow::Result<(ClipTokenizer, ClipTextModel)> {
        let dtype = self.dtype()?;
        check_dtype_on_device(dtype, device)?;
        match &self.diffusion {
            DiffusionSource::Tiny { seed } => Ok((
                ClipTokenizer::embedded()?,
                ClipTextModel::new(seeded_vb(*seed, 1, dtype, device), &tiny::clip_config())?,
            )),
            DiffusionSource::Dir { path } => {
                let lora = resolve_lora(self.lora.as_ref())?;
                load_text_dir(path, dtype, device, lora.as_ref())
            }
            DiffusionSource::Hub { repo, revision } => {
                let (dir, _) = resolve_hub_model(repo, revision.as_deref())?;
                let lora = resolve_lora(self.lora.as_ref())?;
                load_text_dir(&dir, dtype, device, lora.as_ref())
            }
        }
    }
}

/// `f32`, `f16`, `bf16`, `f64`.
pub fn parse_dtype(name: &str) -> anyhow::Result<DType> {
    Ok(match name {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "f64" => DType::F64,
        other => anyhow::bail!("unknown dtype `{other}` (use f32, f16, bf16 or f64)"),
    })
}

/// Refuses a dtype the device cannot compute in, before anything loads: candle's CPU backend
/// has no bf16 matmul (it would fail inside the first layer with a bare "unsupported dtype").
pub fn check_dtype_on_device(dtype: DType, device: &Device) -> anyhow::Result<()> {
    if dtype == DType::BF16 && device.is_cpu() {
        anyhow::bail!(
            "--dtype bf16 needs a GPU (--device cuda): candle's CPU backend has no bf16 \
             matmul; use f32 or f16 on the CPU"
        )
    }
    Ok(())
}

/// The name [`parse_dtype`] reads.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "f32",
    }
}

/// The loaded models.
pub struct ModelBundle {
    /// What was loaded (with the Hub revision resolved to the commit found, where known).
    pub spec: ModelSpec,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_kind: SchedulerKind,
    pub scheduler_config: SchedulerConfig,
    pub classifier: Classifier,
    pub preprocess: Preprocess,
    /// The diffusion models' dtype.
    pub dtype: DType,
    /// The classifier's dtype (f32, or f64 in an f64 bundle).
    pub classifier_dtype: DType,
    pub device: Device,
}

impl std::fmt::Debug for ModelBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelBundle")
            .field("spec", &self.spec)
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl ModelBundle {
    /// The embedded default on the CPU in f32 (see [`ModelSpec::tiny`]).
    pub fn tiny_random(seed: u64) -> anyhow::Result<Self> {
        Self::load(&ModelSpec::tiny(seed), &Device::Cpu)
    }

    /// Loads everything a spec names onto `device`.
    pub fn load(spec: &ModelSpec, device: &Device) -> anyhow::Result<Self> {
        let missing = spec.missing_weights();
        if !missing.is_empty() {
            return Err(weights_not_available(&missing));
        }
        let dtype = spec.dtype()?;
        check_dtype_on_device(dtype, device)?;
        let classifier_dtype = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let mut spec = spec.clone();
        let diffusion = match &spec.diffusion {
            DiffusionSource::Tiny { seed } => {
                if let Some(lora) = &spec.lora {
                    anyhow::bail!(
                        "a LoRA ({:?}) has no effect on the tiny random models: a LoRA is \
                         trained for one checkpoint's weights",
                        lora.source
                    )
                }
                tiny_diffusion(*seed, dtype, device)?
            }
            DiffusionSource::Dir { path } => {
                let lora = resolve_lora(spec.lora.as_ref())?;
                load_diffusers_dir(path, dtype, device, lora.as_ref())?
            }
            DiffusionSource::Hub { repo, revision } => {
                let (dir, commit) = resolve_hub_model(repo, revision.as_deref())?;
                let lora = resolve_lora(spec.lora.as_ref())?;
                let loaded = load_diffusers_dir(&dir, dtype, device, lora.as_ref())?;
                spec.diffusion = DiffusionSource::Hub {
                    repo: repo.clone(),
                    revision: Some(commit),
                };
                loaded
            }
        };
        let scheduler_kind = match spec.scheduler.as_deref() {
            Some("lcm") => SchedulerKind::Lcm,
            Some("euler_ancestral") => SchedulerKind::EulerAncestral,
            Some("ddim") => SchedulerKind::Ddim,
            Some(other) => {
                anyhow::bail!("unknown scheduler `{other}` (use lcm, euler_ancestral or ddim)")
            }
            None => SchedulerKind::from_class_name(
                diffusion
                    .scheduler_config
                    .class_name
                    .as_deref()
                    .unwrap_or("DDIMScheduler"),
            )?,
        };
        let mut scheduler_config = diffusion.scheduler_config;
        if let Some(spacing) = &spec.timestep_spacing {
            scheduler_config.timestep_spacing = Some(spacing.clone());
        }
        // Fail now, not at the first iteration, saying which config file to change.
        scheduler_kind.build(&scheduler_config).with_context(|| {
            let file = match &spec.diffusion {
                DiffusionSource::Tiny { .. } => "the embedded tiny default's config".to_string(),
                DiffusionSource::Dir { path } => path
                    .join("scheduler")
                    .join("scheduler_config.json")
                    .display()
                    .to_string(),
                DiffusionSource::Hub { repo, .. } => {
                    format!("scheduler/scheduler_config.json of {repo} in the Hugging Face cache")
                }
            };
            format!(
                "scheduler `{}` cannot run with {file}; fix that file or choose another \
                 --scheduler (lcm, euler_ancestral, ddim)",
                spec.scheduler.as_deref().unwrap_or("of the folder")
            )
        })?;
        if spec.steps == 0 {
            anyhow::bail!("the number of sampling steps must be at least 1")
        }

        let classifier = match (spec.classifier.arch.as_str(), &spec.classifier.checkpoint) {
            ("tiny", _) => {
                let seed = match spec.diffusion {
                    DiffusionSource::Tiny { seed } => seed,
                    _ => 0,
                };
                tiny_classifier(seed, classifier_dtype, device)?
            }
            (FOLDER_ARCH, Some(dir)) => {
                Classifier::from_dir(dir, classifier_dtype, device)
                    .with_context(|| format!("loading classifier folder {}", dir.display()))?
                    .0
            }
            (arch, Some(path)) => {
                let c = Classifier::load(arch, path, device).with_context(|| {
                    format!("loading classifier {arch} from {}", path.display())
                })?;
                if classifier_dtype == DType::F64 {
                    let config = c.config();
                    let normalization = c.normalization;
                    let (ckpt, _) = crate::models::classifiers::open_checkpoint(
                        path,
                        match config {
                            ClassifierConfig::ResNet(_) => "fc.weight",
                            ClassifierConfig::Vgg(_) => "classifier.6.weight",
                            ClassifierConfig::Vit(_) => "heads.head.weight",
                        },
                    )?;
                    let mut c =
                        Classifier::new(ckpt.into_var_builder(DType::F64, device), &config)?;
                    c.normalization = normalization;
                    c
                } else {
                    c
                }
            }
            (arch, None) => anyhow::bail!("classifier `{arch}` needs a checkpoint path"),
        };
        let preprocess = classifier.preprocess(spec.classifier.input_size);

        let bundle = Self {
            spec,
            tokenizer: diffusion.tokenizer,
            text_encoder: diffusion.text_encoder,
            unet: diffusion.unet,
            vae: diffusion.vae,
            scheduler_kind,
            scheduler_config,
            classifier,
            preprocess,
            dtype,
            classifier_dtype,
            device: device.clone(),
        };
        bundle.check()?;
        Ok(bundle)
    }

    /// How many pixels one latent covers along a side (8 for SD's four-block VAE).
    pub fn vae_scale_factor(&self) -> usize {
        1 << (self.vae.config.block_out_channels.len() - 1)
    }

    /// The latents' shape for a batch: `[batch, unet in_channels, res/f, res/f]`.
    pub fn latent_shape(&self, batch: usize) -> (usize, usize, usize, usize) {
        let side = self.spec.resolution / self.vae_scale_factor();
        (batch, self.unet.config.in_channels, side, side)
    }

    fn check(&self) -> anyhow::Result<()> {
        let f = self.vae_scale_factor();
        let r = self.spec.resolution;
        if r == 0 || !r.is_multiple_of(f) {
            let below = r / f * f;
            let nearest = if below == 0 {
                format!("{f}")
            } else {
                format!("{below} or {}", below + f)
            };
            anyhow::bail!(
                "resolution {r} is not a positive multiple of the VAE's scale factor {f} \
                 (each latent covers {f}x{f} pixels); the nearest valid resolutions are {nearest}"
            )
        }
        let clip = self.text_encoder.config().hidden_size;
        let cross = self.unet.config.cross_attention_dim();
        if clip != cross {
            anyhow::bail!(
                "the text encoder's width {clip} does not match the UNet's cross_attention_dim \
                 {cross}: text_encoder/ and unet/ come from different models"
            )
        }
        if self.unet.config.in_channels != self.vae.config.latent_channels {
            anyhow::bail!(
                "the UNet takes {} latent channels but the VAE has {}",
                self.unet.config.in_channels,
                self.vae.config.latent_channels
            )
        }
        Ok(())
    }
}

/// The diffusion half of a bundle.
struct Diffusion {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    scheduler_config: SchedulerConfig,
}

/// Loads a diffusers folder: `tokenizer/`, `text_encoder/{config.json, model.safetensors}`,
/// `unet/{config.json, diffusion_pytorch_model.safetensors}`, `vae/...`,
/// `scheduler/scheduler_config.json`; `.fp16.safetensors` variants are taken when the full
/// files are absent. A LoRA, if given, is fused into the UNet's weights.
fn load_diffusers_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
    lora: Option<&(PathBuf, f64)>,
) -> anyhow::Result<Diffusion> {
    use crate::pretrained::{config_path, SCHEDULER, UNET, VAE};
    let (tokenizer, text_encoder) = load_text_dir(dir, dtype, device, lora)?;

    let unet_cfg = UNet2DConditionConfig::from_file(config_path(dir, &UNET)?)?;
    let mut unet_ckpt = open_component_weights(dir, &UNET)?;
    if let Some((path, scale)) = lora {
        let lora = open_lora(path)?;
        if lora.components()?.unet > 0 {
            let (fused, _) = lora.fuse_into(unet_ckpt, LoraTarget::UNET, *scale)?;
            unet_ckpt = fused;
        }
    }
    let unet = UNet2DConditionModel::new(unet_ckpt.into_var_builder(dtype, device), &unet_cfg)?;

    let vae_cfg = AutoencoderKLConfig::from_file(config_path(dir, &VAE)?)?;
    let vae_vb = open_component_weights(dir, &VAE)?.into_var_builder(dtype, device);
    let vae = AutoencoderKL::decoder_only(vae_vb, &vae_cfg)?;
    let scheduler_config = SchedulerConfig::from_file(config_path(dir, &SCHEDULER)?)?;
    Ok(Diffusion {
        tokenizer,
        text_encoder,
        unet,
        vae,
        scheduler_config,
    })
}

fn need_file(dir: &Path, rel: &str) -> anyhow::Result<PathBuf> {
    if !dir.is_dir() {
        anyhow::bail!(
            "model folder {} {}",
            dir.display(),
            crate::io::why_unusable(dir, true)
        )
    }
    let path = dir.join(rel);
    if path.exists() {
        Ok(path)
    } else {
        anyhow::bail!(
            "{}: not a complete diffusers model folder: {rel} is missing (expected \
             tokenizer/, text_encoder/, unet/, vae/, scheduler/)",
            dir.display()
        )
    }
}

/// A component's weights: the plain files, else the `fp16` variant (repositories often ship
/// only one of them). The error is the plain lookup's, which names the files tried and found.
fn open_component_weights(
    dir: &Path,
    c: &crate::pretrained::Component,
) -> anyhow::Result<crate::weights::Checkpoint> {
    match crate::pretrained::open_weights(dir, c, None) {
        Ok(checkpoint) => Ok(checkpoint),
        Err(plain) => {
            crate::pretrained::open_weights(dir, c, Some("fp16")).map_err(|_| plain.into())
        }
    }
}

/// Opens a LoRA and checks that every module has a component here to go to (the UNet or the
/// one text encoder): nothing may be skipped silently.
fn open_lora(path: &Path) -> anyhow::Result<Lora> {
    let lora = Lora::open(path)?;
    let c = lora.components()?;
    if !c.other.is_empty() {
        anyhow::bail!(
            "{}: {} LoRA module(s) are for a second text encoder (SDXL's lora_te1_/lora_te2_/\
             text_encoder_2.), e.g. {}; this program runs Stable Diffusion 1.x/2.x with one text \
             encoder, so this LoRA is for another model",
            path.display(),
            c.other.len(),
            c.other[0]
        )
    }
    if c.unet + c.text_encoder == 0 {
        anyhow::bail!("{}: the LoRA holds no modules", path.display())
    }
    Ok(lora)
}

/// The tokenizer and text encoder of a diffusers folder, with the text-encoder modules of a
/// LoRA fused in (kohya `lora_te_`, diffusers `text_encoder.`).
fn load_text_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
    lora: Option<&(PathBuf, f64)>,
) -> anyhow::Result<(ClipTokenizer, ClipTextModel)> {
    let tokenizer = ClipTokenizer::from_pretrained_dir(need_file(dir, "tokenizer")?)?;
    let text_encoder = crate::pretrained::TEXT_ENCODER;
    let text_cfg = ClipTextConfig::from_file(crate::pretrained::config_path(dir, &text_encoder)?)?;
    let mut ckpt = open_component_weights(dir, &text_encoder)?;
    if let Some((path, scale)) = lora {
        let lora = open_lora(path)?;
        if lora.components()?.text_encoder > 0 {
            let (fused, _) = lora.fuse_into(ckpt, LoraTarget::TEXT_ENCODER, *scale)?;
            ckpt = fused;
        }
    }
    let text_vb = ckpt.into_var_builder(dtype, device);
    // A model trained on a small corpus lists the tokens it saw (nearest-token explanations
    // search only those).
    let trained = crate::models::clip_text::read_trained_tokens(
        &dir.join(text_encoder.subfolder),
        text_cfg.vocab_size,
    )?;
    let model = ClipTextModel::new(text_vb, &text_cfg)?.with_trained_tokens(trained);
    Ok((tokenizer, model))
}

/// The files a diffusion model needs from the Hub (fp32 weights; `.fp16` variants also load).
const HUB_MODEL_FILES: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
];

fn hf_cache() -> hf_hub::Cache {
    hf_hub::Cache::from_env()
}

fn hub_repo(repo: &str, revision: Option<&str>) -> hf_hub::Repo {
    match revision {
        Some(rev) => {
            hf_hub::Repo::with_revision(repo.to_string(), hf_hub::RepoType::Model, rev.to_string())
        }
        None => hf_hub::Repo::model(repo.to_string()),
    }
}

/// A model or weight file a [`ModelSpec`] names that is not on this machine.
#[derive(Debug, Clone, PartialEq)]
pub struct MissingWeights {
    /// What it is, e.g. "model `CompVis/stable-diffusion-v1-4` (revision main) is not in the
    /// local Hugging Face cache".
    pub what: String,
    /// How to fetch it (a command for a machine with network access).
    pub fetch: String,
    /// Where it must land.
    pub into: PathBuf,
}

/// torchvision's download address of its checkpoint files.
const TORCHVISION_MODELS_URL: &str = "https://download.pytorch.org/models";

impl ModelSpec {
    /// Everything the spec names that is not available locally, all at once (nothing is
    /// downloaded; a user fetches the whole list in one go). Empty for the tiny models and for
    /// local folders (those report their own missing files when read).
    pub fn missing_weights(&self) -> Vec<MissingWeights> {
        let mut missing = Vec::new();
        if let DiffusionSource::Hub { repo, revision } = &self.diffusion {
            if let Err(m) = hub_model_snapshot(repo, revision.as_deref()) {
                missing.push(m);
            }
        }
        if let Some(LoraSpec {
            source: FileSource::Hub { repo, file },
            ..
        }) = &self.lora
        {
            if let Err(m) = hub_file(repo, file) {
                missing.push(m);
            }
        }
        let c = &self.classifier;
        if let Some(path) = c.checkpoint.as_ref().filter(|p| !p.exists()) {
            let torchvision_file = CLASSIFIER_PRESETS
                .iter()
                .find(|p| p.1 == c.arch && p.3.is_some_and(|f| path.ends_with(f)))
                .and_then(|p| p.3);
            missing.push(match torchvision_file {
                Some(file) => MissingWeights {
                    what: format!(
                        "classifier `{}`: torchvision's checkpoint `{file}` is not in the torch \
                         hub cache",
                        c.arch
                    ),
                    fetch: format!(
                        "curl -L --create-dirs -o {} {TORCHVISION_MODELS_URL}/{file}  (or pass \
                         --classifier-checkpoint PATH)",
                        path.display()
                    ),
                    into: path.clone(),
                },
                None => MissingWeights {
                    what: format!(
                        "classifier `{}`: the checkpoint {} does not exist",
                        c.arch,
                        path.display()
                    ),
                    fetch: if path.ends_with("imagenet_l2_3_0.pt") {
                        "Salient ImageNet's robust ResNet-50 (MadryLab robustness, ImageNet \
                         L2 eps=3.0): see https://github.com/singlasahil14/salient_imagenet"
                            .to_string()
                    } else {
                        "the classifier's state dict (.pth/.pt/.safetensors)".to_string()
                    },
                    into: path.clone(),
                },
            });
        }
        missing
    }
}

/// One error for everything missing: "weights not available: ..." with each item's fetch
/// command and destination.
pub fn weights_not_available(missing: &[MissingWeights]) -> anyhow::Error {
    let mut msg = format!(
        "weights not available: {} item(s) to download (this program never downloads; fetch \
         them on a machine with network access):",
        missing.len()
    );
    for (i, m) in missing.iter().enumerate() {
        msg.push_str(&format!(
            "\n  {}. {}\n     download: {}\n     into: {}",
            i + 1,
            m.what,
            m.fetch,
            m.into.display()
        ));
    }
    msg.push_str("\n(set HF_HOME / TORCH_HOME to use other caches, or --model-dir for a local diffusers folder)");
    anyhow::anyhow!(msg)
}

fn hub_model_snapshot(
    repo: &str,
    revision: Option<&str>,
) -> Result<(PathBuf, String), MissingWeights> {
    let cache = hf_cache();
    let r = hub_repo(repo, revision);
    let rev = r.revision().to_string();
    let folder = cache.path().join(r.folder_name());
    // A commit hash names its snapshot folder directly (hf-hub looks revisions up in refs/).
    let by_commit = folder.join("snapshots").join(&rev).join("model_index.json");
    let marker = if by_commit.is_file() {
        Some(by_commit)
    } else {
        cache.repo(r.clone()).get("model_index.json")
    };
    let Some(snapshot) = marker
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
    else {
        return Err(MissingWeights {
            what: format!(
                "model `{repo}` (revision {rev}) is not in the local Hugging Face cache ({} has \
                 no snapshot for it)",
                folder.display()
            ),
            fetch: format!(
                "huggingface-cli download {repo}{} {}",
                revision.map_or(String::new(), |r| format!(" --revision {r}")),
                HUB_MODEL_FILES.join(" ")
            ),
            into: cache.path().to_path_buf(),
        });
    };
    let commit = snapshot
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or(rev);
    Ok((snapshot, commit))
}

fn hub_file(repo: &str, file: &str) -> Result<PathBuf, MissingWeights> {
    let cache = hf_cache();
    let r = hub_repo(repo, None);
    cache
        .repo(r.clone())
        .get(file)
        .ok_or_else(|| MissingWeights {
            what: format!(
                "`{file}` of `{repo}` is not in the local Hugging Face cache ({})",
                cache.path().join(r.folder_name()).display()
            ),
            fetch: format!("huggingface-cli download {repo} {file}"),
            into: cache.path().to_path_buf(),
        })
}

/// The snapshot folder of a cached Hub model and the commit it is at. Nothing is downloaded:
/// a model that is not cached is an error saying what to fetch and where it must land.
pub fn resolve_hub_model(repo: &str, revision: Option<&str>) -> anyhow::Result<(PathBuf, String)> {
    hub_model_snapshot(repo, revision).map_err(|m| weights_not_available(&[m]))
}

/// One file of a cached Hub repository.
pub fn resolve_hub_file(repo: &str, file: &str) -> anyhow::Result<PathBuf> {
    hub_file(repo, file).map_err(|m| weights_not_available(&[m]))
}

fn resolve_lora(lora: Option<&LoraSpec>) -> anyhow::Result<Option<(PathBuf, f64)>> {
    let Some(lora) = lora else { return Ok(None) };
    let path = match &lora.source {
        FileSource::Path { path } => {
            if !path.is_file() {
                anyhow::bail!(
                    "LoRA file {} {}",
                    path.display(),
                    crate::io::why_unusable(path, false)
                )
            }
            path.clone()
        }
        FileSource::Hub { repo, file } => resolve_hub_file(repo, file)?,
    };
    Ok(Some((path, lora.scale)))
}

// ---------------------------------------------------------------------------------------------
// The embedded tiny default.

fn seeded_vb(seed: u64, component: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    crate::weights::RandomWeights::new(seed.wrapping_mul(31).wrapping_add(component))
        .into_var_builder(dtype, device)
}

/// Tiny configurations of the embedded default (SD-1.x-shaped, a few thousand parameters each
/// apart from CLIP's 49408×32 token table), as the JSON of their `config.json` files.
pub mod tiny {
    use super::*;

    pub fn clip_json() -> serde_json::Value {
        serde_json::json!({
            "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu"
        })
    }

    pub fn unet_json() -> serde_json::Value {
        serde_json::json!({
            "block_out_channels": [16, 32], "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 32, "attention_head_dim": 2, "norm_num_groups": 8,
            "sample_size": 8
        })
    }

    /// Three blocks: 8×8 latents decode to 32×32 images.
    pub fn vae_json() -> serde_json::Value {
        serde_json::json!({
            "block_out_channels": [8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "latent_channels": 4, "sample_size": 32
        })
    }

    /// The scheduler config: every class's defaults, except `clip_sample` (DDIM's default
    /// `true` clamps the predicted sample and cuts its gradient; Stable Diffusion's configs set
    /// it to false too), so that every scheduler runs on the tiny default.
    pub fn scheduler_json() -> serde_json::Value {
        serde_json::json!({"_class_name": "LCMScheduler", "clip_sample": false})
    }

    pub fn scheduler_config() -> SchedulerConfig {
        serde_json::from_value(scheduler_json()).expect("a valid scheduler config")
    }

    pub fn clip_config() -> ClipTextConfig {
        serde_json::from_value(clip_json()).expect("a valid CLIP config")
    }

    pub fn unet_config() -> UNet2DConditionConfig {
        serde_json::from_value(unet_json()).expect("a valid UNet config")
    }

    pub fn vae_config() -> AutoencoderKLConfig {
        serde_json::from_value(vae_json()).expect("a valid VAE config")
    }

    /// A ViT (smooth everywhere, so a random one has no dead units) on 32×32 images, 10 classes.
    pub fn classifier_config() -> ClassifierConfig {
        ClassifierConfig::Vit(VitConfig {
            image_size: TINY_RESOLUTION,
            patch_size: 8,
            num_layers: 2,
            num_heads: 2,
            hidden_dim: 32,
            mlp_dim: 64,
            num_classes: 10,
        })
    }
}

/// Writes the tiny default's diffusion models as a diffusers folder (`model_index.json`,
/// `tokenizer/`, `text_encoder/`, `unet/`, `vae/` (decoder weights), `scheduler/` with an LCM
/// config): loaded with [`DiffusionSource::Dir`] it gives the same images as
/// [`DiffusionSource::Tiny`] with the same seed. For trying and testing the folder loading.
pub fn write_tiny_diffusers_folder(seed: u64, dir: &Path) -> anyhow::Result<()> {
    let write_json = |rel: &str, value: &serde_json::Value| -> anyhow::Result<()> {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().expect("a file in a folder"))?;
        crate::io::write_bytes_atomically(&path, &serde_json::to_vec_pretty(value)?)
    };
    let save = |rel: &str, tensors: &std::collections::HashMap<String, Tensor>| {
        let path = dir.join(rel);
        crate::io::write_atomically(&path, |tmp| {
            candle_core::safetensors::save(tensors, tmp).map_err(Into::into)
        })
    };
    let record = |component: u64, build: &dyn Fn(VarBuilder) -> candle_core::Result<()>| {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let backend = Recording {
            inner: crate::weights::RandomWeights::new(
                seed.wrapping_mul(31).wrapping_add(component),
            ),
            seen: seen.clone(),
        };
        build(VarBuilder::from_backend(
            Box::new(backend),
            DType::F32,
            Device::Cpu,
        ))?;
        let tensors = seen.lock().map(|m| m.clone()).unwrap_or_default();
        anyhow::Ok(tensors)
    };
    write_json(
        "model_index.json",
        &serde_json::json!({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "tiny"}),
    )?;
    ClipTokenizer::embedded()?.save_pretrained(dir.join("tokenizer"))?;
    write_json("text_encoder/config.json", &tiny::clip_json())?;
    let clip = record(1, &|vb| {
        ClipTextModel::new(vb, &tiny::clip_config()).map(drop)
    })?;
    save("text_encoder/model.safetensors", &clip)?;
    write_json("unet/config.json", &tiny::unet_json())?;
    let unet = record(2, &|vb| {
        UNet2DConditionModel::new(vb, &tiny::unet_config()).map(drop)
    })?;
    save("unet/diffusion_pytorch_model.safetensors", &unet)?;
    write_json("vae/config.json", &tiny::vae_json())?;
    let vae = record(3, &|vb| {
        AutoencoderKL::decoder_only(vb, &tiny::vae_config()).map(drop)
    })?;
    save("vae/diffusion_pytorch_model.safetensors", &vae)?;
    write_json("scheduler/scheduler_config.json", &tiny::scheduler_json())?;
    Ok(())
}

/// [`crate::weights::RandomWeights`] that remembers what it made (to save it).
struct Recording {
    inner: crate::weights::RandomWeights,
    seen: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Tensor>>>,
}

impl SimpleBackend for Recording {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self
            .inner
            .get(shape, name, init, DType::F32, &Device::Cpu)?;
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(name.to_string(), t.clone());
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.inner.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

fn tiny_diffusion(seed: u64, dtype: DType, device: &Device) -> anyhow::Result<Diffusion> {
    Ok(Diffusion {
        tokenizer: ClipTokenizer::embedded()?,
        text_encoder: ClipTextModel::new(seeded_vb(seed, 1, dtype, device), &tiny::clip_config())?,
        unet: UNet2DConditionModel::new(seeded_vb(seed, 2, dtype, device), &tiny::unet_config())?,
        vae: AutoencoderKL::decoder_only(seeded_vb(seed, 3, dtype, device), &tiny::vae_config())?,
        scheduler_config: tiny::scheduler_config(),
    })
}

fn tiny_classifier(seed: u64, dtype: DType, device: &Device) -> anyhow::Result<Classifier> {
    Ok(Classifier::new(
        seeded_vb(seed, 4, dtype, device),
        &tiny::classifier_config(),
    )?)
}
