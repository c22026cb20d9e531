//! Launch wrapper of `kernels/quant.cu`: the nearest codebook row of every row of z (squared L2,
//! ties to the lowest index), a tiled search that never forms the N x V distance matrix.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::buffer::{BufferKind, CudaBuffer};
use crate::device::{launch_1d, launch_err};
use crate::kernels::{QUANT, QUANT_STEP};
use crate::ops::{check_lens, float_kind, MAX_GRID_Y};
use crate::{CudaDevice, CudaError};

/// Threads of a block of `nearest_code` (NC_THREADS, its `__launch_bounds__`).
const THREADS: u32 = 256;

/// Rows of z one block owns (NC_TM in quant.cu).
const ROWS_PER_BLOCK: usize = 64;

/// Codes one block compares per step (NC_TN in quant.cu): code ranges are multiples of it.
const CODES_PER_TILE: usize = 64;

/// Most blocks launched along the rows; blocks grid-stride over the remaining row tiles.
const MAX_BLOCKS: usize = 1 << 16;

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

/// How the rows of z lie in memory for [`nearest_code`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowLayout {
    /// [n, c], row-major.
    Rows,
    /// Feature maps [n / p, c, p] (NCHW with p = H * W): row i is pixel i % p of image i / p.
    Planes(usize),
}

/// ||e_v||^2 in f32 for every row of the codebook `e` [v, c] (f32 \[v\]): what [`nearest_code`]
/// computes first, for a caller that searches one codebook several times.
pub fn code_norms(
    dev: &CudaDevice,
    e: &CudaBuffer,
    v: usize,
    c: usize,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "code_norms";
    let kind = float_kind(OP, &[e])?;
    let sizes = format!("codebook [{v}, {c}]");
    let len = v
        .checked_mul(c)
        .filter(|&l| l <= i64::MAX as usize)
        .ok_or_else(|| CudaError::Launch {
            op: OP.to_string(),
            sizes: sizes.clone(),
            message: "element count overflows".into(),
        })?;
    check_lens(OP, &[(e, len)])?;
    let norms = dev.alloc(BufferKind::F32, v, "nearest_code codebook norms")?;
    if v == 0 {
        return Ok(norms);
    }
    let (pn, pe, nv, nc) = (norms.device_ptr(), e.device_ptr(), v as i64, c as i64);
    let f = dev.function(&QUANT, &format!("code_norms_{}", kind.suffix()))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pn).arg(&pe).arg(&nv).arg(&nc);
    // SAFETY: norms holds v f32s, e holds v*c elements of `kind`.
    unsafe { b.launch(launch_1d(v, THREADS)) }.map_err(launch_err(OP, sizes))?;
    Ok(norms)
}

/// Index (i64 \[n\]) of the nearest row of the codebook `e` [v, c] for every row of `z` (n rows of
/// c channels in `layout`): argmin over codes of ||e_v||^2 - 2 z . e_v in f32 (the argmin of the
/// squared distance), the lowest index among equal minima. f32 or bf16 (one kind for both);
/// v >= 1. `norms` are [`code_norms`] of e when the caller has them (else computed here). The
/// codebook is searched in `splits` ranges by separate blocks (the indices do not depend on it).
#[allow(clippy::too_many_arguments)]
pub fn nearest_code(
    dev: &CudaDevice,
    z: &CudaBuffer,
    e: &CudaBuffer,
    n: usize,
    v: usize,
    c: usize,
    splits: CodeSplits,
    layout: RowLayout,
    norms: Option<&CudaBuffer>,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "nearest_code";
    let kind = float_kind(OP, &[z, e])?;
    let sizes = match layout {
        RowLayout::Rows => format!("z [{n}, {c}], codebook [{v}, {c}]"),
        RowLayout::Planes(p) => format!("z [{n} / {p}, {c}, {p}], codebook [{v}, {c}]"),
    };
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
    let plane = match layout {
        RowLayout::Rows => 0,
        RowLayout::Planes(p) if p >= 1 && n.is_multiple_of(p) => p,
        RowLayout::Planes(_) => return Err(err("rows that are not whole planes")),
    };
    check_lens(OP, &[(z, zl), (e, el)])?;
    if let Some(nb) = norms {
        if nb.kind() != BufferKind::F32 || nb.len() != v {
            return Err(err("codebook norms that are not f32 [v]"));
        }
    }
    let out = dev.alloc(BufferKind::I64, n, "nearest_code output")?;
    if n == 0 {
        return Ok(out);
    }
    let suffix = kind.suffix();
    let own_norms = match norms {
        Some(_) => None,
        None => Some(code_norms(dev, e, v, c)?),
    };
    let norms = norms.or(own_norms.as_ref()).expect("one of the two is set");
    let (pn, pe, pz, po) = (
        norms.device_ptr(),
        e.device_ptr(),
        z.device_ptr(),
        out.device_ptr(),
    );
    let (nn, nv, nc, np) = (n as i64, v as i64, c as i64, plane as i64);
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
        .arg(&split_arg)
        .arg(&np);
    // SAFETY: out holds n i64s, z n*c and e v*c elements of `kind` (z's rows whole planes when
    // plane > 0), norms v f32s (written on the same stream); the kernel reads z and e only at
    // rows and channels inside [0, n) x [0, c) and [0, v) x [0, c); with several ranges it writes part_d / part_i [ranges][n] (allocated
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

/// Threads of `codes_bicubic` (one per pixel and group of CB_GROUP channels).
const STEP_THREADS: u32 = 256;
/// Channels one `codes_bicubic` thread interpolates (CB_GROUP in quant_step.cu).
const CB_GROUP: usize = 8;
/// Output tile side and output channels of one `phi_conv_acc` block (PHI_TILE, PHI_OCG).
const PHI_TILE: usize = 16;
const PHI_OCG: usize = 8;
/// Grid y and z limits of a launch.
const MAX_GRID_YZ: usize = 65535;

/// The sizes of one quantizer step (see [`phi_accumulate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepShape {
    /// Images.
    pub batch: usize,
    /// Channels of the codes and of acc.
    pub channels: usize,
    /// Codes in the codebook.
    pub codes: usize,
    /// The scale's token map [ph, pw].
    pub scale: (usize, usize),
    /// The full map [h, w] of acc.
    pub full: (usize, usize),
}

/// Phi's mix for [`phi_accumulate`]: Phi(u) = keep * u + ratio * (conv3x3(u) + bias) with the
/// weight [C, C, 3, 3] and an optional bias \[C\] (keep = 1 - ratio as the caller rounds it), or
/// the identity.
pub enum PhiMix<'a> {
    Identity,
    Conv {
        weight: &'a CudaBuffer,
        bias: Option<&'a CudaBuffer>,
        keep: f32,
        ratio: f32,
    },
}

/// acc + sign * Phi(bicubic_up(table\[idx\])) (`kernels/quant_step.cu`): one scale's update of
/// f_hat (sign +1) or of the residual (sign -1) in two launches. acc [B, C, h, w] and the table
/// [V, C] are f32 or bf16 (one kind, Phi's weights too); idx is i64 [B, ph*pw] with every entry
/// in [0, V), which the caller checks (on the host, or by taking [`nearest_code`]'s output): the
/// kernel only keeps a bad index from reading out of bounds, making its outputs NaN. Returns a
/// new buffer like acc.
pub fn phi_accumulate(
    dev: &CudaDevice,
    acc: &CudaBuffer,
    idx: &CudaBuffer,
    table: &CudaBuffer,
    phi: &PhiMix<'_>,
    shape: StepShape,
    sign: f32,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "phi_accumulate";
    let StepShape {
        batch,
        channels: c,
        codes: v,
        scale: (ph, pw),
        full: (h, w),
    } = shape;
    let sizes = format!("acc [{batch}, {c}, {h}, {w}], idx [{batch}, {ph}x{pw}], table [{v}, {c}]");
    let err = |message: &str| CudaError::Launch {
        op: OP.to_string(),
        sizes: sizes.clone(),
        message: message.to_string(),
    };
    let mut floats = vec![acc, table];
    if let PhiMix::Conv { weight, bias, .. } = phi {
        floats.push(weight);
        floats.extend(bias.iter().copied());
    }
    let kind = float_kind(OP, &floats)?;
    if idx.kind() != BufferKind::I64 {
        return Err(err("expected i64 indices"));
    }
    let count = |dims: &[usize]| {
        dims.iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= i64::MAX as usize / 16)
    };
    let (Some(acc_len), Some(idx_len), Some(table_len)) = (
        count(&[batch, c, h, w]),
        count(&[batch, ph, pw]),
        count(&[v, c]),
    ) else {
        return Err(err("element count overflows"));
    };
    if v == 0 || ph == 0 || pw == 0 || ph > h || pw > w {
        return Err(err(
            "expected a non-empty codebook and a token map no larger than the full map",
        ));
    }
    let mut lens = vec![(acc, acc_len), (idx, idx_len), (table, table_len)];
    if let PhiMix::Conv { weight, bias, .. } = phi {
        lens.push((weight, c * c * 9));
        lens.extend(bias.iter().map(|b| (*b, c)));
    }
    check_lens(OP, &lens)?;
    let out = dev.alloc(kind, acc_len, "phi_accumulate output")?;
    if acc_len == 0 {
        return Ok(out);
    }
    let suffix = kind.suffix();
    let u = dev.alloc(kind, acc_len, "phi_accumulate upsampled codes")?;
    let (bb, cc, vv, pph, ppw, hh, ww) = (
        batch as i64,
        c as i64,
        v as i64,
        ph as i64,
        pw as i64,
        h as i64,
        w as i64,
    );
    let (pu, pi, pt) = (u.device_ptr(), idx.device_ptr(), table.device_ptr());
    {
        let f = dev.function(&QUANT_STEP, &format!("codes_bicubic_{suffix}"))?;
        let threads = batch * c.div_ceil(CB_GROUP) * h * w;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&pu)
            .arg(&pi)
            .arg(&pt)
            .arg(&bb)
            .arg(&cc)
            .arg(&vv)
            .arg(&pph)
            .arg(&ppw)
            .arg(&hh)
            .arg(&ww);
        // SAFETY: u holds B*C*h*w elements, idx B*ph*pw i64s and table V*C elements, all checked
        // above; the kernel reads a table row only for an index in [0, V) and writes u only
        // inside it.
        unsafe { b.launch(launch_1d(threads, STEP_THREADS)) }
            .map_err(launch_err("phi_accumulate codes_bicubic", sizes.clone()))?;
    }
    let (pw_, pb, keep, ratio, use_conv) = match phi {
        PhiMix::Identity => (0, 0, 1.0f32, 0.0f32, 0i32),
        PhiMix::Conv {
            weight,
            bias,
            keep,
            ratio,
        } => (
            weight.device_ptr(),
            bias.map_or(0, |b| b.device_ptr()),
            *keep,
            *ratio,
            1,
        ),
    };
    let tiles = h.div_ceil(PHI_TILE) * w.div_ceil(PHI_TILE);
    let groups = c.div_ceil(PHI_OCG);
    if tiles > u32::MAX as usize || groups > MAX_GRID_YZ || batch > MAX_GRID_YZ {
        return Err(err(
            "more than 65535 images or channel groups of 8, or too many 16x16 tiles, for one launch",
        ));
    }
    let cfg = LaunchConfig {
        grid_dim: (tiles as u32, groups as u32, batch as u32),
        block_dim: ((PHI_TILE * PHI_TILE) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (po, pa) = (out.device_ptr(), acc.device_ptr());
    let f = dev.function(&QUANT_STEP, &format!("phi_conv_acc_{suffix}"))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po)
        .arg(&pa)
        .arg(&pu)
        .arg(&pw_)
        .arg(&pb)
        .arg(&cc)
        .arg(&hh)
        .arg(&ww)
        .arg(&keep)
        .arg(&ratio)
        .arg(&sign)
        .arg(&use_conv);
    // SAFETY: out, acc and u hold B*C*h*w elements, the weight C*C*9 and the bias C (or null,
    // which the kernel tests before reading; both unread with use_conv 0); every block's reads
    // are bounds-checked against C, h and w, and it writes only its own pixels of out.
    unsafe { b.launch(cfg) }.map_err(launch_err(OP, sizes.clone()))?;
    Ok(out)
}
