//! Storage: one enum per device, as candle does. A tensor's elements are dense and row-major in
//! whichever variant holds them; the tensor's shape says how to read them.

use half::bf16;
use mvar_cuda::CudaBuffer;

use crate::{DType, Error, Result, WithDType};

/// Elements in host memory.
#[derive(Debug, Clone, PartialEq)]
pub enum CpuStorage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    U8(Vec<u8>),
}

/// Elements on some device.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaBuffer),
}

macro_rules! map_storage {
    ($s:expr, $v:ident => $e:expr) => {
        match $s {
            CpuStorage::F32($v) => $e,
            CpuStorage::BF16($v) => $e,
            CpuStorage::F64($v) => $e,
            CpuStorage::I64($v) => $e,
            CpuStorage::U8($v) => $e,
        }
    };
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::I64(_) => DType::I64,
            CpuStorage::U8(_) => DType::U8,
        }
    }

    pub fn len(&self) -> usize {
        map_storage!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `n` copies of `value`, converted to `dtype`.
    pub fn full(dtype: DType, n: usize, value: f64) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![value as f32; n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::from_f64(value); n]),
            DType::F64 => CpuStorage::F64(vec![value; n]),
            DType::I64 => CpuStorage::I64(vec![value as i64; n]),
            DType::U8 => CpuStorage::U8(vec![value as u8; n]),
        }
    }

    /// The elements as `&[T]`, or a dtype error naming `op`.
    pub fn as_slice<T: WithDType>(&self, op: &'static str) -> Result<&[T]> {
        T::slice(self).ok_or_else(|| Error::dtype(op, self.dtype(), T::DTYPE.as_str()))
    }

    pub fn as_mut_slice<T: WithDType>(&mut self, op: &'static str) -> Result<&mut [T]> {
        let dt = self.dtype();
        T::slice_mut(self).ok_or_else(|| Error::dtype(op, dt, T::DTYPE.as_str()))
    }

    /// Every element converted to f64 (exact for all dtypes but large i64).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        map_storage!(self, v => v.iter().map(|x| x.to_f64()).collect())
    }

    /// Every element converted to f32; bf16 widens exactly.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            CpuStorage::F32(v) => v.clone(),
            CpuStorage::BF16(v) => crate::cpu::widen_bf16(v),
            CpuStorage::F64(v) => v.iter().map(|&x| x as f32).collect(),
            CpuStorage::I64(v) => v.iter().map(|&x| x as f32).collect(),
            CpuStorage::U8(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// Converts to `dtype`. Float to integer truncates towards zero (as Rust's `as`); f32 to
    /// bf16 rounds to nearest even.
    pub fn to_dtype(&self, dtype: DType) -> CpuStorage {
        if self.dtype() == dtype {
            return self.clone();
        }
        match (self, dtype) {
            (CpuStorage::F32(v), DType::BF16) => CpuStorage::BF16(crate::cpu::narrow_to_bf16(v)),
            (_, DType::F32) => CpuStorage::F32(self.to_f32_vec()),
            (_, DType::F64) => CpuStorage::F64(self.to_f64_vec()),
            (_, DType::BF16) => {
                CpuStorage::BF16(self.to_f64_vec().into_iter().map(bf16::from_f64).collect())
            }
            (_, DType::I64) => {
                CpuStorage::I64(self.to_f64_vec().into_iter().map(|x| x as i64).collect())
            }
            (_, DType::U8) => {
                CpuStorage::U8(self.to_f64_vec().into_iter().map(|x| x as u8).collect())
            }
        }
    }
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(b) => match b.kind() {
                mvar_cuda::BufferKind::F32 => DType::F32,
                mvar_cuda::BufferKind::BF16 => DType::BF16,
                mvar_cuda::BufferKind::I64 => DType::I64,
                mvar_cuda::BufferKind::U8 => DType::U8,
            },
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
            Storage::Cuda(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
