//! Launch wrappers of `kernels/norm.cu`: layer norm and L2 normalisation over the last axis
//! (x seen as `[rows, d]`) and group norm over `[batch, channels, spatial]`. Forwards return the
//! per-row statistics their backwards need, in f32.

use cudarc::driver::PushKernelArg;

use crate::buffer::{BufferKind, CudaBuffer};
use crate::device::launch_err;
use crate::kernels::NORM;
use crate::ops::reduce::{require_kind, row_launch, volume};
use crate::ops::{check_lens, float_kind};
use crate::{CudaDevice, CudaError};

/// Layer norm (no affine) of `x` [rows, d] over d. Returns (y, stats) with stats f32 [rows, 2]
/// holding (mean, rstd) per row.
pub fn layer_norm_forward(
    dev: &CudaDevice,
    x: &CudaBuffer,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<(CudaBuffer, CudaBuffer), CudaError> {
    const OP: &str = "layer_norm";
    let kind = float_kind(OP, &[x])?;
    let total = volume(OP, &[rows, d])?;
    check_lens(OP, &[(x, total)])?;
    let y = dev.alloc(kind, total, "layer_norm output")?;
    let stats = dev.alloc(
        BufferKind::F32,
        volume(OP, &[2, rows])?,
        "layer_norm statistics",
    )?;
    if total == 0 {
        return Ok((y, stats));
    }
    let f = dev.function(&NORM, &format!("layer_norm_fwd_{}", kind.suffix()))?;
    let (py, ps, px) = (y.device_ptr(), stats.device_ptr(), x.device_ptr());
    let (r, dd) = (rows as i64, d as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&py).arg(&ps).arg(&px).arg(&r).arg(&dd).arg(&eps);
    // SAFETY: x and y hold rows * d elements of `kind`, stats 2 * rows f32s.
    unsafe { b.launch(row_launch(rows, d)) }.map_err(launch_err(OP, format!("[{rows}, {d}]")))?;
    Ok((y, stats))
}

/// dx of [`layer_norm_forward`] from the saved input, the incoming gradient and the stats.
pub fn layer_norm_backward(
    dev: &CudaDevice,
    x: &CudaBuffer,
    g: &CudaBuffer,
    stats: &CudaBuffer,
    rows: usize,
    d: usize,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "layer_norm backward";
    let kind = float_kind(OP, &[x, g])?;
    require_kind(OP, stats, "statistics", BufferKind::F32)?;
    let total = volume(OP, &[rows, d])?;
    check_lens(
        OP,
        &[(x, total), (g, total), (stats, volume(OP, &[2, rows])?)],
    )?;
    let dx = dev.alloc(kind, total, "layer_norm backward output")?;
    if total == 0 {
        return Ok(dx);
    }
    let f = dev.function(&NORM, &format!("layer_norm_bwd_{}", kind.suffix()))?;
    let (pd, px, pg, ps) = (
        dx.device_ptr(),
        x.device_ptr(),
        g.device_ptr(),
        stats.device_ptr(),
    );
    let (r, dd) = (rows as i64, d as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pd).arg(&px).arg(&pg).arg(&ps).arg(&r).arg(&dd);
    // SAFETY: x, g and dx hold rows * d elements of `kind`, stats 2 * rows f32s.
    unsafe { b.launch(row_launch(rows, d)) }.map_err(launch_err(OP, format!("[{rows}, {d}]")))?;
    Ok(dx)
}

/// The sizes of a group norm: x [batch, channels, spatial] in `groups` groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupNormShape {
    pub batch: usize,
    pub channels: usize,
    pub groups: usize,
    pub spatial: usize,
}

impl GroupNormShape {
    /// (element count, group rows, elements per group row), after checking that `groups`
    /// divides `channels`.
    fn plan(&self, op: &str) -> Result<(usize, usize, usize), CudaError> {
        if self.groups == 0 || !self.channels.is_multiple_of(self.groups) {
            return Err(CudaError::Launch {
                op: op.to_string(),
                sizes: format!("{self:?}"),
                message: "expected a group count >= 1 that divides the channels".into(),
            });
        }
        let total = volume(op, &[self.batch, self.channels, self.spatial])?;
        let rows = volume(op, &[self.batch, self.groups])?;
        let d = (self.channels / self.groups) * self.spatial;
        Ok((total, rows, d))
    }

    fn sizes(&self) -> String {
        format!(
            "[{}, {}, {}] in {} groups",
            self.batch, self.channels, self.spatial, self.groups
        )
    }
}

/// Group norm of `x` [batch, channels, spatial] with `weight`, `bias` [channels] (x's kind).
/// Returns (y, stats) with stats f32 [batch * groups, 2] holding (mean, rstd) per group row.
pub fn group_norm_forward(
    dev: &CudaDevice,
    x: &CudaBuffer,
    weight: &CudaBuffer,
    bias: &CudaBuffer,
    s: GroupNormShape,
    eps: f32,
) -> Result<(CudaBuffer, CudaBuffer), CudaError> {
    const OP: &str = "group_norm";
    let kind = float_kind(OP, &[x, weight, bias])?;
    let (total, rows, d) = s.plan(OP)?;
    check_lens(OP, &[(x, total), (weight, s.channels), (bias, s.channels)])?;
    let y = dev.alloc(kind, total, "group_norm output")?;
    let stats = dev.alloc(
        BufferKind::F32,
        volume(OP, &[2, rows])?,
        "group_norm statistics",
    )?;
    if total == 0 {
        return Ok((y, stats));
    }
    let f = dev.function(&NORM, &format!("group_norm_fwd_{}", kind.suffix()))?;
    let (py, ps, px, pw, pb) = (
        y.device_ptr(),
        stats.device_ptr(),
        x.device_ptr(),
        weight.device_ptr(),
        bias.device_ptr(),
    );
    let (r, gr, cpg, sp) = (
        rows as i64,
        s.groups as i64,
        (s.channels / s.groups) as i64,
        s.spatial as i64,
    );
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&py)
        .arg(&ps)
        .arg(&px)
        .arg(&pw)
        .arg(&pb)
        .arg(&r)
        .arg(&gr)
        .arg(&cpg)
        .arg(&sp)
        .arg(&eps);
    // SAFETY: x and y hold batch * channels * spatial elements, weight and bias channels,
    // stats 2 * batch * groups f32s; every channel index the kernel forms is below channels.
    unsafe { b.launch(row_launch(rows, d)) }.map_err(launch_err(OP, s.sizes()))?;
    Ok((y, stats))
}

/// (dx, dweight, dbias) of [`group_norm_forward`] from the saved input and weight, the incoming
/// gradient `g` and the stats. dx comes from one block per group row; dweight and dbias from a
/// second kernel with one block per channel (no atomics).
pub fn group_norm_backward(
    dev: &CudaDevice,
    x: &CudaBuffer,
    weight: &CudaBuffer,
    g: &CudaBuffer,
    stats: &CudaBuffer,
    s: GroupNormShape,
) -> Result<(CudaBuffer, CudaBuffer, CudaBuffer), CudaError> {
    const OP: &str = "group_norm backward";
    let kind = float_kind(OP, &[x, weight, g])?;
    require_kind(OP, stats, "statistics", BufferKind::F32)?;
    let (total, rows, d) = s.plan(OP)?;
    check_lens(
        OP,
        &[
            (x, total),
            (weight, s.channels),
            (g, total),
            (stats, volume(OP, &[2, rows])?),
        ],
    )?;
    if total == 0 {
        // Sums over no elements: zero parameter gradients, as on the CPU.
        return Ok((
            dev.alloc(kind, 0, "group_norm backward output")?,
            dev.zeros(kind, s.channels)?,
            dev.zeros(kind, s.channels)?,
        ));
    }
    let dx = dev.alloc(kind, total, "group_norm backward output")?;
    let dw = dev.alloc(kind, s.channels, "group_norm weight gradient")?;
    let db = dev.alloc(kind, s.channels, "group_norm bias gradient")?;
    let (pdx, pdw, pdb, px, pw, pg, ps) = (
        dx.device_ptr(),
        dw.device_ptr(),
        db.device_ptr(),
        x.device_ptr(),
        weight.device_ptr(),
        g.device_ptr(),
        stats.device_ptr(),
    );
    let (r, nb, ch, gr, cpg, sp) = (
        rows as i64,
        s.batch as i64,
        s.channels as i64,
        s.groups as i64,
        (s.channels / s.groups) as i64,
        s.spatial as i64,
    );
    let f = dev.function(&NORM, &format!("group_norm_bwd_dx_{}", kind.suffix()))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pdx)
        .arg(&px)
        .arg(&pw)
        .arg(&pg)
        .arg(&ps)
        .arg(&r)
        .arg(&gr)
        .arg(&cpg)
        .arg(&sp);
    // SAFETY: as in the forward; dx holds total elements.
    unsafe { b.launch(row_launch(rows, d)) }.map_err(launch_err(OP, s.sizes()))?;
    let f = dev.function(&NORM, &format!("group_norm_bwd_params_{}", kind.suffix()))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pdw)
        .arg(&pdb)
        .arg(&px)
        .arg(&pg)
        .arg(&ps)
        .arg(&nb)
        .arg(&ch)
        .arg(&gr)
        .arg(&cpg)
        .arg(&sp);
    // SAFETY: dw and db hold channels elements; every (sample, channel, position) the kernel
    // forms lies inside x and g, every group row inside stats.
    unsafe { b.launch(row_launch(s.channels, s.batch * s.spatial)) }
        .map_err(launch_err(OP, s.sizes()))?;
    Ok((dx, dw, db))
}

/// x / max(||x||, eps) over d for `x` [rows, d]. Returns (y, norms) with norms f32 [rows].
pub fn l2_normalize_forward(
    dev: &CudaDevice,
    x: &CudaBuffer,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<(CudaBuffer, CudaBuffer), CudaError> {
    const OP: &str = "l2_normalize";
    let kind = float_kind(OP, &[x])?;
    let total = volume(OP, &[rows, d])?;
    check_lens(OP, &[(x, total)])?;
    let y = dev.alloc(kind, total, "l2_normalize output")?;
    let norms = dev.alloc(BufferKind::F32, rows, "l2_normalize norms")?;
    if total == 0 {
        return Ok((y, norms));
    }
    let f = dev.function(&NORM, &format!("l2_normalize_fwd_{}", kind.suffix()))?;
    let (py, pn, px) = (y.device_ptr(), norms.device_ptr(), x.device_ptr());
    let (r, dd) = (rows as i64, d as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&py).arg(&pn).arg(&px).arg(&r).arg(&dd).arg(&eps);
    // SAFETY: x and y hold rows * d elements of `kind`, norms rows f32s.
    unsafe { b.launch(row_launch(rows, d)) }.map_err(launch_err(OP, format!("[{rows}, {d}]")))?;
    Ok((y, norms))
}

/// dx of [`l2_normalize_forward`] from the saved input, the incoming gradient and the norms.
pub fn l2_normalize_backward(
    dev: &CudaDevice,
    x: &CudaBuffer,
    g: &CudaBuffer,
    norms: &CudaBuffer,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "l2_normalize backward";
    let kind = float_kind(OP, &[x, g])?;
    require_kind(OP, norms, "norms", BufferKind::F32)?;
    let total = volume(OP, &[rows, d])?;
    check_lens(OP, &[(x, total), (g, total), (norms, rows)])?;
    let dx = dev.alloc(kind, total, "l2_normalize backward output")?;
    if total == 0 {
        return Ok(dx);
    }
    let f = dev.function(&NORM, &format!("l2_normalize_bwd_{}", kind.suffix()))?;
    let (pd, px, pg, pn) = (
        dx.device_ptr(),
        x.device_ptr(),
        g.device_ptr(),
        norms.device_ptr(),
    );
    let (r, dd) = (rows as i64, d as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pd)
        .arg(&px)
        .arg(&pg)
        .arg(&pn)
        .arg(&r)
        .arg(&dd)
        .arg(&eps);
    // SAFETY: x, g and dx hold rows * d elements of `kind`, norms rows f32s.
    unsafe { b.launch(row_launch(rows, d)) }.map_err(launch_err(OP, format!("[{rows}, {d}]")))?;
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_norm_plan_checks_the_groups() {
        let s = GroupNormShape {
            batch: 2,
            channels: 6,
            groups: 3,
            spatial: 5,
        };
        assert_eq!(s.plan("t").unwrap(), (60, 6, 10));
        assert!(GroupNormShape { groups: 4, ..s }.plan("t").is_err());
        assert!(GroupNormShape { groups: 0, ..s }.plan("t").is_err());
        let empty = GroupNormShape { spatial: 0, ..s };
        assert_eq!(empty.plan("t").unwrap(), (0, 6, 0));
        let huge = GroupNormShape {
            batch: usize::MAX,
            ..s
        };
        assert!(huge.plan("t").is_err());
    }
}
