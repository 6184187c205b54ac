//! Test helpers: a seeded PRNG, tensor conversions, autograd and finite-difference drivers.

use candle_core::{DType, Device, Result, Tensor, Var};

/// SplitMix64: tiny, seedable, and good enough for test data; avoids a `rand` dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    /// `n` values in [-scale, scale), rounded to f32 when `dtype` is f32 so that the f64
    /// reference sees exactly the values the kernel sees.
    pub fn values(&mut self, n: usize, scale: f64, dtype: DType) -> Vec<f64> {
        (0..n).map(|_| round_to(self.uniform() * scale, dtype)).collect()
    }
}

pub fn round_to(v: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F32 => v as f32 as f64,
        _ => v,
    }
}

pub fn tensor(data: &[f64], shape: &[usize], dtype: DType) -> Tensor {
    let t = match dtype {
        DType::F32 => {
            let v: Vec<f32> = data.iter().map(|&x| x as f32).collect();
            Tensor::from_vec(v, shape, &Device::Cpu)
        }
        DType::F64 => Tensor::from_vec(data.to_vec(), shape, &Device::Cpu),
        other => panic!("test helper does not build {other:?} tensors"),
    };
    t.unwrap()
}

pub fn values_of(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Fails unless `max |actual - expected| <= rtol * max |expected|` (a norm-wise relative
/// error, which stays meaningful for entries that happen to be close to zero).
pub fn assert_close(actual: &[f64], expected: &[f64], rtol: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let err = (a - e).abs();
        if err > worst || err.is_nan() {
            worst = err;
            at = i;
        }
    }
    let rel = worst / scale;
    assert!(
        rel <= rtol,
        "{what}: relative error {rel:e} > {rtol:e} at index {at} (actual {}, expected {}, scale {scale})",
        actual[at],
        expected[at]
    );
}

/// An input of a test: its values and shape.
pub type Input = (Vec<f64>, Vec<usize>);

/// Evaluates `f` on Vars holding `inputs`, then backpropagates `sum(out * cotangent)`.
/// Returns the output values and the gradient of every input.
pub fn forward_backward(
    inputs: &[Input],
    dtype: DType,
    cotangent: &[f64],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|(v, s)| Var::from_tensor(&tensor(v, s, dtype)).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&tensors).unwrap();
    let cot = tensor(cotangent, out.dims(), dtype);
    let grads = (&out * &cot).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = tensors
        .iter()
        .map(|t| {
            let g = grads.get(t).expect("every Var input gets a gradient");
            assert_eq!(g.dims(), t.dims(), "gradient shape");
            assert_eq!(g.dtype(), dtype, "gradient dtype");
            values_of(g)
        })
        .collect();
    (values_of(&out), grads)
}

/// Central finite differences of `sum(f(inputs) * cotangent)` in f64 for every input entry.
pub fn finite_differences(
    inputs: &[Input],
    cotangent: &[f64],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Vec<Vec<f64>> {
    let h = 1e-5;
    let loss = |inputs: &[Input]| -> f64 {
        let ts: Vec<Tensor> = inputs.iter().map(|(v, s)| tensor(v, s, DType::F64)).collect();
        let out = values_of(&f(&ts).unwrap());
        out.iter().zip(cotangent).map(|(o, c)| o * c).sum()
    };
    let mut work = inputs.to_vec();
    (0..inputs.len())
        .map(|a| {
            (0..inputs[a].0.len())
                .map(|i| {
                    let orig = work[a].0[i];
                    work[a].0[i] = orig + h;
                    let plus = loss(&work);
                    work[a].0[i] = orig - h;
                    let minus = loss(&work);
                    work[a].0[i] = orig;
                    (plus - minus) / (2.0 * h)
                })
                .collect()
        })
        .collect()
}

/// Runs `f` inside a rayon pool of exactly `threads` threads.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
}

pub fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

pub fn error_text(r: Result<Tensor>) -> String {
    match r {
        Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.dims()),
        Err(e) => e.to_string(),
    }
}
