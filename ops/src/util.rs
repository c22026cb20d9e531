//! Checks and plumbing shared by every op: device/dtype agreement, access to CPU storage,
//! broadcast iteration.

pub use mvar_engine::cpu::{cpu_vectors, in_widest_vectors, CpuVectors};
use mvar_engine::cpu::{run_float, FloatKernel, PARALLEL_MIN_ELEMS};
use mvar_engine::cuda::{CudaBuffer, CudaDevice};
use mvar_engine::{
    CpuStorage, DType, Device, Error, Float, Result, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// All tensors on one device.
pub(crate) fn same_device(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    if let Some(first) = ts.first() {
        if let Some(other) = ts.iter().find(|t| t.device() != first.device()) {
            return Err(Error::DeviceMismatch {
                op,
                got: format!("{} and {}", first.device(), other.device()),
                expected: "all inputs on one device".into(),
            });
        }
    }
    Ok(())
}

/// All tensors of one dtype.
pub(crate) fn same_dtype(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    if let Some(first) = ts.first() {
        if let Some(other) = ts.iter().find(|t| t.dtype() != first.dtype()) {
            return Err(Error::DTypeMismatch {
                op,
                got: format!("{} and {}", first.dtype(), other.dtype()),
                expected: "all float inputs of one dtype".into(),
            });
        }
    }
    Ok(())
}

pub(crate) fn require_float(op: &'static str, t: &Tensor) -> Result<()> {
    if !t.dtype().is_float() {
        return Err(Error::dtype(
            op,
            t.dtype(),
            "a float dtype (f32, bf16 or f64)",
        ));
    }
    Ok(())
}

pub(crate) fn require_dtype(op: &'static str, t: &Tensor, what: &str, dtype: DType) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::dtype(op, t.dtype(), format!("{dtype} for {what}")));
    }
    Ok(())
}

pub(crate) fn require_rank(op: &'static str, t: &Tensor, what: &str, rank: usize) -> Result<()> {
    if t.rank() != rank {
        return Err(Error::shape(
            op,
            format!("{what} of shape {}", t.shape()),
            format!("a rank-{rank} tensor"),
        ));
    }
    Ok(())
}

/// The CPU storage behind a read guard, or the error every op gives for a device it has no
/// kernel for. The CUDA backend replaces these call sites with a dispatch.
pub(crate) fn cpu<'a>(op: &'static str, s: &'a Storage) -> Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        Storage::Cuda(_) => Err(no_cuda_kernel(op)),
    }
}

/// The error for an op asked of a CUDA tensor before its kernel exists.
pub(crate) fn no_cuda_kernel(op: &'static str) -> Error {
    Error::Unsupported {
        op,
        msg: "no CUDA kernel for this op in this build; run it on the CPU (MVAR_DEVICE=cpu)".into(),
    }
}

/// The inputs' shapes for the profiler, e.g. `[16,32,32,32] [32,32,3,3] [32]`.
fn shapes_of(ts: &[&Tensor]) -> String {
    let dims: Vec<String> = ts
        .iter()
        .map(|t| {
            let d: Vec<String> = t.dims().iter().map(usize::to_string).collect();
            format!("[{}]", d.join(","))
        })
        .collect();
    dims.join(" ")
}

/// Runs `f` on the CPU storages of `ts` (after the device check).
pub(crate) fn with_cpu<R>(
    op: &'static str,
    ts: &[&Tensor],
    f: impl FnOnce(&[&CpuStorage]) -> Result<R>,
) -> Result<R> {
    same_device(op, ts)?;
    let _timer = mvar_engine::profile::scope(op, || shapes_of(ts));
    let guards: Vec<_> = ts.iter().map(|t| t.storage()).collect();
    let cpus: Vec<&CpuStorage> = guards.iter().map(|g| cpu(op, g)).collect::<Result<_>>()?;
    f(&cpus)
}

/// The dispatch point of every op: runs `cpu` on the CPU storages of `ts`, or `cuda` on their
/// device buffers, and returns the output storages. Device agreement is checked here; each op
/// checks dtypes and shapes before calling.
pub(crate) fn dispatch(
    op: &'static str,
    ts: &[&Tensor],
    cpu_fn: impl FnOnce(&[&CpuStorage]) -> Result<Vec<CpuStorage>>,
    cuda_fn: impl FnOnce(&CudaDevice, &[&CudaBuffer]) -> Result<Vec<CudaBuffer>>,
) -> Result<Vec<Storage>> {
    same_device(op, ts)?;
    let device = ts
        .first()
        .map(|t| t.device().clone())
        .unwrap_or(Device::Cpu);
    let mut timer = mvar_engine::profile::scope(op, || shapes_of(ts));
    let guards: Vec<_> = ts.iter().map(|t| t.storage()).collect();
    match &device {
        Device::Cpu => {
            mvar_engine::cpu::tune_allocator();
            let cpus: Vec<&CpuStorage> =
                guards.iter().map(|g| cpu(op, g)).collect::<Result<_>>()?;
            Ok(cpu_fn(&cpus)?.into_iter().map(Storage::Cpu).collect())
        }
        Device::Cuda(dev) => {
            let bufs: Vec<&CudaBuffer> = guards
                .iter()
                .map(|g| match &**g {
                    Storage::Cuda(b) => Ok(b),
                    Storage::Cpu(_) => Err(Error::DeviceMismatch {
                        op,
                        got: "a CPU buffer in a CUDA tensor".into(),
                        expected: "storage on the tensor's device".into(),
                    }),
                })
                .collect::<Result<_>>()?;
            timer.on_gpu(dev);
            let out = cuda_fn(dev, &bufs)?;
            if mvar_engine::profile::synchronous() {
                dev.synchronize()?;
            }
            Ok(out.into_iter().map(Storage::Cuda).collect())
        }
    }
}

/// [`dispatch`] for float ops: checks that every input is a float of one dtype and runs the CPU
/// side as a [`FloatKernel`].
pub(crate) fn float_op(
    op: &'static str,
    ts: &[&Tensor],
    kernel: &impl FloatKernel,
    cuda_fn: impl FnOnce(&CudaDevice, &[&CudaBuffer]) -> Result<Vec<CudaBuffer>>,
) -> Result<Vec<Storage>> {
    for t in ts {
        require_float(op, t)?;
    }
    same_dtype(op, ts)?;
    dispatch(op, ts, |cpus| run_float(op, cpus, kernel), cuda_fn)
}

/// A new tensor from one output storage.
pub(crate) fn out_tensor(
    mut storages: Vec<Storage>,
    shape: impl Into<Shape>,
    device: &Device,
) -> Result<Tensor> {
    let s = storages
        .pop()
        .ok_or_else(|| Error::invalid("dispatch", "a kernel returned no output"))?;
    Tensor::from_storage(s, shape, device)
}

/// Runs a float kernel on the CPU storages of `ts` (device and dtype checked).
pub(crate) fn float_kernel(
    op: &'static str,
    ts: &[&Tensor],
    kernel: &impl FloatKernel,
) -> Result<Vec<CpuStorage>> {
    for t in ts {
        require_float(op, t)?;
    }
    same_dtype(op, ts)?;
    with_cpu(op, ts, |cpus| run_float(op, cpus, kernel))
}

/// A new tensor on `device` from host storage.
pub(crate) fn tensor(cpu: CpuStorage, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
    Tensor::from_cpu(cpu, shape, device)
}

/// Takes the single output of a kernel.
pub(crate) fn one(mut v: Vec<CpuStorage>) -> CpuStorage {
    v.swap_remove(0)
}

/// Iterates an output shape row by row (a row = the last axis) and gives, for each input
/// broadcast to that shape, the offset of the row's first element and the step along the row
/// (0 when the input is broadcast along the last axis).
pub(crate) struct Broadcast {
    out_dims: Vec<usize>,
    /// per input: strides aligned to the output's axes, 0 on broadcast axes
    strides: Vec<Vec<usize>>,
    row_len: usize,
}

impl Broadcast {
    pub(crate) fn new(out: &Shape, inputs: &[&Shape]) -> Self {
        let rank = out.rank();
        let strides = inputs
            .iter()
            .map(|s| {
                let own = s.strides();
                let pad = rank - s.rank();
                (0..rank)
                    .map(|i| {
                        if i < pad || s.dims()[i - pad] == 1 {
                            0
                        } else {
                            own[i - pad]
                        }
                    })
                    .collect()
            })
            .collect();
        let row_len = if rank == 0 { 1 } else { out.dims()[rank - 1] };
        Broadcast {
            out_dims: out.dims().to_vec(),
            strides,
            row_len,
        }
    }

    pub(crate) fn row_len(&self) -> usize {
        self.row_len
    }

    /// Step along the row for input `i`.
    pub(crate) fn row_step(&self, i: usize) -> usize {
        self.strides[i].last().copied().unwrap_or(0)
    }

    /// Offset of row `row`'s first element in input `i`.
    pub(crate) fn row_offset(&self, i: usize, mut row: usize) -> usize {
        let rank = self.out_dims.len();
        if rank <= 1 {
            return 0;
        }
        let mut off = 0;
        for ax in (0..rank - 1).rev() {
            let d = self.out_dims[ax];
            off += (row % d) * self.strides[i][ax];
            row /= d;
        }
        off
    }
}

/// out[i] = f(a[ia], b[ib]) over the broadcast of a and b to `out`.
pub(crate) fn broadcast_map2<A: Copy + Sync, B: Copy + Sync, R: Copy + Send + Sync>(
    out: &Shape,
    a: (&[A], &Shape),
    b: (&[B], &Shape),
    f: impl Fn(A, B) -> R + Sync + Send,
) -> Vec<R> {
    let n = out.elem_count();
    if a.1 == out && b.1 == out {
        return map_zip(a.0, b.0, f);
    }
    let bc = Broadcast::new(out, &[a.1, b.1]);
    let row = bc.row_len().max(1);
    let (sa, sb) = (bc.row_step(0), bc.row_step(1));
    // A task takes whole rows, about MAP_CHUNK elements of them. Along a row each input is either
    // contiguous (step 1) or one repeated value (step 0), so the common cases are the plain
    // slice loops of the maps (vectorised, in the widest vectors the CPU has).
    let rows_per_task = (MAP_CHUNK / row).max(1);
    let fill = |(t, chunk): (usize, &mut [MaybeUninit<R>])| {
        for (k, out_row) in chunk.chunks_mut(row).enumerate() {
            let r = t * rows_per_task + k;
            let (oa, ob, len) = (bc.row_offset(0, r), bc.row_offset(1, r), out_row.len());
            match (sa, sb) {
                (1, 1) => map2_slice(out_row, &a.0[oa..oa + len], &b.0[ob..ob + len], &f),
                (1, 0) => {
                    let y = b.0[ob];
                    map1_slice(out_row, &a.0[oa..oa + len], &|x| f(x, y))
                }
                (0, 1) => {
                    let x = a.0[oa];
                    map1_slice(out_row, &b.0[ob..ob + len], &|y| f(x, y))
                }
                _ => {
                    for (j, o) in out_row.iter_mut().enumerate() {
                        o.write(f(a.0[oa + j * sa], b.0[ob + j * sb]));
                    }
                }
            }
        }
    };
    // SAFETY: `fill` writes every element of its chunk: each row through map1_slice /
    // map2_slice (which assert the row's length) or the element loop over the whole row.
    unsafe { written_in_tasks(n, row * rows_per_task, fill) }
}

/// out[i] = f(a[ia], b[ib], c[ic]) over the broadcast of a, b and c to `out`.
pub(crate) fn broadcast_map3<A: Copy + Sync, B: Copy + Sync, C: Copy + Sync, R: Copy + Send>(
    out: &Shape,
    a: (&[A], &Shape),
    b: (&[B], &Shape),
    c: (&[C], &Shape),
    f: impl Fn(A, B, C) -> R + Sync + Send,
) -> Vec<R> {
    let n = out.elem_count();
    let bc = Broadcast::new(out, &[a.1, b.1, c.1]);
    let row = bc.row_len().max(1);
    let (sa, sb, sc) = (bc.row_step(0), bc.row_step(1), bc.row_step(2));
    // Whole rows per task, as in broadcast_map2; rows where every input is contiguous run as a
    // plain zipped loop.
    let rows_per_task = (MAP_CHUNK / row).max(1);
    let fill = |(t, chunk): (usize, &mut [MaybeUninit<R>])| {
        for (k, out_row) in chunk.chunks_mut(row).enumerate() {
            let r = t * rows_per_task + k;
            let (oa, ob, oc) = (
                bc.row_offset(0, r),
                bc.row_offset(1, r),
                bc.row_offset(2, r),
            );
            let len = out_row.len();
            if (sa, sb, sc) == (1, 1, 1) {
                let rows = (&a.0[oa..oa + len], &b.0[ob..ob + len], &c.0[oc..oc + len]);
                for (((o, &x), &y), &z) in out_row.iter_mut().zip(rows.0).zip(rows.1).zip(rows.2) {
                    o.write(f(x, y, z));
                }
            } else {
                for (j, o) in out_row.iter_mut().enumerate() {
                    o.write(f(a.0[oa + j * sa], b.0[ob + j * sb], c.0[oc + j * sc]));
                }
            }
        }
    };
    // SAFETY: `fill` writes every element of each row of its chunk (a zipped loop over the row
    // and equally long input rows, or the element loop).
    unsafe { written_in_tasks(n, row * rows_per_task, fill) }
}

/// Elements per task of the threaded maps: plain slice loops inside a task, so that a
/// branch-free `f` vectorises (rayon's per-element iterators do not).
const MAP_CHUNK: usize = 16 * 1024;

/// A new vector of `n` elements written by `fill`, without zeroing them first: `fill` receives
/// the uninitialised elements. The zero fill this skips was 10-14 % of a CPU training step on
/// an AVX-512 Xeon (docs/performance.md).
///
/// # Safety
/// `fill` must write every element of the slice it is given before it returns (the maps and
/// copies here walk their whole output, row by row or element by element, and the slice loops
/// assert that output and inputs have one length). If `fill` panics instead, nothing unsound
/// follows: the length is set only after it returns.
pub(crate) unsafe fn written_vec<T>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: the capacity is at least n, and `fill` wrote each of the first n elements (the
    // caller's obligation above), so they are initialised.
    unsafe { v.set_len(n) };
    v
}

/// [`written_vec`] of `n` elements in tasks of `task_len` (the last may be shorter):
/// `fill((task index, its elements))`, threaded when `n` is large.
///
/// # Safety
/// `fill` must write every element of the chunk it is given (the chunks tile the output).
pub(crate) unsafe fn written_in_tasks<R: Send>(
    n: usize,
    task_len: usize,
    fill: impl Fn((usize, &mut [MaybeUninit<R>])) + Sync + Send,
) -> Vec<R> {
    let fill_all = |v: &mut [MaybeUninit<R>]| {
        if n >= PARALLEL_MIN_ELEMS {
            v.par_chunks_mut(task_len).enumerate().for_each(&fill);
        } else {
            v.chunks_mut(task_len).enumerate().for_each(&fill);
        }
    };
    // SAFETY: the chunks tile the output and `fill` writes each whole (the caller's obligation).
    unsafe { written_vec(n, fill_all) }
}

/// `dst[i] = f(x[i])` for every element, returning `dst` as the initialised slice it now is.
/// Panics unless the lengths are equal.
#[inline(always)]
pub(crate) fn write_mapped<'a, A: Copy, T>(
    dst: &'a mut [MaybeUninit<T>],
    x: &[A],
    f: impl Fn(A) -> T,
) -> &'a mut [T] {
    assert_eq!(dst.len(), x.len(), "write_mapped: output and input lengths");
    for (o, &v) in dst.iter_mut().zip(x) {
        o.write(f(v));
    }
    // SAFETY: the loop wrote every element of dst (its length is x's), and MaybeUninit<T> has
    // T's layout.
    unsafe { &mut *(dst as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// [`write_mapped`] of two inputs: `dst[i] = f(a[i], b[i])`.
#[inline(always)]
pub(crate) fn write_mapped2<'a, A: Copy, B: Copy, T>(
    dst: &'a mut [MaybeUninit<T>],
    a: &[A],
    b: &[B],
    f: impl Fn(A, B) -> T,
) -> &'a mut [T] {
    assert!(
        dst.len() == a.len() && dst.len() == b.len(),
        "write_mapped2: output and input lengths"
    );
    for ((o, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        o.write(f(x, y));
    }
    // SAFETY: as in write_mapped: every element was written.
    unsafe { &mut *(dst as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// The f64 sum of `f(x[i])` over eight interleaved accumulators (element i into lane i % 8):
/// the same accuracy class as a plain sum, but the adds are independent. Walked in chunks of
/// eight with the lanes in a local array, so the loop becomes vector adds (an indexed
/// `acc[i & 7]` stayed a scalar loop through the stack, 5x slower).
#[inline(always)]
pub(crate) fn lane_sum<A: Copy>(x: &[A], f: impl Fn(A) -> f64) -> f64 {
    lane_sum2(x, x, |a, _| f(a))
}

/// [`lane_sum`] of `f(a[i], b[i])` over two slices of one length.
#[inline(always)]
pub(crate) fn lane_sum2<A: Copy, B: Copy>(a: &[A], b: &[B], f: impl Fn(A, B) -> f64) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += f(xa[k], xb[k]);
        }
    }
    for (k, (&va, &vb)) in ra.iter().zip(rb).enumerate() {
        acc[k] += f(va, vb);
    }
    acc.iter().sum()
}

/// The largest `x[i]` (-inf for an empty slice) over sixteen lanes (see [`lane_sum`]); NaNs are
/// skipped (`max` returns the other operand), which is exact in any order.
#[inline(always)]
pub(crate) fn lane_max<T: Float>(x: &[T]) -> T {
    // Sixteen lanes (one AVX-512 vector of f32), not lane_sum's eight: a maximum is exact in
    // any order, so the width changes no result.
    let mut acc = [T::neg_infinity(); 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..16 {
            acc[k] = acc[k].max(c[k]);
        }
    }
    for (k, &v) in rest.iter().enumerate() {
        acc[k] = acc[k].max(v);
    }
    acc.iter().fold(T::neg_infinity(), |m, &v| m.max(v))
}

#[inline(always)]
fn map1_loop<A: Copy, R, F: Fn(A) -> R>(out: &mut [MaybeUninit<R>], x: &[A], f: &F) {
    for (o, &i) in out.iter_mut().zip(x) {
        o.write(f(i));
    }
}

// The map loops have their own target-feature copies rather than going through
// `in_widest_vectors` with a closure: written that way (tried 2026-12-05 (6)), the broadcasting
// add [4096,1024] + [1024] took 1.55 ms instead of 0.75 ms and the plain add 1.56 ms instead of
// 0.97 ms on the AVX-512 Xeon (gelu unchanged); why was not located.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn map1_loop_avx2<A: Copy, R, F: Fn(A) -> R>(out: &mut [MaybeUninit<R>], x: &[A], f: &F) {
    map1_loop(out, x, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn map1_loop_avx512<A: Copy, R, F: Fn(A) -> R>(out: &mut [MaybeUninit<R>], x: &[A], f: &F) {
    map1_loop(out, x, f)
}

/// out[i] = f(x[i]) over one slice, in the widest vectors the CPU has (see [`cpu_vectors`]).
/// Writes every element of `out` (its callers' outputs are [`written_vec`]s).
fn map1_slice<A: Copy, R, F: Fn(A) -> R>(out: &mut [MaybeUninit<R>], x: &[A], f: &F) {
    assert_eq!(out.len(), x.len(), "map1_slice: output and input lengths");
    #[cfg(target_arch = "x86_64")]
    match cpu_vectors() {
        // SAFETY: the CPU has AVX-512F (checked at run time).
        CpuVectors::Avx512 => return unsafe { map1_loop_avx512(out, x, f) },
        // SAFETY: the CPU has AVX2 (checked at run time).
        CpuVectors::Avx2 => return unsafe { map1_loop_avx2(out, x, f) },
        CpuVectors::Baseline => {}
    }
    map1_loop(out, x, f)
}

#[inline(always)]
fn map2_loop<A: Copy, B: Copy, R, F: Fn(A, B) -> R>(
    out: &mut [MaybeUninit<R>],
    a: &[A],
    b: &[B],
    f: &F,
) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        o.write(f(x, y));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn map2_loop_avx2<A: Copy, B: Copy, R, F: Fn(A, B) -> R>(
    out: &mut [MaybeUninit<R>],
    a: &[A],
    b: &[B],
    f: &F,
) {
    map2_loop(out, a, b, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn map2_loop_avx512<A: Copy, B: Copy, R, F: Fn(A, B) -> R>(
    out: &mut [MaybeUninit<R>],
    a: &[A],
    b: &[B],
    f: &F,
) {
    map2_loop(out, a, b, f)
}

/// out[i] = f(a[i], b[i]) over one slice, in the widest vectors the CPU has; writes every
/// element of `out`.
fn map2_slice<A: Copy, B: Copy, R, F: Fn(A, B) -> R>(
    out: &mut [MaybeUninit<R>],
    a: &[A],
    b: &[B],
    f: &F,
) {
    assert!(
        out.len() == a.len() && out.len() == b.len(),
        "map2_slice: output and input lengths"
    );
    #[cfg(target_arch = "x86_64")]
    match cpu_vectors() {
        // SAFETY: the CPU has AVX-512F (checked at run time).
        CpuVectors::Avx512 => return unsafe { map2_loop_avx512(out, a, b, f) },
        // SAFETY: the CPU has AVX2 (checked at run time).
        CpuVectors::Avx2 => return unsafe { map2_loop_avx2(out, a, b, f) },
        CpuVectors::Baseline => {}
    }
    map2_loop(out, a, b, f)
}

/// out[i] = f(x[i]), threaded for large inputs.
pub(crate) fn map1<A: Copy + Sync, R: Copy + Send + Sync>(
    x: &[A],
    f: impl Fn(A) -> R + Sync + Send,
) -> Vec<R> {
    let fill = |(t, out): (usize, &mut [MaybeUninit<R>])| {
        map1_slice(out, &x[t * MAP_CHUNK..][..out.len()], &f)
    };
    // SAFETY: map1_slice writes every element of its chunk (it asserts that chunk and input
    // have one length).
    unsafe { written_in_tasks(x.len(), MAP_CHUNK, fill) }
}

/// out[i] = f(a[i], b[i]), threaded for large inputs.
pub(crate) fn map_zip<A: Copy + Sync, B: Copy + Sync, R: Copy + Send + Sync>(
    a: &[A],
    b: &[B],
    f: impl Fn(A, B) -> R + Sync + Send,
) -> Vec<R> {
    let n = a.len().min(b.len());
    let fill = |(t, out): (usize, &mut [MaybeUninit<R>])| {
        let at = t * MAP_CHUNK;
        map2_slice(out, &a[at..][..out.len()], &b[at..][..out.len()], &f)
    };
    // SAFETY: map2_slice writes every element of its chunk (it asserts equal lengths).
    unsafe { written_in_tasks(n, MAP_CHUNK, fill) }
}

/// A kernel that only moves elements, written once for every dtype (no float conversion, so
/// bf16 and integer tensors are copied bit for bit).
pub(crate) trait CopyKernel {
    fn run<T: WithDType + Default>(&self, x: &[&[T]]) -> Result<Vec<T>>;
}

/// Runs a copy kernel on CPU storages of one dtype.
pub(crate) fn run_copy(
    op: &'static str,
    s: &[&CpuStorage],
    k: &impl CopyKernel,
) -> Result<CpuStorage> {
    macro_rules! go {
        ($t:ty, $v:ident) => {{
            let xs: Vec<&[$t]> = s
                .iter()
                .map(|c| c.as_slice::<$t>(op))
                .collect::<Result<_>>()?;
            Ok(CpuStorage::$v(k.run(&xs)?))
        }};
    }
    let first = s.first().ok_or_else(|| Error::invalid(op, "no inputs"))?;
    match first.dtype() {
        DType::F32 => go!(f32, F32),
        DType::BF16 => go!(mvar_engine::bf16, BF16),
        DType::F64 => go!(f64, F64),
        DType::I64 => go!(i64, I64),
        DType::U8 => go!(u8, U8),
    }
}

/// [`dispatch`] for ops that only move elements: tensors of one dtype (any) and device, a
/// [`CopyKernel`] on the CPU, `cuda_fn` on the GPU.
pub(crate) fn copy_op(
    op: &'static str,
    ts: &[&Tensor],
    k: &impl CopyKernel,
    cuda_fn: impl FnOnce(&CudaDevice, &[&CudaBuffer]) -> Result<Vec<CudaBuffer>>,
) -> Result<Vec<Storage>> {
    same_dtype(op, ts)?;
    dispatch(op, ts, |s| Ok(vec![run_copy(op, s, k)?]), cuda_fn)
}

/// out[i] = x[offset(i)] where offset(i) = sum over axes of index(i, axis) * strides[axis]:
/// a copy through arbitrary strides (permute is this with permuted strides).
pub(crate) fn strided_copy<T: Copy + Send + Sync>(
    x: &[T],
    out_dims: &[usize],
    strides: &[usize],
) -> Vec<T> {
    let n: usize = out_dims.iter().product();
    let rank = out_dims.len();
    let row = if rank == 0 { 1 } else { out_dims[rank - 1] };
    let step = if rank == 0 { 0 } else { strides[rank - 1] };
    if n == 0 {
        return Vec::new();
    }
    // A task takes whole output rows, about MAP_CHUNK elements of them (a task per row of 64
    // elements cost more in scheduling than the copy); a row whose source is contiguous is one
    // slice copy.
    let rows_per_task = (MAP_CHUNK / row).max(1);
    let fill = |(t, chunk): (usize, &mut [MaybeUninit<T>])| {
        for (k, out_row) in chunk.chunks_mut(row).enumerate() {
            let mut rem = t * rows_per_task + k;
            let mut off = 0;
            for ax in (0..rank.saturating_sub(1)).rev() {
                off += (rem % out_dims[ax]) * strides[ax];
                rem /= out_dims[ax];
            }
            if step == 1 {
                let src = &x[off..off + out_row.len()];
                for (o, &v) in out_row.iter_mut().zip(src) {
                    o.write(v);
                }
            } else {
                for (j, o) in out_row.iter_mut().enumerate() {
                    o.write(x[off + j * step]);
                }
            }
        }
    };
    // SAFETY: `fill` writes every element of each row of its chunk (a zipped loop over the row,
    // or one write per index of the row).
    unsafe { written_in_tasks(n, row * rows_per_task, fill) }
}

/// The element count of a new output, or an error naming `op` when it overflows or could not
/// be allocated at all (more bytes than `isize::MAX` even at 64 bytes an element, the widest
/// per-element scratch an op keeps), so that absurd sizes give an `Err` instead of a
/// capacity-overflow panic.
pub(crate) fn output_len(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize / 64)
        .ok_or_else(|| Error::invalid(op, format!("output shape {dims:?}: too many elements")))
}

/// The autocast rule (see `mvar_engine::autocast`): inside an autocast scope, an op whose float
/// inputs are all f32 runs `f` on them cast to the scope's dtype and returns its result cast
/// back to f32. Returns None (run the op as it is) outside a scope or for other dtypes.
pub(crate) fn autocast_run(
    inputs: &[&Tensor],
    f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
) -> Option<Result<Tensor>> {
    let low = mvar_engine::autocast_dtype()?;
    if inputs.is_empty() || inputs.iter().any(|t| t.dtype() != DType::F32) {
        return None;
    }
    let run = || -> Result<Tensor> {
        let cast: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_dtype(low))
            .collect::<Result<_>>()?;
        f(&cast)?.to_dtype(DType::F32)
    };
    Some(run())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "x86_64")]
    use mvar_engine::cpu::{with_avx2, with_avx512};
    use mvar_engine::{Float, Shape};

    /// strided_copy as permute uses it against per-element index arithmetic: rows copied as
    /// slices (last axis kept) and gathered (last axis moved), rows of odd lengths, tasks of many
    /// rows with a short last task, and sizes on both sides of the threading threshold.
    #[test]
    fn strided_copy_matches_per_element_indexing() {
        let cases: [(&[usize], &[usize]); 5] = [
            (&[3, 5, 7], &[1, 0, 2]),
            (&[3, 5, 7], &[2, 1, 0]),
            (&[7, 129, 3, 13], &[2, 0, 3, 1]),
            (&[5, 97, 3, 61], &[2, 0, 1, 3]),
            (&[40000], &[0]),
        ];
        for (dims, perm) in cases {
            let n: usize = dims.iter().product();
            let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let own = Shape::new(dims.to_vec()).strides();
            let out_dims: Vec<usize> = perm.iter().map(|&a| dims[a]).collect();
            let strides: Vec<usize> = perm.iter().map(|&a| own[a]).collect();
            let got = strided_copy(&x, &out_dims, &strides);
            let out_strides = Shape::new(out_dims.clone()).strides();
            for (i, &g) in got.iter().enumerate() {
                let src: usize = (0..out_dims.len())
                    .map(|ax| (i / out_strides[ax]) % out_dims[ax] * strides[ax])
                    .sum();
                assert_eq!(
                    g, x[src],
                    "{dims:?} permuted by {perm:?}, output element {i}"
                );
            }
        }
    }

    /// broadcast_map2 against index arithmetic done the slow way, for every kind of row (both
    /// inputs contiguous, one repeated along the row, both), rows of odd lengths, tasks of many
    /// rows, and sizes on both sides of the threading threshold.
    #[test]
    fn broadcast_map2_matches_per_element_indexing() {
        let cases: [(&[usize], &[usize], &[usize]); 7] = [
            (&[3, 5, 7], &[3, 5, 7], &[7]),
            (&[3, 5, 7], &[3, 1, 7], &[3, 5, 1]),
            (&[4, 1], &[1, 9], &[4, 9]),
            (&[1], &[6, 5], &[]),
            (&[300, 1, 33], &[1, 40, 33], &[300, 40, 1]),
            (&[2, 70_000], &[70_000], &[2, 1]),
            (&[1, 1, 1], &[2, 3, 1], &[1, 3, 1]),
        ];
        for (sa, sb, sc) in cases {
            for (ash, bsh) in [(sa, sb), (sb, sc), (sc, sa)] {
                let (ash, bsh) = (Shape::from(ash.to_vec()), Shape::from(bsh.to_vec()));
                let (out, at) = SlowBroadcast::of(&[&ash, &bsh]);
                let a: Vec<f32> = (0..ash.elem_count()).map(|i| i as f32 * 0.5).collect();
                let b: Vec<f32> = (0..bsh.elem_count()).map(|i| 1.0 + i as f32).collect();
                let got = broadcast_map2(&out, (&a, &ash), (&b, &bsh), |x, y| x * 1000.0 + y);
                let want: Vec<f32> = (0..out.elem_count())
                    .map(|e| a[at.index(&ash, e)] * 1000.0 + b[at.index(&bsh, e)])
                    .collect();
                assert_eq!(got, want, "{ash} with {bsh}");
            }
        }
    }

    /// Broadcasting done the slow way: the output shape of some inputs, and the index in an input
    /// of an output element (its coordinates, 0 on the input's broadcast axes).
    struct SlowBroadcast {
        out_dims: Vec<usize>,
    }

    impl SlowBroadcast {
        fn of(inputs: &[&Shape]) -> (Shape, SlowBroadcast) {
            let rank = inputs.iter().map(|s| s.rank()).max().unwrap_or(0);
            let at = SlowBroadcast {
                out_dims: vec![1; rank],
            };
            let out_dims: Vec<usize> = (0..rank)
                .map(|ax| inputs.iter().map(|s| at.dim(s, ax)).max().unwrap_or(1))
                .collect();
            (Shape::from(out_dims.clone()), SlowBroadcast { out_dims })
        }

        /// Size of `s` along output axis `ax` (1 on the axes it lacks).
        fn dim(&self, s: &Shape, ax: usize) -> usize {
            let pad = self.out_dims.len() - s.rank();
            if ax < pad {
                1
            } else {
                s.dims()[ax - pad]
            }
        }

        fn index(&self, s: &Shape, mut e: usize) -> usize {
            let (mut idx, mut stride) = (0, 1);
            for ax in (0..self.out_dims.len()).rev() {
                let c = e % self.out_dims[ax];
                e /= self.out_dims[ax];
                let d = self.dim(s, ax);
                idx += (c % d) * stride;
                stride *= d;
            }
            idx
        }
    }

    #[test]
    fn broadcast_map3_matches_per_element_indexing() {
        // Rows of every step pattern, rows shorter and longer than a task, a scalar.
        let cases: [[&[usize]; 3]; 6] = [
            [&[3, 5, 7], &[3, 5, 7], &[3, 5, 7]],
            [&[3, 5, 7], &[3, 1, 7], &[3, 5, 1]],
            [&[4, 1], &[1, 9], &[4, 9]],
            [&[300, 1, 33], &[1, 40, 33], &[300, 40, 1]],
            [&[2, 70_000], &[70_000], &[2, 1]],
            [&[], &[2, 3, 1], &[1, 3, 4]],
        ];
        for shapes in cases {
            let shapes = shapes.map(|d| Shape::from(d.to_vec()));
            let (out, at) = SlowBroadcast::of(&[&shapes[0], &shapes[1], &shapes[2]]);
            let data: Vec<Vec<f64>> = shapes
                .iter()
                .enumerate()
                .map(|(k, s)| (0..s.elem_count()).map(|i| (i + 7 * k) as f64).collect())
                .collect();
            let got = broadcast_map3(
                &out,
                (&data[0], &shapes[0]),
                (&data[1], &shapes[1]),
                (&data[2], &shapes[2]),
                |x, y, z| x * 1e12 + y * 1e6 + z,
            );
            let want: Vec<f64> = (0..out.elem_count())
                .map(|e| {
                    data[0][at.index(&shapes[0], e)] * 1e12
                        + data[1][at.index(&shapes[1], e)] * 1e6
                        + data[2][at.index(&shapes[2], e)]
                })
                .collect();
            assert_eq!(got, want, "{} {} {}", shapes[0], shapes[1], shapes[2]);
        }
    }

    /// The AVX2 and AVX-512 copies of the map loops, and closures run through
    /// [`in_widest_vectors`]' copies, give bitwise the results of the baseline copy: the
    /// transcendental maps (exp and tanh polynomials, clamps, selects, int conversions), a
    /// binary op and lane sums, over normal values, huge ones, zeros, infinities and NaN. The
    /// closures are concrete types (not `dyn Fn`), so they are inlined into each copy and
    /// compiled for its instruction set, as in the ops.
    #[test]
    fn the_wide_loops_match_the_baseline_loops_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        {
            let mut x: Vec<f32> = (0..10_007)
                .map(|i| ((i as f32) * 0.618_034).sin() * (1.0 + (i % 97) as f32))
                .collect();
            x.extend([0.0, -0.0, 1e-40, -1e-40, 88.8, -104.5, 1e30, -1e30]);
            x.extend([
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
                f32::MAX,
                f32::MIN,
            ]);
            let y: Vec<f32> = x.iter().rev().copied().collect();
            let gelu =
                |v: f32| 0.5 * v * (1.0 + (0.797_884_6 * (v + 0.044_715 * v * v * v)).tanh_fast());
            let silu = |v: f32| v / (1.0 + (-v).exp_fast());
            let div = |a: f32, b: f32| a / b + a * b;
            // A closure of the kind the norms and Winograd transforms run in in_widest_vectors:
            // maps and lane sums over whole slices.
            let rows = || {
                let mut out = vec![0.0f32; x.len()];
                for ((o, &a), &b) in out.iter_mut().zip(&x).zip(&y) {
                    *o = (a - b).clamp(-3.0, 3.0).exp_fast() * 0.5 + a * b;
                }
                let sum = lane_sum2(&x, &y, |a, b| (a as f64) * (b as f64));
                (out, sum.to_bits(), lane_max(&x).to_bits())
            };
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            // Output buffers start as zeros, so reading them back is sound whatever the loops do.
            let zeros = || vec![vec![MaybeUninit::new(0.0f32); x.len()]; 3];
            // SAFETY: every element was initialised (zeros above, then written).
            let read = |v: &[MaybeUninit<f32>]| {
                bits(
                    &v.iter()
                        .map(|m| unsafe { m.assume_init() })
                        .collect::<Vec<_>>(),
                )
            };
            let mut base = zeros();
            map1_loop(&mut base[0], &x, &gelu);
            map1_loop(&mut base[1], &x, &silu);
            map2_loop(&mut base[2], &x, &y, &div);
            let base: Vec<_> = base.iter().map(|v| read(v)).collect();
            let base_rows = rows();
            let mut tiers = 0;
            // One tier: its copies of the map loops and of a closure against the baseline's.
            macro_rules! check_tier {
                ($feature:tt, $map1:ident, $map2:ident, $with:ident) => {
                    if std::arch::is_x86_feature_detected!($feature) {
                        let mut wide = zeros();
                        // SAFETY: the CPU has the tier's instructions (checked above).
                        unsafe {
                            $map1(&mut wide[0], &x, &gelu);
                            $map1(&mut wide[1], &x, &silu);
                            $map2(&mut wide[2], &x, &y, &div);
                        }
                        for (w, b) in wide.iter().zip(&base) {
                            assert_eq!(&read(w), b, "{} map loop", $feature);
                        }
                        // SAFETY: as above.
                        let r = unsafe { $with(rows) };
                        assert!(
                            bits(&r.0) == bits(&base_rows.0)
                                && r.1 == base_rows.1
                                && r.2 == base_rows.2,
                            "{} closure copy",
                            $feature
                        );
                        tiers += 1;
                    }
                };
            }
            check_tier!("avx2", map1_loop_avx2, map2_loop_avx2, with_avx2);
            check_tier!("avx512f", map1_loop_avx512, map2_loop_avx512, with_avx512);
            if tiers == 0 {
                eprintln!("skipped: this CPU has neither AVX2 nor AVX-512F");
            }
        }
    }

    #[test]
    fn cpu_vectors_never_exceeds_what_the_cpu_runs() {
        assert!(cpu_vectors() <= CpuVectors::detected());
    }
}
