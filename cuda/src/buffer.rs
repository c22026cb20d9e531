//! Typed device memory handed out by the caching allocator.

use std::fmt;
use std::sync::{Arc, Mutex};

use half::bf16;

use crate::alloc::CachingAllocator;
use crate::device::DriverMemory;

/// Element types a device buffer can hold. f64 lives on the CPU only (it exists for gradient
/// checks, which run on the CPU reference backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BufferKind {
    F32,
    BF16,
    I64,
    U8,
}

impl BufferKind {
    pub fn size_in_bytes(self) -> usize {
        match self {
            BufferKind::F32 => 4,
            BufferKind::BF16 => 2,
            BufferKind::I64 => 8,
            BufferKind::U8 => 1,
        }
    }

    /// The suffix of kernel names instantiated for this element type (`unary_f32`).
    pub fn suffix(self) -> &'static str {
        match self {
            BufferKind::F32 => "f32",
            BufferKind::BF16 => "bf16",
            BufferKind::I64 => "i64",
            BufferKind::U8 => "u8",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, BufferKind::F32 | BufferKind::BF16)
    }
}

pub(crate) type Pool = Arc<Mutex<CachingAllocator<DriverMemory>>>;

/// `len` elements of one kind on one GPU. Dropping it returns the block to the allocator's cache.
pub struct CudaBuffer {
    pub(crate) ptr: u64,
    pub(crate) block_bytes: usize,
    pub(crate) len: usize,
    pub(crate) kind: BufferKind,
    pub(crate) pool: Option<Pool>,
}

impl CudaBuffer {
    pub fn kind(&self) -> BufferKind {
        self.kind
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn byte_len(&self) -> usize {
        self.len * self.kind.size_in_bytes()
    }

    /// The device address, for kernel arguments. Valid while `self` lives.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.lock()
                .unwrap_or_else(|e| e.into_inner())
                .release(self.ptr, self.block_bytes);
        }
    }
}

impl fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaBuffer({:?}, {} elements)", self.kind, self.len)
    }
}

/// Borrowed host data on its way to the GPU.
pub enum HostData<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    I64(&'a [i64]),
    U8(&'a [u8]),
}

impl HostData<'_> {
    pub fn kind(&self) -> BufferKind {
        match self {
            HostData::F32(_) => BufferKind::F32,
            HostData::BF16(_) => BufferKind::BF16,
            HostData::I64(_) => BufferKind::I64,
            HostData::U8(_) => BufferKind::U8,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::BF16(v) => v.len(),
            HostData::I64(v) => v.len(),
            HostData::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Owned host data copied back from the GPU.
pub enum HostVec {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    I64(Vec<i64>),
    U8(Vec<u8>),
}
