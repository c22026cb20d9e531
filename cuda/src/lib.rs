//! mvar's GPU side: the safe device probe, the device (context, stream, caching allocator,
//! kernel modules, cuBLAS), typed device buffers, run-time kernel compilation with NVRTC, and
//! the launch wrappers of our kernels.
//!
//! This is the lowest layer of the workspace (tools -> models -> ops -> engine -> cuda). cudarc is
//! built with dynamic loading, so nothing here needs a CUDA toolkit at build time; the driver,
//! NVRTC and cuBLAS are looked up at run time. cudarc panics when a driver call is made and
//! `libcuda` is not on the loader path, so every entry point here checks first: a machine without
//! a GPU gets errors, never panics.

pub mod alloc;
pub mod blas;
mod buffer;
pub mod compile;
mod device;
mod error;
pub mod kernels;
pub mod ops;
mod probe;

pub use alloc::MemoryStats;
pub use buffer::{BufferKind, CudaBuffer, HostData, HostVec};
pub use device::{launch_1d, launch_err, CudaDevice, DriverMemory, StreamMark};
pub use error::CudaError;
pub use probe::{cublas_present, cuda_available, device_count, driver_present, nvrtc_present};

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
