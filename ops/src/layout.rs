//! Ops that move elements: permute/transpose, narrow, concat, split.
//!
//! Tensors are always dense and row-major, so permute writes a new buffer (see
//! docs/architecture.md for why there are no strided views). Reshape, which needs no copy, lives
//! in the engine.

use mvar_engine::cpu::concat_along;
use mvar_engine::cuda::ops::index as cu;
use mvar_engine::{Error, GradBand, Result, Shape, Tensor, WithDType};

use crate::util::{copy_op, out_tensor, same_device, strided_copy, CopyKernel};

struct Permute {
    out_dims: Vec<usize>,
    strides: Vec<usize>,
}
impl CopyKernel for Permute {
    fn run<T: WithDType + Default>(&self, x: &[&[T]]) -> Result<Vec<T>> {
        Ok(strided_copy(x[0], &self.out_dims, &self.strides))
    }
}

/// Reorders the axes: output axis i is input axis `perm[i]`.
pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let rank = x.rank();
    let mut seen = vec![false; rank];
    let valid = perm.len() == rank
        && perm
            .iter()
            .all(|&p| p < rank && !std::mem::replace(&mut seen[p], true));
    if !valid {
        return Err(Error::invalid(
            "permute",
            format!(
                "permutation {perm:?} for shape {}: expected each of 0..{rank} exactly once",
                x.shape()
            ),
        ));
    }
    if perm.iter().enumerate().all(|(i, &p)| i == p) {
        return Ok(x.clone());
    }
    let in_strides = x.shape().strides();
    let out_dims: Vec<usize> = perm.iter().map(|&p| x.dims()[p]).collect();
    let k = Permute {
        out_dims: out_dims.clone(),
        strides: perm.iter().map(|&p| in_strides[p]).collect(),
    };
    let out = copy_op("permute", &[x], &k, |dev, b| {
        Ok(vec![cu::permute(dev, b[0], x.dims(), perm)?])
    })?;
    let out = out_tensor(out, out_dims, x.device())?;
    let mut inverse = vec![0; rank];
    for (i, &p) in perm.iter().enumerate() {
        inverse[p] = i;
    }
    Ok(Tensor::record(out, "permute", &[x], move || {
        move |g: &Tensor| Ok(vec![Some(permute(g, &inverse)?)])
    }))
}

/// Swaps two axes (negative axes count from the end).
pub fn transpose(x: &Tensor, a: isize, b: isize) -> Result<Tensor> {
    let (a, b) = (
        x.shape().axis("transpose", a)?,
        x.shape().axis("transpose", b)?,
    );
    let mut perm: Vec<usize> = (0..x.rank()).collect();
    perm.swap(a, b);
    permute(x, &perm)
}

/// Copies rows [start, start+len) of one axis into a zero tensor of `n` rows (or the reverse
/// when `extract`): the forward of narrow and, reversed, its backward.
struct Band {
    outer: usize,
    n: usize,
    inner: usize,
    start: usize,
    len: usize,
    extract: bool,
}
impl CopyKernel for Band {
    fn run<T: WithDType + Default>(&self, x: &[&[T]]) -> Result<Vec<T>> {
        let (outer, n, inner, start, len) = (self.outer, self.n, self.inner, self.start, self.len);
        let x = x[0];
        if self.extract {
            let mut out = Vec::with_capacity(outer * len * inner);
            for o in 0..outer {
                out.extend_from_slice(&x[(o * n + start) * inner..(o * n + start + len) * inner]);
            }
            Ok(out)
        } else {
            let mut out = vec![T::default(); outer * n * inner];
            for o in 0..outer {
                out[(o * n + start) * inner..(o * n + start + len) * inner]
                    .copy_from_slice(&x[o * len * inner..(o + 1) * len * inner]);
            }
            Ok(out)
        }
    }
}

/// Elements [start, start + len) of `axis`.
pub fn narrow(x: &Tensor, axis: isize, start: usize, len: usize) -> Result<Tensor> {
    let ax = x.shape().axis("narrow", axis)?;
    let n = x.dims()[ax];
    if start.checked_add(len).is_none_or(|end| end > n) {
        return Err(Error::invalid(
            "narrow",
            format!(
                "range {start}..{} on axis {ax} of shape {}: expected an end <= {n}",
                start.saturating_add(len),
                x.shape()
            ),
        ));
    }
    if start == 0 && len == n {
        return Ok(x.clone());
    }
    let (outer, _, inner) = x.shape().split_at_axis(ax);
    let mut out_dims = x.dims().to_vec();
    out_dims[ax] = len;
    let k = Band {
        outer,
        n,
        inner,
        start,
        len,
        extract: true,
    };
    let band = cu::Band {
        outer,
        n,
        inner,
        start,
        len,
    };
    let out = copy_op("narrow", &[x], &k, |dev, b| {
        Ok(vec![cu::narrow(dev, b[0], band)?])
    })?;
    let out = out_tensor(out, out_dims, x.device())?;
    let in_shape = x.shape().clone();
    // The gradient is this band of x's: the tape may join it with x's other bands (a split's)
    // instead of padding it with zeros here.
    let grad_band = GradBand {
        axis: ax,
        start,
        len,
    };
    Ok(Tensor::record_band(
        out,
        "narrow",
        x,
        grad_band,
        move || {
            move |g: &Tensor| {
                let k = Band {
                    outer,
                    n,
                    inner,
                    start,
                    len,
                    extract: false,
                };
                let dx = copy_op("narrow", &[g], &k, |dev, b| {
                    Ok(vec![cu::narrow_backward(dev, b[0], band)?])
                })?;
                Ok(vec![Some(out_tensor(dx, in_shape, g.device())?)])
            }
        },
    ))
}

struct Concat {
    outer: usize,
    sizes: Vec<usize>,
    inner: usize,
}
impl CopyKernel for Concat {
    fn run<T: WithDType + Default>(&self, x: &[&[T]]) -> Result<Vec<T>> {
        Ok(concat_along(x, self.outer, &self.sizes, self.inner))
    }
}

/// Joins tensors along `axis`; all other axes must agree.
pub fn concat(xs: &[&Tensor], axis: isize) -> Result<Tensor> {
    let first = xs
        .first()
        .ok_or_else(|| Error::invalid("concat", "no tensors to concatenate"))?;
    let ax = first.shape().axis("concat", axis)?;
    same_device("concat", xs)?;
    for x in xs {
        let compatible = x.rank() == first.rank()
            && x.dims()
                .iter()
                .zip(first.dims())
                .enumerate()
                .all(|(i, (a, b))| i == ax || a == b);
        if !compatible {
            return Err(Error::shape(
                "concat",
                xs.iter()
                    .map(|t| t.shape().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                format!("tensors of one rank that agree on every axis but {ax}"),
            ));
        }
    }
    if xs.len() == 1 {
        return Ok((*first).clone());
    }
    let (outer, _, inner) = first.shape().split_at_axis(ax);
    let sizes: Vec<usize> = xs.iter().map(|x| x.dims()[ax]).collect();
    let mut out_dims = first.dims().to_vec();
    out_dims[ax] = sizes.iter().sum();
    let k = Concat {
        outer,
        sizes: sizes.clone(),
        inner,
    };
    let out = copy_op("concat", xs, &k, |dev, b| {
        Ok(vec![cu::concat(dev, b, outer, &sizes, inner)?])
    })?;
    let out = out_tensor(out, out_dims, first.device())?;
    Ok(Tensor::record(out, "concat", xs, move || {
        move |g: &Tensor| {
            let mut start = 0;
            let mut grads = Vec::with_capacity(sizes.len());
            for &n in &sizes {
                grads.push(Some(narrow(g, ax as isize, start, n)?));
                start += n;
            }
            Ok(grads)
        }
    }))
}

/// Cuts `axis` into consecutive pieces of the given sizes (which must add up to its length).
pub fn split(x: &Tensor, sizes: &[usize], axis: isize) -> Result<Vec<Tensor>> {
    let ax = x.shape().axis("split", axis)?;
    if sizes.iter().sum::<usize>() != x.dims()[ax] {
        return Err(Error::invalid(
            "split",
            format!(
                "sizes {sizes:?} for axis {ax} of shape {}: expected sizes that add up to {}",
                x.shape(),
                x.dims()[ax]
            ),
        ));
    }
    let mut start = 0;
    sizes
        .iter()
        .map(|&n| {
            let piece = narrow(x, ax as isize, start, n);
            start += n;
            piece
        })
        .collect()
}

/// Inserts an axis of size 1 at `axis` (free).
pub fn unsqueeze(x: &Tensor, axis: usize) -> Result<Tensor> {
    if axis > x.rank() {
        return Err(Error::IndexOutOfRange {
            op: "unsqueeze",
            what: "axis",
            index: axis as i64,
            size: x.rank() + 1,
        });
    }
    let mut d = x.dims().to_vec();
    d.insert(axis, 1);
    x.reshape(Shape::new(d))
}
