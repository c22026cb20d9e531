//! Model configurations read off official state dicts.
//!
//! The released VAR and MVAR checkpoints (and the VQVAE `vae_ch160v4096z32.pth`) hold tensors
//! only: no configuration travels with them. What `VAR.__init__` and `VQVAE.__init__` were
//! given can be read back from the names and shapes of the tensors they made: depth from the
//! block count, width from `pos_start`, heads from `scale_mul_1H11`, classes from `class_emb`,
//! the vocabulary from `head`, the token pyramid from the `lvl_1L` buffer, the tokenizer's
//! channels and levels from its convolutions. What no shape records (LayerNorm eps, the Phi
//! residual ratio, z-normalisation, the training-only rates) keeps the official value.

use std::collections::BTreeMap;
use std::path::Path;

use mvar_engine::{DType, Error, Result, Tensor};

use crate::var::VarConfig;
use crate::vqvae::VqVaeConfig;

/// Tensors by official name, as a checkpoint holds them.
pub type StateDict = BTreeMap<String, Tensor>;

/// The token pyramids of the released models (256 px and 512 px), for a state dict without the
/// `lvl_1L` buffer: told apart by their number of scales and tokens.
pub const RELEASED_PYRAMIDS: &[&[usize]] = &[
    &[1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
    &[1, 2, 3, 4, 6, 9, 13, 18, 24, 32],
];

/// Reads a state dict from a `torch.save` checkpoint (zip format) or a safetensors file, told
/// apart by their first bytes. With `strip_prefix`, only tensors under it are kept, without it
/// (`model` keeps `model.x` as `x`), as `mvar convert` does.
pub fn read_state_dict(path: &Path, strip_prefix: Option<&str>) -> Result<StateDict> {
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        // A file shorter than 4 bytes is neither format; the safetensors reader says why.
        let _ = f.read(&mut magic).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
    }
    if magic == *b"PK\x03\x04" {
        return Ok(crate::pth::read_pth(path, strip_prefix)?.tensors);
    }
    let all = crate::checkpoint::read_safetensors(path)?;
    let Some(prefix) = crate::pth::dotted_prefix(strip_prefix) else {
        return Ok(all);
    };
    let kept: StateDict = all
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|s| (s.to_string(), v)))
        .collect();
    if kept.is_empty() {
        return Err(Error::Format {
            what: path.display().to_string(),
            msg: format!("no tensor's name starts with {prefix:?}"),
        });
    }
    Ok(kept)
}

/// Reads shapes off one state dict, naming it and the tensor it needed in every error.
struct Shapes<'a> {
    sd: &'a StateDict,
    what: &'a str,
}

impl Shapes<'_> {
    fn dims(&self, name: &str, rank: usize) -> Result<Vec<usize>> {
        let t = self.sd.get(name).ok_or_else(|| Error::Format {
            what: self.what.to_string(),
            msg: format!("tensor {name:?} is missing (expected in an official state dict)"),
        })?;
        if t.dims().len() != rank {
            return Err(Error::Format {
                what: self.what.to_string(),
                msg: format!(
                    "tensor {name:?} has shape {}; expected {rank} dimensions",
                    t.shape()
                ),
            });
        }
        Ok(t.dims().to_vec())
    }

    fn has(&self, name: &str) -> bool {
        self.sd.contains_key(name)
    }

    /// How many consecutive `prefix{i}.` groups exist, from i = 0.
    fn count(&self, prefix: &str) -> usize {
        let mut n = 0;
        while self
            .sd
            .range(format!("{prefix}{n}.")..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&format!("{prefix}{n}.")))
        {
            n += 1;
        }
        n
    }

    fn bad(&self, msg: String) -> Error {
        Error::Format {
            what: self.what.to_string(),
            msg,
        }
    }
}

/// The token pyramid recorded by a `lvl_1L` buffer ([1, L], the scale of every token): each
/// scale's token count must be a square, the scales in order.
fn pyramid_of_levels(s: &Shapes, levels: &Tensor) -> Result<Vec<usize>> {
    let ids = levels
        .to_dtype(DType::I64)
        .and_then(|t| t.to_vec::<i64>())
        .map_err(|e| s.bad(format!("lvl_1L unreadable: {e}")))?;
    let mut counts: Vec<usize> = Vec::new();
    for &id in &ids {
        if id < 0 || id as usize > counts.len() || (id as usize) + 1 < counts.len() {
            return Err(s.bad(format!(
                "lvl_1L is not a run of scale ids 0, 0.., 1, 1.., ... (found {id} after scale {})",
                counts.len().saturating_sub(1)
            )));
        }
        if id as usize == counts.len() {
            counts.push(0);
        }
        counts[id as usize] += 1;
    }
    counts
        .iter()
        .enumerate()
        .map(|(si, &n)| {
            let side = (n as f64).sqrt().round() as usize;
            if side * side == n {
                Ok(side)
            } else {
                Err(s.bad(format!(
                    "lvl_1L gives scale {si} {n} tokens, which is not a square map"
                )))
            }
        })
        .collect()
}

/// The configuration of the VAR transformer (also MVAR's, which has the same tensors) whose
/// state dict `sd` is; `what` names it in errors. `patch_nums` overrides the pyramid, which is
/// otherwise read from `lvl_1L` or, without that buffer, matched against the released pyramids.
pub fn var_config_from_state_dict(
    sd: &StateDict,
    what: &str,
    patch_nums: Option<&[usize]>,
) -> Result<VarConfig> {
    let s = Shapes { sd, what };
    let width = s.dims("pos_start", 3)?[2];
    let tokens = s.dims("pos_1LC", 3)?[1];
    let scales = s.dims("lvl_embed.weight", 2)?[0];
    let depth = s.count("blocks.");
    if depth == 0 {
        return Err(s.bad("no blocks.0.* tensors: not a VAR / MVAR transformer".into()));
    }
    let (heads, l2_norm) = if s.has("blocks.0.attn.scale_mul_1H11") {
        (s.dims("blocks.0.attn.scale_mul_1H11", 4)?[1], true)
    } else {
        // Without the l2-normalised attention the official head dim is still 64.
        (width / 64, false)
    };
    let hidden = s.dims("blocks.0.ffn.fc1.weight", 2)?[0];
    let classes = s.dims("class_emb.weight", 2)?[0];
    if classes < 2 {
        return Err(s.bad(format!(
            "class_emb.weight has {classes} rows; expected the classes plus the null class"
        )));
    }
    let cvae = s.dims("word_embed.weight", 2)?[1];
    let vocab = s.dims("head.weight", 2)?[0];
    let pyramid: Vec<usize> = match (patch_nums, sd.get("lvl_1L")) {
        (Some(p), _) => p.to_vec(),
        (None, Some(levels)) => pyramid_of_levels(&s, levels)?,
        (None, None) => RELEASED_PYRAMIDS
            .iter()
            .find(|p| p.len() == scales && p.iter().map(|x| x * x).sum::<usize>() == tokens)
            .map(|p| p.to_vec())
            .ok_or_else(|| {
                s.bad(format!(
                    "{tokens} tokens in {scales} scales match no released pyramid and there is no \
                     lvl_1L buffer: give the pyramid (--patch-nums)"
                ))
            })?,
    };
    let pyramid_tokens: usize = pyramid.iter().map(|p| p * p).sum();
    if pyramid.len() != scales || pyramid_tokens != tokens {
        return Err(s.bad(format!(
            "pyramid {pyramid:?} has {} scales and {pyramid_tokens} tokens; the weights have {scales} \
             scales (lvl_embed) and {tokens} tokens (pos_1LC)",
            pyramid.len()
        )));
    }
    let mut cfg = VarConfig::with_depth(depth);
    cfg.embed_dim = width;
    cfg.num_heads = heads;
    cfg.mlp_ratio = hidden as f64 / width as f64;
    cfg.num_classes = classes - 1;
    cfg.patch_nums = pyramid;
    cfg.shared_aln = s.has("shared_ada_lin.1.weight");
    cfg.attn_l2_norm = l2_norm;
    cfg.cvae = cvae;
    cfg.vocab_size = vocab;
    cfg.validate()?;
    Ok(cfg)
}

/// The configuration of the multi-scale VQVAE whose state dict `sd` is, for the token pyramid
/// `patch_nums` (the transformer's; a VQVAE's tensors do not depend on it).
pub fn vqvae_config_from_state_dict(
    sd: &StateDict,
    what: &str,
    patch_nums: &[usize],
) -> Result<VqVaeConfig> {
    let s = Shapes { sd, what };
    let mut cfg: VqVaeConfig = serde_json::from_value(serde_json::json!({})).expect("defaults");
    let codebook = s.dims("quantize.embedding.weight", 2)?;
    cfg.vocab_size = codebook[0];
    cfg.z_channels = codebook[1];
    cfg.ch = s.dims("encoder.conv_in.weight", 4)?[0];
    let levels = s.count("encoder.down.");
    if levels == 0 {
        return Err(s.bad("no encoder.down.0.* tensors: not a VQVAE".into()));
    }
    cfg.ch_mult = (0..levels)
        .map(|i| {
            let out = s.dims(&format!("encoder.down.{i}.block.0.conv2.weight"), 4)?[0];
            if out % cfg.ch != 0 {
                return Err(s.bad(format!(
                    "encoder.down.{i} has {out} channels, not a multiple of conv_in's {}",
                    cfg.ch
                )));
            }
            Ok(out / cfg.ch)
        })
        .collect::<Result<_>>()?;
    cfg.num_res_blocks = s.count("encoder.down.0.block.");
    cfg.quant_conv_ks = s.dims("quant_conv.weight", 4)?[2];
    cfg.share_quant_resi = s.count("quantize.quant_resi.qresi_ls.");
    if cfg.share_quant_resi == 0 {
        return Err(s.bad(
            "no quantize.quant_resi.qresi_ls.0.* tensors: expected the partially shared Phi convs of the \
             release (share_quant_resi 4)"
                .into(),
        ));
    }
    cfg.using_sa = s.has(&format!("encoder.down.{}.attn.0.qkv.weight", levels - 1));
    cfg.using_mid_sa = s.has("encoder.mid.attn_1.qkv.weight");
    cfg.v_patch_nums = patch_nums.to_vec();
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Mixing, Var, VqVae};
    use mvar_engine::Device;

    fn state_dict(named: Vec<(String, Tensor)>) -> StateDict {
        named.into_iter().collect()
    }

    /// A small transformer config with every field the reader recovers set explicitly.
    fn small(depth: usize, width: usize, heads: usize, patch_nums: &[usize]) -> VarConfig {
        VarConfig {
            embed_dim: width,
            num_heads: heads,
            num_classes: 3 + depth,
            patch_nums: patch_nums.to_vec(),
            cvae: 4 * depth,
            vocab_size: 16 * depth,
            ..VarConfig::with_depth(depth)
        }
    }

    #[test]
    fn a_var_config_is_read_back_from_its_weights() {
        let mut cfg = small(2, 96, 3, &[1, 2, 4]);
        cfg.mlp_ratio = 2.0;
        for shared in [false, true] {
            cfg.shared_aln = shared;
            let var = Var::new(cfg.clone(), &Device::Cpu, 0, Mixing::BlockCausal).unwrap();
            let sd = state_dict(var.named_tensors());
            let got = var_config_from_state_dict(&sd, "test", None).unwrap();
            assert_eq!(got, cfg);
            // Without lvl_1L an unreleased pyramid cannot be told, unless it is given.
            let mut no_levels = sd.clone();
            no_levels.remove("lvl_1L");
            let e = var_config_from_state_dict(&no_levels, "test", None).unwrap_err();
            assert!(e.to_string().contains("--patch-nums"), "{e}");
            let got = var_config_from_state_dict(&no_levels, "test", Some(&[1, 2, 4])).unwrap();
            assert_eq!(got, cfg);
            let e = var_config_from_state_dict(&no_levels, "test", Some(&[1, 2, 3])).unwrap_err();
            assert!(e.to_string().contains("14 tokens"), "{e}");
        }
    }

    #[test]
    fn the_released_pyramid_is_recognised_without_lvl_1l() {
        // The official width and heads of depth 1.
        let cfg = small(1, 64, 1, RELEASED_PYRAMIDS[0]);
        let var = Var::new(cfg.clone(), &Device::Cpu, 0, Mixing::BlockCausal).unwrap();
        let mut sd = state_dict(var.named_tensors());
        sd.remove("lvl_1L");
        let got = var_config_from_state_dict(&sd, "test", None).unwrap();
        assert_eq!(got.patch_nums, RELEASED_PYRAMIDS[0]);
        assert_eq!(got, cfg);
    }

    #[test]
    fn a_missing_tensor_is_named() {
        let var = Var::new(
            small(1, 64, 1, &[1, 2]),
            &Device::Cpu,
            0,
            Mixing::BlockCausal,
        )
        .unwrap();
        let mut sd = state_dict(var.named_tensors());
        sd.remove("head.weight");
        let e = var_config_from_state_dict(&sd, "var.pth", None).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("var.pth") && m.contains("\"head.weight\" is missing"),
            "{m}"
        );
        let e = vqvae_config_from_state_dict(&sd, "var.pth", &[1, 2]).unwrap_err();
        assert!(e.to_string().contains("quantize.embedding.weight"), "{e}");
    }

    #[test]
    fn a_vqvae_config_is_read_back_from_its_weights() {
        let cfg = VqVaeConfig {
            vocab_size: 24,
            z_channels: 8,
            ch: 32,
            ch_mult: vec![1, 2, 2],
            num_res_blocks: 1,
            share_quant_resi: 3,
            v_patch_nums: vec![1, 2, 4],
            using_sa: false,
            ..serde_json::from_value(serde_json::json!({})).unwrap()
        };
        let vae = VqVae::new(cfg.clone(), &Device::Cpu, 0).unwrap();
        let sd = state_dict(vae.named_tensors());
        let got = vqvae_config_from_state_dict(&sd, "test", &[1, 2, 4]).unwrap();
        assert_eq!(got, cfg);
    }

    #[test]
    fn levels_that_are_not_square_maps_are_refused() {
        let levels = Tensor::from_vec(vec![0i64, 1, 1, 1], vec![1, 4], &Device::Cpu).unwrap();
        let sd = StateDict::new();
        let s = Shapes { sd: &sd, what: "x" };
        let e = pyramid_of_levels(&s, &levels).unwrap_err();
        assert!(e.to_string().contains("scale 1 3 tokens"), "{e}");
        let levels = Tensor::from_vec(vec![0i64, 2, 2, 2, 2], vec![1, 5], &Device::Cpu).unwrap();
        assert!(pyramid_of_levels(&s, &levels).is_err());
        let levels = Tensor::from_vec(vec![0i64, 1, 1, 1, 1], vec![1, 5], &Device::Cpu).unwrap();
        assert_eq!(pyramid_of_levels(&s, &levels).unwrap(), vec![1, 2]);
    }
}
