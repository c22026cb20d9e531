//! Drawing one token per row of logits with top-k and top-p (nucleus) filtering: the official
//! `sample_with_top_k_top_p_` with the uniform draws given by the caller (one per row), so the
//! CPU and the GPU draw the same tokens from the same random numbers.
//!
//! Per row x[0..V) and its uniform u:
//! 1. top-k: keep x\[i\] >= the k-th largest value (ties at it all kept); k = 0 or k >= V keeps
//!    every logit.
//! 2. top-p (when top_p > 0): order the kept logits ascending, ties by index; with
//!    p_i = exp(x_i - m) / Z over the kept (m the maximum), drop the prefix of that order whose
//!    inclusive running sum of p is <= 1 - top_p, never the last (largest) one. (The official
//!    code sorts with torch's unstable sort: where the cut falls inside a run of equal logits,
//!    which of them it keeps is that sort's choice, how many is not; the fixtures test holds
//!    both to tests/official/sampler_filter.json.)
//! 3. with w_i = exp(x_i - m) over what is left, the token is the smallest index whose running
//!    sum of w (index order) exceeds u * sum(w); if rounding leaves none, the largest such index.
//!
//! With top_k = 1 this is the argmax (the first of tied maxima only when u is 0). The CPU
//! reference works in f64. On CUDA (`cuda/kernels/sample.cu`) only the tokens come back to the
//! host; its sums run in another order, so a token can differ only where a running sum lies
//! within rounding (~1e-15) of its threshold. A NaN or infinite logit is an error naming the row
//! and the code, as torch.multinomial refuses such rows.

use mvar_engine::cuda::ops::sample as cs;
use mvar_engine::{CpuStorage, Error, Float, Result, Tensor};
use rayon::prelude::*;

use crate::util::{dispatch, out_tensor, require_float, require_rank};

pub use cs::SampleKernel;

/// Which logits of `row` survive top-k: those at least the k-th largest value (ties at it all
/// kept); every one for k = 0 or k >= the row's length.
fn top_k_mask(row: &[f64], top_k: usize) -> Vec<bool> {
    if top_k == 0 || top_k >= row.len() {
        return vec![true; row.len()];
    }
    // The k-th largest value by selection, not a sort: the row is 4096 long, k is 900.
    let mut scratch = row.to_vec();
    let desc = |a: &f64, b: &f64| b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal);
    let (_, kth, _) = scratch.select_nth_unstable_by(top_k - 1, desc);
    let kth = *kth;
    row.iter().map(|&x| x >= kth).collect()
}

/// Which logits of one row of finite logits survive top-k then top-p (the module's steps 1-2):
/// those the draw can pick.
fn kept(row: &[f64], top_k: usize, top_p: f64) -> Vec<bool> {
    let v = row.len();
    let mut keep = top_k_mask(row, top_k);
    if top_p > 0.0 {
        // Ascending by value, ties in index order (a stable sort of the kept indices).
        let mut order: Vec<usize> = (0..v).filter(|&i| keep[i]).collect();
        order.sort_by(|&a, &b| {
            row[a]
                .partial_cmp(&row[b])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let m = order
            .iter()
            .map(|&i| row[i])
            .fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = order.iter().map(|&i| (row[i] - m).exp()).sum();
        let mut cum = 0.0;
        for (pos, &i) in order.iter().enumerate() {
            cum += (row[i] - m).exp() / z;
            if cum <= 1.0 - top_p && pos + 1 < order.len() {
                keep[i] = false;
            }
        }
    }
    keep
}

/// The token drawn from one row of finite logits with the uniform `u` (the module's steps).
fn sample_row(row: &[f64], u: f64, top_k: usize, top_p: f64) -> usize {
    let keep = kept(row, top_k, top_p);
    let m = row
        .iter()
        .zip(&keep)
        .filter(|(_, &k)| k)
        .map(|(&x, _)| x)
        .fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = row
        .iter()
        .zip(&keep)
        .map(|(&x, &k)| if k { (x - m).exp() } else { 0.0 })
        .collect();
    let total: f64 = w.iter().sum();
    let target = u * total;
    let mut acc = 0.0;
    for (i, &x) in w.iter().enumerate() {
        acc += x;
        if x > 0.0 && acc > target {
            return i;
        }
    }
    w.iter().rposition(|&x| x > 0.0).unwrap_or(0)
}

/// Tokens of rows of one float type; `Err((row, code))` for the first non-finite logit.
fn sample_rows<T: Float>(
    x: &[T],
    v: usize,
    uniform: &[f64],
    top_k: usize,
    top_p: f64,
) -> std::result::Result<Vec<i64>, (usize, usize)> {
    if x.is_empty() {
        // No rows (v may be 0 then, and chunks of 0 do not exist).
        return Ok(Vec::new());
    }
    if let Some(at) = x.iter().position(|t| !t.as_f64().is_finite()) {
        return Err((at / v, at % v));
    }
    // Rows are independent once their uniforms are drawn, so they run in parallel and the
    // result does not depend on the thread count.
    Ok(x.par_chunks(v)
        .zip(uniform.par_iter())
        .map(|(row, &u)| {
            let row: Vec<f64> = row.iter().map(|t| t.as_f64()).collect();
            sample_row(&row, u, top_k, top_p) as i64
        })
        .collect())
}

/// Rows of one float type with what top-k / top-p drops set to -inf; `Err((row, code))` for
/// the first non-finite logit.
fn filter_rows<T: Float>(
    x: &[T],
    v: usize,
    top_k: usize,
    top_p: f64,
) -> std::result::Result<Vec<T>, (usize, usize)> {
    if x.is_empty() {
        // No rows (v may be 0 then, and chunks of 0 do not exist).
        return Ok(Vec::new());
    }
    if let Some(at) = x.iter().position(|t| !t.as_f64().is_finite()) {
        return Err((at / v, at % v));
    }
    let mut out = x.to_vec();
    out.par_chunks_mut(v).for_each(|row| {
        let wide: Vec<f64> = row.iter().map(|t| t.as_f64()).collect();
        for (t, keep) in row.iter_mut().zip(kept(&wide, top_k, top_p)) {
            if !keep {
                *t = T::neg_infinity();
            }
        }
    });
    Ok(out)
}

fn not_finite(op: &'static str, row: usize, code: usize, rows: usize, v: usize) -> Error {
    Error::invalid(
        op,
        format!(
            "the logit of row {row} (of {rows} rows of {v}) at code {code} is NaN or infinite: expected finite \
             logits (with bf16 autocast, f32 may avoid an overflow)"
        ),
    )
}

/// One token per row of `logits` [R, V] (f32, bf16 or f64), i64 \[R\] on the logits' device, drawn
/// with `uniform[r]` in [0, 1) for row r (module docs). On CUDA the tuned kernel runs.
pub fn sample_top_k_top_p(
    logits: &Tensor,
    uniform: &[f64],
    top_k: usize,
    top_p: f64,
) -> Result<Tensor> {
    sample_top_k_top_p_with(logits, uniform, top_k, top_p, SampleKernel::BlockPerRow)
}

/// [`sample_top_k_top_p`] with the CUDA kernel chosen (the benches time both); the CPU ignores it.
pub fn sample_top_k_top_p_with(
    logits: &Tensor,
    uniform: &[f64],
    top_k: usize,
    top_p: f64,
    kernel: SampleKernel,
) -> Result<Tensor> {
    const OP: &str = "sample_top_k_top_p";
    require_float(OP, logits)?;
    require_rank(OP, logits, "logits [R, V]", 2)?;
    let (rows, v) = (logits.dims()[0], logits.dims()[1]);
    if uniform.len() != rows || (v == 0 && rows > 0) {
        return Err(Error::shape(
            OP,
            format!("logits {} with {} uniforms", logits.shape(), uniform.len()),
            "logits [R, V] with V > 0 and one uniform per row",
        ));
    }
    check_top_p(OP, top_p)?;
    if let Some(u) = uniform.iter().find(|u| !(0.0..1.0).contains(*u)) {
        return Err(Error::invalid(OP, format!("uniform {u}: expected [0, 1)")));
    }
    let out = dispatch(
        OP,
        &[logits],
        |s| {
            let tokens = match s[0] {
                CpuStorage::F32(x) => sample_rows(x, v, uniform, top_k, top_p),
                CpuStorage::F64(x) => sample_rows(x, v, uniform, top_k, top_p),
                other => sample_rows(&other.to_f32_vec(), v, uniform, top_k, top_p),
            }
            .map_err(|(r, c)| not_finite(OP, r, c, rows, v))?;
            Ok(vec![CpuStorage::I64(tokens)])
        },
        |dev, b| {
            Ok(vec![cs::sample_top_k_top_p(
                dev, b[0], uniform, rows, v, top_k, top_p, kernel,
            )?])
        },
    )?;
    let tokens = out_tensor(out, [rows], logits.device())?;
    if logits.device().is_cuda() {
        // The kernel marks a row with a non-finite logit as -1 - code; only tokens are copied.
        let host = tokens.to_vec::<i64>()?;
        if let Some((r, &t)) = host.iter().enumerate().find(|(_, &t)| t < 0) {
            return Err(not_finite(OP, r, (-1 - t) as usize, rows, v));
        }
    }
    Ok(tokens)
}

fn check_top_p(op: &'static str, top_p: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&top_p) {
        return Err(Error::invalid(
            op,
            format!("top_p {top_p}: expected [0, 1]"),
        ));
    }
    Ok(())
}

/// The logits [R, V] that [`sample_top_k_top_p`] could draw, every other one set to -inf, same
/// shape and dtype (kept logits unchanged): the official sampler's in-place top-k / top-p
/// filtering, which its `more_smooth` Gumbel softmax then reads. On CUDA the same block-per-row
/// code as the sampler's decides what is kept.
pub fn filter_top_k_top_p(logits: &Tensor, top_k: usize, top_p: f64) -> Result<Tensor> {
    filter_top_k_top_p_with(logits, top_k, top_p, SampleKernel::BlockPerRow)
}

/// [`filter_top_k_top_p`] with the CUDA kernel chosen (one of the block-per-row kernels; the
/// benches time both); the CPU ignores it.
pub fn filter_top_k_top_p_with(
    logits: &Tensor,
    top_k: usize,
    top_p: f64,
    kernel: SampleKernel,
) -> Result<Tensor> {
    const OP: &str = "filter_top_k_top_p";
    require_float(OP, logits)?;
    require_rank(OP, logits, "logits [R, V]", 2)?;
    let (rows, v) = (logits.dims()[0], logits.dims()[1]);
    if v == 0 && rows > 0 {
        return Err(Error::shape(
            OP,
            logits.shape().to_string(),
            "logits [R, V] with V > 0",
        ));
    }
    check_top_p(OP, top_p)?;
    let mut out = dispatch(
        OP,
        &[logits],
        |s| {
            let bad = |(r, c)| not_finite(OP, r, c, rows, v);
            Ok(vec![match s[0] {
                CpuStorage::F32(x) => {
                    CpuStorage::F32(filter_rows(x, v, top_k, top_p).map_err(bad)?)
                }
                CpuStorage::F64(x) => {
                    CpuStorage::F64(filter_rows(x, v, top_k, top_p).map_err(bad)?)
                }
                // bf16 -> f32 -> bf16 is exact for the kept values and for -inf.
                CpuStorage::BF16(_) => CpuStorage::BF16(
                    filter_rows(&s[0].to_f32_vec(), v, top_k, top_p)
                        .map_err(bad)?
                        .into_iter()
                        .map(mvar_engine::bf16::from_f32)
                        .collect(),
                ),
                other => return Err(Error::dtype(OP, other.dtype(), "a float dtype")),
            }])
        },
        |dev, b| {
            let (filtered, status) =
                cs::filter_top_k_top_p(dev, b[0], rows, v, top_k, top_p, kernel)?;
            Ok(vec![filtered, status])
        },
    )?;
    if logits.device().is_cuda() {
        // The kernel marks a row with a non-finite logit in `status` as the sampler does.
        let status = out_tensor(out.split_off(1), [rows], logits.device())?.to_vec::<i64>()?;
        if let Some((r, &t)) = status.iter().enumerate().find(|(_, &t)| t < 0) {
            return Err(not_finite(OP, r, (-1 - t) as usize, rows, v));
        }
    }
    out_tensor(out, [rows, v], logits.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvar_engine::{Device, Generator};

    fn draw(logits: &[f32], v: usize, u: &[f64], top_k: usize, top_p: f64) -> Vec<i64> {
        let t = Tensor::from_vec(logits.to_vec(), [logits.len() / v, v], &Device::Cpu).unwrap();
        sample_top_k_top_p(&t, u, top_k, top_p)
            .unwrap()
            .to_vec::<i64>()
            .unwrap()
    }

    #[test]
    fn top_k_by_selection_keeps_what_a_full_sort_keeps() {
        let mut g = Generator::new(41);
        for (v, top_k) in [
            (4096, 900),
            (4096, 1),
            (512, 37),
            (64, 63),
            (64, 64),
            (64, 0),
        ] {
            for r in 0..40 {
                // Coarse values (a quarter step) make ties at the k-th value common.
                let row: Vec<f64> = g
                    .next_u32s(v)
                    .into_iter()
                    .map(|w| ((w % 64) as f64 - 32.0) / 4.0)
                    .collect();
                let by_sorting: Vec<bool> = if top_k == 0 || top_k >= v {
                    vec![true; v]
                } else {
                    let mut sorted = row.clone();
                    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
                    row.iter().map(|&x| x >= sorted[top_k - 1]).collect()
                };
                assert_eq!(
                    top_k_mask(&row, top_k),
                    by_sorting,
                    "v {v} k {top_k} row {r}"
                );
            }
        }
    }

    #[test]
    fn top_k_one_is_the_argmax_and_top_p_keeps_the_head() {
        let logits = [0.1f32, 2.0, -1.0, 1.9, 5.0, 5.5, 0.0, 1.0];
        let mut g = Generator::new(0);
        assert_eq!(
            draw(&logits, 4, &g.uniform(2, 0.0, 1.0), 1, 0.0),
            vec![1, 1]
        );
        // top_p tiny: only the largest logit survives.
        for _ in 0..20 {
            assert_eq!(
                draw(&logits, 4, &g.uniform(2, 0.0, 1.0), 0, 1e-6),
                vec![1, 1]
            );
        }
        // Without filtering, draws follow the softmax.
        let flat = [0.0f32, 0.0, 0.0, 5.0f32.ln()];
        let n = 4000;
        let u = g.uniform(n, 0.0, 1.0);
        let hits = draw(&flat.repeat(n), 4, &u, 0, 0.0)
            .iter()
            .filter(|&&t| t == 3)
            .count();
        assert!((hits as f64 / n as f64 - 5.0 / 8.0).abs() < 0.03, "{hits}");
    }

    #[test]
    fn top_p_drops_the_low_tail_in_value_then_index_order() {
        // Probabilities 1/8, 1/8, 1/4, 1/2 (codes 0..3); 1 - top_p = 0.3 drops codes 0 and 1
        // (running sums 1/8, 1/4), keeps code 2 (1/2 > 0.3); the draw is then 1/3 : 2/3.
        let l = |p: f64| p.ln() as f32;
        let row = [l(0.125), l(0.125), l(0.25), l(0.5)];
        for (u, want) in [(0.0, 2), (0.32, 2), (0.35, 3), (0.99, 3)] {
            assert_eq!(draw(&row, 4, &[u], 0, 0.7), vec![want], "u {u}");
        }
        // Ties are ordered by index: with equal values the earlier code goes first, so
        // 1 - top_p = 0.6 drops codes 0 and 1 (running sums 0.25, 0.5).
        let tied = [0.0f32; 4];
        for (u, want) in [(0.0, 2), (0.49, 2), (0.51, 3)] {
            assert_eq!(draw(&tied, 4, &[u], 0, 0.4), vec![want], "u {u}");
        }
        // Never the last one: top_p = 0 skips, top_p tiny leaves only the largest.
        assert_eq!(draw(&tied, 4, &[0.0], 0, 1e-9), vec![3]);
    }

    #[test]
    fn bad_inputs_are_named() {
        let t = Tensor::from_vec(vec![0.5f32; 2 * 3 * 4], [6, 4], &Device::Cpu).unwrap();
        let e = |u: &[f64], k, p| sample_top_k_top_p(&t, u, k, p).unwrap_err().to_string();
        assert!(e(&[0.5; 5], 0, 0.0).contains("5 uniforms"));
        assert!(e(&[0.5; 6], 0, 1.5).contains("top_p 1.5"));
        assert!(e(&[1.0; 6], 0, 0.0).contains("uniform 1"));
        let mut vals = vec![0.5f32; 24];
        vals[4 * 4 + 2] = f32::NAN;
        let t = Tensor::from_vec(vals, [6, 4], &Device::Cpu).unwrap();
        let m = sample_top_k_top_p(&t, &[0.5; 6], 0, 0.0)
            .unwrap_err()
            .to_string();
        assert!(m.contains("row 4 (of 6 rows of 4) at code 2"), "{m}");
        let t = Tensor::from_vec(vec![f32::INFINITY; 4], [1, 4], &Device::Cpu).unwrap();
        assert!(sample_top_k_top_p(&t, &[0.5], 1, 0.0).is_err());
        let t = Tensor::from_vec(vec![1i64; 4], [1, 4], &Device::Cpu).unwrap();
        assert!(sample_top_k_top_p(&t, &[0.5], 1, 0.0).is_err());
    }

    /// An independent statement of what survives: sort for the k-th value; then the ascending
    /// order (ties by index), running probability, drop while <= 1 - top_p, never the last.
    fn survivors(row: &[f64], top_k: usize, top_p: f64) -> Vec<bool> {
        let v = row.len();
        let mut desc = row.to_vec();
        desc.sort_by(|a, b| b.partial_cmp(a).unwrap());
        let kth = if top_k == 0 || top_k >= v {
            f64::NEG_INFINITY
        } else {
            desc[top_k - 1]
        };
        let mut keep: Vec<bool> = row.iter().map(|&x| x >= kth).collect();
        if top_p > 0.0 {
            let mut asc: Vec<usize> = (0..v).filter(|&i| keep[i]).collect();
            asc.sort_by(|&a, &b| row[a].partial_cmp(&row[b]).unwrap().then(a.cmp(&b)));
            let z: f64 = asc.iter().map(|&i| (row[i] - desc[0]).exp()).sum();
            let mut cum = 0.0;
            for &i in &asc[..asc.len() - 1] {
                cum += (row[i] - desc[0]).exp() / z;
                if cum > 1.0 - top_p {
                    break;
                }
                keep[i] = false;
            }
        }
        keep
    }

    #[test]
    fn the_filter_keeps_what_the_draw_can_pick_and_sets_the_rest_to_minus_infinity() {
        let mut g = Generator::new(5);
        let (rows, v) = (24, 50);
        for coarse in [false, true] {
            let x: Vec<f32> = g
                .normal(rows * v, 0.0, 2.0)
                .into_iter()
                .map(|y| {
                    if coarse {
                        (y * 2.0).round() as f32 / 2.0
                    } else {
                        y as f32
                    }
                })
                .collect();
            let t = Tensor::from_vec(x.clone(), [rows, v], &Device::Cpu).unwrap();
            for (top_k, top_p) in [
                (0, 0.0),
                (1, 0.0),
                (7, 0.0),
                (0, 0.5),
                (10, 0.9),
                (0, 1e-9),
                (60, 0.96),
            ] {
                let f = filter_top_k_top_p(&t, top_k, top_p).unwrap();
                assert_eq!((f.dims(), f.dtype()), (t.dims(), t.dtype()));
                let f = f.to_vec::<f32>().unwrap();
                for r in 0..rows {
                    let row: Vec<f64> = x[r * v..(r + 1) * v].iter().map(|&y| y as f64).collect();
                    let want = survivors(&row, top_k, top_p);
                    for i in 0..v {
                        let got = f[r * v + i];
                        if want[i] {
                            assert_eq!(got, x[r * v + i], "k {top_k} p {top_p} row {r} code {i}");
                        } else {
                            assert_eq!(
                                got,
                                f32::NEG_INFINITY,
                                "k {top_k} p {top_p} row {r} code {i}"
                            );
                        }
                    }
                    if top_k == 1 && !coarse {
                        assert_eq!(want.iter().filter(|&&k| k).count(), 1);
                    }
                }
                // Every draw is of a kept logit.
                for u in [0.0, 0.1, 0.37, 0.5, 0.93, 0.999_999] {
                    let tokens = draw(&x, v, &vec![u; rows], top_k, top_p);
                    for (r, &tok) in tokens.iter().enumerate() {
                        assert!(
                            f[r * v + tok as usize].is_finite(),
                            "k {top_k} p {top_p} row {r} drew {tok}"
                        );
                    }
                }
            }
        }
        // f64 and bf16 keep their dtype and the survivors of the values they hold.
        let x: Vec<f64> = g.normal(3 * 9, 0.0, 1.0);
        let wide = Tensor::from_vec(x, [3, 9], &Device::Cpu).unwrap();
        for dtype in [mvar_engine::DType::F64, mvar_engine::DType::BF16] {
            let t = wide.to_dtype(dtype).unwrap();
            let got = filter_top_k_top_p(&t, 4, 0.8).unwrap();
            assert_eq!(got.dtype(), dtype);
            let (held, got) = (t.to_vec_f64().unwrap(), got.to_vec_f64().unwrap());
            for (r, (row, out)) in held.chunks(9).zip(got.chunks(9)).enumerate() {
                let keep = survivors(row, 4, 0.8);
                let want: Vec<f64> = row
                    .iter()
                    .zip(&keep)
                    .map(|(&y, &k)| if k { y } else { f64::NEG_INFINITY })
                    .collect();
                assert_eq!(out, &want[..], "{dtype:?} row {r}");
            }
        }
    }

    #[test]
    fn the_draw_is_the_literal_draw_over_the_survivors() {
        // The module's step 3 spelled out over `survivors`: weights exp(x - max) of the kept
        // logits, the first index whose running sum passes u * total, else the last kept one.
        let literal = |row: &[f64], u: f64, top_k: usize, top_p: f64| {
            let keep = survivors(row, top_k, top_p);
            let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = row
                .iter()
                .zip(&keep)
                .map(|(&x, &k)| if k { (x - m).exp() } else { 0.0 })
                .collect();
            let target = u * w.iter().sum::<f64>();
            let mut acc = 0.0;
            for (i, &x) in w.iter().enumerate() {
                acc += x;
                if x > 0.0 && acc > target {
                    return i as i64;
                }
            }
            w.iter().rposition(|&x| x > 0.0).unwrap_or(0) as i64
        };
        let mut g = Generator::new(77);
        // The evaluation filter on rows of a trained model's spread, small rows with many ties,
        // and rows spread so wide that kept logits' weights underflow to 0.
        for (rows, v, spread, top_k, top_p) in [
            (16, 4096, 3.0, 900, 0.96),
            (16, 4096, 3.0, 0, 0.5),
            (64, 40, 0.25, 7, 0.9),
            (64, 40, 0.25, 0, 1e-9),
            (64, 40, 0.25, 0, 1.0),
            (32, 64, 400.0, 20, 0.96),
            (32, 64, 400.0, 0, 0.0),
        ] {
            let x: Vec<f64> = g
                .normal(rows * v, 0.0, 1.0)
                .into_iter()
                .map(|y| {
                    if spread < 1.0 {
                        (y / spread).round() * spread
                    } else {
                        y * spread
                    }
                })
                .collect();
            let u = g.uniform(rows, 0.0, 1.0);
            let t = Tensor::from_vec(x.clone(), [rows, v], &Device::Cpu).unwrap();
            let got = sample_top_k_top_p(&t, &u, top_k, top_p)
                .unwrap()
                .to_vec::<i64>()
                .unwrap();
            for r in 0..rows {
                let row = &x[r * v..(r + 1) * v];
                assert_eq!(
                    got[r],
                    literal(row, u[r], top_k, top_p),
                    "v {v} spread {spread} k {top_k} p {top_p} row {r}"
                );
            }
        }
    }

    #[test]
    fn no_rows_give_no_tokens_and_an_empty_filter() {
        for v in [0, 5] {
            let t = Tensor::from_vec(Vec::<f32>::new(), [0, v], &Device::Cpu).unwrap();
            let tokens = sample_top_k_top_p(&t, &[], 3, 0.9).unwrap();
            assert_eq!(tokens.dims(), [0]);
            let f = filter_top_k_top_p(&t, 3, 0.9).unwrap();
            assert_eq!(f.dims(), [0, v]);
        }
    }

    #[test]
    fn the_filter_names_bad_inputs() {
        let mut vals = vec![0.5f32; 24];
        vals[3 * 4 + 1] = f32::NAN;
        let t = Tensor::from_vec(vals, [6, 4], &Device::Cpu).unwrap();
        let m = filter_top_k_top_p(&t, 2, 0.9).unwrap_err().to_string();
        assert!(
            m.contains("filter_top_k_top_p") && m.contains("row 3 (of 6 rows of 4) at code 1"),
            "{m}"
        );
        let t = Tensor::from_vec(vec![0.5f32; 4], [1, 4], &Device::Cpu).unwrap();
        assert!(filter_top_k_top_p(&t, 2, 1.5)
            .unwrap_err()
            .to_string()
            .contains("top_p 1.5"));
        let t = Tensor::from_vec(vec![0.5f32; 4], [4], &Device::Cpu).unwrap();
        assert!(filter_top_k_top_p(&t, 2, 0.5).is_err());
    }
}
