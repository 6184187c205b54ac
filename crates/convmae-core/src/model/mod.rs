//! The ConvMAE pretraining model (`MaskedAutoencoderConvViT`), computed as the official code does.

pub mod classifier;
pub mod layers;

use crate::config::ConvMaeConfig;
use crate::loss;
use crate::masking::Masking;
use crate::params::{pretrain_param_specs, ParamStore};
use candle_core::{DType, Device, Result, Tensor};
use layers::*;

pub struct ConvMae {
    pub cfg: ConvMaeConfig,
    pub params: ParamStore,
}

/// Everything one pretraining forward computes; the fixtures compare each of these.
pub struct PretrainOutput {
    /// Scalar loss (rank 0).
    pub loss: Tensor,
    /// [B, L, 16*16*C] decoder prediction.
    pub pred: Tensor,
    /// [B, L], 1 = masked.
    pub mask: Tensor,
    /// [B, len_keep, D3] encoder output after fusion and `norm`.
    pub latent: Tensor,
    /// Stage outputs after the last conv block, channels-last [B, H, W, C].
    pub stage1: Tensor,
    pub stage2: Tensor,
    /// Output of the last stage-3 block on the visible tokens, before fusion.
    pub stage3_tokens: Tensor,
}

impl ConvMae {
    /// A model with the official from-scratch init, weights drawn from `seed`.
    pub fn new(cfg: ConvMaeConfig, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let params = ParamStore::init(pretrain_param_specs(&cfg), dtype, device, seed)?;
        Ok(Self { cfg, params })
    }

    pub fn dtype(&self) -> DType {
        self.params.dtype
    }
    pub fn device(&self) -> &Device {
        &self.params.device
    }

    /// The pretraining forward on normalized channels-last images [B, H, W, C].
    pub fn forward_pretrain(&self, imgs: &Tensor, masking: &Masking) -> Result<PretrainOutput> {
        let (cfg, p) = (&self.cfg, &self.params);
        let (dtype, dev) = (self.dtype(), self.device());
        let grid = cfg.grid();
        let p3 = cfg.patch_size[2];

        // Stages 1-2: conv blocks; the keep mask zeroes each depthwise conv's input.
        let keep1 = masking.keep_map(grid, cfg.stage_cell(0), dtype, dev)?;
        let keep2 = masking.keep_map(grid, cfg.stage_cell(1), dtype, dev)?;
        let (stage1, stage2) = conv_stages(cfg, p, imgs, Some(&keep1), Some(&keep2))?;

        // Multi-scale fusion inputs: one token per 16-px patch from each conv stage.
        let b = imgs.dim(0)?;
        let d3 = cfg.embed_dim[2];
        let fuse = |name: &str, x: &Tensor, k: usize| -> Result<Tensor> {
            patch_conv(x, p.get(&format!("{name}.weight")), p.get(&format!("{name}.bias")), k)?
                .reshape((b, cfg.num_tokens(), d3))
        };
        let s1 = fuse("stage1_output_decode", &stage1, cfg.stage_cell(0))?;
        let s2 = fuse("stage2_output_decode", &stage2, cfg.stage_cell(1))?;

        // Stage 3 on the visible tokens only.
        let x = patch_embed(p, "patch_embed3", &stage2, p3)?.reshape((b, cfg.num_tokens(), d3))?;
        let x = linear_p(p, "patch_embed4", &x)?.broadcast_add(p.get("pos_embed"))?;
        let ids_keep = masking.ids_keep_tensor(dev)?;
        let mut x = gather_tokens(&x, &ids_keep)?;
        let s1 = gather_tokens(&s1, &ids_keep)?;
        let s2 = gather_tokens(&s2, &ids_keep)?;
        for i in 0..cfg.depth[2] {
            x = transformer_block(p, &format!("blocks3.{i}"), &x, cfg.num_heads)?;
        }
        let stage3_tokens = x.clone();
        // Fusion happens after stage 3 and before the final norm (spec 1.5, step 10).
        let latent = layer_norm_p(p, "norm", &((x + s1)? + s2)?, VIT_LN_EPS)?;

        let pred = self.forward_decoder(&latent, masking)?;
        let mask = masking.mask_tensor(dtype, dev)?;
        let target = loss::target(imgs, cfg.norm_pix_loss)?;
        let loss = loss::masked_mse(&pred, &target, &mask)?;
        Ok(PretrainOutput { loss, pred, mask, latent, stage1, stage2, stage3_tokens })
    }

    /// MAE decoder: embed, append mask tokens, unshuffle, add the fixed position table, blocks, predict.
    fn forward_decoder(&self, latent: &Tensor, masking: &Masking) -> Result<Tensor> {
        let (cfg, p) = (&self.cfg, &self.params);
        let x = linear_p(p, "decoder_embed", latent)?;
        let (b, keep, dd) = x.dims3()?;
        let masked = cfg.num_tokens() - keep;
        let mask_tokens = p.get("mask_token").broadcast_as((b, masked, dd))?;
        let x = Tensor::cat(&[&x, &mask_tokens], 1)?;
        let x = gather_tokens(&x, &masking.ids_restore_tensor(self.device())?)?;
        let mut x = x.broadcast_add(p.get("decoder_pos_embed"))?;
        for i in 0..cfg.decoder_depth {
            x = transformer_block(p, &format!("decoder_blocks.{i}"), &x, cfg.decoder_num_heads)?;
        }
        let x = layer_norm_p(p, "decoder_norm", &x, VIT_LN_EPS)?;
        linear_p(p, "decoder_pred", &x)
    }
}

/// patch_embed1 -> blocks1 -> patch_embed2 -> blocks2 on channels-last images; returns both stage
/// outputs. The keep masks (pretraining) gate each depthwise conv's input; None downstream.
pub fn conv_stages(
    cfg: &ConvMaeConfig,
    p: &ParamStore,
    imgs: &Tensor,
    keep1: Option<&Tensor>,
    keep2: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let mut x = patch_embed(p, "patch_embed1", imgs, cfg.patch_size[0])?;
    for i in 0..cfg.depth[0] {
        x = conv_block(p, &format!("blocks1.{i}"), &x, keep1)?;
    }
    let stage1 = x;
    let mut x = patch_embed(p, "patch_embed2", &stage1, cfg.patch_size[1])?;
    for i in 0..cfg.depth[1] {
        x = conv_block(p, &format!("blocks2.{i}"), &x, keep2)?;
    }
    Ok((stage1, x))
}
