//! The attribute checker (ShapesWorld II, issue 13 item 2): an independent classifier that reads
//! an image's shape, colour, texture and background, trained on the world's *balanced*
//! distribution (every attribute independent of the others), so it can judge generated and
//! reconstructed images. It is not the classifier under audit and has no planted shortcut.
//!
//! Architecture: our torchvision-named ResNet (the classifier under audit's code and trainer,
//! [`super::classifier::Trainable`], trained with batch statistics by [`super::net`]) at a small config whose one linear layer holds every head:
//! its `num_classes` outputs are the heads' vocabularies laid end to end (shape, then colour,
//! texture, background, each in the spec's order), and each head's prediction is the argmax
//! over its own slice. The loss is the mean over heads of each head's cross-entropy. The folder
//! is a classifier folder (`config.json` + `model.safetensors`), class names `attribute=value`,
//! with the heads in `metadata.heads`; [`load_checker`] reads it back.
//!
//! Data: images are deterministic functions of (spec, split, index), so the checker trains on as
//! many balanced images as asked, indices from [`CheckerConfig::train_start`] on; it is measured
//! on balanced indices `0..eval_images`, which it never trains on (the spec's balanced split).

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use super::classifier::{cross_entropy, Accuracy, Trainable};
use super::net::Rows;
use super::render;
use super::spec::WorldSpec;
use super::splits::{images_tensor, sample, Sample, Split};
use super::train::{self, Checkpointing, TrainConfig, TrainReport};
use crate::models::classifiers::{
    folder, BlockKind, Classifier, ClassifierFolderConfig, Normalization, Preprocess, ResNetConfig,
    Stem,
};

/// The attributes the checker reads, in head order.
pub const CHECKED_ATTRIBUTES: &[&str] = &["shape", "color", "texture", "background"];

/// One head: an attribute and its vocabulary (the spec's, in its order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Head {
    pub attribute: String,
    pub values: Vec<String>,
}

/// The checker's heads for a spec. The shape head's vocabulary is the spec's classes (the only
/// shapes its images show).
pub fn heads(spec: &WorldSpec) -> Vec<Head> {
    CHECKED_ATTRIBUTES
        .iter()
        .map(|&a| Head {
            attribute: a.to_string(),
            values: if a == "shape" {
                spec.classes.clone()
            } else {
                spec.values(a).expect("a known attribute").to_vec()
            },
        })
        .collect()
}

/// The checker's network and training (recorded in its `config.json`; the spec's `[checker]`
/// table, every field optional).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckerConfig {
    /// Seed of the initial weights and of the batch order.
    pub seed: u64,
    /// Balanced images to train on (indices `train_start..train_start + train_images`).
    pub train_images: usize,
    /// Held-out balanced images to measure on (indices `0..eval_images`).
    pub eval_images: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub stem_width: usize,
    pub widths: [usize; 4],
    pub layers: [usize; 4],
    pub strides: [usize; 4],
}

impl Default for CheckerConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            train_images: 12000,
            eval_images: 1200,
            epochs: 4,
            batch_size: 64,
            lr: 4e-3,
            weight_decay: 1e-2,
            stem_width: 16,
            widths: [16, 32, 64, 64],
            layers: [1, 1, 1, 1],
            strides: [1, 2, 2, 2],
        }
    }
}

impl CheckerConfig {
    /// First balanced index trained on: past both the held-out images and the spec's balanced
    /// split, so neither is ever seen in training.
    pub fn train_start(&self, spec: &WorldSpec) -> usize {
        self.eval_images.max(spec.splits.balanced)
    }

    pub fn check(&self) -> anyhow::Result<()> {
        let bad = |field: &str, v: String, why: &str| {
            anyhow::bail!("checker config: {field} = {v}: {why}")
        };
        if self.train_images == 0 {
            return bad("train_images", "0".into(), "nothing to train on");
        }
        if self.eval_images == 0 {
            return bad("eval_images", "0".into(), "nothing to measure on");
        }
        if self.epochs == 0 || self.batch_size == 0 {
            return bad(
                "epochs / batch_size",
                format!("{} / {}", self.epochs, self.batch_size),
                "must be positive",
            );
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", self.lr.to_string(), "must be a positive number");
        }
        if self.stem_width == 0 || self.widths.contains(&0) || self.strides.contains(&0) {
            return bad(
                "stem_width / widths / strides",
                format!(
                    "{} / {:?} / {:?}",
                    self.stem_width, self.widths, self.strides
                ),
                "must be positive",
            );
        }
        Ok(())
    }

    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            weight_decay: self.weight_decay,
            seed: self.seed,
            checkpoint_every: 100,
        }
    }

    pub fn resnet_config(&self, heads: &[Head]) -> ResNetConfig {
        ResNetConfig {
            block: BlockKind::Basic,
            layers: self.layers,
            widths: self.widths,
            stem_width: self.stem_width,
            num_classes: heads.iter().map(|h| h.values.len()).sum(),
            stem: Stem::Small,
            strides: self.strides,
        }
    }
}

/// Balanced images `start..start + n`: images `[n, 3, s, s]` in [0, 1] and their records,
/// rendered on two threads.
pub fn balanced_images(
    spec: &WorldSpec,
    start: usize,
    n: usize,
) -> anyhow::Result<(Tensor, Vec<Sample>)> {
    let samples: Vec<Sample> = (start..start + n)
        .map(|i| sample(spec, Split::Balanced, i))
        .collect();
    let half = samples.len().div_ceil(2).max(1);
    let rendered: Vec<render::Rendered> = std::thread::scope(|s| {
        let parts: Vec<_> = samples
            .chunks(half)
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|x| render::render(&x.scene, spec.image_size))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().expect("a rendering thread"))
            .collect()
    });
    Ok((images_tensor(&rendered)?, samples))
}

/// Value index of each head for each sample: `[n][heads]`.
pub fn labels_of(heads: &[Head], samples: &[Sample]) -> anyhow::Result<Vec<Vec<usize>>> {
    samples
        .iter()
        .map(|s| {
            heads
                .iter()
                .map(|h| {
                    let v = s.attribute(&h.attribute);
                    h.values.iter().position(|x| x == v).with_context(|| {
                        format!("image value `{v}` is not in the `{}` head", h.attribute)
                    })
                })
                .collect()
        })
        .collect()
}

/// Mean over heads of each head's cross-entropy; `logits` `[b, Σ vocab]`, `labels` `[b, heads]`
/// (u32).
pub fn multi_head_loss(
    heads: &[Head],
    logits: &Tensor,
    labels: &Tensor,
) -> candle_core::Result<Tensor> {
    let mut offset = 0;
    let mut total: Option<Tensor> = None;
    for (k, h) in heads.iter().enumerate() {
        let l = cross_entropy(
            &logits.narrow(1, offset, h.values.len())?,
            &labels.narrow(1, k, 1)?.squeeze(1)?.contiguous()?,
        )?;
        total = Some(match total {
            None => l,
            Some(t) => (t + l)?,
        });
        offset += h.values.len();
    }
    total.expect("at least one head") / heads.len() as f64
}

/// A trained checker: the network, its input pipeline and its heads.
pub struct Checker {
    pub classifier: Classifier,
    pub preprocess: Preprocess,
    pub heads: Vec<Head>,
    pub input_size: usize,
}

impl Checker {
    /// Per-head predicted value indices `[n][heads]` for images `[n, 3, s, s]` in [0, 1]
    /// (s = the checker's input size).
    pub fn read(&self, images: &Tensor) -> anyhow::Result<Vec<Vec<usize>>> {
        let (n, c, h, w) = images.dims4().with_context(|| {
            format!(
                "checker: expected images [n, 3, s, s], got {:?}",
                images.dims()
            )
        })?;
        if c != 3 || h != self.input_size || w != self.input_size {
            anyhow::bail!(
                "checker: expected images [n, 3, {s}, {s}] in [0, 1], got {:?}",
                images.dims(),
                s = self.input_size
            )
        }
        let mut out = vec![Vec::with_capacity(self.heads.len()); n];
        let batch = 256;
        for start in (0..n).step_by(batch) {
            let x = images.narrow(0, start, batch.min(n - start))?;
            let logits = self
                .classifier
                .forward(&self.preprocess.forward(&x.to_dtype(DType::F32)?)?)?
                .logits;
            let mut offset = 0;
            for head in &self.heads {
                let k = head.values.len();
                let pred = logits
                    .narrow(1, offset, k)?
                    .argmax(D::Minus1)?
                    .to_vec1::<u32>()?;
                for (i, p) in pred.into_iter().enumerate() {
                    out[start + i].push(p as usize);
                }
                offset += k;
            }
        }
        Ok(out)
    }

    /// Per-head accuracy of the checker's readings against `labels` `[n][heads]`.
    pub fn accuracy(
        &self,
        images: &Tensor,
        labels: &[Vec<usize>],
    ) -> anyhow::Result<Vec<Accuracy>> {
        let read = self.read(images)?;
        Ok(agreement(&read, labels, self.heads.len()))
    }

    /// Checks the checker reads this spec's world: same heads (vocabularies in order) and
    /// image size.
    pub fn check_fits(&self, spec: &WorldSpec) -> anyhow::Result<()> {
        let want = heads(spec);
        if self.heads != want {
            anyhow::bail!(
                "the checker's heads {:?} are not the spec's vocabularies {:?}",
                self.heads,
                want
            )
        }
        if self.input_size != spec.image_size {
            anyhow::bail!(
                "the checker takes {c}×{c} images, the spec's are {s}×{s}",
                c = self.input_size,
                s = spec.image_size
            )
        }
        Ok(())
    }
}

/// Per head, the share of rows where `a` and `b` agree.
pub fn agreement(a: &[Vec<usize>], b: &[Vec<usize>], heads: usize) -> Vec<Accuracy> {
    (0..heads)
        .map(|k| Accuracy {
            correct: a.iter().zip(b).filter(|(x, y)| x[k] == y[k]).count(),
            total: a.len().min(b.len()),
        })
        .collect()
}

/// What `world train-checker` records in `config.json`'s metadata and `report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckerRecord {
    pub spec_fingerprint: String,
    pub config: CheckerConfig,
    pub threads: usize,
    pub epoch_losses: Vec<f32>,
    pub seconds: f64,
    /// Per head, accuracy on the held-out balanced images `0..eval_images`.
    pub heldout_accuracy: Vec<(String, Accuracy)>,
}

/// Trains a checker on `images` with per-head `labels` `[n, heads]` (u32).
pub fn train_on(
    model: &Trainable,
    heads: &[Head],
    images: &Tensor,
    labels: &Tensor,
    preprocess: &Preprocess,
    config: &TrainConfig,
    checkpoint: Option<&Checkpointing>,
    progress: bool,
) -> anyhow::Result<TrainReport> {
    let n = images.dim(0)?;
    // The same training-mode network as the classifier under audit (`world::net`): batch
    // statistics in training, torchvision's running statistics saved for inference.
    let net = model.net()?;
    let (_, _, h, w) = images.dims4()?;
    let inputs = Rows::from_nchw(&preprocess.forward(images)?)?
        .t
        .reshape((n, h, w, 3))?;
    train::train(
        model.trainable_vars()?,
        model.buffers()?,
        n,
        config,
        checkpoint,
        "checker",
        progress,
        |indices| {
            let idx = Tensor::new(
                indices.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                &Device::Cpu,
            )?;
            let b = indices.len();
            let x = Rows {
                t: inputs.index_select(&idx, 0)?.reshape((b * h * w, 3))?,
                n: b,
                h,
                w,
            };
            let logits = net.forward(&x, true)?;
            multi_head_loss(heads, &logits, &labels.index_select(&idx, 0)?)
        },
    )
}

fn labels_tensor(labels: &[Vec<usize>]) -> candle_core::Result<Tensor> {
    let k = labels.first().map_or(0, Vec::len);
    let flat: Vec<u32> = labels.iter().flatten().map(|&v| v as u32).collect();
    Tensor::from_vec(flat, (labels.len(), k), &Device::Cpu)
}

/// The checker's input pipeline: no resize for world images, ImageNet normalization.
pub fn preprocess(spec: &WorldSpec) -> Preprocess {
    super::classifier::preprocess(spec)
}

/// Trains the checker for `spec` and writes its folder `out` (`config.json`,
/// `model.safetensors`, `report.json`); the checkpoint lives in `out/checkpoint/` while training
/// (a rerun with the same config resumes) and is removed at the end.
pub fn train_and_save(
    spec: &WorldSpec,
    config: &CheckerConfig,
    out: &Path,
    progress: bool,
) -> anyhow::Result<CheckerRecord> {
    config.check()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let heads = heads(spec);
    let (images, samples) = balanced_images(spec, config.train_start(spec), config.train_images)?;
    let labels = labels_tensor(&labels_of(&heads, &samples)?)?;
    let model = Trainable::new(&config.resnet_config(&heads), config.seed)?;
    let pre = preprocess(spec);
    let checkpoint = Checkpointing {
        dir: train::checkpoint_dir(out),
    };
    let report = train_on(
        &model,
        &heads,
        &images,
        &labels,
        &pre,
        &config.train_config(),
        Some(&checkpoint),
        progress,
    )?;
    drop(images);
    let checker = Checker {
        classifier: model.classifier()?,
        preprocess: pre,
        heads: heads.clone(),
        input_size: spec.image_size,
    };
    let (eval, eval_samples) = balanced_images(spec, 0, config.eval_images)?;
    let acc = checker.accuracy(&eval, &labels_of(&heads, &eval_samples)?)?;
    let record = CheckerRecord {
        spec_fingerprint: spec.fingerprint(),
        config: config.clone(),
        threads: candle_core::utils::get_num_threads(),
        epoch_losses: report.epoch_losses,
        seconds: report.seconds,
        heldout_accuracy: heads.iter().map(|h| h.attribute.clone()).zip(acc).collect(),
    };
    save_folder(spec, config, &heads, &model, out, &record)?;
    let _ = std::fs::remove_dir_all(train::checkpoint_dir(out));
    Ok(record)
}

fn save_folder(
    spec: &WorldSpec,
    config: &CheckerConfig,
    heads: &[Head],
    model: &Trainable,
    out: &Path,
    record: &CheckerRecord,
) -> anyhow::Result<()> {
    // Every training step normalized one batch per norm (train-mode batch norm, `world::net`).
    let batches = config.epochs * config.train_config().steps_per_epoch(config.train_images);
    let tensors = model.tensors(batches)?;
    let folder_config = ClassifierFolderConfig {
        architecture: "resnet".to_string(),
        config: serde_json::to_value(config.resnet_config(heads))?,
        input_size: spec.image_size,
        mean: Normalization::IMAGENET.mean,
        std: Normalization::IMAGENET.std,
        class_names: heads
            .iter()
            .flat_map(|h| h.values.iter().map(move |v| format!("{}={v}", h.attribute)))
            .collect(),
        metadata: serde_json::json!({
            "trained_by": "diffexplainer world train-checker",
            "kind": "attribute_checker",
            "heads": heads,
            "spec_fingerprint": record.spec_fingerprint,
            "checker": config,
            "threads": record.threads,
        }),
    };
    folder_config.save(out, &tensors)?;
    crate::io::write_bytes_atomically(
        &out.join("report.json"),
        &serde_json::to_vec_pretty(record)?,
    )
}

/// Loads a checker folder written by [`train_and_save`]. Errors name the folder and what is
/// wrong: not a classifier folder, no `metadata.heads`, heads that do not cover the network's
/// outputs.
pub fn load_checker(dir: &Path) -> anyhow::Result<Checker> {
    if !folder::is_classifier_folder(dir) {
        anyhow::bail!(
            "{}: not a checker folder (no {} in it)",
            dir.display(),
            folder::CONFIG_FILE
        )
    }
    let (classifier, cfg) = Classifier::from_dir(dir, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading checker folder {}", dir.display()))?;
    let heads: Vec<Head> = match cfg.metadata.get("heads") {
        Some(v) => serde_json::from_value(v.clone()).with_context(|| {
            format!(
                "{}: config.json `metadata.heads` is malformed",
                dir.display()
            )
        })?,
        None => anyhow::bail!(
            "{}: config.json has no `metadata.heads`: a classifier folder, not an attribute \
             checker (train one with `diffexplainer world train-checker`)",
            dir.display()
        ),
    };
    let outputs: usize = heads.iter().map(|h| h.values.len()).sum();
    if heads.is_empty() || outputs != cfg.class_names.len() {
        anyhow::bail!(
            "{}: `metadata.heads` cover {outputs} outputs, the network has {} class names",
            dir.display(),
            cfg.class_names.len()
        )
    }
    let preprocess = classifier.preprocess(cfg.input_size);
    Ok(Checker {
        classifier,
        preprocess,
        heads,
        input_size: cfg.input_size,
    })
}
