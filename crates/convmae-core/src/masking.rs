//! MAE random masking at the 16-px token level (spec section 1.4), drawn from explicit noise,
//! and FastConvMAE's complementary masking (spec section 8.1): each image's tokens split by one
//! argsort into `tokens / len_keep` disjoint visible sets, one view of the image per set.

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
///
/// A row is one masked view of an image. Plain masking has one view per image (`batch ==
/// images`); complementary masking has `views()` per image, view-major as FastConvMAE
/// concatenates them: row `v * images + i` is view `v` of image `i`.
#[derive(Clone, Debug)]
pub struct Masking {
    /// Rows (masked views); `ids_keep`, `ids_restore` and `mask` have one entry set per row.
    pub batch: usize,
    /// Distinct images the rows view: row `r` views image `r % images`.
    pub images: usize,
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
            let order = ids_shuffle(&noise[b * tokens..(b + 1) * tokens]);
            for (rank, &t) in order.iter().enumerate() {
                ids_restore[b * tokens + t as usize] = rank as u32;
                if rank < len_keep {
                    mask[b * tokens + t as usize] = 0.0;
                }
            }
            ids_keep.extend_from_slice(&order[..len_keep]);
        }
        Self { batch, images: batch, tokens, len_keep, ids_keep, ids_restore, mask }
    }

    /// FastConvMAE's complementary masks: per image one ids_shuffle = argsort(noise), whose
    /// consecutive runs of `len_keep` are the visible sets of `tokens / len_keep` views (view `v`
    /// keeps ids_shuffle[v * len_keep..(v + 1) * len_keep]). View `v`'s ids_restore is the plain
    /// one minus `v * len_keep`, modulo `tokens`: the official decoder rolls the appended
    /// sequence by `v * len_keep` before its one unshuffle, which is the same gather. View 0 is
    /// the plain masking of the same noise. `noise` is [images, tokens] row-major; `len_keep` must
    /// divide `tokens` (the official code supports mask ratio 0.75 on 196 tokens: 4 views).
    pub fn complementary_from_noise(noise: &[f64], images: usize, tokens: usize, len_keep: usize) -> Result<Self> {
        let views = complementary_views(tokens, len_keep).map_err(candle_core::Error::Msg)?;
        if noise.len() != images * tokens {
            return Err(candle_core::Error::Msg(format!("noise: expected {images} x {tokens} = {} values, got {}", images * tokens, noise.len())));
        }
        let batch = images * views;
        let mut ids_keep = vec![0u32; batch * len_keep];
        let mut ids_restore = vec![0u32; batch * tokens];
        let mut mask = vec![1.0; batch * tokens];
        for i in 0..images {
            for (rank, &t) in ids_shuffle(&noise[i * tokens..(i + 1) * tokens]).iter().enumerate() {
                let owner = rank / len_keep;
                for v in 0..views {
                    let r = v * images + i;
                    ids_restore[r * tokens + t as usize] = ((rank + tokens - v * len_keep) % tokens) as u32;
                    if v == owner {
                        mask[r * tokens + t as usize] = 0.0;
                        ids_keep[r * len_keep + rank % len_keep] = t;
                    }
                }
            }
        }
        Ok(Self { batch, images, tokens, len_keep, ids_keep, ids_restore, mask })
    }

    /// Complementary masks from uniform noise drawn as `random` draws it, [images, tokens].
    pub fn complementary_random(rng: &mut Rng, images: usize, tokens: usize, len_keep: usize) -> Result<Self> {
        Self::complementary_from_noise(&uniform_noise(rng, images, tokens), images, tokens, len_keep)
    }

    /// Masked views per image: 1 for plain masking.
    pub fn views(&self) -> usize {
        self.batch / self.images
    }

    /// Uniform noise from a seeded stream, as `torch.rand(B, L)` does in the official forward.
    pub fn random(rng: &mut Rng, batch: usize, tokens: usize, len_keep: usize) -> Self {
        Self::from_noise(&uniform_noise(rng, batch, tokens), batch, tokens, len_keep)
    }

    pub fn ids_keep_tensor(&self, device: &Device) -> Result<Tensor> {
        upload(&self.ids_keep, (self.batch, self.len_keep), device)
    }

    /// Row indices i * L + ids_keep[r, k] into an [images * L, ..] token-major tensor, in
    /// ids_keep order, where image i = r % images is the one row r views.
    pub fn visible_token_rows(&self, device: &Device) -> Result<Tensor> {
        let rows: Vec<u32> = self
            .ids_keep
            .iter()
            .enumerate()
            .map(|(n, &t)| ((n / self.len_keep) % self.images * self.tokens) as u32 + t)
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

/// [images, tokens] uniform noise from `rng`, row-major: the official forward's `torch.rand(B, L)`.
pub fn uniform_noise(rng: &mut Rng, images: usize, tokens: usize) -> Vec<f64> {
    (0..images * tokens).map(|_| rng.uniform()).collect()
}

/// argsort(noise) ascending over one image's tokens (a stable sort, as torch.argsort of distinct
/// values): the official `ids_shuffle` row.
fn ids_shuffle(noise: &[f64]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..noise.len() as u32).collect();
    order.sort_by(|&a, &b| noise[a as usize].total_cmp(&noise[b as usize]));
    order
}

/// Views of complementary masking: `tokens / len_keep`, which must divide exactly (the views
/// partition the tokens, each keeping `len_keep`).
pub fn complementary_views(tokens: usize, len_keep: usize) -> std::result::Result<usize, String> {
    if len_keep == 0 || !tokens.is_multiple_of(len_keep) || tokens == len_keep {
        return Err(format!(
            "complementary masking splits the {tokens} tokens into views of len_keep = {len_keep} visible tokens each; \
             len_keep must divide the token count with at least 2 views (FastConvMAE: mask_ratio 0.75, 4 views)"
        ));
    }
    Ok(tokens / len_keep)
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

    #[test]
    fn complementary_views_split_the_tokens_and_view_0_is_the_plain_mask() {
        let (images, tokens, keep) = (3, 16, 4);
        let mut rng = Rng::new(11);
        let noise = uniform_noise(&mut rng, images, tokens);
        let plain = Masking::from_noise(&noise, images, tokens, keep);
        let m = Masking::complementary_from_noise(&noise, images, tokens, keep).unwrap();
        assert_eq!((m.batch, m.images, m.views()), (12, 3, 4));
        // View 0 of each image is the plain masking of the same noise.
        assert_eq!(&m.ids_keep[..images * keep], &plain.ids_keep[..]);
        assert_eq!(&m.ids_restore[..images * tokens], &plain.ids_restore[..]);
        assert_eq!(&m.mask[..images * tokens], &plain.mask[..]);
        for i in 0..images {
            // Each token is visible in exactly one view of its image.
            for t in 0..tokens {
                let visible = (0..4).filter(|v| m.mask[(v * images + i) * tokens + t] == 0.0).count();
                assert_eq!(visible, 1, "image {i} token {t}");
            }
            for v in 0..4 {
                let r = v * images + i;
                let rank = &plain.ids_restore[i * tokens..(i + 1) * tokens];
                for (k, &t) in m.ids_keep[r * keep..(r + 1) * keep].iter().enumerate() {
                    // View v keeps ids_shuffle[v * keep + k], in that order ...
                    assert_eq!(rank[t as usize] as usize, v * keep + k);
                    // ... and its unshuffle sends token t to visible latent k, as the official
                    // roll by v * keep before the one unshuffle does.
                    assert_eq!(m.ids_restore[r * tokens + t as usize] as usize, k);
                    assert_eq!(m.mask[r * tokens + t as usize], 0.0);
                }
                // The masked tokens' slots are the mask tokens', each taken once.
                let mut slots: Vec<u32> = m.ids_restore[r * tokens..(r + 1) * tokens].to_vec();
                slots.sort();
                assert_eq!(slots, (0..tokens as u32).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn visible_token_rows_of_a_view_index_its_image() {
        let noise: Vec<f64> = (0..2 * 4).map(|i| ((i * 5) % 8) as f64).collect();
        let m = Masking::complementary_from_noise(&noise, 2, 4, 2).unwrap();
        let rows = m.visible_token_rows(&Device::Cpu).unwrap().to_vec1::<u32>().unwrap();
        // Rows 0, 1 view images 0, 1 (view 0); rows 2, 3 the same images (view 1).
        let expect: Vec<u32> = (0..4).flat_map(|r| m.ids_keep[r * 2..r * 2 + 2].iter().map(move |&t| (r % 2) as u32 * 4 + t)).collect();
        assert_eq!(rows, expect);
    }

    #[test]
    fn complementary_masking_needs_len_keep_to_divide_the_tokens() {
        assert_eq!(complementary_views(196, 49), Ok(4));
        assert!(complementary_views(169, 42).unwrap_err().contains("len_keep = 42"));
        assert!(complementary_views(16, 16).is_err());
        assert!(Masking::complementary_from_noise(&[0.0; 9], 1, 9, 2).is_err());
        let e = Masking::complementary_from_noise(&[0.0; 15], 1, 16, 4).unwrap_err().to_string();
        assert!(e.contains("noise: expected 1 x 16 = 16 values, got 15"), "{e}");
    }
}
