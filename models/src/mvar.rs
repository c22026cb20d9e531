//! MVAR (spec section 5): VAR's modules and weights with Markovian attention.
//!
//! - Scale-Markov: a token attends only to the tokens of its own scale; the earlier scales reach
//!   it through its input, the area-downsampled accumulated f_hat (so no KV cache is needed).
//! - Spatial-Markov: from scale `refine_step` on (8 by default: the 13x13 and 16x16 maps of the
//!   256-px pyramid), every layer uses `kernel_size` x `kernel_size` neighbourhood attention
//!   (NATTEN's window: start = clamp(i - k/2, 0, n - k) per axis) instead of the whole map.
//! - Training runs one segment at a time: scales 0..refine_step together (block-diagonal), then
//!   each later scale alone (neighbourhood); the loss keeps the full sequence's 1/L token weight.
//! - Sampling: each scale is an independent forward over its own tokens (doubled for guidance);
//!   only f_hat is carried. With cfg == 1 exactly the batch is not doubled and no guidance applies.

use std::ops::Range;

use mvar_engine::{no_grad, DType, Device, Error, Generator, Result, Tensor};
use mvar_ops as ops;
use serde::{Deserialize, Serialize};

use crate::var::{
    sample_choice, Choice, DecodeStep, Mixing, SampleConfig, SampleOutput, Var, VarConfig,
};
use crate::VqVae;

/// MVAR's own settings on top of a [`VarConfig`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MvarConfig {
    /// First scale that uses neighbourhood attention (and trains as its own segment).
    #[serde(default = "d_refine")]
    pub refine_step: usize,
    #[serde(default = "d_kernel")]
    pub kernel_size: usize,
    /// Share of training steps given to the first segment: `ratio_k` : 1 : 1 ... (official 8).
    #[serde(default = "d_ratio", alias = "ratio_k_official")]
    pub ratio_k: usize,
}

fn d_refine() -> usize {
    8
}
fn d_kernel() -> usize {
    7
}
fn d_ratio() -> usize {
    8
}

impl Default for MvarConfig {
    fn default() -> Self {
        MvarConfig {
            refine_step: 8,
            kernel_size: 7,
            ratio_k: 8,
        }
    }
}

pub struct Mvar {
    pub var: Var,
    pub config: MvarConfig,
}

impl MvarConfig {
    /// Checks the neighbourhood settings against the token pyramid `patch_nums`: an odd kernel,
    /// no larger than any scale from `refine_step` on.
    pub fn validate(&self, patch_nums: &[usize]) -> Result<()> {
        if self.kernel_size == 0 || self.kernel_size.is_multiple_of(2) {
            return Err(Error::invalid(
                "MvarConfig",
                format!("kernel_size {}: expected an odd size", self.kernel_size),
            ));
        }
        if let Some(&small) = patch_nums
            .iter()
            .skip(self.refine_step.min(patch_nums.len()))
            .find(|&&p| p < self.kernel_size)
        {
            return Err(Error::invalid(
                "MvarConfig",
                format!("kernel_size {} is larger than the {small}x{small} scale at or after refine_step {}", self.kernel_size, self.refine_step),
            ));
        }
        Ok(())
    }
}

impl Mvar {
    /// An MVAR with VAR's initialisation; its checkpoint buffer holds the block-diagonal mask.
    pub fn new(
        var_config: VarConfig,
        config: MvarConfig,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        config.validate(&var_config.patch_nums)?;
        Ok(Mvar {
            var: Var::new(var_config, device, seed, Mixing::BlockDiagonal)?,
            config,
        })
    }

    /// The training segments as scale ranges: [0, refine_step), then one per later scale.
    pub fn segments(&self) -> Vec<Range<usize>> {
        let k = self.var.config.patch_nums.len();
        let r = self.config.refine_step.min(k);
        let mut out = Vec::new();
        if r > 0 {
            out.push(0..r);
        }
        out.extend((r..k).map(|s| s..s + 1));
        out
    }

    /// The segment training step `step` (0-based) trains, in the official cycle: of every
    /// ratio_k + (K - refine_step) steps, the first ratio_k train scales [0, refine_step) and the
    /// others one later scale each, in order. (MVARTrainer picks the later scale as
    /// refine_step + cur_prog % ratio_k, or refine_step + cur_prog - 1 for ratio_k 1: the same
    /// order whenever the later scales number at most ratio_k, as the official 2 against 8 do;
    /// with more, that formula would train some later scales twice a cycle and the last never,
    /// so here they stay in order.)
    pub fn segment_for_step(&self, step: u64) -> Range<usize> {
        let segs = self.segments();
        if segs.len() <= 1 {
            return segs.into_iter().next().unwrap_or(0..1);
        }
        let ratio = self.config.ratio_k.max(1) as u64;
        let cycle = ratio + segs.len() as u64 - 1;
        let cur = step % cycle;
        if cur < ratio {
            segs[0].clone()
        } else {
            segs[(cur - ratio + 1) as usize].clone()
        }
    }

    /// The token mixing of a segment.
    pub fn mixing(&self, scales: &Range<usize>) -> Mixing {
        if scales.start >= self.config.refine_step {
            Mixing::Neighbourhood {
                kernel: self.config.kernel_size,
            }
        } else {
            Mixing::BlockDiagonal
        }
    }

    /// Teacher-forced logits of one segment [B, T, V].
    pub fn forward_segment(
        &self,
        labels: &Tensor,
        x_in: &Tensor,
        scales: Range<usize>,
        rng: Option<&mut Generator>,
    ) -> Result<Tensor> {
        let mixing = self.mixing(&scales);
        self.var.forward_segment(labels, x_in, scales, mixing, rng)
    }

    /// KV-free sampling (spec 5.4); see the module docs for guidance.
    pub fn sample(
        &self,
        vae: &VqVae,
        labels: &[i64],
        sc: SampleConfig,
        rng: &mut Generator,
    ) -> Result<SampleOutput> {
        let scales = self.var.config.patch_nums.len();
        self.decode_with(
            vae,
            labels,
            if sc.cfg == 1.0 { None } else { Some(sc.cfg) },
            |si, logits| sample_choice(vae, logits, si, scales, sc, rng),
        )
    }

    /// The decoding loop with a pluggable token choice (as [`Var::decode_with`]), each scale an
    /// independent forward of its own tokens.
    pub fn decode_with<C: Into<Choice>>(
        &self,
        vae: &VqVae,
        labels: &[i64],
        cfg: Option<f64>,
        mut choose: impl FnMut(usize, &Tensor) -> Result<C>,
    ) -> Result<SampleOutput> {
        let _ng = no_grad();
        let var = &self.var;
        var.check_vae(vae)?;
        let bsz = labels.len();
        if bsz == 0 {
            return Err(Error::invalid("MVAR sampling", "no labels: a batch of 0"));
        }
        let c = &var.config;
        let k = c.patch_nums.len();
        let mut all = labels.to_vec();
        if cfg.is_some() {
            all.extend(std::iter::repeat_n(c.num_classes as i64, bsz));
        }
        if let Some(&bad) = all.iter().find(|&&l| l < 0 || l as usize > c.num_classes) {
            return Err(Error::IndexOutOfRange {
                op: "MVAR sampling",
                what: "class label",
                index: bad,
                size: c.num_classes + 1,
            });
        }
        let lab = Tensor::from_vec(all.clone(), [all.len()], var.device())?;
        let cond = var.conditioning(&lab)?;
        let full = *c.patch_nums.last().unwrap_or(&1);
        let mut f_hat = Tensor::zeros([bsz, c.cvae, full, full], DType::F32, var.device())?;
        let mut next_in: Option<Tensor> = None;
        let mut idxs = Vec::with_capacity(k);
        for (si, &pn) in c.patch_nums.iter().enumerate() {
            let _span = mvar_engine::profile::span(|| format!("MVAR scale {si} ({pn}x{pn})"));
            let tokens = match &next_in {
                None => var.start_tokens(&cond.cond)?,
                Some(ni) => {
                    let t = var.scale_tokens(si, ni)?;
                    if cfg.is_some() {
                        ops::concat(&[&t, &t], 0)?
                    } else {
                        t
                    }
                }
            };
            let logits = var.run_scale(&tokens, &cond, pn, self.mixing(&(si..si + 1)))?;
            let step = DecodeStep {
                what: "MVAR decoding",
                si,
                scales: k,
                pn,
                bsz,
                cfg,
            };
            let (idx, fh, ni) = step.run(vae, &logits, &f_hat, &mut choose)?;
            f_hat = fh;
            next_in = ni;
            idxs.push(idx);
        }
        Ok(SampleOutput { idx: idxs, f_hat })
    }

    /// Per-scale logits of the sampling path fed the tokens `idx` (no guidance): what the
    /// segment-wise training forward must reproduce.
    pub fn step_logits(&self, vae: &VqVae, labels: &[i64], idx: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut out = Vec::new();
        self.decode_with(vae, labels, None, |si, logits| {
            out.push(logits.clone());
            idx.get(si)
                .cloned()
                .ok_or_else(|| Error::invalid("step_logits", format!("no tokens for scale {si}")))
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_smooth_is_the_drawn_code_when_one_is_kept_and_a_mixture_otherwise() {
        let (vae, tcfg) = crate::test_models::tiny(32, 8, &[1, 2, 3, 5], 1, 2, 64, 5);
        let tcfg = VarConfig {
            init_adaln_gamma: 0.5,
            init_head: 1.0,
            ..tcfg
        };
        let mvar = MvarConfig {
            refine_step: 2,
            kernel_size: 3,
            ratio_k: 8,
        };
        let m = Mvar::new(tcfg, mvar, &Device::Cpu, 2).unwrap();
        crate::test_models::check_more_smooth(|sc, seed| {
            m.sample(&vae, &[1, 4], sc, &mut Generator::new(seed))
                .unwrap()
        });
    }

    #[test]
    fn segment_logits_equal_the_per_step_sampling_logits() {
        let (vae, tcfg) = crate::test_models::tiny(32, 8, &[1, 2, 3, 5], 1, 2, 64, 5);
        let tcfg = VarConfig {
            init_adaln_gamma: 0.5,
            init_head: 1.0,
            ..tcfg
        };
        let m = Mvar::new(
            tcfg,
            MvarConfig {
                refine_step: 2,
                kernel_size: 3,
                ratio_k: 8,
            },
            &Device::Cpu,
            2,
        )
        .unwrap();
        assert_eq!(m.segments(), vec![0..2, 2..3, 3..4]);
        let mut g = Generator::new(4);
        let labels = [1i64, 5];
        let idx: Vec<Tensor> = [1usize, 2, 3, 5]
            .iter()
            .map(|&pn| {
                Tensor::from_vec(
                    g.next_u32s(2 * pn * pn)
                        .into_iter()
                        .map(|w| (w % 32) as i64)
                        .collect::<Vec<_>>(),
                    [2, pn * pn],
                    &Device::Cpu,
                )
                .unwrap()
            })
            .collect();
        let x_in = vae.idx_to_var_input(&idx).unwrap();
        let lab = Tensor::from_vec(labels.to_vec(), [2], &Device::Cpu).unwrap();
        let segs: Vec<Tensor> = m
            .segments()
            .into_iter()
            .map(|s| m.forward_segment(&lab, &x_in, s, None).unwrap())
            .collect();
        let refs: Vec<&Tensor> = segs.iter().collect();
        let train = ops::concat(&refs, 1).unwrap().to_vec_f32().unwrap();
        let steps = m.step_logits(&vae, &labels, &idx).unwrap();
        let refs: Vec<&Tensor> = steps.iter().collect();
        let infer = ops::concat(&refs, 1).unwrap().to_vec_f32().unwrap();
        let err = mvar_ops::testing::max_abs_diff_f32(&train, &infer);
        assert!(err < 2e-5, "{err}");
        assert!(train.iter().map(|v| v.abs()).fold(0.0f32, f32::max) > 0.1);
    }

    #[test]
    fn segments_cycle_as_the_official_trainer_and_bad_kernels_are_rejected() {
        let cfg = VarConfig {
            embed_dim: 64,
            num_heads: 1,
            ..VarConfig::with_depth(1)
        };
        let m = Mvar::new(cfg.clone(), MvarConfig::default(), &Device::Cpu, 0).unwrap();
        let cycle: Vec<_> = (0..12).map(|s| m.segment_for_step(s)).collect();
        assert_eq!(cycle[..8], vec![0..8; 8][..]);
        assert_eq!(cycle[8..], [8..9, 9..10, 0..8, 0..8]);
        let e = Mvar::new(
            cfg.clone(),
            MvarConfig {
                kernel_size: 4,
                ..MvarConfig::default()
            },
            &Device::Cpu,
            0,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("odd"), "{e}");
        let e = Mvar::new(
            cfg,
            MvarConfig {
                refine_step: 6,
                kernel_size: 11,
                ..MvarConfig::default()
            },
            &Device::Cpu,
            0,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("larger than the 8x8"), "{e}");
    }
}
