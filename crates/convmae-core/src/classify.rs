//! Training and evaluation steps of the classifier: fine-tuning (AdamW with layer-wise lr decay,
//! stochastic depth, soft targets from mixup / cutmix / label smoothing, random erasing) and the
//! linear probe (frozen encoder, BatchNorm + Linear head, LARS), per the official recipes.

use crate::augment::AugmentSpec;
use crate::model::classifier::{one_hot_targets, soft_cross_entropy, top_k_hits, ConvViT, HeadKind, Mode};
use crate::optim::{finetune_group, AdamW, AdamWConfig, Lars, LarsConfig};
use crate::rng::Rng;
use crate::train::{normalize, normalize_augmented, Batch};
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

/// AdamW of the fine-tune recipe: torch's betas (0.9, 0.999), weight decay 0.05, layer decay
/// 0.65 (FINETUNE.md; the code's default is 0.75).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneAdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub layer_decay: f64,
}

impl Default for FinetuneAdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05, layer_decay: 0.65 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerConfig {
    Adamw(FinetuneAdamWConfig),
    Lars(LarsConfig),
}

impl OptimizerConfig {
    /// The official optimizer of a head: AdamW for fine-tuning, LARS for the linear probe.
    pub fn default_for(kind: HeadKind) -> Self {
        match kind {
            HeadKind::Finetune => Self::Adamw(FinetuneAdamWConfig::default()),
            HeadKind::LinearProbe => Self::Lars(LarsConfig::default()),
        }
    }
}

pub enum Optimizer {
    AdamW(AdamW),
    Lars(Lars),
}

impl Optimizer {
    pub fn new(cfg: &OptimizerConfig, model: &ConvViT) -> Result<Self> {
        Ok(match cfg {
            OptimizerConfig::Adamw(c) => {
                let adamw = AdamWConfig { beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: c.weight_decay };
                let depth3 = model.cfg.depth[2];
                Self::AdamW(AdamW::with_groups(adamw, &model.params, |p| finetune_group(p, depth3, c.weight_decay, c.layer_decay))?)
            }
            OptimizerConfig::Lars(c) => Self::Lars(Lars::new(c.clone(), &model.params)?),
        })
    }

    pub fn step_count(&self) -> u64 {
        match self {
            Self::AdamW(o) => o.step,
            Self::Lars(o) => o.step,
        }
    }
}

/// What a training batch is scored against.
#[derive(Clone, Debug)]
pub enum Targets {
    /// Class indices (plain cross-entropy, as the linear probe uses).
    Labels(Vec<usize>),
    /// [B, K] probabilities (smoothed and / or mixed, as the fine-tune recipe builds them).
    Probabilities(Vec<f64>),
}

#[derive(Clone, Debug)]
pub struct TrainStepOptions {
    pub lr: f64,
    pub targets: Targets,
    pub augment: AugmentSpec,
    /// Micro-batches per optimizer update (the official `accum_iter`); at least 1.
    pub accum_steps: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainStepStats {
    pub loss: f64,
    pub lr: f64,
    /// Optimizer updates applied so far, this one included.
    pub step: u64,
    /// Whether this micro-batch ended an accumulation window and updated the weights.
    pub updated: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalStats {
    /// Sum over the batch of the cross-entropy (divide by the count for the mean).
    pub loss_sum: f64,
    pub top1: usize,
    pub top5: usize,
    pub count: usize,
    /// [B, K] logits, row-major.
    pub logits: Vec<f32>,
}

/// One scale of the encoder's output: float32, [B, C, H, W] row-major (the official layout).
#[derive(Clone, Debug)]
pub struct FeatureMap {
    /// `stage1` (stride 4), `stage2` (stride 8) or `stage3` (stride 16).
    pub name: &'static str,
    pub shape: [usize; 4],
    pub data: Vec<f32>,
}

/// What `ClassifierTrainer::features` returns.
#[derive(Clone, Debug)]
pub struct Features {
    /// [B, dim] row-major: the stage-3 tokens pooled and normalized as the head's `pool` says
    /// (the head's input; for the linear probe, before its BatchNorm).
    pub pooled: Vec<f32>,
    pub dim: usize,
    /// stage1, stage2 and stage3, when asked for; empty otherwise.
    pub maps: Vec<FeatureMap>,
}

/// Separates the stochastic-depth draws from the other per-step streams.
const DROP_PATH_STREAM: u64 = 0x6472_6f70;

pub struct ClassifierTrainer {
    pub model: ConvViT,
    pub optimizer_cfg: OptimizerConfig,
    pub optimizer: Optimizer,
    /// Step `s` draws its stochastic depth and erasing noise from (seed, s).
    pub seed: u64,
    /// BatchNorm's `num_batches_tracked` of the probe head.
    pub bn_batches: u64,
    /// Summed gradients of the open accumulation window, and how many micro-batches it holds.
    pending: Option<Vec<Tensor>>,
    pending_count: usize,
}

impl ClassifierTrainer {
    pub fn new(model: ConvViT, optimizer_cfg: OptimizerConfig, seed: u64) -> Result<Self> {
        let optimizer = Optimizer::new(&optimizer_cfg, &model)?;
        Ok(Self { model, optimizer_cfg, optimizer, seed, bn_batches: 0, pending: None, pending_count: 0 })
    }

    pub fn step_count(&self) -> u64 {
        self.optimizer.step_count()
    }

    /// Whether gradients of an unfinished accumulation window are held (a checkpoint then would lose them).
    pub fn has_pending_gradients(&self) -> bool {
        self.pending_count > 0
    }

    fn check_batch(&self, batch: &Batch, what: &str) -> Result<()> {
        let s = self.model.cfg.img_size;
        if batch.height != s || batch.width != s {
            return Err(err(format!("{what}: images are {}x{}, the model's img_size is {s}", batch.height, batch.width)));
        }
        if batch.batch == 0 {
            return Err(err(format!("{what}: empty batch")));
        }
        Ok(())
    }

    fn targets_tensor(&self, targets: &Targets, batch: usize) -> Result<Tensor> {
        let k = self.model.head.num_classes;
        let values = match targets {
            Targets::Labels(labels) => {
                if labels.len() != batch {
                    return Err(err(format!("labels: expected {batch} labels, got {}", labels.len())));
                }
                one_hot_targets(labels, k, 0.0).map_err(|e| err(format!("labels: {e}")))?
            }
            Targets::Probabilities(p) => {
                if p.len() != batch * k {
                    return Err(err(format!("targets: expected {batch} x {k} = {} values, got {}", batch * k, p.len())));
                }
                p.clone()
            }
        };
        Tensor::from_vec(values, (batch, k), self.model.device())?.to_dtype(self.model.dtype())
    }

    /// One micro-batch of uint8 images; the weights update every `accum_steps` micro-batches.
    /// The probe's BatchNorm running statistics follow every micro-batch, as torch's do.
    pub fn train_step(&mut self, batch: &Batch, opts: &TrainStepOptions) -> Result<TrainStepStats> {
        self.check_batch(batch, "train step")?;
        if !opts.lr.is_finite() || opts.lr < 0.0 {
            return Err(err(format!("lr must be a finite non-negative number, got {}", opts.lr)));
        }
        if opts.accum_steps == 0 {
            return Err(err("accum_steps must be at least 1".into()));
        }
        // Per-micro-batch noise (stochastic depth, erasing) is keyed on the micro-batch index, so
        // it does not depend on where a run was resumed; with accum_steps 1 it is the step.
        let micro = self.step_count() * opts.accum_steps as u64 + self.pending_count as u64;
        let model = &self.model;
        let targets = self.targets_tensor(&opts.targets, batch.batch)?;
        let imgs = normalize_augmented(batch, model.dtype(), model.device(), &opts.augment, self.seed, micro)?;
        let mut rng = Rng::derived(&[self.seed, micro, DROP_PATH_STREAM]);
        let features = model.forward_features(&imgs, &mut Mode::Train(&mut rng))?;
        let (logits, bn_stats) = model.forward_head(&features, true)?;
        let loss = soft_cross_entropy(&logits, &targets)?;
        // The official loop divides the loss by accum_iter before backward.
        let scaled = if opts.accum_steps > 1 { (&loss / opts.accum_steps as f64)? } else { loss.clone() };
        let grads = scaled.backward()?;
        // Read with the backward queued, as in the pretraining step (train.rs says why); a
        // non-finite loss is still caught before any gradient is kept or applied.
        let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss_value.is_finite() {
            return Err(err(format!(
                "loss is {loss_value} at micro-batch {micro}; weights were not updated (lower the lr or resume from a checkpoint)"
            )));
        }
        let grads = crate::train::accumulable(model.params.gradients(&grads)?, model.dtype(), opts.accum_steps)?;
        self.pending = Some(match self.pending.take() {
            None => grads,
            Some(acc) => acc.iter().zip(&grads).map(|(a, g)| a + g).collect::<Result<_>>()?,
        });
        self.pending_count += 1;
        let updated = self.pending_count >= opts.accum_steps;
        if updated {
            let grads = self.pending.take().expect("an open window holds gradients");
            self.pending_count = 0;
            match &mut self.optimizer {
                Optimizer::AdamW(o) => o.update(&self.model.params, &grads, opts.lr)?,
                Optimizer::Lars(o) => o.update(&self.model.params, &grads, opts.lr)?,
            }
        }
        if let Some(stats) = bn_stats {
            self.model.update_running_stats(&stats)?;
            self.bn_batches += 1;
        }
        Ok(TrainStepStats { loss: loss_value, lr: opts.lr, step: self.step_count(), updated })
    }

    /// Evaluation-mode features of a batch of uint8 images: the pooled vector the head reads
    /// and, with `maps`, the encoder's output at each scale.
    pub fn features(&self, batch: &Batch, maps: bool) -> Result<Features> {
        self.check_batch(batch, "features")?;
        let imgs = normalize(batch, self.model.dtype(), self.model.device())?;
        let stages = self.model.forward_stages(&imgs, None)?;
        let pooled = self.model.pool(&stages.stage3)?;
        let dim = pooled.dim(1)?;
        let pooled = pooled.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let maps = if maps {
            let (b, grid) = (batch.batch, self.model.cfg.grid());
            let stage3 = stages.stage3.reshape((b, grid, grid, stages.stage3.dim(2)?))?;
            [("stage1", &stages.stage1), ("stage2", &stages.stage2), ("stage3", &stage3)]
                .into_iter()
                .map(|(name, channels_last)| {
                    let t = channels_last.permute((0, 3, 1, 2))?.to_dtype(DType::F32)?;
                    let (b, c, h, w) = t.dims4()?;
                    Ok(FeatureMap { name, shape: [b, c, h, w], data: t.flatten_all()?.to_vec1::<f32>()? })
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        Ok(Features { pooled, dim, maps })
    }

    /// Evaluation-mode logits of a batch (the eval transform's images), with loss and top-1 /
    /// top-5 hits when `labels` are given.
    pub fn evaluate(&self, batch: &Batch, labels: Option<&[usize]>) -> Result<EvalStats> {
        self.check_batch(batch, "evaluate")?;
        let imgs = normalize(batch, self.model.dtype(), self.model.device())?;
        let out = self.model.forward(&imgs)?;
        let logits = out.logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (mut loss_sum, mut top1, mut top5) = (0.0, 0, 0);
        if let Some(labels) = labels {
            if labels.len() != batch.batch {
                return Err(err(format!("labels: expected {} labels, got {}", batch.batch, labels.len())));
            }
            let targets = self.targets_tensor(&Targets::Labels(labels.to_vec()), batch.batch)?;
            let mean = soft_cross_entropy(&out.logits, &targets)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            loss_sum = mean * batch.batch as f64;
            (top1, top5) = top_k_hits(&out.logits, labels)?;
        }
        Ok(EvalStats { loss_sum, top1, top5, count: batch.batch, logits })
    }
}
