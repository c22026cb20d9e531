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
//! Each forward saves its input and its per-row statistics (mean and rstd, or the norm) in f64;
//! row sums accumulate in f64, the elementwise arithmetic runs in the kernel's type.

use std::sync::Mutex;

use mvar_engine::cpu::{FloatKernel, PARALLEL_MIN_ELEMS};
use mvar_engine::{Error, Float, Result, Tensor};
use rayon::prelude::*;

use crate::util::{float_kernel, one, require_float, same_device, same_dtype, tensor};

/// Fills `out` (rows of `d` elements) with `f(row index, row)` per row and collects what each
/// call returns; threaded for large inputs.
fn map_rows<T: Float, S: Send + Default + Clone>(
    len: usize,
    d: usize,
    f: impl Fn(usize, &mut [T]) -> S + Sync + Send,
) -> (Vec<T>, Vec<S>) {
    let mut out = vec![T::zero(); len];
    if len == 0 || d == 0 {
        return (out, vec![]);
    }
    let mut side = vec![S::default(); len / d];
    let run = |(r, (row, s)): (usize, (&mut [T], &mut S))| *s = f(r, row);
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
    (out, side)
}

/// (mean, rstd) of one row, in f64, two-pass.
fn row_stats<T: Float>(x: &[T], eps: f64) -> (f64, f64) {
    let d = x.len() as f64;
    let mean = x.iter().map(|v| v.as_f64()).sum::<f64>() / d;
    let var = x.iter().map(|v| (v.as_f64() - mean).powi(2)).sum::<f64>() / d;
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
        let (d, eps) = (self.d, self.eps);
        let (y, stats) = map_rows(x[0].len(), d, |r, y: &mut [T]| {
            let row = &x[0][r * d..(r + 1) * d];
            let (mean, rstd) = row_stats(row, eps);
            let (m, s) = (T::from_f64(mean), T::from_f64(rstd));
            for (o, &v) in y.iter_mut().zip(row) {
                *o = (v - m) * s;
            }
            (mean, rstd)
        });
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        Ok(vec![y])
    }
}

/// Inputs [x, g].
struct LayerNormBwd {
    d: usize,
    stats: Vec<(f64, f64)>,
}
impl FloatKernel for LayerNormBwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let d = self.d;
        let (dx, _) = map_rows(x[0].len(), d, |r, dx: &mut [T]| {
            let (xr, gr) = (&x[0][r * d..(r + 1) * d], &x[1][r * d..(r + 1) * d]);
            let (m, s) = (T::from_f64(self.stats[r].0), T::from_f64(self.stats[r].1));
            let (mut sg, mut sgx) = (0.0f64, 0.0f64);
            for (&v, &g) in xr.iter().zip(gr) {
                sg += g.as_f64();
                sgx += (g * (v - m) * s).as_f64();
            }
            let (mg, mgx) = (T::from_f64(sg / d as f64), T::from_f64(sgx / d as f64));
            for ((o, &v), &g) in dx.iter_mut().zip(xr).zip(gr) {
                *o = s * (g - mg - (v - m) * s * mgx);
            }
        });
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
    let k = LayerNormFwd {
        d,
        eps,
        stats: Mutex::new(vec![]),
    };
    let out = tensor(
        one(float_kernel(OP, &[x], &k)?),
        x.shape().clone(),
        x.device(),
    )?;
    let stats = k.stats.into_inner().unwrap_or_else(|e| e.into_inner());
    let saved = x.detach();
    Ok(Tensor::record(out, OP, &[x], move || {
        move |g: &Tensor| {
            let dx = one(float_kernel(OP, &[&saved, g], &LayerNormBwd { d, stats })?);
            Ok(vec![Some(tensor(dx, g.shape().clone(), g.device())?)])
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
        let (gr, eps, d) = (self.g, self.eps, self.g.row());
        let (w, b) = (x[1], x[2]);
        let (y, stats) = map_rows(x[0].len(), d, |r, y: &mut [T]| {
            let row = &x[0][r * d..(r + 1) * d];
            let (mean, rstd) = row_stats(row, eps);
            let (m, s) = (T::from_f64(mean), T::from_f64(rstd));
            for (i, (o, &v)) in y.iter_mut().zip(row).enumerate() {
                let c = gr.channel(r, i);
                *o = (v - m) * s * w[c] + b[c];
            }
            (mean, rstd)
        });
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
        let (dx, partials) = map_rows(xs.len(), d, |r, dx: &mut [T]| {
            let (xr, g) = (&xs[r * d..(r + 1) * d], &gs[r * d..(r + 1) * d]);
            let (m, s) = (T::from_f64(self.stats[r].0), T::from_f64(self.stats[r].1));
            let mut part = vec![0.0f64; 2 * gr.cpg];
            let (mut sh, mut shx) = (0.0f64, 0.0f64);
            for (i, (&v, &gv)) in xr.iter().zip(g).enumerate() {
                let c = gr.channel(r, i);
                let xhat = (v - m) * s;
                let h = gv * w[c];
                sh += h.as_f64();
                shx += (h * xhat).as_f64();
                part[2 * (i / gr.spatial)] += (gv * xhat).as_f64();
                part[2 * (i / gr.spatial) + 1] += gv.as_f64();
            }
            let (mh, mhx) = (T::from_f64(sh / d as f64), T::from_f64(shx / d as f64));
            for (i, (o, (&v, &gv))) in dx.iter_mut().zip(xr.iter().zip(g)).enumerate() {
                let c = gr.channel(r, i);
                *o = s * (gv * w[c] - mh - (v - m) * s * mhx);
            }
            part
        });
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
    let k = GroupNormFwd {
        g,
        eps,
        stats: Mutex::new(vec![]),
    };
    let out = tensor(
        one(float_kernel(OP, &[x, weight, bias], &k)?),
        x.shape().clone(),
        x.device(),
    )?;
    let stats = k.stats.into_inner().unwrap_or_else(|e| e.into_inner());
    let (sx, sw) = (x.detach(), weight.detach());
    Ok(Tensor::record(out, OP, &[x, weight, bias], move || {
        move |grad: &Tensor| {
            let k = GroupNormBwd { g, channels, stats };
            let mut v = float_kernel(OP, &[&sx, &sw, grad], &k)?.into_iter();
            let mut next = |shape: &[usize]| match v.next() {
                Some(s) => tensor(s, shape.to_vec(), grad.device()).map(Some),
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
        let (y, norms) = map_rows(x[0].len(), d, |r, y: &mut [T]| {
            let row = &x[0][r * d..(r + 1) * d];
            let norm = row.iter().map(|v| v.as_f64().powi(2)).sum::<f64>().sqrt();
            let denom = T::from_f64(norm.max(eps));
            for (o, &v) in y.iter_mut().zip(row) {
                *o = v / denom;
            }
            norm
        });
        *self.norms.lock().unwrap_or_else(|e| e.into_inner()) = norms;
        Ok(vec![y])
    }
}

/// Inputs [x, g].
struct L2NormalizeBwd {
    d: usize,
    eps: f64,
    norms: Vec<f64>,
}
impl FloatKernel for L2NormalizeBwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let d = self.d;
        let (dx, _) = map_rows(x[0].len(), d, |r, dx: &mut [T]| {
            let (xr, gr) = (&x[0][r * d..(r + 1) * d], &x[1][r * d..(r + 1) * d]);
            let norm = self.norms[r];
            if norm >= self.eps {
                let n = T::from_f64(norm);
                let dot = T::from_f64(xr.iter().zip(gr).map(|(&v, &g)| (v / n * g).as_f64()).sum());
                for ((o, &v), &g) in dx.iter_mut().zip(xr).zip(gr) {
                    *o = (g - v / n * dot) / n;
                }
            } else {
                let e = T::from_f64(self.eps);
                for (o, &g) in dx.iter_mut().zip(gr) {
                    *o = g / e;
                }
            }
        });
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
    let k = L2NormalizeFwd {
        d,
        eps,
        norms: Mutex::new(vec![]),
    };
    let out = tensor(
        one(float_kernel(OP, &[x], &k)?),
        x.shape().clone(),
        x.device(),
    )?;
    let norms = k.norms.into_inner().unwrap_or_else(|e| e.into_inner());
    let saved = x.detach();
    Ok(Tensor::record(out, OP, &[x], move || {
        move |g: &Tensor| {
            let dx = one(float_kernel(
                OP,
                &[&saved, g],
                &L2NormalizeBwd { d, eps, norms },
            )?);
            Ok(vec![Some(tensor(dx, g.shape().clone(), g.device())?)])
        }
    }))
}
