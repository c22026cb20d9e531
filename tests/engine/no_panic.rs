//! No panic is reachable from the public API: random (mostly mismatched) shapes, dtypes, axes and
//! sizes go into every op, which must answer `Ok` or `Err`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use mvar::engine::{DType, Device, Generator, Result, Tensor};
use mvar::ops;
use proptest::prelude::*;

/// A tensor of the given shape and dtype with small values (integers in 0..4 for index dtypes,
/// so that some calls are valid and some are out of range).
pub fn any_tensor(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    let mut g = Generator::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = g.normal(n, 0.0, 2.0);
    let t = Tensor::from_vec(v, shape.to_vec(), &Device::Cpu).unwrap();
    match dtype {
        DType::I64 | DType::U8 => {
            let ints: Vec<f64> = t
                .to_vec_f64()
                .unwrap()
                .iter()
                .map(|x| (x.abs() as i64 % 5) as f64 - 0.0)
                .collect();
            Tensor::from_vec(ints, shape.to_vec(), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        }
        _ => t.to_dtype(dtype).unwrap(),
    }
}

pub fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::F32),
        Just(DType::F64),
        Just(DType::BF16),
        Just(DType::I64),
        Just(DType::U8)
    ]
}

pub fn small_shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0usize..4, 0..5)
}

/// Inputs handed to every op under test.
#[derive(Debug)]
pub struct Args {
    pub a: Tensor,
    pub b: Tensor,
    pub c: Tensor,
    pub axis: isize,
    pub n: usize,
    pub m: usize,
}

pub fn args() -> impl Strategy<Value = Args> {
    (
        (small_shape(), small_shape(), small_shape()),
        (dtype_strategy(), dtype_strategy(), dtype_strategy()),
        any::<u64>(),
        -5isize..5,
        0usize..5,
        0usize..5,
    )
        .prop_map(|((sa, sb, sc), (da, db, dc), seed, axis, n, m)| Args {
            a: any_tensor(&sa, da, seed),
            b: any_tensor(&sb, db, seed ^ 1),
            c: any_tensor(&sc, dc, seed ^ 2),
            axis,
            n,
            m,
        })
}

type OpFn = fn(&Args) -> Result<Tensor>;

pub fn core_ops() -> Vec<(&'static str, OpFn)> {
    vec![
        ("exp", |x| ops::exp(&x.a)),
        ("gelu_tanh", |x| ops::gelu_tanh(&x.a)),
        ("add", |x| ops::add(&x.a, &x.b)),
        ("div", |x| ops::div(&x.a, &x.b)),
        ("maximum", |x| ops::maximum(&x.a, &x.b)),
        ("affine", |x| ops::affine(&x.a, 2.0, 1.0)),
        ("powf", |x| ops::powf(&x.a, 0.5)),
        ("clamp", |x| ops::clamp(&x.a, x.n as f64, x.m as f64)),
        ("compare", |x| ops::compare(&x.a, &x.b, ops::CmpOp::Lt)),
        ("where_cond", |x| ops::where_cond(&x.c, &x.a, &x.b)),
        ("masked_fill", |x| ops::masked_fill(&x.a, &x.c, 1.0)),
        ("broadcast_to", |x| {
            ops::broadcast_to(&x.a, x.b.shape().clone())
        }),
        ("sum_to", |x| ops::sum_to(&x.a, x.b.shape())),
        ("sum", |x| ops::sum(&x.a, x.axis, x.n % 2 == 0)),
        ("sum_axes", |x| ops::sum_axes(&x.a, &[x.n, x.m], true)),
        ("mean", |x| ops::mean(&x.a, x.axis, false)),
        ("max", |x| ops::max(&x.a, x.axis, true)),
        ("argmax", |x| ops::argmax(&x.a, x.axis, false)),
        ("matmul", |x| ops::matmul(&x.a, &x.b)),
        ("matmul_t", |x| {
            ops::matmul_t(&x.a, &x.b, x.n % 2 == 0, x.m % 2 == 0)
        }),
        ("linear", |x| ops::linear(&x.a, &x.b, Some(&x.c))),
        ("permute", |x| ops::permute(&x.a, &[x.n, x.m, 0])),
        ("transpose", |x| ops::transpose(&x.a, x.axis, 0)),
        ("narrow", |x| ops::narrow(&x.a, x.axis, x.n, x.m)),
        ("concat", |x| ops::concat(&[&x.a, &x.b], x.axis)),
        ("split", |x| {
            ops::split(&x.a, &[x.n, x.m], x.axis)
                .map(|v| v.into_iter().next().unwrap_or(x.a.clone()))
        }),
        ("unsqueeze", |x| ops::unsqueeze(&x.a, x.n)),
        ("index_select", |x| ops::index_select(&x.a, x.axis, &x.b)),
        ("gather", |x| ops::gather(&x.a, x.axis, &x.b)),
        ("embedding", |x| ops::embedding(&x.b, &x.a)),
        ("reshape", |x| x.a.reshape(x.b.shape().clone())),
        ("to_dtype", |x| x.a.to_dtype(x.b.dtype())),
        ("attention", |x| {
            ops::attention(&x.a, &x.b, &x.c, 0.5, &ops::AttnMask::None)
        }),
        ("attention block-causal", |x| {
            ops::attention(
                &x.a,
                &x.b,
                &x.b,
                1.0,
                &ops::AttnMask::BlockCausal(vec![x.n, x.m]),
            )
        }),
        ("attention block-diagonal", |x| {
            ops::attention(
                &x.a,
                &x.a,
                &x.b,
                1.0,
                &ops::AttnMask::BlockDiagonal(vec![x.n, 1, x.m]),
            )
        }),
        ("attention additive", |x| {
            ops::attention(&x.a, &x.a, &x.a, 1.0, &ops::AttnMask::Additive(x.c.clone()))
        }),
        ("na2d", |x| ops::na2d(&x.a, &x.b, &x.c, x.n, 1.0)),
        ("conv2d", |x| {
            ops::conv2d(&x.a, &x.b, Some(&x.c), (x.n, x.m), ops::Padding::same(x.n))
        }),
        ("conv2d asymmetric", |x| {
            let pad = ops::Padding {
                top: 0,
                bottom: x.m,
                left: 0,
                right: x.n,
            };
            ops::conv2d(&x.a, &x.b, None, (2, 2), pad)
        }),
        ("upsample_nearest", |x| ops::upsample_nearest(&x.a, x.n)),
        ("area_downsample", |x| ops::area_downsample(&x.a, x.n, x.m)),
        ("bicubic_upsample", |x| {
            ops::bicubic_upsample(&x.a, x.n, x.m)
        }),
        ("softmax", |x| ops::softmax(&x.a, x.axis)),
        // top_p m / 5: up to 1.0 valid, 1.2 not.
        ("sample_top_k_top_p", |x| {
            let u = vec![0.5; x.a.dims().first().copied().unwrap_or(0)];
            ops::sample_top_k_top_p(&x.a, &u, x.n, x.m as f64 / 5.0)
        }),
        ("filter_top_k_top_p", |x| {
            ops::filter_top_k_top_p(&x.a, x.n, x.m as f64 / 5.0)
        }),
        ("log_softmax", |x| ops::log_softmax(&x.a, x.axis)),
        ("cross_entropy", |x| {
            ops::cross_entropy(&x.a, &x.b, None, 0.1)
        }),
        ("cross_entropy weighted", |x| {
            ops::cross_entropy(&x.a, &x.b, Some(&x.c), x.n as f64 / 4.0)
        }),
        ("layer_norm", |x| ops::layer_norm(&x.a, 1e-6)),
        ("group_norm", |x| {
            ops::group_norm(&x.a, x.n, &x.b, &x.c, 1e-6)
        }),
        ("l2_normalize", |x| ops::l2_normalize(&x.a, 1e-12)),
        ("dropout", |x| {
            ops::dropout(&x.a, x.n as f64 / 4.0, &mut Generator::new(1))
        }),
        ("drop_path", |x| {
            ops::drop_path(&x.a, x.m as f64 / 4.0, &mut Generator::new(2))
        }),
        ("na2d self", |x| ops::na2d(&x.a, &x.a, &x.a, x.n, 1.0)),
    ]
}

/// Runs every op on `args`, forward and (when it succeeds on floats) backward, and reports the
/// first op that panicked.
pub fn run_all(ops: &[(&'static str, OpFn)], args: &Args) -> std::result::Result<(), String> {
    for (name, f) in ops {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            // The same call again with grad-requiring float inputs, then a backward.
            let _ = f(args);
            let grad_args = Args {
                a: args.a.with_grad().unwrap_or(args.a.clone()),
                b: args.b.with_grad().unwrap_or(args.b.clone()),
                c: args.c.with_grad().unwrap_or(args.c.clone()),
                axis: args.axis,
                n: args.n,
                m: args.m,
            };
            if let Ok(y) = f(&grad_args) {
                if y.dtype().is_float() && y.requires_grad() {
                    if let Ok(s) = ops::sum_all(&y) {
                        let _ = s.backward();
                    }
                }
            }
        }));
        if outcome.is_err() {
            return Err(format!(
                "{name} panicked on a {:?}, b {:?}, c {:?}, axis {}, n {}, m {}",
                args.a, args.b, args.c, args.axis, args.n, args.m
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: mvar::ops::testing::proptest_cases(200), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn core_ops_never_panic(a in args()) {
        let r = run_all(&core_ops(), &a);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

/// Attention-shaped inputs: q, k, v of a common [B, H, X, Y, D] (or [B, H, L, D]) shape, each
/// with maybe one axis changed, so that the ops get past their first checks.
pub fn attention_args() -> impl Strategy<Value = Args> {
    (
        prop::collection::vec(0usize..4, 5),
        any::<bool>(),
        prop::collection::vec((0usize..5, 0usize..4), 3),
        dtype_strategy(),
        any::<u64>(),
        (-5isize..5, 0usize..6, 0usize..6),
    )
        .prop_map(|(base, rank4, tweaks, dt, seed, (axis, n, m))| {
            let base = if rank4 { base[..4].to_vec() } else { base };
            let make = |(ax, v): (usize, usize), s: u64| {
                let mut sh = base.clone();
                if ax < sh.len() {
                    sh[ax] = v;
                }
                any_tensor(&sh, dt, s)
            };
            Args {
                a: make(tweaks[0], seed),
                b: make(tweaks[1], seed ^ 1),
                c: make(tweaks[2], seed ^ 2),
                axis,
                n,
                m,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: mvar::ops::testing::proptest_cases(300), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn attention_like_ops_never_panic(a in attention_args()) {
        let r = run_all(&core_ops(), &a);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}
