//! Depthwise 2-D convolution restricted to the visible positions of a masked feature map.
//!
//! In ConvMAE pretraining the masked positions of the convolutional stages never reach the
//! loss, and the depthwise convolution's input is zero there. So only visible positions are
//! stored, as rows of an `[N, C]` tensor, and the convolution becomes a gather: each output row
//! is a weighted sum of the rows of its visible neighbours. [`SparseNeighbors`] holds, for
//! every row and tap, the neighbour's row (or -1), and the kernels below are the dense
//! depthwise kernels with the image walk replaced by that table.
//!
//! Like the dense kernels, a block of `LANES` channel accumulators is kept in registers while
//! the taps (forward, input gradient) or the rows (weight gradient) are walked, with the weight
//! pre-transposed to `[K*K, C]` so that every operand is a contiguous run of channels.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{row_major, Element};

use crate::taps::{channel_major, mac, taps_major, LANES};

const OP_NAME: &str = "sparse_depthwise_conv2d";

/// Output elements per rayon task in the gathers: every element costs up to K*K
/// multiply-adds, so tasks this size are long enough to amortise the scheduling.
const ELEMS_PER_TASK: usize = 4096;

/// Rows per partial sum of the weight gradient: at least `MIN_ROWS_PER_PARTIAL`, and enough
/// that there are at most `MAX_PARTIALS` partials (each is a `[K*K, C]` buffer to allocate and
/// add up). The partition depends only on the number of rows, never on the number of threads,
/// and partials are added in index order, so the weight gradient is bitwise reproducible
/// whatever rayon's scheduling does.
const MIN_ROWS_PER_PARTIAL: usize = 32;
const MAX_PARTIALS: usize = 64;

/// Visible-position neighbourhoods for the sparse masked depthwise conv: for each of `rows`
/// rows, `k*k` entries (tap-major, `t = i*k + j`) holding the row of the position at offset
/// `(i - k/2, j - k/2)` from the row's position, or -1 where that position is masked or
/// outside the image.
///
/// The relation must be symmetric (if `nbr[n, (i,j)] = m` then `nbr[m, (k-1-i, k-1-j)] = n`),
/// which holds for any set of positions on a grid; the backward pass relies on it.
#[derive(Clone, Debug)]
pub struct SparseNeighbors {
    rows: usize,
    k: usize,
    /// The table on the host: given (`new`, `from_positions`), or built from `tokens` on first
    /// use on the host.
    table: std::sync::OnceLock<Vec<i32>>,
    /// Where the rows come from when they are a mask's visible token blocks
    /// (`of_visible_tokens`): the table is then built where it is used, on the GPU by a kernel.
    tokens: Option<Arc<VisibleTokens>>,
    /// The table on the GPU, uploaded or built there on first use, shared by every forward and
    /// backward that uses these neighbours (a cache: ignored by comparisons, empty in clones).
    #[cfg(feature = "cuda")]
    device_table: crate::cuda::DeviceTable,
}

impl PartialEq for SparseNeighbors {
    fn eq(&self, other: &Self) -> bool {
        (self.rows, self.k) == (other.rows, other.k) && self.table() == other.table()
    }
}
impl Eq for SparseNeighbors {}

/// A masked map's visible positions as MAE's sparse path lays them out: each image's visible
/// tokens in `ids_keep` order, each token a `cell` x `cell` block of positions, row-major.
/// Row `n` is then (image, visible token, row in cell, col in cell), and the neighbours of a
/// position follow from the mask alone, without a map of the grid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VisibleTokens {
    pub images: usize,
    /// Tokens per side of the (square) token grid.
    pub grid: usize,
    /// Positions per side of a token on this map.
    pub cell: usize,
    /// Visible tokens per image.
    pub len_keep: usize,
    /// [images, len_keep]: the visible tokens (row-major indices into the grid), in row order.
    pub ids_keep: Vec<u32>,
    /// [images, grid * grid]: each token's place in its image's `ids_keep`, or -1 if masked.
    pub slot: Vec<i32>,
}

impl VisibleTokens {
    fn rows(&self) -> usize {
        self.images * self.len_keep * self.cell * self.cell
    }

    fn check(&self) -> Result<()> {
        let tokens = self.grid * self.grid;
        if self.ids_keep.len() != self.images * self.len_keep || self.slot.len() != self.images * tokens {
            return Err(error(format!(
                "VisibleTokens: {} ids_keep and {} slots for {} images of {} tokens, {} visible",
                self.ids_keep.len(),
                self.slot.len(),
                self.images,
                tokens,
                self.len_keep
            )));
        }
        // Each visible token has the slot of its place, and nothing else has a slot.
        let mut slots = 0;
        for b in 0..self.images {
            for (v, &t) in self.ids_keep[b * self.len_keep..][..self.len_keep].iter().enumerate() {
                if t as usize >= tokens || self.slot[b * tokens + t as usize] != v as i32 {
                    return Err(error(format!("VisibleTokens: image {b}: ids_keep[{v}] = {t} and the slots disagree")));
                }
            }
            slots += self.slot[b * tokens..][..tokens].iter().filter(|&&s| s >= 0).count();
        }
        if slots != self.images * self.len_keep {
            return Err(error(format!("VisibleTokens: {slots} slots for {} visible tokens", self.images * self.len_keep)));
        }
        Ok(())
    }

    /// The neighbour table (`SparseNeighbors`' layout) for a `k` x `k` kernel, on the host: the
    /// formula of cuda/depthwise.cu `visible_neighbors`, with each row's position worked out
    /// once for its k * k taps.
    fn table(&self, k: usize) -> Vec<i32> {
        let kk = k * k;
        let mut table = vec![-1i32; self.rows() * kk];
        if kk == 0 {
            return table;
        }
        let (cell, grid, keep) = (self.cell, self.grid, self.len_keep);
        let (cc, side, half) = (cell * cell, (grid * cell) as isize, (k / 2) as isize);
        table.par_chunks_mut(kk).with_min_len(256).enumerate().for_each(|(n, taps)| {
            // Row n: image b, visible token v, (qi, qj) in its cell.
            let (b, v, q) = (n / (keep * cc), n / cc % keep, n % cc);
            let token = self.ids_keep[b * keep + v] as usize;
            let (y0, x0) = ((token / grid * cell + q / cell) as isize - half, (token % grid * cell + q % cell) as isize - half);
            let slots = &self.slot[b * grid * grid..][..grid * grid];
            for i in 0..k {
                let y = y0 + i as isize;
                if y < 0 || y >= side {
                    continue;
                }
                let (ty, qy) = (y as usize / cell, y as usize % cell);
                for j in 0..k {
                    let x = x0 + j as isize;
                    if x < 0 || x >= side {
                        continue;
                    }
                    let slot = slots[ty * grid + x as usize / cell];
                    if slot >= 0 {
                        taps[i * k + j] = ((b * keep + slot as usize) * cc + qy * cell + x as usize % cell) as i32;
                    }
                }
            }
        });
        table
    }
}

fn error(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg).bt()
}

fn check_kernel_size(k: usize) -> Result<()> {
    if k % 2 == 1 {
        Ok(())
    } else {
        Err(error(format!("SparseNeighbors: kernel size {k} must be odd")))
    }
}

impl SparseNeighbors {
    /// Takes a table of `rows * k * k` entries, each -1 or a row in `0..rows`, with `k` odd.
    /// Validates sizes and ranges (the error names the problem) and, in debug builds, the
    /// symmetry of the relation.
    pub fn new(rows: usize, k: usize, table: Vec<i32>) -> Result<Self> {
        check_kernel_size(k)?;
        if rows > i32::MAX as usize {
            return Err(error(format!(
                "SparseNeighbors: {rows} rows cannot be indexed by i32 table entries"
            )));
        }
        let kk = k * k;
        if rows.checked_mul(kk) != Some(table.len()) {
            return Err(error(format!(
                "SparseNeighbors: table has {} entries, expected rows * k * k = {rows} * {k} * {k}",
                table.len()
            )));
        }
        if let Some(pos) = table.iter().position(|&m| m < -1 || m as i64 >= rows as i64) {
            let (n, t) = (pos / kk, pos % kk);
            return Err(error(format!(
                "SparseNeighbors: entry {} for row {n}, tap ({}, {}) is out of range; entries \
                 must be -1 or a row in 0..{rows}",
                table[pos],
                t / k,
                t % k
            )));
        }
        let nbrs = SparseNeighbors {
            rows,
            k,
            table: table.into(),
            tokens: None,
            #[cfg(feature = "cuda")]
            device_table: Default::default(),
        };
        if cfg!(debug_assertions) {
            nbrs.check_symmetry()?;
        }
        Ok(nbrs)
    }

    /// Builds the table from explicit positions: `positions[n] = (image, y, x)` is the position
    /// of row `n` on an `h x w` grid of image `image < images`; each position may appear at
    /// most once. Uses a dense `(image, y, x) -> row` map internally.
    pub fn from_positions(
        positions: &[(u32, u32, u32)],
        images: usize,
        h: usize,
        w: usize,
        k: usize,
    ) -> Result<Self> {
        check_kernel_size(k)?;
        let rows = positions.len();
        if rows > i32::MAX as usize {
            return Err(error(format!(
                "SparseNeighbors::from_positions: {rows} positions cannot be indexed by i32"
            )));
        }
        let cells = images.checked_mul(h).and_then(|v| v.checked_mul(w)).ok_or_else(|| {
            error(format!(
                "SparseNeighbors::from_positions: grid {images} x {h} x {w} is too large"
            ))
        })?;
        let mut map = vec![-1i32; cells];
        for (n, &(b, y, x)) in positions.iter().enumerate() {
            let (b, y, x) = (b as usize, y as usize, x as usize);
            if b >= images || y >= h || x >= w {
                return Err(error(format!(
                    "SparseNeighbors::from_positions: position {n} (image {b}, y {y}, x {x}) is \
                     outside the grid of {images} images of {h} x {w}"
                )));
            }
            let cell = &mut map[(b * h + y) * w + x];
            if *cell >= 0 {
                return Err(error(format!(
                    "SparseNeighbors::from_positions: position (image {b}, y {y}, x {x}) is \
                     listed twice, as rows {} and {n}",
                    *cell
                )));
            }
            *cell = n as i32;
        }
        let kk = k * k;
        let p = (k / 2) as isize;
        let mut table = vec![-1i32; rows * kk];
        if kk > 0 {
            table.par_chunks_mut(kk).with_min_len(256).zip(positions).for_each(
                |(nbr, &(b, y, x))| {
                    let base = b as usize * h * w;
                    for i in 0..k {
                        let yy = y as isize + i as isize - p;
                        if yy < 0 || yy >= h as isize {
                            continue;
                        }
                        let map_row = &map[base + yy as usize * w..][..w];
                        for j in 0..k {
                            let xx = x as isize + j as isize - p;
                            if xx >= 0 && xx < w as isize {
                                nbr[i * k + j] = map_row[xx as usize];
                            }
                        }
                    }
                },
            );
        }
        Self::new(rows, k, table)
    }

    /// The neighbours of a mask's visible token blocks (`VisibleTokens`). The table is built
    /// where it is first used: on the host by `table()`, on a GPU by a kernel from the mask, so
    /// that a GPU step builds no table on the host (ConvMAE-B at batch 64: 1.57M entries over
    /// stages 1 and 2, about 4.5 ms of the build box's cores and 6.3 MB of upload a step the
    /// old way; benches/results/neighbour-tables-2026-11-26.md, where the host formula is also
    /// about 1 ms slower than `from_positions`). `k` odd.
    pub fn of_visible_tokens(tokens: VisibleTokens, k: usize) -> Result<Self> {
        check_kernel_size(k)?;
        tokens.check()?;
        let rows = tokens.rows();
        if rows.checked_mul(k * k).is_none_or(|n| n > i32::MAX as usize) {
            return Err(error(format!("SparseNeighbors: {rows} rows of {k} x {k} taps cannot be indexed by i32")));
        }
        Ok(SparseNeighbors {
            rows,
            k,
            table: std::sync::OnceLock::new(),
            tokens: Some(Arc::new(tokens)),
            #[cfg(feature = "cuda")]
            device_table: Default::default(),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The table on the host (built now from the mask if it was given as `VisibleTokens`).
    pub fn table(&self) -> &[i32] {
        self.table.get_or_init(|| self.tokens.as_ref().map(|t| t.table(self.k)).unwrap_or_default())
    }

    /// The mask the rows come from, where they are a mask's visible token blocks.
    pub fn visible_tokens(&self) -> Option<&VisibleTokens> {
        self.tokens.as_deref()
    }

    /// The table on `dev` (built or uploaded on first use).
    #[cfg(feature = "cuda")]
    pub(crate) fn device_table(&self, dev: &candle_core::cuda_backend::CudaDevice) -> Result<Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<i32>>> {
        self.device_table.get(dev, self)
    }

    /// Errors unless `nbr[n, t] = m` implies `nbr[m, k*k-1-t] = n` (the tap (i, j) flipped to
    /// (k-1-i, k-1-j)). Entries must already be known to be in range.
    fn check_symmetry(&self) -> Result<()> {
        let (k, kk, table) = (self.k, self.k * self.k, self.table());
        for (pos, &m) in table.iter().enumerate() {
            if m < 0 {
                continue;
            }
            let (n, t) = (pos / kk, pos % kk);
            let back = table[m as usize * kk + (kk - 1 - t)];
            if back != n as i32 {
                let f = kk - 1 - t;
                return Err(error(format!(
                    "SparseNeighbors: table is not symmetric: row {n}, tap ({}, {}) -> row {m}, \
                     but row {m}, tap ({}, {}) -> {back} instead of {n}",
                    t / k,
                    t % k,
                    f / k,
                    f % k
                )));
            }
        }
        Ok(())
    }
}

/// Checks `data [N, C]` and `weight [C, K, K]` against the table and returns C.
fn channels(op: &str, data: &[usize], weight: &[usize], nbrs: &SparseNeighbors) -> Result<usize> {
    let (rows, k) = (nbrs.rows, nbrs.k);
    let weight_fits = |c: usize| matches!(weight, &[wc, k1, k2] | &[wc, 1, k1, k2] if wc == c && k1 == k && k2 == k);
    match data.split_last() {
        Some((&c, leading)) if !leading.is_empty() && leading.iter().product::<usize>() == rows && weight_fits(c) => Ok(c),
        _ => Err(error(format!(
            "{op}: input shape {data:?} and weight shape {weight:?} do not match the neighbour \
             table ({rows} rows, kernel size {k}); expected input [{rows}, C] (or any shape of \
             {rows} rows of C) and weight [C, {k}, {k}] (or [C, 1, {k}, {k}]) with the same C"
        ))),
    }
}

/// Differentiable depthwise 2-D convolution (stride 1, zero padding `K / 2`, no bias,
/// cross-correlation like PyTorch) evaluated only at the visible positions of a masked map
/// whose input is zero at the masked positions.
///
/// `input` is `[N, C]`, one row per visible position (or any shape of N rows of C, e.g. the
/// token blocks [B * keep, cell, cell, C], with no reshape node in the graph); `weight` is
/// `[C, K, K]` (or PyTorch's `[C, 1, K, K]`); the result is shaped like `input`, with `out[n, c] = sum_{i,j} weight[c, i, j] * input[nbr[n, (i,j)], c]`, taps with
/// `nbr = -1` reading zero. Equals the dense `depthwise_conv2d` of the zero-filled map at the
/// visible positions, and so do its gradients for the visible rows and the weight.
pub fn sparse_depthwise_conv2d(
    input: &Tensor,
    weight: &Tensor,
    nbrs: &Arc<SparseNeighbors>,
) -> Result<Tensor> {
    // Checked here as well as in `cpu_fwd` so that a bad call fails with our message on every
    // device, not only where a kernel exists.
    channels(OP_NAME, input.dims(), weight.dims(), nbrs)?;
    if !crate::composite::use_kernel(&[input, weight]) {
        return crate::composite::sparse_depthwise_conv2d(input, weight, nbrs);
    }
    crate::tape::apply2(input, weight, SparseDepthwiseConv2d { nbrs: nbrs.clone() })
}

struct SparseDepthwiseConv2d {
    nbrs: Arc<SparseNeighbors>,
}

impl CustomOp2 for SparseDepthwiseConv2d {
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
        let c = channels(OP_NAME, l1.dims(), l2.dims(), &self.nbrs)?;
        let out = dispatch_float!(OP_NAME, (s1 => x, s2 => wt), {
            let taps = taps_major(&row_major(wt, l2), c, self.nbrs.k, false);
            Element::into_storage(gather_correlate(&row_major(x, l1), &taps, &self.nbrs, c))
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
        use crate::cuda::{cuda_dispatch, sparse_gather};
        use candle_core::backend::BackendStorage;
        let c = channels(OP_NAME, l1.dims(), l2.dims(), &self.nbrs)?;
        let table = self.nbrs.device_table(s1.device())?;
        let dims = (self.nbrs.rows, c, self.nbrs.k);
        let out = cuda_dispatch!(OP_NAME, s1.dtype(), sparse_gather(s1, l1, s2, l2, &table, dims, false))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        input: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Skip the gradient nobody will read (a first layer's input, a frozen weight).
        let grad_input = if input.track_op() {
            Some(grad.apply_op2_no_bwd(weight, &InputGrad { nbrs: self.nbrs.clone() })?)
        } else {
            None
        };
        let grad_weight = if weight.track_op() {
            // Shaped like the weight ([C, K, K] or [C, 1, K, K]), as candle's accumulation needs.
            Some(input.apply_op2_no_bwd(grad, &WeightGrad { nbrs: self.nbrs.clone() })?.reshape(weight.shape())?)
        } else {
            None
        };
        Ok((grad_input, grad_weight))
    }
}

/// `(grad_out [N, C], weight [C, K, K]) -> grad_input [N, C]`.
///
/// `grad_in[m, c] = sum_{n, t: nbr[n, t] = m} weight[c, t] * grad_out[n, c]`; by the symmetry
/// of the table the `n` with `nbr[n, t] = m` is `nbr[m, flip(t)]`, so this is the forward
/// gather with the kernel rotated by 180 degrees: no scatter, no races, deterministic.
struct InputGrad {
    nbrs: Arc<SparseNeighbors>,
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "sparse_depthwise_conv2d_input_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = channels(self.name(), l1.dims(), l2.dims(), &self.nbrs)?;
        let out = dispatch_float!(self.name(), (s1 => grad, s2 => wt), {
            let taps = taps_major(&row_major(wt, l2), c, self.nbrs.k, true);
            Element::into_storage(gather_correlate(&row_major(grad, l1), &taps, &self.nbrs, c))
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
        use crate::cuda::{cuda_dispatch, sparse_gather};
        use candle_core::backend::BackendStorage;
        let c = channels(self.name(), l1.dims(), l2.dims(), &self.nbrs)?;
        let table = self.nbrs.device_table(s1.device())?;
        let dims = (self.nbrs.rows, c, self.nbrs.k);
        let out = cuda_dispatch!(self.name(), s1.dtype(), sparse_gather(s1, l1, s2, l2, &table, dims, true))?;
        Ok((out, l1.shape().clone()))
    }
}

/// `(input [N, C], grad_out [N, C]) -> grad_weight [C, K, K]`.
struct WeightGrad {
    nbrs: Arc<SparseNeighbors>,
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "sparse_depthwise_conv2d_weight_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = self.channels(l1.dims(), l2.dims())?;
        let k = self.nbrs.k;
        let out = dispatch_float!(self.name(), (s1 => x, s2 => gout), {
            let tc = weight_grad(&row_major(x, l1), &row_major(gout, l2), &self.nbrs, c);
            Element::into_storage(channel_major(&tc, c, k))
        });
        Ok((out, Shape::from_dims(&[c, k, k])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, sparse_weight_grad};
        use candle_core::backend::BackendStorage;
        let c = self.channels(l1.dims(), l2.dims())?;
        let k = self.nbrs.k;
        let table = self.nbrs.device_table(s1.device())?;
        let dims = (self.nbrs.rows, c, k);
        let out = cuda_dispatch!(self.name(), s1.dtype(), sparse_weight_grad(s1, l1, s2, l2, &table, dims))?;
        Ok((out, Shape::from_dims(&[c, k, k])))
    }
}

impl WeightGrad {
    /// Checks `input` and `grad_out` are the same `[N, C]` for the table and returns C.
    fn channels(&self, input: &[usize], grad: &[usize]) -> Result<usize> {
        let (rows, k) = (self.nbrs.rows, self.nbrs.k);
        let leading = &input[..input.len().saturating_sub(1)];
        if input != grad || input.len() < 2 || leading.iter().product::<usize>() != rows {
            candle_core::bail!(
                "{}: input shape {input:?} and output-gradient shape {grad:?} must be the same \
                 {rows} rows of C (neighbour table of {rows} rows, kernel size {k})",
                self.name()
            );
        }
        Ok(input[input.len() - 1])
    }
}

/// `out[n, c] = sum_t taps[t, c] * src[nbr[n, t], c]` (taps in increasing order), parallel
/// over chunks of rows. Every output element is summed by one thread in a fixed order.
pub(crate) fn gather_correlate<T: Element>(src: &[T], taps: &[T], nbrs: &SparseNeighbors, c: usize) -> Vec<T> {
    let kk = nbrs.k * nbrs.k;
    let mut out = vec![T::ZERO; nbrs.rows * c];
    if out.is_empty() {
        return out;
    }
    let rows_per_task = (ELEMS_PER_TASK / c).max(1);
    out.par_chunks_mut(rows_per_task * c).enumerate().for_each(|(task, out_rows)| {
        // (offset of the tap in `taps`, offset of the neighbour row in `src`) of the live taps.
        let mut live: Vec<(usize, usize)> = Vec::with_capacity(kk);
        for (r, out_row) in out_rows.chunks_exact_mut(c).enumerate() {
            let n = task * rows_per_task + r;
            live.clear();
            for (t, &m) in nbrs.table()[n * kk..][..kk].iter().enumerate() {
                if m >= 0 {
                    live.push((t * c, m as usize * c));
                }
            }
            let mut cb = 0;
            while cb + LANES <= c {
                let mut acc = [T::ZERO; LANES];
                for &(to, mo) in &live {
                    mac(&mut acc, &src[mo + cb..][..LANES], &taps[to + cb..][..LANES]);
                }
                out_row[cb..cb + LANES].copy_from_slice(&acc);
                cb += LANES;
            }
            if cb < c {
                // Channel tail (C not a multiple of LANES); `out_row` starts at zero.
                for &(to, mo) in &live {
                    let a = &src[mo..][..c];
                    let w = &taps[to..][..c];
                    for ch in cb..c {
                        out_row[ch] += a[ch] * w[ch];
                    }
                }
            }
        }
    });
    out
}

/// `gw[t, c] = sum_n gout[n, c] * inp[nbr[n, t], c]`, as `[K*K, C]`: one partial sum per
/// `per_partial` rows, added up in partial order.
pub(crate) fn weight_grad<T: Element>(inp: &[T], gout: &[T], nbrs: &SparseNeighbors, c: usize) -> Vec<T> {
    let (rows, kk) = (nbrs.rows, nbrs.k * nbrs.k);
    let kkc = kk * c;
    if kkc == 0 || rows == 0 {
        return vec![T::ZERO; kkc];
    }
    let table = nbrs.table();
    let per_partial = rows.div_ceil(MAX_PARTIALS).max(MIN_ROWS_PER_PARTIAL);
    let partials: Vec<Vec<T>> = (0..rows.div_ceil(per_partial))
        .into_par_iter()
        .map(|part| {
            let mut acc = vec![T::ZERO; kkc];
            let span = part * per_partial..((part + 1) * per_partial).min(rows);
            // Channel block outermost: the block of the partial's gradient rows and of their
            // neighbours' rows (one cache line each) stays in L1 while all taps sweep it.
            let mut cb = 0;
            while cb + LANES <= c {
                for t in 0..kk {
                    let mut s = [T::ZERO; LANES];
                    for n in span.clone() {
                        let m = table[n * kk + t];
                        if m >= 0 {
                            let gv = &gout[n * c + cb..][..LANES];
                            let a = &inp[m as usize * c + cb..][..LANES];
                            mac(&mut s, gv, a);
                        }
                    }
                    acc[t * c + cb..][..LANES].copy_from_slice(&s);
                }
                cb += LANES;
            }
            if cb < c {
                for n in span {
                    let gv = &gout[n * c..][..c];
                    for t in 0..kk {
                        let m = table[n * kk + t];
                        if m >= 0 {
                            let a = &inp[m as usize * c..][..c];
                            let dst = &mut acc[t * c..][..c];
                            for ch in cb..c {
                                dst[ch] += gv[ch] * a[ch];
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
