//! Building blocks shared by the models: a parameter builder that registers leaves under their
//! official state-dict names, and the layers (conv, linear, group norm, embedding).

use std::cell::RefCell;
use std::rc::Rc;

use mvar_engine::{DType, Device, Generator, ParamStore, Result, Shape, Tensor};
use mvar_ops as ops;

/// How a parameter starts.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    Zeros,
    Ones,
    /// N(0, std^2); `trunc_normal_(std=..)` with PyTorch's default +-2 absolute bounds is this
    /// in practice for the small stds the models use.
    Normal(f64),
    /// U(-bound, bound): PyTorch's default for Conv2d/Linear weights (kaiming_uniform with
    /// a = sqrt(5) gives bound = 1/sqrt(fan_in)) and biases (also 1/sqrt(fan_in)).
    Uniform(f64),
    Value(f64),
}

struct BuilderInner {
    params: ParamStore,
    buffers: Vec<(String, Tensor)>,
    rng: Generator,
    device: Device,
    dtype: DType,
}

/// Registers parameters under dotted names (`encoder.down.0.block.1.conv2.weight`).
#[derive(Clone)]
pub struct Builder {
    inner: Rc<RefCell<BuilderInner>>,
    prefix: String,
}

impl Builder {
    pub fn new(device: &Device, dtype: DType, seed: u64) -> Self {
        Builder {
            inner: Rc::new(RefCell::new(BuilderInner {
                params: ParamStore::new(),
                buffers: Vec::new(),
                rng: Generator::new(seed),
                device: device.clone(),
                dtype,
            })),
            prefix: String::new(),
        }
    }

    /// A builder for the sub-module `name` (`pp` as in "push prefix").
    pub fn pp(&self, name: impl std::fmt::Display) -> Builder {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Builder {
            inner: self.inner.clone(),
            prefix,
        }
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    fn init_tensor(&self, shape: &Shape, init: Init) -> Result<Tensor> {
        let mut inner = self.inner.borrow_mut();
        let (device, dtype) = (inner.device.clone(), inner.dtype);
        match init {
            Init::Zeros => Tensor::zeros(shape.clone(), dtype, &device),
            Init::Ones => Tensor::ones(shape.clone(), dtype, &device),
            Init::Value(v) => Tensor::full(v, shape.clone(), dtype, &device),
            Init::Normal(std) => {
                Tensor::randn(shape.clone(), 0.0, std, dtype, &device, &mut inner.rng)
            }
            Init::Uniform(b) => {
                Tensor::rand_uniform(shape.clone(), -b, b, dtype, &device, &mut inner.rng)
            }
        }
    }

    /// A trainable parameter.
    pub fn param(&self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Tensor> {
        let t = self.init_tensor(&shape.into(), init)?;
        let full = self.full_name(name);
        self.inner.borrow_mut().params.insert(full, &t)
    }

    /// A trainable parameter with the given initial value (for inits that are not one
    /// distribution, like VAR's row-scaled AdaLN weights).
    pub fn param_value(&self, name: &str, value: &Tensor) -> Result<Tensor> {
        let full = self.full_name(name);
        let (device, dtype) = {
            let inner = self.inner.borrow();
            (inner.device.clone(), inner.dtype)
        };
        let v = value.to_dtype(dtype)?.to_device(&device)?;
        self.inner.borrow_mut().params.insert(full, &v)
    }

    /// Draws a tensor from `init` without registering it.
    pub fn draw(&self, shape: impl Into<Shape>, init: Init) -> Result<Tensor> {
        self.init_tensor(&shape.into(), init)
    }

    /// A persistent buffer with the given value.
    pub fn buffer_value(&self, name: &str, value: Tensor) -> Result<Tensor> {
        let device = self.inner.borrow().device.clone();
        let v = value.to_device(&device)?;
        self.inner
            .borrow_mut()
            .buffers
            .push((self.full_name(name), v.clone()));
        Ok(v)
    }

    /// A persistent buffer (saved in checkpoints, not trained), e.g. codebook hit counts.
    pub fn buffer(&self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Tensor> {
        let t = self.init_tensor(&shape.into(), init)?;
        self.inner
            .borrow_mut()
            .buffers
            .push((self.full_name(name), t.clone()));
        Ok(t)
    }

    /// The parameters and buffers registered so far.
    pub fn finish(&self) -> (ParamStore, Vec<(String, Tensor)>) {
        let inner = self.inner.borrow();
        (inner.params.clone(), inner.buffers.clone())
    }
}

/// 2-D convolution with PyTorch's layout and default initialisation.
#[derive(Clone)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: ops::Padding,
}

impl Conv2d {
    pub fn new(
        b: &Builder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
    ) -> Result<Self> {
        let bound = 1.0 / ((cin * k * k) as f64).sqrt();
        Ok(Conv2d {
            weight: b.param("weight", [cout, cin, k, k], Init::Uniform(bound))?,
            bias: if bias {
                Some(b.param("bias", [cout], Init::Uniform(bound))?)
            } else {
                None
            },
            stride,
            padding: ops::Padding::same(pad),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv2d(
            x,
            &self.weight,
            self.bias.as_ref(),
            (self.stride, self.stride),
            self.padding,
        )
    }
}

/// y = x W^T + b with W [out, in].
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(b: &Builder, din: usize, dout: usize, bias: bool) -> Result<Self> {
        let bound = 1.0 / (din as f64).sqrt();
        Ok(Linear {
            weight: b.param("weight", [dout, din], Init::Uniform(bound))?,
            bias: if bias {
                Some(b.param("bias", [dout], Init::Uniform(bound))?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref())
    }
}

/// GroupNorm with affine weight and bias.
#[derive(Clone)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(b: &Builder, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        Ok(GroupNorm {
            weight: b.param("weight", [channels], Init::Ones)?,
            bias: b.param("bias", [channels], Init::Zeros)?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::group_norm(x, self.groups, &self.weight, &self.bias, self.eps)
    }
}

/// A lookup table [num, dim].
#[derive(Clone)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(b: &Builder, num: usize, dim: usize, init: Init) -> Result<Self> {
        Ok(Embedding {
            weight: b.param("weight", [num, dim], init)?,
        })
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        ops::embedding(ids, &self.weight)
    }
}
