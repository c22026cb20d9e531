// norm.cu: layer norm over the last axis (no affine), group norm with per-channel affine, and
// L2 normalisation over the last axis; forwards and fused backwards.
//
// Layouts (dense row-major):
// - layer_norm, l2_normalize: x [rows, d]; saved statistics in f32: (mean, rstd) interleaved as
//   [rows, 2] for layer norm, the L2 norm [rows] for l2_normalize. Their backwards read the
//   forward's output (xhat, y) instead of x, so the op's caller keeps one buffer, not two.
// - group_norm: x [N, C, S] (S the product of the spatial axes), weight and bias [C]. Group row
//   r = n * G + g holds the cpg = C / G channels of group g of sample n, which are contiguous:
//   cpg * S elements starting at r * cpg * S; element k of the row has channel g * cpg + k / S.
//   (mean, rstd) per group row are saved in f32 as [N * G, 2].
//
// Parallel decomposition:
// - every forward and the dx backwards: one block per row (group row for group norm); threads
//   stride the row (coalesced), block_sum gives the row sums, a last pass writes the row.
//   Blocks grid-stride over rows. These are the general kernels and the reference variant.
// - layer_norm_fwd_warp<VPL> (tuned, for d a multiple of the 16-byte vector, 4 f32 or 8 bf16, up
//   to 32 * VPL vectors, VPL <= 8: f32 d <= 1024, bf16 d <= 2048): one warp per row,
//   LN_WARP_ROWS warps a block. Lane l holds vectors l, l + 32, ... of its row in registers, read
//   once with 16-byte loads; mean and variance come from registers through warp shuffles (no
//   shared memory, no __syncthreads), so global memory sees one read and one write per element,
//   as in a copy. The block kernel reads each row three times and synchronises the block four
//   times per row.
// - l2_normalize_{fwd,bwd}_g<G> (tuned, for rows of at most G 16-byte vectors, G in 4, 8, 16,
//   32): a group of G lanes per row, 32 / G rows a warp, L2_GROUP_WARPS warps a block; lane j of
//   a group holds vector j of its row (read once, 16-byte loads), and the row's sums meet through
//   xor shuffles inside the group. Attention heads are short rows (64 elements: 8 bf16 vectors),
//   where the block kernel ran one block of 64 threads per row with two block-wide reductions.
// - group_norm_bwd_params: dweight[c] = sum(g * xhat) and dbias[c] = sum(g) reduce over samples
//   and positions, which is across rows. A second kernel computes them with one block per channel
//   (threads stride the N * S elements of the channel, block_sum combines), so each output has
//   one writer: no atomics, no zero fill, and a deterministic result.
//
// Numerics: f32 throughout (bf16 widened on load, rounded once on store); statistics two-pass
// (mean, then the mean of squared deviations: biased variance, as PyTorch), rstd =
// 1 / sqrt(var + eps) with eps inside the root.
//   layer norm:  y = xhat = (x - mean) * rstd;  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   group norm:  y = xhat * w[c] + b[c];  h = g * w[c];  dx = rstd * (h - mean(h) - xhat * mean(h * xhat))
//   l2:          y = x / max(n, eps);  dx = (g - y * sum(g * y)) / n if n >= eps, else g / eps
// The l2 branch depends only on the row's norm, so it is uniform across the block.

#define ROW_THREADS_MAX 512

// Two-pass mean and rstd of one row of d elements, returned to every thread of the block.
template <typename T>
__device__ __forceinline__ void row_mean_rstd(const T* xr, i64 d, float eps, float* scratch, float* mean,
                                              float* rstd) {
    float s = 0.0f;
    for (i64 k = threadIdx.x; k < d; k += blockDim.x) s += Io<T>::load(xr, k);
    float m = block_sum(s, scratch) / (float)d;
    float q = 0.0f;
    for (i64 k = threadIdx.x; k < d; k += blockDim.x) {
        float c = Io<T>::load(xr, k) - m;
        q += c * c;
    }
    float var = block_sum(q, scratch) / (float)d;
    *mean = m;
    *rstd = 1.0f / sqrtf(var + eps);
}

template <typename T>
__device__ void layer_norm_fwd_impl(T* y, float* stats, const T* x, i64 rows, i64 d, float eps) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * d;
        T* yr = y + r * d;
        float mean, rstd;
        row_mean_rstd(xr, d, eps, scratch, &mean, &rstd);
        for (i64 k = threadIdx.x; k < d; k += blockDim.x) Io<T>::store(yr, k, (Io<T>::load(xr, k) - mean) * rstd);
        if (threadIdx.x == 0) {
            stats[2 * r] = mean;
            stats[2 * r + 1] = rstd;
        }
    }
}

#define LN_WARP_ROWS 4

template <typename T, int VPL>
__device__ void layer_norm_fwd_warp_impl(T* y, float* stats, const T* x, i64 rows, i64 d, float eps) {
    constexpr int N = Vec16<T>::N;
    const int lane = threadIdx.x & 31;
    const i64 vecs = d / N;
    // Every lane of a warp has the same row, so the loop and the shuffles stay warp-uniform.
    for (i64 r = (i64)blockIdx.x * LN_WARP_ROWS + (threadIdx.x >> 5); r < rows;
         r += (i64)gridDim.x * LN_WARP_ROWS) {
        const T* xr = x + r * d;
        T* yr = y + r * d;
        float v[VPL * N];
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
            const i64 c = (i64)j * 32 + lane;
            if (c < vecs) {
                Vec16<T>::load(xr + c * N, v + j * N);
#pragma unroll
                for (int k = 0; k < N; ++k) s += v[j * N + k];
            }
        }
        const float mean = warp_sum(s) / (float)d;
        float q = 0.0f;
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
            if ((i64)j * 32 + lane < vecs) {
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    const float c = v[j * N + k] - mean;
                    q += c * c;
                }
            }
        }
        const float rstd = 1.0f / sqrtf(warp_sum(q) / (float)d + eps);
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
            const i64 c = (i64)j * 32 + lane;
            if (c < vecs) {
#pragma unroll
                for (int k = 0; k < N; ++k) v[j * N + k] = (v[j * N + k] - mean) * rstd;
                Vec16<T>::store(yr + c * N, v + j * N);
            }
        }
        if (lane == 0) {
            stats[2 * r] = mean;
            stats[2 * r + 1] = rstd;
        }
    }
}

template <typename T>
__device__ void layer_norm_bwd_impl(T* dx, const T* xhat, const T* g, const float* stats, i64 rows, i64 d) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* hr = xhat + r * d;
        const T* gr = g + r * d;
        T* dr = dx + r * d;
        float rstd = stats[2 * r + 1];
        float sg = 0.0f, sgx = 0.0f;
        for (i64 k = threadIdx.x; k < d; k += blockDim.x) {
            float gv = Io<T>::load(gr, k);
            sg += gv;
            sgx += gv * Io<T>::load(hr, k);
        }
        float mg = block_sum(sg, scratch) / (float)d;
        float mgx = block_sum(sgx, scratch) / (float)d;
        for (i64 k = threadIdx.x; k < d; k += blockDim.x) {
            Io<T>::store(dr, k, rstd * (Io<T>::load(gr, k) - mg - Io<T>::load(hr, k) * mgx));
        }
    }
}

template <typename T>
__device__ void group_norm_fwd_impl(T* y, float* stats, const T* x, const T* w, const T* b, i64 rows, i64 groups,
                                    i64 cpg, i64 spatial, float eps) {
    __shared__ float scratch[32];
    i64 d = cpg * spatial;
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * d;
        T* yr = y + r * d;
        i64 c0 = (r % groups) * cpg;
        float mean, rstd;
        row_mean_rstd(xr, d, eps, scratch, &mean, &rstd);
        for (i64 k = threadIdx.x; k < d; k += blockDim.x) {
            i64 c = c0 + k / spatial;
            float xhat = (Io<T>::load(xr, k) - mean) * rstd;
            Io<T>::store(yr, k, xhat * Io<T>::load(w, c) + Io<T>::load(b, c));
        }
        if (threadIdx.x == 0) {
            stats[2 * r] = mean;
            stats[2 * r + 1] = rstd;
        }
    }
}

template <typename T>
__device__ void group_norm_bwd_dx_impl(T* dx, const T* x, const T* w, const T* g, const float* stats, i64 rows,
                                       i64 groups, i64 cpg, i64 spatial) {
    __shared__ float scratch[32];
    i64 d = cpg * spatial;
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * d;
        const T* gr = g + r * d;
        T* dr = dx + r * d;
        i64 c0 = (r % groups) * cpg;
        float mean = stats[2 * r], rstd = stats[2 * r + 1];
        float sh = 0.0f, shx = 0.0f;
        // h = g * w rounded the same way in both loops (__fmul_rn is never fused into an FMA):
        // contracted, the second loop's h - mh becomes fma(g, w, -mh), the rounding error of
        // g * w instead of 0 for a one-element group, which rstd (up to 1 / sqrt(eps)) magnifies.
        for (i64 k = threadIdx.x; k < d; k += blockDim.x) {
            float h = __fmul_rn(Io<T>::load(gr, k), Io<T>::load(w, c0 + k / spatial));
            sh += h;
            shx += h * ((Io<T>::load(xr, k) - mean) * rstd);
        }
        float mh = block_sum(sh, scratch) / (float)d;
        float mhx = block_sum(shx, scratch) / (float)d;
        for (i64 k = threadIdx.x; k < d; k += blockDim.x) {
            float h = __fmul_rn(Io<T>::load(gr, k), Io<T>::load(w, c0 + k / spatial));
            float xhat = (Io<T>::load(xr, k) - mean) * rstd;
            Io<T>::store(dr, k, rstd * (h - mh - xhat * mhx));
        }
    }
}

template <typename T>
__device__ void group_norm_bwd_params_impl(T* dw, T* db, const T* x, const T* g, const float* stats, i64 batch,
                                           i64 channels, i64 groups, i64 cpg, i64 spatial) {
    __shared__ float scratch[32];
    i64 per_channel = batch * spatial;
    for (i64 c = blockIdx.x; c < channels; c += gridDim.x) {
        i64 grp = c / cpg;
        float sgx = 0.0f, sg = 0.0f;
        for (i64 j = threadIdx.x; j < per_channel; j += blockDim.x) {
            i64 nb = j / spatial, s = j - nb * spatial;
            i64 r = nb * groups + grp;
            i64 e = (nb * channels + c) * spatial + s;
            float gv = Io<T>::load(g, e);
            sgx += gv * ((Io<T>::load(x, e) - stats[2 * r]) * stats[2 * r + 1]);
            sg += gv;
        }
        sgx = block_sum(sgx, scratch);
        sg = block_sum(sg, scratch);
        if (threadIdx.x == 0) {
            Io<T>::store(dw, c, sgx);
            Io<T>::store(db, c, sg);
        }
    }
}

template <typename T>
__device__ void l2_normalize_fwd_impl(T* y, float* norms, const T* x, i64 rows, i64 d, float eps) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * d;
        T* yr = y + r * d;
        float ss = 0.0f;
        for (i64 k = threadIdx.x; k < d; k += blockDim.x) {
            float v = Io<T>::load(xr, k);
            ss += v * v;
        }
        float norm = sqrtf(block_sum(ss, scratch));
        float denom = fmaxf(norm, eps);
        for (i64 k = threadIdx.x; k < d; k += blockDim.x) Io<T>::store(yr, k, Io<T>::load(xr, k) / denom);
        if (threadIdx.x == 0) norms[r] = norm;
    }
}

template <typename T>
__device__ void l2_normalize_bwd_impl(T* dx, const T* y, const T* g, const float* norms, i64 rows, i64 d,
                                      float eps) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* yr = y + r * d;
        const T* gr = g + r * d;
        T* dr = dx + r * d;
        float norm = norms[r];
        if (norm >= eps) {
            float dot = 0.0f;
            for (i64 k = threadIdx.x; k < d; k += blockDim.x) dot += Io<T>::load(yr, k) * Io<T>::load(gr, k);
            dot = block_sum(dot, scratch);
            for (i64 k = threadIdx.x; k < d; k += blockDim.x) {
                Io<T>::store(dr, k, (Io<T>::load(gr, k) - Io<T>::load(yr, k) * dot) / norm);
            }
        } else {
            // The denominator was the constant eps: no dependence through the norm.
            for (i64 k = threadIdx.x; k < d; k += blockDim.x) Io<T>::store(dr, k, Io<T>::load(gr, k) / eps);
        }
    }
}

#define L2_GROUP_WARPS 4

// Sum over the G lanes of an aligned group (G a power of two up to 32); every lane gets it.
template <int G>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The row of this lane's group and the lane's vector in it, for the group kernels; `base` is the
// warp's first row (warp-uniform, so loops over it keep every lane for the shuffles).
#define L2_GROUP_LOOP(G, base)                                                              \
    for (i64 base = ((i64)blockIdx.x * L2_GROUP_WARPS + (threadIdx.x >> 5)) * (32 / G); base < rows; \
         base += (i64)gridDim.x * L2_GROUP_WARPS * (32 / G))

template <typename T, int G>
__device__ void l2_normalize_fwd_group_impl(T* y, float* norms, const T* x, i64 rows, i64 d, float eps) {
    constexpr int N = Vec16<T>::N;
    const int lane = threadIdx.x & 31, c = lane % G;
    const i64 vecs = d / N;
    L2_GROUP_LOOP(G, base) {
        const i64 r = base + lane / G;
        const bool ok = r < rows && c < vecs;
        float v[N];
        float ss = 0.0f;
        if (ok) {
            Vec16<T>::load(x + r * d + (i64)c * N, v);
#pragma unroll
            for (int k = 0; k < N; ++k) ss += v[k] * v[k];
        }
        const float norm = sqrtf(group_sum<G>(ss));
        const float denom = fmaxf(norm, eps);
        if (ok) {
#pragma unroll
            for (int k = 0; k < N; ++k) v[k] = v[k] / denom;
            Vec16<T>::store(y + r * d + (i64)c * N, v);
        }
        if (r < rows && c == 0) norms[r] = norm;
    }
}

template <typename T, int G>
__device__ void l2_normalize_bwd_group_impl(T* dx, const T* y, const T* g, const float* norms, i64 rows, i64 d,
                                            float eps) {
    constexpr int N = Vec16<T>::N;
    const int lane = threadIdx.x & 31, c = lane % G;
    const i64 vecs = d / N;
    L2_GROUP_LOOP(G, base) {
        const i64 r = base + lane / G;
        const bool ok = r < rows && c < vecs;
        const float norm = r < rows ? norms[r] : 1.0f;
        float yv[N], gv[N];
        float dot = 0.0f;
        if (ok) {
            Vec16<T>::load(y + r * d + (i64)c * N, yv);
            Vec16<T>::load(g + r * d + (i64)c * N, gv);
#pragma unroll
            for (int k = 0; k < N; ++k) dot += yv[k] * gv[k];
        }
        // Every lane shuffles; a row whose norm is below eps ignores the sum (the branch is per
        // row, so it may differ between the groups of a warp).
        dot = group_sum<G>(dot);
        if (ok) {
            if (norm >= eps) {
#pragma unroll
                for (int k = 0; k < N; ++k) gv[k] = (gv[k] - yv[k] * dot) / norm;
            } else {
                // The denominator was the constant eps: no dependence through the norm.
#pragma unroll
                for (int k = 0; k < N; ++k) gv[k] = gv[k] / eps;
            }
            Vec16<T>::store(dx + r * d + (i64)c * N, gv);
        }
    }
}

#define L2_GROUP_KERNELS(T, S, G)                                                                  \
    extern "C" __global__ void __launch_bounds__(L2_GROUP_WARPS * 32)                              \
        l2_normalize_fwd_g##G##_##S(T* y, float* norms, const T* x, i64 rows, i64 d, float eps) {  \
        l2_normalize_fwd_group_impl<T, G>(y, norms, x, rows, d, eps);                              \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(L2_GROUP_WARPS * 32)                              \
        l2_normalize_bwd_g##G##_##S(T* dx, const T* y, const T* g, const float* norms, i64 rows,   \
                                    i64 d, float eps) {                                            \
        l2_normalize_bwd_group_impl<T, G>(dx, y, g, norms, rows, d, eps);                          \
    }

L2_GROUP_KERNELS(float, f32, 4)
L2_GROUP_KERNELS(float, f32, 8)
L2_GROUP_KERNELS(float, f32, 16)
L2_GROUP_KERNELS(float, f32, 32)
L2_GROUP_KERNELS(bf16_t, bf16, 4)
L2_GROUP_KERNELS(bf16_t, bf16, 8)
L2_GROUP_KERNELS(bf16_t, bf16, 16)
L2_GROUP_KERNELS(bf16_t, bf16, 32)

#define LN_WARP_KERNEL(T, S, VPL)                                                                   \
    extern "C" __global__ void __launch_bounds__(LN_WARP_ROWS * 32)                                 \
        layer_norm_fwd_warp##VPL##_##S(T* y, float* stats, const T* x, i64 rows, i64 d, float eps) { \
        layer_norm_fwd_warp_impl<T, VPL>(y, stats, x, rows, d, eps);                                \
    }

LN_WARP_KERNEL(float, f32, 1)
LN_WARP_KERNEL(float, f32, 2)
LN_WARP_KERNEL(float, f32, 4)
LN_WARP_KERNEL(float, f32, 8)
LN_WARP_KERNEL(bf16_t, bf16, 1)
LN_WARP_KERNEL(bf16_t, bf16, 2)
LN_WARP_KERNEL(bf16_t, bf16, 4)
LN_WARP_KERNEL(bf16_t, bf16, 8)

#define NORM_KERNELS(T, S)                                                                          \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS_MAX)                                   \
        layer_norm_fwd_##S(T* y, float* stats, const T* x, i64 rows, i64 d, float eps) {            \
        layer_norm_fwd_impl<T>(y, stats, x, rows, d, eps);                                          \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS_MAX)                                   \
        layer_norm_bwd_##S(T* dx, const T* xhat, const T* g, const float* stats, i64 rows, i64 d) { \
        layer_norm_bwd_impl<T>(dx, xhat, g, stats, rows, d);                                        \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS_MAX)                                   \
        group_norm_fwd_##S(T* y, float* stats, const T* x, const T* w, const T* b, i64 rows,        \
                           i64 groups, i64 cpg, i64 spatial, float eps) {                           \
        group_norm_fwd_impl<T>(y, stats, x, w, b, rows, groups, cpg, spatial, eps);                 \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS_MAX)                                   \
        group_norm_bwd_dx_##S(T* dx, const T* x, const T* w, const T* g, const float* stats,        \
                              i64 rows, i64 groups, i64 cpg, i64 spatial) {                         \
        group_norm_bwd_dx_impl<T>(dx, x, w, g, stats, rows, groups, cpg, spatial);                  \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS_MAX)                                   \
        group_norm_bwd_params_##S(T* dw, T* db, const T* x, const T* g, const float* stats,         \
                                  i64 batch, i64 channels, i64 groups, i64 cpg, i64 spatial) {      \
        group_norm_bwd_params_impl<T>(dw, db, x, g, stats, batch, channels, groups, cpg, spatial);  \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS_MAX)                                   \
        l2_normalize_fwd_##S(T* y, float* norms, const T* x, i64 rows, i64 d, float eps) {          \
        l2_normalize_fwd_impl<T>(y, norms, x, rows, d, eps);                                        \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS_MAX)                                   \
        l2_normalize_bwd_##S(T* dx, const T* y, const T* g, const float* norms, i64 rows, i64 d,    \
                             float eps) {                                                           \
        l2_normalize_bwd_impl<T>(dx, y, g, norms, rows, d, eps);                                    \
    }

NORM_KERNELS(float, f32)
NORM_KERNELS(bf16_t, bf16)
