use candle_core::{DType, Device, Tensor, Var};
use convmae_kernels::reference::{softmax_last_dim_backward, softmax_last_dim_forward};
use convmae_kernels::softmax_last_dim;

use crate::common::*;

const SHAPES: &[&[usize]] = &[&[3, 5], &[2, 4, 9], &[7, 1], &[4, 100], &[2, 3, 49, 49]];

fn inputs(shape: &[usize], dtype: DType, seed: u64) -> (Vec<Input>, Vec<f64>) {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let x = rng.values(n, 3.0, dtype);
    let cot = rng.values(n, 1.0, dtype);
    (vec![(x, shape.to_vec())], cot)
}

fn softmax(ts: &[Tensor]) -> candle_core::Result<Tensor> {
    softmax_last_dim(&ts[0])
}

fn check_against_reference(dtype: DType, rtol: f64) {
    for (n, shape) in SHAPES.iter().enumerate() {
        let d = *shape.last().unwrap();
        let (ins, cot) = inputs(shape, dtype, 300 + n as u64);
        let (out, grads) = forward_backward(&ins, dtype, &cot, softmax);
        let want = softmax_last_dim_forward(&ins[0].0, d);
        assert_close(&out, &want, rtol, &format!("{dtype:?} forward {shape:?}"));
        let gx = softmax_last_dim_backward(&ins[0].0, &cot, d);
        if d > 1 {
            assert_close(&grads[0], &gx, rtol, &format!("{dtype:?} grad x {shape:?}"));
        } else {
            // A one-element softmax is constantly 1: its gradient is exactly zero.
            assert!(grads[0].iter().all(|&v| v == 0.0) && gx.iter().all(|&v| v == 0.0));
        }
    }
}

#[test]
fn softmax_forward_and_backward_match_reference_f64() {
    check_against_reference(DType::F64, 1e-12);
}

#[test]
fn softmax_forward_and_backward_match_reference_f32() {
    check_against_reference(DType::F32, 1e-5);
}

#[test]
fn softmax_gradient_matches_finite_differences() {
    for shape in [&[3usize, 5][..], &[2, 2, 6]] {
        let (ins, cot) = inputs(shape, DType::F64, 41);
        let (_, grads) = forward_backward(&ins, DType::F64, &cot, softmax);
        let fd = finite_differences(&ins, &cot, softmax);
        assert_close(&grads[0], &fd[0], 1e-6, &format!("grad x vs finite differences {shape:?}"));
    }
}

#[test]
fn softmax_f32_and_f64_agree() {
    let (ins, cot) = inputs(&[4, 6, 50], DType::F32, 43);
    let (out32, g32) = forward_backward(&ins, DType::F32, &cot, softmax);
    let (out64, g64) = forward_backward(&ins, DType::F64, &cot, softmax);
    assert_close(&out32, &out64, 1e-5, "forward");
    assert_close(&g32[0], &g64[0], 1e-5, "grad x");
}

#[test]
fn softmax_is_stable_for_large_logits() {
    for dtype in [DType::F32, DType::F64] {
        let x = tensor(&[1000.0, 1001.0, 999.0, -1000.0, -2000.0, -1000.0], &[2, 3], dtype);
        let y = values_of(&softmax_last_dim(&x).unwrap());
        let want = softmax_last_dim_forward(&[0.0, 1.0, -1.0, 0.0, -1000.0, 0.0], 3);
        assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
        assert_close(&y, &want, 1e-6, &format!("{dtype:?} large logits"));
    }
}

#[test]
fn softmax_accepts_strided_input_and_broadcast_gradient() {
    let (rows, d) = (4, 6);
    let mut rng = Rng::new(47);
    let xt = rng.values(rows * d, 2.0, DType::F64);
    let x_var = Var::from_tensor(&tensor(&xt, &[d, rows], DType::F64)).unwrap();
    let x = x_var.as_tensor().t().unwrap();
    assert!(!x.is_contiguous());
    let y = softmax_last_dim(&x).unwrap();
    // Weighted so the gradient is not identically zero (a plain sum of softmax is constant).
    let weights = tensor(&(0..d).map(|i| i as f64).collect::<Vec<_>>(), &[d], DType::F64);
    let loss = y.broadcast_mul(&weights).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();

    let x_flat = values_of(&x.contiguous().unwrap());
    assert_close(&values_of(&y), &softmax_last_dim_forward(&x_flat, d), 1e-12, "forward");
    let cot: Vec<f64> = (0..rows * d).map(|i| (i % d) as f64).collect();
    let gx = softmax_last_dim_backward(&x_flat, &cot, d);
    let got = grads.get(x_var.as_tensor()).unwrap().t().unwrap().contiguous().unwrap();
    assert_close(&values_of(&got), &gx, 1e-12, "grad x");

    // `sum_all` feeds the backward a stride-0 gradient; softmax rows sum to 1, so it is ~0.
    let grads = y.sum_all().unwrap().backward().unwrap();
    let g = values_of(grads.get(x_var.as_tensor()).unwrap());
    assert!(g.iter().all(|v| v.abs() < 1e-15), "{g:?}");
}

#[test]
fn softmax_rejects_scalars_and_runs_half_precision_through_the_composite() {
    let cpu = &Device::Cpu;
    let x = Tensor::zeros((2, 3), DType::F16, cpu).unwrap();
    // Half precision has no kernel of ours: it runs through the composite (see composite.rs).
    let y = values_of(&softmax_last_dim(&x).unwrap());
    assert!(y.iter().all(|v| (v - 1.0 / 3.0).abs() < 1e-3), "{y:?}");
    let s = Tensor::new(1.0f32, cpu).unwrap();
    let msg = error_text(softmax_last_dim(&s));
    assert!(msg.contains("softmax_last_dim") && msg.contains("[]"), "{msg}");
}
