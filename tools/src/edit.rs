//! `mvar edit`: zero-shot in-painting, out-painting and class-conditional editing with a trained
//! VAR or MVAR folder (see `mvar_models::edit`): the tokens of the kept region are teacher-forced
//! at every scale, the rest is sampled.

use std::path::PathBuf;

use clap::Args;
use mvar_engine::{Device, Error, Generator, Result, Tensor};
use mvar_models::data::{grid, load_image, save_png};
use mvar_models::edit::{edit, EditMask};
use mvar_ops as ops;

use crate::common::{load_model_dir, load_split, PreprocessArg};
use crate::sample::SamplingArgs;

#[derive(Args, Debug, Clone)]
pub struct EditArgs {
    /// A model folder from `mvar train` (model.json, model.safetensors).
    #[arg(long)]
    pub ckpt: PathBuf,
    /// The image to edit (PNG or JPEG; resized and centre-cropped to the model's side).
    #[arg(long, conflicts_with = "index")]
    pub image: Option<PathBuf>,
    /// Or: image number `index` of the split --split of --data.
    #[arg(long)]
    pub index: Option<usize>,
    #[arg(long, default_value = "data/cifar10-subset")]
    pub data: PathBuf,
    /// How images are brought to the model's side.
    #[arg(long, value_enum, default_value_t = PreprocessArg::Official)]
    pub preprocess: PreprocessArg,
    #[arg(long, default_value = "test")]
    pub split: String,
    /// The region to generate, in pixels of the model's image side: x0,y0,x1,y1 (end
    /// exclusive). Default: the centre half of the image.
    #[arg(long = "box")]
    pub region: Option<String>,
    /// Generate outside the box and keep its inside (out-painting) instead of the reverse.
    #[arg(long)]
    pub outpaint: bool,
    /// The class to generate with (class-conditional editing); default: the image's own class
    /// when it comes from --data, else 0.
    #[arg(long)]
    pub class: Option<i64>,
    /// Edits to generate.
    #[arg(long, default_value_t = 8)]
    pub n: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// bf16 autocast for the generation (GEMMs, attention and convolutions in bf16 with f32
    /// accumulation; the image's own tokens are always found in f32), f32, or auto (bf16 on a
    /// GPU, f32 on the CPU).
    #[arg(long, value_enum, default_value = "auto")]
    pub precision: crate::train::Precision,
    #[arg(long, default_value = "edits")]
    pub out: PathBuf,
}

fn parse_box(text: &str) -> Result<[usize; 4]> {
    let bad = || {
        Error::invalid(
            "mvar edit",
            format!("--box {text:?}: expected four pixel coordinates x0,y0,x1,y1"),
        )
    };
    let v: Vec<usize> = text
        .split(',')
        .map(|s| s.trim().parse().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    v.try_into().map_err(|_| bad())
}

pub fn run(args: EditArgs, device: &Device) -> Result<()> {
    const OP: &str = "mvar edit";
    let (model, vae, info) = load_model_dir(&args.ckpt, device)?;
    let side = info.var.patch_nums.last().copied().unwrap_or(1) * vae.config.downsample();
    let (image, own_class) = match (&args.image, args.index) {
        (Some(path), _) => (load_image(path, side, device)?, None),
        (None, Some(i)) => {
            let data =
                load_split(&args.data, &args.split, side, args.preprocess)?.ok_or_else(|| {
                    Error::invalid(
                        OP,
                        format!("no split {:?} in {}", args.split, args.data.display()),
                    )
                })?;
            let (x, y) = data.batch(
                &[i],
                mvar_models::data::Crop::Center,
                false,
                &mut Generator::new(0),
                device,
            )?;
            (x, Some(y.to_vec::<i64>()?[0]))
        }
        (None, None) => {
            return Err(Error::invalid(
                OP,
                "nothing to edit: pass --image FILE or --index N (of --data/--split)",
            ))
        }
    };
    let class = args.class.or(own_class).unwrap_or(0);
    if class < 0 || class as usize >= info.var.num_classes {
        return Err(Error::IndexOutOfRange {
            op: "mvar edit",
            what: "class",
            index: class,
            size: info.var.num_classes,
        });
    }
    if args.n == 0 {
        return Err(Error::invalid(OP, "--n 0"));
    }
    let region = match &args.region {
        Some(t) => parse_box(t)?,
        None => [side / 4, side / 4, side - side / 4, side - side / 4],
    };
    let mask = EditMask::from_box(side, region, args.outpaint)?;
    // The image's token maps, repeated for the n edits.
    let tokens = vae.img_to_idx(&image)?;
    let rep = Tensor::from_vec(vec![0i64; args.n], [args.n], device)?;
    let tokens: Vec<Tensor> = tokens
        .iter()
        .map(|t| ops::index_select(t, 0, &rep))
        .collect::<Result<_>>()?;
    let labels = vec![class; args.n];
    let sc = args.sampling.config();
    let t = std::time::Instant::now();
    let edits = {
        let _autocast = mvar_engine::autocast(args.precision.autocast(device))?;
        let out = edit(
            &model,
            &vae,
            &tokens,
            &mask,
            &labels,
            sc,
            &mut Generator::new(args.seed),
        )?;
        vae.fhat_to_img(&out.f_hat)?
    };
    let secs = t.elapsed().as_secs_f64();
    // The first row: the original, the kept region (generated part greyed), the tokenizer's
    // reconstruction; then the edits.
    let keep = Tensor::from_vec(
        (0..side * side)
            .map(|i| {
                let (y, x) = (i / side, i % side);
                let inside =
                    (region[1]..region[3]).contains(&y) && (region[0]..region[2]).contains(&x);
                if inside == args.outpaint {
                    1.0f32
                } else {
                    0.0
                }
            })
            .collect::<Vec<_>>(),
        [1, 1, side, side],
        device,
    )?;
    let masked = ops::mul(&image, &keep)?;
    let recon = {
        let _ng = mvar_engine::no_grad();
        vae.idx_to_img(&vae.img_to_idx(&image)?)?
    };
    let cols = args.n.max(3);
    let mut rows: Vec<Tensor> = vec![image.clone(), masked, recon];
    let blank = Tensor::full(1.0, [1, 3, side, side], mvar_engine::DType::F32, device)?;
    rows.extend(std::iter::repeat_n(blank, cols - 3));
    let first_row = ops::concat(&rows.iter().collect::<Vec<_>>(), 0)?;
    let mut all = vec![&first_row, &edits];
    let pad;
    if args.n < cols {
        pad = Tensor::full(
            1.0,
            [cols - args.n, 3, side, side],
            mvar_engine::DType::F32,
            device,
        )?;
        all.push(&pad);
    }
    let sheet = ops::concat(&all, 0)?;
    std::fs::create_dir_all(&args.out).map_err(|e| Error::Io {
        path: args.out.display().to_string(),
        source: e,
    })?;
    let (px, h, w) = grid(&sheet, cols)?;
    let path = args.out.join("edits.png");
    save_png(&path, &px, h, w)?;
    let name = info
        .classes
        .get(class as usize)
        .cloned()
        .unwrap_or_else(|| class.to_string());
    println!(
        "{} {} edits as class {name} (box {:?}, {:.0}% of the pixels kept) in {secs:.1}s; wrote {} (top row: original, kept region, reconstruction)",
        args.n,
        if args.outpaint { "out-painting" } else { "in-painting" },
        region,
        100.0 * mask.kept_share(),
        path.display()
    );
    Ok(())
}
