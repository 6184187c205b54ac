//! Fine-tuning and linear probing: the official layer-decay mapping, LARS, the probe's BatchNorm,
//! stochastic depth, loading pretrained checkpoints into a classifier, and exact resume.

use candle_core::{DType, Device, Tensor};
use convmae_core::augment::{AugmentSpec, EraseBox, MixSpec};
use convmae_core::checkpoint::{init_classifier_from, load_classifier, save_classifier};
use convmae_core::classify::{ClassifierTrainer, OptimizerConfig, Targets, TrainStepOptions};
use convmae_core::model::classifier::{drop_path_rates, ClassifierHead, ConvViT, HeadKind, Mode, Pooling};
use convmae_core::model::layers::{layer_norm_p, VIT_LN_EPS};
use convmae_core::optim::{finetune_group, layer_id, Lars, LarsConfig};
use convmae_core::params::{classifier_param_specs, ParamSpec, ParamStore, Init};
use convmae_core::rng::Rng;
use convmae_core::train::Batch;
use convmae_core::ConvMaeConfig;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn golden(name: &str) -> String {
    let dir = std::env::var("CONVMAE_GOLDEN").unwrap_or_else(|_| format!("{}/../../../shared/golden", env!("CARGO_MANIFEST_DIR")));
    format!("{dir}/{name}")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("convmae-classifier-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

fn head(kind: HeadKind, pool: Pooling, drop_path: f64) -> ClassifierHead {
    ClassifierHead { num_classes: 5, pool, kind, drop_path }
}

fn trainer(kind: HeadKind, pool: Pooling, drop_path: f64, seed: u64) -> ClassifierTrainer {
    let model = ConvViT::new(ConvMaeConfig::tiny(), head(kind, pool, drop_path), DType::F32, &Device::Cpu, seed).unwrap();
    ClassifierTrainer::new(model, OptimizerConfig::default_for(kind), seed).unwrap()
}

fn pixels(step: u64, b: usize, s: usize) -> Vec<u8> {
    (0..b * s * s * 3).map(|i| ((i as u64 * 2654435761 + step * 97) % 251) as u8).collect()
}

fn train(t: &mut ClassifierTrainer, from: u64, to: u64, augment: impl Fn(u64) -> AugmentSpec) {
    let s = t.model.cfg.img_size;
    for step in from..to {
        let px = pixels(step, 4, s);
        let batch = Batch { pixels: &px, batch: 4, height: s, width: s, channels: 3 };
        let labels = (0..4).map(|i| ((step as usize + i) * 3) % 5).collect();
        let opts = TrainStepOptions { lr: 1e-3 * (1 + step) as f64, targets: Targets::Labels(labels), augment: augment(step), accum_steps: 1 };
        t.train_step(&batch, &opts).unwrap();
    }
}

/// The layer-decay table of spec section 4.2, written from the table rather than from code: the
/// embedding layer holds pos_embed, every patch embed and the conv stages; blocks3.i is i + 1;
/// the rest (fc_norm, head) is 12 for ConvMAE-B.
#[test]
fn layer_decay_groups_equal_the_official_mapping_for_convmae_b() {
    let cfg = ConvMaeConfig::base();
    let specs = classifier_param_specs(&cfg, &ClassifierHead::finetune(1000));
    assert_eq!(specs.len(), 207);
    let store = ParamStore::build(specs.clone(), DType::F32, &Device::Cpu, |s| Tensor::zeros(s.shape.as_slice(), DType::F32, &Device::Cpu)).unwrap();
    let mut per_layer = [0usize; 13];
    for (p, _) in store.trainable() {
        let name = p.spec.name.as_str();
        let first = name.split('.').next().unwrap();
        let expected_id = match first {
            "pos_embed" | "patch_embed1" | "patch_embed2" | "patch_embed3" | "patch_embed4" | "blocks1" | "blocks2" => 0,
            "blocks3" => 1 + name.split('.').nth(1).unwrap().parse::<usize>().unwrap(),
            "fc_norm" | "head" => 12,
            other => panic!("unexpected tensor group {other}"),
        };
        assert_eq!(layer_id(name, 12), expected_id, "{name}");
        per_layer[expected_id] += 1;
        let g = finetune_group(p, cfg.depth[2], 0.05, 0.65);
        let scale = 0.65f64.powi(12 - expected_id as i32);
        assert!((g.lr_scale - scale).abs() < 1e-15, "{name}: {} vs {scale}", g.lr_scale);
        let no_decay = p.spec.shape.len() == 1 || name == "pos_embed";
        assert_eq!(g.weight_decay, if no_decay { 0.0 } else { 0.05 }, "{name}");
    }
    // 0.65^12 = 0.0057 for the embedding layer, 1 for the head (the spec's table).
    assert!((0.65f64.powi(12) - 0.005688).abs() < 1e-6);
    // Layer 0: pos_embed + 4 patch embeds (4 + 4 + 4 + 2 tensors) + 2 + 2 conv blocks of 14 tensors.
    assert_eq!(per_layer[0], 1 + 14 + 4 * 14);
    assert!(per_layer[1..12].iter().all(|&n| n == 12), "{per_layer:?}");
    assert_eq!(per_layer[12], 4);
}

#[test]
fn lars_matches_a_hand_computed_step() {
    let specs = vec![
        ParamSpec { name: "head.1.weight".into(), shape: vec![1, 2], trainable: true, init: Init::Zeros },
        ParamSpec { name: "head.1.bias".into(), shape: vec![1], trainable: true, init: Init::Zeros },
    ];
    let values = [vec![3.0, 4.0], vec![0.5]];
    let mut i = 0;
    let store = ParamStore::build(specs, DType::F64, &Device::Cpu, |s| {
        i += 1;
        Tensor::from_vec(values[i - 1].clone(), s.shape.as_slice(), &Device::Cpu)
    })
    .unwrap();
    let mut lars = Lars::new(LarsConfig { momentum: 0.9, trust_coefficient: 0.001, weight_decay: 0.1 }, &store).unwrap();
    let grads = [Tensor::new(&[[0.3f64, -0.1]], &Device::Cpu).unwrap(), Tensor::new(&[2.0f64], &Device::Cpu).unwrap()];
    lars.update(&store, &grads, 0.5).unwrap();
    // weight: dp = g + 0.1 w = (0.6, 0.3); |w| = 5, |dp| = sqrt(0.45); q = 0.001 * 5 / sqrt(0.45);
    // mu = dp * q; w -= 0.5 * mu.
    let q = 0.001 * 5.0 / 0.45f64.sqrt();
    let w1 = [3.0 - 0.5 * 0.6 * q, 4.0 - 0.5 * 0.3 * q];
    // bias (1-D): no decay, no adaptation: mu = 2, b = 0.5 - 0.5 * 2.
    let got_w = to_vec(store.get("head.1.weight"));
    assert!((got_w[0] - w1[0]).abs() < 1e-15 && (got_w[1] - w1[1]).abs() < 1e-15, "{got_w:?} vs {w1:?}");
    assert_eq!(to_vec(store.get("head.1.bias")), vec![-0.5]);
    // Second step with the same gradient: mu = 0.9 mu + dp'.
    lars.update(&store, &grads, 0.5).unwrap();
    assert_eq!(to_vec(store.get("head.1.bias")), vec![-0.5 - 0.5 * (0.9 * 2.0 + 2.0)]);
    let dp2 = [0.3 + 0.1 * w1[0], -0.1 + 0.1 * w1[1]];
    let q2 = 0.001 * (w1[0] * w1[0] + w1[1] * w1[1]).sqrt() / (dp2[0] * dp2[0] + dp2[1] * dp2[1]).sqrt();
    let mu2 = [0.9 * 0.6 * q + dp2[0] * q2, 0.9 * 0.3 * q + dp2[1] * q2];
    let got_w = to_vec(store.get("head.1.weight"));
    assert!((got_w[0] - (w1[0] - 0.5 * mu2[0])).abs() < 1e-15 && (got_w[1] - (w1[1] - 0.5 * mu2[1])).abs() < 1e-15);
}

#[test]
fn drop_path_rates_rise_linearly_over_all_fifteen_blocks() {
    let r = drop_path_rates(&ConvMaeConfig::base(), 0.1);
    assert_eq!(r.len(), 15);
    assert_eq!(r[0], 0.0);
    assert!((r[14] - 0.1).abs() < 1e-15);
    assert!((r[7] - 0.05).abs() < 1e-15);
}

#[test]
fn pretrained_pth_files_load_into_the_classifier_like_the_official_finetune() {
    let cfg = ConvMaeConfig::golden_small();
    for (file, extra_unexpected) in [("pretrain_small_official.pth", true), ("pretrain_small_encoder_only.pth", false)] {
        let model = ConvViT::new(cfg.clone(), ClassifierHead::finetune(10), DType::F64, &Device::Cpu, 3).unwrap();
        let mut t = ClassifierTrainer::new(model, OptimizerConfig::default_for(HeadKind::Finetune), 3).unwrap();
        let head_before = to_vec(t.model.params.get("head.weight"));
        let report = init_classifier_from(&mut t, Path::new(&golden(file))).unwrap();
        let missing: BTreeSet<&str> = report.missing.iter().map(String::as_str).collect();
        assert_eq!(missing, BTreeSet::from(["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]), "{file}");
        assert!(report.reinitialized.is_empty());
        for name in &report.unexpected {
            let pretrain_only = name.starts_with("decoder") || name.starts_with("stage") || name == "mask_token" || name.starts_with("norm.");
            assert!(pretrain_only, "{file}: unexpected {name}");
        }
        let unexpected: BTreeSet<&str> = report.unexpected.iter().map(String::as_str).collect();
        assert!(unexpected.contains("norm.weight") && unexpected.contains("norm.bias"));
        assert_eq!(unexpected.contains("decoder_pred.weight"), extra_unexpected, "{file}");
        assert_eq!(unexpected.contains("stage1_output_decode.weight"), extra_unexpected, "{file}");
        // The encoder holds the file's values; the head is untouched.
        let fx = convmae_core::fixture::Fixture::read(&golden("pretrain_small.safetensors")).unwrap();
        for name in ["pos_embed", "patch_embed1.proj.weight", "blocks1.0.attn.weight", "blocks3.1.mlp.fc2.bias"] {
            let want = to_vec(fx.tensor(&format!("param.{name}")).unwrap());
            let got = to_vec(t.model.params.get(name));
            assert!(want.iter().zip(&got).all(|(a, b)| (a - b).abs() < 1e-6), "{file}: {name}");
        }
        assert_eq!(to_vec(t.model.params.get("head.weight")), head_before);
        assert_eq!(report.loaded.len(), t.model.params.iter().count() - 4);
    }
}

#[test]
fn token_pooling_takes_the_normed_top_left_token() {
    let model = ConvViT::new(ConvMaeConfig::tiny(), head(HeadKind::Finetune, Pooling::Token, 0.0), DType::F64, &Device::Cpu, 5).unwrap();
    let s = model.cfg.img_size;
    let px: Vec<f64> = pixels(0, 2, s).iter().map(|&p| p as f64 / 255.0).collect();
    let imgs = Tensor::from_vec(px, (2, s, s, 3), &Device::Cpu).unwrap();
    let features = model.forward_features(&imgs, &mut Mode::Eval).unwrap();
    let tokens = model.forward_stages(&imgs, None).unwrap().stage3;
    let all_normed = layer_norm_p(&model.params, "norm", &tokens, VIT_LN_EPS).unwrap();
    let want = to_vec(&all_normed.narrow(1, 0, 1).unwrap());
    let got = to_vec(&features);
    assert!(want.iter().zip(&got).all(|(a, b)| (a - b).abs() < 1e-12));
}

#[test]
fn stochastic_depth_is_seeded_and_only_active_in_training() {
    let model = ConvViT::new(ConvMaeConfig::tiny(), head(HeadKind::Finetune, Pooling::Global, 0.5), DType::F64, &Device::Cpu, 5).unwrap();
    let s = model.cfg.img_size;
    let px: Vec<f64> = pixels(0, 4, s).iter().map(|&p| p as f64 / 255.0).collect();
    let imgs = Tensor::from_vec(px, (4, s, s, 3), &Device::Cpu).unwrap();
    let train = |seed: u64| to_vec(&model.forward_features(&imgs, &mut Mode::Train(&mut Rng::new(seed))).unwrap());
    let eval = to_vec(&model.forward_features(&imgs, &mut Mode::Eval).unwrap());
    assert_eq!(train(1), train(1));
    assert_ne!(train(1), train(2));
    assert_ne!(train(1), eval);
    let mut no_drop = ConvViT::new(ConvMaeConfig::tiny(), head(HeadKind::Finetune, Pooling::Global, 0.0), DType::F64, &Device::Cpu, 5).unwrap();
    no_drop.params = model.params;
    assert_eq!(to_vec(&no_drop.forward_features(&imgs, &mut Mode::Train(&mut Rng::new(1))).unwrap()), eval);
}

#[test]
fn linear_probe_trains_only_the_head_and_tracks_batch_statistics() {
    let mut t = trainer(HeadKind::LinearProbe, Pooling::Global, 0.0, 11);
    let frozen_before: Vec<(String, Vec<f64>)> =
        t.model.params.iter().filter(|p| !p.spec.name.starts_with("head.")).map(|p| (p.spec.name.clone(), to_vec(&p.tensor))).collect();
    let w_before = to_vec(t.model.params.get("head.1.weight"));
    // The batch statistics the first step will fold in, computed by hand from the features.
    let s = t.model.cfg.img_size;
    let px = pixels(0, 4, s);
    let imgs = convmae_core::train::normalize(&Batch { pixels: &px, batch: 4, height: s, width: s, channels: 3 }, DType::F32, &Device::Cpu).unwrap();
    let f = t.model.forward_features(&imgs, &mut Mode::Eval).unwrap().to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    let d = f[0].len();
    let mean: Vec<f64> = (0..d).map(|j| f.iter().map(|r| r[j]).sum::<f64>() / 4.0).collect();
    let var: Vec<f64> = (0..d).map(|j| f.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / 3.0).collect();

    train(&mut t, 0, 1, |_| AugmentSpec::default());
    let rm = to_vec(t.model.params.get("head.0.running_mean"));
    let rv = to_vec(t.model.params.get("head.0.running_var"));
    for j in 0..d {
        assert!((rm[j] - 0.1 * mean[j]).abs() < 1e-5, "running_mean[{j}]");
        assert!((rv[j] - (0.9 + 0.1 * var[j])).abs() < 1e-4, "running_var[{j}]");
    }
    assert_eq!(t.bn_batches, 1);
    assert_ne!(to_vec(t.model.params.get("head.1.weight")), w_before);
    for (name, before) in frozen_before {
        assert_eq!(to_vec(t.model.params.get(&name)), before, "{name} moved");
    }
}

#[test]
fn classifier_resume_is_bitwise_identical_for_both_recipes() {
    let augment = |step: u64| AugmentSpec {
        erase: vec![EraseBox { sample: (step % 4) as usize, top: 3, left: 5, height: 9, width: 7 }],
        mix: Some(MixSpec { lam: 0.3 + 0.1 * step as f64, cut: if step.is_multiple_of(2) { None } else { Some([2, 20, 4, 30]) } }),
    };
    for (kind, drop) in [(HeadKind::Finetune, 0.2), (HeadKind::LinearProbe, 0.0)] {
        let mut straight = trainer(kind, Pooling::Global, drop, 7);
        train(&mut straight, 0, 4, augment);
        let mut first = trainer(kind, Pooling::Global, drop, 7);
        train(&mut first, 0, 2, augment);
        let path = tmp(&format!("resume-{kind:?}.safetensors"));
        save_classifier(&first, &path, "{\"epoch\":1}").unwrap();
        let mut resumed = trainer(kind, Pooling::Global, drop, 99);
        let (report, extra) = load_classifier(&mut resumed, &path, true).unwrap();
        assert!(report.optimizer_restored && report.unexpected.is_empty(), "{report:?}");
        assert_eq!(extra, "{\"epoch\":1}");
        train(&mut resumed, 2, 4, augment);
        assert_eq!(resumed.step_count(), 4);
        assert_eq!(resumed.bn_batches, straight.bn_batches);
        for (a, b) in straight.model.params.iter().zip(resumed.model.params.iter()) {
            let (x, y) = (a.tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{kind:?}: {} differs after resume", a.spec.name);
        }
    }
}

#[test]
fn resuming_with_another_head_is_refused_with_both_heads_named() {
    let t = trainer(HeadKind::Finetune, Pooling::Global, 0.0, 1);
    let path = tmp("other-head.safetensors");
    save_classifier(&t, &path, "{}").unwrap();
    let mut probe = trainer(HeadKind::LinearProbe, Pooling::Global, 0.0, 1);
    let e = load_classifier(&mut probe, &path, true).unwrap_err().to_string();
    assert!(e.contains("different classifier head") && e.contains("linear-probe"), "{e}");
}

#[test]
fn finetuning_lowers_the_loss_on_a_fixed_batch() {
    let mut t = trainer(HeadKind::Finetune, Pooling::Global, 0.0, 2);
    let s = t.model.cfg.img_size;
    let px = pixels(0, 4, s);
    let batch = Batch { pixels: &px, batch: 4, height: s, width: s, channels: 3 };
    let opts = TrainStepOptions { lr: 1e-3, targets: Targets::Labels(vec![0, 1, 2, 3]), augment: AugmentSpec::default(), accum_steps: 1 };
    let first = t.train_step(&batch, &opts).unwrap().loss;
    let mut last = first;
    for _ in 0..15 {
        last = t.train_step(&batch, &opts).unwrap().loss;
    }
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    let eval = t.evaluate(&batch, Some(&[0, 1, 2, 3])).unwrap();
    assert_eq!(eval.count, 4);
    assert_eq!(eval.logits.len(), 4 * 5);
    assert!(eval.top1 >= 3 && eval.top5 == 4, "{eval:?}");
}

/// A fine-tuned checkpoint in the official layout (bare state_dict names, no metadata of ours),
/// made from the golden fine-tune fixture's weights, loads strictly and reproduces its logits.
#[test]
fn an_official_layout_finetuned_checkpoint_loads_strictly_and_reproduces_the_fixture() {
    let fx = convmae_core::fixture::Fixture::read(&golden("finetune_small.safetensors")).unwrap();
    let tensors: Vec<(String, Tensor)> =
        fx.tensors.iter().filter_map(|(k, v)| k.strip_prefix("param.").map(|n| (n.to_string(), v.clone()))).collect();
    assert_eq!(tensors.len(), classifier_param_specs(&ConvMaeConfig::golden_small(), &ClassifierHead::finetune(10)).len());
    let path = tmp("official-finetuned.safetensors");
    let bytes = safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None).unwrap();
    std::fs::write(&path, bytes).unwrap();

    let model = ConvViT::new(ConvMaeConfig::golden_small(), ClassifierHead::finetune(10), DType::F64, &Device::Cpu, 0).unwrap();
    let mut t = ClassifierTrainer::new(model, OptimizerConfig::default_for(HeadKind::Finetune), 0).unwrap();
    let (report, _) = load_classifier(&mut t, &path, true).unwrap();
    assert!(report.missing.is_empty() && report.unexpected.is_empty() && !report.optimizer_restored, "{report:?}");
    let imgs = fx.tensor("input.imgs").unwrap().permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
    let logits = t.model.forward(&imgs).unwrap().logits;
    let want = to_vec(fx.tensor("output.logits").unwrap());
    let got = to_vec(&logits);
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(want.iter().zip(&got).all(|(a, b)| (a - b).abs() <= 1e-9 * scale));
}

/// Two micro-batches of 2 with accum_steps 2 make the same update as one batch of 4 (the loss is
/// divided by accum_steps, so the summed gradient is the full batch's mean), and a checkpoint
/// inside the window is refused.
#[test]
fn gradient_accumulation_equals_the_full_batch_update() {
    let make = || {
        let model = ConvViT::new(ConvMaeConfig::tiny(), head(HeadKind::Finetune, Pooling::Global, 0.0), DType::F64, &Device::Cpu, 4).unwrap();
        ClassifierTrainer::new(model, OptimizerConfig::default_for(HeadKind::Finetune), 4).unwrap()
    };
    let s = ConvMaeConfig::tiny().img_size;
    let px = pixels(3, 4, s);
    let labels = vec![0, 3, 1, 4];
    let opts = |targets: Vec<usize>, accum_steps| TrainStepOptions { lr: 1e-3, targets: Targets::Labels(targets), augment: AugmentSpec::default(), accum_steps };

    let mut full = make();
    let r = full.train_step(&Batch { pixels: &px, batch: 4, height: s, width: s, channels: 3 }, &opts(labels.clone(), 1)).unwrap();
    assert!(r.updated && r.step == 1);

    let mut accum = make();
    let half = px.len() / 2;
    let first = accum.train_step(&Batch { pixels: &px[..half], batch: 2, height: s, width: s, channels: 3 }, &opts(labels[..2].to_vec(), 2)).unwrap();
    assert!(!first.updated && first.step == 0, "{first:?}");
    assert!(accum.has_pending_gradients());
    let e = save_classifier(&accum, &tmp("mid-window.safetensors"), "{}").unwrap_err().to_string();
    assert!(e.contains("middle of a gradient accumulation window"), "{e}");
    let second = accum.train_step(&Batch { pixels: &px[half..], batch: 2, height: s, width: s, channels: 3 }, &opts(labels[2..].to_vec(), 2)).unwrap();
    assert!(second.updated && second.step == 1, "{second:?}");
    assert!(((first.loss + second.loss) / 2.0 - r.loss).abs() < 1e-12 * r.loss.abs());

    let mut worst: f64 = 0.0;
    for (a, b) in full.model.params.iter().zip(accum.model.params.iter()) {
        for (x, y) in to_vec(&a.tensor).iter().zip(to_vec(&b.tensor)) {
            worst = worst.max((x - y).abs() / x.abs().max(1e-3));
        }
    }
    assert!(worst < 1e-9, "accumulated update differs from the full batch by {worst:e} (relative)");
    let e = accum.train_step(&Batch { pixels: &px, batch: 4, height: s, width: s, channels: 3 }, &opts(labels, 0)).unwrap_err().to_string();
    assert!(e.contains("accum_steps"), "{e}");
}

/// bf16 precision: the encoder runs in bf16, gradients and the AdamW update land on f32 master
/// weights, and the loss and logits stay close to the f32 model's.
#[test]
fn bf16_classifier_trains_f32_master_weights_with_close_logits() {
    use convmae_core::model::Precision;
    let mut fp32 = trainer(HeadKind::Finetune, Pooling::Global, 0.1, 5);
    let mut bf16 = trainer(HeadKind::Finetune, Pooling::Global, 0.1, 5);
    bf16.model.precision = Precision::Bf16;
    let s = fp32.model.cfg.img_size;
    let px = pixels(1, 4, s);
    let batch = Batch { pixels: &px, batch: 4, height: s, width: s, channels: 3 };
    let eval_32 = fp32.evaluate(&batch, Some(&[0, 1, 2, 3])).unwrap();
    let eval_16 = bf16.evaluate(&batch, Some(&[0, 1, 2, 3])).unwrap();
    assert_ne!(eval_32.logits, eval_16.logits, "bf16 logits equal the f32 ones: the precision was not applied");
    let scale = eval_32.logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in eval_32.logits.iter().zip(&eval_16.logits) {
        assert!((a - b).abs() < 0.05 * scale.max(1.0), "logit {a} (f32) vs {b} (bf16)");
    }
    let opts = TrainStepOptions { lr: 1e-3, targets: Targets::Labels(vec![0, 1, 2, 3]), augment: AugmentSpec::default(), accum_steps: 1 };
    let l32 = fp32.train_step(&batch, &opts).unwrap().loss;
    let l16 = bf16.train_step(&batch, &opts).unwrap().loss;
    assert!((l32 - l16).abs() < 0.05 * l32, "loss {l32} (f32) vs {l16} (bf16)");
    for p in bf16.model.params.iter() {
        assert_eq!(p.tensor.dtype(), DType::F32, "{} is not an f32 master weight", p.spec.name);
    }
    // The update reached the encoder and the head.
    let before = trainer(HeadKind::Finetune, Pooling::Global, 0.1, 5);
    for name in ["blocks3.0.attn.qkv.weight", "patch_embed1.proj.weight", "head.weight"] {
        let (a, b) = (to_vec(before.model.params.get(name)), to_vec(bf16.model.params.get(name)));
        assert!(a.iter().zip(&b).any(|(x, y)| x != y), "{name} did not change");
    }
    // The encoder's compute copies (where its gradients arrive) follow the masters; the head's
    // gradients reach the masters (it computes in f32).
    let copies = bf16.model.params.compute_view(DType::BF16, convmae_core::params::Packing::None).unwrap();
    for (p, c) in bf16.model.params.iter().zip(copies.iter()) {
        let want = to_vec(&p.tensor.to_dtype(DType::BF16).unwrap());
        assert_eq!(want, to_vec(&c.tensor), "{}'s compute copy", p.spec.name);
    }
}

/// `features` gives the head's input as the model computes it (the golden fine-tune fixture's
/// `output.features` is that vector), and each scale's map in [B, C, H, W] order: the maps are the
/// encoder's channels-last stage outputs transposed, and pooling the stage-3 map's tokens gives
/// the pooled vector back.
#[test]
fn features_are_the_heads_input_and_the_encoders_maps_in_nchw() {
    // The golden fixture's images through the stages and the pooling `features` uses.
    let fx = convmae_core::fixture::Fixture::read(&golden("finetune_small.safetensors")).unwrap();
    let params = ParamStore::build(classifier_param_specs(&ConvMaeConfig::golden_small(), &ClassifierHead::finetune(10)), DType::F64, &Device::Cpu, |spec| {
        Ok(fx.tensor(&format!("param.{}", spec.name))?.clone())
    })
    .unwrap();
    let golden_model = ConvViT { cfg: ConvMaeConfig::golden_small(), head: ClassifierHead::finetune(10), params, precision: Default::default() };
    let imgs = fx.tensor("input.imgs").unwrap().permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
    let pooled = golden_model.pool(&golden_model.forward_stages(&imgs, None).unwrap().stage3).unwrap();
    let (want, got) = (to_vec(fx.tensor("output.features").unwrap()), to_vec(&pooled));
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(want.iter().zip(&got).all(|(a, b)| (a - b).abs() <= 1e-9 * scale));

    // The trainer's `features` on uint8 images: layout and agreement with the model's forward.
    let model = ConvViT::new(ConvMaeConfig::tiny(), head(HeadKind::Finetune, Pooling::Global, 0.0), DType::F64, &Device::Cpu, 8).unwrap();
    let t = ClassifierTrainer::new(model, OptimizerConfig::default_for(HeadKind::Finetune), 8).unwrap();
    let (cfg, b) = (t.model.cfg.clone(), 3);
    let s = cfg.img_size;
    let px = pixels(5, b, s);
    let batch = Batch { pixels: &px, batch: b, height: s, width: s, channels: 3 };
    let f = t.features(&batch, true).unwrap();
    let imgs = convmae_core::train::normalize(&batch, DType::F64, &Device::Cpu).unwrap();
    let as_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    assert_eq!(f.dim, cfg.embed_dim[2]);
    assert_eq!(f.pooled, as_f32(to_vec(&t.model.forward(&imgs).unwrap().features)));
    let names: Vec<_> = f.maps.iter().map(|m| m.name).collect();
    assert_eq!(names, ["stage1", "stage2", "stage3"]);
    let strides = [4, 8, 16];
    for (i, m) in f.maps.iter().enumerate() {
        assert_eq!(m.shape, [b, cfg.embed_dim[i], s / strides[i], s / strides[i]], "{}", m.name);
        assert_eq!(m.data.len(), m.shape.iter().product::<usize>());
    }
    let stages = t.model.forward_stages(&imgs, None).unwrap();
    let nchw = |t: &Tensor| as_f32(to_vec(&t.permute((0, 3, 1, 2)).unwrap()));
    assert_eq!(f.maps[0].data, nchw(&stages.stage1));
    assert_eq!(f.maps[1].data, nchw(&stages.stage2));
    // The stage-3 map back to tokens [B, L, D3] (token l at row l / grid, column l % grid).
    let m3 = &f.maps[2];
    let map = Tensor::from_vec(m3.data.clone(), m3.shape.to_vec(), &Device::Cpu).unwrap();
    let tokens = map.flatten_from(2).unwrap().transpose(1, 2).unwrap().to_dtype(DType::F64).unwrap();
    assert_eq!(as_f32(to_vec(&tokens)), as_f32(to_vec(&stages.stage3)));
    let repooled = as_f32(to_vec(&t.model.pool(&tokens).unwrap()));
    assert!(repooled.iter().zip(&f.pooled).all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0)));

    let without = t.features(&batch, false).unwrap();
    assert!(without.maps.is_empty());
    assert_eq!(without.pooled, f.pooled);
    let small = pixels(5, 1, s / 2);
    let e = t.features(&Batch { pixels: &small, batch: 1, height: s / 2, width: s / 2, channels: 3 }, false).unwrap_err().to_string();
    assert!(e.contains("features: images are"), "{e}");
}
