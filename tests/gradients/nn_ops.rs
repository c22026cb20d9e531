//! Softmax, cross-entropy, normalisations and dropout: gradients against finite differences,
//! forward values against direct f64 formulas, f32/bf16 against f64, the random masks, and
//! every kind of bad input.

use mvar::engine::{DType, Device, Error, Generator, Result, Tensor};
use mvar::ops;
use proptest::prelude::*;

use crate::{check, config, randn, shape};

fn i64_tensor(v: Vec<i64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape.to_vec(), &Device::Cpu).unwrap()
}

/// `n` indices in 0..size.
fn indices(n: usize, size: usize, seed: u64) -> Vec<i64> {
    Generator::new(seed)
        .next_u32s(n)
        .into_iter()
        .map(|w| (w as usize % size) as i64)
        .collect()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}[{i}]: {a} vs {b}"
        );
    }
}

/// x as rows of `d` with each row rescaled to a norm drawn from [0.2, 0.6] or [1.5, 3], so that
/// with eps = 1 both branches of l2_normalize's max are exercised and none is near the kink.
fn rows_around_one(rows: usize, d: usize, seed: u64) -> Tensor {
    let mut v = f64s(&randn(&[rows, d], seed));
    let u = Generator::new(seed ^ 0xA5).uniform(2 * rows, 0.0, 1.0);
    for (r, row) in v.chunks_mut(d).enumerate() {
        let n = row.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-3);
        let target = if u[2 * r] < 0.5 {
            0.2 + 0.4 * u[2 * r + 1]
        } else {
            1.5 + 1.5 * u[2 * r + 1]
        };
        row.iter_mut().for_each(|x| *x *= target / n);
    }
    Tensor::from_vec(v, vec![rows, d], &Device::Cpu).unwrap()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn softmax_and_log_softmax(s in shape(3, 4), seed in any::<u64>(), pick in any::<usize>()) {
        let r = s.len();
        // Both axis spellings: non-negative and counted from the end.
        let axis = if pick & 1 == 0 { (pick / 2 % r) as isize } else { (pick / 2 % r) as isize - r as isize };
        let x = randn(&s, seed);
        check("softmax", |x| ops::softmax(&x[0], axis), std::slice::from_ref(&x))?;
        check("log_softmax", |x| ops::log_softmax(&x[0], axis), &[x])?;
    }

    #[test]
    fn cross_entropy_logits(
        lead in shape(2, 3), v in 1usize..6, seed in any::<u64>(), eps in 0.0f64..=1.0, weighted in any::<bool>()
    ) {
        let mut ls = lead.clone();
        ls.push(v);
        let n: usize = lead.iter().product();
        let targets = i64_tensor(indices(n, v, seed), &lead);
        let w = weighted.then(|| randn(&lead, seed ^ 2));
        check("cross_entropy", |x| ops::cross_entropy(&x[0], &targets, w.as_ref(), eps), &[randn(&ls, seed ^ 1)])?;
    }

    #[test]
    fn layer_norm_last_axis(lead in shape(2, 3), d in 3usize..6, seed in any::<u64>()) {
        // Rows of two elements normalise to about +-1 whatever their values: their gradient is
        // ~eps/var, below what finite differences resolve, so rows have at least three.
        let s = [lead, vec![d]].concat();
        check("layer_norm", |x| ops::layer_norm(&x[0], 1e-5), &[randn(&s, seed)])?;
    }

    #[test]
    fn group_norm_any_spatial_rank(
        n in 1usize..3, groups in 1usize..4, cpg in 1usize..4, spatial in prop::collection::vec(1usize..4, 0..=2),
        seed in any::<u64>()
    ) {
        // At least three elements per group, for the reason given for layer_norm (raising cpg
        // rather than rejecting: a long soak ran out of rejects).
        let cpg = cpg.max(3usize.div_ceil(spatial.iter().product::<usize>()));
        let c = groups * cpg;
        let xs = [vec![n, c], spatial].concat();
        let (x, w, b) = (randn(&xs, seed), randn(&[c], seed ^ 1), randn(&[c], seed ^ 2));
        check("group_norm", |x| ops::group_norm(&x[0], groups, &x[1], &x[2], 1e-5), &[x, w, b])?;
    }

    #[test]
    fn l2_normalize_both_branches(rows in 1usize..5, d in 1usize..5, seed in any::<u64>()) {
        check("l2_normalize", |x| ops::l2_normalize(&x[0], 1e-12), &[randn(&[rows, d], seed)])?;
        check("l2_normalize", |x| ops::l2_normalize(&x[0], 1.0), &[rows_around_one(rows, d, seed)])?;
    }

    #[test]
    fn dropout_and_drop_path(s in shape(3, 4), seed in any::<u64>(), p in 0.0f64..0.9) {
        let x = randn(&s, seed ^ 1);
        // A fresh generator per evaluation: every finite-difference step sees the same mask.
        check("dropout", |x| ops::dropout(&x[0], p, &mut Generator::new(seed)), std::slice::from_ref(&x))?;
        check("drop_path", |x| ops::drop_path(&x[0], p, &mut Generator::new(seed)), &[x])?;
    }
}

// ----------------------------------------------------------------------------------------------
// forward values against direct f64 formulas

#[test]
fn softmax_values_along_a_middle_axis() {
    let (a, n, b) = (2, 3, 4);
    let x = randn(&[a, n, b], 3);
    let xv = f64s(&x);
    let (mut want, mut want_log) = (vec![0.0; xv.len()], vec![0.0; xv.len()]);
    for o in 0..a {
        for i in 0..b {
            let at = |s: usize| (o * n + s) * b + i;
            let lse = (0..n).map(|s| xv[at(s)].exp()).sum::<f64>().ln();
            for s in 0..n {
                want[at(s)] = (xv[at(s)] - lse).exp();
                want_log[at(s)] = xv[at(s)] - lse;
            }
        }
    }
    assert_close(
        "softmax",
        &f64s(&ops::softmax(&x, 1).unwrap()),
        &want,
        1e-12,
    );
    assert_close(
        "log_softmax",
        &f64s(&ops::log_softmax(&x, -2).unwrap()),
        &want_log,
        1e-12,
    );
}

#[test]
fn softmax_is_stable_for_large_logits() {
    let x = Tensor::from_vec(vec![1000.0f32, 1001.0, -1000.0], 3, &Device::Cpu).unwrap();
    let y = f64s(&ops::softmax(&x, 0).unwrap());
    let e = (-1.0f64).exp();
    assert_close("softmax", &y, &[e / (1.0 + e), 1.0 / (1.0 + e), 0.0], 1e-6);
    let l = f64s(&ops::log_softmax(&x, 0).unwrap());
    assert!(l.iter().all(|v| v.is_finite()), "{l:?}");
}

#[test]
fn cross_entropy_values_match_pytorch_definition() {
    let (rows, v, eps) = (5, 7, 0.1);
    let logits = randn(&[rows, v], 4);
    let t = indices(rows, v, 5);
    let w = randn(&[rows], 6);
    let got =
        f64s(&ops::cross_entropy(&logits, &i64_tensor(t.clone(), &[rows]), Some(&w), eps).unwrap());
    let (lv, wv) = (f64s(&logits), f64s(&w));
    for r in 0..rows {
        let row = &lv[r * v..(r + 1) * v];
        let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
        let nll = lse - row[t[r] as usize];
        let smooth = row.iter().map(|x| lse - x).sum::<f64>() / v as f64;
        let want = wv[r] * ((1.0 - eps) * nll + eps * smooth);
        assert!(
            (got[r] - want).abs() < 1e-12,
            "row {r}: {} vs {want}",
            got[r]
        );
    }
    // One-dimensional logits: one token, a scalar target and a scalar loss.
    let one = ops::cross_entropy(&randn(&[v], 7), &i64_tensor(vec![2], &[]), None, 0.0).unwrap();
    assert_eq!(one.dims(), &[] as &[usize]);
}

/// mean, var and (x - mean) / sqrt(var + eps) of a slice.
fn normalized(x: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    x.iter().map(|v| (v - mean) / (var + eps).sqrt()).collect()
}

#[test]
fn layer_norm_values() {
    let x = randn(&[3, 2, 6], 8);
    let want: Vec<f64> = f64s(&x)
        .chunks(6)
        .flat_map(|r| normalized(r, 1e-6))
        .collect();
    assert_close(
        "layer_norm",
        &f64s(&ops::layer_norm(&x, 1e-6).unwrap()),
        &want,
        1e-12,
    );
}

#[test]
fn group_norm_values() {
    let (n, c, g, hw) = (2, 6, 3, 4);
    let x = randn(&[n, c, 2, 2], 9);
    let (w, b) = (randn(&[c], 10), randn(&[c], 11));
    let (wv, bv) = (f64s(&w), f64s(&b));
    let per_group = c / g * hw;
    let mut want: Vec<f64> = f64s(&x)
        .chunks(per_group)
        .flat_map(|r| normalized(r, 1e-6))
        .collect();
    for (i, y) in want.iter_mut().enumerate() {
        let ch = i / hw % c;
        *y = *y * wv[ch] + bv[ch];
    }
    assert_close(
        "group_norm",
        &f64s(&ops::group_norm(&x, g, &w, &b, 1e-6).unwrap()),
        &want,
        1e-12,
    );
    // No spatial axes: x [N, C].
    let x2 = randn(&[2, 4], 12);
    let y2 = ops::group_norm(&x2, 2, &randn(&[4], 13), &randn(&[4], 14), 1e-6).unwrap();
    assert_eq!(y2.dims(), &[2, 4]);
}

#[test]
fn l2_normalize_values_on_both_sides_of_eps() {
    let x = Tensor::from_vec(
        vec![3.0f64, 4.0, 0.03, 0.04, 0.0, 0.0],
        [3, 2],
        &Device::Cpu,
    )
    .unwrap();
    let y = f64s(&ops::l2_normalize(&x, 0.1).unwrap());
    assert_close("l2_normalize", &y, &[0.6, 0.8, 0.3, 0.4, 0.0, 0.0], 1e-12);
}

// ----------------------------------------------------------------------------------------------
// f32 and bf16 against f64

/// Runs `f` on `inputs` (f64) and on their f32 and bf16 copies: outputs within ~1e-5 (f32) and
/// 3e-2 (bf16) relative; f32 input gradients (of sum(y * w), random w) within 1e-5 relative.
fn agrees_across_dtypes(op: &str, f: impl Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor]) {
    let run = |dt: DType| {
        let xs: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_dtype(dt).unwrap().with_grad().unwrap())
            .collect();
        let y = f(&xs).unwrap();
        assert_eq!(y.dtype(), dt, "{op}");
        let w = randn(y.dims(), 77).to_dtype(dt).unwrap();
        ops::sum_all(&ops::mul(&y, &w).unwrap())
            .unwrap()
            .backward()
            .unwrap();
        let grads: Vec<Option<Vec<f64>>> = xs.iter().map(|x| x.grad().map(|g| f64s(&g))).collect();
        (f64s(&y), grads)
    };
    let (want, want_grads) = run(DType::F64);
    let (got, got_grads) = run(DType::F32);
    assert_close(&format!("{op} f32"), &got, &want, 1e-5);
    for (i, (g, w)) in got_grads.iter().zip(&want_grads).enumerate() {
        match (g, w) {
            (Some(g), Some(w)) => assert_close(&format!("{op} f32 grad {i}"), g, w, 1e-5),
            (None, None) => {}
            _ => panic!("{op}: input {i} has a gradient in one dtype only"),
        }
    }
    let (got, _) = run(DType::BF16);
    assert_close(&format!("{op} bf16"), &got, &want, 3e-2);
}

#[test]
fn softmax_f32_and_bf16_agree_with_f64() {
    let x = randn(&[4, 5, 3], 20);
    agrees_across_dtypes(
        "softmax",
        |x| ops::softmax(&x[0], 1),
        std::slice::from_ref(&x),
    );
    agrees_across_dtypes("log_softmax", |x| ops::log_softmax(&x[0], -1), &[x]);
}

#[test]
fn cross_entropy_f32_and_bf16_agree_with_f64() {
    let t = i64_tensor(indices(6, 9, 21), &[2, 3]);
    let f = |x: &[Tensor]| ops::cross_entropy(&x[0], &t, Some(&x[1]), 0.1);
    agrees_across_dtypes(
        "cross_entropy",
        f,
        &[randn(&[2, 3, 9], 22), randn(&[2, 3], 23)],
    );
}

#[test]
fn layer_norm_f32_and_bf16_agree_with_f64() {
    agrees_across_dtypes(
        "layer_norm",
        |x| ops::layer_norm(&x[0], 1e-6),
        &[randn(&[6, 16], 24)],
    );
}

#[test]
fn group_norm_f32_and_bf16_agree_with_f64() {
    let inputs = [randn(&[2, 8, 3, 3], 25), randn(&[8], 26), randn(&[8], 27)];
    agrees_across_dtypes(
        "group_norm",
        |x| ops::group_norm(&x[0], 4, &x[1], &x[2], 1e-6),
        &inputs,
    );
}

#[test]
fn l2_normalize_f32_and_bf16_agree_with_f64() {
    agrees_across_dtypes(
        "l2_normalize",
        |x| ops::l2_normalize(&x[0], 1e-12),
        &[randn(&[5, 8], 28)],
    );
    agrees_across_dtypes(
        "l2_normalize",
        |x| ops::l2_normalize(&x[0], 1.0),
        &[rows_around_one(6, 4, 29)],
    );
}

#[test]
fn dropout_f32_and_bf16_agree_with_f64() {
    let x = randn(&[4, 50], 30);
    agrees_across_dtypes(
        "dropout",
        |x| ops::dropout(&x[0], 0.3, &mut Generator::new(31)),
        std::slice::from_ref(&x),
    );
    agrees_across_dtypes(
        "drop_path",
        |x| ops::drop_path(&x[0], 0.3, &mut Generator::new(32)),
        &[x],
    );
}

// ----------------------------------------------------------------------------------------------
// threaded kernels against serial ones

/// Runs `f(x, params, samples)` on a large `x` (big enough for the threaded kernels) and on each
/// sample x[i..i+1] alone (serial kernels): outputs and gradients of sum(y * w) must agree, the
/// gradients of the shared `params` summed over the samples.
fn threaded_matches_serial(
    op: &str,
    f: impl Fn(&Tensor, &[Tensor], std::ops::Range<usize>) -> Result<Tensor>,
    x: Tensor,
    params: &[Tensor],
) {
    let leaves = |x: &Tensor| -> (Tensor, Vec<Tensor>) {
        (
            x.with_grad().unwrap(),
            params.iter().map(|p| p.with_grad().unwrap()).collect(),
        )
    };
    let n = x.dims()[0];
    let (xl, pl) = leaves(&x);
    let y = f(&xl, &pl, 0..n).unwrap();
    assert!(x.elem_count() >= 1 << 15, "{op}: too small to be threaded");
    let w = randn(y.dims(), 99);
    ops::sum_all(&ops::mul(&y, &w).unwrap())
        .unwrap()
        .backward()
        .unwrap();
    let (mut ys, mut dxs) = (vec![], vec![]);
    let mut dps = vec![vec![0.0; 0]; params.len()];
    for i in 0..n {
        let (xi, pi) = leaves(&ops::narrow(&x, 0, i, 1).unwrap());
        let yi = f(&xi, &pi, i..i + 1).unwrap();
        let wi = ops::narrow(&w, 0, i, 1).unwrap();
        ops::sum_all(&ops::mul(&yi, &wi).unwrap())
            .unwrap()
            .backward()
            .unwrap();
        ys.extend(f64s(&yi));
        dxs.extend(f64s(&xi.grad().unwrap()));
        for (acc, p) in dps.iter_mut().zip(&pi) {
            let g = f64s(&p.grad().unwrap());
            acc.resize(g.len(), 0.0);
            acc.iter_mut().zip(g).for_each(|(a, b)| *a += b);
        }
    }
    assert_close(&format!("{op} output"), &f64s(&y), &ys, 1e-12);
    assert_close(&format!("{op} dx"), &f64s(&xl.grad().unwrap()), &dxs, 1e-12);
    for (i, (p, want)) in pl.iter().zip(&dps).enumerate() {
        assert_close(
            &format!("{op} dparam {i}"),
            &f64s(&p.grad().unwrap()),
            want,
            1e-10,
        );
    }
}

#[test]
fn threaded_kernels_match_serial_ones() {
    threaded_matches_serial(
        "softmax",
        |x, _, _| ops::softmax(x, 1),
        randn(&[4, 96, 100], 50),
        &[],
    );
    threaded_matches_serial(
        "log_softmax",
        |x, _, _| ops::log_softmax(x, -1),
        randn(&[4, 96, 100], 51),
        &[],
    );
    let t = i64_tensor(indices(64, 600, 52), &[64]);
    let cw = randn(&[64], 53);
    threaded_matches_serial(
        "cross_entropy",
        |x, _, r| {
            let (ti, wi) = (
                ops::narrow(&t, 0, r.start, r.len())?,
                ops::narrow(&cw, 0, r.start, r.len())?,
            );
            ops::cross_entropy(x, &ti, Some(&wi), 0.1)
        },
        randn(&[64, 600], 54),
        &[],
    );
    threaded_matches_serial(
        "layer_norm",
        |x, _, _| ops::layer_norm(x, 1e-6),
        randn(&[4, 90, 100], 55),
        &[],
    );
    threaded_matches_serial(
        "group_norm",
        |x, p, _| ops::group_norm(x, 8, &p[0], &p[1], 1e-6),
        randn(&[2, 32, 24, 24], 56),
        &[randn(&[32], 57), randn(&[32], 58)],
    );
    threaded_matches_serial(
        "l2_normalize",
        |x, _, _| ops::l2_normalize(x, 1e-12),
        randn(&[4, 90, 100], 59),
        &[],
    );
}

// ----------------------------------------------------------------------------------------------
// random masks

#[test]
fn dropout_keep_rate_scale_and_draw_order() {
    let (n, p) = (200_000, 0.3);
    let x = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
    let mut rng = Generator::new(40);
    let y = ops::dropout(&x, p, &mut rng).unwrap().to_vec_f32().unwrap();
    let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
    assert!((kept - (1.0 - p)).abs() < 0.005, "keep rate {kept}");
    let scale = (1.0 / (1.0 - p)) as f32;
    assert!(
        y.iter().all(|&v| v == 0.0 || v == scale),
        "kept values are scaled by 1/(1-p)"
    );
    // Element i uses uniform i of one draw of n values, and the generator advanced past it.
    let mut reference = Generator::new(40);
    let u = reference.uniform(n, 0.0, 1.0);
    assert!(y.iter().zip(&u).all(|(&v, &u)| (v != 0.0) == (u < 1.0 - p)));
    assert_eq!(rng.state(), reference.state());
    // The same seed gives the same mask; another seed another one.
    let again = ops::dropout(&x, p, &mut Generator::new(40))
        .unwrap()
        .to_vec_f32()
        .unwrap();
    assert_eq!(y, again);
    let other = ops::dropout(&x, p, &mut Generator::new(41))
        .unwrap()
        .to_vec_f32()
        .unwrap();
    assert_ne!(y, other);
}

#[test]
fn drop_path_keeps_or_drops_whole_samples() {
    let (n, rest, p) = (4000, 6, 0.25);
    let x = randn(&[n, 2, 3], 42);
    let xv = f64s(&x);
    let mut rng = Generator::new(43);
    let y = f64s(&ops::drop_path(&x, p, &mut rng).unwrap());
    let mut reference = Generator::new(43);
    let u = reference.uniform(n, 0.0, 1.0);
    assert_eq!(rng.state(), reference.state(), "one uniform per sample");
    let mut kept = 0;
    for s in 0..n {
        let (ys, xs) = (&y[s * rest..(s + 1) * rest], &xv[s * rest..(s + 1) * rest]);
        if u[s] < 1.0 - p {
            kept += 1;
            assert!(
                ys.iter()
                    .zip(xs)
                    .all(|(a, b)| (a - b / (1.0 - p)).abs() < 1e-12),
                "sample {s} kept and scaled"
            );
        } else {
            assert!(ys.iter().all(|&a| a == 0.0), "sample {s} zeroed");
        }
    }
    let rate = kept as f64 / n as f64;
    assert!((rate - (1.0 - p)).abs() < 0.03, "keep rate {rate}");
    let again = f64s(&ops::drop_path(&x, p, &mut Generator::new(43)).unwrap());
    assert_eq!(y, again);
}

/// Samples longer than one CPU task (16 K elements), one task per sample, and a batch that
/// ends in a partial task of small samples: each sample whole, scaled or zeroed.
#[test]
fn drop_path_with_samples_larger_and_smaller_than_a_task() {
    for (n, rest) in [(7usize, 20_011usize), (3001, 17)] {
        let x = randn(&[n, rest], 46);
        let xv = f64s(&x);
        let p = 0.4;
        let y = f64s(&ops::drop_path(&x, p, &mut Generator::new(47)).unwrap());
        let u = Generator::new(47).uniform(n, 0.0, 1.0);
        for s in 0..n {
            let (ys, xs) = (&y[s * rest..][..rest], &xv[s * rest..][..rest]);
            if u[s] < 1.0 - p {
                assert!(
                    ys.iter()
                        .zip(xs)
                        .all(|(a, b)| (a - b / (1.0 - p)).abs() < 1e-12),
                    "[{n}, {rest}]: sample {s} kept and scaled"
                );
            } else {
                assert!(
                    ys.iter().all(|&a| a == 0.0),
                    "[{n}, {rest}]: sample {s} zeroed"
                );
            }
        }
    }
}

#[test]
fn zero_probability_is_the_identity_and_draws_nothing() {
    let x = randn(&[3, 4], 44);
    let mut rng = Generator::new(45);
    let before = rng.state();
    let y = ops::dropout(&x, 0.0, &mut rng).unwrap();
    let z = ops::drop_path(&x, 0.0, &mut rng).unwrap();
    assert_eq!(rng.state(), before);
    assert_eq!(f64s(&y), f64s(&x));
    assert_eq!(f64s(&z), f64s(&x));
}

// ----------------------------------------------------------------------------------------------
// bad inputs

fn fails(op: &str, r: Result<Tensor>) -> Error {
    let e = r.expect_err(op);
    assert!(
        e.to_string().contains(op),
        "message of {op} does not name it: {e}"
    );
    e
}

fn ints(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape.to_vec(), DType::I64, &Device::Cpu).unwrap()
}

#[test]
fn softmax_errors() {
    for (op, f) in [
        (
            "softmax",
            ops::softmax as fn(&Tensor, isize) -> Result<Tensor>,
        ),
        ("log_softmax", ops::log_softmax),
    ] {
        fails(op, f(&randn(&[2, 3], 1), 2));
        fails(op, f(&randn(&[2, 3], 1), -3));
        fails(op, f(&ints(&[2, 3]), 0));
        fails(
            op,
            f(&Tensor::scalar(1.0, DType::F32, &Device::Cpu).unwrap(), 0),
        );
    }
}

#[test]
fn cross_entropy_errors() {
    const OP: &str = "cross_entropy";
    let logits = randn(&[2, 3, 5], 1);
    let t = i64_tensor(vec![0, 1, 2, 3, 4, 0], &[2, 3]);
    let w = randn(&[2, 3], 2);
    let ce =
        |l: &Tensor, t: &Tensor, w: Option<&Tensor>, eps: f64| ops::cross_entropy(l, t, w, eps);
    // Targets out of range, both ways.
    for bad in [5i64, -1] {
        let tb = i64_tensor(vec![0, 1, bad, 3, 4, 0], &[2, 3]);
        let e = fails(OP, ce(&logits, &tb, None, 0.0));
        assert!(
            matches!(e, Error::IndexOutOfRange { index, size: 5, .. } if index == bad),
            "{e}"
        );
    }
    // Targets of the wrong dtype or shape.
    fails(OP, ce(&logits, &t.to_dtype(DType::F64).unwrap(), None, 0.0));
    fails(OP, ce(&logits, &i64_tensor(vec![0; 2], &[2]), None, 0.0));
    fails(OP, ce(&logits, &i64_tensor(vec![0; 6], &[3, 2]), None, 0.0));
    // Weights of the wrong shape or dtype.
    fails(OP, ce(&logits, &t, Some(&randn(&[3, 2], 3)), 0.0));
    fails(
        OP,
        ce(&logits, &t, Some(&w.to_dtype(DType::F32).unwrap()), 0.0),
    );
    fails(OP, ce(&logits, &t, Some(&ints(&[2, 3])), 0.0));
    // Label smoothing outside [0, 1].
    for eps in [-0.1, 1.5, f64::NAN] {
        fails(OP, ce(&logits, &t, Some(&w), eps));
    }
    // Integer logits, rank-0 logits, no classes.
    fails(OP, ce(&ints(&[2, 3, 5]), &t, None, 0.0));
    fails(
        OP,
        ce(
            &Tensor::scalar(1.0, DType::F64, &Device::Cpu).unwrap(),
            &i64_tensor(vec![0], &[]),
            None,
            0.0,
        ),
    );
    fails(OP, ce(&randn(&[2, 3, 0], 4), &t, None, 0.0));
}

#[test]
fn layer_norm_and_l2_normalize_errors() {
    for (op, f) in [
        (
            "layer_norm",
            ops::layer_norm as fn(&Tensor, f64) -> Result<Tensor>,
        ),
        ("l2_normalize", ops::l2_normalize),
    ] {
        fails(
            op,
            f(
                &Tensor::scalar(1.0, DType::F64, &Device::Cpu).unwrap(),
                1e-6,
            ),
        );
        fails(op, f(&ints(&[2, 3]), 1e-6));
        for eps in [-1e-6, f64::NAN, f64::INFINITY] {
            fails(op, f(&randn(&[2, 3], 1), eps));
        }
    }
}

#[test]
fn group_norm_errors() {
    const OP: &str = "group_norm";
    let (x, w, b) = (randn(&[2, 6, 3], 1), randn(&[6], 2), randn(&[6], 3));
    fails(OP, ops::group_norm(&x, 4, &w, &b, 1e-6));
    fails(OP, ops::group_norm(&x, 0, &w, &b, 1e-6));
    fails(OP, ops::group_norm(&randn(&[6], 4), 3, &w, &b, 1e-6));
    fails(OP, ops::group_norm(&x, 3, &randn(&[3], 5), &b, 1e-6));
    fails(OP, ops::group_norm(&x, 3, &w, &randn(&[6, 1], 6), 1e-6));
    fails(
        OP,
        ops::group_norm(&x, 3, &w.to_dtype(DType::F32).unwrap(), &b, 1e-6),
    );
    fails(OP, ops::group_norm(&ints(&[2, 6, 3]), 3, &w, &b, 1e-6));
    fails(OP, ops::group_norm(&x, 3, &w, &ints(&[6]), 1e-6));
    fails(OP, ops::group_norm(&x, 3, &w, &b, -1.0));
}

#[test]
fn dropout_and_drop_path_errors() {
    for (op, f) in [
        (
            "dropout",
            ops::dropout as fn(&Tensor, f64, &mut Generator) -> Result<Tensor>,
        ),
        ("drop_path", ops::drop_path),
    ] {
        for p in [-0.1, 1.0, 1.5, f64::NAN] {
            let mut rng = Generator::new(1);
            fails(op, f(&randn(&[2, 3], 1), p, &mut rng));
            assert_eq!(
                rng.state(),
                Generator::new(1).state(),
                "{op}: an invalid call draws nothing"
            );
        }
        fails(op, f(&ints(&[2, 3]), 0.5, &mut Generator::new(1)));
    }
    fails(
        "drop_path",
        ops::drop_path(
            &Tensor::scalar(1.0, DType::F64, &Device::Cpu).unwrap(),
            0.5,
            &mut Generator::new(1),
        ),
    );
}
