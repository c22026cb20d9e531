//! conv2d (im2col + cuBLAS, col2im, bias gradient) and nearest upsampling against the CPU.

use mvar::engine::cuda::ops::conv::{conv2d_backward_tiled, conv2d_forward_tiled, Conv2dShape};
use mvar::engine::cuda::{CudaBuffer, CudaDevice};
use mvar::engine::{Device, Storage, Tensor};
use mvar::ops::{self, Padding};
use proptest::prelude::*;

use crate::{config, gpu, parity, randn, tolerance};

proptest! {
    #![proptest_config(config())]

    #[test]
    fn conv2d(
        n in 1usize..3, cin in 1usize..4, cout in 1usize..5,
        h in 1usize..9, w in 1usize..9, kh in 1usize..4, kw in 1usize..4,
        sh in 1usize..3, sw in 1usize..3,
        pad in prop::collection::vec(0usize..3, 4),
        with_bias in any::<bool>(), seed in any::<u64>()
    ) {
        let pad = Padding { top: pad[0], bottom: pad[1], left: pad[2], right: pad[3] };
        prop_assume!(h + pad.top + pad.bottom >= kh && w + pad.left + pad.right >= kw);
        let mut inputs = vec![randn(&[n, cin, h, w], seed), randn(&[cout, cin, kh, kw], seed ^ 1)];
        if with_bias {
            inputs.push(randn(&[cout], seed ^ 2));
        }
        parity("conv2d", |_, x| ops::conv2d(&x[0], &x[1], x.get(2), (sh, sw), pad), &inputs)?;
    }

    #[test]
    fn conv2d_pointwise(
        n in 1usize..4, cin in 1usize..6, cout in 1usize..6, h in 1usize..7, w in 1usize..7,
        with_bias in any::<bool>(), seed in any::<u64>()
    ) {
        let mut inputs = vec![randn(&[n, cin, h, w], seed), randn(&[cout, cin, 1, 1], seed ^ 1)];
        if with_bias {
            inputs.push(randn(&[cout], seed ^ 2));
        }
        parity("conv2d 1x1", |_, x| ops::conv2d(&x[0], &x[1], x.get(2), (1, 1), Padding::none()), &inputs)?;
    }

    #[test]
    fn upsample_nearest(
        n in 1usize..3, c in 1usize..4, h in 1usize..7, w in 1usize..7, f in 1usize..4,
        seed in any::<u64>()
    ) {
        parity("upsample_nearest", |_, x| ops::upsample_nearest(&x[0], f), &[randn(&[n, c, h, w], seed)])?;
    }
}

/// Sizes past one block, a stride-2 downsampler padded only right and bottom (the VQVAE's), an
/// empty batch, and weight/input gradients asked for alone.
#[test]
fn conv2d_larger_and_border_cases() {
    let run = |r: std::result::Result<(), proptest::test_runner::TestCaseError>| {
        if let Err(e) = r {
            panic!("{e}");
        }
    };
    let down = Padding {
        top: 0,
        bottom: 1,
        left: 0,
        right: 1,
    };
    run(parity(
        "conv2d downsample",
        |_, x| ops::conv2d(&x[0], &x[1], Some(&x[2]), (2, 2), down),
        &[
            randn(&[2, 5, 17, 19], 1),
            randn(&[6, 5, 3, 3], 2),
            randn(&[6], 3),
        ],
    ));
    run(parity(
        "conv2d 3x3 same",
        |_, x| ops::conv2d(&x[0], &x[1], Some(&x[2]), (1, 1), Padding::same(1)),
        &[
            randn(&[3, 7, 21, 13], 4),
            randn(&[9, 7, 3, 3], 5),
            randn(&[9], 6),
        ],
    ));
    // Rows of whole 16-byte vectors (P = 128 and 64), where the vector kernels build the
    // columns and place the output and its gradient tiles (MVAR_EW_KERNEL=scalar: per element).
    run(parity(
        "conv2d 3x3 same, whole vectors",
        |_, x| ops::conv2d(&x[0], &x[1], Some(&x[2]), (1, 1), Padding::same(1)),
        &[
            randn(&[2, 5, 8, 16], 13),
            randn(&[4, 5, 3, 3], 14),
            randn(&[4], 15),
        ],
    ));
    run(parity(
        "conv2d stride 2, whole vectors",
        |_, x| ops::conv2d(&x[0], &x[1], None, (2, 2), Padding::same(1)),
        &[randn(&[2, 3, 16, 16], 16), randn(&[5, 3, 3, 3], 17)],
    ));
    run(parity(
        "conv2d empty batch",
        |_, x| ops::conv2d(&x[0], &x[1], Some(&x[2]), (1, 1), Padding::same(1)),
        &[
            randn(&[0, 2, 4, 4], 7),
            randn(&[3, 2, 3, 3], 8),
            randn(&[3], 9),
        ],
    ));
    // Only the input, or only the weight, needs a gradient.
    let w_fixed = randn(&[4, 3, 3, 2], 10);
    let x_fixed = randn(&[2, 3, 6, 5], 11);
    run(parity(
        "conv2d dx only",
        |d, x| {
            ops::conv2d(
                &x[0],
                &w_fixed.to_device(d)?.to_dtype(x[0].dtype())?,
                None,
                (1, 2),
                Padding::same(1),
            )
        },
        std::slice::from_ref(&x_fixed),
    ));
    run(parity(
        "conv2d dW only",
        |d, x| {
            ops::conv2d(
                &x_fixed.to_device(d)?.to_dtype(x[0].dtype())?,
                &x[0],
                None,
                (2, 1),
                Padding::none(),
            )
        },
        std::slice::from_ref(&w_fixed),
    ));
    run(parity(
        "upsample_nearest",
        |_, x| ops::upsample_nearest(&x[0], 3),
        &[randn(&[2, 3, 11, 9], 12)],
    ));
}

fn buffer_of(t: &Tensor) -> (CudaDevice, CudaBuffer) {
    let Device::Cuda(dev) = t.device() else {
        panic!("not a CUDA tensor")
    };
    let s = t.storage();
    let Storage::Cuda(b) = &*s else {
        panic!("not a CUDA buffer")
    };
    (dev.clone(), dev.duplicate(b).expect("copy"))
}

fn values(dev: &CudaDevice, b: CudaBuffer, dims: &[usize]) -> Vec<f64> {
    Tensor::from_storage(Storage::Cuda(b), dims.to_vec(), &Device::Cuda(dev.clone()))
        .expect("tensor")
        .to_vec_f64()
        .expect("values")
}

fn max_rel_err(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    assert_eq!(got.len(), want.len());
    mvar::ops::testing::max_abs_diff(got, want) / scale
}

/// The tiling (several images a tile, one image in runs of positions, one position a tile)
/// gives the CPU's results: tiny column budgets force every path on small inputs.
#[test]
fn conv2d_tiles_match_the_cpu() {
    let s = Conv2dShape {
        n: 3,
        cin: 2,
        h: 7,
        w: 6,
        cout: 3,
        kh: 3,
        kw: 2,
        sh: 2,
        sw: 1,
        top: 1,
        bottom: 0,
        left: 1,
        right: 1,
    };
    check_tiles(&s, 5);
    // P = 128 f32 positions: whole images and runs of 24 (p0 = 0, 24, ..., 120, and a last run
    // of 8) are whole 16-byte vectors, so the vector kernels build and place those tiles; a
    // run of one position is not, which falls back to the per-element kernels.
    let whole_vectors = Conv2dShape {
        n: 2,
        cin: 3,
        h: 8,
        w: 16,
        cout: 2,
        kh: 3,
        kw: 3,
        sh: 1,
        sw: 1,
        top: 1,
        bottom: 1,
        left: 1,
        right: 1,
    };
    check_tiles(&whole_vectors, 24);
}

/// conv2d forward and backward of `s` on the GPU in f32, with column budgets of two images a
/// tile, runs of `run` positions and one position, against the CPU.
fn check_tiles(s: &Conv2dShape, run: usize) {
    let Some(gpu) = gpu() else { return };
    let s = *s;
    let (ho, wo) = s.out_hw().expect("geometry");
    let pad = Padding {
        top: s.top,
        bottom: s.bottom,
        left: s.left,
        right: s.right,
    };
    let x = randn(&[s.n, s.cin, s.h, s.w], 21).with_grad().unwrap();
    let w = randn(&[s.cout, s.cin, s.kh, s.kw], 22).with_grad().unwrap();
    let b = randn(&[s.cout], 23).with_grad().unwrap();
    let dy = randn(&[s.n, s.cout, ho, wo], 24);
    let y = ops::conv2d(&x, &w, Some(&b), (s.sh, s.sw), pad).unwrap();
    ops::sum_all(&ops::mul(&y, &dy).unwrap())
        .unwrap()
        .backward()
        .unwrap();
    let want_y = y.to_vec_f64().unwrap();
    let want = [&x, &w, &b].map(|t| t.grad().unwrap().to_vec_f64().unwrap());
    let k = s.cin * s.kh * s.kw;
    // Bytes a column takes (f32, max(K, Cout) rows): budgets for 2 images, 5 positions and 1.
    let col = k.max(s.cout) * 4;
    for budget in [col * ho * wo * 2, col * run, 1] {
        let (dev, xb) = buffer_of(&x.to_device(&gpu).unwrap());
        let (_, wb) = buffer_of(&w.to_device(&gpu).unwrap());
        let (_, bb) = buffer_of(&b.to_device(&gpu).unwrap());
        let (_, dyb) = buffer_of(&dy.to_device(&gpu).unwrap());
        let yb = conv2d_forward_tiled(&dev, &xb, &wb, Some(&bb), &s, budget).unwrap();
        let e = max_rel_err(&values(&dev, yb, &[s.n, s.cout, ho, wo]), &want_y);
        assert!(
            e < tolerance(mvar::engine::DType::F32),
            "y, budget {budget}: {e}"
        );
        let g = conv2d_backward_tiled(&dev, &dyb, Some(&xb), Some(&wb), &s, true, budget).unwrap();
        let got = [
            values(&dev, g.dx.unwrap(), &[s.n, s.cin, s.h, s.w]),
            values(&dev, g.dw.unwrap(), &[s.cout, s.cin, s.kh, s.kw]),
            values(&dev, g.db.unwrap(), &[s.cout]),
        ];
        for (i, (gi, wi)) in got.iter().zip(&want).enumerate() {
            let e = max_rel_err(gi, wi);
            assert!(
                e < tolerance(mvar::engine::DType::F32),
                "gradient {i}, budget {budget}: {e}"
            );
        }
    }
}

/// Nearest upsampling on rows of whole 16-byte vectors (the vector kernels): factors 1, 2 (whose
/// backward reads g as vectors) and 3, rows of one vector and of several, in f32 and bf16,
/// against the CPU; and on the GPU each vector kernel equal, bit for bit, to the per-element
/// kernel it replaces (same copies, same sums in the same order).
#[test]
fn upsample_nearest_vector_kernels() {
    use mvar::engine::cuda::ops::conv::{
        upsample_nearest_backward_with, upsample_nearest_with, upsample_vector,
    };
    use mvar::engine::DType;
    let run = |r: std::result::Result<(), proptest::test_runner::TestCaseError>| {
        if let Err(e) = r {
            panic!("{e}");
        }
    };
    // [n, c, h, w] and f; (w * f) and w whole vectors of f32 (4) and, for some, of bf16 (8).
    let cases = [
        ([2, 3, 5, 8], 2),
        ([1, 2, 3, 16], 3),
        ([2, 2, 4, 4], 1),
        ([1, 1, 2, 12], 2),
        ([1, 2, 3, 40], 2),
    ];
    for (i, (s, f)) in cases.into_iter().enumerate() {
        let x = randn(&s, 60 + i as u64);
        run(parity(
            &format!("upsample_nearest {s:?} x{f}"),
            |_, x| ops::upsample_nearest(&x[0], f),
            std::slice::from_ref(&x),
        ));
        let Some(gpu) = gpu() else { continue };
        let planes = s[0] * s[1];
        let [h, w] = [s[2], s[3]];
        let g = randn(&[s[0], s[1], h * f, w * f], 80 + i as u64);
        for dtype in [DType::F32, DType::BF16] {
            let (dev, xb) = buffer_of(&x.to_dtype(dtype).unwrap().to_device(&gpu).unwrap());
            let (_, gb) = buffer_of(&g.to_dtype(dtype).unwrap().to_device(&gpu).unwrap());
            let up = |v| upsample_nearest_with(&dev, &xb, planes, h, w, f, v).unwrap();
            let down = |v| upsample_nearest_backward_with(&dev, &gb, planes, h, w, f, v).unwrap();
            let (up_dims, down_dims) = ([planes * h * f * w * f], [planes * h * w]);
            let label = format!("{s:?} x{f} {dtype}");
            // Which kernels run: the forward's rows are w * f long, the backward's w.
            let per = 16 / dtype.size_in_bytes();
            let ptrs = [xb.device_ptr(), gb.device_ptr()];
            for (backward, row) in [(false, w * f), (true, w)] {
                assert_eq!(
                    upsample_vector(xb.kind(), backward, planes, [h, w, f], &ptrs).is_some(),
                    row.is_multiple_of(per),
                    "{label} backward={backward}"
                );
            }
            assert_eq!(
                values(&dev, up(true), &up_dims),
                values(&dev, up(false), &up_dims),
                "forward {label}"
            );
            assert_eq!(
                values(&dev, down(true), &down_dims),
                values(&dev, down(false), &down_dims),
                "backward {label}"
            );
        }
    }
}
