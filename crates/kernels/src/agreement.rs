//! Agreement of every op on another device with our CPU kernels: the same random inputs, the
//! forward result and the gradients of `sum(out * probe)` for every input compared, each as
//! max |a - b| / max |b|.
//!
//! The GPU check runs this on CUDA for both paths the public ops can take there (our CUDA
//! kernels, `Path::Kernels`, and candle's ops, `Path::Composite`), in f32 and in bf16, so one
//! run says whether each kernel is right and how far each path is from the reference. In bf16
//! the inputs and the probe are rounded to bf16 first and the CPU reference runs in f32 on the
//! rounded values, so the difference measured is the cost of computing in bf16, not of
//! rounding the inputs.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use serde::Serialize;

use crate::composite::{with_path, Path};
use crate::{AdamWUpdate, CudaForm, PackGradSink, PackedSublayer, SparseNeighbors};

thread_local! {
    /// The gradient sinks a case's op gave its packed sublayer, with the packs: `run` delivers
    /// them after the backward, as the pretraining model does (`PretrainOutput::backward`).
    static CASE_SINKS: std::cell::RefCell<Vec<(PackGradSink, Tensor, Tensor)>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[derive(Clone, Debug, Serialize)]
pub struct Agreement {
    pub op: String,
    /// "kernels" (our kernels on the device, where they exist) or "composite" (candle's ops).
    pub path: String,
    /// The dtype the device computed in ("f32" or "bf16"); the reference is always CPU f32.
    pub dtype: String,
    pub shapes: Vec<Vec<usize>>,
    pub forward_rel: f64,
    /// The worst input gradient (0 for AdamW, which has none).
    pub gradient_rel: f64,
    /// Each input's gradient, in argument order (empty for AdamW).
    pub gradient_rels: Vec<f64>,
    /// Whether an op of ours ran (false: the composite, by choice or because no kernel of
    /// ours serves this device and dtype).
    pub kernel: bool,
    pub tolerance: f64,
    /// forward_rel and gradient_rel both within tolerance.
    pub pass: bool,
}

fn rel(ours: &Tensor, reference: &Tensor) -> Result<f64> {
    let a = ours.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = reference.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let (mut diff, mut scale) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        let d = (x - y).abs();
        // Written so that a NaN difference wins (a NaN must fail, not vanish in a max).
        if d.is_nan() || d > diff {
            diff = d;
        }
        scale = scale.max(y.abs());
    }
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

/// The larger error, NaN counting as the largest (`f64::max` would drop it).
fn worst(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// SplitMix64 values in [-1, 1), deterministic per seed.
pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// `values` on the CPU as f32, rounded through `dtype` (so exactly representable in it).
fn rounded(shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(values(shape.iter().product(), seed), shape, &Device::Cpu)?.to_dtype(dtype)?.to_dtype(DType::F32)
}

pub(crate) fn dtype_name(dtype: DType) -> String {
    format!("{dtype:?}").to_lowercase()
}

/// Max relative error allowed, by dtype and by whether our kernel or candle's ops computed.
/// f32: both differ from the CPU kernels only in summation order and last-ulp differences of
/// exp / erf / sqrt (~1e-6 at these sizes), except `linear` (and the ops built on it) and candle's composition of
/// `self_attention`, whose CUDA matmuls use TF32 (10-bit mantissa). bf16, our kernels: f32 accumulation, so one rounding of the result
/// (2^-9 relative) plus that of the bf16 inputs to the op's neighbours (measured on the CPU:
/// up to 1.4e-2). bf16, candle's ops: they also round intermediates and, on the CPU at least,
/// accumulate sums in bf16 (measured: 0.15 on the dense conv weight gradient, a sum over
/// 6272 pixels), so only gross errors are caught there; the numbers are reported either way.
/// `op` may carry a variant after a colon ("layer_norm:transposed"); the op name decides, except
/// that a "gemm" variant (attention's gemm form: TF32 matmuls in f32) is held to the linear ops',
/// and so is a "flash" variant (the flash form is bf16 and f16 only: in f32 the gemm form runs).
fn tolerance(op: &str, dtype: DType, kernel: bool) -> f64 {
    let gemm_form = op.split(':').nth(1).is_some_and(|variant| variant.contains("gemm") || variant.contains("flash"));
    let op = op.split(':').next().unwrap_or(op);
    match (op, dtype, kernel) {
        (_, DType::BF16 | DType::F16, true) => 3e-2,
        (_, DType::BF16 | DType::F16, false) => 2.5e-1,
        ("linear" | "linear_gelu" | "mlp_residual" | "attention_residual" | "conv_residual" | "sublayer_chain" | "tape_backward", _, _) | ("self_attention", _, false) => 5e-3,
        _ if gemm_form => 5e-3,
        _ => 1e-5,
    }
}

type Op = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// The case whose backward runs on the tape (`crate::tape`) where that covers its graph.
const TAPE_CASE: &str = "tape_backward";

/// One op's case: its inputs' shapes and seed, and the op on tensors.
struct Case {
    name: &'static str,
    shapes: Vec<Vec<usize>>,
    seed: u64,
    op: Op,
}

/// The forward result and every input gradient of `sum(op(inputs) * probe)`, computed in
/// `dtype` on `dev` from the (already rounded) f32 inputs `host`; all returned on the CPU.
fn run(case: &Case, host: &[Tensor], dev: &Device, dtype: DType, round: DType) -> Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> = host.iter().map(|t| Var::from_tensor(&t.to_dtype(dtype)?.to_device(dev)?)).collect::<Result<_>>()?;
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    // Sinks a failed earlier run left behind are not this run's.
    CASE_SINKS.with(|sinks| sinks.borrow_mut().clear());
    // The tape's case records its op and runs its backward on the tape where that covers it
    // (our ops' path), as pretraining's does; every other case (its `:candle` twin too) runs
    // candle's backward.
    let (out, tape) = if case.name == TAPE_CASE { crate::tape::record_unless_switched_off(|| (case.op)(&inputs)) } else { ((case.op)(&inputs), None) };
    let out = out?;
    // In the output's dtype, which is not always the inputs' (the patch loss is f32 from bf16).
    let probe = rounded(out.dims(), case.seed + 100, round)?.to_dtype(out.dtype())?.to_device(dev)?;
    let mut grads = match tape {
        // The gradient candle's backward of sum(out * probe) hands `out`: probe, exactly.
        Some(tape) if tape.covers(&out) => tape.backward(&out, probe)?,
        _ => (&out * &probe)?.sum_all()?.backward()?,
    };
    // A pack no gradient reached would read as zeros below on both sides of the comparison (the
    // reference's delivery too): an error instead, so that the row cannot pass that way.
    CASE_SINKS.with(|sinks| {
        sinks.borrow_mut().drain(..).try_for_each(|(sink, w, v)| {
            sink.deliver(&w, &v, &mut grads)?;
            if grads.get(&w).is_none() || grads.get(&v).is_none() {
                candle_core::bail!("{}: no gradient reached its packed parameters", case.name);
            }
            Ok(())
        })
    })?;
    let g = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).cloned().unwrap_or(v.as_tensor().zeros_like()?).to_device(&Device::Cpu))
        .collect::<Result<_>>()?;
    Ok((out.to_device(&Device::Cpu)?, g))
}

/// `case` on `device` in `dtype` by each of `paths`, against the CPU kernels in f32.
fn compare(case: &Case, device: &Device, dtype: DType, paths: &[Path]) -> Result<Vec<Agreement>> {
    let host: Vec<Tensor> =
        case.shapes.iter().enumerate().map(|(i, s)| rounded(s, case.seed + i as u64, dtype)).collect::<Result<_>>()?;
    let (ref_out, ref_grads) = with_path(Path::Kernels, || run(case, &host, &Device::Cpu, DType::F32, dtype))?;
    let mut rows = Vec::new();
    for &path in paths {
        // Inside with_path the forced path decides for every op (the OpSwitch variables
        // included), so whether a kernel of ours ran is has_kernel's answer.
        let kernel = with_path(path, || -> Result<bool> { Ok(crate::has_kernel(&host[0].to_dtype(dtype)?.to_device(device)?)) })?;
        let (out, grads) = with_path(path, || run(case, &host, device, dtype, dtype))?;
        let gradient_rels = grads.iter().zip(&ref_grads).map(|(g, r)| rel(g, r)).collect::<Result<Vec<_>>>()?;
        let gradient_rel = gradient_rels.iter().fold(0f64, |a, &b| worst(a, b));
        let forward_rel = rel(&out, &ref_out)?;
        let tolerance = tolerance(case.name, dtype, kernel);
        rows.push(Agreement {
            op: case.name.into(),
            path: path_name(path).into(),
            dtype: dtype_name(dtype),
            shapes: case.shapes.clone(),
            forward_rel,
            gradient_rel,
            gradient_rels,
            kernel,
            tolerance,
            pass: forward_rel <= tolerance && gradient_rel <= tolerance,
        });
    }
    Ok(rows)
}

pub(crate) fn path_name(path: Path) -> &'static str {
    match path {
        Path::Kernels => "kernels",
        Path::Composite => "composite",
    }
}

/// The visible positions of `images` square `side` x `side` maps whose mask cells are `cell` x
/// `cell` positions, one cell in four kept (ConvMAE's 75% mask ratio) in a pattern shifted per
/// image: (image, y, x) in image-major, row-major order.
pub(crate) fn visible_positions(images: u32, side: u32, cell: u32) -> Vec<(u32, u32, u32)> {
    let cells_per_row = side / cell;
    let mut positions = Vec::new();
    for image in 0..images {
        for y in 0..side {
            for x in 0..side {
                if ((y / cell) * cells_per_row + x / cell + image).is_multiple_of(4) {
                    positions.push((image, y, x));
                }
            }
        }
    }
    positions
}

/// `images` rows of ids_restore for `tokens` tokens: each image's ranks a permutation of
/// 0..tokens, a different one per image (rank of position i: (i * 5 + image) mod tokens, 5
/// coprime to the token counts used here).
pub(crate) fn shuffled_ranks(images: usize, tokens: usize) -> Vec<u32> {
    (0..images).flat_map(|b| (0..tokens).map(move |i| ((i * 5 + b) % tokens) as u32)).collect()
}

/// Every op at ConvMAE-B-like shapes (batch 4, or 2 images for the convolutions).
fn cases() -> Result<Vec<Case>> {
    let mut cases = vec![
        Case {
            name: "layer_norm",
            shapes: vec![vec![4, 196, 768], vec![768], vec![768]],
            seed: 1,
            op: Box::new(|t| crate::layer_norm(&t[0], &t[1], &t[2], 1e-6)),
        },
        Case { name: "softmax_last_dim", shapes: vec![vec![4, 12, 49, 49]], seed: 2, op: Box::new(|t| crate::softmax_last_dim(&(&t[0] * 4.0)?)) },
        Case { name: "gelu_erf", shapes: vec![vec![4, 49, 3072]], seed: 3, op: Box::new(|t| crate::gelu_erf(&(&t[0] * 3.0)?)) },
        // Stage 3 of ConvMAE-B (49 visible tokens, 12 heads of 64) and its decoder (196 tokens,
        // 16 heads of 32). The inputs are scaled up so the softmax is peaked, as trained
        // attention is, rather than nearly uniform.
        Case {
            name: "self_attention",
            shapes: vec![vec![4, 49, 3 * 768]],
            seed: 7,
            op: Box::new(|t| crate::self_attention(&(&t[0] * 3.0)?, 12, 0.125)),
        },
        Case {
            name: "self_attention:decoder",
            shapes: vec![vec![2, 196, 3 * 512]],
            seed: 8,
            op: Box::new(|t| crate::self_attention(&(&t[0] * 3.0)?, 16, 32f64.powf(-0.5))),
        },
        // The same two by the gemm form of our op on CUDA (on the CPU: the one CPU op), and a
        // head dim the fused kernels lack, which takes the gemm form there.
        Case {
            name: "self_attention:gemm",
            shapes: vec![vec![4, 49, 3 * 768]],
            seed: 7,
            op: Box::new(|t| crate::with_cuda_form(CudaForm::Gemm, || crate::self_attention(&(&t[0] * 3.0)?, 12, 0.125))),
        },
        Case {
            name: "self_attention:decoder_gemm",
            shapes: vec![vec![2, 196, 3 * 512]],
            seed: 8,
            op: Box::new(|t| crate::with_cuda_form(CudaForm::Gemm, || crate::self_attention(&(&t[0] * 3.0)?, 16, 32f64.powf(-0.5)))),
        },
        // And by the flash form (bf16; in f32 it gives way to the gemm form).
        Case {
            name: "self_attention:flash",
            shapes: vec![vec![4, 49, 3 * 768]],
            seed: 7,
            op: Box::new(|t| crate::with_cuda_form(CudaForm::Flash, || crate::self_attention(&(&t[0] * 3.0)?, 12, 0.125))),
        },
        Case {
            name: "self_attention:decoder_flash",
            shapes: vec![vec![2, 196, 3 * 512]],
            seed: 8,
            op: Box::new(|t| crate::with_cuda_form(CudaForm::Flash, || crate::self_attention(&(&t[0] * 3.0)?, 16, 32f64.powf(-0.5)))),
        },
        // And by the flash form on mma.sync (left out with CONVMAE_FLASH_MMA=off,
        // as the GPU check runs this table should its own probe of that form fail).
        Case {
            name: "self_attention:flash_mma",
            shapes: vec![vec![4, 49, 3 * 768]],
            seed: 7,
            op: Box::new(|t| crate::with_cuda_form(CudaForm::FlashMma, || crate::self_attention(&(&t[0] * 3.0)?, 12, 0.125))),
        },
        Case {
            name: "self_attention:decoder_flash_mma",
            shapes: vec![vec![2, 196, 3 * 512]],
            seed: 8,
            op: Box::new(|t| crate::with_cuda_form(CudaForm::FlashMma, || crate::self_attention(&(&t[0] * 3.0)?, 16, 32f64.powf(-0.5)))),
        },
        Case {
            name: "self_attention:gemm_hd24",
            shapes: vec![vec![3, 50, 3 * 96]],
            seed: 19,
            op: Box::new(|t| crate::self_attention(&(&t[0] * 3.0)?, 4, 24f64.powf(-0.5))),
        },
        Case {
            name: "linear",
            shapes: vec![vec![4, 49, 768], vec![3072, 768], vec![3072]],
            seed: 4,
            op: Box::new(|t| crate::linear(&t[0], &t[1], &t[2])),
        },
        // The same by cuBLAS and our bias kernels, as before cuBLASLt's epilogues (the rows
        // above take them on CUDA where they serve): should "linear" fail and this pass, the
        // epilogues are what is wrong (the GPU check then turns them off).
        Case {
            name: "linear:plain_gemm",
            shapes: vec![vec![4, 49, 768], vec![3072, 768], vec![3072]],
            seed: 4,
            op: Box::new(|t| crate::with_gemm_epilogue(false, || crate::linear(&t[0], &t[1], &t[2]))),
        },
        Case {
            name: "linear_gelu",
            shapes: vec![vec![4, 49, 768], vec![3072, 768], vec![3072]],
            seed: 9,
            op: Box::new(|t| crate::linear_gelu(&(&t[0] * 2.0)?, &t[1], &t[2])),
        },
        // The decoder's MLP sublayer (LayerNorm, fc1 + GELU, fc2, residual) as one op; the
        // LayerNorm weight is moved away from 0 as trained ones are.
        Case {
            name: "mlp_residual",
            shapes: vec![vec![2, 196, 512], vec![512], vec![512], vec![2048, 512], vec![2048], vec![512, 2048], vec![512]],
            seed: 10,
            op: Box::new(|t| crate::mlp_residual(&(&t[0] * 2.0)?, (&(&t[1] + 1.5)?, &t[2]), 1e-6, (&t[3], &t[4]), (&t[5], &t[6]))),
        },
        Case {
            name: "mlp_residual:plain_gemm",
            shapes: vec![vec![2, 196, 512], vec![512], vec![512], vec![2048, 512], vec![2048], vec![512, 2048], vec![512]],
            seed: 10,
            op: Box::new(|t| {
                crate::with_gemm_epilogue(false, || crate::mlp_residual(&(&t[0] * 2.0)?, (&(&t[1] + 1.5)?, &t[2]), 1e-6, (&t[3], &t[4]), (&t[5], &t[6])))
            }),
        },
        // The same sublayer on its parameters packed, as pretraining's bf16 copies are, the packs'
        // gradients taken by a sink rather than by candle (`PackGradSink`) and delivered after
        // the backward; the LayerNorm weight is not moved away from 0 here (a shifted pack would
        // not be the leaf the sink delivers to).
        Case {
            name: "mlp_residual:packed",
            shapes: vec![vec![2, 196, 512], vec![2048 * 512 + 512 * 2048], vec![3 * 512 + 2048]],
            seed: 10,
            op: Box::new(|t| {
                let sink = PackGradSink::new();
                let y = crate::mlp_residual_packed(&(&t[0] * 2.0)?, PackedSublayer { weights: &t[1], vectors: &t[2], sink: Some(&sink) }, 1e-6, 2048)?;
                CASE_SINKS.with(|sinks| sinks.borrow_mut().push((sink, t[1].clone(), t[2].clone())));
                Ok(y)
            }),
        },
        // Stage 3's attention sublayer (LayerNorm, qkv, attention, proj, residual) as one op. The
        // weights are scaled to about 1 / sqrt(fan-in), as trained ones are; with unit weights
        // the attention logits would reach the hundreds and the softmax would be one-hot.
        Case {
            name: "attention_residual",
            shapes: vec![vec![4, 49, 768], vec![768], vec![768], vec![2304, 768], vec![2304], vec![768, 768], vec![768]],
            seed: 18,
            op: Box::new(|t| crate::attention_residual(&(&t[0] * 2.0)?, (&(&t[1] + 1.5)?, &t[2]), 1e-6, (&(&t[3] * 0.08)?, &t[4]), (&(&t[5] * 0.05)?, &t[6]), 12)),
        },
        Case {
            name: "attention_residual:gemm",
            shapes: vec![vec![4, 49, 768], vec![768], vec![768], vec![2304, 768], vec![2304], vec![768, 768], vec![768]],
            seed: 18,
            op: Box::new(|t| {
                crate::with_cuda_form(CudaForm::Gemm, || {
                    crate::attention_residual(&(&t[0] * 2.0)?, (&(&t[1] + 1.5)?, &t[2]), 1e-6, (&(&t[3] * 0.08)?, &t[4]), (&(&t[5] * 0.05)?, &t[6]), 12)
                })
            }),
        },
        Case {
            name: "attention_residual:flash",
            shapes: vec![vec![4, 49, 768], vec![768], vec![768], vec![2304, 768], vec![2304], vec![768, 768], vec![768]],
            seed: 18,
            op: Box::new(|t| {
                crate::with_cuda_form(CudaForm::Flash, || {
                    crate::attention_residual(&(&t[0] * 2.0)?, (&(&t[1] + 1.5)?, &t[2]), 1e-6, (&(&t[3] * 0.08)?, &t[4]), (&(&t[5] * 0.05)?, &t[6]), 12)
                })
            }),
        },
        Case {
            name: "depthwise_conv2d",
            shapes: vec![vec![2, 56, 56, 256], vec![256, 5, 5]],
            seed: 5,
            op: Box::new(|t| crate::depthwise_conv2d(&t[0], &t[1])),
        },
    ];
    // Stage 1 of ConvMAE-B for 2 images: 56x56 positions in 4x4 cells, one cell in four kept.
    let positions = visible_positions(2, 56, 4);
    let nbrs = Arc::new(SparseNeighbors::from_positions(&positions, 2, 56, 56, 5)?);
    cases.push(Case {
        name: "sparse_depthwise_conv2d",
        shapes: vec![vec![positions.len(), 256], vec![256, 5, 5]],
        seed: 6,
        op: Box::new({
            let nbrs = nbrs.clone();
            move |t| crate::sparse_depthwise_conv2d(&t[0], &t[1], &nbrs)
        }),
    });
    // A stage-1 conv block's first half on the same rows: LayerNorm, conv1, the sparse conv and
    // its bias, conv2 and the residual as one op.
    let c = 256;
    cases.push(Case {
        name: "conv_residual",
        shapes: vec![vec![positions.len(), c], vec![c], vec![c], vec![c, c, 1, 1], vec![c], vec![c, 1, 5, 5], vec![c], vec![c, c, 1, 1], vec![c]],
        seed: 21,
        op: Box::new({
            let nbrs = nbrs.clone();
            move |t| crate::conv_residual(&t[0], (&t[1], &t[2]), 1e-6, (&t[3], &t[4]), (&t[5], &t[6]), (&t[7], &t[8]), &nbrs)
        }),
    });
    // A stage-1 conv block (its first half, then its MLP) on its packs as one chain
    // (`sublayer_chain`), each link's input gradient handed to the link before without candle,
    // the packs' gradients through sinks; and the same links one by one (`:links`). On a device
    // the two rows differ only if the chain is wrong: the same kernels in the same order give
    // the same bits (the GPU check compares their errors exactly).
    let hidden = 4 * c;
    for (name, chained) in [("sublayer_chain", true), ("sublayer_chain:links", false)] {
        cases.push(Case {
            name,
            shapes: vec![vec![positions.len(), c], vec![2 * c * c + c * 25], vec![5 * c], vec![2 * hidden * c], vec![3 * c + hidden]],
            seed: 23,
            op: Box::new({
                let nbrs = nbrs.clone();
                move |t| {
                    let sinks = [PackGradSink::new(), PackGradSink::new()];
                    let links = [
                        crate::SublayerLink::Conv { pack: PackedSublayer { weights: &t[1], vectors: &t[2], sink: Some(&sinks[0]) }, eps: 1e-5, neighbours: &nbrs },
                        crate::SublayerLink::Mlp { pack: PackedSublayer { weights: &t[3], vectors: &t[4], sink: Some(&sinks[1]) }, eps: 1e-5, hidden },
                    ];
                    let y = if chained { crate::sublayer_chain(&t[0], &links)? } else { crate::with_composite_ops(&["sublayer_chain"], || crate::sublayer_chain(&t[0], &links))? };
                    CASE_SINKS.with(|s| s.borrow_mut().extend([(sinks[0].clone(), t[1].clone(), t[2].clone()), (sinks[1].clone(), t[3].clone(), t[4].clone())]));
                    Ok(y)
                }
            }),
        });
    }
    // A stage-1 patch embedding (linear, LayerNorm, GELU) into a conv block's chain, whose
    // output is added to the block's input (a tensor with two consumers): the backward on the
    // tape (`tape_backward`, each op's backward once, a second gradient added to the first
    // rather than every gradient to zeros) and by candle (`:candle`). On a device the two rows
    // differ only if the tape is wrong: the same kernels give the same bits either way, and
    // the GPU check compares their errors exactly.
    for name in [TAPE_CASE, "tape_backward:candle"] {
        cases.push(Case {
            name,
            shapes: vec![
                vec![positions.len(), c],
                vec![c, c],
                vec![c],
                vec![c],
                vec![c],
                vec![2 * c * c + c * 25],
                vec![5 * c],
                vec![2 * hidden * c],
                vec![3 * c + hidden],
            ],
            seed: 25,
            op: Box::new({
                let nbrs = nbrs.clone();
                move |t| {
                    let embedded = crate::gelu_erf(&crate::layer_norm(&crate::linear(&t[0], &t[1], &t[2])?, &t[3], &t[4], 1e-5)?)?;
                    let sinks = [PackGradSink::new(), PackGradSink::new()];
                    let links = [
                        crate::SublayerLink::Conv { pack: PackedSublayer { weights: &t[5], vectors: &t[6], sink: Some(&sinks[0]) }, eps: 1e-5, neighbours: &nbrs },
                        crate::SublayerLink::Mlp { pack: PackedSublayer { weights: &t[7], vectors: &t[8], sink: Some(&sinks[1]) }, eps: 1e-5, hidden },
                    ];
                    let y = crate::tape::add(&crate::sublayer_chain(&embedded, &links)?, &embedded)?;
                    CASE_SINKS.with(|s| s.borrow_mut().extend([(sinks[0].clone(), t[5].clone(), t[6].clone()), (sinks[1].clone(), t[7].clone(), t[8].clone())]));
                    Ok(y)
                }
            }),
        });
    }
    // The same ops on inputs that are not contiguous from offset 0, as the model hands some of
    // them over (a transpose, a permute, a slice): on CUDA these take the strided-copy and the
    // offset-view paths of the launch code, which the cases above never reach.
    let rows = positions.len();
    cases.extend([
        Case {
            name: "layer_norm:transposed",
            shapes: vec![vec![4, 768, 196], vec![768], vec![768]],
            seed: 11,
            op: Box::new(|t| crate::layer_norm(&t[0].transpose(1, 2)?, &t[1], &t[2], 1e-6)),
        },
        Case { name: "softmax_last_dim:offset", shapes: vec![vec![5, 12, 49, 49]], seed: 12, op: Box::new(|t| crate::softmax_last_dim(&t[0].narrow(0, 1, 4)?)) },
        Case { name: "gelu_erf:transposed", shapes: vec![vec![4, 3072, 49]], seed: 13, op: Box::new(|t| crate::gelu_erf(&t[0].transpose(1, 2)?)) },
        Case {
            name: "self_attention:transposed",
            shapes: vec![vec![2, 3 * 256, 70]],
            seed: 14,
            op: Box::new(|t| crate::self_attention(&(&t[0] * 3.0)?.transpose(1, 2)?, 8, 0.25)),
        },
        Case {
            name: "linear:conv1x1_transposed",
            shapes: vec![vec![2, 256, 196], vec![384, 256, 1, 1], vec![384]],
            seed: 17,
            op: Box::new(|t| crate::linear(&t[0].transpose(1, 2)?, &t[1], &t[2])),
        },
        Case {
            name: "depthwise_conv2d:permuted",
            shapes: vec![vec![2, 256, 56, 56], vec![256, 5, 5]],
            seed: 15,
            op: Box::new(|t| crate::depthwise_conv2d(&t[0].permute((0, 2, 3, 1))?, &t[1])),
        },
        Case {
            name: "sparse_depthwise_conv2d:offset",
            shapes: vec![vec![rows + 7, 256], vec![256, 5, 5]],
            seed: 16,
            op: Box::new(move |t| crate::sparse_depthwise_conv2d(&t[0].narrow(0, 7, rows)?, &t[1], &nbrs)),
        },
        // Stage 1's token blocks cut into patch_embed2's 2 x 2 windows, from a permuted view.
        Case {
            name: "patch_blocks",
            shapes: vec![vec![2 * 49, 256, 4, 4]],
            seed: 19,
            op: Box::new(|t| crate::patch_blocks(&t[0].permute((0, 2, 3, 1))?, 2)),
        },
        // The stage-1 fusion conv's kernel (768 x 256 x 4 x 4) as its matmul's rows.
        Case { name: "conv_weight_rows", shapes: vec![vec![768, 256, 4, 4]], seed: 24, op: Box::new(|t| crate::conv_weight_rows(&t[0])) },
        // The decoder's entry at ConvMAE-B's shapes (2 images, 49 of 196 tokens kept, width 512).
        Case {
            name: "restore_tokens",
            shapes: vec![vec![2, 49, 512], vec![1, 1, 512], vec![1, 196, 512]],
            seed: 20,
            op: Box::new(|t| {
                let ids = Tensor::from_vec(shuffled_ranks(2, 196), (2, 196), &Device::Cpu)?.to_device(t[0].device())?;
                crate::restore_tokens(&t[0], &t[1], &t[2], &ids)
            }),
        },
        // MAE's loss at ConvMAE-B's shapes (2 images of 224, 196 patches of 16 x 16 x 3): the
        // prediction in the dtype under test, the images and the mask in f32 as the model gives
        // them (the mask: the patches whose random value is not negative).
        Case {
            name: "masked_patch_mse",
            shapes: vec![vec![2, 196, 768], vec![2, 224, 224, 3], vec![2, 196]],
            seed: 18,
            op: Box::new(|t| {
                let imgs = (t[1].detach().to_dtype(DType::F32)? * 2.0)?;
                let mask = t[2].ge(0.0)?.to_dtype(DType::F32)?;
                crate::masked_patch_mse(&t[0], &imgs, &mask, 16, true)
            }),
        },
    ]);
    Ok(cases)
}

/// Every op in f32 on `device` vs the CPU kernels, by the default path (for the CPU device:
/// the kernels against themselves). Kept for callers of the first version of this check.
/// The cases whose names contain `part` alone, on `device`, in `dtypes`, by our kernels: the
/// GPU check's probe of one form of attention in a process of its own, before the whole table.
pub fn compare_only(device: &Device, part: &str, dtypes: &[DType]) -> Result<Vec<Agreement>> {
    let mut out = Vec::new();
    for case in cases()?.into_iter().filter(|c| c.name.contains(part)) {
        for &dtype in dtypes {
            out.extend(compare(&case, device, dtype, &[Path::Kernels])?);
        }
    }
    Ok(out)
}

/// The detector's ROIAlign on an FPN level of a 1024-px image pair (p3: stride 8, 128 x 128 x
/// 256), 7 x 7 bins with adaptive sampling, over boxes of every kind the detector meets: small
/// and large, on the map's edges, partly and wholly off it, smaller than a pixel, on both images.
fn roi_align_case() -> Case {
    let boxes: Vec<crate::RoiBox> = (0..96)
        .map(|i| {
            let f = |k: usize| ((i * 7919 + k * 104_729) % 1000) as f32 / 1000.0;
            let (w, h) = (1.0 + 400.0 * f(1) * f(1), 1.0 + 400.0 * f(2) * f(2));
            let (x1, y1) = (-100.0 + 1150.0 * f(3), -100.0 + 1150.0 * f(4));
            let (w, h) = if i % 16 == 0 { (0.4, 0.3) } else { (w, h) };
            crate::RoiBox { image: i % 2, x1, y1, x2: x1 + w, y2: y1 + h }
        })
        .collect();
    Case { name: "roi_align", shapes: vec![vec![2, 128, 128, 256]], seed: 25, op: Box::new(move |t| crate::roi_align(&t[0], &boxes, 7, 0.125, 0)) }
}

pub fn compare_on(device: &Device) -> Result<Vec<Agreement>> {
    compare_paths(device, &[Path::Kernels], &[DType::F32])
}

/// Every op on `device`, in each of `dtypes` (f32, bf16) and by each of `paths`, vs the CPU
/// kernels in f32. The GPU check calls it with both paths and both dtypes.
pub fn compare_paths(device: &Device, paths: &[Path], dtypes: &[DType]) -> Result<Vec<Agreement>> {
    let mut out = Vec::new();
    for case in cases()?.into_iter().filter(|c| !(c.name.ends_with("flash_mma") && crate::attention::flash_mma_off())) {
        for &dtype in dtypes {
            out.extend(compare(&case, device, dtype, paths)?);
        }
    }
    // ROIAlign has kernels in f32 and f64 only (the detector's), so its row is f32 alone.
    if paths.contains(&Path::Kernels) && dtypes.contains(&DType::F32) {
        out.extend(compare(&roi_align_case(), device, DType::F32, &[Path::Kernels])?);
    }
    for &dtype in dtypes {
        for &path in paths {
            out.push(adamw_agreement(device, dtype, path)?);
        }
    }
    // Mixed precision's update (CUDA only: elsewhere the caller updates in f32 and casts).
    if device.is_cuda() && paths.contains(&Path::Kernels) && dtypes.contains(&DType::BF16) {
        out.push(adamw_compute_copy_agreement(device)?);
        out.push(adamw_many_agreement(device)?);
    }
    // The image normalization: the device's bits must be the host's.
    if device.is_cuda() && paths.contains(&Path::Kernels) {
        out.push(normalize_agreement(device)?);
        out.push(transfer_agreement(device)?);
        out.push(visible_neighbors_agreement(device)?);
    }
    Ok(out)
}

/// The neighbour table of a mask's visible token blocks as the GPU builds it (cuda/depthwise.cu
/// `visible_neighbors`) against the table built on the host from the list of positions and a
/// map of the grid (`from_positions`), to the bit: ConvMAE-B's stage-1 and stage-2 cells on its
/// 14 x 14 grid, a 75% mask of 4 images.
fn visible_neighbors_agreement(device: &Device) -> Result<Agreement> {
    let (images, grid, len_keep, k) = (4usize, 14usize, 49usize, 5usize);
    let mut same = true;
    for cell in [4usize, 2] {
        let tokens = grid * grid;
        let (mut ids_keep, mut slot) = (Vec::new(), vec![-1i32; images * tokens]);
        for b in 0..images {
            // A fixed shuffle of the tokens per image: t -> (t * 67 + 13 b) mod 196 (67 is prime to 196).
            for v in 0..len_keep {
                let t = (v * 67 + 13 * b) % tokens;
                ids_keep.push(t as u32);
                slot[b * tokens + t] = v as i32;
            }
        }
        let mut positions = Vec::new();
        for (n, &t) in ids_keep.iter().enumerate() {
            let (image, ty, tx) = ((n / len_keep) as u32, t as usize / grid, t as usize % grid);
            for i in 0..cell {
                for j in 0..cell {
                    positions.push((image, (ty * cell + i) as u32, (tx * cell + j) as u32));
                }
            }
        }
        let side = grid * cell;
        let want = SparseNeighbors::from_positions(&positions, images, side, side, k)?;
        let nbrs = SparseNeighbors::of_visible_tokens(crate::VisibleTokens { images, grid, cell, len_keep, ids_keep, slot }, k)?;
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            let got = dev.cuda_stream().clone_dtoh(&*nbrs.device_table(dev)?).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            same &= got == want.table();
        }
        same &= nbrs.table() == want.table();
    }
    let _ = device;
    let forward_rel = if same { 0.0 } else { f64::INFINITY };
    Ok(state_row("sparse_neighbors:of_visible_tokens", Path::Kernels, "i32".into(), &[images * len_keep * 16, k * k], forward_rel, true, 0.0))
}

/// `upload` and `read_later` (transfer.rs: pinned staging rings, pinned readbacks) against
/// `Tensor::from_slice` and `to_scalar`, to the bit: u8 images, u32 indices, f32 and f64 values,
/// small uploads and uploads past the large ring's threshold, enough of them that every ring
/// comes round several times (a buffer reused before its copy ran would show as wrong bytes),
/// each read back after all were queued; and scalars of f32, bf16 and f64 read back late.
fn transfer_agreement(device: &Device) -> Result<Agreement> {
    let bits = |t: &Tensor| -> Result<Vec<u64>> {
        let t = t.flatten_all()?;
        Ok(match t.dtype() {
            DType::U8 => t.to_vec1::<u8>()?.into_iter().map(u64::from).collect(),
            DType::U32 => t.to_vec1::<u32>()?.into_iter().map(u64::from).collect(),
            DType::F32 => t.to_vec1::<f32>()?.into_iter().map(|v| u64::from(v.to_bits())).collect(),
            _ => t.to_dtype(DType::F64)?.to_vec1::<f64>()?.into_iter().map(f64::to_bits).collect(),
        })
    };
    let mut uploaded = Vec::new();
    for round in 0..40usize {
        let n = [300, 70_000, 600_000, 3_000_000][round % 4] + round;
        let pixels: Vec<u8> = (0..n).map(|i| ((i * 2654435761usize + round) >> 5) as u8).collect();
        let indices: Vec<u32> = (0..n / 8).map(|i| (i * 7 + round) as u32).collect();
        let values: Vec<f32> = (0..n / 16).map(|i| (i as f32 * 0.37 - round as f32).sin()).collect();
        let wide: Vec<f64> = (0..n / 64).map(|i| (i as f64 * 0.11 + round as f64).cos()).collect();
        uploaded.push((crate::upload(&pixels, n, device)?, Tensor::from_slice(&pixels, n, &Device::Cpu)?));
        uploaded.push((crate::upload(&indices, n / 8, device)?, Tensor::from_slice(&indices, n / 8, &Device::Cpu)?));
        uploaded.push((crate::upload(&values, n / 16, device)?, Tensor::from_slice(&values, n / 16, &Device::Cpu)?));
        uploaded.push((crate::upload(&wide, n / 64, device)?, Tensor::from_slice(&wide, n / 64, &Device::Cpu)?));
    }
    let mut same = uploaded.iter().all(|(d, c)| matches!((bits(d), bits(c)), (Ok(a), Ok(b)) if a == b));
    let scalars = [Tensor::new(1.25f32, device)?, Tensor::new(-3.5f32, device)?.to_dtype(DType::BF16)?, Tensor::new(0.1f64, device)?];
    let pending = scalars.iter().map(crate::read_later).collect::<Result<Vec<_>>>()?;
    for (p, t) in pending.into_iter().zip(&scalars) {
        same &= p.wait()?.to_bits() == t.to_dtype(DType::F64)?.to_scalar::<f64>()?.to_bits();
    }
    let forward_rel = if same { 0.0 } else { f64::INFINITY };
    Ok(state_row("transfer:upload,read_later", Path::Kernels, "u8, u32, f32, f64; f32, bf16, f64 scalars".into(), &[3_000_000], forward_rel, true, 0.0))
}

/// `normalize_rgb` on `device` against the CPU op (which is the host path's formula): tolerance 0.
fn normalize_agreement(device: &Device) -> Result<Agreement> {
    let shape: &[usize] = &[4, 56, 56, 3];
    let n: usize = shape.iter().product();
    let pixels: Vec<u8> = (0..n).map(|i| ((i * 2654435761usize) >> 7) as u8).collect();
    let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
    let on_cpu = crate::normalize_rgb(&Tensor::from_slice(&pixels, shape, &Device::Cpu)?, mean, std)?;
    let on_device = crate::normalize_rgb(&Tensor::from_slice(&pixels, shape, device)?, mean, std)?;
    let forward_rel = rel(&on_device, &on_cpu)?;
    Ok(state_row("normalize_rgb", Path::Kernels, "u8 -> f32".into(), shape, forward_rel, true, 0.0))
}

/// The row of an op without gradients (an update, a conversion): its outputs' worst error.
fn state_row(op: &str, path: Path, dtype: String, shape: &[usize], forward_rel: f64, kernel: bool, tolerance: f64) -> Agreement {
    Agreement {
        op: op.into(),
        path: path_name(path).into(),
        dtype,
        shapes: vec![shape.to_vec()],
        forward_rel,
        gradient_rel: 0.0,
        gradient_rels: Vec::new(),
        kernel,
        tolerance,
        pass: forward_rel <= tolerance,
    }
}

/// `adamw_update_with_shadow` on `device`: f32 weights and moments, a bf16 gradient, against the
/// CPU update in f32 from the same gradient values, and the bf16 compute copy against the
/// device's new weights rounded to bf16; the worst of them against the f32 kernel tolerance.
fn adamw_compute_copy_agreement(device: &Device) -> Result<Agreement> {
    let shape: &[usize] = &[768, 3072];
    let make = |seed: u64, scale: f64| -> Result<Tensor> { rounded(shape, seed, DType::F32)? * scale };
    let (p, m) = (make(11, 1.0)?, make(12, 0.01)?);
    let v = make(14, 0.01)?.abs()?;
    let g = make(13, 0.1)?.to_dtype(DType::BF16)?;
    let u = AdamWUpdate { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.05, step: 7 };
    let (pc, mc, vc) = (p.copy()?, m.copy()?, v.copy()?);
    with_path(Path::Kernels, || crate::adamw_update(&pc, &mc, &vc, &g.to_dtype(DType::F32)?, &u))?;
    let (pd, md, vd, gd) = (p.to_device(device)?, m.to_device(device)?, v.to_device(device)?, g.to_device(device)?);
    let copy = Tensor::zeros(shape, DType::BF16, device)?;
    with_path(Path::Kernels, || crate::adamw_update_with_shadow(&pd, &md, &vd, &gd, &copy, &u))?;
    // The copy against the device's new weights rounded: 0 when it is one rounding of the same
    // values; a different rounding would show as ~4e-3, far past the f32 tolerance.
    let copy_rel = rel(&copy, &pd.to_dtype(DType::BF16)?)?;
    let forward_rel = worst(worst(worst(rel(&pd, &pc)?, rel(&md, &mc)?), rel(&vd, &vc)?), copy_rel);
    let tolerance = tolerance("adamw_update", DType::F32, true);
    Ok(state_row("adamw_update:compute_copy", Path::Kernels, "f32 (bf16 gradient and copy)".into(), shape, forward_rel, true, tolerance))
}

/// `adamw_update_many` on `device`: three tensors in one launch (a bf16 gradient with its bf16
/// compute copy, an f32 gradient without one, a single element; three lr and weight-decay
/// pairs) against the CPU update of each in f32, and each copy against its weights rounded;
/// guarded by a finite loss, and then by a NaN loss, which must leave every tensor as it was.
fn adamw_many_agreement(device: &Device) -> Result<Agreement> {
    // Weights, moments, gradient, compute copy, update.
    type ManyItem = (Tensor, Tensor, Tensor, Tensor, Option<Tensor>, AdamWUpdate);
    let shapes: [&[usize]; 3] = [&[768, 3072], &[768], &[1]];
    let mut worst_rel = 0.0;
    let mut on_device = Vec::new();
    let mut references = Vec::new();
    for (k, shape) in shapes.iter().enumerate() {
        let seed = 20 + 5 * k as u64;
        let make = |s: u64, scale: f64| -> Result<Tensor> { rounded(shape, s, DType::F32)? * scale };
        let (p, m) = (make(seed, 1.0)?, make(seed + 1, 0.01)?);
        let v = make(seed + 2, 0.01)?.abs()?;
        let g = make(seed + 3, 0.1)?.to_dtype(if k == 1 { DType::F32 } else { DType::BF16 })?;
        let u = AdamWUpdate { lr: 1e-3 * (k + 1) as f64, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: [0.05, 0.0, 0.1][k], step: 7 };
        let (pc, mc, vc) = (p.copy()?, m.copy()?, v.copy()?);
        with_path(Path::Kernels, || crate::adamw_update(&pc, &mc, &vc, &g.to_dtype(DType::F32)?, &u))?;
        references.push((pc, mc, vc));
        let copy = (k != 1).then(|| Tensor::zeros(*shape, DType::BF16, device)).transpose()?;
        on_device.push((p.to_device(device)?, m.to_device(device)?, v.to_device(device)?, g.to_device(device)?, copy, u));
    }
    let items: Vec<crate::AdamWItem> = on_device.iter().map(|(p, m, v, g, copy, u)| crate::AdamWItem { param: p, exp_avg: m, exp_avg_sq: v, grad: g, copy: copy.clone(), u: *u }).collect();
    // Guarded by a finite loss, as overlapped pretraining steps run it: the plain update.
    let finite_loss = Tensor::new(0.5f32, device)?;
    let ran = with_path(Path::Kernels, || crate::adamw_update_many(&items, Some(&finite_loss)))?;
    // Guarded by a NaN loss: nothing may change, to the bit.
    let state = |on_device: &[ManyItem]| -> Result<Vec<Vec<f32>>> {
        let mut all = Vec::new();
        for (p, m, v, _, copy, _) in on_device {
            for t in [Some(p), Some(m), Some(v), copy.as_ref()].into_iter().flatten() {
                all.push(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            }
        }
        Ok(all)
    };
    let before = state(&on_device)?;
    let nan_loss = Tensor::new(f32::NAN, device)?;
    let guard_ran = with_path(Path::Kernels, || crate::adamw_update_many(&items, Some(&nan_loss)))?;
    let untouched = before.iter().zip(&state(&on_device)?).all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    drop(items);
    for ((pd, md, vd, _, copy, _), (pc, mc, vc)) in on_device.iter().zip(&references) {
        worst_rel = worst(worst(worst(worst_rel, rel(pd, pc)?), rel(md, mc)?), rel(vd, vc)?);
        if let Some(copy) = copy {
            worst_rel = worst(worst_rel, rel(copy, &pd.to_dtype(DType::BF16)?)?);
        }
    }
    // Not run (a tensor it does not take) counts as a failure: the row would measure nothing.
    // So does a NaN loss that changed anything.
    let forward_rel = if ran && guard_ran && untouched { worst_rel } else { f64::INFINITY };
    let tolerance = tolerance("adamw_update", DType::F32, true);
    Ok(state_row("adamw_update:many", Path::Kernels, "f32 (bf16 and f32 gradients, bf16 copies)".into(), shapes[0], forward_rel, true, tolerance))
}

/// The AdamW update on `device` (fused where a kernel exists, composite otherwise) vs the CPU.
fn adamw_agreement(device: &Device, dtype: DType, path: Path) -> Result<Agreement> {
    let shape: &[usize] = &[768, 3072];
    let make = |seed: u64, scale: f64| -> Result<Tensor> { (rounded(shape, seed, dtype)? * scale)?.to_dtype(dtype)?.to_dtype(DType::F32) };
    let (p, m, g) = (make(11, 1.0)?, make(12, 0.01)?, make(13, 0.1)?);
    let v = make(14, 0.01)?.abs()?;
    let u = AdamWUpdate { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.05, step: 7 };
    let (pc, mc, vc) = (p.copy()?, m.copy()?, v.copy()?);
    with_path(Path::Kernels, || crate::adamw_update(&pc, &mc, &vc, &g, &u))?;
    let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(device);
    let (kernel, (pd, md, vd)) = with_path(path, || -> Result<_> {
        let (pd, md, vd, gd) = (on(&p)?, on(&m)?, on(&v)?, on(&g)?);
        if crate::has_kernel(&pd) {
            crate::adamw_update(&pd, &md, &vd, &gd, &u)?;
            Ok((true, (pd, md, vd)))
        } else {
            Ok((false, crate::composite::adamw_step(&pd, &md, &vd, &gd, &u)?))
        }
    })?;
    let forward_rel = worst(worst(rel(&pd, &pc)?, rel(&md, &mc)?), rel(&vd, &vc)?);
    let tolerance = tolerance("adamw_update", dtype, kernel);
    Ok(state_row("adamw_update", path, dtype_name(dtype), shape, forward_rel, kernel, tolerance))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tape's row runs its backward on the tape where our kernels serve (f32 on the CPU):
    /// the tape covers the case's graph, so the row measures the tape and not candle's backward.
    #[test]
    fn the_tape_case_is_covered_by_its_tape() {
        let case = cases().unwrap().into_iter().find(|c| c.name == TAPE_CASE).unwrap();
        let vars: Vec<Var> = case.shapes.iter().enumerate().map(|(i, s)| Var::from_tensor(&rounded(s, case.seed + i as u64, DType::F32).unwrap()).unwrap()).collect();
        let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (out, tape) = with_path(Path::Kernels, || crate::tape::record(|| (case.op)(&inputs).unwrap()));
        CASE_SINKS.with(|sinks| sinks.borrow_mut().clear());
        // linear, LayerNorm, GELU, the chain and the add.
        assert_eq!(tape.len(), 5);
        assert!(tape.covers(&out));
    }
}
