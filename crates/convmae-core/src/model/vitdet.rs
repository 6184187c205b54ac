//! The pieces of `Official-ConvMAE-Det` (spec section 6.2: detectron2's ViTDet around the ConvMAE
//! encoder) that the in-repo `DET/` detector does not have, on channels-last tensors:
//!
//! - the learnable absolute position table at the pretraining grid, resized bicubically to the
//!   token grid in every forward (`get_abs_pos`), so its gradient flows back through the resize;
//! - attention with decomposed relative positions (MViTv2's, `add_decomposed_rel_pos`): a
//!   `rel_pos_h` and a `rel_pos_w` table per block, indexed by the row and column offsets and
//!   multiplied by the (unscaled) query;
//! - window partitioning that zero-pads the grid to a multiple of the window (64 tokens in
//!   14-token windows: 70 x 70, the padding attended to as keys and dropped after);
//! - the simple feature pyramid (`SimpleFeaturePyramid`, norm "LN"): the stride-16 map
//!   deconvolved to strides 4 and 8, kept at 16 and max-pooled to 32, each through a 1x1 and a
//!   3x3 conv with a LayerNorm over channels.

use super::layers::*;
use crate::params::ParamStore;
use crate::pos_embed::bicubic_matrix;
use candle_core::{IndexOp, Result, Tensor};
use convmae_kernels as k;

/// detectron2's `LayerNorm` (the "LN" norm of the pyramid and the heads) normalizes over channels
/// with eps 1e-6.
pub const DETECTRON2_LN_EPS: f64 = 1e-6;

/// `get_abs_pos` without a class token: the [1, P*P, D] table viewed as a D-channel P x P image,
/// resized to g x g by torch's bicubic (align_corners=False), back to [1, g*g, D]. The resize is
/// one linear map per axis (`bicubic_matrix`), applied as two matmuls; at P = g the table is used
/// as it is, as the official skips the interpolation there.
pub fn resized_pos_embed(table: &Tensor, g: usize) -> Result<Tensor> {
    let (_, tokens, d) = table.dims3()?;
    let from = (tokens as f64).sqrt().round() as usize;
    if from * from != tokens {
        candle_core::bail!("pos_embed: {tokens} positions are not a square grid");
    }
    if from == g {
        return Ok(table.clone());
    }
    let axis = Tensor::from_vec(bicubic_matrix(from, g), (g, from), table.device())?.to_dtype(table.dtype())?;
    // Rows: [g, P] x [P, P * D], then per output row the columns: [g, P] x [P, D].
    let rows = axis.matmul(&table.reshape((from, from * d))?)?.reshape((g, from, d))?;
    let both = axis.unsqueeze(0)?.broadcast_as((g, g, from))?.contiguous()?.matmul(&rows)?;
    both.reshape((1, g * g, d))
}

/// The relative position offsets of a side x side grid axis as table rows: entry (q, k) is
/// q - k + side - 1 (`get_rel_pos` for equal query and key sizes, where no interpolation happens).
fn offset_rows(side: usize, device: &candle_core::Device) -> Result<Tensor> {
    let rows: Vec<u32> = (0..side).flat_map(|q| (0..side).map(move |k| (q + side - 1 - k) as u32)).collect();
    Tensor::from_vec(rows, side * side, device)
}

/// ViTDet's `Attention` of block `block` on square grids of `side` x `side` tokens [B, side^2, D]:
/// softmax((q / sqrt(hd)) k^T + rel_h + rel_w) v, then the projection, where for query (y, x) and
/// key (ky, kx) rel_h = q . rel_pos_h[y - ky + side - 1] and rel_w = q . rel_pos_w[x - kx + side - 1]
/// with the unscaled query, as `add_decomposed_rel_pos` adds them.
pub fn rel_pos_attention(p: &ParamStore, block: &str, x: &Tensor, side: usize, num_heads: usize) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    if n != side * side {
        candle_core::bail!("{block}: {n} tokens are not a {side} x {side} grid");
    }
    let hd = d / num_heads;
    let bh = b * num_heads;
    let qkv = linear_p(p, &format!("{block}.attn.qkv"), x)?.reshape((b, n, 3, num_heads, hd))?.permute((2, 0, 3, 1, 4))?;
    let q = qkv.i(0)?.contiguous()?.reshape((bh, n, hd))?;
    let key = qkv.i(1)?.contiguous()?.reshape((bh, n, hd))?;
    let v = qkv.i(2)?.contiguous()?.reshape((bh, n, hd))?;
    let logits = (&q * (hd as f64).powf(-0.5))?.matmul(&key.t()?)?;

    let offsets = offset_rows(side, x.device())?;
    // [side (query coordinate), hd, side (key coordinate)]: the tables' rows by offset, transposed
    // for the per-coordinate matmuls below.
    let table = |name: &str| -> Result<Tensor> {
        p.get(&format!("{block}.attn.{name}")).index_select(&offsets, 0)?.reshape((side, side, hd))?.transpose(1, 2)?.contiguous()
    };
    let q_grid = q.reshape((bh, side, side, hd))?;
    // rel_h[b, y, x, ky]: for each query row y, its queries [bh * side, hd] times its table rows.
    let rel_h = q_grid.permute((1, 0, 2, 3))?.contiguous()?.reshape((side, bh * side, hd))?.matmul(&table("rel_pos_h")?)?;
    let rel_h = rel_h.reshape((side, bh, side, side))?.permute((1, 0, 2, 3))?;
    // rel_w[b, y, x, kx]: the same per query column x.
    let rel_w = q_grid.permute((2, 0, 1, 3))?.contiguous()?.reshape((side, bh * side, hd))?.matmul(&table("rel_pos_w")?)?;
    let rel_w = rel_w.reshape((side, bh, side, side))?.permute((1, 2, 0, 3))?;
    let bias = rel_h.unsqueeze(4)?.broadcast_add(&rel_w.unsqueeze(3)?)?.reshape((bh, n, n))?;

    let attn = k::softmax_last_dim(&(logits + bias)?.contiguous()?)?;
    let y = attn.matmul(&v)?.reshape((b, num_heads, n, hd))?.transpose(1, 2)?.reshape((b, n, d))?;
    linear_p(p, &format!("{block}.attn.proj"), &y)
}
