//! Vector quantisation: the nearest codebook entry of every row.
//!
//! idx\[i\] = argmin_v ( ||z_i||^2 + ||e_v||^2 - 2 z_i . e_v ), ties to the lowest index (as
//! torch.argmin), which is how the official quantizer writes the squared L2 distance. The CPU
//! reference forms the cross term with the GEMM in the input dtype, as PyTorch's addmm does, and
//! the norms and the sum in f64. Not differentiable (an index). On CUDA a tiled search
//! (`cuda/kernels/quant.cu`) finds the same indices in f32 without the N x V distance matrix.

use mvar_engine::cuda::ops::quant as cq;
use mvar_engine::{CpuStorage, Error, Float, Result, Tensor};
use rayon::prelude::*;

use crate::util::{
    dispatch, in_widest_vectors, out_tensor, require_float, require_rank, same_device, same_dtype,
};

/// Cross terms kept at once per task: [rows, V] of them, 256 KiB of f32, so each block's
/// distances are searched while they are in the core's L2 cache. (The whole [N, V] matrix at
/// once, 128 MiB for 8192 rows against 4096 codes, made the search wait on memory.)
const CROSS_BLOCK_ELEMS: usize = 1 << 16;

/// The CPU reference: indices straight to i64 (never through the float type, which cannot hold
/// large indices exactly in bf16). Rows go in blocks, one task each: the block's cross terms
/// (one single-threaded GEMM), then each row's search.
fn nearest_rows<T: Float>(z: &[T], e: &[T], n: usize, v: usize, c: usize) -> Vec<i64> {
    let e_sq: Vec<f64> = (0..v)
        .map(|j| {
            e[j * c..(j + 1) * c]
                .iter()
                .map(|x| x.as_f64() * x.as_f64())
                .sum()
        })
        .collect();
    let mut out = vec![0i64; n];
    if n == 0 || v == 0 || c == 0 {
        // No rows, or every distance is 0 (no channels): the first code.
        return out;
    }
    let block = (CROSS_BLOCK_ELEMS / v).clamp(8, 256);
    out.par_chunks_mut(block)
        .zip(z.par_chunks(block * c))
        .for_each_init(
            || vec![T::zero(); block * v],
            |cross, (idx, zb)| {
                let rows = idx.len();
                let cross = &mut cross[..rows * v];
                // SAFETY: zb is [rows, c], e is [v, c] read transposed (column stride c), cross
                // is [rows, v].
                unsafe {
                    gemm::gemm(
                        rows,
                        v,
                        c,
                        cross.as_mut_ptr(),
                        1,
                        v as isize,
                        false,
                        zb.as_ptr(),
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
                        gemm::Parallelism::None,
                    )
                };
                for (r, (slot, row)) in idx.iter_mut().zip(cross.chunks_exact(v)).enumerate() {
                    let z_sq: f64 = zb[r * c..(r + 1) * c]
                        .iter()
                        .map(|x| x.as_f64() * x.as_f64())
                        .sum();
                    *slot = in_widest_vectors(
                        #[inline(always)]
                        || nearest_in_row(row, z_sq, &e_sq),
                    ) as i64;
                }
            },
        );
    out
}

/// argmin over j of z_sq + e_sq[j] - 2 row[j] (in f64), ties to the lowest j, a NaN never
/// chosen (index 0 when no distance is below +inf), as one scalar pass in j order finds it.
///
/// Lane l of `LANES` keeps the first minimum of the columns j = l (mod LANES), a running
/// compare-and-select that vectorises (the one-pass loop carried its minimum from each column to
/// the next: one scalar compare per code, most of the search's time after the GEMM); the lanes
/// are then merged by distance, ties to the lower index, which is the first minimum overall.
#[inline(always)]
fn nearest_in_row<T: Float>(row: &[T], z_sq: f64, e_sq: &[f64]) -> usize {
    const LANES: usize = 8;
    let mut best_d = [f64::INFINITY; LANES];
    let mut best = [0usize; LANES];
    let full = row.len() / LANES * LANES;
    for (k, (dots, norms)) in row[..full]
        .chunks_exact(LANES)
        .zip(e_sq[..full].chunks_exact(LANES))
        .enumerate()
    {
        for l in 0..LANES {
            let d = z_sq + norms[l] - 2.0 * dots[l].as_f64();
            if d < best_d[l] {
                best_d[l] = d;
                best[l] = k * LANES + l;
            }
        }
    }
    let (mut index, mut min) = (0usize, f64::INFINITY);
    for l in 0..LANES {
        if best_d[l] < min || (best_d[l] == min && best[l] < index) {
            (index, min) = (best[l], best_d[l]);
        }
    }
    for (j, (&dot, &norm)) in row[full..].iter().zip(&e_sq[full..]).enumerate() {
        let d = z_sq + norm - 2.0 * dot.as_f64();
        if d < min {
            (index, min) = (full + j, d);
        }
    }
    index
}

/// Index of the nearest row of `codebook` [V, C] for every row of `z` [N, C] (squared L2), as
/// i64 \[N\].
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
            Ok(vec![cq::nearest_code(
                dev,
                b[0],
                b[1],
                n,
                v,
                c,
                splits,
                cq::RowLayout::Rows,
                None,
            )?])
        },
    )?;
    out_tensor(idx, [n], z.device())
}

/// A codebook [V, C] prepared for several searches ([`nearest_code_maps`]): on a GPU its
/// squared row norms are computed once here instead of at every search.
#[derive(Debug)]
pub struct Codebook {
    table: Tensor,
    /// f32 [V] on the GPU; None on the CPU, whose reference forms the norms in f64 per search.
    norms: Option<Tensor>,
}

impl Codebook {
    pub fn new(table: &Tensor) -> Result<Codebook> {
        const OP: &str = "codebook";
        require_float(OP, table)?;
        require_rank(OP, table, "codebook [V, C]", 2)?;
        let (v, c) = (table.dims()[0], table.dims()[1]);
        if v == 0 {
            return Err(Error::shape(
                OP,
                table.shape().to_string(),
                "a non-empty codebook [V, C]",
            ));
        }
        let table = table.detach();
        if !table.device().is_cuda() {
            return Ok(Codebook { table, norms: None });
        }
        let norms = dispatch(
            OP,
            &[&table],
            |_| Err(Error::invalid(OP, "norms are only precomputed on a GPU")),
            |dev, b| Ok(vec![cq::code_norms(dev, b[0], v, c)?]),
        )?;
        let norms = out_tensor(norms, [v], table.device())?;
        Ok(Codebook {
            table,
            norms: Some(norms),
        })
    }

    /// The codebook [V, C] (detached).
    pub fn table(&self) -> &Tensor {
        &self.table
    }
}

/// The nearest code of every pixel of the feature maps `z` [B, C, H, W] (squared L2, ties to
/// the lowest index, as [`nearest_code`] on the pixels as rows), as i64 [B, H * W] in row-major
/// pixel order. On a GPU the search reads z in place (no permuted copy) with the codebook's
/// precomputed norms; the CPU runs [`nearest_code`] on the permuted rows, its reference.
pub fn nearest_code_maps(z: &Tensor, book: &Codebook) -> Result<Tensor> {
    const OP: &str = "nearest_code";
    require_rank(OP, z, "feature maps [B, C, H, W]", 4)?;
    let (b, c, h, w) = (z.dims()[0], z.dims()[1], z.dims()[2], z.dims()[3]);
    let Some(norms) = &book.norms else {
        let rows = crate::permute(z, &[0, 2, 3, 1])?.reshape([b * h * w, c])?;
        return nearest_code(&rows, &book.table)?.reshape([b, h * w]);
    };
    let table = &book.table;
    require_float(OP, z)?;
    same_dtype(OP, &[z, table])?;
    same_device(OP, &[z, table])?;
    let v = table.dims()[0];
    if table.dims()[1] != c {
        return Err(Error::shape(
            OP,
            format!("z {} and codebook {}", z.shape(), table.shape()),
            "feature maps [B, C, H, W] and a codebook [V, C] of the same C",
        ));
    }
    let n = b * h * w;
    let idx = dispatch(
        OP,
        &[z, table, norms],
        |_| Err(Error::invalid(OP, "a codebook with GPU norms on the CPU")),
        |dev, bufs| {
            let splits = cq::CodeSplits::from_env();
            let layout = cq::RowLayout::Planes((h * w).max(1));
            Ok(vec![cq::nearest_code(
                dev,
                bufs[0],
                bufs[1],
                n,
                v,
                c,
                splits,
                layout,
                Some(bufs[2]),
            )?])
        },
    )?;
    out_tensor(idx, [b, h * w], z.device())
}

// ----------------------------------------------------------------------------------------------
// one quantizer scale's update of f_hat or of the residual

/// A quantizer Phi for [`phi_accumulate`]: Phi(u) = (1 - ratio) u + ratio (conv3x3(u) + bias),
/// the convolution with zero padding 1 (weight [C, C, 3, 3], bias \[C\]).
#[derive(Clone, Copy)]
pub struct Phi<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub ratio: f64,
}

/// Where [`phi_accumulate`]'s token indices come from, which decides whether they are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexOrigin {
    /// Anything the caller has: every index is checked against the codebook size (on a GPU
    /// this reads the indices back, a host sync), an index out of range is an error.
    Caller,
    /// [`nearest_code`]'s output for this same codebook, in range by construction: not read
    /// back (the GPU kernel still keeps a bad index from reading out of bounds, its outputs
    /// NaN).
    NearestCode,
}

/// Whether [`phi_accumulate`] may run the fused CUDA kernels: `MVAR_FUSED_QUANT=0` makes it
/// run the unfused composition everywhere (for comparing the two; read at every call, so a
/// benchmark can switch it).
fn fused_quant_enabled() -> bool {
    std::env::var_os("MVAR_FUSED_QUANT").is_none_or(|v| v != "0")
}

/// The checked sizes of a quantizer step: (B, C, V, h, w).
fn step_dims(
    op: &'static str,
    acc: &Tensor,
    idx: &Tensor,
    scale: (usize, usize),
    table: &Tensor,
    phi: Option<&Phi<'_>>,
    sign: f64,
) -> Result<(usize, usize, usize, usize, usize)> {
    if sign != 1.0 && sign != -1.0 {
        return Err(Error::invalid(op, format!("sign {sign}; expected 1 or -1")));
    }
    require_float(op, acc)?;
    require_rank(op, acc, "acc [B, C, h, w]", 4)?;
    require_rank(op, table, "the codebook [V, C]", 2)?;
    let (b, c, h, w) = (acc.dims()[0], acc.dims()[1], acc.dims()[2], acc.dims()[3]);
    let v = table.dims()[0];
    let (ph, pw) = scale;
    let mut floats = vec![acc, table];
    if let Some(p) = phi {
        floats.push(p.weight);
        floats.extend(p.bias);
    }
    same_dtype(op, &floats)?;
    floats.push(idx);
    same_device(op, &floats)?;
    if idx.dtype() != mvar_engine::DType::I64 {
        return Err(Error::dtype(op, idx.dtype(), "i64 token indices"));
    }
    if table.dims()[1] != c || v == 0 {
        return Err(Error::shape(
            op,
            format!("acc {} and codebook {}", acc.shape(), table.shape()),
            format!("a non-empty codebook [V, {c}] (acc's channels)"),
        ));
    }
    if idx.dims() != [b, ph * pw] || ph == 0 || pw == 0 || ph > h || pw > w {
        return Err(Error::shape(
            op,
            format!("token map {} for a {ph}x{pw} scale", idx.shape()),
            format!(
                "[{b}, {}] for a scale of at least 1x1 and at most {h}x{w}",
                ph * pw
            ),
        ));
    }
    if let Some(p) = phi {
        if p.weight.dims() != [c, c, 3, 3] || p.bias.is_some_and(|t| t.dims() != [c]) {
            return Err(Error::shape(
                op,
                format!(
                    "Phi weight {}{}",
                    p.weight.shape(),
                    p.bias
                        .map_or(String::new(), |t| format!(", bias {}", t.shape()))
                ),
                format!("weight [{c}, {c}, 3, 3] and bias [{c}]"),
            ));
        }
    }
    Ok((b, c, v, h, w))
}

/// acc + sign * Phi(bicubic_up(codes)) with codes = table\[idx\] as a map [B, C, ph, pw]:
/// one scale's step of the multi-scale residual quantizer, adding to f_hat (sign +1) or taking
/// from the residual (sign -1). acc is [B, C, h, w], idx i64 [B, ph*pw] (row-major), table
/// [V, C]; the upsampling is bicubic_upsample to [h, w] (none when the scale is the full map)
/// and Phi is the identity when `phi` is None.
///
/// On a GPU with nothing that needs a gradient this runs two fused kernels
/// (`cuda/kernels/quant_step.cu`); otherwise, and everywhere with `MVAR_FUSED_QUANT=0`, the
/// composition of the ops it fuses ([`phi_accumulate_unfused`]), which is also the CPU
/// reference the kernels are tested against.
pub fn phi_accumulate(
    acc: &Tensor,
    idx: &Tensor,
    scale: (usize, usize),
    table: &Tensor,
    phi: Option<&Phi<'_>>,
    sign: f64,
    origin: IndexOrigin,
) -> Result<Tensor> {
    const OP: &str = "phi_accumulate";
    let (b, c, v, h, w) = step_dims(OP, acc, idx, scale, table, phi, sign)?;
    let mut floats = vec![acc, table];
    if let Some(p) = phi {
        floats.push(p.weight);
        floats.extend(p.bias);
    }
    let needs_grad = mvar_engine::is_grad_enabled() && floats.iter().any(|t| t.requires_grad());
    if !acc.device().is_cuda() || needs_grad || !fused_quant_enabled() {
        return phi_accumulate_unfused(acc, idx, scale, table, phi, sign);
    }
    if origin == IndexOrigin::Caller {
        let ids = idx.to_vec::<i64>()?;
        if let Some(&bad) = ids.iter().find(|&&i| i < 0 || i as usize >= v) {
            return Err(Error::IndexOutOfRange {
                op: OP,
                what: "token id",
                index: bad,
                size: v,
            });
        }
    }
    let weight = phi.map(|p| p.weight);
    let bias = phi.and_then(|p| p.bias);
    let mut ts = vec![acc, idx, table];
    ts.extend(weight);
    ts.extend(bias);
    let ratio = phi.map_or(0.0, |p| p.ratio);
    let out = dispatch(
        OP,
        &ts,
        |_| {
            Err(Error::invalid(
                OP,
                "the fused kernels run on a GPU only (the CPU takes the composition)",
            ))
        },
        |dev, bufs| {
            let mix = match &weight {
                None => cq::PhiMix::Identity,
                Some(_) => cq::PhiMix::Conv {
                    weight: bufs[3],
                    bias: bias.map(|_| bufs[4]),
                    keep: (1.0 - ratio) as f32,
                    ratio: ratio as f32,
                },
            };
            let shape = cq::StepShape {
                batch: b,
                channels: c,
                codes: v,
                scale,
                full: (h, w),
            };
            Ok(vec![cq::phi_accumulate(
                dev,
                bufs[0],
                bufs[1],
                bufs[2],
                &mix,
                shape,
                sign as f32,
            )?])
        },
    )?;
    out_tensor(out, [b, c, h, w], acc.device())
}

/// [`phi_accumulate`] as the composition of the ops it fuses (embedding, permute,
/// bicubic_upsample, conv2d, scalings, add or sub): differentiable, on any device, and the
/// reference for the fused kernels.
pub fn phi_accumulate_unfused(
    acc: &Tensor,
    idx: &Tensor,
    scale: (usize, usize),
    table: &Tensor,
    phi: Option<&Phi<'_>>,
    sign: f64,
) -> Result<Tensor> {
    const OP: &str = "phi_accumulate";
    let (b, c, _, h, w) = step_dims(OP, acc, idx, scale, table, phi, sign)?;
    let (ph, pw) = scale;
    let codes = crate::embedding(idx, table)?; // [B, ph*pw, C]
    let codes = crate::permute(&codes, &[0, 2, 1])?.reshape([b, c, ph, pw])?;
    let up = if (ph, pw) != (h, w) {
        crate::bicubic_upsample(&codes, h, w)?
    } else {
        codes
    };
    let mixed = match phi {
        None => up,
        Some(p) => crate::add(
            &crate::mul_scalar(&up, 1.0 - p.ratio)?,
            &crate::mul_scalar(
                &crate::conv2d(&up, p.weight, p.bias, (1, 1), crate::Padding::same(1))?,
                p.ratio,
            )?,
        )?,
    };
    if sign < 0.0 {
        crate::sub(acc, &mixed)
    } else {
        crate::add(acc, &mixed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvar_engine::Generator;

    /// The one-pass search the lanes must reproduce: first minimum, NaN never chosen.
    fn naive(row: &[f64], z_sq: f64, e_sq: &[f64]) -> usize {
        let (mut best, mut best_d) = (0, f64::INFINITY);
        for (j, (&dot, &norm)) in row.iter().zip(e_sq).enumerate() {
            let d = z_sq + norm - 2.0 * dot;
            if d < best_d {
                (best, best_d) = (j, d);
            }
        }
        best
    }

    #[test]
    fn lanes_find_the_first_minimum_as_one_pass_does() {
        let mut rng = Generator::new(11);
        // Few distinct values (many ties, across lanes and within one), NaN and both infinities,
        // lengths below, at and past multiples of the lane count.
        let pool = [
            0.0,
            1.0,
            -1.0,
            2.5,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ];
        for case in 0..4000 {
            let len = case % 41;
            let draw = |rng: &mut Generator, n: usize, spread: u32| -> Vec<f64> {
                rng.next_u32s(n)
                    .into_iter()
                    .map(|w| pool[(w % spread) as usize])
                    .collect()
            };
            // Every fourth case finite only, so most searches have a finite minimum to find.
            let spread = if case % 4 == 0 { 4 } else { 7 };
            let row = draw(&mut rng, len, spread);
            let e_sq = draw(&mut rng, len, 4);
            let want = naive(&row, 0.5, &e_sq);
            assert_eq!(nearest_in_row(&row, 0.5, &e_sq), want, "{row:?} {e_sq:?}");
            let row32: Vec<f32> = row.iter().map(|&x| x as f32).collect();
            assert_eq!(
                nearest_in_row(&row32, 0.5, &e_sq),
                want,
                "f32 {row:?} {e_sq:?}"
            );
        }
    }
}
