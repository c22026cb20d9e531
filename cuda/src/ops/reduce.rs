//! Launch wrappers of `kernels/reduce.cu`: sum along an axis, argmax, and the gather/scatter
//! pair behind max/min. Every input is a dense buffer seen as `[outer, n, inner]` around the
//! reduced axis; outputs are `[outer, inner]`.
//!
//! Also the launch geometry shared by the row kernels of `softmax.cu` and `norm.cu` (one block
//! per row).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::buffer::{BufferKind, CudaBuffer};
use crate::device::{launch_1d, launch_err};
use crate::kernels::REDUCE;
use crate::ops::{check_lens, float_kind};
use crate::{CudaDevice, CudaError};

/// Threads of a one-thread-per-element kernel.
const THREADS: u32 = 256;

/// Most threads a row kernel uses (`ROW_THREADS_MAX`, its `__launch_bounds__`, in the .cu files).
pub const ROW_THREADS_MAX: u32 = 512;

/// Most blocks launched; row kernels grid-stride over the rest.
pub(crate) const MAX_BLOCKS: usize = 1 << 16;

/// Rows one block of `argmax_rows` handles at a time (one warp each, 256 threads).
const ARGMAX_ROWS_PER_BLOCK: usize = THREADS as usize / 32;

/// Threads for a block that reduces a row of `n` elements: about four elements a thread, a
/// whole number of warps (block_sum needs it), at least one warp and at most
/// [`ROW_THREADS_MAX`]. Short rows get one warp instead of a mostly idle block.
pub fn row_threads(n: usize) -> u32 {
    let want = n.div_ceil(4).div_ceil(32) * 32;
    want.clamp(32, ROW_THREADS_MAX as usize) as u32
}

/// One block per row (grid-striding beyond `MAX_BLOCKS` rows) of `n` elements.
pub fn row_launch(rows: usize, n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (row_threads(n), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per row, eight rows a block.
fn warp_row_launch(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            rows.div_ceil(ARGMAX_ROWS_PER_BLOCK).clamp(1, MAX_BLOCKS) as u32,
            1,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The product of `dims`, or an error naming `op` when it overflows.
pub(crate) fn volume(op: &str, dims: &[usize]) -> Result<usize, CudaError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| CudaError::Launch {
            op: op.to_string(),
            sizes: format!("{dims:?}"),
            message: "the element count overflows".into(),
        })
}

pub(crate) fn require_kind(
    op: &str,
    b: &CudaBuffer,
    what: &str,
    kind: BufferKind,
) -> Result<(), CudaError> {
    if b.kind() != kind {
        return Err(CudaError::Launch {
            op: op.to_string(),
            sizes: format!("{what}: {:?}[{}]", b.kind(), b.len()),
            message: format!("expected {kind:?} {what}"),
        });
    }
    Ok(())
}

/// Which sum kernels run: `MVAR_SUM_KERNEL=naive` forces the one-pass kernels (one block per
/// row, one thread per column), the reference variant of the tiled and split ones.
pub fn naive_sum_kernels() -> bool {
    matches!(
        std::env::var("MVAR_SUM_KERNEL")
            .ok()
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref(),
        Some("naive")
    )
}

/// Columns and rows of threads of a `sum_cols_tiled` block (`COL_TILE`, `COL_ROWS` in the .cu).
const COL_TILE: usize = 32;
const COL_ROWS: u32 = 8;
/// Fewest elements of the reduced axis per chunk when it is split: below this a chunk's block
/// does too little to pay for its partial's write and read.
const MIN_COL_CHUNK: usize = 64;
const MIN_ROW_CHUNK: usize = 2048;
/// Most chunks per reduction (the second pass reads `splits` partials per output).
const MAX_SPLITS: usize = 1024;

/// Chunks to cut the reduced axis of `n` elements into when `blocks` blocks would run without
/// splitting: enough for about four blocks per multiprocessor, each chunk at least `min_chunk`
/// long. 1: no split.
fn splits_for(blocks: usize, n: usize, min_chunk: usize, multiprocessors: usize) -> usize {
    let target = 4 * multiprocessors.max(1);
    if blocks >= target {
        return 1;
    }
    let splits = target
        .div_ceil(blocks.max(1))
        .min(n / min_chunk)
        .clamp(1, MAX_SPLITS);
    // Every chunk non-empty: the same count as the kernels' grid.
    n.div_ceil(n.div_ceil(splits))
}

/// Sum of `x` [outer, n, inner] over n, as [outer, inner] of x's kind (f32 accumulation).
pub fn sum_axis(
    dev: &CudaDevice,
    x: &CudaBuffer,
    outer: usize,
    n: usize,
    inner: usize,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "sum";
    let kind = float_kind(OP, &[x])?;
    check_lens(OP, &[(x, volume(OP, &[outer, n, inner])?)])?;
    let m = outer * inner;
    if m == 0 || n == 0 {
        return dev.zeros(kind, m);
    }
    let out = dev.alloc(kind, m, "sum output")?;
    let sizes = format!("[{outer}, {n}, {inner}]");
    let (po, px) = (out.device_ptr(), x.device_ptr());
    let (o, nn, i) = (outer as i64, n as i64, inner as i64);
    let suffix = kind.suffix();
    let naive = naive_sum_kernels();
    let sms = dev.multiprocessors();
    if inner == 1 {
        let splits = if naive || outer >= sms || outer > u16::MAX as usize {
            1
        } else {
            splits_for(outer, n, MIN_ROW_CHUNK, sms)
        };
        if splits == 1 {
            let f = dev.function(&REDUCE, &format!("sum_rows_{suffix}"))?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&po).arg(&px).arg(&o).arg(&nn);
            // SAFETY: x holds outer * n elements and out outer, of `kind`.
            unsafe { b.launch(row_launch(outer, n)) }.map_err(launch_err(OP, sizes))?;
            return Ok(out);
        }
        let chunk = n.div_ceil(splits);
        let part = dev.alloc(BufferKind::F32, outer * splits, "sum partials")?;
        let pp = part.device_ptr();
        let (ch, sp) = (chunk as i64, splits as i64);
        let f = dev.function(&REDUCE, &format!("sum_row_chunks_{suffix}"))?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&pp).arg(&px).arg(&o).arg(&nn).arg(&ch);
        let cfg = LaunchConfig {
            grid_dim: (splits as u32, outer as u32, 1),
            block_dim: (row_threads(chunk), 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x holds outer * n elements of `kind`; part holds outer * splits f32, one per
        // block of the grid (splits x outer).
        unsafe { b.launch(cfg) }.map_err(launch_err(OP, sizes.clone()))?;
        let f = dev.function(&REDUCE, &format!("sum_rows_from_f32_{suffix}"))?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&po).arg(&pp).arg(&o).arg(&sp);
        // SAFETY: part holds outer * splits f32 and out outer elements of `kind`.
        unsafe { b.launch(row_launch(outer, splits)) }.map_err(launch_err(OP, sizes))?;
        return Ok(out);
    }
    let tiles = inner.div_ceil(COL_TILE);
    let blocks = tiles.checked_mul(outer).filter(|&b| b <= i32::MAX as usize);
    let Some(blocks) = blocks.filter(|_| !naive) else {
        let f = dev.function(&REDUCE, &format!("sum_cols_{suffix}"))?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&po).arg(&px).arg(&o).arg(&nn).arg(&i);
        // SAFETY: x holds outer * n * inner elements and out outer * inner, of `kind`.
        unsafe { b.launch(launch_1d(m, THREADS)) }.map_err(launch_err(OP, sizes))?;
        return Ok(out);
    };
    let tile_launch = |blocks: usize, splits: usize| LaunchConfig {
        grid_dim: (blocks as u32, 1, splits as u32),
        block_dim: (COL_TILE as u32, COL_ROWS, 1),
        shared_mem_bytes: 0,
    };
    let splits = splits_for(blocks, n, MIN_COL_CHUNK, sms);
    if splits == 1 {
        let f = dev.function(&REDUCE, &format!("sum_cols_tiled_{suffix}"))?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&po).arg(&px).arg(&o).arg(&nn).arg(&i);
        // SAFETY: x holds outer * n * inner elements and out outer * inner, of `kind`; the grid
        // covers outer * ceil(inner / 32) tiles of 32 columns.
        unsafe { b.launch(tile_launch(blocks, 1)) }.map_err(launch_err(OP, sizes))?;
        return Ok(out);
    }
    let chunk = n.div_ceil(splits);
    let part = dev.alloc(BufferKind::F32, splits * m, "sum partials")?;
    let pp = part.device_ptr();
    let (ch, sp, mm) = (chunk as i64, splits as i64, m as i64);
    let f = dev.function(&REDUCE, &format!("sum_col_chunks_{suffix}"))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pp).arg(&px).arg(&o).arg(&nn).arg(&i).arg(&ch);
    // SAFETY: x holds outer * n * inner elements of `kind`; part holds splits * outer * inner f32,
    // chunk c of the grid's z writing the c-th [outer * inner] slice.
    unsafe { b.launch(tile_launch(blocks, splits)) }.map_err(launch_err(OP, sizes.clone()))?;
    let f = dev.function(&REDUCE, &format!("sum_cols_from_f32_{suffix}"))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po).arg(&pp).arg(&sp).arg(&mm);
    // SAFETY: part holds splits * m f32 and out m elements of `kind`; the grid covers
    // ceil(m / 32) tiles of 32 columns.
    unsafe { b.launch(tile_launch(m.div_ceil(COL_TILE), 1)) }.map_err(launch_err(OP, sizes))?;
    Ok(out)
}

/// Index (i64) of the first largest element of `x` [outer, n, inner] along n, NaN counting as
/// the largest; any element kind. `n` must be at least 1 when the output is not empty.
pub fn argmax(
    dev: &CudaDevice,
    x: &CudaBuffer,
    outer: usize,
    n: usize,
    inner: usize,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "argmax";
    check_lens(OP, &[(x, volume(OP, &[outer, n, inner])?)])?;
    let m = outer * inner;
    let sizes = format!("[{outer}, {n}, {inner}]");
    if m == 0 {
        return dev.alloc(BufferKind::I64, 0, "argmax output");
    }
    if n == 0 {
        return Err(CudaError::Launch {
            op: OP.into(),
            sizes,
            message: "argmax over an empty axis".into(),
        });
    }
    let out = dev.alloc(BufferKind::I64, m, "argmax output")?;
    let (po, px) = (out.device_ptr(), x.device_ptr());
    let (o, nn, i) = (outer as i64, n as i64, inner as i64);
    let suffix = x.kind().suffix();
    if inner == 1 {
        let f = dev.function(&REDUCE, &format!("argmax_rows_{suffix}"))?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&po).arg(&px).arg(&o).arg(&nn);
        // SAFETY: x holds outer * n elements of its kind, out outer i64s.
        unsafe { b.launch(warp_row_launch(outer)) }.map_err(launch_err(OP, sizes))?;
    } else {
        let f = dev.function(&REDUCE, &format!("argmax_cols_{suffix}"))?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&po).arg(&px).arg(&o).arg(&nn).arg(&i);
        // SAFETY: x holds outer * n * inner elements of its kind, out outer * inner i64s.
        unsafe { b.launch(launch_1d(m, THREADS)) }.map_err(launch_err(OP, sizes))?;
    }
    Ok(out)
}

/// out[o, i] = x[o, idx[o, i], i] for x [outer, n, inner] (f32/bf16) and idx [outer, inner]
/// (i64); an index outside [0, n) gives NaN.
pub fn gather_along(
    dev: &CudaDevice,
    x: &CudaBuffer,
    idx: &CudaBuffer,
    outer: usize,
    n: usize,
    inner: usize,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "max";
    let kind = float_kind(OP, &[x])?;
    require_kind(OP, idx, "indices", BufferKind::I64)?;
    let m = volume(OP, &[outer, inner])?;
    check_lens(OP, &[(x, volume(OP, &[outer, n, inner])?), (idx, m)])?;
    let out = dev.alloc(kind, m, "max output")?;
    if m == 0 {
        return Ok(out);
    }
    let f = dev.function(&REDUCE, &format!("gather_along_{}", kind.suffix()))?;
    let (po, px, pi) = (out.device_ptr(), x.device_ptr(), idx.device_ptr());
    let (o, nn, i) = (outer as i64, n as i64, inner as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po).arg(&px).arg(&pi).arg(&o).arg(&nn).arg(&i);
    // SAFETY: lengths checked above; the kernel reads x only at indices inside [0, n).
    unsafe { b.launch(launch_1d(m, THREADS)) }
        .map_err(launch_err(OP, format!("[{outer}, {n}, {inner}]")))?;
    Ok(out)
}

/// dx [outer, n, inner] with dx[o, s, i] = g[o, i] where s == idx[o, i] and 0 elsewhere (the
/// backward of [`gather_along`]); g f32/bf16 [outer, inner], idx i64 [outer, inner].
pub fn scatter_along(
    dev: &CudaDevice,
    g: &CudaBuffer,
    idx: &CudaBuffer,
    outer: usize,
    n: usize,
    inner: usize,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "max backward";
    let kind = float_kind(OP, &[g])?;
    require_kind(OP, idx, "indices", BufferKind::I64)?;
    let m = volume(OP, &[outer, inner])?;
    check_lens(OP, &[(g, m), (idx, m)])?;
    let total = volume(OP, &[outer, n, inner])?;
    let out = dev.alloc(kind, total, "max backward output")?;
    if total == 0 {
        return Ok(out);
    }
    let f = dev.function(&REDUCE, &format!("scatter_along_{}", kind.suffix()))?;
    let (po, pg, pi) = (out.device_ptr(), g.device_ptr(), idx.device_ptr());
    let (o, nn, i) = (outer as i64, n as i64, inner as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po).arg(&pg).arg(&pi).arg(&o).arg(&nn).arg(&i);
    // SAFETY: out holds outer * n * inner elements, g and idx outer * inner.
    unsafe { b.launch(launch_1d(total, THREADS)) }
        .map_err(launch_err(OP, format!("[{outer}, {n}, {inner}]")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_threads_are_whole_warps_within_bounds() {
        assert_eq!(row_threads(0), 32);
        assert_eq!(row_threads(1), 32);
        assert_eq!(row_threads(128), 32);
        assert_eq!(row_threads(129), 64);
        assert_eq!(row_threads(1024), 256);
        assert_eq!(row_threads(1 << 20), ROW_THREADS_MAX);
        for n in [3, 77, 255, 513, 4097, 1_000_003] {
            let t = row_threads(n);
            assert_eq!(t % 32, 0, "{n}");
            assert!((32..=ROW_THREADS_MAX).contains(&t), "{n}");
        }
    }

    #[test]
    fn row_launch_has_one_block_per_row_up_to_the_cap() {
        assert_eq!(row_launch(0, 10).grid_dim.0, 1);
        assert_eq!(row_launch(7, 10).grid_dim.0, 7);
        assert_eq!(row_launch(1 << 20, 10).grid_dim.0, 1 << 16);
        assert_eq!(warp_row_launch(8).grid_dim.0, 1);
        assert_eq!(warp_row_launch(9).grid_dim.0, 2);
        assert_eq!(warp_row_launch(1 << 30).grid_dim.0, 1 << 16);
    }

    #[test]
    fn volume_reports_overflow() {
        assert_eq!(volume("t", &[2, 3, 4]).unwrap(), 24);
        assert_eq!(volume("t", &[]).unwrap(), 1);
        assert!(volume("t", &[usize::MAX, 2]).is_err());
    }
}
