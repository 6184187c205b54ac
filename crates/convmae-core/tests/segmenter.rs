//! The UperNet segmenter (spec section 7): its resize and pooling maps against plain per-pixel
//! references and torch's known values, the relative position index, the decode loss's
//! treatment of ignored pixels, gradients against finite differences, the official layer-decay
//! groups, and a small model learning a labelling.

use crate::common;
use common::tensors::{nchw, nhwc, random, to_vec};
use candle_core::{DType, Device, Tensor};
use convmae_core::model::classifier::Mode;
use convmae_core::model::segmenter::{
    adaptive_avg_pool, adaptive_pool_matrix, bilinear_matrix, relative_position_index, relative_table_len, resize_bilinear, segmentation_loss, Segmenter, SegmenterHead,
};
use convmae_core::precision::Precision;
use convmae_core::rng::Rng;
use convmae_core::segment::{ClassAreas, SegmenterAdamWConfig, SegmenterTrainer};
use convmae_core::train::{normalize, Batch};
use convmae_core::ConvMaeConfig;
use std::collections::BTreeSet;

/// A 48-px model (3x3 token grid, so the stride-32 level is 1x1) small enough for f64
/// finite differences.
fn small_cfg() -> ConvMaeConfig {
    ConvMaeConfig { img_size: 48, embed_dim: [8, 12, 16], depth: [1, 1, 2], num_heads: 2, ..ConvMaeConfig::tiny() }
}

fn small_head() -> SegmenterHead {
    SegmenterHead { num_classes: 3, channels: 8, aux_channels: 4, ..SegmenterHead::default() }
}

/// torch's upsample_bilinear2d (align_corners=False) written per output pixel: the four
/// neighbours of the source point, weighted by distance.
fn bilinear_reference(x: &[f64], (h, w): (usize, usize), (oh, ow): (usize, usize)) -> Vec<f64> {
    let src = |o: usize, inp: usize, out: usize| -> (usize, usize, f64) {
        let s = (((o as f64) + 0.5) * inp as f64 / out as f64 - 0.5).max(0.0);
        let i0 = s.floor() as usize;
        let i1 = if i0 + 1 < inp { i0 + 1 } else { i0 };
        (i0, i1, s - i0 as f64)
    };
    let mut y = Vec::with_capacity(oh * ow);
    for oy in 0..oh {
        let (y0, y1, ly) = src(oy, h, oh);
        for ox in 0..ow {
            let (x0, x1, lx) = src(ox, w, ow);
            let at = |r: usize, c: usize| x[r * w + c];
            y.push((1.0 - ly) * ((1.0 - lx) * at(y0, x0) + lx * at(y0, x1)) + ly * ((1.0 - lx) * at(y1, x0) + lx * at(y1, x1)));
        }
    }
    y
}

#[test]
fn bilinear_matches_torchs_values_and_a_per_pixel_reference() {
    // torch: F.interpolate([0, 1], size=4, mode='linear', align_corners=False) = [0, .25, .75, 1].
    let up = bilinear_matrix(2, 4);
    assert_eq!(up, vec![1.0, 0.0, 0.75, 0.25, 0.25, 0.75, 0.0, 1.0]);
    // Halving averages pairs.
    assert_eq!(bilinear_matrix(4, 2), vec![0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5]);
    for (from, to) in [((3, 5), (7, 4)), ((2, 2), (6, 9)), ((8, 6), (3, 5))] {
        // Planes [B, C, H, W] for the reference; the model's layout is channels-last.
        let x = random(&[2, 3, from.0, from.1], 7);
        let got = to_vec(&nchw(&resize_bilinear(&nhwc(&x), to).unwrap()));
        let xs = to_vec(&x);
        let plane = from.0 * from.1;
        let want: Vec<f64> = xs.chunks(plane).flat_map(|p| bilinear_reference(p, from, to)).collect();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-12, "{from:?} -> {to:?}: {g} vs {w}");
        }
    }
}

#[test]
fn adaptive_pooling_averages_torchs_bins() {
    // Bins of 5 -> 3: [0, 2), [1, 4), [3, 5) (floor(i * 5 / 3) .. ceil((i + 1) * 5 / 3)).
    let m = adaptive_pool_matrix(5, 3);
    let half = 0.5;
    let third = 1.0 / 3.0;
    assert_eq!(m, vec![half, half, 0.0, 0.0, 0.0, 0.0, third, third, third, 0.0, 0.0, 0.0, 0.0, half, half]);
    // A 1x1 map pooled to 6x6 repeats its value (the pyramid on ConvMAE-B's... tiny top level).
    assert_eq!(adaptive_pool_matrix(1, 6), vec![1.0; 6]);
    let x = random(&[1, 2, 7, 5], 3);
    let got = to_vec(&nchw(&adaptive_avg_pool(&nhwc(&x), 3).unwrap()));
    let xs = to_vec(&x);
    let bins = |o: usize, inp: usize| (o * inp / 3, ((o + 1) * inp).div_ceil(3));
    let mut want = Vec::new();
    for c in 0..2 {
        for oy in 0..3 {
            for ox in 0..3 {
                let ((y0, y1), (x0, x1)) = (bins(oy, 7), bins(ox, 5));
                let mut sum = 0.0;
                for yy in y0..y1 {
                    for xx in x0..x1 {
                        sum += xs[c * 35 + yy * 5 + xx];
                    }
                }
                want.push(sum / ((y1 - y0) * (x1 - x0)) as f64);
            }
        }
    }
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-12);
    }
}

#[test]
fn relative_position_index_names_each_displacement_once() {
    let g = 4;
    let index = relative_position_index(g);
    let n = g * g;
    assert_eq!(index.len(), n * n);
    // A token against itself reads the table's centre; the far corners read its ends.
    let centre = ((g - 1) * (2 * g - 1) + (g - 1)) as u32;
    assert!((0..n).all(|i| index[i * n + i] == centre));
    assert_eq!(index[n - 1], 0, "query (0, 0), key (3, 3): displacement (-3, -3)");
    assert_eq!(index[(n - 1) * n] as usize, relative_table_len(g) - 1);
    // Equal displacements share an entry and different ones do not.
    let mut by_displacement = std::collections::HashMap::new();
    for i in 0..n {
        for j in 0..n {
            let d = ((i / g) as i64 - (j / g) as i64, (i % g) as i64 - (j % g) as i64);
            let entry = *by_displacement.entry(d).or_insert(index[i * n + j]);
            assert_eq!(entry, index[i * n + j]);
        }
    }
    let distinct: BTreeSet<u32> = index.iter().copied().collect();
    assert_eq!(distinct.len(), relative_table_len(g));
    assert_eq!(by_displacement.len(), relative_table_len(g));
}

#[test]
fn the_decode_loss_averages_over_all_pixels_with_ignored_ones_as_zero() {
    // Logits already at the labels' size, so the resize is the identity.
    let logits = random(&[1, 3, 2, 2], 11);
    let labels = [2u8, 255, 0, 1];
    let got = to_vec(&segmentation_loss(&nhwc(&logits), &labels, (2, 2)).unwrap())[0];
    let l = to_vec(&logits);
    let mut sum = 0.0;
    for (pixel, &label) in labels.iter().enumerate() {
        if label == 255 {
            continue;
        }
        let z: Vec<f64> = (0..3).map(|c| l[c * 4 + pixel]).collect();
        let log_norm = z.iter().map(|v| v.exp()).sum::<f64>().ln();
        sum += log_norm - z[label as usize];
    }
    // mmseg 0.11 divides by all 4 pixels, not by the 3 labelled ones.
    assert!((got - sum / 4.0).abs() < 1e-12, "{got} vs {}", sum / 4.0);
    let e = segmentation_loss(&nhwc(&logits), &[2, 3, 0, 1], (2, 2)).unwrap_err().to_string();
    assert!(e.contains("value 3 at pixel 1") && e.contains("3 classes"), "{e}");
    let e = segmentation_loss(&nhwc(&logits), &[2, 0], (2, 2)).unwrap_err().to_string();
    assert!(e.contains("labels") && e.contains("got 2"), "{e}");
}

fn small_batch(b: usize, s: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut rng = Rng::new(seed);
    let px = (0..b * s * s * 3).map(|_| (rng.uniform() * 256.0) as u8).collect();
    let labels = (0..b * s * s).map(|_| if rng.uniform() < 0.1 { 255 } else { (rng.uniform() * 3.0) as u8 }).collect();
    (px, labels)
}

/// decode + 0.4 aux loss of a training forward whose randomness (stochastic depth, dropout) is
/// drawn from the same seed each time, so that it is a fixed function of the parameters.
fn train_loss(model: &Segmenter, imgs: &Tensor, labels: &[u8], s: usize) -> Tensor {
    let mut rng = Rng::new(5);
    let out = model.forward(imgs, &mut Mode::Train(&mut rng)).unwrap();
    let decode = segmentation_loss(&out.logits, labels, (s, s)).unwrap();
    let aux = segmentation_loss(&out.aux_logits, labels, (s, s)).unwrap();
    (decode + (aux * model.head.aux_weight).unwrap()).unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    let cfg = small_cfg();
    let s = cfg.img_size;
    let mut model = Segmenter::new(cfg, small_head(), DType::F64, &Device::Cpu, 3).unwrap();
    // Move the zero-initialized tables and unit layer scales off their init, so that every
    // path carries a gradient of its own.
    for (name, seed) in [("blocks3.1.attn.relative_position_bias_table", 21), ("blocks3.0.gamma_1", 22), ("blocks3.1.gamma_2", 23)] {
        let shape = model.params.get(name).dims().to_vec();
        let v = (random(&shape, seed) * 0.3).unwrap();
        let v = if name.contains("gamma") { (v + 1.0).unwrap() } else { v };
        model.params.set(name, &v).unwrap();
    }
    let (px, labels) = small_batch(2, s, 9);
    let batch = Batch { pixels: &px, batch: 2, height: s, width: s, channels: 3 };
    let imgs = normalize(&batch, DType::F64, &Device::Cpu).unwrap();
    let loss = train_loss(&model, &imgs, &labels, s);
    let grads = model.params.gradients(&loss.backward().unwrap()).unwrap();
    let names: Vec<String> = model.params.trainable().map(|(p, _)| p.spec.name.clone()).collect();
    let checked = [
        "decode_head.conv_seg.weight",
        "decode_head.psp_modules.3.1.conv.weight",
        "decode_head.bottleneck.bn.weight",
        "decode_head.fpn_bottleneck.conv.weight",
        "decode_head.lateral_convs.0.bn.bias",
        "auxiliary_head.convs.0.conv.weight",
        "fpn.0.weight",
        "fpn.1.bias",
        "blocks3.1.attn.relative_position_bias_table",
        "blocks3.0.gamma_1",
        "blocks3.1.gamma_2",
        "blocks3.0.attn.qkv.weight",
        "blocks1.0.attn.weight",
        "pos_embed",
    ];
    let eps = 1e-5;
    for name in checked {
        let at = names.iter().position(|n| n == name).unwrap_or_else(|| panic!("no trainable tensor {name}"));
        let analytic = to_vec(&grads[at]);
        let base = model.params.get(name).copy().unwrap();
        let values = to_vec(&base);
        for pick in 0..3 {
            let i = (pick * 7919 + 13) % values.len();
            let mut shifted = |delta: f64| {
                let mut v = values.clone();
                v[i] += delta;
                model.params.set(name, &Tensor::from_vec(v, base.dims(), &Device::Cpu).unwrap()).unwrap();
                to_vec(&train_loss(&model, &imgs, &labels, s))[0]
            };
            let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
            model.params.set(name, &base).unwrap();
            let tol = 1e-6 + 1e-4 * numeric.abs().max(analytic[i].abs());
            assert!((numeric - analytic[i]).abs() < tol, "{name}[{i}]: analytic {} vs numeric {numeric}", analytic[i]);
        }
    }
}

/// What a segmenter on CUDA runs is the CPU's function: with every op on candle's compositions
/// (`with_path(Path::Composite)`: the unfold as narrows and index selects, BatchNorm as candle's
/// ops; on CUDA the ops without a CUDA kernel of ours take these), the loss and every gradient
/// of a training step equal the kernels' in f64, here on the CPU.
#[test]
fn the_composite_route_of_a_cuda_segmenter_is_the_kernels_function() {
    use convmae_kernels::{with_path, Path};
    let cfg = small_cfg();
    let s = cfg.img_size;
    let model = Segmenter::new(cfg, small_head(), DType::F64, &Device::Cpu, 4).unwrap();
    let (px, labels) = small_batch(2, s, 10);
    let batch = Batch { pixels: &px, batch: 2, height: s, width: s, channels: 3 };
    let imgs = normalize(&batch, DType::F64, &Device::Cpu).unwrap();
    let run = |path: Path| {
        with_path(path, || {
            let loss = train_loss(&model, &imgs, &labels, s);
            let grads = model.params.gradients(&loss.backward().unwrap()).unwrap();
            (to_vec(&loss)[0], grads.iter().map(to_vec).collect::<Vec<_>>())
        })
    };
    let (kernel_loss, kernel_grads) = run(Path::Kernels);
    let (composite_loss, composite_grads) = run(Path::Composite);
    assert!((kernel_loss - composite_loss).abs() < 1e-12 * kernel_loss.abs(), "loss {kernel_loss} vs {composite_loss}");
    let names: Vec<String> = model.params.trainable().map(|(p, _)| p.spec.name.clone()).collect();
    assert_eq!(kernel_grads.len(), names.len());
    // A bias feeding a BatchNorm (`fpn.0.bias`) has a zero gradient up to rounding (~1e-21):
    // differences are measured against each tensor's largest gradient, with a floor of 1e-12 of
    // the largest gradient of all.
    let largest = |g: &[f64]| g.iter().fold(0f64, |m, v| m.max(v.abs()));
    let floor = 1e-12 * kernel_grads.iter().map(|g| largest(g)).fold(0f64, f64::max);
    for ((name, a), b) in names.iter().zip(&kernel_grads).zip(&composite_grads) {
        let scale = largest(a);
        let worst = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst <= 1e-9 * scale + floor, "{name}: gradients differ by {worst} (largest {scale})");
    }
}

/// spec section 7's table for ConvMAE-B's names (a narrow model with Base's depths): layer 0 is
/// pos_embed, the patch embeds and blocks1-2 at 0.75^12; blocks3.i at 0.75^(11 - i); `fpn` and
/// the heads at 1. No decay on 1-D tensors and biases; pos_embed and the relative position
/// tables are decayed (the official exemption misses the prefixed names).
#[test]
fn layer_decay_groups_follow_the_official_table() {
    let cfg = ConvMaeConfig { embed_dim: [8, 8, 12], depth: [2, 2, 11], num_heads: 2, ..ConvMaeConfig::base() };
    let head = SegmenterHead { channels: 4, aux_channels: 4, num_classes: 3, ..SegmenterHead::default() };
    let model = Segmenter::new(cfg, head, DType::F32, &Device::Cpu, 0).unwrap();
    let trainer = SegmenterTrainer::new(model, SegmenterAdamWConfig::default(), 0).unwrap();
    let groups: std::collections::HashMap<String, (f64, f64)> = trainer
        .model
        .params
        .trainable()
        .zip(&trainer.optimizer.groups)
        .map(|((p, _), g)| (p.spec.name.clone(), (g.lr_scale, g.weight_decay)))
        .collect();
    let d = 0.75f64;
    let want = [
        ("pos_embed", d.powi(12), 0.05),
        ("patch_embed1.proj.weight", d.powi(12), 0.05),
        ("patch_embed4.bias", d.powi(12), 0.0),
        ("blocks2.1.mlp.fc1.weight", d.powi(12), 0.05),
        ("blocks3.0.attn.qkv.weight", d.powi(11), 0.05),
        ("blocks3.3.gamma_1", d.powi(8), 0.0),
        ("blocks3.3.attn.relative_position_bias_table", d.powi(8), 0.05),
        ("blocks3.10.mlp.fc2.weight", d, 0.05),
        ("fpn.0.weight", 1.0, 0.05),
        ("fpn.1.weight", 1.0, 0.0),
        ("decode_head.conv_seg.weight", 1.0, 0.05),
        ("decode_head.conv_seg.bias", 1.0, 0.0),
        ("decode_head.psp_modules.0.1.conv.weight", 1.0, 0.05),
        ("auxiliary_head.convs.0.bn.bias", 1.0, 0.0),
    ];
    for (name, scale, wd) in want {
        let (got_scale, got_wd) = groups[name];
        assert!((got_scale - scale).abs() < 1e-15 && got_wd == wd, "{name}: ({got_scale}, {got_wd}) vs ({scale}, {wd})");
    }
    // The running statistics are buffers, not trained.
    assert!(!groups.contains_key("decode_head.bottleneck.bn.running_mean"));
}

#[test]
fn a_small_segmenter_learns_a_labelling_and_reports_its_areas() {
    learns_a_labelling(Precision::Fp32);
}

/// The same in bf16 (the weights' compute copies follow every update).
#[test]
fn a_small_segmenter_learns_a_labelling_in_bf16() {
    let trainer = learns_a_labelling(Precision::Bf16);
    assert_eq!(trainer.model.params.stale_copy().unwrap(), None);
}

fn learns_a_labelling(precision: Precision) -> SegmenterTrainer {
    let cfg = small_cfg();
    let s = cfg.img_size;
    let mut model = Segmenter::new(cfg, small_head(), DType::F32, &Device::Cpu, 1).unwrap();
    model.precision = precision;
    let mut trainer = SegmenterTrainer::new(model, SegmenterAdamWConfig::default(), 1).unwrap();
    // Class = which third of the image a pixel's column falls in; the picture shows it as
    // three flat colours, with a border of ignored labels.
    let b = 2;
    let colours = [[200u8, 30, 30], [30, 200, 30], [30, 30, 200]];
    let mut px = Vec::new();
    let mut labels = Vec::new();
    for _ in 0..b {
        for y in 0..s {
            for x in 0..s {
                let class = x * 3 / s;
                px.extend_from_slice(&colours[class]);
                labels.push(if y == 0 { 255 } else { class as u8 });
            }
        }
    }
    let batch = Batch { pixels: &px, batch: b, height: s, width: s, channels: 3 };
    let at_init: u64 = trainer.evaluate(&batch, Some(&labels)).unwrap().areas.unwrap().intersect.iter().sum();
    let first = trainer.train_step(&batch, &labels, 2e-3).unwrap();
    let mut last = first.clone();
    for _ in 0..40 {
        last = trainer.train_step(&batch, &labels, 2e-3).unwrap();
    }
    assert_eq!(last.step, 41);
    assert!(last.loss < 0.8 * first.loss, "loss {} -> {}", first.loss, last.loss);
    assert!((last.loss - (last.decode_loss + 0.4 * last.aux_loss)).abs() < 1e-5);
    assert_eq!(trainer.bn_batches, 41);
    let eval = trainer.evaluate(&batch, Some(&labels)).unwrap();
    let areas = eval.areas.unwrap();
    let labelled: u64 = areas.label.iter().sum();
    assert_eq!(labelled as usize, labels.iter().filter(|&&l| l != 255).count());
    let correct: u64 = areas.intersect.iter().sum();
    assert!(correct as f64 > 0.9 * labelled as f64 && correct > at_init, "pixel accuracy {correct} / {labelled}, at init {at_init}");
    assert_eq!(eval.predictions.len(), b * s * s);
    // The areas are those of the predictions against the labels.
    let again = ClassAreas::of(&eval.predictions, &labels, 3);
    assert_eq!((again.intersect, again.union), (areas.intersect, areas.union));
    // The running statistics moved off their init.
    let running = to_vec(trainer.model.params.get("fpn.1.running_mean"));
    assert!(running.iter().any(|&v| v != 0.0));
    trainer
}

/// bf16 precision, as mmseg's fp16 training runs a segmenter: the backbone and the heads on
/// bf16 copies of the weights, BatchNorm (statistics, affine weights, running averages) and the
/// losses in f32. With the same weights and draws, the losses within a few percent of f32's.
#[test]
fn bf16_precision_keeps_batch_norm_and_the_losses_in_f32() {
    let cfg = small_cfg();
    let s = cfg.img_size;
    let mut model = Segmenter::new(cfg, small_head(), DType::F32, &Device::Cpu, 2).unwrap();
    let (px, labels) = small_batch(2, s, 9);
    let imgs = normalize(&Batch { pixels: &px, batch: 2, height: s, width: s, channels: 3 }, DType::F32, &Device::Cpu).unwrap();
    let full = to_vec(&train_loss(&model, &imgs, &labels, s))[0];
    let full_stats = model.forward(&imgs, &mut Mode::Train(&mut Rng::new(5))).unwrap().norm_stats;
    model.precision = Precision::Bf16;
    assert_eq!(model.compute_dtype(), DType::BF16);
    let out = model.forward(&imgs, &mut Mode::Train(&mut Rng::new(5))).unwrap();
    assert_eq!((out.logits.dtype(), out.aux_logits.dtype()), (DType::F32, DType::F32));
    assert_eq!(out.norm_stats.len(), full_stats.len());
    for (half, full) in out.norm_stats.iter().zip(&full_stats) {
        assert_eq!(half.stats.mean.dtype(), DType::F32, "{}", half.prefix);
        // Statistics of bf16 activations: close to f32's, not equal. (Against the layer's largest
        // variance: the pooled 1x1 level has two values per channel, whose variance is all
        // rounding where the two nearly agree.)
        let (a, b) = (to_vec(&half.stats.var_unbiased), to_vec(&full.stats.var_unbiased));
        let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 0.1 * scale, "{}: batch variance {x} vs f32 {y} (largest {scale})", half.prefix);
        }
    }
    let loss = train_loss(&model, &imgs, &labels, s);
    assert_eq!(loss.dtype(), DType::F32);
    let half = to_vec(&loss)[0];
    assert!(((half - full) / full).abs() < 0.05, "bf16 loss {half} vs f32 {full}");
    let nonzero = common::check_bf16_gradient_routes(&model.params, &loss.backward().unwrap());
    assert!(nonzero * 10 > model.params.trainable().count() * 9, "only {nonzero} tensors got a nonzero gradient");
}

#[test]
fn bad_inputs_are_named() {
    let cfg = small_cfg();
    let s = cfg.img_size;
    let model = Segmenter::new(cfg.clone(), small_head(), DType::F32, &Device::Cpu, 1).unwrap();
    let mut trainer = SegmenterTrainer::new(model, SegmenterAdamWConfig::default(), 1).unwrap();
    let (px, labels) = small_batch(1, s, 2);
    let one = Batch { pixels: &px, batch: 1, height: s, width: s, channels: 3 };
    let e = trainer.train_step(&one, &labels, 1e-3).unwrap_err().to_string();
    assert!(e.contains("BatchNorm") && e.contains("at least 2 images"), "{e}");
    let e = trainer.train_step(&one, &labels[1..], 1e-3).unwrap_err().to_string();
    assert!(e.contains("labels hold"), "{e}");
    let e = Segmenter::new(ConvMaeConfig { img_size: 32, ..cfg }, small_head(), DType::F32, &Device::Cpu, 1).err().unwrap().to_string();
    assert!(e.contains("img_size >= 48"), "{e}");
    let e = SegmenterHead { num_classes: 256, ..small_head() }.validate().unwrap_err();
    assert!(e.contains("num_classes"), "{e}");
}

fn tmp(name: &str) -> std::path::PathBuf {
    common::tensors::tmp("segmenter", name)
}

fn stripes(b: usize, s: usize, step: u64) -> (Vec<u8>, Vec<u8>) {
    let mut px = Vec::new();
    let mut labels = Vec::new();
    for i in 0..b {
        for y in 0..s {
            for x in 0..s {
                let class = (x + y + i + step as usize) * 3 / (2 * s) % 3;
                px.extend_from_slice(&[(class * 90) as u8, (y * 5) as u8, (x * 5) as u8]);
                labels.push(class as u8);
            }
        }
    }
    (px, labels)
}

fn step(t: &mut SegmenterTrainer, n: u64) -> f64 {
    let s = t.model.cfg.img_size;
    let (px, labels) = stripes(2, s, n);
    let batch = Batch { pixels: &px, batch: 2, height: s, width: s, channels: 3 };
    t.train_step(&batch, &labels, 1e-3).unwrap().loss
}

#[test]
fn a_saved_segmenter_resumes_exactly() {
    use convmae_core::checkpoint::{load_segmenter, save_segmenter};
    let new = |seed| SegmenterTrainer::new(Segmenter::new(small_cfg(), small_head(), DType::F32, &Device::Cpu, seed).unwrap(), SegmenterAdamWConfig::default(), seed).unwrap();
    let mut a = new(1);
    step(&mut a, 0);
    step(&mut a, 1);
    let path = tmp("resume.safetensors");
    save_segmenter(&a, &path, "{\"epoch\":3}").unwrap();
    let mut b = new(2);
    let (report, extra) = load_segmenter(&mut b, &path, true).unwrap();
    assert!(report.optimizer_restored && report.missing.is_empty() && report.unexpected.is_empty(), "{report:?}");
    assert_eq!(extra, "{\"epoch\":3}");
    assert_eq!((b.step_count(), b.bn_batches, b.seed), (2, 2, 1));
    // The next step is the same step: same stochastic depth, dropout, moments and statistics.
    assert_eq!(step(&mut a, 2).to_bits(), step(&mut b, 2).to_bits());
    for (pa, pb) in a.model.params.iter().zip(b.model.params.iter()) {
        assert_eq!(to_vec(&pa.tensor), to_vec(&pb.tensor), "{}", pa.spec.name);
    }
    // A head of another size is named.
    let other = SegmenterHead { num_classes: 4, ..small_head() };
    let mut c = SegmenterTrainer::new(Segmenter::new(small_cfg(), other, DType::F32, &Device::Cpu, 1).unwrap(), SegmenterAdamWConfig::default(), 1).unwrap();
    let e = load_segmenter(&mut c, &path, true).err().unwrap().to_string();
    assert!(e.contains("different segmenter head"), "{e}");
}

/// In bf16 too: the loaded masters give the same compute copies, so the next step is the same
/// step, bit for bit (the copies of a model that stepped before the load follow it as well).
#[test]
fn a_saved_bf16_segmenter_resumes_exactly() {
    use convmae_core::checkpoint::{load_segmenter, save_segmenter};
    let new = |seed| {
        let mut model = Segmenter::new(small_cfg(), small_head(), DType::F32, &Device::Cpu, seed).unwrap();
        model.precision = Precision::Bf16;
        SegmenterTrainer::new(model, SegmenterAdamWConfig::default(), seed).unwrap()
    };
    let mut a = new(1);
    step(&mut a, 0);
    step(&mut a, 1);
    let path = tmp("resume-bf16.safetensors");
    save_segmenter(&a, &path, "{}").unwrap();
    let mut b = new(2);
    step(&mut b, 5);
    load_segmenter(&mut b, &path, true).unwrap();
    assert_eq!(b.model.params.stale_copy().unwrap(), None);
    assert_eq!(step(&mut a, 2).to_bits(), step(&mut b, 2).to_bits());
    for (pa, pb) in a.model.params.iter().zip(b.model.params.iter()) {
        assert_eq!(to_vec(&pa.tensor), to_vec(&pb.tensor), "{}", pa.spec.name);
    }
}

#[test]
fn init_from_loads_the_backbone_and_resizes_pos_embed_bicubically() {
    use convmae_core::checkpoint::{init_segmenter_from, save_segmenter};
    use convmae_core::pos_embed::resize_pos_embed;
    // A 48-px segmenter (3x3 grid) initializes a 64-px one (4x4 grid).
    let mut small = Segmenter::new(small_cfg(), small_head(), DType::F32, &Device::Cpu, 5).unwrap();
    let table = random(&[1, 9, 16], 4);
    small.params.set("pos_embed", &table).unwrap();
    // A trained relative position table (they start at zero): 5x5 offsets of the 3x3 grid, 2 heads.
    small.params.set("blocks3.1.attn.relative_position_bias_table", &random(&[25, 2], 9)).unwrap();
    let source = SegmenterTrainer::new(small, SegmenterAdamWConfig::default(), 5).unwrap();
    let path = tmp("init.safetensors");
    save_segmenter(&source, &path, "{}").unwrap();
    let cfg = ConvMaeConfig { img_size: 64, ..small_cfg() };
    let mut big = SegmenterTrainer::new(Segmenter::new(cfg, small_head(), DType::F32, &Device::Cpu, 6).unwrap(), SegmenterAdamWConfig::default(), 6).unwrap();
    let fresh_head = to_vec(big.model.params.get("decode_head.conv_seg.weight"));
    let report = init_segmenter_from(&mut big, &path).unwrap();
    assert!(report.reinitialized.iter().all(|n| n.starts_with("decode_head.") || n.starts_with("auxiliary_head.")), "{:?}", report.reinitialized);
    assert!(report.reinitialized.contains(&"decode_head.conv_seg.weight".to_string()));
    // The relative position tables, 5x5 offsets of the 3x3 grid, are resized bicubically to the
    // 7x7 offsets of the 4x4 grid (the official loader's table interpolation), each head alike.
    let name = "blocks3.1.attn.relative_position_bias_table";
    assert!(report.loaded.iter().any(|n| n == name));
    let small_table = to_vec(source.model.params.get(name));
    let resized: Vec<f32> = to_vec(big.model.params.get(name)).into_iter().map(|v| v as f32).collect();
    assert_eq!(resized, resize_pos_embed(&small_table, 2, 5, 7).into_iter().map(|v| v as f32).collect::<Vec<_>>());
    assert_eq!(to_vec(big.model.params.get("decode_head.conv_seg.weight")), fresh_head);
    assert_eq!(to_vec(big.model.params.get("blocks1.0.attn.weight")), to_vec(source.model.params.get("blocks1.0.attn.weight")));
    let stored = to_vec(source.model.params.get("pos_embed"));
    let want: Vec<f32> = resize_pos_embed(&stored, 16, 3, 4).into_iter().map(|v| v as f32).collect();
    let got: Vec<f32> = to_vec(big.model.params.get("pos_embed")).into_iter().map(|v| v as f32).collect();
    assert_eq!(got, want);
    // An encoder of another width is named.
    let narrow = ConvMaeConfig { embed_dim: [8, 12, 20], num_heads: 2, ..small_cfg() };
    let mut other = SegmenterTrainer::new(Segmenter::new(narrow, small_head(), DType::F32, &Device::Cpu, 6).unwrap(), SegmenterAdamWConfig::default(), 6).unwrap();
    let e = init_segmenter_from(&mut other, &path).err().unwrap().to_string();
    assert!(e.contains("another shape"), "{e}");
}

/// Slide inference against the same windows placed by padding (another way to put a window's
/// logits at its offset) and averaged, then resized and argmaxed.
#[test]
fn slide_evaluation_averages_overlapping_windows_as_mmseg() {
    let cfg = small_cfg();
    let s = cfg.img_size;
    let model = Segmenter::new(cfg, small_head(), DType::F64, &Device::Cpu, 8).unwrap();
    let trainer = SegmenterTrainer::new(model, SegmenterAdamWConfig::default(), 8).unwrap();
    let (h, w, stride) = (s, 80, 20);
    let (px, _) = small_batch(1, 80, 12);
    let px = &px[..h * w * 3];
    let image = Batch { pixels: px, batch: 1, height: h, width: w, channels: 3 };
    let original = (37, 61);
    let mut rng = Rng::new(4);
    let labels: Vec<u8> = (0..original.0 * original.1).map(|_| (rng.uniform() * 3.0) as u8).collect();
    let got = trainer.evaluate_slide(&image, original, Some(&labels), stride).unwrap();
    // Windows at x = 0, 20, and 80 - 48 = 32 (the last moved back to end flush with the edge).
    let imgs = normalize(&image, DType::F64, &Device::Cpu).unwrap();
    let mut sum = Tensor::zeros((1, h, w, 3), DType::F64, &Device::Cpu).unwrap();
    let mut count = Tensor::zeros((1, h, w, 1), DType::F64, &Device::Cpu).unwrap();
    for x1 in [0, 20, 32] {
        let crop = imgs.narrow(2, x1, s).unwrap().contiguous().unwrap();
        let logits = trainer.model.forward(&crop, &mut Mode::Eval).unwrap().logits;
        let logits = resize_bilinear(&logits, (s, s)).unwrap();
        sum = (sum + logits.pad_with_zeros(2, x1, w - x1 - s).unwrap()).unwrap();
        count = (count + Tensor::ones((1, s, s, 1), DType::F64, &Device::Cpu).unwrap().pad_with_zeros(2, x1, w - x1 - s).unwrap()).unwrap();
    }
    let mean = sum.broadcast_div(&count).unwrap();
    let want: Vec<u8> = resize_bilinear(&mean, original).unwrap().argmax(3).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap().into_iter().map(|c| c as u8).collect();
    assert_eq!(got.predictions, want);
    let areas = got.areas.unwrap();
    assert_eq!(areas.label.iter().sum::<u64>() as usize, labels.len());
    // One window over an S x S image at its own size is the whole-image evaluation.
    let square = Batch { pixels: &px[..s * s * 3], batch: 1, height: s, width: s, channels: 3 };
    let whole = trainer.evaluate(&square, None).unwrap().predictions;
    assert_eq!(trainer.evaluate_slide(&square, (s, s), None, stride).unwrap().predictions, whole);
    // An image smaller than the window is padded; a bad stride is named.
    let small = Batch { pixels: &px[..40 * 40 * 3], batch: 1, height: 40, width: 40, channels: 3 };
    assert_eq!(trainer.evaluate_slide(&small, (40, 40), None, stride).unwrap().predictions.len(), 1600);
    let e = trainer.evaluate_slide(&square, (s, s), None, 0).err().unwrap().to_string();
    assert!(e.contains("stride"), "{e}");
}

