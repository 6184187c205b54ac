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

fn forward<T: Element>(x: &[T], w: &[T], b: &[T], rows: usize, inp: usize, out: usize) -> Vec<T> {
    let mut y = vec![T::ZERO; rows * out];
    y.par_chunks_mut(out.max(1) * 64).for_each(|chunk| {
        for row in chunk.chunks_mut(out) {
            row.copy_from_slice(b);
        }
    });
    // y += x * W^T: W^T[i, o] = w[o * inp + i], so column stride inp, row stride 1.
    matmul(rows, out, inp, &mut y, true, x, 1, inp as isize, w, inp as isize, 1);
    y
}

/// [dx (rows x in) | dW (out x in) | db (out)] in one buffer.
fn backward<T: Element>(x: &[T], w: &[T], g: &[T], rows: usize, inp: usize, out: usize) -> Vec<T> {
    let mut all = vec![T::ZERO; rows * inp + out * inp + out];
    let (dx, rest) = all.split_at_mut(rows * inp);
    let (dw, db) = rest.split_at_mut(out * inp);
    // dx = g * W
    matmul(rows, inp, out, dx, false, g, 1, out as isize, w, 1, inp as isize);
    // dW = g^T * x: g^T[o, r] = g[r * out + o]
    matmul(out, inp, rows, dw, false, g, out as isize, 1, x, 1, inp as isize);
    // db = column sums of g, each column summed in row order (deterministic).
    const COLS: usize = 64;
    db.par_chunks_mut(COLS).enumerate().for_each(|(ci, cols)| {
        let c0 = ci * COLS;
        for r in 0..rows {
            let row = &g[r * out + c0..r * out + c0 + cols.len()];
            for (acc, &v) in cols.iter_mut().zip(row) {
                *acc += v;
            }
        }
    });
    all
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
        let y = cuda_dispatch!("linear", sx.dtype(), linear_fwd(sx, lx, sw, lw, sb, lb, (rows, inp, out)))?;
        Ok((y, Shape::from(shape)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (inp, out) = (x.dim(candle_core::D::Minus1)?, w.dim(0)?);
        let rows = x.elem_count() / inp;
        let all = x.apply_op3_no_bwd(w, grad, &LinearBackward)?;
        let dx = all.narrow(0, 0, rows * inp)?.reshape(x.shape())?;
        let dw = all.narrow(0, rows * inp, out * inp)?.reshape(w.shape())?;
        let db = all.narrow(0, rows * inp + out * inp, out)?.reshape(b.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
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
        && (x.device().is_cpu() || !crate::composite::CudaSwitch::Linear.composite());
    if !kernel {
        return crate::composite::linear(x, weight, bias);
    }
    x.apply_op3(weight, bias, Linear)
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
}
