//! mvar's GPU side: the safe device probe, the device handle and typed device buffers.
//!
//! This is the lowest layer of the workspace (tools -> models -> ops -> engine -> cuda): the
//! engine's storage enum holds a [`CudaBuffer`] for tensors that live on a GPU. cudarc is built
//! with dynamic loading, so nothing here needs a CUDA toolkit at build time, and the driver is
//! looked up only at run time.
//!
//! cudarc panics (rather than returning an error) when a driver call is made and `libcuda` is not
//! on the loader path. Every entry point here therefore asks `is_culib_present()` first, so that
//! a machine without a GPU gets `Err(CudaError::NoDriver)` and never a panic.

use std::fmt;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::bf16;

/// What went wrong on the GPU side. Every variant says what was asked for.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver: libcuda.so could not be loaded (no NVIDIA driver on this machine, or it is not on the loader path)")]
    NoDriver,
    #[error("CUDA device {ordinal} was asked for, but the driver reports {count} device(s)")]
    NoDevice { ordinal: usize, count: usize },
    #[error("CUDA driver error during {during}: {message}")]
    Driver {
        during: &'static str,
        message: String,
    },
    #[error("CUDA out of memory during {during}: asked for {requested_bytes} bytes, {free_bytes} of {total_bytes} free")]
    OutOfMemory {
        during: &'static str,
        requested_bytes: usize,
        free_bytes: usize,
        total_bytes: usize,
    },
}

fn driver_err(during: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CudaError {
    move |e| CudaError::Driver {
        during,
        message: format!("{e:?}"),
    }
}

/// True when the CUDA driver library can be loaded. Never panics.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// True when the NVRTC run-time compiler library can be loaded. Never panics.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen libnvrtc.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Number of CUDA devices, 0 when there is no driver or no device. Never panics.
pub fn device_count() -> usize {
    if !driver_present() {
        return 0;
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => n as usize,
        _ => 0,
    }
}

/// True when at least one CUDA device can be used.
pub fn cuda_available() -> bool {
    device_count() > 0
}

/// A handle on one GPU: its context and the one stream the engine issues work on.
#[derive(Clone)]
pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cuda:{}", self.ordinal)
    }
}

impl PartialEq for CudaDevice {
    fn eq(&self, other: &Self) -> bool {
        self.ordinal == other.ordinal
    }
}
impl Eq for CudaDevice {}

impl CudaDevice {
    /// Opens device `ordinal`. Returns an error, never panics, when there is no driver or no
    /// such device.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDriver);
        }
        let count = device_count();
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err("opening the CUDA context"))?;
        let stream = ctx.default_stream();
        Ok(Self {
            ordinal,
            ctx,
            stream,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The marketing name of the GPU, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> Result<String, CudaError> {
        self.ctx
            .name()
            .map_err(driver_err("reading the device name"))
    }

    /// (major, minor) compute capability, e.g. (9, 0) for Hopper.
    pub fn compute_capability(&self) -> Result<(i32, i32), CudaError> {
        self.ctx
            .compute_capability()
            .map_err(driver_err("reading the compute capability"))
    }

    /// (free, total) device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize), CudaError> {
        self.ctx
            .mem_get_info()
            .map_err(driver_err("reading device memory info"))
    }

    /// Waits for all work queued on the engine's stream.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(driver_err("synchronising the stream"))
    }

    fn oom_or_driver(
        &self,
        during: &'static str,
        bytes: usize,
    ) -> impl Fn(cudarc::driver::DriverError) -> CudaError + '_ {
        move |e| {
            let oom = format!("{e:?}").contains("OUT_OF_MEMORY");
            match (oom, self.memory_info()) {
                (true, Ok((free, total))) => CudaError::OutOfMemory {
                    during,
                    requested_bytes: bytes,
                    free_bytes: free,
                    total_bytes: total,
                },
                _ => CudaError::Driver {
                    during,
                    message: format!("{e:?}"),
                },
            }
        }
    }

    /// Copies host data to a new device buffer.
    pub fn upload(&self, host: HostData<'_>) -> Result<CudaBuffer, CudaError> {
        let bytes = host.byte_len();
        let err = self.oom_or_driver("copying host data to the GPU", bytes);
        Ok(match host {
            HostData::F32(v) => CudaBuffer::F32(self.stream.clone_htod(v).map_err(err)?),
            HostData::BF16(v) => CudaBuffer::BF16(self.stream.clone_htod(v).map_err(err)?),
            HostData::I64(v) => CudaBuffer::I64(self.stream.clone_htod(v).map_err(err)?),
            HostData::U8(v) => CudaBuffer::U8(self.stream.clone_htod(v).map_err(err)?),
        })
    }

    /// Copies a device buffer back to the host.
    pub fn download(&self, buffer: &CudaBuffer) -> Result<HostVec, CudaError> {
        let err = driver_err("copying GPU data to the host");
        Ok(match buffer {
            CudaBuffer::F32(s) => HostVec::F32(self.stream.clone_dtoh(s).map_err(err)?),
            CudaBuffer::BF16(s) => HostVec::BF16(self.stream.clone_dtoh(s).map_err(err)?),
            CudaBuffer::I64(s) => HostVec::I64(self.stream.clone_dtoh(s).map_err(err)?),
            CudaBuffer::U8(s) => HostVec::U8(self.stream.clone_dtoh(s).map_err(err)?),
        })
    }

    /// A zero-filled device buffer of `len` elements.
    pub fn zeros(&self, kind: BufferKind, len: usize) -> Result<CudaBuffer, CudaError> {
        let err = self.oom_or_driver(
            "allocating a zero-filled buffer",
            len * kind.size_in_bytes(),
        );
        Ok(match kind {
            BufferKind::F32 => CudaBuffer::F32(self.stream.alloc_zeros(len).map_err(err)?),
            BufferKind::BF16 => CudaBuffer::BF16(self.stream.alloc_zeros(len).map_err(err)?),
            BufferKind::I64 => CudaBuffer::I64(self.stream.alloc_zeros(len).map_err(err)?),
            BufferKind::U8 => CudaBuffer::U8(self.stream.alloc_zeros(len).map_err(err)?),
        })
    }
}

/// Element types a device buffer can hold. f64 lives on the CPU only (it exists for gradient
/// checks, which run on the CPU reference backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferKind {
    F32,
    BF16,
    I64,
    U8,
}

impl BufferKind {
    pub fn size_in_bytes(self) -> usize {
        match self {
            BufferKind::F32 => 4,
            BufferKind::BF16 => 2,
            BufferKind::I64 => 8,
            BufferKind::U8 => 1,
        }
    }
}

/// Typed memory on one GPU.
pub enum CudaBuffer {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<bf16>),
    I64(CudaSlice<i64>),
    U8(CudaSlice<u8>),
}

impl CudaBuffer {
    pub fn kind(&self) -> BufferKind {
        match self {
            CudaBuffer::F32(_) => BufferKind::F32,
            CudaBuffer::BF16(_) => BufferKind::BF16,
            CudaBuffer::I64(_) => BufferKind::I64,
            CudaBuffer::U8(_) => BufferKind::U8,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CudaBuffer::F32(s) => s.len(),
            CudaBuffer::BF16(s) => s.len(),
            CudaBuffer::I64(s) => s.len(),
            CudaBuffer::U8(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaBuffer({:?}, {} elements)", self.kind(), self.len())
    }
}

/// Borrowed host data on its way to the GPU.
pub enum HostData<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    I64(&'a [i64]),
    U8(&'a [u8]),
}

impl HostData<'_> {
    fn byte_len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len() * 4,
            HostData::BF16(v) => v.len() * 2,
            HostData::I64(v) => v.len() * 8,
            HostData::U8(v) => v.len(),
        }
    }
}

/// Owned host data copied back from the GPU.
pub enum HostVec {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    I64(Vec<i64>),
    U8(Vec<u8>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics() {
        // On CI there is no driver: the probe must say so without panicking.
        let n = device_count();
        assert_eq!(cuda_available(), n > 0);
        if !driver_present() {
            assert!(matches!(CudaDevice::new(0), Err(CudaError::NoDriver)));
        }
    }

    #[test]
    fn asking_for_a_missing_ordinal_is_an_error() {
        let n = device_count();
        let err = CudaDevice::new(n + 7).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("driver") || msg.contains(&format!("{}", n + 7)),
            "{msg}"
        );
    }
}
