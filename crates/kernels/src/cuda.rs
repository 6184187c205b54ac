//! Launches of our CUDA kernels (`crates/kernels/cuda/*.cu`, compiled to PTX by build.rs) for
//! the custom ops' `cuda_fwd`. One function per kernel family: it checks what the kernel
//! assumes, sizes the grid, allocates the result and launches on the device's stream.
//!
//! All kernels take row-major operands. A strided input (a transposed view, a broadcast
//! gradient) is first copied to a row-major buffer (`Operand`), as the CPU kernels gather with
//! `row_major`; contiguous inputs are passed as views, without a copy.
//!
//! Kernel argument types must match the .cu signatures exactly (the launch passes each value's
//! bytes): sizes are `i64` (`int64_t`), flags and kernel sizes `i32` (`int`), scalars `f32`.

use std::marker::PhantomData;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{result as cublas_result, sys as cublas_sys};
use candle_core::cuda_backend::cudarc::cublaslt::sys as lt_sys;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result};

use crate::attention::{CudaForm, Dims as AttentionDims};
use crate::AdamWUpdate;

const DEPTHWISE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/depthwise.ptx"));
const ROWS_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rows.ptx"));
const ELEMENTWISE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));
const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const FLASH_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash.ptx"));
const ROI_ALIGN_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/roi_align.ptx"));

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Module {
    Depthwise,
    Rows,
    Elementwise,
    Attention,
    Flash,
    RoiAlign,
}

/// The kernel `name` of `module`, loading the module on first use. candle caches custom
/// modules per device under their name, in one namespace for every crate, hence the prefix.
/// Launch it with `dev.cuda_stream().launch_builder(&f)`: the device's one stream.
fn func(dev: &CudaDevice, module: Module, name: &str) -> Result<CudaFunction> {
    // A step launches several hundred of our kernels; looking each up through candle (a lock,
    // an allocation and a cuModuleGetFunction call) is host time a step spends before the
    // launch, so the functions are kept per thread (a model's worker owns its stream).
    thread_local! {
        static LOADED: std::cell::RefCell<std::collections::HashMap<(DeviceId, Module), std::collections::HashMap<String, CudaFunction>>> =
            std::cell::RefCell::new(std::collections::HashMap::new());
    }
    if let Some(f) = LOADED.with(|l| l.borrow().get(&(dev.id(), module)).and_then(|m| m.get(name)).cloned()) {
        return Ok(f);
    }
    let f = load_func(dev, module, name)?;
    LOADED.with(|l| l.borrow_mut().entry((dev.id(), module)).or_default().insert(name.to_string(), f.clone()));
    Ok(f)
}

fn load_func(dev: &CudaDevice, module: Module, name: &str) -> Result<CudaFunction> {
    let (module_name, ptx) = match module {
        Module::Depthwise => ("convmae_depthwise", DEPTHWISE_PTX),
        Module::Rows => ("convmae_rows", ROWS_PTX),
        Module::Elementwise => ("convmae_elementwise", ELEMENTWISE_PTX),
        Module::Attention => ("convmae_attention", ATTENTION_PTX),
        Module::Flash => ("convmae_flash", FLASH_PTX),
        Module::RoiAlign => ("convmae_roi_align", ROI_ALIGN_PTX),
    };
    Ok(dev.get_or_load_custom_func(name, module_name, ptx)?.into_cuda_function())
}

/// Element types a device buffer of ours holds: `Float`'s, and f64 (roi_align's kernels).
pub(crate) trait Stored: CudaDType + DeviceRepr + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits + Copy + 'static {}
impl<T: CudaDType + DeviceRepr + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits + Copy + 'static> Stored for T {}

/// Storage types the kernels are instantiated for, with the suffix of their kernel names and
/// how cuBLAS names them and computes with them.
pub(crate) trait Float: Stored {
    const SUFFIX: &'static str;
    const CUBLAS_TYPE: cublas_sys::cudaDataType_t;
    /// The gemm compute type: f32 accumulation, with the reduced-precision modes candle's own
    /// matmuls honour (device setup turns TF32 on for f32, as PyTorch's allow_tf32 does), so
    /// our gemms and candle's round alike.
    fn compute_type() -> cublas_sys::cublasComputeType_t;
    /// The same two for cuBLASLt (gemm_epilogue.rs), whose bindings have types of their own.
    const LT_TYPE: lt_sys::cudaDataType_t;
    fn lt_compute_type() -> lt_sys::cublasComputeType_t {
        match Self::compute_type() {
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32 => lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            // bf16 and f16 inputs: plain 32F is the same tensor-core product (see `gemm_batched`).
            _ => lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        }
    }
}
impl Float for f32 {
    const SUFFIX: &'static str = "f32";
    const LT_TYPE: lt_sys::cudaDataType_t = lt_sys::cudaDataType_t::CUDA_R_32F;
    const CUBLAS_TYPE: cublas_sys::cudaDataType_t = cublas_sys::cudaDataType_t::CUDA_R_32F;
    fn compute_type() -> cublas_sys::cublasComputeType_t {
        if candle_core::cuda_backend::gemm_reduced_precision_f32() {
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        }
    }
}
impl Float for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    const LT_TYPE: lt_sys::cudaDataType_t = lt_sys::cudaDataType_t::CUDA_R_16BF;
    const CUBLAS_TYPE: cublas_sys::cudaDataType_t = cublas_sys::cudaDataType_t::CUDA_R_16BF;
    fn compute_type() -> cublas_sys::cublasComputeType_t {
        if candle_core::cuda_backend::gemm_reduced_precision_bf16() {
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF
        } else {
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        }
    }
}
impl Float for half::f16 {
    const SUFFIX: &'static str = "f16";
    const LT_TYPE: lt_sys::cudaDataType_t = lt_sys::cudaDataType_t::CUDA_R_16F;
    const CUBLAS_TYPE: cublas_sys::cudaDataType_t = cublas_sys::cudaDataType_t::CUDA_R_16F;
    fn compute_type() -> cublas_sys::cublasComputeType_t {
        // candle's reduced-precision f16 mode accumulates in f16, which our gemms never do.
        cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
    }
}

/// Calls the generic `$f::<T>(args)` with `T` the Rust type of `$dtype`.
macro_rules! cuda_dispatch {
    ($op:expr, $dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            candle_core::DType::F16 => $f::<half::f16>($($arg),*),
            other => Err($crate::cuda::dtype_error($op, other)),
        }
    };
}
pub(crate) use cuda_dispatch;

pub(crate) fn dtype_error(op: &str, dtype: DType) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: no CUDA kernel for dtype {dtype:?} (f32, bf16 and f16 have one)")).bt()
}

/// A row-major device operand: a view of the storage when the layout already is row-major
/// (possibly at an offset), else a row-major copy.
pub(crate) enum Operand<'a, T: Stored> {
    View(CudaView<'a, T>),
    Copy(CudaStorage, PhantomData<T>),
}

impl<'a, T: Stored> Operand<'a, T> {
    pub(crate) fn new(storage: &'a CudaStorage, layout: &Layout) -> Result<Self> {
        match layout.contiguous_offsets() {
            Some((start, end)) => Ok(Self::View(storage.as_cuda_slice::<T>()?.slice(start..end))),
            None => {
                let dev = storage.device();
                // SAFETY: copy_strided_src writes every element before anything reads it.
                let buf = unsafe { dev.alloc::<T>(layout.shape().elem_count()) }?;
                let mut dst = CudaStorage::wrap_cuda_slice(buf, dev.clone());
                storage.copy_strided_src(&mut dst, 0, layout)?;
                Ok(Self::Copy(dst, PhantomData))
            }
        }
    }

    pub(crate) fn view(&self) -> Result<CudaView<'_, T>> {
        match self {
            Self::View(v) => Ok(v.slice(..)),
            Self::Copy(s, _) => Ok(s.as_cuda_slice::<T>()?.slice(..)),
        }
    }
}

const BLOCK: u32 = 256;

/// A 1-D launch of at least `threads` threads in blocks of `block`.
fn launch_1d(threads: usize, block: u32, what: &str) -> Result<LaunchConfig> {
    let blocks = threads.div_ceil(block as usize).max(1);
    if blocks > i32::MAX as usize {
        candle_core::bail!("{what}: {threads} threads do not fit one CUDA grid");
    }
    Ok(LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 })
}

/// Grid-stride loops (element-wise kernels) need no more blocks than keep the GPU busy.
fn launch_grid_stride(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 1 << 16);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// The element-wise kernels that move 16 bytes of each operand a thread (elementwise.cu
/// `map_packed`): a thread per 16 bytes of `n` elements of `T`, as a grid-stride launch.
fn launch_packed<T: Float>(n: usize) -> LaunchConfig {
    launch_grid_stride(n.div_ceil(16 / std::mem::size_of::<T>()))
}

/// A block per row (up to 2^16 blocks, striding over the rest): the bias broadcasts.
fn launch_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.clamp(1, 1 << 16) as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// The row kernels put one warp on a row and `ROW_WARPS` (rows.cu) warps in a block.
const ROW_WARPS: usize = 4;
fn launch_rows(rows: usize, what: &str) -> Result<LaunchConfig> {
    launch_1d(rows * 32, (ROW_WARPS * 32) as u32, what)
}

/// Whether `v`'s device address is a multiple of `bytes` (the vector loads' alignment).
fn aligned<T>(dev: &CudaDevice, v: &CudaView<T>, bytes: usize) -> bool {
    let stream = dev.cuda_stream();
    let (ptr, _guard) = v.device_ptr(&stream);
    ptr.is_multiple_of(bytes as u64)
}

/// Whether kernels may take their vector forms (16 or 8 bytes of each operand a thread, where
/// the shapes and addresses allow: GELU, LayerNorm, the sparse depthwise conv, the one-launch
/// AdamW; all written after run 7 of 2026-11-26). `CONVMAE_VECTOR_KERNELS=off` keeps every one
/// to its one-element form, as before them: the GPU check's A/B row for them and its safety
/// valve should their agreement rows fail. Read once per process.
fn vector_kernels() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !*OFF.get_or_init(|| crate::env_switch("CONVMAE_VECTOR_KERNELS", "on", "off"))
}

/// `vector_kernels` as the kernels with a device-side choice take it (their `vectors` argument).
fn vectors_arg() -> i32 {
    vector_kernels() as i32
}

/// Name suffix of the depthwise kernels compiled for kernel size `k`.
fn k_name(k: usize) -> &'static str {
    match k {
        3 => "k3",
        5 => "k5",
        7 => "k7",
        _ => "kany",
    }
}

/// Partial sums per weight-gradient reduction: enough threads (parts * C) to fill an H100,
/// few enough that the [parts, K*K, C] f32 scratch and its reduction stay small. The split
/// depends only on the shape, so the gradient is the same bits on every run.
const TARGET_PARTS: usize = 512;

fn split(rows: usize) -> (usize, usize) {
    let per_part = rows.div_ceil(TARGET_PARTS).max(1);
    (per_part, rows.div_ceil(per_part))
}

fn alloc<T: Stored>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller launches a kernel that writes all `n` elements before any read.
    unsafe { dev.alloc::<T>(n) }
}

/// Sums the `[parts, a, b]` f32 partials in a fixed order (common.cuh) into `out` (`[a, b]`,
/// or `[b, a]` when `transpose`), stored as `T`.
#[allow(clippy::too_many_arguments)]
fn reduce_partials<T: Float>(
    dev: &CudaDevice,
    module: Module,
    prefix: &str,
    partials: &CudaSlice<f32>,
    out: &mut CudaViewMut<T>,
    (parts, a, b): (usize, usize, usize),
    transpose: bool,
) -> Result<()> {
    if out.len() != a * b {
        candle_core::bail!("{prefix}: {} values to reduce into a view of {}", a * b, out.len());
    }
    let f = func(dev, module, &format!("{prefix}_reduce_partials_{}", T::SUFFIX))?;
    // A warp per output element (common.cuh).
    let cfg = launch_1d(a * b * 32, BLOCK, prefix)?;
    let (parts, a, b, transpose) = (parts as i64, a as i64, b as i64, transpose as i32);
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(partials).arg(out).arg(&parts).arg(&a).arg(&b).arg(&transpose);
    unsafe { builder.launch(cfg) }.w()?;
    Ok(())
}

// ---- depthwise conv (dense) ---------------------------------------------------------------

/// Dense depthwise correlation `[B, H, W, C]` x `[C, K, K]` -> `[B, H, W, C]`; with `flip`
/// the kernel is rotated by 180 degrees (the input gradient).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dw_correlate<T: Float>(
    src: &CudaStorage,
    src_l: &Layout,
    weight: &CudaStorage,
    weight_l: &Layout,
    (b, h, w, c, k): (usize, usize, usize, usize, usize),
    flip: bool,
) -> Result<CudaStorage> {
    let dev = src.device();
    let (x, wt) = (Operand::<T>::new(src, src_l)?, Operand::<T>::new(weight, weight_l)?);
    let (x, wt) = (x.view()?, wt.view()?);
    let mut out = alloc::<T>(dev, b * h * w * c)?;
    let f = func(dev, Module::Depthwise, &format!("dwconv_correlate_{}_{}", k_name(k), T::SUFFIX))?;
    // DW_XT = 4 output columns per thread (depthwise.cu).
    let cfg = launch_1d(b * h * w.div_ceil(4) * c, BLOCK, "depthwise_conv2d")?;
    let (nb, hh, ww, cc, kk, fl) = (b as i64, h as i64, w as i64, c as i64, k as i32, flip as i32);
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(&x).arg(&wt).arg(&mut out).arg(&nb).arg(&hh).arg(&ww).arg(&cc).arg(&kk).arg(&fl);
    unsafe { builder.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `(input [B, H, W, C], grad_out [B, H, W, C]) -> grad_weight [C, K, K]`.
pub(crate) fn dw_weight_grad<T: Float>(
    inp: &CudaStorage,
    inp_l: &Layout,
    gout: &CudaStorage,
    gout_l: &Layout,
    (b, h, w, c, k): (usize, usize, usize, usize, usize),
) -> Result<CudaStorage> {
    let dev = inp.device();
    let (x, g) = (Operand::<T>::new(inp, inp_l)?, Operand::<T>::new(gout, gout_l)?);
    let (x, g) = (x.view()?, g.view()?);
    let kk = k * k;
    let (per_part, parts) = split(b * h);
    let mut partials = alloc::<f32>(dev, parts * kk * c)?;
    let f = func(dev, Module::Depthwise, &format!("dwconv_weight_partials_{}_{}", k_name(k), T::SUFFIX))?;
    let cfg = launch_1d(parts * c, BLOCK, "depthwise_conv2d_weight_grad")?;
    let (nb, hh, ww, cc, ki, pp, np) = (b as i64, h as i64, w as i64, c as i64, k as i32, per_part as i64, parts as i64);
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(&x).arg(&g).arg(&mut partials).arg(&nb).arg(&hh).arg(&ww).arg(&cc).arg(&ki).arg(&pp).arg(&np);
    unsafe { builder.launch(cfg) }.w()?;
    let mut out = alloc::<T>(dev, c * kk)?;
    reduce_partials(dev, Module::Depthwise, "dw", &partials, &mut out.slice_mut(..), (parts, kk, c), true)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

// ---- depthwise conv (sparse) --------------------------------------------------------------

/// The neighbour table of a `SparseNeighbors` on one device, uploaded once and reused by every
/// forward and backward that uses the table (a layer's calls share it).
#[derive(Default)]
pub(crate) struct DeviceTable(Mutex<Option<(DeviceId, std::sync::Arc<CudaSlice<i32>>)>>);

impl DeviceTable {
    /// The table of `nbrs` on `dev`: built there from the mask where `nbrs` comes from one
    /// (`SparseNeighbors::of_visible_tokens`), else uploaded.
    pub(crate) fn get(&self, dev: &CudaDevice, nbrs: &crate::SparseNeighbors) -> Result<std::sync::Arc<CudaSlice<i32>>> {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((id, slice)) = cached.as_ref() {
            if *id == dev.id() {
                return Ok(slice.clone());
            }
        }
        let slice = std::sync::Arc::new(match nbrs.visible_tokens().filter(|_| !host_neighbour_tables()) {
            Some(tokens) => visible_neighbors(dev, tokens, nbrs.rows(), nbrs.k())?,
            // Uploaded without waiting for the step before (transfer.rs).
            None => crate::transfer::staged_htod(dev, nbrs.table())?,
        });
        *cached = Some((dev.id(), slice.clone()));
        Ok(slice)
    }
}

/// `CONVMAE_NEIGHBOUR_TABLES=host`: a mask's neighbour tables built on the host and uploaded,
/// as before `visible_neighbors`: the safety valve the GPU check sets should its agreement row
/// for the kernel fail. Read once per process.
fn host_neighbour_tables() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::env_switch("CONVMAE_NEIGHBOUR_TABLES", "device", "host"))
}

/// cuda/depthwise.cu `visible_neighbors`: the table of a mask's visible token blocks, one
/// thread per entry, from the mask's ids_keep and slots (small uploads).
fn visible_neighbors(dev: &CudaDevice, tokens: &crate::VisibleTokens, rows: usize, k: usize) -> Result<CudaSlice<i32>> {
    let n = rows * k * k;
    let ids_keep = crate::transfer::staged_htod(dev, &tokens.ids_keep)?;
    let slot = crate::transfer::staged_htod(dev, &tokens.slot)?;
    // SAFETY: the kernel writes every entry.
    let out = unsafe { dev.alloc::<i32>(n.max(1)) }?;
    if n > 0 {
        let f = func(dev, Module::Depthwise, "visible_neighbors")?;
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&f);
        let (n64, k32) = (n as i64, k as i32);
        let (cell, grid, len_keep) = (tokens.cell as i32, tokens.grid as i32, tokens.len_keep as i32);
        builder.arg(&ids_keep).arg(&slot).arg(&out).arg(&n64).arg(&k32).arg(&cell).arg(&grid).arg(&len_keep);
        let blocks = n.div_ceil(BLOCK as usize).min(65535 * 8) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        unsafe { builder.launch(cfg) }.w()?;
    }
    Ok(out)
}

// A cache, not part of the value: clones start empty and comparisons ignore it.
impl Clone for DeviceTable {
    fn clone(&self) -> Self {
        Self::default()
    }
}
impl PartialEq for DeviceTable {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for DeviceTable {}
impl std::fmt::Debug for DeviceTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceTable")
    }
}

/// `out[n, c] = sum_t w[c, t] * src[nbr[n, t], c]` on `[N, C]` rows; `flip` rotates the
/// kernel (the input gradient). For K = 3, 5, 7 with C a multiple of 16 bytes' elements, the
/// vector form (depthwise.cu `sparse_gather_lanes`, after the taps are laid out [K*K, C]);
/// else a channel a thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sparse_gather<T: Float>(
    src: &CudaStorage,
    src_l: &Layout,
    weight: &CudaStorage,
    weight_l: &Layout,
    table: &CudaSlice<i32>,
    (rows, c, k): (usize, usize, usize),
    flip: bool,
) -> Result<CudaStorage> {
    let dev = src.device();
    let (x, wt) = (Operand::<T>::new(src, src_l)?, Operand::<T>::new(weight, weight_l)?);
    let (x, wt) = (x.view()?, wt.view()?);
    let mut out = alloc::<T>(dev, rows * c)?;
    // 16 bytes of channels a thread where the shape and the input's address allow it (the
    // output and the taps-major weight are fresh, so aligned).
    let lanes = 16 / std::mem::size_of::<T>();
    if vector_kernels() && k_name(k) != "kany" && c % lanes == 0 && aligned(dev, &x, 16) {
        let kk = k * k;
        let mut w_t = alloc::<T>(dev, kk * c)?;
        let stream = dev.cuda_stream();
        {
            let f = func(dev, Module::Depthwise, &format!("dw_taps_major_{}", T::SUFFIX))?;
            let (cc, kki) = (c as i64, kk as i32);
            let mut builder = stream.launch_builder(&f);
            builder.arg(&wt).arg(&mut w_t).arg(&cc).arg(&kki);
            unsafe { builder.launch(launch_1d(kk * c, BLOCK, "sparse_depthwise_conv2d")?) }.w()?;
        }
        let f = func(dev, Module::Depthwise, &format!("sdwconv_gather_lanes_{}_{}", k_name(k), T::SUFFIX))?;
        // A row and 16 bytes of channels a thread.
        let cfg = launch_1d(rows * (c / lanes), BLOCK, "sparse_depthwise_conv2d")?;
        let (n, cc, fl) = (rows as i64, c as i64, flip as i32);
        let mut builder = stream.launch_builder(&f);
        builder.arg(&x).arg(&w_t).arg(table).arg(&mut out).arg(&n).arg(&cc).arg(&fl);
        unsafe { builder.launch(cfg) }.w()?;
        return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    }
    let f = func(dev, Module::Depthwise, &format!("sdwconv_gather_{}_{}", k_name(k), T::SUFFIX))?;
    // SPARSE_ROWS = 8 rows per thread (depthwise.cu).
    let cfg = launch_1d(rows.div_ceil(8) * c, BLOCK, "sparse_depthwise_conv2d")?;
    let (n, cc, ki, fl) = (rows as i64, c as i64, k as i32, flip as i32);
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(&x).arg(&wt).arg(table).arg(&mut out).arg(&n).arg(&cc).arg(&ki).arg(&fl);
    unsafe { builder.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `(input [N, C], grad_out [N, C]) -> grad_weight [C, K, K]`.
pub(crate) fn sparse_weight_grad<T: Float>(
    inp: &CudaStorage,
    inp_l: &Layout,
    gout: &CudaStorage,
    gout_l: &Layout,
    table: &CudaSlice<i32>,
    (rows, c, k): (usize, usize, usize),
) -> Result<CudaStorage> {
    let dev = inp.device();
    let (x, g) = (Operand::<T>::new(inp, inp_l)?, Operand::<T>::new(gout, gout_l)?);
    let mut out = alloc::<T>(dev, c * k * k)?;
    sparse_weight_grad_into(dev, (&x.view()?, &g.view()?), table, (rows, c, k), &mut out.slice_mut(..))?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `sparse_weight_grad` into a view of the caller's ([C, K, K]).
fn sparse_weight_grad_into<T: Float>(
    dev: &CudaDevice,
    (x, g): (&CudaView<T>, &CudaView<T>),
    table: &CudaSlice<i32>,
    (rows, c, k): (usize, usize, usize),
    out: &mut CudaViewMut<T>,
) -> Result<()> {
    let kk = k * k;
    let (per_part, parts) = split(rows);
    let mut partials = alloc::<f32>(dev, parts * kk * c)?;
    // Two channels a thread where the shape and the addresses allow it (depthwise.cu
    // `sparse_weight_partials_lanes`), else one.
    let pair = 2 * std::mem::size_of::<T>();
    let lanes = vector_kernels() && k_name(k) != "kany" && c % 2 == 0 && aligned(dev, x, pair) && aligned(dev, g, pair);
    let (name, threads) = if lanes { ("sdwconv_weight_partials_lanes", parts * c / 2) } else { ("sdwconv_weight_partials", parts * c) };
    let f = func(dev, Module::Depthwise, &format!("{name}_{}_{}", k_name(k), T::SUFFIX))?;
    let cfg = launch_1d(threads, BLOCK, "sparse_depthwise_conv2d_weight_grad")?;
    let (n, cc, ki, pp, np) = (rows as i64, c as i64, k as i32, per_part as i64, parts as i64);
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(x).arg(g).arg(table).arg(&mut partials).arg(&n).arg(&cc);
    // The vector form has K compiled in; the one-channel form also takes it at run time.
    if !lanes {
        builder.arg(&ki);
    }
    builder.arg(&pp).arg(&np);
    unsafe { builder.launch(cfg) }.w()?;
    reduce_partials(dev, Module::Depthwise, "dw", &partials, out, (parts, kk, c), true)
}

// ---- attention ----------------------------------------------------------------------------

/// ATT_ROWS in attention.cu: query (or key) rows per block, one per thread.
const ATT_ROWS: usize = 64;

/// The attention kernels' grid: a block per (image, head) in x, per 64 rows in y.
fn attention_grid(dims: AttentionDims, what: &str) -> Result<LaunchConfig> {
    let bh = dims.b * dims.heads;
    let row_blocks = dims.n.div_ceil(ATT_ROWS);
    if bh > i32::MAX as usize || row_blocks > 65535 {
        candle_core::bail!("{what}: {} images x {} heads x {} tokens do not fit one CUDA grid", dims.b, dims.heads, dims.n);
    }
    Ok(LaunchConfig { grid_dim: (bh as u32, row_blocks as u32, 1), block_dim: (ATT_ROWS as u32, 1, 1), shared_mem_bytes: 0 })
}

fn attention_func(dev: &CudaDevice, kernel: &str, hd: usize, suffix: &str) -> Result<CudaFunction> {
    func(dev, Module::Attention, &format!("{kernel}_hd{hd}_{suffix}"))
}

/// What sits between a sublayer's two linear layers, as the launch code takes it.
pub(crate) enum CudaMiddle<'a> {
    Gelu,
    Attention(CudaAttention),
    /// The conv block's sparse depthwise conv (k x k, its taps after W2 in the packed weights,
    /// its bias after b2 in the packed vectors) over this neighbour table.
    SparseConv { neighbours: &'a crate::SparseNeighbors, k: usize },
}

/// An attention on CUDA: its sizes, scale, and which of our two forms computes it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CudaAttention {
    pub dims: AttentionDims,
    pub scale: f32,
    pub form: CudaForm,
}

/// What an attention forward keeps for its backward: the flash form's log-sum-exp of each query
/// row ([B * H, N] f32), which its dq kernel would otherwise find again (a quarter of its
/// products). The other forms keep nothing.
pub(crate) type AttentionKept = Option<CudaSlice<f32>>;

/// `softmax(q k^T * scale) v` per head from packed qkv `[B, N, 3, H, hd]` into `[B, N, H, hd]`.
pub(crate) fn attention_fwd<T: Float>(qkv: &CudaStorage, qkv_l: &Layout, att: CudaAttention) -> Result<(CudaStorage, AttentionKept)> {
    match att.form {
        CudaForm::Fused => Ok((fused_attention_fwd::<T>(qkv, qkv_l, att.dims, att.scale)?, None)),
        CudaForm::Gemm => Ok((gemm_attention_fwd::<T>(qkv, qkv_l, att.dims, att.scale)?, None)),
        CudaForm::Flash => flash_attention_fwd::<T>(qkv, qkv_l, att.dims, att.scale, FlashKernels::Wmma).map(|(out, lse)| (out, Some(lse))),
        CudaForm::FlashMma => flash_attention_fwd::<T>(qkv, qkv_l, att.dims, att.scale, FlashKernels::Mma).map(|(out, lse)| (out, Some(lse))),
    }
}

/// `(qkv, out, grad_out) -> grad_qkv` of `attention_fwd`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_bwd<T: Float>(
    qkv: &CudaStorage,
    qkv_l: &Layout,
    out: &CudaStorage,
    out_l: &Layout,
    grad: &CudaStorage,
    grad_l: &Layout,
    att: CudaAttention,
    kept: Option<&CudaSlice<f32>>,
) -> Result<CudaStorage> {
    match att.form {
        CudaForm::Fused => fused_attention_bwd::<T>(qkv, qkv_l, out, out_l, grad, grad_l, att.dims, att.scale),
        CudaForm::Gemm => gemm_attention_bwd::<T>(qkv, qkv_l, grad, grad_l, att.dims, att.scale),
        CudaForm::Flash => flash_attention_bwd::<T>(qkv, qkv_l, out, out_l, grad, grad_l, att.dims, att.scale, kept, FlashKernels::Wmma),
        CudaForm::FlashMma => flash_attention_bwd::<T>(qkv, qkv_l, out, out_l, grad, grad_l, att.dims, att.scale, kept, FlashKernels::Mma),
    }
}

/// The fused kernels' forward.
fn fused_attention_fwd<T: Float>(qkv: &CudaStorage, qkv_l: &Layout, dims: AttentionDims, scale: f32) -> Result<CudaStorage> {
    let dev = qkv.device();
    let xo = Operand::<T>::new(qkv, qkv_l)?;
    let xv = xo.view()?;
    let mut out = alloc::<T>(dev, dims.b * dims.n * dims.d())?;
    let f = attention_func(dev, "attention_fwd", dims.hd, T::SUFFIX)?;
    let (n, heads) = (dims.n as i64, dims.heads as i64);
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(&xv).arg(&mut out).arg(&n).arg(&heads).arg(&scale);
    unsafe { builder.launch(attention_grid(dims, "self_attention")?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The fused kernels' backward: the dq kernel (which leaves each query row's log-sum-exp and
/// rowsum(dO * O) in an f32 scratch), then the dk and dv kernels, which read it.
#[allow(clippy::too_many_arguments)]
fn fused_attention_bwd<T: Float>(
    qkv: &CudaStorage,
    qkv_l: &Layout,
    out: &CudaStorage,
    out_l: &Layout,
    grad: &CudaStorage,
    grad_l: &Layout,
    dims: AttentionDims,
    scale: f32,
) -> Result<CudaStorage> {
    let dev = qkv.device();
    let (xo, oo, go) = (Operand::<T>::new(qkv, qkv_l)?, Operand::<T>::new(out, out_l)?, Operand::<T>::new(grad, grad_l)?);
    let (xv, ov, gv) = (xo.view()?, oo.view()?, go.view()?);
    let mut gx = alloc::<T>(dev, dims.b * dims.n * 3 * dims.d())?;
    let mut stats = alloc::<f32>(dev, 2 * dims.b * dims.heads * dims.n)?;
    let cfg = attention_grid(dims, "self_attention_grad")?;
    let (n, heads) = (dims.n as i64, dims.heads as i64);
    let stream = dev.cuda_stream();
    let f = attention_func(dev, "attention_bwd_q", dims.hd, T::SUFFIX)?;
    let mut builder = stream.launch_builder(&f);
    builder.arg(&xv).arg(&ov).arg(&gv).arg(&mut gx).arg(&mut stats).arg(&n).arg(&heads).arg(&scale);
    unsafe { builder.launch(cfg) }.w()?;
    for kernel in ["attention_bwd_k", "attention_bwd_v"] {
        let f = attention_func(dev, kernel, dims.hd, T::SUFFIX)?;
        let mut builder = stream.launch_builder(&f);
        builder.arg(&xv).arg(&gv).arg(&stats).arg(&mut gx).arg(&n).arg(&heads).arg(&scale);
        unsafe { builder.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(gx, dev.clone()))
}

/// cuda/flash.cu's FLASH_WARPS: warps per block, 16 rows each.
const FLASH_WARPS: usize = 4;
/// The shared memory a block may use without opting in (cuFuncSetAttribute) to more.
const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

/// The dynamic shared memory the flash kernels need for `n` tokens of head dim `hd` in
/// `elem`-byte storage: cuda/flash.cu `FlashShared<T, HD>::bytes`, term by term (two full
/// [n_pad, hd + 8] matrices, two f32 [n_pad] vectors, per warp two [16, hd + 8] tiles, two
/// 16x16 f32 scratch tiles and two [16, 24] tiles). Should the two disagree, a kernel given
/// too little writes NaN (the host check tests this), which the agreement check catches.
pub(crate) fn flash_shared_bytes(n: usize, hd: usize, elem: usize) -> usize {
    let (n_pad, ld, ldp) = (n.div_ceil(16) * 16, hd + 8, 16 + 8);
    let per_warp = 2 * 16 * ld * elem + 2 * 16 * 16 * 4 + 2 * 16 * ldp * elem;
    2 * n_pad * ld * elem + 2 * n_pad * 4 + FLASH_WARPS * per_warp
}

/// The dynamic shared memory of cuda/flash.cu's mma kernels (`flash_mma_shared_bytes` there):
/// two [n_pad, hd + 8] matrices and two f32 [n_pad] vectors; less than the wmma kernels'.
pub(crate) fn flash_mma_shared_bytes(n: usize, hd: usize, elem: usize) -> usize {
    let n_pad = n.div_ceil(16) * 16;
    2 * n_pad * (hd + 8) * elem + 2 * n_pad * 4
}

/// Which kernels compute the flash form.
#[derive(Clone, Copy)]
enum FlashKernels {
    /// `flash_fwd`, `flash_bwd_q`, `flash_bwd_kv`: wmma, score tiles through shared memory (the
    /// forward in two passes).
    Wmma,
    /// `flash_mma_*`: mma.sync, scores in registers (the forward in one pass). The dq kernel
    /// needs the forward's log-sum-exp: without it the wmma kernels run.
    Mma,
}

/// Whether this device gives a block the shared memory the flash kernels need for `dims` in
/// 16-bit storage (227 KB on an H100: ConvMAE-B needs 52 KB in the encoder and 60 KB in the
/// decoder; fine-tuning's 197 tokens at head dim 64, 94 KB).
pub(crate) fn flash_fits(dev: &CudaDevice, dims: AttentionDims) -> Result<bool> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let limit = dev.cuda_stream().context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN).w()?;
    Ok(flash_shared_bytes(dims.n, dims.hd, 2) <= limit.max(0) as usize)
}

/// The flash kernel `kernel` for `dims` in `T`, with its launch: a block of FLASH_WARPS warps
/// per (image, head) and 16 * FLASH_WARPS rows, and the dynamic shared memory it needs (the
/// kernel's limit raised past the 48 KB default where it needs more).
fn flash_launch<T: Float>(dev: &CudaDevice, kernel: &str, dims: AttentionDims, what: &str) -> Result<(CudaFunction, LaunchConfig)> {
    if T::SUFFIX == "f32" {
        candle_core::bail!("{what}: the flash form runs on the tensor cores in bf16 or f16, not f32");
    }
    let elem = std::mem::size_of::<T>();
    let bytes = if kernel.starts_with("flash_mma") { flash_mma_shared_bytes(dims.n, dims.hd, elem) } else { flash_shared_bytes(dims.n, dims.hd, elem) };
    let bh = dims.b * dims.heads;
    let row_blocks = dims.n.div_ceil(16).div_ceil(FLASH_WARPS);
    if bh > i32::MAX as usize || row_blocks > 65535 {
        candle_core::bail!("{what}: {} images x {} heads x {} tokens do not fit one CUDA grid", dims.b, dims.heads, dims.n);
    }
    let f = func(dev, Module::Flash, &format!("{kernel}_hd{}_{}", dims.hd, T::SUFFIX))?;
    if bytes > DEFAULT_SHARED_BYTES {
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32).w()?;
    }
    let cfg = LaunchConfig { grid_dim: (bh as u32, row_blocks as u32, 1), block_dim: (32 * FLASH_WARPS as u32, 1, 1), shared_mem_bytes: bytes as u32 };
    Ok((f, cfg))
}

/// The flash form's forward (cuda/flash.cu): one kernel, the scores never in memory (`Wmma`:
/// staged through shared memory; `Mma`: in registers); also each query row's log-sum-exp, for
/// the backward.
fn flash_attention_fwd<T: Float>(qkv: &CudaStorage, qkv_l: &Layout, dims: AttentionDims, scale: f32, kernel: FlashKernels) -> Result<(CudaStorage, CudaSlice<f32>)> {
    let dev = qkv.device();
    let xo = Operand::<T>::new(qkv, qkv_l)?;
    let xv = xo.view()?;
    let mut out = alloc::<T>(dev, dims.b * dims.n * dims.d())?;
    let mut lse = alloc::<f32>(dev, dims.b * dims.heads * dims.n)?;
    let name = match kernel {
        FlashKernels::Wmma => "flash_fwd",
        FlashKernels::Mma => "flash_mma_fwd",
    };
    let (f, cfg) = flash_launch::<T>(dev, name, dims, "self_attention")?;
    let (n, heads) = (dims.n as i64, dims.heads as i64);
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(&xv).arg(&mut out).arg(&mut lse).arg(&n).arg(&heads).arg(&scale);
    unsafe { builder.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), lse))
}

/// The flash form's backward: the dq kernel (which leaves each query row's log-sum-exp, the
/// forward's `lse` where it was kept, and rowsum(dO * O) in an f32 scratch), then the dk/dv
/// kernel, which reads it.
#[allow(clippy::too_many_arguments)]
fn flash_attention_bwd<T: Float>(
    qkv: &CudaStorage,
    qkv_l: &Layout,
    out: &CudaStorage,
    out_l: &Layout,
    grad: &CudaStorage,
    grad_l: &Layout,
    dims: AttentionDims,
    scale: f32,
    lse: Option<&CudaSlice<f32>>,
    kernels: FlashKernels,
) -> Result<CudaStorage> {
    const WHAT: &str = "self_attention_grad";
    let (bwd_q, bwd_kv) = match (kernels, lse.is_some()) {
        (FlashKernels::Mma, true) => ("flash_mma_bwd_q", "flash_mma_bwd_kv"),
        _ => ("flash_bwd_q", "flash_bwd_kv"),
    };
    let dev = qkv.device();
    let (xo, oo, go) = (Operand::<T>::new(qkv, qkv_l)?, Operand::<T>::new(out, out_l)?, Operand::<T>::new(grad, grad_l)?);
    let (xv, ov, gv) = (xo.view()?, oo.view()?, go.view()?);
    let mut gx = alloc::<T>(dev, dims.b * dims.n * 3 * dims.d())?;
    let mut stats = alloc::<f32>(dev, 2 * dims.b * dims.heads * dims.n)?;
    let (n, heads) = (dims.n as i64, dims.heads as i64);
    let stream = dev.cuda_stream();
    if lse.is_some_and(|l| l.len() != dims.b * dims.heads * dims.n) {
        candle_core::bail!("{WHAT}: the forward's log-sum-exp does not fit {} images x {} heads x {} tokens", dims.b, dims.heads, dims.n);
    }
    // Without the forward's log-sum-exp the kernel finds it again and never reads this argument
    // (the scratch stands in for it).
    let have_lse = lse.is_some() as i32;
    let placeholder;
    let lse_in = match lse {
        Some(l) => l.slice(..),
        None => {
            placeholder = alloc::<f32>(dev, 1)?;
            placeholder.slice(..)
        }
    };
    let (f, cfg) = flash_launch::<T>(dev, bwd_q, dims, WHAT)?;
    let mut builder = stream.launch_builder(&f);
    builder.arg(&xv).arg(&ov).arg(&gv).arg(&lse_in).arg(&have_lse).arg(&mut gx).arg(&mut stats).arg(&n).arg(&heads).arg(&scale);
    unsafe { builder.launch(cfg) }.w()?;
    let (f, cfg) = flash_launch::<T>(dev, bwd_kv, dims, WHAT)?;
    let mut builder = stream.launch_builder(&f);
    builder.arg(&xv).arg(&gv).arg(&stats).arg(&mut gx).arg(&n).arg(&heads).arg(&scale);
    unsafe { builder.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(gx, dev.clone()))
}

/// Packed rows [B, N, parts, H, hd] to heads-major [parts, B * H, N, hd] (`to_heads`), or back.
fn permute_heads<T: Float>(dev: &CudaDevice, src: &CudaView<T>, dims: AttentionDims, parts: usize, to_heads: bool) -> Result<CudaSlice<T>> {
    let tokens = dims.b * dims.n;
    if tokens > i32::MAX as usize || parts > 65535 {
        candle_core::bail!("self_attention: {} images x {} tokens do not fit one CUDA grid", dims.b, dims.n);
    }
    let mut dst = alloc::<T>(dev, tokens * parts * dims.d())?;
    let kernel = if to_heads { "attention_to_heads" } else { "attention_from_heads" };
    let f = func(dev, Module::Attention, &format!("{kernel}_{}", T::SUFFIX))?;
    let (b, n, heads, hd) = (dims.b as i64, dims.n as i64, dims.heads as i64, dims.hd as i32);
    let cfg = LaunchConfig { grid_dim: (tokens as u32, parts as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(src).arg(&mut dst).arg(&b).arg(&n).arg(&heads).arg(&hd);
    unsafe { builder.launch(cfg) }.w()?;
    Ok(dst)
}

/// The gemm form's softmax: f32 scores `[rows, d]` to probabilities in `T`.
fn scores_softmax<T: Float>(dev: &CudaDevice, scores: &CudaSlice<f32>, (rows, d): (usize, usize)) -> Result<CudaSlice<T>> {
    let mut p = alloc::<T>(dev, rows * d)?;
    let f = func(dev, Module::Rows, &format!("scores_softmax_fwd_{}", T::SUFFIX))?;
    let (r, dd) = (rows as i64, d as i64);
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(scores).arg(&mut p).arg(&r).arg(&dd);
    unsafe { builder.launch(launch_rows(rows, "self_attention")?) }.w()?;
    Ok(p)
}

/// Its backward: the scores' gradient `p * (dp - rowsum(p * dp))` in `T`, from the
/// probabilities and their f32 gradient.
fn scores_softmax_bwd<T: Float>(dev: &CudaDevice, p: &CudaSlice<T>, dp: &CudaSlice<f32>, (rows, d): (usize, usize)) -> Result<CudaSlice<T>> {
    let mut ds = alloc::<T>(dev, rows * d)?;
    let f = func(dev, Module::Rows, &format!("scores_softmax_bwd_{}", T::SUFFIX))?;
    let (r, dd) = (rows as i64, d as i64);
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(p).arg(dp).arg(&mut ds).arg(&r).arg(&dd);
    unsafe { builder.launch(launch_rows(rows, "self_attention_grad")?) }.w()?;
    Ok(ds)
}

/// The batch of one product over all (image, head) pairs: `per_a`, `per_b`, `per_c` elements
/// per pair in each operand.
fn per_head(dims: AttentionDims, (per_a, per_b, per_c): (usize, usize, usize)) -> Batch {
    Batch { count: dims.b * dims.heads, stride_a: per_a, stride_b: per_b, stride_c: per_c }
}

/// q, k and v heads-major ([B * H, N, hd] each, in that order) and the f32-softmaxed
/// probabilities `softmax(q k^T * scale)` [B * H, N, N] in `T`: the forward's first half, which
/// the backward recomputes.
fn gemm_attention_probabilities<T: Float>(dev: &CudaDevice, qkv: &CudaView<T>, dims: AttentionDims, scale: f32, what: &str) -> Result<(CudaSlice<T>, CudaSlice<T>)> {
    let (n, hd) = (dims.n, dims.hd);
    let heads = permute_heads::<T>(dev, qkv, dims, 3, true)?;
    let per = dims.b * dims.heads * n * hd;
    let (q, k) = (heads.slice(0..per), heads.slice(per..2 * per));
    // The scores in f32, as a fused kernel keeps them: rounding logits of up to ~10 to bf16
    // would move the probabilities by up to ~4%.
    let mut scores = alloc::<f32>(dev, dims.b * dims.heads * n * n)?;
    gemm_batched::<T, f32>(dev, (n, n, hd), per_head(dims, (n * hd, n * hd, n * n)), &q, Trans::No, &k, Trans::Yes, &mut scores.slice_mut(..), (scale, 0.0), what)?;
    let p = scores_softmax::<T>(dev, &scores, (dims.b * dims.heads * n, n))?;
    Ok((heads, p))
}

/// The gemm form's forward: heads-major q, k, v; f32 scores by one batched tensor-core gemm;
/// our softmax; `p v` by another; the heads back into rows. The `[B * H, N, N]` scores and
/// probabilities are temporaries, freed before the op returns (the backward recomputes them).
fn gemm_attention_fwd<T: Float>(qkv: &CudaStorage, qkv_l: &Layout, dims: AttentionDims, scale: f32) -> Result<CudaStorage> {
    const WHAT: &str = "self_attention";
    let dev = qkv.device();
    let xo = Operand::<T>::new(qkv, qkv_l)?;
    let (n, hd) = (dims.n, dims.hd);
    let (heads, p) = gemm_attention_probabilities::<T>(dev, &xo.view()?, dims, scale, WHAT)?;
    let per = dims.b * dims.heads * n * hd;
    let v = heads.slice(2 * per..3 * per);
    let mut o = alloc::<T>(dev, per)?;
    gemm_batched::<T, T>(dev, (n, hd, n), per_head(dims, (n * n, n * hd, n * hd)), &p.slice(..), Trans::No, &v, Trans::No, &mut o.slice_mut(..), (1.0, 0.0), WHAT)?;
    drop((heads, p));
    let out = permute_heads::<T>(dev, &o.slice(..), dims, 1, false)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The gemm form's backward, from the probabilities recomputed: dp = dO v^T (f32), ds =
/// softmax's backward, dq = scale ds k, dk = scale ds^T q, dv = p^T dO, each a batched gemm
/// into one heads-major [3, B * H, N, hd] gradient that goes back into packed rows.
fn gemm_attention_bwd<T: Float>(qkv: &CudaStorage, qkv_l: &Layout, grad: &CudaStorage, grad_l: &Layout, dims: AttentionDims, scale: f32) -> Result<CudaStorage> {
    const WHAT: &str = "self_attention_grad";
    let dev = qkv.device();
    let (xo, go) = (Operand::<T>::new(qkv, qkv_l)?, Operand::<T>::new(grad, grad_l)?);
    let (n, hd) = (dims.n, dims.hd);
    let (heads, p) = gemm_attention_probabilities::<T>(dev, &xo.view()?, dims, scale, WHAT)?;
    let dout = permute_heads::<T>(dev, &go.view()?, dims, 1, true)?;
    let per = dims.b * dims.heads * n * hd;
    let (q, k, v) = (heads.slice(0..per), heads.slice(per..2 * per), heads.slice(2 * per..3 * per));
    let (nn, nd) = (n * n, n * hd);
    let mut dp = alloc::<f32>(dev, dims.b * dims.heads * nn)?;
    gemm_batched::<T, f32>(dev, (n, n, hd), per_head(dims, (nd, nd, nn)), &dout.slice(..), Trans::No, &v, Trans::Yes, &mut dp.slice_mut(..), (1.0, 0.0), WHAT)?;
    let ds = scores_softmax_bwd::<T>(dev, &p, &dp, (dims.b * dims.heads * n, n))?;
    drop(dp);
    let mut g = alloc::<T>(dev, 3 * per)?;
    let batch = per_head(dims, (nn, nd, nd));
    gemm_batched::<T, T>(dev, (n, hd, n), batch, &ds.slice(..), Trans::No, &k, Trans::No, &mut g.slice_mut(0..per), (scale, 0.0), WHAT)?;
    gemm_batched::<T, T>(dev, (n, hd, n), batch, &ds.slice(..), Trans::Yes, &q, Trans::No, &mut g.slice_mut(per..2 * per), (scale, 0.0), WHAT)?;
    gemm_batched::<T, T>(dev, (n, hd, n), batch, &p.slice(..), Trans::Yes, &dout.slice(..), Trans::No, &mut g.slice_mut(2 * per..3 * per), (1.0, 0.0), WHAT)?;
    drop((heads, p, ds, dout));
    let gqkv = permute_heads::<T>(dev, &g.slice(..), dims, 3, false)?;
    Ok(CudaStorage::wrap_cuda_slice(gqkv, dev.clone()))
}

// ---- linear (cuBLAS gemms around two row kernels) ------------------------------------------

/// Whether a matrix operand of `gemm` is read as stored or transposed.
#[derive(Clone, Copy)]
enum Trans {
    No,
    Yes,
}

/// c = a' b' (+ c when `accumulate`), all row-major: a' is `a` ([m, k], or [k, m] read
/// transposed), b' is `b` ([k, n], or [n, k] transposed), c is [m, n]; every operand is
/// densely packed. One matrix of `gemm_batched`.
#[allow(clippy::too_many_arguments)]
fn gemm<T: Float>(
    dev: &CudaDevice,
    mnk: (usize, usize, usize),
    a: &CudaView<T>,
    trans_a: Trans,
    b: &CudaView<T>,
    trans_b: Trans,
    c: &mut CudaViewMut<T>,
    accumulate: bool,
    what: &str,
) -> Result<()> {
    let beta = if accumulate { 1.0 } else { 0.0 };
    gemm_batched::<T, T>(dev, mnk, Batch::ONE, a, trans_a, b, trans_b, c, (1.0, beta), what)
}

/// How many matrices a batched gemm multiplies, and how far apart (in elements) consecutive
/// ones lie in each operand.
#[derive(Clone, Copy)]
struct Batch {
    count: usize,
    stride_a: usize,
    stride_b: usize,
    stride_c: usize,
}

impl Batch {
    const ONE: Self = Self { count: 1, stride_a: 0, stride_b: 0, stride_c: 0 };
}

/// For each matrix i of `batch`: c_i = alpha a_i' b_i' + beta c_i, with a', b' and c as in
/// `gemm` (row-major, densely packed, each read as stored or transposed). The inputs are `A`,
/// the output `C`: f32 scores from bf16 q and k, say; the compute type is `A`'s (f32
/// accumulation). cuBLAS is column-major, and a row-major matrix is its transpose in column
/// order, so this asks cuBLAS for c^T = b'^T a'^T: the operands swap, the flags stay, and each
/// leading dimension is the stored row length. Runs on the device's cuBLAS handle, which is
/// bound to its one stream.
#[allow(clippy::too_many_arguments)]
fn gemm_batched<A: Float, C: Float>(
    dev: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    batch: Batch,
    a: &CudaView<A>,
    trans_a: Trans,
    b: &CudaView<A>,
    trans_b: Trans,
    c: &mut CudaViewMut<C>,
    (alpha, beta): (f32, f32),
    what: &str,
) -> Result<()> {
    let fits = |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what}: dimension {v} is too large for a cuBLAS gemm")));
    let (mi, ni, ki, count) = (fits(m)?, fits(n)?, fits(k)?, fits(batch.count)?);
    let last = |stride: usize, len: usize| (batch.count - 1) * stride + len;
    if a.len() < last(batch.stride_a, m * k) || b.len() < last(batch.stride_b, k * n) || c.len() < last(batch.stride_c, m * n) {
        candle_core::bail!("{what}: a cuBLAS gemm of {} x ({m} x {k} by {k} x {n}) does not fit its operands", batch.count);
    }
    // The stored shape of a' is [m, k] (No) or [k, m] (Yes); its row length is the leading
    // dimension cuBLAS needs. Likewise b' is stored [k, n] or [n, k].
    let (op_a, lda) = match trans_a {
        Trans::No => (cublas_sys::cublasOperation_t::CUBLAS_OP_N, ki),
        Trans::Yes => (cublas_sys::cublasOperation_t::CUBLAS_OP_T, mi),
    };
    let (op_b, ldb) = match trans_b {
        Trans::No => (cublas_sys::cublasOperation_t::CUBLAS_OP_N, ni),
        Trans::Yes => (cublas_sys::cublasOperation_t::CUBLAS_OP_T, ki),
    };
    // cuBLAS's fast 16-bit compute modes take f32 operands only; half inputs with an f32 output
    // are computed in plain 32F, which on half inputs is the same tensor-core product.
    let compute = if A::CUBLAS_TYPE == C::CUBLAS_TYPE { A::compute_type() } else { cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F };
    let blas = dev.cublas_handle();
    let stream = dev.cuda_stream();
    let (a_ptr, _a_guard) = a.device_ptr(&stream);
    let (b_ptr, _b_guard) = b.device_ptr(&stream);
    let (c_ptr, _c_guard) = c.device_ptr_mut(&stream);
    // SAFETY: the lengths were checked against (m, n, k) and the batch above; alpha and beta
    // are f32 as every compute type used here (32F and its fast modes) requires.
    unsafe {
        cublas_result::gemm_strided_batched_ex(
            *blas.handle(),
            op_b,
            op_a,
            ni,
            mi,
            ki,
            &alpha as *const f32 as *const _,
            b_ptr as *const _,
            A::CUBLAS_TYPE,
            ldb,
            batch.stride_b as i64,
            a_ptr as *const _,
            A::CUBLAS_TYPE,
            lda,
            batch.stride_a as i64,
            &beta as *const f32 as *const _,
            c_ptr as *mut _,
            C::CUBLAS_TYPE,
            ni,
            batch.stride_c as i64,
            count,
            compute,
            cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("{what}: cuBLAS gemm ({} x {m} x {k} by {k} x {n}): {e:?}", batch.count)))
}

/// y = x W^T + b (+ residual): one cuBLASLt gemm with the bias (and the residual, when given:
/// [rows, out]) in its epilogue where it serves (gemm_epilogue.rs); else the bias (plus the
/// residual) broadcast into y's rows, then one gemm accumulating onto it. x: [rows, in], w: [out, in], b: [out]
/// (row-major after `Operand`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_fwd<T: Float>(
    x: &CudaStorage,
    x_l: &Layout,
    w: &CudaStorage,
    w_l: &Layout,
    b: &CudaStorage,
    b_l: &Layout,
    residual: Option<(&CudaStorage, &Layout)>,
    (rows, inp, out): (usize, usize, usize),
) -> Result<CudaStorage> {
    let dev = x.device();
    let (xo, wo, bo) = (Operand::<T>::new(x, x_l)?, Operand::<T>::new(w, w_l)?, Operand::<T>::new(b, b_l)?);
    let (xv, wv, bv) = (xo.view()?, wo.view()?, bo.view()?);
    let mut y = alloc::<T>(dev, rows * out)?;
    let residual = residual.map(|(res, res_l)| Operand::<T>::new(res, res_l)).transpose()?;
    let residual_view = residual.as_ref().map(|r| r.view()).transpose()?;
    if crate::gemm_epilogue::linear_fwd(dev, &xv, &wv, &bv, residual_view.as_ref(), (rows, inp, out), &mut y.slice_mut(..))? {
        return Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()));
    }
    {
        let (r, d) = (rows as i64, out as i64);
        let stream = dev.cuda_stream();
        match &residual_view {
            None => {
                let f = func(dev, Module::Rows, &format!("rows_broadcast_{}", T::SUFFIX))?;
                let mut builder = stream.launch_builder(&f);
                builder.arg(&bv).arg(&mut y).arg(&r).arg(&d);
                unsafe { builder.launch(launch_per_row(rows)) }.w()?;
            }
            Some(res) => add_row_into(dev, res, &bv, &mut y, (rows, out))?,
        }
    }
    gemm(dev, (rows, out, inp), &xv, Trans::No, &wv, Trans::Yes, &mut y.slice_mut(..), true, "linear")?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// out = res + row, the row ([d]) broadcast over res's rows ([rows, d]).
fn add_row_into<T: Float>(dev: &CudaDevice, res: &CudaView<T>, row: &CudaView<T>, out: &mut CudaSlice<T>, (rows, d): (usize, usize)) -> Result<()> {
    let (r, dd) = (rows as i64, d as i64);
    let f = func(dev, Module::Rows, &format!("rows_add_broadcast_{}", T::SUFFIX))?;
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(res).arg(row).arg(out).arg(&r).arg(&dd);
    unsafe { builder.launch(launch_per_row(rows)) }.w()?;
    Ok(())
}

/// The three gradients of `linear_fwd` packed as [dx (rows x in) | dW (out x in) | db (out)],
/// the layout of the CPU op: dx = g W and dW = g^T x by cuBLAS, db = g's column sums in f32.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_bwd<T: Float>(
    x: &CudaStorage,
    x_l: &Layout,
    w: &CudaStorage,
    w_l: &Layout,
    grad: &CudaStorage,
    grad_l: &Layout,
    (rows, inp, out): (usize, usize, usize),
) -> Result<CudaStorage> {
    let dev = x.device();
    let (xo, wo, go) = (Operand::<T>::new(x, x_l)?, Operand::<T>::new(w, w_l)?, Operand::<T>::new(grad, grad_l)?);
    let (xv, wv, gv) = (xo.view()?, wo.view()?, go.view()?);
    let mut all = alloc::<T>(dev, rows * inp + out * inp + out)?;
    let (mut dx, mut rest) = all.split_at_mut(rows * inp);
    let (mut dw, mut db) = rest.split_at_mut(out * inp);
    linear_bwd_into(dev, (&xv, &wv, &gv), (rows, inp, out), (&mut dx, &mut dw, &mut db))?;
    Ok(CudaStorage::wrap_cuda_slice(all, dev.clone()))
}

/// `linear_bwd` into views of the caller's: dx [rows, in], dW [out, in] and db [out] (the
/// sublayer's backward writes its weight and bias gradients straight into its packed result).
/// dW and db come from one cuBLASLt gemm where its bias-gradient epilogue serves
/// (gemm_epilogue.rs), else from a gemm and our column sums.
fn linear_bwd_into<T: Float>(
    dev: &CudaDevice,
    (x, w, g): (&CudaView<T>, &CudaView<T>, &CudaView<T>),
    (rows, inp, out): (usize, usize, usize),
    (dx, dw, db): (&mut CudaViewMut<T>, &mut CudaViewMut<T>, &mut CudaViewMut<T>),
) -> Result<()> {
    gemm(dev, (rows, inp, out), g, Trans::No, w, Trans::No, dx, false, "linear_backward")?;
    if crate::gemm_epilogue::weight_and_bias_grads(dev, x, g, (rows, inp, out), dw, db)? {
        return Ok(());
    }
    gemm(dev, (out, inp, rows), g, Trans::Yes, x, Trans::No, dw, false, "linear_backward")?;
    column_sums_into(dev, g, (rows, out), db)
}

/// The column sums of `g` ([rows, d]) in f32, in a fixed order, into `out` ([d]): a bias's
/// gradient.
fn column_sums_into<T: Float>(dev: &CudaDevice, g: &CudaView<T>, (rows, d): (usize, usize), out: &mut CudaViewMut<T>) -> Result<()> {
    let (per_part, parts) = split(rows);
    let mut partials = alloc::<f32>(dev, parts * d)?;
    {
        let f = func(dev, Module::Rows, &format!("column_sum_partials_{}", T::SUFFIX))?;
        let (r, dd, pp, np) = (rows as i64, d as i64, per_part as i64, parts as i64);
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&f);
        builder.arg(g).arg(&mut partials).arg(&r).arg(&dd).arg(&pp).arg(&np);
        unsafe { builder.launch(launch_1d(parts * d, BLOCK, "column sums")?) }.w()?;
    }
    reduce_partials(dev, Module::Rows, "rows", &partials, out, (parts, 1, d), false)
}

// ---- sublayers (sublayer.rs): LayerNorm, linear, GELU or attention, linear + residual --------

/// What a sublayer's forward keeps for its backward (see sublayer.rs `Saved`).
pub(crate) struct SublayerSaved {
    pub h: CudaStorage,
    /// The middle's output (GELU or attention), and the LayerNorm output: kept on the GPU,
    /// where memory is not what binds (ConvMAE-B at batch 64 peaked at under half of PyTorch
    /// eager's, 0.57x with these kept) and recomputing them was two more passes over the
    /// sublayer's widest tensors in every backward (H100 profiles, benches/results/
    /// gpu-2026-11-26.md: GELU forward launches 49 in run 4, 26 in run 7, 2.70 -> 1.34 ms a step;
    /// LayerNorm forward 93 -> 51, 1.35 -> 0.67 ms). The CPU op recomputes both (sublayer.rs); the backward here
    /// does too where they are None.
    pub a: Option<CudaStorage>,
    pub xln: Option<CudaStorage>,
    pub vectors: CudaStorage,
    pub stats: CudaSlice<f32>,
    /// What the attention forward kept for its backward (`AttentionKept`).
    pub attention: AttentionKept,
}

/// `storage` under `layout` as a storage of its own, densely packed from offset 0.
pub(crate) fn owned_copy<T: Float>(storage: &CudaStorage, layout: &Layout) -> Result<CudaStorage> {
    let dev = storage.device();
    let n = layout.shape().elem_count();
    let mut dst = CudaStorage::wrap_cuda_slice(alloc::<T>(dev, n)?, dev.clone());
    storage.copy_strided_src(&mut dst, 0, layout)?;
    Ok(dst)
}

/// Where the pieces of the packed weights ([W1 (first_out x D) | W2 (D x second_in) | the
/// middle's weights]) and of the packed vectors ([ln_w | ln_b | b1 | b2 | the middle's bias],
/// owned, from offset 0) are, as layouts.
struct SublayerLayouts {
    w1: Layout,
    w2: Layout,
    mw: Layout,
    ln_w: Layout,
    ln_b: Layout,
    b1: Layout,
    b2: Layout,
    mb: Layout,
}

impl SublayerLayouts {
    fn new(weights_start: usize, w: crate::sublayer::Widths) -> Self {
        let (d, first_out, second_in) = (w.d, w.first_out, w.second_in);
        Self {
            w1: Layout::contiguous_with_offset((first_out, d), weights_start),
            w2: Layout::contiguous_with_offset((d, second_in), weights_start + first_out * d),
            mw: Layout::contiguous_with_offset(w.middle_weights, weights_start + first_out * d + d * second_in),
            ln_w: Layout::contiguous_with_offset(d, 0),
            ln_b: Layout::contiguous_with_offset(d, d),
            b1: Layout::contiguous_with_offset(first_out, 2 * d),
            b2: Layout::contiguous_with_offset(d, 2 * d + first_out),
            mb: Layout::contiguous_with_offset(w.middle_bias, 3 * d + first_out),
        }
    }
}

/// The packed weights as (a storage that is contiguous from `start`, start): the argument
/// itself when it already is, else a copy.
fn weights_operand<'a, T: Float>(w: &'a CudaStorage, w_l: &Layout, copy: &'a mut Option<CudaStorage>) -> Result<(&'a CudaStorage, usize)> {
    match w_l.contiguous_offsets() {
        Some((start, _)) => Ok((w, start)),
        None => Ok((copy.insert(owned_copy::<T>(w, w_l)?), 0)),
    }
}

/// The middle's forward (with what attention keeps for its backward): GELU, attention, or the
/// sparse depthwise conv plus its bias (`w` and `vectors` hold its taps and bias where `at`
/// says).
fn middle_fwd<T: Float>(h: &CudaStorage, rows: usize, first_out: usize, middle: &CudaMiddle, (w, vectors, at): (&CudaStorage, &CudaStorage, &SublayerLayouts)) -> Result<(CudaStorage, AttentionKept)> {
    match middle {
        CudaMiddle::Attention(att) => attention_fwd::<T>(h, &Layout::contiguous((att.dims.b, att.dims.n, first_out)), *att),
        CudaMiddle::Gelu => Ok((gelu_fwd::<T>(h, &Layout::contiguous(rows * first_out))?, None)),
        CudaMiddle::SparseConv { neighbours, k } => {
            let dev = h.device();
            let table = neighbours.device_table(dev)?;
            let conv = sparse_gather::<T>(h, &Layout::contiguous((rows, first_out)), w, &at.mw, &table, (rows, first_out, *k), false)?;
            let (co, bo) = (Operand::<T>::new(&conv, &Layout::contiguous((rows, first_out)))?, Operand::<T>::new(vectors, &at.mb)?);
            let mut a = alloc::<T>(dev, rows * first_out)?;
            add_row_into(dev, &co.view()?, &bo.view()?, &mut a, (rows, first_out))?;
            Ok((CudaStorage::wrap_cuda_slice(a, dev.clone()), None))
        }
    }
}

/// y = x + W2 middle(W1 LN(x) + b1) + b2 over rows of x; keeps h = W1 LN(x) + b1, the
/// middle's output, the LayerNorm output and statistics and the packed vectors for the
/// backward (`SublayerSaved`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sublayer_fwd<T: Float>(
    x: &CudaStorage,
    x_l: &Layout,
    weights: &CudaStorage,
    weights_l: &Layout,
    vectors: &CudaStorage,
    vectors_l: &Layout,
    widths: crate::sublayer::Widths,
    middle: &CudaMiddle,
    eps: f64,
) -> Result<(CudaStorage, SublayerSaved)> {
    let (d, first_out, second_in) = (widths.d, widths.first_out, widths.second_in);
    let rows = x_l.shape().elem_count() / d;
    let vectors = owned_copy::<T>(vectors, vectors_l)?;
    let mut w_copy = None;
    let (w, w_start) = weights_operand::<T>(weights, weights_l, &mut w_copy)?;
    let at = SublayerLayouts::new(w_start, widths);
    let (xln, stats) = layer_norm_fwd::<T>(x, x_l, &vectors, &at.ln_w, &vectors, &at.ln_b, (rows, d), eps)?;
    let h = linear_fwd::<T>(&xln, &Layout::contiguous((rows, d)), w, &at.w1, &vectors, &at.b1, None, (rows, d, first_out))?;
    let (a, attention_kept) = middle_fwd::<T>(&h, rows, first_out, middle, (w, &vectors, &at))?;
    let y = linear_fwd::<T>(&a, &Layout::contiguous((rows, second_in)), w, &at.w2, &vectors, &at.b2, Some((x, x_l)), (rows, second_in, d))?;
    Ok((y, SublayerSaved { h, a: Some(a), xln: Some(xln), vectors, stats, attention: attention_kept }))
}

/// The packed gradients of `sublayer_fwd`: [dx (rows x D) | dW1 | dW2 | d middle weights |
/// d ln_w | d ln_b | d b1 | d b2 | d middle bias], the layout of the CPU op.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sublayer_bwd<T: Float>(
    x: &CudaStorage,
    x_l: &Layout,
    weights: &CudaStorage,
    weights_l: &Layout,
    grad: &CudaStorage,
    grad_l: &Layout,
    saved: &SublayerSaved,
    widths: crate::sublayer::Widths,
    middle: &CudaMiddle,
    eps: f64,
) -> Result<(CudaStorage, CudaStorage)> {
    let SublayerSaved { h, a: kept, xln: kept_xln, vectors, stats, attention: attention_kept } = saved;
    let (d, first_out, second_in) = (widths.d, widths.first_out, widths.second_in);
    let rows = x_l.shape().elem_count() / d;
    let dev = x.device();
    let mut w_copy = None;
    let (w, w_start) = weights_operand::<T>(weights, weights_l, &mut w_copy)?;
    let at = SublayerLayouts::new(w_start, widths);
    let h_l = Layout::contiguous(rows * first_out);
    let a_l = Layout::contiguous((rows, second_in));
    // The GELU output, kept (or recomputed).
    let recomputed;
    let a = match kept {
        Some(a) => a,
        None => {
            recomputed = middle_fwd::<T>(h, rows, first_out, middle, (w, vectors, &at))?.0;
            &recomputed
        }
    };
    // dx, and the parameters' gradients packed, each written where it lands:
    // [dW1 | dW2 | d middle weights | d ln_w, d ln_b | d b1 | d b2 | d middle bias].
    let mut out_dx = alloc::<T>(dev, rows * d)?;
    let mut out_params = alloc::<T>(dev, widths.weights() + widths.vectors())?;
    let mut dx = out_dx.slice_mut(..);
    let (mut dw1, mut rest) = out_params.split_at_mut(first_out * d);
    let (mut dw2, mut rest) = rest.split_at_mut(d * second_in);
    let (mut dmw, mut rest) = rest.split_at_mut(widths.middle_weights);
    let (mut dln, mut rest) = rest.split_at_mut(2 * d);
    let (mut db1, mut rest) = rest.split_at_mut(first_out);
    let (mut db2, mut dmb) = rest.split_at_mut(d);
    let go = Operand::<T>::new(grad, grad_l)?;
    let gv = go.view()?;
    // The second linear layer: da, with dW2 and db2 in place.
    let mut da = alloc::<T>(dev, rows * second_in)?;
    {
        let (ao, w2o) = (Operand::<T>::new(a, &a_l)?, Operand::<T>::new(w, &at.w2)?);
        linear_bwd_into(dev, (&ao.view()?, &w2o.view()?, &gv), (rows, second_in, d), (&mut da.slice_mut(..), &mut dw2, &mut db2))?;
    }
    let da = CudaStorage::wrap_cuda_slice(da, dev.clone());
    let da_l = Layout::contiguous(rows * second_in);
    let dh = match middle {
        CudaMiddle::Attention(att) => {
            let qkv_l = Layout::contiguous((att.dims.b, att.dims.n, first_out));
            let out_l = Layout::contiguous((att.dims.b, att.dims.n, second_in));
            attention_bwd::<T>(h, &qkv_l, a, &out_l, &da, &out_l, *att, attention_kept.as_ref())?
        }
        CudaMiddle::Gelu => gelu_bwd::<T>(h, &h_l, &da, &da_l)?,
        // The conv: its bias's gradient (da's column sums) and its taps' in place, then the
        // input gradient (the gather with the taps rotated).
        CudaMiddle::SparseConv { neighbours, k } => {
            let table = neighbours.device_table(dev)?;
            let rows_l = Layout::contiguous((rows, first_out));
            {
                let (ho, dao) = (Operand::<T>::new(h, &rows_l)?, Operand::<T>::new(&da, &rows_l)?);
                let (hv, dav) = (ho.view()?, dao.view()?);
                column_sums_into(dev, &dav, (rows, first_out), &mut dmb)?;
                sparse_weight_grad_into(dev, (&hv, &dav), &table, (rows, first_out, *k), &mut dmw)?;
            }
            sparse_gather::<T>(&da, &rows_l, w, &at.mw, &table, (rows, first_out, *k), true)?
        }
    };
    drop(da);
    // The first linear layer, with the LayerNorm output kept (or recomputed): dxln, with dW1
    // and db1 in place.
    let recomputed_xln;
    let xln = match kept_xln {
        Some(xln) => xln,
        None => {
            recomputed_xln = layer_norm_fwd::<T>(x, x_l, vectors, &at.ln_w, vectors, &at.ln_b, (rows, d), eps)?.0;
            &recomputed_xln
        }
    };
    let mut dxln = alloc::<T>(dev, rows * d)?;
    {
        let (xo, w1o, dho) = (Operand::<T>::new(xln, &Layout::contiguous((rows, d)))?, Operand::<T>::new(w, &at.w1)?, Operand::<T>::new(&dh, &Layout::contiguous((rows, first_out)))?);
        linear_bwd_into(dev, (&xo.view()?, &w1o.view()?, &dho.view()?), (rows, d, first_out), (&mut dxln.slice_mut(..), &mut dw1, &mut db1))?;
    }
    drop(dh);
    // The LayerNorm: dx = grad (the residual's) + its input gradient, in one pass, with d ln_w
    // and d ln_b in place.
    {
        let (xo, lnwo) = (Operand::<T>::new(x, x_l)?, Operand::<T>::new(vectors, &at.ln_w)?);
        layer_norm_bwd_into(dev, (&xo.view()?, &lnwo.view()?, &dxln.slice(..)), stats, Some(&gv), (rows, d), (&mut dx, &mut dln))?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out_dx, dev.clone()), CudaStorage::wrap_cuda_slice(out_params, dev.clone())))
}

// ---- the patch layout (patch_blocks.rs) ----------------------------------------------------

/// `src` (the image layout, or the patches' when `to_image`) copied into the other layout: a
/// warp per patch row (elementwise.cu `patch_rows`).
pub(crate) fn patch_rows<T: Float>(src: &CudaStorage, src_l: &Layout, g: crate::patch_blocks::PatchGrid, to_image: bool) -> Result<CudaStorage> {
    let dev = src.device();
    let so = Operand::<T>::new(src, src_l)?;
    let sv = so.view()?;
    let n = src_l.shape().elem_count();
    let mut out = alloc::<T>(dev, n)?;
    let rows = g.patch_rows();
    let f = func(dev, Module::Elementwise, &format!("patch_rows_{}", T::SUFFIX))?;
    let args = [rows, g.k, g.cols(), g.rows_of_patches(), g.height, g.width, g.chans].map(|v| v as i64);
    let back = to_image as i32;
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(&sv).arg(&mut out);
    for a in &args {
        builder.arg(a);
    }
    builder.arg(&back);
    unsafe { builder.launch(launch_1d(rows * 32, BLOCK, "patch_blocks")?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

// ---- the MAE decoder's entry (restore_tokens.rs) ---------------------------------------------

/// A u32 index tensor on the device as a view of its elements (contiguous only).
fn u32_view<'a>(storage: &'a candle_core::Storage, layout: &Layout, what: &str) -> Result<CudaView<'a, u32>> {
    let (candle_core::Storage::Cuda(s), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
        candle_core::bail!("{what}: the index tensor must be a contiguous tensor on the GPU");
    };
    Ok(s.as_cuda_slice::<u32>()?.slice(start..end))
}

/// `crate::restore_tokens` forward: one launch, a block per output row.
#[allow(clippy::too_many_arguments)]
pub(crate) fn restore_tokens_fwd<T: Float>(
    x: &CudaStorage,
    x_l: &Layout,
    mask_token: &CudaStorage,
    mask_token_l: &Layout,
    pos: &CudaStorage,
    pos_l: &Layout,
    ids: &candle_core::Tensor,
    s: crate::restore_tokens::TokenSizes,
) -> Result<CudaStorage> {
    let dev = x.device();
    let (xo, mo, po) = (Operand::<T>::new(x, x_l)?, Operand::<T>::new(mask_token, mask_token_l)?, Operand::<T>::new(pos, pos_l)?);
    let (xv, mv, pv) = (xo.view()?, mo.view()?, po.view()?);
    let (ids_storage, ids_l) = ids.storage_and_layout();
    let iv = u32_view(&ids_storage, ids_l, "restore_tokens")?;
    let rows = s.images * s.tokens;
    let mut out = alloc::<T>(dev, rows * s.d)?;
    let args = [s.images, s.tokens, s.keep, s.d].map(|v| v as i64);
    let f = func(dev, Module::Rows, &format!("restore_tokens_fwd_{}", T::SUFFIX))?;
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(&xv).arg(&mv).arg(&pv).arg(&iv).arg(&mut out);
    for a in &args {
        builder.arg(a);
    }
    unsafe { builder.launch(launch_per_row(rows)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `crate::restore_tokens` backward: [dx | d mask_token | d pos] from the output's gradient.
pub(crate) fn restore_tokens_bwd<T: Float>(grad: &CudaStorage, grad_l: &Layout, ids: &candle_core::Tensor, s: crate::restore_tokens::TokenSizes) -> Result<CudaStorage> {
    let dev = grad.device();
    let go = Operand::<T>::new(grad, grad_l)?;
    let gv = go.view()?;
    let (ids_storage, ids_l) = ids.storage_and_layout();
    let iv = u32_view(&ids_storage, ids_l, "restore_tokens_backward")?;
    let (rows, nx) = (s.images * s.tokens, s.images * s.keep * s.d);
    let mut out = alloc::<T>(dev, nx + s.d + s.tokens * s.d)?;
    let args = [s.images, s.tokens, s.keep, s.d].map(|v| v as i64);
    let stream = dev.cuda_stream();
    {
        // Zeros first: a dx row no position maps to (ids not a permutation) reads 0, not garbage.
        let mut dx = out.slice_mut(0..nx);
        stream.memset_zeros(&mut dx).w()?;
        let f = func(dev, Module::Rows, &format!("restore_tokens_dx_{}", T::SUFFIX))?;
        let mut builder = stream.launch_builder(&f);
        builder.arg(&gv).arg(&iv).arg(&mut dx);
        for a in &args {
            builder.arg(a);
        }
        unsafe { builder.launch(launch_per_row(rows)) }.w()?;
    }
    let mut partials = alloc::<f32>(dev, s.tokens * s.d)?;
    {
        let mut dpos = out.slice_mut(nx + s.d..nx + s.d + s.tokens * s.d);
        let f = func(dev, Module::Rows, &format!("restore_tokens_columns_{}", T::SUFFIX))?;
        let mut builder = stream.launch_builder(&f);
        builder.arg(&gv).arg(&iv).arg(&mut dpos).arg(&mut partials);
        for a in &args {
            builder.arg(a);
        }
        unsafe { builder.launch(launch_1d(s.tokens * s.d, BLOCK, "restore_tokens_backward")?) }.w()?;
    }
    reduce_partials(dev, Module::Rows, "rows", &partials, &mut out.slice_mut(nx..nx + s.d), (s.tokens, 1, s.d), false)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

// ---- MAE's loss (patch_loss.rs) -------------------------------------------------------------

/// What the loss's forward keeps for its backward: each patch row's (mean, std) of the target,
/// a copy of the mask, and the mask's sum (on the device: the backward reads it there).
pub(crate) struct PatchLossSaved {
    stats: CudaSlice<f32>,
    mask: CudaSlice<f32>,
    mask_sum: CudaSlice<f32>,
}

const OP_PATCH_LOSS: &str = "masked_patch_mse";

/// Threads of the one block that sums the rows' terms (rows.cu `patch_mse_total`).
const PATCH_TOTAL_THREADS: u32 = 1024;

/// The patch geometry as the kernels take it: (tokens, grid_w, patch, chans, height, width).
fn patch_args(p: crate::patch_loss::Patches) -> [i64; 6] {
    [p.tokens, p.grid_w, p.patch, p.channels, p.height, p.width].map(|v| v as i64)
}

/// The loss (an f32 scalar) of `pred` (`T`) against f32 images and mask: a warp per patch row,
/// then one block for the total.
#[allow(clippy::too_many_arguments)]
pub(crate) fn patch_mse_fwd<T: Float>(
    pred: &CudaStorage,
    pred_l: &Layout,
    imgs: &CudaStorage,
    imgs_l: &Layout,
    mask: &CudaStorage,
    mask_l: &Layout,
    p: crate::patch_loss::Patches,
    norm_pix: bool,
) -> Result<(CudaStorage, PatchLossSaved)> {
    let dev = pred.device();
    let (po, io, mo) = (Operand::<T>::new(pred, pred_l)?, Operand::<f32>::new(imgs, imgs_l)?, Operand::<f32>::new(mask, mask_l)?);
    let (pv, iv, mv) = (po.view()?, io.view()?, mo.view()?);
    let rows = p.rows();
    let mut row_loss = alloc::<f32>(dev, rows)?;
    let mut stats = alloc::<f32>(dev, 2 * rows)?;
    let [tokens, grid_w, patch, chans, height, width] = patch_args(p);
    let (r, np) = (rows as i64, norm_pix as i32);
    let stream = dev.cuda_stream();
    {
        let f = func(dev, Module::Rows, &format!("patch_mse_rows_{}", T::SUFFIX))?;
        let mut builder = stream.launch_builder(&f);
        builder.arg(&pv).arg(&iv).arg(&mv).arg(&mut row_loss).arg(&mut stats).arg(&r);
        builder.arg(&tokens).arg(&grid_w).arg(&patch).arg(&chans).arg(&height).arg(&width).arg(&np);
        unsafe { builder.launch(launch_rows(rows, OP_PATCH_LOSS)?) }.w()?;
    }
    let mut loss = alloc::<f32>(dev, 1)?;
    let mut mask_sum = alloc::<f32>(dev, 1)?;
    {
        let f = func(dev, Module::Rows, "patch_mse_total")?;
        let mut builder = stream.launch_builder(&f);
        builder.arg(&row_loss).arg(&mv).arg(&mut loss).arg(&mut mask_sum).arg(&r);
        unsafe { builder.launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (PATCH_TOTAL_THREADS, 1, 1), shared_mem_bytes: 0 }) }.w()?;
    }
    let mut mask_copy = alloc::<f32>(dev, rows)?;
    stream.memcpy_dtod(&mv, &mut mask_copy).w()?;
    Ok((CudaStorage::wrap_cuda_slice(loss, dev.clone()), PatchLossSaved { stats, mask: mask_copy, mask_sum }))
}

/// The gradient of `pred` (`T`, shaped like it) from the loss's f32 gradient `grad` (a scalar on
/// the device) and what the forward saved.
#[allow(clippy::too_many_arguments)]
pub(crate) fn patch_mse_bwd<T: Float>(
    pred: &CudaStorage,
    pred_l: &Layout,
    imgs: &CudaStorage,
    imgs_l: &Layout,
    grad: &CudaStorage,
    grad_l: &Layout,
    saved: &PatchLossSaved,
    p: crate::patch_loss::Patches,
) -> Result<CudaStorage> {
    if grad.dtype() != DType::F32 || grad_l.shape().elem_count() != 1 {
        candle_core::bail!("masked_patch_mse_backward: the loss's gradient must be one f32, got {:?} {:?}", grad.dtype(), grad_l.dims());
    }
    let dev = pred.device();
    let (po, io, go) = (Operand::<T>::new(pred, pred_l)?, Operand::<f32>::new(imgs, imgs_l)?, Operand::<f32>::new(grad, grad_l)?);
    let (pv, iv, gv) = (po.view()?, io.view()?, go.view()?);
    let rows = p.rows();
    let mut out = alloc::<T>(dev, rows * p.len())?;
    let [tokens, grid_w, patch, chans, height, width] = patch_args(p);
    let r = rows as i64;
    // (Without norm-pix the saved statistics are (0, 1): the target is the pixels themselves.)
    let f = func(dev, Module::Rows, &format!("patch_mse_bwd_{}", T::SUFFIX))?;
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(&pv).arg(&iv).arg(&saved.mask).arg(&saved.stats).arg(&saved.mask_sum).arg(&gv).arg(&mut out).arg(&r);
    builder.arg(&tokens).arg(&grid_w).arg(&patch).arg(&chans).arg(&height).arg(&width);
    unsafe { builder.launch(launch_rows(rows, OP_PATCH_LOSS)?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

// ---- LayerNorm ----------------------------------------------------------------------------

/// LayerNorm over rows of `d`: the output and each row's (mean, rstd) as f32 `[rows, 2]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_fwd<T: Float>(
    x: &CudaStorage,
    x_l: &Layout,
    weight: &CudaStorage,
    weight_l: &Layout,
    bias: &CudaStorage,
    bias_l: &Layout,
    (rows, d): (usize, usize),
    eps: f64,
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    let dev = x.device();
    let (xo, wo, bo) = (Operand::<T>::new(x, x_l)?, Operand::<T>::new(weight, weight_l)?, Operand::<T>::new(bias, bias_l)?);
    let (xv, wv, bv) = (xo.view()?, wo.view()?, bo.view()?);
    let mut y = alloc::<T>(dev, rows * d)?;
    let mut stats = alloc::<f32>(dev, rows * 2)?;
    let f = func(dev, Module::Rows, &format!("layer_norm_fwd_{}", T::SUFFIX))?;
    let cfg = launch_rows(rows, "layer_norm")?;
    let (r, dd, e, vec) = (rows as i64, d as i64, eps as f32, vectors_arg());
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(&xv).arg(&wv).arg(&bv).arg(&mut y).arg(&mut stats).arg(&r).arg(&dd).arg(&e).arg(&vec);
    unsafe { builder.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), stats))
}

/// `(x, weight, grad_out)` -> `[rows + 2, d]`: grad_x, then grad_weight and grad_bias, like the
/// CPU `LayerNormGrad`. Uses the forward's row statistics when given, else recomputes them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_bwd<T: Float>(
    x: &CudaStorage,
    x_l: &Layout,
    weight: &CudaStorage,
    weight_l: &Layout,
    grad: &CudaStorage,
    grad_l: &Layout,
    saved_stats: Option<&CudaSlice<f32>>,
    (rows, d): (usize, usize),
    eps: f64,
) -> Result<CudaStorage> {
    let dev = x.device();
    let (xo, wo, go) = (Operand::<T>::new(x, x_l)?, Operand::<T>::new(weight, weight_l)?, Operand::<T>::new(grad, grad_l)?);
    let (xv, wv, gv) = (xo.view()?, wo.view()?, go.view()?);
    let (r, dd) = (rows as i64, d as i64);
    let computed;
    let stats = match saved_stats {
        Some(s) => s,
        None => {
            let mut s = alloc::<f32>(dev, rows * 2)?;
            let f = func(dev, Module::Rows, &format!("layer_norm_stats_{}", T::SUFFIX))?;
            let (e, vec) = (eps as f32, vectors_arg());
            let stream = dev.cuda_stream();
            let mut builder = stream.launch_builder(&f);
            builder.arg(&xv).arg(&mut s).arg(&r).arg(&dd).arg(&e).arg(&vec);
            unsafe { builder.launch(launch_rows(rows, "layer_norm_grad")?) }.w()?;
            computed = s;
            &computed
        }
    };
    let mut out = alloc::<T>(dev, (rows + 2) * d)?;
    let (mut gx, mut dparams) = out.split_at_mut(rows * d);
    layer_norm_bwd_into(dev, (&xv, &wv, &gv), stats, None, (rows, d), (&mut gx, &mut dparams))?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `layer_norm_bwd` into views of the caller's: the input gradient [rows, d] (plus
/// `residual_grad`, [rows, d], where given: a sublayer's input gradient) and the weight and
/// bias gradients side by side [2, d].
fn layer_norm_bwd_into<T: Float>(
    dev: &CudaDevice,
    (x, w, g): (&CudaView<T>, &CudaView<T>, &CudaView<T>),
    stats: &CudaSlice<f32>,
    residual_grad: Option<&CudaView<T>>,
    (rows, d): (usize, usize),
    (gx, dparams): (&mut CudaViewMut<T>, &mut CudaViewMut<T>),
) -> Result<()> {
    let (r, dd, vec) = (rows as i64, d as i64, vectors_arg());
    let stream = dev.cuda_stream();
    {
        let name = if residual_grad.is_some() { "layer_norm_bwd_input_add" } else { "layer_norm_bwd_input" };
        let f = func(dev, Module::Rows, &format!("{name}_{}", T::SUFFIX))?;
        let mut builder = stream.launch_builder(&f);
        builder.arg(x).arg(w).arg(g).arg(stats);
        if let Some(rg) = residual_grad {
            builder.arg(rg);
        }
        builder.arg(gx).arg(&r).arg(&dd).arg(&vec);
        unsafe { builder.launch(launch_rows(rows, "layer_norm_grad")?) }.w()?;
    }
    let (per_part, parts) = split(rows);
    let mut partials = alloc::<f32>(dev, parts * 2 * d)?;
    {
        let f = func(dev, Module::Rows, &format!("layer_norm_param_partials_{}", T::SUFFIX))?;
        // 8 bytes of columns a thread where the width and the addresses allow (rows.cu
        // `PARAM_PACK`), else one column.
        let lanes = 8 / std::mem::size_of::<T>();
        let packed = vector_kernels() && d % lanes == 0 && aligned(dev, x, 8) && aligned(dev, g, 8);
        let threads = if packed { parts * d / lanes } else { parts * d };
        let (pp, np, pk) = (per_part as i64, parts as i64, packed as i32);
        let mut builder = stream.launch_builder(&f);
        builder.arg(x).arg(g).arg(stats).arg(&mut partials).arg(&r).arg(&dd).arg(&pp).arg(&np).arg(&pk);
        unsafe { builder.launch(launch_1d(threads, BLOCK, "layer_norm_grad")?) }.w()?;
    }
    reduce_partials(dev, Module::Rows, "rows", &partials, dparams, (parts, 2, d), false)
}

// ---- softmax ------------------------------------------------------------------------------

pub(crate) fn softmax_fwd<T: Float>(x: &CudaStorage, x_l: &Layout, (rows, d): (usize, usize)) -> Result<CudaStorage> {
    let dev = x.device();
    let xo = Operand::<T>::new(x, x_l)?;
    let xv = xo.view()?;
    let mut y = alloc::<T>(dev, rows * d)?;
    let f = func(dev, Module::Rows, &format!("softmax_fwd_{}", T::SUFFIX))?;
    let (r, dd) = (rows as i64, d as i64);
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(&xv).arg(&mut y).arg(&r).arg(&dd);
    unsafe { builder.launch(launch_rows(rows, "softmax_last_dim")?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

pub(crate) fn softmax_bwd<T: Float>(
    y: &CudaStorage,
    y_l: &Layout,
    grad: &CudaStorage,
    grad_l: &Layout,
    (rows, d): (usize, usize),
) -> Result<CudaStorage> {
    let dev = y.device();
    let (yo, go) = (Operand::<T>::new(y, y_l)?, Operand::<T>::new(grad, grad_l)?);
    let (yv, gv) = (yo.view()?, go.view()?);
    let mut gx = alloc::<T>(dev, rows * d)?;
    let f = func(dev, Module::Rows, &format!("softmax_bwd_{}", T::SUFFIX))?;
    let (r, dd) = (rows as i64, d as i64);
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(&yv).arg(&gv).arg(&mut gx).arg(&r).arg(&dd);
    unsafe { builder.launch(launch_rows(rows, "softmax_last_dim_grad")?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(gx, dev.clone()))
}

// ---- GELU ---------------------------------------------------------------------------------

/// uint8 RGB pixels (`range` of `pixels`, channels last) to normalized f32 (normalize.rs).
pub(crate) fn normalize_rgb(pixels: &CudaStorage, range: std::ops::Range<usize>, mean: [f32; 3], std: [f32; 3]) -> Result<CudaStorage> {
    let dev = pixels.device();
    let n = range.len();
    if n == 0 {
        candle_core::bail!("normalize_rgb: no pixels");
    }
    let px = pixels.as_cuda_slice::<u8>()?.slice(range);
    let mut out = alloc::<f32>(dev, n)?;
    let f = func(dev, Module::Elementwise, "normalize_rgb_u8")?;
    let nn = n as i64;
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(&px).arg(&mut out).arg(&nn);
    for c in mean.iter().chain(&std) {
        builder.arg(c);
    }
    unsafe { builder.launch(launch_grid_stride(n)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

pub(crate) fn gelu_fwd<T: Float>(x: &CudaStorage, x_l: &Layout) -> Result<CudaStorage> {
    let dev = x.device();
    let n = x_l.shape().elem_count();
    let xo = Operand::<T>::new(x, x_l)?;
    let xv = xo.view()?;
    let mut y = alloc::<T>(dev, n)?;
    let f = func(dev, Module::Elementwise, &format!("gelu_erf_fwd_{}", T::SUFFIX))?;
    let (nn, vec) = (n as i64, vectors_arg());
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(&xv).arg(&mut y).arg(&nn).arg(&vec);
    unsafe { builder.launch(launch_packed::<T>(n)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

pub(crate) fn gelu_bwd<T: Float>(x: &CudaStorage, x_l: &Layout, grad: &CudaStorage, grad_l: &Layout) -> Result<CudaStorage> {
    let dev = x.device();
    let n = x_l.shape().elem_count();
    let (xo, go) = (Operand::<T>::new(x, x_l)?, Operand::<T>::new(grad, grad_l)?);
    let (xv, gv) = (xo.view()?, go.view()?);
    let mut gx = alloc::<T>(dev, n)?;
    let f = func(dev, Module::Elementwise, &format!("gelu_erf_bwd_{}", T::SUFFIX))?;
    let (nn, vec) = (n as i64, vectors_arg());
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(&xv).arg(&gv).arg(&mut gx).arg(&nn).arg(&vec);
    unsafe { builder.launch(launch_packed::<T>(n)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(gx, dev.clone()))
}

// ---- AdamW --------------------------------------------------------------------------------

/// One fused AdamW step: `param` (written through `&mut`), `exp_avg` and `exp_avg_sq`
/// (written by the kernel through their device pointers; see `adamw.rs` for why they come as
/// shared references) all contiguous, `grad` any layout. With `shadow` (mixed precision: f32
/// `param`, the bf16 compute copy, contiguous, written through its device pointer too) the
/// gradient may be bf16 or f32 and the copy gets the new weights.
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw<T: Float>(
    param: &mut CudaStorage,
    param_l: &Layout,
    exp_avg: &CudaStorage,
    exp_avg_l: &Layout,
    exp_avg_sq: &CudaStorage,
    exp_avg_sq_l: &Layout,
    grad: &CudaStorage,
    grad_l: &Layout,
    shadow: Option<(&CudaStorage, &Layout)>,
    u: &AdamWUpdate,
) -> Result<()> {
    let n = param_l.shape().elem_count();
    let range = |l: &Layout, what: &str| match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => Err(candle_core::Error::Msg(format!("adamw: the {what} must be contiguous")).bt()),
    };
    let (pr, mr, vr) = (range(param_l, "parameter")?, range(exp_avg_l, "first moment")?, range(exp_avg_sq_l, "second moment")?);
    let dev = param.device().clone();
    let m = exp_avg.as_cuda_slice::<T>()?.slice(mr);
    let v = exp_avg_sq.as_cuda_slice::<T>()?.slice(vr);
    let mut p = param.as_cuda_slice_mut::<T>()?.slice_mut(pr);
    // The step's constants in f64, rounded once to f32 (the CPU kernel's T::from_f64).
    let t = u.step as i32;
    let consts = [
        u.beta1 as f32,
        (1.0 - u.beta1) as f32,
        u.beta2 as f32,
        (1.0 - u.beta2) as f32,
        (1.0 - u.lr * u.weight_decay) as f32,
        (u.lr / (1.0 - u.beta1.powi(t))) as f32,
        (1.0 - u.beta2.powi(t)).sqrt() as f32,
        u.eps as f32,
    ];
    let nn = n as i64;
    let stream = dev.cuda_stream();
    match shadow {
        None => {
            let go = Operand::<T>::new(grad, grad_l)?;
            let gv = go.view()?;
            let f = func(&dev, Module::Elementwise, &format!("adamw_{}", T::SUFFIX))?;
            let mut builder = stream.launch_builder(&f);
            builder.arg(&mut p).arg(&m).arg(&v).arg(&gv).arg(&nn);
            for c in &consts {
                builder.arg(c);
            }
            unsafe { builder.launch(launch_grid_stride(n)) }.w()?;
        }
        Some((shadow, shadow_l)) => {
            if T::SUFFIX != "f32" || shadow.dtype() != DType::BF16 {
                candle_core::bail!("adamw: a compute copy needs f32 weights and a bf16 copy, got {} and {:?}", T::SUFFIX, shadow.dtype());
            }
            let sv = shadow.as_cuda_slice::<half::bf16>()?.slice(range(shadow_l, "compute copy")?);
            if sv.len() != n {
                candle_core::bail!("adamw: the compute copy has {} elements, the parameter {n}", sv.len());
            }
            // One kernel per gradient dtype; both operands' views live to the launch.
            macro_rules! run {
                ($g:ty, $gname:literal) => {{
                    let go = Operand::<$g>::new(grad, grad_l)?;
                    let gv = go.view()?;
                    let f = func(&dev, Module::Elementwise, concat!("adamw_shadow_f32_g", $gname))?;
                    let mut builder = stream.launch_builder(&f);
                    builder.arg(&mut p).arg(&m).arg(&v).arg(&gv).arg(&sv).arg(&nn);
                    for c in &consts {
                        builder.arg(c);
                    }
                    unsafe { builder.launch(launch_grid_stride(n)) }.w()?;
                }};
            }
            match grad.dtype() {
                DType::BF16 => run!(half::bf16, "bf16"),
                DType::F32 => run!(f32, "f32"),
                other => candle_core::bail!("adamw: a gradient of dtype {other:?} for f32 weights with a bf16 compute copy (bf16 or f32 expected)"),
            }
        }
    }
    Ok(())
}

// ---- multi-tensor AdamW (cuda/elementwise.cu adamw_many) -------------------------------------

/// cuda/elementwise.cu `AdamWTensor`, byte for byte (64 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamWTensorRow {
    p: u64,
    m: u64,
    v: u64,
    g: u64,
    copy: u64,
    n: i64,
    decay: f32,
    step_size: f32,
    g_half: i32,
    /// p, m and v 16-byte aligned, g and copy aligned to 4 of their elements: the kernel then
    /// moves 4 elements of each a thread.
    vec4: i32,
}

/// cuda/elementwise.cu `AdamWChunk` (24 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamWChunkRow {
    tensor: i32,
    unused: i32,
    start: i64,
    len: i64,
}

const _: () = assert!(std::mem::size_of::<AdamWTensorRow>() == 64 && std::mem::size_of::<AdamWChunkRow>() == 24);

/// Elements a block updates per chunk: big tensors split across blocks, small ones one chunk.
const ADAMW_CHUNK: usize = 1 << 16;

/// The device address of `t`'s first element when it is a contiguous `dtype` tensor on CUDA
/// device `dev`, else None.
fn device_address(t: &candle_core::Tensor, dtype: DType, dev: &CudaDevice) -> Result<Option<u64>> {
    if t.dtype() != dtype || !t.device().same_device(&candle_core::Device::Cuda(dev.clone())) {
        return Ok(None);
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else { return Ok(None) };
    let Some((start, _)) = layout.contiguous_offsets() else { return Ok(None) };
    let stream = dev.cuda_stream();
    let base = match dtype {
        DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::BF16 => s.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        _ => return Ok(None),
    };
    Ok(Some(base + (start * dtype.size_in_bytes()) as u64))
}

/// `crate::adamw_update_many` on CUDA: the tables of tensors and chunks uploaded, one launch.
/// The kernel writes the weights, moments and copies through their addresses, as the
/// one-tensor kernel writes the moments and copy (adamw.rs `Fused` says why that is sound).
pub(crate) fn adamw_many_tensors(items: &[crate::AdamWItem], guard: Option<&candle_core::Tensor>) -> Result<bool> {
    let Some(first) = items.first() else { return Ok(true) };
    let candle_core::Device::Cuda(dev) = first.param.device() else { return Ok(false) };
    if !crate::has_kernel(first.param) {
        return Ok(false);
    }
    // The loss as one f32 on this device, or no update of ours (the caller then decides).
    let guard = match guard {
        None => 0,
        Some(g) if g.elem_count() == 1 => match device_address(g, DType::F32, dev)? {
            Some(a) => a,
            None => return Ok(false),
        },
        Some(_) => return Ok(false),
    };
    let u0 = first.u;
    let mut tensors = Vec::with_capacity(items.len());
    let mut chunks = Vec::new();
    for (k, item) in items.iter().enumerate() {
        let u = item.u;
        let n = item.param.elem_count();
        let same_constants = (u.beta1, u.beta2, u.eps, u.step) == (u0.beta1, u0.beta2, u0.eps, u0.step);
        let shapes_agree = [item.exp_avg, item.exp_avg_sq, item.grad].iter().all(|t| t.elem_count() == n) && item.copy.as_ref().is_none_or(|c| c.elem_count() == n);
        if !same_constants || !shapes_agree || n == 0 {
            return Ok(false);
        }
        let f32_at = |t: &candle_core::Tensor| device_address(t, DType::F32, dev);
        let (Some(p), Some(m), Some(v)) = (f32_at(item.param)?, f32_at(item.exp_avg)?, f32_at(item.exp_avg_sq)?) else { return Ok(false) };
        let (g, g_half) = match item.grad.dtype() {
            DType::BF16 => (device_address(item.grad, DType::BF16, dev)?, 1),
            _ => (f32_at(item.grad)?, 0),
        };
        let Some(g) = g else { return Ok(false) };
        let copy = match &item.copy {
            None => 0,
            Some(c) => match device_address(c, DType::BF16, dev)? {
                Some(a) => a,
                None => return Ok(false),
            },
        };
        let t = u.step as i32;
        let g_bytes = if g_half == 1 { 2 } else { 4 };
        let vec4 = vector_kernels() && [p, m, v].iter().all(|a| a % 16 == 0) && g % (4 * g_bytes) == 0 && copy % 8 == 0;
        tensors.push(AdamWTensorRow {
            p,
            m,
            v,
            g,
            copy,
            n: n as i64,
            decay: (1.0 - u.lr * u.weight_decay) as f32,
            step_size: (u.lr / (1.0 - u.beta1.powi(t))) as f32,
            g_half,
            vec4: vec4 as i32,
        });
        for start in (0..n).step_by(ADAMW_CHUNK) {
            chunks.push(AdamWChunkRow { tensor: k as i32, unused: 0, start: start as i64, len: ADAMW_CHUNK.min(n - start) as i64 });
        }
    }
    if items.len() > i32::MAX as usize {
        return Ok(false);
    }
    // SAFETY: plain-old-data rows (repr(C), no padding: the asserts above), viewed as bytes.
    let bytes = |ptr: *const u8, len: usize| unsafe { std::slice::from_raw_parts(ptr, len) };
    let tensor_bytes = crate::transfer::staged_htod(dev, bytes(tensors.as_ptr().cast(), tensors.len() * std::mem::size_of::<AdamWTensorRow>()))?;
    let chunk_bytes = crate::transfer::staged_htod(dev, bytes(chunks.as_ptr().cast(), chunks.len() * std::mem::size_of::<AdamWChunkRow>()))?;
    let t = u0.step as i32;
    let consts = [u0.beta1 as f32, (1.0 - u0.beta1) as f32, u0.beta2 as f32, (1.0 - u0.beta2) as f32, (1.0 - u0.beta2.powi(t)).sqrt() as f32, u0.eps as f32];
    let n_chunks = chunks.len() as i64;
    let f = func(dev, Module::Elementwise, "adamw_many_f32")?;
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&f);
    builder.arg(&tensor_bytes).arg(&chunk_bytes).arg(&n_chunks).arg(&guard);
    for c in &consts {
        builder.arg(c);
    }
    let cfg = LaunchConfig { grid_dim: (chunks.len().min(1024) as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    unsafe { builder.launch(cfg) }.w()?;
    Ok(true)
}

// ---- ROIAlign (roi_align.rs, cuda/roi_align.cu) ----------------------------------------------

/// The storage types of the ROIAlign kernels: the CPU op's, f32 and f64.
pub(crate) trait RoiFloat: Stored {
    const SUFFIX: &'static str;
}
impl RoiFloat for f32 {
    const SUFFIX: &'static str = "f32";
}
impl RoiFloat for f64 {
    const SUFFIX: &'static str = "f64";
}

/// cuda/roi_align.cu `RoiRegion`, byte for byte (64 bytes): one box resolved against the map
/// on the host (roi_align.rs `Region`), sample iy of bin row ph at
/// `y_start + ph * bin_h + (iy + 0.5) * bin_h / grid_h` (x likewise).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct RoiRegionRow {
    pub y_start: f64,
    pub x_start: f64,
    pub bin_h: f64,
    pub bin_w: f64,
    /// The bins' divisor, max(grid_h * grid_w, 1).
    pub count: f64,
    pub image: i64,
    pub grid_h: i64,
    pub grid_w: i64,
}

const _: () = assert!(std::mem::size_of::<RoiRegionRow>() == 64);

/// ROIAlign `[B, H, W, C]` -> `[R, P, P, C]` over `regions` (`dims`: B, H, W, C, P), or with
/// `backward` its adjoint `[R, P, P, C]` -> `[B, H, W, C]` (the map's gradient: zeroed, then
/// every bin's samples add into it, cuda/roi_align.cu). A thread per bin element, channels
/// fastest; the regions uploaded per call (R x 64 bytes).
pub(crate) fn roi_align<T: RoiFloat>(
    src: &CudaStorage,
    src_l: &Layout,
    regions: &[RoiRegionRow],
    (images, h, w, c, p): (usize, usize, usize, usize, usize),
    backward: bool,
) -> Result<CudaStorage> {
    let what = if backward { "roi_align_backward" } else { "roi_align" };
    let dev = src.device();
    let x = Operand::<T>::new(src, src_l)?;
    let xv = x.view()?;
    let (bins, map) = (regions.len() * p * p * c, images * h * w * c);
    let n_out = if backward { map } else { bins };
    // At least one element: no boxes (or no channels) is an empty result, and a zero-byte
    // allocation is not one the driver promises to make.
    let mut out = alloc::<T>(dev, n_out.max(1))?;
    let stream = dev.cuda_stream();
    if backward {
        stream.memset_zeros(&mut out).w()?;
    }
    if bins > 0 {
        // SAFETY: plain-old-data rows (repr(C), no padding: the assert above), viewed as bytes.
        let bytes = unsafe { std::slice::from_raw_parts(regions.as_ptr().cast::<u8>(), std::mem::size_of_val(regions)) };
        let rows = crate::transfer::staged_htod(dev, bytes)?;
        let f = func(dev, Module::RoiAlign, &format!("{}_{}", if backward { "roi_align_bwd" } else { "roi_align_fwd" }, T::SUFFIX))?;
        let cfg = launch_1d(bins, BLOCK, what)?;
        let args = [regions.len(), h, w, c, p].map(|v| v as i64);
        let mut builder = stream.launch_builder(&f);
        builder.arg(&xv).arg(&rows).arg(&mut out);
        for a in &args {
            builder.arg(a);
        }
        unsafe { builder.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
