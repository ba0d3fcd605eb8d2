//! Gradient checkpointing: run a block without recording its graph, and recompute it during the
//! backward pass. DiffExplainer backpropagates through every denoising step, so the recorded
//! activations of all UNet calls would otherwise be alive at once; with checkpointing only each
//! checkpointed block's inputs and output are kept (the attention scores, GroupNorm
//! intermediates, ... are recomputed), for about one extra forward pass of compute.
//!
//! Mechanism (candle has no built-in checkpointing): the block runs on detached inputs, so no
//! graph is recorded, and its output is passed through a [`CustomOp3`] whose arguments are
//! `(output, x, context)`. The op's forward copies the output; its backward re-runs the block on
//! fresh `Var`s holding `x` and `context`, backpropagates the incoming gradient through that
//! fresh graph, and returns the gradients for `x` and `context`.
//!
//! Only gradients with respect to `x` and `context` flow through a checkpointed block; parameter
//! gradients (which DiffExplainer does not need: the weights are frozen) do not.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, Layout, MetalStorage, Result, Shape, Tensor, Var,
};

/// A block's forward as a function of its input and one context tensor (the time embedding of a
/// ResNet, the text conditioning of a transformer).
pub type BlockFn = Arc<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// `f(x, context)`, checkpointed: same value, same gradients with respect to `x` and `context`,
/// but the graph inside `f` is not kept between forward and backward. Without any tracked input
/// this is just `f(x, context)`.
pub fn checkpoint(f: BlockFn, x: &Tensor, context: &Tensor) -> Result<Tensor> {
    if !x.track_op() && !context.track_op() {
        return f(x, context);
    }
    // Detached: with `Var` weights the output would still carry the block's graph, which
    // candle's backward would then expect a gradient for.
    let y = f(&x.detach(), &context.detach())?.detach();
    let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
        y
    } else {
        y.contiguous()?.affine(1.0, 0.0)?
    };
    y.apply_op3(x, context, Recompute(f))
}

struct Recompute(BlockFn);

/// The passthrough forward only handles a contiguous output starting at offset 0 (which
/// [`checkpoint`] ensures).
fn check_layout(l: &Layout) -> Result<()> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("checkpoint: internal error, output layout {l:?} is not fresh")
    }
    Ok(())
}

impl CustomOp3 for Recompute {
    fn name(&self) -> &'static str {
        "gradient-checkpoint"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check_layout(l)?;
        let n = l.shape().elem_count();
        let copy = match s {
            CpuStorage::F32(v) => CpuStorage::F32(v[..n].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[..n].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[..n].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[..n].to_vec()),
            other => candle_core::bail!(
                "checkpoint: a block output of dtype {:?} (only float dtypes)",
                other.dtype()
            ),
        };
        Ok((copy, l.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check_layout(l)?;
        Ok((s.try_clone(l)?, l.shape().clone()))
    }

    fn metal_fwd(
        &self,
        s: &MetalStorage,
        l: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        check_layout(l)?;
        Ok((s.try_clone(l)?, l.shape().clone()))
    }

    fn bwd(
        &self,
        _output: &Tensor,
        x: &Tensor,
        context: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let var = |t: &Tensor| -> Result<Option<Var>> {
            t.track_op()
                .then(|| Var::from_tensor(&t.detach()))
                .transpose()
        };
        let (xv, cv) = (var(x)?, var(context)?);
        let x_in = xv
            .as_ref()
            .map_or_else(|| x.detach(), |v| v.as_tensor().clone());
        let c_in = cv
            .as_ref()
            .map_or_else(|| context.detach(), |v| v.as_tensor().clone());
        let y = (self.0)(&x_in, &c_in)?;
        let grads = y.mul(&grad.detach())?.sum_all()?.backward()?;
        // A tracked input must receive a gradient (candle expects one per tracked node).
        let get = |v: Option<Var>| -> Result<Option<Tensor>> {
            v.map(|v| match grads.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => v.as_tensor().zeros_like(),
            })
            .transpose()
        };
        Ok((None, get(xv)?, get(cv)?))
    }
}
