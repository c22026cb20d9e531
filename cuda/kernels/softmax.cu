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
// - softmax_*_lanes (inner > 1): one thread per lane looping over n; neighbouring threads own
//   neighbouring i, so each step is a coalesced read.
// - cross_entropy_fwd: one block per row: block_max, then block sums of exp(x - m) and of x;
//   thread 0 writes the row's loss and its log-sum-exp (kept for the backward).
// - cross_entropy_bwd: one thread per logit; each is independent once its row's lse, target, g
//   and weight are known (those per-row reads hit the cache).
//
// Numerics: f32 throughout (bf16 widened on load, rounded once on store). m is the lane maximum
// with NaNs skipped (fmaxf, like f32::max on the CPU); NaNs still reach the output through exp,
// as in PyTorch, and a lane of all -inf gives NaN. lse = m + log(sum exp(x - m)).
// Cross-entropy (eps the label smoothing, w the weight, 1 when absent):
//   loss   = w * ((1 - eps) * (lse - x[t]) + eps * (lse - mean_c x[c]))
//   dx[c]  = g * w * (exp(x[c] - lse) - ((1 - eps) [c == t] + eps / V))
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
