//! Layout ops (permute, transpose, narrow, concat) and index ops (index_select, gather,
//! embedding): float parity with gradients, and exact copies for every element kind.

use mvar::engine::{DType, Device, Tensor};
use mvar::ops;
use proptest::prelude::*;

use crate::{config, gpu, parity, randn};

fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..6, 1..5)
}

fn shape_and_perm() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    shape().prop_flat_map(|s| {
        let r = s.len();
        (Just(s), Just((0..r).collect::<Vec<_>>()).prop_shuffle())
    })
}

/// A shape, an axis of it, and a band [start, start + len) of that axis (possibly empty).
fn shape_axis_band() -> impl Strategy<Value = (Vec<usize>, usize, usize, usize)> {
    shape()
        .prop_flat_map(|s| {
            let r = s.len();
            (Just(s), 0..r)
        })
        .prop_flat_map(|(s, ax)| {
            let n = s[ax];
            (Just(s), Just(ax), 0..=n)
        })
        .prop_flat_map(|(s, ax, start)| {
            let n = s[ax];
            (Just(s), Just(ax), Just(start), 0..=n - start)
        })
}

/// A gather input shape, axis, index shape (no larger off the axis) and raw index values.
fn gather_case() -> impl Strategy<Value = (Vec<usize>, usize, Vec<usize>, Vec<u32>)> {
    shape()
        .prop_flat_map(|s| {
            let r = s.len();
            (Just(s), 0..r)
        })
        .prop_flat_map(|(s, ax)| {
            let dims: Vec<BoxedStrategy<usize>> = s
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    if i == ax {
                        (1usize..7).boxed()
                    } else {
                        (1..=d).boxed()
                    }
                })
                .collect();
            (Just(s), Just(ax), dims)
        })
        .prop_flat_map(|(s, ax, idims)| {
            let n: usize = idims.iter().product();
            (
                Just(s),
                Just(ax),
                Just(idims),
                prop::collection::vec(any::<u32>(), n),
            )
        })
}

fn indices(raw: &[u32], n: usize, shape: &[usize]) -> Tensor {
    let v: Vec<i64> = raw.iter().map(|&r| (r as usize % n) as i64).collect();
    Tensor::from_vec(v, shape.to_vec(), &Device::Cpu).expect("indices")
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn permute_and_transpose((s, perm) in shape_and_perm(), seed in any::<u64>()) {
        parity("permute", |_, x| ops::permute(&x[0], &perm), &[randn(&s, seed)])?;
        let r = s.len() as isize;
        parity("transpose", |_, x| ops::transpose(&x[0], 0, r - 1), &[randn(&s, seed ^ 1)])?;
    }

    #[test]
    fn narrow((s, ax, start, len) in shape_axis_band(), seed in any::<u64>()) {
        parity("narrow", |_, x| ops::narrow(&x[0], ax as isize, start, len), &[randn(&s, seed)])?;
    }

    #[test]
    fn concat_and_split(
        (s, ax) in shape().prop_flat_map(|s| { let r = s.len(); (Just(s), 0..r) }),
        extra in prop::collection::vec(0usize..4, 1..3),
        seed in any::<u64>()
    ) {
        let mut inputs = vec![randn(&s, seed)];
        for (i, &n) in extra.iter().enumerate() {
            let mut d = s.clone();
            d[ax] = n;
            inputs.push(randn(&d, seed ^ (i as u64 + 1)));
        }
        parity("concat", |_, x| ops::concat(&x.iter().collect::<Vec<_>>(), ax as isize), &inputs)?;
        let n = s[ax];
        let sizes = [n / 2, n - n / 2];
        parity(
            "split",
            |_, x| {
                let parts = ops::split(&x[0], &sizes, ax as isize)?;
                ops::concat(&[&parts[1], &parts[0]], ax as isize)
            },
            &[randn(&s, seed ^ 7)],
        )?;
        // Split from a computed tensor: the tape joins the parts' gradients (bands that tile
        // it) by a concatenation on the device; and overlapping narrows of one, whose padded
        // gradients it adds.
        parity(
            "split of a computed tensor",
            |_, x| {
                let y = ops::mul_scalar(&x[0], 2.0)?;
                let parts = ops::split(&y, &sizes, ax as isize)?;
                ops::concat(&[&parts[1], &y, &parts[0]], ax as isize)
            },
            &[randn(&s, seed ^ 8)],
        )?;
        parity(
            "overlapping narrows of a computed tensor",
            |_, x| {
                let y = ops::mul_scalar(&x[0], 2.0)?;
                let a = ops::narrow(&y, ax as isize, 0, n - n / 3)?;
                let b = ops::narrow(&y, ax as isize, n / 3, n - n / 3)?;
                ops::concat(&[&a, &b], ax as isize)
            },
            &[randn(&s, seed ^ 9)],
        )?;
    }

    #[test]
    fn index_select(
        (s, ax) in shape().prop_flat_map(|s| { let r = s.len(); (Just(s), 0..r) }),
        raw in prop::collection::vec(any::<u32>(), 0..9),
        seed in any::<u64>()
    ) {
        let idx = indices(&raw, s[ax], &[raw.len()]);
        parity("index_select", |d, x| ops::index_select(&x[0], ax as isize, &idx.to_device(d)?), &[randn(&s, seed)])?;
    }

    #[test]
    fn gather((s, ax, idims, raw) in gather_case(), seed in any::<u64>()) {
        let idx = indices(&raw, s[ax], &idims);
        parity("gather", |d, x| ops::gather(&x[0], ax as isize, &idx.to_device(d)?), &[randn(&s, seed)])?;
    }

    #[test]
    fn embedding(
        v in 1usize..12, c in 1usize..9,
        ids_shape in prop::collection::vec(1usize..5, 1..3),
        raw in prop::collection::vec(any::<u32>(), 16),
        seed in any::<u64>()
    ) {
        let n: usize = ids_shape.iter().product();
        let ids = indices(&raw[..n], v, &ids_shape);
        parity("embedding", |d, x| ops::embedding(&ids.to_device(d)?, &x[0]), &[randn(&[v, c], seed)])?;
    }
}

/// Sizes past one block of 256 threads and not a multiple of it, with heavily repeated indices.
#[test]
fn larger_index_and_layout_cases() {
    let x = randn(&[3, 301, 7], 11);
    let idx = indices(
        &(0..517u32)
            .map(|i| i.wrapping_mul(2654435761))
            .collect::<Vec<_>>(),
        301,
        &[517],
    );
    let run = |r: std::result::Result<(), proptest::test_runner::TestCaseError>| {
        if let Err(e) = r {
            panic!("{e}");
        }
    };
    run(parity(
        "index_select",
        |d, x| ops::index_select(&x[0], 1, &idx.to_device(d)?),
        std::slice::from_ref(&x),
    ));
    let ids = indices(&[5, 5, 5, 0, 300, 5, 17], 301, &[7]);
    run(parity(
        "embedding",
        |d, t| ops::embedding(&ids.to_device(d)?, &t[0]),
        &[randn(&[301, 33], 12)],
    ));
    run(parity(
        "permute",
        |_, x| ops::permute(&x[0], &[2, 0, 1]),
        std::slice::from_ref(&x),
    ));
    run(parity(
        "narrow",
        |_, x| ops::narrow(&x[0], 1, 100, 150),
        std::slice::from_ref(&x),
    ));
    let gidx = indices(
        &(0..3 * 400 * 7u32)
            .map(|i| i.wrapping_mul(40503))
            .collect::<Vec<_>>(),
        301,
        &[3, 400, 7],
    );
    run(parity(
        "gather",
        |d, x| ops::gather(&x[0], 1, &gidx.to_device(d)?),
        std::slice::from_ref(&x),
    ));
}

/// The copies move raw elements of every kind: integer and bf16 tensors come back bit for bit.
#[test]
fn copies_are_exact_for_every_kind() {
    let Some(gpu) = gpu() else { return };
    let base: Vec<i64> = (0..2 * 5 * 3).map(|i| i * 37 % 251 - 100).collect();
    let idx = Tensor::from_vec(vec![4i64, 0, 4, 2], [4], &Device::Cpu).unwrap();
    let gidx = Tensor::from_vec(vec![1i64, 0, 4, 4, 3, 2], [2, 1, 3], &Device::Cpu).unwrap();
    for dt in [DType::F32, DType::BF16, DType::I64, DType::U8] {
        let x = Tensor::from_vec(base.clone(), [2, 5, 3], &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let y = Tensor::from_vec(base[..12].to_vec(), [2, 2, 3], &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        type Case<'a> = (
            &'static str,
            Box<dyn Fn(&Device) -> mvar::engine::Result<Tensor> + 'a>,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "permute",
                Box::new(|d| ops::permute(&x.to_device(d)?, &[2, 0, 1])),
            ),
            (
                "narrow",
                Box::new(|d| ops::narrow(&x.to_device(d)?, 1, 1, 3)),
            ),
            (
                "concat",
                Box::new(|d| ops::concat(&[&x.to_device(d)?, &y.to_device(d)?], 1)),
            ),
            (
                "index_select",
                Box::new(|d| ops::index_select(&x.to_device(d)?, 1, &idx.to_device(d)?)),
            ),
            (
                "gather",
                Box::new(|d| ops::gather(&x.to_device(d)?, 1, &gidx.to_device(d)?)),
            ),
        ];
        for (name, f) in cases {
            let want = f(&Device::Cpu).unwrap();
            let got = f(&gpu).unwrap();
            assert_eq!(got.dtype(), dt, "{name} {dt}");
            assert_eq!(got.dims(), want.dims(), "{name} {dt}");
            assert_eq!(
                got.to_vec_f64().unwrap(),
                want.to_vec_f64().unwrap(),
                "{name} {dt}"
            );
        }
    }
}

/// The band and strided copies move whole 16-, 8- or 4-byte words when a row of the innermost
/// elements divides into them (see `copy_word` in cuda/src/ops/mod.rs): rows of 1 to 24
/// elements of every kind take each word size and the per-element kernels, and come back bit for
/// bit; narrow's backward (zeros around the band) and concat through the same kernels.
#[test]
fn copies_on_words_are_exact() {
    let Some(gpu) = gpu() else { return };
    for dt in [DType::F32, DType::BF16, DType::I64, DType::U8] {
        for inner in [1usize, 2, 3, 4, 6, 8, 12, 16, 24] {
            let x = Tensor::from_vec(
                (0..3 * 5 * inner)
                    .map(|i| (i * 37 % 251) as i64 - 100)
                    .collect(),
                [3, 5, inner],
                &Device::Cpu,
            )
            .unwrap()
            .to_dtype(dt)
            .unwrap();
            let y = ops::narrow(&x, 1, 0, 2).unwrap();
            let run = |name: &str, f: &dyn Fn(&Device) -> mvar::engine::Result<Tensor>| {
                let (want, got) = (f(&Device::Cpu).unwrap(), f(&gpu).unwrap());
                assert_eq!(got.dims(), want.dims(), "{name} {dt} inner {inner}");
                assert_eq!(
                    got.to_vec_f64().unwrap(),
                    want.to_vec_f64().unwrap(),
                    "{name} {dt} inner {inner}"
                );
            };
            run("narrow", &|d| ops::narrow(&x.to_device(d)?, 1, 1, 3));
            run("narrow of the outer axis", &|d| {
                ops::narrow(&x.to_device(d)?, 0, 1, 2)
            });
            run("concat", &|d| {
                ops::concat(&[&x.to_device(d)?, &y.to_device(d)?], 1)
            });
            run("permute keeping the innermost axis", &|d| {
                ops::permute(&x.to_device(d)?, &[1, 0, 2])
            });
            run("permute moving the innermost axis", &|d| {
                ops::permute(&x.to_device(d)?, &[2, 0, 1])
            });
        }
    }
    // narrow's backward writes the full axis: the band from the gradient, zeros around it.
    for dt in [DType::F32, DType::BF16] {
        for inner in [1usize, 2, 4, 8, 12] {
            let x = randn(&[3, 5, inner], inner as u64).to_dtype(dt).unwrap();
            parity(
                &format!("narrow {dt} inner {inner}"),
                |_, x| ops::narrow(&x[0], 1, 1, 3),
                std::slice::from_ref(&x),
            )
            .unwrap();
        }
    }
}
