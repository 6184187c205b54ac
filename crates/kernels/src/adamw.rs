//! One fused, multithreaded AdamW update per tensor, in place (torch.optim.AdamW semantics).
//!
//! Composed from candle ops the update is about a dozen single-threaded elementwise passes per
//! tensor, each allocating a result: for ConvMAE-B's 115M parameters that is a large share of a
//! CPU step. Here it is three in-place passes on the CPU (first moment, second moment,
//! parameter) and one fused kernel launch per tensor on CUDA.

use crate::{row_major, Element};
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// Hyper-parameters of one update of one tensor.
#[derive(Clone, Copy, Debug)]
pub struct AdamWUpdate {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// 0 for tensors exempt from decay.
    pub weight_decay: f64,
    /// 1-based step count (bias correction).
    pub step: u64,
}

fn contiguous_mut<'a, T>(data: &'a mut [T], layout: &Layout, op: &str) -> Result<&'a mut [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => Err(candle_core::Error::Msg(format!("{op}: the updated tensor must be contiguous"))),
    }
}

/// m = beta * m + (1 - beta) * g   (square: v = beta * v + (1 - beta) * g^2)
struct Moment {
    beta: f64,
    square: bool,
}

fn moment<T: Element>(m: &mut [T], g: &[T], beta: f64, square: bool) {
    let (b, one_minus) = (T::from_f64(beta), T::from_f64(1.0 - beta));
    m.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(m, g)| {
        for (m, &g) in m.iter_mut().zip(g) {
            let g = if square { g * g } else { g };
            *m = *m * b + g * one_minus;
        }
    });
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw_moment"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        crate::same_shape("adamw", "moment", l1.dims(), "gradient", l2.dims())?;
        // The updated storage is mutable, so the crate's dispatch_float! (shared borrows) does not fit.
        match (s1, s2) {
            (CpuStorage::F32(m), CpuStorage::F32(g)) => moment(contiguous_mut(m, l1, "adamw")?, &row_major(g, l2), self.beta, self.square),
            (CpuStorage::F64(m), CpuStorage::F64(g)) => moment(contiguous_mut(m, l1, "adamw")?, &row_major(g, l2), self.beta, self.square),
            (m, g) => return Err(crate::dtype_error("adamw", &[&*m, g])),
        }
        Ok(())
    }
}

/// p = p * (1 - lr * wd) - step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
struct Apply(AdamWUpdate);

fn apply<T: Element>(p: &mut [T], m: &[T], v: &[T], u: &AdamWUpdate) {
    let decay = T::from_f64(1.0 - u.lr * u.weight_decay);
    let step_size = T::from_f64(u.lr / (1.0 - u.beta1.powi(u.step as i32)));
    let bias2_sqrt = T::from_f64((1.0 - u.beta2.powi(u.step as i32)).sqrt());
    let eps = T::from_f64(u.eps);
    p.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK))).for_each(|(p, (m, v))| {
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            let denom = v.sqrt() / bias2_sqrt + eps;
            *p = *p * decay - step_size * (m / denom);
        }
    });
}

impl InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "adamw_apply"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<()> {
        crate::same_shape("adamw", "parameter", l1.dims(), "exp_avg", l2.dims())?;
        crate::same_shape("adamw", "parameter", l1.dims(), "exp_avg_sq", l3.dims())?;
        match (s1, s2, s3) {
            (CpuStorage::F32(p), CpuStorage::F32(m), CpuStorage::F32(v)) => {
                apply(contiguous_mut(p, l1, "adamw")?, &row_major(m, l2), &row_major(v, l3), &self.0)
            }
            (CpuStorage::F64(p), CpuStorage::F64(m), CpuStorage::F64(v)) => {
                apply(contiguous_mut(p, l1, "adamw")?, &row_major(m, l2), &row_major(v, l3), &self.0)
            }
            (p, m, v) => return Err(crate::dtype_error("adamw", &[&*p, m, v])),
        }
        Ok(())
    }
}

/// Updates `exp_avg`, `exp_avg_sq` and then `param` in place from `grad` (all the same shape
/// and dtype, the updated three contiguous). Our kernels only (see `has_kernel`): CPU f32 / f64
/// in three passes, CUDA f32 / bf16 / f16 in one fused launch; elsewhere use
/// `composite::adamw_step` and store its results. `grad` must not share storage with the
/// other three (the CUDA path locks it for reading while `param` is locked for writing).
pub fn adamw_update(param: &Tensor, exp_avg: &Tensor, exp_avg_sq: &Tensor, grad: &Tensor, u: &AdamWUpdate) -> Result<()> {
    if param.device().is_cuda() {
        crate::same_shape("adamw", "parameter", param.dims(), "gradient", grad.dims())?;
        // An empty tensor has nothing to update, and a zero-byte device allocation would fail.
        if param.elem_count() == 0 {
            return Ok(());
        }
        return param.inplace_op3(exp_avg, exp_avg_sq, &Fused { grad: grad.clone(), shadow: None, u: *u });
    }
    exp_avg.inplace_op2(grad, &Moment { beta: u.beta1, square: false })?;
    exp_avg_sq.inplace_op2(grad, &Moment { beta: u.beta2, square: true })?;
    param.inplace_op3(exp_avg, exp_avg_sq, &Apply(*u))
}

/// Mixed precision's update, on CUDA: `adamw_update` of the f32 `param` and moments from `grad`
/// (bf16, the gradient of the compute copy, or f32), which also writes the new weights, rounded
/// once, into `shadow`, the bf16 compute copy the forward reads (contiguous, not sharing storage
/// with the others). One launch, where a separate cast would be another per tensor per step.
/// Elsewhere (no CUDA kernel) the caller updates in f32 and casts the copy itself.
pub fn adamw_update_with_shadow(param: &Tensor, exp_avg: &Tensor, exp_avg_sq: &Tensor, grad: &Tensor, shadow: &Tensor, u: &AdamWUpdate) -> Result<()> {
    if !param.device().is_cuda() {
        candle_core::bail!("adamw_update_with_shadow: CUDA only (on {:?}, update in f32 and cast the compute copy)", param.device().location());
    }
    crate::same_shape("adamw", "parameter", param.dims(), "gradient", grad.dims())?;
    crate::same_shape("adamw", "parameter", param.dims(), "compute copy", shadow.dims())?;
    if param.elem_count() == 0 {
        return Ok(());
    }
    param.inplace_op3(exp_avg, exp_avg_sq, &Fused { grad: grad.clone(), shadow: Some(shadow.clone()), u: *u })
}

/// One tensor of `adamw_update_many`: its weights, moments, gradient, compute copy (if any) and
/// update (its parameter group's lr and weight decay).
pub struct AdamWItem<'a> {
    pub param: &'a Tensor,
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
    pub grad: &'a Tensor,
    pub copy: Option<Tensor>,
    pub u: AdamWUpdate,
}

/// `adamw_update` (or `adamw_update_with_shadow`, where an item has a copy) of every item in one
/// CUDA launch (cuda/elementwise.cu `adamw_many`), where that applies: our kernels chosen, all on
/// one CUDA device, f32 weights and moments, f32 or bf16 gradients, bf16 copies, every tensor
/// contiguous, and the same betas, eps and step for all (lr and weight decay may differ). Returns
/// whether it ran; where it does not apply it does nothing, and the caller updates tensor by
/// tensor. The same arithmetic as the one-tensor kernels, element for element.
///
/// `guard`, a scalar f32 on the same device (the step's loss), makes the update conditional on
/// the device: where it is not finite, nothing is written. The update can then be queued before
/// the host knows the loss (convmae-core's overlapped steps).
pub fn adamw_update_many(items: &[AdamWItem], guard: Option<&Tensor>) -> Result<bool> {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::adamw_many_tensors(items, guard)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (items, guard);
        Ok(false)
    }
}

/// The whole update in one CUDA kernel (cuda/elementwise.cu): moments and parameter read and
/// written once, instead of three passes. candle's in-place ops write only their first tensor,
/// so `param` is that tensor, the moments come as the sources, and the kernel writes them too,
/// through their device pointers. That is sound because nothing else can observe them
/// mid-update: the op runs on the device's one stream, which orders it against every other
/// use, and the moments are the optimizer's own tensors. The gradient, a fourth operand the
/// trait has no slot for, is carried in the op, as is the compute copy (mixed precision), which
/// the kernel writes through its device pointer like the moments, for the same reasons.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Fused {
    grad: Tensor,
    shadow: Option<Tensor>,
    u: AdamWUpdate,
}

impl InplaceOp3 for Fused {
    fn name(&self) -> &'static str {
        "adamw_fused"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        // adamw_update sends only CUDA tensors here; the CPU update is Moment + Apply.
        candle_core::bail!("adamw_fused: CUDA only (the CPU update runs as three in-place passes)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &mut candle_core::CudaStorage,
        pl: &Layout,
        m: &candle_core::CudaStorage,
        ml: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<()> {
        use crate::cuda::{adamw, cuda_dispatch};
        use candle_core::backend::BackendStorage;
        crate::same_shape("adamw", "parameter", pl.dims(), "exp_avg", ml.dims())?;
        crate::same_shape("adamw", "parameter", pl.dims(), "exp_avg_sq", vl.dims())?;
        let (g, gl) = self.grad.storage_and_layout();
        let candle_core::Storage::Cuda(g) = &*g else {
            candle_core::bail!("adamw: the gradient is on {:?}, the parameter on CUDA", self.grad.device().location());
        };
        let dtype = p.dtype();
        let shadow = self.shadow.as_ref().map(|s| s.storage_and_layout());
        let shadow = match &shadow {
            None => None,
            Some((s, sl)) => match &**s {
                candle_core::Storage::Cuda(s) => Some((s, *sl)),
                _ => candle_core::bail!("adamw: the compute copy is not on CUDA"),
            },
        };
        cuda_dispatch!("adamw", dtype, adamw(p, pl, m, ml, v, vl, g, gl, shadow, &self.u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps against the update written out in scalar f64, as torch.optim.AdamW computes it.
    #[test]
    fn matches_the_scalar_adamw_rule() {
        let p0 = vec![0.5f64, -1.0, 2.0, 0.0];
        let grads = [vec![0.1f64, -0.2, 0.3, 0.0], vec![-0.4f64, 0.5, 0.1, 1e-3]];
        let p = Tensor::new(p0.as_slice(), &Device::Cpu).unwrap();
        let m = p.zeros_like().unwrap();
        let v = p.zeros_like().unwrap();
        let (lr, b1, b2, eps, wd) = (1e-2, 0.9, 0.95, 1e-8, 0.05);
        let mut want = p0.clone();
        let (mut wm, mut wv) = (vec![0.0; 4], vec![0.0; 4]);
        for (t, g) in grads.iter().enumerate() {
            let step = t as u64 + 1;
            adamw_update(&p, &m, &v, &Tensor::new(g.as_slice(), &Device::Cpu).unwrap(), &AdamWUpdate { lr, beta1: b1, beta2: b2, eps, weight_decay: wd, step }).unwrap();
            for i in 0..4 {
                want[i] *= 1.0 - lr * wd;
                wm[i] = b1 * wm[i] + (1.0 - b1) * g[i];
                wv[i] = b2 * wv[i] + (1.0 - b2) * g[i] * g[i];
                let denom = wv[i].sqrt() / (1.0 - b2.powi(step as i32)).sqrt() + eps;
                want[i] -= lr / (1.0 - b1.powi(step as i32)) * wm[i] / denom;
            }
        }
        let got = p.to_vec1::<f64>().unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-15, "{a} vs {b}");
        }
    }
}
