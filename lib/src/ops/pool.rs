//! 2-D pooling. Each window offset `(di, dj)` becomes a strided view of the padded input
//! (narrow + reshape, whose backward scatters correctly), and the pool is a max or mean over
//! the stacked views. Overlapping windows (kernel > stride, as in ResNet's 3×3/s2 stem) are
//! therefore differentiated exactly, which candle's own `max_pool2d` backward refuses.

use candle_core::{DType, Device, Result, Tensor};

/// PyTorch `F.max_pool2d(x, kernel, stride, padding)` (floor mode, padding with -inf).
///
/// The gradient goes to one input per window, the first maximum in row-major window order,
/// as PyTorch's (its kernels keep the index of the first `val > max`); ties are common in
/// f16/bf16 and after ReLU. candle's `max` would give it to every tied maximum.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let views = window_views(x, kernel, stride, padding, f64::NEG_INFINITY)?;
    let stacked = Tensor::stack(&views, 0)?;
    // argmax returns the first index of the maximum; select that view's value per position.
    let first = stacked.detach().argmax_keepdim(0)?;
    let offsets = Tensor::arange(0u32, views.len() as u32, x.device())?
        .reshape((views.len(), 1, 1, 1, 1))?
        .broadcast_as(stacked.shape())?;
    let chosen = offsets.broadcast_eq(&first)?;
    let zeros = stacked.zeros_like()?;
    chosen.where_cond(&stacked, &zeros)?.sum(0)
}

/// PyTorch `F.avg_pool2d(x, kernel, stride, padding)` with its default `count_include_pad=True`:
/// padded zeros count in the mean.
pub fn avg_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let views = window_views(x, kernel, stride, padding, 0.0)?;
    Tensor::stack(&views, 0)?.sum(0)? / (kernel * kernel) as f64
}

/// PyTorch `F.adaptive_avg_pool2d(x, (out_h, out_w))`: output cell `i` averages input rows
/// `floor(i·H/out_h) .. ceil((i+1)·H/out_h)`; written as two averaging matrices.
pub fn adaptive_avg_pool2d(x: &Tensor, (out_h, out_w): (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let rows = adaptive_matrix(h, out_h, x.dtype(), x.device())?;
    let cols = adaptive_matrix(w, out_w, x.dtype(), x.device())?;
    crate::ops::resize::apply_separable(x, &rows, &cols)
}

fn adaptive_matrix(input: usize, output: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; output * input];
    for i in 0..output {
        let start = i * input / output;
        let end = ((i + 1) * input).div_ceil(output);
        for j in start..end {
            m[i * input + j] = 1.0 / (end - start) as f32;
        }
    }
    Tensor::from_vec(m, (output, input), device)?.to_dtype(dtype)
}

/// The `kernel²` strided views of `x` (`[b, c, h, w]`) padded with `fill`, each
/// `[b, c, out_h, out_w]`, for floor-mode pooling.
fn window_views(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
    fill: f64,
) -> Result<Vec<Tensor>> {
    let (b, c, h, w) = x.dims4()?;
    if kernel == 0 || stride == 0 || 2 * padding > kernel {
        candle_core::bail!("pool2d: kernel {kernel}, stride {stride}, padding {padding} is not a valid pooling (need kernel, stride > 0 and padding <= kernel/2)")
    }
    if h + 2 * padding < kernel || w + 2 * padding < kernel {
        candle_core::bail!("pool2d: input {h}x{w} with padding {padding} is smaller than the {kernel}x{kernel} kernel")
    }
    let out_h = (h + 2 * padding - kernel) / stride + 1;
    let out_w = (w + 2 * padding - kernel) / stride + 1;
    // Pad so that every view `narrow(offset, out * stride)` fits: the trailing extra rows are
    // never selected by the stride-0 phase that the reshape keeps.
    let full_h = (kernel - 1) + out_h * stride;
    let full_w = (kernel - 1) + out_w * stride;
    let padded = pad2d(
        x,
        padding,
        full_h - h - padding,
        padding,
        full_w - w - padding,
        fill,
    )?;
    let mut views = Vec::with_capacity(kernel * kernel);
    for di in 0..kernel {
        let rows = padded.narrow(2, di, out_h * stride)?;
        let rows = if stride == 1 {
            rows
        } else {
            rows.reshape((b, c, out_h, stride, full_w))?
                .narrow(3, 0, 1)?
                .squeeze(3)?
        };
        for dj in 0..kernel {
            let view = rows.narrow(3, dj, out_w * stride)?;
            let view = if stride == 1 {
                view
            } else {
                view.reshape((b, c, out_h, out_w, stride))?
                    .narrow(4, 0, 1)?
                    .squeeze(4)?
            };
            views.push(view);
        }
    }
    Ok(views)
}

/// Pads `[b, c, h, w]` with a constant: `top`, `bottom` rows and `left`, `right` columns.
pub(crate) fn pad2d(
    x: &Tensor,
    top: usize,
    bottom: usize,
    left: usize,
    right: usize,
    fill: f64,
) -> Result<Tensor> {
    let (b, c, h, _) = x.dims4()?;
    let filled = |shape: (usize, usize, usize, usize)| -> Result<Tensor> {
        Tensor::full(fill, shape, x.device())?.to_dtype(x.dtype())
    };
    let mut parts = Vec::with_capacity(3);
    if left > 0 {
        parts.push(filled((b, c, h, left))?);
    }
    parts.push(x.clone());
    if right > 0 {
        parts.push(filled((b, c, h, right))?);
    }
    let x = if parts.len() > 1 {
        Tensor::cat(&parts, 3)?
    } else {
        x.clone()
    };
    let w = x.dim(3)?;
    let mut parts = Vec::with_capacity(3);
    if top > 0 {
        parts.push(filled((b, c, top, w))?);
    }
    parts.push(x.clone());
    if bottom > 0 {
        parts.push(filled((b, c, bottom, w))?);
    }
    if parts.len() > 1 {
        Tensor::cat(&parts, 2)
    } else {
        Ok(x)
    }
}
