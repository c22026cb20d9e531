//! The run-time probe. cudarc panics when a driver call is made and `libcuda` is not on the
//! loader path, so these functions ask `is_culib_present()` before any call.

use cudarc::driver::CudaContext;

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

/// True when the cuBLAS library can be loaded. Never panics.
pub fn cublas_present() -> bool {
    // SAFETY: only tries to dlopen libcublas.
    unsafe { cudarc::cublas::sys::is_culib_present() }
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
