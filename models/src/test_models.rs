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

/// The more_smooth checks shared by the VAR and MVAR samplers; `sample(sc, seed)` samples the
/// same two labels with `sc` from `Generator::new(seed)`.
/// - top-k 1 keeps one logit, so the Gumbel softmax is one-hot on the drawn code: the same
///   tokens and, up to rounding (the codes go through Phi unfused), the same f_hat as without.
/// - with every code kept, f_hat grows by a mixture: finite and not the hard f_hat; the first
///   scale's tokens, drawn before any Gumbel noise, are the same.
pub(crate) fn check_more_smooth(sample: impl Fn(crate::SampleConfig, u64) -> crate::SampleOutput) {
    let ints = |o: &crate::SampleOutput| -> Vec<Vec<i64>> {
        o.idx.iter().map(|t| t.to_vec::<i64>().unwrap()).collect()
    };
    let floats = |o: &crate::SampleOutput| o.f_hat.to_vec_f32().unwrap();
    let greedy = crate::SampleConfig {
        cfg: 2.0,
        top_k: 1,
        top_p: 0.0,
        more_smooth: false,
    };
    let smooth = crate::SampleConfig {
        more_smooth: true,
        ..greedy
    };
    let (a, b) = (sample(greedy, 3), sample(smooth, 3));
    assert_eq!(ints(&a), ints(&b));
    let worst = mvar_ops::testing::max_abs_diff_f32(&floats(&a), &floats(&b));
    let scale = floats(&a).iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    assert!(
        scale > 1e-3 && worst <= 1e-5 * scale.max(1.0),
        "{worst} of {scale}"
    );

    let all = crate::SampleConfig { top_k: 0, ..greedy };
    let (a, b) = (
        sample(all, 4),
        sample(
            crate::SampleConfig {
                more_smooth: true,
                ..all
            },
            4,
        ),
    );
    assert_eq!(ints(&a)[0], ints(&b)[0]);
    let (fa, fb) = (floats(&a), floats(&b));
    assert!(fb.iter().all(|x| x.is_finite()));
    let moved = fa
        .iter()
        .zip(&fb)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(moved > 1e-3, "more_smooth left f_hat as it was ({moved})");
}
