//! Timings at ConvMAE-B shapes. Ignored by default; run with
//! `cargo test -p convmae-kernels --release -- --ignored --nocapture bench`.

use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use convmae_kernels::{depthwise_conv2d, layer_norm, softmax_last_dim};

use crate::common::*;

const ITERS: usize = 5;

/// Times `f` (after one warm-up call) and returns the mean in milliseconds.
fn time_ms(mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    for _ in 0..ITERS {
        f();
    }
    start.elapsed().as_secs_f64() * 1e3 / ITERS as f64
}

fn random(shape: &[usize], seed: u64) -> Var {
    let n = shape.iter().product();
    Var::from_tensor(&tensor(&Rng::new(seed).values(n, 1.0, DType::F32), shape, DType::F32)).unwrap()
}

/// Times the op alone and the op plus its backward (seeded with ones).
fn report(name: &str, f: impl Fn() -> Tensor) {
    let fwd = time_ms(|| {
        f();
    });
    let fwd_bwd = time_ms(|| {
        f().backward().unwrap();
    });
    println!(
        "{name}: forward {fwd:.1} ms, forward+backward {fwd_bwd:.1} ms (backward ~{:.1} ms), {} threads",
        fwd_bwd - fwd,
        rayon::current_num_threads()
    );
}

#[test]
#[ignore]
fn bench_convmae_b_shapes() {
    for (b, h, w, c) in [(8, 56, 56, 256), (8, 28, 28, 384)] {
        let x = random(&[b, h, w, c], 1);
        let wt = random(&[c, 5, 5], 2);
        report(&format!("depthwise_conv2d f32 [{b},{h},{w},{c}] K=5"), || {
            depthwise_conv2d(x.as_tensor(), wt.as_tensor()).unwrap()
        });
        // Each gradient alone: the other argument is a constant, so its gradient is skipped.
        let (x_const, wt_const) = (x.as_tensor().detach(), wt.as_tensor().detach());
        report("  grad input only", || depthwise_conv2d(x.as_tensor(), &wt_const).unwrap());
        report("  grad weight only", || depthwise_conv2d(&x_const, wt.as_tensor()).unwrap());
    }
    let x = random(&[8, 56 * 56, 256], 3);
    let (g, bias) = (random(&[256], 4), random(&[256], 5));
    report("layer_norm f32 [8,3136,256]", || {
        layer_norm(x.as_tensor(), g.as_tensor(), bias.as_tensor(), 1e-6).unwrap()
    });
    let x = random(&[8, 12, 196, 196], 6);
    report("softmax_last_dim f32 [8,12,196,196]", || softmax_last_dim(x.as_tensor()).unwrap());
}

