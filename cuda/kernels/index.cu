// index.cu: ops that move elements by position or by integer index: narrow (a band of one
// axis) and its backward, the band placement concat is built from, index_select, gather, and
// the backwards of index_select and gather.
//
// Layout: dense row-major buffers. An axis op sees its tensor as [outer, n, inner] (the axis in
// the middle, everything before it folded into `outer`, everything after into `inner`). Indices
// are i64 buffers. gather reads a `GatherGeom` (dims and strides of the input and of the
// indices, up to MAX_RANK axes), mirrored by `GatherGeom` in cuda/src/ops/index.rs.
// Parallel decomposition: one thread per output element, grid-stride loop, 256 threads a block.
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

// out [outer, len, inner] = x [outer, n, inner] rows start .. start+len.
template <typename T>
__device__ void narrow_impl(T* out, const T* x, i64 total, i64 n, i64 len, i64 inner, i64 start) {
    GRID_STRIDE(i, total) {
        i64 c = i % inner;
        i64 rest = i / inner;
        i64 j = rest % len;
        i64 o = rest / len;
        out[i] = x[(o * n + start + j) * inner + c];
    }
}

// out [outer, n, inner]: g [outer, len, inner] on rows start .. start+len, zero elsewhere.
template <typename T>
__device__ void narrow_bwd_impl(T* out, const T* g, i64 total, i64 n, i64 len, i64 inner, i64 start) {
    GRID_STRIDE(i, total) {
        i64 c = i % inner;
        i64 rest = i / inner;
        i64 r = rest % n;
        i64 o = rest / n;
        i64 j = r - start;
        out[i] = (j >= 0 && j < len) ? g[(o * len + j) * inner + c] : (T)0;
    }
}

// x [outer, n, inner] written to rows start .. start+n of out [outer, total_n, inner]: one call
// per concat input. Threads walk the input, so reads are contiguous and writes contiguous runs.
template <typename T>
__device__ void band_place_impl(T* out, const T* x, i64 count, i64 n, i64 total_n, i64 inner, i64 start) {
    GRID_STRIDE(i, count) {
        i64 c = i % inner;
        i64 rest = i / inner;
        i64 j = rest % n;
        i64 o = rest / n;
        out[(o * total_n + start + j) * inner + c] = x[i];
    }
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

#define COPY_KERNELS(T, S)                                                                           \
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
    }                                                                                               \
    extern "C" __global__ void index_select_##S(T* out, const T* x, const i64* idx, i64 total,     \
                                               i64 n, i64 k, i64 inner) {                           \
        index_select_impl<T>(out, x, idx, total, n, k, inner);                                      \
    }                                                                                               \
    extern "C" __global__ void gather_##S(T* out, const T* x, const i64* idx, i64 total,           \
                                         GatherGeom geo) {                                          \
        gather_impl<T>(out, x, idx, total, geo);                                                    \
    }

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
