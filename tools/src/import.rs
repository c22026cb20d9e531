//! `mvar import`: a runnable model folder from official checkpoints.
//!
//! The released VAR and MVAR weights (`var_d16.pth`, an MVAR fine-tune of it, and the tokenizer
//! `vae_ch160v4096z32.pth`) are state dicts without a configuration. This reads the
//! configurations off the tensors (models::import), builds both models, loads the weights
//! strictly (every tensor present with its shape, none left over), and writes the folder that
//! `sample`, `edit`, `eval` and `train --init-from` take: model.json, model.safetensors and a
//! tokenizer/ folder.

use std::path::{Path, PathBuf};

use clap::Args;
use mvar_engine::{Device, Error, Result};
use mvar_models::checkpoint::write_atomic;
use mvar_models::import::{
    read_state_dict, var_config_from_state_dict, vqvae_config_from_state_dict,
};
use mvar_models::VqVae;

use crate::common::{build_model, io, mvar_config, ModelInfo};
use crate::train::Kind;

#[derive(Args, Debug, Clone)]
pub struct ImportArgs {
    /// The transformer's weights: an official checkpoint (.pth, torch.save zip; tensors only, no
    /// code executed) or a .safetensors file with the official names.
    #[arg(long)]
    pub model: PathBuf,
    /// The tokenizer's weights (the released vae_ch160v4096z32.pth, or a .safetensors file).
    #[arg(long)]
    pub vae: PathBuf,
    /// How the transformer attends: var (block-causal, KV-cache sampling) or mvar (scale- and
    /// spatial-Markov). The two have the same tensors, so the weights cannot tell.
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// Keep only the tensors of --model under this prefix, and strip it (e.g. `model` for a
    /// training checkpoint that nests the state dict).
    #[arg(long)]
    pub strip_prefix: Option<String>,
    /// The token pyramid, for weights without the lvl_1L buffer whose pyramid is not one of the
    /// released ones (256 px: 1,2,3,4,5,6,8,10,13,16; 512 px: 1,2,3,4,6,9,13,18,24,32).
    #[arg(long, value_delimiter = ',')]
    pub patch_nums: Option<Vec<usize>>,
    /// MVAR: first scale with neighbourhood attention (default: the official 8 where every scale
    /// from 8 on is at least the kernel size, else the first scale that is).
    #[arg(long)]
    pub refine_step: Option<usize>,
    /// MVAR: neighbourhood attention kernel size.
    #[arg(long, default_value_t = 7)]
    pub kernel_size: usize,
    /// The tokenizer's Phi residual ratio, which its weights do not record (the release: 0.5).
    #[arg(long, default_value_t = 0.5)]
    pub quant_resi: f64,
    /// Class names, one per line in label order (default: the label numbers).
    #[arg(long)]
    pub class_names: Option<PathBuf>,
    /// The model folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace a model folder that exists there.
    #[arg(long)]
    pub overwrite: bool,
}

fn class_names(path: &Path, classes: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != classes {
        return Err(Error::Format {
            what: path.display().to_string(),
            msg: format!(
                "{} class names; the model has {classes} classes (one name per line expected)",
                names.len()
            ),
        });
    }
    Ok(names)
}

pub fn run(args: ImportArgs) -> Result<()> {
    if args.out.join("model.json").exists() && !args.overwrite {
        return Err(Error::invalid(
            "import",
            format!(
                "{} already holds a model (model.json); pass --overwrite to replace it",
                args.out.display()
            ),
        ));
    }
    let model_what = format!("transformer weights {}", args.model.display());
    let vae_what = format!("tokenizer weights {}", args.vae.display());
    let model_sd = read_state_dict(&args.model, args.strip_prefix.as_deref())?;
    let vae_sd = read_state_dict(&args.vae, None)?;
    let var_cfg = var_config_from_state_dict(&model_sd, &model_what, args.patch_nums.as_deref())?;
    let mut vae_cfg = vqvae_config_from_state_dict(&vae_sd, &vae_what, &var_cfg.patch_nums)?;
    vae_cfg.quant_resi = args.quant_resi;
    if vae_cfg.z_channels != var_cfg.cvae || vae_cfg.vocab_size != var_cfg.vocab_size {
        return Err(Error::invalid(
            "import",
            format!(
                "{} takes {} codes of {} channels, but {} has {} codes of {} channels: not its tokenizer",
                args.model.display(),
                var_cfg.vocab_size,
                var_cfg.cvae,
                args.vae.display(),
                vae_cfg.vocab_size,
                vae_cfg.z_channels
            ),
        ));
    }
    let classes = match &args.class_names {
        Some(p) => class_names(p, var_cfg.num_classes)?,
        None => Vec::new(),
    };
    let mvar = (args.kind == Kind::Mvar)
        .then(|| mvar_config(&var_cfg.patch_nums, args.refine_step, args.kernel_size));
    let info = ModelInfo {
        kind: if args.kind == Kind::Var {
            "var"
        } else {
            "mvar"
        }
        .into(),
        var: var_cfg,
        mvar,
        tokenizer: "tokenizer".into(),
        classes,
    };

    // Both models are built and loaded before anything is written: a mismatch leaves no folder.
    let cpu = Device::Cpu;
    let model = build_model(&info, &cpu, 0)?;
    let report = model.var().load_tensors(&model_sd, &model_what)?;
    let vae = VqVae::new(vae_cfg.clone(), &cpu, 0)?;
    let vae_report = vae.load_tensors(&vae_sd, &vae_what)?;
    for (what, unexpected) in [
        (&model_what, &report.unexpected),
        (&vae_what, &vae_report.unexpected),
    ] {
        if !unexpected.is_empty() {
            return Err(Error::Format {
                what: what.clone(),
                msg: format!(
                    "tensors the model does not have: {unexpected:?} (weights of another model?)"
                ),
            });
        }
    }

    let tok_dir = args.out.join("tokenizer");
    std::fs::create_dir_all(&tok_dir).map_err(io(&tok_dir))?;
    vae.save(&tok_dir.join("tokenizer.safetensors"))?;
    let pretty = |v: serde_json::Result<String>| v.unwrap_or_default();
    write_atomic(
        &tok_dir.join("tokenizer.json"),
        pretty(serde_json::to_string_pretty(&vae_cfg)).as_bytes(),
    )?;
    model.var().save(&args.out.join("model.safetensors"))?;
    // model.json last: a folder that has it is complete.
    write_atomic(
        &args.out.join("model.json"),
        pretty(serde_json::to_string_pretty(&info)).as_bytes(),
    )?;

    let c = &info.var;
    println!(
        "{}-d{}: width {}, {} heads, {} classes, {} codes of {} channels, pyramid {:?}{}",
        info.kind,
        c.depth,
        c.width(),
        c.heads(),
        c.num_classes,
        c.vocab_size,
        c.cvae,
        c.patch_nums,
        info.mvar
            .as_ref()
            .map(|m| format!(", kernel {} from scale {}", m.kernel_size, m.refine_step))
            .unwrap_or_default()
    );
    println!(
        "tokenizer: ch {}, ch_mult {:?}, {} res blocks, {} Phi convs (quant_resi {})",
        vae_cfg.ch,
        vae_cfg.ch_mult,
        vae_cfg.num_res_blocks,
        vae_cfg.share_quant_resi,
        vae_cfg.quant_resi
    );
    println!(
        "wrote {} ({} + {} tensors); sample with: mvar sample --ckpt {}",
        args.out.display(),
        report.loaded,
        vae_report.loaded,
        args.out.display()
    );
    Ok(())
}
