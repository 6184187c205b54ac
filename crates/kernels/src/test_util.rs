//! Helpers shared by the unit tests of the ops.

use candle_core::{DType, Device, Tensor, Var};

/// f64 test values in [-1, 1) of `shape` on the CPU, the agreement check's (`agreement::values`).
pub(crate) fn rand(shape: &[usize], seed: u64) -> Tensor {
    let v = crate::agreement::values(shape.iter().product(), seed);
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap()
}

/// A packed op and its unpacked form agree to 1e-12: the value, x's gradient, and the packs'
/// gradients as the parts' gradients laid end to end (`weights` the parts of the weights pack,
/// `vectors` those of the vectors pack), the gradient of `sum(out * cot)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn assert_packs_match(packed: &Tensor, unpacked: &Tensor, cot: &Tensor, x: &Var, packs: (&Var, &Var), weights: &[&Var], vectors: &[&Var], label: &str) {
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-12, "{label} {what}: {diff}");
    };
    close(packed, unpacked, "forward");
    let gp = (packed * cot).unwrap().sum_all().unwrap().backward().unwrap();
    let gu = (unpacked * cot).unwrap().sum_all().unwrap().backward().unwrap();
    let g = |store: &candle_core::backprop::GradStore, t: &Tensor| store.get(t).unwrap().flatten_all().unwrap();
    let laid = |parts: &[&Var]| Tensor::cat(&parts.iter().map(|v| g(&gu, v.as_tensor())).collect::<Vec<_>>(), 0).unwrap();
    close(&g(&gp, x), &g(&gu, x), "x gradient");
    close(&g(&gp, packs.0), &laid(weights), "packed weights gradient");
    close(&g(&gp, packs.1), &laid(vectors), "packed vectors gradient");
}

/// max |a - b| / max |b|, over all elements, in f64.
pub(crate) fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
    let b = b.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale.max(f64::MIN_POSITIVE)
}

/// `ours` and `reference` (two computations of the same function of `vars`) agree within
/// `tol`: their values, and the gradient of `sum(out * cot)` for every named variable.
pub(crate) fn assert_same_function(ours: Tensor, reference: Tensor, cot: &Tensor, vars: &[(&str, &Var)], tol: f64) {
    assert!(max_rel(&ours, &reference) < tol, "forward {}", max_rel(&ours, &reference));
    let g1 = (ours * cot).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (reference * cot).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in vars {
        let (a, r) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
        assert_eq!(a.dims(), v.dims(), "{name}");
        assert!(max_rel(a, r) < tol, "{name}: {}", max_rel(a, r));
    }
}
