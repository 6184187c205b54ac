//! Mask R-CNN on a ConvMAE backbone, in the two official builds (`DetectorVariant`).
//!
//! `Det`, the in-repo `DET/` code (spec section 6.1): detectron2's `GeneralizedRCNN` with
//!
//! - `ConvViTDet`: the encoder at the detection grid, stage-3 attention in non-overlapping
//!   windows except in the global blocks (0, 3, 6, 10 for Base), one BEiT relative position
//!   bias table shared by the windowed blocks and one by the global blocks, and four outputs:
//!   stage 1 (stride 4), stage 2 (8), stage 3 as a map without final norm (16), and stage 3
//!   max-pooled 2x2 (32); pos_embed frozen;
//! - FPN (lateral 1x1 and output 3x3 convs with BatchNorm, nearest top-down, p6 = p5 subsampled);
//! - the RPN (two 3x3 convs, objectness and deltas per anchor: sizes one per level, ratios 0.5,
//!   1, 2), proposals by top-k, NMS per level and top-k;
//! - StandardROIHeads: 7x7 ROIAlignV2 features to the 4conv1fc box head (BatchNorm over the
//!   regions), class-specific box regression; 14x14 to the mask head (4 convs, a 2x2 deconv,
//!   28x28 class-specific masks).
//!
//! `Vitdet`, `OpenGVLab/Official-ConvMAE-Det` (spec section 6.2: detectron2's ViTDet with the
//! ConvMAE encoder, `super::vitdet`): the same RPN and ROI heads with LayerNorm in place of
//! BatchNorm, fed by the simple feature pyramid of the stage-3 map alone; stage-3 attention in
//! 14 x 14 windows (the grid zero-padded to a multiple) except in blocks 1, 4, 7 and 10, with
//! decomposed relative positions per block; a learnable pos_embed at the pretraining grid,
//! resized bicubically in every forward; the conv blocks' LayerNorm eps 1e-6.
//!
//! Feature maps are channels-last [B, H, W, C]; convs go through `segmenter::conv2d` (unfold +
//! matmul). The box geometry (anchors, matching, sampling, NMS) is in `crate::boxes`.

use super::classifier::draw_drop_path;
use super::encoder_stem;
use super::layers::*;
use super::segmenter::{attention_with_bias, conv2d, relative_position_index, Forward, NormStats};
use super::vitdet::{rel_pos_attention, resized_pos_embed, DETECTRON2_LN_EPS};
use crate::boxes::*;
use crate::config::ConvMaeConfig;
use crate::params::{detector_param_specs, ParamStore};
use crate::precision::Precision;
use crate::rng::Rng;
use candle_core::{DType, Device, Result, Tensor, D};
use convmae_kernels::{self as k, RoiBox};
use serde::{Deserialize, Serialize};

/// Side of the box head's ROIAlign output.
pub const BOX_POOL_SIDE: usize = 7;
/// Side of the mask head's ROIAlign output; its deconv doubles it.
pub const MASK_POOL_SIDE: usize = 14;
pub const MASK_SIDE: usize = 2 * MASK_POOL_SIDE;
/// Strides of p2..p6.
pub const LEVEL_STRIDES: [usize; 5] = [4, 8, 16, 32, 64];
/// The ROI heads pool from p2..p5 (levels 2..=5).
const ROI_LEVELS: (usize, usize) = (2, 5);

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

/// Which official detector a `Detector` is (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectorVariant {
    /// The in-repo `DET/` (`convmae_base_mask_rcnn_FPN_25ep`): FPN on four backbone levels.
    #[default]
    Det,
    /// `Official-ConvMAE-Det` (`mask_rcnn_vitdet_convmae_b_25ep`): the simple feature pyramid.
    Vitdet,
}

/// The task-specific part of the detector (official `convmae_base_mask_rcnn_FPN_25ep`, or with
/// `variant: Vitdet` and `DetectorHead::vitdet`'s window and global blocks,
/// `mask_rcnn_vitdet_convmae_b_25ep`); the sampling sizes and thresholds are detectron2's
/// defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorHead {
    pub variant: DetectorVariant,
    pub num_classes: usize,
    /// Side of a stage-3 attention window in tokens (16; 14 in Vitdet). In Det it must divide
    /// the token grid (the official pads nothing); Vitdet zero-pads the grid to a multiple.
    pub window: usize,
    /// Stage-3 blocks with global attention (0, 3, 6, 10; 1, 4, 7, 10 in Vitdet); the rest
    /// attend within windows.
    pub global_blocks: Vec<usize>,
    /// Vitdet: side of the learnable pos_embed table (14: `pretrain_img_size` 224 / 16), resized
    /// to the token grid in every forward. Unused by Det, whose table is at the token grid.
    pub pos_grid: usize,
    /// Width of the FPN and of the heads' convs (256).
    pub channels: usize,
    /// Anchor size of each of p2..p6 (32, 64, 128, 256, 512).
    pub anchor_sizes: Vec<f32>,
    /// Anchor aspect ratios h / w (0.5, 1, 2).
    pub aspect_ratios: Vec<f32>,
    pub rpn_convs: usize,
    pub box_convs: usize,
    /// Width of the box head's fc (1024).
    pub box_fc: usize,
    pub mask_convs: usize,
    /// Largest stochastic depth rate of the backbone (0.1).
    pub drop_path: f64,
    pub rpn_batch_per_image: usize,
    pub rpn_positive_fraction: f64,
    pub rpn_pre_nms_train: usize,
    pub rpn_post_nms_train: usize,
    pub rpn_pre_nms_test: usize,
    pub rpn_post_nms_test: usize,
    pub rpn_nms: f32,
    pub roi_batch_per_image: usize,
    pub roi_positive_fraction: f64,
    /// Test: detections scoring at most this are dropped (0.05).
    pub score_threshold: f32,
    /// Test: NMS per class (0.5).
    pub test_nms: f32,
    pub detections_per_image: usize,
}

impl Default for DetectorHead {
    fn default() -> Self {
        Self {
            variant: DetectorVariant::Det,
            num_classes: 80,
            window: 16,
            global_blocks: vec![0, 3, 6, 10],
            pos_grid: 14,
            channels: 256,
            anchor_sizes: vec![32.0, 64.0, 128.0, 256.0, 512.0],
            aspect_ratios: vec![0.5, 1.0, 2.0],
            rpn_convs: 2,
            box_convs: 4,
            box_fc: 1024,
            mask_convs: 4,
            drop_path: 0.1,
            rpn_batch_per_image: 256,
            rpn_positive_fraction: 0.5,
            rpn_pre_nms_train: 2000,
            rpn_post_nms_train: 1000,
            rpn_pre_nms_test: 1000,
            rpn_post_nms_test: 1000,
            rpn_nms: 0.7,
            roi_batch_per_image: 512,
            roi_positive_fraction: 0.25,
            score_threshold: 0.05,
            test_nms: 0.5,
            detections_per_image: 100,
        }
    }
}

impl DetectorHead {
    /// Official-ConvMAE-Det's head: window 14, global attention in blocks 1, 4, 7 and 10.
    pub fn vitdet() -> Self {
        Self { variant: DetectorVariant::Vitdet, window: 14, global_blocks: vec![1, 4, 7, 10], ..Self::default() }
    }

    /// The official head of `variant`.
    pub fn official(variant: DetectorVariant) -> Self {
        match variant {
            DetectorVariant::Det => Self::default(),
            DetectorVariant::Vitdet => Self::vitdet(),
        }
    }

    /// A head from JSON whose absent fields take the official values of its `variant` (DET's
    /// when it names none), unlike serde's defaults, which are DET's whatever the variant.
    pub fn from_json(json: &str) -> std::result::Result<Self, String> {
        let given: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("invalid detector head: {e}"))?;
        let variant = given.get("variant").and_then(|v| serde_json::from_value::<DetectorVariant>(v.clone()).ok()).unwrap_or_default();
        let Some(fields) = given.as_object() else { return Err(format!("invalid detector head: expected an object, got {given}")) };
        let mut head = serde_json::to_value(Self::official(variant)).expect("a head serializes");
        head.as_object_mut().expect("a head is an object").extend(fields.clone());
        // Unknown fields and bad values (an unknown variant among them) are refused here.
        serde_json::from_value(head).map_err(|e| format!("invalid detector head: {e}"))
    }

    pub fn anchors_per_position(&self) -> usize {
        self.aspect_ratios.len()
    }

    pub fn validate(&self, cfg: &ConvMaeConfig) -> std::result::Result<(), String> {
        let fail = |msg: String| Err(format!("invalid detector head: {msg}"));
        let grid = cfg.grid();
        if self.num_classes == 0 {
            return fail("num_classes must be positive".into());
        }
        match self.variant {
            DetectorVariant::Det if self.window == 0 || !grid.is_multiple_of(self.window) => {
                return fail(format!("window ({}) must divide the token grid ({grid} = img_size {} / 16); the official DET code pads nothing (variant 'vitdet' pads)", self.window, cfg.img_size));
            }
            DetectorVariant::Vitdet if self.window == 0 || self.pos_grid == 0 => {
                return fail(format!("window ({}) and pos_grid ({}) must be positive", self.window, self.pos_grid));
            }
            DetectorVariant::Vitdet if !cfg.embed_dim[2].is_multiple_of(4) => {
                return fail(format!("the simple feature pyramid quarters stage 3's width ({}), which must be divisible by 4", cfg.embed_dim[2]));
            }
            _ => {}
        }
        if let Some(&b) = self.global_blocks.iter().find(|&&b| b >= cfg.depth[2]) {
            return fail(format!("global_blocks: block {b} does not exist (stage 3 has {} blocks)", cfg.depth[2]));
        }
        if self.anchor_sizes.len() != LEVEL_STRIDES.len() || self.anchor_sizes.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return fail(format!("anchor_sizes must be 5 positive sizes (p2..p6), got {:?}", self.anchor_sizes));
        }
        if self.aspect_ratios.is_empty() || self.aspect_ratios.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
            return fail(format!("aspect_ratios must be positive, got {:?}", self.aspect_ratios));
        }
        for (name, v) in [("channels", self.channels), ("box_fc", self.box_fc), ("rpn_batch_per_image", self.rpn_batch_per_image), ("roi_batch_per_image", self.roi_batch_per_image)] {
            if v == 0 {
                return fail(format!("{name} must be positive"));
            }
        }
        for (name, v) in [("rpn_pre_nms_train", self.rpn_pre_nms_train), ("rpn_post_nms_train", self.rpn_post_nms_train), ("rpn_pre_nms_test", self.rpn_pre_nms_test), ("rpn_post_nms_test", self.rpn_post_nms_test), ("detections_per_image", self.detections_per_image)] {
            if v == 0 {
                return fail(format!("{name} must be positive"));
            }
        }
        if self.rpn_convs == 0 {
            return fail("rpn_convs must be at least 1".into());
        }
        for (name, v) in [("drop_path", self.drop_path), ("rpn_positive_fraction", self.rpn_positive_fraction), ("roi_positive_fraction", self.roi_positive_fraction)] {
            if !(0.0..=1.0).contains(&v) || (name == "drop_path" && v >= 1.0) {
                return fail(format!("{name} must be in [0, 1), got {v}"));
            }
        }
        for (name, v) in [("rpn_nms", self.rpn_nms), ("test_nms", self.test_nms), ("score_threshold", self.score_threshold)] {
            if !(0.0..=1.0).contains(&v) {
                return fail(format!("{name} must be in [0, 1], got {v}"));
            }
        }
        Ok(())
    }
}

/// One image's annotations: boxes in input pixels, class ids (0-based), and instance masks
/// [G * H * W] at the input size (nonzero = inside).
#[derive(Clone, Debug, Default)]
pub struct ImageTargets {
    pub boxes: Vec<BoxXyxy>,
    pub classes: Vec<usize>,
    pub masks: Vec<u8>,
    /// Per instance, its polygons ([x1, y1, ...] in input pixels) or none. Empty (or shorter than
    /// `boxes`), or an instance without polygons: its mask target comes from `masks` instead.
    pub polygons: Vec<Vec<Vec<f64>>>,
    /// The image's (height, width) at the top left of the padded input (detectron2's
    /// `image_size`: proposals are clipped to it); None: the whole input.
    pub extent: Option<(usize, usize)>,
}

/// The five losses of a training step (detectron2's names), each a scalar tensor.
pub struct DetectorLosses {
    pub rpn_cls: Tensor,
    pub rpn_loc: Tensor,
    pub cls: Tensor,
    pub box_reg: Tensor,
    pub mask: Tensor,
    pub norm_stats: Vec<NormStats>,
    /// Foreground regions the box and mask heads trained on, over the batch.
    pub foreground: usize,
    /// Each image's RPN proposals (before the ground truth is appended).
    pub proposals: Vec<Vec<BoxXyxy>>,
}

impl DetectorLosses {
    pub fn total(&self) -> Result<Tensor> {
        (((&self.rpn_cls + &self.rpn_loc)? + &self.cls)? + &self.box_reg)? + &self.mask
    }
}

/// The detections of one image, best first.
#[derive(Clone, Debug, Default)]
pub struct ImageDetections {
    pub boxes: Vec<BoxXyxy>,
    pub scores: Vec<f32>,
    pub classes: Vec<usize>,
    /// [n * height * width] binary masks at the output size.
    pub masks: Vec<u8>,
    pub height: usize,
    pub width: usize,
}

pub struct Detector {
    pub cfg: ConvMaeConfig,
    pub head: DetectorHead,
    pub params: ParamStore,
    /// fp32 (the default), or bf16: the backbone, the necks and the heads on bf16 copies of the
    /// weights; BatchNorm, ROIAlign, the losses and the box geometry in f32, as detectron2's AMP
    /// runs them (`Forward::batch_norm`, `pool`, `predictions`).
    pub precision: Precision,
    /// Det's relative position index of its windowed and its global blocks' shared tables
    /// (Vitdet indexes its per-block tables by the offset along each axis instead).
    bias_index: Option<(Tensor, Tensor)>,
    /// Anchors of p2..p6 for an input of img_size x img_size, in prediction order.
    anchors: Vec<Vec<BoxXyxy>>,
}

/// Binary cross-entropy with logits against targets, summed: max(x, 0) - x t + log(1 + e^-|x|).
fn bce_with_logits_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let softplus = logits.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    ((logits.relu()? - (logits * targets)?)? + softplus)?.sum_all()
}

/// A zero that still belongs to the graph of `like` (for a loss with nothing to count).
fn zero_loss(like: &Tensor) -> Result<Tensor> {
    Tensor::zeros((), like.dtype(), like.device())
}

fn index_tensor(ids: &[usize], device: &Device) -> Result<Tensor> {
    Tensor::from_vec(ids.iter().map(|&i| i as u32).collect::<Vec<_>>(), ids.len(), device)
}

/// Every element as f32 (for the box geometry, which works in f32 as detectron2's).
fn values_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

impl Detector {
    pub fn new(cfg: ConvMaeConfig, head: DetectorHead, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        cfg.validate().map_err(err)?;
        if !cfg.img_size.is_multiple_of(32) {
            return Err(err(format!("invalid config: the detector needs img_size divisible by 32 (a stride-32 level), got {}", cfg.img_size)));
        }
        head.validate(&cfg).map_err(err)?;
        let params = ParamStore::init(detector_param_specs(&cfg, &head), dtype, device, seed)?;
        let index = |side: usize| -> Result<Tensor> {
            let v = relative_position_index(side);
            Tensor::from_vec(v.clone(), v.len(), device)
        };
        let bias_index = match head.variant {
            DetectorVariant::Det => Some((index(head.window)?, index(cfg.grid())?)),
            DetectorVariant::Vitdet => None,
        };
        let mut side = cfg.img_size / LEVEL_STRIDES[0];
        let mut anchors = Vec::with_capacity(LEVEL_STRIDES.len());
        for (level, &stride) in LEVEL_STRIDES.iter().enumerate() {
            let cell = cell_anchors(&[head.anchor_sizes[level]], &head.aspect_ratios);
            anchors.push(grid_anchors(&cell, stride, side, side));
            side = side.div_ceil(2);
        }
        Ok(Self { cfg, head, params, precision: Precision::Fp32, bias_index, anchors })
    }

    pub fn dtype(&self) -> DType {
        self.params.dtype
    }

    /// The dtype the network computes in.
    pub fn compute_dtype(&self) -> DType {
        self.precision.compute_dtype(self.dtype())
    }

    /// A head's output as the losses and the box geometry read it: in the masters' dtype.
    fn predictions(&self, t: Tensor) -> Result<Tensor> {
        t.to_dtype(self.dtype())
    }

    pub fn device(&self) -> &Device {
        &self.params.device
    }

    pub fn total_anchors(&self) -> usize {
        self.anchors.iter().map(Vec::len).sum()
    }

    /// A stage-3 block: x + attn(LN(x)) with global or windowed attention, x + mlp(LN(x)).
    fn vit_block(&self, p: &ParamStore, i: usize, x: &Tensor, drop: Option<&DropPath>) -> Result<Tensor> {
        let prefix = format!("blocks3.{i}");
        let b = x.dim(0)?;
        let heads = self.cfg.num_heads;
        let h = layer_norm_p(p, &format!("{prefix}.norm1"), x, VIT_LN_EPS)?;
        let (g, w) = (self.cfg.grid(), self.head.window);
        let global = self.head.global_blocks.contains(&i);
        let attn = match (self.head.variant, &self.bias_index) {
            (DetectorVariant::Det, Some((_, global_index))) if global => attention_with_bias(p, &prefix, &h, heads, p.get("global_rel_pos_bias.relative_position_bias_table"), global_index)?,
            (DetectorVariant::Det, Some((window_index, _))) => {
                let table = p.get("windowed_rel_pos_bias.relative_position_bias_table");
                window_unpartition(&attention_with_bias(p, &prefix, &window_partition(&h, g, w)?, heads, table, window_index)?, b, g, w)?
            }
            (DetectorVariant::Det, None) => unreachable!("Detector::new builds Det's bias index"),
            (DetectorVariant::Vitdet, _) if global => rel_pos_attention(p, &prefix, &h, g, heads)?,
            (DetectorVariant::Vitdet, _) => window_unpartition(&rel_pos_attention(p, &prefix, &window_partition(&h, g, w)?, w, heads)?, b, g, w)?,
        };
        let x = residual(x, attn, drop.map(|d| &d.first))?;
        let h = layer_norm_p(p, &format!("{prefix}.norm2"), &x, VIT_LN_EPS)?;
        let h = linear_p(p, &format!("{prefix}.mlp.fc2"), &linear_gelu_p(p, &format!("{prefix}.mlp.fc1"), &h)?)?;
        residual(&x, h, drop.map(|d| &d.second))
    }

    /// The encoder's stage outputs [B, H, W, C] (strides 4, 8 and 16; stage 3 without a final
    /// norm).
    fn backbone(&self, p: &ParamStore, imgs: &Tensor, drop: Option<&[DropPath]>) -> Result<[Tensor; 3]> {
        let cfg = &self.cfg;
        let conv_blocks = cfg.depth[0] + cfg.depth[1];
        let g = cfg.grid();
        let (stage1, stage2, mut x) = match self.head.variant {
            DetectorVariant::Det => encoder_stem(cfg, p, imgs, drop, CONV_LN_EPS, p.get("pos_embed"))?,
            // Official-ConvMAE-Det's CBlock takes the model's norm_layer (eps 1e-6).
            DetectorVariant::Vitdet => encoder_stem(cfg, p, imgs, drop, VIT_LN_EPS, &resized_pos_embed(p.get("pos_embed"), g)?)?,
        };
        let b = imgs.dim(0)?;
        for i in 0..cfg.depth[2] {
            x = self.vit_block(p, i, &x, drop.map(|d| &d[conv_blocks + i]))?;
        }
        let stage3 = x.reshape((b, g, g, cfg.embed_dim[2]))?;
        Ok([stage1, stage2, stage3])
    }

    /// detectron2 `Conv2d` with a norm: conv (no bias, `k / 2` padding) then BatchNorm (Det) or
    /// LayerNorm over channels (Vitdet's "LN").
    fn conv_norm(&self, f: &mut Forward, prefix: &str, x: &Tensor) -> Result<Tensor> {
        let weight = f.params.get(&format!("{prefix}.weight"));
        let y = conv2d(x, weight, None, 1, weight.dim(2)? / 2)?;
        match self.head.variant {
            DetectorVariant::Det => f.batch_norm(&format!("{prefix}.norm"), &y),
            DetectorVariant::Vitdet => layer_norm_p(f.params, &format!("{prefix}.norm"), &y, DETECTRON2_LN_EPS),
        }
    }

    /// p2..p6 of the variant's neck.
    fn pyramid(&self, f: &mut Forward, imgs: &Tensor, drop: Option<&[DropPath]>) -> Result<Vec<Tensor>> {
        let [stage1, stage2, stage3] = self.backbone(f.params, imgs, drop)?;
        match self.head.variant {
            DetectorVariant::Det => {
                let pooled = max_pool_2x2(&stage3)?;
                self.fpn(f, &[stage1, stage2, stage3, pooled])
            }
            DetectorVariant::Vitdet => self.simple_pyramid(f, &stage3),
        }
    }

    /// ViTDet's `SimpleFeaturePyramid` (scale factors 4, 2, 1, 0.5; norm "LN") on the stage-3
    /// map, under its module names (`backbone.simfp_<log2 stride>.<layer>`): stride 4 by a 2x2
    /// deconv, LayerNorm, GELU and another deconv; stride 8 by one deconv; 16 as it is; 32 by
    /// 2x2 max pooling; then each through a 1x1 and a 3x3 `conv_norm`; p6 = p5 subsampled.
    fn simple_pyramid(&self, f: &mut Forward, x: &Tensor) -> Result<Vec<Tensor>> {
        let p = f.params;
        let deconv = |name: &str, x: &Tensor| deconv_2x2(x, p.get(&format!("{name}.weight")), p.get(&format!("{name}.bias")));
        let mut convs = |stage: usize, first: usize, x: &Tensor| -> Result<Tensor> {
            let y = self.conv_norm(f, &format!("backbone.simfp_{stage}.{first}"), x)?;
            self.conv_norm(f, &format!("backbone.simfp_{stage}.{}", first + 1), &y)
        };
        let up4 = deconv("backbone.simfp_2.0", x)?;
        let up4 = deconv("backbone.simfp_2.3", &layer_norm_p(p, "backbone.simfp_2.1", &up4, DETECTRON2_LN_EPS)?.apply(&k::gelu_erf)?)?;
        let p2 = convs(2, 4, &up4)?;
        let p3 = convs(3, 1, &deconv("backbone.simfp_3.0", x)?)?;
        let p4 = convs(4, 0, x)?;
        let p5 = convs(5, 1, &max_pool_2x2(x)?)?;
        let p6 = subsample_2x(&p5)?;
        Ok(vec![p2, p3, p4, p5, p6])
    }

    /// FPN: p2..p6. Top-down from the stride-32 level: each lateral plus the level above,
    /// nearest-upsampled 2x; the 3x3 output conv on each; p6 = p5 at every other position.
    fn fpn(&self, f: &mut Forward, inputs: &[Tensor; 4]) -> Result<Vec<Tensor>> {
        let mut outputs = vec![None, None, None, None];
        let mut prev: Option<Tensor> = None;
        for i in (0..4).rev() {
            let lateral = self.conv_norm(f, &format!("backbone.fpn_lateral{}", i + 2), &inputs[i])?;
            let merged = match prev {
                Some(top) => (lateral + upsample_nearest_2x(&top)?)?,
                None => lateral,
            };
            outputs[i] = Some(self.conv_norm(f, &format!("backbone.fpn_output{}", i + 2), &merged)?);
            prev = Some(merged);
        }
        let mut levels: Vec<Tensor> = outputs.into_iter().map(|o| o.expect("every level is computed")).collect();
        let p6 = subsample_2x(&levels[3])?;
        levels.push(p6);
        Ok(levels)
    }

    /// RPN head on every level: objectness [B, A_total] and deltas [B, A_total, 4] (in the
    /// masters' dtype), anchors in the order of `self.anchors` flattened.
    fn rpn(&self, p: &ParamStore, levels: &[Tensor]) -> Result<(Tensor, Tensor)> {
        let (mut objectness, mut deltas) = (Vec::new(), Vec::new());
        for level in levels {
            let mut x = level.clone();
            for i in 0..self.head.rpn_convs {
                let prefix = format!("proposal_generator.rpn_head.conv.conv{i}");
                x = conv2d(&x, p.get(&format!("{prefix}.weight")), Some(p.get(&format!("{prefix}.bias"))), 1, 1)?.relu()?;
            }
            let b = x.dim(0)?;
            let o = linear_p(p, "proposal_generator.rpn_head.objectness_logits", &x)?;
            objectness.push(o.reshape((b, ()))?);
            let d = linear_p(p, "proposal_generator.rpn_head.anchor_deltas", &x)?;
            deltas.push(d.reshape((b, (), 4))?);
        }
        Ok((self.predictions(Tensor::cat(&objectness, 1)?)?, self.predictions(Tensor::cat(&deltas, 1)?)?))
    }

    /// detectron2 `find_top_rpn_proposals` for image `b`: per level the `pre_nms` anchors of
    /// highest objectness, decoded, clipped to the image's `extent` (height, width), empty boxes
    /// dropped, NMS per level, then the `post_nms` best overall.
    fn proposals(&self, objectness: &[f32], deltas: &[f32], b: usize, extent: (usize, usize), pre_nms: usize, post_nms: usize) -> Vec<BoxXyxy> {
        let total = self.total_anchors();
        let (mut boxes, mut scores, mut groups) = (Vec::new(), Vec::new(), Vec::new());
        let mut offset = 0;
        for (level, anchors) in self.anchors.iter().enumerate() {
            let logits = &objectness[b * total + offset..][..anchors.len()];
            for &a in order_by_score(logits).iter().take(pre_nms) {
                let at = (b * total + offset + a) * 4;
                let d = [deltas[at], deltas[at + 1], deltas[at + 2], deltas[at + 3]];
                let decoded = clip_box(&RPN_TRANSFORM.decode(&anchors[a], &d), extent.0, extent.1);
                let finite = decoded.iter().all(|v| v.is_finite()) && logits[a].is_finite();
                if finite && decoded[2] > decoded[0] && decoded[3] > decoded[1] {
                    boxes.push(decoded);
                    scores.push(logits[a]);
                    groups.push(level);
                }
            }
            offset += anchors.len();
        }
        batched_nms(&boxes, &scores, &groups, self.head.rpn_nms).into_iter().take(post_nms).map(|i| boxes[i]).collect()
    }

    /// ROIAlignV2 features [R, side, side, C] of `rois` from p2..p5, each region from the level
    /// its size assigns, in the order of `rois`, in the levels' dtype. The sampling runs in the
    /// masters' dtype (f32 under bf16, as torchvision's autocast runs roi_align).
    fn pool(&self, levels: &[Tensor], rois: &[RoiBox], side: usize) -> Result<Tensor> {
        let compute = levels[0].dtype();
        let (min, max) = ROI_LEVELS;
        let mut by_level: Vec<Vec<usize>> = vec![Vec::new(); max - min + 1];
        for (i, r) in rois.iter().enumerate() {
            by_level[roi_level(&[r.x1, r.y1, r.x2, r.y2], min, max)].push(i);
        }
        let mut parts = Vec::new();
        let mut order: Vec<usize> = Vec::with_capacity(rois.len());
        for (l, members) in by_level.iter().enumerate() {
            if members.is_empty() {
                continue;
            }
            let boxes: Vec<RoiBox> = members.iter().map(|&i| rois[i]).collect();
            parts.push(k::roi_align(&levels[l].to_dtype(self.dtype())?, &boxes, side, 1.0 / LEVEL_STRIDES[l] as f64, 0)?.to_dtype(compute)?);
            order.extend(members);
        }
        if parts.is_empty() {
            return Tensor::zeros((0, side, side, self.head.channels), compute, self.device());
        }
        let pooled = Tensor::cat(&parts, 0)?;
        // Row `order[j]` of the output is row j of `pooled`.
        let mut inverse = vec![0usize; order.len()];
        for (j, &i) in order.iter().enumerate() {
            inverse[i] = j;
        }
        pooled.index_select(&index_tensor(&inverse, self.device())?, 0)
    }

    /// 4conv1fc box head and the predictor: class scores [R, K + 1] (the last is background)
    /// and class-specific deltas [R, 4K], in the masters' dtype.
    fn box_head(&self, f: &mut Forward, pooled: &Tensor) -> Result<(Tensor, Tensor)> {
        let p = f.params;
        let mut x = pooled.clone();
        for i in 1..=self.head.box_convs {
            x = self.conv_norm(f, &format!("roi_heads.box_head.conv{i}"), &x)?.relu()?;
        }
        // fc1's weight reads the features in PyTorch's (channel, row, column) order.
        let r = x.dim(0)?;
        let flat = x.permute((0, 3, 1, 2))?.contiguous()?.reshape((r, ()))?;
        let x = linear_p(p, "roi_heads.box_head.fc1", &flat)?.relu()?;
        let scores = linear_p(p, "roi_heads.box_predictor.cls_score", &x)?;
        Ok((self.predictions(scores)?, self.predictions(linear_p(p, "roi_heads.box_predictor.bbox_pred", &x)?)?))
    }

    /// Mask head: convs, the 2x2 stride-2 deconv (a matmul to 4 sub-positions), ReLU, the 1x1
    /// predictor: logits [R, 28, 28, K], in the masters' dtype.
    fn mask_head(&self, f: &mut Forward, pooled: &Tensor) -> Result<Tensor> {
        let p = f.params;
        let mut x = pooled.clone();
        for i in 1..=self.head.mask_convs {
            x = self.conv_norm(f, &format!("roi_heads.mask_head.mask_fcn{i}"), &x)?.relu()?;
        }
        let y = deconv_2x2(&x, p.get("roi_heads.mask_head.deconv.weight"), p.get("roi_heads.mask_head.deconv.bias"))?.relu()?;
        self.predictions(linear_p(p, "roi_heads.mask_head.predictor", &y)?)
    }

    /// Levels p2..p6 and the RPN's outputs for normalized images [B, S, S, 3].
    fn features(&self, f: &mut Forward, imgs: &Tensor, drop: Option<&[DropPath]>) -> Result<(Vec<Tensor>, Tensor, Tensor)> {
        let levels = self.pyramid(f, imgs, drop)?;
        let (objectness, deltas) = self.rpn(f.params, &levels)?;
        Ok((levels, objectness, deltas))
    }

    /// The training losses of a batch (detectron2's `GeneralizedRCNN.forward` in training):
    /// stochastic depth and the RPN's and ROI heads' sampling draw from `rng`.
    pub fn losses(&self, imgs: &Tensor, targets: &[ImageTargets], rng: &mut Rng) -> Result<DetectorLosses> {
        self.losses_with(imgs, targets, rng, None)
    }

    /// `losses` with the ROI heads given these proposals per image instead of the RPN's. The
    /// proposals are a discrete function of the weights (top-k, NMS), so a finite-difference
    /// check holds them fixed.
    pub fn losses_with_proposals(&self, imgs: &Tensor, targets: &[ImageTargets], rng: &mut Rng, proposals: &[Vec<BoxXyxy>]) -> Result<DetectorLosses> {
        if proposals.len() != targets.len() {
            return Err(err(format!("losses: {} proposal sets for {} images", proposals.len(), targets.len())));
        }
        self.losses_with(imgs, targets, rng, Some(proposals))
    }

    fn losses_with(&self, imgs: &Tensor, targets: &[ImageTargets], rng: &mut Rng, fixed: Option<&[Vec<BoxXyxy>]>) -> Result<DetectorLosses> {
        let params = self.params.at_precision(self.precision)?;
        let imgs = imgs.to_dtype(params.dtype)?;
        let (b, hh, ww, _) = imgs.dims4()?;
        let side = self.cfg.img_size;
        if (hh, ww) != (side, side) || targets.len() != b {
            return Err(err(format!("losses: {b} images of {hh}x{ww} with {} target sets; expected img_size {side} and one set per image", targets.len())));
        }
        let (device, dtype, head) = (self.device().clone(), self.dtype(), &self.head);
        let drop = draw_drop_path(&self.cfg, head.drop_path, b, params.dtype, &device, rng)?;
        let mut f = Forward { params: &params, masters: &self.params, training: true, rng: None, dropout: 0.0, norm_stats: Vec::new() };
        let (levels, objectness, deltas) = self.features(&mut f, &imgs, drop.as_deref())?;
        let total = self.total_anchors();
        let all_anchors: Vec<BoxXyxy> = self.anchors.concat();

        // RPN: anchors matched and sampled per image.
        let (mut valid, mut labels, mut positive, mut delta_targets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, t) in targets.iter().enumerate() {
            let iou = iou_matrix(&t.boxes, &all_anchors);
            let (matches, match_labels) = Matcher::rpn().assign(&iou, t.boxes.len(), total);
            let classes: Vec<i64> = match_labels.iter().map(|&l| l as i64).collect();
            let (pos, neg) = subsample_labels(&classes, head.rpn_batch_per_image, head.rpn_positive_fraction, 0, rng);
            for &a in &pos {
                valid.push(i * total + a);
                labels.push(1.0);
                positive.push(i * total + a);
                delta_targets.extend(RPN_TRANSFORM.encode(&all_anchors[a], &t.boxes[matches[a]]).map(f64::from));
            }
            for &a in &neg {
                valid.push(i * total + a);
                labels.push(0.0);
            }
        }
        let normalizer = (head.rpn_batch_per_image * b) as f64;
        let picked = objectness.flatten_all()?.index_select(&index_tensor(&valid, &device)?, 0)?;
        let targets_t = Tensor::from_vec(labels, valid.len(), &device)?.to_dtype(dtype)?;
        let rpn_cls = (bce_with_logits_sum(&picked, &targets_t)? / normalizer)?;
        let rpn_loc = if positive.is_empty() {
            zero_loss(&objectness)?
        } else {
            let pred = deltas.reshape((b * total, 4))?.index_select(&index_tensor(&positive, &device)?, 0)?;
            let want = Tensor::from_vec(delta_targets, (positive.len(), 4), &device)?.to_dtype(dtype)?;
            ((pred - want)?.abs()?.sum_all()? / normalizer)?
        };

        // Proposals (from the predictions, not differentiated) plus the ground truth, matched
        // and sampled per image for the ROI heads.
        let (obj_values, delta_values) = (values_f32(&objectness)?, values_f32(&deltas)?);
        let k_classes = head.num_classes;
        let mut rois = Vec::new();
        let mut roi_classes = Vec::new();
        let mut box_targets = Vec::new();
        let mut fg = Vec::new();
        // For each foreground region: its ground truth's index over the batch.
        let mut fg_gt = Vec::new();
        let mut gt_offset = 0;
        let mut used = Vec::with_capacity(b);
        for (i, t) in targets.iter().enumerate() {
            let mut proposals = match fixed {
                Some(given) => given[i].clone(),
                None => self.proposals(&obj_values, &delta_values, i, t.extent.unwrap_or((side, side)), head.rpn_pre_nms_train, head.rpn_post_nms_train),
            };
            used.push(proposals.clone());
            proposals.extend(&t.boxes);
            let iou = iou_matrix(&t.boxes, &proposals);
            let (matches, match_labels) = Matcher::roi().assign(&iou, t.boxes.len(), proposals.len());
            let classes: Vec<i64> = (0..proposals.len())
                .map(|j| match match_labels[j] {
                    1 => t.classes[matches[j]] as i64,
                    0 => k_classes as i64,
                    _ => -1,
                })
                .collect();
            let (pos, neg) = subsample_labels(&classes, head.roi_batch_per_image, head.roi_positive_fraction, k_classes as i64, rng);
            for &j in pos.iter().chain(&neg) {
                let pb = proposals[j];
                if classes[j] != k_classes as i64 {
                    fg.push(rois.len());
                    fg_gt.push(gt_offset + matches[j]);
                    box_targets.extend(ROI_TRANSFORM.encode(&pb, &t.boxes[matches[j]]).map(f64::from));
                }
                rois.push(RoiBox { image: i, x1: pb[0], y1: pb[1], x2: pb[2], y2: pb[3] });
                roi_classes.push(classes[j] as u32);
            }
            gt_offset += t.boxes.len();
        }
        let pooled = self.pool(&levels[..4], &rois, BOX_POOL_SIDE)?;
        let (scores, box_deltas) = self.box_head(&mut f, &pooled)?;
        let r = rois.len();
        let cls = {
            let max = scores.max_keepdim(D::Minus1)?.detach();
            let shifted = scores.broadcast_sub(&max)?;
            let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
            let index = Tensor::from_vec(roi_classes.clone(), (r, 1), &device)?;
            (log_probs.gather(&index, 1)?.sum_all()? / -(r as f64))?
        };
        let (box_reg, mask) = if fg.is_empty() {
            (zero_loss(&scores)?, zero_loss(&scores)?)
        } else {
            // The deltas of each foreground region's own class.
            let slots: Vec<usize> = fg.iter().map(|&j| j * k_classes + roi_classes[j] as usize).collect();
            let pred = box_deltas.reshape((r * k_classes, 4))?.index_select(&index_tensor(&slots, &device)?, 0)?;
            let want = Tensor::from_vec(box_targets, (fg.len(), 4), &device)?.to_dtype(dtype)?;
            let box_reg = ((pred - want)?.abs()?.sum_all()? / r as f64)?;
            let fg_rois: Vec<RoiBox> = fg.iter().map(|&j| rois[j]).collect();
            let logits = self.mask_head(&mut f, &self.pool(&levels[..4], &fg_rois, MASK_POOL_SIDE)?)?;
            let mask = self.mask_loss(&logits, &fg_rois, &fg.iter().map(|&j| roi_classes[j] as usize).collect::<Vec<_>>(), &fg_gt, targets)?;
            (box_reg, mask)
        };
        Ok(DetectorLosses { rpn_cls, rpn_loc, cls, box_reg, mask, norm_stats: f.norm_stats, foreground: fg.len(), proposals: used })
    }

    /// The 28 x 28 mask target of each foreground region (row-major, 0 or 1), from the ground
    /// truth `gt_index` names (an index over all images' instances, in order): detectron2's
    /// PolygonMasks.crop_and_resize where the instance has polygons (rasterized inside the
    /// region as pycocotools does), else its BitMasks.crop_and_resize (the mask cropped and
    /// resized by ROIAlign, aligned, adaptive sampling, thresholded at 0.5).
    pub fn mask_targets(&self, rois: &[RoiBox], gt_index: &[usize], targets: &[ImageTargets]) -> Result<Vec<f32>> {
        let side = self.cfg.img_size;
        let polygons: Vec<Option<&Vec<Vec<f64>>>> = targets.iter().flat_map(|t| (0..t.boxes.len()).map(|g| t.polygons.get(g).filter(|p| !p.is_empty()))).collect();
        let from_mask: Vec<usize> = (0..rois.len()).filter(|&i| polygons[gt_index[i]].is_none()).collect();
        let mut out = vec![0f32; rois.len() * MASK_SIDE * MASK_SIDE];
        if !from_mask.is_empty() {
            let masks: Vec<f32> = targets.iter().flat_map(|t| t.masks.iter().map(|&m| if m != 0 { 1.0 } else { 0.0 })).collect();
            let count = masks.len() / (side * side);
            let gt_masks = Tensor::from_vec(masks, (count, side, side, 1), &Device::Cpu)?;
            let crop: Vec<RoiBox> = from_mask.iter().map(|&i| RoiBox { image: gt_index[i], ..rois[i] }).collect();
            let resized = values_f32(&k::roi_align(&gt_masks, &crop, MASK_SIDE, 1.0, 0)?)?;
            for (j, &i) in from_mask.iter().enumerate() {
                let target = &mut out[i * MASK_SIDE * MASK_SIDE..(i + 1) * MASK_SIDE * MASK_SIDE];
                for (t, &v) in target.iter_mut().zip(&resized[j * MASK_SIDE * MASK_SIDE..]) {
                    *t = if v >= 0.5 { 1.0 } else { 0.0 };
                }
            }
        }
        for (i, r) in rois.iter().enumerate() {
            if let Some(p) = polygons[gt_index[i]] {
                let b: BoxXyxy = [r.x1, r.y1, r.x2, r.y2];
                let mask = crate::polygons::rasterize_within_box(p, &b, MASK_SIDE);
                for (t, &m) in out[i * MASK_SIDE * MASK_SIDE..].iter_mut().zip(&mask) {
                    *t = f32::from(m);
                }
            }
        }
        Ok(out)
    }

    /// detectron2 `mask_rcnn_loss`: each foreground region's logits of its class against its
    /// mask target (`mask_targets`); binary cross-entropy averaged over all those pixels.
    fn mask_loss(&self, logits: &Tensor, rois: &[RoiBox], classes: &[usize], gt_index: &[usize], targets: &[ImageTargets]) -> Result<Tensor> {
        let device = self.device();
        let binary = self.mask_targets(rois, gt_index, targets)?;
        let n = rois.len();
        let pixels = n * MASK_SIDE * MASK_SIDE;
        let k_classes = self.head.num_classes;
        let class_index: Vec<u32> = (0..pixels).map(|i| classes[i / (MASK_SIDE * MASK_SIDE)] as u32).collect();
        let picked = logits.reshape((pixels, k_classes))?.gather(&Tensor::from_vec(class_index, (pixels, 1), device)?, 1)?.flatten_all()?;
        let want = Tensor::from_vec(binary, pixels, device)?.to_dtype(self.dtype())?;
        bce_with_logits_sum(&picked, &want)? / pixels as f64
    }

    /// Detections of normalized images [B, S, S, 3] in evaluation mode (detectron2's inference:
    /// RPN proposals, class scores and boxes, score threshold, NMS per class, the best
    /// `detections_per_image`, then masks for them). Each image fills `extents` (height, width)
    /// at the top left of its input (detectron2's `image_size`: proposals and boxes are clipped
    /// to it); boxes and masks are scaled from it to the image's `output` size (height, width),
    /// as `detector_postprocess` does.
    pub fn detect(&self, imgs: &Tensor, extents: &[(usize, usize)], output: &[(usize, usize)]) -> Result<Vec<ImageDetections>> {
        let params = self.params.at_precision(self.precision)?;
        let imgs = imgs.to_dtype(params.dtype)?;
        let (b, hh, ww, _) = imgs.dims4()?;
        let side = self.cfg.img_size;
        if (hh, ww) != (side, side) || output.len() != b || extents.len() != b {
            return Err(err(format!(
                "detect: {b} images of {hh}x{ww} with {} output sizes and {} extents; expected img_size {side} and one of each per image",
                output.len(),
                extents.len()
            )));
        }
        let head = &self.head;
        let mut f = Forward { params: &params, masters: &self.params, training: false, rng: None, dropout: 0.0, norm_stats: Vec::new() };
        let (levels, objectness, deltas) = self.features(&mut f, &imgs, None)?;
        let (obj_values, delta_values) = (values_f32(&objectness)?, values_f32(&deltas)?);
        let mut rois = Vec::new();
        for (i, &extent) in extents.iter().enumerate() {
            let proposals = self.proposals(&obj_values, &delta_values, i, extent, head.rpn_pre_nms_test, head.rpn_post_nms_test);
            rois.extend(proposals.iter().map(|p| RoiBox { image: i, x1: p[0], y1: p[1], x2: p[2], y2: p[3] }));
        }
        let k_classes = head.num_classes;
        let (scores, box_deltas) = self.box_head(&mut f, &self.pool(&levels[..4], &rois, BOX_POOL_SIDE)?)?;
        let probs = values_f32(&softmax_last(&scores)?)?;
        let box_deltas = values_f32(&box_deltas)?;
        // Per image: (box, score, class) candidates above the threshold, NMS per class, top k.
        let mut kept: Vec<Vec<(BoxXyxy, f32, usize)>> = vec![Vec::new(); b];
        for (j, roi) in rois.iter().enumerate() {
            let proposal = [roi.x1, roi.y1, roi.x2, roi.y2];
            for c in 0..k_classes {
                let score = probs[j * (k_classes + 1) + c];
                let at = (j * k_classes + c) * 4;
                let d = [box_deltas[at], box_deltas[at + 1], box_deltas[at + 2], box_deltas[at + 3]];
                let (eh, ew) = extents[roi.image];
                let decoded = clip_box(&ROI_TRANSFORM.decode(&proposal, &d), eh, ew);
                if score > head.score_threshold && score.is_finite() && decoded.iter().all(|v| v.is_finite()) {
                    kept[roi.image].push((decoded, score, c));
                }
            }
        }
        let mut results = Vec::with_capacity(b);
        let mut mask_rois = Vec::new();
        for (i, candidates) in kept.iter().enumerate() {
            let boxes: Vec<BoxXyxy> = candidates.iter().map(|c| c.0).collect();
            let scores: Vec<f32> = candidates.iter().map(|c| c.1).collect();
            let classes: Vec<usize> = candidates.iter().map(|c| c.2).collect();
            let keep: Vec<usize> = batched_nms(&boxes, &scores, &classes, head.test_nms).into_iter().take(head.detections_per_image).collect();
            let mut det = ImageDetections { height: output[i].0, width: output[i].1, ..Default::default() };
            for &j in &keep {
                det.boxes.push(boxes[j]);
                det.scores.push(scores[j]);
                det.classes.push(classes[j]);
                mask_rois.push(RoiBox { image: i, x1: boxes[j][0], y1: boxes[j][1], x2: boxes[j][2], y2: boxes[j][3] });
            }
            results.push(det);
        }
        let probs = if mask_rois.is_empty() {
            Vec::new()
        } else {
            let logits = self.mask_head(&mut f, &self.pool(&levels[..4], &mask_rois, MASK_POOL_SIDE)?)?;
            values_f32(&sigmoid(&logits)?)?
        };
        // Scale to the output size, drop boxes left empty, paste the masks.
        let cell = MASK_SIDE * MASK_SIDE;
        let mut row = 0;
        for (det, &(eh, ew)) in results.iter_mut().zip(extents) {
            let (oh, ow) = (det.height, det.width);
            let (sy, sx) = (oh as f32 / eh as f32, ow as f32 / ew as f32);
            let mut out = ImageDetections { height: oh, width: ow, ..Default::default() };
            for n in 0..det.boxes.len() {
                let bx = det.boxes[n];
                let scaled = clip_box(&[bx[0] * sx, bx[1] * sy, bx[2] * sx, bx[3] * sy], oh, ow);
                let c = det.classes[n];
                let probs_n: Vec<f32> = (0..cell).map(|q| probs[(row * cell + q) * k_classes + c]).collect();
                row += 1;
                if scaled[2] <= scaled[0] || scaled[3] <= scaled[1] {
                    continue;
                }
                out.masks.extend(paste_mask(&probs_n, MASK_SIDE, &scaled, oh, ow, 0.5));
                out.boxes.push(scaled);
                out.scores.push(det.scores[n]);
                out.classes.push(c);
            }
            *det = out;
        }
        Ok(results)
    }

    /// Folds a training step's BatchNorm statistics into the running averages.
    pub fn update_running_stats(&mut self, stats: &[NormStats]) -> Result<()> {
        super::segmenter::fold_running_stats(&mut self.params, stats)
    }
}

/// Tokens [B, g * g, D] (row-major grid) as non-overlapping w x w windows [B * n^2, w * w, D],
/// n = ceil(g / w), windows in row-major order, tokens row-major within each. Where w does not
/// divide g the grid is first zero-padded at the bottom and right to n * w (ViTDet's
/// `window_partition`; DET's windows always divide it).
pub fn window_partition(x: &Tensor, g: usize, w: usize) -> Result<Tensor> {
    let (b, _, d) = x.dims3()?;
    let n = g.div_ceil(w);
    let mut grid = x.reshape((b, g, g, d))?;
    if n * w > g {
        grid = grid.pad_with_zeros(1, 0, n * w - g)?.pad_with_zeros(2, 0, n * w - g)?;
    }
    grid.reshape(vec![b, n, w, n, w, d])?.permute([0, 1, 3, 2, 4, 5])?.contiguous()?.reshape((b * n * n, w * w, d))
}

/// The inverse of `window_partition`: [B * n^2, w * w, D] -> [B, g * g, D], padding dropped.
pub fn window_unpartition(x: &Tensor, b: usize, g: usize, w: usize) -> Result<Tensor> {
    let d = x.dim(2)?;
    let n = g.div_ceil(w);
    let mut grid = x.reshape(vec![b, n, n, w, w, d])?.permute([0, 1, 3, 2, 4, 5])?.contiguous()?.reshape((b, n * w, n * w, d))?;
    if n * w > g {
        grid = grid.narrow(1, 0, g)?.narrow(2, 0, g)?.contiguous()?;
    }
    grid.reshape((b, g * g, d))
}

/// detectron2's `LastLevelMaxPool` (max_pool2d with kernel 1, stride 2) of [B, H, W, C]: every
/// other row and column, from the first.
pub fn subsample_2x(x: &Tensor) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    let rows = index_tensor(&(0..h).step_by(2).collect::<Vec<_>>(), x.device())?;
    let cols = index_tensor(&(0..w).step_by(2).collect::<Vec<_>>(), x.device())?;
    x.index_select(&rows, 1)?.index_select(&cols, 2)
}

/// MaxPool2d(2) of [B, H, W, C] with H and W even: the max of each 2x2 cell.
pub fn max_pool_2x2(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    x.reshape(vec![b, h / 2, 2, w / 2, 2, c])?.max(4)?.max(2)
}

/// `F.interpolate(scale_factor=2, mode="nearest")` of [B, H, W, C]: each value to a 2x2 cell.
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    x.reshape(vec![b, h, 1, w, 1, c])?.broadcast_as(vec![b, h, 2, w, 2, c])?.contiguous()?.reshape((b, 2 * h, 2 * w, c))
}

/// ConvTranspose2d(kernel 2, stride 2) of [R, H, W, C_in] with a PyTorch weight [C_in, C_out,
/// 2, 2]: each input position writes its own 2x2 output cell, so it is one matmul to the four
/// sub-positions' channels, rows (i, j, out), then an interleave: [R, 2H, 2W, C_out].
pub fn deconv_2x2(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (r, h, w, c_in) = x.dims4()?;
    let c_out = weight.dim(1)?;
    let rows = weight.permute((2, 3, 1, 0))?.contiguous()?.reshape((4 * c_out, c_in))?;
    let bias = bias.unsqueeze(0)?.broadcast_as((4, c_out))?.contiguous()?.reshape(4 * c_out)?;
    k::linear(x, &rows, &bias)?.reshape(vec![r, h, w, 2, 2, c_out])?.permute([0, 1, 3, 2, 4, 5])?.contiguous()?.reshape((r, 2 * h, 2 * w, c_out))
}

/// Softmax over the last dim of [R, K + 1] (the class probabilities).
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    x.neg()?.exp()?.affine(1.0, 1.0)?.recip()
}
