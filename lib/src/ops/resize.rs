//! Resizing. Bilinear interpolation (with or without antialiasing) is linear and separable, so
//! it is written as `rows · x · colsᵀ` with interpolation matrices that reproduce PyTorch's
//! `F.interpolate(mode="bilinear", align_corners=False[, antialias=True])` weights exactly; the
//! backward is then two matmuls, which candle differentiates.

use candle_core::{DType, Device, Result, Tensor};

/// Nearest-neighbour ×2 upsampling (diffusers' `Upsample2D`), as a broadcast: its backward
/// sums the four copies of each pixel (candle's `upsample_nearest2d` backward overwrites).
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))
}

/// Bilinear resize of `[b, c, h, w]` to `(out_h, out_w)` with PyTorch's half-pixel convention.
/// `antialias` widens the filter when downscaling (PyTorch `antialias=True`, like PIL), which is
/// what torchvision's `Resize` does on tensors and what classifiers were trained on.
pub fn resize_bilinear(
    x: &Tensor,
    (out_h, out_w): (usize, usize),
    antialias: bool,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if out_h == 0 || out_w == 0 {
        candle_core::bail!("resize_bilinear: output size {out_h}x{out_w} must be positive")
    }
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let rows = bilinear_matrix(h, out_h, antialias, x.dtype(), x.device())?;
    let cols = bilinear_matrix(w, out_w, antialias, x.dtype(), x.device())?;
    apply_separable(x, &rows, &cols)
}

/// Bicubic resize of `[b, c, h, w]` to `(out_h, out_w)`: PyTorch's
/// `F.interpolate(mode="bicubic", align_corners=False)` (Keys' cubic with `A = -0.75`, source
/// coordinates not clamped, taps clamped at the border). transformers uses it to interpolate ViT
/// position embeddings to another grid (CLIPSeg at 352 px).
pub fn resize_bicubic(x: &Tensor, (out_h, out_w): (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if out_h == 0 || out_w == 0 {
        candle_core::bail!("resize_bicubic: output size {out_h}x{out_w} must be positive")
    }
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let rows = bicubic_matrix(h, out_h, x.dtype(), x.device())?;
    let cols = bicubic_matrix(w, out_w, x.dtype(), x.device())?;
    apply_separable(x, &rows, &cols)
}

/// The `[output, input]` bicubic interpolation matrix for one axis (PyTorch's
/// `upsample_bicubic2d`, `align_corners=False`).
pub fn bicubic_matrix(
    input: usize,
    output: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0; // |x| <= 1
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A; // 1 < |x| < 2
    let scale = input as f64 / output as f64;
    let mut m = vec![0f64; output * input];
    for i in 0..output {
        let src = scale * (i as f64 + 0.5) - 0.5;
        let x0 = src.floor();
        let t = src - x0;
        let weights = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, weight) in weights.iter().enumerate() {
            let j = (x0 as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
            m[i * input + j] += weight;
        }
    }
    Tensor::from_vec(m, (output, input), device)?.to_dtype(dtype)
}

/// `rows [out_h, h] · x [b, c, h, w] · colsᵀ [w, out_w]`.
pub(crate) fn apply_separable(x: &Tensor, rows: &Tensor, cols: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (out_h, out_w) = (rows.dim(0)?, cols.dim(0)?);
    // Columns: one [b·c·h, w] x [w, out_w] matmul.
    let x = x.reshape((b * c * h, w))?.matmul(&cols.t()?)?;
    // Rows: bring h last, another plain 2-D matmul, then back.
    let x = x
        .reshape((b * c, h, out_w))?
        .transpose(1, 2)?
        .reshape((b * c * out_w, h))?;
    let x = x.matmul(&rows.t()?)?;
    x.reshape((b * c, out_w, out_h))?
        .transpose(1, 2)?
        .reshape((b, c, out_h, out_w))
}

/// The `[output, input]` interpolation matrix for one axis.
pub fn bilinear_matrix(
    input: usize,
    output: usize,
    antialias: bool,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let scale = input as f64 / output as f64;
    let mut m = vec![0f64; output * input];
    for i in 0..output {
        let row = &mut m[i * input..(i + 1) * input];
        if antialias {
            // PyTorch's `_compute_weights_aa` (UpSampleKernel.cpp): a triangle filter whose
            // support grows with the downscale factor, weights normalized to sum to one.
            let support = if scale >= 1.0 { scale } else { 1.0 };
            let inv_scale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
            let center = scale * (i as f64 + 0.5);
            // `as i64` truncates toward zero, like the C++ static_cast.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let mut total = 0.0;
            for (j, weight) in row.iter_mut().enumerate().take(xmax).skip(xmin) {
                let t = ((j as f64 - center + 0.5) * inv_scale).abs();
                *weight = if t < 1.0 { 1.0 - t } else { 0.0 };
                total += *weight;
            }
            if total != 0.0 {
                row.iter_mut().for_each(|v| *v /= total);
            }
        } else {
            // Half-pixel source coordinate, clamped at 0 (PyTorch `area_pixel_compute_source_index`).
            let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(input - 1);
            let i1 = (i0 + 1).min(input - 1);
            let lambda = src - i0 as f64;
            row[i0] += 1.0 - lambda;
            row[i1] += lambda;
        }
    }
    Tensor::from_vec(m, (output, input), device)?.to_dtype(dtype)
}
