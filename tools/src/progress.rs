//! What the training commands share around the step loop: the progress bar, the JSONL metrics
//! file (cut back to the checkpoint on resume, so an interrupted run's curve equals an
//! uninterrupted one), device memory for the bar, and Ctrl-C handling (finish the step, write a
//! checkpoint, exit 130).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::common::io;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mvar_engine::{Device, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
pub const INTERRUPTED_EXIT: i32 = 130;

/// Installs the Ctrl-C handler: the first Ctrl-C asks the step loop to write a checkpoint and
/// stop (a token cache build: to keep its rows for the next run); a second one exits at once.
pub fn install_interrupt_handler() {
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without a checkpoint");
            std::process::exit(INTERRUPTED_EXIT);
        }
        eprintln!(
            "\ninterrupt: finishing the step or batch in hand and keeping what was done (Ctrl-C again to exit now)"
        );
    });
}

/// Whether Ctrl-C was pressed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The step of a metrics line (`{"step":N,...}`), if it has one.
fn line_step(line: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get("step")?.as_u64()
}

/// An append-only JSONL metrics file, one object per step.
pub struct Metrics {
    path: PathBuf,
    file: std::fs::File,
}

impl Metrics {
    /// A fresh file (`resume_step` None), or the existing one cut back to the lines of steps
    /// up to `resume_step`: the steps after the last checkpoint are trained again and must not
    /// appear twice.
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<Metrics> {
        match resume_step {
            None => {
                mvar_models::checkpoint::write_atomic(path, b"")?;
            }
            Some(step) => {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let kept: String = text
                    .lines()
                    .filter(|l| line_step(l).is_some_and(|s| s <= step))
                    .map(|l| format!("{l}\n"))
                    .collect();
                mvar_models::checkpoint::write_atomic(path, kept.as_bytes())?;
            }
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok(Metrics {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one line (a JSON object without the trailing newline).
    pub fn write(&mut self, json: &str) -> Result<()> {
        self.file
            .write_all(format!("{json}\n").as_bytes())
            .map_err(io(&self.path))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Device memory for the progress bar: the caching allocator's use and peak on a GPU, the
/// process's resident set on the CPU.
pub fn memory_text(device: &Device) -> String {
    match device {
        Device::Cuda(d) => {
            let s = d.memory_stats();
            format!(
                "gpu {:.0}/{:.0} MiB (peak)",
                s.in_use_bytes as f64 / 1048576.0,
                s.peak_in_use_bytes as f64 / 1048576.0
            )
        }
        Device::Cpu => resident_bytes()
            .map(|b| format!("rss {:.0} MiB", b as f64 / 1048576.0))
            .unwrap_or_default(),
    }
}

fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// A progress bar over training steps that shows loss, throughput, ETA and memory; drawn only
/// on a terminal (logs and tests get the periodic plain lines instead).
pub struct Progress {
    bar: ProgressBar,
    start: Instant,
    first_step: u64,
}

impl Progress {
    pub fn new(what: &str, done: u64, total: u64) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} {{msg}} [{{elapsed_precise}} < {{eta_precise}}]"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_position(done);
        bar.reset_eta();
        Progress {
            bar,
            start: Instant::now(),
            first_step: done,
        }
    }

    pub fn set_total(&self, total: u64) {
        self.bar.set_length(total);
    }

    /// Steps per second since this bar started.
    pub fn rate(&self, step: u64) -> f64 {
        (step - self.first_step) as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    /// Moves to `step` with `msg` (loss, throughput, memory).
    pub fn update(&self, step: u64, msg: String) {
        self.bar.set_position(step);
        self.bar.set_message(msg);
    }

    /// Prints a line above the bar (or plainly when there is no terminal).
    pub fn println(&self, line: String) {
        if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
