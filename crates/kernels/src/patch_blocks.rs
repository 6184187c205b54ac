//! The patch layout of channels-last maps: `[B, H, W, C]` -> `[B, H/k, W/k, k, k, C]`, each
//! k x k patch contiguous, ordered (row, column, channel). ConvMAE cuts its maps this way three
//! times: the images into their 16-pixel token blocks (the sparse path), a stage's map into the
//! windows of the next patch embedding or fusion conv (`patch_conv`, a matmul over patches), and
//! the images into MAE's target patches.
//!
//! As candle's ops it is a reshape, a permute and a contiguous copy, whose backward hands its
//! input a permuted (strided) gradient; candle's strided copy and its add into such a gradient
//! work out six coordinates per element. In run 7's H100 profile of a ConvMAE-B step at batch
//! 64 (benches/results/gpu-2026-11-26-run7-ncu-raw.csv.gz) that was a 185 us copy of stage 1's
//! map, a 140 us copy of the images, and a 348 us add in the backward where the two windowings
//! of stage 1's output (patch_embed2 and the stage-1 fusion conv) meet. This op copies whole
//! patch rows (k * C values contiguous in both layouts) and its backward is the inverse copy,
//! whose result is contiguous.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{row_major, Element};

const OP_NAME: &str = "patch_blocks";
const GRAD_NAME: &str = "patch_blocks_backward";

/// The two layouts' sizes: images of `height` x `width` x `chans`, patches of `k` x `k`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PatchGrid {
    pub images: usize,
    pub height: usize,
    pub width: usize,
    pub chans: usize,
    pub k: usize,
}

impl PatchGrid {
    fn of(dims: &[usize], k: usize) -> Result<Self> {
        match dims {
            &[images, height, width, chans] if k > 0 && height % k == 0 && width % k == 0 => Ok(Self { images, height, width, chans, k }),
            _ => candle_core::bail!("{OP_NAME}: input {dims:?} is not [B, H, W, C] with H and W multiples of the patch size {k}"),
        }
    }
    /// Patches down (H / k) and across (W / k).
    pub(crate) fn rows_of_patches(&self) -> usize {
        self.height / self.k
    }
    pub(crate) fn cols(&self) -> usize {
        self.width / self.k
    }
    /// Rows of patches' pixels: every patch has k, each k * C values long.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn patch_rows(&self) -> usize {
        self.images * self.rows_of_patches() * self.cols() * self.k
    }
    fn run(&self) -> usize {
        self.k * self.chans
    }
    fn blocks_shape(&self) -> Shape {
        Shape::from_dims(&[self.images, self.rows_of_patches(), self.cols(), self.k, self.k, self.chans])
    }
    fn image_shape(&self) -> Shape {
        Shape::from_dims(&[self.images, self.height, self.width, self.chans])
    }
    /// Where patch row `r` starts in the image layout (it starts at r * k * C in the blocks').
    fn in_image(&self, r: usize) -> usize {
        let (i, patch) = (r % self.k, r / self.k);
        let (wo, bho) = (patch % self.cols(), patch / self.cols());
        let (ho, b) = (bho % self.rows_of_patches(), bho / self.rows_of_patches());
        ((b * self.height + ho * self.k + i) * self.width + wo * self.k) * self.chans
    }
}

/// `x` ([B, H, W, C]) as its k x k patches, [B, H/k, W/k, k, k, C]: `out[b, ho, wo, i, j, c] =
/// x[b, ho*k + i, wo*k + j, c]`. Differentiable. Our op where a kernel serves `x` (CPU f32 and
/// f64; CUDA f32, bf16 and f16) and `CONVMAE_COMPOSITE_OPS` does not list it, else candle's
/// reshape, permute and copy: the same values.
pub fn patch_blocks(x: &Tensor, k: usize) -> Result<Tensor> {
    let grid = PatchGrid::of(x.dims(), k)?;
    blocks_as(x, grid, grid.blocks_shape())
}

/// `patch_blocks` with each patch flattened, [..lead, k * k * C]: the rows a patch conv's
/// matmul reads (ConvMAE's patch embeddings and fusion convs). `lead` regroups the patches
/// (B, H/k, W/k in row-major order): [B, H/k, W/k], or [B, L] for tokens. The same op,
/// declaring that shape itself: a reshape before or after it would be a graph node, whose
/// backward candle runs as a zero-fill and an add of the whole gradient (at stage 1's map in
/// ConvMAE-B at batch 64, 25.7 MB in bf16, for each of its two windowings).
pub fn flat_patches(x: &Tensor, k: usize, lead: &[usize]) -> Result<Tensor> {
    let grid = PatchGrid::of(x.dims(), k)?;
    let patches = grid.images * grid.rows_of_patches() * grid.cols();
    if lead.iter().product::<usize>() != patches {
        candle_core::bail!("{OP_NAME}: leading dims {lead:?} do not hold the {patches} patches of {k} x {k} of input {:?}", x.dims());
    }
    let mut shape = lead.to_vec();
    shape.push(k * k * grid.chans);
    blocks_as(x, grid, Shape::from(shape))
}

/// The patch layout of `x` as `blocks` (a shape of the blocks' row-major order): our op, or
/// where it does not run, candle's reshape, permute and copy.
fn blocks_as(x: &Tensor, grid: PatchGrid, blocks: Shape) -> Result<Tensor> {
    if !crate::has_kernel(x) || crate::composite::sent_to_composite(OP_NAME) {
        let [b, h, w, c, k] = [grid.images, grid.height, grid.width, grid.chans, grid.k];
        return x.reshape(&[b, h / k, k, w / k, k, c][..])?.permute([0, 1, 3, 2, 4, 5])?.contiguous()?.reshape(blocks);
    }
    crate::tape::apply1(x, PatchBlocks { grid, blocks, to_image: false })
}

/// The copy between the layouts: image -> patches (the op), or patches -> image (its backward).
struct PatchBlocks {
    grid: PatchGrid,
    /// The shape the patches take (`blocks_as`).
    blocks: Shape,
    to_image: bool,
}

/// The copy on the CPU, patch row by patch row.
fn copy_rows<T: Copy + Send + Sync>(src: &[T], g: PatchGrid, to_image: bool) -> Vec<T> {
    let run = g.run();
    if src.is_empty() {
        return Vec::new();
    }
    let mut out = vec![src[0]; src.len()];
    if !to_image {
        out.par_chunks_mut(run).enumerate().for_each(|(r, dst)| dst.copy_from_slice(&src[g.in_image(r)..][..run]));
        return out;
    }
    // In the image's row order: image row (b, y) is patch row y % k of each of the W / k
    // patches across, side by side.
    out.par_chunks_mut(g.width * g.chans).enumerate().for_each(|(image_row, dst)| {
        let (b, y) = (image_row / g.height, image_row % g.height);
        let (ho, i) = (y / g.k, y % g.k);
        for wo in 0..g.cols() {
            let r = ((b * g.rows_of_patches() + ho) * g.cols() + wo) * g.k + i;
            dst[wo * run..][..run].copy_from_slice(&src[r * run..][..run]);
        }
    });
    out
}

impl CustomOp1 for PatchBlocks {
    fn name(&self) -> &'static str {
        if self.to_image {
            GRAD_NAME
        } else {
            OP_NAME
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (from, to) = self.shapes();
        if l.shape() != &from {
            candle_core::bail!("{}: input {:?}, expected {:?}", self.name(), l.dims(), from.dims());
        }
        let out = dispatch_float!(self.name(), (s => x), { Element::into_storage(copy_rows(&row_major(x, l), self.grid, self.to_image)) });
        Ok((out, to))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, patch_rows};
        use candle_core::backend::BackendStorage;
        let (from, to) = self.shapes();
        if l.shape() != &from {
            candle_core::bail!("{}: input {:?}, expected {:?}", self.name(), l.dims(), from.dims());
        }
        let out = cuda_dispatch!(self.name(), s.dtype(), patch_rows(s, l, self.grid, self.to_image))?;
        Ok((out, to))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.apply_op1_no_bwd(&PatchBlocks { grid: self.grid, blocks: self.blocks.clone(), to_image: !self.to_image })?))
    }
}

impl PatchBlocks {
    /// (input shape, output shape).
    fn shapes(&self) -> (Shape, Shape) {
        let (image, blocks) = (self.grid.image_shape(), self.blocks.clone());
        if self.to_image {
            (blocks, image)
        } else {
            (image, blocks)
        }
    }
}

/// A patch conv's kernel as the rows its matmul reads against `flat_patches`: [O, C, kh, kw]
/// (PyTorch's layout) -> [O, kh * kw * C], each row in the patches' (row, column, channel)
/// order. Differentiable. As candle's ops this is a permute, a copy and a reshape: three graph
/// nodes, and in candle's backward a zero-fill and an add of the kernel's size for each
/// (ConvMAE-B's five patch convs hold 5.9M weights: 256x3x4x4 + 384x256x2x2 + 768x384x2x2 + 768x256x4x4 + 768x384x2x2); as this op one node, whose backward is the
/// inverse copy. Our op where a kernel serves `weight` (the copy is candle's strided copy on
/// CUDA) and `CONVMAE_COMPOSITE_OPS` does not list `conv_weight_rows`, else candle's ops: the
/// same values.
pub fn conv_weight_rows(weight: &Tensor) -> Result<Tensor> {
    let (o, c, kh, kw) = weight.dims4()?;
    if !crate::has_kernel(weight) || crate::composite::sent_to_composite("conv_weight_rows") {
        return weight.permute((0, 2, 3, 1))?.contiguous()?.reshape((o, kh * kw * c));
    }
    crate::tape::apply1(weight, WeightRows { dims: [o, c, kh, kw], to_kernel: false })
}

/// The copy between a conv kernel's layout and its rows: kernel -> rows (the op), or rows ->
/// kernel (its backward).
struct WeightRows {
    /// [O, C, kh, kw].
    dims: [usize; 4],
    to_kernel: bool,
}

impl WeightRows {
    /// (input shape, output shape).
    fn shapes(&self) -> (Shape, Shape) {
        let [o, c, kh, kw] = self.dims;
        let (kernel, rows) = (Shape::from_dims(&self.dims), Shape::from_dims(&[o, kh * kw * c]));
        if self.to_kernel {
            (rows, kernel)
        } else {
            (kernel, rows)
        }
    }

    /// The input's layout viewed in the output's order: the kernel permuted to [O, kh, kw, C],
    /// or the rows (contiguous) as [O, kh, kw, C] permuted back to [O, C, kh, kw].
    fn source(&self, l: &Layout) -> Result<Layout> {
        let (from, _) = self.shapes();
        if l.shape() != &from {
            candle_core::bail!("{}: input {:?}, expected {:?}", self.name(), l.dims(), from.dims());
        }
        let [o, c, kh, kw] = self.dims;
        if !self.to_kernel {
            return l.permute(&[0, 2, 3, 1]);
        }
        if !l.is_contiguous() {
            candle_core::bail!("{}: the rows' gradient must be contiguous, got strides {:?}", self.name(), l.stride());
        }
        Layout::contiguous_with_offset((o, kh, kw, c), l.start_offset()).permute(&[0, 3, 1, 2])
    }
}

impl CustomOp1 for WeightRows {
    fn name(&self) -> &'static str {
        if self.to_kernel {
            "conv_weight_rows_backward"
        } else {
            "conv_weight_rows"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let source = self.source(l)?;
        let out = dispatch_float!(self.name(), (s => x), { Element::into_storage(row_major(x, &source).into_owned()) });
        Ok((out, self.shapes().1))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, owned_copy};
        use candle_core::backend::BackendStorage;
        let source = self.source(l)?;
        let out = cuda_dispatch!(self.name(), s.dtype(), owned_copy(s, &source))?;
        Ok((out, self.shapes().1))
    }

    fn bwd(&self, _weight: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&WeightRows { dims: self.dims, to_kernel: !self.to_kernel })?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// The op and its gradient against candle's reshape / permute / copy, bit for bit, on a
    /// strided input, with a second use of the input so that the gradients meet (as stage 1's
    /// output feeds two windowings).
    #[test]
    fn is_the_permutation_forward_and_backward() {
        for (dims, k) in [([2usize, 6, 4, 3], 2usize), ([1, 8, 8, 5], 4), ([3, 3, 6, 2], 3), ([1, 4, 4, 7], 1)] {
            let n: usize = dims.iter().product();
            let base = Tensor::from_vec(crate::agreement::values(n, 3), (dims[0], dims[3], dims[1], dims[2]), &Device::Cpu).unwrap();
            let var = Var::from_tensor(&base).unwrap();
            let x = var.as_tensor().permute((0, 2, 3, 1)).unwrap();
            let probe = Tensor::from_vec(crate::agreement::values(n, 4), n, &Device::Cpu).unwrap();
            let run = |path| {
                crate::with_path(path, || {
                    let out = patch_blocks(&x, k).unwrap();
                    let twice = (out.flatten_all().unwrap() * &probe).unwrap().sum_all().unwrap() + (&x * 0.5).unwrap().sum_all().unwrap();
                    let grads = twice.unwrap().backward().unwrap();
                    (out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), out.dims().to_vec(), grads.get(&var).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
                })
            };
            let (ours, ours_dims, ours_grad) = run(crate::Path::Kernels);
            let (theirs, theirs_dims, theirs_grad) = run(crate::Path::Composite);
            assert_eq!(ours_dims, theirs_dims, "{dims:?} k {k}");
            assert_eq!(ours, theirs, "{dims:?} k {k}");
            assert_eq!(ours_grad, theirs_grad, "{dims:?} k {k}");
        }
    }

    /// The flat patches are the patches reshaped, forward and backward, by both paths, with one
    /// op in the graph where the reshape would add a node; leading dims that do not hold the
    /// patches are named.
    #[test]
    fn flat_patches_are_the_patches_reshaped_without_a_node() {
        let (dims, k) = ([2usize, 8, 4, 3], 2usize);
        let n: usize = dims.iter().product();
        let var = Var::from_tensor(&Tensor::from_vec(crate::agreement::values(n, 5), &dims[..], &Device::Cpu).unwrap()).unwrap();
        let probe = Tensor::from_vec(crate::agreement::values(n, 6), (2, 8, k * k * 3), &Device::Cpu).unwrap();
        let ops = |t: &Tensor| t.sorted_nodes().iter().filter(|n| !n.is_variable()).count();
        for path in [crate::Path::Kernels, crate::Path::Composite] {
            let run = |flat: bool| {
                crate::with_path(path, || {
                    let out = if flat { flat_patches(&var, k, &[2, 8]).unwrap() } else { patch_blocks(&var, k).unwrap().reshape((2, 8, k * k * 3)).unwrap() };
                    let grads = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    ((out.dims().to_vec(), values(&out), values(grads.get(&var).unwrap())), ops(&out))
                })
            };
            let ((flat, flat_ops), (reshaped, reshaped_ops)) = (run(true), run(false));
            assert_eq!(flat, reshaped, "{path:?}");
            if path == crate::Path::Kernels {
                assert_eq!((flat_ops, reshaped_ops), (1, 2));
            }
        }
        let e = flat_patches(&var, k, &[2, 7]).unwrap_err().to_string();
        assert!(e.contains("leading dims [2, 7] do not hold the 16 patches"), "{e}");
    }

    /// The kernel's rows are candle's permute, copy and reshape, forward and backward, in f32
    /// and f64, from a strided kernel, with one op in the graph for their three.
    #[test]
    fn conv_weight_rows_are_the_permuted_kernel_in_one_node() {
        let (o, c, kh, kw) = (5usize, 3usize, 2usize, 4usize);
        let n = o * c * kh * kw;
        for dtype in [DType::F32, DType::F64] {
            // Stored [O, kw, kh, C] and viewed as [O, C, kh, kw]: a strided kernel.
            let base = Tensor::from_vec(crate::agreement::values(n, 7), (o, kw, kh, c), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let var = Var::from_tensor(&base).unwrap();
            let weight = var.as_tensor().permute((0, 3, 2, 1)).unwrap();
            let probe = Tensor::from_vec(crate::agreement::values(n, 8), (o, kh * kw * c), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let values = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let run = |path| {
                crate::with_path(path, || {
                    let rows = conv_weight_rows(&weight).unwrap();
                    let grads = (&rows * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    let ops = rows.sorted_nodes().iter().filter(|n| !n.is_variable()).count();
                    ((rows.dims().to_vec(), values(&rows), values(grads.get(&var).unwrap())), ops)
                })
            };
            let ((ours, ours_ops), (theirs, theirs_ops)) = (run(crate::Path::Kernels), run(crate::Path::Composite));
            assert_eq!(ours, theirs, "{dtype:?}");
            assert_eq!((ours_ops, theirs_ops), (2, 4), "{dtype:?}: the view's permute, then one op against three");
            // CONVMAE_COMPOSITE_OPS (here its per-thread form) sends it to candle's ops alone.
            let (listed, listed_ops) = crate::with_composite_ops(&["conv_weight_rows"], || run(crate::Path::Kernels));
            assert_eq!((listed, listed_ops), (theirs, 4), "{dtype:?}");
        }
        let e = conv_weight_rows(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap()).unwrap_err().to_string();
        assert!(e.contains("rank"), "{e}");
    }

    #[test]
    fn bad_shapes_are_named() {
        let x = Tensor::zeros((1, 6, 4, 3), DType::F32, &Device::Cpu).unwrap();
        for (t, k) in [(&x, 4), (&x, 0), (&x.flatten_all().unwrap(), 2)] {
            let e = patch_blocks(t, k).unwrap_err().to_string();
            assert!(e.contains(OP_NAME) && e.contains("multiples of the patch size"), "{e}");
        }
    }
}
