//! Group norm on the shapes of one DiffExplainer iteration, fused (`ops::group_norm_fused`, the
//! default) vs composed (`ops::group_norm_composed`, the original): forward and backward time,
//! the memory the autograd graph keeps, and the results' largest relative differences (fused vs
//! composed, and each vs the composed path run in f64 on the same values). Not a test: a timing table (docs/gpu-notes.md, entry 4).
//!
//! `bench_group_norm [--device cpu|cuda] [--dtype f32|f16|bf16] [--runs N] [--div D]
//!                   [--only SUBSTRING]`
//!
//! Batch 1, 32 groups, per-channel weight and bias (untracked, as in the frozen models), the
//! input a `Var`. Times are the median of `--runs` (default 5) after one warm-up, the device
//! synchronized around each phase; the backward is `y.backward()` (all-ones output gradient).
//! "Held by graph" sums the distinct storages of the graph's tracked tensors other than the
//! input and the output (what autograd keeps alive between forward and backward); the fused
//! op also keeps its `[B, 32, 2]` statistics (256 bytes), not counted. `--div D` divides the
//! spatial sizes by D; `--only` keeps the rows whose name contains SUBSTRING.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use diffexplainer::ops::{group_norm_composed, group_norm_fused};
use diffexplainer::rng::SeededRng;

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// name, channels, spatial size, eps (diffusers: UNet 1e-5, VAE 1e-6).
const SHAPES: &[(&str, usize, usize, f64)] = &[
    ("unet 320ch 64²", 320, 64, 1e-5),
    ("unet 640ch 32²", 640, 32, 1e-5),
    ("unet 1280ch 16²", 1280, 16, 1e-5),
    ("vae 512ch 64²", 512, 64, 1e-6),
    ("vae 512ch 128²", 512, 128, 1e-6),
    ("vae 256ch 256²", 256, 256, 1e-6),
    ("vae 128ch 512²", 128, 512, 1e-6),
];

const GROUPS: usize = 32;

type GroupNormFn =
    fn(&Tensor, usize, Option<&Tensor>, Option<&Tensor>, f64) -> candle_core::Result<Tensor>;

/// Bytes of the distinct storages behind the graph's tracked tensors, except `x` and `y`.
fn held_by_graph(y: &Tensor, x: &Tensor) -> usize {
    let mut storages: HashMap<usize, usize> = HashMap::new();
    let skip = |t: &Tensor| t.id() == y.id() || t.id() == x.id();
    let key = |t: &Tensor| {
        let (s, _) = t.storage_and_layout();
        &*s as *const _ as usize
    };
    let (x_key, y_key) = (key(x), key(y));
    for node in y.sorted_nodes() {
        if skip(node) || !node.is_contiguous() {
            continue;
        }
        let k = key(node);
        if k == x_key || k == y_key {
            continue;
        }
        let bytes = node.elem_count() * node.dtype().size_in_bytes();
        let e = storages.entry(k).or_insert(0);
        *e = (*e).max(bytes);
    }
    storages.values().sum()
}

struct Timing {
    fwd_ms: f64,
    bwd_ms: f64,
    held: usize,
}

fn time(
    f: GroupNormFn,
    x: &Var,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    runs: usize,
    device: &Device,
) -> anyhow::Result<Timing> {
    let (mut fwd, mut bwd) = (vec![], vec![]);
    let mut held = 0;
    for run in 0..=runs {
        device.synchronize()?;
        let t0 = Instant::now();
        let y = f(x.as_tensor(), GROUPS, Some(w), Some(b), eps)?;
        device.synchronize()?;
        let t1 = Instant::now();
        let grads = y.backward()?;
        device.synchronize()?;
        let t2 = Instant::now();
        held = held_by_graph(&y, x.as_tensor());
        drop(grads);
        if run > 0 {
            fwd.push((t1 - t0).as_secs_f64() * 1e3);
            bwd.push((t2 - t1).as_secs_f64() * 1e3);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(Timing {
        fwd_ms: median(fwd),
        bwd_ms: median(bwd),
        held,
    })
}

/// max |a - b| / max |b|, in f64.
fn rel_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let d = (a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let s = b.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(d / s.max(1e-300))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let device = match arg(&args, "--device").unwrap_or("cpu") {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => anyhow::bail!("unknown device `{other}`"),
    };
    let dtype = match arg(&args, "--dtype").unwrap_or("f32") {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => anyhow::bail!("unknown dtype `{other}`"),
    };
    let runs: usize = arg(&args, "--runs").unwrap_or("5").parse()?;
    let div: usize = arg(&args, "--div").unwrap_or("1").parse()?;
    let only = arg(&args, "--only").unwrap_or("");
    let mut rng = SeededRng::new(0);
    let mib = |b: usize| b as f64 / (1 << 20) as f64;

    println!(
        "device {device:?}, {dtype:?}, batch 1, {GROUPS} groups, affine; median of {runs} runs (ms), spatial sizes / {div}"
    );
    println!("| shape | composed fwd | composed bwd | fused fwd | fused bwd | speedup fwd+bwd | held by graph composed (MiB) | fused (MiB) | fused vs composed: y | dx | vs f64, fused / composed: y | dx |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &(name, c, hw, eps) in SHAPES.iter().filter(|s| s.0.contains(only)) {
        let hw = (hw / div).max(1);
        // An offset mean, as after a convolution.
        let x = (rng.normal((1, c, hw, hw), DType::F32, &device)? + 0.5)?.to_dtype(dtype)?;
        let x = Var::from_tensor(&x)?;
        let w = rng
            .normal(c, DType::F32, &device)?
            .affine(0.3, 1.0)?
            .to_dtype(dtype)?;
        let b = (rng.normal(c, DType::F32, &device)? * 0.1)?.to_dtype(dtype)?;
        let composed = time(group_norm_composed, &x, &w, &b, eps, runs, &device)?;
        let fused = time(group_norm_fused, &x, &w, &b, eps, runs, &device)?;
        // Agreement under a random output gradient.
        let cot = rng
            .normal((1, c, hw, hw), DType::F32, &device)?
            .to_dtype(dtype)?;
        let outputs = |f: GroupNormFn| -> anyhow::Result<(Tensor, Tensor)> {
            let y = f(x.as_tensor(), GROUPS, Some(&w), Some(&b), eps)?;
            let grads = (&y * &cot)?.backward()?;
            let dx = grads
                .get(x.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("no input gradient"))?
                .clone();
            Ok((y, dx))
        };
        let (yc, dxc) = outputs(group_norm_composed)?;
        let (yf, dxf) = outputs(group_norm_fused)?;
        // The f64 reference (composed, f64 throughout) from the same values.
        let (y64, dx64) = {
            let x64 = Var::from_tensor(&x.as_tensor().to_dtype(DType::F64)?)?;
            let (w64, b64) = (w.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
            let y = group_norm_composed(x64.as_tensor(), GROUPS, Some(&w64), Some(&b64), eps)?;
            let grads = (&y * &cot.to_dtype(DType::F64)?)?.backward()?;
            let dx = grads.get(x64.as_tensor()).expect("input gradient").clone();
            (y, dx)
        };
        println!(
            "| {name} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1}x | {:.1} | {:.1} | {:.1e} | {:.1e} | {:.1e} / {:.1e} | {:.1e} / {:.1e} |",
            composed.fwd_ms,
            composed.bwd_ms,
            fused.fwd_ms,
            fused.bwd_ms,
            (composed.fwd_ms + composed.bwd_ms) / (fused.fwd_ms + fused.bwd_ms),
            mib(composed.held),
            mib(fused.held),
            rel_diff(&yf, &yc)?,
            rel_diff(&dxf, &dxc)?,
            rel_diff(&yf, &y64)?,
            rel_diff(&yc, &y64)?,
            rel_diff(&dxf, &dx64)?,
            rel_diff(&dxc, &dx64)?,
        );
    }
    Ok(())
}
