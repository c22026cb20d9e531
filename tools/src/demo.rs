//! `mvar demo`: the main job. Trains a small tokenizer and a small MVAR (or VAR) on the bundled
//! data set within a wall-clock budget, then writes a class-conditional sample grid (one row per
//! class), a reconstruction grid and loss curves, and says where they are.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use mvar_engine::{Device, Generator, Result};
use mvar_models::trainer::{ArModel, ArTrainer};
use mvar_models::{Mixing, Mvar, Var, VqVae};

use crate::classifier::TrainClassifierArgs;
use crate::common::{load_split, load_training_split, PreprocessArg};
use crate::eval::EvalArgs;
use crate::plot::{line_plot, pyramid_token_loss, read_metric, smooth, Series};
use crate::sample::SamplingArgs;
use crate::train::{Kind, TrainArgs};
use crate::train_tokenizer::TrainTokenizerArgs;

/// Sampling of the demo's grid and evaluation: strong guidance and a short top-k, since a model
/// trained for minutes spreads mass over many poor tokens. Chosen by a sweep over three earlier
/// demo runs' models (docs/performance.md): against cfg 2 / top-p 0.96 it took the classifier
/// accuracy of the samples from 14.8-25.6 % to 26.0-47.6 % and more than halved the Frechet
/// distance.
const DEMO_SAMPLING: SamplingArgs = SamplingArgs {
    cfg: 8.0,
    top_k: 3,
    top_p: 0.0,
    more_smooth: false,
};

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// mvar (default) or var.
    #[arg(long, value_enum, default_value = "mvar")]
    pub model: Kind,
    /// Total wall-clock budget in minutes (split 45 % tokenizer, 42 % transformer, 10 % the
    /// evaluation classifier, the rest data preparation, sampling, evaluation and plots; what
    /// the transformer's capped steps will not use of its share, timed before the tokenizer
    /// starts, goes to the tokenizer).
    #[arg(long, default_value_t = 10.0, value_parser = crate::common::parse_minutes)]
    pub minutes: f64,
    /// Upper bounds on the steps, so that a GPU finishes early instead of filling the budget.
    #[arg(long, default_value_t = 3000)]
    pub tokenizer_steps: u64,
    #[arg(long, default_value_t = 4000)]
    pub model_steps: u64,
    #[arg(long, default_value_t = 1500)]
    pub classifier_steps: u64,
    /// At most this many passes of the transformer over the token cache (see `mvar train
    /// --epochs`). On the bundled 1000 images the held-out loss and the samples got worse past
    /// ~16-20 passes: with one tokenizer, 969 steps (15.5 passes) gave held-out loss 5.23 and
    /// 66.0 % of samples labelled with their class, 1762 steps (28 passes) 5.86 and 51.5 %.
    #[arg(long, default_value_t = 16.0)]
    pub model_epochs: f64,
    /// Codebook size of the tokenizer.
    #[arg(long, default_value_t = 512)]
    pub vocab: usize,
    /// Weight of colour errors against brightness errors in the tokenizer's loss (see
    /// `mvar train-tokenizer --help`). 6 against the plain RGB loss's 1 took the demo's samples
    /// from 55.5 % to 67.0 % by the classifier, with visibly coloured reconstructions.
    #[arg(long, default_value_t = 6.0)]
    pub chroma: f64,
    #[arg(long, default_value = "data/cifar10-subset")]
    pub data: PathBuf,
    /// How images are brought to 32 x 32 (see `mvar train --help`).
    #[arg(long, value_enum, default_value_t = PreprocessArg::Official)]
    pub preprocess: PreprocessArg,
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The demo's budget shares (of `--minutes`): the tokenizer, the transformer and the evaluation
/// classifier; the rest is data preparation, sampling, evaluation and plots.
const TOKENIZER_SHARE: f64 = 0.45;
const TRANSFORMER_SHARE: f64 = 0.42;
const CLASSIFIER_SHARE: f64 = 0.10;

/// Minutes of the tokenizer and of the transformer.
#[derive(Debug)]
struct BudgetPlan {
    tokenizer_minutes: f64,
    transformer_minutes: f64,
    /// How the split was made, for the tokenizer's heading.
    note: String,
}

/// Splits the budget between the tokenizer and the transformer. The transformer's steps are
/// capped (`--model-steps`, `--model-epochs`: more passes over the bundled set overfit), so on a
/// fast machine they take a fraction of its share, while the tokenizer's reconstructions, which
/// bound what any transformer can sample, keep improving with more steps. So the transformer's
/// step time is taken first, on a fresh model of the demo's size and random token maps (it does
/// not depend on the tokenizer's weights), and what its capped steps and held-out evaluations
/// will not use of its share, less a margin, goes to the tokenizer. The transformer keeps a
/// `--minutes` budget of what it was planned to need, so a slower run than timed trains fewer
/// steps instead of overrunning the demo's budget.
fn plan_budget(
    args: &DemoArgs,
    tok: &TrainTokenizerArgs,
    model: &TrainArgs,
    device: &Device,
) -> Result<BudgetPlan> {
    let t0 = Instant::now();
    let transformer_share = args.minutes * TRANSFORMER_SHARE;
    let vae_cfg = crate::train_tokenizer::tokenizer_config(tok)?;
    vae_cfg.validate()?;
    let train = load_training_split(&model.data, &model.split, tok.side, model.preprocess)?;
    let held_out = load_split(&model.data, &model.val_split, tok.side, model.preprocess)?
        .map_or(0, |d| d.len());
    // The token cache holds every image with and without its flip (`mvar train --epochs`).
    let sequences = 2 * train.len();
    let mut steps = model.steps;
    if let Some(epochs) = model.epochs {
        let cap = (epochs * sequences as f64 / model.batch.max(1) as f64).ceil();
        steps = steps.min(cap.max(1.0) as u64);
    }
    let step_s = time_transformer_step(&vae_cfg, model, train.classes().len(), device)?;
    let evaluations = if model.eval_every == 0 || held_out == 0 {
        0
    } else {
        steps / model.eval_every + 2
    };
    // An evaluation is a forward over the held-out split (no backward, no update): about a third
    // of a step per batch.
    let eval_s =
        (evaluations as usize * held_out.div_ceil(model.batch.max(1))) as f64 * step_s / 3.0;
    let need_s = steps as f64 * step_s + eval_s;
    let (tokenizer_minutes, transformer_minutes) =
        split_budget(args.minutes, need_s, t0.elapsed().as_secs_f64());
    Ok(BudgetPlan {
        tokenizer_minutes,
        transformer_minutes,
        note: format!(
            "; the transformer's {steps} steps at {step_s:.3} s each, with {evaluations} held-out evaluations, should take {:.1} of its {transformer_share:.1} min, timed in {:.1} s",
            need_s / 60.0,
            t0.elapsed().as_secs_f64()
        ),
    })
}

/// (tokenizer, transformer) minutes of a `minutes` budget when the transformer's capped steps
/// should take `need_s` seconds and `spent_s` went into timing them: the transformer gets what
/// it needs with a margin (the first steps run slower than the timed ones, and the phase also
/// tokenizes the data set and samples its grids), at most its share; the tokenizer its share,
/// plus what the transformer leaves of its own, less the seconds spent.
fn split_budget(minutes: f64, need_s: f64, spent_s: f64) -> (f64, f64) {
    let share = minutes * TRANSFORMER_SHARE;
    let transformer = ((1.3 * need_s + 20.0) / 60.0).min(share);
    let tokenizer = (minutes * TOKENIZER_SHARE + share - transformer - spent_s / 60.0).max(0.0);
    (tokenizer, transformer)
}

/// Seconds per training step of the transformer `model` describes, on the tokenizer `vae`'s
/// pyramid, averaged over one cycle of its segments (MVAR's ratio_k : 1 : 1 ...) after one
/// untimed cycle (kernels compiled, buffers and optimizer state created).
fn time_transformer_step(
    vae: &mvar_models::VqVaeConfig,
    model: &TrainArgs,
    classes: usize,
    device: &Device,
) -> Result<f64> {
    let (var_cfg, mvar_cfg) = crate::train::model_configs(model, vae, classes);
    let ar = match mvar_cfg {
        Some(m) => ArModel::Mvar(Mvar::new(var_cfg, m, device, model.seed)?),
        None => ArModel::Var(Var::new(var_cfg, device, model.seed, Mixing::BlockCausal)?),
    };
    let cycle = match &ar {
        ArModel::Var(_) => 3,
        ArModel::Mvar(m) => m.config.ratio_k.max(1) + m.segments().len().saturating_sub(1),
    };
    let mut trainer = ArTrainer::new(ar, crate::train::trainer_config(model, device))?;
    let tokenizer = VqVae::new(vae.clone(), device, model.seed)?;
    let mut rng = Generator::new(model.seed);
    let (gt, x_in) = crate::bench::random_batch(&tokenizer, model.batch, &mut rng)?;
    let labels = crate::bench::random_labels(model.batch, classes.max(1), &mut rng);
    for _ in 0..cycle {
        trainer.step(&labels, &gt, &x_in, &mut rng)?;
    }
    device.synchronize()?;
    let t = Instant::now();
    for _ in 0..cycle {
        trainer.step(&labels, &gt, &x_in, &mut rng)?;
    }
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / cycle as f64)
}

/// Whether Ctrl-C stopped the phase that just ended (it wrote its checkpoint): then the demo
/// ends there rather than starting the next phase on an unfinished model.
fn stopped() -> bool {
    let stopped = crate::progress::interrupted();
    if stopped {
        println!("demo: stopped by Ctrl-C; run it again with the same flags to start over");
    }
    stopped
}

pub fn run(args: DemoArgs, device: &Device) -> Result<()> {
    let tok_dir = args.out.join("tokenizer");
    let model_dir = args.out.join(if args.model == Kind::Mvar {
        "mvar"
    } else {
        "var"
    });
    let mut tok_args = TrainTokenizerArgs {
        data: args.data.clone(),
        preprocess: args.preprocess,
        split: "train".into(),
        val_split: "test".into(),
        eval_every: 500,
        val_images: 0,
        out: tok_dir.clone(),
        steps: args.tokenizer_steps,
        batch: 16,
        side: 32,
        config: None,
        vocab: args.vocab,
        ch: 32,
        ch_mult: "1,2,2".into(),
        z_channels: 32,
        res_blocks: 1,
        patch_nums: "1,2,3,4,6,8".into(),
        lr: 1e-3,
        l1: 1.0,
        l2: 1.0,
        chroma: args.chroma,
        beta: 0.25,
        dead_after: 10,
        recompute_activations: false,
        seed: args.seed,
        log_every: 50,
        checkpoint_every: 500,
        resume: false,
        overwrite: true,
        no_flip: false,
        minutes: None,
    };
    let mut model_args = TrainArgs {
        model: args.model.into(),
        depth: 4,
        width: Some(192),
        heads: Some(3),
        tokenizer: tok_dir.clone(),
        data: args.data.clone(),
        preprocess: args.preprocess,
        split: "train".into(),
        val_split: "test".into(),
        eval_every: 200,
        early_stop: 0,
        val_images: 0,
        out: model_dir.clone(),
        steps: args.model_steps,
        epochs: Some(args.model_epochs),
        batch: 32,
        micro_batch: crate::train::MicroBatch::Auto,
        recompute_activations: false,
        base_lr: 8e-3,
        warmup: 50,
        wpe: 0.1,
        weight_decay: 0.05,
        cond_drop: 0.1,
        drop_path: None,
        refine_step: None,
        kernel_size: 5,
        init_from: None,
        seed: args.seed,
        log_every: 50,
        checkpoint_every: 500,
        resume: false,
        overwrite: true,
        sampling: DEMO_SAMPLING,
        precision: crate::train::Precision::Auto,
        minutes: None,
    };
    let plan = plan_budget(&args, &tok_args, &model_args, device)?;
    tok_args.minutes = Some(plan.tokenizer_minutes);
    model_args.minutes = Some(plan.transformer_minutes);
    println!(
        "== 1/5 tokenizer ({:.1} min budget{})",
        plan.tokenizer_minutes, plan.note
    );
    crate::train_tokenizer::run(tok_args, device)?;
    if stopped() {
        return Ok(());
    }
    println!(
        "== 2/5 {} ({:.1} min budget)",
        if args.model == Kind::Mvar {
            "MVAR"
        } else {
            "VAR"
        },
        plan.transformer_minutes
    );
    crate::train::run(model_args, device)?;
    if stopped() {
        return Ok(());
    }
    let classifier_dir = args.out.join("classifier");
    println!(
        "== 3/5 evaluation classifier ({:.1} min budget)",
        args.minutes * CLASSIFIER_SHARE
    );
    crate::classifier::run(
        TrainClassifierArgs {
            data: args.data.clone(),
            preprocess: args.preprocess,
            split: "train".into(),
            val_split: "test".into(),
            out: classifier_dir.clone(),
            steps: args.classifier_steps,
            batch: 64,
            lr: 2e-3,
            weight_decay: 0.05,
            channels: "32,64,128".into(),
            blocks: 1,
            side: 32,
            seed: args.seed,
            log_every: 100,
            checkpoint_every: 250,
            resume: false,
            overwrite: true,
            minutes: Some(args.minutes * CLASSIFIER_SHARE),
        },
        device,
    )?;
    if stopped() {
        return Ok(());
    }
    println!("== 4/5 evaluation");
    let Some(report) = crate::eval::evaluate(
        &EvalArgs {
            ckpt: model_dir.clone(),
            classifier: Some(classifier_dir.clone()),
            data: args.data.clone(),
            preprocess: args.preprocess,
            split: "test".into(),
            per_class: 20,
            sampling: DEMO_SAMPLING,
            seed: args.seed,
            batch: 32,
            out: None,
        },
        device,
    )?
    else {
        stopped();
        return Ok(());
    };
    println!("== 5/5 plots");
    let tok = smooth(&read_metric(&tok_dir.join("metrics.jsonl"), "loss"), 20);
    let info: crate::common::ModelInfo = crate::common::read_json(&model_dir.join("model.json"))?;
    let model = pyramid_token_loss(&model_dir.join("metrics.jsonl"), info.var.patch_nums.len());
    let held_out = read_metric(&model_dir.join("val.jsonl"), "loss");
    let lr = read_metric(&model_dir.join("metrics.jsonl"), "lr");
    let loss_png = args.out.join("loss.png");
    line_plot(
        &loss_png,
        "loss: tokenizer (20-step mean) and transformer (per token over all scales)",
        "step",
        &[
            Series {
                name: "tokenizer",
                points: &tok,
                color: [30, 90, 200],
            },
            Series {
                name: "transformer",
                points: &model,
                color: [200, 40, 40],
            },
            Series {
                name: "transformer held-out",
                points: &held_out,
                color: [230, 140, 20],
            },
        ],
        true,
    )?;
    let lr_png = args.out.join("lr.png");
    line_plot(
        &lr_png,
        "transformer learning rate",
        "step",
        &[Series {
            name: "lr",
            points: &lr,
            color: [20, 140, 60],
        }],
        false,
    )?;
    println!(
        "\ndone. samples (one row per class): {}\ncoarse to fine (the image after each scale): {}\nreconstructions (top: originals): {}\nloss curves: {} and {}\nevaluation: {}",
        model_dir.join("samples.png").display(),
        model_dir.join("progression.png").display(),
        tok_dir.join("recon.png").display(),
        loss_png.display(),
        lr_png.display(),
        model_dir.join("eval.json").display()
    );
    if let Some(q) = &report.sample_quality {
        println!(
            "the classifier labels {:.1}% of the samples with their class (real held-out images: {:.1}%, chance {:.1}%)",
            100.0 * q.classifier_accuracy,
            100.0 * q.real_accuracy,
            100.0 * q.chance
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tokenizer_gets_what_the_transformer_will_not_use() {
        // 10 minutes: shares 4.5 and 4.2. A transformer that needs 60 s gets 1.3 * 60 + 20 = 98 s.
        let (tok, tr) = split_budget(10.0, 60.0, 0.0);
        assert!((tr - 98.0 / 60.0).abs() < 1e-12, "{tr}");
        assert!((tok - (4.5 + 4.2 - 98.0 / 60.0)).abs() < 1e-12, "{tok}");
        // The two phases never take more than their shares together, less the timing.
        let (tok, tr) = split_budget(10.0, 60.0, 3.0);
        assert!((tok + tr - (8.7 - 0.05)).abs() < 1e-12, "{tok} + {tr}");
        // A slow transformer keeps its share, and the tokenizer its own.
        let (tok, tr) = split_budget(10.0, 1e4, 0.0);
        assert!(
            (tok - 4.5).abs() < 1e-12 && (tr - 4.2).abs() < 1e-12,
            "{tok}, {tr}"
        );
        // Nothing negative from a tiny budget.
        let (tok, tr) = split_budget(0.01, 1e4, 60.0);
        assert!(tok == 0.0 && tr > 0.0);
    }
}
