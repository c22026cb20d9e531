//! `mvar sample`: class-conditional images from a trained VAR or MVAR folder.

use std::path::{Path, PathBuf};

use clap::Args;
use mvar_engine::{Device, Error, Generator, Result, Tensor};
use mvar_models::data::{grid, rgb8_from_chw, save_png, save_rgb8_pngs};
use mvar_models::npz::NpzImageWriter;
use mvar_models::trainer::ArModel;
use mvar_models::{SampleConfig, SampleOutput, VqVae};
use mvar_ops as ops;

use crate::common::{load_model_dir, ModelInfo};
use crate::progress::interrupted;

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
    /// official sampler runs under autocast), f32, or auto (bf16 on a GPU, f32 on the CPU; on a
    /// CPU with AVX512-BF16, see `mvar info`, bf16 samples faster).
    #[arg(long, value_enum, default_value = "auto")]
    pub precision: crate::train::Precision,
    #[arg(long, default_value = "samples")]
    pub out: PathBuf,
    /// Also write the token maps to tokens.safetensors in --out: `label_B` (i64, one per image) and
    /// `idx.{si}` (i64 [N, pn^2] per scale, row-major), as the official fixtures name them.
    #[arg(long)]
    pub tokens: bool,
    /// Images sampled per batch (the transformer runs on twice as many rows for guidance).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Images per pass of the tokenizer's decoder (0: from the image size, so that its largest
    /// activation stays near 256 MiB: 6 at 256 px). Same images either way; at 256 px the
    /// decode of a whole batch needs more memory than sampling it.
    #[arg(long, default_value_t = 0)]
    pub decode_batch: usize,
    /// Also write every image to this .npz (`arr_0`: uint8 [N, H, W, 3]), the input of the ADM
    /// evaluator that the VAR paper's FID / IS / precision / recall come from; streamed batch
    /// by batch, so 50,000 images need no more memory than one batch.
    #[arg(long)]
    pub npz: Option<PathBuf>,
    /// Write no PNG files (e.g. with --npz for an evaluation set of 50,000 images).
    #[arg(long)]
    pub no_png: bool,
    /// Also write progression.png: for the first image of each class (the first 16 classes),
    /// a row of what the image is after each scale, coarse to fine, decoded at full size (one
    /// decode per scale); the last column is the sample itself.
    /// (Not with --more-smooth: the progression is decoded from the drawn tokens.)
    #[arg(long, conflicts_with_all = ["no_png", "more_smooth"])]
    pub progression: bool,
}

/// The most rows of progression.png (each is one decode per scale of one image).
const PROGRESSION_ROWS: usize = 16;

/// The progression of the images `rows` of a sampled batch: [rows * scales, 3, H, W], each
/// image's scales in a row, on the host.
fn progression_rows(vae: &VqVae, idx: &[Tensor], rows: &[usize]) -> Result<Tensor> {
    let _ng = mvar_engine::no_grad();
    let device = idx.first().map_or(Device::Cpu, |t| t.device().clone());
    let pick = Tensor::from_vec(
        rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
        vec![rows.len()],
        &device,
    )?;
    let picked = idx
        .iter()
        .map(|t| ops::index_select(t, 0, &pick))
        .collect::<Result<Vec<_>>>()?;
    let steps = vae
        .idx_to_progression(&picked)?
        .iter()
        .map(|img| {
            let d = img.dims().to_vec();
            img.reshape([d[0], 1, d[1], d[2], d[3]])
        })
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&Tensor> = steps.iter().collect();
    let all = ops::concat(&refs, 1)?; // [rows, scales, 3, H, W]
    let d = all.dims().to_vec();
    all.reshape([d[0] * d[1], d[2], d[3], d[4]])?
        .to_device(&Device::Cpu)
}

/// The most images `mvar sample` puts in one grid PNG (kept on the host until the end: 200 MB
/// at 256 px); larger runs write the images only.
const MAX_GRID_IMAGES: usize = 256;

/// The sampling flags of `sample`, `edit`, `eval` and the grid `train` writes at its end.
#[derive(Args, Debug, Clone, Copy)]
pub struct SamplingArgs {
    /// Classifier-free guidance strength (ramped from 0 at the first scale to this at the last).
    #[arg(long, default_value_t = 2.0, value_parser = crate::common::parse_finite)]
    pub cfg: f64,
    /// Keep the top-k logits (0 = all; 1 = greedy).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the smallest set of tokens with this probability mass (0 = all).
    #[arg(long, default_value_t = 0.96)]
    pub top_p: f64,
    /// The official sampler's more_smooth: f_hat grows by a Gumbel-softmax mixture of the
    /// kept codes instead of the drawn one (smoother images, for viewing; not for FID). The
    /// --tokens written are still the drawn ones, which then do not decode to the images.
    #[arg(long)]
    pub more_smooth: bool,
}

impl SamplingArgs {
    pub fn config(&self) -> SampleConfig {
        SampleConfig {
            cfg: self.cfg,
            top_k: self.top_k,
            top_p: self.top_p,
            more_smooth: self.more_smooth,
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
    images_and(model, vae, labels, sc, rng, |_, _| ())
}

/// [`images`], each batch's output also shown to `each` with the number of images before it.
fn images_and(
    model: &ArModel,
    vae: &VqVae,
    labels: &[i64],
    sc: SampleConfig,
    rng: &mut Generator,
    mut each: impl FnMut(usize, SampleOutput),
) -> Result<Tensor> {
    const BATCH: usize = 32;
    let mut parts = Vec::new();
    for (b, chunk) in labels.chunks(BATCH).enumerate() {
        let out = sample_labels(model, vae, chunk, sc, rng)?;
        parts.push(vae.fhat_to_img(&out.f_hat)?);
        each(b * BATCH, out);
    }
    let refs: Vec<&Tensor> = parts.iter().collect();
    ops::concat(&refs, 0)
}

/// A grid with one row per class, `per_class` samples each (the images `images` draws from
/// `seed`), and the progression of the first sample of each class (see `sample --progression`)
/// when `progression` names a file.
#[allow(clippy::too_many_arguments)]
pub fn class_grid(
    model: &ArModel,
    vae: &VqVae,
    info: &ModelInfo,
    per_class: usize,
    sc: SampleConfig,
    seed: u64,
    path: &Path,
    progression: Option<&Path>,
) -> Result<()> {
    let classes = info.var.num_classes as i64;
    let labels: Vec<i64> = (0..classes)
        .flat_map(|c| std::iter::repeat_n(c, per_class))
        .collect();
    let mut rows = Vec::new();
    let imgs = images_and(
        model,
        vae,
        &labels,
        sc,
        &mut Generator::new(seed),
        |done, out| {
            let batch = out.idx.first().map_or(0, |t| t.dims()[0]);
            let firsts = firsts_of_classes(done, batch, per_class);
            if !firsts.is_empty() {
                rows.push((out.idx, firsts));
            }
        },
    )?;
    let (px, h, w) = grid(&imgs, per_class)?;
    save_png(path, &px, h, w)?;
    if let Some(progression) = progression {
        save_progression(vae, &rows, info.var.patch_nums.len(), progression)?;
    }
    Ok(())
}

/// The rows of a batch of `len` images, the first `done` of the run before it, that start a
/// class (of `per_class` images each) among the first PROGRESSION_ROWS classes.
fn firsts_of_classes(done: usize, len: usize, per_class: usize) -> Vec<usize> {
    (0..len)
        .filter(|j| {
            (done + j).is_multiple_of(per_class) && (done + j) / per_class < PROGRESSION_ROWS
        })
        .collect()
}

/// Writes progression.png from the token maps of some sampled batches and the rows of each to
/// show; returns how many rows it has.
fn save_progression(
    vae: &VqVae,
    batches: &[(Vec<Tensor>, Vec<usize>)],
    scales: usize,
    path: &Path,
) -> Result<usize> {
    let parts = batches
        .iter()
        .map(|(idx, rows)| progression_rows(vae, idx, rows))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&Tensor> = parts.iter().collect();
    let (px, h, w) = grid(&ops::concat(&refs, 0)?, scales)?;
    save_png(path, &px, h, w)?;
    Ok(batches.iter().map(|(_, rows)| rows.len()).sum())
}

pub fn run(args: SampleArgs, device: &Device) -> Result<()> {
    let (model, vae, info) = load_model_dir(&args.ckpt, device)?;
    vae.set_decode_batch(args.decode_batch);
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
    if args.n == 0 || args.batch == 0 {
        return Err(Error::invalid(
            "sample",
            format!(
                "--n {} --batch {}: expected positive counts",
                args.n, args.batch
            ),
        ));
    }
    let labels: Vec<i64> = classes
        .iter()
        .flat_map(|&c| std::iter::repeat_n(c, args.n))
        .collect();
    let side = info.var.patch_nums.last().copied().unwrap_or(1) * vae.config.downsample();
    std::fs::create_dir_all(&args.out).map_err(|e| Error::Io {
        path: args.out.display().to_string(),
        source: e,
    })?;
    let mut npz = match &args.npz {
        Some(p) => Some(NpzImageWriter::create(p, labels.len(), side, side)?),
        None => None,
    };
    let pngs = !args.no_png;
    let in_grid = pngs && labels.len() <= MAX_GRID_IMAGES;
    let mut grid_parts = Vec::new();
    let mut token_parts: Vec<Vec<Tensor>> = Vec::new();
    let mut progression_parts = Vec::new();

    let sc = args.sampling.config();
    let dtype = args.precision.autocast(device);
    let _autocast = mvar_engine::autocast(dtype)?;
    let mut rng = Generator::new(args.seed);
    let t = std::time::Instant::now();
    let mut last_report = t;
    let mut done = 0;
    for chunk in labels.chunks(args.batch) {
        if interrupted() {
            println!(
                "interrupted after {done} of {} images{}",
                labels.len(),
                if npz.is_some() {
                    "; no .npz written"
                } else {
                    ""
                }
            );
            return Ok(());
        }
        let out = sample_labels(&model, &vae, chunk, sc, &mut rng)?;
        // Decoded only when images are written (not for tokens alone); one copy to the host
        // serves the PNGs, the .npz and the grid.
        if pngs || npz.is_some() {
            let imgs = vae.fhat_to_img(&out.f_hat)?.to_device(&Device::Cpu)?;
            let rgb = rgb8_from_chw(&imgs.to_vec_f32()?, side, side);
            if pngs {
                let paths: Vec<PathBuf> = chunk
                    .iter()
                    .enumerate()
                    .map(|(j, &label)| {
                        let name = info
                            .classes
                            .get(label as usize)
                            .cloned()
                            .unwrap_or_else(|| label.to_string());
                        args.out.join(format!("{:04}-{name}.png", done + j))
                    })
                    .collect();
                save_rgb8_pngs(&paths, &rgb, side, side)?;
            }
            if let Some(w) = npz.as_mut() {
                w.append(&rgb)?;
            }
            if in_grid {
                grid_parts.push(imgs);
            }
        }
        if args.progression {
            // The first image of each class, in the order of the grid's rows.
            let firsts = firsts_of_classes(done, chunk.len(), args.n);
            if !firsts.is_empty() {
                // Decoded after the loop, so that the sampling rate is the sampler's.
                progression_parts.push((out.idx.clone(), firsts));
            }
        }
        if args.tokens {
            token_parts.push(out.idx);
        }
        done += chunk.len();
        if last_report.elapsed().as_secs_f64() >= 10.0 && done < labels.len() {
            let rate = done as f64 / t.elapsed().as_secs_f64();
            eprintln!(
                "sampled {done} / {} images ({rate:.1} img/s, {:.0} s left)",
                labels.len(),
                (labels.len() - done) as f64 / rate
            );
            last_report = std::time::Instant::now();
        }
    }
    let secs = t.elapsed().as_secs_f64();

    let mut wrote = Vec::new();
    if in_grid {
        let refs: Vec<&Tensor> = grid_parts.iter().collect();
        let (px, h, w) = grid(&ops::concat(&refs, 0)?, args.n)?;
        let grid_path = args.out.join("grid.png");
        save_png(&grid_path, &px, h, w)?;
        wrote.push(grid_path.display().to_string());
    }
    if pngs {
        wrote.push(format!("one PNG per image in {}", args.out.display()));
    }
    if !progression_parts.is_empty() {
        let scales = info.var.patch_nums.len();
        let path = args.out.join("progression.png");
        let rows = save_progression(&vae, &progression_parts, scales, &path)?;
        wrote.push(format!(
            "{} ({rows} rows of {scales} scales)",
            path.display()
        ));
    }
    if args.tokens {
        let n = labels.len();
        let mut named = vec![(
            "label_B".to_string(),
            Tensor::from_vec(labels.clone(), vec![n], &Device::Cpu)?,
        )];
        for si in 0..token_parts.first().map_or(0, Vec::len) {
            let per_batch: Vec<&Tensor> = token_parts.iter().map(|p| &p[si]).collect();
            named.push((
                format!("idx.{si}"),
                ops::concat(&per_batch, 0)?.to_device(&Device::Cpu)?,
            ));
        }
        let path = args.out.join("tokens.safetensors");
        mvar_models::checkpoint::write_safetensors(&path, &named, None)?;
        wrote.push(format!("the token maps in {}", path.display()));
    }
    if let Some(w) = npz.take() {
        w.finish()?;
        wrote.push(format!(
            "{} (arr_0: uint8 [{}, {side}, {side}, 3])",
            args.npz
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            labels.len()
        ));
    }
    if pngs && !in_grid {
        wrote.push(format!(
            "no grid ({} images; at most {MAX_GRID_IMAGES} go in one)",
            labels.len()
        ));
    }
    println!(
        "{} images ({} per class, cfg {}, {}) in {:.1}s ({:.2} img/s); wrote {}",
        labels.len(),
        args.n,
        args.sampling.cfg,
        if dtype.is_some() {
            "bf16 autocast"
        } else {
            "f32"
        },
        secs,
        labels.len() as f64 / secs.max(1e-9),
        if wrote.is_empty() {
            "nothing (--no-png without --npz or --tokens)".to_string()
        } else {
            wrote.join(", ")
        }
    );
    Ok(())
}
