//! Winograd F(2x2, 3x3) for the CPU's stride-1 3x3 convolutions (Lavin and Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2016).
//!
//! What it computes: the same y as the im2col path (see the parent module), for kh = kw = 3,
//! stride 1 and any zero padding. The output is cut into 2x2 tiles; tile (ty, tx) of sample n
//! reads the 4x4 input patch d whose top-left corner is (2ty - top, 2tx - left), zero outside the
//! image. With U = G g G^T (per output and input channel, from the 3x3 weight g), V = B^T d B
//! (per input channel and tile) and
//!
//!   M[xi][co][t] = sum_ci U[xi][co][ci] * V[xi][ci][t]      for each of the 16 positions xi,
//!
//! the tile's outputs are A^T M A (+ bias), where
//!
//!   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],
//!   A^T = [1 1 1 0; 0 1 -1 -1].
//!
//! Why: a 2x2 tile costs 16 multiply-adds per channel pair instead of 36, so the GEMMs do 2.25x
//! fewer FLOPs than im2col's. The transforms only add and halve, so the rounding stays close to
//! the direct sum's (the tests hold f64 to 1e-12 of the direct loops).
//!
//! Layouts: U [16][Cout][Cin] (once per call); per chunk of tiles V [16][Cin][tc] and
//! M [16][Cout'][tc], tc the chunk's tiles, Cout' the task's output channels.
//!
//! Gradients: dx is the forward of the transposed conv (the parent module builds its geometry
//! and flipped weight), so it runs through [`forward`]. dW ([`weight_grad`]) is the adjoint of
//! the forward: per tile dM = A dY A^T, dU[xi] = sum over tiles of dM[xi] V[xi]^T, then
//! dW = G^T dU G.
//!
//! Parallel decomposition: a batch with at least as many samples as threads gives each task a
//! contiguous range of samples (all output channels); a smaller batch runs its samples in turn
//! and splits the output channels across the tasks (each task transforms the whole input, which
//! costs 1/Cout' of its GEMM work). Either way a task owns a contiguous slice of y. Inside a task
//! the tiles go in chunks of whole tile rows (possibly spanning samples) sized so that V and M stay
//! in the core's L2 cache, and the 16 GEMMs of a chunk are single-threaded. The weight gradient's
//! tasks split the same way: sample ranges, whose partial dU are summed in task order, or output
//! channel ranges over the whole batch, each writing its rows of dU. Results are the same from
//! run to run for a given thread count; another thread count may round differently.

use gemm::Parallelism;
use mvar_engine::Float;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{gemm_into, ConvGeom, SMALL_CONV_FLOPS};
use crate::util::in_widest_vectors;

/// Channels on each side below which im2col is as fast: the 16 GEMMs get too thin.
const MIN_CHANNELS: usize = 8;

/// Elements of V plus M per chunk (512 KiB of f32): small enough for L2 next to U.
const CHUNK_ELEMS: usize = 1 << 17;

/// Off only where a benchmark compares the two paths (see [`super::set_cpu_winograd`]).
pub(super) static ENABLED: AtomicBool = AtomicBool::new(true);

/// Whether the conv of geometry `g` runs as Winograd F(2x2, 3x3) on the CPU.
pub(super) fn applies(g: &ConvGeom) -> bool {
    ENABLED.load(Ordering::Relaxed)
        && g.kh == 3
        && g.kw == 3
        && g.sh == 1
        && g.sw == 1
        && g.cin >= MIN_CHANNELS
        && g.cout >= MIN_CHANNELS
}

/// U = G g G^T for every (co, ci): w [Cout, Cin, 3, 3] -> [16][Cout][Cin].
///
/// Computed for a block of channel pairs at a time into a small buffer, then copied to the 16
/// planes: writing each pair's 16 values straight into planes Cout * Cin elements apart put
/// 16 store streams on the same L1 sets (planes of 64 x 64 f32 are 16 KiB apart), which took
/// 10-15 % of a [16, 64, 8, 8] forward.
fn transform_weight<T: Float>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    const BLOCK: usize = 64;
    let half = T::from_f32(0.5);
    let plane = g.cout * g.cin;
    let mut u = vec![T::zero(); 16 * plane];
    let mut block = [[T::zero(); BLOCK]; 16];
    // Rows of G applied to a 3-vector (g0, g1, g2).
    let lift = |a: T, b: T, c: T| [a, (a + b + c) * half, (a - b + c) * half, c];
    for k0 in (0..plane).step_by(BLOCK) {
        let kn = BLOCK.min(plane - k0);
        for (j, g3) in w[9 * k0..][..9 * kn].chunks_exact(9).enumerate() {
            let rows = [0, 1, 2].map(|r| lift(g3[3 * r], g3[3 * r + 1], g3[3 * r + 2]));
            for col in 0..4 {
                let out = lift(rows[0][col], rows[1][col], rows[2][col]);
                for (row, &v) in out.iter().enumerate() {
                    block[row * 4 + col][j] = v;
                }
            }
        }
        for (xi, values) in block.iter().enumerate() {
            u[xi * plane + k0..][..kn].copy_from_slice(&values[..kn]);
        }
    }
    u
}

/// Tile counts and chunking of one conv.
struct Tiling {
    tiles_y: usize,
    tiles_x: usize,
    /// Tile rows per chunk.
    rows_per_chunk: usize,
    /// Half the padded input row a tile row reads (2 * tiles_x + 2 columns): tiles_x + 1.
    half: usize,
}

impl Tiling {
    fn new(g: &ConvGeom) -> Self {
        let (tiles_y, tiles_x) = (g.ho.div_ceil(2), g.wo.div_ceil(2));
        let target = (CHUNK_ELEMS / (16 * (g.cin + g.cout))).clamp(32, 1024);
        Tiling {
            tiles_y,
            tiles_x,
            rows_per_chunk: (target / tiles_x).max(1),
            half: tiles_x + 1,
        }
    }

    fn chunk_tiles(&self) -> usize {
        self.rows_per_chunk * self.tiles_x
    }
}

/// One task's scratch buffers.
struct Scratch<T> {
    v: Vec<T>,
    m: Vec<T>,
    /// Row buffers of the transforms: 16 per tile plus one padded input row and its even and
    /// odd halves for the input transform, 12 per tile for the output transform and for dY in
    /// the weight gradient.
    rows: Vec<T>,
}

/// y = conv(x, w) + bias for the whole batch: x [N, Cin, H, W], y [N, Cout, Ho, Wo]. Every
/// element of y is written (once), so y may start uninitialised (`util::written_vec`).
pub(super) fn forward<T: Float>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    y: &mut [MaybeUninit<T>],
) {
    // Every element of a y of exactly this length is written; a longer one would keep an
    // uninitialised tail.
    assert_eq!(y.len(), g.n * g.y_len(), "winograd::forward: output length");
    let u = transform_weight(g, w);
    let tiling = Tiling::new(g);
    let threads = rayon::current_num_threads().max(1);
    let flops = g.n * g.y_len() * g.k();
    let scratch = |cout: usize| Scratch {
        v: vec![T::zero(); 16 * g.cin * tiling.chunk_tiles()],
        m: vec![T::zero(); 16 * cout * tiling.chunk_tiles()],
        rows: vec![T::zero(); 16 * tiling.chunk_tiles() + 4 * tiling.half],
    };
    let conv = WinogradConv {
        g,
        x,
        u: &u,
        bias,
        tiling: &tiling,
    };
    let y_len = g.y_len();
    if threads == 1 || flops < SMALL_CONV_FLOPS {
        conv.samples(0..g.n, 0..g.cout, y, &mut scratch(g.cout));
    } else if g.n >= threads {
        let per_task = g.n.div_ceil(threads);
        y.par_chunks_mut(per_task * y_len)
            .enumerate()
            .for_each_init(
                || scratch(g.cout),
                |s, (ti, out)| {
                    let first = ti * per_task;
                    conv.samples(first..first + out.len() / y_len, 0..g.cout, out, s);
                },
            );
    } else {
        let per_task = g.cout.div_ceil(threads);
        let p = g.p();
        for (ni, ys) in y.chunks_mut(y_len).enumerate() {
            ys.par_chunks_mut(per_task * p).enumerate().for_each_init(
                || scratch(per_task),
                |s, (ti, out)| {
                    let c0 = ti * per_task;
                    conv.samples(ni..ni + 1, c0..c0 + out.len() / p, out, s);
                },
            );
        }
    }
}

struct WinogradConv<'a, T> {
    g: &'a ConvGeom,
    x: &'a [T],
    u: &'a [T],
    bias: Option<&'a [T]>,
    tiling: &'a Tiling,
}

impl<T: Float> WinogradConv<'_, T> {
    /// Output channels `cos` of samples `samples` into `out`, laid out [samples][cos][Ho * Wo],
    /// every element of it written.
    fn samples(
        &self,
        samples: std::ops::Range<usize>,
        cos: std::ops::Range<usize>,
        out: &mut [MaybeUninit<T>],
        s: &mut Scratch<T>,
    ) {
        let ty_n = self.tiling.tiles_y;
        let (r0, r1) = (samples.start * ty_n, samples.end * ty_n);
        for c0 in (r0..r1).step_by(self.tiling.rows_per_chunk) {
            let rows = c0..r1.min(c0 + self.tiling.rows_per_chunk);
            in_widest_vectors(
                #[inline(always)]
                || self.chunk_body(rows, samples.start, &cos, out, s),
            );
        }
    }

    /// One chunk of global tile rows (row r = sample r / tiles_y, tile row r % tiles_y); runs
    /// inside [`in_widest_vectors`].
    #[inline(always)]
    fn chunk_body(
        &self,
        rows: std::ops::Range<usize>,
        first_sample: usize,
        cos: &std::ops::Range<usize>,
        out: &mut [MaybeUninit<T>],
        s: &mut Scratch<T>,
    ) {
        let (g, t) = (self.g, self.tiling);
        let nx = t.tiles_x;
        let tc = self.transform_inputs(&rows, s);
        let ncos = cos.len();
        let (v, m) = (&s.v[..16 * g.cin * tc], &mut s.m[..16 * ncos * tc]);
        for xi in 0..16 {
            // SAFETY: U[xi] rows cos are [ncos, Cin] row-major inside u; V[xi] is [Cin, tc] and
            // M[xi] [ncos, tc], both row-major inside their chunk-sized buffers, which are
            // separate from each other and from u.
            unsafe {
                gemm_into(
                    ncos,
                    tc,
                    g.cin,
                    m[xi * ncos * tc..].as_mut_ptr(),
                    tc,
                    false,
                    (
                        self.u[(xi * g.cout + cos.start) * g.cin..].as_ptr(),
                        1,
                        g.cin as isize,
                    ),
                    (v[xi * g.cin * tc..].as_ptr(), 1, tc as isize),
                    Parallelism::None,
                );
            }
        }
        let p = g.p();
        // sums[4i + c] = row i of A^T M at tile column c; then [even, odd] of output row i.
        let (sums, rest) = s.rows.split_at_mut(8 * tc);
        let (outs, _) = rest.split_at_mut(4 * tc);
        for (ci, co) in cos.clone().enumerate() {
            let bias = self.bias.map_or(T::zero(), |b| b[co]);
            let mx = |xi: usize| &m[(xi * ncos + ci) * tc..][..tc];
            // A^T M over all the chunk's tiles at once (long loops that vectorise).
            for c in 0..4 {
                let (a, b, d, e) = (mx(c), mx(4 + c), mx(8 + c), mx(12 + c));
                let (s0, s1) = sums[c * tc..].split_at_mut(4 * tc);
                for (((o, &a), &b), &d) in s0[..tc].iter_mut().zip(a).zip(b).zip(d) {
                    *o = a + b + d;
                }
                for (((o, &b), &d), &e) in s1[..tc].iter_mut().zip(b).zip(d).zip(e) {
                    *o = b - d - e;
                }
            }
            // (A^T M) A: the even (2tx) and odd (2tx + 1) output columns of rows 0 and 1.
            for i in 0..2 {
                let sc = |c: usize| &sums[(4 * i + c) * tc..][..tc];
                let (s0, s1, s2, s3) = (sc(0), sc(1), sc(2), sc(3));
                let (even, odd) = outs[2 * i * tc..][..2 * tc].split_at_mut(tc);
                for (((o, &a), &b), &c) in even.iter_mut().zip(s0).zip(s1).zip(s2) {
                    *o = bias + a + b + c;
                }
                for (((o, &b), &c), &d) in odd.iter_mut().zip(s1).zip(s2).zip(s3) {
                    *o = bias + b - c - d;
                }
            }
            // Interleave into the output rows: the chunk's tile rows cover output rows 2 ty and
            // 2 ty + 1 (< Ho), its nx = ceil(Wo / 2) tiles every column, so each output element
            // of these channels is written here once.
            with_row_widths(
                nx,
                g.wo,
                0,
                #[inline(always)]
                |nx, wo, _| {
                    for (ri, r) in rows.clone().enumerate() {
                        let (n, ty) = (r / t.tiles_y, r % t.tiles_y);
                        let plane = &mut out[((n - first_sample) * ncos + ci) * p..][..p];
                        for i in 0..2 {
                            let oy = 2 * ty + i;
                            if oy >= g.ho {
                                break;
                            }
                            let even = &outs[2 * i * tc + ri * nx..][..nx];
                            let odd = &outs[(2 * i + 1) * tc + ri * nx..][..nx];
                            let row = &mut plane[oy * wo..][..wo];
                            let mut pairs = row.chunks_exact_mut(2);
                            for (pair, (&e, &o)) in (&mut pairs).zip(even.iter().zip(odd)) {
                                pair[0].write(e);
                                pair[1].write(o);
                            }
                            if let [last] = pairs.into_remainder() {
                                last.write(even[nx - 1]);
                            }
                        }
                    }
                },
            );
        }
    }

    /// V = B^T d B of every input channel over the chunk's tile rows, into `s.v`; returns the
    /// chunk's tile count tc.
    #[inline(always)]
    fn transform_inputs(&self, rows: &std::ops::Range<usize>, s: &mut Scratch<T>) -> usize {
        let tc = rows.len() * self.tiling.tiles_x;
        let v = &mut s.v[..16 * self.g.cin * tc];
        for ci in 0..self.g.cin {
            self.input_transform(rows, ci, tc, v, &mut s.rows);
        }
        tc
    }

    /// V = B^T d B for input channel `ci` and every tile of the chunk's tile rows, written to
    /// V[.][ci][0..tc] (V is [16][Cin][tc]).
    ///
    /// Tile tx of a tile row reads padded columns 2tx, 2tx + 1, 2tx + 2, 2tx + 3 of its four
    /// input rows. Those are first gathered into 16 arrays raw[a][k] over the chunk's tiles (a the
    /// input row, k the column), so that each of the 16 outputs is one loop over all the tiles:
    /// V[4a + b] = cb(rb(raw)) with the row combination a and column combination b of B^T.
    #[inline(always)]
    fn input_transform(
        &self,
        rows: &std::ops::Range<usize>,
        ci: usize,
        tc: usize,
        v: &mut [T],
        buf: &mut [T],
    ) {
        let (g, t) = (self.g, self.tiling);
        let (raw, rest) = buf.split_at_mut(16 * tc);
        with_row_widths(
            t.tiles_x,
            g.w,
            g.pad.left,
            #[inline(always)]
            |nx, w, left| {
                let half = nx + 1;
                let (line, rest) = rest.split_at_mut(2 * half);
                let (even, odd) = rest[..2 * half].split_at_mut(half);
                for (ri, r) in rows.clone().enumerate() {
                    let (n, ty) = (r / t.tiles_y, r % t.tiles_y);
                    let xc = &self.x[(n * g.cin + ci) * g.h * w..][..g.h * w];
                    for a in 0..4 {
                        let iy = 2 * ty + a;
                        let at = |k: usize| (4 * a + k) * tc + ri * nx;
                        if iy < g.pad.top || iy - g.pad.top >= g.h {
                            for k in 0..4 {
                                raw[at(k)..at(k) + nx].fill(T::zero());
                            }
                            continue;
                        }
                        // The padded row x[iy - top][c - left], contiguous, split into its even and
                        // odd columns: tile tx reads columns 2tx, 2tx + 1, 2tx + 2, 2tx + 3, i.e.
                        // even[tx], odd[tx], even[tx + 1], odd[tx + 1], so each of the four is one
                        // contiguous copy. (Gathering the four columns tile by tile, each input
                        // column twice with scalar stores, took as long as the GEMMs on the demo
                        // tokenizer's shapes.)
                        let src = &xc[(iy - g.pad.top) * w..][..w];
                        let left = left.min(line.len());
                        let inside = w.min(line.len() - left);
                        line[..left].fill(T::zero());
                        line[left..left + inside].copy_from_slice(&src[..inside]);
                        line[left + inside..].fill(T::zero());
                        for ((e, o), pair) in even
                            .iter_mut()
                            .zip(odd.iter_mut())
                            .zip(line.chunks_exact(2))
                        {
                            *e = pair[0];
                            *o = pair[1];
                        }
                        for (k, part) in [&even[..nx], &odd[..nx], &even[1..], &odd[1..]]
                            .into_iter()
                            .enumerate()
                        {
                            raw[at(k)..at(k) + nx].copy_from_slice(part);
                        }
                    }
                }
            },
        );
        let raw = &*raw;
        let arr = |a: usize, k: usize| &raw[(4 * a + k) * tc..][..tc];
        for (a, &(i, j, row_plus)) in BT_ROWS.iter().enumerate() {
            for (b, &(k, l, col_plus)) in BT_ROWS.iter().enumerate() {
                let out = &mut v[((4 * a + b) * g.cin + ci) * tc..][..tc];
                let ins = [arr(i, k), arr(j, k), arr(i, l), arr(j, l)];
                match (row_plus, col_plus) {
                    (false, false) => combine::<T, false, false>(out, ins),
                    (false, true) => combine::<T, false, true>(out, ins),
                    (true, false) => combine::<T, true, false>(out, ins),
                    (true, true) => combine::<T, true, true>(out, ins),
                }
            }
        }
    }
}

/// dW for the conv of geometry `g`: x [N, Cin, H, W], gy = dY [N, Cout, Ho, Wo]; returns
/// [Cout, Cin, 3, 3].
///
/// The adjoint of the forward: per tile dM = A dY A^T (dY zero outside the output), then
/// dU[xi] = sum over tiles of dM[xi] V[xi]^T (16 GEMMs [Cout, tc] x [tc, Cin] per chunk,
/// accumulated), and dW = G^T dU G per channel pair. Tasks take contiguous ranges of samples and
/// their partial dU are summed in task order.
pub(super) fn weight_grad<T: Float>(g: &ConvGeom, x: &[T], gy: &[T]) -> Vec<T> {
    let tiling = Tiling::new(g);
    let threads = rayon::current_num_threads().max(1);
    let flops = g.n * g.y_len() * g.k();
    let conv = WinogradConv {
        g,
        x,
        u: &[],
        bias: None,
        tiling: &tiling,
    };
    // One task: samples [first, last) and output channels `cos`; returns dU [16][cos][Cin].
    let task = |samples: std::ops::Range<usize>, cos: std::ops::Range<usize>| {
        let mut s = Scratch {
            v: vec![T::zero(); 16 * g.cin * tiling.chunk_tiles()],
            m: vec![T::zero(); 16 * cos.len() * tiling.chunk_tiles()],
            rows: vec![T::zero(); 16 * tiling.chunk_tiles() + 4 * tiling.half],
        };
        let mut du = vec![T::zero(); 16 * cos.len() * g.cin];
        let ty_n = tiling.tiles_y;
        let (r0, r1) = (samples.start * ty_n, samples.end * ty_n);
        for c0 in (r0..r1).step_by(tiling.rows_per_chunk) {
            let rows = c0..r1.min(c0 + tiling.rows_per_chunk);
            in_widest_vectors(
                #[inline(always)]
                || conv.grad_chunk_body(rows, &cos, gy, &mut du, &mut s),
            );
        }
        du
    };
    let plane = g.cout * g.cin;
    let mut du = vec![T::zero(); 16 * plane];
    if threads == 1 || flops < SMALL_CONV_FLOPS || g.n >= threads {
        // Sample ranges; their partial dU are summed in task order.
        let per_task = if threads == 1 || flops < SMALL_CONV_FLOPS {
            g.n.max(1)
        } else {
            g.n.div_ceil(threads)
        };
        let ranges: Vec<_> = (0..g.n)
            .step_by(per_task)
            .map(|a| a..g.n.min(a + per_task))
            .collect();
        let parts: Vec<Vec<T>> = if ranges.len() > 1 {
            ranges.into_par_iter().map(|r| task(r, 0..g.cout)).collect()
        } else {
            ranges.into_iter().map(|r| task(r, 0..g.cout)).collect()
        };
        for part in parts {
            du.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
    } else {
        // Fewer samples than threads: output-channel ranges over the whole batch, each task
        // transforming all of x (as the forward does), written into their rows of dU.
        let per_task = g.cout.div_ceil(threads);
        let ranges: Vec<_> = (0..g.cout)
            .step_by(per_task)
            .map(|a| a..g.cout.min(a + per_task))
            .collect();
        let parts: Vec<Vec<T>> = ranges.par_iter().map(|r| task(0..g.n, r.clone())).collect();
        for (cos, part) in ranges.iter().zip(parts) {
            let rows = cos.len() * g.cin;
            for (xi, block) in part.chunks_exact(rows).enumerate() {
                du[xi * plane + cos.start * g.cin..][..rows].copy_from_slice(block);
            }
        }
    }
    // dW = G^T dU G: G^T maps a 4-vector u to (u0 + (u1 + u2)/2, (u1 - u2)/2, (u1 + u2)/2 + u3).
    let half = T::from_f32(0.5);
    let gt = |u: [T; 4]| {
        [
            u[0] + (u[1] + u[2]) * half,
            (u[1] - u[2]) * half,
            (u[1] + u[2]) * half + u[3],
        ]
    };
    let mut dw = vec![T::zero(); 9 * plane];
    for (k, d) in dw.chunks_exact_mut(9).enumerate() {
        let at = |xi: usize| du[xi * plane + k];
        let cols: [[T; 3]; 4] = std::array::from_fn(|a| gt(std::array::from_fn(|b| at(4 * a + b))));
        for kx in 0..3 {
            let col = gt(std::array::from_fn(|a| cols[a][kx]));
            for ky in 0..3 {
                d[3 * ky + kx] = col[ky];
            }
        }
    }
    dw
}

impl<T: Float> WinogradConv<'_, T> {
    /// Adds one chunk's contribution to the rows `cos` of dU, held as [16][cos][Cin] (see
    /// [`weight_grad`]); runs inside [`in_widest_vectors`].
    #[inline(always)]
    fn grad_chunk_body(
        &self,
        rows: std::ops::Range<usize>,
        cos: &std::ops::Range<usize>,
        gy: &[T],
        du: &mut [T],
        s: &mut Scratch<T>,
    ) {
        let (g, t) = (self.g, self.tiling);
        let nx = t.tiles_x;
        let tc = self.transform_inputs(&rows, s);
        let ncos = cos.len();
        let (v, m) = (&s.v[..16 * g.cin * tc], &mut s.m[..16 * ncos * tc]);
        // dM = A dY A^T per output channel: raw[2i + parity] holds the even / odd columns of
        // output row i of every tile, comb[2a + parity] row combination a of them.
        let (raw, rest) = s.rows.split_at_mut(4 * tc);
        let (comb, line) = rest.split_at_mut(8 * tc);
        let p = g.p();
        for (ci_out, co) in cos.clone().enumerate() {
            with_row_widths(
                nx,
                g.wo,
                0,
                #[inline(always)]
                |nx, wo, _| {
                    let line = &mut line[..2 * nx];
                    for (ri, r) in rows.clone().enumerate() {
                        let (n, ty) = (r / t.tiles_y, r % t.tiles_y);
                        let plane = &gy[(n * g.cout + co) * p..][..p];
                        for i in 0..2 {
                            let (ev, od) = raw[2 * i * tc..][..2 * tc].split_at_mut(tc);
                            let (ev, od) = (&mut ev[ri * nx..][..nx], &mut od[ri * nx..][..nx]);
                            let oy = 2 * ty + i;
                            if oy >= g.ho {
                                ev.fill(T::zero());
                                od.fill(T::zero());
                                continue;
                            }
                            line[..wo].copy_from_slice(&plane[oy * wo..][..wo]);
                            line[wo..].fill(T::zero());
                            for ((e, o), pair) in
                                ev.iter_mut().zip(od.iter_mut()).zip(line.chunks_exact(2))
                            {
                                *e = pair[0];
                                *o = pair[1];
                            }
                        }
                    }
                },
            );
            // Rows of A (4 x 2): (1, 0), (1, 1), (1, -1), (0, -1); first over the two output
            // rows, then over the even and odd columns.
            for parity in 0..2 {
                let (r0, r1) = (&raw[parity * tc..][..tc], &raw[(2 + parity) * tc..][..tc]);
                for (a, out) in comb
                    .chunks_exact_mut(tc)
                    .enumerate()
                    .filter(|(a, _)| a % 2 == parity)
                {
                    apply_a_row(a / 2, out, r0, r1);
                }
            }
            for a in 0..4 {
                let (ev, od) = (&comb[2 * a * tc..][..tc], &comb[(2 * a + 1) * tc..][..tc]);
                for b in 0..4 {
                    let out = &mut m[((4 * a + b) * ncos + ci_out) * tc..][..tc];
                    apply_a_row(b, out, ev, od);
                }
            }
        }
        for xi in 0..16 {
            // SAFETY: dU[xi] is [ncos, Cin] row-major inside du; dM[xi] is [ncos, tc] row-major
            // and V[xi]^T reads the row-major [Cin, tc] block transposed, both inside their own
            // buffers, separate from du.
            unsafe {
                gemm_into(
                    ncos,
                    g.cin,
                    tc,
                    du[xi * ncos * g.cin..].as_mut_ptr(),
                    g.cin,
                    true,
                    (m[xi * ncos * tc..].as_ptr(), 1, tc as isize),
                    (v[xi * g.cin * tc..].as_ptr(), tc as isize, 1),
                    Parallelism::None,
                );
            }
        }
    }
}

/// out = row `a` of A (4 x 2) applied to (p, q): p, p + q, p - q or -q.
#[inline(always)]
fn apply_a_row<T: Float>(a: usize, out: &mut [T], p: &[T], q: &[T]) {
    match a {
        0 => out.copy_from_slice(p),
        1 => out
            .iter_mut()
            .zip(p.iter().zip(q))
            .for_each(|(o, (&p, &q))| *o = p + q),
        2 => out
            .iter_mut()
            .zip(p.iter().zip(q))
            .for_each(|(o, (&p, &q))| *o = p - q),
        _ => out.iter_mut().zip(q).for_each(|(o, &q)| *o = -q),
    }
}

/// Row r of B^T is e_i + e_j (flag true) or e_i - e_j (false), as (i, j, flag).
const BT_ROWS: [(usize, usize, bool); 4] =
    [(0, 2, false), (1, 2, true), (2, 1, false), (1, 3, false)];

/// out = (ik +- jk) +- (il +- jl), ins = [ik, jk, il, jl]: one row and one column combination
/// of B^T at once (ROW: the inner signs are +, COL: the outer sign is +).
#[inline(always)]
fn combine<T: Float, const ROW: bool, const COL: bool>(out: &mut [T], ins: [&[T]; 4]) {
    let [ik, jk, il, jl] = ins;
    let pm = |p: T, q: T, plus: bool| if plus { p + q } else { p - q };
    let inputs = ik.iter().zip(jk).zip(il.iter().zip(jl));
    for (o, ((&ik, &jk), (&il, &jl))) in out.iter_mut().zip(inputs) {
        *o = pm(pm(ik, jk, ROW), pm(il, jl, ROW), COL);
    }
}

/// Calls `f(nx, w, left)` (tiles per tile row, the map's width, its left padding) with
/// compile-time constants where the row is one of the small widths the demo tokenizer's maps
/// have (8, 16 and 32 columns with one column of padding, or no padding given): `f` is inlined
/// into each arm, so the per-row copies, splits and interleaves of 4 to 34 elements become a few
/// vector instructions instead of library calls and scalar loops. Any other width runs the
/// same code with the values as given.
#[inline(always)]
fn with_row_widths<R>(
    nx: usize,
    w: usize,
    left: usize,
    f: impl FnOnce(usize, usize, usize) -> R,
) -> R {
    match (nx, w == 2 * nx, left) {
        (4, true, 1) => f(4, 8, 1),
        (8, true, 1) => f(8, 16, 1),
        (16, true, 1) => f(16, 32, 1),
        (4, true, 0) => f(4, 8, 0),
        (8, true, 0) => f(8, 16, 0),
        (16, true, 0) => f(16, 32, 0),
        _ => f(nx, w, left),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::Padding;

    /// Runs `f` on an output of n NaNs and returns it: an element `forward` failed to write
    /// stays NaN and fails the comparison (the real outputs start uninitialised).
    fn forward_over_nan(n: usize, f: impl FnOnce(&mut [MaybeUninit<f64>])) -> Vec<f64> {
        let mut y = vec![MaybeUninit::new(f64::NAN); n];
        f(&mut y);
        // SAFETY: every element was initialised (to NaN) before `f` ran.
        y.iter().map(|v| unsafe { v.assume_init() }).collect()
    }

    fn geom(n: usize, cin: usize, h: usize, w: usize, cout: usize, pad: Padding) -> ConvGeom {
        let (ho, wo) = (h + pad.top + pad.bottom - 2, w + pad.left + pad.right - 2);
        ConvGeom {
            n,
            cin,
            h,
            w,
            cout,
            kh: 3,
            kw: 3,
            sh: 1,
            sw: 1,
            pad,
            ho,
            wo,
        }
    }

    /// The direct sum, in f64.
    fn direct(g: &ConvGeom, x: &[f64], w: &[f64], bias: &[f64]) -> Vec<f64> {
        let mut y = vec![0.0; g.n * g.y_len()];
        for n in 0..g.n {
            for co in 0..g.cout {
                for oy in 0..g.ho {
                    for ox in 0..g.wo {
                        let mut acc = bias[co];
                        for ci in 0..g.cin {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (oy + ky, ox + kx);
                                    if iy < g.pad.top || ix < g.pad.left {
                                        continue;
                                    }
                                    let (iy, ix) = (iy - g.pad.top, ix - g.pad.left);
                                    if iy >= g.h || ix >= g.w {
                                        continue;
                                    }
                                    acc += w[((co * g.cin + ci) * 3 + ky) * 3 + kx]
                                        * x[((n * g.cin + ci) * g.h + iy) * g.w + ix];
                                }
                            }
                        }
                        y[((n * g.cout + co) * g.ho + oy) * g.wo + ox] = acc;
                    }
                }
            }
        }
        y
    }

    fn values(len: usize, seed: u64) -> Vec<f64> {
        // A small LCG: deterministic, no dependency on the engine's RNG.
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    /// Asserts got == want to 1e-12 relative, naming the first element that is not.
    fn assert_close(what: &str, got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (k, (a, e)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - e).abs() <= 1e-12 * (1.0 + e.abs()),
                "{what}[{k}] = {a}, expected {e}"
            );
        }
    }

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    #[test]
    fn matches_the_direct_sum_at_every_border() {
        let pads = [
            Padding::same(1),
            Padding::none(),
            Padding::same(2),
            Padding {
                top: 0,
                bottom: 2,
                left: 2,
                right: 1,
            },
            // No left padding and a width 2 nx (even or odd output): the arms of
            // `with_row_widths` for left = 0 at widths 8, 16 and 32.
            Padding {
                top: 1,
                bottom: 1,
                left: 0,
                right: 2,
            },
            Padding {
                top: 0,
                bottom: 1,
                left: 0,
                right: 1,
            },
        ];
        // Odd and even outputs, a 1x1 input, sizes that need several chunks, and the widths
        // `with_row_widths` compiles apart (8, 16, 32).
        for (i, &(n, cin, h, w, cout)) in [
            (2, 8, 5, 7, 9),
            (1, 8, 1, 1, 8),
            (3, 9, 2, 3, 8),
            (2, 12, 20, 33, 8),
            (5, 8, 4, 4, 11),
            (2, 8, 8, 8, 9),
            (1, 9, 5, 16, 8),
            (1, 8, 3, 32, 8),
        ]
        .iter()
        .enumerate()
        {
            for (j, &pad) in pads.iter().enumerate() {
                if h + pad.top + pad.bottom < 3 || w + pad.left + pad.right < 3 {
                    continue;
                }
                let g = geom(n, cin, h, w, cout, pad);
                assert!(applies(&g));
                let seed = (i * 10 + j) as u64;
                let x = values(n * cin * h * w, seed);
                let wt = values(cout * cin * 9, seed ^ 1);
                let b = values(cout, seed ^ 2);
                let want = direct(&g, &x, &wt, &b);
                let y = forward_over_nan(want.len(), |y| forward(&g, &x, &wt, Some(&b), y));
                assert_close(&format!("case {i} pad {pad:?}: y"), &y, &want);
            }
        }
    }

    #[test]
    fn weight_gradient_matches_the_direct_sum() {
        // dW[co, ci, ky, kx] = sum over n, oy, ox of dY[n, co, oy, ox] * xpad[n, ci, oy + ky, ox + kx].
        for (i, &(n, cin, h, w, cout, pad)) in [
            (2, 8, 5, 7, 9, Padding::same(1)),
            (3, 8, 1, 1, 8, Padding::same(1)),
            (1, 9, 6, 4, 8, Padding::none()),
            (
                5,
                8,
                9,
                11,
                10,
                Padding {
                    top: 2,
                    bottom: 0,
                    left: 1,
                    right: 2,
                },
            ),
            (4, 16, 24, 22, 16, Padding::same(1)),
            // The widths `with_row_widths` compiles apart, with and without left padding.
            (2, 8, 8, 8, 9, Padding::same(1)),
            (1, 8, 3, 16, 8, Padding::same(1)),
            (1, 9, 4, 32, 8, Padding::same(1)),
            (
                2,
                8,
                5,
                16,
                8,
                Padding {
                    top: 1,
                    bottom: 1,
                    left: 0,
                    right: 2,
                },
            ),
        ]
        .iter()
        .enumerate()
        {
            let g = geom(n, cin, h, w, cout, pad);
            let x = values(n * cin * h * w, i as u64);
            let gy = values(n * g.y_len(), i as u64 ^ 5);
            let mut want = vec![0.0; cout * cin * 9];
            for (k, d) in want.iter_mut().enumerate() {
                let (co, ci, ky, kx) = (k / (cin * 9), k / 9 % cin, k / 3 % 3, k % 3);
                for ni in 0..n {
                    for oy in 0..g.ho {
                        for ox in 0..g.wo {
                            let (iy, ix) = (oy + ky, ox + kx);
                            if iy < pad.top
                                || ix < pad.left
                                || iy - pad.top >= h
                                || ix - pad.left >= w
                            {
                                continue;
                            }
                            *d += gy[((ni * cout + co) * g.ho + oy) * g.wo + ox]
                                * x[((ni * cin + ci) * h + iy - pad.top) * w + ix - pad.left];
                        }
                    }
                }
            }
            let got = weight_grad(&g, &x, &gy);
            assert_close(&format!("case {i}: dW"), &got, &want);
        }
    }

    #[test]
    fn weight_gradient_of_a_small_batch_splits_output_channels() {
        // One sample on a pool of 2 or 3 threads: tasks over output channels.
        let g = geom(1, 16, 32, 32, 24, Padding::same(1));
        let x = values(16 * 32 * 32, 9);
        let gy = values(g.y_len(), 10);
        let one = pool(1);
        let want = one.install(|| weight_grad(&g, &x, &gy));
        for threads in [2, 3] {
            let threaded = pool(threads);
            let got = threaded.install(|| weight_grad(&g, &x, &gy));
            assert_close(&format!("{threads} threads: dW"), &got, &want);
        }
    }

    #[test]
    fn small_batches_split_output_channels_with_the_same_result() {
        // One sample: the output channels are split across the tasks; a pool of one thread runs
        // them all in one task. Both must agree with the direct sum.
        let g = geom(1, 16, 32, 32, 24, Padding::same(1));
        let x = values(16 * 32 * 32, 7);
        let wt = values(24 * 16 * 9, 8);
        let want = direct(&g, &x, &wt, &[0.0; 24]);
        for threads in [1, 2, 3] {
            let threaded = pool(threads);
            let y = forward_over_nan(want.len(), |y| {
                threaded.install(|| forward(&g, &x, &wt, None, y))
            });
            assert_close(&format!("{threads} threads: y"), &y, &want);
        }
    }
}
