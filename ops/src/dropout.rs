//! Dropout and drop-path (stochastic depth), with inverted scaling: kept values are multiplied by
//! 1 / (1 - p) so the expectation is unchanged.
//!
//! - dropout: every element is kept or zeroed independently.
//! - drop_path: one decision per sample along axis 0, shared by all of that sample's elements
//!   (timm's DropPath, which VAR applies to each block's residual branches).
//!
//! Draw order (a CUDA kernel reproduces it from the generator's state before the call): the op
//! makes exactly one draw `rng.uniform(m, 0.0, 1.0)` with m = the element count (dropout) or the
//! sample count `x.dims()[0]` (drop_path); decision i uses uniform i of that draw, i being the
//! row-major element index (dropout) or the sample index (drop_path), and keeps iff
//! u_i < 1 - p compared in f64. With u_i = ((w_i >> 8) + 0.5) / 2^24 from Philox word w_i (see
//! `mvar_engine::rng`), that is (w_i >> 8) + 0.5 < (1 - p) * 2^24. The draw advances the
//! generator by ceil(m / 4) Philox blocks. p == 0 returns x itself and draws nothing; an
//! invalid call returns its error before drawing.
//!
//! The backward multiplies the output gradient by the same saved mask and scale.
//!
//! On CUDA the mask is drawn on the device (`random.cu`, the same Philox4x32-10) from the
//! generator's seed and the blocks [`Generator::reserve`] sets aside, so it equals the CPU's mask
//! bit for bit and the generator ends in the same state. The mask is kept as a u8 device tensor
//! (one byte per decision) for the backward.

use std::mem::MaybeUninit;
use std::sync::Arc;

use mvar_engine::cpu::FloatKernel;
use mvar_engine::cuda::ops::random;
use mvar_engine::cuda::CudaDevice;
use mvar_engine::{Device, Error, Float, Generator, Result, Storage, Tensor};

use crate::util::{
    dispatch, float_kernel, in_widest_vectors, one, out_tensor, require_float, tensor,
    write_mapped, written_in_tasks,
};

/// out[i] = x[i] * scale where mask[i / group] is set, else 0. The forward and the backward
/// are this same kernel.
struct MaskScale {
    mask: Arc<Vec<bool>>,
    group: usize,
    scale: f64,
}
impl FloatKernel for MaskScale {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let x = x[0];
        let scale = T::from_f64(self.scale);
        let group = self.group;
        // Tasks of whole groups, each group one decision and a plain loop over its elements
        // (a per-element iterator with a division by the group size ran at a third of the
        // memory's speed).
        let task_groups = TASK_ELEMS.div_ceil(group);
        let fill = |(task, out): (usize, &mut [MaybeUninit<T>])| {
            let first = task * task_groups;
            let xs = &x[first * group..][..out.len()];
            if group == 1 {
                // Dropout: a decision per element, as one select loop.
                let keep = &self.mask[first..][..out.len()];
                in_widest_vectors(
                    #[inline(always)]
                    || {
                        for ((o, &v), &k) in out.iter_mut().zip(xs).zip(keep) {
                            o.write(if k { v * scale } else { T::zero() });
                        }
                    },
                );
                return;
            }
            for (j, (o, xg)) in out.chunks_mut(group).zip(xs.chunks(group)).enumerate() {
                if self.mask[first + j] {
                    in_widest_vectors(
                        #[inline(always)]
                        || {
                            write_mapped(o, xg, |v| v * scale);
                        },
                    );
                } else {
                    o.fill(MaybeUninit::new(T::zero()));
                }
            }
        };
        // SAFETY: the tasks tile the output in whole groups, and each writes every element of
        // its chunk (the select loop for single elements; else a kept group through
        // write_mapped, a dropped one through fill).
        let out = unsafe { written_in_tasks(x.len(), task_groups * group, fill) };
        Ok(vec![out])
    }
}

/// Elements per task of [`MaskScale`] (rounded up to whole groups).
const TASK_ELEMS: usize = 16 * 1024;

fn check_p(op: &'static str, x: &Tensor, p: f64) -> Result<()> {
    require_float(op, x)?;
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(
            op,
            format!("drop probability {p}: expected a value in [0, 1)"),
        ));
    }
    Ok(())
}

/// Draws the decisions (see the module docs) and applies them in groups of `group` elements.
fn masked(
    op: &'static str,
    x: &Tensor,
    p: f64,
    decisions: usize,
    group: usize,
    rng: &mut Generator,
) -> Result<Tensor> {
    if let Device::Cuda(dev) = x.device() {
        return masked_cuda(op, x, dev, p, decisions, group.max(1), rng);
    }
    let keep = 1.0 - p;
    let mask: Arc<Vec<bool>> = Arc::new(
        rng.uniform(decisions, 0.0, 1.0)
            .into_iter()
            .map(|u| u < keep)
            .collect(),
    );
    let scale = 1.0 / keep;
    let k = MaskScale {
        mask,
        group: group.max(1),
        scale,
    };
    let out = tensor(
        one(float_kernel(op, &[x], &k)?),
        x.shape().clone(),
        x.device(),
    )?;
    Ok(Tensor::record(out, op, &[x], move || {
        move |g: &Tensor| {
            let dx = one(float_kernel(op, &[g], &k)?);
            Ok(vec![Some(tensor(dx, g.shape().clone(), g.device())?)])
        }
    }))
}

/// The CUDA side of [`masked`]: the same decisions drawn on the device, then out = x * scale
/// where kept.
fn masked_cuda(
    op: &'static str,
    x: &Tensor,
    dev: &CudaDevice,
    p: f64,
    decisions: usize,
    group: usize,
    rng: &mut Generator,
) -> Result<Tensor> {
    let keep = 1.0 - p;
    let scale = (1.0 / keep) as f32;
    let threshold = random::keep_threshold(keep);
    let seed = rng.state().seed;
    let first = rng.reserve(decisions);
    let mask = random::keep_mask(dev, seed, first, decisions, threshold)?;
    let mask = Tensor::from_storage(Storage::Cuda(mask), [decisions], x.device())?;
    // The CPU closure is never reached: the mask lives on the GPU, so `dispatch` only accepts a
    // tensor on that GPU (a CPU one is a device mismatch).
    let apply = move |t: &Tensor| -> Result<Tensor> {
        let out = dispatch(
            op,
            &[t, &mask],
            |_| Err(Error::invalid(op, "a CUDA mask applied to CPU storage")),
            |dev, b| Ok(vec![random::mask_scale(dev, b[0], b[1], group, scale)?]),
        )?;
        out_tensor(out, t.shape().clone(), t.device())
    };
    let out = apply(x)?;
    Ok(Tensor::record(out, op, &[x], move || {
        move |g: &Tensor| Ok(vec![Some(apply(g)?)])
    }))
}

/// Inverted dropout: each element kept with probability 1 - p and scaled by 1 / (1 - p), else
/// zeroed. `p` in [0, 1); p == 0 returns `x` unchanged without drawing. Same shape and dtype as
/// `x`. The mask comes from `rng` in the order given in the module docs.
pub fn dropout(x: &Tensor, p: f64, rng: &mut Generator) -> Result<Tensor> {
    const OP: &str = "dropout";
    check_p(OP, x, p)?;
    if p == 0.0 {
        return Ok(x.clone());
    }
    masked(OP, x, p, x.elem_count(), 1, rng)
}

/// Drop-path (stochastic depth): each sample along axis 0 is kept whole with probability 1 - p
/// and scaled by 1 / (1 - p), else zeroed. `x` of rank >= 1, `p` in [0, 1); p == 0 returns `x`
/// unchanged without drawing. One uniform per sample (see the module docs).
pub fn drop_path(x: &Tensor, p: f64, rng: &mut Generator) -> Result<Tensor> {
    const OP: &str = "drop_path";
    check_p(OP, x, p)?;
    let Some(&samples) = x.dims().first() else {
        return Err(Error::shape(
            OP,
            format!("input of shape {}", x.shape()),
            "a tensor [N, ...] of rank >= 1",
        ));
    };
    if p == 0.0 {
        return Ok(x.clone());
    }
    let per_sample = x.dims()[1..].iter().product();
    masked(OP, x, p, samples, per_sample, rng)
}
