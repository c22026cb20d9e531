//! The `mvar` command line.

mod train_tokenizer;

use clap::{Parser, Subcommand};
use mvar_engine::Device;

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
    /// Report the build, the CPU threads and the GPU found at run time (if any), and the device
    /// that MVAR_DEVICE selects.
    Info,
    /// Train the multi-scale VQVAE tokenizer on an image folder or a CIFAR-style binary data set.
    TrainTokenizer(Box<train_tokenizer::TrainTokenizerArgs>),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => info(),
        Command::TrainTokenizer(args) => with_device(|d| train_tokenizer::run(*args, d)),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
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
