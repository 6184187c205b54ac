//! The classification model (official `models_convvit.ConvViT`): the pretraining encoder without
//! mask or fusion convs, pooled, normalized and classified. One model serves fine-tuning (trainable
//! encoder, stochastic depth, `head` Linear) and the linear probe (frozen encoder, BatchNorm +
//! Linear head), with the official global pooling or its token-0 quirk (spec section 4).

use super::conv_stages;
use super::layers::*;
use crate::config::ConvMaeConfig;
use crate::params::{classifier_param_specs, ParamStore};
use crate::precision::Precision;
use crate::rng::Rng;
use candle_core::{DType, Device, Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// The encoder's outputs at its three scales: what a detection or segmentation neck takes.
pub struct EncoderStages {
    /// The last stage-1 conv block's output, [B, H/4, W/4, C1], channels last.
    pub stage1: Tensor,
    /// The last stage-2 conv block's output, [B, H/8, W/8, C2], channels last.
    pub stage2: Tensor,
    /// The last stage-3 transformer block's tokens, [B, L, D3] (L = (H/16) * (W/16), row-major
    /// over the token grid), before any norm.
    pub stage3: Tensor,
}

/// How stage-3 tokens become one feature vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean over tokens, then `fc_norm` (the official default, `global_pool=True`).
    Global,
    /// `norm` over the tokens, then token 0 (`--cls_token`; ConvViT has no cls token, so this is
    /// the top-left patch: the linear probe's default in main_linprobe.py).
    Token,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadKind {
    /// `head` = Linear; the whole model trains.
    Finetune,
    /// `head` = BatchNorm1d(affine=False, eps 1e-6) + Linear; only the Linear trains.
    LinearProbe,
}

/// The task-specific part of a classifier: classes, pooling, head and stochastic depth.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierHead {
    pub num_classes: usize,
    #[serde(default = "default_pool")]
    pub pool: Pooling,
    #[serde(default = "default_kind")]
    pub kind: HeadKind,
    /// Largest stochastic depth rate (the last block's); rates rise linearly over all blocks.
    #[serde(default)]
    pub drop_path: f64,
}

fn default_pool() -> Pooling {
    Pooling::Global
}
fn default_kind() -> HeadKind {
    HeadKind::Finetune
}

/// BatchNorm1d's eps in the linear-probe head (`BatchNorm1d(..., affine=False, eps=1e-6)`).
pub const PROBE_BN_EPS: f64 = 1e-6;
/// torch's BatchNorm momentum for the running statistics.
pub const PROBE_BN_MOMENTUM: f64 = 0.1;

impl ClassifierHead {
    pub fn finetune(num_classes: usize) -> Self {
        Self { num_classes, pool: Pooling::Global, kind: HeadKind::Finetune, drop_path: 0.0 }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_classes == 0 {
            return Err("num_classes must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            return Err(format!("drop_path must be in [0, 1), got {}", self.drop_path));
        }
        if self.kind == HeadKind::LinearProbe && self.drop_path != 0.0 {
            return Err("drop_path applies to fine-tuning only (the linear probe's encoder is frozen)".into());
        }
        Ok(())
    }

    /// Name prefix of the trainable Linear layer of the head.
    pub fn linear_prefix(&self) -> &'static str {
        match self.kind {
            HeadKind::Finetune => "head",
            HeadKind::LinearProbe => "head.1",
        }
    }
}

/// Stochastic depth rates of every block in order (blocks1, blocks2, blocks3):
/// `torch.linspace(0, drop_path, total)`.
pub fn drop_path_rates(cfg: &ConvMaeConfig, drop_path: f64) -> Vec<f64> {
    let total: usize = cfg.depth.iter().sum();
    (0..total).map(|i| if total > 1 { drop_path * i as f64 / (total - 1) as f64 } else { 0.0 }).collect()
}

/// Per-sample DropPath scales of every encoder block for a training batch, in `dtype` (None when
/// `drop_path` is 0): each block's two residual branches draw independently, as the official
/// block calls its DropPath twice; conv blocks get [B, 1, 1, 1], transformer blocks [B, 1, 1].
pub fn draw_drop_path(cfg: &ConvMaeConfig, drop_path: f64, batch: usize, dtype: DType, device: &Device, rng: &mut Rng) -> Result<Option<Vec<DropPath>>> {
    let rates = drop_path_rates(cfg, drop_path);
    if rates.iter().all(|&r| r == 0.0) {
        return Ok(None);
    }
    let conv_blocks = cfg.depth[0] + cfg.depth[1];
    let mut draw = |rate: f64, shape: &[usize]| -> Result<Tensor> {
        // timm: floor(keep_prob + U[0, 1)) is 1 with probability keep_prob; kept samples are
        // scaled by 1 / keep_prob.
        let keep = 1.0 - rate;
        let v: Vec<f64> = (0..batch).map(|_| (keep + rng.uniform()).floor() / keep).collect();
        Tensor::from_vec(v, shape, device)?.to_dtype(dtype)
    };
    let mut out = Vec::with_capacity(rates.len());
    for (i, &rate) in rates.iter().enumerate() {
        let shape: &[usize] = if i < conv_blocks { &[batch, 1, 1, 1] } else { &[batch, 1, 1] };
        out.push(DropPath { first: draw(rate, shape)?, second: draw(rate, shape)? });
    }
    Ok(Some(out))
}

pub struct ConvViT {
    pub cfg: ConvMaeConfig,
    pub head: ClassifierHead,
    pub params: ParamStore,
    /// The encoder's compute dtype; the head, the probe's BatchNorm and the loss stay in the
    /// parameters' dtype (they are tiny, and autocast keeps BatchNorm and the loss in f32 too).
    pub precision: Precision,
}

pub struct ClassifierOutput {
    /// [B, D3] pooled and normalized tokens (the input of the head).
    pub features: Tensor,
    /// [B, num_classes].
    pub logits: Tensor,
}

/// Whether the model runs as in `model.train()` (stochastic depth, batch statistics) or `eval()`.
pub enum Mode<'a> {
    Eval,
    /// Training; stochastic depth draws from this generator.
    Train(&'a mut Rng),
}

/// Batch statistics of the probe's BatchNorm in a training step, for the running averages.
pub struct BatchStats {
    pub mean: Tensor,
    /// Unbiased variance (what torch folds into running_var).
    pub var_unbiased: Tensor,
}

impl ConvViT {
    pub fn new(cfg: ConvMaeConfig, head: ClassifierHead, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        head.validate().map_err(candle_core::Error::Msg)?;
        let params = ParamStore::init(classifier_param_specs(&cfg, &head), dtype, device, seed)?;
        Ok(Self { cfg, head, params, precision: Precision::Fp32 })
    }

    pub fn dtype(&self) -> DType {
        self.params.dtype
    }

    /// The dtype the encoder computes in.
    pub fn compute_dtype(&self) -> DType {
        self.precision.compute_dtype(self.dtype())
    }

    pub fn device(&self) -> &Device {
        &self.params.device
    }

    /// Per-sample DropPath scales of every block (None when no block drops anything).
    fn draw_drop_path(&self, batch: usize, rng: &mut Rng) -> Result<Option<Vec<DropPath>>> {
        draw_drop_path(&self.cfg, self.head.drop_path, batch, self.compute_dtype(), self.device(), rng)
    }

    /// The encoder's output at each of its three scales for channels-last images [B, H, W, C]
    /// (no mask), in the compute dtype.
    pub fn forward_stages(&self, imgs: &Tensor, drop: Option<&[DropPath]>) -> Result<EncoderStages> {
        // The master tensors, or their bf16 compute copies (the gradients arrive at the copies).
        let params = self.params.at_precision(self.precision)?;
        let (cfg, p): (_, &ParamStore) = (&self.cfg, &params);
        let imgs = imgs.to_dtype(p.dtype)?;
        let unmasked = SpatialMix::Dense { keep: None };
        let conv_blocks = cfg.depth[0] + cfg.depth[1];
        let (stage1, stage2) = conv_stages(cfg, p, &imgs, &unmasked, &unmasked, drop.map(|d| &d[..conv_blocks]), CONV_LN_EPS)?;
        let b = imgs.dim(0)?;
        let x = patch_embed_as(p, "patch_embed3", &stage2, cfg.patch_size[2], &[b, cfg.num_tokens()])?;
        let mut x = linear_p(p, "patch_embed4", &x)?.broadcast_add(p.get("pos_embed"))?;
        for i in 0..cfg.depth[2] {
            x = transformer_block(p, &format!("blocks3.{i}"), &x, cfg.num_heads, drop.map(|d| &d[conv_blocks + i]))?;
        }
        Ok(EncoderStages { stage1, stage2, stage3: x })
    }

    /// Pooled, normalized features [B, D3] in the parameters' dtype: the head's input.
    pub fn forward_features(&self, imgs: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let drop = match mode {
            Mode::Train(rng) if self.head.kind == HeadKind::Finetune => self.draw_drop_path(imgs.dim(0)?, rng)?,
            _ => None,
        };
        self.pool(&self.forward_stages(imgs, drop.as_deref())?.stage3)
    }

    /// The head's input [B, D3] from stage-3 tokens [B, L, D3]: pooled as `head.pool` says, then
    /// normalized, in the parameters' dtype.
    pub fn pool(&self, tokens: &Tensor) -> Result<Tensor> {
        // Pooling and its norm run in the parameters' dtype: a bf16 mean over hundreds of tokens
        // would round away the small differences the head separates classes by.
        let tokens = tokens.to_dtype(self.dtype())?;
        let p = &self.params;
        match self.head.pool {
            Pooling::Global => layer_norm_p(p, "fc_norm", &tokens.mean(1)?, VIT_LN_EPS),
            // LayerNorm is per token, so norming token 0 alone equals norm(x)[:, 0].
            Pooling::Token => layer_norm_p(p, "norm", &tokens.narrow(1, 0, 1)?.squeeze(1)?, VIT_LN_EPS),
        }
    }

    /// Logits of the head for `features`. The probe's BatchNorm uses the batch's statistics in
    /// training (returned, for the running averages) and the running ones in evaluation.
    pub fn forward_head(&self, features: &Tensor, training: bool) -> Result<(Tensor, Option<BatchStats>)> {
        let p = &self.params;
        match self.head.kind {
            HeadKind::Finetune => Ok((linear_p(p, "head", features)?, None)),
            HeadKind::LinearProbe => {
                let (normalized, stats) = if training {
                    let b = features.dim(0)?;
                    if b < 2 {
                        return Err(candle_core::Error::Msg(
                            "the linear probe's BatchNorm needs at least 2 images per training batch".into(),
                        ));
                    }
                    let mean = features.mean(0)?;
                    let centered = features.broadcast_sub(&mean)?;
                    let sum_sq = centered.sqr()?.sum(0)?;
                    let var = (&sum_sq / b as f64)?;
                    let normalized = centered.broadcast_div(&(var + PROBE_BN_EPS)?.sqrt()?)?;
                    (normalized, Some(BatchStats { mean, var_unbiased: (sum_sq / (b - 1) as f64)? }))
                } else {
                    let mean = p.get("head.0.running_mean");
                    let var = p.get("head.0.running_var");
                    (features.broadcast_sub(mean)?.broadcast_div(&(var + PROBE_BN_EPS)?.sqrt()?)?, None)
                };
                Ok((linear_p(p, "head.1", &normalized)?, stats))
            }
        }
    }

    /// Features and logits in evaluation mode.
    pub fn forward(&self, imgs: &Tensor) -> Result<ClassifierOutput> {
        let features = self.forward_features(imgs, &mut Mode::Eval)?;
        let (logits, _) = self.forward_head(&features, false)?;
        Ok(ClassifierOutput { features, logits })
    }

    /// Folds a training batch's statistics into the probe's running mean and variance (torch:
    /// `running = (1 - momentum) * running + momentum * batch`, unbiased variance).
    pub fn update_running_stats(&mut self, stats: &BatchStats) -> Result<()> {
        let m = PROBE_BN_MOMENTUM;
        for (name, batch) in [("head.0.running_mean", &stats.mean), ("head.0.running_var", &stats.var_unbiased)] {
            let running = self.params.get(name);
            let updated = ((running * (1.0 - m))? + (batch.detach() * m)?)?;
            self.params.set(name, &updated)?;
        }
        Ok(())
    }
}

/// Mean over the batch of `-sum(targets * log_softmax(logits))` (timm's SoftTargetCrossEntropy);
/// targets [B, K] are probabilities (one-hot, label-smoothed, or mixed).
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let b = logits.dim(0)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    (log_probs * targets)?.sum_all()? / -(b as f64)
}

/// Label-smoothed one-hot targets [B, K]: `1 - smoothing + smoothing / K` on the label,
/// `smoothing / K` elsewhere (timm's `one_hot(..., on_value, off_value)`).
pub fn one_hot_targets(labels: &[usize], num_classes: usize, smoothing: f64) -> std::result::Result<Vec<f64>, String> {
    let off = smoothing / num_classes as f64;
    let on = 1.0 - smoothing + off;
    let mut t = vec![off; labels.len() * num_classes];
    for (i, &l) in labels.iter().enumerate() {
        if l >= num_classes {
            return Err(format!("label {l} of sample {i} is out of range for {num_classes} classes"));
        }
        t[i * num_classes + l] = on;
    }
    Ok(t)
}

/// Mean cross-entropy of `logits` [B, K] against integer `labels`.
pub fn cross_entropy(logits: &Tensor, labels: &[usize]) -> Result<Tensor> {
    let (b, k) = logits.dims2()?;
    let t = one_hot_targets(labels, k, 0.0).map_err(candle_core::Error::Msg)?;
    let t = Tensor::from_vec(t, (b, k), logits.device())?.to_dtype(logits.dtype())?;
    soft_cross_entropy(logits, &t)
}

/// How many of `labels` are among the top 1 and top 5 logits of their row. A label ranks by the
/// number of classes with a strictly larger logit, so ties count in its favour.
pub fn top_k_hits(logits: &Tensor, labels: &[usize]) -> Result<(usize, usize)> {
    let rows = logits.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let (mut top1, mut top5) = (0, 0);
    for (row, &label) in rows.iter().zip(labels) {
        let Some(&own) = row.get(label) else {
            return Err(candle_core::Error::Msg(format!("label {label} is out of range for {} classes", row.len())));
        };
        let rank = row.iter().filter(|&&v| v > own).count();
        top1 += (rank < 1) as usize;
        top5 += (rank < 5) as usize;
    }
    Ok((top1, top5))
}
