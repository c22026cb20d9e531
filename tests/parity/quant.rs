//! The quantizer's resampling (area and bicubic, values and input gradients, any sizes in
//! either direction), the nearest-code search (exact index equality) and the fused scale step
//! (codes -> bicubic -> Phi -> accumulate) against the CPU.
//!
//! Resampling inputs are rounded to bf16 values first, so the GPU bf16 run sees the numbers of
//! the f32 reference. The nearest-code inputs are built so that every row's nearest code is
//! unique by a wide margin (or tied exactly, in the tie test), so the indices must agree
//! exactly in every dtype.

use mvar::cuda::ops::quant::{self as cq, CodeSplits};
use mvar::engine::{no_grad, DType, Device, Error, Storage, Tensor};
use mvar::ops;
use proptest::prelude::*;

use crate::{config, gpu, parity, randn};

fn randn_b(shape: &[usize], seed: u64) -> Tensor {
    randn(shape, seed)
        .to_dtype(DType::BF16)
        .and_then(|b| b.to_dtype(DType::F32))
        .expect("round to bf16")
}

fn check(r: std::result::Result<(), TestCaseError>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn area_downsample(
        n in 1usize..3, c in 1usize..4, h in 1usize..14, w in 1usize..14,
        oh in 1usize..14, ow in 1usize..14, seed in any::<u64>()
    ) {
        parity(
            "area_downsample",
            |_, x| ops::area_downsample(&x[0], oh, ow),
            &[randn_b(&[n, c, h, w], seed)],
        )?;
    }

    #[test]
    fn bicubic_upsample(
        n in 1usize..3, c in 1usize..4, h in 1usize..14, w in 1usize..14,
        oh in 1usize..20, ow in 1usize..20, seed in any::<u64>()
    ) {
        parity(
            "bicubic_upsample",
            |_, x| ops::bicubic_upsample(&x[0], oh, ow),
            &[randn_b(&[n, c, h, w], seed)],
        )?;
    }

    #[test]
    fn phi_accumulate_fused_step(
        b in 1usize..3, c in 1usize..21, v in 1usize..40, ph in 1usize..7, pw in 1usize..7,
        extra_h in 0usize..14, extra_w in 0usize..14, mix in 0usize..3, negative in any::<bool>(),
        seed in any::<u64>()
    ) {
        let ratio = [None, Some(0.5), Some(0.3)][mix];
        let sign = if negative { -1.0 } else { 1.0 };
        phi_step_agrees(b, c, v, (ph, pw), (ph + extra_h, pw + extra_w), ratio, mix != 2, sign, seed);
    }

    #[test]
    fn nearest_code_of_separated_codes(
        n in 1usize..300, v in 1usize..600, c in 3usize..48, seed in any::<u64>()
    ) {
        nearest_code_agrees(n, v, c, seed);
    }
}

/// The quantizer's scales (16 <-> 5, 16 -> 13), size 1 on either side, non-square maps, more
/// elements than one launch block, identity sizes.
#[test]
fn resampling_at_the_quantizer_scales_and_borders() {
    let cases: [([usize; 4], usize, usize); 10] = [
        ([2, 3, 16, 16], 5, 5),
        ([2, 3, 5, 5], 16, 16),
        ([1, 4, 16, 16], 13, 13),
        ([1, 2, 1, 1], 7, 3),
        ([1, 2, 7, 3], 1, 1),
        ([1, 1, 37, 23], 13, 50),
        ([2, 2, 3, 2], 31, 17),
        ([1, 1, 1, 64], 256, 1),
        ([3, 5, 9, 11], 9, 11),
        ([4, 32, 16, 16], 10, 10),
    ];
    for (i, (dims, oh, ow)) in cases.into_iter().enumerate() {
        let x = randn_b(&dims, 100 + i as u64);
        check(parity(
            &format!("area_downsample {dims:?} -> {oh}x{ow}"),
            |_, x| ops::area_downsample(&x[0], oh, ow),
            std::slice::from_ref(&x),
        ));
        check(parity(
            &format!("bicubic_upsample {dims:?} -> {oh}x{ow}"),
            |_, x| ops::bicubic_upsample(&x[0], oh, ow),
            std::slice::from_ref(&x),
        ));
    }
}

/// splitmix64: reproducible test data without a random-number crate.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A codebook of v distinct points of a shifted integer lattice (code j is j written in base b,
/// plus one random offset in [-1, 1) per coordinate shared by every code) and n rows, each a
/// random code plus at most 0.05 per coordinate. Two codes are equal in the coordinates where
/// their digits agree and at least 1 apart (7/8 after rounding to bf16, whose spacing is at most
/// 1/8 below 32) where they differ, while a row is within 0.12 of its own code in every
/// coordinate even in bf16: its own code is the nearest, by more than 0.5 in squared distance.
/// Only the first ceil(log_b v) coordinates tell codes apart; with `digits_last` they are the
/// last ones instead (coordinate c - 1 - i holds digit i), so that a search that mishandles its
/// later channels (k steps after the first, or z staged per step beyond 128 channels) picks
/// wrong codes too.
fn separated(
    n: usize,
    v: usize,
    c: usize,
    seed: u64,
    digits_last: bool,
) -> (Tensor, Tensor, Vec<i64>) {
    let mut b = 2usize;
    while b.pow(c.min(20) as u32) < v {
        b += 1;
    }
    assert!(b <= 16, "lattice too coarse for bf16");
    let mut rng = Mix(seed);
    let shift: Vec<f32> = (0..c).map(|_| rng.unit()).collect();
    let mut e = Vec::with_capacity(v * c);
    for j in 0..v {
        let mut digits = j;
        let start = e.len();
        for s in &shift {
            e.push((digits % b) as f32 + s);
            digits /= b;
        }
        if digits_last {
            e[start..].reverse();
        }
    }
    let mut z = Vec::with_capacity(n * c);
    let mut own = Vec::with_capacity(n);
    for _ in 0..n {
        let a = rng.below(v);
        own.push(a as i64);
        z.extend((0..c).map(|k| e[a * c + k] + 0.05 * rng.unit()));
    }
    (
        Tensor::from_vec(z, [n, c], &Device::Cpu).expect("z"),
        Tensor::from_vec(e, [v, c], &Device::Cpu).expect("codebook"),
        own,
    )
}

/// The GPU search with the codebook cut into `splits` ranges (the op itself always takes the
/// automatic count).
fn gpu_indices_with_splits(z: &Tensor, e: &Tensor, splits: CodeSplits) -> Vec<i64> {
    let (n, c) = (z.dims()[0], z.dims()[1]);
    let v = e.dims()[0];
    let Device::Cuda(dev) = z.device() else {
        panic!("expected GPU tensors")
    };
    let (zs, es) = (z.storage(), e.storage());
    let (Storage::Cuda(zb), Storage::Cuda(eb)) = (&*zs, &*es) else {
        panic!("expected GPU buffers")
    };
    let out = cq::nearest_code(dev, zb, eb, n, v, c, splits, cq::RowLayout::Rows, None)
        .expect("nearest_code");
    Tensor::from_storage(Storage::Cuda(out), [n], z.device())
        .and_then(|t| t.to_vec::<i64>())
        .expect("download")
}

/// nearest_code on the CPU gives the expected indices (the premise of the case, checked with
/// or without a GPU) and on the GPU the same, in f32 and bf16, with the codebook searched in
/// one range (the single-pass variant), a few, one per 64-code tile, or as many as the op picks.
fn nearest_code_matches(z: &Tensor, e: &Tensor, want: &[i64], what: &str) {
    let gpu = gpu();
    for dtype in [DType::F32, DType::BF16] {
        let (zd, ed) = (z.to_dtype(dtype).unwrap(), e.to_dtype(dtype).unwrap());
        let cpu = ops::nearest_code(&zd, &ed)
            .unwrap()
            .to_vec::<i64>()
            .unwrap();
        assert_eq!(cpu, want, "{what} {dtype}: the CPU reference");
        let Some(gpu) = &gpu else { continue };
        let (zg, eg) = (zd.to_device(gpu).unwrap(), ed.to_device(gpu).unwrap());
        let got = ops::nearest_code(&zg, &eg).unwrap();
        assert_eq!(got.dims(), &[want.len()], "{what} {dtype}");
        assert_eq!(
            got.to_vec::<i64>().unwrap(),
            cpu,
            "{what} {dtype}: GPU vs CPU"
        );
        if want.is_empty() {
            continue;
        }
        for splits in [1, 2, 3, 64, usize::MAX] {
            assert_eq!(
                gpu_indices_with_splits(&zg, &eg, CodeSplits::Fixed(splits)),
                cpu,
                "{what} {dtype}: GPU with the codebook in {splits} ranges vs CPU"
            );
        }
    }
}

fn nearest_code_agrees(n: usize, v: usize, c: usize, seed: u64) {
    for digits_last in [false, true] {
        let (z, e, own) = separated(n, v, c, seed, digits_last);
        let what = format!("nearest_code n {n} v {v} c {c} (digits last: {digits_last})");
        nearest_code_matches(&z, &e, &own, &what);
    }
}

/// Several row tiles and code tiles, with sizes that are multiples of neither; the benchmark's
/// codebook size; C of 1 and 2 (below one channel tile) and above 128.
#[test]
fn nearest_code_larger_and_narrow_cases() {
    nearest_code_agrees(2050, 4095, 32, 1);
    nearest_code_agrees(700, 4096, 8, 2);
    nearest_code_agrees(300, 7, 1, 3);
    nearest_code_agrees(129, 200, 2, 4);
    nearest_code_agrees(65, 64, 64, 5);
    // Wider than the 128 channels whose z stays in shared memory: staged per k step with e.
    nearest_code_agrees(100, 300, 130, 6);
    nearest_code_agrees(70, 65, 200, 7);
}

/// Duplicate codebook rows tie exactly and the lowest index wins, wherever the copies sit (the
/// same thread, different threads, different code tiles); a codebook of one repeated row gives
/// index 0 everywhere; an empty z gives an empty result.
#[test]
fn nearest_code_ties_go_to_the_lowest_index() {
    let (v, c) = (4096usize, 32usize);
    let mut rng = Mix(7);
    // Integer entries in [-4, 4] and rows within a quarter per coordinate: every dot product and
    // norm is exact in f32 whatever the summation order, so ties are exact on both devices; any
    // two distinct codes differ by at least 1 in some coordinate, so the nearest codes of a row
    // are exactly the copies of the code it was drawn from.
    let mut e: Vec<f32> = (0..v * c).map(|_| rng.below(9) as f32 - 4.0).collect();
    let pairs = [
        (5, 67),
        (63, 64),
        (1, v - 1),
        (6, 70),
        (0, 2),
        (100, 3000),
        (16, 17),
    ];
    for &(lo, hi) in &pairs {
        let row: Vec<f32> = e[lo * c..(lo + 1) * c].to_vec();
        e[hi * c..(hi + 1) * c].copy_from_slice(&row);
    }
    let first_copy = |a: usize| -> i64 {
        (0..v)
            .find(|&j| e[j * c..(j + 1) * c] == e[a * c..(a + 1) * c])
            .unwrap() as i64
    };
    let mut sources: Vec<usize> = pairs.iter().flat_map(|&(lo, hi)| [hi, lo, hi]).collect();
    sources.extend((0..200).map(|_| rng.below(v)));
    let mut z = Vec::new();
    for &a in &sources {
        z.extend((0..c).map(|k| e[a * c + k] + 0.25 * (rng.below(3) as f32 - 1.0)));
    }
    let want: Vec<i64> = sources.iter().map(|&a| first_copy(a)).collect();
    for &(lo, _) in &pairs {
        assert!(want.contains(&(lo as i64)));
    }
    let zt = Tensor::from_vec(z, [sources.len(), c], &Device::Cpu).unwrap();
    let et = Tensor::from_vec(e, [v, c], &Device::Cpu).unwrap();
    nearest_code_matches(&zt, &et, &want, "nearest_code ties");

    let same = Tensor::from_vec(vec![1.5f32; 200 * 5], [200, 5], &Device::Cpu).unwrap();
    let zr = randn(&[77, 5], 8);
    nearest_code_matches(&zr, &same, &[0; 77], "nearest_code one repeated code");

    let empty = Tensor::zeros([0, 5], DType::F32, &Device::Cpu).unwrap();
    nearest_code_matches(&empty, &same, &[], "nearest_code empty z");
}

/// A NaN distance never wins: a NaN codebook row is never chosen (and a row whose own code is
/// elsewhere keeps it), and a NaN row of z, all of whose distances are NaN, gets index 0, in
/// every code range layout.
#[test]
fn nearest_code_nan_never_wins() {
    let (n, v, c) = (150usize, 700usize, 6usize);
    let (z, e, mut want) = separated(n, v, c, 11, true);
    let mut e = e.to_vec::<f32>().unwrap();
    // A code no row was drawn from, in the middle and in the last range, turns NaN.
    for bad in [
        (0..v).rev().find(|j| !want.contains(&(*j as i64))).unwrap(),
        300,
    ] {
        if want.contains(&(bad as i64)) {
            continue;
        }
        e[bad * c..(bad + 1) * c].fill(f32::NAN);
    }
    let mut z = z.to_vec::<f32>().unwrap();
    z[7 * c..8 * c].fill(f32::NAN);
    want[7] = 0;
    let zt = Tensor::from_vec(z, [n, c], &Device::Cpu).unwrap();
    let et = Tensor::from_vec(e, [v, c], &Device::Cpu).unwrap();
    nearest_code_matches(&zt, &et, &want, "nearest_code with NaN rows and codes");
}

/// Token indices in [0, v), reproducible.
fn token_map(b: usize, n: usize, v: usize, seed: u64) -> Vec<i64> {
    let mut rng = Mix(seed);
    (0..b * n).map(|_| rng.below(v) as i64).collect()
}

/// ops::phi_accumulate under no_grad (so a GPU runs the fused kernels, and the CPU the
/// composition of the unfused ops, its reference) through [`parity`]: f32 and bf16 against the
/// CPU. `bias` false leaves Phi's bias out.
#[allow(clippy::too_many_arguments)]
fn phi_step_agrees(
    b: usize,
    c: usize,
    v: usize,
    scale: (usize, usize),
    full: (usize, usize),
    ratio: Option<f64>,
    bias: bool,
    sign: f64,
    seed: u64,
) {
    let (ph, pw) = scale;
    let (h, w) = full;
    let ids = token_map(b, ph * pw, v, seed);
    let inputs = [
        randn_b(&[b, c, h, w], seed ^ 1),
        randn_b(&[v, c], seed ^ 2),
        randn_b(&[c, c, 3, 3], seed ^ 3),
        randn_b(&[c], seed ^ 4),
    ];
    let what = format!(
        "phi_accumulate b {b} c {c} v {v} scale {ph}x{pw} full {h}x{w} ratio {ratio:?} bias {bias} sign {sign}"
    );
    check(parity(
        &what,
        |dev, x| {
            let _ng = no_grad();
            let idx = Tensor::from_vec(ids.clone(), [b, ph * pw], &Device::Cpu)?.to_device(dev)?;
            let phi = ratio.map(|ratio| ops::Phi {
                weight: &x[2],
                bias: bias.then_some(&x[3]),
                ratio,
            });
            ops::phi_accumulate(
                &x[0],
                &idx,
                scale,
                &x[1],
                phi.as_ref(),
                sign,
                ops::IndexOrigin::Caller,
            )
        },
        &inputs,
    ));
}

/// The quantizer's own step sizes (10 scales up to 16x16, 32 channels, the identity scale),
/// maps past one 16x16 tile, and channel counts past one group of 8 and one chunk of 16.
#[test]
fn phi_accumulate_at_the_quantizer_scales() {
    for (i, pn) in [1usize, 2, 3, 4, 5, 6, 8, 10, 13, 16]
        .into_iter()
        .enumerate()
    {
        phi_step_agrees(
            2,
            32,
            64,
            (pn, pn),
            (16, 16),
            Some(0.5),
            true,
            -1.0,
            10 + i as u64,
        );
    }
    phi_step_agrees(1, 17, 9, (5, 7), (33, 18), Some(0.5), true, 1.0, 30);
    phi_step_agrees(3, 9, 5, (1, 1), (1, 1), Some(0.5), false, -1.0, 31);
    phi_step_agrees(1, 40, 300, (16, 16), (16, 16), None, true, 1.0, 32);
}

/// On a GPU: the fused kernels against the unfused composition on the same GPU in f32, with
/// the indices taken as the search's (not read back) too; an index out of range is an error
/// naming it when the caller's indices are checked.
#[test]
fn phi_accumulate_fused_matches_the_unfused_ops_on_the_gpu() {
    let Some(gpu) = gpu() else { return };
    let _ng = no_grad();
    let (b, c, v, pn, full) = (2, 32, 4096, 8, 16);
    let on = |t: Tensor| t.to_device(&gpu).expect("upload");
    let acc = on(randn(&[b, c, full, full], 40));
    let table = on(randn(&[v, c], 41));
    let weight = on(randn(&[c, c, 3, 3], 42));
    let bias = on(randn(&[c], 43));
    let idx =
        on(Tensor::from_vec(token_map(b, pn * pn, v, 44), [b, pn * pn], &Device::Cpu).unwrap());
    let phi = ops::Phi {
        weight: &weight,
        bias: Some(&bias),
        ratio: 0.5,
    };
    let want = ops::phi_accumulate_unfused(&acc, &idx, (pn, pn), &table, Some(&phi), -1.0)
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    let scale = want.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
    for origin in [ops::IndexOrigin::Caller, ops::IndexOrigin::NearestCode] {
        let got = ops::phi_accumulate(&acc, &idx, (pn, pn), &table, Some(&phi), -1.0, origin)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        let err = mvar::ops::testing::max_abs_diff_f32(&got, &want);
        assert!(
            err <= 1e-5 * scale,
            "{origin:?}: fused vs unfused on the GPU differ by {err}"
        );
    }
    let mut bad_ids = token_map(b, pn * pn, v, 45);
    bad_ids[7] = v as i64;
    let bad = on(Tensor::from_vec(bad_ids, [b, pn * pn], &Device::Cpu).unwrap());
    match ops::phi_accumulate(
        &acc,
        &bad,
        (pn, pn),
        &table,
        Some(&phi),
        1.0,
        ops::IndexOrigin::Caller,
    ) {
        Err(Error::IndexOutOfRange { index, size, .. }) => assert_eq!((index, size), (v as i64, v)),
        other => panic!(
            "expected an index-out-of-range error, got {:?}",
            other.map(|t| t.shape().clone())
        ),
    }
}

/// nearest_code_maps on feature maps [B, C, H, W] (read in place on a GPU, with the codebook's
/// norms computed once) gives the indices of the pixels as rows, on the CPU and on the GPU in
/// f32 and bf16: one codebook searched at several map sizes, as the encoder's scales do, with
/// more than one 64-row tile, a tile that spans images, and channels past the resident 128.
#[test]
fn nearest_code_maps_reads_nchw_in_place() {
    let gpu = gpu();
    for (i, (b, h, w, c)) in [(3, 5, 7, 32), (2, 16, 16, 8), (1, 1, 1, 3), (4, 3, 3, 130)]
        .into_iter()
        .enumerate()
    {
        let n = b * h * w;
        for digits_last in [false, true] {
            let (z, e, own) = separated(n, 300, c, 60 + i as u64, digits_last);
            let maps = ops::permute(&z.reshape([b, h, w, c]).unwrap(), &[0, 3, 1, 2]).unwrap();
            let what = format!("nearest_code_maps [{b},{c},{h},{w}] (digits last: {digits_last})");
            for dtype in [DType::F32, DType::BF16] {
                let (md, ed) = (maps.to_dtype(dtype).unwrap(), e.to_dtype(dtype).unwrap());
                let book = ops::Codebook::new(&ed).unwrap();
                let cpu = ops::nearest_code_maps(&md, &book).unwrap();
                assert_eq!(cpu.dims(), &[b, h * w], "{what}");
                assert_eq!(cpu.to_vec::<i64>().unwrap(), own, "{what} {dtype}: the CPU");
                let Some(gpu) = &gpu else { continue };
                let book = ops::Codebook::new(&ed.to_device(gpu).unwrap()).unwrap();
                let got = ops::nearest_code_maps(&md.to_device(gpu).unwrap(), &book).unwrap();
                assert_eq!(got.dims(), &[b, h * w], "{what}");
                assert_eq!(
                    got.to_vec::<i64>().unwrap(),
                    own,
                    "{what} {dtype}: GPU vs CPU"
                );
            }
        }
    }
}
