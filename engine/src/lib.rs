//! mvar's tensor runtime: storage on CPU or CUDA, dtypes, shapes, the autograd tape, parameters
//! and the project's random number generator.
//!
//! The ops themselves live one layer up, in `mvar-ops`; this crate knows only what every op
//! needs: how a tensor is stored, how an op records itself for backward, and how gradients flow.

pub mod autocast;
pub mod autograd;
pub mod cpu;
mod device;
mod dtype;
mod error;
mod params;
pub mod profile;
pub mod rng;
mod shape;
mod storage;
mod tensor;

pub use autocast::{autocast, autocast_dtype, AutocastGuard};
pub use autograd::{
    is_grad_enabled, no_grad, recomputed, with_no_grad, Backward, GradBand, NoGradGuard,
};
pub use device::Device;
pub use dtype::{exp_f32, tanh_f32, DType, Float, WithDType};
pub use error::{Error, Result};
pub use params::ParamStore;
pub use rng::{Generator, GeneratorState};
pub use shape::Shape;
pub use storage::{CpuStorage, Storage};
pub use tensor::{Tensor, TensorId};

pub use half::bf16;
pub use mvar_cuda as cuda;
