//! Launch wrapper of `kernels/sample.cu`: one token per row of logits with top-k / top-p
//! filtering and the host's uniform draws, so a sampler copies tokens, not logits, to the host.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::buffer::{BufferKind, CudaBuffer, HostData};
use crate::device::{launch_1d, launch_err};
use crate::kernels::SAMPLE;
use crate::ops::reduce::MAX_BLOCKS;
use crate::ops::{check_lens, float_kind};
use crate::{CudaDevice, CudaError};

/// `SAMPLE_THREADS` in sample.cu.
const THREADS: u32 = 256;

/// Which kernel draws the tokens (or filters the logits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleKernel {
    /// One block per row: radix select, binary searches with block reductions; a row of at
    /// most 16 x 256 logits (VAR's 4096 codes) is read once and held (logits in registers,
    /// weights and masses in shared memory, computed once), a longer one re-read in every pass.
    BlockPerRow,
    /// The block-per-row kernel re-reading every row from memory in every pass, evaluating
    /// exp (and top-p's division) again each time: the variant before rows were held,
    /// benchmarked beside it. The same sums in the same order, so the same tokens. It runs in
    /// the same compiled kernel, so with that kernel's registers and 32 KB of shared memory:
    /// fewer resident blocks than the kernel before (40 registers, no cache), whose time is
    /// the first GPU run's figure in docs/performance.md, not this variant's.
    BlockPerRowFromMemory,
    /// One thread per row with plain loops (the reference for the benches; sampling only).
    Naive,
}

impl SampleKernel {
    /// The kernels' `hold_rows` argument.
    fn hold_rows(self) -> i32 {
        (self == SampleKernel::BlockPerRow) as i32
    }
}

fn block_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The launch's description and the logits' element count, checked against the buffer.
fn checked_logits(
    op: &str,
    logits: &CudaBuffer,
    rows: usize,
    v: usize,
    top_k: usize,
    top_p: f64,
) -> Result<(String, usize), CudaError> {
    let sizes = format!("[{rows}, {v}], top_k {top_k}, top_p {top_p}");
    let total = rows.checked_mul(v).ok_or_else(|| CudaError::Launch {
        op: op.into(),
        sizes: sizes.clone(),
        message: "element count overflows".into(),
    })?;
    check_lens(op, &[(logits, total)])?;
    Ok((sizes, total))
}

/// Tokens i64 \[rows\] drawn from `logits` [rows, v] (f32 or bf16) with `uniform[r]` for row r,
/// keeping the `top_k` largest logits (0: all) and then the top-`top_p` probability mass (0: all),
/// as `ops::sample_top_k_top_p` defines it. A row with a non-finite logit gets -1 - (the index
/// of the first one); the caller turns that into an error.
#[allow(clippy::too_many_arguments)]
pub fn sample_top_k_top_p(
    dev: &CudaDevice,
    logits: &CudaBuffer,
    uniform: &[f64],
    rows: usize,
    v: usize,
    top_k: usize,
    top_p: f64,
    kernel: SampleKernel,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "sample_top_k_top_p";
    let kind = float_kind(OP, &[logits])?;
    let (sizes, _) = checked_logits(OP, logits, rows, v, top_k, top_p)?;
    if uniform.len() != rows || (v == 0 && rows > 0) {
        return Err(CudaError::Launch {
            op: OP.into(),
            sizes,
            message: format!("{} uniforms for {rows} rows of {v} logits: expected one per row and a non-empty row", uniform.len()),
        });
    }
    let out = dev.alloc(BufferKind::I64, rows, OP)?;
    if rows == 0 {
        return Ok(out);
    }
    // The draws travel as their bits in an i64 buffer; the kernel reads them as doubles.
    let bits: Vec<i64> = uniform.iter().map(|u| u.to_bits() as i64).collect();
    let draws = dev.upload(HostData::I64(&bits))?;
    let (name, cfg) = match kernel {
        SampleKernel::BlockPerRow | SampleKernel::BlockPerRowFromMemory => {
            ("sample_rows", block_per_row(rows))
        }
        SampleKernel::Naive => ("sample_rows_naive", launch_1d(rows, 64)),
    };
    let f = dev.function(&SAMPLE, &format!("{name}_{}", kind.suffix()))?;
    let (po, pl, pu) = (out.device_ptr(), logits.device_ptr(), draws.device_ptr());
    let (r, n, k) = (rows as i64, v as i64, top_k.min(i64::MAX as usize) as i64);
    let hold_rows = kernel.hold_rows();
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po)
        .arg(&pl)
        .arg(&pu)
        .arg(&r)
        .arg(&n)
        .arg(&k)
        .arg(&top_p);
    if kernel != SampleKernel::Naive {
        b.arg(&hold_rows);
    }
    // SAFETY: logits hold rows * v elements of `kind`, draws rows doubles, out rows i64.
    unsafe { b.launch(cfg) }.map_err(launch_err(OP, sizes))?;
    Ok(out)
}

/// The logits of `logits` [rows, v] (f32 or bf16) that `sample_top_k_top_p` could draw, the
/// others set to -inf (kept ones copied bit for bit), and a status i64 \[rows\]: 0, or -1 - (the
/// index of the row's first non-finite logit), whose row of the output is not written. `kernel`
/// is one of the block-per-row kernels (there is no naive filter).
pub fn filter_top_k_top_p(
    dev: &CudaDevice,
    logits: &CudaBuffer,
    rows: usize,
    v: usize,
    top_k: usize,
    top_p: f64,
    kernel: SampleKernel,
) -> Result<(CudaBuffer, CudaBuffer), CudaError> {
    const OP: &str = "filter_top_k_top_p";
    let kind = float_kind(OP, &[logits])?;
    let (sizes, total) = checked_logits(OP, logits, rows, v, top_k, top_p)?;
    if kernel == SampleKernel::Naive {
        return Err(CudaError::Launch {
            op: OP.into(),
            sizes,
            message: "no naive filter kernel: expected BlockPerRow or BlockPerRowFromMemory".into(),
        });
    }
    let out = dev.alloc(kind, total, OP)?;
    let status = dev.alloc(BufferKind::I64, rows, OP)?;
    if total == 0 {
        return Ok((out, status));
    }
    let f = dev.function(&SAMPLE, &format!("filter_rows_{}", kind.suffix()))?;
    let (po, ps, pl) = (out.device_ptr(), status.device_ptr(), logits.device_ptr());
    let (r, n, k) = (rows as i64, v as i64, top_k.min(i64::MAX as usize) as i64);
    let hold_rows = kernel.hold_rows();
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po)
        .arg(&ps)
        .arg(&pl)
        .arg(&r)
        .arg(&n)
        .arg(&k)
        .arg(&top_p)
        .arg(&hold_rows);
    // SAFETY: logits and out hold rows * v elements of `kind`, status rows i64.
    unsafe { b.launch(block_per_row(rows)) }.map_err(launch_err(OP, sizes))?;
    Ok((out, status))
}
