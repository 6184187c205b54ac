//! Checkpoint IO: our safetensors checkpoints (weights under official names, optimizer state,
//! config and run state in the metadata), written atomically; and the official `.pth` files.

use crate::config::ConvMaeConfig;
use crate::params::ParamStore;
use crate::classify::{ClassifierTrainer, Optimizer};
use crate::model::classifier::{ClassifierHead, HeadKind};
use crate::train::Pretrainer;
use crate::segment::{SegmenterAdamWConfig, SegmenterTrainer};
use crate::model::segmenter::SegmenterHead;
use crate::detect::{DetectorAdamWConfig, DetectorTrainer};
use crate::model::detector::DetectorHead;
use crate::optim::AdamW;
use crate::pos_embed::resize_pos_embed;
use crate::optim::Moments;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

pub const FORMAT: &str = "convmae-checkpoint/1";
const EXP_AVG: &str = "optimizer.exp_avg.";
const EXP_AVG_SQ: &str = "optimizer.exp_avg_sq.";
const MOMENTUM: &str = "optimizer.momentum_buffer.";
/// torch's BatchNorm step counter of the probe head (a buffer, kept out of the ParamStore).
const BN_BATCHES: &str = "head.0.num_batches_tracked";

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one, never half:
/// a temporary file in the same directory, fsync, then rename over the target.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Saves weights, optimizer moments and the run state. `extra` is the caller's JSON (loop state).
pub fn save_pretrainer(trainer: &Pretrainer, path: &Path, extra: &str) -> candle_core::Result<()> {
    if trainer.has_pending_gradients() {
        return Err(err(format!(
            "cannot save '{}' in the middle of a gradient accumulation window",
            path.display()
        )));
    }
    let model = &trainer.model;
    let mut tensors: Vec<(String, Tensor)> = model.params.iter().map(|p| (p.spec.name.clone(), p.tensor.clone())).collect();
    for m in &trainer.optimizer.moments {
        tensors.push((format!("{EXP_AVG}{}", m.name), m.exp_avg.clone()));
        tensors.push((format!("{EXP_AVG_SQ}{}", m.name), m.exp_avg_sq.clone()));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("config".to_string(), serde_json::to_string(&model.cfg).unwrap());
    meta.insert("adamw".to_string(), serde_json::to_string(&trainer.optimizer.cfg).unwrap());
    meta.insert("optimizer_step".to_string(), trainer.optimizer.step.to_string());
    meta.insert("micro_step".to_string(), trainer.micro_step.to_string());
    meta.insert("seed".to_string(), trainer.seed.to_string());
    meta.insert("dtype".to_string(), format!("{:?}", model.dtype()).to_lowercase());
    meta.insert("extra".to_string(), extra.to_string());
    write_checkpoint(path, &tensors, meta)
}

fn write_checkpoint(path: &Path, tensors: &[(String, Tensor)], meta: HashMap<String, String>) -> candle_core::Result<()> {
    let bytes = safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| err(format!("cannot serialize checkpoint '{}': {e}", path.display())))?;
    write_atomically(path, &bytes).map_err(|e| err(format!("cannot write checkpoint '{}': {e}", path.display())))
}

/// Saves a classifier: weights (the probe's BatchNorm buffers included, with torch's
/// `head.0.num_batches_tracked`), optimizer state, config, head, optimizer settings and step.
pub fn save_classifier(trainer: &ClassifierTrainer, path: &Path, extra: &str) -> candle_core::Result<()> {
    if trainer.has_pending_gradients() {
        return Err(err(format!(
            "cannot save '{}' in the middle of a gradient accumulation window",
            path.display()
        )));
    }
    let model = &trainer.model;
    let mut tensors: Vec<(String, Tensor)> = model.params.iter().map(|p| (p.spec.name.clone(), p.tensor.clone())).collect();
    if model.head.kind == HeadKind::LinearProbe {
        tensors.push((BN_BATCHES.to_string(), Tensor::new(trainer.bn_batches as i64, &Device::Cpu)?));
    }
    match &trainer.optimizer {
        Optimizer::AdamW(o) => {
            for m in &o.moments {
                tensors.push((format!("{EXP_AVG}{}", m.name), m.exp_avg.clone()));
                tensors.push((format!("{EXP_AVG_SQ}{}", m.name), m.exp_avg_sq.clone()));
            }
        }
        Optimizer::Lars(o) => {
            for (name, mu) in &o.momentum {
                tensors.push((format!("{MOMENTUM}{name}"), mu.clone()));
            }
        }
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("kind".to_string(), "classifier".to_string());
    meta.insert("config".to_string(), serde_json::to_string(&model.cfg).unwrap());
    meta.insert("head".to_string(), serde_json::to_string(&model.head).unwrap());
    meta.insert("optimizer".to_string(), serde_json::to_string(&trainer.optimizer_cfg).unwrap());
    meta.insert("optimizer_step".to_string(), trainer.step_count().to_string());
    meta.insert("seed".to_string(), trainer.seed.to_string());
    meta.insert("dtype".to_string(), format!("{:?}", model.dtype()).to_lowercase());
    meta.insert("extra".to_string(), extra.to_string());
    write_checkpoint(path, &tensors, meta)
}

/// The tensors and metadata of a checkpoint file, whatever its format.
pub struct CheckpointFile {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
    /// "convmae" (ours), "safetensors" (someone else's), or "pth" (official torch.save).
    pub format: &'static str,
}

pub fn read_checkpoint(path: &Path) -> candle_core::Result<CheckpointFile> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read checkpoint '{shown}': {e}")))?;
    if bytes.starts_with(b"PK") {
        // torch.save zip: the official files keep the state_dict under 'model'; accept a bare one too.
        let list = candle_core::pickle::read_all_with_key(path, Some("model"))
            .or_else(|_| candle_core::pickle::read_all_with_key(path, Some("state_dict")))
            .or_else(|_| candle_core::pickle::read_all(path))
            .map_err(|e| err(format!("cannot read PyTorch checkpoint '{shown}': {e}")))?;
        return Ok(CheckpointFile { tensors: list.into_iter().collect(), metadata: HashMap::new(), format: "pth" });
    }
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| err(format!("'{shown}' is neither a safetensors file nor a PyTorch zip checkpoint: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?.into_iter().collect();
    let format = if metadata.get("format").map(String::as_str) == Some(FORMAT) { "convmae" } else { "safetensors" };
    Ok(CheckpointFile { tensors, metadata, format })
}

impl CheckpointFile {
    pub fn config(&self) -> Option<Result<ConvMaeConfig, String>> {
        self.metadata.get("config").map(|c| serde_json::from_str(c).map_err(|e| format!("bad config metadata: {e}")))
    }

    /// The encoder's configuration as its tensors' shapes give it, for a file without our
    /// metadata (an official or third-party `.pth`, spec 8.3: "infer sizes from tensor shapes"),
    /// under whatever module prefix holds `patch_embed1.proj.weight` (none, `backbone.`,
    /// `backbone.bottom_up.`, `encoder.`, ...): the patch sizes and widths from the three patch
    /// embeds, each stage's depth from its numbered blocks, its MLP ratio from block 0's `fc1`,
    /// `img_size` from `pos_embed`'s grid; a pretraining file's decoder width and depth. Head
    /// counts are in no shape: one per 64 channels in stage 3 (ConvMAE-B's 12 at 768), one per
    /// 32 in the decoder (its 16 at 512). The rest (and the decoder of an encoder-only file) is
    /// ConvMAE-B's. None when the file has no `patch_embed1`.
    pub fn inferred_config(&self) -> Option<Result<ConvMaeConfig, String>> {
        const FIRST: &str = "patch_embed1.proj.weight";
        let prefix = self.tensors.keys().find_map(|k| k.strip_suffix(FIRST))?.to_string();
        let dims = |name: &str| self.tensors.get(&format!("{prefix}{name}")).map(|t| t.dims().to_vec());
        let infer = || -> Result<ConvMaeConfig, String> {
            let mut cfg = ConvMaeConfig::base();
            let mut previous = None;
            for s in 0..3 {
                let name = format!("patch_embed{}.proj.weight", s + 1);
                let Some(&[out, inp, k, k2]) = dims(&name).as_deref() else {
                    return Err(format!("'{prefix}{name}' is missing or not a [out, in, k, k] kernel"));
                };
                if k != k2 || previous.is_some_and(|p| p != inp) {
                    return Err(format!("'{prefix}{name}' has shape [{out}, {inp}, {k}, {k2}], which does not follow the stage before"));
                }
                if s == 0 {
                    cfg.in_chans = inp;
                }
                (cfg.embed_dim[s], cfg.patch_size[s]) = (out, k);
                previous = Some(out);
                cfg.depth[s] = (0..).take_while(|i| dims(&format!("blocks{}.{i}.norm1.weight", s + 1)).is_some()).count();
                if let Some(hidden) = dims(&format!("blocks{}.0.mlp.fc1.weight", s + 1)).and_then(|d| d.first().copied()) {
                    cfg.mlp_ratio[s] = hidden as f64 / out as f64;
                }
            }
            if let Some(&[1, tokens, _]) = dims("pos_embed").as_deref() {
                let grid = (tokens as f64).sqrt().round() as usize;
                if grid * grid == tokens {
                    cfg.img_size = grid * cfg.patch_size.iter().product::<usize>();
                }
            }
            // timm's convention of 64 channels a head: ConvMAE-B's 12 at 768.
            cfg.num_heads = (cfg.embed_dim[2] / 64).max(1);
            // A pretraining file's decoder: its width and depth; 32 channels a head (16 at 512).
            if let Some(&[width, _]) = dims("decoder_embed.weight").as_deref() {
                cfg.decoder_embed_dim = width;
                cfg.decoder_depth = (0..).take_while(|i| dims(&format!("decoder_blocks.{i}.norm1.weight")).is_some()).count();
                cfg.decoder_num_heads = (width / 32).max(1);
            }
            cfg.validate()?;
            Ok(cfg)
        };
        Some(infer())
    }

    /// What a load error adds for a file of another encoder: the encoder fields its shapes
    /// give (`inferred_config`) as a `--config` to pass, or nothing where they give none.
    pub fn shape_hint(&self) -> String {
        match self.inferred_config() {
            Some(Ok(c)) => format!(
                "; its tensors describe --config '{{\"img_size\":{},\"patch_size\":{:?},\"embed_dim\":{:?},\"depth\":{:?},\"mlp_ratio\":{:?}}}' (num_heads is in no shape: add it)",
                c.img_size, c.patch_size, c.embed_dim, c.depth, c.mlp_ratio
            ),
            _ => String::new(),
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct LoadReport {
    pub format: String,
    pub loaded: Vec<String>,
    /// Model tensors the file lacks (kept at their current values).
    pub missing: Vec<String>,
    /// File tensors the model has no place for (ignored).
    pub unexpected: Vec<String>,
    /// Model tensors the file has but that were drawn fresh on purpose (a new classifier head).
    pub reinitialized: Vec<String>,
    pub optimizer_restored: bool,
}

/// Copies the file's weights into `params`. Shapes must match exactly; with `strict`, every model
/// tensor must be present. Optimizer entries are not counted as unexpected.
pub fn load_weights(params: &mut ParamStore, file: &CheckpointFile, strict: bool, shown: &str) -> candle_core::Result<LoadReport> {
    load_weights_except(params, file, strict, shown, |_| false)
}

/// `load_weights`, leaving the model tensors for which `keep_fresh(name)` holds at their current
/// values (listed as `reinitialized` when the file has them, as `missing` otherwise).
pub fn load_weights_except(
    params: &mut ParamStore,
    file: &CheckpointFile,
    strict: bool,
    shown: &str,
    keep_fresh: impl Fn(&str) -> bool,
) -> candle_core::Result<LoadReport> {
    let mut report = LoadReport { format: file.format.to_string(), ..Default::default() };
    let names: Vec<(String, Vec<usize>)> = params.iter().map(|p| (p.spec.name.clone(), p.spec.shape.clone())).collect();
    for (name, shape) in &names {
        match file.tensors.get(name) {
            None => report.missing.push(name.clone()),
            Some(_) if keep_fresh(name) => report.reinitialized.push(name.clone()),
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(err(format!(
                    "checkpoint '{shown}': tensor '{name}' has shape {:?}, the model expects {:?}",
                    t.dims(),
                    shape
                )))
            }
            Some(_) => report.loaded.push(name.clone()),
        }
    }
    if strict && !report.missing.is_empty() {
        return Err(err(format!(
            "checkpoint '{shown}' lacks {} tensor(s) of the model, first '{}' (load with strict: false to keep the current values of missing tensors, e.g. for the encoder-only official checkpoint)",
            report.missing.len(),
            report.missing[0]
        )));
    }
    for name in &report.loaded {
        params.set(name, &file.tensors[name])?;
    }
    report.unexpected = file
        .tensors
        .keys()
        .filter(|k| params.find(k).is_none() && !k.starts_with("optimizer.") && !is_derived_buffer(k))
        .cloned()
        .collect();
    Ok(report)
}

/// Encoder files written by other training code wrap the model's names in one module name:
/// DDP's `module.`, mmselfsup's `backbone.`, EasyCV's `encoder.` and `decoder.` (its MAE and
/// FastConvMAE models). A file tensor whose name is none of the model's, but whose name after its
/// first dot is, is read as that tensor; the file's own tensor of that name wins where it has
/// both. Two wrapped tensors of one name are an error naming both.
fn unwrap_module_prefixes(file: &mut CheckpointFile, params: &ParamStore, shown: &str) -> candle_core::Result<()> {
    let mut renames: BTreeMap<String, String> = BTreeMap::new();
    for key in file.tensors.keys() {
        if params.find(key).is_some() {
            continue;
        }
        let Some((_, inner)) = key.split_once('.') else { continue };
        if params.find(inner).is_none() || file.tensors.contains_key(inner) {
            continue;
        }
        if let Some(other) = renames.insert(inner.to_string(), key.clone()) {
            return Err(err(format!("checkpoint '{shown}' holds both '{other}' and '{key}' for the model's tensor '{inner}'")));
        }
    }
    for (inner, key) in renames {
        let t = file.tensors.remove(&key).expect("a key of the file");
        file.tensors.insert(inner, t);
    }
    Ok(())
}

/// Buffers a checkpoint may hold that are not model tensors here: BatchNorm step counters (kept
/// by the trainers) and the relative position indices (computed from the grid).
fn is_derived_buffer(name: &str) -> bool {
    name.ends_with(".num_batches_tracked") || name.ends_with(".relative_position_index")
}

/// A checkpoint saved from another configuration cannot be restored into this model.
fn check_same_config(file: &CheckpointFile, ours: &ConvMaeConfig, shown: &str) -> candle_core::Result<()> {
    if let Some(cfg) = file.config() {
        let cfg = cfg.map_err(|e| err(format!("checkpoint '{shown}': {e}")))?;
        if &cfg != ours {
            return Err(err(format!(
                "checkpoint '{shown}' was saved from a different configuration: {} (this model: {})",
                serde_json::to_string(&cfg).unwrap(),
                serde_json::to_string(ours).unwrap()
            )));
        }
    }
    Ok(())
}

/// A checkpoint whose configuration (when it records one) has an encoder of another shape cannot
/// initialize this model; other settings (decoder, heads, image size) may differ.
fn check_same_encoder(file: &CheckpointFile, ours: &ConvMaeConfig, shown: &str) -> candle_core::Result<()> {
    if let Some(theirs) = file.config() {
        let theirs = theirs.map_err(|e| err(format!("checkpoint '{shown}': {e}")))?;
        if theirs.embed_dim != ours.embed_dim || theirs.depth != ours.depth || theirs.patch_size != ours.patch_size {
            return Err(err(format!(
                "checkpoint '{shown}' holds an encoder of another shape (embed_dim {:?}, depth {:?}) than this model's ({:?}, {:?})",
                theirs.embed_dim, theirs.depth, ours.embed_dim, ours.depth
            )));
        }
    }
    Ok(())
}

/// Copies AdamW moments from the file when it has them for every tensor; false (nothing touched)
/// when it has none.
fn restore_moments(moments: &mut [Moments], file: &CheckpointFile, shown: &str, dtype: DType, device: &Device) -> candle_core::Result<bool> {
    if !moments.iter().all(|m| file.tensors.contains_key(&format!("{EXP_AVG}{}", m.name))) {
        return Ok(false);
    }
    for m in moments.iter_mut() {
        let get = |prefix: &str| -> candle_core::Result<Tensor> {
            let key = format!("{prefix}{}", m.name);
            let t = file.tensors.get(&key).ok_or_else(|| err(format!("checkpoint '{shown}' lacks '{key}'")))?;
            t.to_dtype(dtype)?.to_device(device)
        };
        m.exp_avg = get(EXP_AVG)?;
        m.exp_avg_sq = get(EXP_AVG_SQ)?;
    }
    Ok(true)
}

/// Restores weights and, when the file has them, optimizer moments and step counters.
pub fn load_pretrainer(trainer: &mut Pretrainer, path: &Path, strict: bool) -> candle_core::Result<(LoadReport, String)> {
    let shown = path.display().to_string();
    let file = read_checkpoint(path)?;
    check_same_config(&file, &trainer.model.cfg, &shown)?;
    let mut report = load_weights(&mut trainer.model.params, &file, strict, &shown)?;
    let (dtype, device) = (trainer.model.dtype(), trainer.model.device().clone());
    if file.format == "convmae" && restore_moments(&mut trainer.optimizer.moments, &file, &shown, dtype, &device)? {
        let num = |k: &str| file.metadata.get(k).and_then(|v| v.parse::<u64>().ok());
        trainer.optimizer.step = num("optimizer_step").unwrap_or(0);
        trainer.micro_step = num("micro_step").unwrap_or(0);
        if let Some(seed) = num("seed") {
            trainer.seed = seed;
        }
        if let Some(adamw) = file.metadata.get("adamw").and_then(|a| serde_json::from_str(a).ok()) {
            trainer.optimizer.cfg = adamw;
        }
        report.optimizer_restored = true;
    }
    let extra = file.metadata.get("extra").cloned().unwrap_or_else(|| "{}".into());
    Ok((report, extra))
}

/// Starts a pretraining run from another run's weights, the way to continue pretraining from the
/// released encoder-only checkpoint (official issues #12 and #30): an official pretraining
/// `.pth`, one of our pretraining checkpoints, or a classifier's. What the file holds of this
/// model is loaded (strict=False); the rest keeps its fresh init (for the released file: the
/// fusion convs, `mask_token` and the decoder). The fixed sin-cos tables `pos_embed` and
/// `decoder_pos_embed` stay the model's own (a classifier's learned `pos_embed` is not one). The
/// optimizer state is not touched: on a fresh model, the run starts at step 0 with zero moments.
pub fn init_pretrainer_from(trainer: &mut Pretrainer, path: &Path) -> candle_core::Result<LoadReport> {
    let shown = path.display().to_string();
    let mut file = read_checkpoint(path)?;
    check_same_encoder(&file, &trainer.model.cfg, &shown)?;
    unwrap_module_prefixes(&mut file, &trainer.model.params, &shown)?;
    let report = load_weights_except(&mut trainer.model.params, &file, false, &shown, |name| name == "pos_embed" || name == "decoder_pos_embed")
        .map_err(|e| err(format!("{e} (the preset / config must describe the checkpoint's encoder{})", file.shape_hint())))?;
    if report.loaded.is_empty() {
        return Err(err(format!("checkpoint '{shown}' holds none of the pretraining model's tensors (is it a ConvMAE checkpoint?)")));
    }
    Ok(report)
}

/// Restores a classifier exactly (resume, evaluation): weights, and when the file is one of ours,
/// optimizer state and step. Official fine-tuned `.pth` files load too (strict: all 207 tensors).
pub fn load_classifier(trainer: &mut ClassifierTrainer, path: &Path, strict: bool) -> candle_core::Result<(LoadReport, String)> {
    let shown = path.display().to_string();
    let file = read_checkpoint(path)?;
    check_same_config(&file, &trainer.model.cfg, &shown)?;
    if let Some(head) = file.metadata.get("head") {
        let head: ClassifierHead = serde_json::from_str(head).map_err(|e| err(format!("checkpoint '{shown}': bad head metadata: {e}")))?;
        let (a, b) = (&head, &trainer.model.head);
        if a.num_classes != b.num_classes || a.pool != b.pool || a.kind != b.kind {
            return Err(err(format!(
                "checkpoint '{shown}' holds a different classifier head: {} (this model: {})",
                serde_json::to_string(a).unwrap(),
                serde_json::to_string(b).unwrap()
            )));
        }
    } else if file.format == "convmae" {
        return Err(err(format!("checkpoint '{shown}' is a pretraining checkpoint; initialize a classifier from it instead of resuming")));
    }
    let mut report = load_weights(&mut trainer.model.params, &file, strict, &shown)?;
    if let Some(n) = file.tensors.get(BN_BATCHES) {
        trainer.bn_batches = n.to_dtype(candle_core::DType::I64)?.to_scalar::<i64>()?.max(0) as u64;
    }
    let (dtype, device) = (trainer.model.dtype(), trainer.model.device().clone());
    let step = file.metadata.get("optimizer_step").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let restored = match &mut trainer.optimizer {
        Optimizer::AdamW(o) => {
            let restored = restore_moments(&mut o.moments, &file, &shown, dtype, &device)?;
            if restored {
                o.step = step;
            }
            restored
        }
        Optimizer::Lars(o) if o.momentum.iter().all(|(n, _)| file.tensors.contains_key(&format!("{MOMENTUM}{n}"))) => {
            for (name, mu) in o.momentum.iter_mut() {
                *mu = file.tensors[&format!("{MOMENTUM}{name}")].to_dtype(dtype)?.to_device(&device)?;
            }
            o.step = step;
            true
        }
        Optimizer::Lars(_) => false,
    };
    if restored {
        if let Some(seed) = file.metadata.get("seed").and_then(|v| v.parse::<u64>().ok()) {
            trainer.seed = seed;
        }
    }
    report.optimizer_restored = restored;
    let extra = file.metadata.get("extra").cloned().unwrap_or_else(|| "{}".into());
    Ok((report, extra))
}

/// Initializes a classifier from a pretraining (or any) checkpoint the way main_finetune.py and
/// main_linprobe.py do: strict=False, the encoder loaded, the classification head left at its
/// fresh init whatever the file holds; fc_norm / norm loaded when present. Optimizer state is not
/// touched. Encoder tensors of the wrong shape are an error naming the tensor.
pub fn init_classifier_from(trainer: &mut ClassifierTrainer, path: &Path) -> candle_core::Result<LoadReport> {
    let shown = path.display().to_string();
    let mut file = read_checkpoint(path)?;
    check_same_encoder(&file, &trainer.model.cfg, &shown)?;
    unwrap_module_prefixes(&mut file, &trainer.model.params, &shown)?;
    load_weights_except(&mut trainer.model.params, &file, false, &shown, |name| name.starts_with("head."))
        .map_err(|e| err(format!("{e} (the classifier's preset / config must describe the checkpoint's encoder{})", file.shape_hint())))
}

/// The prefixes of a model's BatchNorms (each has `running_mean`).
fn batch_norm_prefixes(params: &ParamStore) -> Vec<String> {
    params.iter().filter_map(|p| p.spec.name.strip_suffix(".running_mean").map(str::to_string)).collect()
}

/// The state of a downstream-task trainer (segmenter, detector) that its checkpoint holds: its
/// weights with the BatchNorms' shared `num_batches_tracked`, AdamW, step and seed, and its head
/// and optimizer settings as JSON.
struct TaskState<'a, H, A> {
    /// "segmenter" or "detector": the `kind` metadata and the word in messages.
    kind: &'static str,
    cfg: &'a ConvMaeConfig,
    params: &'a mut ParamStore,
    head: &'a H,
    adamw: &'a A,
    optimizer: &'a mut AdamW,
    bn_batches: &'a mut u64,
    seed: &'a mut u64,
}

/// `TaskState` read only, for saving.
struct TaskView<'a, H, A> {
    kind: &'static str,
    cfg: &'a ConvMaeConfig,
    params: &'a ParamStore,
    head: &'a H,
    adamw: &'a A,
    optimizer: &'a AdamW,
    bn_batches: u64,
    seed: u64,
}

fn save_task<H: Serialize, A: Serialize>(state: TaskView<H, A>, path: &Path, extra: &str) -> candle_core::Result<()> {
    let params = state.params;
    let mut tensors: Vec<(String, Tensor)> = params.iter().map(|p| (p.spec.name.clone(), p.tensor.clone())).collect();
    for prefix in batch_norm_prefixes(params) {
        tensors.push((format!("{prefix}.num_batches_tracked"), Tensor::new(state.bn_batches as i64, &Device::Cpu)?));
    }
    for m in &state.optimizer.moments {
        tensors.push((format!("{EXP_AVG}{}", m.name), m.exp_avg.clone()));
        tensors.push((format!("{EXP_AVG_SQ}{}", m.name), m.exp_avg_sq.clone()));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("kind".to_string(), state.kind.to_string());
    meta.insert("config".to_string(), serde_json::to_string(state.cfg).unwrap());
    meta.insert("head".to_string(), serde_json::to_string(state.head).unwrap());
    meta.insert("adamw".to_string(), serde_json::to_string(state.adamw).unwrap());
    meta.insert("optimizer_step".to_string(), state.optimizer.step.to_string());
    meta.insert("seed".to_string(), state.seed.to_string());
    meta.insert("dtype".to_string(), format!("{:?}", params.dtype).to_lowercase());
    meta.insert("extra".to_string(), extra.to_string());
    write_checkpoint(path, &tensors, meta)
}

/// Restores a task trainer exactly from our checkpoint of the same kind and head, or from an
/// official file (no `kind`: `from_official` renames its tensors first).
fn load_task<H, A>(state: TaskState<H, A>, path: &Path, strict: bool, from_official: fn(&mut CheckpointFile)) -> candle_core::Result<(LoadReport, String)>
where
    H: Serialize + serde::de::DeserializeOwned + PartialEq,
    A: Serialize + serde::de::DeserializeOwned + PartialEq,
{
    let (kind, shown) = (state.kind, path.display().to_string());
    let mut file = read_checkpoint(path)?;
    check_same_config(&file, state.cfg, &shown)?;
    match (file.metadata.get("kind").map(String::as_str), file.metadata.get("head")) {
        (Some(k), Some(head)) if k == kind => {
            let head: H = serde_json::from_str(head).map_err(|e| err(format!("checkpoint '{shown}': bad head metadata: {e}")))?;
            if &head != state.head {
                return Err(err(format!(
                    "checkpoint '{shown}' holds a different {kind} head: {} (this model: {})",
                    serde_json::to_string(&head).unwrap(),
                    serde_json::to_string(state.head).unwrap()
                )));
            }
        }
        (Some(other), _) => {
            return Err(err(format!("checkpoint '{shown}' is a {other} checkpoint; initialize a {kind} from it (initFrom) instead of resuming")));
        }
        (None, _) if file.format == "convmae" => {
            return Err(err(format!("checkpoint '{shown}' is a pretraining checkpoint; initialize a {kind} from it (initFrom) instead of resuming")));
        }
        (None, _) => from_official(&mut file),
    }
    let mut report = load_weights(state.params, &file, strict, &shown)?;
    if let Some(prefix) = batch_norm_prefixes(state.params).first() {
        if let Some(n) = file.tensors.get(&format!("{prefix}.num_batches_tracked")) {
            *state.bn_batches = n.to_dtype(DType::I64)?.to_scalar::<i64>()?.max(0) as u64;
        }
    }
    let (dtype, device) = (state.params.dtype, state.params.device.clone());
    if file.format == "convmae" && restore_moments(&mut state.optimizer.moments, &file, &shown, dtype, &device)? {
        let num = |k: &str| file.metadata.get(k).and_then(|v| v.parse::<u64>().ok());
        state.optimizer.step = num("optimizer_step").unwrap_or(0);
        if let Some(seed) = num("seed") {
            *state.seed = seed;
        }
        if let Some(adamw) = file.metadata.get("adamw").and_then(|a| serde_json::from_str::<A>(a).ok()) {
            if &adamw != state.adamw {
                return Err(err(format!("checkpoint '{shown}' was trained with other AdamW settings: {} (this model: {})", serde_json::to_string(&adamw).unwrap(), serde_json::to_string(state.adamw).unwrap())));
            }
        }
        report.optimizer_restored = true;
    }
    let extra = file.metadata.get("extra").cloned().unwrap_or_else(|| "{}".into());
    Ok((report, extra))
}

/// What `init_backbone_from` does with a file's relative position tables of another grid (a task
/// checkpoint at another image size or window).
#[derive(Clone, Copy, PartialEq)]
enum OtherGridTables {
    /// The segmenter's per-block BEiT tables [(2g - 1)^2, heads], seen as a heads-channel image of
    /// side 2g - 1, resized bicubically (align_corners=False) to the model's side: the table
    /// interpolation of the official SEG loader (`mmcv_custom/checkpoint.py`). Its first pass,
    /// BEiT's geometric-progression resampling, cannot run on these tables: it splits off
    /// `num_extra_tokens` class-token rows, here 0, and `table[:-0]` is empty.
    Resize,
    /// Left fresh and reported as reinitialized (the detector's tables).
    KeepFresh,
}

/// Initializes a task model's backbone from a pretraining, classifier or task checkpoint (ours
/// or official, renamed by `from_official`) as the official SEG and DET code do: strict=False,
/// `pos_embed` resized bicubically when the file's grid differs from the model's table (a 224-px
/// pretraining for 512-px segmentation: 14x14 to 32x32; for 1024-px DET detection: to 64x64;
/// Official-ConvMAE-Det keeps a 14x14 table and resizes it in its forward), the heads (`fresh`)
/// left at their init. Relative position tables of another shape are resized or stay fresh as
/// `tables` says (fresh, as when the file has none).
fn init_backbone_from(
    kind: &str,
    cfg: &ConvMaeConfig,
    params: &mut ParamStore,
    path: &Path,
    from_official: fn(&mut CheckpointFile),
    fresh: fn(&str) -> bool,
    tables: OtherGridTables,
) -> candle_core::Result<LoadReport> {
    let shown = path.display().to_string();
    let mut file = read_checkpoint(path)?;
    from_official(&mut file);
    check_same_encoder(&file, cfg, &shown)?;
    let dim = cfg.embed_dim[2];
    let to = params.find("pos_embed").map_or(cfg.grid(), |p| (p.spec.shape[1] as f64).sqrt().round() as usize);
    if let Some(table) = file.tensors.get("pos_embed") {
        let (tokens, width) = match table.dims() {
            [1, tokens, width] => (*tokens, *width),
            other => return Err(err(format!("checkpoint '{shown}': pos_embed has shape {other:?}, expected [1, tokens, {dim}]"))),
        };
        let from = (tokens as f64).sqrt().round() as usize;
        if width == dim && from * from == tokens && from != to {
            let values = table.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            let resized = resize_pos_embed(&values, dim, from, to);
            let resized = Tensor::from_vec(resized, (1, to * to, dim), &Device::Cpu)?.to_dtype(table.dtype())?;
            file.tensors.insert("pos_embed".into(), resized);
        }
    }
    if tables == OtherGridTables::Resize {
        for p in params.iter().filter(|p| p.spec.name.ends_with(".relative_position_bias_table")) {
            let (Some(table), &[rows, heads]) = (file.tensors.get(&p.spec.name), p.spec.shape.as_slice()) else { continue };
            let &[from_rows, from_heads] = table.dims() else { continue };
            let (from, to) = ((from_rows as f64).sqrt().round() as usize, (rows as f64).sqrt().round() as usize);
            if from_heads == heads && from_rows != rows && from * from == from_rows && to * to == rows {
                let values = table.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                let resized = Tensor::from_vec(resize_pos_embed(&values, heads, from, to), (rows, heads), &Device::Cpu)?.to_dtype(table.dtype())?;
                file.tensors.insert(p.spec.name.clone(), resized);
            }
        }
    }
    let other_shape: Vec<String> = params
        .iter()
        .filter(|p| [".relative_position_bias_table", ".rel_pos_h", ".rel_pos_w"].iter().any(|end| p.spec.name.ends_with(end)))
        .filter(|p| file.tensors.get(&p.spec.name).is_some_and(|t| t.dims() != p.spec.shape.as_slice()))
        .map(|p| p.spec.name.clone())
        .collect();
    load_weights_except(params, &file, false, &shown, |name| fresh(name) || other_shape.iter().any(|n| n == name))
        .map_err(|e| err(format!("{e} (the {kind}'s preset / config must describe the checkpoint's encoder{})", file.shape_hint())))
}

/// The official mmseg checkpoints name the backbone's tensors `backbone.<encoder name>`; ours
/// use the encoder's names as they are.
fn strip_backbone_prefix(file: &mut CheckpointFile) {
    if file.tensors.keys().any(|k| k.starts_with("backbone.")) {
        file.tensors = std::mem::take(&mut file.tensors).into_iter().map(|(k, v)| (k.strip_prefix("backbone.").map(str::to_string).unwrap_or(k), v)).collect();
    }
}

/// The official detectron2 checkpoints name the encoder's tensors `backbone.bottom_up.<name>`
/// (DET; its FPN's are `backbone.fpn_*`, as ours) or `backbone.net.<name>` (Official-ConvMAE-Det;
/// its pyramid's are `backbone.simfp_*`, as ours); ours use the encoder's names as they are.
fn strip_detectron2_encoder_prefix(file: &mut CheckpointFile) {
    for prefix in ["backbone.bottom_up.", "backbone.net."] {
        if file.tensors.keys().any(|k| k.starts_with(prefix)) {
            file.tensors = std::mem::take(&mut file.tensors).into_iter().map(|(k, v)| (k.strip_prefix(prefix).map(str::to_string).unwrap_or(k), v)).collect();
        }
    }
}

fn segmenter_state(trainer: &mut SegmenterTrainer) -> TaskState<'_, SegmenterHead, SegmenterAdamWConfig> {
    let model = &mut trainer.model;
    TaskState {
        kind: "segmenter",
        cfg: &model.cfg,
        params: &mut model.params,
        head: &model.head,
        adamw: &trainer.adamw,
        optimizer: &mut trainer.optimizer,
        bn_batches: &mut trainer.bn_batches,
        seed: &mut trainer.seed,
    }
}

/// Saves a segmenter: weights with every BatchNorm's `num_batches_tracked`, AdamW moments,
/// config, head, optimizer settings and step.
pub fn save_segmenter(trainer: &SegmenterTrainer, path: &Path, extra: &str) -> candle_core::Result<()> {
    let m = &trainer.model;
    let view = TaskView { kind: "segmenter", cfg: &m.cfg, params: &m.params, head: &m.head, adamw: &trainer.adamw, optimizer: &trainer.optimizer, bn_batches: trainer.bn_batches, seed: trainer.seed };
    save_task(view, path, extra)
}

/// Restores a segmenter exactly (resume, evaluation): weights and BatchNorm counters, and for
/// our files AdamW state, step and seed. The official UperNet `.pth` (mmseg's `state_dict`)
/// loads too.
pub fn load_segmenter(trainer: &mut SegmenterTrainer, path: &Path, strict: bool) -> candle_core::Result<(LoadReport, String)> {
    load_task(segmenter_state(trainer), path, strict, strip_backbone_prefix)
}

/// Initializes a segmenter's backbone from an encoder checkpoint (`init_backbone_from`); the
/// decode and auxiliary heads stay fresh.
pub fn init_segmenter_from(trainer: &mut SegmenterTrainer, path: &Path) -> candle_core::Result<LoadReport> {
    let model = &mut trainer.model;
    init_backbone_from(
        "segmenter",
        &model.cfg,
        &mut model.params,
        path,
        strip_backbone_prefix,
        |name| name.starts_with("decode_head.") || name.starts_with("auxiliary_head."),
        OtherGridTables::Resize,
    )
}

fn detector_state(trainer: &mut DetectorTrainer) -> TaskState<'_, DetectorHead, DetectorAdamWConfig> {
    let model = &mut trainer.model;
    TaskState {
        kind: "detector",
        cfg: &model.cfg,
        params: &mut model.params,
        head: &model.head,
        adamw: &trainer.adamw,
        optimizer: &mut trainer.optimizer,
        bn_batches: &mut trainer.bn_batches,
        seed: &mut trainer.seed,
    }
}

/// Saves a detector as a segmenter is saved (`save_task`).
pub fn save_detector(trainer: &DetectorTrainer, path: &Path, extra: &str) -> candle_core::Result<()> {
    let m = &trainer.model;
    let view = TaskView { kind: "detector", cfg: &m.cfg, params: &m.params, head: &m.head, adamw: &trainer.adamw, optimizer: &trainer.optimizer, bn_batches: trainer.bn_batches, seed: trainer.seed };
    save_task(view, path, extra)
}

/// Restores a detector exactly: ours, or an official detectron2 `model_final` (`model`
/// state_dict, encoder under `backbone.bottom_up.` or `backbone.net.`).
pub fn load_detector(trainer: &mut DetectorTrainer, path: &Path, strict: bool) -> candle_core::Result<(LoadReport, String)> {
    load_task(detector_state(trainer), path, strict, strip_detectron2_encoder_prefix)
}

/// Initializes a detector's backbone from an encoder checkpoint (`init_backbone_from`; pos_embed
/// resized to the model's table); the FPN or pyramid, RPN and ROI heads stay fresh.
pub fn init_detector_from(trainer: &mut DetectorTrainer, path: &Path) -> candle_core::Result<LoadReport> {
    let model = &mut trainer.model;
    init_backbone_from(
        "detector",
        &model.cfg,
        &mut model.params,
        path,
        strip_detectron2_encoder_prefix,
        |name| name.starts_with("backbone.fpn_") || name.starts_with("backbone.simfp_") || name.starts_with("proposal_generator.") || name.starts_with("roi_heads."),
        OtherGridTables::KeepFresh,
    )
}
