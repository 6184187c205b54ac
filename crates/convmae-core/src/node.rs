//! The N-API surface: marshalling only. Everything it calls lives in the napi-free core.
//! Long work runs on the model's worker thread (or a short-lived thread) and resolves a Promise,
//! so the Node event loop and the libuv pool stay free.

use crate::checkpoint::LoadReport;
use crate::config::ConvMaeConfig;
use crate::device::DeviceSpec;
use crate::precision::Precision;
use crate::fixture;
use crate::imaging;
use crate::flops::macs_per_image;
use crate::model::{ConvMae, ConvPath};
use crate::optim::AdamWConfig;
use crate::params::pretrain_param_specs;
use crate::augment::AugmentSpec;
use crate::classify::{ClassifierTrainer, OptimizerConfig, Targets, TrainStepOptions};
use crate::model::classifier::{ClassifierHead, ConvViT};
use crate::threads::ThreadChoice;
use crate::session::{ClassifierCommand, ClassifierReply, Command, DetectorCommand, DetectorReply, Images, Reply, SegmenterCommand, SegmenterReply, Session, Worker};
use crate::detect::{DetectorAdamWConfig, DetectorTrainer};
use crate::model::detector::{Detector, DetectorHead, ImageTargets};
use crate::model::segmenter::{Segmenter, SegmenterHead};
use crate::segment::{SegmenterAdamWConfig, SegmenterTrainer};
use crate::train::{Pretrainer, StepOptions};
use candle_core::DType;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::sync::Mutex;
use tokio::sync::oneshot;

fn js_err(msg: impl std::fmt::Display) -> Error {
    Error::from_reason(msg.to_string())
}

fn parse_dtype(dtype: &str) -> Result<DType> {
    match dtype {
        "f32" | "float32" => Ok(DType::F32),
        "f64" | "float64" => Ok(DType::F64),
        other => Err(js_err(format!("dtype must be 'f32' or 'f64', got '{other}'"))),
    }
}

/// A `seed` argument: a non-negative integer.
fn parse_seed(seed: i64) -> Result<u64> {
    u64::try_from(seed).map_err(|_| js_err(format!("seed must be a non-negative integer, got {seed}")))
}

/// A `precision` argument ('fp32' when absent) for master weights of `dtype`: bf16 needs f32.
fn parse_precision(precision: Option<&str>, dtype: DType) -> Result<Precision> {
    let precision = Precision::parse(precision.unwrap_or("fp32")).map_err(js_err)?;
    precision.check_master(dtype).map_err(js_err)?;
    Ok(precision)
}

/// A `device` argument: 'cpu' when absent, else 'cpu', 'cuda' or 'cuda:N' (see `DeviceSpec::parse`).
fn parse_device(device: Option<&str>) -> Result<DeviceSpec> {
    DeviceSpec::parse(device.unwrap_or("cpu")).map_err(js_err)
}

fn parse_config(json: &str) -> Result<ConvMaeConfig> {
    ConvMaeConfig::from_json(json).map_err(js_err)
}

/// Runs `f` on a fresh thread and awaits its result without blocking Node.
async fn off_thread<T: Send + 'static>(f: impl FnOnce() -> std::result::Result<T, String> + Send + 'static) -> Result<T> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .unwrap_or_else(|_| Err("internal error (Rust panic)".to_string()));
        let _ = tx.send(r);
    });
    rx.await.map_err(|_| js_err("worker thread ended without an answer"))?.map_err(js_err)
}

/// The config of a named preset, as JSON.
#[napi]
pub fn preset_config(name: String) -> Result<String> {
    let cfg = ConvMaeConfig::preset(&name).map_err(js_err)?;
    Ok(serde_json::to_string(&cfg).unwrap())
}

/// Validates a config (JSON, every field optional over ConvMAE-B) and returns it complete.
#[napi]
pub fn resolve_config(json: String) -> Result<String> {
    Ok(serde_json::to_string(&parse_config(&json)?).unwrap())
}

/// Tensor names, shapes, parameter counts and MACs per image of a config, as JSON.
#[napi]
pub fn model_info(config_json: String) -> Result<String> {
    let cfg = parse_config(&config_json)?;
    let specs = pretrain_param_specs(&cfg);
    let tensors: Vec<_> = specs
        .iter()
        .map(|s| serde_json::json!({ "name": s.name, "shape": s.shape, "trainable": s.trainable }))
        .collect();
    let total: usize = specs.iter().map(|s| s.numel()).sum();
    let trainable: usize = specs.iter().filter(|s| s.trainable).map(|s| s.numel()).sum();
    let decoder: usize = specs
        .iter()
        .filter(|s| s.name.starts_with("decoder") || s.name == "mask_token")
        .map(|s| s.numel())
        .sum();
    let fusion: usize = specs.iter().filter(|s| s.name.starts_with("stage")).map(|s| s.numel()).sum();
    Ok(serde_json::json!({
        "config": cfg,
        "tensors": tensors,
        "count": specs.len(),
        "elements": total,
        "trainableElements": trainable,
        "encoderElements": total - decoder - fusion,
        "fusionElements": fusion,
        "decoderElements": decoder,
        "macs": macs_per_image(&cfg),
    })
    .to_string())
}

/// Runs a golden-format fixture through the model; resolves to the JSON report.
#[napi]
pub async fn check_fixture(path: String, dtype: String, conv_path: Option<String>, device: Option<String>) -> Result<String> {
    let dtype = parse_dtype(&dtype)?;
    let conv_path = ConvPath::parse(conv_path.as_deref().unwrap_or("sparse")).map_err(js_err)?;
    let device = parse_device(device.as_deref())?;
    off_thread(move || {
        let device = device.open()?;
        fixture::check_fixture_on(&path, dtype, conv_path, &device)
            .map(|r| serde_json::to_string(&r).unwrap())
            .map_err(|e| e.to_string())
    })
    .await
}

/// The metadata of a checkpoint as a JSON object of strings (ours: format, kind, config, head,
/// optimizer, ...; an official .pth has none: {}).
#[napi]
pub async fn checkpoint_metadata(path: String) -> Result<String> {
    off_thread(move || {
        let file = crate::checkpoint::read_checkpoint(std::path::Path::new(&path)).map_err(|e| e.to_string())?;
        Ok(serde_json::to_string(&file.metadata).unwrap())
    })
    .await
}

/// The model configuration of a checkpoint as JSON `{config, source}`: from our metadata
/// (`source` "metadata", our files only), else as its encoder tensors' shapes give it ("shapes":
/// `CheckpointFile::inferred_config`; num_heads a guess); null when it holds neither.
#[napi]
pub async fn checkpoint_config(path: String) -> Result<Option<String>> {
    off_thread(move || {
        let file = crate::checkpoint::read_checkpoint(std::path::Path::new(&path)).map_err(|e| e.to_string())?;
        // Our files' metadata; another file's `config` (a golden fixture's, say) is not ours to read.
        let ours = if file.format == "convmae" { file.config() } else { None };
        let (config, source) = match (ours, file.inferred_config()) {
            (Some(c), _) => (c.map_err(|e| format!("checkpoint '{path}': {e}"))?, "metadata"),
            (None, Some(c)) => (c.map_err(|e| format!("checkpoint '{path}': {e}"))?, "shapes"),
            (None, None) => return Ok(None),
        };
        Ok(Some(serde_json::json!({ "config": config, "source": source }).to_string()))
    })
    .await
}

/// Agreement of every kernel on `device` with the CPU kernels (forward and every gradient, at
/// ConvMAE-B-like shapes), as JSON: [{op, path, dtype, shapes, forward_rel, gradient_rel,
/// gradient_rels, kernel, tolerance, pass}]. On CUDA both paths (our CUDA kernels, "kernels";
/// candle's ops, "composite") in f32 and bf16; on the CPU the kernels in f32. `only`: just the
/// cases whose names contain it, by our kernels, in f32 and bf16.
#[napi]
pub async fn compare_kernels(device: String, only: Option<String>) -> Result<String> {
    use candle_core::DType;
    use convmae_kernels::Path;
    let device = parse_device(Some(&device))?;
    off_thread(move || {
        let device = device.open()?;
        let report = if let Some(part) = only {
            // One family of cases alone (the GPU check's probe of a new form of attention).
            convmae_kernels::agreement::compare_only(&device, &part, &[DType::F32, DType::BF16])
        } else if device.is_cpu() {
            convmae_kernels::agreement::compare_on(&device)
        } else {
            convmae_kernels::agreement::compare_paths(&device, &[Path::Kernels, Path::Composite], &[DType::F32, DType::BF16])
        };
        report.map(|r| serde_json::to_string(&r).unwrap()).map_err(|e| e.to_string())
    })
    .await
}

/// Forward and forward + backward times of each op at the shapes of a ConvMAE-B step of `batch`
/// images, by our kernels and by candle's compositions, as JSON: [{op, path, dtype, shapes,
/// kernel, forward_ms, forward_backward_ms, reps}]. `dtypes`: "f32" and / or "bf16".
#[napi]
pub async fn time_kernels(device: String, batch: u32, reps: u32, dtypes: Vec<String>) -> Result<String> {
    use candle_core::DType;
    use convmae_kernels::Path;
    let device = parse_device(Some(&device))?;
    let dtypes = dtypes
        .iter()
        .map(|d| match d.as_str() {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::BF16),
            other => Err(js_err(format!("timeKernels: dtype must be 'f32' or 'bf16', got '{other}'"))),
        })
        .collect::<Result<Vec<_>>>()?;
    off_thread(move || {
        let device = device.open()?;
        let mut rows = Vec::new();
        for dtype in dtypes {
            rows.extend(
                convmae_kernels::op_timing::time_ops(&device, &[Path::Kernels, Path::Composite], dtype, batch as usize, reps as usize)
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok(serde_json::to_string(&rows).unwrap())
    })
    .await
}

/// Peak bytes of CUDA device `ordinal`'s memory pool in this process: {used_high, reserved_high}.
#[napi]
pub fn cuda_pool_peaks(ordinal: u32) -> Result<String> {
    crate::device::cuda_pool_peaks(ordinal as usize).map(|p| serde_json::to_string(&p).unwrap()).map_err(js_err)
}

/// Polygons (`lengths[p]` numbers of `coords` each: x1, y1, x2, y2, ...) rasterized as
/// pycocotools does (crate::polygons::rasterize), a row-major [height, width] mask.
#[napi]
pub fn rasterize_polygons(lengths: Uint32Array, coords: Float64Array, height: u32, width: u32) -> Result<Uint8Array> {
    let polygons = instance_polygons(&[lengths.len() as u32], &lengths, &coords, 1)?.pop().unwrap_or_default();
    Ok(crate::polygons::rasterize(&polygons, height as usize, width as usize).into())
}

/// An RGB image [height, width, 3] resized as Pillow's `Image.resize` resizes it, with its
/// BILINEAR or BICUBIC filter (crate::imaging::resized): detectron2's ResizeTransform.
#[napi]
pub fn resize_pil(pixels: Uint8Array, width: u32, height: u32, out_width: u32, out_height: u32, filter: String) -> Result<Uint8Array> {
    let filter = match filter.as_str() {
        "bilinear" => imaging::Filter::Bilinear,
        "bicubic" => imaging::Filter::Bicubic,
        other => return Err(js_err(format!("resizePil: filter must be 'bilinear' or 'bicubic', got '{other}'"))),
    };
    if pixels.len() != width as usize * height as usize * 3 || out_width == 0 || out_height == 0 {
        return Err(js_err(format!("resizePil: {} bytes for a {width}x{height} RGB image, to {out_width}x{out_height}", pixels.len())));
    }
    let image = imaging::DecodedImage { pixels: pixels.to_vec(), width: width as usize, height: height as usize, channels: 3 };
    Ok(imaging::resized(&image, out_width as usize, out_height as usize, filter).map_err(js_err)?.into())
}

/// Whether this build has the CUDA backend (`npm run build:cuda`).
#[napi]
pub fn cuda_build() -> bool {
    crate::device::CUDA_BUILD
}

/// Times the depthwise conv of conv stage `stage` (1 or 2) of a preset, dense-masked vs sparse,
/// forward and forward + backward, f32 on the CPU; resolves to JSON (see bench.rs).
#[napi]
pub async fn bench_depthwise_conv(preset: String, stage: u32, batch: u32, iters: u32) -> Result<String> {
    let cfg = ConvMaeConfig::preset(&preset).map_err(js_err)?;
    if !(1..=2).contains(&stage) {
        return Err(js_err(format!("stage must be 1 or 2, got {stage}")));
    }
    off_thread(move || {
        crate::bench::depthwise_conv_timings(&cfg, stage as usize - 1, batch as usize, iters.max(1) as usize, 0)
            .map(|t| serde_json::to_string(&t).unwrap())
            .map_err(|e| e.to_string())
    })
    .await
}

/// Times GELU (erf form), ours vs candle's, forward and forward + backward, on `elements` f32
/// inputs from N(0, inputStd^2), on the CPU; resolves to JSON (see bench.rs).
#[napi]
pub async fn bench_gelu(elements: u32, input_std: f64, iters: u32) -> Result<String> {
    if elements == 0 || !(input_std.is_finite() && input_std > 0.0) {
        return Err(js_err(format!("benchGelu: elements must be positive and inputStd a positive number, got {elements} and {input_std}")));
    }
    off_thread(move || {
        crate::bench::gelu_timings(elements as usize, input_std, iters.max(1) as usize, 0)
            .map(|t| serde_json::to_string(&t).unwrap())
            .map_err(|e| e.to_string())
    })
    .await
}

#[napi(object)]
pub struct StepResult {
    pub loss: f64,
    pub lr: f64,
    pub micro_step: i64,
    pub optimizer_step: i64,
    pub updated: bool,
}

#[napi(object)]
pub struct LoadResult {
    /// JSON of the LoadReport (format, loaded, missing, unexpected, optimizerRestored).
    pub report: String,
    /// The `extra` JSON saved with the checkpoint (loop state), "{}" if none.
    pub extra: String,
}

#[napi(object)]
pub struct ReconstructionResult {
    pub pixels: Buffer,
    pub width: u32,
    pub height: u32,
    pub loss: f64,
}

/// A pretraining model and its optimizer, owned by one worker thread.
#[napi]
pub struct NativePretrainer {
    session: Mutex<Session<Pretrainer>>,
}

fn images(pixels: &[u8], batch: u32, height: u32, width: u32) -> Images {
    Images { pixels: pixels.to_vec(), batch: batch as usize, height: height as usize, width: width as usize }
}

/// Queues `command` on the session's worker now, and returns its answer to await.
fn submit<W: Worker>(session: &Mutex<Session<W>>, command: W::Command) -> Result<oneshot::Receiver<std::result::Result<W::Reply, String>>> {
    let (tx, rx) = oneshot::channel();
    session.lock().map_err(|_| js_err("session lock poisoned"))?.submit(
        command,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    Ok(rx)
}

/// The answer of a submitted command, awaited without blocking Node.
async fn answer<R>(rx: oneshot::Receiver<std::result::Result<R, String>>) -> Result<R> {
    rx.await.map_err(|_| js_err("the model worker ended without an answer"))?.map_err(js_err)
}

/// Queues `command` on the session's worker and awaits its answer without blocking Node.
async fn call<W: Worker>(session: &Mutex<Session<W>>, command: W::Command) -> Result<W::Reply> {
    answer(submit(session, command)?).await
}

impl NativePretrainer {
    async fn call(&self, command: Command) -> Result<Reply> {
        call(&self.session, command).await
    }
}

#[napi]
impl NativePretrainer {
    /// `configJson` is validated here, synchronously; the weights are built on the worker.
    /// `threads`: the CPU threads of the steps; absent: all of rayon's; 0: auto (threads.rs).
    #[napi(constructor)]
    pub fn new(
        config_json: String,
        dtype: String,
        seed: i64,
        adamw_json: Option<String>,
        conv_path: Option<String>,
        device: Option<String>,
        precision: Option<String>,
        threads: Option<u32>,
    ) -> Result<Self> {
        let cfg = parse_config(&config_json)?;
        let conv_path = ConvPath::parse(conv_path.as_deref().unwrap_or("sparse")).map_err(js_err)?;
        let dtype = parse_dtype(&dtype)?;
        let adamw: AdamWConfig = match adamw_json {
            Some(j) => serde_json::from_str(&j).map_err(|e| js_err(format!("invalid AdamW options: {e}")))?,
            None => AdamWConfig::default(),
        };
        let seed = parse_seed(seed)?;
        let device = parse_device(device.as_deref())?;
        let precision = parse_precision(precision.as_deref(), dtype)?;
        let session = Session::start(move || {
            let device = device.open()?;
            let mut model = ConvMae::new(cfg, dtype, &device, seed).map_err(|e| e.to_string())?;
            model.path = conv_path;
            model.precision = precision;
            Pretrainer::new(model, adamw, seed).map_err(|e| e.to_string())
        }, ThreadChoice::from_option(threads));
        Ok(Self { session: Mutex::new(session) })
    }

    /// One pretraining micro-step on uint8 [batch, height, width, 3] images. The images are
    /// copied and the step queued before this returns, so steps run in the order of the calls
    /// (a caller may start the next before awaiting this one, which lets a GPU model overlap
    /// them) and the buffer may be refilled at once.
    #[napi(ts_return_type = "Promise<StepResult>")]
    pub fn step<'env>(
        &self,
        env: &'env Env,
        pixels: Uint8Array,
        batch: u32,
        height: u32,
        width: u32,
        lr: f64,
        accum_steps: u32,
        noise: Option<Float64Array>,
    ) -> Result<PromiseRaw<'env, StepResult>> {
        let command = Command::Step {
            images: images(&pixels, batch, height, width),
            opts: StepOptions { lr, accum_steps: accum_steps as usize, noise: noise.map(|n| n.to_vec()) },
        };
        let rx = submit(&self.session, command)?;
        env.spawn_future(async move {
            match answer(rx).await? {
                Reply::Step(s) => Ok(StepResult {
                    loss: s.loss,
                    lr: s.lr,
                    micro_step: s.micro_step as i64,
                    optimizer_step: s.optimizer_step as i64,
                    updated: s.updated,
                }),
                _ => Err(js_err("unexpected reply to step")),
            }
        })
    }

    /// Writes weights, optimizer state and `extra` (JSON) atomically.
    #[napi]
    pub async fn save(&self, path: String, extra: String) -> Result<()> {
        match self.call(Command::Save { path: path.into(), extra }).await? {
            Reply::Saved => Ok(()),
            _ => Err(js_err("unexpected reply to save")),
        }
    }

    /// Loads a checkpoint (ours, or an official .pth); optimizer state too when present.
    #[napi]
    pub async fn load(&self, path: String, strict: bool) -> Result<LoadResult> {
        match self.call(Command::Load { path: path.into(), strict }).await? {
            Reply::Loaded { report, extra } => Ok(LoadResult { report: report_json(&report), extra }),
            _ => Err(js_err("unexpected reply to load")),
        }
    }

    /// Loads another run's weights as a starting point (checkpoint::init_pretrainer_from).
    #[napi]
    pub async fn init_from(&self, path: String) -> Result<LoadResult> {
        match self.call(Command::InitFrom { path: path.into() }).await? {
            Reply::Loaded { report, extra } => Ok(LoadResult { report: report_json(&report), extra }),
            _ => Err(js_err("unexpected reply to initFrom")),
        }
    }

    /// original | masked | reconstruction | reconstruction + visible, one row per image.
    #[napi]
    pub async fn reconstruct(&self, pixels: Uint8Array, batch: u32, height: u32, width: u32, seed: i64) -> Result<ReconstructionResult> {
        let command = Command::Reconstruct { images: images(&pixels, batch, height, width), seed: parse_seed(seed)? };
        match self.call(command).await? {
            Reply::Reconstruction(r) => Ok(ReconstructionResult {
                pixels: r.pixels.into(),
                width: r.width as u32,
                height: r.height as u32,
                loss: r.loss,
            }),
            _ => Err(js_err("unexpected reply to reconstruct")),
        }
    }

    /// Frees the model after queued commands finish. Further calls reject.
    #[napi]
    pub fn dispose(&self) -> Result<()> {
        self.session.lock().map_err(|_| js_err("session lock poisoned"))?.dispose();
        Ok(())
    }

    /// The CPU threads the steps run on now (with auto: the count being timed, then the one
    /// chosen; 0 until the worker has started).
    #[napi]
    pub fn threads(&self) -> Result<u32> {
        Ok(self.session.lock().map_err(|_| js_err("session lock poisoned"))?.threads_in_use() as u32)
    }
}

fn report_json(r: &LoadReport) -> String {
    serde_json::json!({
        "format": r.format,
        "loaded": r.loaded,
        "missing": r.missing,
        "unexpected": r.unexpected,
        "reinitialized": r.reinitialized,
        "optimizerRestored": r.optimizer_restored,
    })
    .to_string()
}

#[napi(object)]
pub struct TrainStepResult {
    pub loss: f64,
    pub lr: f64,
    /// Optimizer updates applied so far, this one included.
    pub step: i64,
    /// Whether this micro-batch ended an accumulation window and updated the weights.
    pub updated: bool,
}

#[napi(object)]
pub struct EvalResult {
    /// Sum of the per-image cross-entropy (0 without labels).
    pub loss_sum: f64,
    pub top1: u32,
    pub top5: u32,
    pub count: u32,
    /// [count, numClasses] logits, row-major.
    pub logits: Float32Array,
}

/// One scale of the encoder's output.
#[napi(object)]
pub struct FeatureMapResult {
    /// `stage1` (stride 4), `stage2` (stride 8) or `stage3` (stride 16).
    pub name: String,
    /// [batch, channels, height, width].
    pub shape: Vec<u32>,
    /// float32, row-major in `shape`'s order.
    pub data: Float32Array,
}

#[napi(object)]
pub struct FeaturesResult {
    /// [batch, dim] row-major: what the head reads (pooled and normalized stage-3 tokens).
    pub pooled: Float32Array,
    pub dim: u32,
    /// stage1, stage2, stage3 when asked for, else empty.
    pub maps: Vec<FeatureMapResult>,
}

fn labels_vec(labels: &[i32]) -> Result<Vec<usize>> {
    labels
        .iter()
        .enumerate()
        .map(|(i, &l)| usize::try_from(l).map_err(|_| js_err(format!("labels: label {l} of image {i} is negative"))))
        .collect()
}

/// A classifier (fine-tuning or linear probe) and its optimizer, owned by one worker thread.
#[napi]
pub struct NativeClassifier {
    session: Mutex<Session<ClassifierTrainer>>,
}

impl NativeClassifier {
    async fn call(&self, command: ClassifierCommand) -> Result<ClassifierReply> {
        call(&self.session, command).await
    }

    async fn loaded(&self, command: ClassifierCommand) -> Result<LoadResult> {
        match self.call(command).await? {
            ClassifierReply::Loaded { report, extra } => Ok(LoadResult { report: report_json(&report), extra }),
            _ => Err(js_err("unexpected reply to load")),
        }
    }
}

#[napi]
impl NativeClassifier {
    /// `headJson`: {num_classes, pool: 'global'|'token', kind: 'finetune'|'linear-probe',
    /// drop_path}; `optimizerJson`: {kind: 'adamw', ...} or {kind: 'lars', ...} (default: the
    /// head's official optimizer). Validated here; the weights are built on the worker.
    /// `threads`: the CPU threads of the steps; absent: all of rayon's; 0: auto (threads.rs).
    #[napi(constructor)]
    pub fn new(
        config_json: String,
        head_json: String,
        dtype: String,
        seed: i64,
        optimizer_json: Option<String>,
        device: Option<String>,
        precision: Option<String>,
        threads: Option<u32>,
    ) -> Result<Self> {
        let cfg = parse_config(&config_json)?;
        let head: ClassifierHead = serde_json::from_str(&head_json).map_err(|e| js_err(format!("invalid classifier head: {e}")))?;
        head.validate().map_err(|e| js_err(format!("invalid classifier head: {e}")))?;
        let dtype = parse_dtype(&dtype)?;
        let optimizer = match optimizer_json {
            Some(j) => serde_json::from_str(&j).map_err(|e| js_err(format!("invalid optimizer options: {e}")))?,
            None => OptimizerConfig::default_for(head.kind),
        };
        let seed = parse_seed(seed)?;
        let precision = parse_precision(precision.as_deref(), dtype)?;
        let device = parse_device(device.as_deref())?;
        let session = Session::start(move || {
            let device = device.open()?;
            let mut model = ConvViT::new(cfg, head, dtype, &device, seed).map_err(|e| e.to_string())?;
            model.precision = precision;
            ClassifierTrainer::new(model, optimizer, seed).map_err(|e| e.to_string())
        }, ThreadChoice::from_option(threads));
        Ok(Self { session: Mutex::new(session) })
    }

    /// One optimizer update. Targets are either `labels` (class ids) or `targets` ([batch,
    /// numClasses] probabilities); `augmentJson` holds the erasing boxes and the mix (see
    /// augment.rs), applied to the normalized images.
    #[napi]
    #[allow(clippy::too_many_arguments)]
    pub async fn train(
        &self,
        pixels: Uint8Array,
        batch: u32,
        height: u32,
        width: u32,
        lr: f64,
        labels: Option<Int32Array>,
        targets: Option<Float64Array>,
        augment_json: Option<String>,
        accum_steps: Option<u32>,
    ) -> Result<TrainStepResult> {
        let targets = match (labels, targets) {
            (_, Some(t)) => Targets::Probabilities(t.to_vec()),
            (Some(l), None) => Targets::Labels(labels_vec(&l)?),
            (None, None) => return Err(js_err("train: pass labels or targets")),
        };
        let augment: AugmentSpec = match augment_json {
            Some(j) => serde_json::from_str(&j).map_err(|e| js_err(format!("invalid augment: {e}")))?,
            None => AugmentSpec::default(),
        };
        let opts = TrainStepOptions { lr, targets, augment, accum_steps: accum_steps.unwrap_or(1) as usize };
        match self.call(ClassifierCommand::Train { images: images(&pixels, batch, height, width), opts }).await? {
            ClassifierReply::Trained(s) => Ok(TrainStepResult { loss: s.loss, lr: s.lr, step: s.step as i64, updated: s.updated }),
            _ => Err(js_err("unexpected reply to train")),
        }
    }

    /// Evaluation-mode logits, with loss and top-1 / top-5 hits when labels are given.
    #[napi]
    pub async fn evaluate(&self, pixels: Uint8Array, batch: u32, height: u32, width: u32, labels: Option<Int32Array>) -> Result<EvalResult> {
        let labels = labels.map(|l| labels_vec(&l)).transpose()?;
        match self.call(ClassifierCommand::Evaluate { images: images(&pixels, batch, height, width), labels }).await? {
            ClassifierReply::Evaluated(s) => Ok(EvalResult {
                loss_sum: s.loss_sum,
                top1: s.top1 as u32,
                top5: s.top5 as u32,
                count: s.count as u32,
                logits: s.logits.into(),
            }),
            _ => Err(js_err("unexpected reply to evaluate")),
        }
    }

    /// Evaluation-mode features: the pooled vector the head reads and, with `maps`, the
    /// encoder's output at each scale as float32 [batch, channels, height, width].
    #[napi]
    pub async fn features(&self, pixels: Uint8Array, batch: u32, height: u32, width: u32, maps: bool) -> Result<FeaturesResult> {
        match self.call(ClassifierCommand::Features { images: images(&pixels, batch, height, width), maps }).await? {
            ClassifierReply::Features(f) => Ok(FeaturesResult {
                pooled: f.pooled.into(),
                dim: f.dim as u32,
                maps: f
                    .maps
                    .into_iter()
                    .map(|m| FeatureMapResult { name: m.name.into(), shape: m.shape.iter().map(|&d| d as u32).collect(), data: m.data.into() })
                    .collect(),
            }),
            _ => Err(js_err("unexpected reply to features")),
        }
    }

    /// Writes weights, optimizer state and `extra` (JSON) atomically.
    #[napi]
    pub async fn save(&self, path: String, extra: String) -> Result<()> {
        match self.call(ClassifierCommand::Save { path: path.into(), extra }).await? {
            ClassifierReply::Saved => Ok(()),
            _ => Err(js_err("unexpected reply to save")),
        }
    }

    /// Restores a classifier checkpoint exactly (ours, or an official fine-tuned .pth).
    #[napi]
    pub async fn load(&self, path: String, strict: bool) -> Result<LoadResult> {
        self.loaded(ClassifierCommand::Load { path: path.into(), strict }).await
    }

    /// Loads a pretrained encoder the way the official fine-tune / linear-probe scripts do
    /// (strict=False, fresh head); the report lists missing, unexpected and reinitialized tensors.
    #[napi]
    pub async fn init_from(&self, path: String) -> Result<LoadResult> {
        self.loaded(ClassifierCommand::InitFrom { path: path.into() }).await
    }

    /// Raises a Rust panic on the model's worker thread; the Promise rejects with an Error and
    /// the process lives on. For tests of that guarantee.
    #[napi]
    pub async fn debug_panic(&self) -> Result<()> {
        self.call(ClassifierCommand::Panic).await.map(|_| ())
    }

    /// Frees the model after queued commands finish. Further calls reject.
    #[napi]
    pub fn dispose(&self) -> Result<()> {
        self.session.lock().map_err(|_| js_err("session lock poisoned"))?.dispose();
        Ok(())
    }

    /// The CPU threads the steps run on now (with auto: the count being timed, then the one
    /// chosen; 0 until the worker has started).
    #[napi]
    pub fn threads(&self) -> Result<u32> {
        Ok(self.session.lock().map_err(|_| js_err("session lock poisoned"))?.threads_in_use() as u32)
    }
}

#[napi(object)]
pub struct SegTrainResult {
    /// decodeLoss + auxWeight * auxLoss.
    pub loss: f64,
    pub decode_loss: f64,
    pub aux_loss: f64,
    pub lr: f64,
    /// Optimizer updates applied so far, this one included.
    pub step: i64,
}

#[napi(object)]
pub struct SegEvalResult {
    /// Argmax class of every pixel at the images' size, [batch * height * width].
    pub predictions: Uint8Array,
    /// With labels: the decode loss, averaged over the batch's pixels (ignored ones count 0).
    pub loss: Option<f64>,
    /// With labels: per-class pixel counts (label 255 left out): predicted and labelled as the
    /// class (intersect), either (union), predicted as it, labelled as it.
    pub intersect: Option<Vec<f64>>,
    pub union: Option<Vec<f64>>,
    pub predicted: Option<Vec<f64>>,
    pub label: Option<Vec<f64>>,
}

/// A segmenter (UperNet on a ConvMAE backbone) and its optimizer, owned by one worker thread.
#[napi]
pub struct NativeSegmenter {
    session: Mutex<Session<SegmenterTrainer>>,
}

impl NativeSegmenter {
    async fn call(&self, command: SegmenterCommand) -> Result<SegmenterReply> {
        call(&self.session, command).await
    }

    async fn loaded(&self, command: SegmenterCommand) -> Result<LoadResult> {
        match self.call(command).await? {
            SegmenterReply::Loaded { report, extra } => Ok(LoadResult { report: report_json(&report), extra }),
            _ => Err(js_err("unexpected reply to load")),
        }
    }
}

#[napi]
impl NativeSegmenter {
    /// `headJson`: {num_classes, channels, aux_channels, pool_scales, dropout, drop_path,
    /// aux_weight} (absent fields: the official values); `optimizerJson`: {beta1, beta2, eps,
    /// weight_decay, layer_decay}. Float32 or float64.
    /// `device`: 'cpu' (default), 'cuda' or 'cuda:N' (the CUDA build; TF32 matmuls for float32).
    /// `precision`: 'fp32' (default) or 'bf16' (float32 master weights; BatchNorm and the losses in f32).
    #[napi(constructor)]
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config_json: String,
        head_json: String,
        dtype: String,
        seed: i64,
        optimizer_json: Option<String>,
        device: Option<String>,
        precision: Option<String>,
        threads: Option<u32>,
    ) -> Result<Self> {
        let cfg = parse_config(&config_json)?;
        let head: SegmenterHead = serde_json::from_str(&head_json).map_err(|e| js_err(format!("invalid segmenter head: {e}")))?;
        head.validate().map_err(js_err)?;
        let dtype = parse_dtype(&dtype)?;
        let adamw: SegmenterAdamWConfig = match optimizer_json {
            Some(j) => serde_json::from_str(&j).map_err(|e| js_err(format!("invalid optimizer options: {e}")))?,
            None => SegmenterAdamWConfig::default(),
        };
        let seed = parse_seed(seed)?;
        let precision = parse_precision(precision.as_deref(), dtype)?;
        let device = parse_device(device.as_deref())?;
        let session = Session::start(move || {
            let device = device.open()?;
            let mut model = Segmenter::new(cfg, head, dtype, &device, seed).map_err(|e| e.to_string())?;
            model.precision = precision;
            SegmenterTrainer::new(model, adamw, seed).map_err(|e| e.to_string())
        }, ThreadChoice::from_option(threads));
        Ok(Self { session: Mutex::new(session) })
    }

    /// One optimizer update on uint8 images [batch, height, width, 3] and their label maps
    /// [batch * height * width] (255 = ignore).
    #[napi]
    pub async fn train(&self, pixels: Uint8Array, batch: u32, height: u32, width: u32, labels: Uint8Array, lr: f64) -> Result<SegTrainResult> {
        let command = SegmenterCommand::Train { images: images(&pixels, batch, height, width), labels: labels.to_vec(), lr };
        match self.call(command).await? {
            SegmenterReply::Trained(s) => Ok(SegTrainResult { loss: s.loss, decode_loss: s.decode_loss, aux_loss: s.aux_loss, lr: s.lr, step: s.step as i64 }),
            _ => Err(js_err("unexpected reply to train")),
        }
    }

    /// Evaluation-mode predictions at the images' size, with the loss and per-class areas when
    /// labels are given.
    #[napi]
    pub async fn evaluate(&self, pixels: Uint8Array, batch: u32, height: u32, width: u32, labels: Option<Uint8Array>) -> Result<SegEvalResult> {
        let command = SegmenterCommand::Evaluate { images: images(&pixels, batch, height, width), labels: labels.map(|l| l.to_vec()) };
        self.evaluated(command).await
    }

    /// mmseg's slide inference of one image of any size (windows of the model's side at
    /// `stride`), the logits resized to `originalHeight` x `originalWidth` for the predictions
    /// and, with labels at that size, the per-class areas.
    #[napi]
    #[allow(clippy::too_many_arguments)]
    pub async fn evaluate_slide(&self, pixels: Uint8Array, height: u32, width: u32, original_height: u32, original_width: u32, stride: u32, labels: Option<Uint8Array>) -> Result<SegEvalResult> {
        let command = SegmenterCommand::EvaluateSlide {
            image: images(&pixels, 1, height, width),
            original: (original_height as usize, original_width as usize),
            labels: labels.map(|l| l.to_vec()),
            stride: stride as usize,
        };
        self.evaluated(command).await
    }
}

impl NativeSegmenter {
    async fn evaluated(&self, command: SegmenterCommand) -> Result<SegEvalResult> {
        match self.call(command).await? {
            SegmenterReply::Evaluated(e) => {
                let counts = |v: &[u64]| v.iter().map(|&c| c as f64).collect::<Vec<f64>>();
                let areas = e.areas.as_ref();
                Ok(SegEvalResult {
                    predictions: e.predictions.into(),
                    loss: e.loss,
                    intersect: areas.map(|a| counts(&a.intersect)),
                    union: areas.map(|a| counts(&a.union)),
                    predicted: areas.map(|a| counts(&a.predicted)),
                    label: areas.map(|a| counts(&a.label)),
                })
            }
            _ => Err(js_err("unexpected reply to evaluate")),
        }
    }
}

#[napi]
impl NativeSegmenter {
    /// Writes weights, optimizer state and `extra` (JSON) atomically.
    #[napi]
    pub async fn save(&self, path: String, extra: String) -> Result<()> {
        match self.call(SegmenterCommand::Save { path: path.into(), extra }).await? {
            SegmenterReply::Saved => Ok(()),
            _ => Err(js_err("unexpected reply to save")),
        }
    }

    /// Restores a segmenter checkpoint exactly (ours, or an official mmseg UperNet .pth).
    #[napi]
    pub async fn load(&self, path: String, strict: bool) -> Result<LoadResult> {
        self.loaded(SegmenterCommand::Load { path: path.into(), strict }).await
    }

    /// Loads a pretrained encoder into the backbone as the official SEG code does (strict=False,
    /// pos_embed resized bicubically to this grid, fresh heads).
    #[napi]
    pub async fn init_from(&self, path: String) -> Result<LoadResult> {
        self.loaded(SegmenterCommand::InitFrom { path: path.into() }).await
    }

    /// Frees the model after queued commands finish. Further calls reject.
    #[napi]
    pub fn dispose(&self) -> Result<()> {
        self.session.lock().map_err(|_| js_err("session lock poisoned"))?.dispose();
        Ok(())
    }

    /// The CPU threads the steps run on now.
    #[napi]
    pub fn threads(&self) -> Result<u32> {
        Ok(self.session.lock().map_err(|_| js_err("session lock poisoned"))?.threads_in_use() as u32)
    }
}

#[napi(object)]
pub struct DetTrainResult {
    /// The sum of the five losses.
    pub loss: f64,
    pub loss_rpn_cls: f64,
    pub loss_rpn_loc: f64,
    pub loss_cls: f64,
    pub loss_box_reg: f64,
    pub loss_mask: f64,
    /// Foreground regions sampled for the ROI heads over the batch.
    pub foreground: u32,
    pub lr: f64,
    pub step: i64,
}

/// The detections of a batch, image after image (`counts` per image), best first in each.
#[napi(object)]
pub struct DetectionsResult {
    pub counts: Vec<u32>,
    /// 4 per detection: x1, y1, x2, y2 in output pixels.
    pub boxes: Float32Array,
    pub scores: Float32Array,
    pub classes: Uint32Array,
    /// One binary mask of its image's output size per detection, concatenated.
    pub masks: Uint8Array,
}

/// The per-image annotations of a batch from flat arrays: `counts` instances per image, 4 box
/// numbers and a class each, and a mask of height x width each, all concatenated.
/// Instances' polygons from their flat form: `per_instance[i]` polygons for instance i (over
/// all images, in order; 0 = none), `lengths[p]` numbers for polygon p, `coords` all of them.
fn instance_polygons(per_instance: &[u32], lengths: &[u32], coords: &[f64], instances: usize) -> Result<Vec<Vec<Vec<f64>>>> {
    let polygons: usize = per_instance.iter().map(|&n| n as usize).sum();
    let numbers: usize = lengths.iter().map(|&n| n as usize).sum();
    if per_instance.len() != instances || lengths.len() != polygons || coords.len() != numbers {
        return Err(js_err(format!(
            "polygons: polygonCounts must hold one count per instance ({instances}, got {}), polygonLengths one length per polygon ({polygons}, got {}), polygonCoords their {numbers} numbers (got {})",
            per_instance.len(),
            lengths.len(),
            coords.len()
        )));
    }
    let (mut p, mut at) = (0, 0);
    Ok(per_instance
        .iter()
        .map(|&n| {
            (0..n as usize)
                .map(|_| {
                    let len = lengths[p] as usize;
                    let polygon = coords[at..at + len].to_vec();
                    (p, at) = (p + 1, at + len);
                    polygon
                })
                .collect()
        })
        .collect())
}

fn image_targets(counts: &[u32], boxes: &[f32], classes: &[u32], masks: &[u8], pixels_per_mask: usize, mut polygons: Vec<Vec<Vec<f64>>>) -> Result<Vec<ImageTargets>> {
    let total: usize = counts.iter().map(|&c| c as usize).sum();
    if boxes.len() != 4 * total || classes.len() != total || masks.len() != total * pixels_per_mask {
        return Err(js_err(format!(
            "targets: counts add up to {total} instances, so boxes must hold {} numbers (got {}), classes {total} (got {}), masks {} bytes (got {})",
            4 * total,
            boxes.len(),
            classes.len(),
            total * pixels_per_mask,
            masks.len()
        )));
    }
    let mut at = 0;
    let mut out = Vec::with_capacity(counts.len());
    for &c in counts {
        let c = c as usize;
        out.push(ImageTargets {
            boxes: boxes[4 * at..4 * (at + c)].chunks(4).map(|b| [b[0], b[1], b[2], b[3]]).collect(),
            classes: classes[at..at + c].iter().map(|&k| k as usize).collect(),
            masks: masks[at * pixels_per_mask..(at + c) * pixels_per_mask].to_vec(),
            polygons: if polygons.is_empty() { Vec::new() } else { polygons.drain(..c).collect() },
            extent: None,
        });
        at += c;
    }
    Ok(out)
}

/// `extents` of `train` and `detect`: (height, width) per image.
fn image_extents(extents: &[u32], batch: u32) -> Result<Vec<(usize, usize)>> {
    if extents.len() != 2 * batch as usize {
        return Err(js_err(format!("extents must hold 2 numbers (height, width) per image ({}), got {}", 2 * batch, extents.len())));
    }
    Ok(extents.chunks(2).map(|e| (e[0] as usize, e[1] as usize)).collect())
}

/// A Mask R-CNN detector on a ConvMAE backbone and its optimizer, owned by one worker thread.
#[napi]
pub struct NativeDetector {
    session: Mutex<Session<DetectorTrainer>>,
}

impl NativeDetector {
    async fn call(&self, command: DetectorCommand) -> Result<DetectorReply> {
        call(&self.session, command).await
    }

    async fn loaded(&self, command: DetectorCommand) -> Result<LoadResult> {
        match self.call(command).await? {
            DetectorReply::Loaded { report, extra } => Ok(LoadResult { report: report_json(&report), extra }),
            _ => Err(js_err("unexpected reply to load")),
        }
    }
}

#[napi]
impl NativeDetector {
    /// `headJson`: the DetectorHead fields (absent: the official values of its `variant`,
    /// 'det' or 'vitdet'); `optimizerJson`: {beta1, beta2, eps, weight_decay, layer_decay}
    /// (absent: the variant's official values). `device`: 'cpu' (default), 'cuda' or 'cuda:N' (the
    /// CUDA build; float32 with TF32 matmuls, or float64). `precision`: 'fp32' (default) or
    /// 'bf16' (float32 master weights; BatchNorm, ROIAlign, the losses and the box geometry in f32).
    #[napi(constructor)]
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config_json: String,
        head_json: String,
        dtype: String,
        seed: i64,
        optimizer_json: Option<String>,
        device: Option<String>,
        precision: Option<String>,
        threads: Option<u32>,
    ) -> Result<Self> {
        let cfg = parse_config(&config_json)?;
        let head = DetectorHead::from_json(&head_json).map_err(js_err)?;
        head.validate(&cfg).map_err(js_err)?;
        let dtype = parse_dtype(&dtype)?;
        let adamw = DetectorAdamWConfig::from_json(optimizer_json.as_deref().unwrap_or("{}"), head.variant).map_err(js_err)?;
        adamw.validate().map_err(js_err)?;
        let seed = parse_seed(seed)?;
        let precision = parse_precision(precision.as_deref(), dtype)?;
        let device = parse_device(device.as_deref())?;
        let session = Session::start(move || {
            let device = device.open()?;
            let mut model = Detector::new(cfg, head, dtype, &device, seed).map_err(|e| e.to_string())?;
            model.precision = precision;
            DetectorTrainer::new(model, adamw, seed).map_err(|e| e.to_string())
        }, ThreadChoice::from_option(threads));
        Ok(Self { session: Mutex::new(session) })
    }

    /// One optimizer update on uint8 images [batch, height, width, 3] and their annotations
    /// (see `image_targets`), with the instances' polygons where they have them (see
    /// `instance_polygons`; their mask targets are then rasterized from the polygons).
    /// `extents`: (height, width) per image at the top left of its input, outside which the
    /// normalized input is 0 and to which proposals are clipped (detectron2's ImageList
    /// padding; absent: every image fills its input).
    #[napi]
    #[allow(clippy::too_many_arguments)]
    pub async fn train(
        &self,
        pixels: Uint8Array,
        batch: u32,
        height: u32,
        width: u32,
        counts: Uint32Array,
        boxes: Float32Array,
        classes: Uint32Array,
        masks: Uint8Array,
        lr: f64,
        polygon_counts: Option<Uint32Array>,
        polygon_lengths: Option<Uint32Array>,
        polygon_coords: Option<Float64Array>,
        extents: Option<Uint32Array>,
    ) -> Result<DetTrainResult> {
        if counts.len() != batch as usize {
            return Err(js_err(format!("targets: counts has {} entries for {batch} images", counts.len())));
        }
        let polygons = match (polygon_counts, polygon_lengths, polygon_coords) {
            (Some(n), Some(l), Some(c)) => instance_polygons(&n, &l, &c, classes.len())?,
            (None, None, None) => Vec::new(),
            _ => return Err(js_err("polygons: pass polygonCounts, polygonLengths and polygonCoords together")),
        };
        let mut targets = image_targets(&counts, &boxes, &classes, &masks, (height * width) as usize, polygons)?;
        if let Some(extents) = extents.as_deref().map(|e| image_extents(e, batch)).transpose()? {
            for (t, e) in targets.iter_mut().zip(extents) {
                t.extent = Some(e);
            }
        }
        let command = DetectorCommand::Train { images: images(&pixels, batch, height, width), targets, lr };
        match self.call(command).await? {
            DetectorReply::Trained(s) => Ok(DetTrainResult {
                loss: s.loss,
                loss_rpn_cls: s.loss_rpn_cls,
                loss_rpn_loc: s.loss_rpn_loc,
                loss_cls: s.loss_cls,
                loss_box_reg: s.loss_box_reg,
                loss_mask: s.loss_mask,
                foreground: s.foreground as u32,
                lr: s.lr,
                step: s.step as i64,
            }),
            _ => Err(js_err("unexpected reply to train")),
        }
    }

    /// Detections of a batch; `outputSizes` holds (height, width) per image, the size to scale
    /// boxes and masks to (default: the input size); `extents` (height, width) per image, the
    /// part of its input it fills, from the top left (as in `train`; default: all of it).
    #[napi]
    pub async fn detect(&self, pixels: Uint8Array, batch: u32, height: u32, width: u32, output_sizes: Option<Uint32Array>, extents: Option<Uint32Array>) -> Result<DetectionsResult> {
        let extents = extents.as_deref().map(|e| image_extents(e, batch)).transpose()?;
        let output: Vec<(usize, usize)> = match output_sizes {
            Some(sizes) => {
                if sizes.len() != 2 * batch as usize {
                    return Err(js_err(format!("outputSizes must hold 2 numbers per image ({}), got {}", 2 * batch, sizes.len())));
                }
                sizes.chunks(2).map(|s| (s[0] as usize, s[1] as usize)).collect()
            }
            None => vec![(height as usize, width as usize); batch as usize],
        };
        match self.call(DetectorCommand::Detect { images: images(&pixels, batch, height, width), extents, output }).await? {
            DetectorReply::Detected(dets) => {
                let mut r = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for d in dets {
                    r.0.push(d.boxes.len() as u32);
                    r.1.extend(d.boxes.iter().flatten());
                    r.2.extend(d.scores);
                    r.3.extend(d.classes.iter().map(|&c| c as u32));
                    r.4.extend(d.masks);
                }
                Ok(DetectionsResult { counts: r.0, boxes: r.1.into(), scores: r.2.into(), classes: r.3.into(), masks: r.4.into() })
            }
            _ => Err(js_err("unexpected reply to detect")),
        }
    }

    /// Writes weights, optimizer state and `extra` (JSON) atomically.
    #[napi]
    pub async fn save(&self, path: String, extra: String) -> Result<()> {
        match self.call(DetectorCommand::Save { path: path.into(), extra }).await? {
            DetectorReply::Saved => Ok(()),
            _ => Err(js_err("unexpected reply to save")),
        }
    }

    /// Restores a detector checkpoint exactly (ours, or an official detectron2 model_final).
    #[napi]
    pub async fn load(&self, path: String, strict: bool) -> Result<LoadResult> {
        self.loaded(DetectorCommand::Load { path: path.into(), strict }).await
    }

    /// Loads a pretrained encoder into the backbone as the official DET code does (strict=False,
    /// pos_embed resized bicubically to the detection grid, fresh FPN and heads).
    #[napi]
    pub async fn init_from(&self, path: String) -> Result<LoadResult> {
        self.loaded(DetectorCommand::InitFrom { path: path.into() }).await
    }

    /// Frees the model after queued commands finish. Further calls reject.
    #[napi]
    pub fn dispose(&self) -> Result<()> {
        self.session.lock().map_err(|_| js_err("session lock poisoned"))?.dispose();
        Ok(())
    }

    /// The CPU threads the steps run on now.
    #[napi]
    pub fn threads(&self) -> Result<u32> {
        Ok(self.session.lock().map_err(|_| js_err("session lock poisoned"))?.threads_in_use() as u32)
    }
}

/// Decoded and augmented images of `decodeCropBatch`.
#[napi(object)]
pub struct DecodedBatch {
    /// uint8 [n, size, size, 3] RGB; the block of a failed image is unspecified.
    pub pixels: Buffer,
    /// Per image: null when decoded, else why not, naming the file.
    pub errors: Vec<Option<String>>,
}

/// The native pretraining transform for a batch of JPEG files: decode,
/// crop (left, top, width, height), bicubic resize to size x size, flip when
/// the fifth crop number is nonzero. `crops` holds 5 integers per file;
/// `paths` name the files in messages. Runs on `threads` decode threads, off
/// the Node thread and the libuv pool.
#[napi]
pub async fn decode_crop_batch(files: Vec<Uint8Array>, paths: Vec<String>, crops: Int32Array, size: u32, threads: u32) -> Result<DecodedBatch> {
    const CALL: &str = "decodeCropBatch";
    let boxes = crop_boxes(CALL, files.len(), &paths, &crops, size, threads)?;
    let data: Vec<Vec<u8>> = files.iter().map(|f| f.to_vec()).collect();
    crop_batch(paths, size, threads, boxes, data, |d| imaging::CropSource::Jpeg(d)).await
}

/// The same transform for images already in memory (e.g. an IDX file's digits), without a
/// decode: `shapes` holds (width, height, channels) per image, channels 1 (grey) or 3 (RGB),
/// pixels interleaved row by row; `names` name the images in messages.
#[napi]
pub async fn crop_pixel_batch(images: Vec<Uint8Array>, shapes: Int32Array, names: Vec<String>, crops: Int32Array, size: u32, threads: u32) -> Result<DecodedBatch> {
    const CALL: &str = "cropPixelBatch";
    let n = images.len();
    let boxes = crop_boxes(CALL, n, &names, &crops, size, threads)?;
    if shapes.len() != n * 3 {
        return Err(js_err(format!("{CALL}: {n} images need {} shape numbers, got {}", n * 3, shapes.len())));
    }
    let mut decoded = Vec::with_capacity(n);
    for ((pixels, s), name) in images.iter().zip(shapes.chunks_exact(3)).zip(&names) {
        let (Ok(width), Ok(height), Ok(channels)) = (usize::try_from(s[0]), usize::try_from(s[1]), usize::try_from(s[2])) else {
            return Err(js_err(format!("{CALL}: negative shape number for {name}")));
        };
        decoded.push(imaging::DecodedImage { pixels: pixels.to_vec(), width, height, channels });
    }
    crop_batch(names, size, threads, boxes, decoded, |d| imaging::CropSource::Pixels(d)).await
}

/// The crop boxes of a batch call (5 numbers an image: left, top, width, height, flip), checked
/// against the image count and the call's other arguments.
fn crop_boxes(call: &str, n: usize, names: &[String], crops: &[i32], size: u32, threads: u32) -> Result<Vec<imaging::CropFlip>> {
    if names.len() != n || crops.len() != n * 5 {
        return Err(js_err(format!("{call}: {n} images need {n} names and {} crop numbers, got {} and {}", n * 5, names.len(), crops.len())));
    }
    if size == 0 || threads == 0 {
        return Err(js_err(format!("{call}: size and threads must be positive")));
    }
    crops
        .chunks_exact(5)
        .zip(names)
        .map(|(c, name)| {
            if c[..4].iter().any(|&v| v < 0) {
                return Err(js_err(format!("{call}: negative crop number for {name}")));
            }
            Ok(imaging::CropFlip { left: c[0] as usize, top: c[1] as usize, width: c[2] as usize, height: c[3] as usize, flip: c[4] != 0 })
        })
        .collect()
}

/// Runs a batch's jobs, image `k` cropped from `source(&data[k])` with `boxes[k]`, on the decode
/// threads, and names each failure by its image.
async fn crop_batch<D: Send + Sync + 'static>(
    names: Vec<String>,
    size: u32,
    threads: u32,
    boxes: Vec<imaging::CropFlip>,
    data: Vec<D>,
    source: for<'a> fn(&'a D) -> imaging::CropSource<'a>,
) -> Result<DecodedBatch> {
    let (n, size) = (names.len(), size as usize);
    let (pixels, errors) = off_thread(move || {
        let jobs: Vec<imaging::CropJob> = data.iter().zip(&boxes).map(|(d, &crop)| imaging::CropJob { source: source(d), crop }).collect();
        let mut out = vec![0u8; n * size * size * 3];
        let errors = imaging::decode_crop_batch(&jobs, size, threads as usize, &mut out)?;
        Ok((out, errors))
    })
    .await?;
    let errors = errors.into_iter().zip(&names).map(|(e, name)| e.map(|e| format!("{name}: {e}"))).collect();
    Ok(DecodedBatch { pixels: pixels.into(), errors })
}
