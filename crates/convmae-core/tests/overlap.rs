//! Overlapped steps (`Pretrainer::start_step`): the same answers and weights as steps taken one
//! at a time, and a non-finite loss that fails its step, drops the step launched behind it and
//! leaves the state as before it. On the CPU the update's condition is checked on the host;
//! the control flow is the one a GPU runs.

use candle_core::{DType, Device, Tensor};
use convmae_core::optim::AdamWConfig;
use convmae_core::train::{Batch, Pretrainer, StepOptions, StepStats};
use convmae_core::{ConvMae, ConvMaeConfig};

fn pretrainer(seed: u64) -> Pretrainer {
    let model = ConvMae::new(ConvMaeConfig::golden_small(), DType::F32, &Device::Cpu, seed).unwrap();
    Pretrainer::new(model, AdamWConfig::default(), seed).unwrap()
}

fn images(p: &Pretrainer, batch: usize, salt: usize) -> Vec<u8> {
    let s = p.model.cfg.img_size;
    (0..batch * s * s * 3).map(|i| ((i * 131 + salt * 977 + 7) % 251) as u8).collect()
}

fn batch<'a>(p: &Pretrainer, pixels: &'a [u8], batch: usize) -> Batch<'a> {
    let s = p.model.cfg.img_size;
    Batch { pixels, batch, height: s, width: s, channels: 3 }
}

fn weights(p: &Pretrainer) -> Vec<(String, Vec<f32>)> {
    p.model.params.iter().map(|q| (q.spec.name.clone(), q.tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

/// Starts every step before settling the one before it, as the worker does when the caller
/// keeps two steps queued; returns the answers in order.
fn overlapped(p: &mut Pretrainer, steps: &[(Vec<u8>, StepOptions)], b: usize) -> Vec<Result<StepStats, String>> {
    let mut answers = Vec::new();
    let mut in_flight = 0;
    for (pixels, opts) in steps {
        let own = p.start_step(&batch(p, pixels, b), opts);
        while let Some(r) = p.take_settled() {
            answers.push(r.map_err(|e| e.to_string()));
            in_flight -= 1;
        }
        match own {
            None => in_flight += 1,
            Some(r) => answers.push(r.map_err(|e| e.to_string())),
        }
        assert!(in_flight <= 1, "at most one step in flight");
    }
    p.settle_in_flight();
    while let Some(r) = p.take_settled() {
        answers.push(r.map_err(|e| e.to_string()));
    }
    answers
}

#[test]
fn overlapped_steps_match_steps_taken_one_at_a_time() {
    for accum_steps in [1, 2] {
        let (mut one, mut two) = (pretrainer(3), pretrainer(3));
        let b = 2;
        let steps: Vec<(Vec<u8>, StepOptions)> =
            (0..5).map(|k| (images(&one, b, k), StepOptions { lr: 1e-3 * (k + 1) as f64, accum_steps, noise: None })).collect();
        let want: Vec<StepStats> = steps.iter().map(|(px, o)| one.step(&batch(&one, px, b), o).unwrap()).collect();
        let got = overlapped(&mut two, &steps, b);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            let g = g.as_ref().unwrap();
            assert_eq!(g.loss.to_bits(), w.loss.to_bits(), "accum {accum_steps}: loss");
            assert_eq!((g.micro_step, g.optimizer_step, g.updated), (w.micro_step, w.optimizer_step, w.updated));
        }
        assert_eq!(weights(&one), weights(&two), "accum {accum_steps}: weights after the steps");
        assert_eq!(one.has_pending_gradients(), two.has_pending_gradients());
    }
}

#[test]
fn a_non_finite_loss_fails_its_step_and_the_one_launched_behind_it() {
    let mut p = pretrainer(5);
    let b = 2;
    let opts = |lr: f64| StepOptions { lr, accum_steps: 1, noise: None };
    // Step 1 is fine but its lr throws the weights to ~1e30, so step 2's loss is not finite.
    let first = p.step(&batch(&p, &images(&p, b, 0), b), &opts(1e30)).unwrap();
    assert!(first.loss.is_finite());
    let (after_first, moments_after_first) = (weights(&p), moments(&p));
    let steps: Vec<(Vec<u8>, StepOptions)> = (1..4).map(|k| (images(&p, b, k), opts(1e-3))).collect();
    let answers = overlapped(&mut p, &steps, b);
    let e2 = answers[0].as_ref().unwrap_err();
    assert!(e2.starts_with("loss is") && e2.contains("weights were not updated"), "{e2}");
    let e3 = answers[1].as_ref().unwrap_err();
    assert!(e3.contains("was not applied") && e3.contains("the one before it failed"), "{e3}");
    // Step 4 starts after the failure was reported: it runs, on step 1's weights, and fails again.
    assert!(answers[2].as_ref().unwrap_err().starts_with("loss is"));
    assert_eq!((p.micro_step, p.optimizer.step), (1, 1), "counters as after step 1");
    assert!(!p.has_pending_gradients());
    assert_eq!(weights(&p), after_first, "weights as after step 1");
    assert_eq!(moments(&p), moments_after_first, "moments as after step 1");
}

fn moments(p: &Pretrainer) -> Vec<Vec<f32>> {
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    p.optimizer.moments.iter().flat_map(|m| [flat(&m.exp_avg), flat(&m.exp_avg_sq)]).collect()
}
