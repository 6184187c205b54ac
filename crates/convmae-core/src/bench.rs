//! Kernel timings for the benchmark harness (`npm run bench -- kernels`): the depthwise 5x5 conv
//! of ConvMAE-B's conv stages, dense with the mask on its input (the official computation) vs
//! sparse over visible positions only, forward and forward + backward, at the real shapes.

use crate::config::ConvMaeConfig;
use crate::masking::Masking;
use crate::model::{visible_neighbors, DW_KERNEL};
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor, Var};
use convmae_kernels::{depthwise_conv2d, sparse_depthwise_conv2d};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct KernelTiming {
    pub kernel: String,
    pub implementation: String,
    /// [B, H, W, C] of the stage map (the sparse kernel sees only the visible rows of it).
    pub shape: [usize; 4],
    /// Positions the kernel computes.
    pub positions: usize,
    pub forward_ms: Vec<f64>,
    pub forward_backward_ms: Vec<f64>,
    /// Multiply-adds of one forward (positions x C x 25).
    pub forward_macs: f64,
    /// Bytes one forward must move at least: input and output rows (plus the weight).
    pub forward_bytes: f64,
}

fn time<F: FnMut() -> candle_core::Result<()>>(iters: usize, mut f: F) -> candle_core::Result<Vec<f64>> {
    f()?; // warm-up
    (0..iters)
        .map(|_| {
            let t = Instant::now();
            f()?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        })
        .collect()
}

/// Times both implementations of conv stage `stage` (0 or 1) of `cfg` at `batch` images, f32.
pub fn depthwise_conv_timings(cfg: &ConvMaeConfig, stage: usize, batch: usize, iters: usize, seed: u64) -> candle_core::Result<Vec<KernelTiming>> {
    let dev = Device::Cpu;
    let mut rng = Rng::new(seed);
    let masking = Masking::random(&mut rng, batch, cfg.num_tokens(), cfg.len_keep());
    let (side, c, cell) = (cfg.stage_side(stage), cfg.embed_dim[stage], cfg.stage_cell(stage));
    let shape = [batch, side, side, c];
    let weight = Var::from_tensor(&Tensor::randn(0f32, 0.2, (c, DW_KERNEL, DW_KERNEL), &dev)?)?;
    let kernel = format!("depthwise_conv{DW_KERNEL}x{DW_KERNEL}");

    // Dense: the whole map, masked input (the mask multiply is part of the official op).
    let dense_in = Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, side, side, c), &dev)?)?;
    let keep = masking.keep_map(cfg.grid(), cell, DType::F32, &dev)?;
    let dense_fwd = || depthwise_conv2d(&dense_in.as_tensor().broadcast_mul(&keep)?, weight.as_tensor());
    let forward_ms = time(iters, || dense_fwd().map(|_| ()))?;
    let forward_backward_ms = time(iters, || dense_fwd()?.sum_all()?.backward().map(|_| ()))?;
    let positions = batch * side * side;
    let dense = KernelTiming {
        kernel: kernel.clone(),
        implementation: "dense-masked".into(),
        shape,
        positions,
        forward_ms,
        forward_backward_ms,
        forward_macs: (positions * c * DW_KERNEL * DW_KERNEL) as f64,
        forward_bytes: (2 * positions * c * 4 + c * DW_KERNEL * DW_KERNEL * 4) as f64,
    };

    // Sparse: only the visible rows.
    let nbrs = Arc::new(visible_neighbors(cfg, &masking, stage)?);
    let rows = nbrs.rows();
    let sparse_in = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, c), &dev)?)?;
    let sparse_fwd = || sparse_depthwise_conv2d(sparse_in.as_tensor(), weight.as_tensor(), &nbrs);
    let forward_ms = time(iters, || sparse_fwd().map(|_| ()))?;
    let forward_backward_ms = time(iters, || sparse_fwd()?.sum_all()?.backward().map(|_| ()))?;
    let sparse = KernelTiming {
        kernel,
        implementation: "sparse".into(),
        shape,
        positions: rows,
        forward_ms,
        forward_backward_ms,
        forward_macs: (rows * c * DW_KERNEL * DW_KERNEL) as f64,
        forward_bytes: (2 * rows * c * 4 + c * DW_KERNEL * DW_KERNEL * 4 + rows * DW_KERNEL * DW_KERNEL * 4) as f64,
    };
    Ok(vec![dense, sparse])
}

#[derive(Debug, Serialize)]
pub struct GeluTiming {
    /// "ours" (convmae_kernels::gelu_erf) or "candle" (candle's built-in `gelu_erf`).
    pub implementation: String,
    pub elements: usize,
    /// Standard deviation of the normal inputs: activations of a pretrained encoder spread wider
    /// than a fresh one's, and erf's cost depends on |x|.
    pub input_std: f64,
    pub forward_ms: Vec<f64>,
    pub forward_backward_ms: Vec<f64>,
}

/// Times GELU (erf form) forward and forward + backward on `elements` f32 inputs drawn from
/// N(0, input_std^2): our op next to candle's own, interleaved per iteration set.
pub fn gelu_timings(elements: usize, input_std: f64, iters: usize, seed: u64) -> candle_core::Result<Vec<GeluTiming>> {
    let dev = Device::Cpu;
    let mut rng = Rng::new(seed);
    let values: Vec<f32> = (0..elements).map(|_| (rng.normal() * input_std) as f32).collect();
    let x = Var::from_vec(values, elements, &dev)?;
    let ours = || convmae_kernels::gelu_erf(x.as_tensor());
    let candle = || x.as_tensor().gelu_erf();
    let mut out = Vec::new();
    for (name, f) in [("ours", &ours as &dyn Fn() -> candle_core::Result<Tensor>), ("candle", &candle)] {
        let forward_ms = time(iters, || f().map(|_| ()))?;
        let forward_backward_ms = time(iters, || f()?.sum_all()?.backward().map(|_| ()))?;
        out.push(GeluTiming { implementation: name.into(), elements, input_std, forward_ms, forward_backward_ms });
    }
    Ok(out)
}
