//! Element types. Floats: f32 (the default), bf16 (storage type for mixed precision; every CPU
//! kernel computes bf16 in f32 and rounds once at the end) and f64 (CPU only, for the gradient
//! checks). Integers: i64 for indices (token ids, gather/index_select, argmax) and u8 for masks
//! and images.

use std::fmt;

use half::bf16;

use crate::storage::CpuStorage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F64,
    I64,
    U8,
}

impl DType {
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F64)
    }

    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
            DType::F64 => 8,
            DType::I64 => 8,
            DType::U8 => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Rust type that is the element type of some [`DType`].
pub trait WithDType: Copy + Send + Sync + fmt::Debug + PartialOrd + 'static {
    const DTYPE: DType;
    fn to_f64(self) -> f64;
    /// Converts with Rust's `as` semantics for integers (truncation) and rounding for bf16.
    fn from_f64(v: f64) -> Self;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
    fn into_storage(v: Vec<Self>) -> CpuStorage;
}

macro_rules! with_dtype {
    ($t:ty, $variant:ident, $to:expr, $from:expr) => {
        impl WithDType for $t {
            const DTYPE: DType = DType::$variant;
            fn to_f64(self) -> f64 {
                $to(self)
            }
            fn from_f64(v: f64) -> Self {
                $from(v)
            }
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
        }
    };
}

with_dtype!(f32, F32, |x: f32| x as f64, |v: f64| v as f32);
with_dtype!(f64, F64, |x: f64| x, |v: f64| v);
with_dtype!(bf16, BF16, |x: bf16| x.to_f64(), bf16::from_f64);
with_dtype!(i64, I64, |x: i64| x as f64, |v: f64| v as i64);
with_dtype!(u8, U8, |x: u8| x as f64, |v: f64| v as u8);

/// The float types CPU kernels are written for. bf16 tensors are computed as f32 (see
/// [`crate::cpu::run_float`]), so kernels only ever see f32 or f64.
pub trait Float:
    WithDType + num_traits::Float + Default + std::iter::Sum + fmt::Display + std::ops::AddAssign
{
    fn from_f32(v: f32) -> Self;
    fn from_usize(v: usize) -> Self;
    /// Widens to f64 (exact for f32 and f64; unlike `ToPrimitive::to_f64`, never None).
    fn as_f64(self) -> f64;
}

impl Float for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn from_usize(v: usize) -> Self {
        v as f32
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl Float for f64 {
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    fn from_usize(v: usize) -> Self {
        v as f64
    }
    fn as_f64(self) -> f64 {
        self
    }
}
