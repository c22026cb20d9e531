//! Engine behaviour: the autograd tape's contract, the optimizer, and errors on bad input.

mod api_errors;
mod autocast;
mod no_panic;
mod optim;
mod tape;

use mvar::engine::{Device, Tensor};

pub fn t(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape.to_vec(), &Device::Cpu).expect("tensor")
}

pub fn t32(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape.to_vec(), &Device::Cpu).expect("tensor")
}
