//! Agreement of every op on another device with our CPU kernels: the same random inputs, the
//! forward result and the gradients of `sum(out * probe)` compared, as max |a - b| / max |b|.
//! The GPU check runs this on CUDA (where the ops are the compositions of `composite`, or
//! fused CUDA kernels once they exist) against the CPU.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use serde::Serialize;

use crate::{AdamWUpdate, SparseNeighbors};

#[derive(Clone, Debug, Serialize)]
pub struct Agreement {
    pub op: String,
    pub shapes: Vec<Vec<usize>>,
    pub forward_rel: f64,
    /// The worst input gradient (0 for AdamW, which has none).
    pub gradient_rel: f64,
}

fn rel(ours: &Tensor, reference: &Tensor) -> Result<f64> {
    let a = ours.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = reference.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let (mut diff, mut scale) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        let d = (x - y).abs();
        if !(d <= diff) {
            diff = d;
        }
        scale = scale.max(y.abs());
    }
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

/// SplitMix64 values in [-1, 1), deterministic per seed.
fn values(n: usize, seed: u64) -> Vec<f32> {
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

type Op = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// Runs `op` on CPU copies and `device` copies of the same inputs and compares.
fn compare(name: &str, shapes: &[&[usize]], device: &Device, seed: u64, op: Op) -> Result<Agreement> {
    let host: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| Tensor::from_vec(values(s.iter().product(), seed + i as u64), *s, &Device::Cpu))
        .collect::<Result<_>>()?;
    let run = |dev: &Device| -> Result<(Tensor, Vec<Tensor>)> {
        let vars: Vec<Var> = host.iter().map(|t| Var::from_tensor(&t.to_device(dev)?)).collect::<Result<_>>()?;
        let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = op(&inputs)?;
        let probe = Tensor::from_vec(values(out.elem_count(), seed + 100), out.dims(), &Device::Cpu)?.to_device(dev)?;
        let grads = (&out * &probe)?.sum_all()?.backward()?;
        let g = vars.iter().map(|v| grads.get(v.as_tensor()).cloned().unwrap_or(v.as_tensor().zeros_like()?).to_device(&Device::Cpu)).collect::<Result<_>>()?;
        Ok((out.to_device(&Device::Cpu)?, g))
    };
    let (ref_out, ref_grads) = run(&Device::Cpu)?;
    let (out, grads) = run(device)?;
    let mut gradient_rel = 0f64;
    for (g, r) in grads.iter().zip(&ref_grads) {
        gradient_rel = gradient_rel.max(rel(g, r)?);
    }
    Ok(Agreement { op: name.into(), shapes: shapes.iter().map(|s| s.to_vec()).collect(), forward_rel: rel(&out, &ref_out)?, gradient_rel })
}

/// Every op at ConvMAE-B-like shapes (batch 4), f32, on `device` vs the CPU kernels.
pub fn compare_on(device: &Device) -> Result<Vec<Agreement>> {
    let mut out = vec![
        compare("layer_norm", &[&[4, 196, 768], &[768], &[768]], device, 1, Box::new(|t| crate::layer_norm(&t[0], &t[1], &t[2], 1e-6)))?,
        compare("softmax_last_dim", &[&[4, 12, 49, 49]], device, 2, Box::new(|t| crate::softmax_last_dim(&(&t[0] * 4.0)?)))?,
        compare("gelu_erf", &[&[4, 49, 3072]], device, 3, Box::new(|t| crate::gelu_erf(&(&t[0] * 3.0)?)))?,
        compare("linear", &[&[4, 49, 768], &[3072, 768], &[3072]], device, 4, Box::new(|t| crate::linear(&t[0], &t[1], &t[2])))?,
        compare("depthwise_conv2d", &[&[2, 56, 56, 256], &[256, 5, 5]], device, 5, Box::new(|t| crate::depthwise_conv2d(&t[0], &t[1])))?,
    ];
    // Stage 1 of ConvMAE-B for 2 images: 56x56 positions in 4x4 cells, every other cell kept.
    let mut positions = Vec::new();
    for image in 0..2u32 {
        for y in 0..56u32 {
            for x in 0..56u32 {
                if ((y / 4) * 14 + x / 4 + image) % 4 != 0 {
                    continue;
                }
                positions.push((image, y, x));
            }
        }
    }
    let nbrs = Arc::new(SparseNeighbors::from_positions(&positions, 2, 56, 56, 5)?);
    let rows = positions.len();
    out.push(compare(
        "sparse_depthwise_conv2d",
        &[&[rows, 256], &[256, 5, 5]],
        device,
        6,
        Box::new(move |t| crate::sparse_depthwise_conv2d(&t[0], &t[1], &nbrs)),
    )?);
    out.push(adamw_agreement(device)?);
    Ok(out)
}

/// The AdamW update on `device` (fused where a kernel exists, composite otherwise) vs the CPU.
fn adamw_agreement(device: &Device) -> Result<Agreement> {
    let shape: &[usize] = &[768, 3072];
    let n = shape.iter().product();
    let make = |seed: u64, scale: f32| Tensor::from_vec(values(n, seed).iter().map(|v| v * scale).collect::<Vec<_>>(), shape, &Device::Cpu);
    let (p, m, g) = (make(11, 1.0)?, make(12, 0.01)?, make(13, 0.1)?);
    let v = make(14, 0.01)?.abs()?;
    let u = AdamWUpdate { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.05, step: 7 };
    let (pc, mc, vc) = (p.copy()?, m.copy()?, v.copy()?);
    crate::adamw_update(&pc, &mc, &vc, &g, &u)?;
    let on = |t: &Tensor| t.to_device(device);
    let (pd, md, vd) = if crate::has_kernel(&on(&p)?) {
        let (pd, md, vd) = (on(&p)?, on(&m)?, on(&v)?);
        crate::adamw_update(&pd, &md, &vd, &on(&g)?, &u)?;
        (pd, md, vd)
    } else {
        crate::composite::adamw_step(&on(&p)?, &on(&m)?, &on(&v)?, &on(&g)?, &u)?
    };
    let forward_rel = rel(&pd, &pc)?.max(rel(&md, &mc)?).max(rel(&vd, &vc)?);
    Ok(Agreement { op: "adamw_update".into(), shapes: vec![shape.to_vec()], forward_rel, gradient_rel: 0.0 })
}
