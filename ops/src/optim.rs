//! AdamW with decoupled weight decay, and global-norm gradient clipping.
//!
//! AdamW follows PyTorch's `torch.optim.AdamW` update, in this order, for step t (from 1):
//!   p <- p * (1 - lr * wd)                       (skipped for parameters in the no-decay set)
//!   m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
//!   p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! Parameters are updated in place (every tensor sharing their storage sees the new values); the
//! moments are kept in the parameter's dtype, which is f32 for training (f32 master weights) and
//! f64 only in tests. The no-decay set is given by parameter name, so that a model can apply the
//! official VAR rule (biases, 1-D tensors, embeddings ...) without the optimizer knowing it.

use std::collections::{BTreeMap, HashSet};

use mvar_engine::{CpuStorage, Error, Float, ParamStore, Result, Storage, Tensor};
use rayon::prelude::*;

use crate::elementwise::mul_scalar;
use crate::util::no_cuda_kernel;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults except the betas, which are VAR's (0.9, 0.95).
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.05,
        }
    }
}

/// First and second moments of one parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub m: CpuStorage,
    pub v: CpuStorage,
}

#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    step: u64,
    no_decay: HashSet<String>,
    /// Moments by parameter name; created at the first step a parameter has a gradient.
    state: BTreeMap<String, Moments>,
}

impl AdamW {
    /// An optimizer for `params`; `no_decay(name, param)` says which parameters get no weight
    /// decay.
    pub fn new(
        params: &ParamStore,
        config: AdamWConfig,
        no_decay: impl Fn(&str, &Tensor) -> bool,
    ) -> Result<Self> {
        config.validate()?;
        let no_decay = params
            .iter()
            .filter(|(n, t)| no_decay(n, t))
            .map(|(n, _)| n.to_string())
            .collect();
        Ok(AdamW {
            config,
            step: 0,
            no_decay,
            state: BTreeMap::new(),
        })
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Names of the parameters without weight decay.
    pub fn no_decay(&self) -> &HashSet<String> {
        &self.no_decay
    }

    /// The moments of every parameter that has them (for checkpoints).
    pub fn state(&self) -> &BTreeMap<String, Moments> {
        &self.state
    }

    /// Restores the step count and moments saved by a checkpoint.
    pub fn load_state(&mut self, step: u64, state: BTreeMap<String, Moments>) {
        self.step = step;
        self.state = state;
    }

    /// Applies one update to every parameter that has a gradient.
    pub fn step(&mut self, params: &ParamStore) -> Result<()> {
        self.config.validate()?;
        self.step += 1;
        let t = self.step as i32;
        let c = &self.config;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for (name, p) in params.iter() {
            let Some(g) = p.grad() else { continue };
            let decay = if self.no_decay.contains(name) {
                0.0
            } else {
                c.weight_decay
            };
            let hyper = Hyper {
                decay: 1.0 - c.lr * decay,
                beta1: c.beta1,
                beta2: c.beta2,
                step_size: c.lr / bias1,
                bias2_sqrt,
                eps: c.eps,
            };
            let grad = g.to_cpu_storage()?;
            let moments = match self.state.remove(name) {
                Some(m) => m,
                None => Moments {
                    m: CpuStorage::full(p.dtype(), p.elem_count(), 0.0),
                    v: CpuStorage::full(p.dtype(), p.elem_count(), 0.0),
                },
            };
            let moments = update_in_place(name, p, &grad, moments, &hyper)?;
            self.state.insert(name.to_string(), moments);
        }
        Ok(())
    }
}

impl AdamWConfig {
    fn validate(&self) -> Result<()> {
        let ok = self.lr >= 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps > 0.0
            && self.weight_decay >= 0.0
            && [self.lr, self.eps, self.weight_decay]
                .iter()
                .all(|v| v.is_finite());
        if !ok {
            return Err(Error::invalid(
                "AdamW",
                format!("{self:?}: expected lr >= 0, betas in [0, 1), eps > 0, weight_decay >= 0, all finite"),
            ));
        }
        Ok(())
    }
}

struct Hyper {
    decay: f64,
    beta1: f64,
    beta2: f64,
    step_size: f64,
    bias2_sqrt: f64,
    eps: f64,
}

fn update_in_place(
    name: &str,
    p: &Tensor,
    grad: &CpuStorage,
    mut mo: Moments,
    h: &Hyper,
) -> Result<Moments> {
    let mut storage = p.storage_mut();
    let param = match &mut *storage {
        Storage::Cpu(c) => c,
        Storage::Cuda(_) => return Err(no_cuda_kernel("AdamW")),
    };
    match (param, grad, &mut mo.m, &mut mo.v) {
        (CpuStorage::F32(p), CpuStorage::F32(g), CpuStorage::F32(m), CpuStorage::F32(v)) => adamw_kernel(p, g, m, v, h),
        (CpuStorage::F64(p), CpuStorage::F64(g), CpuStorage::F64(m), CpuStorage::F64(v)) => adamw_kernel(p, g, m, v, h),
        (param, ..) => {
            return Err(Error::DTypeMismatch {
                op: "AdamW",
                got: format!("parameter {name:?} of dtype {} with a {} gradient", param.dtype(), grad.dtype()),
                expected: "f32 (or f64) parameters with gradients and moments of the same dtype; keep master weights in f32".into(),
            })
        }
    }
    Ok(mo)
}

/// The fused update of one parameter (the CUDA version does all parameters in one launch).
fn adamw_kernel<T: Float>(p: &mut [T], g: &[T], m: &mut [T], v: &mut [T], h: &Hyper) {
    let decay = T::from_f64(h.decay);
    let (b1, b2) = (T::from_f64(h.beta1), T::from_f64(h.beta2));
    let (one_b1, one_b2) = (T::from_f64(1.0 - h.beta1), T::from_f64(1.0 - h.beta2));
    let step_size = T::from_f64(h.step_size);
    let bias2_sqrt = T::from_f64(h.bias2_sqrt);
    let eps = T::from_f64(h.eps);
    let update = |(((p, &g), m), v): (((&mut T, &T), &mut T), &mut T)| {
        *p = *p * decay;
        *m = b1 * *m + one_b1 * g;
        *v = b2 * *v + one_b2 * g * g;
        let denom = v.sqrt() / bias2_sqrt + eps;
        *p = *p - step_size * *m / denom;
    };
    if p.len() >= mvar_engine::cpu::PARALLEL_MIN_ELEMS {
        p.par_iter_mut()
            .zip(g.par_iter())
            .zip(m.par_iter_mut())
            .zip(v.par_iter_mut())
            .for_each(update);
    } else {
        p.iter_mut()
            .zip(g.iter())
            .zip(m.iter_mut())
            .zip(v.iter_mut())
            .for_each(update);
    }
}

/// Scales all gradients together so that their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does (coefficient max_norm / (norm + 1e-6), capped at 1).
/// Returns the norm before clipping. A non-finite norm is returned as is and the gradients are
/// left untouched, so the caller can stop on a NaN/inf loss with the evidence intact.
pub fn clip_grad_norm(params: &ParamStore, max_norm: f64) -> Result<f64> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(Error::invalid(
            "clip_grad_norm",
            format!("max_norm {max_norm}: expected > 0"),
        ));
    }
    let grads: Vec<Tensor> = params.iter().filter_map(|(_, p)| p.grad()).collect();
    let mut sum_sq = 0.0f64;
    for g in &grads {
        // One host pass per gradient on the CPU; the CUDA version reduces on the device and
        // reads back one number.
        sum_sq += g.to_vec_f64()?.iter().map(|x| x * x).sum::<f64>();
    }
    let norm = sum_sq.sqrt();
    if !norm.is_finite() {
        return Ok(norm);
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for (_, p) in params.iter() {
            if let Some(g) = p.grad() {
                p.set_grad(Some(mul_scalar(&g, coef)?))?;
            }
        }
    }
    Ok(norm)
}
