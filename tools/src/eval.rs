//! `mvar eval`: the figures of a trained VAR / MVAR folder on a held-out split.
//!
//! - teacher-forced validation loss (nats) and token accuracy per scale, through exactly the
//!   forwards the trainer uses (MVAR: segment by segment);
//! - the tokenizer's reconstruction PSNR on the same images;
//! - with a classifier from `mvar train-classifier`: class-conditional samples, the share of them
//!   the classifier labels with the class they were sampled for (chance: 1 / classes), and the
//!   Frechet distance between the classifier features of the samples and of the real held-out
//!   images. Two reference figures make these readable: the classifier's accuracy on the real
//!   held-out images (what perfect samples would score at best), the same two figures for the
//!   tokenizer's reconstructions of those images (the ceiling that the tokenizer leaves to the
//!   transformer), and the Frechet distance between as many real training images and the
//!   held-out ones (the floor at this sample count).
//!
//! The Frechet distance here lives in the feature space of a small classifier trained on the
//! bundled data set: it is not the Inception-v3 FID and cannot be compared with published FIDs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use mvar_engine::{Device, Error, Generator, Result};
use mvar_models::checkpoint::write_atomic;
use mvar_models::metrics::{evaluate_tokens, frechet_distance_of, ScaleEval};

use crate::classifier::{
    each_image_batch, features_and_predictions, load_classifier, top1_accuracy,
};
use crate::common::{epoch_order, load_model_dir, load_split, tokenizer_dir, PreprocessArg};
use crate::sample::SamplingArgs;
use crate::token_cache::TokenCache;

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// A model folder from `mvar train` (model.json, model.safetensors).
    #[arg(long)]
    pub ckpt: PathBuf,
    /// A classifier folder from `mvar train-classifier`; without it the sample-quality figures
    /// are skipped.
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    #[arg(long, default_value = "data/cifar10-subset")]
    pub data: PathBuf,
    /// How images are brought to the model's side.
    #[arg(long, value_enum, default_value_t = PreprocessArg::Official)]
    pub preprocess: PreprocessArg,
    /// The held-out split.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Generated images per class for the sample-quality figures.
    #[arg(long, default_value_t = 20)]
    pub per_class: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences per teacher-forced forward.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Where to write the report (default: eval.json in --ckpt).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The sample-quality figures of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SampleQuality {
    pub samples: usize,
    /// Share of the samples the classifier labels with their class.
    pub classifier_accuracy: f64,
    /// The classifier's accuracy on the real held-out images.
    pub real_accuracy: f64,
    /// Frechet distance (classifier features) between the samples and the held-out images.
    pub frechet_distance: f64,
    /// The same between as many real training images and the held-out images.
    pub frechet_distance_real: f64,
    /// The classifier's accuracy on the tokenizer's reconstructions of the held-out images, and
    /// their Frechet distance to the originals: what perfect token prediction could reach.
    pub reconstruction_accuracy: f64,
    pub frechet_distance_reconstructions: f64,
    pub feature_dim: usize,
    pub chance: f64,
}

/// Everything `mvar eval` measures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub split: String,
    pub images: usize,
    pub per_scale: Vec<ScaleReport>,
    pub val_loss: f64,
    pub token_accuracy: f64,
    pub reconstruction_psnr: f64,
    pub sample_quality: Option<SampleQuality>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ScaleReport {
    pub scale: usize,
    pub side: usize,
    pub tokens: usize,
    pub loss: f64,
    pub accuracy: f64,
}

impl From<&ScaleEval> for ScaleReport {
    fn from(s: &ScaleEval) -> Self {
        ScaleReport {
            scale: s.scale,
            side: s.side,
            tokens: s.tokens,
            loss: s.loss,
            accuracy: s.accuracy,
        }
    }
}

/// Teacher-forced figures of a model over the first rows of a token cache.
#[derive(Debug, Clone)]
pub struct HeldOut {
    pub scales: Vec<ScaleEval>,
    /// Mean cross-entropy (nats) and top-1 accuracy over every scored token.
    pub loss: f64,
    pub accuracy: f64,
    pub sequences: usize,
}

/// Scores `rows` of `cache` with the forwards the trainer uses (no gradients, no dropout or
/// class dropping), `batch` sequences at a time: only one batch of token maps is on the device
/// at once, so a held-out set of any size fits.
pub fn teacher_forced(
    model: &mvar_models::trainer::ArModel,
    cache: &TokenCache,
    vae: &mvar_models::VqVae,
    rows: &[usize],
    batch: usize,
    device: &Device,
) -> Result<HeldOut> {
    if rows.is_empty() {
        return Err(Error::invalid(
            "teacher-forced evaluation",
            format!(
                "{} holds no sequences: expected at least one held-out image",
                cache.path().display()
            ),
        ));
    }
    let batch = batch.max(1);
    let mut scales: Vec<ScaleEval> = Vec::new();
    for idx in rows.chunks(batch) {
        let (gt, x_in, labels) = cache.batch(idx, vae, device)?;
        let part = evaluate_tokens(model, &labels, &gt, &x_in, batch)?;
        if scales.is_empty() {
            scales = part
                .iter()
                .map(|s| ScaleEval {
                    loss: 0.0,
                    accuracy: 0.0,
                    tokens: 0,
                    ..s.clone()
                })
                .collect();
        }
        // Sums over tokens here, means at the end.
        for (sum, s) in scales.iter_mut().zip(&part) {
            sum.loss += s.loss * s.tokens as f64;
            sum.accuracy += s.accuracy * s.tokens as f64;
            sum.tokens += s.tokens;
        }
    }
    let total: usize = scales.iter().map(|s| s.tokens).sum();
    let loss = scales.iter().map(|s| s.loss).sum::<f64>() / total.max(1) as f64;
    let accuracy = scales.iter().map(|s| s.accuracy).sum::<f64>() / total.max(1) as f64;
    for s in &mut scales {
        s.loss /= s.tokens.max(1) as f64;
        s.accuracy /= s.tokens.max(1) as f64;
    }
    Ok(HeldOut {
        scales,
        loss,
        accuracy,
        sequences: rows.len(),
    })
}

pub fn run(args: EvalArgs, device: &Device) -> Result<()> {
    evaluate(&args, device).map(|_| ())
}

/// Runs the evaluation, prints it and writes the JSON report; returns it, or None when Ctrl-C
/// stopped the held-out token cache's build (its rows so far are kept for the next run).
pub fn evaluate(args: &EvalArgs, device: &Device) -> Result<Option<EvalReport>> {
    const OP: &str = "mvar eval";
    if args.per_class == 0 {
        return Err(Error::invalid(OP, "--per-class 0"));
    }
    let t0 = Instant::now();
    let (model, vae, info) = load_model_dir(&args.ckpt, device)?;
    let side = info.var.patch_nums.last().copied().unwrap_or(1) * vae.config.downsample();
    let val = load_split(&args.data, &args.split, side, args.preprocess)?.ok_or_else(|| {
        Error::invalid(
            OP,
            format!(
                "no held-out split {:?} in {} (expected {s}.bin or the folder {s}/)",
                args.split,
                args.data.display(),
                s = args.split
            ),
        )
    })?;
    if val.classes().len() != info.var.num_classes {
        return Err(Error::invalid(
            OP,
            format!(
                "{} has {} classes; the model was trained on {}",
                args.data.display(),
                val.classes().len(),
                info.var.num_classes
            ),
        ));
    }

    // Teacher-forced figures on the held-out token maps (no flips: the images as they are).
    let Some((cache, _)) = TokenCache::open_or_build(
        &tokenizer_dir(&args.ckpt, &info),
        &args.split,
        &vae,
        &val,
        false,
        device,
    )?
    else {
        return Ok(None);
    };
    let HeldOut {
        scales,
        loss: val_loss,
        accuracy: token_accuracy,
        ..
    } = teacher_forced(
        &model,
        &cache,
        &vae,
        &(0..cache.len()).collect::<Vec<_>>(),
        args.batch,
        device,
    )?;
    println!(
        "{} on {} held-out images ({} split of {}):",
        info.kind,
        val.len(),
        args.split,
        args.data.display()
    );
    println!("  scale  side  tokens   loss   accuracy");
    for s in &scales {
        println!(
            "  {:>5} {:>5} {:>7} {:>7.4} {:>9.2}%",
            s.scale,
            s.side,
            s.tokens,
            s.loss,
            100.0 * s.accuracy
        );
    }
    println!(
        "  all               {val_loss:>7.4} {:>9.2}%  (chance {:.2}%)",
        100.0 * token_accuracy,
        100.0 / info.var.vocab_size as f64
    );
    let psnr = mvar_models::tokenizer::evaluate(
        &vae,
        &val,
        &(0..val.len()).collect::<Vec<_>>(),
        64,
        device,
    )?
    .psnr;
    println!("tokenizer reconstruction PSNR {psnr:.2} dB");

    let sample_quality = match &args.classifier {
        None => {
            println!("no --classifier: sample-quality figures skipped");
            None
        }
        Some(dir) => Some(sample_quality(
            args, dir, &model, &vae, &info, &val, device,
        )?),
    };
    let report = EvalReport {
        split: args.split.clone(),
        images: val.len(),
        per_scale: scales.iter().map(ScaleReport::from).collect(),
        val_loss,
        token_accuracy,
        reconstruction_psnr: psnr,
        sample_quality,
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.ckpt.join("eval.json"));
    write_atomic(
        &out,
        serde_json::to_string_pretty(&report)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    println!(
        "wrote {} ({:.1}s)",
        out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(Some(report))
}

fn sample_quality(
    args: &EvalArgs,
    dir: &Path,
    model: &mvar_models::trainer::ArModel,
    vae: &mvar_models::VqVae,
    info: &crate::common::ModelInfo,
    val: &mvar_models::data::ImageDataset,
    device: &Device,
) -> Result<SampleQuality> {
    let classifier = load_classifier(dir, device)?;
    let classes = info.var.num_classes;
    if classifier.config.num_classes != classes {
        return Err(Error::invalid(
            "mvar eval",
            format!(
                "classifier {} knows {} classes; the model {}",
                dir.display(),
                classifier.config.num_classes,
                classes
            ),
        ));
    }
    let labels: Vec<i64> = (0..classes as i64)
        .flat_map(|c| std::iter::repeat_n(c, args.per_class))
        .collect();
    let sc = args.sampling.config();
    let t = Instant::now();
    let images = crate::sample::images(model, vae, &labels, sc, &mut Generator::new(args.seed))?;
    let sample_secs = t.elapsed().as_secs_f64();
    let dim = classifier.config.feature_dim();
    let (gen_feats, gen_preds) = features_and_predictions(&classifier, &images)?;
    let accuracy = top1_accuracy(&gen_preds, &labels);

    // The held-out images, and the tokenizer's reconstructions of them (its ceiling), a batch
    // at a time.
    let (mut real_feats, mut real_preds, mut real_labels) = (Vec::new(), Vec::new(), Vec::new());
    let (mut recon_feats, mut recon_preds) = (Vec::new(), Vec::new());
    each_image_batch(val, device, |x, labels| {
        let (f, p) = features_and_predictions(&classifier, x)?;
        real_feats.extend(f);
        real_preds.extend(p);
        real_labels.extend_from_slice(labels);
        let recon = {
            let _ng = mvar_engine::no_grad();
            vae.idx_to_img(&vae.img_to_idx(x)?)?
        };
        let (f, p) = features_and_predictions(&classifier, &recon)?;
        recon_feats.extend(f);
        recon_preds.extend(p);
        Ok(())
    })?;
    let real_accuracy = top1_accuracy(&real_preds, &real_labels);
    let fd = frechet_distance_of(
        &gen_feats,
        labels.len(),
        &real_feats,
        real_labels.len(),
        dim,
    )?;

    let recon_accuracy = top1_accuracy(&recon_preds, &real_labels);
    let fd_recon = frechet_distance_of(
        &recon_feats,
        real_labels.len(),
        &real_feats,
        real_labels.len(),
        dim,
    )?;

    // The floor: as many real training images as samples, against the same held-out images.
    let train = load_split(&args.data, "train", val.side(), args.preprocess)?;
    let fd_real = match train {
        Some(train) if train.len() >= 2 => {
            let pick: Vec<usize> = epoch_order(train.len(), args.seed, 0)
                .into_iter()
                .take(labels.len())
                .collect();
            let mut f = Vec::new();
            train.each_centre_batch(&pick, 128, device, |x, _| {
                f.extend(features_and_predictions(&classifier, x)?.0);
                Ok(())
            })?;
            frechet_distance_of(&f, pick.len(), &real_feats, real_labels.len(), dim)?
        }
        _ => f64::NAN,
    };
    let chance = 1.0 / classes as f64;
    println!(
        "samples: {} ({} per class, cfg {}, top-k {}, top-p {}{}) in {sample_secs:.1}s",
        labels.len(),
        args.per_class,
        args.sampling.cfg,
        args.sampling.top_k,
        args.sampling.top_p,
        if args.sampling.more_smooth {
            ", more_smooth"
        } else {
            ""
        }
    );
    println!(
        "  classifier accuracy of the samples {:.1}% (the classifier on real held-out images: {:.1}%; chance {:.1}%)",
        100.0 * accuracy,
        100.0 * real_accuracy,
        100.0 * chance
    );
    println!(
        "  the classifier on the tokenizer's reconstructions of the held-out images: {:.1}%",
        100.0 * recon_accuracy
    );
    println!(
        "  Frechet distance to the held-out images in the classifier's {dim}-d feature space: samples {fd:.3}, reconstructions {fd_recon:.3}, real training images {fd_real:.3} (not ImageNet FID)"
    );
    // Per-class accuracy: which classes the model has learnt.
    let per_class: Vec<String> = (0..classes)
        .map(|c| {
            let row = &gen_preds[c * args.per_class..(c + 1) * args.per_class];
            let ok = row.iter().filter(|&&p| p == c as i64).count();
            let name = info
                .classes
                .get(c)
                .cloned()
                .unwrap_or_else(|| c.to_string());
            format!("{name} {:.0}%", 100.0 * ok as f64 / args.per_class as f64)
        })
        .collect();
    println!("  per class: {}", per_class.join(", "));
    Ok(SampleQuality {
        samples: labels.len(),
        classifier_accuracy: accuracy,
        real_accuracy,
        frechet_distance: fd,
        frechet_distance_real: fd_real,
        reconstruction_accuracy: recon_accuracy,
        frechet_distance_reconstructions: fd_recon,
        feature_dim: dim,
        chance,
    })
}
