//! The tensor: shape + dtype + device + storage, plus its place on the autograd tape.
//!
//! A `Tensor` is a cheap handle (`Arc`); clones share everything. Storage is dense and row-major
//! and may be shared between tensors (reshape and detach share it; every other op writes a new
//! buffer). It sits behind a lock because optimizers update parameters in place.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::bf16;
use mvar_cuda::{HostData, HostVec};

use crate::autograd::{GradEdge, Leaf};
use crate::rng::Generator;
use crate::{CpuStorage, DType, Device, Error, Result, Shape, Storage, WithDType};

/// Identifies a tensor handle (clones share it; reshape/detach/with_grad make a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

static NEXT_TENSOR_ID: AtomicU64 = AtomicU64::new(1);

impl TensorId {
    fn fresh() -> Self {
        TensorId(NEXT_TENSOR_ID.fetch_add(1, Ordering::Relaxed))
    }
}

#[derive(Clone)]
pub struct Tensor(Arc<TensorInner>);

struct TensorInner {
    id: TensorId,
    shape: Shape,
    dtype: DType,
    device: Device,
    storage: Arc<RwLock<Storage>>,
    grad_edge: Option<GradEdge>,
}

impl Tensor {
    // ------------------------------------------------------------------------------------------
    // construction

    /// Wraps a storage; its length must equal the shape's element count.
    pub fn from_storage(
        storage: Storage,
        shape: impl Into<Shape>,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        if storage.len() != shape.elem_count() {
            return Err(Error::shape(
                "from_storage",
                format!("{} elements for shape {shape}", storage.len()),
                format!("{} elements", shape.elem_count()),
            ));
        }
        match (&storage, device) {
            (Storage::Cpu(_), Device::Cpu) | (Storage::Cuda(_), Device::Cuda(_)) => {}
            _ => {
                return Err(Error::DeviceMismatch {
                    op: "from_storage",
                    got: format!(
                        "{} storage",
                        if matches!(storage, Storage::Cpu(_)) {
                            "cpu"
                        } else {
                            "cuda"
                        }
                    ),
                    expected: format!("storage on {device}"),
                })
            }
        }
        Ok(Tensor(Arc::new(TensorInner {
            id: TensorId::fresh(),
            dtype: storage.dtype(),
            shape,
            device: device.clone(),
            storage: Arc::new(RwLock::new(storage)),
            grad_edge: None,
        })))
    }

    /// A tensor from host elements, copied to `device`.
    pub fn from_cpu(cpu: CpuStorage, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let storage = match device {
            Device::Cpu => Storage::Cpu(cpu),
            Device::Cuda(d) => Storage::Cuda(upload(d, &cpu)?),
        };
        Tensor::from_storage(storage, shape, device)
    }

    /// A tensor from a vector of elements.
    pub fn from_vec<T: WithDType>(
        data: Vec<T>,
        shape: impl Into<Shape>,
        device: &Device,
    ) -> Result<Tensor> {
        Tensor::from_cpu(T::into_storage(data), shape, device)
    }

    /// A tensor from a slice of elements.
    pub fn from_slice<T: WithDType>(
        data: &[T],
        shape: impl Into<Shape>,
        device: &Device,
    ) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape, device)
    }

    /// A one-element tensor of shape [].
    pub fn scalar(value: f64, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::full(value, (), dtype, device)
    }

    pub fn full(
        value: f64,
        shape: impl Into<Shape>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        match device {
            Device::Cuda(d) => {
                let kind = cuda_kind(dtype, "full")?;
                let n = shape.elem_count();
                Tensor::from_storage(
                    Storage::Cuda(mvar_cuda::ops::elementwise::fill(d, kind, n, value as f32)?),
                    shape,
                    device,
                )
            }
            _ => Tensor::from_cpu(
                CpuStorage::full(dtype, shape.elem_count(), value),
                shape,
                device,
            ),
        }
    }

    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::full(0.0, shape, dtype, device)
    }

    pub fn ones(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::full(1.0, shape, dtype, device)
    }

    pub fn zeros_like(t: &Tensor) -> Result<Tensor> {
        Tensor::zeros(t.shape().clone(), t.dtype(), t.device())
    }

    pub fn ones_like(t: &Tensor) -> Result<Tensor> {
        Tensor::ones(t.shape().clone(), t.dtype(), t.device())
    }

    /// start, start + step, ... below `end` (a 1-D tensor).
    pub fn arange(
        start: f64,
        end: f64,
        step: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if step == 0.0 || !step.is_finite() || (end - start) / step < 0.0 {
            return Err(Error::invalid(
                "arange",
                format!("start {start}, end {end}, step {step}: expected a nonzero step that moves from start towards end"),
            ));
        }
        let n = ((end - start) / step).ceil().max(0.0) as usize;
        let values: Vec<f64> = (0..n).map(|i| start + step * i as f64).collect();
        Tensor::from_cpu(CpuStorage::F64(values).to_dtype(dtype), n, device)
    }

    /// Values from N(mean, std^2) drawn from `rng` (see [`crate::rng`] for the exact stream).
    pub fn randn(
        shape: impl Into<Shape>,
        mean: f64,
        std: f64,
        dtype: DType,
        device: &Device,
        rng: &mut Generator,
    ) -> Result<Tensor> {
        let shape = shape.into();
        if !dtype.is_float() {
            return Err(Error::dtype("randn", dtype, "a float dtype"));
        }
        let values = rng.normal(shape.elem_count(), mean, std);
        Tensor::from_cpu(CpuStorage::F64(values).to_dtype(dtype), shape, device)
    }

    /// Values uniform in (lo, hi) drawn from `rng`.
    pub fn rand_uniform(
        shape: impl Into<Shape>,
        lo: f64,
        hi: f64,
        dtype: DType,
        device: &Device,
        rng: &mut Generator,
    ) -> Result<Tensor> {
        let shape = shape.into();
        if !dtype.is_float() {
            return Err(Error::dtype("rand_uniform", dtype, "a float dtype"));
        }
        let values = rng.uniform(shape.elem_count(), lo, hi);
        Tensor::from_cpu(CpuStorage::F64(values).to_dtype(dtype), shape, device)
    }

    // ------------------------------------------------------------------------------------------
    // accessors

    pub fn id(&self) -> TensorId {
        self.0.id
    }

    pub fn shape(&self) -> &Shape {
        &self.0.shape
    }

    pub fn dims(&self) -> &[usize] {
        self.0.shape.dims()
    }

    pub fn rank(&self) -> usize {
        self.0.shape.rank()
    }

    /// Size of axis `axis` (negative counts from the end).
    pub fn dim(&self, axis: isize) -> Result<usize> {
        Ok(self.dims()[self.0.shape.axis("dim", axis)?])
    }

    pub fn elem_count(&self) -> usize {
        self.0.shape.elem_count()
    }

    pub fn dtype(&self) -> DType {
        self.0.dtype
    }

    pub fn device(&self) -> &Device {
        &self.0.device
    }

    /// Read access to the elements. Recursive reads are fine (an op may read the same storage
    /// twice, as in `x * x`); do not hold it across a call that writes this tensor.
    pub fn storage(&self) -> RwLockReadGuard<'_, Storage> {
        self.0.storage.read_recursive()
    }

    /// Write access to the elements, for in-place updates (optimizers). Every tensor that shares
    /// this storage (reshapes, detached copies) sees the change.
    pub fn storage_mut(&self) -> RwLockWriteGuard<'_, Storage> {
        self.0.storage.write()
    }

    /// How many tensor handles (including ones saved on the tape) share this storage; lets
    /// tests check that backward releases what it saved.
    pub fn storage_handle_count(&self) -> usize {
        Arc::strong_count(&self.0.storage)
    }

    /// True when both handles read the same buffer.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0.storage, &other.0.storage)
    }

    // ------------------------------------------------------------------------------------------
    // reading back

    /// The elements as a `Vec<T>` (copied from the GPU if needed); `T` must match the dtype.
    pub fn to_vec<T: WithDType>(&self) -> Result<Vec<T>> {
        let cpu = self.to_cpu_storage()?;
        Ok(cpu.as_slice::<T>("to_vec")?.to_vec())
    }

    /// The elements converted to f64, whatever the dtype.
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        Ok(self.to_cpu_storage()?.to_f64_vec())
    }

    /// The elements converted to f32, whatever the dtype.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        Ok(self.to_cpu_storage()?.to_f32_vec())
    }

    /// The one element of a one-element tensor.
    pub fn to_scalar<T: WithDType>(&self) -> Result<T> {
        if self.elem_count() != 1 {
            return Err(Error::shape(
                "to_scalar",
                self.shape().to_string(),
                "a tensor with exactly one element",
            ));
        }
        Ok(self.to_vec::<T>()?[0])
    }

    /// The one element of a one-element tensor, as f64.
    pub fn to_f64(&self) -> Result<f64> {
        if self.elem_count() != 1 {
            return Err(Error::shape(
                "to_f64",
                self.shape().to_string(),
                "a tensor with exactly one element",
            ));
        }
        Ok(self.to_vec_f64()?[0])
    }

    /// A host copy of the storage.
    pub fn to_cpu_storage(&self) -> Result<CpuStorage> {
        match (&*self.storage(), self.device()) {
            (Storage::Cpu(c), _) => Ok(c.clone()),
            (Storage::Cuda(b), Device::Cuda(d)) => Ok(match d.download(b)? {
                HostVec::F32(v) => CpuStorage::F32(v),
                HostVec::BF16(v) => CpuStorage::BF16(v),
                HostVec::I64(v) => CpuStorage::I64(v),
                HostVec::U8(v) => CpuStorage::U8(v),
            }),
            (Storage::Cuda(_), Device::Cpu) => Err(Error::DeviceMismatch {
                op: "to_cpu_storage",
                got: "cuda storage on a cpu tensor".into(),
                expected: "storage on the tensor's device".into(),
            }),
        }
    }

    // ------------------------------------------------------------------------------------------
    // autograd

    pub(crate) fn grad_edge(&self) -> Option<GradEdge> {
        self.0.grad_edge.clone()
    }

    pub(crate) fn with_grad_edge(&self, edge: GradEdge) -> Tensor {
        Tensor(Arc::new(TensorInner {
            id: TensorId::fresh(),
            shape: self.0.shape.clone(),
            dtype: self.0.dtype,
            device: self.0.device.clone(),
            storage: self.0.storage.clone(),
            grad_edge: Some(edge),
        }))
    }

    /// True when gradients flow into or through this tensor.
    pub fn requires_grad(&self) -> bool {
        self.0.grad_edge.is_some()
    }

    /// True for a tensor made by [`Tensor::with_grad`] (a leaf that receives gradients).
    pub fn is_leaf(&self) -> bool {
        matches!(self.0.grad_edge, Some(GradEdge::Leaf(_)))
    }

    /// A new leaf that shares this tensor's storage and receives gradients.
    pub fn with_grad(&self) -> Result<Tensor> {
        self.with_grad_named(None)
    }

    /// Like [`Tensor::with_grad`], with a name (parameters are named for checkpoints).
    pub fn with_grad_named(&self, name: Option<String>) -> Result<Tensor> {
        if !self.dtype().is_float() {
            return Err(Error::dtype(
                "with_grad",
                self.dtype(),
                "a float dtype: only floats have gradients",
            ));
        }
        Ok(self.with_grad_edge(GradEdge::Leaf(Arc::new(Leaf::new(name)))))
    }

    /// The name given to this leaf, if any.
    pub fn name(&self) -> Option<String> {
        match &self.0.grad_edge {
            Some(GradEdge::Leaf(l)) => l.name.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            _ => None,
        }
    }

    /// The gradient accumulated in this leaf, if any.
    pub fn grad(&self) -> Option<Tensor> {
        match &self.0.grad_edge {
            Some(GradEdge::Leaf(l)) => l.grad.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            _ => None,
        }
    }

    /// Replaces this leaf's gradient (used by gradient clipping and tests).
    pub fn set_grad(&self, grad: Option<Tensor>) -> Result<()> {
        match &self.0.grad_edge {
            Some(GradEdge::Leaf(l)) => {
                if let Some(g) = &grad {
                    if g.shape() != self.shape() || g.dtype() != self.dtype() {
                        return Err(Error::shape(
                            "set_grad",
                            format!("{} {}", g.shape(), g.dtype()),
                            format!("{} {}", self.shape(), self.dtype()),
                        ));
                    }
                }
                *l.grad.lock().unwrap_or_else(|e| e.into_inner()) = grad;
                Ok(())
            }
            _ => Err(Error::Autograd(
                "set_grad on a tensor that is not a leaf".into(),
            )),
        }
    }

    /// Clears this leaf's gradient.
    pub fn zero_grad(&self) {
        if let Some(GradEdge::Leaf(l)) = &self.0.grad_edge {
            *l.grad.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// The same values, cut off from the tape (shares storage).
    pub fn detach(&self) -> Tensor {
        Tensor(Arc::new(TensorInner {
            id: TensorId::fresh(),
            shape: self.0.shape.clone(),
            dtype: self.0.dtype,
            device: self.0.device.clone(),
            storage: self.0.storage.clone(),
            grad_edge: None,
        }))
    }

    // ------------------------------------------------------------------------------------------
    // ops that only need the engine

    /// The same elements seen with another shape of equal element count. Free: shares storage.
    /// One axis may be given as `usize::MAX` to be inferred.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let mut dims = shape.into().dims().to_vec();
        let known: usize = dims.iter().filter(|&&d| d != usize::MAX).product();
        let inferred = dims.iter().filter(|&&d| d == usize::MAX).count();
        if inferred > 1 {
            return Err(Error::invalid(
                "reshape",
                "at most one axis can be inferred",
            ));
        }
        if inferred == 1 {
            if known == 0 || !self.elem_count().is_multiple_of(known) {
                return Err(Error::shape(
                    "reshape",
                    format!(
                        "{} ({} elements) into {:?}",
                        self.shape(),
                        self.elem_count(),
                        dims
                    ),
                    "a shape whose known axes divide the element count",
                ));
            }
            let n = self.elem_count() / known;
            dims.iter_mut()
                .filter(|d| **d == usize::MAX)
                .for_each(|d| *d = n);
        }
        let shape = Shape::new(dims);
        if shape.elem_count() != self.elem_count() {
            return Err(Error::shape(
                "reshape",
                format!(
                    "{} ({} elements) into {}",
                    self.shape(),
                    self.elem_count(),
                    shape
                ),
                format!("a shape with {} elements", self.elem_count()),
            ));
        }
        if &shape == self.shape() {
            return Ok(self.clone());
        }
        let out = Tensor(Arc::new(TensorInner {
            id: TensorId::fresh(),
            shape,
            dtype: self.0.dtype,
            device: self.0.device.clone(),
            storage: self.0.storage.clone(),
            grad_edge: None,
        }));
        let in_shape = self.shape().clone();
        Ok(Tensor::record(out, "reshape", &[self], move || {
            move |g: &Tensor| Ok(vec![Some(g.reshape(in_shape)?)])
        }))
    }

    /// Converts the elements to `dtype` (differentiable between float dtypes).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let out = match &*self.storage() {
            Storage::Cpu(c) => Tensor::from_storage(
                Storage::Cpu(c.to_dtype(dtype)),
                self.shape().clone(),
                self.device(),
            )?,
            Storage::Cuda(b) => {
                let Device::Cuda(dev) = self.device() else {
                    return Err(cuda_on_cpu("to_dtype"));
                };
                let kind = cuda_kind(dtype, "to_dtype")?;
                let cast = mvar_cuda::ops::elementwise::cast(dev, b, kind)?;
                Tensor::from_storage(Storage::Cuda(cast), self.shape().clone(), self.device())?
            }
        };
        if !dtype.is_float() || !self.dtype().is_float() {
            return Ok(out);
        }
        let src = self.dtype();
        Ok(Tensor::record(out, "to_dtype", &[self], move || {
            move |g: &Tensor| Ok(vec![Some(g.to_dtype(src)?)])
        }))
    }

    /// Copies the tensor to `device` (differentiable).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let out = Tensor::from_cpu(self.to_cpu_storage()?, self.shape().clone(), device)?;
        let src = self.device().clone();
        Ok(Tensor::record(out, "to_device", &[self], move || {
            move |g: &Tensor| Ok(vec![Some(g.to_device(&src)?)])
        }))
    }

    /// Overwrites this tensor's elements with `src`'s, in place (same shape, dtype and device).
    /// Not recorded on the tape: this is how optimizers and checkpoint loading write parameters.
    pub fn copy_from(&self, src: &Tensor) -> Result<()> {
        if src.shape() != self.shape()
            || src.dtype() != self.dtype()
            || src.device() != self.device()
        {
            return Err(Error::shape(
                "copy_from",
                format!("{} {} {}", src.shape(), src.dtype(), src.device()),
                format!(
                    "{} {} {} (the destination's)",
                    self.shape(),
                    self.dtype(),
                    self.device()
                ),
            ));
        }
        if self.same_storage(src) {
            return Ok(());
        }
        let fresh = match (&*src.storage(), self.device()) {
            (Storage::Cuda(b), Device::Cuda(d)) => Storage::Cuda(d.duplicate(b)?),
            (Storage::Cpu(c), Device::Cpu) => Storage::Cpu(c.clone()),
            _ => return Err(cuda_on_cpu("copy_from")),
        };
        *self.storage_mut() = fresh;
        Ok(())
    }

    /// Elementwise sum of two tensors of one shape and dtype. The tape uses it to add up
    /// gradients, which is why it lives here and not with the other ops.
    pub fn add_same_shape(&self, other: &Tensor) -> Result<Tensor> {
        if self.shape() != other.shape()
            || self.dtype() != other.dtype()
            || self.device() != other.device()
        {
            return Err(Error::shape(
                "add_same_shape",
                format!(
                    "{} {} {} and {} {} {}",
                    self.shape(),
                    self.dtype(),
                    self.device(),
                    other.shape(),
                    other.dtype(),
                    other.device()
                ),
                "two tensors of one shape, dtype and device",
            ));
        }
        let _profile = crate::profile::scope("gradient sum", || {
            format!("{} {}", self.shape(), other.shape())
        });
        let (a, b) = (self.storage(), other.storage());
        let sum = match (&*a, &*b) {
            (Storage::Cpu(x), Storage::Cpu(y)) => match (x, y) {
                (CpuStorage::F32(x), CpuStorage::F32(y)) => CpuStorage::F32(zip_add(x, y)),
                (CpuStorage::F64(x), CpuStorage::F64(y)) => CpuStorage::F64(zip_add(x, y)),
                (CpuStorage::BF16(x), CpuStorage::BF16(y)) => CpuStorage::BF16(
                    x.iter()
                        .zip(y)
                        .map(|(a, b)| bf16::from_f32(a.to_f32() + b.to_f32()))
                        .collect(),
                ),
                (CpuStorage::I64(x), CpuStorage::I64(y)) => CpuStorage::I64(zip_add(x, y)),
                _ => {
                    return Err(Error::dtype(
                        "add_same_shape",
                        self.dtype(),
                        "f32, bf16, f64 or i64",
                    ))
                }
            },
            (Storage::Cuda(x), Storage::Cuda(y)) => {
                let Device::Cuda(dev) = self.device() else {
                    return Err(cuda_on_cpu("add_same_shape"));
                };
                let dims = self.dims();
                let sum = mvar_cuda::ops::elementwise::binary_forward(
                    dev,
                    (x, dims),
                    (y, dims),
                    dims,
                    mvar_cuda::ops::elementwise::binary::ADD,
                )?;
                drop((a, b));
                return Tensor::from_storage(
                    Storage::Cuda(sum),
                    self.shape().clone(),
                    self.device(),
                );
            }
            _ => return Err(cuda_on_cpu("add_same_shape")),
        };
        drop((a, b));
        Tensor::from_storage(Storage::Cpu(sum), self.shape().clone(), self.device())
    }
}

impl Tensor {
    /// `parts` (one dtype and device, equal but for `axis`) concatenated along `axis`: how the
    /// tape joins the gradients of bands that tile a tensor (see [`crate::GradBand`]), which is
    /// why it lives here and not with the concat op.
    pub(crate) fn concat_for_grad(parts: &[&Tensor], axis: usize) -> Result<Tensor> {
        let first = parts[0];
        let mut dims = first.dims().to_vec();
        dims[axis] = parts.iter().map(|p| p.dims()[axis]).sum();
        let shape = Shape::new(dims);
        let _profile = crate::profile::scope("concat", || {
            parts
                .iter()
                .map(|p| p.shape().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        });
        let (outer, _, inner) = first.shape().split_at_axis(axis);
        let sizes: Vec<usize> = parts.iter().map(|p| p.dims()[axis]).collect();
        let storages: Vec<_> = parts.iter().map(|p| p.storage()).collect();
        let joined = match first.device() {
            Device::Cpu => {
                let cpu: Vec<&CpuStorage> = storages
                    .iter()
                    .map(|s| match &**s {
                        Storage::Cpu(c) => Ok(c),
                        _ => Err(cuda_on_cpu("concat")),
                    })
                    .collect::<Result<_>>()?;
                macro_rules! join_as {
                    ($variant:ident) => {{
                        let xs: Vec<&[_]> = cpu
                            .iter()
                            .map(|c| match c {
                                CpuStorage::$variant(v) => Ok(v.as_slice()),
                                other => Err(Error::dtype("concat", other.dtype(), "one dtype")),
                            })
                            .collect::<Result<_>>()?;
                        CpuStorage::$variant(crate::cpu::concat_along(&xs, outer, &sizes, inner))
                    }};
                }
                Storage::Cpu(match cpu[0] {
                    CpuStorage::F32(_) => join_as!(F32),
                    CpuStorage::BF16(_) => join_as!(BF16),
                    CpuStorage::F64(_) => join_as!(F64),
                    CpuStorage::I64(_) => join_as!(I64),
                    CpuStorage::U8(_) => join_as!(U8),
                })
            }
            Device::Cuda(dev) => {
                let bufs: Vec<&mvar_cuda::CudaBuffer> = storages
                    .iter()
                    .map(|s| match &**s {
                        Storage::Cuda(b) => Ok(b),
                        _ => Err(cuda_on_cpu("concat")),
                    })
                    .collect::<Result<_>>()?;
                Storage::Cuda(mvar_cuda::ops::index::concat(
                    dev, &bufs, outer, &sizes, inner,
                )?)
            }
        };
        drop(storages);
        Tensor::from_storage(joined, shape, first.device())
    }
}

fn zip_add<T: Copy + std::ops::Add<Output = T> + Send + Sync>(x: &[T], y: &[T]) -> Vec<T> {
    use rayon::prelude::*;
    if x.len() >= crate::cpu::PARALLEL_MIN_ELEMS {
        x.par_iter().zip(y).map(|(&a, &b)| a + b).collect()
    } else {
        x.iter().zip(y).map(|(&a, &b)| a + b).collect()
    }
}

/// A tensor whose storage is not on its own device: an internal inconsistency, reported rather
/// than trusted.
fn cuda_on_cpu(op: &'static str) -> Error {
    Error::DeviceMismatch {
        op,
        got: "storage on another device than the tensor".into(),
        expected: "storage on the tensor's device".into(),
    }
}

fn upload(device: &mvar_cuda::CudaDevice, cpu: &CpuStorage) -> Result<mvar_cuda::CudaBuffer> {
    Ok(match cpu {
        CpuStorage::F32(v) => device.upload(HostData::F32(v))?,
        CpuStorage::BF16(v) => device.upload(HostData::BF16(v))?,
        CpuStorage::I64(v) => device.upload(HostData::I64(v))?,
        CpuStorage::U8(v) => device.upload(HostData::U8(v))?,
        CpuStorage::F64(_) => {
            return Err(Error::Unsupported {
                op: "to_device",
                msg: "f64 tensors live on the CPU only (they exist for gradient checks); convert to f32 first".into(),
            })
        }
    })
}

fn cuda_kind(dtype: DType, op: &'static str) -> Result<mvar_cuda::BufferKind> {
    Ok(match dtype {
        DType::F32 => mvar_cuda::BufferKind::F32,
        DType::BF16 => mvar_cuda::BufferKind::BF16,
        DType::I64 => mvar_cuda::BufferKind::I64,
        DType::U8 => mvar_cuda::BufferKind::U8,
        DType::F64 => {
            return Err(Error::Unsupported {
                op,
                msg: "f64 tensors live on the CPU only".into(),
            })
        }
    })
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor{} {} {}{}",
            self.shape(),
            self.dtype(),
            self.device(),
            if self.requires_grad() {
                " requires_grad"
            } else {
                ""
            }
        )
    }
}

impl fmt::Display for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)?;
        if let Ok(v) = self.to_vec_f64() {
            let shown: Vec<String> = v.iter().take(8).map(|x| format!("{x:.5}")).collect();
            write!(
                f,
                " [{}{}]",
                shown.join(", "),
                if v.len() > 8 { ", ..." } else { "" }
            )?;
        }
        Ok(())
    }
}
