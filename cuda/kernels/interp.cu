// interp.cu: area resampling (adaptive average pooling) and bicubic resampling of planes, forward
// and backward, matching the CPU reference in ops/src/interp.rs (PyTorch's
// F.interpolate(mode='area' | 'bicubic'), align_corners=False, no antialias).
//
// Layout: x [planes, H, W] (planes = N*C, dense, row-major), y [planes, OH, OW]. Any sizes >= 1
// in either direction (the host checks them and that the index arithmetic below fits an i64).
//
// Area, along one axis of `in` inputs and `out` outputs: output i averages inputs
//   [lo(i), hi(i)) = [floor(i*in/out), ceil((i+1)*in/out)),
// the 2-D cell being the product of the row and column windows. Input r lies in the windows of
// the outputs
//   first(r) = floor(r*out/in) ..= last(r) = floor(((r+1)*out - 1)/in)
// (lo(i) <= r  <=>  i*in < (r+1)*out  <=>  i <= ((r+1)*out - 1)/in, and
//  hi(i) > r    <=>  (i+1)*in > r*out  <=>  i >= floor(r*out/in)),
// so the backward is a gather: one thread per input element sums g/count over exactly those
// cells. No atomics, every dx element has one writer.
//
// Bicubic, along one axis: scale = in/out (f32), src = (o + 0.5)*scale - 0.5 (not clamped),
// i0 = floor(src), t = src - i0, taps i0-1 .. i0+2 clamped to [0, in-1] with weights
// W(t+1), W(t), W(1-t), W(2-t), A = -0.75, all in f32 as PyTorch's kernel computes them. The
// forward interpolates along W then along H (the CPU reference's order).
// The backward is a gather too: one thread per input element (r, c) walks the output rows and
// columns that may tap it, recomputes their taps with the forward's own function (so the weights
// are bitwise the forward's), and sums w_row * w_col * g over the taps that land on (r, c),
// counting a clamped tap hit several times once per hit. The candidate outputs along an axis
// come from the exact integer form of "floor(src) in [r-2, r+1]", i.e.
//   (2*out*(r-2) + out - in) / (2*in)  <=  o  <  (2*out*(r+2) + out - in) / (2*in),
// widened by a margin of 2 + out/2^20 outputs on each side for f32 rounding of src, and running
// to the first (last) output for r = 0 (r = in-1), which collects every clamped tap. Candidates
// that do not tap r contribute nothing (each one is checked), so a wide range costs time only.
// cuda/src/ops/interp.rs checks this range on the host against an f32 mirror of the taps.
//
// Parallel decomposition: one thread per element written, grid-stride loops, 256 threads.
// Numerics: f32 throughout (bf16 widened on load, rounded once on store); the CPU reference sums
// in f64, the parity tolerance covers the difference.

#include "cubic.cuh"

__device__ __forceinline__ i64 area_lo(i64 i, i64 in, i64 out) { return (i * in) / out; }
__device__ __forceinline__ i64 area_hi(i64 i, i64 in, i64 out) { return ((i + 1) * in + out - 1) / out; }

// y[pl, oy, ox] = mean of x[pl, r, c] over the cell's window.
template <typename T>
__device__ void area_fwd_impl(T* y, const T* x, i64 total, i64 h, i64 w, i64 oh, i64 ow) {
    GRID_STRIDE(i, total) {
        i64 ox = i % ow;
        i64 rest = i / ow;
        i64 oy = rest % oh;
        i64 pl = rest / oh;
        i64 r0 = area_lo(oy, h, oh), r1 = area_hi(oy, h, oh);
        i64 c0 = area_lo(ox, w, ow), c1 = area_hi(ox, w, ow);
        const T* xp = x + pl * h * w;
        float s = 0.0f;
        for (i64 r = r0; r < r1; ++r) {
            for (i64 c = c0; c < c1; ++c) s += Io<T>::load(xp, r * w + c);
        }
        Io<T>::store(y, i, s / (float)((r1 - r0) * (c1 - c0)));
    }
}

// dx[pl, r, c] = sum over the cells (oy, ox) whose window holds (r, c) of g[pl, oy, ox] / count.
template <typename T>
__device__ void area_bwd_impl(T* dx, const T* g, i64 total, i64 h, i64 w, i64 oh, i64 ow) {
    GRID_STRIDE(i, total) {
        i64 ix = i % w;
        i64 rest = i / w;
        i64 iy = rest % h;
        i64 pl = rest / h;
        i64 y0 = (iy * oh) / h, y1 = min(oh - 1, ((iy + 1) * oh - 1) / h);
        i64 x0 = (ix * ow) / w, x1 = min(ow - 1, ((ix + 1) * ow - 1) / w);
        const T* gp = g + pl * oh * ow;
        float s = 0.0f;
        for (i64 oy = y0; oy <= y1; ++oy) {
            i64 rc = area_hi(oy, h, oh) - area_lo(oy, h, oh);
            for (i64 ox = x0; ox <= x1; ++ox) {
                i64 cc = area_hi(ox, w, ow) - area_lo(ox, w, ow);
                s += Io<T>::load(gp, oy * ow + ox) / (float)(rc * cc);
            }
        }
        Io<T>::store(dx, i, s);
    }
}

// The outputs along an axis that may tap input r: [*lo, *hi], a superset of the true set (see the
// header). C's truncating division rounds toward zero, which only widens the range here.
__device__ __forceinline__ void cubic_candidates(i64 r, i64 in, i64 out, i64* lo, i64* hi) {
    i64 margin = 2 + (out >> 20);
    i64 den = 2 * in;
    i64 a = (2 * out * (r - 2) + out - in) / den - margin;
    i64 b = (2 * out * (r + 2) + out - in) / den + margin;
    *lo = (r == 0) ? 0 : max(a, (i64)0);
    *hi = (r == in - 1) ? out - 1 : min(b, out - 1);
}

// y[pl, oy, ox] = sum_ky wy[ky] * sum_kx wx[kx] * x[pl, ry[ky], cx[kx]].
template <typename T>
__device__ void bicubic_fwd_impl(T* y, const T* x, i64 total, i64 h, i64 w, i64 oh, i64 ow) {
    GRID_STRIDE(i, total) {
        i64 ox = i % ow;
        i64 rest = i / ow;
        i64 oy = rest % oh;
        i64 pl = rest / oh;
        i64 ry[4], cx[4];
        float wy[4], wx[4];
        cubic_taps(oy, h, oh, ry, wy);
        cubic_taps(ox, w, ow, cx, wx);
        const T* xp = x + pl * h * w;
        float acc = 0.0f;
#pragma unroll
        for (int ky = 0; ky < 4; ++ky) {
            const T* row = xp + ry[ky] * w;
            float rv = 0.0f;
#pragma unroll
            for (int kx = 0; kx < 4; ++kx) rv += wx[kx] * Io<T>::load(row, cx[kx]);
            acc += wy[ky] * rv;
        }
        Io<T>::store(y, i, acc);
    }
}

// The summed weight of the taps of output o that land on input r along an axis; false when none
// does.
__device__ __forceinline__ bool cubic_weight_on(i64 o, i64 r, i64 in, i64 out, float* weight) {
    i64 idx[4];
    float wt[4];
    cubic_taps(o, in, out, idx, wt);
    bool hit = false;
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        if (idx[k] == r) {
            s += wt[k];
            hit = true;
        }
    }
    *weight = s;
    return hit;
}

// dx[pl, r, c] = sum over (oy, ox) of w_row(oy, r) * w_col(ox, c) * g[pl, oy, ox].
template <typename T>
__device__ void bicubic_bwd_impl(T* dx, const T* g, i64 total, i64 h, i64 w, i64 oh, i64 ow) {
    GRID_STRIDE(i, total) {
        i64 ix = i % w;
        i64 rest = i / w;
        i64 iy = rest % h;
        i64 pl = rest / h;
        i64 y0, y1, x0, x1;
        cubic_candidates(iy, h, oh, &y0, &y1);
        cubic_candidates(ix, w, ow, &x0, &x1);
        const T* gp = g + pl * oh * ow;
        float s = 0.0f;
        for (i64 oy = y0; oy <= y1; ++oy) {
            float wr;
            if (!cubic_weight_on(oy, iy, h, oh, &wr)) continue;
            const T* grow = gp + oy * ow;
            float inner = 0.0f;
            for (i64 ox = x0; ox <= x1; ++ox) {
                float wc;
                if (!cubic_weight_on(ox, ix, w, ow, &wc)) continue;
                inner += wc * Io<T>::load(grow, ox);
            }
            s += wr * inner;
        }
        Io<T>::store(dx, i, s);
    }
}

#define INTERP_KERNELS(T, S)                                                                         \
    extern "C" __global__ void area_fwd_##S(T* y, const T* x, i64 total, i64 h, i64 w, i64 oh,     \
                                            i64 ow) {                                               \
        area_fwd_impl<T>(y, x, total, h, w, oh, ow);                                                \
    }                                                                                               \
    extern "C" __global__ void area_bwd_##S(T* dx, const T* g, i64 total, i64 h, i64 w, i64 oh,    \
                                            i64 ow) {                                               \
        area_bwd_impl<T>(dx, g, total, h, w, oh, ow);                                               \
    }                                                                                               \
    extern "C" __global__ void bicubic_fwd_##S(T* y, const T* x, i64 total, i64 h, i64 w, i64 oh,  \
                                               i64 ow) {                                            \
        bicubic_fwd_impl<T>(y, x, total, h, w, oh, ow);                                             \
    }                                                                                               \
    extern "C" __global__ void bicubic_bwd_##S(T* dx, const T* g, i64 total, i64 h, i64 w, i64 oh, \
                                               i64 ow) {                                            \
        bicubic_bwd_impl<T>(dx, g, total, h, w, oh, ow);                                            \
    }

INTERP_KERNELS(float, f32)
INTERP_KERNELS(bf16_t, bf16)
