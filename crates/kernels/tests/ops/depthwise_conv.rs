use candle_core::{DType, Device, Tensor, Var};
use convmae_kernels::depthwise_conv2d;
use convmae_kernels::reference::{depthwise_conv2d_backward, depthwise_conv2d_forward, ConvDims};

use crate::common::*;

fn dims(b: usize, h: usize, w: usize, c: usize, k: usize) -> ConvDims {
    ConvDims { b, h, w, c, k }
}

/// Borders on every side, K = 5 / 3 / 1 / 7, images smaller than the kernel, and channel
/// counts that exercise the 16-lane blocks, the scalar tail, and both.
const SHAPES: &[ConvDims] = &[
    ConvDims { b: 2, h: 5, w: 6, c: 3, k: 5 },
    ConvDims { b: 2, h: 5, w: 6, c: 3, k: 3 },
    ConvDims { b: 1, h: 2, w: 3, c: 4, k: 5 },
    ConvDims { b: 2, h: 1, w: 1, c: 2, k: 5 },
    ConvDims { b: 1, h: 7, w: 2, c: 5, k: 5 },
    ConvDims { b: 1, h: 3, w: 4, c: 20, k: 5 },
    ConvDims { b: 2, h: 4, w: 5, c: 32, k: 3 },
    ConvDims { b: 1, h: 3, w: 3, c: 2, k: 1 },
    ConvDims { b: 1, h: 6, w: 5, c: 17, k: 7 },
];

fn inputs(d: ConvDims, dtype: DType, seed: u64) -> (Vec<Input>, Vec<f64>) {
    let mut rng = Rng::new(seed);
    let x = rng.values(d.b * d.h * d.w * d.c, 1.0, dtype);
    let w = rng.values(d.c * d.k * d.k, 0.5, dtype);
    let cot = rng.values(d.b * d.h * d.w * d.c, 1.0, dtype);
    (vec![(x, vec![d.b, d.h, d.w, d.c]), (w, vec![d.c, d.k, d.k])], cot)
}

fn conv(ts: &[Tensor]) -> candle_core::Result<Tensor> {
    depthwise_conv2d(&ts[0], &ts[1])
}

fn check_against_reference(dtype: DType, rtol: f64) {
    for (n, &d) in SHAPES.iter().enumerate() {
        let (ins, cot) = inputs(d, dtype, 100 + n as u64);
        let (out, grads) = forward_backward(&ins, dtype, &cot, conv);
        let want = depthwise_conv2d_forward(&ins[0].0, &ins[1].0, d);
        assert_close(&out, &want, rtol, &format!("{dtype:?} forward {d:?}"));
        let (gx, gw) = depthwise_conv2d_backward(&ins[0].0, &ins[1].0, &cot, d);
        assert_close(&grads[0], &gx, rtol, &format!("{dtype:?} grad input {d:?}"));
        assert_close(&grads[1], &gw, rtol, &format!("{dtype:?} grad weight {d:?}"));
    }
}

#[test]
fn conv_forward_and_backward_match_reference_f64() {
    check_against_reference(DType::F64, 1e-12);
}

#[test]
fn conv_forward_and_backward_match_reference_f32() {
    check_against_reference(DType::F32, 1e-5);
}

#[test]
fn conv_gradients_match_finite_differences() {
    for d in [dims(2, 5, 6, 3, 5), dims(2, 5, 6, 3, 3), dims(1, 2, 3, 2, 5), dims(1, 4, 3, 18, 5)] {
        let (ins, cot) = inputs(d, DType::F64, 7);
        let (_, grads) = forward_backward(&ins, DType::F64, &cot, conv);
        let fd = finite_differences(&ins, &cot, conv);
        assert_close(&grads[0], &fd[0], 1e-6, &format!("grad input vs finite differences {d:?}"));
        assert_close(&grads[1], &fd[1], 1e-6, &format!("grad weight vs finite differences {d:?}"));
    }
}

#[test]
fn conv_f32_and_f64_agree() {
    let d = dims(2, 7, 9, 24, 5);
    let (ins, cot) = inputs(d, DType::F32, 11);
    let (out32, g32) = forward_backward(&ins, DType::F32, &cot, conv);
    let (out64, g64) = forward_backward(&ins, DType::F64, &cot, conv);
    assert_close(&out32, &out64, 1e-5, "forward");
    assert_close(&g32[0], &g64[0], 1e-5, "grad input");
    assert_close(&g32[1], &g64[1], 1e-5, "grad weight");
}

#[test]
fn conv_backward_is_bitwise_reproducible_across_thread_counts() {
    let d = dims(3, 9, 10, 40, 5);
    for dtype in [DType::F32, DType::F64] {
        let (ins, cot) = inputs(d, dtype, 13);
        let runs: Vec<_> = [1, 2, 3, 1]
            .iter()
            .map(|&t| with_threads(t, || forward_backward(&ins, dtype, &cot, conv)))
            .collect();
        for run in &runs[1..] {
            assert_eq!(bits(&run.0), bits(&runs[0].0), "{dtype:?} forward bits");
            assert_eq!(bits(&run.1[0]), bits(&runs[0].1[0]), "{dtype:?} grad input bits");
            assert_eq!(bits(&run.1[1]), bits(&runs[0].1[1]), "{dtype:?} grad weight bits");
        }
    }
}

#[test]
fn conv_accepts_strided_inputs_and_broadcast_gradients() {
    // Input built as NCHW and permuted to NHWC, weight built as [K, K, C] and permuted to
    // [C, K, K]: neither is contiguous. `sum_all` hands the op a stride-0 gradient.
    let d = dims(2, 4, 6, 5, 3);
    let mut rng = Rng::new(17);
    let x_nchw = rng.values(d.b * d.c * d.h * d.w, 1.0, DType::F64);
    let w_kkc = rng.values(d.k * d.k * d.c, 1.0, DType::F64);
    let x_var = Var::from_tensor(&tensor(&x_nchw, &[d.b, d.c, d.h, d.w], DType::F64)).unwrap();
    let w_var = Var::from_tensor(&tensor(&w_kkc, &[d.k, d.k, d.c], DType::F64)).unwrap();
    let x = x_var.as_tensor().permute((0, 2, 3, 1)).unwrap();
    let w = w_var.as_tensor().permute((2, 0, 1)).unwrap();
    assert!(!x.is_contiguous() && !w.is_contiguous());
    let out = depthwise_conv2d(&x, &w).unwrap();
    let grads = out.sum_all().unwrap().backward().unwrap();

    let x_flat = values_of(&x.contiguous().unwrap());
    let w_flat = values_of(&w.contiguous().unwrap());
    assert_close(&values_of(&out), &depthwise_conv2d_forward(&x_flat, &w_flat, d), 1e-12, "forward");
    let ones = vec![1.0; out.elem_count()];
    let (gx, gw) = depthwise_conv2d_backward(&x_flat, &w_flat, &ones, d);
    let gx_nchw = grads.get(x_var.as_tensor()).unwrap().permute((0, 2, 3, 1)).unwrap();
    let gw_kkc = grads.get(w_var.as_tensor()).unwrap().permute((2, 0, 1)).unwrap();
    assert_close(&values_of(&gx_nchw.contiguous().unwrap()), &gx, 1e-12, "grad input");
    assert_close(&values_of(&gw_kkc.contiguous().unwrap()), &gw, 1e-12, "grad weight");
}

#[test]
fn conv_skips_gradient_of_a_constant_weight() {
    let d = dims(1, 3, 3, 4, 3);
    let (ins, cot) = inputs(d, DType::F64, 19);
    let x = Var::from_tensor(&tensor(&ins[0].0, &ins[0].1, DType::F64)).unwrap();
    let w = tensor(&ins[1].0, &ins[1].1, DType::F64);
    let out = depthwise_conv2d(x.as_tensor(), &w).unwrap();
    let loss = (&out * &tensor(&cot, &ins[0].1, DType::F64)).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(&w).is_none());
    let (gx, _) = depthwise_conv2d_backward(&ins[0].0, &ins[1].0, &cot, d);
    assert_close(&values_of(grads.get(x.as_tensor()).unwrap()), &gx, 1e-12, "grad input");
}

#[test]
fn conv_rejects_bad_shapes_and_dtypes() {
    let cpu = &Device::Cpu;
    let x = Tensor::zeros((2, 5, 6, 3), DType::F32, cpu).unwrap();
    for (w_shape, w_text) in [
        (vec![4, 5, 5], "[4, 5, 5]"),
        (vec![3, 4, 4], "[3, 4, 4]"),
        (vec![3, 5, 3], "[3, 5, 3]"),
        (vec![3, 25], "[3, 25]"),
    ] {
        let w = Tensor::zeros(w_shape, DType::F32, cpu).unwrap();
        let msg = error_text(depthwise_conv2d(&x, &w));
        assert!(msg.contains("depthwise_conv2d"), "{msg}");
        assert!(msg.contains("[2, 5, 6, 3]") && msg.contains(w_text), "{msg}");
    }
    let x3 = Tensor::zeros((5, 6, 3), DType::F32, cpu).unwrap();
    let w = Tensor::zeros((3, 5, 5), DType::F32, cpu).unwrap();
    let msg = error_text(depthwise_conv2d(&x3, &w));
    assert!(msg.contains("depthwise_conv2d") && msg.contains("[5, 6, 3]"), "{msg}");

    let x16 = x.to_dtype(DType::F16).unwrap();
    let w16 = w.to_dtype(DType::F16).unwrap();
    // Half precision has no kernel of ours: it runs through the composite (see composite.rs).
    let y16 = depthwise_conv2d(&x16, &w16).unwrap();
    assert_eq!((y16.dtype(), y16.dims()), (DType::F16, x16.dims()));
    let w64 = w.to_dtype(DType::F64).unwrap();
    let msg = error_text(depthwise_conv2d(&x, &w64));
    assert!(msg.contains("depthwise_conv2d") && msg.contains("F32") && msg.contains("F64"), "{msg}");
}
