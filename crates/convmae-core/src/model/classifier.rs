//! The fine-tuning / classification model (official `models_convvit.ConvViT`): the same encoder
//! without mask or fusion convs, global average pooling, `fc_norm`, `head`.

use super::layers::*;
use super::conv_stages;
use crate::config::ConvMaeConfig;
use crate::params::{classifier_param_specs, ParamStore};
use candle_core::{DType, Device, Result, Tensor, D};

pub struct ConvViT {
    pub cfg: ConvMaeConfig,
    pub num_classes: usize,
    pub params: ParamStore,
}

pub struct ClassifierOutput {
    /// [B, D3] pooled tokens after fc_norm.
    pub features: Tensor,
    /// [B, num_classes].
    pub logits: Tensor,
}

impl ConvViT {
    pub fn new(cfg: ConvMaeConfig, num_classes: usize, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let params = ParamStore::init(classifier_param_specs(&cfg, num_classes), dtype, device, seed)?;
        Ok(Self { cfg, num_classes, params })
    }

    /// Stage-3 tokens [B, L, D3] of channels-last images [B, H, W, C] (no mask, no final norm).
    pub fn forward_tokens(&self, imgs: &Tensor) -> Result<Tensor> {
        let (cfg, p) = (&self.cfg, &self.params);
        let unmasked = SpatialMix::Dense { keep: None };
        let (_, stage2) = conv_stages(cfg, p, imgs, &unmasked, &unmasked)?;
        let b = imgs.dim(0)?;
        let x = patch_embed(p, "patch_embed3", &stage2, cfg.patch_size[2])?.reshape((b, cfg.num_tokens(), cfg.embed_dim[2]))?;
        let mut x = linear_p(p, "patch_embed4", &x)?.broadcast_add(p.get("pos_embed"))?;
        for i in 0..cfg.depth[2] {
            x = transformer_block(p, &format!("blocks3.{i}"), &x, cfg.num_heads)?;
        }
        Ok(x)
    }

    /// Global average pool -> fc_norm -> head (the official default, `global_pool=True`).
    pub fn forward(&self, imgs: &Tensor) -> Result<ClassifierOutput> {
        let tokens = self.forward_tokens(imgs)?;
        let pooled = tokens.mean(1)?;
        let features = layer_norm_p(&self.params, "fc_norm", &pooled, VIT_LN_EPS)?;
        let logits = linear_p(&self.params, "head", &features)?;
        Ok(ClassifierOutput { features, logits })
    }
}

/// Mean cross-entropy of `logits` [B, K] against integer `labels`.
pub fn cross_entropy(logits: &Tensor, labels: &[usize]) -> Result<Tensor> {
    let (b, k) = logits.dims2()?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    let mut one_hot = vec![0f64; b * k];
    for (i, &l) in labels.iter().enumerate() {
        if l >= k {
            return Err(candle_core::Error::Msg(format!("label {l} of sample {i} is out of range for {k} classes")));
        }
        one_hot[i * k + l] = 1.0;
    }
    let one_hot = Tensor::from_vec(one_hot, (b, k), logits.device())?.to_dtype(logits.dtype())?;
    (log_probs * one_hot)?.sum_all()? / -(b as f64)
}
