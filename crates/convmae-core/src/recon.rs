//! Reconstruction pictures: original | masked input | reconstruction | reconstruction with the
//! visible patches pasted back, one row per image (the MAE visualization).

use crate::config::TOKEN_PATCH;
use crate::loss;
use crate::model::ConvMae;
use crate::rng::Rng;
use crate::train::{normalize, Batch, IMAGENET_MEAN, IMAGENET_STD};
use candle_core::{DType, Result};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Reconstruction {
    /// uint8 RGB, channels-last, `height` rows of `width` pixels.
    #[serde(skip)]
    pub pixels: Vec<u8>,
    pub width: usize,
    pub height: usize,
    pub loss: f64,
}

pub const PANELS: usize = 4;

pub fn reconstruct(model: &ConvMae, batch: &Batch, seed: u64) -> Result<Reconstruction> {
    let cfg = &model.cfg;
    let s = cfg.img_size;
    if batch.height != s || batch.width != s {
        return Err(candle_core::Error::Msg(format!("images are {}x{}, the model's img_size is {s}", batch.height, batch.width)));
    }
    let imgs = normalize(batch, model.dtype(), model.device())?;
    let masking = crate::masking::Masking::random(&mut Rng::derived(&[seed, u64::MAX]), batch.batch, cfg.num_tokens(), cfg.len_keep());
    let out = model.forward_pretrain(&imgs, &masking)?;
    // The prediction lives in the normalized-patch space when norm_pix is on: undo it with the
    // statistics of the true patches, as the MAE demo does.
    let mut pred = out.pred.detach().to_dtype(imgs.dtype())?;
    if cfg.norm_pix_loss {
        let (mean, std) = loss::patch_stats(&loss::patchify(&imgs)?)?;
        pred = pred.broadcast_mul(&std)?.broadcast_add(&mean)?;
    }
    let recon = loss::unpatchify(&pred, cfg.in_chans)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = batch.batch;
    let (w_out, h_out) = (PANELS * s, b * s);
    let mut pixels = vec![0u8; w_out * h_out * 3];
    let to_u8 = |v: f32, c: usize| -> u8 {
        let x = (v as f64 * IMAGENET_STD[c] + IMAGENET_MEAN[c]) * 255.0;
        x.round().clamp(0.0, 255.0) as u8
    };
    let grid = cfg.grid();
    for i in 0..b {
        for y in 0..s {
            for x in 0..s {
                let token = (y / TOKEN_PATCH) * grid + x / TOKEN_PATCH;
                let masked = masking.mask[i * cfg.num_tokens() + token] > 0.5;
                for c in 0..3 {
                    let src = ((i * s + y) * s + x) * 3 + c;
                    let orig = batch.pixels[src];
                    let rec = to_u8(recon[src], c);
                    let row = (i * s + y) * w_out;
                    let put = |px: &mut Vec<u8>, panel: usize, v: u8| px[(row + panel * s + x) * 3 + c] = v;
                    put(&mut pixels, 0, orig);
                    put(&mut pixels, 1, if masked { 128 } else { orig });
                    put(&mut pixels, 2, rec);
                    put(&mut pixels, 3, if masked { rec } else { orig });
                }
            }
        }
    }
    let loss = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(Reconstruction { pixels, width: w_out, height: h_out, loss })
}
