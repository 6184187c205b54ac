//! Every op of this crate written with candle's own tensor ops, for tensors our kernels do not
//! serve (see `has_kernel`): candle runs these compositions on every device and dtype, and its
//! autograd differentiates them.
//!
//! The compositions compute the same math as our kernels (tested against them on the CPU in
//! f64), but as many small kernels with their intermediates materialized, so they are a correct
//! baseline, not the fast path. On CUDA they are also the other side of the A/B the GPU check
//! runs against our CUDA kernels (`CONVMAE_KERNELS=composite`, `with_path`).

use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::{DType, Result, Tensor, D};

use crate::{AdamWUpdate, SparseNeighbors};

/// Half-precision inputs are computed in f32 and the result cast back: their statistics (sums
/// over a row) need more than bf16's 8 bits of mantissa, as in PyTorch's autocast.
fn is_half(t: &Tensor) -> bool {
    matches!(t.dtype(), DType::BF16 | DType::F16)
}

/// im2col of channels-last maps (`crate::unfold`): the zero-padded map's k x k views shifted by
/// (i, j) and taken at `stride`, concatenated along the channels in (row, column) order. Only
/// copies, so every dtype and device; candle's autograd makes the backward (col2im) from the
/// narrows, index selects and the concatenation.
pub fn unfold(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    let (_, height, width, _) = x.dims4()?;
    let (out_h, out_w) = ((height + 2 * pad - k) / stride + 1, (width + 2 * pad - k) / stride + 1);
    let padded = x.pad_with_zeros(1, pad, pad)?.pad_with_zeros(2, pad, pad)?;
    // `count` positions of `dim` from `start`, `stride` apart.
    let strided = |t: &Tensor, dim: usize, start: usize, count: usize| -> Result<Tensor> {
        if stride == 1 {
            return t.narrow(dim, start, count);
        }
        let at: Vec<u32> = (0..count).map(|o| (start + o * stride) as u32).collect();
        t.index_select(&Tensor::from_vec(at, count, t.device())?, dim)
    };
    let mut taps = Vec::with_capacity(k * k);
    for i in 0..k {
        let rows = strided(&padded, 1, i, out_h)?;
        for j in 0..k {
            taps.push(strided(&rows, 2, j, out_w)?);
        }
    }
    Tensor::cat(&taps, 3)
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dim (biased variance).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if is_half(x) {
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        return layer_norm(&f(x)?, &f(weight)?, &f(bias)?, eps)?.to_dtype(x.dtype());
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Softmax over the last dim, shifted by the row max (a constant for the gradient).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if is_half(x) {
        return softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype());
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// timm's attention on packed `[B, N, 3 * heads * hd]` qkv rows: split into q, k, v
/// `[B, heads, N, hd]`, `softmax(q k^T * scale) v`, heads concatenated back to `[B, N, D]`.
/// q is scaled rather than the `[N, N]` scores: the same math, one `[B, heads, N, N]` tensor
/// (and its gradient) fewer.
pub fn self_attention(qkv: &Tensor, num_heads: usize, scale: f64) -> Result<Tensor> {
    let dims = crate::attention::Dims::of("self_attention", qkv.dims(), num_heads)?;
    let (b, n, hd) = (dims.b, dims.n, dims.hd);
    let qkv = qkv.reshape((b, n, 3, num_heads, hd))?.permute((2, 0, 3, 1, 4))?;
    let q = qkv.get(0)?.contiguous()?;
    let kt = qkv.get(1)?.t()?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    // The public softmax: our kernel where one serves (an unkernelled head dim on CUDA), else
    // the composition above.
    let attn = crate::softmax_last_dim(&(q * scale)?.matmul(&kt)?)?;
    attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, dims.d()))
}

/// `0.5 x (1 + erf(x / sqrt 2))`; candle's erf has an exact derivative, unlike its fused
/// gelu_erf backward.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    let erf = (x / std::f64::consts::SQRT_2)?.erf()?;
    (x * 0.5)? * (erf + 1.0)?
}

/// `x @ weight^T + bias` over the last dim; `weight` [out, in] or a [out, in, 1, 1] conv kernel.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let out = weight.dim(0)?;
    let w = weight.reshape((out, ()))?;
    let lead = &x.dims()[..x.rank() - 1];
    let rows: usize = lead.iter().product();
    let product = x.reshape((rows, ()))?.matmul(&w.t()?)?;
    // In bf16 / f16 the bias is added in f32: its gradient sums every row, which a half
    // accumulator (candle's sum) stalls on once the sum outgrows the terms (our CUDA kernel
    // sums it in f32 too).
    let y = if is_half(x) {
        product.to_dtype(DType::F32)?.broadcast_add(&bias.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?
    } else {
        product.broadcast_add(bias)?
    };
    let mut shape = lead.to_vec();
    shape.push(out);
    y.reshape(shape)
}

/// The tap vectors of a [C, K, K] depthwise kernel as [K*K, C] (tap-major).
fn taps(weight: &Tensor) -> Result<Tensor> {
    let c = weight.dim(0)?;
    weight.reshape((c, ()))?.t()
}

/// Depthwise conv on [B, H, W, C] with a [C, K, K] kernel and zero padding K/2: the sum over
/// taps of the shifted, padded input times that tap's channel weights.
pub fn depthwise_conv2d(input: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (_, h, w, _) = input.dims4()?;
    let k = weight.dim(1)?;
    let r = k / 2;
    let padded = input.pad_with_zeros(1, r, r)?.pad_with_zeros(2, r, r)?;
    let taps = taps(weight)?;
    let mut out: Option<Tensor> = None;
    for i in 0..k {
        for j in 0..k {
            let term = padded.narrow(1, i, h)?.narrow(2, j, w)?.broadcast_mul(&taps.get(i * k + j)?)?;
            out = Some(match out {
                None => term,
                Some(acc) => (acc + term)?,
            });
        }
    }
    out.ok_or_else(|| candle_core::Error::Msg("depthwise_conv2d: empty kernel".into()))
}

/// The sparse masked depthwise conv on [N, C] rows: gather each row's K*K neighbours (a zero row
/// stands in for the masked and out-of-image ones), weight them per tap and channel, and sum.
pub fn sparse_depthwise_conv2d(input: &Tensor, weight: &Tensor, nbrs: &SparseNeighbors) -> Result<Tensor> {
    let c = input.dim(candle_core::D::Minus1)?;
    if input.rank() != 2 || weight.rank() != 3 {
        let k = nbrs.k();
        return sparse_depthwise_conv2d(&input.reshape(((), c))?, &weight.reshape((c, k, k))?, nbrs)?.reshape(input.shape());
    }
    let n = input.dim(0)?;
    let kk = nbrs.k() * nbrs.k();
    let zero_row = n as u32;
    let index: Vec<u32> = nbrs.table().iter().map(|&m| if m < 0 { zero_row } else { m as u32 }).collect();
    let index = Tensor::from_vec(index, n * kk, input.device())?;
    let extended = Tensor::cat(&[input, &Tensor::zeros((1, c), input.dtype(), input.device())?], 0)?;
    let gathered = extended.index_select(&index, 0)?.reshape((n, kk, c))?;
    gathered.broadcast_mul(&taps(weight)?)?.sum(1)
}

/// [B, H, W, C] images -> [B, L, patch * patch * C] patches, each ordered (row, col, channel),
/// patches row-major: MAE's `patchify` on channels-last images.
pub fn patchify(imgs: &Tensor, patch: usize) -> Result<Tensor> {
    let (b, h, w, c) = imgs.dims4()?;
    let (gh, gw) = (h / patch, w / patch);
    crate::patch_blocks(imgs, patch)?.reshape((b, gh * gw, patch * patch * c))
}

/// Per-patch statistics of MAE's norm-pix target over the last dim: the mean and
/// sqrt(unbiased variance + 1e-6) (`torch.var` is unbiased), each keeping the dim.
pub fn patch_stats(patches: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = patches.dim(D::Minus1)?;
    let mean = patches.mean_keepdim(D::Minus1)?;
    let centered = patches.broadcast_sub(&mean)?;
    let var = (centered.sqr()?.sum_keepdim(D::Minus1)? / (n as f64 - 1.0))?;
    Ok((mean, (var + crate::patch_loss::NORM_PIX_EPS)?.sqrt()?))
}

/// MAE's loss: the mean over the masked patches (`mask` 1) of each patch's mean squared error
/// between `pred` and the patchified images, per-patch normalized when `norm_pix`. In the
/// images' dtype (`pred` is cast to it); the images and the mask are constants.
pub fn masked_patch_mse(pred: &Tensor, imgs: &Tensor, mask: &Tensor, patch: usize, norm_pix: bool) -> Result<Tensor> {
    let target = patchify(&imgs.detach(), patch)?;
    let target = if norm_pix {
        let (mean, std) = patch_stats(&target)?;
        target.broadcast_sub(&mean)?.broadcast_div(&std)?
    } else {
        target
    };
    let mask = mask.detach();
    let per_patch = (pred.to_dtype(imgs.dtype())? - target)?.sqr()?.mean(D::Minus1)?;
    (per_patch * &mask)?.sum_all()?.broadcast_div(&mask.sum_all()?)
}

/// The MAE decoder's entry (`crate::restore_tokens`): the mask token appended to the visible
/// tokens `x` [B, keep, D], the sequence gathered into image order by `ids_restore` [B, L], and
/// the position table (L x D values) added.
pub fn restore_tokens(x: &Tensor, mask_token: &Tensor, pos: &Tensor, ids_restore: &Tensor) -> Result<Tensor> {
    let (b, keep, d) = x.dims3()?;
    let l = ids_restore.dim(1)?;
    let mask_tokens = mask_token.reshape((1, 1, d))?.broadcast_as((b, l - keep, d))?;
    let full = Tensor::cat(&[x, &mask_tokens], 1)?;
    let index = ids_restore.unsqueeze(2)?.broadcast_as((b, l, d))?.contiguous()?;
    full.contiguous()?.gather(&index, 1)?.broadcast_add(&pos.reshape((1, l, d))?)
}

/// One AdamW update as torch.optim.AdamW computes it, returning the new (param, exp_avg,
/// exp_avg_sq) instead of writing in place (the caller stores them).
pub fn adamw_step(param: &Tensor, exp_avg: &Tensor, exp_avg_sq: &Tensor, grad: &Tensor, u: &AdamWUpdate) -> Result<(Tensor, Tensor, Tensor)> {
    let m = ((exp_avg * u.beta1)? + (grad * (1.0 - u.beta1))?)?;
    let v = ((exp_avg_sq * u.beta2)? + (grad.sqr()? * (1.0 - u.beta2))?)?;
    let step_size = u.lr / (1.0 - u.beta1.powi(u.step as i32));
    let bias2_sqrt = (1.0 - u.beta2.powi(u.step as i32)).sqrt();
    let denom = ((v.sqrt()? / bias2_sqrt)? + u.eps)?;
    let p = ((param * (1.0 - u.lr * u.weight_decay))? - ((m.clone() / denom)? * step_size)?)?;
    Ok((p, m, v))
}

/// Which implementation the public ops use where both exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Our kernels (CPU f32 / f64; CUDA f32 / bf16 / f16 with the `cuda` feature): the default.
    Kernels,
    /// The compositions of candle ops in this module.
    Composite,
}

thread_local! {
    static FORCED: Cell<Option<Path>> = const { Cell::new(None) };
}

/// Runs `f` with the public ops on this thread using `path` (where it exists), whatever
/// `CONVMAE_KERNELS` says; the agreement check uses it to run both paths in one process.
/// Nested calls restore the outer choice, also when `f` panics.
pub fn with_path<R>(path: Path, f: impl FnOnce() -> R) -> R {
    with_override(&FORCED, path, f)
}

/// Runs `f` with the thread-local `slot` holding `Some(value)`, then puts back what it held,
/// also when `f` panics: the per-thread overrides of this crate (`with_path`,
/// `attention::with_cuda_form`).
pub(crate) fn with_override<T: Copy + 'static, R>(slot: &'static std::thread::LocalKey<Cell<Option<T>>>, value: T, f: impl FnOnce() -> R) -> R {
    struct Restore<T: Copy + 'static>(&'static std::thread::LocalKey<Cell<Option<T>>>, Option<T>);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(slot, slot.with(|c| c.replace(Some(value))));
    f()
}

/// `CONVMAE_KERNELS=composite` makes every public op (and the optimizer's AdamW) use the
/// compositions, on every device; unset or `kernels` keeps our kernels. Read once per process.
fn env_path() -> Path {
    static PATH: OnceLock<Path> = OnceLock::new();
    *PATH.get_or_init(|| match std::env::var("CONVMAE_KERNELS").as_deref() {
        Ok("composite") => Path::Composite,
        Ok("" | "kernels") | Err(_) => Path::Kernels,
        Ok(other) => {
            eprintln!("convmae: CONVMAE_KERNELS='{other}' is not 'kernels' or 'composite'; using our kernels");
            Path::Kernels
        }
    })
}

/// Ops whose form can be chosen one at a time, each by its own environment variable, while
/// every other kernel of ours stays on: the A/B of one op within a whole training step, and a
/// safety valve should one of them misbehave on a GPU. Attention and linear choose on CUDA
/// only (on the CPU ours always serve); the sublayers on every device.
#[derive(Clone, Copy, Debug)]
pub(crate) enum OpSwitch {
    /// `CONVMAE_ATTENTION`: our op in its fused form (`fused`), its gemm form (`gemm`) or its
    /// flash form (`flash`), or candle's composition (`composite`). Default `auto` (see
    /// `attention.rs`): the forms that serve a shape are timed on its first call.
    Attention,
    /// `CONVMAE_LINEAR`: our one linear op on cuBLAS, or candle's reshape / matmul /
    /// broadcast-add (and its backward node by node). Default: ours. `composite` also sends
    /// the sublayers, whose linear layers are the same code, to their separate ops.
    Linear,
    /// `CONVMAE_SUBLAYER`: a block's sublayers as one op each (`mlp_residual`,
    /// `attention_residual`, `conv_residual`: `fused`), as their separate ops (`composite`:
    /// LayerNorm, linear, GELU, attention or the sparse conv, linear, add; each still ours), or
    /// by size (`auto`, the default; see sublayer.rs). Unlike the others this one applies on the
    /// CPU too.
    Sublayer,
}

/// What a `OpSwitch` variable asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Choice {
    /// `fused`: our kernel.
    Ours,
    /// `composite`: candle's composition.
    Composite,
    /// `auto`: whichever the op measures as faster for the shape at hand.
    Auto,
    /// `gemm` (`CONVMAE_ATTENTION` only): our attention op in its tensor-core gemm form.
    Gemm,
    /// `flash` (`CONVMAE_ATTENTION` only): our attention op's tensor-core flash kernels.
    Flash,
    /// `flash-mma` (`CONVMAE_ATTENTION` only): the flash kernels on mma.sync.
    FlashMma,
}

impl OpSwitch {
    fn variable(self) -> &'static str {
        match self {
            Self::Attention => "CONVMAE_ATTENTION",
            Self::Linear => "CONVMAE_LINEAR",
            Self::Sublayer => "CONVMAE_SUBLAYER",
        }
    }

    fn default_choice(self) -> Choice {
        match self {
            Self::Attention => Choice::Auto,
            Self::Linear => Choice::Ours,
            Self::Sublayer => Choice::Auto,
        }
    }

    /// The variable's choice (unset or empty: the switch's default). Read once per process.
    /// Under `with_path` the forced path decides instead: `Path::Kernels` means our kernel, so
    /// the agreement and timing tables always measure the kernel they name.
    pub(crate) fn choice(self) -> Choice {
        static READ: [OnceLock<Choice>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        let env = *READ[self as usize].get_or_init(|| match std::env::var(self.variable()).as_deref() {
            Ok("composite") => Choice::Composite,
            Ok("fused") => Choice::Ours,
            Ok("auto") => Choice::Auto,
            Ok("gemm") if matches!(self, Self::Attention) => Choice::Gemm,
            Ok("flash") if matches!(self, Self::Attention) => Choice::Flash,
            Ok("flash-mma") if matches!(self, Self::Attention) => Choice::FlashMma,
            Ok("") | Err(_) => self.default_choice(),
            Ok(other) => {
                let gemm = if matches!(self, Self::Attention) { ", 'gemm', 'flash', 'flash-mma'" } else { "" };
                eprintln!("convmae: {}='{other}' is not 'fused'{gemm}, 'composite' or 'auto'; using the default", self.variable());
                self.default_choice()
            }
        });
        match FORCED.with(|c| c.get()) {
            Some(Path::Kernels) => Choice::Ours,
            Some(Path::Composite) => Choice::Composite,
            None => env,
        }
    }

    /// Whether this op goes to the composition on CUDA without asking the op (`composite`).
    pub(crate) fn composite(self) -> bool {
        self.choice() == Choice::Composite
    }
}

/// The ops `CONVMAE_COMPOSITE_OPS` can send to candle's composition one by one.
/// `tape_backward` is not an op but our backward of the pretraining forward (`tape`): listed,
/// candle's backward runs instead.
pub const SWITCHABLE_OPS: [&str; 7] = ["conv_residual", "masked_patch_mse", "patch_blocks", "restore_tokens", "sublayer_chain", "conv_weight_rows", "tape_backward"];

/// Whether `CONVMAE_COMPOSITE_OPS` (a comma-separated list of `SWITCHABLE_OPS`) sends our op
/// `op` to candle's composition, on every device: the A/B of one op within a whole step, and
/// the GPU check's safety valve for an op whose agreement row failed. Under `with_composite_ops`
/// its list decides, else under `with_path` the forced path, so that the agreement and timing
/// tables measure the path they name. Read once per process; a name not in the list is named
/// in a warning and ignored.
pub(crate) fn sent_to_composite(op: &str) -> bool {
    static LISTED: OnceLock<Vec<String>> = OnceLock::new();
    if let Some(listed) = FORCED_COMPOSITE_OPS.with(|c| c.get()) {
        return listed.contains(&op);
    }
    if let Some(path) = FORCED.with(|c| c.get()) {
        return path == Path::Composite;
    }
    LISTED
        .get_or_init(|| {
            let (names, unknown) = parse_composite_ops(&std::env::var("CONVMAE_COMPOSITE_OPS").unwrap_or_default());
            for n in unknown {
                eprintln!("convmae: CONVMAE_COMPOSITE_OPS names '{n}', which is not one of {SWITCHABLE_OPS:?}; ignored");
            }
            names
        })
        .iter()
        .any(|n| n == op)
}

thread_local! {
    static FORCED_COMPOSITE_OPS: Cell<Option<&'static [&'static str]>> = const { Cell::new(None) };
}

/// Runs `f` with `ops` (of `SWITCHABLE_OPS`) sent to candle's composition on this thread and
/// the others not, whatever `CONVMAE_COMPOSITE_OPS` and `with_path` say for them (`with_path`
/// still decides every other op): the A/B of one op in one process, for tests and Rust callers.
/// Nested calls restore the outer choice, also when `f` panics.
pub fn with_composite_ops<R>(ops: &'static [&'static str], f: impl FnOnce() -> R) -> R {
    with_override(&FORCED_COMPOSITE_OPS, ops, f)
}

/// `CONVMAE_COMPOSITE_OPS`'s value as (the switchable ops it names, the other names).
fn parse_composite_ops(raw: &str) -> (Vec<String>, Vec<String>) {
    raw.split(',').map(str::trim).filter(|n| !n.is_empty()).map(String::from).partition(|n| SWITCHABLE_OPS.contains(&n.as_str()))
}

/// Whether one of our kernels serves `t` (its device and dtype), ignoring the path choice.
fn kernel_exists(t: &Tensor) -> bool {
    match t.device() {
        candle_core::Device::Cpu => matches!(t.dtype(), DType::F32 | DType::F64),
        // Empty tensors go to the composite: a zero-length launch or allocation is an error
        // on CUDA, and there is nothing to compute.
        candle_core::Device::Cuda(_) => {
            cfg!(feature = "cuda") && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) && t.elem_count() > 0
        }
        _ => false,
    }
}

/// Whether the public ops use our kernels for `t`: one exists for its device and dtype, and
/// the path in force (`with_path`, else `CONVMAE_KERNELS`) is `Path::Kernels`. The ops use the
/// compositions above otherwise.
pub fn has_kernel(t: &Tensor) -> bool {
    let path = FORCED.with(|c| c.get()).unwrap_or_else(env_path);
    path == Path::Kernels && kernel_exists(t)
}

/// `has_kernel` for an op with several tensor arguments: on CUDA they must also share one
/// dtype (a bf16 activation with f32 LayerNorm parameters goes to the composite, which casts).
/// On the CPU a mismatch reaches the kernel, which names it in its error.
pub(crate) fn use_kernel(args: &[&Tensor]) -> bool {
    let first = args[0];
    has_kernel(first) && (first.device().is_cpu() || args.iter().all(|t| t.dtype() == first.dtype()))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    /// A bf16 linear's bias gradient sums every row in f32: over 4096 rows of gradient 1 it is
    /// 4096 exactly (a bf16 running sum stalls at 256, where adding 1 no longer changes it).
    #[test]
    fn a_half_linear_sums_its_bias_gradient_in_f32() {
        let x = Tensor::ones((4096, 3), DType::BF16, &Device::Cpu).unwrap();
        let w = Tensor::ones((2, 3), DType::BF16, &Device::Cpu).unwrap();
        let bias = Var::from_tensor(&Tensor::zeros(2, DType::BF16, &Device::Cpu).unwrap()).unwrap();
        let y = super::linear(&x, &w, bias.as_tensor()).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(bias.as_tensor()).unwrap();
        assert_eq!(g.dtype(), DType::BF16);
        assert_eq!(g.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), [4096.0, 4096.0]);
    }

    #[test]
    fn composite_ops_are_read_as_a_list_and_unknown_names_set_apart() {
        let (ops, unknown) = super::parse_composite_ops(" restore_tokens,,patch_blocks , layer_norm");
        assert_eq!(ops, ["restore_tokens", "patch_blocks"]);
        assert_eq!(unknown, ["layer_norm"]);
        assert_eq!(super::parse_composite_ops(""), (vec![], vec![]));
    }

    /// `with_composite_ops` decides for the ops it is given, before `with_path`, nests, and
    /// restores the outer choice on the way out, also after a panic.
    #[test]
    fn with_composite_ops_lists_ops_nests_and_restores() {
        use super::{sent_to_composite, with_composite_ops, with_path, Path};
        let listed = || (sent_to_composite("sublayer_chain"), sent_to_composite("patch_blocks"));
        with_path(Path::Kernels, || {
            assert_eq!(listed(), (false, false));
            with_composite_ops(&["sublayer_chain"], || {
                assert_eq!(listed(), (true, false));
                with_composite_ops(&["patch_blocks"], || assert_eq!(listed(), (false, true)));
                assert_eq!(listed(), (true, false));
                let panicked = std::panic::catch_unwind(|| with_composite_ops(&[], || panic!("inside")));
                assert!(panicked.is_err());
                assert_eq!(listed(), (true, false));
            });
            assert_eq!(listed(), (false, false));
        });
        // Under the composite path too the list decides what it sends (whether an op then runs
        // ours is still `has_kernel`'s answer, which the composite path makes false).
        with_path(Path::Composite, || {
            assert_eq!(listed(), (true, true));
            with_composite_ops(&[], || assert_eq!(listed(), (false, false)));
        });
    }
}
