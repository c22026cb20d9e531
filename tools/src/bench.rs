//! `mvar bench`: the model-level figures of the MVAR paper's Table 2 measured on our engine:
//! the time and peak memory of one training step and of sampling one batch (classifier-free
//! guidance, all scales, the tokenizer's decode), for VAR and MVAR of any depth, and the ratios
//! MVAR : VAR where both were measured in the same run.
//!
//! What is measured, so that the figures can be compared with the paper's:
//! - weights are freshly initialised (the official initialisation); timings do not depend on the
//!   values, and no data set or checkpoint is needed (`--tokenizer` takes a trained one instead
//!   of a fresh tokenizer of the released `vae_ch160v4096z32` shape);
//! - training step: forward, backward, global-norm clipping and AdamW on random token maps,
//!   teacher-forcing inputs made by the tokenizer beforehand (outside the timed region, as they
//!   are data); the device is synchronised after every step. MVAR trains one segment per step in
//!   the official cycle, so each segment is timed on its own and the per-step figure is the
//!   cycle's mean (segment medians weighted by their share of the cycle);
//! - sampling: `--sample-batch` images with the official sampler (cfg ramp with the doubled
//!   batch, top-k, top-p), then the tokenizer's decode to pixels, synchronised at the end;
//! - memory: on a GPU the caching allocator's peak of bytes held by live tensors (weights,
//!   gradients and optimizer state included; the allocator's cache is not counted); on the CPU
//!   the peak of live heap bytes (`heap.rs`), reset before each measurement.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use mvar_engine::{no_grad, DType, Device, Error, Generator, Result, Tensor};
use mvar_models::tokenizer::{TokenizerTrainConfig, TokenizerTrainer};
use mvar_models::trainer::{ArModel, ArTrainConfig, ArTrainer};
use mvar_models::{Mixing, Mvar, MvarConfig, SampleConfig, Var, VarConfig, VqVae, VqVaeConfig};
use mvar_ops as ops;

use crate::train::{Kind, ModelName, Precision};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum What {
    Train,
    Sample,
    All,
    /// The tokenizer's training step instead of the transformers' figures.
    Tokenizer,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// The models to measure, in order (repeat the flag): var, mvar, var-d16, mvar-d20, ...
    #[arg(long = "model", default_values = ["var-d16", "mvar-d16"])]
    pub models: Vec<ModelName>,
    /// Depth of a --model given without -dN (width 64 * depth, depth heads).
    #[arg(long, default_value_t = 16)]
    pub depth: usize,
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    /// Training batch (the paper's Table 2: 32).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Images sampled per batch (the paper's Table 2: 32; the transformer runs on twice as many
    /// rows for classifier-free guidance).
    #[arg(long, default_value_t = 32)]
    pub sample_batch: usize,
    /// train, sample or all (the transformers' figures), or tokenizer: the tokenizer's training
    /// step (`mvar train-tokenizer`'s loss, gradient clip and AdamW on random images of its
    /// size; batch --batch, --steps steps; --model is then not used).
    #[arg(long, value_enum, default_value = "all")]
    pub what: What,
    /// Timed training steps per model, per segment for MVAR (after one untimed cycle).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Timed sampling batches per model (after one untimed batch).
    #[arg(long, default_value_t = 3)]
    pub sample_reps: usize,
    /// bf16 autocast (f32 master weights) for training and sampling, f32, or auto (bf16 on a
    /// GPU, f32 on the CPU).
    #[arg(long, value_enum, default_value = "auto")]
    pub precision: Precision,
    /// Train with activation recomputation (`mvar train --recompute-activations`): the blocks'
    /// activations are recomputed in the backward instead of kept. Not the paper's setting.
    #[arg(long)]
    pub recompute_activations: bool,
    /// Images per pass of the tokenizer's decoder in sampling (`mvar sample --decode-batch`; 0:
    /// from the image size, 6 at 256 px). The official sampler decodes the whole batch at once:
    /// --decode-batch 32 at batch 32.
    #[arg(long, default_value_t = 0)]
    pub decode_batch: usize,
    /// The token pyramid (side of each scale's map).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6,8,10,13,16")]
    pub patch_nums: Vec<usize>,
    #[arg(long, default_value_t = 4096)]
    pub vocab: usize,
    #[arg(long, default_value_t = 1000)]
    pub classes: usize,
    /// Channels of the fresh tokenizer (the released one: 160).
    #[arg(long, default_value_t = 160)]
    pub vae_ch: usize,
    /// Channel multipliers of the fresh tokenizer's levels (the released one: 1,1,2,2,4, i.e.
    /// 16x downsampling).
    #[arg(long, value_delimiter = ',', default_value = "1,1,2,2,4")]
    pub vae_ch_mult: Vec<usize>,
    /// Residual blocks per level of the fresh tokenizer (the released one: 2; `mvar demo`'s: 1).
    #[arg(long, default_value_t = 2)]
    pub vae_res_blocks: usize,
    /// A tokenizer folder from `mvar train-tokenizer` to use instead of a fresh tokenizer (its
    /// pyramid, codebook and channels replace --patch-nums, --vocab and --vae-*).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// MVAR: first scale with neighbourhood attention (default: the official 8 where every scale
    /// from 8 on is at least the kernel size, else the first scale that is).
    #[arg(long)]
    pub refine_step: Option<usize>,
    #[arg(long, default_value_t = 7)]
    pub kernel_size: usize,
    /// Sampling: guidance strength (official evaluation: 1.5).
    #[arg(long, default_value_t = 1.5)]
    pub cfg: f64,
    #[arg(long, default_value_t = 900)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.96)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write one JSON object per model to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One model's configuration, built fresh for each measurement.
struct Subject {
    name: String,
    kind: Kind,
    var: VarConfig,
    mvar: Option<MvarConfig>,
}

impl Subject {
    fn build(&self, device: &Device, seed: u64) -> Result<ArModel> {
        Ok(match self.kind {
            Kind::Var => ArModel::Var(Var::new(
                self.var.clone(),
                device,
                seed,
                Mixing::BlockCausal,
            )?),
            Kind::Mvar => ArModel::Mvar(Mvar::new(
                self.var.clone(),
                self.mvar.clone().unwrap_or_default(),
                device,
                seed,
            )?),
        })
    }
}

/// Peak memory of one measurement: the GPU allocator's peak of live tensors, or on the CPU the
/// peak of live heap bytes (tensors and everything else the process allocates meanwhile).
struct MemoryProbe {
    device: Device,
}

impl MemoryProbe {
    fn start(device: &Device) -> MemoryProbe {
        match device {
            Device::Cuda(d) => d.reset_peak_memory(),
            Device::Cpu => crate::heap::reset_peak(),
        }
        MemoryProbe {
            device: device.clone(),
        }
    }

    /// (peak bytes, what the figure is).
    fn peak(&self) -> (u64, &'static str) {
        match &self.device {
            Device::Cuda(d) => (d.memory_stats().peak_in_use_bytes as u64, "allocator peak"),
            Device::Cpu => (crate::heap::peak_bytes() as u64, "heap peak"),
        }
    }
}

/// Bytes held by live tensors now (GPU), or live heap bytes (CPU).
fn current_bytes(device: &Device) -> u64 {
    match device {
        Device::Cuda(d) => d.memory_stats().in_use_bytes as u64,
        Device::Cpu => crate::heap::live_bytes() as u64,
    }
}

fn is_out_of_memory(e: &Error) -> bool {
    matches!(e, Error::Cuda(mvar_cuda::CudaError::OutOfMemory { .. }))
        || e.to_string().contains("out of memory")
}

/// A measurement that ran out of GPU memory is a result (the paper's table has one), not a
/// failure of the run.
fn guard<T>(r: Result<T>) -> Result<Outcome<T>> {
    match r {
        Ok(f) => Ok(Outcome::Measured(f)),
        Err(e) if is_out_of_memory(&e) => Ok(Outcome::OutOfMemory(e.to_string())),
        Err(e) => Err(e),
    }
}

/// Seconds of one call of `f`, the device synchronised before the clock stops.
fn timed(device: &Device, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// The timing of one training segment (all scales for VAR).
#[derive(Debug, Clone, serde::Serialize)]
struct SegmentTiming {
    scales: [usize; 2],
    tokens: usize,
    steps: usize,
    median_s: f64,
    /// Share of the training cycle's steps.
    share: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
struct TrainFigures {
    segments: Vec<SegmentTiming>,
    /// Seconds per step over the training cycle.
    step_s: f64,
    peak_bytes: u64,
    memory: &'static str,
    /// Held by weights, gradients and optimizer state between steps.
    resident_bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
struct SampleFigures {
    /// Seconds per batch, sampling and decode.
    batch_s: f64,
    /// Of which the tokenizer's decode.
    decode_s: f64,
    peak_bytes: u64,
    /// The peak until the tokens are sampled, before the decode to pixels.
    transformer_peak_bytes: u64,
    /// Images per pass of the decoder.
    decode_batch: usize,
    memory: &'static str,
    /// Weights of the transformer and the tokenizer.
    weights_bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum Outcome<T> {
    Measured(T),
    OutOfMemory(String),
    Skipped,
}

#[derive(Debug, Clone, serde::Serialize)]
struct ModelFigures {
    model: String,
    depth: usize,
    width: usize,
    params: usize,
    device: String,
    precision: String,
    recompute_activations: bool,
    batch: usize,
    sample_batch: usize,
    train: Outcome<TrainFigures>,
    sample: Outcome<SampleFigures>,
}

/// Random token maps of a batch: the targets [B, L] and the teacher-forcing input the tokenizer
/// makes of them.
pub(crate) fn random_batch(
    vae: &VqVae,
    batch: usize,
    rng: &mut Generator,
) -> Result<(Tensor, Tensor)> {
    let device = vae.device().clone();
    let vocab = vae.config.vocab_size as u32;
    let idx = vae
        .config
        .v_patch_nums
        .iter()
        .map(|&pn| {
            let tokens: Vec<i64> = rng
                .next_u32s(batch * pn * pn)
                .into_iter()
                .map(|w| (w % vocab) as i64)
                .collect();
            Tensor::from_vec(tokens, [batch, pn * pn], &device)
        })
        .collect::<Result<Vec<_>>>()?;
    let _ng = no_grad();
    let x_in = vae.idx_to_var_input(&idx)?;
    let refs: Vec<&Tensor> = idx.iter().collect();
    Ok((ops::concat(&refs, 1)?, x_in))
}

pub(crate) fn random_labels(n: usize, classes: usize, rng: &mut Generator) -> Vec<i64> {
    rng.next_u32s(n)
        .into_iter()
        .map(|w| (w as usize % classes) as i64)
        .collect()
}

fn measure_train(
    subject: &Subject,
    model: ArModel,
    vae: &VqVae,
    args: &BenchArgs,
    device: &Device,
) -> Result<TrainFigures> {
    let config = ArTrainConfig {
        batch: args.batch,
        total_steps: u64::MAX / 2,
        warmup_steps: 1,
        autocast: args.precision.autocast(device),
        recompute_blocks: args.recompute_activations,
        ..ArTrainConfig::default()
    };
    let mut trainer = ArTrainer::new(model, config)?;
    let mut rng = Generator::new(args.seed.wrapping_add(1));
    let (gt, x_in) = random_batch(vae, args.batch, &mut rng)?;
    let labels = random_labels(args.batch, subject.var.num_classes, &mut rng);
    // The cycle of segments: one step for VAR, ratio_k + later scales for MVAR.
    let cycle: Vec<std::ops::Range<usize>> = match &trainer.model {
        ArModel::Var(v) => std::iter::once(0..v.config.patch_nums.len()).collect(),
        ArModel::Mvar(m) => {
            let segs = m.segments();
            let len = m.config.ratio_k.max(1) + segs.len().saturating_sub(1);
            (0..len as u64).map(|s| m.segment_for_step(s)).collect()
        }
    };
    // Warm-up: every segment at least once (kernels compiled, allocator cache filled, optimizer
    // state created), two steps at least.
    for _ in 0..cycle.len().max(2) {
        trainer.step(&labels, &gt, &x_in, &mut rng)?;
    }
    device.synchronize()?;
    // Each segment `--steps` times: the step counter is set to the segment's place in the cycle
    // before every step, so rare segments get as many samples as the common one.
    let mut distinct: Vec<(u64, std::ops::Range<usize>)> = Vec::new();
    for (at, r) in cycle.iter().enumerate() {
        if !distinct.iter().any(|(_, d)| d == r) {
            distinct.push((at as u64, r.clone()));
        }
    }
    let resident_bytes = current_bytes(device);
    let probe = MemoryProbe::start(device);
    let be = subject.var.begin_ends();
    let mut segments: Vec<SegmentTiming> = Vec::new();
    for (at, r) in distinct {
        let mut times = Vec::with_capacity(args.steps);
        for _ in 0..args.steps {
            trainer.set_step(at);
            times.push(timed(device, || {
                trainer.step(&labels, &gt, &x_in, &mut rng).map(drop)
            })?);
        }
        segments.push(SegmentTiming {
            scales: [r.start, r.end],
            tokens: be[r.end - 1].1 - be[r.start].0,
            steps: times.len(),
            median_s: median(&mut times),
            share: cycle.iter().filter(|c| **c == r).count() as f64 / cycle.len() as f64,
        });
    }
    let (peak_bytes, memory) = probe.peak();
    let step_s = segments.iter().map(|s| s.median_s * s.share).sum::<f64>();
    Ok(TrainFigures {
        segments,
        step_s,
        peak_bytes,
        memory,
        resident_bytes,
    })
}

/// `--what tokenizer`: the tokenizer's training step.
#[derive(Debug, Clone, serde::Serialize)]
struct TokenizerFigures {
    model: &'static str,
    device: String,
    params: usize,
    batch: usize,
    side: usize,
    recompute_activations: bool,
    steps: usize,
    median_s: f64,
    peak_bytes: u64,
    memory: &'static str,
    resident_bytes: u64,
}

/// The median of `--steps` tokenizer training steps (after two untimed ones: kernels compiled,
/// optimizer state created) on one batch of random images in [-1, 1], with
/// `mvar train-tokenizer`'s loss, clip and AdamW (`TokenizerTrainConfig`'s defaults). No data
/// loading is timed; on a trained tokenizer dead-code restarts would add a little.
fn measure_tokenizer(
    vae: VqVae,
    side: usize,
    args: &BenchArgs,
    device: &Device,
) -> Result<TokenizerFigures> {
    let params = vae.params.num_elements();
    let config = TokenizerTrainConfig {
        recompute_blocks: args.recompute_activations,
        ..TokenizerTrainConfig::default()
    };
    let mut trainer = TokenizerTrainer::new(vae, config)?;
    let mut rng = Generator::new(args.seed.wrapping_add(1));
    let x = Tensor::rand_uniform(
        [args.batch, 3, side, side],
        -1.0,
        1.0,
        DType::F32,
        device,
        &mut rng,
    )?;
    for _ in 0..2 {
        trainer.step(&x, &mut rng)?;
    }
    device.synchronize()?;
    let resident_bytes = current_bytes(device);
    let probe = MemoryProbe::start(device);
    let mut times = Vec::with_capacity(args.steps);
    for _ in 0..args.steps {
        times.push(timed(device, || trainer.step(&x, &mut rng).map(drop))?);
    }
    let (peak_bytes, memory) = probe.peak();
    Ok(TokenizerFigures {
        model: "tokenizer",
        device: device.describe(),
        params,
        batch: args.batch,
        side,
        recompute_activations: args.recompute_activations,
        steps: times.len(),
        median_s: median(&mut times),
        peak_bytes,
        memory,
        resident_bytes,
    })
}

fn report_tokenizer(t: &Outcome<TokenizerFigures>, batch: usize) {
    match t {
        Outcome::Measured(f) => println!(
            "tokenizer train step, batch {batch}: {:.4} s (median of {} steps; {:.*} images/s); {}, {:.2} M parameters; peak memory {:.0} MiB ({}; {:.0} MiB resident before the steps)",
            f.median_s,
            f.steps,
            // Whole images a second, or the digits that show a slow step's rate.
            if batch as f64 >= 10.0 * f.median_s { 0 } else { 3 },
            batch as f64 / f.median_s,
            f.device,
            f.params as f64 / 1e6,
            mib(f.peak_bytes),
            f.memory,
            mib(f.resident_bytes),
        ),
        Outcome::OutOfMemory(e) => println!("tokenizer train step, batch {batch}: out of memory ({e})"),
        Outcome::Skipped => {}
    }
}

fn measure_sample(
    subject: &Subject,
    vae: &VqVae,
    args: &BenchArgs,
    device: &Device,
) -> Result<SampleFigures> {
    let model = subject.build(device, args.seed)?;
    let weights_bytes = (model.params().num_elements() + vae.params.num_elements()) as u64 * 4;
    let sc = SampleConfig {
        cfg: args.cfg,
        top_k: args.top_k,
        top_p: args.top_p,
        more_smooth: false,
    };
    let _ng = no_grad();
    let _autocast = mvar_engine::autocast(args.precision.autocast(device))?;
    let mut rng = Generator::new(args.seed.wrapping_add(2));
    let labels = random_labels(args.sample_batch, subject.var.num_classes, &mut rng);
    // (seconds for sampling and decode, seconds for the decode, peak bytes before the decode).
    let mut decode_batch = 0;
    let mut run = |probe: Option<&MemoryProbe>| -> Result<(f64, f64, u64)> {
        let t = Instant::now();
        let out = crate::sample::sample_labels(&model, vae, &labels, sc, &mut rng)?;
        device.synchronize()?;
        let sampled = t.elapsed().as_secs_f64();
        let transformer_peak = probe.map(|p| p.peak().0).unwrap_or(0);
        decode_batch = vae.decode_chunk(&out.f_hat);
        let img = vae.fhat_to_img(&out.f_hat)?;
        device.synchronize()?;
        drop(img);
        let total = t.elapsed().as_secs_f64();
        Ok((total, total - sampled, transformer_peak))
    };
    run(None)?;
    // A new peak measurement per batch, so that "before the decode" never holds an earlier
    // batch's decode.
    let mut totals = Vec::new();
    let mut decodes = Vec::new();
    let (mut peak_bytes, mut transformer_peak_bytes, mut memory) = (0, 0, "");
    for _ in 0..args.sample_reps {
        let probe = MemoryProbe::start(device);
        let (total, decode, before_decode) = run(Some(&probe))?;
        totals.push(total);
        decodes.push(decode);
        let (peak, what) = probe.peak();
        peak_bytes = peak_bytes.max(peak);
        transformer_peak_bytes = transformer_peak_bytes.max(before_decode);
        memory = what;
    }
    Ok(SampleFigures {
        batch_s: median(&mut totals),
        decode_s: median(&mut decodes),
        peak_bytes,
        transformer_peak_bytes,
        decode_batch,
        memory,
        weights_bytes,
    })
}

/// MVAR paper Table 2 (RTX 4090, batch 32): (model, depth) -> sampling s/batch, inference
/// memory MB, training s/iter, training memory MB (None: OOM or not reported).
fn paper_row(kind: Kind, depth: usize) -> Option<(f64, f64, Option<f64>, Option<f64>)> {
    Some(match (kind, depth) {
        (Kind::Var, 16) => (0.34, 10882.0, Some(0.99), Some(34319.0)),
        (Kind::Mvar, 16) => (0.27, 3846.0, Some(0.61), Some(20676.0)),
        (Kind::Var, 20) => (0.52, 16244.0, Some(1.35), Some(48173.0)),
        (Kind::Mvar, 20) => (0.45, 5432.0, Some(0.79), Some(27665.0)),
        (Kind::Var, 24) => (0.81, 23056.0, None, None),
        (Kind::Mvar, 24) => (0.71, 7216.0, Some(0.91), Some(38579.0)),
        _ => return None,
    })
}

fn memory_text(bytes: u64, what: &str) -> String {
    format!("{:.0} MiB ({what})", mib(bytes))
}

pub fn run(args: BenchArgs, device: &Device) -> Result<()> {
    if args.models.is_empty() || args.batch == 0 || args.sample_batch == 0 {
        return Err(Error::invalid(
            "mvar bench",
            "expected at least one --model and positive --batch and --sample-batch",
        ));
    }
    if args.what != What::Sample && args.steps == 0 {
        return Err(Error::invalid("mvar bench", "--steps 0: nothing to time"));
    }
    if matches!(args.what, What::Sample | What::All) && args.sample_reps == 0 {
        return Err(Error::invalid(
            "mvar bench",
            "--sample-reps 0: nothing to time",
        ));
    }
    let vae = match &args.tokenizer {
        Some(dir) => crate::common::load_tokenizer(dir, device)?,
        None => VqVae::new(
            VqVaeConfig {
                vocab_size: args.vocab,
                ch: args.vae_ch,
                ch_mult: args.vae_ch_mult.clone(),
                num_res_blocks: args.vae_res_blocks,
                v_patch_nums: args.patch_nums.clone(),
                ..VqVaeConfig::default()
            },
            device,
            args.seed,
        )?,
    };
    vae.set_decode_batch(args.decode_batch);
    if device.describe().contains("emulator") {
        println!("note: the CUDA emulator runs kernels on the CPU; these times are not GPU speeds");
    }
    let pns = vae.config.v_patch_nums.clone();
    let side = pns.last().copied().unwrap_or(1) * vae.config.downsample();
    // The tokenizer trainer has no autocast (`mvar train-tokenizer` trains in f32).
    let precision = match args.precision.autocast(device) {
        Some(_) if args.what != What::Tokenizer => "bf16 autocast",
        _ => "f32",
    };
    println!(
        "tokenizer: {}, {} codes, {side}x{side} images, scales {:?}; precision {precision}{}",
        args.tokenizer
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| format!(
                "fresh (ch {}, ch_mult {:?}, {} residual blocks per level)",
                vae.config.ch, vae.config.ch_mult, vae.config.num_res_blocks
            )),
        vae.config.vocab_size,
        pns,
        if args.recompute_activations {
            "; block activations recomputed in the backward"
        } else {
            ""
        }
    );
    if args.what == What::Tokenizer {
        let figures = guard(measure_tokenizer(vae, side, &args, device))?;
        report_tokenizer(&figures, args.batch);
        if let (Some(p), Outcome::Measured(f)) = (&args.json, &figures) {
            crate::progress::Metrics::open(p, None)?
                .write(&serde_json::to_string(f).unwrap_or_default())?;
        }
        return Ok(());
    }
    let official = args.tokenizer.is_none()
        && !args.recompute_activations
        && pns == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
        && args.vocab == 4096
        && args.batch == 32
        && args.sample_batch == 32
        && args.width.is_none()
        && args.heads.is_none();
    // An MVAR whose neighbourhoods do not fit the pyramid is refused before any model is
    // measured, not after the models before it.
    let mvar_config = || crate::common::mvar_config(&pns, args.refine_step, args.kernel_size);
    if args.models.iter().any(|m| m.kind == Kind::Mvar) {
        mvar_config().validate(&pns)?;
    }
    let mut results: Vec<(Kind, ModelFigures)> = Vec::new();
    let mut json = match &args.json {
        Some(p) => Some(crate::progress::Metrics::open(p, None)?),
        None => None,
    };
    for name in &args.models {
        let depth = name.depth.unwrap_or(args.depth);
        let mut var = VarConfig::with_depth(depth);
        var.embed_dim = args.width.unwrap_or(0);
        var.num_heads = args.heads.unwrap_or(0);
        var.num_classes = args.classes;
        var.patch_nums = pns.clone();
        var.cvae = vae.config.z_channels;
        var.vocab_size = vae.config.vocab_size;
        let mvar = (name.kind == Kind::Mvar).then(mvar_config);
        let label = format!(
            "{}-d{depth}",
            if name.kind == Kind::Var {
                "var"
            } else {
                "mvar"
            }
        );
        let subject = Subject {
            name: label.clone(),
            kind: name.kind,
            var,
            mvar,
        };
        // Built here to count its parameters; the training measurement then takes it over.
        let model = subject.build(device, args.seed)?;
        let params = model.params().num_elements();
        println!(
            "== {label}: width {}, {} heads, {:.1} M parameters{}",
            subject.var.width(),
            subject.var.heads(),
            params as f64 / 1e6,
            subject
                .mvar
                .as_ref()
                .map(|m| format!(
                    ", {}x{} neighbourhoods from scale {}",
                    m.kernel_size, m.kernel_size, m.refine_step
                ))
                .unwrap_or_default()
        );
        let paper = official.then(|| paper_row(name.kind, depth)).flatten();
        let train = if args.what == What::Sample {
            drop(model);
            Outcome::Skipped
        } else {
            let t = guard(measure_train(&subject, model, &vae, &args, device))?;
            report_train(&t, args.batch, paper);
            t
        };
        if let Device::Cuda(d) = device {
            d.empty_cache();
        }
        let sample = if args.what == What::Train {
            Outcome::Skipped
        } else {
            let s = guard(measure_sample(&subject, &vae, &args, device))?;
            report_sample(&s, args.sample_batch, paper);
            s
        };
        if let Device::Cuda(d) = device {
            d.empty_cache();
        }
        let figures = ModelFigures {
            model: subject.name.clone(),
            depth,
            width: subject.var.width(),
            params,
            device: device.describe(),
            precision: precision.to_string(),
            recompute_activations: args.recompute_activations,
            batch: args.batch,
            sample_batch: args.sample_batch,
            train,
            sample,
        };
        if let Some(j) = json.as_mut() {
            j.write(&serde_json::to_string(&figures).unwrap_or_default())?;
        }
        results.push((name.kind, figures));
    }
    report_ratios(&results, official);
    Ok(())
}

fn report_train(
    t: &Outcome<TrainFigures>,
    batch: usize,
    paper: Option<(f64, f64, Option<f64>, Option<f64>)>,
) {
    match t {
        Outcome::Measured(f) => {
            for s in &f.segments {
                println!(
                    "train segment scales {}..{} ({} tokens, {:.0} % of steps): {:.4} s/step median of {}",
                    s.scales[0],
                    s.scales[1],
                    s.tokens,
                    100.0 * s.share,
                    s.median_s,
                    s.steps
                );
            }
            println!(
                "train step, batch {batch}: {:.4} s/it, {:.0} img/s; peak {}; between steps {:.0} MiB",
                f.step_s,
                batch as f64 / f.step_s,
                memory_text(f.peak_bytes, f.memory),
                mib(f.resident_bytes)
            );
        }
        Outcome::OutOfMemory(e) => println!("train step, batch {batch}: out of memory ({e})"),
        Outcome::Skipped => {}
    }
    if let Some((_, _, s, m)) = paper.filter(|_| !matches!(t, Outcome::Skipped)) {
        println!(
            "  paper (RTX 4090, batch 32): {}",
            match (s, m) {
                (Some(s), Some(m)) => format!("{s} s/it, {m} MB"),
                _ => "OOM".into(),
            }
        );
    }
}

fn report_sample(
    s: &Outcome<SampleFigures>,
    batch: usize,
    paper: Option<(f64, f64, Option<f64>, Option<f64>)>,
) {
    match s {
        Outcome::Measured(f) => println!(
            "sample {batch} images: {:.4} s/batch (decode {:.4} s, {} images a pass), {:.1} img/s; peak {}, {:.0} MiB before the decode; weights {:.0} MiB",
            f.batch_s,
            f.decode_s,
            f.decode_batch,
            batch as f64 / f.batch_s,
            memory_text(f.peak_bytes, f.memory),
            mib(f.transformer_peak_bytes),
            mib(f.weights_bytes)
        ),
        Outcome::OutOfMemory(e) => println!("sample {batch} images: out of memory ({e})"),
        Outcome::Skipped => {}
    }
    if let Some((t, m, _, _)) = paper.filter(|_| !matches!(s, Outcome::Skipped)) {
        println!("  paper (RTX 4090, batch 32): {t} s/batch, {m} MB");
    }
}

/// VAR's figure over MVAR's at the same depth (how the paper states its gains), next to the
/// paper's own ratios where it has that depth.
fn report_ratios(results: &[(Kind, ModelFigures)], official: bool) {
    for (kind, m) in results {
        if *kind != Kind::Mvar {
            continue;
        }
        let Some((_, v)) = results
            .iter()
            .find(|(k, v)| *k == Kind::Var && v.depth == m.depth && v.width == m.width)
        else {
            continue;
        };
        let paper = official
            .then(|| paper_row(Kind::Var, m.depth).zip(paper_row(Kind::Mvar, m.depth)))
            .flatten();
        let ratio = |ours: Option<(f64, f64)>, theirs: Option<(f64, f64)>| {
            let mut t = ours
                .map(|(a, b)| format!("{:.2}x", a / b))
                .unwrap_or_else(|| "-".into());
            if let Some((a, b)) = theirs {
                t += &format!(" (paper {:.2}x)", a / b);
            }
            t
        };
        let (vt, mt) = match (&v.train, &m.train) {
            (Outcome::Measured(a), Outcome::Measured(b)) => (Some(a), Some(b)),
            _ => (None, None),
        };
        let (vs, ms) = match (&v.sample, &m.sample) {
            (Outcome::Measured(a), Outcome::Measured(b)) => (Some(a), Some(b)),
            _ => (None, None),
        };
        let bytes = |a: u64, b: u64| (a as f64, b as f64);
        println!(
            "== {} : {} (VAR's figure over MVAR's): training step time {}, training memory {}, sampling time {}, inference memory {} ({} before the decode)",
            v.model,
            m.model,
            ratio(vt.zip(mt).map(|(a, b)| (a.step_s, b.step_s)), paper.and_then(|(p, q)| Some((p.2?, q.2?)))),
            ratio(vt.zip(mt).map(|(a, b)| bytes(a.peak_bytes, b.peak_bytes)), paper.and_then(|(p, q)| Some((p.3?, q.3?)))),
            ratio(vs.zip(ms).map(|(a, b)| (a.batch_s, b.batch_s)), paper.map(|(p, q)| (p.0, q.0))),
            ratio(vs.zip(ms).map(|(a, b)| bytes(a.peak_bytes, b.peak_bytes)), paper.map(|(p, q)| (p.1, q.1))),
            ratio(vs.zip(ms).map(|(a, b)| bytes(a.transformer_peak_bytes, b.transformer_peak_bytes)), None),
        );
    }
}
