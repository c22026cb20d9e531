//! Run-time compilation of `cuda/kernels/*.cu` with NVRTC, straight to a CUBIN for the GPU's
//! architecture, cached on disk.
//!
//! Why CUBIN and not PTX: PTX from a newer NVRTC than the driver cannot be JIT-compiled by the
//! driver, while a CUBIN for the exact architecture loads under the CUDA minor-version
//! compatibility rules. `--ptxas-options=-v` makes NVRTC report registers and spills per kernel,
//! which the CI check prints.
//!
//! Cache key: a hash of the full source (common header included) and the options, the
//! architecture, and the NVRTC version. Location: `MVAR_KERNEL_CACHE`, else
//! `$XDG_CACHE_HOME/mvar/kernels`, else `$HOME/.cache/mvar/kernels`. An unwritable cache is not an
//! error: the kernel is compiled again next time.

use std::ffi::CString;
use std::path::PathBuf;

use cudarc::nvrtc::{result, sys};

use crate::kernels::KernelFile;
use crate::CudaError;

/// Options every kernel file is compiled with.
fn options(arch: &str) -> Vec<String> {
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
        "-lineinfo".to_string(),
    ];
    if let Ok(dir) = std::env::var("MVAR_CUDA_INCLUDE") {
        opts.push(format!("--include-path={dir}"));
    }
    if mma_portable() {
        opts.push("-DMVAR_MMA_PORTABLE=1".to_string());
    }
    opts
}

/// `MVAR_MMA_PORTABLE=1`: the tensor-core kernels' bf16 packing and 2^x in portable code instead
/// of their single PTX instructions (mma.cuh), to tell on a GPU whether those instructions are
/// what changed a result or a time. Part of the options, so of the cache key, and of the key of
/// a device's loaded modules: a process (a bench) can time both.
pub fn mma_portable() -> bool {
    std::env::var("MVAR_MMA_PORTABLE").as_deref() == Ok("1")
}

/// The CUBIN target for a compute capability. Newer GPUs than the table get the newest entry
/// of their major version's family only when listed: an unknown architecture is an error rather
/// than a wrong binary.
pub fn arch_for(major: i32, minor: i32) -> Result<&'static str, CudaError> {
    Ok(match (major, minor) {
        (7, 0) => "sm_70",
        (7, 2) => "sm_72",
        (7, 5) => "sm_75",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 7) => "sm_87",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        _ => return Err(CudaError::UnsupportedArch { major, minor }),
    })
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    if !crate::nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::Driver {
            during: "reading the NVRTC version".into(),
            message: format!("{e:?}"),
        })?;
    Ok((major, minor))
}

/// A compiled kernel file.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    /// NVRTC's log (warnings and the ptxas register/spill report).
    pub log: String,
}

/// Compiles one kernel file for `arch` (e.g. "sm_90").
pub fn compile(file: &KernelFile, arch: &str) -> Result<Compiled, CudaError> {
    if !crate::nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let source = file.full_source();
    let compile_err = |what: &str, e: cudarc::nvrtc::result::NvrtcError| CudaError::Compile {
        file: file.name.to_string(),
        arch: arch.to_string(),
        log: format!("{what}: {e:?}"),
    };
    let src = CString::new(source).map_err(|_| CudaError::Compile {
        file: file.name.to_string(),
        arch: arch.to_string(),
        log: "the source contains a NUL byte".into(),
    })?;
    let name = CString::new(file.name).unwrap_or_default();
    let prog = result::create_program(&src, Some(&name))
        .map_err(|e| compile_err("nvrtcCreateProgram", e))?;
    // SAFETY: `prog` was just created and is destroyed once below; the log and CUBIN buffers are
    // sized by NVRTC's own size queries.
    let out = unsafe {
        let compiled = result::compile_program(prog, &options(arch));
        let log = result::get_program_log(prog)
            .map(|l| {
                let bytes: Vec<u8> = l
                    .iter()
                    .take_while(|&&c| c != 0)
                    .map(|&c| c as u8)
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        let out = match compiled {
            Err(_) => Err(CudaError::Compile {
                file: file.name.to_string(),
                arch: arch.to_string(),
                log,
            }),
            Ok(()) => {
                let mut size = 0usize;
                let got = sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|_| {
                        let mut cubin = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _)
                            .result()
                            .map(|_| cubin)
                    });
                got.map(|cubin| Compiled { cubin, log })
                    .map_err(|e| compile_err("nvrtcGetCUBIN", e))
            }
        };
        let _ = result::destroy_program(prog);
        out
    };
    out
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("MVAR_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("mvar/kernels"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/mvar/kernels"))
}

/// FNV-1a, 64 bits: a stable hash (std's hasher is not stable across releases).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The CUBIN of `file` for `arch`, from the disk cache or freshly compiled (then cached).
pub fn cubin(file: &KernelFile, arch: &str) -> Result<Vec<u8>, CudaError> {
    let (major, minor) = nvrtc_version()?;
    let source = file.full_source();
    let key = fnv1a(&[source.as_bytes(), options(arch).join(" ").as_bytes()]);
    let stem = file.name.trim_end_matches(".cu");
    let cached = cache_dir().map(|d| {
        d.join(format!(
            "{stem}-{key:016x}-{arch}-nvrtc{major}.{minor}.cubin"
        ))
    });
    if let Some(path) = &cached {
        if let Ok(bytes) = std::fs::read(path) {
            if !bytes.is_empty() {
                return Ok(bytes);
            }
        }
    }
    let compiled = compile(file, arch)?;
    if let Some(path) = cached {
        // Best effort, atomically: a reader never sees a half-written CUBIN.
        if let Some(dir) = path.parent() {
            if std::fs::create_dir_all(dir).is_ok() {
                let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&tmp, &compiled.cubin).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
        }
    }
    Ok(compiled.cubin)
}

/// Register and spill figures of one kernel, from the ptxas report in an NVRTC log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelStats {
    pub kernel: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub shared_bytes: u32,
}

/// Parses ptxas' `-v` report:
/// `ptxas info    : Compiling entry function 'name' for 'sm_90'`,
/// `ptxas info    : Function properties for name` / `N bytes stack frame, S bytes spill stores, L bytes spill loads`,
/// `ptxas info    : Used R registers, ... M bytes smem ...`.
pub fn parse_ptxas_log(log: &str) -> Vec<KernelStats> {
    let mut out: Vec<KernelStats> = Vec::new();
    let number_before = |line: &str, unit: &str| -> Option<u32> {
        let i = line.find(unit)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelStats {
                kernel: name,
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
                shared_bytes: 0,
            });
        } else if let Some(k) = out.last_mut() {
            if let Some(s) = number_before(line, "bytes spill stores") {
                k.spill_stores = s;
            }
            if let Some(l) = number_before(line, "bytes spill loads") {
                k.spill_loads = l;
            }
            if let Some(r) = number_before(line, "registers") {
                k.registers = r;
            }
            if let Some(m) = number_before(line, "bytes smem") {
                k.shared_bytes = m;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_report_is_parsed() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'unary_f32' for 'sm_90'\n\
ptxas info    : Function properties for unary_f32\n\
    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
ptxas info    : Used 18 registers, 384 bytes smem, 380 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'binary_bf16' for 'sm_90'\n\
ptxas info    : Used 30 registers, used 1 barriers, 380 bytes cmem[0]\n";
        let s = parse_ptxas_log(log);
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0],
            KernelStats {
                kernel: "unary_f32".into(),
                registers: 18,
                spill_stores: 8,
                spill_loads: 4,
                shared_bytes: 384
            }
        );
        assert_eq!(s[1].registers, 30);
        assert_eq!(s[1].spill_stores, 0);
    }

    #[test]
    fn arch_table() {
        assert_eq!(arch_for(9, 0).unwrap(), "sm_90");
        assert_eq!(arch_for(8, 0).unwrap(), "sm_80");
        assert!(arch_for(6, 1).unwrap_err().to_string().contains("6.1"));
    }

    #[test]
    fn hash_is_stable() {
        // Pinned so that a change of the hash (which would orphan every cached CUBIN) is noticed.
        assert_eq!(fnv1a(&[b"abc"]), fnv1a(&[b"abc"]));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }
}
