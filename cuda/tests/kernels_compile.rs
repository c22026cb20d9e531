//! The GPU-free check of every kernel: NVRTC compiles each file in `cuda/kernels/` to a CUBIN for
//! sm_80 and sm_90 (ptxas runs inside NVRTC, so this is a real assembly), and the register and
//! spill figures of every kernel are printed.
//!
//! Without libnvrtc on the loader path the test prints that it skipped; with
//! `MVAR_REQUIRE_NVRTC=1` (as `.ci/run` sets after installing the NVRTC wheel) a missing NVRTC
//! fails it. `MVAR_KERNEL_FILES=na2d.cu,attention.cu` limits the first test to those files (for
//! a quick look at one file's registers while tuning it).

use mvar_cuda::compile::{compile, nvrtc_version, parse_ptxas_log};
use mvar_cuda::kernels::{KernelFile, ALL};

/// Turns off CUDA's compute cache (`~/.nv/ComputeCache`) for this process, once, before any
/// compilation. NVRTC 13.0.88 (the CUDA 13.0 toolkit on an H200 machine, 2026-12-04) serves a
/// program compiled before, by any process, from that cache: the CUBIN comes back but ptxas
/// does not run, so the log has no register report and this check read "no kernel in the ptxas
/// report" for every file compiled earlier (by the parity tests, or a previous run). With
/// `CUDA_CACHE_DISABLE=1` it compiled all of them with the report (seen there the same day).
fn disable_compute_cache() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // The write races nothing: every test of this binary calls this first, and the Once makes
    // the others wait until it is done, so no thread reads the environment meanwhile.
    ONCE.call_once(|| std::env::set_var("CUDA_CACHE_DISABLE", "1"));
}

fn nvrtc_or_skip() -> bool {
    disable_compute_cache();
    // Under tools/cuda-emu.sh NVRTC is the emulator's g++ front end: it assembles nothing and
    // reports no registers, and the files were just built by the emulated tests anyway.
    if std::env::var_os("MVAR_CUDA_EMU").is_some() {
        println!("skipped: the CUDA emulator's NVRTC stands in (MVAR_CUDA_EMU); no ptxas report");
        return false;
    }
    if mvar_cuda::nvrtc_present() {
        return true;
    }
    if std::env::var("MVAR_REQUIRE_NVRTC").as_deref() == Ok("1") {
        panic!(
            "MVAR_REQUIRE_NVRTC=1 but libnvrtc.so.13 could not be loaded: put the \
             nvidia-cuda-nvrtc wheel's nvidia/cu13/lib (or the toolkit's lib64) on LD_LIBRARY_PATH"
        );
    }
    println!(
        "skipped: NVRTC not found (libnvrtc.so.13 not on the loader path); kernels not compiled"
    );
    false
}

#[test]
fn every_kernel_file_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip() {
        return;
    }
    let (major, minor) = nvrtc_version().expect("NVRTC version");
    println!("NVRTC {major}.{minor}: {} kernel files", ALL.len());
    let only = std::env::var("MVAR_KERNEL_FILES").unwrap_or_default();
    let files: Vec<&KernelFile> = ALL
        .iter()
        .filter(|f| only.is_empty() || only.split(',').any(|n| n.trim() == f.name))
        .collect();
    assert!(
        !files.is_empty(),
        "MVAR_KERNEL_FILES={only:?} names no kernel file"
    );
    let mut failures = Vec::new();
    let mut spills = Vec::new();
    for arch in ["sm_80", "sm_90"] {
        let mut kernels = 0;
        let mut spilling = 0;
        for &file in &files {
            match compile(file, arch) {
                Ok(c) => {
                    assert!(!c.cubin.is_empty(), "{}: empty CUBIN for {arch}", file.name);
                    let stats = parse_ptxas_log(&c.log);
                    assert!(
                        !stats.is_empty(),
                        "{}: no kernel in the ptxas report for {arch}:\n{}",
                        file.name,
                        c.log
                    );
                    kernels += stats.len();
                    for k in &stats {
                        if k.spill_stores + k.spill_loads > 0 {
                            spilling += 1;
                            spills.push(format!("{arch} {} {}", file.name, k.kernel));
                        }
                        if arch == "sm_90" || k.spill_stores + k.spill_loads > 0 {
                            println!(
                                "  {arch} {:<18} {:<28} {:>3} registers, {:>4} B spill stores, {:>4} B spill loads, {:>6} B smem",
                                file.name, k.kernel, k.registers, k.spill_stores, k.spill_loads, k.shared_bytes
                            );
                        }
                    }
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        println!("{arch}: {kernels} kernels compiled, {spilling} with spills");
    }
    assert!(
        failures.is_empty(),
        "kernel compilation failed:\n{}",
        failures.join("\n\n")
    );
    // Register spills go to local memory on every access of the spilled value: in the tuned
    // kernels' inner loops that costs more than the occupancy their launch bounds buy, so a
    // kernel that spills must get a lower block count (or fewer live values), not be shipped.
    assert!(
        spills.is_empty(),
        "kernels spill registers (expected none; lower their __launch_bounds__ block count or \
         their live registers):\n{}",
        spills.join("\n")
    );
}

#[test]
fn a_compile_error_shows_the_log_and_the_file_name() {
    if !nvrtc_or_skip() {
        return;
    }
    let broken = KernelFile {
        name: "broken_on_purpose.cu",
        source: "extern \"C\" __global__ void k() { no_such_function(); }",
    };
    let err = compile(&broken, "sm_90")
        .expect_err("a broken kernel must not compile")
        .to_string();
    assert!(
        err.contains("broken_on_purpose.cu") && err.contains("no_such_function"),
        "{err}"
    );
}

/// The files with tensor-core code compile for Turing (sm_75, the oldest architecture CUDA 13
/// targets), where their mma kernels become traps the host never launches, so the rest of
/// the file still works on such a GPU.
#[test]
fn the_tensor_core_files_compile_for_sm75() {
    if !nvrtc_or_skip() {
        return;
    }
    for file in ALL
        .iter()
        .filter(|f| f.source.contains("#include \"mma.cuh\""))
    {
        if let Err(e) = compile(file, "sm_75") {
            panic!("{} for sm_75: {e}", file.name);
        }
    }
}
