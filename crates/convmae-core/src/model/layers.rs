//! The building blocks of ConvMAE on channels-last tensors.
//!
//! Feature maps are kept as [B, H, W, C] so that every per-position op (LayerNorm over channels,
//! 1x1 convs, the MLP) is a plain matmul over the last dimension, and the depthwise conv reads
//! contiguous channel vectors. Weights stay in the official PyTorch layouts and are viewed here.

use crate::params::{ParamStore, SublayerKind};
use candle_core::{Result, Tensor, D};
use convmae_kernels as k;
use convmae_kernels::SparseNeighbors;
use std::sync::Arc;

/// LayerNorm eps of the conv blocks and patch embeds (plain `nn.LayerNorm`).
pub const CONV_LN_EPS: f64 = 1e-5;
/// LayerNorm eps of the transformer blocks and the final norms (`partial(nn.LayerNorm, eps=1e-6)`).
pub const VIT_LN_EPS: f64 = 1e-6;

/// `x @ weight^T + bias` over the last dim; `weight` may be a [out, in, 1, 1] conv kernel.
/// One fused op (forward and backward straight on gemm), see convmae_kernels::linear.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    k::linear(x, weight, bias)
}

pub fn linear_p(p: &ParamStore, prefix: &str, x: &Tensor) -> Result<Tensor> {
    linear(x, p.get(&format!("{prefix}.weight")), p.get(&format!("{prefix}.bias")))
}

/// gelu(linear(x)) as one op: an MLP's fc1 and its activation (see convmae_kernels::linear_gelu).
pub fn linear_gelu_p(p: &ParamStore, prefix: &str, x: &Tensor) -> Result<Tensor> {
    k::linear_gelu(x, p.get(&format!("{prefix}.weight")), p.get(&format!("{prefix}.bias")))
}

pub fn layer_norm_p(p: &ParamStore, prefix: &str, x: &Tensor, eps: f64) -> Result<Tensor> {
    k::layer_norm(x, p.get(&format!("{prefix}.weight")), p.get(&format!("{prefix}.bias")), eps)
}

/// Conv2d with kernel = stride = `k` and no padding (every patch embed and fusion conv of ConvMAE):
/// non-overlapping windows, so it is exactly a matmul over the flattened k x k x C patches.
/// x: [B, H, W, C]; weight: [O, C, k, k] (PyTorch layout); returns [B, H/k, W/k, O].
pub fn patch_conv(x: &Tensor, weight: &Tensor, bias: &Tensor, k: usize) -> Result<Tensor> {
    patch_conv_as(x, weight, bias, k, &patch_grid(x, k)?)
}

/// `patch_conv` with the patches grouped as `lead` (B, H/k, W/k regrouped in row-major order,
/// [B, L] for tokens): returns [..lead, O], without a reshape node before or after the matmul
/// (see `convmae_kernels::flat_patches`).
pub fn patch_conv_as(x: &Tensor, weight: &Tensor, bias: &Tensor, k: usize, lead: &[usize]) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    let patches = k::flat_patches(x, k, lead)?;
    // [O, C, k, k] -> [O, k * k * C], each row in the patch order (row, col, channel).
    if weight.dims4()?.1 != c {
        candle_core::bail!("patch conv: weight {:?} does not take the input's {c} channels", weight.dims());
    }
    linear(&patches, &k::conv_weight_rows(weight)?, bias)
}

/// [B, H/k, W/k]: the patch grid of a [B, H, W, C] map.
fn patch_grid(x: &Tensor, k: usize) -> Result<[usize; 3]> {
    let (b, h, w, _) = x.dims4()?;
    Ok([b, h / k, w / k])
}

/// PatchEmbed: conv(k, stride k) -> LayerNorm over channels (eps 1e-5) -> GELU (erf).
pub fn patch_embed(p: &ParamStore, prefix: &str, x: &Tensor, k: usize) -> Result<Tensor> {
    patch_embed_as(p, prefix, x, k, &patch_grid(x, k)?)
}

/// `patch_embed` with the patches grouped as `lead`, as `patch_conv_as`: [..lead, O].
pub fn patch_embed_as(p: &ParamStore, prefix: &str, x: &Tensor, k: usize, lead: &[usize]) -> Result<Tensor> {
    let y = patch_conv_as(x, p.get(&format!("{prefix}.proj.weight")), p.get(&format!("{prefix}.proj.bias")), k, lead)?;
    layer_norm_p(p, &format!("{prefix}.norm"), &y, CONV_LN_EPS)?.apply(&k::gelu_erf)
}

/// How a conv block's depthwise conv sees the feature map.
pub enum SpatialMix<'a> {
    /// A dense [B, H, W, C] map; `keep` ([B, H, W, 1], 1 = visible) multiplies the conv's input,
    /// as the official code does (None downstream, where nothing is masked).
    Dense { keep: Option<&'a Tensor> },
    /// FastConvMAE's CBlock on one dense [B, H, W, C] map seen as complementary views: the
    /// depthwise conv runs once per view on the input times that view's keep map ([B, H, W, 1]),
    /// and each output is kept where its view is visible, sum_v keep_v * DW(keep_v * h). The
    /// keep maps partition the positions, so each position reads only its own view's neighbours.
    DenseViews(&'a [Tensor]),
    /// Only visible positions, as rows of [.., C]; masked neighbours and the border read as zero.
    Sparse(&'a Arc<SparseNeighbors>),
}

/// Stochastic depth (timm `DropPath`) of one block in training: a per-sample scale for each of
/// the block's two residual branches, 0 (dropped) or 1 / keep_prob, shaped to broadcast over a
/// sample ([B, 1, 1] for tokens, [B, 1, 1, 1] for feature maps). The official block calls its
/// DropPath twice, so the two branches draw independently.
pub struct DropPath {
    pub first: Tensor,
    pub second: Tensor,
}

/// `x + branch`, with the branch scaled per sample when stochastic depth is active (one op:
/// `residual_scaled`).
pub fn residual(x: &Tensor, branch: Tensor, scale: Option<&Tensor>) -> Result<Tensor> {
    match scale {
        Some(s) => k::residual_scaled(x, &branch, s),
        None => x + branch,
    }
}

/// CBlock: x + conv2(DW5x5(keep * conv1(LN(x)))), then x + fc2(GELU(fc1(LN(x)))).
/// The mask touches only the depthwise conv's input, as in the official code. `eps` is its
/// LayerNorms' (`CONV_LN_EPS`, but 1e-6 in Official-ConvMAE-Det's copy of the class).
pub fn conv_block(p: &ParamStore, prefix: &str, x: &Tensor, mix: &SpatialMix, drop: Option<&DropPath>, eps: f64) -> Result<Tensor> {
    // On the sparse path without stochastic depth the first half is one op (`conv_residual`,
    // like the other sublayers), which decides itself whether to run as the separate ops below.
    let get = |name: &str| p.get(&format!("{prefix}.{name}"));
    if let (SpatialMix::Sparse(nbrs), None) = (mix, drop) {
        let x = match p.packed_sublayer(prefix, SublayerKind::Conv) {
            Some(pack) => k::conv_residual_packed(x, pack, eps, nbrs)?,
            None => k::conv_residual(
                x,
                (get("norm1.weight"), get("norm1.bias")),
                eps,
                (get("conv1.weight"), get("conv1.bias")),
                (get("attn.weight"), get("attn.bias")),
                (get("conv2.weight"), get("conv2.bias")),
                nbrs,
            )?,
        };
        return mlp_sublayer(p, prefix, &x, eps, None);
    }
    let h = layer_norm_p(p, &format!("{prefix}.norm1"), x, eps)?;
    let h = linear_p(p, &format!("{prefix}.conv1"), &h)?;
    let dw = p.get(&format!("{prefix}.attn.weight"));
    let h = match mix {
        SpatialMix::Dense { keep } => {
            let h = match keep {
                Some(keep) => h.broadcast_mul(keep)?,
                None => h,
            };
            let (c, _, kh, kw) = dw.dims4()?;
            k::depthwise_conv2d(&h, &dw.reshape((c, kh, kw))?)?
        }
        SpatialMix::DenseViews(keeps) => {
            let (c, _, kh, kw) = dw.dims4()?;
            let dw = dw.reshape((c, kh, kw))?;
            let mut sum: Option<Tensor> = None;
            for keep in keeps.iter() {
                let view = k::depthwise_conv2d(&h.broadcast_mul(keep)?, &dw)?.broadcast_mul(keep)?;
                sum = Some(match sum {
                    Some(s) => (s + view)?,
                    None => view,
                });
            }
            sum.ok_or_else(|| candle_core::Error::Msg("SpatialMix::DenseViews needs at least one view".into()))?
        }
        // The token blocks and PyTorch's [C, 1, K, K] kernel as they are: a reshape is a graph
        // node, and candle's backward zero-fills and adds a gradient for each (at stage 1's
        // size, two ~60 us passes per block in run 4's H100 profile).
        SpatialMix::Sparse(nbrs) => k::sparse_depthwise_conv2d(&h, dw, nbrs)?,
    };
    let branch = k::conv2_with_dw_bias(&h, get("attn.bias"), (get("conv2.weight"), get("conv2.bias")))?;
    let x = residual(x, branch, drop.map(|d| &d.first))?;
    mlp_sublayer(p, prefix, &x, eps, drop.map(|d| &d.second))
}

/// x + fc2(GELU(fc1(LN(x)))) with the block's `norm2` and `mlp`: one op (`mlp_residual`)
/// unless stochastic depth scales the branch, which takes the separate ops.
fn mlp_sublayer(p: &ParamStore, prefix: &str, x: &Tensor, eps: f64, drop: Option<&Tensor>) -> Result<Tensor> {
    let get = |name: &str| p.get(&format!("{prefix}.{name}"));
    if drop.is_none() {
        if let Some(pack) = p.packed_sublayer(prefix, SublayerKind::Mlp) {
            return k::mlp_residual_packed(x, pack, eps, get("mlp.fc1.weight").dim(0)?);
        }
        return k::mlp_residual(x, (get("norm2.weight"), get("norm2.bias")), eps, (get("mlp.fc1.weight"), get("mlp.fc1.bias")), (get("mlp.fc2.weight"), get("mlp.fc2.bias")));
    }
    let h = layer_norm_p(p, &format!("{prefix}.norm2"), x, eps)?;
    let h = linear_gelu_p(p, &format!("{prefix}.mlp.fc1"), &h)?;
    residual(x, linear_p(p, &format!("{prefix}.mlp.fc2"), &h)?, drop)
}

/// timm multi-head self-attention of block `block` on [B, N, D]: qkv rows are [q | k | v],
/// heads contiguous; softmax(q k^T / sqrt(hd)) v as one op (`self_attention`), then the
/// output projection.
pub fn attention(p: &ParamStore, block: &str, x: &Tensor, num_heads: usize) -> Result<Tensor> {
    let d = x.dim(2)?;
    let qkv = linear(x, p.get(&format!("{block}.attn.qkv.weight")), &qkv_bias(p, block, x)?)?;
    let scale = ((d / num_heads) as f64).powf(-0.5);
    let y = k::self_attention(&qkv, num_heads, scale)?;
    linear_p(p, &format!("{block}.attn.proj"), &y)
}

/// The qkv projection's bias of block `block`: qkv_bias=False (a knob of the official class for
/// stage 3) leaves it without one, which is a zero bias here.
fn qkv_bias(p: &ParamStore, block: &str, x: &Tensor) -> Result<Tensor> {
    match p.find(&format!("{block}.attn.qkv.bias")) {
        Some(b) => Ok(b.tensor.clone()),
        None => Tensor::zeros(3 * x.dim(candle_core::D::Minus1)?, x.dtype(), x.device()),
    }
}

/// timm ViT Block: x + Attn(LN(x)), then x + MLP(LN(x)); LN eps 1e-6. Each half is one op
/// (`attention_residual`, `mlp_residual`) unless stochastic depth scales its branch.
pub fn transformer_block(p: &ParamStore, prefix: &str, x: &Tensor, num_heads: usize, drop: Option<&DropPath>) -> Result<Tensor> {
    let x = match (drop, p.packed_sublayer(prefix, SublayerKind::Attention)) {
        (None, Some(pack)) => k::attention_residual_packed(x, pack, VIT_LN_EPS, num_heads)?,
        (None, None) => {
            let get = |name: &str| p.get(&format!("{prefix}.{name}"));
            let qkv_bias = qkv_bias(p, prefix, x)?;
            k::attention_residual(x, (get("norm1.weight"), get("norm1.bias")), VIT_LN_EPS, (get("attn.qkv.weight"), &qkv_bias), (get("attn.proj.weight"), get("attn.proj.bias")), num_heads)?
        }
        (Some(d), _) => {
            let h = layer_norm_p(p, &format!("{prefix}.norm1"), x, VIT_LN_EPS)?;
            residual(x, attention(p, prefix, &h, num_heads)?, Some(&d.first))?
        }
    };
    mlp_sublayer(p, prefix, &x, VIT_LN_EPS, drop.map(|d| &d.second))
}

/// The names of a stage's `depth` blocks: `stage.0`, `stage.1`, ...
pub fn block_names(stage: &str, depth: usize) -> Vec<String> {
    (0..depth).map(|i| format!("{stage}.{i}")).collect()
}

/// Block `prefix`'s MLP sublayer as a chain link, if its parameters are packed.
fn mlp_link<'a>(p: &'a ParamStore, prefix: &str, eps: f64) -> Result<Option<k::SublayerLink<'a>>> {
    let Some(pack) = p.packed_sublayer(prefix, SublayerKind::Mlp) else { return Ok(None) };
    Ok(Some(k::SublayerLink::Mlp { pack, eps, hidden: p.get(&format!("{prefix}.mlp.fc1.weight")).dim(0)? }))
}

/// The blocks' sublayers as the links of one chain, where every block gives its two (`links`
/// of a block's name: None where a sublayer is not packed).
fn chain_links<'a>(blocks: &[String], links: impl Fn(&str) -> Result<Option<[k::SublayerLink<'a>; 2]>>) -> Result<Option<Vec<k::SublayerLink<'a>>>> {
    let mut chain = Vec::with_capacity(2 * blocks.len());
    for block in blocks {
        match links(block)? {
            Some(pair) => chain.extend(pair),
            None => return Ok(None),
        }
    }
    Ok(Some(chain))
}

/// Conv blocks `blocks` one after another (`conv_block`; `drop` holds each one's stochastic
/// depth, `eps` is their LayerNorms'). On the sparse path without stochastic depth, with every sublayer packed (the
/// pretraining model's compute copies on CUDA), as one chain of their sublayers
/// (`convmae_kernels::sublayer_chain`: no gradient node between them; the same values).
pub fn conv_blocks(p: &ParamStore, blocks: &[String], x: &Tensor, mix: &SpatialMix, drop: Option<&[DropPath]>, eps: f64) -> Result<Tensor> {
    if let (SpatialMix::Sparse(nbrs), None) = (mix, drop) {
        let links = chain_links(blocks, |block| {
            let Some(pack) = p.packed_sublayer(block, SublayerKind::Conv) else { return Ok(None) };
            let conv = k::SublayerLink::Conv { pack, eps, neighbours: nbrs };
            Ok(mlp_link(p, block, eps)?.map(|mlp| [conv, mlp]))
        })?;
        if let Some(links) = links {
            return k::sublayer_chain(x, &links);
        }
    }
    blocks.iter().enumerate().try_fold(x.clone(), |x, (i, block)| conv_block(p, block, &x, mix, drop.map(|d| &d[i]), eps))
}

/// Transformer blocks `blocks` one after another, without stochastic depth (`transformer_block`):
/// with every sublayer packed, as one chain of their sublayers, as `conv_blocks`.
pub fn transformer_blocks(p: &ParamStore, blocks: &[String], x: &Tensor, num_heads: usize) -> Result<Tensor> {
    let links = chain_links(blocks, |block| {
        let Some(pack) = p.packed_sublayer(block, SublayerKind::Attention) else { return Ok(None) };
        let attention = k::SublayerLink::Attention { pack, eps: VIT_LN_EPS, heads: num_heads };
        Ok(mlp_link(p, block, VIT_LN_EPS)?.map(|mlp| [attention, mlp]))
    })?;
    match links {
        Some(links) => k::sublayer_chain(x, &links),
        None => blocks.iter().try_fold(x.clone(), |x, block| transformer_block(p, block, &x, num_heads, None)),
    }
}

/// Mean over the last dim, keeping it.
pub fn mean_last(x: &Tensor) -> Result<Tensor> {
    x.mean_keepdim(D::Minus1)
}

/// Cuts [B, H, W, C] into its `cell` x `cell` token blocks ([B * L, cell, cell, C], tokens
/// row-major) and keeps the rows `rows` (u32, e.g. the visible tokens): [rows, cell, cell, C].
pub fn token_blocks(x: &Tensor, cell: usize, rows: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let (gh, gw) = (h / cell, w / cell);
    k::patch_blocks(x, cell)?.reshape((b * gh * gw, cell, cell, c))?.index_select(rows, 0)
}
