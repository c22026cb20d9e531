//! Ops driven by integer indices (i64): index_select, gather, embedding lookup. Every index is
//! checked; an index out of range is an error naming the op, the index and the valid range.

use mvar_engine::cpu::FloatKernel;
use mvar_engine::cuda::ops::index as cu;
use mvar_engine::cuda::HostData;
use mvar_engine::{DType, Error, Float, Result, Shape, Tensor, WithDType};

use crate::util::{
    dispatch, float_op, out_tensor, require_dtype, require_float, require_rank, run_copy,
    same_device, CopyKernel,
};

fn checked_indices(op: &'static str, idx: &Tensor, size: usize) -> Result<Vec<i64>> {
    require_dtype(op, idx, "the indices", DType::I64)?;
    let v = idx.to_vec::<i64>()?;
    if let Some(&bad) = v.iter().find(|&&i| i < 0 || i as usize >= size) {
        return Err(Error::IndexOutOfRange {
            op,
            what: "index",
            index: bad,
            size,
        });
    }
    Ok(v)
}

struct Select {
    idx: Vec<i64>,
    outer: usize,
    n: usize,
    inner: usize,
}
impl CopyKernel for Select {
    fn run<T: WithDType + Default>(&self, x: &[&[T]]) -> Result<Vec<T>> {
        let mut out = Vec::with_capacity(self.outer * self.idx.len() * self.inner);
        for o in 0..self.outer {
            for &i in &self.idx {
                let at = (o * self.n + i as usize) * self.inner;
                out.extend_from_slice(&x[0][at..at + self.inner]);
            }
        }
        Ok(out)
    }
}

/// Adds the rows of g back into the selected positions (backward of index_select).
struct SelectBwd<'a>(&'a Select);
impl FloatKernel for SelectBwd<'_> {
    fn run<T: Float>(&self, g: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let s = self.0;
        let mut out = vec![T::zero(); s.outer * s.n * s.inner];
        let k = s.idx.len();
        for o in 0..s.outer {
            for (j, &i) in s.idx.iter().enumerate() {
                let src = &g[0][(o * k + j) * s.inner..][..s.inner];
                let dst = &mut out[(o * s.n + i as usize) * s.inner..][..s.inner];
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d += v;
                }
            }
        }
        Ok(vec![out])
    }
}

/// The entries `idx` (1-D, i64) of `axis`, in that order (repeats allowed).
pub fn index_select(x: &Tensor, axis: isize, idx: &Tensor) -> Result<Tensor> {
    const OP: &str = "index_select";
    let ax = x.shape().axis(OP, axis)?;
    same_device(OP, &[x, idx])?;
    if idx.rank() != 1 {
        return Err(Error::shape(
            OP,
            format!("indices of shape {}", idx.shape()),
            "1-D indices",
        ));
    }
    let (outer, n, inner) = x.shape().split_at_axis(ax);
    let sel = Select {
        idx: checked_indices(OP, idx, n)?,
        outer,
        n,
        inner,
    };
    let mut dims = x.dims().to_vec();
    dims[ax] = sel.idx.len();
    // The indices ride along as a second input so that the GPU reads them where they are; the
    // CPU copy only looks at x.
    let out = dispatch(
        OP,
        &[x, idx],
        |s| Ok(vec![run_copy(OP, &s[..1], &sel)?]),
        |dev, b| Ok(vec![cu::index_select(dev, b[0], b[1], outer, n, inner)?]),
    )?;
    let out = out_tensor(out, dims, x.device())?;
    let in_shape = x.shape().clone();
    Ok(Tensor::record(out, OP, &[x], move || {
        move |g: &Tensor| {
            let dx = float_op(OP, &[g], &SelectBwd(&sel), |dev, b| {
                Ok(vec![cu::index_select_backward(
                    dev, b[0], &sel.idx, outer, n, inner,
                )?])
            })?;
            Ok(vec![Some(out_tensor(dx, in_shape, g.device())?)])
        }
    }))
}

/// Rows of `table` [V, C] picked by `ids` (i64, any shape): output [..ids.shape, C].
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding";
    require_float(OP, table)?;
    require_rank(OP, table, "the table [num_embeddings, dim]", 2)?;
    let flat = ids.reshape([ids.elem_count()])?;
    let rows = index_select(table, 0, &flat).map_err(|e| match e {
        Error::IndexOutOfRange { index, size, .. } => Error::IndexOutOfRange {
            op: OP,
            what: "token id",
            index,
            size,
        },
        other => other,
    })?;
    let mut dims = ids.dims().to_vec();
    dims.push(table.dims()[1]);
    rows.reshape(dims)
}

/// Maps an output position of gather to the input position it reads.
#[derive(Clone)]
struct GatherPlan {
    idx: Vec<i64>,
    idx_shape: Shape,
    x_shape: Shape,
    axis: usize,
}

impl GatherPlan {
    fn source(&self, pos: usize) -> usize {
        let (dims, xs) = (self.idx_shape.dims(), self.x_shape.strides());
        let mut rem = pos;
        let mut off = 0;
        for ax in (0..dims.len()).rev() {
            let c = rem % dims[ax];
            rem /= dims[ax];
            off += if ax == self.axis {
                self.idx[pos] as usize
            } else {
                c
            } * xs[ax];
        }
        off
    }
}

impl CopyKernel for GatherPlan {
    fn run<T: WithDType + Default>(&self, x: &[&[T]]) -> Result<Vec<T>> {
        Ok((0..self.idx.len()).map(|p| x[0][self.source(p)]).collect())
    }
}

struct GatherBwd<'a>(&'a GatherPlan);
impl FloatKernel for GatherBwd<'_> {
    fn run<T: Float>(&self, g: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let mut out = vec![T::zero(); self.0.x_shape.elem_count()];
        for (p, &v) in g[0].iter().enumerate() {
            out[self.0.source(p)] += v;
        }
        Ok(vec![out])
    }
}

/// PyTorch's gather: out[..., i, ...] = x[..., idx[..., i, ...], ...] along `axis`. `idx` has
/// x's rank and no axis larger than x's (except `axis` itself); the output has idx's shape.
pub fn gather(x: &Tensor, axis: isize, idx: &Tensor) -> Result<Tensor> {
    const OP: &str = "gather";
    let ax = x.shape().axis(OP, axis)?;
    same_device(OP, &[x, idx])?;
    let fits = idx.rank() == x.rank()
        && idx
            .dims()
            .iter()
            .zip(x.dims())
            .enumerate()
            .all(|(i, (a, b))| i == ax || a <= b);
    if !fits {
        return Err(Error::shape(
            OP,
            format!("input {} and indices {}", x.shape(), idx.shape()),
            format!("indices of the input's rank, no larger than it on every axis but {ax}"),
        ));
    }
    let plan = GatherPlan {
        idx: checked_indices(OP, idx, x.dims()[ax])?,
        idx_shape: idx.shape().clone(),
        x_shape: x.shape().clone(),
        axis: ax,
    };
    let out = dispatch(
        OP,
        &[x, idx],
        |s| Ok(vec![run_copy(OP, &s[..1], &plan)?]),
        |dev, b| Ok(vec![cu::gather(dev, b[0], x.dims(), b[1], idx.dims(), ax)?]),
    )?;
    let out = out_tensor(out, idx.shape().clone(), x.device())?;
    Ok(Tensor::record(out, OP, &[x], move || {
        move |g: &Tensor| {
            let p = &plan;
            let dx = float_op(OP, &[g], &GatherBwd(p), |dev, b| {
                // The checked host indices go up again: the backward keeps no device copy.
                let idx = dev.upload(HostData::I64(&p.idx))?;
                Ok(vec![cu::gather_backward(
                    dev,
                    b[0],
                    &idx,
                    p.x_shape.dims(),
                    p.idx_shape.dims(),
                    p.axis,
                )?])
            })?;
            Ok(vec![Some(out_tensor(dx, p.x_shape.clone(), g.device())?)])
        }
    }))
}
