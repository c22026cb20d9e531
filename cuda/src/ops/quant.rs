//! Launch wrapper of `kernels/quant.cu`: the nearest codebook row of every row of z (squared L2,
//! ties to the lowest index), a tiled search that never forms the N x V distance matrix.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::buffer::{BufferKind, CudaBuffer};
use crate::device::{launch_1d, launch_err};
use crate::kernels::QUANT;
use crate::ops::{check_lens, float_kind};
use crate::{CudaDevice, CudaError};

/// Threads of a block of `nearest_code` (NC_THREADS, its `__launch_bounds__`).
const THREADS: u32 = 256;

/// Rows of z one block owns (NC_TM in quant.cu).
const ROWS_PER_BLOCK: usize = 64;

/// Codes one block compares per step (NC_TN in quant.cu): code ranges are multiples of it.
const CODES_PER_TILE: usize = 64;

/// Most blocks launched along the rows; blocks grid-stride over the remaining row tiles.
const MAX_BLOCKS: usize = 1 << 16;

/// The largest grid y extent: at most this many code ranges.
const MAX_GRID_Y: usize = 65535;

/// Blocks aimed at per multiprocessor: about two waves, as 4 blocks of the search are resident
/// per SM (256 threads of 64 registers each, NVRTC's figure for sm_80 and sm_90).
const BLOCKS_PER_SM: usize = 8;

/// How the codebook is cut into contiguous ranges searched by separate blocks (see quant.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeSplits {
    /// Enough ranges for about two waves of blocks (row tiles x ranges; `MVAR_NC_SPLITS=N`
    /// forces N).
    Auto,
    /// This many ranges (at most one per 64 codes); 1 is the single-pass reference variant.
    Fixed(usize),
}

impl CodeSplits {
    /// `MVAR_NC_SPLITS=N` (N >= 1) fixes the count; unset or anything else is `Auto`.
    pub fn from_env() -> CodeSplits {
        match std::env::var("MVAR_NC_SPLITS")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            Some(n) if n >= 1 => CodeSplits::Fixed(n),
            _ => CodeSplits::Auto,
        }
    }

    /// Codes per range for `n` rows and `v` codes on `dev` (a multiple of 64; the ranges are
    /// v.div_ceil(that) many).
    pub fn codes_per_split(self, dev: &CudaDevice, n: usize, v: usize) -> usize {
        let code_tiles = v.div_ceil(CODES_PER_TILE).max(1);
        let splits = match self {
            CodeSplits::Fixed(s) => s,
            CodeSplits::Auto => {
                let row_tiles = n.div_ceil(ROWS_PER_BLOCK).clamp(1, MAX_BLOCKS);
                (BLOCKS_PER_SM * dev.multiprocessors()).div_ceil(row_tiles)
            }
        }
        .clamp(1, code_tiles.min(MAX_GRID_Y));
        code_tiles.div_ceil(splits) * CODES_PER_TILE
    }
}

/// Index (i64 [n]) of the nearest row of the codebook `e` [v, c] for every row of `z` [n, c]:
/// argmin over codes of ||e_v||^2 - 2 z . e_v in f32 (the argmin of the squared distance), the
/// lowest index among equal minima. f32 or bf16 (one kind for both); v >= 1. The codebook is
/// searched in `splits` ranges by separate blocks (the indices do not depend on it).
pub fn nearest_code(
    dev: &CudaDevice,
    z: &CudaBuffer,
    e: &CudaBuffer,
    n: usize,
    v: usize,
    c: usize,
    splits: CodeSplits,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "nearest_code";
    let kind = float_kind(OP, &[z, e])?;
    let sizes = format!("z [{n}, {c}], codebook [{v}, {c}]");
    let err = |message: &str| CudaError::Launch {
        op: OP.to_string(),
        sizes: sizes.clone(),
        message: message.to_string(),
    };
    let (zl, el) = match (n.checked_mul(c), v.checked_mul(c)) {
        (Some(zl), Some(el)) if zl <= i64::MAX as usize && el <= i64::MAX as usize => (zl, el),
        _ => return Err(err("element count overflows")),
    };
    if v == 0 {
        return Err(err("an empty codebook"));
    }
    // Codes are counted in i64 on the device; a tile start v0 + 64 must not wrap.
    if v > (i64::MAX as usize) - 2 * ROWS_PER_BLOCK || n > (i64::MAX as usize) - ROWS_PER_BLOCK {
        return Err(err("too many rows or codes"));
    }
    check_lens(OP, &[(z, zl), (e, el)])?;
    let out = dev.alloc(BufferKind::I64, n, "nearest_code output")?;
    if n == 0 {
        return Ok(out);
    }
    let suffix = kind.suffix();
    let norms = dev.alloc(BufferKind::F32, v, "nearest_code codebook norms")?;
    let (pn, pe, pz, po) = (
        norms.device_ptr(),
        e.device_ptr(),
        z.device_ptr(),
        out.device_ptr(),
    );
    let (nn, nv, nc) = (n as i64, v as i64, c as i64);
    {
        let f = dev.function(&QUANT, &format!("code_norms_{suffix}"))?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&pn).arg(&pe).arg(&nv).arg(&nc);
        // SAFETY: norms holds v f32s, e holds v*c elements of `kind`.
        unsafe { b.launch(launch_1d(v, THREADS)) }
            .map_err(launch_err("nearest_code norms", sizes.clone()))?;
    }
    let split = splits.codes_per_split(dev, n, v);
    let ranges = v.div_ceil(split);
    // One range writes the indices itself; several write their best (distance, index) per row
    // for the combine kernel.
    let parts = if ranges > 1 {
        let len = ranges
            .checked_mul(n)
            .filter(|&l| l <= i64::MAX as usize)
            .ok_or_else(|| err("element count overflows"))?;
        Some((
            dev.alloc(BufferKind::F32, len, "nearest_code per-range distances")?,
            dev.alloc(BufferKind::I64, len, "nearest_code per-range indices")?,
        ))
    } else {
        None
    };
    let (pd, pi) = parts
        .as_ref()
        .map_or((0, 0), |(d, i)| (d.device_ptr(), i.device_ptr()));
    let f = dev.function(&QUANT, &format!("nearest_code_{suffix}"))?;
    let cfg = LaunchConfig {
        grid_dim: (
            n.div_ceil(ROWS_PER_BLOCK).clamp(1, MAX_BLOCKS) as u32,
            ranges as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let split_arg = split as i64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po)
        .arg(&pd)
        .arg(&pi)
        .arg(&pz)
        .arg(&pe)
        .arg(&pn)
        .arg(&nn)
        .arg(&nv)
        .arg(&nc)
        .arg(&split_arg);
    // SAFETY: out holds n i64s, z n*c and e v*c elements of `kind`, norms v f32s (written by the
    // launch above on the same stream); the kernel reads z and e only inside [0, n) x [0, c)
    // and [0, v) x [0, c); with several ranges it writes part_d / part_i [ranges][n] (allocated
    // above) instead of out, and with one it is given null for them and never touches them.
    unsafe { b.launch(cfg) }.map_err(launch_err(OP, sizes.clone()))?;
    if parts.is_some() {
        let f = dev.function(&QUANT, "nearest_code_combine")?;
        let ranges_arg = ranges as i32;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&po).arg(&pd).arg(&pi).arg(&nn).arg(&ranges_arg);
        // SAFETY: part_d / part_i hold ranges * n entries written by the search above on the
        // same stream; out holds n i64s.
        unsafe { b.launch(launch_1d(n, THREADS)) }
            .map_err(launch_err("nearest_code combine", sizes.clone()))?;
    }
    Ok(out)
}
