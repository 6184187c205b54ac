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
        let pixels = convmae_kernels::upload(batch.pixels, &dims[..], device)?;
        convmae_kernels::normalize_rgb(&pixels, IMAGENET_MEAN.map(|m| m as f32), IMAGENET_STD.map(|s| s as f32))?.to_dtype(dtype)
    } else {
        let mut v = normalized_values::<f32>(batch.pixels);
        augment.apply(&mut v, dims, seed, step)?;
        Tensor::from_vec(v, &dims[..], device)?.to_dtype(dtype)
    }
}

/// Where a step's host time goes, for `CONVMAE_PROFILE`: preparing the batch (normalize, mask),
/// the forward and the backward (on a GPU: building and launching them), the optimizer (on a
/// GPU: queueing it), and waiting for the loss (on a GPU: for the device to finish the forward;
/// with overlapped steps the next step's launch comes first). On a GPU a wait near zero means
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

/// How `out`'s backward runs, for `CONVMAE_PROFILE` (the GPU check keeps the line with its row).
fn backward_route(out: &crate::model::PretrainOutput) -> &'static str {
    match &out.tape {
        None => "by candle's (CONVMAE_COMPOSITE_OPS lists tape_backward)",
        Some(_) if out.backward_by_tape() => "on the tape of our ops",
        Some(_) => "by candle's (an op of candle's, or a composition, stands between the loss and the parameters: the tape does not cover the graph)",
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
    /// The micro-step queued on the device whose loss the host has not read yet.
    in_flight: Option<InFlight>,
    /// Answers of micro-steps settled while starting another command, oldest first.
    settled: std::collections::VecDeque<Result<StepStats>>,
    /// Whether `CONVMAE_PROFILE`'s line saying how the backward runs has been printed.
    backward_reported: bool,
}

/// A micro-step's forward and backward, queued.
struct Launched {
    loss: Tensor,
    grads: candle_core::backprop::GradStore,
    /// The loss's copy to the host, queued right after the forward, so that waiting for it
    /// waits for the forward only.
    loss_on_host: convmae_kernels::PendingValue,
    opts: StepOptions,
    clock: StepClock,
    profiled: bool,
}

/// What a micro-step changes on the host, as it was before the step: what a non-finite loss
/// puts back.
struct Before {
    micro_step: u64,
    optimizer_step: u64,
    pending: Option<Vec<Tensor>>,
    pending_count: usize,
}

/// A micro-step fully queued (its accumulation and, at the end of a window, its update, which
/// the device skips if the loss is not finite) whose loss the host has yet to read.
struct InFlight {
    loss_on_host: convmae_kernels::PendingValue,
    before: Before,
    stats: StepStats,
    clock: StepClock,
}

/// What `apply` made of a launched micro-step.
enum Applied {
    InFlight(InFlight),
    /// The update could not be made conditional on the device, so the loss was read first.
    Settled(Result<StepStats>),
}

impl Pretrainer {
    pub fn new(model: ConvMae, adamw: AdamWConfig, seed: u64) -> Result<Self> {
        let optimizer = AdamW::new(adamw, &model.params)?;
        Ok(Self { model, optimizer, seed, micro_step: 0, pending: None, pending_count: 0, in_flight: None, settled: Default::default(), backward_reported: false })
    }

    /// The masks of a batch of `batch` images: one per image, or under `complementary_masking`
    /// the complementary views of each. `noise` ([batch, L]) is the official forward's
    /// `torch.rand(B, L)`; drawn from (seed, micro step) when absent.
    pub fn masking_for(&self, batch: usize, noise: Option<&[f64]>) -> Result<Masking> {
        let cfg = &self.model.cfg;
        let (l, keep) = (cfg.num_tokens(), cfg.len_keep());
        let noise = match noise {
            Some(n) if n.len() != batch * l => {
                return Err(candle_core::Error::Msg(format!("noise: expected {batch} x {l} = {} values, got {}", batch * l, n.len())));
            }
            Some(n) => n.to_vec(),
            None => crate::masking::uniform_noise(&mut Rng::derived(&[self.seed, self.micro_step]), batch, l),
        };
        if cfg.complementary_masking {
            Masking::complementary_from_noise(&noise, batch, l, keep)
        } else {
            Ok(Masking::from_noise(&noise, batch, l, keep))
        }
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

    /// One micro-step; updates the weights every `accum_steps` micro-steps. Returns when it is
    /// done (on a GPU: when its loss is known; the rest of its work is queued behind). A step
    /// `start_step` left in flight is settled first; its answer stays for `take_settled`.
    pub fn step(&mut self, batch: &Batch, opts: &StepOptions) -> Result<StepStats> {
        self.settle_in_flight();
        let launched = self.launch(batch, opts)?;
        match self.apply(launched) {
            Applied::InFlight(f) => self.settle(f),
            Applied::Settled(r) => r,
        }
    }

    /// Overlapped steps: launches this micro-step's forward and backward, then settles the one
    /// in flight (its answer goes to `take_settled`), then queues this one's update and leaves
    /// it in flight. On a GPU the host thus builds and queues step k + 1 while the device still
    /// runs step k, instead of idling the device while it does. Every answer is what `step`
    /// would have given, in order; if the settled step's loss was not finite, it failed as in
    /// `step` (nothing of it applied), and so does this one, whose launch is then dropped: the
    /// state is as before the failed step, as if the two had been taken one at a time and the
    /// caller had stopped at the error. Returns None while this step is in flight, else its
    /// answer (the earlier one's is in `take_settled`).
    pub fn start_step(&mut self, batch: &Batch, opts: &StepOptions) -> Option<Result<StepStats>> {
        let launched = self.launch(batch, opts);
        let earlier_failed = match self.in_flight.take() {
            Some(f) => {
                let r = self.settle(f);
                let failed = r.as_ref().err().map(|e| e.to_string());
                self.settled.push_back(r);
                failed
            }
            None => None,
        };
        let launched = match (launched, earlier_failed) {
            (Err(e), _) => return Some(Err(e)),
            (Ok(_), Some(earlier)) => {
                let e = format!("micro step {} was not applied: the one before it failed ({earlier})", self.micro_step + 1);
                return Some(Err(candle_core::Error::Msg(e)));
            }
            (Ok(l), None) => l,
        };
        match self.apply(launched) {
            Applied::InFlight(f) => {
                self.in_flight = Some(f);
                None
            }
            Applied::Settled(r) => Some(r),
        }
    }

    /// Settles the micro-step in flight, if any (its answer goes to `take_settled`).
    pub fn settle_in_flight(&mut self) {
        if let Some(f) = self.in_flight.take() {
            let r = self.settle(f);
            self.settled.push_back(r);
        }
    }

    /// The oldest answer of a settled micro-step not yet taken.
    pub fn take_settled(&mut self) -> Option<Result<StepStats>> {
        self.settled.pop_front()
    }

    /// Whether a micro-step is in flight.
    pub fn has_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Whether the micro-step in flight, if any, can be settled without waiting: its loss has
    /// reached the host (on the CPU it always has).
    pub fn in_flight_ready(&self) -> bool {
        self.in_flight.as_ref().is_none_or(|f| f.loss_on_host.is_ready())
    }

    /// Checks the step, then queues normalize, mask, forward, the loss's copy to the host, and
    /// the backward.
    fn launch(&mut self, batch: &Batch, opts: &StepOptions) -> Result<Launched> {
        self.check_batch(batch)?;
        if opts.accum_steps == 0 {
            return Err(candle_core::Error::Msg("accum_steps must be at least 1".into()));
        }
        if !opts.lr.is_finite() || opts.lr < 0.0 {
            return Err(candle_core::Error::Msg(format!("lr must be a finite non-negative number, got {}", opts.lr)));
        }
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
        if !self.backward_reported && std::env::var_os("CONVMAE_PROFILE").is_some() {
            self.backward_reported = true;
            eprintln!("convmae: the pretraining backward runs {}", backward_route(&out));
        }
        let loss_on_host = convmae_kernels::read_later(&out.loss)?;
        clock.lap(1);
        // The official loop divides the loss by accum_iter before backward.
        let grads = out.backward_scaled(1.0 / opts.accum_steps as f64)?;
        clock.lap(2);
        Ok(Launched { loss: out.loss, grads, loss_on_host, opts: opts.clone(), clock, profiled })
    }

    /// Queues a launched micro-step's accumulation and, at the end of a window, the optimizer
    /// update, made conditional on the device on the loss being finite. Where the update cannot
    /// be made conditional (`AdamW::update_if_finite`), reads the loss first, as before.
    fn apply(&mut self, launched: Launched) -> Applied {
        let Launched { loss, grads, loss_on_host, opts, mut clock, profiled } = launched;
        let before = Before {
            micro_step: self.micro_step,
            optimizer_step: self.optimizer.step,
            pending: self.pending.clone(),
            pending_count: self.pending_count,
        };
        let result = (|| -> Result<(StepStats, bool)> {
            let grads = accumulable(self.model.params.gradients(&grads)?, self.model.dtype(), opts.accum_steps)?;
            let pending = match self.pending.take() {
                None => grads,
                Some(acc) => acc.iter().zip(&grads).map(|(a, g)| a + g).collect::<Result<_>>()?,
            };
            self.micro_step += 1;
            self.pending_count += 1;
            let updated = self.pending_count >= opts.accum_steps;
            let mut conditional = true;
            if updated {
                self.pending_count = 0;
                conditional = self.optimizer.update_if_finite(&self.model.params, &pending, opts.lr, &loss)?;
                if !conditional {
                    // Read the loss before the unconditional update (waits for the forward).
                    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    if !value.is_finite() {
                        return Err(self.non_finite_at(value, before.micro_step));
                    }
                    self.optimizer.update(&self.model.params, &pending, opts.lr)?;
                }
                self.check_copies()?;
            } else {
                self.pending = Some(pending);
            }
            let stats = StepStats { loss: f64::NAN, lr: opts.lr, micro_step: self.micro_step, optimizer_step: self.optimizer.step, updated };
            Ok((stats, conditional))
        })();
        if profiled {
            if let Err(e) = crate::device::cuda_profiler_range(self.model.device(), false) {
                eprintln!("CONVMAE_CUDA_PROFILE_STEP: {e}");
            }
        }
        clock.lap(4);
        match result {
            Ok((stats, true)) => Applied::InFlight(InFlight { loss_on_host, before, stats, clock }),
            // The loss was read above; settling only fills it in.
            Ok((stats, false)) => Applied::Settled(self.settle(InFlight { loss_on_host, before, stats, clock })),
            Err(e) => {
                self.restore(before);
                Applied::Settled(Err(e))
            }
        }
    }

    /// Waits for an in-flight micro-step's loss. A finite loss completes its answer; a
    /// non-finite one fails it and puts back what it changed on the host (the device skipped
    /// its update).
    fn settle(&mut self, f: InFlight) -> Result<StepStats> {
        let InFlight { loss_on_host, before, mut stats, mut clock } = f;
        clock.last = std::time::Instant::now();
        let loss = loss_on_host.wait();
        clock.lap(3);
        if std::env::var_os("CONVMAE_PROFILE").is_some() {
            eprintln!("{}", clock.line());
        }
        let loss = match loss {
            Ok(l) => l,
            Err(e) => {
                self.restore(before);
                return Err(e);
            }
        };
        if !loss.is_finite() {
            let e = self.non_finite_at(loss, before.micro_step);
            self.restore(before);
            return Err(e);
        }
        stats.loss = loss;
        Ok(stats)
    }

    fn restore(&mut self, before: Before) {
        self.micro_step = before.micro_step;
        self.optimizer.step = before.optimizer_step;
        self.pending = before.pending;
        self.pending_count = before.pending_count;
    }

    /// The error of a micro-step whose loss is not finite; `done` micro-steps came before it.
    fn non_finite_at(&self, loss: f64, done: u64) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "loss is {loss} at micro step {done}; weights were not updated (lower the lr or resume from a checkpoint)"
        ))
    }

    /// `CONVMAE_CHECK_COPIES`: after an update, every compute copy is its master rounded.
    fn check_copies(&self) -> Result<()> {
        if crate::device::check_copies() {
            if let Some(name) = self.model.params.stale_copy()? {
                return Err(candle_core::Error::Msg(format!(
                    "CONVMAE_CHECK_COPIES: the compute copy of '{name}' is not its master rounded after optimizer step {}",
                    self.optimizer.step
                )));
            }
        }
        Ok(())
    }

    /// Whether gradients of an unfinished accumulation window are held (a checkpoint then would
    /// lose them). Settle the step in flight first.
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

    /// `CONVMAE_PROFILE`'s line names each of the three routes: the tape where it covers the
    /// graph (golden_small on packed f32 copies, every sublayer one op), candle's where the
    /// switch lists `tape_backward`, and candle's where the graph holds candle's ops (the
    /// unpacked model).
    #[test]
    fn the_profile_line_names_how_the_backward_runs() {
        use crate::params::{pretrain_param_specs, Packing, ParamStore};
        let cfg = crate::ConvMaeConfig::golden_small();
        let store = ParamStore::init(pretrain_param_specs(&cfg), DType::F64, &candle_core::Device::Cpu, 7).unwrap();
        let mut packed = ConvMae::new(cfg.clone(), DType::F32, &candle_core::Device::Cpu, 1).unwrap();
        packed.params = store.compute_view(DType::F32, Packing::Sublayers).unwrap();
        let unpacked = ConvMae::new(cfg.clone(), DType::F32, &candle_core::Device::Cpu, 1).unwrap();
        let masking = crate::masking::Masking::random(&mut crate::rng::Rng::new(3), 2, cfg.num_tokens(), cfg.len_keep());
        let imgs = Tensor::randn(0f32, 1.0, (2, cfg.img_size, cfg.img_size, 3), &candle_core::Device::Cpu).unwrap();
        let route = |model: &ConvMae, switched_off: bool| {
            let run = || backward_route(&model.forward_pretrain(&imgs, &masking).unwrap());
            convmae_kernels::with_path(convmae_kernels::Path::Kernels, || if switched_off { convmae_kernels::with_composite_ops(&["tape_backward"], run) } else { run() })
        };
        assert_eq!(route(&packed, false), "on the tape of our ops");
        assert!(route(&packed, true).contains("CONVMAE_COMPOSITE_OPS lists tape_backward"));
        assert!(route(&unpacked, false).contains("the tape does not cover the graph"));
    }
}
