//! Gradient checking against central finite differences, for the property tests of every op.
//!
//! The checked scalar is `L = sum(f(x) * w)` with a fixed random `w`, so that every output
//! element contributes with its own weight (a plain sum would hide errors that cancel, e.g. in
//! softmax, whose outputs always sum to one). The analytic gradient comes from the tape; the
//! numeric one perturbs each input element by +-eps in f64 and evaluates `L` on the host.
//!
//! The reported error of an input is `max|analytic - numeric| / max(max|numeric|, floor)`: the
//! worst element error relative to the gradient's scale. In f64 with eps = 1e-6 a correct
//! backward lands near 1e-9; a wrong one lands near 1.
//!
//! The floor also covers the rounding noise of the finite difference itself: each evaluation of
//! `L` is exact to about `f64::EPSILON * sum|y * w|`, so the difference quotient is exact to about
//! that over eps. An input whose true gradient is that small (a query that a mask leaves almost
//! no say, say) would otherwise fail on noise alone: a soak run found one at 3e-6 with an error of
//! 6e-11. The floor rises to NOISE_MARGIN times that noise over the tolerance, so noise can never
//! fail a check, while a gradient that is wrong by more than NOISE_MARGIN times the noise still
//! does.

use mvar_engine::{DType, Device, Error, Generator, Result, Tensor};

/// How many times the finite difference's rounding noise an error may reach before it counts.
const NOISE_MARGIN: f64 = 10.0;

/// Finite-difference settings.
#[derive(Debug, Clone, Copy)]
pub struct GradCheck {
    pub eps: f64,
    /// Largest acceptable relative error (see the module docs).
    pub tolerance: f64,
    /// Gradient scales below this are treated as this (avoids dividing by ~0).
    pub floor: f64,
    pub seed: u64,
}

impl Default for GradCheck {
    fn default() -> Self {
        GradCheck {
            eps: 1e-6,
            tolerance: 1e-5,
            floor: 1e-6,
            seed: 1234,
        }
    }
}

/// Result of a gradient check: the relative error of each input.
#[derive(Debug, Clone)]
pub struct GradReport {
    pub errors: Vec<f64>,
    pub tolerance: f64,
}

impl GradReport {
    pub fn worst(&self) -> f64 {
        self.errors.iter().cloned().fold(0.0, f64::max)
    }

    pub fn passed(&self) -> bool {
        self.errors.iter().all(|e| *e <= self.tolerance)
    }
}

fn weighted_sum(y: &Tensor, w: &[f64]) -> Result<f64> {
    Ok(y.to_vec_f64()?.iter().zip(w).map(|(a, b)| a * b).sum())
}

/// Compares the tape's gradients of `f` at `inputs` (f64, CPU) with finite differences.
pub fn check_gradients(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    cfg: GradCheck,
) -> Result<GradReport> {
    if let Some(bad) = inputs
        .iter()
        .find(|t| t.dtype() != DType::F64 || !t.device().is_cpu())
    {
        return Err(Error::invalid(
            "check_gradients",
            format!("input {bad:?}: expected f64 tensors on the CPU"),
        ));
    }
    let leaves: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.detach().with_grad())
        .collect::<Result<_>>()?;
    let y = f(&leaves)?;
    let mut rng = Generator::new(cfg.seed);
    let w = rng.normal(y.elem_count(), 0.0, 1.0);
    let w_t = Tensor::from_vec(w.clone(), y.shape().clone(), &Device::Cpu)?;
    let loss = crate::reduce::sum_all(&crate::elementwise::mul(&y, &w_t)?)?;
    loss.backward()?;
    let loss_magnitude: f64 = y
        .to_vec_f64()?
        .iter()
        .zip(&w)
        .map(|(a, b)| (a * b).abs())
        .sum();
    let fd_noise = f64::EPSILON * loss_magnitude / cfg.eps;
    let floor = if fd_noise.is_finite() {
        cfg.floor.max(NOISE_MARGIN * fd_noise / cfg.tolerance)
    } else {
        cfg.floor
    };

    let mut errors = Vec::with_capacity(inputs.len());
    for (i, leaf) in leaves.iter().enumerate() {
        let analytic = match leaf.grad() {
            Some(g) => g.to_vec_f64()?,
            None => vec![0.0; leaf.elem_count()],
        };
        let base = leaf.to_vec_f64()?;
        let mut numeric = vec![0.0; base.len()];
        for j in 0..base.len() {
            let eval = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[j] += delta;
                let mut xs: Vec<Tensor> = inputs.to_vec();
                xs[i] = Tensor::from_vec(v, leaf.shape().clone(), &Device::Cpu)?;
                let _ng = mvar_engine::no_grad();
                weighted_sum(&f(&xs)?, &w)
            };
            numeric[j] = (eval(cfg.eps)? - eval(-cfg.eps)?) / (2.0 * cfg.eps);
        }
        let scale = numeric.iter().fold(floor, |m, v| m.max(v.abs()));
        // f64::max drops a NaN operand, so a NaN difference (a NaN or infinite output or
        // gradient) would vanish from the fold: it counts as an infinite error instead.
        let err = analytic
            .iter()
            .zip(&numeric)
            .map(|(a, n)| {
                let d = (a - n).abs();
                if d.is_nan() {
                    f64::INFINITY
                } else {
                    d
                }
            })
            .fold(0.0, f64::max)
            / scale;
        errors.push(err);
    }
    Ok(GradReport {
        errors,
        tolerance: cfg.tolerance,
    })
}

/// |a - b| for comparing a result with a reference: 0 when they are equal (equal infinities
/// too) or both NaN, +inf when only one is NaN or they are infinities of opposite signs; never
/// NaN, so a largest-difference fold cannot lose a NaN result (`f64::max` drops a NaN operand,
/// and a NaN compares false with any tolerance).
pub fn abs_diff(a: f64, b: f64) -> f64 {
    if a == b || (a.is_nan() && b.is_nan()) {
        0.0
    } else {
        let d = (a - b).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            d
        }
    }
}

/// The largest [`abs_diff`] of two slices of one length (0 for empty ones).
pub fn max_abs_diff(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "max_abs_diff: lengths");
    got.iter()
        .zip(want)
        .map(|(&a, &b)| abs_diff(a, b))
        .fold(0.0, f64::max)
}

/// [`max_abs_diff`] of f32 values.
pub fn max_abs_diff_f32(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "max_abs_diff_f32: lengths");
    got.iter()
        .zip(want)
        .map(|(&a, &b)| abs_diff(a as f64, b as f64))
        .fold(0.0, f64::max) as f32
}

/// The case count of a property test: `PROPTEST_CASES` when set (a soak run), else `default`
/// (what CI runs). Our configs set their own counts, which would otherwise override the variable.
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A random f64 tensor on the CPU (for tests).
pub fn randn_f64(shape: &[usize], rng: &mut Generator) -> Result<Tensor> {
    Tensor::randn(shape.to_vec(), 0.0, 1.0, DType::F64, &Device::Cpu, rng)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_never_lose_a_nan() {
        let inf = f64::INFINITY;
        assert_eq!(abs_diff(1.0, 1.5), 0.5);
        assert_eq!(abs_diff(-inf, -inf), 0.0);
        assert_eq!(abs_diff(f64::NAN, f64::NAN), 0.0);
        assert_eq!(abs_diff(f64::NAN, 1.0), inf);
        assert_eq!(abs_diff(2.0, f64::NAN), inf);
        assert_eq!(abs_diff(inf, -inf), inf);
        assert_eq!(max_abs_diff(&[1.0, f64::NAN, 3.0], &[1.0, 2.0, 3.5]), inf);
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.25, 2.0]), 0.25);
        assert_eq!(
            max_abs_diff_f32(&[f32::NAN, 1.0], &[0.0, 1.0]),
            f32::INFINITY
        );
        assert_eq!(max_abs_diff(&[], &[]), 0.0);
    }
}
