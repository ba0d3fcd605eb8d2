//! The conv input gradient on the shapes of one DiffExplainer iteration, old vs new: candle's
//! `conv_transpose2d` (naive direct kernel) against the `conv2d` (im2col + GEMM) paths of
//! `ops::frozen` (polyphase, the default; zero-insertion for strided convs). Not a test: a
//! timing table, plus each new result's largest relative difference from the old one.
//!
//! `bench_conv_grad [--device cpu|cuda] [--dtype f32|f16|bf16] [--runs N] [--div D]
//!                  [--only SUBSTRING]`
//!
//! `--div D` divides every spatial size by D (for the CPU, where the naive kernel takes tens of
//! seconds at 512²); `--only` keeps the rows whose name contains SUBSTRING. Times are the median
//! of `--runs` (default 5) after one warm-up, device synchronized around each run.

use std::time::Instant;

use candle_core::{DType, Tensor};
use diffexplainer::ops::{conv2d_input_grad, Conv2dConfig, ConvInputGrad};
use diffexplainer::rng::SeededRng;

mod common;
use common::{arg, device_and_dtype};

/// One convolution of the iteration: name, in/out channels, kernel, stride, padding, input size.
struct Shape {
    name: &'static str,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: usize,
    hw: usize,
}

const fn conv(
    name: &'static str,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: usize,
    hw: usize,
) -> Shape {
    Shape {
        name,
        c_in,
        c_out,
        k,
        stride,
        pad,
        hw,
    }
}

/// Batch 1 throughout, as in bench_iteration (LCM: no classifier-free guidance batch).
const SHAPES: &[Shape] = &[
    conv("unet 3x3 320ch 64²", 320, 320, 3, 1, 1, 64),
    conv("unet 3x3 640ch 32²", 640, 640, 3, 1, 1, 32),
    conv("unet 3x3 1280ch 16²", 1280, 1280, 3, 1, 1, 16),
    conv("unet 3x3 1280ch 8²", 1280, 1280, 3, 1, 1, 8),
    conv("unet down 3x3/s2 320ch 64²", 320, 320, 3, 2, 1, 64),
    conv("unet down 3x3/s2 640ch 32²", 640, 640, 3, 2, 1, 32),
    conv("unet down 3x3/s2 1280ch 16²", 1280, 1280, 3, 2, 1, 16),
    conv("vae 3x3 512ch 64²", 512, 512, 3, 1, 1, 64),
    conv("vae 3x3 512ch 128²", 512, 512, 3, 1, 1, 128),
    conv("vae 3x3 256ch 256²", 256, 256, 3, 1, 1, 256),
    conv("vae 3x3 128ch 512²", 128, 128, 3, 1, 1, 512),
    // ResNet-50 at the iteration's 256² input (stem -> 128², max pool -> 64²).
    conv("resnet stem 7x7/s2 3->64 256²", 3, 64, 7, 2, 3, 256),
    conv("resnet 3x3/s2 128ch 64²", 128, 128, 3, 2, 1, 64),
    conv("resnet proj 1x1/s2 256->512 64²", 256, 512, 1, 2, 0, 64),
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (device, dtype) = device_and_dtype(&args)?;
    let runs: usize = arg(&args, "--runs").unwrap_or("5").parse()?;
    let div: usize = arg(&args, "--div").unwrap_or("1").parse()?;
    let only = arg(&args, "--only").unwrap_or("");
    let mut rng = SeededRng::new(0);

    println!("device {device:?}, {dtype:?}, median of {runs} runs (ms), spatial sizes / {div}");
    println!(
        "| conv | input size | transpose (old) | polyphase (new) | old/new | zero-insertion | kernel prep (in new) | max rel diff |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for s in SHAPES.iter().filter(|s| s.name.contains(only)) {
        let hw = (s.hw / div).max(s.k);
        let config = Conv2dConfig {
            padding: s.pad,
            stride: s.stride,
            ..Default::default()
        };
        let out = (hw + 2 * s.pad - s.k) / s.stride + 1;
        let weight = (rng.normal((s.c_out, s.c_in, s.k, s.k), DType::F32, &device)?
            * (1.0 / ((s.c_in * s.k * s.k) as f64).sqrt()))?
        .to_dtype(dtype)?;
        let grad = rng
            .normal((1, s.c_out, out, out), DType::F32, &device)?
            .to_dtype(dtype)?;
        let time = |method: ConvInputGrad| -> anyhow::Result<(f64, Tensor)> {
            let mut times = vec![];
            let mut result = None;
            for run in 0..=runs {
                device.synchronize()?;
                let start = Instant::now();
                let g = conv2d_input_grad(&grad, &weight, (hw, hw), &config, method)?;
                device.synchronize()?;
                if run > 0 {
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
                result = Some(g);
            }
            times.sort_by(f64::total_cmp);
            Ok((times[times.len() / 2], result.expect("at least one run")))
        };
        // What the GEMM paths spend on the kernel alone (flip + channel swap, as in
        // ops::frozen): the cost a cached transformed kernel would save.
        let prep_ms = {
            let taps = s.k * s.k;
            let ids: Vec<u32> = (0..taps as u32).rev().collect();
            let ids = Tensor::new(ids.as_slice(), &device)?;
            let mut times = vec![];
            for run in 0..=runs {
                device.synchronize()?;
                let start = Instant::now();
                let k = weight
                    .flatten_from(2)?
                    .index_select(&ids, 2)?
                    .transpose(0, 1)?
                    .contiguous()?;
                device.synchronize()?;
                drop(k);
                if run > 0 {
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            times.sort_by(f64::total_cmp);
            times[times.len() / 2]
        };
        let (old_ms, old) = time(ConvInputGrad::Transpose)?;
        let (new_ms, new) = time(ConvInputGrad::Polyphase)?;
        let rel = |g: &Tensor| -> anyhow::Result<f64> {
            let (g, o) = (g.to_dtype(DType::F32)?, old.to_dtype(DType::F32)?);
            let max = |t: Tensor| -> anyhow::Result<f64> {
                Ok(t.abs()?.max_all()?.to_scalar::<f32>()? as f64)
            };
            Ok(max((g - &o)?)? / max(o)?.max(1e-30))
        };
        let mut diff = rel(&new)?;
        let zeros = if s.stride > 1 {
            let (ms, g) = time(ConvInputGrad::ZeroInsertion)?;
            diff = diff.max(rel(&g)?);
            format!("{ms:.3}")
        } else {
            "(same as new)".to_string()
        };
        println!(
            "| {} | {hw}² | {old_ms:.3} | {new_ms:.3} | {:.1}x | {zeros} | {prep_ms:.3} | {diff:.1e} |",
            s.name,
            old_ms / new_ms
        );
    }
    Ok(())
}
