//! Mixed precision: bf16 compute over f32 master weights.

use candle_core::{DType, Device, Tensor};
use convmae_core::ConvMae;

/// bf16 precision: the network in bf16, master weights and gradients in f32, loss close to the
/// f32 one (bf16 keeps 8 bits of mantissa, so "close" is a few percent).
#[test]
fn bf16_precision_trains_f32_master_weights_with_a_close_loss() {
    use convmae_core::model::Precision;
    let cfg = convmae_core::ConvMaeConfig::tiny();
    let mut model = ConvMae::new(cfg.clone(), DType::F32, &Device::Cpu, 3).unwrap();
    let b = 2;
    let s = cfg.img_size;
    let px: Vec<f32> = (0..b * s * s * 3).map(|i| ((i * 7919) % 255) as f32 / 64.0 - 2.0).collect();
    let imgs = Tensor::from_vec(px, (b, s, s, 3), &Device::Cpu).unwrap();
    let noise: Vec<f64> = (0..b * cfg.num_tokens()).map(|i| ((i * 37) % 101) as f64 / 101.0).collect();
    let masking = convmae_core::masking::Masking::from_noise(&noise, b, cfg.num_tokens(), cfg.len_keep());
    let full = model.forward_pretrain(&imgs, &masking).unwrap().loss.to_scalar::<f32>().unwrap();
    model.precision = Precision::Bf16;
    let out = model.forward_pretrain(&imgs, &masking).unwrap();
    assert_eq!(out.loss.dtype(), DType::F32);
    let half = out.loss.to_scalar::<f32>().unwrap();
    assert!(((half - full) / full).abs() < 0.05, "bf16 loss {half} vs f32 {full}");
    // The gradients arrive at the bf16 compute copies, none at the f32 masters: the forward has
    // no cast node per tensor.
    let grads = out.backward(&out.loss).unwrap();
    let by_tensor = model.params.gradients(&grads).unwrap();
    for ((p, master), g) in model.params.trainable().zip(&by_tensor) {
        assert_eq!(g.dtype(), DType::BF16, "{}", p.spec.name);
        assert!(grads.get(master.as_tensor()).is_none(), "{} got an f32 gradient", p.spec.name);
    }
    // On the CPU the copies are not packed by default (its bf16 sublayers are separate ops).
    use convmae_core::params::ComputeCopy;
    assert!(model.params.trainable_shadows().iter().all(|c| matches!(c, Some(ComputeCopy::Leaf(_)))));
}

fn pixels(b: usize, s: usize, step: usize) -> Vec<u8> {
    (0..b * s * s * 3).map(|i| ((i * 7919 + step * 131) % 251) as u8).collect()
}

/// Every compute copy equals its master rounded once to bf16, after optimizer steps (by the
/// update path of this device) and after `ParamStore::set`, with and without gradient
/// accumulation; and training in bf16 moves the f32 masters.
#[test]
fn compute_copies_follow_the_masters() {
    use convmae_core::model::Precision;
    use convmae_core::optim::AdamWConfig;
    use convmae_core::params::{Packing, SublayerKind};
    use convmae_core::train::{Batch, Pretrainer, StepOptions};
    let check = |t: &Pretrainer, when: &str| {
        // The pretraining model's view: its sublayers' copies packed (every transformer block's
        // two, a conv block's MLP).
        let copies = t.model.params.compute_view(DType::BF16, Packing::Sublayers).unwrap();
        for prefix in ["blocks3.0", "decoder_blocks.0"] {
            for kind in [SublayerKind::Attention, SublayerKind::Mlp] {
                assert!(copies.packed_sublayer(prefix, kind).is_some(), "{prefix} {kind:?} is not packed");
            }
        }
        assert!(copies.packed_sublayer("blocks1.0", SublayerKind::Mlp).is_some() && copies.packed_sublayer("blocks1.0", SublayerKind::Attention).is_none());
        assert_eq!(t.model.params.stale_copy().unwrap(), None, "{when}");
        for (p, c) in t.model.params.iter().zip(copies.iter()) {
            let want = p.tensor.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = c.tensor.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "{} {when}", p.spec.name);
        }
    };
    for accum_steps in [1, 2] {
        let cfg = convmae_core::ConvMaeConfig::tiny();
        let mut model = ConvMae::new(cfg.clone(), DType::F32, &Device::Cpu, 5).unwrap();
        model.precision = Precision::Bf16;
        // Packed as on CUDA (the CPU does not pack by default: its bf16 sublayers run as
        // separate ops), so that the packed copies' training path runs here.
        model.sublayer_packing = Some(Packing::Sublayers);
        let mut t = Pretrainer::new(model, AdamWConfig::default(), 5).unwrap();
        let before = t.model.params.get("decoder_embed.weight").flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let s = cfg.img_size;
        for step in 0..2 * accum_steps {
            let px = pixels(2, s, step);
            let batch = Batch { pixels: &px, batch: 2, height: s, width: s, channels: 3 };
            t.step(&batch, &StepOptions { lr: 1e-2, accum_steps, noise: None }).unwrap();
            check(&t, &format!("after micro step {step} (accum_steps {accum_steps})"));
        }
        assert_eq!(t.optimizer.step, 2);
        let after = t.model.params.get("decoder_embed.weight").flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(before.iter().zip(&after).any(|(a, b)| a != b), "bf16 training left the masters as they were");
        let w = t.model.params.get("blocks3.0.attn.qkv.weight").affine(0.5, 0.25).unwrap();
        t.model.params.set("blocks3.0.attn.qkv.weight", &w).unwrap();
        check(&t, "after set");
        // A master changed behind the store's back leaves its copy stale, which stale_copy names
        // (a packed tensor and one of its own).
        for name in ["blocks3.0.attn.proj.bias", "decoder_embed.weight"] {
            let (p, master) = t.model.params.trainable().find(|(p, _)| p.spec.name == name).unwrap();
            let moved = (master.as_tensor() + 1.0).unwrap();
            master.set(&moved).unwrap();
            assert_eq!(t.model.params.stale_copy().unwrap().as_deref(), Some(p.spec.name.as_str()));
            t.model.params.set(name, &moved).unwrap();
            assert_eq!(t.model.params.stale_copy().unwrap(), None);
        }
    }
}

/// A compute view's packed sublayer, run as one op, leaves its packs' gradients in the view's
/// sinks, not with candle (no zero-fill and add per pack); `PackGradients::deliver` puts them in
/// the gradient store, where the packed tensors' compute copies read them: the same values as
/// when the op returns them to candle. (The model's packs are bf16 copies on CUDA; here an f64
/// store's f32 view, so that the CPU's one op runs.)
#[test]
fn packed_sublayer_gradients_arrive_through_the_views_sinks() {
    use convmae_core::params::{pretrain_param_specs, ComputeCopy, Packing, ParamStore, SublayerKind};
    let cfg = convmae_core::ConvMaeConfig::tiny();
    let store = ParamStore::init(pretrain_param_specs(&cfg), DType::F64, &Device::Cpu, 7).unwrap();
    let view = store.compute_view(DType::F32, Packing::Sublayers).unwrap();
    let prefix = "decoder_blocks.0";
    let pack = view.packed_sublayer(prefix, SublayerKind::Mlp).unwrap();
    assert!(pack.sink.is_some(), "a compute view hands its packs out with a sink");
    let d = cfg.decoder_embed_dim;
    let hidden = view.get(&format!("{prefix}.mlp.fc1.weight")).dim(0).unwrap();
    // 2d rows or more: the one op runs (convmae_kernels sublayer.rs `one_op`).
    let x = Tensor::randn(0f32, 1.0, (2, 2 * d, d), &Device::Cpu).unwrap();
    let loss = |sink| {
        let pack = convmae_kernels::PackedSublayer { sink, ..pack };
        let y = convmae_kernels::mlp_residual_packed(&x, pack, 1e-6, hidden).unwrap();
        (y.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap()
    };
    let plain = loss(None).backward().unwrap();
    let mut grads = loss(pack.sink).backward().unwrap();
    assert!(grads.get(pack.weights).is_none() && grads.get(pack.vectors).is_none(), "candle accumulated a pack's gradient");
    view.pack_gradients().deliver(&mut grads).unwrap();
    let flat = |g: Option<&Tensor>| g.expect("a gradient").flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for name in ["mlp.fc1.weight", "mlp.fc2.bias", "norm2.weight"] {
        let name = format!("{prefix}.{name}");
        let i = store.trainable().position(|(p, _)| p.spec.name == name).unwrap();
        let Some(ComputeCopy::Packed { pack, offset, shape }) = &store.trainable_shadows()[i] else { panic!("{name} is not packed") };
        let slice = |g: &candle_core::backprop::GradStore| g.get(pack.as_tensor()).map(|t| t.narrow(0, *offset, shape.iter().product()).unwrap());
        assert_eq!(flat(slice(&grads).as_ref()), flat(slice(&plain).as_ref()), "{name}");
    }
}

/// FastConvMAE's complementary masking in bf16 on packed sublayer copies (each sublayer one op,
/// as a CUDA bf16 step runs it): the loss within a few percent of f32's, a finite gradient for
/// every trainable tensor. (tests/tape.rs: the tape covers its graph.)
#[test]
fn complementary_masking_in_bf16_on_the_packed_path() {
    use convmae_core::masking::Masking;
    use convmae_core::model::Precision;
    use convmae_core::params::Packing;
    let cfg = convmae_core::ConvMaeConfig { complementary_masking: true, ..convmae_core::ConvMaeConfig::tiny() };
    let (b, s, l) = (2, cfg.img_size, cfg.num_tokens());
    let px: Vec<f32> = (0..b * s * s * 3).map(|i| ((i * 7919) % 255) as f32 / 64.0 - 2.0).collect();
    let imgs = Tensor::from_vec(px, (b, s, s, 3), &Device::Cpu).unwrap();
    let noise: Vec<f64> = (0..b * l).map(|i| ((i * 37) % 101) as f64 / 101.0).collect();
    let views = Masking::complementary_from_noise(&noise, b, l, cfg.len_keep()).unwrap();
    let mut model = ConvMae::new(cfg.clone(), DType::F32, &Device::Cpu, 3).unwrap();
    let full = model.forward_pretrain(&imgs, &views).unwrap().loss.to_scalar::<f32>().unwrap();
    model.precision = Precision::Bf16;
    model.sublayer_packing = Some(Packing::Sublayers);
    let out = model.forward_pretrain(&imgs, &views).unwrap();
    let half = out.loss.to_scalar::<f32>().unwrap();
    assert!(((half - full) / full).abs() < 0.05, "bf16 loss {half} vs f32 {full}");
    assert_eq!(out.pred.dims3().unwrap().0, 4 * b);
    let grads = out.backward(&out.loss).unwrap();
    for ((p, _), g) in model.params.trainable().zip(model.params.gradients(&grads).unwrap()) {
        let sum = g.to_dtype(DType::F32).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(sum.is_finite() && sum > 0.0, "{}: {sum}", p.spec.name);
    }
}
