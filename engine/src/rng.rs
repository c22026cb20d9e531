//! The one random number generator of the project: Philox4x32-10 (Salmon et al., "Parallel
//! random numbers: as easy as 1, 2, 3", SC 2011), counter-based.
//!
//! Why counter-based: element i of a draw depends only on (seed, offset + i / 4), so the CPU and a
//! GPU kernel produce the same numbers in any order or thread layout, a draw can be split across
//! threads without changing it, and the whole state is two integers (seed, offset) that a
//! checkpoint stores to resume a run bit for bit.
//!
//! Layout of one call: the key is the 64-bit seed, the 128-bit counter is (offset as two u32
//! words, 0, 0) for block `offset`; each block gives four u32 words. A draw of n values consumes
//! whole blocks and advances the offset past them.
//! - uniform u in (0, 1): `((w >> 8) + 0.5) / 2^24`, one word per value (exact in f32);
//! - normal: Box-Muller on the words (2j, 2j+1) of a block: r = sqrt(-2 ln u0), t = 2 pi u1,
//!   values r cos t and r sin t, so one block gives two normals.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// One Philox4x32-10 block.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The saved state of a [`Generator`], for checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeneratorState {
    pub seed: u64,
    pub offset: u64,
}

#[derive(Debug, Clone)]
pub struct Generator {
    seed: u64,
    offset: u64,
}

impl Generator {
    pub fn new(seed: u64) -> Self {
        Self { seed, offset: 0 }
    }

    pub fn from_state(state: GeneratorState) -> Self {
        Self {
            seed: state.seed,
            offset: state.offset,
        }
    }

    pub fn state(&self) -> GeneratorState {
        GeneratorState {
            seed: self.seed,
            offset: self.offset,
        }
    }

    fn key(&self) -> [u32; 2] {
        [self.seed as u32, (self.seed >> 32) as u32]
    }

    fn block(&self, index: u64) -> [u32; 4] {
        philox4x32_10([index as u32, (index >> 32) as u32, 0, 0], self.key())
    }

    /// `n` raw 32-bit words.
    pub fn next_u32s(&mut self, n: usize) -> Vec<u32> {
        let blocks = n.div_ceil(4) as u64;
        let mut out = Vec::with_capacity(n);
        for b in 0..blocks {
            out.extend_from_slice(&self.block(self.offset + b));
        }
        out.truncate(n);
        self.offset += blocks;
        out
    }

    /// Reserves the blocks a draw of `words` values consumes (ceil(words / 4), exactly as
    /// [`Generator::next_u32s`] advances) without computing them, and returns the first. A GPU
    /// kernel then draws value i from word i % 4 of block first + i / 4, keyed by the seed
    /// (`state().seed`) as (low word, high word).
    pub fn reserve(&mut self, words: usize) -> u64 {
        let first = self.offset;
        self.offset += words.div_ceil(4) as u64;
        first
    }

    /// `n` values uniform in (lo, hi).
    pub fn uniform(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        self.next_u32s(n)
            .into_iter()
            .map(|w| lo + (hi - lo) * u32_to_open_unit(w))
            .collect()
    }

    /// `n` values from N(mean, std^2).
    pub fn normal(&mut self, n: usize, mean: f64, std: f64) -> Vec<f64> {
        let pairs = n.div_ceil(2);
        let words = self.next_u32s(pairs * 2);
        let mut out = Vec::with_capacity(pairs * 2);
        for p in words.chunks_exact(2) {
            let r = (-2.0 * u32_to_open_unit(p[0]).ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * u32_to_open_unit(p[1]);
            out.push(mean + std * r * t.cos());
            out.push(mean + std * r * t.sin());
        }
        out.truncate(n);
        out
    }

    /// A generator for an independent stream, derived from this one (advances this one by one
    /// block). Used to give each data-loader worker or each layer its own stream.
    pub fn fork(&mut self) -> Generator {
        let w = self.next_u32s(2);
        Generator::new(((w[0] as u64) << 32 | w[1] as u64) ^ 0x5DEE_CE66_D1CE_4E5B)
    }
}

#[inline]
fn u32_to_open_unit(w: u32) -> f64 {
    ((w >> 8) as f64 + 0.5) * (1.0 / 16_777_216.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_the_random123_known_answers() {
        // Known-answer vectors of the Random123 distribution (kat_vectors, philox4x32 10 rounds).
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn draws_are_reproducible_and_split_consistently() {
        let mut a = Generator::new(7);
        let whole = a.uniform(8, 0.0, 1.0);
        let mut b = Generator::new(7);
        let mut parts = b.uniform(4, 0.0, 1.0);
        parts.extend(b.uniform(4, 0.0, 1.0));
        assert_eq!(whole, parts);
        assert_eq!(a.state(), b.state());
        let mut c = Generator::from_state(GeneratorState { seed: 7, offset: 1 });
        assert_eq!(c.uniform(4, 0.0, 1.0), whole[4..].to_vec());
    }

    #[test]
    fn the_gpu_mask_index_arithmetic_matches_uniform() {
        use mvar_cuda::ops::random::{draw_position, keep_mask_reference, keep_threshold};
        for (seed, skip, n, p) in [
            (0u64, 0usize, 1usize, 0.5f64),
            (7, 3, 4, 0.1),
            (0xDEAD_BEEF_0123_4567, 5, 5, 0.3),
            (u64::MAX, 1, 257, 0.9),
            (42, 0, 1023, 0.25),
        ] {
            let mut cpu = Generator::new(seed);
            cpu.next_u32s(skip);
            let mut gpu = cpu.clone();
            let u = cpu.uniform(n, 0.0, 1.0);
            let keep = 1.0 - p;
            let want: Vec<u8> = u.iter().map(|&v| (v < keep) as u8).collect();
            let first = gpu.reserve(n);
            assert_eq!(gpu.state(), cpu.state(), "reserve advances as uniform does");
            let key = gpu.key();
            let block = |b: u64| philox4x32_10([b as u32, (b >> 32) as u32, 0, 0], key);
            let got = keep_mask_reference(first, n, keep_threshold(keep), block);
            assert_eq!(got, want, "seed {seed}, n {n}, p {p}");
            // The word each value reads, one value at a time.
            for (i, &ui) in u.iter().enumerate() {
                let (b, q) = draw_position(first, i as u64);
                assert_eq!(u32_to_open_unit(block(b)[q]), ui);
            }
        }
        assert_eq!(Generator::new(1).reserve(0), 0);
    }

    #[test]
    fn normal_moments_are_right() {
        let mut g = Generator::new(1);
        let x = g.normal(200_000, 1.0, 2.0);
        let mean = x.iter().sum::<f64>() / x.len() as f64;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / x.len() as f64;
        assert!((mean - 1.0).abs() < 0.02, "{mean}");
        assert!((var - 4.0).abs() < 0.05, "{var}");
        let u = g.uniform(100_000, -1.0, 3.0);
        assert!(u.iter().all(|&v| v > -1.0 && v < 3.0));
    }
}
