//! Launch wrappers of `kernels/random.cu` (dropout and drop-path masks), and the host-side
//! mirror of the kernel's index arithmetic that the engine's tests compare with its generator.

use cudarc::driver::PushKernelArg;

use crate::buffer::{BufferKind, CudaBuffer};
use crate::device::{launch_1d, launch_err};
use crate::kernels::RANDOM;
use crate::ops::elementwise::{vector_kernels_enabled, vector_width};
use crate::ops::float_kind;
use crate::{CudaDevice, CudaError};

const THREADS: u32 = 256;

/// Philox blocks a draw of `n` words consumes (4 words a block), as the CPU generator counts.
pub fn blocks_for(n: usize) -> u64 {
    n.div_ceil(4) as u64
}

/// Which Philox block and which of its four words value `i` of a draw starting at block `first`
/// reads: the arithmetic of `keep_mask` (thread b handles block first + b, values 4b .. 4b + 3).
pub fn draw_position(first: u64, i: u64) -> (u64, usize) {
    (first + i / 4, (i % 4) as usize)
}

/// The integer threshold t with `(w >> 8) < t` exactly when the CPU keeps a value drawn as word
/// w, i.e. when u = ((w >> 8) + 0.5) / 2^24 (computed in f64, as `mvar_engine::rng` does) is
/// below `keep`. u grows with w >> 8, so t is the number of 24-bit values k with u(k) < keep,
/// found by bisection on the very same f64 expression (no rounding question can arise).
pub fn keep_threshold(keep: f64) -> u32 {
    let u = |k: u32| (k as f64 + 0.5) * (1.0 / 16_777_216.0);
    let (mut lo, mut hi) = (0u32, 1u32 << 24);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if u(mid) < keep {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// What `keep_mask` computes, on the host: `block(b)` gives Philox block b (the engine's
/// `philox4x32_10` under the generator's key). Loops exactly as the kernel's threads do.
pub fn keep_mask_reference(
    first: u64,
    n: usize,
    threshold: u32,
    block: impl Fn(u64) -> [u32; 4],
) -> Vec<u8> {
    let mut mask = vec![0u8; n];
    for b in 0..blocks_for(n) {
        let w = block(first + b);
        for (q, word) in w.iter().enumerate() {
            let i = (b * 4) as usize + q;
            if i < n {
                mask[i] = ((word >> 8) < threshold) as u8;
            }
        }
    }
    mask
}

/// A u8 keep mask of `n` decisions drawn from Philox under `seed`, starting at block `first`
/// (the caller advances its generator by [`blocks_for`]`(n)`): 1 where (w >> 8) < threshold.
pub fn keep_mask(
    dev: &CudaDevice,
    seed: u64,
    first: u64,
    n: usize,
    threshold: u32,
) -> Result<CudaBuffer, CudaError> {
    let out = dev.alloc(BufferKind::U8, n, "keep mask")?;
    if n == 0 {
        return Ok(out);
    }
    let f = dev.function(&RANDOM, "keep_mask")?;
    let (po, nn) = (out.device_ptr(), n as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po).arg(&nn).arg(&seed).arg(&first).arg(&threshold);
    // SAFETY: out holds n bytes; the kernel writes indices below n only.
    unsafe { b.launch(launch_1d(n.div_ceil(4), THREADS)) }
        .map_err(launch_err("keep mask", format!("{n} decisions")))?;
    Ok(out)
}

/// out\[i\] = mask[i / group] ? x\[i\] * scale : 0, for f32 or bf16 `x` and a u8 `mask` with a
/// decision for every group of `group` elements.
pub fn mask_scale(
    dev: &CudaDevice,
    x: &CudaBuffer,
    mask: &CudaBuffer,
    group: usize,
    scale: f32,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "mask scale";
    let kind = float_kind(OP, &[x])?;
    let n = x.len();
    let covered = mask.len().checked_mul(group);
    if mask.kind() != BufferKind::U8 || group == 0 || covered.is_none_or(|c| c < n) {
        return Err(CudaError::Launch {
            op: OP.into(),
            sizes: format!(
                "x {:?}[{n}], mask {:?}[{}], group {group}",
                x.kind(),
                mask.kind(),
                mask.len()
            ),
            message: "expected a u8 mask with one decision per group of elements".into(),
        });
    }
    let out = dev.alloc(kind, n, "mask scale output")?;
    if n == 0 {
        return Ok(out);
    }
    let (po, px, pm) = (out.device_ptr(), x.device_ptr(), mask.device_ptr());
    // Whole vectors per group: one thread and one decision per 16 bytes (the per-element kernel
    // is the reference variant, `MVAR_EW_KERNEL=scalar`).
    let width = vector_width(kind, n, &[po, px])
        .filter(|&w| group.is_multiple_of(w) && vector_kernels_enabled());
    let (name, items) = match width {
        Some(w) => (format!("mask_scale_vec_{}", kind.suffix()), n / w),
        None => (format!("mask_scale_{}", kind.suffix()), n),
    };
    let f = dev.function(&RANDOM, &name)?;
    let (nn, gg) = (items as i64, group as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po).arg(&px).arg(&pm).arg(&nn).arg(&gg).arg(&scale);
    // SAFETY: out and x hold n elements of `kind` (n / w aligned vectors for the vector kernel);
    // (n - 1) / group < mask.len() (checked above).
    unsafe { b.launch(launch_1d(items, THREADS)) }
        .map_err(launch_err(OP, format!("{n} elements, group {group}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keeps(k: u32, keep: f64) -> bool {
        (k as f64 + 0.5) * (1.0 / 16_777_216.0) < keep
    }

    #[test]
    fn threshold_agrees_with_the_f64_comparison() {
        for keep in [
            0.0,
            1e-9,
            0.5 / 16_777_216.0,
            0.5,
            0.1,
            0.7,
            1.0 - 1e-9,
            1.0,
            1.0 - 0.35,
            f64::NAN,
        ] {
            let t = keep_threshold(keep);
            assert!(t <= 1 << 24);
            // Every value below the threshold is kept, every value from it on is dropped.
            if t > 0 {
                assert!(keeps(t - 1, keep), "keep {keep}: t {t}");
                assert!(keeps(0, keep));
            }
            if t < 1 << 24 {
                assert!(!keeps(t, keep), "keep {keep}: t {t}");
                assert!(!keeps((1 << 24) - 1, keep));
            }
        }
        assert_eq!(keep_threshold(1.0), 1 << 24);
        assert_eq!(keep_threshold(0.0), 0);
        assert_eq!(keep_threshold(0.5), 1 << 23);
        // A full sweep for one awkward value.
        let keep = 1.0 - 0.3;
        let t = keep_threshold(keep);
        assert!((0..1u32 << 24).all(|k| keeps(k, keep) == (k < t)));
    }

    #[test]
    fn positions_and_reference_mask_follow_whole_blocks() {
        assert_eq!(blocks_for(0), 0);
        assert_eq!(blocks_for(1), 1);
        assert_eq!(blocks_for(4), 1);
        assert_eq!(blocks_for(5), 2);
        assert_eq!(draw_position(10, 0), (10, 0));
        assert_eq!(draw_position(10, 7), (11, 3));
        // A fake generator whose word q of block b is (b * 4 + q) << 8: the mask keeps exactly
        // the values whose position in the whole stream is below the threshold.
        let fake = |b: u64| std::array::from_fn(|q| ((b as u32) * 4 + q as u32) << 8);
        let mask = keep_mask_reference(3, 10, 17, fake);
        let want: Vec<u8> = (0..10u32).map(|i| (12 + i < 17) as u8).collect();
        assert_eq!(mask, want);
    }
}
