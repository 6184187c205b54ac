//! `x + s[b] * branch`: a residual branch scaled per sample (stochastic depth, timm's
//! `DropPath`: `s[b]` is 0 or 1 / keep_prob) and added to the block's input, as one op.
//!
//! Why: candle's `x + branch.broadcast_mul(s)` reads the [B, 1, ...] scales through a broadcast
//! view (a strided loop on the CPU), and its backward computes the scales' gradient anyway: the
//! other operand of a Mul gets `grad * branch` and a zero-filled gradient of the broadcast
//! shape to add it to, full-size work for constants nothing needs. This op took the fine-tuning
//! step of ConvMAE-B at batch 8 on 2 cores from 4079 to 3778 ms and its peak RSS from 5873 to
//! 4574 MB (`benches/results/finetune-2026-11-28.md`).
//! Backward: `dx = g`, `dbranch = s[b] g`; the scales get none. The forward rounds as candle's
//! pair does: the product, then the sum, each rounded once.
//! Our kernel is the CPU's (f32, f64); elsewhere (CUDA, bf16) the op is candle's pair.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{row_major, Element};

const OP_NAME: &str = "residual_scaled";

/// `x + s[b] * branch` for `x`, `branch` [B, ...] of one shape and `scales` holding B values
/// (any shape, e.g. the [B, 1, 1] of a token block's DropPath). Differentiable in `x` and
/// `branch`; the scales are constants.
pub fn residual_scaled(x: &Tensor, branch: &Tensor, scales: &Tensor) -> Result<Tensor> {
    crate::same_shape(OP_NAME, "x", x.dims(), "branch", branch.dims())?;
    let batch = x.dim(0)?;
    if scales.elem_count() != batch {
        candle_core::bail!("{OP_NAME}: {} scales for a batch of {batch} ({:?})", scales.elem_count(), x.dims());
    }
    if !(x.device().is_cpu() && crate::has_kernel(x) && crate::has_kernel(branch) && x.dtype() == branch.dtype()) {
        let mut shape = vec![1usize; x.rank()];
        shape[0] = batch;
        return x + branch.broadcast_mul(&scales.reshape(shape)?.to_dtype(branch.dtype())?)?;
    }
    let scales = Arc::new(scales.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
    crate::tape::apply2(x, branch, ResidualScaled { scales })
}

/// The op: `scales` per sample, on the host.
struct ResidualScaled {
    scales: Arc<Vec<f64>>,
}

/// `g` scaled per sample (the branch's gradient).
struct ScaleRows {
    scales: Arc<Vec<f64>>,
}

/// Each sample's row of `src` (one shape), times its scale, plus `add`'s row when given.
fn scaled_rows<T: Element>(src: &[T], add: Option<&[T]>, scales: &[f64]) -> Vec<T> {
    let per = src.len() / scales.len();
    let mut out = vec![T::ZERO; src.len()];
    out.par_chunks_mut(per.max(1)).enumerate().for_each(|(b, dst)| {
        let s = T::from_f64(scales[b]);
        let row = &src[b * per..][..per];
        match add {
            Some(x) => {
                for ((d, &v), &base) in dst.iter_mut().zip(row).zip(&x[b * per..][..per]) {
                    let product = s * v;
                    *d = base + product;
                }
            }
            None => {
                for (d, &v) in dst.iter_mut().zip(row) {
                    *d = s * v;
                }
            }
        }
    });
    out
}

impl CustomOp2 for ResidualScaled {
    fn name(&self) -> &'static str {
        OP_NAME
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch_float!(OP_NAME, (xs => x, bs => b), {
            let (x, b) = (row_major(x, xl), row_major(b, bl));
            Element::into_storage(scaled_rows(&b, Some(&x), &self.scales))
        });
        Ok((out, xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _branch: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let branch = grad.apply_op1_no_bwd(&ScaleRows { scales: self.scales.clone() })?;
        Ok((Some(grad.clone()), Some(branch)))
    }
}

impl CustomOp1 for ScaleRows {
    fn name(&self) -> &'static str {
        "residual_scaled_backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch_float!(self.name(), (s => g), {
            let g = row_major(g, l);
            Element::into_storage(scaled_rows(&g, None, &self.scales))
        });
        Ok((out, l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::rand;
    use candle_core::{Device, Var};

    /// The op is candle's `x + branch * s` to the bit, forward and both gradients, for token
    /// [B, N, D] and map [B, H, W, C] shapes, dropped (0) and kept (1 / keep) samples; the
    /// composition (CUDA's, bf16's) is that pair itself.
    #[test]
    fn the_op_is_candles_pair_to_the_bit() {
        for (dims, scale_shape) in [(vec![3usize, 5, 4], vec![3usize, 1, 1]), (vec![2, 3, 4, 6], vec![2, 1, 1, 1])] {
            for dtype in [DType::F32, DType::F64] {
                let x = Var::from_tensor(&rand(&dims, 1).to_dtype(dtype).unwrap()).unwrap();
                let branch = Var::from_tensor(&rand(&dims, 2).to_dtype(dtype).unwrap()).unwrap();
                let values: Vec<f64> = (0..dims[0]).map(|b| if b == 1 { 0.0 } else { 1.0 / 0.9 }).collect();
                let scales = Tensor::from_vec(values, scale_shape.as_slice(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let ours = residual_scaled(x.as_tensor(), branch.as_tensor(), &scales).unwrap();
                let theirs = (x.as_tensor() + branch.as_tensor().broadcast_mul(&scales).unwrap()).unwrap();
                let bits = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
                assert_eq!(bits(&ours), bits(&theirs), "{dims:?} {dtype:?}");
                let cot = rand(&dims, 3).to_dtype(dtype).unwrap();
                let g_ours = (ours * &cot).unwrap().sum_all().unwrap().backward().unwrap();
                let g_theirs = (theirs * &cot).unwrap().sum_all().unwrap().backward().unwrap();
                for (name, v) in [("x", &x), ("branch", &branch)] {
                    assert_eq!(bits(g_ours.get(v.as_tensor()).unwrap()), bits(g_theirs.get(v.as_tensor()).unwrap()), "{name} {dims:?} {dtype:?}");
                }
                // A dropped sample's branch gets no gradient, its input all of it.
                let gb = g_ours.get(branch.as_tensor()).unwrap().get(1).unwrap();
                assert!(bits(&gb).iter().all(|&v| v == 0.0));
            }
        }
        // bf16 (no CPU kernel of ours): candle's pair.
        let x = rand(&[2, 3], 4).to_dtype(DType::BF16).unwrap();
        let s = Tensor::new(&[1.0f32, 0.0], &Device::Cpu).unwrap();
        let half = residual_scaled(&x, &x, &s).unwrap();
        assert_eq!(half.dtype(), DType::BF16);
        let e = residual_scaled(&x, &x, &Tensor::new(&[1.0f32], &Device::Cpu).unwrap()).unwrap_err().to_string();
        assert!(e.contains("1 scales for a batch of 2"), "{e}");
    }
}
