//! Finite-difference gradient checks, independent of any reference library: the analytic input
//! gradient from candle's autograd against central differences of the forward pass.
//!
//! Run in f64 so that the difference quotient is accurate (step 1e-6 gives ~1e-9 truncation and
//! rounding error for smooth functions). The objective is `sum(f(x) · c)` with a fixed
//! pseudo-random cotangent `c`, so every output element's gradient counts.

use candle_core::{DType, Device, Result, Tensor, Var};

/// The result of a finite-difference check.
#[derive(Debug, Clone)]
pub struct GradCheck {
    /// Coordinates of `x` that were perturbed.
    pub checked: usize,
    /// Largest `|analytic - numeric|` over the checked coordinates, divided by the largest
    /// absolute numeric derivative (the gradient's scale).
    pub max_rel_error: f64,
    /// Largest absolute numeric derivative seen; zero means the check proved nothing.
    pub scale: f64,
}

/// Deterministic values in [-1, 1) (an LCG; tests need reproducibility, not quality).
pub fn pseudo_random(n: usize, seed: u64) -> Vec<f64> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

/// A tensor of the given shape filled with [`pseudo_random`] values scaled by `scale`.
pub fn pseudo_random_tensor(
    shape: &[usize],
    scale: f64,
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    let n = shape.iter().product();
    let v: Vec<f64> = pseudo_random(n, seed)
        .into_iter()
        .map(|x| x * scale)
        .collect();
    Tensor::from_vec(v, shape, device)
}

/// Checks the gradient of `f` at `x` (converted to f64) on up to `max_coords` coordinates.
pub fn check_gradient(
    f: impl Fn(&Tensor) -> Result<Tensor>,
    x: &Tensor,
    step: f64,
    max_coords: usize,
) -> Result<GradCheck> {
    let x = x.to_dtype(DType::F64)?;
    let out_shape = f(&x)?.dims().to_vec();
    let cotangent = pseudo_random_tensor(&out_shape, 1.0, 7, x.device())?;
    let objective =
        |t: &Tensor| -> Result<f64> { f(t)?.mul(&cotangent)?.sum_all()?.to_scalar::<f64>() };

    let var = Var::from_tensor(&x)?;
    let grads = f(var.as_tensor())?.mul(&cotangent)?.sum_all()?.backward()?;
    let analytic = match grads.get(var.as_tensor()) {
        Some(g) => g.flatten_all()?.to_vec1::<f64>()?,
        None => vec![0.0; x.elem_count()],
    };

    let base = x.flatten_all()?.to_vec1::<f64>()?;
    let n = base.len();
    let coords: Vec<usize> = if n <= max_coords {
        (0..n).collect()
    } else {
        // Spread the sample over the whole tensor, offset pseudo-randomly.
        let offsets = pseudo_random(max_coords, 11);
        (0..max_coords)
            .map(|i| {
                (i * n / max_coords + ((offsets[i].abs() * (n / max_coords) as f64) as usize))
                    .min(n - 1)
            })
            .collect()
    };
    let mut max_err = 0.0f64;
    let mut scale = 0.0f64;
    let mut numeric = Vec::with_capacity(coords.len());
    for &i in &coords {
        let mut plus = base.clone();
        plus[i] += step;
        let mut minus = base.clone();
        minus[i] -= step;
        let fp = objective(&Tensor::from_vec(plus, x.dims(), x.device())?)?;
        let fm = objective(&Tensor::from_vec(minus, x.dims(), x.device())?)?;
        let d = (fp - fm) / (2.0 * step);
        scale = scale.max(d.abs());
        numeric.push(d);
    }
    for (k, &i) in coords.iter().enumerate() {
        max_err = max_err.max((analytic[i] - numeric[k]).abs());
    }
    Ok(GradCheck {
        checked: coords.len(),
        max_rel_error: max_err / scale.max(1e-300),
        scale,
    })
}

/// A `VarBuilder` that makes up every tensor it is asked for (seed 0): SD-sized random models
/// for tests and benchmarks without a checkpoint file. See [`crate::weights::RandomWeights`].
pub fn random_var_builder(dtype: DType, device: &Device) -> candle_nn::VarBuilder<'static> {
    crate::weights::RandomWeights::new(0).into_var_builder(dtype, device)
}
