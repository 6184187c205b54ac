//! Parameter tensors under their official state_dict names, in the official registration order.
//!
//! `pretrain_param_specs` is the single place that knows which tensors a ConvMAE model has, their
//! shapes, whether they train and how the official code initializes them. Init, the manifest,
//! `convmae info`, checkpoint loading and the optimizer all read it.

use crate::config::ConvMaeConfig;
use crate::model::classifier::{ClassifierHead, HeadKind, Pooling};
use crate::model::detector::{DetectorHead, DetectorVariant, BOX_POOL_SIDE};
use crate::model::segmenter::{relative_table_len, SegmenterHead};
use crate::pos_embed::sincos_2d;
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How the official code initializes a tensor when training from scratch (spec section 1.9).
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    /// torch.nn.init.xavier_uniform_: U(+-sqrt(6 / (fan_in + fan_out))).
    XavierUniform { fan_in: usize, fan_out: usize },
    /// PyTorch's default Conv2d init, kaiming_uniform(a = sqrt 5): U(+-1/sqrt(fan_in)); also its bias init.
    ConvDefault { fan_in: usize },
    Normal { std: f64 },
    /// timm's trunc_normal_: Normal(0, std) cut at +-2 (absolute).
    TruncNormal { std: f64 },
    /// mmcv's kaiming_init as ConvModule uses it: Normal(0, sqrt(2 / fan_out)), fan_out = out * k * k.
    KaimingNormalFanOut { fan_out: usize },
    /// detectron2's `c2_xavier_fill`: kaiming_uniform(a = 1), U(+-sqrt(3 / fan_in)).
    C2XavierFill { fan_in: usize },
    /// Fixed 2-D sin-cos table of the given width on the model's token grid.
    SinCos { dim: usize, grid: usize },
}

#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub trainable: bool,
    pub init: Init,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct SpecList(Vec<ParamSpec>);

impl SpecList {
    fn push(&mut self, name: String, shape: &[usize], init: Init) {
        self.0.push(ParamSpec { name, shape: shape.to_vec(), trainable: true, init });
    }
    fn frozen(&mut self, name: &str, shape: &[usize], init: Init) {
        self.0.push(ParamSpec { name: name.into(), shape: shape.to_vec(), trainable: false, init });
    }
    fn linear(&mut self, prefix: &str, inp: usize, out: usize) {
        self.push(format!("{prefix}.weight"), &[out, inp], Init::XavierUniform { fan_in: inp, fan_out: out });
        self.push(format!("{prefix}.bias"), &[out], Init::Zeros);
    }
    fn layer_norm(&mut self, prefix: &str, dim: usize) {
        self.push(format!("{prefix}.weight"), &[dim], Init::Ones);
        self.push(format!("{prefix}.bias"), &[dim], Init::Zeros);
    }
    /// A Conv2d left at PyTorch's default init (groups = `inp` for depthwise: weight [out, 1, k, k]).
    fn conv(&mut self, prefix: &str, inp_per_group: usize, out: usize, k: usize) {
        let fan_in = inp_per_group * k * k;
        self.push(format!("{prefix}.weight"), &[out, inp_per_group, k, k], Init::ConvDefault { fan_in });
        self.push(format!("{prefix}.bias"), &[out], Init::ConvDefault { fan_in });
    }
    fn patch_embed(&mut self, prefix: &str, inp: usize, out: usize, k: usize) {
        self.conv(&format!("{prefix}.proj"), inp, out, k);
        self.layer_norm(&format!("{prefix}.norm"), out);
    }
    fn conv_block(&mut self, prefix: &str, dim: usize, mlp_ratio: f64) {
        let hidden = ConvMaeConfig::mlp_hidden(dim, mlp_ratio);
        self.layer_norm(&format!("{prefix}.norm1"), dim);
        self.conv(&format!("{prefix}.conv1"), dim, dim, 1);
        self.conv(&format!("{prefix}.conv2"), dim, dim, 1);
        self.conv(&format!("{prefix}.attn"), 1, dim, 5);
        self.layer_norm(&format!("{prefix}.norm2"), dim);
        self.conv(&format!("{prefix}.mlp.fc1"), dim, hidden, 1);
        self.conv(&format!("{prefix}.mlp.fc2"), hidden, dim, 1);
    }
    fn transformer_block(&mut self, prefix: &str, dim: usize, mlp_ratio: f64, qkv_bias: bool) {
        let hidden = ConvMaeConfig::mlp_hidden(dim, mlp_ratio);
        self.layer_norm(&format!("{prefix}.norm1"), dim);
        if qkv_bias {
            self.linear(&format!("{prefix}.attn.qkv"), dim, 3 * dim);
        } else {
            self.push(format!("{prefix}.attn.qkv.weight"), &[3 * dim, dim], Init::XavierUniform { fan_in: dim, fan_out: 3 * dim });
        }
        self.linear(&format!("{prefix}.attn.proj"), dim, dim);
        self.layer_norm(&format!("{prefix}.norm2"), dim);
        self.linear(&format!("{prefix}.mlp.fc1"), dim, hidden);
        self.linear(&format!("{prefix}.mlp.fc2"), hidden, dim);
    }
}

impl SpecList {
    /// patch_embed1..4 (shared by the pretraining and classification models).
    fn patch_embeds(&mut self, cfg: &ConvMaeConfig) {
        let [d1, d2, d3] = cfg.embed_dim;
        let [p1, p2, p3] = cfg.patch_size;
        self.patch_embed("patch_embed1", cfg.in_chans, d1, p1);
        self.patch_embed("patch_embed2", d1, d2, p2);
        self.patch_embed("patch_embed3", d2, d3, p3);
        // The only conv the official init treats like a Linear: xavier on its [out, in*k*k] view.
        let pe3 = self.0.iter_mut().find(|p| p.name == "patch_embed3.proj.weight").unwrap();
        pe3.init = Init::XavierUniform { fan_in: d2 * p3 * p3, fan_out: d3 };
        self.linear("patch_embed4", d3, d3);
    }

    /// blocks1, blocks2 (conv blocks) and blocks3 (transformer blocks).
    fn encoder_blocks(&mut self, cfg: &ConvMaeConfig) {
        let [d1, d2, d3] = cfg.embed_dim;
        for i in 0..cfg.depth[0] {
            self.conv_block(&format!("blocks1.{i}"), d1, cfg.mlp_ratio[0]);
        }
        for i in 0..cfg.depth[1] {
            self.conv_block(&format!("blocks2.{i}"), d2, cfg.mlp_ratio[1]);
        }
        for i in 0..cfg.depth[2] {
            self.transformer_block(&format!("blocks3.{i}"), d3, cfg.mlp_ratio[2], cfg.qkv_bias);
        }
    }
}

/// Every tensor of the official `ConvViT` classifier, in state_dict order, for a head and pooling.
///
/// - Fine-tuning (`main_finetune.py`): everything trains; pos_embed is learnable; `head` is
///   trunc_normal(2e-5).
/// - Linear probe (`main_linprobe.py`): everything but the head is frozen; the head is
///   BatchNorm1d(affine=False) (`head.0`, running stats as frozen buffers) + Linear (`head.1`,
///   trunc_normal(0.01)).
/// - Global pooling adds `fc_norm` (the official class deletes `norm` then); token pooling keeps
///   `norm`, applied to the tokens before token 0 is taken.
pub fn classifier_param_specs(cfg: &ConvMaeConfig, head: &ClassifierHead) -> Vec<ParamSpec> {
    let d3 = cfg.embed_dim[2];
    let k = head.num_classes;
    let mut s = SpecList(Vec::new());
    s.push("pos_embed".into(), &[1, cfg.num_tokens(), d3], Init::SinCos { dim: d3, grid: cfg.grid() });
    s.patch_embeds(cfg);
    s.encoder_blocks(cfg);
    if head.pool == Pooling::Token {
        s.layer_norm("norm", d3);
    }
    match head.kind {
        HeadKind::Finetune => {
            s.push("head.weight".into(), &[k, d3], Init::Normal { std: 2e-5 });
            s.push("head.bias".into(), &[k], Init::Zeros);
        }
        HeadKind::LinearProbe => {
            s.frozen("head.0.running_mean", &[d3], Init::Zeros);
            s.frozen("head.0.running_var", &[d3], Init::Ones);
            s.push("head.1.weight".into(), &[k, d3], Init::Normal { std: 0.01 });
            s.push("head.1.bias".into(), &[k], Init::Zeros);
        }
    }
    if head.pool == Pooling::Global {
        s.layer_norm("fc_norm", d3);
    }
    if head.kind == HeadKind::LinearProbe {
        for p in s.0.iter_mut().filter(|p| !p.name.starts_with("head.1.")) {
            p.trainable = false;
        }
    }
    s.0
}

impl SpecList {
    /// BatchNorm2d (SyncBN): affine weight and bias, and the running statistics as frozen buffers.
    fn batch_norm(&mut self, prefix: &str, dim: usize) {
        self.layer_norm(prefix, dim);
        self.frozen(&format!("{prefix}.running_mean"), &[dim], Init::Zeros);
        self.frozen(&format!("{prefix}.running_var"), &[dim], Init::Ones);
    }
    /// mmcv ConvModule (conv without bias, BatchNorm, ReLU): `prefix.conv`, `prefix.bn`.
    fn conv_module(&mut self, prefix: &str, inp: usize, out: usize, k: usize) {
        let fan_out = out * k * k;
        self.push(format!("{prefix}.conv.weight"), &[out, inp, k, k], Init::KaimingNormalFanOut { fan_out });
        self.batch_norm(&format!("{prefix}.bn"), out);
    }
    /// A decode head's classifier `conv_seg` (1x1, normal_init std 0.01, bias 0).
    fn conv_seg(&mut self, prefix: &str, inp: usize, classes: usize) {
        self.push(format!("{prefix}.conv_seg.weight"), &[classes, inp, 1, 1], Init::Normal { std: 0.01 });
        self.push(format!("{prefix}.conv_seg.bias"), &[classes], Init::Zeros);
    }
}

/// Every tensor of the official UperNet segmenter (SEG/: mmseg `EncoderDecoder` with the
/// `ConvMAE` backbone, `UPerHead` and the auxiliary `FCNHead`), under the checkpoint's names less
/// the `backbone.` prefix of the backbone's tensors (kept as the encoder's own names, so that
/// pretraining and classifier checkpoints load as they are).
///
/// Backbone init as the official one from scratch: Linear weights trunc_normal(0.02), convs at
/// PyTorch's default, layer scales 1.0 (`init_values=1.`), relative position tables 0. In
/// practice all but the new tensors (layer scales, tables, `fpn`, heads) come from a checkpoint.
pub fn segmenter_param_specs(cfg: &ConvMaeConfig, head: &SegmenterHead) -> Vec<ParamSpec> {
    let d3 = cfg.embed_dim[2];
    let (c, k) = (head.channels, head.num_classes);
    let mut s = SpecList(Vec::new());
    s.push("pos_embed".into(), &[1, cfg.num_tokens(), d3], Init::TruncNormal { std: 0.02 });
    s.patch_embeds(cfg);
    s.encoder_blocks(cfg);
    for p in s.0.iter_mut() {
        match p.init {
            Init::XavierUniform { .. } if p.name == "patch_embed3.proj.weight" => p.init = Init::ConvDefault { fan_in: cfg.embed_dim[1] * cfg.patch_size[2] * cfg.patch_size[2] },
            Init::XavierUniform { .. } => p.init = Init::TruncNormal { std: 0.02 },
            _ => {}
        }
    }
    for i in 0..cfg.depth[2] {
        s.push(format!("blocks3.{i}.attn.relative_position_bias_table"), &[relative_table_len(cfg.grid()), cfg.num_heads], Init::Zeros);
        s.push(format!("blocks3.{i}.gamma_1"), &[d3], Init::Ones);
        s.push(format!("blocks3.{i}.gamma_2"), &[d3], Init::Ones);
    }
    s.conv("fpn.0", d3, d3, 3);
    s.batch_norm("fpn.1", d3);
    let inputs = SegmenterHead::in_channels(cfg);
    s.conv_seg("decode_head", c, k);
    for (i, _) in head.pool_scales.iter().enumerate() {
        s.conv_module(&format!("decode_head.psp_modules.{i}.1"), inputs[3], c, 1);
    }
    s.conv_module("decode_head.bottleneck", inputs[3] + head.pool_scales.len() * c, c, 3);
    for (i, &inp) in inputs[..3].iter().enumerate() {
        s.conv_module(&format!("decode_head.lateral_convs.{i}"), inp, c, 1);
    }
    for i in 0..3 {
        s.conv_module(&format!("decode_head.fpn_convs.{i}"), c, c, 3);
    }
    s.conv_module("decode_head.fpn_bottleneck", 4 * c, c, 3);
    s.conv_seg("auxiliary_head", head.aux_channels, k);
    s.conv_module("auxiliary_head.convs.0", inputs[2], head.aux_channels, 3);
    s.0
}

impl SpecList {
    /// A detectron2 `Conv2d` with a BatchNorm (`prefix.norm`; the conv has no bias then), init
    /// by `init`.
    fn conv_norm(&mut self, prefix: &str, inp: usize, out: usize, k: usize, init: Init) {
        self.push(format!("{prefix}.weight"), &[out, inp, k, k], init);
        self.batch_norm(&format!("{prefix}.norm"), out);
    }
    /// detectron2 `Conv2d` without a bias and with norm "LN" (ViTDet): weight + `.norm` LayerNorm.
    fn conv_layer_norm(&mut self, prefix: &str, inp: usize, out: usize, k: usize, init: Init) {
        self.push(format!("{prefix}.weight"), &[out, inp, k, k], init);
        self.layer_norm(&format!("{prefix}.norm"), out);
    }
    /// ConvTranspose2d(kernel 2, stride 2) at PyTorch's default init: weight [in, out, 2, 2]
    /// and bias, both U(+-1/sqrt(fan_in)) where torch counts fan_in from dim 1: out * 4.
    fn deconv_default(&mut self, prefix: &str, inp: usize, out: usize) {
        self.push(format!("{prefix}.weight"), &[inp, out, 2, 2], Init::ConvDefault { fan_in: out * 4 });
        self.push(format!("{prefix}.bias"), &[out], Init::ConvDefault { fan_in: out * 4 });
    }
    /// A conv with a bias, weight normal(std), bias 0 (the RPN's and the predictors' init).
    fn conv_normal(&mut self, prefix: &str, inp: usize, out: usize, k: usize, std: f64) {
        self.push(format!("{prefix}.weight"), &[out, inp, k, k], Init::Normal { std });
        self.push(format!("{prefix}.bias"), &[out], Init::Zeros);
    }
}

/// Every tensor of the official Mask R-CNN (DET/: detectron2 `GeneralizedRCNN` with the
/// `ConvViTDet` backbone, FPN, RPN and StandardROIHeads), under the checkpoint's names less the
/// `backbone.bottom_up.` prefix of the encoder's tensors (kept as the encoder's own names, so
/// pretraining and classifier checkpoints load as they are).
///
/// - `pos_embed` is at the detection grid and frozen (the official resizes the pretrained one
///   and, through a bug, freezes it: `build_2d_sincos_position_embedding` computes a table it
///   never assigns). A fresh one is the sin-cos table here; the official's fresh one would be
///   trunc_normal(0.02) noise, frozen, which is useless without a checkpoint.
/// - One relative position bias table for all windowed blocks and one for all global blocks.
/// - Init as detectron2's: FPN convs c2_xavier_fill, RPN convs normal(0.01), head convs and the
///   deconv c2_msra_fill (kaiming normal, fan_out), fc1 c2_xavier_fill, cls_score normal(0.01),
///   bbox_pred and the mask predictor normal(0.001), biases 0; BatchNorms (1, 0).
///
/// The Vitdet variant (Official-ConvMAE-Det, ViTDet's detectron2 names less `backbone.net.` for
/// the encoder's):
/// - `pos_embed` learnable at `head.pos_grid` (trunc_normal(0.02), as ConvViT inits it), resized
///   to the token grid in each forward;
/// - `blocks3.i.attn.rel_pos_h` / `rel_pos_w` [2 S - 1, head dim] per block (S the window, or the
///   grid in a global block), zero-init (`rel_pos_zero_init`);
/// - the simple feature pyramid `backbone.simfp_{2,3,4,5}`: deconvs and LayerNorms at PyTorch's
///   default init, convs without bias at `Conv2d`'s default init (ViTDet inits none of them);
/// - the heads' convs with a LayerNorm (`.norm`) in place of BatchNorm.
pub fn detector_param_specs(cfg: &ConvMaeConfig, head: &DetectorHead) -> Vec<ParamSpec> {
    let d3 = cfg.embed_dim[2];
    let grid = cfg.grid();
    let (c, k) = (head.channels, head.num_classes);
    let vitdet = head.variant == DetectorVariant::Vitdet;
    let mut s = SpecList(Vec::new());
    if vitdet {
        s.push("pos_embed".into(), &[1, head.pos_grid * head.pos_grid, d3], Init::TruncNormal { std: 0.02 });
    } else {
        s.frozen("pos_embed", &[1, cfg.num_tokens(), d3], Init::SinCos { dim: d3, grid });
    }
    s.patch_embeds(cfg);
    s.encoder_blocks(cfg);
    if vitdet {
        let head_dim = d3 / cfg.num_heads;
        for i in 0..cfg.depth[2] {
            let side = if head.global_blocks.contains(&i) { grid } else { head.window };
            for axis in ["h", "w"] {
                s.push(format!("blocks3.{i}.attn.rel_pos_{axis}"), &[2 * side - 1, head_dim], Init::Zeros);
            }
        }
        let conv = |fan_in: usize| Init::ConvDefault { fan_in };
        let (half, quarter) = (d3 / 2, d3 / 4);
        s.deconv_default("backbone.simfp_2.0", d3, half);
        s.layer_norm("backbone.simfp_2.1", half);
        s.deconv_default("backbone.simfp_2.3", half, quarter);
        s.deconv_default("backbone.simfp_3.0", d3, half);
        for (stage, first, inp) in [(2, 4, quarter), (3, 1, half), (4, 0, d3), (5, 1, d3)] {
            s.conv_layer_norm(&format!("backbone.simfp_{stage}.{first}"), inp, c, 1, conv(inp));
            s.conv_layer_norm(&format!("backbone.simfp_{stage}.{}", first + 1), c, c, 3, conv(c * 9));
        }
    } else {
        s.push("windowed_rel_pos_bias.relative_position_bias_table".into(), &[relative_table_len(head.window), cfg.num_heads], Init::Zeros);
        s.push("global_rel_pos_bias.relative_position_bias_table".into(), &[relative_table_len(grid), cfg.num_heads], Init::Zeros);
        let [d1, d2, _] = cfg.embed_dim;
        for (level, inp) in [(2, d1), (3, d2), (4, d3), (5, d3)] {
            s.conv_norm(&format!("backbone.fpn_lateral{level}"), inp, c, 1, Init::C2XavierFill { fan_in: inp });
            s.conv_norm(&format!("backbone.fpn_output{level}"), c, c, 3, Init::C2XavierFill { fan_in: c * 9 });
        }
    }
    // The heads' convs: BatchNorm (Det) or LayerNorm (Vitdet) after each.
    let head_conv = |s: &mut SpecList, prefix: &str| {
        let init = Init::KaimingNormalFanOut { fan_out: c * 9 };
        if vitdet {
            s.conv_layer_norm(prefix, c, c, 3, init);
        } else {
            s.conv_norm(prefix, c, c, 3, init);
        }
    };
    let anchors = head.anchors_per_position();
    for i in 0..head.rpn_convs {
        s.conv_normal(&format!("proposal_generator.rpn_head.conv.conv{i}"), c, c, 3, 0.01);
    }
    s.conv_normal("proposal_generator.rpn_head.objectness_logits", c, anchors, 1, 0.01);
    s.conv_normal("proposal_generator.rpn_head.anchor_deltas", c, 4 * anchors, 1, 0.01);
    for i in 1..=head.box_convs {
        head_conv(&mut s, &format!("roi_heads.box_head.conv{i}"));
    }
    let side = BOX_POOL_SIDE;
    let box_in = c * side * side;
    s.push("roi_heads.box_head.fc1.weight".into(), &[head.box_fc, box_in], Init::C2XavierFill { fan_in: box_in });
    s.push("roi_heads.box_head.fc1.bias".into(), &[head.box_fc], Init::Zeros);
    s.push("roi_heads.box_predictor.cls_score.weight".into(), &[k + 1, head.box_fc], Init::Normal { std: 0.01 });
    s.push("roi_heads.box_predictor.cls_score.bias".into(), &[k + 1], Init::Zeros);
    s.push("roi_heads.box_predictor.bbox_pred.weight".into(), &[4 * k, head.box_fc], Init::Normal { std: 0.001 });
    s.push("roi_heads.box_predictor.bbox_pred.bias".into(), &[4 * k], Init::Zeros);
    for i in 1..=head.mask_convs {
        head_conv(&mut s, &format!("roi_heads.mask_head.mask_fcn{i}"));
    }
    // ConvTranspose2d weight [in, out, 2, 2]; torch counts its fan_out from dim 0: in * 4.
    s.push("roi_heads.mask_head.deconv.weight".into(), &[c, c, 2, 2], Init::KaimingNormalFanOut { fan_out: c * 4 });
    s.push("roi_heads.mask_head.deconv.bias".into(), &[c], Init::Zeros);
    s.conv_normal("roi_heads.mask_head.predictor", c, k, 1, 0.001);
    s.0
}

/// Every tensor of `MaskedAutoencoderConvViT`, in the order of its state_dict.
pub fn pretrain_param_specs(cfg: &ConvMaeConfig) -> Vec<ParamSpec> {
    let [d1, d2, d3] = cfg.embed_dim;
    let (grid, tokens, dd) = (cfg.grid(), cfg.num_tokens(), cfg.decoder_embed_dim);
    let mut s = SpecList(Vec::new());
    s.frozen("pos_embed", &[1, tokens, d3], Init::SinCos { dim: d3, grid });
    s.push("mask_token".into(), &[1, 1, dd], Init::Normal { std: 0.02 });
    s.frozen("decoder_pos_embed", &[1, tokens, dd], Init::SinCos { dim: dd, grid });
    s.patch_embeds(cfg);
    s.conv("stage1_output_decode", d1, d3, cfg.stage_cell(0));
    s.conv("stage2_output_decode", d2, d3, cfg.stage_cell(1));
    s.encoder_blocks(cfg);
    s.layer_norm("norm", d3);
    s.linear("decoder_embed", d3, dd);
    for i in 0..cfg.decoder_depth {
        // The official decoder blocks use mlp_ratio[0] and always have a qkv bias.
        s.transformer_block(&format!("decoder_blocks.{i}"), dd, cfg.mlp_ratio[0], true);
    }
    s.layer_norm("decoder_norm", dd);
    s.linear("decoder_pred", dd, cfg.patch_values());
    s.0
}

/// Draws one tensor's initial values (in f64; callers cast).
pub fn init_values(spec: &ParamSpec, rng: &mut Rng) -> Vec<f64> {
    let n = spec.numel();
    match spec.init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::XavierUniform { fan_in, fan_out } => {
            let a = (6.0 / (fan_in + fan_out) as f64).sqrt();
            (0..n).map(|_| rng.uniform_range(-a, a)).collect()
        }
        Init::ConvDefault { fan_in } => {
            let a = 1.0 / (fan_in as f64).sqrt();
            (0..n).map(|_| rng.uniform_range(-a, a)).collect()
        }
        Init::Normal { std } => (0..n).map(|_| rng.normal() * std).collect(),
        Init::TruncNormal { std } => (0..n).map(|_| rng.trunc_normal(std)).collect(),
        Init::KaimingNormalFanOut { fan_out } => {
            let std = (2.0 / fan_out as f64).sqrt();
            (0..n).map(|_| rng.normal() * std).collect()
        }
        Init::C2XavierFill { fan_in } => {
            let a = (3.0 / fan_in as f64).sqrt();
            (0..n).map(|_| rng.uniform_range(-a, a)).collect()
        }
        Init::SinCos { dim, grid } => sincos_2d(dim, grid),
    }
}

/// One named tensor of a live model. Trainable tensors are candle `Var`s (autograd leaves);
/// frozen ones are plain tensors, so no gradient is computed for them.
#[derive(Clone)]
pub struct Param {
    pub spec: ParamSpec,
    pub var: Option<Var>,
    pub tensor: Tensor,
}

#[derive(Clone)]
pub struct ParamStore {
    params: Vec<Param>,
    index: HashMap<String, usize>,
    pub dtype: DType,
    pub device: Device,
    /// The compute copies of mixed precision, once a forward has asked for them (`compute_view`).
    /// Shared by clones, as the master tensors are (a `Var` clone is the same storage).
    shadow: Arc<Mutex<Option<Shadow>>>,
    /// In a compute view with `Packing::Sublayers`: each sublayer's packed copies, by
    /// `sublayer_pack_name` (empty otherwise).
    packed: HashMap<String, PackView>,
}

/// A sublayer's two packs as a compute view hands them to its one op, with a gradient sink of
/// this view's own: a view is made for one forward (`ConvMae::forward_pretrain`), so a sink
/// holds that forward's backward and no other.
#[derive(Clone)]
struct PackView {
    weights: Tensor,
    vectors: Tensor,
    sink: convmae_kernels::PackGradSink,
}

/// The packs of a compute view with their sinks (`ParamStore::pack_gradients`): after the
/// backward of the forward that used the view, `deliver` puts the gradients the packed ops left
/// in their sinks into the gradient store, where `ParamStore::gradients` finds them.
#[derive(Clone, Default)]
pub struct PackGradients(Vec<PackView>);

impl PackGradients {
    pub fn deliver(&self, grads: &mut candle_core::backprop::GradStore) -> candle_core::Result<()> {
        self.0.iter().try_for_each(|p| p.sink.deliver(&p.weights, &p.vectors, grads))
    }
}

/// Whether a compute view packs the copies of each transformer-style sublayer's parameters the
/// way its one op reads them (`convmae_kernels::PackedSublayer`): the pretraining model asks for
/// it where its sublayers run as one op (`ConvMae::sublayer_packing`: on CUDA); the classifier
/// (stochastic depth: separate ops) does not. With the packs a step skips two concatenations per sublayer in the forward and,
/// in the backward, the gradient node (a zero-fill and an add, candle's accumulation) of each
/// concatenation, reshape and copy. By the H100 profiles of benches/results/gpu-2026-11-26.md, a
/// sublayer's backward had 11 such adds in run 4 and 3 in run 7 (x and the two packs), and the
/// forward's 252 copies of the concatenations were gone. Since then the packs' gradients skip
/// candle's accumulation too (a view's `PackView` sinks: `convmae_kernels::PackGradSink`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    None,
    Sublayers,
}

/// The two sublayers of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SublayerKind {
    /// `norm1`, `attn.qkv`, `attn.proj` of a transformer block.
    Attention,
    /// `norm1`, `conv1`, the depthwise `attn` and `conv2` of a conv block (CBlock).
    Conv,
    /// `norm2`, `mlp.fc1`, `mlp.fc2` of any block.
    Mlp,
}

/// The pack of block `prefix`'s sublayer `kind` (`ParamStore::packed_sublayer`).
pub fn sublayer_pack_name(prefix: &str, kind: SublayerKind) -> String {
    format!("{prefix}:{kind:?}")
}

/// The members of a sublayer's two packs, in the op's order: the weights, then the vectors
/// (see `convmae_kernels::PackedSublayer`). None for a tensor the block does not have (a qkv
/// layer without bias), which packs as zeros of `len`.
fn sublayer_members(prefix: &str, kind: SublayerKind) -> (Vec<String>, Vec<String>) {
    let n = |names: &[&str]| names.iter().map(|s| format!("{prefix}.{s}")).collect::<Vec<_>>();
    match kind {
        SublayerKind::Attention => (n(&["attn.qkv.weight", "attn.proj.weight"]), n(&["norm1.weight", "norm1.bias", "attn.qkv.bias", "attn.proj.bias"])),
        // The depthwise conv's taps after conv2's weight, its bias after conv2's: the conv
        // op's packs (`convmae_kernels::conv_residual_packed`).
        SublayerKind::Conv => (n(&["conv1.weight", "conv2.weight", "attn.weight"]), n(&["norm1.weight", "norm1.bias", "conv1.bias", "conv2.bias", "attn.bias"])),
        SublayerKind::Mlp => (n(&["mlp.fc1.weight", "mlp.fc2.weight"]), n(&["norm2.weight", "norm2.bias", "mlp.fc1.bias", "mlp.fc2.bias"])),
    }
}

/// Where a packed tensor's compute copy lives: in pack `pack` (index into `Shadow::packs`),
/// weights or vectors, from `offset`.
#[derive(Clone, Copy, Debug)]
struct Member {
    pack: usize,
    vectors: bool,
    offset: usize,
}

/// A trainable tensor's compute copy, for the optimizers to read and write.
#[derive(Clone)]
pub enum ComputeCopy {
    /// An autograd leaf of its own.
    Leaf(Var),
    /// A slice of a sublayer's pack (`Packing::Sublayers`), which is the leaf.
    Packed { pack: Var, offset: usize, shape: Vec<usize> },
}

impl ComputeCopy {
    /// The copy as a tensor (a view, for a packed one): what the fused AdamW writes in place.
    pub fn tensor(&self) -> candle_core::Result<Tensor> {
        match self {
            Self::Leaf(v) => Ok(v.as_tensor().clone()),
            Self::Packed { pack, offset, shape } => pack.as_tensor().narrow(0, *offset, shape.iter().product())?.reshape(shape.as_slice()),
        }
    }

    /// Sets the copy to `master` rounded once to the copy's dtype.
    pub fn set_from(&self, master: &Tensor) -> candle_core::Result<()> {
        match self {
            Self::Leaf(v) => v.set(&master.to_dtype(v.dtype())?),
            Self::Packed { pack, offset, .. } => pack.as_tensor().slice_set(&master.flatten_all()?.to_dtype(pack.dtype())?, 0, *offset),
        }
    }
}

/// Mixed precision's compute copies: every tensor of a store in the compute dtype, the
/// trainable ones as autograd leaves of their own. The forward reads them with no cast node per
/// tensor, so the backward has none either: the gradients arrive at the copies, in the compute
/// dtype, and the optimizer reads them there. On a GPU that is 3 launches fewer per tensor per
/// step (the cast, its backward cast, the f32 accumulation), about 950 for convmae-base (run 1's profile: 629 casts, 322 f32 adds); the
/// values are the same, a bf16 gradient converted to f32 being exact. Whoever changes a master
/// tensor keeps its copy equal to it rounded once: `ParamStore::set`, and the optimizers after
/// each update (on CUDA the fused AdamW writes both in one pass).
struct Shadow {
    dtype: DType,
    packing: Packing,
    /// Per tensor of the store, in its order (a view of its pack, for a packed one).
    tensors: Vec<Tensor>,
    /// Per tensor: the copy's Var for trainable ones that are not packed.
    vars: Vec<Option<Var>>,
    /// Per tensor: where it is packed, if it is.
    members: Vec<Option<Member>>,
    /// The packs (weights, vectors), each an autograd leaf, with their names.
    packs: Vec<(String, Var, Var)>,
}

impl ParamStore {
    /// Builds the tensors of `specs` with values from `values(spec)` (f64, cast to `dtype`).
    pub fn build(
        specs: Vec<ParamSpec>,
        dtype: DType,
        device: &Device,
        mut values: impl FnMut(&ParamSpec) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Self> {
        let mut params = Vec::with_capacity(specs.len());
        let mut index = HashMap::new();
        for spec in specs {
            let t = values(&spec)?.to_dtype(dtype)?.to_device(device)?;
            let (var, tensor) = if spec.trainable {
                let v = Var::from_tensor(&t)?;
                let t = v.as_tensor().clone();
                (Some(v), t)
            } else {
                (None, t)
            };
            index.insert(spec.name.clone(), params.len());
            params.push(Param { spec, var, tensor });
        }
        Ok(Self { params, index, dtype, device: device.clone(), shadow: Arc::default(), packed: HashMap::new() })
    }

    /// Fresh weights with the official init, drawn from `seed`.
    pub fn init(specs: Vec<ParamSpec>, dtype: DType, device: &Device, seed: u64) -> candle_core::Result<Self> {
        let mut rng = Rng::new(seed);
        Self::build(specs, dtype, device, |spec| {
            Tensor::from_vec(init_values(spec, &mut rng), spec.shape.as_slice(), &Device::Cpu)
        })
    }

    /// The tensor named `name` (the model's own names; a missing one is a programming error).
    pub fn get(&self, name: &str) -> &Tensor {
        match self.index.get(name) {
            Some(&i) => &self.params[i].tensor,
            None => panic!("model has no tensor named '{name}'"),
        }
    }

    pub fn find(&self, name: &str) -> Option<&Param> {
        self.index.get(name).map(|&i| &self.params[i])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.params.iter()
    }

    pub fn trainable(&self) -> impl Iterator<Item = (&Param, &Var)> {
        self.params.iter().filter_map(|p| p.var.as_ref().map(|v| (p, v)))
    }

    /// The tensors as a forward under `precision` reads them, unpacked: this store itself for
    /// fp32 (or an f64 store), else its compute copies (`compute_view`). What the task models
    /// (classifier, segmenter, detector) compute with; the pretraining model may also pack.
    pub fn at_precision(&self, precision: crate::precision::Precision) -> candle_core::Result<std::borrow::Cow<'_, Self>> {
        let dtype = precision.compute_dtype(self.dtype);
        Ok(if dtype == self.dtype { std::borrow::Cow::Borrowed(self) } else { std::borrow::Cow::Owned(self.compute_view(dtype, Packing::None)?) })
    }

    /// The tensors as a forward in `dtype` reads them: this store itself when `dtype` is its own,
    /// else its compute copies in `dtype` (made on the first call, kept in step by `set` and the
    /// optimizers): a store whose trainable tensors are the copies' Vars. With
    /// `Packing::Sublayers` the copies of each sublayer whose tensors are all trainable are
    /// slices of two packs (`packed_sublayer`), the packs being the autograd leaves.
    pub fn compute_view(&self, dtype: DType, packing: Packing) -> candle_core::Result<Self> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        if crate::device::compute_copies_off() {
            // The A/B's other side: casts recorded by autograd, so the gradients flow back to
            // the masters through them, every forward.
            let params = self.params.iter().map(|p| Ok(Param { spec: p.spec.clone(), var: None, tensor: p.tensor.to_dtype(dtype)? })).collect::<candle_core::Result<_>>()?;
            return Ok(Self { params, index: self.index.clone(), dtype, device: self.device.clone(), shadow: Arc::default(), packed: HashMap::new() });
        }
        let mut shadow = self.shadow.lock().unwrap_or_else(|e| e.into_inner());
        if shadow.as_ref().is_none_or(|s| s.dtype != dtype || s.packing != packing) {
            *shadow = Some(self.make_shadow(dtype, packing)?);
        }
        let sh = shadow.as_ref().expect("made above");
        let params = self
            .params
            .iter()
            .zip(sh.tensors.iter().zip(&sh.vars))
            .map(|(p, (t, v))| Param { spec: p.spec.clone(), var: v.clone(), tensor: t.clone() })
            .collect();
        let packed = sh
            .packs
            .iter()
            .map(|(name, w, v)| (name.clone(), PackView { weights: w.as_tensor().clone(), vectors: v.as_tensor().clone(), sink: convmae_kernels::PackGradSink::new() }))
            .collect();
        Ok(Self { params, index: self.index.clone(), dtype, device: self.device.clone(), shadow: Arc::default(), packed })
    }

    /// The compute copies of every tensor in `dtype`, packed as `packing` says.
    fn make_shadow(&self, dtype: DType, packing: Packing) -> candle_core::Result<Shadow> {
        let mut members: Vec<Option<Member>> = vec![None; self.params.len()];
        let mut packs = Vec::new();
        if packing == Packing::Sublayers {
            for p in &self.params {
                let (prefix, kind) = match p.spec.name.strip_suffix(".norm1.weight") {
                    // A conv block's norm1 is followed by conv1, a transformer block's by attention.
                    Some(prefix) if self.index.contains_key(&format!("{prefix}.conv1.weight")) => (prefix, SublayerKind::Conv),
                    Some(prefix) => (prefix, SublayerKind::Attention),
                    None => match p.spec.name.strip_suffix(".norm2.weight") {
                        Some(prefix) => (prefix, SublayerKind::Mlp),
                        None => continue,
                    },
                };
                let (weights, vectors) = sublayer_members(prefix, kind);
                // Every tensor present must train (a frozen one has no gradient to take from a
                // pack), and all but the qkv bias must be present.
                let found = |name: &String| self.index.get(name).map(|&i| (i, self.params[i].var.is_some()));
                let optional = |name: &String| name.ends_with("attn.qkv.bias");
                if weights.iter().chain(&vectors).any(|name| match found(name) {
                    Some((_, trainable)) => !trainable,
                    None => !optional(name),
                }) {
                    continue;
                }
                let pack = packs.len();
                let mut parts: [Vec<Tensor>; 2] = [Vec::new(), Vec::new()];
                for (vectors_part, names) in [(false, &weights[..]), (true, &vectors[..])] {
                    let mut offset = 0;
                    for name in names {
                        let piece = match found(name) {
                            Some((i, _)) => {
                                members[i] = Some(Member { pack, vectors: vectors_part, offset });
                                self.params[i].tensor.detach().flatten_all()?.to_dtype(dtype)?
                            }
                            // The qkv layer without bias: zeros of its output width, which no
                            // optimizer touches.
                            None => Tensor::zeros(self.get(&weights[0]).dim(0)?, dtype, &self.device)?,
                        };
                        offset += piece.elem_count();
                        parts[vectors_part as usize].push(piece);
                    }
                }
                let [w, v] = parts;
                packs.push((sublayer_pack_name(prefix, kind), Var::from_tensor(&Tensor::cat(&w, 0)?)?, Var::from_tensor(&Tensor::cat(&v, 0)?)?));
            }
        }
        let mut tensors = Vec::with_capacity(self.params.len());
        let mut vars = Vec::with_capacity(self.params.len());
        for (p, member) in self.params.iter().zip(&members) {
            match member {
                Some(m) => {
                    let (_, w, v) = &packs[m.pack];
                    let pack = if m.vectors { v } else { w };
                    tensors.push(pack.as_tensor().narrow(0, m.offset, p.spec.numel())?.reshape(p.spec.shape.as_slice())?);
                    vars.push(None);
                }
                None => {
                    let t = p.tensor.detach().to_dtype(dtype)?;
                    let var = if p.var.is_some() { Some(Var::from_tensor(&t)?) } else { None };
                    tensors.push(var.as_ref().map_or(t, |v| v.as_tensor().clone()));
                    vars.push(var);
                }
            }
        }
        Ok(Shadow { dtype, packing, tensors, vars, members, packs })
    }

    /// In a compute view with `Packing::Sublayers`: block `prefix`'s sublayer `kind` as its one
    /// op reads it, if it is packed.
    pub fn packed_sublayer(&self, prefix: &str, kind: SublayerKind) -> Option<convmae_kernels::PackedSublayer<'_>> {
        self.packed.get(&sublayer_pack_name(prefix, kind)).map(|p| convmae_kernels::PackedSublayer { weights: &p.weights, vectors: &p.vectors, sink: Some(&p.sink) })
    }

    /// This view's packs and their gradient sinks, for after the backward (`PackGradients`).
    pub fn pack_gradients(&self) -> PackGradients {
        PackGradients(self.packed.values().cloned().collect())
    }

    /// The gradient of every trainable tensor from one backward, in `trainable()` order: what
    /// reached its master Var, its compute copy's (a slice of its pack's, for a packed one), or
    /// both (the classifier's head reads the masters, its encoder the copies), summed in the
    /// master dtype. A copy's gradient is in the compute dtype; the optimizers take either. A
    /// tensor no gradient reached is an error naming it.
    pub fn gradients(&self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<Vec<Tensor>> {
        self.trainable()
            .zip(self.trainable_shadows())
            .map(|((p, master), copy)| {
                let from_master = grads.get(master.as_tensor());
                let from_copy = match &copy {
                    Some(ComputeCopy::Leaf(v)) => grads.get(v.as_tensor()).cloned(),
                    Some(ComputeCopy::Packed { pack, offset, shape }) => match grads.get(pack.as_tensor()) {
                        Some(g) => Some(g.narrow(0, *offset, shape.iter().product())?.reshape(shape.as_slice())?),
                        None => None,
                    },
                    None => None,
                };
                match (from_master, from_copy) {
                    (Some(g), None) => Ok(g.clone()),
                    (None, Some(g)) => Ok(g),
                    (Some(g), Some(c)) => g + c.to_dtype(g.dtype())?,
                    (None, None) => Err(candle_core::Error::Msg(format!("no gradient reached '{}'", p.spec.name))),
                }
            })
            .collect()
    }

    /// The name of the first trainable tensor whose compute copy is not its master rounded once
    /// to the copy's dtype, bit for bit; None when all are (or there are no copies).
    pub fn stale_copy(&self) -> candle_core::Result<Option<String>> {
        for ((p, master), copy) in self.trainable().zip(self.trainable_shadows()) {
            let Some(copy) = copy else { continue };
            let copy = copy.tensor()?;
            let want = master.as_tensor().to_dtype(copy.dtype())?.to_dtype(DType::F32)?.flatten_all()?;
            let got = copy.to_dtype(DType::F32)?.flatten_all()?;
            // Both are bf16 values in f32, so equal bits are equal values; NaN never is.
            let differ = want.ne(&got)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
            if differ != 0.0 {
                return Ok(Some(p.spec.name.clone()));
            }
        }
        Ok(None)
    }

    /// The compute copies in `trainable()` order, or None where there are none.
    pub fn trainable_shadows(&self) -> Vec<Option<ComputeCopy>> {
        let shadow = self.shadow.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sh) = shadow.as_ref() else { return vec![None; self.trainable().count()] };
        (0..self.params.len())
            .filter(|&i| self.params[i].var.is_some())
            .map(|i| match (sh.members[i], &sh.vars[i]) {
                (Some(m), _) => {
                    let (_, w, v) = &sh.packs[m.pack];
                    Some(ComputeCopy::Packed { pack: if m.vectors { v.clone() } else { w.clone() }, offset: m.offset, shape: self.params[i].spec.shape.clone() })
                }
                (None, Some(var)) => Some(ComputeCopy::Leaf(var.clone())),
                (None, None) => None,
            })
            .collect()
    }

    /// Replaces a tensor's values (shape-checked by the caller); keeps Var identity for the optimizer.
    pub fn set(&mut self, name: &str, value: &Tensor) -> candle_core::Result<()> {
        let i = *self.index.get(name).ok_or_else(|| candle_core::Error::Msg(format!("model has no tensor named '{name}'")))?;
        let value = value.to_dtype(self.dtype)?.to_device(&self.device)?;
        let p = &mut self.params[i];
        match &p.var {
            Some(v) => v.set(&value)?,
            None => p.tensor = value.clone(),
        }
        // The compute copy follows, rounded once from the new master value.
        let mut shadow = self.shadow.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sh) = shadow.as_mut() {
            let copy = value.to_dtype(sh.dtype)?;
            match (sh.members[i], &sh.vars[i]) {
                (Some(m), _) => {
                    let (_, w, v) = &sh.packs[m.pack];
                    let pack = if m.vectors { v } else { w };
                    pack.as_tensor().slice_set(&copy.flatten_all()?, 0, m.offset)?;
                }
                (None, Some(v)) => v.set(&copy)?,
                (None, None) => sh.tensors[i] = copy,
            }
        }
        Ok(())
    }
}
