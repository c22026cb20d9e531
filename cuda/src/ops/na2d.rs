//! Launch wrappers of `kernels/na2d.cu`: 2-D neighbourhood attention with NATTEN's window rule,
//! forward (output and per-query log-sum-exp) and backward (dq, dk, dv), for q, k, v laid out as
//! `[maps, x, y, d]` (maps = B * H).
//!
//! Three kernel families (see the kernel file): `naive` (one thread per element, the reference),
//! `simt` (tiled, CUDA cores, f32 and bf16, d in [`SIMT_DIMS`]) and `mma` (tiled, bf16 tensor
//! cores, d a multiple of 16 up to 128). [`NaKernel`] asks for one; [`NaKernel::resolve`] says which
//! runs: the asked family when it supports the dtype and head dim, else the next simpler one.
//! A tiled launch whose staging does not fit in shared memory, or buffers that are not 16-byte
//! aligned, also fall back to `naive`, so no shape the op accepts fails here.
//!
//! The tiled kernels stage rows of K and V (forward, dq) or of Q, dO, lse and delta (dk/dv) in
//! shared memory. A budget bounds that per block: when a block's rows do not fit, it loops over
//! stages of as many rows as fit (balanced, so the last stage is not a sliver). The simt
//! kernels take [`SMEM_BUDGET`]; the mma kernels the multiprocessor's shared memory divided
//! among the blocks their registers let run on it at once (`mma_blocks_per_sm`), so that
//! shared memory does not cut that count further. The mma kernels stage through `cp.async`
//! (every copy of a stage in flight at once); [`NaStaging`] (`MVAR_NA_STAGING`) also offers
//! staging through registers as before, and a ring of rows per 16-column strip of a map that
//! stages each row once per work item and prefetches the next row group's rows.
//!
//! [`NaDiag`] (`MVAR_NA_DIAG`) is a timing diagnostic for the benches, not a kernel choice: the
//! mma kernels with a part of their work left out, so that differences of wall times say where
//! the time goes on a GPU whose profiler cannot read the counters. Its results are wrong.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::buffer::{BufferKind, CudaBuffer};
use crate::device::{launch_1d, launch_err};
use crate::kernels::NA2D;
use crate::ops::reduce::{require_kind, volume};
use crate::ops::{check_lens, float_kind};
use crate::{CudaDevice, CudaError};

/// Tokens per warp tile (16 consecutive columns of one map row), `NA_TILE` in the kernel file.
const TILE: usize = 16;
/// Warps (map rows) per block, `NA_WARPS` in the kernel file.
const WARPS: usize = 4;
const NAIVE_THREADS: u32 = 256;
/// Shared memory a simt block may take before its rows are split into stages; the default
/// per-block limit, so the common shapes need no opt-in. Also the floor of the mma budget, and
/// the budget an mma plan falls back to when the device refuses the opt-in.
pub const SMEM_BUDGET: usize = 48 * 1024;
/// Shared memory the system takes per resident block (sm_80 and newer).
const SMEM_RESERVED_PER_BLOCK: usize = 1024;
/// Above this a kernel needs the dynamic shared-memory opt-in attribute.
const SMEM_DEFAULT_LIMIT: usize = 48 * 1024;
/// Head dims the simt kernels are instantiated for.
pub const SIMT_DIMS: [usize; 4] = [16, 32, 48, 64];
/// Largest head dim of the mma kernels (every multiple of 16 up to it is instantiated).
pub const MMA_MAX_DIM: usize = 128;

/// One neighbourhood-attention problem: `maps` independent [x, y] maps of d-dim tokens, odd
/// window `kernel_size` <= min(x, y).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Na2dShape {
    pub maps: usize,
    pub x: usize,
    pub y: usize,
    pub d: usize,
    pub kernel_size: usize,
}

impl Na2dShape {
    fn sizes(&self) -> String {
        format!(
            "[{}, {}, {}, {}] kernel {}",
            self.maps, self.x, self.y, self.d, self.kernel_size
        )
    }

    fn check(&self, op: &str) -> Result<(usize, usize), CudaError> {
        let fail = |m: &str| CudaError::Launch {
            op: op.to_string(),
            sizes: self.sizes(),
            message: m.to_string(),
        };
        let k = self.kernel_size;
        if k.is_multiple_of(2) || k > self.x || k > self.y {
            return Err(fail(
                "expected an odd kernel size no larger than either map side",
            ));
        }
        if [self.x, self.y, self.d]
            .iter()
            .any(|&v| v > i32::MAX as usize)
        {
            return Err(fail("a map side or the head dim exceeds i32"));
        }
        let tokens = volume(op, &[self.maps, self.x, self.y])?;
        let total = volume(op, &[tokens, self.d])?;
        if total > i64::MAX as usize {
            return Err(fail("too many elements"));
        }
        Ok((tokens, total))
    }
}

/// Which kernel family to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NaKernel {
    /// The fastest family that supports the dtype and head dim (mma for bf16, else simt, else
    /// naive).
    #[default]
    Auto,
    /// bf16 tensor cores; falls back like `Auto`.
    Mma,
    /// Tiled CUDA-core kernels; falls back to `Naive`.
    Simt,
    /// One thread per output element, direct loops: the on-device reference.
    Naive,
}

impl NaKernel {
    /// The environment variable [`NaKernel::from_env`] reads.
    pub const ENV: &'static str = "MVAR_NA_KERNEL";

    /// `MVAR_NA_KERNEL` = `naive`, `simt`, `mma` (or `tensor`); anything else, or unset, is
    /// `Auto`.
    pub fn from_env() -> NaKernel {
        Self::parse(&std::env::var(Self::ENV).unwrap_or_default())
    }

    /// The family a `MVAR_NA_KERNEL` value names (see [`NaKernel::from_env`]).
    pub fn parse(name: &str) -> NaKernel {
        match name.trim().to_ascii_lowercase().as_str() {
            "naive" => NaKernel::Naive,
            "simt" => NaKernel::Simt,
            "mma" | "tensor" => NaKernel::Mma,
            _ => NaKernel::Auto,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            NaKernel::Auto => "auto",
            NaKernel::Mma => "mma",
            NaKernel::Simt => "simt",
            NaKernel::Naive => "naive",
        }
    }

    /// The family that runs for buffers of `kind` and head dim `d` (never `Auto`), before the
    /// shared-memory and alignment fallbacks of a launch.
    pub fn resolve(self, kind: BufferKind, d: usize) -> NaKernel {
        let mma =
            kind == BufferKind::BF16 && d.is_multiple_of(16) && (16..=MMA_MAX_DIM).contains(&d);
        let simt = kind.is_float() && SIMT_DIMS.contains(&d);
        match self {
            NaKernel::Naive => NaKernel::Naive,
            NaKernel::Simt if simt => NaKernel::Simt,
            NaKernel::Simt => NaKernel::Naive,
            NaKernel::Auto | NaKernel::Mma if mma => NaKernel::Mma,
            NaKernel::Auto | NaKernel::Mma if simt => NaKernel::Simt,
            NaKernel::Auto | NaKernel::Mma => NaKernel::Naive,
        }
    }
}

/// A timing diagnostic of the mma kernels (`NA_DIAG_*` in the kernel file): which part of their
/// work they leave out. Anything but `Full` gives wrong results on purpose; the benches time
/// `LoadsOnly` and `NoLoads` beside `Full`, so that T(full) - T(no loads) is what the loads add
/// and T(full) - T(loads only) what the arithmetic adds (each near T(full) means the other part
/// hides behind it). The other families ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NaDiag {
    /// The kernels as they are.
    #[default]
    Full,
    /// No chunk loops: staging, the fragment loads of each warp's own tokens and the stores.
    LoadsOnly,
    /// No staging into shared memory (zeroed once per block instead); everything else.
    NoLoads,
}

impl NaDiag {
    /// The environment variable [`NaDiag::from_env`] reads.
    pub const ENV: &'static str = "MVAR_NA_DIAG";

    /// `MVAR_NA_DIAG` = `loads-only` or `no-loads`; unset, empty or `full` is `Full`. Another
    /// value is refused rather than read as `Full`, since a typo would time the wrong thing.
    /// The first call that finds a diagnostic says on stderr that results are wrong.
    pub fn from_env() -> Result<NaDiag, CudaError> {
        let value = std::env::var(Self::ENV).unwrap_or_default();
        let diag = Self::parse(&value).ok_or_else(|| CudaError::Launch {
            op: "na2d".into(),
            sizes: "every shape".into(),
            message: format!(
                "{}={value:?}: expected full, loads-only or no-loads",
                Self::ENV
            ),
        })?;
        if diag != NaDiag::Full {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                eprintln!(
                    "mvar: {}={}: the neighbourhood-attention mma kernels leave out part of \
                     their work and give wrong results (a timing diagnostic for the benches)",
                    Self::ENV,
                    diag.name()
                )
            });
        }
        Ok(diag)
    }

    /// The diagnostic a `MVAR_NA_DIAG` value names; None for an unknown one.
    pub fn parse(name: &str) -> Option<NaDiag> {
        match name.trim().to_ascii_lowercase().as_str() {
            "" | "full" => Some(NaDiag::Full),
            "loads-only" => Some(NaDiag::LoadsOnly),
            "no-loads" => Some(NaDiag::NoLoads),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            NaDiag::Full => "full",
            NaDiag::LoadsOnly => "loads-only",
            NaDiag::NoLoads => "no-loads",
        }
    }

    /// `NA_DIAG_*` of the kernel file.
    fn code(self) -> i32 {
        match self {
            NaDiag::Full => 0,
            NaDiag::LoadsOnly => 1,
            NaDiag::NoLoads => 2,
        }
    }
}

/// How the mma kernels stage rows into shared memory (`MVAR_NA_STAGING`); the other families
/// ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NaStaging {
    /// Block tiles (4 rows of 16 tokens) stage the rows they read through `cp.async`.
    #[default]
    Async,
    /// Block tiles stage through registers, as before `cp.async` (kept for comparison).
    Registers,
    /// A block walks `groups` row groups of a 16-column strip of a map (0: as many as leave two
    /// work items per resident block), staging each row once into a ring of rows and the next
    /// group's rows while the current one computes (the `*_ring_mma_*` kernels). Shapes whose
    /// rows of one group do not fit stage as `Async`.
    Ring { groups: u32 },
}

impl NaStaging {
    /// The environment variable [`NaStaging::from_env`] reads.
    pub const ENV: &'static str = "MVAR_NA_STAGING";

    /// `MVAR_NA_STAGING` = `async` (or unset, or empty), `registers`, `ring` or `ring:N` (N row
    /// groups per work item). Another value is refused: a typo would time the wrong kernels.
    pub fn from_env() -> Result<NaStaging, CudaError> {
        let value = std::env::var(Self::ENV).unwrap_or_default();
        Self::parse(&value).ok_or_else(|| CudaError::Launch {
            op: "na2d".into(),
            sizes: "every shape".into(),
            message: format!(
                "{}={value:?}: expected async, registers, ring or ring:N (N >= 1 row groups)",
                Self::ENV
            ),
        })
    }

    /// The staging a `MVAR_NA_STAGING` value names; None for an unknown one.
    pub fn parse(name: &str) -> Option<NaStaging> {
        match name.trim().to_ascii_lowercase().as_str() {
            "" | "async" => Some(NaStaging::Async),
            "registers" => Some(NaStaging::Registers),
            "ring" => Some(NaStaging::Ring { groups: 0 }),
            other => match other.strip_prefix("ring:")?.trim().parse() {
                Ok(groups) if groups >= 1 => Some(NaStaging::Ring { groups }),
                _ => None,
            },
        }
    }

    pub fn name(self) -> String {
        match self {
            NaStaging::Async => "async".into(),
            NaStaging::Registers => "registers".into(),
            NaStaging::Ring { groups: 0 } => "ring".into(),
            NaStaging::Ring { groups } => format!("ring:{groups}"),
        }
    }
}

/// How the op's kernels run: the family asked for, the mma kernels' staging and (benches only)
/// a timing diagnostic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NaRun {
    pub kernel: NaKernel,
    pub staging: NaStaging,
    pub diag: NaDiag,
}

impl NaRun {
    /// `kernel` with the staging and the diagnostic the environment asks for
    /// (`MVAR_NA_STAGING`, `MVAR_NA_DIAG`).
    pub fn with_env(kernel: NaKernel) -> Result<NaRun, CudaError> {
        Ok(NaRun {
            kernel,
            staging: NaStaging::from_env()?,
            diag: NaDiag::from_env()?,
        })
    }
}

/// Mirror of `struct NaGeom` in na2d.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
struct Geom {
    maps: i64,
    x: i32,
    y: i32,
    d: i32,
    ks: i32,
    wx: i32,
    ncw: i32,
    rows: i32,
    xtiles: i32,
    ytiles: i32,
    async_stage: i32,
    diag: i32,
    ring: i32,
    scale: f32,
    scale_log2: f32,
}

// SAFETY: plain old data with the C layout of the device struct.
unsafe impl DeviceRepr for Geom {}

/// First key of query `i`'s window on an axis of extent `n` (the op's `natten_window_start`).
fn start(i: usize, n: usize, k: usize) -> usize {
    i.saturating_sub(k / 2).min(n - k)
}

/// The queries whose window holds key `j`: `inv_lo(j) .. inv_hi(j)` (the op's
/// `natten_inverse_window`).
fn inv_lo(j: usize, k: usize) -> usize {
    if j < k {
        0
    } else {
        j - k / 2
    }
}

fn inv_hi(j: usize, n: usize, k: usize) -> usize {
    if j + k >= n {
        n
    } else {
        j + k / 2 + 1
    }
}

/// Which tokens a tiled kernel stages: keys around its queries (forward, dq) or queries around
/// its keys (dk/dv).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Query,
    Key,
}

/// The three kernels of the op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Forward,
    Dq,
    DkDv,
}

impl Pass {
    /// The pass's part of the kernel names.
    fn name(self) -> &'static str {
        match self {
            Pass::Forward => "fwd",
            Pass::Dq => "dq",
            Pass::DkDv => "dkdv",
        }
    }

    fn side(self) -> Side {
        match self {
            Pass::DkDv => Side::Key,
            _ => Side::Query,
        }
    }
}

/// Blocks per multiprocessor the mma kernels of `pass` with head dim `d` are compiled for
/// (`NA_MMA_*_BLOCKS` in the kernel file, the second `__launch_bounds__` argument of the tile and
/// the ring-staged kernels alike: as many as fit without spilling registers on sm_80 and sm_90,
/// checked by the kernel compile test).
fn mma_blocks_per_sm(pass: Pass, d: usize) -> usize {
    match pass {
        Pass::Forward if d <= 80 => 4,
        Pass::Forward if d <= 112 => 3,
        Pass::Dq if d <= 48 => 4,
        Pass::Dq | Pass::DkDv if d <= 80 => 3,
        _ => 2,
    }
}

/// What the plans need of a device: its shared-memory limits, for the mma budget, and its
/// multiprocessor count, for the ring's work items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeviceLimits {
    per_multiprocessor: usize,
    per_block_optin: usize,
    multiprocessors: usize,
}

impl DeviceLimits {
    fn of(dev: &CudaDevice) -> DeviceLimits {
        DeviceLimits {
            per_multiprocessor: dev.smem_per_multiprocessor(),
            per_block_optin: dev.max_smem_optin(),
            multiprocessors: dev.multiprocessors(),
        }
    }

    /// Shared memory one mma block of `pass` may take: its share of the multiprocessor when
    /// [`mma_blocks_per_sm`] of them are resident, within the opt-in limit, at least
    /// [`SMEM_BUDGET`].
    fn mma_budget(self, pass: Pass, d: usize) -> usize {
        (self.per_multiprocessor / mma_blocks_per_sm(pass, d))
            .saturating_sub(SMEM_RESERVED_PER_BLOCK)
            .min(self.per_block_optin)
            .max(SMEM_BUDGET)
    }
}

/// The rows (or columns) a tiled kernel stages for its tokens `first ..= last` on an axis of
/// extent `n`: the union of their windows (Query) or inverse windows (Key), as `lo .. hi`.
fn staged(side: Side, n: usize, k: usize, first: usize, last: usize) -> (usize, usize) {
    match side {
        Side::Query => (start(first, n, k), start(last, n, k) + k),
        Side::Key => (inv_lo(first, k), inv_hi(last, n, k)),
    }
}

/// (staged columns per row, a multiple of 16; rows a block needs): the largest over the tiles.
fn spans(s: &Na2dShape, side: Side) -> (usize, usize) {
    let span = |n: usize, first: usize, last: usize| {
        let (lo, hi) = staged(side, n, s.kernel_size, first, last);
        hi - lo
    };
    let rows = (0..s.x)
        .step_by(WARPS)
        .map(|x0| span(s.x, x0, (x0 + WARPS).min(s.x) - 1))
        .max()
        .unwrap_or(1);
    let cols = (0..s.y)
        .step_by(TILE)
        .map(|y0| span(s.y, y0, (y0 + TILE).min(s.y) - 1).div_ceil(TILE) * TILE)
        .max()
        .unwrap_or(TILE);
    (cols, rows)
}

/// (bytes independent of the staged rows, bytes per staged row) of a tiled kernel's dynamic
/// shared memory; the layouts are described at each kernel.
fn smem_layout(family: NaKernel, side: Side, d: usize, ncw: usize) -> (usize, usize) {
    let (tok, stats) = match family {
        NaKernel::Mma => ((d + 8) * 2, 4),
        _ => (d * 4, 4),
    };
    match side {
        Side::Query => (0, 2 * ncw * tok),
        Side::Key => {
            let own = if family == NaKernel::Mma {
                2 * WARPS * TILE * tok
            } else {
                0
            };
            (own, 2 * ncw * tok + 2 * ncw * stats)
        }
    }
}

/// A resolved launch: the family, the geometry and, for a tiled family, the dynamic shared
/// memory and the grid.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Plan {
    family: NaKernel,
    geom: Geom,
    smem: usize,
    grid: u32,
}

/// The ring of an mma kernel (`NaStaging::Ring`) staging `side`'s rows, when the rows of one row
/// group (`needed`) fit in the `fit` rows of the budget: (slots, row groups per work item). Slots
/// enough for the rows of two successive groups when they fit, so that a group's copies all fly
/// while the previous group computes; else as many as fit, and the prefetch takes the next
/// group's first rows. `groups` 0 picks the most groups per item (each row staged once per item)
/// that still leaves two items per resident block (`resident`), at least two.
fn ring_plan(
    s: &Na2dShape,
    side: Side,
    needed: usize,
    fit: usize,
    strips: usize,
    resident: usize,
    groups: u32,
) -> Option<(usize, usize)> {
    if fit < needed {
        return None;
    }
    let xtiles = s.x.div_ceil(WARPS);
    let group = |gi: usize| {
        let last = ((gi + 1) * WARPS).min(s.x) - 1;
        staged(side, s.x, s.kernel_size, gi * WARPS, last)
    };
    let two = (1..xtiles)
        .map(|gi| group(gi).1 - group(gi - 1).0)
        .max()
        .unwrap_or(0);
    let slots = two.min(fit).max(needed);
    let groups = match groups as usize {
        0 => {
            let segments = (1..=xtiles)
                .find(|&n| strips.saturating_mul(n) >= 2 * resident)
                .unwrap_or(xtiles);
            xtiles.div_ceil(segments).max(2.min(xtiles))
        }
        g => g.min(xtiles),
    };
    Some((slots, groups))
}

/// The plan of `pass` for `which` (already adjusted to the device, see [`usable_on`]); `limits`
/// None plans the mma kernels within [`SMEM_BUDGET`] too, and never a ring.
fn plan(
    s: &Na2dShape,
    kind: BufferKind,
    which: NaKernel,
    pass: Pass,
    scale: f32,
    limits: Option<DeviceLimits>,
    staging: NaStaging,
) -> Plan {
    let xtiles = s.x.div_ceil(WARPS);
    let ytiles = s.y.div_ceil(TILE);
    let mut geom = Geom {
        maps: s.maps as i64,
        x: s.x as i32,
        y: s.y as i32,
        d: s.d as i32,
        ks: s.kernel_size as i32,
        wx: WARPS as i32,
        ncw: 0,
        rows: 0,
        xtiles: xtiles as i32,
        ytiles: ytiles as i32,
        async_stage: 1,
        diag: 0,
        ring: 0,
        scale,
        scale_log2: (scale as f64 * std::f64::consts::LOG2_E) as f32,
    };
    let naive = Plan {
        family: NaKernel::Naive,
        geom,
        smem: 0,
        grid: 0,
    };
    let family = which.resolve(kind, s.d);
    let tiles = xtiles
        .checked_mul(ytiles)
        .filter(|&t| t <= i32::MAX as usize)
        .and_then(|t| t.checked_mul(s.maps));
    let Some(tiles) = tiles.filter(|&t| t > 0) else {
        return naive;
    };
    if family == NaKernel::Naive {
        return naive;
    }
    let side = pass.side();
    let budget = match (family, limits) {
        (NaKernel::Mma, Some(l)) => l.mma_budget(pass, s.d),
        _ => SMEM_BUDGET,
    };
    let (ncw, needed) = spans(s, side);
    let (fixed, per_row) = smem_layout(family, side, s.d, ncw);
    geom.ncw = ncw as i32;
    if let (NaKernel::Mma, NaStaging::Ring { groups }, Some(l)) = (family, staging, limits) {
        let fit = l.mma_budget(pass, s.d).saturating_sub(fixed) / per_row;
        let strips = s.maps.saturating_mul(ytiles);
        let resident = l.multiprocessors.max(1) * mma_blocks_per_sm(pass, s.d);
        let ring =
            ring_plan(s, side, needed, fit, strips, resident, groups).and_then(|(slots, g)| {
                let items = strips.checked_mul(xtiles.div_ceil(g))?;
                (items <= i32::MAX as usize).then_some((slots, g, items))
            });
        if let Some((slots, groups, items)) = ring {
            geom.rows = slots as i32;
            geom.ring = groups as i32;
            return Plan {
                family,
                geom,
                smem: fixed + slots * per_row,
                grid: items as u32,
            };
        }
    }
    let most = (budget.saturating_sub(fixed) / per_row).clamp(1, needed);
    // As many stages as the budget needs, their rows evened out.
    let rows = needed.div_ceil(needed.div_ceil(most));
    geom.rows = rows as i32;
    Plan {
        family,
        geom,
        smem: fixed + rows * per_row,
        grid: tiles.min(i32::MAX as usize) as u32,
    }
}

/// The kernel of a tiled plan, with the shared-memory opt-in set when it needs one; None when
/// the device refuses that much shared memory (the caller then runs the naive kernel).
fn tiled_function(
    dev: &CudaDevice,
    name: &str,
    smem: usize,
) -> Result<Option<CudaFunction>, CudaError> {
    let f = dev.function(&NA2D, name)?;
    if smem > SMEM_DEFAULT_LIMIT
        && f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .is_err()
    {
        return Ok(None);
    }
    Ok(Some(f))
}

/// The plan of `pass` on this device, with its tiled kernel and launch configuration; None for
/// the kernel when the naive one must run (its family, or buffers that are not 16-byte aligned,
/// or no shared-memory opt-in even for the default budget). A plan whose shared memory the
/// device refuses is made again within [`SMEM_BUDGET`].
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn tiled_plan(
    dev: &CudaDevice,
    s: &Na2dShape,
    kind: BufferKind,
    run: NaRun,
    pass: Pass,
    scale: f32,
    bufs: &[&CudaBuffer],
) -> Result<(Plan, Option<(CudaFunction, LaunchConfig)>), CudaError> {
    let which = usable_on(dev, run.kernel);
    let limits = Some(DeviceLimits::of(dev));
    let mut p = plan(s, kind, which, pass, scale, limits, run.staging);
    p.geom.async_stage = (run.staging != NaStaging::Registers) as i32;
    if p.family == NaKernel::Mma {
        p.geom.diag = run.diag.code();
    }
    if p.family == NaKernel::Naive || bufs.iter().any(|b| b.device_ptr() % 16 != 0) {
        return Ok((p, None));
    }
    let mut f = tiled_function(dev, &kernel_name(&p, pass, kind), p.smem)?;
    if f.is_none() {
        let (stage, diag) = (p.geom.async_stage, p.geom.diag);
        p = plan(s, kind, which, pass, scale, None, run.staging);
        p.geom.async_stage = stage;
        p.geom.diag = diag;
        f = tiled_function(dev, &kernel_name(&p, pass, kind), p.smem)?;
    }
    let cfg = LaunchConfig {
        grid_dim: (p.grid, 1, 1),
        block_dim: ((WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: p.smem as u32,
    };
    Ok((p, f.map(|f| (f, cfg))))
}

fn naive(
    dev: &CudaDevice,
    pass: Pass,
    kind: BufferKind,
    total: usize,
) -> Result<(CudaFunction, LaunchConfig), CudaError> {
    let f = dev.function(
        &NA2D,
        &format!("na2d_{}_naive_{}", pass.name(), kind.suffix()),
    )?;
    Ok((f, launch_1d(total, NAIVE_THREADS)))
}

/// The family a forward (`backward == false`) or backward with these buffers' kind, shape and
/// request runs, after every fallback (for benchmarks and tests to report). The backward's two
/// kernels resolve alike except for the shared-memory fallback, which this reports per kernel as
/// the simpler of the two.
pub fn na2d_family(
    dev: &CudaDevice,
    kind: BufferKind,
    s: &Na2dShape,
    which: NaKernel,
    backward: bool,
) -> Result<NaKernel, CudaError> {
    let passes: &[Pass] = if backward {
        &[Pass::Dq, Pass::DkDv]
    } else {
        &[Pass::Forward]
    };
    let mut out = NaKernel::Mma;
    for &pass in passes {
        let run = NaRun {
            kernel: which,
            ..NaRun::default()
        };
        let (p, f) = tiled_plan(dev, s, kind, run, pass, 1.0, &[])?;
        let fam = if f.is_some() {
            p.family
        } else {
            NaKernel::Naive
        };
        out = simpler(out, fam);
    }
    Ok(out)
}

/// `which`, with the tensor-core family swapped for the CUDA-core one on GPUs older than sm_80
/// (they have no bf16 `mma.sync`).
fn usable_on(dev: &CudaDevice, which: NaKernel) -> NaKernel {
    match which {
        NaKernel::Auto | NaKernel::Mma if !dev.has_bf16_mma() => NaKernel::Simt,
        w => w,
    }
}

fn kernel_name(p: &Plan, pass: Pass, kind: BufferKind) -> String {
    let pass = pass.name();
    match p.family {
        NaKernel::Mma if p.geom.ring > 0 => format!("na2d_{pass}_ring_mma_bf16_d{}", p.geom.d),
        NaKernel::Mma => format!("na2d_{pass}_mma_bf16_d{}", p.geom.d),
        NaKernel::Simt => format!("na2d_{pass}_simt_{}_d{}", kind.suffix(), p.geom.d),
        _ => format!("na2d_{pass}_naive_{}", kind.suffix()),
    }
}

fn simpler(a: NaKernel, b: NaKernel) -> NaKernel {
    let rank = |k: NaKernel| match k {
        NaKernel::Naive => 0,
        NaKernel::Simt => 1,
        _ => 2,
    };
    if rank(a) <= rank(b) {
        a
    } else {
        b
    }
}

/// Neighbourhood attention forward of q, k, v `[maps, x, y, d]` (one float kind) with logits
/// `scale * q . k`. Returns (out of q's kind and shape, lse f32 `[maps, x, y]`, the natural-log
/// log-sum-exp per query that [`na2d_backward`] needs). `run` says which family to ask for and
/// how the mma kernels stage; its `diag` is [`NaDiag::Full`] except in the benches' timing
/// diagnostics.
#[allow(clippy::too_many_arguments)]
pub fn na2d_forward(
    dev: &CudaDevice,
    q: &CudaBuffer,
    k: &CudaBuffer,
    v: &CudaBuffer,
    s: Na2dShape,
    scale: f32,
    run: NaRun,
) -> Result<(CudaBuffer, CudaBuffer), CudaError> {
    const OP: &str = "na2d";
    let kind = float_kind(OP, &[q, k, v])?;
    let (tokens, total) = s.check(OP)?;
    check_lens(OP, &[(q, total), (k, total), (v, total)])?;
    let out = dev.alloc(kind, total, "na2d output")?;
    if total == 0 {
        // No head dim (or no maps): nothing to attend over, the lse stays 0 as on the CPU.
        return Ok((out, dev.zeros(BufferKind::F32, tokens)?));
    }
    let lse = dev.alloc(BufferKind::F32, tokens, "na2d log-sum-exp")?;
    let (p, tiled) = tiled_plan(dev, &s, kind, run, Pass::Forward, scale, &[q, k, v, &out])?;
    let (f, cfg) = match tiled {
        Some(t) => t,
        None => naive(dev, Pass::Forward, kind, total)?,
    };
    let (po, pl, pq, pk, pv) = (
        out.device_ptr(),
        lse.device_ptr(),
        q.device_ptr(),
        k.device_ptr(),
        v.device_ptr(),
    );
    let g = p.geom;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po).arg(&pl).arg(&pq).arg(&pk).arg(&pv).arg(&g);
    // SAFETY: q, k, v and out hold maps * x * y * d elements of `kind`, lse maps * x * y f32s;
    // the kernels read and write only tokens inside the maps, and the tiled ones only the shared
    // memory the plan sized.
    unsafe { b.launch(cfg) }.map_err(launch_err(OP, s.sizes()))?;
    Ok((out, lse))
}

/// (dq, dk, dv) of [`na2d_forward`] from the saved q, k, v, out and lse and the incoming
/// gradient `g` (all `[maps, x, y, d]` of one kind, lse f32 `[maps, x, y]`). Two kernels: dq per
/// query over its window (also writing delta = g . out per query), then dk and dv per key over
/// the queries whose window holds it. `run` as for [`na2d_forward`].
#[allow(clippy::too_many_arguments)]
pub fn na2d_backward(
    dev: &CudaDevice,
    q: &CudaBuffer,
    k: &CudaBuffer,
    v: &CudaBuffer,
    out: &CudaBuffer,
    g: &CudaBuffer,
    lse: &CudaBuffer,
    s: Na2dShape,
    scale: f32,
    run: NaRun,
) -> Result<(CudaBuffer, CudaBuffer, CudaBuffer), CudaError> {
    const OP: &str = "na2d backward";
    let kind = float_kind(OP, &[q, k, v, out, g])?;
    require_kind(OP, lse, "log-sum-exp", BufferKind::F32)?;
    let (tokens, total) = s.check(OP)?;
    check_lens(
        OP,
        &[
            (q, total),
            (k, total),
            (v, total),
            (out, total),
            (g, total),
            (lse, tokens),
        ],
    )?;
    let dq = dev.alloc(kind, total, "na2d dq")?;
    let dk = dev.alloc(kind, total, "na2d dk")?;
    let dv = dev.alloc(kind, total, "na2d dv")?;
    if total == 0 {
        return Ok((dq, dk, dv));
    }
    let delta = dev.alloc(BufferKind::F32, tokens, "na2d delta")?;
    let (pq, pk, pv, po, pg, pl) = (
        q.device_ptr(),
        k.device_ptr(),
        v.device_ptr(),
        out.device_ptr(),
        g.device_ptr(),
        lse.device_ptr(),
    );
    let (pdq, pdk, pdv, pdl) = (
        dq.device_ptr(),
        dk.device_ptr(),
        dv.device_ptr(),
        delta.device_ptr(),
    );

    let (p, tiled) = tiled_plan(dev, &s, kind, run, Pass::Dq, scale, &[q, k, v, out, g, &dq])?;
    let (f, cfg) = match tiled {
        Some(t) => t,
        None => naive(dev, Pass::Dq, kind, total)?,
    };
    let geom = p.geom;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pdq)
        .arg(&pdl)
        .arg(&pq)
        .arg(&pk)
        .arg(&pv)
        .arg(&po)
        .arg(&pg)
        .arg(&pl)
        .arg(&geom);
    // SAFETY: every [maps, x, y, d] buffer holds total elements of `kind`, lse and delta tokens
    // f32s; see na2d_forward for the kernels' accesses.
    unsafe { b.launch(cfg) }.map_err(launch_err(OP, s.sizes()))?;

    let (p, tiled) = tiled_plan(
        dev,
        &s,
        kind,
        run,
        Pass::DkDv,
        scale,
        &[q, k, v, g, &dk, &dv],
    )?;
    let (f, cfg) = match tiled {
        Some(t) => t,
        None => naive(dev, Pass::DkDv, kind, total)?,
    };
    let geom = p.geom;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pdk)
        .arg(&pdv)
        .arg(&pq)
        .arg(&pk)
        .arg(&pv)
        .arg(&pg)
        .arg(&pl)
        .arg(&pdl)
        .arg(&geom);
    // SAFETY: as above; delta was written for every token by the dq kernel, earlier on the same
    // stream.
    unsafe { b.launch(cfg) }.map_err(launch_err(OP, s.sizes()))?;
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(x: usize, y: usize, d: usize, k: usize) -> Na2dShape {
        Na2dShape {
            maps: 2,
            x,
            y,
            d,
            kernel_size: k,
        }
    }

    #[test]
    fn geom_matches_the_c_struct_size() {
        // i64 maps; int x, y, d, ks, wx, ncw, rows, xtiles, ytiles, async_stage, diag, ring;
        // float scale, scale_log2 (64 bytes)
        assert_eq!(std::mem::size_of::<Geom>(), 8 + 12 * 4 + 2 * 4);
    }

    /// The window helpers agree with a brute-force inverse of the window rule.
    #[test]
    fn inverse_window_is_exact() {
        for n in 1..20 {
            for k in (1..=n).step_by(2) {
                for j in 0..n {
                    let want: Vec<usize> = (0..n)
                        .filter(|&i| (start(i, n, k)..start(i, n, k) + k).contains(&j))
                        .collect();
                    let got: Vec<usize> = (inv_lo(j, k)..inv_hi(j, n, k)).collect();
                    assert_eq!(got, want, "n {n} k {k} j {j}");
                }
            }
        }
    }

    /// Every token a tile's warps touch lies in the staged span, and the span bound of the
    /// kernel file holds (16 + k - 1 key columns, 14 + 2k query columns).
    #[test]
    fn spans_cover_every_window() {
        for (x, y) in [(16, 16), (13, 13), (5, 40), (37, 9), (7, 7)] {
            for k in (1..=x.min(y)).step_by(2) {
                let s = shape(x, y, 64, k);
                let (qc, qr) = spans(&s, Side::Query);
                let (kc, kr) = spans(&s, Side::Key);
                assert!(qc % TILE == 0 && kc % TILE == 0);
                assert!(qc <= (TILE + k - 1).div_ceil(TILE) * TILE, "{x}x{y} k {k}");
                assert!(kc <= (14 + 2 * k).div_ceil(TILE) * TILE, "{x}x{y} k {k}");
                assert!(qr <= (WARPS + k - 1).min(x) && kr <= x);
                for x0 in (0..x).step_by(WARPS) {
                    let xl = (x0 + WARPS).min(x) - 1;
                    for i in x0..=xl {
                        let (lo, hi) = (start(x0, x, k), start(xl, x, k) + k);
                        assert!(lo <= start(i, x, k) && start(i, x, k) + k <= hi);
                        let (ilo, ihi) = (inv_lo(x0, k), inv_hi(xl, x, k));
                        assert!(ilo <= inv_lo(i, k) && inv_hi(i, x, k) <= ihi);
                    }
                }
            }
        }
    }

    #[test]
    fn families_fall_back_by_dtype_and_head_dim() {
        use BufferKind::{BF16, F32};
        assert_eq!(NaKernel::Auto.resolve(BF16, 64), NaKernel::Mma);
        assert_eq!(NaKernel::Auto.resolve(BF16, 128), NaKernel::Mma);
        assert_eq!(NaKernel::Auto.resolve(F32, 64), NaKernel::Simt);
        assert_eq!(NaKernel::Auto.resolve(F32, 128), NaKernel::Naive);
        assert_eq!(NaKernel::Auto.resolve(BF16, 40), NaKernel::Naive);
        assert_eq!(NaKernel::Mma.resolve(F32, 32), NaKernel::Simt);
        assert_eq!(NaKernel::Simt.resolve(BF16, 64), NaKernel::Simt);
        assert_eq!(NaKernel::Simt.resolve(BF16, 96), NaKernel::Naive);
        assert_eq!(NaKernel::Naive.resolve(BF16, 64), NaKernel::Naive);
    }

    /// An H100's (and H200's) limits: 228 KiB per multiprocessor, 227 KiB per block.
    const HOPPER: DeviceLimits = DeviceLimits {
        per_multiprocessor: 233_472,
        per_block_optin: 232_448,
        multiprocessors: 132,
    };
    /// An RTX 3090's / 4090's: 100 KiB per multiprocessor, 99 KiB per block.
    const AMPERE_GEFORCE: DeviceLimits = DeviceLimits {
        per_multiprocessor: 102_400,
        per_block_optin: 101_376,
        multiprocessors: 82,
    };

    /// MVAR's shapes stage in one pass within the default budget; large windows split into
    /// stages of even rows; every plan fits its budget unless a single row does not.
    #[test]
    fn plans_fit_the_shared_memory_budget() {
        let mvar = shape(16, 16, 64, 7);
        let p = plan(
            &mvar,
            BufferKind::BF16,
            NaKernel::Auto,
            Pass::Forward,
            0.125,
            None,
            NaStaging::Async,
        );
        assert_eq!(p.family, NaKernel::Mma);
        assert_eq!((p.geom.ncw, p.geom.rows), (16, 10));
        assert!(p.smem <= SMEM_BUDGET);
        assert_eq!(p.grid, 2 * 4);
        for limits in [None, Some(HOPPER), Some(AMPERE_GEFORCE)] {
            for (kind, d) in [
                (BufferKind::BF16, 128),
                (BufferKind::BF16, 64),
                (BufferKind::F32, 64),
            ] {
                for pass in [Pass::Forward, Pass::Dq, Pass::DkDv] {
                    for k in [3, 7, 13, 31] {
                        let s = shape(40, 40, d, k);
                        let p = plan(
                            &s,
                            kind,
                            NaKernel::Auto,
                            pass,
                            1.0,
                            limits,
                            NaStaging::Async,
                        );
                        let budget = match (p.family, limits) {
                            (NaKernel::Mma, Some(l)) => l.mma_budget(pass, d),
                            _ => SMEM_BUDGET,
                        };
                        let side = pass.side();
                        let (fixed, per_row) = smem_layout(p.family, side, d, p.geom.ncw as usize);
                        assert_eq!(p.smem, fixed + p.geom.rows as usize * per_row);
                        assert!(p.smem <= budget || p.geom.rows == 1, "{kind:?} {d} {k}");
                        // Even stages: no more stages than the budget's rows need, and the
                        // last one at most one row short of the others.
                        let (_, needed) = spans(&s, side);
                        let rows = p.geom.rows as usize;
                        let most = (budget.saturating_sub(fixed) / per_row).clamp(1, needed);
                        assert_eq!(needed.div_ceil(rows), needed.div_ceil(most));
                        assert!(rows * needed.div_ceil(rows) - needed < needed.div_ceil(rows));
                    }
                }
            }
        }
        let none = Na2dShape { maps: 0, ..mvar };
        assert_eq!(
            plan(
                &none,
                BufferKind::BF16,
                NaKernel::Auto,
                Pass::DkDv,
                1.0,
                None,
                NaStaging::Async
            )
            .family,
            NaKernel::Naive
        );
    }

    /// The mma budget lets as many blocks share a multiprocessor as their registers allow, and
    /// on a Hopper GPU MVAR's maps (16x16 and 13x13, k 7, d 64) stage the rows of each pass in
    /// one go, but dk/dv of 13x13 in two (within 48 KiB dk/dv took two and three).
    #[test]
    fn mma_plans_share_the_multiprocessor_as_registers_allow() {
        for limits in [HOPPER, AMPERE_GEFORCE] {
            for pass in [Pass::Forward, Pass::Dq, Pass::DkDv] {
                for d in (16..=MMA_MAX_DIM).step_by(16) {
                    let blocks = mma_blocks_per_sm(pass, d);
                    let budget = limits.mma_budget(pass, d);
                    assert!(budget <= limits.per_block_optin);
                    assert!(
                        blocks * (budget + SMEM_RESERVED_PER_BLOCK) <= limits.per_multiprocessor
                            || budget == SMEM_BUDGET,
                        "{pass:?} d {d}"
                    );
                }
            }
        }
        for side in [16, 13] {
            let s = shape(side, side, 64, 7);
            for pass in [Pass::Forward, Pass::Dq, Pass::DkDv] {
                let p = plan(
                    &s,
                    BufferKind::BF16,
                    NaKernel::Auto,
                    pass,
                    1.0,
                    Some(HOPPER),
                    NaStaging::Async,
                );
                assert_eq!(p.family, NaKernel::Mma);
                let stages = spans(&s, pass.side()).1.div_ceil(p.geom.rows as usize);
                let want = if side == 13 && pass == Pass::DkDv {
                    2
                } else {
                    1
                };
                assert_eq!(stages, want, "{side} {pass:?}");
            }
        }
    }

    /// Ring plans: on a Hopper GPU MVAR's 16x16 maps get a ring in every pass (the forward's 12
    /// slots prefetch part of the next group, dq's 14 all of it, dk/dv's 12 one row);
    /// every ring holds the rows of any one group and fits the ring kernels' budget; the grid is
    /// one block per work item; rows that do not fit fall back to the tiles.
    #[test]
    fn ring_plans_hold_a_group_and_fit_the_budget() {
        let ring = NaStaging::Ring { groups: 0 };
        let at = |s: &Na2dShape, pass, limits, staging| {
            plan(
                s,
                BufferKind::BF16,
                NaKernel::Auto,
                pass,
                1.0,
                limits,
                staging,
            )
        };
        let mvar = Na2dShape {
            maps: 64 * 16,
            ..shape(16, 16, 64, 7)
        };
        let fwd = at(&mvar, Pass::Forward, Some(HOPPER), ring);
        let dq = at(&mvar, Pass::Dq, Some(HOPPER), ring);
        // 1024 strips of 4 groups: two items per strip leave two per resident block (528 fwd).
        assert_eq!((fwd.geom.ring, fwd.geom.rows, fwd.grid), (2, 12, 2048));
        // dq: 396 resident, one item per strip is 2.6 per block.
        assert_eq!((dq.geom.ring, dq.geom.rows, dq.grid), (4, 14, 1024));
        // dk/dv: 12 slots hold a group's 11 inverse-window rows and prefetch one of the next's.
        let dkdv = at(&mvar, Pass::DkDv, Some(HOPPER), ring);
        assert_eq!((dkdv.geom.ring, dkdv.geom.rows, dkdv.grid), (4, 12, 1024));
        // 13x13: a group's inverse window is the whole map, 13 rows; 12 fit, so tiles.
        let mvar13 = shape(13, 13, 64, 7);
        assert_eq!(at(&mvar13, Pass::DkDv, Some(HOPPER), ring).geom.ring, 0);
        for staging in [NaStaging::Async, NaStaging::Registers] {
            assert_eq!(at(&mvar, Pass::Forward, Some(HOPPER), staging).geom.ring, 0);
        }
        assert_eq!(at(&mvar, Pass::Forward, None, ring).geom.ring, 0);
        let fixed = at(&mvar, Pass::Dq, Some(HOPPER), NaStaging::Ring { groups: 3 });
        assert_eq!((fixed.geom.ring, fixed.grid), (3, 2048));
        for limits in [HOPPER, AMPERE_GEFORCE] {
            for (x, y, d, k) in [
                (16, 16, 64, 7),
                (13, 13, 64, 7),
                (37, 9, 128, 9),
                (30, 40, 16, 3),
            ] {
                let s = shape(x, y, d, k);
                for pass in [Pass::Forward, Pass::Dq, Pass::DkDv] {
                    let p = at(&s, pass, Some(limits), ring);
                    assert_eq!(p.family, NaKernel::Mma);
                    if p.geom.ring == 0 {
                        continue;
                    }
                    let (fixed, per_row) =
                        smem_layout(NaKernel::Mma, pass.side(), d, p.geom.ncw as usize);
                    assert_eq!(p.smem, fixed + p.geom.rows as usize * per_row);
                    assert!(p.smem <= limits.mma_budget(pass, d), "{x}x{y} d {d} k {k}");
                    assert!(p.geom.rows as usize >= spans(&s, pass.side()).1);
                    let items = s.maps * p.geom.ytiles as usize;
                    let segments = (p.geom.xtiles as usize).div_ceil(p.geom.ring as usize);
                    assert_eq!(p.grid as usize, items * segments);
                    assert!(p.geom.ring as usize <= p.geom.xtiles as usize);
                }
            }
        }
        // k 13 at head dim 128: one group's 16 key rows of 32 columns do not fit.
        let big = shape(30, 20, 128, 13);
        assert_eq!(at(&big, Pass::Forward, Some(HOPPER), ring).geom.ring, 0);
        let p = at(&shape(16, 16, 64, 7), Pass::Dq, Some(HOPPER), ring);
        assert_eq!(
            kernel_name(&p, Pass::Dq, BufferKind::BF16),
            "na2d_dq_ring_mma_bf16_d64"
        );
        assert!(NA2D.source.contains("na2d_fwd_ring_mma_bf16_d##D("));
        assert!(NA2D.source.contains("na2d_dq_ring_mma_bf16_d##D("));
        assert!(NA2D.source.contains("na2d_dkdv_ring_mma_bf16_d##D("));
    }

    /// `mma_blocks_per_sm` says what the kernel file's `NA_MMA_*_BLOCKS(D)` macros say.
    #[test]
    fn blocks_per_sm_mirror_the_launch_bounds() {
        // Evaluates a macro body of the form `(D <= a ? x : D <= b ? y : z)` at d.
        fn eval(body: &str, d: usize) -> usize {
            let body = body.trim();
            let mut rest = body
                .strip_prefix('(')
                .and_then(|b| b.strip_suffix(')'))
                .unwrap();
            loop {
                match rest.split_once('?') {
                    Some((cond, tail)) => {
                        let limit: usize = cond
                            .trim()
                            .trim_start_matches("D <=")
                            .trim()
                            .parse()
                            .unwrap();
                        let (then, els) = tail.split_once(':').unwrap();
                        if d <= limit {
                            return then.trim().parse().unwrap();
                        }
                        rest = els;
                    }
                    None => return rest.trim().parse().unwrap(),
                }
            }
        }
        for (pass, name) in [
            (Pass::Forward, "FWD"),
            (Pass::Dq, "DQ"),
            (Pass::DkDv, "DKDV"),
        ] {
            let head = format!("#define NA_MMA_{name}_BLOCKS(D) ");
            let line = NA2D
                .source
                .lines()
                .find_map(|l| l.strip_prefix(head.as_str()))
                .unwrap_or_else(|| panic!("{head} in na2d.cu"));
            for d in (16..=MMA_MAX_DIM).step_by(16) {
                let blocks = mma_blocks_per_sm(pass, d);
                assert_eq!(blocks, eval(line, d), "{name} d {d}");
            }
        }
    }

    #[test]
    fn shape_check_rejects_bad_kernels() {
        assert!(shape(8, 8, 4, 4).check("t").is_err());
        assert!(shape(8, 5, 4, 7).check("t").is_err());
        assert!(shape(8, 5, 4, 5).check("t").is_ok());
    }

    /// Every kernel a plan can name is instantiated in the kernel file (the names come from the
    /// instantiation macros, so checking the macro lines and the name patterns is enough).
    #[test]
    fn every_planned_kernel_is_instantiated() {
        let src = NA2D.source;
        for pass in ["fwd", "dq", "dkdv"] {
            for (macro_, pattern) in [
                ("NA_NAIVE_KERNELS", format!("na2d_{pass}_naive_##S(")),
                ("NA_SIMT_KERNELS", format!("na2d_{pass}_simt_##S##_d##D(")),
                ("NA_MMA_KERNELS", format!("na2d_{pass}_mma_bf16_d##D(")),
            ] {
                assert!(src.contains(&pattern), "{pattern}");
                assert!(src.contains(&format!("#define {macro_}(")), "{macro_}");
            }
        }
        assert!(src.contains("NA_NAIVE_KERNELS(float, f32)\n"));
        assert!(src.contains("NA_NAIVE_KERNELS(bf16_t, bf16)\n"));
        for d in SIMT_DIMS {
            assert!(src.contains(&format!("NA_SIMT_KERNELS(float, f32, {d})\n")));
            assert!(src.contains(&format!("NA_SIMT_KERNELS(bf16_t, bf16, {d})\n")));
        }
        for d in (16..=MMA_MAX_DIM).step_by(16) {
            assert!(src.contains(&format!("NA_MMA_KERNELS({d})\n")), "{d}");
        }
        let p = plan(
            &shape(16, 16, 64, 7),
            BufferKind::F32,
            NaKernel::Auto,
            Pass::DkDv,
            1.0,
            None,
            NaStaging::Async,
        );
        assert_eq!(
            kernel_name(&p, Pass::DkDv, BufferKind::F32),
            "na2d_dkdv_simt_f32_d64"
        );
        let p = plan(
            &shape(16, 16, 96, 7),
            BufferKind::BF16,
            NaKernel::Auto,
            Pass::Forward,
            1.0,
            None,
            NaStaging::Async,
        );
        assert_eq!(
            kernel_name(&p, Pass::Forward, BufferKind::BF16),
            "na2d_fwd_mma_bf16_d96"
        );
    }

    #[test]
    fn env_values_name_the_family() {
        for k in [
            NaKernel::Auto,
            NaKernel::Mma,
            NaKernel::Simt,
            NaKernel::Naive,
        ] {
            assert_eq!(NaKernel::parse(k.name()), k);
        }
        assert_eq!(NaKernel::parse(" Tensor\n"), NaKernel::Mma);
        assert_eq!(NaKernel::parse(""), NaKernel::Auto);
        assert_eq!(NaKernel::parse("fast"), NaKernel::Auto);
    }
}
