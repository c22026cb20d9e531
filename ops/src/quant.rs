//! Vector quantisation: the nearest codebook entry of every row.
//!
//! idx[i] = argmin_v ( ||z_i||^2 + ||e_v||^2 - 2 z_i . e_v ), ties to the lowest index (as
//! torch.argmin), which is how the official quantizer writes the squared L2 distance. The CPU
//! reference forms the cross term with the GEMM in the input dtype, as PyTorch's addmm does, and
//! the norms and the sum in f64. Not differentiable (an index). On CUDA a tiled search
//! (`cuda/kernels/quant.cu`) finds the same indices in f32 without the N x V distance matrix.

use mvar_engine::cuda::ops::quant as cq;
use mvar_engine::{CpuStorage, Error, Float, Result, Tensor};
use rayon::prelude::*;

use crate::util::{dispatch, out_tensor, require_float, require_rank, same_device, same_dtype};

/// The CPU reference: indices straight to i64 (never through the float type, which cannot hold
/// large indices exactly in bf16).
fn nearest_rows<T: Float>(z: &[T], e: &[T], n: usize, v: usize, c: usize) -> Vec<i64> {
    let e_sq: Vec<f64> = (0..v)
        .map(|j| {
            e[j * c..(j + 1) * c]
                .iter()
                .map(|x| x.as_f64() * x.as_f64())
                .sum()
        })
        .collect();
    let mut cross = vec![T::zero(); n * v];
    if n * v > 0 && c > 0 {
        // SAFETY: z is [n, c], e is [v, c] read transposed (column stride c), cross is [n, v].
        unsafe {
            gemm::gemm(
                n,
                v,
                c,
                cross.as_mut_ptr(),
                1,
                v as isize,
                false,
                z.as_ptr(),
                1,
                c as isize,
                e.as_ptr(),
                c as isize,
                1,
                T::zero(),
                T::one(),
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            )
        };
    }
    cross
        .par_chunks(v.max(1))
        .enumerate()
        .map(|(i, row)| {
            let z_sq: f64 = z[i * c..(i + 1) * c]
                .iter()
                .map(|x| x.as_f64() * x.as_f64())
                .sum();
            let mut best = 0usize;
            let mut best_d = f64::INFINITY;
            for (j, &dot) in row.iter().enumerate() {
                let d = z_sq + e_sq[j] - 2.0 * dot.as_f64();
                if d < best_d {
                    best_d = d;
                    best = j;
                }
            }
            best as i64
        })
        .collect()
}

/// Index of the nearest row of `codebook` [V, C] for every row of `z` [N, C] (squared L2), as
/// i64 [N].
pub fn nearest_code(z: &Tensor, codebook: &Tensor) -> Result<Tensor> {
    const OP: &str = "nearest_code";
    require_float(OP, z)?;
    same_dtype(OP, &[z, codebook])?;
    same_device(OP, &[z, codebook])?;
    require_rank(OP, z, "z [N, C]", 2)?;
    require_rank(OP, codebook, "codebook [V, C]", 2)?;
    let (n, c) = (z.dims()[0], z.dims()[1]);
    let v = codebook.dims()[0];
    if codebook.dims()[1] != c || v == 0 {
        return Err(Error::shape(
            OP,
            format!("z {} and codebook {}", z.shape(), codebook.shape()),
            "z [N, C] and a non-empty codebook [V, C] of the same C",
        ));
    }
    let idx = dispatch(
        OP,
        &[z, codebook],
        |s| {
            let idx = match (s[0], s[1]) {
                (CpuStorage::F32(a), CpuStorage::F32(b)) => nearest_rows(a, b, n, v, c),
                (CpuStorage::F64(a), CpuStorage::F64(b)) => nearest_rows(a, b, n, v, c),
                (a, b) => nearest_rows(&a.to_f32_vec(), &b.to_f32_vec(), n, v, c),
            };
            Ok(vec![CpuStorage::I64(idx)])
        },
        |dev, b| {
            let splits = cq::CodeSplits::from_env();
            Ok(vec![cq::nearest_code(dev, b[0], b[1], n, v, c, splits)?])
        },
    )?;
    out_tensor(idx, [n], z.device())
}
