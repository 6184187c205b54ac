//! What the ignored pretraining benches share: their knobs from the environment, the median,
//! and the model on the path a CUDA bf16 step takes, here on the CPU in f32 (packed copies of
//! an f64 store: every sublayer one op, in chains, the backward on the tape).

#![allow(dead_code)] // each test crate compiles this module and uses part of it

use candle_core::{DType, Device};
use convmae_core::params::{pretrain_param_specs, Packing, ParamStore};
use convmae_core::{ConvMae, ConvMaeConfig};

/// `name` from the environment as a count, or `default`.
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn median(mut ms: Vec<f64>) -> f64 {
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

/// `cfg` in f32 over packed copies of an f64 store (seed 7).
pub fn packed_f32_model(cfg: &ConvMaeConfig) -> ConvMae {
    let store = ParamStore::init(pretrain_param_specs(cfg), DType::F64, &Device::Cpu, 7).unwrap();
    let mut model = ConvMae::new(cfg.clone(), DType::F32, &Device::Cpu, 1).unwrap();
    model.params = store.compute_view(DType::F32, Packing::Sublayers).unwrap();
    model
}
pub mod tensors;
