//! Autocast: inside the scope the compute-heavy ops run in bf16 on f32 inputs and return f32,
//! gradients reach the f32 leaves as f32, and outside it nothing changes.

use mvar::engine::{autocast, DType, Device, Generator, Tensor};
use mvar::ops;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(
        shape.to_vec(),
        0.0,
        1.0,
        DType::F32,
        &Device::Cpu,
        &mut Generator::new(seed),
    )
    .unwrap()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.to_vec_f32().unwrap()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    mvar::ops::testing::max_abs_diff_f32(a, b) / scale
}

#[test]
fn linear_under_autocast_is_the_bf16_chain_exactly_with_f32_gradients() {
    let (x, w, b) = (randn(&[6, 32], 1), randn(&[16, 32], 2), randn(&[16], 3));
    let leaves = |t: &Tensor| t.with_grad().unwrap();
    // Under autocast.
    let (xa, wa, ba) = (leaves(&x), leaves(&w), leaves(&b));
    let ya = {
        let _ac = autocast(Some(DType::BF16)).unwrap();
        ops::linear(&xa, &wa, Some(&ba)).unwrap()
    };
    assert_eq!(ya.dtype(), DType::F32);
    ops::sum_all(&ops::square(&ya).unwrap())
        .unwrap()
        .backward()
        .unwrap();
    // The same thing spelled out: cast, bf16 GEMM, cast back, f32 bias.
    let (xe, we, be) = (leaves(&x), leaves(&w), leaves(&b));
    let ye = ops::add(
        &ops::matmul_t(
            &xe.to_dtype(DType::BF16).unwrap(),
            &we.to_dtype(DType::BF16).unwrap(),
            false,
            true,
        )
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap(),
        &be,
    )
    .unwrap();
    ops::sum_all(&ops::square(&ye).unwrap())
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(vals(&ya), vals(&ye));
    for (a, e) in [(&xa, &xe), (&wa, &we), (&ba, &be)] {
        let (ga, ge) = (a.grad().unwrap(), e.grad().unwrap());
        assert_eq!(ga.dtype(), DType::F32);
        assert_eq!(vals(&ga), vals(&ge));
    }
    // And it is not the f32 result (the inputs really went through bf16), though close to it.
    let y32 = ops::linear(&x, &w, Some(&b)).unwrap();
    let rel = max_rel(&vals(&ya), &vals(&y32));
    assert!(rel > 0.0 && rel < 2e-2, "relative difference {rel}");
}

#[test]
fn attention_conv_and_na2d_run_in_bf16_and_return_f32() {
    let check = |name: &str, inputs: Vec<Tensor>, f: &dyn Fn(&[Tensor]) -> Tensor| {
        let exact = f(&inputs);
        let leaves: Vec<Tensor> = inputs.iter().map(|t| t.with_grad().unwrap()).collect();
        let y = {
            let _ac = autocast(Some(DType::BF16)).unwrap();
            f(&leaves)
        };
        assert_eq!(y.dtype(), DType::F32, "{name}");
        let rel = max_rel(&vals(&y), &vals(&exact));
        assert!(rel > 0.0 && rel < 3e-2, "{name}: relative difference {rel}");
        ops::sum_all(&y).unwrap().backward().unwrap();
        for l in &leaves {
            let g = l.grad().unwrap();
            assert_eq!(g.dtype(), DType::F32, "{name}");
            assert!(vals(&g).iter().all(|v| v.is_finite()), "{name}");
        }
    };
    let qkv = |shape: &[usize], s: u64| (0..3).map(|i| randn(shape, s + i)).collect();
    check("attention", qkv(&[1, 2, 10, 16], 10), &|t| {
        ops::attention(
            &t[0],
            &t[1],
            &t[2],
            0.25,
            &ops::AttnMask::BlockCausal(vec![1, 4, 5]),
        )
        .unwrap()
    });
    check("na2d", qkv(&[1, 2, 5, 6, 16], 20), &|t| {
        ops::na2d(&t[0], &t[1], &t[2], 3, 0.25).unwrap()
    });
    check(
        "conv2d",
        vec![
            randn(&[2, 4, 6, 6], 30),
            randn(&[8, 4, 3, 3], 31),
            randn(&[8], 32),
        ],
        &|t| ops::conv2d(&t[0], &t[1], Some(&t[2]), (1, 1), ops::Padding::same(1)).unwrap(),
    );
}

#[test]
fn outside_the_scope_and_for_non_f32_inputs_nothing_is_cast() {
    let (a, b) = (randn(&[4, 8], 40), randn(&[8, 3], 41));
    let plain = vals(&ops::matmul(&a, &b).unwrap());
    {
        let _ac = autocast(Some(DType::BF16)).unwrap();
        let _off = autocast(None).unwrap();
        assert_eq!(vals(&ops::matmul(&a, &b).unwrap()), plain);
    }
    // f64 inputs (gradient checks) are left alone even inside a scope.
    let (a64, b64) = (
        a.to_dtype(DType::F64).unwrap(),
        b.to_dtype(DType::F64).unwrap(),
    );
    let _ac = autocast(Some(DType::BF16)).unwrap();
    let y = ops::matmul(&a64, &b64).unwrap();
    assert_eq!(y.dtype(), DType::F64);
}
