//! Helpers shared by the commands: data splits, the deterministic data order.

use std::path::{Path, PathBuf};

use mvar_engine::{no_grad, Device, Error, Generator, Result, Tensor};
use mvar_models::data::{ImageDataset, Preprocess};
use mvar_models::{Mvar, MvarConfig, Var, VarConfig, VqVae, VqVaeConfig};
use mvar_ops as ops;
use serde::{Deserialize, Serialize};

/// `--preprocess`: how images are brought to the model's side.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PreprocessArg {
    /// Resize the shorter side to 1.125 x the side (Lanczos), then crop (the official VAR way).
    #[default]
    Official,
    /// Use the pixels as they are: every image must already be side x side.
    Exact,
}

impl From<PreprocessArg> for Preprocess {
    fn from(p: PreprocessArg) -> Self {
        match p {
            PreprocessArg::Official => Preprocess::Official,
            PreprocessArg::Exact => Preprocess::Exact,
        }
    }
}

/// Loads a split if the data set has it: CIFAR-binary when `<dir>/<split>.bin` exists, else the
/// image folder `<dir>/<split>`; None when neither exists.
pub fn load_split(
    dir: &Path,
    split: &str,
    side: usize,
    preprocess: PreprocessArg,
) -> Result<Option<ImageDataset>> {
    let preprocess = Preprocess::from(preprocess);
    if dir.join(format!("{split}.bin")).is_file() {
        return ImageDataset::load_cifar_binary_with(dir, split, side, preprocess).map(Some);
    }
    if dir.join(split).is_dir() {
        return ImageDataset::load_folder_with(&dir.join(split), side, preprocess).map(Some);
    }
    Ok(None)
}

/// What the data lines say of a data set streamed from its files (nothing when it is held).
pub fn storage_note(data: &ImageDataset) -> String {
    match data.streamed_size_estimate() {
        Some(bytes) => format!(
            ", streamed from the image files (about {:.1} GB decoded, over {}={})",
            bytes as f64 / 1e9,
            mvar_models::data::DATA_MEMORY_ENV,
            // The data set was loaded with this budget, so the variable parses.
            mvar_models::data::Loading::from_env().map_or(0, |l| l.budget_bytes() >> 20)
        ),
        None => String::new(),
    }
}

/// Loads the training split: as [`load_split`], else `<dir>` itself as an image folder (whose
/// error names the folder when it is missing or holds no images).
pub fn load_training_split(
    dir: &Path,
    split: &str,
    side: usize,
    preprocess: PreprocessArg,
) -> Result<ImageDataset> {
    match load_split(dir, split, side, preprocess)? {
        Some(ds) => Ok(ds),
        None => ImageDataset::load_folder_with(dir, side, preprocess.into()),
    }
}

/// `k` of `n` rows spread evenly (all of them when `k` is 0 or at least `n`): an image folder
/// lists its classes in turn, so the first `k` would be a few classes.
pub fn spread_rows(n: usize, k: usize) -> Vec<usize> {
    if k == 0 || k >= n {
        return (0..n).collect();
    }
    (0..k).map(|i| i * n / k).collect()
}

/// The permutation of epoch `epoch`: a function of (seed, epoch) only, so a resumed run sees the
/// same order.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut g = Generator::new(seed ^ 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(epoch + 1));
    let mut order: Vec<usize> = (0..n).collect();
    let words = g.next_u32s(n);
    for i in (1..n).rev() {
        order.swap(i, words[i] as usize % (i + 1));
    }
    order
}

/// The data order of a training run: step `step` (1-based) takes the next `batch` positions of
/// the concatenated epoch permutations ([`epoch_order`]), a function of (n, seed, step) only,
/// so a resumed run sees the same batches. The permutation of the current epoch is kept, so a
/// step costs its batch, not a shuffle of the whole data set (2.5 M rows for ImageNet with
/// mirrors).
pub struct DataOrder {
    n: usize,
    seed: u64,
    /// (epoch, its permutation), the last one used.
    current: Option<(u64, Vec<usize>)>,
}

impl DataOrder {
    pub fn new(n: usize, seed: u64) -> Self {
        DataOrder {
            n,
            seed,
            current: None,
        }
    }

    /// The rows of step `step` (1-based).
    pub fn batch(&mut self, batch: usize, step: u64) -> Vec<usize> {
        let n = self.n as u64;
        let start = (step - 1) * batch as u64;
        (start..start + batch as u64)
            .map(|pos| {
                let epoch = pos / n;
                if self.current.as_ref().map(|c| c.0) != Some(epoch) {
                    self.current = Some((epoch, epoch_order(self.n, self.seed, epoch)));
                }
                self.current.as_ref().map_or(0, |c| c.1[(pos % n) as usize])
            })
            .collect()
    }
}

/// Refuses a loss weight, rate or coefficient flag (`flag`, e.g. "--l1") of command `cmd` that
/// is not a finite number >= 0, naming it, before any work starts: such values otherwise show
/// up steps later as a NaN or negative loss.
pub fn require_nonnegative(cmd: &'static str, flag: &str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            cmd,
            format!("{flag} {value}: expected a finite number >= 0"),
        ))
    }
}

/// Parses a flag that must be a finite number (a NaN or infinite guidance strength would only
/// surface later as NaN logits, far from the flag that caused them).
pub fn parse_finite(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        Ok(_) => Err("expected a finite number".to_string()),
        Err(e) => Err(format!("{e}; expected a finite number")),
    }
}

/// Parses a `--minutes` budget: a finite number of minutes above 0 (a zero, negative or NaN
/// budget would silently train only the steps that time it).
pub fn parse_minutes(s: &str) -> std::result::Result<f64, String> {
    match parse_finite(s) {
        Ok(m) if m > 0.0 => Ok(m),
        _ => Err("expected a number of minutes above 0".to_string()),
    }
}

/// A --minutes budget times this many steps before it sets the step count (the help texts say 10).
pub const CALIBRATION_STEPS: u64 = 10;

/// The total step count a --minutes budget sets at step `done`, from `window_steps` steps that
/// took `window_time` (the [`CALIBRATION_STEPS`] just run, or a later, longer window), with
/// `spent` gone since the command started: what fits, but never more than `cap` (--steps), so
/// that a fast device stops early instead of filling the budget. `reserve` is the share of the
/// budget kept for what follows training (evaluation, sample grids). Returns it with the line to
/// print.
pub fn budget_total_steps(
    minutes: f64,
    reserve: f64,
    cap: u64,
    done: u64,
    spent: std::time::Duration,
    window_time: std::time::Duration,
    window_steps: u64,
) -> (u64, String) {
    let per_step = window_time.as_secs_f64() / window_steps.max(1) as f64;
    let left = minutes * 60.0 * (1.0 - reserve) - spent.as_secs_f64();
    let fits = done + (left / per_step.max(1e-9)).max(0.0) as u64;
    let total = cap.min(fits);
    let line = if fits > cap {
        format!("time budget {minutes:.2} min: training {total} steps (the --steps cap; {fits} would fit)")
    } else {
        format!("time budget {minutes:.2} min: training {total} steps")
    };
    (total, line)
}

/// Maps an I/O error to one naming `path`.
pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// Reads and parses a JSON file, naming it in errors.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| Error::Format {
        what: path.display().to_string(),
        msg: e.to_string(),
    })
}

/// The folders the commands write and read, told apart by the JSON file each holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FolderKind {
    Model,
    Tokenizer,
    Classifier,
}

impl FolderKind {
    const ALL: [FolderKind; 3] = [
        FolderKind::Model,
        FolderKind::Tokenizer,
        FolderKind::Classifier,
    ];

    fn json(self) -> &'static str {
        match self {
            FolderKind::Model => "model.json",
            FolderKind::Tokenizer => "tokenizer.json",
            FolderKind::Classifier => "classifier.json",
        }
    }

    /// What writes such a folder.
    fn described(self) -> &'static str {
        match self {
            FolderKind::Model => "a model folder written by `mvar train` or `mvar import`",
            FolderKind::Tokenizer => "a tokenizer folder written by `mvar train-tokenizer`",
            FolderKind::Classifier => "a classifier folder written by `mvar train-classifier`",
        }
    }

    /// What it holds: the JSON and the weights beside it.
    fn files(self) -> String {
        let json = self.json();
        format!("{json}, {}.safetensors", json.trim_end_matches(".json"))
    }
}

/// The JSON file of `dir` as a folder of kind `want`; when it is not there, an error that says
/// what `dir` is instead (missing, another kind of folder, a folder without it) and what was
/// expected.
pub(crate) fn folder_file(dir: &Path, want: FolderKind) -> Result<PathBuf> {
    let json = dir.join(want.json());
    if json.is_file() {
        return Ok(json);
    }
    let found = if !dir.exists() {
        "no such folder".to_string()
    } else if !dir.is_dir() {
        "a file, not a folder".to_string()
    } else if let Some(other) = FolderKind::ALL
        .into_iter()
        .find(|k| *k != want && dir.join(k.json()).is_file())
    {
        format!("{} instead", other.described())
    } else {
        format!("a folder without {}", want.json())
    };
    Err(Error::invalid(
        "folder",
        format!(
            "{}: {found}; expected {} ({})",
            dir.display(),
            want.described(),
            want.files()
        ),
    ))
}

/// Loads a tokenizer folder written by `mvar train-tokenizer` (tokenizer.json + tokenizer.safetensors).
pub fn load_tokenizer(dir: &Path, device: &Device) -> Result<VqVae> {
    let cfg: VqVaeConfig = read_json(&folder_file(dir, FolderKind::Tokenizer)?)?;
    let vae = VqVae::new(cfg, device, 0)?;
    vae.load(&dir.join("tokenizer.safetensors"))?;
    Ok(vae)
}

/// An MVAR's neighbourhood settings on the pyramid `patch_nums`: `kernel_size`, from scale
/// `refine_step` on (none given: [`default_refine_step`]).
pub fn mvar_config(
    patch_nums: &[usize],
    refine_step: Option<usize>,
    kernel_size: usize,
) -> mvar_models::MvarConfig {
    mvar_models::MvarConfig {
        refine_step: refine_step.unwrap_or_else(|| default_refine_step(patch_nums, kernel_size)),
        kernel_size,
        ..mvar_models::MvarConfig::default()
    }
}

/// MVAR's first neighbourhood-attention scale when none is given: the official 8 where the
/// pyramid has scales from 8 on and all of them are at least as large as the kernel (the 256-px
/// pyramid: 13x13 and 16x16), else the first scale at least as large as the kernel (none: the
/// number of scales, i.e. dense attention within every scale).
pub fn default_refine_step(patch_nums: &[usize], kernel_size: usize) -> usize {
    const OFFICIAL: usize = 8;
    if patch_nums.len() > OFFICIAL && patch_nums[OFFICIAL..].iter().all(|&p| p >= kernel_size) {
        return OFFICIAL;
    }
    patch_nums
        .iter()
        .position(|&p| p >= kernel_size)
        .unwrap_or(patch_nums.len())
}

/// What `model.json` of a transformer folder holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// "var" or "mvar".
    pub kind: String,
    pub var: VarConfig,
    #[serde(default)]
    pub mvar: Option<MvarConfig>,
    /// The tokenizer folder the model was trained with.
    pub tokenizer: String,
    /// Class names, in label order.
    #[serde(default)]
    pub classes: Vec<String>,
}

/// A transformer (VAR or MVAR) built from its info, with fresh weights.
pub fn build_model(
    info: &ModelInfo,
    device: &Device,
    seed: u64,
) -> Result<mvar_models::trainer::ArModel> {
    use mvar_models::trainer::ArModel;
    match info.kind.as_str() {
        "var" => Ok(ArModel::Var(Var::new(
            info.var.clone(),
            device,
            seed,
            mvar_models::Mixing::BlockCausal,
        )?)),
        "mvar" => Ok(ArModel::Mvar(Mvar::new(
            info.var.clone(),
            info.mvar.clone().unwrap_or_default(),
            device,
            seed,
        )?)),
        other => Err(Error::invalid(
            "model",
            format!("kind {other:?}: expected var or mvar"),
        )),
    }
}

/// Loads a trained transformer folder (model.json + model.safetensors) and its tokenizer.
pub fn load_model_dir(
    dir: &Path,
    device: &Device,
) -> Result<(mvar_models::trainer::ArModel, VqVae, ModelInfo)> {
    let json = folder_file(dir, FolderKind::Model)?;
    let info: ModelInfo = read_json(&json)?;
    let model = build_model(&info, device, 0)?;
    let report = model.var().load(&dir.join("model.safetensors"))?;
    if !report.unexpected.is_empty() {
        return Err(Error::Format {
            what: dir.join("model.safetensors").display().to_string(),
            msg: format!(
                "tensors this {} does not have: {:?} (a checkpoint of another model?)",
                info.kind, report.unexpected
            ),
        });
    }
    let vae = load_tokenizer(&tokenizer_dir(dir, &info), device)?;
    Ok((model, vae, info))
}

/// The tokenizer folder of a model folder: `info.tokenizer` relative to the model folder when
/// that exists, else as given (absolute, or relative to the working directory).
pub fn tokenizer_dir(model_dir: &Path, info: &ModelInfo) -> std::path::PathBuf {
    let relative = model_dir.join(&info.tokenizer);
    if relative.exists() {
        relative
    } else {
        Path::new(&info.tokenizer).to_path_buf()
    }
}

/// Images the token cache's tokenizing pass ([`tokenize_each`]) takes at once.
pub const TOKENIZE_BATCH: usize = 64;

/// Token maps of every image of a data set, centre-cropped and (when `flips`) mirrored too,
/// `batch` images at a time: `each` gets the targets i64 [b, L] of each batch of images, in order, first
/// every image, then (with flips) every mirror, so that row N + i is image i mirrored. This is
/// the official token cache (`main_cache.py`): the transformer then trains on tokens, not
/// images; only one batch of images is held at a time (for a streamed data set, the next one is
/// decoded while this one is tokenized). It starts at row `from_row` (0, or where an
/// interrupted pass stopped) and stops when `each` returns false; whether it reached the last
/// row. The batches start at multiples of `batch` in each pass, so a pass continued from such a
/// row cuts the batches an uninterrupted one cuts.
pub fn tokenize_each(
    vae: &VqVae,
    data: &ImageDataset,
    flips: bool,
    from_row: usize,
    batch: usize,
    device: &Device,
    mut each: impl FnMut(&Tensor) -> Result<bool>,
) -> Result<bool> {
    let _ng = no_grad();
    let n = data.len();
    let passes: &[bool] = if flips { &[false, true] } else { &[false] };
    for (pass, &flip) in passes.iter().enumerate() {
        let start = from_row.saturating_sub(pass * n).min(n);
        let idx: Vec<usize> = (start..n).collect();
        let done = data.each_centre_batch_while(&idx, batch, device, |x, _| {
            let mirrored;
            let x = if flip {
                mirrored = mirror(x)?;
                &mirrored
            } else {
                x
            };
            let maps = vae.img_to_idx(x)?;
            let refs: Vec<&Tensor> = maps.iter().collect();
            each(&ops::concat(&refs, 1)?)
        })?;
        if !done {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Images [B, 3, H, W] mirrored horizontally.
fn mirror(x: &Tensor) -> Result<Tensor> {
    let w = x.dims()[3];
    let rev = Tensor::from_vec((0..w as i64).rev().collect::<Vec<_>>(), [w], x.device())?;
    ops::index_select(x, 3, &rev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_permutations_and_batches_are_reproducible() {
        let order = epoch_order(10, 3, 0);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(epoch_order(10, 3, 1), order);
        assert_eq!(DataOrder::new(10, 3).batch(4, 1), order[..4].to_vec());
        // Step 3 straddles epochs 0 and 1.
        let b3 = DataOrder::new(10, 3).batch(4, 3);
        assert_eq!(b3[..2], order[8..]);
        assert_eq!(b3[2..], epoch_order(10, 3, 1)[..2]);
        // One order walked step by step (as a run does), or a fresh one per step (as a resumed
        // run starts), gives position p of the concatenated epochs at every step, also for
        // batches longer than an epoch.
        for batch in [1, 3, 4, 10, 23] {
            let mut walked = DataOrder::new(10, 7);
            for step in 1..=12u64 {
                let want: Vec<usize> = ((step - 1) * batch as u64..step * batch as u64)
                    .map(|p| epoch_order(10, 7, p / 10)[(p % 10) as usize])
                    .collect();
                assert_eq!(walked.batch(batch, step), want, "batch {batch} step {step}");
                assert_eq!(DataOrder::new(10, 7).batch(batch, step), want);
            }
        }
    }

    #[test]
    fn a_budget_fits_the_steps_of_its_window_rate_and_respects_the_cap() {
        use std::time::Duration;
        let secs = Duration::from_secs_f64;
        // 1 min, 10 % reserved: 54 s for training; 4 s spent, 0.5 s per step (5 s over 10
        // steps): 100 more steps after the 10 done.
        let (total, line) = budget_total_steps(1.0, 0.1, 1000, 10, secs(4.0), secs(5.0), 10);
        assert_eq!(total, 110);
        assert_eq!(line, "time budget 1.00 min: training 110 steps");
        // A later, longer window at a faster rate (0.25 s per step over 40 steps), 24 s spent.
        let (total, _) = budget_total_steps(1.0, 0.1, 1000, 50, secs(24.0), secs(10.0), 40);
        assert_eq!(total, 170);
        // The cap wins, and says what would have fit.
        let (total, line) = budget_total_steps(1.0, 0.1, 120, 50, secs(24.0), secs(10.0), 40);
        assert_eq!(total, 120);
        assert!(line.contains("the --steps cap; 170 would fit"), "{line}");
        // Over budget already: no more steps.
        let (total, _) = budget_total_steps(1.0, 0.1, 1000, 50, secs(70.0), secs(10.0), 40);
        assert_eq!(total, 50);
    }

    #[test]
    fn refine_step_is_the_official_8_on_the_256_px_pyramid_else_the_first_large_scale() {
        let official = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16];
        assert_eq!(default_refine_step(&official, 7), 8);
        // 13 < 15: the official split would put a too-small scale under the kernel.
        assert_eq!(default_refine_step(&official, 15), 9);
        // The demo's 32-px pyramid has no scale 8.
        assert_eq!(default_refine_step(&[1, 2, 3, 4, 6, 8], 5), 4);
        assert_eq!(default_refine_step(&[1, 2, 3], 7), 3);
    }
}
