//! Normalisations: layer norm without affine parameters, group norm with per-channel affine,
//! and L2 normalisation (F.normalize).
//!
//! layer_norm(x, eps), over the last axis of size d (biased variance, as PyTorch):
//!
//! ```text
//! mean = sum(x) / d,  var = sum((x - mean)^2) / d,  rstd = 1 / sqrt(var + eps)
//! y    = xhat = (x - mean) * rstd
//! dx   = rstd * (g - mean(g) - xhat * mean(g * xhat))
//! ```
//!
//! `group_norm(x [N, C, *spatial], G, weight [C], bias [C], eps)`: the statistics of layer norm
//! over each group of C/G consecutive channels and all spatial positions of one sample. Those
//! elements are contiguous: a group is a row of C/G * S elements, S the spatial size. With
//! `h = g * weight[c]` and sums over one group (dx) or over samples and positions (dweight, dbias):
//!
//! ```text
//! y          = xhat * weight[c] + bias[c]
//! dx         = rstd * (h - mean(h) - xhat * mean(h * xhat))
//! dweight[c] = sum(g * xhat),  dbias[c] = sum(g)
//! ```
//!
//! l2_normalize(x, eps), over the last axis, with n = ||x||_2:
//!
//! ```text
//! y  = x / max(n, eps)
//! dx = (g - y * sum(g * y)) / n   where n >= eps
//! dx = g / eps                    where n <  eps (the denominator is the constant eps)
//! ```
//!
//! The tie n == eps takes the first branch, as PyTorch's clamp_min does.
//!
//! Each forward saves its per-row statistics (mean and rstd, or the norm) in f64, and what its
//! backward reads of the rows: group norm its input; layer norm and l2_normalize their output
//! (xhat and y, which the formulas above read instead of x). The output is usually kept anyway
//! by the op after it (AdaLN's scale multiply, the query's scale multiply, attention), so saving
//! it instead of the input frees one activation per call, which a transformer block otherwise
//! holds until its backward. Row sums accumulate in f64, the elementwise arithmetic runs in the
//! kernel's type. On the GPU the statistics are computed in f32 and stay on the device (a
//! detached f32 tensor kept by the backward closure, see `Saved`).

use std::sync::Mutex;

use mvar_engine::cpu::{run_float, FloatKernel, PARALLEL_MIN_ELEMS};
use mvar_engine::cuda::ops::norm::{self as cn, GroupNormShape};
use mvar_engine::cuda::{CudaBuffer, CudaDevice};
use mvar_engine::{Device, Error, Float, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use crate::util::{
    dispatch, float_op, in_widest_vectors, lane_sum, lane_sum2, out_tensor, require_float,
    same_device, same_dtype, written_vec,
};

// ----------------------------------------------------------------------------------------------
// statistics saved for a backward

/// What a forward leaves for its backward besides its inputs: the host statistics its CPU kernel
/// computed, or, on the GPU, device tensors (the f32 statistics the CUDA kernel wrote, plus any
/// device input the backward kernel reads, such as cross-entropy's targets).
pub(crate) enum Saved<C> {
    Cpu(C),
    Cuda(Vec<Tensor>),
}

impl<C> Saved<C> {
    /// Takes the statistics from a forward's outputs: the CUDA branch returns them as the last
    /// storage (of `shape`, f32); the CPU kernel left them in its own state, read by `cpu`.
    pub(crate) fn take(
        op: &'static str,
        outs: &mut Vec<Storage>,
        cpu: impl FnOnce() -> C,
        shape: impl Into<Shape>,
        device: &Device,
    ) -> Result<Self> {
        match device {
            Device::Cpu => Ok(Saved::Cpu(cpu())),
            Device::Cuda(_) => {
                let stats = match (outs.len(), outs.pop()) {
                    (2.., Some(s)) => s,
                    _ => {
                        return Err(Error::invalid(
                            op,
                            "the CUDA forward returned no statistics",
                        ))
                    }
                };
                Ok(Saved::Cuda(vec![Tensor::from_storage(
                    stats, shape, device,
                )?]))
            }
        }
    }

    /// Adds a device tensor the CUDA backward needs (ignored on the CPU).
    pub(crate) fn keep(mut self, t: &Tensor) -> Self {
        if let Saved::Cuda(v) = &mut self {
            v.push(t.detach());
        }
        self
    }
}

/// `b[i]`, or an error naming `op` (for the saved buffers handed to a CUDA backward).
pub(crate) fn nth<'a>(op: &'static str, b: &[&'a CudaBuffer], i: usize) -> Result<&'a CudaBuffer> {
    b.get(i)
        .copied()
        .ok_or_else(|| Error::invalid(op, "a saved statistics buffer is missing"))
}

/// Runs a backward over the float tensors `floats` (checked to be floats of one dtype): on the
/// CPU the kernel made by `cpu_kernel` from the host statistics, on the GPU `cuda` with the
/// floats' buffers and the saved device buffers.
pub(crate) fn backward_with_saved<C, K: FloatKernel>(
    op: &'static str,
    floats: &[&Tensor],
    saved: Saved<C>,
    cpu_kernel: impl FnOnce(C) -> K,
    cuda: impl FnOnce(&CudaDevice, &[&CudaBuffer], &[&CudaBuffer]) -> Result<Vec<CudaBuffer>>,
) -> Result<Vec<Storage>> {
    for t in floats {
        require_float(op, t)?;
    }
    same_dtype(op, floats)?;
    let k = floats.len();
    let (cpu, on_device) = match saved {
        Saved::Cpu(c) => (Some(c), vec![]),
        Saved::Cuda(v) => (None, v),
    };
    let mut ts = floats.to_vec();
    ts.extend(on_device.iter());
    dispatch(
        op,
        &ts,
        |s| {
            let c = cpu.ok_or_else(|| {
                Error::invalid(op, "statistics saved on the GPU for a CPU backward")
            })?;
            run_float(op, &s[..k], &cpu_kernel(c))
        },
        |dev, b| cuda(dev, &b[..k], &b[k..]),
    )
}

/// Fills a new output of `len` elements (rows of `d`) with `f(row index, row)` per row and
/// collects what each call returns; threaded for large inputs. The rows start uninitialised
/// (no zero fill: [`written_vec`]).
///
/// # Safety
/// `f` must write every element of the row it is given: each caller below walks the whole
/// row, `o.write(..)` in a loop zipped over the row and an input row of the same length d.
unsafe fn map_rows<T: Float, S: Send + Default + Clone>(
    len: usize,
    d: usize,
    f: impl Fn(usize, &mut [MaybeUninit<T>]) -> S + Sync + Send,
) -> (Vec<T>, Vec<S>) {
    if len == 0 || d == 0 {
        return (vec![T::zero(); len], vec![]);
    }
    let mut side = vec![S::default(); len / d];
    // Each row in the widest vectors the CPU has: the callers' loops are inlined into `f`.
    let run = |(r, (row, s)): (usize, (&mut [MaybeUninit<T>], &mut S))| {
        *s = in_widest_vectors(
            #[inline(always)]
            || f(r, row),
        )
    };
    // SAFETY: the rows tile the output, and `f` writes each row whole (this function's
    // contract).
    let out = unsafe {
        written_vec(len, |out| {
            if len >= PARALLEL_MIN_ELEMS {
                out.par_chunks_mut(d)
                    .zip(side.par_iter_mut())
                    .enumerate()
                    .for_each(run);
            } else {
                out.chunks_mut(d)
                    .zip(side.iter_mut())
                    .enumerate()
                    .for_each(run);
            }
        })
    };
    (out, side)
}

/// [`map_rows`] for the normalisations: each row's (mean, rstd) first (returned per row), then
/// `apply(row index, row, output row, mean, rstd)` writes the output.
///
/// # Safety
/// `apply` must write every element of the output row it is given (as for [`map_rows`]).
#[inline(always)]
unsafe fn map_normalized_rows<T: Float>(
    x: &[T],
    d: usize,
    eps: f64,
    apply: impl Fn(usize, &[T], &mut [MaybeUninit<T>], f64, f64) + Sync + Send,
) -> (Vec<T>, Vec<(f64, f64)>) {
    // SAFETY: `apply` writes the whole row (this function's contract).
    unsafe {
        map_rows(
            x.len(),
            d,
            #[inline(always)]
            |r, y: &mut [MaybeUninit<T>]| {
                let row = &x[r * d..(r + 1) * d];
                let (mean, rstd) = row_stats(row, eps);
                apply(r, row, y, mean, rstd);
                (mean, rstd)
            },
        )
    }
}

/// (mean, rstd) of one row, in f64, two-pass.
#[inline(always)]
fn row_stats<T: Float>(x: &[T], eps: f64) -> (f64, f64) {
    let d = x.len() as f64;
    let mean = lane_sum(x, |v| v.as_f64()) / d;
    let var = lane_sum(x, |v| (v.as_f64() - mean) * (v.as_f64() - mean)) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

fn check_eps(op: &'static str, eps: f64) -> Result<()> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::invalid(
            op,
            format!("eps {eps}: expected a finite value >= 0"),
        ));
    }
    Ok(())
}

/// The number of rows of the last axis: the product of the other axes (also when the last axis
/// is empty, so it is not the element count over the axis size).
fn leading_rows(op: &'static str, x: &Tensor) -> Result<usize> {
    x.dims()[..x.rank().saturating_sub(1)]
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid(op, format!("shape {}: too many rows", x.shape())))
}

/// The size of the last axis, or an error for a rank-0 tensor.
fn last_axis(op: &'static str, x: &Tensor) -> Result<usize> {
    x.dims().last().copied().ok_or_else(|| {
        Error::shape(
            op,
            format!("input of shape {}", x.shape()),
            "a tensor of rank >= 1",
        )
    })
}

// ----------------------------------------------------------------------------------------------
// layer norm

/// Input [x]; leaves (mean, rstd) per row in `stats`.
struct LayerNormFwd {
    d: usize,
    eps: f64,
    stats: Mutex<Vec<(f64, f64)>>,
}
impl FloatKernel for LayerNormFwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        // SAFETY: each row is written by one loop zipped over it and the input row (both d long).
        let (y, stats) = unsafe {
            map_normalized_rows(
                x[0],
                self.d,
                self.eps,
                #[inline(always)]
                |_, row, y, mean, rstd| {
                    let (m, s) = (T::from_f64(mean), T::from_f64(rstd));
                    for (o, &v) in y.iter_mut().zip(row) {
                        o.write((v - m) * s);
                    }
                },
            )
        };
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        Ok(vec![y])
    }
}

/// Inputs [xhat (the forward's output), g].
struct LayerNormBwd {
    d: usize,
    stats: Vec<(f64, f64)>,
}
impl FloatKernel for LayerNormBwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let d = self.d;
        // SAFETY: the one loop zipped over dx's row and the input rows (all d long) writes it whole.
        let (dx, _) = unsafe {
            map_rows(
                x[0].len(),
                d,
                #[inline(always)]
                |r, dx: &mut [MaybeUninit<T>]| {
                    let (hr, gr) = (&x[0][r * d..(r + 1) * d], &x[1][r * d..(r + 1) * d]);
                    let s = T::from_f64(self.stats[r].1);
                    let sg = lane_sum(gr, |g| g.as_f64());
                    let sgx = lane_sum2(hr, gr, |xh, g| (g * xh).as_f64());
                    let (mg, mgx) = (T::from_f64(sg / d as f64), T::from_f64(sgx / d as f64));
                    for ((o, &xh), &g) in dx.iter_mut().zip(hr).zip(gr) {
                        o.write(s * (g - mg - xh * mgx));
                    }
                },
            )
        };
        Ok(vec![dx])
    }
}

/// Layer norm over the last axis without affine parameters (PyTorch's
/// `F.layer_norm(x, x.shape[-1:], eps=eps)`, biased variance). Any rank >= 1; same shape and
/// dtype as `x`. `eps` must be finite and >= 0.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    require_float(OP, x)?;
    check_eps(OP, eps)?;
    let d = last_axis(OP, x)?;
    let rows = leading_rows(OP, x)?;
    let k = LayerNormFwd {
        d,
        eps,
        stats: Mutex::new(vec![]),
    };
    let mut outs = float_op(OP, &[x], &k, |dev, b| {
        let (y, stats) = cn::layer_norm_forward(dev, b[0], rows, d, eps as f32)?;
        Ok(vec![y, stats])
    })?;
    let stats = Saved::take(
        OP,
        &mut outs,
        || k.stats.into_inner().unwrap_or_else(|e| e.into_inner()),
        [rows, 2],
        x.device(),
    )?;
    let out = out_tensor(outs, x.shape().clone(), x.device())?;
    let xhat = out.detach();
    Ok(Tensor::record(out, OP, &[x], move || {
        move |g: &Tensor| {
            let dx = backward_with_saved(
                OP,
                &[&xhat, g],
                stats,
                |stats| LayerNormBwd { d, stats },
                |dev, b, st| {
                    let stats = nth(OP, st, 0)?;
                    Ok(vec![cn::layer_norm_backward(
                        dev, b[0], b[1], stats, rows, d,
                    )?])
                },
            )?;
            Ok(vec![Some(out_tensor(dx, g.shape().clone(), g.device())?)])
        }
    }))
}

// ----------------------------------------------------------------------------------------------
// group norm

/// A group norm problem: `groups` groups of `cpg` channels, `spatial` positions per channel,
/// so that group row r (r = sample * groups + group) holds `cpg * spatial` elements.
#[derive(Clone, Copy)]
struct Groups {
    groups: usize,
    cpg: usize,
    spatial: usize,
}
impl Groups {
    fn row(&self) -> usize {
        self.cpg * self.spatial
    }
    /// The channel of element `i` of group row `r`.
    fn channel(&self, r: usize, i: usize) -> usize {
        (r % self.groups) * self.cpg + i / self.spatial
    }
}

/// Inputs [x, weight, bias]; leaves (mean, rstd) per group row in `stats`.
struct GroupNormFwd {
    g: Groups,
    eps: f64,
    stats: Mutex<Vec<(f64, f64)>>,
}
impl FloatKernel for GroupNormFwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let gr = self.g;
        let (w, b) = (x[1], x[2]);
        // SAFETY: the channel chunks of a row tile it, and each is written by one loop zipped over it and
        // the input chunk of the same length.
        let (y, stats) = unsafe {
            map_normalized_rows(
                x[0],
                gr.row(),
                self.eps,
                #[inline(always)]
                |r, row, y, mean, rstd| {
                    // Channel by channel, so that rstd and the weight fold into one scale.
                    let first = gr.channel(r, 0);
                    for (j, (ys, xs)) in y
                        .chunks_mut(gr.spatial)
                        .zip(row.chunks(gr.spatial))
                        .enumerate()
                    {
                        let c = first + j;
                        // (x - mean) * scale + bias, not x * scale + (bias - mean * scale): with
                        // a large rstd (a group of near-equal values, eps 1e-6) the folded shift
                        // cancels against x * scale and loses the bias's low bits; x - mean does
                        // not (it is exact for values near the mean).
                        let (m, sc) = (T::from_f64(mean), T::from_f64(rstd * w[c].as_f64()));
                        let bc = b[c];
                        for (o, &v) in ys.iter_mut().zip(xs) {
                            o.write((v - m) * sc + bc);
                        }
                    }
                },
            )
        };
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        Ok(vec![y])
    }
}

/// Inputs [x, weight, g]; outputs [dx, dweight, dbias].
struct GroupNormBwd {
    g: Groups,
    channels: usize,
    stats: Vec<(f64, f64)>,
}
impl FloatKernel for GroupNormBwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (gr, d) = (self.g, self.g.row());
        let (xs, w, gs) = (x[0], x[1], x[2]);
        // Each group row also returns its channels' partial sums of g * xhat and g; the
        // per-channel totals add these over the samples afterwards.
        // SAFETY: the channel chunks of dx's row tile it, and each is written by one loop zipped over it
        // and the equally long input chunks.
        let (dx, partials) = unsafe {
            map_rows(
                xs.len(),
                d,
                #[inline(always)]
                |r, dx: &mut [MaybeUninit<T>]| {
                    let (xr, g) = (&xs[r * d..(r + 1) * d], &gs[r * d..(r + 1) * d]);
                    let (mean, rstd) = self.stats[r];
                    let first = gr.channel(r, 0);
                    // Per channel: sum g and sum g * xhat (the weight/bias gradients), from which the
                    // row's sums of h = g * w and h * xhat follow without another pass.
                    let mut part = vec![0.0f64; 2 * gr.cpg];
                    let (mut sh, mut shx) = (0.0f64, 0.0f64);
                    for (j, (xc, gc)) in xr.chunks(gr.spatial).zip(g.chunks(gr.spatial)).enumerate()
                    {
                        let sg = lane_sum(gc, |v| v.as_f64());
                        let sgx =
                            lane_sum2(xc, gc, |v, gv| gv.as_f64() * (v.as_f64() - mean)) * rstd;
                        part[2 * j] = sgx;
                        part[2 * j + 1] = sg;
                        let wc = w[first + j].as_f64();
                        sh += wc * sg;
                        shx += wc * sgx;
                    }
                    let (mh, mhx) = (sh / d as f64, shx / d as f64);
                    for (j, ((oc, xc), gc)) in dx
                        .chunks_mut(gr.spatial)
                        .zip(xr.chunks(gr.spatial))
                        .zip(g.chunks(gr.spatial))
                        .enumerate()
                    {
                        // dx = rstd * (g w - mh - xhat mhx), xhat = (x - mean) rstd, as
                        // dx = g * a + (x - mean) * b + c per channel (x - mean rather than a
                        // shift folded into c, which cancels like the forward's did).
                        let wc = w[first + j].as_f64();
                        let a = T::from_f64(rstd * wc);
                        let b = T::from_f64(-rstd * rstd * mhx);
                        let c = T::from_f64(-rstd * mh);
                        let m = T::from_f64(mean);
                        for (o, (&v, &gv)) in oc.iter_mut().zip(xc.iter().zip(gc)) {
                            o.write(gv * a + (v - m) * b + c);
                        }
                    }
                    part
                },
            )
        };
        let mut dw = vec![0.0f64; self.channels];
        let mut db = vec![0.0f64; self.channels];
        for (r, part) in partials.iter().enumerate() {
            for (j, p) in part.chunks_exact(2).enumerate() {
                let c = (r % gr.groups) * gr.cpg + j;
                dw[c] += p[0];
                db[c] += p[1];
            }
        }
        let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
        Ok(vec![dx, cast(dw), cast(db)])
    }
}

/// Group norm with per-channel affine parameters (PyTorch's `F.group_norm`, biased variance,
/// eps inside the square root). `x` [N, C, *spatial] with any number (>= 0) of spatial axes;
/// `weight` and `bias` `[C]` of x's dtype; `num_groups` >= 1 must divide C. Gradients for x,
/// weight and bias. The VQVAE uses 32 groups and eps 1e-6.
pub fn group_norm(
    x: &Tensor,
    num_groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    const OP: &str = "group_norm";
    for t in [x, weight, bias] {
        require_float(OP, t)?;
    }
    same_device(OP, &[x, weight, bias])?;
    same_dtype(OP, &[x, weight, bias])?;
    check_eps(OP, eps)?;
    if x.rank() < 2 {
        return Err(Error::shape(
            OP,
            format!("input of shape {}", x.shape()),
            "an input [N, C, *spatial]",
        ));
    }
    let channels = x.dims()[1];
    if num_groups == 0 || !channels.is_multiple_of(num_groups) {
        return Err(Error::invalid(
            OP,
            format!("{num_groups} groups for {channels} channels (input {}): expected a group count >= 1 that divides the channels", x.shape()),
        ));
    }
    for (what, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [channels] {
            return Err(Error::shape(
                OP,
                format!("{what} of shape {} for input {}", t.shape(), x.shape()),
                format!("{what} of shape [{channels}]"),
            ));
        }
    }
    let g = Groups {
        groups: num_groups,
        cpg: channels / num_groups,
        spatial: x.dims()[2..].iter().product(),
    };
    let gs = GroupNormShape {
        batch: x.dims()[0],
        channels,
        groups: num_groups,
        spatial: g.spatial,
    };
    let stat_rows = gs
        .batch
        .checked_mul(num_groups)
        .ok_or_else(|| Error::invalid(OP, format!("input {}: too many groups", x.shape())))?;
    let k = GroupNormFwd {
        g,
        eps,
        stats: Mutex::new(vec![]),
    };
    let mut outs = float_op(OP, &[x, weight, bias], &k, |dev, b| {
        let (y, stats) = cn::group_norm_forward(dev, b[0], b[1], b[2], gs, eps as f32)?;
        Ok(vec![y, stats])
    })?;
    let stats = Saved::take(
        OP,
        &mut outs,
        || k.stats.into_inner().unwrap_or_else(|e| e.into_inner()),
        [stat_rows, 2],
        x.device(),
    )?;
    let out = out_tensor(outs, x.shape().clone(), x.device())?;
    let (sx, sw) = (x.detach(), weight.detach());
    Ok(Tensor::record(out, OP, &[x, weight, bias], move || {
        move |grad: &Tensor| {
            let v = backward_with_saved(
                OP,
                &[&sx, &sw, grad],
                stats,
                |stats| GroupNormBwd { g, channels, stats },
                |dev, b, st| {
                    let stats = nth(OP, st, 0)?;
                    let (dx, dw, db) = cn::group_norm_backward(dev, b[0], b[1], b[2], stats, gs)?;
                    Ok(vec![dx, dw, db])
                },
            )?;
            let mut v = v.into_iter();
            let mut next = |shape: &[usize]| match v.next() {
                Some(s) => Tensor::from_storage(s, shape.to_vec(), grad.device()).map(Some),
                None => Err(Error::invalid(
                    OP,
                    "backward kernel returned too few outputs",
                )),
            };
            Ok(vec![
                next(sx.dims())?,
                next(&[channels])?,
                next(&[channels])?,
            ])
        }
    }))
}

// ----------------------------------------------------------------------------------------------
// l2 normalize

/// Input [x]; leaves each row's L2 norm in `norms`.
struct L2NormalizeFwd {
    d: usize,
    eps: f64,
    norms: Mutex<Vec<f64>>,
}
impl FloatKernel for L2NormalizeFwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (d, eps) = (self.d, self.eps);
        // SAFETY: the one loop zipped over the row and the input row (both d long) writes it whole.
        let (y, norms) = unsafe {
            map_rows(
                x[0].len(),
                d,
                #[inline(always)]
                |r, y: &mut [MaybeUninit<T>]| {
                    let row = &x[0][r * d..(r + 1) * d];
                    let norm = lane_sum(row, |v| v.as_f64() * v.as_f64()).sqrt();
                    let denom = T::from_f64(norm.max(eps));
                    for (o, &v) in y.iter_mut().zip(row) {
                        o.write(v / denom);
                    }
                    norm
                },
            )
        };
        *self.norms.lock().unwrap_or_else(|e| e.into_inner()) = norms;
        Ok(vec![y])
    }
}

/// Inputs [y (the forward's output), g].
struct L2NormalizeBwd {
    d: usize,
    eps: f64,
    norms: Vec<f64>,
}
impl FloatKernel for L2NormalizeBwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let d = self.d;
        // SAFETY: either branch writes the whole row in one loop zipped over it and d-long input rows.
        let (dx, _) = unsafe {
            map_rows(
                x[0].len(),
                d,
                #[inline(always)]
                |r, dx: &mut [MaybeUninit<T>]| {
                    let (yr, gr) = (&x[0][r * d..(r + 1) * d], &x[1][r * d..(r + 1) * d]);
                    let norm = self.norms[r];
                    if norm >= self.eps {
                        let n = T::from_f64(norm);
                        let dot = T::from_f64(lane_sum2(yr, gr, |y, g| (y * g).as_f64()));
                        for ((o, &y), &g) in dx.iter_mut().zip(yr).zip(gr) {
                            o.write((g - y * dot) / n);
                        }
                    } else {
                        let e = T::from_f64(self.eps);
                        for (o, &g) in dx.iter_mut().zip(gr) {
                            o.write(g / e);
                        }
                    }
                },
            )
        };
        Ok(vec![dx])
    }
}

/// L2 normalisation over the last axis with `F.normalize` semantics: x / max(||x||_2, eps).
/// Any rank >= 1; same shape and dtype as `x`; `eps` finite and >= 0 (VAR uses 1e-12 on q and
/// k). The backward is exact on both sides of the max (see the module docs).
pub fn l2_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    const OP: &str = "l2_normalize";
    require_float(OP, x)?;
    check_eps(OP, eps)?;
    let d = last_axis(OP, x)?;
    let rows = leading_rows(OP, x)?;
    let k = L2NormalizeFwd {
        d,
        eps,
        norms: Mutex::new(vec![]),
    };
    let mut outs = float_op(OP, &[x], &k, |dev, b| {
        let (y, norms) = cn::l2_normalize_forward(dev, b[0], rows, d, eps as f32)?;
        Ok(vec![y, norms])
    })?;
    let norms = Saved::take(
        OP,
        &mut outs,
        || k.norms.into_inner().unwrap_or_else(|e| e.into_inner()),
        [rows],
        x.device(),
    )?;
    let out = out_tensor(outs, x.shape().clone(), x.device())?;
    let y = out.detach();
    Ok(Tensor::record(out, OP, &[x], move || {
        move |g: &Tensor| {
            let dx = backward_with_saved(
                OP,
                &[&y, g],
                norms,
                |norms| L2NormalizeBwd { d, eps, norms },
                |dev, b, st| {
                    let norms = nth(OP, st, 0)?;
                    Ok(vec![cn::l2_normalize_backward(
                        dev, b[0], b[1], norms, rows, d, eps as f32,
                    )?])
                },
            )?;
            Ok(vec![Some(out_tensor(dx, g.shape().clone(), g.device())?)])
        }
    }))
}
