//! The host's own work in a pretraining step, apart from the arithmetic: ConvMAE-B's structure
//! (its depths, heads and every op of its graph) at widths and an image so small that the CPU's
//! compute is a small part of the step, on the path a CUDA bf16 step takes (packed copies, every
//! sublayer one op, in chains, the backward on the tape), here in f32 on the CPU. What it times is
//! building the graph and the tape, our ops' checks and dispatch, allocation, and candle's or the
//! tape's backward walk: a floor under the host time of a GPU step, whose launches and device
//! allocations come on top. The forward and both backwards (the tape's and candle's, alternated)
//! are timed apart, and the graph's op count is printed, so the two can be set against run 7's
//! host-time table. Ignored by default; run with
//! `cargo test -p convmae-core --release --test integration host_overhead_bench -- --ignored --nocapture`.
//! Results: benches/results/host-overhead-<date>.md.

use std::time::Instant;

use crate::common;

use candle_core::{Device, Tensor};
use common::{env_count, median, packed_f32_model};
use convmae_core::masking::Masking;
use convmae_core::rng::Rng;
use convmae_core::ConvMaeConfig;

/// ConvMAE-B's depths, with one head of 8 channels everywhere and a 32-px image (a 2 x 2
/// stage-3 grid, one visible token an image): the same ops in the same number as ConvMAE-B's
/// step (an attention is one op whatever its heads), with as little arithmetic as they allow.
fn convmae_b_structure() -> ConvMaeConfig {
    let base = ConvMaeConfig::base();
    ConvMaeConfig { img_size: 32, embed_dim: [8, 8, 8], num_heads: 1, decoder_embed_dim: 8, decoder_num_heads: 1, ..base }
}

#[test]
#[ignore]
fn host_work_of_a_convmae_b_shaped_step() {
    let cfg = convmae_b_structure();
    cfg.validate().unwrap();
    let (batch, pairs) = (env_count("BATCH", 32), env_count("PAIRS", 40));
    let model = packed_f32_model(&cfg);
    let imgs = Tensor::randn(0f32, 1.0, (batch, cfg.img_size, cfg.img_size, 3), &Device::Cpu).unwrap();
    let mut rng = Rng::new(3);
    let (mut forward_ms, mut tape_ms, mut candle_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut graph_ops = 0;
    for pair in 0..pairs + 2 {
        let masking = Masking::random(&mut rng, batch, cfg.num_tokens(), cfg.len_keep());
        for candle_backward in [pair % 2 == 1, pair % 2 == 0] {
            let run = || {
                let started = Instant::now();
                let out = model.forward_pretrain(&imgs, &masking).unwrap();
                let forward = started.elapsed().as_secs_f64() * 1e3;
                assert_eq!(out.backward_by_tape(), !candle_backward, "batch {batch}: the tape must cover this graph");
                let started = Instant::now();
                let grads = out.backward_scaled(1.0).unwrap();
                let backward = started.elapsed().as_secs_f64() * 1e3;
                let ops = out.loss.sorted_nodes().iter().filter(|n| !n.is_variable()).count();
                drop(grads);
                (forward, backward, ops)
            };
            let (forward, backward, ops) =
                if candle_backward { convmae_kernels::with_composite_ops(&["tape_backward"], run) } else { run() };
            graph_ops = ops;
            // The first two pairs warm the allocator and the caches.
            if pair < 2 {
                continue;
            }
            forward_ms.push(forward);
            if candle_backward { candle_ms.push(backward) } else { tape_ms.push(backward) }
        }
    }
    let (f, t, c) = (median(forward_ms), median(tape_ms), median(candle_ms));
    eprintln!(
        "ConvMAE-B's structure at widths {:?} / decoder {}, {} px, batch {batch}: {graph_ops} ops in the loss's graph; medians of {pairs} pairs: forward {f:.2} ms, backward on the tape {t:.2} ms, candle's backward {c:.2} ms (tape / candle {:.3})",
        cfg.embed_dim,
        cfg.decoder_embed_dim,
        cfg.img_size,
        t / c
    );
}
