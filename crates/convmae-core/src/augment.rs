//! The fine-tuning augmentations that act on normalized pixels, applied in the native step after
//! normalization: random erasing (timm `RandomErasing`, mode 'pixel') and mixup / cutmix (timm
//! `Mixup`, mode 'batch'). Their random geometry and mixing weight are drawn by the TypeScript
//! pipeline (which also builds the mixed targets); the per-pixel noise of erasing is drawn here.

use crate::rng::Rng;
use candle_core::WithDType;
use serde::Deserialize;

/// A rectangle of one image to overwrite with standard-normal noise (values of the normalized
/// image, so the noise has the data's scale).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EraseBox {
    pub sample: usize,
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

/// Batch-mode mixing with the batch reversed (sample i with sample B-1-i). Without `cut`:
/// mixup, `lam * x + (1 - lam) * flip(x)`. With `cut` [top, bottom) x [left, right): cutmix,
/// the box is pasted from the flipped batch (`lam` then only matters for the targets).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MixSpec {
    pub lam: f64,
    #[serde(default)]
    pub cut: Option<[usize; 4]>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentSpec {
    pub erase: Vec<EraseBox>,
    pub mix: Option<MixSpec>,
}

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

impl AugmentSpec {
    pub fn is_empty(&self) -> bool {
        self.erase.is_empty() && self.mix.is_none()
    }

    pub fn validate(&self, batch: usize, height: usize, width: usize) -> candle_core::Result<()> {
        for e in &self.erase {
            if e.sample >= batch || e.height == 0 || e.width == 0 || e.top + e.height > height || e.left + e.width > width {
                return Err(err(format!("augment.erase: box {e:?} does not fit a batch of {batch} images of {height}x{width}")));
            }
        }
        if let Some(m) = &self.mix {
            if !(0.0..=1.0).contains(&m.lam) {
                return Err(err(format!("augment.mix.lam must be in [0, 1], got {}", m.lam)));
            }
            if let Some([top, bottom, left, right]) = m.cut {
                if top > bottom || bottom > height || left > right || right > width {
                    return Err(err(format!("augment.mix.cut {:?} does not fit {height}x{width} images", m.cut)));
                }
            }
        }
        Ok(())
    }

    /// Applies erasing, then mixing, to normalized channels-last pixels [B, H, W, C] in place.
    /// Erasing noise for box `i` of step `step` comes from Rng::derived([seed, step, i]), so a
    /// resumed run erases exactly as an uninterrupted one.
    pub fn apply<T: WithDType>(&self, x: &mut [T], dims: [usize; 4], seed: u64, step: u64) -> candle_core::Result<()> {
        let [b, h, w, c] = dims;
        self.validate(b, h, w)?;
        let at = |n: usize, y: usize, xx: usize| ((n * h + y) * w + xx) * c;
        for (i, e) in self.erase.iter().enumerate() {
            let mut rng = Rng::derived(&[seed, step, ERASE_STREAM, i as u64]);
            for y in e.top..e.top + e.height {
                let row = at(e.sample, y, e.left);
                for v in &mut x[row..row + e.width * c] {
                    *v = T::from_f64(rng.normal());
                }
            }
        }
        let Some(mix) = &self.mix else { return Ok(()) };
        let image = h * w * c;
        match mix.cut {
            None => {
                let (lam, other) = (T::from_f64(mix.lam), T::from_f64(1.0 - mix.lam));
                // Pairs (n, B-1-n) mix from the same two originals, so do them together.
                for n in 0..b.div_ceil(2) {
                    let m = b - 1 - n;
                    for j in 0..image {
                        let (p, q) = (x[n * image + j], x[m * image + j]);
                        x[n * image + j] = p * lam + q * other;
                        x[m * image + j] = q * lam + p * other;
                    }
                }
            }
            Some([top, bottom, left, right]) => {
                for n in 0..b / 2 {
                    let m = b - 1 - n;
                    for y in top..bottom {
                        for j in at(0, y, left)..at(0, y, right) {
                            x.swap(n * image + j, m * image + j);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Separates the erasing noise stream from other per-step draws (drop path, masks): "erase" in
/// ASCII, 0x65_7261_7365.
const ERASE_STREAM: u64 = u64::from_be_bytes(*b"\0\0\0erase");

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(b: usize, h: usize, w: usize, c: usize) -> Vec<f64> {
        (0..b * h * w * c).map(|i| i as f64).collect()
    }

    #[test]
    fn mixup_blends_each_image_with_its_mirror_in_the_batch() {
        let dims = [3, 2, 2, 1];
        let orig = ramp(3, 2, 2, 1);
        let mut x = orig.clone();
        AugmentSpec { erase: vec![], mix: Some(MixSpec { lam: 0.7, cut: None }) }.apply(&mut x, dims, 0, 0).unwrap();
        for n in 0..3 {
            for j in 0..4 {
                let want = 0.7 * orig[n * 4 + j] + 0.3 * orig[(2 - n) * 4 + j];
                assert!((x[n * 4 + j] - want).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn cutmix_pastes_the_box_from_the_mirror_image() {
        let dims = [2, 4, 4, 2];
        let orig = ramp(2, 4, 4, 2);
        let mut x = orig.clone();
        AugmentSpec { erase: vec![], mix: Some(MixSpec { lam: 0.5, cut: Some([1, 3, 0, 2]) }) }.apply(&mut x, dims, 0, 0).unwrap();
        for n in 0..2 {
            for y in 0..4 {
                for xx in 0..4 {
                    for ch in 0..2 {
                        let i = ((n * 4 + y) * 4 + xx) * 2 + ch;
                        let inside = (1..3).contains(&y) && xx < 2;
                        let src = if inside { ((1 - n) * 4 + y) * 4 + xx } else { (n * 4 + y) * 4 + xx };
                        assert_eq!(x[i], orig[src * 2 + ch], "n{n} y{y} x{xx}");
                    }
                }
            }
        }
    }

    #[test]
    fn erasing_touches_only_its_box_and_is_reproducible() {
        let dims = [2, 5, 5, 3];
        let spec = AugmentSpec { erase: vec![EraseBox { sample: 1, top: 1, left: 2, height: 3, width: 2 }], mix: None };
        let orig = ramp(2, 5, 5, 3);
        let (mut a, mut b) = (orig.clone(), orig.clone());
        spec.apply(&mut a, dims, 7, 3).unwrap();
        spec.apply(&mut b, dims, 7, 3).unwrap();
        assert_eq!(a, b);
        let changed: Vec<usize> = (0..a.len()).filter(|&i| a[i] != orig[i]).collect();
        assert_eq!(changed.len(), 3 * 2 * 3);
        for i in changed {
            let (n, y, xx) = (i / 75, (i / 15) % 5, (i / 3) % 5);
            assert!(n == 1 && (1..4).contains(&y) && (2..4).contains(&xx));
        }
        let mut other_step = orig.clone();
        spec.apply(&mut other_step, dims, 7, 4).unwrap();
        assert_ne!(other_step, a);
    }

    #[test]
    fn boxes_outside_the_image_are_rejected_with_their_name() {
        let spec = AugmentSpec { erase: vec![EraseBox { sample: 0, top: 3, left: 0, height: 3, width: 1 }], mix: None };
        let e = spec.apply(&mut ramp(1, 4, 4, 1), [1, 4, 4, 1], 0, 0).unwrap_err().to_string();
        assert!(e.contains("augment.erase"), "{e}");
    }
}
