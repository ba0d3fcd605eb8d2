//! Timestep conditioning: the sinusoidal embedding of the (integer or fractional) diffusion
//! timestep (diffusers' `Timesteps` / `get_timestep_embedding`) and the two-layer MLP that maps
//! it to the ResNets' `temb` (`time_embedding.linear_1`, `time_embedding.linear_2`).

use crate::ops::Linear;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops;

/// `[b]` timesteps -> `[b, dim]` embedding, computed in f32 exactly as diffusers does (it casts
/// the timesteps with `.float()` whatever the model's dtype), then cast to `dtype`.
///
/// Frequencies are `exp(-ln(10000) · i / (dim/2 - freq_shift))`; the embedding is
/// `[sin(t·f), cos(t·f)]`, or `[cos, sin]` when `flip_sin_to_cos` (SD's choice).
/// Not differentiable with respect to the timestep (nothing in DiffExplainer needs it).
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    dtype: DType,
) -> Result<Tensor> {
    let half = dim / 2;
    let t = timesteps.detach().to_dtype(DType::F32)?.flatten_all()?;
    // f32 arithmetic in the same order as PyTorch's, so f32 runs match its rounding.
    let log_max_period = -(10000f64.ln()) as f32;
    let denominator = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (log_max_period * i as f32 / denominator).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    let emb = if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)?
    } else {
        emb
    };
    emb.to_dtype(dtype)
}

/// `time_embedding`: `linear_2(silu(linear_1(t_emb)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, time_embed_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: crate::ops::linear(in_dim, time_embed_dim, vb.pp("linear_1"))?,
            linear_2: crate::ops::linear(time_embed_dim, time_embed_dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&ops::silu(&self.linear_1.forward(x)?)?)
    }
}
