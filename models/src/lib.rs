//! Models on the mvar engine: the multi-scale VQVAE tokenizer (VAR / MVAR share it), with
//! checkpoint I/O under the official PyTorch tensor names.

pub mod checkpoint;
pub mod data;
pub mod mvar;
pub mod nn;
pub mod tokenizer;
pub mod trainer;
pub mod var;
pub mod vqvae;

pub use mvar::{Mvar, MvarConfig};
pub use var::{Mixing, SampleConfig, SampleOutput, Var, VarConfig};
pub use vqvae::{phi_index, QuantizeOutput, VqVae, VqVaeConfig};
