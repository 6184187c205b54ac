//! Per-op timings at the shapes of a ConvMAE-B pretraining step: each op's forward and forward +
//! backward, by our kernels and by candle's compositions (`Path`), on one device and dtype.
//!
//! The agreement check says whether a kernel is right; this says whether it pays, op by op, and
//! is what to read before and after changing a kernel. The GPU check runs it on CUDA in bf16 and
//! f32 at batch 64 (a few seconds); the shapes follow the batch, so it also runs on the CPU at a
//! small batch. Times are wall-clock medians with the device synchronized around each run, so a
//! CUDA figure includes launch overhead, as a training step does.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use serde::Serialize;

use crate::agreement::{dtype_name, path_name, values, visible_positions};
use crate::composite::{with_path, Path};
use crate::SparseNeighbors;

#[derive(Clone, Debug, Serialize)]
pub struct OpTiming {
    pub op: String,
    pub path: String,
    pub dtype: String,
    pub shapes: Vec<Vec<usize>>,
    /// Whether an op of ours ran (false: candle's composition, chosen or the only one).
    pub kernel: bool,
    pub forward_ms: f64,
    /// The forward, then the gradients of `sum(out * probe)`, as a training step would.
    pub forward_backward_ms: f64,
    /// What `sum(out * probe)` and its backward cost alone on a tensor of the output's shape:
    /// part of `forward_backward_ms` that is not the op's (large for big element-wise outputs
    /// on the CPU, where fresh buffers are page-faulted in).
    pub probe_ms: f64,
    pub reps: usize,
}

type Op = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

struct TimedCase {
    name: &'static str,
    shapes: Vec<Vec<usize>>,
    op: Op,
}

/// ConvMAE-B at 224 px, 75% masked, `batch` images: stage 1 (56x56, 256 channels, 784 visible
/// positions an image), stage 2 (28x28, 384, 196), the stage-3 encoder (49 visible tokens, 12
/// heads of 64) and the decoder (196 tokens, 512 wide, 16 heads of 32).
fn cases(batch: usize) -> Result<Vec<TimedCase>> {
    let b = batch;
    let images = u32::try_from(batch).map_err(|_| candle_core::Error::Msg(format!("batch {batch} is too large")))?;
    let stage1 = Arc::new(SparseNeighbors::from_positions(&visible_positions(images, 56, 4), b, 56, 56, 5)?);
    let stage2 = Arc::new(SparseNeighbors::from_positions(&visible_positions(images, 28, 2), b, 28, 28, 5)?);
    let (rows1, rows2) = (stage1.rows(), stage2.rows());
    Ok(vec![
        TimedCase {
            name: "sparse_depthwise_conv2d:stage1",
            shapes: vec![vec![rows1, 256], vec![256, 5, 5]],
            op: Box::new({
                let nbrs = stage1.clone();
                move |t| crate::sparse_depthwise_conv2d(&t[0], &t[1], &nbrs)
            }),
        },
        TimedCase {
            name: "sparse_depthwise_conv2d:stage2",
            shapes: vec![vec![rows2, 384], vec![384, 5, 5]],
            op: Box::new(move |t| crate::sparse_depthwise_conv2d(&t[0], &t[1], &stage2)),
        },
        TimedCase {
            name: "layer_norm:stage1",
            shapes: vec![vec![rows1, 256], vec![256], vec![256]],
            op: Box::new(|t| crate::layer_norm(&t[0], &t[1], &t[2], 1e-6)),
        },
        TimedCase { name: "gelu_erf:stage1_mlp", shapes: vec![vec![rows1, 1024]], op: Box::new(|t| crate::gelu_erf(&t[0])) },
        TimedCase {
            name: "layer_norm:decoder",
            shapes: vec![vec![b, 196, 512], vec![512], vec![512]],
            op: Box::new(|t| crate::layer_norm(&t[0], &t[1], &t[2], 1e-6)),
        },
        TimedCase {
            name: "self_attention:encoder",
            shapes: vec![vec![b, 49, 3 * 768]],
            op: Box::new(|t| crate::self_attention(&t[0], 12, 0.125)),
        },
        TimedCase {
            name: "self_attention:decoder",
            shapes: vec![vec![b, 196, 3 * 512]],
            op: Box::new(|t| crate::self_attention(&t[0], 16, 32f64.powf(-0.5))),
        },
        // Both by the gemm form of our op (the rows above: the fused form).
        TimedCase {
            name: "self_attention:encoder_gemm",
            shapes: vec![vec![b, 49, 3 * 768]],
            op: Box::new(|t| crate::with_cuda_form(crate::CudaForm::Gemm, || crate::self_attention(&t[0], 12, 0.125))),
        },
        TimedCase {
            name: "self_attention:decoder_gemm",
            shapes: vec![vec![b, 196, 3 * 512]],
            op: Box::new(|t| crate::with_cuda_form(crate::CudaForm::Gemm, || crate::self_attention(&t[0], 16, 32f64.powf(-0.5)))),
        },
        // And by the flash form (bf16; in f32 it gives way to the gemm form).
        TimedCase {
            name: "self_attention:encoder_flash",
            shapes: vec![vec![b, 49, 3 * 768]],
            op: Box::new(|t| crate::with_cuda_form(crate::CudaForm::Flash, || crate::self_attention(&t[0], 12, 0.125))),
        },
        TimedCase {
            name: "self_attention:decoder_flash",
            shapes: vec![vec![b, 196, 3 * 512]],
            op: Box::new(|t| crate::with_cuda_form(crate::CudaForm::Flash, || crate::self_attention(&t[0], 16, 32f64.powf(-0.5)))),
        },
        // And by the flash form on mma.sync.
        TimedCase {
            name: "self_attention:encoder_flash_mma",
            shapes: vec![vec![b, 49, 3 * 768]],
            op: Box::new(|t| crate::with_cuda_form(crate::CudaForm::FlashMma, || crate::self_attention(&t[0], 12, 0.125))),
        },
        TimedCase {
            name: "self_attention:decoder_flash_mma",
            shapes: vec![vec![b, 196, 3 * 512]],
            op: Box::new(|t| crate::with_cuda_form(crate::CudaForm::FlashMma, || crate::self_attention(&t[0], 16, 32f64.powf(-0.5)))),
        },
        TimedCase { name: "softmax_last_dim:decoder", shapes: vec![vec![b, 16, 196, 196]], op: Box::new(|t| crate::softmax_last_dim(&t[0])) },
        // The widest linear layers: the decoder MLP's fc1 with its GELU (one op in the model) and
        // stage 1's conv1 (a 1x1 conv kernel).
        TimedCase {
            name: "linear_gelu:decoder_fc1",
            shapes: vec![vec![b, 196, 512], vec![2048, 512], vec![2048]],
            op: Box::new(|t| crate::linear_gelu(&t[0], &t[1], &t[2])),
        },
        TimedCase {
            name: "mlp_residual:decoder",
            shapes: vec![vec![b, 196, 512], vec![512], vec![512], vec![2048, 512], vec![2048], vec![512, 2048], vec![512]],
            op: Box::new(|t| crate::mlp_residual(&t[0], (&t[1], &t[2]), 1e-6, (&t[3], &t[4]), (&t[5], &t[6]))),
        },
        // The same sublayer as the separate ops of ours the one op replaces.
        TimedCase {
            name: "mlp_separate:decoder",
            shapes: vec![vec![b, 196, 512], vec![512], vec![512], vec![2048, 512], vec![2048], vec![512, 2048], vec![512]],
            op: Box::new(|t| {
                let h = crate::layer_norm(&t[0], &t[1], &t[2], 1e-6)?;
                let h = crate::linear_gelu(&h, &t[3], &t[4])?;
                &t[0] + crate::linear(&h, &t[5], &t[6])?
            }),
        },
        // A stage-1 conv block's first half as one op, and as the separate ops it replaces.
        TimedCase {
            name: "conv_residual:stage1",
            shapes: vec![vec![rows1, 256], vec![256], vec![256], vec![256, 256, 1, 1], vec![256], vec![256, 1, 5, 5], vec![256], vec![256, 256, 1, 1], vec![256]],
            op: Box::new({
                let nbrs = stage1.clone();
                move |t| crate::conv_residual(&t[0], (&t[1], &t[2]), 1e-6, (&t[3], &t[4]), (&t[5], &t[6]), (&t[7], &t[8]), &nbrs)
            }),
        },
        TimedCase {
            name: "attention_residual:encoder",
            shapes: vec![vec![b, 49, 768], vec![768], vec![768], vec![2304, 768], vec![2304], vec![768, 768], vec![768]],
            op: Box::new(|t| crate::attention_residual(&t[0], (&t[1], &t[2]), 1e-6, (&t[3], &t[4]), (&t[5], &t[6]), 12)),
        },
        // Stage 1's token blocks cut into patch_embed2's 2 x 2 windows.
        TimedCase { name: "patch_blocks:stage1", shapes: vec![vec![b * 49, 4, 4, 256]], op: Box::new(|t| crate::patch_blocks(&t[0], 2)) },
        // The decoder's entry: 49 of 196 tokens kept, width 512.
        TimedCase {
            name: "restore_tokens",
            shapes: vec![vec![b, 49, 512], vec![1, 1, 512], vec![1, 196, 512]],
            op: Box::new(move |t| {
                let ids = Tensor::from_vec(crate::agreement::shuffled_ranks(b, 196), (b, 196), &Device::Cpu)?.to_device(t[0].device())?;
                crate::restore_tokens(&t[0], &t[1], &t[2], &ids)
            }),
        },
        // MAE's loss: the decoder's prediction against 224 px images, 75% of the patches masked.
        TimedCase {
            name: "masked_patch_mse",
            shapes: vec![vec![b, 196, 768], vec![b, 224, 224, 3], vec![b, 196]],
            op: Box::new(|t| {
                let imgs = t[1].detach().to_dtype(DType::F32)?;
                let mask = t[2].ge(-0.5)?.to_dtype(DType::F32)?;
                crate::masked_patch_mse(&t[0], &imgs, &mask, 16, true)
            }),
        },
        TimedCase {
            name: "linear:stage1_conv1",
            shapes: vec![vec![rows1, 256], vec![256, 256, 1, 1], vec![256]],
            op: Box::new(|t| crate::linear(&t[0], &t[1], &t[2])),
        },
    ])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Milliseconds of `f`, the device synchronized before and after.
fn timed(device: &Device, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    device.synchronize()?;
    let t0 = Instant::now();
    f()?;
    device.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// Every case on `device` in `dtype` by each of `paths`: one untimed forward + backward (module
/// loads, first allocations), then the medians of `reps` forwards and of `reps` forward +
/// backward passes (the gradient of `sum(out * probe)` for every input).
pub fn time_ops(device: &Device, paths: &[Path], dtype: DType, batch: usize, reps: usize) -> Result<Vec<OpTiming>> {
    if batch == 0 || reps == 0 {
        candle_core::bail!("op timings need batch and reps of at least 1, got batch {batch}, reps {reps}");
    }
    let mut rows = Vec::new();
    for (i, case) in cases(batch)?.iter().enumerate() {
        if case.name.ends_with("flash_mma") && crate::attention::flash_mma_off() {
            continue;
        }
        let vars: Vec<Var> = case
            .shapes
            .iter()
            .enumerate()
            .map(|(j, s)| {
                let t = Tensor::from_vec(values(s.iter().product(), 1000 + 10 * i as u64 + j as u64), s.as_slice(), &Device::Cpu)?;
                Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)
            })
            .collect::<Result<_>>()?;
        let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        for &path in paths {
            let row = with_path(path, || -> Result<OpTiming> {
                let probe = {
                    let out = (case.op)(&inputs)?;
                    Tensor::from_vec(values(out.elem_count(), 7 + i as u64), out.dims(), &Device::Cpu)?.to_dtype(out.dtype())?.to_device(device)?
                };
                let forward_backward = || -> Result<()> {
                    (case.op)(&inputs)?.mul(&probe)?.sum_all()?.backward()?;
                    Ok(())
                };
                forward_backward()?;
                let stand_in = Var::from_tensor(&probe.ones_like()?)?;
                let probe_only = || -> Result<()> {
                    stand_in.as_tensor().mul(&probe)?.sum_all()?.backward()?;
                    Ok(())
                };
                probe_only()?;
                let forward = (0..reps).map(|_| timed(device, || (case.op)(&inputs).map(drop))).collect::<Result<Vec<_>>>()?;
                let both = (0..reps).map(|_| timed(device, forward_backward)).collect::<Result<Vec<_>>>()?;
                let probe_times = (0..reps).map(|_| timed(device, probe_only)).collect::<Result<Vec<_>>>()?;
                Ok(OpTiming {
                    op: case.name.into(),
                    path: path_name(path).into(),
                    dtype: dtype_name(dtype),
                    shapes: case.shapes.clone(),
                    // Under with_path, as in the agreement check: has_kernel says what ran.
                    kernel: crate::has_kernel(&inputs[0]),
                    forward_ms: median(forward),
                    forward_backward_ms: median(both),
                    probe_ms: median(probe_times),
                    reps,
                })
            })?;
            rows.push(row);
        }
    }
    Ok(rows)
}
