//! Resampling of NCHW feature maps, each plane [H, W] on its own: nearest upsampling by an
//! integer factor, area downsampling and bicubic upsampling, matching PyTorch's
//! `F.interpolate(..., mode='nearest' | 'area' | 'bicubic')` with `align_corners=False` and no
//! antialias.
//!
//! - `upsample_nearest(x, f)`: y[i, j] = x[i / f, j / f] (integer division), output [H*f, W*f].
//! - `area_downsample(x, oh, ow)` (adaptive average pooling): output row i averages input rows
//!   floor(i*H/oh) ..= ceil((i+1)*H/oh) - 1, the same for columns; y is the mean over the
//!   rectangle. Any sizes, including windows that overlap (16 -> 13) or an output larger than
//!   the input.
//! - `bicubic_upsample(x, oh, ow)`: separable cubic convolution with A = -0.75. Per axis,
//!   scale = in/out, src = (dst + 0.5)*scale - 0.5 (not clamped), i0 = floor(src),
//!   t = src - i0, taps i0-1 ..= i0+2 clamped to [0, in-1] with weights
//!   W(t+1), W(t), W(1-t), W(2-t), where W(d) = ((A+2)d - (A+3))d^2 + 1 for d <= 1 and
//!   ((A d - 5A)d + 8A)d - 4A for 1 < d < 2. The weights of each position sum to 1, so in == out
//!   reproduces the input. Columns are interpolated first, then rows (PyTorch's order).
//!
//! Every backward is the transpose of its forward (a scatter-add of the same weights), computed
//! from the per-axis tables the forward uses.
//!
//! On CUDA, `upsample_nearest` runs the kernels of `cuda/kernels/conv.cu`, area and bicubic
//! resampling those of `cuda/kernels/interp.cu` (f32 weights and sums; both backwards gathers).

use mvar_engine::cpu::{FloatKernel, PARALLEL_MIN_ELEMS};
use mvar_engine::cuda::ops::conv as cu;
use mvar_engine::cuda::ops::interp as ci;
use mvar_engine::{Error, Float, Result, Tensor};
use rayon::prelude::*;

use crate::util::{float_op, out_tensor, output_len, require_float, require_rank};

/// N*C planes of [h, w] in, [oh, ow] out.
#[derive(Debug, Clone, Copy)]
struct Planes {
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

impl Planes {
    /// Checks x [N, C, H, W] (float, non-empty H and W) and the output size.
    fn new(op: &'static str, x: &Tensor, oh: usize, ow: usize) -> Result<(Planes, [usize; 4])> {
        require_float(op, x)?;
        require_rank(op, x, "input [N, C, H, W]", 4)?;
        let d = x.dims();
        if d[2] == 0 || d[3] == 0 {
            return Err(Error::shape(
                op,
                format!("input of shape {}", x.shape()),
                "non-empty H and W",
            ));
        }
        if oh == 0 || ow == 0 {
            return Err(Error::invalid(
                op,
                format!(
                    "output size {oh}x{ow} for input {}: expected sizes >= 1",
                    x.shape()
                ),
            ));
        }
        let planes = d[0] * d[1];
        output_len(op, &[planes, oh, ow])?;
        Ok((
            Planes {
                planes,
                h: d[2],
                w: d[3],
                oh,
                ow,
            },
            [d[0], d[1], oh, ow],
        ))
    }

    fn in_len(&self) -> usize {
        self.h * self.w
    }

    fn out_len(&self) -> usize {
        self.oh * self.ow
    }
}

/// Runs `f(plane index, plane)` over `out` cut into planes of `plane` elements, threaded when
/// there is enough work (the larger of `out` and the input it reads, `in_len` elements).
fn per_plane<T: Send>(
    out: &mut [T],
    plane: usize,
    in_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if plane == 0 {
        return;
    }
    if out.len().max(in_len) >= PARALLEL_MIN_ELEMS {
        out.par_chunks_mut(plane)
            .enumerate()
            .for_each(|(i, p)| f(i, p));
    } else {
        out.chunks_mut(plane).enumerate().for_each(|(i, p)| f(i, p));
    }
}

// ----------------------------------------------------------------------------------------------
// nearest

struct NearestFwd {
    p: Planes,
    f: usize,
}
impl FloatKernel for NearestFwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (p, f) = (self.p, self.f);
        let mut out = vec![T::zero(); p.planes * p.out_len()];
        per_plane(&mut out, p.out_len(), x[0].len(), |i, y| {
            let xp = &x[0][i * p.in_len()..][..p.in_len()];
            for (oy, row) in y.chunks_mut(p.ow).enumerate() {
                let src = &xp[(oy / f) * p.w..][..p.w];
                for (d, &v) in row.chunks_mut(f).zip(src) {
                    d.fill(v);
                }
            }
        });
        Ok(vec![out])
    }
}

/// dx[i, j] = sum of the f x f block of dy that x[i, j] was copied to.
struct NearestBwd {
    p: Planes,
    f: usize,
}
impl FloatKernel for NearestBwd {
    fn run<T: Float>(&self, g: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (p, f) = (self.p, self.f);
        let mut dx = vec![T::zero(); p.planes * p.in_len()];
        per_plane(&mut dx, p.in_len(), g[0].len(), |i, dxp| {
            let gp = &g[0][i * p.out_len()..][..p.out_len()];
            for (iy, row) in dxp.chunks_mut(p.w).enumerate() {
                for gy in gp[iy * f * p.ow..][..f * p.ow].chunks(p.ow) {
                    for (d, blk) in row.iter_mut().zip(gy.chunks(f)) {
                        *d += blk.iter().copied().sum::<T>();
                    }
                }
            }
        });
        Ok(vec![dx])
    }
}

/// Nearest-neighbour upsampling of x [N, C, H, W] by an integer factor >= 1:
/// [N, C, H*factor, W*factor], every input pixel copied to a factor x factor block.
pub fn upsample_nearest(x: &Tensor, factor: usize) -> Result<Tensor> {
    const OP: &str = "upsample_nearest";
    if factor == 0 {
        return Err(Error::invalid(
            OP,
            "factor 0: expected an integer factor >= 1",
        ));
    }
    let (h, w) = match x.dims() {
        [_, _, h, w] => (*h, *w),
        _ => (0, 0),
    };
    let too_big = || {
        Error::invalid(
            OP,
            format!("factor {factor} for input {}: sizes overflow", x.shape()),
        )
    };
    let (oh, ow) = (
        h.checked_mul(factor).ok_or_else(too_big)?,
        w.checked_mul(factor).ok_or_else(too_big)?,
    );
    let (p, dims) = Planes::new(OP, x, oh.max(1), ow.max(1))?;
    let out = float_op(OP, &[x], &NearestFwd { p, f: factor }, |dev, b| {
        Ok(vec![cu::upsample_nearest(
            dev, b[0], p.planes, p.h, p.w, factor,
        )?])
    })?;
    let out = out_tensor(out, dims, x.device())?;
    let in_shape = x.shape().clone();
    Ok(Tensor::record(out, OP, &[x], move || {
        move |g: &Tensor| {
            let dx = float_op(OP, &[g], &NearestBwd { p, f: factor }, |dev, b| {
                Ok(vec![cu::upsample_nearest_backward(
                    dev, b[0], p.planes, p.h, p.w, factor,
                )?])
            })?;
            Ok(vec![Some(out_tensor(dx, in_shape, g.device())?)])
        }
    }))
}

// ----------------------------------------------------------------------------------------------
// area

/// The input window [start, end) that each output index averages along one axis.
fn area_axis(in_len: usize, out_len: usize) -> Vec<(usize, usize)> {
    // u128: i * in_len may not fit a usize for absurd sizes, and the window formula must not wrap.
    let (n, m) = (in_len as u128, out_len as u128);
    (0..m)
        .map(|i| ((i * n / m) as usize, ((i + 1) * n).div_ceil(m) as usize))
        .collect()
}

struct AreaFwd {
    p: Planes,
}
impl FloatKernel for AreaFwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let p = self.p;
        let (rows, cols) = (area_axis(p.h, p.oh), area_axis(p.w, p.ow));
        let mut out = vec![T::zero(); p.planes * p.out_len()];
        per_plane(&mut out, p.out_len(), x[0].len(), |i, y| {
            let xp = &x[0][i * p.in_len()..][..p.in_len()];
            for (&(r0, r1), yrow) in rows.iter().zip(y.chunks_mut(p.ow)) {
                for (&(c0, c1), d) in cols.iter().zip(yrow.iter_mut()) {
                    let mut s = 0.0f64;
                    for r in r0..r1 {
                        s += xp[r * p.w + c0..r * p.w + c1]
                            .iter()
                            .map(|v| v.as_f64())
                            .sum::<f64>();
                    }
                    *d = T::from_f64(s / ((r1 - r0) * (c1 - c0)) as f64);
                }
            }
        });
        Ok(vec![out])
    }
}

/// dx[r, c] = sum over the output cells whose window holds (r, c) of dy / window size.
struct AreaBwd {
    p: Planes,
}
impl FloatKernel for AreaBwd {
    fn run<T: Float>(&self, g: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let p = self.p;
        let (rows, cols) = (area_axis(p.h, p.oh), area_axis(p.w, p.ow));
        let mut dx = vec![T::zero(); p.planes * p.in_len()];
        per_plane(&mut dx, p.in_len(), g[0].len(), |i, dxp| {
            let gp = &g[0][i * p.out_len()..][..p.out_len()];
            for (&(r0, r1), grow) in rows.iter().zip(gp.chunks(p.ow)) {
                for (&(c0, c1), &gv) in cols.iter().zip(grow) {
                    let v = gv / T::from_usize((r1 - r0) * (c1 - c0));
                    for r in r0..r1 {
                        dxp[r * p.w + c0..r * p.w + c1]
                            .iter_mut()
                            .for_each(|d| *d += v);
                    }
                }
            }
        });
        Ok(vec![dx])
    }
}

/// Area resampling (PyTorch `mode='area'`, i.e. adaptive average pooling) of x [N, C, H, W] to
/// [N, C, out_h, out_w]; see the module docs for the windows.
pub fn area_downsample(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    const OP: &str = "area_downsample";
    let (p, dims) = Planes::new(OP, x, out_h, out_w)?;
    let out = float_op(OP, &[x], &AreaFwd { p }, |dev, b| {
        Ok(vec![ci::area_downsample(
            dev, b[0], p.planes, p.h, p.w, p.oh, p.ow,
        )?])
    })?;
    let out = out_tensor(out, dims, x.device())?;
    let in_shape = x.shape().clone();
    Ok(Tensor::record(out, OP, &[x], move || {
        move |g: &Tensor| {
            let dx = float_op(OP, &[g], &AreaBwd { p }, |dev, b| {
                Ok(vec![ci::area_downsample_backward(
                    dev, b[0], p.planes, p.h, p.w, p.oh, p.ow,
                )?])
            })?;
            Ok(vec![Some(out_tensor(dx, in_shape, g.device())?)])
        }
    }))
}

// ----------------------------------------------------------------------------------------------
// bicubic

/// The cubic convolution constant PyTorch uses.
const CUBIC_A: f64 = -0.75;

/// The cubic convolution kernel W(d).
fn cubic_weight(d: f64) -> f64 {
    let (a, x) = (CUBIC_A, d.abs());
    if x <= 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// The four input indices and weights one output index reads along an axis.
#[derive(Debug, Clone, Copy)]
struct CubicTaps {
    idx: [usize; 4],
    w: [f64; 4],
}

/// The taps of every output index along one axis (see the module docs). Forward and backward
/// both read this table, so they cannot disagree.
fn cubic_axis(in_len: usize, out_len: usize) -> Vec<CubicTaps> {
    let scale = in_len as f64 / out_len as f64;
    let last = in_len as f64 - 1.0;
    (0..out_len)
        .map(|o| {
            let src = (o as f64 + 0.5) * scale - 0.5;
            let i0 = src.floor();
            let t = src - i0;
            // Clamped in f64 before the cast, so no index is ever negative or past the end.
            let idx = std::array::from_fn(|k| (i0 - 1.0 + k as f64).clamp(0.0, last) as usize);
            CubicTaps {
                idx,
                w: [t + 1.0, t, 1.0 - t, 2.0 - t].map(cubic_weight),
            }
        })
        .collect()
}

// Both bicubic kernels accumulate in f64 whatever T is: a backward into a small input sums up to
// 16 * out_h * out_w terms per element (256 per axis for 1 -> 16), and this backend is the
// reference the GPU kernels are checked against.

struct BicubicFwd {
    p: Planes,
}
impl FloatKernel for BicubicFwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let p = self.p;
        let (rows, cols) = (cubic_axis(p.h, p.oh), cubic_axis(p.w, p.ow));
        let mut out = vec![T::zero(); p.planes * p.out_len()];
        per_plane(&mut out, p.out_len(), x[0].len(), |i, y| {
            let xp = &x[0][i * p.in_len()..][..p.in_len()];
            // Along W first: tmp [H, ow].
            let mut tmp = vec![0.0f64; p.h * p.ow];
            for (src, trow) in xp.chunks(p.w).zip(tmp.chunks_mut(p.ow)) {
                for (c, d) in cols.iter().zip(trow.iter_mut()) {
                    *d = (0..4).map(|k| c.w[k] * src[c.idx[k]].as_f64()).sum();
                }
            }
            // Then along H.
            let mut acc = vec![0.0f64; p.ow];
            for (r, yrow) in rows.iter().zip(y.chunks_mut(p.ow)) {
                acc.fill(0.0);
                for k in 0..4 {
                    let trow = &tmp[r.idx[k] * p.ow..][..p.ow];
                    for (a, &v) in acc.iter_mut().zip(trow) {
                        *a += r.w[k] * v;
                    }
                }
                for (d, &a) in yrow.iter_mut().zip(&acc) {
                    *d = T::from_f64(a);
                }
            }
        });
        Ok(vec![out])
    }
}

/// The transpose of `BicubicFwd`: dy scattered back along H, then along W.
struct BicubicBwd {
    p: Planes,
}
impl FloatKernel for BicubicBwd {
    fn run<T: Float>(&self, g: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let p = self.p;
        let (rows, cols) = (cubic_axis(p.h, p.oh), cubic_axis(p.w, p.ow));
        let mut dx = vec![T::zero(); p.planes * p.in_len()];
        per_plane(&mut dx, p.in_len(), g[0].len(), |i, dxp| {
            let gp = &g[0][i * p.out_len()..][..p.out_len()];
            let mut tmp = vec![0.0f64; p.h * p.ow];
            for (r, grow) in rows.iter().zip(gp.chunks(p.ow)) {
                for k in 0..4 {
                    let trow = &mut tmp[r.idx[k] * p.ow..][..p.ow];
                    for (d, &v) in trow.iter_mut().zip(grow) {
                        *d += r.w[k] * v.as_f64();
                    }
                }
            }
            let mut acc = vec![0.0f64; p.w];
            for (trow, drow) in tmp.chunks(p.ow).zip(dxp.chunks_mut(p.w)) {
                acc.fill(0.0);
                for (c, &v) in cols.iter().zip(trow) {
                    for k in 0..4 {
                        acc[c.idx[k]] += c.w[k] * v;
                    }
                }
                for (d, &a) in drow.iter_mut().zip(&acc) {
                    *d = T::from_f64(a);
                }
            }
        });
        Ok(vec![dx])
    }
}

/// Bicubic resampling (PyTorch `mode='bicubic'`, `align_corners=False`, no antialias) of
/// x [N, C, H, W] to [N, C, out_h, out_w]; see the module docs for the exact taps. Any sizes.
pub fn bicubic_upsample(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    const OP: &str = "bicubic_upsample";
    let (p, dims) = Planes::new(OP, x, out_h, out_w)?;
    let out = float_op(OP, &[x], &BicubicFwd { p }, |dev, b| {
        Ok(vec![ci::bicubic_upsample(
            dev, b[0], p.planes, p.h, p.w, p.oh, p.ow,
        )?])
    })?;
    let out = out_tensor(out, dims, x.device())?;
    let in_shape = x.shape().clone();
    Ok(Tensor::record(out, OP, &[x], move || {
        move |g: &Tensor| {
            let dx = float_op(OP, &[g], &BicubicBwd { p }, |dev, b| {
                Ok(vec![ci::bicubic_upsample_backward(
                    dev, b[0], p.planes, p.h, p.w, p.oh, p.ow,
                )?])
            })?;
            Ok(vec![Some(out_tensor(dx, in_shape, g.device())?)])
        }
    }))
}
