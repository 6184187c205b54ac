//! A step's inputs to the device and its loss back, without making the host wait for the GPU.
//!
//! A copy from ordinary (pageable) host memory to the GPU goes through the driver's own staging
//! buffers, and for a large one (a batch of images: 9.6 MB at 64 x 224) the call may return
//! only once the copy has run, that is once the stream has finished everything queued before it.
//! Reading a value back (`to_scalar`) always waits for the whole stream. Both are harmless while
//! the host waits for each step anyway; they defeat a host that queues the next step behind the
//! current one (convmae-core's overlapped steps). Here both copies go through page-locked
//! (pinned) host memory, where they are truly asynchronous, with a CUDA event recorded after
//! each to know when it has run. On the CPU they are the plain tensor operations.

use candle_core::{DType, Device, Result, Shape, Tensor, WithDType};

/// Element types `upload` takes (on CUDA: those candle stores and cudarc copies).
#[cfg(feature = "cuda")]
pub trait Uploadable: WithDType + candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr {}
#[cfg(feature = "cuda")]
impl<T: WithDType + candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr> Uploadable for T {}
/// Element types `upload` takes.
#[cfg(not(feature = "cuda"))]
pub trait Uploadable: WithDType {}
#[cfg(not(feature = "cuda"))]
impl<T: WithDType> Uploadable for T {}

/// `CONVMAE_TRANSFERS=plain`: uploads and readbacks as candle makes them (`from_slice`,
/// `to_scalar`), not through pinned memory: the safety valve of this file's CUDA code, which
/// the GPU check sets should its agreement row for it fail. Read once per process.
#[cfg(feature = "cuda")]
fn plain_transfers() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::env_switch("CONVMAE_TRANSFERS", "pinned", "plain"))
}

/// `Tensor::from_slice(data, shape, device)`, except that on CUDA the host does not wait for
/// work queued earlier on the device's stream: `data` is copied into a pinned staging buffer
/// and the upload is queued behind that work.
pub fn upload<T: Uploadable>(data: &[T], shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
    let shape = shape.into();
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) if !data.is_empty() && !plain_transfers() => {
            if shape.elem_count() != data.len() {
                candle_core::bail!("upload: {} values do not fill shape {shape:?}", data.len());
            }
            let slice = staged_htod(dev, data)?;
            let storage = candle_core::CudaStorage::wrap_cuda_slice(slice, dev.clone());
            Ok(Tensor::from_storage(candle_core::Storage::Cuda(storage), shape, candle_core::op::BackpropOp::none(), false))
        }
        _ => Tensor::from_slice(data, shape, device),
    }
}

/// A scalar on its way to the host: `read_later` queues the copy, `wait` returns the value
/// once the copy (and so everything queued before it) has run.
pub struct PendingValue(Pending);

enum Pending {
    Ready(f64),
    #[cfg(feature = "cuda")]
    Copying { slot: Option<cuda::Readback>, dtype: DType },
}

/// Queues the copy of the one-element tensor `t` to the host (on the CPU: reads it now).
/// f64 stays f64; other float types arrive as f32 and are widened.
pub fn read_later(t: &Tensor) -> Result<PendingValue> {
    if t.elem_count() != 1 {
        candle_core::bail!("read_later: expected one value, got a tensor of shape {:?}", t.dims());
    }
    match t.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) if !plain_transfers() => {
            let dtype = if t.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
            let t = t.to_dtype(dtype)?.flatten_all()?.contiguous()?;
            let slot = cuda::read_back(dev, &t)?;
            Ok(PendingValue(Pending::Copying { slot: Some(slot), dtype }))
        }
        _ => Ok(PendingValue(Pending::Ready(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0]))),
    }
}

impl PendingValue {
    /// Whether `wait` would return at once: the copy has run (or the query failed, which `wait`
    /// then reports). A value read on the CPU is ready.
    pub fn is_ready(&self) -> bool {
        match &self.0 {
            Pending::Ready(_) => true,
            #[cfg(feature = "cuda")]
            Pending::Copying { slot, .. } => slot.as_ref().is_none_or(|s| s.is_ready()),
        }
    }

    /// Waits for the copy and returns the value.
    pub fn wait(mut self) -> Result<f64> {
        match &mut self.0 {
            Pending::Ready(v) => Ok(*v),
            #[cfg(feature = "cuda")]
            Pending::Copying { slot, dtype } => {
                let slot = slot.take().expect("a pending value is waited for once");
                let v = slot.value(*dtype);
                cuda::give_back(slot);
                v
            }
        }
    }
}

impl Drop for PendingValue {
    fn drop(&mut self) {
        // An unread copy's buffer goes back to the pool: a later copy into it is queued behind
        // this one on the same stream, so it cannot be overwritten before this one lands.
        #[cfg(feature = "cuda")]
        if let Pending::Copying { slot, .. } = &mut self.0 {
            if let Some(slot) = slot.take() {
                cuda::give_back(slot);
            }
        }
    }
}

/// `data` copied to a new device buffer through a pinned staging buffer (`upload`).
#[cfg(feature = "cuda")]
pub(crate) fn staged_htod<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    dev: &candle_core::cuda_backend::CudaDevice,
    data: &[T],
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> {
    if plain_transfers() {
        return dev.cuda_stream().clone_htod(data).map_err(|e| candle_core::Error::Msg(e.to_string()));
    }
    cuda::staged_htod(dev, data)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{result, CudaContext, CudaEvent, CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, PinnedHostSlice};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{DType, Result, Tensor};
    use std::cell::RefCell;
    use std::sync::Arc;

    /// A pinned buffer and the event recorded after the last copy out of (or into) it.
    struct Slot {
        buffer: PinnedHostSlice<u8>,
        copied: CudaEvent,
    }

    /// Staging buffers used in turn. A buffer is reused only after its previous copy has run
    /// (its event); with several in the ring that copy is long done, from a step or more ago.
    struct Ring {
        slots: Vec<Option<Slot>>,
        next: usize,
    }

    impl Ring {
        fn new(len: usize) -> Self {
            Self { slots: (0..len).map(|_| None).collect(), next: 0 }
        }
    }

    /// Uploads up to this size share the small ring; larger ones the large ring, so that a
    /// large buffer is pinned only a few times over (pinned memory is taken from the host).
    /// A sparse pretraining step of ConvMAE-B at batch 64 uploads, by the code, about ten small
    /// things (the mask and its indices, the mask's ids and slots for the neighbour tables the
    /// GPU builds, the AdamW tables; a few hundred KB in all) and one large (the images,
    /// 64 x 224 x 224 x 3 bytes = 9.6 MB); the rings
    /// hold more than two steps' worth, so that a buffer comes round again only after the step
    /// that used it has run, even with the host a step ahead of the device. By arithmetic that
    /// pins about 40 MB at batch 64 (4 slots of the 9.6 MB images, rounded to 64 KB, and small
    /// slots of at most 1 MB that keep the largest size they have held); not measured.
    const SMALL_UPLOAD: usize = 1 << 20;
    const SMALL_SLOTS: usize = 24;
    const LARGE_SLOTS: usize = 4;

    /// The staging rings and readback buffers of this thread (a model's worker thread owns its
    /// device's stream), for one CUDA context: another context starts them afresh.
    struct Staging {
        context: Arc<CudaContext>,
        small: Ring,
        large: Ring,
        readbacks: Vec<Readback>,
    }

    thread_local! {
        static STAGING: RefCell<Option<Staging>> = const { RefCell::new(None) };
    }

    fn with_staging<R>(context: &Arc<CudaContext>, f: impl FnOnce(&mut Staging) -> Result<R>) -> Result<R> {
        STAGING.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.as_ref().is_none_or(|s| !Arc::ptr_eq(&s.context, context)) {
                *cell = Some(Staging { context: context.clone(), small: Ring::new(SMALL_SLOTS), large: Ring::new(LARGE_SLOTS), readbacks: Vec::new() });
            }
            f(cell.as_mut().unwrap())
        })
    }

    pub(super) fn staged_htod<T: DeviceRepr>(dev: &CudaDevice, data: &[T]) -> Result<CudaSlice<T>> {
        let stream = dev.cuda_stream();
        if data.is_empty() {
            return stream.clone_htod(data).w();
        }
        // SAFETY: DeviceRepr types are plain data; the bytes are only copied.
        let bytes = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) };
        // SAFETY: every element is written by the copy queued below, before anything reads it.
        let mut out = unsafe { stream.alloc::<T>(data.len()) }.w()?;
        let context = stream.context().clone();
        with_staging(&context, |staging| {
            let ring = if bytes.len() <= SMALL_UPLOAD { &mut staging.small } else { &mut staging.large };
            let at = ring.next;
            ring.next = (at + 1) % ring.slots.len();
            let slot = &mut ring.slots[at];
            if let Some(s) = slot.as_ref() {
                s.copied.synchronize().w()?;
                if s.buffer.len() < bytes.len() {
                    *slot = None;
                }
            }
            if slot.is_none() {
                let len = bytes.len().div_ceil(1 << 16) << 16;
                // SAFETY: the buffer is written before any copy reads it (below).
                let buffer = unsafe { context.alloc_pinned::<u8>(len) }.w()?;
                *slot = Some(Slot { buffer, copied: context.new_event(None).w()? });
            }
            let s = slot.as_mut().unwrap();
            let host = &mut s.buffer.as_mut_slice().w()?[..bytes.len()];
            host.copy_from_slice(bytes);
            let (dst, _record) = out.device_ptr_mut(&stream);
            // SAFETY: `host` is pinned and stays allocated and unwritten until `copied` fires;
            // `dst` holds bytes.len() bytes.
            unsafe { result::memcpy_htod_async(dst, host, stream.cu_stream()) }.w()?;
            s.copied.record(&stream).w()
        })?;
        Ok(out)
    }

    /// A pinned 8-byte buffer a scalar is copied into, and the event recorded after the copy.
    pub(crate) struct Readback {
        slot: Slot,
    }

    impl Readback {
        /// Whether the copy has run, without waiting (an error counts as ready: `value` says it).
        pub(super) fn is_ready(&self) -> bool {
            self.slot.copied.try_is_complete().unwrap_or(true)
        }

        pub(super) fn value(&self, dtype: DType) -> Result<f64> {
            self.slot.copied.synchronize().w()?;
            let bytes = self.slot.buffer.as_slice().w()?;
            Ok(match dtype {
                DType::F64 => f64::from_ne_bytes(bytes[..8].try_into().unwrap()),
                _ => f32::from_ne_bytes(bytes[..4].try_into().unwrap()) as f64,
            })
        }
    }

    /// Queues the copy of `t` (one contiguous f32 or f64) into a pinned buffer from the pool.
    pub(super) fn read_back(dev: &CudaDevice, t: &Tensor) -> Result<Readback> {
        let stream = dev.cuda_stream();
        let context = stream.context().clone();
        let mut readback = with_staging(&context, |staging| match staging.readbacks.pop() {
            Some(r) => Ok(r),
            None => {
                // Cached (not write-combined) memory: the host reads it.
                // SAFETY: read only after a copy into it has run (`value`).
                let buffer = unsafe { context.alloc_pinned_with_flags::<u8>(8, 0) }.w()?;
                Ok(Readback { slot: Slot { buffer, copied: context.new_event(None).w()? } })
            }
        })?;
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cuda(s) = &*storage else { candle_core::bail!("read_later: the tensor is not on CUDA") };
        let start = layout.start_offset();
        let (src, bytes) = match t.dtype() {
            DType::F64 => (s.as_cuda_slice::<f64>()?.slice(start..start + 1).device_ptr(&stream).0, 8),
            _ => (s.as_cuda_slice::<f32>()?.slice(start..start + 1).device_ptr(&stream).0, 4),
        };
        let host = &mut readback.slot.buffer.as_mut_slice().w()?[..bytes];
        // SAFETY: `host` is pinned and `src` holds `bytes` bytes; the buffer is read only after
        // `copied` has fired.
        unsafe { result::memcpy_dtoh_async(host, src, stream.cu_stream()) }.w()?;
        readback.slot.copied.record(&stream).w()?;
        Ok(readback)
    }

    /// Returns a readback buffer to this thread's pool (dropped if the context changed since).
    pub(super) fn give_back(readback: Readback) {
        let context = readback.slot.copied.context().clone();
        let _ = with_staging(&context, |staging| {
            staging.readbacks.push(readback);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_the_cpu_upload_is_from_slice_and_read_later_reads_now() {
        let t = upload(&[1u32, 2, 3, 4, 5, 6], (2, 3), &Device::Cpu).unwrap();
        assert_eq!(t.to_vec2::<u32>().unwrap(), vec![vec![1, 2, 3], vec![4, 5, 6]]);
        let v = Tensor::new(0.1f64, &Device::Cpu).unwrap();
        assert_eq!(read_later(&v).unwrap().wait().unwrap(), 0.1);
        let err = read_later(&t).err().unwrap().to_string();
        assert!(err.contains("expected one value"), "{err}");
    }
}
