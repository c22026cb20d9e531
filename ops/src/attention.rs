//! Scaled dot-product attention with the masks VAR and MVAR train with: the CPU reference the
//! fused CUDA kernels are checked against.
//!
//! Layouts: q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv] -> out [B, H, Lq, Dv].
//!
//!   S = scale * q k^T + mask        (per (b, h): Lq x Lk)
//!   P = softmax(S) over the keys    (row-wise)
//!   out = P v
//!
//! Masks ([`AttnMask`]): an additive float tensor broadcast to [B, H, Lq, Lk] (0 / -inf entries;
//! it gets no gradient), or one of the two scale-block masks, which are computed from the scale
//! lengths (each query row sees one contiguous range of keys) and never stored as an L x L tensor.
//! A query row whose keys are all masked has output 0 and passes gradient 0 (not NaN).
//!
//! The forward saves the per-row log-sum-exp `lse = log sum_j exp(S_ij)` and the backward
//! recomputes `P = exp(S - lse)` from q and k instead of storing P, as the flash-attention kernels
//! do. With dO the output gradient:
//!
//!   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = scale dS K,  dK = scale dS^T Q
//!
//! The products run through `gemm` (single-threaded per (b, h)), and the (b, h) pairs run in
//! parallel with rayon. Under the block masks they run per scale over the keys that scale sees
//! (`RowBlock`), so masked pairs cost nothing: over the 10-scale 256-px pyramid VAR's
//! block-causal attention computes 62 % of the dense scores, MVAR's segment of scales 0..8 a
//! quarter. bf16 is computed in f32 (see `mvar_engine::cpu`); the log-sum-exp is kept in f64
//! whatever the dtype, because rounding it to bf16 would put an error of up to 0.4 % on every
//! recomputed probability.
//!
//! On CUDA (`cuda/kernels/attention.cu`, `mvar_cuda::ops::attention`) the fused kernels compute
//! the same with an online softmax and f32 accumulation, never storing P (bf16 on the tensor
//! cores where the GPU has them, else f32 CUDA-core math): the block masks are computed from
//! the scale lengths inside the kernels, the log-sum-exp stays on the device as an f32 tensor
//! for the backward, and an additive mask is read as f32 by the naive reference kernels.
//! `MVAR_ATTN_KERNEL=mma|tiled|naive` asks for one kernel family.
//!
//! The fused kernels take head dims up to 128 with d == dv; beyond that only the naive kernels
//! (one block per query row, K and V re-read per row) would run, which took 33 ms for the
//! tokenizer's one-head attention over 640 channels at batch 32 on an H200 (2026-12-04). So on
//! CUDA, unmasked attention with such heads runs as three library ops instead (f32 scores
//! through cuBLAS, softmax, P v; their own backward), when the scores stay under
//! [`MATMUL_PATH_MAX_SCORE_BYTES`]; `MVAR_ATTN_KERNEL=naive` keeps the naive kernels.

use std::sync::{Arc, Mutex};

use gemm::Parallelism;
use mvar_engine::cpu::{run_float, FloatKernel, PARALLEL_MIN_ELEMS};
use mvar_engine::cuda::ops::attention as ca;
use mvar_engine::cuda::CudaBuffer;
use mvar_engine::{DType, Error, Float, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::norm::{backward_with_saved, nth, Saved};
use crate::util::{
    autocast_run, dispatch, lane_max, lane_sum, out_tensor, require_float, require_rank,
    same_device, same_dtype,
};

const OP: &str = "attention";

/// Which (query, key) pairs may attend, and how.
#[derive(Debug, Clone)]
pub enum AttnMask {
    /// Every query sees every key.
    None,
    /// Added to the scaled scores: a float tensor broadcastable to [B, H, Lq, Lk] (typically
    /// [Lq, Lk]) whose entries are 0 (visible) or -inf (masked). Not differentiated.
    Additive(Tensor),
    /// The tokens form consecutive scales of these lengths (Lq == Lk == their sum); query i sees
    /// key j iff scale(i) >= scale(j). VAR's training mask: bidirectional inside a scale, and
    /// every earlier scale is visible.
    BlockCausal(Vec<usize>),
    /// Like `BlockCausal`, but query i sees key j iff scale(i) == scale(j): MVAR's scale-Markov
    /// mask.
    BlockDiagonal(Vec<usize>),
}

/// A mask resolved against the problem size, in the form the kernels read.
enum MaskPlan {
    None,
    /// Mask values (widened to f64) with their strides over [B, H, Lq, Lk], 0 on broadcast axes.
    Additive {
        values: Vec<f64>,
        strides: [usize; 4],
    },
    /// The queries of each block see exactly the keys `keys` of it, and nothing else (both
    /// block masks are of this form: a block per scale).
    Blocks(Vec<RowBlock>),
}

/// A run of consecutive query rows that all see the same contiguous keys and no others: the
/// unit of the CPU kernels' products. Under the block masks there is one per scale and the
/// products cover only its visible keys (for MVAR's segment of scales 0..8, 16 371 of 65 025
/// query-key pairs; for VAR's 680-token pyramid 286 434 of 462 400), instead of computing every
/// score and masking it; without a mask, or with an additive one, one block spans every row
/// and key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RowBlock {
    rows: (usize, usize),
    keys: (usize, usize),
}

impl RowBlock {
    fn queries(&self) -> usize {
        self.rows.1 - self.rows.0
    }
    fn key_count(&self) -> usize {
        self.keys.1 - self.keys.0
    }
}

/// The row blocks of a sequence made of consecutive scales of lengths `lens`: each scale's
/// queries see their own scale only (`causal == false`), or every scale up to their own.
/// Scales of length 0 make no block.
fn scale_blocks(lens: &[usize], causal: bool) -> Vec<RowBlock> {
    let mut blocks = Vec::with_capacity(lens.len());
    let mut start = 0;
    for &n in lens {
        let end = start + n;
        if n > 0 {
            blocks.push(RowBlock {
                rows: (start, end),
                keys: (if causal { 0 } else { start }, end),
            });
        }
        start = end;
    }
    blocks
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    /// B * H: the number of independent attention problems.
    heads: usize,
    /// H, to split a head index into (b, h) for broadcast masks.
    h: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
}

struct Plan {
    dims: Dims,
    scale: f64,
    mask: MaskPlan,
}

impl Plan {
    /// The row blocks the products run over (see [`RowBlock`]).
    fn blocks(&self) -> Vec<RowBlock> {
        match &self.mask {
            MaskPlan::Blocks(blocks) => blocks.clone(),
            MaskPlan::None | MaskPlan::Additive { .. } => vec![RowBlock {
                rows: (0, self.dims.lq),
                keys: (0, self.dims.lk),
            }],
        }
    }

    /// Scores of head `bh`'s block `blk` into `s` (queries x keys of the block, row-major):
    /// scale * q k^T, plus an additive mask (-inf where masked). `q` and `k` are the head's.
    fn scores<T: Float>(&self, bh: usize, blk: RowBlock, q: &[T], k: &[T], s: &mut [T]) {
        let Dims { lk, d, .. } = self.dims;
        let (nq, nk) = (blk.queries(), blk.key_count());
        mm(
            s,
            &q[blk.rows.0 * d..blk.rows.1 * d],
            false,
            &k[blk.keys.0 * d..blk.keys.1 * d],
            true,
            (nq, nk, d),
            T::from_f64(self.scale),
            false,
        );
        if let MaskPlan::Additive { values, strides } = &self.mask {
            // An additive mask comes with the one block over every row and key.
            debug_assert!(nk == lk && nq == self.dims.lq);
            let base = (bh / self.dims.h) * strides[0] + (bh % self.dims.h) * strides[1];
            for i in 0..nq {
                for j in 0..nk {
                    s[i * nk + j] += T::from_f64(values[base + i * strides[2] + j * strides[3]]);
                }
            }
        }
    }

    /// Runs `f` for every head, in parallel when the work is large enough to pay for it.
    fn per_head<R: Send>(&self, f: impl Fn(usize) -> R + Sync + Send) -> Vec<R> {
        let Dims {
            heads,
            lq,
            lk,
            d,
            dv,
            ..
        } = self.dims;
        if heads > 1 && heads * lq * lk * (d + dv) >= PARALLEL_MIN_ELEMS {
            (0..heads).into_par_iter().map(f).collect()
        } else {
            (0..heads).map(f).collect()
        }
    }
}

/// dst (m x n, row-major) = beta * op(a) op(b), or dst += beta * op(a) op(b) when `accumulate`,
/// with op(a) m x kk and op(b) kk x n. `a` is stored row-major as m x kk, or as kk x m when `ta`
/// (its transpose is read through the strides, no copy); likewise `b`.
#[allow(clippy::too_many_arguments)]
fn mm<T: Float>(
    dst: &mut [T],
    a: &[T],
    ta: bool,
    b: &[T],
    tb: bool,
    (m, n, kk): (usize, usize, usize),
    beta: T,
    accumulate: bool,
) {
    // Sizes come from validated shapes; a mismatch here is a bug in this file, and the unsafe
    // call below must never see one.
    assert!(
        dst.len() == m * n && a.len() == m * kk && b.len() == kk * n,
        "attention: gemm operand sizes"
    );
    if m * n == 0 {
        return;
    }
    if kk == 0 {
        if !accumulate {
            dst.fill(T::zero());
        }
        return;
    }
    let (a_rs, a_cs) = if ta {
        (1, m as isize)
    } else {
        (kk as isize, 1)
    };
    let (b_rs, b_cs) = if tb {
        (1, kk as isize)
    } else {
        (n as isize, 1)
    };
    // SAFETY: the slices hold exactly m*kk, kk*n and m*n elements (checked above), the strides
    // address them row-major or transposed, and dst does not alias the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            kk,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            if accumulate { T::one() } else { T::zero() },
            beta,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// In place: `row <- softmax(row)`; returns the row's log-sum-exp. A row that is all -inf (every
/// key masked, or no keys) becomes all zeros with log-sum-exp -inf.
#[inline(always)]
pub(crate) fn softmax_row<T: Float>(row: &mut [T]) -> T {
    let m = lane_max(row);
    if m == T::neg_infinity() {
        row.fill(T::zero());
        return m;
    }
    for x in row.iter_mut() {
        *x = (*x - m).exp_fast();
    }
    // sum >= 1: the largest entry contributes exp(0).
    let sum = T::from_f64(lane_sum(row, |x| x.as_f64()));
    let inv = T::one() / sum;
    for x in row.iter_mut() {
        *x = *x * inv;
    }
    m + sum.ln()
}

/// `exp(s - lse)`: a probability recomputed from its score and its row's log-sum-exp (0 for a
/// fully masked row, whose lse is -inf).
#[inline(always)]
pub(crate) fn prob_from_lse<T: Float>(s: T, lse: T) -> T {
    if lse == T::neg_infinity() {
        T::zero()
    } else {
        (s - lse).exp_fast()
    }
}

struct Forward {
    plan: Arc<Plan>,
    /// Per-row log-sum-exp [B, H, Lq], handed back beside the output (see the module docs for why
    /// it is f64 and not an output of the dtype).
    lse: Mutex<Vec<f64>>,
}

impl FloatKernel for Forward {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (q, k, v) = (x[0], x[1], x[2]);
        let Dims {
            heads,
            lq,
            lk,
            d,
            dv,
            ..
        } = self.plan.dims;
        let blocks = self.plan.blocks();
        let per_head = self.plan.per_head(|bh| {
            let (qh, kh, vh) = (
                &q[bh * lq * d..][..lq * d],
                &k[bh * lk * d..][..lk * d],
                &v[bh * lk * dv..][..lk * dv],
            );
            // Rows outside every block (none with the masks there are) see no key: output 0,
            // log-sum-exp -inf, as a row whose keys are all masked.
            let mut o = vec![T::zero(); lq * dv];
            let mut lse = vec![f64::NEG_INFINITY; lq];
            let mut p = Vec::new();
            for &blk in &blocks {
                let (nq, nk) = (blk.queries(), blk.key_count());
                if nk == 0 {
                    continue;
                }
                p.clear();
                p.resize(nq * nk, T::zero());
                self.plan.scores(bh, blk, qh, kh, &mut p);
                for (i, row) in p.chunks_exact_mut(nk).enumerate() {
                    lse[blk.rows.0 + i] = softmax_row(row).as_f64();
                }
                mm(
                    &mut o[blk.rows.0 * dv..blk.rows.1 * dv],
                    &p,
                    false,
                    &vh[blk.keys.0 * dv..blk.keys.1 * dv],
                    false,
                    (nq, dv, nk),
                    T::one(),
                    false,
                );
            }
            (o, lse)
        });
        let mut out = Vec::with_capacity(heads * lq * dv);
        let mut lse = Vec::with_capacity(heads * lq);
        for (o, l) in per_head {
            out.extend(o);
            lse.extend(l);
        }
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok(vec![out])
    }
}

/// The fused backward: inputs [dO, q, k, v, O], outputs [dq, dk, dv].
struct Backward {
    plan: Arc<Plan>,
    lse: Vec<f64>,
}

impl FloatKernel for Backward {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (go, q, k, v, o) = (x[0], x[1], x[2], x[3], x[4]);
        let Dims {
            heads,
            lq,
            lk,
            d,
            dv,
            ..
        } = self.plan.dims;
        let scale = T::from_f64(self.plan.scale);
        let blocks = self.plan.blocks();
        let per_head = self.plan.per_head(|bh| {
            let (qh, kh, vh) = (
                &q[bh * lq * d..][..lq * d],
                &k[bh * lk * d..][..lk * d],
                &v[bh * lk * dv..][..lk * dv],
            );
            let (goh, oh) = (
                &go[bh * lq * dv..][..lq * dv],
                &o[bh * lq * dv..][..lq * dv],
            );
            // Each query row is in one block (dq written once); keys may serve several blocks
            // (VAR's earlier scales), so dk and dv add up over the blocks.
            let mut dqh = vec![T::zero(); lq * d];
            let mut dkh = vec![T::zero(); lk * d];
            let mut dvh = vec![T::zero(); lk * dv];
            let (mut p, mut ds) = (Vec::new(), Vec::new());
            for &blk in &blocks {
                let (nq, nk) = (blk.queries(), blk.key_count());
                if nk == 0 {
                    continue;
                }
                let (r0, r1) = blk.rows;
                let (k0, k1) = blk.keys;
                p.clear();
                p.resize(nq * nk, T::zero());
                self.plan.scores(bh, blk, qh, kh, &mut p);
                for (i, row) in p.chunks_exact_mut(nk).enumerate() {
                    let lse = T::from_f64(self.lse[bh * lq + r0 + i]);
                    for s in row {
                        *s = prob_from_lse(*s, lse);
                    }
                }
                let go_rows = &goh[r0 * dv..r1 * dv];
                let (q_rows, k_keys) = (&qh[r0 * d..r1 * d], &kh[k0 * d..k1 * d]);
                mm(
                    &mut dvh[k0 * dv..k1 * dv],
                    &p,
                    true,
                    go_rows,
                    false,
                    (nk, dv, nq),
                    T::one(),
                    true,
                );
                // dP, then dS in the same buffer.
                ds.clear();
                ds.resize(nq * nk, T::zero());
                mm(
                    &mut ds,
                    go_rows,
                    false,
                    &vh[k0 * dv..k1 * dv],
                    true,
                    (nq, nk, dv),
                    T::one(),
                    false,
                );
                for i in 0..nq {
                    let row = (r0 + i) * dv..(r0 + i + 1) * dv;
                    let delta = goh[row.clone()]
                        .iter()
                        .zip(&oh[row])
                        .fold(T::zero(), |a, (&g, &y)| a + g * y);
                    for j in 0..nk {
                        ds[i * nk + j] = p[i * nk + j] * (ds[i * nk + j] - delta);
                    }
                }
                mm(
                    &mut dqh[r0 * d..r1 * d],
                    &ds,
                    false,
                    k_keys,
                    false,
                    (nq, d, nk),
                    scale,
                    false,
                );
                mm(
                    &mut dkh[k0 * d..k1 * d],
                    &ds,
                    true,
                    q_rows,
                    false,
                    (nk, d, nq),
                    scale,
                    true,
                );
            }
            (dqh, dkh, dvh)
        });
        let (mut dq, mut dk, mut dvv) = (
            Vec::with_capacity(heads * lq * d),
            Vec::with_capacity(heads * lk * d),
            Vec::with_capacity(heads * lk * dv),
        );
        for (a, b, c) in per_head {
            dq.extend(a);
            dk.extend(b);
            dvv.extend(c);
        }
        Ok(vec![dq, dk, dvv])
    }
}

fn layout_error(q: &Tensor, k: &Tensor, v: &Tensor, why: &str) -> Error {
    Error::shape(
        OP,
        format!("q {}, k {}, v {} ({why})", q.shape(), k.shape(), v.shape()),
        "q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv]",
    )
}

/// The strides of an additive mask over [B, H, Lq, Lk] (its shape right-aligned to them), 0 on
/// broadcast axes.
fn additive_strides(m: &Tensor) -> [usize; 4] {
    let mut dims = vec![1; 4 - m.rank()];
    dims.extend_from_slice(m.dims());
    let own = Shape::new(dims.clone()).strides();
    [0, 1, 2, 3].map(|a| if dims[a] == 1 { 0 } else { own[a] })
}

fn resolve_mask(
    mask: &AttnMask,
    q: &Tensor,
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
) -> Result<MaskPlan> {
    match mask {
        AttnMask::None => Ok(MaskPlan::None),
        AttnMask::Additive(m) => {
            same_device(OP, &[q, m])?;
            require_float(OP, m)?;
            let target = [b, h, lq, lk];
            let fits = m.rank() <= 4
                && m.dims()
                    .iter()
                    .rev()
                    .zip(target.iter().rev())
                    .all(|(&md, &t)| md == 1 || md == t);
            if !fits {
                return Err(Error::shape(
                    OP,
                    format!("additive mask {}", m.shape()),
                    format!(
                        "a mask broadcastable to the scores [B, H, Lq, Lk] = {}",
                        Shape::new(target.to_vec())
                    ),
                ));
            }
            // On the GPU the values stay on the device (the CUDA branch reads the mask tensor);
            // only the CPU kernel reads this host copy.
            Ok(MaskPlan::Additive {
                values: if m.device().is_cpu() {
                    m.to_vec_f64()?
                } else {
                    Vec::new()
                },
                strides: additive_strides(m),
            })
        }
        AttnMask::BlockCausal(lens) | AttnMask::BlockDiagonal(lens) => {
            let causal = matches!(mask, AttnMask::BlockCausal(_));
            let name = if causal {
                "BlockCausal"
            } else {
                "BlockDiagonal"
            };
            let total = lens.iter().try_fold(0usize, |a, &n| a.checked_add(n));
            if total != Some(lq) || lq != lk {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "{name} mask with scale lengths {lens:?} (sum {}) for Lq = {lq} queries and Lk = {lk} keys; \
                         expected Lq == Lk == the sum of the scale lengths",
                        total.map_or_else(|| "overflows".to_string(), |t| t.to_string())
                    ),
                ));
            }
            Ok(MaskPlan::Blocks(scale_blocks(lens, causal)))
        }
    }
}

/// Most bytes of f32 scores [B, H, Lq, Lk] that the matmul path of wide heads materialises (see
/// the module docs); larger calls run the naive fused kernels, which store no scores.
pub const MATMUL_PATH_MAX_SCORE_BYTES: usize = 1 << 30;

/// Whether a call runs as matmul, softmax, matmul: on CUDA, no mask, a head the fused tiled
/// and mma kernels do not take (d > 128 or d != dv), at least one key, scores under the cap,
/// and no kernel family forced through `MVAR_ATTN_KERNEL`.
fn wide_heads_by_matmul(q: &Tensor, d: usize, dv: usize, scores: usize, mask: &AttnMask) -> bool {
    q.device().is_cuda()
        && matches!(mask, AttnMask::None)
        && (d > 128 || d != dv)
        && scores > 0
        && scores.saturating_mul(4) <= MATMUL_PATH_MAX_SCORE_BYTES
        && ca::AttnKernel::from_env() == ca::AttnKernel::Auto
}

/// `softmax(q k^T * scale) v` through library ops, the scores in f32 whatever q's dtype (and
/// with autocast off: bf16 scores would put an error of a few percent on the probabilities,
/// where the fused kernels keep them in f32); the result in q's dtype.
fn attention_by_matmul(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let _f32_scores = mvar_engine::autocast(None)?;
    let dtype = q.dtype();
    let [q, k, v] = [q, k, v].map(|t| t.to_dtype(DType::F32));
    let scores =
        crate::elementwise::mul_scalar(&crate::matmul::matmul_t(&q?, &k?, false, true)?, scale)?;
    let p = crate::softmax::softmax(&scores, -1)?;
    crate::matmul::matmul(&p, &v?)?.to_dtype(dtype)
}

/// `softmax(q k^T * scale + mask) v`, softmax over the keys.
///
/// q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv] (one float dtype and device) ->
/// [B, H, Lq, Dv] of that dtype. Differentiable in q, k and v; see [`AttnMask`] for the masks and
/// the module docs for the exact forward and backward.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttnMask,
) -> Result<Tensor> {
    if let Some(r) = autocast_run(&[q, k, v], |x| attention(&x[0], &x[1], &x[2], scale, mask)) {
        return r;
    }
    same_device(OP, &[q, k, v])?;
    for t in [q, k, v] {
        require_float(OP, t)?;
    }
    same_dtype(OP, &[q, k, v])?;
    require_rank(OP, q, "q [B, H, Lq, D]", 4)?;
    require_rank(OP, k, "k [B, H, Lk, D]", 4)?;
    require_rank(OP, v, "v [B, H, Lk, Dv]", 4)?;
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    if kd[..2] != qd[..2] || vd[..2] != qd[..2] {
        return Err(layout_error(q, k, v, "batch and head axes differ"));
    }
    if kd[3] != qd[3] {
        return Err(layout_error(q, k, v, "q and k head dims differ"));
    }
    if vd[2] != kd[2] {
        return Err(layout_error(
            q,
            k,
            v,
            "k and v have different numbers of keys",
        ));
    }
    if !scale.is_finite() {
        return Err(Error::invalid(
            OP,
            format!("scale {scale}: expected a finite number"),
        ));
    }
    let (b, h, lq, d) = (qd[0], qd[1], qd[2], qd[3]);
    let (lk, dv) = (kd[2], vd[3]);
    let scores = [b, h, lq, lk]
        .iter()
        .try_fold(1usize, |a, &x| a.checked_mul(x))
        .unwrap_or(usize::MAX);
    if wide_heads_by_matmul(q, d, dv, scores, mask) {
        return attention_by_matmul(q, k, v, scale);
    }
    let plan = Arc::new(Plan {
        dims: Dims {
            heads: b * h,
            h,
            lq,
            lk,
            d,
            dv,
        },
        scale,
        mask: resolve_mask(mask, q, b, h, lq, lk)?,
    });
    let shape = ca::AttnShape {
        batch: b,
        heads: h,
        lq,
        lk,
        d,
        dv,
    };
    // On the GPU an additive mask travels as an f32 tensor beside q, k and v (detached: it gets
    // no gradient).
    let device_mask = match mask {
        AttnMask::Additive(m) if q.device().is_cuda() => Some(m.detach().to_dtype(DType::F32)?),
        _ => None,
    };
    let fwd = Forward {
        plan: plan.clone(),
        lse: Mutex::new(Vec::new()),
    };
    let mut inputs = vec![q, k, v];
    inputs.extend(device_mask.as_ref());
    let mut outs = dispatch(
        OP,
        &inputs,
        |s| run_float(OP, &s[..3], &fwd),
        |dev, bufs| {
            let (o, lse) = ca::attention_forward(
                dev,
                bufs[0],
                bufs[1],
                bufs[2],
                shape,
                scale as f32,
                &DeviceMask::of(mask).resolve(bufs.get(3).copied())?,
                ca::AttnKernel::from_env(),
            )?;
            Ok(vec![o, lse])
        },
    )?;
    let mut lse = Saved::take(
        OP,
        &mut outs,
        || fwd.lse.into_inner().unwrap_or_else(|e| e.into_inner()),
        [b * h * lq],
        q.device(),
    )?;
    if let Some(m) = &device_mask {
        lse = lse.keep(m);
    }
    let out = out_tensor(outs, [b, h, lq, dv], q.device())?;
    let saved = [q.detach(), k.detach(), v.detach(), out.detach()];
    let mask = DeviceMask::of(mask);
    Ok(Tensor::record(out, OP, &[q, k, v], move || {
        move |g: &Tensor| {
            let [q, k, v, o] = saved;
            let grads = backward_with_saved(
                OP,
                &[g, &q, &k, &v, &o],
                lse,
                |lse| Backward { plan, lse },
                |dev, b, st| {
                    let (dq, dk, dv) = ca::attention_backward(
                        dev,
                        b[0],
                        b[1],
                        b[2],
                        b[3],
                        b[4],
                        nth(OP, st, 0)?,
                        shape,
                        scale as f32,
                        &mask.resolve(st.get(1).copied())?,
                        ca::AttnKernel::from_env(),
                    )?;
                    Ok(vec![dq, dk, dv])
                },
            )?;
            if grads.len() != 3 {
                return Err(Error::Autograd(
                    "attention backward: expected three gradients".into(),
                ));
            }
            grads
                .into_iter()
                .zip([&q, &k, &v])
                .map(|(s, like)| {
                    Ok(Some(Tensor::from_storage(
                        s,
                        like.shape().clone(),
                        like.device(),
                    )?))
                })
                .collect()
        }
    }))
}

/// What the CUDA wrappers need to know of a mask besides the additive mask's device buffer (kept
/// by the backward closure instead of the mask tensor itself).
enum DeviceMask {
    None,
    BlockCausal(Vec<usize>),
    BlockDiagonal(Vec<usize>),
    Additive([usize; 4]),
}

impl DeviceMask {
    fn of(mask: &AttnMask) -> DeviceMask {
        match mask {
            AttnMask::None => DeviceMask::None,
            AttnMask::BlockCausal(lens) => DeviceMask::BlockCausal(lens.clone()),
            AttnMask::BlockDiagonal(lens) => DeviceMask::BlockDiagonal(lens.clone()),
            AttnMask::Additive(m) => DeviceMask::Additive(additive_strides(m)),
        }
    }

    /// The wrappers' mask; `values` is the f32 device buffer of an additive mask (the dispatch's
    /// fourth buffer in the forward, the second saved one in the backward).
    fn resolve<'a>(&'a self, values: Option<&'a CudaBuffer>) -> Result<ca::AttnMask<'a>> {
        Ok(match self {
            DeviceMask::None => ca::AttnMask::None,
            DeviceMask::BlockCausal(lens) => ca::AttnMask::BlockCausal(lens),
            DeviceMask::BlockDiagonal(lens) => ca::AttnMask::BlockDiagonal(lens),
            DeviceMask::Additive(strides) => ca::AttnMask::Additive {
                values: values.ok_or_else(|| {
                    Error::invalid(OP, "the additive mask's device buffer is missing")
                })?,
                strides: *strides,
            },
        })
    }
}
