//! Element types. Floats: f32 (the default), bf16 (storage type for mixed precision; every CPU
//! kernel computes bf16 in f32 and rounds once at the end) and f64 (CPU only, for the gradient
//! checks). Integers: i64 for indices (token ids, gather/index_select, argmax) and u8 for masks
//! and images.

use std::fmt;

use half::bf16;

use crate::storage::CpuStorage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F64,
    I64,
    U8,
}

impl DType {
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F64)
    }

    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
            DType::F64 => 8,
            DType::I64 => 8,
            DType::U8 => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Rust type that is the element type of some [`DType`].
pub trait WithDType: Copy + Send + Sync + fmt::Debug + PartialOrd + 'static {
    const DTYPE: DType;
    fn to_f64(self) -> f64;
    /// Converts with Rust's `as` semantics for integers (truncation) and rounding for bf16.
    fn from_f64(v: f64) -> Self;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
    fn into_storage(v: Vec<Self>) -> CpuStorage;
}

macro_rules! with_dtype {
    ($t:ty, $variant:ident, $to:expr, $from:expr) => {
        impl WithDType for $t {
            const DTYPE: DType = DType::$variant;
            fn to_f64(self) -> f64 {
                $to(self)
            }
            fn from_f64(v: f64) -> Self {
                $from(v)
            }
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
        }
    };
}

with_dtype!(f32, F32, |x: f32| x as f64, |v: f64| v as f32);
with_dtype!(f64, F64, |x: f64| x, |v: f64| v);
with_dtype!(bf16, BF16, |x: bf16| x.to_f64(), bf16::from_f64);
with_dtype!(i64, I64, |x: i64| x as f64, |v: f64| v as i64);
with_dtype!(u8, U8, |x: u8| x as f64, |v: f64| v as u8);

/// The float types CPU kernels are written for. bf16 tensors are computed as f32 (see
/// [`crate::cpu::run_float`]), so kernels only ever see f32 or f64.
pub trait Float:
    WithDType + num_traits::Float + Default + std::iter::Sum + fmt::Display + std::ops::AddAssign
{
    fn from_f32(v: f32) -> Self;
    fn from_usize(v: usize) -> Self;
    /// Widens to f64 (exact for f32 and f64; unlike `ToPrimitive::to_f64`, never None).
    fn as_f64(self) -> f64;
    /// e^self for the CPU kernels' hot loops: [`exp_f32`] for f32 (branch-free, so a loop of it
    /// vectorises; within 2 ulp of the exact value), libm's `exp` for f64 (gradient checks keep
    /// full precision).
    fn exp_fast(self) -> Self;
    /// tanh(self) for the hot loops: [`tanh_f32`] for f32, libm's `tanh` for f64.
    fn tanh_fast(self) -> Self;
}

/// tanh(x) in f32 without a libm call, branch-free: the odd Taylor polynomial to x^17 for
/// |x| < 0.55 (truncation below 5e-8 relative there), (1 - e) / (1 + e) with e = exp(-2|x|) and
/// x's sign above it (no cancellation: e <= 0.34). NaN gives NaN, +-inf gives +-1.
#[inline(always)]
pub fn tanh_f32(x: f32) -> f32 {
    let a = x.abs();
    let e = exp_f32(-2.0 * a);
    let large = ((1.0 - e) / (1.0 + e)).copysign(x);
    let x2 = x * x;
    let small = x
        * (1.0
            + x2 * (-1.0 / 3.0
                + x2 * (2.0 / 15.0
                    + x2 * (-17.0 / 315.0
                        + x2 * (62.0 / 2835.0
                            + x2 * (-1382.0 / 155_925.0
                                + x2 * (21_844.0 / 6_081_075.0
                                    + x2 * (-929_569.0 / 638_512_875.0
                                        + x2 * (6_404_582.0 / 10_854_718_875.0)))))))));
    if a < 0.55 {
        small
    } else {
        large
    }
}

/// e^x in f32 without a libm call: x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite split of ln2),
/// e^r by its Taylor polynomial to degree 7 (truncation below 1e-8 relative), times 2^n applied
/// as two exact powers of two so that results down to the subnormals come out right. Branch-free
/// (clamps and selects), so a loop over it vectorises. NaN gives NaN, x > 88.7228 gives +inf,
/// x < -104 gives 0.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (|v| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4; // 355 / 512: n * LN2_HI is exact for |n| < 2^15
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-104.0, 88.8);
    let shifted = xc * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n as an integer from the bits of `shifted` (in [2^23, 2^24), where the ulp is 1, its low
    // mantissa bits are n + 2^22), not `n as i32`: Rust's saturating float-to-int cast compiles
    // to a scalar convert and two conditional moves per lane, which made the vectorised loops
    // of every exp-based op (silu, softmax, gelu, tanh) 2-3x slower. The same integer for every
    // finite x; for NaN the bits are garbage (hence the wrapping arithmetic), but p is NaN then.
    let ni = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let half = ni >> 1;
    let s1 = f32::from_bits((half.wrapping_add(127) << 23) as u32);
    let s2 = f32::from_bits((ni.wrapping_sub(half).wrapping_add(127) << 23) as u32);
    let y = p * s1 * s2;
    if x > 88.722_84 {
        f32::INFINITY
    } else {
        y
    }
}

impl Float for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn from_usize(v: usize) -> Self {
        v as f32
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn tanh_fast(self) -> Self {
        tanh_f32(self)
    }
}

impl Float for f64 {
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    fn from_usize(v: usize) -> Self {
        v as f64
    }
    fn as_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn tanh_fast(self) -> Self {
        self.tanh()
    }
}

#[cfg(test)]
mod tests {
    use super::{exp_f32, tanh_f32};

    /// Distance in units in the last place between two positive finite f32.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_f32_is_within_two_ulp_of_the_exact_value_over_its_whole_range() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.7 {
            let exact = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp_f32(x), exact));
            x += 0.000_37;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        // Small arguments, where e^x ~ 1 + x, too.
        for i in -1000..1000 {
            let x = i as f32 * 1e-7;
            assert!(ulps(exp_f32(x), (x as f64).exp() as f32) <= 1, "{x}");
        }
    }

    #[test]
    fn exp_f32_edges() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        // The largest finite result and a subnormal one.
        let big = exp_f32(88.72);
        assert!(big.is_finite() && ulps(big, (88.72f32 as f64).exp() as f32) <= 2);
        let tiny = exp_f32(-100.0);
        let want = (-100f64).exp() as f32;
        assert!(
            tiny > 0.0 && (tiny - want).abs() <= 2.0 * f32::from_bits(1),
            "{tiny} vs {want}"
        );
    }

    #[test]
    fn tanh_f32_is_within_a_few_ulp_of_the_exact_value() {
        let mut worst = 0;
        let mut x = -12.0f32;
        while x < 12.0 {
            let exact = (x as f64).tanh() as f32;
            let got = tanh_f32(x);
            assert_eq!(got.is_sign_negative(), exact.is_sign_negative(), "{x}");
            worst = worst.max(ulps(got.abs(), exact.abs()));
            x += 0.000_13;
        }
        assert!(worst <= 3, "worst error {worst} ulp");
        for i in -1000..1000 {
            let x = i as f32 * 1e-6;
            let exact = (x as f64).tanh() as f32;
            assert!(ulps(tanh_f32(x).abs(), exact.abs()) <= 1, "{x}");
        }
        assert!(tanh_f32(f32::NAN).is_nan());
        assert_eq!(tanh_f32(f32::INFINITY), 1.0);
        assert_eq!(tanh_f32(f32::NEG_INFINITY), -1.0);
        assert_eq!(tanh_f32(0.0), 0.0);
    }
}
