//! Parity of the fused attention kernels (`cuda/kernels/attention.cu`) with the CPU reference:
//! every mask kind, block lengths from the VAR pyramid, sizes that are not multiples of the
//! 64-row tiles, the KV-cache decode form (Lq < Lk, no mask), rows that see no key, forward and
//! the gradients of q, k and v; and the tiled (f32 CUDA-core) and mma (bf16 tensor-core) kernels
//! against the naive reference kernels on the same GPU inputs.
//!
//! Inputs are rounded to bf16 values first, so that the GPU bf16 run sees the same numbers as the
//! CPU f32 reference and only the arithmetic differs. Shapes avoid problems whose exact gradient
//! is zero while the computed one is rounding noise (a single key, L = 1), which no relative
//! tolerance can compare.

use mvar::cuda::ops::attention::{self as ca, AttnFamily, AttnKernel, AttnShape};
use mvar::cuda::BufferKind;
use mvar::cuda::{CudaBuffer, CudaDevice};
use mvar::engine::{DType, Device, Generator, Storage, Tensor};
use mvar::ops::{self, AttnMask};
use proptest::prelude::*;

use crate::{config, gpu, parity, randn, tolerance};

/// The side lengths of VAR's token pyramid; a scale of side p holds p * p tokens.
const PYRAMID: [usize; 10] = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16];

fn bf16_exact(t: Tensor) -> Tensor {
    t.to_dtype(DType::BF16)
        .and_then(|b| b.to_dtype(DType::F32))
        .expect("round to bf16")
}

fn randn_b(shape: &[usize], seed: u64) -> Tensor {
    bf16_exact(randn(shape, seed))
}

/// The token counts of the first `n` scales of the pyramid (1, 4, 9, 16, 25, ...).
fn pyramid(n: usize) -> Vec<usize> {
    PYRAMID[..n].iter().map(|p| p * p).collect()
}

/// A mask kind (0 none, 1 block-causal, 2 block-diagonal) and the sequence lengths (Lq, Lk) it
/// implies: for the block masks the first 2..=7 scales of the pyramid (L from 5 to 155, so
/// several tiles that end mid-tile), for no mask any lengths with Lk >= 2 (Lq < Lk is the decode
/// form).
fn mask_and_lengths() -> impl Strategy<Value = (usize, Vec<usize>, usize, usize)> {
    prop_oneof![
        (1usize..150, 2usize..150).prop_map(|(lq, lk)| (0, vec![], lq, lk)),
        (1usize..3, 2usize..=7).prop_map(|(kind, n)| {
            let lens = pyramid(n);
            let l = lens.iter().sum();
            (kind, lens, l, l)
        }),
    ]
}

fn mask_of(kind: usize, lens: &[usize]) -> AttnMask {
    match kind {
        0 => AttnMask::None,
        1 => AttnMask::BlockCausal(lens.to_vec()),
        _ => AttnMask::BlockDiagonal(lens.to_vec()),
    }
}

/// A random additive mask of `shape`: -inf with probability `p_masked`, else a finite bias,
/// with the rows listed in `dead` (over the last-but-one axis) masked entirely.
fn additive_mask(shape: &[usize], seed: u64, p_masked: f64, dead: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let cols = *shape.last().expect("rank >= 1");
    let rows = if shape.len() >= 2 {
        shape[shape.len() - 2]
    } else {
        1
    };
    let mut g = Generator::new(seed);
    let v: Vec<f32> = g
        .uniform(n, 0.0, 1.0)
        .into_iter()
        .enumerate()
        .map(|(i, u)| {
            let row = (i / cols) % rows;
            if dead.contains(&row) || u < p_masked {
                f32::NEG_INFINITY
            } else {
                ((u - 0.5) * 2.0) as f32
            }
        })
        .collect();
    bf16_exact(Tensor::from_vec(v, shape.to_vec(), &Device::Cpu).expect("mask"))
}

fn qkv(b: usize, h: usize, lq: usize, lk: usize, d: usize, dv: usize, seed: u64) -> [Tensor; 3] {
    [
        randn_b(&[b, h, lq, d], seed),
        randn_b(&[b, h, lk, d], seed ^ 1),
        randn_b(&[b, h, lk, dv], seed ^ 2),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn attention_with_every_block_mask_and_none(
        b in 1usize..3,
        h in 1usize..3,
        (kind, lens, lq, lk) in mask_and_lengths(),
        scale in prop::sample::select(vec![0.125, 0.5]),
        seed in any::<u64>(),
    ) {
        let mask = mask_of(kind, &lens);
        parity(
            &format!("attention {mask:?} [{b},{h},{lq}/{lk},64]"),
            |_, x| ops::attention(&x[0], &x[1], &x[2], scale, &mask),
            &qkv(b, h, lq, lk, 64, 64, seed),
        )?;
    }

    #[test]
    fn attention_decode_form(
        b in 1usize..3,
        h in 1usize..4,
        lq in 1usize..20,
        extra in 1usize..300,
        seed in any::<u64>(),
    ) {
        // The newest Lq tokens against every cached token: no mask, Lk >= Lq, several key tiles.
        let lk = lq + extra;
        parity(
            &format!("attention decode [{b},{h},{lq}/{lk},64]"),
            |_, x| ops::attention(&x[0], &x[1], &x[2], 0.125, &AttnMask::None),
            &qkv(b, h, lq, lk, 64, 64, seed),
        )?;
    }

    #[test]
    fn attention_with_other_head_dims(
        d in prop::sample::select(vec![16usize, 32, 48, 96, 128]),
        (kind, lens, lq, lk) in mask_and_lengths(),
        seed in any::<u64>(),
    ) {
        // d <= 64 runs padded in the 64 kernels, 64 < d <= 128 in the 128 ones (where the GPU
        // has the shared memory; else the naive kernels).
        let mask = mask_of(kind, &lens);
        parity(
            &format!("attention {mask:?} [1,2,{lq}/{lk},{d}]"),
            |_, x| ops::attention(&x[0], &x[1], &x[2], 1.0 / (d as f64).sqrt(), &mask),
            &qkv(1, 2, lq, lk, d, d, seed),
        )?;
    }

    #[test]
    fn unmasked_attention_with_wide_heads(
        b in 1usize..3,
        lq in 1usize..70,
        lk in 2usize..70,
        (h, d, dv) in prop_oneof![Just((1usize, 640usize, 640usize)), Just((2, 160, 160)), Just((2, 24, 40))],
        seed in any::<u64>(),
    ) {
        // Heads the fused kernels do not take, unmasked (the tokenizer's one head over all its
        // channels): scores, softmax and P v as library ops on the GPU. At least two keys: with
        // one the softmax is constant, dq and dk are zero in exact arithmetic, and the rounding
        // left of a 640-term product (1.5e-6 in CI's reverse-schedule emulator run) is all a
        // relative comparison would see.
        parity(
            &format!("attention [{b},{h},{lq}/{lk},{d}/{dv}]"),
            |_, x| ops::attention(&x[0], &x[1], &x[2], 1.0 / (d as f64).sqrt(), &AttnMask::None),
            &qkv(b, h, lq, lk, d, dv, seed),
        )?;
    }

    #[test]
    fn attention_with_additive_masks_and_dead_rows(
        b in 1usize..3,
        h in 1usize..3,
        lq in 8usize..80,
        lk in 8usize..80,
        (d, dv) in prop_oneof![Just((64usize, 64usize)), Just((24, 40)), Just((160, 8))],
        form in 0usize..3,
        seed in any::<u64>(),
    ) {
        // Additive masks run on the naive kernels; rows 0 and lq / 2 see no key at all and must
        // give output 0 and gradient 0.
        let dead = [0, lq / 2];
        let shape = match form {
            0 => vec![lq, lk],
            1 => vec![b, 1, lq, lk],
            _ => vec![h, lq, lk],
        };
        let m = additive_mask(&shape, seed ^ 5, 0.3, &dead);
        parity(
            &format!("attention additive {shape:?} [{b},{h},{lq}/{lk},{d}/{dv}]"),
            |dev, x| ops::attention(&x[0], &x[1], &x[2], 0.2, &AttnMask::Additive(m.to_device(dev)?)),
            &qkv(b, h, lq, lk, d, dv, seed),
        )?;
    }
}

#[test]
fn attention_without_keys_gives_zeros() {
    // Lk = 0: every row is fully masked (output 0, gradient 0, no NaN), on the tiled path.
    for lq in [1, 70] {
        parity(
            &format!("attention [2,2,{lq}/0,64]"),
            |_, x| ops::attention(&x[0], &x[1], &x[2], 0.125, &AttnMask::None),
            &qkv(2, 2, lq, 0, 64, 64, 3),
        )
        .unwrap();
    }
    let Some(gpu) = gpu() else { return };
    let [q, k, v] = qkv(1, 1, 5, 0, 64, 64, 4).map(|t| t.to_device(&gpu).unwrap());
    let out = ops::attention(&q, &k, &v, 0.125, &AttnMask::None)
        .unwrap()
        .to_vec_f64()
        .unwrap();
    assert!(out.iter().all(|&x| x == 0.0), "{out:?}");
}

#[test]
fn var_d16_block_causal_shape() {
    // The full 10-scale pyramid (L = 680) of VAR-d16, two heads: 11 tiles per side.
    let lens = pyramid(10);
    let l: usize = lens.iter().sum();
    let mask = AttnMask::BlockCausal(lens);
    parity(
        "attention block-causal [1,2,680,64]",
        |_, x| ops::attention(&x[0], &x[1], &x[2], 0.25 / 8.0, &mask),
        &qkv(1, 2, l, l, 64, 64, 11),
    )
    .unwrap();
}

#[test]
fn attention_wide_logits() {
    // Queries six times larger: scores spread over tens of log2 units, so the forward's running
    // max passes its slack after the first tile and O is rescaled mid-row (a 200-key row is four
    // tiles; the block-causal pyramid's last scales span three).
    let lens = pyramid(7);
    let l: usize = lens.iter().sum();
    for (name, mask, lq, lk) in [
        ("none", AttnMask::None, 70, 200),
        ("block-causal", AttnMask::BlockCausal(lens), l, l),
    ] {
        let [q, k, v] = qkv(1, 2, lq, lk, 64, 64, 21);
        let q = bf16_exact(ops::affine(&q, 6.0, 0.0).unwrap());
        parity(
            &format!("attention {name} [1,2,{lq}/{lk},64] wide logits"),
            |_, x| ops::attention(&x[0], &x[1], &x[2], 0.125, &mask),
            &[q, k, v],
        )
        .unwrap();
    }
}

// ------------------------------------------------------------------------------------------------
// tiled against naive on the GPU

/// A device copy of a GPU tensor's buffer.
fn buffer(t: &Tensor) -> CudaBuffer {
    let Device::Cuda(dev) = t.device() else {
        panic!("expected a GPU tensor")
    };
    match &*t.storage() {
        Storage::Cuda(b) => dev.duplicate(b).expect("copy"),
        Storage::Cpu(_) => panic!("expected a GPU buffer"),
    }
}

fn values(buf: CudaBuffer, gpu: &Device) -> Vec<f64> {
    let n = buf.len();
    Tensor::from_storage(Storage::Cuda(buf), [n], gpu)
        .and_then(|t| t.to_vec_f64())
        .expect("download")
}

/// The largest |x| of some vectors (at least 1e-6).
fn max_abs(vs: &[&Vec<f64>]) -> f64 {
    vs.iter()
        .flat_map(|v| v.iter())
        .fold(1e-6f64, |m, v| m.max(v.abs()))
}

/// `got` within `tol` x `scale` of `want`, element by element.
fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64, scale: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    // Equal infinities (the lse of a row that sees nothing) agree.
    let err = mvar::ops::testing::max_abs_diff(got, want);
    assert!(
        err <= tol * scale,
        "{what}: differs by {err:e} (> {tol:e} x {scale:e})"
    );
}

/// Forward and backward of one call with `kernel`: [out, lse, dq, dk, dv] as f64.
#[allow(clippy::too_many_arguments)]
fn run_kernel(
    dev: &CudaDevice,
    gpu: &Device,
    x: &[CudaBuffer; 4],
    shape: AttnShape,
    mask: &ca::AttnMask<'_>,
    kernel: AttnKernel,
) -> Vec<Vec<f64>> {
    let [q, k, v, g] = x;
    let (o, lse) = ca::attention_forward(dev, q, k, v, shape, 0.3, mask, kernel).expect("forward");
    let (dq, dk, dv) = ca::attention_backward(dev, g, q, k, v, &o, &lse, shape, 0.3, mask, kernel)
        .expect("backward");
    [o, lse, dq, dk, dv]
        .into_iter()
        .map(|b| values(b, gpu))
        .collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn tiled_and_mma_kernels_match_the_naive_kernels(
        b in 1usize..3,
        h in 1usize..3,
        (kind, lens, lq, lk) in mask_and_lengths(),
        d in prop::sample::select(vec![64usize, 64, 40, 128]),
        seed in any::<u64>(),
    ) {
        let Some(gpu) = gpu() else { return Ok(()) };
        let Device::Cuda(dev) = &gpu else { unreachable!() };
        let shape = AttnShape { batch: b, heads: h, lq, lk, d, dv: d };
        let mask = match kind {
            0 => ca::AttnMask::None,
            1 => ca::AttnMask::BlockCausal(&lens),
            _ => ca::AttnMask::BlockDiagonal(&lens),
        };
        let [q, k, v] = qkv(b, h, lq, lk, d, d, seed);
        let g = randn_b(&[b, h, lq, d], seed ^ 9);
        for dtype in [DType::F32, DType::BF16] {
            let kind = if dtype == DType::BF16 { BufferKind::BF16 } else { BufferKind::F32 };
            // Each fast family where this GPU has what it needs (shared memory, sm_80 for mma).
            let fast: Vec<AttnKernel> = [AttnKernel::Tiled, AttnKernel::Mma]
                .into_iter()
                .filter(|&k| ca::family(dev, kind, &shape, &mask, k).is_ok())
                .collect();
            if fast.is_empty() {
                continue;
            }
            let x = [&q, &k, &v, &g].map(|t| buffer(&t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap()));
            let naive = run_kernel(dev, &gpu, &x, shape, &mask, AttnKernel::Naive);
            let tol = tolerance(dtype);
            // The gradients share one scale, the largest of the three: dq and dk are sums over
            // keys and queries of the same score gradients, and where those cancel (one query
            // over a hundred keys) a gradient can be ten times smaller than the terms whose
            // rounding it carries (the mma kernels round them to bf16 for the tensor cores).
            let grad_scale = max_abs(&[&naive[2], &naive[3], &naive[4]]);
            for kernel in fast {
                let got = run_kernel(dev, &gpu, &x, shape, &mask, kernel);
                for (i, (name, (t, n))) in ["out", "lse", "dq", "dk", "dv"].iter().zip(got.iter().zip(&naive)).enumerate() {
                    let scale = if i >= 2 { grad_scale } else { max_abs(&[n]) };
                    assert_close(&format!("{kernel:?} {name} {dtype} {mask:?} [{b},{h},{lq}/{lk},{d}]"), t, n, tol, scale);
                }
            }
        }
    }
}

#[test]
fn bf16_runs_on_the_tensor_cores_where_they_apply() {
    let Some(gpu) = gpu() else { return };
    let Device::Cuda(dev) = &gpu else {
        unreachable!()
    };
    let (major, _) = dev.compute_capability();
    let shape = |d: usize, dv: usize| AttnShape {
        batch: 2,
        heads: 2,
        lq: 30,
        lk: 30,
        d,
        dv,
    };
    let lens = [1, 4, 25];
    let causal = ca::AttnMask::BlockCausal(&lens);
    let fam = |kind, s: AttnShape, kernel| ca::family(dev, kind, &s, &causal, kernel);
    if major >= 8 {
        assert_eq!(
            fam(BufferKind::BF16, shape(64, 64), AttnKernel::Auto),
            Ok(AttnFamily::Mma(64))
        );
        assert_eq!(
            fam(BufferKind::BF16, shape(40, 40), AttnKernel::Auto),
            Ok(AttnFamily::Mma(64))
        );
    }
    // f32, head dims that are not a multiple of 8 and v head dims unlike q's do not take them.
    assert_eq!(
        fam(BufferKind::F32, shape(64, 64), AttnKernel::Auto),
        Ok(AttnFamily::Tiled(64))
    );
    assert_eq!(
        fam(BufferKind::BF16, shape(20, 20), AttnKernel::Auto),
        Ok(AttnFamily::Tiled(64))
    );
    for (kind, s) in [
        (BufferKind::F32, shape(64, 64)),
        (BufferKind::BF16, shape(20, 20)),
        (BufferKind::BF16, shape(64, 32)),
    ] {
        let err = fam(kind, s, AttnKernel::Mma).unwrap_err();
        assert!(err.contains("mma kernels"), "{err}");
    }
}

#[test]
fn the_tiled_kernels_refuse_what_they_do_not_compute() {
    let Some(gpu) = gpu() else { return };
    let Device::Cuda(dev) = &gpu else {
        unreachable!()
    };
    let x = [randn(&[1, 1, 4, 8], 1), randn(&[1, 1, 4, 8], 2)]
        .map(|t| buffer(&t.to_device(&gpu).unwrap()));
    let m = buffer(&randn(&[4, 4], 3).to_device(&gpu).unwrap());
    let shape = AttnShape {
        batch: 1,
        heads: 1,
        lq: 4,
        lk: 4,
        d: 8,
        dv: 8,
    };
    let additive = ca::AttnMask::Additive {
        values: &m,
        strides: [0, 0, 4, 1],
    };
    let err = ca::attention_forward(
        dev,
        &x[0],
        &x[1],
        &x[1],
        shape,
        1.0,
        &additive,
        AttnKernel::Tiled,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("additive"), "{err}");
    // A mask stride reaching past the mask is an error, not an out-of-bounds read.
    let bad = ca::AttnMask::Additive {
        values: &m,
        strides: [0, 0, 5, 1],
    };
    assert!(
        ca::attention_forward(dev, &x[0], &x[1], &x[1], shape, 1.0, &bad, AttnKernel::Auto)
            .is_err()
    );
    // Scale lengths that do not add up to L.
    assert!(ca::attention_forward(
        dev,
        &x[0],
        &x[1],
        &x[1],
        shape,
        1.0,
        &ca::AttnMask::BlockCausal(&[1, 2]),
        AttnKernel::Auto
    )
    .is_err());
}
