//! Depthwise 2-D convolution on channels-last tensors.
//!
//! Channels-last makes the channel axis contiguous, and in a depthwise convolution every
//! channel is independent, so each tap is an element-wise multiply-add across C lanes. The
//! kernels keep a block of `LANES` channel accumulators in registers while they walk the taps
//! (forward) or the image row (weight gradient), so each multiply-add costs two loads and no
//! store; that is what lets the compiler's auto-vectorisation pay off.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{row_major, Element};

use crate::taps::{channel_major, mac, taps_major, LANES};

const OP_NAME: &str = "depthwise_conv2d";

/// Image rows (b, y) per partial sum of the weight gradient. The partition depends only on
/// the shape, never on the number of threads, and partials are added in index order, so the
/// weight gradient is bitwise reproducible whatever rayon's scheduling does.
const ROWS_PER_PARTIAL: usize = 4;

#[derive(Clone, Copy, Debug)]
struct Geometry {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
}

impl Geometry {
    /// (B, H, W, C, K), as the CUDA launches take them.
    #[cfg(feature = "cuda")]
    fn dims(&self) -> (usize, usize, usize, usize, usize) {
        (self.b, self.h, self.w, self.c, self.k)
    }

    fn pad(&self) -> usize {
        self.k / 2
    }

    /// Output columns `x` for which the input column `x + j - pad` lies inside the image.
    fn valid_x(&self, j: usize) -> std::ops::Range<usize> {
        let p = self.pad();
        let start = p.saturating_sub(j).min(self.w);
        let end = (self.w + p).saturating_sub(j).min(self.w);
        start..end.max(start)
    }

    /// Input row read by output row `y` through tap row `i`, if inside the image.
    fn input_row(&self, y: usize, i: usize) -> Option<usize> {
        let yy = y + i;
        let p = self.pad();
        (yy >= p && yy - p < self.h).then(|| yy - p)
    }
}

fn geometry(input: &[usize], weight: &[usize]) -> Result<Geometry> {
    match (input, weight) {
        (&[b, h, w, c], &[wc, k, k2]) if wc == c && k == k2 && k % 2 == 1 => {
            Ok(Geometry { b, h, w, c, k })
        }
        _ => Err(candle_core::Error::Msg(format!(
            "{OP_NAME}: input shape {input:?} and weight shape {weight:?} do not match; expected \
             input [B, H, W, C] and weight [C, K, K] with the same C and an odd K"
        ))
        .bt()),
    }
}

/// Differentiable depthwise 2-D convolution (PyTorch `Conv2d` with `groups = channels`,
/// stride 1, zero padding `K / 2`, no bias) on channels-last tensors.
///
/// `input` is `[B, H, W, C]`, `weight` is `[C, K, K]` with `K` odd; the result is
/// `[B, H, W, C]` with `out[b,y,x,c] = sum_{i,j} weight[c,i,j] * input[b, y+i-K/2, x+j-K/2, c]`,
/// taps outside the image reading zero.
pub fn depthwise_conv2d(input: &Tensor, weight: &Tensor) -> Result<Tensor> {
    // Checked here as well as in `cpu_fwd` so that a bad call fails with our message on every
    // device, not only where a kernel exists.
    geometry(input.dims(), weight.dims())?;
    if !crate::composite::use_kernel(&[input, weight]) {
        return crate::composite::depthwise_conv2d(input, weight);
    }
    crate::tape::apply2(input, weight, DepthwiseConv2d)
}

struct DepthwiseConv2d;

impl CustomOp2 for DepthwiseConv2d {
    fn name(&self) -> &'static str {
        OP_NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = geometry(l1.dims(), l2.dims())?;
        let out = dispatch_float!(OP_NAME, (s1 => x, s2 => wt), {
            let taps = taps_major(&row_major(wt, l2), g.c, g.k, false);
            Element::into_storage(correlate(&row_major(x, l1), &taps, g))
        });
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, dw_correlate};
        use candle_core::backend::BackendStorage;
        let g = geometry(l1.dims(), l2.dims())?;
        let out = cuda_dispatch!(OP_NAME, s1.dtype(), dw_correlate(s1, l1, s2, l2, g.dims(), false))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        input: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Each gradient is a full pass over the image; skip the one nobody will read (e.g. the
        // input gradient of a first layer, or a frozen weight).
        let grad_input = if input.track_op() {
            Some(grad.apply_op2_no_bwd(weight, &InputGrad)?)
        } else {
            None
        };
        let grad_weight = if weight.track_op() {
            Some(input.apply_op2_no_bwd(grad, &WeightGrad { k: weight.dim(1)? })?)
        } else {
            None
        };
        Ok((grad_input, grad_weight))
    }
}

/// `(grad_out [B,H,W,C], weight [C,K,K]) -> grad_input [B,H,W,C]`.
///
/// The adjoint of a zero-padded correlation with an odd kernel and padding K/2 is the same
/// correlation with the kernel rotated by 180 degrees, so this reuses the forward kernel.
struct InputGrad;

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "depthwise_conv2d_input_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = geometry(l1.dims(), l2.dims())?;
        let out = dispatch_float!(self.name(), (s1 => grad, s2 => wt), {
            let taps = taps_major(&row_major(wt, l2), g.c, g.k, true);
            Element::into_storage(correlate(&row_major(grad, l1), &taps, g))
        });
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, dw_correlate};
        use candle_core::backend::BackendStorage;
        let g = geometry(l1.dims(), l2.dims())?;
        let out = cuda_dispatch!(self.name(), s1.dtype(), dw_correlate(s1, l1, s2, l2, g.dims(), true))?;
        Ok((out, l1.shape().clone()))
    }
}

/// `(input [B,H,W,C], grad_out [B,H,W,C]) -> grad_weight [C,K,K]`.
struct WeightGrad {
    k: usize,
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "depthwise_conv2d_weight_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(l1.dims(), l2.dims())?;
        let out = dispatch_float!(self.name(), (s1 => x, s2 => gout), {
            let kkc = weight_grad(&row_major(x, l1), &row_major(gout, l2), g);
            Element::into_storage(channel_major(&kkc, g.c, g.k))
        });
        Ok((out, Shape::from_dims(&[g.c, g.k, g.k])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, dw_weight_grad};
        use candle_core::backend::BackendStorage;
        let g = self.geometry(l1.dims(), l2.dims())?;
        let out = cuda_dispatch!(self.name(), s1.dtype(), dw_weight_grad(s1, l1, s2, l2, g.dims()))?;
        Ok((out, Shape::from_dims(&[g.c, g.k, g.k])))
    }
}

impl WeightGrad {
    fn geometry(&self, input: &[usize], grad: &[usize]) -> Result<Geometry> {
        if input != grad || input.len() != 4 || self.k.is_multiple_of(2) {
            candle_core::bail!(
                "{}: input shape {input:?} and output-gradient shape {grad:?} must be the same \
                 [B, H, W, C] (kernel size {})",
                self.name(),
                self.k
            );
        }
        Ok(Geometry { b: input[0], h: input[1], w: input[2], c: input[3], k: self.k })
    }
}

/// `out[b,y,x,c] = sum_{i,j} taps[i,j,c] * inp[b, y+i-p, x+j-p, c]`, parallel over image rows.
fn correlate<T: Element>(inp: &[T], taps: &[T], g: Geometry) -> Vec<T> {
    let Geometry { h, w, c, k, .. } = g;
    let p = g.pad();
    let row_len = w * c;
    let mut out = vec![T::ZERO; g.b * h * row_len];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(row_len).enumerate().for_each(|(r, out_row)| {
        let (bi, y) = (r / h, r % h);
        let in_rows: Vec<(usize, &[T])> = (0..k)
            .filter_map(|i| {
                let yy = g.input_row(y, i)?;
                Some((i, &inp[(bi * h + yy) * row_len..][..row_len]))
            })
            .collect();
        for x in 0..w {
            // Taps j with x + j - p inside [0, w).
            let j_start = p.saturating_sub(x);
            let j_end = k.min(w + p - x);
            let out_px = &mut out_row[x * c..][..c];
            let mut cb = 0;
            while cb + LANES <= c {
                let mut acc = [T::ZERO; LANES];
                for &(i, in_row) in &in_rows {
                    for j in j_start..j_end {
                        let a = &in_row[(x + j - p) * c + cb..][..LANES];
                        let t = &taps[(i * k + j) * c + cb..][..LANES];
                        mac(&mut acc, a, t);
                    }
                }
                out_px[cb..cb + LANES].copy_from_slice(&acc);
                cb += LANES;
            }
            if cb < c {
                // Channel tail (C not a multiple of LANES); `out_px` starts at zero.
                for &(i, in_row) in &in_rows {
                    for j in j_start..j_end {
                        let a = &in_row[(x + j - p) * c..][..c];
                        let t = &taps[(i * k + j) * c..][..c];
                        for ch in cb..c {
                            out_px[ch] += a[ch] * t[ch];
                        }
                    }
                }
            }
        }
    });
    out
}

/// `gw[i,j,c] = sum_{b,y,x} gout[b,y,x,c] * inp[b, y+i-p, x+j-p, c]`, as `[K, K, C]`.
fn weight_grad<T: Element>(inp: &[T], gout: &[T], g: Geometry) -> Vec<T> {
    let Geometry { h, w, c, k, .. } = g;
    let p = g.pad();
    let row_len = w * c;
    let kkc = k * k * c;
    let n_rows = g.b * h;
    if kkc == 0 || row_len == 0 || n_rows == 0 {
        return vec![T::ZERO; kkc];
    }
    let partials: Vec<Vec<T>> = (0..n_rows.div_ceil(ROWS_PER_PARTIAL))
        .into_par_iter()
        .map(|part| {
            let mut acc = vec![T::ZERO; kkc];
            let rows = part * ROWS_PER_PARTIAL..((part + 1) * ROWS_PER_PARTIAL).min(n_rows);
            for r in rows {
                let (bi, y) = (r / h, r % h);
                let g_row = &gout[r * row_len..][..row_len];
                let in_rows: Vec<(usize, &[T])> = (0..k)
                    .filter_map(|i| {
                        let yy = g.input_row(y, i)?;
                        Some((i, &inp[(bi * h + yy) * row_len..][..row_len]))
                    })
                    .collect();
                // Channel block outermost: one block of the gradient row and of the input rows
                // (one cache line each per pixel) stays in L1 while all K*K taps sweep it.
                let mut cb = 0;
                while cb + LANES <= c {
                    for &(i, in_row) in &in_rows {
                        for j in 0..k {
                            let mut s = [T::ZERO; LANES];
                            for x in g.valid_x(j) {
                                let gv = &g_row[x * c + cb..][..LANES];
                                let a = &in_row[(x + j - p) * c + cb..][..LANES];
                                mac(&mut s, gv, a);
                            }
                            let dst = &mut acc[(i * k + j) * c + cb..][..LANES];
                            for l in 0..LANES {
                                dst[l] += s[l];
                            }
                        }
                    }
                    cb += LANES;
                }
                if cb < c {
                    for &(i, in_row) in &in_rows {
                        for j in 0..k {
                            let dst = &mut acc[(i * k + j) * c..][..c];
                            for x in g.valid_x(j) {
                                let gv = &g_row[x * c..][..c];
                                let a = &in_row[(x + j - p) * c..][..c];
                                for ch in cb..c {
                                    dst[ch] += gv[ch] * a[ch];
                                }
                            }
                        }
                    }
                }
            }
            acc
        })
        .collect();
    crate::sum_partials(&partials, kkc)
}
