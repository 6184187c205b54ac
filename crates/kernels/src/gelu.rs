//! GELU, the exact erf form of `nn.GELU()`, with an exact backward.
//!
//! candle's own `gelu_erf` backward uses the constant 0.398942 for 1/sqrt(2*pi), which puts a
//! ~1e-6 relative error into every gradient upstream of a GELU: enough to fail float64 parity
//! with the official code. This op computes the derivative from full-precision constants.

use crate::{row_major, Element};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 16384;

/// x * Phi(x), with Phi the standard normal CDF.
#[inline]
fn gelu<T: Element>(x: T) -> T {
    T::from_f64(0.5) * x * (T::ONE + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

/// d/dx x * Phi(x) = Phi(x) + x * phi(x), from full-precision constants.
#[inline]
fn gelu_grad<T: Element>(x: T) -> T {
    let cdf = T::from_f64(0.5) * (T::ONE + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
    let inv_sqrt_2pi = T::from_f64(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
    let pdf = (T::ZERO - T::from_f64(0.5) * x * x).exp() * inv_sqrt_2pi;
    cdf + x * pdf
}

fn map1<T: Element>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, i)| {
        for (o, &v) in o.iter_mut().zip(i) {
            *o = f(v);
        }
    });
    out
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu_erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch_float!("gelu_erf", (s => d), { Element::into_storage(map1(&row_major(d, l), gelu)) });
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, gelu_fwd};
        use candle_core::backend::BackendStorage;
        let out = cuda_dispatch!("gelu_erf", s.dtype(), gelu_fwd(s, l))?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(grad, &GeluBackward)?))
    }
}

/// grad * gelu'(x); second-order gradients are not needed.
struct GeluBackward;

fn zip_map<T: Element>(x: &[T], g: &[T]) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(o, (x, g))| {
            for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                *o = gelu_grad(x) * g;
            }
        });
    out
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu_erf_backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            return Err(candle_core::Error::Msg(format!(
                "gelu_erf_backward: input shape {:?} differs from gradient shape {:?}",
                l1.dims(),
                l2.dims()
            )));
        }
        let out = dispatch_float!("gelu_erf_backward", (s1 => x, s2 => g), {
            Element::into_storage(zip_map(&row_major(x, l1), &row_major(g, l2)))
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
        use crate::cuda::{cuda_dispatch, gelu_bwd};
        use candle_core::backend::BackendStorage;
        if l1.shape() != l2.shape() {
            candle_core::bail!("gelu_erf_backward: input shape {:?} differs from gradient shape {:?}", l1.dims(), l2.dims());
        }
        let out = cuda_dispatch!("gelu_erf_backward", s1.dtype(), gelu_bwd(s1, l1, s2, l2))?;
        Ok((out, l1.shape().clone()))
    }
}

/// GELU (erf form), differentiable with an exact derivative.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !crate::composite::use_kernel(&[x]) {
        return crate::composite::gelu_erf(x);
    }
    x.apply_op1(Gelu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn gelu_matches_finite_differences_in_f64() {
        let xs: Vec<f64> = (0..41).map(|i| -5.0 + 0.25 * i as f64).collect();
        let x = Var::from_vec(xs.clone(), 41, &Device::Cpu).unwrap();
        let y = gelu_erf(x.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let grad = g.get(x.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        let yv = y.to_vec1::<f64>().unwrap();
        let h = 1e-6;
        for (i, &v) in xs.iter().enumerate() {
            let exact = 0.5 * v * (1.0 + libm::erf(v / 2f64.sqrt()));
            assert!((yv[i] - exact).abs() < 1e-15);
            let fd = (gelu(v + h) - gelu(v - h)) / (2.0 * h);
            assert!((grad[i] - fd).abs() < 1e-8, "x={v}: {} vs {fd}", grad[i]);
        }
    }

    #[test]
    fn f32_agrees_with_f64() {
        let xs: Vec<f64> = (0..101).map(|i| -4.0 + 0.08 * i as f64).collect();
        let x64 = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let x32 = x64.to_dtype(candle_core::DType::F32).unwrap();
        let a = gelu_erf(&x64).unwrap().to_vec1::<f64>().unwrap();
        let b = gelu_erf(&x32).unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in a.iter().zip(&b) {
            assert!((a - *b as f64).abs() < 1e-6);
        }
    }
}
