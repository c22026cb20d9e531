//! 2-D convolution (cross-correlation, as PyTorch's `F.conv2d`), NCHW, no groups, no dilation.
//!
//! `conv2d(x, w, bias, (sh, sw), pad)`: x [N, Cin, H, W], w [Cout, Cin, kh, kw] (PyTorch layout),
//! bias \[Cout\]; output [N, Cout, Ho, Wo] with Ho = (H + top + bottom - kh) / sh + 1 (floor) and
//! the same for Wo, and
//!
//!   y[n, co, oy, ox] = bias\[co\] + sum_{ci, ky, kx} w[co, ci, ky, kx] * xp[n, ci, oy*sh + ky, ox*sw + kx]
//!
//! where xp is x with `top`/`bottom` zero rows and `left`/`right` zero columns added. The padding
//! may differ per side: the VQVAE downsampler pads only right and bottom.
//!
//! Computed as im2col + GEMM per sample: cols [K, P] with K = Cin*kh*kw (row r = (ci, ky, kx),
//! row-major) and P = Ho*Wo, then y\[n\] = W [Cout, K] @ cols. The columns are built tile by tile
//! (a range of output positions at a time) so the buffer stays small whatever the image size; a
//! 1x1 stride-1 unpadded conv skips im2col, since x\[n\] seen as [Cin, H*W] already is cols.
//!
//! Backward, per sample and tile: dW += dY cols^T, dbias = sum of dY over batch and positions,
//! and dx: for stride 1 (padding below the kernel) a forward conv of dY with the flipped,
//! transposed weight (same GEMM shape as the forward, no scatter); otherwise dcols = W^T dY
//! scattered back into dx by col2im (the transpose of im2col).
//!
//! Stride-1 3x3 convs with at least 8 channels on each side (all of the VQVAE's but the first
//! and last) run as Winograd F(2x2, 3x3) instead, forward, dx (as the transposed conv above) and
//! dW alike: 2.25x fewer multiply-adds, and 1.4-1.8x faster on the demo tokenizer's shapes
//! (`conv/winograd.rs`; `set_cpu_winograd(false)` selects im2col for comparison).
//!
//! Threading: a batch of at least as many samples as threads runs one sample per task with
//! single-threaded GEMMs (the per-sample products are large enough to keep a core busy, and
//! im2col/col2im run in parallel too); a smaller batch runs its samples in turn with one
//! threaded GEMM per tile. The weight gradient is accumulated per fixed group of samples and
//! the groups are summed in order, so results do not depend on scheduling.
//!
//! On CUDA the same products run on cuBLAS around the im2col / col2im kernels of
//! `cuda/kernels/conv.cu` (batch tiles bounded to 256 MiB of columns; see
//! `mvar_cuda::ops::conv`).

use gemm::Parallelism;
use mvar_engine::cpu::FloatKernel;
use mvar_engine::cuda::ops::conv as cu;
use mvar_engine::{Error, Float, Result, Tensor};
use rayon::prelude::*;

mod winograd;

use crate::util::{
    autocast_run, float_op, lane_sum, out_tensor, output_len, require_rank, same_device,
    same_dtype, written_vec,
};

/// Zero rows/columns added on each side of the input before the kernel slides over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Padding {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Padding {
    /// `p` on every side (PyTorch's `padding=p`; keeps the size for kernel 2p+1, stride 1).
    pub fn same(p: usize) -> Self {
        Padding {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }

    /// No padding.
    pub fn none() -> Self {
        Padding::default()
    }
}

/// Elements in one im2col tile at most (K rows times the tile's positions): 1 MiB of f32, so the
/// buffer stays small for any image size. On [8, 64, 32, 32] x [64, 64, 3, 3] (K = 576) tiles of
/// 455 positions timed the same as whole-image columns (best of 20, busy 2-core machine: ~7 ms
/// forward with one sample per task, ~10 ms with threaded GEMMs over the samples in turn).
const COLS_BUDGET: usize = 1 << 18;

/// Fewer positions than this per tile makes the GEMM too thin to run at speed.
const MIN_TILE: usize = 64;

/// Below this many multiply-adds in total the whole conv runs on the calling thread.
const SMALL_CONV_FLOPS: usize = 1 << 21;

#[derive(Debug, Clone)]
struct ConvGeom {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    pad: Padding,
    ho: usize,
    wo: usize,
}

impl ConvGeom {
    const OP: &'static str = "conv2d";

    fn new(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        stride: (usize, usize),
        pad: Padding,
    ) -> Result<Self> {
        let op = Self::OP;
        require_rank(op, x, "input [N, Cin, H, W]", 4)?;
        require_rank(op, w, "weight [Cout, Cin, kh, kw]", 4)?;
        let (xd, wd) = (x.dims(), w.dims());
        let (n, cin, h, wi) = (xd[0], xd[1], xd[2], xd[3]);
        let (cout, kh, kw) = (wd[0], wd[2], wd[3]);
        if wd[1] != cin {
            return Err(Error::shape(
                op,
                format!("input {} and weight {}", x.shape(), w.shape()),
                format!("a weight [Cout, {cin}, kh, kw] (its axis 1 = the input's channels)"),
            ));
        }
        if cin == 0 || h == 0 || wi == 0 || cout == 0 || kh == 0 || kw == 0 {
            return Err(Error::shape(
                op,
                format!("input {} and weight {}", x.shape(), w.shape()),
                "non-empty channel, spatial and kernel axes (only the batch may be 0)",
            ));
        }
        if let Some(b) = bias {
            if b.dims() != [cout] {
                return Err(Error::shape(
                    op,
                    format!("bias of shape {} for weight {}", b.shape(), w.shape()),
                    format!("a bias [{cout}]"),
                ));
            }
        }
        let (sh, sw) = stride;
        if sh == 0 || sw == 0 {
            return Err(Error::invalid(
                op,
                format!("stride {stride:?}: expected strides >= 1"),
            ));
        }
        let too_big = || {
            Error::invalid(
                op,
                format!("padding {pad:?} for input {}: sizes overflow", x.shape()),
            )
        };
        let ph = h
            .checked_add(pad.top)
            .and_then(|v| v.checked_add(pad.bottom))
            .ok_or_else(too_big)?;
        let pw = wi
            .checked_add(pad.left)
            .and_then(|v| v.checked_add(pad.right))
            .ok_or_else(too_big)?;
        if ph < kh || pw < kw {
            return Err(Error::shape(
                op,
                format!(
                    "kernel {kh}x{kw} on input {} padded to {ph}x{pw}",
                    x.shape()
                ),
                "a kernel no larger than the padded input",
            ));
        }
        let (ho, wo) = ((ph - kh) / sh + 1, (pw - kw) / sw + 1);
        output_len(op, &[n, cout, ho, wo])?;
        Ok(ConvGeom {
            n,
            cin,
            h,
            w: wi,
            cout,
            kh,
            kw,
            sh,
            sw,
            pad,
            ho,
            wo,
        })
    }

    /// The geometry as the CUDA wrappers take it.
    fn cuda_shape(&self) -> cu::Conv2dShape {
        cu::Conv2dShape {
            n: self.n,
            cin: self.cin,
            h: self.h,
            w: self.w,
            cout: self.cout,
            kh: self.kh,
            kw: self.kw,
            sh: self.sh,
            sw: self.sw,
            top: self.pad.top,
            bottom: self.pad.bottom,
            left: self.pad.left,
            right: self.pad.right,
        }
    }

    /// Rows of the column matrix (the GEMM's inner dimension).
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// Output positions per channel.
    fn p(&self) -> usize {
        self.ho * self.wo
    }

    fn x_len(&self) -> usize {
        self.cin * self.h * self.w
    }

    fn y_len(&self) -> usize {
        self.cout * self.p()
    }

    /// True when x[n] seen as [Cin, H*W] is its own column matrix.
    fn direct(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.pad == Padding::none()
    }

    /// Output positions per im2col tile.
    fn tile(&self) -> usize {
        (COLS_BUDGET / self.k()).max(MIN_TILE).min(self.p())
    }

    /// Output columns ox whose input column ox*sw + kx - left lies inside [0, W), as [lo, hi).
    fn valid_ox(&self, kx: usize) -> (usize, usize) {
        valid_range(self.w, self.pad.left, self.sw, kx, self.wo)
    }

    fn valid_oy(&self, ky: usize) -> (usize, usize) {
        valid_range(self.h, self.pad.top, self.sh, ky, self.ho)
    }

    /// For a stride-1 conv whose padding is below the kernel on every side, dx is itself a
    /// stride-1 conv: of dY [Cout, Ho, Wo] with the flipped, transposed weight
    /// w'[ci, co, ky, kx] = w[co, ci, kh-1-ky, kw-1-kx] and padding kh-1-top (etc.), which gives
    /// back H x W. Returns that geometry, or None where the col2im path is needed.
    fn input_grad_as_conv(&self) -> Option<ConvGeom> {
        let p = self.pad;
        let fits = self.sh == 1
            && self.sw == 1
            && !self.direct()
            && p.top < self.kh
            && p.bottom < self.kh
            && p.left < self.kw
            && p.right < self.kw;
        fits.then(|| ConvGeom {
            n: self.n,
            cin: self.cout,
            h: self.ho,
            w: self.wo,
            cout: self.cin,
            kh: self.kh,
            kw: self.kw,
            sh: 1,
            sw: 1,
            pad: Padding {
                top: self.kh - 1 - p.top,
                bottom: self.kh - 1 - p.bottom,
                left: self.kw - 1 - p.left,
                right: self.kw - 1 - p.right,
            },
            ho: self.h,
            wo: self.w,
        })
    }

    /// Samples per task and the GEMM threading inside a task (see the module docs).
    fn schedule(&self) -> (usize, Parallelism) {
        let threads = rayon::current_num_threads().max(1);
        let flops = self.n * self.y_len() * self.k();
        if flops < SMALL_CONV_FLOPS || threads == 1 {
            (self.n.max(1), Parallelism::None)
        } else if self.n >= threads {
            (self.n.div_ceil(threads), Parallelism::None)
        } else {
            (self.n.max(1), Parallelism::Rayon(threads))
        }
    }
}

/// Output indices o in [0, out) with 0 <= o*stride + k - before < len, as a range [lo, hi).
fn valid_range(len: usize, before: usize, stride: usize, k: usize, out: usize) -> (usize, usize) {
    let lo = if k >= before {
        0
    } else {
        (before - k).div_ceil(stride)
    };
    let hi = if len + before <= k {
        0
    } else {
        (len + before - k - 1) / stride + 1
    };
    let hi = hi.min(out);
    (lo.min(hi), hi)
}

/// Walks the output positions [p0, p1) as runs within one output row: (oy, ox0, ox1, offset of
/// ox0 in the tile).
fn row_runs(wo: usize, p0: usize, p1: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
    let mut p = p0;
    while p < p1 {
        let (oy, ox0) = (p / wo, p % wo);
        let ox1 = wo.min(ox0 + (p1 - p));
        f(oy, ox0, ox1, p - p0);
        p += ox1 - ox0;
    }
}

/// Fills cols [K, p1-p0] (row-major) with the inputs each output position of the tile sees.
fn im2col<T: Float>(g: &ConvGeom, x: &[T], p0: usize, p1: usize, cols: &mut [T]) {
    let t = p1 - p0;
    for ci in 0..g.cin {
        for ky in 0..g.kh {
            let (ylo, yhi) = g.valid_oy(ky);
            for kx in 0..g.kw {
                let (xlo, xhi) = g.valid_ox(kx);
                let r = (ci * g.kh + ky) * g.kw + kx;
                let dst = &mut cols[r * t..(r + 1) * t];
                row_runs(g.wo, p0, p1, |oy, ox0, ox1, off| {
                    let seg = &mut dst[off..off + (ox1 - ox0)];
                    if oy < ylo || oy >= yhi {
                        seg.fill(T::zero());
                        return;
                    }
                    let iy = oy * g.sh + ky - g.pad.top;
                    let src = &x[(ci * g.h + iy) * g.w..][..g.w];
                    let a = xlo.clamp(ox0, ox1);
                    let b = xhi.clamp(a, ox1);
                    seg[..a - ox0].fill(T::zero());
                    seg[b - ox0..].fill(T::zero());
                    // An empty run may sit left of the padding (a * sw + kx < pad.left).
                    if a == b {
                        return;
                    }
                    let first = a * g.sw + kx - g.pad.left;
                    if g.sw == 1 {
                        seg[a - ox0..b - ox0].copy_from_slice(&src[first..first + (b - a)]);
                    } else {
                        for (j, d) in seg[a - ox0..b - ox0].iter_mut().enumerate() {
                            *d = src[first + j * g.sw];
                        }
                    }
                });
            }
        }
    }
}

/// dx += the transpose of im2col applied to dcols [K, p1-p0].
fn col2im<T: Float>(g: &ConvGeom, dcols: &[T], p0: usize, p1: usize, dx: &mut [T]) {
    let t = p1 - p0;
    for ci in 0..g.cin {
        for ky in 0..g.kh {
            let (ylo, yhi) = g.valid_oy(ky);
            for kx in 0..g.kw {
                let (xlo, xhi) = g.valid_ox(kx);
                let r = (ci * g.kh + ky) * g.kw + kx;
                let src = &dcols[r * t..(r + 1) * t];
                row_runs(g.wo, p0, p1, |oy, ox0, ox1, off| {
                    if oy < ylo || oy >= yhi {
                        return;
                    }
                    let iy = oy * g.sh + ky - g.pad.top;
                    let dst = &mut dx[(ci * g.h + iy) * g.w..][..g.w];
                    let a = xlo.clamp(ox0, ox1);
                    let b = xhi.clamp(a, ox1);
                    if a == b {
                        return;
                    }
                    let first = a * g.sw + kx - g.pad.left;
                    for (j, &v) in src[off + (a - ox0)..off + (b - ox0)].iter().enumerate() {
                        dst[first + j * g.sw] += v;
                    }
                });
            }
        }
    }
}

/// A strided read-only matrix for [`gemm_into`]: (pointer, column stride, row stride).
type MatRef<T> = (*const T, isize, isize);

/// dst[m x n] (row stride `dst_rs`, column stride 1) = (accumulate ? dst : 0) + lhs[m x k] @ rhs[k x n].
///
/// # Safety
/// Every operand must be valid for the elements its strides reach, and dst must not alias them.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    par: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.0,
        lhs.1,
        lhs.2,
        rhs.0,
        rhs.1,
        rhs.2,
        T::one(),
        T::one(),
        false,
        false,
        false,
        par,
    )
}

struct ConvFwd {
    g: ConvGeom,
    has_bias: bool,
}

impl ConvFwd {
    /// y = W @ cols(x) (+ bias) for one sample: x [Cin, H, W], y [Cout, P].
    fn sample<T: Float>(
        &self,
        x: &[T],
        w: &[T],
        bias: Option<&[T]>,
        y: &mut [T],
        cols: &mut [T],
        par: Parallelism,
    ) {
        let g = &self.g;
        let (k, p, tile) = (g.k(), g.p(), g.tile());
        if let Some(b) = bias {
            for (row, &bv) in y.chunks_mut(p).zip(b) {
                row.fill(bv);
            }
        }
        for p0 in (0..p).step_by(tile) {
            let p1 = p.min(p0 + tile);
            let t = p1 - p0;
            let rhs: MatRef<T> = if g.direct() {
                (x[p0..].as_ptr(), 1, p as isize)
            } else {
                im2col(g, x, p0, p1, &mut cols[..k * t]);
                (cols.as_ptr(), 1, t as isize)
            };
            // SAFETY: W is [Cout, K] row-major; rhs is [K, t] (the tile buffer, or columns p0..p1
            // of x [Cin = K, P] when direct); dst is columns p0..p1 of y [Cout, P]. All lie
            // inside their slices, and y is a separate buffer.
            unsafe {
                gemm_into(
                    g.cout,
                    t,
                    k,
                    y[p0..].as_mut_ptr(),
                    p,
                    bias.is_some(),
                    (w.as_ptr(), 1, k as isize),
                    rhs,
                    par,
                );
            }
        }
    }
}

impl FloatKernel for ConvFwd {
    fn run<T: Float>(&self, inp: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let g = &self.g;
        let (x, w) = (inp[0], inp[1]);
        let bias = if self.has_bias { Some(inp[2]) } else { None };
        if winograd::applies(g) {
            // No zero fill first. SAFETY: winograd::forward writes every element of y (its
            // contract; its unit tests start y from NaN).
            let out =
                unsafe { written_vec(g.n * g.y_len(), |y| winograd::forward(g, x, w, bias, y)) };
            return Ok(vec![out]);
        }
        let mut out = vec![T::zero(); g.n * g.y_len()];
        let cols_len = if g.direct() { 0 } else { g.k() * g.tile() };
        let (per_task, par) = g.schedule();
        let body = |cols: &mut Vec<T>, (ni, y): (usize, &mut [T])| {
            self.sample(&x[ni * g.x_len()..][..g.x_len()], w, bias, y, cols, par);
        };
        if per_task < g.n {
            out.par_chunks_mut(g.y_len())
                .enumerate()
                .for_each_init(|| vec![T::zero(); cols_len], body);
        } else {
            let mut cols = vec![T::zero(); cols_len];
            out.chunks_mut(g.y_len())
                .enumerate()
                .for_each(|item| body(&mut cols, item));
        }
        Ok(vec![out])
    }
}

/// Fused backward: inputs [dY, x (when dW is needed), w (when dx is needed)]; outputs
/// [dx, dW, dbias], each empty when not needed.
struct ConvBwd {
    g: ConvGeom,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
}

/// The backward's inputs: dY, and x / w where dW / dx need them.
struct BwdInputs<'a, T> {
    gy: &'a [T],
    x: Option<&'a [T]>,
    /// Present when the tasks compute dx (absent too when Winograd already did).
    w: Option<&'a [T]>,
    /// dx as a forward conv of dY: its geometry and flipped weight [Cin, Cout*kh*kw].
    dx_conv: Option<(ConvFwd, Vec<T>)>,
}

/// w'[ci, co, ky, kx] = w[co, ci, kh-1-ky, kw-1-kx], row-major [Cin, Cout*kh*kw].
fn flip_transpose<T: Float>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    let (kh, kw) = (g.kh, g.kw);
    let mut out = vec![T::zero(); w.len()];
    for co in 0..g.cout {
        for ci in 0..g.cin {
            let src = &w[(co * g.cin + ci) * kh * kw..][..kh * kw];
            let dst = &mut out[(ci * g.cout + co) * kh * kw..][..kh * kw];
            for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                *d = *s;
            }
        }
    }
    out
}

/// One task's share of the parameter gradients.
struct Partial<T> {
    dw: Vec<T>,
    db: Vec<f64>,
}

impl ConvBwd {
    /// Runs the samples of one task: writes their dx (in `dx`, one [Cin, H, W] per sample, or
    /// empty) and returns their contribution to dW and dbias.
    fn task<T: Float>(
        &self,
        inp: &BwdInputs<T>,
        samples: std::ops::Range<usize>,
        dx: &mut [T],
        par: Parallelism,
    ) -> Partial<T> {
        let g = &self.g;
        let BwdInputs {
            gy,
            x,
            w,
            ref dx_conv,
        } = *inp;
        let first = samples.start;
        let (k, p, tile) = (g.k(), g.p(), g.tile());
        let mut part = Partial {
            dw: vec![T::zero(); if self.need_dw { g.cout * k } else { 0 }],
            db: vec![0.0; if self.need_db { g.cout } else { 0 }],
        };
        let buf_len = if g.direct() { 0 } else { k * tile };
        let mut cols = vec![T::zero(); if self.need_dw { buf_len } else { 0 }];
        let dcols_len = match dx_conv {
            Some((c, _)) => c.g.k() * c.g.tile(),
            None if w.is_some() => buf_len,
            None => 0,
        };
        let mut dcols = vec![T::zero(); dcols_len];
        for ni in samples {
            let gys = &gy[ni * g.y_len()..][..g.y_len()];
            if self.need_db {
                for (acc, row) in part.db.iter_mut().zip(gys.chunks(p)) {
                    *acc += lane_sum(row, |v| v.as_f64());
                }
            }
            let mut dxs = if w.is_some() {
                Some(&mut dx[(ni - first) * g.x_len()..][..g.x_len()])
            } else {
                None
            };
            if let Some((conv, w_flipped)) = dx_conv {
                if let Some(dxs) = dxs.take() {
                    conv.sample(gys, w_flipped, None, dxs, &mut dcols, par);
                }
            }
            for p0 in (0..p).step_by(tile) {
                let p1 = p.min(p0 + tile);
                let t = p1 - p0;
                let gy_tile: MatRef<T> = (gys[p0..].as_ptr(), 1, p as isize);
                if let Some(x) = x {
                    let xs = &x[ni * g.x_len()..][..g.x_len()];
                    // cols^T [t, K]: element (j, r) of the row-major [K, t] tile sits at r*t + j.
                    let cols_t: MatRef<T> = if g.direct() {
                        (xs[p0..].as_ptr(), p as isize, 1)
                    } else {
                        im2col(g, xs, p0, p1, &mut cols[..k * t]);
                        (cols.as_ptr(), t as isize, 1)
                    };
                    // SAFETY: dW is [Cout, K]; dY's tile is columns p0..p1 of [Cout, P]; cols^T
                    // reads the [K, t] tile (or columns p0..p1 of x [K, P]) transposed.
                    unsafe {
                        gemm_into(
                            g.cout,
                            k,
                            t,
                            part.dw.as_mut_ptr(),
                            k,
                            true,
                            gy_tile,
                            cols_t,
                            par,
                        )
                    };
                }
                if let (Some(w), Some(dxs)) = (w, dxs.as_deref_mut()) {
                    // W^T [K, Cout]: element (r, co) of the row-major [Cout, K] weight is co*K + r.
                    let w_t: MatRef<T> = (w.as_ptr(), k as isize, 1);
                    if g.direct() {
                        // SAFETY: dst is columns p0..p1 of dx [Cin = K, P], written once.
                        unsafe {
                            gemm_into(
                                k,
                                t,
                                g.cout,
                                dxs[p0..].as_mut_ptr(),
                                p,
                                false,
                                w_t,
                                gy_tile,
                                par,
                            )
                        };
                    } else {
                        // SAFETY: dcols is a separate [K, t] buffer.
                        unsafe {
                            gemm_into(
                                k,
                                t,
                                g.cout,
                                dcols.as_mut_ptr(),
                                t,
                                false,
                                w_t,
                                gy_tile,
                                par,
                            )
                        };
                        col2im(g, &dcols[..k * t], p0, p1, dxs);
                    }
                }
            }
        }
        part
    }
}

impl FloatKernel for ConvBwd {
    fn run<T: Float>(&self, inp: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let g = &self.g;
        let mut rest = inp[1..].iter().copied();
        let x = if self.need_dw { rest.next() } else { None };
        let w = if self.need_dx { rest.next() } else { None };
        // The transposed conv's GEMM has the forward's shape (inner dimension Cout*kh*kw) and
        // needs no col2im scatter: [32,32,32,32] 3x3 forward + backward 22.2 -> 18.7 ms on 2
        // cores (interleaved A/B, docs/performance.md).
        let dx_conv = match (w, self.g.input_grad_as_conv()) {
            (Some(w), Some(gt)) => Some((
                ConvFwd {
                    g: gt,
                    has_bias: false,
                },
                flip_transpose(g, w),
            )),
            _ => None,
        };
        // A Winograd dx runs over the whole batch here, writing all of dx (no zero fill first);
        // the tasks below then only do dW, dbias (they do dx, accumulating, where they get w).
        let (mut dx, dx_conv, w) = match dx_conv {
            Some((conv, w_flipped)) if winograd::applies(&conv.g) => {
                // SAFETY: winograd::forward writes every element of dx (as in the forward).
                let dx = unsafe {
                    written_vec(g.n * g.x_len(), |dx| {
                        winograd::forward(&conv.g, inp[0], &w_flipped, None, dx)
                    })
                };
                (dx, None, None)
            }
            other => (
                vec![T::zero(); if self.need_dx { g.n * g.x_len() } else { 0 }],
                other,
                w,
            ),
        };
        let dx_in_tasks = w.is_some();
        // So does a Winograd dW; the tasks then get no x and only sum dbias.
        let dw_winograd = match x {
            Some(xv) if winograd::applies(g) => Some(winograd::weight_grad(g, xv, inp[0])),
            _ => None,
        };
        let x = if dw_winograd.is_some() { None } else { x };
        let inputs = BwdInputs {
            gy: inp[0],
            x,
            w,
            dx_conv,
        };
        let (per_task, par) = g.schedule();
        let tasks = g.n.div_ceil(per_task).max(1);
        let mut dx_parts: Vec<&mut [T]> = if dx_in_tasks && !dx.is_empty() {
            dx.chunks_mut(per_task * g.x_len()).collect()
        } else {
            (0..tasks).map(|_| &mut [][..]).collect()
        };
        dx_parts.resize_with(tasks, || &mut [][..]);
        let run = |(ti, dxp): (usize, &mut [T])| {
            let first = (ti * per_task).min(g.n);
            let samples = first..g.n.min(first + per_task);
            self.task(&inputs, samples, dxp, par)
        };
        let parts: Vec<Partial<T>> = if tasks > 1 {
            dx_parts.into_par_iter().enumerate().map(run).collect()
        } else {
            dx_parts.into_iter().enumerate().map(run).collect()
        };
        let mut dw = vec![T::zero(); if self.need_dw { g.cout * g.k() } else { 0 }];
        let mut db = vec![0.0f64; if self.need_db { g.cout } else { 0 }];
        for part in parts {
            dw.iter_mut().zip(part.dw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(part.db).for_each(|(a, b)| *a += b);
        }
        if let Some(d) = dw_winograd {
            dw = d;
        }
        Ok(vec![dx, dw, db.into_iter().map(T::from_f64).collect()])
    }
}

/// Chooses the CPU algorithm of stride-1 3x3 convolutions for the whole process: Winograd
/// F(2x2, 3x3) when true (the default, where both sides have at least 8 channels), im2col + GEMM
/// when false. For benchmarks that compare the two; results agree to rounding.
pub fn set_cpu_winograd(enabled: bool) {
    winograd::ENABLED.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// 2-D convolution of x [N, Cin, H, W] with w [Cout, Cin, kh, kw] plus bias \[Cout\]: see the
/// module docs for the exact formula and output size. Zero padding per side; a kernel larger
/// than the padded input is an error. Differentiable in x, w and bias.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: (usize, usize),
    padding: Padding,
) -> Result<Tensor> {
    const OP: &str = ConvGeom::OP;
    let mut ts = vec![x, w];
    ts.extend(bias);
    if let Some(r) = autocast_run(&ts, |c| conv2d(&c[0], &c[1], c.get(2), stride, padding)) {
        return r;
    }
    same_device(OP, &ts)?;
    let g = ConvGeom::new(x, w, bias, stride, padding)?;
    same_dtype(OP, &ts)?;
    let fwd = ConvFwd {
        g: g.clone(),
        has_bias: bias.is_some(),
    };
    let shape = g.cuda_shape();
    let outs = float_op(OP, &ts, &fwd, |dev, b| {
        Ok(vec![cu::conv2d_forward(
            dev,
            b[0],
            b[1],
            b.get(2).copied(),
            &shape,
        )?])
    })?;
    let out = out_tensor(outs, [g.n, g.cout, g.ho, g.wo], x.device())?;
    Ok(Tensor::record(out, OP, &ts, || {
        let bwd = ConvBwd {
            need_dx: x.requires_grad(),
            need_dw: w.requires_grad(),
            need_db: bias.is_some_and(|b| b.requires_grad()),
            g,
        };
        // x is only needed for dW and w only for dx: keep nothing else alive.
        let xs = bwd.need_dw.then(|| x.detach());
        let ws = bwd.need_dx.then(|| w.detach());
        let (x_shape, w_shape) = (x.shape().clone(), w.shape().clone());
        let has_bias = bias.is_some();
        move |gy: &Tensor| {
            let mut ins = vec![gy];
            ins.extend(xs.as_ref());
            ins.extend(ws.as_ref());
            let mut outs = float_op(OP, &ins, &bwd, |dev, b| {
                // b = [dy, x if dW is needed, w if dx is needed], as `ins`.
                let x = bwd.need_dw.then(|| b[1]);
                let w = bwd.need_dx.then(|| b[b.len() - 1]);
                let grads = cu::conv2d_backward(dev, b[0], x, w, &bwd.g.cuda_shape(), bwd.need_db)?;
                // Gradients not asked for come back empty, as the CPU kernel's do.
                let kind = b[0].kind();
                let empty = || dev.alloc(kind, 0, "conv2d backward");
                Ok(vec![
                    grads.dx.map_or_else(empty, Ok)?,
                    grads.dw.map_or_else(empty, Ok)?,
                    grads.db.map_or_else(empty, Ok)?,
                ])
            })?
            .into_iter();
            let (dx, dw, db) = match (outs.next(), outs.next(), outs.next()) {
                (Some(a), Some(b), Some(c)) => (a, b, c),
                _ => {
                    return Err(Error::invalid(
                        OP,
                        "backward kernel returned fewer than 3 outputs",
                    ))
                }
            };
            let dev = gy.device();
            let mut grads = vec![
                bwd.need_dx
                    .then(|| Tensor::from_storage(dx, x_shape, dev))
                    .transpose()?,
                bwd.need_dw
                    .then(|| Tensor::from_storage(dw, w_shape, dev))
                    .transpose()?,
            ];
            if has_bias {
                grads.push(
                    bwd.need_db
                        .then(|| Tensor::from_storage(db, bwd.g.cout, dev))
                        .transpose()?,
                );
            }
            Ok(grads)
        }
    }))
}
