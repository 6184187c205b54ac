//! The compositions of candle ops that serve devices without our kernels (CUDA for now) compute
//! what our kernels compute: forward and every input gradient, in f64 on the CPU.

use crate::common::{assert_close, tensor, values_of, Rng};
use candle_core::{DType, Tensor, Var};
use convmae_kernels::{self as k, composite, AdamWUpdate, SparseNeighbors};
use std::sync::Arc;

/// Forward and gradients of `sum(f(inputs) * probe)` for both implementations.
fn compare(what: &str, shapes: &[&[usize]], seed: u64, ours: impl Fn(&[Tensor]) -> Tensor, theirs: impl Fn(&[Tensor]) -> Tensor) {
    let mut rng = Rng::new(seed);
    let vars: Vec<Var> = shapes
        .iter()
        .map(|s| Var::from_tensor(&tensor(&rng.values(s.iter().product(), 1.0, DType::F64), s, DType::F64)).unwrap())
        .collect();
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (ours(&inputs), theirs(&inputs));
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    assert_close(&values_of(&b), &values_of(&a), 1e-12, &format!("{what} forward"));
    let probe = tensor(&rng.values(a.elem_count(), 1.0, DType::F64), a.dims(), DType::F64);
    let ga = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let (x, y) = (ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap());
        assert_close(&values_of(y), &values_of(x), 1e-11, &format!("{what} gradient of input {i}"));
    }
}

#[test]
fn layer_norm_softmax_gelu_attention_and_linear_compositions_match_the_kernels() {
    compare("layer_norm", &[&[3, 5, 16], &[16], &[16]], 1, |t| k::layer_norm(&t[0], &t[1], &t[2], 1e-6).unwrap(), |t| {
        composite::layer_norm(&t[0], &t[1], &t[2], 1e-6).unwrap()
    });
    compare("softmax", &[&[4, 7, 9]], 2, |t| k::softmax_last_dim(&t[0]).unwrap(), |t| composite::softmax_last_dim(&t[0]).unwrap());
    compare("gelu_erf", &[&[6, 11]], 3, |t| k::gelu_erf(&(&t[0] * 3.0).unwrap()).unwrap(), |t| {
        composite::gelu_erf(&(&t[0] * 3.0).unwrap()).unwrap()
    });
    compare("self_attention", &[&[2, 9, 3 * 4 * 6]], 9, |t| k::self_attention(&(&t[0] * 3.0).unwrap(), 4, 0.4).unwrap(), |t| {
        composite::self_attention(&(&t[0] * 3.0).unwrap(), 4, 0.4).unwrap()
    });
    compare("linear", &[&[2, 3, 8], &[5, 8], &[5]], 4, |t| k::linear(&t[0], &t[1], &t[2]).unwrap(), |t| {
        composite::linear(&t[0], &t[1], &t[2]).unwrap()
    });
    compare("linear (1x1 conv weight)", &[&[2, 4, 4, 8], &[5, 8, 1, 1], &[5]], 5, |t| k::linear(&t[0], &t[1], &t[2]).unwrap(), |t| {
        composite::linear(&t[0], &t[1], &t[2]).unwrap()
    });
}

#[test]
fn depthwise_conv_compositions_match_the_kernels() {
    compare("depthwise_conv2d", &[&[2, 7, 6, 5], &[5, 5, 5]], 6, |t| k::depthwise_conv2d(&t[0], &t[1]).unwrap(), |t| {
        composite::depthwise_conv2d(&t[0], &t[1]).unwrap()
    });
    // Visible positions of a 2-image 6x6 map: a checkerboard of 2x2 cells.
    let mut positions = Vec::new();
    for image in 0..2u32 {
        for y in 0..6u32 {
            for x in 0..6u32 {
                if ((y / 2) + (x / 2) + image) % 2 == 0 {
                    positions.push((image, y, x));
                }
            }
        }
    }
    let nbrs = Arc::new(SparseNeighbors::from_positions(&positions, 2, 6, 6, 5).unwrap());
    let n = positions.len();
    compare("sparse_depthwise_conv2d", &[&[n, 4], &[4, 5, 5]], 7, |t| k::sparse_depthwise_conv2d(&t[0], &t[1], &nbrs).unwrap(), |t| {
        composite::sparse_depthwise_conv2d(&t[0], &t[1], &nbrs).unwrap()
    });
}

#[test]
fn adamw_step_matches_the_fused_update() {
    let mut rng = Rng::new(8);
    let shape = [3, 7];
    let make = |rng: &mut Rng, scale: f64| tensor(&rng.values(21, scale, DType::F64), &shape, DType::F64);
    let (p, g) = (make(&mut rng, 1.0), make(&mut rng, 0.1));
    let m = make(&mut rng, 0.01);
    let v = make(&mut rng, 0.01).abs().unwrap();
    let u = AdamWUpdate { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.05, step: 3 };
    let (p2, m2, v2) = composite::adamw_step(&p, &m, &v, &g, &u).unwrap();
    let (pf, mf, vf) = (p.copy().unwrap(), m.copy().unwrap(), v.copy().unwrap());
    k::adamw_update(&pf, &mf, &vf, &g, &u).unwrap();
    assert_close(&values_of(&p2), &values_of(&pf), 1e-14, "param");
    assert_close(&values_of(&m2), &values_of(&mf), 1e-14, "exp_avg");
    assert_close(&values_of(&v2), &values_of(&vf), 1e-14, "exp_avg_sq");
    assert!(k::has_kernel(&p) && !k::has_kernel(&p.to_dtype(DType::BF16).unwrap()));
}

/// The GPU check's agreement run works end to end; on the CPU it compares the kernels with
/// themselves, so everything agrees exactly.
#[test]
fn the_agreement_check_runs_and_is_exact_on_the_cpu() {
    let report = convmae_kernels::agreement::compare_on(&candle_core::Device::Cpu).unwrap();
    let ops: Vec<&str> = report.iter().map(|a| a.op.as_str()).collect();
    assert_eq!(
        ops,
        [
            "layer_norm",
            "softmax_last_dim",
            "gelu_erf",
            "self_attention",
            "self_attention:decoder",
            "self_attention:gemm",
            "self_attention:decoder_gemm",
            "self_attention:flash",
            "self_attention:decoder_flash",
            "self_attention:flash_mma",
            "self_attention:decoder_flash_mma",
            "self_attention:gemm_hd24",
            "linear",
            "linear:plain_gemm",
            "linear_gelu",
            "mlp_residual",
            "mlp_residual:plain_gemm",
            "mlp_residual:packed",
            "attention_residual",
            "attention_residual:gemm",
            "attention_residual:flash",
            "depthwise_conv2d",
            "sparse_depthwise_conv2d",
            "conv_residual",
            "sublayer_chain",
            "sublayer_chain:links",
            "tape_backward",
            "tape_backward:candle",
            "layer_norm:transposed",
            "softmax_last_dim:offset",
            "gelu_erf:transposed",
            "self_attention:transposed",
            "linear:conv1x1_transposed",
            "depthwise_conv2d:permuted",
            "sparse_depthwise_conv2d:offset",
            "patch_blocks",
            "conv_weight_rows",
            "restore_tokens",
            "masked_patch_mse",
            "roi_align",
            "adamw_update"
        ]
    );
    for a in &report {
        assert_eq!((a.forward_rel, a.gradient_rel), (0.0, 0.0), "{a:?}");
    }
}

/// The bf16 half of the GPU check's agreement, run on the CPU (where bf16 goes through the
/// composite): every row is produced, and candle's bf16 ops stay within the bf16 tolerance
/// the GPU check applies, so a failure there points at the device, not at the tolerance.
#[test]
fn the_bf16_agreement_check_runs_on_the_cpu_within_tolerance() {
    use convmae_kernels::{agreement::compare_paths, Path};
    let report = compare_paths(&candle_core::Device::Cpu, &[Path::Kernels, Path::Composite], &[DType::BF16]).unwrap();
    // 39 op cases and AdamW, by both paths.
    assert_eq!(report.len(), 80);
    for a in &report {
        eprintln!("{} {} forward {:.2e} gradients {:?}", a.op, a.path, a.forward_rel, a.gradient_rels);
    }
    for a in &report {
        assert_eq!(a.dtype, "bf16");
        assert!(!a.kernel, "no CPU kernel takes bf16: {a:?}");
        assert!(a.pass, "{a:?}");
    }
}

/// `with_path` overrides the kernel choice on this thread, nests, and restores on the way out;
/// the GPU check relies on it to run both paths in one process.
#[test]
fn with_path_chooses_the_composite_and_restores() {
    use convmae_kernels::{with_path, Path};
    let x = Tensor::zeros((2, 3), DType::F32, &candle_core::Device::Cpu).unwrap();
    assert!(k::has_kernel(&x));
    with_path(Path::Composite, || {
        assert!(!k::has_kernel(&x));
        with_path(Path::Kernels, || assert!(k::has_kernel(&x)));
        assert!(!k::has_kernel(&x));
        // The public op follows the choice: same values either way.
        let a = k::softmax_last_dim(&x).unwrap();
        assert!(values_of(&a).iter().all(|v| (v - 1.0 / 3.0).abs() < 1e-7));
    });
    assert!(k::has_kernel(&x));
    let panicked = std::panic::catch_unwind(|| with_path(Path::Composite, || panic!("inside")));
    assert!(panicked.is_err());
    assert!(k::has_kernel(&x), "restored after a panic");
}

/// The op timings the GPU check records run on the CPU too: every case by both paths, our
/// kernels where they serve f32 on the CPU, finite positive times.
#[test]
fn op_timings_cover_every_case_by_both_paths() {
    use convmae_kernels::{op_timing::time_ops, Path};
    let rows = time_ops(&candle_core::Device::Cpu, &[Path::Kernels, Path::Composite], DType::F32, 1, 1).unwrap();
    let names: Vec<&str> = rows.iter().step_by(2).map(|r| r.op.as_str()).collect();
    assert_eq!(
        names,
        [
            "sparse_depthwise_conv2d:stage1",
            "sparse_depthwise_conv2d:stage2",
            "layer_norm:stage1",
            "gelu_erf:stage1_mlp",
            "layer_norm:decoder",
            "self_attention:encoder",
            "self_attention:decoder",
            "self_attention:encoder_gemm",
            "self_attention:decoder_gemm",
            "self_attention:encoder_flash",
            "self_attention:decoder_flash",
            "self_attention:encoder_flash_mma",
            "self_attention:decoder_flash_mma",
            "softmax_last_dim:decoder",
            "linear_gelu:decoder_fc1",
            "mlp_residual:decoder",
            "mlp_separate:decoder",
            "conv_residual:stage1",
            "attention_residual:encoder",
            "patch_blocks:stage1",
            "restore_tokens",
            "masked_patch_mse",
            "linear:stage1_conv1"
        ]
    );
    for pair in rows.chunks(2) {
        assert_eq!((pair[0].path.as_str(), pair[1].path.as_str()), ("kernels", "composite"));
        assert!(pair[0].kernel && !pair[1].kernel, "{pair:?}");
        for r in pair {
            assert!(r.forward_ms.is_finite() && r.forward_ms > 0.0 && r.forward_backward_ms > 0.0, "{r:?}");
        }
    }
    // Stage 1 keeps 784 of 3136 positions an image (one 4x4 cell in four).
    assert_eq!(rows[0].shapes[0], vec![784, 256]);
    let e = time_ops(&candle_core::Device::Cpu, &[Path::Kernels], DType::F32, 0, 1).unwrap_err().to_string();
    assert!(e.contains("batch and reps"), "{e}");
}
