//! Reductions over axes: sum, mean, max (with its argmax) and argmax.
//!
//! Every kernel sees its input as [outer, n, inner] around the reduced axis. Sums accumulate in
//! f64 on the CPU: this backend is the reference the GPU kernels are checked against, so it
//! favours accuracy over the last few percent of speed. On CUDA (`cuda/kernels/reduce.cu`) sums
//! accumulate in f32, and max keeps its argmax indices on the device for the backward.

use mvar_engine::cpu::{run_float, FloatKernel};
use mvar_engine::cuda::ops::reduce as cr;
use mvar_engine::{CpuStorage, DType, Error, Float, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::elementwise::{broadcast_to, mul_scalar};
use crate::util::{dispatch, float_op, in_widest_vectors, lane_sum, out_tensor, require_float};

fn keepdim_shape(shape: &Shape, axis: usize) -> Shape {
    let mut d = shape.dims().to_vec();
    d[axis] = 1;
    Shape::new(d)
}

fn drop_axis(shape: &Shape, axis: usize) -> Shape {
    let mut d = shape.dims().to_vec();
    d.remove(axis);
    Shape::new(d)
}

/// Output rows processed per task when the outer extent alone is too small to keep all threads
/// busy.
const INNER_CHUNK: usize = 4096;

/// Below this many (outer, inner chunk) tasks a sum also splits its reduced axis into row blocks
/// (a bias gradient, [B * L, C] summed over its rows, is one task otherwise: one thread). Fixed
/// numbers, not the thread count, decide the split, so that a sum rounds the same on every
/// machine.
const FEW_TASKS: usize = 16;
/// Rows of the reduced axis a block sums at least, and the most blocks (which bounds the f64
/// partial sums held: at most `MAX_ROW_BLOCKS` x inner, 16 MiB below `FEW_TASKS` chunks).
const MIN_BLOCK_ROWS: usize = 256;
const MAX_ROW_BLOCKS: usize = 32;

struct SumAxis {
    outer: usize,
    n: usize,
    inner: usize,
}
impl FloatKernel for SumAxis {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (outer, n, inner) = (self.outer, self.n, self.inner);
        let x = x[0];
        let mut out = vec![T::zero(); outer * inner];
        if out.is_empty() {
            return Ok(vec![out]);
        }
        if inner > 1 && outer * inner.div_ceil(INNER_CHUNK) < FEW_TASKS && n >= 2 * MIN_BLOCK_ROWS {
            for (o, dst) in out.chunks_mut(inner).enumerate() {
                sum_rows_in_blocks(&x[o * n * inner..(o + 1) * n * inner], n, dst);
            }
            return Ok(vec![out]);
        }
        let row = |(o, dst): (usize, &mut [T])| {
            if inner == 1 {
                let s = lane_sum(&x[o * n..(o + 1) * n], |v| v.as_f64());
                dst[0] = T::from_f64(s);
                return;
            }
            let body = |(c, d): (usize, &mut [T])| {
                let i0 = c * INNER_CHUNK;
                let mut acc = vec![0.0f64; d.len()];
                for s in 0..n {
                    let src = &x[(o * n + s) * inner + i0..][..d.len()];
                    for (a, v) in acc.iter_mut().zip(src) {
                        *a += v.as_f64();
                    }
                }
                for (d, a) in d.iter_mut().zip(acc) {
                    *d = T::from_f64(a);
                }
            };
            if n * inner >= mvar_engine::cpu::PARALLEL_MIN_ELEMS {
                dst.par_chunks_mut(INNER_CHUNK).enumerate().for_each(body);
            } else {
                dst.chunks_mut(INNER_CHUNK).enumerate().for_each(body);
            }
        };
        if outer > 1 && outer * n * inner >= mvar_engine::cpu::PARALLEL_MIN_ELEMS {
            out.par_chunks_mut(inner).enumerate().for_each(row);
        } else {
            out.chunks_mut(inner).enumerate().for_each(row);
        }
        Ok(vec![out])
    }
}

/// `dst[i]` = the sum over the `n` rows of `x` ([n, inner]) of `x[row][i]`: the rows in blocks
/// summed in parallel (each into f64 partial sums), then the blocks' partial sums added in block
/// order, in f64, and rounded once. The block size depends on `n` alone.
fn sum_rows_in_blocks<T: Float>(x: &[T], n: usize, dst: &mut [T]) {
    let inner = dst.len();
    let rows_per_block = MIN_BLOCK_ROWS.max(n.div_ceil(MAX_ROW_BLOCKS));
    let partials: Vec<Vec<f64>> = x
        .par_chunks(rows_per_block * inner)
        .map(|block| {
            let mut acc = vec![0.0f64; inner];
            in_widest_vectors(
                #[inline(always)]
                || {
                    for row in block.chunks_exact(inner) {
                        for (a, v) in acc.iter_mut().zip(row) {
                            *a += v.as_f64();
                        }
                    }
                },
            );
            acc
        })
        .collect();
    dst.par_chunks_mut(INNER_CHUNK)
        .enumerate()
        .for_each(|(c, d)| {
            let i0 = c * INNER_CHUNK;
            let mut acc = partials[0][i0..i0 + d.len()].to_vec();
            for p in &partials[1..] {
                for (a, v) in acc.iter_mut().zip(&p[i0..i0 + d.len()]) {
                    *a += v;
                }
            }
            for (d, a) in d.iter_mut().zip(acc) {
                *d = T::from_f64(a);
            }
        });
}

/// Sum over one axis.
pub fn sum(x: &Tensor, axis: isize, keepdim: bool) -> Result<Tensor> {
    let ax = x.shape().axis("sum", axis)?;
    sum_axes(x, &[ax], keepdim)
}

/// Sum over several axes (given non-negative; duplicates ignored).
pub fn sum_axes(x: &Tensor, axes: &[usize], keepdim: bool) -> Result<Tensor> {
    let mut axes = axes.to_vec();
    axes.sort_unstable();
    axes.dedup();
    if let Some(&bad) = axes.iter().find(|&&a| a >= x.rank()) {
        return Err(Error::IndexOutOfRange {
            op: "sum",
            what: "axis",
            index: bad as i64,
            size: x.rank(),
        });
    }
    // Adjacent reduced axes are one axis of their product: one pass, one rounding.
    let mut merged_dims = Vec::with_capacity(x.rank());
    let mut merged_axes = Vec::new();
    let mut i = 0;
    while i < x.rank() {
        if axes.contains(&i) {
            merged_axes.push(merged_dims.len());
            let mut n = 1;
            while i < x.rank() && axes.contains(&i) {
                n *= x.dims()[i];
                i += 1;
            }
            merged_dims.push(n);
        } else {
            merged_dims.push(x.dims()[i]);
            i += 1;
        }
    }
    let mut out = if merged_dims.len() == x.rank() {
        x.clone()
    } else {
        x.reshape(merged_dims)?
    };
    // Several passes in bf16 would round each partial sum to bf16, and a cancelling sum loses
    // its digits there; the partial sums stay f32 ("bf16 storage, f32 accumulation").
    let widen = out.dtype() == DType::BF16 && merged_axes.len() > 1;
    if widen {
        out = out.to_dtype(DType::F32)?;
    }
    for &ax in merged_axes.iter().rev() {
        out = sum_one_axis(&out, ax)?;
    }
    if widen {
        out = out.to_dtype(DType::BF16)?;
    }
    let dims: Vec<usize> = x
        .dims()
        .iter()
        .enumerate()
        .filter(|&(i, _)| keepdim || !axes.contains(&i))
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect();
    out.reshape(dims)
}

fn sum_one_axis(x: &Tensor, ax: usize) -> Result<Tensor> {
    let (outer, n, inner) = x.shape().split_at_axis(ax);
    let out_shape = keepdim_shape(x.shape(), ax);
    let k = SumAxis { outer, n, inner };
    let out = float_op("sum", &[x], &k, |dev, b| {
        Ok(vec![cr::sum_axis(dev, b[0], outer, n, inner)?])
    })?;
    let out = out_tensor(out, out_shape, x.device())?;
    let in_shape = x.shape().clone();
    Ok(Tensor::record(out, "sum", &[x], move || {
        move |g: &Tensor| Ok(vec![Some(broadcast_to(g, in_shape)?)])
    }))
}

/// Sum of every element, shape [].
pub fn sum_all(x: &Tensor) -> Result<Tensor> {
    let axes: Vec<usize> = (0..x.rank()).collect();
    sum_axes(x, &axes, false)
}

/// Mean over one axis.
pub fn mean(x: &Tensor, axis: isize, keepdim: bool) -> Result<Tensor> {
    let ax = x.shape().axis("mean", axis)?;
    mean_axes(x, &[ax], keepdim)
}

/// Mean over several axes.
pub fn mean_axes(x: &Tensor, axes: &[usize], keepdim: bool) -> Result<Tensor> {
    let mut uniq = axes.to_vec();
    uniq.sort_unstable();
    uniq.dedup();
    let count: usize = uniq.iter().filter_map(|&a| x.dims().get(a)).product();
    if count == 0 {
        return Err(Error::invalid(
            "mean",
            format!("mean over an empty axis of shape {}", x.shape()),
        ));
    }
    mul_scalar(&sum_axes(x, &uniq, keepdim)?, 1.0 / count as f64)
}

/// Mean of every element, shape [].
pub fn mean_all(x: &Tensor) -> Result<Tensor> {
    let axes: Vec<usize> = (0..x.rank()).collect();
    mean_axes(x, &axes, false)
}

/// Index of the first largest value along the axis of `[outer, n, inner]`; NaN counts as the
/// largest, as in PyTorch. Written for every element type (no conversion), threaded over rows.
fn argmax_kernel<T: WithDType>(x: &[T], outer: usize, n: usize, inner: usize) -> Vec<i64> {
    #[allow(clippy::eq_op)]
    let is_nan = |v: T| v != v;
    let mut out = vec![0i64; outer * inner];
    let row = |(o, dst): (usize, &mut [i64])| {
        for (i, d) in dst.iter_mut().enumerate() {
            let mut best = 0usize;
            let mut best_v = x[o * n * inner + i];
            if is_nan(best_v) {
                continue;
            }
            for s in 1..n {
                let v = x[(o * n + s) * inner + i];
                if v > best_v || is_nan(v) {
                    best = s;
                    best_v = v;
                    if is_nan(v) {
                        break;
                    }
                }
            }
            *d = best as i64;
        }
    };
    if inner == 0 {
        return out;
    }
    if inner == 1 && (ARGMAX_LANES..=u32::MAX as usize).contains(&n) {
        // Contiguous rows (the last axis, as for logits): lanes instead of one running best.
        // Rows shorter than the lanes take the loop above.
        let rows = |(o, dst): (usize, &mut [i64])| {
            for (r, d) in dst.iter_mut().enumerate() {
                let start = (o * ROWS_PER_TASK + r) * n;
                *d = in_widest_vectors(
                    #[inline(always)]
                    || row_argmax(&x[start..start + n]),
                ) as i64;
            }
        };
        if outer * n >= mvar_engine::cpu::PARALLEL_MIN_ELEMS {
            out.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(rows);
        } else {
            out.chunks_mut(ROWS_PER_TASK).enumerate().for_each(rows);
        }
        return out;
    }
    if outer * n * inner >= mvar_engine::cpu::PARALLEL_MIN_ELEMS {
        out.par_chunks_mut(inner).enumerate().for_each(row);
    } else {
        out.chunks_mut(inner).enumerate().for_each(row);
    }
    out
}

/// Rows of [`argmax_kernel`]'s contiguous case per task.
const ROWS_PER_TASK: usize = 8;

/// Lanes of [`row_argmax`].
const ARGMAX_LANES: usize = 16;

/// The index of the first NaN of `row` if it has one, else of its first maximum: the rule of
/// [`argmax_kernel`]'s scalar loop. Each of 16 lanes keeps the first best of the elements
/// i = lane (mod 16) with a compare and two selects (no branch, so the loop vectorises); the
/// lanes are merged by NaN first, then value, then the lower index. `row` has at least
/// [`ARGMAX_LANES`] and fewer than 2^32 elements.
#[inline(always)]
fn row_argmax<T: WithDType>(row: &[T]) -> usize {
    const L: usize = ARGMAX_LANES;
    #[allow(clippy::eq_op)]
    let is_nan = |v: T| v != v;
    let mut best_v: [T; L] = row[..L].try_into().expect("L elements");
    let mut best_i: [u32; L] = std::array::from_fn(|l| l as u32);
    let mut step = |base: usize, chunk: &[T]| {
        for (l, &v) in chunk.iter().enumerate() {
            // A later NaN never replaces an earlier one; a NaN replaces any number.
            // `|` and `&`, not `||` and `&&`: no branches, so the lanes vectorise.
            let take = (v > best_v[l]) | (is_nan(v) & !is_nan(best_v[l]));
            best_v[l] = if take { v } else { best_v[l] };
            best_i[l] = if take { (base + l) as u32 } else { best_i[l] };
        }
    };
    let chunks = row[L..].chunks_exact(L);
    let rest = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        let chunk: &[T; L] = chunk.try_into().expect("L elements");
        step((c + 1) * L, chunk);
    }
    step(row.len() - rest.len(), rest);
    let mut best = 0;
    for l in 1..L {
        let (a, b) = ((best_v[best], best_i[best]), (best_v[l], best_i[l]));
        let better = if is_nan(b.0) {
            !is_nan(a.0) || b.1 < a.1
        } else {
            !is_nan(a.0) && (b.0 > a.0 || (b.0 == a.0 && b.1 < a.1))
        };
        if better {
            best = l;
        }
    }
    best_i[best] as usize
}

fn argmax_any(x: &CpuStorage, outer: usize, n: usize, inner: usize) -> Vec<i64> {
    match x {
        CpuStorage::F32(v) => argmax_kernel(v, outer, n, inner),
        CpuStorage::BF16(v) => argmax_kernel(v, outer, n, inner),
        CpuStorage::F64(v) => argmax_kernel(v, outer, n, inner),
        CpuStorage::I64(v) => argmax_kernel(v, outer, n, inner),
        CpuStorage::U8(v) => argmax_kernel(v, outer, n, inner),
    }
}

/// Index of the largest value along `axis` (i64). Works on every dtype; not differentiable.
pub fn argmax(x: &Tensor, axis: isize, keepdim: bool) -> Result<Tensor> {
    let ax = x.shape().axis("argmax", axis)?;
    let (outer, n, inner) = x.shape().split_at_axis(ax);
    if n == 0 {
        return Err(Error::invalid(
            "argmax",
            format!("argmax over an empty axis of shape {}", x.shape()),
        ));
    }
    let idx = dispatch(
        "argmax",
        &[x],
        |s| Ok(vec![CpuStorage::I64(argmax_any(s[0], outer, n, inner))]),
        |dev, b| Ok(vec![cr::argmax(dev, b[0], outer, n, inner)?]),
    )?;
    let shape = if keepdim {
        keepdim_shape(x.shape(), ax)
    } else {
        drop_axis(x.shape(), ax)
    };
    out_tensor(idx, shape, x.device())
}

struct GatherAlong {
    idx: Vec<i64>,
    outer: usize,
    n: usize,
    inner: usize,
}
impl FloatKernel for GatherAlong {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (n, inner) = (self.n, self.inner);
        let out = (0..self.outer * inner)
            .map(|j| {
                let (o, i) = (j / inner, j % inner);
                x[0][(o * n + self.idx[j] as usize) * inner + i]
            })
            .collect();
        Ok(vec![out])
    }
}

struct ScatterAlong {
    idx: Vec<i64>,
    outer: usize,
    n: usize,
    inner: usize,
}
impl FloatKernel for ScatterAlong {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (n, inner) = (self.n, self.inner);
        let mut out = vec![T::zero(); self.outer * n * inner];
        for (j, &g) in x[0].iter().enumerate() {
            let (o, i) = (j / inner, j % inner);
            out[(o * n + self.idx[j] as usize) * inner + i] += g;
        }
        Ok(vec![out])
    }
}

/// Largest value along `axis`; the gradient goes to the first position that holds it.
pub fn max(x: &Tensor, axis: isize, keepdim: bool) -> Result<Tensor> {
    let ax = x.shape().axis("max", axis)?;
    let (outer, n, inner) = x.shape().split_at_axis(ax);
    // The indices stay on x's device: the CPU kernels read them from host memory, the CUDA
    // ones from the device buffer, and nothing is copied back.
    let idx = argmax(x, axis, true)?;
    require_float("max", x)?;
    let kept = keepdim_shape(x.shape(), ax);
    let out = dispatch(
        "max",
        &[x, &idx],
        |s| {
            let k = GatherAlong {
                idx: s[1].as_slice::<i64>("max")?.to_vec(),
                outer,
                n,
                inner,
            };
            run_float("max", &s[..1], &k)
        },
        |dev, b| Ok(vec![cr::gather_along(dev, b[0], b[1], outer, n, inner)?]),
    )?;
    let out = out_tensor(out, kept.clone(), x.device())?;
    let in_shape = x.shape().clone();
    let out = Tensor::record(out, "max", &[x], move || {
        move |g: &Tensor| {
            require_float("max", g)?;
            let dx = dispatch(
                "max",
                &[g, &idx],
                |s| {
                    let k = ScatterAlong {
                        idx: s[1].as_slice::<i64>("max")?.to_vec(),
                        outer,
                        n,
                        inner,
                    };
                    run_float("max", &s[..1], &k)
                },
                |dev, b| Ok(vec![cr::scatter_along(dev, b[0], b[1], outer, n, inner)?]),
            )?;
            Ok(vec![Some(out_tensor(dx, in_shape, g.device())?)])
        }
    });
    if keepdim {
        Ok(out)
    } else {
        out.reshape(drop_axis(x.shape(), ax))
    }
}

/// Smallest value along `axis` (as -max(-x)).
pub fn min(x: &Tensor, axis: isize, keepdim: bool) -> Result<Tensor> {
    crate::elementwise::neg(&max(&crate::elementwise::neg(x)?, axis, keepdim)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sums over a long axis with a short inner extent (bias gradients) take the row-blocked
    /// path: against the sum in f64 over the same values, for f64 to 1e-12 and for f32 to the
    /// rounding of that sum, at block borders (the 256-row blocks and the 32-block cap), with an
    /// outer axis and an inner extent over one chunk; and bit for bit the same on 1 and 3
    /// threads (the blocks do not follow the thread count).
    #[test]
    fn row_blocked_sums_match_the_f64_sum_on_any_thread_count() {
        let _g = mvar_engine::no_grad();
        let pool = |t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        };
        let mut gen = mvar_engine::Generator::new(9);
        let shapes = [
            [1, 512, 3],
            [2, 513, 40],
            [3, 1000, 7],
            [1, 8193, 16],
            [1, 9000, 5000],
            [1, 600, 1],
            [1, 100, 9],
        ];
        for dims in shapes {
            let [outer, n, inner] = dims;
            let vals: Vec<f64> = gen.normal(outer * n * inner, 0.0, 1.0);
            for dtype in [DType::F64, DType::F32] {
                let x = Tensor::from_vec(vals.clone(), dims.to_vec(), &mvar_engine::Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let xs = x.to_vec_f64().unwrap();
                let got = pool(1).install(|| sum(&x, 1, false).unwrap().to_vec_f64().unwrap());
                let got3 = pool(3).install(|| sum(&x, 1, false).unwrap().to_vec_f64().unwrap());
                assert_eq!(got, got3, "{dims:?} {dtype:?}: 1 vs 3 threads");
                for o in 0..outer {
                    for i in 0..inner {
                        let want: f64 = (0..n).map(|r| xs[(o * n + r) * inner + i]).sum();
                        let g = got[o * inner + i];
                        let tol = match dtype {
                            DType::F64 => 1e-12 * (1.0 + want.abs()),
                            _ => f64::from((want as f32).abs()) * f64::from(f32::EPSILON) + 1e-9,
                        };
                        assert!(
                            (g - want).abs() <= tol,
                            "{dims:?} {dtype:?} [{o}, {i}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// The scalar rule: the first NaN, else the first maximum.
    fn one_pass<T: WithDType>(row: &[T]) -> usize {
        #[allow(clippy::eq_op)]
        let is_nan = |v: T| v != v;
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            if is_nan(row[best]) {
                break;
            }
            if v > row[best] || is_nan(v) {
                best = i;
            }
        }
        best
    }

    /// The lane merge against the scalar rule, on rows of one lane step and longer, with
    /// many ties (few distinct values), NaNs at various places and infinities, in f32, i64, u8.
    #[test]
    fn row_argmax_is_the_first_nan_else_the_first_maximum() {
        let mut g = mvar_engine::Generator::new(5);
        for len in (ARGMAX_LANES..80).chain([255, 4096]) {
            for trial in 0..12 {
                let u = g.uniform(2 * len, 0.0, 1.0);
                let row: Vec<f32> = (0..len)
                    .map(|i| {
                        let (a, b) = (u[2 * i], u[2 * i + 1]);
                        match trial % 4 {
                            0 => (a * 7.0).floor() as f32,
                            1 if b < 0.05 => f32::NAN,
                            2 if b < 0.05 => f32::INFINITY,
                            3 if b < 0.03 => f32::NEG_INFINITY,
                            _ => (a * 4.0).floor() as f32 - 2.0,
                        }
                    })
                    .collect();
                assert_eq!(row_argmax(&row), one_pass(&row), "f32 {row:?}");
                let ints: Vec<i64> = row
                    .iter()
                    .map(|&v| if v.is_finite() { v as i64 } else { 9 })
                    .collect();
                assert_eq!(row_argmax(&ints), one_pass(&ints), "i64 {ints:?}");
                let bytes: Vec<u8> = ints.iter().map(|&v| (v + 3) as u8).collect();
                assert_eq!(row_argmax(&bytes), one_pass(&bytes), "u8 {bytes:?}");
            }
        }
        // Two NaNs in different lanes: the earlier one.
        let mut row = vec![0.0f32; 40];
        row[37] = f32::NAN;
        row[21] = f32::NAN;
        assert_eq!(row_argmax(&row), 21);
    }
}
