//! MAE's reconstruction loss as one op: the images cut into patches, each patch normalized by
//! its own mean and standard deviation (norm-pix), the mean squared error of the prediction per
//! patch, and the mean of that over the masked patches (spec section 1.7).
//!
//! As candle's ops (`composite::masked_patch_mse`) the loss is some twenty launches over the
//! [B, L, P] target in f32 each way, plus the prediction's cast to f32: in run 7's H100 profile
//! of a ConvMAE-B step at batch 64 (benches/results/gpu-2026-11-26-run7-ncu-raw.csv.gz), 28
//! launches and 1.2 ms forward, 20 launches and 0.6 ms backward. This op
//! reads each image pixel where the patch needs it (no patchified copy), takes the prediction
//! in its own dtype (bf16 under mixed precision) and computes in f32 on CUDA: two launches
//! forward (a warp per patch, then one block for the total, in a fixed order) and a device copy
//! of the mask for the backward, which is one launch.
//! The images and the mask are constants (no gradient), as the target is in the official code.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{row_major, Element};

const OP_NAME: &str = "masked_patch_mse";
const GRAD_NAME: &str = "masked_patch_mse_backward";

/// The epsilon under the square root of the norm-pix target's standard deviation (MAE's
/// `(var + 1.e-6) ** .5`).
pub(crate) const NORM_PIX_EPS: f64 = 1e-6;

/// Where each patch's pixels are: `pred` is [images, tokens, patch * patch * channels], the
/// images [images, height, width, channels] (channels last) with tokens = (height / patch) x
/// (width / patch) patches, row-major; a patch's elements are ordered (row, column, channel).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Patches {
    pub images: usize,
    pub tokens: usize,
    pub grid_w: usize,
    pub patch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Patches {
    /// Checks the three shapes against each other; the error names the op and every shape.
    fn of(pred: &[usize], imgs: &[usize], mask: &[usize], patch: usize) -> Result<Self> {
        let fail = |why: &str| {
            candle_core::bail!(
                "{OP_NAME}: prediction {pred:?}, images {imgs:?} and mask {mask:?} do not fit patches of {patch}x{patch}: {why} \
                 (expected prediction [B, L, {patch}*{patch}*C], images [B, H, W, C] with H and W multiples of {patch} and L = (H/{patch})*(W/{patch}), mask [B, L])"
            )
        };
        let (&[b, l, n], &[ib, h, w, c], &[mb, ml]) = (pred, imgs, mask) else { return fail("ranks") };
        if patch == 0 || h % patch != 0 || w % patch != 0 {
            return fail("image size");
        }
        if ib != b || mb != b || ml != l || l != (h / patch) * (w / patch) || n != patch * patch * c {
            return fail("sizes");
        }
        if n < 2 {
            return fail("a patch needs two values for its variance");
        }
        Ok(Self { images: b, tokens: l, grid_w: w / patch, patch, channels: c, height: h, width: w })
    }

    pub(crate) fn rows(&self) -> usize {
        self.images * self.tokens
    }

    /// Values per patch: patch * patch * channels.
    pub(crate) fn len(&self) -> usize {
        self.patch * self.patch * self.channels
    }

    /// The values of patch row `row` (image-major, token-major) in the images, in the patch's
    /// order: `patch` runs of patch * channels contiguous values, one per pixel row.
    fn target<'a, T>(&self, imgs: &'a [T], row: usize) -> impl Iterator<Item = &'a T> + 'a {
        let (b, l) = (row / self.tokens, row % self.tokens);
        let (gy, gx) = (l / self.grid_w, l % self.grid_w);
        let (run, row_stride) = (self.patch * self.channels, self.width * self.channels);
        let base = ((b * self.height + gy * self.patch) * self.width + gx * self.patch) * self.channels;
        (0..self.patch).flat_map(move |i| imgs[base + i * row_stride..][..run].iter())
    }
}

/// MAE's loss: the mean over the masked patches (`mask` [B, L], 1 = masked, 0 = kept) of each
/// patch's mean squared error between `pred` ([B, L, patch * patch * C]) and the patches of
/// `imgs` ([B, H, W, C]), each patch normalized to zero mean and unit (unbiased) variance first
/// when `norm_pix`. A scalar (rank 0); differentiable in `pred` only.
///
/// Our op where a kernel serves: on the CPU all three f32 or all f64 (the result in that
/// dtype); on CUDA `pred` f32, bf16 or f16 with f32 images and mask (the result f32). Elsewhere,
/// or when `CONVMAE_COMPOSITE_OPS` lists it, candle's ops (`composite::masked_patch_mse`, which
/// casts `pred` to the images' dtype): the same values.
pub fn masked_patch_mse(pred: &Tensor, imgs: &Tensor, mask: &Tensor, patch: usize, norm_pix: bool) -> Result<Tensor> {
    let patches = Patches::of(pred.dims(), imgs.dims(), mask.dims(), patch)?;
    if !kernel_serves(pred, imgs, mask) {
        return crate::composite::masked_patch_mse(pred, imgs, mask, patch, norm_pix);
    }
    crate::tape::apply3(pred, &imgs.detach(), &mask.detach(), MaskedPatchMse { patches, norm_pix, saved: Arc::new(Mutex::new(None)) })
}

fn kernel_serves(pred: &Tensor, imgs: &Tensor, mask: &Tensor) -> bool {
    let dtypes_fit = if pred.device().is_cpu() {
        imgs.dtype() == pred.dtype() && mask.dtype() == pred.dtype()
    } else {
        imgs.dtype() == DType::F32 && mask.dtype() == DType::F32
    };
    crate::has_kernel(pred) && dtypes_fit && !crate::composite::sent_to_composite(OP_NAME)
}

/// What the forward keeps for the backward: each patch's (mean, std) of the target, the mask,
/// and the number of masked patches.
enum Saved {
    Cpu { stats: Vec<f64>, mask: Vec<f64>, mask_sum: f64 },
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda::PatchLossSaved>),
}

type SavedSlot = Arc<Mutex<Option<Saved>>>;

fn missing_saved() -> candle_core::Error {
    candle_core::Error::Msg(format!("{GRAD_NAME}: the forward's saved statistics are missing (backward of an op that never ran forward on this device)"))
}

struct MaskedPatchMse {
    patches: Patches,
    norm_pix: bool,
    saved: SavedSlot,
}

/// The (mean, std) of one patch row's target; (0, 1) without norm-pix.
fn target_stats<T: Element>(imgs: &[T], p: Patches, row: usize, norm_pix: bool) -> (T, T) {
    if !norm_pix {
        return (T::ZERO, T::ONE);
    }
    let n = p.len();
    let mut sum = T::ZERO;
    for &t in p.target(imgs, row) {
        sum += t;
    }
    let mean = sum / T::from_usize(n);
    let mut squares = T::ZERO;
    for &t in p.target(imgs, row) {
        squares += (t - mean) * (t - mean);
    }
    (mean, (squares / T::from_usize(n - 1) + T::from_f64(NORM_PIX_EPS)).sqrt())
}

/// The forward on the CPU: (loss, each row's (mean, std), the mask's sum).
fn forward<T: Element>(pred: &[T], imgs: &[T], mask: &[T], p: Patches, norm_pix: bool) -> (T, Vec<f64>, T) {
    let n = p.len();
    let rows: Vec<(T, T, T)> = (0..p.rows())
        .into_par_iter()
        .map(|row| {
            let (mean, std) = target_stats(imgs, p, row, norm_pix);
            let mut sum = T::ZERO;
            for (&y, &t) in pred[row * n..][..n].iter().zip(p.target(imgs, row)) {
                let d = y - (t - mean) / std;
                sum += d * d;
            }
            (sum / T::from_usize(n) * mask[row], mean, std)
        })
        .collect();
    let (mut total, mut mask_sum) = (T::ZERO, T::ZERO);
    let mut stats = Vec::with_capacity(2 * rows.len());
    for (&(term, mean, std), &m) in rows.iter().zip(mask) {
        total += term;
        mask_sum += m;
        stats.extend([widen(mean), widen(std)]);
    }
    (total / mask_sum, stats, mask_sum)
}

/// An f32 or f64 as f64, exactly (the saved statistics go back to `T` unchanged).
fn widen<T: Element>(v: T) -> f64 {
    let any: &dyn std::any::Any = &v;
    if let Some(x) = any.downcast_ref::<f32>() {
        *x as f64
    } else if let Some(x) = any.downcast_ref::<f64>() {
        *x
    } else {
        unreachable!("the CPU kernels are instantiated for f32 and f64 only")
    }
}

/// The backward on the CPU: d pred = grad * mask / mask_sum * 2 / n * (pred - target).
fn backward<T: Element>(pred: &[T], imgs: &[T], grad: T, saved: (&[f64], &[f64], f64), p: Patches, norm_pix: bool) -> Vec<T> {
    let (stats, mask, mask_sum) = saved;
    let n = p.len();
    let mut out = vec![T::ZERO; pred.len()];
    out.par_chunks_mut(n).enumerate().for_each(|(row, out_row)| {
        let scale = grad * T::from_f64(mask[row]) / T::from_f64(mask_sum) * T::from_f64(2.0) / T::from_usize(n);
        let (mean, std) = if norm_pix { (T::from_f64(stats[2 * row]), T::from_f64(stats[2 * row + 1])) } else { (T::ZERO, T::ONE) };
        for ((o, &y), &t) in out_row.iter_mut().zip(&pred[row * n..][..n]).zip(p.target(imgs, row)) {
            *o = scale * (y - (t - mean) / std);
        }
    });
    out
}

impl CustomOp3 for MaskedPatchMse {
    fn name(&self) -> &'static str {
        OP_NAME
    }

    fn cpu_fwd(&self, sp: &CpuStorage, lp: &Layout, si: &CpuStorage, li: &Layout, sm: &CpuStorage, lm: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = self.patches;
        let (loss, saved) = dispatch_float!(OP_NAME, (sp => pred, si => imgs, sm => mask), {
            let mask = row_major(mask, lm);
            let (loss, stats, mask_sum) = forward(&row_major(pred, lp), &row_major(imgs, li), &mask, p, self.norm_pix);
            let saved = Saved::Cpu { stats, mask: mask.iter().map(|&m| widen(m)).collect(), mask_sum: widen(mask_sum) };
            (Element::into_storage(vec![loss]), saved)
        });
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok((loss, Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sp: &candle_core::CudaStorage,
        lp: &Layout,
        si: &candle_core::CudaStorage,
        li: &Layout,
        sm: &candle_core::CudaStorage,
        lm: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, patch_mse_fwd};
        use candle_core::backend::BackendStorage;
        let (loss, saved) = cuda_dispatch!(OP_NAME, sp.dtype(), patch_mse_fwd(sp, lp, si, li, sm, lm, self.patches, self.norm_pix))?;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved::Cuda(Box::new(saved)));
        Ok((loss, Shape::from(())))
    }

    fn bwd(&self, pred: &Tensor, imgs: &Tensor, _mask: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let backward = MaskedPatchMseBackward { patches: self.patches, norm_pix: self.norm_pix, saved: self.saved.clone() };
        Ok((Some(pred.apply_op3_no_bwd(imgs, grad, &backward)?), None, None))
    }
}

/// (pred, imgs, the loss's gradient) -> the gradient of pred, from what the forward saved.
struct MaskedPatchMseBackward {
    patches: Patches,
    norm_pix: bool,
    saved: SavedSlot,
}

impl CustomOp3 for MaskedPatchMseBackward {
    fn name(&self) -> &'static str {
        GRAD_NAME
    }

    fn cpu_fwd(&self, sp: &CpuStorage, lp: &Layout, si: &CpuStorage, li: &Layout, sg: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(Saved::Cpu { stats, mask, mask_sum }) = saved.as_ref() else { return Err(missing_saved()) };
        let out = dispatch_float!(GRAD_NAME, (sp => pred, si => imgs, sg => grad), {
            let grad = row_major(grad, lg)[0];
            Element::into_storage(backward(&row_major(pred, lp), &row_major(imgs, li), grad, (stats, mask, *mask_sum), self.patches, self.norm_pix))
        });
        Ok((out, lp.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sp: &candle_core::CudaStorage,
        lp: &Layout,
        si: &candle_core::CudaStorage,
        li: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, patch_mse_bwd};
        use candle_core::backend::BackendStorage;
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(Saved::Cuda(saved)) = saved.as_ref() else { return Err(missing_saved()) };
        let out = cuda_dispatch!(GRAD_NAME, sp.dtype(), patch_mse_bwd(sp, lp, si, li, sg, lg, saved, self.patches))?;
        Ok((out, lp.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::rand;
    use candle_core::{Device, Var};

    /// The op against candle's composition, f64 and f32, with and without norm-pix, on images
    /// that are not square (a 2 x 3 grid of 4 x 4 patches of 3 channels) and a mask with
    /// masked and kept patches in every image: the loss and the prediction's gradient.
    #[test]
    fn matches_the_composition() {
        for dtype in [DType::F64, DType::F32] {
            for norm_pix in [true, false] {
                let (b, p, c, gh, gw) = (2, 4, 3, 2, 3);
                let pred = Var::from_tensor(&rand(&[b, gh * gw, p * p * c], 1).to_dtype(dtype).unwrap()).unwrap();
                // A per-image offset and scale, so the patch statistics matter.
                let imgs = ((rand(&[b, gh * p, gw * p, c], 2) * 3.0).unwrap() + 0.7).unwrap().to_dtype(dtype).unwrap();
                let mask = Tensor::from_vec(vec![1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0], (b, gh * gw), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let ours = masked_patch_mse(&pred, &imgs, &mask, p, norm_pix).unwrap();
                let reference = crate::composite::masked_patch_mse(&pred, &imgs, &mask, p, norm_pix).unwrap();
                assert_eq!(ours.dims(), reference.dims());
                let tol = if dtype == DType::F64 { 1e-13 } else { 1e-5 };
                let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
                let (a, r) = (scalar(&ours), scalar(&reference));
                assert!((a - r).abs() <= tol * r.abs(), "{dtype:?} norm_pix {norm_pix}: loss {a} vs {r}");
                // Scaled, so the upstream gradient is not 1.
                let g_ours = (ours * 0.75).unwrap().backward().unwrap();
                let g_ref = (reference * 0.75).unwrap().backward().unwrap();
                let (go, gr) = (g_ours.get(&pred).unwrap(), g_ref.get(&pred).unwrap());
                let diff = (go - gr).unwrap().abs().unwrap().max_all().unwrap();
                let scale = gr.abs().unwrap().max_all().unwrap();
                let rel = scalar(&diff) / scalar(&scale);
                assert!(rel <= tol, "{dtype:?} norm_pix {norm_pix}: gradient rel {rel}");
            }
        }
    }

    /// Finite differences of the op itself in f64: its backward is the derivative of its forward.
    #[test]
    fn gradient_matches_finite_differences() {
        let (b, p, c, g) = (1, 2, 2, 2);
        let pred = rand(&[b, g * g, p * p * c], 5);
        let imgs = (rand(&[b, g * p, g * p, c], 6) * 2.0).unwrap();
        let mask = Tensor::from_vec(vec![1.0f64, 0.0, 1.0, 1.0], (b, g * g), &Device::Cpu).unwrap();
        let loss = |x: &Tensor| masked_patch_mse(x, &imgs, &mask, p, true).unwrap().to_scalar::<f64>().unwrap();
        let var = Var::from_tensor(&pred).unwrap();
        let grads = masked_patch_mse(&var, &imgs, &mask, p, true).unwrap().backward().unwrap();
        let analytic = grads.get(&var).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = pred.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-6;
        for (i, &a) in analytic.iter().enumerate() {
            let shifted = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                loss(&Tensor::from_vec(v, pred.shape(), &Device::Cpu).unwrap())
            };
            let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
            assert!((a - numeric).abs() < 1e-8, "element {i}: analytic {a}, numeric {numeric}");
        }
    }

    #[test]
    fn mismatched_shapes_are_named() {
        let pred = rand(&[2, 6, 48], 1);
        let imgs = rand(&[2, 8, 12, 3], 2);
        let mask = rand(&[2, 6], 3);
        assert!(masked_patch_mse(&pred, &imgs, &mask, 4, true).is_ok());
        for (what, e) in [
            ("tokens", masked_patch_mse(&rand(&[2, 5, 48], 1), &imgs, &mask, 4, true)),
            ("patch values", masked_patch_mse(&rand(&[2, 6, 47], 1), &imgs, &mask, 4, true)),
            ("image size", masked_patch_mse(&pred, &rand(&[2, 9, 12, 3], 2), &mask, 4, true)),
            ("mask", masked_patch_mse(&pred, &imgs, &rand(&[2, 7], 3), 4, true)),
            ("rank", masked_patch_mse(&pred, &rand(&[8, 12, 3], 2), &mask, 4, true)),
        ] {
            let e = e.unwrap_err().to_string();
            assert!(e.contains(OP_NAME) && e.contains("prediction [") && e.contains("images ["), "{what}: {e}");
        }
    }
}
