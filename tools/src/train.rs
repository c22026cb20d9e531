//! `mvar train`: trains a VAR or MVAR transformer on the token maps of a data set, made by a
//! trained tokenizer. Resumable (atomic training checkpoints), JSONL metrics, and a grid of
//! class-conditional samples at the end.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use mvar_engine::{Device, Error, Generator, Result};
use mvar_models::checkpoint::{load_training, save_training, write_atomic, TrainingState};
use mvar_models::metrics::ScaleEval;
use mvar_models::trainer::{ArTrainConfig, ArTrainer};
use mvar_models::{MvarConfig, VarConfig, VqVae, VqVaeConfig};

use crate::common::{
    build_model, io, load_split, load_tokenizer, load_training_split, spread_rows, DataOrder,
    ModelInfo, PreprocessArg,
};
use crate::eval::{teacher_forced, HeldOut};
use crate::progress::{interrupted, memory_text, Metrics, Progress};
use crate::sample::SamplingArgs;
use crate::token_cache::TokenCache;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    Auto,
    F32,
    Bf16,
}

impl Precision {
    /// The autocast dtype on `device`.
    pub fn autocast(self, device: &Device) -> Option<mvar_engine::DType> {
        match self {
            Precision::Bf16 => Some(mvar_engine::DType::BF16),
            Precision::F32 => None,
            Precision::Auto => device.is_cuda().then_some(mvar_engine::DType::BF16),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Var,
    Mvar,
}

/// `--model`: var or mvar, optionally with the depth as the official names write it
/// (`var-d16`, `mvar-d16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelName {
    pub kind: Kind,
    pub depth: Option<usize>,
}

impl From<Kind> for ModelName {
    fn from(kind: Kind) -> Self {
        ModelName { kind, depth: None }
    }
}

impl std::str::FromStr for ModelName {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (name, depth) = match s.split_once("-d") {
            Some((n, d)) => (
                n,
                Some(d.parse::<usize>().ok().filter(|&d| d > 0).ok_or_else(|| {
                    format!("{s:?}: the depth after -d must be a positive integer")
                })?),
            ),
            None => (s, None),
        };
        let kind = match name {
            "var" => Kind::Var,
            "mvar" => Kind::Mvar,
            _ => return Err(format!("{s:?}: expected var, mvar, var-dN or mvar-dN")),
        };
        Ok(ModelName { kind, depth })
    }
}

/// `--micro-batch`: sequences per pass (0: the whole batch in one pass) or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MicroBatch {
    Passes(usize),
    /// The whole batch, halved while a step runs out of GPU memory.
    Auto,
}

impl MicroBatch {
    /// The passes a run starts with (0: the whole batch).
    pub fn passes(self) -> usize {
        match self {
            MicroBatch::Passes(n) => n,
            MicroBatch::Auto => 0,
        }
    }
}

impl std::str::FromStr for MicroBatch {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(MicroBatch::Auto),
            _ => s.parse().map(MicroBatch::Passes).map_err(|_| {
                format!(
                    "{s:?}: expected a number of sequences per pass (0: the whole batch) or auto"
                )
            }),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// var (block-causal, KV-cache sampling) or mvar (scale- and spatial-Markov), optionally with
    /// the depth: var-d16, mvar-d16.
    #[arg(long, default_value = "mvar")]
    pub model: ModelName,
    /// Transformer depth (width 64 * depth and depth heads unless --width / --heads); a depth in
    /// --model (var-d16) takes precedence.
    #[arg(long, default_value_t = 4)]
    pub depth: usize,
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    /// A tokenizer folder from `mvar train-tokenizer`.
    #[arg(long, default_value = "runs/tokenizer")]
    pub tokenizer: PathBuf,
    #[arg(long, default_value = "data/cifar10-subset")]
    pub data: PathBuf,
    /// How images are brought to the model's side.
    #[arg(long, value_enum, default_value_t = PreprocessArg::Official)]
    pub preprocess: PreprocessArg,
    #[arg(long, default_value = "train")]
    pub split: String,
    /// The held-out split scored during training: teacher-forced loss and token accuracy per
    /// scale, into val.jsonl and the loss plot. Skipped when the data set has no such split.
    #[arg(long, default_value = "test")]
    pub val_split: String,
    /// Score the held-out split before the first step, every this many steps and after the
    /// last (0: never). The weights of the lowest held-out loss so far are kept in --out/best/,
    /// a model folder that sample, edit and eval take.
    #[arg(long, default_value_t = 250)]
    pub eval_every: u64,
    /// Stop once this many evaluations in a row have not lowered the held-out loss per token
    /// (0: never); best/ keeps the lowest. Needs held-out scoring (--eval-every and the split).
    #[arg(long, default_value_t = 0)]
    pub early_stop: u64,
    /// At most this many held-out images per evaluation, spread evenly over the split (an image
    /// folder lists its classes in turn, so the first ones would be a few classes); 0: all.
    #[arg(long, default_value_t = 1000)]
    pub val_images: usize,
    #[arg(long, default_value = "runs/mvar")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 2000)]
    pub steps: u64,
    /// At most this many passes over the token cache (every image with and without its flip):
    /// caps --steps (and a --minutes budget) for small data sets, where more passes only overfit.
    #[arg(long)]
    pub epochs: Option<f64>,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Gradient accumulation: run each step's --batch as passes of this many sequences whose
    /// gradients add up before the update, so a batch that does not fit in memory trains with
    /// the memory of one pass; the loss and the learning-rate rule stay --batch's. 0: one pass.
    /// auto: one pass until a step runs out of GPU memory, then passes of half as many
    /// sequences (again as needed), the step run again from the same random draws
    #[arg(long, default_value = "auto")]
    pub micro_batch: MicroBatch,
    /// Activation recomputation (gradient checkpointing): keep only each transformer block's
    /// input and run the block again in the backward, for a fraction of the memory at the cost
    /// of about one more forward per step; the gradients are the same.
    #[arg(long)]
    pub recompute_activations: bool,
    /// Learning rate per 256 images (peak = base * batch / 256).
    #[arg(long, default_value_t = 1e-4)]
    pub base_lr: f64,
    #[arg(long, default_value_t = 100)]
    pub warmup: u64,
    #[arg(long, default_value_t = 0.1)]
    pub wpe: f64,
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Probability of training a sample with the null class (classifier-free guidance).
    #[arg(long, default_value_t = 0.1)]
    pub cond_drop: f64,
    /// Drop-path (stochastic depth) rate of the last block, rising linearly from 0 at the first;
    /// default the official 0.1 * depth / 24.
    #[arg(long)]
    pub drop_path: Option<f64>,
    /// MVAR: first scale with neighbourhood attention (default: the official 8 where every scale
    /// from 8 on is at least the kernel size, else the first scale that is).
    #[arg(long)]
    pub refine_step: Option<usize>,
    #[arg(long, default_value_t = 7)]
    pub kernel_size: usize,
    /// Start from the weights of a VAR/MVAR folder or a .safetensors file with the official
    /// names (fine-tuning VAR into MVAR); loaded strictly.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 50)]
    pub log_every: u64,
    #[arg(long, default_value_t = 250)]
    pub checkpoint_every: u64,
    /// Continue the checkpoint in --out (train.safetensors): weights, optimizer, RNG, step,
    /// schedule and data order.
    #[arg(long)]
    pub resume: bool,
    /// Start again even if --out holds a training checkpoint.
    #[arg(long)]
    pub overwrite: bool,
    /// Wall-clock budget in minutes for the whole command: after 10 steps the step count (and
    /// the learning-rate schedule) is set to what fits, at most --steps.
    #[arg(long, value_parser = crate::common::parse_minutes)]
    pub minutes: Option<f64>,
    /// Mixed precision: bf16 (autocast: GEMMs, attention and convolutions in bf16 with f32
    /// accumulation, f32 master weights), f32, or auto (bf16 on a GPU, f32 on the CPU; on a
    /// CPU with AVX512-BF16, see `mvar info`, bf16 trains faster).
    #[arg(long, value_enum, default_value = "auto")]
    pub precision: Precision,
    /// Sampling of the grid written at the end.
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// The transformer's configuration of a run: `args`' depth (a depth in `--model` first), width,
/// heads and regularisation on the tokenizer's pyramid, latent and vocabulary, for `classes`
/// classes; and for MVAR its neighbourhood settings.
pub(crate) fn model_configs(
    args: &TrainArgs,
    vae: &VqVaeConfig,
    classes: usize,
) -> (VarConfig, Option<MvarConfig>) {
    let pns = vae.v_patch_nums.clone();
    let mut var_cfg = VarConfig::with_depth(args.model.depth.unwrap_or(args.depth));
    var_cfg.embed_dim = args.width.unwrap_or(0);
    var_cfg.num_heads = args.heads.unwrap_or(0);
    var_cfg.num_classes = classes;
    var_cfg.cvae = vae.z_channels;
    var_cfg.vocab_size = vae.vocab_size;
    var_cfg.cond_drop_rate = args.cond_drop;
    if let Some(rate) = args.drop_path {
        var_cfg.drop_path_rate = rate;
    }
    let mvar_cfg = (args.model.kind == Kind::Mvar)
        .then(|| crate::common::mvar_config(&pns, args.refine_step, args.kernel_size));
    var_cfg.patch_nums = pns;
    (var_cfg, mvar_cfg)
}

/// The optimisation settings of a run of `args.steps` steps on `device`.
pub(crate) fn trainer_config(args: &TrainArgs, device: &Device) -> ArTrainConfig {
    ArTrainConfig {
        base_lr: args.base_lr,
        batch: args.batch,
        total_steps: args.steps,
        warmup_steps: args.warmup.min(args.steps / 2),
        wpe: args.wpe,
        weight_decay: args.weight_decay,
        weight_decay_end: args.weight_decay,
        autocast: args.precision.autocast(device),
        micro_batch: args.micro_batch.passes(),
        shrink_on_oom: args.micro_batch == MicroBatch::Auto,
        recompute_blocks: args.recompute_activations,
        ..ArTrainConfig::default()
    }
}

pub fn run(mut args: TrainArgs, device: &Device) -> Result<()> {
    let t_cmd = Instant::now();
    if args.batch == 0 {
        return Err(Error::invalid(
            "mvar train",
            "--batch 0: expected at least one sequence per step",
        ));
    }
    for (flag, value) in [
        ("--base-lr", args.base_lr),
        ("--wpe", args.wpe),
        ("--weight-decay", args.weight_decay),
    ] {
        crate::common::require_nonnegative("mvar train", flag, value)?;
    }
    let t0 = Instant::now();
    let vae = load_tokenizer(&args.tokenizer, device)?;
    let pns = vae.config.v_patch_nums.clone();
    let side = pns.last().copied().unwrap_or(1) * vae.config.downsample();
    let train = load_training_split(&args.data, &args.split, side, args.preprocess)?;
    let Some((cache, built)) =
        TokenCache::open_or_build(&args.tokenizer, &args.split, &vae, &train, true, device)?
    else {
        // Ctrl-C: the rows tokenized so far are kept, and the same command continues them.
        return Ok(());
    };
    println!(
        "data: {} images of {} classes at {side}x{side}{}; {} token cache {} ({} sequences of {} tokens, with and without flips, {:.1}s)",
        train.len(),
        train.classes().len(),
        crate::common::storage_note(&train),
        if built { "wrote the" } else { "reusing the" },
        cache.path().display(),
        cache.len(),
        cache.seq_len(),
        t0.elapsed().as_secs_f64()
    );
    let held_out = if args.eval_every == 0 {
        None
    } else {
        held_out_cache(&args, &vae, train.classes(), side, device)?
    };
    if interrupted() {
        // While the held-out cache was built (its rows so far are kept, as the training one's).
        return Ok(());
    }
    if args.early_stop > 0 && held_out.is_none() {
        return Err(Error::invalid(
            "mvar train",
            format!(
                "--early-stop {} needs held-out scores, and {}: expected --eval-every > 0 and a held-out split",
                args.early_stop,
                if args.eval_every == 0 {
                    "--eval-every is 0".to_string()
                } else {
                    format!(
                        "{} has no split {:?}",
                        args.data.display(),
                        args.val_split
                    )
                }
            ),
        ));
    }
    if let Some(epochs) = args.epochs {
        if !(epochs.is_finite() && epochs > 0.0) {
            return Err(Error::invalid(
                "mvar train",
                format!("--epochs {epochs}: expected a number of passes > 0"),
            ));
        }
        let cap = ((epochs * cache.len() as f64) / args.batch.max(1) as f64).ceil() as u64;
        if cap.max(1) < args.steps {
            args.steps = cap.max(1);
            println!(
                "epochs: {epochs} passes over {} sequences at batch {} cap the run at {} steps",
                cache.len(),
                args.batch,
                args.steps
            );
        }
    }
    if let Some(d) = args.model.depth {
        args.depth = d;
    }
    let (var_cfg, mvar_cfg) = model_configs(&args, &vae.config, train.classes().len());
    let info = ModelInfo {
        kind: if args.model.kind == Kind::Var {
            "var"
        } else {
            "mvar"
        }
        .into(),
        var: var_cfg,
        mvar: mvar_cfg,
        tokenizer: std::fs::canonicalize(&args.tokenizer)
            .unwrap_or(args.tokenizer.clone())
            .display()
            .to_string(),
        classes: train.classes().to_vec(),
    };
    std::fs::create_dir_all(&args.out).map_err(io(&args.out))?;
    let model = build_model(&info, device, args.seed)?;
    if let Some(init) = &args.init_from {
        // A model folder or a .safetensors file (e.g. an official VAR converted with `mvar
        // convert`), loaded strictly: every parameter present with its shape, nothing else.
        let file = if init.is_dir() {
            init.join("model.safetensors")
        } else {
            init.clone()
        };
        let report = model.var().load(&file)?;
        if !report.unexpected.is_empty() {
            return Err(Error::Format {
                what: file.display().to_string(),
                msg: format!(
                    "--init-from holds tensors this {} does not have: {:?} (a checkpoint of another model?)",
                    info.kind, report.unexpected
                ),
            });
        }
        println!(
            "initialised from {} ({} tensors)",
            file.display(),
            report.loaded
        );
    }
    println!(
        "{}: depth {}, width {}, {} heads, {:.2} M parameters, scales {:?}{}",
        info.kind,
        info.var.depth,
        info.var.width(),
        info.var.heads(),
        model.params().num_elements() as f64 / 1e6,
        pns,
        info.mvar
            .as_ref()
            .map(|m| format!(
                ", neighbourhood attention {}x{} from scale {}",
                m.kernel_size, m.kernel_size, m.refine_step
            ))
            .unwrap_or_default()
    );
    let cfg = trainer_config(&args, device);
    println!(
        "precision: {}{}{}",
        match cfg.autocast {
            Some(_) => "bf16 autocast (f32 master weights)",
            None => "f32",
        },
        match cfg.micro_batch {
            m if m == 0 || m >= cfg.batch => String::new(),
            m => format!(
                "; batch {} in {} passes of at most {m} (gradient accumulation)",
                cfg.batch,
                cfg.batch.div_ceil(m)
            ),
        },
        if cfg.recompute_blocks {
            "; block activations recomputed in the backward"
        } else {
            ""
        }
    );
    let mut trainer = ArTrainer::new(model, cfg)?;
    use crate::common::CALIBRATION_STEPS;
    let ckpt = args.out.join("train.safetensors");
    let mut rng = Generator::new(args.seed.wrapping_add(17));
    let info_json = serde_json::to_string(&info).unwrap_or_default();
    let mut resumed_best = None;
    if args.resume {
        let state = load_training(
            &ckpt,
            &trainer.model.var().named_tensors(),
            &mut trainer.opt,
        )?;
        if let Some(saved) = state.extra.get("model") {
            let saved: ModelInfo = serde_json::from_str(saved).map_err(|e| Error::Format {
                what: ckpt.display().to_string(),
                msg: e.to_string(),
            })?;
            if saved.kind != info.kind || saved.var != info.var || saved.mvar != info.mvar {
                return Err(Error::Format {
                    what: ckpt.display().to_string(),
                    msg: format!(
                        "checkpoint of another model: {} {:?}; this run asks for {} {:?}",
                        saved.kind, saved.var, info.kind, info.var
                    ),
                });
            }
        }
        // The schedule and the data order are part of the run: a resumed run keeps the
        // checkpoint's, whatever the flags say now.
        if let Some(total) = state.extra.get("total_steps").and_then(|v| v.parse().ok()) {
            args.steps = total;
            args.minutes = None;
        }
        if let Some(seed) = state.extra.get("seed").and_then(|v| v.parse().ok()) {
            args.seed = seed;
        }
        // The passes a batch runs in decide the drop-path draws and the summation order.
        // With `auto` the passes it had come down to, and it may halve them again.
        if let Some(mb) = state.extra.get("micro_batch").and_then(|v| v.parse().ok()) {
            if args.micro_batch != MicroBatch::Auto {
                args.micro_batch = MicroBatch::Passes(mb);
            }
            trainer.config.micro_batch = mb;
        }
        trainer.config.total_steps = args.steps;
        if let Some(w) = state.extra.get("warmup_steps").and_then(|v| v.parse().ok()) {
            trainer.config.warmup_steps = w;
        }
        trainer.set_step(state.step);
        rng = Generator::from_state(state.rng);
        resumed_best = BestHeldOut::from_extra(&state.extra);
        println!(
            "resumed from {} at step {} of {}",
            ckpt.display(),
            state.step,
            args.steps
        );
        let best_weights = args.out.join("best").join("model.safetensors");
        if let Some(best) = resumed_best.filter(|_| !best_weights.exists()) {
            println!(
                "warning: {} is gone: it held the lowest held-out loss, {:.4} at step {}; only a lower one writes it again",
                best_weights.display(),
                best.loss,
                best.step
            );
        }
    } else if ckpt.exists() && !args.overwrite {
        return Err(Error::invalid(
            "mvar train",
            format!(
                "{} already holds a training checkpoint: pass --resume to continue it or --overwrite to start again",
                args.out.display()
            ),
        ));
    }
    // The seed is passed, not captured: the loop changes other fields of `args`.
    let save = |trainer: &ArTrainer,
                rng: &Generator,
                seed: u64,
                validation: &Option<Validation>|
     -> Result<()> {
        let mut extra = BTreeMap::new();
        if let Some(best) = best_of(validation, resumed_best) {
            best.to_extra(&mut extra);
        }
        extra.insert("model".to_string(), info_json.clone());
        extra.insert(
            "total_steps".to_string(),
            trainer.config.total_steps.to_string(),
        );
        extra.insert(
            "warmup_steps".to_string(),
            trainer.config.warmup_steps.to_string(),
        );
        extra.insert("seed".to_string(), seed.to_string());
        extra.insert(
            "micro_batch".to_string(),
            trainer.config.micro_batch.to_string(),
        );
        let state = TrainingState {
            step: trainer.step_count(),
            rng: rng.state(),
            extra,
        };
        save_training(
            &ckpt,
            &trainer.model.var().named_tensors(),
            &trainer.opt,
            &state,
        )
    };
    let mut metrics = Metrics::open(
        &args.out.join("metrics.jsonl"),
        args.resume.then(|| trainer.step_count()),
    )?;
    let n = cache.len();
    let tokens_per_row = cache.seq_len();
    // The held-out figures: val.jsonl, cut back on resume as metrics.jsonl is. A fresh run scores
    // the untrained model first (the curve's start, and the cost a --minutes budget plans for).
    let mut validation = match held_out {
        Some(held_out) => Some(Validation {
            log: Metrics::open(
                &args.out.join("val.jsonl"),
                args.resume.then(|| trainer.step_count()),
            )?,
            rows: spread_rows(held_out.len(), args.val_images),
            cache: held_out,
            batch: match trainer.config.micro_batch {
                0 => args.batch,
                m => m.min(args.batch),
            },
            seconds: 0.0,
            best_dir: args.out.join("best"),
            best: resumed_best,
            info_json: serde_json::to_string_pretty(&info).unwrap_or_default(),
        }),
        None => None,
    };
    if !args.resume {
        // A fresh run's best/ is its own: the files of a run this one replaces go now, before
        // its first evaluation writes them again (or, with no held-out split, never does).
        for file in ["model.safetensors", "model.json"] {
            let path = args.out.join("best").join(file);
            if path.exists() {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
    }
    if let Some(v) = validation.as_mut().filter(|_| !args.resume) {
        println!("{}", v.run(&trainer, &vae, device)?);
    }
    let start = Instant::now();
    let first = trainer.step_count();
    let progress = Progress::new(&info.kind, first, args.steps);
    let mut last_saved = first;
    // The step count planned before an early stop.
    let mut stopped_early = None;
    let mut order = DataOrder::new(n, args.seed);
    while trainer.step_count() < args.steps {
        let step = trainer.step_count() + 1;
        let idx = order.batch(args.batch, step);
        let (g, x, lab) = cache.batch(&idx, &vae, device)?;
        let passes_before = trainer.config.micro_batch;
        let s = match trainer.step(&lab, &g, &x, &mut rng) {
            Ok(s) => {
                let now = trainer.config.micro_batch;
                if now != passes_before {
                    let before = match passes_before {
                        0 => args.batch,
                        m => m.min(args.batch),
                    };
                    progress.println(format!(
                        "step {step}: out of GPU memory in passes of {before} sequences; passes of \
                         {now} from here on (--micro-batch auto)"
                    ));
                }
                s
            }
            Err(e) => {
                progress.finish();
                return Err(Error::invalid(
                    "mvar train",
                    format!(
                        "stopped at step {step}: {e}; the last good checkpoint is {} (step {last_saved})",
                        ckpt.display()
                    ),
                ));
            }
        };
        // `{}` of an f64 is its shortest exact decimal: a resumed run's curve can be compared
        // with an uninterrupted one bit for bit.
        metrics.write(&format!(
            "{{\"step\":{},\"loss\":{},\"token_loss\":{},\"accuracy\":{},\"lr\":{},\"grad_norm\":{},\"scales\":[{},{}]}}",
            s.step, s.loss, s.token_loss, s.accuracy, s.lr, s.grad_norm, s.scales.start, s.scales.end
        ))?;
        if let Some(min) = args.minutes.filter(|_| s.step - first == CALIBRATION_STEPS) {
            // The evaluations still to come: one per --eval-every steps, and the last.
            let eval_seconds = validation.as_ref().map_or(0.0, |v| v.seconds);
            let per_step_eval = eval_seconds / args.eval_every.max(1) as f64;
            let (total, line) = crate::common::budget_total_steps(
                min,
                0.08,
                args.steps,
                s.step,
                t_cmd.elapsed() + Duration::from_secs_f64(eval_seconds),
                start.elapsed() + Duration::from_secs_f64(per_step_eval * CALIBRATION_STEPS as f64),
                CALIBRATION_STEPS,
            );
            args.steps = total;
            trainer.config.total_steps = args.steps;
            trainer.config.warmup_steps = trainer.config.warmup_steps.min(args.steps / 10).max(1);
            progress.set_total(args.steps);
            progress.println(line);
        }
        let rate = progress.rate(s.step);
        progress.update(
            s.step,
            format!(
                "loss {:.4} acc {:.3} | {:.0} img/s {:.0} tok/s | {}",
                s.loss,
                s.accuracy,
                rate * args.batch as f64,
                rate * (args.batch * tokens_per_row) as f64,
                memory_text(device)
            ),
        );
        if s.step % args.log_every == 0 || s.step == args.steps {
            progress.println(format!(
                "step {:>6}/{} loss {:.4} ({:.4} per token) acc {:.3} lr {:.2e} |g| {:.3}, {:.2} steps/s, {:.0} img/s, eta {:.0}s",
                s.step,
                args.steps,
                s.loss,
                s.token_loss,
                s.accuracy,
                s.lr,
                s.grad_norm,
                rate,
                rate * args.batch as f64,
                (args.steps - s.step) as f64 / rate.max(1e-9)
            ));
        }
        if let Some(v) = validation
            .as_mut()
            .filter(|_| s.step % args.eval_every == 0 || s.step == args.steps)
        {
            progress.println(v.run(&trainer, &vae, device)?);
            if let Some(best) = v
                .best
                .filter(|b| args.early_stop > 0 && b.evals_since >= args.early_stop)
                .filter(|_| s.step < args.steps)
            {
                // The run ends here, its checkpoint included: the schedule's total becomes this
                // step, so --resume finds nothing left to train and writes the outputs again.
                progress.println(format!(
                    "early stop at step {} of {}: {} held-out evaluations in a row without a loss per token below {:.4} (step {})",
                    s.step, args.steps, best.evals_since, best.loss, best.step
                ));
                stopped_early = Some(args.steps);
                args.steps = s.step;
                trainer.config.total_steps = s.step;
            }
        }
        if s.step % args.checkpoint_every == 0 {
            save(&trainer, &rng, args.seed, &validation)?;
            last_saved = s.step;
            crate::plot::transformer_curves(&args.out, &info.kind, pns.len())?;
        }
        if interrupted() {
            save(&trainer, &rng, args.seed, &validation)?;
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
    save(&trainer, &rng, args.seed, &validation)?;
    let (loss_png, lr_png) = crate::plot::transformer_curves(&args.out, &info.kind, pns.len())?;
    let weights = args.out.join("model.safetensors");
    trainer.model.var().save(&weights)?;
    write_atomic(
        &args.out.join("model.json"),
        serde_json::to_string_pretty(&info)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let grid = args.out.join("samples.png");
    // Decoded from the drawn tokens, so not beside more_smooth samples.
    let progression = (!args.sampling.more_smooth).then(|| args.out.join("progression.png"));
    let sc = args.sampling.config();
    crate::sample::class_grid(
        &trainer.model,
        &vae,
        &info,
        8,
        sc,
        args.seed,
        &grid,
        progression.as_deref(),
    )?;
    println!(
        "wrote {}, {}, {}{}, {}, {}, {}{}",
        weights.display(),
        args.out.join("model.json").display(),
        metrics.path().display(),
        validation
            .as_ref()
            .map(|v| format!(", {}", v.log.path().display()))
            .unwrap_or_default(),
        loss_png.display(),
        lr_png.display(),
        grid.display(),
        progression
            .map(|p| format!(" and {}", p.display()))
            .unwrap_or_default()
    );
    if let Some((v, best)) = validation.as_ref().and_then(|v| Some((v, v.best?))) {
        println!(
            "the lowest held-out loss per token, {:.4}, was at step {} of {}{}: {}",
            best.loss,
            best.step,
            args.steps,
            stopped_early
                .map(|planned| format!(" (stopped early; {planned} were planned)"))
                .unwrap_or_default(),
            if v.best_dir.join("model.safetensors").exists() {
                format!(
                    "its weights are in {} (a model folder, as {} is)",
                    v.best_dir.display(),
                    args.out.display()
                )
            } else {
                format!("its weights were removed from {}", v.best_dir.display())
            }
        );
    }
    Ok(())
}

/// The held-out split's token cache (no flips), or None, with a line saying so, when the data
/// set has no such split.
fn held_out_cache(
    args: &TrainArgs,
    vae: &VqVae,
    train_classes: &[String],
    side: usize,
    device: &Device,
) -> Result<Option<TokenCache>> {
    let Some(val) = load_split(&args.data, &args.val_split, side, args.preprocess)? else {
        println!(
            "validation: no held-out split {:?} in {} ({}.bin or the folder {}/): none during training",
            args.val_split,
            args.data.display(),
            args.val_split,
            args.val_split
        );
        return Ok(None);
    };
    if val.classes() != train_classes {
        return Err(Error::invalid(
            "mvar train",
            format!(
                "the held-out split {:?} of {} has the classes {:?}; the training split has {:?} (expected the same, in the same order)",
                args.val_split,
                args.data.display(),
                val.classes(),
                train_classes
            ),
        ));
    }
    let Some((cache, _)) =
        TokenCache::open_or_build(&args.tokenizer, &args.val_split, vae, &val, false, device)?
    else {
        return Ok(None);
    };
    println!(
        "validation: {} of the {} held-out images of the {:?} split, before the first step, every {} steps and after the last, into val.jsonl{}",
        spread_rows(cache.len(), args.val_images).len(),
        cache.len(),
        args.val_split,
        args.eval_every,
        if args.val_split == args.split {
            " (it is the training split: these figures measure fit, not generalisation)"
        } else {
            ""
        }
    );
    Ok(Some(cache))
}

/// Scores the held-out split during training.
struct Validation {
    cache: TokenCache,
    rows: Vec<usize>,
    batch: usize,
    log: Metrics,
    /// What the last evaluation took (with writing best/).
    seconds: f64,
    /// The model folder of the lowest held-out loss so far: model.safetensors (its step and
    /// loss in the metadata) and model.json.
    best_dir: PathBuf,
    best: Option<BestHeldOut>,
    info_json: String,
}

/// The evaluation of the lowest held-out loss per token so far. The training checkpoint
/// records it, so that a resumed run compares its evaluations with the same figure and ends
/// with the best/ of an uninterrupted run (an evaluation after the checkpoint, which the
/// resumed run repeats, gives the same weights again).
#[derive(Debug, Clone, Copy, PartialEq)]
struct BestHeldOut {
    step: u64,
    loss: f64,
    /// The evaluations since this one that did not lower the loss (--early-stop counts them).
    evals_since: u64,
}

impl BestHeldOut {
    fn to_extra(self, extra: &mut BTreeMap<String, String>) {
        extra.insert("best_held_out_step".into(), self.step.to_string());
        // `{}` of an f64 parses back to the same bits.
        extra.insert("best_held_out_loss".into(), self.loss.to_string());
        extra.insert(
            "held_out_evals_since_best".into(),
            self.evals_since.to_string(),
        );
    }

    fn from_extra(extra: &BTreeMap<String, String>) -> Option<Self> {
        Some(BestHeldOut {
            step: extra.get("best_held_out_step")?.parse().ok()?,
            loss: extra.get("best_held_out_loss")?.parse().ok()?,
            evals_since: extra
                .get("held_out_evals_since_best")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        })
    }
}

/// The best evaluation to record in a checkpoint: a run resumed without held-out scoring keeps
/// the one it resumed with.
fn best_of(validation: &Option<Validation>, resumed: Option<BestHeldOut>) -> Option<BestHeldOut> {
    validation.as_ref().map_or(resumed, |v| v.best)
}

impl Validation {
    /// Scores the model as it is now (in the training precision, no gradients, nothing drawn
    /// from the training's generator, so the training curve is the same with or without it),
    /// appends the figures to val.jsonl and returns the line to print.
    fn run(&mut self, trainer: &ArTrainer, vae: &VqVae, device: &Device) -> Result<String> {
        let t0 = Instant::now();
        let figures: HeldOut = {
            let _precision = mvar_engine::autocast(trainer.config.autocast)?;
            teacher_forced(
                &trainer.model,
                &self.cache,
                vae,
                &self.rows,
                self.batch,
                device,
            )?
        };
        let step = trainer.step_count();
        let list = |f: fn(&ScaleEval) -> f64| {
            figures
                .scales
                .iter()
                .map(|s| f(s).to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        self.log.write(&format!(
            "{{\"step\":{step},\"loss\":{},\"accuracy\":{},\"sequences\":{},\"scale_loss\":[{}],\"scale_accuracy\":[{}]}}",
            figures.loss,
            figures.accuracy,
            figures.sequences,
            list(|s| s.loss),
            list(|s| s.accuracy)
        ))?;
        // Strictly lower: of equal figures the earlier weights stay. A NaN loss is never best.
        let improved =
            figures.loss.is_finite() && self.best.is_none_or(|best| figures.loss < best.loss);
        if improved {
            self.write_best(trainer, step, &figures)?;
        } else if let Some(best) = self.best.as_mut() {
            best.evals_since += 1;
        }
        self.seconds = t0.elapsed().as_secs_f64();
        let last = figures.scales.last();
        Ok(format!(
            "held-out at step {step}: loss per token {:.4}, accuracy {:.3} (last scale {:.4}, {:.3}), {} images, {:.1}s{}",
            figures.loss,
            figures.accuracy,
            last.map_or(f64::NAN, |s| s.loss),
            last.map_or(f64::NAN, |s| s.accuracy),
            figures.sequences,
            self.seconds,
            match self.best {
                _ if improved => format!(", the lowest so far: wrote {}", self.best_dir.display()),
                Some(best) => format!(
                    " (the lowest: {:.4} at step {}, {} evaluation{} ago)",
                    best.loss,
                    best.step,
                    best.evals_since,
                    if best.evals_since == 1 { "" } else { "s" }
                ),
                None => String::new(),
            }
        ))
    }

    /// Writes the model as it is now to best/: the weights (atomically, their step and
    /// held-out figures in the metadata), then model.json, so a folder with model.json is
    /// complete.
    fn write_best(&mut self, trainer: &ArTrainer, step: u64, figures: &HeldOut) -> Result<()> {
        let meta = std::collections::HashMap::from([
            ("mvar.best.step".to_string(), step.to_string()),
            (
                "mvar.best.held_out_loss_per_token".to_string(),
                figures.loss.to_string(),
            ),
            (
                "mvar.best.held_out_accuracy".to_string(),
                figures.accuracy.to_string(),
            ),
        ]);
        mvar_models::checkpoint::write_safetensors(
            &self.best_dir.join("model.safetensors"),
            &trainer.model.var().named_tensors(),
            Some(meta),
        )?;
        write_atomic(&self.best_dir.join("model.json"), self.info_json.as_bytes())?;
        self.best = Some(BestHeldOut {
            step,
            loss: figures.loss,
            evals_since: 0,
        });
        Ok(())
    }
}
