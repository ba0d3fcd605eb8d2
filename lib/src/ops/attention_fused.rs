//! Fused attention (FlashAttention-2 style): one custom op for the forward, one for the
//! backward, no score matrix in memory at all.
//!
//! Forward, per query row `i`, over key tiles of [`BK`] keys: scores in base 2,
//! `s2_ij = (q_i·k_j)·scale·log2 e` (−∞ where causal hides key `j > i`), running maximum `m`,
//! running sum `l` and running output `acc` rescaled by `2^(m_old − m_new)` once per tile
//! (online softmax); at the end `o_i = acc / l` and the base-2 log-sum-exp
//! `lse2_i = m + log2 l` is kept for the backward. Backward from q, k, v, o, dO and lse2:
//! `D_i = Σ_c dO_ic·o_ic`, `p_ij = 2^(s2_ij − lse2_i)`, `dp_ij = dO_i·v_j`,
//! `ds_ij = p_ij (dp_ij − D_i)`; `dv_j = Σ_i p_ij dO_i` and `dk_j = scale·Σ_i ds_ij q_i` (one pass
//! over query tiles per key), `dq_i = scale·Σ_j ds_ij k_j` (one pass over key tiles per query):
//! no atomics, scores recomputed twice.
//!
//! CUDA: the kernels in `attention.cu` (f16/bf16/f32 inputs, f32 arithmetic, head dim <= 160),
//! shipped as PTX like the group norm's. CPU: the same tiled algorithm in plain loops
//! (f32 arithmetic, f64 for f64 inputs); it is the executable statement of what the kernels
//! compute, tested against the composed path, and it is never picked by
//! [`super::scaled_dot_product_attention`] on the CPU.
//!
//! Each op returns one flat tensor: the forward `[o (b·h·q_len·d, padded to a whole number of
//! f32/f64 slots) | lse2 (b·h·q_len values of the accumulation type, stored bit for bit)]`,
//! the backward `[dq | dk | dv]`; the callers take contiguous views of them.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Keys per tile of the forward and the dq pass (the kernels' `BK`; the CPU uses the same).
pub const BK: usize = 32;
/// The largest head dimension the CUDA kernels take.
pub const MAX_HEAD_DIM_CUDA: usize = 160;

/// Which implementation the memory-efficient branch of [`super::scaled_dot_product_attention`]
/// uses on CUDA devices; see [`AttentionImpl::from_env`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionImpl {
    /// Block-wise tensor ops with a recomputing backward (default, the measured path).
    Blockwise,
    /// The fused kernels of this module (opt-in until a GPU has run them).
    Fused,
}

impl AttentionImpl {
    pub const ENV: &'static str = "DIFFEXPLAINER_ATTENTION";

    /// The implementation named by `DIFFEXPLAINER_ATTENTION`, read once per process: unset,
    /// empty or `blockwise` (default), or `fused`. Any other value is an error naming the valid
    /// ones. Only consulted for CUDA tensors; the CPU always runs the block-wise path.
    pub fn from_env() -> Result<Self> {
        static CHOICE: std::sync::OnceLock<std::result::Result<AttentionImpl, String>> =
            std::sync::OnceLock::new();
        CHOICE
            .get_or_init(|| {
                super::env_choice(
                    Self::ENV,
                    &[("blockwise", Self::Blockwise), ("fused", Self::Fused)],
                )
            })
            .clone()
            .map_err(candle_core::Error::Msg)
    }
}

/// Whether [`fused_attention`] takes these inputs on their device (dtype, head dims).
pub fn fused_supported(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let dims_ok = match (q.dims4(), k.dims4(), v.dims4()) {
        (Ok((b, h, _, d)), Ok((kb, kh, kl, kd)), Ok((vb, vh, vl, vd))) => {
            (b, h, d) == (kb, kh, kd) && (b, h, kl, d) == (vb, vh, vl, vd) && d > 0
        }
        _ => false,
    };
    let same_dtype = q.dtype() == k.dtype() && q.dtype() == v.dtype();
    dims_ok
        && same_dtype
        && if q.device().is_cuda() {
            matches!(q.dtype(), DType::F16 | DType::BF16 | DType::F32)
                && q.dim(3).is_ok_and(|d| d <= MAX_HEAD_DIM_CUDA)
        } else {
            matches!(
                q.dtype(),
                DType::F16 | DType::BF16 | DType::F32 | DType::F64
            )
        }
}

/// `softmax(q kᵀ·scale [+ causal]) v` through the fused ops, differentiable in q, k and v.
/// `q` `[b, h, q_len, d]`, `k` and `v` `[b, h, k_len, d]`; `scale` defaults to `1/sqrt(d)`.
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: Option<f64>,
) -> Result<Tensor> {
    if !fused_supported(q, k, v) {
        candle_core::bail!(
            "fused attention: unsupported inputs q {:?} k {:?} v {:?} {:?} on {:?}",
            q.dims(),
            k.dims(),
            v.dims(),
            q.dtype(),
            q.device().location()
        )
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (b, h, q_len, d) = q.dims4()?;
    let k_len = k.dim(2)?;
    let g = Geometry {
        bh: b * h,
        q_len,
        k_len,
        d,
        causal,
        scale: scale.unwrap_or(1.0 / (d as f64).sqrt()),
    };
    let packed = q
        .detach()
        .apply_op3_no_bwd(&k.detach(), &v.detach(), &FusedForward { g })?;
    let y = packed
        .narrow(0, 0, g.q_elems())?
        .reshape((b, h, q_len, d))?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(y);
    }
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    super::frozen::attach3(&q, &k, &v, y, move |grad| {
        let (dq, dk, dv) = fused_attention_backward(&qd, &kd, &vd, &packed, grad, g)?;
        Ok((
            dq.reshape((b, h, q_len, d))?,
            dk.reshape((b, h, k_len, d))?,
            dv.reshape((b, h, k_len, d))?,
        ))
    })
}

/// The output and the base-2 log-sum-exp per row (`[b, h, q_len]`, f32; f64 for f64 inputs) of
/// the fused forward. Exposed for tests.
#[doc(hidden)]
pub fn fused_attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: Option<f64>,
) -> Result<(Tensor, Tensor)> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (b, h, q_len, d) = q.dims4()?;
    let g = Geometry {
        bh: b * h,
        q_len,
        k_len: k.dim(2)?,
        d,
        causal,
        scale: scale.unwrap_or(1.0 / (d as f64).sqrt()),
    };
    let packed = q.apply_op3_no_bwd(&k, &v, &FusedForward { g })?;
    let y = packed
        .narrow(0, 0, g.q_elems())?
        .reshape((b, h, q_len, d))?;
    let lse = lse_of_packed(&packed, g)?.reshape((b, h, q_len))?;
    Ok((y, lse))
}

/// The lse2 values of a packed forward result, as a tensor of the accumulation type (a copy;
/// tests only).
fn lse_of_packed(packed: &Tensor, g: Geometry) -> Result<Tensor> {
    let tail = packed
        .narrow(
            0,
            g.o_slots_padded(packed.dtype()),
            g.lse_slots(packed.dtype()),
        )?
        .to_device(&candle_core::Device::Cpu)?
        .contiguous()?;
    let rows = g.rows();
    let (storage, layout) = tail.storage_and_layout();
    let (o1, o2) = contiguous_range(layout, "the log-sum-exp")?;
    let cpu = candle_core::Device::Cpu;
    match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F64(v)) => {
            Tensor::from_vec(v[o1..o2].to_vec(), rows, &cpu)
        }
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => {
            Tensor::from_vec(v[o1..o2].to_vec(), rows, &cpu)
        }
        candle_core::Storage::Cpu(CpuStorage::F16(v)) => {
            Tensor::from_vec(cpu::bits_to::<_, f32>(&v[o1..o2], rows), rows, &cpu)
        }
        candle_core::Storage::Cpu(CpuStorage::BF16(v)) => {
            Tensor::from_vec(cpu::bits_to::<_, f32>(&v[o1..o2], rows), rows, &cpu)
        }
        _ => candle_core::bail!("fused attention: unsupported dtype {:?}", packed.dtype()),
    }
}

/// dq, dk, dv (flat) from the packed forward result and the output gradient.
fn fused_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    packed: &Tensor,
    grad: &Tensor,
    g: Geometry,
) -> Result<(Tensor, Tensor, Tensor)> {
    let grad = grad.to_dtype(q.dtype())?.contiguous()?;
    let flat = grad.apply_op1_no_bwd(&FusedBackward {
        g,
        q: q.clone(),
        k: k.clone(),
        v: v.clone(),
        packed: packed.clone(),
    })?;
    let (nq, nk) = (g.q_elems(), g.k_elems());
    Ok((
        flat.narrow(0, 0, nq)?,
        flat.narrow(0, nq, nk)?,
        flat.narrow(0, nq + nk, nk)?,
    ))
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    bh: usize,
    q_len: usize,
    k_len: usize,
    d: usize,
    causal: bool,
    scale: f64,
}

impl Geometry {
    fn q_elems(&self) -> usize {
        self.bh * self.q_len * self.d
    }
    fn k_elems(&self) -> usize {
        self.bh * self.k_len * self.d
    }
    fn rows(&self) -> usize {
        self.bh * self.q_len
    }
    /// Elements of the input dtype per stored lse2 value (f32 for f16/bf16/f32, f64 for f64).
    fn per_lse(dtype: DType) -> usize {
        match dtype {
            DType::F16 | DType::BF16 => 2,
            _ => 1,
        }
    }
    fn o_slots_padded(&self, dtype: DType) -> usize {
        self.q_elems().next_multiple_of(Self::per_lse(dtype))
    }
    fn lse_slots(&self, dtype: DType) -> usize {
        self.rows() * Self::per_lse(dtype)
    }
    fn packed_len(&self, dtype: DType) -> usize {
        self.o_slots_padded(dtype) + self.lse_slots(dtype)
    }
    fn check(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<()> {
        if q.shape().elem_count() != self.q_elems()
            || k.shape().elem_count() != self.k_elems()
            || v.shape().elem_count() != self.k_elems()
        {
            candle_core::bail!(
                "fused attention: q {:?} k {:?} v {:?} do not match {self:?}",
                q.dims(),
                k.dims(),
                v.dims()
            )
        }
        Ok(())
    }
}

fn contiguous_range(layout: &Layout, what: &str) -> Result<(usize, usize)> {
    layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!("fused attention: {what} is not contiguous"))
    })
}

/// (q, k, v) -> `[o | lse2]` flat.
struct FusedForward {
    g: Geometry,
}

/// dO -> `[dq | dk | dv]` flat, with q, k, v and the packed forward result held.
struct FusedBackward {
    g: Geometry,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    packed: Tensor,
}

impl CustomOp3 for FusedForward {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        g.check(ql, kl, vl)?;
        let (q1, q2) = contiguous_range(ql, "q")?;
        let (k1, k2) = contiguous_range(kl, "k")?;
        let (v1, v2) = contiguous_range(vl, "v")?;
        macro_rules! run {
            ($q:expr, $k:expr, $v:expr, $variant:ident, $acc:ty) => {{
                CpuStorage::$variant(cpu::forward_packed::<_, $acc>(
                    &$q[q1..q2],
                    &$k[k1..k2],
                    &$v[v1..v2],
                    g,
                ))
            }};
        }
        let out = match (qs, ks, vs) {
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => run!(q, k, v, F16, f32),
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                run!(q, k, v, BF16, f32)
            }
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => run!(q, k, v, F32, f32),
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => run!(q, k, v, F64, f64),
            (q, _, _) => {
                candle_core::bail!("fused attention: unsupported dtypes ({:?} q)", q.dtype())
            }
        };
        Ok((out, Shape::from(g.packed_len(qs.dtype()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.g;
        g.check(ql, kl, vl)?;
        Ok((
            cuda::forward(qs, ql, ks, kl, vs, vl, g)?,
            Shape::from(g.packed_len(qs.dtype())),
        ))
    }
}

impl CustomOp1 for FusedBackward {
    fn name(&self) -> &'static str {
        "fused-attention-backward"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let (qs, ql) = self.q.storage_and_layout();
        let (ks, kl) = self.k.storage_and_layout();
        let (vs, vl) = self.v.storage_and_layout();
        let (ps, pl) = self.packed.storage_and_layout();
        g.check(ql, kl, vl)?;
        fn cpu(s: &candle_core::Storage) -> Result<&CpuStorage> {
            match s {
                candle_core::Storage::Cpu(c) => Ok(c),
                _ => candle_core::bail!("fused attention backward: inputs on different devices"),
            }
        }
        let (qs, ks, vs, ps) = (cpu(&qs)?, cpu(&ks)?, cpu(&vs)?, cpu(&ps)?);
        let r = |l: &Layout, w: &str| contiguous_range(l, w);
        let ((q1, q2), (k1, k2), (v1, v2), (p1, p2), (g1, g2)) = (
            r(ql, "q")?,
            r(kl, "k")?,
            r(vl, "v")?,
            r(pl, "the forward result")?,
            r(gl, "the output gradient")?,
        );
        macro_rules! run {
            ($q:expr, $k:expr, $v:expr, $p:expr, $dy:expr, $variant:ident, $acc:ty) => {{
                CpuStorage::$variant(cpu::backward_packed::<_, $acc>(
                    &$q[q1..q2],
                    &$k[k1..k2],
                    &$v[v1..v2],
                    &$p[p1..p2],
                    &$dy[g1..g2],
                    g,
                ))
            }};
        }
        use CpuStorage as C;
        let out = match (qs, ks, vs, ps, gs) {
            (C::F16(q), C::F16(k), C::F16(v), C::F16(p), C::F16(dy)) => {
                run!(q, k, v, p, dy, F16, f32)
            }
            (C::BF16(q), C::BF16(k), C::BF16(v), C::BF16(p), C::BF16(dy)) => {
                run!(q, k, v, p, dy, BF16, f32)
            }
            (C::F32(q), C::F32(k), C::F32(v), C::F32(p), C::F32(dy)) => {
                run!(q, k, v, p, dy, F32, f32)
            }
            (C::F64(q), C::F64(k), C::F64(v), C::F64(p), C::F64(dy)) => {
                run!(q, k, v, p, dy, F64, f64)
            }
            _ => candle_core::bail!("fused attention backward: mismatched or unsupported dtypes"),
        };
        Ok((out, Shape::from(g.q_elems() + 2 * g.k_elems())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.g;
        let (qs, ql) = self.q.storage_and_layout();
        let (ks, kl) = self.k.storage_and_layout();
        let (vs, vl) = self.v.storage_and_layout();
        let (ps, pl) = self.packed.storage_and_layout();
        g.check(ql, kl, vl)?;
        fn on_gpu(s: &candle_core::Storage) -> Result<&candle_core::CudaStorage> {
            match s {
                candle_core::Storage::Cuda(c) => Ok(c),
                _ => candle_core::bail!("fused attention backward: inputs on different devices"),
            }
        }
        let out = cuda::backward(
            (on_gpu(&qs)?, ql),
            (on_gpu(&ks)?, kl),
            (on_gpu(&vs)?, vl),
            (on_gpu(&ps)?, pl),
            (gs, gl),
            g,
        )?;
        Ok((out, Shape::from(g.q_elems() + 2 * g.k_elems())))
    }
}

// ---------------------------------------------------------------------------------------------
// CPU: the kernels' algorithm in plain loops (tests; never chosen on the CPU in production).

mod cpu {
    use super::{Geometry, BK};
    use candle_core::WithDType;
    use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Sub};

    /// The accumulation type: f32, or f64 for f64 inputs.
    pub(super) trait Acc:
        Copy
        + Default
        + PartialOrd
        + Add<Output = Self>
        + Sub<Output = Self>
        + Mul<Output = Self>
        + Div<Output = Self>
        + AddAssign
        + MulAssign
    {
        const NEG_INF: Self;
        const ZERO: Self;
        const ONE: Self;
        fn exp2(self) -> Self;
        fn log2(self) -> Self;
        fn of(v: f64) -> Self;
        fn load<T: WithDType>(v: T) -> Self;
        fn store<T: WithDType>(self) -> T;
        fn max(self, o: Self) -> Self {
            if o > self {
                o
            } else {
                self
            }
        }
    }

    macro_rules! acc {
        ($t:ty) => {
            impl Acc for $t {
                const NEG_INF: Self = <$t>::NEG_INFINITY;
                const ZERO: Self = 0.0;
                const ONE: Self = 1.0;
                fn exp2(self) -> Self {
                    <$t>::exp2(self)
                }
                fn log2(self) -> Self {
                    <$t>::log2(self)
                }
                fn of(v: f64) -> Self {
                    v as $t
                }
                #[inline(always)]
                fn load<T: WithDType>(v: T) -> Self {
                    v.to_f64() as $t
                }
                #[inline(always)]
                fn store<T: WithDType>(self) -> T {
                    T::from_f64(self as f64)
                }
            }
        };
    }
    acc!(f32);
    acc!(f64);

    /// Reads `n` values of type `A` stored bit for bit in a slice of `T`.
    pub(super) fn bits_to<T: Copy, A: Copy + Default>(src: &[T], n: usize) -> Vec<A> {
        assert!(std::mem::size_of_val(src) >= n * std::mem::size_of::<A>());
        let mut out = vec![A::default(); n];
        // SAFETY: both are plain floating-point types; sizes checked above.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr() as *const u8,
                out.as_mut_ptr() as *mut u8,
                n * std::mem::size_of::<A>(),
            )
        };
        out
    }

    fn bits_into<T: Copy, A: Copy>(dst: &mut [T], values: &[A]) {
        assert!(std::mem::size_of_val(dst) >= std::mem::size_of_val(values));
        // SAFETY: as above.
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr() as *const u8,
                dst.as_mut_ptr() as *mut u8,
                std::mem::size_of_val(values),
            )
        };
    }

    fn visible(g: &Geometry, i: usize, j: usize) -> bool {
        j < g.k_len && (!g.causal || j <= i)
    }

    /// `[o | lse2]` as the forward kernel writes it.
    pub(super) fn forward_packed<T: WithDType, A: Acc>(
        q: &[T],
        k: &[T],
        v: &[T],
        g: Geometry,
    ) -> Vec<T> {
        let d = g.d;
        let scale_log2 = A::of(g.scale * std::f64::consts::LOG2_E);
        let mut out = vec![T::zero(); g.packed_len(T::DTYPE)];
        let mut lse2 = vec![A::ZERO; g.rows()];
        let (mut qr, mut acc, mut s) = (vec![A::ZERO; d], vec![A::ZERO; d], [A::ZERO; BK]);
        for bh in 0..g.bh {
            let (kb, vb) = (bh * g.k_len * d, bh * g.k_len * d);
            for i in 0..g.q_len {
                let row = bh * g.q_len + i;
                for c in 0..d {
                    qr[c] = A::load(q[row * d + c]) * scale_log2;
                    acc[c] = A::ZERO;
                }
                let (mut m, mut l) = (A::NEG_INF, A::ZERO);
                for j0 in (0..g.k_len).step_by(BK) {
                    let mut tile_max = A::NEG_INF;
                    for (jj, sj) in s.iter_mut().enumerate() {
                        let j = j0 + jj;
                        *sj = if visible(&g, i, j) {
                            let mut dot = A::ZERO;
                            for c in 0..d {
                                dot += qr[c] * A::load(k[kb + j * d + c]);
                            }
                            dot
                        } else {
                            A::NEG_INF
                        };
                        tile_max = tile_max.max(*sj);
                    }
                    let m_new = m.max(tile_max);
                    if m_new == A::NEG_INF {
                        continue;
                    }
                    let alpha = (m - m_new).exp2();
                    l *= alpha;
                    acc.iter_mut().for_each(|a| *a *= alpha);
                    for (jj, &sj) in s.iter().enumerate() {
                        let p = (sj - m_new).exp2();
                        l += p;
                        if p == A::ZERO {
                            continue; // masked (or underflowed): nothing to add
                        }
                        let j = j0 + jj;
                        for c in 0..d {
                            acc[c] += p * A::load(v[vb + j * d + c]);
                        }
                    }
                    m = m_new;
                }
                let inv = A::ONE / l;
                for c in 0..d {
                    out[row * d + c] = (acc[c] * inv).store();
                }
                lse2[row] = m + l.log2();
            }
        }
        let start = g.o_slots_padded(T::DTYPE);
        bits_into(&mut out[start..], &lse2);
        out
    }

    /// `[dq | dk | dv]` as the backward kernels write them.
    pub(super) fn backward_packed<T: WithDType, A: Acc>(
        q: &[T],
        k: &[T],
        v: &[T],
        packed: &[T],
        dout: &[T],
        g: Geometry,
    ) -> Vec<T> {
        let d = g.d;
        let scale = A::of(g.scale);
        let scale_log2 = A::of(g.scale * std::f64::consts::LOG2_E);
        let o = &packed[..g.q_elems()];
        let lse2: Vec<A> = bits_to(&packed[g.o_slots_padded(T::DTYPE)..], g.rows());
        // D_i = Σ_c dO_ic·o_ic.
        let dvec: Vec<A> = (0..g.rows())
            .map(|r| {
                let mut s = A::ZERO;
                for c in 0..d {
                    s += A::load(dout[r * d + c]) * A::load(o[r * d + c]);
                }
                s
            })
            .collect();
        let (nq, nk) = (g.q_elems(), g.k_elems());
        let mut out = vec![T::zero(); nq + 2 * nk];
        let ld =
            |x: &[T], at: usize| -> Vec<A> { x[at..at + d].iter().map(|&e| A::load(e)).collect() };
        let dot = |a: &[A], b: &[A]| a.iter().zip(b).fold(A::ZERO, |s, (&x, &y)| s + x * y);
        for bh in 0..g.bh {
            let (qb, kb) = (bh * g.q_len, bh * g.k_len);
            // p_ij and ds_ij, recomputed as the kernels do.
            let p_ds = |i: usize, j: usize, qi: &[A], ki: &[A], doi: &[A], vj: &[A]| -> (A, A) {
                if !visible(&g, i, j) {
                    return (A::ZERO, A::ZERO);
                }
                let s2 = dot(qi, ki) * scale_log2;
                let p = (s2 - lse2[qb + i]).exp2();
                let dp = dot(doi, vj);
                (p, p * (dp - dvec[qb + i]))
            };
            // dk, dv: one pass over the queries per key (the dk/dv kernel).
            for j in 0..g.k_len {
                let (kj, vj) = (ld(k, (kb + j) * d), ld(v, (kb + j) * d));
                let (mut dk, mut dv) = (vec![A::ZERO; d], vec![A::ZERO; d]);
                let first = if g.causal { j } else { 0 };
                for i in first..g.q_len {
                    let (qi, doi) = (ld(q, (qb + i) * d), ld(dout, (qb + i) * d));
                    let (p, ds) = p_ds(i, j, &qi, &kj, &doi, &vj);
                    for c in 0..d {
                        dv[c] += p * doi[c];
                        dk[c] += ds * qi[c];
                    }
                }
                for c in 0..d {
                    out[nq + (kb + j) * d + c] = (dk[c] * scale).store();
                    out[nq + nk + (kb + j) * d + c] = dv[c].store();
                }
            }
            // dq: one pass over the keys per query (the dq kernel).
            for i in 0..g.q_len {
                let (qi, doi) = (ld(q, (qb + i) * d), ld(dout, (qb + i) * d));
                let mut dq = vec![A::ZERO; d];
                for j in 0..g.k_len {
                    let (kj, vj) = (ld(k, (kb + j) * d), ld(v, (kb + j) * d));
                    let (_, ds) = p_ds(i, j, &qi, &kj, &doi, &vj);
                    for c in 0..d {
                        dq[c] += ds * kj[c];
                    }
                }
                for c in 0..d {
                    out[(qb + i) * d + c] = (dq[c] * scale).store();
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA launches.

#[cfg(feature = "cuda")]
mod cuda {
    use super::Geometry;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result};

    /// nvcc's PTX for `attention.cu` (see its header for the command).
    const PTX: &str = include_str!("attention.ptx");
    const MODULE: &str = "diffexplainer_attention";
    /// Rows per block of the forward and dq kernels, keys per block of the dk/dv kernel, threads
    /// per row (attention.cu's BQ, BKB, TPR).
    const BQ: usize = 64;
    const BKB: usize = 64;
    const TPR: usize = 4;

    fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> Result<CudaView<'a, T>> {
        let (o1, o2) = super::contiguous_range(l, what)?;
        let slice = s.as_cuda_slice::<T>().map_err(|_| {
            candle_core::Error::Msg(format!(
                "fused attention: {what} has dtype {:?}, expected q's",
                s.dtype()
            ))
        })?;
        Ok(slice.slice(o1..o2))
    }

    fn suffixes(dtype: DType, d: usize) -> Result<(&'static str, &'static str)> {
        let t = match dtype {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            other => candle_core::bail!("fused attention (CUDA): unsupported dtype {other:?}"),
        };
        let dv = match d {
            1..=40 => "d40",
            41..=64 => "d64",
            65..=80 => "d80",
            81..=160 => "d160",
            _ => candle_core::bail!("fused attention (CUDA): head dim {d} not in 1..=160"),
        };
        Ok((t, dv))
    }

    fn check(g: Geometry) -> Result<()> {
        if g.bh == 0
            || g.bh > 65535
            || g.q_len == 0
            || g.k_len == 0
            || g.rows() > i32::MAX as usize
            || g.k_elems() > i32::MAX as usize
        {
            candle_core::bail!("fused attention (CUDA): unsupported size {g:?}")
        }
        Ok(())
    }

    fn grid(len: usize, per_block: usize, g: Geometry) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (len.div_ceil(per_block) as u32, g.bh as u32, 1),
            block_dim: ((per_block * TPR) as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(super) fn forward(
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
        g: Geometry,
    ) -> Result<CudaStorage> {
        check(g)?;
        #[allow(clippy::too_many_arguments)]
        fn launch<T: CudaDType + DeviceRepr + candle_core::WithDType>(
            _: &CudaSlice<T>,
            qs: &CudaStorage,
            ql: &Layout,
            ks: &CudaStorage,
            kl: &Layout,
            vs: &CudaStorage,
            vl: &Layout,
            g: Geometry,
        ) -> Result<CudaStorage> {
            let dev = &qs.device;
            let (tsuf, dsuf) = suffixes(T::DTYPE, g.d)?;
            let (q, k, v) = (
                view::<T>(qs, ql, "q")?,
                view::<T>(ks, kl, "k")?,
                view::<T>(vs, vl, "v")?,
            );
            let out = unsafe { dev.alloc::<T>(g.packed_len(T::DTYPE))? };
            let o = out.slice(0..g.q_elems());
            let lse = out.slice(g.o_slots_padded(T::DTYPE)..);
            let f = dev.get_or_load_custom_func(&format!("fa_fwd_{tsuf}_{dsuf}"), MODULE, PTX)?;
            let (ql_, kl_, d_, causal) =
                (g.q_len as i32, g.k_len as i32, g.d as i32, g.causal as i32);
            let scale_log2 = (g.scale * std::f64::consts::LOG2_E) as f32;
            let mut b = f.builder();
            b.arg(&q);
            b.arg(&k);
            b.arg(&v);
            b.arg(&o);
            b.arg(&lse);
            b.arg(&ql_);
            b.arg(&kl_);
            b.arg(&d_);
            b.arg(&causal);
            b.arg(&scale_log2);
            unsafe { b.launch(grid(g.q_len, BQ, g)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        match &qs.slice {
            CudaStorageSlice::F16(s) => launch(s, qs, ql, ks, kl, vs, vl, g),
            CudaStorageSlice::BF16(s) => launch(s, qs, ql, ks, kl, vs, vl, g),
            CudaStorageSlice::F32(s) => launch(s, qs, ql, ks, kl, vs, vl, g),
            _ => candle_core::bail!("fused attention (CUDA): unsupported dtype {:?}", qs.dtype()),
        }
    }

    type Arg<'a> = (&'a CudaStorage, &'a Layout);

    pub(super) fn backward(
        q: Arg<'_>,
        k: Arg<'_>,
        v: Arg<'_>,
        packed: Arg<'_>,
        dout: Arg<'_>,
        g: Geometry,
    ) -> Result<CudaStorage> {
        check(g)?;
        fn launch<T: CudaDType + DeviceRepr + candle_core::WithDType>(
            _: &CudaSlice<T>,
            (qs, ql): Arg<'_>,
            (ks, kl): Arg<'_>,
            (vs, vl): Arg<'_>,
            (ps, pl): Arg<'_>,
            (gs, gl): Arg<'_>,
            g: Geometry,
        ) -> Result<CudaStorage> {
            let dev = &qs.device;
            let (tsuf, dsuf) = suffixes(T::DTYPE, g.d)?;
            let (q, k, v) = (
                view::<T>(qs, ql, "q")?,
                view::<T>(ks, kl, "k")?,
                view::<T>(vs, vl, "v")?,
            );
            let dy = view::<T>(gs, gl, "the output gradient")?;
            let packed = view::<T>(ps, pl, "the forward result")?;
            if packed.len() != g.packed_len(T::DTYPE) {
                candle_core::bail!(
                    "fused attention backward: forward result of {} elements, expected {}",
                    packed.len(),
                    g.packed_len(T::DTYPE)
                )
            }
            let o = packed.slice(0..g.q_elems());
            let lse = packed.slice(g.o_slots_padded(T::DTYPE)..);
            let (nq, nk) = (g.q_elems(), g.k_elems());
            let dvec = unsafe { dev.alloc::<f32>(g.rows())? };
            let out = unsafe { dev.alloc::<T>(nq + 2 * nk)? };
            let (dq, dk, dv) = (
                out.slice(0..nq),
                out.slice(nq..nq + nk),
                out.slice(nq + nk..),
            );
            let (ql_, kl_, d_, causal) =
                (g.q_len as i32, g.k_len as i32, g.d as i32, g.causal as i32);
            let scale_log2 = (g.scale * std::f64::consts::LOG2_E) as f32;
            let scale = g.scale as f32;
            {
                let f = dev.get_or_load_custom_func(&format!("fa_row_dot_{tsuf}"), MODULE, PTX)?;
                let rows = g.rows() as i64;
                let mut b = f.builder();
                b.arg(&dy);
                b.arg(&o);
                b.arg(&dvec);
                b.arg(&rows);
                b.arg(&d_);
                let cfg = LaunchConfig {
                    grid_dim: (g.rows().div_ceil(256) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                unsafe { b.launch(cfg) }.w()?;
            }
            {
                let f = dev.get_or_load_custom_func(
                    &format!("fa_bwd_dkdv_{tsuf}_{dsuf}"),
                    MODULE,
                    PTX,
                )?;
                let mut b = f.builder();
                b.arg(&q);
                b.arg(&k);
                b.arg(&v);
                b.arg(&dy);
                b.arg(&lse);
                b.arg(&dvec);
                b.arg(&dk);
                b.arg(&dv);
                b.arg(&ql_);
                b.arg(&kl_);
                b.arg(&d_);
                b.arg(&causal);
                b.arg(&scale_log2);
                b.arg(&scale);
                unsafe { b.launch(grid(g.k_len, BKB, g)) }.w()?;
            }
            {
                let f =
                    dev.get_or_load_custom_func(&format!("fa_bwd_dq_{tsuf}_{dsuf}"), MODULE, PTX)?;
                let mut b = f.builder();
                b.arg(&q);
                b.arg(&k);
                b.arg(&v);
                b.arg(&dy);
                b.arg(&lse);
                b.arg(&dvec);
                b.arg(&dq);
                b.arg(&ql_);
                b.arg(&kl_);
                b.arg(&d_);
                b.arg(&causal);
                b.arg(&scale_log2);
                b.arg(&scale);
                unsafe { b.launch(grid(g.q_len, BQ, g)) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        match &q.0.slice {
            CudaStorageSlice::F16(s) => launch(s, q, k, v, packed, dout, g),
            CudaStorageSlice::BF16(s) => launch(s, q, k, v, packed, dout, g),
            CudaStorageSlice::F32(s) => launch(s, q, k, v, packed, dout, g),
            _ => candle_core::bail!(
                "fused attention (CUDA): unsupported dtype {:?}",
                q.0.dtype()
            ),
        }
    }
}
