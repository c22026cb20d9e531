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

struct Forward {
    g: Geometry,
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
            let scale = T::from_f64(g.scale);
            for_rows2(
                &g,
                &mut out,
                g.d,
                &mut lse,
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
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok(vec![out])
    }
}

/// The fused backward: inputs [dO, q, k, v, out], outputs [dq, dk, dv].
struct Backward {
    g: Geometry,
    lse: Vec<f64>,
}

impl FloatKernel for Backward {
    fn run<T: Float>(&self, xs: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (go, q, k, v, o) = (xs[0], xs[1], xs[2], xs[3], xs[4]);
        let g = self.g;
        let d = g.d;
        let tokens = g.maps * g.x * g.y;
        let (mut dq, mut dk, mut dv) = (
            vec![T::zero(); tokens * d],
            vec![T::zero(); tokens * d],
            vec![T::zero(); tokens * d],
        );
        if d == 0 {
            return Ok(vec![dq, dk, dv]);
        }
        let scale = T::from_f64(g.scale);
        let kk = g.k * g.k;
        let lse: Vec<T> = self.lse.iter().map(|&l| T::from_f64(l)).collect();

        // dq per query over its window; on the way, p_tj and ds_tj of every (query, window
        // slot) go to `pds` ([tokens, 2, k*k]), which the key pass reads instead of recomputing
        // the two dot products per pair.
        let mut pds = vec![T::zero(); tokens * 2 * kk];
        for_rows2(
            &g,
            &mut dq,
            d,
            &mut pds,
            2 * kk,
            #[inline(always)]
            |r, dq_row, pds_row| {
                let (m, ix) = (r / g.x, r % g.x);
                for iy in 0..g.y {
                    let t = g.token(m, ix, iy);
                    let (qt, got) = (at(q, t, d), at(go, t, d));
                    let delta = dot(got, at(o, t, d));
                    let (p_slots, ds_slots) = pds_row[iy * 2 * kk..][..2 * kk].split_at_mut(kk);
                    let acc = &mut dq_row[iy * d..][..d];
                    for (w, j) in g.window(m, ix, iy).enumerate() {
                        let p = prob_from_lse(scale * dot(qt, at(k, j, d)), lse[t]);
                        let ds = p * (dot(got, at(v, j, d)) - delta);
                        p_slots[w] = p;
                        ds_slots[w] = ds;
                        axpy(acc, ds, at(k, j, d));
                    }
                    acc.iter_mut().for_each(|a| *a = *a * scale);
                }
            },
        );
        // dk, dv per key, over the queries whose window holds it; the key's slot in query
        // (ix, iy)'s window follows from that window's start.
        let pds = &pds;
        for_rows2(
            &g,
            &mut dk,
            d,
            &mut dv,
            d,
            #[inline(always)]
            |r, dk_row, dv_row| {
                let (m, jx) = (r / g.x, r % g.x);
                for jy in 0..g.y {
                    let (dkj, dvj) = (&mut dk_row[jy * d..][..d], &mut dv_row[jy * d..][..d]);
                    for ix in natten_inverse_window(jx, g.x, g.k) {
                        let wx = jx - natten_window_start(ix, g.x, g.k);
                        for iy in natten_inverse_window(jy, g.y, g.k) {
                            let w = wx * g.k + (jy - natten_window_start(iy, g.y, g.k));
                            let t = g.token(m, ix, iy);
                            let slots = &pds[t * 2 * kk..][..2 * kk];
                            axpy(dvj, slots[w], at(go, t, d));
                            axpy(dkj, slots[kk + w], at(q, t, d));
                        }
                    }
                    dkj.iter_mut().for_each(|a| *a = *a * scale);
                }
            },
        );
        Ok(vec![dq, dk, dv])
    }
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

/// [`na2d`] with the CUDA kernel family chosen by the caller (ignored on the CPU), for
/// benchmarks and for checking the families against each other. The backward runs the same
/// family.
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
    let fwd = Forward {
        g,
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
                |lse| Backward { g, lse },
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
