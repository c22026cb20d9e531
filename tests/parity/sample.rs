//! Token sampling with top-k / top-p (`ops::sample_top_k_top_p`) on CUDA against the CPU: the
//! same logits and uniforms must give the same token in every row, for f32 and bf16 logits and
//! every CUDA kernel (block per row with the row read once and held or re-read from memory, which
//! must agree bit for bit, and naive). Logits come coarse (quarter steps: many ties at the
//! k-th value and in the top-p order) or fine, with every top-k regime (0, 1, inside, V, past V)
//! and top-p 0, 0.5, 0.96, 1 and 1e-300 (where 1 - top_p rounds to 1).
//!
//! The GPU sums in another order than the CPU's sequential f64 sums, so a row may differ only
//! where the GPU's token is one the definition allows with every running sum (top-p's
//! cumulative probability against 1 - top_p, the draw's running weight against u * total)
//! moved by up to 1e-12 (see [`allowed`]); such a row is reported, and any other difference
//! fails. The filter alone (`ops::filter_top_k_top_p`, what more_smooth sampling reads) is held
//! to the same rule: its kept set is the CPU's or one the sums allow within 1e-12.

use mvar::engine::{DType, Device, Generator, Tensor};
use mvar::ops::{self, SampleKernel};
use proptest::prelude::*;

use crate::{config, gpu, randn};

/// Whether `token` is a draw the module's definition allows for `row` and `u` once each running
/// sum may be off by `eps` (relative): the top-p cut may move across positions whose cumulative
/// probability lies within `eps` of 1 - top_p (never dropping the largest), and the token's
/// interval of the draw's running weight must hold u * total within `eps` of its ends. Top-k
/// compares values only and has no slack.
fn allowed(row: &[f64], u: f64, top_k: usize, top_p: f64, token: i64, eps: f64) -> bool {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let v = row.len();
    allowed_keeps(row, top_k, top_p, eps)
        .into_iter()
        .any(|keep| {
            let w: Vec<f64> = (0..v)
                .map(|i| if keep[i] { (row[i] - m).exp() } else { 0.0 })
                .collect();
            let total: f64 = w.iter().sum();
            let t = token as usize;
            if t >= v || w[t] == 0.0 {
                return false;
            }
            let before: f64 = w[..t].iter().sum();
            let target = u * total;
            before - eps * total <= target && target < before + w[t] + eps * total
        })
}

/// The sets of logits top-k and top-p may keep once the top-p running sums may be off by
/// `eps`: one per position of the cut consistent with them.
fn allowed_keeps(row: &[f64], top_k: usize, top_p: f64, eps: f64) -> Vec<Vec<bool>> {
    let v = row.len();
    let mut sorted = row.to_vec();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let kth = if top_k == 0 || top_k >= v {
        f64::NEG_INFINITY
    } else {
        sorted[top_k - 1]
    };
    let m = sorted[0];
    let kept: Vec<bool> = row.iter().map(|&x| x >= kth).collect();
    // Ascending by value, ties by index; cum[j] the running probability through position j.
    let mut order: Vec<usize> = (0..v).filter(|&i| kept[i]).collect();
    order.sort_by(|&a, &b| row[a].partial_cmp(&row[b]).unwrap());
    let z: f64 = order.iter().map(|&i| (row[i] - m).exp()).sum();
    let cum: Vec<f64> = order
        .iter()
        .scan(0.0, |acc, &i| {
            *acc += (row[i] - m).exp() / z;
            Some(*acc)
        })
        .collect();
    let n = order.len();
    // Prefix lengths r (positions 0..r dropped) consistent with the sums within eps.
    let cuts: Vec<usize> = if top_p > 0.0 {
        let limit = 1.0 - top_p;
        (0..n)
            .filter(|&r| {
                (r == 0 || cum[r - 1] <= limit + eps) && (r == n - 1 || cum[r] > limit - eps)
            })
            .collect()
    } else {
        vec![0]
    };
    cuts.into_iter()
        .map(|r| {
            let mut keep = kept.clone();
            for &i in &order[..r] {
                keep[i] = false;
            }
            keep
        })
        .collect()
}

fn sample_on(
    logits: &Tensor,
    device: &Device,
    u: &[f64],
    top_k: usize,
    top_p: f64,
    kernel: SampleKernel,
) -> Vec<i64> {
    let x = logits.to_device(device).unwrap();
    ops::sample_top_k_top_p_with(&x, u, top_k, top_p, kernel)
        .unwrap_or_else(|e| panic!("{e}"))
        .to_vec::<i64>()
        .unwrap()
}

/// Every kernel and dtype against the CPU on `logits` [rows, v] (f32, CPU).
fn tokens_agree(logits: &Tensor, u: &[f64], top_k: usize, top_p: f64) {
    let Some(dev) = gpu() else { return };
    let v = logits.dims()[1];
    for dtype in [DType::F32, DType::BF16] {
        // The reference sees the values the bf16 run sees.
        let x = logits.to_dtype(dtype).unwrap();
        let reference = x.to_dtype(DType::F32).unwrap();
        let want = sample_on(
            &reference,
            &Device::Cpu,
            u,
            top_k,
            top_p,
            SampleKernel::BlockPerRow,
        );
        let rows: Vec<f64> = reference.to_vec_f64().unwrap();
        for (r, &w) in want.iter().enumerate() {
            assert!(
                allowed(&rows[r * v..(r + 1) * v], u[r], top_k, top_p, w, 1e-12),
                "the check refuses the CPU's row {r}"
            );
        }
        // Rows held (V <= 4096) and re-read from memory: the same sums in the
        // same order, so the same tokens, not merely allowed ones.
        assert_eq!(
            sample_on(&x, &dev, u, top_k, top_p, SampleKernel::BlockPerRow),
            sample_on(
                &x,
                &dev,
                u,
                top_k,
                top_p,
                SampleKernel::BlockPerRowFromMemory
            ),
            "{dtype:?} [{}, {v}] top_k {top_k} top_p {top_p}: the block-per-row kernels differ",
            u.len()
        );
        for kernel in [SampleKernel::BlockPerRow, SampleKernel::Naive] {
            let got = sample_on(&x, &dev, u, top_k, top_p, kernel);
            for (r, (&g, &w)) in got.iter().zip(&want).enumerate() {
                if g == w {
                    continue;
                }
                let row = &rows[r * v..(r + 1) * v];
                assert!(
                    allowed(row, u[r], top_k, top_p, g, 1e-12),
                    "{kernel:?} {dtype:?} [{}, {v}] top_k {top_k} top_p {top_p}: row {r} drew {g}, the CPU {w}, \
                     and no running sum lies within 1e-12 of a threshold that would allow {g}",
                    u.len()
                );
                println!(
                    "{kernel:?} {dtype:?}: row {r} drew {g} for the CPU's {w} at a rounding tie"
                );
            }
        }
    }
}

/// Logits [rows, v]: N(0, scale^2), or on a grid of quarter steps (ties).
fn logits(rows: usize, v: usize, scale: f32, coarse: bool, seed: u64) -> Tensor {
    let x: Vec<f32> = randn(&[rows, v], seed)
        .to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(|x| {
            let y = x * scale;
            if coarse {
                (y * 4.0).round() / 4.0
            } else {
                y
            }
        })
        .collect();
    Tensor::from_vec(x, [rows, v], &Device::Cpu).unwrap()
}

/// `ops::filter_top_k_top_p` on CUDA against the CPU, f32 and bf16: kept logits bit for bit
/// the input, the rest -inf, and the kept set the CPU's or, at a top-p rounding tie, another
/// that the sums allow within 1e-12.
fn filters_agree(logits: &Tensor, top_k: usize, top_p: f64) {
    let Some(dev) = gpu() else { return };
    let v = logits.dims()[1];
    for dtype in [DType::F32, DType::BF16] {
        let x = logits.to_dtype(dtype).unwrap();
        let held = x.to_vec_f64().unwrap();
        let want = ops::filter_top_k_top_p(&x, top_k, top_p)
            .unwrap()
            .to_vec_f64()
            .unwrap();
        let on_gpu = x.to_device(&dev).unwrap();
        let got = ops::filter_top_k_top_p(&on_gpu, top_k, top_p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.dtype(), dtype);
        let got = got.to_vec_f64().unwrap();
        let from_memory = ops::filter_top_k_top_p_with(
            &on_gpu,
            top_k,
            top_p,
            SampleKernel::BlockPerRowFromMemory,
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .to_vec_f64()
        .unwrap();
        assert!(
            got.iter()
                .zip(&from_memory)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{dtype:?} [{}, {v}] top_k {top_k} top_p {top_p}: the block-per-row filters differ",
            held.len() / v
        );
        for (r, ((row, g), w)) in held
            .chunks(v)
            .zip(got.chunks(v))
            .zip(want.chunks(v))
            .enumerate()
        {
            for (i, &y) in g.iter().enumerate() {
                assert!(
                    y == row[i] || y == f64::NEG_INFINITY,
                    "{dtype:?} row {r} code {i}: {y} for the logit {}",
                    row[i]
                );
            }
            if g == w {
                continue;
            }
            let keep: Vec<bool> = g.iter().map(|y| y.is_finite()).collect();
            assert!(
                allowed_keeps(row, top_k, top_p, 1e-12).contains(&keep),
                "{dtype:?} [{}, {v}] top_k {top_k} top_p {top_p}: row {r} keeps another set than the CPU's, \
                 and no top-p running sum lies within 1e-12 of 1 - top_p that would allow it",
                held.len() / v
            );
            println!("{dtype:?}: row {r} kept another set than the CPU at a top-p rounding tie");
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn filtered_logits_match_the_cpu(
        rows in 1usize..24, v in 1usize..700, k_mode in 0usize..5, p_mode in 0usize..5,
        coarse in any::<bool>(), scale in 0.5f32..6.0, kth in any::<u16>(), seed in any::<u64>()
    ) {
        let top_k = [0, 1, 1 + kth as usize % v, v, v + 3][k_mode];
        let top_p = [0.0, 0.5, 0.96, 1.0, 1e-300][p_mode];
        filters_agree(&logits(rows, v, scale, coarse, seed), top_k, top_p);
    }

    #[test]
    fn sampled_tokens_match_the_cpu(
        rows in 1usize..24, v in 1usize..700, k_mode in 0usize..5, p_mode in 0usize..5,
        coarse in any::<bool>(), scale in 0.5f32..6.0, kth in any::<u16>(), seed in any::<u64>()
    ) {
        let top_k = [0, 1, 1 + kth as usize % v, v, v + 3][k_mode];
        // 1e-300: 1 - top_p rounds to 1, so only the rule that keeps the largest keeps anything.
        let top_p = [0.0, 0.5, 0.96, 1.0, 1e-300][p_mode];
        let u = Generator::new(seed ^ 0x5a5a).uniform(rows, 0.0, 1.0);
        tokens_agree(&logits(rows, v, scale, coarse, seed), &u, top_k, top_p);
    }
}

/// The official evaluation setting on a 4096-code vocabulary (top-k 900, top-p 0.96), greedy,
/// and rows past one block's stride; plus uniforms at the ends of [0, 1).
#[test]
fn official_settings_and_extreme_draws() {
    // 4097 codes: one more than a block holds, so every kernel re-reads the row.
    for (rows, v, top_k, top_p) in [
        (48, 4096, 900, 0.96),
        (8, 4096, 1, 0.0),
        (5, 1000, 0, 0.0),
        (3, 4097, 900, 0.96),
    ] {
        let x = logits(rows, v, 3.0, false, rows as u64);
        let mut u = Generator::new(7).uniform(rows, 0.0, 1.0);
        u[0] = 0.0;
        u[rows - 1] = 1.0 - f64::EPSILON;
        tokens_agree(&x, &u, top_k, top_p);
        filters_agree(&x, top_k, top_p);
    }
}

/// A NaN or an infinity is an error naming the row and the code on the GPU too.
#[test]
fn non_finite_logits_are_named_on_the_gpu() {
    let Some(dev) = gpu() else { return };
    for (bad, what) in [(f32::NAN, "NaN"), (f32::NEG_INFINITY, "-inf")] {
        let mut vals = vec![0.25f32; 5 * 7];
        vals[3 * 7 + 6] = bad;
        vals[4 * 7 + 1] = bad;
        let x = Tensor::from_vec(vals, [5, 7], &dev).unwrap();
        for kernel in [
            SampleKernel::BlockPerRow,
            SampleKernel::BlockPerRowFromMemory,
            SampleKernel::Naive,
        ] {
            let e = ops::sample_top_k_top_p_with(&x, &[0.5; 5], 0, 0.9, kernel)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("row 3 (of 5 rows of 7) at code 6"),
                "{kernel:?} {what}: {e}"
            );
        }
        for kernel in [
            SampleKernel::BlockPerRow,
            SampleKernel::BlockPerRowFromMemory,
        ] {
            let e = ops::filter_top_k_top_p_with(&x, 2, 0.9, kernel)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("filter_top_k_top_p") && e.contains("row 3 (of 5 rows of 7) at code 6"),
                "filter {kernel:?} {what}: {e}"
            );
        }
        let e = ops::filter_top_k_top_p_with(&x, 2, 0.9, SampleKernel::Naive)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no naive filter kernel"), "{e}");
    }
}
