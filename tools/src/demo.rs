//! `mvar demo`: the main job. Trains a small tokenizer and a small MVAR (or VAR) on the bundled
//! data set within a wall-clock budget, then writes a class-conditional sample grid (one row per
//! class), a reconstruction grid and loss curves, and says where they are.

use std::path::PathBuf;

use clap::Args;
use mvar_engine::{Device, Result};

use crate::classifier::TrainClassifierArgs;
use crate::common::PreprocessArg;
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
    /// evaluation classifier, the rest data preparation, sampling, evaluation and plots).
    #[arg(long, default_value_t = 10.0)]
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

pub fn run(args: DemoArgs, device: &Device) -> Result<()> {
    let tok_dir = args.out.join("tokenizer");
    let model_dir = args.out.join(if args.model == Kind::Mvar {
        "mvar"
    } else {
        "var"
    });
    println!("== 1/5 tokenizer ({:.1} min budget)", args.minutes * 0.45);
    crate::train_tokenizer::run(
        TrainTokenizerArgs {
            data: args.data.clone(),
            preprocess: args.preprocess,
            split: "train".into(),
            val_split: "test".into(),
            eval_every: 500,
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
            minutes: Some(args.minutes * 0.45),
        },
        device,
    )?;
    println!(
        "== 2/5 {} ({:.1} min budget)",
        if args.model == Kind::Mvar {
            "MVAR"
        } else {
            "VAR"
        },
        args.minutes * 0.42
    );
    crate::train::run(
        TrainArgs {
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
            micro_batch: 0,
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
            minutes: Some(args.minutes * 0.42),
        },
        device,
    )?;
    let classifier_dir = args.out.join("classifier");
    println!(
        "== 3/5 evaluation classifier ({:.1} min budget)",
        args.minutes * 0.10
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
            minutes: Some(args.minutes * 0.10),
        },
        device,
    )?;
    println!("== 4/5 evaluation");
    let report = crate::eval::evaluate(
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
    )?;
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
