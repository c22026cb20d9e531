//! `mvar train-classifier`: trains the small image classifier of `mvar_models::classifier` on
//! the bundled data set (or any image data set). `mvar eval` scores generated images with it:
//! the share that it labels with the class they were sampled for, and a Frechet distance in its
//! feature space. Resumable like the other training commands (atomic checkpoints, JSONL metrics,
//! Ctrl-C writes a checkpoint).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use mvar_engine::{no_grad, Device, Error, Generator, Result, Tensor};
use mvar_models::checkpoint::{load_training, save_training, write_atomic, TrainingState};
use mvar_models::classifier::{Classifier, ClassifierConfig};
use mvar_models::data::{Crop, DecodeAhead, ImageDataset};
use mvar_ops::{self as ops, AdamW, AdamWConfig};

use crate::common::{io, load_split, load_training_split, read_json, DataOrder, PreprocessArg};
use crate::progress::{interrupted, memory_text, Metrics, Progress};

#[derive(Args, Debug, Clone)]
pub struct TrainClassifierArgs {
    #[arg(long, default_value = "data/cifar10-subset")]
    pub data: PathBuf,
    /// How images are brought to the model's side.
    #[arg(long, value_enum, default_value_t = PreprocessArg::Official)]
    pub preprocess: PreprocessArg,
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Held-out split for the accuracy report (skipped when the data set has none).
    #[arg(long, default_value = "test")]
    pub val_split: String,
    #[arg(long, default_value = "runs/classifier")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1500)]
    pub steps: u64,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Peak learning rate (linear warm-up over 5 % of the steps, then cosine decay to 0).
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Channels per stage, comma-separated; each stage after the first halves the resolution.
    #[arg(long, default_value = "32,64,128")]
    pub channels: String,
    /// Residual blocks per stage.
    #[arg(long, default_value_t = 1)]
    pub blocks: usize,
    /// Side of the square images (the data set is centre/random-cropped to it).
    #[arg(long, default_value_t = 32)]
    pub side: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 100)]
    pub log_every: u64,
    #[arg(long, default_value_t = 250)]
    pub checkpoint_every: u64,
    /// Continue the checkpoint in --out (train.safetensors).
    #[arg(long)]
    pub resume: bool,
    /// Start again even if --out holds a training checkpoint.
    #[arg(long)]
    pub overwrite: bool,
    /// Wall-clock budget in minutes: after 10 steps the step count (and the schedule) is set to
    /// what fits, at most --steps.
    #[arg(long, value_parser = crate::common::parse_minutes)]
    pub minutes: Option<f64>,
}

/// Learning rate at `step` (1-based) of `total`: linear warm-up, then half a cosine to 0.
fn lr_at(peak: f64, step: u64, total: u64) -> f64 {
    let warm = (total / 20).max(1);
    if step <= warm {
        return peak * step as f64 / warm as f64;
    }
    let t = (step - warm) as f64 / (total - warm).max(1) as f64;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
}

/// Loads a classifier folder written by `mvar train-classifier`.
pub fn load_classifier(dir: &Path, device: &Device) -> Result<Classifier> {
    let cfg: ClassifierConfig = read_json(&crate::common::folder_file(
        dir,
        crate::common::FolderKind::Classifier,
    )?)?;
    let c = Classifier::new(cfg, device, 0)?;
    c.load(&dir.join("classifier.safetensors"))?;
    Ok(c)
}

/// Features [N, F] (f64, row-major) and top-1 predictions of images [N, 3, S, S], in batches.
pub fn features_and_predictions(
    classifier: &Classifier,
    images: &Tensor,
) -> Result<(Vec<f64>, Vec<i64>)> {
    let _ng = no_grad();
    let n = images.dims()[0];
    let mut feats = Vec::new();
    let mut preds = Vec::new();
    for start in (0..n).step_by(128) {
        let x = ops::narrow(images, 0, start, 128.min(n - start))?;
        let (f, l) = classifier.features_and_logits(&x)?;
        feats.extend(f.to_vec_f64()?);
        preds.extend(ops::argmax(&l, -1, false)?.to_vec::<i64>()?);
    }
    Ok((feats, preds))
}

/// The images of a data set in order, centre-cropped, 64 at a time: `each` gets a batch
/// [b, 3, S, S] and its labels. Only one batch is held at a time (for a streamed data set, the
/// next one is decoded meanwhile), so a held-out set of any size fits.
pub fn each_image_batch(
    data: &ImageDataset,
    device: &Device,
    mut each: impl FnMut(&Tensor, &[i64]) -> Result<()>,
) -> Result<()> {
    let idx: Vec<usize> = (0..data.len()).collect();
    data.each_centre_batch(&idx, 64, device, |x, rows| {
        let labels: Vec<i64> = rows.iter().map(|&i| data.label(i) as i64).collect();
        each(x, &labels)
    })
}

/// Top-1 accuracy of `classifier` over a data set.
pub fn accuracy_on(classifier: &Classifier, data: &ImageDataset, device: &Device) -> Result<f64> {
    let (mut preds, mut labels) = (Vec::new(), Vec::new());
    each_image_batch(data, device, |x, l| {
        preds.extend(features_and_predictions(classifier, x)?.1);
        labels.extend_from_slice(l);
        Ok(())
    })?;
    Ok(top1_accuracy(&preds, &labels))
}

/// Share of `preds` equal to `labels` (0 for none).
pub fn top1_accuracy(preds: &[i64], labels: &[i64]) -> f64 {
    let hits = preds.iter().zip(labels).filter(|(p, l)| p == l).count();
    hits as f64 / labels.len().max(1) as f64
}

pub fn run(mut args: TrainClassifierArgs, device: &Device) -> Result<()> {
    const OP: &str = "mvar train-classifier";
    let t_cmd = Instant::now();
    let train = load_training_split(&args.data, &args.split, args.side, args.preprocess)?;
    let val = load_split(&args.data, &args.val_split, args.side, args.preprocess)?;
    let channels: Vec<usize> = args
        .channels
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| {
            Error::invalid(
                OP,
                format!(
                    "--channels {:?}: expected comma-separated positive integers",
                    args.channels
                ),
            )
        })?;
    let config = ClassifierConfig {
        channels,
        blocks: args.blocks,
        num_classes: train.classes().len(),
        image_size: args.side,
        ..ClassifierConfig::new(train.classes().len())
    };
    if args.batch == 0 || args.steps == 0 {
        return Err(Error::invalid(OP, "--batch and --steps must be positive"));
    }
    println!(
        "data: {} training images of {} classes at {s}x{s}{}{}",
        train.len(),
        train.classes().len(),
        val.as_ref()
            .map(|v| format!(", {} held out", v.len()))
            .unwrap_or_default(),
        crate::common::storage_note(&train),
        s = args.side
    );
    std::fs::create_dir_all(&args.out).map_err(io(&args.out))?;
    let classifier = Classifier::new(config.clone(), device, args.seed)?;
    println!(
        "classifier: channels {:?}, {} block(s) per stage, {:.2} M parameters",
        config.channels,
        config.blocks,
        classifier.params.num_elements() as f64 / 1e6
    );
    let mut opt = AdamW::new(
        &classifier.params,
        AdamWConfig {
            lr: args.lr,
            weight_decay: args.weight_decay,
            beta2: 0.999,
            ..AdamWConfig::default()
        },
        |_, t| t.rank() <= 1,
    )?;
    let ckpt = args.out.join("train.safetensors");
    let mut rng = Generator::new(args.seed.wrapping_add(29));
    let config_json = serde_json::to_string(&config).unwrap_or_default();
    let mut step = 0u64;
    if args.resume {
        let state = load_training(&ckpt, &classifier.named_tensors(), &mut opt)?;
        if let Some(saved) = state.extra.get("classifier") {
            let saved: ClassifierConfig =
                serde_json::from_str(saved).map_err(|e| Error::Format {
                    what: ckpt.display().to_string(),
                    msg: e.to_string(),
                })?;
            if saved != config {
                return Err(Error::Format {
                    what: ckpt.display().to_string(),
                    msg: format!(
                        "checkpoint of another classifier: {saved:?}; this run asks for {config:?}"
                    ),
                });
            }
        }
        if let Some(total) = state.extra.get("total_steps").and_then(|v| v.parse().ok()) {
            args.steps = total;
            args.minutes = None;
        }
        if let Some(seed) = state.extra.get("seed").and_then(|v| v.parse().ok()) {
            args.seed = seed;
        }
        step = state.step;
        rng = Generator::from_state(state.rng);
        println!(
            "resumed from {} at step {step} of {}",
            ckpt.display(),
            args.steps
        );
    } else if ckpt.exists() && !args.overwrite {
        return Err(Error::invalid(
            OP,
            format!(
                "{} already holds a training checkpoint: pass --resume to continue it or --overwrite to start again",
                args.out.display()
            ),
        ));
    }
    let save = |opt: &AdamW, rng: &Generator, step: u64, total: u64, seed: u64| -> Result<()> {
        let mut extra = BTreeMap::new();
        extra.insert("classifier".to_string(), config_json.clone());
        extra.insert("total_steps".to_string(), total.to_string());
        extra.insert("seed".to_string(), seed.to_string());
        let state = TrainingState {
            step,
            rng: rng.state(),
            extra,
        };
        save_training(&ckpt, &classifier.named_tensors(), opt, &state)
    };
    let mut metrics = Metrics::open(&args.out.join("metrics.jsonl"), args.resume.then_some(step))?;
    use crate::common::CALIBRATION_STEPS;
    let first = step;
    let mut last_saved = step;
    let start = Instant::now();
    let progress = Progress::new("classifier", first, args.steps);
    let mut order = DataOrder::new(train.len(), args.seed);
    let mut ahead = DecodeAhead::new(&train);
    while step < args.steps {
        step += 1;
        let idx = order.batch(args.batch, step);
        // Random crops (when the images are larger than --side) and mirrors.
        let decoded = ahead.take(&idx)?;
        let (x, y) = train.batch_from(&decoded, Crop::Random, true, &mut rng, device)?;
        drop(decoded);
        let lr = lr_at(args.lr, step, args.steps);
        opt.config.lr = lr;
        // A streamed folder's next batch is decoded while this step runs.
        let next = (step < args.steps).then(|| order.batch(args.batch, step + 1));
        let (loss_value, accuracy) = ahead.while_running(next, || -> Result<(f64, f64)> {
            classifier.params.zero_grad();
            let logits = classifier.logits(&x)?;
            let loss = ops::mean_all(&ops::cross_entropy(&logits, &y, None, 0.0)?)?;
            let loss_value = loss.to_f64()?;
            if !loss_value.is_finite() {
                return Ok((loss_value, f64::NAN));
            }
            let accuracy = {
                let _ng = no_grad();
                let pred = ops::argmax(&logits, -1, false)?.to_vec::<i64>()?;
                top1_accuracy(&pred, &y.to_vec::<i64>()?)
            };
            loss.backward()?;
            opt.step(&classifier.params)?;
            Ok((loss_value, accuracy))
        })?;
        if !loss_value.is_finite() {
            progress.finish();
            return Err(Error::invalid(
                OP,
                format!(
                    "stopped at step {step}: the loss is {loss_value}; the last good checkpoint is {} (step {last_saved})",
                    ckpt.display()
                ),
            ));
        }
        metrics.write(&format!(
            "{{\"step\":{step},\"loss\":{loss_value},\"accuracy\":{accuracy},\"lr\":{lr}}}"
        ))?;
        if let Some(min) = args.minutes.filter(|_| step - first == CALIBRATION_STEPS) {
            let (total, line) = crate::common::budget_total_steps(
                min,
                0.05,
                args.steps,
                step,
                t_cmd.elapsed(),
                start.elapsed(),
                CALIBRATION_STEPS,
            );
            args.steps = total;
            progress.set_total(args.steps);
            progress.println(line);
        }
        let rate = progress.rate(step);
        progress.update(
            step,
            format!(
                "loss {loss_value:.4} acc {accuracy:.3} | {:.0} img/s | {}",
                rate * args.batch as f64,
                memory_text(device)
            ),
        );
        if step.is_multiple_of(args.log_every) || step == args.steps {
            progress.println(format!(
                "step {step:>6}/{} loss {loss_value:.4} acc {accuracy:.3} lr {lr:.2e}, {:.0} img/s",
                args.steps,
                rate * args.batch as f64
            ));
        }
        if step.is_multiple_of(args.checkpoint_every) {
            save(&opt, &rng, step, args.steps, args.seed)?;
            last_saved = step;
        }
        if interrupted() {
            save(&opt, &rng, step, args.steps, args.seed)?;
            progress.finish();
            println!(
                "interrupted at step {step}: wrote {}; continue with the same command and --resume",
                ckpt.display()
            );
            return Ok(());
        }
    }
    progress.finish();
    save(&opt, &rng, step, args.steps, args.seed)?;
    let weights = args.out.join("classifier.safetensors");
    classifier.save(&weights)?;
    let cfg_path = args.out.join("classifier.json");
    write_atomic(
        &cfg_path,
        serde_json::to_string_pretty(&config)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let mut report = serde_json::Map::new();
    for (name, ds) in [("train", Some(&train)), ("val", val.as_ref())] {
        let Some(ds) = ds else { continue };
        let acc = accuracy_on(&classifier, ds, device)?;
        println!(
            "{name}: accuracy {:.1}% over {} images (chance {:.1}%)",
            100.0 * acc,
            ds.len(),
            100.0 / ds.classes().len() as f64
        );
        report.insert(
            name.to_string(),
            serde_json::json!({"accuracy": acc, "images": ds.len()}),
        );
    }
    write_atomic(
        &args.out.join("report.json"),
        serde_json::to_string_pretty(&serde_json::Value::Object(report))
            .unwrap_or_default()
            .as_bytes(),
    )?;
    println!(
        "wrote {}, {}, {} and {}",
        weights.display(),
        cfg_path.display(),
        ckpt.display(),
        metrics.path().display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_warms_up_then_decays_to_zero() {
        assert!((lr_at(1.0, 1, 100) - 0.2).abs() < 1e-12);
        assert!((lr_at(1.0, 5, 100) - 1.0).abs() < 1e-12);
        assert!(lr_at(1.0, 50, 100) < 1.0 && lr_at(1.0, 50, 100) > 0.0);
        assert!(lr_at(1.0, 100, 100).abs() < 1e-12);
    }
}
