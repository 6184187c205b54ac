//! Pieces shared by the dense and sparse depthwise conv kernels: the channel block and the
//! weight layouts their inner loops want.

use crate::Element;

/// Channel block held in registers: 16 f32 is four SSE / two AVX registers, 16 f64 eight SSE
/// registers, leaving room for the operands without spilling.
pub(crate) const LANES: usize = 16;

/// Rearranges a `[C, K, K]` depthwise weight into `[K*K, C]`, so one tap's weights for all
/// channels are contiguous like the channels-last rows; `rotate` turns the kernel by 180 degrees
/// (tap `t` takes the weight of tap `K*K-1-t`), which the input gradient needs.
pub(crate) fn taps_major<T: Element>(weight: &[T], c: usize, k: usize, rotate: bool) -> Vec<T> {
    let kk = k * k;
    let mut taps = vec![T::ZERO; kk * c];
    for ch in 0..c {
        for t in 0..kk {
            let src = if rotate { kk - 1 - t } else { t };
            taps[t * c + ch] = weight[ch * kk + src];
        }
    }
    taps
}

/// The inverse of `taps_major` without rotation: `[K*K, C]` back to the `[C, K, K]` weight layout.
pub(crate) fn channel_major<T: Element>(tc: &[T], c: usize, k: usize) -> Vec<T> {
    let kk = k * k;
    let mut ckk = vec![T::ZERO; c * kk];
    for t in 0..kk {
        for ch in 0..c {
            ckk[ch * kk + t] = tc[t * c + ch];
        }
    }
    ckk
}

/// acc += a * b over one block of LANES channels.
#[inline(always)]
pub(crate) fn mac<T: Element>(acc: &mut [T; LANES], a: &[T], b: &[T]) {
    let a: &[T; LANES] = a.try_into().expect("block of LANES");
    let b: &[T; LANES] = b.try_into().expect("block of LANES");
    for l in 0..LANES {
        acc[l] += a[l] * b[l];
    }
}
