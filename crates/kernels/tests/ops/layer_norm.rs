use candle_core::{DType, Device, Tensor, Var};
use convmae_kernels::layer_norm;
use convmae_kernels::reference::{layer_norm_backward, layer_norm_forward};

use crate::common::*;

const EPS: f64 = 1e-6;

/// Row shapes: a plain matrix, a 3-D token tensor, D not a power of two, D = 1, and enough
/// rows for several partial sums of the parameter gradients.
const SHAPES: &[&[usize]] = &[&[4, 7], &[2, 3, 16], &[5, 33], &[3, 1], &[70, 12]];

fn inputs(shape: &[usize], dtype: DType, seed: u64) -> (Vec<Input>, Vec<f64>) {
    let mut rng = Rng::new(seed);
    let d = *shape.last().unwrap();
    let n: usize = shape.iter().product();
    // An offset on x so the mean is not ~0 and the centring is actually exercised.
    let x: Vec<f64> = rng.values(n, 2.0, dtype).iter().map(|v| round_to(v + 0.75, dtype)).collect();
    let w: Vec<f64> = rng.values(d, 0.5, dtype).iter().map(|v| round_to(v + 1.0, dtype)).collect();
    let b = rng.values(d, 0.5, dtype);
    let cot = rng.values(n, 1.0, dtype);
    (vec![(x, shape.to_vec()), (w, vec![d]), (b, vec![d])], cot)
}

fn ln(ts: &[Tensor]) -> candle_core::Result<Tensor> {
    layer_norm(&ts[0], &ts[1], &ts[2], EPS)
}

fn check_against_reference(dtype: DType, rtol: f64) {
    for (n, shape) in SHAPES.iter().enumerate() {
        let d = *shape.last().unwrap();
        let (ins, cot) = inputs(shape, dtype, 200 + n as u64);
        let (out, grads) = forward_backward(&ins, dtype, &cot, ln);
        let want = layer_norm_forward(&ins[0].0, &ins[1].0, &ins[2].0, d, EPS);
        assert_close(&out, &want, rtol, &format!("{dtype:?} forward {shape:?}"));
        let (gx, gw, gb) = layer_norm_backward(&ins[0].0, &ins[1].0, &cot, d, EPS);
        if d > 1 {
            assert_close(&grads[0], &gx, rtol, &format!("{dtype:?} grad x {shape:?}"));
        } else {
            // With D = 1 the normalised value is identically 0, so grad x is exactly 0.
            assert!(grads[0].iter().all(|&v| v == 0.0) && gx.iter().all(|&v| v == 0.0));
        }
        assert_close(&grads[1], &gw, rtol, &format!("{dtype:?} grad weight {shape:?}"));
        assert_close(&grads[2], &gb, rtol, &format!("{dtype:?} grad bias {shape:?}"));
    }
}

#[test]
fn layer_norm_forward_and_backward_match_reference_f64() {
    check_against_reference(DType::F64, 1e-12);
}

#[test]
fn layer_norm_forward_and_backward_match_reference_f32() {
    check_against_reference(DType::F32, 1e-5);
}

#[test]
fn layer_norm_gradients_match_finite_differences() {
    for shape in [&[4usize, 7][..], &[2, 2, 5]] {
        let (ins, cot) = inputs(shape, DType::F64, 23);
        let (_, grads) = forward_backward(&ins, DType::F64, &cot, ln);
        let fd = finite_differences(&ins, &cot, ln);
        for (a, name) in ["x", "weight", "bias"].iter().enumerate() {
            assert_close(&grads[a], &fd[a], 1e-6, &format!("grad {name} vs finite differences {shape:?}"));
        }
    }
}

#[test]
fn layer_norm_f32_and_f64_agree() {
    let (ins, cot) = inputs(&[6, 10, 48], DType::F32, 29);
    let (out32, g32) = forward_backward(&ins, DType::F32, &cot, ln);
    let (out64, g64) = forward_backward(&ins, DType::F64, &cot, ln);
    assert_close(&out32, &out64, 1e-5, "forward");
    for a in 0..3 {
        assert_close(&g32[a], &g64[a], 1e-5, &format!("grad {a}"));
    }
}

#[test]
fn layer_norm_backward_is_bitwise_reproducible_across_thread_counts() {
    // 300 rows of 40: ten partial sums for the weight and bias gradients, and enough work
    // for rayon to split the rows across threads.
    for dtype in [DType::F32, DType::F64] {
        let (ins, cot) = inputs(&[300, 40], dtype, 31);
        let runs: Vec<_> = [1, 2, 3, 1]
            .iter()
            .map(|&t| with_threads(t, || forward_backward(&ins, dtype, &cot, ln)))
            .collect();
        for run in &runs[1..] {
            assert_eq!(bits(&run.0), bits(&runs[0].0), "{dtype:?} forward bits");
            for a in 0..3 {
                assert_eq!(bits(&run.1[a]), bits(&runs[0].1[a]), "{dtype:?} grad {a} bits");
            }
        }
    }
}

#[test]
fn layer_norm_accepts_strided_input_and_broadcast_gradient() {
    let (rows, d) = (5, 9);
    let mut rng = Rng::new(37);
    let xt = rng.values(d * rows, 1.0, DType::F64);
    let w = rng.values(d, 1.0, DType::F64);
    let b = rng.values(d, 1.0, DType::F64);
    let x_var = Var::from_tensor(&tensor(&xt, &[d, rows], DType::F64)).unwrap();
    let w_var = Var::from_tensor(&tensor(&w, &[d], DType::F64)).unwrap();
    let b_var = Var::from_tensor(&tensor(&b, &[d], DType::F64)).unwrap();
    let x = x_var.as_tensor().t().unwrap();
    assert!(!x.is_contiguous());
    let out = layer_norm(&x, w_var.as_tensor(), b_var.as_tensor(), EPS).unwrap();
    let grads = out.sum_all().unwrap().backward().unwrap();

    let x_flat = values_of(&x.contiguous().unwrap());
    assert_close(&values_of(&out), &layer_norm_forward(&x_flat, &w, &b, d, EPS), 1e-12, "forward");
    let (gx, gw, gb) = layer_norm_backward(&x_flat, &w, &vec![1.0; rows * d], d, EPS);
    let got_gx = grads.get(x_var.as_tensor()).unwrap().t().unwrap().contiguous().unwrap();
    assert_close(&values_of(&got_gx), &gx, 1e-12, "grad x");
    assert_close(&values_of(grads.get(w_var.as_tensor()).unwrap()), &gw, 1e-12, "grad weight");
    assert_close(&values_of(grads.get(b_var.as_tensor()).unwrap()), &gb, 1e-12, "grad bias");
}

#[test]
fn layer_norm_rejects_bad_shapes_and_dtypes() {
    let cpu = &Device::Cpu;
    let x = Tensor::zeros((4, 7), DType::F32, cpu).unwrap();
    let w = Tensor::ones(7, DType::F32, cpu).unwrap();
    let b = Tensor::zeros(7, DType::F32, cpu).unwrap();
    let w6 = Tensor::ones(6, DType::F32, cpu).unwrap();
    let msg = error_text(layer_norm(&x, &w6, &b, EPS));
    assert!(msg.contains("layer_norm") && msg.contains("[4, 7]") && msg.contains("[6]"), "{msg}");
    let msg = error_text(layer_norm(&x, &w, &w6, EPS));
    assert!(msg.contains("layer_norm") && msg.contains("[4, 7]") && msg.contains("[6]"), "{msg}");

    let f16 = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
    // Half precision has no kernel of ours: it runs through the composite (see composite.rs).
    let y16 = layer_norm(&f16(&x), &f16(&w), &f16(&b), EPS).unwrap();
    assert_eq!(y16.dtype(), DType::F16);
    let w64 = w.to_dtype(DType::F64).unwrap();
    let msg = error_text(layer_norm(&x, &w64, &b, EPS));
    assert!(msg.contains("layer_norm") && msg.contains("F64"), "{msg}");
}
