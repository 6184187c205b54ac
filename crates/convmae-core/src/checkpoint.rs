//! Checkpoint IO: our safetensors checkpoints (weights under official names, optimizer state,
//! config and run state in the metadata), written atomically; and the official `.pth` files.

use crate::config::ConvMaeConfig;
use crate::params::ParamStore;
use crate::train::Pretrainer;
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

pub const FORMAT: &str = "convmae-checkpoint/1";
const EXP_AVG: &str = "optimizer.exp_avg.";
const EXP_AVG_SQ: &str = "optimizer.exp_avg_sq.";

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
    let bytes = safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| err(format!("cannot serialize checkpoint '{}': {e}", path.display())))?;
    write_atomically(path, &bytes).map_err(|e| err(format!("cannot write checkpoint '{}': {e}", path.display())))
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
}

#[derive(Debug, Default, Serialize)]
pub struct LoadReport {
    pub format: String,
    pub loaded: Vec<String>,
    /// Model tensors the file lacks (kept at their current values).
    pub missing: Vec<String>,
    /// File tensors the model has no place for (ignored).
    pub unexpected: Vec<String>,
    pub optimizer_restored: bool,
}

/// Copies the file's weights into `params`. Shapes must match exactly; with `strict`, every model
/// tensor must be present. Optimizer entries are not counted as unexpected.
pub fn load_weights(params: &mut ParamStore, file: &CheckpointFile, strict: bool, shown: &str) -> candle_core::Result<LoadReport> {
    let mut report = LoadReport { format: file.format.to_string(), ..Default::default() };
    let names: Vec<(String, Vec<usize>)> = params.iter().map(|p| (p.spec.name.clone(), p.spec.shape.clone())).collect();
    for (name, shape) in &names {
        match file.tensors.get(name) {
            None => report.missing.push(name.clone()),
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
        .filter(|k| params.find(k).is_none() && !k.starts_with("optimizer."))
        .cloned()
        .collect();
    Ok(report)
}

/// Restores weights and, when the file has them, optimizer moments and step counters.
pub fn load_pretrainer(trainer: &mut Pretrainer, path: &Path, strict: bool) -> candle_core::Result<(LoadReport, String)> {
    let shown = path.display().to_string();
    let file = read_checkpoint(path)?;
    if let Some(cfg) = file.config() {
        let cfg = cfg.map_err(|e| err(format!("checkpoint '{shown}': {e}")))?;
        if cfg != trainer.model.cfg {
            return Err(err(format!(
                "checkpoint '{shown}' was saved from a different configuration: {} (this model: {})",
                serde_json::to_string(&cfg).unwrap(),
                serde_json::to_string(&trainer.model.cfg).unwrap()
            )));
        }
    }
    let mut report = load_weights(&mut trainer.model.params, &file, strict, &shown)?;
    let has_moments = trainer.optimizer.moments.iter().all(|m| file.tensors.contains_key(&format!("{EXP_AVG}{}", m.name)));
    if file.format == "convmae" && has_moments {
        let dtype = trainer.model.dtype();
        let device = trainer.model.device().clone();
        for m in trainer.optimizer.moments.iter_mut() {
            let get = |prefix: &str| -> candle_core::Result<Tensor> {
                let key = format!("{prefix}{}", m.name);
                let t = file.tensors.get(&key).ok_or_else(|| err(format!("checkpoint '{shown}' lacks '{key}'")))?;
                t.to_dtype(dtype)?.to_device(&device)
            };
            m.exp_avg = get(EXP_AVG)?;
            m.exp_avg_sq = get(EXP_AVG_SQ)?;
        }
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
