//! Training and evaluation steps of the segmenter, per the official SEG recipe: AdamW (betas
//! 0.9 / 0.999, weight decay 0.05) with mmseg's layer-wise lr decay 0.75, the decode loss plus
//! 0.4 times the auxiliary loss, BatchNorm running statistics folded in after every step.

use crate::model::classifier::Mode;
use crate::model::segmenter::{resize_bilinear, segmentation_loss, Segmenter, IGNORE_LABEL};
use crate::optim::{decays, finetune_group, AdamW, AdamWConfig, ParamGroup};
use crate::params::Param;
use crate::rng::Rng;
use crate::train::{normalize, Batch};
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SegmenterAdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub layer_decay: f64,
}

impl Default for SegmenterAdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05, layer_decay: 0.75 }
    }
}

/// The SEG `LayerDecayOptimizerConstructor` with num_layers = depth[2]: layer ids as the
/// fine-tune's (pos_embed, patch embeds, blocks1-2 -> 0; blocks3.i -> i + 1; `fpn` and both
/// heads -> depth[2] + 1), lr scale `layer_decay^(depth[2] + 1 - id)`. No weight decay on 1-D
/// tensors and `*.bias`; pos_embed and the relative position tables *are* decayed (the official
/// exemption compares the bare name `pos_embed` with `backbone.pos_embed`).
pub fn segmenter_group(param: &Param, stage3_depth: usize, weight_decay: f64, layer_decay: f64) -> ParamGroup {
    let lr_scale = finetune_group(param, stage3_depth, weight_decay, layer_decay).lr_scale;
    ParamGroup { lr_scale, weight_decay: if decays(param) { weight_decay } else { 0.0 } }
}

#[derive(Clone, Debug, Serialize)]
pub struct SegTrainStats {
    /// decode_loss + aux_weight * aux_loss.
    pub loss: f64,
    pub decode_loss: f64,
    pub aux_loss: f64,
    pub lr: f64,
    /// Optimizer updates applied so far, this one included.
    pub step: u64,
}

/// Per-class pixel counts of one batch (mmseg's `intersect_and_union`; pixels labelled 255
/// are left out). IoU = intersect / union, accuracy = intersect / label.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClassAreas {
    pub intersect: Vec<u64>,
    pub union: Vec<u64>,
    pub predicted: Vec<u64>,
    pub label: Vec<u64>,
}

impl ClassAreas {
    pub fn of(predictions: &[u8], labels: &[u8], classes: usize) -> Self {
        let mut a = Self { intersect: vec![0; classes], union: vec![0; classes], predicted: vec![0; classes], label: vec![0; classes] };
        for (&p, &l) in predictions.iter().zip(labels) {
            if l == IGNORE_LABEL {
                continue;
            }
            a.predicted[p as usize] += 1;
            a.label[l as usize] += 1;
            if p == l {
                a.intersect[p as usize] += 1;
            }
        }
        for c in 0..classes {
            a.union[c] = a.predicted[c] + a.label[c] - a.intersect[c];
        }
        a
    }
}

#[derive(Clone, Debug)]
pub struct SegEval {
    /// Argmax class of every pixel at the images' size, [B * H * W] row-major.
    pub predictions: Vec<u8>,
    /// With labels: the decode loss (mean over the batch's pixels) and the per-class areas.
    pub loss: Option<f64>,
    pub areas: Option<ClassAreas>,
}

/// Separates the stochastic-depth and dropout draws from other per-step streams.
const SEG_STREAM: u64 = 0x7365_676d;

pub struct SegmenterTrainer {
    pub model: Segmenter,
    pub adamw: SegmenterAdamWConfig,
    pub optimizer: AdamW,
    /// Step `s` draws its stochastic depth and dropout from (seed, s).
    pub seed: u64,
    /// BatchNorm's `num_batches_tracked` (the same for every BatchNorm of the model).
    pub bn_batches: u64,
}

impl SegmenterTrainer {
    pub fn new(model: Segmenter, adamw: SegmenterAdamWConfig, seed: u64) -> Result<Self> {
        let cfg = AdamWConfig { beta1: adamw.beta1, beta2: adamw.beta2, eps: adamw.eps, weight_decay: adamw.weight_decay };
        let depth3 = model.cfg.depth[2];
        let optimizer = AdamW::with_groups(cfg, &model.params, |p| segmenter_group(p, depth3, adamw.weight_decay, adamw.layer_decay))?;
        Ok(Self { model, adamw, optimizer, seed, bn_batches: 0 })
    }

    pub fn step_count(&self) -> u64 {
        self.optimizer.step
    }

    fn check(&self, batch: &Batch, labels: Option<&[u8]>, what: &str) -> Result<()> {
        let s = self.model.cfg.img_size;
        if batch.height != s || batch.width != s {
            return Err(err(format!("{what}: images are {}x{}, the model's img_size is {s}", batch.height, batch.width)));
        }
        if batch.batch == 0 {
            return Err(err(format!("{what}: empty batch")));
        }
        if let Some(labels) = labels {
            let want = batch.batch * s * s;
            if labels.len() != want {
                return Err(err(format!("{what}: labels hold {} values, expected {} (one per pixel of {} images of {s}x{s})", labels.len(), want, batch.batch)));
            }
        }
        Ok(())
    }

    /// One step on a batch of uint8 images and their label maps ([B * H * W], 255 = ignore).
    pub fn train_step(&mut self, batch: &Batch, labels: &[u8], lr: f64) -> Result<SegTrainStats> {
        self.check(batch, Some(labels), "train step")?;
        if !lr.is_finite() || lr < 0.0 {
            return Err(err(format!("lr must be a finite non-negative number, got {lr}")));
        }
        let step = self.step_count();
        let model = &self.model;
        let imgs = normalize(batch, model.dtype(), model.device())?;
        let mut rng = Rng::derived(&[self.seed, step, SEG_STREAM]);
        let out = model.forward(&imgs, &mut Mode::Train(&mut rng))?;
        let size = (batch.height, batch.width);
        let decode = segmentation_loss(&out.logits, labels, size)?;
        let aux = segmentation_loss(&out.aux_logits, labels, size)?;
        let loss = (&decode + (&aux * model.head.aux_weight)?)?;
        let grads = loss.backward()?;
        let value = |t: &Tensor| -> Result<f64> { t.to_dtype(DType::F64)?.to_scalar::<f64>() };
        let (loss_value, decode_loss, aux_loss) = (value(&loss)?, value(&decode)?, value(&aux)?);
        if !loss_value.is_finite() {
            return Err(err(format!("loss is {loss_value} at step {step}; weights were not updated (lower the lr or resume from a checkpoint)")));
        }
        let grads = model.params.gradients(&grads)?;
        self.optimizer.update(&self.model.params, &grads, lr)?;
        self.model.update_running_stats(&out.norm_stats)?;
        self.bn_batches += 1;
        Ok(SegTrainStats { loss: loss_value, decode_loss, aux_loss, lr, step: self.step_count() })
    }

    /// Evaluation-mode predictions of a batch at the images' size (the decode head's logits
    /// upsampled, then argmax) and, with labels, the decode loss and per-class areas.
    pub fn evaluate(&self, batch: &Batch, labels: Option<&[u8]>) -> Result<SegEval> {
        self.check(batch, labels, "evaluate")?;
        let imgs = normalize(batch, self.model.dtype(), self.model.device())?;
        let out = self.model.forward(&imgs, &mut Mode::Eval)?;
        let size = (batch.height, batch.width);
        let up = resize_bilinear(&out.logits, size)?;
        let predictions = argmax_classes(&up)?;
        let (loss, areas) = match labels {
            Some(labels) => {
                let loss = segmentation_loss(&out.logits, labels, size)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                (Some(loss), Some(ClassAreas::of(&predictions, labels, self.model.head.num_classes)))
            }
            None => (None, None),
        };
        Ok(SegEval { predictions, loss, areas })
    }

    /// mmseg's slide inference of one image of any size (the test resize's output, at least the
    /// model's side S on each axis, else padded with the normalized zero): S x S windows at
    /// `stride`, the last one on each axis flush with the edge; each window's decode logits
    /// upsampled to S x S and summed where windows overlap, divided by the overlap count, then
    /// resized bilinearly to `original` (the label map's size) for the argmax. With labels
    /// ([original.0 * original.1]), the per-class areas; no loss (mmseg computes none at test).
    pub fn evaluate_slide(&self, image: &Batch, original: (usize, usize), labels: Option<&[u8]>, stride: usize) -> Result<SegEval> {
        let s = self.model.cfg.img_size;
        if image.batch != 1 {
            return Err(err(format!("slide evaluation takes one image at a time, got {}", image.batch)));
        }
        if stride == 0 || stride > s {
            return Err(err(format!("slide stride must be in 1..={s} (the window), got {stride}")));
        }
        if original.0 == 0 || original.1 == 0 {
            return Err(err(format!("original size {}x{} is empty", original.0, original.1)));
        }
        if let Some(l) = labels {
            if l.len() != original.0 * original.1 {
                return Err(err(format!("labels hold {} values, expected {} ({}x{})", l.len(), original.0 * original.1, original.0, original.1)));
            }
        }
        let (h, w) = (image.height, image.width);
        let device = self.model.device().clone();
        let mut img = normalize(image, self.model.dtype(), &device)?;
        let (hp, wp) = (h.max(s), w.max(s));
        if (hp, wp) != (h, w) {
            img = img.pad_with_zeros(1, 0, hp - h)?.pad_with_zeros(2, 0, wp - w)?;
        }
        let k = self.model.head.num_classes;
        // Summed logits [hp, wp, K] and how many windows cover each position.
        let mut sum = vec![0f32; hp * wp * k];
        let mut count = vec![0u32; hp * wp];
        // mmseg: max(len - crop + stride - 1, 0) // stride + 1 windows along an axis.
        let grids = |len: usize| len.saturating_sub(s).div_ceil(stride) + 1;
        for gy in 0..grids(hp) {
            for gx in 0..grids(wp) {
                let y1 = (gy * stride + s).min(hp) - s;
                let x1 = (gx * stride + s).min(wp) - s;
                let crop = img.narrow(1, y1, s)?.narrow(2, x1, s)?.contiguous()?;
                let out = self.model.forward(&crop, &mut Mode::Eval)?;
                let logits = resize_bilinear(&out.logits, (s, s))?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                for y in 0..s {
                    let src = &logits[y * s * k..][..s * k];
                    let dst = &mut sum[((y1 + y) * wp + x1) * k..][..s * k];
                    for (d, v) in dst.iter_mut().zip(src) {
                        *d += v;
                    }
                    for c in &mut count[(y1 + y) * wp + x1..][..s] {
                        *c += 1;
                    }
                }
            }
        }
        for (position, n) in sum.chunks_mut(k).zip(&count) {
            for v in position {
                *v /= *n as f32;
            }
        }
        let mean = Tensor::from_vec(sum, (1, hp, wp, k), &device)?.narrow(1, 0, h)?.narrow(2, 0, w)?.contiguous()?;
        let full = resize_bilinear(&mean, original)?;
        let predictions = argmax_classes(&full)?;
        let areas = labels.map(|l| ClassAreas::of(&predictions, l, k));
        Ok(SegEval { predictions, loss: None, areas })
    }
}

/// The class of every pixel of logits [B, H, W, K]: the argmax over K, [B * H * W] row-major.
fn argmax_classes(logits: &Tensor) -> Result<Vec<u8>> {
    // K <= 255 (SegmenterHead::validate), so every class id fits a byte.
    Ok(logits.argmax(3)?.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?.into_iter().map(|c| c as u8).collect())
}
