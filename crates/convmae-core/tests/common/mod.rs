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

/// Where a bf16 step's gradients arrived, checked for a task model whose BatchNorms compute in
/// f32: each BatchNorm affine tensor (a `weight` or `bias` beside a `running_mean`) at its f32
/// master, every other trainable tensor at its bf16 compute copy; all finite. Returns how many
/// tensors got a nonzero gradient.
pub fn check_bf16_gradient_routes(params: &ParamStore, grads: &candle_core::backprop::GradStore) -> usize {
    let by_tensor = params.gradients(grads).unwrap();
    let mut nonzero = 0;
    for ((p, master), g) in params.trainable().zip(&by_tensor) {
        let name = &p.spec.name;
        let module = name.rsplit_once('.').map_or("", |(m, _)| m);
        let batch_norm = params.find(&format!("{module}.running_mean")).is_some();
        let at_master = grads.get(master.as_tensor()).is_some();
        assert_eq!(at_master, batch_norm, "{name}: gradient at the f32 master: {at_master}, a BatchNorm tensor: {batch_norm}");
        assert_eq!(g.dtype(), if batch_norm { DType::F32 } else { DType::BF16 }, "{name}");
        let values = tensors::to_vec(g);
        assert!(values.iter().all(|v| v.is_finite()), "{name}: a non-finite gradient");
        nonzero += usize::from(values.iter().any(|&v| v != 0.0));
    }
    nonzero
}
