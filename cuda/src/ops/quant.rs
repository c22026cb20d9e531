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

/// Most blocks launched; blocks grid-stride over the remaining row tiles.
const MAX_BLOCKS: usize = 1 << 16;

/// Index (i64 [n]) of the nearest row of the codebook `e` [v, c] for every row of `z` [n, c]:
/// argmin over codes of ||e_v||^2 - 2 z . e_v in f32 (the argmin of the squared distance), the
/// lowest index among equal minima. f32 or bf16 (one kind for both); v >= 1.
pub fn nearest_code(
    dev: &CudaDevice,
    z: &CudaBuffer,
    e: &CudaBuffer,
    n: usize,
    v: usize,
    c: usize,
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
    let f = dev.function(&QUANT, &format!("nearest_code_{suffix}"))?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(ROWS_PER_BLOCK).clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po)
        .arg(&pz)
        .arg(&pe)
        .arg(&pn)
        .arg(&nn)
        .arg(&nv)
        .arg(&nc);
    // SAFETY: out holds n i64s, z n*c and e v*c elements of `kind`, norms v f32s (written by the
    // launch above on the same stream); the kernel reads z and e only inside [0, n) x [0, c)
    // and [0, v) x [0, c).
    unsafe { b.launch(cfg) }.map_err(launch_err(OP, sizes.clone()))?;
    Ok(out)
}
