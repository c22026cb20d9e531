//! Parity of the fused neighbourhood-attention kernels (`cuda/kernels/na2d.cu`) with the CPU
//! reference `ops/src/na2d.rs`: the output and the gradients of q, k and v, GPU f32 and bf16
//! against CPU f32, for every kernel family (mma, simt, naive; a family the dtype or head dim does
//! not support falls back to a simpler one, so every request runs something), and the tuned
//! families against the naive one on the GPU itself.
//!
//! Inputs are rounded to bf16 values first, so that the bf16 run sees the numbers the CPU sees and
//! only the arithmetic differs. Two input kinds: raw N(0, 1) with logits scaled by 1/sqrt(D), and
//! MVAR-like (q = normalize(randn) * 4, k = normalize(randn) over D, logit scale 1).

use mvar::cuda::ops::na2d::{na2d_family, Na2dShape, NaDiag, NaRun, NaStaging};
use mvar::engine::{DType, Device, Generator, Tensor};
use mvar::ops::{self, NaKernel};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use crate::{config, gpu, parity, randn, tolerance};

const FAMILIES: [NaKernel; 3] = [NaKernel::Mma, NaKernel::Simt, NaKernel::Naive];

/// The values of `t` rounded to bf16 (still f32).
fn bf16_exact(t: Tensor) -> Tensor {
    t.to_dtype(DType::BF16)
        .and_then(|b| b.to_dtype(DType::F32))
        .expect("round to bf16")
}

/// q, k, v and the logit scale.
fn inputs(shape: &[usize], mvar_like: bool, seed: u64) -> (Vec<Tensor>, f64) {
    let r = |i: u64| randn(shape, seed.wrapping_mul(3).wrapping_add(i));
    if mvar_like {
        let q = ops::affine(&ops::l2_normalize(&r(0), 1e-12).unwrap(), 4.0, 0.0).unwrap();
        let k = ops::l2_normalize(&r(1), 1e-12).unwrap();
        (vec![bf16_exact(q), bf16_exact(k), bf16_exact(r(2))], 1.0)
    } else {
        let scale = 1.0 / (shape[4] as f64).sqrt();
        (
            vec![bf16_exact(r(0)), bf16_exact(r(1)), bf16_exact(r(2))],
            scale,
        )
    }
}

/// Every family against the CPU on one case.
fn check(shape: [usize; 5], ks: usize, mvar_like: bool, seed: u64) -> Result<(), TestCaseError> {
    let (x, scale) = inputs(&shape, mvar_like, seed);
    for fam in FAMILIES {
        let name = format!(
            "na2d {} {shape:?} k {ks}{}",
            fam.name(),
            if mvar_like { " mvar-like" } else { "" }
        );
        parity(
            &name,
            |_, x| ops::na2d_with_kernel(&x[0], &x[1], &x[2], ks, scale, fam),
            &x,
        )?;
    }
    Ok(())
}

/// [B, H, X, Y, D] and a kernel size that fits: kernels 3..13, maps from X == k up to k + 7 per
/// side (rectangular, and wider than one 16-column tile), head dims of every family (24 has no
/// tiled kernel, 128 no simt one).
fn case() -> impl Strategy<Value = ([usize; 5], usize)> {
    (
        1usize..3,
        1usize..3,
        prop::sample::select(vec![3usize, 5, 7, 9, 13]),
        0usize..8,
        0usize..8,
        any::<bool>(),
        prop::sample::select(vec![16usize, 24, 32, 64, 128]),
    )
        .prop_map(|(b, h, k, ex, ey, x_is_k, d)| {
            let x = if x_is_k { k } else { k + ex };
            ([b, h, x, k + ey, d], k)
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn na2d_matches_the_cpu((shape, ks) in case(), mvar_like in any::<bool>(), seed in any::<u64>()) {
        check(shape, ks, mvar_like, seed)?;
    }
}

/// Borders and corners: maps no larger than a few windows (every window shifted at some border,
/// X == k where one window is the whole axis), rectangular maps, maps wider than one column tile.
#[test]
fn na2d_borders_and_corners() {
    let cases: &[([usize; 5], usize)] = &[
        ([1, 1, 3, 3, 16], 3),
        ([1, 2, 5, 5, 32], 5),
        ([2, 1, 4, 9, 16], 3),
        ([1, 2, 9, 4, 64], 3),
        ([1, 1, 7, 7, 64], 7),
        ([1, 1, 8, 7, 64], 7),
        ([1, 2, 13, 13, 32], 13),
        ([1, 1, 13, 14, 64], 13),
        ([1, 1, 5, 33, 16], 5),
        ([2, 1, 17, 18, 32], 9),
        ([1, 1, 1, 1, 16], 1),
        ([1, 2, 6, 10, 48], 1),
    ];
    for (i, &(shape, ks)) in cases.iter().enumerate() {
        for mvar_like in [false, true] {
            check(shape, ks, mvar_like, 100 + i as u64).unwrap();
        }
    }
}

/// MVAR's own shapes (13x13 and 16x16 maps, k = 7, head dim 64) at a few heads.
#[test]
fn na2d_mvar_shapes() {
    for (i, shape) in [[2, 4, 16, 16, 64], [2, 4, 13, 13, 64]]
        .into_iter()
        .enumerate()
    {
        for mvar_like in [false, true] {
            check(shape, 7, mvar_like, 200 + i as u64).unwrap();
        }
    }
}

/// Scores spread over tens of log2 units (q scaled by 6: q.k / 8 has a standard deviation of
/// about 8.7 log2 units), so that a row's score maximum often grows by more than the mma
/// forward's rescale slack (NA_RESCALE_SLACK) from one chunk to a later one: the path where O
/// and the sum are rescaled after the first chunk, which unit-scale inputs never take.
#[test]
fn na2d_wide_logits() {
    for (i, shape) in [[1, 2, 16, 16, 64], [1, 2, 13, 13, 64]]
        .into_iter()
        .enumerate()
    {
        let (mut x, scale) = inputs(&shape, false, 300 + i as u64);
        x[0] = bf16_exact(ops::affine(&x[0], 6.0, 0.0).unwrap());
        for fam in FAMILIES {
            parity(
                &format!("na2d {} {shape:?} k 7 wide logits", fam.name()),
                |_, x| ops::na2d_with_kernel(&x[0], &x[1], &x[2], 7, scale, fam),
                &x,
            )
            .unwrap();
        }
    }
}

/// Shapes whose staged rows exceed the shared-memory budget, so blocks loop over stages:
/// k = 13 at head dim 128 (mma) and 64 (simt, f32 staging), and a tall map.
#[test]
fn na2d_in_several_stages() {
    for (i, &(shape, ks)) in [
        ([1, 2, 16, 16, 128], 13),
        ([1, 2, 20, 20, 64], 13),
        ([1, 1, 40, 9, 64], 9),
    ]
    .iter()
    .enumerate()
    {
        check(shape, ks, false, 300 + i as u64).unwrap();
    }
}

/// The kernels' view of a [B, H, X, Y, D] problem.
fn na_shape(shape: [usize; 5], kernel_size: usize) -> Na2dShape {
    Na2dShape {
        maps: shape[0] * shape[1],
        x: shape[2],
        y: shape[3],
        d: shape[4],
        kernel_size,
    }
}

/// Output and input gradients of na2d with one family on the GPU (loss sum(out * w)).
fn run_family(
    x: &[Tensor],
    w: &Tensor,
    ks: usize,
    scale: f64,
    fam: NaKernel,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let leaves: Vec<Tensor> = x.iter().map(|t| t.detach().with_grad().unwrap()).collect();
    let y = ops::na2d_with_kernel(&leaves[0], &leaves[1], &leaves[2], ks, scale, fam).unwrap();
    ops::sum_all(&ops::mul(&y, w).unwrap())
        .unwrap()
        .backward()
        .unwrap();
    let grads = leaves
        .iter()
        .map(|l| l.grad().expect("gradient").to_vec_f64().unwrap())
        .collect();
    (y.to_vec_f64().unwrap(), grads)
}

fn max_rel_err(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    mvar::ops::testing::max_abs_diff(got, want) / scale
}

/// The tuned families against the naive kernel, on the GPU only, and a check that the tuned
/// families really ran (no silent fallback) for the head dims they cover.
#[test]
fn tuned_kernels_match_the_naive_kernel() {
    let Some(gpu) = gpu() else { return };
    let Device::Cuda(dev) = &gpu else { return };
    let cases: &[([usize; 5], usize)] = &[
        ([2, 3, 16, 16, 64], 7),
        ([1, 2, 13, 13, 64], 7),
        ([1, 2, 9, 21, 32], 5),
        ([1, 1, 14, 14, 128], 13),
        ([1, 2, 7, 19, 16], 7),
    ];
    for (i, &(shape, ks)) in cases.iter().enumerate() {
        let (x, scale) = inputs(&shape, i % 2 == 1, 400 + i as u64);
        let s = na_shape(shape, ks);
        for dtype in [DType::F32, DType::BF16] {
            let kind = match dtype {
                DType::BF16 => mvar::cuda::BufferKind::BF16,
                _ => mvar::cuda::BufferKind::F32,
            };
            let xd: Vec<Tensor> = x
                .iter()
                .map(|t| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap())
                .collect();
            let w = Tensor::randn(
                shape.to_vec(),
                0.0,
                1.0,
                DType::F32,
                &Device::Cpu,
                &mut Generator::new(7),
            )
            .and_then(|w| w.to_dtype(dtype))
            .and_then(|w| w.to_device(&gpu))
            .unwrap();
            let (want_y, want_g) = run_family(&xd, &w, ks, scale, NaKernel::Naive);
            for fam in [NaKernel::Simt, NaKernel::Mma] {
                let expected = fam.resolve(kind, s.d);
                for backward in [false, true] {
                    let ran = na2d_family(dev, kind, &s, fam, backward).unwrap();
                    assert_eq!(
                        ran, expected,
                        "{shape:?} {dtype} {fam:?} backward {backward}"
                    );
                }
                let (y, g) = run_family(&xd, &w, ks, scale, fam);
                let tol = tolerance(dtype);
                let e = max_rel_err(&y, &want_y);
                assert!(
                    e <= tol,
                    "{shape:?} k {ks} {dtype} {}: output differs from naive by {e:e}",
                    fam.name()
                );
                for (j, (gj, wj)) in g.iter().zip(&want_g).enumerate() {
                    let e = max_rel_err(gj, wj);
                    assert!(
                        e <= tol,
                        "{shape:?} k {ks} {dtype} {}: gradient {j} differs from naive by {e:e}",
                        fam.name()
                    );
                }
            }
        }
    }
}

/// Empty problems launch nothing and keep their shapes; bad kernel sizes are refused by the op
/// before any kernel is chosen.
#[test]
fn na2d_empty_and_invalid_on_the_gpu() {
    let Some(gpu) = gpu() else { return };
    for shape in [[0, 2, 5, 5, 16], [1, 2, 5, 5, 0]] {
        let x = Tensor::zeros(shape.to_vec(), DType::BF16, &gpu)
            .unwrap()
            .with_grad()
            .unwrap();
        let y = ops::na2d(&x, &x, &x, 3, 1.0).unwrap();
        assert_eq!(y.dims(), &shape);
        ops::sum_all(&y).unwrap().backward().unwrap();
        assert_eq!(x.grad().unwrap().dims(), &shape);
    }
    let x = Tensor::zeros([1, 1, 5, 7, 16], DType::F32, &gpu).unwrap();
    assert!(ops::na2d(&x, &x, &x, 4, 1.0).is_err());
    assert!(ops::na2d(&x, &x, &x, 7, 1.0).is_err());
}

/// One run's output, lse and (dq, dk, dv), as f32.
type DeviceRun = (Vec<f32>, Vec<f32>, [Vec<f32>; 3]);

/// Output, lse and (dq, dk, dv) of the op's device functions on bf16 inputs (q, k, v and dO from
/// `seed`), once per `runs` entry, called directly so that each run's staging and diagnostic
/// are its own (not the process's environment).
fn device_runs(
    gpu: &Device,
    shape: [usize; 5],
    ks: usize,
    seed: u64,
    runs: &[NaRun],
) -> Vec<DeviceRun> {
    use mvar::cuda::ops::na2d::{na2d_backward, na2d_forward};
    use mvar::cuda::HostVec;
    use mvar::engine::Storage;
    let Device::Cuda(dev) = gpu else {
        panic!("expected a CUDA device")
    };
    let s = na_shape(shape, ks);
    let (x, scale) = inputs(&shape, false, seed);
    let on_gpu: Vec<Tensor> = x
        .iter()
        .chain(std::iter::once(&randn(&shape, seed + 1)))
        .map(|t| t.to_dtype(DType::BF16).unwrap().to_device(gpu).unwrap())
        .collect();
    let storages: Vec<_> = on_gpu.iter().map(|t| t.storage()).collect();
    let b: Vec<&mvar::cuda::CudaBuffer> = storages
        .iter()
        .map(|st| match &**st {
            Storage::Cuda(b) => b,
            _ => panic!("expected a CUDA tensor"),
        })
        .collect();
    let f32s = |buf: &mvar::cuda::CudaBuffer| -> Vec<f32> {
        match dev.download(buf).unwrap() {
            HostVec::F32(v) => v,
            HostVec::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            _ => panic!("expected floats"),
        }
    };
    let scale = scale as f32;
    runs.iter()
        .map(|&run| {
            let (out, lse) = na2d_forward(dev, b[0], b[1], b[2], s, scale, run).unwrap();
            let grads =
                na2d_backward(dev, b[0], b[1], b[2], &out, b[3], &lse, s, scale, run).unwrap();
            let g = [&grads.0, &grads.1, &grads.2].map(f32s);
            (f32s(&out), f32s(&lse), g)
        })
        .collect()
}

/// The timing diagnostics of the mma kernels (`NaDiag`, benches only) leave out what they say:
/// with the chunk loops left out nothing is accumulated (the forward's lse is -inf, every
/// gradient 0); with the staging left out the kernels compute on zeroed shared memory (zero
/// keys and values: a uniform softmax over the k * k window, so out = 0 and lse = ln(k * k);
/// zero gradients). A diagnostic the kernels ignored would give the full results, which are
/// none of these. The ring staging's kernels take the same diagnostics.
#[test]
fn na2d_timing_diagnostics_leave_their_part_out() {
    let Some(gpu) = gpu() else { return };
    let (shape, ks) = ([1usize, 2, 9, 11, 64], 5);
    for staging in [NaStaging::Async, NaStaging::Ring { groups: 2 }] {
        let runs: Vec<NaRun> = [NaDiag::Full, NaDiag::LoadsOnly, NaDiag::NoLoads]
            .map(|diag| NaRun {
                kernel: NaKernel::Mma,
                staging,
                diag,
            })
            .to_vec();
        let results = device_runs(&gpu, shape, ks, 77, &runs);
        check_diagnostics(ks, &results);
    }
    assert_eq!(NaDiag::parse("loads-only"), Some(NaDiag::LoadsOnly));
    assert_eq!(NaDiag::parse(" No-Loads "), Some(NaDiag::NoLoads));
    assert_eq!(NaDiag::parse(""), Some(NaDiag::Full));
    assert_eq!(NaDiag::parse("noloads"), None);
}

/// The full, loads-only and no-loads results of one staging (see the test above).
fn check_diagnostics(ks: usize, results: &[DeviceRun]) {
    let (out, lse, g) = &results[0];
    assert!(out.iter().any(|&v| v != 0.0) && lse.iter().all(|v| v.is_finite()));
    assert!(g.iter().all(|gi| gi.iter().any(|&v| v != 0.0)));

    let (_, lse, g) = &results[1];
    assert!(
        lse.iter().all(|&v| v == f32::NEG_INFINITY),
        "loads-only: the forward still accumulated"
    );
    assert!(
        g.iter().all(|gi| gi.iter().all(|&v| v == 0.0)),
        "loads-only: the backward still accumulated"
    );

    let (out, lse, g) = &results[2];
    let uniform = ((ks * ks) as f32).ln();
    assert!(
        out.iter().all(|&v| v == 0.0),
        "no-loads: the values were staged"
    );
    assert!(
        lse.iter().all(|&v| (v - uniform).abs() < 1e-4),
        "no-loads: the keys were staged (lse {:?}, want {uniform})",
        &lse[..4]
    );
    assert!(
        g.iter().all(|gi| gi.iter().all(|&v| v == 0.0)),
        "no-loads: the backward's rows were staged"
    );
}

/// Ring staging (`NaStaging::Ring`) computes each warp's chunks in the order the block tiles do,
/// so its forward and dq equal theirs bit for bit (dk/dv stage as tiles either way). Maps of
/// several row groups, in work items of one, two and three groups and the automatic count;
/// rings that wrap and that prefetch only part of the next group (the forward's at 16x16);
/// strips side by side; maps with a short last group; a shape whose group rows do not fit a
/// ring (k 13), which stages as tiles.
#[test]
fn na2d_ring_staging_equals_the_tiles() {
    let Some(gpu) = gpu() else { return };
    let cases: &[([usize; 5], usize)] = &[
        ([1, 2, 16, 16, 64], 7),
        ([1, 1, 13, 13, 64], 7),
        ([1, 1, 21, 37, 32], 5),
        ([2, 1, 18, 7, 16], 3),
        ([1, 1, 11, 9, 128], 9),
        ([1, 1, 30, 20, 64], 13),
    ];
    for (i, &(shape, ks)) in cases.iter().enumerate() {
        let mut runs = vec![NaRun {
            kernel: NaKernel::Mma,
            ..NaRun::default()
        }];
        for groups in [0, 1, 2, 3] {
            runs.push(NaRun {
                staging: NaStaging::Ring { groups },
                ..runs[0]
            });
        }
        let results = device_runs(&gpu, shape, ks, 500 + i as u64, &runs);
        let (tiles, rings) = results.split_first().unwrap();
        for (run, ring) in runs[1..].iter().zip(rings) {
            let what = format!("{shape:?} k {ks} {}", run.staging.name());
            assert!(
                ring.0 == tiles.0,
                "{what}: the output differs from the tiles'"
            );
            assert!(ring.1 == tiles.1, "{what}: the lse differs from the tiles'");
            for (j, name) in ["dq", "dk", "dv"].iter().enumerate() {
                assert!(
                    ring.2[j] == tiles.2[j],
                    "{what}: {name} differs from the tiles'"
                );
            }
        }
    }
    assert_eq!(NaStaging::parse(""), Some(NaStaging::Async));
    assert_eq!(
        NaStaging::parse(" Ring "),
        Some(NaStaging::Ring { groups: 0 })
    );
    assert_eq!(
        NaStaging::parse("ring:3"),
        Some(NaStaging::Ring { groups: 3 })
    );
    assert_eq!(NaStaging::parse("ring:0"), None);
    assert_eq!(NaStaging::parse("rings"), None);
    for st in [NaStaging::Registers, NaStaging::Ring { groups: 2 }] {
        assert_eq!(NaStaging::parse(&st.name()), Some(st));
    }
}
