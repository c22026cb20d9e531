//! `mvar demo`: the main job. Trains a small tokenizer and a small MVAR (or VAR) on the bundled
//! data set within a wall-clock budget, then writes a class-conditional sample grid (one row per
//! class), a reconstruction grid and loss curves, and says where they are.

use std::path::PathBuf;

use clap::Args;
use mvar_engine::{Device, Result};

use crate::plot::{line_plot, read_metric, smooth, Series};
use crate::train::{Kind, TrainArgs};
use crate::train_tokenizer::TrainTokenizerArgs;

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// mvar (default) or var.
    #[arg(long, value_enum, default_value = "mvar")]
    pub model: Kind,
    /// Total wall-clock budget in minutes (split 40 % tokenizer, 50 % transformer, the rest
    /// data preparation, sampling and plots).
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// Upper bounds on the steps, so that a GPU finishes early instead of filling the budget.
    #[arg(long, default_value_t = 3000)]
    pub tokenizer_steps: u64,
    #[arg(long, default_value_t = 4000)]
    pub model_steps: u64,
    #[arg(long, default_value = "data/cifar10-subset")]
    pub data: PathBuf,
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
    println!("== 1/3 tokenizer ({:.1} min budget)", args.minutes * 0.4);
    crate::train_tokenizer::run(
        TrainTokenizerArgs {
            data: args.data.clone(),
            split: "train".into(),
            val_split: "test".into(),
            out: tok_dir.clone(),
            steps: args.tokenizer_steps,
            batch: 32,
            side: 32,
            config: None,
            vocab: 512,
            ch: 32,
            ch_mult: "1,2,2".into(),
            z_channels: 32,
            res_blocks: 1,
            patch_nums: "1,2,3,4,6,8".into(),
            lr: 1e-3,
            l1: 1.0,
            l2: 1.0,
            beta: 0.25,
            dead_after: 50,
            seed: args.seed,
            log_every: 50,
            checkpoint_every: 500,
            resume: false,
            overwrite: true,
            no_flip: false,
            minutes: Some(args.minutes * 0.4),
        },
        device,
    )?;
    println!(
        "== 2/3 {} ({:.1} min budget)",
        if args.model == Kind::Mvar {
            "MVAR"
        } else {
            "VAR"
        },
        args.minutes * 0.5
    );
    crate::train::run(
        TrainArgs {
            model: args.model,
            depth: 4,
            width: Some(192),
            heads: Some(3),
            tokenizer: tok_dir.clone(),
            data: args.data.clone(),
            split: "train".into(),
            out: model_dir.clone(),
            steps: args.model_steps,
            batch: 32,
            base_lr: 2e-3,
            warmup: 50,
            wpe: 0.1,
            weight_decay: 0.05,
            cond_drop: 0.1,
            refine_step: None,
            kernel_size: 5,
            init_from: None,
            seed: args.seed,
            log_every: 50,
            checkpoint_every: 500,
            resume: false,
            overwrite: true,
            cfg: 2.0,
            minutes: Some(args.minutes * 0.5),
        },
        device,
    )?;
    println!("== 3/3 plots");
    let tok = smooth(&read_metric(&tok_dir.join("metrics.jsonl"), "loss"), 20);
    let model = smooth(&read_metric(&model_dir.join("metrics.jsonl"), "loss"), 20);
    let lr = read_metric(&model_dir.join("metrics.jsonl"), "lr");
    let loss_png = args.out.join("loss.png");
    line_plot(
        &loss_png,
        "training loss (moving average of 20 steps)",
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
        "\ndone. samples (one row per class): {}\nreconstructions (top: originals): {}\nloss curves: {} and {}",
        model_dir.join("samples.png").display(),
        tok_dir.join("recon.png").display(),
        loss_png.display(),
        lr_png.display()
    );
    Ok(())
}
