//! Group norm on the shapes of one DiffExplainer iteration, fused (`ops::group_norm_fused`, the
//! default) vs composed (`ops::group_norm_composed`, the original): forward and backward time,
//! the memory the autograd graph keeps, and the results' largest relative differences (fused vs
//! composed, and each vs the composed path run in f64 on the same values). Not a test: a timing table (docs/gpu-notes.md, entry 4).
//!
//! `bench_group_norm [--device cpu|cuda] [--dtype f32|f16|bf16] [--runs N] [--div D]
//!                   [--only SUBSTRING] [--attention]`
//!
//! Batch 1, 32 groups, per-channel weight and bias (untracked, as in the frozen models), the
//! input a `Var`. Times are the median of `--runs` (default 5) after one warm-up, the device
//! synchronized around each phase; the backward is `y.backward()` (all-ones output gradient).
//! "Held by graph" sums the distinct storages of the graph's tracked tensors other than the
//! input and the output (what autograd keeps alive between forward and backward); the fused
//! op also keeps its `[B, 32, 2]` statistics (256 bytes), not counted. `--div D` divides the
//! spatial sizes by D; `--only` keeps the rows whose name contains SUBSTRING.
//!
//! `--attention` prints the attention table instead (docs/gpu-notes.md, entry 5): the block-wise
//! path (`ops::attention::memory_efficient_attention`, the default) vs the fused kernels
//! (`ops::attention_fused::fused_attention`, called directly, no env var needed) on the SD 1.5
//! shapes at 512² (batch 1 × 8 heads) and CLIP's causal self-attention; forward and backward
//! (q, k, v all `Var`s, output gradient random), and each path's largest relative difference
//! from the composed path in f64 on the same values. `--div D` divides the query lengths (and
//! the self-attention key lengths) by D. (A mode of this binary rather than a new one: the
//! device carry has no room for another ~12 MB binary.)

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use diffexplainer::ops::{group_norm_composed, group_norm_fused};
use diffexplainer::rng::SeededRng;

mod common;
use common::{arg, device_and_dtype};

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

/// name, batch·heads (batch 1), q_len, k_len, head dim, causal.
const ATTENTION_SHAPES: &[(&str, usize, usize, usize, usize, bool)] = &[
    ("self 64² 8x4096x4096 d40", 8, 4096, 4096, 40, false),
    ("cross 64² 8x4096x77 d40", 8, 4096, 77, 40, false),
    ("self 32² 8x1024x1024 d80", 8, 1024, 1024, 80, false),
    ("cross 32² 8x1024x77 d80", 8, 1024, 77, 80, false),
    ("self 16² 8x256x256 d160", 8, 256, 256, 160, false),
    ("clip causal 12x77x77 d64", 12, 77, 77, 64, true),
];

type AttnFn<'a> = dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor> + 'a;

/// Forward and backward medians (ms) of `f` with q, k, v tracked and output gradient `cot`.
fn time_attention(
    f: &AttnFn<'_>,
    qkv: &[Var; 3],
    cot: &Tensor,
    runs: usize,
    device: &Device,
) -> anyhow::Result<(f64, f64)> {
    let (mut fwd, mut bwd) = (vec![], vec![]);
    for run in 0..=runs {
        device.synchronize()?;
        let t0 = Instant::now();
        let y = f(qkv[0].as_tensor(), qkv[1].as_tensor(), qkv[2].as_tensor())?;
        device.synchronize()?;
        let t1 = Instant::now();
        let grads = (y * cot)?.sum_all()?.backward()?;
        device.synchronize()?;
        let t2 = Instant::now();
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
    Ok((median(fwd), median(bwd)))
}

/// y, dq, dk, dv of `f` under output gradient `cot`.
fn attention_outputs(
    f: &AttnFn<'_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cot: &Tensor,
) -> anyhow::Result<[Tensor; 4]> {
    let vars = [
        Var::from_tensor(q)?,
        Var::from_tensor(k)?,
        Var::from_tensor(v)?,
    ];
    let y = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )?;
    let grads = (&y * &cot.to_dtype(y.dtype())?)?.sum_all()?.backward()?;
    let g = |i: usize| -> anyhow::Result<Tensor> {
        Ok(grads
            .get(vars[i].as_tensor())
            .ok_or_else(|| anyhow::anyhow!("no gradient"))?
            .clone())
    };
    Ok([y.clone(), g(0)?, g(1)?, g(2)?])
}

fn attention_table(
    device: &Device,
    dtype: DType,
    runs: usize,
    div: usize,
    only: &str,
) -> anyhow::Result<()> {
    use diffexplainer::ops::attention::{
        composed_attention, memory_efficient_attention, AttentionMask,
    };
    use diffexplainer::ops::attention_fused::fused_attention;
    let mut rng = SeededRng::new(0);
    println!(
        "device {device:?}, {dtype:?}, attention, batch 1; median of {runs} runs (ms), query lengths / {div}"
    );
    println!("| shape | blockwise fwd | blockwise bwd | fused fwd | fused bwd | speedup fwd | speedup fwd+bwd | fused vs f64: y, dq, dk, dv | blockwise vs f64: y, dq, dk, dv |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &(name, bh, q_len, k_len, d, causal) in
        ATTENTION_SHAPES.iter().filter(|s| s.0.contains(only))
    {
        let q_len = (q_len / div).max(1);
        let k_len = if k_len == 77 {
            77
        } else {
            (k_len / div).max(1)
        };
        let mask = if causal {
            AttentionMask::Causal
        } else {
            AttentionMask::None
        };
        let make = |len: usize, rng: &mut SeededRng| -> anyhow::Result<Tensor> {
            Ok(rng
                .normal((1, bh, len, d), DType::F32, device)?
                .to_dtype(dtype)?)
        };
        let (q, k, v) = (
            make(q_len, &mut rng)?,
            make(k_len, &mut rng)?,
            make(k_len, &mut rng)?,
        );
        let cot = make(q_len, &mut rng)?;
        // What scaled_dot_product_attention picks for the block size.
        let rows = ((1usize << 26) / (bh * k_len)).max(1);
        let blockwise = move |q: &Tensor, k: &Tensor, v: &Tensor| {
            memory_efficient_attention(q, k, v, mask, None, rows)
        };
        let fused =
            move |q: &Tensor, k: &Tensor, v: &Tensor| fused_attention(q, k, v, causal, None);
        let vars = [
            Var::from_tensor(&q)?,
            Var::from_tensor(&k)?,
            Var::from_tensor(&v)?,
        ];
        let (bf, bb) = time_attention(&blockwise, &vars, &cot, runs, device)?;
        let (ff, fb) = time_attention(&fused, &vars, &cot, runs, device)?;
        let to64 = |t: &Tensor| t.to_dtype(DType::F64);
        let reference = attention_outputs(
            &move |q: &Tensor, k: &Tensor, v: &Tensor| composed_attention(q, k, v, mask, None),
            &to64(&q)?,
            &to64(&k)?,
            &to64(&v)?,
            &to64(&cot)?,
        )?;
        let diffs = |f: &AttnFn<'_>| -> anyhow::Result<String> {
            let out = attention_outputs(f, &q, &k, &v, &cot)?;
            let e: Vec<String> = out
                .iter()
                .zip(&reference)
                .map(|(a, b)| Ok(format!("{:.1e}", rel_diff(a, b)?)))
                .collect::<anyhow::Result<_>>()?;
            Ok(e.join(", "))
        };
        println!(
            "| {name} | {bf:.3} | {bb:.3} | {ff:.3} | {fb:.3} | {:.1}x | {:.1}x | {} | {} |",
            bf / ff,
            (bf + bb) / (ff + fb),
            diffs(&fused)?,
            diffs(&blockwise)?,
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (device, dtype) = device_and_dtype(&args)?;
    let runs: usize = arg(&args, "--runs").unwrap_or("5").parse()?;
    let div: usize = arg(&args, "--div").unwrap_or("1").parse()?;
    let only = arg(&args, "--only").unwrap_or("");
    if args.iter().any(|a| a == "--attention") {
        return attention_table(&device, dtype, runs, div, only);
    }
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
