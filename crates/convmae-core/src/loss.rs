//! The MAE reconstruction target and loss (spec section 1.7). The loss is one op of the kernels
//! crate (`convmae_kernels::masked_patch_mse`), which also holds the patch cutting and the
//! norm-pix statistics its composition uses; this module puts ConvMAE's 16-pixel patch on them.

use crate::config::TOKEN_PATCH;
use candle_core::{Result, Tensor};

/// [B, H, W, C] images -> [B, L, 16*16*C] patches, each ordered (row, col, channel), tokens row-major.
pub fn patchify(imgs: &Tensor) -> Result<Tensor> {
    convmae_kernels::composite::patchify(imgs, TOKEN_PATCH)
}

/// Inverse of [`patchify`]: [B, L, 16*16*C] -> [B, H, W, C] for a square grid.
pub fn unpatchify(patches: &Tensor, channels: usize) -> Result<Tensor> {
    let (b, l, _) = patches.dims3()?;
    let g = (l as f64).sqrt().round() as usize;
    let p = TOKEN_PATCH;
    patches
        .reshape(&[b, g, g, p, p, channels][..])?
        .permute([0, 1, 3, 2, 4, 5])?
        .contiguous()?
        .reshape((b, g * p, g * p, channels))
}

/// Per-patch statistics of the norm-pix target: mean and sqrt(unbiased var + 1e-6).
pub fn patch_stats(target: &Tensor) -> Result<(Tensor, Tensor)> {
    convmae_kernels::composite::patch_stats(target)
}

/// The pretraining loss: the mean over the masked patches (`mask` [B, L], 1 = removed) of each
/// patch's mean squared error between `pred` ([B, L, 16*16*C], any float dtype) and the
/// patchified images ([B, H, W, C]), per-patch normalized when `norm_pix`.
pub fn masked_patch_loss(pred: &Tensor, imgs: &Tensor, mask: &Tensor, norm_pix: bool) -> Result<Tensor> {
    convmae_kernels::masked_patch_mse(pred, imgs, mask, TOKEN_PATCH, norm_pix)
}
