// softmax.cu: softmax and log_softmax along one axis with their fused backwards, and the fused
// cross-entropy loss (per-token, optional per-token weight, label smoothing) with its backward.
//
// Layout: softmax's input is seen as [outer, n, inner] around the axis (element (o, s, i) at
// (o * n + s) * inner + i); a lane is the n elements along the axis at one (o, i). The
// cross-entropy logits are [rows, V] row-major with i64 targets [rows], optional weights
// [rows] and the saved log-sum-exp [rows] in f32.
//
// Parallel decomposition:
// - softmax_*_rows (inner == 1, the common case): one block per lane, which is a contiguous row.
//   The forward makes three passes over the row (max, sum of exp, write); the backward two (one
//   block_sum, write). Rows are re-read rather than staged in shared memory so that any row
//   length works with one kernel; between passes the row sits in L1/L2.
// - softmax_{fwd,bwd}_warp<VPL>_* (tuned, inner == 1 and rows of at most 1024 elements that are
//   whole 16-byte vectors, 4 f32 or 8 bf16, at 16-byte aligned addresses): one warp per row,
//   SM_WARP_ROWS warps a block. Lane l holds vectors l, l + 32, ... of its row (at most VPL of
//   them, 32 floats a lane per tensor held) in registers, read once with 16-byte loads; the max
//   and the sum meet through warp shuffles, so global memory sees one read and one write per
//   element and no __syncthreads runs. The rows kernels above read the row three times (forward)
//   or twice (backward) with one element per load and synchronise the block per reduction; they
//   are the general kernels and the reference variant (MVAR_SOFTMAX_KERNEL=block).
// - softmax_*_lanes (inner > 1): one thread per lane looping over n; neighbouring threads own
//   neighbouring i, so each step is a coalesced read.
// - cross_entropy_fwd: one block per row: block_max, then block sums of exp(x - m) and of x;
//   thread 0 writes the row's loss and its log-sum-exp (kept for the backward).
// - cross_entropy_bwd: one thread per logit; each is independent once its row's lse, target, g
//   and weight are known (those per-row reads hit the cache).
// - cross_entropy_{fwd,bwd}_vec (tuned, rows that are whole 16-byte vectors at 16-byte aligned
//   addresses): one block per row, a thread per 16-byte vector (striding the row). The forward
//   makes one pass: each thread keeps an online (max, sum of exp) pair, rescaling its sum when the
//   max grows, and the sum of the logits; the pairs meet through shuffles and one exchange in
//   shared memory. The backward reads the row's lse, target, g and weight once per thread instead
//   of once per logit, and moves 16 bytes per thread. The kernels above are the reference variant
//   (MVAR_SOFTMAX_KERNEL=block).
//
// Numerics: f32 throughout (bf16 widened on load, rounded once on store). m is the lane maximum
// with NaNs skipped (fmaxf, like f32::max on the CPU); NaNs still reach the output through exp,
// as in PyTorch, and a lane of all -inf gives NaN. lse = m + log(sum exp(x - m)).
// Cross-entropy (eps the label smoothing, w the weight, 1 when absent):
//   loss   = w * ((1 - eps) * (lse - x[t]) + eps * (lse - mean_c x[c]))
//   dx[c]  = g * w * (exp(x[c] - lse) - ((1 - eps) [c == t] + eps / V))
// The online sums add the same terms in another order and scale partial sums by exp(m_i - m), so
// they agree with the two-pass kernels to rounding, not bit for bit. A term whose running max is
// still -inf is taken as 0 (it is exp(-inf - m) = 0 once any finite logit is seen); a row whose
// maximum is -inf gets the NaN the two-pass kernels give it (exp(-inf - -inf)).
// Targets are range-checked on the host before the launch (a kernel cannot return an error);
// the forward still writes NaN for an out-of-range target rather than reading out of bounds.

#define ROW_THREADS_MAX 512
#define NAN_F __int_as_float(0x7fc00000)

template <typename T>
__device__ void softmax_fwd_rows_impl(T* y, const T* x, i64 rows, i64 n, int is_log) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * n;
        T* yr = y + r * n;
        float m = NEG_INF;
        for (i64 s = threadIdx.x; s < n; s += blockDim.x) m = fmaxf(m, Io<T>::load(xr, s));
        m = block_max(m, scratch);
        float sum = 0.0f;
        for (i64 s = threadIdx.x; s < n; s += blockDim.x) sum += expf(Io<T>::load(xr, s) - m);
        sum = block_sum(sum, scratch);
        if (is_log) {
            float ls = logf(sum);
            for (i64 s = threadIdx.x; s < n; s += blockDim.x) Io<T>::store(yr, s, Io<T>::load(xr, s) - m - ls);
        } else {
            float inv = 1.0f / sum;
            for (i64 s = threadIdx.x; s < n; s += blockDim.x) Io<T>::store(yr, s, expf(Io<T>::load(xr, s) - m) * inv);
        }
    }
}

template <typename T>
__device__ void softmax_fwd_lanes_impl(T* y, const T* x, i64 outer, i64 n, i64 inner, int is_log) {
    GRID_STRIDE(j, outer * inner) {
        i64 o = j / inner, i = j - o * inner;
        i64 base = o * n * inner + i;
        float m = NEG_INF;
        for (i64 s = 0; s < n; ++s) m = fmaxf(m, Io<T>::load(x, base + s * inner));
        float sum = 0.0f;
        for (i64 s = 0; s < n; ++s) sum += expf(Io<T>::load(x, base + s * inner) - m);
        if (is_log) {
            float ls = logf(sum);
            for (i64 s = 0; s < n; ++s) {
                i64 k = base + s * inner;
                Io<T>::store(y, k, Io<T>::load(x, k) - m - ls);
            }
        } else {
            float inv = 1.0f / sum;
            for (i64 s = 0; s < n; ++s) {
                i64 k = base + s * inner;
                Io<T>::store(y, k, expf(Io<T>::load(x, k) - m) * inv);
            }
        }
    }
}

// softmax: dx = y * (g - sum(g * y));  log_softmax: dx = g - exp(y) * sum(g).
template <typename T>
__device__ void softmax_bwd_rows_impl(T* dx, const T* y, const T* g, i64 rows, i64 n, int is_log) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* yr = y + r * n;
        const T* gr = g + r * n;
        T* dr = dx + r * n;
        float acc = 0.0f;
        for (i64 s = threadIdx.x; s < n; s += blockDim.x) {
            float gv = Io<T>::load(gr, s);
            acc += is_log ? gv : gv * Io<T>::load(yr, s);
        }
        acc = block_sum(acc, scratch);
        for (i64 s = threadIdx.x; s < n; s += blockDim.x) {
            float yv = Io<T>::load(yr, s), gv = Io<T>::load(gr, s);
            Io<T>::store(dr, s, is_log ? gv - expf(yv) * acc : yv * (gv - acc));
        }
    }
}

template <typename T>
__device__ void softmax_bwd_lanes_impl(T* dx, const T* y, const T* g, i64 outer, i64 n, i64 inner, int is_log) {
    GRID_STRIDE(j, outer * inner) {
        i64 o = j / inner, i = j - o * inner;
        i64 base = o * n * inner + i;
        float acc = 0.0f;
        for (i64 s = 0; s < n; ++s) {
            i64 k = base + s * inner;
            float gv = Io<T>::load(g, k);
            acc += is_log ? gv : gv * Io<T>::load(y, k);
        }
        for (i64 s = 0; s < n; ++s) {
            i64 k = base + s * inner;
            float yv = Io<T>::load(y, k), gv = Io<T>::load(g, k);
            Io<T>::store(dx, k, is_log ? gv - expf(yv) * acc : yv * (gv - acc));
        }
    }
}

// w may be null (no weights).
template <typename T>
__device__ void cross_entropy_fwd_impl(T* loss, float* lse_out, const T* x, const i64* targets, const T* w,
                                       i64 rows, i64 classes, float eps) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * classes;
        float m = NEG_INF;
        for (i64 c = threadIdx.x; c < classes; c += blockDim.x) m = fmaxf(m, Io<T>::load(xr, c));
        m = block_max(m, scratch);
        float se = 0.0f, sx = 0.0f;
        for (i64 c = threadIdx.x; c < classes; c += blockDim.x) {
            float v = Io<T>::load(xr, c);
            se += expf(v - m);
            sx += v;
        }
        se = block_sum(se, scratch);
        sx = block_sum(sx, scratch);
        if (threadIdx.x == 0) {
            float lse = m + logf(se);
            i64 t = targets[r];
            float l = NAN_F;
            if (t >= 0 && t < classes) {
                float nll = lse - Io<T>::load(xr, t);
                l = (1.0f - eps) * nll + eps * (lse - sx / (float)classes);
            }
            if (w) l *= Io<T>::load(w, r);
            Io<T>::store(loss, r, l);
            lse_out[r] = lse;
        }
    }
}

template <typename T>
__device__ void cross_entropy_bwd_impl(T* dx, const T* x, const T* g, const i64* targets, const float* lse,
                                       const T* w, i64 rows, i64 classes, float eps) {
    float off = eps / (float)classes;
    float on = (1.0f - eps) + off;
    GRID_STRIDE(e, rows * classes) {
        i64 r = e / classes, c = e - r * classes;
        float scale = Io<T>::load(g, r);
        if (w) scale *= Io<T>::load(w, r);
        float target = (c == targets[r]) ? on : off;
        Io<T>::store(dx, e, scale * (expf(Io<T>::load(x, e) - lse[r]) - target));
    }
}

// ------------------------------------------------------------------------------------------------
// tuned variants

#define SM_WARP_ROWS 4
#define CE_VEC_THREADS 256

// Softmax of rows held by one warp each. VPL (vectors per lane) is a power of two with VPL * N
// <= 32: the host picks the smallest that covers the row.
template <typename T, int VPL>
__device__ void softmax_fwd_warp_impl(T* y, const T* x, i64 rows, i64 n, int is_log) {
    constexpr int N = Vec16<T>::N;
    const int lane = threadIdx.x & 31;
    const int vecs = (int)(n / N);
    // Every lane of a warp has the same row, so the loop and the shuffles stay warp-uniform.
    for (i64 r = (i64)blockIdx.x * SM_WARP_ROWS + (threadIdx.x >> 5); r < rows; r += (i64)gridDim.x * SM_WARP_ROWS) {
        const T* xr = x + r * n;
        T* yr = y + r * n;
        float v[VPL * N];
        float m = NEG_INF;
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
            const int c = j * 32 + lane;
            if (c < vecs) {
                Vec16<T>::load(xr + (i64)c * N, v + j * N);
#pragma unroll
                for (int k = 0; k < N; ++k) m = fmaxf(m, v[j * N + k]);
            }
        }
        m = warp_max(m);
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
            if (j * 32 + lane < vecs) {
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    const float e = expf(v[j * N + k] - m);
                    sum += e;
                    // softmax keeps exp(x - m); log_softmax needs x again.
                    if (!is_log) v[j * N + k] = e;
                }
            }
        }
        sum = warp_sum(sum);
        const float shift = m + logf(sum), inv = 1.0f / sum;
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
            const int c = j * 32 + lane;
            if (c < vecs) {
#pragma unroll
                for (int k = 0; k < N; ++k) v[j * N + k] = is_log ? v[j * N + k] - shift : v[j * N + k] * inv;
                Vec16<T>::store(yr + (i64)c * N, v + j * N);
            }
        }
    }
}

// softmax: dx = y * (g - sum(g * y));  log_softmax: dx = g - exp(y) * sum(g). y and g held.
template <typename T, int VPL>
__device__ void softmax_bwd_warp_impl(T* dx, const T* y, const T* g, i64 rows, i64 n, int is_log) {
    constexpr int N = Vec16<T>::N;
    const int lane = threadIdx.x & 31;
    const int vecs = (int)(n / N);
    for (i64 r = (i64)blockIdx.x * SM_WARP_ROWS + (threadIdx.x >> 5); r < rows; r += (i64)gridDim.x * SM_WARP_ROWS) {
        const T* yr = y + r * n;
        const T* gr = g + r * n;
        T* dr = dx + r * n;
        float yv[VPL * N], gv[VPL * N];
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
            const int c = j * 32 + lane;
            if (c < vecs) {
                Vec16<T>::load(yr + (i64)c * N, yv + j * N);
                Vec16<T>::load(gr + (i64)c * N, gv + j * N);
#pragma unroll
                for (int k = 0; k < N; ++k) acc += is_log ? gv[j * N + k] : gv[j * N + k] * yv[j * N + k];
            }
        }
        acc = warp_sum(acc);
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
            const int c = j * 32 + lane;
            if (c < vecs) {
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    const float yk = yv[j * N + k], gk = gv[j * N + k];
                    gv[j * N + k] = is_log ? gk - expf(yk) * acc : yk * (gk - acc);
                }
                Vec16<T>::store(dr + (i64)c * N, gv + j * N);
            }
        }
    }
}

// Merges the online pair (m2, s2) into (m, s): both sums rescaled to the larger max. A sum whose
// max is -inf holds no finite term and weighs 0.
__device__ __forceinline__ void ce_merge(float& m, float& s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    const float a = m == NEG_INF ? 0.0f : expf(m - mn);
    const float b = m2 == NEG_INF ? 0.0f : expf(m2 - mn);
    s = s * a + s2 * b;
    m = mn;
}

template <typename T>
__device__ void cross_entropy_fwd_vec_impl(T* loss, float* lse_out, const T* x, const i64* targets, const T* w,
                                           i64 rows, i64 classes, float eps) {
    constexpr int N = Vec16<T>::N;
    __shared__ float sm[32], ss[32], sx_part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int vecs = (int)(classes / N);
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * classes;
        float m = NEG_INF, s = 0.0f, sx = 0.0f;
        for (int c = threadIdx.x; c < vecs; c += blockDim.x) {
            float v[N];
            Vec16<T>::load(xr + (i64)c * N, v);
            float vm = NEG_INF;
#pragma unroll
            for (int k = 0; k < N; ++k) {
                vm = fmaxf(vm, v[k]);
                sx += v[k];
            }
            if (vm > m) {
                s = m == NEG_INF ? 0.0f : s * expf(m - vm);
                m = vm;
            }
            // With m still -inf every term seen is -inf (or NaN, which fmaxf skipped and exp
            // passes on): the finite-max convention makes them 0.
            const float mu = m == NEG_INF ? 0.0f : m;
#pragma unroll
            for (int k = 0; k < N; ++k) s += expf(v[k] - mu);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            ce_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
            sx += __shfl_xor_sync(0xffffffffu, sx, o);
        }
        __syncthreads();  // the previous row's exchange may still be read
        if (lane == 0) {
            sm[warp] = m;
            ss[warp] = s;
            sx_part[warp] = sx;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            float bm = sm[0], bs = ss[0], bx = sx_part[0];
            for (int i = 1; i < warps; ++i) {
                ce_merge(bm, bs, sm[i], ss[i]);
                bx += sx_part[i];
            }
            const float lse = bm == NEG_INF ? NAN_F : bm + logf(bs);
            const i64 t = targets[r];
            float l = NAN_F;
            if (t >= 0 && t < classes) {
                const float nll = lse - Io<T>::load(xr, t);
                l = (1.0f - eps) * nll + eps * (lse - bx / (float)classes);
            }
            if (w) l *= Io<T>::load(w, r);
            Io<T>::store(loss, r, l);
            lse_out[r] = lse;
        }
    }
}

template <typename T>
__device__ void cross_entropy_bwd_vec_impl(T* dx, const T* x, const T* g, const i64* targets, const float* lse,
                                           const T* w, i64 rows, i64 classes, float eps) {
    constexpr int N = Vec16<T>::N;
    const float off = eps / (float)classes;
    const float on = (1.0f - eps) + off;
    const int vecs = (int)(classes / N);
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        float scale = Io<T>::load(g, r);
        if (w) scale *= Io<T>::load(w, r);
        const i64 t = targets[r];
        const float l = lse[r];
        const T* xr = x + r * classes;
        T* dr = dx + r * classes;
        for (int c = threadIdx.x; c < vecs; c += blockDim.x) {
            float v[N];
            Vec16<T>::load(xr + (i64)c * N, v);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                const float target = ((i64)c * N + k == t) ? on : off;
                v[k] = scale * (expf(v[k] - l) - target);
            }
            Vec16<T>::store(dr + (i64)c * N, v);
        }
    }
}

#define SOFTMAX_KERNELS(T, S)                                                                       \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS_MAX)                                   \
        softmax_fwd_rows_##S(T* y, const T* x, i64 rows, i64 n, int is_log) {                       \
        softmax_fwd_rows_impl<T>(y, x, rows, n, is_log);                                            \
    }                                                                                               \
    extern "C" __global__ void softmax_fwd_lanes_##S(T* y, const T* x, i64 outer, i64 n,            \
                                                    i64 inner, int is_log) {                        \
        softmax_fwd_lanes_impl<T>(y, x, outer, n, inner, is_log);                                   \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS_MAX)                                   \
        softmax_bwd_rows_##S(T* dx, const T* y, const T* g, i64 rows, i64 n, int is_log) {          \
        softmax_bwd_rows_impl<T>(dx, y, g, rows, n, is_log);                                        \
    }                                                                                               \
    extern "C" __global__ void softmax_bwd_lanes_##S(T* dx, const T* y, const T* g, i64 outer,      \
                                                    i64 n, i64 inner, int is_log) {                 \
        softmax_bwd_lanes_impl<T>(dx, y, g, outer, n, inner, is_log);                               \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS_MAX)                                   \
        cross_entropy_fwd_##S(T* loss, float* lse, const T* x, const i64* targets, const T* w,      \
                              i64 rows, i64 classes, float eps) {                                   \
        cross_entropy_fwd_impl<T>(loss, lse, x, targets, w, rows, classes, eps);                    \
    }                                                                                               \
    extern "C" __global__ void cross_entropy_bwd_##S(T* dx, const T* x, const T* g,                 \
                                                    const i64* targets, const float* lse,           \
                                                    const T* w, i64 rows, i64 classes, float eps) { \
        cross_entropy_bwd_impl<T>(dx, x, g, targets, lse, w, rows, classes, eps);                   \
    }

SOFTMAX_KERNELS(float, f32)
SOFTMAX_KERNELS(bf16_t, bf16)

#define SOFTMAX_WARP_KERNELS(T, S, VPL)                                                             \
    extern "C" __global__ void __launch_bounds__(SM_WARP_ROWS * 32)                                 \
        softmax_fwd_warp##VPL##_##S(T* y, const T* x, i64 rows, i64 n, int is_log) {                \
        softmax_fwd_warp_impl<T, VPL>(y, x, rows, n, is_log);                                       \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(SM_WARP_ROWS * 32)                                 \
        softmax_bwd_warp##VPL##_##S(T* dx, const T* y, const T* g, i64 rows, i64 n, int is_log) {   \
        softmax_bwd_warp_impl<T, VPL>(dx, y, g, rows, n, is_log);                                   \
    }

// At most 32 floats a lane per held row: 8 vectors of f32, 4 of bf16 (rows of <= 1024 elements).
SOFTMAX_WARP_KERNELS(float, f32, 1)
SOFTMAX_WARP_KERNELS(float, f32, 2)
SOFTMAX_WARP_KERNELS(float, f32, 4)
SOFTMAX_WARP_KERNELS(float, f32, 8)
SOFTMAX_WARP_KERNELS(bf16_t, bf16, 1)
SOFTMAX_WARP_KERNELS(bf16_t, bf16, 2)
SOFTMAX_WARP_KERNELS(bf16_t, bf16, 4)

#define CE_VEC_KERNELS(T, S)                                                                        \
    extern "C" __global__ void __launch_bounds__(CE_VEC_THREADS)                                    \
        cross_entropy_fwd_vec_##S(T* loss, float* lse, const T* x, const i64* targets, const T* w,  \
                                  i64 rows, i64 classes, float eps) {                               \
        cross_entropy_fwd_vec_impl<T>(loss, lse, x, targets, w, rows, classes, eps);                \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(CE_VEC_THREADS)                                    \
        cross_entropy_bwd_vec_##S(T* dx, const T* x, const T* g, const i64* targets,                \
                                  const float* lse, const T* w, i64 rows, i64 classes, float eps) { \
        cross_entropy_bwd_vec_impl<T>(dx, x, g, targets, lse, w, rows, classes, eps);               \
    }

CE_VEC_KERNELS(float, f32)
CE_VEC_KERNELS(bf16_t, bf16)
