//! Zero-shot editing (VAR paper, section 7): in-painting, out-painting and class-conditional
//! editing without any training, by teacher-forcing the tokens of the kept region at every scale.
//!
//! The kept region is a pixel mask over the image. At scale si (a pn x pn token map) token
//! (r, c) is kept when more than half of its cell (the area-downsampled mask, the same cell bounds
//! as the tokenizer's area interpolation) lies in the kept region; a kept token is replaced by the
//! image's own token at that scale, every other token is sampled as usual (guidance, top-k,
//! top-p). The sampler's next input is built from the chosen tokens, so the generated region is
//! conditioned on the kept one at every scale. Class-conditional editing is in-painting with the
//! label of another class.
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
    /// Row-major side x side, true = kept.
    keep: Vec<bool>,
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
        let keep = (0..side * side)
            .map(|i| {
                let (y, x) = (i / side, i % side);
                let inside = (y0..y1).contains(&y) && (x0..x1).contains(&x);
                inside == outpaint
            })
            .collect();
        Ok(EditMask { side, keep })
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
        Ok(EditMask { side, keep })
    }

    /// Kept tokens of a pn x pn map: a token is kept when more than half of its cell is kept.
    /// Cell bounds as adaptive average pooling: rows floor(r n / pn) .. ceil((r + 1) n / pn).
    pub fn tokens_kept(&self, pn: usize) -> Vec<bool> {
        let n = self.side;
        let bounds = |i: usize| (i * n / pn, ((i + 1) * n).div_ceil(pn));
        let mut out = Vec::with_capacity(pn * pn);
        for r in 0..pn {
            let (ya, yb) = bounds(r);
            for c in 0..pn {
                let (xa, xb) = bounds(c);
                let kept: usize = (ya..yb)
                    .map(|y| (xa..xb).filter(|&x| self.keep[y * n + x]).count())
                    .sum();
                out.push(2 * kept > (yb - ya) * (xb - xa));
            }
        }
        out
    }

    /// Share of the pixels that are kept.
    pub fn kept_share(&self) -> f64 {
        self.keep.iter().filter(|&&k| k).count() as f64 / self.keep.len() as f64
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
    let keep: Vec<Vec<bool>> = pns.iter().map(|&pn| mask.tokens_kept(pn)).collect();
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
    fn token_masks_follow_the_pixel_box_and_its_complement() {
        let m = EditMask::from_box(8, [0, 0, 4, 8], false).unwrap();
        // The left half is generated: at 2x2, column 0 regenerated, column 1 kept.
        assert_eq!(m.tokens_kept(2), vec![false, true, false, true]);
        assert_eq!(m.tokens_kept(1), vec![false]); // exactly half kept is not "more than half"
        let o = EditMask::from_box(8, [0, 0, 4, 8], true).unwrap();
        assert_eq!(o.tokens_kept(2), vec![true, false, true, false]);
        assert!((m.kept_share() - 0.5).abs() < 1e-12);
        assert!(EditMask::from_box(8, [2, 2, 2, 5], false).is_err());
        assert!(EditMask::from_box(8, [0, 0, 9, 4], false).is_err());
    }

    #[test]
    fn keeping_everything_reproduces_the_image_tokens_and_keeping_nothing_is_sampling() {
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
            let plain = match model {
                ArModel::Var(v) => v.sample(&vae, &labels, sc, &mut Generator::new(1)),
                ArModel::Mvar(m) => m.sample(&vae, &labels, sc, &mut Generator::new(1)),
            }
            .unwrap();
            assert_eq!(ids(&out), ids(&plain));
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
                let keep = half.tokens_kept(pn);
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
