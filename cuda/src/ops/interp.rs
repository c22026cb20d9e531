//! Launch wrappers of `kernels/interp.cu`: area and bicubic resampling of `planes` planes
//! [h, w] to [oh, ow], forward and backward (both backwards are gathers, see the kernel file).
//!
//! The tests at the bottom check the kernels' index arithmetic on the host: an exact mirror of
//! the area cell ranges against the windows, and of the bicubic candidate ranges against an f32
//! mirror of the taps, exhaustively over small sizes.

use cudarc::driver::PushKernelArg;

use crate::buffer::CudaBuffer;
use crate::device::{launch_1d, launch_err};
use crate::kernels::INTERP;
use crate::ops::{check_lens, float_kind};
use crate::{CudaDevice, CudaError};

const THREADS: u32 = 256;

fn invalid(op: &str, sizes: String, message: impl Into<String>) -> CudaError {
    CudaError::Launch {
        op: op.to_string(),
        sizes,
        message: message.into(),
    }
}

/// (input elements, output elements) of `planes` planes [h, w] -> [oh, ow], after checking that
/// every size is at least 1 and that the kernels' i64 index arithmetic cannot overflow (it forms
/// products up to about 4 * (in + 3) * (out + 1) per axis).
fn sizes(op: &str, planes: usize, hw: [usize; 4]) -> Result<(usize, usize), CudaError> {
    let [h, w, oh, ow] = hw;
    let desc = || format!("{planes} planes, [h, w, oh, ow] {hw:?}");
    if hw.contains(&0) {
        return Err(invalid(op, desc(), "expected sizes >= 1"));
    }
    let fits = |a: usize, b: usize| (a as u128 + 3) * (b as u128 + 1) * 4 <= i64::MAX as u128;
    if !fits(h, oh) || !fits(w, ow) {
        return Err(invalid(
            op,
            desc(),
            "sizes too large for the kernels' indexing",
        ));
    }
    let vol = |a: usize, b: usize| {
        planes
            .checked_mul(a)
            .and_then(|v| v.checked_mul(b))
            .filter(|&v| v <= i64::MAX as usize)
            .ok_or_else(|| invalid(op, desc(), "element count overflows"))
    };
    Ok((vol(h, w)?, vol(oh, ow)?))
}

/// Launches `<name>_<suffix>(out, src, total = out.len(), h, w, oh, ow)`.
fn launch(
    dev: &CudaDevice,
    name: &str,
    out: &CudaBuffer,
    src: &CudaBuffer,
    hw: [usize; 4],
) -> Result<(), CudaError> {
    let total = out.len();
    if total == 0 {
        return Ok(());
    }
    let f = dev.function(&INTERP, &format!("{name}_{}", src.kind().suffix()))?;
    let (po, ps, nt) = (out.device_ptr(), src.device_ptr(), total as i64);
    let [h, w, oh, ow] = hw.map(|v| v as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&po)
        .arg(&ps)
        .arg(&nt)
        .arg(&h)
        .arg(&w)
        .arg(&oh)
        .arg(&ow);
    // SAFETY: the callers check that the buffers hold planes*h*w and planes*oh*ow elements (one
    // of each, of one kind); every index the kernels form lies inside them (taps and windows are
    // clamped to the planes).
    unsafe { b.launch(launch_1d(total, THREADS)) }.map_err(launch_err(
        name,
        format!("{total} elements, [h, w, oh, ow] {hw:?}"),
    ))?;
    Ok(())
}

/// A forward: x [planes, h, w] -> [planes, oh, ow].
fn forward(
    dev: &CudaDevice,
    op: &str,
    kernel: &str,
    x: &CudaBuffer,
    planes: usize,
    hw: [usize; 4],
) -> Result<CudaBuffer, CudaError> {
    let kind = float_kind(op, &[x])?;
    let (in_len, out_len) = sizes(op, planes, hw)?;
    check_lens(op, &[(x, in_len)])?;
    let out = dev.alloc(kind, out_len, &format!("{op} output"))?;
    launch(dev, kernel, &out, x, hw)?;
    Ok(out)
}

/// A backward: g [planes, oh, ow] -> dx [planes, h, w].
fn backward(
    dev: &CudaDevice,
    op: &str,
    kernel: &str,
    g: &CudaBuffer,
    planes: usize,
    hw: [usize; 4],
) -> Result<CudaBuffer, CudaError> {
    let kind = float_kind(op, &[g])?;
    let (in_len, out_len) = sizes(op, planes, hw)?;
    check_lens(op, &[(g, out_len)])?;
    let dx = dev.alloc(kind, in_len, &format!("{op} output"))?;
    launch(dev, kernel, &dx, g, hw)?;
    Ok(dx)
}

/// Area resampling (adaptive average pooling) of `planes` planes [h, w] (x) to [oh, ow]: each
/// output the mean of its window. f32 or bf16.
pub fn area_downsample(
    dev: &CudaDevice,
    x: &CudaBuffer,
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Result<CudaBuffer, CudaError> {
    forward(
        dev,
        "area_downsample",
        "area_fwd",
        x,
        planes,
        [h, w, oh, ow],
    )
}

/// area_downsample's backward: dx [planes, h, w] from g [planes, oh, ow], each element the sum of
/// g / window size over the cells whose window holds it.
pub fn area_downsample_backward(
    dev: &CudaDevice,
    g: &CudaBuffer,
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Result<CudaBuffer, CudaError> {
    backward(
        dev,
        "area_downsample backward",
        "area_bwd",
        g,
        planes,
        [h, w, oh, ow],
    )
}

/// Bicubic resampling (A = -0.75, align_corners false, taps clamped to the border) of `planes`
/// planes [h, w] (x) to [oh, ow]. f32 or bf16.
pub fn bicubic_upsample(
    dev: &CudaDevice,
    x: &CudaBuffer,
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Result<CudaBuffer, CudaError> {
    forward(
        dev,
        "bicubic_upsample",
        "bicubic_fwd",
        x,
        planes,
        [h, w, oh, ow],
    )
}

/// bicubic_upsample's backward (the transpose of its weights): dx [planes, h, w] from
/// g [planes, oh, ow].
pub fn bicubic_upsample_backward(
    dev: &CudaDevice,
    g: &CudaBuffer,
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Result<CudaBuffer, CudaError> {
    backward(
        dev,
        "bicubic_upsample backward",
        "bicubic_bwd",
        g,
        planes,
        [h, w, oh, ow],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // Host mirrors of the device index arithmetic in interp.cu (same integer expressions).

    fn area_lo(i: i64, n: i64, m: i64) -> i64 {
        (i * n) / m
    }

    fn area_hi(i: i64, n: i64, m: i64) -> i64 {
        ((i + 1) * n + m - 1) / m
    }

    /// The output cells whose window holds input r (area_bwd's y0 ..= y1).
    fn area_cells(r: i64, n: i64, m: i64) -> (i64, i64) {
        ((r * m) / n, (m - 1).min(((r + 1) * m - 1) / n))
    }

    /// cubic_taps in f32, without the device's fused multiply-adds.
    fn cubic_taps(o: i64, n: i64, m: i64) -> [i64; 4] {
        let scale = n as f32 / m as f32;
        let src = (o as f32 + 0.5) * scale - 0.5;
        let i0 = src.floor() as i64;
        std::array::from_fn(|k| (i0 - 1 + k as i64).clamp(0, n - 1))
    }

    fn cubic_candidates(r: i64, n: i64, m: i64) -> (i64, i64) {
        let margin = 2 + (m >> 20);
        let den = 2 * n;
        let a = (2 * m * (r - 2) + m - n) / den - margin;
        let b = (2 * m * (r + 2) + m - n) / den + margin;
        let lo = if r == 0 { 0 } else { a.max(0) };
        let hi = if r == n - 1 { m - 1 } else { b.min(m - 1) };
        (lo, hi)
    }

    #[test]
    fn area_cell_ranges_are_exactly_the_windows_holding_each_input() {
        for n in 1..=48i64 {
            for m in 1..=48i64 {
                for r in 0..n {
                    let want: Vec<i64> = (0..m)
                        .filter(|&i| area_lo(i, n, m) <= r && r < area_hi(i, n, m))
                        .collect();
                    let (lo, hi) = area_cells(r, n, m);
                    let got: Vec<i64> = (lo..=hi).collect();
                    assert_eq!(got, want, "in {n}, out {m}, r {r}");
                }
            }
        }
        // The CPU's windows (u128 floor/ceil) are the same as the device's.
        for (n, m) in [(16i64, 13i64), (5, 16), (7, 3), (1, 9), (9, 1)] {
            for i in 0..m {
                let (nn, mm, ii) = (n as u128, m as u128, i as u128);
                assert_eq!(area_lo(i, n, m) as u128, ii * nn / mm);
                assert_eq!(area_hi(i, n, m) as u128, ((ii + 1) * nn).div_ceil(mm));
            }
        }
    }

    fn check_cubic(n: i64, m: i64) {
        for r in 0..n {
            let (lo, hi) = cubic_candidates(r, n, m);
            assert!(0 <= lo && hi < m, "in {n}, out {m}, r {r}: [{lo}, {hi}]");
            for o in 0..m {
                if cubic_taps(o, n, m).contains(&r) {
                    assert!(
                        lo <= o && o <= hi,
                        "in {n}, out {m}: output {o} taps {r} outside [{lo}, {hi}]"
                    );
                }
            }
        }
    }

    #[test]
    fn bicubic_candidates_hold_every_output_that_taps_an_input() {
        for n in 1..=40 {
            for m in 1..=40 {
                check_cubic(n, m);
            }
        }
        for (n, m) in [
            (1, 4000),
            (3, 2999),
            (5, 16),
            (16, 5),
            (3001, 7),
            (257, 1023),
        ] {
            check_cubic(n, m);
        }
    }

    #[test]
    fn sizes_are_checked() {
        assert!(sizes("t", 2, [3, 4, 5, 6]).is_ok());
        assert_eq!(sizes("t", 2, [3, 4, 5, 6]).unwrap(), (24, 60));
        assert!(sizes("t", 2, [0, 4, 5, 6]).is_err());
        assert!(sizes("t", 2, [3, 4, 5, 0]).is_err());
        assert!(sizes("t", 1, [usize::MAX / 2, 1, 1 << 40, 1]).is_err());
        assert!(sizes("t", usize::MAX, [2, 2, 2, 2]).is_err());
    }
}
