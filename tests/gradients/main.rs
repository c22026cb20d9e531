//! Property tests: the gradient of every op against central finite differences in f64, on
//! random shapes and values (see `mvar::ops::testing` for the error measure).
//!
//! Set `MVAR_GRADCHECK_LOG=path` to append "op<TAB>worst relative error" for every case run.

use std::io::Write;

use mvar::engine::{Generator, Result, Tensor};
use mvar::ops::testing::{check_gradients, randn_f64, GradCheck};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

mod attention_ops;
mod core_ops;
mod nn_ops;
mod spatial_ops;

/// Runs the finite-difference check and fails the proptest case when it does not pass.
pub fn check(
    op: &str,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
) -> std::result::Result<(), TestCaseError> {
    check_with(op, f, inputs, GradCheck::default())
}

pub fn check_with(
    op: &str,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    cfg: GradCheck,
) -> std::result::Result<(), TestCaseError> {
    let report =
        check_gradients(f, inputs, cfg).map_err(|e| TestCaseError::fail(format!("{op}: {e}")))?;
    if let Ok(path) = std::env::var("MVAR_GRADCHECK_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write per line: tests run on several threads and append to one file.
            let _ = f.write_all(format!("{op}\t{:e}\n", report.worst()).as_bytes());
        }
    }
    prop_assert!(
        report.passed(),
        "{op}: relative gradient errors {:?} above {}",
        report.errors,
        report.tolerance
    );
    Ok(())
}

/// A shape of rank 1..=max_rank with axes 1..=max_dim.
pub fn shape(max_rank: usize, max_dim: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1..=max_dim, 1..=max_rank)
}

/// Two shapes that broadcast together: the second is the first with some axes set to 1 and
/// possibly some leading axes dropped; then the pair is maybe swapped.
pub fn broadcast_pair() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    (
        shape(3, 3),
        prop::collection::vec(any::<bool>(), 3),
        0usize..3,
        any::<bool>(),
    )
        .prop_map(|(full, ones, drop, swap)| {
            let mut other: Vec<usize> = full
                .iter()
                .zip(&ones)
                .map(|(&d, &one)| if one { 1 } else { d })
                .collect();
            let drop = drop.min(other.len() - 1);
            other.drain(..drop);
            if swap {
                (other, full)
            } else {
                (full, other)
            }
        })
}

pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    randn_f64(shape, &mut Generator::new(seed)).expect("random tensor")
}

/// Values at least 0.15 apart, in random order, for the ops with a kink where two inputs tie
/// (max/min reductions, maximum/minimum): a central difference of 1e-6 across a near-tie measures
/// half a gradient (a 60000-case soak found one). Returns `total` values; callers split them.
pub fn distinct_values(total: usize, seed: u64) -> Vec<f64> {
    let mut g = Generator::new(seed);
    let keys = g.uniform(total, 0.0, 1.0);
    let jitter = g.uniform(total, 0.0, 0.1);
    let mut order: Vec<usize> = (0..total).collect();
    order.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]));
    let mut v = vec![0.0; total];
    for (rank, &i) in order.iter().enumerate() {
        v[i] = (rank as f64 - total as f64 / 2.0) * 0.25 + jitter[rank];
    }
    v
}

/// [`distinct_values`] as a tensor.
pub fn distinct(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(
        distinct_values(n, seed),
        shape.to_vec(),
        &mvar::engine::Device::Cpu,
    )
    .expect("tensor")
}

/// Random normal values moved at least `margin` away from each of `kinks` (for clamp's bounds).
pub fn randn_avoiding(shape: &[usize], seed: u64, kinks: &[f64], margin: f64) -> Tensor {
    let v = randn(shape, seed)
        .to_vec_f64()
        .expect("values")
        .into_iter()
        .map(|x| {
            kinks.iter().fold(x, |x, &k| {
                if (x - k).abs() < margin {
                    k + margin.copysign(x - k)
                } else {
                    x
                }
            })
        })
        .collect();
    Tensor::from_vec(v, shape.to_vec(), &mvar::engine::Device::Cpu).expect("tensor")
}

/// Random values bounded away from zero: |x| >= 0.5, random sign unless `positive`.
pub fn away_from_zero(shape: &[usize], seed: u64, positive: bool) -> Tensor {
    let mut g = Generator::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = g
        .normal(n, 0.0, 1.0)
        .into_iter()
        .map(|x| {
            let m = 0.5 + x.abs();
            if positive || x >= 0.0 {
                m
            } else {
                -m
            }
        })
        .collect();
    Tensor::from_vec(v, shape.to_vec(), &mvar::engine::Device::Cpu).expect("tensor")
}

pub fn config() -> ProptestConfig {
    ProptestConfig {
        cases: mvar::ops::testing::proptest_cases(48),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The check itself: `a + kb * b` with a chosen (possibly wrong) backward for b. It must pass the
/// true gradient and fail a missing one, also where b's is 1e-6 of a's (the case the noise floor
/// must not hide). A relative error is caught down to 0.1 % at the loss's scale, and down to 10 %
/// at 1e-6 of it: there a 1 % error is about the finite difference's own noise.
#[test]
fn the_check_fails_wrong_gradients_even_small_ones() {
    fn op(x: &[Tensor], kb: f64, claimed_kb: f64) -> Result<Tensor> {
        let out = mvar::ops::add(&x[0].detach(), &mvar::ops::affine(&x[1].detach(), kb, 0.0)?)?;
        Ok(Tensor::record(
            out,
            "a + kb * b",
            &[&x[0], &x[1]],
            move || {
                move |g: &Tensor| {
                    Ok(vec![
                        Some(g.clone()),
                        Some(mvar::ops::affine(g, claimed_kb, 0.0)?),
                    ])
                }
            },
        ))
    }
    let inputs = [randn(&[2, 3], 1), randn(&[2, 3], 2)];
    let run = |kb: f64, claimed: f64| {
        check_gradients(|x| op(x, kb, claimed), &inputs, GradCheck::default()).expect("check runs")
    };
    for (kb, caught) in [(1.0, 1.001), (1e-6, 1.1)] {
        let right = run(kb, kb);
        assert!(
            right.passed(),
            "kb {kb}: the true gradient failed: {:?}",
            right.errors
        );
        let off = run(kb, kb * caught);
        assert!(
            !off.passed(),
            "kb {kb}: an error of x{caught} passed: {:?}",
            off.errors
        );
        let missing = run(kb, 0.0);
        assert!(
            !missing.passed(),
            "kb {kb}: a missing gradient passed: {:?}",
            missing.errors
        );
    }
    // A NaN gradient, and a NaN output (NaN finite differences), fail: f64::max would drop
    // them from the error's fold.
    let nan = run(1.0, f64::NAN);
    assert!(!nan.passed(), "a NaN gradient passed: {:?}", nan.errors);
    let nan_out = check_gradients(
        |x| mvar::ops::mul_scalar(&op(x, 1.0, 1.0)?, f64::NAN),
        &inputs,
        GradCheck::default(),
    )
    .expect("check runs");
    assert!(
        !nan_out.passed(),
        "a NaN output passed: {:?}",
        nan_out.errors
    );
}
