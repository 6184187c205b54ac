//! A branch-free f32 erf (and the exp it needs) that vectorizes, for GELU.
//!
//! Why: GELU called libm's scalar `erff`, whose path for larger |x| also calls `expf`. A
//! pretrained encoder puts many MLP activations there, so fine-tuning ConvMAE from a pretrained
//! checkpoint ran 1.35-1.43x slower per step than the same model from a random init (`npm run
//! bench -- finetune-step`, the old build in benches/results/finetune-step-2026-11-26.md). This
//! version evaluates both ranges with plain multiplies, adds and selects, so the compiler
//! vectorizes whole slices (simd.rs compiles gelu.rs's loops for AVX2 / AVX-512 too).
//!
//! Accuracy: at most 1.14 ulp from the exact erf (mean 0.13 ulp; CUDA's `erff` allows 2);
//! `tools/fit_erf_f32.py` fits the coefficients and measures the f32 evaluation, and the tests
//! below check it against libm's f64 erf. No fused multiply-add is used, so every CPU and vector
//! width computes the same bits. f64 keeps libm's erf (the parity path).

// The fitted coefficients below are written with the digits tools/fit_erf_f32.py prints, more
// than an f32 holds; each literal rounds to the f32 the fit chose.
#![allow(clippy::excessive_precision)]

/// erf(x) = x * P(x^2) for |x| <= SMALL, evaluated as x + x * R(x^2) with R = P - 1: the
/// constant 2/sqrt(pi) rounded to f32 would cost up to half an ulp of every result, and
/// 2/sqrt(pi) - 1 keeps that rounding on the smaller part.
const SMALL: f32 = 0.9;
/// R's coefficients, from x^12 down to the constant.
const R: [f32; 7] = [
    8.513084279e-05,
    -8.175634444e-04,
    5.203858714e-03,
    -2.686050827e-02,
    1.128371503e-01,
    -3.761263498e-01,
    1.283791668e-01,
];
/// erfc(|x|) = exp(Q(|x| - SMALL)) for SMALL < |x| < LARGE; erf(x) rounds to +-1 beyond LARGE.
/// Shifting by SMALL keeps Q's rounding smallest where erfc, and so its weight in the result, is
/// largest.
const LARGE: f32 = 4.0;
const Q: [f32; 12] = [
    2.216259737e-08,
    -4.324985808e-07,
    3.597154320e-06,
    -1.510103254e-05,
    1.375967929e-05,
    2.554717015e-04,
    -2.148747655e-03,
    1.107532571e-02,
    -4.578251196e-02,
    -8.300159135e-01,
    -2.471634087e+00,
    -1.594097246e+00,
];
/// exp(r) on [-ln2/2, ln2/2].
const EXP: [f32; 7] = [1.383680533e-03, 8.374821908e-03, 4.166822663e-02, 1.666642010e-01, 4.999999207e-01, 1.000000036e+00, 1.000000001e+00];

#[inline(always)]
fn horner<const N: usize>(coefs: &[f32; N], u: f32) -> f32 {
    let mut r = coefs[0];
    for &c in &coefs[1..] {
        r = r * u + c;
    }
    r
}

/// exp(y) for y <= 0 (0 below -87, where the result would be subnormal); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_nonpositive(y: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for the n that occur (|n| < 2^9).
    const LN2_HI: f32 = 0.693359375;
    const LN2_LO: f32 = -2.12194440e-4;
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12582912.0;
    let t = y * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (y - n * LN2_HI) - n * LN2_LO;
    let k = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits((k.wrapping_add(127) << 23) as u32);
    let e = horner(&EXP, r) * scale;
    if y < -87.0 {
        0.0
    } else {
        e
    }
}

/// The error function, within 1.14 ulp; odd; +-1 for |x| >= 4; NaN for NaN.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = a * a;
    let small = x + x * horner(&R, t);
    // `q > 0` is false for NaN, which then flows through exp into the result.
    let q = horner(&Q, a - SMALL);
    let q = if q > 0.0 { 0.0 } else { q };
    let large = if a >= LARGE { 1.0 } else { 1.0 - exp_nonpositive(q) };
    if a <= SMALL {
        small
    } else {
        large.copysign(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(got: f32, exact: f64) -> f64 {
        let r = exact as f32;
        let ulp = if r == 0.0 { f32::from_bits(1) as f64 } else { (f32::from_bits(r.abs().to_bits() + 1) - r.abs()) as f64 };
        (got as f64 - exact).abs() / ulp
    }

    #[test]
    fn erf_is_within_one_and_a_half_ulp_of_the_exact_value() {
        let mut worst: (f64, f32) = (0.0, 0.0);
        let mut check = |x: f32| {
            let u = ulps(erf(x), libm::erf(x as f64));
            if u > worst.0 {
                worst = (u, x);
            }
        };
        // Every 64th f32 in [0, 5] and its negation, and a log sweep down to the subnormals.
        let mut bits = 0u32;
        while f32::from_bits(bits) <= 5.0 {
            let x = f32::from_bits(bits);
            check(x);
            check(-x);
            bits += 64;
        }
        for i in 0..2000 {
            check(10f32.powf(-40.0 + i as f32 * 0.02));
        }
        assert!(worst.0 <= 1.5, "erf is off by {:.2} ulp at x = {}", worst.0, worst.1);
    }

    #[test]
    fn erf_edges_and_symmetry() {
        assert_eq!(erf(0.0).to_bits(), 0f32.to_bits());
        assert_eq!(erf(-0.0), 0.0);
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
        assert_eq!(erf(4.0), 1.0);
        assert_eq!(erf(1e30), 1.0);
        assert!(erf(f32::NAN).is_nan());
        for i in 0..1000 {
            let x = i as f32 * 0.0071;
            assert_eq!(erf(-x), -erf(x), "erf is not odd at {x}");
        }
    }

    #[test]
    fn exp_is_within_two_ulp_and_flushes_below_minus_87() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let y = -87.0 * i as f32 / 200_000.0;
            worst = worst.max(ulps(exp_nonpositive(y), (y as f64).exp()));
        }
        assert!(worst <= 2.0, "exp is off by {worst:.2} ulp");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }
}
