//! The sparse path (visible positions only) computes the same loss and gradients as the dense
//! masked path of the official code, on randomized configs, image sizes and mask ratios.

use candle_core::{DType, Device, Tensor};
use convmae_core::masking::Masking;
use convmae_core::model::layers::token_blocks;
use convmae_core::model::{ConvMae, ConvPath};
use convmae_core::rng::Rng;
use convmae_core::ConvMaeConfig;
use crate::common::tensors::rel;

fn random_config(rng: &mut Rng) -> ConvMaeConfig {
    let pick = |rng: &mut Rng, xs: &[usize]| xs[(rng.uniform() * xs.len() as f64) as usize];
    let heads = pick(rng, &[1, 2, 4]);
    let dec_heads = pick(rng, &[1, 2]);
    ConvMaeConfig {
        img_size: 16 * pick(rng, &[2, 3, 4, 5]),
        embed_dim: [pick(rng, &[4, 8, 12]), pick(rng, &[8, 12]), 8 * heads],
        depth: [pick(rng, &[1, 2]), pick(rng, &[1, 2]), pick(rng, &[1, 2])],
        num_heads: heads,
        mlp_ratio: [2.0, 3.0, 4.0],
        decoder_embed_dim: 8 * dec_heads,
        decoder_depth: 1,
        decoder_num_heads: dec_heads,
        norm_pix_loss: rng.uniform() < 0.7,
        qkv_bias: rng.uniform() < 0.7,
        mask_ratio: [0.5, 0.6, 0.75, 0.9][(rng.uniform() * 4.0) as usize],
        ..ConvMaeConfig::base()
    }
}

/// A model of `cfg` (weights from `seed`, f64) run on both paths gives the same loss, latent,
/// prediction, stage outputs at the visible positions and gradients.
pub fn assert_paths_agree(cfg: &ConvMaeConfig, imgs: &Tensor, masking: &Masking, seed: u64, ctx: &str) {
    let mut model = ConvMae::new(cfg.clone(), DType::F64, &Device::Cpu, seed).unwrap();
    model.path = ConvPath::Dense;
    let dense = model.forward_pretrain(imgs, masking).unwrap();
    let dense_grads = dense.backward(&dense.loss).unwrap();
    model.path = ConvPath::Sparse;
    let sparse = model.forward_pretrain(imgs, masking).unwrap();
    let sparse_grads = sparse.backward(&sparse.loss).unwrap();

    assert_eq!(sparse.pred.dims(), dense.pred.dims(), "{ctx}");
    assert!(rel(&sparse.loss, &dense.loss) < 1e-12, "loss, {ctx}");
    assert!(rel(&sparse.latent, &dense.latent) < 1e-10, "latent, {ctx}");
    assert!(rel(&sparse.pred, &dense.pred) < 1e-10, "pred, {ctx}");
    let rows = masking.visible_token_rows(&Device::Cpu).unwrap();
    for (stage, (sp, de)) in [(&sparse.stage1, &dense.stage1), (&sparse.stage2, &dense.stage2)].into_iter().enumerate() {
        let visible = token_blocks(de, cfg.stage_cell(stage), &rows).unwrap();
        assert!(rel(sp, &visible) < 1e-10, "stage{} at visible positions, {ctx}", stage + 1);
    }
    for (p, v) in model.params.trainable() {
        let (gs, gd) = (sparse_grads.get(v.as_tensor()).unwrap(), dense_grads.get(v.as_tensor()).unwrap());
        assert!(rel(gs, gd) < 1e-9, "grad {} rel {:.3e}, {ctx}", p.spec.name, rel(gs, gd));
    }
}

#[test]
fn sparse_equals_dense_on_random_configs() {
    let mut rng = Rng::new(2024);
    let mut checked = 0;
    for case in 0..16 {
        let cfg = random_config(&mut rng);
        if cfg.validate().is_err() {
            continue;
        }
        checked += 1;
        let b = 1 + (rng.uniform() * 3.0) as usize;
        let s = cfg.img_size;
        let imgs: Vec<f64> = (0..b * s * s * 3).map(|_| rng.normal()).collect();
        let imgs = Tensor::from_vec(imgs, (b, s, s, 3), &Device::Cpu).unwrap();
        let masking = Masking::random(&mut rng, b, cfg.num_tokens(), cfg.len_keep());
        assert_paths_agree(&cfg, &imgs, &masking, case, &format!("case {case}: {cfg:?}, batch {b}"));
    }
    assert!(checked >= 10, "only {checked} valid random configs");
}

/// The stages' neighbour tables as the model builds them (from the mask: `VisibleTokens`, the
/// formula the GPU kernel uses) equal the tables built from the list of visible positions and a
/// map of the grid (`SparseNeighbors::from_positions`), for random masks at ConvMAE-B's grid
/// and at small grids, every mask ratio's extremes included.
#[test]
fn neighbour_tables_from_the_mask_equal_those_from_the_positions() {
    use convmae_core::model::{visible_neighbors, DW_KERNEL};
    use convmae_kernels::SparseNeighbors;
    let mut rng = Rng::new(41);
    for (preset, batch, ratios) in [("convmae-base", 2, &[0.75][..]), ("convmae-golden-small", 3, &[0.0, 0.5, 0.75, 0.9][..])] {
        for &mask_ratio in ratios {
            let mut cfg = ConvMaeConfig::preset(preset).unwrap();
            cfg.mask_ratio = mask_ratio;
            let masking = Masking::random(&mut rng, batch, cfg.num_tokens(), cfg.len_keep());
            for stage in 0..2 {
                let (grid, cell) = (cfg.grid(), cfg.stage_cell(stage));
                let mut positions = Vec::new();
                for (n, &t) in masking.ids_keep.iter().enumerate() {
                    let (image, ty, tx) = ((n / masking.len_keep) as u32, t as usize / grid, t as usize % grid);
                    for i in 0..cell {
                        for j in 0..cell {
                            positions.push((image, (ty * cell + i) as u32, (tx * cell + j) as u32));
                        }
                    }
                }
                let side = grid * cell;
                let want = SparseNeighbors::from_positions(&positions, batch, side, side, DW_KERNEL).unwrap();
                let got = visible_neighbors(&cfg, &masking, stage).unwrap();
                assert_eq!(got.rows(), want.rows(), "{preset} ratio {mask_ratio} stage {stage}");
                assert!(got.table() == want.table(), "{preset} ratio {mask_ratio} stage {stage}: tables differ");
            }
        }
    }
}
