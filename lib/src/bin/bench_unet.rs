//! Times the UNet's forward and forward+backward (gradient w.r.t. the text conditioning, as
//! DiffExplainer needs), with and without gradient checkpointing, on a random SD-1.x-shaped
//! UNet: `bench_unet [tiny|small] [--cuda] [--iters N]`.
//!
//! `tiny` is the parity-case shape (8x8 latents); `small` is a narrower SD 1.5 layout
//! (4 blocks of 32..128 channels, 32x32 latents, 77 tokens of width 768) that exercises the
//! same code paths at a size where timings mean something. Weights are random (zeros would
//! make attention trivially uniform), so this measures speed only.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use diffexplainer::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};

fn config(size: &str) -> anyhow::Result<(UNet2DConditionConfig, usize, usize, usize)> {
    let (json, hw, tokens, width) = match size {
        "tiny" => (
            r#"{"block_out_channels": [8, 16], "layers_per_block": 1,
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "cross_attention_dim": 12, "attention_head_dim": 2, "norm_num_groups": 4}"#,
            8,
            5,
            12,
        ),
        "small" => (
            r#"{"block_out_channels": [32, 64, 128, 128], "layers_per_block": 2,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                     "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                   "CrossAttnUpBlock2D"],
                "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32}"#,
            32,
            77,
            768,
        ),
        other => anyhow::bail!("unknown size `{other}` (tiny or small)"),
    };
    Ok((serde_json::from_str(json)?, hw, tokens, width))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size = args
        .iter()
        .find(|a| !a.starts_with("--") && a.parse::<usize>().is_err())
        .map(String::as_str)
        .unwrap_or("tiny");
    let iters: usize = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5);
    let device = if args.iter().any(|a| a == "--cuda") {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let (cfg, hw, tokens, width) = config(size)?;
    // Random weights from candle's default inits (a VarMap), then frozen into plain tensors as
    // DiffExplainer's weights are: `Var` weights would make backward compute weight gradients.
    let varmap = candle_nn::VarMap::new();
    UNet2DConditionModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), &cfg)?;
    let frozen: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let vb = VarBuilder::from_tensors(frozen, DType::F32, &device);
    let mut unet = UNet2DConditionModel::new(vb, &cfg)?;
    let sample = Tensor::randn(0f32, 1.0, (1, 4, hw, hw), &device)?;
    let ehs = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, tokens, width), &device)?)?;
    println!("bench_unet {size}: latents {hw}x{hw}, {tokens} tokens of {width}, {device:?}, {iters} iters");

    for ckpt in [false, true] {
        unet.set_gradient_checkpointing(ckpt);
        let time = |f: &dyn Fn() -> anyhow::Result<()>| -> anyhow::Result<f64> {
            f()?; // warm-up
            let start = Instant::now();
            for _ in 0..iters {
                f()?;
            }
            device.synchronize()?;
            Ok(start.elapsed().as_secs_f64() * 1000.0 / iters as f64)
        };
        let fwd = time(&|| {
            unet.forward(&sample, 500.0, &ehs.detach())?;
            Ok(())
        })?;
        let fwd_bwd = time(&|| {
            let y = unet.forward(&sample, 500.0, ehs.as_tensor())?;
            let grads = y.sqr()?.sum_all()?.backward()?;
            grads
                .get(ehs.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("no gradient reached encoder_hidden_states"))?;
            Ok(())
        })?;
        println!(
            "  checkpointing {:<5}  forward {fwd:>9.2} ms   forward+backward {fwd_bwd:>9.2} ms",
            ckpt
        );
    }
    Ok(())
}
