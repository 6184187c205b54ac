//! GELU, the exact erf form of `nn.GELU()`, with an exact backward.
//!
//! candle's own `gelu_erf` backward uses the constant 0.398942 for 1/sqrt(2*pi), which puts a
//! ~1e-6 relative error into every gradient upstream of a GELU: enough to fail float64 parity
//! with the official code. This op computes the derivative from full-precision constants.

use crate::simd::vectorized;
use crate::{erf_f32, row_major, Element};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 16384;

/// x * Phi(x), with Phi the standard normal CDF (f64; f32 has its own vectorized loop below).
#[inline]
fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))
}

/// 1 / sqrt(2 pi), the normal density's constant.
const INV_SQRT_2PI: f64 = 0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2;

/// d/dx x * Phi(x) = Phi(x) + x * phi(x), from full-precision constants.
#[inline]
fn gelu_grad(x: f64) -> f64 {
    let cdf = 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2));
    cdf + x * (-0.5 * x * x).exp() * INV_SQRT_2PI
}

/// The slice loops, per float type: f64 keeps libm's erf (the parity path); f32 uses the
/// branch-free erf of erf_f32.rs, vectorized (see its module comment for why).
pub(crate) trait GeluFloat: Element {
    fn gelu_into(x: &[Self], out: &mut [Self]);
    /// out = gelu'(x) * g.
    fn gelu_grad_into(x: &[Self], g: &[Self], out: &mut [Self]);
}

impl GeluFloat for f64 {
    fn gelu_into(x: &[f64], out: &mut [f64]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = gelu(v);
        }
    }
    fn gelu_grad_into(x: &[f64], g: &[f64], out: &mut [f64]) {
        for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
            *o = gelu_grad(x) * g;
        }
    }
}

const INV_SQRT_2PI_F32: f32 = INV_SQRT_2PI as f32;

vectorized! {
    fn gelu_f32_into(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = 0.5 * v * (1.0 + erf_f32::erf(v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

vectorized! {
    fn gelu_grad_f32_into(x: &[f32], g: &[f32], out: &mut [f32]) {
        for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + erf_f32::erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = erf_f32::exp_nonpositive(-0.5 * x * x) * INV_SQRT_2PI_F32;
            *o = (cdf + x * pdf) * g;
        }
    }
}

impl GeluFloat for f32 {
    fn gelu_into(x: &[f32], out: &mut [f32]) {
        gelu_f32_into(x, out)
    }
    fn gelu_grad_into(x: &[f32], g: &[f32], out: &mut [f32]) {
        gelu_grad_f32_into(x, g, out)
    }
}

pub(crate) fn map1<T: GeluFloat>(x: &[T]) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, i)| T::gelu_into(i, o));
    out
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu_erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch_float!("gelu_erf", (s => d), { Element::into_storage(map1(&row_major(d, l))) });
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

/// gelu'(x) * g, element-wise.
pub(crate) fn zip_map<T: GeluFloat>(x: &[T], g: &[T]) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(o, (x, g))| T::gelu_grad_into(x, g, o));
    out
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu_erf_backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::same_shape(self.name(), "input", l1.dims(), "gradient", l2.dims())?;
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
        crate::same_shape(self.name(), "input", l1.dims(), "gradient", l2.dims())?;
        let out = cuda_dispatch!("gelu_erf_backward", s1.dtype(), gelu_bwd(s1, l1, s2, l2))?;
        Ok((out, l1.shape().clone()))
    }
}

/// GELU (erf form), differentiable with an exact derivative.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !crate::composite::use_kernel(&[x]) {
        return crate::composite::gelu_erf(x);
    }
    crate::tape::apply1(x, Gelu)
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
    fn f32_agrees_with_f64_forward_and_backward() {
        let xs: Vec<f64> = (0..4001).map(|i| -10.0 + 0.005 * i as f64).collect();
        let x64 = Var::from_vec(xs.clone(), xs.len(), &Device::Cpu).unwrap();
        let x32 = Var::from_tensor(&x64.as_tensor().to_dtype(candle_core::DType::F32).unwrap()).unwrap();
        let (y64, y32) = (gelu_erf(x64.as_tensor()).unwrap(), gelu_erf(x32.as_tensor()).unwrap());
        let g64 = y64.sum_all().unwrap().backward().unwrap().get(x64.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        let g32 = y32.sum_all().unwrap().backward().unwrap().get(x32.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let (y64, y32) = (y64.to_vec1::<f64>().unwrap(), y32.to_vec1::<f32>().unwrap());
        for (i, &x) in xs.iter().enumerate() {
            // Relative to the inputs' scale: x * Phi(x) for x << 0 cancels in any f32 erf form.
            let tol = 4e-7 * x.abs().max(1.0);
            assert!((y64[i] - y32[i] as f64).abs() < tol, "gelu({x}): {} (f32) vs {}", y32[i], y64[i]);
            assert!((g64[i] - g32[i] as f64).abs() < 4e-7 * x.abs().max(1.0).powi(2), "gelu'({x}): {} (f32) vs {}", g32[i], g64[i]);
        }
    }

    #[test]
    fn a_mis_shaped_gradient_is_an_error_naming_both_shapes() {
        let x = Tensor::zeros(6, candle_core::DType::F32, &Device::Cpu).unwrap();
        let g = Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = x.apply_op2_no_bwd(&g, &GeluBackward).unwrap_err().to_string();
        assert!(e.contains("gelu_erf_backward: input shape [6] and gradient shape [5] differ"), "{e}");
    }

    /// The AVX2 / AVX-512 loops (whichever this CPU runs) give the same bits as the formula
    /// evaluated one element at a time, tails included.
    #[test]
    fn vectorized_f32_loops_equal_the_scalar_formula_bitwise() {
        let xs: Vec<f32> = (0..10_007).map(|i| -12.0 + 0.0024 * i as f32).collect();
        let gs: Vec<f32> = (0..xs.len()).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        let (mut y, mut dy) = (vec![0f32; xs.len()], vec![0f32; xs.len()]);
        gelu_f32_into(&xs, &mut y);
        gelu_grad_f32_into(&xs, &gs, &mut dy);
        for (i, &x) in xs.iter().enumerate() {
            let x = std::hint::black_box(x);
            let scalar = 0.5 * x * (1.0 + erf_f32::erf(x * std::f32::consts::FRAC_1_SQRT_2));
            assert_eq!(y[i].to_bits(), scalar.to_bits(), "gelu at {x}");
            let cdf = 0.5 * (1.0 + erf_f32::erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = erf_f32::exp_nonpositive(-0.5 * x * x) * INV_SQRT_2PI_F32;
            assert_eq!(dy[i].to_bits(), ((cdf + x * pdf) * gs[i]).to_bits(), "gelu' at {x}");
        }
    }
}
