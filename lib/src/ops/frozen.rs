//! Linear and 2-D convolution layers whose backward computes only what DiffExplainer needs:
//! the gradient with respect to the layer's input.
//!
//! candle's matmul and conv2d backward always compute the weight's gradient too, and keep it
//! in the gradient store until the end of `backward()`, even for a plain (frozen) weight
//! tensor. Through four UNet steps that is four copies of every UNet weight's gradient (about
//! 14 GB in f32 for SD 1.5), plus the time to compute them. Here, when the input is tracked and
//! the weight is not, the layer runs its forward on the detached input and attaches the result
//! to the graph through a custom op whose backward is the input's vector-Jacobian product
//! alone (`g·W` for a linear layer, a transposed convolution for a conv). A weight that is
//! itself tracked (a `Var`, or derived from one) takes candle's ordinary path, so no gradient
//! is ever dropped silently.
//!
//! The conv input-gradient (a transposed convolution) runs through `Tensor::conv2d`, candle's
//! im2col + GEMM path, as stride-1 convolutions with the flipped, channel-swapped kernel (one
//! per output phase when the stride is > 1): candle's own `conv_transpose2d` is a naive direct
//! kernel on CUDA and CPU alike, 25-120x PyTorch per conv on an H100. See [`ConvInputGrad`];
//! `DIFFEXPLAINER_CONV_INPUT_GRAD=transpose` restores the old path for A/B timing. Either way it
//! handles non-square inputs correctly: candle's own conv2d backward derives the transposed
//! convolution's output padding from the height alone.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, Layout, Module, Result, Shape, Storage, Tensor,
};
pub use candle_nn::Conv2dConfig;
use candle_nn::VarBuilder;

/// `y = x Wᵀ + b` over the last dimension (PyTorch `nn.Linear`: `weight` is `[out, in]`).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// Loads `weight` `[out, in]` and `bias` `[out]` (PyTorch names).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(
        vb.get((out_dim, in_dim), "weight")?,
        Some(vb.get(out_dim, "bias")?),
    ))
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(vb.get((out_dim, in_dim), "weight")?, None))
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !input_only_gradient(x, &self.weight, self.bias.as_ref()) {
            return linear_forward(x, &self.weight, self.bias.as_ref());
        }
        let y = linear_forward(&x.detach(), &self.weight, self.bias.as_ref())?;
        let weight = self.weight.clone();
        let in_dims = x.dims().to_vec();
        attach(x, y, move |grad| {
            let out_dim = weight.dim(0)?;
            let rows = grad.elem_count() / out_dim;
            grad.reshape((rows, out_dim))?
                .matmul(&weight)?
                .reshape(in_dims.as_slice())
        })
    }
}

fn linear_forward(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    // One 2-D matmul over all leading dimensions (a broadcast matmul is slower in candle).
    let dims = x.dims();
    let (in_dim, out_dim) = (weight.dim(1)?, weight.dim(0)?);
    let rows = x.elem_count() / in_dim;
    let mut out_dims = dims.to_vec();
    *out_dims
        .last_mut()
        .expect("linear input has at least one dimension") = out_dim;
    let y = x
        .contiguous()?
        .reshape((rows, in_dim))?
        .matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    y.reshape(out_dims.as_slice())
}

/// 2-D convolution with PyTorch's `weight` `[out, in / groups, k, k]` and optional `bias`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: Conv2dConfig,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: Conv2dConfig) -> Self {
        Self {
            weight,
            bias,
            config,
        }
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn config(&self) -> &Conv2dConfig {
        &self.config
    }
}

pub fn conv2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    config: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let weight = vb.get((out_c, in_c / config.groups, kernel, kernel), "weight")?;
    Ok(Conv2d::new(weight, Some(vb.get(out_c, "bias")?), config))
}

pub fn conv2d_no_bias(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    config: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let weight = vb.get((out_c, in_c / config.groups, kernel, kernel), "weight")?;
    Ok(Conv2d::new(weight, None, config))
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        // Trainable weights: GEMM backward instead of candle's direct conv_transpose2d.
        if super::conv_train::supported(c)
            && (self.weight.track_op() || self.bias.as_ref().is_some_and(Tensor::track_op))
        {
            return super::conv_train::conv2d_trainable(x, &self.weight, self.bias.as_ref(), c);
        }
        // Grouped convolutions keep candle's path (its conv_transpose2d has no groups).
        if c.groups != 1 || !input_only_gradient(x, &self.weight, self.bias.as_ref()) {
            return conv_forward(x, &self.weight, self.bias.as_ref(), c);
        }
        let y = conv_forward(&x.detach(), &self.weight, self.bias.as_ref(), c)?;
        let weight = self.weight.clone();
        let (h, w) = (x.dim(2)?, x.dim(3)?);
        let config = *c;
        attach(x, y, move |grad| {
            let method = ConvInputGrad::from_env()?.for_input_channels(weight.dim(1)?);
            conv2d_input_grad(grad, &weight, (h, w), &config, method)
        })
    }
}

/// How [`Conv2d`]'s backward computes the input gradient (all three give the same values).
///
/// Chosen by the environment variable `DIFFEXPLAINER_CONV_INPUT_GRAD`, read once per process:
/// unset or `polyphase` (default), `zero-insertion`, or `transpose` (the original path, kept for
/// A/B timing). Any other value makes the backward fail with an error naming the valid ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvInputGrad {
    /// candle's `conv_transpose2d`: a naive direct kernel on both CUDA and CPU.
    Transpose,
    /// Zeros interleaved into the gradient (stride s), then one stride-1 `conv2d` with the
    /// transposed, flipped kernel: the GEMM path, but s² times the multiplies of the polyphase.
    ZeroInsertion,
    /// s² stride-1 `conv2d`s (GEMM path), one per output phase, each with the kernel taps that
    /// reach that phase, interleaved at the end: no multiplies by inserted zeros.
    Polyphase,
}

impl ConvInputGrad {
    pub const ENV: &'static str = "DIFFEXPLAINER_CONV_INPUT_GRAD";

    /// Below this many input channels (the gradient conv's output columns: 3 for an image
    /// classifier's stem) the GEMM is too thin to pay for its im2col buffers; the direct kernel
    /// does far fewer operations there (ResNet stem on the CPU: 74 ms direct vs 588 ms GEMM).
    pub const MIN_GEMM_INPUT_CHANNELS: usize = 8;

    /// [`Conv2d`]'s policy: polyphase (the default) falls back to the direct kernel for
    /// convolutions with fewer than [`Self::MIN_GEMM_INPUT_CHANNELS`] input channels; the
    /// other methods are kept as chosen.
    pub fn for_input_channels(self, c_in: usize) -> Self {
        match self {
            Self::Polyphase if c_in < Self::MIN_GEMM_INPUT_CHANNELS => Self::Transpose,
            method => method,
        }
    }

    /// The method named by `DIFFEXPLAINER_CONV_INPUT_GRAD` (read once; default: polyphase).
    pub fn from_env() -> Result<Self> {
        static METHOD: std::sync::OnceLock<std::result::Result<ConvInputGrad, String>> =
            std::sync::OnceLock::new();
        METHOD
            .get_or_init(|| {
                super::env_choice(
                    Self::ENV,
                    &[
                        ("polyphase", Self::Polyphase),
                        ("zero-insertion", Self::ZeroInsertion),
                        ("transpose", Self::Transpose),
                    ],
                )
            })
            .clone()
            .map_err(candle_core::Error::Msg)
    }
}

/// The gradient of `conv2d(x, weight, config)` with respect to `x` (of spatial size `input_hw`)
/// given the output's gradient `grad`, for `config.groups == 1`. `weight` may have k_h != k_w.
///
/// The GEMM methods transpose and flip the weight on every call rather than caching it in the
/// [`Conv2d`]: a cache would double the memory of every conv weight (about 1.2 GB more for the
/// SD 1.5 UNet in f16, where we already use several times PyTorch's memory). The copy costs two
/// passes over the weight per backward: on a GPU about 50 µs for a 1280x1280x3x3 f16 kernel
/// (~8 ms per iteration over the UNet's 4 steps), comparable to the GEMM itself only at 8²-16²;
/// on the CPU candle's index_select/strided copy are slow (~200 ms for that kernel in f32,
/// more than its GEMM), see docs/gpu-notes.md.
pub fn conv2d_input_grad(
    grad: &Tensor,
    weight: &Tensor,
    input_hw: (usize, usize),
    config: &Conv2dConfig,
    method: ConvInputGrad,
) -> Result<Tensor> {
    let (h, w) = input_hw;
    let (pad, stride, dil) = (config.padding, config.stride, config.dilation);
    if config.groups != 1 {
        candle_core::bail!(
            "conv2d_input_grad: groups {} (only 1 is supported)",
            config.groups
        )
    }
    let (_, _, k_h, k_w) = weight.dims4()?;
    let (_, _, out_h, out_w) = grad.dims4()?;
    match method {
        ConvInputGrad::Transpose => {
            // Output padding per axis: the input rows/columns the forward's floor division
            // dropped from the transposed convolution's natural size. conv_transpose2d takes one
            // value for both axes, so use the larger and trim the other axis.
            let natural = |out: usize, k: usize| (out - 1) * stride + dil * (k - 1) + 1 - 2 * pad;
            let (pad_h, pad_w) = (h - natural(out_h, k_h), w - natural(out_w, k_w));
            let g = grad.conv_transpose2d(weight, pad, pad_h.max(pad_w), stride, dil)?;
            g.narrow(2, 0, h)?.narrow(3, 0, w)
        }
        ConvInputGrad::ZeroInsertion => {
            // Each gradient row/column followed by stride-1 zeros: a stride-1 problem whose
            // "output" is out * stride long.
            let (b, c) = (grad.dim(0)?, grad.dim(1)?);
            let zeros = grad
                .reshape((b, c, out_h, 1, out_w, 1))?
                .pad_with_zeros(3, 0, stride - 1)?
                .pad_with_zeros(5, 0, stride - 1)?
                .reshape((b, c, out_h * stride, out_w * stride))?;
            let plan_h = AxisPhase::new(k_h, 1, dil, pad, h, out_h * stride, 0);
            let plan_w = AxisPhase::new(k_w, 1, dil, pad, w, out_w * stride, 0);
            phase_conv(&zeros, weight, &plan_h, &plan_w)
        }
        ConvInputGrad::Polyphase => {
            // Input row j = q * stride + r (phase r) receives only the kernel taps a with
            // a * dil + r + pad ≡ 0 (mod stride): one stride-1 conv per (row, column) phase.
            let phases = |k, n, out| {
                (0..stride)
                    .map(|r| AxisPhase::new(k, stride, dil, pad, n, out, r))
                    .collect::<Vec<_>>()
            };
            let (phases_h, phases_w) = (phases(k_h, h, out_h), phases(k_w, w, out_w));
            if stride == 1 {
                return phase_conv(grad, weight, &phases_h[0], &phases_w[0]);
            }
            let rows = phases_h
                .iter()
                .map(|ph| {
                    let cols = phases_w
                        .iter()
                        .map(|pw| phase_conv(grad, weight, ph, pw))
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::stack(&cols, 4) // [b, c, q_h, q_w, stride]
                })
                .collect::<Result<Vec<_>>>()?;
            let g = Tensor::stack(&rows, 3)?; // [b, c, q_h, stride, q_w, stride]
            let &[b, c, q_h, _, q_w, _] = g.dims() else {
                unreachable!("stacked phases have 6 dimensions")
            };
            g.reshape((b, c, q_h * stride, q_w * stride))?
                .narrow(2, 0, h)?
                .narrow(3, 0, w)
        }
    }
}

/// One output phase of the input gradient along one axis, as a stride-1 correlation:
/// `gx[q * stride + r] = Σ_m g[q - lead + m * dil] · W[taps[m]]` over `q < len`, where
/// `g[i]` is the output gradient (zero outside `0..out`) and `taps` are the kernel taps that
/// reach phase `r`, already in flipped order. `dil` is the sub-convolution's dilation.
#[derive(Debug, Clone)]
struct AxisPhase {
    taps: Vec<u32>,
    dil: usize,
    /// Zero rows the correlation needs before the gradient's first row (negative: rows skipped).
    lead: isize,
    /// Zero rows it needs after the gradient's last row (negative: rows unused).
    trail: isize,
    len: usize,
}

impl AxisPhase {
    /// Phase `r` of an axis with kernel size `k`, forward stride/dilation/padding, input length
    /// `n` and output (gradient) length `out`.
    fn new(
        k: usize,
        stride: usize,
        dil: usize,
        pad: usize,
        n: usize,
        out: usize,
        r: usize,
    ) -> Self {
        // Taps a with a*dil ≡ r + pad (mod stride) reach input row q*stride + r from output row
        // i = q + (r + pad - a*dil) / stride. They are spaced stride/g apart (g = gcd), and
        // consecutive taps read output rows dil/g apart.
        let g = gcd(dil, stride);
        let (step, sub_dil) = (stride / g, dil / g);
        let len = n.div_ceil(stride);
        let Some(a0) = (0..k).find(|a| (a * dil + stride - (r + pad) % stride) % stride == 0)
        else {
            return Self {
                taps: vec![],
                dil: sub_dil,
                lead: 0,
                trail: 0,
                len,
            };
        };
        let count = (k - a0).div_ceil(step);
        // The first tap a0 reads output row q + offset, the last one q + offset - (count-1)*sub_dil.
        let offset = (r + pad) as isize - (a0 * dil) as isize;
        let offset = offset.div_euclid(stride as isize);
        let span = ((count - 1) * sub_dil) as isize;
        let lead = span - offset;
        let trail = len as isize + span - lead - out as isize;
        let taps = (0..count).rev().map(|m| (a0 + m * step) as u32).collect();
        Self {
            taps,
            dil: sub_dil,
            lead,
            trail,
            len,
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The stride-1 correlation of one (row, column) phase through `Tensor::conv2d` (im2col + GEMM):
/// the kernel's taps for the phase, flipped, in/out channels swapped; one symmetric zero padding
/// covers the largest of the four sides, and the result is narrowed to the wanted window.
fn phase_conv(grad: &Tensor, weight: &Tensor, ph: &AxisPhase, pw: &AxisPhase) -> Result<Tensor> {
    let (b, _, _, _) = grad.dims4()?;
    let (c_out, c_in, _, k_w) = weight.dims4()?;
    if ph.taps.is_empty() || pw.taps.is_empty() {
        return Tensor::zeros((b, c_in, ph.len, pw.len), grad.dtype(), grad.device());
    }
    // One index_select picks (and flips) the taps of both axes from the flattened kernel.
    let flat: Vec<u32> = ph
        .taps
        .iter()
        .flat_map(|&a| pw.taps.iter().map(move |&c| a * k_w as u32 + c))
        .collect();
    let ids = Tensor::new(flat.as_slice(), weight.device())?;
    let kernel = weight
        .flatten_from(2)?
        .index_select(&ids, 2)?
        .reshape((c_out, c_in, ph.taps.len(), pw.taps.len()))?
        .transpose(0, 1)?
        .contiguous()?;
    let pad = [ph.lead, ph.trail, pw.lead, pw.trail]
        .into_iter()
        .max()
        .unwrap_or(0)
        .max(0) as usize;
    assert_eq!(ph.dil, pw.dil, "one dilation for both axes");
    grad.conv2d(&kernel, pad, 1, ph.dil, 1)?
        .narrow(2, (pad as isize - ph.lead) as usize, ph.len)?
        .narrow(3, (pad as isize - pw.lead) as usize, pw.len)
}

fn conv_forward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    c: &Conv2dConfig,
) -> Result<Tensor> {
    let y = x.conv2d(weight, c.padding, c.stride, c.dilation, c.groups)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

/// Whether only the input's gradient is wanted: the input is tracked, the parameters are not.
fn input_only_gradient(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    x.track_op() && !weight.track_op() && !bias.is_some_and(Tensor::track_op)
}

/// Returns `y` (computed from the detached `x`) as a node of `x`'s graph whose backward is
/// `vjp(grad)`.
fn attach(
    x: &Tensor,
    y: Tensor,
    vjp: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    // The bridge hands out y's storage as its own output; it must own exactly y's elements.
    let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
        y
    } else {
        y.copy()?
    };
    x.apply_op1(InputGradient {
        output: Mutex::new(Some(y)),
        vjp: Box::new(vjp),
    })
}

/// A custom op over `x` that outputs a precomputed tensor and back-propagates `vjp(grad)`.
struct InputGradient {
    output: Mutex<Option<Tensor>>,
    vjp: Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>,
}

impl InputGradient {
    fn take(&self) -> Result<Tensor> {
        self.output
            .lock()
            .map_err(|_| candle_core::Error::Msg("input-gradient op: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("input-gradient op: forward ran twice".into()))
    }
}

impl CustomOp1 for InputGradient {
    fn name(&self) -> &'static str {
        "input-gradient-only"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => {
                candle_core::bail!("input-gradient op: the output is not on the CPU like its input")
            }
        }
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => {
                candle_core::bail!("input-gradient op: the output is not on the GPU like its input")
            }
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.vjp)(grad)?))
    }
}

/// Three-input version of [`attach`]: `y` becomes a node of the graph of `a`, `b`, `c` whose
/// backward is `vjp(grad) -> (grad_a, grad_b, grad_c)` (used by memory-efficient attention).
pub(crate) fn attach3(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    y: Tensor,
    vjp: impl Fn(&Tensor) -> Result<(Tensor, Tensor, Tensor)> + Send + Sync + 'static,
) -> Result<Tensor> {
    let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
        y
    } else {
        y.copy()?
    };
    a.apply_op3(
        b,
        c,
        InputGradient3 {
            output: Mutex::new(Some(y)),
            vjp: Box::new(vjp),
        },
    )
}

type Vjp3 = Box<dyn Fn(&Tensor) -> Result<(Tensor, Tensor, Tensor)> + Send + Sync>;

struct InputGradient3 {
    output: Mutex<Option<Tensor>>,
    vjp: Vjp3,
}

impl CustomOp3 for InputGradient3 {
    fn name(&self) -> &'static str {
        "input-gradient-only-3"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = InputGradient {
            output: Mutex::new(self.take()?),
            vjp: Box::new(|g| Ok(g.clone())),
        };
        CustomOp1::cpu_fwd(&op, &CpuStorage::F32(vec![]), &Layout::contiguous(0))
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let op = InputGradient {
            output: Mutex::new(self.take()?),
            vjp: Box::new(|g| Ok(g.clone())),
        };
        CustomOp1::cuda_fwd(&op, s, l)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (ga, gb, gc) = (self.vjp)(grad)?;
        Ok((Some(ga), Some(gb), Some(gc)))
    }
}

impl InputGradient3 {
    fn take(&self) -> Result<Option<Tensor>> {
        let y = self
            .output
            .lock()
            .map_err(|_| candle_core::Error::Msg("input-gradient op: poisoned lock".into()))?
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg("input-gradient op: forward ran twice".into())
            })?;
        Ok(Some(y))
    }
}
