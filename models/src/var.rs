//! The VAR transformer (spec sections 2-4), with the official parameter names. MVAR uses the
//! same modules and weights; only the token mixing of a forward pass differs ([`Mixing`]).
//!
//! Tokens: L = sum pn^2 over the pyramid, scale-major, row-major inside a scale. Token 0..first_l
//! is the start token: class_emb(label) + pos_start; every other token is word_embed of the
//! teacher-forcing input (the area-downsampled accumulated f_hat, spec 1.7). Every token then gets
//! lvl_embed(its scale) + pos_1LC[its position].
//!
//! Block (AdaLNSelfAttn): the condition cond = class_emb(label) gives six vectors through
//! SiLU -> Linear(D, 6C), in the order gamma1, gamma2, scale1, scale2, shift1, shift2 (or, with
//! shared AdaLN, one SiLU -> Linear for all blocks plus a per-block learned `ada_gss`):
//!   x += drop_path(attn(LN(x) (1 + scale1) + shift1) gamma1)
//!   x += drop_path(ffn(LN(x) (1 + scale2) + shift2) gamma2)
//! LayerNorm has no affine parameters (eps 1e-6). Attention: qkv = x W^T + [q_bias, 0, v_bias]
//! (k has no bias), heads of 64; with attn_l2_norm q <- normalize(q) exp(min(theta_h, ln 100)),
//! k <- normalize(k) and softmax scale 1. FFN: Linear -> GELU(tanh) -> Linear. Head: SiLU ->
//! Linear(D, 2C) gives (scale, shift); logits = head(LN(x) (1 + scale) + shift).

use std::ops::Range;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use mvar_engine::{no_grad, DType, Device, Error, Generator, ParamStore, Result, Tensor};
use mvar_ops::{self as ops, AttnMask};
use serde::{Deserialize, Serialize};

use crate::nn::{Builder, Embedding, Init, Linear};
use crate::VqVae;

/// Everything that shapes a VAR / MVAR transformer. Field names follow the official constructor
/// (and accept the fixture manifest's `V` and `Cvae`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VarConfig {
    pub depth: usize,
    /// Width C; 0 means the official 64 * depth.
    #[serde(default)]
    pub embed_dim: usize,
    /// Heads; 0 means the official `depth` (head dim 64).
    #[serde(default)]
    pub num_heads: usize,
    #[serde(default = "d_mlp")]
    pub mlp_ratio: f64,
    #[serde(default = "d_classes")]
    pub num_classes: usize,
    #[serde(default = "d_pn")]
    pub patch_nums: Vec<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub shared_aln: bool,
    #[serde(default = "d_true")]
    pub attn_l2_norm: bool,
    #[serde(default = "d_cond_drop")]
    pub cond_drop_rate: f64,
    /// Negative means the official 0.1 * depth / 24.
    #[serde(default = "d_neg")]
    pub drop_path_rate: f64,
    #[serde(default = "d_cvae", alias = "Cvae")]
    pub cvae: usize,
    #[serde(default = "d_vocab", alias = "V")]
    pub vocab_size: usize,
    /// Initialisation (`alng`, `aln`, `hd` of the official trainer).
    #[serde(default = "d_alng")]
    pub init_adaln_gamma: f64,
    #[serde(default = "d_aln")]
    pub init_adaln: f64,
    #[serde(default = "d_hd")]
    pub init_head: f64,
}

fn d_mlp() -> f64 {
    4.0
}
fn d_classes() -> usize {
    1000
}
fn d_pn() -> Vec<usize> {
    vec![1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
}
fn d_eps() -> f64 {
    1e-6
}
fn d_true() -> bool {
    true
}
fn d_cond_drop() -> f64 {
    0.1
}
fn d_neg() -> f64 {
    -1.0
}
fn d_cvae() -> usize {
    32
}
fn d_vocab() -> usize {
    4096
}
fn d_alng() -> f64 {
    1e-3
}
fn d_aln() -> f64 {
    0.5
}
fn d_hd() -> f64 {
    0.02
}

impl VarConfig {
    /// VAR-d`depth` with the official defaults (width 64 * depth, depth heads).
    pub fn with_depth(depth: usize) -> Self {
        serde_json::from_value(serde_json::json!({ "depth": depth })).expect("defaults")
    }

    pub fn width(&self) -> usize {
        if self.embed_dim == 0 {
            64 * self.depth
        } else {
            self.embed_dim
        }
    }

    pub fn heads(&self) -> usize {
        if self.num_heads == 0 {
            self.depth
        } else {
            self.num_heads
        }
    }

    pub fn head_dim(&self) -> usize {
        self.width() / self.heads().max(1)
    }

    /// L = sum pn^2.
    pub fn total_tokens(&self) -> usize {
        self.patch_nums.iter().map(|p| p * p).sum()
    }

    pub fn first_l(&self) -> usize {
        self.patch_nums.first().map(|p| p * p).unwrap_or(0)
    }

    /// (begin, end) token offsets of every scale.
    pub fn begin_ends(&self) -> Vec<(usize, usize)> {
        let mut cur = 0;
        self.patch_nums
            .iter()
            .map(|p| {
                let r = (cur, cur + p * p);
                cur += p * p;
                r
            })
            .collect()
    }

    /// Drop-path rate of every block: linspace(0, rate, depth).
    pub fn drop_path_rates(&self) -> Vec<f64> {
        let rate = if self.drop_path_rate < 0.0 {
            0.1 * self.depth as f64 / 24.0
        } else {
            self.drop_path_rate
        };
        let d = self.depth;
        (0..d)
            .map(|i| {
                if d <= 1 {
                    0.0
                } else {
                    rate * i as f64 / (d - 1) as f64
                }
            })
            .collect()
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid("VarConfig", m));
        if self.depth == 0 || self.heads() == 0 || !self.width().is_multiple_of(self.heads()) {
            return bad(format!(
                "depth {}, width {}, heads {}: expected heads dividing the width",
                self.depth,
                self.width(),
                self.heads()
            ));
        }
        if self.patch_nums.is_empty() || self.patch_nums.contains(&0) {
            return bad(format!(
                "patch_nums {:?}: expected positive scale sizes",
                self.patch_nums
            ));
        }
        if self.num_classes == 0 || self.vocab_size == 0 || self.cvae == 0 {
            return bad("num_classes, vocab_size and cvae must be positive".into());
        }
        if !(0.0..1.0).contains(&self.cond_drop_rate) {
            return bad(format!(
                "cond_drop_rate {}: expected [0, 1)",
                self.cond_drop_rate
            ));
        }
        // Negative selects the official default; a rate of 1 would drop every residual branch.
        if self.drop_path_rate.is_nan() || self.drop_path_rate >= 1.0 {
            return bad(format!(
                "drop_path_rate {}: expected a rate below 1 (negative: the official 0.1 * depth / 24)",
                self.drop_path_rate
            ));
        }
        Ok(())
    }
}

/// How the tokens of one forward pass attend to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mixing {
    /// VAR training: a token sees every token of its own and earlier scales.
    BlockCausal,
    /// MVAR's scale-Markov attention: a token sees only its own scale.
    BlockDiagonal,
    /// MVAR's spatial-Markov attention on one scale: the `kernel` x `kernel` NATTEN window.
    Neighbourhood { kernel: usize },
}

#[derive(Clone)]
struct SelfAttention {
    mat_qkv: Tensor,
    q_bias: Tensor,
    v_bias: Tensor,
    zero_k_bias: Tensor,
    proj: Linear,
    /// [1, H, 1, 1] log multipliers (with attn_l2_norm).
    scale_mul: Option<Tensor>,
    heads: usize,
    head_dim: usize,
}

const MAX_SCALE_MUL: f64 = 4.605_170_185_988_092; // ln(100)

impl SelfAttention {
    fn new(b: &Builder, cfg: &VarConfig, init_std: f64) -> Result<Self> {
        let c = cfg.width();
        let h = cfg.heads();
        let proj_w = b.draw(
            [c, c],
            Init::Normal(init_std / (2.0 * cfg.depth as f64).sqrt()),
        )?;
        Ok(SelfAttention {
            mat_qkv: b
                .pp("mat_qkv")
                .param("weight", [3 * c, c], Init::Normal(init_std))?,
            q_bias: b.param("q_bias", [c], Init::Zeros)?,
            v_bias: b.param("v_bias", [c], Init::Zeros)?,
            zero_k_bias: b.buffer("zero_k_bias", [c], Init::Zeros)?,
            proj: Linear {
                weight: b.pp("proj").param_value("weight", &proj_w)?,
                bias: Some(b.pp("proj").param("bias", [c], Init::Zeros)?),
            },
            scale_mul: if cfg.attn_l2_norm {
                Some(b.param("scale_mul_1H11", [1, h, 1, 1], Init::Value(4f64.ln()))?)
            } else {
                None
            },
            heads: h,
            head_dim: c / h,
        })
    }

    fn scale(&self) -> f64 {
        if self.scale_mul.is_some() {
            1.0
        } else {
            0.25 / (self.head_dim as f64).sqrt()
        }
    }

    /// q, k, v as [B, H, T, hd] (q and k normalised and scaled when attn_l2_norm).
    fn qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t) = (x.dims()[0], x.dims()[1]);
        let bias = ops::concat(&[&self.q_bias, &self.zero_k_bias, &self.v_bias], 0)?;
        let qkv = ops::linear(x, &self.mat_qkv, Some(&bias))?.reshape([
            b,
            t,
            3,
            self.heads,
            self.head_dim,
        ])?;
        let qkv = ops::permute(&qkv, &[2, 0, 3, 1, 4])?;
        let parts = ops::split(&qkv, &[1, 1, 1], 0)?;
        let shape = [b, self.heads, t, self.head_dim];
        let (mut q, mut k, v) = (
            parts[0].reshape(shape)?,
            parts[1].reshape(shape)?,
            parts[2].reshape(shape)?,
        );
        if let Some(sm) = &self.scale_mul {
            let mul = ops::exp(&ops::clamp(sm, -1e30, MAX_SCALE_MUL)?)?;
            q = ops::mul(&ops::l2_normalize(&q, 1e-12)?, &mul)?;
            k = ops::l2_normalize(&k, 1e-12)?;
        }
        Ok((q, k, v))
    }

    fn merge(&self, o: &Tensor) -> Result<Tensor> {
        let (b, t) = (o.dims()[0], o.dims()[2]);
        let o = ops::permute(o, &[0, 2, 1, 3])?.reshape([b, t, self.heads * self.head_dim])?;
        self.proj.forward(&o)
    }

    /// Attention over the tokens of `scales` (their sides given) with `mixing`.
    fn forward(&self, x: &Tensor, sides: &[usize], mixing: Mixing) -> Result<Tensor> {
        let (q, k, v) = self.qkv(x)?;
        let lens: Vec<usize> = sides.iter().map(|p| p * p).collect();
        let o = match mixing {
            Mixing::BlockCausal => {
                ops::attention(&q, &k, &v, self.scale(), &AttnMask::BlockCausal(lens))?
            }
            Mixing::BlockDiagonal => {
                ops::attention(&q, &k, &v, self.scale(), &AttnMask::BlockDiagonal(lens))?
            }
            Mixing::Neighbourhood { kernel } => {
                let [side] = sides else {
                    return Err(Error::invalid(
                        "VAR attention",
                        format!(
                            "neighbourhood attention over {} scales; expected one",
                            sides.len()
                        ),
                    ));
                };
                let (b, h, hd) = (q.dims()[0], self.heads, self.head_dim);
                let grid = [b, h, *side, *side, hd];
                let o = ops::na2d(
                    &q.reshape(grid)?,
                    &k.reshape(grid)?,
                    &v.reshape(grid)?,
                    kernel,
                    self.scale(),
                )?;
                o.reshape([b, h, side * side, hd])?
            }
        };
        self.merge(&o)
    }

    /// Inference with a KV cache: the new tokens attend to every cached token and themselves.
    fn forward_cached(&self, x: &Tensor, cache: &mut Option<(Tensor, Tensor)>) -> Result<Tensor> {
        let (q, k, v) = self.qkv(x)?;
        let (k, v) = match cache.take() {
            None => (k, v),
            Some((ck, cv)) => (ops::concat(&[&ck, &k], 2)?, ops::concat(&[&cv, &v], 2)?),
        };
        let o = ops::attention(&q, &k, &v, self.scale(), &AttnMask::None)?;
        *cache = Some((k, v));
        self.merge(&o)
    }
}

#[derive(Clone)]
struct Block {
    attn: SelfAttention,
    fc1: Linear,
    fc2: Linear,
    /// SiLU -> Linear(D, 6C) (`ada_lin.1`), or None with shared AdaLN.
    ada_lin: Option<Linear>,
    /// [1, 1, 6, C] with shared AdaLN.
    ada_gss: Option<Tensor>,
    drop_path: f64,
    eps: f64,
    width: usize,
}

impl Block {
    fn new(b: &Builder, cfg: &VarConfig, init_std: f64, drop_path: f64) -> Result<Self> {
        let c = cfg.width();
        let hidden = (c as f64 * cfg.mlp_ratio).round() as usize;
        let fc2_w = b.pp("ffn").pp("fc2").draw(
            [c, hidden],
            Init::Normal(init_std / (2.0 * cfg.depth as f64).sqrt()),
        )?;
        let (ada_lin, ada_gss) = if cfg.shared_aln {
            let g = b.draw([1, 1, 6, c], Init::Normal(1.0 / (c as f64).sqrt()))?;
            let scaled = scale_ada_rows(&g, 2, cfg)?;
            (None, Some(b.param_value("ada_gss", &scaled)?))
        } else {
            let lb = b.pp("ada_lin").pp(1);
            let w = lb.draw([6 * c, c], Init::Normal(init_std))?;
            let scaled = scale_ada_rows(&w.reshape([1, 6, c, c])?, 1, cfg)?.reshape([6 * c, c])?;
            (
                Some(Linear {
                    weight: lb.param_value("weight", &scaled)?,
                    bias: Some(lb.param("bias", [6 * c], Init::Zeros)?),
                }),
                None,
            )
        };
        Ok(Block {
            attn: SelfAttention::new(&b.pp("attn"), cfg, init_std)?,
            fc1: Linear {
                weight: b.pp("ffn").pp("fc1").param(
                    "weight",
                    [hidden, c],
                    Init::Normal(init_std),
                )?,
                bias: Some(b.pp("ffn").pp("fc1").param("bias", [hidden], Init::Zeros)?),
            },
            fc2: Linear {
                weight: b.pp("ffn").pp("fc2").param_value("weight", &fc2_w)?,
                bias: Some(b.pp("ffn").pp("fc2").param("bias", [c], Init::Zeros)?),
            },
            ada_lin,
            ada_gss,
            drop_path,
            eps: cfg.norm_eps,
            width: c,
        })
    }

    /// The six modulation vectors [B, 1, 6, C] of this block.
    fn modulation(&self, cond: &Tensor, shared: Option<&Tensor>) -> Result<Tensor> {
        let b = cond.dims()[0];
        match (&self.ada_lin, &self.ada_gss, shared) {
            (Some(lin), _, _) => lin
                .forward(&ops::silu(cond)?)?
                .reshape([b, 1, 6, self.width]),
            (None, Some(gss), Some(s)) => ops::add(gss, s),
            _ => Err(Error::invalid(
                "VAR block",
                "shared AdaLN without the shared modulation",
            )),
        }
    }

    fn ffn(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&ops::gelu_tanh(&self.fc1.forward(x)?)?)
    }

    /// One block; `mix` runs the attention on the modulated input.
    fn forward(
        &self,
        x: &Tensor,
        ada: &Tensor,
        rng: Option<&mut Generator>,
        mix: impl FnOnce(&SelfAttention, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let b = ada.dims()[0];
        let parts = ops::split(ada, &[1; 6], 2)?;
        let v: Vec<Tensor> = parts
            .iter()
            .map(|p| p.reshape([b, 1, self.width]))
            .collect::<Result<_>>()?;
        let (gamma1, gamma2, scale1, scale2, shift1, shift2) =
            (&v[0], &v[1], &v[2], &v[3], &v[4], &v[5]);
        let modulate = |x: &Tensor, scale: &Tensor, shift: &Tensor| -> Result<Tensor> {
            ops::add(
                &ops::mul(
                    &ops::layer_norm(x, self.eps)?,
                    &ops::add_scalar(scale, 1.0)?,
                )?,
                shift,
            )
        };
        let mut rng = rng;
        let drop = |t: Tensor, rng: &mut Option<&mut Generator>| -> Result<Tensor> {
            match rng {
                Some(g) if self.drop_path > 0.0 => ops::drop_path(&t, self.drop_path, g),
                _ => Ok(t),
            }
        };
        let a = ops::mul(&mix(&self.attn, &modulate(x, scale1, shift1)?)?, gamma1)?;
        let x = ops::add(x, &drop(a, &mut rng)?)?;
        let f = ops::mul(&self.ffn(&modulate(&x, scale2, shift2)?)?, gamma2)?;
        ops::add(&x, &drop(f, &mut rng)?)
    }
}

impl Block {
    /// [`Block::forward`] over `sides` with `mixing`, its activations recomputed in the backward
    /// (see [`Var::set_recompute_blocks`]). Drop-path draws from `rng`: both runs start from a
    /// snapshot of it, so they draw the same masks, and `rng` leaves in the state the plain
    /// forward would leave it in.
    fn forward_recomputed(
        &self,
        x: &Tensor,
        ada: &Tensor,
        rng: Option<&mut Generator>,
        sides: &[usize],
        mixing: Mixing,
    ) -> Result<Tensor> {
        let snapshot = rng.as_deref().cloned();
        let after_run: Arc<Mutex<Option<Generator>>> = Arc::new(Mutex::new(None));
        let (block, sides, after) = (self.clone(), sides.to_vec(), after_run.clone());
        let out = mvar_engine::recomputed(&[x, ada], move |t| {
            let mut g = snapshot.clone();
            let y = block.forward(&t[0], &t[1], g.as_mut(), |attn, h| {
                attn.forward(h, &sides, mixing)
            })?;
            *after.lock().unwrap_or_else(|e| e.into_inner()) = g;
            Ok(y)
        })?;
        if let (Some(r), Some(g)) = (
            rng,
            after_run.lock().unwrap_or_else(|e| e.into_inner()).take(),
        ) {
            *r = g;
        }
        Ok(out)
    }
}

/// Multiplies rows [2:] of axis `axis` (size 6, the gamma/scale/shift slots) by init_adaln and
/// rows [:2] (the gammas) by init_adaln_gamma: the official init of the AdaLN weights.
fn scale_ada_rows(w: &Tensor, axis: usize, cfg: &VarConfig) -> Result<Tensor> {
    let _ng = no_grad();
    let parts = ops::split(w, &[2, 4], axis as isize)?;
    let g = ops::mul_scalar(&parts[0], cfg.init_adaln_gamma)?;
    let r = ops::mul_scalar(&parts[1], cfg.init_adaln)?;
    ops::concat(&[&g, &r], axis as isize)
}

/// What sampling produced.
#[derive(Debug)]
pub struct SampleOutput {
    /// Token maps per scale, i64 [B, pn^2].
    pub idx: Vec<Tensor>,
    /// The final f_hat [B, Cvae, h, w] (decode it with [`VqVae::fhat_to_img`]).
    pub f_hat: Tensor,
}

/// Sampling settings (spec 4).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleConfig {
    /// Guidance strength; the ramp is t = cfg * si / (K - 1).
    pub cfg: f64,
    /// Keep the `top_k` largest logits (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of logits with probability mass >= top_p (0 = all).
    pub top_p: f64,
    /// The official `more_smooth` (visualisation only, not for FID): f_hat grows by a
    /// Gumbel-softmax mixture of codes instead of the drawn code ([`smooth_codes`]). The drawn
    /// tokens are still returned, but no longer decode to the image.
    pub more_smooth: bool,
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig {
            cfg: 1.5,
            top_k: 900,
            top_p: 0.96,
            more_smooth: false,
        }
    }
}

/// The class condition of a sampling run and what it gives every scale ([`Var::conditioning`]).
pub(crate) struct Conditioning {
    /// class_emb(label) [B, C].
    pub(crate) cond: Tensor,
    /// Each block's AdaLN modulation.
    blocks: Vec<Tensor>,
    /// The head's (1 + scale, shift).
    head: (Tensor, Tensor),
}

pub struct Var {
    pub config: VarConfig,
    word_embed: Linear,
    class_emb: Embedding,
    pos_start: Tensor,
    pos_1lc: Tensor,
    lvl_embed: Embedding,
    shared_ada_lin: Option<Linear>,
    blocks: Vec<Block>,
    head_nm_ada_lin: Linear,
    head: Linear,
    pub params: ParamStore,
    pub buffers: Vec<(String, Tensor)>,
    /// Activation recomputation in training: see [`Var::set_recompute_blocks`].
    recompute_blocks: AtomicBool,
}

impl Var {
    /// A transformer with the official initialisation drawn from `seed`. `mask_kind` is stored as
    /// the official `attn_bias_for_masking` buffer (VAR: block-causal; MVAR: block-diagonal) so
    /// that saved checkpoints load in the official code.
    pub fn new(config: VarConfig, device: &Device, seed: u64, mask_kind: Mixing) -> Result<Self> {
        config.validate()?;
        let b = Builder::new(device, DType::F32, seed);
        let c = config.width();
        let l = config.total_tokens();
        let init_std = (1.0 / c as f64 / 3.0).sqrt();
        let head_nm_w = b
            .pp("head_nm")
            .pp("ada_lin")
            .pp(1)
            .draw([2 * c, c], Init::Normal(init_std * config.init_adaln))?;
        let head_w = b.pp("head").draw(
            [config.vocab_size, c],
            Init::Normal(init_std * config.init_head),
        )?;
        let shared_ada_lin = if config.shared_aln {
            let sb = b.pp("shared_ada_lin").pp(1);
            Some(Linear {
                weight: sb.param("weight", [6 * c, c], Init::Normal(init_std))?,
                bias: Some(sb.param("bias", [6 * c], Init::Zeros)?),
            })
        } else {
            None
        };
        let rates = config.drop_path_rates();
        let blocks = (0..config.depth)
            .map(|i| Block::new(&b.pp("blocks").pp(i), &config, init_std, rates[i]))
            .collect::<Result<Vec<_>>>()?;
        let var_parts = (
            Linear {
                weight: b.pp("word_embed").param(
                    "weight",
                    [c, config.cvae],
                    Init::Normal(init_std),
                )?,
                bias: Some(b.pp("word_embed").param("bias", [c], Init::Zeros)?),
            },
            Embedding::new(
                &b.pp("class_emb"),
                config.num_classes + 1,
                c,
                Init::Normal(init_std),
            )?,
            b.param(
                "pos_start",
                [1, config.first_l(), c],
                Init::Normal(init_std),
            )?,
            b.param("pos_1LC", [1, l, c], Init::Normal(init_std))?,
            Embedding::new(
                &b.pp("lvl_embed"),
                config.patch_nums.len(),
                c,
                Init::Normal(init_std),
            )?,
        );
        let head_nm_ada_lin = Linear {
            weight: b
                .pp("head_nm")
                .pp("ada_lin")
                .pp(1)
                .param_value("weight", &head_nm_w)?,
            bias: Some(
                b.pp("head_nm")
                    .pp("ada_lin")
                    .pp(1)
                    .param("bias", [2 * c], Init::Zeros)?,
            ),
        };
        let head = Linear {
            weight: b.pp("head").param_value("weight", &head_w)?,
            bias: Some(
                b.pp("head")
                    .param("bias", [config.vocab_size], Init::Zeros)?,
            ),
        };
        // Persistent buffers of the official model.
        let lvl: Vec<i64> = config
            .patch_nums
            .iter()
            .enumerate()
            .flat_map(|(i, p)| std::iter::repeat_n(i as i64, p * p))
            .collect();
        b.buffer_value(
            "lvl_1L",
            Tensor::from_vec(lvl.clone(), [1, l], &Device::Cpu)?,
        )?;
        let allowed = |i: usize, j: usize| match mask_kind {
            Mixing::BlockCausal => lvl[i] >= lvl[j],
            _ => lvl[i] == lvl[j],
        };
        let mask: Vec<f32> = (0..l * l)
            .map(|p| {
                if allowed(p / l, p % l) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        b.buffer_value(
            "attn_bias_for_masking",
            Tensor::from_vec(mask, [1, 1, l, l], &Device::Cpu)?,
        )?;
        let (params, buffers) = b.finish();
        let (word_embed, class_emb, pos_start, pos_1lc, lvl_embed) = var_parts;
        Ok(Var {
            config,
            word_embed,
            class_emb,
            pos_start,
            pos_1lc,
            lvl_embed,
            shared_ada_lin,
            blocks,
            head_nm_ada_lin,
            head,
            params,
            buffers,
            recompute_blocks: AtomicBool::new(false),
        })
    }

    /// Activation recomputation (gradient checkpointing) for training: with it on, a forward
    /// that records a graph keeps only each block's input and output, and the backward runs each
    /// block again to get its gradient. Memory: the blocks' saved activations (most of a
    /// training step's peak) become one block's; time: one more forward of the blocks per step.
    /// The gradients are those of the plain graph (drop-path masks are replayed from a snapshot
    /// of the generator). Off by default; a run-time setting, not part of the checkpoint.
    pub fn set_recompute_blocks(&self, on: bool) {
        self.recompute_blocks.store(on, Ordering::Relaxed);
    }

    pub fn recompute_blocks(&self) -> bool {
        self.recompute_blocks.load(Ordering::Relaxed)
    }

    /// Every tensor a checkpoint holds, by official name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .chain(self.buffers.iter().cloned())
            .collect()
    }

    /// Loads weights by official name (every parameter required with its shape; buffers are
    /// recomputed from the config, so the file's copies are accepted and ignored).
    pub fn load(&self, path: &std::path::Path) -> Result<crate::checkpoint::LoadReport> {
        let source = crate::checkpoint::read_safetensors(path)?;
        self.load_tensors(&source, &format!("VAR checkpoint {}", path.display()))
    }

    /// [`Var::load`] from tensors already read (`what` names their source in errors).
    pub fn load_tensors(
        &self,
        source: &std::collections::BTreeMap<String, Tensor>,
        what: &str,
    ) -> Result<crate::checkpoint::LoadReport> {
        let params: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        let mut report = crate::checkpoint::load_into(what, &params, source, false)?;
        report
            .unexpected
            .retain(|n| !self.buffers.iter().any(|(b, _)| b == n));
        Ok(report)
    }

    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        crate::checkpoint::write_safetensors(path, &self.named_tensors(), None)
    }

    pub fn device(&self) -> &Device {
        self.pos_1lc.device()
    }

    /// Labels with the null class (`num_classes`) substituted with probability `rate` (one
    /// uniform per sample), as the official forward does even in eval mode.
    pub fn drop_labels(&self, labels: &[i64], rate: f64, rng: &mut Generator) -> Vec<i64> {
        let u = rng.uniform(labels.len(), 0.0, 1.0);
        labels
            .iter()
            .zip(u)
            .map(|(&l, u)| {
                if u < rate {
                    self.config.num_classes as i64
                } else {
                    l
                }
            })
            .collect()
    }

    fn check_labels(&self, labels: &Tensor) -> Result<()> {
        if labels.dtype() != DType::I64 || labels.rank() != 1 {
            return Err(Error::dtype("VAR", labels.dtype(), "i64 labels [B]"));
        }
        if let Some(&bad) = labels
            .to_vec::<i64>()?
            .iter()
            .find(|&&l| l < 0 || l as usize > self.config.num_classes)
        {
            return Err(Error::IndexOutOfRange {
                op: "VAR",
                what: "class label",
                index: bad,
                size: self.config.num_classes + 1,
            });
        }
        Ok(())
    }

    /// lvl_embed(scale) + pos_1LC for tokens [bg, ed): [1, ed - bg, C].
    fn lvl_pos(&self, bg: usize, ed: usize) -> Result<Tensor> {
        let lvl: Vec<i64> = self
            .config
            .begin_ends()
            .iter()
            .enumerate()
            .flat_map(|(i, (b, e))| std::iter::repeat_n(i as i64, e - b))
            .collect();
        let ids = Tensor::from_vec(lvl[bg..ed].to_vec(), [ed - bg], self.device())?;
        let lv = self
            .lvl_embed
            .forward(&ids)?
            .reshape([1, ed - bg, self.config.width()])?;
        ops::add(&lv, &ops::narrow(&self.pos_1lc, 1, bg, ed - bg)?)
    }

    /// Token embeddings of scales `scales` from the teacher-forcing input `x_in` [B, L - first_l,
    /// Cvae] and the condition `cond` [B, C].
    fn embed(&self, cond: &Tensor, x_in: &Tensor, scales: &Range<usize>) -> Result<Tensor> {
        let be = self.config.begin_ends();
        let (bg, ed) = (be[scales.start].0, be[scales.end - 1].1);
        let first_l = self.config.first_l();
        let b = cond.dims()[0];
        let c = self.config.width();
        let mut parts = Vec::new();
        if bg == 0 {
            let sos = ops::add(&cond.reshape([b, 1, c])?, &self.pos_start)?;
            parts.push(sos);
        }
        let from = bg.max(first_l);
        if ed > from {
            let xs = ops::narrow(x_in, 1, from - first_l, ed - from)?;
            parts.push(self.word_embed.forward(&xs)?);
        }
        let refs: Vec<&Tensor> = parts.iter().collect();
        let h = ops::concat(&refs, 1)?;
        ops::add(&h, &self.lvl_pos(bg, ed)?)
    }

    fn shared(&self, cond: &Tensor) -> Result<Option<Tensor>> {
        match &self.shared_ada_lin {
            Some(lin) => {
                let b = cond.dims()[0];
                Ok(Some(lin.forward(&ops::silu(cond)?)?.reshape([
                    b,
                    1,
                    6,
                    self.config.width(),
                ])?))
            }
            None => Ok(None),
        }
    }

    /// logits = head(LN(h) (1 + scale) + shift), [B, T, V].
    fn logits(&self, h: &Tensor, cond: &Tensor) -> Result<Tensor> {
        self.modulated_logits(h, &self.head_modulation(cond)?)
    }

    /// The head's (1 + scale, shift) from the condition, each [B, 1, C].
    fn head_modulation(&self, cond: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, c) = (cond.dims()[0], self.config.width());
        let ss = self
            .head_nm_ada_lin
            .forward(&ops::silu(cond)?)?
            .reshape([b, 1, 2, c])?;
        let parts = ops::split(&ss, &[1, 1], 2)?;
        Ok((
            ops::add_scalar(&parts[0].reshape([b, 1, c])?, 1.0)?,
            parts[1].reshape([b, 1, c])?,
        ))
    }

    /// [`Var::logits`] with the head's modulation given.
    fn modulated_logits(&self, h: &Tensor, (scale, shift): &(Tensor, Tensor)) -> Result<Tensor> {
        let x = ops::add(
            &ops::mul(&ops::layer_norm(h, self.config.norm_eps)?, scale)?,
            shift,
        )?;
        self.head.forward(&x)
    }

    /// What the class condition gives every scale of a sampling run (each block's AdaLN
    /// modulation, the head's), computed once: it does not depend on the scale (the official
    /// samplers compute it again for each scale, 8 % of MVAR-d16's sampling time on the CPU).
    pub(crate) fn conditioning(&self, labels: &Tensor) -> Result<Conditioning> {
        let cond = self.class_emb.forward(labels)?;
        let shared = self.shared(&cond)?;
        let blocks = self
            .blocks
            .iter()
            .map(|b| b.modulation(&cond, shared.as_ref()))
            .collect::<Result<_>>()?;
        let head = self.head_modulation(&cond)?;
        Ok(Conditioning { cond, blocks, head })
    }

    /// Teacher-forced logits of the tokens of `scales` [B, T, V] with the given token mixing.
    /// `labels` \[B\] i64 (already dropped to the null class where wanted); `x_in` the full
    /// teacher-forcing input [B, L - first_l, Cvae]; `rng` enables drop-path (training).
    pub fn forward_segment(
        &self,
        labels: &Tensor,
        x_in: &Tensor,
        scales: Range<usize>,
        mixing: Mixing,
        rng: Option<&mut Generator>,
    ) -> Result<Tensor> {
        self.check_labels(labels)?;
        let k = self.config.patch_nums.len();
        if scales.start >= scales.end || scales.end > k {
            return Err(Error::invalid(
                "VAR forward",
                format!("scales {scales:?} of a {k}-scale pyramid"),
            ));
        }
        let want = [
            labels.dims()[0],
            self.config.total_tokens() - self.config.first_l(),
            self.config.cvae,
        ];
        if x_in.dims() != want {
            return Err(Error::shape(
                "VAR forward",
                format!("teacher-forcing input {}", x_in.shape()),
                format!("{want:?}"),
            ));
        }
        let cond = self.class_emb.forward(labels)?;
        let mut h = self.embed(&cond, x_in, &scales)?;
        let shared = self.shared(&cond)?;
        let sides: Vec<usize> = self.config.patch_nums[scales.clone()].to_vec();
        let mut rng = rng;
        let recompute = self.recompute_blocks() && mvar_engine::is_grad_enabled();
        for block in &self.blocks {
            let ada = block.modulation(&cond, shared.as_ref())?;
            h = if recompute {
                block.forward_recomputed(&h, &ada, rng.as_deref_mut(), &sides, mixing)?
            } else {
                block.forward(&h, &ada, rng.as_deref_mut(), |attn, x| {
                    attn.forward(x, &sides, mixing)
                })?
            };
        }
        self.logits(&h, &cond)
    }

    /// VAR's teacher-forced logits over the whole pyramid (block-causal), [B, L, V].
    pub fn forward(
        &self,
        labels: &Tensor,
        x_in: &Tensor,
        rng: Option<&mut Generator>,
    ) -> Result<Tensor> {
        self.forward_segment(
            labels,
            x_in,
            0..self.config.patch_nums.len(),
            Mixing::BlockCausal,
            rng,
        )
    }

    /// Doubled labels for classifier-free guidance: labels, then the null class.
    fn cfg_labels(&self, labels: &[i64]) -> Result<Tensor> {
        let mut all = labels.to_vec();
        all.extend(std::iter::repeat_n(
            self.config.num_classes as i64,
            labels.len(),
        ));
        let t = Tensor::from_vec(all, [2 * labels.len()], self.device())?;
        self.check_labels(&t)?;
        Ok(t)
    }

    /// VAR sampling with a KV cache (spec 4): each scale runs only its own tokens through the
    /// blocks, attending to the cached keys/values of all earlier scales; the batch is doubled
    /// with the null class and the guided logits are (1 + t) cond - t uncond with
    /// t = cfg * si / (K - 1) (applied even when cfg = 1, as the official VAR does).
    pub fn sample(
        &self,
        vae: &VqVae,
        labels: &[i64],
        sc: SampleConfig,
        rng: &mut Generator,
    ) -> Result<SampleOutput> {
        let scales = self.config.patch_nums.len();
        self.decode_with(vae, labels, Some(sc.cfg), |si, logits| {
            sample_choice(vae, logits, si, scales, sc, rng)
        })
    }

    /// The KV-cache decoding loop with a pluggable choice of tokens: `choose(si, logits)` gets
    /// the (guided, when `cfg` is Some) logits [B, pn^2, V] of scale `si` and returns its tokens
    /// i64 [B, pn^2] (or a [`Choice`], whose codes, when given, f_hat grows by instead of the
    /// tokens'). With `cfg` None the batch is not doubled and the logits are the
    /// conditional ones. Sampling, teacher-forcing given tokens and zero-shot editing are all
    /// this loop with another `choose`.
    pub fn decode_with<C: Into<Choice>>(
        &self,
        vae: &VqVae,
        labels: &[i64],
        cfg: Option<f64>,
        mut choose: impl FnMut(usize, &Tensor) -> Result<C>,
    ) -> Result<SampleOutput> {
        let _ng = no_grad();
        self.check_vae(vae)?;
        let bsz = labels.len();
        if bsz == 0 {
            return Err(Error::invalid("VAR sampling", "no labels: a batch of 0"));
        }
        let k = self.config.patch_nums.len();
        let lab = match cfg {
            Some(_) => self.cfg_labels(labels)?,
            None => {
                let t = Tensor::from_vec(labels.to_vec(), [bsz], self.device())?;
                self.check_labels(&t)?;
                t
            }
        };
        let cond = self.conditioning(&lab)?;
        let mut next = self.start_tokens(&cond.cond)?;
        let mut caches: Vec<Option<(Tensor, Tensor)>> = vec![None; self.blocks.len()];
        let full = *self.config.patch_nums.last().unwrap_or(&1);
        let mut f_hat = Tensor::zeros(
            [bsz, self.config.cvae, full, full],
            DType::F32,
            self.device(),
        )?;
        let mut idxs = Vec::with_capacity(k);
        for (si, &pn) in self.config.patch_nums.iter().enumerate() {
            let _span = mvar_engine::profile::span(|| format!("VAR scale {si} ({pn}x{pn})"));
            let mut x = next.clone();
            for (block, (ada, cache)) in self
                .blocks
                .iter()
                .zip(cond.blocks.iter().zip(caches.iter_mut()))
            {
                x = block.forward(&x, ada, None, |attn, h| attn.forward_cached(h, cache))?;
            }
            let logits = self.modulated_logits(&x, &cond.head)?;
            let step = DecodeStep {
                what: "VAR decoding",
                si,
                scales: k,
                pn,
                bsz,
                cfg,
            };
            let (idx, fh, next_in) = step.run(vae, &logits, &f_hat, &mut choose)?;
            f_hat = fh;
            idxs.push(idx);
            if let Some(ni) = next_in {
                let emb = self.scale_tokens(si + 1, &ni)?;
                next = if cfg.is_some() {
                    ops::concat(&[&emb, &emb], 0)?
                } else {
                    emb
                };
            }
        }
        Ok(SampleOutput { idx: idxs, f_hat })
    }

    /// The per-scale logits the KV-cache path gives when it is fed the tokens `idx` (no
    /// guidance): what teacher forcing must reproduce (spec 9).
    pub fn cached_logits(
        &self,
        vae: &VqVae,
        labels: &[i64],
        idx: &[Tensor],
    ) -> Result<Vec<Tensor>> {
        let mut out = Vec::new();
        self.decode_with(vae, labels, None, |si, logits| {
            out.push(logits.clone());
            idx.get(si)
                .cloned()
                .ok_or_else(|| Error::invalid("cached_logits", format!("no tokens for scale {si}")))
        })?;
        Ok(out)
    }

    pub(crate) fn check_vae(&self, vae: &VqVae) -> Result<()> {
        if vae.config.v_patch_nums != self.config.patch_nums
            || vae.config.vocab_size != self.config.vocab_size
            || vae.config.z_channels != self.config.cvae
        {
            return Err(Error::invalid(
                "VAR sampling",
                format!(
                    "tokenizer with scales {:?}, vocab {}, Cvae {} for a transformer with scales {:?}, vocab {}, Cvae {}",
                    vae.config.v_patch_nums, vae.config.vocab_size, vae.config.z_channels, self.config.patch_nums, self.config.vocab_size, self.config.cvae
                ),
            ));
        }
        Ok(())
    }

    /// Per-block logits of one scale computed on its own (MVAR inference and checks):
    /// `tokens` [B, pn^2, C] already embedded.
    pub(crate) fn run_scale(
        &self,
        tokens: &Tensor,
        cond: &Conditioning,
        side: usize,
        mixing: Mixing,
    ) -> Result<Tensor> {
        let mut h = tokens.clone();
        for (block, ada) in self.blocks.iter().zip(&cond.blocks) {
            h = block.forward(&h, ada, None, |attn, x| attn.forward(x, &[side], mixing))?;
        }
        self.modulated_logits(&h, &cond.head)
    }

    /// The start tokens (the condition plus the start and level positions), [B, first_l, C].
    pub(crate) fn start_tokens(&self, cond: &Tensor) -> Result<Tensor> {
        let (b, c) = (cond.dims()[0], self.config.width());
        ops::add(
            &ops::add(&cond.reshape([b, 1, c])?, &self.pos_start)?,
            &self.lvl_pos(0, self.config.first_l())?,
        )
    }

    pub(crate) fn scale_tokens(&self, si: usize, next_in: &Tensor) -> Result<Tensor> {
        let (b, pn) = (next_in.dims()[0], self.config.patch_nums[si]);
        let tokens = ops::permute(
            &next_in.reshape([b, self.config.cvae, pn * pn])?,
            &[0, 2, 1],
        )?;
        let (bg, ed) = self.config.begin_ends()[si];
        ops::add(&self.word_embed.forward(&tokens)?, &self.lvl_pos(bg, ed)?)
    }
}

/// (1 + t) logits[:B] - t logits[B:].
/// What both decoding loops (VAR's KV-cache one, MVAR's KV-free one) do with the logits of scale
/// `si`: guidance with the ramp t = cfg * si / (K - 1) on the doubled batch, the token choice
/// (checked to be i64 [B, pn^2]), and the f_hat update.
pub(crate) struct DecodeStep {
    pub what: &'static str,
    pub si: usize,
    pub scales: usize,
    pub pn: usize,
    pub bsz: usize,
    pub cfg: Option<f64>,
}

/// What a decoding loop's `choose` returns for a scale: its tokens, and optionally the codes
/// [B, Cvae, pn, pn] f_hat grows by instead of the tokens' (more_smooth sampling). A plain
/// token tensor converts into a choice without codes.
pub struct Choice {
    pub idx: Tensor,
    pub codes: Option<Tensor>,
}

impl From<Tensor> for Choice {
    fn from(idx: Tensor) -> Self {
        Choice { idx, codes: None }
    }
}

impl DecodeStep {
    /// Returns the tokens, the new f_hat and the next scale's input (None after the last).
    pub fn run<C: Into<Choice>>(
        &self,
        vae: &VqVae,
        logits: &Tensor,
        f_hat: &Tensor,
        choose: &mut impl FnMut(usize, &Tensor) -> Result<C>,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (si, k, pn, bsz) = (self.si, self.scales, self.pn, self.bsz);
        let guided;
        let logits = match self.cfg {
            Some(c) => {
                let t = if k > 1 {
                    c * si as f64 / (k - 1) as f64
                } else {
                    0.0
                };
                guided = guide(logits, bsz, t)?;
                &guided
            }
            None => logits,
        };
        let Choice { idx, codes } = choose(si, logits)?.into();
        if idx.dims() != [bsz, pn * pn] || idx.dtype() != DType::I64 {
            return Err(Error::shape(
                self.what,
                format!("tokens {} {}", idx.shape(), idx.dtype()),
                format!("i64 [{bsz}, {}]", pn * pn),
            ));
        }
        let (f_hat, next_in) = match codes {
            None => vae.next_autoregressive_input(si, f_hat, &idx)?,
            Some(h) => vae.next_autoregressive_input_codes(si, f_hat, &h)?,
        };
        Ok((idx, f_hat, next_in))
    }
}

pub fn guide(logits: &Tensor, bsz: usize, t: f64) -> Result<Tensor> {
    let halves = ops::split(logits, &[bsz, bsz], 0)?;
    ops::sub(
        &ops::mul_scalar(&halves[0], 1.0 + t)?,
        &ops::mul_scalar(&halves[1], t)?,
    )
}

/// A sampling step's choice for scale `si` of `scales` from its guided logits [B, l, V]: the
/// drawn tokens, and with `more_smooth` the codes of [`smooth_codes`] (drawn after the tokens,
/// from the same generator, as the official sampler does).
pub fn sample_choice(
    vae: &VqVae,
    logits: &Tensor,
    si: usize,
    scales: usize,
    sc: SampleConfig,
    rng: &mut Generator,
) -> Result<Choice> {
    let idx = sample_tokens(logits, sc.top_k, sc.top_p, rng)?;
    let codes = if sc.more_smooth {
        Some(smooth_codes(
            vae, logits, si, scales, sc.top_k, sc.top_p, rng,
        )?)
    } else {
        None
    };
    Ok(Choice { idx, codes })
}

/// The official `more_smooth` codes of scale `si` of `scales` (spec 4): with ratio =
/// si / (K - 1), tau = max(0.27 (1 - 0.95 ratio), 0.005) and the logits [B, l, V] filtered as the
/// draw filters them (top-k, top-p: the rest -inf), the Gumbel softmax
/// softmax((logits (1 + ratio) + g) / tau) with g = -ln(E), E ~ Exp(1) drawn from `rng`, times
/// the codebook: [B, Cvae, pn, pn]. A soft mixture of codes where the draw picks one; at the
/// last scales tau is small and it nears the drawn code.
pub fn smooth_codes(
    vae: &VqVae,
    logits: &Tensor,
    si: usize,
    scales: usize,
    top_k: usize,
    top_p: f64,
    rng: &mut Generator,
) -> Result<Tensor> {
    let (b, l, v) = logits_blv("smooth_codes", logits)?;
    let pn = (l as f64).sqrt().round() as usize;
    if pn * pn != l {
        return Err(Error::shape(
            "smooth_codes",
            logits.shape().to_string(),
            "logits [B, pn^2, V] of a square scale",
        ));
    }
    let ratio = if scales > 1 {
        si as f64 / (scales - 1) as f64
    } else {
        0.0
    };
    let tau = (0.27 * (1.0 - 0.95 * ratio)).max(0.005);
    // In f32 whatever the logits' dtype: at tau = 0.005 the scaled logits reach thousands,
    // where bf16's 8-bit mantissa would round the softmax's differences away.
    let filtered = ops::filter_top_k_top_p(&logits.reshape([b * l, v])?, top_k, top_p)?
        .to_dtype(DType::F32)?;
    // g = -ln(E) with E = -ln(1 - u) ~ Exp(1), u in [0, 1). E is kept above 0 so that g stays
    // finite (an infinite g would make the softmax NaN; torch's exponential_ excludes 0 too).
    let gumbel: Vec<f32> = rng
        .uniform(b * l * v, 0.0, 1.0)
        .into_iter()
        .map(|u| -(-(1.0 - u).ln()).max(f64::MIN_POSITIVE).ln() as f32)
        .collect();
    let g = Tensor::from_vec(gumbel, [b * l, v], logits.device())?;
    let scaled = ops::mul_scalar(
        &ops::add(&ops::mul_scalar(&filtered, 1.0 + ratio)?, &g)?,
        1.0 / tau,
    )?;
    let soft = ops::softmax(&scaled, -1)?;
    let table = &vae.quantize.embedding.weight; // [V, Cvae]
    let codes = ops::matmul(&soft.to_dtype(table.dtype())?, table)?; // [B l, Cvae]
    let c = table.dims()[1];
    ops::permute(&codes.reshape([b, l, c])?, &[0, 2, 1])?.reshape([b, c, pn, pn])
}

/// B, l, V of logits [B, l, V].
fn logits_blv(op: &'static str, logits: &Tensor) -> Result<(usize, usize, usize)> {
    match logits.dims() {
        &[b, l, v] => Ok((b, l, v)),
        _ => Err(Error::shape(
            op,
            logits.shape().to_string(),
            "logits [B, l, V]",
        )),
    }
}

/// The official `sample_with_top_k_top_p_` with one draw per token from `rng`: keep the top-k
/// logits (ties at the k-th value kept), then drop the smallest logits whose cumulative
/// probability (ascending) is <= 1 - top_p (the largest always kept), then draw from the
/// softmax. Returns i64 [B, l]. With top_k = 1 this is the argmax.
pub fn sample_tokens(
    logits: &Tensor,
    top_k: usize,
    top_p: f64,
    rng: &mut Generator,
) -> Result<Tensor> {
    let (b, l, v) = logits_blv("sample_tokens", logits)?;
    let draws = rng.uniform(b * l, 0.0, 1.0);
    let flat = logits.reshape([b * l, v])?;
    ops::sample_top_k_top_p(&flat, &draws, top_k, top_p)?.reshape([b, l])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_sizes_and_parameter_counts() {
        // Spec 2.1 / 9: VAR-d16 310.28 M, d20 600.92 M parameters (4096 codes, 1000 classes).
        let d16 = VarConfig::with_depth(16);
        assert_eq!((d16.width(), d16.heads(), d16.head_dim()), (1024, 16, 64));
        assert_eq!(d16.total_tokens(), 680);
        let rates = d16.drop_path_rates();
        assert_eq!(rates[0], 0.0);
        assert!((rates[15] - 0.1 * 16.0 / 24.0).abs() < 1e-12);
        let var = Var::new(
            VarConfig::with_depth(16),
            &Device::Cpu,
            0,
            Mixing::BlockCausal,
        )
        .unwrap();
        let n = var.params.num_elements() as f64 / 1e6;
        assert!((n - 310.28).abs() < 0.005, "{n}");
    }

    fn tiny() -> (VqVae, Var) {
        let (vae, tcfg) = crate::test_models::tiny(32, 8, &[1, 2, 3, 4], 1, 2, 64, 5);
        let tcfg = VarConfig {
            // Visible residual branches (the official gamma init of 1e-3 would hide them).
            init_adaln_gamma: 0.5,
            init_head: 1.0,
            ..tcfg
        };
        (
            vae,
            Var::new(tcfg, &Device::Cpu, 2, Mixing::BlockCausal).unwrap(),
        )
    }

    #[test]
    fn more_smooth_is_the_drawn_code_when_one_is_kept_and_a_mixture_otherwise() {
        let (vae, var) = tiny();
        crate::test_models::check_more_smooth(|sc, seed| {
            var.sample(&vae, &[1, 4], sc, &mut Generator::new(seed))
                .unwrap()
        });
    }

    #[test]
    fn teacher_forced_logits_equal_the_kv_cache_logits() {
        // Spec 9: with the same tokens, the training forward (block-causal mask over the whole
        // pyramid) and the inference path (one scale at a time with a KV cache) agree.
        let (vae, var) = tiny();
        let mut g = Generator::new(9);
        let labels = [3i64, 5];
        let idx: Vec<Tensor> = vae
            .config
            .v_patch_nums
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
        let tf = var
            .forward(&lab, &x_in, None)
            .unwrap()
            .to_vec_f32()
            .unwrap();
        let cached = var.cached_logits(&vae, &labels, &idx).unwrap();
        let cat: Vec<&Tensor> = cached.iter().collect();
        let kv = ops::concat(&cat, 1).unwrap().to_vec_f32().unwrap();
        let err = mvar_ops::testing::max_abs_diff_f32(&tf, &kv);
        assert!(err < 2e-5, "{err}");
        assert!(tf.iter().map(|v| v.abs()).fold(0.0f32, f32::max) > 0.1);
    }

    #[test]
    fn recomputed_blocks_give_the_plain_logits_gradients_and_drop_path_draws() {
        // Activation recomputation must not change training: same logits, same gradients (the
        // drop-path masks of the second run replayed from the snapshot), and the generator left
        // where the plain forward leaves it.
        let (vae, tcfg) = crate::test_models::tiny(32, 8, &[1, 2, 3, 4], 1, 3, 64, 5);
        let var = Var::new(
            VarConfig {
                init_adaln_gamma: 0.5,
                init_head: 1.0,
                drop_path_rate: 0.4,
                ..tcfg
            },
            &Device::Cpu,
            4,
            Mixing::BlockCausal,
        )
        .unwrap();
        let mut g = Generator::new(3);
        let idx: Vec<Tensor> = vae
            .config
            .v_patch_nums
            .iter()
            .map(|&pn| {
                let v: Vec<i64> = g
                    .next_u32s(4 * pn * pn)
                    .iter()
                    .map(|w| (w % 32) as i64)
                    .collect();
                Tensor::from_vec(v, [4, pn * pn], &Device::Cpu).unwrap()
            })
            .collect();
        // Data, as the trainer sees it: not a path into the tokenizer's graph.
        let x_in = vae.idx_to_var_input(&idx).unwrap().detach();
        let lab = Tensor::from_vec(vec![0i64, 1, 2, 3], [4], &Device::Cpu).unwrap();
        let run = |recompute: bool| {
            var.set_recompute_blocks(recompute);
            var.params.zero_grad();
            let mut rng = Generator::new(11);
            let logits = var.forward(&lab, &x_in, Some(&mut rng)).unwrap();
            let w: Vec<f32> = (0..logits.elem_count())
                .map(|i| (i as f32 * 0.37).sin())
                .collect();
            let weights = Tensor::from_vec(w, logits.shape().clone(), &Device::Cpu).unwrap();
            ops::sum_all(&ops::mul(&logits, &weights).unwrap())
                .unwrap()
                .backward()
                .unwrap();
            let grads: Vec<Vec<f32>> = var
                .params
                .iter()
                .map(|(_, p)| {
                    p.grad()
                        .map(|g| g.to_vec_f32().unwrap())
                        .unwrap_or_default()
                })
                .collect();
            (logits.to_vec_f32().unwrap(), grads, rng.state())
        };
        let plain = run(false);
        let again = run(true);
        var.set_recompute_blocks(false);
        assert_eq!(plain.0, again.0, "logits");
        assert_eq!(plain.2, again.2, "generator state after the forward");
        assert!(plain.1.iter().filter(|g| !g.is_empty()).count() > 10);
        for ((name, _), (p, r)) in var.params.iter().zip(plain.1.iter().zip(&again.1)) {
            assert_eq!(p, r, "gradient of {name}");
        }
    }
}
