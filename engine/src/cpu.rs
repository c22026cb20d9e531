//! Helpers for writing CPU kernels once, generically over the float type.
//!
//! A kernel implements [`FloatKernel::run`] for any [`Float`] (f32 or f64). [`run_float`] checks
//! that all inputs share one float dtype and calls it; bf16 inputs are widened to f32, the
//! kernel runs in f32, and the outputs are rounded back to bf16 once. That is the "bf16 storage,
//! f32 accumulation" contract the CUDA kernels follow too.

use half::bf16;

use crate::{CpuStorage, DType, Error, Float, Result};

/// Below this many elements a loop runs on one thread: rayon's fork/join costs more than it
/// saves on small tensors.
pub const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// Makes glibc's malloc keep freed activations for reuse, once per process (the first CPU op
/// calls it). By default glibc gives a freed block above its mmap threshold (128 KiB at first)
/// straight back to the kernel and trims free memory above twice that off the heap top, so the
/// next allocation of that size page-faults on every 4 KiB page. A training step frees and
/// re-allocates hundreds of multi-MB tensors: on the 2-vCPU CI machine this was half of a 3x3
/// conv's forward + backward at [32,32,32,32] (38.8 -> 20.9 ms) and raised the demo tokenizer
/// from 2.9-3.4 to 3.6-3.7 steps/s and MVAR-d4 by 3-6 %, with 3x less system time.
/// `MVAR_MALLOC_TUNING=0` leaves malloc as it is; other C libraries are left alone.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if std::env::var("MVAR_MALLOC_TUNING").as_deref() != Ok("0") {
            // glibc's largest mmap threshold: blocks above 32 MiB are still mapped and unmapped
            // one by one, but at that size the page faults are small next to the work on them.
            const MMAP_THRESHOLD: libc::c_int = 32 << 20;
            // Up to this much freed memory at the top of an arena stays mapped for reuse.
            const TRIM_THRESHOLD: libc::c_int = 256 << 20;
            // SAFETY: mallopt only changes malloc's parameters, and both values are in range.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            }
        }
    });
}

pub trait FloatKernel {
    /// Computes the outputs from the inputs (all of one float type).
    fn run<T: Float>(&self, inputs: &[&[T]]) -> Result<Vec<Vec<T>>>;
}

/// Runs `kernel` on float storages of one dtype; see the module docs for bf16.
pub fn run_float(
    op: &'static str,
    inputs: &[&CpuStorage],
    kernel: &impl FloatKernel,
) -> Result<Vec<CpuStorage>> {
    let dtype = inputs
        .first()
        .map(|s| s.dtype())
        .ok_or_else(|| Error::invalid(op, "no inputs"))?;
    if !dtype.is_float() {
        return Err(Error::dtype(op, dtype, "a float dtype (f32, bf16 or f64)"));
    }
    if let Some(other) = inputs.iter().find(|s| s.dtype() != dtype) {
        return Err(Error::DTypeMismatch {
            op,
            got: format!("{dtype} and {}", other.dtype()),
            expected: "all float inputs of one dtype".into(),
        });
    }
    match dtype {
        DType::F32 => {
            let xs: Vec<&[f32]> = inputs
                .iter()
                .map(|s| s.as_slice(op))
                .collect::<Result<_>>()?;
            Ok(kernel.run(&xs)?.into_iter().map(CpuStorage::F32).collect())
        }
        DType::F64 => {
            let xs: Vec<&[f64]> = inputs
                .iter()
                .map(|s| s.as_slice(op))
                .collect::<Result<_>>()?;
            Ok(kernel.run(&xs)?.into_iter().map(CpuStorage::F64).collect())
        }
        DType::BF16 => {
            let wide: Vec<Vec<f32>> = inputs.iter().map(|s| s.to_f32_vec()).collect();
            let xs: Vec<&[f32]> = wide.iter().map(|v| v.as_slice()).collect();
            Ok(kernel
                .run(&xs)?
                .into_iter()
                .map(|v| CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()))
                .collect())
        }
        DType::I64 | DType::U8 => unreachable!("checked above"),
    }
}
