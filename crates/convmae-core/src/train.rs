//! One pretraining step: normalize the batch, draw the mask, forward, backward, accumulate, AdamW.

use crate::masking::Masking;
use crate::model::ConvMae;
use crate::optim::{AdamW, AdamWConfig};
use crate::rng::Rng;
use crate::augment::AugmentSpec;
use candle_core::{DType, Result, Tensor, WithDType};
use serde::Serialize;

/// ImageNet statistics used by every official recipe.
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// A batch of uint8 images, channels-last [B, H, W, C], as the data pipeline packs them.
pub struct Batch<'a> {
    pub pixels: &'a [u8],
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

#[derive(Clone, Debug)]
pub struct StepOptions {
    pub lr: f64,
    /// Micro-batches per optimizer update (the official `accum_iter`).
    pub accum_steps: usize,
    /// Explicit mask noise [B, L] (tests, fixtures); drawn from (seed, micro step) when absent.
    pub noise: Option<Vec<f64>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StepStats {
    pub loss: f64,
    pub lr: f64,
    /// Micro-steps taken so far, this one included.
    pub micro_step: u64,
    /// Optimizer updates applied so far.
    pub optimizer_step: u64,
    /// Whether this micro-step ended an accumulation window and updated the weights.
    pub updated: bool,
}

/// `(pixel / 255 - mean) / std` per channel, computed in `T` like torchvision's ToTensor + Normalize.
fn normalized_values<T: WithDType>(pixels: &[u8]) -> Vec<T> {
    let mean = IMAGENET_MEAN.map(T::from_f64);
    let std = IMAGENET_STD.map(T::from_f64);
    let scale = T::from_f64(255.0);
    pixels.iter().enumerate().map(|(i, &p)| (T::from_f64(p as f64) / scale - mean[i % 3]) / std[i % 3]).collect()
}

impl Batch<'_> {
    fn check_layout(&self) -> Result<()> {
        let Batch { pixels, batch: b, height, width, channels } = *self;
        if pixels.len() != b * height * width * channels {
            return Err(candle_core::Error::Msg(format!(
                "images: {} bytes do not hold {b} images of {height}x{width}x{channels}",
                pixels.len()
            )));
        }
        if channels != 3 {
            return Err(candle_core::Error::Msg(format!("images: expected 3 channels (RGB), got {channels}")));
        }
        Ok(())
    }

    fn dims(&self) -> [usize; 4] {
        [self.batch, self.height, self.width, self.channels]
    }
}

/// The batch normalized with the ImageNet statistics, as a [B, H, W, C] tensor of `dtype`.
pub fn normalize(batch: &Batch, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    normalize_augmented(batch, dtype, device, &AugmentSpec::default(), 0, 0)
}

/// `normalize`, then the normalized-pixel augmentations of `augment` (erasing noise drawn from
/// `seed` and `step`). Arithmetic is in f64 for f64 models and in f32 otherwise.
pub fn normalize_augmented(
    batch: &Batch,
    dtype: DType,
    device: &candle_core::Device,
    augment: &AugmentSpec,
    seed: u64,
    step: u64,
) -> Result<Tensor> {
    batch.check_layout()?;
    let dims = batch.dims();
    if dtype == DType::F64 {
        let mut v = normalized_values::<f64>(batch.pixels);
        augment.apply(&mut v, dims, seed, step)?;
        Tensor::from_vec(v, &dims[..], device)
    } else if device.is_cuda() && augment.is_empty() && !crate::device::host_normalize() {
        // On a GPU the bytes go up and are normalized there: the same bits as the host pass
        // below (convmae_kernels::normalize_rgb says why), a quarter of the upload, and no
        // single-threaded pass over the batch for the GPU to wait on (20 ms at 64 x 224 on one core).
        let pixels = Tensor::from_slice(batch.pixels, &dims[..], device)?;
        convmae_kernels::normalize_rgb(&pixels, IMAGENET_MEAN.map(|m| m as f32), IMAGENET_STD.map(|s| s as f32))?.to_dtype(dtype)
    } else {
        let mut v = normalized_values::<f32>(batch.pixels);
        augment.apply(&mut v, dims, seed, step)?;
        Tensor::from_vec(v, &dims[..], device)?.to_dtype(dtype)
    }
}

/// Where a step's host time goes, for `CONVMAE_PROFILE`: preparing the batch (normalize, mask),
/// the forward and the backward (on a GPU: building and launching them), waiting for the loss
/// (on a GPU: for the device to finish both), and the optimizer. On a GPU a wait near zero means
/// the host is the bottleneck: the device ran out of work before the host could queue more.
struct StepClock {
    last: std::time::Instant,
    ms: [f64; 5],
}

impl StepClock {
    const PARTS: [&'static str; 5] = ["prepare", "forward", "backward", "wait", "optimizer"];

    fn start() -> Self {
        Self { last: std::time::Instant::now(), ms: [0.0; 5] }
    }

    /// Ends part `i` now.
    fn lap(&mut self, i: usize) {
        let now = std::time::Instant::now();
        self.ms[i] = (now - self.last).as_secs_f64() * 1e3;
        self.last = now;
    }

    /// `[profile] prepare 1.234 forward ... optimizer ... ms` (benches/gpu/check.ts reads it).
    fn line(&self) -> String {
        let parts: Vec<String> = Self::PARTS.iter().zip(&self.ms).map(|(name, ms)| format!("{name} {ms:.3}")).collect();
        format!("[profile] {} ms", parts.join(" "))
    }
}

/// Owns the model and its optimizer state; one instance per training run.
pub struct Pretrainer {
    pub model: ConvMae,
    pub optimizer: AdamW,
    /// Drives the mask noise: micro step `s` draws from Rng::derived([seed, s]), so a resumed run
    /// masks exactly as an uninterrupted one.
    pub seed: u64,
    pub micro_step: u64,
    pending: Option<Vec<Tensor>>,
    pending_count: usize,
}

impl Pretrainer {
    pub fn new(model: ConvMae, adamw: AdamWConfig, seed: u64) -> Result<Self> {
        let optimizer = AdamW::new(adamw, &model.params)?;
        Ok(Self { model, optimizer, seed, micro_step: 0, pending: None, pending_count: 0 })
    }

    pub fn masking_for(&self, batch: usize, noise: Option<&[f64]>) -> Result<Masking> {
        let cfg = &self.model.cfg;
        let (l, keep) = (cfg.num_tokens(), cfg.len_keep());
        Ok(match noise {
            Some(n) => {
                if n.len() != batch * l {
                    return Err(candle_core::Error::Msg(format!(
                        "noise: expected {batch} x {l} = {} values, got {}",
                        batch * l,
                        n.len()
                    )));
                }
                Masking::from_noise(n, batch, l, keep)
            }
            None => Masking::random(&mut Rng::derived(&[self.seed, self.micro_step]), batch, l, keep),
        })
    }

    pub fn check_batch(&self, batch: &Batch) -> Result<()> {
        let s = self.model.cfg.img_size;
        if batch.height != s || batch.width != s {
            return Err(candle_core::Error::Msg(format!(
                "images are {}x{}, the model's img_size is {s}",
                batch.height, batch.width
            )));
        }
        if batch.batch == 0 {
            return Err(candle_core::Error::Msg("images: empty batch".into()));
        }
        Ok(())
    }

    /// One micro-step; updates the weights every `accum_steps` micro-steps.
    pub fn step(&mut self, batch: &Batch, opts: &StepOptions) -> Result<StepStats> {
        self.check_batch(batch)?;
        if opts.accum_steps == 0 {
            return Err(candle_core::Error::Msg("accum_steps must be at least 1".into()));
        }
        if !opts.lr.is_finite() || opts.lr < 0.0 {
            return Err(candle_core::Error::Msg(format!("lr must be a finite non-negative number, got {}", opts.lr)));
        }
        let profile = std::env::var_os("CONVMAE_PROFILE").is_some();
        // micro_step counts the steps done; this one is micro_step + 1.
        let profiled = crate::device::cuda_profile_step() == Some(self.micro_step + 1);
        if profiled {
            crate::device::cuda_profiler_range(self.model.device(), true).map_err(candle_core::Error::Msg)?;
        }
        let mut clock = StepClock::start();
        let imgs = normalize(batch, self.model.dtype(), self.model.device())?;
        let masking = self.masking_for(batch.batch, opts.noise.as_deref())?;
        clock.lap(0);
        let out = self.model.forward_pretrain(&imgs, &masking)?;
        clock.lap(1);
        // The official loop divides the loss by accum_iter before backward.
        let scaled = (&out.loss / opts.accum_steps as f64)?;
        let grads = scaled.backward()?;
        clock.lap(2);
        // The loss is read only now, with the backward queued: reading it waits for the device,
        // and waiting between forward and backward would leave a GPU idle while the host builds
        // and launches the whole backward. A non-finite loss still changes nothing: it is
        // checked before the gradients are kept or applied.
        let loss = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        clock.lap(3);
        if !loss.is_finite() {
            return Err(candle_core::Error::Msg(format!(
                "loss is {loss} at micro step {}; weights were not updated (lower the lr or resume from a checkpoint)",
                self.micro_step
            )));
        }
        let grads = accumulable(self.model.params.gradients(&grads)?, self.model.dtype(), opts.accum_steps)?;
        self.pending = Some(match self.pending.take() {
            None => grads,
            Some(acc) => acc.iter().zip(&grads).map(|(a, g)| a + g).collect::<Result<_>>()?,
        });
        self.pending_count += 1;
        self.micro_step += 1;
        let updated = self.pending_count >= opts.accum_steps;
        if updated {
            let grads = self.pending.take().unwrap();
            self.pending_count = 0;
            self.optimizer.update(&self.model.params, &grads, opts.lr)?;
            if crate::device::check_copies() {
                if let Some(name) = self.model.params.stale_copy()? {
                    return Err(candle_core::Error::Msg(format!(
                        "CONVMAE_CHECK_COPIES: the compute copy of '{name}' is not its master rounded after optimizer step {}",
                        self.optimizer.step
                    )));
                }
            }
        }
        if profiled {
            crate::device::cuda_profiler_range(self.model.device(), false).map_err(candle_core::Error::Msg)?;
        }
        clock.lap(4);
        if profile {
            eprintln!("{}", clock.line());
        }
        Ok(StepStats { loss, lr: opts.lr, micro_step: self.micro_step, optimizer_step: self.optimizer.step, updated })
    }

    /// Whether gradients of an unfinished accumulation window are held (a checkpoint then would lose them).
    pub fn has_pending_gradients(&self) -> bool {
        self.pending_count > 0
    }
}

/// One micro-batch's gradients as an accumulation window keeps them: with several micro-batches
/// a window, in the master dtype, so that mixed precision's bf16 gradients sum in f32 (as their
/// f32 casts did before the compute copies); with one, as they came (the optimizer reads bf16).
pub(crate) fn accumulable(grads: Vec<Tensor>, master: DType, accum_steps: usize) -> Result<Vec<Tensor>> {
    if accum_steps == 1 {
        return Ok(grads);
    }
    grads.into_iter().map(|g| g.to_dtype(master)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device path's op (run here on the CPU) gives the host path's bits.
    #[test]
    fn the_device_normalization_matches_the_host_path_bitwise() {
        let (b, s) = (2, 16);
        let pixels: Vec<u8> = (0..b * s * s * 3).map(|i| ((i * 37 + 11) % 256) as u8).collect();
        let batch = Batch { pixels: &pixels, batch: b, height: s, width: s, channels: 3 };
        let host = normalize(&batch, DType::F32, &candle_core::Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let px = Tensor::from_slice(&pixels, (b, s, s, 3), &candle_core::Device::Cpu).unwrap();
        let op = convmae_kernels::normalize_rgb(&px, IMAGENET_MEAN.map(|m| m as f32), IMAGENET_STD.map(|s| s as f32)).unwrap();
        let op = op.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(host.iter().zip(&op).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
