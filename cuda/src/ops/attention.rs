//! Launch wrappers of `kernels/attention.cu`: fused scaled dot-product attention, forward (the
//! output and the per-row log-sum-exp, f32) and backward (dq, dk, dv), without an Lq x Lk matrix
//! in memory.
//!
//! Buffers: q [B*H, Lq, D], k [B*H, Lk, D], v [B*H, Lk, Dv], output and its gradient
//! [B*H, Lq, Dv], log-sum-exp [B*H, Lq] f32, all dense and of one float kind (f32 or bf16).
//!
//! Three kernel families compute the same thing (see the file header of `attention.cu`):
//! - mma (bf16 tensor cores, flash-style): bf16 buffers on an sm_80+ GPU, no mask or the two
//!   scale-block masks, head dims d == dv, a multiple of 8 up to 128 (compiled for 64 and 128;
//!   smaller dims run padded), 16-byte aligned buffers, and the shared memory (55 KB for
//!   D = 64, 103 KB for D = 128).
//! - tiled (f32 CUDA cores, flash-style, online softmax): f32 or bf16, the same masks, head dims
//!   d == dv <= 128, when the device has the shared memory (about 86 KB for D = 64, 150 KB for
//!   D = 128).
//! - naive (reference): one block per query or key row, any d and dv, and also the additive mask.
//!
//! The backward of both tiled families is a key-tile-major dK/dV pass plus a separate
//! query-major dQ pass (no atomics, deterministic). [`AttnKernel::Auto`] takes the first family
//! that applies in that order; `MVAR_ATTN_KERNEL=mma|tiled|naive` (read by
//! [`AttnKernel::from_env`]) asks for one, so they can be compared and benchmarked on the same
//! inputs.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::buffer::{BufferKind, CudaBuffer, HostData};
use crate::device::launch_err;
use crate::kernels::ATTENTION;
use crate::ops::reduce::{require_kind, volume};
use crate::ops::{check_lens, float_kind, MAX_GRID_Y};
use crate::{CudaDevice, CudaError};

/// Rows of every tile of the tiled kernels (`ATT_TILE`).
const TILE: usize = 64;
/// Threads of the mma kernels (`ATT_MMA_THREADS`: four warps).
const MMA_THREADS: u32 = 128;
/// Threads of the naive kernels (`NAIVE_THREADS`).
const NAIVE_THREADS: u32 = 128;
/// Threads of the delta kernel (one warp per row).
const DELTA_THREADS: u32 = 256;
/// Shared memory a kernel gets without opting in.
const DEFAULT_SMEM: usize = 48 * 1024;
const LOG2E: f32 = std::f32::consts::LOG2_E;

/// Which (query, key) pairs attend.
#[derive(Debug, Clone, Copy)]
pub enum AttnMask<'a> {
    /// Every query sees every key (also the KV-cache decode form, Lq < Lk).
    None,
    /// Consecutive scales of these lengths (Lq == Lk == their sum); query i sees key j iff
    /// scale(i) >= scale(j).
    BlockCausal(&'a [usize]),
    /// Like `BlockCausal` with scale(i) == scale(j).
    BlockDiagonal(&'a [usize]),
    /// f32 values added to the scaled scores, read at `b * s[0] + h * s[1] + i * s[2] + j * s[3]`
    /// (strides over [B, H, Lq, Lk], 0 on broadcast axes). Naive kernels only.
    Additive {
        values: &'a CudaBuffer,
        strides: [usize; 4],
    },
}

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub heads: usize,
    pub lq: usize,
    pub lk: usize,
    /// Head dim of q and k.
    pub d: usize,
    /// Head dim of v (and of the output).
    pub dv: usize,
}

/// Which kernel family a call asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnKernel {
    /// The mma kernels where they apply, else the tiled ones, else the naive ones.
    Auto,
    /// The bf16 tensor-core kernels; an error where they do not apply.
    Mma,
    /// The tiled f32 CUDA-core kernels; an error where they do not apply.
    Tiled,
    /// The naive reference kernels.
    Naive,
}

impl AttnKernel {
    /// `MVAR_ATTN_KERNEL`: `mma` (or `tensor`), `tiled` or `naive` pick that family, anything
    /// else (or unset) is [`AttnKernel::Auto`].
    pub fn from_env() -> AttnKernel {
        AttnKernel::parse(std::env::var("MVAR_ATTN_KERNEL").ok().as_deref())
    }

    /// The family a value of `MVAR_ATTN_KERNEL` names.
    pub fn parse(value: Option<&str>) -> AttnKernel {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            Some("naive") => AttnKernel::Naive,
            Some("tiled") => AttnKernel::Tiled,
            Some("mma") | Some("tensor") => AttnKernel::Mma,
            _ => AttnKernel::Auto,
        }
    }
}

/// The kernel family that runs a call, after the fallbacks of [`AttnKernel::Auto`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnFamily {
    /// bf16 tensor cores, head-dim tile 64 or 128.
    Mma(usize),
    /// f32 CUDA cores, head-dim tile 64 or 128.
    Tiled(usize),
    Naive,
}

/// Mirror of `struct AttnMaskArg` in attention.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct MaskArg {
    bounds: u64,
    add: u64,
    add_strides: [i64; 4],
    nsc: i32,
    mode: i32,
}

// SAFETY: plain old data with the C layout of the device struct.
unsafe impl DeviceRepr for MaskArg {}

/// Mirror of `struct AttnDims` in attention.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Dims {
    bh: i32,
    heads: i32,
    lq: i32,
    lk: i32,
    d: i32,
    dv: i32,
}

// SAFETY: plain old data with the C layout of the device struct.
unsafe impl DeviceRepr for Dims {}

const MASK_NONE: i32 = 0;
const MASK_BLOCK_CAUSAL: i32 = 1;
const MASK_BLOCK_DIAGONAL: i32 = 2;
const MASK_ADDITIVE: i32 = 3;

/// Shared memory (bytes) of each tiled kernel for head-dim tile `td`: [64][td + 4] f32 tiles
/// and [64][68] score tiles (see the kernels).
fn smem_fwd(td: usize) -> usize {
    4 * (3 * TILE * (td + 4) + TILE * (TILE + 4))
}
fn smem_dkdv(td: usize) -> usize {
    4 * (4 * TILE * (td + 4) + TILE * (TILE + 4) + 4 * TILE)
}
fn smem_dq(td: usize) -> usize {
    4 * (4 * TILE * (td + 4) + TILE * (TILE + 4))
}

/// Shared memory (bytes) of the mma kernels: bf16 [64][td + 8] tiles, two stages of (K, V) for
/// the forward and dQ; the block's K and V, two stages of (Q, dO) and two of the f32 row
/// statistics for dK/dV.
fn smem_mma_fwd(td: usize) -> usize {
    2 * 4 * TILE * (td + 8)
}
fn smem_mma_dkdv(td: usize) -> usize {
    2 * 6 * TILE * (td + 8) + 4 * 4 * TILE
}

/// A checked call: the kernel family, the argument structs and the uploaded scale bounds.
struct Plan {
    kind: BufferKind,
    dims: Dims,
    mask: MaskArg,
    family: AttnFamily,
    bh: usize,
    /// Keeps the uploaded scale bounds alive until the launches are queued (the allocator
    /// orders reuse on the one stream).
    _bounds: Option<CudaBuffer>,
}

fn launch_error(op: &str, s: &AttnShape, message: impl Into<String>) -> CudaError {
    CudaError::Launch {
        op: op.to_string(),
        sizes: sizes(s),
        message: message.into(),
    }
}

fn sizes(s: &AttnShape) -> String {
    format!(
        "q [{}, {}, {}, {}], k [.., {}, {}], v [.., {}, {}]",
        s.batch, s.heads, s.lq, s.d, s.lk, s.d, s.lk, s.dv
    )
}

fn to_i32(op: &str, s: &AttnShape, what: &str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| launch_error(op, s, format!("{what} = {v} exceeds 2^31 - 1")))
}

/// The head-dim tile of the mma kernels for this call, or why they do not apply. `bufs`: every
/// buffer the kernels read or write through 16-byte accesses.
fn mma_tile(
    dev: &CudaDevice,
    kind: BufferKind,
    s: &AttnShape,
    mask: &AttnMask<'_>,
    bufs: &[&CudaBuffer],
) -> Result<usize, String> {
    if kind != BufferKind::BF16 {
        return Err(format!(
            "the mma kernels take bf16 buffers (got {})",
            kind.suffix()
        ));
    }
    if matches!(mask, AttnMask::Additive { .. }) {
        return Err("the mma kernels do not take an additive mask".into());
    }
    if s.d != s.dv || s.d == 0 || s.d > 128 || !s.d.is_multiple_of(8) {
        return Err(format!(
            "the mma kernels need equal q/k and v head dims, a multiple of 8 up to 128 (got {} and {})",
            s.d, s.dv
        ));
    }
    if !dev.has_bf16_mma() {
        return Err(format!(
            "the mma kernels need an sm_80 or newer GPU (this one is {})",
            dev.arch()
        ));
    }
    if bufs.iter().any(|b| b.device_ptr() % 16 != 0) {
        return Err("the mma kernels need 16-byte aligned buffers".into());
    }
    let td = if s.d <= 64 { 64 } else { 128 };
    let need = smem_mma_fwd(td).max(smem_mma_dkdv(td));
    let have = dev.max_smem_optin();
    if need > have {
        return Err(format!(
            "the mma kernels for head dim {td} need {need} bytes of shared memory; the device allows {have}"
        ));
    }
    Ok(td)
}

/// The head-dim tile of the tiled kernels for this call, or why they do not apply.
fn tiled_tile(dev: &CudaDevice, s: &AttnShape, mask: &AttnMask<'_>) -> Result<usize, String> {
    if matches!(mask, AttnMask::Additive { .. }) {
        return Err("the tiled kernels do not take an additive mask".into());
    }
    if s.d != s.dv || s.d == 0 || s.d > 128 {
        return Err(format!(
            "the tiled kernels need equal q/k and v head dims in 1..=128 (got {} and {})",
            s.d, s.dv
        ));
    }
    let td = if s.d <= 64 { 64 } else { 128 };
    let need = smem_fwd(td).max(smem_dkdv(td)).max(smem_dq(td));
    let have = dev.max_smem_optin();
    if need > have {
        return Err(format!(
            "the tiled kernels for head dim {td} need {need} bytes of shared memory; the device allows {have}"
        ));
    }
    Ok(td)
}

/// The family `kernel` resolves to for a call with buffers of `kind` (16-byte aligned, as the
/// allocator gives them), or why the family it names does not apply.
fn resolve(
    dev: &CudaDevice,
    kind: BufferKind,
    s: &AttnShape,
    mask: &AttnMask<'_>,
    kernel: AttnKernel,
    bufs: &[&CudaBuffer],
) -> Result<AttnFamily, String> {
    Ok(match kernel {
        AttnKernel::Naive => AttnFamily::Naive,
        AttnKernel::Mma => AttnFamily::Mma(mma_tile(dev, kind, s, mask, bufs)?),
        AttnKernel::Tiled => AttnFamily::Tiled(tiled_tile(dev, s, mask)?),
        AttnKernel::Auto => match mma_tile(dev, kind, s, mask, bufs) {
            Ok(td) => AttnFamily::Mma(td),
            Err(_) => match tiled_tile(dev, s, mask) {
                Ok(td) => AttnFamily::Tiled(td),
                Err(_) => AttnFamily::Naive,
            },
        },
    })
}

/// The family `kernel` runs for a call of this shape and mask with aligned buffers of `kind`
/// (for tests and benchmarks; the wrappers decide the same way), or why the family it names
/// does not apply.
pub fn family(
    dev: &CudaDevice,
    kind: BufferKind,
    s: &AttnShape,
    mask: &AttnMask<'_>,
    kernel: AttnKernel,
) -> Result<AttnFamily, String> {
    resolve(dev, kind, s, mask, kernel, &[])
}

/// Checks a call and picks its kernels; `more`: the backward's further buffers (dO and the
/// output), which the mma kernels also read with 16-byte accesses.
#[allow(clippy::too_many_arguments)]
fn plan(
    op: &str,
    dev: &CudaDevice,
    q: &CudaBuffer,
    k: &CudaBuffer,
    v: &CudaBuffer,
    more: &[&CudaBuffer],
    s: &AttnShape,
    mask: &AttnMask<'_>,
    kernel: AttnKernel,
) -> Result<Plan, CudaError> {
    let kind = float_kind(op, &[q, k, v])?;
    let bh = volume(op, &[s.batch, s.heads])?;
    check_lens(
        op,
        &[
            (q, volume(op, &[bh, s.lq, s.d])?),
            (k, volume(op, &[bh, s.lk, s.d])?),
            (v, volume(op, &[bh, s.lk, s.dv])?),
        ],
    )?;
    let dims = Dims {
        bh: to_i32(op, s, "B * H", bh)?,
        heads: to_i32(op, s, "H", s.heads)?,
        lq: to_i32(op, s, "Lq", s.lq)?,
        lk: to_i32(op, s, "Lk", s.lk)?,
        d: to_i32(op, s, "D", s.d)?,
        dv: to_i32(op, s, "Dv", s.dv)?,
    };
    let mut arg = MaskArg {
        bounds: 0,
        add: 0,
        add_strides: [0; 4],
        nsc: 0,
        mode: MASK_NONE,
    };
    let mut bounds_buf = None;
    match mask {
        AttnMask::None => {}
        AttnMask::BlockCausal(lens) | AttnMask::BlockDiagonal(lens) => {
            let mut bounds = Vec::with_capacity(lens.len() + 1);
            bounds.push(0i64);
            let mut total = 0usize;
            for &n in lens.iter() {
                total = total
                    .checked_add(n)
                    .ok_or_else(|| launch_error(op, s, "the scale lengths overflow"))?;
                bounds.push(total as i64);
            }
            if total != s.lq || s.lq != s.lk {
                return Err(launch_error(
                    op,
                    s,
                    format!(
                        "block mask with scale lengths summing to {total}; expected Lq == Lk == the sum"
                    ),
                ));
            }
            arg.nsc = to_i32(op, s, "the number of scales", lens.len())?;
            arg.mode = if matches!(mask, AttnMask::BlockCausal(_)) {
                MASK_BLOCK_CAUSAL
            } else {
                MASK_BLOCK_DIAGONAL
            };
            if !lens.is_empty() {
                let buf = dev.upload(HostData::I64(&bounds))?;
                arg.bounds = buf.device_ptr();
                bounds_buf = Some(buf);
            }
        }
        AttnMask::Additive { values, strides } => {
            require_kind(op, values, "the additive mask", BufferKind::F32)?;
            let extent = [s.batch, s.heads, s.lq, s.lk];
            if extent.iter().all(|&n| n > 0) {
                // The largest offset read must lie inside the mask.
                let last = extent
                    .iter()
                    .zip(strides)
                    .try_fold(0usize, |acc, (&n, &st)| {
                        (n - 1).checked_mul(st).and_then(|x| acc.checked_add(x))
                    });
                if !matches!(last, Some(l) if l < values.len()) {
                    return Err(launch_error(
                        op,
                        s,
                        format!(
                            "additive mask of {} elements read through strides {strides:?}",
                            values.len()
                        ),
                    ));
                }
            }
            for (dst, &st) in arg.add_strides.iter_mut().zip(strides) {
                *dst = i64::try_from(st)
                    .map_err(|_| launch_error(op, s, "an additive mask stride overflows"))?;
            }
            arg.add = values.device_ptr();
            arg.mode = MASK_ADDITIVE;
        }
    }
    let mut bufs = vec![q, k, v];
    bufs.extend_from_slice(more);
    let family = resolve(dev, kind, s, mask, kernel, &bufs).map_err(|m| launch_error(op, s, m))?;
    Ok(Plan {
        kind,
        dims,
        mask: arg,
        family,
        bh,
        _bounds: bounds_buf,
    })
}

/// A 2-D launch: `x` blocks along the rows (or tiles) of a head, the heads along y.
fn config(
    op: &str,
    f: &CudaFunction,
    x: usize,
    bh: usize,
    threads: u32,
    smem: usize,
) -> Result<LaunchConfig, CudaError> {
    if smem > DEFAULT_SMEM {
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(launch_err(op, format!("{smem} bytes of shared memory")))?;
    }
    Ok(LaunchConfig {
        grid_dim: (x as u32, bh.clamp(1, MAX_GRID_Y) as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    })
}

/// Attention forward. Returns (out [B*H, Lq, Dv] of q's kind, lse [B*H, Lq] f32, the natural
/// log-sum-exp of each row's scaled scores, -inf for a row that sees no key).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    dev: &CudaDevice,
    q: &CudaBuffer,
    k: &CudaBuffer,
    v: &CudaBuffer,
    shape: AttnShape,
    scale: f32,
    mask: &AttnMask<'_>,
    kernel: AttnKernel,
) -> Result<(CudaBuffer, CudaBuffer), CudaError> {
    const OP: &str = "attention";
    let p = plan(OP, dev, q, k, v, &[], &shape, mask, kernel)?;
    let rows = p.bh * shape.lq;
    let out = dev.alloc(p.kind, rows * shape.dv, "attention output")?;
    let lse = dev.alloc(BufferKind::F32, rows, "attention log-sum-exp")?;
    if rows == 0 {
        return Ok((out, lse));
    }
    let sfx = p.kind.suffix();
    let (po, pl, pq, pk, pv) = (
        out.device_ptr(),
        lse.device_ptr(),
        q.device_ptr(),
        k.device_ptr(),
        v.device_ptr(),
    );
    let err = launch_err(OP, sizes(&shape));
    let tiled = match p.family {
        AttnFamily::Mma(td) => Some((
            format!("attn_fwd_mma_d{td}_{sfx}"),
            MMA_THREADS,
            smem_mma_fwd(td),
        )),
        AttnFamily::Tiled(td) => {
            Some((format!("attn_fwd_d{td}_{sfx}"), 2 * td as u32, smem_fwd(td)))
        }
        AttnFamily::Naive => None,
    };
    match tiled {
        Some((name, threads, smem)) => {
            let f = dev.function(&ATTENTION, &name)?;
            let cfg = config(OP, &f, shape.lq.div_ceil(TILE), p.bh, threads, smem)?;
            let sl = scale * LOG2E;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&po)
                .arg(&pl)
                .arg(&pq)
                .arg(&pk)
                .arg(&pv)
                .arg(&p.mask)
                .arg(&p.dims)
                .arg(&sl);
            // SAFETY: the buffers hold the element counts checked in `plan`, the bounds (when
            // read) nsc + 1 i64s, and the kernel reads and writes only inside them.
            unsafe { b.launch(cfg) }.map_err(err)?;
        }
        None => {
            let f = dev.function(&ATTENTION, &format!("attn_naive_fwd_{sfx}"))?;
            let cfg = config(OP, &f, shape.lq, p.bh, NAIVE_THREADS, 0)?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&po)
                .arg(&pl)
                .arg(&pq)
                .arg(&pk)
                .arg(&pv)
                .arg(&p.mask)
                .arg(&p.dims)
                .arg(&scale);
            // SAFETY: as above; the additive mask's largest offset was checked in `plan`.
            unsafe { b.launch(cfg) }.map_err(err)?;
        }
    }
    Ok((out, lse))
}

/// Attention backward: (dq, dk, dv) from the incoming gradient `g` of the output, the forward's
/// inputs, its output `o` and its log-sum-exp `lse` (f32 [B*H, Lq]).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dev: &CudaDevice,
    g: &CudaBuffer,
    q: &CudaBuffer,
    k: &CudaBuffer,
    v: &CudaBuffer,
    o: &CudaBuffer,
    lse: &CudaBuffer,
    shape: AttnShape,
    scale: f32,
    mask: &AttnMask<'_>,
    kernel: AttnKernel,
) -> Result<(CudaBuffer, CudaBuffer, CudaBuffer), CudaError> {
    const OP: &str = "attention backward";
    let p = plan(OP, dev, q, k, v, &[g, o], &shape, mask, kernel)?;
    float_kind(OP, &[q, g, o])?;
    require_kind(OP, lse, "log-sum-exp", BufferKind::F32)?;
    let rows = p.bh * shape.lq;
    let keys = p.bh * shape.lk;
    check_lens(
        OP,
        &[(g, rows * shape.dv), (o, rows * shape.dv), (lse, rows)],
    )?;
    let dq = dev.alloc(p.kind, rows * shape.d, "attention backward dq")?;
    if rows == 0 {
        // No queries: nothing reaches the keys.
        return Ok((
            dq,
            dev.zeros(p.kind, keys * shape.d)?,
            dev.zeros(p.kind, keys * shape.dv)?,
        ));
    }
    let dk = dev.alloc(p.kind, keys * shape.d, "attention backward dk")?;
    let dvb = dev.alloc(p.kind, keys * shape.dv, "attention backward dv")?;
    let sfx = p.kind.suffix();
    let sz = sizes(&shape);

    // delta = rowsum(dO * O)
    let delta = dev.alloc(BufferKind::F32, rows, "attention backward delta")?;
    {
        let f = dev.function(&ATTENTION, &format!("attn_bwd_delta_{sfx}"))?;
        let per_block = (DELTA_THREADS / 32) as usize;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(per_block).clamp(1, 1 << 16) as u32, 1, 1),
            block_dim: (DELTA_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (pd, pg, po) = (delta.device_ptr(), g.device_ptr(), o.device_ptr());
        let (r, w) = (rows as i64, shape.dv as i64);
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&pd).arg(&pg).arg(&po).arg(&r).arg(&w);
        // SAFETY: g and o hold rows * dv elements, delta rows f32s.
        unsafe { b.launch(cfg) }.map_err(launch_err(OP, sz.clone()))?;
    }

    let ptrs = [
        q.device_ptr(),
        k.device_ptr(),
        v.device_ptr(),
        g.device_ptr(),
        lse.device_ptr(),
        delta.device_ptr(),
    ];
    let (pdq, pdk, pdv) = (dq.device_ptr(), dk.device_ptr(), dvb.device_ptr());
    // Per pass: kernel name, threads, shared memory; tiled kernels run one block per 64 rows,
    // naive ones one block per row.
    let (dkdv, dqk) = match p.family {
        AttnFamily::Mma(td) => (
            (
                format!("attn_bwd_dkdv_mma_d{td}_{sfx}"),
                MMA_THREADS,
                smem_mma_dkdv(td),
            ),
            (
                format!("attn_bwd_dq_mma_d{td}_{sfx}"),
                MMA_THREADS,
                smem_mma_fwd(td),
            ),
        ),
        AttnFamily::Tiled(td) => (
            (
                format!("attn_bwd_dkdv_d{td}_{sfx}"),
                2 * td as u32,
                smem_dkdv(td),
            ),
            (
                format!("attn_bwd_dq_d{td}_{sfx}"),
                2 * td as u32,
                smem_dq(td),
            ),
        ),
        AttnFamily::Naive => (
            (format!("attn_naive_bwd_dkdv_{sfx}"), NAIVE_THREADS, 0),
            (format!("attn_naive_bwd_dq_{sfx}"), NAIVE_THREADS, 0),
        ),
    };
    let tiled = p.family != AttnFamily::Naive;
    let blocks = |len: usize| if tiled { len.div_ceil(TILE) } else { len };
    let sl = scale * LOG2E;

    // dK and dV: one block per key tile (tiled) or key row (naive).
    if keys > 0 {
        let (name, threads, smem) = dkdv;
        let f = dev.function(&ATTENTION, &name)?;
        let cfg = config(OP, &f, blocks(shape.lk), p.bh, threads, smem)?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&pdk).arg(&pdv);
        for ptr in &ptrs {
            b.arg(ptr);
        }
        b.arg(&p.mask).arg(&p.dims).arg(&scale);
        if tiled {
            b.arg(&sl);
        }
        // SAFETY: the buffers hold the element counts checked above and in `plan`.
        unsafe { b.launch(cfg) }.map_err(launch_err(OP, sz.clone()))?;
    }

    // dQ: one block per query tile (tiled) or query row (naive).
    {
        let (name, threads, smem) = dqk;
        let f = dev.function(&ATTENTION, &name)?;
        let cfg = config(OP, &f, blocks(shape.lq), p.bh, threads, smem)?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&pdq);
        for ptr in &ptrs {
            b.arg(ptr);
        }
        b.arg(&p.mask).arg(&p.dims).arg(&scale);
        if tiled {
            b.arg(&sl);
        }
        // SAFETY: as above.
        unsafe { b.launch(cfg) }.map_err(launch_err(OP, sz))?;
    }
    Ok((dq, dk, dvb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_structs_match_the_c_layout() {
        // two pointers, i64[4], two ints
        assert_eq!(std::mem::size_of::<MaskArg>(), 8 + 8 + 32 + 4 + 4);
        assert_eq!(std::mem::size_of::<Dims>(), 6 * 4);
    }

    #[test]
    fn shared_memory_of_the_tiled_kernels() {
        // D = 64 fits every device from sm_80 on (and sm_86/89's 99 KB); D = 128 needs an A100
        // or H100 class opt-in (163 KB / 227 KB).
        assert_eq!(smem_fwd(64), 69_632);
        assert_eq!(smem_dkdv(64), 88_064);
        assert_eq!(smem_dq(64), 87_040);
        assert!(smem_dkdv(64) <= 99 * 1024);
        assert!(smem_dkdv(128).max(smem_dq(128)) <= 163 * 1024);
        // The mma kernels: bf16 tiles of pitch D + 8; D = 64 fits every sm_80+ GPU, D = 128
        // the 99 KB of sm_86/89 only for the forward and dQ.
        assert_eq!(smem_mma_fwd(64), 36_864);
        assert_eq!(smem_mma_dkdv(64), 56_320);
        assert_eq!(smem_mma_fwd(128), 69_632);
        assert_eq!(smem_mma_dkdv(128), 105_472);
    }

    /// Every kernel the wrappers can name is instantiated in attention.cu.
    #[test]
    fn every_named_kernel_is_instantiated() {
        let src = ATTENTION.source;
        for pass in ["fwd", "bwd_dkdv", "bwd_dq"] {
            assert!(
                src.contains(&format!("attn_{pass}_mma_d##D##_bf16(")),
                "{pass}"
            );
            assert!(src.contains(&format!("attn_{pass}_d##D##_##S(")), "{pass}");
        }
        for td in [64, 128] {
            assert!(src.contains(&format!("ATTN_MMA_KERNELS({td})\n")), "{td}");
            assert!(
                src.contains(&format!("ATTN_TILED_KERNELS(T, S, {td})")),
                "{td}"
            );
        }
    }

    #[test]
    fn the_environment_value_selects_the_kernel_family() {
        assert_eq!(AttnKernel::parse(Some("naive")), AttnKernel::Naive);
        assert_eq!(AttnKernel::parse(Some(" Tiled ")), AttnKernel::Tiled);
        assert_eq!(AttnKernel::parse(Some("mma")), AttnKernel::Mma);
        assert_eq!(AttnKernel::parse(Some("Tensor")), AttnKernel::Mma);
        assert_eq!(AttnKernel::parse(Some("")), AttnKernel::Auto);
        assert_eq!(AttnKernel::parse(None), AttnKernel::Auto);
    }
}
