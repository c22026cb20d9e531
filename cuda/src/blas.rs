//! Matrix products on cuBLAS.
//!
//! Row-major C\[b\] (m x n) = op(A\[b\]) (m x k) * op(B\[b\]) (k x n), where op transposes an operand
//! stored transposed. cuBLAS is column-major; a row-major matrix read as column-major is its
//! transpose, so we ask cuBLAS for C^T = op(B)^T op(A)^T, which lands in memory as row-major C.
//! Operand by operand (the leading dimension is the stored row length):
//!   first cuBLAS operand  = B: not transposed -> OP_N, ld n; transposed ([n, k]) -> OP_T, ld k;
//!   second cuBLAS operand = A: not transposed -> OP_N, ld k; transposed ([k, m]) -> OP_T, ld m.
//!
//! f32 runs with f32 compute (no TF32 unless `MVAR_TF32=1`, so that results stay comparable with
//! the CPU reference); bf16 inputs and output run with f32 accumulation (CUBLAS_COMPUTE_32F),
//! which is what mixed-precision training needs.

use std::ffi::c_void;

use cudarc::cublas::{result, sys};

use crate::buffer::{BufferKind, CudaBuffer};
use crate::{CudaDevice, CudaError};

/// Shapes of a batched product; an operand whose `*_batched` flag is false is shared by every
/// batch entry (stride 0).
#[derive(Debug, Clone, Copy)]
pub struct GemmShape {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub a_batched: bool,
    pub b_batched: bool,
}

fn to_int(v: usize, what: &str, s: &GemmShape) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Blas {
        op: "matmul".into(),
        sizes: format!("{s:?}"),
        message: format!("{what} = {v} exceeds cuBLAS's 32-bit limit"),
    })
}

/// C = op(A) op(B) for every batch entry; a new buffer of batch * m * n elements.
pub fn gemm(
    dev: &CudaDevice,
    a: &CudaBuffer,
    b: &CudaBuffer,
    s: GemmShape,
) -> Result<CudaBuffer, CudaError> {
    let sizes = format!(
        "batch {} x ({} x {}{} @ {} x {}{})",
        s.batch,
        s.m,
        s.k,
        if s.trans_a { " (transposed)" } else { "" },
        s.k,
        s.n,
        if s.trans_b { " (transposed)" } else { "" }
    );
    let bad = |message: String| CudaError::Blas {
        op: "matmul".into(),
        sizes: sizes.clone(),
        message,
    };
    if a.kind() != b.kind() || !a.kind().is_float() {
        return Err(bad(format!(
            "operands of kinds {:?} and {:?}; expected both f32 or both bf16",
            a.kind(),
            b.kind()
        )));
    }
    let a_need = if s.a_batched { s.batch } else { 1 } * s.m * s.k;
    let b_need = if s.b_batched { s.batch } else { 1 } * s.k * s.n;
    if a.len() != a_need || b.len() != b_need {
        return Err(bad(format!(
            "buffers of {} and {} elements; expected {a_need} and {b_need}",
            a.len(),
            b.len()
        )));
    }
    let kind = a.kind();
    let out_len = s.batch * s.m * s.n;
    let out = if s.k == 0 {
        dev.zeros(kind, out_len)?
    } else {
        dev.alloc(kind, out_len, "matmul output")?
    };
    if out_len == 0 || s.k == 0 {
        return Ok(out);
    }
    let blas = dev.blas()?;
    let (m, n, k) = (
        to_int(s.m, "m", &s)?,
        to_int(s.n, "n", &s)?,
        to_int(s.k, "k", &s)?,
    );
    let batch = to_int(s.batch, "batch", &s)?;
    let (op_b, ld_b) = if s.trans_b {
        (sys::cublasOperation_t::CUBLAS_OP_T, k)
    } else {
        (sys::cublasOperation_t::CUBLAS_OP_N, n)
    };
    let (op_a, ld_a) = if s.trans_a {
        (sys::cublasOperation_t::CUBLAS_OP_T, m)
    } else {
        (sys::cublasOperation_t::CUBLAS_OP_N, k)
    };
    let stride_a = if s.a_batched { (s.m * s.k) as i64 } else { 0 };
    let stride_b = if s.b_batched { (s.k * s.n) as i64 } else { 0 };
    let stride_c = (s.m * s.n) as i64;
    let dtype = match kind {
        BufferKind::F32 => sys::cudaDataType::CUDA_R_32F,
        _ => sys::cudaDataType::CUDA_R_16BF,
    };
    let compute = if kind == BufferKind::F32 && std::env::var("MVAR_TF32").as_deref() == Ok("1") {
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
    } else {
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    dev.context()
        .bind_to_thread()
        .map_err(crate::error::driver_err("binding the CUDA context"))?;
    // SAFETY: the buffers hold the element counts checked above; alpha/beta are f32 as the
    // compute type requires; the handle is bound to the engine's stream.
    unsafe {
        result::gemm_strided_batched_ex(
            *blas.handle(),
            op_b,
            op_a,
            n,
            m,
            k,
            &alpha as *const f32 as *const c_void,
            b.device_ptr() as *const c_void,
            dtype,
            ld_b,
            stride_b,
            a.device_ptr() as *const c_void,
            dtype,
            ld_a,
            stride_a,
            &beta as *const f32 as *const c_void,
            out.device_ptr() as *mut c_void,
            dtype,
            n,
            stride_c,
            batch,
            compute,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| bad(format!("{e:?}")))?;
    Ok(out)
}
