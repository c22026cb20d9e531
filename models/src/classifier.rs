//! A small image classifier for evaluating generators on the bundled data set: its logits give
//! the class accuracy of generated images, its pooled features the space in which the Frechet
//! distance of [`crate::metrics`] compares generated and real images.
//!
//! Layout: images [B, 3, H, W] in [-1, 1] (the data set's and the samplers' range), H = W =
//! `image_size`.
//!
//! - stem: conv3x3(3 -> c0) + GroupNorm + SiLU at full resolution;
//! - stage i (channels ci): for i > 0 a downsampler conv3x3 stride 2 (pad 1, so H -> ceil(H/2))
//!   + GroupNorm + SiLU from c(i-1) to ci; then `blocks` residual blocks
//!     h <- h + SiLU(GroupNorm(conv3x3(h)));
//! - features: the global average over positions of the last stage, [B, c_last];
//! - logits: Linear(c_last -> num_classes) of the features.
//!
//! GroupNorm (not BatchNorm) keeps training and evaluation the same function, so a batch of
//! generated images is scored exactly as one image at a time would be.
//!
//! Parameter names: `stem.conv.*`, `stem.norm.*`, `stages.{i}.down.{conv,norm}.*`,
//! `stages.{i}.blocks.{j}.{conv,norm}.*`, `head.*`; saved as safetensors.

use std::path::Path;

use mvar_engine::{DType, Device, Error, ParamStore, Result, Tensor};
use mvar_ops as ops;
use serde::{Deserialize, Serialize};

use crate::nn::{Builder, Conv2d, GroupNorm, Linear};

/// Everything that shapes a [`Classifier`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    /// Channels per stage; every stage after the first halves the resolution.
    #[serde(default = "d_channels")]
    pub channels: Vec<usize>,
    /// Residual blocks per stage (after the stem or the downsampler).
    #[serde(default = "d_blocks")]
    pub blocks: usize,
    /// GroupNorm groups (must divide every channel count).
    #[serde(default = "d_groups")]
    pub groups: usize,
    pub num_classes: usize,
    /// Side of the square input images.
    #[serde(default = "d_side")]
    pub image_size: usize,
}

fn d_channels() -> Vec<usize> {
    vec![32, 64, 128]
}
fn d_blocks() -> usize {
    1
}
fn d_groups() -> usize {
    8
}
fn d_side() -> usize {
    32
}

impl ClassifierConfig {
    /// The default network for `num_classes` classes at 32x32.
    pub fn new(num_classes: usize) -> Self {
        ClassifierConfig {
            channels: d_channels(),
            blocks: d_blocks(),
            groups: d_groups(),
            num_classes,
            image_size: d_side(),
        }
    }

    /// Rejects configurations the network cannot be built from, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("ClassifierConfig", msg));
        if self.channels.is_empty() || self.channels.contains(&0) {
            return bad(format!(
                "channels {:?}: expected at least one positive channel count",
                self.channels
            ));
        }
        if self.groups == 0 {
            return bad("groups 0: expected at least one GroupNorm group".into());
        }
        if let Some(c) = self.channels.iter().find(|&&c| c % self.groups != 0) {
            return bad(format!(
                "channel count {c} is not a multiple of the {} GroupNorm groups",
                self.groups
            ));
        }
        if self.num_classes == 0 {
            return bad("num_classes 0".into());
        }
        if self.image_size == 0 {
            return bad("image_size 0".into());
        }
        Ok(())
    }

    /// Length of the feature vector: the last stage's channels.
    pub fn feature_dim(&self) -> usize {
        self.channels.last().copied().unwrap_or(0)
    }
}

#[derive(Clone)]
struct ConvNorm {
    conv: Conv2d,
    norm: GroupNorm,
}

impl ConvNorm {
    fn new(b: &Builder, cin: usize, cout: usize, stride: usize, groups: usize) -> Result<Self> {
        Ok(ConvNorm {
            conv: Conv2d::new(&b.pp("conv"), cin, cout, 3, stride, 1, true)?,
            norm: GroupNorm::new(&b.pp("norm"), cout, groups, 1e-5)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::silu(&self.norm.forward(&self.conv.forward(x)?)?)
    }
}

#[derive(Clone)]
struct Stage {
    down: Option<ConvNorm>,
    blocks: Vec<ConvNorm>,
}

/// The classifier with its parameters.
pub struct Classifier {
    pub config: ClassifierConfig,
    stem: ConvNorm,
    stages: Vec<Stage>,
    head: Linear,
    pub params: ParamStore,
}

impl Classifier {
    /// A classifier with PyTorch's default initialisation, drawn from `seed`.
    pub fn new(config: ClassifierConfig, device: &Device, seed: u64) -> Result<Self> {
        config.validate()?;
        let b = Builder::new(device, DType::F32, seed);
        let g = config.groups;
        let c0 = config.channels[0];
        let stem = ConvNorm::new(&b.pp("stem"), 3, c0, 1, g)?;
        let mut stages = Vec::with_capacity(config.channels.len());
        let mut cin = c0;
        for (i, &c) in config.channels.iter().enumerate() {
            let sb = b.pp("stages").pp(i);
            let down = if i > 0 {
                Some(ConvNorm::new(&sb.pp("down"), cin, c, 2, g)?)
            } else {
                None
            };
            let blocks = (0..config.blocks)
                .map(|j| ConvNorm::new(&sb.pp("blocks").pp(j), c, c, 1, g))
                .collect::<Result<Vec<_>>>()?;
            stages.push(Stage { down, blocks });
            cin = c;
        }
        let head = Linear::new(&b.pp("head"), cin, config.num_classes, true)?;
        let (params, _) = b.finish();
        Ok(Classifier {
            config,
            stem,
            stages,
            head,
            params,
        })
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let s = self.config.image_size;
        match x.dims() {
            &[b, 3, h, w] if b > 0 && h == s && w == s => Ok(()),
            _ => Err(Error::shape(
                "classifier",
                format!("images {}", x.shape()),
                format!("[B, 3, {s}, {s}] with B > 0 (images in [-1, 1])"),
            )),
        }
    }

    /// Pooled features [B, F] (F = the last stage's channels) of images [B, 3, S, S] in [-1, 1].
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let mut h = self.stem.forward(x)?;
        for stage in &self.stages {
            if let Some(d) = &stage.down {
                h = d.forward(&h)?;
            }
            for block in &stage.blocks {
                h = ops::add(&h, &block.forward(&h)?)?;
            }
        }
        ops::mean_axes(&h, &[2, 3], false)
    }

    /// Class logits [B, num_classes].
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.head.forward(&self.features(x)?)
    }

    /// Features and logits from one forward: ([B, F], [B, num_classes]).
    pub fn features_and_logits(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let f = self.features(x)?;
        let l = self.head.forward(&f)?;
        Ok((f, l))
    }

    /// Every parameter by name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect()
    }

    /// Saves the parameters (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::checkpoint::write_safetensors(path, &self.named_tensors(), None)
    }

    /// Loads weights by name: every parameter must be present with its shape, and the file may
    /// hold nothing else (a classifier of another shape is an error naming the tensor).
    pub fn load(&self, path: &Path) -> Result<crate::checkpoint::LoadReport> {
        let source = crate::checkpoint::read_safetensors(path)?;
        let what = format!("classifier checkpoint {}", path.display());
        crate::checkpoint::load_into(&what, &self.named_tensors(), &source, true)
    }

    pub fn device(&self) -> &Device {
        self.head.weight.device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvar_engine::Generator;
    use mvar_ops::{AdamW, AdamWConfig};

    fn tiny(classes: usize) -> ClassifierConfig {
        ClassifierConfig {
            channels: vec![8, 16],
            blocks: 1,
            groups: 4,
            num_classes: classes,
            image_size: 8,
        }
    }

    #[test]
    fn shapes_and_bad_inputs() {
        let c = Classifier::new(tiny(5), &Device::Cpu, 0).unwrap();
        let x = Tensor::randn(
            [3, 3, 8, 8],
            0.0,
            0.5,
            DType::F32,
            &Device::Cpu,
            &mut Generator::new(1),
        )
        .unwrap();
        assert_eq!(c.features(&x).unwrap().dims(), &[3, 16]);
        assert_eq!(c.logits(&x).unwrap().dims(), &[3, 5]);
        assert_eq!(c.config.feature_dim(), 16);
        let wrong = Tensor::zeros([1, 3, 16, 16], DType::F32, &Device::Cpu).unwrap();
        let e = c.logits(&wrong).unwrap_err().to_string();
        assert!(
            e.contains("classifier") && e.contains("[B, 3, 8, 8]"),
            "{e}"
        );
        let mut bad = tiny(5);
        bad.channels = vec![8, 10];
        let e = Classifier::new(bad, &Device::Cpu, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("10") && e.contains("groups"), "{e}");
    }

    #[test]
    fn training_steps_lower_the_loss_and_save_load_round_trips() {
        let dev = Device::Cpu;
        let c = Classifier::new(tiny(3), &dev, 2).unwrap();
        let mut g = Generator::new(7);
        // Random images whose class shifts the mean brightness: learnable in a few steps.
        let labels: Vec<i64> = (0..12).map(|i| i % 3).collect();
        let mut px = g.normal(12 * 3 * 64, 0.0, 0.5);
        for (i, chunk) in px.chunks_mut(3 * 64).enumerate() {
            let shift = labels[i] as f64 - 1.0;
            chunk.iter_mut().for_each(|v| *v += shift);
        }
        let x = Tensor::from_vec(
            px.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            [12, 3, 8, 8],
            &dev,
        )
        .unwrap();
        let y = Tensor::from_vec(labels, [12], &dev).unwrap();
        let mut opt = AdamW::new(
            &c.params,
            AdamWConfig {
                lr: 1e-2,
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            |_, t| t.rank() == 1,
        )
        .unwrap();
        let mut losses = Vec::new();
        for _ in 0..15 {
            c.params.zero_grad();
            let ce = ops::cross_entropy(&c.logits(&x).unwrap(), &y, None, 0.0).unwrap();
            let loss = ops::mean_all(&ce).unwrap();
            losses.push(loss.to_f64().unwrap());
            loss.backward().unwrap();
            opt.step(&c.params).unwrap();
        }
        assert!(
            losses[14] < 0.5 * losses[0],
            "loss did not fall: {losses:?}"
        );

        let dir = std::env::temp_dir().join(format!("mvar-classifier-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.safetensors");
        c.save(&path).unwrap();
        let d = Classifier::new(tiny(3), &dev, 99).unwrap();
        assert_ne!(
            d.logits(&x).unwrap().to_vec_f32().unwrap(),
            c.logits(&x).unwrap().to_vec_f32().unwrap()
        );
        d.load(&path).unwrap();
        assert_eq!(
            d.logits(&x).unwrap().to_vec_f32().unwrap(),
            c.logits(&x).unwrap().to_vec_f32().unwrap()
        );
        // Another class count: the head's shape differs and the error names it.
        let other = Classifier::new(tiny(4), &dev, 0).unwrap();
        let e = other.load(&path).unwrap_err().to_string();
        assert!(e.contains("head.") && e.contains("c.safetensors"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
