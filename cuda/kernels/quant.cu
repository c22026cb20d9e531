// quant.cu: the nearest codebook entry of every row (vector quantisation), without forming the
// N x V distance matrix.
//
// idx[i] = argmin_v ||z_i||^2 + ||e_v||^2 - 2 z_i . e_v for z [N, C] and the codebook e [V, C]
// (dense, row-major), ties to the lowest v as torch.argmin. z may also be given as feature maps
// [B, C, P] (NCHW with P = H * W pixels, `plane` = P), row i being image i / P, pixel i % P: the
// quantizer searches its area-downsampled maps without a permuted copy. ||z_i||^2 is the same for every v of a
// row, so it cannot change the argmin; the kernel compares d_v = ||e_v||^2 - 2 z_i . e_v and
// leaves it out (adding it in f32 would only round away low bits of the difference).
//
// - code_norms: en[v] = ||e_v||^2 in f32, one thread per code (a small pass before the search).
// - nearest_code: a GEMM-like tiled loop. A block of 256 threads (16 x 16: tx = threadIdx.x % 16,
//   ty = threadIdx.x / 16) owns NC_TM = 64 rows of z and walks the codebook in tiles of
//   NC_TN = 64 codes. Its rows of z are staged in shared memory once, transposed to [k][row]
//   (up to NC_ZC = 128 channels; wider z is staged with e per k step), and for each code tile e
//   is staged NC_TK = 16 channels at a time, also [k][code]; both are zero beyond N, V or C,
//   which adds exact zeros. Each thread accumulates the 4 x 4 dot products of rows 4 ty + i and
//   codes 4 tx + j, reading each k step's four rows and four codes as one float4 each. After a
//   code tile a thread folds its 16 distances into a running (min distance, index) per row,
//   visiting its codes in increasing order with a strict '<', so it keeps the lowest index of
//   its equal minima. At the end the 16 threads that share a row (one half-warp: lanes differ
//   only in tx) combine their candidates with shuffles under the total order "smaller distance,
//   then smaller index", which yields the lowest index among the row's minima whatever the
//   order. A distance that is NaN never wins (as the CPU's scan), and a row whose distances are
//   all +inf or NaN gets index 0 (the CPU's initial best). Blocks grid-stride over row tiles.
//   Two identical codebook rows get bitwise identical distances (the same loads and the same
//   fma sequence), so exact duplicates tie and the lower index wins.
// - Code splits (blockIdx.y): one block walking all V codes for its 64 rows leaves the GPU
//   nearly idle when N is small (the quantizer's first scales have 32 .. a few hundred rows, one
//   to a few row tiles, against 4096 codes), and a 64-row block tile gives only N / 64 blocks at
//   any N. So the codebook is cut into gridDim.y contiguous ranges of `split` codes (a multiple
//   of NC_TN); block (x, y) searches range y for its rows and writes that range's best distance
//   and index to part_d / part_i [gridDim.y][N]; nearest_code_combine then takes, per row, the
//   first range (lowest codes) whose distance is strictly smaller than all before it, which again
//   keeps the lowest index among equal minima. A distance does not depend on the split (the same
//   loads and fma sequence per code), so any split count gives the same indices. With one range
//   (gridDim.y == 1, part_d null) the search writes idx directly: the single-pass variant, kept
//   as the reference (MVAR_NC_SPLITS=1).
//
// Numerics: f32 accumulation (bf16 widened on load); indices are i64 on output. The CPU reference
// forms the cross term with an f32 GEMM and the sum in f64: the indices agree wherever the two
// nearest distances of a row are apart by more than f32 rounding.

#define NC_TM 64
#define NC_TN 64
#define NC_TK 16
#define NC_ZC 128  // most channels (rounded up to NC_TK) for which z stays resident
#define NC_THREADS 256
static_assert(NC_TM == NC_TN, "z and e tiles share one staging layout");
static_assert(NC_THREADS % NC_TM == 0, "a thread stages one fixed row of a planes layout");

template <typename T>
__device__ void code_norms_impl(float* en, const T* e, i64 v, i64 c) {
    GRID_STRIDE(j, v) {
        const T* row = e + j * c;
        float s = 0.0f;
        for (i64 k = 0; k < c; ++k) {
            float x = Io<T>::load(row, k);
            s += x * x;
        }
        en[j] = s;
    }
}

template <typename T>
__device__ void nearest_code_impl(i64* idx, float* part_d, i64* part_i, const T* z, const T* e, const float* en,
                                  i64 n, i64 v, i64 c, i64 split, i64 plane) {
    // [channel][row] and [channel][code]. The pitch (NC_TM + 4) keeps each thread's four
    // consecutive rows or codes one aligned float4, so a k step costs two 16-byte shared loads
    // for sixteen FMAs (a warp reads 2 distinct float4s of zs, broadcast, and 16 of es: no bank
    // conflict), instead of eight 4-byte loads with rows and codes strided by 16.
    __shared__ __align__(16) float zs[NC_ZC][NC_TM + 4];
    __shared__ __align__(16) float es[NC_TK][NC_TN + 4];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const i64 tiles = (n + NC_TM - 1) / NC_TM;
    // With at most NC_ZC channels (rounded up to the k step) the block's rows of z stay in
    // shared memory for the whole codebook walk; wider z is staged per k step with e.
    const i64 c_steps = (c + NC_TK - 1) / NC_TK;
    const bool z_resident = c_steps * NC_TK <= NC_ZC;
    // Stages channels k0 .. k0 + nk of rows r0 .. r0 + 64 of src (n0 rows) into dst[k][row].
    // Rows of z are read in its layout: row-major [N, C] (plane 0), or planes [N / plane, C,
    // plane] (NCHW, row = image * plane + pixel), where a thread takes consecutive rows of one
    // channel so that a warp reads along the pixels.
    auto stage = [&](float(*dst)[NC_TM + 4], const T* src, i64 r0, i64 n0, i64 k0, int nk, i64 pl) {
        if (pl) {
            // A thread's row is fixed (NC_THREADS is a multiple of NC_TM), so its offset, with
            // the 64-bit division the GPU does in software, is computed once per staging.
            const int rr = threadIdx.x % NC_TM;
            const i64 row = r0 + rr;
            const i64 base = row < n0 ? (row / pl) * c * pl + row % pl : 0;
            for (int kk = threadIdx.x / NC_TM; kk < nk; kk += NC_THREADS / NC_TM) {
                i64 col = k0 + kk;
                dst[kk][rr] = (col < c && row < n0) ? Io<T>::load(src, base + col * pl) : 0.0f;
            }
            return;
        }
        for (int q = threadIdx.x; q < NC_TM * nk; q += NC_THREADS) {
            int rr = q / nk, kk = q % nk;
            i64 col = k0 + kk, row = r0 + rr;
            dst[kk][rr] = (col < c && row < n0) ? Io<T>::load(src, row * c + col) : 0.0f;
        }
    };
    for (i64 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const i64 m0 = tile * NC_TM;
        float best[4];
        i64 bidx[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            best[a] = POS_INF;
            bidx[a] = 0;
        }
        if (z_resident) {
            __syncthreads();  // the previous row tile's readers of zs are done
            stage(zs, z, m0, n, 0, (int)(c_steps * NC_TK), plane);
        }
        const i64 vlo = (i64)blockIdx.y * split, vhi = min(v, vlo + split);
        for (i64 v0 = vlo; v0 < vhi; v0 += NC_TN) {
            float acc[4][4];
#pragma unroll
            for (int a = 0; a < 4; ++a) {
#pragma unroll
                for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
            }
            for (i64 k0 = 0; k0 < c; k0 += NC_TK) {
                if (!z_resident) stage(zs, z, m0, n, k0, NC_TK, plane);
                stage(es, e, v0, v, k0, NC_TK, 0);
                __syncthreads();
                const float(*zk)[NC_TM + 4] = z_resident ? zs + k0 : zs;
#pragma unroll
                for (int kk = 0; kk < NC_TK; ++kk) {
                    const float4 za = *reinterpret_cast<const float4*>(&zk[kk][4 * ty]);
                    const float4 eb = *reinterpret_cast<const float4*>(&es[kk][4 * tx]);
                    const float zv[4] = {za.x, za.y, za.z, za.w}, ev[4] = {eb.x, eb.y, eb.z, eb.w};
#pragma unroll
                    for (int a = 0; a < 4; ++a) {
#pragma unroll
                        for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(zv[a], ev[b], acc[a][b]);
                    }
                }
                __syncthreads();
            }
            // Codes v0 + 4 tx + b in increasing b: each row sees its codes in increasing order.
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                i64 code = v0 + 4 * tx + b;
                if (code < vhi) {
                    float norm = en[code];
#pragma unroll
                    for (int a = 0; a < 4; ++a) {
                        float d = norm - 2.0f * acc[a][b];
                        if (d < best[a]) {
                            best[a] = d;
                            bidx[a] = code;
                        }
                    }
                }
            }
        }
        // Combine the 16 candidates of each row across tx (offsets 8..1 stay in the half-warp).
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            float d = best[a];
            i64 bi = bidx[a];
            for (int o = 8; o > 0; o >>= 1) {
                float od = __shfl_xor_sync(0xffffffffu, d, o);
                i64 ob = __shfl_xor_sync(0xffffffffu, bi, o);
                if (od < d || (od == d && ob < bi)) {
                    d = od;
                    bi = ob;
                }
            }
            i64 row = m0 + 4 * ty + a;
            if (tx == 0 && row < n) {
                if (part_d) {
                    part_d[blockIdx.y * n + row] = d;
                    part_i[blockIdx.y * n + row] = bi;
                } else {
                    idx[row] = bi;
                }
            }
        }
    }
}

// Per row, the best of the code ranges in increasing order (strict '<': the lowest index wins a
// tie, a NaN never wins, a row with no finite distance keeps index 0).
__device__ void nearest_code_combine_impl(i64* idx, const float* part_d, const i64* part_i, i64 n, int splits) {
    GRID_STRIDE(row, n) {
        float best = POS_INF;
        i64 bi = 0;
        for (int s = 0; s < splits; ++s) {
            float d = part_d[(i64)s * n + row];
            if (d < best) {
                best = d;
                bi = part_i[(i64)s * n + row];
            }
        }
        idx[row] = bi;
    }
}

extern "C" __global__ void nearest_code_combine(i64* idx, const float* part_d, const i64* part_i, i64 n,
                                                int splits) {
    nearest_code_combine_impl(idx, part_d, part_i, n, splits);
}

#define QUANT_KERNELS(T, S)                                                                         \
    extern "C" __global__ void code_norms_##S(float* en, const T* e, i64 v, i64 c) {               \
        code_norms_impl<T>(en, e, v, c);                                                           \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(NC_THREADS)                                       \
        nearest_code_##S(i64* idx, float* part_d, i64* part_i, const T* z, const T* e, const float* en, \
                         i64 n, i64 v, i64 c, i64 split, i64 plane) {                               \
        nearest_code_impl<T>(idx, part_d, part_i, z, e, en, n, v, c, split, plane);                \
    }

QUANT_KERNELS(float, f32)
QUANT_KERNELS(bf16_t, bf16)
