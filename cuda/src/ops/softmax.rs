//! Launch wrappers of `kernels/softmax.cu`: softmax / log_softmax along an axis (input seen as
//! `[outer, n, inner]`) and the fused cross-entropy loss over logits `[rows, classes]`.

use cudarc::driver::PushKernelArg;

use crate::buffer::{BufferKind, CudaBuffer};
use crate::device::{launch_1d, launch_err};
use crate::kernels::SOFTMAX;
use crate::ops::reduce::{require_kind, row_launch, volume};
use crate::ops::{check_lens, float_kind};
use crate::{CudaDevice, CudaError};

const THREADS: u32 = 256;

/// softmax (or log_softmax when `log`) of `x` [outer, n, inner] along n; same kind and length.
pub fn softmax_forward(
    dev: &CudaDevice,
    x: &CudaBuffer,
    outer: usize,
    n: usize,
    inner: usize,
    log: bool,
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
    if inner == 1 {
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
    if inner == 1 {
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

/// Per-row cross-entropy of `logits` [rows, classes] (f32/bf16) against i64 `targets` [rows],
/// times `weights` [rows] (logits' kind) when given, with label smoothing `smoothing`. Returns
/// (loss [rows] of the logits' kind, log-sum-exp [rows] in f32 for the backward).
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
    let f = dev.function(&SOFTMAX, &format!("cross_entropy_fwd_{}", kind.suffix()))?;
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
    // logit at a target only after checking the target is in range.
    unsafe { b.launch(row_launch(rows, classes)) }
        .map_err(launch_err(OP, format!("[{rows}, {classes}]")))?;
    Ok((loss, lse))
}

/// d logits [rows, classes] of [`cross_entropy_forward`] from the incoming gradient `g` [rows]
/// and the saved f32 log-sum-exp `lse` [rows].
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
    let f = dev.function(&SOFTMAX, &format!("cross_entropy_bwd_{}", kind.suffix()))?;
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
    // SAFETY: lengths checked above; w is null or holds rows elements.
    unsafe { b.launch(launch_1d(total, THREADS)) }
        .map_err(launch_err(OP, format!("[{rows}, {classes}]")))?;
    Ok(out)
}
