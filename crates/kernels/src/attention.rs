//! Multi-head self-attention on packed `[q | k | v]` rows, as one op with one backward.
//!
//! timm's attention (which the official ConvMAE code uses in stage 3 and in the decoder) is a
//! qkv projection, a reshape / permute into three `[B, heads, N, hd]` tensors, `q k^T * scale`,
//! a softmax, a product with `v`, and a transpose back. Composed from candle ops that is about
//! ten forward nodes, three contiguous copies, and two `[B, heads, N, N]` tensors (scores and
//! probabilities) kept alive per block until the backward. This op reads q, k and v where the
//! projection left them, writes the `[B, N, heads * hd]` rows the output projection reads, and
//! keeps nothing: its backward recomputes the probabilities (as FlashAttention does).
//!
//! CPU: per (image, head), gemm on strided views of the packed rows (no gather), the `[N, N]`
//! scores only as a temporary. CUDA has two forms (`CudaForm`): fused FMA kernels
//! (`cuda/attention.cu`: one thread per query row, key and value rows staged through shared
//! memory, an online softmax; head dims 8, 16, 32 and 64), and batched tensor-core gemms around
//! our softmax kernels, with the scores as f32 temporaries (any head dim). Both keep f32
//! statistics whatever the storage type. On the first GPU run (H100, ConvMAE-B at batch 64,
//! bf16) the fused kernels took 28 of the 75 ms of kernel time in a step, where cuDNN's flash
//! attention takes PyTorch 2 ms: they lose to tensor cores even at 49 tokens. The gemm form
//! halved that, but writes f32 scores to memory and reads them back four times. The third
//! form, flash kernels (`cuda/flash.cu`), keeps the scores in shared memory and multiplies on
//! the tensor cores (bf16 and f16). Which form runs, or candle's composition, is
//! `CONVMAE_ATTENTION`'s to say, by default measured per shape (`auto_form`).

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::{row_major, Element};

const OP_NAME: &str = "self_attention";
const GRAD_NAME: &str = "self_attention_grad";

/// The head dims the CUDA kernels are compiled for (cuda/attention.cu instantiates these).
pub(crate) const CUDA_HEAD_DIMS: [usize; 4] = [8, 16, 32, 64];

/// `softmax(q k^T * scale) v` per head, for `qkv` `[B, N, 3 * heads * hd]` laid out as timm's
/// qkv projection writes it (`[B, N, 3, heads, hd]`: all q heads, then k, then v); returns
/// `[B, N, heads * hd]` (heads concatenated, as the output projection reads them).
pub fn self_attention(qkv: &Tensor, num_heads: usize, scale: f64) -> Result<Tensor> {
    let dims = Dims::of(OP_NAME, qkv.dims(), num_heads)?;
    if !crate::composite::use_kernel(&[qkv]) {
        return crate::composite::self_attention(qkv, num_heads, scale);
    }
    // The form matters on CUDA only; the CPU op has one.
    let form = if qkv.device().is_cpu() {
        CudaForm::Fused
    } else {
        match cuda_form(dims, qkv.dtype(), qkv.device(), scale)? {
            Some(form) => form,
            None => return crate::composite::self_attention(qkv, num_heads, scale),
        }
    };
    crate::tape::apply1(qkv, Attention::new(num_heads, scale, form))
}

/// The three forms of our attention op on CUDA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CudaForm {
    /// cuda/attention.cu's kernels: one thread per query (or key) row, FMA arithmetic, the
    /// scores never written to memory. Head dims 8, 16, 32 and 64.
    Fused,
    /// Batched cuBLAS gemms on the tensor cores for `q k^T` and `p v` (and the backward's four
    /// products), f32 scores, our softmax kernels between, the heads permuted in and out of
    /// the packed rows. The `[B, heads, N, N]` scores are temporaries, as in the fused form:
    /// nothing is kept for the backward. Any head dim.
    Gemm,
    /// cuda/flash.cu's kernels: a warp per 16 rows, 16x16x16 tensor-core products against one
    /// (image, head)'s other side held in shared memory, the scores never written to memory.
    /// bf16 and f16, head dims 16, 32 and 64, as many tokens as the device's shared memory
    /// holds (`crate::cuda::flash_fits`).
    Flash,
    /// The flash form on mma.sync (cuda/flash.cu `flash_mma_*`): the scores in registers, the
    /// forward in one pass (FlashAttention-2's online softmax), the same backward arithmetic.
    /// Serves what the flash form serves. `CONVMAE_FLASH_MMA=off` keeps `auto` from trying it.
    FlashMma,
}

impl CudaForm {
    /// Whether this form computes attention of these sizes in `dtype` on `device`.
    fn serves(self, dims: Dims, dtype: candle_core::DType, device: &candle_core::Device) -> Result<bool> {
        Ok(match self {
            Self::Fused => CUDA_HEAD_DIMS.contains(&dims.hd),
            Self::Gemm => true,
            Self::Flash | Self::FlashMma => {
                FLASH_HEAD_DIMS.contains(&dims.hd) && matches!(dtype, candle_core::DType::BF16 | candle_core::DType::F16) && flash_fits(device, dims)?
            }
        })
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Fused => "fused kernels",
            Self::Gemm => "gemms",
            Self::Flash => "flash kernels",
            Self::FlashMma => "flash kernels on mma.sync",
        }
    }
}

/// `CONVMAE_FLASH_MMA=off`: `auto` leaves the flash kernels on mma.sync (`CudaForm::FlashMma`) out, as
/// the GPU check does should its probe of that form fail. Read once per process.
pub(crate) fn flash_mma_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| crate::env_switch("CONVMAE_FLASH_MMA", "on", "off"))
}

/// The head dims cuda/flash.cu instantiates (its bf16 and f16 kernels).
const FLASH_HEAD_DIMS: [usize; 3] = [16, 32, 64];

#[cfg(feature = "cuda")]
fn flash_fits(device: &candle_core::Device, dims: Dims) -> Result<bool> {
    match device {
        candle_core::Device::Cuda(dev) => crate::cuda::flash_fits(dev, dims),
        _ => Ok(false),
    }
}

#[cfg(not(feature = "cuda"))]
fn flash_fits(_: &candle_core::Device, _: Dims) -> Result<bool> {
    Ok(false)
}

thread_local! {
    static FORCED_FORM: std::cell::Cell<Option<CudaForm>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with attention on CUDA in `form` wherever our op serves it (under `with_path`
/// `Kernels` too, which otherwise means the fused form): the agreement check and op timings
/// measure the gemm and flash forms with it. Nested calls restore the outer form, also on a panic.
pub fn with_cuda_form<R>(form: CudaForm, f: impl FnOnce() -> R) -> R {
    crate::composite::with_override(&FORCED_FORM, form, f)
}

/// Which form computes attention on CUDA, or None for candle's composition, by
/// `CONVMAE_ATTENTION`: `fused`, `gemm`, `flash`, `flash-mma`, `composite`, or `auto` (the default;
/// `auto_form`). A form asked for that does not serve these sizes or this dtype (`flash` in
/// f32, `fused` at head dim 24) gives way to the gemm form, which serves all.
pub(crate) fn cuda_form(dims: Dims, dtype: candle_core::DType, device: &candle_core::Device, scale: f64) -> Result<Option<CudaForm>> {
    use crate::composite::{Choice, OpSwitch};
    let choice = OpSwitch::Attention.choice();
    if choice == Choice::Composite {
        return Ok(None);
    }
    let or_gemm = |form: CudaForm| -> Result<CudaForm> { Ok(if form.serves(dims, dtype, device)? { form } else { CudaForm::Gemm }) };
    if let Some(form) = FORCED_FORM.with(|c| c.get()) {
        return or_gemm(form).map(Some);
    }
    Ok(Some(match choice {
        Choice::Ours => or_gemm(CudaForm::Fused)?,
        Choice::Gemm => CudaForm::Gemm,
        Choice::Flash => or_gemm(CudaForm::Flash)?,
        Choice::FlashMma => or_gemm(CudaForm::FlashMma)?,
        Choice::Auto => auto_form(dims, dtype, device, scale)?,
        Choice::Composite => unreachable!("returned above"),
    }))
}

/// `auto`: on the first call for a shape and dtype, forward + backward by every form that
/// serves it, on random input of that shape, timed on the device (one untimed run each, then
/// the median of three), and the fastest kept for the rest of the process; earlier forms win
/// ties. The untimed runs also check each form against the first (the fused kernels where they
/// serve; output and input gradient, to bf16's tolerance): a form that disagrees or fails is
/// not used, and the line printed says so. The choice is printed once per shape, with the times.
fn auto_form(dims: Dims, dtype: candle_core::DType, device: &candle_core::Device, scale: f64) -> Result<CudaForm> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Key = (usize, usize, usize, usize, candle_core::DType);
    static CHOSEN: OnceLock<Mutex<HashMap<Key, CudaForm>>> = OnceLock::new();
    let key = (dims.b, dims.n, dims.heads, dims.hd, dtype);
    let chosen = CHOSEN.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(&form) = chosen.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(form);
    }
    // A pick given for this shape (CONVMAE_ATTENTION_PICKS) is taken without timing, where it
    // serves; its line has the timed picks' form, so that the GPU check reads it alike.
    if let Some(&form) = pinned_picks().get(&(dims.b, dims.n, dims.heads, dims.hd)) {
        if form.serves(dims, dtype, device)? {
            print_pick(dims, dtype, device, "given by CONVMAE_ATTENTION_PICKS", form);
            chosen.lock().unwrap_or_else(|e| e.into_inner()).insert(key, form);
            return Ok(form);
        }
    }
    let mut candidates = Vec::new();
    for form in [CudaForm::Fused, CudaForm::Gemm, CudaForm::Flash, CudaForm::FlashMma] {
        if form == CudaForm::FlashMma && flash_mma_off() {
            continue;
        }
        if form.serves(dims, dtype, device)? {
            candidates.push(form);
        }
    }
    let form = if candidates.len() == 1 { candidates[0] } else { time_forms(dims, dtype, device, scale, &candidates)? };
    chosen.lock().unwrap_or_else(|e| e.into_inner()).insert(key, form);
    Ok(form)
}

/// `CONVMAE_ATTENTION_PICKS`: `auto`'s pick given per shape instead of timed, as a comma-separated
/// list of `BxNxHEADSxHD=FORM` (FORM one of `fused`, `gemm`, `flash`, `flash-mma`), e.g.
/// `64x49x12x64=flash-mma,64x196x16x32=flash`. The GPU check gives the rows that must repeat
/// its headline row's losses to the bit the headline row's picks: timing alone can pick
/// differently between two processes when two forms are within noise of each other. Shapes
/// not listed are timed as usual. Read once per process; a malformed entry is named in a
/// warning and ignored.
fn pinned_picks() -> &'static Picks {
    static PICKS: std::sync::OnceLock<Picks> = std::sync::OnceLock::new();
    PICKS.get_or_init(|| {
        let (picks, bad) = parse_picks(&std::env::var("CONVMAE_ATTENTION_PICKS").unwrap_or_default());
        for entry in bad {
            eprintln!("convmae: CONVMAE_ATTENTION_PICKS entry '{entry}' is not BxNxHEADSxHD=fused|gemm|flash|flash-mma; ignored");
        }
        picks
    })
}

/// Attention forms by shape: (batch, tokens, heads, head dim).
type Picks = std::collections::HashMap<(usize, usize, usize, usize), CudaForm>;

/// `CONVMAE_ATTENTION_PICKS`'s value as (the picks by shape, the malformed entries).
fn parse_picks(raw: &str) -> (Picks, Vec<String>) {
    let mut picks = std::collections::HashMap::new();
    let mut bad = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let parsed = entry.split_once('=').and_then(|(shape, form)| {
            let sizes: Vec<usize> = shape.split('x').map(|v| v.trim().parse().ok()).collect::<Option<_>>()?;
            let form = match form.trim() {
                "fused" => CudaForm::Fused,
                "gemm" => CudaForm::Gemm,
                "flash" => CudaForm::Flash,
                "flash-mma" => CudaForm::FlashMma,
                _ => return None,
            };
            match sizes[..] {
                [b, n, heads, hd] => Some(((b, n, heads, hd), form)),
                _ => None,
            }
        });
        match parsed {
            Some((key, form)) => {
                picks.insert(key, form);
            }
            None => bad.push(entry.to_string()),
        }
    }
    (picks, bad)
}

/// `auto_form`'s measurement of `candidates` (the first is the reference), and its line.
fn time_forms(dims: Dims, dtype: candle_core::DType, device: &candle_core::Device, scale: f64, candidates: &[CudaForm]) -> Result<CudaForm> {
    let input = candle_core::Var::from_tensor(&Tensor::rand(-2f32, 2f32, (dims.b, dims.n, 3 * dims.d()), device)?.to_dtype(dtype)?)?;
    let run = |form: CudaForm| -> Result<(Tensor, Tensor)> {
        let x = input.as_tensor();
        let out = x.apply_op1(Attention::new(dims.heads, scale, form))?;
        let grads = out.sum_all()?.backward()?;
        let g = grads.get(x).cloned().ok_or_else(|| candle_core::Error::Msg("self_attention: no input gradient".into()))?;
        Ok((out, g))
    };
    let time = |form: CudaForm| -> Result<f64> {
        let mut ms = Vec::with_capacity(3);
        for _ in 0..3 {
            device.synchronize()?;
            let t0 = std::time::Instant::now();
            run(form)?;
            device.synchronize()?;
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms[1])
    };
    const AGREE: f64 = 3e-2;
    let reference_form = candidates[0];
    let reference = run(reference_form)?;
    let (mut best, mut best_ms) = (reference_form, time(reference_form)?);
    let mut report = vec![format!("{} {best_ms:.3} ms", reference_form.describe())];
    for &form in &candidates[1..] {
        // A form that fails (a launch or cuBLAS error) or disagrees is reported and not used.
        let problem = match run(form) {
            Err(e) => Some(format!("FAILED ({e})")),
            Ok(got) => {
                let disagreement = max_rel(&got.0, &reference.0)?.max(max_rel(&got.1, &reference.1)?);
                (disagreement > AGREE).then(|| format!("DISAGREE with the {} (max rel {disagreement:.2e} > {AGREE:.0e}), not used", reference_form.describe()))
            }
        };
        match problem {
            Some(problem) => report.push(format!("{} {problem}", form.describe())),
            None => {
                let ms = time(form)?;
                report.push(format!("{} {ms:.3} ms", form.describe()));
                if ms < best_ms {
                    (best, best_ms) = (form, ms);
                }
            }
        }
    }
    print_pick(dims, dtype, device, &format!("{} (forward + backward)", report.join(", ")), best);
    Ok(best)
}

/// `auto`'s line for a shape: how the pick was made (`how`) and the pick, in the form the GPU
/// check reads (benches/gpu/op-timings.ts `attentionPicks`).
fn print_pick(dims: Dims, dtype: candle_core::DType, device: &candle_core::Device, how: &str, form: CudaForm) {
    eprintln!(
        "convmae: attention [{} x {} tokens x {} heads of {}] {:?} on {:?}: {how}; using the {} (CONVMAE_ATTENTION=auto)",
        dims.b,
        dims.n,
        dims.heads,
        dims.hd,
        dtype,
        device.location(),
        form.describe()
    );
}

/// max |a - b| / max |b|, in f32.
fn max_rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(candle_core::DType::F32)?, b.to_dtype(candle_core::DType::F32)?);
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

/// The sizes of a packed qkv tensor: batch, tokens, heads, head dim.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub n: usize,
    pub heads: usize,
    pub hd: usize,
}

impl Dims {
    pub(crate) fn of(op: &str, dims: &[usize], heads: usize) -> Result<Self> {
        let &[b, n, width] = dims else {
            candle_core::bail!("{op}: qkv must be [batch, tokens, 3 * heads * head_dim], got shape {dims:?}")
        };
        if heads == 0 || width == 0 || width % (3 * heads) != 0 {
            candle_core::bail!("{op}: the last dim of qkv ({width}) is not 3 x heads ({heads}) x a positive head dim (shape {dims:?})");
        }
        Ok(Self { b, n, heads, hd: width / (3 * heads) })
    }

    /// The width of one token's output row (`heads * hd`).
    pub(crate) fn d(&self) -> usize {
        self.heads * self.hd
    }
}

struct Attention {
    num_heads: usize,
    scale: f64,
    form: CudaForm,
    /// What the CUDA forward kept for the backward (`crate::cuda::AttentionKept`), taken by it.
    kept: KeptSlot,
}

#[cfg(feature = "cuda")]
type KeptSlot = std::sync::Arc<std::sync::Mutex<crate::cuda::AttentionKept>>;
#[cfg(not(feature = "cuda"))]
type KeptSlot = ();

impl Attention {
    fn new(num_heads: usize, scale: f64, form: CudaForm) -> Self {
        Self { num_heads, scale, form, kept: KeptSlot::default() }
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        OP_NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::of(OP_NAME, l.dims(), self.num_heads)?;
        let out = dispatch_float!(OP_NAME, (s => x), {
            Element::into_storage(forward(&row_major(x, l), dims, self.scale))
        });
        Ok((out, Shape::from((dims.b, dims.n, dims.d()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{attention_fwd, cuda_dispatch, CudaAttention};
        use candle_core::backend::BackendStorage;
        let dims = Dims::of(OP_NAME, l.dims(), self.num_heads)?;
        let att = CudaAttention { dims, scale: self.scale as f32, form: self.form };
        let (out, kept) = cuda_dispatch!(OP_NAME, s.dtype(), attention_fwd(s, l, att))?;
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = kept;
        Ok((out, Shape::from((dims.b, dims.n, dims.d()))))
    }

    // (KeptSlot is () without the cuda feature, which clippy would have cloned by copy.)
    #[cfg_attr(not(feature = "cuda"), allow(clippy::clone_on_copy, clippy::unit_arg))]
    fn bwd(&self, qkv: &Tensor, out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad_op = AttentionGrad { num_heads: self.num_heads, scale: self.scale, form: self.form, kept: self.kept.clone() };
        let g = qkv.apply_op3_no_bwd(out, grad, &grad_op)?;
        Ok(Some(g))
    }
}

/// `(qkv, out, grad_out) -> grad_qkv`, all in the packed layouts of the forward.
struct AttentionGrad {
    num_heads: usize,
    scale: f64,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    form: CudaForm,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    kept: KeptSlot,
}

impl AttentionGrad {
    fn check(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<Dims> {
        let dims = Dims::of(GRAD_NAME, l1.dims(), self.num_heads)?;
        let want = [dims.b, dims.n, dims.d()];
        crate::same_shape(GRAD_NAME, "output", l2.dims(), "expected output", &want)?;
        crate::same_shape(GRAD_NAME, "output-gradient", l3.dims(), "output", l2.dims())?;
        Ok(dims)
    }
}

impl CustomOp3 for AttentionGrad {
    fn name(&self) -> &'static str {
        GRAD_NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = self.check(l1, l2, l3)?;
        let out = dispatch_float!(GRAD_NAME, (s1 => qkv, s2 => o, s3 => g), {
            Element::into_storage(backward(&row_major(qkv, l1), &row_major(o, l2), &row_major(g, l3), dims, self.scale))
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
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{attention_bwd, cuda_dispatch, CudaAttention};
        use candle_core::backend::BackendStorage;
        let dims = self.check(l1, l2, l3)?;
        let att = CudaAttention { dims, scale: self.scale as f32, form: self.form };
        // Taken: the backward runs once, and the buffer is freed with it.
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).take();
        let out = cuda_dispatch!(GRAD_NAME, s1.dtype(), attention_bwd(s1, l1, s2, l2, s3, l3, att, kept.as_ref()))?;
        Ok((out, l1.shape().clone()))
    }
}

/// A row-major `rows x cols` matrix inside a slice: element (r, c) at `offset + r * rs + c * cs`.
#[derive(Clone, Copy)]
struct View {
    offset: usize,
    rs: usize,
    cs: usize,
}

impl View {
    fn t(self) -> Self {
        Self { offset: self.offset, rs: self.cs, cs: self.rs }
    }
}

/// `dst (m x n, row-major, contiguous) = beta * lhs (m x k) * rhs (k x n)`, single-threaded
/// (the callers run one per rayon task).
#[allow(clippy::too_many_arguments)]
fn gemm_into<T: Element>(dst: &mut [T], (m, n, k): (usize, usize, usize), lhs: &[T], lv: View, rhs: &[T], rv: View, beta: T) {
    assert!(dst.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    let last = |v: View, rows: usize, cols: usize| v.offset + (rows.max(1) - 1) * v.rs + (cols.max(1) - 1) * v.cs;
    assert!(k == 0 || (last(lv, m, k) < lhs.len() && last(rv, k, n) < rhs.len()));
    // SAFETY: the asserts above keep every element the strides reach inside the slices, and
    // `dst` holds m x n elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr().add(lv.offset),
            lv.cs as isize,
            lv.rs as isize,
            rhs.as_ptr().add(rv.offset),
            rv.cs as isize,
            rv.rs as isize,
            T::ZERO,
            beta,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// Where head `h` of image `b` sits in the packed qkv rows: q, k, v as `[N, hd]` views.
fn qkv_views(dims: Dims, b: usize, h: usize) -> [View; 3] {
    let (d, row) = (dims.d(), 3 * dims.d());
    let base = b * dims.n * row + h * dims.hd;
    [0, 1, 2].map(|s| View { offset: base + s * d, rs: row, cs: 1 })
}

/// The same head's rows in a `[B, N, heads * hd]` tensor (the output and its gradient).
fn out_view(dims: Dims, b: usize, h: usize) -> View {
    View { offset: b * dims.n * dims.d() + h * dims.hd, rs: dims.d(), cs: 1 }
}

/// `p = softmax(q k^T * scale)` for one head, `[N, N]` row-major.
fn probabilities<T: Element>(qkv: &[T], dims: Dims, b: usize, h: usize, scale: T) -> Vec<T> {
    let n = dims.n;
    let [q, k, _] = qkv_views(dims, b, h);
    let mut p = vec![T::ZERO; n * n];
    gemm_into(&mut p, (n, n, dims.hd), qkv, q, qkv, k.t(), scale);
    for row in p.chunks_mut(n.max(1)) {
        let max = row.iter().fold(T::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        let mut sum = T::ZERO;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in row.iter_mut() {
            *v = *v / sum;
        }
    }
    p
}

/// Every (image, head) pair, in the order their results are scattered back.
fn heads_of(dims: Dims) -> Vec<(usize, usize)> {
    (0..dims.b).flat_map(|b| (0..dims.heads).map(move |h| (b, h))).collect()
}

pub(crate) fn forward<T: Element>(qkv: &[T], dims: Dims, scale: f64) -> Vec<T> {
    let scale = T::from_f64(scale);
    let (n, hd, d) = (dims.n, dims.hd, dims.d());
    let per_head: Vec<Vec<T>> = heads_of(dims)
        .into_par_iter()
        .map(|(b, h)| {
            let p = probabilities(qkv, dims, b, h, scale);
            let [_, _, v] = qkv_views(dims, b, h);
            let mut o = vec![T::ZERO; n * hd];
            gemm_into(&mut o, (n, hd, n), &p, View { offset: 0, rs: n, cs: 1 }, qkv, v, T::ONE);
            o
        })
        .collect();
    let mut out = vec![T::ZERO; dims.b * n * d];
    for ((b, h), o) in heads_of(dims).into_iter().zip(&per_head) {
        let at = out_view(dims, b, h);
        for (i, row) in o.chunks(hd).enumerate() {
            out[at.offset + i * at.rs..][..hd].copy_from_slice(row);
        }
    }
    out
}

/// The gradient of `sum(out * g)`: with `p` recomputed, `dv = p^T g`, `dp = g v^T`,
/// `ds = p (dp - rowsum(g o))` (rowsum(g o) = rowsum(p dp), FlashAttention's form), and
/// `dq = scale ds k`, `dk = scale ds^T q`.
pub(crate) fn backward<T: Element>(qkv: &[T], out: &[T], g: &[T], dims: Dims, scale: f64) -> Vec<T> {
    let scale = T::from_f64(scale);
    let (n, hd) = (dims.n, dims.hd);
    let per_head: Vec<[Vec<T>; 3]> = heads_of(dims)
        .into_par_iter()
        .map(|(b, h)| {
            let p = probabilities(qkv, dims, b, h, scale);
            let [q, k, v] = qkv_views(dims, b, h);
            let ov = out_view(dims, b, h);
            let square = View { offset: 0, rs: n, cs: 1 };
            let mut dv = vec![T::ZERO; n * hd];
            gemm_into(&mut dv, (n, hd, n), &p, square.t(), g, ov, T::ONE);
            let mut ds = vec![T::ZERO; n * n];
            gemm_into(&mut ds, (n, n, hd), g, ov, qkv, v.t(), T::ONE);
            for i in 0..n {
                let row = ov.offset + i * ov.rs;
                let delta = crate::lane_sum(&g[row..row + hd], &out[row..row + hd], |a, b| a * b);
                for (s, &pv) in ds[i * n..(i + 1) * n].iter_mut().zip(&p[i * n..(i + 1) * n]) {
                    *s = pv * (*s - delta);
                }
            }
            let mut dq = vec![T::ZERO; n * hd];
            gemm_into(&mut dq, (n, hd, n), &ds, square, qkv, k, scale);
            let mut dk = vec![T::ZERO; n * hd];
            gemm_into(&mut dk, (n, hd, n), &ds, square.t(), qkv, q, scale);
            [dq, dk, dv]
        })
        .collect();
    let mut grad = vec![T::ZERO; qkv.len()];
    for ((b, h), parts) in heads_of(dims).into_iter().zip(&per_head) {
        for (view, part) in qkv_views(dims, b, h).iter().zip(parts) {
            for (i, row) in part.chunks(hd).enumerate() {
                grad[view.offset + i * view.rs..][..hd].copy_from_slice(row);
            }
        }
    }
    grad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_rel;
    use candle_core::{DType, Device, Var};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }


    /// `with_cuda_form` sets the form for its closure on this thread, nests, and restores the outer
    /// one after, also after a panic.
    #[test]
    fn attention_picks_are_read_per_shape_and_malformed_entries_set_apart() {
        let (picks, bad) = super::parse_picks(" 64x49x12x64=flash-mma, 64x196x16x32=flash,,8x4=gemm, 2x3x4x5=cudnn, 1x2x3x4 ");
        assert_eq!(picks.len(), 2);
        assert_eq!(picks.get(&(64, 49, 12, 64)), Some(&CudaForm::FlashMma));
        assert_eq!(picks.get(&(64, 196, 16, 32)), Some(&CudaForm::Flash));
        assert_eq!(bad, ["8x4=gemm", "2x3x4x5=cudnn", "1x2x3x4"]);
        assert!(super::parse_picks("").0.is_empty());
    }

    #[test]
    fn with_cuda_form_nests_and_restores() {
        let now = || FORCED_FORM.with(|c| c.get());
        assert_eq!(now(), None);
        with_cuda_form(CudaForm::Gemm, || {
            assert_eq!(now(), Some(CudaForm::Gemm));
            with_cuda_form(CudaForm::Fused, || assert_eq!(now(), Some(CudaForm::Fused)));
            assert_eq!(now(), Some(CudaForm::Gemm));
        });
        assert_eq!(now(), None);
        assert!(std::panic::catch_unwind(|| with_cuda_form(CudaForm::Gemm, || panic!("inside"))).is_err());
        assert_eq!(now(), None);
    }

    /// `auto`'s measurement runs both forms forward and backward (here on the CPU, where the
    /// public op never asks and both forms are the CPU op, so they agree) and keeps its pick
    /// per shape and dtype: later calls get the same answer.
    #[test]
    fn auto_choice_measures_both_forms_and_keeps_the_pick() {
        let dims = Dims::of(OP_NAME, &[2, 11, 3 * 16], 2).unwrap();
        let first = auto_form(dims, DType::F32, &Device::Cpu, 0.35).unwrap();
        for _ in 0..3 {
            assert_eq!(auto_form(dims, DType::F32, &Device::Cpu, 0.35).unwrap(), first);
        }
    }

    /// The op and candle's composition agree in f64, forward and gradient, on odd sizes
    /// (tokens not a multiple of anything, one head and several, head dims the CUDA kernels
    /// do not cover).
    #[test]
    fn matches_the_composition_forward_and_backward() {
        for (i, &(b, n, heads, hd)) in [(2, 7, 3, 4), (1, 49, 12, 8), (3, 1, 2, 5), (2, 33, 1, 16)].iter().enumerate() {
            let x = random(&[b, n, 3 * heads * hd], 10 + i as u64);
            let probe = random(&[b, n, heads * hd], 20 + i as u64);
            let scale = (hd as f64).powf(-0.5);
            let run = |path: crate::Path| {
                crate::with_path(path, || {
                    let v = Var::from_tensor(&x).unwrap();
                    let y = self_attention(v.as_tensor(), heads, scale).unwrap();
                    let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    (y, grads.get(v.as_tensor()).unwrap().clone())
                })
            };
            let (y, gx) = run(crate::Path::Kernels);
            let (y_ref, gx_ref) = run(crate::Path::Composite);
            assert!(max_rel(&y, &y_ref) < 1e-12, "forward {b}x{n} heads {heads} hd {hd}: {}", max_rel(&y, &y_ref));
            assert!(max_rel(&gx, &gx_ref) < 1e-11, "gradient {b}x{n} heads {heads} hd {hd}: {}", max_rel(&gx, &gx_ref));
        }
    }

    /// Central differences of `sum(out * probe)` against the op's gradient, in f64.
    #[test]
    fn gradient_matches_finite_differences() {
        let (b, n, heads, hd) = (2, 5, 2, 3);
        let x = random(&[b, n, 3 * heads * hd], 3);
        let probe = random(&[b, n, heads * hd], 4);
        let scale = 0.7;
        let loss = |t: &Tensor| -> f64 { (self_attention(t, heads, scale).unwrap() * &probe).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() };
        let v = Var::from_tensor(&x).unwrap();
        let y = self_attention(v.as_tensor(), heads, scale).unwrap();
        let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let analytic = g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eps = 1e-6;
        for (i, &a) in analytic.iter().enumerate() {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                loss(&Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap())
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!((a - numeric).abs() < 1e-8 * (1.0 + numeric.abs()), "element {i}: analytic {a} numeric {numeric}");
        }
    }

    /// A strided input (the transpose of a [B, 3D, N] tensor) gives what its contiguous copy gives.
    #[test]
    fn strided_input_is_read_in_logical_order() {
        let (b, n, heads, hd) = (2, 6, 2, 4);
        let t = random(&[b, 3 * heads * hd, n], 5).to_dtype(DType::F32).unwrap();
        let strided = t.transpose(1, 2).unwrap();
        let a = self_attention(&strided, heads, 0.5).unwrap();
        let c = self_attention(&strided.contiguous().unwrap(), heads, 0.5).unwrap();
        assert_eq!(a.to_vec3::<f32>().unwrap(), c.to_vec3::<f32>().unwrap());
    }

    #[test]
    fn bad_shapes_are_named() {
        let x = Tensor::zeros((2, 3, 10), DType::F32, &Device::Cpu).unwrap();
        let e = self_attention(&x, 2, 1.0).unwrap_err().to_string();
        assert!(e.contains("self_attention") && e.contains("3 x heads (2)"), "{e}");
        let e = self_attention(&x.flatten_all().unwrap(), 1, 1.0).unwrap_err().to_string();
        assert!(e.contains("[batch, tokens, 3 * heads * head_dim]"), "{e}");
        let e = self_attention(&x, 0, 1.0).unwrap_err().to_string();
        assert!(e.contains("heads (0)"), "{e}");
    }
}
