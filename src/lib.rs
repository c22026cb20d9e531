//! mvar: a Rust GPU compute engine for multi-scale visual autoregressive image generation.
pub use mvar_cuda as cuda;
pub use mvar_engine as engine;
pub use mvar_models as models;
pub use mvar_ops as ops;
