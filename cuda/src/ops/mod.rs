//! Launch wrappers: typed host functions that check their buffers, allocate the output and
//! launch a kernel. They know buffers and sizes, not tensors; `mvar-ops` calls them from each
//! op's CUDA branch.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod index;
pub mod interp;
pub mod na2d;
pub mod norm;
pub mod optim;
pub mod quant;
pub mod random;
pub mod reduce;
pub mod sample;
pub mod softmax;

use cudarc::driver::DeviceRepr;

use crate::buffer::{BufferKind, CudaBuffer};
use crate::CudaError;

/// Most axes a broadcast/strided kernel handles (`MAX_RANK` in common.cuh).
pub const MAX_RANK: usize = 8;

/// Mirror of `struct Layout` in common.cuh: the output's dims and, per input (up to three), the
/// stride of each output axis in that input, 0 on broadcast axes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    rank: i32,
    /// [`Layout::CONTIGUOUS`] | [`Layout::INDEX32`] (`LAYOUT_*` in common.cuh).
    flags: i32,
    dims: [i64; MAX_RANK],
    strides: [[i64; MAX_RANK]; 3],
}

// SAFETY: plain old data with the C layout of the device struct.
unsafe impl DeviceRepr for Layout {}

fn row_major_strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

impl Layout {
    /// Every input has the output's shape.
    pub const CONTIGUOUS: i32 = 1;
    /// The output has fewer than 2^32 elements: the kernels index in 32 bits.
    pub const INDEX32: i32 = 2;

    /// Inputs of the given shapes broadcast (NumPy rules, already checked by the caller) to `out`.
    pub fn broadcast(op: &str, out: &[usize], inputs: &[&[usize]]) -> Result<Layout, CudaError> {
        let mut l = Layout::empty(op, out)?;
        if inputs.iter().all(|s| *s == out) {
            l.flags |= Layout::CONTIGUOUS;
        }
        for (k, s) in inputs.iter().enumerate().take(3) {
            let own = row_major_strides(s);
            let pad = out
                .len()
                .checked_sub(s.len())
                .ok_or_else(|| CudaError::Launch {
                    op: op.to_string(),
                    sizes: format!("input {s:?} for output {out:?}"),
                    message: "an input of higher rank than the output".into(),
                })?;
            for i in 0..out.len() {
                l.strides[k][i] = if i < pad || s[i - pad] == 1 {
                    0
                } else {
                    own[i - pad] as i64
                };
            }
        }
        Ok(l)
    }

    /// One input read through arbitrary strides (a permuted view, for example).
    pub fn strided(op: &str, out: &[usize], strides: &[usize]) -> Result<Layout, CudaError> {
        let mut l = Layout::empty(op, out)?;
        for (i, &s) in strides.iter().enumerate().take(out.len()) {
            l.strides[0][i] = s as i64;
        }
        Ok(l)
    }

    fn empty(op: &str, out: &[usize]) -> Result<Layout, CudaError> {
        if out.len() > MAX_RANK {
            return Err(CudaError::Launch {
                op: op.to_string(),
                sizes: format!("output {out:?}"),
                message: format!(
                    "rank {} exceeds the kernels' limit of {MAX_RANK}",
                    out.len()
                ),
            });
        }
        let mut dims = [1i64; MAX_RANK];
        for (d, &o) in dims.iter_mut().zip(out) {
            *d = o as i64;
        }
        let small = out
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .is_some_and(|n| n <= u32::MAX as u64);
        Ok(Layout {
            rank: out.len() as i32,
            flags: if small { Layout::INDEX32 } else { 0 },
            dims,
            strides: [[0; MAX_RANK]; 3],
        })
    }
}

/// The largest grid y dimension CUDA allows (kernels with a 2-D grid loop over what is past it).
pub(crate) const MAX_GRID_Y: usize = 65_535;

/// The word a raw-bit copy can move instead of single elements of `elem` bytes: the widest of
/// 16, 8 and 4 bytes (wider than the element) that every count in `runs` (element counts that
/// must be whole words: the contiguous run, and any stride between runs) and both buffer
/// addresses divide into. Returns (bytes per word, the suffix of its kernels), or None for the
/// element kind's own kernels (always with `MVAR_EW_KERNEL=scalar`: the per-element copies are
/// the reference variant).
pub(crate) fn copy_word(
    elem: usize,
    runs: &[usize],
    ptrs: [u64; 2],
) -> Option<(usize, &'static str)> {
    if !elementwise::vector_kernels_enabled() {
        return None;
    }
    [(16, "w16"), (8, "w8"), (4, "w4")]
        .into_iter()
        .find(|&(w, _)| {
            w > elem
                && runs
                    .iter()
                    .all(|&r| r.checked_mul(elem).is_some_and(|b| b % w == 0))
                && ptrs.iter().all(|p| p % w as u64 == 0)
        })
}

/// The kind of a float buffer, or an error naming the op.
pub(crate) fn float_kind(op: &str, bufs: &[&CudaBuffer]) -> Result<BufferKind, CudaError> {
    let kind = bufs.first().map(|b| b.kind()).unwrap_or(BufferKind::F32);
    if !kind.is_float() || bufs.iter().any(|b| b.kind() != kind) {
        return Err(CudaError::Launch {
            op: op.to_string(),
            sizes: bufs
                .iter()
                .map(|b| format!("{:?}[{}]", b.kind(), b.len()))
                .collect::<Vec<_>>()
                .join(", "),
            message: "expected f32 or bf16 buffers of one kind".into(),
        });
    }
    Ok(kind)
}

/// Checks that each buffer has its expected element count.
pub(crate) fn check_lens(op: &str, pairs: &[(&CudaBuffer, usize)]) -> Result<(), CudaError> {
    for (b, want) in pairs {
        if b.len() != *want {
            return Err(CudaError::Launch {
                op: op.to_string(),
                sizes: format!("buffer of {} elements", b.len()),
                message: format!("expected {want} elements"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_take_the_widest_word_that_runs_and_addresses_allow() {
        let aligned = [4096u64, 8192];
        assert_eq!(copy_word(2, &[64], aligned), Some((16, "w16")));
        assert_eq!(copy_word(2, &[4], aligned), Some((8, "w8")));
        assert_eq!(copy_word(2, &[6], aligned), Some((4, "w4")));
        assert_eq!(copy_word(2, &[3], aligned), None);
        // Every run must divide: a stride of 12 bf16 values allows 8 bytes only.
        assert_eq!(copy_word(2, &[64, 12], aligned), Some((8, "w8")));
        // The addresses bound the word too.
        assert_eq!(copy_word(2, &[64], [4096, 8200]), Some((8, "w8")));
        // Never the element itself (its own kernel runs) nor narrower than it.
        assert_eq!(copy_word(4, &[1], aligned), None);
        assert_eq!(copy_word(8, &[2], aligned), Some((16, "w16")));
        assert_eq!(copy_word(8, &[1], aligned), None);
        assert_eq!(copy_word(1, &[usize::MAX], aligned), None);
    }

    #[test]
    fn broadcast_layout_has_zero_strides_on_broadcast_axes() {
        let l = Layout::broadcast("t", &[4, 5, 3], &[&[4, 1, 3], &[5, 1]]).unwrap();
        assert_eq!(l.rank, 3);
        assert_eq!(l.flags, Layout::INDEX32);
        assert_eq!(&l.strides[0][..3], &[3, 0, 1]);
        assert_eq!(&l.strides[1][..3], &[0, 1, 0]);
        let c = Layout::broadcast("t", &[2, 3], &[&[2, 3], &[2, 3]]).unwrap();
        assert_eq!(c.flags, Layout::CONTIGUOUS | Layout::INDEX32);
        let big = Layout::strided("t", &[1 << 16, 1 << 16, 2], &[1, 1 << 16, 1 << 32]).unwrap();
        assert_eq!(big.flags, 0);
        let edge = Layout::strided("t", &[1 << 16, (1 << 16) - 1], &[1, 1 << 16]).unwrap();
        assert_eq!(edge.flags, Layout::INDEX32);
        assert!(Layout::broadcast("t", &[1; 9], &[]).is_err());
    }

    #[test]
    fn layout_matches_the_c_struct_size() {
        // int rank, int flags, i64 dims[8], i64 strides[3][8]
        assert_eq!(std::mem::size_of::<Layout>(), 4 + 4 + 8 * 8 + 3 * 8 * 8);
    }
}
