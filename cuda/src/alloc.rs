//! The caching device allocator.
//!
//! A training step allocates and frees the same sizes every iteration; asking the driver each
//! time (cuMemAlloc/cuMemFree, which synchronise) would dominate small ops. Freed blocks are kept
//! in per-size free lists and handed out again. All work runs on one stream, so a block returned
//! by a tensor that is dropped while kernels that read it are still queued can be reused at once:
//! later kernels on the same stream run after them.
//!
//! Sizes are rounded up (512 B granules up to 1 MiB, 2 MiB granules above) so that slightly
//! different requests share free lists. When the driver reports out-of-memory the allocator
//! waits for the stream, returns every cached block to the driver and tries once more; if that
//! fails too the error says how much was asked, free, in use and cached.
//!
//! The caching logic is generic over [`RawAllocator`], so it is unit-tested without a GPU.
//!
//! `MVAR_CUDA_NO_CACHING=1` turns caching off (exact sizes straight from and back to the
//! driver, as PyTorch's `PYTORCH_NO_CUDA_MEMORY_CACHING`): slow, but a kernel that writes past
//! the end of its buffer then runs into the driver's boundary instead of a neighbour's block,
//! which the CUDA emulator's guard pages (cuda/emu) turn into an immediate, named failure.

use std::collections::BTreeMap;

use crate::CudaError;

/// Where fresh device memory comes from.
pub trait RawAllocator: Send {
    /// `Ok(None)` when the device is out of memory; `Err` for any other failure.
    fn malloc(&mut self, bytes: usize) -> Result<Option<u64>, CudaError>;
    fn free(&mut self, ptr: u64);
    /// Waits until queued work no longer uses any memory (before returning memory to the driver).
    fn synchronize(&mut self);
    /// (free, total) bytes on the device, for error messages.
    fn memory_info(&self) -> (usize, usize);
}

/// Memory accounting, in bytes of rounded block sizes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Held by live buffers now.
    pub in_use_bytes: usize,
    /// Highest `in_use_bytes` since creation or the last [`CachingAllocator::reset_peak`].
    pub peak_in_use_bytes: usize,
    /// Kept in the free lists for reuse.
    pub cached_bytes: usize,
    /// Calls that reached the driver's allocator (flat in steady state).
    pub driver_allocs: u64,
    pub driver_frees: u64,
}

pub struct CachingAllocator<R: RawAllocator> {
    raw: R,
    free: BTreeMap<usize, Vec<u64>>,
    stats: MemoryStats,
    caching: bool,
}

const SMALL_LIMIT: usize = 1 << 20;
const SMALL_GRANULE: usize = 512;
const LARGE_GRANULE: usize = 2 << 20;

impl<R: RawAllocator> CachingAllocator<R> {
    pub fn new(raw: R) -> Self {
        Self::with_caching(raw, true)
    }

    /// With `caching` false every request goes to the driver at its exact size and every
    /// release straight back (for finding out-of-bounds accesses, see the module docs).
    pub fn with_caching(raw: R, caching: bool) -> Self {
        CachingAllocator {
            raw,
            free: BTreeMap::new(),
            stats: MemoryStats::default(),
            caching,
        }
    }

    /// The block size a request of `bytes` occupies.
    pub fn rounded(bytes: usize) -> usize {
        let granule = if bytes <= SMALL_LIMIT {
            SMALL_GRANULE
        } else {
            LARGE_GRANULE
        };
        bytes.div_ceil(granule).max(1) * granule
    }

    /// A block of at least `bytes`; returns (pointer, block size).
    pub fn alloc(&mut self, bytes: usize, during: &str) -> Result<(u64, usize), CudaError> {
        let size = if self.caching {
            Self::rounded(bytes)
        } else {
            bytes.max(1)
        };
        let cached = self.free.get_mut(&size).and_then(|v| v.pop());
        let ptr = match cached {
            Some(p) => {
                self.stats.cached_bytes -= size;
                p
            }
            None => self.fresh(size, during)?,
        };
        self.stats.in_use_bytes += size;
        self.stats.peak_in_use_bytes = self.stats.peak_in_use_bytes.max(self.stats.in_use_bytes);
        Ok((ptr, size))
    }

    fn fresh(&mut self, size: usize, during: &str) -> Result<u64, CudaError> {
        if let Some(p) = self.raw.malloc(size)? {
            self.stats.driver_allocs += 1;
            return Ok(p);
        }
        // Out of memory: give the cache back to the driver and try once more.
        self.empty_cache();
        if let Some(p) = self.raw.malloc(size)? {
            self.stats.driver_allocs += 1;
            return Ok(p);
        }
        let (free, total) = self.raw.memory_info();
        Err(CudaError::OutOfMemory {
            during: during.to_string(),
            requested_bytes: size,
            free_bytes: free,
            total_bytes: total,
            in_use_bytes: self.stats.in_use_bytes,
            cached_bytes: self.stats.cached_bytes,
        })
    }

    /// Takes back a block handed out by [`CachingAllocator::alloc`].
    pub fn release(&mut self, ptr: u64, size: usize) {
        if !self.caching {
            self.stats.in_use_bytes -= size;
            // Kernels queued before this release may still read the block.
            self.raw.synchronize();
            self.raw.free(ptr);
            self.stats.driver_frees += 1;
            return;
        }
        self.stats.in_use_bytes -= size;
        self.stats.cached_bytes += size;
        self.free.entry(size).or_default().push(ptr);
    }

    /// Returns every cached block to the driver.
    pub fn empty_cache(&mut self) {
        if self.free.is_empty() {
            return;
        }
        self.raw.synchronize();
        for (_, ptrs) in std::mem::take(&mut self.free) {
            for p in ptrs {
                self.raw.free(p);
                self.stats.driver_frees += 1;
            }
        }
        self.stats.cached_bytes = 0;
    }

    pub fn stats(&self) -> MemoryStats {
        self.stats
    }

    /// Starts a new peak measurement from the current use.
    pub fn reset_peak(&mut self) {
        self.stats.peak_in_use_bytes = self.stats.in_use_bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake device with `capacity` bytes.
    struct FakeDevice {
        capacity: usize,
        used: usize,
        next: u64,
        live: BTreeMap<u64, usize>,
        syncs: usize,
    }

    impl RawAllocator for FakeDevice {
        fn malloc(&mut self, bytes: usize) -> Result<Option<u64>, CudaError> {
            if self.used + bytes > self.capacity {
                return Ok(None);
            }
            self.used += bytes;
            self.next += 1 << 32;
            self.live.insert(self.next, bytes);
            Ok(Some(self.next))
        }
        fn free(&mut self, ptr: u64) {
            let bytes = self.live.remove(&ptr).expect("double free");
            self.used -= bytes;
        }
        fn synchronize(&mut self) {
            self.syncs += 1;
        }
        fn memory_info(&self) -> (usize, usize) {
            (self.capacity - self.used, self.capacity)
        }
    }

    fn fake(capacity: usize) -> CachingAllocator<FakeDevice> {
        CachingAllocator::new(FakeDevice {
            capacity,
            used: 0,
            next: 0,
            live: BTreeMap::new(),
            syncs: 0,
        })
    }

    #[test]
    fn rounding() {
        type A = CachingAllocator<FakeDevice>;
        assert_eq!(A::rounded(0), 512);
        assert_eq!(A::rounded(1), 512);
        assert_eq!(A::rounded(513), 1024);
        assert_eq!(A::rounded(1 << 20), 1 << 20);
        assert_eq!(A::rounded((1 << 20) + 1), 2 << 20);
        assert_eq!(A::rounded(5 << 20), 6 << 20);
    }

    #[test]
    fn steady_state_reuses_blocks_without_the_driver() {
        let mut a = fake(1 << 30);
        for _ in 0..100 {
            let x = a.alloc(3000, "t").unwrap();
            let y = a.alloc(5 << 20, "t").unwrap();
            a.release(x.0, x.1);
            a.release(y.0, y.1);
        }
        let s = a.stats();
        assert_eq!(
            s.driver_allocs, 2,
            "only the first iteration reaches the driver"
        );
        assert_eq!(s.in_use_bytes, 0);
        assert_eq!(s.cached_bytes, 3072 + (6 << 20));
        assert_eq!(s.peak_in_use_bytes, 3072 + (6 << 20));
    }

    #[test]
    fn without_caching_sizes_are_exact_and_blocks_go_straight_back() {
        let mut a = fake(1 << 30);
        a.caching = false;
        for _ in 0..3 {
            let x = a.alloc(3000, "t").unwrap();
            assert_eq!(x.1, 3000);
            assert_eq!(a.raw.live.get(&x.0), Some(&3000));
            a.release(x.0, x.1);
            assert!(a.raw.live.is_empty());
        }
        let s = a.stats();
        assert_eq!((s.driver_allocs, s.driver_frees), (3, 3));
        assert_eq!(
            (s.in_use_bytes, s.cached_bytes, s.peak_in_use_bytes),
            (0, 0, 3000)
        );
    }

    #[test]
    fn peak_tracks_the_high_water_mark_and_resets() {
        let mut a = fake(1 << 30);
        let x = a.alloc(1 << 20, "t").unwrap();
        let y = a.alloc(1 << 20, "t").unwrap();
        a.release(x.0, x.1);
        assert_eq!(a.stats().peak_in_use_bytes, 2 << 20);
        a.reset_peak();
        assert_eq!(a.stats().peak_in_use_bytes, 1 << 20);
        a.release(y.0, y.1);
    }

    #[test]
    fn out_of_memory_flushes_the_cache_then_reports() {
        let mut a = fake(8 << 20);
        let x = a.alloc(4 << 20, "t").unwrap();
        a.release(x.0, x.1); // 4 MiB cached
                             // 6 MiB does not fit next to the cached 4 MiB: the cache is returned, then it fits.
        let y = a.alloc(6 << 20, "t").unwrap();
        assert_eq!(a.stats().cached_bytes, 0);
        assert_eq!(a.stats().driver_frees, 1);
        let err = a.alloc(4 << 20, "conv2d output").unwrap_err().to_string();
        assert!(
            err.contains("conv2d output")
                && err.contains("4194304")
                && err.contains("6291456 in use"),
            "{err}"
        );
        a.release(y.0, y.1);
    }
}
