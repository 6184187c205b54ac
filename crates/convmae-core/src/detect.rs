//! Training and inference steps of the Mask R-CNN detector, per the official recipes: AdamW
//! (betas 0.9 / 0.999, weight decay 0.1; none on norms, `pos_embed` and DET's relative position
//! tables; DET has no layer decay, Official-ConvMAE-Det 0.8), the five detectron2 losses summed
//! with weight 1, BatchNorm running statistics folded in after every step.

use crate::model::detector::{Detector, DetectorVariant, ImageDetections, ImageTargets};
use crate::optim::{AdamW, AdamWConfig, ParamGroup};
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
pub struct DetectorAdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Layer-wise lr decay (1: none, DET's; 0.8 in Official-ConvMAE-Det): `detector_group`.
    pub layer_decay: f64,
}

impl Default for DetectorAdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, layer_decay: 1.0 }
    }
}

impl DetectorAdamWConfig {
    /// The official settings of `variant`: DET's defaults, or layer decay 0.8 for
    /// Official-ConvMAE-Det.
    pub fn official(variant: DetectorVariant) -> Self {
        match variant {
            DetectorVariant::Det => Self::default(),
            DetectorVariant::Vitdet => Self { layer_decay: 0.8, ..Self::default() },
        }
    }

    /// Settings from JSON whose absent fields take `official(variant)`'s values.
    pub fn from_json(json: &str, variant: DetectorVariant) -> std::result::Result<Self, String> {
        let given: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("invalid optimizer options: {e}"))?;
        let Some(fields) = given.as_object() else { return Err(format!("invalid optimizer options: expected an object, got {given}")) };
        let mut adamw = serde_json::to_value(Self::official(variant)).expect("settings serialize");
        adamw.as_object_mut().expect("settings are an object").extend(fields.clone());
        serde_json::from_value(adamw).map_err(|e| format!("invalid optimizer options: {e}"))
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.layer_decay.is_finite() && self.layer_decay > 0.0 && self.layer_decay <= 1.0) {
            return Err(format!("layer_decay must be in (0, 1], got {}", self.layer_decay));
        }
        Ok(())
    }
}

/// The pyramid's one LayerNorm not named `norm` (Official-ConvMAE-Det's `simfp_2`: deconv,
/// LayerNorm, GELU, deconv).
const PYRAMID_LAYER_NORM: &str = "backbone.simfp_2.1.";

/// detectron2's `get_default_optimizer_params` as the official configs set it:
/// - weight decay on every tensor (biases and ViTDet's `rel_pos_h` / `rel_pos_w` included)
///   except those of norm layers (LayerNorm, BatchNorm: a module named `norm*`, or the pyramid's
///   `simfp_2.1`), `pos_embed` and DET's relative position bias tables;
/// - lr scale `layer_decay ^ (stage3_blocks + 1 - id)` (`get_vit_lr_decay_rate`, Official-ConvMAE-Det's
///   `num_layers` = stage 3's depth): id 0 for the patch embeds and the conv blocks, i + 1 for
///   `blocks3.i`, and stage3_blocks + 1 (scale 1) for everything else, `pos_embed` included.
pub fn detector_group(param: &Param, weight_decay: f64, layer_decay: f64, stage3_blocks: usize) -> ParamGroup {
    let name = &param.spec.name;
    let module = name.rsplit('.').nth(1).unwrap_or("");
    let exempt = module.starts_with("norm") || name.starts_with(PYRAMID_LAYER_NORM) || name == "pos_embed" || name.ends_with("relative_position_bias_table");
    let layer_id = if name.starts_with("patch_embed") || name.starts_with("blocks1.") || name.starts_with("blocks2.") {
        0
    } else if let Some(rest) = name.strip_prefix("blocks3.") {
        rest.split('.').next().and_then(|i| i.parse::<usize>().ok()).map_or(stage3_blocks + 1, |i| i + 1)
    } else {
        stage3_blocks + 1
    };
    let lr_scale = layer_decay.powf((stage3_blocks + 1 - layer_id) as f64);
    ParamGroup { lr_scale, weight_decay: if exempt { 0.0 } else { weight_decay } }
}

#[derive(Clone, Debug, Serialize)]
pub struct DetTrainStats {
    /// The sum of the five losses.
    pub loss: f64,
    pub loss_rpn_cls: f64,
    pub loss_rpn_loc: f64,
    pub loss_cls: f64,
    pub loss_box_reg: f64,
    pub loss_mask: f64,
    /// Foreground regions sampled for the ROI heads over the batch.
    pub foreground: usize,
    pub lr: f64,
    /// Optimizer updates applied so far, this one included.
    pub step: u64,
}

/// Separates the detector's per-step draws (stochastic depth, sampling) from other streams.
const DET_STREAM: u64 = 0x6465_7463;

pub struct DetectorTrainer {
    pub model: Detector,
    pub adamw: DetectorAdamWConfig,
    pub optimizer: AdamW,
    /// Step `s` draws from (seed, s).
    pub seed: u64,
    /// BatchNorm's `num_batches_tracked` (the same for every BatchNorm of the model).
    pub bn_batches: u64,
}

impl DetectorTrainer {
    pub fn new(model: Detector, adamw: DetectorAdamWConfig, seed: u64) -> Result<Self> {
        let cfg = AdamWConfig { beta1: adamw.beta1, beta2: adamw.beta2, eps: adamw.eps, weight_decay: adamw.weight_decay };
        adamw.validate().map_err(err)?;
        let stage3_blocks = model.cfg.depth[2];
        let optimizer = AdamW::with_groups(cfg, &model.params, |p| detector_group(p, adamw.weight_decay, adamw.layer_decay, stage3_blocks))?;
        Ok(Self { model, adamw, optimizer, seed, bn_batches: 0 })
    }

    pub fn step_count(&self) -> u64 {
        self.optimizer.step
    }

    fn check_images(&self, batch: &Batch, what: &str) -> Result<()> {
        let s = self.model.cfg.img_size;
        if batch.height != s || batch.width != s {
            return Err(err(format!("{what}: images are {}x{}, the model's img_size is {s} (pad or resize them to it)", batch.height, batch.width)));
        }
        if batch.batch == 0 {
            return Err(err(format!("{what}: empty batch")));
        }
        Ok(())
    }

    /// Every image's annotations are well formed: finite boxes inside out-of-order-free
    /// corners, known classes, one mask of the input size per box, an extent inside the input.
    fn check_targets(&self, batch: &Batch, targets: &[ImageTargets]) -> Result<()> {
        if targets.len() != batch.batch {
            return Err(err(format!("train step: {} target sets for {} images", targets.len(), batch.batch)));
        }
        let s = self.model.cfg.img_size;
        let k = self.model.head.num_classes;
        check_extents(targets.iter().map(|t| t.extent.unwrap_or((s, s))), s, "train step")?;
        for (i, t) in targets.iter().enumerate() {
            if t.classes.len() != t.boxes.len() {
                return Err(err(format!("targets of image {i}: {} boxes but {} classes", t.boxes.len(), t.classes.len())));
            }
            if t.masks.len() != t.boxes.len() * s * s {
                return Err(err(format!("targets of image {i}: masks hold {} values, expected {} ({} masks of {s}x{s})", t.masks.len(), t.boxes.len() * s * s, t.boxes.len())));
            }
            if t.polygons.len() > t.boxes.len() {
                return Err(err(format!("targets of image {i}: polygons for {} instances but {} boxes", t.polygons.len(), t.boxes.len())));
            }
            for (j, polygons) in t.polygons.iter().enumerate() {
                // Far-off coordinates would make the rasterizer's walk as long as they are far.
                let bound = 4.0 * s as f64;
                if let Some(p) = polygons.iter().find(|p| p.len() < 6 || p.len() % 2 != 0 || !p.iter().all(|v| v.is_finite() && v.abs() <= bound)) {
                    return Err(err(format!(
                        "targets of image {i}: instance {j} has a polygon of {} numbers; each needs 3 or more (x, y) pairs of finite numbers within ±{bound} pixels",
                        p.len()
                    )));
                }
            }
            for (j, (b, &c)) in t.boxes.iter().zip(&t.classes).enumerate() {
                if !b.iter().all(|v| v.is_finite()) || b[2] <= b[0] || b[3] <= b[1] {
                    return Err(err(format!("targets of image {i}: box {j} {b:?} is not a finite box with x2 > x1 and y2 > y1")));
                }
                if c >= k {
                    return Err(err(format!("targets of image {i}: class {c} of box {j} is out of range for {k} classes")));
                }
            }
        }
        Ok(())
    }

    /// One step on a batch of uint8 images and their annotations.
    pub fn train_step(&mut self, batch: &Batch, targets: &[ImageTargets], lr: f64) -> Result<DetTrainStats> {
        self.check_images(batch, "train step")?;
        self.check_targets(batch, targets)?;
        if !lr.is_finite() || lr < 0.0 {
            return Err(err(format!("lr must be a finite non-negative number, got {lr}")));
        }
        let step = self.step_count();
        let model = &self.model;
        let s = model.cfg.img_size;
        let extents: Vec<(usize, usize)> = targets.iter().map(|t| t.extent.unwrap_or((s, s))).collect();
        let imgs = normalize_as_image_list(batch, &extents, model.dtype(), model.device())?;
        let mut rng = Rng::derived(&[self.seed, step, DET_STREAM]);
        let losses = model.losses(&imgs, targets, &mut rng)?;
        let loss = losses.total()?;
        let grads = loss.backward()?;
        let value = |t: &Tensor| -> Result<f64> { t.to_dtype(DType::F64)?.to_scalar::<f64>() };
        let loss_value = value(&loss)?;
        if !loss_value.is_finite() {
            return Err(err(format!("loss is {loss_value} at step {step}; weights were not updated (lower the lr or resume from a checkpoint)")));
        }
        let stats = DetTrainStats {
            loss: loss_value,
            loss_rpn_cls: value(&losses.rpn_cls)?,
            loss_rpn_loc: value(&losses.rpn_loc)?,
            loss_cls: value(&losses.cls)?,
            loss_box_reg: value(&losses.box_reg)?,
            loss_mask: value(&losses.mask)?,
            foreground: losses.foreground,
            lr,
            step: step + 1,
        };
        let grads = model.params.gradients(&grads)?;
        self.optimizer.update(&self.model.params, &grads, lr)?;
        self.model.update_running_stats(&losses.norm_stats)?;
        self.bn_batches += 1;
        Ok(stats)
    }

    /// Detections of a batch, boxes and masks scaled from each image's extent (height, width at
    /// the top left of its input; None: the whole S x S input) to its `output` size (height,
    /// width), each axis on its own (for a padded, aspect-kept resize without extents, the
    /// caller asks for the padded square and cuts).
    pub fn detect(&self, batch: &Batch, extents: Option<&[(usize, usize)]>, output: &[(usize, usize)]) -> Result<Vec<ImageDetections>> {
        self.check_images(batch, "detect")?;
        if output.len() != batch.batch || output.iter().any(|&(h, w)| h == 0 || w == 0) {
            return Err(err(format!("detect: {} output sizes for {} images (each nonzero)", output.len(), batch.batch)));
        }
        let s = self.model.cfg.img_size;
        let extents = extents.map_or_else(|| vec![(s, s); batch.batch], <[_]>::to_vec);
        if extents.len() != batch.batch {
            return Err(err(format!("detect: {} extents for {} images", extents.len(), batch.batch)));
        }
        check_extents(extents.iter().copied(), s, "detect")?;
        let imgs = normalize_as_image_list(batch, &extents, self.model.dtype(), self.model.device())?;
        self.model.detect(&imgs, &extents, output)
    }
}

fn check_extents(extents: impl Iterator<Item = (usize, usize)>, side: usize, what: &str) -> Result<()> {
    for (i, (h, w)) in extents.enumerate() {
        if h == 0 || w == 0 || h > side || w > side {
            return Err(err(format!("{what}: image {i}'s extent {h}x{w} must be nonzero and fit the {side}x{side} input")));
        }
    }
    Ok(())
}

/// The normalized batch as detectron2's `ImageList.from_tensors` pads it after normalizing: each
/// image's pixels outside its extent (height, width, at the top left) are 0 (Official-ConvMAE-Det's
/// square padding; DET's inputs fill the whole square, the crop having padded them with 128).
fn normalize_as_image_list(batch: &Batch, extents: &[(usize, usize)], dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let imgs = normalize(batch, dtype, device)?;
    let (h, w) = (batch.height, batch.width);
    if extents.iter().all(|&e| e == (h, w)) {
        return Ok(imgs);
    }
    let inside: Vec<u8> = extents.iter().flat_map(|&(eh, ew)| (0..h * w).map(move |p| u8::from(p / w < eh && p % w < ew))).collect();
    let inside = Tensor::from_vec(inside, (batch.batch, h, w, 1), device)?.to_dtype(dtype)?;
    imgs.broadcast_mul(&inside)
}
