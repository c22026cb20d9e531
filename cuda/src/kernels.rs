//! The kernel sources, embedded in the binary. Each `.cu` file is compiled as one NVRTC program
//! with `common.cuh` in front of it (NVRTC has no file system to find our header in); a `#line`
//! directive keeps compiler messages pointing at the file's own line numbers.

/// One kernel file.
#[derive(Debug, Clone, Copy)]
pub struct KernelFile {
    pub name: &'static str,
    pub source: &'static str,
}

impl KernelFile {
    /// The program NVRTC compiles: the common header, then the file.
    pub fn full_source(&self) -> String {
        format!(
            "{COMMON_HEADER}\n#line 1 \"{}\"\n{}",
            self.name, self.source
        )
    }
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
    NA2D => "na2d.cu",
    ATTENTION => "attention.cu",
}
