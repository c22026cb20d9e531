//! Every op once: shape and dtype checks, the CPU reference forward and backward, and the
//! dispatch point for the CUDA kernels.
//!
//! Ops are free functions on [`Tensor`]s (`add(&a, &b)`); [`TensorExt`] offers the same as
//! methods for chaining. Each op records itself on the engine's tape with its backward written
//! beside its forward in the same file. Ops know nothing about models.

pub mod attention;
pub mod conv;
pub mod dropout;
pub mod elementwise;
pub mod index;
pub mod interp;
pub mod layout;
pub mod matmul;
pub mod na2d;
pub mod norm;
pub mod optim;
pub mod quant;
pub mod reduce;
pub mod sample;
pub mod softmax;
pub mod testing;
mod util;

pub use attention::*;
pub use conv::*;
pub use dropout::*;
pub use elementwise::*;
pub use index::*;
pub use interp::*;
pub use layout::*;
pub use matmul::*;
pub use na2d::*;
pub use norm::*;
pub use optim::{clip_grad_norm, AdamW, AdamWConfig, Moments};
pub use quant::*;
pub use reduce::*;
pub use sample::*;
pub use softmax::*;
pub use util::{cpu_vectors, CpuVectors};

pub use mvar_engine as engine;
pub use mvar_engine::{DType, Device, Error, Result, Shape, Tensor};

/// The ops as methods, for chaining: `x.matmul(&w)?.add(&b)?.gelu_tanh()?`.
pub trait TensorExt {
    fn add(&self, other: &Tensor) -> Result<Tensor>;
    fn sub(&self, other: &Tensor) -> Result<Tensor>;
    fn mul(&self, other: &Tensor) -> Result<Tensor>;
    fn div(&self, other: &Tensor) -> Result<Tensor>;
    fn affine(&self, mul: f64, add: f64) -> Result<Tensor>;
    fn matmul(&self, other: &Tensor) -> Result<Tensor>;
    fn sum_all(&self) -> Result<Tensor>;
    fn mean_all(&self) -> Result<Tensor>;
    fn permute(&self, perm: &[usize]) -> Result<Tensor>;
    fn transpose(&self, a: isize, b: isize) -> Result<Tensor>;
}

impl TensorExt for Tensor {
    fn add(&self, other: &Tensor) -> Result<Tensor> {
        elementwise::add(self, other)
    }
    fn sub(&self, other: &Tensor) -> Result<Tensor> {
        elementwise::sub(self, other)
    }
    fn mul(&self, other: &Tensor) -> Result<Tensor> {
        elementwise::mul(self, other)
    }
    fn div(&self, other: &Tensor) -> Result<Tensor> {
        elementwise::div(self, other)
    }
    fn affine(&self, mul: f64, add: f64) -> Result<Tensor> {
        elementwise::affine(self, mul, add)
    }
    fn matmul(&self, other: &Tensor) -> Result<Tensor> {
        matmul::matmul(self, other)
    }
    fn sum_all(&self) -> Result<Tensor> {
        reduce::sum_all(self)
    }
    fn mean_all(&self) -> Result<Tensor> {
        reduce::mean_all(self)
    }
    fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        layout::permute(self, perm)
    }
    fn transpose(&self, a: isize, b: isize) -> Result<Tensor> {
        layout::transpose(self, a, b)
    }
}
