//! A pre-norm MLP sublayer with its residual, `x + fc2(gelu(fc1(layer_norm(x))))`, as one op.
//!
//! Every ConvMAE block ends in this sublayer (the conv blocks of stages 1-2 and the transformer
//! blocks of stage 3 and the decoder). As five separate ops it costs, besides the work itself:
//! - memory: candle's graph keeps each op's inputs until the backward, so the LayerNorm output
//!   ([rows, D]), the GELU output ([rows, 4D]) and the fc2 output ([rows, D], held by the
//!   residual add) live from forward to backward, 6 of the block's ~18 [rows, D]-sized tensors;
//! - traffic: candle's backward zero-fills and accumulates a gradient for every op input, one
//!   [rows, 4D] and three [rows, D] buffers here, each written, read and written again.
//!
//! This op keeps only its input x (the graph's) and the fc1 pre-activation h ([rows, 4D]), and
//! recomputes the LayerNorm output and gelu(h) in its backward: two cheap row passes instead of
//! 6 D of memory a block. Its arguments are x, the two weight matrices packed into one tensor,
//! and the four vectors (LayerNorm weight and bias, fc1 and fc2 biases) packed into another, so
//! that it fits candle's three-argument custom op; the packing copies only parameters.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::composite::Choice;
use crate::{row_major, Element};

const OP_NAME: &str = "mlp_residual";
const GRAD_NAME: &str = "mlp_residual_backward";

/// Widths of the sublayer: D (input and output) and the hidden width (4D in ConvMAE).
#[derive(Clone, Copy, Debug)]
struct Widths {
    d: usize,
    hidden: usize,
}

impl Widths {
    fn weights(self) -> usize {
        2 * self.hidden * self.d
    }
    /// [ln weight (D) | ln bias (D) | fc1 bias (hidden) | fc2 bias (D)].
    fn vectors(self) -> usize {
        3 * self.d + self.hidden
    }
    fn rows(self, x: &Layout) -> usize {
        x.shape().elem_count() / self.d
    }
}

/// What the forward keeps for the backward: the fc1 pre-activation, the packed vectors (the
/// backward recomputes the LayerNorm from them, and candle's backward op has no fourth
/// argument) and, on CUDA, the LayerNorm's row statistics.
enum Saved {
    Cpu { h: CpuStorage, vectors: CpuStorage },
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda::MlpSaved>),
}

type SavedSlot = Arc<Mutex<Option<Saved>>>;

fn missing_saved() -> candle_core::Error {
    candle_core::Error::Msg(format!("{GRAD_NAME}: the forward's saved tensors are missing (backward of an op that never ran forward on this device)"))
}

struct MlpResidual {
    widths: Widths,
    eps: f64,
    saved: SavedSlot,
}

impl MlpResidual {
    fn check(&self, x: &Layout, weights: &Layout, vectors: &Layout) -> Result<usize> {
        let Widths { d, hidden } = self.widths;
        if x.dims().last() != Some(&d) || weights.shape().elem_count() != self.widths.weights() || vectors.shape().elem_count() != self.widths.vectors() {
            candle_core::bail!(
                "{OP_NAME}: input {:?}, packed weights {:?} and packed vectors {:?} do not fit D = {d}, hidden = {hidden}",
                x.dims(),
                weights.dims(),
                vectors.dims()
            );
        }
        Ok(self.widths.rows(x))
    }
}

/// The forward on the CPU: (y, h).
fn forward<T: crate::gelu::GeluFloat>(x: &[T], weights: &[T], vectors: &[T], rows: usize, Widths { d, hidden }: Widths, eps: T) -> (Vec<T>, Vec<T>) {
    let (w1, w2) = weights.split_at(hidden * d);
    let (ln_w, rest) = vectors.split_at(d);
    let (ln_b, rest) = rest.split_at(d);
    let (b1, b2) = rest.split_at(hidden);
    let xln = crate::layer_norm::forward(x, ln_w, ln_b, d, eps);
    let h = crate::linear::forward(&xln, w1, b1, rows, d, hidden);
    drop(xln);
    let a = crate::gelu::map1(&h);
    // y = x + b2, then y += a W2^T.
    let mut y = x.to_vec();
    y.par_chunks_mut(d * 64).for_each(|chunk| {
        for row in chunk.chunks_mut(d) {
            for (v, &b) in row.iter_mut().zip(b2) {
                *v += b;
            }
        }
    });
    crate::linear::accumulate(&mut y, &a, w2, rows, hidden, d);
    (y, h)
}

/// The backward on the CPU: [dx (rows x D) | dW1 | dW2 | d ln_w | d ln_b | d b1 | d b2], the
/// gradients of x, the packed weights and the packed vectors, in that order.
#[allow(clippy::too_many_arguments)]
fn backward<T: crate::gelu::GeluFloat>(x: &[T], weights: &[T], vectors: &[T], h: &[T], g: &[T], rows: usize, widths: Widths, eps: T) -> Vec<T> {
    let Widths { d, hidden } = widths;
    let (w1, w2) = weights.split_at(hidden * d);
    let (ln_w, rest) = vectors.split_at(d);
    let (ln_b, _) = rest.split_at(d);
    // fc2: a = gelu(h) recomputed.
    let a = crate::gelu::map1(h);
    let fc2 = crate::linear::backward(&a, w2, g, rows, hidden, d);
    drop(a);
    let (da, fc2_params) = fc2.split_at(rows * hidden);
    let (dw2, db2) = fc2_params.split_at(d * hidden);
    let gh = crate::gelu::zip_map(h, da);
    // fc1: the LayerNorm output recomputed.
    let xln = crate::layer_norm::forward(x, ln_w, ln_b, d, eps);
    let fc1 = crate::linear::backward(&xln, w1, &gh, rows, d, hidden);
    drop((xln, gh));
    let (dxln, fc1_params) = fc1.split_at(rows * d);
    let (dw1, db1) = fc1_params.split_at(hidden * d);
    let ln = crate::layer_norm::backward(x, ln_w, dxln, rows, d, eps);
    let (dx_ln, ln_params) = ln.split_at(rows * d);
    let (dln_w, dln_b) = ln_params.split_at(d);
    let mut out = Vec::with_capacity(rows * d + widths.weights() + widths.vectors());
    // dx = g (the residual) + the LayerNorm path.
    out.extend_from_slice(g);
    out.par_chunks_mut(d * 64).zip(dx_ln.par_chunks(d * 64)).for_each(|(o, l)| {
        for (o, &l) in o.iter_mut().zip(l) {
            *o += l;
        }
    });
    for part in [dw1, dw2, dln_w, dln_b, db1, db2] {
        out.extend_from_slice(part);
    }
    out
}

impl CustomOp3 for MlpResidual {
    fn name(&self) -> &'static str {
        OP_NAME
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout, sv: &CpuStorage, lv: &Layout) -> Result<(CpuStorage, Shape)> {
        let rows = self.check(lx, lw, lv)?;
        let (y, h, vectors) = dispatch_float!(OP_NAME, (sx => x, sw => w, sv => v), {
            let vectors = row_major(v, lv);
            let (y, h) = forward(&row_major(x, lx), &row_major(w, lw), &vectors, rows, self.widths, Element::from_f64(self.eps));
            (Element::into_storage(y), Element::into_storage(h), Element::into_storage(vectors.into_owned()))
        });
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved::Cpu { h, vectors });
        Ok((y, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sv: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, mlp_residual_fwd};
        use candle_core::backend::BackendStorage;
        let rows = self.check(lx, lw, lv)?;
        let Widths { d, hidden } = self.widths;
        let (y, saved) = cuda_dispatch!(OP_NAME, sx.dtype(), mlp_residual_fwd(sx, lx, sw, lw, sv, lv, (rows, d, hidden), self.eps))?;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved::Cuda(Box::new(saved)));
        Ok((y, lx.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, weights: &Tensor, vectors: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let rows = x.elem_count() / self.widths.d;
        let backward = MlpResidualBackward { widths: self.widths, eps: self.eps, saved: self.saved.clone() };
        let all = x.apply_op3_no_bwd(weights, grad, &backward)?;
        let (nx, nw) = (rows * self.widths.d, self.widths.weights());
        let dx = all.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dw = all.narrow(0, nx, nw)?.reshape(weights.shape())?;
        let dv = all.narrow(0, nx + nw, self.widths.vectors())?.reshape(vectors.shape())?;
        Ok((Some(dx), Some(dw), Some(dv)))
    }
}

/// (x, packed weights, grad) -> the packed gradients (see `backward`), from what the forward saved.
struct MlpResidualBackward {
    widths: Widths,
    eps: f64,
    saved: SavedSlot,
}

impl MlpResidualBackward {
    fn check(&self, x: &Layout, weights: &Layout, grad: &Layout) -> Result<usize> {
        crate::same_shape(GRAD_NAME, "input", x.dims(), "output-gradient", grad.dims())?;
        if x.dims().last() != Some(&self.widths.d) || weights.shape().elem_count() != self.widths.weights() {
            candle_core::bail!("{GRAD_NAME}: input {:?} and packed weights {:?} do not fit D = {}, hidden = {}", x.dims(), weights.dims(), self.widths.d, self.widths.hidden);
        }
        Ok(self.widths.rows(x))
    }

    fn out_len(&self, rows: usize) -> usize {
        rows * self.widths.d + self.widths.weights() + self.widths.vectors()
    }
}

impl CustomOp3 for MlpResidualBackward {
    fn name(&self) -> &'static str {
        GRAD_NAME
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout, sg: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let rows = self.check(lx, lw, lg)?;
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(Saved::Cpu { h: sh, vectors: sv }) = saved.as_ref() else { return Err(missing_saved()) };
        let out = dispatch_float!(GRAD_NAME, (sx => x, sw => w, sg => g, sh => h, sv => v), {
            if h.len() != rows * self.widths.hidden {
                return Err(missing_saved());
            }
            let eps = Element::from_f64(self.eps);
            Element::into_storage(backward(&row_major(x, lx), &row_major(w, lw), v, h, &row_major(g, lg), rows, self.widths, eps))
        });
        Ok((out, Shape::from(self.out_len(rows))))
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
        use crate::cuda::{cuda_dispatch, mlp_residual_bwd};
        use candle_core::backend::BackendStorage;
        let rows = self.check(lx, lw, lg)?;
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(Saved::Cuda(saved)) = saved.as_ref() else { return Err(missing_saved()) };
        let Widths { d, hidden } = self.widths;
        let out = cuda_dispatch!(GRAD_NAME, sx.dtype(), mlp_residual_bwd(sx, lx, sw, lw, sg, lg, saved, (rows, d, hidden), self.eps))?;
        Ok((out, Shape::from(self.out_len(rows))))
    }
}

/// `x + fc2(gelu(fc1(layer_norm(x, ln_w, ln_b, eps))))` over the last dim of `x`: the MLP
/// sublayer of a pre-norm block with its residual. `fc1` is (weight [hidden, D], bias
/// [hidden]), `fc2` is (weight [D, hidden], bias [D]); 1x1-conv weights ([out, in, 1, 1]) are
/// accepted. Differentiable w.r.t. everything. Where our kernels do not serve the arguments, or
/// where `CONVMAE_MLP` says so, the same thing from the separate ops.
///
/// Measured on 2 CPU cores, ConvMAE-B at batch 8 (benches/results, tags `mlp-ab3-*`,
/// `mlp-ab4-*`): step time unchanged within noise (2129 / 2211 ms vs 2185 / 2162 ms for the
/// separate ops), peak RSS a steady 3.34 GB where the separate ops peaked at 3.38 to 3.95 GB.
/// What it saves grows with the batch (activation-sized buffers and traffic); what it costs
/// does not (packing the two weight matrices and their gradient every step, and recomputing
/// the LayerNorm and GELU in the backward). The GPU check's op timings compare the two forms
/// at batch 64 (`mlp_residual:decoder`, `mlp_separate:decoder`).
pub fn mlp_residual(x: &Tensor, norm: (&Tensor, &Tensor), eps: f64, fc1: (&Tensor, &Tensor), fc2: (&Tensor, &Tensor)) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let hidden = fc1.0.dim(0)?;
    let widths = Widths { d, hidden };
    let shapes_fit = norm.0.elem_count() == d
        && norm.1.elem_count() == d
        && fc1.0.elem_count() == hidden * d
        && fc1.1.elem_count() == hidden
        && fc2.0.elem_count() == d * hidden
        && fc2.0.dim(0)? == d
        && fc2.1.elem_count() == d;
    if !shapes_fit {
        candle_core::bail!(
            "{OP_NAME}: input {:?}, norm {:?} / {:?}, fc1 {:?} / {:?} and fc2 {:?} / {:?} do not fit one MLP",
            x.dims(),
            norm.0.dims(),
            norm.1.dims(),
            fc1.0.dims(),
            fc1.1.dims(),
            fc2.0.dims(),
            fc2.1.dims()
        );
    }
    let args = [x, norm.0, norm.1, fc1.0, fc1.1, fc2.0, fc2.1];
    let kernel = crate::composite::use_kernel(&args) && crate::composite::OpSwitch::Mlp.choice() != Choice::Composite;
    if !kernel {
        let h = crate::layer_norm(x, norm.0, norm.1, eps)?;
        let h = crate::linear_gelu(&h, fc1.0, fc1.1)?;
        return x + crate::linear(&h, fc2.0, fc2.1)?;
    }
    let weights = Tensor::cat(&[fc1.0.flatten_all()?, fc2.0.flatten_all()?], 0)?;
    let vectors = Tensor::cat(&[norm.0.flatten_all()?, norm.1.flatten_all()?, fc1.1.flatten_all()?, fc2.1.flatten_all()?], 0)?;
    x.apply_op3(&weights, &vectors, MlpResidual { widths, eps, saved: Arc::new(Mutex::new(None)) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let v = crate::agreement::values(shape.iter().product(), seed);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        let b = b.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
        a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale.max(f64::MIN_POSITIVE)
    }

    /// The op against the five ops it replaces (our LayerNorm, linear + GELU, linear, add),
    /// f64 and f32, forward and every gradient, with a conv-shaped fc2 weight and a strided
    /// input.
    #[test]
    fn matches_the_separate_ops_forward_and_backward() {
        for dtype in [DType::F64, DType::F32] {
            let (d, hidden) = (6, 10);
            let to = |t: Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
            let x_t = to((rand(&[2, d, 7], 1) * 3.0).unwrap());
            let ln_w = to((rand(&[d], 2) + 1.0).unwrap());
            let ln_b = to(rand(&[d], 3));
            let w1 = to(rand(&[hidden, d], 4));
            let b1 = to(rand(&[hidden], 5));
            let w2 = to(rand(&[d, hidden, 1, 1], 6));
            let b2 = to(rand(&[d], 7));
            let cot = rand(&[2, 7, d], 8).to_dtype(dtype).unwrap();
            let x = x_t.as_tensor().transpose(1, 2).unwrap();
            let fused = mlp_residual(&x, (&ln_w, &ln_b), 1e-5, (&w1, &b1), (&w2, &b2)).unwrap();
            let reference = {
                let h = crate::layer_norm(&x, &ln_w, &ln_b, 1e-5).unwrap();
                let h = crate::gelu_erf(&crate::linear(&h, &w1, &b1).unwrap()).unwrap();
                (&x + crate::linear(&h, &w2, &b2).unwrap()).unwrap()
            };
            let tol = if dtype == DType::F64 { 1e-13 } else { 1e-5 };
            assert!(max_rel(&fused, &reference) < tol, "{dtype:?} forward {}", max_rel(&fused, &reference));
            let g1 = (fused * &cot).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (reference * &cot).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x_t), ("ln_w", &ln_w), ("ln_b", &ln_b), ("w1", &w1), ("b1", &b1), ("w2", &w2), ("b2", &b2)] {
                let (a, r) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert_eq!(a.dims(), v.dims(), "{name}");
                assert!(max_rel(a, r) < tol, "{dtype:?} {name}: {}", max_rel(a, r));
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_named() {
        let x = rand(&[3, 4], 1);
        let (v4, w) = (rand(&[4], 2), rand(&[8, 4], 3));
        let e = mlp_residual(&x, (&v4, &v4), 1e-6, (&w, &rand(&[8], 4)), (&rand(&[4, 7], 5), &v4)).unwrap_err().to_string();
        assert!(e.contains("mlp_residual") && e.contains("[4, 7]"), "{e}");
    }
}
