//! The kernel sources, embedded in the binary. Each `.cu` file is compiled as one NVRTC program
//! with `common.cuh` in front of it, and each `#include "<name>"` line of one of our own headers
//! ([`HEADERS`]) replaced by that header's text (NVRTC has no file system to find our headers
//! in); `#line` directives keep compiler messages pointing at the right file and line.

/// One kernel file.
#[derive(Debug, Clone, Copy)]
pub struct KernelFile {
    pub name: &'static str,
    pub source: &'static str,
}

impl KernelFile {
    /// The program NVRTC compiles: the common header, then the file with our headers inlined.
    pub fn full_source(&self) -> String {
        let mut out = format!("{COMMON_HEADER}\n#line 1 \"{}\"\n", self.name);
        for (i, line) in self.source.lines().enumerate() {
            match included_header(line) {
                Some((name, text)) => {
                    out.push_str(&format!("#line 1 \"{name}\"\n{text}\n"));
                    out.push_str(&format!("#line {} \"{}\"\n", i + 2, self.name));
                }
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }
}

/// Our headers a kernel file may `#include "<name>"`, by name.
pub const HEADERS: &[(&str, &str)] = &[("mma.cuh", MMA_HEADER), ("cubic.cuh", CUBIC_HEADER)];

/// bf16 tensor-core fragment helpers (ldmatrix, mma.sync, cp.async), sm_80 and newer.
pub const MMA_HEADER: &str = include_str!("../kernels/mma.cuh");

/// The taps of bicubic resampling along one axis (interp.cu and quant_step.cu).
pub const CUBIC_HEADER: &str = include_str!("../kernels/cubic.cuh");

/// The header a source line includes, when it is one of [`HEADERS`].
fn included_header(line: &str) -> Option<(&'static str, &'static str)> {
    let rest = line.trim().strip_prefix("#include")?.trim();
    let name = rest.strip_prefix('"')?.strip_suffix('"')?;
    HEADERS.iter().copied().find(|(n, _)| *n == name)
}

/// Shared device helpers (bf16 conversion, grid-stride loops, broadcast offsets).
pub const COMMON_HEADER: &str = include_str!("../kernels/common.cuh");

macro_rules! kernel_files {
    ($($konst:ident => $file:literal),* $(,)?) => {
        $(
            #[doc = concat!("`cuda/kernels/", $file, "`")]
            pub const $konst: KernelFile = KernelFile { name: $file, source: include_str!(concat!("../kernels/", $file)) };
        )*
        /// Every kernel file, for the compile check.
        pub const ALL: &[KernelFile] = &[$($konst),*];
    };
}

kernel_files! {
    ELEMENTWISE => "elementwise.cu",
    REDUCE => "reduce.cu",
    SOFTMAX => "softmax.cu",
    NORM => "norm.cu",
    INDEX => "index.cu",
    CONV => "conv.cu",
    OPTIM => "optim.cu",
    RANDOM => "random.cu",
    INTERP => "interp.cu",
    QUANT => "quant.cu",
    QUANT_STEP => "quant_step.cu",
    NA2D => "na2d.cu",
    ATTENTION => "attention.cu",
    SAMPLE => "sample.cu",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_headers_are_inlined_and_line_numbers_kept() {
        let file = KernelFile {
            name: "t.cu",
            source: "int a;\n#include \"mma.cuh\"\nint b;\n#include <other.h>\n",
        };
        let full = file.full_source();
        assert!(full.starts_with(COMMON_HEADER));
        assert!(full.contains("#line 1 \"mma.cuh\"\n"));
        assert!(full.contains(MMA_HEADER));
        // `int b;` is line 3 of t.cu
        assert!(full.contains("#line 3 \"t.cu\"\nint b;\n"), "{full}");
        // other includes are left to the compiler
        assert!(full.contains("#include <other.h>\n"));
        assert!(!full.contains("#include \"mma.cuh\""));
    }
}
