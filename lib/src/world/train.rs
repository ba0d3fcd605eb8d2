//! One small trainer for every model the world trains: seeded batches, AdamW with a cosine
//! learning-rate decay, checkpoint and resume, a progress bar. A model plugs in a loss over a
//! batch of example indices; the trainer owns everything else.
//!
//! Reproducibility: batch `k` of epoch `e` is a slice of a permutation drawn from
//! (seed, e) alone, and the optimizer is plain candle arithmetic, so the same seed gives
//! bit-identical weights for the same thread count (candle's CPU reductions and its `gemm`
//! matmuls split work across threads only along output rows and columns, never along the sum:
//! `tests/world_train.rs` checks two runs are identical). A run resumed from a checkpoint
//! continues exactly as the uninterrupted run.
//!
//! The optimizer is [`AdamW`] here rather than `candle_nn::AdamW` because candle's keeps its
//! moments private, so they could not be checkpointed; the update is the same arithmetic
//! (`tests/world_train.rs` compares the two bit for bit).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{backprop::GradStore, DType, Tensor, Var};
use candle_nn::ParamsAdamW;
use serde::{Deserialize, Serialize};

use crate::rng::SeededRng;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Passes over the data.
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate; decays to 0 along a half cosine over all steps.
    pub lr: f64,
    pub weight_decay: f64,
    /// Seed of the batch order.
    pub seed: u64,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
}

impl TrainConfig {
    pub fn steps_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.batch_size)
    }

    /// The learning rate at (0-based) `step` of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let t = step as f64 / total.max(1) as f64;
        self.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// The example indices of batch `k` of `epoch` (the last batch of an epoch may be shorter).
pub fn batch_indices(seed: u64, n: usize, batch_size: usize, epoch: usize, k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SeededRng::new(seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    // Fisher–Yates.
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let start = k * batch_size;
    order[start.min(n)..(start + batch_size).min(n)].to_vec()
}

/// AdamW (Loshchilov & Hutter) with the exact update of `candle_nn::AdamW`, and its state
/// visible for checkpoints.
pub struct AdamW {
    pub params: ParamsAdamW,
    /// (name, parameter, first moment, second moment).
    vars: Vec<(String, Var, Tensor, Tensor)>,
    step: usize,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: ParamsAdamW) -> candle_core::Result<Self> {
        let vars = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.zeros_like()?;
                Ok((name, var, zeros.clone(), zeros))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            params,
            vars,
            step: 0,
        })
    }

    pub fn step_count(&self) -> usize {
        self.step
    }

    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step += 1;
        let p = &self.params;
        let (lr, b1, b2) = (p.lr, p.beta1, p.beta2);
        let scale_m = 1f64 / (1f64 - b1.powi(self.step as i32));
        let scale_v = 1f64 / (1f64 - b2.powi(self.step as i32));
        for (_, theta, m, v) in self.vars.iter_mut() {
            let Some(g) = grads.get(theta) else { continue };
            let next_m = ((&*m * b1)? + (g * (1.0 - b1))?)?;
            let next_v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let decayed = (theta.as_tensor() * (1f64 - lr * p.weight_decay))?;
            let adjusted = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            theta.set(&(decayed - (adjusted * lr)?)?)?;
            // Detached: the moments must not keep this step's graph (and its activations) alive.
            *m = next_m.detach();
            *v = next_v.detach();
        }
        Ok(())
    }

    /// Parameters and moments as named tensors (`param.N`, `adam_m.N`, `adam_v.N`).
    fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, var, m, v) in &self.vars {
            out.insert(format!("param.{name}"), var.as_tensor().clone());
            out.insert(format!("adam_m.{name}"), m.clone());
            out.insert(format!("adam_v.{name}"), v.clone());
        }
        out
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> anyhow::Result<()> {
        for (name, var, m, v) in self.vars.iter_mut() {
            let get = |key: String| {
                state
                    .get(&key)
                    .cloned()
                    .with_context(|| format!("checkpoint has no `{key}`"))
            };
            let p = get(format!("param.{name}"))?;
            if p.dims() != var.dims() {
                anyhow::bail!(
                    "checkpoint `param.{name}` has shape {:?}, the model {:?}",
                    p.dims(),
                    var.dims()
                )
            }
            var.set(&p)?;
            *m = get(format!("adam_m.{name}"))?;
            *v = get(format!("adam_v.{name}"))?;
        }
        self.step = step;
        Ok(())
    }
}

/// What a training run did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    /// Mean loss of each epoch run in this call (epochs resumed past are absent).
    pub epoch_losses: Vec<f32>,
    /// Loss of every step run in this call.
    pub step_losses: Vec<f32>,
    /// The step this call started at (non-zero when resumed).
    pub resumed_at: usize,
    pub total_steps: usize,
    pub seconds: f64,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct CheckpointMeta {
    step: usize,
    config: TrainConfig,
    n: usize,
}

/// Where a training run keeps its checkpoint.
pub struct Checkpointing {
    pub dir: PathBuf,
}

impl Checkpointing {
    fn meta_path(&self) -> PathBuf {
        self.dir.join("checkpoint.json")
    }
    fn tensors_path(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }

    fn save(
        &self,
        opt: &AdamW,
        buffers: &[(String, Var)],
        meta: &CheckpointMeta,
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let mut state = opt.state();
        for (name, var) in buffers {
            state.insert(format!("buffer.{name}"), var.as_tensor().clone());
        }
        crate::io::write_atomically(&self.tensors_path(), |tmp| {
            candle_core::safetensors::save(&state, tmp).map_err(Into::into)
        })?;
        crate::io::write_bytes_atomically(&self.meta_path(), &serde_json::to_vec_pretty(meta)?)
    }

    /// Loads a checkpoint made with the same config and data size; `None` when there is none.
    fn load(
        &self,
        opt: &mut AdamW,
        buffers: &[(String, Var)],
        config: &TrainConfig,
        n: usize,
    ) -> anyhow::Result<Option<usize>> {
        let meta_path = self.meta_path();
        if !meta_path.is_file() {
            return Ok(None);
        }
        let meta: CheckpointMeta = serde_json::from_slice(&std::fs::read(&meta_path)?)
            .with_context(|| format!("{}: unreadable checkpoint record", meta_path.display()))?;
        if meta.config != *config || meta.n != n {
            anyhow::bail!(
                "{}: the checkpoint was made with another training config or data size \
                 ({:?}, {} examples); remove it to start afresh",
                meta_path.display(),
                meta.config,
                meta.n
            )
        }
        let state = candle_core::safetensors::load(self.tensors_path(), &candle_core::Device::Cpu)?;
        opt.load_state(&state, meta.step)?;
        for (name, var) in buffers {
            let key = format!("buffer.{name}");
            let t = state
                .get(&key)
                .with_context(|| format!("checkpoint has no `{key}`"))?;
            if t.dims() != var.dims() {
                anyhow::bail!(
                    "checkpoint `{key}` has shape {:?}, the model {:?}",
                    t.dims(),
                    var.dims()
                )
            }
            var.set(t)?;
        }
        Ok(Some(meta.step))
    }
}

/// Trains `vars` (name, variable) on `n` examples: `loss(indices)` must return the scalar loss
/// of that batch. `buffers` are variables the loss itself updates (batch norm's running
/// statistics): not optimized, but checkpointed and restored with the rest. With `checkpoint`,
/// resumes from its checkpoint when there is one and writes one
/// every `config.checkpoint_every` steps and at the end. `label` names the model on the
/// progress bar (hidden when `progress` is false).
#[allow(clippy::too_many_arguments)]
pub fn train(
    vars: Vec<(String, Var)>,
    buffers: Vec<(String, Var)>,
    n: usize,
    config: &TrainConfig,
    checkpoint: Option<&Checkpointing>,
    label: &str,
    progress: bool,
    mut loss: impl FnMut(&[usize]) -> candle_core::Result<Tensor>,
) -> anyhow::Result<TrainReport> {
    if n == 0 || config.batch_size == 0 || config.epochs == 0 {
        anyhow::bail!(
            "nothing to train: {n} examples, batch size {}, {} epochs",
            config.batch_size,
            config.epochs
        )
    }
    let params = ParamsAdamW {
        lr: config.lr,
        weight_decay: config.weight_decay,
        ..Default::default()
    };
    let mut opt = AdamW::new(vars, params)?;
    let per_epoch = config.steps_per_epoch(n);
    let total = per_epoch * config.epochs;
    let start = match checkpoint {
        Some(c) => c.load(&mut opt, &buffers, config, n)?.unwrap_or(0),
        None => 0,
    };
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} steps {msg}",
            )
            .expect("a valid template"),
        );
        bar.set_prefix(label.to_string());
        bar.set_position(start as u64);
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let t0 = std::time::Instant::now();
    let mut report = TrainReport {
        epoch_losses: Vec::new(),
        step_losses: Vec::new(),
        resumed_at: start,
        total_steps: total,
        seconds: 0.0,
    };
    let mut epoch_sum = 0f64;
    let mut epoch_count = 0usize;
    for step in start..total {
        let (epoch, k) = (step / per_epoch, step % per_epoch);
        let indices = batch_indices(config.seed, n, config.batch_size, epoch, k);
        opt.params.lr = config.lr_at(step, total);
        let l = loss(&indices)?;
        let value = l.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !value.is_finite() {
            anyhow::bail!("{label}: the loss is {value} at step {step}: training diverged")
        }
        let grads = l.backward()?;
        opt.step(&grads)?;
        report.step_losses.push(value);
        epoch_sum += value as f64;
        epoch_count += 1;
        bar.inc(1);
        bar.set_message(format!("epoch {} loss {value:.4}", epoch + 1));
        let done = step + 1;
        if done % per_epoch == 0 {
            report
                .epoch_losses
                .push((epoch_sum / epoch_count as f64) as f32);
            epoch_sum = 0.0;
            epoch_count = 0;
        }
        if let Some(c) = checkpoint {
            if done == total || (config.checkpoint_every > 0 && done % config.checkpoint_every == 0)
            {
                c.save(
                    &opt,
                    &buffers,
                    &CheckpointMeta {
                        step: done,
                        config: config.clone(),
                        n,
                    },
                )?;
            }
        }
    }
    bar.finish_and_clear();
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Where a run's checkpoint goes by default: `<out>/checkpoint/`.
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// The variables of `varmap` sorted by name: the order every world trainer initializes,
/// optimizes and checkpoints in.
pub fn sorted_vars(varmap: &candle_nn::VarMap) -> anyhow::Result<Vec<(String, Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned variable map"))?;
    let mut named: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(named)
}

/// Copies of every variable of `varmap` by name (what a model folder saves).
pub fn var_tensors(varmap: &candle_nn::VarMap) -> anyhow::Result<HashMap<String, Tensor>> {
    sorted_vars(varmap)?
        .into_iter()
        .map(|(n, v)| Ok((n, v.as_tensor().copy()?)))
        .collect()
}

/// PyTorch's default initialization of each layer, drawn from [`SeededRng`] `seed` over the
/// sorted names: uniform `±1/√fan_in` for conv and linear weights and for the bias beside such
/// a weight; norms (rank-1 weights) the identity (weight 1, bias 0).
pub fn init_pytorch_default(varmap: &candle_nn::VarMap, seed: u64) -> anyhow::Result<()> {
    let vars = sorted_vars(varmap)?;
    let dims_of = |name: &str| {
        vars.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.dims().to_vec())
    };
    let mut rng = SeededRng::new(seed);
    for (name, var) in &vars {
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        // The layer's weight: itself, or the weight beside a bias.
        let weight_dims = match name.strip_suffix(".bias") {
            Some(stem) => dims_of(&format!("{stem}.weight")).unwrap_or_default(),
            None => dims.clone(),
        };
        let values: Vec<f32> = if weight_dims.len() <= 1 {
            vec![if name.ends_with(".weight") { 1.0 } else { 0.0 }; n]
        } else {
            let fan_in: usize = weight_dims[1..].iter().product();
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n)
                .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                .collect()
        };
        var.set(&Tensor::from_vec(values, dims, &candle_core::Device::Cpu)?)?;
    }
    Ok(())
}
