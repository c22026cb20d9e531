//! Tiny configurations shared by the unit tests of the models (CPU, a few thousand parameters).

use mvar_engine::Device;

use crate::{VarConfig, VqVae, VqVaeConfig};

/// A tokenizer with 32 channels at one level (no self-attention) and the given codebook,
/// latent channels and pyramid, built from `seed`; and a VAR config of `depth` blocks of width
/// `width` (2 heads) for `classes` classes that fits it.
pub(crate) fn tiny(
    vocab: usize,
    z: usize,
    pyramid: &[usize],
    seed: u64,
    depth: usize,
    width: usize,
    classes: usize,
) -> (VqVae, VarConfig) {
    let vcfg = VqVaeConfig {
        vocab_size: vocab,
        z_channels: z,
        ch: 32,
        ch_mult: vec![1, 1],
        num_res_blocks: 1,
        v_patch_nums: pyramid.to_vec(),
        using_sa: false,
        using_mid_sa: false,
        ..VqVaeConfig::default()
    };
    let tcfg = VarConfig {
        embed_dim: width,
        num_heads: 2,
        num_classes: classes,
        patch_nums: pyramid.to_vec(),
        cvae: z,
        vocab_size: vocab,
        ..VarConfig::with_depth(depth)
    };
    (VqVae::new(vcfg, &Device::Cpu, seed).unwrap(), tcfg)
}
