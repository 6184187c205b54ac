//! BatchNorm in training mode over channels-last values `[..., C]`: every row is one position
//! of one image, every column one channel, normalized with the batch's statistics (biased
//! variance), with gradients for the input, weight and bias.
//!
//! Why: written with candle's ops, the statistics are reductions over every dim but the last and
//! each broadcast in the formula has a reduction in its backward. candle's CPU reductions over
//! leading dims are strided loops, and they were a fifth of the detector's step on 2 cores (a
//! perf profile of the digit demo: 22% of samples in `reduce_op`, two thirds of them in the
//! backward). Here the column sums are one pass over contiguous rows. CPU only (f32, f64); the
//! models that use it (segmenter, detector) run on the CPU.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{row_major, Element};

const OP_NAME: &str = "batch_norm";

/// Rows per partial column sum. Fixed (not derived from the thread count) and the partials
/// summed in index order, so every statistic and gradient is bitwise reproducible.
const ROWS_PER_PARTIAL: usize = 64;

/// Checks `x: [..., C]`, `weight: [C]`, `bias: [C]` and returns `(rows, C)`.
fn column_shape(op: &str, x: &[usize], weight: &[usize], bias: &[usize]) -> Result<(usize, usize)> {
    match x.last() {
        Some(&c) if weight == [c] && bias == [c] => Ok((x.iter().product::<usize>() / c.max(1), c)),
        _ => Err(candle_core::Error::Msg(format!(
            "{op}: input shape {x:?}, weight shape {weight:?} and bias shape {bias:?} do not match; expected x [..., C], weight [C] and bias [C]"
        ))
        .bt()),
    }
}

/// Per column, the sum over rows of `f(row values, other row values)`, in f64.
fn column_sums<T: Element + Into<f64>>(a: &[T], b: &[T], c: usize, f: impl Fn(usize, T, T) -> f64 + Sync) -> Vec<f64> {
    let partials: Vec<Vec<f64>> = a
        .par_chunks(ROWS_PER_PARTIAL * c)
        .zip(b.par_chunks(ROWS_PER_PARTIAL * c))
        .map(|(ra, rb)| {
            let mut acc = vec![0.0; c];
            for (row_a, row_b) in ra.chunks(c).zip(rb.chunks(c)) {
                for (j, ((s, &va), &vb)) in acc.iter_mut().zip(row_a).zip(row_b).enumerate() {
                    *s += f(j, va, vb);
                }
            }
            acc
        })
        .collect();
    let mut total = vec![0.0; c];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// Per-channel mean and biased variance of rows `[rows, C]`, two passes in f64.
fn stats<T: Element + Into<f64>>(x: &[T], rows: usize, c: usize) -> (Vec<f64>, Vec<f64>) {
    let n = rows as f64;
    let mean: Vec<f64> = column_sums(x, x, c, |_, v, _| v.into()).into_iter().map(|s| s / n).collect();
    let var = column_sums(x, x, c, |j, v, _| (v.into() - mean[j]).powi(2)).into_iter().map(|s| s / n).collect();
    (mean, var)
}

/// Differentiable training-mode BatchNorm of `x: [..., C]` (batch statistics over all leading
/// dims, biased variance): `(x - mean) / sqrt(var + eps) * weight + bias`. CPU, f32 or f64.
pub fn batch_norm_train(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let (rows, _) = column_shape(OP_NAME, x.dims(), weight.dims(), bias.dims())?;
    if rows < 2 {
        candle_core::bail!("{OP_NAME}: training needs more than one value per channel, got {rows}");
    }
    crate::tape::apply3(x, weight, bias, BatchNorm { eps })
}

/// The batch statistics `batch_norm_train` normalizes `x: [..., C]` with, for the running
/// averages: (mean, unbiased variance), each [C], not differentiated.
pub fn batch_norm_stats(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let c = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / c.max(1);
    if rows < 2 {
        candle_core::bail!("{OP_NAME}: statistics need more than one value per channel, got {rows}");
    }
    let flat = x.detach().flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
    let (mean, var) = stats(&flat, rows, c);
    let unbiased: Vec<f64> = var.iter().map(|v| v * rows as f64 / (rows - 1) as f64).collect();
    let to = |v: Vec<f64>| Tensor::from_vec(v, c, x.device())?.to_dtype(x.dtype());
    Ok((to(mean)?, to(unbiased)?))
}

struct BatchNorm {
    eps: f64,
}

fn forward<T: Element + Into<f64>>(x: &[T], w: &[T], b: &[T], rows: usize, c: usize, eps: f64) -> Vec<T> {
    let (mean, var) = stats(x, rows, c);
    // Per channel: y = x * scale + shift.
    let scale: Vec<f64> = (0..c).map(|j| Into::<f64>::into(w[j]) / (var[j] + eps).sqrt()).collect();
    let shift: Vec<f64> = (0..c).map(|j| Into::<f64>::into(b[j]) - mean[j] * scale[j]).collect();
    let mut out = vec![T::ZERO; x.len()];
    out.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(o, row)| {
        for j in 0..c {
            o[j] = T::from_f64(Into::<f64>::into(row[j]) * scale[j] + shift[j]);
        }
    });
    out
}

/// Gradients `[rows + 2, C]`: grad_x, then grad_weight and grad_bias. With x̂ the normalized
/// input and g the output gradient: grad_bias = Σ g, grad_weight = Σ g x̂, and grad_x = weight /
/// std * (g - mean(g) - x̂ mean(g x̂)) (the batch statistics depend on every row).
fn backward<T: Element + Into<f64>>(x: &[T], w: &[T], g: &[T], rows: usize, c: usize, eps: f64) -> Vec<T> {
    let (mean, var) = stats(x, rows, c);
    let rstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let sum_g = column_sums(g, g, c, |_, v, _| v.into());
    let sum_gx = column_sums(g, x, c, |j, gv, xv| gv.into() * (xv.into() - mean[j]) * rstd[j]);
    let n = rows as f64;
    let mut out = vec![T::ZERO; (rows + 2) * c];
    let (grad_x, params) = out.split_at_mut(rows * c);
    grad_x.par_chunks_mut(c).zip(x.par_chunks(c)).zip(g.par_chunks(c)).for_each(|((o, xr), gr)| {
        for j in 0..c {
            let xhat = (Into::<f64>::into(xr[j]) - mean[j]) * rstd[j];
            o[j] = T::from_f64(Into::<f64>::into(w[j]) * rstd[j] * (Into::<f64>::into(gr[j]) - sum_g[j] / n - xhat * sum_gx[j] / n));
        }
    });
    for j in 0..c {
        params[j] = T::from_f64(sum_gx[j]);
        params[c + j] = T::from_f64(sum_g[j]);
    }
    out
}

impl CustomOp3 for BatchNorm {
    fn name(&self) -> &'static str {
        OP_NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, c) = column_shape(OP_NAME, l1.dims(), l2.dims(), l3.dims())?;
        let out = dispatch_float!(OP_NAME, (s1 => x, s2 => w, s3 => b), {
            Element::into_storage(forward(&row_major(x, l1), &row_major(w, l2), &row_major(b, l3), rows, c, self.eps))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, weight: &Tensor, bias: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, c) = column_shape(OP_NAME, x.dims(), weight.dims(), bias.dims())?;
        let packed = x.apply_op3_no_bwd(weight, grad, &BatchNormGrad { eps: self.eps })?;
        let grad_x = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let grad_w = packed.narrow(0, rows, 1)?.reshape(c)?;
        let grad_b = packed.narrow(0, rows + 1, 1)?.reshape(c)?;
        Ok((Some(grad_x), Some(grad_w), Some(grad_b)))
    }
}

/// `(x [..., C], weight [C], grad_out [..., C]) -> [rows + 2, C]` (see `backward`).
struct BatchNormGrad {
    eps: f64,
}

impl CustomOp3 for BatchNormGrad {
    fn name(&self) -> &'static str {
        "batch_norm_grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::same_shape(self.name(), "input", l1.dims(), "output-gradient", l3.dims())?;
        let (rows, c) = column_shape(self.name(), l1.dims(), l2.dims(), l2.dims())?;
        let out = dispatch_float!(self.name(), (s1 => x, s2 => w, s3 => g), {
            Element::into_storage(backward(&row_major(x, l1), &row_major(w, l2), &row_major(g, l3), rows, c, self.eps))
        });
        Ok((out, Shape::from_dims(&[rows + 2, c])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn random(shape: &[usize], seed: u64) -> Vec<f64> {
        // A small LCG: the tests need varied values, not statistics.
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..shape.iter().product::<usize>())
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
            })
            .collect()
    }

    /// The formula written with candle's ops, as the models computed it before this op.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
        let c = x.dim(candle_core::D::Minus1).unwrap();
        let rows = x.elem_count() / c;
        let flat = x.reshape((rows, c)).unwrap();
        let mean = flat.sum_keepdim(0).unwrap().affine(1.0 / rows as f64, 0.0).unwrap();
        let centred = flat.broadcast_sub(&mean).unwrap();
        let var = centred.sqr().unwrap().sum_keepdim(0).unwrap().affine(1.0 / rows as f64, 0.0).unwrap();
        let y = centred.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap();
        y.broadcast_mul(&w.reshape((1, c)).unwrap()).unwrap().broadcast_add(&b.reshape((1, c)).unwrap()).unwrap().reshape(x.shape()).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    #[test]
    fn forward_and_gradients_match_the_composite_formula() {
        let dev = Device::Cpu;
        for (shape, seed) in [(vec![2, 3, 5, 4], 1u64), (vec![7, 3], 2), (vec![1, 9, 2, 6], 3)] {
            let c = shape[shape.len() - 1];
            let x = Var::from_vec(random(&shape, seed), shape.as_slice(), &dev).unwrap();
            let w = Var::from_vec(random(&[c], seed + 10), c, &dev).unwrap();
            let b = Var::from_vec(random(&[c], seed + 20), c, &dev).unwrap();
            let mix = Tensor::from_vec(random(&shape, seed + 30), shape.as_slice(), &dev).unwrap();
            let ours = batch_norm_train(&x, &w, &b, 1e-5).unwrap();
            let theirs = reference(&x, &w, &b, 1e-5);
            for (a, r) in values(&ours).iter().zip(values(&theirs)) {
                assert!((a - r).abs() < 1e-12, "forward {a} vs {r}");
            }
            let g1 = (ours * &mix).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &mix).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
                let (a, r) = (values(g1.get(v).unwrap()), values(g2.get(v).unwrap()));
                for (p, q) in a.iter().zip(&r) {
                    assert!((p - q).abs() < 1e-10 * (1.0 + q.abs()), "grad {name}: {p} vs {q} ({shape:?})");
                }
            }
        }
    }

    #[test]
    fn gradient_of_the_input_matches_finite_differences() {
        let dev = Device::Cpu;
        let shape = [3, 2, 2, 3];
        let xs = random(&shape, 5);
        let w = Tensor::from_vec(random(&[3], 6), 3, &dev).unwrap();
        let b = Tensor::from_vec(random(&[3], 7), 3, &dev).unwrap();
        let mix = Tensor::from_vec(random(&shape, 8), &shape, &dev).unwrap();
        let loss = |v: &[f64]| -> f64 {
            let x = Tensor::from_vec(v.to_vec(), &shape, &dev).unwrap();
            values(&(batch_norm_train(&x, &w, &b, 1e-5).unwrap() * &mix).unwrap().sum_all().unwrap())[0]
        };
        let x = Var::from_vec(xs.clone(), &shape, &dev).unwrap();
        let grads = (batch_norm_train(&x, &w, &b, 1e-5).unwrap() * &mix).unwrap().sum_all().unwrap().backward().unwrap();
        let analytic = values(grads.get(&x).unwrap());
        let eps = 1e-6;
        for i in [0, 7, 18, 35] {
            let (mut up, mut down) = (xs.clone(), xs.clone());
            up[i] += eps;
            down[i] -= eps;
            let numeric = (loss(&up) - loss(&down)) / (2.0 * eps);
            assert!((numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()), "x[{i}]: {} vs {numeric}", analytic[i]);
        }
    }

    #[test]
    fn statistics_are_the_batch_mean_and_unbiased_variance_and_f32_agrees() {
        let dev = Device::Cpu;
        let v = random(&[4, 3], 9);
        let x = Tensor::from_vec(v.clone(), (4, 3), &dev).unwrap();
        let (mean, var) = batch_norm_stats(&x).unwrap();
        for j in 0..3 {
            let col: Vec<f64> = (0..4).map(|i| v[i * 3 + j]).collect();
            let m = col.iter().sum::<f64>() / 4.0;
            let u = col.iter().map(|c| (c - m).powi(2)).sum::<f64>() / 3.0;
            assert!((values(&mean)[j] - m).abs() < 1e-14 && (values(&var)[j] - u).abs() < 1e-14);
        }
        let w = Tensor::ones(3, DType::F64, &dev).unwrap();
        let b = Tensor::zeros(3, DType::F64, &dev).unwrap();
        let f64_out = values(&batch_norm_train(&x, &w, &b, 1e-5).unwrap());
        let f32_out = values(&batch_norm_train(&x.to_dtype(DType::F32).unwrap(), &w.to_dtype(DType::F32).unwrap(), &b.to_dtype(DType::F32).unwrap(), 1e-5).unwrap());
        for (a, r) in f32_out.iter().zip(&f64_out) {
            assert!((a - r).abs() < 1e-5, "{a} vs {r}");
        }
        let one_row = Tensor::zeros((1, 1, 1, 3), DType::F64, &dev).unwrap();
        assert!(batch_norm_train(&one_row, &w, &b, 1e-5).unwrap_err().to_string().contains("more than one value per channel"));
    }
}
