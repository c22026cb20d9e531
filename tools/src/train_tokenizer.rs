//! `mvar train-tokenizer`: trains the multi-scale VQVAE on an image folder or a CIFAR-style binary
//! data set, with resumable checkpoints, JSONL metrics, and an evaluation of reconstruction PSNR
//! and codebook usage per scale.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use mvar_engine::{Device, Error, Generator, Result};
use mvar_models::checkpoint::{load_training, save_training, TrainingState};
use mvar_models::data::{grid, save_png, Crop, DecodeAhead};

use crate::common::{load_split, load_training_split, spread_rows, DataOrder, PreprocessArg};
use crate::progress::{interrupted, memory_text, Metrics, Progress};
use mvar_models::tokenizer::{evaluate, EvalStats, TokenizerTrainConfig, TokenizerTrainer};
use mvar_models::{VqVae, VqVaeConfig};

#[derive(Args, Debug, Clone)]
pub struct TrainTokenizerArgs {
    /// Image folder (`root/<class>/<image>`) or CIFAR-style binary folder (`<split>.bin`).
    #[arg(long, default_value = "data/cifar10-subset")]
    pub data: PathBuf,
    /// How images are brought to the model's side.
    #[arg(long, value_enum, default_value_t = PreprocessArg::Official)]
    pub preprocess: PreprocessArg,
    /// Split used for training (a CIFAR-binary file name, or a subfolder of an image folder).
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Split used for evaluation (skipped when it does not exist).
    #[arg(long, default_value = "test")]
    pub val_split: String,
    /// Score the evaluation split (reconstruction PSNR, codebook usage per scale) before the
    /// first step, every this many steps and after the last, into val.jsonl and psnr.png (0:
    /// only after the last, into report.json).
    #[arg(long, default_value_t = 500)]
    pub eval_every: u64,
    /// At most this many images per evaluation (held-out, and the training split's figure in
    /// report.json), spread evenly over the split; 0: all.
    #[arg(long, default_value_t = 1000)]
    pub val_images: usize,
    /// Output folder for checkpoints, metrics and images.
    #[arg(long, default_value = "runs/tokenizer")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1500)]
    pub steps: u64,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Image side the tokenizer is trained at.
    #[arg(long, default_value_t = 32)]
    pub side: usize,
    /// A VQVAE config as JSON (official field names); overrides the size flags below.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    pub vocab: usize,
    #[arg(long, default_value_t = 32)]
    pub ch: usize,
    #[arg(long, default_value = "1,2,2")]
    pub ch_mult: String,
    #[arg(long, default_value_t = 32)]
    pub z_channels: usize,
    /// ResNet blocks per encoder level (the decoder has one more).
    #[arg(long, default_value_t = 2)]
    pub res_blocks: usize,
    /// Scales of the pyramid; the last must be side / 2^(levels-1).
    #[arg(long, default_value = "1,2,3,4,6,8")]
    pub patch_nums: String,
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 1.0)]
    pub l1: f64,
    #[arg(long, default_value_t = 1.0)]
    pub l2: f64,
    /// Weight of colour errors against brightness errors in the reconstruction loss (1 = plain
    /// RGB loss; see TokenizerTrainConfig::chroma).
    #[arg(long, default_value_t = 1.0)]
    pub chroma: f64,
    #[arg(long, default_value_t = 0.25)]
    pub beta: f64,
    /// Restart codes unused for this many steps (0 = never).
    #[arg(long, default_value_t = 100)]
    pub dead_after: u64,
    /// Activation recomputation (gradient checkpointing): keep only each residual block's input
    /// and run the block again in the backward, for a fraction of the memory at the cost of
    /// about one more forward of the blocks per step; the gradients are the same.
    #[arg(long)]
    pub recompute_activations: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 50)]
    pub log_every: u64,
    #[arg(long, default_value_t = 250)]
    pub checkpoint_every: u64,
    /// Continue from `<out>/tokenizer-train.safetensors`: weights, optimizer, RNG, step, data
    /// order and dead-code state.
    #[arg(long)]
    pub resume: bool,
    /// Start again even if --out holds a training checkpoint.
    #[arg(long)]
    pub overwrite: bool,
    /// Wall-clock budget in minutes for the whole command: after 10 steps the step count is set
    /// to what fits, at most --steps, and every 50 steps after that it is set again from the rate
    /// since step 10 (the learning rate is constant, so only the end moves).
    #[arg(long, value_parser = crate::common::parse_minutes)]
    pub minutes: Option<f64>,
    /// No horizontal flips.
    #[arg(long)]
    pub no_flip: bool,
}

fn list(s: &str, what: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|p| {
            p.trim().parse::<usize>().map_err(|_| {
                Error::invalid(
                    "train-tokenizer",
                    format!("--{what} {s:?}: expected numbers separated by commas"),
                )
            })
        })
        .collect()
}

/// The tokenizer's configuration: `--config`'s file, else the architecture flags.
pub(crate) fn tokenizer_config(args: &TrainTokenizerArgs) -> Result<VqVaeConfig> {
    Ok(match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::Io {
                path: p.display().to_string(),
                source: e,
            })?;
            serde_json::from_str::<VqVaeConfig>(&text).map_err(|e| Error::Format {
                what: p.display().to_string(),
                msg: e.to_string(),
            })?
        }
        None => VqVaeConfig {
            vocab_size: args.vocab,
            z_channels: args.z_channels,
            ch: args.ch,
            ch_mult: list(&args.ch_mult, "ch-mult")?,
            v_patch_nums: list(&args.patch_nums, "patch-nums")?,
            num_res_blocks: args.res_blocks,
            ..VqVaeConfig::default()
        },
    })
}

pub fn run(mut args: TrainTokenizerArgs, device: &Device) -> Result<()> {
    let t_cmd = Instant::now();
    let config = tokenizer_config(&args)?;
    config.validate()?;
    let latent = args.side / config.downsample();
    if latent * config.downsample() != args.side || config.v_patch_nums.last() != Some(&latent) {
        return Err(Error::invalid(
            "train-tokenizer",
            format!(
                "--side {} gives a {latent}x{latent} latent at downsampling {}; expected the last scale of {:?} to equal it",
                args.side,
                config.downsample(),
                config.v_patch_nums
            ),
        ));
    }
    if args.batch == 0 {
        return Err(Error::invalid(
            "train-tokenizer",
            "--batch 0: expected at least one image per step",
        ));
    }
    for (flag, value) in [
        ("--lr", args.lr),
        ("--l1", args.l1),
        ("--l2", args.l2),
        ("--chroma", args.chroma),
        ("--beta", args.beta),
    ] {
        crate::common::require_nonnegative("train-tokenizer", flag, value)?;
    }
    let t0 = Instant::now();
    let train = load_training_split(&args.data, &args.split, args.side, args.preprocess)?;
    let val = load_split(&args.data, &args.val_split, args.side, args.preprocess)?;
    println!(
        "data: {} training images, {} classes{}{} ({:.1}s)",
        train.len(),
        train.classes().len(),
        val.as_ref()
            .map(|v| format!(", {} validation images", v.len()))
            .unwrap_or_default(),
        crate::common::storage_note(&train),
        t0.elapsed().as_secs_f64()
    );
    std::fs::create_dir_all(&args.out).map_err(|e| Error::Io {
        path: args.out.display().to_string(),
        source: e,
    })?;
    let vae = VqVae::new(config.clone(), device, args.seed)?;
    println!(
        "tokenizer: {} parameters, vocab {}, scales {:?}",
        vae.params.num_elements(),
        config.vocab_size,
        config.v_patch_nums
    );
    let train_cfg = TokenizerTrainConfig {
        lr: args.lr,
        l1: args.l1,
        l2: args.l2,
        chroma: args.chroma,
        beta: args.beta,
        dead_after: args.dead_after,
        recompute_blocks: args.recompute_activations,
        ..TokenizerTrainConfig::default()
    };
    if args.recompute_activations {
        println!("residual block activations recomputed in the backward");
    }
    let mut trainer = TokenizerTrainer::new(vae, train_cfg)?;
    use crate::common::CALIBRATION_STEPS;
    let ckpt = args.out.join("tokenizer-train.safetensors");
    let mut rng = Generator::new(args.seed.wrapping_add(1));
    if args.resume {
        let state = load_training(&ckpt, &trainer.vae.named_tensors(), &mut trainer.opt)?;
        if let Some(saved) = state.extra.get("vqvae_config") {
            let saved: VqVaeConfig = serde_json::from_str(saved).map_err(|e| Error::Format {
                what: ckpt.display().to_string(),
                msg: e.to_string(),
            })?;
            if saved != config {
                return Err(Error::Format {
                    what: ckpt.display().to_string(),
                    msg: format!("checkpoint of another tokenizer config: {saved:?}; this run asks for {config:?}"),
                });
            }
        }
        trainer.set_step(state.step);
        if let Some(hits) = state.extra.get("code_last_hit") {
            let hits: Vec<u64> = serde_json::from_str(hits).map_err(|e| Error::Format {
                what: ckpt.display().to_string(),
                msg: format!("code_last_hit: {e}"),
            })?;
            trainer.set_code_last_hit(hits)?;
        }
        if let Some(total) = state.extra.get("total_steps").and_then(|v| v.parse().ok()) {
            args.steps = total;
            args.minutes = None;
        }
        if let Some(seed) = state.extra.get("seed").and_then(|v| v.parse().ok()) {
            args.seed = seed;
        }
        rng = Generator::from_state(state.rng);
        println!(
            "resumed from {} at step {} of {}",
            ckpt.display(),
            state.step,
            args.steps
        );
    } else if ckpt.exists() && !args.overwrite {
        return Err(Error::invalid(
            "mvar train-tokenizer",
            format!(
                "{} already holds a training checkpoint: pass --resume to continue it or --overwrite to start again",
                args.out.display()
            ),
        ));
    }
    let save = |trainer: &TokenizerTrainer, rng: &Generator, seed: u64, total: u64| -> Result<()> {
        let mut extra = BTreeMap::new();
        extra.insert(
            "vqvae_config".to_string(),
            serde_json::to_string(&config).unwrap_or_default(),
        );
        extra.insert(
            "code_last_hit".to_string(),
            serde_json::to_string(trainer.code_last_hit()).unwrap_or_default(),
        );
        extra.insert("total_steps".to_string(), total.to_string());
        extra.insert("seed".to_string(), seed.to_string());
        let state = TrainingState {
            step: trainer.step_count(),
            rng: rng.state(),
            extra,
        };
        save_training(&ckpt, &trainer.vae.named_tensors(), &trainer.opt, &state)
    };
    let mut metrics = Metrics::open(
        &args.out.join("metrics.jsonl"),
        args.resume.then(|| trainer.step_count()),
    )?;
    // The held-out figures during training: val.jsonl, cut back on resume as metrics.jsonl is.
    let mut val_log = match (&val, args.eval_every) {
        (Some(_), 1..) => Some(Metrics::open(
            &args.out.join("val.jsonl"),
            args.resume.then(|| trainer.step_count()),
        )?),
        _ => None,
    };
    // The last evaluation of the held-out split: its step and figures (the report reuses the
    // one after the last step), and what it took (a --minutes budget plans for the rest).
    let mut last_val: Option<(u64, EvalStats)> = None;
    let mut eval_seconds = 0.0;
    let score_held_out = |trainer: &TokenizerTrainer,
                          log: &mut Metrics,
                          last_val: &mut Option<(u64, EvalStats)>,
                          eval_seconds: &mut f64|
     -> Result<String> {
        let t0 = Instant::now();
        let held_out = val.as_ref().unwrap_or(&train);
        let rows = spread_rows(held_out.len(), args.val_images);
        let e = evaluate(&trainer.vae, held_out, &rows, 64, device)?;
        *eval_seconds = t0.elapsed().as_secs_f64();
        let step = trainer.step_count();
        log.write(&format!(
            "{{\"step\":{step},\"psnr\":{},\"images\":{},\"usage\":[{}]}}",
            e.psnr,
            e.images,
            e.usage
                .iter()
                .map(f64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ))?;
        let line = format!(
            "held-out at step {step}: reconstruction PSNR {:.2} dB over {} images, {:.1}s",
            e.psnr, e.images, eval_seconds
        );
        *last_val = Some((step, e));
        Ok(line)
    };
    if let Some(log) = val_log.as_mut().filter(|_| !args.resume) {
        println!(
            "{}",
            score_held_out(&trainer, log, &mut last_val, &mut eval_seconds)?
        );
    }
    let start = Instant::now();
    let first = trainer.step_count();
    let mut last_saved = first;
    let progress = Progress::new("tokenizer", first, args.steps);
    // Re-planning under --minutes (below): the --steps cap, and the start of the steady window.
    const REPLAN_EVERY: u64 = 50;
    let cap = args.steps;
    let mut steady_from: Option<(u64, Instant)> = None;
    let mut order = DataOrder::new(train.len(), args.seed);
    let mut ahead = DecodeAhead::new(&train);
    while trainer.step_count() < args.steps {
        let step = trainer.step_count() + 1;
        let idx = order.batch(args.batch, step);
        let decoded = ahead.take(&idx)?;
        let (x, _) = train.batch_from(&decoded, Crop::Random, !args.no_flip, &mut rng, device)?;
        drop(decoded);
        // A streamed folder's next batch is decoded while this step runs.
        let next = (step < args.steps).then(|| order.batch(args.batch, step + 1));
        let s = match ahead.while_running(next, || trainer.step(&x, &mut rng)) {
            Ok(s) => s,
            Err(e) => {
                progress.finish();
                return Err(Error::invalid(
                    "mvar train-tokenizer",
                    format!(
                        "stopped at step {step}: {e}; the last good checkpoint is {} (step {last_saved})",
                        ckpt.display()
                    ),
                ));
            }
        };
        metrics.write(&format!(
            "{{\"step\":{},\"loss\":{},\"recon_l1\":{},\"recon_l2\":{},\"vq_loss\":{},\"psnr\":{},\"grad_norm\":{},\"restarted\":{}}}",
            s.step, s.loss, s.recon_l1, s.recon_l2, s.vq_loss, s.psnr, s.grad_norm, s.restarted
        ))?;
        // The budget sets the step count after the calibration steps, and again every
        // REPLAN_EVERY steps from the rate since then: the first steps run slower (fresh
        // allocations, early code restarts), and the tokenizer's learning rate is constant, so a
        // later, better estimate changes nothing but where training stops.
        if let Some(min) = args.minutes {
            let since = s.step - first;
            if since == CALIBRATION_STEPS {
                // The evaluations still to come: one per --eval-every steps, and the last
                // (the later re-planning windows hold their share of them).
                let (per_step_eval, last_eval) = match val_log {
                    Some(_) => (eval_seconds / args.eval_every as f64, eval_seconds),
                    None => (0.0, 0.0),
                };
                let (total, line) = crate::common::budget_total_steps(
                    min,
                    0.1,
                    args.steps,
                    s.step,
                    t_cmd.elapsed() + Duration::from_secs_f64(last_eval),
                    start.elapsed()
                        + Duration::from_secs_f64(per_step_eval * CALIBRATION_STEPS as f64),
                    CALIBRATION_STEPS,
                );
                args.steps = total;
                progress.set_total(args.steps);
                progress.println(line);
                steady_from = Some((s.step, Instant::now()));
            } else if let Some((from, at)) = steady_from.filter(|_| since % REPLAN_EVERY == 0) {
                let (total, _) = crate::common::budget_total_steps(
                    min,
                    0.1,
                    cap,
                    s.step,
                    t_cmd.elapsed(),
                    at.elapsed(),
                    s.step - from,
                );
                // Never below the current step, so a slow stretch cannot end the run early.
                args.steps = total.max(s.step);
                progress.set_total(args.steps);
            }
        }
        let rate = progress.rate(s.step);
        progress.update(
            s.step,
            format!(
                "loss {:.4} psnr {:.2} dB | {:.0} img/s | {}",
                s.loss,
                s.psnr,
                rate * args.batch as f64,
                memory_text(device)
            ),
        );
        if s.step % args.log_every == 0 || s.step == args.steps {
            progress.println(format!(
                "step {:>6}/{} loss {:.4} (l1 {:.4} l2 {:.4} vq {:.4}) psnr {:.2} dB, {:.2} steps/s, {:.0} img/s, eta {:.0}s{}",
                s.step,
                args.steps,
                s.loss,
                s.recon_l1,
                s.recon_l2,
                s.vq_loss,
                s.psnr,
                rate,
                rate * args.batch as f64,
                (args.steps - s.step) as f64 / rate.max(1e-9),
                if s.restarted > 0 { format!(", {} codes restarted", s.restarted) } else { String::new() }
            ));
        }
        if let Some(log) = val_log
            .as_mut()
            .filter(|_| s.step % args.eval_every == 0 || s.step == args.steps)
        {
            progress.println(score_held_out(
                &trainer,
                log,
                &mut last_val,
                &mut eval_seconds,
            )?);
        }
        if s.step % args.checkpoint_every == 0 {
            save(&trainer, &rng, args.seed, args.steps)?;
            last_saved = s.step;
            tokenizer_curves(&args.out)?;
        }
        if interrupted() {
            save(&trainer, &rng, args.seed, args.steps)?;
            progress.finish();
            println!(
                "interrupted at step {}: wrote {}; continue with the same command and --resume",
                s.step,
                ckpt.display()
            );
            return Ok(());
        }
    }
    progress.finish();
    save(&trainer, &rng, args.seed, args.steps)?;
    let weights = args.out.join("tokenizer.safetensors");
    trainer.vae.save(&weights)?;
    let cfg_path = args.out.join("tokenizer.json");
    mvar_models::checkpoint::write_atomic(
        &cfg_path,
        serde_json::to_string_pretty(&config)
            .unwrap_or_default()
            .as_bytes(),
    )?;

    let (loss_png, psnr_png) = tokenizer_curves(&args.out)?;
    let mut report = serde_json::Map::new();
    let last_step = trainer.step_count();
    let mut last_val = last_val.filter(|(step, _)| *step == last_step);
    for (name, ds) in [("train", Some(&train)), ("val", val.as_ref())] {
        let Some(ds) = ds else { continue };
        let e = match last_val.take().filter(|_| name == "val") {
            Some((_, e)) => e,
            None => evaluate(
                &trainer.vae,
                ds,
                &spread_rows(ds.len(), args.val_images),
                64,
                device,
            )?,
        };
        let usage: Vec<String> = e
            .usage
            .iter()
            .map(|u| format!("{:.0}%", u * 100.0))
            .collect();
        println!(
            "{name}: reconstruction PSNR {:.2} dB over {} images; codebook usage per scale {}",
            e.psnr,
            e.images,
            usage.join(" ")
        );
        report.insert(
            name.to_string(),
            serde_json::json!({"psnr": e.psnr, "images": e.images, "usage_per_scale": e.usage}),
        );
    }
    mvar_models::checkpoint::write_atomic(
        &args.out.join("report.json"),
        serde_json::to_string_pretty(&serde_json::Value::Object(report))
            .unwrap_or_default()
            .as_bytes(),
    )?;
    // Reconstruction grid: originals in the top row, reconstructions below.
    let show = val.as_ref().unwrap_or(&train);
    let n = show.len().min(10);
    let (x, _) = show.batch(
        &(0..n).collect::<Vec<_>>(),
        Crop::Center,
        false,
        &mut Generator::new(0),
        device,
    )?;
    let rec = {
        let _ng = mvar_engine::no_grad();
        trainer.vae.idx_to_img(&trainer.vae.img_to_idx(&x)?)?
    };
    let both = mvar_ops::concat(&[&x, &rec], 0)?;
    let (px, h, w) = grid(&both, n)?;
    let png = args.out.join("recon.png");
    save_png(&png, &px, h, w)?;
    println!(
        "wrote {}, {}, {}, {}{}, {}, {} and {}",
        weights.display(),
        cfg_path.display(),
        ckpt.display(),
        metrics.path().display(),
        val_log
            .as_ref()
            .map(|v| format!(", {}", v.path().display()))
            .unwrap_or_default(),
        loss_png.display(),
        psnr_png.display(),
        png.display()
    );
    Ok(())
}

/// The tokenizer's curves: `loss.png` (training loss) and `psnr.png` (training and held-out
/// reconstruction PSNR).
fn tokenizer_curves(dir: &std::path::Path) -> Result<(PathBuf, PathBuf)> {
    use crate::plot::{read_metric, smooth, training_and_held_out};
    let metrics = dir.join("metrics.jsonl");
    Ok((
        training_and_held_out(
            dir,
            "loss.png",
            "tokenizer loss (L1 + L2 + commitment)",
            (
                "training (20-step mean)",
                &smooth(&read_metric(&metrics, "loss"), 20),
            ),
            "loss",
            true,
        )?,
        training_and_held_out(
            dir,
            "psnr.png",
            "tokenizer reconstruction PSNR (dB)",
            (
                "training (20-step mean)",
                &smooth(&read_metric(&metrics, "psnr"), 20),
            ),
            "psnr",
            false,
        )?,
    ))
}
