//! Optimizers with the official parameter groups: AdamW for pretraining (timm 0.3.2
//! `add_weight_decay`) and fine-tuning (layer-wise lr decay, `util/lr_decay.py`), LARS for the
//! linear probe (`util/lars.py`).

use crate::params::{Param, ParamStore};
use candle_core::{DType, Result, Tensor};
use convmae_kernels::{adamw_update, adamw_update_many, adamw_update_with_shadow, composite, has_kernel, AdamWItem, AdamWUpdate};
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

/// The lr multiplier and weight decay of one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamGroup {
    pub lr_scale: f64,
    pub weight_decay: f64,
}

/// Layer id of a ConvViT tensor for layer-wise lr decay (official `get_layer_id_for_vit` as the
/// ConvMAE fine-tune uses it): the position embedding, every patch embed and the conv stages
/// 1-2 belong to the embedding layer 0; `blocks3.i` is layer i + 1; everything else (fc_norm,
/// norm, head) is the top layer `num_layers` = len(blocks3) + 1.
pub fn layer_id(name: &str, num_layers: usize) -> usize {
    let embedding = ["pos_embed", "cls_token"].contains(&name)
        || name.starts_with("patch_embed")
        || name.starts_with("blocks1.")
        || name.starts_with("blocks2.");
    if embedding {
        return 0;
    }
    if let Some(rest) = name.strip_prefix("blocks3.") {
        if let Some(Ok(i)) = rest.split('.').next().map(str::parse::<usize>) {
            return i + 1;
        }
    }
    num_layers
}

/// `param_groups_lrd`: lr scale `layer_decay^(num_layers - layer_id)` with num_layers =
/// depth[2] + 1; no weight decay on 1-D tensors and pos_embed.
pub fn finetune_group(param: &Param, stage3_depth: usize, weight_decay: f64, layer_decay: f64) -> ParamGroup {
    let num_layers = stage3_depth + 1;
    let id = layer_id(&param.spec.name, num_layers);
    let exempt = param.spec.shape.len() == 1 || ["pos_embed", "cls_token"].contains(&param.spec.name.as_str());
    ParamGroup {
        lr_scale: layer_decay.powi((num_layers - id) as i32),
        weight_decay: if exempt { 0.0 } else { weight_decay },
    }
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
    /// Per trainable tensor, in `params.trainable()` order.
    pub groups: Vec<ParamGroup>,
}

impl AdamW {
    /// The pretraining groups: full lr, timm's weight-decay rule.
    pub fn new(cfg: AdamWConfig, params: &ParamStore) -> Result<Self> {
        let wd = cfg.weight_decay;
        Self::with_groups(cfg, params, |p| ParamGroup { lr_scale: 1.0, weight_decay: if decays(p) { wd } else { 0.0 } })
    }

    /// Custom groups (`group(param)` for every trainable tensor; `cfg.weight_decay` is then only
    /// what the caller folded into the groups).
    pub fn with_groups(cfg: AdamWConfig, params: &ParamStore, group: impl Fn(&Param) -> ParamGroup) -> Result<Self> {
        let groups = params.trainable().map(|(p, _)| group(p)).collect();
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
        Ok(Self { cfg, step: 0, moments, groups })
    }

    /// One update of every trainable tensor; `grads` are in `params.trainable()` order, each in
    /// the master dtype or, with mixed precision, the compute dtype (`ParamStore::gradients`).
    /// Follows torch.optim.AdamW (decoupled decay applied first, bias-corrected moments), as one
    /// fused in-place kernel per tensor, which on CUDA also writes the tensor's compute copy.
    pub fn update(&mut self, params: &ParamStore, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        // On CUDA every tensor in one launch where that applies (`adamw_update_many`): 311
        // launches fewer for ConvMAE-B, most of them for biases and norms.
        if !crate::device::adamw_per_tensor() && adamw_update_many(&self.items(params, grads, lr)?, None)? {
            return Ok(());
        }
        let shadows = params.trainable_shadows();
        let (cfg, step) = (self.cfg.clone(), self.step);
        let update_of = |group: &ParamGroup| update_of(&cfg, step, group, lr);
        for (((((param, var), g), m), group), shadow) in params.trainable().zip(grads).zip(self.moments.iter_mut()).zip(&self.groups).zip(&shadows) {
            debug_assert_eq!(param.spec.name, m.name);
            let u = update_of(group);
            let w = var.as_tensor();
            if let (Some(copy), true) = (shadow, has_kernel(w) && w.device().is_cuda()) {
                adamw_update_with_shadow(w, &m.exp_avg, &m.exp_avg_sq, g, &copy.tensor()?, &u)?;
                continue;
            }
            let g = &g.to_dtype(w.dtype())?;
            if has_kernel(w) {
                adamw_update(w, &m.exp_avg, &m.exp_avg_sq, g, &u)?;
            } else {
                // No kernel of ours for this device and dtype (or CONVMAE_KERNELS=composite):
                // the same update from candle ops.
                let (p, exp_avg, exp_avg_sq) = composite::adamw_step(w, &m.exp_avg, &m.exp_avg_sq, g, &u)?;
                var.set(&p)?;
                m.exp_avg = exp_avg;
                m.exp_avg_sq = exp_avg_sq;
            }
            sync_copy(var, shadow.as_ref())?;
        }
        Ok(())
    }

    /// `update`, unless `loss` (this step's, a scalar on the parameters' device) is not finite,
    /// decided where the loss is: on CUDA by the one-launch update itself, so that it can be
    /// queued before the host has read the loss (train.rs, overlapped steps). Returns false, and
    /// changes nothing, where the update cannot be made conditional on the device (the
    /// per-tensor update, or tensors the one launch does not take): the caller then reads the
    /// loss and calls `update`. Where the loss is not finite, `step` still counts the update:
    /// the caller that learns of the loss afterwards puts it back (as the skipped update left
    /// the tensors).
    pub fn update_if_finite(&mut self, params: &ParamStore, grads: &[Tensor], lr: f64, loss: &Tensor) -> Result<bool> {
        if loss.device().is_cpu() {
            // The loss is computed already; reading it costs nothing.
            if loss.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0].is_finite() {
                self.update(params, grads, lr)?;
            } else {
                self.step += 1;
            }
            return Ok(true);
        }
        if crate::device::adamw_per_tensor() {
            return Ok(false);
        }
        self.step += 1;
        let loss = loss.to_dtype(DType::F32)?;
        if adamw_update_many(&self.items(params, grads, lr)?, Some(&loss))? {
            return Ok(true);
        }
        self.step -= 1;
        Ok(false)
    }

    /// Every trainable tensor as `adamw_update_many` takes it.
    fn items<'a>(&'a self, params: &'a ParamStore, grads: &'a [Tensor], lr: f64) -> Result<Vec<AdamWItem<'a>>> {
        let shadows = params.trainable_shadows();
        params
            .trainable()
            .zip(grads)
            .zip(&self.moments)
            .zip(&self.groups)
            .zip(&shadows)
            .map(|(((((_, var), g), m), group), shadow)| {
                Ok(AdamWItem {
                    param: var.as_tensor(),
                    exp_avg: &m.exp_avg,
                    exp_avg_sq: &m.exp_avg_sq,
                    grad: g,
                    copy: shadow.as_ref().map(|s| s.tensor()).transpose()?,
                    u: update_of(&self.cfg, self.step, group, lr),
                })
            })
            .collect()
    }
}

/// The update of a tensor in `group` at (1-based) update `step`.
fn update_of(c: &AdamWConfig, step: u64, group: &ParamGroup, lr: f64) -> AdamWUpdate {
    AdamWUpdate { lr: lr * group.lr_scale, beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: group.weight_decay, step }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LarsConfig {
    pub momentum: f64,
    pub trust_coefficient: f64,
    pub weight_decay: f64,
}

impl Default for LarsConfig {
    /// The linear-probe recipe: momentum 0.9, trust coefficient 0.001, no weight decay.
    fn default() -> Self {
        Self { momentum: 0.9, trust_coefficient: 0.001, weight_decay: 0.0 }
    }
}

/// LARS as the MAE/ConvMAE linear probe uses it (`util/lars.py`): for tensors of 2+ dims the
/// gradient gets the weight decay and is rescaled by `trust * |w| / |g|` (1 when either norm is
/// 0); 1-D tensors use the plain gradient. Then heavy-ball momentum: `mu = momentum * mu + g`,
/// `w -= lr * mu`.
pub struct Lars {
    pub cfg: LarsConfig,
    pub step: u64,
    /// Momentum buffer per trainable tensor, named like the tensor.
    pub momentum: Vec<(String, Tensor)>,
}

impl Lars {
    pub fn new(cfg: LarsConfig, params: &ParamStore) -> Result<Self> {
        let momentum = params
            .trainable()
            .map(|(p, v)| Ok((p.spec.name.clone(), v.as_tensor().zeros_like()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, step: 0, momentum })
    }

    /// One update of every trainable tensor; `grads` as `AdamW::update` takes them.
    pub fn update(&mut self, params: &ParamStore, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let norm = |t: &Tensor| -> Result<f64> { t.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.sqrt()?.to_scalar::<f64>() };
        let shadows = params.trainable_shadows();
        for ((((param, var), g), (name, mu)), shadow) in params.trainable().zip(grads).zip(self.momentum.iter_mut()).zip(&shadows) {
            debug_assert_eq!(&param.spec.name, name);
            let w = var.as_tensor();
            let mut dp = g.to_dtype(w.dtype())?;
            if param.spec.shape.len() > 1 {
                dp = (dp + (w * c.weight_decay)?)?;
                let (w_norm, dp_norm) = (norm(w)?, norm(&dp)?);
                let q = if w_norm > 0.0 && dp_norm > 0.0 { c.trust_coefficient * w_norm / dp_norm } else { 1.0 };
                dp = (dp * q)?;
            }
            *mu = ((&*mu * c.momentum)? + dp)?;
            var.set(&(w - (&*mu * lr)?)?)?;
            sync_copy(var, shadow.as_ref())?;
        }
        Ok(())
    }
}

/// A tensor's compute copy (if it has one) set to its new master value, rounded once: what the
/// fused CUDA AdamW does in its own pass, for the other update paths.
fn sync_copy(master: &candle_core::Var, copy: Option<&crate::params::ComputeCopy>) -> Result<()> {
    match copy {
        Some(c) => c.set_from(master.as_tensor()),
        None => Ok(()),
    }
}
