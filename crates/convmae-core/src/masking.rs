//! MAE random masking at the 16-px token level (spec section 1.4), drawn from explicit noise.

use crate::rng::Rng;
use candle_core::{DType, Device, Result, Shape, Tensor};
use convmae_kernels::upload;

/// 0 / 1 values (exact in every float type) as a `dtype` tensor: uploaded in f64 for f64, else
/// in f32 and cast on the device. Uploads go through `upload`, which does not wait for the
/// device's queued work (a GPU step's masks are uploaded while the previous step runs).
fn upload_as(values: &[f64], shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
    if dtype == DType::F64 {
        return upload(values, shape, device);
    }
    let narrow: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    upload(&narrow, shape, device)?.to_dtype(dtype)
}

/// One batch's mask. `ids_keep` keeps the random order of the official code (the first `len_keep`
/// entries of argsort(noise)); `mask` is 1 for removed tokens, 0 for visible ones.
#[derive(Clone, Debug)]
pub struct Masking {
    pub batch: usize,
    pub tokens: usize,
    pub len_keep: usize,
    pub ids_keep: Vec<u32>,
    pub ids_restore: Vec<u32>,
    pub mask: Vec<f64>,
}

impl Masking {
    /// `noise` is [batch, tokens] row-major; ids_shuffle = argsort(noise) ascending per row.
    pub fn from_noise(noise: &[f64], batch: usize, tokens: usize, len_keep: usize) -> Self {
        assert_eq!(noise.len(), batch * tokens, "noise must hold batch x tokens values");
        let mut ids_keep = Vec::with_capacity(batch * len_keep);
        let mut ids_restore = vec![0u32; batch * tokens];
        let mut mask = vec![1.0; batch * tokens];
        for b in 0..batch {
            let row = &noise[b * tokens..(b + 1) * tokens];
            let mut order: Vec<u32> = (0..tokens as u32).collect();
            order.sort_by(|&i, &j| row[i as usize].total_cmp(&row[j as usize]));
            for (rank, &t) in order.iter().enumerate() {
                ids_restore[b * tokens + t as usize] = rank as u32;
                if rank < len_keep {
                    mask[b * tokens + t as usize] = 0.0;
                }
            }
            ids_keep.extend_from_slice(&order[..len_keep]);
        }
        Self { batch, tokens, len_keep, ids_keep, ids_restore, mask }
    }

    /// Uniform noise from a seeded stream, as `torch.rand(B, L)` does in the official forward.
    pub fn random(rng: &mut Rng, batch: usize, tokens: usize, len_keep: usize) -> Self {
        let noise: Vec<f64> = (0..batch * tokens).map(|_| rng.uniform()).collect();
        Self::from_noise(&noise, batch, tokens, len_keep)
    }

    pub fn ids_keep_tensor(&self, device: &Device) -> Result<Tensor> {
        upload(&self.ids_keep, (self.batch, self.len_keep), device)
    }

    /// Row indices b * L + ids_keep[b, k] into a [B * L, ..] token-major tensor, in ids_keep order.
    pub fn visible_token_rows(&self, device: &Device) -> Result<Tensor> {
        let rows: Vec<u32> = self
            .ids_keep
            .iter()
            .enumerate()
            .map(|(n, &t)| (n / self.len_keep * self.tokens) as u32 + t)
            .collect();
        upload(&rows, self.ids_keep.len(), device)
    }

    pub fn ids_restore_tensor(&self, device: &Device) -> Result<Tensor> {
        upload(&self.ids_restore, (self.batch, self.tokens), device)
    }

    pub fn mask_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        upload_as(&self.mask, (self.batch, self.tokens), dtype, device)
    }

    /// The keep mask (1 = visible) nearest-upsampled to a stage map whose cells are `cell` x `cell`
    /// positions per token: [B, grid*cell, grid*cell, 1].
    pub fn keep_map(&self, grid: usize, cell: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let side = grid * cell;
        let mut keep = vec![0.0f64; self.batch * side * side];
        for b in 0..self.batch {
            for r in 0..side {
                for c in 0..side {
                    let t = (r / cell) * grid + c / cell;
                    keep[(b * side + r) * side + c] = 1.0 - self.mask[b * self.tokens + t];
                }
            }
        }
        upload_as(&keep, (self.batch, side, side, 1), dtype, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_smallest_noise_in_random_order() {
        let noise = [0.9, 0.1, 0.5, 0.3];
        let m = Masking::from_noise(&noise, 1, 4, 2);
        assert_eq!(m.ids_keep, vec![1, 3]);
        assert_eq!(m.mask, vec![1.0, 0.0, 1.0, 0.0]);
        assert_eq!(m.ids_restore, vec![3, 0, 2, 1]);
    }
}
