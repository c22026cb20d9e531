//! 2-D neighbourhood attention with NATTEN's window rule (MVAR's `natten.na2d`, no dilation, no
//! stride, not causal): the CPU reference the fused CUDA kernel is checked against.
//!
//! Layout: q, k, v and out are [B, H, X, Y, D] (heads before the map: models keep q/k/v as
//! [B, H, L, D] and view L as X x Y, X the row axis). NATTEN itself takes heads-last
//! [B, X, Y, H, D]; permute at the call site when reading its tensors.
//!
//! Window rule, per axis of extent n with an odd kernel size k <= n: query i sees the k keys
//! `start(i) .. start(i) + k` with `start(i) = clamp(i - k/2, 0, n - k)` ([`natten_window_start`]).
//! Near a border the window is shifted inward, never cut or zero-padded, so every query sees
//! exactly k * k keys. Then, for query t with window W(t):
//!
//!   s_tj = scale * q_t . k_j  (j in W(t)),   p_t = softmax(s_t),   out_t = sum_j p_tj v_j
//!
//! Backward (dO the output gradient, lse_t the log-sum-exp saved by the forward,
//! delta_t = dO_t . out_t, p_tj = exp(s_tj - lse_t) recomputed):
//!
//!   ds_tj = p_tj (dO_t . v_j - delta_t),   dq_t = scale sum_{j in W(t)} ds_tj k_j,
//!   dk_j = scale sum_{t : j in W(t)} ds_tj q_t,   dv_j = sum_{t : j in W(t)} p_tj dO_t.
//!
//! dq is gathered per query over its window; dk and dv are gathered per key over the queries
//! whose window holds it ([`natten_inverse_window`], the exact inverse of the window rule), so
//! every output element has one writer and both passes run in parallel without atomics, the
//! way the CUDA kernel splits its work. The query pass keeps each pair's p_tj and ds_tj
//! (k * k of each per query) for the key pass, which then does no dot products. bf16 is computed in f32; the log-sum-exp is kept in f64.
//!
//! Two CPU variants compute this, in the same two passes: `NaKernel::Naive` (`MVAR_NA_KERNEL=naive`)
//! picks the first, every other family the second, the default.
//!
//! - naive: per (query, key) pair a dot product of D and an axpy of D, straight from the
//!   formulas; the reference the tiled variant is tested against.
//! - tiled: the products run as short vector loops with no horizontal sums. k and v are first
//!   transposed per map row to [D, Y + pad] (zero padding: `padded_y`), so the k keys of one
//!   window row are contiguous for every d: a window row's k scores are LANES-wide multiplies
//!   and adds per d (lanes past k are computed and dropped: 8 lanes for k = 7), with CHAINS
//!   independent partial sums over d so the adds do not wait on each other. A query row's
//!   scores are computed first, key row by key row, then its softmaxes and sums. The sums over
//!   a window (out, dq) or an inverse window (dk, dv) run over D in blocks of 64 lanes held in
//!   registers, the terms split over two accumulators. Every lane does the same scalar
//!   operations in the same order at any vector width, so the results do not depend on the CPU.

use std::ops::Range;
use std::sync::Mutex;

use mvar_engine::cpu::{FloatKernel, PARALLEL_MIN_ELEMS};
use mvar_engine::cuda::ops::na2d::{self as cn, Na2dShape};
use mvar_engine::{Error, Float, Result, Tensor};
use rayon::prelude::*;

pub use mvar_engine::cuda::ops::na2d::NaKernel;

use crate::attention::{prob_from_lse, softmax_row};
use crate::norm::{backward_with_saved, nth, Saved};
use crate::util::{
    autocast_run, float_op, in_widest_vectors, out_tensor, require_float, require_rank,
    same_device, same_dtype,
};

const OP: &str = "na2d";

/// First key of query `i`'s window on an axis of extent `n` with odd kernel size `k <= n`:
/// `clamp(i - k/2, 0, n - k)`. The window is `start .. start + k`; it holds `i`.
pub fn natten_window_start(i: usize, n: usize, k: usize) -> usize {
    i.saturating_sub(k / 2).min(n.saturating_sub(k))
}

/// The queries whose window (see [`natten_window_start`]) holds key `j`, on an axis of extent `n`
/// with odd kernel size `k <= n`: a contiguous range, because window starts never decrease with
/// the query.
///
/// With r = k/2: a window reaches back to `j` (start(i) <= j) for every i when `j >= n - k` (the
/// largest start is n - k), else for i <= j + r. It reaches forward to `j` (start(i) + k > j)
/// for every i when `j < k`, else for i >= j - r (the clamp at n - k cannot cut in first:
/// j - k + 1 <= n - k).
pub fn natten_inverse_window(j: usize, n: usize, k: usize) -> Range<usize> {
    let r = k / 2;
    let lo = if j < k { 0 } else { j - r };
    let hi = if j + k >= n { n } else { j + r + 1 };
    lo..hi
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    /// B * H: independent maps.
    maps: usize,
    x: usize,
    y: usize,
    d: usize,
    k: usize,
    scale: f64,
}

impl Geometry {
    /// Index of token (x, y) of map `m` in units of vectors (multiply by D for elements).
    #[inline]
    fn token(&self, m: usize, ix: usize, iy: usize) -> usize {
        (m * self.x + ix) * self.y + iy
    }

    /// The k * k keys of query (ix, iy) of map `m`, row-major over the window.
    fn window(&self, m: usize, ix: usize, iy: usize) -> impl Iterator<Item = usize> + '_ {
        let sx = natten_window_start(ix, self.x, self.k);
        let sy = natten_window_start(iy, self.y, self.k);
        (sx..sx + self.k).flat_map(move |kx| (sy..sy + self.k).map(move |ky| self.token(m, kx, ky)))
    }

    fn parallel(&self) -> bool {
        self.maps * self.x * self.y * self.k * self.k * self.d >= PARALLEL_MIN_ELEMS
    }
}

/// a . b with eight independent partial sums (combined pairwise at the end): a single running
/// sum is one long chain of dependent adds that the compiler may not reorder, so it runs at the
/// add latency per element; eight chains vectorise. The order is fixed, so results are still
/// deterministic.
#[inline(always)]
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(T::zero(), |s, (&x, &y)| s + x * y);
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[inline(always)]
fn axpy<T: Float>(dst: &mut [T], a: T, x: &[T]) {
    for (d, &v) in dst.iter_mut().zip(x) {
        *d += a * v;
    }
}

/// Runs `f(row, a_row, b_row)` over the map rows (one row = Y tokens) of two per-token buffers
/// with `ca` and `cb` elements per token, on all threads when the work is large.
fn for_rows2<A: Send, B: Send>(
    g: &Geometry,
    a: &mut [A],
    ca: usize,
    b: &mut [B],
    cb: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync + Send,
) {
    let (ra, rb) = (g.y * ca, g.y * cb);
    let run = |(r, (a, b)): (usize, (&mut [A], &mut [B]))| {
        in_widest_vectors(
            #[inline(always)]
            || f(r, a, b),
        )
    };
    if g.parallel() {
        a.par_chunks_mut(ra)
            .zip(b.par_chunks_mut(rb))
            .enumerate()
            .for_each(run);
    } else {
        a.chunks_mut(ra)
            .zip(b.chunks_mut(rb))
            .enumerate()
            .for_each(run);
    }
}

/// The vector of token `t` in a buffer of `d`-element vectors.
#[inline]
fn at<T>(x: &[T], t: usize, d: usize) -> &[T] {
    &x[t * d..(t + 1) * d]
}

/// The CPU variant that runs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CpuVariant {
    Naive,
    Tiled,
}

impl CpuVariant {
    fn of(kernel: NaKernel) -> CpuVariant {
        if matches!(kernel, NaKernel::Naive) {
            CpuVariant::Naive
        } else {
            CpuVariant::Tiled
        }
    }
}

struct Forward {
    g: Geometry,
    variant: CpuVariant,
    /// Per-query log-sum-exp [B, H, X, Y], handed back beside the output.
    lse: Mutex<Vec<f64>>,
}

impl FloatKernel for Forward {
    fn run<T: Float>(&self, xs: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (q, k, v) = (xs[0], xs[1], xs[2]);
        let g = self.g;
        let tokens = g.maps * g.x * g.y;
        let mut out = vec![T::zero(); tokens * g.d];
        let mut lse = vec![0.0f64; tokens];
        if g.d > 0 {
            match self.variant {
                CpuVariant::Naive => naive_forward(&g, q, k, v, &mut out, &mut lse),
                CpuVariant::Tiled => tiled_forward(&g, q, k, v, &mut out, &mut lse),
            }
        }
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok(vec![out])
    }
}

fn naive_forward<T: Float>(
    g: &Geometry,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    lse: &mut [f64],
) {
    let scale = T::from_f64(g.scale);
    for_rows2(
        g,
        out,
        g.d,
        lse,
        1,
        #[inline(always)]
        |r, out_row, lse_row| {
            let (m, ix) = (r / g.x, r % g.x);
            let mut s = vec![T::zero(); g.k * g.k];
            for iy in 0..g.y {
                let qt = at(q, g.token(m, ix, iy), g.d);
                for (sw, kj) in s.iter_mut().zip(g.window(m, ix, iy)) {
                    *sw = scale * dot(qt, at(k, kj, g.d));
                }
                lse_row[iy] = softmax_row(&mut s).as_f64();
                let o = &mut out_row[iy * g.d..][..g.d];
                for (&p, kj) in s.iter().zip(g.window(m, ix, iy)) {
                    axpy(o, p, at(v, kj, g.d));
                }
            }
        },
    );
}

fn tiled_forward<T: Float>(
    g: &Geometry,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    lse: &mut [f64],
) {
    let (d, kk) = (g.d, g.k * g.k);
    let scale = T::from_f64(g.scale);
    let kt = transpose_rows(g, k);
    let kt = &kt;
    for_rows2(
        g,
        out,
        d,
        lse,
        1,
        #[inline(always)]
        |r, out_row, lse_row| {
            let (m, ix) = (r / g.x, r % g.x);
            // The whole row's scores first, then its sums: each phase keeps its own k rows of
            // keys (or values) in cache.
            let mut s = vec![T::zero(); g.y * kk];
            query_row_scores(g, kt, m, ix, &q[r * g.y * d..][..g.y * d], &mut s, kk);
            let mut keys = vec![0usize; kk];
            for (iy, s_t) in s.chunks_exact_mut(kk).enumerate() {
                s_t.iter_mut().for_each(|x| *x = scale * *x);
                lse_row[iy] = softmax_row(s_t).as_f64();
                window_tokens(g, m, ix, iy, &mut keys);
                weighted_sum(&mut out_row[iy * d..][..d], s_t, &keys, v, d);
            }
        },
    );
}

/// Lanes of the tiled variant's score loops: a window row's keys as one vector (k <= 8 in one
/// step, larger k in steps of 8), and the zero padding of the transposed rows that lets the
/// last window of a row be read as whole vectors.
const LANES: usize = 8;
/// Independent partial sums over d in the score loops, combined pairwise at the end.
const CHAINS: usize = 8;
/// Lanes of D summed at once in [`weighted_sum`] (64: one head of MVAR in four AVX-512
/// vectors per accumulator).
const BLOCK: usize = 64;

/// Columns per (row, d) of the transposed copies: Y, and the padding that lets the last window
/// of a row be read in whole steps of LANES (k rounded up to LANES, less k).
fn padded_y(g: &Geometry) -> usize {
    g.y + g.k.next_multiple_of(LANES) - g.k
}

/// `x` [maps * X rows, Y, D] as [maps * X rows, D, padded_y], the padding zero: in the copy,
/// the Y values of one (row, d) are contiguous.
fn transpose_rows<T: Float>(g: &Geometry, x: &[T]) -> Vec<T> {
    let (d, yp) = (g.d, padded_y(g));
    let mut out = vec![T::zero(); g.maps * g.x * d * yp];
    let fill = |(r, dst): (usize, &mut [T])| {
        for (iy, xv) in x[r * g.y * d..][..g.y * d].chunks_exact(d).enumerate() {
            for (dd, &val) in xv.iter().enumerate() {
                dst[dd * yp + iy] = val;
            }
        }
    };
    if g.parallel() {
        out.par_chunks_mut(d * yp).enumerate().for_each(fill);
    } else {
        out.chunks_mut(d * yp).enumerate().for_each(fill);
    }
    out
}

/// For every query (ix, iy) of map row `ix` of map `m`: the k * k scores `u_t . w_j` over its
/// window (row-major), at `s[iy * s_stride ..]`; `u_row` holds the row's Y query-side vectors,
/// `wt` the transposed key-side ones ([`transpose_rows`]). Key row by key row, so one row of
/// `wt` serves all Y queries while it is in cache.
#[inline(always)]
fn query_row_scores<T: Float>(
    g: &Geometry,
    wt: &[T],
    m: usize,
    ix: usize,
    u_row: &[T],
    s: &mut [T],
    s_stride: usize,
) {
    let (d, yp) = (g.d, padded_y(g));
    let xs = natten_window_start(ix, g.x, g.k);
    for r in 0..g.k {
        let w_row = &wt[(m * g.x + xs + r) * d * yp..][..d * yp];
        for iy in 0..g.y {
            let ys = natten_window_start(iy, g.y, g.k);
            row_scores(
                &w_row[ys..],
                yp,
                &u_row[iy * d..][..d],
                &mut s[iy * s_stride + r * g.k..][..g.k],
            );
        }
    }
}

/// The token indices of query (ix, iy)'s window of map `m`, row-major.
#[inline(always)]
fn window_tokens(g: &Geometry, m: usize, ix: usize, iy: usize, keys: &mut [usize]) {
    let xs = natten_window_start(ix, g.x, g.k);
    let ys = natten_window_start(iy, g.y, g.k);
    for (r, run) in keys.chunks_exact_mut(g.k).enumerate() {
        let first = g.token(m, xs + r, ys);
        for (j, t) in run.iter_mut().enumerate() {
            *t = first + j;
        }
    }
}

/// `s[c] = u . (column c of wt)` for c < s.len(), `wt` a [D, stride] block starting at the
/// window row's first key; reads LANES columns per step (the padding covers the last step).
///
/// The order of the sums, which both copies below keep: chain c (of CHAINS) adds the terms
/// e = c, c + CHAINS, c + 2 CHAINS, ... in turn, each term rounded before it is added (no fused
/// multiply-add); the chains are combined pairwise at the end.
#[inline(always)]
fn row_scores<T: Float>(wt: &[T], stride: usize, u: &[T], s: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && crate::util::cpu_vectors() != crate::util::CpuVectors::Baseline
    {
        // SAFETY: T is f32 (checked above), so the slices are f32 slices of the same length;
        // the CPU has AVX2 (so AVX).
        unsafe {
            let f = |x: &[T]| std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len());
            let sf = std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut f32, s.len());
            return row_scores_f32_avx(f(wt), stride, f(u), sf);
        }
    }
    row_scores_lanes(wt, stride, u, s)
}

/// [`row_scores`] in portable code: per lane, the scalar operations of the vector copy.
#[inline(always)]
fn row_scores_lanes<T: Float>(wt: &[T], stride: usize, u: &[T], s: &mut [T]) {
    let d = u.len();
    for c0 in (0..s.len()).step_by(LANES) {
        // One bounds check for the whole block; the loads below stay within it.
        let block = &wt[c0..c0 + (d - 1) * stride + LANES];
        let mut acc = [[T::zero(); LANES]; CHAINS];
        for e0 in (0..d).step_by(CHAINS) {
            // Unrolled over the chains, with a condition for a partial last step: an index
            // that is not a constant would keep `acc` in memory. (Without the condition the
            // compiler vectorised across the chains, gathering wt: 3x slower.)
            for (c, a) in acc.iter_mut().enumerate() {
                let e = e0 + c;
                if e < d {
                    let w = &block[e * stride..][..LANES];
                    for l in 0..LANES {
                        a[l] += u[e] * w[l];
                    }
                }
            }
        }
        for (l, sc) in s[c0..].iter_mut().take(LANES).enumerate() {
            *sc = ((acc[0][l] + acc[4][l]) + (acc[1][l] + acc[5][l]))
                + ((acc[2][l] + acc[6][l]) + (acc[3][l] + acc[7][l]));
        }
    }
}

/// [`row_scores`] for f32 in 8-lane AVX vectors (LANES = CHAINS = 8), written out: left to
/// the compiler, the same loops were vectorised across the chains instead of the lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn row_scores_f32_avx(wt: &[f32], stride: usize, u: &[f32], s: &mut [f32]) {
    use std::arch::x86_64::*;
    const _: () = assert!(LANES == 8 && CHAINS == 8);
    let d = u.len();
    let whole = d - d % CHAINS;
    for c0 in (0..s.len()).step_by(LANES) {
        // One bounds check for the whole block; the loads below stay within it.
        let block = &wt[c0..c0 + (d - 1) * stride + LANES];
        let p = block.as_ptr();
        // SAFETY (every load): term e < d reads block[e * stride .. e * stride + 8], within
        // (d - 1) * stride + 8 = block.len(); u[e] with e < d = u.len().
        let term = |e: usize| {
            _mm256_mul_ps(
                _mm256_set1_ps(*u.get_unchecked(e)),
                _mm256_loadu_ps(p.add(e * stride)),
            )
        };
        let mut a = [_mm256_setzero_ps(); CHAINS];
        for e0 in (0..whole).step_by(CHAINS) {
            for (c, ac) in a.iter_mut().enumerate() {
                *ac = _mm256_add_ps(*ac, term(e0 + c));
            }
        }
        for (c, ac) in a.iter_mut().enumerate() {
            if whole + c < d {
                *ac = _mm256_add_ps(*ac, term(whole + c));
            }
        }
        let sum = _mm256_add_ps(
            _mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[1], a[5])),
            _mm256_add_ps(_mm256_add_ps(a[2], a[6]), _mm256_add_ps(a[3], a[7])),
        );
        let mut lanes = [0.0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        for (sc, &v) in s[c0..].iter_mut().zip(&lanes) {
            *sc = v;
        }
    }
}

/// `dst = sum_i w[i] * src[rows[i]]` (`src` in rows of `d`), over D in blocks of [`BLOCK`] lanes
/// kept in registers, the terms alternating between two accumulators so consecutive adds do not
/// wait on each other.
#[inline(always)]
fn weighted_sum<T: Float>(dst: &mut [T], w: &[T], rows: &[usize], src: &[T], d: usize) {
    let (w_pairs, r_pairs) = (w.chunks_exact(2), rows.chunks_exact(2));
    let last = w_pairs.remainder().first().zip(r_pairs.remainder().first());
    let mut c0 = 0;
    while c0 + BLOCK <= d {
        let (mut a, mut b) = ([T::zero(); BLOCK], [T::zero(); BLOCK]);
        for (wp, rp) in w_pairs.clone().zip(r_pairs.clone()) {
            let x: &[T; BLOCK] = src[rp[0] * d + c0..][..BLOCK].try_into().unwrap();
            let y: &[T; BLOCK] = src[rp[1] * d + c0..][..BLOCK].try_into().unwrap();
            for l in 0..BLOCK {
                a[l] += wp[0] * x[l];
                b[l] += wp[1] * y[l];
            }
        }
        if let Some((&wl, &rl)) = last {
            let x: &[T; BLOCK] = src[rl * d + c0..][..BLOCK].try_into().unwrap();
            for l in 0..BLOCK {
                a[l] += wl * x[l];
            }
        }
        for l in 0..BLOCK {
            dst[c0 + l] = a[l] + b[l];
        }
        c0 += BLOCK;
    }
    // The lanes past the last whole block: the same operations per lane.
    for (l, o) in dst.iter_mut().enumerate().take(d).skip(c0) {
        let (mut a, mut b) = (T::zero(), T::zero());
        for (wp, rp) in w_pairs.clone().zip(r_pairs.clone()) {
            a += wp[0] * src[rp[0] * d + l];
            b += wp[1] * src[rp[1] * d + l];
        }
        if let Some((&wl, &rl)) = last {
            a += wl * src[rl * d + l];
        }
        *o = a + b;
    }
}

/// The fused backward: inputs [dO, q, k, v, out], outputs [dq, dk, dv].
struct Backward {
    g: Geometry,
    variant: CpuVariant,
    lse: Vec<f64>,
}

/// The backward's inputs and the forward's log-sum-exp (in the dtype), one slice each.
struct BackwardBufs<'a, T> {
    go: &'a [T],
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    o: &'a [T],
    lse: &'a [T],
}

impl FloatKernel for Backward {
    fn run<T: Float>(&self, xs: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let g = self.g;
        let tokens = g.maps * g.x * g.y;
        let mut grads = [(); 3].map(|_| vec![T::zero(); tokens * g.d]);
        if g.d == 0 {
            return Ok(grads.into());
        }
        let lse: Vec<T> = self.lse.iter().map(|&l| T::from_f64(l)).collect();
        let bufs = BackwardBufs {
            go: xs[0],
            q: xs[1],
            k: xs[2],
            v: xs[3],
            o: xs[4],
            lse: &lse,
        };
        // p_tj and ds_tj of every (query, window slot) ([tokens, 2, k*k]): the query pass
        // writes them beside dq, the key pass reads them instead of recomputing the two dot
        // products per pair.
        let mut pds = vec![T::zero(); tokens * 2 * g.k * g.k];
        let [dq, dk, dv] = &mut grads;
        match self.variant {
            CpuVariant::Naive => naive_query_pass(&g, &bufs, dq, &mut pds),
            CpuVariant::Tiled => tiled_query_pass(&g, &bufs, dq, &mut pds),
        }
        key_pass(&g, &bufs, &pds, dk, dv, self.variant);
        Ok(grads.into())
    }
}

/// dq per query over its window, and p_tj, ds_tj into `pds`.
fn naive_query_pass<T: Float>(g: &Geometry, b: &BackwardBufs<T>, dq: &mut [T], pds: &mut [T]) {
    let (d, kk) = (g.d, g.k * g.k);
    let scale = T::from_f64(g.scale);
    for_rows2(
        g,
        dq,
        d,
        pds,
        2 * kk,
        #[inline(always)]
        |r, dq_row, pds_row| {
            let (m, ix) = (r / g.x, r % g.x);
            for iy in 0..g.y {
                let t = g.token(m, ix, iy);
                let (qt, got) = (at(b.q, t, d), at(b.go, t, d));
                let delta = dot(got, at(b.o, t, d));
                let (p_slots, ds_slots) = pds_row[iy * 2 * kk..][..2 * kk].split_at_mut(kk);
                let acc = &mut dq_row[iy * d..][..d];
                for (w, j) in g.window(m, ix, iy).enumerate() {
                    let p = prob_from_lse(scale * dot(qt, at(b.k, j, d)), b.lse[t]);
                    let ds = p * (dot(got, at(b.v, j, d)) - delta);
                    p_slots[w] = p;
                    ds_slots[w] = ds;
                    axpy(acc, ds, at(b.k, j, d));
                }
                acc.iter_mut().for_each(|a| *a = *a * scale);
            }
        },
    );
}

/// [`naive_query_pass`] with the tiled variant's loops.
fn tiled_query_pass<T: Float>(g: &Geometry, b: &BackwardBufs<T>, dq: &mut [T], pds: &mut [T]) {
    let (d, kk) = (g.d, g.k * g.k);
    let scale = T::from_f64(g.scale);
    let (kt, vt) = (transpose_rows(g, b.k), transpose_rows(g, b.v));
    let (kt, vt) = (&kt, &vt);
    for_rows2(
        g,
        dq,
        d,
        pds,
        2 * kk,
        #[inline(always)]
        |r, dq_row, pds_row| {
            let (m, ix) = (r / g.x, r % g.x);
            let row = r * g.y * d..(r + 1) * g.y * d;
            // Scores into the p slots, dO . v into `dp`, for the whole row first.
            query_row_scores(g, kt, m, ix, &b.q[row.clone()], pds_row, 2 * kk);
            let mut dp = vec![T::zero(); g.y * kk];
            query_row_scores(g, vt, m, ix, &b.go[row], &mut dp, kk);
            let mut keys = vec![0usize; kk];
            for ((iy, slots), dp_t) in pds_row
                .chunks_exact_mut(2 * kk)
                .enumerate()
                .zip(dp.chunks_exact(kk))
            {
                let t = g.token(m, ix, iy);
                let delta = dot(at(b.go, t, d), at(b.o, t, d));
                let (p_slots, ds_slots) = slots.split_at_mut(kk);
                for ((p, ds), &dpj) in p_slots.iter_mut().zip(ds_slots.iter_mut()).zip(dp_t) {
                    *p = prob_from_lse(scale * *p, b.lse[t]);
                    *ds = *p * (dpj - delta);
                }
                window_tokens(g, m, ix, iy, &mut keys);
                let acc = &mut dq_row[iy * d..][..d];
                weighted_sum(acc, ds_slots, &keys, b.k, d);
                acc.iter_mut().for_each(|a| *a = *a * scale);
            }
        },
    );
}

/// dk, dv per key, over the queries whose window holds it; the key's slot in query (ix, iy)'s
/// window follows from that window's start.
fn key_pass<T: Float>(
    g: &Geometry,
    b: &BackwardBufs<T>,
    pds: &[T],
    dk: &mut [T],
    dv: &mut [T],
    variant: CpuVariant,
) {
    let (d, kk) = (g.d, g.k * g.k);
    let scale = T::from_f64(g.scale);
    for_rows2(
        g,
        dk,
        d,
        dv,
        d,
        #[inline(always)]
        |r, dk_row, dv_row| {
            let (m, jx) = (r / g.x, r % g.x);
            let (mut p_of, mut ds_of, mut queries) = (
                Vec::with_capacity(kk),
                Vec::with_capacity(kk),
                Vec::with_capacity(kk),
            );
            for jy in 0..g.y {
                let (dkj, dvj) = (&mut dk_row[jy * d..][..d], &mut dv_row[jy * d..][..d]);
                p_of.clear();
                ds_of.clear();
                queries.clear();
                for ix in natten_inverse_window(jx, g.x, g.k) {
                    let wx = jx - natten_window_start(ix, g.x, g.k);
                    for iy in natten_inverse_window(jy, g.y, g.k) {
                        let w = wx * g.k + (jy - natten_window_start(iy, g.y, g.k));
                        let t = g.token(m, ix, iy);
                        let slots = &pds[t * 2 * kk..][..2 * kk];
                        p_of.push(slots[w]);
                        ds_of.push(slots[kk + w]);
                        queries.push(t);
                    }
                }
                match variant {
                    CpuVariant::Naive => {
                        for ((&p, &ds), &t) in p_of.iter().zip(&ds_of).zip(&queries) {
                            axpy(dvj, p, at(b.go, t, d));
                            axpy(dkj, ds, at(b.q, t, d));
                        }
                    }
                    CpuVariant::Tiled => {
                        weighted_sum(dvj, &p_of, &queries, b.go, d);
                        weighted_sum(dkj, &ds_of, &queries, b.q, d);
                    }
                }
                dkj.iter_mut().for_each(|a| *a = *a * scale);
            }
        },
    );
}

/// 2-D neighbourhood attention: each query attends to the `kernel_size` x `kernel_size` keys of
/// its NATTEN window (see the module docs), logits `scale * q . k`.
///
/// q, k, v: [B, H, X, Y, D] of one float dtype and device; `kernel_size` odd with
/// 1 <= kernel_size <= min(X, Y) (NATTEN rejects larger windows too); X != Y is fine.
/// Returns [B, H, X, Y, D]. Differentiable in q, k and v.
///
/// On the GPU the fused kernels of `cuda/kernels/na2d.cu` run (no [L, L] score tensor; the
/// forward keeps the per-query log-sum-exp for the backward), the family picked by
/// `MVAR_NA_KERNEL` (see [`NaKernel::from_env`]); [`na2d_with_kernel`] picks it explicitly.
pub fn na2d(q: &Tensor, k: &Tensor, v: &Tensor, kernel_size: usize, scale: f64) -> Result<Tensor> {
    na2d_with_kernel(q, k, v, kernel_size, scale, NaKernel::from_env())
}

/// [`na2d`] with the kernel family chosen by the caller, for benchmarks and for checking the
/// families against each other: on the CPU `NaKernel::Naive` runs the naive variant and every
/// other family the tiled one (see the module docs). The backward runs the same family.
pub fn na2d_with_kernel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kernel_size: usize,
    scale: f64,
    kernel: NaKernel,
) -> Result<Tensor> {
    if let Some(r) = autocast_run(&[q, k, v], |x| {
        na2d_with_kernel(&x[0], &x[1], &x[2], kernel_size, scale, kernel)
    }) {
        return r;
    }
    same_device(OP, &[q, k, v])?;
    for t in [q, k, v] {
        require_float(OP, t)?;
    }
    same_dtype(OP, &[q, k, v])?;
    let shapes = || format!("q {}, k {}, v {}", q.shape(), k.shape(), v.shape());
    require_rank(OP, q, "q [B, H, X, Y, D]", 5)?;
    require_rank(OP, k, "k [B, H, X, Y, D]", 5)?;
    require_rank(OP, v, "v [B, H, X, Y, D]", 5)?;
    if k.shape() != q.shape() || v.shape() != q.shape() {
        return Err(Error::shape(
            OP,
            shapes(),
            "q, k and v of one shape [B, H, X, Y, D]",
        ));
    }
    let [b, h, x, y, d] = [0, 1, 2, 3, 4].map(|a| q.dims()[a]);
    if kernel_size.is_multiple_of(2) {
        return Err(Error::invalid(
            OP,
            format!("kernel_size {kernel_size}: expected an odd kernel_size >= 1 (a window centred on its query)"),
        ));
    }
    if kernel_size > x || kernel_size > y {
        return Err(Error::invalid(
            OP,
            format!(
                "kernel_size {kernel_size} is larger than the {x} x {y} map of q {}; expected kernel_size <= {} \
                 (NATTEN rejects windows larger than the map)",
                q.shape(),
                x.min(y)
            ),
        ));
    }
    if !scale.is_finite() {
        return Err(Error::invalid(
            OP,
            format!("scale {scale}: expected a finite number"),
        ));
    }
    let g = Geometry {
        maps: b * h,
        x,
        y,
        d,
        k: kernel_size,
        scale,
    };
    let shape = Na2dShape {
        maps: b * h,
        x,
        y,
        d,
        kernel_size,
    };
    let variant = CpuVariant::of(kernel);
    let fwd = Forward {
        g,
        variant,
        lse: Mutex::new(Vec::new()),
    };
    let mut outs = float_op(OP, &[q, k, v], &fwd, |dev, bufs| {
        // The staging and (benches only: wrong results by design) a timing diagnostic come
        // from the environment.
        let run = cn::NaRun::with_env(kernel)?;
        let (out, lse) =
            cn::na2d_forward(dev, bufs[0], bufs[1], bufs[2], shape, scale as f32, run)?;
        Ok(vec![out, lse])
    })?;
    let lse = Saved::take(
        OP,
        &mut outs,
        || fwd.lse.into_inner().unwrap_or_else(|e| e.into_inner()),
        [b, h, x, y],
        q.device(),
    )?;
    let out = out_tensor(outs, q.shape().clone(), q.device())?;
    let saved = [q.detach(), k.detach(), v.detach(), out.detach()];
    Ok(Tensor::record(out, OP, &[q, k, v], move || {
        move |grad: &Tensor| {
            let [q, k, v, o] = saved;
            let grads = backward_with_saved(
                OP,
                &[grad, &q, &k, &v, &o],
                lse,
                |lse| Backward { g, variant, lse },
                |dev, bufs, st| {
                    let lse = nth(OP, st, 0)?;
                    let run = cn::NaRun::with_env(kernel)?;
                    let (dq, dk, dv) = cn::na2d_backward(
                        dev,
                        bufs[1],
                        bufs[2],
                        bufs[3],
                        bufs[4],
                        bufs[0],
                        lse,
                        shape,
                        scale as f32,
                        run,
                    )?;
                    Ok(vec![dq, dk, dv])
                },
            )?;
            grads
                .into_iter()
                .map(|s| Ok(Some(out_tensor(vec![s], q.shape().clone(), q.device())?)))
                .collect()
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX copy of the score loop and the portable one give the same bits (the tiled
    /// variant's results must not depend on the CPU), for head dims with and without a partial
    /// last step of the chains and windows of one and two steps of lanes.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn row_scores_avx_and_portable_copies_agree_bitwise() {
        if !std::arch::is_x86_feature_detected!("avx") {
            return;
        }
        let mut g = mvar_engine::Generator::new(7);
        for (d, k) in [(64usize, 7usize), (13, 3), (70, 13), (1, 9), (8, 8)] {
            let stride = 20 + k.next_multiple_of(LANES);
            let wt: Vec<f32> = g
                .uniform((d - 1) * stride + k.next_multiple_of(LANES), -2.0, 2.0)
                .into_iter()
                .map(|x| x as f32)
                .collect();
            let u: Vec<f32> = g
                .uniform(d, -2.0, 2.0)
                .into_iter()
                .map(|x| x as f32)
                .collect();
            let (mut portable, mut avx) = (vec![0.0f32; k], vec![0.0f32; k]);
            row_scores_lanes(&wt, stride, &u, &mut portable);
            // SAFETY: the CPU has AVX (checked above).
            unsafe { row_scores_f32_avx(&wt, stride, &u, &mut avx) };
            assert_eq!(
                portable.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                avx.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "d {d}, k {k}"
            );
            // And both are the dot products they claim to be.
            for (c, &s) in portable.iter().enumerate() {
                let want: f64 = (0..d)
                    .map(|e| u[e] as f64 * wt[e * stride + c] as f64)
                    .sum();
                assert!(
                    (s as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "d {d}, k {k}, column {c}: {s} vs {want}"
                );
            }
        }
    }
}
