//! The ConvMAE pretraining model (`MaskedAutoencoderConvViT`), computed as the official code does.

pub mod classifier;
pub mod layers;
pub mod detector;
pub mod segmenter;
pub mod vitdet;

/// Side of the conv blocks' depthwise kernel (`attn`: Conv2d(d, d, 5, padding=2, groups=d)).
pub const DW_KERNEL: usize = 5;

use crate::config::ConvMaeConfig;
use crate::loss;
use crate::masking::Masking;
use crate::params::{pretrain_param_specs, PackGradients, Packing, ParamStore};
use candle_core::{DType, Device, Result, Tensor};
use convmae_kernels::tape::{self, Tape};
use convmae_kernels::{SparseNeighbors, VisibleTokens};
use layers::*;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::sync::Arc;
pub use crate::precision::Precision;

/// How stages 1-2 are computed in pretraining. Both give the same loss and gradients (spec
/// section 2: masked positions never reach the loss); `Dense` is the official code's way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvPath {
    /// Every position of the [B, H, W, C] maps, the depthwise conv input multiplied by the mask.
    Dense,
    /// Only the visible positions (25% at mask ratio 0.75), as rows; no dense map exists.
    Sparse,
}

impl ConvPath {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "dense" => Ok(Self::Dense),
            "sparse" => Ok(Self::Sparse),
            other => Err(format!("path must be 'sparse' or 'dense', got '{other}'")),
        }
    }
}

pub struct ConvMae {
    pub cfg: ConvMaeConfig,
    pub params: ParamStore,
    pub path: ConvPath,
    /// Dtype of activations and matmuls; the parameters (master weights) keep theirs.
    pub precision: Precision,
    /// How the bf16 compute copies are packed (`ParamStore::compute_view`). None (the default):
    /// each sublayer's copies packed where its one op runs on them (our kernels serve the compute
    /// dtype on the model's device: CUDA), not packed elsewhere, where the sublayers would run as
    /// their separate ops on views of the packs (on 2 CPU cores at convmae-tiny batch 8 in bf16,
    /// 60 against 56 ms a step: benches/results/packing-cpu-2026-11-26.md). Some(..) forces a
    /// packing (the tests, to cover the packed path on the CPU).
    pub sublayer_packing: Option<Packing>,
}

/// The encoder's stage-1/2 results that stage 3 and the decoder need.
struct ConvStagesOut {
    /// [B, len_keep, D3]: patch_embed3 + patch_embed4 + pos_embed at the visible tokens.
    tokens: Tensor,
    /// Fusion inputs at the visible tokens, [B, len_keep, D3] each.
    s1: Tensor,
    s2: Tensor,
    stage1: Tensor,
    stage2: Tensor,
}

/// Everything one pretraining forward computes; the fixtures compare each of these.
pub struct PretrainOutput {
    /// Scalar loss (rank 0).
    pub loss: Tensor,
    /// [B, L, 16*16*C] decoder prediction, in the compute dtype (bf16 under bf16 precision).
    pub pred: Tensor,
    /// [B, L], 1 = masked.
    pub mask: Tensor,
    /// [B, len_keep, D3] encoder output after fusion and `norm`.
    pub latent: Tensor,
    /// Stage outputs after the last conv block: channels-last [B, H, W, C] on the dense path;
    /// on the sparse path the visible token blocks [B * len_keep, cell, cell, C] in ids_keep order.
    pub stage1: Tensor,
    pub stage2: Tensor,
    /// Output of the last stage-3 block on the visible tokens, before fusion.
    pub stage3_tokens: Tensor,
    /// The packed sublayers' gradient sinks (`ParamStore::pack_gradients`): `backward` delivers them.
    pub pack_grads: PackGradients,
    /// The forward's ops as recorded (`convmae_kernels::tape`), for a backward without candle's
    /// zero-filled gradients; None where `CONVMAE_COMPOSITE_OPS` lists `tape_backward`.
    pub tape: Option<Tape>,
}

impl PretrainOutput {
    /// The gradients of `root` (this output's loss, or a function of it), with the packed
    /// sublayers' from their sinks: what `ParamStore::gradients` reads. A bare
    /// `loss.backward()` lacks the packs' gradients where the sublayers ran as one op each.
    /// For the loss itself by the tape where it covers the graph (see `backward_scaled`).
    pub fn backward(&self, root: &Tensor) -> Result<candle_core::backprop::GradStore> {
        if root.id() == self.loss.id() {
            return self.backward_scaled(1.0);
        }
        let mut grads = root.backward()?;
        self.pack_grads.deliver(&mut grads)?;
        Ok(grads)
    }

    /// The gradients of `loss * scale` (the official loop divides the loss by its accumulation
    /// steps), as `backward`. By the tape where it covers the forward's graph (every op between
    /// the loss and the parameters one of ours: the sparse path on packed copies with every
    /// sublayer one op, as CUDA's bf16 pretraining runs at batch 32 and up): each op's backward
    /// once, without candle's zero-filled gradient for every input; else by
    /// candle's backward of `loss.affine(scale, 0)`. The same values either way (to the bit:
    /// tests/tape.rs).
    pub fn backward_scaled(&self, scale: f64) -> Result<candle_core::backprop::GradStore> {
        let mut grads = match &self.tape {
            // What candle's backward of the affine hands the loss: ones, scaled.
            Some(tape) if tape.covers(&self.loss) => tape.backward(&self.loss, self.loss.ones_like()?.affine(scale, 0.0)?)?,
            _ => self.loss.affine(scale, 0.0)?.backward()?,
        };
        self.pack_grads.deliver(&mut grads)?;
        Ok(grads)
    }

    /// Whether `backward` and `backward_scaled` run on the tape (see there).
    pub fn backward_by_tape(&self) -> bool {
        self.tape.as_ref().is_some_and(|t| t.covers(&self.loss))
    }
}

impl ConvMae {
    /// A model with the official from-scratch init, weights drawn from `seed`.
    pub fn new(cfg: ConvMaeConfig, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let params = ParamStore::init(pretrain_param_specs(&cfg), dtype, device, seed)?;
        Ok(Self { cfg, params, path: ConvPath::Sparse, precision: Precision::Fp32, sublayer_packing: None })
    }

    /// The dtype activations are computed in.
    pub fn compute_dtype(&self) -> DType {
        self.precision.compute_dtype(self.dtype())
    }

    /// The parameters as the forward uses them: the master tensors, or their bf16 compute copies
    /// (`ParamStore::compute_view`), packed as `sublayer_packing` says.
    fn compute_params(&self) -> Result<Cow<'_, ParamStore>> {
        let dtype = self.compute_dtype();
        if dtype == self.dtype() {
            return Ok(Cow::Borrowed(&self.params));
        }
        Ok(Cow::Owned(self.params.compute_view(dtype, self.packing_for(dtype)?)?))
    }

    /// `sublayer_packing`, or where unset: packed where our kernels serve `dtype` on this device
    /// (then every sublayer runs as one op: pretraining has no stochastic depth).
    fn packing_for(&self, dtype: DType) -> Result<Packing> {
        if let Some(packing) = self.sublayer_packing {
            return Ok(packing);
        }
        let probe = Tensor::zeros(1, dtype, self.device())?;
        Ok(if convmae_kernels::has_kernel(&probe) { Packing::Sublayers } else { Packing::None })
    }

    pub fn dtype(&self) -> DType {
        self.params.dtype
    }
    pub fn device(&self) -> &Device {
        &self.params.device
    }

    /// The pretraining forward on normalized channels-last images [B, H, W, C] (in the
    /// parameters' dtype). With bf16 precision the network runs in bf16 and the loss, its
    /// target and the LayerNorm / softmax statistics in f32.
    pub fn forward_pretrain(&self, imgs: &Tensor, masking: &Masking) -> Result<PretrainOutput> {
        let (out, tape) = convmae_kernels::tape::record_unless_switched_off(|| self.forward_pretrain_ops(imgs, masking));
        Ok(PretrainOutput { tape, ..out? })
    }

    /// `forward_pretrain`'s ops (the tape records them). The sums of branches go through
    /// `tape::add`, so that the tape covers them.
    fn forward_pretrain_ops(&self, imgs: &Tensor, masking: &Masking) -> Result<PretrainOutput> {
        let cfg = &self.cfg;
        let params = self.compute_params()?;
        let p: &ParamStore = &params;
        let dev = self.device();
        let x_in = imgs.to_dtype(self.compute_dtype())?;
        let ConvStagesOut { tokens: mut x, s1, s2, stage1, stage2 } = match self.path {
            ConvPath::Dense => self.conv_stages_dense(p, &x_in, masking)?,
            ConvPath::Sparse => self.conv_stages_sparse(p, &x_in, masking)?,
        };

        // Stage 3 on the visible tokens only.
        x = transformer_blocks(p, &block_names("blocks3", cfg.depth[2]), &x, cfg.num_heads)?;
        let stage3_tokens = x.clone();
        // Fusion happens after stage 3 and before the final norm (spec 1.5, step 10).
        let latent = layer_norm_p(p, "norm", &tape::add(&tape::add(&x, &s1)?, &s2)?, VIT_LN_EPS)?;

        // The prediction stays in the compute dtype: the loss reads bf16 and computes in f32.
        let pred = self.forward_decoder(p, &latent, masking)?;
        let mask = masking.mask_tensor(self.dtype(), dev)?;
        // Each row's target is its image: under complementary masking the images once per view,
        // view-major (the official `target.repeat(4, 1, 1)`).
        let targets = match masking.views() {
            1 => imgs.clone(),
            views => imgs.repeat((views, 1, 1, 1))?,
        };
        let loss = loss::masked_patch_loss(&pred, &targets, &mask, cfg.norm_pix_loss)?;
        Ok(PretrainOutput { loss, pred, mask, latent, stage1, stage2, stage3_tokens, pack_grads: p.pack_gradients(), tape: None })
    }

    /// The official computation: dense maps, the keep mask on each depthwise conv's input,
    /// then everything gathered at the visible tokens. Under complementary masking, FastConvMAE's:
    /// the maps once per image, each depthwise conv once per view (`SpatialMix::DenseViews`),
    /// then each view's visible tokens gathered from its image's maps.
    fn conv_stages_dense(&self, p: &ParamStore, imgs: &Tensor, masking: &Masking) -> Result<ConvStagesOut> {
        let cfg = &self.cfg;
        let (dtype, dev) = (imgs.dtype(), self.device());
        let grid = cfg.grid();
        let keep1 = masking.keep_map(grid, cfg.stage_cell(0), dtype, dev)?;
        let keep2 = masking.keep_map(grid, cfg.stage_cell(1), dtype, dev)?;
        let images = masking.images;
        // [views * images, ..] keep maps, view-major: one [images, ..] map per view.
        let per_view = |keep: &Tensor| -> Result<Vec<Tensor>> { (0..masking.views()).map(|v| keep.narrow(0, v * images, images)).collect() };
        let (views1, views2) = (per_view(&keep1)?, per_view(&keep2)?);
        let (mix1, mix2) = if masking.views() == 1 {
            (SpatialMix::Dense { keep: Some(&keep1) }, SpatialMix::Dense { keep: Some(&keep2) })
        } else {
            (SpatialMix::DenseViews(&views1), SpatialMix::DenseViews(&views2))
        };
        let (stage1, stage2) = conv_stages(cfg, p, imgs, &mix1, &mix2, None, CONV_LN_EPS)?;
        let (l, d3) = (cfg.num_tokens(), cfg.embed_dim[2]);
        let fuse = |name: &str, x: &Tensor, k: usize| -> Result<Tensor> {
            patch_conv_as(x, p.get(&format!("{name}.weight")), p.get(&format!("{name}.bias")), k, &[images, l])
        };
        let s1 = fuse("stage1_output_decode", &stage1, cfg.stage_cell(0))?;
        let s2 = fuse("stage2_output_decode", &stage2, cfg.stage_cell(1))?;
        let x = patch_embed_as(p, "patch_embed3", &stage2, cfg.patch_size[2], &[images, l])?;
        let x = linear_p(p, "patch_embed4", &x)?.broadcast_add(p.get("pos_embed"))?;
        // Each row's visible tokens, from the [images * L, D3] rows of its image.
        let rows = masking.visible_token_rows(dev)?;
        let visible = |x: &Tensor| -> Result<Tensor> { x.reshape((images * l, d3))?.index_select(&rows, 0)?.reshape((masking.batch, masking.len_keep, d3)) };
        Ok(ConvStagesOut { tokens: visible(&x)?, s1: visible(&s1)?, s2: visible(&s2)?, stage1, stage2 })
    }

    /// Exact sparse computation: every op of stages 1-2 is per position or confined to one
    /// 16-px token (the non-overlapping patch embeds and fusion convs), except the depthwise
    /// conv, which reads only visible neighbours. So each visible token's pixel block is cut out
    /// once and the stages run on [B * len_keep, cell, cell, C] blocks; dense maps never exist.
    fn conv_stages_sparse(&self, p: &ParamStore, imgs: &Tensor, masking: &Masking) -> Result<ConvStagesOut> {
        let cfg = &self.cfg;
        let dev = self.device();
        let (b, keep, d3) = (masking.batch, masking.len_keep, cfg.embed_dim[2]);
        let rows = masking.visible_token_rows(dev)?;
        let pixels = token_blocks(imgs, crate::config::TOKEN_PATCH, &rows)?;
        let nbrs1 = Arc::new(visible_neighbors(cfg, masking, 0)?);
        let nbrs2 = Arc::new(visible_neighbors(cfg, masking, 1)?);
        let (stage1, stage2) = conv_stages(cfg, p, &pixels, &SpatialMix::Sparse(&nbrs1), &SpatialMix::Sparse(&nbrs2), None, CONV_LN_EPS)?;
        // Each token block collapses to one token: [B * keep, 1, 1, D3] -> [B, keep, D3].
        let fuse = |name: &str, x: &Tensor, k: usize| -> Result<Tensor> {
            patch_conv_as(x, p.get(&format!("{name}.weight")), p.get(&format!("{name}.bias")), k, &[b, keep])
        };
        let s1 = fuse("stage1_output_decode", &stage1, cfg.stage_cell(0))?;
        let s2 = fuse("stage2_output_decode", &stage2, cfg.stage_cell(1))?;
        let x = patch_embed_as(p, "patch_embed3", &stage2, cfg.patch_size[2], &[b, keep])?;
        // The visible tokens' rows of the position table: one gather from its [L, D3] rows (a
        // broadcast to [B, L, D3] first would be copied whole before the gather).
        let pos = p.get("pos_embed").reshape((cfg.num_tokens(), d3))?.index_select(&masking.ids_keep_tensor(dev)?.flatten_all()?, 0)?.reshape((b, keep, d3))?;
        let tokens = tape::add(&linear_p(p, "patch_embed4", &x)?, &pos)?;
        Ok(ConvStagesOut { tokens, s1, s2, stage1, stage2 })
    }

    /// MAE decoder: embed, append mask tokens, unshuffle, add the fixed position table, blocks, predict.
    fn forward_decoder(&self, p: &ParamStore, latent: &Tensor, masking: &Masking) -> Result<Tensor> {
        let cfg = &self.cfg;
        let x = linear_p(p, "decoder_embed", latent)?;
        // Mask tokens appended, the sequence unshuffled and the position table added, as one op.
        let ids_restore = masking.ids_restore_tensor(self.device())?;
        let x = convmae_kernels::restore_tokens(&x, p.get("mask_token"), p.get("decoder_pos_embed"), &ids_restore)?;
        let x = transformer_blocks(p, &block_names("decoder_blocks", cfg.decoder_depth), &x, cfg.decoder_num_heads)?;
        let x = layer_norm_p(p, "decoder_norm", &x, VIT_LN_EPS)?;
        linear_p(p, "decoder_pred", &x)
    }
}

/// patch_embed1 -> blocks1 -> patch_embed2 -> blocks2 on channels-last images (whole images,
/// or token blocks on the sparse path); returns both stage outputs. `drop` holds the stochastic
/// depth of blocks1 then blocks2 (fine-tuning only).
pub fn conv_stages(
    cfg: &ConvMaeConfig,
    p: &ParamStore,
    imgs: &Tensor,
    mix1: &SpatialMix,
    mix2: &SpatialMix,
    drop: Option<&[DropPath]>,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let (drop1, drop2) = match drop {
        Some(d) => (Some(&d[..cfg.depth[0]]), Some(&d[cfg.depth[0]..])),
        None => (None, None),
    };
    let x = patch_embed(p, "patch_embed1", imgs, cfg.patch_size[0])?;
    let stage1 = conv_blocks(p, &block_names("blocks1", cfg.depth[0]), &x, mix1, drop1, eps)?;
    let x = patch_embed(p, "patch_embed2", &stage1, cfg.patch_size[1])?;
    let stage2 = conv_blocks(p, &block_names("blocks2", cfg.depth[1]), &x, mix2, drop2, eps)?;
    Ok((stage1, stage2))
}

/// The unmasked encoder up to stage 3's first block, as the downstream backbones (segmenter,
/// detector) run it: both conv stages (their LayerNorms' eps `conv_eps`), then patch_embed3 ->
/// patch_embed4 -> + `pos_embed` ([1, N, D3], the table at the token grid). Returns (stage 1,
/// stage 2, tokens [B, N, D3]); `drop` holds every block's stochastic depth.
pub fn encoder_stem(cfg: &ConvMaeConfig, p: &ParamStore, imgs: &Tensor, drop: Option<&[DropPath]>, conv_eps: f64, pos_embed: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let unmasked = SpatialMix::Dense { keep: None };
    let conv_blocks = cfg.depth[0] + cfg.depth[1];
    let (stage1, stage2) = conv_stages(cfg, p, imgs, &unmasked, &unmasked, drop.map(|d| &d[..conv_blocks]), conv_eps)?;
    let b = imgs.dim(0)?;
    let x = patch_embed_as(p, "patch_embed3", &stage2, cfg.patch_size[2], &[b, cfg.num_tokens()])?;
    let tokens = linear_p(p, "patch_embed4", &x)?.broadcast_add(pos_embed)?;
    Ok((stage1, stage2, tokens))
}

/// The 5x5 neighbourhoods of the visible positions of conv stage `stage` (0 or 1), rows in the
/// order of the sparse layout: (image, visible token in ids_keep order, row in cell, col in cell).
/// Given as the mask (`VisibleTokens`): the table is built where it is used, on a GPU by a kernel.
pub fn visible_neighbors(cfg: &ConvMaeConfig, masking: &Masking, stage: usize) -> Result<SparseNeighbors> {
    let slot = masking.ids_restore.iter().map(|&rank| if (rank as usize) < masking.len_keep { rank as i32 } else { -1 }).collect();
    let tokens = VisibleTokens {
        images: masking.batch,
        grid: cfg.grid(),
        cell: cfg.stage_cell(stage),
        len_keep: masking.len_keep,
        ids_keep: masking.ids_keep.clone(),
        slot,
    };
    SparseNeighbors::of_visible_tokens(tokens, DW_KERNEL)
}
