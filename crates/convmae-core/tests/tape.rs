//! The pretraining backward on the tape (`convmae_kernels::tape`, `PretrainOutput::backward_scaled`)
//! against candle's backward of the same forward: the same bits for every parameter's gradient.

use candle_core::{DType, Device, Tensor};
use convmae_core::masking::Masking;
use convmae_core::model::ConvPath;
use convmae_core::params::{pretrain_param_specs, Packing, ParamStore};
use convmae_core::rng::Rng;
use convmae_core::{ConvMae, ConvMaeConfig};
use convmae_kernels::tape::GradientCounts;

/// A model of `cfg` on the packed f32 view of an f64 store, so that the CPU runs our one ops
/// and chains, as pretraining's bf16 copies do on CUDA.
fn packed_model(cfg: &ConvMaeConfig) -> ConvMae {
    let store = ParamStore::init(pretrain_param_specs(cfg), DType::F64, &Device::Cpu, 7).unwrap();
    let mut model = ConvMae::new(cfg.clone(), DType::F32, &Device::Cpu, 1).unwrap();
    model.params = store.compute_view(DType::F32, Packing::Sublayers).unwrap();
    model
}

/// The loss, every trainable tensor's gradient of `loss * scale` as f32 values, whether the tape
/// ran it, and the number of op nodes in candle's graph of the loss.
fn gradients(model: &ConvMae, imgs: &Tensor, masking: &Masking, scale: f64, candle_backward: bool) -> (f32, Vec<Vec<f32>>, bool, usize) {
    let run = || {
        let out = model.forward_pretrain(imgs, masking).unwrap();
        let nodes = out.loss.sorted_nodes().iter().filter(|n| !n.is_variable()).count();
        let grads = out.backward_scaled(scale).unwrap();
        let by_tensor = model.params.gradients(&grads).unwrap();
        let values = by_tensor.iter().map(|g| g.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
        (out.loss.to_scalar::<f32>().unwrap(), values, out.backward_by_tape(), nodes)
    };
    convmae_kernels::with_path(convmae_kernels::Path::Kernels, || if candle_backward { convmae_kernels::with_composite_ops(&["tape_backward"], run) } else { run() })
}

fn inputs(cfg: &ConvMaeConfig, batch: usize) -> (Tensor, Masking) {
    let (l, keep) = (cfg.num_tokens(), cfg.len_keep());
    let masking = if cfg.complementary_masking {
        Masking::complementary_random(&mut Rng::new(3), batch, l, keep).unwrap()
    } else {
        Masking::random(&mut Rng::new(3), batch, l, keep)
    };
    let imgs = Tensor::randn(0f32, 1.0, (batch, cfg.img_size, cfg.img_size, 3), &Device::Cpu).unwrap();
    (imgs, masking)
}

/// On the sparse path with packed copies the tape covers the whole pretraining graph (each of
/// its ops recorded, nothing else) and gives candle's gradients to the bit, for the loss and
/// for the loss scaled as gradient accumulation scales it; `tape_backward` in the composite list
/// sends the same forward to candle's backward.
#[test]
fn the_tape_gives_the_pretraining_gradients_of_candles_backward_to_the_bit() {
    // FastConvMAE's complementary masking too: its views' repeated targets are constants to the tape.
    let complementary = ConvMaeConfig { complementary_masking: true, ..ConvMaeConfig::golden_small() };
    for (name, cfg) in [("golden_small", ConvMaeConfig::golden_small()), ("convmae-base", ConvMaeConfig::base()), ("golden_small complementary", complementary)] {
        let model = packed_model(&cfg);
        let (imgs, masking) = inputs(&cfg, 2);
        for scale in [1.0, 0.25] {
            let (loss, ours, by_tape, nodes) = gradients(&model, &imgs, &masking, scale, false);
            let (candle_loss, theirs, candle_by_tape, candle_nodes) = gradients(&model, &imgs, &masking, scale, true);
            assert!(by_tape, "the tape covers the {name} pretraining graph");
            assert!(!candle_by_tape);
            // The graph is the same op for op: the switch changes the backward only.
            assert_eq!((nodes, loss), (candle_nodes, candle_loss));
            assert_eq!(ours.len(), theirs.len());
            assert!(ours.iter().flatten().any(|&v| v != 0.0));
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!(a == b, "{name} scale {scale}: trainable tensor {i} differs");
            }
        }
    }
}

/// What the tape spares candle's backward on the pretraining graph: the gradients the ops'
/// backwards return, each kept as it is where candle adds it to a zero-filled one, but the
/// second ones of the two tensors with two consumers (the outputs of stages 1 and 2: the next
/// stage and a fusion conv), and two for inputs that need none (stage 1's image patches, the
/// position table's rows) skipped where candle fills and adds them too. The elements candle
/// zero-fills, at batch 1 and 2: for ConvMAE-B 2,621,696 an image (activation-sized) and
/// 13,208,192 besides (the parameters outside the packs and the patch convs' kernel rows), the
/// figures docs/cuda.md scales to batch 64.
#[test]
fn the_tape_adds_only_second_gradients() {
    let counts = |cfg: &ConvMaeConfig, batch: usize| {
        let model = packed_model(cfg);
        let (imgs, masking) = inputs(cfg, batch);
        convmae_kernels::with_path(convmae_kernels::Path::Kernels, || {
            let out = model.forward_pretrain(&imgs, &masking).unwrap();
            let tape = out.tape.as_ref().unwrap();
            tape.backward_counted(&out.loss, out.loss.ones_like().unwrap()).unwrap().1
        })
    };
    let expected = |filled_elements| GradientCounts { taken: 60, added: 2, skipped: 2, filled_elements };
    let (per_image, besides) = (2_621_696, 13_208_192);
    assert_eq!(counts(&ConvMaeConfig::base(), 1), expected(besides + per_image), "convmae-base, batch 1");
    assert_eq!(counts(&ConvMaeConfig::base(), 2), expected(besides + 2 * per_image), "convmae-base, batch 2");
    let small = counts(&ConvMaeConfig::golden_small(), 1);
    assert_eq!((small.taken, small.added, small.skipped), (60, 2, 2), "golden_small");
}

/// Where candle's ops stand between the loss and the variables (the dense path's gathers, the
/// unpacked f32 path's blocks), the tape does not cover the graph and candle's backward runs:
/// the gradients are the same as with the tape switched off.
#[test]
fn where_the_tape_does_not_cover_the_graph_candles_backward_runs() {
    let cfg = ConvMaeConfig::golden_small();
    let (imgs, masking) = inputs(&cfg, 2);
    let mut dense = packed_model(&cfg);
    dense.path = ConvPath::Dense;
    let unpacked = ConvMae::new(cfg.clone(), DType::F32, &Device::Cpu, 1).unwrap();
    for (what, model) in [("dense", &dense), ("unpacked", &unpacked)] {
        let (loss, ours, by_tape, _) = gradients(model, &imgs, &masking, 0.5, false);
        let (candle_loss, theirs, ..) = gradients(model, &imgs, &masking, 0.5, true);
        assert!(!by_tape, "{what}");
        assert_eq!(loss, candle_loss, "{what}");
        assert!(ours == theirs, "{what}");
    }
}
