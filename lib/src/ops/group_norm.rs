//! Fused group normalization: one custom op for the forward, one for the input gradient.
//!
//! The composed version ([`super::norm::group_norm_composed`], kept as the reference and for
//! tracked affine parameters) launches a dozen kernels per call and its autograd graph keeps
//! several full-size f32 tensors (the upcast input, the centered values, their squares, the
//! normalized result, the affine products). Here the graph keeps only the input and the
//! per-(batch, group) mean and 1/sqrt(var + eps), `[B, G, 2]`, and the backward is one
//! reduction plus one elementwise pass:
//!
//! `dx = rstd · (dy·w − mean_g(dy·w) − x̂ · mean_g(dy·w·x̂))`, `x̂ = (x − mean) · rstd`.
//!
//! Statistics and arithmetic are in f32 for f16/bf16/f32 inputs and f64 for f64 inputs, the
//! output in the input's dtype. The weight and bias (per channel) must not be tracked: their
//! gradients are not computed here, so [`group_norm_fused`] refuses them and
//! [`super::group_norm`] applies tracked parameters after it in candle ops instead. The backward is
//! not itself differentiable (no double backward).
//!
//! CPU: plain loops, one (batch, group) at a time, spread over scoped threads. CUDA: the
//! kernels in `group_norm.cu`, shipped as PTX (`group_norm.ptx`, made by nvcc; see the header
//! of the .cu file) and loaded once per device through `CudaDevice::get_or_load_custom_func`.
//! `DIFFEXPLAINER_GROUP_NORM=composed` selects the composed path for A/B timing.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

/// Which implementation [`super::group_norm`] uses; see [`GroupNormImpl::from_env`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupNormImpl {
    /// The custom ops of this module (default). Tracked weight/bias still take the composed path.
    Fused,
    /// Composed from candle tensor ops in f32 (the original implementation).
    Composed,
}

impl GroupNormImpl {
    pub const ENV: &'static str = "DIFFEXPLAINER_GROUP_NORM";

    /// The implementation named by `DIFFEXPLAINER_GROUP_NORM`, read once per process: unset,
    /// empty or `fused` (default), or `composed`. Any other value is an error naming the valid
    /// ones (every group norm fails, rather than silently timing the wrong path).
    pub fn from_env() -> Result<Self> {
        static CHOICE: std::sync::OnceLock<std::result::Result<GroupNormImpl, String>> =
            std::sync::OnceLock::new();
        CHOICE
            .get_or_init(|| {
                super::env_choice(
                    Self::ENV,
                    &[("fused", Self::Fused), ("composed", Self::Composed)],
                )
            })
            .clone()
            .map_err(candle_core::Error::Msg)
    }
}

/// Fused group normalization of `x` `[B, C, ...]` (see the module docs). `weight` and `bias`
/// are `[C]` (any shape with C elements), in `x`'s dtype, and must not be tracked.
pub fn group_norm_fused(
    x: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || num_groups == 0 || dims[1] % num_groups != 0 {
        candle_core::bail!("group_norm: input shape {dims:?} has channels (dim 1) not divisible by {num_groups} groups")
    }
    if !matches!(
        x.dtype(),
        DType::F16 | DType::BF16 | DType::F32 | DType::F64
    ) {
        candle_core::bail!("group_norm (fused): unsupported dtype {:?}", x.dtype())
    }
    let channels = dims[1];
    let param = |p: Option<&Tensor>, name: &str| -> Result<Option<Tensor>> {
        let Some(p) = p else { return Ok(None) };
        if p.track_op() {
            candle_core::bail!("group_norm (fused): the {name} is tracked, but only the input's gradient is computed here; use ops::group_norm, which falls back to the composed path")
        }
        if p.elem_count() != channels || p.dtype() != x.dtype() {
            candle_core::bail!(
                "group_norm: {name} {:?} {:?} does not match input {dims:?} {:?} ({channels} channels)",
                p.dims(),
                p.dtype(),
                x.dtype()
            )
        }
        Ok(Some(p.detach().flatten_all()?.contiguous()?))
    };
    let op = GroupNormForward {
        groups: num_groups,
        weight: param(weight, "weight")?,
        bias: param(bias, "bias")?,
    };
    let x = x.contiguous()?;
    let stats = x.detach().apply_op1_no_bwd(&GroupNormStats {
        groups: num_groups,
        eps,
    })?;
    if x.track_op() {
        x.apply_op2(&stats, op)
    } else {
        x.apply_op2_no_bwd(&stats, &op)
    }
}

/// The per-(batch, group) statistics `[B, G, 2]` (mean, 1/sqrt(var + eps)) in f32 (f64 for f64
/// input), as the fused forward computes and keeps them. Exposed for tests.
#[doc(hidden)]
pub fn group_norm_stats(x: &Tensor, num_groups: usize, eps: f64) -> Result<Tensor> {
    x.detach().contiguous()?.apply_op1_no_bwd(&GroupNormStats {
        groups: num_groups,
        eps,
    })
}

/// The input gradient of the fused group norm from the output gradient `grad`, the input `x`,
/// its statistics (see [`group_norm_stats`]) and the optional weight. Exposed for tests (a
/// negative control feeds it perturbed statistics).
#[doc(hidden)]
pub fn group_norm_input_grad(
    grad: &Tensor,
    x: &Tensor,
    stats: &Tensor,
    weight: Option<&Tensor>,
    num_groups: usize,
) -> Result<Tensor> {
    let weight = weight
        .map(|w| w.detach().flatten_all()?.contiguous())
        .transpose()?;
    grad.detach().contiguous()?.apply_op3_no_bwd(
        &x.detach().contiguous()?,
        &stats.detach().contiguous()?,
        &GroupNormBackward {
            groups: num_groups,
            weight,
        },
    )
}

/// [B, C, S] sizes of a contiguous input and its group count.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    channels: usize,
    spatial: usize,
    groups: usize,
}

impl Geometry {
    fn new(layout: &Layout, groups: usize) -> Result<Self> {
        let dims = layout.dims();
        if dims.len() < 2 || groups == 0 || dims[1] % groups != 0 {
            candle_core::bail!("group_norm: input shape {dims:?} has channels (dim 1) not divisible by {groups} groups")
        }
        Ok(Self {
            batch: dims[0],
            channels: dims[1],
            spatial: dims[2..].iter().product(),
            groups,
        })
    }
    fn per_group(&self) -> usize {
        self.channels / self.groups
    }
    fn group_len(&self) -> usize {
        self.per_group() * self.spatial
    }
    fn n_groups(&self) -> usize {
        self.batch * self.groups
    }
    fn elems(&self) -> usize {
        self.batch * self.channels * self.spatial
    }
}

fn contiguous_range(layout: &Layout, what: &str) -> Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("group_norm: {what} is not contiguous")))
}

// ---------------------------------------------------------------------------------------------
// The three custom ops.

/// x -> stats `[B, G, 2]`.
struct GroupNormStats {
    groups: usize,
    eps: f64,
}

/// (x, stats) -> y; backward: the input gradient through [`GroupNormBackward`].
struct GroupNormForward {
    groups: usize,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
}

/// (dy, x, stats) -> dx.
struct GroupNormBackward {
    groups: usize,
    weight: Option<Tensor>,
}

impl CustomOp1 for GroupNormStats {
    fn name(&self) -> &'static str {
        "group-norm-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l, self.groups)?;
        let (o1, o2) = contiguous_range(l, "the input")?;
        let stats = match s {
            CpuStorage::F16(x) => CpuStorage::F32(cpu::stats::<_, f32>(&x[o1..o2], g, self.eps)),
            CpuStorage::BF16(x) => CpuStorage::F32(cpu::stats::<_, f32>(&x[o1..o2], g, self.eps)),
            CpuStorage::F32(x) => CpuStorage::F32(cpu::stats::<_, f32>(&x[o1..o2], g, self.eps)),
            CpuStorage::F64(x) => CpuStorage::F64(cpu::stats::<_, f64>(&x[o1..o2], g, self.eps)),
            other => candle_core::bail!("group_norm: unsupported dtype {:?}", other.dtype()),
        };
        Ok((stats, Shape::from((g.batch, g.groups, 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = Geometry::new(l, self.groups)?;
        Ok((
            cuda::stats(s, l, g, self.eps)?,
            Shape::from((g.batch, g.groups, 2)),
        ))
    }
}

impl CustomOp2 for GroupNormForward {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(xl, self.groups)?;
        let (o1, o2) = contiguous_range(xl, "the input")?;
        let (s1, s2) = contiguous_range(sl, "the statistics")?;
        let w = self.weight.as_ref().map(Tensor::storage_and_layout);
        let b = self.bias.as_ref().map(Tensor::storage_and_layout);
        let w = w.as_ref().map(|(s, l)| cpu::param(s, l)).transpose()?;
        let b = b.as_ref().map(|(s, l)| cpu::param(s, l)).transpose()?;
        let y = match (xs, ss) {
            (CpuStorage::F16(x), CpuStorage::F32(st)) => CpuStorage::F16(cpu::apply(
                &x[o1..o2],
                &st[s1..s2],
                cpu::slice(w)?,
                cpu::slice(b)?,
                g,
            )),
            (CpuStorage::BF16(x), CpuStorage::F32(st)) => CpuStorage::BF16(cpu::apply(
                &x[o1..o2],
                &st[s1..s2],
                cpu::slice(w)?,
                cpu::slice(b)?,
                g,
            )),
            (CpuStorage::F32(x), CpuStorage::F32(st)) => CpuStorage::F32(cpu::apply(
                &x[o1..o2],
                &st[s1..s2],
                cpu::slice(w)?,
                cpu::slice(b)?,
                g,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(st)) => CpuStorage::F64(cpu::apply(
                &x[o1..o2],
                &st[s1..s2],
                cpu::slice(w)?,
                cpu::slice(b)?,
                g,
            )),
            (x, st) => candle_core::bail!(
                "group_norm: unsupported dtypes {:?} (input) {:?} (statistics)",
                x.dtype(),
                st.dtype()
            ),
        };
        Ok((y, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = Geometry::new(xl, self.groups)?;
        let w = self.weight.as_ref().map(Tensor::storage_and_layout);
        let b = self.bias.as_ref().map(Tensor::storage_and_layout);
        let w = w.as_ref().map(|(s, l)| cuda::param(s, l)).transpose()?;
        let b = b.as_ref().map(|(s, l)| cuda::param(s, l)).transpose()?;
        Ok((cuda::apply(xs, xl, ss, sl, w, b, g)?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        stats: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = group_norm_input_grad(grad, x, stats, self.weight.as_ref(), self.groups)?;
        Ok((Some(dx), None))
    }
}

impl CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "group-norm-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(xl, self.groups)?;
        if gl.dims() != xl.dims() {
            candle_core::bail!(
                "group_norm backward: gradient {:?} vs input {:?}",
                gl.dims(),
                xl.dims()
            )
        }
        let (d1, d2) = contiguous_range(gl, "the gradient")?;
        let (o1, o2) = contiguous_range(xl, "the input")?;
        let (s1, s2) = contiguous_range(sl, "the statistics")?;
        let w = self.weight.as_ref().map(Tensor::storage_and_layout);
        let w = w.as_ref().map(|(s, l)| cpu::param(s, l)).transpose()?;
        let dx = match (gs, xs, ss) {
            (CpuStorage::F16(dy), CpuStorage::F16(x), CpuStorage::F32(st)) => CpuStorage::F16(
                cpu::backward(&dy[d1..d2], &x[o1..o2], &st[s1..s2], cpu::slice(w)?, g),
            ),
            (CpuStorage::BF16(dy), CpuStorage::BF16(x), CpuStorage::F32(st)) => {
                CpuStorage::BF16(cpu::backward(
                    &dy[d1..d2],
                    &x[o1..o2],
                    &st[s1..s2],
                    cpu::slice(w)?,
                    g,
                ))
            }
            (CpuStorage::F32(dy), CpuStorage::F32(x), CpuStorage::F32(st)) => CpuStorage::F32(
                cpu::backward(&dy[d1..d2], &x[o1..o2], &st[s1..s2], cpu::slice(w)?, g),
            ),
            (CpuStorage::F64(dy), CpuStorage::F64(x), CpuStorage::F64(st)) => CpuStorage::F64(
                cpu::backward(&dy[d1..d2], &x[o1..o2], &st[s1..s2], cpu::slice(w)?, g),
            ),
            (dy, x, st) => candle_core::bail!(
                "group_norm backward: unsupported dtypes {:?} (gradient) {:?} (input) {:?} (statistics)",
                dy.dtype(),
                x.dtype(),
                st.dtype()
            ),
        };
        Ok((dx, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = Geometry::new(xl, self.groups)?;
        if gl.dims() != xl.dims() {
            candle_core::bail!(
                "group_norm backward: gradient {:?} vs input {:?}",
                gl.dims(),
                xl.dims()
            )
        }
        let w = self.weight.as_ref().map(Tensor::storage_and_layout);
        let w = w.as_ref().map(|(s, l)| cuda::param(s, l)).transpose()?;
        Ok((
            cuda::backward(gs, gl, xs, xl, ss, sl, w, g)?,
            xl.shape().clone(),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// CPU loops.

mod cpu {
    use super::Geometry;
    use candle_core::backend::BackendStorage;
    use candle_core::{CpuStorage, Layout, Result, Storage, WithDType};
    use std::ops::{Add, AddAssign, Div, Mul, Sub};

    /// The accumulation type: f32, or f64 for f64 inputs.
    pub(super) trait Acc:
        Copy
        + Send
        + Sync
        + Add<Output = Self>
        + Sub<Output = Self>
        + Mul<Output = Self>
        + Div<Output = Self>
        + AddAssign
        + WithDType
    {
        fn sqrt(self) -> Self;
        fn of(v: f64) -> Self;
        fn of_usize(v: usize) -> Self;
        fn load<T: WithDType>(v: T) -> Self;
        fn store<T: WithDType>(self) -> T;
    }

    impl Acc for f32 {
        fn sqrt(self) -> Self {
            f32::sqrt(self)
        }
        fn of(v: f64) -> Self {
            v as f32
        }
        fn of_usize(v: usize) -> Self {
            v as f32
        }
        #[inline(always)]
        fn load<T: WithDType>(v: T) -> Self {
            v.to_f64() as f32
        }
        #[inline(always)]
        fn store<T: WithDType>(self) -> T {
            T::from_f64(self as f64)
        }
    }

    impl Acc for f64 {
        fn sqrt(self) -> Self {
            f64::sqrt(self)
        }
        fn of(v: f64) -> Self {
            v
        }
        fn of_usize(v: usize) -> Self {
            v as f64
        }
        #[inline(always)]
        fn load<T: WithDType>(v: T) -> Self {
            v.to_f64()
        }
        #[inline(always)]
        fn store<T: WithDType>(self) -> T {
            T::from_f64(self)
        }
    }

    /// A parameter's storage and element range.
    pub(super) type Param<'a> = (&'a CpuStorage, usize, usize);

    pub(super) fn param<'a>(s: &'a Storage, l: &Layout) -> Result<Param<'a>> {
        let (o1, o2) = super::contiguous_range(l, "an affine parameter")?;
        match s {
            Storage::Cpu(c) => Ok((c, o1, o2)),
            _ => candle_core::bail!(
                "group_norm: the affine parameters are not on the CPU like the input"
            ),
        }
    }

    pub(super) fn slice<T: WithDType>(p: Option<Param<'_>>) -> Result<Option<&[T]>> {
        p.map(|(s, o1, o2)| {
            T::cpu_storage_as_slice(s).map(|v| &v[o1..o2]).map_err(|_| {
                candle_core::Error::Msg(format!(
                    "group_norm: affine parameter dtype {:?}, input {:?}",
                    s.dtype(),
                    T::DTYPE
                ))
            })
        })
        .transpose()
    }

    /// Runs `f(first_group, chunk)` over `out` split into runs of whole groups (each `group_len`
    /// long), on up to `available_parallelism` scoped threads; one thread for small inputs.
    fn for_groups<T: Send>(
        out: &mut [T],
        group_len: usize,
        n_groups: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        let threads = if out.len() < 1 << 15 {
            1
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(n_groups)
        };
        if threads <= 1 || group_len == 0 {
            f(0, out);
            return;
        }
        let per_thread = n_groups.div_ceil(threads);
        std::thread::scope(|scope| {
            for (i, chunk) in out.chunks_mut(per_thread * group_len).enumerate() {
                let f = &f;
                scope.spawn(move || f(i * per_thread, chunk));
            }
        });
    }

    /// Elements per block whose partial sum is taken in `A` (8 lanes, so the loops vectorize);
    /// block sums are added in f64, so the error does not grow with the group's size.
    const BLOCK: usize = 4096;

    /// Σ f(a[i], b[i]) over one block, in 8 independent lanes.
    #[inline(always)]
    fn lane_sum<T: WithDType, A: Acc>(a: &[T], b: &[T], f: impl Fn(A, A) -> A) -> A {
        let mut lanes = [A::of(0.0); 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (xa, xb) in ca.zip(cb) {
            for l in 0..8 {
                lanes[l] += f(A::load(xa[l]), A::load(xb[l]));
            }
        }
        let mut tail = A::of(0.0);
        for (&va, &vb) in ra.iter().zip(rb) {
            tail += f(A::load(va), A::load(vb));
        }
        ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
            + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
            + tail
    }

    /// Σ f(a[i], b[i]) over a whole row or group: [`lane_sum`] per block, blocks added in f64.
    fn sum<T: WithDType, A: Acc>(a: &[T], b: &[T], f: impl Fn(A, A) -> A + Copy) -> f64 {
        a.chunks(BLOCK)
            .zip(b.chunks(BLOCK))
            .map(|(a, b)| lane_sum::<T, A>(a, b, f).to_f64())
            .sum()
    }

    /// Mean and 1/sqrt(var + eps) of one group: two passes (the mean, then the squared
    /// deviations from it), as the CUDA kernel does.
    fn group_stats<T: WithDType, A: Acc>(x: &[T], eps: f64) -> (A, A) {
        let n = x.len() as f64;
        let mean = A::of(sum::<T, A>(x, x, |v, _| v) / n);
        let var = sum::<T, A>(x, x, |v, _| {
            let d = v - mean;
            d * d
        }) / n;
        (mean, A::of(1.0) / (A::of(var) + A::of(eps)).sqrt())
    }

    pub(super) fn stats<T: WithDType, A: Acc>(x: &[T], g: Geometry, eps: f64) -> Vec<A> {
        let mut out = vec![A::of(0.0); 2 * g.n_groups()];
        let len = g.group_len();
        for_groups(&mut out, 2, g.n_groups(), |first, chunk| {
            for (k, st) in chunk.chunks_mut(2).enumerate() {
                let bg = first + k;
                let (mean, rstd) = group_stats::<T, A>(&x[bg * len..(bg + 1) * len], eps);
                st[0] = mean;
                st[1] = rstd;
            }
        });
        out
    }

    /// The channel index of row `r` (0-based within the group) of group `bg`.
    fn channel(g: Geometry, bg: usize, r: usize) -> usize {
        (bg % g.groups) * g.per_group() + r
    }

    pub(super) fn apply<T: WithDType, A: Acc>(
        x: &[T],
        stats: &[A],
        w: Option<&[T]>,
        b: Option<&[T]>,
        g: Geometry,
    ) -> Vec<T> {
        let len = g.group_len();
        let mut y = vec![T::from_f64(0.0); g.elems()];
        for_groups(&mut y, len, g.n_groups(), |first, chunk| {
            for (k, yg) in chunk.chunks_mut(len.max(1)).enumerate() {
                let bg = first + k;
                let (mean, rstd) = (stats[2 * bg], stats[2 * bg + 1]);
                let xg = &x[bg * len..(bg + 1) * len];
                for (r, (yr, xr)) in yg
                    .chunks_mut(g.spatial.max(1))
                    .zip(xg.chunks(g.spatial.max(1)))
                    .enumerate()
                {
                    let c = channel(g, bg, r);
                    let scale = w.map_or(rstd, |w| rstd * A::load(w[c]));
                    let shift = b.map_or(A::of(0.0), |b| A::load(b[c])) - mean * scale;
                    for (o, &v) in yr.iter_mut().zip(xr) {
                        *o = (A::load(v) * scale + shift).store();
                    }
                }
            }
        });
        y
    }

    pub(super) fn backward<T: WithDType, A: Acc>(
        dy: &[T],
        x: &[T],
        stats: &[A],
        w: Option<&[T]>,
        g: Geometry,
    ) -> Vec<T> {
        let len = g.group_len();
        let n = A::of_usize(len);
        let mut dx = vec![T::from_f64(0.0); g.elems()];
        let sp = g.spatial.max(1);
        for_groups(&mut dx, len, g.n_groups(), |first, chunk| {
            for (k, dxg) in chunk.chunks_mut(len.max(1)).enumerate() {
                let bg = first + k;
                let (mean, rstd) = (stats[2 * bg], stats[2 * bg + 1]);
                let xg = &x[bg * len..(bg + 1) * len];
                let dyg = &dy[bg * len..(bg + 1) * len];
                // mean(dy·w) and mean(dy·w·x̂) over the group (x̂'s rstd applied after).
                let (mut s1, mut s2) = (0.0f64, 0.0f64);
                for (r, (xr, dr)) in xg.chunks(sp).zip(dyg.chunks(sp)).enumerate() {
                    let r1 = sum::<T, A>(dr, dr, |d, _| d);
                    let r2 = sum::<T, A>(xr, dr, |xv, d| d * (xv - mean));
                    let wc = w.map_or(1.0, |w| w[channel(g, bg, r)].to_f64());
                    s1 += r1 * wc;
                    s2 += r2 * wc;
                }
                let (s1, s2) = (A::of(s1), A::of(s2));
                let m1 = s1 / n;
                let m2 = s2 * rstd / n;
                for (r, ((dxr, xr), dr)) in dxg
                    .chunks_mut(sp)
                    .zip(xg.chunks(sp))
                    .zip(dyg.chunks(sp))
                    .enumerate()
                {
                    let wc = w.map_or(A::of(1.0), |w| A::load(w[channel(g, bg, r)]));
                    for ((o, &xv), &dv) in dxr.iter_mut().zip(xr).zip(dr) {
                        let xhat = (A::load(xv) - mean) * rstd;
                        *o = (rstd * (A::load(dv) * wc - m1 - xhat * m2)).store();
                    }
                }
            }
        });
        dx
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA launches.

#[cfg(feature = "cuda")]
mod cuda {
    use super::Geometry;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result, Storage};

    /// nvcc's PTX for `group_norm.cu` (see its header for the command).
    const PTX: &str = include_str!("group_norm.ptx");
    const MODULE: &str = "diffexplainer_group_norm";

    /// A parameter's storage and layout on the GPU.
    pub(super) type Param<'a> = (&'a CudaStorage, &'a Layout);

    pub(super) fn param<'a>(s: &'a Storage, l: &'a Layout) -> Result<Param<'a>> {
        match s {
            Storage::Cuda(c) => Ok((c, l)),
            _ => candle_core::bail!(
                "group_norm: the affine parameters are not on the GPU like the input"
            ),
        }
    }

    fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> Result<CudaView<'a, T>> {
        let (o1, o2) = super::contiguous_range(l, what)?;
        let slice = s.as_cuda_slice::<T>().map_err(|_| {
            candle_core::Error::Msg(format!(
                "group_norm: {what} has dtype {:?}, expected the input's",
                s.dtype()
            ))
        })?;
        Ok(slice.slice(o1..o2))
    }

    fn param_view<'a, T: CudaDType>(
        p: Option<Param<'a>>,
        what: &str,
    ) -> Result<Option<CudaView<'a, T>>> {
        p.map(|(s, l)| view::<T>(s, l, what)).transpose()
    }

    /// Threads per block for the per-group reductions (a multiple of 32, at most 1024).
    fn reduce_block(group_len: usize) -> u32 {
        if group_len >= 1 << 16 {
            1024
        } else if group_len >= 1 << 12 {
            256
        } else {
            64
        }
    }

    /// Grid (rows = B*C, spatial chunks) for the elementwise kernels.
    fn rows_config(g: Geometry) -> LaunchConfig {
        const BLOCK: usize = 256;
        LaunchConfig {
            grid_dim: (
                (g.batch * g.channels) as u32,
                g.spatial.div_ceil(BLOCK).clamp(1, 65535) as u32,
                1,
            ),
            block_dim: (BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn check_grid(g: Geometry) -> Result<()> {
        if g.elems() == 0 || g.batch * g.channels > i32::MAX as usize {
            candle_core::bail!("group_norm (CUDA): unsupported size {g:?}")
        }
        Ok(())
    }

    /// Dispatches on the input's dtype: `$f::<T, A>(suffix)`.
    macro_rules! dispatch {
        ($slice:expr, $f:ident, $($arg:expr),*) => {
            match $slice {
                CudaStorageSlice::F16(s) => $f::<_, f32>(s, "f16", $($arg),*),
                CudaStorageSlice::BF16(s) => $f::<_, f32>(s, "bf16", $($arg),*),
                CudaStorageSlice::F32(s) => $f::<_, f32>(s, "f32", $($arg),*),
                CudaStorageSlice::F64(s) => $f::<_, f64>(s, "f64", $($arg),*),
                _ => candle_core::bail!("group_norm (CUDA): unsupported dtype"),
            }
        };
    }

    pub(super) fn stats(s: &CudaStorage, l: &Layout, g: Geometry, eps: f64) -> Result<CudaStorage> {
        check_grid(g)?;
        fn launch<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr + ValidAsZeroBits>(
            x: &CudaSlice<T>,
            suffix: &str,
            dev: &CudaDevice,
            l: &Layout,
            g: Geometry,
            eps: f64,
        ) -> Result<CudaStorage> {
            let (o1, o2) = super::contiguous_range(l, "the input")?;
            let x = x.slice(o1..o2);
            let out = unsafe { dev.alloc::<A>(2 * g.n_groups())? };
            let f = dev.get_or_load_custom_func(&format!("gn_stats_{suffix}"), MODULE, PTX)?;
            let group_len = g.group_len() as i64;
            let mut b = f.builder();
            b.arg(&x);
            b.arg(&out);
            b.arg(&group_len);
            b.arg(&eps);
            let cfg = LaunchConfig {
                grid_dim: (g.n_groups() as u32, 1, 1),
                block_dim: (reduce_block(g.group_len()), 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        let dev = &s.device;
        dispatch!(&s.slice, launch, dev, l, g, eps)
    }

    pub(super) fn apply(
        xs: &CudaStorage,
        xl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
        w: Option<Param<'_>>,
        b: Option<Param<'_>>,
        g: Geometry,
    ) -> Result<CudaStorage> {
        check_grid(g)?;
        #[allow(clippy::too_many_arguments)]
        fn launch<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr + ValidAsZeroBits>(
            x: &CudaSlice<T>,
            suffix: &str,
            dev: &CudaDevice,
            xl: &Layout,
            ss: &CudaStorage,
            sl: &Layout,
            w: Option<Param<'_>>,
            b: Option<Param<'_>>,
            g: Geometry,
        ) -> Result<CudaStorage> {
            let (o1, o2) = super::contiguous_range(xl, "the input")?;
            let x = x.slice(o1..o2);
            let st = view::<A>(ss, sl, "the statistics")?;
            let w = param_view::<T>(w, "the weight")?;
            let bias = param_view::<T>(b, "the bias")?;
            let out = unsafe { dev.alloc::<T>(g.elems())? };
            let f = dev.get_or_load_custom_func(&format!("gn_apply_{suffix}"), MODULE, PTX)?;
            let (c, pg, sp) = (g.channels as i64, g.per_group() as i64, g.spatial as i64);
            let null = 0u64;
            let mut bld = f.builder();
            bld.arg(&x);
            bld.arg(&st);
            match &w {
                Some(w) => bld.arg(w),
                None => bld.arg(&null),
            };
            match &bias {
                Some(b) => bld.arg(b),
                None => bld.arg(&null),
            };
            bld.arg(&out);
            bld.arg(&c);
            bld.arg(&pg);
            bld.arg(&sp);
            unsafe { bld.launch(rows_config(g)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        let dev = &xs.device;
        dispatch!(&xs.slice, launch, dev, xl, ss, sl, w, b, g)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        gs: &CudaStorage,
        gl: &Layout,
        xs: &CudaStorage,
        xl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
        w: Option<Param<'_>>,
        g: Geometry,
    ) -> Result<CudaStorage> {
        check_grid(g)?;
        #[allow(clippy::too_many_arguments)]
        fn launch<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr + ValidAsZeroBits>(
            x: &CudaSlice<T>,
            suffix: &str,
            dev: &CudaDevice,
            xl: &Layout,
            gs: &CudaStorage,
            gl: &Layout,
            ss: &CudaStorage,
            sl: &Layout,
            w: Option<Param<'_>>,
            g: Geometry,
        ) -> Result<CudaStorage> {
            let (o1, o2) = super::contiguous_range(xl, "the input")?;
            let x = x.slice(o1..o2);
            let dy = view::<T>(gs, gl, "the gradient")?;
            let st = view::<A>(ss, sl, "the statistics")?;
            let w = param_view::<T>(w, "the weight")?;
            let red = unsafe { dev.alloc::<A>(2 * g.n_groups())? };
            let (c, pg, sp) = (g.channels as i64, g.per_group() as i64, g.spatial as i64);
            let null = 0u64;
            {
                let f = dev.get_or_load_custom_func(
                    &format!("gn_backward_reduce_{suffix}"),
                    MODULE,
                    PTX,
                )?;
                let mut bld = f.builder();
                bld.arg(&dy);
                bld.arg(&x);
                bld.arg(&st);
                match &w {
                    Some(w) => bld.arg(w),
                    None => bld.arg(&null),
                };
                bld.arg(&red);
                bld.arg(&c);
                bld.arg(&pg);
                bld.arg(&sp);
                let cfg = LaunchConfig {
                    grid_dim: (g.n_groups() as u32, 1, 1),
                    block_dim: (reduce_block(g.group_len()), 1, 1),
                    shared_mem_bytes: 0,
                };
                unsafe { bld.launch(cfg) }.w()?;
            }
            let out = unsafe { dev.alloc::<T>(g.elems())? };
            let f =
                dev.get_or_load_custom_func(&format!("gn_backward_apply_{suffix}"), MODULE, PTX)?;
            let mut bld = f.builder();
            bld.arg(&dy);
            bld.arg(&x);
            bld.arg(&st);
            match &w {
                Some(w) => bld.arg(w),
                None => bld.arg(&null),
            };
            bld.arg(&red);
            bld.arg(&out);
            bld.arg(&c);
            bld.arg(&pg);
            bld.arg(&sp);
            unsafe { bld.launch(rows_config(g)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        let dev = &xs.device;
        dispatch!(&xs.slice, launch, dev, xl, gs, gl, ss, sl, w, g)
    }
}
