use mvar::engine::{DType, Device, ParamStore, Tensor};
use mvar::ops::{self, clip_grad_norm, AdamW, AdamWConfig};

#[test]
fn adamw_first_step_matches_the_closed_form() {
    // At t = 1 the bias-corrected ratio m_hat / sqrt(v_hat) is g / |g|, so
    // p1 = p0 (1 - lr wd) - lr g / (|g| + eps) exactly (up to rounding).
    let mut ps = ParamStore::new();
    let w = ps
        .insert(
            "w",
            &Tensor::from_vec(vec![1.0f64, -2.0, 0.5], [3], &Device::Cpu).unwrap(),
        )
        .unwrap();
    let b = ps
        .insert(
            "b",
            &Tensor::from_vec(vec![0.3f64], [1], &Device::Cpu).unwrap(),
        )
        .unwrap();
    let cfg = AdamWConfig {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.5,
    };
    let mut opt = AdamW::new(&ps, cfg, |name, _| name == "b").unwrap();
    let g = [0.2f64, -3.0, 1e-3];
    w.set_grad(Some(Tensor::from_slice(&g, [3], &Device::Cpu).unwrap()))
        .unwrap();
    b.set_grad(Some(
        Tensor::from_slice(&[4.0f64], [1], &Device::Cpu).unwrap(),
    ))
    .unwrap();
    opt.step(&ps).unwrap();
    let got = w.to_vec::<f64>().unwrap();
    for ((p0, gi), p1) in [1.0, -2.0, 0.5].iter().zip(g).zip(got) {
        let want = p0 * (1.0 - 0.1 * 0.5) - 0.1 * gi / (gi.abs() + 1e-8);
        assert!((p1 - want).abs() < 1e-12, "{p1} vs {want}");
    }
    // "b" is in the no-decay set: only the Adam step applies.
    let want_b = 0.3 - 0.1 * 4.0 / (4.0 + 1e-8);
    assert!((b.to_vec::<f64>().unwrap()[0] - want_b).abs() < 1e-12);
    assert_eq!(opt.step_count(), 1);
    assert_eq!(opt.state().unwrap().len(), 2);
}

#[test]
fn adamw_second_step_matches_a_hand_computation() {
    let mut ps = ParamStore::new();
    let w = ps
        .insert(
            "w",
            &Tensor::from_vec(vec![1.0f64], [1], &Device::Cpu).unwrap(),
        )
        .unwrap();
    let cfg = AdamWConfig {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(&ps, cfg, |_, _| false).unwrap();
    let (mut p, mut m, mut v) = (1.0f64, 0.0, 0.0);
    for (t, g) in [(1, 0.5f64), (2, -0.25)] {
        w.set_grad(Some(Tensor::from_slice(&[g], [1], &Device::Cpu).unwrap()))
            .unwrap();
        opt.step(&ps).unwrap();
        p *= 1.0 - 0.01 * 0.1;
        m = 0.9 * m + 0.1 * g;
        v = 0.99 * v + 0.01 * g * g;
        let (b1, b2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.99f64.powi(t));
        p -= (0.01 / b1) * m / (v.sqrt() / b2.sqrt() + 1e-8);
    }
    assert!((w.to_vec::<f64>().unwrap()[0] - p).abs() < 1e-14);
}

/// The threaded path (a parameter of many chunks, the last one partial) follows the same
/// per-element recurrence over three steps, moments carried between them; and a gradient that
/// is the parameter's own storage (which the step reads in place otherwise) still works.
#[test]
fn adamw_large_parameters_and_a_gradient_sharing_the_parameter_storage() {
    let n = 3 * 16 * 1024 + 123;
    let init: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) / 50.0).collect();
    let grads: Vec<Vec<f32>> = (0..3)
        .map(|s| {
            (0..n)
                .map(|i| (((i * 7 + s * 13) % 89) as f32 - 44.0) / 30.0)
                .collect()
        })
        .collect();
    let cfg = AdamWConfig {
        lr: 0.05,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut ps = ParamStore::new();
    let w = ps
        .insert("w", &Tensor::from_slice(&init, [n], &Device::Cpu).unwrap())
        .unwrap();
    let mut opt = AdamW::new(&ps, cfg, |_, _| false).unwrap();
    let (mut p, mut m, mut v) = (init.clone(), vec![0.0f32; n], vec![0.0f32; n]);
    for (t, g) in grads.iter().enumerate() {
        w.set_grad(Some(Tensor::from_slice(g, [n], &Device::Cpu).unwrap()))
            .unwrap();
        opt.step(&ps).unwrap();
        let t = t as i32 + 1;
        // The kernel's constants, rounded from f64 as it rounds them, and its operation order.
        let step_size = (0.05 / (1.0 - 0.9f64.powi(t))) as f32;
        let bias2_sqrt = (1.0 - 0.95f64.powi(t)).sqrt() as f32;
        let (decay, one_b1, one_b2) = (
            (1.0 - 0.05 * 0.1f64) as f32,
            (1.0 - 0.9f64) as f32,
            (1.0 - 0.95f64) as f32,
        );
        for i in 0..n {
            p[i] *= decay;
            m[i] = 0.9 * m[i] + one_b1 * g[i];
            v[i] = 0.95 * v[i] + one_b2 * g[i] * g[i];
            p[i] -= step_size * m[i] / (v[i].sqrt() / bias2_sqrt + 1e-8);
        }
    }
    assert_eq!(w.to_vec::<f32>().unwrap(), p, "three steps of {n} elements");

    // The gradient is the parameter itself: g = p, so the first step moves each element by
    // lr * sign(p) (after the decay), as in the closed form above.
    let mut ps = ParamStore::new();
    let x = ps
        .insert(
            "x",
            &Tensor::from_vec(vec![0.5f64, -2.0], [2], &Device::Cpu).unwrap(),
        )
        .unwrap();
    x.set_grad(Some(x.clone())).unwrap();
    let mut opt = AdamW::new(&ps, cfg, |_, _| false).unwrap();
    opt.step(&ps).unwrap();
    let got = x.to_vec::<f64>().unwrap();
    for (p0, p1) in [0.5f64, -2.0].iter().zip(got) {
        let want = p0 * (1.0 - 0.05 * 0.1) - 0.05 * p0 / (p0.abs() + 1e-8);
        assert!((p1 - want).abs() < 1e-12, "{p1} vs {want}");
    }
}

#[test]
fn adamw_minimises_a_quadratic() {
    let mut ps = ParamStore::new();
    let x = ps
        .insert(
            "x",
            &Tensor::from_vec(vec![3.0f32, -4.0], [2], &Device::Cpu).unwrap(),
        )
        .unwrap();
    let cfg = AdamWConfig {
        lr: 0.1,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(&ps, cfg, |_, _| false).unwrap();
    for _ in 0..300 {
        ps.zero_grad();
        ops::sum_all(&ops::square(&x).unwrap())
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&ps).unwrap();
    }
    assert!(
        x.to_vec::<f32>().unwrap().iter().all(|v| v.abs() < 0.05),
        "{:?}",
        x.to_vec::<f32>()
    );
}

#[test]
fn adamw_rejects_bad_settings_and_bf16_master_weights() {
    let mut ps = ParamStore::new();
    let bad = AdamWConfig {
        beta1: 1.0,
        ..AdamWConfig::default()
    };
    assert!(AdamW::new(&ps, bad, |_, _| false)
        .unwrap_err()
        .to_string()
        .contains("AdamW"));
    let w = ps
        .insert("w", &Tensor::zeros([2], DType::BF16, &Device::Cpu).unwrap())
        .unwrap();
    w.set_grad(Some(Tensor::zeros([2], DType::BF16, &Device::Cpu).unwrap()))
        .unwrap();
    let mut opt = AdamW::new(&ps, AdamWConfig::default(), |_, _| false).unwrap();
    let err = opt.step(&ps).unwrap_err().to_string();
    assert!(err.contains("\"w\"") && err.contains("f32"), "{err}");
}

#[test]
fn clipping_scales_all_gradients_together() {
    let mut ps = ParamStore::new();
    let a = ps
        .insert("a", &Tensor::zeros([2], DType::F64, &Device::Cpu).unwrap())
        .unwrap();
    let b = ps
        .insert("b", &Tensor::zeros([1], DType::F64, &Device::Cpu).unwrap())
        .unwrap();
    a.set_grad(Some(
        Tensor::from_slice(&[3.0f64, 0.0], [2], &Device::Cpu).unwrap(),
    ))
    .unwrap();
    b.set_grad(Some(
        Tensor::from_slice(&[4.0f64], [1], &Device::Cpu).unwrap(),
    ))
    .unwrap();
    let norm = clip_grad_norm(&ps, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-12);
    let coef = 1.0 / (5.0 + 1e-6);
    assert!((a.grad().unwrap().to_vec::<f64>().unwrap()[0] - 3.0 * coef).abs() < 1e-12);
    assert!((b.grad().unwrap().to_vec::<f64>().unwrap()[0] - 4.0 * coef).abs() < 1e-12);
    // Below the threshold nothing changes.
    let norm2 = clip_grad_norm(&ps, 10.0).unwrap();
    assert!((norm2 - 1.0).abs() < 1e-5);
    assert!((b.grad().unwrap().to_vec::<f64>().unwrap()[0] - 4.0 * coef).abs() < 1e-12);
    // A NaN gradient is reported, not spread.
    b.set_grad(Some(
        Tensor::from_slice(&[f64::NAN], [1], &Device::Cpu).unwrap(),
    ))
    .unwrap();
    assert!(clip_grad_norm(&ps, 1.0).unwrap().is_nan());
    assert!(clip_grad_norm(&ps, 0.0).is_err());
}
