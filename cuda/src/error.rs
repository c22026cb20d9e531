//! Errors of the GPU side. Every variant names what was being done and, for ops, the sizes.

/// What went wrong on the GPU side.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    #[error(
        "no CUDA driver: libcuda.so could not be loaded (no NVIDIA driver on this machine, or it \
         is not on the loader path)"
    )]
    NoDriver,
    #[error("CUDA device {ordinal} was asked for, but the driver reports {count} device(s)")]
    NoDevice { ordinal: usize, count: usize },
    #[error("CUDA driver error during {during}: {message}")]
    Driver { during: String, message: String },
    #[error(
        "CUDA out of memory during {during}: asked for {requested_bytes} bytes; {free_bytes} of \
         {total_bytes} bytes free on the device, {in_use_bytes} in use by mvar tensors, \
         {cached_bytes} cached"
    )]
    OutOfMemory {
        during: String,
        requested_bytes: usize,
        free_bytes: usize,
        total_bytes: usize,
        in_use_bytes: usize,
        cached_bytes: usize,
    },
    #[error("NVRTC is not available: libnvrtc.so could not be loaded (put the CUDA toolkit's lib64, or the nvidia-cuda-nvrtc wheel's lib folder, on LD_LIBRARY_PATH)")]
    NoNvrtc,
    #[error("NVRTC failed to compile {file} for {arch}:\n{log}")]
    Compile {
        file: String,
        arch: String,
        log: String,
    },
    #[error("kernel {name} not found in {file} (is it declared extern \"C\"?)")]
    MissingKernel { file: String, name: String },
    #[error("{op}: kernel launch failed for {sizes}: {message}")]
    Launch {
        op: String,
        sizes: String,
        message: String,
    },
    #[error("cuBLAS error in {op} ({sizes}): {message}")]
    Blas {
        op: String,
        sizes: String,
        message: String,
    },
    #[error("GPU compute capability {major}.{minor} is not supported (expected 7.0 or newer)")]
    UnsupportedArch { major: i32, minor: i32 },
    #[error("{what}: {message}")]
    Io { what: String, message: String },
}

pub(crate) fn driver_err(
    during: impl Into<String>,
) -> impl Fn(cudarc::driver::DriverError) -> CudaError {
    let during = during.into();
    move |e| CudaError::Driver {
        during: during.clone(),
        message: format!("{e:?}"),
    }
}
