//! The classifier under audit: our torchvision-named ResNet at the spec's tiny config (small-image
//! stem), trained on the biased train split with [`super::train`], saved as a classifier folder
//! (`config.json` + `model.safetensors`) that `--classifier DIR` loads.
//!
//! Training runs [`super::net::TrainNet`] over the same variables: train-mode batch norm (batch
//! statistics, running statistics tracked with torchvision's momentum), convolutions as im2col +
//! GEMM. The saved `running_mean` / `running_var` / `num_batches_tracked` are torchvision's, so
//! the folder loads in the inference ResNet (`models/classifiers/resnet.rs`) unchanged. The last
//! norm of each residual block starts at 0 (torchvision's `zero_init_residual`).
//!
//! The input pipeline is the bundle's [`Classifier::preprocess`] at the world's image size (no
//! resize for world images), with ImageNet's normalization.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::net::{Rows, TrainNet};
use super::spec::WorldSpec;
use super::splits::{Dataset, Sample, Split};
use super::train::{self, Checkpointing, TrainConfig, TrainReport};
use crate::models::classifiers::{
    BlockKind, Classifier, ClassifierConfig, ClassifierFolderConfig, Normalization, Preprocess,
    ResNetConfig, Stem,
};
use crate::rng::SeededRng;

/// The ResNet config the spec asks for.
pub fn resnet_config(spec: &WorldSpec) -> ResNetConfig {
    let c = &spec.classifier;
    ResNetConfig {
        block: BlockKind::Basic,
        layers: c.layers,
        widths: c.widths,
        stem_width: c.stem_width,
        num_classes: spec.classes.len(),
        stem: Stem::Small,
        strides: c.strides,
    }
}

pub fn train_config(spec: &WorldSpec) -> TrainConfig {
    let c = &spec.classifier;
    TrainConfig {
        epochs: c.epochs,
        batch_size: c.batch_size,
        lr: c.lr,
        weight_decay: c.weight_decay,
        seed: c.seed,
        checkpoint_every: 100,
    }
}

/// The classifier's input pipeline for world images.
pub fn preprocess(spec: &WorldSpec) -> Preprocess {
    Preprocess {
        size: Some(spec.image_size),
        antialias: true,
        mean: Normalization::IMAGENET.mean,
        std: Normalization::IMAGENET.std,
    }
}

/// A classifier whose parameters are trainable variables.
pub struct Trainable {
    pub varmap: VarMap,
    pub config: ClassifierConfig,
}

impl Trainable {
    /// Fresh weights from `seed`: convs He-normal (fan-out, as torchvision), the linear layer
    /// `N(0, 1/fan_in)` with a zero bias, norms the identity except each block's last (0).
    pub fn new(config: &ResNetConfig, seed: u64) -> anyhow::Result<Self> {
        let varmap = VarMap::new();
        let config = ClassifierConfig::ResNet(config.clone());
        // Creates every variable (zeros), named like torchvision's parameters.
        Classifier::new(
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
            &config,
        )?;
        let mut named = train::sorted_vars(&varmap)?;
        let mut rng = SeededRng::new(seed);
        for (name, var) in named.iter_mut() {
            let dims = var.dims().to_vec();
            let n = var.elem_count();
            let values: Vec<f32> = if name.ends_with("running_var") {
                vec![1.0; n]
            } else if name.ends_with("running_mean") || name.ends_with(".bias") {
                vec![0.0; n]
            } else if is_norm_weight(name) {
                let last_in_block = name.starts_with("layer") && name.ends_with("bn2.weight");
                vec![if last_in_block { 0.0 } else { 1.0 }; n]
            } else if dims.len() == 4 {
                let fan_out = dims[0] * dims[2] * dims[3];
                let std = (2.0 / fan_out as f64).sqrt() as f32;
                rng.normal_vec(n).into_iter().map(|v| v * std).collect()
            } else {
                let std = (1.0 / dims[1] as f64).sqrt() as f32;
                rng.normal_vec(n).into_iter().map(|v| v * std).collect()
            };
            var.set(&Tensor::from_vec(values, dims, &Device::Cpu)?)?;
        }
        Ok(Self { varmap, config })
    }

    /// The model at the variables' current values.
    pub fn classifier(&self) -> candle_core::Result<Classifier> {
        Classifier::new(
            VarBuilder::from_varmap(&self.varmap, DType::F32, &Device::Cpu),
            &self.config,
        )
    }

    /// The training-mode network over these variables (built once per run).
    pub fn net(&self) -> anyhow::Result<TrainNet> {
        let ClassifierConfig::ResNet(config) = &self.config else {
            anyhow::bail!("the world classifier is a ResNet")
        };
        Ok(TrainNet::new(
            config,
            &train::sorted_vars(&self.varmap)?.into_iter().collect(),
        )?)
    }

    /// The variables the optimizer updates (all but the running statistics), by name.
    pub fn trainable_vars(&self) -> anyhow::Result<Vec<(String, Var)>> {
        Ok(train::sorted_vars(&self.varmap)?
            .into_iter()
            .filter(|(n, _)| !is_running_stat(n))
            .collect())
    }

    /// Batch norm's running statistics, which training updates outside the optimizer.
    pub fn buffers(&self) -> anyhow::Result<Vec<(String, Var)>> {
        Ok(train::sorted_vars(&self.varmap)?
            .into_iter()
            .filter(|(n, _)| is_running_stat(n))
            .collect())
    }

    /// Every tensor by its torchvision name, with each norm's `num_batches_tracked` (i64, `[]`)
    /// set to `batches`, the training steps run (each step normalizes one batch per norm).
    pub fn tensors(
        &self,
        batches: usize,
    ) -> anyhow::Result<std::collections::HashMap<String, Tensor>> {
        let mut out: std::collections::HashMap<String, Tensor> = train::sorted_vars(&self.varmap)?
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().copy().expect("a CPU copy")))
            .collect();
        let norms: Vec<String> = out
            .keys()
            .filter_map(|n| n.strip_suffix(".running_mean").map(str::to_string))
            .collect();
        for norm in norms {
            out.insert(
                format!("{norm}.num_batches_tracked"),
                Tensor::new(batches as i64, &Device::Cpu)?,
            );
        }
        Ok(out)
    }
}

fn is_running_stat(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

fn is_norm_weight(name: &str) -> bool {
    name.ends_with("weight")
        && (name.contains(".bn") || name.starts_with("bn") || name.contains("downsample.1"))
}

/// Mean cross-entropy of `logits` `[b, k]` against `labels` `[b]` (u32).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
    let log_p = crate::ops::log_softmax_last_dim(logits)?;
    let picked = log_p.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?;
    picked.mean_all()?.neg()
}

/// Trains a classifier on `images` `[n, 3, s, s]` in [0, 1] with `labels` `[n]`.
pub fn train_on(
    model: &Trainable,
    images: &Tensor,
    labels: &Tensor,
    preprocess: &Preprocess,
    config: &TrainConfig,
    checkpoint: Option<&Checkpointing>,
    progress: bool,
) -> anyhow::Result<TrainReport> {
    let n = images.dim(0)?;
    let net = model.net()?;
    // Normalized once, as [n, h, w, c]: a batch is then rows of this tensor.
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
        "classifier",
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
            cross_entropy(&logits, &labels.index_select(&idx, 0)?)
        },
    )
}

/// Class probabilities `[n, k]` of images `[n, 3, s, s]` in [0, 1], in batches.
pub fn probabilities(
    classifier: &Classifier,
    preprocess: &Preprocess,
    images: &Tensor,
) -> candle_core::Result<Tensor> {
    let n = images.dim(0)?;
    let mut out = Vec::new();
    let batch = 256;
    for start in (0..n).step_by(batch) {
        let x = images.narrow(0, start, batch.min(n - start))?;
        let logits = classifier.forward(&preprocess.forward(&x)?)?.logits;
        out.push(crate::ops::softmax_last_dim(&logits)?);
    }
    Tensor::cat(&out, 0)
}

/// Accuracy over a set of images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
}

impl Accuracy {
    pub fn value(&self) -> f64 {
        if self.total == 0 {
            f64::NAN
        } else {
            self.correct as f64 / self.total as f64
        }
    }
    fn add(&mut self, ok: bool) {
        self.total += 1;
        self.correct += ok as usize;
    }
}

/// Accuracy on one split, overall and by group. An image is *bias-conflicting* when a planted
/// correlation would mislead on it (its class has a planted value it lacks, or it shows a value
/// planted for another class), *bias-aligned* when it shows its own class's planted value and
/// nothing conflicting, *neutral* otherwise.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SplitAccuracy {
    pub split: Split,
    pub overall: Accuracy,
    pub aligned: Accuracy,
    pub conflicting: Accuracy,
    pub neutral: Accuracy,
    pub per_class: Vec<Accuracy>,
    /// Per correlation (spec order): images of its class with the value, of its class without
    /// it, of other classes with it.
    pub per_correlation: Vec<CorrelationGroups>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CorrelationGroups {
    pub class: String,
    pub attribute: String,
    pub value: String,
    pub class_with_value: Accuracy,
    pub class_without_value: Accuracy,
    pub others_with_value: Accuracy,
}

impl SplitAccuracy {
    /// The lowest accuracy among the non-empty groups (per-correlation groups and per class).
    pub fn worst_group(&self) -> f64 {
        self.per_correlation
            .iter()
            .flat_map(|c| {
                [
                    c.class_with_value,
                    c.class_without_value,
                    c.others_with_value,
                ]
            })
            .chain(self.per_class.iter().copied())
            .filter(|a| a.total > 0)
            .map(|a| a.value())
            .fold(f64::INFINITY, f64::min)
    }
}

/// Where each image stands with respect to the planted correlations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Aligned,
    Conflicting,
    Neutral,
}

pub fn group_of(spec: &WorldSpec, sample: &Sample) -> Group {
    let mut aligned = false;
    for c in &spec.correlations {
        let own = spec.classes[sample.class] == c.class;
        let has = sample.attribute(&c.attribute) == c.value;
        match (own, has) {
            (true, true) => aligned = true,
            (true, false) | (false, true) => return Group::Conflicting,
            (false, false) => {}
        }
    }
    if aligned {
        Group::Aligned
    } else {
        Group::Neutral
    }
}

/// Measures accuracy on `data` from the predicted classes.
pub fn split_accuracy(
    spec: &WorldSpec,
    split: Split,
    data: &Dataset,
    predicted: &[usize],
) -> SplitAccuracy {
    let mut acc = SplitAccuracy {
        split,
        overall: Accuracy::default(),
        aligned: Accuracy::default(),
        conflicting: Accuracy::default(),
        neutral: Accuracy::default(),
        per_class: vec![Accuracy::default(); spec.classes.len()],
        per_correlation: spec
            .correlations
            .iter()
            .map(|c| CorrelationGroups {
                class: c.class.clone(),
                attribute: c.attribute.clone(),
                value: c.value.clone(),
                class_with_value: Accuracy::default(),
                class_without_value: Accuracy::default(),
                others_with_value: Accuracy::default(),
            })
            .collect(),
    };
    for (s, &p) in data.samples.iter().zip(predicted) {
        let ok = p == s.class;
        acc.overall.add(ok);
        acc.per_class[s.class].add(ok);
        match group_of(spec, s) {
            Group::Aligned => acc.aligned.add(ok),
            Group::Conflicting => acc.conflicting.add(ok),
            Group::Neutral => acc.neutral.add(ok),
        }
        for g in acc.per_correlation.iter_mut() {
            let own = spec.classes[s.class] == g.class;
            let has = s.attribute(&g.attribute) == g.value;
            match (own, has) {
                (true, true) => g.class_with_value.add(ok),
                (true, false) => g.class_without_value.add(ok),
                (false, true) => g.others_with_value.add(ok),
                (false, false) => {}
            }
        }
    }
    acc
}

/// Predicted class of each image.
pub fn predict(
    classifier: &Classifier,
    preprocess: &Preprocess,
    images: &Tensor,
) -> candle_core::Result<Vec<usize>> {
    probabilities(classifier, preprocess, images)?
        .argmax(D::Minus1)?
        .to_vec1::<u32>()
        .map(|v| v.into_iter().map(|c| c as usize).collect())
}

/// What `world train-classifier` writes into `config.json`'s `metadata` and `report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingRecord {
    pub spec_fingerprint: String,
    pub train: TrainConfig,
    pub init_seed: u64,
    pub threads: usize,
    pub epoch_losses: Vec<f32>,
    pub seconds: f64,
    pub accuracy: Vec<SplitAccuracy>,
}

/// Trains the spec's classifier and writes the folder `out` (`config.json`,
/// `model.safetensors`, `report.json`); the trainer's checkpoint lives in `out/checkpoint/`
/// while training (a rerun resumes from it) and is removed at the end.
pub fn train_and_save(
    spec: &WorldSpec,
    out: &Path,
    progress: bool,
) -> anyhow::Result<TrainingRecord> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let train_data = Dataset::new(spec, Split::Train, None);
    let images = train_data.images()?;
    let labels = train_data.labels()?;
    let model = Trainable::new(&resnet_config(spec), spec.classifier.seed)?;
    let config = train_config(spec);
    let pre = preprocess(spec);
    let checkpoint = Checkpointing {
        dir: train::checkpoint_dir(out),
    };
    let report = train_on(
        &model,
        &images,
        &labels,
        &pre,
        &config,
        Some(&checkpoint),
        progress,
    )?;
    let classifier = model.classifier()?;
    let mut accuracy = Vec::new();
    for split in [Split::Validation, Split::Balanced] {
        let data = Dataset::new(spec, split, None);
        let predicted = predict(&classifier, &pre, &data.images()?)?;
        accuracy.push(split_accuracy(spec, split, &data, &predicted));
    }
    let record = TrainingRecord {
        spec_fingerprint: spec.fingerprint(),
        train: config,
        init_seed: spec.classifier.seed,
        threads: candle_core::utils::get_num_threads(),
        epoch_losses: report.epoch_losses.clone(),
        seconds: report.seconds,
        accuracy,
    };
    save_folder(spec, &model, out, &record)?;
    let _ = std::fs::remove_dir_all(train::checkpoint_dir(out));
    Ok(record)
}

/// Writes `model.safetensors` and `config.json` (and `report.json`).
pub fn save_folder(
    spec: &WorldSpec,
    model: &Trainable,
    out: &Path,
    record: &TrainingRecord,
) -> anyhow::Result<()> {
    let batches = spec.classifier.epochs * train_config(spec).steps_per_epoch(spec.splits.train);
    let tensors = model.tensors(batches)?;
    let config = ClassifierFolderConfig {
        architecture: "resnet".to_string(),
        config: serde_json::to_value(resnet_config(spec))?,
        input_size: spec.image_size,
        mean: Normalization::IMAGENET.mean,
        std: Normalization::IMAGENET.std,
        class_names: spec.classes.clone(),
        metadata: serde_json::json!({
            "trained_by": "diffexplainer world train-classifier",
            "spec_fingerprint": record.spec_fingerprint,
            "train": record.train,
            "threads": record.threads,
        }),
    };
    config.save(out, &tensors)?;
    crate::io::write_bytes_atomically(
        &out.join("report.json"),
        &serde_json::to_vec_pretty(record)?,
    )
}

/// Loads a world classifier folder and checks it fits the spec (class names, image size).
pub fn load_for(spec: &WorldSpec, dir: &Path) -> anyhow::Result<(Classifier, Preprocess)> {
    let (classifier, folder) = Classifier::from_dir(dir, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading classifier folder {}", dir.display()))?;
    if folder.class_names != spec.classes {
        anyhow::bail!(
            "{}: the classifier's classes {:?} are not the spec's {:?}",
            dir.display(),
            folder.class_names,
            spec.classes
        )
    }
    // A classifier trained here records the spec it saw; measuring it on another world would
    // give numbers that describe neither.
    if let Some(trained_on) = folder
        .metadata
        .get("spec_fingerprint")
        .and_then(|v| v.as_str())
    {
        let given = spec.fingerprint();
        if trained_on != given {
            anyhow::bail!(
                "{}: the classifier was trained on the world with spec fingerprint {trained_on}, \
                 not on the given spec ({given}); pass the spec it was trained on, or retrain it \
                 with `diffexplainer world train-classifier --spec FILE`",
                dir.display()
            )
        }
    }
    if folder.input_size != spec.image_size {
        anyhow::bail!(
            "{}: the classifier takes {c}×{c} images, the spec's images are {w}×{w}",
            dir.display(),
            c = folder.input_size,
            w = spec.image_size
        )
    }
    let pre = classifier.preprocess(folder.input_size);
    Ok((classifier, pre))
}
