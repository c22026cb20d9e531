// attention.cu: fused scaled dot-product attention, forward and backward, without an Lq x Lk
// matrix in memory (online softmax, flash-attention style): bf16 tensor-core kernels, f32
// CUDA-core tiled kernels, and a naive reference variant.
//
//   S = scale * q k^T (+ mask),  P = softmax_rows(S),  O = P v
//   lse_i = log sum_j exp(S_ij)                       (saved by the forward, f32, natural log)
//   delta_i = sum_c dO_ic O_ic
//   dV = P^T dO,  dP = dO v^T,  dS = P * (dP - delta),  dQ = scale dS k,  dK = scale dS^T q
//
// Layouts (row-major, one head after another): q [BH, Lq, D], k [BH, Lk, D], v [BH, Lk, Dv],
// o / dO [BH, Lq, Dv], lse / delta [BH, Lq] f32, dq / dk / dv like q / k / v. BH = B * H.
//
// Masks (`AttnMaskArg`): none; the two scale-block masks, computed on the fly from the prefix
// table `bounds` of the scale lengths (bounds[0] = 0, bounds[s + 1] = end of scale s, Lq == Lk);
// a query row i of scale s sees the keys [0, bounds[s + 1]) (block-causal) or
// [bounds[s], bounds[s + 1]) (block-diagonal). The naive kernels also take an additive f32 mask
// read through strides over [B, H, Lq, Lk] (0 on broadcast axes). A row that sees no key (no
// keys at all, or an additive mask of -inf only) gets output 0, lse -inf and gradient 0.
//
// Tiled kernels (head dim D = 64 or 128 in the template; any d <= D runs in it, the padding
// columns are zero in shared memory and never stored; d == dv):
// - attn_fwd_d<D>: one block per (head, tile of 64 queries), 2 * D threads. Q tile resident in
//   shared memory; loops over the 64-key tiles that the tile's rows can see (only those: the
//   block masks skip whole tiles), stages K and V, computes S = Q K^T with each thread owning a
//   4 x (64 / TX) block of scores, keeps a running row max and sum (online softmax, scores in
//   log2 units so exp2 is used), rescales its 4 x 8 block of O and adds P V. Warps whose rows are
//   all past Lq (KV-cache decode with a few new tokens) skip the arithmetic.
// - attn_bwd_dkdv_d<D>: key-tile-major like FlashAttention-2: one block per (head, tile of 64
//   keys) with K and V resident and dK, dV accumulated in registers (no atomics); loops over the
//   query tiles that can see the keys, recomputing P^T = exp(S^T - lse) and dS^T.
// - attn_bwd_dq_d<D>: dQ in a separate query-major pass (deterministic, no f32 scratch): one
//   block per (head, query tile), loops over key tiles recomputing P and dS, dQ += dS K.
// - attn_bwd_delta: delta_i = rowsum(dO * O), one warp per row, before both backward passes.
// Every tile product is one of two register-tiled shared-memory forms (plain f32 FMA): "dot"
// (C[m][n] = sum_c A[m][c] B[n][c], both tiles row-major with c contiguous, read as float4 along
// c) for S and dP, and "outer" (C[m][n] += sum_r A[r][m] B[r][n], A a score tile stored
// transposed by its producer, B a row-major D-wide tile) for O, dV, dK and dQ. Thread (ty, tx),
// ty = tid / TX, tx = tid % TX, TX = D / 8, owns rows 4 ty .. 4 ty + 3 of every tile (so one
// warp owns 16 rows when D = 64), score columns tx + TX j, and output columns
// 4 tx + {0..3} and D/2 + 4 tx + {0..3}. Row reductions are shuffles over the TX lanes of a row.
// Row strides of D + 4 and 64 + 4 floats keep the float4 reads free of bank conflicts.
//
// mma kernels (bf16 only, sm_80+; head dim D = 64 or 128 in the template, any d <= D that is a
// multiple of 8 runs in it with zero padding; d == dv; no additive mask): the same three passes
// as the tiled kernels with 64-row tiles, but four warps per block, each owning 16 rows, and every
// product on the tensor cores (mma.sync m16n8k16, f32 accumulation; fragment helpers in
// mma.cuh). Tiles are staged as bf16 [64][D + 8] in shared memory with cp.async, double-buffered
// so the next tile is in flight while the current one is used.
// - attn_fwd_mma_d<D>_bf16: Q fragments in registers; per key tile a warp computes its 16 x 64
//   scores as four 16-key chunks (chunks that no row of the warp sees are skipped), one online
//   softmax update per row, then O += P V with P rounded to bf16 (as FlashAttention does).
// - attn_bwd_dq_mma_d<D>_bf16: Q and dO fragments in registers; per 16-key chunk S = Q K^T,
//   dP = dO V^T, P = exp(S - lse), dS = P (dP - delta), dQ += dS K (dS rounded to bf16).
// - attn_bwd_dkdv_mma_d<D>_bf16: the block's 64 keys and values resident in shared memory (the
//   A operands of the transposed products S^T = K Q^T, dP^T = V dO^T); dK and dV accumulate in
//   registers over the query tiles that see the keys (no atomics).
// The masks are per-lane key (or query) ranges of the lane's two rows, as in the tiled kernels.
// Two fast paths keep the common case lean: a whole 64-row tile with d == D is staged with
// constant-offset cp.async (att_stage_async), and a key tile (forward) or 16-key / 16-query
// chunk (backward) that every row of the warp sees whole skips the per-element masks
// (att_warp_seen: the intersection of the warp's ranges, found once per block by shuffles).
//
// Naive kernels (reference; any D, Dv, every mask): one block of 128 threads per query row
// (forward, dQ) or per key row (dK, dV). The forward makes two passes over the keys: the row
// max, then the exponentials (staged 128 at a time in shared memory) and their sums, with one
// thread per output column accumulating p_j v_jc. No tiling: K and V are re-read per row.
//
// Numerics: f32 throughout (bf16 widened on load, rounded once on store); lse in f32. The mma
// kernels multiply bf16 operands exactly into f32 accumulators; they additionally round P and dS
// to bf16 as operands of the second product of each pass, and the mma forward lets a row's
// running max lag its true max by up to ATT_RESCALE_SLACK log2 units (O is rescaled only past
// that; the softmax is the same).

#define ATT_TILE 64
#define ATT_LS (ATT_TILE + 4)
#define NAIVE_THREADS 128
#define ATT_LOG2E 1.4426950408889634f
#define ATT_LN2 0.69314718055994531f

#define MASK_NONE 0
#define MASK_BLOCK_CAUSAL 1
#define MASK_BLOCK_DIAGONAL 2
#define MASK_ADDITIVE 3

// Mirrors `AttnMaskArg` in cuda/src/ops/attention.rs (repr(C)).
struct AttnMaskArg {
    const i64* bounds;      // nsc + 1 prefix sums of the scale lengths (block masks)
    const float* add;       // additive mask values (MASK_ADDITIVE)
    i64 add_strides[4];     // strides of the additive mask over [B, H, Lq, Lk], 0 if broadcast
    int nsc;                // number of scales
    int mode;               // MASK_*
};

// Mirrors `AttnDims` in cuda/src/ops/attention.rs (repr(C)).
struct AttnDims {
    int bh;     // B * H
    int heads;  // H
    int lq, lk, d, dv;
};

#ifdef MVAR_CUDA_EMU
// The CPU emulator (cuda/emu) gives each launch one dynamic shared buffer.
#define att_smem (reinterpret_cast<float4*>(mvar_emu::g_launch->dyn_smem))
#else
extern __shared__ float4 att_smem[];
#endif

// The scale holding position `pos` (0 <= pos < bounds[n]): the largest s with bounds[s] <= pos.
__device__ __forceinline__ int scale_of(const i64* bounds, int n, i64 pos) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (bounds[mid] <= pos) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// The keys [lo, hi) visible to at least one of the query rows [r0, r1) (r0 < r1), for the block
// masks; every key otherwise. For one row this is exactly its visible range.
__device__ __forceinline__ void keys_of_rows(const AttnMaskArg& m, int r0, int r1, int lk, int& lo, int& hi) {
    if (m.mode == MASK_BLOCK_CAUSAL || m.mode == MASK_BLOCK_DIAGONAL) {
        int s0 = scale_of(m.bounds, m.nsc, r0), s1 = scale_of(m.bounds, m.nsc, r1 - 1);
        lo = m.mode == MASK_BLOCK_CAUSAL ? 0 : (int)m.bounds[s0];
        hi = (int)m.bounds[s1 + 1];
    } else {
        lo = 0;
        hi = lk;
    }
}

// The query rows [lo, hi) that see at least one of the keys [c0, c1) (c0 < c1).
__device__ __forceinline__ void rows_of_keys(const AttnMaskArg& m, int c0, int c1, int lq, int& lo, int& hi) {
    if (m.mode == MASK_BLOCK_CAUSAL || m.mode == MASK_BLOCK_DIAGONAL) {
        int s0 = scale_of(m.bounds, m.nsc, c0), s1 = scale_of(m.bounds, m.nsc, c1 - 1);
        lo = (int)m.bounds[s0];
        hi = m.mode == MASK_BLOCK_CAUSAL ? lq : (int)m.bounds[s1 + 1];
    } else {
        lo = 0;
        hi = lq;
    }
}

// ----------------------------------------------------------------------------------------------
// tiled kernels

template <int D> struct AttCfg {
    static constexpr int NT = 2 * D;                   // threads per block
    static constexpr int TX = D / 8;                   // threads along a row (8 or 16)
    static constexpr int LD = D + 4;                   // row stride of a [64][D] tile (floats)
    static constexpr int SN = ATT_TILE / TX;           // score columns per thread (8 or 4)
    static constexpr int ROWS_PER_WARP = 4 * 32 / TX;  // 16 or 8
};

// Output column of accumulator j (0..7) of thread column tx.
template <int D> __device__ __forceinline__ int out_col(int tx, int j) {
    return tx * 4 + (j & 3) + (j >> 2) * (D / 2);
}

template <int TX> __device__ __forceinline__ float group_max(float v) {
#pragma unroll
    for (int o = TX / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

template <int TX> __device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int o = TX / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// s[r][c] = g[(row0 + r) * d + c] for r < n and c < d, else 0; r < 64, c < D (a [64][LD] tile).
template <typename T, int D>
__device__ __forceinline__ void load_rows(float* s, const T* g, int row0, int n, int d) {
    constexpr int LD = AttCfg<D>::LD, NT = AttCfg<D>::NT;
    for (int idx = threadIdx.x; idx < ATT_TILE * D; idx += NT) {
        const int r = idx / D, c = idx - r * D;
        float x = 0.0f;
        if (r < n && c < d) x = Io<T>::load(g, (i64)(row0 + r) * d + c);
        s[r * LD + c] = x;
    }
}

// acc[i][j] += sum_c A[4 ty + i][c] * B[tx + TX j][c] over c < D; A and B are [64][LD] tiles.
template <int D>
__device__ __forceinline__ void mm_dot(float (&acc)[4][AttCfg<D>::SN], const float* A, const float* B, int ty, int tx) {
    constexpr int LD = AttCfg<D>::LD, TX = AttCfg<D>::TX, SN = AttCfg<D>::SN;
    const float* a0 = A + ty * 4 * LD;
    const float* b0 = B + tx * LD;
#pragma unroll 2
    for (int c = 0; c < D; c += 4) {
        float4 a[4], b[SN];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = *reinterpret_cast<const float4*>(a0 + i * LD + c);
#pragma unroll
        for (int j = 0; j < SN; ++j) b[j] = *reinterpret_cast<const float4*>(b0 + j * TX * LD + c);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < SN; ++j) {
                float x = acc[i][j];
                x = fmaf(a[i].x, b[j].x, x);
                x = fmaf(a[i].y, b[j].y, x);
                x = fmaf(a[i].z, b[j].z, x);
                x = fmaf(a[i].w, b[j].w, x);
                acc[i][j] = x;
            }
        }
    }
}

// acc[i][j] += sum_r A[r][4 ty + i] * B[r][out_col(tx, j)] over r < 64; A is a [64][ATT_LS]
// score tile, B a [64][LD] tile.
template <int D>
__device__ __forceinline__ void mm_outer(float (&acc)[4][8], const float* A, const float* B, int ty, int tx) {
    constexpr int LD = AttCfg<D>::LD;
    const float* a0 = A + ty * 4;
    const float* b0 = B + tx * 4;
#pragma unroll 4
    for (int r = 0; r < ATT_TILE; ++r) {
        const float4 a4 = *reinterpret_cast<const float4*>(a0 + r * ATT_LS);
        const float4 bl = *reinterpret_cast<const float4*>(b0 + r * LD);
        const float4 bh = *reinterpret_cast<const float4*>(b0 + r * LD + D / 2);
        const float av[4] = {a4.x, a4.y, a4.z, a4.w};
        const float bv[8] = {bl.x, bl.y, bl.z, bl.w, bh.x, bh.y, bh.z, bh.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
    }
}

// Y[tx + TX j][4 ty + i] = x[i][j]: a thread's block of a score tile, stored transposed into a
// [64][ATT_LS] tile (one float4 per column).
template <int D>
__device__ __forceinline__ void store_scores_t(float* Y, const float (&x)[4][AttCfg<D>::SN], int ty, int tx) {
    constexpr int TX = AttCfg<D>::TX, SN = AttCfg<D>::SN;
#pragma unroll
    for (int j = 0; j < SN; ++j) {
        *reinterpret_cast<float4*>(Y + (tx + j * TX) * ATT_LS + ty * 4) =
            make_float4(x[0][j], x[1][j], x[2][j], x[3][j]);
    }
}

// Shared memory (floats): Qs, Ks, Vs [64][LD], Pt [64][ATT_LS].
template <typename T, int D>
__device__ void attn_fwd_tiled(T* __restrict__ o, float* __restrict__ lse, const T* __restrict__ q,
                               const T* __restrict__ k, const T* __restrict__ v, AttnMaskArg mask,
                               AttnDims dims, float scale_log2) {
    constexpr int LD = AttCfg<D>::LD, TX = AttCfg<D>::TX, SN = AttCfg<D>::SN;
    float* Qs = reinterpret_cast<float*>(att_smem);
    float* Ks = Qs + ATT_TILE * LD;
    float* Vs = Ks + ATT_TILE * LD;
    float* Pt = Vs + ATT_TILE * LD;
    const int lq = dims.lq, lk = dims.lk, d = dims.d;
    const int tid = threadIdx.x, ty = tid / TX, tx = tid % TX;
    const int warp_row0 = (tid >> 5) * AttCfg<D>::ROWS_PER_WARP;
    const int q0 = blockIdx.x * ATT_TILE;
    const int nq = min(ATT_TILE, lq - q0);
    for (int bh = blockIdx.y; bh < dims.bh; bh += gridDim.y) {
        const T* qh = q + (i64)bh * lq * d;
        const T* kh = k + (i64)bh * lk * d;
        const T* vh = v + (i64)bh * lk * d;
        int klo, khi;
        keys_of_rows(mask, q0, q0 + nq, lk, klo, khi);
        int lo[4], hi[4];
        float m[4], l[4], acc[4][8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = q0 + ty * 4 + i;
            lo[i] = 0;
            hi[i] = 0;
            if (row < lq) keys_of_rows(mask, row, row + 1, lk, lo[i], hi[i]);
            m[i] = NEG_INF;
            l[i] = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
        }
        const bool active = q0 + warp_row0 < lq;
        __syncthreads();  // the previous tile's readers of Qs are done
        load_rows<T, D>(Qs, qh, q0, nq, d);
        for (int k0 = klo; k0 < khi; k0 += ATT_TILE) {
            const int nk = min(ATT_TILE, khi - k0);
            __syncthreads();  // readers of Ks, Vs and Pt of the previous key tile are done
            load_rows<T, D>(Ks, kh, k0, nk, d);
            load_rows<T, D>(Vs, vh, k0, nk, d);
            __syncthreads();
            if (active) {
                float s[4][SN];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
#pragma unroll
                    for (int j = 0; j < SN; ++j) s[i][j] = 0.0f;
                }
                mm_dot<D>(s, Qs, Ks, ty, tx);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    float mt = NEG_INF;
#pragma unroll
                    for (int j = 0; j < SN; ++j) {
                        const int key = k0 + tx + j * TX;
                        const float x = (key >= lo[i] && key < hi[i]) ? s[i][j] * scale_log2 : NEG_INF;
                        s[i][j] = x;
                        mt = fmaxf(mt, x);
                    }
                    mt = group_max<TX>(mt);
                    const float mn = fmaxf(m[i], mt);
                    // While nothing is visible (mn = -inf) every p is 0 and nothing is rescaled.
                    const float base = mn == NEG_INF ? 0.0f : mn;
                    const float alpha = exp2f(m[i] - base);  // 0 when m was -inf
                    float ls = 0.0f;
#pragma unroll
                    for (int j = 0; j < SN; ++j) {
                        s[i][j] = exp2f(s[i][j] - base);
                        ls += s[i][j];
                    }
                    l[i] = l[i] * alpha + ls;
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[i][j] *= alpha;
                    m[i] = mn;
                }
                store_scores_t<D>(Pt, s, ty, tx);
            }
            __syncthreads();
            if (active) mm_outer<D>(acc, Pt, Vs, ty, tx);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float lt = group_sum<TX>(l[i]);
            const int row = q0 + ty * 4 + i;
            if (row < lq) {
                const float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
                T* orow = o + ((i64)bh * lq + row) * d;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const int c = out_col<D>(tx, j);
                    if (c < d) Io<T>::store(orow, c, acc[i][j] * inv);
                }
                if (tx == 0) lse[(i64)bh * lq + row] = lt > 0.0f ? (m[i] + log2f(lt)) * ATT_LN2 : NEG_INF;
            }
        }
    }
}

// Shared memory (floats): Ks, Vs, Qs, dOs [64][LD], Ps [64][ATT_LS], then per query of the
// tile: lse in log2 units (+inf for a row that sees nothing, so that its p is 0), delta, and
// the visible key range (ints).
template <typename T, int D>
__device__ void attn_bwd_dkdv_tiled(T* __restrict__ dk, T* __restrict__ dv, const T* __restrict__ q,
                                    const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ go,
                                    const float* __restrict__ lse, const float* __restrict__ delta,
                                    AttnMaskArg mask, AttnDims dims, float scale, float scale_log2) {
    constexpr int LD = AttCfg<D>::LD, TX = AttCfg<D>::TX, SN = AttCfg<D>::SN;
    float* Ks = reinterpret_cast<float*>(att_smem);
    float* Vs = Ks + ATT_TILE * LD;
    float* Qs = Vs + ATT_TILE * LD;
    float* dOs = Qs + ATT_TILE * LD;
    float* Ps = dOs + ATT_TILE * LD;
    float* lse2s = Ps + ATT_TILE * ATT_LS;
    float* dls = lse2s + ATT_TILE;
    int* qlo = reinterpret_cast<int*>(dls + ATT_TILE);
    int* qhi = qlo + ATT_TILE;
    const int lq = dims.lq, lk = dims.lk, d = dims.d;
    const int tid = threadIdx.x, ty = tid / TX, tx = tid % TX;
    const int k0 = blockIdx.x * ATT_TILE;
    const int nk = min(ATT_TILE, lk - k0);
    int qlo_t, qhi_t;
    rows_of_keys(mask, k0, k0 + nk, lq, qlo_t, qhi_t);
    for (int bh = blockIdx.y; bh < dims.bh; bh += gridDim.y) {
        const T* qh = q + (i64)bh * lq * d;
        const T* goh = go + (i64)bh * lq * d;
        const float* lseh = lse + (i64)bh * lq;
        const float* dh = delta + (i64)bh * lq;
        float dka[4][8], dva[4][8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                dka[i][j] = 0.0f;
                dva[i][j] = 0.0f;
            }
        }
        __syncthreads();  // the previous tile's readers of Ks and Vs are done
        load_rows<T, D>(Ks, k + (i64)bh * lk * d, k0, nk, d);
        load_rows<T, D>(Vs, v + (i64)bh * lk * d, k0, nk, d);
        for (int q0 = qlo_t; q0 < qhi_t; q0 += ATT_TILE) {
            const int nq = min(ATT_TILE, qhi_t - q0);
            __syncthreads();  // readers of Qs, dOs, Ps and the row data are done
            load_rows<T, D>(Qs, qh, q0, nq, d);
            load_rows<T, D>(dOs, goh, q0, nq, d);
            if (tid < ATT_TILE) {
                float l2 = POS_INF, dl = 0.0f;
                int lo = 0, hi = 0;
                if (tid < nq) {
                    const int row = q0 + tid;
                    const float x = lseh[row];
                    l2 = x == NEG_INF ? POS_INF : x * ATT_LOG2E;
                    dl = dh[row];
                    keys_of_rows(mask, row, row + 1, lk, lo, hi);
                }
                lse2s[tid] = l2;
                dls[tid] = dl;
                qlo[tid] = lo;
                qhi[tid] = hi;
            }
            __syncthreads();
            // P^T for this thread's keys (rows) and queries (columns), stored as Ps[q][k]; then
            // dP^T, and dS^T from it and P^T read back from Ps after the barrier (so that P^T and
            // dP^T are not both held in registers next to the two accumulators).
            float x[4][SN];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < SN; ++j) x[i][j] = 0.0f;
            }
            mm_dot<D>(x, Ks, Qs, ty, tx);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int key = k0 + ty * 4 + i;
#pragma unroll
                for (int j = 0; j < SN; ++j) {
                    const int qc = tx + j * TX;
                    x[i][j] = (key >= qlo[qc] && key < qhi[qc]) ? exp2f(x[i][j] * scale_log2 - lse2s[qc]) : 0.0f;
                }
            }
            store_scores_t<D>(Ps, x, ty, tx);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < SN; ++j) x[i][j] = 0.0f;
            }
            mm_dot<D>(x, Vs, dOs, ty, tx);
            __syncthreads();  // Ps holds P^T
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < SN; ++j) {
                    const int qc = tx + j * TX;
                    x[i][j] = Ps[qc * ATT_LS + ty * 4 + i] * (x[i][j] - dls[qc]);
                }
            }
            mm_outer<D>(dva, Ps, dOs, ty, tx);
            __syncthreads();  // readers of P^T are done
            store_scores_t<D>(Ps, x, ty, tx);
            __syncthreads();
            mm_outer<D>(dka, Ps, Qs, ty, tx);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int key = k0 + ty * 4 + i;
            if (key < lk) {
                const i64 off = ((i64)bh * lk + key) * d;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const int c = out_col<D>(tx, j);
                    if (c < d) {
                        Io<T>::store(dk, off + c, dka[i][j] * scale);
                        Io<T>::store(dv, off + c, dva[i][j]);
                    }
                }
            }
        }
    }
}

// Shared memory (floats): Qs, dOs, Ks, Vs [64][LD], dSt [64][ATT_LS].
template <typename T, int D>
__device__ void attn_bwd_dq_tiled(T* __restrict__ dq, const T* __restrict__ q, const T* __restrict__ k,
                                  const T* __restrict__ v, const T* __restrict__ go, const float* __restrict__ lse,
                                  const float* __restrict__ delta, AttnMaskArg mask, AttnDims dims, float scale,
                                  float scale_log2) {
    constexpr int LD = AttCfg<D>::LD, TX = AttCfg<D>::TX, SN = AttCfg<D>::SN;
    float* Qs = reinterpret_cast<float*>(att_smem);
    float* dOs = Qs + ATT_TILE * LD;
    float* Ks = dOs + ATT_TILE * LD;
    float* Vs = Ks + ATT_TILE * LD;
    float* dSt = Vs + ATT_TILE * LD;
    const int lq = dims.lq, lk = dims.lk, d = dims.d;
    const int tid = threadIdx.x, ty = tid / TX, tx = tid % TX;
    const int warp_row0 = (tid >> 5) * AttCfg<D>::ROWS_PER_WARP;
    const int q0 = blockIdx.x * ATT_TILE;
    const int nq = min(ATT_TILE, lq - q0);
    for (int bh = blockIdx.y; bh < dims.bh; bh += gridDim.y) {
        const T* kh = k + (i64)bh * lk * d;
        const T* vh = v + (i64)bh * lk * d;
        int klo, khi;
        keys_of_rows(mask, q0, q0 + nq, lk, klo, khi);
        int lo[4], hi[4];
        float l2[4], dl[4], acc[4][8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = q0 + ty * 4 + i;
            lo[i] = 0;
            hi[i] = 0;
            l2[i] = POS_INF;
            dl[i] = 0.0f;
            if (row < lq) {
                keys_of_rows(mask, row, row + 1, lk, lo[i], hi[i]);
                const float x = lse[(i64)bh * lq + row];
                l2[i] = x == NEG_INF ? POS_INF : x * ATT_LOG2E;
                dl[i] = delta[(i64)bh * lq + row];
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
        }
        const bool active = q0 + warp_row0 < lq;
        __syncthreads();  // the previous tile's readers of Qs and dOs are done
        load_rows<T, D>(Qs, q + (i64)bh * lq * d, q0, nq, d);
        load_rows<T, D>(dOs, go + (i64)bh * lq * d, q0, nq, d);
        for (int k0 = klo; k0 < khi; k0 += ATT_TILE) {
            const int nk = min(ATT_TILE, khi - k0);
            __syncthreads();  // readers of Ks, Vs and dSt of the previous key tile are done
            load_rows<T, D>(Ks, kh, k0, nk, d);
            load_rows<T, D>(Vs, vh, k0, nk, d);
            __syncthreads();
            if (active) {
                float p[4][SN], ds[4][SN];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
#pragma unroll
                    for (int j = 0; j < SN; ++j) {
                        p[i][j] = 0.0f;
                        ds[i][j] = 0.0f;
                    }
                }
                mm_dot<D>(p, Qs, Ks, ty, tx);
                mm_dot<D>(ds, dOs, Vs, ty, tx);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
#pragma unroll
                    for (int j = 0; j < SN; ++j) {
                        const int key = k0 + tx + j * TX;
                        const float pv = (key >= lo[i] && key < hi[i]) ? exp2f(p[i][j] * scale_log2 - l2[i]) : 0.0f;
                        ds[i][j] = pv * (ds[i][j] - dl[i]);
                    }
                }
                store_scores_t<D>(dSt, ds, ty, tx);
            }
            __syncthreads();
            if (active) mm_outer<D>(acc, dSt, Ks, ty, tx);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = q0 + ty * 4 + i;
            if (row < lq) {
                const i64 off = ((i64)bh * lq + row) * d;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const int c = out_col<D>(tx, j);
                    if (c < d) Io<T>::store(dq, off + c, acc[i][j] * scale);
                }
            }
        }
    }
}

// delta[r] = sum_c go[r][c] * o[r][c]: one warp per row.
template <typename T>
__device__ void attn_delta(float* __restrict__ delta, const T* __restrict__ go, const T* __restrict__ o, i64 rows, i64 dv) {
    const int lane = threadIdx.x & 31;
    const i64 per_block = blockDim.x >> 5;
    for (i64 r = (i64)blockIdx.x * per_block + (threadIdx.x >> 5); r < rows; r += (i64)gridDim.x * per_block) {
        float s = 0.0f;
        for (i64 c = lane; c < dv; c += 32) s += Io<T>::load(go, r * dv + c) * Io<T>::load(o, r * dv + c);
        s = warp_sum(s);
        if (lane == 0) delta[r] = s;
    }
}

// ----------------------------------------------------------------------------------------------
// naive kernels

// Score of query row i (of head bh) against key j, or -inf when masked. lo/hi is row i's key
// range under a block mask.
template <typename T>
__device__ __forceinline__ float naive_score(const T* qrow, const T* krow, int d, float scale, const AttnMaskArg& m,
                                             const float* mrow, int j, int lo, int hi) {
    if (j < lo || j >= hi) return NEG_INF;
    float s = 0.0f;
    for (int c = 0; c < d; ++c) s += Io<T>::load(qrow, c) * Io<T>::load(krow, c);
    s *= scale;
    if (m.mode == MASK_ADDITIVE) s += mrow[(i64)j * m.add_strides[3]];
    return s;
}

// The additive mask's row (b, h, i), b * H + h = bh; null without an additive mask.
__device__ __forceinline__ const float* mask_row(const AttnMaskArg& m, const AttnDims& dims, int bh, int i) {
    if (m.mode != MASK_ADDITIVE) return nullptr;
    const int b = bh / dims.heads, h = bh - b * dims.heads;
    return m.add + (i64)b * m.add_strides[0] + (i64)h * m.add_strides[1] + (i64)i * m.add_strides[2];
}

template <typename T>
__device__ void attn_naive_fwd(T* __restrict__ o, float* __restrict__ lse, const T* __restrict__ q,
                               const T* __restrict__ k, const T* __restrict__ v, AttnMaskArg mask, AttnDims dims,
                               float scale) {
    __shared__ float pc[NAIVE_THREADS];
    __shared__ float scratch[32];
    const int lk = dims.lk, d = dims.d, dv = dims.dv, tid = threadIdx.x;
    const int i = blockIdx.x;
    int lo, hi;
    keys_of_rows(mask, i, i + 1, lk, lo, hi);
    for (int bh = blockIdx.y; bh < dims.bh; bh += gridDim.y) {
        const i64 r = (i64)bh * dims.lq + i;
        const T* qrow = q + r * d;
        const T* kh = k + (i64)bh * lk * d;
        const T* vh = v + (i64)bh * lk * dv;
        const float* mrow = mask_row(mask, dims, bh, i);
        // pass 1: the row maximum
        float m = NEG_INF;
        for (int j = tid; j < lk; j += NAIVE_THREADS)
            m = fmaxf(m, naive_score(qrow, kh + (i64)j * d, d, scale, mask, mrow, j, lo, hi));
        m = block_max(m, scratch);
        if (m == NEG_INF) {  // nothing visible: output 0, lse -inf
            for (int c = tid; c < dv; c += NAIVE_THREADS) Io<T>::store(o, r * dv + c, 0.0f);
            if (tid == 0) lse[r] = NEG_INF;
            continue;
        }
        // pass 2: exponentials, their sum, and p v, one output column per thread (chunks of
        // NAIVE_THREADS columns; the first chunk also sums).
        float l = 0.0f;
        for (int c0 = 0; c0 == 0 || c0 < dv; c0 += NAIVE_THREADS) {
            const int c = c0 + tid;
            float acc = 0.0f;
            for (int j0 = 0; j0 < lk; j0 += NAIVE_THREADS) {
                const int j = j0 + tid;
                float p = 0.0f;
                if (j < lk) p = expf(naive_score(qrow, kh + (i64)j * d, d, scale, mask, mrow, j, lo, hi) - m);
                if (c0 == 0) l += p;
                __syncthreads();
                pc[tid] = p;
                __syncthreads();
                if (c < dv) {
                    const int n = min(NAIVE_THREADS, lk - j0);
                    for (int t = 0; t < n; ++t) acc += pc[t] * Io<T>::load(vh, (i64)(j0 + t) * dv + c);
                }
            }
            if (c0 == 0) l = block_sum(l, scratch);  // >= 1: the maximum contributes exp(0)
            if (c < dv) Io<T>::store(o, r * dv + c, __fdividef(acc, l));
        }
        if (tid == 0) lse[r] = m + logf(l);
    }
}

// p and dS of query row i against key j (0 when masked or when the row sees nothing).
template <typename T>
__device__ __forceinline__ void naive_p_ds(const T* qrow, const T* krow, const T* gorow, const T* vrow, int d, int dv,
                                           float scale, const AttnMaskArg& m, const float* mrow, int j, int lo,
                                           int hi, float lse_i, float delta_i, float& p, float& ds) {
    p = 0.0f;
    ds = 0.0f;
    if (lse_i == NEG_INF) return;
    const float s = naive_score(qrow, krow, d, scale, m, mrow, j, lo, hi);
    if (s == NEG_INF) return;
    p = expf(s - lse_i);
    float dp = 0.0f;
    for (int c = 0; c < dv; ++c) dp += Io<T>::load(gorow, c) * Io<T>::load(vrow, c);
    ds = p * (dp - delta_i);
}

// dq: one block per query row.
template <typename T>
__device__ void attn_naive_bwd_dq(T* __restrict__ dq, const T* __restrict__ q, const T* __restrict__ k,
                                  const T* __restrict__ v, const T* __restrict__ go, const float* __restrict__ lse,
                                  const float* __restrict__ delta, AttnMaskArg mask, AttnDims dims, float scale) {
    __shared__ float dsc[NAIVE_THREADS];
    const int lk = dims.lk, d = dims.d, dv = dims.dv, tid = threadIdx.x;
    const int i = blockIdx.x;
    int lo, hi;
    keys_of_rows(mask, i, i + 1, lk, lo, hi);
    for (int bh = blockIdx.y; bh < dims.bh; bh += gridDim.y) {
        const i64 r = (i64)bh * dims.lq + i;
        const T* qrow = q + r * d;
        const T* gorow = go + r * dv;
        const T* kh = k + (i64)bh * lk * d;
        const T* vh = v + (i64)bh * lk * dv;
        const float* mrow = mask_row(mask, dims, bh, i);
        const float lse_i = lse[r], delta_i = delta[r];
        for (int c0 = 0; c0 < d; c0 += NAIVE_THREADS) {
            const int c = c0 + tid;
            float acc = 0.0f;
            for (int j0 = 0; j0 < lk; j0 += NAIVE_THREADS) {
                const int j = j0 + tid;
                float p = 0.0f, ds = 0.0f;
                if (j < lk)
                    naive_p_ds(qrow, kh + (i64)j * d, gorow, vh + (i64)j * dv, d, dv, scale, mask, mrow, j, lo, hi,
                               lse_i, delta_i, p, ds);
                __syncthreads();
                dsc[tid] = ds;
                __syncthreads();
                if (c < d) {
                    const int n = min(NAIVE_THREADS, lk - j0);
                    for (int t = 0; t < n; ++t) acc += dsc[t] * Io<T>::load(kh, (i64)(j0 + t) * d + c);
                }
            }
            if (c < d) Io<T>::store(dq, r * d + c, acc * scale);
        }
    }
}

// dk and dv: one block per key row.
template <typename T>
__device__ void attn_naive_bwd_dkdv(T* __restrict__ dk, T* __restrict__ dvo, const T* __restrict__ q,
                                    const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ go,
                                    const float* __restrict__ lse, const float* __restrict__ delta, AttnMaskArg mask,
                                    AttnDims dims, float scale) {
    __shared__ float pc[NAIVE_THREADS];
    __shared__ float dsc[NAIVE_THREADS];
    const int lq = dims.lq, lk = dims.lk, d = dims.d, dv = dims.dv, tid = threadIdx.x;
    const int width = max(d, dv);
    const int j = blockIdx.x;
    for (int bh = blockIdx.y; bh < dims.bh; bh += gridDim.y) {
        const i64 r = (i64)bh * lk + j;
        const T* krow = k + r * d;
        const T* vrow = v + r * dv;
        const T* qh = q + (i64)bh * lq * d;
        const T* goh = go + (i64)bh * lq * dv;
        const float* lseh = lse + (i64)bh * lq;
        const float* dh = delta + (i64)bh * lq;
        for (int c0 = 0; c0 < width; c0 += NAIVE_THREADS) {
            const int c = c0 + tid;
            float acck = 0.0f, accv = 0.0f;
            for (int i0 = 0; i0 < lq; i0 += NAIVE_THREADS) {
                const int i = i0 + tid;
                float p = 0.0f, ds = 0.0f;
                if (i < lq) {
                    int lo, hi;
                    keys_of_rows(mask, i, i + 1, lk, lo, hi);
                    naive_p_ds(qh + (i64)i * d, krow, goh + (i64)i * dv, vrow, d, dv, scale, mask,
                               mask_row(mask, dims, bh, i), j, lo, hi, lseh[i], dh[i], p, ds);
                }
                __syncthreads();
                pc[tid] = p;
                dsc[tid] = ds;
                __syncthreads();
                const int n = min(NAIVE_THREADS, lq - i0);
                if (c < dv) {
                    for (int t = 0; t < n; ++t) accv += pc[t] * Io<T>::load(goh, (i64)(i0 + t) * dv + c);
                }
                if (c < d) {
                    for (int t = 0; t < n; ++t) acck += dsc[t] * Io<T>::load(qh, (i64)(i0 + t) * d + c);
                }
            }
            if (c < d) Io<T>::store(dk, r * d + c, acck * scale);
            if (c < dv) Io<T>::store(dvo, r * dv + c, accv);
        }
    }
}

// ----------------------------------------------------------------------------------------------
// mma kernels (bf16 tensor cores, sm_80+)

#include "mma.cuh"

#define ATT_MMA_WARPS 4
#define ATT_MMA_THREADS (ATT_MMA_WARPS * 32)

// Stages rows row0 .. row0 + n of a [rows][d] bf16 matrix into a [64][D + 8] shared tile with
// cp.async; rows past n and columns past d (a multiple of 8) are zero. Whole block; the caller
// commits and waits.
template <int D>
__device__ __forceinline__ void att_stage_async(bf16_t* dst, const bf16_t* g, int row0, int n, int d) {
    constexpr int V = D / 8;
    if (n == ATT_TILE && d == D) {
        // A whole tile of full rows (every tile but a head's last, at D = d): a thread's pieces
        // sit in one column, STEP rows apart, so their addresses are one base plus constants.
        // The general loop below forms each from its index with bounds checks, about 60
        // instructions a piece in SASS (tools/sass.py), a third of the forward's key-tile loop.
        constexpr int STEP = ATT_MMA_THREADS / V;
        const int r = threadIdx.x / V, col = (threadIdx.x % V) * 8;
        const bf16_t* src = g + (i64)(row0 + r) * D + col;
        bf16_t* to = dst + r * (D + 8) + col;
#pragma unroll
        for (int i = 0; i < ATT_TILE / STEP; ++i) mma_cp_async16(to + i * STEP * (D + 8), src + (i64)i * STEP * D, true);
        return;
    }
#pragma unroll 4
    for (int e = threadIdx.x; e < ATT_TILE * V; e += ATT_MMA_THREADS) {
        const int r = e / V, col = (e - r * V) * 8;
        const bool valid = r < n && col < d;
        mma_cp_async16(dst + r * (D + 8) + col, valid ? g + (i64)(row0 + r) * d + col : g, valid);
    }
}

// Issues the copies of the 64-row tiles of two [rows][d] matrices (K and V, or Q and dO) from row
// k0 (rows up to khi) into the stage at `stage` (the first, then the second) as one cp.async
// group.
template <int D>
__device__ __forceinline__ void att_stage_kv(bf16_t* stage, const bf16_t* kh, const bf16_t* vh, int k0, int khi,
                                             int d) {
    const int n = min(ATT_TILE, khi - k0);
    att_stage_async<D>(stage, kh, k0, n, d);
    att_stage_async<D>(stage + ATT_TILE * (D + 8), vh, k0, n, d);
    mma_cp_commit();
}

// The lane's two rows (tile rows g and g + 8 of its warp's 16) and the range of the other side
// each sees: keys of a query row (`keys` true) or query rows of a key; empty for a row past `n`.
struct AttLaneRows {
    int a, b;          // the rows
    bool oka, okb;     // a < n, b < n
    int alo, ahi;      // what row a sees
    int blo, bhi;      // what row b sees
};

__device__ __forceinline__ AttLaneRows att_lane_rows(const AttnMaskArg& m, int w0, int n, int other, bool keys) {
    AttLaneRows r;
    r.a = w0 + ((threadIdx.x & 31) >> 2);
    r.b = r.a + 8;
    r.oka = r.a < n;
    r.okb = r.b < n;
    r.alo = r.ahi = r.blo = r.bhi = 0;
    if (keys) {
        if (r.oka) keys_of_rows(m, r.a, r.a + 1, other, r.alo, r.ahi);
        if (r.okb) keys_of_rows(m, r.b, r.b + 1, other, r.blo, r.bhi);
    } else {
        if (r.oka) rows_of_keys(m, r.a, r.a + 1, other, r.alo, r.ahi);
        if (r.okb) rows_of_keys(m, r.b, r.b + 1, other, r.blo, r.bhi);
    }
    return r;
}

// The keys (or query rows) that every valid row of the warp sees, [lo, hi): the intersection of
// its lanes' ranges (empty when lo >= hi; everything when the warp has no valid row). A tile or
// chunk inside it needs no mask: the masked kernels' per-element compares and selects (about a
// tenth of the forward's key-tile loop) are skipped there. Whole warp (shuffles).
struct AttWarpSeen {
    int lo, hi;
};

__device__ __forceinline__ AttWarpSeen att_warp_seen(const AttLaneRows& r) {
    const int none_lo = -2147483647 - 1, none_hi = 2147483647;
    int lo = max(r.oka ? r.alo : none_lo, r.okb ? r.blo : none_lo);
    int hi = min(r.oka ? r.ahi : none_hi, r.okb ? r.bhi : none_hi);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        lo = max(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        hi = min(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    return AttWarpSeen{lo, hi};
}

__device__ __forceinline__ bool att_unmasked(const AttWarpSeen& w, int first, int n) {
    return first >= w.lo && first + n <= w.hi;
}

// How far (log2 units) a tile's score max may pass the forward's running max before O is
// rescaled to it: probabilities stay below 2^8, far inside f32 and bf16 range.
#define ATT_RESCALE_SLACK 8.0f

// The forward's per-tile softmax update of a warp's 16 x 64 scores `s` (chunk, n-tile, fragment
// element): scale to log2 units, mask (MASKED) to each row's keys, p = exp2(s - max) in place,
// row sums. The running max moves only when a tile's max passes it by more than
// ATT_RESCALE_SLACK (then O and the sum are rescaled by exp2(old max - new max)), which after a
// row's first visible tile is rare; the result is the same softmax (out = O / sum, lse = max +
// log2 sum). Each lane tests its own scores and one vote tells the warp whether any row needs its
// maximum (two shuffle rounds) at all.
template <int D, bool MASKED>
__device__ __forceinline__ void att_fwd_softmax(float (&s)[4][2][4], float (&acc)[D / 8][4], float (&mr)[2],
                                                float (&lr)[2], const AttLaneRows& rw, int k0, int tg,
                                                float scale_log2) {
    float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int lo = rr ? rw.blo : rw.alo, hi = rr ? rw.bhi : rw.ahi;
#pragma unroll
        for (int c = 0; c < 4; ++c)
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e2 = 0; e2 < 2; ++e2) {
                    const int key = k0 + 16 * c + 8 * nt + 2 * tg + e2;
                    float& x = s[c][nt][2 * rr + e2];
                    x = (!MASKED || (key >= lo && key < hi)) ? x * scale_log2 : NEG_INF;
                    mx[rr] = fmaxf(mx[rr], x);
                }
    }
    mma_lazy_rescale<D>(acc, mr, lr, mx, ATT_RESCALE_SLACK);
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        // While nothing is visible (max -inf) every p is 0.
        const float base = mr[rr] == NEG_INF ? 0.0f : mr[rr];
        float ps = 0.0f;
#pragma unroll
        for (int c = 0; c < 4; ++c)
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e2 = 0; e2 < 2; ++e2) {
                    float& x = s[c][nt][2 * rr + e2];
                    x = mma_exp2(x - base);
                    ps += x;
                }
        lr[rr] += ps;
    }
}

// dq's per-chunk dS = P (dP - delta) in place of the scores, P = exp2(s scale_log2 - lse2) masked
// (MASKED) to each row's keys.
template <bool MASKED>
__device__ __forceinline__ void att_dq_ds(float (&s)[2][4], const float (&dp)[2][4], const AttLaneRows& rw, int c0,
                                          int tg, float scale_log2, const float (&l2)[2], const float (&dl)[2]) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int rr = e >> 1, key = c0 + 8 * nt + 2 * tg + (e & 1);
            const bool valid = !MASKED || (key >= (rr ? rw.blo : rw.alo) && key < (rr ? rw.bhi : rw.ahi));
            const float p = valid ? mma_exp2(s[nt][e] * scale_log2 - l2[rr]) : 0.0f;
            s[nt][e] = p * (dp[nt][e] - dl[rr]);
        }
}

// dK/dV's per-chunk P^T (in place of the transposed scores) and dS^T = P^T (dP^T - delta), the
// columns being the chunk's queries (first `first`, local column base `col0`), masked (MASKED) to
// the queries that see each key row.
template <bool MASKED>
__device__ __forceinline__ void att_dkdv_p_ds(float (&s)[2][4], const float (&dp)[2][4], float (&dsv)[2][4],
                                              const AttLaneRows& rw, int first, int col0, int tg, float scale_log2,
                                              const float* ls, const float* ds) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int ce = 0; ce < 2; ++ce) {
            const int col = col0 + 8 * nt + 2 * tg + ce, query = first + col;
            const float l2 = ls[col], dl = ds[col];
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                const int e = 2 * rr + ce;
                const bool valid =
                    !MASKED || (query >= (rr ? rw.blo : rw.alo) && query < (rr ? rw.bhi : rw.ahi));
                const float p = valid ? mma_exp2(s[nt][e] * scale_log2 - l2) : 0.0f;
                dsv[nt][e] = p * (dp[nt][e] - dl);
                s[nt][e] = p;
            }
        }
}

// Forward. One block per (head, 64 queries), four warps of 16 queries; Q fragments in registers.
// Shared memory: two stages of (K, V) tiles, bf16 [64][D + 8] each: the next key tile is copied
// (cp.async) while the current one is used. Per tile a warp computes its 16 x 64 scores as four
// 16-key chunks (skipping the chunks no row of the warp sees), one online-softmax update, then
// O += P V with P rounded to bf16.
template <int D>
__device__ void attn_fwd_mma(bf16_t* __restrict__ o, float* __restrict__ lse, const bf16_t* __restrict__ q,
                             const bf16_t* __restrict__ k, const bf16_t* __restrict__ v, AttnMaskArg mask,
                             AttnDims dims, float scale_log2) {
    constexpr int P = D + 8, TS = ATT_TILE * P;
    bf16_t* smem = reinterpret_cast<bf16_t*>(att_smem);
    const int lq = dims.lq, lk = dims.lk, d = dims.d;
    const int warp = threadIdx.x >> 5, tg = threadIdx.x & 3;
    const int q0 = blockIdx.x * ATT_TILE, nq = min(ATT_TILE, lq - q0);
    const int w0 = q0 + warp * 16;
    const bool active = w0 < lq;
    const AttLaneRows rw = att_lane_rows(mask, w0, lq, lk, true);
    const AttWarpSeen seen = att_warp_seen(rw);
    for (int bh = blockIdx.y; bh < dims.bh; bh += gridDim.y) {
        const bf16_t* qh = q + (i64)bh * lq * d;
        const bf16_t* kh = k + (i64)bh * lk * d;
        const bf16_t* vh = v + (i64)bh * lk * d;
        int klo, khi, wlo = 0, whi = 0;
        keys_of_rows(mask, q0, q0 + nq, lk, klo, khi);
        if (active) keys_of_rows(mask, w0, min(w0 + 16, lq), lk, wlo, whi);
        unsigned qf[D / 16][4];
        mma_ldg_a<D>(qf, qh + (i64)min(rw.a, lq - 1) * d, qh + (i64)min(rw.b, lq - 1) * d, rw.oka, rw.okb, d);
        float acc[D / 8][4];
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
        float mr[2] = {NEG_INF, NEG_INF}, lr[2] = {0.0f, 0.0f};
        const int ntiles = khi > klo ? (khi - klo + ATT_TILE - 1) / ATT_TILE : 0;
        __syncthreads();  // the previous head's readers of the stages are done
        if (ntiles > 0) att_stage_kv<D>(smem, kh, vh, klo, khi, d);
        for (int t = 0; t < ntiles; ++t) {
            const int k0 = klo + t * ATT_TILE;
            const bf16_t* kt = smem + (t & 1) * 2 * TS;
            const bf16_t* vt = kt + TS;
            if (t + 1 < ntiles) {
                att_stage_kv<D>(smem + ((t + 1) & 1) * 2 * TS, kh, vh, k0 + ATT_TILE, khi, d);
                mma_cp_wait<1>();
            } else {
                mma_cp_wait<0>();
            }
            __syncthreads();
            if (active) {
                float s[4][2][4];
                bool need[4];
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int c0 = k0 + 16 * c;
                    need[c] = c0 < whi && c0 + 16 > wlo;  // uniform over the warp
#pragma unroll
                    for (int nt = 0; nt < 2; ++nt) s[c][nt][0] = s[c][nt][1] = s[c][nt][2] = s[c][nt][3] = 0.0f;
                    if (need[c]) mma_abt<D>(s[c], qf, kt + c * 16 * P);
                }
if (att_unmasked(seen, k0, ATT_TILE))
                    att_fwd_softmax<D, false>(s, acc, mr, lr, rw, k0, tg, scale_log2);
                else
                    att_fwd_softmax<D, true>(s, acc, mr, lr, rw, k0, tg, scale_log2);
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    if (!need[c]) continue;
                    unsigned pa[4];
                    mma_to_a(pa, s[c]);
                    mma_av<D>(acc, pa, vt + c * 16 * P);
                }
            }
            __syncthreads();  // the stage is refilled by the next iteration
        }
        if (active) {
            const float la = mma_quad_sum(lr[0]), lb = mma_quad_sum(lr[1]);
            bf16_t* oh = o + (i64)bh * lq * d;
            mma_store_c<D>(oh + (i64)min(rw.a, lq - 1) * d, oh + (i64)min(rw.b, lq - 1) * d, rw.oka, rw.okb, acc,
                           la > 0.0f ? 1.0f / la : 0.0f, lb > 0.0f ? 1.0f / lb : 0.0f, d);
            if (tg == 0) {
                float* lh = lse + (i64)bh * lq;
                if (rw.oka) lh[rw.a] = la > 0.0f ? (mr[0] + log2f(la)) * ATT_LN2 : NEG_INF;
                if (rw.okb) lh[rw.b] = lb > 0.0f ? (mr[1] + log2f(lb)) * ATT_LN2 : NEG_INF;
            }
        }
    }
}

// dQ. One block per (head, 64 queries) like the forward, Q and dO fragments in registers, the
// same double-buffered (K, V) stages. Per 16-key chunk: S = Q K^T and dP = dO V^T, then
// P = exp(S - lse), dS = P (dP - delta) rounded to bf16, dQ += dS K.
template <int D>
__device__ void attn_bwd_dq_mma(bf16_t* __restrict__ dq, const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                const bf16_t* __restrict__ v, const bf16_t* __restrict__ go,
                                const float* __restrict__ lse, const float* __restrict__ delta, AttnMaskArg mask,
                                AttnDims dims, float scale, float scale_log2) {
    constexpr int P = D + 8, TS = ATT_TILE * P;
    bf16_t* smem = reinterpret_cast<bf16_t*>(att_smem);
    const int lq = dims.lq, lk = dims.lk, d = dims.d;
    const int warp = threadIdx.x >> 5, tg = threadIdx.x & 3;
    const int q0 = blockIdx.x * ATT_TILE, nq = min(ATT_TILE, lq - q0);
    const int w0 = q0 + warp * 16;
    const bool active = w0 < lq;
    const AttLaneRows rw = att_lane_rows(mask, w0, lq, lk, true);
    const AttWarpSeen seen = att_warp_seen(rw);
    for (int bh = blockIdx.y; bh < dims.bh; bh += gridDim.y) {
        const i64 ra = (i64)bh * lq + min(rw.a, lq - 1), rb = (i64)bh * lq + min(rw.b, lq - 1);
        const bf16_t* kh = k + (i64)bh * lk * d;
        const bf16_t* vh = v + (i64)bh * lk * d;
        int klo, khi, wlo = 0, whi = 0;
        keys_of_rows(mask, q0, q0 + nq, lk, klo, khi);
        if (active) keys_of_rows(mask, w0, min(w0 + 16, lq), lk, wlo, whi);
        unsigned qf[D / 16][4], gf[D / 16][4];
        mma_ldg_a<D>(qf, q + ra * d, q + rb * d, rw.oka, rw.okb, d);
        mma_ldg_a<D>(gf, go + ra * d, go + rb * d, rw.oka, rw.okb, d);
        const float l2[2] = {rw.oka ? lse[ra] * ATT_LOG2E : 0.0f, rw.okb ? lse[rb] * ATT_LOG2E : 0.0f};
        const float dl[2] = {rw.oka ? delta[ra] : 0.0f, rw.okb ? delta[rb] : 0.0f};
        float acc[D / 8][4];
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
        const int ntiles = khi > klo ? (khi - klo + ATT_TILE - 1) / ATT_TILE : 0;
        __syncthreads();
        if (ntiles > 0) att_stage_kv<D>(smem, kh, vh, klo, khi, d);
        for (int t = 0; t < ntiles; ++t) {
            const int k0 = klo + t * ATT_TILE;
            const bf16_t* kt = smem + (t & 1) * 2 * TS;
            const bf16_t* vt = kt + TS;
            if (t + 1 < ntiles) {
                att_stage_kv<D>(smem + ((t + 1) & 1) * 2 * TS, kh, vh, k0 + ATT_TILE, khi, d);
                mma_cp_wait<1>();
            } else {
                mma_cp_wait<0>();
            }
            __syncthreads();
            if (active) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int c0 = k0 + 16 * c;
                    if (!(c0 < whi && c0 + 16 > wlo)) continue;  // uniform over the warp
                    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
                    float dp[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
                    mma_abt<D>(s, qf, kt + c * 16 * P);
                    mma_abt<D>(dp, gf, vt + c * 16 * P);
                    if (att_unmasked(seen, c0, 16))
                        att_dq_ds<false>(s, dp, rw, c0, tg, scale_log2, l2, dl);
                    else
                        att_dq_ds<true>(s, dp, rw, c0, tg, scale_log2, l2, dl);
                    unsigned dsa[4];
                    mma_to_a(dsa, s);
                    mma_av<D>(acc, dsa, kt + c * 16 * P);
                }
            }
            __syncthreads();
        }
        if (active) mma_store_c<D>(dq + ra * d, dq + rb * d, rw.oka, rw.okb, acc, scale, scale, d);
    }
}

// dK and dV. One block per (head, 64 keys), four warps of 16 keys, dK and dV accumulated in
// registers (no atomics). Shared memory: the block's K and V tiles (the A operands of the
// transposed score products), then two stages of (Q, dO) tiles, bf16 [64][D + 8] each, then two
// stages of lse * log2(e) and delta, f32 [64] each. Per 16-query chunk: S^T = K Q^T and
// dP^T = V dO^T, P^T = exp(S^T - lse), dS^T = P^T (dP^T - delta), then dV += P^T dO and
// dK += dS^T Q (P and dS rounded to bf16).
template <int D>
__device__ void attn_bwd_dkdv_mma(bf16_t* __restrict__ dk, bf16_t* __restrict__ dv, const bf16_t* __restrict__ q,
                                  const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
                                  const bf16_t* __restrict__ go, const float* __restrict__ lse,
                                  const float* __restrict__ delta, AttnMaskArg mask, AttnDims dims, float scale,
                                  float scale_log2) {
    constexpr int P = D + 8, TS = ATT_TILE * P;
    bf16_t* kt = reinterpret_cast<bf16_t*>(att_smem);
    bf16_t* vt = kt + TS;
    bf16_t* stages = vt + TS;  // stage s: Q at stages + 2 s TS, dO after it
    float* stats = reinterpret_cast<float*>(stages + 4 * TS);  // stage s: lse at stats + 128 s, delta + 64
    const int lq = dims.lq, lk = dims.lk, d = dims.d;
    const int warp = threadIdx.x >> 5, tg = threadIdx.x & 3;
    const int c0 = blockIdx.x * ATT_TILE, nk = min(ATT_TILE, lk - c0);
    const int w0 = c0 + warp * 16;
    const bool active = w0 < lk;
    const AttLaneRows rw = att_lane_rows(mask, w0, lk, lq, false);
    const AttWarpSeen seen = att_warp_seen(rw);
    for (int bh = blockIdx.y; bh < dims.bh; bh += gridDim.y) {
        const bf16_t* qh = q + (i64)bh * lq * d;
        const bf16_t* gh = go + (i64)bh * lq * d;
        const float* lh = lse + (i64)bh * lq;
        const float* dh = delta + (i64)bh * lq;
        int qlo, qhi, wlo = 0, whi = 0;
        rows_of_keys(mask, c0, c0 + nk, lq, qlo, qhi);
        if (active) rows_of_keys(mask, w0, min(w0 + 16, lk), lq, wlo, whi);
        const int ntiles = qhi > qlo ? (qhi - qlo + ATT_TILE - 1) / ATT_TILE : 0;
        __syncthreads();  // the previous head's readers are done
        att_stage_async<D>(kt, k + (i64)bh * lk * d, c0, nk, d);
        att_stage_async<D>(vt, v + (i64)bh * lk * d, c0, nk, d);
        mma_cp_commit();
        auto stage = [&](int t) {
            const int r0 = qlo + t * ATT_TILE, n = min(ATT_TILE, qhi - r0);
            att_stage_kv<D>(stages + (t & 1) * 2 * TS, qh, gh, r0, qhi, d);  // Q and dO rows
            float* st = stats + (t & 1) * 2 * ATT_TILE;  // plain stores: the barrier publishes them
            for (int r = threadIdx.x; r < ATT_TILE; r += ATT_MMA_THREADS) {
                st[r] = r < n ? lh[r0 + r] * ATT_LOG2E : 0.0f;
                st[ATT_TILE + r] = r < n ? dh[r0 + r] : 0.0f;
            }
        };
        if (ntiles > 0) stage(0);
        float ak[D / 8][4], av[D / 8][4];
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) {
            ak[nt][0] = ak[nt][1] = ak[nt][2] = ak[nt][3] = 0.0f;
            av[nt][0] = av[nt][1] = av[nt][2] = av[nt][3] = 0.0f;
        }
        const bf16_t* mk = kt + warp * 16 * P;
        const bf16_t* mv = vt + warp * 16 * P;
        for (int t = 0; t < ntiles; ++t) {
            const int r0 = qlo + t * ATT_TILE;
            const bf16_t* qs = stages + (t & 1) * 2 * TS;
            const bf16_t* gs = qs + TS;
            const float* ls = stats + (t & 1) * 2 * ATT_TILE;
            const float* ds = ls + ATT_TILE;
            if (t + 1 < ntiles) {
                stage(t + 1);
                mma_cp_wait<1>();
            } else {
                mma_cp_wait<0>();
            }
            __syncthreads();
            if (active) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int cq = r0 + 16 * c;
                    if (!(cq < whi && cq + 16 > wlo)) continue;  // uniform over the warp
                    // Transposed scores: rows are the warp's keys, columns the chunk's queries.
                    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
                    float dp[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
                    mma_abt_s<D>(s, mk, qs + c * 16 * P);
                    mma_abt_s<D>(dp, mv, gs + c * 16 * P);
                    float dsv[2][4];
                    if (att_unmasked(seen, cq, 16))
                        att_dkdv_p_ds<false>(s, dp, dsv, rw, r0, 16 * c, tg, scale_log2, ls, ds);
                    else
                        att_dkdv_p_ds<true>(s, dp, dsv, rw, r0, 16 * c, tg, scale_log2, ls, ds);
                    unsigned pa[4], dsa[4];
                    mma_to_a(pa, s);
                    mma_to_a(dsa, dsv);
                    mma_av<D>(av, pa, gs + c * 16 * P);
                    mma_av<D>(ak, dsa, qs + c * 16 * P);
                }
            }
            __syncthreads();
        }
        mma_cp_wait<0>();  // the K and V copies when no query tile was visited
        if (active) {
            const i64 ja = (i64)bh * lk + min(rw.a, lk - 1), jb = (i64)bh * lk + min(rw.b, lk - 1);
            mma_store_c<D>(dk + ja * d, dk + jb * d, rw.oka, rw.okb, ak, scale, scale, d);
            mma_store_c<D>(dv + ja * d, dv + jb * d, rw.oka, rw.okb, av, 1.0f, 1.0f, d);
        }
    }
}

// ----------------------------------------------------------------------------------------------
// instantiations

#define ATTN_TILED_KERNELS(T, S, D)                                                                          \
    extern "C" __global__ void __launch_bounds__(2 * D, 1)                                                   \
        attn_fwd_d##D##_##S(T* o, float* lse, const T* q, const T* k, const T* v, AttnMaskArg mask,          \
                            AttnDims dims, float scale_log2) {                                               \
        attn_fwd_tiled<T, D>(o, lse, q, k, v, mask, dims, scale_log2);                                       \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(2 * D, 1)                                                   \
        attn_bwd_dkdv_d##D##_##S(T* dk, T* dv, const T* q, const T* k, const T* v, const T* go,              \
                                 const float* lse, const float* delta, AttnMaskArg mask, AttnDims dims,      \
                                 float scale, float scale_log2) {                                            \
        attn_bwd_dkdv_tiled<T, D>(dk, dv, q, k, v, go, lse, delta, mask, dims, scale, scale_log2);           \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(2 * D, 1)                                                   \
        attn_bwd_dq_d##D##_##S(T* dq, const T* q, const T* k, const T* v, const T* go, const float* lse,     \
                               const float* delta, AttnMaskArg mask, AttnDims dims, float scale,             \
                               float scale_log2) {                                                           \
        attn_bwd_dq_tiled<T, D>(dq, q, k, v, go, lse, delta, mask, dims, scale, scale_log2);                 \
    }

#define ATTN_KERNELS(T, S)                                                                                   \
    ATTN_TILED_KERNELS(T, S, 64)                                                                             \
    ATTN_TILED_KERNELS(T, S, 128)                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 1)                                                     \
        attn_bwd_delta_##S(float* delta, const T* go, const T* o, i64 rows, i64 dv) {                        \
        attn_delta<T>(delta, go, o, rows, dv);                                                               \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(NAIVE_THREADS, 1)                                           \
        attn_naive_fwd_##S(T* o, float* lse, const T* q, const T* k, const T* v, AttnMaskArg mask,           \
                           AttnDims dims, float scale) {                                                     \
        attn_naive_fwd<T>(o, lse, q, k, v, mask, dims, scale);                                               \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(NAIVE_THREADS, 1)                                           \
        attn_naive_bwd_dq_##S(T* dq, const T* q, const T* k, const T* v, const T* go, const float* lse,      \
                              const float* delta, AttnMaskArg mask, AttnDims dims, float scale) {            \
        attn_naive_bwd_dq<T>(dq, q, k, v, go, lse, delta, mask, dims, scale);                                \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(NAIVE_THREADS, 1)                                           \
        attn_naive_bwd_dkdv_##S(T* dk, T* dv, const T* q, const T* k, const T* v, const T* go,               \
                                const float* lse, const float* delta, AttnMaskArg mask, AttnDims dims,       \
                                float scale) {                                                               \
        attn_naive_bwd_dkdv<T>(dk, dv, q, k, v, go, lse, delta, mask, dims, scale);                          \
    }

#define ATTN_MMA_KERNELS(D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(ATT_MMA_THREADS, 1)                                          \
        attn_fwd_mma_d##D##_bf16(bf16_t* o, float* lse, const bf16_t* q, const bf16_t* k, const bf16_t* v,   \
                                 AttnMaskArg mask, AttnDims dims, float scale_log2) {                        \
        attn_fwd_mma<D>(o, lse, q, k, v, mask, dims, scale_log2);                                            \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(ATT_MMA_THREADS, 1)                                          \
        attn_bwd_dkdv_mma_d##D##_bf16(bf16_t* dk, bf16_t* dv, const bf16_t* q, const bf16_t* k,              \
                                      const bf16_t* v, const bf16_t* go, const float* lse,                   \
                                      const float* delta, AttnMaskArg mask, AttnDims dims, float scale,      \
                                      float scale_log2) {                                                    \
        attn_bwd_dkdv_mma<D>(dk, dv, q, k, v, go, lse, delta, mask, dims, scale, scale_log2);                \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(ATT_MMA_THREADS, 1)                                          \
        attn_bwd_dq_mma_d##D##_bf16(bf16_t* dq, const bf16_t* q, const bf16_t* k, const bf16_t* v,           \
                                    const bf16_t* go, const float* lse, const float* delta,                  \
                                    AttnMaskArg mask, AttnDims dims, float scale, float scale_log2) {        \
        attn_bwd_dq_mma<D>(dq, q, k, v, go, lse, delta, mask, dims, scale, scale_log2);                      \
    }

ATTN_KERNELS(float, f32)
ATTN_KERNELS(bf16_t, bf16)
ATTN_MMA_KERNELS(64)
ATTN_MMA_KERNELS(128)
