//! AdamW with the official parameter groups (timm 0.3.2 `add_weight_decay` + torch.optim.AdamW).

use crate::params::{Param, ParamStore};
use candle_core::{Result, Tensor};
use convmae_kernels::{adamw_update, AdamWUpdate};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The pretraining recipe: betas (0.9, 0.95), weight decay 0.05, torch's eps 1e-8.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.05 }
    }
}

/// timm's rule: 1-D tensors (norm affines, biases) and anything named `*.bias` get no weight decay.
/// Frozen tensors (the sin-cos position tables) never reach the optimizer at all.
pub fn decays(param: &Param) -> bool {
    !(param.spec.shape.len() == 1 || param.spec.name.ends_with(".bias"))
}

/// First and second moments of one trainable tensor.
pub struct Moments {
    pub name: String,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Number of updates applied so far (torch's `state['step']`, shared by all tensors here).
    pub step: u64,
    pub moments: Vec<Moments>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, params: &ParamStore) -> Result<Self> {
        let moments = params
            .trainable()
            .map(|(p, v)| {
                Ok(Moments {
                    name: p.spec.name.clone(),
                    exp_avg: v.as_tensor().zeros_like()?,
                    exp_avg_sq: v.as_tensor().zeros_like()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, step: 0, moments })
    }

    /// One update of every trainable tensor; `grads` are in `params.trainable()` order.
    /// Follows torch.optim.AdamW (decoupled decay applied first, bias-corrected moments), as one
    /// fused in-place kernel per tensor.
    pub fn update(&mut self, params: &ParamStore, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        for (((param, var), g), m) in params.trainable().zip(grads).zip(self.moments.iter_mut()) {
            debug_assert_eq!(param.spec.name, m.name);
            let u = AdamWUpdate {
                lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: if decays(param) { c.weight_decay } else { 0.0 },
                step: self.step,
            };
            adamw_update(var.as_tensor(), &m.exp_avg, &m.exp_avg_sq, g, &u)?;
        }
        Ok(())
    }
}
