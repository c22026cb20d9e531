// quant.cu: the nearest codebook entry of every row (vector quantisation), without forming the
// N x V distance matrix.
//
// idx[i] = argmin_v ||z_i||^2 + ||e_v||^2 - 2 z_i . e_v for z [N, C] and the codebook e [V, C]
// (dense, row-major), ties to the lowest v as torch.argmin. ||z_i||^2 is the same for every v of a
// row, so it cannot change the argmin; the kernel compares d_v = ||e_v||^2 - 2 z_i . e_v and
// leaves it out (adding it in f32 would only round away low bits of the difference).
//
// - code_norms: en[v] = ||e_v||^2 in f32, one thread per code (a small pass before the search).
// - nearest_code: a GEMM-like tiled loop. A block of 256 threads (16 x 16: tx = threadIdx.x % 16,
//   ty = threadIdx.x / 16) owns NC_TM = 64 rows of z and walks the codebook in tiles of
//   NC_TN = 64 codes; for each code tile it stages z and e in shared memory NC_TK = 16 channels
//   at a time (both transposed to [k][row], zero beyond N, V or C, which adds exact zeros) and
//   each thread accumulates the 4 x 4 dot products of rows ty + 16*i and codes tx + 16*j. After a
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
#define NC_THREADS 256

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
                                  i64 n, i64 v, i64 c, i64 split) {
    // [k][row], padded by one column so the transposing stores do not hit one bank.
    __shared__ float zs[NC_TK][NC_TM + 1];
    __shared__ float es[NC_TK][NC_TN + 1];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const i64 tiles = (n + NC_TM - 1) / NC_TM;
    for (i64 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const i64 m0 = tile * NC_TM;
        float best[4];
        i64 bidx[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            best[a] = POS_INF;
            bidx[a] = 0;
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
                // 64 rows x 16 channels of each operand, channel fastest (coalesced along a row).
                for (int q = threadIdx.x; q < NC_TM * NC_TK; q += NC_THREADS) {
                    int rr = q / NC_TK, kk = q % NC_TK;
                    i64 col = k0 + kk;
                    i64 row = m0 + rr, code = v0 + rr;
                    bool in_c = col < c;
                    zs[kk][rr] = (in_c && row < n) ? Io<T>::load(z, row * c + col) : 0.0f;
                    es[kk][rr] = (in_c && code < v) ? Io<T>::load(e, code * c + col) : 0.0f;
                }
                __syncthreads();
#pragma unroll
                for (int kk = 0; kk < NC_TK; ++kk) {
                    float za[4], eb[4];
#pragma unroll
                    for (int a = 0; a < 4; ++a) za[a] = zs[kk][ty + 16 * a];
#pragma unroll
                    for (int b = 0; b < 4; ++b) eb[b] = es[kk][tx + 16 * b];
#pragma unroll
                    for (int a = 0; a < 4; ++a) {
#pragma unroll
                        for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(za[a], eb[b], acc[a][b]);
                    }
                }
                __syncthreads();
            }
            // Codes v0 + tx + 16*b in increasing b: each row sees its codes in increasing order.
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                i64 code = v0 + tx + 16 * b;
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
            i64 row = m0 + ty + 16 * a;
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
                         i64 n, i64 v, i64 c, i64 split) {                                          \
        nearest_code_impl<T>(idx, part_d, part_i, z, e, en, n, v, c, split);                       \
    }

QUANT_KERNELS(float, f32)
QUANT_KERNELS(bf16_t, bf16)
