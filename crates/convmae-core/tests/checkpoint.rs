//! Checkpoints: official .pth import, shape errors that name the tensor, and exact resume.

use candle_core::{DType, Device, Tensor};
use convmae_core::checkpoint::{load_pretrainer, load_weights, read_checkpoint, save_pretrainer};
use convmae_core::fixture::Fixture;
use convmae_core::optim::AdamWConfig;
use convmae_core::train::{Batch, Pretrainer, StepOptions};
use convmae_core::{ConvMae, ConvMaeConfig};
use std::path::PathBuf;

/// The golden fixtures: $CONVMAE_GOLDEN, or ../shared/golden beside the repository.
fn golden(name: &str) -> String {
    let dir = std::env::var("CONVMAE_GOLDEN").unwrap_or_else(|_| format!("{}/../../../shared/golden", env!("CARGO_MANIFEST_DIR")));
    format!("{dir}/{name}")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("convmae-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn golden_model() -> ConvMae {
    ConvMae::new(ConvMaeConfig::golden_small(), DType::F32, &Device::Cpu, 1).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn official_pth_loads_every_tensor() {
    let mut model = golden_model();
    let file = read_checkpoint(std::path::Path::new(&golden("pretrain_small_official.pth"))).unwrap();
    assert_eq!(file.format, "pth");
    let report = load_weights(&mut model.params, &file, true, "official").unwrap();
    assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{report:?}");
    assert_eq!(report.loaded.len(), model.params.iter().count());
    // The .pth holds the fixture's weights in float32.
    let fx = Fixture::read(&golden("pretrain_small.safetensors")).unwrap();
    for p in model.params.iter() {
        let want = fx.tensor(&format!("param.{}", p.spec.name)).unwrap();
        assert!(max_diff(&p.tensor, want) < 1e-6, "{}", p.spec.name);
    }
}

#[test]
fn encoder_only_pth_lists_the_decoder_as_missing() {
    let mut model = golden_model();
    let file = read_checkpoint(std::path::Path::new(&golden("pretrain_small_encoder_only.pth"))).unwrap();
    let strict = load_weights(&mut model.params, &file, true, "enc").unwrap_err().to_string();
    assert!(strict.contains("strict: false"), "{strict}");
    let report = load_weights(&mut model.params, &file, false, "enc").unwrap();
    assert!(report.unexpected.is_empty());
    assert!(report.missing.iter().all(|n| n == "mask_token"
        || n.starts_with("decoder")
        || n.starts_with("stage1_output_decode")
        || n.starts_with("stage2_output_decode")));
    assert!(report.missing.contains(&"mask_token".to_string()));
    assert!(report.missing.contains(&"decoder_pred.weight".to_string()));
    assert!(report.loaded.contains(&"blocks3.1.attn.qkv.weight".to_string()));
}

#[test]
fn mis_shaped_tensor_error_names_the_tensor_and_both_shapes() {
    // The golden weights into a model whose stage-1 width differs.
    let mut cfg = ConvMaeConfig::golden_small();
    cfg.embed_dim[0] = 16;
    let mut model = ConvMae::new(cfg, DType::F32, &Device::Cpu, 0).unwrap();
    let file = read_checkpoint(std::path::Path::new(&golden("pretrain_small_official.pth"))).unwrap();
    let e = load_weights(&mut model.params, &file, false, "official").unwrap_err().to_string();
    assert!(e.contains("'patch_embed1.proj.weight'") && e.contains("[32, 3, 4, 4]") && e.contains("[16, 3, 4, 4]"), "{e}");
}

fn batch_pixels(step: u64, b: usize, s: usize) -> Vec<u8> {
    (0..b * s * s * 3).map(|i| ((i as u64 * 2654435761 + step * 97) % 251) as u8).collect()
}

fn run(trainer: &mut Pretrainer, from: u64, to: u64) {
    let s = trainer.model.cfg.img_size;
    for step in from..to {
        let px = batch_pixels(step, 2, s);
        let batch = Batch { pixels: &px, batch: 2, height: s, width: s, channels: 3 };
        let lr = 1e-3 * (1.0 + step as f64) / 4.0;
        trainer.step(&batch, &StepOptions { lr, accum_steps: 2, noise: None }).unwrap();
    }
}

#[test]
fn resume_is_bitwise_identical_to_an_uninterrupted_run() {
    let cfg = ConvMaeConfig::tiny();
    let fresh = || Pretrainer::new(ConvMae::new(cfg.clone(), DType::F32, &Device::Cpu, 7).unwrap(), AdamWConfig::default(), 7).unwrap();
    let mut straight = fresh();
    run(&mut straight, 0, 8);

    let mut first = fresh();
    run(&mut first, 0, 4);
    let path = tmp("resume.safetensors");
    save_pretrainer(&first, &path, "{\"step\":4}").unwrap();
    drop(first);
    // A differently seeded model: everything must come from the checkpoint.
    let mut resumed = Pretrainer::new(ConvMae::new(cfg.clone(), DType::F32, &Device::Cpu, 99).unwrap(), AdamWConfig::default(), 99).unwrap();
    let (report, extra) = load_pretrainer(&mut resumed, &path, true).unwrap();
    assert!(report.optimizer_restored);
    assert_eq!(extra, "{\"step\":4}");
    run(&mut resumed, 4, 8);

    assert_eq!(resumed.optimizer.step, straight.optimizer.step);
    for (a, b) in straight.model.params.iter().zip(resumed.model.params.iter()) {
        let (x, y) = (a.tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{} differs after resume", a.spec.name);
    }
}

#[test]
fn saving_inside_an_accumulation_window_is_refused() {
    let mut t = Pretrainer::new(ConvMae::new(ConvMaeConfig::tiny(), DType::F32, &Device::Cpu, 0).unwrap(), AdamWConfig::default(), 0).unwrap();
    run(&mut t, 0, 1);
    let e = save_pretrainer(&t, &tmp("mid.safetensors"), "{}").unwrap_err().to_string();
    assert!(e.contains("accumulation"), "{e}");
}

#[test]
fn loading_a_checkpoint_of_another_config_is_refused() {
    let t = Pretrainer::new(ConvMae::new(ConvMaeConfig::tiny(), DType::F32, &Device::Cpu, 0).unwrap(), AdamWConfig::default(), 0).unwrap();
    let path = tmp("tiny.safetensors");
    save_pretrainer(&t, &path, "{}").unwrap();
    let mut other_cfg = ConvMaeConfig::tiny();
    other_cfg.mask_ratio = 0.5;
    let mut other = Pretrainer::new(ConvMae::new(other_cfg, DType::F32, &Device::Cpu, 0).unwrap(), AdamWConfig::default(), 0).unwrap();
    let e = load_pretrainer(&mut other, &path, true).unwrap_err().to_string();
    assert!(e.contains("different configuration"), "{e}");
}

#[test]
fn checkpoint_write_is_atomic_and_readable() {
    let t = Pretrainer::new(ConvMae::new(ConvMaeConfig::tiny(), DType::F32, &Device::Cpu, 0).unwrap(), AdamWConfig::default(), 0).unwrap();
    let path = tmp("atomic").join("atomic.safetensors");
    save_pretrainer(&t, &path, "{}").unwrap();
    let dir = path.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp-")).collect();
    assert!(leftovers.is_empty());
    let file = read_checkpoint(&path).unwrap();
    assert_eq!(file.format, "convmae");
    assert_eq!(file.config().unwrap().unwrap(), ConvMaeConfig::tiny());
}

/// A non-finite loss is an error naming it, and nothing changes: no weight, no optimizer step,
/// no gradient kept for the accumulation window (the backward now runs before the loss is
/// read, so this is what keeps its gradients out).
#[test]
fn a_non_finite_loss_changes_nothing() {
    let mut t = Pretrainer::new(ConvMae::new(ConvMaeConfig::tiny(), DType::F32, &Device::Cpu, 0).unwrap(), AdamWConfig::default(), 0).unwrap();
    let nan = t.model.params.get("decoder_pred.bias").ones_like().unwrap().affine(f64::NAN, 0.0).unwrap();
    t.model.params.set("decoder_pred.bias", &nan).unwrap();
    let before: Vec<Vec<f32>> = t.model.params.iter().map(|p| p.tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
    let s = t.model.cfg.img_size;
    let px = batch_pixels(0, 2, s);
    let batch = Batch { pixels: &px, batch: 2, height: s, width: s, channels: 3 };
    let e = t.step(&batch, &StepOptions { lr: 1e-3, accum_steps: 2, noise: None }).unwrap_err().to_string();
    assert!(e.contains("loss is NaN") && e.contains("weights were not updated"), "{e}");
    assert!(!t.has_pending_gradients());
    assert_eq!(t.optimizer.step, 0);
    for (p, b) in t.model.params.iter().zip(&before) {
        let now = p.tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(now.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{} changed", p.spec.name);
    }
}

/// Encoder files of other training code wrap the names in one module (DDP's `module.`,
/// mmselfsup's `backbone.`, EasyCV's `encoder.` / `decoder.`): initialization reads them as the
/// model's names; a name wrapped twice is an error naming both.
#[test]
fn initialization_reads_names_wrapped_in_one_module() {
    use convmae_core::checkpoint::init_pretrainer_from;
    use std::collections::HashMap;
    let official = read_checkpoint(std::path::Path::new(&golden("pretrain_small_official.pth"))).unwrap();
    let wrap = |name: &str, how: &str| -> String {
        match how {
            "easycv" if name.starts_with("decoder") || name == "mask_token" => format!("decoder.{name}"),
            "easycv" => format!("encoder.{name}"),
            _ => format!("module.{name}"),
        }
    };
    for how in ["easycv", "ddp"] {
        let wrapped: HashMap<String, Tensor> = official.tensors.iter().map(|(k, v)| (wrap(k, how), v.clone())).collect();
        let path = tmp(&format!("wrapped-{how}.safetensors"));
        candle_core::safetensors::save(&wrapped, &path).unwrap();
        let model = golden_model();
        let mut trainer = Pretrainer::new(model, AdamWConfig::default(), 0).unwrap();
        let report = init_pretrainer_from(&mut trainer, &path).unwrap();
        assert!(report.unexpected.is_empty() && report.missing.is_empty(), "{how}: {report:?}");
        // The fixed sin-cos tables stay the model's own; everything else is the file's.
        assert_eq!(report.loaded.len() + report.reinitialized.len(), trainer.model.params.iter().count(), "{how}");
        for name in &report.loaded {
            assert!(max_diff(trainer.model.params.get(name), &official.tensors[name]) == 0.0, "{how}: {name}");
        }
    }
    // A classifier from mmselfsup's layout: the encoder loads, the head stays fresh.
    {
        use convmae_core::checkpoint::init_classifier_from;
        use convmae_core::classify::{ClassifierTrainer, OptimizerConfig};
        use convmae_core::model::classifier::{ClassifierHead, ConvViT, HeadKind};
        let wrapped: HashMap<String, Tensor> = official.tensors.iter().map(|(k, v)| (format!("backbone.{k}"), v.clone())).collect();
        let path = tmp("wrapped-backbone.safetensors");
        candle_core::safetensors::save(&wrapped, &path).unwrap();
        let model = ConvViT::new(ConvMaeConfig::golden_small(), ClassifierHead::finetune(10), DType::F32, &Device::Cpu, 3).unwrap();
        let mut t = ClassifierTrainer::new(model, OptimizerConfig::default_for(HeadKind::Finetune), 3).unwrap();
        let report = init_classifier_from(&mut t, &path).unwrap();
        assert_eq!(report.missing, ["head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"]);
        assert!(max_diff(t.model.params.get("blocks3.1.mlp.fc2.bias"), &official.tensors["blocks3.1.mlp.fc2.bias"]) == 0.0);
        assert!(report.unexpected.iter().all(|n| n.starts_with("backbone.")), "{:?}", report.unexpected);
    }
    // Both `module.x` and `encoder.x`: which one is meant is not for us to guess.
    let mut both: HashMap<String, Tensor> = official.tensors.iter().map(|(k, v)| (format!("module.{k}"), v.clone())).collect();
    both.insert("encoder.norm.weight".into(), official.tensors["norm.weight"].clone());
    let path = tmp("wrapped-twice.safetensors");
    candle_core::safetensors::save(&both, &path).unwrap();
    let mut trainer = Pretrainer::new(golden_model(), AdamWConfig::default(), 0).unwrap();
    let e = init_pretrainer_from(&mut trainer, &path).unwrap_err().to_string();
    assert!(e.contains("'encoder.norm.weight'") && e.contains("'module.norm.weight'") && e.contains("tensor 'norm.weight'"), "{e}");
}

/// A file without our metadata describes its encoder by its shapes (under any one module
/// prefix): widths, patch sizes, depths, MLP ratios and the image size of its pos_embed grid;
/// num_heads is in no shape (one per 64 channels is a guess). A load into a model of another
/// encoder names the config the file's shapes give.
#[test]
fn an_official_file_describes_its_encoder_by_its_shapes() {
    use convmae_core::checkpoint::init_pretrainer_from;
    use std::collections::HashMap;
    let official = read_checkpoint(std::path::Path::new(&golden("pretrain_small_official.pth"))).unwrap();
    let want = ConvMaeConfig::golden_small();
    let check = |cfg: ConvMaeConfig| {
        assert_eq!((cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.mlp_ratio, cfg.in_chans), (want.img_size, want.patch_size, want.embed_dim, want.depth, want.mlp_ratio, want.in_chans));
        assert_eq!(cfg.num_heads, 1, "64 channels: one head by the 64-a-head guess (the fixture's model has 4)");
    };
    // The pretraining file's decoder too (32 wide, 2 blocks; its heads a guess as well).
    let c = official.inferred_config().unwrap().unwrap();
    assert_eq!((c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads), (32, 2, 1));
    check(official.inferred_config().unwrap().unwrap());
    let wrapped: HashMap<String, Tensor> = official.tensors.iter().map(|(k, v)| (format!("backbone.bottom_up.{k}"), v.clone())).collect();
    let path = tmp("wrapped-detectron2.safetensors");
    candle_core::safetensors::save(&wrapped, &path).unwrap();
    check(read_checkpoint(&path).unwrap().inferred_config().unwrap().unwrap());
    // Stages that do not chain are named.
    let mut broken = official.tensors.clone();
    broken.insert("patch_embed2.proj.weight".into(), Tensor::zeros((48, 16, 2, 2), DType::F32, &Device::Cpu).unwrap());
    let path = tmp("broken-stages.safetensors");
    candle_core::safetensors::save(&broken.into_iter().collect::<HashMap<_, _>>(), &path).unwrap();
    let e = read_checkpoint(&path).unwrap().inferred_config().unwrap().unwrap_err();
    assert!(e.contains("'patch_embed2.proj.weight'") && e.contains("does not follow"), "{e}");
    // The fine-tune fixture keeps its weights under `param.`: the same encoder.
    check(read_checkpoint(std::path::Path::new(&golden("finetune_small.safetensors"))).unwrap().inferred_config().unwrap().unwrap());
    // Not an encoder file: nothing to say.
    let path = tmp("not-an-encoder.safetensors");
    candle_core::safetensors::save(&HashMap::from([("head.weight".to_string(), Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap())]), &path).unwrap();
    assert!(read_checkpoint(&path).unwrap().inferred_config().is_none());
    // ConvMAE-B's model from the small file: the error gives the file's own config.
    let base = ConvMae::new(ConvMaeConfig::base(), DType::F32, &Device::Cpu, 0).unwrap();
    let mut trainer = Pretrainer::new(base, AdamWConfig::default(), 0).unwrap();
    let e = init_pretrainer_from(&mut trainer, std::path::Path::new(&golden("pretrain_small_official.pth"))).unwrap_err().to_string();
    assert!(e.contains(r#"--config '{"img_size":224,"patch_size":[4, 2, 2],"embed_dim":[32, 48, 64],"depth":[2, 1, 2],"mlp_ratio":[4.0, 4.0, 4.0]}'"#), "{e}");
}
