//! `mvar sample`: class-conditional images from a trained VAR or MVAR folder.

use std::path::{Path, PathBuf};

use clap::Args;
use mvar_engine::{Device, Error, Generator, Result, Tensor};
use mvar_models::data::{grid, save_png};
use mvar_models::trainer::ArModel;
use mvar_models::{SampleConfig, SampleOutput, VqVae};
use mvar_ops as ops;

use crate::common::{load_model_dir, ModelInfo};

#[derive(Args, Debug, Clone)]
pub struct SampleArgs {
    /// A model folder from `mvar train` (model.json, model.safetensors).
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Class labels to sample (repeat the flag); all classes when absent.
    #[arg(long = "class")]
    pub classes: Vec<i64>,
    /// Images per class.
    #[arg(long, default_value_t = 8)]
    pub n: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// bf16 autocast (GEMMs, attention and convolutions in bf16 with f32 accumulation, as the
    /// official sampler runs under autocast), f32, or auto (bf16 on a GPU, f32 on the CPU).
    #[arg(long, value_enum, default_value = "auto")]
    pub precision: crate::train::Precision,
    #[arg(long, default_value = "samples")]
    pub out: PathBuf,
    /// Also write the token maps to tokens.safetensors in --out: `label_B` (i64 [N]) and
    /// `idx.{si}` (i64 [N, pn^2] per scale, row-major), as the official fixtures name them.
    #[arg(long)]
    pub tokens: bool,
}

/// The sampling flags of `sample`, `edit`, `eval` and the grid `train` writes at its end.
#[derive(Args, Debug, Clone, Copy)]
pub struct SamplingArgs {
    /// Classifier-free guidance strength (ramped from 0 at the first scale to this at the last).
    #[arg(long, default_value_t = 2.0)]
    pub cfg: f64,
    /// Keep the top-k logits (0 = all; 1 = greedy).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the smallest set of tokens with this probability mass (0 = all).
    #[arg(long, default_value_t = 0.96)]
    pub top_p: f64,
}

impl SamplingArgs {
    pub fn config(&self) -> SampleConfig {
        SampleConfig {
            cfg: self.cfg,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }
}

/// Samples `labels` with the model's own sampler.
pub fn sample_labels(
    model: &ArModel,
    vae: &VqVae,
    labels: &[i64],
    sc: SampleConfig,
    rng: &mut Generator,
) -> Result<SampleOutput> {
    match model {
        ArModel::Var(v) => v.sample(vae, labels, sc, rng),
        ArModel::Mvar(m) => m.sample(vae, labels, sc, rng),
    }
}

/// Images [B, 3, H, W] in [-1, 1] for `labels`, in batches.
pub fn images(
    model: &ArModel,
    vae: &VqVae,
    labels: &[i64],
    sc: SampleConfig,
    rng: &mut Generator,
) -> Result<Tensor> {
    Ok(images_and_tokens(model, vae, labels, sc, rng)?.0)
}

/// [`images`] and the token maps they decode, i64 [B, pn^2] per scale.
pub fn images_and_tokens(
    model: &ArModel,
    vae: &VqVae,
    labels: &[i64],
    sc: SampleConfig,
    rng: &mut Generator,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut parts = Vec::new();
    let mut maps: Vec<Vec<Tensor>> = Vec::new();
    for chunk in labels.chunks(32) {
        let out = sample_labels(model, vae, chunk, sc, rng)?;
        parts.push(vae.fhat_to_img(&out.f_hat)?);
        maps.push(out.idx);
    }
    let refs: Vec<&Tensor> = parts.iter().collect();
    let scales = maps.first().map_or(0, Vec::len);
    let tokens = (0..scales)
        .map(|si| {
            let per_chunk: Vec<&Tensor> = maps.iter().map(|m| &m[si]).collect();
            ops::concat(&per_chunk, 0)
        })
        .collect::<Result<_>>()?;
    Ok((ops::concat(&refs, 0)?, tokens))
}

/// A grid with one row per class, `per_class` samples each.
pub fn class_grid(
    model: &ArModel,
    vae: &VqVae,
    info: &ModelInfo,
    per_class: usize,
    sc: SampleConfig,
    seed: u64,
    path: &Path,
) -> Result<()> {
    let classes = info.var.num_classes as i64;
    let labels: Vec<i64> = (0..classes)
        .flat_map(|c| std::iter::repeat_n(c, per_class))
        .collect();
    let imgs = images(model, vae, &labels, sc, &mut Generator::new(seed))?;
    let (px, h, w) = grid(&imgs, per_class)?;
    save_png(path, &px, h, w)
}

pub fn run(args: SampleArgs, device: &Device) -> Result<()> {
    let (model, vae, info) = load_model_dir(&args.ckpt, device)?;
    let classes: Vec<i64> = if args.classes.is_empty() {
        (0..info.var.num_classes as i64).collect()
    } else {
        args.classes.clone()
    };
    if let Some(&bad) = classes
        .iter()
        .find(|&&c| c < 0 || c as usize >= info.var.num_classes)
    {
        return Err(Error::IndexOutOfRange {
            op: "sample",
            what: "class",
            index: bad,
            size: info.var.num_classes,
        });
    }
    if args.n == 0 {
        return Err(Error::invalid("sample", "--n 0"));
    }
    let labels: Vec<i64> = classes
        .iter()
        .flat_map(|&c| std::iter::repeat_n(c, args.n))
        .collect();
    let sc = args.sampling.config();
    let dtype = args.precision.autocast(device);
    let _autocast = mvar_engine::autocast(dtype)?;
    let t = std::time::Instant::now();
    let (imgs, tokens) =
        images_and_tokens(&model, &vae, &labels, sc, &mut Generator::new(args.seed))?;
    let secs = t.elapsed().as_secs_f64();
    std::fs::create_dir_all(&args.out).map_err(|e| Error::Io {
        path: args.out.display().to_string(),
        source: e,
    })?;
    let (px, h, w) = grid(&imgs, args.n)?;
    let grid_path = args.out.join("grid.png");
    save_png(&grid_path, &px, h, w)?;
    let s = imgs.dims()[2];
    let all = imgs.to_vec_f32()?;
    for (i, &label) in labels.iter().enumerate() {
        let name = info
            .classes
            .get(label as usize)
            .cloned()
            .unwrap_or_else(|| label.to_string());
        let p = args.out.join(format!("{:04}-{name}.png", i));
        save_png(&p, &all[i * 3 * s * s..(i + 1) * 3 * s * s], s, s)?;
    }
    if args.tokens {
        let n = labels.len();
        let mut named = vec![(
            "label_B".to_string(),
            Tensor::from_vec(labels.clone(), vec![n], &Device::Cpu)?,
        )];
        for (si, t) in tokens.iter().enumerate() {
            named.push((format!("idx.{si}"), t.to_device(&Device::Cpu)?));
        }
        let path = args.out.join("tokens.safetensors");
        mvar_models::checkpoint::write_safetensors(&path, &named, None)?;
        println!("wrote the token maps of every image to {}", path.display());
    }
    println!(
        "{} images ({} per class, cfg {}, {}) in {:.1}s; wrote {} and one PNG per image in {}",
        labels.len(),
        args.n,
        args.sampling.cfg,
        if dtype.is_some() {
            "bf16 autocast"
        } else {
            "f32"
        },
        secs,
        grid_path.display(),
        args.out.display()
    );
    Ok(())
}
