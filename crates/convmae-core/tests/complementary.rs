//! FastConvMAE's complementary masking (spec section 8.1): the views of an image computed as
//! FastConvMAE computes them (stages 1-2 once on the dense maps, each depthwise conv once per
//! view) and as our sparse path does (each view's visible token blocks) give the same loss and
//! gradients; and the loss is the mean of the plain ConvMAE losses of the views taken one by one,
//! its gradients the mean of theirs.

use candle_core::{DType, Device, Tensor};
use convmae_core::masking::Masking;
use convmae_core::model::{ConvMae, ConvPath};
use convmae_core::rng::Rng;
use convmae_core::ConvMaeConfig;
use crate::common::tensors::rel;
use crate::sparse::assert_paths_agree;

fn random_config(rng: &mut Rng) -> ConvMaeConfig {
    let pick = |rng: &mut Rng, xs: &[usize]| xs[(rng.uniform() * xs.len() as f64) as usize];
    let heads = pick(rng, &[1, 2]);
    ConvMaeConfig {
        img_size: 16 * pick(rng, &[2, 4]),
        embed_dim: [pick(rng, &[4, 8]), pick(rng, &[8, 12]), 8 * heads],
        depth: [pick(rng, &[1, 2]), pick(rng, &[1, 2]), 1],
        num_heads: heads,
        mlp_ratio: [2.0, 3.0, 4.0],
        decoder_embed_dim: 8,
        decoder_depth: 1,
        decoder_num_heads: 2,
        norm_pix_loss: rng.uniform() < 0.7,
        // 4 views (FastConvMAE's) or 2.
        mask_ratio: [0.5, 0.75][(rng.uniform() * 2.0) as usize],
        complementary_masking: true,
        ..ConvMaeConfig::base()
    }
}

fn random_images(rng: &mut Rng, b: usize, s: usize) -> Tensor {
    let imgs: Vec<f64> = (0..b * s * s * 3).map(|_| rng.normal()).collect();
    Tensor::from_vec(imgs, (b, s, s, 3), &Device::Cpu).unwrap()
}

/// View `v` of every image, as a plain masking of the images.
fn plain_view(m: &Masking, v: usize) -> Masking {
    let (n, l, k) = (m.images, m.tokens, m.len_keep);
    Masking {
        batch: n,
        images: n,
        tokens: l,
        len_keep: k,
        ids_keep: m.ids_keep[v * n * k..(v + 1) * n * k].to_vec(),
        ids_restore: m.ids_restore[v * n * l..(v + 1) * n * l].to_vec(),
        mask: m.mask[v * n * l..(v + 1) * n * l].to_vec(),
    }
}

#[test]
fn fastconvmae_shared_computation_equals_the_sparse_views() {
    let mut rng = Rng::new(8);
    for case in 0..6 {
        let cfg = random_config(&mut rng);
        cfg.validate().unwrap();
        let b = 1 + (rng.uniform() * 2.0) as usize;
        let imgs = random_images(&mut rng, b, cfg.img_size);
        let masking = Masking::complementary_random(&mut rng, b, cfg.num_tokens(), cfg.len_keep()).unwrap();
        let ctx = format!("case {case}: {cfg:?}, {b} images x {} views", masking.views());
        assert_eq!(masking.batch, b * masking.views(), "{ctx}");
        // The dense path's stage maps are the images' shared ones; each view's visible blocks
        // of them are the sparse path's.
        assert_paths_agree(&cfg, &imgs, &masking, case, &ctx);
    }
}

#[test]
fn complementary_loss_is_the_mean_of_the_views_plain_losses() {
    let mut rng = Rng::new(9);
    for case in 0..4 {
        let cfg = random_config(&mut rng);
        let b = 2;
        let imgs = random_images(&mut rng, b, cfg.img_size);
        let masking = Masking::complementary_random(&mut rng, b, cfg.num_tokens(), cfg.len_keep()).unwrap();
        let views = masking.views();
        for path in [ConvPath::Sparse, ConvPath::Dense] {
            let mut model = ConvMae::new(cfg.clone(), DType::F64, &Device::Cpu, 100 + case).unwrap();
            model.path = path;
            let together = model.forward_pretrain(&imgs, &masking).unwrap();
            let together_grads = together.backward(&together.loss).unwrap();
            // Every view masks the same number of tokens, so the mean over all views' masked
            // tokens is the mean of the views' means.
            let mut loss = 0.0;
            let mut grads: Vec<Option<Tensor>> = vec![None; model.params.trainable().count()];
            for v in 0..views {
                let one = model.forward_pretrain(&imgs, &plain_view(&masking, v)).unwrap();
                loss += one.loss.to_scalar::<f64>().unwrap() / views as f64;
                let g = one.backward(&one.loss).unwrap();
                for (slot, (_, var)) in grads.iter_mut().zip(model.params.trainable()) {
                    let gv = (g.get(var.as_tensor()).unwrap() / views as f64).unwrap();
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + gv).unwrap(),
                        None => gv,
                    });
                }
            }
            let ctx = format!("case {case}, {path:?}: {cfg:?}, {views} views");
            let got = together.loss.to_scalar::<f64>().unwrap();
            assert!((got - loss).abs() <= 1e-12 * loss.abs(), "loss {got} vs the views' mean {loss}, {ctx}");
            for (want, (p, var)) in grads.iter().zip(model.params.trainable()) {
                let got = together_grads.get(var.as_tensor()).unwrap();
                let want = want.as_ref().unwrap();
                assert!(rel(got, want) < 1e-9, "grad {} rel {:.3e}, {ctx}", p.spec.name, rel(got, want));
            }
        }
    }
}

/// The official recipe's setting (mask ratio 0.75) at convmae-tiny's 4x4 token grid: 4 views of
/// 4 tokens; other ratios that leave len_keep not dividing the tokens are refused by name.
#[test]
fn complementary_masking_config_is_checked() {
    let ok = ConvMaeConfig { complementary_masking: true, ..ConvMaeConfig::tiny() };
    ok.validate().unwrap();
    let bad = ConvMaeConfig { mask_ratio: 0.6, ..ok.clone() };
    let e = bad.validate().unwrap_err();
    assert!(e.contains("complementary_masking") && e.contains("mask_ratio 0.6"), "{e}");
    let none = ConvMaeConfig { mask_ratio: 0.0, ..ok };
    assert!(none.validate().unwrap_err().contains("at least 2 views"));
}
