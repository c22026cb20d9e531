//! Launch wrappers of `kernels/conv.cu`: conv2d forward and backward (im2col + cuBLAS, see the
//! kernel file for the tile layout) and nearest upsampling.
//!
//! Memory: the column matrices ([K, L] for im2col and the dx GEMM, [Cout, L] for the output and
//! gradient tiles) are built for a tile of the batch at a time, sized by `plan_tiles` so that
//! none exceeds [`COLS_BUDGET_BYTES`]; when one image alone is larger, its output positions are
//! tiled too. A 1x1, stride-1, unpadded conv needs no columns for the forward and dx: the input
//! of each image already is its [Cin, H*W] column matrix, so one batched GEMM does it.

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use crate::blas::{self, GemmShape};
use crate::buffer::{BufferKind, CudaBuffer};
use crate::device::{launch_1d, launch_err};
use crate::kernels::CONV;
use crate::ops::{check_lens, elementwise as ew, float_kind, MAX_GRID_Y};
use crate::{CudaDevice, CudaError};

const THREADS: u32 = 256;

/// The most bytes one column-sized buffer of a conv may take.
pub const COLS_BUDGET_BYTES: usize = 256 << 20;

fn invalid(op: &str, sizes: String, message: impl Into<String>) -> CudaError {
    CudaError::Launch {
        op: op.to_string(),
        sizes,
        message: message.into(),
    }
}

fn product(op: &str, dims: &[usize]) -> Result<usize, CudaError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| invalid(op, format!("{dims:?}"), "element count overflows"))
}

/// One conv2d call: x [n, cin, h, w], weight [cout, cin, kh, kw], stride (sh, sw) and zero
/// padding per side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dShape {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

/// Mirror of `struct ConvGeom` in conv.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Geom {
    cin: i64,
    h: i64,
    w: i64,
    cout: i64,
    kh: i64,
    kw: i64,
    sh: i64,
    sw: i64,
    top: i64,
    left: i64,
    ho: i64,
    wo: i64,
}

// SAFETY: plain old data with the C layout of the device struct.
unsafe impl DeviceRepr for Geom {}

impl Conv2dShape {
    /// (Ho, Wo): floor((H + top + bottom - kh) / sh) + 1 and the same for W, or None when the
    /// kernel is larger than the padded input, a size is 0 (other than the batch) or a stride is 0.
    pub fn out_hw(&self) -> Option<(usize, usize)> {
        let ph = self.h.checked_add(self.top)?.checked_add(self.bottom)?;
        let pw = self.w.checked_add(self.left)?.checked_add(self.right)?;
        let sizes = [self.cin, self.h, self.w, self.cout, self.kh, self.kw];
        if sizes.contains(&0) || self.sh == 0 || self.sw == 0 || ph < self.kh || pw < self.kw {
            return None;
        }
        Some(((ph - self.kh) / self.sh + 1, (pw - self.kw) / self.sw + 1))
    }

    /// Rows of the column matrix: Cin * kh * kw.
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// x of each image is its own column matrix.
    fn direct(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.sh == 1
            && self.sw == 1
            && self.top + self.bottom + self.left + self.right == 0
    }

    /// The kernel geometry and the output positions per image, after checking the sizes (the
    /// element counts of x, the weight and y must not overflow).
    fn geom(&self, op: &str) -> Result<(Geom, usize), CudaError> {
        let (ho, wo) = self
            .out_hw()
            .ok_or_else(|| invalid(op, format!("{self:?}"), "invalid convolution geometry"))?;
        let p = product(op, &[ho, wo])?;
        product(op, &[self.n, self.cin, self.h, self.w])?;
        product(op, &[self.cout, self.cin, self.kh, self.kw])?;
        product(op, &[self.n, self.cout, p])?;
        let g = Geom {
            cin: self.cin as i64,
            h: self.h as i64,
            w: self.w as i64,
            cout: self.cout as i64,
            kh: self.kh as i64,
            kw: self.kw as i64,
            sh: self.sh as i64,
            sw: self.sw as i64,
            top: self.top as i64,
            left: self.left as i64,
            ho: ho as i64,
            wo: wo as i64,
        };
        Ok((g, p))
    }

    fn x_len(&self) -> usize {
        self.n * self.cin * self.h * self.w
    }
}

/// Images n0 .. n0+nb and output positions p0 .. p0+t of them: L = nb * t columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tile {
    pub n0: usize,
    pub nb: usize,
    pub p0: usize,
    pub t: usize,
}

impl Tile {
    fn cols(&self) -> usize {
        self.nb * self.t
    }
}

/// Cuts n images of p output positions into tiles whose [rows, L] buffers of `elem_bytes`
/// elements fit in `budget` bytes: whole images, as many as fit, when one image fits; otherwise
/// one image at a time in runs of positions (at least one position a tile, whatever the
/// budget). The tiles cover every (image, position) once, in order.
pub(crate) fn plan_tiles(
    n: usize,
    rows: usize,
    p: usize,
    elem_bytes: usize,
    budget: usize,
) -> Vec<Tile> {
    if n == 0 || p == 0 {
        return Vec::new();
    }
    let max_cols = (budget / rows.max(1).saturating_mul(elem_bytes.max(1))).max(1);
    if p <= max_cols {
        let nb = (max_cols / p).clamp(1, n);
        (0..n)
            .step_by(nb)
            .map(|n0| Tile {
                n0,
                nb: nb.min(n - n0),
                p0: 0,
                t: p,
            })
            .collect()
    } else {
        (0..n)
            .flat_map(|n0| {
                (0..p).step_by(max_cols).map(move |p0| Tile {
                    n0,
                    nb: 1,
                    p0,
                    t: max_cols.min(p - p0),
                })
            })
            .collect()
    }
}

fn tile_args(t: Tile) -> [i64; 4] {
    [t.n0 as i64, t.nb as i64, t.p0 as i64, t.t as i64]
}

/// Elements per 16-byte vector when the `*_vec` kernels can build or place the tile's rows:
/// the vector kernels are enabled (not `MVAR_EW_KERNEL=scalar`), the kind is a float, every
/// count in `whole` (the tile's positions t, and for a placement into or out of [N, C, P] also
/// P and p0) is a whole number of vectors, every address is 16-byte aligned, and every element
/// count in `extents` (the buffers the kernel indexes) fits the kernels' 32-bit indices.
fn tile_vector(kind: BufferKind, whole: &[usize], ptrs: &[u64], extents: &[usize]) -> Option<i32> {
    let per = ew::vector_width(kind, 0, ptrs)?;
    if !ew::vector_kernels_enabled()
        || !whole.iter().all(|w| w.is_multiple_of(per))
        || extents.iter().any(|&e| e > i32::MAX as usize)
    {
        return None;
    }
    Some(per as i32)
}

/// The vector kernels' 2-D grid for `rows` rows of `per_row` vectors: 256 threads a block, x
/// over a row's vectors (rounded up to a warp) and y over rows, so short rows share a block.
fn vector_launch(per_row: usize, rows: usize) -> LaunchConfig {
    let bx = per_row.next_multiple_of(32).min(THREADS as usize);
    let by = THREADS as usize / bx;
    LaunchConfig {
        grid_dim: (
            per_row.div_ceil(bx).clamp(1, u32::MAX as usize) as u32,
            rows.div_ceil(by).clamp(1, MAX_GRID_Y) as u32,
            1,
        ),
        block_dim: (bx as u32, by as u32, 1),
        shared_mem_bytes: 0,
    }
}

/// cols [K, nb, t] of the tile (see conv.cu).
fn im2col(
    dev: &CudaDevice,
    x: &CudaBuffer,
    g: Geom,
    k: usize,
    tile: Tile,
) -> Result<CudaBuffer, CudaError> {
    let total = k * tile.cols();
    let cols = dev.alloc(x.kind(), total, "conv2d columns")?;
    let (pc, px, nt) = (cols.device_ptr(), x.device_ptr(), total as i64);
    if let Some(per) = tile_vector(x.kind(), &[tile.t], &[pc], &[total, x.len()]) {
        let f = dev.function(&CONV, &format!("im2col_vec_{}", x.kind().suffix()))?;
        let [n0, nb, p0, t] = [tile.n0, tile.nb, tile.p0, tile.t].map(|v| v as i32);
        let rows = (k * tile.nb) as i32;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&pc)
            .arg(&px)
            .arg(&g)
            .arg(&n0)
            .arg(&nb)
            .arg(&p0)
            .arg(&t)
            .arg(&rows);
        // SAFETY: as below; t is a whole number of vectors, cols is 16-byte aligned and every
        // index of cols and x fits in 32 bits (tile_vector).
        unsafe { b.launch(vector_launch(tile.t / per as usize, k * tile.nb)) }
            .map_err(launch_err("conv2d im2col", format!("{g:?}, {tile:?}")))?;
        return Ok(cols);
    }
    let f = dev.function(&CONV, &format!("im2col_{}", x.kind().suffix()))?;
    let [n0, nb, p0, t] = tile_args(tile);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pc)
        .arg(&px)
        .arg(&nt)
        .arg(&g)
        .arg(&n0)
        .arg(&nb)
        .arg(&p0)
        .arg(&t);
    // SAFETY: cols holds K*nb*t elements; x holds every image of the tile (checked by the
    // caller) and is read only inside the unpadded image.
    unsafe { b.launch(launch_1d(total, THREADS)) }
        .map_err(launch_err("conv2d im2col", format!("{g:?}, {tile:?}")))?;
    Ok(cols)
}

/// y[tile] = yt (+ bias); yt is [Cout, nb, t], or [nb, Cout, t] when `batch_major`.
#[allow(clippy::too_many_arguments)]
fn store(
    dev: &CudaDevice,
    y: &CudaBuffer,
    yt: &CudaBuffer,
    bias: Option<&CudaBuffer>,
    cout: usize,
    p: usize,
    tile: Tile,
    batch_major: bool,
) -> Result<(), CudaError> {
    let total = cout * tile.cols();
    let (py, pyt, pb) = (
        y.device_ptr(),
        yt.device_ptr(),
        bias.map_or(0, |b| b.device_ptr()),
    );
    if let Some(per) = tile_vector(
        y.kind(),
        &[tile.t, p, tile.p0],
        &[py, pyt],
        &[total, y.len()],
    ) {
        let f = dev.function(&CONV, &format!("conv_store_vec_{}", y.kind().suffix()))?;
        let [nc, np, n0, nb, p0, t] =
            [cout, p, tile.n0, tile.nb, tile.p0, tile.t].map(|v| v as i32);
        let (bm, rows) = (batch_major as i32, (tile.nb * cout) as i32);
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&py)
            .arg(&pyt)
            .arg(&pb)
            .arg(&nc)
            .arg(&np)
            .arg(&n0)
            .arg(&nb)
            .arg(&p0)
            .arg(&t)
            .arg(&bm)
            .arg(&rows);
        // SAFETY: as below; P, p0 and t are whole vectors, y and yt 16-byte aligned, every
        // index fits in 32 bits (tile_vector).
        unsafe { b.launch(vector_launch(tile.t / per as usize, tile.nb * cout)) }
            .map_err(launch_err("conv2d store", format!("{tile:?}, Cout {cout}")))?;
        return Ok(());
    }
    let f = dev.function(&CONV, &format!("conv_store_{}", y.kind().suffix()))?;
    let (nt, nc, np) = (total as i64, cout as i64, p as i64);
    let [n0, nb, p0, t] = tile_args(tile);
    let bm = batch_major as i32;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&py)
        .arg(&pyt)
        .arg(&pb)
        .arg(&nt)
        .arg(&nc)
        .arg(&np)
        .arg(&n0)
        .arg(&nb)
        .arg(&p0)
        .arg(&t)
        .arg(&bm);
    // SAFETY: yt holds Cout*nb*t elements, y holds the tile's images (N*Cout*P), bias Cout or
    // is null; with batch_major the caller passes the whole batch (n0 = p0 = 0, t = P), where
    // y and yt may be the same buffer since each thread reads the element it writes.
    unsafe { b.launch(launch_1d(total, THREADS)) }
        .map_err(launch_err("conv2d store", format!("{tile:?}, Cout {cout}")))?;
    Ok(())
}

/// dyt [Cout, nb, t]: the tile of dy as a [Cout, L] matrix.
fn tile_dy(
    dev: &CudaDevice,
    dy: &CudaBuffer,
    cout: usize,
    p: usize,
    tile: Tile,
) -> Result<CudaBuffer, CudaError> {
    let total = cout * tile.cols();
    let dyt = dev.alloc(dy.kind(), total, "conv2d gradient tile")?;
    let (pt, pd) = (dyt.device_ptr(), dy.device_ptr());
    if let Some(per) = tile_vector(
        dy.kind(),
        &[tile.t, p, tile.p0],
        &[pt, pd],
        &[total, dy.len()],
    ) {
        let f = dev.function(&CONV, &format!("conv_tile_dy_vec_{}", dy.kind().suffix()))?;
        let [nc, np, n0, nb, p0, t] =
            [cout, p, tile.n0, tile.nb, tile.p0, tile.t].map(|v| v as i32);
        let rows = (cout * tile.nb) as i32;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&pt)
            .arg(&pd)
            .arg(&nc)
            .arg(&np)
            .arg(&n0)
            .arg(&nb)
            .arg(&p0)
            .arg(&t)
            .arg(&rows);
        // SAFETY: as below; P, p0 and t are whole vectors, both buffers 16-byte aligned, every
        // index fits in 32 bits (tile_vector).
        unsafe { b.launch(vector_launch(tile.t / per as usize, cout * tile.nb)) }
            .map_err(launch_err("conv2d gradient tile", format!("{tile:?}")))?;
        return Ok(dyt);
    }
    let f = dev.function(&CONV, &format!("conv_tile_dy_{}", dy.kind().suffix()))?;
    let (nt, nc, np) = (total as i64, cout as i64, p as i64);
    let [n0, nb, p0, t] = tile_args(tile);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pt)
        .arg(&pd)
        .arg(&nt)
        .arg(&nc)
        .arg(&np)
        .arg(&n0)
        .arg(&nb)
        .arg(&p0)
        .arg(&t);
    // SAFETY: dyt holds Cout*nb*t elements; dy holds N*Cout*P and the tile lies inside it.
    unsafe { b.launch(launch_1d(total, THREADS)) }
        .map_err(launch_err("conv2d gradient tile", format!("{tile:?}")))?;
    Ok(dyt)
}

/// acc (f32, x's shape) += col2im(dcols) for the tile's images.
fn col2im(
    dev: &CudaDevice,
    acc: &CudaBuffer,
    dcols: &CudaBuffer,
    g: Geom,
    s: &Conv2dShape,
    tile: Tile,
) -> Result<(), CudaError> {
    let total = tile.nb * s.cin * s.h * s.w;
    let f = dev.function(&CONV, &format!("col2im_{}", dcols.kind().suffix()))?;
    let (pa, pd, nt) = (acc.device_ptr(), dcols.device_ptr(), total as i64);
    let [n0, nb, p0, t] = tile_args(tile);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pa)
        .arg(&pd)
        .arg(&nt)
        .arg(&g)
        .arg(&n0)
        .arg(&nb)
        .arg(&p0)
        .arg(&t);
    // SAFETY: acc is an f32 buffer of N*Cin*H*W elements holding the tile's images; dcols holds
    // K*nb*t elements and is read only at positions inside the tile.
    unsafe { b.launch(launch_1d(total, THREADS)) }
        .map_err(launch_err("conv2d col2im", format!("{g:?}, {tile:?}")))?;
    Ok(())
}

/// acc (f32) += x, elementwise.
fn accumulate(dev: &CudaDevice, acc: &CudaBuffer, x: &CudaBuffer) -> Result<(), CudaError> {
    check_lens("conv2d accumulate", &[(acc, x.len())])?;
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(&CONV, &format!("accumulate_f32_from_{}", x.kind().suffix()))?;
    let (pa, px, nn) = (acc.device_ptr(), x.device_ptr(), n as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pa).arg(&px).arg(&nn);
    // SAFETY: both buffers hold n elements; acc is f32.
    unsafe { b.launch(launch_1d(n, THREADS)) }
        .map_err(launch_err("conv2d accumulate", format!("{n} elements")))?;
    Ok(())
}

/// An f32 accumulator as a buffer of `kind` (the buffer itself when `kind` is f32).
fn finish(dev: &CudaDevice, acc: CudaBuffer, kind: BufferKind) -> Result<CudaBuffer, CudaError> {
    if kind == BufferKind::F32 {
        Ok(acc)
    } else {
        ew::cast(dev, &acc, kind)
    }
}

/// The conv2d output [N, Cout, Ho, Wo] of x [N, Cin, H, W] and w [Cout, Cin, kh, kw], plus
/// bias `[Cout]` when given. f32 or bf16 (one kind for all).
pub fn conv2d_forward(
    dev: &CudaDevice,
    x: &CudaBuffer,
    w: &CudaBuffer,
    bias: Option<&CudaBuffer>,
    s: &Conv2dShape,
) -> Result<CudaBuffer, CudaError> {
    conv2d_forward_tiled(dev, x, w, bias, s, COLS_BUDGET_BYTES)
}

/// [`conv2d_forward`] with column buffers of at most `budget` bytes (tests pass a tiny budget
/// to exercise the tiling on small inputs).
pub fn conv2d_forward_tiled(
    dev: &CudaDevice,
    x: &CudaBuffer,
    w: &CudaBuffer,
    bias: Option<&CudaBuffer>,
    s: &Conv2dShape,
    budget: usize,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "conv2d";
    let mut bufs = vec![x, w];
    bufs.extend(bias);
    let kind = float_kind(OP, &bufs)?;
    let (g, p) = s.geom(OP)?;
    let k = s.k();
    check_lens(OP, &[(x, s.x_len()), (w, s.cout * k)])?;
    if let Some(b) = bias {
        check_lens(OP, &[(b, s.cout)])?;
    }
    let out_len = s.n * s.cout * p;
    if out_len == 0 {
        return dev.alloc(kind, 0, "conv2d output");
    }
    if s.direct() {
        // y[n] = W [Cout, Cin] @ x[n] [Cin, H*W] for every n at once.
        let y = blas::gemm(
            dev,
            w,
            x,
            GemmShape {
                batch: s.n,
                m: s.cout,
                n: p,
                k,
                trans_a: false,
                trans_b: false,
                a_batched: false,
                b_batched: true,
            },
        )?;
        if bias.is_some() {
            let whole = Tile {
                n0: 0,
                nb: s.n,
                p0: 0,
                t: p,
            };
            store(dev, &y, &y, bias, s.cout, p, whole, true)?;
        }
        return Ok(y);
    }
    let out = dev.alloc(kind, out_len, "conv2d output")?;
    let rows = k.max(s.cout);
    for tile in plan_tiles(s.n, rows, p, kind.size_in_bytes(), budget) {
        let cols = im2col(dev, x, g, k, tile)?;
        let yt = blas::gemm(
            dev,
            w,
            &cols,
            GemmShape {
                batch: 1,
                m: s.cout,
                n: tile.cols(),
                k,
                trans_a: false,
                trans_b: false,
                a_batched: false,
                b_batched: false,
            },
        )?;
        store(dev, &out, &yt, bias, s.cout, p, tile, false)?;
    }
    Ok(out)
}

/// The gradients conv2d_backward was asked for.
#[derive(Debug, Default)]
pub struct Conv2dGrads {
    pub dx: Option<CudaBuffer>,
    pub dw: Option<CudaBuffer>,
    pub db: Option<CudaBuffer>,
}

/// Gradients of conv2d from dy [N, Cout, Ho, Wo]: dx when the weight `w` is given (dx needs it),
/// dW when the input `x` is given, dbias when `need_db`. f32 or bf16 (one kind for all).
pub fn conv2d_backward(
    dev: &CudaDevice,
    dy: &CudaBuffer,
    x: Option<&CudaBuffer>,
    w: Option<&CudaBuffer>,
    s: &Conv2dShape,
    need_db: bool,
) -> Result<Conv2dGrads, CudaError> {
    conv2d_backward_tiled(dev, dy, x, w, s, need_db, COLS_BUDGET_BYTES)
}

/// [`conv2d_backward`] with column buffers of at most `budget` bytes.
pub fn conv2d_backward_tiled(
    dev: &CudaDevice,
    dy: &CudaBuffer,
    x: Option<&CudaBuffer>,
    w: Option<&CudaBuffer>,
    s: &Conv2dShape,
    need_db: bool,
    budget: usize,
) -> Result<Conv2dGrads, CudaError> {
    const OP: &str = "conv2d backward";
    let mut bufs = vec![dy];
    bufs.extend(x);
    bufs.extend(w);
    let kind = float_kind(OP, &bufs)?;
    let (g, p) = s.geom(OP)?;
    let k = s.k();
    check_lens(OP, &[(dy, s.n * s.cout * p)])?;
    if let Some(x) = x {
        check_lens(OP, &[(x, s.x_len())])?;
    }
    if let Some(w) = w {
        check_lens(OP, &[(w, s.cout * k)])?;
    }
    let mut grads = Conv2dGrads::default();
    if need_db {
        grads.db = Some(bias_grad(dev, dy, s.n, s.cout, p)?);
    }
    if s.n == 0 {
        grads.dx = w.map(|_| dev.alloc(kind, 0, "conv2d dx")).transpose()?;
        grads.dw = x.map(|_| dev.zeros(kind, s.cout * k)).transpose()?;
        return Ok(grads);
    }
    let direct_dx = w.is_some() && s.direct();
    if let (true, Some(w)) = (direct_dx, w) {
        // dx[n] = W^T [Cin, Cout] @ dy[n] [Cout, H*W] for every n at once.
        grads.dx = Some(blas::gemm(
            dev,
            w,
            dy,
            GemmShape {
                batch: s.n,
                m: k,
                n: p,
                k: s.cout,
                trans_a: true,
                trans_b: false,
                a_batched: false,
                b_batched: true,
            },
        )?);
    }
    let tiled_dx = if direct_dx { None } else { w };
    if x.is_none() && tiled_dx.is_none() {
        return Ok(grads);
    }
    let tiles = plan_tiles(s.n, k.max(s.cout), p, kind.size_in_bytes(), budget);
    let dx_acc = tiled_dx
        .map(|_| dev.zeros(BufferKind::F32, s.x_len()))
        .transpose()?;
    let dw_acc = if x.is_some() && tiles.len() > 1 {
        Some(dev.zeros(BufferKind::F32, s.cout * k)?)
    } else {
        None
    };
    for &tile in &tiles {
        let dyt = tile_dy(dev, dy, s.cout, p, tile)?;
        if let Some(x) = x {
            // dW [Cout, K] (+)= dyt [Cout, L] @ cols^T, cols stored [K, L].
            let cols = im2col(dev, x, g, k, tile)?;
            let part = blas::gemm(
                dev,
                &dyt,
                &cols,
                GemmShape {
                    batch: 1,
                    m: s.cout,
                    n: k,
                    k: tile.cols(),
                    trans_a: false,
                    trans_b: true,
                    a_batched: false,
                    b_batched: false,
                },
            )?;
            match &dw_acc {
                Some(acc) => accumulate(dev, acc, &part)?,
                None => grads.dw = Some(part),
            }
        }
        if let (Some(w), Some(acc)) = (tiled_dx, &dx_acc) {
            // dcols [K, L] = W^T (W stored [Cout, K]) @ dyt [Cout, L], then back onto the pixels.
            let dcols = blas::gemm(
                dev,
                w,
                &dyt,
                GemmShape {
                    batch: 1,
                    m: k,
                    n: tile.cols(),
                    k: s.cout,
                    trans_a: true,
                    trans_b: false,
                    a_batched: false,
                    b_batched: false,
                },
            )?;
            col2im(dev, acc, &dcols, g, s, tile)?;
        }
    }
    if let Some(acc) = dw_acc {
        grads.dw = Some(finish(dev, acc, kind)?);
    }
    if let Some(acc) = dx_acc {
        grads.dx = Some(finish(dev, acc, kind)?);
    }
    Ok(grads)
}

/// db [Cout] = the sum of dy [N, Cout, P] over N and P.
fn bias_grad(
    dev: &CudaDevice,
    dy: &CudaBuffer,
    n: usize,
    cout: usize,
    p: usize,
) -> Result<CudaBuffer, CudaError> {
    if n * p == 0 {
        return dev.zeros(dy.kind(), cout);
    }
    let db = dev.alloc(dy.kind(), cout, "conv2d bias gradient")?;
    let f = dev.function(&CONV, &format!("conv_bias_grad_{}", dy.kind().suffix()))?;
    let (pdb, pdy) = (db.device_ptr(), dy.device_ptr());
    let (nn, nc, np) = (n as i64, cout as i64, p as i64);
    let cfg = LaunchConfig {
        grid_dim: (cout.clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pdb).arg(&pdy).arg(&nn).arg(&nc).arg(&np);
    // SAFETY: db holds Cout elements, dy N*Cout*P.
    unsafe { b.launch(cfg) }.map_err(launch_err(
        "conv2d bias gradient",
        format!("[{n}, {cout}, {p}]"),
    ))?;
    Ok(db)
}

/// Launches one of the upsampling kernels: (out, src, total, h, w, f).
fn upsample_launch(
    dev: &CudaDevice,
    name: &str,
    out: &CudaBuffer,
    src: &CudaBuffer,
    planes: usize,
    hwf: [usize; 3],
    vectors: bool,
) -> Result<(), CudaError> {
    let total = out.len();
    if total == 0 {
        return Ok(());
    }
    let backward = name.ends_with("_bwd");
    let [_, w, fac] = hwf;
    // Rows of the output: planes * h * f of w * f (forward), planes * h of w (backward).
    let row = if backward { w } else { w * fac };
    let ptrs = [out.device_ptr(), src.device_ptr()];
    let per = upsample_vector(src.kind(), backward, planes, hwf, &ptrs).filter(|_| vectors);
    if let Some(per) = per {
        // The backward's factor-2 kernel reads g as vectors; other factors element by element.
        let variant = if backward && fac == 2 { "vec2" } else { "vec" };
        let kernel = format!("{name}_{variant}_{}", src.kind().suffix());
        let f = dev.function(&CONV, &kernel)?;
        let rows = (total / row) as i32;
        let (w32, fac32, po, ps) = (w as i32, fac as i32, ptrs[0], ptrs[1]);
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&po).arg(&ps).arg(&w32).arg(&fac32).arg(&rows);
        // SAFETY: as below; upsample_vector checked that rows are whole 16-byte vectors at
        // aligned addresses and that every index fits in 32 bits.
        unsafe { b.launch(vector_launch(row / per, rows as usize)) }.map_err(launch_err(
            name,
            format!("{total} elements, [h, w, f] {hwf:?}"),
        ))?;
        return Ok(());
    }
    let f = dev.function(&CONV, &format!("{name}_{}", src.kind().suffix()))?;
    let (po, ps, nt) = (out.device_ptr(), src.device_ptr(), total as i64);
    let [h, w, fac] = hwf.map(|v| v as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po).arg(&ps).arg(&nt).arg(&h).arg(&w).arg(&fac);
    // SAFETY: the callers check that src and out hold planes*h*w and planes*h*f*w*f elements
    // (one of each); every index the kernels form lies inside.
    unsafe { b.launch(launch_1d(total, THREADS)) }.map_err(launch_err(
        name,
        format!("{total} elements, [h, w, f] {hwf:?}"),
    ))?;
    Ok(())
}

/// Elements per 16-byte vector when the upsampling vector kernels take planes [h, w] and factor
/// f for the buffers at `ptrs` (either direction): a row of the forward's output (w * f
/// elements) or of the backward's output (w elements) is whole vectors, the addresses are
/// 16-byte aligned, and the upsampled length fits the kernels' 32-bit indices.
pub fn upsample_vector(
    kind: BufferKind,
    backward: bool,
    planes: usize,
    hwf: [usize; 3],
    ptrs: &[u64],
) -> Option<usize> {
    let [h, w, f] = hwf;
    let per = ew::vector_width(kind, 0, ptrs)?;
    let row = if backward { w } else { w * f };
    // Both directions index the upsampled tensor (the forward's output, the backward's g).
    let upsampled = planes
        .checked_mul(h)?
        .checked_mul(f)?
        .checked_mul(w)?
        .checked_mul(f)?;
    (row > 0 && row.is_multiple_of(per) && upsampled <= i32::MAX as usize).then_some(per)
}

/// (input elements, output elements) of upsampling `planes` planes [h, w] by `f`.
fn upsample_sizes(
    op: &str,
    planes: usize,
    h: usize,
    w: usize,
    f: usize,
) -> Result<(usize, usize), CudaError> {
    if f == 0 {
        return Err(invalid(op, format!("factor {f}"), "expected a factor >= 1"));
    }
    Ok((
        product(op, &[planes, h, w])?,
        product(op, &[planes, h, f, w, f])?,
    ))
}

/// Nearest upsampling of `planes` planes [h, w] (x) by the integer factor f: [planes, h*f, w*f].
/// f32 or bf16.
pub fn upsample_nearest(
    dev: &CudaDevice,
    x: &CudaBuffer,
    planes: usize,
    h: usize,
    w: usize,
    f: usize,
) -> Result<CudaBuffer, CudaError> {
    upsample_nearest_with(dev, x, planes, h, w, f, ew::vector_kernels_enabled())
}

/// [`upsample_nearest`] with the vector kernel allowed (where it applies) or not.
pub fn upsample_nearest_with(
    dev: &CudaDevice,
    x: &CudaBuffer,
    planes: usize,
    h: usize,
    w: usize,
    f: usize,
    vectors: bool,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "upsample_nearest";
    let kind = float_kind(OP, &[x])?;
    let (in_len, out_len) = upsample_sizes(OP, planes, h, w, f)?;
    check_lens(OP, &[(x, in_len)])?;
    let out = dev.alloc(kind, out_len, "upsample_nearest output")?;
    upsample_launch(dev, "upsample_nearest", &out, x, planes, [h, w, f], vectors)?;
    Ok(out)
}

/// upsample_nearest's backward: dx [planes, h, w], each pixel the sum of its f x f block of g.
pub fn upsample_nearest_backward(
    dev: &CudaDevice,
    g: &CudaBuffer,
    planes: usize,
    h: usize,
    w: usize,
    f: usize,
) -> Result<CudaBuffer, CudaError> {
    upsample_nearest_backward_with(dev, g, planes, h, w, f, ew::vector_kernels_enabled())
}

/// [`upsample_nearest_backward`] with the vector kernels allowed (where they apply) or not.
pub fn upsample_nearest_backward_with(
    dev: &CudaDevice,
    g: &CudaBuffer,
    planes: usize,
    h: usize,
    w: usize,
    f: usize,
    vectors: bool,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "upsample_nearest backward";
    let kind = float_kind(OP, &[g])?;
    let (in_len, out_len) = upsample_sizes(OP, planes, h, w, f)?;
    check_lens(OP, &[(g, out_len)])?;
    let dx = dev.alloc(kind, in_len, "upsample_nearest backward output")?;
    upsample_launch(
        dev,
        "upsample_nearest_bwd",
        &dx,
        g,
        planes,
        [h, w, f],
        vectors,
    )?;
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (image, position) exactly once, in order, and every tile within the budget (or a
    /// single position when one column alone is over it).
    fn check_cover(n: usize, rows: usize, p: usize, eb: usize, budget: usize) {
        let tiles = plan_tiles(n, rows, p, eb, budget);
        let mut seen = Vec::new();
        for t in &tiles {
            assert!(t.nb >= 1 && t.t >= 1, "{t:?}");
            assert!(t.nb == 1 || (t.p0 == 0 && t.t == p), "{t:?}");
            assert!(rows * t.cols() * eb <= budget || t.cols() == 1, "{t:?}");
            for b in 0..t.nb {
                for j in 0..t.t {
                    seen.push((t.n0 + b, t.p0 + j));
                }
            }
        }
        let want: Vec<_> = (0..n).flat_map(|i| (0..p).map(move |j| (i, j))).collect();
        assert_eq!(seen, want, "n {n}, rows {rows}, p {p}, budget {budget}");
    }

    #[test]
    fn the_upsampling_vector_kernels_take_rows_of_whole_vectors() {
        let f32_ = BufferKind::F32;
        // Forward rows are w * f long, backward rows w.
        assert_eq!(
            upsample_vector(f32_, false, 2, [3, 2, 2], &[0, 16]),
            Some(4)
        );
        assert_eq!(upsample_vector(f32_, true, 2, [3, 2, 2], &[0, 16]), None);
        assert_eq!(upsample_vector(f32_, true, 2, [3, 8, 3], &[0, 16]), Some(4));
        assert_eq!(
            upsample_vector(BufferKind::BF16, false, 1, [3, 4, 2], &[0]),
            Some(8)
        );
        assert_eq!(
            upsample_vector(BufferKind::BF16, true, 1, [3, 4, 2], &[0]),
            None
        );
        assert_eq!(upsample_vector(f32_, false, 2, [3, 2, 2], &[8]), None);
        assert_eq!(upsample_vector(f32_, false, 0, [3, 0, 2], &[0]), None);
        // The upsampled tensor (2^31 elements here, 2^31 - 2^16 below) must fit 32-bit indices.
        assert_eq!(
            upsample_vector(f32_, false, 1 << 17, [64, 64, 2], &[0]),
            None
        );
        assert_eq!(
            upsample_vector(f32_, true, 1 << 17, [64, 64, 2], &[0]),
            None
        );
        assert_eq!(
            upsample_vector(f32_, true, (1 << 17) - 4, [64, 64, 2], &[0]),
            Some(4)
        );
    }

    #[test]
    fn tiles_cover_the_batch_within_the_budget() {
        check_cover(7, 10, 12, 4, 1_200); // 2 images a tile (1 column = 40 B, 30 columns)
        check_cover(7, 10, 12, 4, 1 << 30); // all at once
        check_cover(3, 10, 100, 4, 1_000); // 25 positions a tile, one image at a time
        check_cover(2, 10, 101, 2, 1_000); // 50, 50, 1
        check_cover(2, 1000, 5, 4, 16); // budget below one column: one position a tile
        check_cover(1, 1, 1, 4, 4);
        assert!(plan_tiles(0, 10, 12, 4, 100).is_empty());
        assert_eq!(plan_tiles(7, 10, 12, 4, 1 << 30).len(), 1);
        assert_eq!(plan_tiles(7, 10, 12, 4, 1_200).len(), 4);
    }

    #[test]
    fn output_size_follows_the_padding_and_stride() {
        let s = Conv2dShape {
            n: 2,
            cin: 3,
            h: 7,
            w: 6,
            cout: 4,
            kh: 3,
            kw: 2,
            sh: 2,
            sw: 1,
            top: 1,
            bottom: 0,
            left: 0,
            right: 1,
        };
        assert_eq!(s.out_hw(), Some((3, 6)));
        assert!(!s.direct());
        assert_eq!(s.k(), 18);
        assert!(Conv2dShape { sh: 0, ..s }.out_hw().is_none());
        assert!(Conv2dShape { kh: 9, ..s }.out_hw().is_none());
        assert!(Conv2dShape { cin: 0, ..s }.out_hw().is_none());
        assert!(Conv2dShape { h: usize::MAX, ..s }.out_hw().is_none());
        let one = Conv2dShape {
            kh: 1,
            kw: 1,
            sh: 1,
            sw: 1,
            top: 0,
            bottom: 0,
            left: 0,
            right: 0,
            ..s
        };
        assert!(one.direct());
        assert_eq!(one.out_hw(), Some((7, 6)));
        assert!(s.geom("t").is_ok());
    }

    #[test]
    fn vector_launch_covers_every_row_and_vector() {
        // Short rows share a block: 8 vectors a row, 8 rows a block of 32 x 8.
        let c = vector_launch(8, 1000);
        assert_eq!((c.block_dim, c.grid_dim), ((32, 8, 1), (1, 125, 1)));
        // The decoder's columns: 8192 vectors a row (65536 bf16 positions), 1440 rows.
        let c = vector_launch(8192, 1440);
        assert_eq!((c.block_dim, c.grid_dim), ((256, 1, 1), (32, 1440, 1)));
        // More rows than the grid's y dimension: the kernels loop over the rest.
        assert_eq!(vector_launch(300, 1 << 20).grid_dim, (2, 65_535, 1));
    }

    #[test]
    fn conv_geometry_matches_the_c_struct_size() {
        assert_eq!(std::mem::size_of::<Geom>(), 12 * 8);
    }
}
