//! The pretraining backward on the tape (`PretrainOutput::backward_scaled`) against candle's
//! backward of the same forward (`CONVMAE_COMPOSITE_OPS=tape_backward`'s path), ConvMAE-B on
//! the CPU with packed f32 copies (the path the tape covers: every sublayer one op, in chains)
//! at batch 32, the two alternated, the forward untimed. What the CPU shows is the tape's
//! saving in memory traffic and allocation (candle's zero-filled gradients and their adds);
//! a GPU step saves those launches too. Ignored by default; run with
//! `cargo test -p convmae-core --release --test integration tape_backward_bench -- --ignored --nocapture`.
//! Results: benches/results/tape-backward-<date>.md.

use std::time::Instant;

use crate::common;

use candle_core::{Device, Tensor};
use common::{env_count, median, packed_f32_model};
use convmae_core::masking::Masking;
use convmae_core::rng::Rng;
use convmae_core::ConvMaeConfig;

#[test]
#[ignore]
fn tape_backward_of_a_convmae_base_step() {
    let cfg = ConvMaeConfig::preset("convmae-base").unwrap();
    let (batch, pairs) = (env_count("BATCH", 32), env_count("PAIRS", 5));
    let model = packed_f32_model(&cfg);
    let imgs = Tensor::randn(0f32, 1.0, (batch, cfg.img_size, cfg.img_size, 3), &Device::Cpu).unwrap();
    let mut rng = Rng::new(3);
    let (mut tape_ms, mut candle_ms) = (Vec::new(), Vec::new());
    for pair in 0..pairs {
        let masking = Masking::random(&mut rng, batch, cfg.num_tokens(), cfg.len_keep());
        let mut grads = Vec::new();
        for candle_backward in [pair % 2 == 1, pair % 2 == 0] {
            let run = || {
                let out = model.forward_pretrain(&imgs, &masking).unwrap();
                assert_eq!(out.backward_by_tape(), !candle_backward, "batch {batch}: the tape must cover the graph (batch 32 and up)");
                let started = Instant::now();
                let g = out.backward_scaled(1.0).unwrap();
                let ms = started.elapsed().as_secs_f64() * 1e3;
                let values: Vec<Vec<f32>> = model.params.gradients(&g).unwrap().iter().map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
                (ms, values)
            };
            let (ms, values) = if candle_backward { convmae_kernels::with_composite_ops(&["tape_backward"], run) } else { run() };
            if candle_backward { candle_ms.push(ms) } else { tape_ms.push(ms) }
            eprintln!("pair {pair}: {} backward {ms:.0} ms", if candle_backward { "candle's" } else { "tape" });
            grads.push(values);
        }
        assert!(grads[0] == grads[1], "pair {pair}: the two backwards differ");
    }
    let (t, c) = (median(tape_ms), median(candle_ms));
    eprintln!("ConvMAE-B batch {batch}, backward, medians of {pairs}: tape {t:.0} ms, candle {c:.0} ms, tape / candle {:.3}", t / c);
}
