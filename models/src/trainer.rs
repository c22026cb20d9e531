//! Training VAR and MVAR (spec sections 3 and 5.2): one step on a batch of token maps.
//!
//! - labels are replaced by the null class with probability `cond_drop_rate` (one uniform per
//!   sample), as the official forward does;
//! - loss = mean over the batch of sum over the trained tokens of CE / L (the full sequence's
//!   L even for an MVAR segment, as MVARTrainer keeps it), label smoothing optional;
//! - AdamW (0.9, 0.95) with the official no-decay set; learning rate
//!   peak = base_lr * batch / 256, linear warmup from wp0 * peak, then the `lin0` schedule
//!   (constant for the first 5 % of the remaining steps, then linear down to wpe * peak);
//!   weight decay on a cosine from `weight_decay` to `weight_decay_end`;
//! - global-norm clipping (2.0); a NaN/inf loss or gradient norm stops with an error naming the
//!   step, before the optimizer touches the weights.
//!
//! VAR trains all tokens each step with the block-causal mask; MVAR trains one segment per step
//! in the official cycle.

use std::ops::Range;

use mvar_engine::{no_grad, Device, Error, Generator, ParamStore, Result, Tensor};
use mvar_ops::{self as ops, AdamW, AdamWConfig};

use crate::mvar::Mvar;
use crate::var::Var;

/// The transformer being trained.
pub enum ArModel {
    Var(Var),
    Mvar(Mvar),
}

impl ArModel {
    pub fn var(&self) -> &Var {
        match self {
            ArModel::Var(v) => v,
            ArModel::Mvar(m) => &m.var,
        }
    }

    pub fn params(&self) -> &ParamStore {
        &self.var().params
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ArModel::Var(_) => "var",
            ArModel::Mvar(_) => "mvar",
        }
    }
}

/// Optimisation settings (official defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct ArTrainConfig {
    /// `tblr`: the learning rate per 256 images.
    pub base_lr: f64,
    /// Global batch size (for the peak-lr rule).
    pub batch: usize,
    pub total_steps: u64,
    pub warmup_steps: u64,
    /// Warmup starts at wp0 * peak.
    pub wp0: f64,
    /// The schedule ends at wpe * peak.
    pub wpe: f64,
    pub weight_decay: f64,
    pub weight_decay_end: f64,
    pub clip: f64,
    pub label_smoothing: f64,
    /// Mixed precision: Some(bf16) runs the forward and backward inside an autocast scope
    /// (GEMMs, attention and convolutions in bf16 with f32 accumulation; parameters, optimizer
    /// state, norms and the loss in f32). None trains in the parameters' dtype.
    pub autocast: Option<mvar_engine::DType>,
    /// Gradient accumulation: each step's batch runs as passes of at most this many sequences
    /// whose gradients add up before the one update, so the memory is a micro-batch's while the
    /// loss, the gradient and the learning-rate rule stay the whole batch's (up to summation
    /// order, and drop-path masks drawn per pass). 0: the whole batch in one pass.
    pub micro_batch: usize,
    /// Find the passes that fit (`--micro-batch auto`): when a pass runs out of GPU memory, the
    /// step starts again (the random draws as they were, the gradients zeroed) with passes of
    /// half as many sequences, and `micro_batch` keeps that size for the steps after. A pass of
    /// one sequence that does not fit is the error it was.
    pub shrink_on_oom: bool,
    /// Activation recomputation ([`Var::set_recompute_blocks`]): the blocks' activations are
    /// recomputed in the backward instead of kept, for about one more forward per step; the
    /// gradients are the same.
    pub recompute_blocks: bool,
}

impl Default for ArTrainConfig {
    fn default() -> Self {
        ArTrainConfig {
            base_lr: 1e-4,
            batch: 768,
            total_steps: 1000,
            warmup_steps: 20,
            wp0: 0.005,
            wpe: 0.1,
            weight_decay: 0.05,
            weight_decay_end: 0.05,
            clip: 2.0,
            label_smoothing: 0.0,
            autocast: None,
            micro_batch: 0,
            shrink_on_oom: false,
            recompute_blocks: false,
        }
    }
}

impl ArTrainConfig {
    pub fn peak_lr(&self) -> f64 {
        self.base_lr * self.batch as f64 / 256.0
    }

    /// The learning rate of step `it` (0-based), official `lr_wd_annealing` with `lin0`.
    pub fn lr_at(&self, it: u64) -> f64 {
        let peak = self.peak_lr();
        let wp = self.warmup_steps as f64;
        let it_f = it as f64;
        let factor = if it_f < wp {
            self.wp0 + (1.0 - self.wp0) * it_f / wp
        } else {
            let span = (self.total_steps as f64 - 1.0 - wp).max(1.0);
            let passed = ((it_f - wp) / span).clamp(0.0, 1.0);
            let t = 0.05;
            if passed < t {
                1.0
            } else {
                self.wpe + (1.0 - self.wpe) * (1.0 - passed) / (1.0 - t)
            }
        };
        factor * peak
    }

    /// Weight decay of step `it`: cosine from `weight_decay` to `weight_decay_end`.
    pub fn wd_at(&self, it: u64) -> f64 {
        let passed = (it as f64 / (self.total_steps as f64 - 1.0).max(1.0)).clamp(0.0, 1.0);
        self.weight_decay_end
            + (self.weight_decay - self.weight_decay_end)
                * (0.5 + 0.5 * (std::f64::consts::PI * passed).cos())
    }
}

/// The official no-weight-decay rule: 1-D tensors, biases, and names containing these keys.
pub fn no_weight_decay(name: &str, t: &Tensor) -> bool {
    const KEYS: [&str; 14] = [
        "cls_token",
        "start_token",
        "task_token",
        "cfg_uncond",
        "pos_embed",
        "pos_1LC",
        "pos_start",
        "start_pos",
        "lvl_embed",
        "gamma",
        "beta",
        "ada_gss",
        "moe_bias",
        "scale_mul",
    ];
    t.rank() == 1 || name.ends_with("bias") || KEYS.iter().any(|k| name.contains(k))
}

/// Figures of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct ArStepStats {
    pub step: u64,
    /// The official loss: the batch mean of the trained tokens' cross-entropy summed and divided
    /// by all L tokens of the pyramid (an MVAR step that trains some scales scores less).
    pub loss: f64,
    /// The mean cross-entropy per trained token (nats): `loss` x L / the trained tokens, the
    /// figure to hold against a held-out loss per token.
    pub token_loss: f64,
    /// Top-1 accuracy over the trained tokens.
    pub accuracy: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub scales: Range<usize>,
}

pub struct ArTrainer {
    pub model: ArModel,
    pub opt: AdamW,
    pub config: ArTrainConfig,
    step: u64,
    /// Tests: passes of more sequences than this fail as if out of GPU memory.
    #[cfg(test)]
    fail_passes_over: Option<usize>,
}

impl ArTrainer {
    pub fn new(model: ArModel, config: ArTrainConfig) -> Result<Self> {
        let opt = AdamW::new(
            model.params(),
            AdamWConfig {
                lr: config.lr_at(0),
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: config.weight_decay,
            },
            no_weight_decay,
        )?;
        Ok(ArTrainer {
            model,
            opt,
            config,
            step: 0,
            #[cfg(test)]
            fail_passes_over: None,
        })
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// The scales step `it` trains.
    pub fn scales_for(&self, it: u64) -> Range<usize> {
        match &self.model {
            ArModel::Var(v) => 0..v.config.patch_nums.len(),
            ArModel::Mvar(m) => m.segment_for_step(it),
        }
    }

    /// One optimisation step. `labels` \[B\] (before label dropout), `gt` the target tokens
    /// i64 [B, L], `x_in` the teacher-forcing input [B, L - first_l, Cvae]; `rng` draws label
    /// dropout and drop-path. With `shrink_on_oom`, passes that run out of GPU memory run again
    /// smaller (see [`ArTrainConfig::shrink_on_oom`]); the update runs once, after they fit.
    pub fn step(
        &mut self,
        labels: &[i64],
        gt: &Tensor,
        x_in: &Tensor,
        rng: &mut Generator,
    ) -> Result<ArStepStats> {
        let it = self.step;
        let _span = mvar_engine::profile::span(|| format!("train step {}", it + 1));
        let scales = self.scales_for(it);
        let l = self.model.var().config.total_tokens();
        if gt.dims() != [labels.len(), l] {
            return Err(Error::shape(
                "train step",
                format!("targets {}", gt.shape()),
                format!("[{}, {l}]", labels.len()),
            ));
        }
        let _autocast = mvar_engine::autocast(self.config.autocast)?;
        let be = self.model.var().config.begin_ends();
        let (bg, ed) = (be[scales.start].0, be[scales.end - 1].1);
        let draws_at_start = rng.state();
        let (loss_v, correct, counted) = loop {
            match self.passes(labels, gt, x_in, rng, &scales, (bg, ed)) {
                Err(e) if self.config.shrink_on_oom && e.is_out_of_memory() => {
                    let pass = self.pass_size(labels.len());
                    if pass <= 1 {
                        return Err(e);
                    }
                    // Only the passes ran: the next try zeroes the gradients this one
                    // accumulated and draws the same label dropout and drop-path again.
                    self.config.micro_batch = pass.div_ceil(2);
                    *rng = Generator::from_state(draws_at_start);
                }
                result => break result?,
            }
        };
        let var = self.model.var();
        let _update = mvar_engine::profile::span(|| "clip and AdamW".into());
        let grad_norm = ops::clip_grad_norm(&var.params, self.config.clip)?;
        if !grad_norm.is_finite() {
            return Err(Error::invalid(
                "train",
                format!(
                    "the gradient norm is {grad_norm} at step {}; stopping before the update",
                    it + 1
                ),
            ));
        }
        let lr = self.config.lr_at(it);
        self.opt.config.lr = lr;
        self.opt.config.weight_decay = self.config.wd_at(it);
        self.opt.step(&var.params)?;
        self.step += 1;
        let accuracy = correct as f64 / counted.max(1) as f64;
        Ok(ArStepStats {
            step: self.step,
            loss: loss_v,
            token_loss: loss_v * l as f64 / (ed - bg) as f64,
            accuracy,
            lr,
            grad_norm,
            scales,
        })
    }

    /// Sequences per pass for a batch of `b`.
    fn pass_size(&self, b: usize) -> usize {
        match self.config.micro_batch {
            0 => b.max(1),
            m => m.min(b.max(1)),
        }
    }

    /// The forward and backward passes of a step (the gradients zeroed first, then added up
    /// over the passes): (the loss, tokens predicted right, tokens counted).
    fn passes(
        &self,
        labels: &[i64],
        gt: &Tensor,
        x_in: &Tensor,
        rng: &mut Generator,
        scales: &Range<usize>,
        (bg, ed): (usize, usize),
    ) -> Result<(f64, usize, usize)> {
        let it = self.step;
        let var = self.model.var();
        let device: Device = var.device().clone();
        let l = var.config.total_tokens();
        // The tokenizer is frozen: its output is data here, never a path for gradients.
        let x_in = &x_in.detach();
        let dropped = var.drop_labels(labels, var.config.cond_drop_rate, rng);
        let lab = Tensor::from_vec(dropped, [labels.len()], &device)?;
        var.params.zero_grad();
        var.set_recompute_blocks(self.config.recompute_blocks);
        let b = labels.len();
        let pass = self.pass_size(b);
        let (mut loss_v, mut correct, mut counted) = (0.0, 0usize, 0usize);
        for first in (0..b).step_by(pass) {
            let n = pass.min(b - first);
            let part = |t: &Tensor| -> Result<Tensor> {
                if n == b {
                    Ok(t.clone())
                } else {
                    ops::narrow(t, 0, first, n)
                }
            };
            let (lab, x_in) = (part(&lab)?, part(x_in)?);
            let forward = mvar_engine::profile::span(|| format!("forward ({n} sequences)"));
            let logits = match &self.model {
                ArModel::Var(v) => v.forward(&lab, &x_in, Some(rng))?,
                ArModel::Mvar(m) => m.forward_segment(&lab, &x_in, scales.clone(), Some(rng))?,
            };
            let target = ops::narrow(&part(gt)?, 1, bg, ed - bg)?;
            let ce = ops::cross_entropy(&logits, &target, None, self.config.label_smoothing)?;
            // The official loss is the batch mean of (sum over tokens) / L; a pass adds its
            // share n / b of it, so the gradients of the passes add up to the whole batch's.
            let share = n as f64 / b as f64;
            let loss =
                ops::mul_scalar(&ops::mean_all(&ops::sum(&ce, 1, false)?)?, share / l as f64)?;
            let v = loss.to_f64()?;
            if !v.is_finite() {
                return Err(Error::invalid(
                    "train",
                    format!(
                        "the loss is {v} at step {}{}; stopping before the update",
                        it + 1,
                        if n == b {
                            String::new()
                        } else {
                            format!(" (sequences {first}..{} of the batch)", first + n)
                        }
                    ),
                ));
            }
            drop(forward);
            loss_v += v;
            loss.backward()?;
            #[cfg(test)]
            if self.fail_passes_over.is_some_and(|most| n > most) {
                // A stand-in for the GPU running out of memory in this pass, after its backward
                // has added to the gradients.
                return Err(mvar_engine::cuda::CudaError::OutOfMemory {
                    during: "a test pass".into(),
                    requested_bytes: 1,
                    free_bytes: 0,
                    total_bytes: 0,
                    in_use_bytes: 0,
                    cached_bytes: 0,
                }
                .into());
            }
            let _ng = no_grad();
            let pred = ops::argmax(&logits, -1, false)?.to_vec::<i64>()?;
            let want = target.to_vec::<i64>()?;
            correct += pred.iter().zip(&want).filter(|(a, b)| a == b).count();
            counted += want.len();
        }
        Ok((loss_v, correct, counted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lin0_schedule_matches_the_official_formula() {
        let c = ArTrainConfig {
            base_lr: 1e-4,
            batch: 768,
            total_steps: 1000,
            warmup_steps: 100,
            wp0: 0.005,
            wpe: 0.1,
            ..Default::default()
        };
        let peak = 3e-4;
        assert!((c.peak_lr() - peak).abs() < 1e-15);
        assert!((c.lr_at(0) - 0.005 * peak).abs() < 1e-15);
        assert!((c.lr_at(50) - (0.005 + 0.995 * 0.5) * peak).abs() < 1e-12);
        assert!((c.lr_at(100) - peak).abs() < 1e-15);
        // Constant for the first 5 % of the 899 post-warmup steps.
        assert!((c.lr_at(140) - peak).abs() < 1e-15);
        let passed = (500.0 - 100.0) / 899.0;
        assert!((c.lr_at(500) - (0.1 + 0.9 * (1.0 - passed) / 0.95) * peak).abs() < 1e-12);
        assert!((c.lr_at(999) - 0.1 * peak).abs() < 1e-12);
        assert!((c.wd_at(500) - 0.05).abs() < 1e-15);
    }

    fn tiny_models() -> (crate::VqVae, crate::VarConfig) {
        crate::test_models::tiny(16, 8, &[1, 2, 3], 1, 2, 64, 3)
    }

    #[test]
    fn var_and_mvar_steps_lower_the_loss_on_a_fixed_batch() {
        let (vae, tcfg) = tiny_models();
        let mut g = Generator::new(3);
        let idx: Vec<Tensor> = [1usize, 2, 3]
            .iter()
            .map(|&pn| {
                Tensor::from_vec(
                    g.next_u32s(4 * pn * pn)
                        .into_iter()
                        .map(|w| (w % 16) as i64)
                        .collect::<Vec<_>>(),
                    [4, pn * pn],
                    &Device::Cpu,
                )
                .unwrap()
            })
            .collect();
        let refs: Vec<&Tensor> = idx.iter().collect();
        let gt = ops::concat(&refs, 1).unwrap();
        let x_in = vae.idx_to_var_input(&idx).unwrap();
        let labels = [0i64, 1, 2, 0];
        let cfg = ArTrainConfig {
            base_lr: 1e-2,
            batch: 256,
            total_steps: 40,
            warmup_steps: 2,
            ..Default::default()
        };
        let models = [
            ArModel::Var(
                Var::new(tcfg.clone(), &Device::Cpu, 5, crate::Mixing::BlockCausal).unwrap(),
            ),
            ArModel::Mvar(
                Mvar::new(
                    tcfg.clone(),
                    crate::MvarConfig {
                        refine_step: 2,
                        kernel_size: 3,
                        ratio_k: 2,
                    },
                    &Device::Cpu,
                    5,
                )
                .unwrap(),
            ),
        ];
        for model in models {
            let kind = model.kind();
            let mut tr = ArTrainer::new(model, cfg.clone()).unwrap();
            let mut first = Vec::new();
            let mut last = Vec::new();
            for i in 0..40 {
                let s = tr.step(&labels, &gt, &x_in, &mut g).unwrap();
                if i < 3 {
                    first.push(s.loss);
                }
                if i >= 37 {
                    last.push(s.loss);
                }
            }
            let (a, b) = (first.iter().sum::<f64>(), last.iter().sum::<f64>());
            assert!(b < 0.8 * a, "{kind}: {first:?} -> {last:?}");
        }
    }

    #[test]
    fn bf16_autocast_steps_track_the_f32_steps_and_keep_f32_master_weights() {
        let (vae, tcfg) = tiny_models();
        let mut g = Generator::new(8);
        let idx: Vec<Tensor> = [1usize, 2, 3]
            .iter()
            .map(|&pn| {
                let ids: Vec<i64> = g
                    .next_u32s(4 * pn * pn)
                    .into_iter()
                    .map(|w| (w % 16) as i64)
                    .collect();
                Tensor::from_vec(ids, [4, pn * pn], &Device::Cpu).unwrap()
            })
            .collect();
        let refs: Vec<&Tensor> = idx.iter().collect();
        let gt = ops::concat(&refs, 1).unwrap();
        let x_in = vae.idx_to_var_input(&idx).unwrap();
        let labels = [0i64, 1, 2, 0];
        let run = |autocast: Option<mvar_engine::DType>| {
            let cfg = ArTrainConfig {
                base_lr: 1e-2,
                batch: 256,
                total_steps: 20,
                warmup_steps: 2,
                autocast,
                ..Default::default()
            };
            let var = Var::new(tcfg.clone(), &Device::Cpu, 5, crate::Mixing::BlockCausal).unwrap();
            let mut tr = ArTrainer::new(ArModel::Var(var), cfg).unwrap();
            let mut rng = Generator::new(11);
            let losses: Vec<f64> = (0..20)
                .map(|_| tr.step(&labels, &gt, &x_in, &mut rng).unwrap().loss)
                .collect();
            for (name, p) in tr.model.var().params.iter() {
                assert_eq!(p.dtype(), mvar_engine::DType::F32, "{name}");
            }
            losses
        };
        let f32_losses = run(None);
        let bf16_losses = run(Some(mvar_engine::DType::BF16));
        assert_ne!(f32_losses, bf16_losses, "autocast changed nothing");
        for (i, (a, b)) in f32_losses.iter().zip(&bf16_losses).enumerate() {
            assert!(
                (a - b).abs() < 0.03 * a.abs(),
                "step {i}: f32 {a} vs bf16 {b}"
            );
        }
        assert!(bf16_losses[19] < 0.8 * bf16_losses[0], "{bf16_losses:?}");
    }

    /// Every parameter's values, in the store's order.
    fn all_weights(tr: &ArTrainer) -> Vec<f32> {
        tr.model
            .var()
            .params
            .iter()
            .flat_map(|(_, p)| p.to_vec_f32().unwrap())
            .collect()
    }

    /// Labels, target tokens and teacher-forcing input of 7 random token maps of the tiny
    /// models' 1, 2, 3 pyramid (16 codes).
    fn seven_token_maps(vae: &crate::VqVae, seed: u64) -> ([i64; 7], Tensor, Tensor) {
        let mut g = Generator::new(seed);
        let b = 7;
        let idx: Vec<Tensor> = [1usize, 2, 3]
            .iter()
            .map(|&pn| {
                let ids: Vec<i64> = g
                    .next_u32s(b * pn * pn)
                    .into_iter()
                    .map(|w| (w % 16) as i64)
                    .collect();
                Tensor::from_vec(ids, [b, pn * pn], &Device::Cpu).unwrap()
            })
            .collect();
        let refs: Vec<&Tensor> = idx.iter().collect();
        let gt = ops::concat(&refs, 1).unwrap();
        let x_in = vae.idx_to_var_input(&idx).unwrap();
        ([0, 1, 2, 0, 1, 2, 2], gt, x_in)
    }

    #[test]
    fn micro_batches_add_up_to_the_whole_batch() {
        let (vae, mut tcfg) = tiny_models();
        // Without label dropout and drop-path the passes see exactly the whole batch's inputs.
        tcfg.cond_drop_rate = 0.0;
        tcfg.drop_path_rate = 0.0;
        let (labels, gt, x_in) = seven_token_maps(&vae, 21);
        let mvar_cfg = crate::MvarConfig {
            refine_step: 2,
            kernel_size: 3,
            ratio_k: 1,
        };
        for mvar in [false, true] {
            let run = |micro_batch: usize| {
                let model = if mvar {
                    ArModel::Mvar(
                        Mvar::new(tcfg.clone(), mvar_cfg.clone(), &Device::Cpu, 5).unwrap(),
                    )
                } else {
                    ArModel::Var(
                        Var::new(tcfg.clone(), &Device::Cpu, 5, crate::Mixing::BlockCausal)
                            .unwrap(),
                    )
                };
                let cfg = ArTrainConfig {
                    base_lr: 1e-2,
                    batch: 256,
                    total_steps: 4,
                    warmup_steps: 1,
                    micro_batch,
                    ..Default::default()
                };
                let mut tr = ArTrainer::new(model, cfg).unwrap();
                let mut rng = Generator::new(2);
                // Two steps of MVAR cover two segments.
                let stats: Vec<ArStepStats> = (0..2)
                    .map(|_| tr.step(&labels, &gt, &x_in, &mut rng).unwrap())
                    .collect();
                let weights = all_weights(&tr);
                (stats, weights)
            };
            let (whole, w_whole) = run(0);
            for micro in [1, 3, 7, 100] {
                let (parts, w_parts) = run(micro);
                for (a, b) in whole.iter().zip(&parts) {
                    assert!(
                        (a.loss - b.loss).abs() < 1e-6 * a.loss,
                        "mvar {mvar} micro {micro}: {a:?} vs {b:?}"
                    );
                    assert!(
                        (a.grad_norm - b.grad_norm).abs() < 1e-5 * a.grad_norm,
                        "{a:?} vs {b:?}"
                    );
                    assert_eq!((a.accuracy, &a.scales), (b.accuracy, &b.scales));
                }
                let worst = mvar_ops::testing::max_abs_diff_f32(&w_whole, &w_parts);
                assert!(
                    worst < 1e-5,
                    "mvar {mvar} micro {micro}: weights differ by {worst}"
                );
            }
        }
    }

    #[test]
    fn a_step_out_of_gpu_memory_runs_again_in_halved_passes() {
        let (vae, mut tcfg) = tiny_models();
        // Label dropout and drop-path on: a retry must draw what the first try drew.
        tcfg.cond_drop_rate = 0.5;
        tcfg.drop_path_rate = 0.3;
        let (labels, gt, x_in) = seven_token_maps(&vae, 23);
        let run = |micro_batch: usize, shrink: bool, fail_over: Option<usize>| {
            let model = ArModel::Var(
                Var::new(tcfg.clone(), &Device::Cpu, 5, crate::Mixing::BlockCausal).unwrap(),
            );
            let cfg = ArTrainConfig {
                base_lr: 1e-2,
                batch: 256,
                total_steps: 4,
                warmup_steps: 1,
                micro_batch,
                shrink_on_oom: shrink,
                ..Default::default()
            };
            let mut tr = ArTrainer::new(model, cfg).unwrap();
            tr.fail_passes_over = fail_over;
            let mut rng = Generator::new(2);
            let stats: Result<Vec<ArStepStats>> = (0..2)
                .map(|_| tr.step(&labels, &gt, &x_in, &mut rng))
                .collect();
            let weights = all_weights(&tr);
            (stats, weights, tr.config.micro_batch, rng.state())
        };
        // Passes of 7 and then 4 sequences fail; 2 fit: the steps are those of passes of 2,
        // to the bit, and the trainer keeps passes of 2.
        let (want, w_want, _, rng_want) = run(2, false, None);
        let (got, w_got, kept, rng_got) = run(0, true, Some(2));
        assert_eq!(got.unwrap(), want.unwrap());
        assert_eq!(w_got, w_want);
        assert_eq!(kept, 2);
        assert_eq!(rng_got, rng_want);
        // Without the setting, or once a pass of one sequence fails, the error is the GPU's.
        let (no_shrink, ..) = run(0, false, Some(2));
        assert!(no_shrink.unwrap_err().is_out_of_memory());
        let (one_too_many, _, kept, _) = run(0, true, Some(0));
        assert!(one_too_many.unwrap_err().is_out_of_memory());
        assert_eq!(kept, 1);
    }

    #[test]
    fn a_nan_loss_stops_before_the_update() {
        let (vae, tcfg) = tiny_models();
        let var = Var::new(tcfg, &Device::Cpu, 5, crate::Mixing::BlockCausal).unwrap();
        let w = var.params.get("head.bias").unwrap().clone();
        w.copy_from(&Tensor::full(f64::NAN, w.shape().clone(), w.dtype(), w.device()).unwrap())
            .unwrap();
        let before = var
            .params
            .get("word_embed.weight")
            .unwrap()
            .to_vec_f32()
            .unwrap();
        let mut tr = ArTrainer::new(ArModel::Var(var), ArTrainConfig::default()).unwrap();
        let idx: Vec<Tensor> = [1usize, 2, 3]
            .iter()
            .map(|&pn| Tensor::zeros([1, pn * pn], mvar_engine::DType::I64, &Device::Cpu).unwrap())
            .collect();
        let refs: Vec<&Tensor> = idx.iter().collect();
        let gt = ops::concat(&refs, 1).unwrap();
        let x_in = vae.idx_to_var_input(&idx).unwrap();
        let e = tr
            .step(&[0], &gt, &x_in, &mut Generator::new(0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("NaN") && e.contains("step 1"), "{e}");
        assert_eq!(
            tr.model
                .var()
                .params
                .get("word_embed.weight")
                .unwrap()
                .to_vec_f32()
                .unwrap(),
            before
        );
    }

    #[test]
    fn the_official_no_decay_set() {
        let t2 = Tensor::zeros([2, 2], mvar_engine::DType::F32, &Device::Cpu).unwrap();
        let t1 = Tensor::zeros([2], mvar_engine::DType::F32, &Device::Cpu).unwrap();
        assert!(no_weight_decay("blocks.0.attn.proj.bias", &t1));
        assert!(no_weight_decay("pos_1LC", &t2));
        assert!(no_weight_decay("blocks.3.attn.scale_mul_1H11", &t2));
        assert!(no_weight_decay("lvl_embed.weight", &t2));
        assert!(!no_weight_decay("class_emb.weight", &t2));
        assert!(!no_weight_decay("blocks.0.ffn.fc1.weight", &t2));
    }
}
