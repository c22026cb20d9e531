//! Launch wrappers of `kernels/index.cu` (and permute, which is the strided copy of
//! `elementwise.cu` with its axes merged first): the layout ops narrow, concat and permute, and
//! the index ops index_select and gather with their backwards.
//!
//! The copies work on every element kind and move raw bits. Index buffers are i64. The ops
//! layer checks every index on the host before it calls these (a kernel cannot return an error);
//! the kernels still never read outside a buffer when given a bad index.

use cudarc::driver::{DeviceRepr, PushKernelArg};

use crate::buffer::{BufferKind, CudaBuffer, HostData};
use crate::device::{launch_1d, launch_err};
use crate::kernels::INDEX;
use crate::ops::{check_lens, copy_word, elementwise as ew, float_kind, MAX_RANK};
use crate::{CudaDevice, CudaError};

const THREADS: u32 = 256;

fn invalid(op: &str, sizes: String, message: impl Into<String>) -> CudaError {
    CudaError::Launch {
        op: op.to_string(),
        sizes,
        message: message.into(),
    }
}

/// The product of `dims`, or an error when it overflows.
fn product(op: &str, dims: &[usize]) -> Result<usize, CudaError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| invalid(op, format!("{dims:?}"), "element count overflows"))
}

fn row_major_strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

// ----------------------------------------------------------------------------------------------
// permute

/// Merges the axes of a strided read that can be walked as one: drops axes of size 1 and joins
/// axis i with axis i+1 when `strides[i] == strides[i+1] * dims[i+1]` (the two axes then read
/// one run of the input). The copy reads the same elements in the same order, through fewer
/// axes, so permutes of any rank fit the kernels' `MAX_RANK` once they are merged.
pub(crate) fn coalesce(dims: &[usize], strides: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let mut d: Vec<usize> = Vec::with_capacity(dims.len());
    let mut s: Vec<usize> = Vec::with_capacity(dims.len());
    for (&dim, &stride) in dims.iter().zip(strides) {
        if dim == 1 {
            continue;
        }
        match (d.last_mut(), s.last_mut()) {
            (Some(ld), Some(ls)) if *ls == stride * dim => {
                *ld *= dim;
                *ls = stride;
            }
            _ => {
                d.push(dim);
                s.push(stride);
            }
        }
    }
    (d, s)
}

/// x of shape `dims` with its axes reordered: output axis i is input axis `perm[i]`. Any kind.
pub fn permute(
    dev: &CudaDevice,
    x: &CudaBuffer,
    dims: &[usize],
    perm: &[usize],
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "permute";
    let rank = dims.len();
    let mut seen = vec![false; rank];
    let valid = perm.len() == rank
        && perm
            .iter()
            .all(|&p| p < rank && !std::mem::replace(&mut seen[p], true));
    if !valid {
        return Err(invalid(
            OP,
            format!("{dims:?} by {perm:?}"),
            "expected a permutation of the axes",
        ));
    }
    check_lens(OP, &[(x, product(OP, dims)?)])?;
    let in_strides = row_major_strides(dims);
    let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let (d, s) = coalesce(&out_dims, &strides);
    ew::strided_copy(dev, x, &d, &s)
}

// ----------------------------------------------------------------------------------------------
// narrow / concat

/// One axis of a tensor seen as [outer, n, inner], and the band [start, start + len) of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Band {
    pub outer: usize,
    pub n: usize,
    pub inner: usize,
    pub start: usize,
    pub len: usize,
}

impl Band {
    /// (elements of the whole tensor, elements of the band), after checking the band fits.
    fn sizes(&self, op: &str) -> Result<(usize, usize), CudaError> {
        if self.start.checked_add(self.len).is_none_or(|e| e > self.n) {
            return Err(invalid(
                op,
                format!("{self:?}"),
                "the band does not fit in the axis",
            ));
        }
        Ok((
            product(op, &[self.outer, self.n, self.inner])?,
            product(op, &[self.outer, self.len, self.inner])?,
        ))
    }
}

/// Launches one of the band kernels: (out, src, total, a, b, inner, start), `total` and `inner`
/// in elements. The copies move raw bits, so where a row of `inner` elements is a whole number of
/// words ([`copy_word`]) they run on words: a row of eight bf16 values moves as one 16-byte word.
fn band_launch(
    dev: &CudaDevice,
    name: &str,
    out: &CudaBuffer,
    src: &CudaBuffer,
    total: usize,
    abc: [usize; 4],
) -> Result<(), CudaError> {
    if total == 0 {
        return Ok(());
    }
    let (po, ps) = (out.device_ptr(), src.device_ptr());
    let elem = src.kind().size_in_bytes();
    let [a, b, inner, start] = abc;
    let (suffix, per_word) = match copy_word(elem, &[inner], [po, ps]) {
        Some((w, suffix)) => (suffix, w / elem),
        None => (src.kind().suffix(), 1),
    };
    let f = dev.function(&INDEX, &format!("{name}_{suffix}"))?;
    let nn = (total / per_word) as i64;
    let [a, b, inner, start] = [a, b, inner / per_word, start].map(|v| v as i64);
    let mut bld = dev.stream().launch_builder(&f);
    bld.arg(&po)
        .arg(&ps)
        .arg(&nn)
        .arg(&a)
        .arg(&b)
        .arg(&inner)
        .arg(&start);
    // SAFETY: the callers check both buffers' lengths against the band, and every index the
    // kernel forms lies inside them.
    unsafe { bld.launch(launch_1d(nn as usize, THREADS)) }
        .map_err(launch_err(name, format!("{total} elements, {abc:?}")))?;
    Ok(())
}

/// The band of `x` ([outer, n, inner]) as a new [outer, len, inner] buffer. Any kind.
pub fn narrow(dev: &CudaDevice, x: &CudaBuffer, band: Band) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "narrow";
    let (full, part) = band.sizes(OP)?;
    check_lens(OP, &[(x, full)])?;
    let out = dev.alloc(x.kind(), part, "narrow output")?;
    band_launch(
        dev,
        "narrow",
        &out,
        x,
        part,
        [band.n, band.len, band.inner, band.start],
    )?;
    Ok(out)
}

/// narrow's backward: g ([outer, len, inner]) written into the band of a zero [outer, n, inner]
/// buffer. Any kind.
pub fn narrow_backward(
    dev: &CudaDevice,
    g: &CudaBuffer,
    band: Band,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "narrow backward";
    let (full, part) = band.sizes(OP)?;
    check_lens(OP, &[(g, part)])?;
    let out = dev.alloc(g.kind(), full, "narrow backward output")?;
    band_launch(
        dev,
        "narrow_bwd",
        &out,
        g,
        full,
        [band.n, band.len, band.inner, band.start],
    )?;
    Ok(out)
}

/// The inputs (`[outer, sizes[k], inner]` each) joined along the middle axis: one band copy per
/// input. Any kind (all inputs of one kind).
pub fn concat(
    dev: &CudaDevice,
    xs: &[&CudaBuffer],
    outer: usize,
    sizes: &[usize],
    inner: usize,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "concat";
    let kind = xs.first().map(|b| b.kind()).unwrap_or(BufferKind::F32);
    if xs.len() != sizes.len() || xs.iter().any(|b| b.kind() != kind) {
        return Err(invalid(
            OP,
            format!("{} buffers, sizes {sizes:?}", xs.len()),
            "expected one buffer of one kind per size",
        ));
    }
    let total_n = sizes
        .iter()
        .try_fold(0usize, |a, &s| a.checked_add(s))
        .ok_or_else(|| invalid(OP, format!("sizes {sizes:?}"), "sizes overflow"))?;
    for (x, &n) in xs.iter().zip(sizes) {
        check_lens(OP, &[(x, product(OP, &[outer, n, inner])?)])?;
    }
    let out = dev.alloc(
        kind,
        product(OP, &[outer, total_n, inner])?,
        "concat output",
    )?;
    let mut start = 0;
    for (x, &n) in xs.iter().zip(sizes) {
        band_launch(
            dev,
            "band_place",
            &out,
            x,
            x.len(),
            [n, total_n, inner, start],
        )?;
        start += n;
    }
    Ok(out)
}

// ----------------------------------------------------------------------------------------------
// index_select

fn require_indices(op: &str, idx: &CudaBuffer) -> Result<(), CudaError> {
    if idx.kind() != BufferKind::I64 {
        return Err(invalid(
            op,
            format!("indices {:?}[{}]", idx.kind(), idx.len()),
            "expected i64 indices",
        ));
    }
    Ok(())
}

/// Rows `idx` (an i64 buffer of k indices, each in [0, n)) of the middle axis of x
/// ([outer, n, inner]): a new [outer, k, inner] buffer. Any kind.
pub fn index_select(
    dev: &CudaDevice,
    x: &CudaBuffer,
    idx: &CudaBuffer,
    outer: usize,
    n: usize,
    inner: usize,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "index_select";
    require_indices(OP, idx)?;
    check_lens(OP, &[(x, product(OP, &[outer, n, inner])?)])?;
    let k = idx.len();
    let total = product(OP, &[outer, k, inner])?;
    let out = dev.alloc(x.kind(), total, "index_select output")?;
    if total == 0 {
        return Ok(out);
    }
    let f = dev.function(&INDEX, &format!("index_select_{}", x.kind().suffix()))?;
    let (po, px, pi) = (out.device_ptr(), x.device_ptr(), idx.device_ptr());
    let (nt, nn, nk, ni) = (total as i64, n as i64, k as i64, inner as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po)
        .arg(&px)
        .arg(&pi)
        .arg(&nt)
        .arg(&nn)
        .arg(&nk)
        .arg(&ni);
    // SAFETY: out holds outer*k*inner elements, x outer*n*inner; the kernel reads an index only
    // inside [0, n).
    unsafe { b.launch(launch_1d(total, THREADS)) }.map_err(launch_err(
        OP,
        format!("[{outer}, {n}, {inner}] by {k} indices"),
    ))?;
    Ok(out)
}

/// The positions j of `idx` grouped by the row they select: `order` lists them by row, then
/// by increasing j (a stable counting sort), and row r's positions are
/// `order[offsets[r]..offsets[r + 1]]`. This is what lets the backward of index_select be a
/// gather (each row sums its own sources) instead of a scatter-add.
pub(crate) fn select_csr(idx: &[i64], n: usize) -> Result<(Vec<i64>, Vec<i64>), CudaError> {
    let mut offsets = vec![0i64; n + 1];
    for &i in idx {
        if i < 0 || i as u64 >= n as u64 {
            return Err(invalid(
                "index_select backward",
                format!("index {i} for an axis of {n}"),
                "index out of range",
            ));
        }
        offsets[i as usize + 1] += 1;
    }
    for r in 0..n {
        offsets[r + 1] += offsets[r];
    }
    let mut cursor = offsets.clone();
    let mut order = vec![0i64; idx.len()];
    for (j, &i) in idx.iter().enumerate() {
        let slot = &mut cursor[i as usize];
        order[*slot as usize] = j as i64;
        *slot += 1;
    }
    Ok((offsets, order))
}

/// index_select's backward: dx [outer, n, inner] where row r sums the rows j of g
/// (`[outer, k, inner]`, k = idx.len()) with `idx[j] == r`; rows never selected are zero. The host
/// indices are grouped by row first (see `select_csr`) so no atomics are needed. f32 or bf16.
pub fn index_select_backward(
    dev: &CudaDevice,
    g: &CudaBuffer,
    idx: &[i64],
    outer: usize,
    n: usize,
    inner: usize,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "index_select backward";
    let kind = float_kind(OP, &[g])?;
    let k = idx.len();
    check_lens(OP, &[(g, product(OP, &[outer, k, inner])?)])?;
    let total = product(OP, &[outer, n, inner])?;
    let out = dev.alloc(kind, total, "index_select backward output")?;
    if total == 0 {
        return Ok(out);
    }
    let (offsets, order) = select_csr(idx, n)?;
    let offsets = dev.upload(HostData::I64(&offsets))?;
    let order = dev.upload(HostData::I64(&order))?;
    let f = dev.function(&INDEX, &format!("index_select_bwd_{}", kind.suffix()))?;
    let (po, pg, poff, pord) = (
        out.device_ptr(),
        g.device_ptr(),
        offsets.device_ptr(),
        order.device_ptr(),
    );
    let (nt, nn, nk, ni) = (total as i64, n as i64, k as i64, inner as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po)
        .arg(&pg)
        .arg(&poff)
        .arg(&pord)
        .arg(&nt)
        .arg(&nn)
        .arg(&nk)
        .arg(&ni);
    // SAFETY: offsets has n+1 entries rising from 0 to k, order k entries in [0, k); out holds
    // outer*n*inner elements and g outer*k*inner.
    unsafe { b.launch(launch_1d(total, THREADS)) }.map_err(launch_err(
        OP,
        format!("[{outer}, {n}, {inner}] from {k} indices"),
    ))?;
    Ok(out)
}

// ----------------------------------------------------------------------------------------------
// gather

/// Mirror of `struct GatherGeom` in index.cu: the input's and the indices' dims and row-major
/// strides, and the gather axis.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct GatherGeom {
    rank: i32,
    axis: i32,
    x_dims: [i64; MAX_RANK],
    idx_dims: [i64; MAX_RANK],
    x_strides: [i64; MAX_RANK],
    idx_strides: [i64; MAX_RANK],
}

// SAFETY: plain old data with the C layout of the device struct.
unsafe impl DeviceRepr for GatherGeom {}

impl GatherGeom {
    /// Checks PyTorch's gather rules: one rank (1 ..= MAX_RANK), the axis inside it, and the
    /// indices no larger than the input on every other axis.
    pub(crate) fn new(
        op: &str,
        x_dims: &[usize],
        idx_dims: &[usize],
        axis: usize,
    ) -> Result<GatherGeom, CudaError> {
        let rank = x_dims.len();
        let fits = idx_dims.len() == rank
            && (1..=MAX_RANK).contains(&rank)
            && axis < rank
            && idx_dims
                .iter()
                .zip(x_dims)
                .enumerate()
                .all(|(i, (a, b))| i == axis || a <= b);
        if !fits {
            return Err(invalid(
                op,
                format!("input {x_dims:?}, indices {idx_dims:?}, axis {axis}"),
                format!(
                    "indices of the input's rank (at most {MAX_RANK}), no larger than it off the axis"
                ),
            ));
        }
        let mut g = GatherGeom {
            rank: rank as i32,
            axis: axis as i32,
            x_dims: [1; MAX_RANK],
            idx_dims: [1; MAX_RANK],
            x_strides: [0; MAX_RANK],
            idx_strides: [0; MAX_RANK],
        };
        let (xs, is) = (row_major_strides(x_dims), row_major_strides(idx_dims));
        for i in 0..rank {
            g.x_dims[i] = x_dims[i] as i64;
            g.idx_dims[i] = idx_dims[i] as i64;
            g.x_strides[i] = xs[i] as i64;
            g.idx_strides[i] = is[i] as i64;
        }
        Ok(g)
    }
}

/// Launches gather or its backward: (out, src, idx, total, geom).
fn gather_launch(
    dev: &CudaDevice,
    name: &str,
    out: &CudaBuffer,
    src: &CudaBuffer,
    idx: &CudaBuffer,
    geo: GatherGeom,
) -> Result<(), CudaError> {
    let total = out.len();
    if total == 0 {
        return Ok(());
    }
    let f = dev.function(&INDEX, &format!("{name}_{}", src.kind().suffix()))?;
    let (po, ps, pi, nt) = (
        out.device_ptr(),
        src.device_ptr(),
        idx.device_ptr(),
        total as i64,
    );
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po).arg(&ps).arg(&pi).arg(&nt).arg(&geo);
    // SAFETY: the callers check every buffer against the geometry's dims; the kernels read the
    // input only at in-range indices.
    unsafe { b.launch(launch_1d(total, THREADS)) }.map_err(launch_err(name, format!("{geo:?}")))?;
    Ok(())
}

/// PyTorch's gather: out (idx's shape) = x at each position with the `axis` coordinate
/// replaced by the index there. Any kind; idx is i64 with values in `[0, x_dims[axis])`.
pub fn gather(
    dev: &CudaDevice,
    x: &CudaBuffer,
    x_dims: &[usize],
    idx: &CudaBuffer,
    idx_dims: &[usize],
    axis: usize,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "gather";
    require_indices(OP, idx)?;
    let geo = GatherGeom::new(OP, x_dims, idx_dims, axis)?;
    check_lens(
        OP,
        &[(x, product(OP, x_dims)?), (idx, product(OP, idx_dims)?)],
    )?;
    let out = dev.alloc(x.kind(), idx.len(), "gather output")?;
    gather_launch(dev, "gather", &out, x, idx, geo)?;
    Ok(out)
}

/// gather's backward: dx (x's shape) where each element sums the gradients g (idx's shape) of
/// the positions that read it; a gather over the indices along `axis`, no atomics. f32 or bf16.
pub fn gather_backward(
    dev: &CudaDevice,
    g: &CudaBuffer,
    idx: &CudaBuffer,
    x_dims: &[usize],
    idx_dims: &[usize],
    axis: usize,
) -> Result<CudaBuffer, CudaError> {
    const OP: &str = "gather backward";
    let kind = float_kind(OP, &[g])?;
    require_indices(OP, idx)?;
    let geo = GatherGeom::new(OP, x_dims, idx_dims, axis)?;
    let idx_len = product(OP, idx_dims)?;
    check_lens(OP, &[(g, idx_len), (idx, idx_len)])?;
    let out = dev.alloc(kind, product(OP, x_dims)?, "gather backward output")?;
    gather_launch(dev, "gather_bwd", &out, g, idx, geo)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The offsets a strided read visits, in order.
    fn visits(dims: &[usize], strides: &[usize]) -> Vec<usize> {
        let n: usize = dims.iter().product();
        (0..n)
            .map(|mut i| {
                let mut off = 0;
                for ax in (0..dims.len()).rev() {
                    off += (i % dims[ax]) * strides[ax];
                    i /= dims[ax];
                }
                off
            })
            .collect()
    }

    #[test]
    fn coalesce_merges_runs_and_keeps_the_read_order() {
        // A contiguous read becomes one axis.
        assert_eq!(coalesce(&[2, 3, 4], &[12, 4, 1]), (vec![24], vec![1]));
        // Transpose of the last two axes of [2, 3, 4]: out [2, 4, 3], strides [12, 1, 4].
        let (d, s) = coalesce(&[2, 4, 3], &[12, 1, 4]);
        assert_eq!((d.clone(), s.clone()), (vec![2, 4, 3], vec![12, 1, 4]));
        // Size-1 axes vanish; merged axes read the same offsets.
        let (dims, strides) = ([1, 3, 1, 2, 5], [99, 10, 7, 5, 1]);
        let (d, s) = coalesce(&dims, &strides);
        assert_eq!((d.clone(), s.clone()), (vec![30], vec![1]));
        assert_eq!(visits(&d, &s), visits(&dims, &strides));
        // Permute [a, b, c, d] -> [c, d, a, b] of [2, 3, 4, 5] reads as a 2-D transpose.
        let (dims, strides) = ([4, 5, 2, 3], [5, 1, 60, 20]);
        let (d, s) = coalesce(&dims, &strides);
        assert_eq!((d.clone(), s.clone()), (vec![20, 6], vec![1, 20]));
        assert_eq!(visits(&d, &s), visits(&dims, &strides));
        // Empty reads stay empty; all-ones shapes become rank 0 (one element).
        assert_eq!(coalesce(&[3, 0], &[0, 1]).0.iter().product::<usize>(), 0);
        assert_eq!(coalesce(&[1, 1], &[1, 1]), (vec![], vec![]));
    }

    #[test]
    fn coalesce_brings_a_high_rank_permute_within_the_kernel_limit() {
        // Rank 10, swapping the first two axes: the trailing eight merge into one.
        let dims = [2, 3, 2, 2, 2, 2, 2, 2, 2, 2];
        let strides = row_major_strides(&dims);
        let perm = [1, 0, 2, 3, 4, 5, 6, 7, 8, 9];
        let od: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
        let os: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
        let (d, s) = coalesce(&od, &os);
        assert_eq!(d, vec![3, 2, 256]);
        assert_eq!(visits(&d, &s), visits(&od, &os));
    }

    #[test]
    fn select_csr_groups_positions_by_row_in_order() {
        let (offsets, order) = select_csr(&[2, 0, 2, 3, 0, 2], 5).unwrap();
        assert_eq!(offsets, vec![0, 2, 2, 5, 6, 6]);
        assert_eq!(order, vec![1, 4, 0, 2, 5, 3]);
        let (offsets, order) = select_csr(&[], 3).unwrap();
        assert_eq!(offsets, vec![0, 0, 0, 0]);
        assert!(order.is_empty());
        assert!(select_csr(&[0, 3], 3).is_err());
        assert!(select_csr(&[-1], 3).is_err());
    }

    #[test]
    fn gather_geometry_checks_and_packs() {
        let g = GatherGeom::new("t", &[4, 5, 6], &[2, 7, 6], 1).unwrap();
        assert_eq!((g.rank, g.axis), (3, 1));
        assert_eq!(&g.x_strides[..3], &[30, 6, 1]);
        assert_eq!(&g.idx_strides[..3], &[42, 6, 1]);
        assert_eq!(&g.idx_dims[..3], &[2, 7, 6]);
        // Larger than the input off the axis, wrong rank, axis out of range, rank too high.
        assert!(GatherGeom::new("t", &[4, 5], &[5, 5], 1).is_err());
        assert!(GatherGeom::new("t", &[4, 5], &[4], 0).is_err());
        assert!(GatherGeom::new("t", &[4, 5], &[4, 5], 2).is_err());
        assert!(GatherGeom::new("t", &[1; 9], &[1; 9], 0).is_err());
        assert!(GatherGeom::new("t", &[], &[], 0).is_err());
    }

    #[test]
    fn gather_geometry_matches_the_c_struct_size() {
        // int rank, int axis, then four i64[MAX_RANK] arrays
        assert_eq!(std::mem::size_of::<GatherGeom>(), 8 + 4 * 8 * MAX_RANK);
    }

    #[test]
    fn bands_must_fit_their_axis() {
        let b = Band {
            outer: 2,
            n: 5,
            inner: 3,
            start: 1,
            len: 4,
        };
        assert_eq!(b.sizes("t").unwrap(), (30, 24));
        assert!(Band { len: 5, ..b }.sizes("t").is_err());
        assert!(Band {
            start: usize::MAX,
            ..b
        }
        .sizes("t")
        .is_err());
    }
}
