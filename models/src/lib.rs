//! Models on the mvar engine: the multi-scale VQVAE tokenizer, VAR and MVAR, their trainers and
//! samplers, data sets, and checkpoint I/O under the official PyTorch tensor names (safetensors,
//! and a safe reader of PyTorch `.pth` files).

pub mod checkpoint;
pub mod classifier;
pub mod data;
pub mod edit;
pub mod import;
pub mod metrics;
pub mod mvar;
pub mod nn;
pub mod npz;
pub mod pth;
#[cfg(test)]
mod test_models;
pub mod tokenizer;
pub mod trainer;
pub mod var;
pub mod vqvae;

pub use mvar::{Mvar, MvarConfig};
pub use pth::{convert, ConvertReport, PthContents};
pub use var::{Mixing, SampleConfig, SampleOutput, Var, VarConfig};
pub use vqvae::{phi_index, QuantizeOutput, VqVae, VqVaeConfig};
