//! Models on the mvar engine: the multi-scale VQVAE tokenizer (VAR / MVAR share it), with
//! checkpoint I/O under the official PyTorch tensor names.

pub mod checkpoint;
pub mod data;
pub mod nn;
pub mod pth;
pub mod tokenizer;
pub mod vqvae;

pub use pth::{convert, ConvertReport, PthContents};
pub use vqvae::{phi_index, QuantizeOutput, VqVae, VqVaeConfig};
