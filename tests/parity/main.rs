//! CUDA against the CPU reference: one test body per op, run on random shapes (proptest) on
//! the CPU in f32 and on the GPU in f32 and bf16, comparing the outputs and the gradients of
//! every float input (the loss is sum(out * w) with a fixed random w).
//!
//! Without a GPU every test prints "skipped: no CUDA device" and passes; with
//! `MVAR_REQUIRE_GPU=1` a missing GPU fails them (the GPU runner sets it). In CI they run on the
//! CUDA emulator (`tools/cuda-emu.sh`). `MVAR_PARITY_LOG=1` prints every bf16 comparison that
//! passed only through the allowance of twice the CPU's own bf16 error (see [`parity`]).

mod attention;
mod conv;
mod elementwise;
mod index;
mod matmul;
mod na2d;
mod nn;
mod optim;
mod quant;
mod sample;

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

/// Outputs and input gradients of `f` on `device` in `dtype`, as f64 vectors. With `rounded_to`,
/// the float inputs and the loss weights are first rounded to that dtype (and computed in
/// `dtype`): the reference for a bf16 run sees the values the bf16 run sees.
fn run_on(
    f: &dyn Fn(&Device, &[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    device: &Device,
    dtype: DType,
    rounded_to: Option<DType>,
) -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
    let round = |t: Tensor| -> Result<Tensor> {
        match rounded_to {
            Some(r) if t.dtype().is_float() => t.to_dtype(r)?.to_dtype(dtype),
            _ => Ok(t),
        }
    };
    let leaves: Vec<Tensor> = inputs
        .iter()
        .map(|t| {
            round(t.to_dtype(dtype)?)?
                .to_device(device)?
                .detach()
                .with_grad()
        })
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
    .to_dtype(y.dtype())?;
    let w = round(w)?.to_device(device)?;
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

/// Largest |got - want| over the largest |want|, that scale at least 1e-3: the inputs are O(1),
/// and a tensor that is zero in exact arithmetic (dq when each query sees only itself) must not
/// turn rounding noise of 1e-7 into a relative error of 1.
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    mvar::ops::testing::max_abs_diff(got, want) / scale
}

/// Runs `f` (which receives the device, to place any index or mask tensors it captured) on the
/// CPU in f32 and on the GPU in f32 and bf16, and fails the case if outputs or gradients differ
/// by more than [`tolerance`]. The bf16 run is compared with the CPU computing in f32 on the
/// same bf16-rounded inputs and loss weights: rounding the inputs is not the kernel's error, and
/// an ill-conditioned op (log near 1, a quotient, a cancelling sum) magnifies it far beyond the
/// bf16 tolerance of what the kernel itself rounds. Where even that is too strict (a gradient
/// that cancels after the op stored its output in bf16), a bf16 result also passes when it is
/// within twice the error of the CPU backend's own bf16 run of the same op: the GPU kernel may
/// not be worse than the reference implementation's straightforward bf16 arithmetic.
pub fn parity(
    op: &str,
    f: impl Fn(&Device, &[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
) -> std::result::Result<(), TestCaseError> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let fail = |e: mvar::engine::Error| TestCaseError::fail(format!("{op}: {e}"));
    for dtype in [DType::F32, DType::BF16] {
        let rounded_to = (dtype != DType::F32).then_some(dtype);
        let (want_y, want_g) =
            run_on(&f, inputs, &Device::Cpu, DType::F32, rounded_to).map_err(fail)?;
        let (y, g) = run_on(&f, inputs, &gpu, dtype, None).map_err(fail)?;
        let tol = tolerance(dtype);
        let cpu_same_dtype = if dtype == DType::F32 {
            None
        } else {
            Some(run_on(&f, inputs, &Device::Cpu, dtype, None).map_err(fail)?)
        };
        let check = |what: String, got: &[f64], want: &[f64], cpu: Option<&[f64]>| {
            let e = rel_err(got, want);
            let cpu_e = cpu.map(|c| rel_err(c, want)).unwrap_or(0.0);
            let allowed = tol.max(2.0 * cpu_e);
            if e > tol && e <= allowed && std::env::var_os("MVAR_PARITY_LOG").is_some() {
                eprintln!("PARITYLOG {op} {dtype} {what}: {e:e} within twice the CPU's {cpu_e:e}");
            }
            if e > allowed {
                return Err(TestCaseError::fail(format!(
                    "{op} {dtype}: {what} differs from the CPU by {e:e} (> {tol:e}; the CPU's own \
                     {dtype} run differs by {cpu_e:e})"
                )));
            }
            Ok(())
        };
        check(
            "output".into(),
            &y,
            &want_y,
            cpu_same_dtype.as_ref().map(|c| c.0.as_slice()),
        )?;
        for (i, (gi, wi)) in g.iter().zip(&want_g).enumerate() {
            check(
                format!("gradient of input {i}"),
                gi,
                wi,
                cpu_same_dtype.as_ref().map(|c| c.1[i].as_slice()),
            )?;
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
        cases: mvar::ops::testing::proptest_cases(16),
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
