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
//! The conv input-gradient also handles non-square inputs correctly: candle's own conv2d
//! backward derives the transposed convolution's output padding from the height alone.

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
        // Grouped convolutions keep candle's path (its conv_transpose2d has no groups).
        if c.groups != 1 || !input_only_gradient(x, &self.weight, self.bias.as_ref()) {
            return conv_forward(x, &self.weight, self.bias.as_ref(), c);
        }
        let y = conv_forward(&x.detach(), &self.weight, self.bias.as_ref(), c)?;
        let weight = self.weight.clone();
        let (h, w) = (x.dim(2)?, x.dim(3)?);
        let (pad, stride, dil) = (c.padding, c.stride, c.dilation);
        attach(x, y, move |grad| {
            // Output padding per axis: the input rows/columns the forward's floor division
            // dropped from the transposed convolution's natural size. conv_transpose2d takes one
            // value for both axes, so use the larger and trim the other axis.
            let k = weight.dim(2)?;
            let natural = |out: usize| (out - 1) * stride + dil * (k - 1) + 1 - 2 * pad;
            let (pad_h, pad_w) = (h - natural(grad.dim(2)?), w - natural(grad.dim(3)?));
            let g = grad.conv_transpose2d(&weight, pad, pad_h.max(pad_w), stride, dil)?;
            g.narrow(2, 0, h)?.narrow(3, 0, w)
        })
    }
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
