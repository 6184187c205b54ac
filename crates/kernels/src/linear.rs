//! Fully connected layer `y = x W^T + b` as one op with one backward.
//!
//! Composed from candle ops, a linear layer is reshape -> transpose -> matmul -> broadcast add ->
//! reshape, and candle's backward allocates, zero-fills and accumulates a gradient for every one
//! of those nodes (the transposed weight's gradient is even materialized twice). ConvMAE is mostly
//! linear layers (1x1 convs, MLPs, qkv/proj), so this op computes forward and all three gradients
//! straight with gemm, on the layouts the model already has: the `gemm` crate on the CPU, cuBLAS
//! on CUDA (src/cuda.rs `linear_fwd` / `linear_bwd`).

use crate::{row_major, Element};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

thread_local! {
    static FORCED_EPILOGUE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Whether a linear layer on CUDA takes its bias (and residual) inside its gemm, by cuBLASLt's
/// epilogues (gemm_epilogue.rs), where cuBLASLt serves its shape: `CONVMAE_GEMM_EPILOGUE`
/// (`cublaslt`, the default, or `off`: the bias by our row kernels, as before the epilogues),
/// read once per process, unless `with_gemm_epilogue` decides. The CPU ignores it.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn gemm_epilogue_on() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    FORCED_EPILOGUE.with(|c| c.get()).unwrap_or_else(|| !*OFF.get_or_init(|| crate::env_switch("CONVMAE_GEMM_EPILOGUE", "cublaslt", "off")))
}

/// Runs `f` with the gemm epilogues on or off whatever `CONVMAE_GEMM_EPILOGUE` says: the
/// agreement check measures both forms of the linear ops with it. Nested calls restore the outer
/// choice, also on a panic.
pub fn with_gemm_epilogue<R>(on: bool, f: impl FnOnce() -> R) -> R {
    crate::composite::with_override(&FORCED_EPILOGUE, on, f)
}

fn threads() -> Parallelism {
    match rayon::current_num_threads() {
        1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// dst[m x n] (row-major) = (read_dst ? dst : 0) + lhs * rhs, with explicit (column, row) strides.
#[allow(clippy::too_many_arguments)]
fn matmul<T: Element>(m: usize, n: usize, k: usize, dst: &mut [T], read_dst: bool, lhs: &[T], lhs_cs: isize, lhs_rs: isize, rhs: &[T], rhs_cs: isize, rhs_rs: isize) {
    assert!(dst.len() >= m * n);
    // SAFETY: the strides describe in-bounds views of `lhs` and `rhs` (checked by the callers'
    // shape validation), and `dst` holds m x n row-major elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            read_dst,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            threads(),
        )
    }
}

/// Shapes of a linear call: rows of x, input width, output width.
fn dims(x: &Layout, w: &Layout, b: &Layout) -> Result<(usize, usize, usize)> {
    let inp = *x.dims().last().unwrap_or(&0);
    let out = *w.dims().first().unwrap_or(&0);
    if inp == 0 || out == 0 || w.shape().elem_count() != out * inp || b.shape().elem_count() != out || b.dims().len() != 1 {
        return Err(candle_core::Error::Msg(format!(
            "linear: input {:?}, weight {:?} and bias {:?} do not fit (weight must be [out, in] or [out, in, 1, 1], bias [out])",
            x.dims(),
            w.dims(),
            b.dims()
        )));
    }
    Ok((x.shape().elem_count() / inp, inp, out))
}

/// x W^T + b for x [rows, inp], W [out, inp], b [out].
pub(crate) fn forward<T: Element>(x: &[T], w: &[T], b: &[T], rows: usize, inp: usize, out: usize) -> Vec<T> {
    let mut y = vec![T::ZERO; rows * out];
    y.par_chunks_mut(out.max(1) * 64).for_each(|chunk| {
        for row in chunk.chunks_mut(out) {
            row.copy_from_slice(b);
        }
    });
    accumulate(&mut y, x, w, rows, inp, out);
    y
}

/// y += x W^T, y [rows, out] already holding the additive terms (the bias, or a residual).
pub(crate) fn accumulate<T: Element>(y: &mut [T], x: &[T], w: &[T], rows: usize, inp: usize, out: usize) {
    // W^T[i, o] = w[o * inp + i], so column stride inp, row stride 1.
    matmul(rows, out, inp, y, true, x, 1, inp as isize, w, inp as isize, 1);
}

/// [dx (rows x in) | dW (out x in) | db (out)] in one buffer.
pub(crate) fn backward<T: Element>(x: &[T], w: &[T], g: &[T], rows: usize, inp: usize, out: usize) -> Vec<T> {
    let mut all = vec![T::ZERO; rows * inp + out * inp + out];
    let (dx, rest) = all.split_at_mut(rows * inp);
    let (dw, db) = rest.split_at_mut(out * inp);
    // dx = g * W
    matmul(rows, inp, out, dx, false, g, 1, out as isize, w, 1, inp as isize);
    // dW = g^T * x: g^T[o, r] = g[r * out + o]
    matmul(out, inp, rows, dw, false, g, out as isize, 1, x, 1, inp as isize);
    column_sums_into(g, rows, db);
    all
}

/// `db` (zeros, `out` long) += the column sums of `g` ([rows, out]), each column summed in row
/// order (deterministic): a bias's gradient.
pub(crate) fn column_sums_into<T: Element>(g: &[T], rows: usize, db: &mut [T]) {
    const COLS: usize = 64;
    let out = db.len();
    db.par_chunks_mut(COLS).enumerate().for_each(|(ci, cols)| {
        let c0 = ci * COLS;
        for r in 0..rows {
            let row = &g[r * out + c0..r * out + c0 + cols.len()];
            for (acc, &v) in cols.iter_mut().zip(row) {
                *acc += v;
            }
        }
    });
}

struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout, sb: &CpuStorage, lb: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, inp, out) = dims(lx, lw, lb)?;
        let mut shape = lx.dims().to_vec();
        *shape.last_mut().unwrap() = out;
        let y = dispatch_float!("linear", (sx => x, sw => w, sb => b), {
            Element::into_storage(forward(&row_major(x, lx), &row_major(w, lw), &row_major(b, lb), rows, inp, out))
        });
        Ok((y, Shape::from(shape)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, linear_fwd};
        use candle_core::backend::BackendStorage;
        let (rows, inp, out) = dims(lx, lw, lb)?;
        let mut shape = lx.dims().to_vec();
        *shape.last_mut().unwrap() = out;
        let y = cuda_dispatch!("linear", sx.dtype(), linear_fwd(sx, lx, sw, lw, sb, lb, None, (rows, inp, out)))?;
        Ok((y, Shape::from(shape)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        unpack_grads(&x.apply_op3_no_bwd(w, grad, &LinearBackward)?, x, w, b)
    }
}

type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// The packed [dx | dW | db] of a backward op, as views shaped like x, w and b.
fn unpack_grads(all: &Tensor, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Grads3> {
    let (inp, out) = (x.dim(candle_core::D::Minus1)?, w.dim(0)?);
    let rows = x.elem_count() / inp;
    let dx = all.narrow(0, 0, rows * inp)?.reshape(x.shape())?;
    let dw = all.narrow(0, rows * inp, out * inp)?.reshape(w.shape())?;
    let db = all.narrow(0, rows * inp + out * inp, out)?.reshape(b.shape())?;
    Ok((Some(dx), Some(dw), Some(db)))
}

/// (x, w, grad) -> the three gradients concatenated (see `backward`).
struct LinearBackward;

impl CustomOp3 for LinearBackward {
    fn name(&self) -> &'static str {
        "linear_backward"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout, sg: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, inp, out) = backward_dims(lx, lw, lg)?;
        let n = rows * inp + out * inp + out;
        let r = dispatch_float!("linear_backward", (sx => x, sw => w, sg => g), {
            Element::into_storage(backward(&row_major(x, lx), &row_major(w, lw), &row_major(g, lg), rows, inp, out))
        });
        Ok((r, Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, linear_bwd};
        use candle_core::backend::BackendStorage;
        let (rows, inp, out) = backward_dims(lx, lw, lg)?;
        let r = cuda_dispatch!("linear_backward", sx.dtype(), linear_bwd(sx, lx, sw, lw, sg, lg, (rows, inp, out)))?;
        Ok((r, Shape::from(rows * inp + out * inp + out)))
    }
}

/// Rows, input and output width of a backward call, with the gradient checked against them.
fn backward_dims(lx: &Layout, lw: &Layout, lg: &Layout) -> Result<(usize, usize, usize)> {
    let inp = *lx.dims().last().unwrap_or(&0);
    let out = *lw.dims().first().unwrap_or(&0);
    let rows = lx.shape().elem_count().checked_div(inp).unwrap_or(0);
    if lg.shape().elem_count() != rows * out || lw.shape().elem_count() != out * inp {
        return Err(candle_core::Error::Msg(format!(
            "linear_backward: gradient {:?} does not match input {:?} and weight {:?}",
            lg.dims(),
            lx.dims(),
            lw.dims()
        )));
    }
    Ok((rows, inp, out))
}

/// What the fused linear + GELU forward keeps for its backward: the pre-activation
/// h = x W^T + b, on the device that computed it. (The composition keeps the same tensor, as
/// the GELU's input; here it never becomes a graph node.)
enum PreActivation {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::CudaStorage),
}

type PreActivationSlot = Arc<Mutex<Option<PreActivation>>>;

fn missing_pre_activation() -> candle_core::Error {
    candle_core::Error::Msg("linear_gelu_backward: the forward's pre-activation is missing (backward of an op that never ran forward on this device)".into())
}

/// gelu(x W^T + b): the MLP's fc1 and its activation as one op. Besides the GELU's own forward
/// pass, it saves candle's per-node gradient bookkeeping for the [rows, 4 * D] tensor between
/// them (a zero-filled buffer and an add, the widest tensors of every block).
struct LinearGelu {
    pre: PreActivationSlot,
}

impl CustomOp3 for LinearGelu {
    fn name(&self) -> &'static str {
        "linear_gelu"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout, sb: &CpuStorage, lb: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, inp, out) = dims(lx, lw, lb)?;
        let mut shape = lx.dims().to_vec();
        *shape.last_mut().unwrap() = out;
        let (h, y) = dispatch_float!("linear_gelu", (sx => x, sw => w, sb => b), {
            let h = forward(&row_major(x, lx), &row_major(w, lw), &row_major(b, lb), rows, inp, out);
            let y = crate::gelu::map1(&h);
            (Element::into_storage(h), Element::into_storage(y))
        });
        *self.pre.lock().unwrap_or_else(|e| e.into_inner()) = Some(PreActivation::Cpu(h));
        Ok((y, Shape::from(shape)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, gelu_fwd, linear_fwd};
        use candle_core::backend::BackendStorage;
        let (rows, inp, out) = dims(lx, lw, lb)?;
        let mut shape = lx.dims().to_vec();
        *shape.last_mut().unwrap() = out;
        let h = cuda_dispatch!("linear_gelu", sx.dtype(), linear_fwd(sx, lx, sw, lw, sb, lb, None, (rows, inp, out)))?;
        let y = cuda_dispatch!("linear_gelu", h.dtype(), gelu_fwd(&h, &Layout::contiguous(rows * out)))?;
        *self.pre.lock().unwrap_or_else(|e| e.into_inner()) = Some(PreActivation::Cuda(h));
        Ok((y, Shape::from(shape)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Grads3> {
        unpack_grads(&x.apply_op3_no_bwd(w, grad, &LinearGeluBackward { pre: self.pre.clone() })?, x, w, b)
    }
}

/// (x, w, grad) -> [dx | dW | db] of gelu(x W^T + b), from the saved pre-activation h: the
/// linear backward of grad * gelu'(h).
struct LinearGeluBackward {
    pre: PreActivationSlot,
}

impl CustomOp3 for LinearGeluBackward {
    fn name(&self) -> &'static str {
        "linear_gelu_backward"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout, sg: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, inp, out) = backward_dims(lx, lw, lg)?;
        let pre = self.pre.lock().unwrap_or_else(|e| e.into_inner());
        let Some(PreActivation::Cpu(sh)) = pre.as_ref() else { return Err(missing_pre_activation()) };
        let r = dispatch_float!("linear_gelu_backward", (sx => x, sw => w, sg => g, sh => h), {
            if h.len() != rows * out {
                return Err(missing_pre_activation());
            }
            let gh = crate::gelu::zip_map(h, &row_major(g, lg));
            Element::into_storage(backward(&row_major(x, lx), &row_major(w, lw), &gh, rows, inp, out))
        });
        Ok((r, Shape::from(rows * inp + out * inp + out)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, gelu_bwd, linear_bwd};
        use candle_core::backend::BackendStorage;
        let (rows, inp, out) = backward_dims(lx, lw, lg)?;
        let pre = self.pre.lock().unwrap_or_else(|e| e.into_inner());
        let Some(PreActivation::Cuda(h)) = pre.as_ref() else { return Err(missing_pre_activation()) };
        let h_l = Layout::contiguous(rows * out);
        let gh = cuda_dispatch!("linear_gelu_backward", h.dtype(), gelu_bwd(h, &h_l, sg, lg))?;
        let r = cuda_dispatch!("linear_gelu_backward", sx.dtype(), linear_bwd(sx, lx, sw, lw, &gh, &h_l, (rows, inp, out)))?;
        Ok((r, Shape::from(rows * inp + out * inp + out)))
    }
}

/// `x @ weight^T + bias` over the last dim of `x` (any leading dims). `weight` is [out, in] or a
/// [out, in, 1, 1] 1x1-conv kernel; `bias` is [out]. Differentiable w.r.t. all three.
///
/// On CUDA the op's gemms are cuBLAS, as the composition's are; what the op saves there is the
/// rest of the composition: its bias add, and in the backward the gradient candle allocates,
/// zero-fills and accumulates for each of its five nodes (reshapes, transpose, matmul,
/// broadcast add), several passes over activation-sized tensors per layer. The bias gradient is
/// summed in f32 whatever the storage type.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let kernel = crate::composite::use_kernel(&[x, weight, bias])
        && (x.device().is_cpu() || !crate::composite::OpSwitch::Linear.composite());
    if !kernel {
        return crate::composite::linear(x, weight, bias);
    }
    crate::tape::apply3(x, weight, bias, Linear)
}

/// `gelu_erf(linear(x, weight, bias))` as one op (an MLP's first layer and its activation),
/// where `linear` would use our op; the two ops otherwise.
pub fn linear_gelu(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let kernel = crate::composite::use_kernel(&[x, weight, bias])
        && (x.device().is_cpu() || !crate::composite::OpSwitch::Linear.composite());
    if !kernel {
        return crate::gelu_erf(&linear(x, weight, bias)?);
    }
    crate::tape::apply3(x, weight, bias, LinearGelu { pre: Arc::new(Mutex::new(None)) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        d / b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    /// Forward and all three gradients against candle's composed matmul (the reference), f64.
    #[test]
    fn matches_composed_matmul_forward_and_backward() {
        for (shape, out) in [(vec![7usize, 5], 3usize), (vec![2, 3, 9], 4), (vec![130, 33], 70)] {
            let inp = *shape.last().unwrap();
            let x = Var::from_tensor(&rand(&shape, 1)).unwrap();
            let w = Var::from_tensor(&rand(&[out, inp], 2)).unwrap();
            let b = Var::from_tensor(&rand(&[out], 3)).unwrap();
            let mut oshape = shape.clone();
            *oshape.last_mut().unwrap() = out;
            let cot = rand(&oshape, 4);
            let ours = linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
            let rows = x.elem_count() / inp;
            let reference = x
                .as_tensor()
                .reshape((rows, inp))
                .unwrap()
                .matmul(&w.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap()
                .reshape(oshape.as_slice())
                .unwrap();
            assert!(max_rel(&ours, &reference) < 1e-13);
            let g1 = (ours * &cot).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (reference * &cot).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w, &b] {
                let (a, r) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(max_rel(a, r) < 1e-13, "{shape:?}");
            }
        }
    }

    /// The fused fc1 + GELU against the two ops it replaces, f64 and f32: forward and all three
    /// gradients (the backward reads the pre-activation the forward saved).
    #[test]
    fn linear_gelu_matches_linear_then_gelu() {
        for dtype in [DType::F64, DType::F32] {
            let to = |t: Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
            let (x, w, b) = (to((rand(&[2, 5, 9], 11) * 2.0).unwrap()), to(rand(&[13, 9], 12)), to(rand(&[13], 13)));
            let cot = rand(&[2, 5, 13], 14).to_dtype(dtype).unwrap();
            let fused = linear_gelu(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
            let reference = crate::gelu_erf(&linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap()).unwrap();
            let tol = if dtype == DType::F64 { 1e-14 } else { 1e-6 };
            crate::test_util::assert_same_function(fused, reference, &cot, &[("x", &x), ("w", &w), ("b", &b)], tol);
        }
    }

    #[test]
    fn finite_differences_f64() {
        let x = Var::from_tensor(&rand(&[3, 4], 5)).unwrap();
        let w = Var::from_tensor(&rand(&[2, 4], 6)).unwrap();
        let b = Var::from_tensor(&rand(&[2], 7)).unwrap();
        let f = |x: &Tensor, w: &Tensor, b: &Tensor| linear(x, w, b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let grads = linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let h = 1e-6;
        for (vi, v) in [&x, &w, &b].into_iter().enumerate() {
            let base = v.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let g = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for i in 0..base.len() {
                let bump = |d: f64| {
                    let mut p = base.clone();
                    p[i] += d;
                    Tensor::from_vec(p, v.shape(), &Device::Cpu).unwrap()
                };
                let args = |t: Tensor| match vi {
                    0 => f(&t, w.as_tensor(), b.as_tensor()),
                    1 => f(x.as_tensor(), &t, b.as_tensor()),
                    _ => f(x.as_tensor(), w.as_tensor(), &t),
                };
                let fd = (args(bump(h)) - args(bump(-h))) / (2.0 * h);
                assert!((fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()), "arg {vi} elem {i}: {fd} vs {}", g[i]);
            }
        }
    }

    #[test]
    fn f32_agrees_with_f64_and_shapes_are_checked() {
        let (x, w, b) = (rand(&[6, 5], 8), rand(&[3, 5], 9), rand(&[3], 10));
        let a = linear(&x, &w, &b).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let c = linear(&f(&x), &f(&w), &f(&b)).unwrap().to_dtype(DType::F64).unwrap();
        assert!(max_rel(&c, &a) < 1e-6);
        let e = linear(&x, &rand(&[3, 4], 1), &b).unwrap_err().to_string();
        assert!(e.contains("linear") && e.contains("[6, 5]") && e.contains("[3, 4]"), "{e}");
    }

    /// `with_gemm_epilogue` decides over the environment on this thread, nests, and restores
    /// on the way out, also after a panic: the agreement's plain-gemm rows rely on it.
    #[test]
    fn with_gemm_epilogue_overrides_and_restores() {
        use super::{gemm_epilogue_on, with_gemm_epilogue};
        let outside = gemm_epilogue_on();
        with_gemm_epilogue(false, || {
            assert!(!gemm_epilogue_on());
            with_gemm_epilogue(true, || assert!(gemm_epilogue_on()));
            assert!(!gemm_epilogue_on());
        });
        assert_eq!(gemm_epilogue_on(), outside);
        let panicked = std::panic::catch_unwind(|| with_gemm_epilogue(!outside, || panic!("inside")));
        assert!(panicked.is_err());
        assert_eq!(gemm_epilogue_on(), outside, "restored after a panic");
    }
}
