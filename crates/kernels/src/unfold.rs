//! im2col of channels-last maps: `[B, H, W, C]` -> `[B, Ho, Wo, k * k * C]`, the k x k
//! neighbourhood of every output position (stride `s`, zero padding `p`), ordered (row, column,
//! channel) as `conv_weight_rows` orders a kernel. A conv is then one matmul over these rows
//! (`linear`), forward and backward on gemm.
//!
//! Why: candle 0.11's CPU conv2d runs 5 to 9 times slower than the matmul of the same
//! multiply-adds, and its backward 10 to 25 times (3x3 convs of the segmenter's head at batch 8:
//! 58 ms for fwd + bwd of a 256 -> 64 conv on 16 x 16 maps against 2.3 ms for the matmul).
//! The backward of this op is col2im: each row's values added back at their input positions.
//! Our kernel is the CPU's (f32, f64); on other devices and dtypes (a segmenter on CUDA) the op is
//! `composite::unfold`, candle's narrows / index selects and a concatenation.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{row_major, Element};

const OP_NAME: &str = "unfold";

/// Sizes of one unfolding.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Window {
    images: usize,
    height: usize,
    width: usize,
    chans: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl Window {
    fn out_h(&self) -> usize {
        (self.height + 2 * self.pad - self.k) / self.stride + 1
    }
    fn out_w(&self) -> usize {
        (self.width + 2 * self.pad - self.k) / self.stride + 1
    }
    fn row_len(&self) -> usize {
        self.k * self.k * self.chans
    }
    fn image_shape(&self) -> Shape {
        Shape::from_dims(&[self.images, self.height, self.width, self.chans])
    }
    fn rows_shape(&self) -> Shape {
        Shape::from_dims(&[self.images, self.out_h(), self.out_w(), self.row_len()])
    }
    /// The input row and column of tap (i, j) of output (oy, ox), None in the padding.
    fn source(&self, oy: usize, ox: usize, i: usize, j: usize) -> Option<(usize, usize)> {
        let y = (oy * self.stride + i).checked_sub(self.pad)?;
        let x = (ox * self.stride + j).checked_sub(self.pad)?;
        (y < self.height && x < self.width).then_some((y, x))
    }
}

/// The k x k neighbourhoods of `x` ([B, H, W, C]) at `stride` with zero padding `pad`,
/// [B, Ho, Wo, k * k * C]: `out[b, oy, ox, (i * k + j) * C + c] = x[b, oy*s + i - p, ox*s + j - p, c]`
/// (0 outside). Differentiable.
pub fn unfold(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    let (images, height, width, chans) = x.dims4()?;
    if k == 0 || stride == 0 || height + 2 * pad < k || width + 2 * pad < k {
        candle_core::bail!("{OP_NAME}: a {k} x {k} window at stride {stride}, padding {pad}, does not fit input {:?}", x.dims());
    }
    // Our kernel is the CPU's (f32, f64); elsewhere (a CUDA model, a bf16 map) candle's
    // composition of copies, which its autograd differentiates.
    if !(x.device().is_cpu() && crate::has_kernel(x)) {
        return crate::composite::unfold(x, k, stride, pad);
    }
    crate::tape::apply1(x, Unfold { window: Window { images, height, width, chans, k, stride, pad }, fold: false })
}

/// im2col (`fold` false) or its adjoint col2im (`fold` true, the backward).
struct Unfold {
    window: Window,
    fold: bool,
}

fn unfold_rows<T: Element>(src: &[T], w: Window) -> Vec<T> {
    let (c, row) = (w.chans, w.row_len());
    let mut out = vec![T::ZERO; w.images * w.out_h() * w.out_w() * row];
    out.par_chunks_mut(row).enumerate().for_each(|(r, dst)| {
        let (ox, rest) = (r % w.out_w(), r / w.out_w());
        let (oy, b) = (rest % w.out_h(), rest / w.out_h());
        for i in 0..w.k {
            for j in 0..w.k {
                if let Some((y, x)) = w.source(oy, ox, i, j) {
                    let from = ((b * w.height + y) * w.width + x) * c;
                    dst[(i * w.k + j) * c..][..c].copy_from_slice(&src[from..][..c]);
                }
            }
        }
    });
    out
}

/// col2im: every row's taps added at their input positions. Parallel over images, each image's
/// rows in order, so the sums are the same on any thread count.
fn fold_rows<T: Element>(rows: &[T], w: Window) -> Vec<T> {
    let (c, row) = (w.chans, w.row_len());
    let plane = w.height * w.width * c;
    let per_image = w.out_h() * w.out_w() * row;
    let mut out = vec![T::ZERO; w.images * plane];
    out.par_chunks_mut(plane).enumerate().for_each(|(b, image)| {
        let rows = &rows[b * per_image..][..per_image];
        for oy in 0..w.out_h() {
            for ox in 0..w.out_w() {
                let src = &rows[(oy * w.out_w() + ox) * row..][..row];
                for i in 0..w.k {
                    for j in 0..w.k {
                        if let Some((y, x)) = w.source(oy, ox, i, j) {
                            let dst = &mut image[(y * w.width + x) * c..][..c];
                            for (d, v) in dst.iter_mut().zip(&src[(i * w.k + j) * c..][..c]) {
                                *d += *v;
                            }
                        }
                    }
                }
            }
        }
    });
    out
}

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        if self.fold {
            "unfold_backward"
        } else {
            OP_NAME
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (from, to) = if self.fold { (self.window.rows_shape(), self.window.image_shape()) } else { (self.window.image_shape(), self.window.rows_shape()) };
        if l.shape() != &from {
            candle_core::bail!("{}: input {:?}, expected {:?}", self.name(), l.dims(), from.dims());
        }
        let w = self.window;
        let out = dispatch_float!(self.name(), (s => x), {
            let x = row_major(x, l);
            Element::into_storage(if self.fold { fold_rows(&x, w) } else { unfold_rows(&x, w) })
        });
        Ok((out, to))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.apply_op1_no_bwd(&Unfold { window: self.window, fold: !self.fold })?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::rand;
    use candle_core::{DType, Device, Var};

    /// A conv as unfold + matmul equals candle's conv2d (NCHW), forward and both gradients, in
    /// f64, for the strides and paddings the segmenter uses and odd sizes (where candle's own
    /// backward is right: it drops the output padding of a stride-2 conv whose windows leave a
    /// remainder with padding, e.g. 3x3 stride 2 padding 1 on width 4).
    #[test]
    fn unfold_then_matmul_is_conv2d() {
        for (b, h, w, c, o, k, stride, pad) in [(2usize, 7usize, 5usize, 3usize, 4usize, 3usize, 1usize, 1usize), (1, 8, 8, 2, 3, 3, 2, 0), (2, 6, 9, 4, 2, 1, 1, 0), (1, 5, 5, 3, 2, 3, 2, 1)] {
            let x = Var::from_tensor(&rand(&[b, h, w, c], 1)).unwrap();
            let weight = Var::from_tensor(&rand(&[o, c, k, k], 2)).unwrap();
            let ours = {
                let rows = unfold(x.as_tensor(), k, stride, pad).unwrap();
                let kernel = weight.as_tensor().permute((0, 2, 3, 1)).unwrap().contiguous().unwrap().reshape((o, k * k * c)).unwrap();
                rows.broadcast_matmul(&kernel.t().unwrap()).unwrap()
            };
            let theirs = x.as_tensor().permute((0, 3, 1, 2)).unwrap().conv2d(weight.as_tensor(), pad, stride, 1, 1).unwrap().permute((0, 2, 3, 1)).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let cot = rand(ours.dims(), 3);
            crate::test_util::assert_same_function(ours, theirs, &cot, &[("x", &x), ("weight", &weight)], 1e-12);
        }
    }

    /// The composition (what a CUDA segmenter runs) is our kernel's function: the same rows,
    /// and the same gradient, for the strides, paddings and kernel sizes the segmenter uses.
    #[test]
    fn the_composition_is_the_kernel() {
        use crate::composite::{with_path, Path};
        for (b, h, w, c, k, stride, pad) in [(2usize, 7usize, 5usize, 3usize, 3usize, 1usize, 1usize), (1, 8, 8, 2, 3, 2, 0), (2, 6, 9, 4, 1, 1, 0), (1, 5, 5, 3, 3, 2, 1), (2, 4, 6, 2, 3, 2, 1)] {
            let x = Var::from_tensor(&rand(&[b, h, w, c], 6)).unwrap();
            let kernel = with_path(Path::Kernels, || unfold(x.as_tensor(), k, stride, pad)).unwrap();
            let composed = with_path(Path::Composite, || unfold(x.as_tensor(), k, stride, pad)).unwrap();
            assert_eq!(kernel.flatten_all().unwrap().to_vec1::<f64>().unwrap(), composed.flatten_all().unwrap().to_vec1::<f64>().unwrap(), "rows of ({b}, {h}, {w}, {c}) k {k} s {stride} p {pad}");
            let cot = rand(kernel.dims(), 7);
            crate::test_util::assert_same_function(kernel, composed, &cot, &[("x", &x)], 1e-12);
        }
        // bf16 has no kernel of ours on the CPU: the composition serves it, the same copies.
        let x = rand(&[1, 5, 4, 3], 8);
        let half = unfold(&x.to_dtype(DType::BF16).unwrap(), 3, 2, 1).unwrap();
        assert_eq!(half.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap(), unfold(&x.to_dtype(DType::BF16).unwrap().to_dtype(DType::F64).unwrap(), 3, 2, 1).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap());
    }

    /// col2im is the adjoint of im2col: <unfold(x), r> = <x, fold(r)> for random x and r.
    #[test]
    fn fold_is_the_adjoint() {
        let x = rand(&[2, 6, 5, 3], 4);
        let rows = unfold(&x, 3, 2, 1).unwrap();
        let r = rand(rows.dims(), 5);
        let folded = r.apply_op1_no_bwd(&Unfold { window: Window { images: 2, height: 6, width: 5, chans: 3, k: 3, stride: 2, pad: 1 }, fold: true }).unwrap();
        let lhs = (rows * &r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let rhs = (x * folded).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert!((lhs - rhs).abs() < 1e-12 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
        let e = unfold(&Tensor::zeros((1, 2, 2, 1), DType::F32, &Device::Cpu).unwrap(), 3, 1, 0).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
    }
}
