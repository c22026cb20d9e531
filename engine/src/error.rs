//! The one error type of the engine and the ops built on it.
//!
//! Every variant names the operation and what was expected, so that a message read in a log
//! without the code at hand says what to fix.

use crate::{DType, Shape};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Shapes that do not fit together.
    #[error("{op}: shape mismatch: got {got}; expected {expected}")]
    ShapeMismatch {
        op: &'static str,
        got: String,
        expected: String,
    },
    /// An input of the wrong element type.
    #[error("{op}: dtype mismatch: got {got}; expected {expected}")]
    DTypeMismatch {
        op: &'static str,
        got: String,
        expected: String,
    },
    /// Inputs on different devices, or an op asked of a device that cannot run it.
    #[error("{op}: device mismatch: got {got}; expected {expected}")]
    DeviceMismatch {
        op: &'static str,
        got: String,
        expected: String,
    },
    /// An index (element index, axis, token id) outside its valid range.
    #[error("{op}: {what} {index} is out of range; expected 0 <= {what} < {size}")]
    IndexOutOfRange {
        op: &'static str,
        what: &'static str,
        index: i64,
        size: usize,
    },
    /// A bad argument value (kernel size, eps, probability ...).
    #[error("{op}: invalid argument: {msg}")]
    InvalidArgument { op: &'static str, msg: String },
    /// Something the autograd tape cannot do (backward of a non-scalar, a freed graph ...).
    #[error("autograd: {0}")]
    Autograd(String),
    /// An operation that exists but not for this device or dtype.
    #[error("{op}: not supported: {msg}")]
    Unsupported { op: &'static str, msg: String },
    #[error(transparent)]
    Cuda(#[from] mvar_cuda::CudaError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A file whose contents are not what was expected (corrupt checkpoint, wrong tensor ...).
    #[error("{what}: {msg}")]
    Format { what: String, msg: String },
}

impl Error {
    /// Whether this is the GPU running out of memory (after the caching allocator gave its
    /// cache back and tried again): what a smaller batch may avoid.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::Cuda(mvar_cuda::CudaError::OutOfMemory { .. }))
    }

    pub fn shape(op: &'static str, got: impl Into<String>, expected: impl Into<String>) -> Self {
        Error::ShapeMismatch {
            op,
            got: got.into(),
            expected: expected.into(),
        }
    }

    pub fn dtype(op: &'static str, got: DType, expected: impl Into<String>) -> Self {
        Error::DTypeMismatch {
            op,
            got: got.to_string(),
            expected: expected.into(),
        }
    }

    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            msg: msg.into(),
        }
    }

    /// Formats a list of shapes as `[2, 3] and [4]` for messages.
    pub fn shapes(shapes: &[&Shape]) -> String {
        shapes
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(" and ")
    }
}
