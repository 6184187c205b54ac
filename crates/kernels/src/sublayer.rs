//! The pre-norm sublayers of a block, each with its residual, as one op:
//! `x + fc2(gelu(fc1(layer_norm(x))))` (`mlp_residual`, the end of every ConvMAE block),
//! `x + proj(attention(qkv(layer_norm(x))))` (`attention_residual`, the start of every
//! transformer block) and `x + conv2(dw(conv1(layer_norm(x))) + dw_bias)` (`conv_residual`, the
//! start of a conv block on the sparse path). All are LayerNorm, a linear layer, a middle (GELU,
//! multi-head attention, or the sparse depthwise conv with its own taps and bias), a linear layer
//! and the residual, so one op serves all three (`Middle`).
//!
//! As separate ops a sublayer costs, besides the work itself:
//! - memory: candle's graph keeps each op's inputs until the backward, so the LayerNorm output
//!   ([rows, D]) and the second linear layer's output ([rows, D], held by the residual add)
//!   live from forward to backward, and in the MLP the GELU output ([rows, 4D]) too: 6 of a
//!   transformer block's ~18 [rows, D]-sized tensors in its MLP, 2 in its attention;
//! - traffic: candle's backward zero-fills and accumulates a gradient for every op input, each
//!   an activation-sized buffer written, read and written again.
//!
//! This op keeps its input x (the graph's), the first linear layer's output h ([rows, 4D] or
//! the [rows, 3D] qkv rows) and, for attention and the conv, the middle's output; on the CPU it
//! recomputes the LayerNorm output (and gelu(h)) in its backward, cheap row passes, and on CUDA
//! keeps them too (memory is not what binds there: cuda.rs `SublayerSaved`). Its arguments are
//! x, the weights packed into one tensor (the two matrices, then the conv's taps) and the
//! vectors into another (LayerNorm weight and bias, the two biases, then the conv's bias), so
//! that it fits candle's three-argument custom op; the packing copies only parameters, and none
//! where the caller keeps them packed (`PackedSublayer`).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::attention::{CudaForm, Dims as AttentionDims};
use crate::composite::{Choice, OpSwitch};
use crate::gelu::GeluFloat;
use crate::{row_major, Element, SparseNeighbors};

mod chain;
pub use chain::sublayer_chain;

/// What sits between a sublayer's two linear layers.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Middle {
    /// GELU (erf) of fc1's output: the MLP.
    Gelu,
    /// Multi-head self-attention on the qkv rows ([B, N, 3D], timm's layout): rows are B x N.
    /// `form` is the attention's on CUDA (ignored on the CPU).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Attention { tokens: usize, heads: usize, scale: f64, form: CudaForm },
    /// A conv block's sparse depthwise conv (k x k, over the op's neighbour table) with its
    /// bias: the conv block's first half, `x + conv2(dw(conv1(norm1(x))) + dw_bias)`.
    SparseConv { k: usize },
}

impl Middle {
    fn name(self) -> &'static str {
        match self {
            Self::Gelu => "mlp_residual",
            Self::Attention { .. } => "attention_residual",
            Self::SparseConv { .. } => "conv_residual",
        }
    }
    fn grad_name(self) -> &'static str {
        match self {
            Self::Gelu => "mlp_residual_backward",
            Self::Attention { .. } => "attention_residual_backward",
            Self::SparseConv { .. } => "conv_residual_backward",
        }
    }
    /// The attention's sizes for `rows` rows of width `d`.
    fn attention_dims(self, rows: usize, d: usize) -> Option<AttentionDims> {
        match self {
            Self::Gelu | Self::SparseConv { .. } => None,
            Self::Attention { tokens, heads, .. } => Some(AttentionDims { b: rows / tokens, n: tokens, heads, hd: d / heads }),
        }
    }
    /// The middle as the CUDA launch code takes it (the conv's neighbour table is the op's).
    #[cfg(feature = "cuda")]
    fn cuda_middle(self, rows: usize, d: usize, neighbours: Option<&SparseNeighbors>) -> Result<crate::cuda::CudaMiddle<'_>> {
        Ok(match self {
            Self::Attention { scale, form, .. } => match self.attention_dims(rows, d) {
                Some(dims) => crate::cuda::CudaMiddle::Attention(crate::cuda::CudaAttention { dims, scale: scale as f32, form }),
                None => unreachable!("attention has its sizes"),
            },
            Self::Gelu => crate::cuda::CudaMiddle::Gelu,
            Self::SparseConv { k } => crate::cuda::CudaMiddle::SparseConv { neighbours: neighbours.ok_or_else(|| missing_neighbours(self))?, k },
        })
    }
    /// Whether the backward needs the middle's output kept (attention: recomputing it is a
    /// whole attention forward; the conv: a gather over every tap) rather than recomputed
    /// (GELU: one element-wise pass).
    fn keeps_output(self) -> bool {
        matches!(self, Self::Attention { .. } | Self::SparseConv { .. })
    }
}

/// Widths of the sublayer: D (its input and output), the first linear layer's output (4D; 3D
/// for the qkv rows) and the second's input (4D; D).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Widths {
    pub(crate) d: usize,
    pub(crate) first_out: usize,
    pub(crate) second_in: usize,
    /// The middle's own weights (the conv's C x k x k taps) and bias (C): 0 for GELU and
    /// attention, which have none.
    pub(crate) middle_weights: usize,
    pub(crate) middle_bias: usize,
}

impl Widths {
    /// The MLP: D -> hidden -> D.
    fn mlp(d: usize, hidden: usize) -> Self {
        Self { d, first_out: hidden, second_in: hidden, middle_weights: 0, middle_bias: 0 }
    }
    /// Attention: D -> the 3D qkv rows -> D.
    fn attention(d: usize) -> Self {
        Self { d, first_out: 3 * d, second_in: d, middle_weights: 0, middle_bias: 0 }
    }
    /// A conv block's first half: D -> D (conv1), the k x k depthwise conv with its bias, -> D.
    fn conv(d: usize, k: usize) -> Self {
        Self { d, first_out: d, second_in: d, middle_weights: d * k * k, middle_bias: d }
    }
    /// [W1 (first_out x D) | W2 (D x second_in) | the middle's weights].
    pub(crate) fn weights(self) -> usize {
        self.first_out * self.d + self.d * self.second_in + self.middle_weights
    }
    /// [ln weight (D) | ln bias (D) | b1 (first_out) | b2 (D) | the middle's bias].
    pub(crate) fn vectors(self) -> usize {
        3 * self.d + self.first_out + self.middle_bias
    }
    fn rows(self, x: &Layout) -> usize {
        x.shape().elem_count() / self.d
    }
    /// [dx (rows x D) | packed weights | packed vectors].
    fn grads(self, rows: usize) -> usize {
        rows * self.d + self.weights() + self.vectors()
    }
}

/// What the forward keeps for the backward: h, the middle's output where it is not recomputed,
/// the packed vectors (the backward recomputes the LayerNorm from them, and candle's backward
/// op has no fourth argument) and, on CUDA, the LayerNorm's row statistics.
enum Saved {
    Cpu { h: CpuStorage, a: Option<CpuStorage>, vectors: CpuStorage },
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda::SublayerSaved>),
}

type SavedSlot = Arc<Mutex<Option<Saved>>>;

fn missing_neighbours(middle: Middle) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: the sparse conv has no neighbour table", middle.name()))
}

fn missing_saved(middle: Middle) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: the forward's saved tensors are missing (backward of an op that never ran forward on this device)", middle.grad_name()))
}

struct Sublayer {
    widths: Widths,
    middle: Middle,
    eps: f64,
    saved: SavedSlot,
    /// The sparse conv's neighbour table (`Middle::SparseConv` only).
    neighbours: Option<Arc<SparseNeighbors>>,
    /// Where the packs' gradients go instead of to candle (`PackGradSink`), if anywhere.
    sink: Option<PackGradSink>,
}

impl Sublayer {
    fn check(&self, x: &Layout, weights: &Layout, vectors: &Layout) -> Result<usize> {
        let w = self.widths;
        if x.dims().last() != Some(&w.d) || weights.shape().elem_count() != w.weights() || vectors.shape().elem_count() != w.vectors() {
            candle_core::bail!("{}: input {:?}, packed weights {:?} and packed vectors {:?} do not fit widths {w:?}", self.middle.name(), x.dims(), weights.dims(), vectors.dims());
        }
        Ok(w.rows(x))
    }
}

/// The packed parameters, split (`mw`, `mb`: the middle's weights and bias, empty but for the conv).
struct Params<'a, T> {
    w1: &'a [T],
    w2: &'a [T],
    mw: &'a [T],
    ln_w: &'a [T],
    ln_b: &'a [T],
    b1: &'a [T],
    b2: &'a [T],
    mb: &'a [T],
}

fn split_params<'a, T>(weights: &'a [T], vectors: &'a [T], w: Widths) -> Params<'a, T> {
    let (w1, rest) = weights.split_at(w.first_out * w.d);
    let (w2, mw) = rest.split_at(w.d * w.second_in);
    let (ln_w, rest) = vectors.split_at(w.d);
    let (ln_b, rest) = rest.split_at(w.d);
    let (b1, rest) = rest.split_at(w.first_out);
    let (b2, mb) = rest.split_at(w.d);
    Params { w1, w2, mw, ln_w, ln_b, b1, b2, mb }
}

/// The middle on the CPU: what it is fed, its own parameters and, for the conv, the table.
struct MiddleOn<'a, T> {
    middle: Middle,
    mw: &'a [T],
    mb: &'a [T],
    neighbours: Option<&'a SparseNeighbors>,
}

/// The middle's forward on the CPU.
fn middle_forward<T: GeluFloat>(h: &[T], rows: usize, w: Widths, m: &MiddleOn<T>) -> Result<Vec<T>> {
    Ok(match (m.middle, m.middle.attention_dims(rows, w.d)) {
        (Middle::Attention { scale, .. }, Some(dims)) => crate::attention::forward(h, dims, scale),
        (Middle::SparseConv { k }, _) => {
            let nbrs = m.neighbours.ok_or_else(|| missing_neighbours(m.middle))?;
            let taps = crate::taps::taps_major(m.mw, w.d, k, false);
            let mut out = crate::sparse_depthwise_conv::gather_correlate(h, &taps, nbrs, w.d);
            add_row(&mut out, m.mb);
            out
        }
        _ => crate::gelu::map1(h),
    })
}

/// `row` added to every row of `rows` (rows of row.len()).
fn add_row<T: Element>(rows: &mut [T], row: &[T]) {
    rows.par_chunks_mut(row.len() * 64).for_each(|chunk| {
        for r in chunk.chunks_mut(row.len()) {
            for (v, &b) in r.iter_mut().zip(row) {
                *v += b;
            }
        }
    });
}

/// What the CPU forward gives: (y, h, the middle's output if kept).
type Forward<T> = (Vec<T>, Vec<T>, Option<Vec<T>>);

/// The forward on the CPU.
#[allow(clippy::too_many_arguments)]
fn forward<T: GeluFloat>(x: &[T], weights: &[T], vectors: &[T], rows: usize, w: Widths, middle: Middle, neighbours: Option<&SparseNeighbors>, eps: T) -> Result<Forward<T>> {
    let Params { w1, w2, mw, ln_w, ln_b, b1, b2, mb } = split_params(weights, vectors, w);
    let xln = crate::layer_norm::forward(x, ln_w, ln_b, w.d, eps);
    let h = crate::linear::forward(&xln, w1, b1, rows, w.d, w.first_out);
    drop(xln);
    let a = middle_forward(&h, rows, w, &MiddleOn { middle, mw, mb, neighbours })?;
    // y = x + b2, then y += a W2^T.
    let mut y = x.to_vec();
    add_row(&mut y, b2);
    crate::linear::accumulate(&mut y, &a, w2, rows, w.second_in, w.d);
    Ok((y, h, middle.keeps_output().then_some(a)))
}

/// The backward on the CPU: [dx (rows x D) | dW1 | dW2 | d middle weights | d ln_w | d ln_b |
/// d b1 | d b2 | d middle bias], the gradients of x, the packed weights and the packed vectors,
/// in that order.
#[allow(clippy::too_many_arguments)]
fn backward<T: GeluFloat>(
    x: &[T],
    weights: &[T],
    vectors: &[T],
    h: &[T],
    kept: Option<&[T]>,
    g: &[T],
    rows: usize,
    w: Widths,
    middle: Middle,
    neighbours: Option<&SparseNeighbors>,
    eps: T,
) -> Result<Vec<T>> {
    let Params { w1, w2, mw, ln_w, ln_b, mb, .. } = split_params(weights, vectors, w);
    let on = MiddleOn { middle, mw, mb, neighbours };
    let recomputed;
    let a = match kept {
        Some(a) => a,
        None => {
            recomputed = middle_forward(h, rows, w, &on)?;
            &recomputed
        }
    };
    let second = crate::linear::backward(a, w2, g, rows, w.second_in, w.d);
    let (da, second_params) = second.split_at(rows * w.second_in);
    let (dw2, db2) = second_params.split_at(w.d * w.second_in);
    // The conv's own gradients: its taps' and its bias' (the column sums of da).
    let (mut dmw, mut dmb) = (Vec::new(), Vec::new());
    let dh = match (middle, middle.attention_dims(rows, w.d)) {
        (Middle::Attention { scale, .. }, Some(dims)) => crate::attention::backward(h, a, da, dims, scale),
        (Middle::SparseConv { k }, _) => {
            let nbrs = neighbours.ok_or_else(|| missing_neighbours(middle))?;
            let c = w.d;
            dmw = crate::taps::channel_major(&crate::sparse_depthwise_conv::weight_grad(h, da, nbrs, c), c, k);
            dmb = vec![T::ZERO; c];
            crate::linear::column_sums_into(da, rows, &mut dmb);
            crate::sparse_depthwise_conv::gather_correlate(da, &crate::taps::taps_major(mw, c, k, true), nbrs, c)
        }
        _ => crate::gelu::zip_map(h, da),
    };
    // The first linear layer, with the LayerNorm output recomputed.
    let xln = crate::layer_norm::forward(x, ln_w, ln_b, w.d, eps);
    let first = crate::linear::backward(&xln, w1, &dh, rows, w.d, w.first_out);
    drop((xln, dh));
    let (dxln, first_params) = first.split_at(rows * w.d);
    let (dw1, db1) = first_params.split_at(w.first_out * w.d);
    let ln = crate::layer_norm::backward(x, ln_w, dxln, rows, w.d, eps);
    let (dx_ln, ln_params) = ln.split_at(rows * w.d);
    let (dln_w, dln_b) = ln_params.split_at(w.d);
    let mut out = Vec::with_capacity(w.grads(rows));
    // dx = g (the residual) + the LayerNorm path.
    out.extend_from_slice(g);
    out.par_chunks_mut(w.d * 64).zip(dx_ln.par_chunks(w.d * 64)).for_each(|(o, l)| {
        for (o, &l) in o.iter_mut().zip(l) {
            *o += l;
        }
    });
    for part in [dw1, dw2, &dmw[..], dln_w, dln_b, db1, db2, &dmb[..]] {
        out.extend_from_slice(part);
    }
    Ok(out)
}

impl CustomOp3 for Sublayer {
    fn name(&self) -> &'static str {
        self.middle.name()
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout, sv: &CpuStorage, lv: &Layout) -> Result<(CpuStorage, Shape)> {
        let rows = self.check(lx, lw, lv)?;
        let (y, h, a, vectors) = dispatch_float!(self.middle.name(), (sx => x, sw => w, sv => v), {
            let vectors = row_major(v, lv);
            let (y, h, a) = forward(&row_major(x, lx), &row_major(w, lw), &vectors, rows, self.widths, self.middle, self.neighbours.as_deref(), Element::from_f64(self.eps))?;
            (Element::into_storage(y), Element::into_storage(h), a.map(Element::into_storage), Element::into_storage(vectors.into_owned()))
        });
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved::Cpu { h, a, vectors });
        Ok((y, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sv: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, sublayer_fwd};
        use candle_core::backend::BackendStorage;
        let rows = self.check(lx, lw, lv)?;
        let w = self.widths;
        let middle = self.middle.cuda_middle(rows, w.d, self.neighbours.as_deref())?;
        let (y, saved) = cuda_dispatch!(self.middle.name(), sx.dtype(), sublayer_fwd(sx, lx, sw, lw, sv, lv, w, &middle, self.eps))?;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved::Cuda(Box::new(saved)));
        Ok((y, lx.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, weights: &Tensor, vectors: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let w = self.widths;
        let rows = x.elem_count() / w.d;
        let backward = SublayerBackward {
            widths: w,
            middle: self.middle,
            eps: self.eps,
            saved: self.saved.clone(),
            neighbours: self.neighbours.clone(),
            param_grads: Arc::new(Mutex::new(None)),
        };
        let dx = x.apply_op3_no_bwd(weights, grad, &backward)?.reshape(x.shape())?;
        let params = backward.param_grads.lock().unwrap_or_else(|e| e.into_inner()).take();
        let params = params.ok_or_else(|| candle_core::Error::Msg(format!("{}: the parameters' gradients went missing", self.middle.grad_name())))?;
        debug_assert_eq!(rows * w.d, dx.elem_count());
        let nw = w.weights();
        let dw = params.narrow(0, 0, nw)?.reshape(weights.shape())?;
        let dv = params.narrow(0, nw, w.vectors())?.reshape(vectors.shape())?;
        match &self.sink {
            Some(sink) => {
                sink.put(dw, dv);
                Ok((Some(dx), None, None))
            }
            None => Ok((Some(dx), Some(dw), Some(dv))),
        }
    }
}

/// (x, packed weights, grad) -> the packed gradients (see `backward`), from what the forward saved.
/// Its result is dx; the parameters' gradients, [dW | dV] (`Widths::weights`, then `vectors`),
/// come in a buffer of their own, left in `param_grads`: one buffer for both would keep dx's
/// memory alive for as long as the parameters' gradients are (to the optimizer's update, where
/// a sink delivers them: `PackGradSink`).
struct SublayerBackward {
    widths: Widths,
    middle: Middle,
    eps: f64,
    saved: SavedSlot,
    neighbours: Option<Arc<SparseNeighbors>>,
    param_grads: Arc<Mutex<Option<Tensor>>>,
}

impl SublayerBackward {
    fn keep_param_grads(&self, storage: candle_core::Storage) {
        let n = self.widths.weights() + self.widths.vectors();
        let t = Tensor::from_storage(storage, n, candle_core::op::BackpropOp::none(), false);
        *self.param_grads.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
    }
}

impl SublayerBackward {
    fn check(&self, x: &Layout, weights: &Layout, grad: &Layout) -> Result<usize> {
        let name = self.middle.grad_name();
        crate::same_shape(name, "input", x.dims(), "output-gradient", grad.dims())?;
        if x.dims().last() != Some(&self.widths.d) || weights.shape().elem_count() != self.widths.weights() {
            candle_core::bail!("{name}: input {:?} and packed weights {:?} do not fit widths {:?}", x.dims(), weights.dims(), self.widths);
        }
        Ok(self.widths.rows(x))
    }
}

impl CustomOp3 for SublayerBackward {
    fn name(&self) -> &'static str {
        self.middle.grad_name()
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout, sg: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let rows = self.check(lx, lw, lg)?;
        let w = self.widths;
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(Saved::Cpu { h: sh, a: sa, vectors: sv }) = saved.as_ref() else { return Err(missing_saved(self.middle)) };
        if sa.is_some() != self.middle.keeps_output() {
            return Err(missing_saved(self.middle));
        }
        // The kept middle output travels with h (same dtype); an empty stand-in when there is none.
        let empty;
        let sa = match sa {
            Some(a) => a,
            None => {
                empty = match sh {
                    CpuStorage::F64(_) => CpuStorage::F64(Vec::new()),
                    _ => CpuStorage::F32(Vec::new()),
                };
                &empty
            }
        };
        let (dx, params) = dispatch_float!(self.middle.grad_name(), (sx => x, sw => wt, sg => g, sh => h, sv => v, sa => a), {
            if h.len() != rows * w.first_out {
                return Err(missing_saved(self.middle));
            }
            let kept = self.middle.keeps_output().then_some(a.as_slice());
            let eps = Element::from_f64(self.eps);
            let mut all = backward(&row_major(x, lx), &row_major(wt, lw), v, h, kept, &row_major(g, lg), rows, w, self.middle, self.neighbours.as_deref(), eps)?;
            let params = all.split_off(rows * w.d);
            (Element::into_storage(all), Element::into_storage(params))
        });
        self.keep_param_grads(candle_core::Storage::Cpu(params));
        Ok((dx, Shape::from(rows * w.d)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, sublayer_bwd};
        use candle_core::backend::BackendStorage;
        let rows = self.check(lx, lw, lg)?;
        let w = self.widths;
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(Saved::Cuda(saved)) = saved.as_ref() else { return Err(missing_saved(self.middle)) };
        let middle = self.middle.cuda_middle(rows, w.d, self.neighbours.as_deref())?;
        let (dx, params) = cuda_dispatch!(self.middle.grad_name(), sx.dtype(), sublayer_bwd(sx, lx, sw, lw, sg, lg, saved, w, &middle, self.eps))?;
        self.keep_param_grads(candle_core::Storage::Cuda(params));
        Ok((dx, Shape::from(rows * w.d)))
    }
}

/// Below this many rows per unit of width the one op costs more than it saves (`one_op`).
const MIN_ROWS_PER_WIDTH: usize = 2;

/// Whether a sublayer of width `d` over `rows` rows runs as one op: our kernels serve all its
/// arguments, and `CONVMAE_SUBLAYER` says `fused`, or `auto` (the default) and the sublayer is
/// big enough. What the op saves is activation traffic and memory: counting the buffers it
/// skips, some 20-30 passes over a [rows, D] tensor (an estimate, not a measurement). What it
/// costs is packing the weights (4 D^2 or 8 D^2 parameters) and their gradient, a few passes
/// over those. By that count it pays from about rows = D; `auto` asks for 2 D. Measured on 2
/// CPU cores at ConvMAE-B batch 8 (benches/results, tags `sublayer-ab*`): with every sublayer
/// as one op a step was ~4% slower than with the separate ops, and with `auto` the same within
/// noise (`sublayer-auto-ab*`); stage 3 there has 392 rows of width 768, the decoder 1568 of
/// 512. On a GPU at batch 64 every ConvMAE-B sublayer is past the threshold (stage 3: 3136 rows).
///
/// The op's linear layers are our linear op's code, so `CONVMAE_LINEAR=composite` (the valve
/// for that op on CUDA) sends the sublayers to their separate ops too.
fn one_op(args: &[&Tensor], rows: usize, d: usize) -> bool {
    let linear_ours = args[0].device().is_cpu() || !OpSwitch::Linear.composite();
    crate::composite::use_kernel(args)
        && linear_ours
        && match OpSwitch::Sublayer.choice() {
            // (`gemm`, `flash` and `flash-mma` are CONVMAE_ATTENTION's alone, never this variable's.)
            Choice::Ours | Choice::Gemm | Choice::Flash | Choice::FlashMma => true,
            Choice::Composite => false,
            Choice::Auto => rows >= MIN_ROWS_PER_WIDTH * d,
        }
}

/// Runs the op on the parameters, packed here (GELU and attention: no middle parameters).
fn apply(x: &Tensor, norm: (&Tensor, &Tensor), eps: f64, first: (&Tensor, &Tensor), second: (&Tensor, &Tensor), widths: Widths, middle: Middle) -> Result<Tensor> {
    let weights = Tensor::cat(&[first.0.flatten_all()?, second.0.flatten_all()?], 0)?;
    let vectors = Tensor::cat(&[norm.0.flatten_all()?, norm.1.flatten_all()?, first.1.flatten_all()?, second.1.flatten_all()?], 0)?;
    apply_packed(x, &weights, &vectors, eps, widths, middle, None)
}

/// The op itself, on parameters packed by the caller (here: `apply`, `conv_residual`), its
/// packs' gradients returned to candle.
fn apply_packed(x: &Tensor, weights: &Tensor, vectors: &Tensor, eps: f64, widths: Widths, middle: Middle, neighbours: Option<Arc<SparseNeighbors>>) -> Result<Tensor> {
    crate::tape::apply3(x, weights, vectors, Sublayer { widths, middle, eps, saved: Arc::new(Mutex::new(None)), neighbours, sink: None })
}

/// A sublayer's parameters as its one op reads them, each flat (1-D) and in this order:
/// `weights` = [first layer's weight | second layer's weight], `vectors` = [LayerNorm weight |
/// LayerNorm bias | first layer's bias | second layer's bias]. Whoever keeps the parameters
/// packed this way (the model's bf16 compute copies: convmae-core `ParamStore`) saves the op
/// two concatenations a call and the backward a gradient node per parameter, and gets each
/// parameter's gradient as a slice of the pack's.
///
/// `sink`: where the op's backward puts the two packs' gradients instead of returning them to
/// candle (`PackGradSink`); None returns them, as for any argument.
#[derive(Clone, Copy, Debug)]
pub struct PackedSublayer<'a> {
    pub weights: &'a Tensor,
    pub vectors: &'a Tensor,
    pub sink: Option<&'a PackGradSink>,
}

/// Where a packed sublayer's one op leaves its packs' gradients (weights, vectors) in its
/// backward, rather than returning them to candle. candle's backward starts every gradient it
/// receives as zeros and adds to it (`GradStore::or_insert`, then an add): for a pack, which
/// the one op alone reads, that is a fill and an add the size of its parameters, two launches
/// and two allocations a pack, 92 packs in a ConvMAE-B step (run 7's trace, with 84 packs then:
/// 84 adds at the packs' sizes, 0.66 ms of its 5.2 ms of `badd`; the fills are not kernels and
/// not in it). The owner of the packs hands them to
/// the gradient store after the backward (`deliver`), as views of the op's own result: no
/// copy. A sink is made for one forward and read after its backward; the op writes it once.
#[derive(Clone, Debug, Default)]
pub struct PackGradSink(Arc<Mutex<Option<(Tensor, Tensor)>>>);

impl PackGradSink {
    pub fn new() -> Self {
        Self::default()
    }

    fn put(&self, weights: Tensor, vectors: Tensor) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((weights, vectors));
    }

    /// Adds what the backward left here to `grads` as the gradients of `weights` and `vectors`
    /// (to what reached them otherwise, if anything did); nothing if the op did not run as one
    /// op (its separate ops return the packs' gradients to candle themselves).
    pub fn deliver(&self, weights: &Tensor, vectors: &Tensor, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        let Some((gw, gv)) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take() else { return Ok(()) };
        for (pack, g) in [(weights, gw), (vectors, gv)] {
            let sum = match grads.remove(pack) {
                Some(other) => (other + g)?,
                None => g,
            };
            grads.insert(pack, sum);
        }
        Ok(())
    }
}

/// The parameters of a packed sublayer as views of its packs (first and second layer as
/// [out, in] matrices; the middle's weights flat and its bias, empty but for the conv), for the
/// separate ops.
struct Unpacked {
    ln_w: Tensor,
    ln_b: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    mw: Tensor,
    mb: Tensor,
}

impl PackedSublayer<'_> {
    fn check(&self, name: &str, x: &Tensor, w: Widths) -> Result<()> {
        let flat = |t: &Tensor| t.rank() == 1;
        if x.dims().last() != Some(&w.d) || !flat(self.weights) || !flat(self.vectors) || self.weights.elem_count() != w.weights() || self.vectors.elem_count() != w.vectors() {
            candle_core::bail!(
                "{name}: input {:?}, packed weights {:?} and packed vectors {:?} do not fit one sublayer (flat packs of {} weights and {} vector entries expected)",
                x.dims(),
                self.weights.dims(),
                self.vectors.dims(),
                w.weights(),
                w.vectors()
            );
        }
        Ok(())
    }

    fn unpack(&self, w: Widths) -> Result<Unpacked> {
        let (d, fo, si) = (w.d, w.first_out, w.second_in);
        let v = |start: usize, len: usize| self.vectors.narrow(0, start, len);
        Ok(Unpacked {
            ln_w: v(0, d)?,
            ln_b: v(d, d)?,
            b1: v(2 * d, fo)?,
            b2: v(2 * d + fo, d)?,
            mb: v(3 * d + fo, w.middle_bias)?,
            w1: self.weights.narrow(0, 0, fo * d)?.reshape((fo, d))?,
            w2: self.weights.narrow(0, fo * d, d * si)?.reshape((d, si))?,
            mw: self.weights.narrow(0, fo * d + d * si, w.middle_weights)?,
        })
    }
}

/// One packed sublayer with what it needs besides its packs: what `*_residual_packed` apply
/// alone and `sublayer_chain` applies one after another.
#[derive(Clone, Copy, Debug)]
pub enum SublayerLink<'a> {
    /// `mlp_residual`, fc1's width `hidden`.
    Mlp { pack: PackedSublayer<'a>, eps: f64, hidden: usize },
    /// `attention_residual` with `heads` heads.
    Attention { pack: PackedSublayer<'a>, eps: f64, heads: usize },
    /// `conv_residual` over the neighbour table's rows; the packs as `conv_residual_packed` says.
    Conv { pack: PackedSublayer<'a>, eps: f64, neighbours: &'a Arc<SparseNeighbors> },
}

impl SublayerLink<'_> {
    fn name(&self) -> &'static str {
        match self {
            Self::Mlp { .. } => "mlp_residual",
            Self::Attention { .. } => "attention_residual",
            Self::Conv { .. } => "conv_residual",
        }
    }

    fn pack(&self) -> PackedSublayer<'_> {
        match *self {
            Self::Mlp { pack, .. } | Self::Attention { pack, .. } | Self::Conv { pack, .. } => pack,
        }
    }

    fn eps(&self) -> f64 {
        match *self {
            Self::Mlp { eps, .. } | Self::Attention { eps, .. } | Self::Conv { eps, .. } => eps,
        }
    }

    /// The sublayer's widths for input `x`, its packs checked against them.
    fn widths(&self, x: &Tensor) -> Result<Widths> {
        let d = x.dim(candle_core::D::Minus1)?;
        let widths = match *self {
            Self::Mlp { hidden, .. } => Widths::mlp(d, hidden),
            Self::Attention { heads, .. } => {
                if heads == 0 || d % heads != 0 {
                    candle_core::bail!("attention_residual: width {d} of input {:?} is not a multiple of {heads} heads", x.dims());
                }
                Widths::attention(d)
            }
            Self::Conv { neighbours, .. } => {
                check_rows("conv_residual", x, d, neighbours)?;
                Widths::conv(d, neighbours.k())
            }
        };
        self.pack().check(self.name(), x, widths)?;
        Ok(widths)
    }

    /// The one op for input `x` (any input of the same shape, dtype and device: every link of a
    /// chain plans on the chain's input), or None where the sublayer runs as its separate ops:
    /// `one_op` says so, for the conv `CONVMAE_COMPOSITE_OPS` lists `conv_residual`, for
    /// attention on CUDA no form of our attention op serves.
    fn one_op(&self, x: &Tensor) -> Result<Option<Sublayer>> {
        let widths = self.widths(x)?;
        let pack = self.pack();
        let args = [x, pack.weights, pack.vectors];
        let rows = x.elem_count() / widths.d;
        let (middle, neighbours) = match *self {
            Self::Mlp { .. } => (one_op(&args, rows, widths.d).then_some(Middle::Gelu), None),
            Self::Attention { heads, .. } => {
                let (b, n, d) = x.dims3()?;
                let scale = ((d / heads) as f64).powf(-0.5);
                let form = match (one_op(&args, rows, d), x.device().is_cpu()) {
                    (false, _) => None,
                    (true, true) => Some(CudaForm::Fused),
                    (true, false) => crate::attention::cuda_form(AttentionDims { b, n, heads, hd: d / heads }, x.dtype(), x.device(), scale)?,
                };
                (form.map(|form| Middle::Attention { tokens: n, heads, scale, form }), None)
            }
            Self::Conv { neighbours, .. } => {
                let ours = one_op(&args, rows, widths.d) && !crate::composite::sent_to_composite("conv_residual");
                (ours.then_some(Middle::SparseConv { k: neighbours.k() }), Some(neighbours.clone()))
            }
        };
        Ok(middle.map(|middle| Sublayer { widths, middle, eps: self.eps(), saved: Arc::new(Mutex::new(None)), neighbours, sink: pack.sink.cloned() }))
    }

    /// The separate ops on views of the packs: the one op's values.
    fn separate(&self, x: &Tensor) -> Result<Tensor> {
        let widths = self.widths(x)?;
        let p = self.pack().unpack(widths)?;
        let eps = self.eps();
        match *self {
            Self::Mlp { .. } => mlp_residual(x, (&p.ln_w, &p.ln_b), eps, (&p.w1, &p.b1), (&p.w2, &p.b2)),
            Self::Attention { heads, .. } => attention_residual(x, (&p.ln_w, &p.ln_b), eps, (&p.w1, &p.b1), (&p.w2, &p.b2), heads),
            Self::Conv { neighbours, .. } => {
                let (d, k) = (widths.d, neighbours.k());
                conv_separate(x, (&p.ln_w, &p.ln_b), eps, (&p.w1, &p.b1), (&p.mw.reshape((d, k, k))?, &p.mb), (&p.w2, &p.b2), neighbours)
            }
        }
    }

    /// The sublayer on `x`: its one op, or where that does not run its separate ops.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self.one_op(x)? {
            Some(op) => crate::tape::apply3(x, self.pack().weights, self.pack().vectors, op),
            None => self.separate(x),
        }
    }
}

/// `mlp_residual` on packed parameters (`PackedSublayer`; fc1's width is `hidden`). Where the
/// one op does not run (`one_op`), the separate ops on views of the packs: the same values.
pub fn mlp_residual_packed(x: &Tensor, pack: PackedSublayer, eps: f64, hidden: usize) -> Result<Tensor> {
    SublayerLink::Mlp { pack, eps, hidden }.apply(x)
}

/// `attention_residual` on packed parameters (`PackedSublayer`), as `mlp_residual_packed`.
pub fn attention_residual_packed(x: &Tensor, pack: PackedSublayer, eps: f64, heads: usize) -> Result<Tensor> {
    SublayerLink::Attention { pack, eps, heads }.apply(x)
}

/// `conv_residual` on packed parameters: `pack.weights` = [conv1 | conv2 | the depthwise taps
/// (C x k x k)], `pack.vectors` = [norm1 weight | norm1 bias | conv1 bias | conv2 bias | the
/// depthwise bias]. Where the one op does not run (`one_op`), the separate ops on views of the packs.
pub fn conv_residual_packed(x: &Tensor, pack: PackedSublayer, eps: f64, neighbours: &Arc<SparseNeighbors>) -> Result<Tensor> {
    SublayerLink::Conv { pack, eps, neighbours }.apply(x)
}

/// `x + conv2(dw(conv1(layer_norm(x, ln_w, ln_b, eps))) + dw_bias)` over the rows of `x`: the
/// first half of a ConvMAE conv block (CBlock) on the sparse path, with its residual. `x` is any
/// shape of N rows of C (the token blocks [B * keep, cell, cell, C]), N the rows of the
/// neighbour table; `conv1` and `conv2` are (weight [C, C] or a [C, C, 1, 1] kernel, bias [C]),
/// `dw` the depthwise conv's (weight [C, 1, k, k] or [C, k, k], bias [C]). As one op where
/// `one_op` says so (the sparse conv in the middle of the sublayer op) and `CONVMAE_COMPOSITE_OPS`
/// does not list `conv_residual`, otherwise as the separate ops: the same values.
pub fn conv_residual(
    x: &Tensor,
    norm: (&Tensor, &Tensor),
    eps: f64,
    conv1: (&Tensor, &Tensor),
    dw: (&Tensor, &Tensor),
    conv2: (&Tensor, &Tensor),
    neighbours: &Arc<SparseNeighbors>,
) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let k = neighbours.k();
    let widths = Widths::conv(d, k);
    check_params("conv_residual", x, norm, conv1, conv2, widths)?;
    check_rows("conv_residual", x, d, neighbours)?;
    if dw.0.elem_count() != d * k * k || dw.0.dim(0)? != d || dw.1.elem_count() != d {
        candle_core::bail!("conv_residual: depthwise weight {:?} and bias {:?} do not fit {d} channels of {k}x{k} taps", dw.0.dims(), dw.1.dims());
    }
    if !one_op(&[x, norm.0, norm.1, conv1.0, conv1.1, dw.0, dw.1, conv2.0, conv2.1], neighbours.rows(), d) || crate::composite::sent_to_composite("conv_residual") {
        return conv_separate(x, norm, eps, conv1, dw, conv2, neighbours);
    }
    let weights = Tensor::cat(&[conv1.0.flatten_all()?, conv2.0.flatten_all()?, dw.0.flatten_all()?], 0)?;
    let vectors = Tensor::cat(&[norm.0.flatten_all()?, norm.1.flatten_all()?, conv1.1.flatten_all()?, conv2.1.flatten_all()?, dw.1.flatten_all()?], 0)?;
    apply_packed(x, &weights, &vectors, eps, widths, Middle::SparseConv { k }, Some(neighbours.clone()))
}

/// The rows of `x` (width `d`) must be the neighbour table's.
fn check_rows(name: &str, x: &Tensor, d: usize, neighbours: &SparseNeighbors) -> Result<()> {
    if d == 0 || x.elem_count() / d != neighbours.rows() {
        candle_core::bail!("{name}: input {:?} is not the {} rows of the neighbour table", x.dims(), neighbours.rows());
    }
    Ok(())
}

/// conv2(h + dw_bias) as conv2's linear op with the depthwise conv's bias folded into conv2's:
/// W2 h + (W2 dw_bias + b2), a [1, C] row through the same linear op instead of a broadcast add
/// over every position (in run 4's H100 profile that add cost a forward pass, and in the
/// backward two gradient accumulations and a column sum, per stage-1 block). Exact in real
/// arithmetic; in floating point the bias meets the sum in another order (f32 parity on the
/// H100: worst 8.2e-7 before, 7.0e-7 after). `conv2` is (weight, bias); the conv blocks' separate
/// ops use it on every path.
pub fn conv2_with_dw_bias(h: &Tensor, dw_bias: &Tensor, conv2: (&Tensor, &Tensor)) -> Result<Tensor> {
    let b2 = crate::linear(&dw_bias.flatten_all()?.unsqueeze(0)?, conv2.0, conv2.1)?.squeeze(0)?;
    crate::linear(h, conv2.0, &b2)
}

/// `conv_residual` as separate ops (the bias folded into conv2's: `conv2_with_dw_bias`).
fn conv_separate(
    x: &Tensor,
    norm: (&Tensor, &Tensor),
    eps: f64,
    conv1: (&Tensor, &Tensor),
    dw: (&Tensor, &Tensor),
    conv2: (&Tensor, &Tensor),
    neighbours: &Arc<SparseNeighbors>,
) -> Result<Tensor> {
    let h = crate::layer_norm(x, norm.0, norm.1, eps)?;
    let h = crate::linear(&h, conv1.0, conv1.1)?;
    let h = crate::sparse_depthwise_conv2d(&h, dw.0, neighbours)?;
    x + conv2_with_dw_bias(&h, dw.1, conv2)?
}

/// Checks the parameter shapes against the widths (weights may be 1x1-conv kernels).
fn check_params(name: &str, x: &Tensor, norm: (&Tensor, &Tensor), first: (&Tensor, &Tensor), second: (&Tensor, &Tensor), w: Widths) -> Result<()> {
    let fits = norm.0.elem_count() == w.d
        && norm.1.elem_count() == w.d
        && first.0.elem_count() == w.first_out * w.d
        && first.0.dim(0)? == w.first_out
        && first.1.elem_count() == w.first_out
        && second.0.elem_count() == w.d * w.second_in
        && second.0.dim(0)? == w.d
        && second.1.elem_count() == w.d;
    if !fits {
        candle_core::bail!(
            "{name}: input {:?}, norm {:?} / {:?}, first layer {:?} / {:?} and second layer {:?} / {:?} do not fit one sublayer",
            x.dims(),
            norm.0.dims(),
            norm.1.dims(),
            first.0.dims(),
            first.1.dims(),
            second.0.dims(),
            second.1.dims()
        );
    }
    Ok(())
}

/// `x + fc2(gelu(fc1(layer_norm(x, ln_w, ln_b, eps))))` over the last dim of `x`: the MLP
/// sublayer of a pre-norm block with its residual. `fc1` is (weight [hidden, D], bias
/// [hidden]), `fc2` is (weight [D, hidden], bias [D]); 1x1-conv weights ([out, in, 1, 1]) are
/// accepted. Differentiable w.r.t. everything. As one op or as the separate ops (`one_op`
/// decides): the same values either way.
///
/// With every MLP sublayer as one op, a ConvMAE-B step at batch 8 on 2 CPU cores took the
/// same time within noise and peaked at a steady 3.34 GB RSS where the separate ops peaked at
/// 3.38 to 3.95 GB (benches/results, tags `mlp-ab3-*`, `mlp-ab4-*`, when the variable was
/// `CONVMAE_MLP`); `one_op` says when it is used by default. The GPU check's op timings
/// compare the two forms at batch 64 (`mlp_residual:decoder`, `mlp_separate:decoder`).
pub fn mlp_residual(x: &Tensor, norm: (&Tensor, &Tensor), eps: f64, fc1: (&Tensor, &Tensor), fc2: (&Tensor, &Tensor)) -> Result<Tensor> {
    let widths = Widths::mlp(x.dim(candle_core::D::Minus1)?, fc1.0.dim(0)?);
    check_params("mlp_residual", x, norm, fc1, fc2, widths)?;
    if !one_op(&[x, norm.0, norm.1, fc1.0, fc1.1, fc2.0, fc2.1], x.elem_count() / widths.d, widths.d) {
        let h = crate::layer_norm(x, norm.0, norm.1, eps)?;
        let h = crate::linear_gelu(&h, fc1.0, fc1.1)?;
        return x + crate::linear(&h, fc2.0, fc2.1)?;
    }
    apply(x, norm, eps, fc1, fc2, widths, Middle::Gelu)
}

/// `x + proj(self_attention(qkv(layer_norm(x, ln_w, ln_b, eps)), heads))` for `x` [B, N, D]:
/// the attention sublayer of a pre-norm transformer block with its residual (timm's `Block`
/// first half; scale head_dim^-0.5). `qkv` is (weight [3D, D], bias [3D]), `proj` (weight
/// [D, D], bias [D]). As one op where `one_op` says so and, on CUDA, attention runs our op (in
/// the form `CONVMAE_ATTENTION` forces, or `auto`'s pick for this shape); otherwise as the
/// separate ops.
pub fn attention_residual(x: &Tensor, norm: (&Tensor, &Tensor), eps: f64, qkv: (&Tensor, &Tensor), proj: (&Tensor, &Tensor), heads: usize) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    if heads == 0 || d % heads != 0 {
        candle_core::bail!("attention_residual: width {d} of input {:?} is not a multiple of {heads} heads", x.dims());
    }
    let scale = ((d / heads) as f64).powf(-0.5);
    let widths = Widths::attention(d);
    check_params("attention_residual", x, norm, qkv, proj, widths)?;
    let dims = AttentionDims { b, n, heads, hd: d / heads };
    // On CUDA the attention's form (or None: candle's composition, which the one op cannot run).
    let form = match (one_op(&[x, norm.0, norm.1, qkv.0, qkv.1, proj.0, proj.1], b * n, d), x.device().is_cpu()) {
        (false, _) => None,
        (true, true) => Some(CudaForm::Fused),
        (true, false) => crate::attention::cuda_form(dims, x.dtype(), x.device(), scale)?,
    };
    let Some(form) = form else {
        let h = crate::layer_norm(x, norm.0, norm.1, eps)?;
        let h = crate::self_attention(&crate::linear(&h, qkv.0, qkv.1)?, heads, scale)?;
        return x + crate::linear(&h, proj.0, proj.1)?;
    };
    apply(x, norm, eps, qkv, proj, widths, Middle::Attention { tokens: n, heads, scale, form })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_packs_match, assert_same_function, rand};
    use candle_core::{DType, Var};

    /// The op against the five ops it replaces (our LayerNorm, linear + GELU, linear, add),
    /// f64 and f32, forward and every gradient, with a conv-shaped fc2 weight and a strided
    /// input.
    #[test]
    fn matches_the_separate_ops_forward_and_backward() {
        for dtype in [DType::F64, DType::F32] {
            let (d, hidden) = (6, 10);
            let to = |t: Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
            let x_t = to((rand(&[2, d, 7], 1) * 3.0).unwrap());
            let ln_w = to((rand(&[d], 2) + 1.0).unwrap());
            let ln_b = to(rand(&[d], 3));
            let w1 = to(rand(&[hidden, d], 4));
            let b1 = to(rand(&[hidden], 5));
            let w2 = to(rand(&[d, hidden, 1, 1], 6));
            let b2 = to(rand(&[d], 7));
            let cot = rand(&[2, 7, d], 8).to_dtype(dtype).unwrap();
            let x = x_t.as_tensor().transpose(1, 2).unwrap();
            // Path::Kernels forces the one op whatever `auto` would pick for this size.
            let fused = crate::with_path(crate::Path::Kernels, || mlp_residual(&x, (&ln_w, &ln_b), 1e-5, (&w1, &b1), (&w2, &b2))).unwrap();
            let reference = {
                let h = crate::layer_norm(&x, &ln_w, &ln_b, 1e-5).unwrap();
                let h = crate::gelu_erf(&crate::linear(&h, &w1, &b1).unwrap()).unwrap();
                (&x + crate::linear(&h, &w2, &b2).unwrap()).unwrap()
            };
            let tol = if dtype == DType::F64 { 1e-13 } else { 1e-5 };
            assert_same_function(fused, reference, &cot, &[("x", &x_t), ("ln_w", &ln_w), ("ln_b", &ln_b), ("w1", &w1), ("b1", &b1), ("w2", &w2), ("b2", &b2)], tol);
        }
    }

    /// The attention sublayer against its separate ops (LayerNorm, linear, self_attention,
    /// linear, add), f64 and f32, forward and every gradient, with a qkv bias.
    #[test]
    fn attention_matches_the_separate_ops_forward_and_backward() {
        for dtype in [DType::F64, DType::F32] {
            let (b, n, d, heads) = (2, 9, 8, 2);
            let to = |t: Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
            let x = to((rand(&[b, n, d], 11) * 2.0).unwrap());
            let ln_w = to((rand(&[d], 12) + 1.0).unwrap());
            let ln_b = to(rand(&[d], 13));
            let wq = to((rand(&[3 * d, d], 14) * 1.5).unwrap());
            let bq = to(rand(&[3 * d], 15));
            let wp = to(rand(&[d, d], 16));
            let bp = to(rand(&[d], 17));
            let cot = rand(&[b, n, d], 18).to_dtype(dtype).unwrap();
            let fused = crate::with_path(crate::Path::Kernels, || attention_residual(&x, (&ln_w, &ln_b), 1e-6, (&wq, &bq), (&wp, &bp), heads)).unwrap();
            let reference = {
                let h = crate::layer_norm(&x, &ln_w, &ln_b, 1e-6).unwrap();
                let h = crate::self_attention(&crate::linear(&h, &wq, &bq).unwrap(), heads, 0.5).unwrap();
                (x.as_tensor() + crate::linear(&h, &wp, &bp).unwrap()).unwrap()
            };
            let tol = if dtype == DType::F64 { 1e-13 } else { 1e-5 };
            assert_same_function(fused, reference, &cot, &[("x", &x), ("ln_w", &ln_w), ("ln_b", &ln_b), ("wq", &wq), ("bq", &bq), ("wp", &wp), ("bp", &bp)], tol);
        }
    }

    /// The packed entry points against the unpacked ones, by both paths (the one op, and the
    /// separate ops on views of the packs): the same values, and the packs' gradients are the
    /// parameters' gradients laid end to end.
    #[test]
    fn packed_parameters_give_the_same_values_and_gradients() {
        let (b, n, d, heads, hidden) = (2, 5, 4, 2, 6);
        let var = |shape: &[usize], seed: u64| Var::from_tensor(&rand(shape, seed)).unwrap();
        let x = var(&[b, n, d], 21);
        let cot = rand(&[b, n, d], 22);
        for attention in [false, true] {
            let first_out = if attention { 3 * d } else { hidden };
            let second_in = if attention { d } else { hidden };
            let (ln_w, ln_b, w1, b1, w2, b2) = (var(&[d], 23), var(&[d], 24), var(&[first_out, d], 25), var(&[first_out], 26), var(&[d, second_in], 27), var(&[d], 28));
            let weights = Var::from_tensor(&Tensor::cat(&[w1.flatten_all().unwrap(), w2.flatten_all().unwrap()], 0).unwrap()).unwrap();
            let vectors = Var::from_tensor(&Tensor::cat(&[ln_w.as_tensor().clone(), ln_b.as_tensor().clone(), b1.as_tensor().clone(), b2.as_tensor().clone()], 0).unwrap()).unwrap();
            let pack = PackedSublayer { weights: &weights, vectors: &vectors, sink: None };
            for path in [crate::Path::Kernels, crate::Path::Composite] {
                let (packed, unpacked) = crate::with_path(path, || {
                    if attention {
                        (attention_residual_packed(&x, pack, 1e-6, heads).unwrap(), attention_residual(&x, (&ln_w, &ln_b), 1e-6, (&w1, &b1), (&w2, &b2), heads).unwrap())
                    } else {
                        (mlp_residual_packed(&x, pack, 1e-6, hidden).unwrap(), mlp_residual(&x, (&ln_w, &ln_b), 1e-6, (&w1, &b1), (&w2, &b2)).unwrap())
                    }
                });
                let label = format!("attention {attention} {path:?}");
                assert_packs_match(&packed, &unpacked, &cot, &x, (&weights, &vectors), &[&w1, &w2], &[&ln_w, &ln_b, &b1, &b2], &label);
            }
        }
        // A pack of the wrong size is named.
        let short = rand(&[3], 29);
        let e = mlp_residual_packed(&x, PackedSublayer { weights: &short, vectors: &short, sink: None }, 1e-6, hidden).unwrap_err().to_string();
        assert!(e.contains("mlp_residual") && e.contains("packed weights [3]"), "{e}");
    }

    /// A sink takes the packs' gradients from the one op's backward: candle's store has none for
    /// them after it (no zero-fill and add), `deliver` puts them there, the same bits as the op
    /// returns without a sink, added to what reached a pack otherwise; the separate ops (the
    /// composite path) leave the sink empty and return the gradients to candle as before.
    #[test]
    fn a_sink_takes_the_packs_gradients_and_delivers_them_unchanged() {
        let (b, n, d, hidden) = (2, 5, 4, 6);
        let var = |shape: &[usize], seed: u64| Var::from_tensor(&rand(shape, seed)).unwrap();
        let x = var(&[b, n, d], 41);
        let cot = rand(&[b, n, d], 42);
        let weights = var(&[hidden * d + d * hidden], 43);
        let vectors = var(&[3 * d + hidden], 44);
        let backward = |sink: Option<&PackGradSink>, path: crate::Path| {
            let pack = PackedSublayer { weights: &weights, vectors: &vectors, sink };
            let y = crate::with_path(path, || mlp_residual_packed(&x, pack, 1e-6, hidden)).unwrap();
            // The weights also reach the loss another way, so delivering must add, not replace.
            let other = (weights.as_tensor().sum_all().unwrap() * 0.5).unwrap();
            (y * &cot).unwrap().sum_all().unwrap().add(&other).unwrap().backward().unwrap()
        };
        let values = |g: Option<&Tensor>| g.expect("a gradient").flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let plain = backward(None, crate::Path::Kernels);
        let sink = PackGradSink::new();
        let mut sunk = backward(Some(&sink), crate::Path::Kernels);
        assert!(sunk.get(&vectors).is_none(), "candle accumulated the vectors' gradient although a sink took it");
        assert_eq!(values(sunk.get(&x)), values(plain.get(&x)));
        sink.deliver(&weights, &vectors, &mut sunk).unwrap();
        for pack in [&weights, &vectors] {
            assert_eq!(values(sunk.get(pack)), values(plain.get(pack)));
        }
        // Delivered once: a second call finds the sink empty and changes nothing.
        sink.deliver(&weights, &vectors, &mut sunk).unwrap();
        assert_eq!(values(sunk.get(&vectors)), values(plain.get(&vectors)));
        // The separate ops return the packs' gradients themselves; the sink stays empty.
        let mut composite = backward(Some(&sink), crate::Path::Composite);
        let before = values(composite.get(&weights));
        sink.deliver(&weights, &vectors, &mut composite).unwrap();
        assert_eq!(values(composite.get(&weights)), before);
    }

    /// The conv block's first half as one op against its separate ops (our LayerNorm, linear,
    /// sparse depthwise conv, the bias folded into conv2, add), f64 and f32, forward and every
    /// gradient, on token blocks of a 75% mask with 1x1-conv kernels as PyTorch stores them;
    /// then the packed entry point against the unpacked one, by both paths.
    #[test]
    fn conv_matches_the_separate_ops_forward_and_backward() {
        let (images, side, cell, c, k) = (2u32, 8u32, 2u32, 6usize, 5usize);
        let positions = crate::agreement::visible_positions(images, side, cell);
        let nbrs = Arc::new(SparseNeighbors::from_positions(&positions, images as usize, side as usize, side as usize, k).unwrap());
        let rows = nbrs.rows();
        for dtype in [DType::F64, DType::F32] {
            let to = |t: Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
            let x = to((rand(&[rows, c], 31) * 2.0).unwrap());
            let ln_w = to((rand(&[c], 32) + 1.0).unwrap());
            let ln_b = to(rand(&[c], 33));
            let w1 = to(rand(&[c, c, 1, 1], 34));
            let b1 = to(rand(&[c], 35));
            let dw_w = to(rand(&[c, 1, k, k], 36));
            let dw_b = to(rand(&[c], 37));
            let w2 = to(rand(&[c, c, 1, 1], 38));
            let b2 = to(rand(&[c], 39));
            let cot = rand(&[rows, c], 40).to_dtype(dtype).unwrap();
            let fused = crate::with_path(crate::Path::Kernels, || conv_residual(&x, (&ln_w, &ln_b), 1e-6, (&w1, &b1), (&dw_w, &dw_b), (&w2, &b2), &nbrs)).unwrap();
            let reference = {
                let h = crate::layer_norm(&x, &ln_w, &ln_b, 1e-6).unwrap();
                let h = crate::linear(&h, &w1, &b1).unwrap();
                let h = crate::sparse_depthwise_conv2d(&h, &dw_w, &nbrs).unwrap().broadcast_add(&dw_b).unwrap();
                (x.as_tensor() + crate::linear(&h, &w2, &b2).unwrap()).unwrap()
            };
            let tol = if dtype == DType::F64 { 1e-13 } else { 1e-5 };
            let params = [("x", &x), ("ln_w", &ln_w), ("ln_b", &ln_b), ("w1", &w1), ("b1", &b1), ("dw_w", &dw_w), ("dw_b", &dw_b), ("w2", &w2), ("b2", &b2)];
            assert_same_function(fused, reference, &cot, &params, tol);
        }
        // Packed: the op and the separate ops on views of the packs give the unpacked values.
        let var = |shape: &[usize], seed: u64| Var::from_tensor(&rand(shape, seed)).unwrap();
        let x = var(&[rows, c], 41);
        let (ln_w, ln_b, w1, b1, dw_w, dw_b, w2, b2) = (var(&[c], 42), var(&[c], 43), var(&[c, c], 44), var(&[c], 45), var(&[c, k, k], 46), var(&[c], 47), var(&[c, c], 48), var(&[c], 49));
        let weights = Var::from_tensor(&Tensor::cat(&[w1.flatten_all().unwrap(), w2.flatten_all().unwrap(), dw_w.flatten_all().unwrap()], 0).unwrap()).unwrap();
        let vectors = Var::from_tensor(&Tensor::cat(&[ln_w.as_tensor().clone(), ln_b.as_tensor().clone(), b1.as_tensor().clone(), b2.as_tensor().clone(), dw_b.as_tensor().clone()], 0).unwrap()).unwrap();
        let cot = rand(&[rows, c], 50);
        for path in [crate::Path::Kernels, crate::Path::Composite] {
            let (packed, unpacked) = crate::with_path(path, || {
                (
                    conv_residual_packed(&x, PackedSublayer { weights: &weights, vectors: &vectors, sink: None }, 1e-6, &nbrs).unwrap(),
                    conv_residual(&x, (&ln_w, &ln_b), 1e-6, (&w1, &b1), (&dw_w, &dw_b), (&w2, &b2), &nbrs).unwrap(),
                )
            });
            assert_packs_match(&packed, &unpacked, &cot, &x, (&weights, &vectors), &[&w1, &w2, &dw_w], &[&ln_w, &ln_b, &b1, &b2, &dw_b], &format!("conv {path:?}"));
        }
        // Rows that are not the table's are named.
        let e = conv_residual(&rand(&[rows + 1, c], 51), (&ln_w, &ln_b), 1e-6, (&w1, &b1), (&dw_w, &dw_b), (&w2, &b2), &nbrs).unwrap_err().to_string();
        assert!(e.contains("conv_residual") && e.contains("rows of the neighbour table"), "{e}");
    }

    #[test]
    fn mismatched_shapes_are_named() {
        let x = rand(&[3, 4], 1);
        let (v4, w) = (rand(&[4], 2), rand(&[8, 4], 3));
        let e = mlp_residual(&x, (&v4, &v4), 1e-6, (&w, &rand(&[8], 4)), (&rand(&[4, 7], 5), &v4)).unwrap_err().to_string();
        assert!(e.contains("mlp_residual") && e.contains("[4, 7]"), "{e}");
        let x3 = rand(&[2, 3, 4], 6);
        let e = attention_residual(&x3, (&v4, &v4), 1e-6, (&rand(&[12, 4], 7), &rand(&[12], 8)), (&rand(&[4, 4], 9), &v4), 3).unwrap_err().to_string();
        assert!(e.contains("attention_residual") && e.contains("3 heads"), "{e}");
        let e = attention_residual(&x3, (&v4, &v4), 1e-6, (&rand(&[8, 4], 7), &rand(&[8], 8)), (&rand(&[4, 4], 9), &v4), 2).unwrap_err().to_string();
        assert!(e.contains("attention_residual") && e.contains("[8, 4]"), "{e}");
    }
}
