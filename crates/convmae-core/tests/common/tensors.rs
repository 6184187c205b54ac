//! Tensor helpers of the tests: relative error, values out, layouts, random inputs and a
//! scratch folder.

use candle_core::{DType, Device, Tensor};
use convmae_core::rng::Rng;

/// max|a - b| / max|b| (max|a - b| where b is all zeros), in f64 tensors.
pub fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    let m = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    if m > 0.0 {
        d / m
    } else {
        d
    }
}

pub fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

pub fn nhwc(x: &Tensor) -> Tensor {
    x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap()
}

pub fn nchw(x: &Tensor) -> Tensor {
    x.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap()
}

/// Standard normal f64 values of `shape`, a pure function of `seed`.
pub fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.normal()).collect::<Vec<f64>>(), shape, &Device::Cpu).unwrap()
}

/// `name` in a scratch folder of this test process, `suite` naming the test crate.
pub fn tmp(suite: &str, name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("convmae-{suite}-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}
