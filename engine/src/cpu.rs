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
/// straight back to the kernel and trims the free memory at the heap top once it passes twice
/// that, so the next allocation of that size page-faults on every 4 KiB page. A training step
/// frees and re-allocates hundreds of multi-MB tensors: on the 2-vCPU CI machine this was half of
/// a 3x3 conv's forward + backward at \[32,32,32,32\] (38.8 -> 20.9 ms) and raised the demo
/// tokenizer from 2.9-3.4 to 3.6-3.7 steps/s and MVAR-d4 by 3-6 %, with 3x less system time.
/// Blocks of 32 MiB and more (glibc's largest threshold) were still mapped and unmapped one by
/// one: an f32 add of a bias to \[2048,4096\] (VAR-d16's MLP during sampling) took 12 ms, 10x its
/// time with the block reused, so no block is mapped on its own any more (`M_MMAP_MAX` 0);
/// VAR-d16 sampling on the CPU went from 11.1 to 9.6 s a batch, with the same peak memory.
/// The heap top is never trimmed: a trim threshold is when glibc trims, not how much it keeps
/// (it trims down to a small pad), so a threshold of 256 MiB still gave back and faulted in
/// again most of each step's activations once they passed it: an MVAR-d4 step at batch 32
/// (1 GiB of activations) ran 0.74-0.96 s with 0.34-4.0 M page faults a run (as the free
/// blocks fell), 0.74-0.76 s with 0.34 M without trimming (docs/performance.md). The process then holds its peak heap until it
/// exits, as a caching allocator would; the peak itself is unchanged.
/// `MVAR_MALLOC_TUNING=0` leaves malloc as it is; other C libraries are left alone.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if std::env::var("MVAR_MALLOC_TUNING").as_deref() != Ok("0") {
            // glibc's largest mmap threshold (where M_MMAP_MAX 0 below has no effect).
            const MMAP_THRESHOLD: libc::c_int = 32 << 20;
            // glibc's "never trim" (mallopt(3)): freed memory at a heap top stays mapped.
            const TRIM_NEVER: libc::c_int = -1;
            // SAFETY: mallopt only changes malloc's parameters, and every value is one it documents.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_NEVER);
                // Every block from the arenas' heaps; a thread arena's heap holds at most 64
                // MiB, and glibc serves a larger request from the main arena.
                libc::mallopt(libc::M_MMAP_MAX, 0);
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
                .map(|v| CpuStorage::BF16(narrow_to_bf16(&v)))
                .collect())
        }
        DType::I64 | DType::U8 => unreachable!("checked above"),
    }
}

/// The vector instruction sets the CPU loops (here and in mvar-ops) are compiled for, widest
/// last. The builds target baseline x86-64, whose vectors are SSE2's 4 f32 lanes; the map loops and the closures
/// run through [`in_widest_vectors`] also have copies compiled for AVX2 (8 lanes) and AVX-512
/// (16 lanes), and the widest the CPU has runs. Every copy performs the same IEEE operations in
/// the same order (Rust never fuses a * b + c into an FMA on its own, and the loops' reductions
/// keep their lanes explicitly: mvar-ops' `lane_sum`), so results are bitwise the same on every machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuVectors {
    /// SSE2, what every x86-64 has (and the only copy off x86-64).
    Baseline,
    Avx2,
    Avx512,
}

impl CpuVectors {
    pub fn name(self) -> &'static str {
        match self {
            CpuVectors::Baseline => "baseline",
            CpuVectors::Avx2 => "avx2",
            CpuVectors::Avx512 => "avx512",
        }
    }

    /// The widest the CPU runs.
    pub fn detected() -> CpuVectors {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return CpuVectors::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return CpuVectors::Avx2;
            }
        }
        CpuVectors::Baseline
    }
}

/// The copy of the vector loops that runs here (checked once): the widest the CPU has, capped
/// by `MVAR_CPU_VECTORS` (`baseline`, `avx2` or `avx512`; to compare them in benchmarks).
/// Matrix products are the `gemm` crate's, which picks its own kernels (AVX-512 where present).
pub fn cpu_vectors() -> CpuVectors {
    static CHOSEN: std::sync::OnceLock<CpuVectors> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let detected = CpuVectors::detected();
        let cap = match std::env::var("MVAR_CPU_VECTORS").as_deref() {
            Ok("baseline") => CpuVectors::Baseline,
            Ok("avx2") => CpuVectors::Avx2,
            Ok("avx512") | Err(_) => CpuVectors::Avx512,
            Ok(other) => {
                // A typo must not silently change what a benchmark measures; this runs inside
                // ops that return no error for it, so it says so once and keeps the widest.
                eprintln!(
                    "warning: MVAR_CPU_VECTORS={other:?} is not one of baseline, avx2, avx512; \
                     using the widest the CPU has ({})",
                    detected.name()
                );
                CpuVectors::Avx512
            }
        };
        detected.min(cap)
    })
}

/// Runs `f` compiled for the widest vectors the CPU has (see [`cpu_vectors`]): loops inlined
/// into `f` (mark a closure `#[inline(always)]`) then use 16- or 8-lane vectors; the same
/// operations in the same order either way, so the results are the same.
#[inline(always)]
pub fn in_widest_vectors<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    match cpu_vectors() {
        // SAFETY: the CPU has AVX-512F (checked at run time).
        CpuVectors::Avx512 => return unsafe { with_avx512(f) },
        // SAFETY: the CPU has AVX2 (checked at run time).
        CpuVectors::Avx2 => return unsafe { with_avx2(f) },
        CpuVectors::Baseline => {}
    }
    f()
}

/// `f` compiled for AVX2 (what [`in_widest_vectors`] runs on such a CPU; public for the tests
/// that compare the copies).
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `f` compiled for AVX-512F (see [`with_avx2`]).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// bf16 to f32: exact, and a NaN comes out quiet, the bits `half::bf16::to_f32` gives; without
/// branches, so that the loops over it vectorise.
#[inline(always)]
pub fn bf16_to_f32(x: bf16) -> f32 {
    let bits = x.to_bits();
    let wide = (bits as u32) << 16;
    let nan = bits & 0x7fff > 0x7f80;
    f32::from_bits(if nan { wide | 0x0040_0000 } else { wide })
}

/// f32 to bf16, round to nearest even, a NaN kept quiet: the bits `half::bf16::from_f32` gives,
/// without branches (see [`bf16_to_f32`]).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> bf16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet_nan = (bits >> 16) as u16 | 0x0040;
    bf16::from_bits(if x.is_nan() { quiet_nan } else { rounded })
}

/// Conversions of whole slices run in parallel pieces of this many elements (memory-bound
/// loops: the second core adds bandwidth).
const CONVERT_PIECE: usize = 1 << 16;

/// `f` over `src` into a new vector, in the widest vectors and in parallel pieces.
fn convert_slice<A: Copy + Sync, B: Copy + Send>(src: &[A], f: impl Fn(A) -> B + Sync) -> Vec<B> {
    use rayon::prelude::*;
    let mut out: Vec<B> = Vec::with_capacity(src.len());
    let piece = |(dst, s): (&mut [std::mem::MaybeUninit<B>], &[A])| {
        in_widest_vectors(
            #[inline(always)]
            || {
                for (d, &x) in dst.iter_mut().zip(s) {
                    d.write(f(x));
                }
            },
        )
    };
    let spare = &mut out.spare_capacity_mut()[..src.len()];
    if src.len() >= 2 * CONVERT_PIECE {
        spare
            .par_chunks_mut(CONVERT_PIECE)
            .zip(src.par_chunks(CONVERT_PIECE))
            .for_each(piece);
    } else {
        piece((spare, src));
    }
    // SAFETY: every element below src.len() was written above.
    unsafe { out.set_len(src.len()) };
    out
}

/// `xs` (each [outer, sizes\[i\], inner], row-major) concatenated along their middle axis: the
/// concat op's CPU kernel and the tape's join of a split's gradients. One thread: the copies
/// are memory-bound, and splitting them over the two vCPUs of the machines measured gained
/// nothing (docs/performance.md, 2026-12-07 (6)).
pub fn concat_along<T: Copy>(xs: &[&[T]], outer: usize, sizes: &[usize], inner: usize) -> Vec<T> {
    let total: usize = sizes.iter().sum();
    let mut out = Vec::with_capacity(outer * total * inner);
    for o in 0..outer {
        for (x, &n) in xs.iter().zip(sizes) {
            out.extend_from_slice(&x[o * n * inner..(o + 1) * n * inner]);
        }
    }
    out
}

/// Every element of a bf16 slice as f32 ([`bf16_to_f32`]).
pub fn widen_bf16(src: &[bf16]) -> Vec<f32> {
    convert_slice(src, bf16_to_f32)
}

/// Every element of an f32 slice rounded to bf16 ([`f32_to_bf16`]).
pub fn narrow_to_bf16(src: &[f32]) -> Vec<bf16> {
    convert_slice(src, f32_to_bf16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The branch-free conversions give half's bits on every bf16 and on f32 values around
    /// every rounding case (ties, carries into the exponent, infinities, NaNs, denormals).
    #[test]
    fn conversions_match_half() {
        for bits in 0..=u16::MAX {
            let x = bf16::from_bits(bits);
            assert_eq!(bf16_to_f32(x).to_bits(), x.to_f32().to_bits(), "{bits:#x}");
        }
        let mut values: Vec<f32> = Vec::new();
        for hi in (0..=u16::MAX).step_by(3) {
            for lo in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff, 0x1234] {
                values.push(f32::from_bits((hi as u32) << 16 | lo));
            }
        }
        values.extend([
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::NAN,
            -f32::NAN,
        ]);
        for &x in &values {
            assert_eq!(
                f32_to_bf16(x).to_bits(),
                bf16::from_f32(x).to_bits(),
                "{:#x}",
                x.to_bits()
            );
        }
        let narrowed = narrow_to_bf16(&values);
        let widened = widen_bf16(&narrowed);
        for ((x, n), w) in values.iter().zip(&narrowed).zip(&widened) {
            assert_eq!(n.to_bits(), bf16::from_f32(*x).to_bits());
            assert_eq!(w.to_bits(), n.to_f32().to_bits());
        }
        assert!(
            values.len() > 2 * CONVERT_PIECE,
            "the parallel pieces are exercised"
        );
    }
}
