//! Elementwise ops: unary maps, binary ops with NumPy broadcasting, scalar forms, comparisons,
//! where / masked fill, and the broadcast pair `broadcast_to` / `sum_to`.
//!
//! Every differentiable op here has a fused backward kernel (one pass computes the input
//! gradient from the saved tensor and the output gradient), which is also the shape the CUDA
//! kernels take.

use mvar_engine::cpu::{run_float, FloatKernel};
use mvar_engine::cuda::ops::elementwise as ew;
use mvar_engine::{CpuStorage, DType, Error, Float, Result, Shape, Tensor};

use crate::util::{
    broadcast_map2, broadcast_map3, dispatch, float_op, map1, map_zip, out_tensor, require_dtype,
    require_float, same_device, same_dtype,
};

// ----------------------------------------------------------------------------------------------
// unary

/// The unary float maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Tanh,
    Sigmoid,
    Silu,
    /// GELU with the tanh approximation (VAR's FFN).
    GeluTanh,
    Relu,
    Abs,
    Square,
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044_715;

impl UnaryOp {
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Silu => "silu",
            UnaryOp::GeluTanh => "gelu_tanh",
            UnaryOp::Relu => "relu",
            UnaryOp::Abs => "abs",
            UnaryOp::Square => "square",
        }
    }

    #[inline]
    fn forward<T: Float>(self, x: T) -> T {
        let one = T::one();
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp_fast(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Rsqrt => one / x.sqrt(),
            UnaryOp::Tanh => x.tanh_fast(),
            UnaryOp::Sigmoid => sigmoid_scalar(x),
            UnaryOp::Silu => x * sigmoid_scalar(x),
            // 0.5 x (1 + tanh u) = x sigmoid(2u): one exp and one division, no select between
            // two tanh forms.
            UnaryOp::GeluTanh => x * gelu_sigmoid(x),
            UnaryOp::Relu => x.max(T::zero()),
            UnaryOp::Abs => x.abs(),
            UnaryOp::Square => x * x,
        }
    }

    /// The op's code in the CUDA kernels.
    fn cuda_code(self) -> i32 {
        use ew::unary as u;
        match self {
            UnaryOp::Neg => u::NEG,
            UnaryOp::Exp => u::EXP,
            UnaryOp::Log => u::LOG,
            UnaryOp::Sqrt => u::SQRT,
            UnaryOp::Rsqrt => u::RSQRT,
            UnaryOp::Tanh => u::TANH,
            UnaryOp::Sigmoid => u::SIGMOID,
            UnaryOp::Silu => u::SILU,
            UnaryOp::GeluTanh => u::GELU_TANH,
            UnaryOp::Relu => u::RELU,
            UnaryOp::Abs => u::ABS,
            UnaryOp::Square => u::SQUARE,
        }
    }

    /// The activation functions: under bf16 autocast they keep their f32 input for the backward
    /// as bf16 (see [`unary`]).
    fn is_activation(self) -> bool {
        matches!(self, UnaryOp::GeluTanh | UnaryOp::Silu | UnaryOp::Relu)
    }

    /// Whether the backward reads the output (true) or the input (false).
    fn backward_uses_output(self) -> bool {
        matches!(
            self,
            UnaryOp::Exp | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Tanh | UnaryOp::Sigmoid
        )
    }

    /// dL/dx from the saved value (input or output, see `backward_uses_output`) and dL/dy.
    #[inline]
    fn backward<T: Float>(self, s: T, g: T) -> T {
        let one = T::one();
        let half = T::from_f64(0.5);
        match self {
            UnaryOp::Neg => -g,
            UnaryOp::Exp => g * s,
            UnaryOp::Log => g / s,
            UnaryOp::Sqrt => g * half / s,
            UnaryOp::Rsqrt => -g * half * s * s * s,
            UnaryOp::Tanh => g * (one - s * s),
            UnaryOp::Sigmoid => g * s * (one - s),
            UnaryOp::Silu => {
                let sg = sigmoid_scalar(s);
                g * (sg + s * sg * (one - sg))
            }
            // d/dx x sig(2u) = sig + 2 x u' sig (1 - sig), with sig = sigmoid(2u).
            UnaryOp::GeluTanh => {
                let k = T::from_f64(SQRT_2_OVER_PI);
                let c = T::from_f64(GELU_C);
                let sg = gelu_sigmoid(s);
                let du = k * (one + T::from_f64(3.0) * c * s * s);
                g * (sg + (s + s) * du * sg * (one - sg))
            }
            UnaryOp::Relu => {
                if s > T::zero() {
                    g
                } else {
                    T::zero()
                }
            }
            UnaryOp::Abs => {
                if s > T::zero() {
                    g
                } else if s < T::zero() {
                    -g
                } else {
                    T::zero()
                }
            }
            UnaryOp::Square => g * (s + s),
        }
    }
}

#[inline(always)]
fn sigmoid_scalar<T: Float>(x: T) -> T {
    // One branch-free form for both signs (so the loops vectorise): for x << 0, e^-x may be
    // +inf and 1 / inf = 0 is the right limit; 1 / (1 + e) is accurate to an ulp either way.
    T::one() / (T::one() + (-x).exp_fast())
}

/// sigmoid(2u) for GELU's u = sqrt(2/pi) (x + 0.044715 x^3), so that
/// gelu_tanh(x) = 0.5 x (1 + tanh u) = x * this. Branch-free like [`sigmoid_scalar`]: for
/// x << 0, e^(-2u) is +inf and the result the exact limit 0.
#[inline]
fn gelu_sigmoid<T: Float>(x: T) -> T {
    let u = T::from_f64(SQRT_2_OVER_PI) * (x + T::from_f64(GELU_C) * x * x * x);
    sigmoid_scalar(u + u)
}

struct UnaryFwd(UnaryOp);
impl FloatKernel for UnaryFwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let op = self.0;
        // The hot transcendental ops get their own monomorphised loop (a constant op, so the
        // match folds away and the loop vectorises); the rest share one.
        let x = x[0];
        Ok(vec![match op {
            UnaryOp::Exp => map1(x, |v| UnaryOp::Exp.forward(v)),
            UnaryOp::Sigmoid => map1(x, |v| UnaryOp::Sigmoid.forward(v)),
            UnaryOp::Silu => map1(x, |v| UnaryOp::Silu.forward(v)),
            UnaryOp::Tanh => map1(x, |v| UnaryOp::Tanh.forward(v)),
            UnaryOp::GeluTanh => map1(x, |v| UnaryOp::GeluTanh.forward(v)),
            other => map1(x, move |v| other.forward(v)),
        }])
    }
}

struct UnaryBwd(UnaryOp);
impl FloatKernel for UnaryBwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let op = self.0;
        let (s, g) = (x[0], x[1]);
        Ok(vec![match op {
            UnaryOp::Sigmoid => map_zip(s, g, |s, g| UnaryOp::Sigmoid.backward(s, g)),
            UnaryOp::Silu => map_zip(s, g, |s, g| UnaryOp::Silu.backward(s, g)),
            UnaryOp::GeluTanh => map_zip(s, g, |s, g| UnaryOp::GeluTanh.backward(s, g)),
            other => map_zip(s, g, move |s, g| other.backward(s, g)),
        }])
    }
}

/// Applies a unary map.
///
/// Inside a bf16 autocast scope an activation function (GELU, SiLU, ReLU) given an f32 input
/// that needs a gradient keeps that input for its backward in bf16, not f32: VAR's FFN hidden
/// layer, four times the model's width, is the largest activation of a transformer block, and
/// under PyTorch's autocast it is bf16 (the output of a bf16 linear). The forward's result is
/// the f32 one either way; the gradient is the op's at the bf16-rounded input.
pub fn unary(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    if op.is_activation()
        && x.dtype() == DType::F32
        && mvar_engine::autocast_dtype() == Some(DType::BF16)
        && mvar_engine::is_grad_enabled()
        && x.requires_grad()
    {
        return activation_keeping_bf16(x, op);
    }
    let code = op.cuda_code();
    let out = float_op(op.name(), &[x], &UnaryFwd(op), |dev, b| {
        Ok(vec![ew::unary_forward(dev, b[0], code)?])
    })?;
    let out = out_tensor(out, x.shape().clone(), x.device())?;
    let saved = if op.backward_uses_output() {
        out.detach()
    } else {
        x.detach()
    };
    Ok(Tensor::record(out, op.name(), &[x], move || {
        move |g: &Tensor| {
            let dx = float_op(op.name(), &[&saved, g], &UnaryBwd(op), |dev, b| {
                Ok(vec![ew::unary_backward(dev, b[0], b[1], code)?])
            })?;
            Ok(vec![Some(out_tensor(dx, g.shape().clone(), g.device())?)])
        }
    }))
}

/// [`unary`] for an activation under bf16 autocast: one pass writes the f32 output and the bf16
/// copy of `x` on the GPU; the CPU computes the output and casts.
fn activation_keeping_bf16(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    let code = op.cuda_code();
    let mut outs = dispatch(
        op.name(),
        &[x],
        |c| {
            let out = run_float(op.name(), c, &UnaryFwd(op))?;
            Ok(out
                .into_iter()
                .chain([c[0].to_dtype(DType::BF16)])
                .collect())
        },
        |dev, b| {
            let (out, kept) = ew::unary_forward_keep_bf16(dev, b[0], code)?;
            Ok(vec![out, kept])
        },
    )?;
    let kept = out_tensor(outs.split_off(1), x.shape().clone(), x.device())?;
    let out = out_tensor(outs, x.shape().clone(), x.device())?;
    Ok(Tensor::record(out, op.name(), &[x], move || {
        move |g: &Tensor| {
            let dx = dispatch(
                op.name(),
                &[&kept, g],
                |c| {
                    run_float(
                        op.name(),
                        &[&c[0].to_dtype(DType::F32), c[1]],
                        &UnaryBwd(op),
                    )
                },
                |dev, b| Ok(vec![ew::unary_backward_from_bf16(dev, b[0], b[1], code)?]),
            )?;
            Ok(vec![Some(out_tensor(dx, g.shape().clone(), g.device())?)])
        }
    }))
}

macro_rules! unary_fns {
    ($($name:ident => $op:ident),* $(,)?) => {
        $(
            #[doc = concat!("Elementwise `", stringify!($name), "`.")]
            pub fn $name(x: &Tensor) -> Result<Tensor> {
                unary(x, UnaryOp::$op)
            }
        )*
    };
}

unary_fns!(
    neg => Neg, exp => Exp, log => Log, sqrt => Sqrt, rsqrt => Rsqrt, tanh => Tanh,
    sigmoid => Sigmoid, silu => Silu, gelu_tanh => GeluTanh, relu => Relu, abs => Abs,
    square => Square,
);

// ----------------------------------------------------------------------------------------------
// binary with broadcasting

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
}

impl BinaryOp {
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Maximum => "maximum",
            BinaryOp::Minimum => "minimum",
        }
    }

    fn cuda_code(self) -> i32 {
        use ew::binary as b;
        match self {
            BinaryOp::Add => b::ADD,
            BinaryOp::Sub => b::SUB,
            BinaryOp::Mul => b::MUL,
            BinaryOp::Div => b::DIV,
            BinaryOp::Maximum => b::MAXIMUM,
            BinaryOp::Minimum => b::MINIMUM,
        }
    }

    #[inline]
    fn forward<T: Float>(self, a: T, b: T) -> T {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Maximum => {
                if a >= b {
                    a
                } else {
                    b
                }
            }
            BinaryOp::Minimum => {
                if a <= b {
                    a
                } else {
                    b
                }
            }
        }
    }

    /// (dL/da, dL/db) at one element. Ties of maximum/minimum split the gradient evenly, as
    /// PyTorch does.
    #[inline]
    fn backward<T: Float>(self, a: T, b: T, g: T) -> (T, T) {
        let half = T::from_f64(0.5);
        match self {
            BinaryOp::Add => (g, g),
            BinaryOp::Sub => (g, -g),
            BinaryOp::Mul => (g * b, g * a),
            BinaryOp::Div => (g / b, -g * a / (b * b)),
            BinaryOp::Maximum | BinaryOp::Minimum => {
                let a_wins = if self == BinaryOp::Maximum {
                    a > b
                } else {
                    a < b
                };
                if a == b {
                    (g * half, g * half)
                } else if a_wins {
                    (g, T::zero())
                } else {
                    (T::zero(), g)
                }
            }
        }
    }
}

struct BinaryFwd {
    op: BinaryOp,
    a: Shape,
    b: Shape,
    out: Shape,
}
impl FloatKernel for BinaryFwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let op = self.op;
        Ok(vec![broadcast_map2(
            &self.out,
            (x[0], &self.a),
            (x[1], &self.b),
            move |a, b| op.forward(a, b),
        )])
    }
}

/// Gradients of both inputs at the broadcast shape (reduced to the input shapes afterwards).
struct BinaryBwd {
    op: BinaryOp,
    a: Shape,
    b: Shape,
    out: Shape,
}
impl FloatKernel for BinaryBwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let op = self.op;
        let (a, b, g) = ((x[0], &self.a), (x[1], &self.b), (x[2], &self.out));
        let out = &self.out;
        // One pass per gradient. Where a gradient needs only dY and one input (mul; div's dA),
        // it is a two-input map, whose broadcast rows run as vectorised slice loops (an AdaLN
        // scale [B, 1, C] over [B, L, C] is MVAR's commonest case); the same arithmetic as
        // `BinaryOp::backward`, so the results are the same to the bit.
        let (da, db) = match op {
            BinaryOp::Mul => (
                broadcast_map2(out, g, b, |g, b| g * b),
                broadcast_map2(out, g, a, |g, a| g * a),
            ),
            BinaryOp::Div => (
                broadcast_map2(out, g, b, |g, b| g / b),
                broadcast_map3(out, a, b, g, |a, b, g| op.backward(a, b, g).1),
            ),
            _ => (
                broadcast_map3(out, a, b, g, |a, b, g| op.backward(a, b, g).0),
                broadcast_map3(out, a, b, g, |a, b, g| op.backward(a, b, g).1),
            ),
        };
        Ok(vec![da, db])
    }
}

/// `a op b` with NumPy broadcasting.
pub fn binary(a: &Tensor, b: &Tensor, op: BinaryOp) -> Result<Tensor> {
    let name = op.name();
    same_device(name, &[a, b])?;
    same_dtype(name, &[a, b])?;
    let out_shape = Shape::broadcast(name, a.shape(), b.shape())?;
    let k = BinaryFwd {
        op,
        a: a.shape().clone(),
        b: b.shape().clone(),
        out: out_shape.clone(),
    };
    let code = op.cuda_code();
    let dims = (
        a.dims().to_vec(),
        b.dims().to_vec(),
        out_shape.dims().to_vec(),
    );
    let out = float_op(name, &[a, b], &k, |dev, x| {
        Ok(vec![ew::binary_forward(
            dev,
            (x[0], &dims.0),
            (x[1], &dims.1),
            &dims.2,
            code,
        )?])
    })?;
    let out = out_tensor(out, out_shape.clone(), a.device())?;
    // Add and sub need neither input in their backward, so the tape must not hold them: a
    // transformer's bias and residual adds would otherwise keep every matmul output and every
    // residual-stream tensor of the forward alive until the backward reaches them.
    if matches!(op, BinaryOp::Add | BinaryOp::Sub) {
        let (shape_a, shape_b) = (a.shape().clone(), b.shape().clone());
        return Ok(Tensor::record(out, name, &[a, b], move || {
            move |g: &Tensor| {
                let gb = match op {
                    BinaryOp::Sub => neg(g)?,
                    _ => g.clone(),
                };
                Ok(vec![
                    Some(sum_to(g, &shape_a)?),
                    Some(sum_to(&gb, &shape_b)?),
                ])
            }
        }));
    }
    let (sa, sb) = (a.detach(), b.detach());
    Ok(Tensor::record(out, name, &[a, b], move || {
        move |g: &Tensor| {
            let k = BinaryBwd {
                op,
                a: sa.shape().clone(),
                b: sb.shape().clone(),
                out: out_shape.clone(),
            };
            let dims = (
                sa.dims().to_vec(),
                sb.dims().to_vec(),
                out_shape.dims().to_vec(),
            );
            let mut v = float_op(name, &[&sa, &sb, g], &k, |dev, x| {
                let (ga, gb) = ew::binary_backward(
                    dev,
                    (x[0], &dims.0),
                    (x[1], &dims.1),
                    x[2],
                    &dims.2,
                    code,
                    (true, true),
                )?;
                Ok(ga.into_iter().chain(gb).collect())
            })?;
            let gb = out_tensor(v.split_off(1), out_shape.clone(), g.device())?;
            let ga = out_tensor(v, out_shape.clone(), g.device())?;
            Ok(vec![
                Some(sum_to(&ga, sa.shape())?),
                Some(sum_to(&gb, sb.shape())?),
            ])
        }
    }))
}

pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Add)
}
pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Sub)
}
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Mul)
}
pub fn div(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Div)
}
pub fn maximum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Maximum)
}
pub fn minimum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Minimum)
}

// ----------------------------------------------------------------------------------------------
// scalar forms

struct Affine {
    mul: f64,
    add: f64,
}
impl FloatKernel for Affine {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (m, a) = (T::from_f64(self.mul), T::from_f64(self.add));
        Ok(vec![map1(x[0], move |v| v * m + a)])
    }
}

/// `x * mul + add`.
pub fn affine(x: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
    let out = float_op("affine", &[x], &Affine { mul, add }, |dev, b| {
        Ok(vec![ew::scalar_forward(
            dev,
            b[0],
            ew::scalar::AFFINE,
            mul as f32,
            add as f32,
        )?])
    })?;
    let out = out_tensor(out, x.shape().clone(), x.device())?;
    Ok(Tensor::record(out, "affine", &[x], move || {
        move |g: &Tensor| Ok(vec![Some(affine(g, mul, 0.0)?)])
    }))
}

pub fn add_scalar(x: &Tensor, v: f64) -> Result<Tensor> {
    affine(x, 1.0, v)
}

pub fn mul_scalar(x: &Tensor, v: f64) -> Result<Tensor> {
    affine(x, v, 0.0)
}

struct Powf(f64);
impl FloatKernel for Powf {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let p = T::from_f64(self.0);
        Ok(vec![map1(x[0], move |v| v.powf(p))])
    }
}

struct PowfBwd(f64);
impl FloatKernel for PowfBwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let p = T::from_f64(self.0);
        let pm1 = T::from_f64(self.0 - 1.0);
        Ok(vec![map_zip(x[0], x[1], move |v, g| g * p * v.powf(pm1))])
    }
}

/// `x ^ p` for a scalar exponent.
pub fn powf(x: &Tensor, p: f64) -> Result<Tensor> {
    let out = float_op("powf", &[x], &Powf(p), |dev, b| {
        Ok(vec![ew::scalar_forward(
            dev,
            b[0],
            ew::scalar::POWF,
            p as f32,
            0.0,
        )?])
    })?;
    let out = out_tensor(out, x.shape().clone(), x.device())?;
    let saved = x.detach();
    Ok(Tensor::record(out, "powf", &[x], move || {
        move |g: &Tensor| {
            let dx = float_op("powf", &[&saved, g], &PowfBwd(p), |dev, b| {
                Ok(vec![ew::scalar_backward(
                    dev,
                    b[0],
                    b[1],
                    ew::scalar::POWF,
                    p as f32,
                    0.0,
                )?])
            })?;
            Ok(vec![Some(out_tensor(dx, g.shape().clone(), g.device())?)])
        }
    }))
}

struct Clamp(f64, f64);
impl FloatKernel for Clamp {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (lo, hi) = (T::from_f64(self.0), T::from_f64(self.1));
        Ok(vec![map1(x[0], move |v| v.max(lo).min(hi))])
    }
}

struct ClampBwd(f64, f64);
impl FloatKernel for ClampBwd {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (lo, hi) = (T::from_f64(self.0), T::from_f64(self.1));
        Ok(vec![map_zip(x[0], x[1], move |v, g| {
            if v >= lo && v <= hi {
                g
            } else {
                T::zero()
            }
        })])
    }
}

/// Clamps into [lo, hi]; the gradient passes where the input is inside.
pub fn clamp(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    if lo > hi || lo.is_nan() || hi.is_nan() {
        return Err(Error::invalid(
            "clamp",
            format!("lo {lo} > hi {hi}: expected lo <= hi"),
        ));
    }
    let (lo32, hi32) = (lo as f32, hi as f32);
    let out = float_op("clamp", &[x], &Clamp(lo, hi), |dev, b| {
        Ok(vec![ew::scalar_forward(
            dev,
            b[0],
            ew::scalar::CLAMP,
            lo32,
            hi32,
        )?])
    })?;
    let out = out_tensor(out, x.shape().clone(), x.device())?;
    let saved = x.detach();
    Ok(Tensor::record(out, "clamp", &[x], move || {
        move |g: &Tensor| {
            let dx = float_op("clamp", &[&saved, g], &ClampBwd(lo, hi), |dev, b| {
                Ok(vec![ew::scalar_backward(
                    dev,
                    b[0],
                    b[1],
                    ew::scalar::CLAMP,
                    lo32,
                    hi32,
                )?])
            })?;
            Ok(vec![Some(out_tensor(dx, g.shape().clone(), g.device())?)])
        }
    }))
}

// ----------------------------------------------------------------------------------------------
// comparisons, where, masked fill

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    fn cuda_code(self) -> i32 {
        use ew::cmp as c;
        match self {
            CmpOp::Eq => c::EQ,
            CmpOp::Ne => c::NE,
            CmpOp::Lt => c::LT,
            CmpOp::Le => c::LE,
            CmpOp::Gt => c::GT,
            CmpOp::Ge => c::GE,
        }
    }
}

/// `a cmp b` as a u8 mask (1 = true), with broadcasting. Works on every dtype; not
/// differentiable.
pub fn compare(a: &Tensor, b: &Tensor, op: CmpOp) -> Result<Tensor> {
    same_dtype("compare", &[a, b])?;
    let out_shape = Shape::broadcast("compare", a.shape(), b.shape())?;
    let code = op.cuda_code();
    let dims = (
        a.dims().to_vec(),
        b.dims().to_vec(),
        out_shape.dims().to_vec(),
    );
    let cpu_fn = |s: &[&CpuStorage]| {
        let (x, y) = (s[0].to_f64_vec(), s[1].to_f64_vec());
        Ok(vec![CpuStorage::U8(broadcast_map2(
            &out_shape,
            (&x, a.shape()),
            (&y, b.shape()),
            move |x, y| {
                let r = match op {
                    CmpOp::Eq => x == y,
                    CmpOp::Ne => x != y,
                    CmpOp::Lt => x < y,
                    CmpOp::Le => x <= y,
                    CmpOp::Gt => x > y,
                    CmpOp::Ge => x >= y,
                };
                r as u8
            },
        ))])
    };
    let mask = dispatch("compare", &[a, b], cpu_fn, |dev, x| {
        Ok(vec![ew::compare(
            dev,
            (x[0], &dims.0),
            (x[1], &dims.1),
            &dims.2,
            code,
        )?])
    })?;
    out_tensor(mask, out_shape, a.device())
}

/// `cond ? a : b` elementwise with broadcasting of all three; `cond` is a u8 mask.
pub fn where_cond(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "where_cond";
    require_dtype(OP, cond, "the condition", DType::U8)?;
    require_float(OP, a)?;
    same_dtype(OP, &[a, b])?;
    same_device(OP, &[cond, a, b])?;
    let out_shape = Shape::broadcast(
        OP,
        &Shape::broadcast(OP, cond.shape(), a.shape())?,
        b.shape(),
    )?;
    let shapes = [
        cond.shape().clone(),
        a.shape().clone(),
        b.shape().clone(),
        out_shape.clone(),
    ];
    let cpu_fn = |s: &[&CpuStorage]| {
        let k = Where {
            cond: s[0].as_slice::<u8>(OP)?,
            shapes: &shapes,
        };
        run_float(OP, &[s[1], s[2]], &k)
    };
    let out = dispatch(OP, &[cond, a, b], cpu_fn, |dev, x| {
        let [c, sa, sb, so] = &shapes;
        Ok(vec![ew::where_cond(
            dev,
            (x[0], c.dims()),
            (x[1], sa.dims()),
            (x[2], sb.dims()),
            so.dims(),
        )?])
    })?;
    let out = out_tensor(out, out_shape.clone(), a.device())?;
    let cond = cond.detach();
    let (a_shape, b_shape) = (a.shape().clone(), b.shape().clone());
    Ok(Tensor::record(out, OP, &[a, b], move || {
        move |g: &Tensor| {
            let zeros = Tensor::zeros((), g.dtype(), g.device())?;
            let ga = where_cond(&cond, g, &zeros)?;
            let gb = where_cond(&cond, &zeros, g)?;
            Ok(vec![
                Some(sum_to(&ga, &a_shape)?),
                Some(sum_to(&gb, &b_shape)?),
            ])
        }
    }))
}

struct Where<'a> {
    cond: &'a [u8],
    shapes: &'a [Shape; 4],
}
impl FloatKernel for Where<'_> {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let [c, a, b, out] = self.shapes;
        Ok(vec![broadcast_map3(
            out,
            (self.cond, c),
            (x[0], a),
            (x[1], b),
            |c, a, b| {
                if c != 0 {
                    a
                } else {
                    b
                }
            },
        )])
    }
}

/// `x` with `value` where `mask` (u8, broadcast to x's shape) is 1.
pub fn masked_fill(x: &Tensor, mask: &Tensor, value: f64) -> Result<Tensor> {
    let fill = Tensor::full(value, (), x.dtype(), x.device())?;
    let out = where_cond(mask, &fill, x)?;
    if out.shape() != x.shape() {
        return Err(Error::shape(
            "masked_fill",
            Error::shapes(&[x.shape(), mask.shape()]),
            "a mask that broadcasts to the input's shape",
        ));
    }
    Ok(out)
}

// ----------------------------------------------------------------------------------------------
// broadcast_to / sum_to

/// `x` expanded (copied) to `shape` by broadcasting.
pub fn broadcast_to(x: &Tensor, shape: impl Into<Shape>) -> Result<Tensor> {
    let shape = shape.into();
    let target = Shape::broadcast("broadcast_to", x.shape(), &shape)?;
    if target != shape {
        return Err(Error::shape(
            "broadcast_to",
            Error::shapes(&[x.shape(), &shape]),
            format!("an input that broadcasts to {shape} without growing it"),
        ));
    }
    if x.shape() == &shape {
        return Ok(x.clone());
    }
    let k = Expand {
        from: x.shape().clone(),
        to: shape.clone(),
    };
    let dims = (x.dims().to_vec(), shape.dims().to_vec());
    let out = float_op("broadcast_to", &[x], &k, |dev, b| {
        Ok(vec![ew::expand(dev, b[0], &dims.0, &dims.1)?])
    })?;
    let out = out_tensor(out, shape, x.device())?;
    let from = x.shape().clone();
    Ok(Tensor::record(out, "broadcast_to", &[x], move || {
        move |g: &Tensor| Ok(vec![Some(sum_to(g, &from)?)])
    }))
}

struct Expand {
    from: Shape,
    to: Shape,
}
impl FloatKernel for Expand {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let unit = [T::zero()];
        Ok(vec![broadcast_map2(
            &self.to,
            (x[0], &self.from),
            (&unit[..], &Shape::scalar()),
            |a, _| a,
        )])
    }
}

/// Sums `x` down to `shape`, the inverse of broadcasting `shape` up to `x`'s shape (how
/// gradients of broadcast inputs are formed).
pub fn sum_to(x: &Tensor, shape: &Shape) -> Result<Tensor> {
    if x.shape() == shape {
        return Ok(x.clone());
    }
    let grown = Shape::broadcast("sum_to", shape, x.shape())?;
    if &grown != x.shape() {
        return Err(Error::shape(
            "sum_to",
            Error::shapes(&[x.shape(), shape]),
            format!("a target shape that broadcasts to {}", x.shape()),
        ));
    }
    let pad = x.rank() - shape.rank();
    let axes: Vec<usize> = (0..x.rank())
        .filter(|&i| i < pad || (shape.dims()[i - pad] == 1 && x.dims()[i] != 1))
        .collect();
    let summed = crate::reduce::sum_axes(x, &axes, true)?;
    summed.reshape(shape.clone())
}
