//! Helpers shared by the unit tests of the ops.

use candle_core::{DType, Tensor, Var};

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
