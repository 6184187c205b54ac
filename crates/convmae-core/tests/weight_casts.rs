//! `CONVMAE_COMPUTE_COPIES=off` (the GPU check's A/B against the bf16 compute copies): a bf16
//! forward casts every weight and the gradients reach the f32 masters. A test binary of its own,
//! because the switch is read once per process.

use candle_core::{DType, Device, Tensor};
use convmae_core::model::Precision;
use convmae_core::ConvMae;

#[test]
fn with_compute_copies_off_the_gradients_reach_the_masters_through_casts() {
    std::env::set_var("CONVMAE_COMPUTE_COPIES", "off");
    assert!(convmae_core::device::compute_copies_off());
    let cfg = convmae_core::ConvMaeConfig::tiny();
    let mut model = ConvMae::new(cfg.clone(), DType::F32, &Device::Cpu, 3).unwrap();
    model.precision = Precision::Bf16;
    let (b, s) = (2, cfg.img_size);
    let px: Vec<f32> = (0..b * s * s * 3).map(|i| ((i * 7919) % 255) as f32 / 64.0 - 2.0).collect();
    let imgs = Tensor::from_vec(px, (b, s, s, 3), &Device::Cpu).unwrap();
    let noise: Vec<f64> = (0..b * cfg.num_tokens()).map(|i| ((i * 37) % 101) as f64 / 101.0).collect();
    let masking = convmae_core::masking::Masking::from_noise(&noise, b, cfg.num_tokens(), cfg.len_keep());
    let out = model.forward_pretrain(&imgs, &masking).unwrap();
    let grads = out.backward(&out.loss).unwrap();
    for (g, (p, master)) in model.params.gradients(&grads).unwrap().iter().zip(model.params.trainable()) {
        assert_eq!(g.dtype(), DType::F32, "{}", p.spec.name);
        assert!(grads.get(master.as_tensor()).is_some(), "{}", p.spec.name);
    }
    assert!(model.params.trainable_shadows().iter().all(Option::is_none), "no compute copies were made");
}
