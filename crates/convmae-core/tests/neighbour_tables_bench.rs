//! The host's cost of a sparse pretraining step's neighbour tables, the old way (the visible
//! positions listed, a map of the grid, `SparseNeighbors::from_positions`) against the new
//! (`visible_neighbors`: the mask as `VisibleTokens`, the table by formula on first use, which
//! on a GPU is built there instead), ConvMAE-B at batch 64, stages 1 and 2, alternated. Ignored
//! by default; run with
//! `RAYON_NUM_THREADS=1 cargo test -p convmae-core --release --test integration neighbour_tables_bench -- --ignored --nocapture`
//! (and without RAYON_NUM_THREADS for every core). Results: benches/results/neighbour-tables-<date>.md.

use convmae_core::masking::Masking;
use convmae_core::model::{visible_neighbors, DW_KERNEL};
use convmae_core::rng::Rng;
use convmae_core::ConvMaeConfig;
use convmae_kernels::SparseNeighbors;

/// The table as the model built it before `VisibleTokens`: every visible position listed.
fn from_positions(cfg: &ConvMaeConfig, masking: &Masking, stage: usize) -> SparseNeighbors {
    let (grid, cell) = (cfg.grid(), cfg.stage_cell(stage));
    let mut positions = Vec::with_capacity(masking.ids_keep.len() * cell * cell);
    for (n, &t) in masking.ids_keep.iter().enumerate() {
        let (image, ty, tx) = ((n / masking.len_keep) as u32, t as usize / grid, t as usize % grid);
        for i in 0..cell {
            for j in 0..cell {
                positions.push((image, (ty * cell + i) as u32, (tx * cell + j) as u32));
            }
        }
    }
    let side = grid * cell;
    SparseNeighbors::from_positions(&positions, masking.batch, side, side, DW_KERNEL).unwrap()
}

fn median(mut ms: Vec<f64>) -> f64 {
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

#[test]
#[ignore]
fn neighbour_tables_of_a_convmae_base_step() {
    let cfg = ConvMaeConfig::preset("convmae-base").unwrap();
    let batch = 64;
    for stage in 0..2 {
        let (mut old, mut new) = (Vec::new(), Vec::new());
        for rep in 0..9u64 {
            let masking = Masking::random(&mut Rng::derived(&[7, rep]), batch, cfg.num_tokens(), cfg.len_keep());
            let t0 = std::time::Instant::now();
            let a = from_positions(&cfg, &masking, stage);
            old.push(t0.elapsed().as_secs_f64() * 1e3);
            let t0 = std::time::Instant::now();
            let b = visible_neighbors(&cfg, &masking, stage).unwrap();
            let _ = b.table();
            new.push(t0.elapsed().as_secs_f64() * 1e3);
            assert!(a.table() == b.table());
        }
        println!(
            "stage {}: {} entries; from positions median {:.2} ms, from the mask (host formula) median {:.2} ms, of 9 alternated",
            stage + 1,
            visible_neighbors(&cfg, &Masking::random(&mut Rng::new(1), batch, cfg.num_tokens(), cfg.len_keep()), stage).unwrap().table().len(),
            median(old),
            median(new)
        );
    }
}
