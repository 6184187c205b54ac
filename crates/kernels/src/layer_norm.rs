//! LayerNorm over the last dimension, with gradients for the input, weight and bias.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{lane_sum, lane_sum2, row_major, Element, MIN_ELEMS_PER_TASK};

const OP_NAME: &str = "layer_norm";

/// Rows per partial sum of the weight and bias gradients. Fixed (not derived from the thread
/// count) and reduced in index order, so those gradients are bitwise reproducible.
const ROWS_PER_PARTIAL: usize = 32;

/// Checks `x: [..., D]`, `weight: [D]`, `bias: [D]` and returns `(rows, D)`.
fn row_shape(op: &str, x: &[usize], weight: &[usize], bias: &[usize]) -> Result<(usize, usize)> {
    match x.last() {
        Some(&d) if weight == [d] && bias == [d] => Ok((x.iter().product::<usize>() / d.max(1), d)),
        _ => Err(candle_core::Error::Msg(format!(
            "{op}: input shape {x:?}, weight shape {weight:?} and bias shape {bias:?} do not \
             match; expected x [..., D], weight [D] and bias [D]"
        ))
        .bt()),
    }
}

/// Differentiable LayerNorm over the last dimension, like `torch.nn.functional.layer_norm`:
/// `(x - mean) / sqrt(var_biased + eps) * weight + bias`, with `x: [..., D]`,
/// `weight: [D]` and `bias: [D]`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    row_shape(OP_NAME, x.dims(), weight.dims(), bias.dims())?;
    if !crate::composite::use_kernel(&[x, weight, bias]) {
        return crate::composite::layer_norm(x, weight, bias, eps);
    }
    crate::tape::apply3(x, weight, bias, LayerNorm::new(eps))
}

struct LayerNorm {
    eps: f64,
    /// The CUDA forward's per-row (mean, rstd) in f32, kept for the backward (the op lives in
    /// the autograd graph until it is dropped). The CPU backward recomputes them instead: a
    /// row pass there is cheap next to holding another buffer.
    #[cfg(feature = "cuda")]
    stats: std::sync::Mutex<Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>>>,
}

impl LayerNorm {
    fn new(eps: f64) -> Self {
        LayerNorm {
            eps,
            #[cfg(feature = "cuda")]
            stats: Default::default(),
        }
    }
}

/// Mean and reciprocal standard deviation of one row. Two passes (mean, then the mean of
/// squared deviations) in the row's own dtype: for f64 this keeps parity with PyTorch at the
/// 1e-12 level, where the one-pass E[x^2] - E[x]^2 form loses digits to cancellation.
#[inline]
fn row_stats<T: Element>(row: &[T], eps: T) -> (T, T) {
    let n = T::from_usize(row.len());
    let mean = lane_sum(row, row, |v, _| v) / n;
    let var = lane_sum(row, row, |v, _| (v - mean) * (v - mean)) / n;
    (mean, T::ONE / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        OP_NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, d) = row_shape(OP_NAME, l1.dims(), l2.dims(), l3.dims())?;
        let out = dispatch_float!(OP_NAME, (s1 => x, s2 => w, s3 => b), {
            let eps = Element::from_f64(self.eps);
            Element::into_storage(forward(&row_major(x, l1), &row_major(w, l2), &row_major(b, l3), d, eps))
        });
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, layer_norm_fwd};
        use candle_core::backend::BackendStorage;
        let dims = row_shape(OP_NAME, l1.dims(), l2.dims(), l3.dims())?;
        let (out, stats) = cuda_dispatch!(OP_NAME, s1.dtype(), layer_norm_fwd(s1, l1, s2, l2, s3, l3, dims, self.eps))?;
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::sync::Arc::new(stats));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, d) = row_shape(OP_NAME, x.dims(), weight.dims(), bias.dims())?;
        // One pass produces all three gradients, packed as rows of a [rows + 2, D] tensor, to
        // avoid recomputing the row statistics; the narrows below are views, not copies.
        let packed = x.apply_op3_no_bwd(
            weight,
            grad,
            &LayerNormGrad {
                eps: self.eps,
                #[cfg(feature = "cuda")]
                stats: self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            },
        )?;
        let grad_x = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let grad_w = packed.narrow(0, rows, 1)?.reshape(d)?;
        let grad_b = packed.narrow(0, rows + 1, 1)?.reshape(d)?;
        Ok((Some(grad_x), Some(grad_w), Some(grad_b)))
    }
}

pub(crate) fn forward<T: Element>(x: &[T], w: &[T], b: &[T], d: usize, eps: T) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .with_min_len(MIN_ELEMS_PER_TASK.div_ceil(d))
        .for_each(|(out_row, x_row)| {
            let (mean, rstd) = row_stats(x_row, eps);
            for (((o, &v), &wv), &bv) in out_row.iter_mut().zip(x_row).zip(w).zip(b) {
                *o = (v - mean) * rstd * wv + bv;
            }
        });
    out
}

/// `(x [..., D], weight [D], grad_out [..., D]) -> [rows + 2, D]` holding grad_x (first `rows`
/// rows), grad_weight and grad_bias.
struct LayerNormGrad {
    eps: f64,
    /// The forward's row statistics when it ran on CUDA (see `LayerNorm::stats`).
    #[cfg(feature = "cuda")]
    stats: Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>>,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer_norm_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::same_shape(self.name(), "input", l1.dims(), "output-gradient", l3.dims())?;
        let (rows, d) = row_shape(self.name(), l1.dims(), l2.dims(), l2.dims())?;
        let out = dispatch_float!(self.name(), (s1 => x, s2 => w, s3 => g), {
            let eps = Element::from_f64(self.eps);
            Element::into_storage(backward(&row_major(x, l1), &row_major(w, l2), &row_major(g, l3), rows, d, eps))
        });
        Ok((out, Shape::from_dims(&[rows + 2, d])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, layer_norm_bwd};
        use candle_core::backend::BackendStorage;
        crate::same_shape(self.name(), "input", l1.dims(), "output-gradient", l3.dims())?;
        let (rows, d) = row_shape(self.name(), l1.dims(), l2.dims(), l2.dims())?;
        // Saved statistics are used only if they are for these rows (always, in practice).
        let stats = self.stats.as_deref().filter(|s| s.len() == rows * 2);
        let out = cuda_dispatch!(self.name(), s1.dtype(), layer_norm_bwd(s1, l1, s2, l2, s3, l3, stats, (rows, d), self.eps))?;
        Ok((out, Shape::from_dims(&[rows + 2, d])))
    }
}

/// `[grad_x (rows x d) | grad_weight | grad_bias]` from the input, weight and output gradient.
pub(crate) fn backward<T: Element>(x: &[T], w: &[T], g: &[T], rows: usize, d: usize, eps: T) -> Vec<T> {
    let mut out = vec![T::ZERO; (rows + 2) * d];
    if d == 0 {
        return out;
    }
    let (grad_x, grad_params) = out.split_at_mut(rows * d);
    let n = T::from_usize(d);
    let partials: Vec<Vec<T>> = grad_x
        .par_chunks_mut(ROWS_PER_PARTIAL * d)
        .zip(x.par_chunks(ROWS_PER_PARTIAL * d))
        .zip(g.par_chunks(ROWS_PER_PARTIAL * d))
        .map(|((gx_rows, x_rows), g_rows)| {
            // [dweight | dbias] for this block of rows.
            let mut acc = vec![T::ZERO; 2 * d];
            let (acc_w, acc_b) = acc.split_at_mut(d);
            for ((gx, xr), gr) in gx_rows.chunks_mut(d).zip(x_rows.chunks(d)).zip(g_rows.chunks(d)) {
                let (mean, rstd) = row_stats(xr, eps);
                let (sum_gw, sum_gw_xhat) = lane_sum2(xr, gr, w, |xv, gv, wv| {
                    let gw = gv * wv;
                    (gw, gw * ((xv - mean) * rstd))
                });
                let mean_gw = sum_gw / n;
                let mean_gw_xhat = sum_gw_xhat / n;
                let params = acc_w.iter_mut().zip(acc_b.iter_mut());
                for ((((o, &xv), &gv), &wv), (aw, ab)) in
                    gx.iter_mut().zip(xr).zip(gr).zip(w).zip(params)
                {
                    let xhat = (xv - mean) * rstd;
                    *o = rstd * (gv * wv - mean_gw - xhat * mean_gw_xhat);
                    *aw += gv * xhat;
                    *ab += gv;
                }
            }
            acc
        })
        .collect();
    for partial in &partials {
        for (dst, &v) in grad_params.iter_mut().zip(partial) {
            *dst += v;
        }
    }
    out
}
