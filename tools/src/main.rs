//! The `mvar` command line.

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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => info(),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
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
