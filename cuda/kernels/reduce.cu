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
// - sum_row_chunks + sum_rows_from_f32 (inner == 1, fewer rows than multiprocessors and long
//   rows, e.g. a whole-tensor sum): one row's block would leave the GPU idle, so each row is cut
//   into `splits` chunks, block (c, r) sums chunk c of row r into an f32 partial [rows, splits],
//   and a second launch sums the partials of each row (sum_rows over [rows, splits]).
// - sum_cols_tiled (inner > 1): a block of 32 x 8 threads owns 32 neighbouring columns of one
//   slab o; its 8 rows of threads take every 8th element of the reduced axis (each step a 128-
//   byte coalesced read per warp for f32) and are combined through shared memory. The bias
//   gradients of training ([B*L, C] -> [C], a few thousand columns over tens of thousands of
//   rows) leave too few such blocks to fill the GPU, so the axis is cut into `splits` chunks
//   (blockIdx.z) written as f32 partials [splits, outer * inner], and a second launch of the same
//   kernel sums the partials (outer 1, n = splits). Both passes run in a fixed order: the
//   result does not depend on scheduling.
// - sum_cols (inner > 1): the reference variant (MVAR_SUM_KERNEL=naive): one thread per output
//   element looping over n. Neighbouring threads handle neighbouring i, so every step is one
//   coalesced read across the warp, but only outer * inner threads run.
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

template <typename In, typename Out>
__device__ void sum_rows_impl(Out* out, const In* x, i64 rows, i64 n) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const In* row = x + r * n;
        float acc = 0.0f;
        for (i64 s = threadIdx.x; s < n; s += blockDim.x) acc += Io<In>::load(row, s);
        float total = block_sum(acc, scratch);
        if (threadIdx.x == 0) Io<Out>::store(out, r, total);
    }
}

// Block (c, r) (blockIdx.x = c < splits, blockIdx.y = r < rows): the sum of elements
// [c * chunk, min(n, (c + 1) * chunk)) of row r, into part[r * splits + c].
template <typename T>
__device__ void sum_row_chunks_impl(float* part, const T* x, i64 rows, i64 n, i64 chunk) {
    __shared__ float scratch[32];
    i64 c = blockIdx.x, r = blockIdx.y;
    if (r >= rows) return;
    const T* row = x + r * n;
    i64 end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
    float acc = 0.0f;
    for (i64 s = c * chunk + threadIdx.x; s < end; s += blockDim.x) acc += Io<T>::load(row, s);
    float total = block_sum(acc, scratch);
    if (threadIdx.x == 0) part[r * gridDim.x + c] = total;
}

#define COL_TILE 32
#define COL_ROWS 8

// Block (t, c) (blockIdx.x = o * tiles + column tile, blockIdx.z = c): columns
// [tile * 32, tile * 32 + 32) of slab o summed over elements [c * chunk, min(n, (c + 1) * chunk))
// of the reduced axis, into out[c * outer * inner + o * inner + i]; with one chunk (chunk >= n)
// that is the final [outer, inner] result.
template <typename In, typename Out>
__device__ void sum_cols_tiled_impl(Out* out, const In* x, i64 outer, i64 n, i64 inner, i64 chunk) {
    __shared__ float part[COL_ROWS][COL_TILE + 1];
    i64 tiles = (inner + COL_TILE - 1) / COL_TILE;
    i64 o = blockIdx.x / tiles;
    i64 i = (blockIdx.x - o * tiles) * COL_TILE + threadIdx.x;
    i64 c = blockIdx.z;
    i64 end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
    float acc = 0.0f;
    if (o < outer && i < inner) {
        const In* col = x + o * n * inner + i;
#pragma unroll 4
        for (i64 s = c * chunk + threadIdx.y; s < end; s += COL_ROWS) acc += Io<In>::load(col, s * inner);
    }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && o < outer && i < inner) {
        float total = 0.0f;
#pragma unroll
        for (int r = 0; r < COL_ROWS; ++r) total += part[r][threadIdx.x];
        Io<Out>::store(out, c * outer * inner + o * inner + i, total);
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
        sum_rows_impl<T, T>(out, x, rows, n);                                                       \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS_MAX)                                   \
        sum_row_chunks_##S(float* part, const T* x, i64 rows, i64 n, i64 chunk) {                   \
        sum_row_chunks_impl<T>(part, x, rows, n, chunk);                                            \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS_MAX)                                   \
        sum_rows_from_f32_##S(T* out, const float* part, i64 rows, i64 n) {                         \
        sum_rows_impl<float, T>(out, part, rows, n);                                                \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(COL_TILE * COL_ROWS)                               \
        sum_cols_tiled_##S(T* out, const T* x, i64 outer, i64 n, i64 inner) {                       \
        sum_cols_tiled_impl<T, T>(out, x, outer, n, inner, n);                                      \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(COL_TILE * COL_ROWS)                               \
        sum_col_chunks_##S(float* part, const T* x, i64 outer, i64 n, i64 inner, i64 chunk) {       \
        sum_cols_tiled_impl<T, float>(part, x, outer, n, inner, chunk);                             \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(COL_TILE * COL_ROWS)                               \
        sum_cols_from_f32_##S(T* out, const float* part, i64 splits, i64 m) {                       \
        sum_cols_tiled_impl<float, T>(out, part, 1, splits, m, splits);                             \
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
