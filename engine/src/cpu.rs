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
