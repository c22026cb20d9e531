//! Where a tensor lives. The GPU is found at run time; a machine without one gets a clear error
//! from [`Device::cuda`] and can always use [`Device::Cpu`].

use std::fmt;

use mvar_cuda::CudaDevice;

use crate::{Error, Result};

#[derive(Clone, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(CudaDevice),
}

impl Device {
    /// Opens GPU `ordinal`; an error (never a panic) when there is no driver or no such GPU.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Ok(Device::Cuda(CudaDevice::new(ordinal)?))
    }

    /// The device chosen by the environment: `MVAR_DEVICE=cpu`, `cuda` or `cuda:N` forces one
    /// (an unusable `cuda` is an error, not a silent fallback); unset, the first GPU if there is
    /// one, else the CPU.
    pub fn from_env() -> Result<Device> {
        match std::env::var("MVAR_DEVICE") {
            Ok(v) => Device::parse(&v),
            Err(_) => Ok(Device::best()),
        }
    }

    /// The first GPU if one can be opened, else the CPU.
    pub fn best() -> Device {
        if mvar_cuda::cuda_available() {
            if let Ok(d) = Device::cuda(0) {
                return d;
            }
        }
        Device::Cpu
    }

    /// Parses `cpu`, `cuda` or `cuda:N`.
    pub fn parse(spec: &str) -> Result<Device> {
        let s = spec.trim().to_ascii_lowercase();
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        if s == "cuda" || s == "gpu" {
            return Device::cuda(0);
        }
        if let Some(n) = s.strip_prefix("cuda:") {
            let ordinal = n.parse::<usize>().map_err(|_| {
                Error::invalid("device", format!("{spec:?}: expected cpu, cuda or cuda:N"))
            })?;
            return Device::cuda(ordinal);
        }
        Err(Error::invalid(
            "device",
            format!("{spec:?}: expected cpu, cuda or cuda:N"),
        ))
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// Waits for queued GPU work; a no-op on the CPU.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(d) => Ok(d.synchronize()?),
        }
    }

    /// A one-line description for logs: "cpu (N threads)" or "cuda:0 (NVIDIA H100 ..., sm_90)".
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
            Device::Cuda(d) => {
                let name = d.name().unwrap_or_else(|_| "unknown GPU".into());
                let (major, minor) = d.compute_capability();
                let cc = format!("sm_{major}{minor}");
                format!("cuda:{} ({name}, {cc})", d.ordinal())
            }
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(d) => write!(f, "cuda:{}", d.ordinal()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rejects_nonsense_with_a_message() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        let e = Device::parse("tpu").unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        let e = Device::parse("cuda:x").unwrap_err().to_string();
        assert!(e.contains("cuda:N"), "{e}");
    }

    #[test]
    fn cuda_without_a_gpu_is_an_error_not_a_panic() {
        if !mvar_cuda::cuda_available() {
            assert!(Device::cuda(0).is_err());
            assert_eq!(Device::best(), Device::Cpu);
        }
    }
}
