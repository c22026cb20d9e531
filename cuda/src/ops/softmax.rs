//! Launch wrappers of `kernels/softmax.cu`: softmax / log_softmax along an axis (input seen as
//! `[outer, n, inner]`) and the fused cross-entropy loss over logits `[rows, classes]`.
//!
//! Each has a tuned kernel for rows of whole 16-byte vectors (softmax: a warp per row of at most
//! 1024 elements held in registers; cross-entropy: one pass with online sums) and the general
//! kernels, which are also the reference variant; [`SoftmaxKernel`] picks between them.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::buffer::{BufferKind, CudaBuffer};
use crate::device::{launch_1d, launch_err};
use crate::kernels::SOFTMAX;
use crate::ops::reduce::{require_kind, row_launch, volume, MAX_BLOCKS};
use crate::ops::{check_lens, float_kind};
use crate::{CudaDevice, CudaError};

const THREADS: u32 = 256;

/// Which softmax and cross-entropy kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SoftmaxKernel {
    /// The tuned kernels where they apply, else the general ones.
    Auto,
    /// The tuned kernels (softmax: a warp per row held in registers; cross-entropy: 16-byte
    /// vectors, one pass); an error where they do not apply.
    Tuned,
    /// The general kernels (a block per row re-reading it; one thread per logit for the
    /// cross-entropy backward): any shape, the reference variant.
    Block,
}

impl SoftmaxKernel {
    /// `MVAR_SOFTMAX_KERNEL`: `tuned` or `block` pick those kernels, anything else (or unset) is
    /// [`SoftmaxKernel::Auto`].
    pub fn from_env() -> SoftmaxKernel {
        SoftmaxKernel::parse(std::env::var("MVAR_SOFTMAX_KERNEL").ok().as_deref())
    }

    pub fn parse(value: Option<&str>) -> SoftmaxKernel {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            Some("tuned") => SoftmaxKernel::Tuned,
            Some("block") => SoftmaxKernel::Block,
            _ => SoftmaxKernel::Auto,
        }
    }
}

/// Rows per block of the warp-per-row softmax (`SM_WARP_ROWS` in softmax.cu).
const SM_WARP_ROWS: usize = 4;
/// Floats a lane of the warp-per-row softmax holds per row (8 vectors of f32, 4 of bf16).
const SM_WARP_MAX_FLOATS: usize = 32;
/// Threads per block of the vector cross-entropy kernels at most (`CE_VEC_THREADS`).
const CE_VEC_THREADS: usize = 256;

/// Whether rows of `n` elements of `elem_bytes` bytes at the addresses `ptrs` are whole 16-byte
/// vectors at 16-byte aligned addresses (what every tuned kernel here reads).
fn whole_vectors(n: usize, elem_bytes: usize, ptrs: &[u64]) -> bool {
    n > 0 && n.is_multiple_of(16 / elem_bytes) && ptrs.iter().all(|p| p.is_multiple_of(16))
}

/// Vectors per lane of the warp-per-row softmax for rows of `n` elements of `elem_bytes` bytes
/// at addresses `ptrs`, or None where it does not apply (not whole 16-byte vectors, more than
/// 1024 elements, a buffer not 16-byte aligned).
pub fn softmax_warp_vpl(n: usize, elem_bytes: usize, ptrs: &[u64]) -> Option<usize> {
    if !whole_vectors(n, elem_bytes, ptrs) {
        return None;
    }
    let per_vec = 16 / elem_bytes;
    let vpl = (n / per_vec).div_ceil(32).next_power_of_two();
    (vpl * per_vec <= SM_WARP_MAX_FLOATS).then_some(vpl)
}

/// Whether the vector cross-entropy kernels take rows of `classes` logits of `elem_bytes`
/// bytes at the addresses `ptrs`.
pub fn cross_entropy_takes_vectors(classes: usize, elem_bytes: usize, ptrs: &[u64]) -> bool {
    whole_vectors(classes, elem_bytes, ptrs)
}

/// What the warp-per-row softmax takes, for its refusal.
fn warp_rows_needed(kind: BufferKind) -> String {
    let per_vec = 16 / kind.size_in_bytes();
    format!(
        "a softmax over the last axis of rows of a multiple of {per_vec} elements, at most {}, in 16-byte aligned buffers",
        SM_WARP_MAX_FLOATS * 32
    )
}

/// What the vector cross-entropy kernels take, for their refusal.
fn vector_rows_needed(kind: BufferKind) -> String {
    format!(
        "rows of a multiple of {} logits in 16-byte aligned buffers",
        16 / kind.size_in_bytes()
    )
}

/// The cross-entropy kernel (name without the kind suffix) and launch for rows of `classes`
/// logits of `kind` in the buffers at `ptrs`: the vector kernel (`general`'s name + `_vec`)
/// where it applies and `kernel` allows it, else `general`; for [`SoftmaxKernel::Tuned`] an
/// error where the vector kernel does not apply.
fn cross_entropy_kernel(
    op: &str,
    kind: BufferKind,
    [rows, classes]: [usize; 2],
    ptrs: &[u64],
    kernel: SoftmaxKernel,
    general: (&'static str, LaunchConfig),
) -> Result<(String, LaunchConfig), CudaError> {
    let vectors = cross_entropy_takes_vectors(classes, kind.size_in_bytes(), ptrs);
    if kernel == SoftmaxKernel::Tuned && !vectors {
        return Err(tuned_refused(
            op,
            format!("[{rows}, {classes}]"),
            vector_rows_needed(kind),
        ));
    }
    Ok(if vectors && kernel != SoftmaxKernel::Block {
        let vecs = classes / (16 / kind.size_in_bytes());
        (format!("{}_vec", general.0), vector_rows_launch(rows, vecs))
    } else {
        (general.0.to_string(), general.1)
    })
}

/// One warp per row, [`SM_WARP_ROWS`] rows a block.
fn warp_rows_launch(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            rows.div_ceil(SM_WARP_ROWS).clamp(1, MAX_BLOCKS) as u32,
            1,
            1,
        ),
        block_dim: ((SM_WARP_ROWS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row, a thread per 16-byte vector of it up to [`CE_VEC_THREADS`] (whole warps).
fn vector_rows_launch(rows: usize, vecs: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (
            vecs.next_multiple_of(32).clamp(32, CE_VEC_THREADS) as u32,
            1,
            1,
        ),
        shared_mem_bytes: 0,
    }
}

/// The error of [`SoftmaxKernel::Tuned`] where the tuned kernel does not apply.
fn tuned_refused(op: &str, sizes: String, what: String) -> CudaError {
    CudaError::Launch {
        op: op.into(),
        sizes,
        message: format!("MVAR_SOFTMAX_KERNEL=tuned needs {what}"),
    }
}

/// softmax (or log_softmax when `log`) of `x` [outer, n, inner] along n; same kind and length.
pub fn softmax_forward(
    dev: &CudaDevice,
    x: &CudaBuffer,
    outer: usize,
    n: usize,
    inner: usize,
    log: bool,
) -> Result<CudaBuffer, CudaError> {
    softmax_forward_with(dev, x, outer, n, inner, log, SoftmaxKernel::from_env())
}

/// [`softmax_forward`] with the kernel given (the tuned kernel needs `inner == 1`).
pub fn softmax_forward_with(
    dev: &CudaDevice,
    x: &CudaBuffer,
    outer: usize,
    n: usize,
    inner: usize,
    log: bool,
    kernel: SoftmaxKernel,
) -> Result<CudaBuffer, CudaError> {
    let op = if log { "log_softmax" } else { "softmax" };
    let kind = float_kind(op, &[x])?;
    let total = volume(op, &[outer, n, inner])?;
    check_lens(op, &[(x, total)])?;
    let out = dev.alloc(kind, total, op)?;
    if total == 0 {
        return Ok(out);
    }
    let (py, px) = (out.device_ptr(), x.device_ptr());
    let (o, nn, i, lg) = (outer as i64, n as i64, inner as i64, log as i32);
    let sizes = format!("[{outer}, {n}, {inner}]");
    let vpl = (inner == 1)
        .then(|| softmax_warp_vpl(n, kind.size_in_bytes(), &[px, py]))
        .flatten();
    if kernel == SoftmaxKernel::Tuned && vpl.is_none() {
        return Err(tuned_refused(op, sizes, warp_rows_needed(kind)));
    }
    if let (Some(vpl), false) = (vpl, kernel == SoftmaxKernel::Block) {
        let name = format!("softmax_fwd_warp{vpl}_{}", kind.suffix());
        let f = dev.function(&SOFTMAX, &name)?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&py).arg(&px).arg(&o).arg(&nn).arg(&lg);
        // SAFETY: x and out hold outer * n elements of `kind`; the 16-byte accesses stay inside
        // rows whose length and addresses softmax_warp_vpl checked.
        unsafe { b.launch(warp_rows_launch(outer)) }.map_err(launch_err(op, sizes))?;
    } else if inner == 1 {
        let f = dev.function(&SOFTMAX, &format!("softmax_fwd_rows_{}", kind.suffix()))?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&py).arg(&px).arg(&o).arg(&nn).arg(&lg);
        // SAFETY: x and out hold outer * n elements of `kind`.
        unsafe { b.launch(row_launch(outer, n)) }.map_err(launch_err(op, sizes))?;
    } else {
        let f = dev.function(&SOFTMAX, &format!("softmax_fwd_lanes_{}", kind.suffix()))?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&py).arg(&px).arg(&o).arg(&nn).arg(&i).arg(&lg);
        // SAFETY: x and out hold outer * n * inner elements of `kind`.
        unsafe { b.launch(launch_1d(outer * inner, THREADS)) }.map_err(launch_err(op, sizes))?;
    }
    Ok(out)
}

/// dx of softmax (or log_softmax) from the forward's output `y` and the incoming gradient `g`,
/// both [outer, n, inner].
pub fn softmax_backward(
    dev: &CudaDevice,
    y: &CudaBuffer,
    g: &CudaBuffer,
    outer: usize,
    n: usize,
    inner: usize,
    log: bool,
) -> Result<CudaBuffer, CudaError> {
    softmax_backward_with(dev, y, g, outer, n, inner, log, SoftmaxKernel::from_env())
}

/// [`softmax_backward`] with the kernel given (the tuned kernel needs `inner == 1`).
#[allow(clippy::too_many_arguments)]
pub fn softmax_backward_with(
    dev: &CudaDevice,
    y: &CudaBuffer,
    g: &CudaBuffer,
    outer: usize,
    n: usize,
    inner: usize,
    log: bool,
    kernel: SoftmaxKernel,
) -> Result<CudaBuffer, CudaError> {
    let op = if log {
        "log_softmax backward"
    } else {
        "softmax backward"
    };
    let kind = float_kind(op, &[y, g])?;
    let total = volume(op, &[outer, n, inner])?;
    check_lens(op, &[(y, total), (g, total)])?;
    let out = dev.alloc(kind, total, op)?;
    if total == 0 {
        return Ok(out);
    }
    let (pd, py, pg) = (out.device_ptr(), y.device_ptr(), g.device_ptr());
    let (o, nn, i, lg) = (outer as i64, n as i64, inner as i64, log as i32);
    let sizes = format!("[{outer}, {n}, {inner}]");
    let vpl = (inner == 1)
        .then(|| softmax_warp_vpl(n, kind.size_in_bytes(), &[pd, py, pg]))
        .flatten();
    if kernel == SoftmaxKernel::Tuned && vpl.is_none() {
        return Err(tuned_refused(op, sizes, warp_rows_needed(kind)));
    }
    if let (Some(vpl), false) = (vpl, kernel == SoftmaxKernel::Block) {
        let name = format!("softmax_bwd_warp{vpl}_{}", kind.suffix());
        let f = dev.function(&SOFTMAX, &name)?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&pd).arg(&py).arg(&pg).arg(&o).arg(&nn).arg(&lg);
        // SAFETY: all three buffers hold outer * n elements of `kind`; the 16-byte accesses
        // stay inside rows whose length and addresses softmax_warp_vpl checked.
        unsafe { b.launch(warp_rows_launch(outer)) }.map_err(launch_err(op, sizes))?;
    } else if inner == 1 {
        let f = dev.function(&SOFTMAX, &format!("softmax_bwd_rows_{}", kind.suffix()))?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&pd).arg(&py).arg(&pg).arg(&o).arg(&nn).arg(&lg);
        // SAFETY: all three buffers hold outer * n elements of `kind`.
        unsafe { b.launch(row_launch(outer, n)) }.map_err(launch_err(op, sizes))?;
    } else {
        let f = dev.function(&SOFTMAX, &format!("softmax_bwd_lanes_{}", kind.suffix()))?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&pd)
            .arg(&py)
            .arg(&pg)
            .arg(&o)
            .arg(&nn)
            .arg(&i)
            .arg(&lg);
        // SAFETY: all three buffers hold outer * n * inner elements of `kind`.
        unsafe { b.launch(launch_1d(outer * inner, THREADS)) }.map_err(launch_err(op, sizes))?;
    }
    Ok(out)
}

/// Checks the optional weights [rows] against the logits' kind.
fn check_weights(
    op: &str,
    w: Option<&CudaBuffer>,
    kind: BufferKind,
    rows: usize,
) -> Result<u64, CudaError> {
    match w {
        None => Ok(0),
        Some(w) => {
            require_kind(op, w, "weights", kind)?;
            check_lens(op, &[(w, rows)])?;
            Ok(w.device_ptr())
        }
    }
}

/// Per-row cross-entropy of `logits` [rows, classes] (f32/bf16) against i64 `targets` \[rows\],
/// times `weights` \[rows\] (logits' kind) when given, with label smoothing `smoothing`. Returns
/// (loss \[rows\] of the logits' kind, log-sum-exp \[rows\] in f32 for the backward).
///
/// The caller checks that every target lies in [0, classes) before calling (a kernel cannot
/// report it); a target outside gives a NaN loss, never an out-of-bounds read.
pub fn cross_entropy_forward(
    dev: &CudaDevice,
    logits: &CudaBuffer,
    targets: &CudaBuffer,
    weights: Option<&CudaBuffer>,
    rows: usize,
    classes: usize,
    smoothing: f32,
) -> Result<(CudaBuffer, CudaBuffer), CudaError> {
    cross_entropy_forward_with(
        dev,
        logits,
        targets,
        weights,
        rows,
        classes,
        smoothing,
        SoftmaxKernel::from_env(),
    )
}

/// [`cross_entropy_forward`] with the kernel given.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_forward_with(
    dev: &CudaDevice,
    logits: &CudaBuffer,
    targets: &CudaBuffer,
    weights: Option<&CudaBuffer>,
    rows: usize,
    classes: usize,
    smoothing: f32,
    kernel: SoftmaxKernel,
) -> Result<(CudaBuffer, CudaBuffer), CudaError> {
    const OP: &str = "cross_entropy";
    let kind = float_kind(OP, &[logits])?;
    require_kind(OP, targets, "targets", BufferKind::I64)?;
    check_lens(
        OP,
        &[(logits, volume(OP, &[rows, classes])?), (targets, rows)],
    )?;
    let pw = check_weights(OP, weights, kind, rows)?;
    if classes == 0 && rows > 0 {
        return Err(CudaError::Launch {
            op: OP.into(),
            sizes: format!("[{rows}, {classes}]"),
            message: "expected at least one class".into(),
        });
    }
    let loss = dev.alloc(kind, rows, "cross_entropy output")?;
    let lse = dev.alloc(BufferKind::F32, rows, "cross_entropy log-sum-exp")?;
    if rows == 0 {
        return Ok((loss, lse));
    }
    let (name, cfg) = cross_entropy_kernel(
        OP,
        kind,
        [rows, classes],
        &[logits.device_ptr()],
        kernel,
        ("cross_entropy_fwd", row_launch(rows, classes)),
    )?;
    let f = dev.function(&SOFTMAX, &format!("{name}_{}", kind.suffix()))?;
    let (pl, ps, px, pt) = (
        loss.device_ptr(),
        lse.device_ptr(),
        logits.device_ptr(),
        targets.device_ptr(),
    );
    let (r, c) = (rows as i64, classes as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pl)
        .arg(&ps)
        .arg(&px)
        .arg(&pt)
        .arg(&pw)
        .arg(&r)
        .arg(&c)
        .arg(&smoothing);
    // SAFETY: lengths checked above; w is null or holds rows elements; the kernel reads a
    // logit at a target only after checking the target is in range; the vector kernel's 16-byte
    // reads stay inside rows whose length and address were checked.
    unsafe { b.launch(cfg) }.map_err(launch_err(OP, format!("[{rows}, {classes}]")))?;
    Ok((loss, lse))
}

/// d logits [rows, classes] of [`cross_entropy_forward`] from the incoming gradient `g` \[rows\]
/// and the saved f32 log-sum-exp `lse` \[rows\].
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_backward(
    dev: &CudaDevice,
    logits: &CudaBuffer,
    g: &CudaBuffer,
    targets: &CudaBuffer,
    lse: &CudaBuffer,
    weights: Option<&CudaBuffer>,
    rows: usize,
    classes: usize,
    smoothing: f32,
) -> Result<CudaBuffer, CudaError> {
    cross_entropy_backward_with(
        dev,
        logits,
        g,
        targets,
        lse,
        weights,
        rows,
        classes,
        smoothing,
        SoftmaxKernel::from_env(),
    )
}

/// [`cross_entropy_backward`] with the kernel given.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_backward_with(
    dev: &CudaDevice,
    logits: &CudaBuffer,
    g: &CudaBuffer,
    targets: &CudaBuffer,
    lse: &CudaBuffer,
    weights: Option<&CudaBuffer>,
    rows: usize,
    classes: usize,
    smoothing: f32,
    kernel: SoftmaxKernel,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "cross_entropy backward";
    let kind = float_kind(OP, &[logits, g])?;
    require_kind(OP, targets, "targets", BufferKind::I64)?;
    require_kind(OP, lse, "log-sum-exp", BufferKind::F32)?;
    let total = volume(OP, &[rows, classes])?;
    check_lens(
        OP,
        &[(logits, total), (g, rows), (targets, rows), (lse, rows)],
    )?;
    let pw = check_weights(OP, weights, kind, rows)?;
    let out = dev.alloc(kind, total, "cross_entropy backward output")?;
    if total == 0 {
        return Ok(out);
    }
    let (name, cfg) = cross_entropy_kernel(
        OP,
        kind,
        [rows, classes],
        &[logits.device_ptr(), out.device_ptr()],
        kernel,
        ("cross_entropy_bwd", launch_1d(total, THREADS)),
    )?;
    let f = dev.function(&SOFTMAX, &format!("{name}_{}", kind.suffix()))?;
    let (pd, px, pg, pt, ps) = (
        out.device_ptr(),
        logits.device_ptr(),
        g.device_ptr(),
        targets.device_ptr(),
        lse.device_ptr(),
    );
    let (r, c) = (rows as i64, classes as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pd)
        .arg(&px)
        .arg(&pg)
        .arg(&pt)
        .arg(&ps)
        .arg(&pw)
        .arg(&r)
        .arg(&c)
        .arg(&smoothing);
    // SAFETY: lengths checked above; w is null or holds rows elements; the vector kernel's
    // 16-byte accesses stay inside rows whose length and addresses were checked.
    unsafe { b.launch(cfg) }.map_err(launch_err(OP, format!("[{rows}, {classes}]")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_choice_reads_the_env_value() {
        assert_eq!(SoftmaxKernel::parse(Some("tuned")), SoftmaxKernel::Tuned);
        assert_eq!(SoftmaxKernel::parse(Some(" Block ")), SoftmaxKernel::Block);
        assert_eq!(SoftmaxKernel::parse(Some("warp")), SoftmaxKernel::Auto);
        assert_eq!(SoftmaxKernel::parse(None), SoftmaxKernel::Auto);
    }

    #[test]
    fn the_warp_softmax_takes_rows_of_whole_vectors_up_to_1024() {
        // f32: 4 a vector, up to 8 vectors a lane; bf16: 8 a vector, up to 4.
        assert_eq!(softmax_warp_vpl(4, 4, &[0]), Some(1));
        assert_eq!(softmax_warp_vpl(128, 4, &[0]), Some(1));
        assert_eq!(softmax_warp_vpl(132, 4, &[0]), Some(2));
        assert_eq!(softmax_warp_vpl(680, 4, &[0]), Some(8));
        assert_eq!(softmax_warp_vpl(1024, 4, &[0]), Some(8));
        assert_eq!(softmax_warp_vpl(1028, 4, &[0]), None);
        assert_eq!(softmax_warp_vpl(1024, 2, &[0]), Some(4));
        assert_eq!(softmax_warp_vpl(1032, 2, &[0]), None);
        assert_eq!(softmax_warp_vpl(6, 4, &[0]), None);
        assert_eq!(softmax_warp_vpl(12, 2, &[0]), None);
        assert_eq!(softmax_warp_vpl(0, 4, &[0]), None);
        assert_eq!(softmax_warp_vpl(64, 4, &[0, 8]), None);
        assert!(cross_entropy_takes_vectors(4096, 4, &[256]));
        assert!(!cross_entropy_takes_vectors(4100, 2, &[256]));
        assert!(!cross_entropy_takes_vectors(4096, 4, &[260]));
    }

    #[test]
    fn the_vector_cross_entropy_launch_has_whole_warps_up_to_its_cap() {
        assert_eq!(vector_rows_launch(5, 1).block_dim.0, 32);
        assert_eq!(vector_rows_launch(5, 33).block_dim.0, 64);
        assert_eq!(vector_rows_launch(5, 1024).block_dim.0, 256);
        assert_eq!(vector_rows_launch(1 << 20, 8).grid_dim.0, 1 << 16);
        assert_eq!(warp_rows_launch(9).grid_dim.0, 3);
    }
}
