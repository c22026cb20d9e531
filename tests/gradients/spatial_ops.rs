//! conv2d and the resampling ops (nearest, area, bicubic): gradients against finite differences,
//! forwards and backwards against direct loops (including the tiled and threaded conv paths),
//! dtypes, and the errors every bad input gives.

use mvar::engine::{DType, Device, Tensor};
use mvar::ops::{self, Padding};
use proptest::prelude::*;

use crate::{check, config, randn};

// ----------------------------------------------------------------------------------------------
// direct-loop references (f64)

/// A conv problem: x [n, cin, h, w], w [cout, cin, kh, kw], stride, padding.
#[derive(Debug, Clone, Copy)]
struct Conv {
    x: [usize; 4],
    w: [usize; 4],
    stride: (usize, usize),
    pad: Padding,
}

impl Conv {
    fn out(&self) -> [usize; 4] {
        let [n, _, h, w] = self.x;
        let [co, _, kh, kw] = self.w;
        let ho = (h + self.pad.top + self.pad.bottom - kh) / self.stride.0 + 1;
        let wo = (w + self.pad.left + self.pad.right - kw) / self.stride.1 + 1;
        [n, co, ho, wo]
    }

    /// Calls f(x index, w index, y index) for every multiply-add of the convolution.
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize)) {
        let [n, cin, h, w] = self.x;
        let [co, _, kh, kw] = self.w;
        let [_, _, ho, wo] = self.out();
        for b in 0..n {
            for o in 0..co {
                for oy in 0..ho {
                    for ox in 0..wo {
                        for c in 0..cin {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy =
                                        (oy * self.stride.0 + ky) as isize - self.pad.top as isize;
                                    let ix =
                                        (ox * self.stride.1 + kx) as isize - self.pad.left as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xi = ((b * cin + c) * h + iy as usize) * w + ix as usize;
                                    let wi = ((o * cin + c) * kh + ky) * kw + kx;
                                    let yi = ((b * co + o) * ho + oy) * wo + ox;
                                    f(xi, wi, yi);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn forward(&self, x: &[f64], w: &[f64], b: Option<&[f64]>) -> Vec<f64> {
        let o = self.out();
        let plane = o[2] * o[3];
        let mut y: Vec<f64> = (0..o.iter().product())
            .map(|i| b.map_or(0.0, |b| b[(i / plane) % o[1]]))
            .collect();
        self.for_each_tap(|xi, wi, yi| y[yi] += x[xi] * w[wi]);
        y
    }

    /// (dx, dw, db) for upstream gradient g.
    fn backward(&self, x: &[f64], w: &[f64], g: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
        self.for_each_tap(|xi, wi, yi| {
            dx[xi] += w[wi] * g[yi];
            dw[wi] += x[xi] * g[yi];
        });
        let o = self.out();
        let plane = o[2] * o[3];
        let mut db = vec![0.0; o[1]];
        for (i, v) in g.iter().enumerate() {
            db[(i / plane) % o[1]] += v;
        }
        (dx, dw, db)
    }
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}[{i}]: {a} vs {b}"
        );
    }
}

fn pad_strategy() -> impl Strategy<Value = Padding> {
    // Pads up to 2 reach windows that lie wholly inside the padding of one side.
    (0usize..3, 0usize..3, 0usize..3, 0usize..3).prop_map(|(top, bottom, left, right)| Padding {
        top,
        bottom,
        left,
        right,
    })
}

/// Adaptive-average-pooling windows computed in floating point (independent of the op's integer
/// formula).
fn area_windows(n: usize, m: usize) -> Vec<(usize, usize)> {
    (0..m)
        .map(|i| {
            (
                (i as f64 * n as f64 / m as f64).floor() as usize,
                ((i + 1) as f64 * n as f64 / m as f64).ceil() as usize,
            )
        })
        .collect()
}

fn naive_area(x: &[f64], [n, c, h, w]: [usize; 4], oh: usize, ow: usize) -> Vec<f64> {
    let (rows, cols) = (area_windows(h, oh), area_windows(w, ow));
    let mut y = Vec::new();
    for p in 0..n * c {
        for &(r0, r1) in &rows {
            for &(c0, c1) in &cols {
                let mut s = 0.0;
                for r in r0..r1 {
                    for q in c0..c1 {
                        s += x[(p * h + r) * w + q];
                    }
                }
                y.push(s / ((r1 - r0) * (c1 - c0)) as f64);
            }
        }
    }
    y
}

// ----------------------------------------------------------------------------------------------
// gradient properties

proptest! {
    #![proptest_config(config())]

    #[test]
    fn conv2d_gradients(
        n in 1usize..3, cin in 1usize..4, cout in 1usize..4, h in 1usize..6, w in 1usize..6,
        kh in 1usize..4, kw in 1usize..4, sh in 1usize..3, sw in 1usize..3, pad in pad_strategy(),
        with_bias in any::<bool>(), seed in any::<u64>()
    ) {
        // Shrink the kernel to fit the padded input.
        let kh = kh.min(h + pad.top + pad.bottom);
        let kw = kw.min(w + pad.left + pad.right);
        let c = Conv { x: [n, cin, h, w], w: [cout, cin, kh, kw], stride: (sh, sw), pad };
        let (x, wt, b) = (randn(&c.x, seed), randn(&c.w, seed ^ 1), randn(&[cout], seed ^ 2));
        let want = c.forward(&vals(&x), &vals(&wt), with_bias.then(|| vals(&b)).as_deref());
        let y = ops::conv2d(&x, &wt, with_bias.then_some(&b), (sh, sw), pad).unwrap();
        prop_assert_eq!(y.dims(), &c.out()[..]);
        assert_close("conv2d forward", &vals(&y), &want, 1e-12);
        let mut inputs = vec![x, wt];
        if with_bias {
            inputs.push(b);
        }
        check("conv2d", |t| ops::conv2d(&t[0], &t[1], t.get(2), (sh, sw), pad), &inputs)?;
    }

    #[test]
    fn conv2d_pointwise_gradients(n in 1usize..3, cin in 1usize..5, cout in 1usize..5, h in 1usize..5, w in 1usize..5, seed in any::<u64>()) {
        // Kernel 1, stride 1, no padding: the path that uses x itself as the column matrix.
        let (x, wt, b) = (randn(&[n, cin, h, w], seed), randn(&[cout, cin, 1, 1], seed ^ 1), randn(&[cout], seed ^ 2));
        check("conv2d", |t| ops::conv2d(&t[0], &t[1], Some(&t[2]), (1, 1), Padding::none()), &[x, wt, b])?;
    }

    #[test]
    fn upsample_nearest_gradients(n in 1usize..3, c in 1usize..3, h in 1usize..4, w in 1usize..4, f in 1usize..4, seed in any::<u64>()) {
        let x = randn(&[n, c, h, w], seed);
        let y = ops::upsample_nearest(&x, f).unwrap();
        prop_assert_eq!(y.dims(), &[n, c, h * f, w * f][..]);
        let (xv, yv) = (vals(&x), vals(&y));
        for (i, v) in yv.iter().enumerate() {
            let (ox, oy, p) = (i % (w * f), (i / (w * f)) % (h * f), i / (w * f * h * f));
            prop_assert_eq!(*v, xv[(p * h + oy / f) * w + ox / f]);
        }
        check("upsample_nearest", |t| ops::upsample_nearest(&t[0], f), &[x])?;
    }

    #[test]
    fn area_downsample_gradients(n in 1usize..3, c in 1usize..3, h in 1usize..8, w in 1usize..8, oh in 1usize..8, ow in 1usize..8, seed in any::<u64>()) {
        let x = randn(&[n, c, h, w], seed);
        let y = ops::area_downsample(&x, oh, ow).unwrap();
        prop_assert_eq!(y.dims(), &[n, c, oh, ow][..]);
        assert_close("area_downsample forward", &vals(&y), &naive_area(&vals(&x), [n, c, h, w], oh, ow), 1e-12);
        check("area_downsample", |t| ops::area_downsample(&t[0], oh, ow), &[x])?;
    }

    #[test]
    fn bicubic_upsample_gradients(n in 1usize..3, c in 1usize..3, h in 1usize..7, w in 1usize..7, oh in 1usize..9, ow in 1usize..9, seed in any::<u64>()) {
        let x = randn(&[n, c, h, w], seed);
        let y = ops::bicubic_upsample(&x, oh, ow).unwrap();
        prop_assert_eq!(y.dims(), &[n, c, oh, ow][..]);
        // The weights of every output sum to one: a constant map stays constant.
        let k = ops::bicubic_upsample(&Tensor::full(2.5, [n, c, h, w], DType::F64, &Device::Cpu).unwrap(), oh, ow).unwrap();
        assert_close("bicubic_upsample of a constant", &vals(&k), &vec![2.5; n * c * oh * ow], 1e-14);
        check("bicubic_upsample", |t| ops::bicubic_upsample(&t[0], oh, ow), &[x])?;
    }
}

// ----------------------------------------------------------------------------------------------
// conv paths that the small property cases do not reach

/// Forward and every gradient against the direct loops, for shapes that take the multi-tile,
/// batch-parallel and single-sample threaded-GEMM paths.
fn conv_against_loops(c: Conv, with_bias: bool, seed: u64) {
    let (x, w, b) = (
        randn(&c.x, seed),
        randn(&c.w, seed ^ 1),
        randn(&[c.w[0]], seed ^ 2),
    );
    let g = randn(&c.out(), seed ^ 3);
    let (xl, wl, bl) = (
        x.with_grad().unwrap(),
        w.with_grad().unwrap(),
        b.with_grad().unwrap(),
    );
    let y = ops::conv2d(&xl, &wl, with_bias.then_some(&bl), c.stride, c.pad).unwrap();
    let bias_vals = with_bias.then(|| vals(&b));
    assert_close(
        "conv2d forward",
        &vals(&y),
        &c.forward(&vals(&x), &vals(&w), bias_vals.as_deref()),
        1e-12,
    );
    ops::sum_all(&ops::mul(&y, &g).unwrap())
        .unwrap()
        .backward()
        .unwrap();
    let (dx, dw, db) = c.backward(&vals(&x), &vals(&w), &vals(&g));
    assert_close("conv2d dx", &vals(&xl.grad().unwrap()), &dx, 1e-12);
    assert_close("conv2d dw", &vals(&wl.grad().unwrap()), &dw, 1e-12);
    if with_bias {
        assert_close("conv2d dbias", &vals(&bl.grad().unwrap()), &db, 1e-12);
    }
}

proptest! {
    #![proptest_config(config())]

    /// Stride-1 3x3 convs with >= 8 channels each side take the CPU's Winograd path (forward,
    /// dx and dW): every border case of the 2x2 output tiles (odd sizes, one-pixel images, each
    /// side's padding 0..2) against the direct loops.
    #[test]
    fn conv2d_winograd_matches_direct_loops(
        n in 1usize..3, cin in 8usize..11, cout in 8usize..11, h in 1usize..8, w in 1usize..8,
        pad in pad_strategy(), with_bias in any::<bool>(), seed in any::<u64>()
    ) {
        // The padded input must hold the kernel.
        let h = h.max(3usize.saturating_sub(pad.top + pad.bottom));
        let w = w.max(3usize.saturating_sub(pad.left + pad.right));
        let c = Conv { x: [n, cin, h, w], w: [cout, cin, 3, 3], stride: (1, 1), pad };
        conv_against_loops(c, with_bias, seed);
    }
}

#[test]
fn conv2d_large_paths_match_direct_loops() {
    // 48x48 outputs with K = 144 need two im2col tiles; three samples split over the threads.
    let tiled = Conv {
        x: [3, 16, 48, 48],
        w: [8, 16, 3, 3],
        stride: (1, 1),
        pad: Padding::same(1),
    };
    conv_against_loops(tiled, true, 1);
    // One sample: threaded GEMMs per tile.
    conv_against_loops(
        Conv {
            x: [1, 16, 48, 48],
            ..tiled
        },
        false,
        2,
    );
    // The VQVAE downsampler (pad right/bottom by one, stride 2) over two tiles that split a row.
    let down = Conv {
        x: [2, 24, 95, 93],
        w: [12, 24, 3, 3],
        stride: (2, 2),
        pad: Padding {
            top: 0,
            bottom: 1,
            left: 0,
            right: 1,
        },
    };
    conv_against_loops(down, true, 3);
    // Pointwise over several tiles (direct path with strided column blocks).
    conv_against_loops(
        Conv {
            x: [2, 300, 40, 40],
            w: [5, 300, 1, 1],
            stride: (1, 1),
            pad: Padding::none(),
        },
        true,
        4,
    );
}

/// Windows that see only padding: with pad 2 on one side and a kernel wider than the input, the
/// first kernel taps of every output fall left of (or above) the image. CI's parity proptest found
/// an underflow here on 2026-11-24 (w = 1, kw = 3, left = 2).
#[test]
fn conv2d_windows_wholly_in_one_sided_padding() {
    let pad = |top, bottom, left, right| Padding {
        top,
        bottom,
        left,
        right,
    };
    for (x, w, pad) in [
        ([1, 1, 1, 1], [1, 1, 1, 3], pad(0, 0, 2, 0)),
        ([1, 1, 1, 1], [1, 1, 3, 1], pad(2, 0, 0, 0)),
        ([2, 2, 2, 3], [3, 2, 3, 4], pad(2, 0, 2, 1)),
        ([1, 2, 3, 2], [2, 2, 2, 4], pad(0, 2, 0, 2)),
    ] {
        for stride in [(1, 1), (2, 1), (1, 2)] {
            let c = Conv { x, w, stride, pad };
            conv_against_loops(c, true, 5);
            let inputs = vec![randn(&c.x, 6), randn(&c.w, 7)];
            let op = |t: &[Tensor]| ops::conv2d(&t[0], &t[1], None, stride, pad);
            if let Err(e) = check("conv2d one-sided padding", op, &inputs) {
                panic!("{e}");
            }
        }
    }
}

#[test]
fn conv2d_gradients_for_a_subset_of_inputs() {
    let c = Conv {
        x: [2, 3, 6, 5],
        w: [4, 3, 3, 3],
        stride: (1, 2),
        pad: Padding::same(1),
    };
    let (x, w, b) = (randn(&c.x, 5), randn(&c.w, 6), randn(&[4], 7));
    let g = randn(&c.out(), 8);
    let (dx, dw, db) = c.backward(&vals(&x), &vals(&w), &vals(&g));
    let run = |x: &Tensor, w: &Tensor, b: &Tensor| {
        let y = ops::conv2d(x, w, Some(b), c.stride, c.pad).unwrap();
        ops::sum_all(&ops::mul(&y, &g).unwrap())
            .unwrap()
            .backward()
            .unwrap();
    };
    let wl = w.with_grad().unwrap();
    run(&x, &wl, &b);
    assert_close("dw alone", &vals(&wl.grad().unwrap()), &dw, 1e-12);
    let xl = x.with_grad().unwrap();
    run(&xl, &w, &b);
    assert_close("dx alone", &vals(&xl.grad().unwrap()), &dx, 1e-12);
    let bl = b.with_grad().unwrap();
    run(&x, &w, &bl);
    assert_close("dbias alone", &vals(&bl.grad().unwrap()), &db, 1e-12);
}

#[test]
fn conv2d_empty_batch() {
    let y = ops::conv2d(
        &randn(&[0, 2, 4, 4], 1),
        &randn(&[3, 2, 3, 3], 2),
        None,
        (1, 1),
        Padding::same(1),
    )
    .unwrap();
    assert_eq!(y.dims(), &[0, 3, 4, 4]);
}

// ----------------------------------------------------------------------------------------------
// resampling details

#[test]
fn bicubic_same_size_is_the_identity() {
    let x = randn(&[2, 3, 5, 7], 9);
    for dt in [DType::F64, DType::F32] {
        let xd = x.to_dtype(dt).unwrap();
        let y = ops::bicubic_upsample(&xd, 5, 7).unwrap();
        assert_eq!(vals(&y), vals(&xd), "{dt}");
    }
}

#[test]
fn area_with_divisible_sizes_is_block_mean() {
    let x = Tensor::from_vec(
        (0..16).map(|v| v as f64).collect::<Vec<_>>(),
        [1, 1, 4, 4],
        &Device::Cpu,
    )
    .unwrap();
    let y = ops::area_downsample(&x, 2, 2).unwrap();
    assert_eq!(vals(&y), vec![2.5, 4.5, 10.5, 12.5]);
}

#[test]
fn f32_and_bf16_paths_agree_with_f64() {
    let x = randn(&[2, 4, 9, 9], 21);
    let w = randn(&[5, 4, 3, 3], 22);
    let b = randn(&[5], 23);
    type Op = Box<dyn Fn(&[Tensor]) -> Tensor>;
    let cases: Vec<(&str, Vec<Tensor>, Op)> = vec![
        (
            "conv2d",
            vec![x.clone(), w, b],
            Box::new(|t| {
                ops::conv2d(
                    &t[0],
                    &t[1],
                    Some(&t[2]),
                    (2, 1),
                    Padding {
                        top: 1,
                        bottom: 0,
                        left: 2,
                        right: 1,
                    },
                )
                .unwrap()
            }),
        ),
        (
            "upsample_nearest",
            vec![x.clone()],
            Box::new(|t| ops::upsample_nearest(&t[0], 2).unwrap()),
        ),
        (
            "area_downsample",
            vec![x.clone()],
            Box::new(|t| ops::area_downsample(&t[0], 4, 3).unwrap()),
        ),
        (
            "bicubic_upsample",
            vec![x],
            Box::new(|t| ops::bicubic_upsample(&t[0], 13, 16).unwrap()),
        ),
    ];
    for (name, inputs, f) in cases {
        let want = vals(&f(&inputs));
        let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
            let cast: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dt).unwrap()).collect();
            // Compare with f64 on the rounded inputs, so only the op's own rounding counts.
            let rounded: Vec<Tensor> = cast
                .iter()
                .map(|t| t.to_dtype(DType::F64).unwrap())
                .collect();
            let want = vals(&f(&rounded));
            let got = f(&cast);
            assert_eq!(got.dtype(), dt, "{name}");
            for (a, b) in vals(&got).iter().zip(&want) {
                assert!((a - b).abs() <= tol * scale, "{name} {dt}: {a} vs {b}");
            }
        }
    }
}

// ----------------------------------------------------------------------------------------------
// errors

fn err_of(r: mvar::engine::Result<Tensor>) -> String {
    match r {
        Ok(t) => panic!("expected an error, got {t:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_err(op: &str, r: mvar::engine::Result<Tensor>) {
    let msg = err_of(r);
    assert!(msg.contains(op), "message without the op name {op}: {msg}");
}

#[test]
fn conv2d_rejects_bad_inputs() {
    let x = randn(&[1, 3, 5, 5], 1);
    let w = randn(&[4, 3, 3, 3], 2);
    let b = randn(&[4], 3);
    let conv = |x: &Tensor, w: &Tensor, b: Option<&Tensor>, s: (usize, usize), p: Padding| {
        ops::conv2d(x, w, b, s, p)
    };
    let p1 = Padding::same(1);
    // ranks
    assert_err("conv2d", conv(&randn(&[3, 5, 5], 1), &w, None, (1, 1), p1));
    assert_err("conv2d", conv(&x, &randn(&[4, 3, 3], 2), None, (1, 1), p1));
    // channels
    assert_err(
        "conv2d",
        conv(&x, &randn(&[4, 2, 3, 3], 2), None, (1, 1), p1),
    );
    // bias shape
    assert_err("conv2d", conv(&x, &w, Some(&randn(&[3], 3)), (1, 1), p1));
    assert_err("conv2d", conv(&x, &w, Some(&randn(&[1, 4], 3)), (1, 1), p1));
    // stride 0
    assert_err("conv2d", conv(&x, &w, Some(&b), (0, 1), p1));
    assert_err("conv2d", conv(&x, &w, Some(&b), (1, 0), p1));
    // kernel larger than the padded input
    assert_err(
        "conv2d",
        conv(&randn(&[1, 3, 2, 5], 1), &w, None, (1, 1), Padding::none()),
    );
    assert_err(
        "conv2d",
        conv(
            &randn(&[1, 3, 5, 1], 1),
            &w,
            None,
            (1, 1),
            Padding {
                top: 0,
                bottom: 0,
                left: 1,
                right: 0,
            },
        ),
    );
    // empty axes
    assert_err(
        "conv2d",
        conv(
            &randn(&[1, 0, 5, 5], 1),
            &randn(&[4, 0, 3, 3], 2),
            None,
            (1, 1),
            p1,
        ),
    );
    assert_err(
        "conv2d",
        conv(&x, &randn(&[0, 3, 3, 3], 2), None, (1, 1), p1),
    );
    // an output too large to allocate
    let huge = Padding {
        top: 1 << 60,
        bottom: 0,
        left: 0,
        right: 0,
    };
    assert_err("conv2d", conv(&x, &w, None, (1, 1), huge));
    // padding that overflows
    assert_err(
        "conv2d",
        conv(
            &x,
            &w,
            None,
            (1, 1),
            Padding {
                top: usize::MAX,
                bottom: 1,
                left: 0,
                right: 0,
            },
        ),
    );
    // dtypes
    assert_err(
        "conv2d",
        conv(&x.to_dtype(DType::F32).unwrap(), &w, None, (1, 1), p1),
    );
    assert_err(
        "conv2d",
        conv(&x, &w, Some(&b.to_dtype(DType::BF16).unwrap()), (1, 1), p1),
    );
    let xi = Tensor::zeros([1, 3, 5, 5], DType::I64, &Device::Cpu).unwrap();
    let wi = Tensor::zeros([4, 3, 3, 3], DType::I64, &Device::Cpu).unwrap();
    assert_err("conv2d", conv(&xi, &wi, None, (1, 1), p1));
}

#[test]
fn resampling_rejects_bad_inputs() {
    let x = randn(&[1, 2, 4, 4], 1);
    let xi = Tensor::zeros([1, 2, 4, 4], DType::U8, &Device::Cpu).unwrap();
    let rank3 = randn(&[2, 4, 4], 1);
    let empty = randn(&[1, 2, 0, 4], 1);

    assert_err("upsample_nearest", ops::upsample_nearest(&x, 0));
    assert_err("upsample_nearest", ops::upsample_nearest(&rank3, 2));
    assert_err("upsample_nearest", ops::upsample_nearest(&xi, 2));
    assert_err("upsample_nearest", ops::upsample_nearest(&empty, 2));
    assert_err("upsample_nearest", ops::upsample_nearest(&x, usize::MAX));

    type Resize = fn(&Tensor, usize, usize) -> mvar::engine::Result<Tensor>;
    let resizes: [(&str, Resize); 2] = [
        ("area_downsample", ops::area_downsample),
        ("bicubic_upsample", ops::bicubic_upsample),
    ];
    for (name, f) in resizes {
        assert_err(name, f(&x, 0, 2));
        assert_err(name, f(&x, 2, 0));
        assert_err(name, f(&rank3, 2, 2));
        assert_err(name, f(&xi, 2, 2));
        assert_err(name, f(&empty, 2, 2));
        assert_err(name, f(&x, usize::MAX, 2));
        // Fits a usize but no allocation could hold it: an error, not a capacity-overflow panic.
        assert_err(name, f(&x, 1 << 60, 1));
    }
}
