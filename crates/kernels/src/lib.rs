//! Compute primitives for ConvMAE as candle custom ops, each with a real backward.
//!
//! They exist because candle 0.11.1's fused `layer_norm` and `softmax_last_dim` are applied
//! without a backward (their gradients silently vanish), and its grouped convolution runs one
//! convolution per group, which is hopeless for depthwise convolutions with hundreds of channels.
//! `self_attention` fuses timm's attention so that no `[B, heads, N, N]` tensor outlives the op.
//!
//! Our kernels run on the CPU in f32 and f64, and with the `cuda` feature on CUDA in f32, bf16
//! and f16 (`cuda/*.cu`, compiled to PTX by build.rs, launched from `cuda.rs`; statistics and
//! sums in f32). Elsewhere (f64 or integer dtypes on CUDA, mixed dtypes on CUDA, other
//! devices) and when `CONVMAE_KERNELS=composite` is set, each op falls back to its composition
//! of candle tensor ops (`composite`), which candle runs and differentiates everywhere:
//! correct, but unfused. On CUDA `linear` is one op around two cuBLAS gemms (see linear.rs).

use std::borrow::Cow;

/// Whether environment variable `name` asks for `alternative` rather than `default` (or is
/// unset or empty); another value is named in a warning and means `default`. The A/B and
/// safety switches of the newer paths (here and in convmae-core), each read once per process
/// by its caller.
pub fn env_switch(name: &str, default: &str, alternative: &str) -> bool {
    match std::env::var(name).as_deref() {
        Ok(v) if v == alternative => true,
        Ok(v) if v.is_empty() || v == default => false,
        Ok(other) => {
            eprintln!("convmae: {name}='{other}' is not '{default}' or '{alternative}'; using '{default}'");
            false
        }
        Err(_) => false,
    }
}
use std::ops::{Add, AddAssign, Div, Mul, Sub};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout};

/// Runs `$body` with `$a`, `$b`, ... bound to the argument storages' slices of one float type;
/// the body is expanded once per type, so it may call generic kernels with inferred `T`.
macro_rules! dispatch_float {
    ($op:expr, ($($s:ident => $a:ident),+), $body:expr) => {
        match ($($s,)+) {
            ($(candle_core::CpuStorage::F32($a),)+) => $body,
            ($(candle_core::CpuStorage::F64($a),)+) => $body,
            _ => return Err($crate::dtype_error($op, &[$($s),+])),
        }
    };
}

mod adamw;
pub mod agreement;
pub mod op_timing;
mod attention;
pub mod composite;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod gemm_epilogue;
mod depthwise_conv;
mod unfold;
mod batch_norm;
mod roi_align;
mod erf_f32;
mod gelu;
mod layer_norm;
mod linear;
mod normalize;
mod patch_blocks;
mod patch_loss;
mod residual;
mod restore_tokens;
mod sublayer;
pub mod tape;
mod transfer;
#[cfg(test)]
mod test_util;
pub mod reference;
mod simd;
mod softmax;
mod taps;
mod sparse_depthwise_conv;

pub use adamw::{adamw_update, adamw_update_many, adamw_update_with_shadow, AdamWItem, AdamWUpdate};
pub use attention::{self_attention, with_cuda_form, CudaForm};
pub use composite::{has_kernel, with_composite_ops, with_path, Path};
pub use depthwise_conv::depthwise_conv2d;
pub use gelu::gelu_erf;
pub use layer_norm::layer_norm;
pub use linear::{linear, linear_gelu, with_gemm_epilogue};
pub use normalize::normalize_rgb;
pub use patch_blocks::{conv_weight_rows, flat_patches, patch_blocks};
pub use patch_loss::masked_patch_mse;
pub use residual::residual_scaled;
pub use restore_tokens::restore_tokens;
pub use sublayer::{attention_residual, attention_residual_packed, conv2_with_dw_bias, conv_residual, conv_residual_packed, mlp_residual, mlp_residual_packed, sublayer_chain, PackGradSink, PackedSublayer, SublayerLink};
pub use softmax::softmax_last_dim;
pub use transfer::{read_later, upload, PendingValue, Uploadable};
pub use unfold::unfold;
pub use batch_norm::{batch_norm_stats, batch_norm_train};
pub use roi_align::{roi_align, RoiBox};
pub use sparse_depthwise_conv::{sparse_depthwise_conv2d, SparseNeighbors, VisibleTokens};

/// The float types the CPU kernels are instantiated for. Kept private and minimal rather than
/// pulling in `num-traits`: the kernels only need arithmetic, `sqrt`, `exp` and storage wrapping.
pub(crate) trait Element:
    Copy
    + Send
    + Sync
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + AddAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(v: f64) -> Self;
    fn from_usize(v: usize) -> Self;
    fn sqrt(self) -> Self;
    fn exp(self) -> Self;
    fn into_storage(v: Vec<Self>) -> CpuStorage;
}

macro_rules! impl_element {
    ($t:ty, $variant:ident) => {
        impl Element for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn from_usize(v: usize) -> Self {
                v as $t
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
        }
    };
}
impl_element!(f32, F32);
impl_element!(f64, F64);

/// Borrows the elements of `layout` in row-major order when they already are, and gathers them
/// otherwise. Gathering here (instead of asking callers for `.contiguous()`) keeps the autograd
/// graph free of extra copy nodes, and lets `bwd` hand us candle's broadcast (stride 0) gradients.
pub(crate) fn row_major<'a, T: Copy>(data: &'a [T], layout: &Layout) -> Cow<'a, [T]> {
    if let Some((start, end)) = layout.contiguous_offsets() {
        return Cow::Borrowed(&data[start..end]);
    }
    let dims = layout.dims();
    let strides = layout.stride();
    let count = layout.shape().elem_count();
    let mut out = Vec::with_capacity(count);
    if count == 0 {
        return Cow::Owned(out);
    }
    let rank = dims.len();
    let mut index = vec![0usize; rank];
    let mut offset = layout.start_offset();
    for _ in 0..count {
        out.push(data[offset]);
        // Odometer increment, keeping `offset` in sync so no multiply is needed per element.
        for axis in (0..rank).rev() {
            index[axis] += 1;
            offset += strides[axis];
            if index[axis] < dims[axis] {
                break;
            }
            offset -= strides[axis] * dims[axis];
            index[axis] = 0;
        }
    }
    Cow::Owned(out)
}

/// Checks that two operands an element-wise op pairs up have the same shape; the error names the
/// op and both operands. The CPU and CUDA paths of each op call it alike.
pub(crate) fn same_shape(op: &str, a: &str, a_dims: &[usize], b: &str, b_dims: &[usize]) -> candle_core::Result<()> {
    if a_dims != b_dims {
        candle_core::bail!("{op}: {a} shape {a_dims:?} and {b} shape {b_dims:?} differ");
    }
    Ok(())
}

/// The error for argument dtypes the kernels cannot take, naming the op so that a failure deep
/// inside a model's forward or backward pass can be traced back to its source.
pub(crate) fn dtype_error(op: &str, storages: &[&CpuStorage]) -> candle_core::Error {
    let dtypes: Vec<DType> = storages.iter().map(|s| s.dtype()).collect();
    if dtypes.windows(2).all(|w| w[0] == w[1]) {
        candle_core::Error::Msg(format!(
            "{op}: unsupported dtype {:?} (only f32 and f64 are implemented)",
            dtypes[0]
        ))
    } else {
        candle_core::Error::Msg(format!(
            "{op}: arguments have different dtypes {dtypes:?}; they must all be f32 or all f64"
        ))
    }
    .bt()
}

/// Independent partial sums in the row reductions. A single running sum is bound by the
/// latency of one add per element and cannot be vectorised (float addition is not
/// associative); sixteen lanes fill the SIMD registers. The combination order is fixed, so
/// results stay deterministic.
const SUM_LANES: usize = 16;

#[inline(always)]
fn combine_lanes<T: Element>(acc: [T; SUM_LANES], tail: T) -> T {
    let mut width = SUM_LANES;
    let mut acc = acc;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            let upper = acc[l + width];
            acc[l] += upper;
        }
    }
    acc[0] + tail
}

/// `sum_i f(a[i], b[i])` over two equally long slices, accumulated in `SUM_LANES` lanes.
#[inline(always)]
pub(crate) fn lane_sum<T: Element>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [T::ZERO; SUM_LANES];
    let (ca, cb) = (a.chunks_exact(SUM_LANES), b.chunks_exact(SUM_LANES));
    let mut tail = T::ZERO;
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += f(x, y);
    }
    for (xa, xb) in ca.zip(cb) {
        for l in 0..SUM_LANES {
            acc[l] += f(xa[l], xb[l]);
        }
    }
    combine_lanes(acc, tail)
}

/// Like `lane_sum` but two sums of three slices in one pass, for the LayerNorm backward.
#[inline(always)]
pub(crate) fn lane_sum2<T: Element>(
    a: &[T],
    b: &[T],
    c: &[T],
    f: impl Fn(T, T, T) -> (T, T),
) -> (T, T) {
    let mut acc0 = [T::ZERO; SUM_LANES];
    let mut acc1 = [T::ZERO; SUM_LANES];
    let (ca, cb, cc) = (a.chunks_exact(SUM_LANES), b.chunks_exact(SUM_LANES), c.chunks_exact(SUM_LANES));
    let (mut tail0, mut tail1) = (T::ZERO, T::ZERO);
    for ((&x, &y), &z) in ca.remainder().iter().zip(cb.remainder()).zip(cc.remainder()) {
        let (u, v) = f(x, y, z);
        tail0 += u;
        tail1 += v;
    }
    for ((xa, xb), xc) in ca.zip(cb).zip(cc) {
        for l in 0..SUM_LANES {
            let (u, v) = f(xa[l], xb[l], xc[l]);
            acc0[l] += u;
            acc1[l] += v;
        }
    }
    (combine_lanes(acc0, tail0), combine_lanes(acc1, tail1))
}

/// Minimum number of elements per rayon task for the row-wise kernels: below this the cost of
/// splitting work outweighs the per-row arithmetic.
pub(crate) const MIN_ELEMS_PER_TASK: usize = 8192;

/// Adds per-thread partial sums element-wise in partial order, so a reduction split over a fixed
/// partition gives the same bits whatever the thread count (training resumes compare bitwise).
/// The output is split in chunks only to parallelize the adds; each element's order is fixed.
pub(crate) fn sum_partials<T: Element>(partials: &[Vec<T>], len: usize) -> Vec<T> {
    use rayon::prelude::*;
    const CHUNK: usize = 1024;
    let mut total = vec![T::ZERO; len];
    total.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, dst)| {
        let (start, n) = (ci * CHUNK, dst.len());
        for partial in partials {
            for (d, &v) in dst.iter_mut().zip(&partial[start..start + n]) {
                *d += v;
            }
        }
    });
    total
}
