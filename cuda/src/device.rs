//! One GPU: its context, the one stream all work is issued on, the caching allocator, the loaded
//! kernel modules and the cuBLAS handle.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    result as dr, sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, LaunchConfig,
};
use cudarc::nvrtc::Ptx;

use crate::alloc::{CachingAllocator, MemoryStats, RawAllocator};
use crate::buffer::{BufferKind, CudaBuffer, HostData, HostVec, Pool};
use crate::error::driver_err;
use crate::kernels::KernelFile;
use crate::{compile, CudaError};

/// Device memory straight from the driver (the allocator's slow path).
pub struct DriverMemory {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl RawAllocator for DriverMemory {
    fn malloc(&mut self, bytes: usize) -> Result<Option<u64>, CudaError> {
        self.ctx
            .bind_to_thread()
            .map_err(driver_err("binding the CUDA context"))?;
        // SAFETY: a plain allocation; the caching allocator owns the pointer until it frees it.
        match unsafe { dr::malloc_sync(bytes) } {
            Ok(p) => Ok(Some(p)),
            Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => Ok(None),
            Err(e) => Err(driver_err(format!("allocating {bytes} bytes"))(e)),
        }
    }

    fn free(&mut self, ptr: u64) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from `malloc` above and is freed once, after a stream sync.
        let _ = unsafe { dr::free_sync(ptr) };
    }

    fn synchronize(&mut self) {
        let _ = self.stream.synchronize();
    }

    fn memory_info(&self) -> (usize, usize) {
        let _ = self.ctx.bind_to_thread();
        dr::mem_get_info().unwrap_or((0, 0))
    }
}

struct Inner {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: &'static str,
    /// Read once at open: kernel selection asks for them on every attention call.
    compute_capability: (i32, i32),
    max_smem_optin: usize,
    smem_per_multiprocessor: usize,
    multiprocessors: usize,
    pool: Pool,
    /// Loaded modules by (kernel file, compiled with MVAR_MMA_PORTABLE).
    modules: Mutex<HashMap<(&'static str, bool), Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, bool, String), CudaFunction>>,
    blas: OnceLock<Result<BlasHandle, CudaError>>,
}

/// The cuBLAS handle and the workspace it was given.
struct BlasHandle {
    blas: Arc<CudaBlas>,
    /// From our allocator, so that it counts in the current and peak bytes like every other
    /// allocation (PyTorch gives cuBLAS its workspace from its caching allocator too).
    _workspace: CudaBuffer,
}

/// The cuBLAS workspace cuBLAS's documentation recommends: 32 MiB on Hopper and newer, 4 MiB
/// before. Without one cuBLAS may pick slower kernels.
pub fn blas_workspace_bytes(major: i32) -> usize {
    if major >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

/// A handle on one GPU (cheap to clone).
#[derive(Clone)]
pub struct CudaDevice(Arc<Inner>);

/// A point in the device's stream with the GPU time at which it was reached ([`CudaDevice::mark`]).
pub struct StreamMark(CudaEvent);

impl StreamMark {
    /// Milliseconds of GPU time from this mark to `later` (negative if `later` came first);
    /// waits until both are reached. The driver resolves about half a microsecond.
    pub fn ms_until(&self, later: &StreamMark) -> Result<f64, CudaError> {
        self.0
            .elapsed_ms(&later.0)
            .map(f64::from)
            .map_err(driver_err("reading the time between two events"))
    }
}

impl fmt::Debug for StreamMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StreamMark")
    }
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cuda:{}", self.0.ordinal)
    }
}

impl PartialEq for CudaDevice {
    fn eq(&self, other: &Self) -> bool {
        self.0.ordinal == other.0.ordinal
    }
}
impl Eq for CudaDevice {}

/// Launch geometry for a grid-stride loop over `n` items.
pub fn launch_1d(n: usize, threads: u32) -> LaunchConfig {
    let blocks = n.div_ceil(threads as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Maps a launch failure to an error naming the op and the sizes.
pub fn launch_err(
    op: &str,
    sizes: String,
) -> impl Fn(cudarc::driver::DriverError) -> CudaError + '_ {
    move |e| CudaError::Launch {
        op: op.to_string(),
        sizes: sizes.clone(),
        message: format!("{e:?}"),
    }
}

impl CudaDevice {
    /// Opens device `ordinal`. Returns an error, never panics, when there is no driver or no
    /// such device.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        if !crate::driver_present() {
            return Err(CudaError::NoDriver);
        }
        let count = crate::device_count();
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err("opening the CUDA context"))?;
        let stream = ctx.default_stream();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver_err("reading the compute capability"))?;
        let arch = compile::arch_for(major, minor)?;
        let max_smem_optin = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(driver_err("reading the shared-memory opt-in limit"))?
            .max(0) as usize;
        let smem_per_multiprocessor = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            )
            .map_err(driver_err("reading the shared memory per multiprocessor"))?
            .max(0) as usize;
        let multiprocessors = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_err("reading the multiprocessor count"))?
            .max(1) as usize;
        let caching = std::env::var("MVAR_CUDA_NO_CACHING").as_deref() != Ok("1");
        let pool = Arc::new(Mutex::new(CachingAllocator::with_caching(
            DriverMemory {
                ctx: ctx.clone(),
                stream: stream.clone(),
            },
            caching,
        )));
        Ok(CudaDevice(Arc::new(Inner {
            ordinal,
            ctx,
            stream,
            arch,
            compute_capability: (major, minor),
            max_smem_optin,
            smem_per_multiprocessor,
            multiprocessors,
            pool,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
        })))
    }

    pub fn ordinal(&self) -> usize {
        self.0.ordinal
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.0.ctx
    }

    /// The one stream the engine issues work on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.0.stream
    }

    /// The CUBIN target of this GPU, e.g. "sm_90".
    pub fn arch(&self) -> &'static str {
        self.0.arch
    }

    /// The marketing name of the GPU, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> Result<String, CudaError> {
        self.0
            .ctx
            .name()
            .map_err(driver_err("reading the device name"))
    }

    /// (major, minor) compute capability, e.g. (9, 0) for Hopper.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.0.compute_capability
    }

    /// The most dynamic shared memory one block may opt in to, in bytes (227 KiB on an H100).
    pub fn max_smem_optin(&self) -> usize {
        self.0.max_smem_optin
    }

    /// Shared memory of one multiprocessor, shared by the blocks resident on it, in bytes (228
    /// KiB on an H100; each block also takes 1 KiB of it for the system).
    pub fn smem_per_multiprocessor(&self) -> usize {
        self.0.smem_per_multiprocessor
    }

    /// Streaming multiprocessors (132 on an H100 SXM): what launch sizes aim to fill.
    pub fn multiprocessors(&self) -> usize {
        self.0.multiprocessors
    }

    /// Whether the GPU has bf16 tensor-core `mma.sync`, `ldmatrix` and `cp.async` (sm_80 and
    /// newer), which the mma kernels of the attention files need.
    pub fn has_bf16_mma(&self) -> bool {
        self.0.compute_capability.0 >= 8
    }

    /// (free, total) device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize), CudaError> {
        self.0
            .ctx
            .mem_get_info()
            .map_err(driver_err("reading device memory info"))
    }

    /// Waits for all work queued on the engine's stream.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.0
            .stream
            .synchronize()
            .map_err(driver_err("synchronising the stream"))
    }

    /// Marks the stream here: the GPU stamps the mark with its clock when all work queued
    /// before it has run (a CUDA event with timing). `reuse` re-records a finished mark instead
    /// of creating an event. The op timeline of `MVAR_PROFILE=trace` brackets each op with two.
    pub fn mark(&self, reuse: Option<StreamMark>) -> Result<StreamMark, CudaError> {
        match reuse {
            Some(m) => {
                m.0.record(&self.0.stream)
                    .map_err(driver_err("recording a timing event"))?;
                Ok(m)
            }
            None => self
                .0
                .stream
                .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map(StreamMark)
                .map_err(driver_err("recording a timing event")),
        }
    }

    // ------------------------------------------------------------------------------------------
    // memory

    fn pool(&self) -> std::sync::MutexGuard<'_, CachingAllocator<DriverMemory>> {
        self.0.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Uninitialised memory for `len` elements of `kind`. `during` names the op for errors.
    pub fn alloc(
        &self,
        kind: BufferKind,
        len: usize,
        during: &str,
    ) -> Result<CudaBuffer, CudaError> {
        if len == 0 {
            return Ok(CudaBuffer {
                ptr: 0,
                block_bytes: 0,
                len: 0,
                kind,
                pool: None,
            });
        }
        let bytes =
            len.checked_mul(kind.size_in_bytes())
                .ok_or_else(|| CudaError::OutOfMemory {
                    during: during.to_string(),
                    requested_bytes: usize::MAX,
                    free_bytes: 0,
                    total_bytes: 0,
                    in_use_bytes: 0,
                    cached_bytes: 0,
                })?;
        let (ptr, block_bytes) = self.pool().alloc(bytes, during)?;
        Ok(CudaBuffer {
            ptr,
            block_bytes,
            len,
            kind,
            pool: Some(self.0.pool.clone()),
        })
    }

    /// A zero-filled buffer.
    pub fn zeros(&self, kind: BufferKind, len: usize) -> Result<CudaBuffer, CudaError> {
        let buf = self.alloc(kind, len, "zeros")?;
        if len > 0 {
            self.0
                .ctx
                .bind_to_thread()
                .map_err(driver_err("binding the CUDA context"))?;
            // SAFETY: the buffer holds byte_len bytes; the memset is ordered on our stream.
            unsafe { dr::memset_d8_async(buf.ptr, 0, buf.byte_len(), self.0.stream.cu_stream()) }
                .map_err(driver_err("zero-filling a buffer"))?;
        }
        Ok(buf)
    }

    /// Copies host data to a new device buffer.
    pub fn upload(&self, host: HostData<'_>) -> Result<CudaBuffer, CudaError> {
        let buf = self.alloc(host.kind(), host.len(), "copying host data to the GPU")?;
        if buf.is_empty() {
            return Ok(buf);
        }
        self.0
            .ctx
            .bind_to_thread()
            .map_err(driver_err("binding the CUDA context"))?;
        let s = self.0.stream.cu_stream();
        let err = driver_err("copying host data to the GPU");
        // SAFETY: the destination holds exactly the source's bytes. For pageable host memory the
        // driver stages the data before returning, so the borrow may end after the call.
        unsafe {
            match host {
                HostData::F32(v) => dr::memcpy_htod_async(buf.ptr, v, s),
                HostData::BF16(v) => dr::memcpy_htod_async(buf.ptr, v, s),
                HostData::I64(v) => dr::memcpy_htod_async(buf.ptr, v, s),
                HostData::U8(v) => dr::memcpy_htod_async(buf.ptr, v, s),
            }
        }
        .map_err(err)?;
        Ok(buf)
    }

    /// Copies a device buffer back to the host (waits for queued work).
    pub fn download(&self, buf: &CudaBuffer) -> Result<HostVec, CudaError> {
        self.0
            .ctx
            .bind_to_thread()
            .map_err(driver_err("binding the CUDA context"))?;
        let s = self.0.stream.cu_stream();
        let err = driver_err("copying GPU data to the host");
        macro_rules! copy {
            ($t:ty, $variant:ident, $zero:expr) => {{
                let mut v: Vec<$t> = vec![$zero; buf.len];
                if !v.is_empty() {
                    // SAFETY: `v` holds exactly the buffer's bytes and lives until the sync below.
                    unsafe { dr::memcpy_dtoh_async(&mut v, buf.ptr, s) }.map_err(&err)?;
                }
                self.synchronize()?;
                HostVec::$variant(v)
            }};
        }
        Ok(match buf.kind {
            BufferKind::F32 => copy!(f32, F32, 0.0),
            BufferKind::BF16 => copy!(half::bf16, BF16, half::bf16::ZERO),
            BufferKind::I64 => copy!(i64, I64, 0),
            BufferKind::U8 => copy!(u8, U8, 0),
        })
    }

    /// A device-side copy of a buffer.
    pub fn duplicate(&self, buf: &CudaBuffer) -> Result<CudaBuffer, CudaError> {
        let out = self.alloc(buf.kind, buf.len, "copying a buffer")?;
        if !out.is_empty() {
            self.0
                .ctx
                .bind_to_thread()
                .map_err(driver_err("binding the CUDA context"))?;
            // SAFETY: both buffers hold byte_len bytes; ordered on our stream.
            unsafe {
                dr::memcpy_dtod_async(out.ptr, buf.ptr, buf.byte_len(), self.0.stream.cu_stream())
            }
            .map_err(driver_err("copying a buffer on the GPU"))?;
        }
        Ok(out)
    }

    /// Memory accounting of the caching allocator.
    pub fn memory_stats(&self) -> MemoryStats {
        self.pool().stats()
    }

    /// Starts a new peak-memory measurement.
    pub fn reset_peak_memory(&self) {
        self.pool().reset_peak();
    }

    /// Returns cached blocks to the driver.
    pub fn empty_cache(&self) {
        self.pool().empty_cache();
    }

    // ------------------------------------------------------------------------------------------
    // kernels

    /// Kernel `name` of `file`, compiling and loading the file on first use.
    pub fn function(&self, file: &KernelFile, name: &str) -> Result<CudaFunction, CudaError> {
        let key = (file.name, compile::mma_portable(), name.to_string());
        if let Some(f) = self
            .0
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(f.clone());
        }
        let module = self.module(file)?;
        let f = module
            .load_function(name)
            .map_err(|_| CudaError::MissingKernel {
                file: file.name.to_string(),
                name: name.to_string(),
            })?;
        self.0
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, f.clone());
        Ok(f)
    }

    fn module(&self, file: &KernelFile) -> Result<Arc<CudaModule>, CudaError> {
        let mut modules = self.0.modules.lock().unwrap_or_else(|e| e.into_inner());
        let key = (file.name, compile::mma_portable());
        if let Some(m) = modules.get(&key) {
            return Ok(m.clone());
        }
        let cubin = compile::cubin(file, self.0.arch)?;
        let m = self
            .0
            .ctx
            .load_module(Ptx::from_binary(cubin))
            .map_err(driver_err(format!("loading the module of {}", file.name)))?;
        modules.insert(key, m.clone());
        Ok(m)
    }

    /// The cuBLAS handle bound to the engine's stream, with its workspace (created on first
    /// use).
    pub fn blas(&self) -> Result<Arc<CudaBlas>, CudaError> {
        match self.0.blas.get_or_init(|| self.new_blas()) {
            Ok(h) => Ok(h.blas.clone()),
            Err(e) => Err(e.clone()),
        }
    }

    fn new_blas(&self) -> Result<BlasHandle, CudaError> {
        let fail = |message: String| CudaError::Blas {
            op: "cublas".into(),
            sizes: String::new(),
            message,
        };
        if !crate::cublas_present() {
            return Err(fail(
                "libcublas.so could not be loaded (put the CUDA toolkit's lib64 on LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        let blas = CudaBlas::new(self.0.stream.clone())
            .map_err(|e| fail(format!("creating the handle: {e:?}")))?;
        let bytes = blas_workspace_bytes(self.compute_capability().0);
        let workspace = self.alloc(BufferKind::U8, bytes, "the cuBLAS workspace")?;
        // SAFETY: the workspace lives as long as the device (in `BlasHandle`), and callers hold
        // the handle only for the duration of one call; cuBLAS uses it on the handle's stream,
        // the one every allocation is ordered on.
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *blas.handle(),
                workspace.device_ptr() as *mut std::ffi::c_void,
                bytes,
            )
        }
        .result()
        .map_err(|e| fail(format!("setting a workspace of {bytes} bytes: {e:?}")))?;
        Ok(BlasHandle {
            blas: Arc::new(blas),
            _workspace: workspace,
        })
    }
}
