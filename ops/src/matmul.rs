//! Matrix products through the `gemm` crate (BLIS-style kernels, threaded with rayon).
//!
//! `matmul(a, b)`: a [..., m, k] @ b [..., k, n] -> [..., m, n], batch axes broadcast NumPy-style.
//! `matmul_t` takes either operand transposed in its last two axes without copying it: the
//! strides are handed to the GEMM. Backward uses that to form a^T and b^T products for free,
//! and `linear` uses it for x @ w^T with PyTorch's [out, in] weight layout.
//!
//! Threading: one GEMM call uses every thread when the matrices are large; a batch of small
//! matrices (attention heads) runs one single-threaded GEMM per batch entry across the threads
//! instead, because gemm's own splitting does not pay below a few MFLOP.

use gemm::Parallelism;
use half::bf16;
use mvar_engine::cpu::{run_float, FloatKernel};
use mvar_engine::{CpuStorage, Error, Float, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::elementwise::{add, sum_to};
use mvar_engine::cuda::blas::{self, GemmShape};
use mvar_engine::cuda::ops::elementwise as ew;
use mvar_engine::cuda::{CudaBuffer, CudaDevice};

use crate::util::{
    autocast_run, dispatch, out_tensor, require_float, same_device, same_dtype, written_vec,
};
use std::mem::MaybeUninit;

mod bf16_cpu;
pub use bf16_cpu::describe as cpu_bf16_gemm;

/// A matrix product of one batch entry is "small" below this many multiply-adds.
const SMALL_GEMM_FLOPS: usize = 1 << 21;

/// Below this many rows of A, a product with B transposed (a linear layer, x @ w^T) is written
/// column-major and transposed after. Into a row-major C the `gemm` crate computes C^T = B^T
/// A^T, in which w (row-major [n, k]) is the operand it packs, all of it, for only m columns of
/// use: a copy of the whole weight per call. Column-major, w is the operand it streams unpacked
/// and only the few rows of A are packed. Measured on the 2-vCPU Zen 5 (docs/performance.md,
/// 2026-12-07 (6)): [8, 1024] @ [6144, 1024]^T 12.8 -> 1.2 ms, [200, 1024] @ [3072, 1024]^T
/// 13.1 -> 7.4 ms, [384, 1024] @ [4096, 1024]^T 22.4 -> 17.7 ms, about even at 512 rows; the
/// same bits either way in every shape tried (the same kernel, the other way round).
const SKINNY_ROWS: usize = 512;

/// Shapes of a (possibly transposed) batched product.
#[derive(Clone, Debug)]
struct MatmulPlan {
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    batch: Shape,
    a_batch: Shape,
    b_batch: Shape,
}

fn split_batch(s: &Shape) -> (Shape, usize, usize) {
    let d = s.dims();
    let r = d.len();
    (Shape::new(&d[..r - 2]), d[r - 2], d[r - 1])
}

impl MatmulPlan {
    fn new(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Self> {
        if a.rank() < 2 || b.rank() < 2 {
            return Err(Error::shape(
                "matmul",
                Error::shapes(&[a.shape(), b.shape()]),
                "operands of rank >= 2 ([..., m, k] and [..., k, n])",
            ));
        }
        let (a_batch, ar, ac) = split_batch(a.shape());
        let (b_batch, br, bc) = split_batch(b.shape());
        let (m, ka) = if trans_a { (ac, ar) } else { (ar, ac) };
        let (kb, n) = if trans_b { (bc, br) } else { (br, bc) };
        if ka != kb {
            return Err(Error::shape(
                "matmul",
                format!(
                    "{}{} and {}{}",
                    a.shape(),
                    if trans_a { " (transposed)" } else { "" },
                    b.shape(),
                    if trans_b { " (transposed)" } else { "" }
                ),
                format!("inner dimensions that agree ({ka} vs {kb})"),
            ));
        }
        let batch = Shape::broadcast("matmul", &a_batch, &b_batch)?;
        Ok(MatmulPlan {
            m,
            k: ka,
            n,
            trans_a,
            trans_b,
            batch,
            a_batch,
            b_batch,
        })
    }

    fn out_shape(&self) -> Shape {
        let mut d = self.batch.dims().to_vec();
        d.extend([self.m, self.n]);
        Shape::new(d)
    }

    /// Offset (in matrices) of batch entry `i` in an operand with batch shape `own`.
    fn operand_index(&self, own: &Shape, mut i: usize) -> usize {
        let rank = self.batch.rank();
        let pad = rank - own.rank();
        let strides = own.strides();
        let mut off = 0;
        for ax in (0..rank).rev() {
            let d = self.batch.dims()[ax];
            let idx = i % d;
            i /= d;
            if ax >= pad && own.dims()[ax - pad] != 1 {
                off += idx * strides[ax - pad];
            }
        }
        off
    }
}

struct Gemm(MatmulPlan);

impl FloatKernel for Gemm {
    fn run<T: Float>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let p = &self.0;
        let (m, k, n) = (p.m, p.k, p.n);
        let batches = p.batch.elem_count();
        if m * n == 0 || k == 0 {
            // An empty inner dimension: every output element is the empty sum.
            return Ok(vec![vec![T::zero(); batches * m * n]]);
        }
        let (a, b) = (x[0], x[1]);
        // Row/column strides of the logical (m x k) and (k x n) operands.
        let (a_rs, a_cs) = if p.trans_a {
            (1, m as isize)
        } else {
            (k as isize, 1)
        };
        let (b_rs, b_cs) = if p.trans_b {
            (1, k as isize)
        } else {
            (n as isize, 1)
        };
        let small = m * n * k < SMALL_GEMM_FLOPS;
        let threads = rayon::current_num_threads();
        let one_product = |bi: usize, dst: &mut [MaybeUninit<T>], threaded: bool| {
            let ai = p.operand_index(&p.a_batch, bi) * m * k;
            let bj = p.operand_index(&p.b_batch, bi) * k * n;
            let (a_mat, b_mat) = (&a[ai..ai + m * k], &b[bj..bj + k * n]);
            assert_eq!(dst.len(), m * n);
            let par = if threaded && threads > 1 {
                Parallelism::Rayon(threads)
            } else {
                Parallelism::None
            };
            // Few rows times a transposed B: C written column-major into `col_major`, then
            // transposed into dst (see SKINNY_ROWS); else straight into dst, row-major.
            let skinny = p.trans_b && m < SKINNY_ROWS && m < n;
            let mut col_major = if skinny {
                vec![T::zero(); m * n]
            } else {
                Vec::new()
            };
            let (c, c_cs, c_rs) = if skinny {
                (col_major.as_mut_ptr(), m as isize, 1)
            } else {
                (dst.as_mut_ptr() as *mut T, 1, n as isize)
            };
            // SAFETY: the pointers cover exactly m*k, k*n and m*n elements with the strides
            // given (row-major, or its transpose; C row- or column-major), and C does not alias
            // the operands. With `read_dst` false the GEMM only writes C (C := A B), every
            // element of it since m, n and k are not 0, so dst may start uninitialised.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c,
                    c_cs,
                    c_rs,
                    false,
                    a_mat.as_ptr(),
                    a_cs,
                    a_rs,
                    b_mat.as_ptr(),
                    b_cs,
                    b_rs,
                    T::zero(),
                    T::one(),
                    false,
                    false,
                    false,
                    par,
                )
            }
            if skinny {
                for (i, row) in dst.chunks_mut(n).enumerate() {
                    for (j, d) in row.iter_mut().enumerate() {
                        d.write(col_major[j * m + i]);
                    }
                }
            }
        };
        // No zero fill first: the GEMM writes every element (its cost was a write pass over
        // the output, e.g. 134 MB for MVAR-d4's logits at batch 32).
        let fill = |out: &mut [MaybeUninit<T>]| {
            each_product(out, m * n, small, T::from_f64(f64::NAN), one_product)
        };
        // SAFETY: the chunks of m * n tile the output, and each product writes its whole chunk.
        Ok(vec![unsafe { written_vec(batches * m * n, fill) }])
    }
}

/// Runs `one(batch entry, its m x n output, whether to thread the product)` over every product
/// of `out` (products of `mn` elements): independent products parallelise perfectly, so with a
/// product per thread or more (or small ones) the batch is split across the threads; a
/// product's own threading (a fork-join per packed panel) only pays for one or a few large
/// products. Debug builds (the tests) fill `nan` first, so an element a kernel did not write
/// shows in every result instead of whatever the allocator left there.
fn each_product<T: Copy + Send + Sync>(
    out: &mut [MaybeUninit<T>],
    mn: usize,
    small: bool,
    nan: T,
    one: impl Fn(usize, &mut [MaybeUninit<T>], bool) + Sync,
) {
    if cfg!(debug_assertions) {
        out.fill(MaybeUninit::new(nan));
    }
    let batches = out.len() / mn;
    if batches > 1 && (small || batches >= rayon::current_num_threads()) {
        out.par_chunks_mut(mn)
            .enumerate()
            .for_each(|(bi, dst)| one(bi, dst, false));
    } else {
        for (bi, dst) in out.chunks_mut(mn).enumerate() {
            one(bi, dst, !small);
        }
    }
}

impl MatmulPlan {
    /// The bf16 product on the CPU with `kernel` (see [`bf16_cpu`]), batch entries as
    /// [`Gemm::run`] splits them.
    fn run_bf16(&self, a: &[bf16], b: &[bf16], kernel: bf16_cpu::MicroKernel) -> Vec<bf16> {
        let (m, k, n) = (self.m, self.k, self.n);
        let batches = self.batch.elem_count();
        if m * n == 0 {
            return Vec::new();
        }
        let (a_rs, a_cs) = if self.trans_a { (1, m) } else { (k, 1) };
        let (b_rs, b_cs) = if self.trans_b { (1, k) } else { (n, 1) };
        let one_product = |bi: usize, dst: &mut [MaybeUninit<bf16>], parallel: bool| {
            let ai = self.operand_index(&self.a_batch, bi) * m * k;
            let bj = self.operand_index(&self.b_batch, bi) * k * n;
            let a_mat = bf16_cpu::Strided {
                data: &a[ai..ai + m * k],
                rs: a_rs,
                cs: a_cs,
            };
            let b_mat = bf16_cpu::Strided {
                data: &b[bj..bj + k * n],
                rs: b_rs,
                cs: b_cs,
            };
            bf16_cpu::gemm(m, n, k, a_mat, b_mat, dst, kernel, parallel);
        };
        let small = m * n * k < SMALL_GEMM_FLOPS;
        let fill =
            |out: &mut [MaybeUninit<bf16>]| each_product(out, m * n, small, bf16::NAN, one_product);
        // SAFETY: the chunks of m * n tile the output, and `bf16_cpu::gemm` writes every
        // element of its chunk.
        unsafe { written_vec(batches * m * n, fill) }
    }
}

/// The product on cuBLAS. An operand whose batch axes are all 1 is shared by every batch entry
/// (stride 0); one that is broadcast along only some batch axes is expanded first.
fn cuda_gemm(
    dev: &CudaDevice,
    p: &MatmulPlan,
    a: &CudaBuffer,
    b: &CudaBuffer,
) -> Result<CudaBuffer> {
    let batch = p.batch.elem_count();
    let expand =
        |x: &CudaBuffer, own: &Shape, rows: usize, cols: usize| -> Result<Option<CudaBuffer>> {
            if own == &p.batch || own.elem_count() == 1 {
                return Ok(None);
            }
            let mut from = own.dims().to_vec();
            from.extend([rows, cols]);
            let mut to = p.batch.dims().to_vec();
            to.extend([rows, cols]);
            Ok(Some(ew::expand(dev, x, &from, &to)?))
        };
    let (ar, ac) = if p.trans_a { (p.k, p.m) } else { (p.m, p.k) };
    let (br, bc) = if p.trans_b { (p.n, p.k) } else { (p.k, p.n) };
    let a_full = expand(a, &p.a_batch, ar, ac)?;
    let b_full = expand(b, &p.b_batch, br, bc)?;
    let shape = GemmShape {
        batch,
        m: p.m,
        n: p.n,
        k: p.k,
        trans_a: p.trans_a,
        trans_b: p.trans_b,
        a_batched: a_full.is_some() || p.a_batch.elem_count() == batch && batch > 1,
        b_batched: b_full.is_some() || p.b_batch.elem_count() == batch && batch > 1,
    };
    Ok(blas::gemm(
        dev,
        a_full.as_ref().unwrap_or(a),
        b_full.as_ref().unwrap_or(b),
        shape,
    )?)
}

/// a @ b with broadcast batch axes.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_t(a, b, false, false)
}

/// op(a) @ op(b) where op transposes the last two axes when its flag is set (no copy).
pub fn matmul_t(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    if let Some(r) = autocast_run(&[a, b], |x| matmul_t(&x[0], &x[1], trans_a, trans_b)) {
        return r;
    }
    same_device("matmul", &[a, b])?;
    same_dtype("matmul", &[a, b])?;
    let plan = MatmulPlan::new(a, b, trans_a, trans_b)?;
    let out_shape = plan.out_shape();
    require_float("matmul", a)?;
    require_float("matmul", b)?;
    let out = dispatch(
        "matmul",
        &[a, b],
        |x| match (x[0], x[1], bf16_cpu::native_kernel()) {
            (CpuStorage::BF16(xa), CpuStorage::BF16(xb), Some(kernel)) => {
                Ok(vec![CpuStorage::BF16(plan.run_bf16(xa, xb, kernel))])
            }
            _ => run_float("matmul", x, &Gemm(plan.clone())),
        },
        |dev, x| Ok(vec![cuda_gemm(dev, &plan, x[0], x[1])?]),
    )?;
    let out = out_tensor(out, out_shape, a.device())?;
    // dA needs only B and dB only A: an input is kept for the backward only when the other one
    // gets a gradient (a frozen weight does not keep the activations that meet it alive).
    let (a_req, b_req) = (a.requires_grad(), b.requires_grad());
    let (shape_a, shape_b) = (a.shape().clone(), b.shape().clone());
    let sa = b_req.then(|| a.detach());
    let sb = a_req.then(|| b.detach());
    Ok(Tensor::record(out, "matmul", &[a, b], move || {
        move |g: &Tensor| {
            // C = op(A) op(B):  d op(A) = dC op(B)^T,  d op(B) = op(A)^T dC, then undo op.
            let ga = match &sb {
                None => None,
                Some(sb) if !trans_a => Some(matmul_t(g, sb, false, !trans_b)?),
                Some(sb) => Some(matmul_t(sb, g, trans_b, true)?),
            };
            let gb = match &sa {
                None => None,
                Some(sa) if !trans_b => Some(matmul_t(sa, g, !trans_a, false)?),
                Some(sa) => Some(matmul_t(g, sa, true, trans_a)?),
            };
            Ok(vec![
                ga.map(|t| sum_to(&t, &shape_a)).transpose()?,
                gb.map(|t| sum_to(&t, &shape_b)).transpose()?,
            ])
        }
    }))
}

/// x @ w^T + b with PyTorch's weight layout w [out, in] and bias \[out\].
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if w.rank() != 2 || x.rank() < 1 || x.dims()[x.rank() - 1] != w.dims()[1] {
        return Err(Error::shape(
            "linear",
            format!("input {} and weight {}", x.shape(), w.shape()),
            "input [..., in] and weight [out, in]",
        ));
    }
    let lead: Vec<usize> = x.dims()[..x.rank() - 1].to_vec();
    let x2 = x.reshape([lead.iter().product::<usize>(), w.dims()[1]])?;
    let mut y = matmul_t(&x2, w, false, true)?;
    if let Some(b) = bias {
        if b.dims() != [w.dims()[0]] {
            return Err(Error::shape(
                "linear",
                format!("bias {} for weight {}", b.shape(), w.shape()),
                format!("bias [{}]", w.dims()[0]),
            ));
        }
        y = add(&y, b)?;
    }
    let mut out_dims = lead;
    out_dims.push(w.dims()[0]);
    y.reshape(out_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvar_engine::{DType, Device, Generator};

    /// Products with B transposed and few rows of A (written column-major, then transposed)
    /// against a plain f64 triple loop over the same values, below, at and above
    /// `SKINNY_ROWS`, with more and fewer columns than rows, batched with a broadcast B, and
    /// with A transposed too.
    #[test]
    fn skinny_products_with_b_transposed_match_a_plain_f64_loop() {
        let _g = mvar_engine::no_grad();
        let mut rng = Generator::new(8);
        let cases: [(&[usize], &[usize], bool); 8] = [
            (&[1, 64], &[300, 64], false),
            (&[8, 96], &[600, 96], false),
            (&[37, 200], &[129, 200], false),
            (&[511, 40], &[1000, 40], false),
            (&[512, 40], &[1000, 40], false),
            (&[300, 40], &[20, 40], false),
            (&[3, 5, 64], &[70, 64], false),
            (&[2, 64, 9], &[2, 33, 64], true),
        ];
        for (sa, sb, ta) in cases {
            let a =
                Tensor::randn(sa.to_vec(), 0.0, 1.0, DType::F32, &Device::Cpu, &mut rng).unwrap();
            let b =
                Tensor::randn(sb.to_vec(), 0.0, 1.0, DType::F32, &Device::Cpu, &mut rng).unwrap();
            let got = matmul_t(&a, &b, ta, true).unwrap();
            let (av, bv) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
            let (ra, ca) = (sa[sa.len() - 2], sa[sa.len() - 1]);
            let (m, k) = if ta { (ca, ra) } else { (ra, ca) };
            let n = sb[sb.len() - 2];
            let batches = got.elem_count() / (m * n);
            let mut want = Vec::with_capacity(got.elem_count());
            for bi in 0..batches {
                let a_off = if sa.len() == 3 { bi * m * k } else { 0 };
                let b_off = if sb.len() == 3 { bi * n * k } else { 0 };
                for i in 0..m {
                    for j in 0..n {
                        let dot: f64 = (0..k)
                            .map(|p| {
                                let x = if ta {
                                    av[a_off + p * m + i]
                                } else {
                                    av[a_off + i * k + p]
                                };
                                x * bv[b_off + j * k + p]
                            })
                            .sum();
                        want.push(dot);
                    }
                }
            }
            assert_eq!(got.elem_count(), want.len(), "{sa:?} {sb:?}");
            let k = k as f64;
            for (i, (g, w)) in got.to_vec_f64().unwrap().iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * k.sqrt() * (1.0 + w.abs()),
                    "{sa:?} {sb:?} ta {ta}: element {i}: {g} vs {w}"
                );
            }
        }
    }

    /// bf16 products (on AVX512-BF16 CPUs the native kernel, else the widened path) against
    /// the f32 product of the same values rounded once: within one bf16 step of it, over
    /// transposed operands and a batch with a broadcast operand.
    #[test]
    fn bf16_products_match_the_f32_product_of_the_same_values() {
        let _g = mvar_engine::no_grad();
        let mut rng = Generator::new(4);
        let cases: [(&[usize], &[usize], bool, bool); 4] = [
            (&[37, 70], &[70, 45], false, false),
            (&[70, 37], &[45, 70], true, true),
            (&[3, 26, 64], &[64, 100], false, false),
            (&[2, 64, 30], &[2, 33, 64], true, true),
        ];
        for (sa, sb, ta, tb) in cases {
            let a =
                Tensor::randn(sa.to_vec(), 0.0, 1.0, DType::BF16, &Device::Cpu, &mut rng).unwrap();
            let b =
                Tensor::randn(sb.to_vec(), 0.0, 1.0, DType::BF16, &Device::Cpu, &mut rng).unwrap();
            let got = matmul_t(&a, &b, ta, tb).unwrap().to_vec_f64().unwrap();
            let (a32, b32) = (
                a.to_dtype(DType::F32).unwrap(),
                b.to_dtype(DType::F32).unwrap(),
            );
            let want = matmul_t(&a32, &b32, ta, tb).unwrap().to_vec_f64().unwrap();
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // One bf16 step at w's magnitude, plus f32 summation-order noise near zero.
                let step = w.abs() / 128.0 + 1e-4;
                assert!(
                    (g - w).abs() <= step,
                    "{sa:?} {sb:?} ta {ta} tb {tb}: element {i}: {g} vs {w}"
                );
            }
        }
    }
}
