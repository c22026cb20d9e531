//! Attention (with its masks) and 2-D neighbourhood attention: gradients against finite
//! differences, forwards against naive loops and against each other, the window rule against
//! NATTEN's own formula, and the error messages.

use mvar::engine::{DType, Device, Generator, Tensor};
use mvar::ops::{self, natten_inverse_window, natten_window_start, AttnMask, NaKernel};
use proptest::prelude::*;

use crate::{check, config, randn};

fn t(v: Vec<f64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape.to_vec(), &Device::Cpu).unwrap()
}

/// A random additive mask of `shape`: 0, -inf, or (when `finite_values`) a finite bias.
fn random_mask(shape: &[usize], seed: u64, finite_values: bool) -> Tensor {
    let n: usize = shape.iter().product();
    let mut g = Generator::new(seed);
    let v = g
        .uniform(n, 0.0, 1.0)
        .into_iter()
        .map(|u| {
            if u < 0.3 {
                f64::NEG_INFINITY
            } else if finite_values {
                (u - 0.65) * 3.0
            } else {
                0.0
            }
        })
        .collect();
    t(v, shape)
}

/// The scale each token belongs to, for consecutive scales of lengths `lens`.
fn scale_ids(lens: &[usize]) -> Vec<usize> {
    lens.iter()
        .enumerate()
        .flat_map(|(s, &n)| std::iter::repeat_n(s, n))
        .collect()
}

/// softmax(q k^T * scale + bias) v by plain loops in f64, `bias(b, h, i, j)` the mask term (None =
/// masked). A fully masked row gives 0.
fn naive_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: impl Fn(usize, usize, usize, usize) -> Option<f64>,
) -> Vec<f64> {
    let (qd, kd, vd) = (q.dims().to_vec(), k.dims().to_vec(), v.dims().to_vec());
    let (b, h, lq, d, lk, dv) = (qd[0], qd[1], qd[2], qd[3], kd[2], vd[3]);
    let (q, k, v) = (
        q.to_vec_f64().unwrap(),
        k.to_vec_f64().unwrap(),
        v.to_vec_f64().unwrap(),
    );
    let mut out = vec![0.0; b * h * lq * dv];
    for bi in 0..b {
        for hi in 0..h {
            let bh = bi * h + hi;
            for i in 0..lq {
                let logits: Vec<Option<f64>> = (0..lk)
                    .map(|j| {
                        let s: f64 = (0..d)
                            .map(|c| q[(bh * lq + i) * d + c] * k[(bh * lk + j) * d + c])
                            .sum();
                        bias(bi, hi, i, j)
                            .map(|m| s * scale + m)
                            .filter(|x| *x > f64::NEG_INFINITY)
                    })
                    .collect();
                let m = logits
                    .iter()
                    .flatten()
                    .cloned()
                    .fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let w: Vec<f64> = logits
                    .iter()
                    .map(|l| l.map_or(0.0, |l| (l - m).exp()))
                    .collect();
                let z: f64 = w.iter().sum();
                for c in 0..dv {
                    out[(bh * lq + i) * dv + c] =
                        (0..lk).map(|j| w[j] / z * v[(bh * lk + j) * dv + c]).sum();
                }
            }
        }
    }
    out
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}: element {i}: {a} vs {b}"
        );
    }
}

/// Output and the gradients of sum(out * w) for q, k, v through the tape.
fn forward_backward(
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seed: u64,
) -> Vec<Vec<f64>> {
    let leaves: Vec<Tensor> = [q, k, v]
        .iter()
        .map(|x| x.detach().with_grad().unwrap())
        .collect();
    let out = f(&leaves[0], &leaves[1], &leaves[2]);
    let w = randn(out.dims(), seed).to_dtype(out.dtype()).unwrap();
    ops::sum_all(&ops::mul(&out, &w).unwrap())
        .unwrap()
        .backward()
        .unwrap();
    let mut r = vec![out.to_vec_f64().unwrap()];
    r.extend(
        leaves
            .iter()
            .map(|l| l.grad().expect("gradient").to_vec_f64().unwrap()),
    );
    r
}

/// Scale lengths (1..=3 scales of 1..=3 tokens).
fn scale_lens() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..=3, 1..=3)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn attention_gradients(
        b in 1usize..=2, h in 1usize..=2, lq in 1usize..=4, lk in 1usize..=4, d in 1usize..=3, dv in 1usize..=3,
        scale in 0.2f64..1.5, mask_kind in 0usize..4, seed in any::<u64>()
    ) {
        let (q, k, v) = (randn(&[b, h, lq, d], seed), randn(&[b, h, lk, d], seed ^ 1), randn(&[b, h, lk, dv], seed ^ 2));
        let mask = match mask_kind {
            0 => AttnMask::None,
            1 => AttnMask::Additive(random_mask(&[lq, lk], seed ^ 3, false)),
            2 => AttnMask::Additive(random_mask(&[b, 1, lq, lk], seed ^ 3, true)),
            _ => AttnMask::Additive(random_mask(&[h, 1, lk], seed ^ 3, true)),
        };
        check("attention", |x| ops::attention(&x[0], &x[1], &x[2], scale, &mask), &[q, k, v])?;
    }

    #[test]
    fn attention_block_mask_gradients(
        lens in scale_lens(), b in 1usize..=2, h in 1usize..=2, d in 1usize..=3, causal in any::<bool>(),
        seed in any::<u64>()
    ) {
        let l: usize = lens.iter().sum();
        let (q, k, v) = (randn(&[b, h, l, d], seed), randn(&[b, h, l, d], seed ^ 1), randn(&[b, h, l, 2], seed ^ 2));
        let mask = if causal { AttnMask::BlockCausal(lens) } else { AttnMask::BlockDiagonal(lens) };
        let op = if causal { "attention_block_causal" } else { "attention_block_diagonal" };
        check(op, |x| ops::attention(&x[0], &x[1], &x[2], 0.7, &mask), &[q, k, v])?;
    }

    #[test]
    fn na2d_gradients(
        kh in 0usize..3, ex in 0usize..3, ey in 0usize..3, h in 1usize..=2, d in 1usize..=2,
        scale in 0.3f64..1.5, seed in any::<u64>()
    ) {
        let k = 2 * kh + 1;
        let shape = [1, h, k + ex, k + ey, d];
        let (q, kk, v) = (randn(&shape, seed), randn(&shape, seed ^ 1), randn(&shape, seed ^ 2));
        check("na2d", |x| ops::na2d(&x[0], &x[1], &x[2], k, scale), &[q, kk, v])?;
    }
}

// ------------------------------------------------------------------------------------------------
// attention: forward against loops, masks against each other

#[test]
fn attention_matches_naive_loops_for_every_mask() {
    let (b, h, lq, lk, d, dv) = (2, 3, 4, 5, 3, 2);
    let (q, k, v) = (
        randn(&[b, h, lq, d], 1),
        randn(&[b, h, lk, d], 2),
        randn(&[b, h, lk, dv], 3),
    );
    let got = ops::attention(&q, &k, &v, 0.6, &AttnMask::None)
        .unwrap()
        .to_vec_f64()
        .unwrap();
    assert_close(
        "no mask",
        &got,
        &naive_attention(&q, &k, &v, 0.6, |_, _, _, _| Some(0.0)),
        1e-12,
    );

    // Broadcast from [H, 1, Lk] (padded to [1, H, 1, Lk]).
    let m = random_mask(&[h, 1, lk], 4, true);
    let mv = m.to_vec_f64().unwrap();
    let got = ops::attention(&q, &k, &v, 0.6, &AttnMask::Additive(m))
        .unwrap()
        .to_vec_f64()
        .unwrap();
    let want = naive_attention(&q, &k, &v, 0.6, |_, hi, _, j| Some(mv[hi * lk + j]));
    assert_close("additive [H, 1, Lk]", &got, &want, 1e-12);

    let m = random_mask(&[b, 1, lq, lk], 5, false);
    let mv = m.to_vec_f64().unwrap();
    let got = ops::attention(&q, &k, &v, 0.6, &AttnMask::Additive(m))
        .unwrap()
        .to_vec_f64()
        .unwrap();
    let want = naive_attention(&q, &k, &v, 0.6, |bi, _, i, j| {
        Some(mv[(bi * lq + i) * lk + j])
    });
    assert_close("additive [B, 1, Lq, Lk]", &got, &want, 1e-12);
}

#[test]
fn block_masks_match_their_definition_and_materialised_masks() {
    // The last one is large enough for the heads to run in parallel.
    for lens in [
        vec![1, 4, 9],
        vec![3],
        vec![1, 1, 1, 1],
        vec![2, 0, 3],
        vec![1, 4, 9, 16, 25],
    ] {
        let l: usize = lens.iter().sum();
        let (q, k, v) = (
            randn(&[2, 2, l, 4], 6),
            randn(&[2, 2, l, 4], 7),
            randn(&[2, 2, l, 3], 8),
        );
        let sid = scale_ids(&lens);
        for causal in [true, false] {
            let visible = |i: usize, j: usize| {
                if causal {
                    sid[i] >= sid[j]
                } else {
                    sid[i] == sid[j]
                }
            };
            let mask = if causal {
                AttnMask::BlockCausal(lens.clone())
            } else {
                AttnMask::BlockDiagonal(lens.clone())
            };
            let got = forward_backward(
                |q, k, v| ops::attention(q, k, v, 0.5, &mask).unwrap(),
                &q,
                &k,
                &v,
                9,
            );
            let want = naive_attention(&q, &k, &v, 0.5, |_, _, i, j| visible(i, j).then_some(0.0));
            assert_close(
                &format!("{lens:?} causal={causal}: forward"),
                &got[0],
                &want,
                1e-12,
            );
            // The same mask as a materialised additive [L, L] tensor gives the same gradients.
            let dense: Vec<f64> = (0..l * l)
                .map(|ij| {
                    if visible(ij / l, ij % l) {
                        0.0
                    } else {
                        f64::NEG_INFINITY
                    }
                })
                .collect();
            let dense = AttnMask::Additive(t(dense, &[l, l]));
            let want = forward_backward(
                |q, k, v| ops::attention(q, k, v, 0.5, &dense).unwrap(),
                &q,
                &k,
                &v,
                9,
            );
            for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
                assert_close(
                    &format!("{lens:?} causal={causal}: {name}"),
                    &got[i],
                    &want[i],
                    1e-12,
                );
            }
        }
    }
}

#[test]
fn fully_masked_rows_give_zero_output_and_zero_gradient() {
    let (lq, lk) = (3, 4);
    // Row 1 sees nothing; rows 0 and 2 see some keys; key 3 is seen by nobody.
    let inf = f64::NEG_INFINITY;
    let m = t(
        vec![0.0, inf, 0.0, inf, inf, inf, inf, inf, inf, 0.0, 0.0, inf],
        &[lq, lk],
    );
    for dt in [DType::F64, DType::F32, DType::BF16] {
        let (q, k, v) = (
            randn(&[1, 2, lq, 3], 10),
            randn(&[1, 2, lk, 3], 11),
            randn(&[1, 2, lk, 2], 12),
        );
        let (q, k, v) = (
            q.to_dtype(dt).unwrap(),
            k.to_dtype(dt).unwrap(),
            v.to_dtype(dt).unwrap(),
        );
        let mask = AttnMask::Additive(m.to_dtype(dt).unwrap());
        let r = forward_backward(
            |q, k, v| ops::attention(q, k, v, 1.0, &mask).unwrap(),
            &q,
            &k,
            &v,
            13,
        );
        assert!(
            r.iter().flatten().all(|x| x.is_finite()),
            "{dt}: non-finite values"
        );
        for hh in 0..2 {
            assert!(
                r[0][(hh * lq + 1) * 2..(hh * lq + 2) * 2]
                    .iter()
                    .all(|&x| x == 0.0),
                "{dt}: masked row output"
            );
            assert!(
                r[1][(hh * lq + 1) * 3..(hh * lq + 2) * 3]
                    .iter()
                    .all(|&x| x == 0.0),
                "{dt}: masked row dq"
            );
            assert!(
                r[2][(hh * lk + 3) * 3..(hh * lk + 4) * 3]
                    .iter()
                    .all(|&x| x == 0.0),
                "{dt}: unseen key dk"
            );
            assert!(
                r[3][(hh * lk + 3) * 2..(hh * lk + 4) * 2]
                    .iter()
                    .all(|&x| x == 0.0),
                "{dt}: unseen key dv"
            );
        }
    }
}

#[test]
fn attention_f32_and_bf16_agree_with_f64() {
    let (q, k, v) = (
        randn(&[2, 2, 7, 8], 20),
        randn(&[2, 2, 9, 8], 21),
        randn(&[2, 2, 9, 5], 22),
    );
    let mask = AttnMask::Additive(random_mask(&[7, 9], 23, false));
    let want = forward_backward(
        |q, k, v| ops::attention(q, k, v, 0.35, &mask).unwrap(),
        &q,
        &k,
        &v,
        24,
    );
    for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 5e-2)] {
        let cast = |x: &Tensor| x.to_dtype(dt).unwrap();
        let got = forward_backward(
            |q, k, v| {
                let out = ops::attention(q, k, v, 0.35, &mask).unwrap();
                assert_eq!(out.dtype(), dt);
                out
            },
            &cast(&q),
            &cast(&k),
            &cast(&v),
            24,
        );
        for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
            assert_close(&format!("{dt} {name}"), &got[i], &want[i], tol);
        }
    }
}

#[test]
fn attention_errors_name_the_op() {
    let q = randn(&[1, 2, 3, 4], 1);
    let k = randn(&[1, 2, 5, 4], 2);
    let v = randn(&[1, 2, 5, 6], 3);
    let none = AttnMask::None;
    let err = |r: mvar::engine::Result<Tensor>| r.expect_err("expected an error").to_string();
    let cases: Vec<(&str, String)> = vec![
        (
            "rank",
            err(ops::attention(&randn(&[2, 3, 4], 1), &k, &v, 1.0, &none)),
        ),
        (
            "batch/heads",
            err(ops::attention(&q, &randn(&[1, 3, 5, 4], 2), &v, 1.0, &none)),
        ),
        (
            "head dim",
            err(ops::attention(&q, &randn(&[1, 2, 5, 3], 2), &v, 1.0, &none)),
        ),
        (
            "keys vs values",
            err(ops::attention(&q, &k, &randn(&[1, 2, 4, 6], 3), 1.0, &none)),
        ),
        (
            "dtype",
            err(ops::attention(
                &q.to_dtype(DType::F32).unwrap(),
                &k,
                &v,
                1.0,
                &none,
            )),
        ),
        (
            "integer",
            err(ops::attention(
                &q.to_dtype(DType::I64).unwrap(),
                &k,
                &v,
                1.0,
                &none,
            )),
        ),
        ("scale", err(ops::attention(&q, &k, &v, f64::NAN, &none))),
        (
            "mask shape",
            err(ops::attention(
                &q,
                &k,
                &v,
                1.0,
                &AttnMask::Additive(randn(&[3, 4], 4)),
            )),
        ),
        (
            "mask rank",
            err(ops::attention(
                &q,
                &k,
                &v,
                1.0,
                &AttnMask::Additive(randn(&[1, 1, 1, 3, 5], 4)),
            )),
        ),
        (
            "mask dtype",
            err(ops::attention(
                &q,
                &k,
                &v,
                1.0,
                &AttnMask::Additive(randn(&[3, 5], 4).to_dtype(DType::U8).unwrap()),
            )),
        ),
        (
            "block lq != lk",
            err(ops::attention(
                &q,
                &k,
                &v,
                1.0,
                &AttnMask::BlockCausal(vec![1, 2]),
            )),
        ),
        (
            "block sum",
            err(ops::attention(
                &q,
                &q,
                &q,
                1.0,
                &AttnMask::BlockDiagonal(vec![1, 1]),
            )),
        ),
        (
            "block overflow",
            err(ops::attention(
                &q,
                &q,
                &q,
                1.0,
                &AttnMask::BlockCausal(vec![usize::MAX, 4]),
            )),
        ),
    ];
    for (what, msg) in cases {
        assert!(msg.contains("attention"), "{what}: {msg}");
    }
    let msg = err(ops::attention(
        &q,
        &q,
        &q,
        1.0,
        &AttnMask::BlockCausal(vec![1, 1]),
    ));
    assert!(msg.contains("[1, 1]") && msg.contains("Lq = 3"), "{msg}");
}

// ------------------------------------------------------------------------------------------------
// the window rule

/// NATTEN's kernel formula for the window start (no dilation), written independently of ours:
/// start = max(i - rl, 0) + (i + rr >= n ? n - rr - i - 1 : 0).
fn natten_formula_start(i: usize, n: usize, k: usize) -> usize {
    let (i, n, rl, rr) = (
        i as i64,
        n as i64,
        (k / 2) as i64,
        (k / 2 + k % 2) as i64 - 1,
    );
    ((i - rl).max(0) + if i + rr >= n { n - rr - i - 1 } else { 0 }) as usize
}

#[test]
fn window_start_matches_natten_formula() {
    for n in 1..=20 {
        for k in (1..=n).step_by(2) {
            for i in 0..n {
                let s = natten_window_start(i, n, k);
                assert_eq!(s, natten_formula_start(i, n, k), "n={n} k={k} i={i}");
                assert!(
                    s <= i && i < s + k && s + k <= n,
                    "n={n} k={k} i={i}: window {s}..{}",
                    s + k
                );
            }
        }
    }
}

#[test]
fn inverse_window_is_exact_for_all_small_axes() {
    for n in 1..=20 {
        for k in (1..=n).step_by(2) {
            for j in 0..n {
                let brute: Vec<usize> = (0..n)
                    .filter(|&i| {
                        let s = natten_window_start(i, n, k);
                        s <= j && j < s + k
                    })
                    .collect();
                let got: Vec<usize> = natten_inverse_window(j, n, k).collect();
                assert_eq!(got, brute, "n={n} k={k} key {j}");
            }
        }
    }
}

#[test]
fn windows_at_borders_and_corners_are_shifted_inward() {
    // 3 x 5 map, k = 3: rows always 0..3; columns clamp at both ends.
    let win = |i, n, k| {
        let s = natten_window_start(i, n, k);
        s..s + k
    };
    assert_eq!((win(0, 3, 3), win(0, 5, 3)), (0..3, 0..3)); // corner (0, 0)
    assert_eq!((win(2, 3, 3), win(4, 5, 3)), (0..3, 2..5)); // corner (2, 4)
    assert_eq!((win(1, 3, 3), win(2, 5, 3)), (0..3, 1..4)); // centre (1, 2)
                                                            // 7 x 7 map.
    assert_eq!(
        [win(0, 7, 3), win(3, 7, 3), win(6, 7, 3)],
        [0..3, 2..5, 4..7]
    );
    assert_eq!(
        [
            win(0, 7, 5),
            win(1, 7, 5),
            win(3, 7, 5),
            win(5, 7, 5),
            win(6, 7, 5)
        ],
        [0..5, 0..5, 1..6, 2..7, 2..7]
    );
    assert_eq!([win(0, 7, 7), win(6, 7, 7)], [0..7, 0..7]);
    // Key 0 of a 7-axis with k = 5 is seen by queries 0..3 (windows 0..5, 0..5, 0..5).
    assert_eq!(natten_inverse_window(0, 7, 5), 0..3);
    assert_eq!(natten_inverse_window(6, 7, 5), 4..7);
    assert_eq!(natten_inverse_window(3, 7, 5), 0..7);
}

// ------------------------------------------------------------------------------------------------
// na2d against dense attention

/// na2d(q, k, v) as attention over the flattened map with a dense additive mask built from
/// NATTEN's own window formula: the oracle for forward and gradients.
fn na2d_by_masked_attention(q: &Tensor, k: &Tensor, v: &Tensor, ks: usize, scale: f64) -> Tensor {
    let dims = q.dims().to_vec();
    let (x, y) = (dims[2], dims[3]);
    let l = x * y;
    let flat = |t: &Tensor| t.reshape([dims[0], dims[1], l, dims[4]]).unwrap();
    let sees = |qi: usize, kj: usize| {
        let (qx, qy, kx, ky) = (qi / y, qi % y, kj / y, kj % y);
        let (sx, sy) = (
            natten_formula_start(qx, x, ks),
            natten_formula_start(qy, y, ks),
        );
        (sx..sx + ks).contains(&kx) && (sy..sy + ks).contains(&ky)
    };
    let m: Vec<f64> = (0..l * l)
        .map(|ij| {
            if sees(ij / l, ij % l) {
                0.0
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect();
    let mask = AttnMask::Additive(t(m, &[l, l]).to_dtype(q.dtype()).unwrap());
    ops::attention(&flat(q), &flat(k), &flat(v), scale, &mask)
        .unwrap()
        .reshape(dims)
        .unwrap()
}

/// Both CPU variants (tiled: the default; naive) against the masked-attention oracle.
fn compare_na2d_with_oracle(shape: [usize; 5], ks: usize, scale: f64, seed: u64) {
    let (q, k, v) = (
        randn(&shape, seed),
        randn(&shape, seed ^ 1),
        randn(&shape, seed ^ 2),
    );
    let want = forward_backward(
        |q, k, v| na2d_by_masked_attention(q, k, v, ks, scale),
        &q,
        &k,
        &v,
        seed ^ 3,
    );
    for family in [NaKernel::Auto, NaKernel::Naive] {
        let got = forward_backward(
            |q, k, v| ops::na2d_with_kernel(q, k, v, ks, scale, family).unwrap(),
            &q,
            &k,
            &v,
            seed ^ 3,
        );
        for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
            assert_close(
                &format!("{family:?} {shape:?} k={ks} {name}"),
                &got[i],
                &want[i],
                1e-12,
            );
        }
    }
}

/// The tiled CPU variant against the naive one where the oracle's [L, L] mask would be large:
/// head dims around its 64-lane blocks and 8-lane score steps, windows wider than 8 keys (two
/// score steps), maps narrower and wider than a step, rectangular maps; f64 and f32.
#[test]
fn na2d_tiled_cpu_variant_matches_the_naive_one() {
    let cases: [([usize; 5], usize); 9] = [
        ([1, 2, 16, 16, 64], 7),
        ([2, 1, 13, 13, 64], 7),
        ([1, 1, 9, 20, 70], 9),
        ([1, 1, 15, 17, 24], 15),
        ([1, 2, 5, 11, 128], 5),
        ([1, 1, 12, 4, 1], 3),
        ([1, 1, 3, 3, 65], 3),
        ([1, 1, 14, 13, 13], 13),
        ([1, 1, 6, 9, 16], 1),
    ];
    for (c, (shape, ks)) in cases.into_iter().enumerate() {
        let seed = 900 + 4 * c as u64;
        let (q, k, v) = (
            randn(&shape, seed),
            randn(&shape, seed ^ 1),
            randn(&shape, seed ^ 2),
        );
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            let cast = |x: &Tensor| x.to_dtype(dt).unwrap();
            let run = |family| {
                forward_backward(
                    |q, k, v| ops::na2d_with_kernel(q, k, v, ks, 0.3, family).unwrap(),
                    &cast(&q),
                    &cast(&k),
                    &cast(&v),
                    seed ^ 3,
                )
            };
            let (tiled, naive) = (run(NaKernel::Auto), run(NaKernel::Naive));
            for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
                assert_close(
                    &format!("{dt} {shape:?} k={ks} {name}"),
                    &tiled[i],
                    &naive[i],
                    tol,
                );
            }
        }
    }
}

#[test]
fn na2d_with_the_whole_map_as_window_is_dense_attention() {
    for (n, d) in [(1, 3), (3, 4), (5, 2)] {
        let shape = [2, 2, n, n, d];
        let (q, k, v) = (randn(&shape, 30), randn(&shape, 31), randn(&shape, 32));
        let flat = |t: &Tensor| t.reshape([2, 2, n * n, d]).unwrap();
        let got = forward_backward(
            |q, k, v| ops::na2d(q, k, v, n, 0.4).unwrap(),
            &q,
            &k,
            &v,
            33,
        );
        let want = forward_backward(
            |q, k, v| ops::attention(&flat(q), &flat(k), &flat(v), 0.4, &AttnMask::None).unwrap(),
            &q,
            &k,
            &v,
            33,
        );
        for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
            assert_close(&format!("n={n} {name}"), &got[i], &want[i], 1e-12);
        }
    }
}

#[test]
fn na2d_border_and_corner_queries_on_small_maps() {
    compare_na2d_with_oracle([1, 2, 3, 5, 3], 3, 0.8, 40);
    compare_na2d_with_oracle([1, 1, 5, 3, 2], 3, 0.8, 41);
    compare_na2d_with_oracle([2, 1, 3, 5, 2], 1, 1.1, 42);
    for ks in [3, 5, 7] {
        compare_na2d_with_oracle([1, 2, 7, 7, 3], ks, 0.5, 43 + ks as u64);
    }
    compare_na2d_with_oracle([1, 1, 9, 6, 2], 5, 0.5, 50);
    // Large enough for the rows to run in parallel.
    compare_na2d_with_oracle([2, 2, 13, 16, 8], 7, 0.3, 51);
}

#[test]
fn na2d_f32_and_bf16_agree_with_f64() {
    let shape = [1, 2, 6, 5, 8];
    let (q, k, v) = (randn(&shape, 60), randn(&shape, 61), randn(&shape, 62));
    let want = forward_backward(
        |q, k, v| ops::na2d(q, k, v, 3, 0.35).unwrap(),
        &q,
        &k,
        &v,
        63,
    );
    for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 5e-2)] {
        let cast = |x: &Tensor| x.to_dtype(dt).unwrap();
        let got = forward_backward(
            |q, k, v| {
                let out = ops::na2d(q, k, v, 3, 0.35).unwrap();
                assert_eq!(out.dtype(), dt);
                out
            },
            &cast(&q),
            &cast(&k),
            &cast(&v),
            63,
        );
        for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
            assert_close(&format!("{dt} {name}"), &got[i], &want[i], tol);
        }
    }
}

#[test]
fn na2d_errors_name_the_op_and_the_sizes() {
    let x = randn(&[1, 2, 5, 5, 4], 1);
    let err = |r: mvar::engine::Result<Tensor>| r.expect_err("expected an error").to_string();
    let msg = err(ops::na2d(&x, &x, &x, 7, 1.0));
    assert!(
        msg.contains("na2d") && msg.contains("kernel_size 7 is larger than the 5 x 5 map"),
        "{msg}"
    );
    let wide = randn(&[1, 2, 5, 3, 4], 1);
    let msg = err(ops::na2d(&wide, &wide, &wide, 5, 1.0));
    assert!(
        msg.contains("kernel_size 5 is larger than the 5 x 3 map"),
        "{msg}"
    );
    for ks in [0, 2, 4] {
        let msg = err(ops::na2d(&x, &x, &x, ks, 1.0));
        assert!(
            msg.contains("na2d")
                && msg.contains(&format!("kernel_size {ks}"))
                && msg.contains("odd"),
            "{msg}"
        );
    }
    let r4 = randn(&[2, 5, 5, 4], 1);
    let msg = err(ops::na2d(&r4, &r4, &r4, 3, 1.0));
    assert!(
        msg.contains("na2d") && msg.contains("[2, 5, 5, 4]") && msg.contains("rank-5"),
        "{msg}"
    );
    let other = randn(&[1, 2, 5, 5, 3], 2);
    let msg = err(ops::na2d(&x, &other, &x, 3, 1.0));
    assert!(
        msg.contains("na2d") && msg.contains("[1, 2, 5, 5, 3]") && msg.contains("one shape"),
        "{msg}"
    );
    let msg = err(ops::na2d(&x, &x, &other, 3, 1.0));
    assert!(msg.contains("na2d") && msg.contains("one shape"), "{msg}");
    for msg in [
        err(ops::na2d(&x, &x.to_dtype(DType::F32).unwrap(), &x, 3, 1.0)),
        err(ops::na2d(&x.to_dtype(DType::I64).unwrap(), &x, &x, 3, 1.0)),
        err(ops::na2d(&x, &x, &x, 3, f64::INFINITY)),
    ] {
        assert!(msg.contains("na2d"), "{msg}");
    }
}
