//! Launch wrappers of `kernels/elementwise.cu`.

use cudarc::driver::PushKernelArg;

use crate::buffer::{BufferKind, CudaBuffer};
use crate::device::{launch_1d, launch_err};
use crate::kernels::ELEMENTWISE;
use crate::ops::reduce::require_kind;
use crate::ops::{check_lens, copy_word, float_kind, Layout};
use crate::{CudaDevice, CudaError};

/// Unary op codes (`U_*` in elementwise.cu).
pub mod unary {
    pub const NEG: i32 = 0;
    pub const EXP: i32 = 1;
    pub const LOG: i32 = 2;
    pub const SQRT: i32 = 3;
    pub const RSQRT: i32 = 4;
    pub const TANH: i32 = 5;
    pub const SIGMOID: i32 = 6;
    pub const SILU: i32 = 7;
    pub const GELU_TANH: i32 = 8;
    pub const RELU: i32 = 9;
    pub const ABS: i32 = 10;
    pub const SQUARE: i32 = 11;
}

/// Binary op codes (`B_*`).
pub mod binary {
    pub const ADD: i32 = 0;
    pub const SUB: i32 = 1;
    pub const MUL: i32 = 2;
    pub const DIV: i32 = 3;
    pub const MAXIMUM: i32 = 4;
    pub const MINIMUM: i32 = 5;
}

/// Scalar-parameter op codes (`S_*`).
pub mod scalar {
    pub const AFFINE: i32 = 0;
    pub const POWF: i32 = 1;
    pub const CLAMP: i32 = 2;
}

/// Comparison codes (`C_*`).
pub mod cmp {
    pub const EQ: i32 = 0;
    pub const NE: i32 = 1;
    pub const LT: i32 = 2;
    pub const LE: i32 = 3;
    pub const GT: i32 = 4;
    pub const GE: i32 = 5;
}

const THREADS: u32 = 256;

fn elems(dims: &[usize]) -> usize {
    dims.iter().product()
}

/// Which elementwise kernels run: `MVAR_EW_KERNEL=scalar` forces the per-element kernels (the
/// reference variant) where the 16-byte vector kernels would apply.
pub fn vector_kernels_enabled() -> bool {
    !matches!(
        std::env::var("MVAR_EW_KERNEL")
            .ok()
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref(),
        Some("scalar")
    )
}

/// Elements per 16-byte vector when `n` elements of `kind` at the addresses `ptrs` (0 = an
/// absent optional output) can be moved 16 bytes at a time: a float kind, n a whole number of
/// vectors, every address 16-byte aligned. None: the per-element kernels.
pub fn vector_width(kind: BufferKind, n: usize, ptrs: &[u64]) -> Option<usize> {
    if !matches!(kind, BufferKind::F32 | BufferKind::BF16) {
        return None;
    }
    let per = 16 / kind.size_in_bytes();
    (n.is_multiple_of(per) && ptrs.iter().all(|p| p.is_multiple_of(16))).then_some(per)
}

/// The vector width and each input's (inner, span) (see [`vector_run`]) for a binary op, or
/// (None, _) where the general kernel must run.
fn binary_vector_plan(
    kind: BufferKind,
    n: usize,
    ptrs: &[u64],
    a: &[usize],
    b: &[usize],
    out: &[usize],
) -> (Option<usize>, [i64; 4]) {
    let Some(w) = vector_width(kind, n, ptrs) else {
        return (None, [0; 4]);
    };
    match (vector_read(a, out, w), vector_read(b, out, w)) {
        (Some(ra), Some(rb)) => {
            let ([ia, sa], [ib, sb]) = (ra.kernel_args(), rb.kernel_args());
            (Some(w), [ia, sa, ib, sb])
        }
        _ => (None, [0; 4]),
    }
}

/// How the vector kernels read one input of a binary op (`load_operand` in elementwise.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorRead {
    /// In the output's element order: vector e at e.
    Same,
    /// Broadcast along one run of axes ([`vector_run`]): vector e at (e / span) * inner + e % inner.
    Run { inner: usize, span: usize },
    /// Constant along the last `inner` output elements (whole vectors), varying along one run of
    /// `span` elements before them, broadcast before that: the one element (e / inner) % span
    /// for the whole vector.
    Repeat { inner: usize, span: usize },
}

impl VectorRead {
    /// The kernel's (inner, span) pair: (0, 0), (inner, span), or (-inner, span) for Repeat.
    fn kernel_args(self) -> [i64; 2] {
        match self {
            VectorRead::Same => [0, 0],
            VectorRead::Run { inner, span } => [inner as i64, span as i64],
            VectorRead::Repeat { inner, span } => [-(inner as i64), span as i64],
        }
    }
}

/// [`vector_run`], or where that finds nothing, the [`VectorRead::Repeat`] form: the input's
/// broadcast axes are the trailing ones (their elements a whole number of `per`-element vectors)
/// and possibly a leading run, with the axes it varies along in one run between.
pub fn vector_read(input: &[usize], out: &[usize], per: usize) -> Option<VectorRead> {
    if let Some((inner, span)) = vector_run(input, out, per) {
        return Some(if inner == 0 {
            VectorRead::Same
        } else {
            VectorRead::Run { inner, span }
        });
    }
    let pad = out.len().checked_sub(input.len())?;
    let dim = |k: usize| if k < pad { 1 } else { input[k - pad] };
    if (0..out.len()).any(|k| dim(k) != out[k] && dim(k) != 1) {
        return None;
    }
    // Output axes of extent 1 move no index; of the others, true where the input varies.
    let varies: Vec<(usize, bool)> = (0..out.len())
        .filter(|&k| out[k] != 1)
        .map(|k| (k, dim(k) != 1))
        .collect();
    // Broadcast at the end, varying in one run before that, broadcast before that.
    let n = varies.len();
    let tail = varies.iter().rev().take_while(|(_, v)| !v).count();
    if tail == 0 {
        return None;
    }
    let head = varies[..n - tail].iter().take_while(|(_, v)| !v).count();
    let middle = &varies[head..n - tail];
    if middle.iter().any(|(_, v)| !v) {
        return None;
    }
    let inner: usize = out[varies[n - tail].0..].iter().product();
    let span: usize = middle.iter().map(|&(k, _)| out[k]).product();
    (inner > 0 && inner.is_multiple_of(per)).then_some(VectorRead::Repeat { inner, span })
}

/// How the vector kernels read a binary input of shape `input` broadcast to `out`: (0, 0) when
/// its elements lie in the output's order (its shape is the output's, size-1 axes aside);
/// (inner, span) when it is broadcast along one run of adjacent axes, with inner the length of
/// the output axes after the run (a whole number of `per`-element vectors, so a vector never
/// straddles two input rows) and span that of the run and those axes: output element e reads
/// input element (e / span) * inner + e % inner. None for broadcasts along two separate runs or
/// along trailing axes (the general kernel).
pub fn vector_run(input: &[usize], out: &[usize], per: usize) -> Option<(usize, usize)> {
    let pad = out.len().checked_sub(input.len())?;
    let dim = |k: usize| if k < pad { 1 } else { input[k - pad] };
    // Axes of extent 1 in the output move no index: only the others can be broadcast.
    let broadcast: Vec<usize> = (0..out.len())
        .filter(|&k| out[k] != 1 && dim(k) == 1)
        .collect();
    if (0..out.len()).any(|k| dim(k) != out[k] && dim(k) != 1) {
        return None;
    }
    let (Some(&lo), Some(&hi)) = (broadcast.first(), broadcast.last()) else {
        return Some((0, 0));
    };
    if (lo..=hi).any(|k| out[k] != 1 && dim(k) != 1) {
        return None;
    }
    let inner: usize = out[hi + 1..].iter().product();
    let span: usize = out[lo..].iter().product();
    (inner > 0 && inner.is_multiple_of(per)).then_some((inner, span))
}

/// (kernel name, items the grid walks, whether it is the vector kernel): `<base>_vec_<suffix>`
/// over vectors where `width` is given and the vector kernels are enabled, else
/// `<base>_<suffix>` over elements.
fn pick(base: &str, kind: BufferKind, n: usize, width: Option<usize>) -> (String, usize, bool) {
    match width.filter(|_| vector_kernels_enabled()) {
        Some(w) => (format!("{base}_vec_{}", kind.suffix()), n / w, true),
        None => (format!("{base}_{}", kind.suffix()), n, false),
    }
}

/// y = f(x) elementwise.
pub fn unary_forward(dev: &CudaDevice, x: &CudaBuffer, op: i32) -> Result<CudaBuffer, CudaError> {
    let kind = float_kind("unary", &[x])?;
    let n = x.len();
    let out = dev.alloc(kind, n, "unary output")?;
    if n == 0 {
        return Ok(out);
    }
    let (po, px) = (out.device_ptr(), x.device_ptr());
    let (name, items, _) = pick("unary_fwd", kind, n, vector_width(kind, n, &[po, px]));
    let f = dev.function(&ELEMENTWISE, &name)?;
    let nn = items as i64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po).arg(&px).arg(&nn).arg(&op);
    // SAFETY: out and x hold n elements of `kind`, as the kernel reads and writes (as n / w
    // aligned vectors of w elements for the vector kernel).
    unsafe { b.launch(launch_1d(items, THREADS)) }
        .map_err(launch_err("unary", format!("{n} elements, op {op}")))?;
    Ok(out)
}

/// dx from the saved value (input or output, per op) and dy.
pub fn unary_backward(
    dev: &CudaDevice,
    saved: &CudaBuffer,
    g: &CudaBuffer,
    op: i32,
) -> Result<CudaBuffer, CudaError> {
    let kind = float_kind("unary backward", &[saved, g])?;
    let n = g.len();
    check_lens("unary backward", &[(saved, n)])?;
    let out = dev.alloc(kind, n, "unary backward output")?;
    if n == 0 {
        return Ok(out);
    }
    let (po, ps, pg) = (out.device_ptr(), saved.device_ptr(), g.device_ptr());
    let (name, items, _) = pick("unary_bwd", kind, n, vector_width(kind, n, &[po, ps, pg]));
    let f = dev.function(&ELEMENTWISE, &name)?;
    let nn = items as i64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po).arg(&ps).arg(&pg).arg(&nn).arg(&op);
    // SAFETY: all three buffers hold n elements of `kind` (n / w aligned vectors for the vector
    // kernel).
    unsafe { b.launch(launch_1d(items, THREADS)) }.map_err(launch_err(
        "unary backward",
        format!("{n} elements, op {op}"),
    ))?;
    Ok(out)
}

/// y = f(x) for f32 `x`, and a bf16 copy of x for the backward (an activation under bf16
/// autocast: see `unary_fwd_keep_bf16` in elementwise.cu). Returns (y, kept).
pub fn unary_forward_keep_bf16(
    dev: &CudaDevice,
    x: &CudaBuffer,
    op: i32,
) -> Result<(CudaBuffer, CudaBuffer), CudaError> {
    const OP: &str = "unary keeping a bf16 input";
    require_kind(OP, x, "input", BufferKind::F32)?;
    let n = x.len();
    let out = dev.alloc(BufferKind::F32, n, "unary output")?;
    let kept = dev.alloc(BufferKind::BF16, n, "unary input kept in bf16")?;
    if n == 0 {
        return Ok((out, kept));
    }
    let (po, pk, px) = (out.device_ptr(), kept.device_ptr(), x.device_ptr());
    let (name, items, _) = pick(
        "unary_fwd_keep_bf16",
        BufferKind::F32,
        n,
        vector_width(BufferKind::BF16, n, &[po, pk, px]),
    );
    let f = dev.function(&ELEMENTWISE, &name)?;
    let nn = items as i64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po).arg(&pk).arg(&px).arg(&nn).arg(&op);
    // SAFETY: out and x hold n f32s, kept n bf16s (for the vector kernel n / 8 items of 8, all
    // three addresses 16-byte aligned).
    unsafe { b.launch(launch_1d(items, THREADS)) }
        .map_err(launch_err(OP, format!("{n} elements, op {op}")))?;
    Ok((out, kept))
}

/// dx (f32) from the bf16 copy of x that [`unary_forward_keep_bf16`] kept and dy (f32).
pub fn unary_backward_from_bf16(
    dev: &CudaDevice,
    kept: &CudaBuffer,
    g: &CudaBuffer,
    op: i32,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "unary backward from a bf16 input";
    require_kind(OP, kept, "kept input", BufferKind::BF16)?;
    require_kind(OP, g, "gradient", BufferKind::F32)?;
    let n = g.len();
    check_lens(OP, &[(kept, n)])?;
    let out = dev.alloc(BufferKind::F32, n, "unary backward output")?;
    if n == 0 {
        return Ok(out);
    }
    let (po, pk, pg) = (out.device_ptr(), kept.device_ptr(), g.device_ptr());
    let (name, items, _) = pick(
        "unary_bwd_from_bf16",
        BufferKind::F32,
        n,
        vector_width(BufferKind::BF16, n, &[po, pk, pg]),
    );
    let f = dev.function(&ELEMENTWISE, &name)?;
    let nn = items as i64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po).arg(&pk).arg(&pg).arg(&nn).arg(&op);
    // SAFETY: out and g hold n f32s, kept n bf16s (as in the forward for the vector kernel).
    unsafe { b.launch(launch_1d(items, THREADS)) }
        .map_err(launch_err(OP, format!("{n} elements, op {op}")))?;
    Ok(out)
}

/// out = a op b, a and b broadcast to `out_dims`.
pub fn binary_forward(
    dev: &CudaDevice,
    a: (&CudaBuffer, &[usize]),
    b: (&CudaBuffer, &[usize]),
    out_dims: &[usize],
    op: i32,
) -> Result<CudaBuffer, CudaError> {
    let kind = float_kind("binary", &[a.0, b.0])?;
    check_lens("binary", &[(a.0, elems(a.1)), (b.0, elems(b.1))])?;
    let n = elems(out_dims);
    let out = dev.alloc(kind, n, "binary output")?;
    if n == 0 {
        return Ok(out);
    }
    let layout = Layout::broadcast("binary", out_dims, &[a.1, b.1])?;
    let (po, pa, pb) = (out.device_ptr(), a.0.device_ptr(), b.0.device_ptr());
    let (width, runs) = binary_vector_plan(kind, n, &[po, pa, pb], a.1, b.1, out_dims);
    let (name, items, vectors) = pick("binary_fwd", kind, n, width);
    let f = dev.function(&ELEMENTWISE, &name)?;
    let nn = items as i64;
    let mut bld = dev.stream().launch_builder(&f);
    bld.arg(&po).arg(&pa).arg(&pb).arg(&nn).arg(&op);
    if vectors {
        bld.arg(&runs[0]).arg(&runs[1]).arg(&runs[2]).arg(&runs[3]);
    } else {
        bld.arg(&layout);
    }
    // SAFETY: the layout maps every output index into the inputs' element ranges; the vector
    // kernel runs only where the output is n / w aligned vectors and each input has the output's
    // element order or is broadcast along one run of axes with whole vectors after it
    // (`vector_run`), so every 16-byte read lies inside the input.
    unsafe { bld.launch(launch_1d(items, THREADS)) }.map_err(launch_err(
        "binary",
        format!("{:?} and {:?} -> {out_dims:?}, op {op}", a.1, b.1),
    ))?;
    Ok(out)
}

/// (dL/da, dL/db) at the output shape, each only when asked for; the caller sums broadcast axes.
pub fn binary_backward(
    dev: &CudaDevice,
    a: (&CudaBuffer, &[usize]),
    b: (&CudaBuffer, &[usize]),
    g: &CudaBuffer,
    out_dims: &[usize],
    op: i32,
    want: (bool, bool),
) -> Result<(Option<CudaBuffer>, Option<CudaBuffer>), CudaError> {
    let kind = float_kind("binary backward", &[a.0, b.0, g])?;
    let n = elems(out_dims);
    check_lens(
        "binary backward",
        &[(a.0, elems(a.1)), (b.0, elems(b.1)), (g, n)],
    )?;
    let ga = if want.0 {
        Some(dev.alloc(kind, n, "binary backward output")?)
    } else {
        None
    };
    let gb = if want.1 {
        Some(dev.alloc(kind, n, "binary backward output")?)
    } else {
        None
    };
    if n == 0 || (ga.is_none() && gb.is_none()) {
        return Ok((ga, gb));
    }
    let layout = Layout::broadcast("binary backward", out_dims, &[a.1, b.1])?;
    let pga = ga.as_ref().map_or(0, |t| t.device_ptr());
    let pgb = gb.as_ref().map_or(0, |t| t.device_ptr());
    let (pa, pb, pg) = (a.0.device_ptr(), b.0.device_ptr(), g.device_ptr());
    let (width, runs) = binary_vector_plan(kind, n, &[pga, pgb, pa, pb, pg], a.1, b.1, out_dims);
    let (name, items, vectors) = pick("binary_bwd", kind, n, width);
    let f = dev.function(&ELEMENTWISE, &name)?;
    let nn = items as i64;
    let mut bld = dev.stream().launch_builder(&f);
    bld.arg(&pga)
        .arg(&pgb)
        .arg(&pa)
        .arg(&pb)
        .arg(&pg)
        .arg(&nn)
        .arg(&op);
    if vectors {
        bld.arg(&runs[0]).arg(&runs[1]).arg(&runs[2]).arg(&runs[3]);
    } else {
        bld.arg(&layout);
    }
    // SAFETY: outputs hold n elements (or are null and skipped); inputs are read via the layout,
    // or, for the vector kernel, have the output's element order or are broadcast along one run
    // of axes with whole vectors after it (`vector_run`).
    unsafe { bld.launch(launch_1d(items, THREADS)) }.map_err(launch_err(
        "binary backward",
        format!("{:?} and {:?} -> {out_dims:?}, op {op}", a.1, b.1),
    ))?;
    Ok((ga, gb))
}

/// affine (x * p0 + p1), powf (x ^ p0) or clamp (into [p0, p1]).
pub fn scalar_forward(
    dev: &CudaDevice,
    x: &CudaBuffer,
    op: i32,
    p0: f32,
    p1: f32,
) -> Result<CudaBuffer, CudaError> {
    let kind = float_kind("scalar op", &[x])?;
    let n = x.len();
    let out = dev.alloc(kind, n, "scalar op output")?;
    if n == 0 {
        return Ok(out);
    }
    let (po, px) = (out.device_ptr(), x.device_ptr());
    let (name, items, _) = pick("scalar_fwd", kind, n, vector_width(kind, n, &[po, px]));
    let f = dev.function(&ELEMENTWISE, &name)?;
    let nn = items as i64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po).arg(&px).arg(&nn).arg(&op).arg(&p0).arg(&p1);
    // SAFETY: out and x hold n elements (n / w aligned vectors for the vector kernel).
    unsafe { b.launch(launch_1d(items, THREADS)) }
        .map_err(launch_err("scalar op", format!("{n} elements, op {op}")))?;
    Ok(out)
}

/// Backward of powf and clamp from the saved input (affine's backward is an affine forward).
pub fn scalar_backward(
    dev: &CudaDevice,
    x: &CudaBuffer,
    g: &CudaBuffer,
    op: i32,
    p0: f32,
    p1: f32,
) -> Result<CudaBuffer, CudaError> {
    let kind = float_kind("scalar op backward", &[x, g])?;
    let n = g.len();
    check_lens("scalar op backward", &[(x, n)])?;
    let out = dev.alloc(kind, n, "scalar op backward output")?;
    if n == 0 {
        return Ok(out);
    }
    let f = dev.function(&ELEMENTWISE, &format!("scalar_bwd_{}", kind.suffix()))?;
    let (po, px, pg, nn) = (out.device_ptr(), x.device_ptr(), g.device_ptr(), n as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po)
        .arg(&px)
        .arg(&pg)
        .arg(&nn)
        .arg(&op)
        .arg(&p0)
        .arg(&p1);
    // SAFETY: all buffers hold n elements.
    unsafe { b.launch(launch_1d(n, THREADS)) }.map_err(launch_err(
        "scalar op backward",
        format!("{n} elements, op {op}"),
    ))?;
    Ok(out)
}

/// a cmp b as a u8 mask, broadcast to `out_dims`; any element kind (both the same).
pub fn compare(
    dev: &CudaDevice,
    a: (&CudaBuffer, &[usize]),
    b: (&CudaBuffer, &[usize]),
    out_dims: &[usize],
    op: i32,
) -> Result<CudaBuffer, CudaError> {
    same_kind("compare", &[a.0, b.0])?;
    check_lens("compare", &[(a.0, elems(a.1)), (b.0, elems(b.1))])?;
    let n = elems(out_dims);
    let out = dev.alloc(BufferKind::U8, n, "compare output")?;
    if n == 0 {
        return Ok(out);
    }
    let layout = Layout::broadcast("compare", out_dims, &[a.1, b.1])?;
    let f = dev.function(&ELEMENTWISE, &format!("compare_{}", a.0.kind().suffix()))?;
    let (po, pa, pb, nn) = (
        out.device_ptr(),
        a.0.device_ptr(),
        b.0.device_ptr(),
        n as i64,
    );
    let mut bld = dev.stream().launch_builder(&f);
    bld.arg(&po)
        .arg(&pa)
        .arg(&pb)
        .arg(&nn)
        .arg(&op)
        .arg(&layout);
    // SAFETY: the layout maps every output index into the inputs.
    unsafe { bld.launch(launch_1d(n, THREADS)) }.map_err(launch_err(
        "compare",
        format!("{:?} and {:?} -> {out_dims:?}", a.1, b.1),
    ))?;
    Ok(out)
}

/// cond ? a : b with broadcasting of all three; cond is u8, a and b of one kind.
pub fn where_cond(
    dev: &CudaDevice,
    cond: (&CudaBuffer, &[usize]),
    a: (&CudaBuffer, &[usize]),
    b: (&CudaBuffer, &[usize]),
    out_dims: &[usize],
) -> Result<CudaBuffer, CudaError> {
    same_kind("where_cond", &[a.0, b.0])?;
    if cond.0.kind() != BufferKind::U8 {
        return Err(CudaError::Launch {
            op: "where_cond".into(),
            sizes: format!("condition {:?}", cond.0.kind()),
            message: "expected a u8 condition".into(),
        });
    }
    check_lens(
        "where_cond",
        &[
            (cond.0, elems(cond.1)),
            (a.0, elems(a.1)),
            (b.0, elems(b.1)),
        ],
    )?;
    let n = elems(out_dims);
    let out = dev.alloc(a.0.kind(), n, "where_cond output")?;
    if n == 0 {
        return Ok(out);
    }
    let layout = Layout::broadcast("where_cond", out_dims, &[cond.1, a.1, b.1])?;
    let f = dev.function(&ELEMENTWISE, &format!("where_{}", a.0.kind().suffix()))?;
    let (po, pc, pa, pb, nn) = (
        out.device_ptr(),
        cond.0.device_ptr(),
        a.0.device_ptr(),
        b.0.device_ptr(),
        n as i64,
    );
    let mut bld = dev.stream().launch_builder(&f);
    bld.arg(&po)
        .arg(&pc)
        .arg(&pa)
        .arg(&pb)
        .arg(&nn)
        .arg(&layout);
    // SAFETY: the layout maps every output index into the three inputs.
    unsafe { bld.launch(launch_1d(n, THREADS)) }.map_err(launch_err(
        "where_cond",
        format!("{:?}, {:?}, {:?} -> {out_dims:?}", cond.1, a.1, b.1),
    ))?;
    Ok(out)
}

/// `x` (of shape `x_dims`) copied to `out_dims` by broadcasting; any kind.
pub fn expand(
    dev: &CudaDevice,
    x: &CudaBuffer,
    x_dims: &[usize],
    out_dims: &[usize],
) -> Result<CudaBuffer, CudaError> {
    check_lens("broadcast_to", &[(x, elems(x_dims))])?;
    let layout = Layout::broadcast("broadcast_to", out_dims, &[x_dims])?;
    copy_with_layout(dev, x, out_dims, layout, "broadcast_to")
}

/// out\[i\] = x[sum_k index_k(i) * strides\[k\]] over `out_dims`: a permute, or any strided read.
/// When the innermost axis is a contiguous run (stride 1) of whole words and every other stride
/// is too (`copy_word`), the copy moves words: a permute of [B, T, 3, H, 64] bf16 heads moves
/// 16 bytes per thread and offset computation instead of 2.
pub fn strided_copy(
    dev: &CudaDevice,
    x: &CudaBuffer,
    out_dims: &[usize],
    strides: &[usize],
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "strided copy";
    let n = elems(out_dims);
    let out = dev.alloc(x.kind(), n, OP)?;
    if n == 0 {
        return Ok(out);
    }
    let elem = x.kind().size_in_bytes();
    let word = match (out_dims.split_last(), strides.split_last()) {
        (Some((&run, outer_dims)), Some((1, outer_strides)))
            if outer_dims.len() == outer_strides.len() =>
        {
            let runs: Vec<usize> = std::iter::once(run)
                .chain(outer_strides.iter().copied())
                .collect();
            copy_word(elem, &runs, [out.device_ptr(), x.device_ptr()])
        }
        _ => None,
    };
    let (suffix, dims, strides) = match word {
        Some((w, suffix)) => {
            let per = w / elem;
            let mut dims = out_dims.to_vec();
            let mut strides: Vec<usize> = strides.iter().map(|s| s / per).collect();
            if let (Some(d), Some(s)) = (dims.last_mut(), strides.last_mut()) {
                *d /= per;
                *s = 1;
            }
            (suffix, dims, strides)
        }
        None => (x.kind().suffix(), out_dims.to_vec(), strides.to_vec()),
    };
    let layout = Layout::strided(OP, &dims, &strides)?;
    launch_copy(dev, &out, x, suffix, elems(&dims), layout, OP, out_dims)?;
    Ok(out)
}

fn copy_with_layout(
    dev: &CudaDevice,
    x: &CudaBuffer,
    out_dims: &[usize],
    layout: Layout,
    op: &str,
) -> Result<CudaBuffer, CudaError> {
    let n = elems(out_dims);
    let out = dev.alloc(x.kind(), n, op)?;
    if n == 0 {
        return Ok(out);
    }
    launch_copy(dev, &out, x, x.kind().suffix(), n, layout, op, out_dims)?;
    Ok(out)
}

/// Launches `expand_<suffix>` over `n` items (elements, or words for a word suffix).
#[allow(clippy::too_many_arguments)]
fn launch_copy(
    dev: &CudaDevice,
    out: &CudaBuffer,
    x: &CudaBuffer,
    suffix: &str,
    n: usize,
    layout: Layout,
    op: &str,
    out_dims: &[usize],
) -> Result<(), CudaError> {
    let f = dev.function(&ELEMENTWISE, &format!("expand_{suffix}"))?;
    let (po, px, nn) = (out.device_ptr(), x.device_ptr(), n as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po).arg(&px).arg(&nn).arg(&layout);
    // SAFETY: the caller's layout maps every output item inside x (in the items' unit).
    unsafe { b.launch(launch_1d(n, THREADS)) }
        .map_err(launch_err(op, format!("{} -> {out_dims:?}", x.len())))?;
    Ok(())
}

/// The elements converted to `to` (through f32).
pub fn cast(dev: &CudaDevice, x: &CudaBuffer, to: BufferKind) -> Result<CudaBuffer, CudaError> {
    if x.kind() == to {
        return dev.duplicate(x);
    }
    let n = x.len();
    let out = dev.alloc(to, n, "cast output")?;
    if n == 0 {
        return Ok(out);
    }
    let f = dev.function(
        &ELEMENTWISE,
        &format!("cast_{}_to_{}", x.kind().suffix(), to.suffix()),
    )?;
    let (po, px, nn) = (out.device_ptr(), x.device_ptr(), n as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po).arg(&px).arg(&nn);
    // SAFETY: both buffers hold n elements of their kinds.
    unsafe { b.launch(launch_1d(n, THREADS)) }.map_err(launch_err(
        "cast",
        format!("{n} elements {:?} -> {to:?}", x.kind()),
    ))?;
    Ok(out)
}

/// `len` copies of `value`.
pub fn fill(
    dev: &CudaDevice,
    kind: BufferKind,
    len: usize,
    value: f32,
) -> Result<CudaBuffer, CudaError> {
    if value == 0.0 {
        return dev.zeros(kind, len);
    }
    let out = dev.alloc(kind, len, "fill")?;
    if len == 0 {
        return Ok(out);
    }
    let f = dev.function(&ELEMENTWISE, &format!("fill_{}", kind.suffix()))?;
    let (po, nn) = (out.device_ptr(), len as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po).arg(&nn).arg(&value);
    // SAFETY: out holds len elements.
    unsafe { b.launch(launch_1d(len, THREADS)) }
        .map_err(launch_err("fill", format!("{len} elements")))?;
    Ok(out)
}

fn same_kind(op: &str, bufs: &[&CudaBuffer]) -> Result<(), CudaError> {
    if bufs.windows(2).any(|w| w[0].kind() != w[1].kind()) {
        return Err(CudaError::Launch {
            op: op.to_string(),
            sizes: bufs
                .iter()
                .map(|b| format!("{:?}", b.kind()))
                .collect::<Vec<_>>()
                .join(" and "),
            message: "expected buffers of one kind".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_need_a_float_kind_whole_vectors_and_aligned_addresses() {
        assert_eq!(
            vector_width(BufferKind::F32, 1024, &[0, 256, 4096]),
            Some(4)
        );
        assert_eq!(vector_width(BufferKind::BF16, 1024, &[0, 256]), Some(8));
        assert_eq!(vector_width(BufferKind::BF16, 1020, &[0]), None);
        assert_eq!(vector_width(BufferKind::F32, 1022, &[0]), None);
        assert_eq!(vector_width(BufferKind::F32, 1024, &[0, 260]), None);
        assert_eq!(vector_width(BufferKind::I64, 1024, &[0]), None);
        assert_eq!(vector_width(BufferKind::U8, 1024, &[0]), None);
    }

    #[test]
    fn inputs_broadcast_along_one_run_of_axes_are_read_by_inner_and_span() {
        assert_eq!(vector_run(&[4, 8], &[4, 8], 4), Some((0, 0)));
        // A bias over the last axis, with or without leading ones: e % 1024.
        assert_eq!(
            vector_run(&[1024], &[65536, 1024], 4),
            Some((1024, 1 << 26))
        );
        assert_eq!(vector_run(&[1, 1, 16], &[3, 5, 16], 8), Some((16, 240)));
        assert_eq!(vector_run(&[5, 16], &[3, 5, 16], 8), Some((80, 240)));
        // AdaLN's [B, 1, C] over [B, L, C]: (e / (L * C)) * C + e % C.
        assert_eq!(vector_run(&[2, 1, 16], &[2, 5, 16], 8), Some((16, 80)));
        // Size-1 output axes inside the run do not split it.
        assert_eq!(
            vector_run(&[2, 1, 1, 1, 8], &[2, 3, 1, 4, 8], 4),
            Some((8, 96))
        );
        // Trailing broadcast, too few elements after the run, two runs, a scalar.
        assert_eq!(vector_run(&[4, 1], &[4, 8], 4), None);
        assert_eq!(vector_run(&[6], &[4, 6], 4), None);
        assert_eq!(vector_run(&[1, 5, 1, 8], &[2, 5, 3, 8], 4), None);
        assert_eq!(vector_run(&[1], &[4, 8], 4), None);
    }

    #[test]
    fn inputs_constant_along_trailing_axes_repeat_one_element_per_vector() {
        use VectorRead::{Repeat, Run, Same};
        assert_eq!(vector_read(&[4, 8], &[4, 8], 4), Some(Same));
        assert_eq!(
            vector_read(&[2, 1, 16], &[2, 5, 16], 8),
            Some(Run {
                inner: 16,
                span: 80
            })
        );
        // A per-head scale [1, H, 1, 1] over [B, H, T, D]: (e / (T * D)) % H.
        assert_eq!(
            vector_read(&[1, 16, 1, 1], &[32, 16, 255, 64], 8),
            Some(Repeat {
                inner: 255 * 64,
                span: 16
            })
        );
        // A value per row, and a scalar.
        assert_eq!(
            vector_read(&[4, 1], &[4, 8], 4),
            Some(Repeat { inner: 8, span: 4 })
        );
        assert_eq!(
            vector_read(&[1], &[4, 8], 4),
            Some(Repeat { inner: 32, span: 1 })
        );
        // Size-1 output axes do not split the runs.
        assert_eq!(
            vector_read(&[1, 3, 1, 2, 1, 1], &[5, 3, 1, 2, 1, 8], 8),
            Some(Repeat { inner: 8, span: 6 })
        );
        // Too few elements in the constant tail; varying in two runs.
        assert_eq!(vector_read(&[4, 1], &[4, 6], 4), None);
        assert_eq!(vector_read(&[3, 1, 2, 1], &[3, 5, 2, 8], 4), None);
    }
}
