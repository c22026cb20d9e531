// conv.cu: the pieces of 2-D convolution around cuBLAS (im2col, the bias add and output
// placement, the gradient tile copy, col2im, gradient accumulation, the bias gradient) and
// nearest-neighbour upsampling with its backward.
//
// Convolution (cross-correlation, NCHW, four-sided zero padding, any stride and kernel size):
// x [N, Cin, H, W], w [Cout, K] with K = Cin*kh*kw (row r = (ci, ky, kx)), y [N, Cout, P] with
// P = Ho*Wo. The host works in tiles of images n0 .. n0+nb and output positions p0 .. p0+t
// (t < P only when one image is a tile) and L = nb*t columns:
//   im2col:  cols [K, nb, t] (a [K, L] matrix), cols[r, b, j] = xpad[n0+b, ci, oy*sh+ky, ox*sw+kx]
//            with (oy, ox) = position p0+j; zero where the window reads padding.
//   forward: yt [Cout, L] = w @ cols (cuBLAS), then conv_store writes yt (+ bias) into y.
//   dW:      dyt [Cout, L] (conv_tile_dy, the transpose of conv_store's placement), then
//            dW += dyt @ cols^T (cuBLAS, then accumulate_f32 when there are several tiles).
//   dx:      dcols [K, L] = w^T @ dyt (cuBLAS), then col2im.
// col2im is a gather: one thread per input pixel of the tile sums the dcols entries that read
// that pixel (for each (ky, kx): the output position whose window puts (ky, kx) on the pixel, if
// it exists and lies in the tile), so there are no atomics and no write conflicts; it adds into
// an f32 accumulator because a pixel receives from every position tile of its image.
// The bias gradient is one block per output channel: a strided sum over N*P elements, then a
// block reduction (fixed order, deterministic).
//
// Upsampling by an integer factor f on planes [H, W] -> [H*f, W*f]: the forward is one thread
// per output pixel (a copy); the backward one thread per input pixel summing its f x f block, a
// gather again.
//
// Parallel decomposition: one thread per element of what a kernel writes, grid-stride loops,
// 256 threads a block (the bias gradient: a block per channel, grid-stride over channels).
// The three copies of the column pipeline (im2col, conv_store, conv_tile_dy) also have vector
// variants (`*_vec`), which the host picks when their rows are whole 16-byte vectors (see
// tile_vector in cuda/src/ops/conv.rs; MVAR_EW_KERNEL=scalar keeps the per-element kernels, the
// reference variant the benches time beside them): a thread writes N = 16 / sizeof(T)
// consecutive positions of one row with one 16-byte store, and its index math (32-bit, the host
// checks every index fits) runs once per vector instead of once per element. Their grid is 2-D:
// x over the vectors of a row, y over rows (threadIdx.y picks one of several rows a block when a
// row is short), so the (channel, tap) of a row is worked out once per row, not per element.
// The column matrices these write are the largest buffers of a VQVAE step (the decoder's
// [32, 160, 256, 256] 3x3 convs write 1440 rows of 65536 positions per image), and the
// per-element kernels spent their time in 64-bit divisions, not in memory traffic. The
// upsampling kernels have vector variants in the same grid too (upsample_nearest_vec: a vector
// of an output row; upsample_nearest_bwd_vec: a vector of a dx row), taken when those rows are
// whole vectors.
// Numerics: copies (im2col, conv_tile_dy, the upsampling forward) move raw bits. Sums are f32,
// bf16 widened on load and rounded once on store; the accumulators of dx and dW are f32 for
// both element types and the host rounds them to bf16 at the end.

// Mirrors `Geom` in cuda/src/ops/conv.rs (repr(C), twelve i64).
struct ConvGeom {
    i64 cin, h, w, cout;
    i64 kh, kw, sh, sw;
    i64 top, left, ho, wo;
};

template <typename T>
__device__ void im2col_impl(T* cols, const T* x, i64 total, ConvGeom g, i64 n0, i64 nb, i64 p0, i64 t) {
    GRID_STRIDE(i, total) {
        i64 j = i % t;
        i64 rest = i / t;
        i64 b = rest % nb;
        i64 r = rest / nb;
        i64 kx = r % g.kw;
        i64 r2 = r / g.kw;
        i64 ky = r2 % g.kh;
        i64 ci = r2 / g.kh;
        i64 p = p0 + j;
        i64 oy = p / g.wo, ox = p % g.wo;
        i64 iy = oy * g.sh + ky - g.top;
        i64 ix = ox * g.sw + kx - g.left;
        bool inside = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
        cols[i] = inside ? x[(((n0 + b) * g.cin + ci) * g.h + iy) * g.w + ix] : (T)0;
    }
}

// y[n0+b, co, p0+j] = yt (+ bias[co]) for the tile; yt is [Cout, nb, t] (the GEMM of a column
// tile) or, when batch_major, [nb, Cout, t] (a batched GEMM). Threads walk y's order. With
// batch_major, n0 = p0 = 0 and t = P, y and yt index alike, so the host may pass y == yt (each
// thread reads the element it then writes).
template <typename T>
__device__ void conv_store_impl(T* y, const T* yt, const T* bias, i64 total, i64 cout, i64 p, i64 n0,
                                i64 nb, i64 p0, i64 t, int batch_major) {
    GRID_STRIDE(i, total) {
        i64 j = i % t;
        i64 rest = i / t;
        i64 co = rest % cout;
        i64 b = rest / cout;
        i64 src = batch_major ? i : (co * nb + b) * t + j;
        float v = Io<T>::load(yt, src);
        if (bias) v += Io<T>::load(bias, co);
        Io<T>::store(y, ((n0 + b) * cout + co) * p + p0 + j, v);
    }
}

// dyt [Cout, nb, t] = dy[n0+b, co, p0+j]: the tile of the output gradient as a [Cout, L] matrix.
template <typename T>
__device__ void conv_tile_dy_impl(T* dyt, const T* dy, i64 total, i64 cout, i64 p, i64 n0, i64 nb, i64 p0,
                                  i64 t) {
    GRID_STRIDE(i, total) {
        i64 j = i % t;
        i64 rest = i / t;
        i64 co = rest % cout;
        i64 b = rest / cout;
        dyt[(co * nb + b) * t + j] = dy[((n0 + b) * cout + co) * p + p0 + j];
    }
}

// The raw bits of a 16-byte vector of T.
__device__ __forceinline__ Word16 pack_word(const float* v) {
    return Word16{__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3])};
}
__device__ __forceinline__ Word16 pack_word(const bf16_t* v) {
    return Word16{(unsigned int)v[0] | ((unsigned int)v[1] << 16), (unsigned int)v[2] | ((unsigned int)v[3] << 16),
                  (unsigned int)v[4] | ((unsigned int)v[5] << 16), (unsigned int)v[6] | ((unsigned int)v[7] << 16)};
}

// The row and the vector within it of this thread in the vector kernels' 2-D grid; false past
// the row's end.
__device__ __forceinline__ bool vec_coords(int per_row, int& jv) {
    jv = blockIdx.x * blockDim.x + threadIdx.x;
    return jv < per_row;
}
#define VEC_ROWS(row, rows) for (int row = blockIdx.y * blockDim.y + threadIdx.y; row < (rows); row += blockDim.y * gridDim.y)

// im2col with N = 16 / sizeof(T) positions a thread: cols[row, jv*N .. jv*N+N) with row = r*nb + b
// (cols [K, nb, t], t a whole number of vectors). The positions of a vector may wrap onto the
// next output row; the taps are read one element at a time (a window shifted by kx is not
// 16-byte aligned in x), which the warp's neighbouring vectors coalesce.
template <typename T>
__device__ void im2col_vec_impl(T* cols, const T* x, ConvGeom g64, int n0, int nb, int p0, int t, int rows) {
    constexpr int N = Vec16<T>::N;
    const int per_row = t / N;
    int jv;
    if (!vec_coords(per_row, jv)) return;
    const int cin = (int)g64.cin, h = (int)g64.h, w = (int)g64.w, kh = (int)g64.kh, kw = (int)g64.kw;
    const int sh = (int)g64.sh, sw = (int)g64.sw, top = (int)g64.top, left = (int)g64.left, wo = (int)g64.wo;
    const int p_first = p0 + jv * N;
    const int oy_first = p_first / wo, ox_first = p_first - oy_first * wo;
    VEC_ROWS(row, rows) {
        const int b = row % nb, r = row / nb;
        const int kx = r % kw, r2 = r / kw;
        const int ky = r2 % kh, ci = r2 / kh;
        const T* plane = x + ((n0 + b) * cin + ci) * h * w;
        T v[N];
        int oy = oy_first, ox = ox_first;
#pragma unroll
        for (int e = 0; e < N; ++e) {
            const int iy = oy * sh + ky - top, ix = ox * sw + kx - left;
            v[e] = (iy >= 0 && iy < h && ix >= 0 && ix < w) ? plane[iy * w + ix] : (T)0;
            if (++ox == wo) {
                ox = 0;
                ++oy;
            }
        }
        *reinterpret_cast<Word16*>(cols + row * t + jv * N) = pack_word(v);
    }
}

// conv_store with N positions a thread; rows in y's order (b, co), rows = nb * Cout. Needs p, p0
// and t whole vectors so that y's rows start on a vector too.
template <typename T>
__device__ void conv_store_vec_impl(T* y, const T* yt, const T* bias, int cout, int p, int n0, int nb, int p0,
                                    int t, int batch_major, int rows) {
    constexpr int N = Vec16<T>::N;
    int jv;
    if (!vec_coords(t / N, jv)) return;
    VEC_ROWS(row, rows) {
        const int co = row % cout, b = row / cout;
        const int src_row = batch_major ? row : co * nb + b;
        float v[N];
        Vec16<T>::load(yt + src_row * t + jv * N, v);
        if (bias) {
            const float bv = Io<T>::load(bias, co);
#pragma unroll
            for (int e = 0; e < N; ++e) v[e] += bv;
        }
        Vec16<T>::store(y + ((n0 + b) * cout + co) * p + p0 + jv * N, v);
    }
}

// conv_tile_dy with N positions a thread: a 16-byte copy per thread; rows in dyt's order
// (co, b), rows = Cout * nb.
template <typename T>
__device__ void conv_tile_dy_vec_impl(T* dyt, const T* dy, int cout, int p, int n0, int nb, int p0, int t, int rows) {
    constexpr int N = Vec16<T>::N;
    int jv;
    if (!vec_coords(t / N, jv)) return;
    VEC_ROWS(row, rows) {
        const int b = row % nb, co = row / nb;
        *reinterpret_cast<Word16*>(dyt + row * t + jv * N) =
            *reinterpret_cast<const Word16*>(dy + ((n0 + b) * cout + co) * p + p0 + jv * N);
    }
}

// acc[n0+b, ci, iy, ix] += sum of the dcols [K, nb, t] entries that im2col filled from that pixel.
template <typename T>
__device__ void col2im_impl(float* acc, const T* dcols, i64 total, ConvGeom g, i64 n0, i64 nb, i64 p0, i64 t) {
    GRID_STRIDE(i, total) {
        i64 ix = i % g.w;
        i64 rest = i / g.w;
        i64 iy = rest % g.h;
        rest /= g.h;
        i64 ci = rest % g.cin;
        i64 b = rest / g.cin;
        float s = 0.0f;
        for (i64 ky = 0; ky < g.kh; ++ky) {
            i64 ty = iy + g.top - ky;  // = oy * sh for the output row that reads this pixel
            if (ty < 0) break;         // only decreases with ky
            if (ty % g.sh != 0) continue;
            i64 oy = ty / g.sh;
            if (oy >= g.ho) continue;
            for (i64 kx = 0; kx < g.kw; ++kx) {
                i64 tx = ix + g.left - kx;
                if (tx < 0) break;
                if (tx % g.sw != 0) continue;
                i64 ox = tx / g.sw;
                if (ox >= g.wo) continue;
                i64 q = oy * g.wo + ox - p0;
                if (q < 0 || q >= t) continue;
                i64 r = (ci * g.kh + ky) * g.kw + kx;
                s += Io<T>::load(dcols, (r * nb + b) * t + q);
            }
        }
        acc[n0 * g.cin * g.h * g.w + i] += s;
    }
}

template <typename T>
__device__ void accumulate_impl(float* acc, const T* x, i64 n) {
    GRID_STRIDE(i, n) acc[i] += Io<T>::load(x, i);
}

// db[co] = sum over n and p of dy[n, co, p]; one block per channel.
template <typename T>
__device__ void conv_bias_grad_impl(T* db, const T* dy, i64 n, i64 cout, i64 p) {
    __shared__ float scratch[32];
    i64 per_channel = n * p;
    for (i64 co = blockIdx.x; co < cout; co += gridDim.x) {
        float s = 0.0f;
        for (i64 e = threadIdx.x; e < per_channel; e += blockDim.x) {
            i64 b = e / p, q = e % p;
            s += Io<T>::load(dy, (b * cout + co) * p + q);
        }
        s = block_sum(s, scratch);
        if (threadIdx.x == 0) Io<T>::store(db, co, s);
    }
}

// y [planes, H*f, W*f]: y[pl, oy, ox] = x[pl, oy / f, ox / f].
template <typename T>
__device__ void upsample_nearest_impl(T* y, const T* x, i64 total, i64 h, i64 w, i64 f) {
    i64 oh = h * f, ow = w * f;
    GRID_STRIDE(i, total) {
        i64 ox = i % ow;
        i64 rest = i / ow;
        i64 oy = rest % oh;
        i64 pl = rest / oh;
        y[i] = x[(pl * h + oy / f) * w + ox / f];
    }
}

// dx [planes, H, W]: dx[pl, iy, ix] = sum of g over the f x f block x[pl, iy, ix] was copied to.
template <typename T>
__device__ void upsample_nearest_bwd_impl(T* dx, const T* g, i64 total, i64 h, i64 w, i64 f) {
    i64 ow = w * f;
    GRID_STRIDE(i, total) {
        i64 ix = i % w;
        i64 rest = i / w;
        i64 iy = rest % h;
        i64 pl = rest / h;
        i64 base = ((pl * h + iy) * f) * ow + ix * f;
        float s = 0.0f;
        for (i64 a = 0; a < f; ++a) {
            for (i64 c = 0; c < f; ++c) s += Io<T>::load(g, base + a * ow + c);
        }
        Io<T>::store(dx, i, s);
    }
}

// upsample_nearest with N = 16 / sizeof(T) outputs a thread: y row `row` (rows = planes * h * f
// rows of ow = w * f) copies x row row / f, output column j reading input column j / f; the
// columns of a thread's vector are walked by a counter, so no division runs per element (the
// per-element kernel above does four 64-bit ones). Needs ow a whole number of vectors and every
// index below 2^31.
template <typename T>
__device__ void upsample_nearest_vec_impl(T* y, const T* x, int w, int f, int rows) {
    constexpr int N = Vec16<T>::N;
    const int ow = w * f;
    int jv;
    if (!vec_coords(ow / N, jv)) return;
    const int j0 = jv * N, ix0 = j0 / f, r0 = j0 - ix0 * f;
    VEC_ROWS(row, rows) {
        const T* xr = x + (row / f) * w;
        T v[N];
        int ix = ix0, r = r0;
#pragma unroll
        for (int e = 0; e < N; ++e) {
            v[e] = xr[ix];
            if (++r == f) {
                r = 0;
                ++ix;
            }
        }
        *reinterpret_cast<Word16*>(y + row * ow + j0) = pack_word(v);
    }
}

// upsample_nearest's backward with N outputs a thread: dx row `row` (rows = planes * h rows of w)
// sums, for each of its N columns, the f x f block of g rows row * f .. row * f + f, in the
// per-element kernel's order (g row by g row, left to right), so the sums are the same floats.
// F = 2 (the decoders' factor) reads each g row's 2N columns as two 16-byte vectors; F = 0 takes
// f at run time and reads them one element at a time. Needs w a whole number of vectors and
// every index below 2^31.
template <typename T, int F>
__device__ void upsample_nearest_bwd_vec_impl(T* dx, const T* g, int w, int f_rt, int rows) {
    constexpr int N = Vec16<T>::N;
    const int f = F ? F : f_rt;
    const int ow = w * f;
    int jv;
    if (!vec_coords(w / N, jv)) return;
    const int j0 = jv * N;
    VEC_ROWS(row, rows) {
        float acc[N];
#pragma unroll
        for (int e = 0; e < N; ++e) acc[e] = 0.0f;
        for (int a = 0; a < f; ++a) {
            const T* gr = g + (row * f + a) * ow + j0 * f;
            if (F == 2) {
                float v[2 * N];
                Vec16<T>::load(gr, v);
                Vec16<T>::load(gr + N, v + N);
#pragma unroll
                for (int e = 0; e < N; ++e) {
                    acc[e] += v[2 * e];
                    acc[e] += v[2 * e + 1];
                }
            } else {
#pragma unroll
                for (int e = 0; e < N; ++e)
                    for (int c = 0; c < f; ++c) acc[e] += Io<T>::load(gr, e * f + c);
            }
        }
        Vec16<T>::store(dx + row * w + j0, acc);
    }
}

#define CONV_KERNELS(T, S)                                                                           \
    extern "C" __global__ void im2col_##S(T* cols, const T* x, i64 total, ConvGeom g, i64 n0,      \
                                         i64 nb, i64 p0, i64 t) {                                   \
        im2col_impl<T>(cols, x, total, g, n0, nb, p0, t);                                           \
    }                                                                                               \
    extern "C" __global__ void conv_store_##S(T* y, const T* yt, const T* bias, i64 total,         \
                                             i64 cout, i64 p, i64 n0, i64 nb, i64 p0, i64 t,        \
                                             int batch_major) {                                     \
        conv_store_impl<T>(y, yt, bias, total, cout, p, n0, nb, p0, t, batch_major);                \
    }                                                                                               \
    extern "C" __global__ void conv_tile_dy_##S(T* dyt, const T* dy, i64 total, i64 cout, i64 p,   \
                                               i64 n0, i64 nb, i64 p0, i64 t) {                     \
        conv_tile_dy_impl<T>(dyt, dy, total, cout, p, n0, nb, p0, t);                               \
    }                                                                                               \
    extern "C" __global__ void im2col_vec_##S(T* cols, const T* x, ConvGeom g, int n0, int nb,       \
                                             int p0, int t, int rows) {                             \
        im2col_vec_impl<T>(cols, x, g, n0, nb, p0, t, rows);                                        \
    }                                                                                               \
    extern "C" __global__ void conv_store_vec_##S(T* y, const T* yt, const T* bias, int cout,      \
                                                 int p, int n0, int nb, int p0, int t,              \
                                                 int batch_major, int rows) {                       \
        conv_store_vec_impl<T>(y, yt, bias, cout, p, n0, nb, p0, t, batch_major, rows);             \
    }                                                                                               \
    extern "C" __global__ void conv_tile_dy_vec_##S(T* dyt, const T* dy, int cout, int p, int n0,  \
                                                   int nb, int p0, int t, int rows) {               \
        conv_tile_dy_vec_impl<T>(dyt, dy, cout, p, n0, nb, p0, t, rows);                            \
    }                                                                                               \
    extern "C" __global__ void upsample_nearest_vec_##S(T* y, const T* x, int w, int f, int rows) { \
        upsample_nearest_vec_impl<T>(y, x, w, f, rows);                                             \
    }                                                                                               \
    extern "C" __global__ void upsample_nearest_bwd_vec2_##S(T* dx, const T* g, int w, int f,      \
                                                            int rows) {                             \
        upsample_nearest_bwd_vec_impl<T, 2>(dx, g, w, f, rows);                                     \
    }                                                                                               \
    extern "C" __global__ void upsample_nearest_bwd_vec_##S(T* dx, const T* g, int w, int f,       \
                                                           int rows) {                              \
        upsample_nearest_bwd_vec_impl<T, 0>(dx, g, w, f, rows);                                     \
    }                                                                                               \
    extern "C" __global__ void col2im_##S(float* acc, const T* dcols, i64 total, ConvGeom g,       \
                                         i64 n0, i64 nb, i64 p0, i64 t) {                           \
        col2im_impl<T>(acc, dcols, total, g, n0, nb, p0, t);                                        \
    }                                                                                               \
    extern "C" __global__ void accumulate_f32_from_##S(float* acc, const T* x, i64 n) {            \
        accumulate_impl<T>(acc, x, n);                                                              \
    }                                                                                               \
    extern "C" __global__ void conv_bias_grad_##S(T* db, const T* dy, i64 n, i64 cout, i64 p) {    \
        conv_bias_grad_impl<T>(db, dy, n, cout, p);                                                 \
    }                                                                                               \
    extern "C" __global__ void upsample_nearest_##S(T* y, const T* x, i64 total, i64 h, i64 w,     \
                                                   i64 f) {                                         \
        upsample_nearest_impl<T>(y, x, total, h, w, f);                                             \
    }                                                                                               \
    extern "C" __global__ void upsample_nearest_bwd_##S(T* dx, const T* g, i64 total, i64 h,       \
                                                       i64 w, i64 f) {                              \
        upsample_nearest_bwd_impl<T>(dx, g, total, h, w, f);                                        \
    }

CONV_KERNELS(float, f32)
CONV_KERNELS(bf16_t, bf16)
