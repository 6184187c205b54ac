//! Runs a fixture in the golden format (`shared/golden/README.md`) through our model and reports
//! the error of every output and gradient. Used by the parity tests and `convmae check-fixture`.

use crate::config::ConvMaeConfig;
use crate::masking::Masking;
use crate::model::layers::token_blocks;
use crate::model::{ConvMae, ConvPath};
use crate::model::classifier::{cross_entropy, ClassifierHead, ConvViT};
use crate::params::{classifier_param_specs, pretrain_param_specs, ParamStore};
use crate::precision::Precision;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::collections::HashMap;

/// Max relative error (max|ours - ref| / max|ref|) a faithful implementation stays under.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-8,
        _ => 1e-4,
    }
}

#[derive(Debug, Serialize)]
pub struct TensorError {
    pub name: String,
    pub max_abs: f64,
    pub max_rel: f64,
}

#[derive(Debug, Serialize)]
pub struct FixtureReport {
    pub fixture: String,
    pub kind: String,
    pub dtype: String,
    pub tolerance: f64,
    pub pass: bool,
    pub worst: String,
    pub worst_rel: f64,
    /// How stages 1-2 were computed (pretraining fixtures only).
    pub path: Option<ConvPath>,
    pub errors: Vec<TensorError>,
}

pub struct Fixture {
    pub kind: String,
    pub meta: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
}

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

impl Fixture {
    pub fn read(path: &str) -> candle_core::Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read fixture '{path}': {e}")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| err(format!("fixture '{path}' is not a safetensors file: {e}")))?;
        let config = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("config"))
            .ok_or_else(|| err(format!("fixture '{path}' has no 'config' metadata")))?;
        let meta: serde_json::Value =
            serde_json::from_str(config).map_err(|e| err(format!("fixture '{path}': bad config JSON: {e}")))?;
        let kind = meta["kind"].as_str().unwrap_or("pretrain").to_string();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        Ok(Self { kind, meta, tensors })
    }

    pub fn tensor(&self, name: &str) -> candle_core::Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| err(format!("fixture has no tensor '{name}'")))
    }

    /// The model configuration recorded in the fixture's metadata.
    pub fn pretrain_config(&self) -> candle_core::Result<ConvMaeConfig> {
        let m = &self.meta;
        let mut cfg = ConvMaeConfig::base();
        let usize3 = |v: &serde_json::Value| -> Option<[usize; 3]> {
            let a = v.as_array()?;
            Some([a.first()?.as_u64()? as usize, a.get(1)?.as_u64()? as usize, a.get(2)?.as_u64()? as usize])
        };
        if let Some(v) = usize3(&m["embed_dim"]) {
            cfg.embed_dim = v;
        }
        if let Some(v) = usize3(&m["depth"]) {
            cfg.depth = v;
        }
        if let Some(v) = usize3(&m["patch_size"]) {
            cfg.patch_size = v;
        }
        if let Some(a) = m["mlp_ratio"].as_array() {
            for (i, r) in a.iter().take(3).enumerate() {
                cfg.mlp_ratio[i] = r.as_f64().unwrap_or(4.0);
            }
        }
        let get_usize = |k: &str, dflt: usize| m[k].as_u64().map(|v| v as usize).unwrap_or(dflt);
        cfg.img_size = get_usize("img_size", cfg.img_size);
        cfg.num_heads = get_usize("num_heads", cfg.num_heads);
        cfg.decoder_embed_dim = get_usize("decoder_embed_dim", cfg.decoder_embed_dim);
        cfg.decoder_depth = get_usize("decoder_depth", cfg.decoder_depth);
        cfg.decoder_num_heads = get_usize("decoder_num_heads", cfg.decoder_num_heads);
        cfg.norm_pix_loss = m["norm_pix_loss"].as_bool().unwrap_or(cfg.norm_pix_loss);
        cfg.mask_ratio = m["mask_ratio"].as_f64().unwrap_or(cfg.mask_ratio);
        cfg.complementary_masking = m["complementary_masking"].as_bool().unwrap_or(false);
        cfg.validate().map_err(err)?;
        if let Some(k) = m["len_keep"].as_u64() {
            if k as usize != cfg.len_keep() {
                return Err(err(format!("fixture len_keep {k} disagrees with its mask_ratio ({})", cfg.len_keep())));
            }
        }
        Ok(cfg)
    }

    /// Builds a model holding the fixture's `param.*` tensors, in `dtype`.
    pub fn pretrain_model(&self, dtype: DType, device: &Device) -> candle_core::Result<ConvMae> {
        let cfg = self.pretrain_config()?;
        let params = ParamStore::build(pretrain_param_specs(&cfg), dtype, device, |spec| {
            let t = self.tensor(&format!("param.{}", spec.name))?;
            if t.dims() != spec.shape.as_slice() {
                return Err(err(format!("fixture tensor 'param.{}' has shape {:?}, the model expects {:?}", spec.name, t.dims(), spec.shape)));
            }
            Ok(t.clone())
        })?;
        Ok(ConvMae { cfg, params, path: ConvPath::Sparse, precision: Default::default(), sublayer_packing: None })
    }
}

/// max|a - b| and that over max|b|, computed in f64.
pub fn compare(name: &str, ours: &Tensor, reference: &Tensor) -> candle_core::Result<TensorError> {
    if ours.dims() != reference.dims() {
        return Err(err(format!("'{name}': our shape {:?} differs from the reference's {:?}", ours.dims(), reference.dims())));
    }
    let a = ours.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = reference.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let mut max_abs = 0f64;
    let mut max_ref = 0f64;
    for (x, y) in a.iter().zip(&b) {
        let d = (x - y).abs();
        // NaN must count as failure: it is not Less or Equal, so it replaces the maximum.
        if !matches!(d.partial_cmp(&max_abs), Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)) {
            max_abs = d;
        }
        max_ref = max_ref.max(y.abs());
    }
    let max_rel = if max_ref > 0.0 { max_abs / max_ref } else { max_abs };
    Ok(TensorError { name: name.to_string(), max_abs, max_rel })
}

/// Runs a pretraining fixture: forward with the fixture's noise, backward, compare everything.
/// On the sparse path the stage maps exist only at visible positions: those are compared.
pub fn check_pretrain(fx: &Fixture, path: &str, dtype: DType, conv_path: ConvPath, device: &Device) -> candle_core::Result<FixtureReport> {
    let mut model = fx.pretrain_model(dtype, device)?;
    model.path = conv_path;
    let cfg = &model.cfg;
    let imgs = fx.tensor("input.imgs")?; // [B, C, H, W]
    let (b, _, h, w) = imgs.dims4()?;
    if h != cfg.img_size || w != cfg.img_size {
        return Err(err(format!("fixture images are {h}x{w}, its config says img_size {}", cfg.img_size)));
    }
    let noise = fx.tensor("input.noise")?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if noise.len() != b * cfg.num_tokens() {
        return Err(err(format!("fixture tensor 'input.noise' holds {} values, its {b} images of {} tokens need {}", noise.len(), cfg.num_tokens(), b * cfg.num_tokens())));
    }
    let masking = if cfg.complementary_masking {
        Masking::complementary_from_noise(&noise, b, cfg.num_tokens(), cfg.len_keep())?
    } else {
        Masking::from_noise(&noise, b, cfg.num_tokens(), cfg.len_keep())
    };
    let imgs_nhwc = imgs.permute((0, 2, 3, 1))?.contiguous()?.to_dtype(dtype)?.to_device(device)?;
    let out = model.forward_pretrain(&imgs_nhwc, &masking)?;
    let grads = out.backward(&out.loss)?;

    let nchw = |t: &Tensor| t.permute((0, 3, 1, 2));
    let rows = masking.visible_token_rows(&Device::Cpu)?;
    // Our stage map vs the reference's, both as NCHW (dense) or both as visible blocks (sparse).
    let stage_pair = |ours: &Tensor, name: &str, stage: usize| -> candle_core::Result<(Tensor, Tensor)> {
        let reference = fx.tensor(name)?;
        Ok(match conv_path {
            ConvPath::Dense => (nchw(ours)?, reference.clone()),
            ConvPath::Sparse => {
                let nhwc = reference.permute((0, 2, 3, 1))?.contiguous()?;
                (ours.clone(), token_blocks(&nhwc, cfg.stage_cell(stage), &rows)?)
            }
        })
    };
    let (s1_ours, s1_ref) = stage_pair(&out.stage1, "act.stage1", 0)?;
    let (s2_ours, s2_ref) = stage_pair(&out.stage2, "act.stage2", 1)?;
    // The images' one ids_restore: view 0's (the other views' are it rolled; FastConvMAE returns
    // the shared one).
    let ids_restore = Tensor::from_slice(&masking.ids_restore[..b * cfg.num_tokens()], (b, cfg.num_tokens()), &Device::Cpu)?;
    let mut errors = vec![
        compare("output.loss", &out.loss.reshape(1)?, fx.tensor("output.loss")?)?,
        compare("output.pred", &out.pred, fx.tensor("output.pred")?)?,
        compare("output.mask", &out.mask, fx.tensor("output.mask")?)?,
        compare("output.ids_restore", &ids_restore, fx.tensor("output.ids_restore")?)?,
        compare("output.latent", &out.latent, fx.tensor("output.latent")?)?,
        compare("act.stage1", &s1_ours, &s1_ref)?,
        compare("act.stage2", &s2_ours, &s2_ref)?,
        compare("act.stage3_tokens", &out.stage3_tokens, fx.tensor("act.stage3_tokens")?)?,
    ];
    for ((param, _), g) in model.params.trainable().zip(model.params.gradients(&grads)?) {
        let name = format!("grad.{}", param.spec.name);
        errors.push(compare(&name, &g, fx.tensor(&name)?)?);
    }
    let mut r = report(path, "pretrain", dtype, errors);
    r.path = Some(conv_path);
    Ok(r)
}

fn report(path: &str, kind: &str, dtype: DType, errors: Vec<TensorError>) -> FixtureReport {
    let tol = tolerance(dtype);
    let worst = errors.iter().max_by(|a, b| a.max_rel.total_cmp(&b.max_rel)).unwrap();
    FixtureReport {
        fixture: path.to_string(),
        kind: kind.to_string(),
        dtype: format!("{dtype:?}").to_lowercase(),
        tolerance: tol,
        pass: errors.iter().all(|e| e.max_rel <= tol),
        worst: worst.name.clone(),
        worst_rel: worst.max_rel,
        path: None,
        errors,
    }
}

/// Runs a fine-tuning fixture (ConvViT, global pool, cross-entropy): forward, backward, compare.
pub fn check_finetune(fx: &Fixture, path: &str, dtype: DType, device: &Device) -> candle_core::Result<FixtureReport> {
    let cfg = fx.pretrain_config()?;
    if fx.meta["global_pool"].as_bool() == Some(false) {
        return Err(err(format!("fixture '{path}': only global_pool=true fine-tune fixtures are supported")));
    }
    let num_classes = fx.meta["num_classes"]
        .as_u64()
        .ok_or_else(|| err(format!("fixture '{path}' has no num_classes in its config")))? as usize;
    let head = ClassifierHead::finetune(num_classes);
    let params = ParamStore::build(classifier_param_specs(&cfg, &head), dtype, device, |spec| {
        let t = fx.tensor(&format!("param.{}", spec.name))?;
        if t.dims() != spec.shape.as_slice() {
            return Err(err(format!("fixture tensor 'param.{}' has shape {:?}, the model expects {:?}", spec.name, t.dims(), spec.shape)));
        }
        Ok(t.clone())
    })?;
    let model = ConvViT { cfg, head, params, precision: Precision::Fp32 };
    let imgs = fx.tensor("input.imgs")?.permute((0, 2, 3, 1))?.contiguous()?.to_dtype(dtype)?.to_device(device)?;
    let labels: Vec<usize> = fx.tensor("input.labels")?.to_dtype(DType::I64)?.to_vec1::<i64>()?.iter().map(|&l| l as usize).collect();
    let out = model.forward(&imgs)?;
    let loss = cross_entropy(&out.logits, &labels)?;
    let grads = loss.backward()?;
    let mut errors = vec![
        compare("output.loss", &loss.reshape(1)?, fx.tensor("output.loss")?)?,
        compare("output.features", &out.features, fx.tensor("output.features")?)?,
        compare("output.logits", &out.logits, fx.tensor("output.logits")?)?,
    ];
    for ((param, _), g) in model.params.trainable().zip(model.params.gradients(&grads)?) {
        let name = format!("grad.{}", param.spec.name);
        errors.push(compare(&name, &g, fx.tensor(&name)?)?);
    }
    Ok(report(path, "finetune", dtype, errors))
}

/// Turns TF32 off for f32 matmuls (a process-wide flag of candle's) until dropped, then puts
/// back what was there.
#[cfg(feature = "cuda")]
struct FullF32Matmuls(bool);

#[cfg(feature = "cuda")]
impl FullF32Matmuls {
    fn new() -> Self {
        let before = candle_core::cuda::gemm_reduced_precision_f32();
        candle_core::cuda::set_gemm_reduced_precision_f32(false);
        Self(before)
    }
}

#[cfg(feature = "cuda")]
impl Drop for FullF32Matmuls {
    fn drop(&mut self) {
        candle_core::cuda::set_gemm_reduced_precision_f32(self.0);
    }
}

/// Reads the fixture's kind from its metadata and runs the matching check on the CPU.
pub fn check_fixture(path: &str, dtype: DType, conv_path: ConvPath) -> candle_core::Result<FixtureReport> {
    check_fixture_on(path, dtype, conv_path, &Device::Cpu)
}

/// `check_fixture` with the model on `device` (the CUDA parity check). On CUDA its f32 matmuls
/// run in full f32 for the check: the fixtures were computed so, and TF32 (which device setup
/// turns on for training, as PyTorch's allow_tf32 does) rounds their inputs to 10 mantissa
/// bits, about 1e-3 relative, ten times the f32 tolerance. The first GPU run measured exactly
/// that: 2.6e-3 on a gradient with TF32, where f64 agreed to 3e-15.
pub fn check_fixture_on(path: &str, dtype: DType, conv_path: ConvPath, device: &Device) -> candle_core::Result<FixtureReport> {
    #[cfg(feature = "cuda")]
    let _full_f32 = FullF32Matmuls::new();
    let fx = Fixture::read(path)?;
    match fx.kind.as_str() {
        "pretrain" => check_pretrain(&fx, path, dtype, conv_path, device),
        "finetune" => check_finetune(&fx, path, dtype, device),
        other => Err(err(format!("fixture '{path}' has kind '{other}', which this build cannot check"))),
    }
}
