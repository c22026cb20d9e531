//! Autocast-style mixed precision, as `torch.autocast(dtype=torch.bfloat16)` does it: inside an
//! [`autocast`] scope the compute-heavy ops (matmul and linear, attention, neighbourhood
//! attention, conv2d) given f32 inputs cast them to the scope's dtype, run there (bf16 storage,
//! f32 accumulation, tensor cores on a GPU) and cast the result back to f32. Everything else
//! (norms, softmax, losses, elementwise) stays in f32, and so do the parameters: the casts are
//! differentiable, so gradients reach the f32 master weights as f32 (each GEMM's own gradient
//! is computed in the low dtype, as under PyTorch's autocast).
//!
//! Returning f32 rather than bf16 from the cast ops keeps every other op single-dtype; the cost
//! is one extra cast per op output, small next to the GEMMs that the scope is for.

use std::cell::Cell;

use crate::{DType, Error, Result};

thread_local! {
    static AUTOCAST: Cell<Option<DType>> = const { Cell::new(None) };
}

/// The dtype of the enclosing [`autocast`] scope on this thread, if any.
pub fn autocast_dtype() -> Option<DType> {
    AUTOCAST.with(|a| a.get())
}

/// Restores the previous autocast state when dropped.
#[must_use = "the autocast scope ends when this guard is dropped"]
pub struct AutocastGuard {
    previous: Option<DType>,
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        AUTOCAST.with(|a| a.set(self.previous));
    }
}

/// Starts an autocast scope on this thread: `Some(DType::BF16)` turns it on, `None` turns it
/// off (e.g. for a part that must stay in f32). Only bf16 is a supported low dtype.
pub fn autocast(dtype: Option<DType>) -> Result<AutocastGuard> {
    if let Some(d) = dtype {
        if d != DType::BF16 {
            return Err(Error::invalid(
                "autocast",
                format!("dtype {d}: expected bf16 (or None to turn autocast off)"),
            ));
        }
    }
    let previous = AUTOCAST.with(|a| a.replace(dtype));
    Ok(AutocastGuard { previous })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest_and_restore() {
        assert_eq!(autocast_dtype(), None);
        {
            let _a = autocast(Some(DType::BF16)).unwrap();
            assert_eq!(autocast_dtype(), Some(DType::BF16));
            {
                let _b = autocast(None).unwrap();
                assert_eq!(autocast_dtype(), None);
            }
            assert_eq!(autocast_dtype(), Some(DType::BF16));
        }
        assert_eq!(autocast_dtype(), None);
        assert!(autocast(Some(DType::F64)).is_err());
    }
}
