//! bf16 matrix products on the CPU with AVX512-BF16's `VDPBF16PS`, two bf16 multiply-adds per
//! f32 lane per instruction.
//!
//! Computes C[m, n] = A[m, k] B[k, n] for bf16 A and B with any row and column strides (so either
//! operand may be a transposed view), accumulated in f32 and rounded to bf16 once, round to
//! nearest even: the contract of the widened path (`run_float` widens bf16 to f32, runs the f32
//! GEMM and rounds the result), which is what CPUs without AVX512-BF16 run. On CPUs with it the
//! widened path costs an f32 product on twice the bytes; this one runs at about twice the f32
//! multiply-add rate (docs/performance.md).
//!
//! Layouts (BLIS-style packing; a "pair" is two consecutive k, the low half of a 32-bit word
//! holding the even one, as `VDPBF16PS` reads them):
//! - B is packed once per product into panels of [`NR`] = 32 columns: panel j holds, for each
//!   pair p, the 32 columns' words `[p][32]`, two 512-bit vectors. k is padded to even and the
//!   last panel's columns to 32 with zeros.
//! - A row-major A with an even k is read in place: row r's pair p is the 32-bit word at
//!   r * k / 2 + p, broadcast as it is ([`APanel`]); only a last, partial micro-panel is
//!   packed. Any other A (a transposed view, an odd k) is packed once per product into
//!   micro-panels of [`MR`] = 12 rows, `[p][12]` words, the last one's missing rows zero.
//! - The micro-kernel keeps a 12 x 32 block of C in 24 f32 vectors (24 of the 32 registers,
//!   with 2 for the B pair and 1 for the broadcast), and per pair issues 24 `VDPBF16PS`, 24
//!   independent chains to hide the instruction's latency.
//!
//! Parallel decomposition: the two packings run in parallel over their panels; then C is cut
//! into tiles of up to [`MC`] x [`NC`], each one rayon task with its own f32 accumulator tile
//! (reused per thread), rounded to bf16 into the output at the task's end. Inside a task
//! the k blocks of [`KC_PAIRS`] pairs go outermost (the f32 tile accumulates across them), then
//! the B panels (a 32-column, 256-k slice of packed B is 16 KiB and stays in L1 while every
//! micro-panel of A passes it), then the micro-panels of A (the tile's A block stays in L2).
//!
//! Numerics: `VDPBF16PS` adds, per lane, the odd element's product and then the even one's; a
//! product of two bf16 is exact in f32, and each add rounds to nearest even; denormal inputs and
//! results are flushed to zero. [`portable_kernel`] performs the same adds in the same order
//! (without the flush), so on normal values the two give the same bits; the tests hold the
//! AVX-512 kernel to it and it to the widened f32 path.

use half::bf16;
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

/// Rows of A (and of C) per micro-kernel call.
pub(crate) const MR: usize = 12;
/// Columns of B (and of C) per micro-kernel call: two vectors of 16 f32 lanes.
pub(crate) const NR: usize = 32;
/// k pairs per block: a B panel's slice of 128 pairs x 32 columns is 16 KiB.
const KC_PAIRS: usize = 128;
/// Rows of C per task (8 micro-panels; their slice of packed A for one k block is 48 KiB).
const MC: usize = 8 * MR;
/// Columns of C per task at most; narrower when that leaves too few tasks for the threads.
const NC: usize = 16 * NR;
/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 21;

/// A bf16 matrix with explicit strides (in elements): element (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    pub data: &'a [bf16],
    pub rs: usize,
    pub cs: usize,
}

impl Strided<'_> {
    /// Checks that every element of a `rows` x `cols` matrix lies in `data`, so the packing loops
    /// may index without bounds checks.
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(
                last < self.data.len(),
                "bf16 GEMM: {what} of {rows} x {cols} with strides ({}, {}) needs {} elements, \
                 has {}",
                self.rs,
                self.cs,
                last + 1,
                self.data.len()
            );
        }
    }

    /// The bits of element (r, c); the caller has run [`Strided::check`] over a range holding it.
    #[inline(always)]
    unsafe fn bits(&self, r: usize, c: usize) -> u32 {
        self.data.get_unchecked(r * self.rs + c * self.cs).to_bits() as u32
    }
}

/// Where a micro-kernel reads its MR rows of A: row r's pair p is the word at
/// `ptr + r * row_stride + p * pair_stride`. Packed micro-panels have strides (1, MR); a
/// row-major A with an even row length is read in place with (row length / 2, 1).
#[derive(Clone, Copy)]
pub(crate) struct APanel {
    pub ptr: *const u32,
    pub row_stride: usize,
    pub pair_stride: usize,
}

/// A micro-kernel: C[0..MR, 0..NR] (row stride `ldc`) = (C if `accumulate` else 0) + the product
/// of `pairs` pairs of A (see [`APanel`]) and of packed B words (`[p][NR]`).
pub(crate) type MicroKernel =
    unsafe fn(pairs: usize, a: APanel, b: *const u32, c: *mut f32, ldc: usize, accumulate: bool);

/// The AVX512-BF16 micro-kernel when this CPU has it, the vector loops are not capped below
/// AVX-512 (`MVAR_CPU_VECTORS`), and `MVAR_CPU_BF16_GEMM` is not `0` (which keeps the widened
/// f32 path, to compare the two). Checked once.
pub(crate) fn native_kernel() -> Option<MicroKernel> {
    static CHOSEN: std::sync::OnceLock<Option<MicroKernel>> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        if std::env::var("MVAR_CPU_BF16_GEMM").as_deref() == Ok("0") {
            return None;
        }
        avx512_bf16_kernel()
    })
}

/// The AVX512-BF16 micro-kernel if the CPU runs it (ignoring `MVAR_CPU_BF16_GEMM`; for tests).
pub(crate) fn avx512_bf16_kernel() -> Option<MicroKernel> {
    #[cfg(target_arch = "x86_64")]
    if crate::util::cpu_vectors() == crate::util::CpuVectors::Avx512
        && std::arch::is_x86_feature_detected!("avx512bf16")
    {
        return Some(kernel_avx512_bf16);
    }
    None
}

/// What `mvar info` reports for bf16 products on the CPU.
pub fn describe() -> &'static str {
    if native_kernel().is_some() {
        "AVX512-BF16 (VDPBF16PS)"
    } else {
        "widened to f32"
    }
}

/// The AVX512-BF16 micro-kernel: a copy for packed A and one for A read in place, so that
/// each has its strides as constants where it can.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel_avx512_bf16(
    pairs: usize,
    a: APanel,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    if a.pair_stride == 1 {
        avx512_bf16_body(pairs, a.ptr, a.row_stride, 1, b, c, ldc, accumulate)
    } else {
        debug_assert_eq!((a.row_stride, a.pair_stride), (1, MR));
        avx512_bf16_body(pairs, a.ptr, 1, MR, b, c, ldc, accumulate)
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn avx512_bf16_body(
    pairs: usize,
    a: *const u32,
    row_stride: usize,
    pair_stride: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    if accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            row[0] = _mm512_loadu_ps(c.add(r * ldc));
            row[1] = _mm512_loadu_ps(c.add(r * ldc + 16));
        }
    }
    for p in 0..pairs {
        let bp = b.add(p * NR) as *const __m512i;
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(1)));
        let ap = a.add(p * pair_stride);
        for (r, row) in acc.iter_mut().enumerate() {
            let word = ap.add(r * row_stride).read_unaligned();
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(word as i32));
            row[0] = _mm512_dpbf16_ps(row[0], av, b0);
            row[1] = _mm512_dpbf16_ps(row[1], av, b1);
        }
    }
    for (r, row) in acc.iter().enumerate() {
        _mm512_storeu_ps(c.add(r * ldc), row[0]);
        _mm512_storeu_ps(c.add(r * ldc + 16), row[1]);
    }
}

/// The micro-kernel's arithmetic in plain f32 (see the module docs): the reference the AVX-512
/// kernel is tested against, and with which the tests run the packing and tiling on every
/// machine.
///
/// # Safety
/// `a` reaches `pairs` pairs of MR rows, `b` holds `pairs * NR` words, and `c` rows `0..MR` of
/// `NR` floats at stride `ldc`.
#[cfg(test)]
pub(crate) unsafe fn portable_kernel(
    pairs: usize,
    a: APanel,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let even = |w: u32| f32::from_bits(w << 16);
    let odd = |w: u32| f32::from_bits(w & 0xffff_0000);
    for r in 0..MR {
        for col in 0..NR {
            let dst = c.add(r * ldc + col);
            let mut acc = if accumulate { *dst } else { 0.0 };
            for p in 0..pairs {
                let aw = a
                    .ptr
                    .add(r * a.row_stride + p * a.pair_stride)
                    .read_unaligned();
                let bw = *b.add(p * NR + col);
                acc += odd(aw) * odd(bw);
                acc += even(aw) * even(bw);
            }
            *dst = acc;
        }
    }
}

/// f32 to bf16, round to nearest even, NaN kept quiet: the bits `half::bf16::from_f32` gives,
/// in a form without branches, so the loop writing a tile vectorises.
#[inline(always)]
fn round_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet_nan = (bits >> 16) as u16 | 0x0040;
    if x.is_nan() {
        quiet_nan
    } else {
        rounded
    }
}

/// Packs an operand seen as `rows` x `k` (A itself; B through its transpose, so that B's
/// columns are the rows here) into panels of `width` rows, `[panel][pair][width]` words, the
/// last panel's missing rows and an odd k's last pair half zero. Groups of panels (about 128
/// rows) are packed in parallel when `parallel`, each in the widest vectors.
fn pack_panels(src: Strided<'_>, rows: usize, k: usize, width: usize, parallel: bool) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let panels = rows.div_ceil(width);
    let group = (256 / width).max(1);
    let mut packed = vec![0u32; panels * pairs * width];
    let fill = |(g, dst): (usize, &mut [u32])| {
        let first = g * group;
        let count = dst.len() / (pairs * width);
        crate::util::in_widest_vectors(
            #[inline(always)]
            || {
                if src.cs == 1 {
                    // A row's k are adjacent: each pair is one 32-bit read. Each panel is
                    // written in order, a word from each of its rows in turn.
                    for (i, dst) in dst.chunks_exact_mut(pairs * width).enumerate() {
                        let r0 = (first + i) * width;
                        let live = width.min(rows - r0);
                        pack_rows_of_adjacent_pairs(src, r0, live, k, width, dst);
                    }
                } else if src.rs == 1 {
                    // The rows are adjacent for each k: a pair interleaves two runs, read for
                    // the whole group at once (one run of a cache line or more per k).
                    for p in 0..pairs {
                        let k0 = 2 * p;
                        for (i, dst) in dst.chunks_exact_mut(pairs * width).enumerate() {
                            let r0 = (first + i) * width;
                            let live = width.min(rows - r0);
                            let lo = &src.data[k0 * src.cs + r0..][..live];
                            let words = &mut dst[p * width..][..live];
                            if k0 + 1 < k {
                                let hi = &src.data[(k0 + 1) * src.cs + r0..][..live];
                                for ((w, &l), &h) in words.iter_mut().zip(lo).zip(hi) {
                                    *w = l.to_bits() as u32 | (h.to_bits() as u32) << 16;
                                }
                            } else {
                                for (w, &l) in words.iter_mut().zip(lo) {
                                    *w = l.to_bits() as u32;
                                }
                            }
                        }
                    }
                } else {
                    for (i, dst) in dst.chunks_exact_mut(pairs * width).enumerate() {
                        let r0 = (first + i) * width;
                        for r in 0..width.min(rows - r0) {
                            for p in 0..pairs {
                                let k0 = 2 * p;
                                // SAFETY: row r0 + r < rows and k0 (+1) < k, inside `check`'s
                                // range.
                                let (lo, hi) = unsafe {
                                    let hi = if k0 + 1 < k {
                                        src.bits(r0 + r, k0 + 1)
                                    } else {
                                        0
                                    };
                                    (src.bits(r0 + r, k0), hi)
                                };
                                dst[p * width + r] = lo | hi << 16;
                            }
                        }
                    }
                }
                debug_assert!(count <= group);
            },
        )
    };
    if parallel {
        packed
            .par_chunks_mut(group * pairs * width)
            .enumerate()
            .for_each(fill);
    } else {
        packed
            .chunks_mut(group * pairs * width)
            .enumerate()
            .for_each(fill);
    }
    packed
}

/// One panel of [`pack_panels`] from rows whose k are adjacent (column stride 1).
#[inline(always)]
fn pack_rows_of_adjacent_pairs(
    src: Strided<'_>,
    r0: usize,
    live: usize,
    k: usize,
    width: usize,
    dst: &mut [u32],
) {
    let rows_of: Vec<&[bf16]> = (0..live)
        .map(|r| &src.data[(r0 + r) * src.rs..][..k])
        .collect();
    let whole = k / 2;
    for (p, words) in dst.chunks_exact_mut(width).take(whole).enumerate() {
        for (w, row) in words.iter_mut().zip(&rows_of) {
            // SAFETY: 2p + 1 < k = row.len(); an unaligned 32-bit read of the pair
            // (little-endian: the even k in the low half).
            *w = unsafe { (row.as_ptr().add(2 * p) as *const u32).read_unaligned() };
        }
    }
    if k % 2 == 1 {
        let words = &mut dst[whole * width..];
        for (w, row) in words.iter_mut().zip(&rows_of) {
            *w = row[k - 1].to_bits() as u32;
        }
    }
}

thread_local! {
    /// Each thread's f32 tile of C, kept between tasks and products.
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A pointer shared by the tasks: the output, each task writing its own tile, or A, read.
#[derive(Clone, Copy)]
struct SharedPtr(*mut bf16);
// SAFETY: tasks write disjoint tiles of the output and only read A, both of which outlive them.
unsafe impl Send for SharedPtr {}
unsafe impl Sync for SharedPtr {}

impl SharedPtr {
    /// The pointer (a method, so that closures capture the wrapper, not its field).
    fn get(self) -> *mut bf16 {
        self.0
    }
}

/// C = A B, C row-major m x n in `out`, with the given micro-kernel; on the rayon pool when
/// `parallel` and the product is large enough. Every element of `out` is written (the tiles
/// cover it; an empty k writes zeros), so it may start uninitialised.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: Strided<'_>,
    b: Strided<'_>,
    out: &mut [MaybeUninit<bf16>],
    kernel: MicroKernel,
    parallel: bool,
) {
    assert_eq!(out.len(), m * n, "bf16 GEMM: output of {m} x {n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(MaybeUninit::new(bf16::ZERO));
        return;
    }
    a.check(m, k, "A");
    b.check(k, n, "B");
    let parallel = parallel && m * n * k >= PARALLEL_MIN_MACS && rayon::current_num_threads() > 1;
    let pairs = k.div_ceil(2);
    // Each operand is packed once: A's micro-panels serve every column tile, B's panels every
    // row tile.
    // A row-major A with an even k (and rows of an even length) is read in place, but for a
    // last, partial micro-panel, which is packed with zero rows.
    let in_place = a.cs == 1 && k.is_multiple_of(2) && a.rs.is_multiple_of(2);
    let full_micros = if in_place { m / MR } else { 0 };
    let packed_a = if in_place {
        let tail_rows = m - full_micros * MR;
        let tail = Strided {
            data: &a.data[(full_micros * MR * a.rs).min(a.data.len())..],
            ..a
        };
        pack_panels(tail, tail_rows, k, MR, false)
    } else {
        pack_panels(a, m, k, MR, parallel)
    };
    let a_words = SharedPtr(a.data.as_ptr() as *mut bf16);
    let a_panel = |micro: usize, p0: usize| {
        if micro < full_micros {
            // SAFETY: rows micro*MR .. +MR < m of even length rs, whose words p0.. lie in A.
            APanel {
                ptr: unsafe { (a_words.get() as *const u32).add(micro * MR * (a.rs / 2) + p0) },
                row_stride: a.rs / 2,
                pair_stride: 1,
            }
        } else {
            let at = ((micro - full_micros) * pairs + p0) * MR;
            APanel {
                ptr: packed_a[at..].as_ptr(),
                row_stride: 1,
                pair_stride: MR,
            }
        }
    };
    let b_transposed = Strided {
        data: b.data,
        rs: b.cs,
        cs: b.rs,
    };
    let packed_b = pack_panels(b_transposed, n, k, NR, parallel);

    // Narrower column tiles when the rows alone give too few tasks (a short, wide product).
    let tiles_m = m.div_ceil(MC);
    let mut nc = NC;
    if parallel {
        let want = 4 * rayon::current_num_threads();
        while nc > NR && tiles_m * n.div_ceil(nc) < want {
            nc /= 2;
        }
    }
    let tiles_n = n.div_ceil(nc);
    let out_ptr = SharedPtr(out.as_mut_ptr() as *mut bf16);

    let task = |t: usize| {
        let (ti, tj) = (t / tiles_n, t % tiles_n);
        let (i0, j0) = (ti * MC, tj * nc);
        let (rows, cols) = (MC.min(m - i0), nc.min(n - j0));
        let micros = rows.div_ceil(MR);
        let panels = cols.div_ceil(NR);
        let ldc = panels * NR;
        TILE.with(|tile| {
            let tile = &mut *tile.borrow_mut();
            if tile.len() < micros * MR * ldc {
                tile.resize(micros * MR * ldc, 0.0);
            }
            let tile = &mut tile[..micros * MR * ldc];
            for (block, p0) in (0..pairs).step_by(KC_PAIRS).enumerate() {
                let count = KC_PAIRS.min(pairs - p0);
                for panel in 0..panels {
                    let b_slice = &packed_b[((j0 / NR + panel) * pairs + p0) * NR..];
                    for micro in 0..micros {
                        // SAFETY: A's panel and the B slice reach (at least) `count` pairs of
                        // their panels from p0 on, and the tile rows micro*MR .. +MR hold NR
                        // floats from column panel*NR, within ldc.
                        unsafe {
                            kernel(
                                count,
                                a_panel(i0 / MR + micro, p0),
                                b_slice.as_ptr(),
                                tile.as_mut_ptr().add(micro * MR * ldc + panel * NR),
                                ldc,
                                block > 0,
                            );
                        }
                    }
                }
            }
            crate::util::in_widest_vectors(
                #[inline(always)]
                || {
                    for r in 0..rows {
                        let src = &tile[r * ldc..r * ldc + cols];
                        // SAFETY: row i0 + r < m and columns j0 .. j0 + cols <= n of the m x n
                        // output; no other task writes this tile.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                out_ptr.get().add((i0 + r) * n + j0),
                                cols,
                            )
                        };
                        for (o, &v) in dst.iter_mut().zip(src) {
                            *o = bf16::from_bits(round_to_bf16(v));
                        }
                    }
                },
            )
        });
    };
    let tasks = tiles_m * tiles_n;
    if parallel {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn rounding_matches_half() {
        let mut seed = 7;
        let mut values: Vec<f32> = (0..20_000).map(|_| lcg(&mut seed) * 1e3).collect();
        values.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x3f80_8000), // a tie, even below: rounds down
            f32::from_bits(0x3f81_8000), // a tie, odd below: rounds up
            f32::from_bits(0x3f80_8001),
            f32::from_bits(0x7f7f_ffff),
        ]);
        for x in values {
            assert_eq!(
                round_to_bf16(x),
                bf16::from_f32(x).to_bits(),
                "{x:e} ({:#x})",
                x.to_bits()
            );
        }
    }

    /// The AVX-512 micro-kernel gives the portable one's bits on normal values, accumulating or
    /// not, for pair counts around the unrolled loop's.
    #[test]
    fn avx512_kernel_matches_the_portable_one() {
        let Some(native) = avx512_bf16_kernel() else {
            eprintln!(
                "this CPU has no AVX512-BF16; the portable kernel is checked by the matmul tests"
            );
            return;
        };
        let mut seed = 11;
        for pairs in [1, 2, 7, 64, 129] {
            let word = |seed: &mut u64| {
                let lo = bf16::from_f32(lcg(seed) * 4.0).to_bits() as u32;
                let hi = bf16::from_f32(lcg(seed) * 4.0).to_bits() as u32;
                lo | hi << 16
            };
            let a: Vec<u32> = (0..pairs * MR).map(|_| word(&mut seed)).collect();
            let b: Vec<u32> = (0..pairs * NR).map(|_| word(&mut seed)).collect();
            let ldc = NR + 5;
            let start: Vec<f32> = (0..MR * ldc).map(|_| lcg(&mut seed)).collect();
            for accumulate in [false, true] {
                // The packed layout, and the same words read in place from rows of
                // pairs + 3 words.
                let packed = APanel {
                    ptr: a.as_ptr(),
                    row_stride: 1,
                    pair_stride: MR,
                };
                let words = &a;
                let in_place: Vec<u32> = (0..MR)
                    .flat_map(|r| {
                        (0..pairs + 3).map(move |p| {
                            if p < pairs {
                                words[p * MR + r]
                            } else {
                                0x7fc0_7fc0
                            }
                        })
                    })
                    .collect();
                let rows = APanel {
                    ptr: in_place.as_ptr(),
                    row_stride: pairs + 3,
                    pair_stride: 1,
                };
                let mut want = start.clone();
                unsafe {
                    portable_kernel(
                        pairs,
                        packed,
                        b.as_ptr(),
                        want.as_mut_ptr(),
                        ldc,
                        accumulate,
                    )
                };
                let mut same = true;
                for panel in [packed, rows] {
                    let mut got = start.clone();
                    unsafe { native(pairs, panel, b.as_ptr(), got.as_mut_ptr(), ldc, accumulate) };
                    same &= want
                        .iter()
                        .zip(&got)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                }
                assert!(same, "pairs {pairs}, accumulate {accumulate}");
            }
        }
    }

    /// A matrix of `rows` x `cols` bf16 values, stored transposed when `transposed`, with its
    /// strides; `integers` draws from -4..=4 (products and sums exact in f32), else from
    /// (-1, 1) scaled by `scale`.
    fn matrix(
        rows: usize,
        cols: usize,
        transposed: bool,
        integers: bool,
        seed: &mut u64,
    ) -> (Vec<bf16>, usize, usize) {
        let data = (0..rows * cols)
            .map(|_| {
                let x = lcg(seed);
                bf16::from_f32(if integers { (x * 4.5).round() } else { x })
            })
            .collect();
        if transposed {
            (data, 1, rows)
        } else {
            (data, cols, 1)
        }
    }

    /// The [`Strided`] view of a [`matrix`].
    fn view(owned: &(Vec<bf16>, usize, usize)) -> Strided<'_> {
        Strided {
            data: &owned.0,
            rs: owned.1,
            cs: owned.2,
        }
    }

    fn run(
        m: usize,
        n: usize,
        k: usize,
        a: Strided<'_>,
        b: Strided<'_>,
        kernel: MicroKernel,
        parallel: bool,
    ) -> Vec<bf16> {
        // Not a value any product here gives, so an element left unwritten shows.
        let mut out = vec![MaybeUninit::new(bf16::from_f32(7.0)); m * n];
        gemm(m, n, k, a, b, &mut out, kernel, parallel);
        // SAFETY: initialised above (and written over by the GEMM).
        out.into_iter()
            .map(|v| unsafe { v.assume_init() })
            .collect()
    }

    /// Geometries around the tile sizes: rows around MR and MC, columns around NR and NC, k odd
    /// and across KC blocks, either operand transposed, one thread or the pool.
    const CASES: [(usize, usize, usize, bool, bool); 8] = [
        (1, 1, 1, false, false),
        (5, 7, 3, true, false),
        (12, 32, 2, false, true),
        (13, 33, 257, true, true),
        (97, 65, 300, false, true),
        (40, 530, 513, false, false),
        (200, 40, 64, true, false),
        (3, 1100, 31, false, true),
    ];

    /// With integer values every product and partial sum is exact in f32, so the tiled product
    /// must give exactly the f64 reference rounded to bf16; with real values it must be within
    /// f32 rounding of it (before the final bf16 rounding, which may then differ by one step).
    #[test]
    fn tiled_products_match_the_reference() {
        let mut seed = 3;
        for (m, n, k, ta, tb) in CASES {
            for integers in [true, false] {
                let (a_owned, b_owned) = (
                    matrix(m, k, ta, integers, &mut seed),
                    matrix(k, n, tb, integers, &mut seed),
                );
                let (a, b) = (view(&a_owned), view(&b_owned));
                for parallel in [false, true] {
                    let got = run(m, n, k, a, b, portable_kernel, parallel);
                    for i in 0..m {
                        for j in 0..n {
                            let (mut want, mut mag) = (0.0f64, 0.0f64);
                            for l in 0..k {
                                let (x, y) = unsafe { (a.bits(i, l), b.bits(l, j)) };
                                let p =
                                    f32::from_bits(x << 16) as f64 * f32::from_bits(y << 16) as f64;
                                want += p;
                                mag += p.abs();
                            }
                            let g = got[i * n + j];
                            let case = format!("{m}x{n}x{k} ta {ta} tb {tb} integers {integers} parallel {parallel} at ({i}, {j})");
                            if integers {
                                assert_eq!(g, bf16::from_f32(want as f32), "{case}");
                            } else {
                                let tol = mag * k as f64 * f32::EPSILON as f64 + want.abs() / 128.0;
                                assert!((g.to_f64() - want).abs() <= tol, "{case}: {g} vs {want}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Operands with no unit stride (every other element of a transposed layout) take the
    /// packing's general path, to the same result as contiguous copies of them.
    #[test]
    fn operands_without_a_unit_stride() {
        let mut seed = 9;
        let (m, n, k) = (14, 35, 9);
        let wide: Vec<bf16> = (0..2 * m * k)
            .map(|_| bf16::from_f32(lcg(&mut seed)))
            .collect();
        let a = Strided {
            data: &wide,
            rs: 2,
            cs: 2 * m,
        };
        let compact: Vec<bf16> = (0..m * k)
            .map(|i| wide[2 * ((i % k) * m + i / k)])
            .collect();
        let (bv, b_rs, b_cs) = matrix(k, n, false, false, &mut seed);
        let b = Strided {
            data: &bv,
            rs: b_rs,
            cs: b_cs,
        };
        let want = run(
            m,
            n,
            k,
            Strided {
                data: &compact,
                rs: k,
                cs: 1,
            },
            b,
            portable_kernel,
            false,
        );
        assert!(run(m, n, k, a, b, portable_kernel, false) == want);
        let b_wide: Vec<bf16> = bv.iter().flat_map(|&x| [x, bf16::from_f32(99.0)]).collect();
        let b = Strided {
            data: &b_wide,
            rs: 2 * n,
            cs: 2,
        };
        assert!(
            run(
                m,
                n,
                k,
                Strided {
                    data: &compact,
                    rs: k,
                    cs: 1
                },
                b,
                portable_kernel,
                false
            ) == want
        );
    }

    /// The whole product with the AVX-512 kernel gives the portable kernel's bits.
    #[test]
    fn avx512_products_match_the_portable_kernel() {
        let Some(native) = avx512_bf16_kernel() else {
            eprintln!("this CPU has no AVX512-BF16: nothing to compare");
            return;
        };
        let mut seed = 5;
        for (m, n, k, ta, tb) in CASES {
            let (a_owned, b_owned) = (
                matrix(m, k, ta, false, &mut seed),
                matrix(k, n, tb, false, &mut seed),
            );
            let (a, b) = (view(&a_owned), view(&b_owned));
            let want = run(m, n, k, a, b, portable_kernel, false);
            let got = run(m, n, k, a, b, native, true);
            assert!(want == got, "{m}x{n}x{k} ta {ta} tb {tb}");
        }
    }
}
