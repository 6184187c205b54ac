//! A linear layer's bias inside its gemm, by cuBLASLt's epilogues: the forward's bias (and
//! residual) added to the product before its one rounding (`EPILOGUE_BIAS`, the C operand
//! holding the residual), and the backward's bias gradient, the column sums of the output
//! gradient, taken while the weight-gradient gemm reads it (`EPILOGUE_BGRADB`).
//!
//! Without them (cuda.rs `linear_fwd` / `linear_bwd_into`) a linear layer costs a row kernel
//! that broadcasts the bias (and adds the residual) into the output before a gemm that reads
//! it back, and a column-sum kernel pair that reads the gradient once more. In run 7's trace
//! (benches/results/gpu-2026-11-26-run7-ncu-raw.csv.gz) those kernels took 2.7 ms of a 37.3 ms
//! step (rows_broadcast 0.92, rows_add_broadcast 0.62, column_sum_partials 1.13) over 208 of
//! its 1395 launches; not all of them are linear layers', and what the epilogues cost inside
//! the gemms no GPU has measured yet. PyTorch's own `nn.Linear` takes the forward's epilogue.
//!
//! Every call is planned once per shape, dtype, epilogue and operand alignment (the layouts,
//! the descriptor and the algorithm cuBLASLt's heuristic picks), per thread and device, as
//! the kernels are (a model's worker owns its stream). Where cuBLASLt offers no algorithm, or
//! a call fails before running, the plan is remembered as unusable, named once on stderr, and
//! the caller takes its plain path: the answer is the same up to rounding either way.
//! `CONVMAE_GEMM_EPILOGUE=off` (or `with_gemm_epilogue(false, ..)`) always takes the plain path.
//!
//! cuBLASLt is column-major; a row-major [r, c] matrix is its transpose, [c, r] column-major
//! with leading dimension c. So y = x W^T + b ([rows, out]) is asked as
//! y^T (out x rows) = W (W's buffer read transposed) x^T (x's buffer as stored), the bias
//! broadcast along y^T's columns; and dW = g^T x ([out, in]) as dW^T (in x out) =
//! x^T (as stored) g (g's buffer read transposed), whose `BGRADB` sums op(B) = g over the
//! reduction dimension (the rows): db.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::Result;

use crate::cuda::Float;

/// What the gemm's epilogue adds to the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Epilogue {
    /// D = A B + bias (+ C, the residual, where given).
    Bias,
    /// D = A B, and bias = the sums of op(B) over the reduction dimension.
    BiasGradient,
}

/// Everything a plan depends on. Alignments are each pointer's, in bytes, capped at 256 (the
/// heuristic's default assumption, which an offset view into a packed buffer may not meet).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    dtype: &'static str,
    /// (m, n, k) of D = op(A) op(B), column-major.
    mnk: (u64, u64, u64),
    trans_a: bool,
    trans_b: bool,
    epilogue: Epilogue,
    with_c: bool,
    align: [u32; 4],
}

/// Owns a cuBLASLt object and destroys it with its own destroy function.
struct Owned<H: Copy> {
    handle: H,
    destroy: unsafe fn(H) -> std::result::Result<(), lt::CublasError>,
}

impl<H: Copy> Drop for Owned<H> {
    fn drop(&mut self) {
        // A failure here (the context already gone at exit) leaves nothing to clean up.
        let _ = unsafe { (self.destroy)(self.handle) };
    }
}

/// One planned gemm: its descriptor (the bias pointer is set per call), the four layouts and
/// the algorithm.
struct Plan {
    desc: Owned<sys::cublasLtMatmulDesc_t>,
    a: Owned<sys::cublasLtMatrixLayout_t>,
    b: Owned<sys::cublasLtMatrixLayout_t>,
    c: Owned<sys::cublasLtMatrixLayout_t>,
    d: Owned<sys::cublasLtMatrixLayout_t>,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// A device's cuBLASLt handle, its workspace and its plans (None: cuBLASLt cannot do it).
struct State {
    handle: Owned<sys::cublasLtHandle_t>,
    workspace: CudaSlice<u8>,
    plans: HashMap<Key, Option<Plan>>,
}

/// cuBLASLt's recommendation for Hopper (4 MiB serves older GPUs).
const WORKSPACE_BYTES: usize = 32 << 20;

thread_local! {
    /// Per device: its cuBLASLt state, or None where it could not be set up (named once on
    /// stderr; every linear layer there takes the plain path).
    static STATES: RefCell<HashMap<DeviceId, Option<State>>> = RefCell::new(HashMap::new());
}

/// A new state for `dev`: the handle and the workspace.
fn new_state(dev: &CudaDevice) -> Result<State> {
    let handle = Owned { handle: lt::create_handle().map_err(|e| lt_error("gemm epilogues", e))?, destroy: lt::destroy_handle };
    // SAFETY: the workspace is scratch cuBLASLt writes before it reads.
    let workspace = unsafe { dev.alloc::<u8>(WORKSPACE_BYTES) }?;
    Ok(State { handle, workspace, plans: HashMap::new() })
}

fn lt_error(what: &str, e: lt::CublasError) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what}: cuBLASLt: {e:?}"))
}

/// The largest power of two dividing `ptr`, capped at 256.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

/// The stored (not transposed) rows and columns of an operand that enters the product as
/// `rows x cols` after its op.
fn stored(rows: u64, cols: u64, trans: bool) -> (u64, u64) {
    if trans {
        (cols, rows)
    } else {
        (rows, cols)
    }
}

fn layout<T: Float>((rows, cols): (u64, u64)) -> std::result::Result<Owned<sys::cublasLtMatrixLayout_t>, lt::CublasError> {
    // Column-major and densely packed: the leading dimension is the stored row count.
    let handle = lt::create_matrix_layout(T::LT_TYPE, rows, cols, rows as i64)?;
    Ok(Owned { handle, destroy: lt::destroy_matrix_layout })
}

/// Sets a descriptor attribute from a plain value.
unsafe fn set_desc<V>(desc: sys::cublasLtMatmulDesc_t, attr: sys::cublasLtMatmulDescAttributes_t, value: &V) -> std::result::Result<(), lt::CublasError> {
    lt::set_matmul_desc_attribute(desc, attr, value as *const V as *const _, std::mem::size_of::<V>())
}

unsafe fn set_pref<V>(pref: sys::cublasLtMatmulPreference_t, attr: sys::cublasLtMatmulPreferenceAttributes_t, value: &V) -> std::result::Result<(), lt::CublasError> {
    lt::set_matmul_pref_attribute(pref, attr, value as *const V as *const _, std::mem::size_of::<V>())
}

/// Builds the plan of `key` (an error: cuBLASLt has no algorithm for it).
fn make_plan<T: Float>(handle: sys::cublasLtHandle_t, key: &Key) -> std::result::Result<Plan, lt::CublasError> {
    use sys::cublasLtMatmulDescAttributes_t as D;
    use sys::cublasLtMatmulPreferenceAttributes_t as P;
    let (m, n, k) = key.mnk;
    let desc = Owned { handle: lt::create_matmul_desc(T::lt_compute_type(), sys::cudaDataType_t::CUDA_R_32F)?, destroy: lt::destroy_matmul_desc };
    // cublasOperation_t (cuBLAS's own bindings hold the enum): CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
    let op = |t: bool| -> i32 { t as i32 };
    let epilogue = match key.epilogue {
        Epilogue::Bias => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
        Epilogue::BiasGradient => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB,
    };
    // SAFETY: each attribute gets a value of the type cuBLASLt documents for it (the two
    // operations and the epilogue are 32-bit enums).
    unsafe {
        set_desc(desc.handle, D::CUBLASLT_MATMUL_DESC_TRANSA, &op(key.trans_a))?;
        set_desc(desc.handle, D::CUBLASLT_MATMUL_DESC_TRANSB, &op(key.trans_b))?;
        set_desc(desc.handle, D::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
    }
    let a = layout::<T>(stored(m, k, key.trans_a))?;
    let b = layout::<T>(stored(k, n, key.trans_b))?;
    let c = layout::<T>((m, n))?;
    let d = layout::<T>((m, n))?;
    let pref = Owned { handle: lt::create_matmul_pref()?, destroy: lt::destroy_matmul_pref };
    // SAFETY: as above; the workspace size is a size_t, the alignments uint32_t.
    unsafe {
        set_pref(pref.handle, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &WORKSPACE_BYTES)?;
        let [aa, ab, ac, ad] = key.align;
        set_pref(pref.handle, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa)?;
        set_pref(pref.handle, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab)?;
        set_pref(pref.handle, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ac)?;
        set_pref(pref.handle, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ad)?;
    }
    // SAFETY: every object passed was created above and is alive.
    let heuristic = unsafe { lt::get_matmul_algo_heuristic(handle, desc.handle, a.handle, b.handle, c.handle, d.handle, pref.handle)? };
    Ok(Plan { desc, a, b, c, d, algo: heuristic.algo })
}

/// The operands of one epilogue gemm, column-major: D (m x n) = op(A) op(B) (+ C) with the
/// epilogue's bias (read, or written for `BiasGradient`).
struct Call<'a, T: Float> {
    what: &'a str,
    mnk: (usize, usize, usize),
    a: (&'a CudaView<'a, T>, bool),
    b: (&'a CudaView<'a, T>, bool),
    c: Option<&'a CudaView<'a, T>>,
    epilogue: Epilogue,
}

/// Runs `call` writing `d` and reading or writing `bias`; Ok(false) where cuBLASLt cannot (the
/// caller then takes its plain path, nothing having been written).
fn run<T: Float>(dev: &CudaDevice, call: Call<'_, T>, d: &mut CudaViewMut<'_, T>, bias: u64) -> Result<bool> {
    let (m, n, k) = call.mnk;
    let stream = dev.cuda_stream();
    let (a_ptr, _a) = call.a.0.device_ptr(&stream);
    let (b_ptr, _b) = call.b.0.device_ptr(&stream);
    let c_guarded = call.c.map(|c| c.device_ptr(&stream));
    let (d_ptr, _d) = d.device_ptr_mut(&stream);
    let c_ptr = c_guarded.as_ref().map_or(d_ptr, |(p, _)| *p);
    // The bias is read (or written) as whole vectors; one not 16-byte aligned takes the plain path.
    if !bias.is_multiple_of(16) {
        return Ok(false);
    }
    let key = Key {
        dtype: T::SUFFIX,
        mnk: (m as u64, n as u64, k as u64),
        trans_a: call.a.1,
        trans_b: call.b.1,
        epilogue: call.epilogue,
        with_c: call.c.is_some(),
        align: [alignment(a_ptr), alignment(b_ptr), alignment(c_ptr), alignment(d_ptr)],
    };
    STATES.with(|states| -> Result<bool> {
        let mut states = states.borrow_mut();
        let state = states.entry(dev.id()).or_insert_with(|| match new_state(dev) {
            Ok(state) => Some(state),
            Err(e) => {
                eprintln!("convmae: cuBLASLt could not be set up ({e}); every linear layer's bias runs as its own kernels");
                None
            }
        });
        let Some(state) = state else { return Ok(false) };
        let handle = state.handle.handle;
        let plan = state.plans.entry(key).or_insert_with(|| match make_plan::<T>(handle, &key) {
            Ok(plan) => Some(plan),
            Err(e) => {
                eprintln!("convmae: {}: cuBLASLt has no {:?} epilogue gemm for {key:?} ({e:?}); the bias runs as its own kernels there", call.what, call.epilogue);
                None
            }
        });
        let Some(p) = plan else { return Ok(false) };
        let (alpha, beta) = (1f32, if call.c.is_some() { 1f32 } else { 0f32 });
        let (w_ptr, _w) = state.workspace.device_ptr(&stream);
        // SAFETY: the plan was made for these shapes, dtypes and alignments; the bias pointer
        // attribute is the device address of a vector of m (Bias) or n (BiasGradient) elements
        // of T, which the callers' shape checks guarantee.
        let status = unsafe {
            set_desc(p.desc.handle, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias).and_then(|()| {
                lt::matmul(
                    handle,
                    p.desc.handle,
                    &alpha as *const f32 as *const _,
                    &beta as *const f32 as *const _,
                    a_ptr as *const _,
                    p.a.handle,
                    b_ptr as *const _,
                    p.b.handle,
                    c_ptr as *const _,
                    p.c.handle,
                    d_ptr as *mut _,
                    p.d.handle,
                    &p.algo,
                    w_ptr as *mut _,
                    WORKSPACE_BYTES,
                    stream.cu_stream() as sys::cudaStream_t,
                )
            })
        };
        match status {
            Ok(()) => Ok(true),
            Err(e) => {
                eprintln!("convmae: {}: cuBLASLt's {:?} epilogue gemm for {key:?} failed ({e:?}); the bias runs as its own kernels there", call.what, call.epilogue);
                *plan = None;
                Ok(false)
            }
        }
    })
}

/// y = x W^T + b (+ residual) in one cuBLASLt gemm, all row-major and densely packed: x [rows,
/// in], w [out, in], b [out], residual and y [rows, out]. Ok(false): not done (see the module).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_fwd<T: Float>(
    dev: &CudaDevice,
    x: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    residual: Option<&CudaView<'_, T>>,
    (rows, inp, out): (usize, usize, usize),
    y: &mut CudaViewMut<'_, T>,
) -> Result<bool> {
    if !crate::linear::gemm_epilogue_on() {
        return Ok(false);
    }
    check_lengths("linear", &[(x.len(), rows * inp), (w.len(), out * inp), (b.len(), out), (y.len(), rows * out)])?;
    if let Some(r) = residual {
        check_lengths("linear", &[(r.len(), rows * out)])?;
    }
    let stream = dev.cuda_stream();
    let (bias, _b) = b.device_ptr(&stream);
    // y^T (out x rows) = W (w's buffer, stored in x out, transposed) x^T (x's buffer, in x rows).
    let call = Call { what: "linear", mnk: (out, rows, inp), a: (w, true), b: (x, false), c: residual, epilogue: Epilogue::Bias };
    run(dev, call, y, bias)
}

/// dW = g^T x and db = g's column sums in one cuBLASLt gemm: x [rows, in], g [rows, out], dW
/// [out, in], db [out]. Ok(false): not done (see the module).
pub(crate) fn weight_and_bias_grads<T: Float>(
    dev: &CudaDevice,
    x: &CudaView<'_, T>,
    g: &CudaView<'_, T>,
    (rows, inp, out): (usize, usize, usize),
    dw: &mut CudaViewMut<'_, T>,
    db: &mut CudaViewMut<'_, T>,
) -> Result<bool> {
    if !crate::linear::gemm_epilogue_on() {
        return Ok(false);
    }
    check_lengths("linear_backward", &[(x.len(), rows * inp), (g.len(), rows * out), (dw.len(), out * inp), (db.len(), out)])?;
    let stream = dev.cuda_stream();
    let (bias, _db) = db.device_ptr_mut(&stream);
    // dW^T (in x out) = x^T (x's buffer, in x rows) g (g's buffer, stored out x rows, transposed).
    let call = Call { what: "linear_backward", mnk: (inp, out, rows), a: (x, false), b: (g, true), c: None, epilogue: Epilogue::BiasGradient };
    run(dev, call, dw, bias)
}

fn check_lengths(what: &str, pairs: &[(usize, usize)]) -> Result<()> {
    for &(have, want) in pairs {
        if have != want {
            candle_core::bail!("{what}: an operand of {have} elements where the gemm needs {want}");
        }
    }
    Ok(())
}
