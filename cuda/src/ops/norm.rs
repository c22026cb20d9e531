//! Launch wrappers of `kernels/norm.cu`: layer norm and L2 normalisation over the last axis
//! (x seen as `[rows, d]`) and group norm over `[batch, channels, spatial]`. Forwards return the
//! per-row statistics their backwards need, in f32.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::buffer::{BufferKind, CudaBuffer};
use crate::device::launch_err;
use crate::kernels::NORM;
use crate::ops::reduce::{require_kind, row_launch, volume, MAX_BLOCKS};
use crate::ops::{check_lens, float_kind};
use crate::{CudaDevice, CudaError};

/// Which layer-norm forward runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerNormKernel {
    /// The warp-per-row kernel where it applies, else the block-per-row one.
    Auto,
    /// The warp-per-row kernel (rows in registers, 16-byte loads); an error where it does not
    /// apply.
    Warp,
    /// The block-per-row kernel: any d, the reference variant.
    Block,
}

impl LayerNormKernel {
    /// `MVAR_LN_KERNEL`: `warp` or `block` pick that kernel, anything else (or unset) is
    /// [`LayerNormKernel::Auto`].
    pub fn from_env() -> LayerNormKernel {
        LayerNormKernel::parse(std::env::var("MVAR_LN_KERNEL").ok().as_deref())
    }

    pub fn parse(value: Option<&str>) -> LayerNormKernel {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            Some("warp") => LayerNormKernel::Warp,
            Some("block") => LayerNormKernel::Block,
            _ => LayerNormKernel::Auto,
        }
    }
}

/// Rows per block of the warp-per-row kernel (`LN_WARP_ROWS` in norm.cu).
const LN_WARP_ROWS: usize = 4;
/// Most 16-byte vectors a lane of the warp-per-row kernel holds (its largest instantiation).
const LN_WARP_MAX_VPL: usize = 8;

/// Vectors per lane of the warp-per-row layer norm for rows of `d` elements of `elem_bytes`
/// bytes at addresses `ptrs`, or None where it does not apply (d not a whole number of 16-byte
/// vectors, a row longer than 32 * 8 vectors, or a buffer not 16-byte aligned).
pub fn layer_norm_warp_vpl(d: usize, elem_bytes: usize, ptrs: &[u64]) -> Option<usize> {
    let per_vec = 16 / elem_bytes;
    if d == 0 || !d.is_multiple_of(per_vec) || ptrs.iter().any(|p| !p.is_multiple_of(16)) {
        return None;
    }
    let vpl = (d / per_vec).div_ceil(32).next_power_of_two();
    (vpl <= LN_WARP_MAX_VPL).then_some(vpl)
}

/// Layer norm (no affine) of `x` [rows, d] over d. Returns (y, stats) with stats f32 [rows, 2]
/// holding (mean, rstd) per row. The kernel is chosen by `MVAR_LN_KERNEL` (see
/// [`LayerNormKernel`]).
pub fn layer_norm_forward(
    dev: &CudaDevice,
    x: &CudaBuffer,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<(CudaBuffer, CudaBuffer), CudaError> {
    layer_norm_forward_with(dev, x, rows, d, eps, LayerNormKernel::from_env())
}

/// [`layer_norm_forward`] with the kernel given.
pub fn layer_norm_forward_with(
    dev: &CudaDevice,
    x: &CudaBuffer,
    rows: usize,
    d: usize,
    eps: f32,
    kernel: LayerNormKernel,
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
    let (py, ps, px) = (y.device_ptr(), stats.device_ptr(), x.device_ptr());
    let vpl = layer_norm_warp_vpl(d, kind.size_in_bytes(), &[px, py]);
    let (name, cfg) = match (kernel, vpl) {
        (LayerNormKernel::Block, _) | (LayerNormKernel::Auto, None) => (
            format!("layer_norm_fwd_{}", kind.suffix()),
            row_launch(rows, d),
        ),
        (_, Some(vpl)) => (
            format!("layer_norm_fwd_warp{vpl}_{}", kind.suffix()),
            LaunchConfig {
                grid_dim: (rows.div_ceil(LN_WARP_ROWS).clamp(1, MAX_BLOCKS) as u32, 1, 1),
                block_dim: ((LN_WARP_ROWS * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            },
        ),
        (LayerNormKernel::Warp, None) => {
            return Err(CudaError::Launch {
                op: OP.into(),
                sizes: format!("[{rows}, {d}] {}", kind.suffix()),
                message: format!(
                    "MVAR_LN_KERNEL=warp needs rows of a multiple of {} elements, at most {}, in 16-byte aligned buffers",
                    16 / kind.size_in_bytes(),
                    LN_WARP_MAX_VPL * 32 * 16 / kind.size_in_bytes()
                ),
            })
        }
    };
    let f = dev.function(&NORM, &name)?;
    let (r, dd) = (rows as i64, d as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&py).arg(&ps).arg(&px).arg(&r).arg(&dd).arg(&eps);
    // SAFETY: x and y hold rows * d elements of `kind`, stats 2 * rows f32s; the warp kernel's
    // 16-byte accesses stay inside rows whose length and addresses were checked above.
    unsafe { b.launch(cfg) }.map_err(launch_err(OP, format!("[{rows}, {d}]")))?;
    Ok((y, stats))
}

/// dx of [`layer_norm_forward`] from its output `xhat`, the incoming gradient and the stats
/// (of which it reads rstd).
pub fn layer_norm_backward(
    dev: &CudaDevice,
    xhat: &CudaBuffer,
    g: &CudaBuffer,
    stats: &CudaBuffer,
    rows: usize,
    d: usize,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "layer_norm backward";
    let kind = float_kind(OP, &[xhat, g])?;
    require_kind(OP, stats, "statistics", BufferKind::F32)?;
    let total = volume(OP, &[rows, d])?;
    check_lens(
        OP,
        &[(xhat, total), (g, total), (stats, volume(OP, &[2, rows])?)],
    )?;
    let dx = dev.alloc(kind, total, "layer_norm backward output")?;
    if total == 0 {
        return Ok(dx);
    }
    let f = dev.function(&NORM, &format!("layer_norm_bwd_{}", kind.suffix()))?;
    let (pd, ph, pg, ps) = (
        dx.device_ptr(),
        xhat.device_ptr(),
        g.device_ptr(),
        stats.device_ptr(),
    );
    let (r, dd) = (rows as i64, d as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pd).arg(&ph).arg(&pg).arg(&ps).arg(&r).arg(&dd);
    // SAFETY: xhat, g and dx hold rows * d elements of `kind`, stats 2 * rows f32s.
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

/// Group norm of `x` [batch, channels, spatial] with `weight`, `bias` \[channels\] (x's kind).
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

/// Warps per block of the grouped l2_normalize kernels (`L2_GROUP_WARPS` in norm.cu).
const L2_GROUP_WARPS: usize = 4;

/// Lanes per row of the grouped l2_normalize kernels for rows of `d` elements of `elem_bytes`
/// bytes at addresses `ptrs`: the row's 16-byte vectors rounded up to a power of two, at least
/// 4, at most 32; None where they do not apply (d not a whole number of vectors, more than 32 of
/// them, a buffer not 16-byte aligned) or `MVAR_LN_KERNEL=block` asks for the block kernels.
pub fn l2_normalize_group(d: usize, elem_bytes: usize, ptrs: &[u64]) -> Option<usize> {
    let per_vec = 16 / elem_bytes;
    if LayerNormKernel::from_env() == LayerNormKernel::Block
        || d == 0
        || !d.is_multiple_of(per_vec)
        || ptrs.iter().any(|p| !p.is_multiple_of(16))
    {
        return None;
    }
    let lanes = (d / per_vec).next_power_of_two().max(4);
    (lanes <= 32).then_some(lanes)
}

/// The launch of a grouped l2_normalize kernel: `32 / lanes` rows a warp.
fn l2_group_launch(rows: usize, lanes: usize) -> LaunchConfig {
    let rows_per_block = L2_GROUP_WARPS * (32 / lanes);
    LaunchConfig {
        grid_dim: (
            rows.div_ceil(rows_per_block).clamp(1, MAX_BLOCKS) as u32,
            1,
            1,
        ),
        block_dim: ((L2_GROUP_WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// x / max(||x||, eps) over d for `x` [rows, d]. Returns (y, norms) with norms f32 \[rows\]. Rows
/// of up to 32 16-byte vectors (attention heads) run in the grouped kernels, a group of lanes
/// per row; others (and all with `MVAR_LN_KERNEL=block`) in the block-per-row kernel.
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
    let (py, pn, px) = (y.device_ptr(), norms.device_ptr(), x.device_ptr());
    let (name, cfg) = match l2_normalize_group(d, kind.size_in_bytes(), &[py, px]) {
        Some(g) => (
            format!("l2_normalize_fwd_g{g}_{}", kind.suffix()),
            l2_group_launch(rows, g),
        ),
        None => (
            format!("l2_normalize_fwd_{}", kind.suffix()),
            row_launch(rows, d),
        ),
    };
    let f = dev.function(&NORM, &name)?;
    let (r, dd) = (rows as i64, d as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&py).arg(&pn).arg(&px).arg(&r).arg(&dd).arg(&eps);
    // SAFETY: x and y hold rows * d elements of `kind`, norms rows f32s; the grouped kernel's
    // 16-byte accesses stay inside rows whose length and addresses were checked above.
    unsafe { b.launch(cfg) }.map_err(launch_err(OP, format!("[{rows}, {d}]")))?;
    Ok((y, norms))
}

/// dx of [`l2_normalize_forward`] from its output `y`, the incoming gradient and the norms.
pub fn l2_normalize_backward(
    dev: &CudaDevice,
    y: &CudaBuffer,
    g: &CudaBuffer,
    norms: &CudaBuffer,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "l2_normalize backward";
    let kind = float_kind(OP, &[y, g])?;
    require_kind(OP, norms, "norms", BufferKind::F32)?;
    let total = volume(OP, &[rows, d])?;
    check_lens(OP, &[(y, total), (g, total), (norms, rows)])?;
    let dx = dev.alloc(kind, total, "l2_normalize backward output")?;
    if total == 0 {
        return Ok(dx);
    }
    let (pd, py, pg, pn) = (
        dx.device_ptr(),
        y.device_ptr(),
        g.device_ptr(),
        norms.device_ptr(),
    );
    let (name, cfg) = match l2_normalize_group(d, kind.size_in_bytes(), &[pd, py, pg]) {
        Some(lanes) => (
            format!("l2_normalize_bwd_g{lanes}_{}", kind.suffix()),
            l2_group_launch(rows, lanes),
        ),
        None => (
            format!("l2_normalize_bwd_{}", kind.suffix()),
            row_launch(rows, d),
        ),
    };
    let f = dev.function(&NORM, &name)?;
    let (r, dd) = (rows as i64, d as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pd)
        .arg(&py)
        .arg(&pg)
        .arg(&pn)
        .arg(&r)
        .arg(&dd)
        .arg(&eps);
    // SAFETY: y, g and dx hold rows * d elements of `kind`, norms rows f32s; as in the forward
    // for the grouped kernel.
    unsafe { b.launch(cfg) }.map_err(launch_err(OP, format!("[{rows}, {d}]")))?;
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

    #[test]
    fn grouped_l2_normalize_takes_rows_of_at_most_32_aligned_vectors() {
        // bf16: 8 per vector. A head of 64: 8 lanes; short rows still get 4.
        assert_eq!(l2_normalize_group(64, 2, &[256, 512]), Some(8));
        assert_eq!(l2_normalize_group(8, 2, &[0]), Some(4));
        assert_eq!(l2_normalize_group(24, 2, &[0]), Some(4));
        assert_eq!(l2_normalize_group(40, 2, &[0]), Some(8));
        assert_eq!(l2_normalize_group(256, 2, &[0]), Some(32));
        assert_eq!(l2_normalize_group(264, 2, &[0]), None);
        // f32: 4 per vector.
        assert_eq!(l2_normalize_group(64, 4, &[0]), Some(16));
        assert_eq!(l2_normalize_group(6, 4, &[0]), None);
        assert_eq!(l2_normalize_group(64, 4, &[8]), None);
        assert_eq!(l2_normalize_group(0, 4, &[0]), None);
    }

    #[test]
    fn the_warp_layer_norm_takes_whole_aligned_vectors_up_to_its_largest_row() {
        // f32: 4 per vector, 32 lanes x 8 vectors = 1024 elements at most.
        assert_eq!(layer_norm_warp_vpl(1024, 4, &[256, 512]), Some(8));
        assert_eq!(layer_norm_warp_vpl(768, 4, &[0]), Some(8));
        assert_eq!(layer_norm_warp_vpl(512, 4, &[0]), Some(4));
        assert_eq!(layer_norm_warp_vpl(4, 4, &[0]), Some(1));
        assert_eq!(layer_norm_warp_vpl(132, 4, &[0]), Some(2));
        assert_eq!(layer_norm_warp_vpl(1028, 4, &[0]), None);
        assert_eq!(layer_norm_warp_vpl(1022, 4, &[0]), None);
        // bf16: 8 per vector, up to 2048.
        assert_eq!(layer_norm_warp_vpl(2048, 2, &[0]), Some(8));
        assert_eq!(layer_norm_warp_vpl(1024, 2, &[0]), Some(4));
        assert_eq!(layer_norm_warp_vpl(1020, 2, &[0]), None);
        // A buffer off the 16-byte grid, and an empty row.
        assert_eq!(layer_norm_warp_vpl(1024, 4, &[256, 8]), None);
        assert_eq!(layer_norm_warp_vpl(0, 4, &[0]), None);
    }

    #[test]
    fn ln_kernel_names_parse() {
        assert_eq!(LayerNormKernel::parse(Some("warp")), LayerNormKernel::Warp);
        assert_eq!(
            LayerNormKernel::parse(Some(" Block ")),
            LayerNormKernel::Block
        );
        assert_eq!(LayerNormKernel::parse(Some("fast")), LayerNormKernel::Auto);
        assert_eq!(LayerNormKernel::parse(None), LayerNormKernel::Auto);
    }
}
