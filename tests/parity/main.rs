//! CUDA against the CPU reference: one test body per op, run on random shapes (proptest) on
//! the CPU in f32 and on the GPU in f32 and bf16, comparing the outputs and the gradients of
//! every float input (the loss is sum(out * w) with a fixed random w).
//!
//! Without a GPU every test prints "skipped: no CUDA device" and passes; with
//! `MVAR_REQUIRE_GPU=1` a missing GPU fails them (the GPU runner sets it).

mod attention;
mod conv;
mod elementwise;
mod index;
mod matmul;
mod na2d;
mod nn;
mod optim;
mod quant;

use std::sync::OnceLock;

use mvar::engine::{DType, Device, Generator, Result, Tensor};
use mvar::ops;
use proptest::test_runner::TestCaseError;

/// The GPU, or None (after saying so) when there is none and none is required.
pub fn gpu() -> Option<Device> {
    static GPU: OnceLock<std::result::Result<Device, String>> = OnceLock::new();
    match GPU.get_or_init(|| Device::cuda(0).map_err(|e| e.to_string())) {
        Ok(d) => Some(d.clone()),
        Err(e) => {
            if std::env::var("MVAR_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("MVAR_REQUIRE_GPU=1 but no CUDA device could be opened: {e}");
            }
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// Tolerances: relative to the largest reference magnitude of each compared tensor.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2e-2,
        _ => 1e-4,
    }
}

/// Outputs and input gradients of `f` on `device` in `dtype`, as f64 vectors.
fn run_on(
    f: &dyn Fn(&Device, &[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    device: &Device,
    dtype: DType,
) -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
    let leaves: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(dtype)?.to_device(device)?.detach().with_grad())
        .collect::<Result<_>>()?;
    let y = f(device, &leaves)?;
    let mut g = Generator::new(99);
    let w = Tensor::randn(
        y.shape().clone(),
        0.0,
        1.0,
        DType::F32,
        &Device::Cpu,
        &mut g,
    )?
    .to_dtype(y.dtype())?
    .to_device(device)?;
    if y.dtype().is_float() && y.requires_grad() {
        ops::sum_all(&ops::mul(&y, &w)?)?.backward()?;
    }
    let grads = leaves
        .iter()
        .map(|l| match l.grad() {
            Some(g) => g.to_vec_f64(),
            None => Ok(vec![0.0; l.elem_count()]),
        })
        .collect::<Result<_>>()?;
    Ok((y.to_vec_f64()?, grads))
}

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Runs `f` (which receives the device, to place any index or mask tensors it captured) on the
/// CPU in f32 and on the GPU in f32 and bf16, and fails the case if outputs or gradients differ
/// by more than [`tolerance`].
pub fn parity(
    op: &str,
    f: impl Fn(&Device, &[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
) -> std::result::Result<(), TestCaseError> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let fail = |e: mvar::engine::Error| TestCaseError::fail(format!("{op}: {e}"));
    let (want_y, want_g) = run_on(&f, inputs, &Device::Cpu, DType::F32).map_err(fail)?;
    for dtype in [DType::F32, DType::BF16] {
        let (y, g) = run_on(&f, inputs, &gpu, dtype).map_err(fail)?;
        let tol = tolerance(dtype);
        let e = rel_err(&y, &want_y);
        if e > tol {
            return Err(TestCaseError::fail(format!(
                "{op} {dtype}: output differs from the CPU by {e:e} (> {tol:e})"
            )));
        }
        for (i, (gi, wi)) in g.iter().zip(&want_g).enumerate() {
            let e = rel_err(gi, wi);
            if e > tol {
                return Err(TestCaseError::fail(format!(
                    "{op} {dtype}: gradient of input {i} differs from the CPU by {e:e} (> {tol:e})"
                )));
            }
        }
    }
    Ok(())
}

/// f32 CPU tensor with values in N(0, 1).
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(
        shape.to_vec(),
        0.0,
        1.0,
        DType::F32,
        &Device::Cpu,
        &mut Generator::new(seed),
    )
    .expect("tensor")
}

/// f32 CPU tensor with |x| >= 0.5 (positive when asked).
pub fn away_from_zero(shape: &[usize], seed: u64, positive: bool) -> Tensor {
    let v: Vec<f32> = randn(shape, seed)
        .to_vec::<f32>()
        .expect("values")
        .into_iter()
        .map(|x| {
            if positive || x >= 0.0 {
                0.5 + x.abs()
            } else {
                -0.5 - x.abs()
            }
        })
        .collect();
    Tensor::from_vec(v, shape.to_vec(), &Device::Cpu).expect("tensor")
}

pub fn config() -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases: 16,
        failure_persistence: None,
        ..Default::default()
    }
}

/// Always runs (even without a GPU): documents on CI that the parity suite skipped.
#[test]
fn reports_whether_a_gpu_is_present() {
    match gpu() {
        Some(d) => println!("parity tests run on {}", d.describe()),
        None => println!("parity tests skipped: no CUDA device"),
    }
}
