//! The host path's cost of normalizing one batch, the pass a GPU step used to wait on (see
//! convmae_kernels::normalize_rgb). Ignored by default; run with
//! `cargo test -p convmae-core --release --test integration normalize_bench -- --ignored --nocapture`
//! (results: benches/results/normalize-<date>.md).

use candle_core::{DType, Device};
use convmae_core::train::{normalize, Batch};

#[test]
#[ignore]
fn host_normalization_of_a_convmae_base_batch() {
    let (b, s) = (64, 224);
    let pixels: Vec<u8> = (0..b * s * s * 3).map(|i| ((i * 2654435761usize) >> 11) as u8).collect();
    let batch = Batch { pixels: &pixels, batch: b, height: s, width: s, channels: 3 };
    let mut ms = Vec::new();
    for _ in 0..7 {
        let t0 = std::time::Instant::now();
        let t = normalize(&batch, DType::F32, &Device::Cpu).unwrap();
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
        assert_eq!(t.dims(), &[b, s, s, 3]);
    }
    ms.sort_by(f64::total_cmp);
    println!("normalize {b} x {s} x {s} x 3 on the host: median {:.1} ms of 7 (min {:.1}, max {:.1})", ms[3], ms[0], ms[6]);
}
