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
    let grads = out.loss.backward().unwrap();
    for (p, v) in model.params.trainable() {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {}", p.spec.name));
        assert_eq!(g.dtype(), DType::F32, "{}", p.spec.name);
    }
}
