//! Softmax over the last dimension with a backward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{lane_sum, row_major, Element, MIN_ELEMS_PER_TASK};

const OP_NAME: &str = "softmax_last_dim";

fn last_dim(op: &str, dims: &[usize]) -> Result<usize> {
    match dims.last() {
        Some(&d) => Ok(d),
        None => Err(candle_core::Error::Msg(format!(
            "{op}: input shape {dims:?} has no last dimension; a scalar cannot be softmaxed"
        ))
        .bt()),
    }
}

/// Differentiable softmax over the last dimension, computed as `exp(x - max) / sum`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    last_dim(OP_NAME, x.dims())?;
    if !crate::composite::use_kernel(&[x]) {
        return crate::composite::softmax_last_dim(x);
    }
    crate::tape::apply1(x, Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        OP_NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(OP_NAME, l.dims())?;
        let out = dispatch_float!(OP_NAME, (s => x), {
            Element::into_storage(forward(&row_major(x, l), d))
        });
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, softmax_fwd};
        use candle_core::backend::BackendStorage;
        let d = last_dim(OP_NAME, l.dims())?;
        let rows = l.shape().elem_count() / d.max(1);
        let out = cuda_dispatch!(OP_NAME, s.dtype(), softmax_fwd(s, l, (rows, d)))?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The Jacobian only needs the output: dx = y * (g - sum(g * y)).
        Ok(Some(y.apply_op2_no_bwd(grad, &SoftmaxGrad)?))
    }
}

fn forward<T: Element>(x: &[T], d: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .with_min_len(MIN_ELEMS_PER_TASK.div_ceil(d))
        .for_each(|(out_row, x_row)| {
            let mut max = T::NEG_INFINITY;
            for &v in x_row {
                if v > max {
                    max = v;
                }
            }
            for (o, &v) in out_row.iter_mut().zip(x_row) {
                *o = (v - max).exp();
            }
            let sum = lane_sum(out_row, out_row, |e, _| e);
            for o in out_row.iter_mut() {
                *o = *o / sum;
            }
        });
    out
}

/// `(y, grad_out) -> grad_x` for `y = softmax_last_dim(x)`.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax_last_dim_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::same_shape(self.name(), "output", l1.dims(), "output-gradient", l2.dims())?;
        let d = last_dim(self.name(), l1.dims())?;
        let out = dispatch_float!(self.name(), (s1 => y, s2 => g), {
            Element::into_storage(backward(&row_major(y, l1), &row_major(g, l2), d))
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
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, softmax_bwd};
        use candle_core::backend::BackendStorage;
        crate::same_shape(self.name(), "output", l1.dims(), "output-gradient", l2.dims())?;
        let d = last_dim(self.name(), l1.dims())?;
        let rows = l1.shape().elem_count() / d.max(1);
        let out = cuda_dispatch!(self.name(), s1.dtype(), softmax_bwd(s1, l1, s2, l2, (rows, d)))?;
        Ok((out, l1.shape().clone()))
    }
}

fn backward<T: Element>(y: &[T], g: &[T], d: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; y.len()];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(d)
        .zip(y.par_chunks(d).zip(g.par_chunks(d)))
        .with_min_len(MIN_ELEMS_PER_TASK.div_ceil(d))
        .for_each(|(out_row, (y_row, g_row))| {
            let dot = lane_sum(y_row, g_row, |yv, gv| yv * gv);
            for ((o, &yv), &gv) in out_row.iter_mut().zip(y_row).zip(g_row) {
                *o = yv * (gv - dot);
            }
        });
    out
}
