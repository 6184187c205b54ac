//! Semantic segmentation on a ConvMAE backbone, as the official `SEG/` code builds it (spec
//! section 7): mmseg's `EncoderDecoder` with
//!
//! - the `ConvMAE` backbone: the encoder, with a layer scale (`gamma_1`, `gamma_2`) and a
//!   relative position bias table per stage-3 block, LayerNorm eps 1e-5 in those blocks, and a
//!   stride-32 level `fpn` = Conv2d(3x3, stride 2, no padding) -> BatchNorm -> GELU;
//! - `UPerHead` on the four levels (stride 4, 8, 16, 32): a pyramid pooling module on the last,
//!   lateral 1x1 ConvModules, a top-down sum, 3x3 ConvModules, all levels upsampled to stride 4,
//!   concatenated and fused, then Dropout2d and the 1x1 classifier;
//! - the auxiliary `FCNHead` on the stride-16 level (one 3x3 ConvModule, Dropout2d, 1x1
//!   classifier), its loss weighted 0.4.
//!
//! Feature maps are channels-last, [B, H, W, C], as the encoder's: a conv is a matmul over the
//! rows of its k x k neighbourhoods (`convmae_kernels::unfold`, then `linear`), which on the CPU
//! runs several times faster than candle's conv2d, backward included. BatchNorm (SyncBN:
//! statistics over the whole batch) uses the batch's statistics in training and the running ones
//! in evaluation. Bilinear resizing (align_corners=False) and adaptive average pooling are exact
//! linear maps per axis, computed as two matmuls with the interpolation (pooling) matrix, which
//! also gives their backward.

use super::classifier::{draw_drop_path, BatchStats, Mode, PROBE_BN_MOMENTUM};
use super::encoder_stem;
use super::layers::*;
use crate::config::ConvMaeConfig;
use crate::params::{segmenter_param_specs, ParamStore};
use crate::precision::Precision;
use crate::rng::Rng;
use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use convmae_kernels as k;
use serde::{Deserialize, Serialize};

/// LayerNorm eps of the segmentation backbone's stage-3 blocks: the SEG config passes no eps-1e-6
/// norm layer, so they are plain `nn.LayerNorm` (spec section 7, "LN eps quirk").
pub const SEG_LN_EPS: f64 = 1e-5;
/// BatchNorm eps (mmcv's SyncBN default).
pub const BN_EPS: f64 = 1e-5;
/// Label value that no loss or metric counts (mmseg's ignore_index; ADE20K's "other" after
/// reduce_zero_label).
pub const IGNORE_LABEL: u8 = 255;

/// The task-specific part of the segmenter (official `upernet_convmae_base_512_slide_160k_ade20k`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmenterHead {
    pub num_classes: usize,
    /// Width of UPerHead's convs (`channels`, 768).
    pub channels: usize,
    /// Width of the auxiliary FCNHead's conv (256).
    pub aux_channels: usize,
    /// Output sides of the pyramid pooling module (1, 2, 3, 6).
    pub pool_scales: Vec<usize>,
    /// Dropout2d before each classifier (0.1).
    pub dropout: f64,
    /// Largest stochastic depth rate of the backbone (0.2); rates rise linearly over all blocks.
    pub drop_path: f64,
    /// Weight of the auxiliary head's loss (0.4).
    pub aux_weight: f64,
}

impl Default for SegmenterHead {
    fn default() -> Self {
        Self { num_classes: 150, channels: 768, aux_channels: 256, pool_scales: vec![1, 2, 3, 6], dropout: 0.1, drop_path: 0.2, aux_weight: 0.4 }
    }
}

impl SegmenterHead {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let fail = |msg: String| Err(format!("invalid segmenter head: {msg}"));
        if self.num_classes == 0 || self.num_classes > IGNORE_LABEL as usize {
            return fail(format!("num_classes must be in 1..=255 (label 255 is ignored), got {}", self.num_classes));
        }
        if self.channels == 0 || self.aux_channels == 0 {
            return fail(format!("channels ({}) and aux_channels ({}) must be positive", self.channels, self.aux_channels));
        }
        if self.pool_scales.is_empty() || self.pool_scales.contains(&0) {
            return fail(format!("pool_scales must be positive sides, got {:?}", self.pool_scales));
        }
        for (name, v) in [("dropout", self.dropout), ("drop_path", self.drop_path)] {
            if !(0.0..1.0).contains(&v) {
                return fail(format!("{name} must be in [0, 1), got {v}"));
            }
        }
        if !(self.aux_weight.is_finite() && self.aux_weight >= 0.0) {
            return fail(format!("aux_weight must be a non-negative number, got {}", self.aux_weight));
        }
        Ok(())
    }

    /// Channels of the four levels UPerHead reads: stage 1, stage 2, stage 3, `fpn` (stage 3's width).
    pub fn in_channels(cfg: &ConvMaeConfig) -> [usize; 4] {
        let [d1, d2, d3] = cfg.embed_dim;
        [d1, d2, d3, d3]
    }
}

/// Entries of a relative position bias table on a `grid` x `grid` token window: (2g - 1)^2.
pub fn relative_table_len(grid: usize) -> usize {
    (2 * grid - 1) * (2 * grid - 1)
}

/// BEiT's `relative_position_index` without class token, [N * N] row-major for N = grid^2 tokens:
/// the table row of query i and key j is (dy + g - 1) * (2g - 1) + (dx + g - 1), where (dy, dx)
/// is i's (row, col) minus j's.
pub fn relative_position_index(grid: usize) -> Vec<u32> {
    let n = grid * grid;
    let span = 2 * grid - 1;
    let mut index = Vec::with_capacity(n * n);
    for i in 0..n {
        for j in 0..n {
            let dy = (i / grid) as isize - (j / grid) as isize + grid as isize - 1;
            let dx = (i % grid) as isize - (j % grid) as isize + grid as isize - 1;
            index.push((dy as usize * span + dx as usize) as u32);
        }
    }
    index
}

/// The [out, in] matrix of 1-D linear interpolation as torch's `interpolate(mode='bilinear',
/// align_corners=False)` computes it along one axis from the sizes alone: source coordinate
/// `max((o + 0.5) * in / out - 0.5, 0)`, its floor and the next sample (clamped to the edge),
/// weighted by distance.
pub fn bilinear_matrix(inp: usize, out: usize) -> Vec<f64> {
    let mut m = vec![0.0; out * inp];
    let scale = inp as f64 / out as f64;
    for o in 0..out {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        let lambda = src - i0 as f64;
        m[o * inp + i0] += 1.0 - lambda;
        m[o * inp + i1] += lambda;
    }
    m
}

/// The [out, in] matrix of torch's `AdaptiveAvgPool` along one axis: output o averages inputs
/// floor(o * in / out) .. ceil((o + 1) * in / out).
pub fn adaptive_pool_matrix(inp: usize, out: usize) -> Vec<f64> {
    let mut m = vec![0.0; out * inp];
    for o in 0..out {
        let start = o * inp / out;
        let end = ((o + 1) * inp).div_ceil(out);
        for i in start..end {
            m[o * inp + i] = 1.0 / (end - start) as f64;
        }
    }
    m
}

/// `rows` [Ho, H] and `cols` [Wo, W] applied to the H and W dims of `x` [B, H, W, C]: the
/// separable linear map of a resize or a pooling, as two left multiplications.
fn separable(x: &Tensor, rows: Vec<f64>, cols: Vec<f64>, out: (usize, usize)) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let rows = Tensor::from_vec(rows, (out.0, h), x.device())?.to_dtype(x.dtype())?;
    let cols = Tensor::from_vec(cols, (out.1, w), x.device())?.to_dtype(x.dtype())?;
    let x = rows.broadcast_matmul(&x.reshape((b, h, w * c))?)?;
    cols.broadcast_matmul(&x.reshape((b * out.0, w, c))?)?.reshape((b, out.0, out.1, c))
}

/// mmseg's `resize(x, size, mode='bilinear', align_corners=False)` of [B, H, W, C].
pub fn resize_bilinear(x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    if (h, w) == size {
        return Ok(x.clone());
    }
    separable(x, bilinear_matrix(h, size.0), bilinear_matrix(w, size.1), size)
}

/// `nn.AdaptiveAvgPool2d(side)` of [B, H, W, C].
pub fn adaptive_avg_pool(x: &Tensor, side: usize) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    separable(x, adaptive_pool_matrix(h, side), adaptive_pool_matrix(w, side), (side, side))
}

/// The batch statistics of one BatchNorm in a training forward, by its prefix.
pub struct NormStats {
    pub prefix: String,
    pub stats: BatchStats,
}

/// What a forward computes besides its logits, and the randomness it draws from (the
/// segmenter's and the detector's).
pub(super) struct Forward<'a> {
    /// The tensors the network computes with: the masters, or their bf16 compute copies
    /// (`ParamStore::at_precision`).
    pub params: &'a ParamStore,
    /// The master tensors: BatchNorm's affine weights and running statistics, which stay in the
    /// masters' dtype under bf16.
    pub masters: &'a ParamStore,
    pub training: bool,
    pub rng: Option<&'a mut Rng>,
    pub dropout: f64,
    pub norm_stats: Vec<NormStats>,
}

impl Forward<'_> {
    /// BatchNorm2d over [B, H, W, C]: batch statistics (biased variance) in training, recorded
    /// for the running averages; the running ones in evaluation. It computes in the masters'
    /// dtype, with the master affine weights, and returns `x`'s dtype: under bf16 its statistics
    /// are f32 sums over every position of the batch (as AMP keeps BatchNorm in f32), which bf16's
    /// 8-bit mantissa could not hold.
    pub fn batch_norm(&mut self, prefix: &str, x: &Tensor) -> Result<Tensor> {
        let compute = x.dtype();
        self.batch_norm_in_master_dtype(prefix, &x.to_dtype(self.masters.dtype)?)?.to_dtype(compute)
    }

    fn batch_norm_in_master_dtype(&mut self, prefix: &str, x: &Tensor) -> Result<Tensor> {
        let p = self.masters;
        let (b, h, w, c) = x.dims4()?;
        // Our BatchNorm op is the CPU's; a CUDA model (and the composite path, `with_path`)
        // takes candle's ops below.
        if self.training && x.device().is_cpu() && k::has_kernel(x) {
            if b * h * w < 2 {
                return Err(candle_core::Error::Msg(format!(
                    "{prefix}: BatchNorm in training needs more than one value per channel, got a {h}x{w} map of {b} image(s) (use a batch of at least 2 images)"
                )));
            }
            // One op with its own backward (convmae_kernels::batch_norm); the statistics again,
            // detached, for the running averages.
            let (mean, var_unbiased) = k::batch_norm_stats(x)?;
            self.norm_stats.push(NormStats { prefix: prefix.to_string(), stats: BatchStats { mean, var_unbiased } });
            return k::batch_norm_train(x, p.get(&format!("{prefix}.weight")), p.get(&format!("{prefix}.bias")), BN_EPS);
        }
        let (mean, var) = if self.training {
            let count = b * h * w;
            if count < 2 {
                return Err(candle_core::Error::Msg(format!(
                    "{prefix}: BatchNorm in training needs more than one value per channel, got a {h}x{w} map of {b} image(s) (use a batch of at least 2 images)"
                )));
            }
            let mean = x.sum_keepdim(vec![0, 1, 2])?.affine(1.0 / count as f64, 0.0)?;
            let sum_sq = x.broadcast_sub(&mean)?.sqr()?.sum_keepdim(vec![0, 1, 2])?;
            let var = sum_sq.affine(1.0 / count as f64, 0.0)?;
            let stats = BatchStats { mean: mean.flatten_all()?, var_unbiased: sum_sq.affine(1.0 / (count - 1) as f64, 0.0)?.flatten_all()? };
            self.norm_stats.push(NormStats { prefix: prefix.to_string(), stats });
            (mean, var)
        } else {
            let running = |name: &str| p.get(&format!("{prefix}.{name}")).reshape((1, 1, 1, c));
            (running("running_mean")?, running("running_var")?)
        };
        let shape = (1, 1, 1, c);
        let weight = p.get(&format!("{prefix}.weight")).reshape(shape)?;
        let bias = p.get(&format!("{prefix}.bias")).reshape(shape)?;
        let inv_std = (var + BN_EPS)?.sqrt()?.recip()?;
        x.broadcast_sub(&mean)?.broadcast_mul(&inv_std.broadcast_mul(&weight)?)?.broadcast_add(&bias)
    }

    /// mmcv ConvModule: conv (no bias; stride 1, `k / 2` padding) -> BatchNorm -> ReLU.
    fn conv_module(&mut self, prefix: &str, x: &Tensor) -> Result<Tensor> {
        let weight = self.params.get(&format!("{prefix}.conv.weight"));
        let y = conv2d(x, weight, None, 1, weight.dim(2)? / 2)?;
        self.batch_norm(&format!("{prefix}.bn"), &y)?.relu()
    }

    /// Dropout2d (whole channels of a sample zeroed with probability `dropout`, the rest scaled by
    /// 1 / (1 - dropout)) in training, then the 1x1 classifier `prefix.conv_seg`.
    fn classify(&mut self, prefix: &str, x: &Tensor) -> Result<Tensor> {
        let x = match (&mut self.rng, self.training && self.dropout > 0.0) {
            (Some(rng), true) => {
                let (b, _, _, c) = x.dims4()?;
                let keep = 1.0 - self.dropout;
                let scales: Vec<f64> = (0..b * c).map(|_| if rng.uniform() < self.dropout { 0.0 } else { 1.0 / keep }).collect();
                let scales = Tensor::from_vec(scales, (b, 1, 1, c), x.device())?.to_dtype(x.dtype())?;
                x.broadcast_mul(&scales)?
            }
            _ => x.clone(),
        };
        let p = self.params;
        conv2d(&x, p.get(&format!("{prefix}.conv_seg.weight")), Some(p.get(&format!("{prefix}.conv_seg.bias"))), 1, 0)
    }
}

/// Conv2d of channels-last `x` [B, H, W, C] with a PyTorch-layout kernel [O, C, k, k], zero
/// padding `pad`, optional bias: [B, Ho, Wo, O]. A 1x1 conv is a matmul over positions; a k x k
/// conv one over the rows of `unfold` against the kernel's rows (the same (row, column,
/// channel) order).
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, pad: usize) -> Result<Tensor> {
    let (o, c, k, _) = weight.dims4()?;
    if x.dim(3)? != c {
        candle_core::bail!("conv2d: kernel {:?} does not take the input's {} channels", weight.dims(), x.dim(3)?);
    }
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = Tensor::zeros(o, weight.dtype(), weight.device())?;
            &zeros
        }
    };
    if k == 1 && stride == 1 && pad == 0 {
        return k::linear(x, weight, bias);
    }
    k::linear(&k::unfold(x, k, stride, pad)?, &k::conv_weight_rows(weight)?, bias)
}

/// Multi-head self-attention with BEiT's relative position bias added to the logits:
/// softmax(q k^T * scale + bias) v, then the output projection. `table` [(2g - 1)^2, heads]
/// indexed by `rel_index` [N * N] u32.
pub(super) fn attention_with_bias(p: &ParamStore, block: &str, x: &Tensor, num_heads: usize, table: &Tensor, rel_index: &Tensor) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    let hd = d / num_heads;
    let qkv = linear_p(p, &format!("{block}.attn.qkv"), x)?.reshape((b, n, 3, num_heads, hd))?.permute((2, 0, 3, 1, 4))?;
    let q = (qkv.i(0)?.contiguous()? * (hd as f64).powf(-0.5))?;
    let key = qkv.i(1)?.contiguous()?;
    let v = qkv.i(2)?.contiguous()?;
    let bias = table.index_select(rel_index, 0)?.reshape((n, n, num_heads))?.permute((2, 0, 1))?;
    let logits = q.matmul(&key.t()?)?.broadcast_add(&bias.unsqueeze(0)?)?;
    let attn = k::softmax_last_dim(&logits.contiguous()?)?;
    let y = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
    linear_p(p, &format!("{block}.attn.proj"), &y)
}

/// The SEG backbone's stage-3 Block: x + drop(gamma_1 * attn(LN(x))), x + drop(gamma_2 *
/// mlp(LN(x))); LayerNorm eps 1e-5.
fn seg_transformer_block(p: &ParamStore, prefix: &str, x: &Tensor, num_heads: usize, rel_index: &Tensor, drop: Option<&DropPath>) -> Result<Tensor> {
    let get = |name: &str| p.get(&format!("{prefix}.{name}"));
    // The branch times its layer scale, then (stochastic depth) its per-sample scale, added.
    let h = layer_norm_p(p, &format!("{prefix}.norm1"), x, SEG_LN_EPS)?;
    let table = get("attn.relative_position_bias_table");
    let attn = attention_with_bias(p, prefix, &h, num_heads, table, rel_index)?.broadcast_mul(get("gamma_1"))?;
    let x = residual(x, attn, drop.map(|d| &d.first))?;
    let h = layer_norm_p(p, &format!("{prefix}.norm2"), &x, SEG_LN_EPS)?;
    let h = linear_p(p, &format!("{prefix}.mlp.fc2"), &linear_gelu_p(p, &format!("{prefix}.mlp.fc1"), &h)?)?;
    residual(&x, h.broadcast_mul(get("gamma_2"))?, drop.map(|d| &d.second))
}

/// What a segmenter forward returns.
pub struct SegmenterOutput {
    /// UPerHead's logits [B, H/4, W/4, K], in the masters' dtype.
    pub logits: Tensor,
    /// The auxiliary FCNHead's logits [B, H/16, W/16, K].
    pub aux_logits: Tensor,
    /// Each BatchNorm's batch statistics, in training (empty in evaluation).
    pub norm_stats: Vec<NormStats>,
}

pub struct Segmenter {
    pub cfg: ConvMaeConfig,
    pub head: SegmenterHead,
    pub params: ParamStore,
    /// fp32 (the default), or bf16: the backbone and the heads on bf16 copies of the weights,
    /// BatchNorm and the losses in f32 (`Forward::batch_norm`, `forward`).
    pub precision: Precision,
    /// `relative_position_index` of the stage-3 grid (a buffer shared by every block).
    rel_index: Tensor,
}

impl Segmenter {
    pub fn new(cfg: ConvMaeConfig, head: SegmenterHead, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        head.validate().map_err(candle_core::Error::Msg)?;
        if cfg.grid() < 3 {
            return Err(candle_core::Error::Msg(format!(
                "invalid config: the segmenter's stride-32 level (a 3x3 conv, stride 2, no padding, on the stride-16 map) needs img_size >= 48, got {}",
                cfg.img_size
            )));
        }
        let params = ParamStore::init(segmenter_param_specs(&cfg, &head), dtype, device, seed)?;
        let index = relative_position_index(cfg.grid());
        let rel_index = Tensor::from_vec(index.clone(), index.len(), device)?;
        Ok(Self { cfg, head, params, precision: Precision::Fp32, rel_index })
    }

    pub fn dtype(&self) -> DType {
        self.params.dtype
    }

    /// The dtype the network computes in.
    pub fn compute_dtype(&self) -> DType {
        self.precision.compute_dtype(self.dtype())
    }

    pub fn device(&self) -> &Device {
        &self.params.device
    }

    /// The backbone's four levels [B, H, W, C] (strides 4, 8, 16, 32) for normalized
    /// channels-last images [B, H, W, 3].
    fn backbone(&self, f: &mut Forward, imgs: &Tensor, drop: Option<&[DropPath]>) -> Result<[Tensor; 4]> {
        let (cfg, p) = (&self.cfg, f.params);
        let conv_blocks = cfg.depth[0] + cfg.depth[1];
        let (stage1, stage2, mut x) = encoder_stem(cfg, p, imgs, drop, CONV_LN_EPS, p.get("pos_embed"))?;
        let b = imgs.dim(0)?;
        for i in 0..cfg.depth[2] {
            x = seg_transformer_block(p, &format!("blocks3.{i}"), &x, cfg.num_heads, &self.rel_index, drop.map(|d| &d[conv_blocks + i]))?;
        }
        let g = cfg.grid();
        let stage3 = x.reshape((b, g, g, cfg.embed_dim[2]))?;
        let stride32 = conv2d(&stage3, p.get("fpn.0.weight"), Some(p.get("fpn.0.bias")), 2, 0)?;
        let stride32 = f.batch_norm("fpn.1", &stride32)?.apply(&k::gelu_erf)?;
        Ok([stage1, stage2, stage3, stride32])
    }

    /// UPerHead on the four levels: logits at the first level's size.
    fn decode_head(&self, f: &mut Forward, levels: &[Tensor; 4]) -> Result<Tensor> {
        let top = &levels[3];
        let (_, th, tw, _) = top.dims4()?;
        // Pyramid pooling on the top level, concatenated with it and fused.
        let mut pyramid = vec![top.clone()];
        for (i, &side) in self.head.pool_scales.iter().enumerate() {
            let pooled = f.conv_module(&format!("decode_head.psp_modules.{i}.1"), &adaptive_avg_pool(top, side)?)?;
            pyramid.push(resize_bilinear(&pooled, (th, tw))?);
        }
        let psp = f.conv_module("decode_head.bottleneck", &Tensor::cat(&pyramid, 3)?)?;
        let mut laterals = Vec::with_capacity(4);
        for (i, level) in levels[..3].iter().enumerate() {
            laterals.push(f.conv_module(&format!("decode_head.lateral_convs.{i}"), level)?);
        }
        laterals.push(psp);
        // Top-down: each level plus the (already summed) level above, upsampled to its size.
        for i in (1..4).rev() {
            let (_, h, w, _) = laterals[i - 1].dims4()?;
            laterals[i - 1] = (&laterals[i - 1] + resize_bilinear(&laterals[i], (h, w))?)?;
        }
        let (_, h0, w0, _) = laterals[0].dims4()?;
        let mut outs = Vec::with_capacity(4);
        for (i, lateral) in laterals[..3].iter().enumerate() {
            let out = f.conv_module(&format!("decode_head.fpn_convs.{i}"), lateral)?;
            outs.push(resize_bilinear(&out, (h0, w0))?);
        }
        outs.push(resize_bilinear(&laterals[3], (h0, w0))?);
        let fused = f.conv_module("decode_head.fpn_bottleneck", &Tensor::cat(&outs, 3)?)?;
        f.classify("decode_head", &fused)
    }

    /// Logits of both heads, in the masters' dtype, for normalized channels-last images
    /// [B, H, W, 3]. In training (`Mode::Train`) stochastic depth and Dropout2d draw from the
    /// generator and BatchNorm uses (and returns) the batch's statistics.
    pub fn forward(&self, imgs: &Tensor, mode: &mut Mode) -> Result<SegmenterOutput> {
        let params = self.params.at_precision(self.precision)?;
        let imgs = imgs.to_dtype(params.dtype)?;
        let (training, mut rng) = match mode {
            Mode::Train(rng) => (true, Some(&mut **rng)),
            Mode::Eval => (false, None),
        };
        let drop = match rng.as_deref_mut() {
            Some(rng) => draw_drop_path(&self.cfg, self.head.drop_path, imgs.dim(0)?, params.dtype, self.device(), rng)?,
            None => None,
        };
        let mut f = Forward { params: &params, masters: &self.params, training, rng, dropout: self.head.dropout, norm_stats: Vec::new() };
        let levels = self.backbone(&mut f, &imgs, drop.as_deref())?;
        let logits = self.decode_head(&mut f, &levels)?;
        let aux = f.conv_module("auxiliary_head.convs.0", &levels[2])?;
        let aux_logits = f.classify("auxiliary_head", &aux)?;
        // The losses, the upsampling to the labels' size and the argmax read f32 under bf16, as
        // autocast computes its losses in f32.
        let (logits, aux_logits) = (logits.to_dtype(self.dtype())?, aux_logits.to_dtype(self.dtype())?);
        Ok(SegmenterOutput { logits, aux_logits, norm_stats: f.norm_stats })
    }

    /// Folds a training forward's BatchNorm statistics into the running averages.
    pub fn update_running_stats(&mut self, stats: &[NormStats]) -> Result<()> {
        fold_running_stats(&mut self.params, stats)
    }
}

/// Folds BatchNorm batch statistics into the running averages (torch: `running = (1 -
/// momentum) * running + momentum * batch`, unbiased variance).
pub(crate) fn fold_running_stats(params: &mut ParamStore, stats: &[NormStats]) -> Result<()> {
    let m = PROBE_BN_MOMENTUM;
    for NormStats { prefix, stats } in stats {
        for (name, batch) in [("running_mean", &stats.mean), ("running_var", &stats.var_unbiased)] {
            let name = format!("{prefix}.{name}");
            let updated = ((params.get(&name) * (1.0 - m))? + (batch.detach() * m)?)?;
            params.set(&name, &updated)?;
        }
    }
    Ok(())
}

/// mmseg 0.11's decode loss: `logits` [B, h, w, K] upsampled (bilinear) to the labels' size,
/// per-pixel cross-entropy with label 255 contributing 0, averaged over **all** pixels, ignored
/// ones included (`weight_reduce_loss` with no avg_factor; `avg_non_ignore` came later).
/// `labels`: [B * H * W] row-major.
pub fn segmentation_loss(logits: &Tensor, labels: &[u8], size: (usize, usize)) -> Result<Tensor> {
    let (b, _, _, kk) = logits.dims4()?;
    let pixels = b * size.0 * size.1;
    if labels.len() != pixels {
        return Err(candle_core::Error::Msg(format!("labels: expected {b} x {} x {} = {pixels} values, got {}", size.0, size.1, labels.len())));
    }
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l != IGNORE_LABEL && l as usize >= kk) {
        return Err(candle_core::Error::Msg(format!("labels: value {l} at pixel {i} is out of range for {kk} classes (255 = ignore)")));
    }
    let up = resize_bilinear(logits, size)?.reshape((pixels, kk))?;
    let max = up.max_keepdim(D::Minus1)?.detach();
    let shifted = up.broadcast_sub(&max)?;
    let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    let index: Vec<u32> = labels.iter().map(|&l| if l == IGNORE_LABEL { 0 } else { l as u32 }).collect();
    let counted: Vec<f64> = labels.iter().map(|&l| if l == IGNORE_LABEL { 0.0 } else { 1.0 }).collect();
    let index = Tensor::from_vec(index, (pixels, 1), logits.device())?;
    let counted = Tensor::from_vec(counted, (pixels, 1), logits.device())?.to_dtype(logits.dtype())?;
    let picked = log_probs.gather(&index, 1)?;
    (picked * counted)?.sum_all()? / -(pixels as f64)
}
