// reduce.cu: reductions along one axis: sum (which also serves sum_axes, mean and every
// broadcast backward through sum_to), argmax, and the gather/scatter pair behind max/min.
//
// Layout: the dense row-major input is seen as [outer, n, inner] around the reduced axis, so
// element (o, s, i) sits at (o * n + s) * inner + i. Outputs keep the axis with size 1:
// [outer, inner], element (o, i) at o * inner + i.
//
// Parallel decomposition (the host picks the kernel from the shape):
// - sum_rows (inner == 1): one block per output row. The block's threads stride over the row's n
//   contiguous elements (coalesced) and combine with block_sum; blocks grid-stride over rows.
// - sum_cols (inner > 1): one thread per output element looping over n. Neighbouring threads
//   handle neighbouring i, so every step of the loop is one coalesced read across the warp.
// - argmax_rows (inner == 1): one warp per row. Lanes stride the row keeping their best
//   (value, index), then a shuffle butterfly combines the 32 candidates; no shared memory.
// - argmax_cols (inner > 1): one thread per output element scanning n in order (the CPU loop).
// - gather_along (max forward): one thread per output element reads x at its argmax.
// - scatter_along (max backward): one thread per *input* element writes g where that element is
//   its column's argmax and 0 elsewhere. Every dx element has exactly one writer, so there are
//   no atomics and no separate zero fill.
//
// Numerics: sums accumulate in f32 (bf16 widened on load, rounded once on store; the CPU
// reference accumulates in f64, the parity tolerance covers the difference). argmax compares
// native values (i64 exactly, u8 as int, bf16 through its exact f32 widening) and returns the
// first maximum, with NaN larger than everything (so the first NaN wins), as the CPU reference
// and PyTorch do. An index outside [0, n) given to gather_along yields NaN instead of a read out
// of bounds.

#define ROW_THREADS_MAX 512

template <typename T>
__device__ void sum_rows_impl(T* out, const T* x, i64 rows, i64 n) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* row = x + r * n;
        float acc = 0.0f;
        for (i64 s = threadIdx.x; s < n; s += blockDim.x) acc += Io<T>::load(row, s);
        float total = block_sum(acc, scratch);
        if (threadIdx.x == 0) Io<T>::store(out, r, total);
    }
}

template <typename T>
__device__ void sum_cols_impl(T* out, const T* x, i64 outer, i64 n, i64 inner) {
    GRID_STRIDE(j, outer * inner) {
        i64 o = j / inner, i = j - o * inner;
        const T* col = x + o * n * inner + i;
        float acc = 0.0f;
        for (i64 s = 0; s < n; ++s) acc += Io<T>::load(col, s * inner);
        Io<T>::store(out, j, acc);
    }
}

// The value argmax compares, per storage type: native integers (an i64 above 2^24 must not be
// rounded through f32), bf16 widened (exact), u8 as int (shuffles have no 8-bit form).
template <typename T> struct Key {
    typedef T V;
    static __device__ __forceinline__ V load(const T* p, i64 i) { return p[i]; }
};
template <> struct Key<bf16_t> {
    typedef float V;
    static __device__ __forceinline__ float load(const bf16_t* p, i64 i) { return bf16_to_f32(p[i]); }
};
template <> struct Key<u8> {
    typedef int V;
    static __device__ __forceinline__ int load(const u8* p, i64 i) { return (int)p[i]; }
};

// Whether candidate (v, s) beats the current best (bv, bs): NaN above every number, a larger
// value above a smaller one, and on equal values (or two NaNs) the smaller index. This is a
// total order, so the shuffle butterfly reaches the same answer as a scan in index order.
template <typename V>
__device__ __forceinline__ bool beats(V v, i64 s, V bv, i64 bs) {
    bool vn = (v != v), bn = (bv != bv);
    if (vn || bn) return vn && (!bn || s < bs);
    return v > bv || (v == bv && s < bs);
}

template <typename T>
__device__ void argmax_rows_impl(i64* out, const T* x, i64 rows, i64 n) {
    typedef typename Key<T>::V V;
    int lane = threadIdx.x & 31;
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    // The loop bound depends on the warp only, so all 32 lanes take part in every shuffle.
    for (i64 r = warp; r < rows; r += warps) {
        const T* row = x + r * n;
        // Every lane starts from element 0 (n >= 1 is checked on the host): a valid candidate
        // for lanes that get no element of their own.
        V bv = Key<T>::load(row, 0);
        i64 bs = 0;
        for (i64 s = lane; s < n; s += 32) {
            V v = Key<T>::load(row, s);
            if (beats(v, s, bv, bs)) { bv = v; bs = s; }
        }
        for (int o = 16; o > 0; o >>= 1) {
            V ov = __shfl_xor_sync(0xffffffffu, bv, o);
            i64 os = __shfl_xor_sync(0xffffffffu, bs, o);
            if (beats(ov, os, bv, bs)) { bv = ov; bs = os; }
        }
        if (lane == 0) out[r] = bs;
    }
}

template <typename T>
__device__ void argmax_cols_impl(i64* out, const T* x, i64 outer, i64 n, i64 inner) {
    typedef typename Key<T>::V V;
    GRID_STRIDE(j, outer * inner) {
        i64 o = j / inner, i = j - o * inner;
        const T* col = x + o * n * inner + i;
        V bv = Key<T>::load(col, 0);
        i64 bs = 0;
        for (i64 s = 1; s < n && bv == bv; ++s) {  // nothing beats a NaN found earlier
            V v = Key<T>::load(col, s * inner);
            if (beats(v, s, bv, bs)) { bv = v; bs = s; }
        }
        out[j] = bs;
    }
}

template <typename T>
__device__ void gather_along_impl(T* out, const T* x, const i64* idx, i64 outer, i64 n, i64 inner) {
    GRID_STRIDE(j, outer * inner) {
        i64 o = j / inner, i = j - o * inner;
        i64 k = idx[j];
        if (k >= 0 && k < n) out[j] = x[(o * n + k) * inner + i];
        else Io<T>::store(out, j, __int_as_float(0x7fc00000));
    }
}

template <typename T>
__device__ void scatter_along_impl(T* dx, const T* g, const i64* idx, i64 outer, i64 n, i64 inner) {
    GRID_STRIDE(e, outer * n * inner) {
        i64 t = e / inner, i = e - t * inner;
        i64 o = t / n, s = t - o * n;
        i64 j = o * inner + i;
        if (idx[j] == s) dx[e] = g[j];
        else Io<T>::store(dx, e, 0.0f);
    }
}

#define FLOAT_KERNELS(T, S)                                                                         \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS_MAX)                                   \
        sum_rows_##S(T* out, const T* x, i64 rows, i64 n) {                                         \
        sum_rows_impl<T>(out, x, rows, n);                                                          \
    }                                                                                               \
    extern "C" __global__ void sum_cols_##S(T* out, const T* x, i64 outer, i64 n, i64 inner) {      \
        sum_cols_impl<T>(out, x, outer, n, inner);                                                  \
    }                                                                                               \
    extern "C" __global__ void gather_along_##S(T* out, const T* x, const i64* idx, i64 outer,      \
                                               i64 n, i64 inner) {                                  \
        gather_along_impl<T>(out, x, idx, outer, n, inner);                                         \
    }                                                                                               \
    extern "C" __global__ void scatter_along_##S(T* dx, const T* g, const i64* idx, i64 outer,      \
                                                i64 n, i64 inner) {                                 \
        scatter_along_impl<T>(dx, g, idx, outer, n, inner);                                         \
    }

FLOAT_KERNELS(float, f32)
FLOAT_KERNELS(bf16_t, bf16)

#define ARGMAX_KERNELS(T, S)                                                                        \
    extern "C" __global__ void argmax_rows_##S(i64* out, const T* x, i64 rows, i64 n) {             \
        argmax_rows_impl<T>(out, x, rows, n);                                                       \
    }                                                                                               \
    extern "C" __global__ void argmax_cols_##S(i64* out, const T* x, i64 outer, i64 n,              \
                                              i64 inner) {                                          \
        argmax_cols_impl<T>(out, x, outer, n, inner);                                               \
    }

ARGMAX_KERNELS(float, f32)
ARGMAX_KERNELS(bf16_t, bf16)
ARGMAX_KERNELS(i64, i64)
ARGMAX_KERNELS(u8, u8)
