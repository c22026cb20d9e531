//! Evaluation metrics: the Frechet distance between two Gaussians fitted to feature vectors, and
//! the teacher-forced token loss and accuracy of a VAR / MVAR per scale.
//!
//! Frechet distance of N(mu1, C1) and N(mu2, C2):
//!
//!   FD = |mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1^{1/2} C2 C1^{1/2})^{1/2})
//!
//! (the 2-Wasserstein distance squared between the Gaussians). Both square roots are of symmetric
//! positive semi-definite matrices and come from a symmetric eigendecomposition A = V diag(l) V^T
//! computed in f64 by the cyclic Jacobi method; eigenvalues that round-off makes slightly negative
//! are clamped to 0 (the true ones are >= 0), and so is a slightly negative total.
//!
//! What these numbers are not: computed on features of a small classifier trained on the bundled
//! data set, they are not the Inception-v3 FID on ImageNet statistics, and cannot be compared
//! with published FID figures. With few images (fewer than the feature dimension) the covariances
//! are rank-deficient and the estimate is biased upwards; compare runs at equal sample counts.

use mvar_engine::{no_grad, Error, Result, Tensor};
use mvar_ops as ops;

use crate::trainer::ArModel;

/// Mean \[dim\] and covariance [dim * dim] (row-major, unbiased: divided by n - 1) of `n` rows of
/// `dim` values each, given row-major in `rows`.
pub fn mean_and_covariance(rows: &[f64], n: usize, dim: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    const OP: &str = "mean_and_covariance";
    if dim == 0 || n.checked_mul(dim) != Some(rows.len()) {
        return Err(Error::shape(
            OP,
            format!("{} values for n = {n}, dim = {dim}", rows.len()),
            "n * dim values with dim > 0",
        ));
    }
    if n < 2 {
        return Err(Error::invalid(
            OP,
            format!("{n} rows: a covariance needs at least 2"),
        ));
    }
    if rows.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid(OP, "a row holds a NaN or infinite value"));
    }
    let mut mean = vec![0.0; dim];
    for r in rows.chunks_exact(dim) {
        mean.iter_mut().zip(r).for_each(|(m, v)| *m += v);
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut cov = vec![0.0; dim * dim];
    let mut centred = vec![0.0; dim];
    for r in rows.chunks_exact(dim) {
        centred
            .iter_mut()
            .zip(r.iter().zip(&mean))
            .for_each(|(c, (v, m))| *c = v - m);
        for i in 0..dim {
            let ci = centred[i];
            // Upper triangle only; mirrored below.
            for j in i..dim {
                cov[i * dim + j] += ci * centred[j];
            }
        }
    }
    let denom = (n - 1) as f64;
    for i in 0..dim {
        for j in i..dim {
            let v = cov[i * dim + j] / denom;
            cov[i * dim + j] = v;
            cov[j * dim + i] = v;
        }
    }
    Ok((mean, cov))
}

/// Eigenvalues and eigenvectors of the symmetric `dim x dim` matrix `a` (row-major; only its
/// symmetric part (A + A^T) / 2 is used) by cyclic Jacobi rotations: sweeps over all pairs
/// (p, q), each rotation zeroing `a[p][q]`, until the off-diagonal mass is below 1e-14 of the
/// total (or 100 sweeps). Returns (eigenvalues, V) with V row-major and eigenvector k in
/// column k, so that A = V diag(l) V^T.
pub fn symmetric_eigen(a: &[f64], dim: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    const OP: &str = "symmetric_eigen";
    if dim == 0 || dim.checked_mul(dim) != Some(a.len()) {
        return Err(Error::shape(
            OP,
            format!("{} values for dim {dim}", a.len()),
            "dim * dim values with dim > 0",
        ));
    }
    if a.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid(
            OP,
            "the matrix holds a NaN or infinite value",
        ));
    }
    let mut m = vec![0.0; dim * dim];
    for i in 0..dim {
        for j in 0..dim {
            m[i * dim + j] = 0.5 * (a[i * dim + j] + a[j * dim + i]);
        }
    }
    let mut v = vec![0.0; dim * dim];
    for i in 0..dim {
        v[i * dim + i] = 1.0;
    }
    let total: f64 = m.iter().map(|x| x * x).sum();
    for _sweep in 0..100 {
        let off: f64 = (0..dim)
            .flat_map(|i| (0..dim).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| m[i * dim + j] * m[i * dim + j])
            .sum();
        if off <= 1e-28 * total || off == 0.0 {
            break;
        }
        for p in 0..dim {
            for q in p + 1..dim {
                let apq = m[p * dim + q];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (m[p * dim + p], m[q * dim + q]);
                // The rotation angle that zeroes a[p][q]: t = tan(phi) is the smaller root of
                // t^2 + 2 theta t - 1 = 0 with theta = (a_qq - a_pp) / (2 a_pq).
                let theta = (aqq - app) / (2.0 * apq);
                let t = if theta.is_finite() {
                    theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt())
                } else {
                    0.0
                };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // A <- J^T A J with J the rotation in the (p, q) plane: columns, then rows.
                for k in 0..dim {
                    let (akp, akq) = (m[k * dim + p], m[k * dim + q]);
                    m[k * dim + p] = c * akp - s * akq;
                    m[k * dim + q] = s * akp + c * akq;
                }
                for k in 0..dim {
                    let (apk, aqk) = (m[p * dim + k], m[q * dim + k]);
                    m[p * dim + k] = c * apk - s * aqk;
                    m[q * dim + k] = s * apk + c * aqk;
                }
                m[p * dim + q] = 0.0;
                m[q * dim + p] = 0.0;
                for k in 0..dim {
                    let (vkp, vkq) = (v[k * dim + p], v[k * dim + q]);
                    v[k * dim + p] = c * vkp - s * vkq;
                    v[k * dim + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    Ok(((0..dim).map(|i| m[i * dim + i]).collect(), v))
}

/// The principal square root of a symmetric positive semi-definite matrix: V diag(sqrt(max(l,
/// 0))) V^T, row-major.
pub fn sqrt_psd(a: &[f64], dim: usize) -> Result<Vec<f64>> {
    let (l, v) = symmetric_eigen(a, dim)?;
    let r: Vec<f64> = l.iter().map(|&x| x.max(0.0).sqrt()).collect();
    let mut out = vec![0.0; dim * dim];
    for i in 0..dim {
        for j in i..dim {
            let s: f64 = (0..dim)
                .map(|k| v[i * dim + k] * r[k] * v[j * dim + k])
                .sum();
            out[i * dim + j] = s;
            out[j * dim + i] = s;
        }
    }
    Ok(out)
}

/// Row-major product of two `dim x dim` matrices.
fn matmul(a: &[f64], b: &[f64], dim: usize) -> Vec<f64> {
    let mut out = vec![0.0; dim * dim];
    for i in 0..dim {
        for k in 0..dim {
            let aik = a[i * dim + k];
            if aik == 0.0 {
                continue;
            }
            for j in 0..dim {
                out[i * dim + j] += aik * b[k * dim + j];
            }
        }
    }
    out
}

/// Frechet distance between N(mu1, cov1) and N(mu2, cov2) (see the module docs); means of one
/// length `d`, covariances `d x d` row-major, symmetric positive semi-definite. Errors (never
/// panics) on mismatched sizes or non-finite input.
pub fn frechet_distance(mu1: &[f64], cov1: &[f64], mu2: &[f64], cov2: &[f64]) -> Result<f64> {
    const OP: &str = "frechet_distance";
    let d = mu1.len();
    if d == 0 || mu2.len() != d {
        return Err(Error::shape(
            OP,
            format!("means of lengths {} and {}", mu1.len(), mu2.len()),
            "two non-empty means of one length",
        ));
    }
    for (name, c) in [("cov1", cov1), ("cov2", cov2)] {
        if c.len() != d * d {
            return Err(Error::shape(
                OP,
                format!("{name} with {} values", c.len()),
                format!("{d} x {d} = {} values for means of length {d}", d * d),
            ));
        }
    }
    if mu1.iter().chain(mu2).any(|v| !v.is_finite()) {
        return Err(Error::invalid(OP, "a mean holds a NaN or infinite value"));
    }
    let diff: f64 = mu1.iter().zip(mu2).map(|(a, b)| (a - b) * (a - b)).sum();
    let trace = |c: &[f64]| (0..d).map(|i| c[i * d + i]).sum::<f64>();
    let s1 = sqrt_psd(cov1, d)?;
    let inner = matmul(&matmul(&s1, cov2, d), &s1, d);
    let (l, _) = symmetric_eigen(&inner, d)?;
    let tr_sqrt: f64 = l.iter().map(|&x| x.max(0.0).sqrt()).sum();
    Ok((diff + trace(cov1) + trace(cov2) - 2.0 * tr_sqrt).max(0.0))
}

/// Frechet distance between two sets of feature rows (row-major [n, dim] each).
pub fn frechet_distance_of(a: &[f64], na: usize, b: &[f64], nb: usize, dim: usize) -> Result<f64> {
    let (m1, c1) = mean_and_covariance(a, na, dim)?;
    let (m2, c2) = mean_and_covariance(b, nb, dim)?;
    frechet_distance(&m1, &c1, &m2, &c2)
}

/// Teacher-forced figures of one scale.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleEval {
    /// Scale index and its side (pn).
    pub scale: usize,
    pub side: usize,
    /// Tokens scored: images x pn^2.
    pub tokens: usize,
    /// Mean cross-entropy (nats) over the scale's tokens.
    pub loss: f64,
    /// Top-1 accuracy over the scale's tokens.
    pub accuracy: f64,
}

/// Teacher-forced cross-entropy and top-1 accuracy per scale, without gradients, drop-path or
/// label dropout: `labels` \[M\] (true classes), `gt` the target tokens i64 [M, L], `x_in` the
/// teacher-forcing input [M, L - first_l, Cvae] (as `common::tokenize` / the trainer take them),
/// in batches of `batch` sequences. VAR runs its block-causal forward over all scales; MVAR runs
/// each of its training segments (block-diagonal first segment, then one neighbourhood-attention
/// scale at a time), exactly the forwards its trainer uses.
pub fn evaluate_tokens(
    model: &ArModel,
    labels: &[i64],
    gt: &Tensor,
    x_in: &Tensor,
    batch: usize,
) -> Result<Vec<ScaleEval>> {
    const OP: &str = "evaluate_tokens";
    let _ng = no_grad();
    let var = model.var();
    let cfg = &var.config;
    let l = cfg.total_tokens();
    let m = labels.len();
    if m == 0 || gt.dims() != [m, l] {
        return Err(Error::shape(
            OP,
            format!("targets {} for {m} labels", gt.shape()),
            format!("[{m}, {l}] with at least one sequence"),
        ));
    }
    let k = cfg.patch_nums.len();
    let segments = match model {
        ArModel::Var(_) => std::iter::once(0..k).collect(),
        ArModel::Mvar(mv) => mv.segments(),
    };
    let be = cfg.begin_ends();
    let mut loss_sum = vec![0.0f64; k];
    let mut hits = vec![0usize; k];
    let batch = batch.max(1);
    let device = var.device().clone();
    for start in (0..m).step_by(batch) {
        let n = batch.min(m - start);
        let lab = Tensor::from_vec(labels[start..start + n].to_vec(), [n], &device)?;
        let g = ops::narrow(gt, 0, start, n)?;
        let x = ops::narrow(x_in, 0, start, n)?;
        for seg in &segments {
            let logits = match model {
                ArModel::Var(v) => v.forward(&lab, &x, None)?,
                ArModel::Mvar(mv) => mv.forward_segment(&lab, &x, seg.clone(), None)?,
            };
            let (bg, ed) = (be[seg.start].0, be[seg.end - 1].1);
            let target = ops::narrow(&g, 1, bg, ed - bg)?;
            let ce = ops::cross_entropy(&logits, &target, None, 0.0)?.to_vec_f64()?;
            let pred = ops::argmax(&logits, -1, false)?.to_vec::<i64>()?;
            let want = target.to_vec::<i64>()?;
            let t = ed - bg;
            for si in seg.clone() {
                let (b0, b1) = (be[si].0 - bg, be[si].1 - bg);
                for row in 0..n {
                    for j in b0..b1 {
                        loss_sum[si] += ce[row * t + j];
                        hits[si] += usize::from(pred[row * t + j] == want[row * t + j]);
                    }
                }
            }
        }
    }
    Ok((0..k)
        .map(|si| {
            let tokens = m * (be[si].1 - be[si].0);
            ScaleEval {
                scale: si,
                side: cfg.patch_nums[si],
                tokens,
                loss: loss_sum[si] / tokens.max(1) as f64,
                accuracy: hits[si] as f64 / tokens.max(1) as f64,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvar_engine::Generator;

    fn random_rows(n: usize, dim: usize, seed: u64) -> Vec<f64> {
        Generator::new(seed).normal(n * dim, 0.0, 1.0)
    }

    /// A random symmetric positive definite matrix B B^T / dim + 0.1 I.
    fn random_spd(dim: usize, seed: u64) -> Vec<f64> {
        let b = random_rows(dim, dim, seed);
        let mut a = vec![0.0; dim * dim];
        for i in 0..dim {
            for j in 0..dim {
                a[i * dim + j] = (0..dim)
                    .map(|k| b[i * dim + k] * b[j * dim + k])
                    .sum::<f64>()
                    / dim as f64
                    + if i == j { 0.1 } else { 0.0 };
            }
        }
        a
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        mvar_ops::testing::max_abs_diff(a, b)
    }

    #[test]
    fn covariance_matches_the_definition() {
        let rows = [1.0, 2.0, 3.0, 6.0, 5.0, 4.0];
        let (m, c) = mean_and_covariance(&rows, 3, 2).unwrap();
        assert_eq!(m, vec![3.0, 4.0]);
        // x: 1, 3, 5 (var 4); y: 2, 6, 4 (var 4); cov: ((-2)(-2) + 0 + 2*0) / 2 = 2.
        assert_eq!(c, vec![4.0, 2.0, 2.0, 4.0]);
        assert!(mean_and_covariance(&rows, 2, 2).is_err());
        assert!(mean_and_covariance(&rows[..2], 1, 2).is_err());
    }

    #[test]
    fn jacobi_diagonalises_a_symmetric_matrix() {
        let dim = 12;
        let a = random_spd(dim, 3);
        let (l, v) = symmetric_eigen(&a, dim).unwrap();
        // A V = V diag(l) and V^T V = I.
        let av = matmul(&a, &v, dim);
        let mut vl = v.clone();
        for i in 0..dim {
            for k in 0..dim {
                vl[i * dim + k] *= l[k];
            }
        }
        assert!(max_abs_diff(&av, &vl) < 1e-10);
        let mut vt = vec![0.0; dim * dim];
        for i in 0..dim {
            for j in 0..dim {
                vt[i * dim + j] = v[j * dim + i];
            }
        }
        let mut eye = vec![0.0; dim * dim];
        for i in 0..dim {
            eye[i * dim + i] = 1.0;
        }
        assert!(max_abs_diff(&matmul(&vt, &v, dim), &eye) < 1e-12);
    }

    #[test]
    fn square_root_of_a_random_spd_matrix_squares_back() {
        for (dim, seed) in [(1, 0), (5, 1), (24, 2)] {
            let a = random_spd(dim, seed);
            let s = sqrt_psd(&a, dim).unwrap();
            assert!(max_abs_diff(&matmul(&s, &s, dim), &a) < 1e-10, "dim {dim}");
        }
    }

    #[test]
    fn distance_of_a_distribution_to_itself_is_zero() {
        let (n, dim) = (60, 10);
        let (m, c) = mean_and_covariance(&random_rows(n, dim, 4), n, dim).unwrap();
        let fd = frechet_distance(&m, &c, &m, &c).unwrap();
        assert!(fd.abs() < 1e-8, "{fd}");
        // Rank-deficient covariance (fewer rows than dimensions) too.
        let (m, c) = mean_and_covariance(&random_rows(5, dim, 5), 5, dim).unwrap();
        let fd = frechet_distance(&m, &c, &m, &c).unwrap();
        assert!(fd.abs() < 1e-6, "{fd}");
    }

    #[test]
    fn diagonal_covariances_match_the_closed_form() {
        let m1 = [0.5, -1.0, 2.0, 0.0];
        let m2 = [1.5, 1.0, 2.0, -0.5];
        let a: [f64; 4] = [1.0, 4.0, 0.25, 2.0];
        let b: [f64; 4] = [9.0, 1.0, 0.25, 0.0];
        let diag = |v: &[f64]| {
            let mut c = vec![0.0; 16];
            for i in 0..4 {
                c[i * 4 + i] = v[i];
            }
            c
        };
        let want: f64 = m1
            .iter()
            .zip(&m2)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            + a.iter()
                .zip(&b)
                .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
                .sum::<f64>();
        let fd = frechet_distance(&m1, &diag(&a), &m2, &diag(&b)).unwrap();
        assert!((fd - want).abs() < 1e-12, "{fd} vs {want}");
    }

    #[test]
    fn a_translation_costs_its_squared_length() {
        let dim = 8;
        let c = random_spd(dim, 6);
        let m1 = random_rows(1, dim, 7);
        let d = random_rows(1, dim, 8);
        let m2: Vec<f64> = m1.iter().zip(&d).map(|(a, b)| a + b).collect();
        let want: f64 = d.iter().map(|x| x * x).sum();
        let fd = frechet_distance(&m1, &c, &m2, &c).unwrap();
        assert!((fd - want).abs() < 1e-9, "{fd} vs {want}");
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        let c = vec![1.0, 0.0, 0.0, 1.0];
        let e = frechet_distance(&[0.0, 0.0], &c, &[0.0], &c)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("frechet_distance") && e.contains("lengths 2 and 1"),
            "{e}"
        );
        let e = frechet_distance(&[0.0, 0.0], &c, &[0.0, 0.0], &c[..3])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cov2"), "{e}");
        assert!(frechet_distance(&[], &[], &[], &[]).is_err());
        assert!(frechet_distance(&[f64::NAN, 0.0], &c, &[0.0, 0.0], &c).is_err());
        assert!(symmetric_eigen(&[1.0, 2.0, 3.0], 2).is_err());
        assert!(frechet_distance_of(&[1.0, 2.0], 1, &[1.0, 2.0], 1, 2).is_err());
    }
}
