//! Zero-shot editing (VAR paper, section 7): in-painting, out-painting and class-conditional
//! editing without any training, by teacher-forcing the tokens of the kept region at every scale.
//!
//! Which tokens are kept follows the official zero-shot editing code (the VAR repository's
//! `demo_zero_shot_edit.ipynb`: `get_edit_mask`, `replace_embedding`):
//! - the edit mask lives on the last scale's token grid (P x P): a box given as fractions of the
//!   image keeps, for in-painting, every token outside rows round(y0 P) .. round(y1 P) and
//!   columns round(x0 P) .. round(x1 P) (Python's round: halves to even; out-painting keeps the
//!   inside); a pixel mask is reduced to that grid by majority over each token's cell;
//! - a pn x pn scale keeps the tokens where the grid, bilinearly resized to pn x pn
//!   (`F.interpolate(..., mode='bilinear', align_corners=False)`, in f32), is above 0.5;
//! - a scale of at most 3 tokens (the 1 x 1 start) keeps all of them.
//!
//! A kept token is replaced by the image's own token at that scale; every other token is sampled
//! as usual (guidance, top-k, top-p). The sampler's next input is built from the chosen tokens,
//! so the generated region is conditioned on the kept one at every scale. Class-conditional
//! editing is in-painting with the label of another class.
//!
//! Works for VAR (KV cache) and MVAR (scale-Markov) alike: both decoding loops take the token
//! choice as a closure (`decode_with`).

use mvar_engine::{Error, Generator, Result, Tensor};

use crate::trainer::ArModel;
use crate::var::{sample_tokens, SampleConfig, SampleOutput};
use crate::VqVae;

/// Which region of the image is kept (teacher-forced) and which is generated.
#[derive(Debug, Clone, PartialEq)]
pub struct EditMask {
    side: usize,
    region: Region,
}

#[derive(Debug, Clone, PartialEq)]
enum Region {
    /// Pixels rows y0..y1, columns x0..x1 ([x0, y0, x1, y1], end exclusive), generated
    /// (`outpaint` false) or kept (true).
    Box { bx: [usize; 4], outpaint: bool },
    /// Row-major side x side, true = kept.
    Pixels(Vec<bool>),
}

impl EditMask {
    /// In-painting: the box rows y0..y1, columns x0..x1 (pixels, end exclusive) is generated,
    /// the rest kept. `outpaint` swaps the two.
    pub fn from_box(side: usize, bx: [usize; 4], outpaint: bool) -> Result<Self> {
        let [x0, y0, x1, y1] = bx;
        if side == 0 || x0 >= x1 || y0 >= y1 || x1 > side || y1 > side {
            return Err(Error::invalid(
                "edit mask",
                format!(
                    "box {x0},{y0},{x1},{y1}: expected x0 < x1 <= {side} and y0 < y1 <= {side} (pixels, end exclusive)"
                ),
            ));
        }
        Ok(EditMask {
            side,
            region: Region::Box { bx, outpaint },
        })
    }

    /// A mask from a side x side row-major table (true = kept).
    pub fn from_keep(side: usize, keep: Vec<bool>) -> Result<Self> {
        if keep.len() != side * side || side == 0 {
            return Err(Error::shape(
                "edit mask",
                format!("{} values", keep.len()),
                format!("{side} x {side} = {} values", side * side),
            ));
        }
        Ok(EditMask {
            side,
            region: Region::Pixels(keep),
        })
    }

    /// Whether the pixel (y, x) is kept.
    fn pixel_kept(&self, y: usize, x: usize) -> bool {
        match &self.region {
            Region::Box { bx, outpaint } => {
                let inside = (bx[1]..bx[3]).contains(&y) && (bx[0]..bx[2]).contains(&x);
                inside == *outpaint
            }
            Region::Pixels(keep) => keep[y * self.side + x],
        }
    }

    /// The edit mask on the last scale's `grid` x `grid` tokens (1.0 = kept), as the official
    /// `get_edit_mask` builds it from the box's fractions of the image.
    fn grid_mask(&self, grid: usize) -> Vec<f32> {
        let n = self.side;
        match &self.region {
            Region::Box { bx, outpaint } => {
                // round(fraction * P), the fraction and the product in f64 as Python computes
                // them, halves to even as Python's round.
                let at =
                    |px: usize| ((px as f64 / n as f64) * grid as f64).round_ties_even() as usize;
                let (x0, y0, x1, y1) = (at(bx[0]), at(bx[1]), at(bx[2]), at(bx[3]));
                (0..grid * grid)
                    .map(|i| {
                        let (r, c) = (i / grid, i % grid);
                        let inside = (y0..y1).contains(&r) && (x0..x1).contains(&c);
                        if inside == *outpaint {
                            1.0
                        } else {
                            0.0
                        }
                    })
                    .collect()
            }
            Region::Pixels(_) => {
                // Majority over each token's cell (the tokenizer's area-pooling bounds: rows
                // floor(r n / P) .. ceil((r + 1) n / P)).
                let bounds = |i: usize| (i * n / grid, ((i + 1) * n).div_ceil(grid));
                (0..grid * grid)
                    .map(|i| {
                        let ((ya, yb), (xa, xb)) = (bounds(i / grid), bounds(i % grid));
                        let kept: usize = (ya..yb)
                            .map(|y| (xa..xb).filter(|&x| self.pixel_kept(y, x)).count())
                            .sum();
                        if 2 * kept > (yb - ya) * (xb - xa) {
                            1.0
                        } else {
                            0.0
                        }
                    })
                    .collect()
            }
        }
    }

    /// Kept tokens of a pn x pn scale of a pyramid whose last scale is `last` x `last` (see the
    /// module's rules).
    pub fn tokens_kept(&self, pn: usize, last: usize) -> Vec<bool> {
        if pn * pn <= 3 {
            return vec![true; pn * pn];
        }
        let grid = self.grid_mask(last);
        // PyTorch's CPU bilinear resize (align_corners=False) in f32: source = scale (dst + 0.5)
        // - 0.5 clamped at 0, the two taps and their weights per axis, rows of columns. The
        // source index is one fused multiply-add, as PyTorch's build computes it: rounded once,
        // 16 -> 13 puts output 6 at 7.5000005, not 7.5, so it takes more of the kept column 8 and
        // passes 0.5 (the official edit keeps it).
        let scale = last as f32 / pn as f32;
        let taps = |d: usize| {
            let src = scale.mul_add(d as f32 + 0.5, -0.5).max(0.0);
            let i0 = src as usize;
            let i1 = if i0 < last - 1 { i0 + 1 } else { i0 };
            let w1 = src - i0 as f32;
            (i0, i1, 1.0 - w1, w1)
        };
        let mut out = Vec::with_capacity(pn * pn);
        for r in 0..pn {
            let (h0, h1, hw0, hw1) = taps(r);
            for c in 0..pn {
                let (w0, w1, ww0, ww1) = taps(c);
                let v = hw0 * (ww0 * grid[h0 * last + w0] + ww1 * grid[h0 * last + w1])
                    + hw1 * (ww0 * grid[h1 * last + w0] + ww1 * grid[h1 * last + w1]);
                out.push(v > 0.5);
            }
        }
        out
    }

    /// Share of the pixels that are kept.
    pub fn kept_share(&self) -> f64 {
        let n = self.side;
        let kept = (0..n * n)
            .filter(|&i| self.pixel_kept(i / n, i % n))
            .count();
        kept as f64 / (n * n) as f64
    }
}

/// Edits: for each label, an image generated with the tokens of `image_tokens` (the image's token
/// maps from [`VqVae::img_to_idx`], each i64 [B, pn^2] with B = labels.len()) teacher-forced where
/// `mask` keeps them.
pub fn edit(
    model: &ArModel,
    vae: &VqVae,
    image_tokens: &[Tensor],
    mask: &EditMask,
    labels: &[i64],
    sc: SampleConfig,
    rng: &mut Generator,
) -> Result<SampleOutput> {
    const OP: &str = "edit";
    if sc.more_smooth {
        return Err(Error::invalid(
            OP,
            "more_smooth: an edit teacher-forces the kept tokens, so it takes drawn tokens only (expected more_smooth off)",
        ));
    }
    let cfg = &model.var().config;
    let pns = &cfg.patch_nums;
    if image_tokens.len() != pns.len() {
        return Err(Error::invalid(
            OP,
            format!(
                "{} token maps: expected one per scale ({})",
                image_tokens.len(),
                pns.len()
            ),
        ));
    }
    let b = labels.len();
    let mut kept_tokens = Vec::with_capacity(pns.len());
    for (si, (&pn, t)) in pns.iter().zip(image_tokens).enumerate() {
        if t.dims() != [b, pn * pn] {
            return Err(Error::shape(
                OP,
                format!("token map of scale {si}: {}", t.shape()),
                format!("i64 [{b}, {}]", pn * pn),
            ));
        }
        kept_tokens.push(t.to_vec::<i64>()?);
    }
    let last = *pns.last().expect("a validated pyramid has scales");
    let keep: Vec<Vec<bool>> = pns.iter().map(|&pn| mask.tokens_kept(pn, last)).collect();
    let choose = |si: usize, logits: &Tensor, rng: &mut Generator| -> Result<Tensor> {
        let sampled = sample_tokens(logits, sc.top_k, sc.top_p, rng)?;
        let n = pns[si] * pns[si];
        let mut toks = sampled.to_vec::<i64>()?;
        for (i, t) in toks.iter_mut().enumerate() {
            if keep[si][i % n] {
                *t = kept_tokens[si][i];
            }
        }
        Tensor::from_vec(toks, [b, n], logits.device())
    };
    match model {
        ArModel::Var(v) => v.decode_with(vae, labels, Some(sc.cfg), |si, l| choose(si, l, rng)),
        ArModel::Mvar(m) => m.decode_with(
            vae,
            labels,
            if sc.cfg == 1.0 { None } else { Some(sc.cfg) },
            |si, l| choose(si, l, rng),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvar::{Mvar, MvarConfig};
    use crate::var::{Mixing, Var};
    use crate::VqVae;
    use mvar_engine::{DType, Device};

    /// A tiny tokenizer and the two models on it: VAR, and MVAR with neighbourhood attention on
    /// the 4x4 scale.
    fn tiny() -> (Vec<ArModel>, VqVae) {
        let dev = Device::Cpu;
        let (vae, cfg) = crate::test_models::tiny(16, 4, &[1, 2, 4], 3, 1, 32, 3);
        let var = Var::new(cfg.clone(), &dev, 5, Mixing::BlockCausal).unwrap();
        let mcfg = MvarConfig {
            refine_step: 2,
            kernel_size: 3,
            ..MvarConfig::default()
        };
        let mvar = Mvar::new(cfg, mcfg, &dev, 6).unwrap();
        (vec![ArModel::Var(var), ArModel::Mvar(mvar)], vae)
    }

    #[test]
    fn token_masks_follow_the_official_rule() {
        // 8-px image, last scale 4 x 4: the box x 0..4 (the left half) is generated.
        let m = EditMask::from_box(8, [0, 0, 4, 8], false).unwrap();
        assert_eq!(
            m.tokens_kept(4, 4),
            (0..16).map(|i| i % 4 >= 2).collect::<Vec<_>>()
        );
        // 4 -> 2: each output samples the middle of two columns, (0 + 0) / 2 and (1 + 1) / 2.
        assert_eq!(m.tokens_kept(2, 4), vec![false, true, false, true]);
        // A scale of at most three tokens is kept whole, whatever the box.
        assert_eq!(m.tokens_kept(1, 4), vec![true]);
        let o = EditMask::from_box(8, [0, 0, 4, 8], true).unwrap();
        assert_eq!(o.tokens_kept(2, 4), vec![true, false, true, false]);
        // 4 -> 3 (scale 4/3): output column 1 samples source 1.5, halfway between a generated
        // and a kept column: 0.5 is not above 0.5.
        assert_eq!(
            m.tokens_kept(3, 4),
            vec![false, false, true, false, false, true, false, false, true]
        );
        // Box edges round as Python's round of the fraction: 1/8 of 4 tokens is 0.5 -> 0 and
        // 3/8 is 1.5 -> 2 (halves to even), so pixels 1..3 generate tokens 0..2.
        let r = EditMask::from_box(8, [1, 0, 3, 8], false).unwrap();
        assert_eq!(r.tokens_kept(4, 4)[..4], [false, false, true, true]);
        // A pixel mask reaches the grid by majority over each token's cell.
        let p = EditMask::from_keep(8, (0..64).map(|i| i % 8 >= 3).collect()).unwrap();
        assert_eq!(p.tokens_kept(4, 4)[..4], [false, false, true, true]);
        assert!((m.kept_share() - 0.5).abs() < 1e-12);
        assert!(EditMask::from_box(8, [2, 2, 2, 5], false).is_err());
        assert!(EditMask::from_box(8, [0, 0, 9, 4], false).is_err());
    }

    #[test]
    fn keeping_everything_reproduces_the_image_tokens_and_keeping_nothing_samples_after_the_start()
    {
        let (models, vae) = tiny();
        let img = Tensor::randn(
            [2, 3, 8, 8],
            0.0,
            0.5,
            DType::F32,
            &Device::Cpu,
            &mut Generator::new(9),
        )
        .unwrap();
        let tokens = vae.img_to_idx(&img).unwrap();
        let labels = [0i64, 2];
        let sc = SampleConfig {
            cfg: 2.0,
            top_k: 0,
            top_p: 0.9,
            more_smooth: false,
        };
        let ids = |o: &SampleOutput| -> Vec<Vec<i64>> {
            o.idx.iter().map(|t| t.to_vec::<i64>().unwrap()).collect()
        };
        let image_ids: Vec<Vec<i64>> = tokens.iter().map(|t| t.to_vec::<i64>().unwrap()).collect();
        for model in &models {
            let all = EditMask::from_keep(8, vec![true; 64]).unwrap();
            let out = edit(
                model,
                &vae,
                &tokens,
                &all,
                &labels,
                sc,
                &mut Generator::new(1),
            )
            .unwrap();
            assert_eq!(ids(&out), image_ids);
            let smooth = SampleConfig {
                more_smooth: true,
                ..sc
            };
            let e = edit(
                model,
                &vae,
                &tokens,
                &all,
                &labels,
                smooth,
                &mut Generator::new(1),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("more_smooth"), "{e}");
            // Keeping nothing still keeps the 1 x 1 start (the official rule), and samples the
            // rest.
            let none = EditMask::from_keep(8, vec![false; 64]).unwrap();
            let out = edit(
                model,
                &vae,
                &tokens,
                &none,
                &labels,
                sc,
                &mut Generator::new(1),
            )
            .unwrap();
            assert_eq!(ids(&out)[0], image_ids[0]);
            assert_ne!(ids(&out)[1..], image_ids[1..]);
            // Top half kept: those tokens are the image's at every scale, and the generated
            // half differs from the image somewhere.
            let half = EditMask::from_box(8, [0, 4, 8, 8], false).unwrap();
            let out = edit(
                model,
                &vae,
                &tokens,
                &half,
                &labels,
                sc,
                &mut Generator::new(4),
            )
            .unwrap();
            let got = ids(&out);
            let mut generated_differs = false;
            for (si, pn) in [1usize, 2, 4].into_iter().enumerate() {
                let keep = half.tokens_kept(pn, 4);
                for i in 0..got[si].len() {
                    if keep[i % (pn * pn)] {
                        assert_eq!(got[si][i], image_ids[si][i], "scale {si} token {i}");
                    } else {
                        generated_differs |= got[si][i] != image_ids[si][i];
                    }
                }
            }
            assert!(generated_differs);
        }
    }
}
