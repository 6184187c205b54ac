//! Where a model runs: parsing the user's device string, and the one-time CUDA setup the
//! model's worker thread does when it opens a GPU.

use candle_core::Device;
use convmae_kernels::env_switch;

/// A parsed device request: the CPU, or CUDA device `ordinal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

/// Whether this build has the CUDA backend (`npm run build:cuda`).
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

impl DeviceSpec {
    /// "cpu", "cuda" (device 0) or "cuda:N". A CUDA request fails here, with what to do, when
    /// this build has no CUDA backend.
    pub fn parse(s: &str) -> Result<Self, String> {
        let spec = match s {
            "cpu" => Self::Cpu,
            "cuda" => Self::Cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Self::Cuda(n),
                _ => return Err(format!("device must be 'cpu', 'cuda' or 'cuda:N', got '{s}'")),
            },
        };
        if matches!(spec, Self::Cuda(_)) && !CUDA_BUILD {
            return Err(format!(
                "device '{s}': this build of convmae has no CUDA backend; build the CUDA addon with `npm run build:cuda` \
                 and load it with CONVMAE_NATIVE=./convmae.linux-x64-gnu.cuda.node"
            ));
        }
        Ok(spec)
    }

    /// Opens the device. Call it on the thread that will own the model: a CUDA device gets its
    /// own stream (so work from this thread is ordered on it), TF32 for f32 matmuls, a memory
    /// pool that keeps freed memory instead of returning it to the driver at every
    /// synchronization, and no per-buffer event tracking (one stream needs none).
    pub fn open(self) -> Result<Device, String> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => {
                let device = Device::new_cuda_with_stream(ordinal)
                    .map_err(|e| format!("cannot open CUDA device {ordinal}: {e} (is a GPU present, with driver 580 or newer?)"))?;
                configure_cuda(&device)?;
                Ok(device)
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn configure_cuda(device: &Device) -> Result<(), String> {
    use candle_core::cuda::cudarc::driver::sys;
    // cuBLAS may use TF32 tensor cores for f32 matmuls (PyTorch's allow_tf32 for matmul),
    // unless CONVMAE_TF32=off asks for full f32 (the GPU check's CPU-against-CUDA probes of the
    // task models; a user who wants f32 matmuls to the last bits).
    candle_core::cuda::set_gemm_reduced_precision_f32(!tf32_off());
    let Device::Cuda(cuda) = device else { return Ok(()) };
    let stream = cuda.cuda_stream();
    let context = stream.context();
    // cudarc tracks every buffer's uses with CUDA events by default (two events created with
    // each allocation, a stream wait and an event record for every kernel argument), so that a
    // buffer shared between streams is ordered right. Here nothing is shared: all of a model's
    // work is queued on its one stream, and candle refuses an op on tensors of two devices (each
    // model's device is its own), so the events only cost driver calls on every op. The flag is
    // per CUDA context, i.e. per process and GPU, and every model here follows that rule; buffers
    // allocated before this call keep their events, which is harmless.
    // SAFETY: see above; no buffer is used on a stream other than the one that allocated it.
    unsafe { context.disable_event_tracking() };
    let dev = context.cu_device();
    // The default release threshold (0) hands freed blocks back to the driver at every
    // synchronization; keeping them makes the next step's allocations cheap.
    unsafe {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let r = sys::cuDeviceGetDefaultMemPool(&mut pool, dev);
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuDeviceGetDefaultMemPool failed: {r:?}"));
        }
        let mut threshold: u64 = u64::MAX;
        let r = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        );
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("setting the CUDA memory pool's release threshold failed: {r:?}"));
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn configure_cuda(_device: &Device) -> Result<(), String> {
    Ok(())
}

/// The step a profiler should see: `CONVMAE_CUDA_PROFILE_STEP=N` (the trainer's micro-step
/// number, 1 for the first step of a fresh run) brackets that one step with cuProfilerStart /
/// cuProfilerStop, so that a profiler started with profiling off (`ncu --profile-from-start
/// off`, as the GPU check's `--profile` runs it) records exactly one warmed-up step: no model
/// creation, no first-step JIT.
/// Unset, unparsable or 0: never.
pub fn cuda_profile_step() -> Option<u64> {
    parse_profile_step(std::env::var("CONVMAE_CUDA_PROFILE_STEP").ok().as_deref())
}

fn parse_profile_step(value: Option<&str>) -> Option<u64> {
    value?.trim().parse().ok().filter(|&n| n > 0)
}

/// The A/B switches of the GPU check's rows for two host-side changes of 2026-11-26, each read
/// once per process: `CONVMAE_NORMALIZE=host` normalizes the batch on the host and uploads f32
/// (as before `normalize_rgb`), `CONVMAE_COMPUTE_COPIES=off` casts every weight every forward
/// (as before the bf16 compute copies). Unset (or `device` / `on`): the current way. Another
/// value is named in a warning and ignored.
pub fn host_normalize() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| env_switch("CONVMAE_NORMALIZE", "device", "host"))
}

/// See `host_normalize`.
pub fn compute_copies_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| env_switch("CONVMAE_COMPUTE_COPIES", "on", "off"))
}

/// `CONVMAE_TF32=off`: f32 matmuls on CUDA in full f32 rather than on TF32 tensor cores (the
/// default, `on`, as PyTorch's allow_tf32). Read once per process, when a CUDA device opens.
pub fn tf32_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| env_switch("CONVMAE_TF32", "on", "off"))
}

/// `CONVMAE_CHECK_COPIES=on`: after every optimizer update the pretrainer checks that each
/// compute copy equals its master rounded once (`ParamStore::stale_copy`), and fails the step
/// naming the first that does not. A sync and a comparison per tensor: for verification (the
/// GPU check runs a row with it), not for throughput. Read once per process.
pub fn check_copies() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| env_switch("CONVMAE_CHECK_COPIES", "off", "on"))
}

/// `CONVMAE_ADAMW=per-tensor`: AdamW launches one kernel per tensor, as before the multi-tensor
/// update (`convmae_kernels::adamw_update_many`, the default `many`): its A/B, and a safety valve
/// should the one launch misbehave on a GPU. Read once per process.
pub fn adamw_per_tensor() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| env_switch("CONVMAE_ADAMW", "many", "per-tensor"))
}

/// `CONVMAE_STEPS=serial`: each pretraining step is finished on the device before it is
/// answered and the next one starts, as before overlapped steps (train.rs `start_step`, the
/// default `overlapped`): their A/B on a GPU, and a safety valve. Read once per process.
pub fn serial_steps() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| env_switch("CONVMAE_STEPS", "overlapped", "serial"))
}

/// Starts (`on`) or stops the CUDA profiler's collection, after finishing the work queued on
/// `device` so the range holds whole steps. A no-op on the CPU.
pub fn cuda_profiler_range(device: &Device, on: bool) -> Result<(), String> {
    if !device.is_cuda() {
        return Ok(());
    }
    device.synchronize().map_err(|e| e.to_string())?;
    profiler_call(on)
}

#[cfg(feature = "cuda")]
fn profiler_call(on: bool) -> Result<(), String> {
    use candle_core::cuda::cudarc::driver::sys;
    let r = unsafe { if on { sys::cuProfilerStart() } else { sys::cuProfilerStop() } };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(format!("cuProfiler{} failed: {r:?}", if on { "Start" } else { "Stop" }));
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn profiler_call(_on: bool) -> Result<(), String> {
    Ok(())
}

/// High-water marks of a CUDA device's default memory pool (where candle allocates), in bytes:
/// the peak of memory handed to tensors and of memory the pool held.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct PoolPeaks {
    pub used_high: u64,
    pub reserved_high: u64,
}

/// Reads the pool's high-water marks of device `ordinal` (opened before in this process).
#[cfg(feature = "cuda")]
pub fn cuda_pool_peaks(ordinal: usize) -> Result<PoolPeaks, String> {
    use candle_core::cuda::cudarc::driver::sys;
    unsafe {
        let mut dev: sys::CUdevice = 0;
        let r = sys::cuDeviceGet(&mut dev, ordinal as i32);
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuDeviceGet({ordinal}) failed: {r:?}"));
        }
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let r = sys::cuDeviceGetDefaultMemPool(&mut pool, dev);
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuDeviceGetDefaultMemPool failed: {r:?}"));
        }
        let read = |attr: sys::CUmemPool_attribute| -> Result<u64, String> {
            let mut v: u64 = 0;
            let r = sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void);
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(format!("cuMemPoolGetAttribute failed: {r:?}"));
            }
            Ok(v)
        };
        Ok(PoolPeaks {
            used_high: read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            reserved_high: read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        })
    }
}

#[cfg(not(feature = "cuda"))]
pub fn cuda_pool_peaks(_ordinal: usize) -> Result<PoolPeaks, String> {
    Err("this build of convmae has no CUDA backend".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profiled_step_is_a_positive_step_number_or_none() {
        assert_eq!(parse_profile_step(Some("2")), Some(2));
        assert_eq!(parse_profile_step(Some(" 7 ")), Some(7));
        for v in [None, Some(""), Some("0"), Some("-1"), Some("two")] {
            assert_eq!(parse_profile_step(v), None, "{v:?}");
        }
    }

    #[test]
    fn device_strings_parse_or_say_what_is_accepted() {
        assert_eq!(DeviceSpec::parse("cpu"), Ok(DeviceSpec::Cpu));
        let e = DeviceSpec::parse("gpu").unwrap_err();
        assert!(e.contains("'cpu', 'cuda' or 'cuda:N'"), "{e}");
        assert!(DeviceSpec::parse("cuda:x").is_err());
        if CUDA_BUILD {
            assert_eq!(DeviceSpec::parse("cuda:1"), Ok(DeviceSpec::Cuda(1)));
        } else {
            let e = DeviceSpec::parse("cuda").unwrap_err();
            assert!(e.contains("npm run build:cuda"), "{e}");
        }
    }
}
