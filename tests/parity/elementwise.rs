use mvar::engine::{DType, Device, Tensor};
use mvar::ops::{self, BinaryOp, CmpOp, UnaryOp};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use crate::{away_from_zero, config, gpu, parity, randn};

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

fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..6, 1..4)
}

/// Two shapes that broadcast together (the second with some axes set to 1 or dropped).
fn broadcast_pair() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    (
        shape(),
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

proptest! {
    #![proptest_config(config())]

    #[test]
    fn unary(s in shape(), seed in any::<u64>()) {
        for op in UNARY {
            let positive = matches!(op, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt);
            parity(op.name(), |_, x| ops::unary(&x[0], op), &[away_from_zero(&s, seed, positive)])?;
        }
    }

    #[test]
    fn binary((sa, sb) in broadcast_pair(), seed in any::<u64>()) {
        for op in BINARY {
            let b = if op == BinaryOp::Div { away_from_zero(&sb, seed ^ 1, false) } else { randn(&sb, seed ^ 1) };
            parity(op.name(), |_, x| ops::binary(&x[0], &x[1], op), &[randn(&sa, seed), b])?;
        }
    }

    #[test]
    fn scalar_forms(s in shape(), seed in any::<u64>()) {
        parity("affine", |_, x| ops::affine(&x[0], -1.5, 0.25), &[randn(&s, seed)])?;
        parity("powf", |_, x| ops::powf(&x[0], 1.7), &[away_from_zero(&s, seed, true)])?;
        parity("clamp", |_, x| ops::clamp(&x[0], -0.5, 0.7), &[randn(&s, seed)])?;
    }

    #[test]
    fn where_and_broadcast((sa, sb) in broadcast_pair(), seed in any::<u64>()) {
        let mask: Vec<u8> = randn(&sb, seed ^ 5).to_vec::<f32>().unwrap().iter().map(|&v| (v > 0.0) as u8).collect();
        let cond = Tensor::from_vec(mask, sb.clone(), &Device::Cpu).unwrap();
        parity("where_cond", |d, x| ops::where_cond(&cond.to_device(d)?, &x[0], &x[1]), &[randn(&sa, seed), randn(&sb, seed ^ 1)])?;
        let full = mvar::engine::Shape::broadcast("t", &sa.clone().into(), &sb.clone().into()).unwrap();
        parity("broadcast_to", |_, x| ops::broadcast_to(&x[0], full.clone()), &[randn(&sb, seed)])?;
    }
}

/// Activations inside a bf16 autocast scope keep their f32 input as bf16 for the backward (one
/// kernel writes the output and that copy; the backward reads it): on whole vectors of 8 (the
/// vector kernels) and odd lengths (per element), against the CPU, which casts.
#[test]
fn activations_keeping_bf16_inputs_match_the_cpu() {
    if gpu().is_none() {
        return;
    }
    for (i, s) in [vec![2usize, 96], vec![1, 8], vec![3, 5], vec![7]]
        .iter()
        .enumerate()
    {
        for op in [UnaryOp::GeluTanh, UnaryOp::Silu, UnaryOp::Relu] {
            parity(
                op.name(),
                |_, x| {
                    let _bf16 = mvar::engine::autocast(Some(DType::BF16))?;
                    ops::unary(&x[0], op)
                },
                &[randn(s, 90 + i as u64)],
            )
            .unwrap();
        }
    }
}

#[test]
fn compare_and_cast_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let a = randn(&[3, 4], 1);
    let b = randn(&[4], 2);
    for op in [
        CmpOp::Eq,
        CmpOp::Ne,
        CmpOp::Lt,
        CmpOp::Le,
        CmpOp::Gt,
        CmpOp::Ge,
    ] {
        let want = ops::compare(&a, &b, op).unwrap().to_vec::<u8>().unwrap();
        let got =
            ops::compare(&a.to_device(&gpu).unwrap(), &b.to_device(&gpu).unwrap(), op).unwrap();
        assert_eq!(got.to_vec::<u8>().unwrap(), want, "{op:?}");
    }
    let x = randn(&[257], 3);
    for dt in [DType::BF16, DType::I64, DType::U8, DType::F32] {
        let want = x.to_dtype(dt).unwrap().to_vec_f64().unwrap();
        let got = x
            .to_device(&gpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
            .to_vec_f64()
            .unwrap();
        assert_eq!(got, want, "cast f32 -> {dt}");
    }
    let filled = Tensor::full(2.5, [1000], DType::BF16, &gpu)
        .unwrap()
        .to_vec_f64()
        .unwrap();
    assert!(filled.iter().all(|&v| v == 2.5));
}

/// Shapes the 16-byte vector kernels take (whole vectors of f32 and of bf16: 192, 120 and 160
/// elements; 12 elements: f32 only), through the same parity as the random shapes above, which
/// are mostly too small or odd for them: unary, binary (same shapes, an input broadcast along one
/// run of axes, and one constant along the trailing axes) and scalar forms, forward and backward.
#[test]
fn vector_kernels_match_the_cpu_on_whole_vectors() {
    use mvar::cuda::ops::elementwise::{vector_read, vector_width, VectorRead};
    use mvar::cuda::BufferKind;
    if gpu().is_none() {
        return;
    }
    for (i, s) in [vec![2usize, 8, 12], vec![3, 40], vec![4, 3], vec![2, 5, 16]]
        .iter()
        .enumerate()
    {
        let n: usize = s.iter().product();
        assert_eq!(
            vector_width(BufferKind::F32, n, &[0, 256]),
            Some(4),
            "{s:?}"
        );
        assert_eq!(
            vector_width(BufferKind::BF16, n, &[0]).is_some(),
            n.is_multiple_of(8),
            "{s:?}"
        );
        let seed = 70 + i as u64;
        let run = || -> std::result::Result<(), TestCaseError> {
            for op in UNARY {
                let positive = matches!(op, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt);
                parity(
                    op.name(),
                    |_, x| ops::unary(&x[0], op),
                    &[away_from_zero(s, seed, positive)],
                )?;
            }
            // Same shapes, and one input broadcast along one run of axes: a bias over the last
            // axis or the last two (on either side) and, for rank 3, AdaLN's [B, 1, C] over
            // [B, L, C]; read by (inner, span) where inner is whole vectors.
            let mut others = vec![s.clone(), s[1..].to_vec(), s[s.len() - 1..].to_vec()];
            if s.len() >= 3 {
                let mut middle = s.clone();
                middle[1] = 1;
                others.push(middle);
            }
            for (j, other) in others.iter().enumerate() {
                let shapes = if j == 2 { [other, s] } else { [s, other] };
                for op in BINARY {
                    let b = if op == BinaryOp::Div {
                        away_from_zero(shapes[1], seed ^ 1, false)
                    } else {
                        randn(shapes[1], seed ^ 1)
                    };
                    parity(
                        op.name(),
                        |_, x| ops::binary(&x[0], &x[1], op),
                        &[randn(shapes[0], seed), b],
                    )?;
                }
            }
            // An input constant along the trailing axes (a per-head scale [1, H, 1, 1], a value
            // per row [A, 1]): read as one element per vector (`VectorRead::Repeat`) where the
            // constant tail is whole vectors, on either side.
            let mut repeated = vec![vec![s[0]; 1]];
            repeated[0].extend(std::iter::repeat_n(1, s.len() - 1));
            if s.len() >= 3 {
                let mut head = vec![1; s.len()];
                head[1] = s[1];
                repeated.push(head);
            }
            for (j, other) in repeated.iter().enumerate() {
                let f32_repeat = vector_read(other, s, 4);
                if s.last() != Some(&3) {
                    assert!(
                        matches!(f32_repeat, Some(VectorRead::Repeat { .. })),
                        "{other:?} over {s:?}: {f32_repeat:?}"
                    );
                }
                let shapes = if j == 0 { [other, s] } else { [s, other] };
                for op in BINARY {
                    let b = if op == BinaryOp::Div {
                        away_from_zero(shapes[1], seed ^ 2, false)
                    } else {
                        randn(shapes[1], seed ^ 2)
                    };
                    parity(
                        op.name(),
                        |_, x| ops::binary(&x[0], &x[1], op),
                        &[randn(shapes[0], seed ^ 3), b],
                    )?;
                }
            }
            parity(
                "affine",
                |_, x| ops::affine(&x[0], -1.5, 0.25),
                &[randn(s, seed)],
            )?;
            parity(
                "powf",
                |_, x| ops::powf(&x[0], 1.7),
                &[away_from_zero(s, seed, true)],
            )?;
            parity(
                "clamp",
                |_, x| ops::clamp(&x[0], -0.5, 0.7),
                &[randn(s, seed)],
            )?;
            Ok(())
        };
        if let Err(e) = run() {
            panic!("{s:?}: {e}");
        }
    }
}
