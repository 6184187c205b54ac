//! The MAE reconstruction target and loss (spec section 1.7).

use crate::config::TOKEN_PATCH;
use candle_core::{Result, Tensor, D};

/// [B, H, W, C] images -> [B, L, 16*16*C] patches, each ordered (row, col, channel), tokens row-major.
pub fn patchify(imgs: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = imgs.dims4()?;
    let p = TOKEN_PATCH;
    let (gh, gw) = (h / p, w / p);
    imgs.reshape(&[b, gh, p, gw, p, c][..])?
        .permute([0, 1, 3, 2, 4, 5])?
        .contiguous()?
        .reshape((b, gh * gw, p * p * c))
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
    let n = target.dim(D::Minus1)?;
    let mean = target.mean_keepdim(D::Minus1)?;
    let centered = target.broadcast_sub(&mean)?;
    // torch.var is unbiased (N - 1).
    let var = (centered.sqr()?.sum_keepdim(D::Minus1)? / (n as f64 - 1.0))?;
    Ok((mean, (var + 1e-6)?.sqrt()?))
}

/// The training target: patchified images, per-patch normalized when `norm_pix`.
pub fn target(imgs: &Tensor, norm_pix: bool) -> Result<Tensor> {
    let t = patchify(imgs)?;
    if !norm_pix {
        return Ok(t);
    }
    let (mean, std) = patch_stats(&t)?;
    t.broadcast_sub(&mean)?.broadcast_div(&std)
}

/// Mean squared error per patch, averaged over the masked patches only. `mask`: [B, L], 1 = removed.
pub fn masked_mse(pred: &Tensor, target: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let per_patch = (pred - target)?.sqr()?.mean(D::Minus1)?;
    (per_patch * mask)?.sum_all()?.broadcast_div(&mask.sum_all()?)
}
