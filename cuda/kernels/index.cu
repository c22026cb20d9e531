// index.cu: ops that move elements by position or by integer index: narrow (a band of one
// axis) and its backward, the band placement concat is built from, index_select, gather, and
// the backwards of index_select and gather.
//
// Layout: dense row-major buffers. An axis op sees its tensor as [outer, n, inner] (the axis in
// the middle, everything before it folded into `outer`, everything after into `inner`). Indices
// are i64 buffers. gather reads a `GatherGeom` (dims and strides of the input and of the
// indices, up to MAX_RANK axes), mirrored by `GatherGeom` in cuda/src/ops/index.rs.
// Parallel decomposition: one thread per output element, grid-stride loop, 256 threads a block.
// The band kernels (narrow, its backward, band_place) move raw bits, so the host runs them on
// words instead of elements where it can: when a row of `inner` elements is a whole number of
// 16-, 8- or 4-byte words and both buffers are aligned to the word, `inner` is counted in words
// and the kernel of that word size runs (`w16`, `w8`, `w4`): one thread and one index
// computation per 16 bytes instead of per element (for bf16, 8 of them).
// Their index arithmetic runs in 32 bits when every index of the launch is below 2^31 (the GPU
// divides 64-bit integers in software).
// Each thread writes its element once, so no kernel here needs atomics or a zeroed output:
// - the copies (narrow, band_place, index_select, gather forward) read one element each;
// - narrow's backward writes every element of the full axis, zero outside the band;
// - the scatter-add backwards are written as gathers, deterministic and without atomics:
//   index_select_bwd: each dx row r sums the gradient rows j with idx[j] == r. The host sorts the
//     positions j by their index (a counting sort, stable), giving `order` and per-row ranges
//     `offsets[r] .. offsets[r+1]`, so a thread visits exactly its own sources, in increasing j
//     (the order the CPU reference adds them in). Work: outer * inner * (n + k).
//   gather_bwd: each dx element scans the indices along the gather axis that share its other
//     coordinates (idx_dims[axis] of them) and sums the gradients whose index names it, in
//     increasing position (again the CPU's order). Work: x elements * idx_dims[axis].
// Numerics: copies move raw bits (any element type, bf16 and integers exact). The backwards add
// in f32, bf16 widened on load, and round once on store. An index outside [0, n) (the host
// checks every index before launching, so this is only a guard against reading out of bounds)
// reads as zero in the copies and contributes nothing in the backwards.

struct GatherGeom {
    int rank;
    int axis;
    i64 x_dims[MAX_RANK];
    i64 idx_dims[MAX_RANK];
    i64 x_strides[MAX_RANK];
    i64 idx_strides[MAX_RANK];
};

// Whether every index of a band launch over `big` elements (the larger buffer) fits the 32-bit
// loop: below 2^31, so that adding the grid's stride cannot wrap.
__device__ __forceinline__ bool band_index32(i64 big) { return big < ((i64)1 << 31); }

// The grid-stride loop of the band kernels with the index type I.
#define BAND_STRIDE(I, i, n) \
    for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (I)blockDim.x * gridDim.x)

// out [outer, len, inner] = x [outer, n, inner] rows start .. start+len.
template <typename T, typename I>
__device__ __forceinline__ void narrow_run(T* out, const T* x, I total, I n, I len, I inner, I start) {
    BAND_STRIDE(I, i, total) {
        I c = i % inner;
        I rest = i / inner;
        I j = rest % len;
        I o = rest / len;
        out[i] = x[(o * n + start + j) * inner + c];
    }
}

template <typename T>
__device__ void narrow_impl(T* out, const T* x, i64 total, i64 n, i64 len, i64 inner, i64 start) {
    if (band_index32(total / len * n))  // x's element count, at least total
        narrow_run<T, unsigned int>(out, x, (unsigned int)total, (unsigned int)n, (unsigned int)len,
                                    (unsigned int)inner, (unsigned int)start);
    else
        narrow_run<T, i64>(out, x, total, n, len, inner, start);
}

// out [outer, n, inner]: g [outer, len, inner] on rows start .. start+len, zero elsewhere.
template <typename T, typename I>
__device__ __forceinline__ void narrow_bwd_run(T* out, const T* g, I total, I n, I len, I inner, I start) {
    BAND_STRIDE(I, i, total) {
        I c = i % inner;
        I rest = i / inner;
        I r = rest % n;
        I o = rest / n;
        // Unsigned: rows before the band wrap to large values, so one comparison covers both ends.
        bool in_band = r >= start && r - start < len;
        out[i] = in_band ? g[(o * len + (r - start)) * inner + c] : T{};
    }
}

template <typename T>
__device__ void narrow_bwd_impl(T* out, const T* g, i64 total, i64 n, i64 len, i64 inner, i64 start) {
    if (band_index32(total))
        narrow_bwd_run<T, unsigned int>(out, g, (unsigned int)total, (unsigned int)n, (unsigned int)len,
                                        (unsigned int)inner, (unsigned int)start);
    else
        narrow_bwd_run<T, i64>(out, g, total, n, len, inner, start);
}

// x [outer, n, inner] written to rows start .. start+n of out [outer, total_n, inner]: one call
// per concat input. Threads walk the input, so reads are contiguous and writes contiguous runs.
template <typename T, typename I>
__device__ __forceinline__ void band_place_run(T* out, const T* x, I count, I n, I total_n, I inner, I start) {
    BAND_STRIDE(I, i, count) {
        I c = i % inner;
        I rest = i / inner;
        I j = rest % n;
        I o = rest / n;
        out[(o * total_n + start + j) * inner + c] = x[i];
    }
}

template <typename T>
__device__ void band_place_impl(T* out, const T* x, i64 count, i64 n, i64 total_n, i64 inner, i64 start) {
    if (band_index32(count / n * total_n))  // out's element count, at least count
        band_place_run<T, unsigned int>(out, x, (unsigned int)count, (unsigned int)n, (unsigned int)total_n,
                                        (unsigned int)inner, (unsigned int)start);
    else
        band_place_run<T, i64>(out, x, count, n, total_n, inner, start);
}

// out [outer, k, inner] = x [outer, n, inner] rows idx[0..k].
template <typename T>
__device__ void index_select_impl(T* out, const T* x, const i64* idx, i64 total, i64 n, i64 k, i64 inner) {
    GRID_STRIDE(i, total) {
        i64 c = i % inner;
        i64 rest = i / inner;
        i64 j = rest % k;
        i64 o = rest / k;
        i64 r = idx[j];
        out[i] = (r >= 0 && r < n) ? x[(o * n + r) * inner + c] : (T)0;
    }
}

// dx [outer, n, inner]: row r sums g [outer, k, inner] rows order[offsets[r] .. offsets[r+1]].
template <typename T>
__device__ void index_select_bwd_impl(T* dx, const T* g, const i64* offsets, const i64* order, i64 total,
                                      i64 n, i64 k, i64 inner) {
    GRID_STRIDE(i, total) {
        i64 c = i % inner;
        i64 rest = i / inner;
        i64 r = rest % n;
        i64 o = rest / n;
        float s = 0.0f;
        for (i64 q = offsets[r]; q < offsets[r + 1]; ++q) {
            i64 j = order[q];
            if (j >= 0 && j < k) s += Io<T>::load(g, (o * k + j) * inner + c);
        }
        Io<T>::store(dx, i, s);
    }
}

// out (idx's shape) [p] = x at p's coordinates with the gather axis replaced by idx[p].
template <typename T>
__device__ void gather_impl(T* out, const T* x, const i64* idx, i64 total, GatherGeom geo) {
    GRID_STRIDE(i, total) {
        i64 rem = i, src = 0;
        bool ok = true;
        for (int ax = geo.rank - 1; ax >= 0; --ax) {
            i64 d = geo.idx_dims[ax];
            i64 c = rem % d;
            rem /= d;
            if (ax == geo.axis) {
                c = idx[i];
                ok = ok && c >= 0 && c < geo.x_dims[ax];
            }
            src += c * geo.x_strides[ax];
        }
        out[i] = ok ? x[src] : (T)0;
    }
}

// dx (x's shape) [e] = sum of g[p] over the index positions p that share e's coordinates off the
// gather axis and hold e's coordinate on it.
template <typename T>
__device__ void gather_bwd_impl(T* dx, const T* g, const i64* idx, i64 total, GatherGeom geo) {
    GRID_STRIDE(i, total) {
        i64 rem = i, base = 0, a = 0;
        bool inside = true;
        for (int ax = geo.rank - 1; ax >= 0; --ax) {
            i64 d = geo.x_dims[ax];
            i64 c = rem % d;
            rem /= d;
            if (ax == geo.axis) {
                a = c;
            } else {
                inside = inside && c < geo.idx_dims[ax];
                base += c * geo.idx_strides[ax];
            }
        }
        float s = 0.0f;
        if (inside) {
            i64 len = geo.idx_dims[geo.axis], step = geo.idx_strides[geo.axis];
            for (i64 t = 0; t < len; ++t) {
                i64 p = base + t * step;
                if (idx[p] == a) s += Io<T>::load(g, p);
            }
        }
        Io<T>::store(dx, i, s);
    }
}

#define BAND_KERNELS(T, S)                                                                           \
    extern "C" __global__ void narrow_##S(T* out, const T* x, i64 total, i64 n, i64 len, i64 inner, \
                                         i64 start) {                                               \
        narrow_impl<T>(out, x, total, n, len, inner, start);                                        \
    }                                                                                               \
    extern "C" __global__ void narrow_bwd_##S(T* out, const T* g, i64 total, i64 n, i64 len,       \
                                             i64 inner, i64 start) {                                \
        narrow_bwd_impl<T>(out, g, total, n, len, inner, start);                                    \
    }                                                                                               \
    extern "C" __global__ void band_place_##S(T* out, const T* x, i64 count, i64 n, i64 total_n,   \
                                             i64 inner, i64 start) {                                \
        band_place_impl<T>(out, x, count, n, total_n, inner, start);                                \
    }

#define COPY_KERNELS(T, S)                                                                           \
    extern "C" __global__ void index_select_##S(T* out, const T* x, const i64* idx, i64 total,     \
                                               i64 n, i64 k, i64 inner) {                           \
        index_select_impl<T>(out, x, idx, total, n, k, inner);                                      \
    }                                                                                               \
    extern "C" __global__ void gather_##S(T* out, const T* x, const i64* idx, i64 total,           \
                                         GatherGeom geo) {                                          \
        gather_impl<T>(out, x, idx, total, geo);                                                    \
    }

BAND_KERNELS(float, f32)
BAND_KERNELS(bf16_t, bf16)
BAND_KERNELS(i64, i64)
BAND_KERNELS(u8, u8)
BAND_KERNELS(unsigned int, w4)
BAND_KERNELS(unsigned long long, w8)
BAND_KERNELS(Word16, w16)

COPY_KERNELS(float, f32)
COPY_KERNELS(bf16_t, bf16)
COPY_KERNELS(i64, i64)
COPY_KERNELS(u8, u8)

#define GRAD_KERNELS(T, S)                                                                           \
    extern "C" __global__ void index_select_bwd_##S(T* dx, const T* g, const i64* offsets,         \
                                                   const i64* order, i64 total, i64 n, i64 k,       \
                                                   i64 inner) {                                     \
        index_select_bwd_impl<T>(dx, g, offsets, order, total, n, k, inner);                        \
    }                                                                                               \
    extern "C" __global__ void gather_bwd_##S(T* dx, const T* g, const i64* idx, i64 total,        \
                                             GatherGeom geo) {                                      \
        gather_bwd_impl<T>(dx, g, idx, total, geo);                                                 \
    }

GRAD_KERNELS(float, f32)
GRAD_KERNELS(bf16_t, bf16)
