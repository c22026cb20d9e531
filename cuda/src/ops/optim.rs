//! Launch wrappers of `kernels/optim.cu`: the fused multi-tensor AdamW step and the sum of
//! squares of many gradients (global-norm clipping), each one launch for all tensors.
//!
//! Both kernels read a table of tensors that the host packs ([`pack_table`]) and uploads once per
//! call: per tensor seven i64 words (parameter, gradient, m and v device pointers, length, start
//! offset in the flattened element space, flags). Gradient pointers change every step, so the
//! table is rebuilt each time; it is a few kilobytes next to the megabytes the step moves.

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use crate::buffer::{BufferKind, CudaBuffer, HostData, HostVec};
use crate::device::{launch_1d, launch_err};
use crate::kernels::OPTIM;
use crate::{CudaDevice, CudaError};

const THREADS: u32 = 256;
/// Blocks of the sum of squares: enough to fill any GPU, few enough that reading back one f64
/// partial per block (8 KiB at most) costs nothing next to the synchronisation itself.
const SUMSQ_MAX_BLOCKS: usize = 1024;

/// i64 words per tensor in the table (`struct TensorEntry` in optim.cu).
pub const TABLE_WORDS: usize = 7;
/// Flag bits of a table entry (`ENTRY_*` in optim.cu).
pub const ENTRY_DECAY: i64 = 1;
pub const ENTRY_GRAD_BF16: i64 = 2;

/// One tensor of a multi-tensor launch, as raw device addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableEntry {
    pub param: u64,
    pub grad: u64,
    pub m: u64,
    pub v: u64,
    pub len: usize,
    pub decay: bool,
    pub grad_bf16: bool,
}

/// The kernels' table: seven words per non-empty tensor, starts as the running sum of the
/// lengths. Returns the words, the number of entries and the total element count. Empty tensors
/// are left out, so the starts are strictly increasing (the kernels' binary search needs that).
pub fn pack_table(entries: &[TableEntry]) -> (Vec<i64>, usize, usize) {
    let mut words = Vec::with_capacity(entries.len() * TABLE_WORDS);
    let mut start = 0usize;
    let mut count = 0usize;
    for e in entries.iter().filter(|e| e.len > 0) {
        let flags =
            if e.decay { ENTRY_DECAY } else { 0 } | if e.grad_bf16 { ENTRY_GRAD_BF16 } else { 0 };
        words.extend_from_slice(&[
            e.param as i64,
            e.grad as i64,
            e.m as i64,
            e.v as i64,
            e.len as i64,
            start as i64,
            flags,
        ]);
        start += e.len;
        count += 1;
    }
    (words, count, start)
}

/// Splits entries into consecutive runs in which no parameter buffer appears twice. Two entries
/// updating one buffer in the same launch would race; in separate launches (queued in order on
/// the one stream) they apply one after the other, as the CPU reference does.
pub fn launch_groups(params: &[u64]) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let mut begin = 0;
    let mut seen = std::collections::HashSet::new();
    for (i, &p) in params.iter().enumerate() {
        if !seen.insert(p) {
            groups.push(begin..i);
            begin = i;
            seen.clear();
            seen.insert(p);
        }
    }
    if begin < params.len() {
        groups.push(begin..params.len());
    }
    groups
}

/// Hyper-parameters of one AdamW step in f32 (`struct AdamHyper` in optim.cu). The caller rounds
/// them from f64 exactly as the CPU reference does (`(1.0 - beta1) as f32`, not `1.0 - beta1 as
/// f32`), so that an f32 step matches the CPU to the bit.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    /// 1 - lr * weight_decay, for the tensors with `decay` set.
    pub decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    /// lr / (1 - beta1^t)
    pub step_size: f32,
    /// sqrt(1 - beta2^t)
    pub bias2_sqrt: f32,
    pub eps: f32,
}

// SAFETY: eight f32 with the C layout of the device struct.
unsafe impl DeviceRepr for AdamWHyper {}

/// One parameter of an AdamW step: the f32 master weights, their gradient (f32 or bf16) and
/// the f32 moments, all of one length; `decay` applies the decoupled weight decay.
#[derive(Debug, Clone, Copy)]
pub struct AdamWTensor<'a> {
    pub param: &'a CudaBuffer,
    pub grad: &'a CudaBuffer,
    pub m: &'a CudaBuffer,
    pub v: &'a CudaBuffer,
    pub decay: bool,
}

fn bad(op: &str, sizes: String, message: &str) -> CudaError {
    CudaError::Launch {
        op: op.to_string(),
        sizes,
        message: message.to_string(),
    }
}

/// Updates every parameter, its m and its v in place: one launch for all of them (more only when
/// a parameter buffer appears twice, see [`launch_groups`]).
pub fn adamw_step(
    dev: &CudaDevice,
    tensors: &[AdamWTensor<'_>],
    h: &AdamWHyper,
) -> Result<(), CudaError> {
    const OP: &str = "AdamW";
    for (i, t) in tensors.iter().enumerate() {
        let n = t.param.len();
        let sizes = || {
            format!(
                "tensor {i}: param {:?}[{}], grad {:?}[{}], m {:?}[{}], v {:?}[{}]",
                t.param.kind(),
                n,
                t.grad.kind(),
                t.grad.len(),
                t.m.kind(),
                t.m.len(),
                t.v.kind(),
                t.v.len()
            )
        };
        if [t.param, t.m, t.v]
            .iter()
            .any(|b| b.kind() != BufferKind::F32)
            || !t.grad.kind().is_float()
        {
            return Err(bad(
                OP,
                sizes(),
                "expected f32 parameters and moments with an f32 or bf16 gradient",
            ));
        }
        if [t.grad, t.m, t.v].iter().any(|b| b.len() != n) {
            return Err(bad(OP, sizes(), "expected buffers of one length"));
        }
    }
    // Empty tensors have no address to speak of (all 0): leave them out before grouping.
    let live: Vec<&AdamWTensor<'_>> = tensors.iter().filter(|t| !t.param.is_empty()).collect();
    if live.is_empty() {
        return Ok(());
    }
    let params: Vec<u64> = live.iter().map(|t| t.param.device_ptr()).collect();
    let f = dev.function(&OPTIM, "adamw_multi")?;
    for group in launch_groups(&params) {
        let entries: Vec<TableEntry> = live[group]
            .iter()
            .map(|t| TableEntry {
                param: t.param.device_ptr(),
                grad: t.grad.device_ptr(),
                m: t.m.device_ptr(),
                v: t.v.device_ptr(),
                len: t.param.len(),
                decay: t.decay,
                grad_bf16: t.grad.kind() == BufferKind::BF16,
            })
            .collect();
        let (words, count, total) = pack_table(&entries);
        if total == 0 {
            continue;
        }
        let table = dev.upload(HostData::I64(&words))?;
        let (pt, cnt, nn) = (table.device_ptr(), count as i32, total as i64);
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&pt).arg(&cnt).arg(&nn).arg(h);
        // SAFETY: every table entry names live buffers of `len` elements of the kinds checked
        // above; no parameter buffer appears twice in one launch; the table outlives the launch
        // in stream order (a freed block is only reused by later work on the same stream).
        unsafe { b.launch(launch_1d(total, THREADS)) }
            .map_err(launch_err(OP, format!("{count} tensors, {total} elements")))?;
    }
    Ok(())
}

/// The sum of the squares of every element of `grads` (f32 or bf16): one launch writes a partial
/// sum per block, read back once (the only host synchronisation) and added in block order, so
/// the result depends only on the gradients and their sizes, never on the order in which blocks
/// finish: repeated runs give the same bits.
pub fn sum_of_squares(dev: &CudaDevice, grads: &[&CudaBuffer]) -> Result<f64, CudaError> {
    const OP: &str = "clip_grad_norm";
    if let Some(g) = grads.iter().find(|g| !g.kind().is_float()) {
        return Err(bad(
            OP,
            format!("{:?}[{}]", g.kind(), g.len()),
            "expected f32 or bf16 gradients",
        ));
    }
    let entries: Vec<TableEntry> = grads
        .iter()
        .map(|g| TableEntry {
            param: 0,
            grad: g.device_ptr(),
            m: 0,
            v: 0,
            len: g.len(),
            decay: false,
            grad_bf16: g.kind() == BufferKind::BF16,
        })
        .collect();
    let (words, count, total) = pack_table(&entries);
    if total == 0 {
        return Ok(0.0);
    }
    let table = dev.upload(HostData::I64(&words))?;
    let blocks = total.div_ceil(THREADS as usize).clamp(1, SUMSQ_MAX_BLOCKS);
    // One f64 partial per block; device buffers have no f64 kind, so they live in an i64 buffer
    // and are read back with `f64::from_bits`. Every block writes its slot: no zero fill.
    let partials = dev.alloc(BufferKind::I64, blocks, OP)?;
    let f = dev.function(&OPTIM, "sumsq_multi")?;
    let (pt, cnt, nn, pp) = (
        table.device_ptr(),
        count as i32,
        total as i64,
        partials.device_ptr(),
    );
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&pt).arg(&cnt).arg(&nn).arg(&pp);
    // SAFETY: every entry names a live gradient of `len` elements of its flagged kind; partials
    // holds one 8-byte slot per block of the grid.
    unsafe { b.launch(cfg) }.map_err(launch_err(
        OP,
        format!("{count} gradients, {total} elements"),
    ))?;
    match dev.download(&partials)? {
        HostVec::I64(v) if v.len() == blocks => {
            Ok(v.iter().map(|&bits| f64::from_bits(bits as u64)).sum())
        }
        _ => Err(bad(OP, "partial sums".into(), "unexpected read-back")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(param: u64, len: usize) -> TableEntry {
        TableEntry {
            param,
            grad: param + 1,
            m: param + 2,
            v: param + 3,
            len,
            decay: param.is_multiple_of(2),
            grad_bf16: param.is_multiple_of(3),
        }
    }

    #[test]
    fn table_has_running_starts_flags_and_skips_empty_tensors() {
        let (w, count, total) =
            pack_table(&[entry(10, 5), entry(21, 0), entry(30, 3), entry(41, 1)]);
        assert_eq!((count, total), (3, 9));
        assert_eq!(w.len(), 3 * TABLE_WORDS);
        assert_eq!(&w[..7], &[10, 11, 12, 13, 5, 0, ENTRY_DECAY]);
        assert_eq!(
            &w[7..14],
            &[30, 31, 32, 33, 3, 5, ENTRY_DECAY | ENTRY_GRAD_BF16]
        );
        assert_eq!(&w[14..], &[41, 42, 43, 44, 1, 8, 0]);
        assert_eq!(pack_table(&[]), (vec![], 0, 0));
    }

    /// The kernels' lookup (last entry with start <= e), run on the host over a packed table.
    fn find_entry(words: &[i64], count: usize, e: i64) -> usize {
        let (mut lo, mut hi) = (0usize, count - 1);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if words[mid * TABLE_WORDS + 5] <= e {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    #[test]
    fn every_flat_index_finds_its_tensor() {
        let lens = [1usize, 0, 7, 256, 1, 0, 300, 2];
        let entries: Vec<TableEntry> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| entry(100 * i as u64, l))
            .collect();
        let (w, count, total) = pack_table(&entries);
        let mut e = 0i64;
        for (k, &l) in lens.iter().filter(|&&l| l > 0).enumerate() {
            for j in 0..l as i64 {
                let found = find_entry(&w, count, e);
                assert_eq!(found, k, "flat index {e}");
                assert_eq!(e - w[found * TABLE_WORDS + 5], j);
                e += 1;
            }
        }
        assert_eq!(e as usize, total);
    }

    #[test]
    fn repeated_parameters_go_to_separate_launches() {
        assert_eq!(launch_groups(&[]), vec![]);
        assert_eq!(launch_groups(&[1, 2, 3]), vec![0..3]);
        assert_eq!(launch_groups(&[1, 2, 1, 3, 2, 2]), vec![0..2, 2..5, 5..6]);
    }

    #[test]
    fn hyper_matches_the_c_struct_size() {
        assert_eq!(std::mem::size_of::<AdamWHyper>(), 8 * 4);
    }
}
