//! The model's runs of packed sublayers as one chain each (`convmae_kernels::sublayer_chain`):
//! the conv stages on the sparse path, stage 3 and the decoder.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use convmae_core::masking::Masking;
use convmae_core::model::layers::{block_names, conv_blocks, transformer_blocks, SpatialMix, CONV_LN_EPS};
use convmae_core::model::visible_neighbors;
use convmae_core::params::{pretrain_param_specs, Packing, ParamStore, SublayerKind};
use convmae_core::rng::Rng;
use convmae_core::ConvMaeConfig;

/// What a run of blocks gives: its output, the input's gradient and the gradients of its packs
/// (delivered from their sinks), of `sum(out * cot)`; with the number of ops in the graph the
/// output depends on (its nodes less the leaves).
fn run(view: &ParamStore, blocks: &[String], kinds: [SublayerKind; 2], x: &Var, cot: &Tensor, f: &dyn Fn(&Tensor) -> Tensor) -> (Vec<Vec<f32>>, usize) {
    let y = f(x.as_tensor());
    let nodes = y.sorted_nodes().iter().filter(|n| !n.is_variable()).count();
    let mut grads = (&y * cot).unwrap().sum_all().unwrap().backward().unwrap();
    view.pack_gradients().deliver(&mut grads).unwrap();
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut out = vec![values(&y), values(grads.get(x).expect("the input's gradient"))];
    for block in blocks {
        for kind in kinds {
            let pack = view.packed_sublayer(block, kind).unwrap_or_else(|| panic!("{block} {kind:?} is not packed"));
            for t in [pack.weights, pack.vectors] {
                out.push(values(grads.get(t).unwrap_or_else(|| panic!("no gradient reached {block} {kind:?}'s pack"))));
            }
        }
    }
    (out, nodes)
}

/// Each run chained, and its blocks one by one (`sublayer_chain` sent to the composite):
/// the same bits, forward and every gradient, with one op in the graph instead of one a link. The
/// packed compute view of an f64 store in f32, so that the CPU's one ops run.
#[test]
fn chained_stages_give_the_blocks_values_and_gradients_to_the_bit() {
    let cfg = ConvMaeConfig::golden_small();
    let store = ParamStore::init(pretrain_param_specs(&cfg), DType::F64, &Device::Cpu, 7).unwrap();
    let view = store.compute_view(DType::F32, Packing::Sublayers).unwrap();
    // The same copies unpacked: each block's sublayers on their own parameters, as the model's
    // f32 path runs them (`transformer_block`, `conv_block`).
    let unpacked = store.compute_view(DType::F32, Packing::None).unwrap();
    let (batch, tokens) = (2, cfg.num_tokens());
    let keep = tokens / 4;
    let masking = Masking::random(&mut Rng::new(3), batch, tokens, keep);
    let nbrs = Arc::new(visible_neighbors(&cfg, &masking, 0).unwrap());
    let cell = cfg.stage_cell(0);
    let conv = [SublayerKind::Conv, SublayerKind::Mlp];
    let transformer = [SublayerKind::Attention, SublayerKind::Mlp];
    let stage1 = block_names("blocks1", cfg.depth[0]);
    let stage3 = block_names("blocks3", cfg.depth[2]);
    let decoder = block_names("decoder_blocks", cfg.decoder_depth);
    /// The run of blocks on a parameter store.
    type Blocks<'a> = Box<dyn Fn(&ParamStore, &Tensor) -> Tensor + 'a>;
    /// A run of blocks: its name, its blocks, their sublayers' kinds, the input's shape and
    /// the run itself.
    struct Run<'a> {
        name: &'a str,
        blocks: &'a [String],
        kinds: [SublayerKind; 2],
        shape: Vec<usize>,
        on: Blocks<'a>,
    }
    let runs = [
        Run { name: "stage 1", blocks: &stage1, kinds: conv, shape: vec![batch * keep, cell, cell, cfg.embed_dim[0]], on: Box::new(|p, x| conv_blocks(p, &stage1, x, &SpatialMix::Sparse(&nbrs), None, CONV_LN_EPS).unwrap()) },
        Run { name: "stage 3", blocks: &stage3, kinds: transformer, shape: vec![batch, keep, cfg.embed_dim[2]], on: Box::new(|p, x| transformer_blocks(p, &stage3, x, cfg.num_heads).unwrap()) },
        Run { name: "decoder", blocks: &decoder, kinds: transformer, shape: vec![batch, tokens, cfg.decoder_embed_dim], on: Box::new(|p, x| transformer_blocks(p, &decoder, x, cfg.decoder_num_heads).unwrap()) },
    ];
    for Run { name, blocks, kinds, shape, on: blocks_on } in &runs {
        let f = &|x: &Tensor| blocks_on(&view, x);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape.as_slice(), &Device::Cpu).unwrap()).unwrap();
        let cot = Tensor::randn(0f32, 1.0, shape.as_slice(), &Device::Cpu).unwrap();
        // Path::Kernels: every sublayer as its one op, whatever `auto` would pick for its size.
        let (chained, chained_nodes) = convmae_kernels::with_path(convmae_kernels::Path::Kernels, || run(&view, blocks, *kinds, &x, &cot, f));
        let (separate, separate_nodes) = convmae_kernels::with_path(convmae_kernels::Path::Kernels, || {
            convmae_kernels::with_composite_ops(&["sublayer_chain"], || run(&view, blocks, *kinds, &x, &cot, f))
        });
        assert_eq!(chained, separate, "{name}");
        // The unpacked blocks: the same output and input gradient (the links are built right).
        let y = convmae_kernels::with_path(convmae_kernels::Path::Kernels, || blocks_on(&unpacked, x.as_tensor()));
        let grads = (&y * &cot).unwrap().sum_all().unwrap().backward().unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&y), chained[0], "{name}: unpacked output");
        assert_eq!(values(grads.get(&x).unwrap()), chained[1], "{name}: unpacked input gradient");
        let links = 2 * blocks.len();
        assert_eq!((chained_nodes, separate_nodes), (1, links), "{name}: ops in the graph, chained and one by one");
    }
}

/// The ops candle's backward walks in a pretraining step, each a zero-fill and an add of its
/// gradient at least: on the golden_small config with packed copies (as pretraining's bf16
/// copies are on CUDA; here an f64 store's f32 view, so that the CPU's ops run), with the
/// sublayer chains and the patch convs' kernel rows, and without them (`CONVMAE_COMPOSITE_OPS`'s
/// per-thread form). docs/cuda.md quotes these counts; a change that adds graph nodes to the
/// step fails here and should say why it pays.
#[test]
fn the_pretraining_graph_holds_the_ops_the_readme_counts() {
    use convmae_core::ConvMae;
    let cfg = ConvMaeConfig::golden_small();
    let store = ParamStore::init(pretrain_param_specs(&cfg), DType::F64, &Device::Cpu, 7).unwrap();
    let mut model = ConvMae::new(cfg.clone(), DType::F32, &Device::Cpu, 1).unwrap();
    // The model's own parameters in f32: its forward runs on the packed view as it is.
    model.params = store.compute_view(DType::F32, Packing::Sublayers).unwrap();
    let batch = 2;
    let masking = Masking::random(&mut Rng::new(3), batch, cfg.num_tokens(), cfg.len_keep());
    let imgs = Tensor::randn(0f32, 1.0, (batch, cfg.img_size, cfg.img_size, 3), &Device::Cpu).unwrap();
    let count = |composite: &'static [&'static str]| {
        let out = convmae_kernels::with_path(convmae_kernels::Path::Kernels, || convmae_kernels::with_composite_ops(composite, || model.forward_pretrain(&imgs, &masking).unwrap()));
        let nodes = out.loss.sorted_nodes();
        (nodes.iter().filter(|n| !n.is_variable()).count(), nodes.iter().filter(|n| n.is_variable()).count())
    };
    // 14 sublayers in 4 chains: 10 nodes; 5 patch convs' kernels: 2 nodes each. Without the
    // chains the single sublayer ops' packs are leaves too (their gradients go to the sinks).
    assert_eq!(count(&[]), (34, 27), "chains and kernel rows");
    assert_eq!(count(&["sublayer_chain"]), (44, 55), "kernel rows only");
    assert_eq!(count(&["sublayer_chain", "conv_weight_rows"]), (54, 55), "neither");
}
