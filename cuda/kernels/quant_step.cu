// quant_step.cu: one scale's update of the multi-scale residual quantizer, fused:
//   out = acc + sign * Phi(bicubic_up(E[idx]))
// where E[idx] is the code map of the scale (codebook rows looked up by the token map idx),
// bicubic_up resamples it from the scale's [ph, pw] to the full [h, w] (exactly the identity when
// the sizes agree, see cubic.cuh), and Phi(u) = (1 - r) u + r (conv3x3(u) + bias), a 3x3
// convolution with zero padding 1 (the quantizer's shared Phi convolutions), or Phi(u) = u when
// the ratio is 0. sign is +1 for f_hat += ..., -1 for the residual -= ... . The unfused form is
// embedding -> permute -> bicubic_upsample -> conv2d -> mul_scalar x 2 -> add -> add/sub, eight
// launches and six intermediate tensors per scale; this is two launches and one intermediate.
//
// Layouts (dense, row-major): idx i64 [B, ph*pw] (each in [0, V); the host checks them), table
// [V, C], u [B, C, h, w] (the intermediate), weight [C, C, 3, 3] (out, in, ky, kx), bias [C] or
// null, acc and out [B, C, h, w].
//
// - codes_bicubic: u[b, c, y, x] = sum_ky wy[ky] sum_kx wx[kx] E[idx[b, ry[ky]*pw + cx[kx]], c],
//   the taps of cubic.cuh, summed in the bicubic op's order (along x, then along y), so u is
//   bitwise what bicubic_upsample gives for the looked-up map. One thread per (b, group of
//   CB_GROUP channels, y, x): the taps and the 16 indices are computed and loaded once per
//   group. When the sizes agree the code is copied as is.
// - phi_conv_acc: a block of 256 threads owns a 16 x 16 tile of output pixels of one image and
//   PHI_OCG = 8 output channels (grid: tiles x channel groups x B). It walks the input channels
//   PHI_ICK = 16 at a time, staging the tile of u with its one-pixel halo (zero outside the map:
//   the convolution's padding) and the group's weights in shared memory; each thread
//   accumulates the 8 outputs of its pixel, input channels in increasing order, taps row by row.
//   The epilogue adds the bias, mixes with u and adds to acc.
//
// Numerics: f32 throughout (bf16 widened on load, rounded once on store). The CPU reference is
// the unfused composition (ops/src/quant.rs); the convolution sums in another order than the
// CPU's GEMM, so the results agree to f32 rounding.

#include "cubic.cuh"

#define CB_GROUP 8
#define PHI_TILE 16
#define PHI_HALO (PHI_TILE + 2)
#define PHI_OCG 8
#define PHI_ICK 16
#define PHI_THREADS (PHI_TILE * PHI_TILE)

#define CODE_NAN __int_as_float(0x7fc00000)

// Channels c0.. of code id's row, or null for an index outside [0, v): the host checks every
// index before launching, so this only keeps a bad one from reading out of bounds (its outputs
// become NaN).
template <typename T>
__device__ __forceinline__ const T* code_row(const T* table, i64 id, i64 v, i64 c, i64 c0) {
    return (id >= 0 && id < v) ? table + id * c + c0 : nullptr;
}

template <typename T>
__device__ void codes_bicubic_impl(T* u, const i64* idx, const T* table, i64 batch, i64 c, i64 v,
                                   i64 ph, i64 pw, i64 h, i64 w) {
    const i64 groups = (c + CB_GROUP - 1) / CB_GROUP;
    const i64 total = batch * groups * h * w;
    const bool same = (ph == h) && (pw == w);
    GRID_STRIDE(i, total) {
        i64 x = i % w;
        i64 rest = i / w;
        i64 y = rest % h;
        rest /= h;
        i64 g = rest % groups;
        i64 b = rest / groups;
        i64 c0 = g * CB_GROUP;
        int nc = (int)min((i64)CB_GROUP, c - c0);
        const i64* ib = idx + b * ph * pw;
        T* ub = u + ((b * c + c0) * h + y) * w + x;
        if (same) {
            const T* row = code_row(table, ib[y * pw + x], v, c, c0);
            for (int k = 0; k < nc; ++k) Io<T>::store(ub, (i64)k * h * w, row ? Io<T>::load(row, k) : CODE_NAN);
            continue;
        }
        i64 ry[4], cx[4];
        float wy[4], wx[4];
        cubic_taps(y, ph, h, ry, wy);
        cubic_taps(x, pw, w, cx, wx);
        const T* rows[16];
#pragma unroll
        for (int ky = 0; ky < 4; ++ky) {
#pragma unroll
            for (int kx = 0; kx < 4; ++kx) rows[ky * 4 + kx] = code_row(table, ib[ry[ky] * pw + cx[kx]], v, c, c0);
        }
        for (int k = 0; k < nc; ++k) {
            float acc = 0.0f;
#pragma unroll
            for (int ky = 0; ky < 4; ++ky) {
                float rv = 0.0f;
#pragma unroll
                for (int kx = 0; kx < 4; ++kx) {
                    const T* row = rows[ky * 4 + kx];
                    rv += wx[kx] * (row ? Io<T>::load(row, k) : CODE_NAN);
                }
                acc += wy[ky] * rv;
            }
            Io<T>::store(ub, (i64)k * h * w, acc);
        }
    }
}

// out = acc + sign * (keep u + r (conv3x3(u) + bias)), or acc + sign * u when use_conv == 0; keep
// is 1 - r as the host rounds it (the unfused form scales by that same f32).
template <typename T>
__device__ void phi_conv_acc_impl(T* out, const T* acc, const T* u, const T* weight, const T* bias,
                                  i64 c, i64 h, i64 w, float keep, float r, float sign, int use_conv) {
    __shared__ float tile[PHI_ICK][PHI_HALO][PHI_HALO];
    __shared__ float wsm[PHI_OCG][PHI_ICK][9];
    const int tid = threadIdx.x;
    const int tx = tid % PHI_TILE, ty = tid / PHI_TILE;
    const i64 tiles_x = (w + PHI_TILE - 1) / PHI_TILE;
    const i64 x0 = (i64)(blockIdx.x % tiles_x) * PHI_TILE;
    const i64 y0 = (i64)(blockIdx.x / tiles_x) * PHI_TILE;
    const i64 co0 = (i64)blockIdx.y * PHI_OCG;
    const i64 b = blockIdx.z;
    const i64 plane = h * w;
    const T* ub = u + b * c * plane;
    const i64 x = x0 + tx, y = y0 + ty;
    float sum[PHI_OCG];
#pragma unroll
    for (int o = 0; o < PHI_OCG; ++o) sum[o] = 0.0f;
    if (use_conv) {
        for (i64 ci0 = 0; ci0 < c; ci0 += PHI_ICK) {
            // The halo tile of PHI_ICK input channels (zero past C and outside the map).
            for (int e = tid; e < PHI_ICK * PHI_HALO * PHI_HALO; e += PHI_THREADS) {
                int k = e / (PHI_HALO * PHI_HALO);
                int rem = e % (PHI_HALO * PHI_HALO);
                int hy = rem / PHI_HALO, hx = rem % PHI_HALO;
                i64 gy = y0 + hy - 1, gx = x0 + hx - 1;
                float v = 0.0f;
                if (ci0 + k < c && gy >= 0 && gy < h && gx >= 0 && gx < w)
                    v = Io<T>::load(ub, (ci0 + k) * plane + gy * w + gx);
                tile[k][hy][hx] = v;
            }
            for (int e = tid; e < PHI_OCG * PHI_ICK * 9; e += PHI_THREADS) {
                int o = e / (PHI_ICK * 9);
                int rem = e % (PHI_ICK * 9);
                int k = rem / 9, t = rem % 9;
                float v = 0.0f;
                if (co0 + o < c && ci0 + k < c) v = Io<T>::load(weight, ((co0 + o) * c + ci0 + k) * 9 + t);
                wsm[o][k][t] = v;
            }
            __syncthreads();
            for (int k = 0; k < PHI_ICK; ++k) {
                float nb[9];
#pragma unroll
                for (int t = 0; t < 9; ++t) nb[t] = tile[k][ty + t / 3][tx + t % 3];
#pragma unroll
                for (int o = 0; o < PHI_OCG; ++o) {
#pragma unroll
                    for (int t = 0; t < 9; ++t) sum[o] += wsm[o][k][t] * nb[t];
                }
            }
            __syncthreads();
        }
    }
    if (x >= w || y >= h) return;
#pragma unroll
    for (int o = 0; o < PHI_OCG; ++o) {
        i64 co = co0 + o;
        if (co >= c) break;
        i64 at = (b * c + co) * plane + y * w + x;
        float uv = Io<T>::load(u, at);
        float phi = uv;
        if (use_conv) {
            float conv = sum[o] + (bias ? Io<T>::load(bias, co) : 0.0f);
            phi = keep * uv + r * conv;
        }
        Io<T>::store(out, at, Io<T>::load(acc, at) + sign * phi);
    }
}

#define QUANT_STEP_KERNELS(T, S)                                                                      \
    extern "C" __global__ void codes_bicubic_##S(T* u, const i64* idx, const T* table, i64 batch,    \
                                                 i64 c, i64 v, i64 ph, i64 pw, i64 h, i64 w) {     \
        codes_bicubic_impl<T>(u, idx, table, batch, c, v, ph, pw, h, w);                             \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(PHI_THREADS)                                        \
        phi_conv_acc_##S(T* out, const T* acc, const T* u, const T* weight, const T* bias, i64 c,    \
                         i64 h, i64 w, float keep, float r, float sign, int use_conv) {              \
        phi_conv_acc_impl<T>(out, acc, u, weight, bias, c, h, w, keep, r, sign, use_conv);           \
    }

QUANT_STEP_KERNELS(float, f32)
QUANT_STEP_KERNELS(bf16_t, bf16)
