//! The `mvar` command line.

mod bench;
mod classifier;
mod common;
mod demo;
mod edit;
mod eval;
mod heap;
mod import;
mod plot;
mod progress;
mod sample;
mod token_cache;
mod train;
mod train_tokenizer;

use clap::{Parser, Subcommand};
use mvar_engine::Device;

#[global_allocator]
static HEAP: heap::CountingAllocator = heap::CountingAllocator;

#[derive(Parser)]
#[command(
    name = "mvar",
    version,
    about = "VAR / MVAR image generation on the mvar engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main job: train a small tokenizer and MVAR (or VAR, --model var) on the bundled data
    /// set within a time budget, then write samples, reconstructions and loss curves.
    Demo(Box<demo::DemoArgs>),
    /// Report the build, the CPU threads and the GPU found at run time (if any), and the device
    /// that MVAR_DEVICE selects.
    Info,
    /// Train the multi-scale VQVAE tokenizer on an image folder or a CIFAR-style binary data set.
    TrainTokenizer(Box<train_tokenizer::TrainTokenizerArgs>),
    /// Train a VAR or MVAR transformer on the token maps of a data set.
    Train(Box<train::TrainArgs>),
    /// Class-conditional images from a trained VAR or MVAR folder.
    Sample(Box<sample::SampleArgs>),
    /// Zero-shot in-painting, out-painting and class-conditional editing of an image.
    Edit(Box<edit::EditArgs>),
    /// Train the small image classifier that `mvar eval` scores samples with.
    TrainClassifier(Box<classifier::TrainClassifierArgs>),
    /// Validation loss and token accuracy per scale, reconstruction PSNR, and (with
    /// --classifier) the classifier accuracy and Frechet distance of samples.
    Eval(Box<eval::EvalArgs>),
    /// Time and peak memory of a training step and of sampling a batch, for VAR and MVAR at
    /// any depth (fresh weights, no data needed), with the ratios MVAR : VAR; the model-level
    /// figures of the MVAR paper's Table 2.
    Bench(Box<bench::BenchArgs>),
    /// A runnable model folder (for sample, edit, eval, train --init-from) from official
    /// checkpoints: the configuration is read off the tensors, the weights loaded strictly.
    Import(Box<import::ImportArgs>),
    /// Convert an official PyTorch checkpoint (.pth, tensors only, no code executed) to
    /// safetensors with the same tensor names.
    Convert {
        /// The .pth file (torch.save zip format).
        input: std::path::PathBuf,
        /// The .safetensors file to write.
        output: std::path::PathBuf,
        /// Keep only tensors under this prefix and strip it (e.g. `model` for a training
        /// checkpoint that nests the state dict).
        #[arg(long)]
        strip_prefix: Option<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    progress::install_interrupt_handler();
    // The timeline's host-memory counter (MVAR_PROFILE=trace) reads this binary's heap count.
    mvar_engine::profile::set_host_memory(heap::live_bytes);
    // A timeline asked for (MVAR_PROFILE=trace=FILE) whose file cannot be written stops the run
    // before it starts, naming the file.
    if let Err(e) = mvar_engine::profile::open_timeline() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    let result = match cli.command {
        Command::Info => info(),
        Command::Demo(args) => with_device(|d| demo::run(*args, d)),
        Command::TrainTokenizer(args) => with_device(|d| train_tokenizer::run(*args, d)),
        Command::Train(args) => with_device(|d| train::run(*args, d)),
        Command::Sample(args) => with_device(|d| sample::run(*args, d)),
        Command::Edit(args) => with_device(|d| edit::run(*args, d)),
        Command::TrainClassifier(args) => with_device(|d| classifier::run(*args, d)),
        Command::Eval(args) => with_device(|d| eval::run(*args, d)),
        Command::Bench(args) => with_device(|d| bench::run(*args, d)),
        Command::Import(args) => import::run(*args),
        Command::Convert {
            input,
            output,
            strip_prefix,
        } => convert(&input, &output, strip_prefix.as_deref()),
    };
    let profile = mvar_engine::profile::report_text();
    if !profile.is_empty() {
        eprintln!("{profile}");
    }
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    if progress::interrupted() {
        std::process::exit(progress::INTERRUPTED_EXIT);
    }
}

fn convert(
    input: &std::path::Path,
    output: &std::path::Path,
    prefix: Option<&str>,
) -> mvar_engine::Result<()> {
    let r = mvar_models::convert(input, output, prefix)?;
    println!(
        "wrote {}: {} tensors, {:.1} MB of tensor data{}",
        output.display(),
        r.tensors,
        r.tensor_bytes as f64 / 1e6,
        if r.skipped.is_empty() {
            String::new()
        } else {
            format!("; skipped non-tensor entries {:?}", r.skipped)
        }
    );
    Ok(())
}

/// Picks the device (MVAR_DEVICE, else the first GPU, else the CPU), says which, and runs `f`.
fn with_device(f: impl FnOnce(&Device) -> mvar_engine::Result<()>) -> mvar_engine::Result<()> {
    let device = Device::from_env()?;
    println!("device: {}", device.describe());
    f(&device)
}

fn info() -> mvar_engine::Result<()> {
    println!("mvar {}", env!("CARGO_PKG_VERSION"));
    println!("cpu threads: {}", rayon_threads());
    println!(
        "cpu vectors: {} (element-wise loops; MVAR_CPU_VECTORS caps them)",
        mvar_ops::cpu_vectors().name()
    );
    println!(
        "cpu bf16 matrix products: {} (MVAR_CPU_BF16_GEMM=0 widens them)",
        mvar_ops::cpu_bf16_gemm()
    );
    let driver = mvar_cuda::driver_present();
    println!(
        "cuda driver: {}",
        if driver {
            "found"
        } else {
            "not found (CPU backend only)"
        }
    );
    println!("cuda devices: {}", mvar_cuda::device_count());
    println!(
        "nvrtc: {}",
        if mvar_cuda::nvrtc_present() {
            "found"
        } else {
            "not found"
        }
    );
    let device = Device::from_env()?;
    println!("device: {}", device.describe());
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
