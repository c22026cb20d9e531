//! AdamW, gradient clipping, dropout and drop-path on the GPU against the CPU reference.
//!
//! The AdamW kernel rounds every operation as the CPU's f32 code does, so f32 parameters and
//! moments agree to the last bits; the masks of dropout and drop-path must be identical (same
//! Philox stream), and the generator must end in the same state.

use std::collections::BTreeMap;

use mvar::engine::cuda::ops::optim as cuda_optim;
use mvar::engine::cuda::BufferKind;
use mvar::engine::{DType, Device, Generator, ParamStore, Storage, Tensor};
use mvar::ops::{self, clip_grad_norm, AdamW, AdamWConfig};
use proptest::prelude::*;

use crate::{config, gpu, parity, randn};

/// Largest |a - b| relative to the largest |b| (at least 1e-6).
fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    mvar::ops::testing::max_abs_diff(a, b) / scale
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().expect("read back")
}

/// A parameter store on `device` with one parameter per length (`tied` registers parameter 0
/// a second time under another name, sharing its storage, as tied weights do).
fn store(lens: &[usize], seed: u64, tied: bool, device: &Device) -> ParamStore {
    let mut ps = ParamStore::new();
    for (i, &n) in lens.iter().enumerate() {
        let t = randn(&[n], seed ^ (i as u64 + 1))
            .to_device(device)
            .unwrap();
        ps.insert(format!("p{i}"), &t).unwrap();
    }
    if tied && !lens.is_empty() {
        let t = ps.get("p0").unwrap().detach();
        ps.insert("tied", &t).unwrap();
    }
    ps
}

/// Gives every parameter but the ones at `skip` positions a gradient drawn from (seed, step).
fn set_grads(ps: &ParamStore, seed: u64, step: u64, skip: usize) {
    for (i, (_, p)) in ps.iter().enumerate() {
        if skip > 0 && i % skip == skip - 1 {
            p.zero_grad();
            continue;
        }
        let g = randn(p.dims(), seed ^ (step << 20) ^ (i as u64 * 7919))
            .to_device(p.device())
            .unwrap();
        p.set_grad(Some(g)).unwrap();
    }
}

fn params_of(ps: &ParamStore) -> Vec<Vec<f64>> {
    ps.iter().map(|(_, p)| f64s(p)).collect()
}

fn check_close(
    what: &str,
    got: &[Vec<f64>],
    want: &[Vec<f64>],
    tol: f64,
) -> Result<(), TestCaseError> {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = rel(g, w);
        prop_assert!(
            e <= tol,
            "{what} {i}: GPU differs from the CPU by {e:e} (> {tol:e})"
        );
    }
    Ok(())
}

fn moments_close(
    got: &BTreeMap<String, ops::Moments>,
    want: &BTreeMap<String, ops::Moments>,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, w) in want {
        let g = &got[name];
        prop_assert_eq!(g.m.dtype(), DType::F32);
        let e = rel(&g.m.to_f64_vec(), &w.m.to_f64_vec())
            .max(rel(&g.v.to_f64_vec(), &w.v.to_f64_vec()));
        prop_assert!(e <= 1e-6, "moments of {name} differ by {e:e}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn adamw_steps_match_the_cpu(
        lens in prop::collection::vec(1usize..700, 1..6),
        tied in any::<bool>(),
        skip in 0usize..4,
        wd in 0.0f64..0.2,
        seed in any::<u64>(),
    ) {
        let Some(gpu) = gpu() else { return Ok(()) };
        let cfg = AdamWConfig { lr: 1e-2, weight_decay: wd, ..AdamWConfig::default() };
        let no_decay = |name: &str, _: &Tensor| name.ends_with('1');
        let cpu_ps = store(&lens, seed, tied, &Device::Cpu);
        let gpu_ps = store(&lens, seed, tied, &gpu);
        let mut cpu_opt = AdamW::new(&cpu_ps, cfg, no_decay).unwrap();
        let mut gpu_opt = AdamW::new(&gpu_ps, cfg, no_decay).unwrap();
        for step in 0..3 {
            set_grads(&cpu_ps, seed, step, skip);
            set_grads(&gpu_ps, seed, step, skip);
            cpu_opt.step(&cpu_ps).unwrap();
            gpu_opt.step(&gpu_ps).unwrap();
        }
        check_close("parameter", &params_of(&gpu_ps), &params_of(&cpu_ps), 1e-6)?;
        moments_close(&gpu_opt.state().unwrap(), &cpu_opt.state().unwrap())?;

        // A checkpoint round trip: host moments loaded into a fresh optimizer go back to the
        // GPU and the run continues exactly as the uninterrupted CPU run.
        let mut resumed = AdamW::new(&gpu_ps, cfg, no_decay).unwrap();
        resumed.load_state(gpu_opt.step_count(), gpu_opt.state().unwrap());
        set_grads(&cpu_ps, seed, 9, skip);
        set_grads(&gpu_ps, seed, 9, skip);
        cpu_opt.step(&cpu_ps).unwrap();
        resumed.step(&gpu_ps).unwrap();
        check_close("resumed parameter", &params_of(&gpu_ps), &params_of(&cpu_ps), 1e-6)?;
        moments_close(&resumed.state().unwrap(), &cpu_opt.state().unwrap())?;
    }

    #[test]
    fn clipping_matches_the_cpu(
        lens in prop::collection::vec(1usize..1500, 1..5),
        max_norm in 0.5f64..60.0,
        bf16 in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let Some(gpu) = gpu() else { return Ok(()) };
        let dtype = if bf16 { DType::BF16 } else { DType::F32 };
        let make = |device: &Device| {
            let mut ps = ParamStore::new();
            for (i, &n) in lens.iter().enumerate() {
                let p = Tensor::zeros([n], dtype, device).unwrap();
                let p = ps.insert(format!("p{i}"), &p).unwrap();
                let g = randn(&[n], seed ^ i as u64).to_dtype(dtype).unwrap().to_device(device).unwrap();
                p.set_grad(Some(g)).unwrap();
            }
            ps
        };
        let (cpu_ps, gpu_ps) = (make(&Device::Cpu), make(&gpu));
        let want = clip_grad_norm(&cpu_ps, max_norm).unwrap();
        let got = clip_grad_norm(&gpu_ps, max_norm).unwrap();
        prop_assert!((got - want).abs() <= 1e-5 * want, "norm {got} vs {want}");
        let grads = |ps: &ParamStore| ps.iter().map(|(_, p)| f64s(&p.grad().unwrap())).collect::<Vec<_>>();
        let tol = if bf16 { 1e-2 } else { 1e-6 };
        check_close("clipped gradient", &grads(&gpu_ps), &grads(&cpu_ps), tol)?;
    }

    #[test]
    fn dropout_and_drop_path_match_the_cpu(
        s in prop::collection::vec(1usize..9, 1..4),
        big in any::<bool>(),
        p in 0.05f64..0.95,
        seed in any::<u64>(),
    ) {
        // Sizes beyond one block of threads, not multiples of 256 or of 4 (Philox words).
        let shape = if big { vec![3, 257, s[0]] } else { s };
        let x = randn(&shape, seed);
        parity("dropout", |_, x| ops::dropout(&x[0], p, &mut Generator::new(seed)), std::slice::from_ref(&x))?;
        parity("drop_path", |_, x| ops::drop_path(&x[0], p, &mut Generator::new(seed)), std::slice::from_ref(&x))?;
    }

    #[test]
    fn masks_and_generator_states_are_identical(
        s in prop::collection::vec(1usize..40, 1..4),
        p in 0.05f64..0.95,
        skip in 0usize..9,
        seed in any::<u64>(),
    ) {
        let Some(gpu) = gpu() else { return Ok(()) };
        let x = randn(&s, seed);
        let xg = x.to_device(&gpu).unwrap();
        for path in [false, true] {
            let mut cpu_rng = Generator::new(seed);
            cpu_rng.next_u32s(skip);
            let mut gpu_rng = cpu_rng.clone();
            let op = |x: &Tensor, rng: &mut Generator| if path { ops::drop_path(x, p, rng) } else { ops::dropout(x, p, rng) };
            let want = f64s(&op(&x, &mut cpu_rng).unwrap());
            let got = f64s(&op(&xg, &mut gpu_rng).unwrap());
            let kept = |v: &[f64]| v.iter().map(|&a| a != 0.0).collect::<Vec<_>>();
            prop_assert_eq!(kept(&got), kept(&want), "mask (drop_path: {})", path);
            prop_assert!(rel(&got, &want) <= 1e-6);
            prop_assert_eq!(gpu_rng.state(), cpu_rng.state());
        }
    }
}

/// Drop-path over samples of whole 16-byte vectors (48 and 1024 elements per sample, as in a
/// transformer's [B, L, C]) runs in the vector kernel, one decision per vector; 12 elements per
/// sample take it for f32 (3 vectors) but not for bf16 (8 per vector).
#[test]
fn drop_path_over_whole_vectors_matches_the_cpu() {
    for (i, shape) in [[7usize, 3, 16], [5, 4, 256], [9, 3, 4]].iter().enumerate() {
        for p in [0.3, 0.7] {
            let seed = 40 + i as u64;
            let x = randn(shape, seed);
            parity(
                &format!("drop_path {shape:?} p {p}"),
                |_, x| ops::drop_path(&x[0], p, &mut Generator::new(seed)),
                std::slice::from_ref(&x),
            )
            .unwrap();
        }
    }
}

#[test]
fn adamw_reads_bf16_gradients() {
    let Some(gpu) = gpu() else { return };
    let Device::Cuda(dev) = &gpu else {
        unreachable!()
    };
    let n = 1031;
    let p0 = randn(&[n], 1);
    let g16 = randn(&[n], 2).to_dtype(DType::BF16).unwrap();
    // Copied to the GPU first: the CPU step below updates p0's storage in place.
    let param = p0.to_device(&gpu).unwrap();
    let grad = g16.to_device(&gpu).unwrap();
    // The CPU reference sees the gradient the GPU reads: bf16 widened exactly to f32.
    let cfg = AdamWConfig::default();
    let mut ps = ParamStore::new();
    let p = ps.insert("w", &p0).unwrap();
    p.set_grad(Some(g16.to_dtype(DType::F32).unwrap())).unwrap();
    AdamW::new(&ps, cfg, |_, _| false)
        .unwrap()
        .step(&ps)
        .unwrap();
    let want = f64s(&p);

    let m = dev.zeros(BufferKind::F32, n).unwrap();
    let v = dev.zeros(BufferKind::F32, n).unwrap();
    let (b1, b2) = (1.0 - cfg.beta1, 1.0 - cfg.beta2);
    let hyper = cuda_optim::AdamWHyper {
        decay: (1.0 - cfg.lr * cfg.weight_decay) as f32,
        beta1: cfg.beta1 as f32,
        beta2: cfg.beta2 as f32,
        one_minus_beta1: b1 as f32,
        one_minus_beta2: b2 as f32,
        step_size: (cfg.lr / b1) as f32,
        bias2_sqrt: b2.sqrt() as f32,
        eps: cfg.eps as f32,
    };
    {
        let (ps_, gs_) = (param.storage(), grad.storage());
        let (Storage::Cuda(pb), Storage::Cuda(gb)) = (&*ps_, &*gs_) else {
            unreachable!()
        };
        let t = cuda_optim::AdamWTensor {
            param: pb,
            grad: gb,
            m: &m,
            v: &v,
            decay: true,
        };
        cuda_optim::adamw_step(dev, &[t], &hyper).unwrap();
        // A wrong kind is an error, not a launch.
        let bad = cuda_optim::AdamWTensor { param: gb, ..t };
        assert!(cuda_optim::adamw_step(dev, &[bad], &hyper).is_err());
    }
    let e = rel(&f64s(&param), &want);
    assert!(e <= 1e-6, "bf16-gradient step differs by {e:e}");
}

#[test]
fn clipping_a_non_finite_norm_leaves_the_gradients_alone() {
    let Some(gpu) = gpu() else { return };
    let mut ps = ParamStore::new();
    let a = ps
        .insert("a", &Tensor::zeros([300], DType::F32, &gpu).unwrap())
        .unwrap();
    let mut g = vec![1.0f32; 300];
    g[257] = f32::INFINITY;
    a.set_grad(Some(Tensor::from_vec(g.clone(), [300], &gpu).unwrap()))
        .unwrap();
    assert!(clip_grad_norm(&ps, 1.0).unwrap().is_infinite());
    assert_eq!(a.grad().unwrap().to_vec::<f32>().unwrap(), g);
    g[3] = f32::NAN;
    a.set_grad(Some(Tensor::from_vec(g, [300], &gpu).unwrap()))
        .unwrap();
    assert!(clip_grad_norm(&ps, 1.0).unwrap().is_nan());
    // Gradients whose squares overflow f32 still give the finite norm the CPU gives.
    let big = vec![1e20f32; 4];
    a.set_grad(None).unwrap();
    let b = ps
        .insert("b", &Tensor::zeros([4], DType::F32, &gpu).unwrap())
        .unwrap();
    b.set_grad(Some(Tensor::from_vec(big, [4], &gpu).unwrap()))
        .unwrap();
    let norm = clip_grad_norm(&ps, 1.0).unwrap();
    assert!((norm - 2e20).abs() <= 1e-6 * 2e20, "{norm}");
}

/// The gradient norm does not depend on the order in which the GPU's blocks finish: the sum of
/// squares adds one partial per block in block order. The gradient is built so that order shows:
/// 2048 elements are 8 blocks of 256 (one element per thread), block 0 holds 2^27 (square 2^54,
/// where a double's spacing is 4) and blocks 1-7 one 1.0 each. In block order every 1 rounds away
/// and the norm is 2^27 exactly; summed last-block-first (the emulator's reverse schedule, or any
/// finishing order on hardware, as an atomic accumulation would), the ones add up to 8 first and
/// the norm is 2^27 + 2^-25. A training run's clipping, and so its weights, then repeat to the bit.
#[test]
fn the_gradient_norm_is_summed_in_a_fixed_order() {
    let Some(gpu) = gpu() else { return };
    let mut g = vec![0.0f32; 2048];
    g[0] = (1u64 << 27) as f32;
    for b in 1..8 {
        g[256 * b] = 1.0;
    }
    let mut ps = ParamStore::new();
    let a = ps
        .insert("a", &Tensor::zeros([2048], DType::F32, &gpu).unwrap())
        .unwrap();
    a.set_grad(Some(Tensor::from_vec(g, [2048], &gpu).unwrap()))
        .unwrap();
    // A max norm above the norm: nothing is clipped, only the norm is read.
    let norms: Vec<f64> = (0..3).map(|_| clip_grad_norm(&ps, 1e9).unwrap()).collect();
    for n in &norms {
        assert_eq!(
            n.to_bits(),
            ((1u64 << 27) as f64).to_bits(),
            "norm {n:?}: expected 2^27 exactly (partials added in block order), got {:e} more",
            n - (1u64 << 27) as f64
        );
    }
}
