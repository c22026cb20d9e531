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
//!
//! On CUDA the parameters (f32 master weights) are updated by one fused launch per step for all
//! of them (`optim.cu`), with f32 moments that stay on the device; [`AdamW::state`] copies them
//! to the host for a checkpoint and [`AdamW::load_state`] takes host moments back (they go to
//! the device at the next step). Clipping reduces every CUDA gradient on the device and reads
//! back one number.

use std::collections::{BTreeMap, HashSet};

use mvar_engine::cuda::ops::optim as cuda_optim;
use mvar_engine::cuda::{BufferKind, CudaBuffer, CudaDevice, HostData, HostVec};
use mvar_engine::{CpuStorage, DType, Device, Error, Float, ParamStore, Result, Storage, Tensor};
use rayon::prelude::*;

use crate::elementwise::mul_scalar;
use crate::util::{in_widest_vectors, lane_sum, no_cuda_kernel};

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

/// First and second moments of one parameter, in host memory: the moments of CPU parameters,
/// and the checkpoint form of every parameter's moments.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub m: CpuStorage,
    pub v: CpuStorage,
}

/// Where the moments of one parameter live: with a CPU parameter in host memory, with a CUDA
/// parameter in f32 device buffers on its GPU (moments loaded from a checkpoint stay on the host
/// until the parameter's next step).
#[derive(Debug)]
enum Slot {
    Host(Moments),
    Device {
        dev: CudaDevice,
        m: CudaBuffer,
        v: CudaBuffer,
    },
}

impl Slot {
    /// The moments in host memory (a copy from the GPU for device moments).
    fn to_host(&self) -> Result<Moments> {
        Ok(match self {
            Slot::Host(mo) => mo.clone(),
            Slot::Device { dev, m, v } => Moments {
                m: host_f32(dev.download(m)?),
                v: host_f32(dev.download(v)?),
            },
        })
    }
}

fn host_f32(h: HostVec) -> CpuStorage {
    match h {
        HostVec::F32(v) => CpuStorage::F32(v),
        HostVec::BF16(v) => CpuStorage::BF16(v),
        HostVec::I64(v) => CpuStorage::I64(v),
        HostVec::U8(v) => CpuStorage::U8(v),
    }
}

#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    step: u64,
    no_decay: HashSet<String>,
    /// Moments by parameter name; created at the first step a parameter has a gradient.
    state: BTreeMap<String, Slot>,
}

/// A CUDA parameter with a gradient, waiting for the fused step.
struct CudaItem {
    name: String,
    param: Tensor,
    grad: Tensor,
    decay: bool,
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

    /// Host copies of the moments of every parameter that has them (for checkpoints); the
    /// moments of CUDA parameters are copied from the GPU (f32).
    pub fn state(&self) -> Result<BTreeMap<String, Moments>> {
        self.state
            .iter()
            .map(|(name, slot)| Ok((name.clone(), slot.to_host()?)))
            .collect()
    }

    /// Number of parameters that have moments.
    pub fn state_len(&self) -> usize {
        self.state.len()
    }

    /// Restores the step count and moments saved by a checkpoint. The moments of a CUDA
    /// parameter (f32, its element count) are copied to its GPU at its next step.
    pub fn load_state(&mut self, step: u64, state: BTreeMap<String, Moments>) {
        self.step = step;
        self.state = state
            .into_iter()
            .map(|(name, mo)| (name, Slot::Host(mo)))
            .collect();
    }

    /// Applies one update to every parameter that has a gradient.
    pub fn step(&mut self, params: &ParamStore) -> Result<()> {
        self.config.validate()?;
        self.step += 1;
        let t = self.step as i32;
        let c = &self.config;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let mut on_gpu = Vec::new();
        for (name, p) in params.iter() {
            let Some(g) = p.grad() else { continue };
            if p.device().is_cuda() {
                on_gpu.push(CudaItem {
                    name: name.to_string(),
                    param: p.clone(),
                    grad: g,
                    decay: !self.no_decay.contains(name),
                });
                continue;
            }
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
            let moments = match self.state.remove(name) {
                // Host moments move out and back in (`to_host` would copy them).
                Some(Slot::Host(mo)) => mo,
                Some(slot) => slot.to_host()?,
                None => Moments {
                    m: CpuStorage::full(p.dtype(), p.elem_count(), 0.0),
                    v: CpuStorage::full(p.dtype(), p.elem_count(), 0.0),
                },
            };
            // The gradient is read in place rather than copied every step, unless it shares
            // the parameter's storage: then the parameter's write lock would wait on the
            // gradient's read lock for ever.
            let moments = if g.same_storage(p) || !g.device().is_cpu() {
                update_in_place(name, p, &g.to_cpu_storage()?, moments, &hyper)?
            } else {
                let guard = g.storage();
                let Storage::Cpu(grad) = &*guard else {
                    return Err(Error::DeviceMismatch {
                        op: "AdamW",
                        got: format!("device storage in the CPU gradient of {name:?}"),
                        expected: "storage on the tensor's device".into(),
                    });
                };
                update_in_place(name, p, grad, moments, &hyper)?
            };
            self.state.insert(name.to_string(), Slot::Host(moments));
        }
        if !on_gpu.is_empty() {
            // Rounded from f64 exactly as `adamw_kernel` rounds its constants for f32.
            let hyper = cuda_optim::AdamWHyper {
                decay: (1.0 - c.lr * c.weight_decay) as f32,
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                one_minus_beta1: (1.0 - c.beta1) as f32,
                one_minus_beta2: (1.0 - c.beta2) as f32,
                step_size: (c.lr / bias1) as f32,
                bias2_sqrt: bias2_sqrt as f32,
                eps: c.eps as f32,
            };
            for (dev, items) in by_device(on_gpu, |it| &it.param) {
                self.step_cuda(&dev, &items, &hyper)?;
            }
        }
        Ok(())
    }

    /// The fused update of the CUDA parameters of one GPU: checks, moments on the device, one
    /// launch.
    fn step_cuda(
        &mut self,
        dev: &CudaDevice,
        items: &[CudaItem],
        hyper: &cuda_optim::AdamWHyper,
    ) -> Result<()> {
        for it in items {
            if it.param.dtype() != DType::F32 {
                return Err(Error::DTypeMismatch {
                    op: "AdamW",
                    got: format!(
                        "parameter {:?} of dtype {} on {}",
                        it.name,
                        it.param.dtype(),
                        it.param.device()
                    ),
                    expected: "f32 master weights on the GPU (f32 or bf16 gradients)".into(),
                });
            }
            if it.grad.device() != it.param.device() {
                return Err(Error::DeviceMismatch {
                    op: "AdamW",
                    got: format!(
                        "parameter {:?} on {} with a gradient on {}",
                        it.name,
                        it.param.device(),
                        it.grad.device()
                    ),
                    expected: "the gradient on the parameter's device".into(),
                });
            }
            self.ensure_device_moments(dev, &it.name, it.param.elem_count())?;
        }
        // Read locks for the duration of the table build and the launch: no storage can be
        // swapped out from under the pointers. The kernel's in-place writes are ordered on the
        // one stream with every other use of these buffers.
        let guards: Vec<_> = items
            .iter()
            .map(|it| (it.param.storage(), it.grad.storage()))
            .collect();
        let mut tensors = Vec::with_capacity(items.len());
        for (it, (p, g)) in items.iter().zip(&guards) {
            let (Storage::Cuda(param), Storage::Cuda(grad)) = (&**p, &**g) else {
                return Err(Error::DeviceMismatch {
                    op: "AdamW",
                    got: format!("host storage in the CUDA parameter {:?}", it.name),
                    expected: "storage on the tensor's device".into(),
                });
            };
            let Some(Slot::Device { m, v, .. }) = self.state.get(&it.name) else {
                return Err(Error::invalid(
                    "AdamW",
                    "moments missing after their upload",
                ));
            };
            tensors.push(cuda_optim::AdamWTensor {
                param,
                grad,
                m,
                v,
                decay: it.decay,
            });
        }
        cuda_optim::adamw_step(dev, &tensors, hyper)?;
        Ok(())
    }

    /// Makes the moments of `name` f32 device buffers of `n` elements on `dev`: zeros at the
    /// first step, an upload of host moments (loaded from a checkpoint, or from steps taken on
    /// the CPU), or a move from another GPU. Leaves the state unchanged on error.
    fn ensure_device_moments(&mut self, dev: &CudaDevice, name: &str, n: usize) -> Result<()> {
        let host = match self.state.get(name) {
            None => None,
            Some(Slot::Device { dev: d, m, v }) if d == dev && m.len() == n && v.len() == n => {
                return Ok(())
            }
            Some(slot) => Some(slot.to_host()?),
        };
        let (m, v) = match host {
            None => (
                dev.zeros(BufferKind::F32, n)?,
                dev.zeros(BufferKind::F32, n)?,
            ),
            Some(Moments {
                m: CpuStorage::F32(m),
                v: CpuStorage::F32(v),
            }) if m.len() == n && v.len() == n => (
                dev.upload(HostData::F32(&m))?,
                dev.upload(HostData::F32(&v))?,
            ),
            Some(mo) => {
                return Err(Error::DTypeMismatch {
                    op: "AdamW",
                    got: format!(
                        "moments of {name:?}: {} [{}] and {} [{}]",
                        mo.m.dtype(),
                        mo.m.len(),
                        mo.v.dtype(),
                        mo.v.len()
                    ),
                    expected: format!("f32 moments of {n} elements for a CUDA parameter"),
                })
            }
        };
        self.state.insert(
            name.to_string(),
            Slot::Device {
                dev: dev.clone(),
                m,
                v,
            },
        );
        Ok(())
    }
}

/// Items grouped by the GPU their tensor lives on, in order of first appearance.
fn by_device<T>(items: Vec<T>, tensor: impl Fn(&T) -> &Tensor) -> Vec<(CudaDevice, Vec<T>)> {
    let mut groups: Vec<(CudaDevice, Vec<T>)> = Vec::new();
    for it in items {
        let Device::Cuda(dev) = tensor(&it).device().clone() else {
            continue;
        };
        match groups.iter_mut().find(|(d, _)| *d == dev) {
            Some((_, v)) => v.push(it),
            None => groups.push((dev, vec![it])),
        }
    }
    groups
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
    // Chunks of slices, each a plain loop in the widest vectors: rayon's per-element zip did
    // not vectorise (its sqrt and two divisions per element ran one at a time, 3x slower than
    // PyTorch's fused CPU AdamW). Every element gets the same IEEE operations either way.
    let update = |p: &mut [T], g: &[T], m: &mut [T], v: &mut [T]| {
        in_widest_vectors(
            #[inline(always)]
            || {
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *p = *p * decay;
                    *m = b1 * *m + one_b1 * g;
                    *v = b2 * *v + one_b2 * g * g;
                    let denom = v.sqrt() / bias2_sqrt + eps;
                    *p = *p - step_size * *m / denom;
                }
            },
        )
    };
    const CHUNK: usize = 16 * 1024;
    if p.len() >= mvar_engine::cpu::PARALLEL_MIN_ELEMS {
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| update(p, g, m, v));
    } else {
        update(p, g, m, v);
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
    let mut on_gpu = Vec::new();
    for g in &grads {
        if g.device().is_cuda() {
            on_gpu.push(g.clone());
            continue;
        }
        // One host pass per gradient on the CPU, over its own storage (no f64 copy); the CUDA
        // version reduces on the device and reads back one number.
        let square = |x: f64| x * x;
        sum_sq += match &*g.storage() {
            Storage::Cpu(CpuStorage::F32(v)) => lane_sum(v, |x| square(x as f64)),
            Storage::Cpu(CpuStorage::F64(v)) => lane_sum(v, square),
            Storage::Cpu(CpuStorage::BF16(v)) => lane_sum(v, |x| square(x.to_f64())),
            other => {
                return Err(Error::invalid(
                    "clip_grad_norm",
                    format!(
                        "a gradient of dtype {:?} on the host: expected f32, f64 or bf16",
                        other.dtype()
                    ),
                ))
            }
        };
    }
    for (dev, gs) in by_device(on_gpu, |g| g) {
        let guards: Vec<_> = gs.iter().map(|g| g.storage()).collect();
        let bufs = guards
            .iter()
            .map(|s| match &**s {
                Storage::Cuda(b) => Ok(b),
                Storage::Cpu(_) => Err(Error::DeviceMismatch {
                    op: "clip_grad_norm",
                    got: "host storage in a CUDA gradient".into(),
                    expected: "storage on the tensor's device".into(),
                }),
            })
            .collect::<Result<Vec<&CudaBuffer>>>()?;
        sum_sq += cuda_optim::sum_of_squares(&dev, &bufs)?;
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
