//! Elementwise, reductions, matmul, layout and index ops.

use mvar::engine::{DType, Device, Tensor};
use mvar::ops::{self, BinaryOp, UnaryOp};
use proptest::prelude::*;

use crate::{
    away_from_zero, broadcast_pair, check, config, distinct, distinct_values, randn,
    randn_avoiding, shape,
};

const UNARY: [UnaryOp; 12] = [
    UnaryOp::Neg,
    UnaryOp::Exp,
    UnaryOp::Log,
    UnaryOp::Sqrt,
    UnaryOp::Rsqrt,
    UnaryOp::Tanh,
    UnaryOp::Sigmoid,
    UnaryOp::Silu,
    UnaryOp::GeluTanh,
    UnaryOp::Relu,
    UnaryOp::Abs,
    UnaryOp::Square,
];

const BINARY: [BinaryOp; 6] = [
    BinaryOp::Add,
    BinaryOp::Sub,
    BinaryOp::Mul,
    BinaryOp::Div,
    BinaryOp::Maximum,
    BinaryOp::Minimum,
];

fn u8_mask(shape: &[usize], seed: u64) -> Tensor {
    let v = randn(shape, seed).to_vec_f64().unwrap();
    Tensor::from_vec(
        v.iter().map(|&x| (x > 0.0) as u8).collect::<Vec<u8>>(),
        shape.to_vec(),
        &Device::Cpu,
    )
    .unwrap()
}

fn i64_indices(n: usize, size: usize, seed: u64) -> Vec<i64> {
    let mut g = mvar::engine::Generator::new(seed);
    g.next_u32s(n)
        .into_iter()
        .map(|w| (w as usize % size) as i64)
        .collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn unary_ops(s in shape(3, 4), seed in any::<u64>()) {
        for op in UNARY {
            let positive = matches!(op, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt);
            // Inputs away from 0 keep relu/abs away from their kink.
            let x = away_from_zero(&s, seed, positive);
            check(op.name(), |x| ops::unary(&x[0], op), &[x])?;
        }
    }

    #[test]
    fn binary_ops_with_broadcasting((sa, sb) in broadcast_pair(), seed in any::<u64>()) {
        for op in BINARY {
            // Divisors away from zero; maximum/minimum operands apart so there are no ties.
            let (a, b) = match op {
                BinaryOp::Div => (randn(&sa, seed), away_from_zero(&sb, seed ^ 1, false)),
                BinaryOp::Maximum | BinaryOp::Minimum => {
                    let (na, nb) = (sa.iter().product::<usize>(), sb.iter().product::<usize>());
                    let v = distinct_values(na + nb, seed);
                    (
                        Tensor::from_vec(v[..na].to_vec(), sa.clone(), &Device::Cpu).unwrap(),
                        Tensor::from_vec(v[na..].to_vec(), sb.clone(), &Device::Cpu).unwrap(),
                    )
                }
                _ => (randn(&sa, seed), randn(&sb, seed ^ 1)),
            };
            check(op.name(), |x| ops::binary(&x[0], &x[1], op), &[a, b])?;
        }
    }

    #[test]
    fn scalar_forms(s in shape(3, 4), seed in any::<u64>(), m in -2.0f64..2.0, c in -2.0f64..2.0) {
        check("affine", |x| ops::affine(&x[0], m, c), &[randn(&s, seed)])?;
        check("powf", |x| ops::powf(&x[0], 1.7), &[away_from_zero(&s, seed, true)])?;
        // Inputs kept 1e-3 from the bounds, where clamp has its kinks.
        check("clamp", |x| ops::clamp(&x[0], -0.5, 0.7), &[randn_avoiding(&s, seed, &[-0.5, 0.7], 1e-3)])?;
    }

    #[test]
    fn where_and_masked_fill((sa, sb) in broadcast_pair(), seed in any::<u64>()) {
        let cond = u8_mask(&sb, seed ^ 7);
        let (a, b) = (randn(&sa, seed), randn(&sb, seed ^ 1));
        check("where_cond", |x| ops::where_cond(&cond, &x[0], &x[1]), &[a.clone(), b])?;
        let full = mvar::engine::Shape::broadcast("t", a.shape(), cond.shape()).unwrap();
        let a_full = randn(full.dims(), seed ^ 3);
        check("masked_fill", |x| ops::masked_fill(&x[0], &cond, -3.0), &[a_full])?;
    }

    #[test]
    fn broadcast_to_and_sum_to((sa, sb) in broadcast_pair(), seed in any::<u64>()) {
        let full = mvar::engine::Shape::broadcast("t", &sa.clone().into(), &sb.clone().into()).unwrap();
        check("broadcast_to", |x| ops::broadcast_to(&x[0], full.clone()), &[randn(&sa, seed)])?;
        let target: mvar::engine::Shape = sb.clone().into();
        check("sum_to", |x| ops::sum_to(&x[0], &target), &[randn(full.dims(), seed)])?;
    }

    #[test]
    fn reductions(s in shape(4, 4), seed in any::<u64>(), axis_pick in any::<usize>(), keep in any::<bool>()) {
        let axis = (axis_pick % s.len()) as isize;
        let x = randn(&s, seed);
        check("sum", |x| ops::sum(&x[0], axis, keep), std::slice::from_ref(&x))?;
        check("mean", |x| ops::mean(&x[0], axis, keep), std::slice::from_ref(&x))?;
        // Distinct inputs: no near-ties along the reduced axis.
        let xd = distinct(&s, seed);
        check("max", |x| ops::max(&x[0], axis, keep), std::slice::from_ref(&xd))?;
        check("min", |x| ops::min(&x[0], axis, keep), std::slice::from_ref(&xd))?;
        let axes: Vec<usize> = (0..s.len()).filter(|i| (axis_pick >> i) & 1 == 1).collect();
        check("sum_axes", |x| ops::sum_axes(&x[0], &axes, keep), std::slice::from_ref(&x))?;
        check("mean_all", |x| ops::mean_all(&x[0]), &[x])?;
    }

    #[test]
    fn matmul_batched_and_transposed(
        m in 1usize..5, k in 1usize..5, n in 1usize..5, batch in 1usize..3,
        ta in any::<bool>(), tb in any::<bool>(), b2d in any::<bool>(), seed in any::<u64>()
    ) {
        let a_shape = if ta { vec![batch, k, m] } else { vec![batch, m, k] };
        let b_core = if tb { vec![n, k] } else { vec![k, n] };
        let b_shape = if b2d { b_core } else { [vec![batch], b_core].concat() };
        let (a, b) = (randn(&a_shape, seed), randn(&b_shape, seed ^ 5));
        check("matmul", |x| ops::matmul_t(&x[0], &x[1], ta, tb), &[a, b])?;
    }

    #[test]
    fn linear_layer(rows in 1usize..4, din in 1usize..5, dout in 1usize..5, seed in any::<u64>()) {
        let (x, w, b) = (randn(&[2, rows, din], seed), randn(&[dout, din], seed ^ 1), randn(&[dout], seed ^ 2));
        check("linear", |x| ops::linear(&x[0], &x[1], Some(&x[2])), &[x, w, b])?;
    }

    #[test]
    fn permute_and_transpose(s in shape(4, 3), seed in any::<u64>(), rot in 0usize..4) {
        let r = s.len();
        let perm: Vec<usize> = (0..r).map(|i| (i + rot) % r).collect();
        check("permute", |x| ops::permute(&x[0], &perm), &[randn(&s, seed)])?;
        check("transpose", |x| ops::transpose(&x[0], 0, -1), &[randn(&s, seed)])?;
    }

    #[test]
    fn narrow_concat_split(s in shape(3, 4), seed in any::<u64>(), pick in any::<usize>()) {
        let axis = pick % s.len();
        let n = s[axis];
        let start = pick % n;
        let len = 1 + (pick / 7) % (n - start);
        check("narrow", |x| ops::narrow(&x[0], axis as isize, start, len), &[randn(&s, seed)])?;
        let mut s2 = s.clone();
        s2[axis] = 1 + pick % 3;
        check("concat", |x| ops::concat(&[&x[0], &x[1]], axis as isize), &[randn(&s, seed), randn(&s2, seed ^ 9)])?;
        let sizes = [start, n - start];
        check("split", |x| {
            let parts = ops::split(&x[0], &sizes, axis as isize)?;
            ops::concat(&[&parts[1], &parts[0]], axis as isize)
        }, &[randn(&s, seed)])?;
    }

    #[test]
    fn index_ops(s in shape(3, 4), seed in any::<u64>(), pick in any::<usize>(), count in 1usize..6) {
        let axis = pick % s.len();
        let idx = Tensor::from_vec(i64_indices(count, s[axis], seed), count, &Device::Cpu).unwrap();
        check("index_select", |x| ops::index_select(&x[0], axis as isize, &idx), &[randn(&s, seed)])?;
        let mut gs = s.clone();
        gs[axis] = count;
        let gidx = Tensor::from_vec(i64_indices(gs.iter().product(), s[axis], seed ^ 3), gs, &Device::Cpu).unwrap();
        check("gather", |x| ops::gather(&x[0], axis as isize, &gidx), &[randn(&s, seed)])?;
        let ids = Tensor::from_vec(i64_indices(6, 5, seed ^ 4), [2, 3], &Device::Cpu).unwrap();
        check("embedding", |x| ops::embedding(&ids, &x[0]), &[randn(&[5, 3], seed)])?;
    }
}

#[test]
fn bf16_and_f32_paths_agree_with_f64() {
    let x = randn(&[3, 5], 11);
    let w = randn(&[4, 5], 12);
    let want = ops::linear(&x, &w, None).unwrap().to_vec_f64().unwrap();
    for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
        let got = ops::linear(&x.to_dtype(dt).unwrap(), &w.to_dtype(dt).unwrap(), None).unwrap();
        assert_eq!(got.dtype(), dt);
        for (a, b) in got.to_vec_f64().unwrap().iter().zip(&want) {
            assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{dt}: {a} vs {b}");
        }
    }
}

#[test]
fn argmax_takes_the_first_maximum_and_nan_wins() {
    let x = Tensor::from_vec(
        vec![1.0f32, 3.0, 3.0, 0.0, f32::NAN, 2.0, f32::NAN, 5.0],
        [2, 4],
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        ops::argmax(&x, -1, false).unwrap().to_vec::<i64>().unwrap(),
        vec![1, 0]
    );
    let y = Tensor::from_vec(
        vec![1.0f32, 2.0, f32::NAN, 2.0, 0.5, 7.0],
        [3, 2],
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        ops::argmax(&y, 0, false).unwrap().to_vec::<i64>().unwrap(),
        vec![1, 2]
    );
    let ints = Tensor::from_vec(vec![4i64, 9, 9, 1], [4], &Device::Cpu).unwrap();
    assert_eq!(
        ops::argmax(&ints, 0, true)
            .unwrap()
            .to_vec::<i64>()
            .unwrap(),
        vec![1]
    );
    let big = randn(&[300, 257], 3).to_dtype(DType::F32).unwrap();
    let v = big.to_vec::<f32>().unwrap();
    let want: Vec<i64> = v
        .chunks(257)
        .map(|r| {
            r.iter()
                .enumerate()
                .fold(0, |b, (i, &x)| if x > r[b] { i } else { b }) as i64
        })
        .collect();
    assert_eq!(
        ops::argmax(&big, 1, false)
            .unwrap()
            .to_vec::<i64>()
            .unwrap(),
        want
    );
}
