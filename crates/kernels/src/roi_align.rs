//! ROIAlign of channels-last maps: `[B, H, W, C]` and R boxes -> `[R, P, P, C]`, detectron2's
//! ROIAlignV2 (`ROIAlign(output_size, spatial_scale, sampling_ratio, aligned=True)`): each box,
//! in input-image pixels, is scaled to the map and shifted by half a pixel (pixel centres sit at
//! integer coordinates), cut into P x P bins, and every bin is the mean of bilinear samples of
//! the map on a regular grid inside it (`sampling_ratio` per side, or ceil(box side / P) when 0).
//!
//! Why our own: candle has no ROIAlign, and composing it from gathers would build R x P x P x
//! samples x 4 index tensors. Bilinear weights are separable (w = wy * wx), so each box's sample
//! rows and columns are resolved once (`Taps`, the two neighbours and their weights, or None for
//! a sample off the map), not once per sample, tap and channel. The backward scatters each bin's
//! gradient back with the same weights; it is the forward's adjoint, differentiable in the map
//! only (the boxes are constants held by the op).
//!
//! Where it runs: on the CPU in f32 and f64 (sums in f64, the backward gathering by map row, so
//! its sums run in a fixed order); with the `cuda` feature on CUDA in f32 and f64
//! (cuda/roi_align.cu: a thread per output element; sample positions, weights and sums in f64
//! from the boxes resolved here (`Region`), so the forward takes the CPU's taps; the backward
//! adds into the map's gradient by atomics, its summation order not fixed). bf16 and f16 on
//! CUDA, and other devices, are errors naming the op.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{row_major, Element};

const OP_NAME: &str = "roi_align";

/// One region: the index of its image in the batch and its corners in input-image pixels
/// (continuous coordinates; `spatial_scale` takes them to the feature map).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoiBox {
    pub image: usize,
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
}

/// One bilinear sample along one axis: its two neighbours and their weights (`hi` == `lo` with
/// weight 0 on the last row or column, as in the torchvision/detectron2 kernel).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Tap {
    lo: usize,
    hi: usize,
    w_lo: f64,
    w_hi: f64,
}

/// The sample at coordinate `v` on an axis of `size` pixels; None when it lies beyond one pixel
/// outside the map (then the whole sample contributes 0, whatever the other axis says).
fn tap(v: f64, size: usize) -> Option<Tap> {
    if v < -1.0 || v > size as f64 {
        return None;
    }
    let v = v.max(0.0);
    let lo = v.floor() as usize;
    if lo >= size - 1 {
        return Some(Tap { lo: size - 1, hi: size - 1, w_lo: 1.0, w_hi: 0.0 });
    }
    let l = v - lo as f64;
    Some(Tap { lo, hi: lo + 1, w_lo: 1.0 - l, w_hi: l })
}

/// One axis of a box on the map: where it starts, its bins' size and the samples per bin.
#[derive(Clone, Copy, Debug)]
struct Axis {
    start: f64,
    bin: f64,
    grid: usize,
}

impl Axis {
    fn new(start: f64, end: f64, output: usize, sampling_ratio: usize) -> Self {
        let len = end - start; // aligned: not clamped to 1, so a box smaller than a pixel stays small
        let bin = len / output as f64;
        // ceil of a negative side (an inverted box) is no samples; its bins are 0.
        let grid = if sampling_ratio > 0 { sampling_ratio } else { (len / output as f64).ceil().max(0.0) as usize };
        Axis { start, bin, grid }
    }

    /// Sample `i` of bin `p` (cuda/roi_align.cu `roi_sample` rounds it op by op alike).
    fn sample(&self, p: usize, i: usize) -> f64 {
        self.start + p as f64 * self.bin + (i as f64 + 0.5) * self.bin / self.grid as f64
    }

    /// The taps of every sample, bin by bin (`P * grid`), on an axis of `size` pixels.
    fn taps(&self, output: usize, size: usize) -> Vec<Option<Tap>> {
        (0..output).flat_map(|p| (0..self.grid).map(move |i| tap(self.sample(p, i), size))).collect()
    }
}

/// One box on the map: its image, its two axes and the divisor of its bins.
#[derive(Clone, Copy, Debug)]
struct Region {
    image: usize,
    y: Axis,
    x: Axis,
    count: f64,
}

/// A box resolved against the map: the taps of its sample rows (`ys`, `P * grid_h`) and columns
/// (`xs`, `P * grid_w`), the divisor of its bins, and the map rows its samples touch.
#[derive(Debug)]
struct BoxGrid {
    image: usize,
    grid_h: usize,
    grid_w: usize,
    count: f64,
    ys: Vec<Option<Tap>>,
    xs: Vec<Option<Tap>>,
    /// First and last map row any sample reads (None if none does): lets a backward row skip boxes.
    rows: Option<(usize, usize)>,
}

impl BoxGrid {
    fn new(r: &Region, output: usize, height: usize, width: usize) -> Self {
        let (ys, xs) = (r.y.taps(output, height), r.x.taps(output, width));
        let rows = ys.iter().flatten().fold(None, |span: Option<(usize, usize)>, t| Some(span.map_or((t.lo, t.hi), |(a, z)| (a.min(t.lo), z.max(t.hi)))));
        BoxGrid { image: r.image, grid_h: r.y.grid, grid_w: r.x.grid, count: r.count, ys, xs, rows }
    }
    fn ys(&self, ph: usize) -> &[Option<Tap>] {
        &self.ys[ph * self.grid_h..][..self.grid_h]
    }
    fn xs(&self, pw: usize) -> &[Option<Tap>] {
        &self.xs[pw * self.grid_w..][..self.grid_w]
    }
}

/// Sizes of one ROIAlign and its boxes, shared by the op and its backward.
#[derive(Debug)]
struct Geometry {
    images: usize,
    height: usize,
    width: usize,
    chans: usize,
    output: usize,
    regions: Vec<Region>,
    /// The boxes' taps, resolved on first use by the CPU kernels (the CUDA ones place the
    /// samples themselves, from `regions`).
    grids: OnceLock<Vec<BoxGrid>>,
}

impl Geometry {
    #[allow(clippy::too_many_arguments)]
    fn new(images: usize, height: usize, width: usize, chans: usize, boxes: &[RoiBox], output: usize, spatial_scale: f64, sampling_ratio: usize) -> Self {
        let regions = boxes
            .iter()
            .map(|b| {
                let (x1, y1) = (b.x1 as f64 * spatial_scale - 0.5, b.y1 as f64 * spatial_scale - 0.5);
                let (x2, y2) = (b.x2 as f64 * spatial_scale - 0.5, b.y2 as f64 * spatial_scale - 0.5);
                let (y, x) = (Axis::new(y1, y2, output, sampling_ratio), Axis::new(x1, x2, output, sampling_ratio));
                Region { image: b.image, y, x, count: (y.grid * x.grid).max(1) as f64 }
            })
            .collect();
        Geometry { images, height, width, chans, output, regions, grids: OnceLock::new() }
    }
    fn grids(&self) -> &[BoxGrid] {
        self.grids.get_or_init(|| self.regions.iter().map(|r| BoxGrid::new(r, self.output, self.height, self.width)).collect())
    }
    fn image_shape(&self) -> Shape {
        Shape::from_dims(&[self.images, self.height, self.width, self.chans])
    }
    fn bins_shape(&self) -> Shape {
        Shape::from_dims(&[self.regions.len(), self.output, self.output, self.chans])
    }
    /// (B, H, W, C, P), as the CUDA launch takes them.
    #[cfg(feature = "cuda")]
    fn dims(&self) -> (usize, usize, usize, usize, usize) {
        (self.images, self.height, self.width, self.chans, self.output)
    }
    /// The regions as cuda/roi_align.cu reads them.
    #[cfg(feature = "cuda")]
    fn device_regions(&self) -> Vec<crate::cuda::RoiRegionRow> {
        self.regions
            .iter()
            .map(|r| crate::cuda::RoiRegionRow {
                y_start: r.y.start,
                x_start: r.x.start,
                bin_h: r.y.bin,
                bin_w: r.x.bin,
                count: r.count,
                image: r.image as i64,
                grid_h: r.y.grid as i64,
                grid_w: r.x.grid as i64,
            })
            .collect()
    }
}

/// ROIAlignV2 (aligned) of `features` ([B, H, W, C], any layout) over `boxes` (corners in input
/// pixels, `spatial_scale` the map's size over the image's, e.g. 1/16), [R, output, output, C]:
/// bin (ph, pw) of box r is the mean of the map's bilinear samples at
/// `y = y1 * scale - 0.5 + ph * bin_h + (iy + 0.5) * bin_h / grid_h` (x likewise), `grid` being
/// `sampling_ratio`, or ceil(box side / output) when it is 0. Samples more than a pixel off the
/// map count as 0. Differentiable in `features`.
pub fn roi_align(features: &Tensor, boxes: &[RoiBox], output: usize, spatial_scale: f64, sampling_ratio: usize) -> Result<Tensor> {
    let (images, height, width, chans) = features.dims4()?;
    if output == 0 {
        candle_core::bail!("{OP_NAME}: output size must be positive");
    }
    if !(spatial_scale > 0.0 && spatial_scale.is_finite()) {
        candle_core::bail!("{OP_NAME}: spatial_scale must be positive and finite, got {spatial_scale}");
    }
    if height == 0 || width == 0 {
        candle_core::bail!("{OP_NAME}: empty feature map {:?}", features.dims());
    }
    for (i, b) in boxes.iter().enumerate() {
        if b.image >= images {
            candle_core::bail!("{OP_NAME}: box {i} is on image {} but the features hold {images} images", b.image);
        }
        if ![b.x1, b.y1, b.x2, b.y2].iter().all(|v| v.is_finite()) {
            candle_core::bail!("{OP_NAME}: box {i} has non-finite coordinates {b:?}");
        }
    }
    if !(features.device().is_cpu() || features.device().is_cuda()) {
        candle_core::bail!("{OP_NAME}: runs on the CPU and on CUDA only, got a tensor on {:?}", features.device());
    }
    let geometry = Arc::new(Geometry::new(images, height, width, chans, boxes, output, spatial_scale, sampling_ratio));
    crate::tape::apply1(features, RoiAlign { geometry, backward: false })
}

/// ROIAlign (`backward` false) or its adjoint (`backward` true): bins' gradients scattered onto
/// the map.
struct RoiAlign {
    geometry: Arc<Geometry>,
    backward: bool,
}

impl RoiAlign {
    /// The result's shape, once the input's is checked against the geometry.
    fn output_shape(&self, l: &Layout) -> Result<Shape> {
        let g = &*self.geometry;
        let (from, to) = if self.backward { (g.bins_shape(), g.image_shape()) } else { (g.image_shape(), g.bins_shape()) };
        if l.shape() != &from {
            candle_core::bail!("{}: input {:?}, expected {:?}", self.name(), l.dims(), from.dims());
        }
        Ok(to)
    }
}

/// The bins, parallel over bins (each one box's samples, summed in f64 over all C channels).
fn pool<T: Element + Into<f64>>(x: &[T], g: &Geometry) -> Vec<T> {
    let (c, p, w) = (g.chans, g.output, g.width);
    let plane = g.height * w * c;
    let mut out = vec![T::ZERO; g.regions.len() * p * p * c];
    if out.is_empty() {
        return out;
    }
    let boxes = g.grids();
    out.par_chunks_mut(c).enumerate().for_each_init(
        || vec![0f64; c],
        |acc, (bin, dst)| {
            let (pw, rest) = (bin % p, bin / p);
            let (ph, r) = (rest % p, rest / p);
            let bx = &boxes[r];
            let image = &x[bx.image * plane..][..plane];
            acc.fill(0.0);
            for ty in bx.ys(ph).iter().flatten() {
                for tx in bx.xs(pw).iter().flatten() {
                    for (y, wy) in [(ty.lo, ty.w_lo), (ty.hi, ty.w_hi)] {
                        for (xx, wx) in [(tx.lo, tx.w_lo), (tx.hi, tx.w_hi)] {
                            let weight = wy * wx;
                            for (a, &v) in acc.iter_mut().zip(&image[(y * w + xx) * c..][..c]) {
                                *a += weight * v.into();
                            }
                        }
                    }
                }
            }
            for (d, &a) in dst.iter_mut().zip(acc.iter()) {
                *d = T::from_f64(a / bx.count);
            }
        },
    );
    out
}

/// The adjoint: every bin's gradient / count added at its samples' four neighbours. Parallel
/// over map rows (of all images), each row gathering what its image's boxes scatter onto it, so
/// no two tasks write one element and each element's sum runs in the same order (boxes, bins,
/// samples) on any thread count.
fn scatter<T: Element + Into<f64>>(grad: &[T], g: &Geometry) -> Vec<T> {
    let (c, p, h) = (g.chans, g.output, g.height);
    let row = g.width * c;
    let mut out = vec![T::ZERO; g.images * h * row];
    if out.is_empty() {
        return out;
    }
    let boxes = g.grids();
    let mut by_image = vec![Vec::new(); g.images];
    for (r, bx) in boxes.iter().enumerate() {
        by_image[bx.image].push(r);
    }
    out.par_chunks_mut(row).enumerate().for_each_init(
        || vec![0f64; row],
        |acc, (i, dst)| {
            let (y, b) = (i % h, i / h);
            acc.fill(0.0);
            for &r in &by_image[b] {
                let bx = &boxes[r];
                if !bx.rows.is_some_and(|(first, last)| first <= y && y <= last) {
                    continue;
                }
                for ph in 0..p {
                    for ty in bx.ys(ph).iter().flatten() {
                        if ty.lo != y && ty.hi != y {
                            continue;
                        }
                        let wy = if ty.lo == y { ty.w_lo } else { 0.0 } + if ty.hi == y { ty.w_hi } else { 0.0 };
                        for pw in 0..p {
                            let src = &grad[((r * p + ph) * p + pw) * c..][..c];
                            for tx in bx.xs(pw).iter().flatten() {
                                for (xx, wx) in [(tx.lo, tx.w_lo), (tx.hi, tx.w_hi)] {
                                    let weight = wy * wx / bx.count;
                                    for (a, &v) in acc[xx * c..][..c].iter_mut().zip(src) {
                                        *a += weight * v.into();
                                    }
                                }
                            }
                        }
                    }
                }
            }
            for (d, &a) in dst.iter_mut().zip(acc.iter()) {
                *d = T::from_f64(a);
            }
        },
    );
    out
}

impl CustomOp1 for RoiAlign {
    fn name(&self) -> &'static str {
        if self.backward {
            "roi_align_backward"
        } else {
            OP_NAME
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &*self.geometry;
        let to = self.output_shape(l)?;
        let out = dispatch_float!(self.name(), (s => x), {
            let x = row_major(x, l);
            Element::into_storage(if self.backward { scatter(&x, g) } else { pool(&x, g) })
        });
        Ok((out, to))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use crate::cuda::roi_align;
        let g = &*self.geometry;
        let to = self.output_shape(l)?;
        let regions = g.device_regions();
        let out = match s.dtype() {
            candle_core::DType::F32 => roi_align::<f32>(s, l, &regions, g.dims(), self.backward),
            candle_core::DType::F64 => roi_align::<f64>(s, l, &regions, g.dims(), self.backward),
            other => candle_core::bail!("{}: no CUDA kernel for dtype {other:?} (f32 and f64 have one)", self.name()),
        }?;
        Ok((out, to))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.apply_op1_no_bwd(&RoiAlign { geometry: self.geometry.clone(), backward: !self.backward })?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_rel, rand};
    use candle_core::{DType, Device, Var};

    /// A box given in feature-map pixels, as input pixels at `scale`.
    fn fbox(image: usize, x1: f64, y1: f64, x2: f64, y2: f64, scale: f64) -> RoiBox {
        let s = |v: f64| (v / scale) as f32;
        RoiBox { image, x1: s(x1), y1: s(y1), x2: s(x2), y2: s(y2) }
    }

    /// Boxes in feature pixels of a 7 x 9 map: inside, the whole map, partly off each side, a
    /// tiny one, one ending on the far edges, one off the map, one far larger than it, an empty one.
    fn boxes(scale: f64) -> Vec<RoiBox> {
        [
            (0, 1.2, 0.7, 6.3, 5.1),
            (1, 0.0, 0.0, 9.0, 7.0),
            (1, -2.5, -1.8, 3.1, 2.4),
            (0, 5.5, 4.2, 11.0, 9.5),
            (1, 4.3, 3.6, 4.55, 3.8),
            (0, 6.0, 4.0, 9.0, 7.0),
            (1, 10.5, 8.0, 13.0, 9.5),
            (0, -6.0, -6.0, 15.0, 13.0),
            (1, 3.0, 2.0, 3.0, 5.0),
        ]
        .iter()
        .map(|&(i, x1, y1, x2, y2)| fbox(i, x1, y1, x2, y2, scale))
        .collect()
    }

    /// detectron2's ROIAlignV2 forward written out: per box, bin, sample point and channel, the
    /// four bilinear taps of the torchvision CPU kernel, on `x` ([B, H, W, C] row-major).
    fn reference(x: &[f64], dims: [usize; 4], boxes: &[RoiBox], p: usize, scale: f64, ratio: usize) -> Vec<f64> {
        let [_, h, w, c] = dims;
        let at = |b: usize, y: usize, xx: usize, ch: usize| x[((b * h + y) * w + xx) * c + ch];
        let bilinear = |b: usize, y: f64, xx: f64, ch: usize| -> f64 {
            if y < -1.0 || y > h as f64 || xx < -1.0 || xx > w as f64 {
                return 0.0;
            }
            let (mut y, mut xx) = (y.max(0.0), xx.max(0.0));
            let (mut y_low, mut x_low) = (y.floor() as usize, xx.floor() as usize);
            let (y_high, x_high);
            if y_low >= h - 1 {
                y_low = h - 1;
                y_high = h - 1;
                y = y_low as f64;
            } else {
                y_high = y_low + 1;
            }
            if x_low >= w - 1 {
                x_low = w - 1;
                x_high = w - 1;
                xx = x_low as f64;
            } else {
                x_high = x_low + 1;
            }
            let (ly, lx) = (y - y_low as f64, xx - x_low as f64);
            let (hy, hx) = (1.0 - ly, 1.0 - lx);
            hy * hx * at(b, y_low, x_low, ch) + hy * lx * at(b, y_low, x_high, ch) + ly * hx * at(b, y_high, x_low, ch) + ly * lx * at(b, y_high, x_high, ch)
        };
        let mut out = vec![0.0; boxes.len() * p * p * c];
        for (r, bx) in boxes.iter().enumerate() {
            let (sx, sy) = (bx.x1 as f64 * scale - 0.5, bx.y1 as f64 * scale - 0.5);
            let (ex, ey) = (bx.x2 as f64 * scale - 0.5, bx.y2 as f64 * scale - 0.5);
            let (roi_w, roi_h) = (ex - sx, ey - sy);
            let (bin_w, bin_h) = (roi_w / p as f64, roi_h / p as f64);
            let grid_h = if ratio > 0 { ratio as i64 } else { (roi_h / p as f64).ceil() as i64 };
            let grid_w = if ratio > 0 { ratio as i64 } else { (roi_w / p as f64).ceil() as i64 };
            let count = (grid_h * grid_w).max(1) as f64;
            for ph in 0..p {
                for pw in 0..p {
                    for ch in 0..c {
                        let mut sum = 0.0;
                        for iy in 0..grid_h {
                            let y = sy + ph as f64 * bin_h + (iy as f64 + 0.5) * bin_h / grid_h as f64;
                            for ix in 0..grid_w {
                                let xx = sx + pw as f64 * bin_w + (ix as f64 + 0.5) * bin_w / grid_w as f64;
                                sum += bilinear(bx.image, y, xx, ch);
                            }
                        }
                        out[((r * p + ph) * p + pw) * c + ch] = sum / count;
                    }
                }
            }
        }
        out
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
    }

    /// The op equals the written-out reference in f64, over scales, sampling ratios and output
    /// sizes, on a contiguous and on a permuted (strided) map.
    #[test]
    fn roi_align_matches_the_reference() {
        let x = rand(&[2, 7, 9, 3], 1);
        let strided = rand(&[2, 3, 7, 9], 2).permute((0, 2, 3, 1)).unwrap();
        for (scale, ratio, p) in [(0.5, 0usize, 2usize), (0.25, 2, 4), (0.5, 2, 1), (0.25, 0, 4), (0.5, 0, 1), (0.25, 0, 2)] {
            for features in [&x, &strided] {
                let bx = boxes(scale);
                let ours = roi_align(features, &bx, p, scale, ratio).unwrap();
                assert_eq!(ours.dims(), &[bx.len(), p, p, 3]);
                let theirs = reference(&values(features), [2, 7, 9, 3], &bx, p, scale, ratio);
                let diff = values(&ours).iter().zip(&theirs).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff < 1e-12, "scale {scale} ratio {ratio} output {p}: {diff}");
                assert!(theirs.iter().any(|v| v.abs() > 0.1), "the reference is not all zeros");
            }
        }
    }

    /// Bilinear sampling reproduces a linear map exactly, and the samples sit symmetrically in
    /// their bin, so a bin fully on the map is the map's function at the bin's centre.
    #[test]
    fn roi_align_of_a_linear_map_is_its_value_at_bin_centres() {
        let (h, w) = (7usize, 9usize);
        let coef = [(0.7, -0.3, 1.5), (-1.1, 0.4, -0.2)]; // (a, b, c) of each channel
        let f = |x: f64, y: f64, ch: usize| coef[ch].0 * x + coef[ch].1 * y + coef[ch].2;
        let data: Vec<f64> = (0..h * w * 2).map(|i| f(((i / 2) % w) as f64, (i / 2 / w) as f64, i % 2)).collect();
        let x = Tensor::from_vec(data, (1, h, w, 2), &Device::Cpu).unwrap();
        let scale = 0.5;
        for (ratio, p) in [(0usize, 3usize), (3, 2), (1, 4), (2, 1)] {
            let bx = vec![fbox(0, 1.0, 0.8, 7.5, 6.2, scale), fbox(0, 0.5, 0.5, 8.5, 6.5, scale), fbox(0, 3.2, 2.9, 3.6, 3.1, scale)];
            let out = values(&roi_align(&x, &bx, p, scale, ratio).unwrap());
            for (r, b) in bx.iter().enumerate() {
                let (sx, sy) = (b.x1 as f64 * scale - 0.5, b.y1 as f64 * scale - 0.5);
                let (bw, bh) = ((b.x2 as f64 * scale - 0.5 - sx) / p as f64, (b.y2 as f64 * scale - 0.5 - sy) / p as f64);
                for ph in 0..p {
                    for pw in 0..p {
                        for ch in 0..2 {
                            let want = f(sx + (pw as f64 + 0.5) * bw, sy + (ph as f64 + 0.5) * bh, ch);
                            let got = out[((r * p + ph) * p + pw) * 2 + ch];
                            assert!((got - want).abs() < 1e-12, "box {r} bin ({ph}, {pw}) channel {ch}: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    /// The gradient with respect to the map equals central differences of
    /// `sum(roi_align(x) * cot)` in f64 (exact up to rounding: the op is linear in the map).
    #[test]
    fn roi_align_gradient_matches_finite_differences() {
        let dims = [2usize, 5, 6, 2];
        let scale = 0.5;
        let bx = vec![fbox(0, 0.8, 1.1, 4.7, 3.9, scale), fbox(1, -1.5, -0.7, 2.6, 2.2, scale), fbox(1, 3.3, 2.5, 7.5, 6.0, scale), fbox(0, 2.1, 2.4, 2.3, 2.5, scale), fbox(0, 0.8, 1.1, 4.7, 3.9, scale)];
        for (ratio, p) in [(0usize, 2usize), (2, 3)] {
            let x = Var::from_tensor(&rand(&dims, 3)).unwrap();
            let out = roi_align(x.as_tensor(), &bx, p, scale, ratio).unwrap();
            let cot = rand(out.dims(), 4);
            let grad = values((out * &cot).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap());
            let base = values(x.as_tensor());
            let loss = |v: &[f64]| {
                let t = Tensor::from_vec(v.to_vec(), &dims, &Device::Cpu).unwrap();
                (roi_align(&t, &bx, p, scale, ratio).unwrap() * &cot).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
            };
            let eps = 1e-3;
            for i in 0..base.len() {
                let (mut plus, mut minus) = (base.clone(), base.clone());
                plus[i] += eps;
                minus[i] -= eps;
                let fd = (loss(&plus) - loss(&minus)) / (2.0 * eps);
                assert!((fd - grad[i]).abs() < 1e-9, "ratio {ratio} output {p} element {i}: {} vs {fd}", grad[i]);
            }
            assert!(grad.iter().any(|g| g.abs() > 0.01) && grad.contains(&0.0), "some pixels are read, some not");
        }
    }

    /// f32 agrees with f64, forward and gradient.
    #[test]
    fn roi_align_f32_agrees_with_f64() {
        let x64 = Var::from_tensor(&rand(&[2, 7, 9, 3], 5)).unwrap();
        let x32 = Var::from_tensor(&x64.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
        for (scale, ratio, p) in [(0.5, 0usize, 2usize), (0.25, 2, 4)] {
            let bx = boxes(scale);
            let (o64, o32) = (roi_align(x64.as_tensor(), &bx, p, scale, ratio).unwrap(), roi_align(x32.as_tensor(), &bx, p, scale, ratio).unwrap());
            assert_eq!(o32.dtype(), DType::F32);
            assert!(max_rel(&o32, &o64) < 1e-5, "forward {}", max_rel(&o32, &o64));
            let cot = rand(o64.dims(), 6);
            let g64 = (o64 * &cot).unwrap().sum_all().unwrap().backward().unwrap().get(x64.as_tensor()).unwrap().clone();
            let g32 = (o32 * cot.to_dtype(DType::F32).unwrap()).unwrap().sum_all().unwrap().backward().unwrap().get(x32.as_tensor()).unwrap().clone();
            assert_eq!(g32.dtype(), DType::F32);
            assert!(max_rel(&g32, &g64) < 1e-5, "gradient {}", max_rel(&g32, &g64));
        }
    }

    /// Bad arguments are named; no boxes gives an empty result and a zero gradient.
    #[test]
    fn roi_align_errors_and_no_boxes() {
        let x = Var::from_tensor(&rand(&[2, 4, 5, 3], 7)).unwrap();
        let ok = RoiBox { image: 1, x1: 0.0, y1: 0.0, x2: 4.0, y2: 4.0 };
        let e = roi_align(&x, &[ok, ok, ok, RoiBox { image: 2, ..ok }], 2, 1.0, 0).unwrap_err().to_string();
        assert!(e.contains("roi_align") && e.contains("box 3") && e.contains("2 images"), "{e}");
        let e = roi_align(&x, &[ok, RoiBox { y2: f32::NAN, ..ok }], 2, 1.0, 0).unwrap_err().to_string();
        assert!(e.contains("box 1") && e.contains("non-finite"), "{e}");
        assert!(roi_align(&x, &[ok], 0, 1.0, 0).unwrap_err().to_string().contains("output size"));
        assert!(roi_align(&x, &[ok], 2, 0.0, 0).unwrap_err().to_string().contains("spatial_scale"));
        let e = roi_align(&x.as_tensor().to_dtype(DType::F16).unwrap(), &[ok], 2, 1.0, 0).unwrap_err().to_string();
        assert!(e.contains("roi_align") && e.contains("F16"), "{e}");
        let empty = roi_align(&x, &[], 3, 1.0, 0).unwrap();
        assert_eq!(empty.dims(), &[0, 3, 3, 3]);
        let grad = empty.sum_all().unwrap().backward().unwrap();
        let g = grad.get(x.as_tensor()).unwrap();
        assert_eq!(g.dims(), x.dims());
        assert!(values(g).iter().all(|&v| v == 0.0));
    }
}
