//! The multi-scale residual VQVAE of VAR (spec section 1), with the official parameter names.
//!
//! image [B, 3, H, W] in [-1, 1] -> encoder -> quant_conv -> f [B, Cvae, h, w] (h = H / 2^(levels-1))
//! -> residual quantisation over the scales `patch_nums` (the last one equals h) -> token maps
//! -> f_hat = sum of Phi(bicubic-up(codes)) -> post_quant_conv -> decoder -> image (clamped).
//!
//! Layers follow the official `basic_vae.py`: GroupNorm(32, eps 1e-6) + SiLU ResNet blocks (1x1
//! shortcut when channels change), single-head attention blocks at the lowest resolution and in
//! the middle (one 1x1 conv gives q, k, v; scale C^-1/2), a downsampler that zero-pads right and
//! bottom by one and convolves 3x3 with stride 2, and a nearest-x2 upsampler followed by a 3x3
//! conv. The quantizer has one codebook shared by all scales and `share_quant_resi` Phi convs,
//! Phi(h) = (1 - r) h + r conv3x3(h), picked per scale by [`phi_index`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use mvar_engine::{no_grad, DType, Device, Error, Result, Tensor};
use mvar_ops as ops;
use serde::{Deserialize, Serialize};

use crate::nn::{Builder, Conv2d, Embedding, GroupNorm, Init};

/// Everything that shapes a VQVAE; field names are the official constructor's, so the
/// `config` objects of the fixture manifest deserialise into it directly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqVaeConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_z")]
    pub z_channels: usize,
    #[serde(default = "d_ch")]
    pub ch: usize,
    #[serde(default = "d_ch_mult")]
    pub ch_mult: Vec<usize>,
    #[serde(default = "d_blocks")]
    pub num_res_blocks: usize,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "d_beta")]
    pub beta: f64,
    #[serde(default)]
    pub using_znorm: bool,
    #[serde(default = "d_qks")]
    pub quant_conv_ks: usize,
    #[serde(default = "d_resi")]
    pub quant_resi: f64,
    #[serde(default = "d_share")]
    pub share_quant_resi: usize,
    #[serde(default = "d_pn", alias = "patch_nums")]
    pub v_patch_nums: Vec<usize>,
    #[serde(default = "d_true")]
    pub using_sa: bool,
    #[serde(default = "d_true")]
    pub using_mid_sa: bool,
}

fn d_vocab() -> usize {
    4096
}
fn d_z() -> usize {
    32
}
fn d_ch() -> usize {
    160
}
fn d_ch_mult() -> Vec<usize> {
    vec![1, 1, 2, 2, 4]
}
fn d_blocks() -> usize {
    2
}
fn d_beta() -> f64 {
    0.25
}
fn d_qks() -> usize {
    3
}
fn d_resi() -> f64 {
    0.5
}
fn d_share() -> usize {
    4
}
fn d_pn() -> Vec<usize> {
    vec![1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
}
fn d_true() -> bool {
    true
}

impl Default for VqVaeConfig {
    /// The released `vae_ch160v4096z32` with the 256-px pyramid.
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

impl VqVaeConfig {
    /// Rejects configurations the model cannot be built from, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("VqVaeConfig", msg));
        if self.ch_mult.is_empty() || self.ch == 0 || self.z_channels == 0 || self.vocab_size == 0 {
            return bad(format!(
                "{self:?}: expected non-empty ch_mult and positive ch, z_channels, vocab_size"
            ));
        }
        if let Some(c) = std::iter::once(self.ch)
            .chain(self.ch_mult.iter().map(|m| m * self.ch))
            .find(|c| c % 32 != 0)
        {
            return bad(format!(
                "channel count {c} is not a multiple of the 32 GroupNorm groups"
            ));
        }
        if self.v_patch_nums.is_empty()
            || self.v_patch_nums.windows(2).any(|w| w[0] >= w[1])
            || self.v_patch_nums[0] == 0
        {
            return bad(format!(
                "v_patch_nums {:?}: expected increasing positive sizes",
                self.v_patch_nums
            ));
        }
        if self.share_quant_resi == 0 {
            return bad(
                "share_quant_resi 0 (one Phi per scale) is not supported; the release uses 4"
                    .into(),
            );
        }
        if self.dropout != 0.0 {
            return bad(format!(
                "dropout {}: only 0 is supported (the release uses 0)",
                self.dropout
            ));
        }
        if self.quant_conv_ks.is_multiple_of(2) {
            return bad(format!(
                "quant_conv_ks {}: expected an odd kernel size",
                self.quant_conv_ks
            ));
        }
        Ok(())
    }

    /// Downsampling factor of the encoder: 2^(levels - 1).
    pub fn downsample(&self) -> usize {
        1 << (self.ch_mult.len() - 1)
    }

    /// Tokens over all scales: L = sum pn^2.
    pub fn total_tokens(&self) -> usize {
        self.v_patch_nums.iter().map(|p| p * p).sum()
    }
}

/// Which of the `k` Phi convs serves scale `si` of `sn`: the official
/// `argmin |linspace(1/3/k, 1 - 1/3/k, k) - si/(sn-1)|` in f64 with numpy's linspace arithmetic
/// and the first minimum winning. The exact ties (si = 2 and 7 of 10 scales) are decided by that
/// f64 rounding, towards the higher index; the fixtures check this table.
pub fn phi_index(si: usize, sn: usize, k: usize) -> usize {
    if k <= 1 || sn <= 1 {
        return 0;
    }
    let start = 1.0 / 3.0 / k as f64;
    let stop = 1.0 - 1.0 / 3.0 / k as f64;
    let step = (stop - start) / (k - 1) as f64;
    let at = si as f64 / (sn - 1) as f64;
    let mut best = 0;
    let mut best_d = f64::INFINITY;
    for i in 0..k {
        let tick = if i == k - 1 {
            stop
        } else {
            i as f64 * step + start
        };
        let d = (tick - at).abs();
        if d < best_d {
            best_d = d;
            best = i;
        }
    }
    best
}

fn silu(x: &Tensor) -> Result<Tensor> {
    ops::silu(x)
}

#[derive(Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(b: &Builder, cin: usize, cout: usize) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: GroupNorm::new(&b.pp("norm1"), cin, 32, 1e-6)?,
            conv1: Conv2d::new(&b.pp("conv1"), cin, cout, 3, 1, 1, true)?,
            norm2: GroupNorm::new(&b.pp("norm2"), cout, 32, 1e-6)?,
            conv2: Conv2d::new(&b.pp("conv2"), cout, cout, 3, 1, 1, true)?,
            nin_shortcut: if cin != cout {
                Some(Conv2d::new(
                    &b.pp("nin_shortcut"),
                    cin,
                    cout,
                    1,
                    1,
                    0,
                    true,
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Each intermediate is dropped as soon as the next op has read it: without a graph (the
        // decode of sampling) nothing else holds it, and one 160-channel activation at 256 px
        // is 40 MiB an image. (A nested call would keep the norm's output to the statement's end.)
        let a = silu(&self.norm1.forward(x)?)?;
        let h = self.conv1.forward(&a)?;
        drop(a);
        let a = silu(&self.norm2.forward(&h)?)?;
        drop(h);
        let h = self.conv2.forward(&a)?;
        drop(a);
        let skip = match &self.nin_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        ops::add(&skip, &h)
    }

    /// [`ResnetBlock::forward`], its activations recomputed in the backward when `recompute`
    /// (see [`VqVae::set_recompute_blocks`]).
    fn run(&self, x: &Tensor, recompute: bool) -> Result<Tensor> {
        if !recompute {
            return self.forward(x);
        }
        let block = self.clone();
        mvar_engine::recomputed(&[x], move |t| block.forward(&t[0]))
    }
}

#[derive(Clone)]
struct AttnBlock {
    norm: GroupNorm,
    qkv: Conv2d,
    proj_out: Conv2d,
    channels: usize,
}

impl AttnBlock {
    fn new(b: &Builder, c: usize) -> Result<Self> {
        Ok(AttnBlock {
            norm: GroupNorm::new(&b.pp("norm"), c, 32, 1e-6)?,
            qkv: Conv2d::new(&b.pp("qkv"), c, 3 * c, 1, 1, 0, true)?,
            proj_out: Conv2d::new(&b.pp("proj_out"), c, c, 1, 1, 0, true)?,
            channels: c,
        })
    }

    /// Single-head attention over the H*W positions with C-dimensional q, k, v.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = dims4(x)?;
        let qkv = self.qkv.forward(&self.norm.forward(x)?)?;
        // [B, 3C, H, W] -> [3, B, 1, HW, C]: q, k, v as one-head attention inputs.
        let qkv = ops::permute(&qkv.reshape([b, 3, c, h * w])?, &[1, 0, 3, 2])?.reshape([
            3,
            b,
            1,
            h * w,
            c,
        ])?;
        let parts = ops::split(&qkv, &[1, 1, 1], 0)?;
        let [q, k, v] = [0, 1, 2].map(|i| parts[i].reshape([b, 1, h * w, c]));
        let scale = 1.0 / (self.channels as f64).sqrt();
        let o = ops::attention(&q?, &k?, &v?, scale, &ops::AttnMask::None)?;
        let o = ops::permute(&o.reshape([b, h * w, c])?, &[0, 2, 1])?.reshape([b, c, h, w])?;
        ops::add(x, &self.proj_out.forward(&o)?)
    }
}

fn dims4(x: &Tensor) -> Result<(usize, usize, usize, usize)> {
    match x.dims() {
        &[b, c, h, w] => Ok((b, c, h, w)),
        _ => Err(Error::shape(
            "vqvae",
            format!("input {}", x.shape()),
            "a [B, C, H, W] tensor",
        )),
    }
}

#[derive(Clone)]
struct Level {
    blocks: Vec<ResnetBlock>,
    attns: Vec<AttnBlock>,
    resample: Option<Conv2d>,
}

#[derive(Clone)]
struct Mid {
    block_1: ResnetBlock,
    attn_1: Option<AttnBlock>,
    block_2: ResnetBlock,
}

impl Mid {
    fn new(b: &Builder, c: usize, sa: bool) -> Result<Self> {
        Ok(Mid {
            block_1: ResnetBlock::new(&b.pp("block_1"), c, c)?,
            attn_1: if sa {
                Some(AttnBlock::new(&b.pp("attn_1"), c)?)
            } else {
                None
            },
            block_2: ResnetBlock::new(&b.pp("block_2"), c, c)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        path: &str,
        hook: &mut dyn FnMut(&str, &Tensor),
        recompute: bool,
    ) -> Result<Tensor> {
        let mut h = self.block_1.run(x, recompute)?;
        hook(&format!("{path}.block_1"), &h);
        if let Some(a) = &self.attn_1 {
            h = a.forward(&h)?;
            hook(&format!("{path}.attn_1"), &h);
        }
        let h = self.block_2.run(&h, recompute)?;
        hook(&format!("{path}.block_2"), &h);
        Ok(h)
    }
}

#[derive(Clone)]
struct Encoder {
    conv_in: Conv2d,
    down: Vec<Level>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(b: &Builder, cfg: &VqVaeConfig) -> Result<Self> {
        let ch = cfg.ch;
        let levels = cfg.ch_mult.len();
        let conv_in = Conv2d::new(&b.pp("conv_in"), 3, ch, 3, 1, 1, true)?;
        let mut down = Vec::with_capacity(levels);
        let mut block_in = ch;
        for (i, &mult) in cfg.ch_mult.iter().enumerate() {
            let lb = b.pp("down").pp(i);
            let block_out = ch * mult;
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for j in 0..cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    &lb.pp("block").pp(j),
                    block_in,
                    block_out,
                )?);
                block_in = block_out;
                if i == levels - 1 && cfg.using_sa {
                    attns.push(AttnBlock::new(&lb.pp("attn").pp(j), block_in)?);
                }
            }
            let resample = if i + 1 != levels {
                Some(Conv2d::new(
                    &lb.pp("downsample").pp("conv"),
                    block_in,
                    block_in,
                    3,
                    2,
                    0,
                    true,
                )?)
            } else {
                None
            };
            down.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        Ok(Encoder {
            conv_in,
            down,
            mid: Mid::new(&b.pp("mid"), block_in, cfg.using_mid_sa)?,
            norm_out: GroupNorm::new(&b.pp("norm_out"), block_in, 32, 1e-6)?,
            conv_out: Conv2d::new(&b.pp("conv_out"), block_in, cfg.z_channels, 3, 1, 1, true)?,
        })
    }

    /// The encoder; `hook(path, output)` sees every module's output under its official path
    /// (`encoder.down.1.downsample`, `encoder.mid.attn_1`, ...).
    /// `recompute`: the residual blocks' activations are recomputed in the backward.
    fn forward(
        &self,
        x: &Tensor,
        hook: &mut dyn FnMut(&str, &Tensor),
        recompute: bool,
    ) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        hook("encoder.conv_in", &h);
        for (i, level) in self.down.iter().enumerate() {
            for (j, block) in level.blocks.iter().enumerate() {
                h = block.run(&h, recompute)?;
                hook(&format!("encoder.down.{i}.block.{j}"), &h);
                if let Some(a) = level.attns.get(j) {
                    h = a.forward(&h)?;
                    hook(&format!("encoder.down.{i}.attn.{j}"), &h);
                }
            }
            if let Some(conv) = &level.resample {
                // Downsample2x: zero-pad one column right and one row below, then stride 2.
                let pad = ops::Padding {
                    top: 0,
                    bottom: 1,
                    left: 0,
                    right: 1,
                };
                h = ops::conv2d(&h, &conv.weight, conv.bias.as_ref(), (2, 2), pad)?;
                hook(&format!("encoder.down.{i}.downsample"), &h);
            }
        }
        h = self.mid.forward(&h, "encoder.mid", hook, recompute)?;
        let out = self.conv_out.forward(&silu(&self.norm_out.forward(&h)?)?)?;
        hook("encoder.conv_out", &out);
        Ok(out)
    }
}

#[derive(Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: Mid,
    /// Indexed by level (0 = full resolution); run from the last level down.
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(b: &Builder, cfg: &VqVaeConfig) -> Result<Self> {
        let ch = cfg.ch;
        let levels = cfg.ch_mult.len();
        let mut block_in = ch * cfg.ch_mult[levels - 1];
        let conv_in = Conv2d::new(&b.pp("conv_in"), cfg.z_channels, block_in, 3, 1, 1, true)?;
        let mid = Mid::new(&b.pp("mid"), block_in, cfg.using_mid_sa)?;
        let mut up: Vec<Option<Level>> = vec![None; levels];
        for i in (0..levels).rev() {
            let lb = b.pp("up").pp(i);
            let block_out = ch * cfg.ch_mult[i];
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for j in 0..=cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    &lb.pp("block").pp(j),
                    block_in,
                    block_out,
                )?);
                block_in = block_out;
                if i == levels - 1 && cfg.using_sa {
                    attns.push(AttnBlock::new(&lb.pp("attn").pp(j), block_in)?);
                }
            }
            let resample = if i != 0 {
                Some(Conv2d::new(
                    &lb.pp("upsample").pp("conv"),
                    block_in,
                    block_in,
                    3,
                    1,
                    1,
                    true,
                )?)
            } else {
                None
            };
            up[i] = Some(Level {
                blocks,
                attns,
                resample,
            });
        }
        Ok(Decoder {
            conv_in,
            mid,
            up: up.into_iter().flatten().collect(),
            norm_out: GroupNorm::new(&b.pp("norm_out"), block_in, 32, 1e-6)?,
            conv_out: Conv2d::new(&b.pp("conv_out"), block_in, 3, 3, 1, 1, true)?,
        })
    }

    /// The decoder output before the final clamp; `hook` as for the encoder.
    fn forward(
        &self,
        z: &Tensor,
        hook: &mut dyn FnMut(&str, &Tensor),
        recompute: bool,
    ) -> Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        hook("decoder.conv_in", &h);
        let mut h = self.mid.forward(&h, "decoder.mid", hook, recompute)?;
        for (i, level) in self.up.iter().enumerate().rev() {
            for (j, block) in level.blocks.iter().enumerate() {
                h = block.run(&h, recompute)?;
                hook(&format!("decoder.up.{i}.block.{j}"), &h);
                if let Some(a) = level.attns.get(j) {
                    h = a.forward(&h)?;
                    hook(&format!("decoder.up.{i}.attn.{j}"), &h);
                }
            }
            if let Some(conv) = &level.resample {
                h = conv.forward(&ops::upsample_nearest(&h, 2)?)?;
                hook(&format!("decoder.up.{i}.upsample"), &h);
            }
        }
        let a = silu(&self.norm_out.forward(&h)?)?;
        drop(h);
        let out = self.conv_out.forward(&a)?;
        hook("decoder.conv_out", &out);
        Ok(out)
    }
}

/// The multi-scale residual quantizer.
#[derive(Clone)]
pub struct Quantizer {
    pub embedding: Embedding,
    phis: Vec<Conv2d>,
    /// [scales, vocab]: EMA of code hits per scale (official buffer `ema_vocab_hit_SV`).
    pub ema_vocab_hit: Tensor,
    patch_nums: Vec<usize>,
    resi_ratio: f64,
    using_znorm: bool,
}

impl Quantizer {
    fn new(b: &Builder, cfg: &VqVaeConfig) -> Result<Self> {
        let c = cfg.z_channels;
        let phis = (0..cfg.share_quant_resi)
            .map(|j| {
                Conv2d::new(
                    &b.pp("quant_resi").pp("qresi_ls").pp(j),
                    c,
                    c,
                    3,
                    1,
                    1,
                    true,
                )
            })
            .collect::<Result<_>>()?;
        // U(-1/V, 1/V): the official `eini(-1)` option. Codes start near the origin; the
        // tokenizer trainer restarts unused codes from live residuals, so the start matters little.
        let v = cfg.vocab_size as f64;
        Ok(Quantizer {
            ema_vocab_hit: b.buffer(
                "ema_vocab_hit_SV",
                [cfg.v_patch_nums.len(), cfg.vocab_size],
                Init::Zeros,
            )?,
            embedding: Embedding::new(
                &b.pp("embedding"),
                cfg.vocab_size,
                c,
                Init::Uniform(1.0 / v),
            )?,
            phis,
            patch_nums: cfg.v_patch_nums.clone(),
            resi_ratio: cfg.quant_resi.abs(),
            using_znorm: cfg.using_znorm,
        })
    }

    /// Phi of scale `si`: (1 - r) h + r conv(h).
    pub fn phi(&self, si: usize, h: &Tensor) -> Result<Tensor> {
        let j = phi_index(si, self.patch_nums.len(), self.phis.len());
        let r = self.resi_ratio;
        if r < 1e-6 {
            return Ok(h.clone());
        }
        ops::add(
            &ops::mul_scalar(h, 1.0 - r)?,
            &ops::mul_scalar(&self.phis[j].forward(h)?, r)?,
        )
    }

    /// The nearest code of every pixel of `z` [B, C, h, w] -> i64 [B, h*w] (row-major).
    pub fn nearest(&self, z: &Tensor) -> Result<Tensor> {
        self.nearest_with(z, None)
    }

    /// The codebook prepared for several searches (its norms computed once on a GPU), for
    /// [`Quantizer::nearest_with`]; not used with `using_znorm`.
    pub fn codebook(&self) -> Result<ops::Codebook> {
        ops::Codebook::new(&self.embedding.weight)
    }

    /// [`Quantizer::nearest`] with the codebook prepared by [`Quantizer::codebook`] when the
    /// caller searches it at several scales.
    pub fn nearest_with(&self, z: &Tensor, book: Option<&ops::Codebook>) -> Result<Tensor> {
        let (b, c, h, w) = dims4(z)?;
        if self.using_znorm {
            // Cosine similarity: nearest normalised code by the largest dot product.
            let rows = ops::permute(z, &[0, 2, 3, 1])?.reshape([b * h * w, c])?;
            let zn = ops::l2_normalize(&rows, 1e-12)?;
            let en = ops::l2_normalize(&self.embedding.weight.detach(), 1e-12)?;
            return ops::nearest_code(&zn, &en)?.reshape([b, h * w]);
        }
        match book {
            Some(book) => ops::nearest_code_maps(z, book),
            None => ops::nearest_code_maps(z, &self.codebook()?),
        }
    }

    /// Codes of `idx` [B, pn*pn] as a map [B, C, pn, pn].
    pub fn codes(&self, idx: &Tensor, pn: usize) -> Result<Tensor> {
        let b = idx.dims().first().copied().unwrap_or(0);
        let e = self.embedding.forward(idx)?; // [B, pn^2, C]
        let c = self.embedding.weight.dims()[1];
        ops::permute(&e, &[0, 2, 1])?.reshape([b, c, pn, pn])
    }

    /// Scale `si`'s contribution to f_hat: Phi(bicubic-up(h)) (no upsampling at the last scale).
    pub fn contribution(&self, si: usize, h: &Tensor, full: usize) -> Result<Tensor> {
        let up = if si + 1 < self.patch_nums.len() {
            ops::bicubic_upsample(h, full, full)?
        } else {
            h.clone()
        };
        self.phi(si, &up)
    }

    /// acc + sign * (scale `si`'s contribution of the token map `idx` [B, pn^2]): one step of
    /// f_hat (sign +1) or of the residual (sign -1) as one op, fused on a GPU when nothing
    /// needs a gradient (ops::phi_accumulate).
    pub fn accumulate(
        &self,
        si: usize,
        acc: &Tensor,
        idx: &Tensor,
        sign: f64,
        origin: ops::IndexOrigin,
    ) -> Result<Tensor> {
        let pn = self.patch_nums[si];
        let j = phi_index(si, self.patch_nums.len(), self.phis.len());
        let phi = (self.resi_ratio >= 1e-6).then(|| ops::Phi {
            weight: &self.phis[j].weight,
            bias: self.phis[j].bias.as_ref(),
            ratio: self.resi_ratio,
        });
        ops::phi_accumulate(
            acc,
            idx,
            (pn, pn),
            &self.embedding.weight,
            phi.as_ref(),
            sign,
            origin,
        )
    }
}

/// What the quantizer's training forward returns.
pub struct QuantizeOutput {
    /// f_hat with the straight-through gradient to f.
    pub f_hat_st: Tensor,
    /// The commitment + codebook loss, averaged over scales.
    pub loss: Tensor,
    /// Token maps per scale, i64 [B, pn^2].
    pub idx: Vec<Tensor>,
    /// The vectors each scale quantised, [B * pn^2, Cvae] per scale (no grad): where dead codes
    /// are restarted from.
    pub residuals: Vec<Tensor>,
}

/// The VQVAE with its parameters (named as the official state dict) and buffers.
pub struct VqVae {
    pub config: VqVaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    pub quantize: Quantizer,
    pub params: mvar_engine::ParamStore,
    pub buffers: Vec<(String, Tensor)>,
    /// Activation recomputation in training: see [`VqVae::set_recompute_blocks`].
    recompute_blocks: AtomicBool,
    /// Images per decoder pass without a graph (0: automatic): see [`VqVae::set_decode_batch`].
    decode_batch: AtomicUsize,
}

/// The automatic decode chunk holds the decoder's largest activation (f32) to about this many
/// bytes (6 images of the released 256-px tokenizer, whose 160-channel layers at 256 x 256 take
/// 40 MiB an image; a pass holds about five such buffers at its peak).
const DECODE_CHUNK_BYTES: usize = 256 << 20;

/// Images per decoder pass so that the largest f32 activation of the pass stays near
/// [`DECODE_CHUNK_BYTES`], for latents of `latent` positions an image; at least 1, at most
/// `batch`. Level i of the decoder (ch_mult's index) works at 2^(levels - 1 - i) times the
/// latent side, on ch * ch_mult[i] channels or those of the level below it, whose output is
/// upsampled into it.
fn automatic_decode_chunk(c: &VqVaeConfig, latent: usize, batch: usize) -> usize {
    let levels = c.ch_mult.len();
    let per_image = (0..levels)
        .map(|i| {
            let mult = c.ch_mult[i].max(c.ch_mult.get(i + 1).copied().unwrap_or(0));
            c.ch * mult * (latent << (2 * (levels - 1 - i))) * 4
        })
        .max()
        .unwrap_or(0)
        .max(1);
    (DECODE_CHUNK_BYTES / per_image).clamp(1, batch.max(1))
}

impl VqVae {
    /// A VQVAE with PyTorch's default initialisation, drawn from `seed`.
    pub fn new(config: VqVaeConfig, device: &Device, seed: u64) -> Result<Self> {
        config.validate()?;
        let b = Builder::new(device, DType::F32, seed);
        let ks = config.quant_conv_ks;
        let encoder = Encoder::new(&b.pp("encoder"), &config)?;
        let decoder = Decoder::new(&b.pp("decoder"), &config)?;
        let quantize = Quantizer::new(&b.pp("quantize"), &config)?;
        let z = config.z_channels;
        let quant_conv = Conv2d::new(&b.pp("quant_conv"), z, z, ks, 1, ks / 2, true)?;
        let post_quant_conv = Conv2d::new(&b.pp("post_quant_conv"), z, z, ks, 1, ks / 2, true)?;
        let (params, buffers) = b.finish();
        Ok(VqVae {
            config,
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            quantize,
            params,
            buffers,
            recompute_blocks: AtomicBool::new(false),
            decode_batch: AtomicUsize::new(0),
        })
    }

    /// How many images one pass of the decoder takes when no graph is recorded (sampling,
    /// evaluation): 0 (the default) picks the count from the image size, so that the decoder's
    /// largest activation stays near 256 MiB. A batch decodes in chunks of that
    /// many images, with the same result (every decoder op works per image), so the decode's
    /// peak memory no longer grows with the sampling batch: at 256 px it was the peak of
    /// sampling, several times the transformer's. While a graph is recorded (tokenizer
    /// training) the whole batch runs at once: its activations are kept anyway.
    pub fn set_decode_batch(&self, images: usize) {
        self.decode_batch.store(images, Ordering::Relaxed);
    }

    /// Images per decoder pass for `f_hat` [B, Cvae, h, w] (see [`VqVae::set_decode_batch`]).
    pub fn decode_chunk(&self, f_hat: &Tensor) -> usize {
        let batch = f_hat.dims().first().copied().unwrap_or(1).max(1);
        if mvar_engine::is_grad_enabled() && f_hat.requires_grad() {
            return batch;
        }
        let set = self.decode_batch.load(Ordering::Relaxed);
        if set > 0 {
            return set.min(batch);
        }
        let latent: usize = f_hat.dims().iter().skip(2).product();
        automatic_decode_chunk(&self.config, latent, batch)
    }

    /// Activation recomputation (gradient checkpointing) for training: with it on, a forward
    /// that records a graph keeps only each residual block's input, and the backward runs the
    /// block again (`engine::recomputed`). The residual blocks hold most of a training step's
    /// activations (the full-resolution ones above all), for about one more forward of them per
    /// step; the gradients are the same. Off by default; a run-time setting.
    pub fn set_recompute_blocks(&self, on: bool) {
        self.recompute_blocks.store(on, Ordering::Relaxed);
    }

    /// Whether this forward recomputes: the setting, and only when a graph is being recorded.
    fn recomputing(&self) -> bool {
        self.recompute_blocks.load(Ordering::Relaxed) && mvar_engine::is_grad_enabled()
    }

    /// Every tensor a checkpoint holds (parameters then buffers), by official name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .chain(self.buffers.iter().cloned())
            .collect()
    }

    /// Loads weights by official name. The codebook-hit buffer is taken when its shape fits
    /// (the official loader replaces one made for another pyramid), every parameter must be
    /// present with its exact shape.
    pub fn load(&self, path: &std::path::Path) -> Result<crate::checkpoint::LoadReport> {
        let source = crate::checkpoint::read_safetensors(path)?;
        self.load_tensors(&source, &format!("VQVAE checkpoint {}", path.display()))
    }

    /// [`VqVae::load`] from tensors already read (`what` names their source in errors).
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
        for (name, buf) in &self.buffers {
            if let Some(src) = source.get(name) {
                if src.shape() == buf.shape() {
                    buf.copy_from(&src.to_dtype(buf.dtype())?.to_device(buf.device())?)?;
                }
                report.unexpected.retain(|n| n != name);
            }
        }
        Ok(report)
    }

    /// Saves parameters and buffers under their official names (atomically).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        crate::checkpoint::write_safetensors(path, &self.named_tensors(), None)
    }

    pub fn device(&self) -> &Device {
        self.quantize.embedding.weight.device()
    }

    /// f = quant_conv(encoder(img)), img [B, 3, H, W] in [-1, 1].
    pub fn encode_features(&self, img: &Tensor) -> Result<Tensor> {
        self.apply_quant_conv(&self.encoder_output(img, &mut |_, _| {})?)
    }

    /// quant_conv(x): encoder output -> the features that are quantised.
    pub fn apply_quant_conv(&self, x: &Tensor) -> Result<Tensor> {
        self.quant_conv.forward(x)
    }

    /// encoder(img) before quant_conv, with every module's output shown to `hook` under its
    /// official path (what PyTorch forward hooks see).
    pub fn encoder_output(
        &self,
        img: &Tensor,
        hook: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        let (_, c, h, w) = dims4(img)?;
        let down = self.config.downsample();
        let side = *self.config.v_patch_nums.last().unwrap_or(&0) * down;
        if c != 3 || h != side || w != side {
            return Err(Error::shape(
                "VqVae::encoder_output",
                format!("image {}", img.shape()),
                format!(
                    "[B, 3, {side}, {side}] for the last scale {} at downsampling {down}",
                    side / down
                ),
            ));
        }
        self.encoder.forward(img, hook, self.recomputing())
    }

    /// The latent side (the last scale).
    fn full(&self) -> usize {
        *self.config.v_patch_nums.last().unwrap_or(&1)
    }

    /// Token maps of the features `f` [B, Cvae, h, w]: one i64 [B, pn^2] per scale (no grad).
    pub fn f_to_idx(&self, f: &Tensor) -> Result<Vec<Tensor>> {
        let _ng = no_grad();
        let full = self.full();
        let sn = self.config.v_patch_nums.len();
        let c = self.config.z_channels;
        if f.rank() != 4 || f.dims()[1..] != [c, full, full] {
            return Err(Error::shape(
                "f_to_idx",
                format!("features {}", f.shape()),
                format!("[B, {c}, {full}, {full}] (Cvae and the last scale)"),
            ));
        }
        let mut rest = f.detach();
        let mut out = Vec::with_capacity(sn);
        let book = if self.quantize.using_znorm {
            None
        } else {
            Some(self.quantize.codebook()?)
        };
        for (si, &pn) in self.config.v_patch_nums.iter().enumerate() {
            let z = if si + 1 < sn {
                ops::area_downsample(&rest, pn, pn)?
            } else {
                rest.clone()
            };
            let idx = self.quantize.nearest_with(&z, book.as_ref())?;
            rest =
                self.quantize
                    .accumulate(si, &rest, &idx, -1.0, ops::IndexOrigin::NearestCode)?;
            out.push(idx);
        }
        Ok(out)
    }

    /// Token maps of an image.
    pub fn img_to_idx(&self, img: &Tensor) -> Result<Vec<Tensor>> {
        let f = {
            let _ng = no_grad();
            self.encode_features(img)?
        };
        self.f_to_idx(&f)
    }

    /// f_hat = sum over scales of Phi(bicubic-up(codes)) from token maps [B, pn^2].
    pub fn idx_to_fhat(&self, idx: &[Tensor]) -> Result<Tensor> {
        self.fold_fhat("idx_to_fhat", idx, |_| Ok(()))
    }

    /// f_hat from token maps (a whole pyramid or its first scales), shown to `after_scale`
    /// as it is after each scale.
    fn fold_fhat(
        &self,
        op: &'static str,
        idx: &[Tensor],
        mut after_scale: impl FnMut(&Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        self.check_pyramid(op, idx)?;
        let mut f_hat = self.empty_fhat(idx, op)?;
        for (si, ids) in idx.iter().enumerate() {
            f_hat = self
                .quantize
                .accumulate(si, &f_hat, ids, 1.0, ops::IndexOrigin::Caller)?;
            after_scale(&f_hat)?;
        }
        Ok(f_hat)
    }

    /// Zeros [B, Cvae, full, full] in the codebook's dtype, B from the first token map.
    fn empty_fhat(&self, idx: &[Tensor], op: &'static str) -> Result<Tensor> {
        let first = idx
            .first()
            .ok_or_else(|| Error::invalid(op, "no token maps"))?;
        let full = self.full();
        let table = &self.quantize.embedding.weight;
        Tensor::zeros(
            [first.dims()[0], self.config.z_channels, full, full],
            table.dtype(),
            table.device(),
        )
    }

    fn check_pyramid(&self, op: &'static str, idx: &[Tensor]) -> Result<()> {
        let pns = &self.config.v_patch_nums;
        if idx.len() > pns.len() {
            return Err(Error::invalid(
                op,
                format!("{} token maps for {} scales", idx.len(), pns.len()),
            ));
        }
        for (si, (t, &pn)) in idx.iter().zip(pns).enumerate() {
            if t.rank() != 2 || t.dims()[1] != pn * pn {
                return Err(Error::shape(
                    op,
                    format!("token map {si} of shape {}", t.shape()),
                    format!("[B, {}]", pn * pn),
                ));
            }
        }
        Ok(())
    }

    /// The teacher-forcing input (B, L - 1, Cvae): row t is the input of token t + 1, i.e. the
    /// area-downsampled accumulated f_hat at the next scale (spec 1.7).
    pub fn idx_to_var_input(&self, idx: &[Tensor]) -> Result<Tensor> {
        self.check_pyramid("idx_to_var_input", idx)?;
        let pns = &self.config.v_patch_nums;
        if idx.len() != pns.len() {
            return Err(Error::invalid(
                "idx_to_var_input",
                format!("{} token maps; expected {}", idx.len(), pns.len()),
            ));
        }
        let c = self.config.z_channels;
        let mut f_hat = self.empty_fhat(idx, "idx_to_var_input")?;
        let mut next = Vec::with_capacity(pns.len() - 1);
        for si in 0..pns.len() - 1 {
            f_hat =
                self.quantize
                    .accumulate(si, &f_hat, &idx[si], 1.0, ops::IndexOrigin::Caller)?;
            let pn = pns[si + 1];
            let b = f_hat.dims()[0];
            let down = ops::area_downsample(&f_hat, pn, pn)?;
            next.push(ops::permute(&down.reshape([b, c, pn * pn])?, &[0, 2, 1])?);
        }
        let refs: Vec<&Tensor> = next.iter().collect();
        if refs.is_empty() {
            return Err(Error::invalid(
                "idx_to_var_input",
                "a pyramid of one scale has no next-scale input",
            ));
        }
        ops::concat(&refs, 1)
    }

    /// One sampling step (spec 1.8): adds the contribution of scale `si`'s token map `idx`
    /// [B, pn^2] to `f_hat` [B, C, h, w] and returns the new f_hat and, unless `si` is the last
    /// scale, the next scale's input area-down(f_hat) [B, C, pn', pn'].
    pub fn next_autoregressive_input(
        &self,
        si: usize,
        f_hat: &Tensor,
        idx: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.scale_side("next_autoregressive_input", si)?;
        let f_hat = self
            .quantize
            .accumulate(si, f_hat, idx, 1.0, ops::IndexOrigin::Caller)?;
        self.with_next_input(si, f_hat)
    }

    /// [`next_autoregressive_input`](Self::next_autoregressive_input) with scale `si`'s codes
    /// h [B, C, pn, pn] given instead of its tokens (the official `get_next_autoregressive_input`,
    /// which more_smooth sampling feeds a mixture of codes): f_hat + Phi(bicubic-up(h)).
    pub fn next_autoregressive_input_codes(
        &self,
        si: usize,
        f_hat: &Tensor,
        h: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        const OP: &str = "next_autoregressive_input_codes";
        let pn = self.scale_side(OP, si)?;
        let want = [
            f_hat.dims().first().copied().unwrap_or(0),
            self.config.z_channels,
            pn,
            pn,
        ];
        if h.dims() != want {
            return Err(Error::shape(
                OP,
                format!("codes {}", h.shape()),
                format!("{want:?}"),
            ));
        }
        let h = h.to_dtype(f_hat.dtype())?;
        let f_hat = ops::add(f_hat, &self.quantize.contribution(si, &h, self.full())?)?;
        self.with_next_input(si, f_hat)
    }

    /// The side of scale `si`'s token map, or an error naming `op` past the last scale.
    fn scale_side(&self, op: &'static str, si: usize) -> Result<usize> {
        let pns = &self.config.v_patch_nums;
        pns.get(si).copied().ok_or(Error::IndexOutOfRange {
            op,
            what: "scale",
            index: si as i64,
            size: pns.len(),
        })
    }

    /// f_hat after scale `si` and, unless it is the last, the next scale's input
    /// area-down(f_hat).
    fn with_next_input(&self, si: usize, f_hat: Tensor) -> Result<(Tensor, Option<Tensor>)> {
        match self.config.v_patch_nums.get(si + 1) {
            None => Ok((f_hat, None)),
            Some(&next) => {
                let input = ops::area_downsample(&f_hat, next, next)?;
                Ok((f_hat, Some(input)))
            }
        }
    }

    /// post_quant_conv(f_hat).
    pub fn post_quant(&self, f_hat: &Tensor) -> Result<Tensor> {
        self.post_quant_conv.forward(f_hat)
    }

    /// The decoder's output before the clamp, from post_quant_conv(f_hat), in chunks of
    /// [`VqVae::decode_chunk`] images.
    pub fn decode_unclamped(&self, f_hat: &Tensor) -> Result<Tensor> {
        let decode = |f: &Tensor| {
            self.decoder
                .forward(&self.post_quant(f)?, &mut |_, _| {}, self.recomputing())
        };
        let (batch, chunk) = (
            f_hat.dims().first().copied().unwrap_or(0),
            self.decode_chunk(f_hat),
        );
        if batch <= chunk {
            return decode(f_hat);
        }
        let parts = (0..batch)
            .step_by(chunk)
            .map(|start| decode(&ops::narrow(f_hat, 0, start, chunk.min(batch - start))?))
            .collect::<Result<Vec<_>>>()?;
        ops::concat(&parts.iter().collect::<Vec<_>>(), 0)
    }

    /// The decoder's output before the clamp from `dec_in` = post_quant_conv(f_hat), with every
    /// module's output shown to `hook` under its official path.
    pub fn decoder_output(
        &self,
        dec_in: &Tensor,
        hook: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        self.decoder.forward(dec_in, hook, self.recomputing())
    }

    /// decoder(post_quant_conv(f_hat)).clamp(-1, 1).
    pub fn fhat_to_img(&self, f_hat: &Tensor) -> Result<Tensor> {
        ops::clamp(&self.decode_unclamped(f_hat)?, -1.0, 1.0)
    }

    /// Image from token maps.
    pub fn idx_to_img(&self, idx: &[Tensor]) -> Result<Tensor> {
        self.fhat_to_img(&self.idx_to_fhat(idx)?)
    }

    /// The image after each scale, coarse to fine: decoder(f_hat of scales 0..=k) for every k
    /// of `idx` (a whole pyramid or its first scales), each [B, 3, H, W] at full resolution,
    /// the last equal to `idx_to_img(idx)` (the official `idxBl_to_img(same_shape=True,
    /// last_one=False)`). Decoding a scale at its own small size instead gives poor images
    /// (VAR issue 162): f_hat lives at the last scale's size from the first scale on.
    pub fn idx_to_progression(&self, idx: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut images = Vec::with_capacity(idx.len());
        self.fold_fhat("idx_to_progression", idx, |f_hat| {
            images.push(self.fhat_to_img(f_hat)?);
            Ok(())
        })?;
        Ok(images)
    }

    /// The quantizer's training forward (spec 1.6): residual quantisation of `f` with gradients
    /// into the codebook and the Phi convs through f_hat, the loss
    /// mean over scales of beta * mse(f_hat.detach(), f) + mse(f_hat, f.detach()), and the
    /// straight-through output f_hat.detach() - f.detach() + f, whose gradient reaches the
    /// encoder unchanged.
    pub fn quantize_train(&self, f: &Tensor, beta: f64) -> Result<QuantizeOutput> {
        let full = self.full();
        let sn = self.config.v_patch_nums.len();
        let f_ng = f.detach();
        let mut rest = f_ng.clone();
        let mut f_hat: Option<Tensor> = None;
        let mut loss: Option<Tensor> = None;
        let mut idxs = Vec::with_capacity(sn);
        let mut residuals = Vec::with_capacity(sn);
        for (si, &pn) in self.config.v_patch_nums.iter().enumerate() {
            let idx = {
                let _ng = no_grad();
                let z = if si + 1 < sn {
                    ops::area_downsample(&rest, pn, pn)?
                } else {
                    rest.clone()
                };
                let (b, c) = (z.dims()[0], z.dims()[1]);
                residuals.push(ops::permute(&z, &[0, 2, 3, 1])?.reshape([b * pn * pn, c])?);
                self.quantize.nearest(&z)?
            };
            let h = self
                .quantize
                .contribution(si, &self.quantize.codes(&idx, pn)?, full)?;
            rest = ops::sub(&rest, &h.detach())?;
            let acc = match f_hat {
                None => h,
                Some(acc) => ops::add(&acc, &h)?,
            };
            let commit = ops::mean_all(&ops::square(&ops::sub(&acc.detach(), f)?)?)?;
            let codebook = ops::mean_all(&ops::square(&ops::sub(&acc, &f_ng)?)?)?;
            let term = ops::add(&ops::mul_scalar(&commit, beta)?, &codebook)?;
            loss = Some(match loss {
                None => term,
                Some(l) => ops::add(&l, &term)?,
            });
            f_hat = Some(acc);
            idxs.push(idx);
        }
        let (f_hat, loss) = match (f_hat, loss) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(Error::invalid("quantize_train", "no scales")),
        };
        let loss = ops::mul_scalar(&loss, 1.0 / sn as f64)?;
        let f_hat_st = ops::add(&ops::sub(&f_hat.detach(), &f_ng)?, f)?;
        Ok(QuantizeOutput {
            f_hat_st,
            loss,
            idx: idxs,
            residuals,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phi_table_matches_the_official_rounding() {
        let table = |sn: usize| (0..sn).map(|si| phi_index(si, sn, 4)).collect::<Vec<_>>();
        assert_eq!(table(4), vec![0, 1, 2, 3]);
        assert_eq!(table(7), vec![0, 0, 1, 2, 2, 3, 3]);
        assert_eq!(table(10), vec![0, 0, 1, 1, 1, 2, 2, 3, 3, 3]);
        assert_eq!(table(14), vec![0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]);
    }

    #[test]
    fn decoding_in_chunks_equals_decoding_the_batch() {
        let cfg = VqVaeConfig {
            vocab_size: 16,
            z_channels: 4,
            ch: 32,
            ch_mult: vec![1, 2],
            num_res_blocks: 1,
            v_patch_nums: vec![1, 2, 4],
            ..VqVaeConfig::default()
        };
        assert!(cfg.using_sa && cfg.using_mid_sa);
        let vae = VqVae::new(cfg, &Device::Cpu, 3).unwrap();
        let f_hat = Tensor::randn(
            [5, 4, 4, 4],
            0.0,
            1.0,
            DType::F32,
            &Device::Cpu,
            &mut mvar_engine::Generator::new(2),
        )
        .unwrap();
        let _ng = no_grad();
        vae.set_decode_batch(5);
        let whole = vae.fhat_to_img(&f_hat).unwrap();
        vae.set_decode_batch(2);
        assert_eq!(vae.decode_chunk(&f_hat), 2);
        let chunked = vae.fhat_to_img(&f_hat).unwrap();
        assert_eq!(chunked.dims(), &[5, 3, 8, 8]);
        assert_eq!(chunked.to_vec_f32().unwrap(), whole.to_vec_f32().unwrap());
        // Automatic: 8 x 8 pixels of at most 64 channels an image fit many times over.
        vae.set_decode_batch(0);
        assert_eq!(vae.decode_chunk(&f_hat), 5);
        // The released 256-px tokenizer (ch 160, ch_mult 1,1,2,2,4; 16 x 16 latents): its
        // largest activation is 160 channels at 256 x 256 (640 channels only at 16 x 16), 40
        // MiB an image: 6 images a pass; 512 px (32 x 32 latents): 1.
        let released = VqVaeConfig {
            ch: 160,
            ch_mult: vec![1, 1, 2, 2, 4],
            ..VqVaeConfig::default()
        };
        assert_eq!(automatic_decode_chunk(&released, 16 * 16, 32), 6);
        assert_eq!(automatic_decode_chunk(&released, 16 * 16, 4), 4);
        assert_eq!(automatic_decode_chunk(&released, 32 * 32, 32), 1);
        // With a graph recorded the batch runs whole.
        drop(_ng);
        assert_eq!(vae.decode_chunk(&f_hat.detach().with_grad().unwrap()), 5);
    }

    #[test]
    fn the_progression_adds_one_scale_per_image_and_ends_at_the_image() {
        let (vae, _) = crate::test_models::tiny(16, 4, &[1, 2, 4], 5, 1, 32, 2);
        let mut g = mvar_engine::Generator::new(1);
        let idx: Vec<Tensor> = [1usize, 2, 4]
            .iter()
            .map(|&pn| {
                let codes: Vec<i64> = g
                    .uniform(2 * pn * pn, 0.0, 16.0)
                    .iter()
                    .map(|&u| u as i64)
                    .collect();
                Tensor::from_vec(codes, vec![2, pn * pn], &Device::Cpu).unwrap()
            })
            .collect();
        let steps = vae.idx_to_progression(&idx).unwrap();
        assert_eq!(steps.len(), 3);
        for (k, step) in steps.iter().enumerate() {
            assert_eq!(step.dims(), &[2, 3, 8, 8]);
            let want = vae.idx_to_img(&idx[..=k]).unwrap();
            assert_eq!(
                step.to_vec_f32().unwrap(),
                want.to_vec_f32().unwrap(),
                "scale {k}"
            );
        }
        // Each scale changes the image (a progression of equal images would pass the above).
        for k in 1..3 {
            assert_ne!(
                steps[k].to_vec_f32().unwrap(),
                steps[k - 1].to_vec_f32().unwrap(),
                "scale {k}"
            );
        }
        let wrong = [idx[0].clone(), idx[0].clone()];
        let e = vae.idx_to_progression(&wrong).unwrap_err().to_string();
        assert!(e.contains("token map 1") && e.contains("[B, 4]"), "{e}");
    }

    #[test]
    fn default_config_is_the_release() {
        let c = VqVaeConfig::default();
        assert_eq!((c.vocab_size, c.z_channels, c.ch), (4096, 32, 160));
        assert_eq!(c.total_tokens(), 680);
        assert_eq!(c.downsample(), 16);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn parameter_count_of_the_release() {
        // Spec 9: the VAE has 108.95 M parameters (encoder 44.108 M, decoder 64.654 M,
        // quantizer 0.168 M, quant convs 2 x 9,248). Built here without allocating the weights
        // would be nicer; at ~436 MB of f32 it is still quick to construct.
        let vae = VqVae::new(VqVaeConfig::default(), &Device::Cpu, 0).unwrap();
        let n = vae.params.num_elements();
        assert_eq!(n, 108_948_355, "{n}");
    }
}
